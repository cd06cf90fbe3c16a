//! `blake3/v1`: the hex BLAKE3 digest of the input.

use bytes::Bytes;
use deriva_core::{CAddr, Params};

use crate::function::params::unary_without_params;
use crate::function::{ComputeFunction, FunctionError};

pub(super) struct Blake3Hex;

impl ComputeFunction for Blake3Hex {
    fn output_size(&self, _: &[u64], _: &Params) -> Option<u64> {
        Some(64)
    }

    fn validate(&self, n: usize, params: &Params) -> Result<(), FunctionError> {
        unary_without_params(n, params)
    }

    fn compute(&self, inputs: &[Bytes], params: &Params) -> Result<Bytes, FunctionError> {
        self.validate(inputs.len(), params)?;
        // A leaf address is exactly the plain BLAKE3 digest.
        Ok(CAddr::for_leaf(&inputs[0]).to_hex().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtins::test_util::run;

    #[test]
    fn digest_matches_b3sum() {
        assert_eq!(
            run(&Blake3Hex, &[b"abc"], &[]).unwrap(),
            &b"6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"[..]
        );
    }
}
