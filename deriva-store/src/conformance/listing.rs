//! The keyset-paginated listings (`list_page`, walked by [`crate::pages`]) and the batched
//! put of leaves (`put_many`).

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;
use futures::TryStreamExt as _;

use super::{Harness, close, recipe};
use crate::{BlobStore, RecipeIndex, Store};
use deriva_core::CAddr;

/// Bytes whose leaf address starts with `first`, so that a listing has keys at its edges.
fn leaf_starting_with(first: u8) -> Bytes {
    (0u32..)
        .map(|i| Bytes::from(format!("edge {first} {i}")))
        .find(|b| CAddr::for_leaf(b).as_bytes()[0] == first)
        .expect("some bytes hash to every first byte")
}

async fn blob_pages(blobs: &dyn BlobStore, limit: usize) -> Vec<Vec<(CAddr, u64)>> {
    blobs.list_pages(limit).try_collect().await.unwrap()
}

async fn recipe_pages(recipes: &dyn RecipeIndex, limit: usize) -> Vec<Vec<(CAddr, u32)>> {
    recipes.list_pages(limit).try_collect().await.unwrap()
}

/// Pages of 1, 2 and many cover the listing once, in order, none longer than asked, with the
/// leaves' sizes and the recipes' depths; a listing after the last key (or after the greatest
/// key there is) is empty; a batch put stores each leaf once and answers in order.
pub async fn listing_pages(h: &impl Harness) {
    let store = h.open().await.expect("open");
    let blobs = store.blobs().clone();
    // Rows and, on the local backend, a file (above its 64 KiB threshold); keys at both edges.
    let mut data = vec![
        leaf_starting_with(0x00),
        leaf_starting_with(0xff),
        Bytes::from(vec![7u8; 70 << 10]),
    ];
    data.extend((0..6).map(|i| Bytes::from(format!("leaf {i}"))));
    let first = blobs.put(data[0].clone()).await.unwrap();
    // The batch repeats a leaf it holds and one already stored.
    let mut batch = data[1..].to_vec();
    batch.push(data[1].clone());
    batch.push(data[0].clone());
    let put = blobs.put_many(batch.clone()).await.unwrap();
    let expected_addrs: Vec<CAddr> = batch.iter().map(|b| CAddr::for_leaf(b)).collect();
    assert_eq!(
        put, expected_addrs,
        "put_many answers each leaf's address, in order"
    );
    assert_eq!(
        store.counters().blobs(),
        data.len() as u64,
        "each leaf counted once"
    );
    let bytes: u64 = data.iter().map(|d| d.len() as u64).sum();
    assert_eq!(store.counters().blob_bytes(), bytes);
    for d in &data {
        assert_eq!(
            blobs.get(CAddr::for_leaf(d)).await.unwrap().as_ref(),
            Some(d)
        );
    }
    let mut expected: Vec<(CAddr, u64)> = data
        .iter()
        .map(|d| (CAddr::for_leaf(d), d.len() as u64))
        .collect();
    expected.sort();
    assert_eq!(expected[0].0, first);
    for limit in [1, 2, 4, 1000] {
        let pages = blob_pages(blobs.as_ref(), limit).await;
        assert!(
            pages.iter().all(|p| !p.is_empty() && p.len() <= limit),
            "pages of at most {limit}: {pages:?}"
        );
        assert_eq!(
            pages.concat(),
            expected,
            "pages of {limit}: every leaf once, in order"
        );
    }
    let last = expected.last().unwrap().0;
    assert!(blobs.list_page(Some(last), 10).await.unwrap().is_empty());
    assert!(
        blobs
            .list_page(Some(CAddr::from_bytes([0xff; 32])), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        blobs
            .list_page(Some(CAddr::from_bytes([0; 32])), 1000)
            .await
            .unwrap(),
        expected
    );
    assert_eq!(
        blobs.list_page(Some(expected[3].0), 2).await.unwrap(),
        expected[4..6]
    );

    // Recipes by depth, then address: each after its inputs.
    let leaves: Vec<CAddr> = expected.iter().map(|(a, _)| *a).collect();
    let mut by_depth: BTreeMap<(u32, CAddr), ()> = BTreeMap::new();
    let mut below = Vec::new();
    for depth in 1..=4u32 {
        let mut level = Vec::new();
        for i in 0..3 {
            let inputs = match below.last() {
                Some(&input) => vec![input, leaves[i]],
                None => vec![leaves[i], leaves[i + 1]],
            };
            let r = store
                .put_recipe(recipe(inputs, &format!("d{depth} {i}")))
                .await
                .unwrap();
            by_depth.insert((depth, r), ());
            level.push(r);
        }
        below = level;
    }
    let expected: Vec<(CAddr, u32)> = by_depth.keys().map(|(d, a)| (*a, *d)).collect();
    for limit in [1, 2, 5, 1000] {
        let pages = recipe_pages(store.recipes().as_ref(), limit).await;
        assert!(pages.iter().all(|p| !p.is_empty() && p.len() <= limit));
        assert_eq!(
            pages.concat(),
            expected,
            "pages of {limit}: by depth, then address"
        );
    }
    let (last, depth) = *expected.last().unwrap();
    assert!(
        store
            .recipes()
            .list_page(Some((depth, last)), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .recipes()
            .list_page(Some((u32::MAX, CAddr::from_bytes([0xff; 32]))), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let (addr, depth) = expected[2];
    assert_eq!(
        store
            .recipes()
            .list_page(Some((depth, addr)), 4)
            .await
            .unwrap(),
        expected[3..7]
    );
    // A recipe deleted leaves the listing.
    let (gone, _) = *expected.last().unwrap();
    assert!(store.recipes().delete(gone).await.unwrap());
    assert_eq!(
        store.recipes().list().await.unwrap(),
        expected[..expected.len() - 1]
    );

    drop(blobs);
    close(store).await;
    // And after a reopen, the same.
    let store = h.open().await.expect("reopen");
    assert_eq!(
        recipe_pages(store.recipes().as_ref(), 3).await.concat(),
        expected[..expected.len() - 1]
    );
    close(store).await;
}

/// A listing while puts happen: every leaf that existed throughout is seen exactly once, and
/// nothing twice.
pub async fn listing_while_putting(h: &impl Harness) {
    let store: Store = h.open().await.expect("open");
    let blobs = store.blobs().clone();
    let before: Vec<Bytes> = (0..40)
        .map(|i| Bytes::from(format!("before {i}")))
        .collect();
    let old: HashSet<CAddr> = blobs.put_many(before).await.unwrap().into_iter().collect();
    let mut pages = blobs.list_pages(3);
    let mut seen = Vec::new();
    let mut n = 0;
    while let Some(page) = pages.try_next().await.unwrap() {
        seen.extend(page.into_iter().map(|(a, _)| a));
        // Between pages, new leaves: some sort before the cursor, some after.
        for _ in 0..2 {
            blobs.put(Bytes::from(format!("during {n}"))).await.unwrap();
            n += 1;
        }
    }
    drop(pages);
    let distinct: HashSet<CAddr> = seen.iter().copied().collect();
    assert_eq!(distinct.len(), seen.len(), "no leaf listed twice");
    assert!(
        old.is_subset(&distinct),
        "every leaf there throughout was listed"
    );
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "in address order");
    drop(blobs);
    close(store).await;
}
