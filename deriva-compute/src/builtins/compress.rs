//! `gzip/v1` and `gunzip/v1` (flate2).

use std::io::{Read, Write};

use bytes::Bytes;
use deriva_core::Params;
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

use crate::function::params::{exactly, only, optional_u64, unary_without_params};
use crate::function::{
    CANCEL_CHECK_BYTES, ComputeContext, ComputeFunction, FunctionError, MAX_OUTPUT_BYTES,
};

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

    fn compute(
        &self,
        ctx: &ComputeContext,
        inputs: &[Bytes],
        params: &Params,
    ) -> Result<Bytes, FunctionError> {
        self.validate(inputs.len(), params)?;
        // The gzip header flate2 writes has mtime 0 and no file name, so output depends only on
        // the input and the level. Fed a chunk at a time, so a cancellation is seen between
        // chunks (the encoder's output does not depend on how its input is cut).
        let mut enc = GzEncoder::new(Vec::new(), Compression::new(level(params)?));
        for chunk in inputs[0].chunks(CANCEL_CHECK_BYTES) {
            ctx.check()?;
            enc.write_all(chunk)
                .map_err(|e| FunctionError::Failed(e.to_string()))?;
            if enc.get_ref().len() as u64 > MAX_OUTPUT_BYTES {
                return Err(FunctionError::Failed(format!(
                    "compressed output exceeds the {MAX_OUTPUT_BYTES}-byte limit"
                )));
            }
        }
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

    fn compute(
        &self,
        ctx: &ComputeContext,
        inputs: &[Bytes],
        params: &Params,
    ) -> Result<Bytes, FunctionError> {
        self.validate(inputs.len(), params)?;
        let mut out = Vec::new();
        // Read one byte past the limit to tell "exactly at the limit" from "over it"; a chunk
        // at a time, so a cancellation is seen between chunks.
        let mut decoder = GzDecoder::new(&inputs[0][..]).take(MAX_OUTPUT_BYTES + 1);
        let mut chunk = vec![0; CANCEL_CHECK_BYTES];
        loop {
            ctx.check()?;
            match decoder.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(FunctionError::Failed(format!(
                        "input is not valid gzip: {e}"
                    )));
                }
            }
        }
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
    use std::time::{Duration, Instant};

    use super::*;
    use crate::builtins::test_util::{run, run_cancelled};
    use crate::function::CancelToken;

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

    #[test]
    fn gzip_and_gunzip_stop_when_cancelled() {
        let data = vec![b'z'; 3 * CANCEL_CHECK_BYTES];
        let zipped = run(&Gzip, &[&data], &[]).unwrap();
        assert_eq!(
            run_cancelled(&Gzip, &[&data], &[]),
            Err(FunctionError::Cancelled)
        );
        assert_eq!(
            run_cancelled(&Gunzip, &[&zipped], &[]),
            Err(FunctionError::Cancelled)
        );
    }

    /// Cancelled while it works (gzip at level 9 of 32 MiB of random letters `a` and `b`, many
    /// seconds even in a release build), gzip returns within about one chunk of work.
    #[test]
    fn gzip_stops_within_a_chunk_of_a_cancellation() {
        let mut x = 0x9E37_79B9_7F4A_7C15_u64;
        let data: Vec<u8> = (0..32 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b'a' + (x & 1) as u8
            })
            .collect();
        let cancel = CancelToken::new();
        let ctx = ComputeContext::new(cancel.clone());
        let worker = std::thread::spawn(move || {
            let params: Params = [("level".to_owned(), "9".to_owned())].into();
            Gzip.compute(&ctx, &[data.into()], &params)
        });
        // Not a wait for readiness: the compute is cancelled whether or not it has started.
        std::thread::sleep(Duration::from_millis(200));
        cancel.cancel();
        let cancelled = Instant::now();
        assert_eq!(worker.join().unwrap(), Err(FunctionError::Cancelled));
        let took = cancelled.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "returned {took:?} after the cancellation"
        );
    }

    #[test]
    fn gzip_fed_in_chunks_gives_the_bytes_of_one_write() {
        let data: Vec<u8> = (0..3 * CANCEL_CHECK_BYTES + 11)
            .map(|i| (i * 7 % 13) as u8)
            .collect();
        let mut whole = GzEncoder::new(Vec::new(), Compression::new(6));
        whole.write_all(&data).unwrap();
        assert!(run(&Gzip, &[&data], &[]).unwrap() == whole.finish().unwrap());
        let zipped = run(&Gzip, &[&data], &[]).unwrap();
        assert!(run(&Gunzip, &[&zipped], &[]).unwrap() == data);
    }
}
