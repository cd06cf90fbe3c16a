//! Byte-shuffling builtins: identity, concat, case, reverse, repeat, slice.

use bytes::{Bytes, BytesMut};
use deriva_core::Params;

use crate::function::params::{exactly, only, required_u64, unary_without_params};
use crate::function::{ComputeFunction, FunctionError, MAX_OUTPUT_BYTES};

pub(super) struct Identity;

impl ComputeFunction for Identity {
    fn output_size(&self, sizes: &[u64], _: &Params) -> Option<u64> {
        sizes.first().copied()
    }

    fn validate(&self, n: usize, params: &Params) -> Result<(), FunctionError> {
        unary_without_params(n, params)
    }

    fn compute(&self, inputs: &[Bytes], params: &Params) -> Result<Bytes, FunctionError> {
        self.validate(inputs.len(), params)?;
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

    fn compute(&self, inputs: &[Bytes], params: &Params) -> Result<Bytes, FunctionError> {
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
            out.extend_from_slice(input);
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

    fn compute(&self, inputs: &[Bytes], params: &Params) -> Result<Bytes, FunctionError> {
        self.validate(inputs.len(), params)?;
        let mut out = inputs[0].to_vec();
        if self.upper {
            out.make_ascii_uppercase();
        } else {
            out.make_ascii_lowercase();
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

    fn compute(&self, inputs: &[Bytes], params: &Params) -> Result<Bytes, FunctionError> {
        self.validate(inputs.len(), params)?;
        let mut out = inputs[0].to_vec();
        out.reverse();
        Ok(out.into())
    }
}

pub(super) struct Repeat;

impl ComputeFunction for Repeat {
    fn output_size(&self, sizes: &[u64], params: &Params) -> Option<u64> {
        let count = required_u64(params, "count").ok()?;
        sizes.first()?.checked_mul(count)
    }

    fn validate(&self, n: usize, params: &Params) -> Result<(), FunctionError> {
        exactly(1, n)?;
        only(params, &["count"])?;
        required_u64(params, "count").map(drop)
    }

    fn compute(&self, inputs: &[Bytes], params: &Params) -> Result<Bytes, FunctionError> {
        self.validate(inputs.len(), params)?;
        let count = required_u64(params, "count")?;
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
        let mut out = BytesMut::with_capacity(total as usize);
        for _ in 0..count {
            out.extend_from_slice(input);
        }
        Ok(out.freeze())
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

    fn compute(&self, inputs: &[Bytes], params: &Params) -> Result<Bytes, FunctionError> {
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
    use crate::builtins::test_util::run;

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
