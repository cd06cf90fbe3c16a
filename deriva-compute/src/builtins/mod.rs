//! The builtin functions, all version `v1`:
//!
//! | id | inputs | params | output |
//! |---|---|---|---|
//! | `identity/v1` | 1 | – | the input |
//! | `concat/v1` | any number | – | the inputs joined in order |
//! | `uppercase/v1` | 1 | – | ASCII letters upper-cased, other bytes unchanged |
//! | `lowercase/v1` | 1 | – | ASCII letters lower-cased, other bytes unchanged |
//! | `reverse/v1` | 1 | – | the bytes in reverse order |
//! | `repeat/v1` | 1 | `count` | the input `count` times |
//! | `slice/v1` | 1 | `offset`, `length` | `length` bytes from `offset`; the range must lie inside the input |
//! | `blake3/v1` | 1 | – | the 64-character lowercase hex BLAKE3 digest of the input |
//! | `gzip/v1` | 1 | optional `level` (0–9, default 6) | gzip of the input |
//! | `gunzip/v1` | 1 | – | the decompressed input |
//!
//! Case mapping is ASCII-only on purpose: Unicode case tables change between Unicode versions,
//! which would make the output depend on the machine.
//!
//! ## Bounds
//!
//! No param makes a builtin produce more than
//! [`MAX_OUTPUT_BYTES`](crate::function::MAX_OUTPUT_BYTES) (1 GiB) or work without producing:
//! `repeat` refuses a `count` above `MAX_OUTPUT_BYTES` when the recipe is stored, whatever its
//! input (an empty input would otherwise loop `count` times for nothing), and any count whose
//! output would pass the limit; `gunzip` stops at the limit (a gzip bomb fails); `gzip` fails
//! past it; `concat` refuses inputs that add up to more. Every other builtin does work linear in
//! its input bytes, which the memory budget bounds, and `identity` and `slice` do none (they
//! return the input, or a view of it). Every builtin that loops looks at its
//! [`ComputeContext`](crate::ComputeContext) every
//! [`CANCEL_CHECK_BYTES`](crate::function::CANCEL_CHECK_BYTES) (64 KiB) of work (per copy
//! step in `repeat`, per block in `gzip` and `gunzip`), so a cancelled builtin returns within
//! about that much work.

mod bytes_ops;
mod compress;
mod digest;

use deriva_core::FunctionId;

use crate::function::FunctionRegistry;

fn id(name: &str) -> FunctionId {
    FunctionId::new(name, "v1").expect("builtin ids are valid")
}

/// Registers every builtin in `registry`.
pub fn register_all(registry: &mut FunctionRegistry) {
    registry
        .register(id("identity"), bytes_ops::Identity)
        .register(id("concat"), bytes_ops::Concat)
        .register(id("uppercase"), bytes_ops::AsciiCase { upper: true })
        .register(id("lowercase"), bytes_ops::AsciiCase { upper: false })
        .register(id("reverse"), bytes_ops::Reverse)
        .register(id("repeat"), bytes_ops::Repeat)
        .register(id("slice"), bytes_ops::Slice)
        .register(id("blake3"), digest::Blake3Hex)
        .register(id("gzip"), compress::Gzip)
        .register(id("gunzip"), compress::Gunzip);
}

#[cfg(test)]
pub(crate) mod test_util {
    use bytes::Bytes;
    use deriva_core::Params;

    use crate::function::{CancelToken, ComputeContext, ComputeFunction, FunctionError};

    fn call(
        f: &dyn ComputeFunction,
        ctx: &ComputeContext,
        inputs: &[&[u8]],
        params: &[(&str, &str)],
    ) -> Result<Bytes, FunctionError> {
        let params: Params = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let inputs: Vec<Bytes> = inputs.iter().map(|i| Bytes::copy_from_slice(i)).collect();
        f.validate(inputs.len(), &params)?;
        f.compute(ctx, &inputs, &params)
    }

    /// Validates, then computes with a context that is never cancelled.
    pub(crate) fn run(
        f: &dyn ComputeFunction,
        inputs: &[&[u8]],
        params: &[(&str, &str)],
    ) -> Result<Bytes, FunctionError> {
        call(f, &ComputeContext::default(), inputs, params)
    }

    /// Like [`run`], with a context cancelled before the compute starts.
    pub(crate) fn run_cancelled(
        f: &dyn ComputeFunction,
        inputs: &[&[u8]],
        params: &[(&str, &str)],
    ) -> Result<Bytes, FunctionError> {
        let cancel = CancelToken::new();
        cancel.cancel();
        call(f, &ComputeContext::new(cancel), inputs, params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_has_every_builtin() {
        let registry = FunctionRegistry::with_builtins();
        let ids: Vec<String> = registry.ids().iter().map(ToString::to_string).collect();
        assert_eq!(
            ids,
            [
                "blake3/v1",
                "concat/v1",
                "gunzip/v1",
                "gzip/v1",
                "identity/v1",
                "lowercase/v1",
                "repeat/v1",
                "reverse/v1",
                "slice/v1",
                "uppercase/v1"
            ]
        );
    }
}
