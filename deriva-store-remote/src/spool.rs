//! Streamed uploads whose address is known only at their last byte: held in a local file,
//! hashed on the way in, then uploaded under their address. The object store's key is the
//! address, so the bytes must be complete before the first part is named.

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use deriva_core::error::Result;
use deriva_core::{CAddr, DerivaError};
use deriva_store::{ByteStream, stream};
use futures::StreamExt as _;

/// Chunks read back from a spooled file for the upload.
const READ_CHUNK: usize = 1 << 20;

/// A directory for spooled uploads. Whatever is in it when it opens is a leftover of an
/// interrupted upload and is removed.
#[derive(Debug)]
pub(crate) struct Spool {
    dir: PathBuf,
    seq: AtomicU64,
}

/// A complete spooled upload: its address, its length and its file, removed on drop.
#[derive(Debug)]
pub(crate) struct Spooled {
    pub(crate) addr: CAddr,
    pub(crate) len: u64,
    path: PathBuf,
}

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl Spool {
    /// Opens (creating) `dir` and empties it. Blocking.
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let ctx = |p: &Path| format!("preparing the upload spool {}", p.display());
        fs::create_dir_all(dir).map_err(|e| DerivaError::io(ctx(dir), &e))?;
        for entry in fs::read_dir(dir).map_err(|e| DerivaError::io(ctx(dir), &e))? {
            let path = entry.map_err(|e| DerivaError::io(ctx(dir), &e))?.path();
            fs::remove_file(&path).map_err(|e| DerivaError::io(ctx(&path), &e))?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            seq: AtomicU64::new(0),
        })
    }

    /// Writes `data` to a new file, hashing it; the file is removed if `data` yields an error
    /// or a write fails.
    pub(crate) async fn take(&self, mut data: ByteStream) -> Result<Spooled> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let path = self
            .dir
            .join(format!("upload.{}.{seq}.tmp", std::process::id()));
        let context = format!("spooling an upload to {}", path.display());
        let file = {
            let path = path.clone();
            blocking(&context, move || File::create_new(&path)).await?
        };
        // Removes the file on every early return until it becomes a `Spooled`.
        let mut partial = Spooled {
            addr: CAddr::from([0; 32]),
            len: 0,
            path,
        };
        let mut state = (file, blake3::Hasher::new());
        while let Some(chunk) = data.next().await {
            let chunk: Bytes = chunk?;
            partial.len += chunk.len() as u64;
            state = blocking(&context, move || {
                let (mut file, mut hasher) = state;
                file.write_all(&chunk)?;
                hasher.update(&chunk);
                Ok((file, hasher))
            })
            .await?;
        }
        partial.addr = CAddr::from(*state.1.finalize().as_bytes());
        Ok(partial)
    }
}

impl Spooled {
    /// The file's bytes, read back in chunks on the blocking pool.
    pub(crate) fn stream(&self) -> Result<ByteStream> {
        let context = format!("reading {}", self.path.display());
        let file = File::open(&self.path).map_err(|e| DerivaError::io(&context, &e))?;
        Ok(stream::file_chunks(file, READ_CHUNK, context, ()))
    }
}

/// Runs blocking file I/O on the blocking pool; an error names `context`.
async fn blocking<T: Send + 'static>(
    context: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DerivaError::from_join(context, e))?
        .map_err(|e| DerivaError::io(context, &e))
}

#[cfg(test)]
mod tests {
    use futures::TryStreamExt as _;

    use super::*;

    #[tokio::test]
    async fn spooled_bytes_hash_and_read_back_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("leftover"), b"x").unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let data: Vec<u8> = (0..3 * READ_CHUNK + 5).map(|i| (i % 251) as u8).collect();
        let parts: Vec<Result<Bytes>> = data
            .chunks(70_000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let spooled = spool
            .take(futures::stream::iter(parts).boxed())
            .await
            .unwrap();
        assert_eq!(spooled.addr, CAddr::for_leaf(&data));
        assert_eq!(spooled.len, data.len() as u64);
        let back: Vec<Bytes> = spooled.stream().unwrap().try_collect().await.unwrap();
        assert_eq!(back.len(), 4, "1 MiB chunks");
        assert_eq!(back.concat(), data);
        drop(spooled);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        let failing = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"abc")),
            Err(DerivaError::InvalidInput("cut".into())),
        ])
        .boxed();
        assert!(matches!(
            spool.take(failing).await,
            Err(DerivaError::InvalidInput(_))
        ));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
