//! The storage conformance suite (`deriva_store::conformance`) run against the remote
//! backend: leaves in a real SeaweedFS (S3), the index in a real PostgreSQL, both started by
//! `deriva-testkit/backends.sh` for this test binary. Each case gets its own key prefix and schema.

use deriva_testkit::backends as services;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use deriva_core::{CAddr, Result};
use deriva_store::Store;
use deriva_store::conformance::Harness;
use deriva_store::observe::BackendMetrics;
use deriva_store_remote::RemoteConfig;
use object_store::ObjectStoreExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;

use services::Backends;

static CASE: AtomicU32 = AtomicU32::new(0);

/// One case's place in the shared services: a key prefix and a PostgreSQL schema.
pub(crate) struct RemoteHarness {
    pub(crate) services: Arc<Backends>,
    prefix: String,
    pub(crate) schema: String,
    spool: tempfile::TempDir,
}

impl RemoteHarness {
    pub(crate) fn new() -> Self {
        let n = CASE.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}_{n}", std::process::id());
        Self {
            services: services::shared(),
            prefix: format!("conformance-{tag}"),
            schema: format!("conformance_{tag}"),
            spool: tempfile::tempdir().expect("a spool directory"),
        }
    }

    /// A client of the bucket, to write behind the store's back.
    fn s3(&self) -> object_store::aws::AmazonS3 {
        AmazonS3Builder::new()
            .with_endpoint(self.services.s3_endpoint())
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id(self.services.access_key())
            .with_secret_access_key(self.services.secret_key())
            .with_bucket_name(self.services.bucket())
            .build()
            .expect("an S3 client")
    }

    pub(crate) fn config(&self) -> RemoteConfig {
        RemoteConfig {
            blob_store: format!("s3://{}/{}", self.services.bucket(), self.prefix),
            aws: self.services.aws_env(),
            index: self.services.pg_url(),
            schema: self.schema.clone(),
            pool_size: 8,
            local_cache: None,
            spool_dir: Some(self.spool.path().to_owned()),
            output_tier: false,
            create_schema: true,
            node_id: "conformance".into(),
            compute_lease_ttl: deriva_store_remote::LEASE_TTL,
        }
    }
}

impl RemoteHarness {
    /// The store of this case with the output tier.
    async fn open_with_tier(&self) -> Store {
        let config = RemoteConfig {
            output_tier: true,
            ..self.config()
        };
        deriva_store_remote::open(&config, Arc::new(BackendMetrics::noop()))
            .await
            .expect("the store opens")
            .store
    }
}

#[async_trait]
impl Harness for RemoteHarness {
    async fn open(&self) -> Result<Store> {
        let remote =
            deriva_store_remote::open(&self.config(), Arc::new(BackendMetrics::noop())).await?;
        Ok(remote.store)
    }

    async fn corrupt_blob(&self, addr: CAddr, bytes: &[u8]) {
        let s3 = self.s3();
        let key = Path::from(format!("{}/leaves/{}", self.prefix, addr.to_hex()));
        s3.head(&key).await.expect("the leaf's object exists");
        s3.put(&key, Bytes::copy_from_slice(bytes).into())
            .await
            .expect("overwriting the object");
    }

    async fn corrupt_recipe(&self, addr: CAddr) {
        let (client, conn) =
            tokio_postgres::connect(&self.services.pg_url(), tokio_postgres::NoTls)
                .await
                .expect("connecting to PostgreSQL");
        tokio::spawn(conn);
        let n = client
            .execute(
                &format!(
                    "UPDATE \"{}\".recipes SET encoding = 'not a recipe' WHERE addr = $1",
                    self.schema
                ),
                &[&addr.as_bytes().as_slice()],
            )
            .await
            .expect("damaging the row");
        assert_eq!(n, 1, "one recipe row damaged");
    }
}

deriva_store::conformance_tests!(RemoteHarness::new());

/// The bytes of a stored output, if any.
fn bytes_of(stored: Option<deriva_store::StoredOutput>) -> Option<Bytes> {
    stored.map(|s| s.bytes)
}

