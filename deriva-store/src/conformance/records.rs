//! The materialization records ([`crate::Records`]) and the time a leaf was stored
//! ([`crate::BlobStore::stat`]).

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use deriva_core::provenance::{AuditResult, Audits, Provenance, Record, SignedRecord, SpanRef};
use deriva_core::{CAddr, FunctionId};
use futures::TryStreamExt as _;

use super::{Harness, close, recipe};
use crate::gc::GcOptions;

/// A record of the output `output` of `recipe`, computed on `node`.
fn record(recipe: CAddr, output: &[u8], node: &str, signed: bool) -> SignedRecord {
    SignedRecord {
        record: Record {
            recipe,
            function: FunctionId::new("concat", "1").expect("valid function id"),
            inputs: vec![CAddr::for_leaf(b"an input")],
            output_hash: CAddr::for_leaf(output),
            output_bytes: output.len() as u64,
            node: node.to_owned(),
            started_at_micros: 1_765_000_000_000_000,
            duration_micros: 3_100_000,
            span: Some(SpanRef {
                trace_id: [0x11; 16],
                span_id: [0x22; 8],
            }),
        },
        signature: signed.then_some([0x33; 64]),
    }
}

fn audits(matches: u64, mismatches: u64, errors: u64) -> Audits {
    Audits {
        matches,
        mismatches,
        errors,
    }
}

/// A put keeps a record (signed or not) that a get gives back unaudited, and survives a
/// reopen with its audits; a put replaces the record and zeroes its audits; an audit of the
/// recorded output counts and answers the tallies, one of another output (a stale record)
/// answers `None` and counts nothing; a delete takes a batch, absent ones included; a record
/// goes with its recipe (a delete, and garbage collection's sweep) and stays with a live one.
pub async fn records(h: &impl Harness) {
    let store = h.open().await.expect("open");
    let records = store.records().expect("the store keeps records").clone();
    let leaf = store
        .put_leaf(Bytes::from_static(b"an input"))
        .await
        .unwrap();
    let r = store.put_recipe(recipe(vec![leaf], "r")).await.unwrap();
    let absent = CAddr::from_bytes([0xee; 32]);
    assert_eq!(records.get(r).await.unwrap(), None);

    let first = record(r, b"first output", "node-a", false);
    records.put(&first).await.unwrap();
    assert_eq!(
        records.get(r).await.unwrap(),
        Some(Provenance::new(first.clone()))
    );
    let hash = CAddr::for_leaf(b"first output");
    for (result, after) in [
        (AuditResult::Match, audits(1, 0, 0)),
        (AuditResult::Match, audits(2, 0, 0)),
        (AuditResult::Mismatch, audits(2, 1, 0)),
        (AuditResult::Error, audits(2, 1, 1)),
    ] {
        assert_eq!(
            records.audit(r, hash, result).await.unwrap(),
            Some(after),
            "{result:?}"
        );
    }
    let stale = CAddr::for_leaf(b"an output replaced since");
    assert_eq!(
        records.audit(r, stale, AuditResult::Match).await.unwrap(),
        None,
        "an audit of another output counts nothing"
    );
    assert_eq!(
        records
            .audit(absent, hash, AuditResult::Match)
            .await
            .unwrap(),
        None,
        "no record, nothing counted"
    );
    assert_eq!(
        records.get(r).await.unwrap(),
        Some(Provenance {
            signed: first.clone(),
            audits: audits(2, 1, 1)
        })
    );

    // A new compute replaces the record, and its audits start again.
    let second = record(r, b"second output", "node-b", true);
    records.put(&second).await.unwrap();
    assert_eq!(
        records.get(r).await.unwrap(),
        Some(Provenance::new(second.clone()))
    );
    assert_eq!(
        records.audit(r, hash, AuditResult::Match).await.unwrap(),
        None,
        "the first output's audit, now stale"
    );
    let hash = CAddr::for_leaf(b"second output");
    assert_eq!(
        records.audit(r, hash, AuditResult::Mismatch).await.unwrap(),
        Some(audits(0, 1, 0))
    );
    // Another recipe's record, for the batch delete.
    let other = store.put_recipe(recipe(vec![leaf], "other")).await.unwrap();
    records
        .put(&record(other, b"other output", "node-a", false))
        .await
        .unwrap();
    // The listing, a page of one at a time: both, in address order, with their audits.
    let listed: Vec<Vec<Provenance>> = records.list_pages(1).try_collect().await.unwrap();
    assert!(listed.iter().all(|page| page.len() == 1), "{listed:?}");
    let listed: Vec<Provenance> = listed.into_iter().flatten().collect();
    let mut expected = vec![
        records.get(r).await.unwrap().unwrap(),
        records.get(other).await.unwrap().unwrap(),
    ];
    expected.sort_by_key(|p| p.record().recipe);
    assert_eq!(listed, expected);
    assert_eq!(
        records
            .list_page(Some(expected[0].record().recipe), 10)
            .await
            .unwrap(),
        expected[1..]
    );
    drop(records);
    close(store).await;

    let store = h.open().await.expect("reopen");
    let records = store.records().expect("the store keeps records").clone();
    assert_eq!(
        records.get(r).await.unwrap(),
        Some(Provenance {
            signed: second.clone(),
            audits: audits(0, 1, 0)
        }),
        "the record and its audits after a reopen"
    );
    records.delete(&[]).await.unwrap();
    records.delete(&[absent, r, other]).await.unwrap();
    assert_eq!(records.get(r).await.unwrap(), None);
    assert_eq!(records.get(other).await.unwrap(), None);
    assert_eq!(
        records.audit(r, hash, AuditResult::Match).await.unwrap(),
        None
    );
    records.delete(&[r]).await.unwrap();
    // The recipes stay: only their records went.
    assert!(store.get_recipe(r).await.unwrap().is_some());

    // A recipe deleted takes its record with it.
    records
        .put(&record(other, b"other output", "node-a", false))
        .await
        .unwrap();
    assert!(store.recipes().delete(other).await.unwrap());
    assert_eq!(records.get(other).await.unwrap(), None);

    // Garbage collection: the swept recipe's record goes, the pinned one's stays.
    let kept = store.put_recipe(recipe(vec![leaf], "kept")).await.unwrap();
    assert!(store.pin(kept).await.unwrap());
    let kept_record = record(kept, b"kept output", "node-a", false);
    records.put(&kept_record).await.unwrap();
    records
        .put(&record(r, b"r's output", "node-a", false))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let outcome = store.collect_garbage(&GcOptions::default()).await.unwrap();
    assert!(
        outcome.removed.iter().any(|removed| removed.addr == r),
        "{outcome:?}"
    );
    assert!(store.get_recipe(r).await.unwrap().is_none());
    assert_eq!(records.get(r).await.unwrap(), None, "swept with its recipe");
    assert_eq!(
        records.get(kept).await.unwrap(),
        Some(Provenance::new(kept_record))
    );
    drop(records);
    close(store).await;
}

