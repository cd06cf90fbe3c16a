//! Byte-shuffling builtins: identity, concat, case, reverse, repeat, slice.

use bytes::{Bytes, BytesMut};
use deriva_core::Params;

use crate::function::params::{exactly, only, required_u64, unary_without_params};
use crate::function::{
    CANCEL_CHECK_BYTES, ComputeContext, ComputeFunction, FunctionError, MAX_OUTPUT_BYTES,
};

pub(super) struct Identity;

impl ComputeFunction for Identity {
    fn output_size(&self, sizes: &[u64], _: &Params) -> Option<u64> {
        sizes.first().copied()
    }

    fn validate(&self, n: usize, params: &Params) -> Result<(), FunctionError> {
        unary_without_params(n, params)
    }

    fn compute(
        &self,
        _: &ComputeContext,
        inputs: &[Bytes],
        params: &Params,
    ) -> Result<Bytes, FunctionError> {
        self.validate(inputs.len(), params)?;
        // No work: the same bytes.
        Ok(inputs[0].clone())
    }
}

pub(super) struct Concat;

impl ComputeFunction for Concat {
    fn output_size(&self, sizes: &[u64], _: &Params) -> Option<u64> {
        sizes.iter().try_fold(0u64, |a, b| a.checked_add(*b))
    }

    fn validate(&self, _n: usize, params: &Params) -> Result<(), FunctionError> {
        only(params, &[])
    }

    fn compute(
        &self,
        ctx: &ComputeContext,
        inputs: &[Bytes],
        params: &Params,
    ) -> Result<Bytes, FunctionError> {
        self.validate(inputs.len(), params)?;
        let total: u64 = inputs.iter().map(|i| i.len() as u64).sum();
        if total > MAX_OUTPUT_BYTES {
            return Err(FunctionError::Failed(format!(
                "output would be {total} bytes; the limit is {MAX_OUTPUT_BYTES}"
            )));
        }
        if let [single] = inputs {
            return Ok(single.clone());
        }
        let mut out = BytesMut::with_capacity(total as usize);
        for input in inputs {
            ctx.check()?;
            for chunk in input.chunks(CANCEL_CHECK_BYTES) {
                ctx.check()?;
                out.extend_from_slice(chunk);
            }
        }
        Ok(out.freeze())
    }
}

pub(super) struct AsciiCase {
    pub(super) upper: bool,
}

impl ComputeFunction for AsciiCase {
    fn output_size(&self, sizes: &[u64], _: &Params) -> Option<u64> {
        sizes.first().copied()
    }

    fn validate(&self, n: usize, params: &Params) -> Result<(), FunctionError> {
        unary_without_params(n, params)
    }

    fn compute(
        &self,
        ctx: &ComputeContext,
        inputs: &[Bytes],
        params: &Params,
    ) -> Result<Bytes, FunctionError> {
        self.validate(inputs.len(), params)?;
        let mut out = Vec::with_capacity(inputs[0].len());
        for chunk in inputs[0].chunks(CANCEL_CHECK_BYTES) {
            ctx.check()?;
            let start = out.len();
            out.extend_from_slice(chunk);
            if self.upper {
                out[start..].make_ascii_uppercase();
            } else {
                out[start..].make_ascii_lowercase();
            }
        }
        Ok(out.into())
    }
}

pub(super) struct Reverse;

impl ComputeFunction for Reverse {
    fn output_size(&self, sizes: &[u64], _: &Params) -> Option<u64> {
        sizes.first().copied()
    }

    fn validate(&self, n: usize, params: &Params) -> Result<(), FunctionError> {
        unary_without_params(n, params)
    }