/// Only the index says what exists: an object under `leaves/` that PostgreSQL does not record
/// (a put that stopped between its two writes) is not served, and no read of an absent leaf
/// (the executor asks for a leaf at every recipe's address) goes to the object store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_the_index_does_not_record_is_not_served() {
    let harness = RemoteHarness::new();
    let store = harness.open().await.unwrap();
    let recorded = store
        .put_leaf(Bytes::from_static(b"recorded"))
        .await
        .unwrap();
    let orphan_bytes = b"written to the bucket, never recorded";
    let orphan = CAddr::for_leaf(orphan_bytes);
    let s3 = harness.s3();
    let key = Path::from(format!("{}/leaves/{}", harness.prefix, orphan.to_hex()));
    s3.put(&key, Bytes::from_static(orphan_bytes).into())
        .await
        .unwrap();
    let blobs = store.blobs();
    assert_eq!(blobs.get(orphan).await.unwrap(), None);
    assert!(blobs.get_stream(orphan, 1024).await.unwrap().is_none());
    assert!(!blobs.contains(orphan).await.unwrap());
    assert_eq!(
        blobs.get(recorded).await.unwrap().as_deref(),
        Some(&b"recorded"[..])
    );
    // Putting the same bytes records the object (found, verified, kept) and serves it.
    assert_eq!(
        store
            .put_leaf(Bytes::from_static(orphan_bytes))
            .await
            .unwrap(),
        orphan
    );
    assert_eq!(
        blobs.get(orphan).await.unwrap().as_deref(),
        Some(&orphan_bytes[..])
    );
}

/// Writers that wait for the sweep lock hold pooled connections while they wait; the sweep's
/// own statements run on the connection that holds the lock, so a pool of two, with eight
/// writers waiting, never starves a collection (it would fail after the pool's wait,
/// `UNAVAILABLE`, with the writers stalled that long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_never_waits_for_a_pool_its_writers_hold() {
    let harness = RemoteHarness::new();
    let config = deriva_store_remote::RemoteConfig {
        pool_size: 2,
        ..harness.config()
    };
    let store = Arc::new(
        deriva_store_remote::open(&config, Arc::new(BackendMetrics::noop()))
            .await
            .unwrap()
            .store,
    );
    // Garbage for the sweeps: 60 leaves, each under a recipe.
    let recipe = |inputs: Vec<CAddr>| {
        let concat = deriva_core::FunctionId::new("concat", "v1").unwrap();
        deriva_core::Recipe::new(concat, inputs, deriva_core::Params::new()).unwrap()
    };
    for i in 0..60 {
        let leaf = store
            .put_leaf(Bytes::from(format!("garbage {i}")))
            .await
            .unwrap();
        store.put_recipe(recipe(vec![leaf])).await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (store, done) = (store.clone(), done.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !done.load(Ordering::Relaxed) {
                    i += 1;
                    let leaf = store
                        .put_leaf(Bytes::from(format!("writer {w} {i}")))
                        .await
                        .unwrap();
                    match store.put_recipe(recipe(vec![leaf])).await {
                        Ok(_) | Err(deriva_core::DerivaError::MissingInput { .. }) => {}
                        Err(e) => panic!("writer {w}: {e}"),
                    }
                }
            })
        })
        .collect();
    let mut removed = 0;
    for _ in 0..3 {
        // Waiting for a pooled connection would end in UNAVAILABLE after PG_POOL_WAIT.
        let outcome = store
            .collect_garbage(&deriva_store::gc::GcOptions::default())
            .await
            .unwrap();
        removed += outcome.removed.len();
    }
    done.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert!(removed >= 120, "the garbage was collected: {removed}");
}

