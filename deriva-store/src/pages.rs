//! Keyset-paginated listings as streams: a backend answers one page at a time (`list_page`:
//! what sorts after a key, at most a limit), and [`pages`] turns those answers into a stream
//! of pages, so a caller holds one page at a time and no caller writes the loop.

use std::future::Future;

use futures::StreamExt as _;
use futures::stream::BoxStream;

use deriva_core::Result;

/// Items per page of a listing, unless the caller chooses: a page of addresses is about 40
/// KiB.
pub const PAGE: usize = 1000;

/// The pages of a keyset-paginated listing: `fetch(after, limit)` gives the next at most
/// `limit` items in the listing's order, those after the key `after` (from the start when
/// `None`), fewer than `limit` only at the end; `key` is the key of an item. The stream ends
/// after a short page (an empty one is not yielded) or at the first error, which it yields.
///
/// Each page is asked for only when the stream is polled past the one before, so an item
/// stored while the listing runs is seen if its key sorts after the page being read, and an
/// item that exists throughout is seen exactly once.
pub fn pages<'a, T, K, F, Fut>(
    limit: usize,
    key: impl Fn(&T) -> K + Send + Sync + 'a,
    mut fetch: F,
) -> BoxStream<'a, Result<Vec<T>>>
where
    T: Send + 'a,
    K: Send + 'a,
    F: FnMut(Option<K>, usize) -> Fut + Send + 'a,
    Fut: Future<Output = Result<Vec<T>>> + Send + 'a,
{
    let limit = limit.max(1);
    let key = std::sync::Arc::new(key);
    // The state: the key to list after, and whether the end was seen.
    futures::stream::unfold((None::<K>, false), move |(after, done)| {
        let page = (!done).then(|| fetch(after, limit));
        let key = key.clone();
        async move {
            match page?.await {
                Ok(page) if page.is_empty() => None,
                Ok(page) => {
                    let last = page.last().map(|item| key(item));
                    let end = page.len() < limit;
                    Some((Ok(page), (last, end)))
                }
                Err(e) => Some((Err(e), (None, true))),
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt as _;

    /// `0..n` as a keyset listing.
    fn numbers(n: u32, limit: usize) -> BoxStream<'static, Result<Vec<u32>>> {
        pages(
            limit,
            |x: &u32| *x,
            move |after, limit| async move {
                let from = after.map_or(0, |a| a + 1);
                Ok((from..n).take(limit).collect())
            },
        )
    }

    #[test]
    fn pages_cover_the_listing_once_in_order() {
        for (n, limit) in [(0, 3), (1, 1), (5, 1), (6, 2), (7, 2), (10, 1000)] {
            let got: Vec<Vec<u32>> =
                futures::executor::block_on(numbers(n, limit).try_collect()).unwrap();
            assert!(got.iter().all(|p| !p.is_empty() && p.len() <= limit));
            let flat: Vec<u32> = got.concat();
            assert_eq!(flat, (0..n).collect::<Vec<_>>(), "n={n} limit={limit}");
        }
    }

    #[test]
    fn an_error_ends_the_stream() {
        let mut calls = 0;
        let stream = pages(
            2,
            |x: &u32| *x,
            move |_, _| {
                calls += 1;
                let n = calls;
                async move {
                    if n == 2 {
                        Err(deriva_core::DerivaError::InvalidInput("no".into()))
                    } else {
                        Ok(vec![n, n])
                    }
                }
            },
        );
        let got: Vec<Result<Vec<u32>>> = futures::executor::block_on(stream.collect());
        assert_eq!(got.len(), 2);
        assert!(got[1].is_err());
    }
}