    fn compute(
        &self,
        ctx: &ComputeContext,
        inputs: &[Bytes],
        params: &Params,
    ) -> Result<Bytes, FunctionError> {
        self.validate(inputs.len(), params)?;
        let mut out = Vec::with_capacity(inputs[0].len());
        // The last chunk first, each one reversed.
        for chunk in inputs[0].rchunks(CANCEL_CHECK_BYTES) {
            ctx.check()?;
            let start = out.len();
            out.extend_from_slice(chunk);
            out[start..].reverse();
        }
        Ok(out.into())
    }
}

pub(super) struct Repeat;

/// The `count` of `repeat`, within [`MAX_OUTPUT_BYTES`] whatever the input: more copies than
/// that many bytes could only come from an empty input, and would be work without output.
fn repeat_count(params: &Params) -> Result<u64, FunctionError> {
    let count = required_u64(params, "count")?;
    if count > MAX_OUTPUT_BYTES {
        return Err(FunctionError::BadParam {
            param: "count".into(),
            reason: format!(
                "must be at most {MAX_OUTPUT_BYTES} (the output limit in bytes), got {count}"
            ),
        });
    }
    Ok(count)
}

impl ComputeFunction for Repeat {
    fn output_size(&self, sizes: &[u64], params: &Params) -> Option<u64> {
        let count = repeat_count(params).ok()?;
        sizes.first()?.checked_mul(count)
    }

    fn validate(&self, n: usize, params: &Params) -> Result<(), FunctionError> {
        exactly(1, n)?;
        only(params, &["count"])?;
        repeat_count(params).map(drop)
    }

    fn compute(
        &self,
        ctx: &ComputeContext,
        inputs: &[Bytes],
        params: &Params,
    ) -> Result<Bytes, FunctionError> {
        self.validate(inputs.len(), params)?;
        let count = repeat_count(params)?;
        let input = &inputs[0];
        let total = (input.len() as u64)
            .checked_mul(count)
            .filter(|t| *t <= MAX_OUTPUT_BYTES);
        let Some(total) = total else {
            return Err(FunctionError::BadParam {
                param: "count".into(),
                reason: format!(
                    "is {count}: {count} copies of {} bytes exceed the {MAX_OUTPUT_BYTES}-byte output limit",
                    input.len()
                ),
            });
        };
        // At most 1 GiB, checked above.
        let total = total as usize;
        let mut out = Vec::with_capacity(total);
        if total > 0 {
            out.extend_from_slice(input);
        }
        // Whole copies of what is there already, doubling it, in steps of about
        // CANCEL_CHECK_BYTES: a copy of the output so far is a whole number of copies of the
        // input, so appending any whole number of them keeps the pattern.
        let step = input.len() * (CANCEL_CHECK_BYTES / input.len().max(1)).max(1);
        while out.len() < total {
            ctx.check()?;
            let n = out.len().min(total - out.len()).min(step);
            out.extend_from_within(..n);
        }
        Ok(out.into())
    }
}

pub(super) struct Slice;

impl ComputeFunction for Slice {
    fn output_size(&self, sizes: &[u64], params: &Params) -> Option<u64> {
        let length = required_u64(params, "length").ok()?;
        Some(length.min(*sizes.first()?))
    }

    fn validate(&self, n: usize, params: &Params) -> Result<(), FunctionError> {
        exactly(1, n)?;
        only(params, &["offset", "length"])?;
        required_u64(params, "offset")?;
        required_u64(params, "length").map(drop)
    }