/// The output tier in a real SeaweedFS: an object copied, with the bucket's own client, from
/// `outputs/<A>` to `outputs/<B>` is the output of A, so reading B is `Corrupted` naming A,
/// never A's bytes; an object in the format before the header named its recipe (the output's
/// hash, then the output) is a miss, and a put replaces it. The index says what is stored: an
/// object without a row in `outputs` is a miss, and a delete removes both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_moved_under_another_recipe_is_refused() {
    let harness = RemoteHarness::new();
    let store = harness.open_with_tier().await;
    let outputs = store.outputs().expect("the output tier").clone();
    let (a, b, c) = (
        CAddr::from([0xa; 32]),
        CAddr::from([0xb; 32]),
        CAddr::from([0xc; 32]),
    );
    outputs
        .put(a, Bytes::from_static(b"A's output"), None)
        .await
        .unwrap();
    outputs
        .put(b, Bytes::from_static(b"B's output"), None)
        .await
        .unwrap();
    assert_eq!(
        bytes_of(outputs.get(b).await.unwrap()).as_deref(),
        Some(&b"B's output"[..])
    );

    let s3 = harness.s3();
    let key = |r: &CAddr| Path::from(format!("{}/outputs/{}", harness.prefix, r.to_hex()));
    let object = s3.get(&key(&a)).await.unwrap().bytes().await.unwrap();
    s3.put(&key(&b), object.into()).await.unwrap();
    match outputs.get(b).await {
        Err(deriva_core::DerivaError::Corrupted { addr, detail }) => {
            assert_eq!(addr, b);
            assert!(
                detail.contains(&a.to_hex()),
                "names the recipe it is of: {detail}"
            );
        }
        other => panic!("a moved object must not be served: {other:?}"),
    }
    // Put again (as the executor does after computing it): B's own output is back.
    outputs
        .put(b, Bytes::from_static(b"B's output"), None)
        .await
        .unwrap();
    assert_eq!(
        bytes_of(outputs.get(b).await.unwrap()).as_deref(),
        Some(&b"B's output"[..])
    );

    let mut legacy = blake3::hash(b"C's old output").as_bytes().to_vec();
    legacy.extend_from_slice(b"C's old output");
    s3.put(&key(&c), Bytes::from(legacy.clone()).into())
        .await
        .unwrap();
    assert!(
        !outputs.contains(c).await.unwrap(),
        "no row, nothing stored"
    );
    assert_eq!(outputs.get(c).await.unwrap(), None, "no row: a miss");
    // With its row (as when the object was replaced since), the old format is a miss too.
    outputs
        .put(c, Bytes::from_static(b"C's output"), None)
        .await
        .unwrap();
    s3.put(&key(&c), Bytes::from(legacy).into()).await.unwrap();
    assert!(outputs.contains(c).await.unwrap(), "a row is there");
    assert_eq!(
        outputs.get(c).await.unwrap(),
        None,
        "in the old format: a miss"
    );
    outputs
        .put(c, Bytes::from_static(b"C's output"), None)
        .await
        .unwrap();
    assert_eq!(
        bytes_of(outputs.get(c).await.unwrap()).as_deref(),
        Some(&b"C's output"[..])
    );
    // A delete removes the row and the object.
    outputs.delete(c).await.unwrap();
    assert!(!outputs.contains(c).await.unwrap());
    assert!(s3.head(&key(&c)).await.is_err(), "the object is gone too");
}

/// A record of `output` as the output of `recipe`.
fn record_of(recipe: CAddr, output: &[u8]) -> deriva_core::provenance::SignedRecord {
    deriva_core::provenance::SignedRecord {
        record: deriva_core::provenance::Record {
            recipe,
            function: deriva_core::FunctionId::new("concat", "1").unwrap(),
            inputs: vec![CAddr::for_leaf(b"in")],
            output_hash: CAddr::for_leaf(output),
            output_bytes: output.len() as u64,
            node: "node-a".into(),
            started_at_micros: 1_765_000_000_000_000,
            duration_micros: 42,
            span: None,
        },
        signature: Some([1; 64]),
    }
}

