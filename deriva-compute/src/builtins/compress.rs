//! `gzip/v1` and `gunzip/v1` (flate2).

use std::io::{Read, Write};

use bytes::Bytes;
use deriva_core::Params;
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

use crate::function::params::{exactly, only, optional_u64, unary_without_params};
use crate::function::{ComputeFunction, FunctionError, MAX_OUTPUT_BYTES};

pub(super) struct Gzip;

fn level(params: &Params) -> Result<u32, FunctionError> {
    match optional_u64(params, "level")? {
        None => Ok(6),
        Some(l @ 0..=9) => Ok(l as u32),
        Some(l) => Err(FunctionError::BadParam {
            param: "level".into(),
            reason: format!("must be 0 to 9, got {l}"),
        }),
    }
}

impl ComputeFunction for Gzip {
    fn validate(&self, n: usize, params: &Params) -> Result<(), FunctionError> {
        exactly(1, n)?;
        only(params, &["level"])?;
        level(params).map(drop)
    }

    fn compute(&self, inputs: &[Bytes], params: &Params) -> Result<Bytes, FunctionError> {
        self.validate(inputs.len(), params)?;
        // The gzip header flate2 writes has mtime 0 and no file name, so output depends only on
        // the input and the level.
        let mut enc = GzEncoder::new(Vec::new(), Compression::new(level(params)?));
        enc.write_all(&inputs[0])
            .map_err(|e| FunctionError::Failed(e.to_string()))?;
        let out = enc
            .finish()
            .map_err(|e| FunctionError::Failed(e.to_string()))?;
        Ok(out.into())
    }
}

pub(super) struct Gunzip;

impl ComputeFunction for Gunzip {
    fn validate(&self, n: usize, params: &Params) -> Result<(), FunctionError> {
        unary_without_params(n, params)
    }

    fn compute(&self, inputs: &[Bytes], params: &Params) -> Result<Bytes, FunctionError> {
        self.validate(inputs.len(), params)?;
        let mut out = Vec::new();
        // Read one byte past the limit to tell "exactly at the limit" from "over it".
        GzDecoder::new(&inputs[0][..])
            .take(MAX_OUTPUT_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| FunctionError::Failed(format!("input is not valid gzip: {e}")))?;
        if out.len() as u64 > MAX_OUTPUT_BYTES {
            return Err(FunctionError::Failed(format!(
                "decompressed output exceeds the {MAX_OUTPUT_BYTES}-byte limit"
            )));
        }
        Ok(out.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtins::test_util::run;

    #[test]
    fn gzip_round_trips_and_is_deterministic() {
        let data = b"hello hello hello hello hello".repeat(20);
        let z1 = run(&Gzip, &[&data], &[]).unwrap();
        let z2 = run(&Gzip, &[&data], &[]).unwrap();
        assert_eq!(z1, z2);
        assert_eq!(&z1[..2], &[0x1f, 0x8b], "gzip magic");
        assert!(z1.len() < data.len());
        assert_eq!(run(&Gunzip, &[&z1], &[]).unwrap(), &data[..]);
        let z0 = run(&Gzip, &[&data], &[("level", "0")]).unwrap();
        assert!(z0.len() > z1.len());
        assert_eq!(run(&Gunzip, &[&z0], &[]).unwrap(), &data[..]);
    }

    #[test]
    fn bad_level_and_bad_gzip_are_errors() {
        let err = run(&Gzip, &[b"x"], &[("level", "10")]).unwrap_err();
        assert!(matches!(&err, FunctionError::BadParam { param, .. } if param == "level"));
        let err = run(&Gunzip, &[b"definitely not gzip"], &[]).unwrap_err();
        assert!(
            matches!(&err, FunctionError::Failed(m) if m.contains("not valid gzip")),
            "{err}"
        );
    }
}
