//! Calendar dates of Unix times, for the times the server's pages and the client print (UTC,
//! proleptic Gregorian), with no date crate.

/// The proleptic Gregorian date (year, month 1-12, day 1-31) `days` after 1970-01-01.
///
/// Counted from 0000-03-01 so that February, with its leap day, ends each year: then every
/// 400 years are 146,097 days, and within them every 100 years 36,524 days (36,525 for the
/// last century of the 400), every 4 years 1,461 days and each year 365 (366 for the last of
/// the 4), and the months from March repeat a 153-day pattern every five months.
pub fn civil_date(days: u64) -> (u64, u64, u64) {
    // 1970-01-01 is day 719,468 counted from 0000-03-01.
    let n = days + 719_468;
    let era = n / 146_097;
    let of_era = n % 146_097;
    // The year within the 400, correcting for the leap days of the 4-, 100- and 400-year
    // cycles before this day.
    let year_of_era = (of_era - of_era / 1460 + of_era / 36_524 - of_era / 146_096) / 365;
    let day_of_year = of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Month 0 is March.
    let march_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * march_month + 2) / 5 + 1;
    let (month, january_or_later) = if march_month < 10 {
        (march_month + 3, 0)
    } else {
        (march_month - 9, 1)
    };
    (era * 400 + year_of_era + january_or_later, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_day_of_four_centuries_follows_the_one_before() {
        // Day by day from 1970 to 2370 (a full 400-year cycle): each date is the next one of
        // the calendar, so no month or leap day is skipped or doubled.
        let mut expected = (1970, 1, 1);
        for days in 0..146_097u64 {
            assert_eq!(civil_date(days), expected, "day {days}");
            let (y, m, d) = expected;
            let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
            let month_days = match m {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            expected = if d < month_days {
                (y, m, d + 1)
            } else if m < 12 {
                (y, m + 1, 1)
            } else {
                (y + 1, 1, 1)
            };
        }
    }
}