    fn compute(
        &self,
        _: &ComputeContext,
        inputs: &[Bytes],
        params: &Params,
    ) -> Result<Bytes, FunctionError> {
        self.validate(inputs.len(), params)?;
        let offset = required_u64(params, "offset")?;
        let length = required_u64(params, "length")?;
        let input = &inputs[0];
        match offset.checked_add(length) {
            Some(end) if end <= input.len() as u64 => {
                // Zero-copy: a view into the input.
                Ok(input.slice(offset as usize..end as usize))
            }
            _ => Err(FunctionError::Failed(format!(
                "range {offset}..{offset}+{length} is outside the {}-byte input",
                input.len()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtins::test_util::{run, run_cancelled};

    #[test]
    fn identity_returns_its_input_and_takes_one() {
        assert_eq!(run(&Identity, &[b"abc"], &[]).unwrap(), &b"abc"[..]);
        assert!(matches!(
            run(&Identity, &[b"a", b"b"], &[]),
            Err(FunctionError::InputCount { got: 2, .. })
        ));
        let err = run(&Identity, &[b"a"], &[("x", "1")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "param `x` is not accepted: this function takes no params"
        );
    }

    #[test]
    fn concat_joins_in_order() {
        assert_eq!(
            run(&Concat, &[b"ab", b"", b"cd"], &[]).unwrap(),
            &b"abcd"[..]
        );
        assert_eq!(run(&Concat, &[b"cd", b"ab"], &[]).unwrap(), &b"cdab"[..]);
        assert_eq!(run(&Concat, &[], &[]).unwrap(), &b""[..]);
    }

    #[test]
    fn case_mapping_is_ascii_only() {
        let up = AsciiCase { upper: true };
        let low = AsciiCase { upper: false };
        assert_eq!(
            run(&up, &["héllo wörld 1".as_bytes()], &[]).unwrap(),
            "HéLLO WöRLD 1".as_bytes()
        );
        assert_eq!(
            run(&low, &["HÉLLO World".as_bytes()], &[]).unwrap(),
            "hÉllo world".as_bytes()
        );
        assert_eq!(run(&up, &[&[0xff, b'a']], &[]).unwrap(), &[0xff, b'A'][..]);
    }

    #[test]
    fn reverse_reverses_bytes() {
        assert_eq!(run(&Reverse, &[b"abc"], &[]).unwrap(), &b"cba"[..]);
        assert_eq!(run(&Reverse, &[b""], &[]).unwrap(), &b""[..]);
    }

    #[test]
    fn repeat_repeats_and_names_bad_count() {
        assert_eq!(
            run(&Repeat, &[b"ab"], &[("count", "3")]).unwrap(),
            &b"ababab"[..]
        );
        assert_eq!(run(&Repeat, &[b"ab"], &[("count", "0")]).unwrap(), &b""[..]);
        assert_eq!(
            run(&Repeat, &[b"ab"], &[]).unwrap_err(),
            FunctionError::MissingParam { param: "count" }
        );
        let err = run(&Repeat, &[b"ab"], &[("count", "-1")]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("param `count` must be a non-negative integer"),
            "{err}"
        );
        let err = run(&Repeat, &[b"ab"], &[("count", "1000000000000")]).unwrap_err();
        assert!(
            matches!(&err, FunctionError::BadParam { param, .. } if param == "count"),
            "{err}"
        );
    }

    /// Issue 30: an empty input made any count pass the output check, and `repeat` then looped
    /// `count` times; the count is now bounded whatever the input, before anything runs.
    #[test]
    fn repeat_refuses_a_count_over_the_output_limit_whatever_its_input() {
        let limit = MAX_OUTPUT_BYTES.to_string();
        for count in [u64::MAX, MAX_OUTPUT_BYTES + 1] {
            let params: Params = [("count".to_owned(), count.to_string())].into();
            let err = Repeat.validate(1, &params).unwrap_err();
            assert!(
                matches!(&err, FunctionError::BadParam { param, .. } if param == "count"),
                "{err}"
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "param `count` must be at most {limit} (the output limit in bytes), got {count}"
                )
            );
            for input in [&b""[..], b"x"] {
                assert_eq!(
                    run(&Repeat, &[input], &[("count", &count.to_string())]),
                    Err(err.clone())
                );
            }
        }
        // At the limit an empty input is accepted and costs nothing.
        assert_eq!(
            run(&Repeat, &[b""], &[("count", &limit)]).unwrap(),
            &b""[..]
        );
        assert_eq!(
            Repeat.output_size(&[0], &[("count".to_owned(), u64::MAX.to_string())].into()),
            None
        );
    }

    /// `repeat` copies in steps of whole inputs; every size around a step gives the same bytes
    /// as the plain loop.
    #[test]
    fn repeat_matches_the_plain_loop_across_steps() {
        for len in [
            1,
            3,
            1000,
            CANCEL_CHECK_BYTES - 1,
            CANCEL_CHECK_BYTES,
            CANCEL_CHECK_BYTES + 7,
        ] {
            let input: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            for count in [1u64, 2, 5, 64, 1000] {
                if len as u64 * count > 8 << 20 {
                    continue;
                }
                let got = run(&Repeat, &[&input], &[("count", &count.to_string())]).unwrap();
                assert!(got == input.repeat(count as usize), "{len} bytes x {count}");
            }
        }
    }

    /// Every builtin that loops looks at its context before its first chunk; `identity` and
    /// `slice`, which do no work, answer at once.
    #[test]
    fn looping_builtins_stop_when_cancelled() {
        let big = vec![b'a'; 3 * CANCEL_CHECK_BYTES];
        let cancelled = |f: &dyn ComputeFunction, inputs: &[&[u8]], params: &[(&str, &str)]| {
            run_cancelled(f, inputs, params) == Err(FunctionError::Cancelled)
        };
        assert!(cancelled(&Concat, &[&big, &big], &[]));
        assert!(cancelled(&AsciiCase { upper: true }, &[&big], &[]));
        assert!(cancelled(&AsciiCase { upper: false }, &[&big], &[]));
        assert!(cancelled(&Reverse, &[&big], &[]));
        assert!(cancelled(&Repeat, &[b"ab"], &[("count", "100000")]));
        assert!(cancelled(&Repeat, &[&big], &[("count", "2")]));
        assert_eq!(
            run_cancelled(&Identity, &[&big], &[]).unwrap().len(),
            big.len()
        );
        let p = [("offset", "1"), ("length", "2")];
        assert_eq!(run_cancelled(&Slice, &[&big], &p).unwrap(), &b"aa"[..]);
    }

    #[test]
    fn chunked_case_and_reverse_match_the_whole_input_versions() {
        let input: Vec<u8> = (0..2 * CANCEL_CHECK_BYTES + 5)
            .map(|i| (i % 256) as u8)
            .collect();
        let mut upper = input.clone();
        upper.make_ascii_uppercase();
        let mut reversed = input.clone();
        reversed.reverse();
        assert!(run(&AsciiCase { upper: true }, &[&input], &[]).unwrap() == upper);
        assert!(run(&Reverse, &[&input], &[]).unwrap() == reversed);
        assert!(run(&Concat, &[&input, &reversed], &[]).unwrap() == [input, reversed].concat());
    }

    #[test]
    fn slice_takes_a_range_inside_the_input() {
        let p = |o, l| [("offset", o), ("length", l)];
        assert_eq!(
            run(&Slice, &[b"abcdef"], &p("1", "3")).unwrap(),
            &b"bcd"[..]
        );
        assert_eq!(run(&Slice, &[b"abcdef"], &p("6", "0")).unwrap(), &b""[..]);
        assert!(matches!(
            run(&Slice, &[b"abc"], &p("2", "2")),
            Err(FunctionError::Failed(_))
        ));
        assert!(matches!(
            run(&Slice, &[b"abc"], &p(&u64::MAX.to_string(), "2")),
            Err(FunctionError::Failed(_))
        ));
        assert_eq!(
            run(&Slice, &[b"abc"], &[("offset", "0")]).unwrap_err(),
            FunctionError::MissingParam { param: "length" }
        );
        let err = run(&Slice, &[b"abc"], &[("offset", "x"), ("length", "1")]).unwrap_err();
        assert!(matches!(&err, FunctionError::BadParam { param, .. } if param == "offset"));
    }
}