/// How far a stored time may lie outside the test's window: the clocks that stamp them (a
/// file system's coarse clock, times kept to the millisecond) lag the precise one a little.
const CLOCK_SLACK: Duration = Duration::from_secs(1);

/// [`crate::BlobStore::stat`]: the size, and when the leaf was stored (garbage collection's
/// clock), within the test's window, for a small leaf and a large one (a row and a file in
/// the local store); nothing for an absent leaf.
pub async fn leaf_stat(h: &impl Harness) {
    let store = h.open().await.expect("open");
    let blobs = store.blobs().clone();
    let before = SystemTime::now();
    let small = blobs
        .put(Bytes::from_static(b"a small leaf"))
        .await
        .unwrap();
    let large = blobs.put(Bytes::from(vec![3u8; 100_000])).await.unwrap();
    let after = SystemTime::now();
    for (addr, size) in [(small, 12), (large, 100_000)] {
        let stat = blobs.stat(addr).await.unwrap().expect("the leaf is stored");
        assert_eq!(stat.size, size);
        let at = stat.stored_at.expect("the backend keeps the time of a put");
        assert!(
            at + CLOCK_SLACK >= before && at <= after + CLOCK_SLACK,
            "stored at {at:?}, outside {before:?}..{after:?}"
        );
    }
    assert_eq!(
        blobs.stat(CAddr::for_leaf(b"never stored")).await.unwrap(),
        None
    );
    drop(blobs);
    close(store).await;
}
