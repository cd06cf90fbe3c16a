//! Numbers as the CLI prints them for people: durations, sizes, ages, indentation of trees, and
//! RFC 3339 times from Unix microseconds (written here: the client links no date crate).

use std::time::Duration;

/// A duration in microseconds: `850 µs`, `1.50 ms`, `3.10 s`.
pub(crate) fn duration_text(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2} s", us as f64 / 1e6)
    } else if us >= 1000 {
        format!("{:.2} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

/// A size: `512 B`, `2.0 KiB`, `1.5 MiB`, `3.0 GiB`.
pub(crate) fn bytes_text(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// How long ago, in its largest whole unit: `42 s`, `5 min`, `3 h`, `12 d` (rounded down).
pub(crate) fn age_text(age: Duration) -> String {
    let s = age.as_secs();
    match s {
        s if s >= 86_400 => format!("{} d", s / 86_400),
        s if s >= 3600 => format!("{} h", s / 3600),
        s if s >= 60 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// The indentation of a tree line `depth` levels down (two spaces a level, one level for the
/// root), or, past `max` levels, the deepest indentation followed by `[depth] `.
pub(crate) fn indent(depth: usize, max: usize) -> String {
    if depth <= max {
        "  ".repeat(depth + 1)
    } else {
        format!("{}[{depth}] ", "  ".repeat(max + 1))
    }
}

/// `micros` since the Unix epoch as an RFC 3339 UTC time with microseconds,
/// `2026-12-04T10:00:00.123456Z`; `None` past the year 9999, which RFC 3339 cannot write.
pub(crate) fn rfc3339(micros: u64) -> Option<String> {
    let secs = micros / 1_000_000;
    let days = secs / 86_400;
    let of_day = secs % 86_400;
    let (year, month, day) = deriva_util::time::civil_date(days);
    (year <= 9999).then(|| {
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
            of_day / 3600,
            of_day % 3600 / 60,
            of_day % 60,
            micros % 1_000_000
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_US: u64 = 86_400 * 1_000_000;

    #[test]
    fn rfc3339_from_the_epoch_through_leap_years() {
        const S: u64 = 1_000_000;
        // Checked with `date -u -d @SECONDS`.
        for (micros, expected) in [
            (0, "1970-01-01T00:00:00.000000Z"),
            (1, "1970-01-01T00:00:00.000001Z"),
            // 2000 is a leap year (divisible by 400).
            (951_782_400 * S, "2000-02-29T00:00:00.000000Z"),
            (951_782_400 * S + DAY_US, "2000-03-01T00:00:00.000000Z"),
            // 2100 is not (divisible by 100, not by 400).
            (4_107_456_000 * S, "2100-02-28T00:00:00.000000Z"),
            (4_107_456_000 * S + DAY_US, "2100-03-01T00:00:00.000000Z"),
            // 2024 is (divisible by 4); then the last microsecond of that year.
            (1_709_164_800 * S + 123_456, "2024-02-29T00:00:00.123456Z"),
            (1_735_689_600 * S - 1, "2024-12-31T23:59:59.999999Z"),
            (1_765_000_000 * S, "2025-12-06T05:46:40.000000Z"),
            // The last second RFC 3339 can write.
            (253_402_300_799 * S, "9999-12-31T23:59:59.000000Z"),
        ] {
            assert_eq!(rfc3339(micros).as_deref(), Some(expected), "{micros}");
        }
        assert_eq!(rfc3339(253_402_300_800 * S), None);
        assert_eq!(rfc3339(u64::MAX), None);
    }

    #[test]
    fn ages_use_their_largest_whole_unit() {
        let text = |s| age_text(Duration::from_secs(s));
        assert_eq!(
            [0, 59, 60, 3599, 3600, 86_399, 86_400, 3 * 86_400 + 5].map(text),
            [
                "0 s", "59 s", "1 min", "59 min", "1 h", "23 h", "1 d", "3 d"
            ]
        );
        assert_eq!(duration_text(3_100_000), "3.10 s");
        assert_eq!(duration_text(850), "850 µs");
        assert_eq!(bytes_text(2048), "2.0 KiB");
        assert_eq!(indent(0, 16), "  ");
        assert_eq!(indent(17, 16), format!("{}[17] ", "  ".repeat(17)));
    }
}
