//! The baseline of `scripts/bench-migrate.sh`: a plain copy of every file under a directory
//! into an S3 bucket, with no hashing, no index and no checks, as a generic tool would do it
//! (one PUT per file, multipart above 16 MiB in 8 MiB parts, `CONCURRENCY` at once).
//!
//! ```sh
//! AWS_ENDPOINT_URL=http://127.0.0.1:8333 AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=… \
//! AWS_SECRET_ACCESS_KEY=… cargo run --release -p deriva-store-remote --example plain_copy -- \
//!   DIR BUCKET PREFIX CONCURRENCY
//! ```
//!
//! Prints `files bytes seconds` on stdout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt as _, TryStreamExt as _};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload, WriteMultipart};

const MULTIPART_ABOVE: usize = 16 << 20;
const PART: usize = 8 << 20;

fn files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, bucket, prefix, concurrency] = args.as_slice() else {
        return Err("usage: plain_copy DIR BUCKET PREFIX CONCURRENCY".into());
    };
    let concurrency: usize = concurrency.parse()?;
    // object_store's reqwest has no crypto provider of its own: it takes the process's.
    deriva_util::crypto::use_ring();
    let store: Arc<dyn ObjectStore> = Arc::new(
        AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_allow_http(true)
            .build()?,
    );
    let mut paths = Vec::new();
    files(Path::new(dir), &mut paths)?;
    let started = Instant::now();
    let bytes: u64 = futures::stream::iter(paths.iter())
        .map(|path| {
            let store = store.clone();
            let key = Key::from(format!(
                "{prefix}/{}",
                path.file_name().unwrap_or_default().to_string_lossy()
            ));
            async move {
                let data = bytes::Bytes::from(std::fs::read(path)?);
                let len = data.len() as u64;
                if data.len() > MULTIPART_ABOVE {
                    let upload = store.put_multipart(&key).await?;
                    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
                    for part in data.chunks(PART) {
                        writer.wait_for_capacity(2).await?;
                        writer.put(data.slice_ref(part));
                    }
                    writer.finish().await?;
                } else {
                    store.put(&key, PutPayload::from(data)).await?;
                }
                Ok::<u64, Box<dyn std::error::Error>>(len)
            }
        })
        .buffer_unordered(concurrency)
        .try_fold(0u64, |sum, n| async move { Ok(sum + n) })
        .await?;
    println!(
        "{} {} {:.3}",
        paths.len(),
        bytes,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
