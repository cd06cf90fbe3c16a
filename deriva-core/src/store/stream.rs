//! Leaf bytes as streams of chunks, for leaves too large to hold in memory at once
//! ([`BlobStore::get_stream`](super::BlobStore::get_stream) and
//! [`BlobStore::put_stream`](super::BlobStore::put_stream)).
//!
//! The contract: a stream's bytes are complete and verified only when it ends without an
//! error. A read whose bytes do not hash to the address passes every chunk on and then ends
//! with [`DerivaError::Corrupted`], so a consumer must not commit what it received until the
//! end (a writer that gets an error item abandons what it wrote).

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;

use crate::addr::CAddr;
use crate::error::{DerivaError, Result};

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

/// One chunk of `data` as a stream, for a backend whose reads are whole.
pub fn once(data: Bytes) -> ByteStream {
    futures::stream::once(async move { Ok(data) }).boxed()
}

/// `data` in chunks of at most `chunk_bytes`, each a slice of it (nothing is copied); empty
/// data is one empty chunk.
pub fn chunks(data: Bytes, chunk_bytes: usize) -> ByteStream {
    let chunk = chunk_bytes.max(1);
    let count = data.len().div_ceil(chunk).max(1);
    let cuts: Vec<Result<Bytes>> = (0..count)
        .map(|i| Ok(data.slice(i * chunk..((i + 1) * chunk).min(data.len()))))
        .collect();
    futures::stream::iter(cuts).boxed()
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