/// With the output tier, the record travels on the object and in its row: a put stores both
/// (audits reset), a get gives the record back with the bytes, an object of version 1 is the
/// bytes with no record. A record put without an object (`stored = false`) is not an output
/// of the tier, though its size is recorded; deleting records removes such a row and clears
/// the record of a stored one, whose output stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_output_tier_keeps_the_record_with_the_output() {
    use deriva_core::provenance::{AuditResult, Audits, Provenance};
    let harness = RemoteHarness::new();
    let store = harness.open_with_tier().await;
    let outputs = store.outputs().expect("the output tier").clone();
    let records = store.records().expect("records").clone();
    let sizes = store.sizes().expect("sizes").clone();
    let (a, b, c) = (
        CAddr::from([0xa; 32]),
        CAddr::from([0xb; 32]),
        CAddr::from([0xc; 32]),
    );
    let output = Bytes::from_static(b"A's output");
    let record = record_of(a, &output);
    outputs.put(a, output.clone(), Some(&record)).await.unwrap();
    assert_eq!(
        outputs.get(a).await.unwrap(),
        Some(deriva_store::StoredOutput {
            bytes: output.clone(),
            record: Some(record.clone()),
        })
    );
    assert_eq!(
        records.get(a).await.unwrap(),
        Some(Provenance::new(record.clone()))
    );
    let hash = CAddr::for_leaf(&output);
    assert_eq!(
        records.audit(a, hash, AuditResult::Match).await.unwrap(),
        Some(Audits {
            matches: 1,
            ..Audits::default()
        })
    );
    // Put again: the audits start again.
    outputs.put(a, output.clone(), Some(&record)).await.unwrap();
    assert_eq!(
        records.get(a).await.unwrap(),
        Some(Provenance::new(record.clone()))
    );
    // A record that does not describe the output is refused, and nothing changes.
    let err = outputs
        .put(a, Bytes::from_static(b"other bytes"), Some(&record))
        .await
        .unwrap_err();
    assert!(
        matches!(err, deriva_core::DerivaError::InvalidInput(_)),
        "{err}"
    );
    assert_eq!(
        bytes_of(outputs.get(a).await.unwrap()).as_deref(),
        Some(&output[..])
    );

    // A record without an object.
    let b_record = record_of(b, b"B's output, never in the tier");
    records.put(&b_record).await.unwrap();
    assert!(!outputs.contains(b).await.unwrap(), "a record is no output");
    assert_eq!(outputs.get(b).await.unwrap(), None);
    assert_eq!(
        sizes.recorded(b).await.unwrap(),
        Some(b_record.record.output_bytes)
    );
    assert!(
        !outputs.contains(b).await.unwrap(),
        "after the kept answer too"
    );
    assert_eq!(
        records.get(b).await.unwrap(),
        Some(Provenance::new(b_record))
    );

    // An object of version 1, under its row: the bytes, no record.
    outputs
        .put(c, Bytes::from_static(b"C's output"), None)
        .await
        .unwrap();
    let mut v1 = b"DRVO\x01".to_vec();
    v1.extend_from_slice(c.as_bytes());
    v1.extend_from_slice(blake3::hash(b"C's output").as_bytes());
    v1.extend_from_slice(b"C's output");
    let key = Path::from(format!("{}/outputs/{}", harness.prefix, c.to_hex()));
    harness
        .s3()
        .put(&key, Bytes::from(v1).into())
        .await
        .unwrap();
    assert_eq!(
        outputs.get(c).await.unwrap(),
        Some(deriva_store::StoredOutput {
            bytes: Bytes::from_static(b"C's output"),
            record: None,
        })
    );
    assert_eq!(records.get(c).await.unwrap(), None);

    records.delete(&[a, b, c]).await.unwrap();
    assert_eq!(records.get(a).await.unwrap(), None);
    assert_eq!(records.get(b).await.unwrap(), None);
    assert_eq!(sizes.recorded(b).await.unwrap(), None, "b's row is gone");
    assert!(outputs.contains(a).await.unwrap(), "a's output stays");
    assert_eq!(
        bytes_of(outputs.get(a).await.unwrap()).as_deref(),
        Some(&output[..])
    );
}

/// Migration 7 on a schema of version 6 (written before records): every `outputs` row there
/// names an object of the tier, so it stays a stored output, with no record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_7_keeps_the_outputs_of_an_older_schema_stored() {
    let harness = RemoteHarness::new();
    let store = harness.open_with_tier().await;
    let a = CAddr::from([0xa; 32]);
    let output = Bytes::from_static(b"A's output, from before records");
    store
        .outputs()
        .unwrap()
        .put(a, output.clone(), None)
        .await
        .unwrap();
    let released = store.released();
    drop(store);
    released.wait().await;

    // Back to version 6.
    let (client, conn) = tokio_postgres::connect(&harness.services.pg_url(), tokio_postgres::NoTls)
        .await
        .expect("connecting to PostgreSQL");
    tokio::spawn(conn);
    let s = &harness.schema;
    client
        .batch_execute(&format!(
            "ALTER TABLE \"{s}\".outputs DROP COLUMN record, DROP COLUMN audit_match,
                 DROP COLUMN audit_mismatch, DROP COLUMN audit_error, DROP COLUMN stored;
             DELETE FROM \"{s}\".schema_version WHERE version = 7;"
        ))
        .await
        .expect("the schema as version 6 left it");

    let store = harness.open_with_tier().await;
    let version: i32 = client
        .query_one(
            &format!("SELECT max(version) FROM \"{s}\".schema_version"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 7);
    let outputs = store.outputs().unwrap();
    assert!(outputs.contains(a).await.unwrap(), "still a stored output");
    assert_eq!(
        bytes_of(outputs.get(a).await.unwrap()).as_deref(),
        Some(&output[..])
    );
    assert_eq!(store.records().unwrap().get(a).await.unwrap(), None);
}
