//! `blake3/v1`: the hex BLAKE3 digest of the input.

use bytes::Bytes;
use deriva_core::Params;

use crate::function::params::unary_without_params;
use crate::function::{CANCEL_CHECK_BYTES, ComputeContext, ComputeFunction, FunctionError};

pub(super) struct Blake3Hex;

impl ComputeFunction for Blake3Hex {
    fn output_size(&self, _: &[u64], _: &Params) -> Option<u64> {
        Some(64)
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
        // The plain BLAKE3 digest (a leaf's address), a chunk at a time.
        let mut hasher = blake3::Hasher::new();
        for chunk in inputs[0].chunks(CANCEL_CHECK_BYTES) {
            ctx.check()?;
            hasher.update(chunk);
        }
        Ok(hasher.finalize().to_hex().as_str().to_owned().into())
    }
}

#[cfg(test)]
mod tests {
    use deriva_core::CAddr;

    use super::*;
    use crate::builtins::test_util::{run, run_cancelled};

    #[test]
    fn digest_matches_b3sum() {
        assert_eq!(
            run(&Blake3Hex, &[b"abc"], &[]).unwrap(),
            &b"6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"[..]
        );
    }

    #[test]
    fn digest_in_chunks_is_the_leaf_address_and_stops_when_cancelled() {
        let data: Vec<u8> = (0..3 * CANCEL_CHECK_BYTES + 1).map(|i| i as u8).collect();
        let hex = CAddr::for_leaf(&data).to_hex();
        assert_eq!(run(&Blake3Hex, &[&data], &[]).unwrap(), hex.as_bytes());
        assert_eq!(
            run_cancelled(&Blake3Hex, &[&data], &[]),
            Err(FunctionError::Cancelled)
        );
    }
}
