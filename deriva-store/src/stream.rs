//! Leaf bytes as streams of chunks, for leaves too large to hold in memory at once
//! ([`BlobStore::get_stream`](super::BlobStore::get_stream) and
//! [`BlobStore::put_stream`](super::BlobStore::put_stream)).
//!
//! The contract: a stream's bytes are complete and verified only when it ends without an
//! error. A read whose bytes do not hash to the address passes every chunk on and then ends
//! with [`DerivaError::Corrupted`], so a consumer must not commit what it received until the
//! end (a writer that gets an error item abandons what it wrote).

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt as _, TryStreamExt as _};

use deriva_core::CAddr;
use deriva_core::{DerivaError, Result};

/// A leaf's bytes, chunk by chunk; see the module's contract.
pub type ByteStream = BoxStream<'static, Result<Bytes>>;

/// `chunks`, hashed as they pass. If their bytes do not hash to `addr`, the stream ends with
/// [`DerivaError::Corrupted`] after the last chunk; `source` names where they were read (`the
/// object store s3://b/`) for its message. An error of `chunks` ends the stream too.
pub fn verified(addr: CAddr, source: String, chunks: ByteStream) -> ByteStream {
    struct State {
        chunks: ByteStream,
        hasher: blake3::Hasher,
        len: u64,
        done: bool,
    }
    let state = State {
        chunks,
        hasher: blake3::Hasher::new(),
        len: 0,
        done: false,
    };
    futures::stream::unfold(state, move |mut s| {
        let source = source.clone();
        async move {
            if s.done {
                return None;
            }
            match s.chunks.next().await {
                Some(Ok(chunk)) => {
                    s.hasher.update(&chunk);
                    s.len += chunk.len() as u64;
                    Some((Ok(chunk), s))
                }
                Some(Err(e)) => {
                    s.done = true;
                    Some((Err(e), s))
                }
                None => {
                    s.done = true;
                    let found = CAddr::from(*s.hasher.finalize().as_bytes());
                    (found != addr).then(|| {
                        let err = DerivaError::Corrupted {
                            addr,
                            detail: format!("{source} holds {} bytes that hash to {found}", s.len),
                        };
                        (Err(err), s)
                    })
                }
            }
        }
    })
    .boxed()
}

/// The bytes read from a file are read in blocks of about this many bytes, one blocking call
/// each, and sent on in chunks cut from them.
pub const READ_BLOCK_BYTES: usize = 1 << 20;

/// The rest of `file` (from its current position) in chunks of at most `chunk_bytes`: read in
/// blocks of about [`READ_BLOCK_BYTES`] (a whole number of chunks), each on the blocking pool
/// in the caller's span, and cut into chunks without copying. An empty rest is one empty chunk.
/// A read error ends the stream with [`DerivaError::Io`] naming `context`. `keep` is held until
/// the stream ends or is dropped (a store's lease, so that it does not close under a reader).
pub fn file_chunks<K: Send + 'static>(
    file: std::fs::File,
    chunk_bytes: usize,
    context: String,
    keep: K,
) -> ByteStream {
    let chunk = chunk_bytes.max(1);
    let block = (READ_BLOCK_BYTES / chunk).max(1) * chunk;
    struct State<K> {
        file: std::fs::File,
        yielded: bool,
        _keep: K,
    }
    let state = State {
        file,
        yielded: false,
        _keep: keep,
    };
    futures::stream::try_unfold(Some(state), move |state| {
        let context = context.clone();
        async move {
            let Some(mut state) = state else {
                return Ok(None);
            };
            let span = tracing::Span::current();
            let (file, buf) = crate::task::spawn_blocking_in(span, move || {
                use std::io::Read as _;
                let mut file = state.file;
                let mut buf = Vec::with_capacity(block);
                let read = (&mut file).take(block as u64).read_to_end(&mut buf);
                read.map(|_| (file, buf))
            })
            .await
            .map_err(|e| DerivaError::from_join(&context, e))?
            .map_err(|e| DerivaError::io(&context, &e))?;
            state.file = file;
            if buf.is_empty() {
                let last = (!state.yielded).then(|| (vec![Ok(Bytes::new())], None));
                return Ok(last);
            }
            state.yielded = true;
            Ok(Some((cut(Bytes::from(buf), chunk), Some(state))))
        }
    })
    .map_ok(futures::stream::iter)
    .try_flatten()
    .boxed()
}

/// One chunk of `data` as a stream, for a backend whose reads are whole.
pub fn once(data: Bytes) -> ByteStream {
    futures::stream::once(async move { Ok(data) }).boxed()
}

/// `data` in chunks of at most `chunk_bytes`, each a slice of it (nothing is copied); empty
/// data is one empty chunk.
pub fn chunks(data: Bytes, chunk_bytes: usize) -> ByteStream {
    futures::stream::iter(cut(data, chunk_bytes.max(1))).boxed()
}

/// `data` as slices of at most `chunk` bytes; empty data is one empty slice.
fn cut(data: Bytes, chunk: usize) -> Vec<Result<Bytes>> {
    let count = data.len().div_ceil(chunk).max(1);
    (0..count)
        .map(|i| Ok(data.slice(i * chunk..((i + 1) * chunk).min(data.len()))))
        .collect()
}

#[cfg(test)]
mod tests {
    use futures::TryStreamExt as _;

    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> ByteStream {
        let parts: Vec<Result<Bytes>> = parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        futures::stream::iter(parts).boxed()
    }

    #[tokio::test]
    async fn matching_bytes_pass_and_end_ok() {
        let addr = CAddr::for_leaf(b"hello world");
        let got: Vec<Bytes> = verified(addr, "test".into(), chunks(&[b"hello", b" world"]))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(got.concat(), b"hello world");
    }

    #[tokio::test]
    async fn other_bytes_pass_then_end_with_corrupted() {
        let addr = CAddr::for_leaf(b"hello world");
        let items: Vec<Result<Bytes>> =
            verified(addr, "the test".into(), chunks(&[b"hello", b" there"]))
                .collect()
                .await;
        assert_eq!(items.len(), 3, "both chunks, then the error");
        match &items[2] {
            Err(DerivaError::Corrupted { addr: a, detail }) => {
                assert_eq!(*a, addr);
                assert!(detail.contains("the test holds 11 bytes"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }
}
