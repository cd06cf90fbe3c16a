//! The storage conformance suite (`deriva_core::store::conformance`) run against the remote
//! backend: leaves in a real SeaweedFS (S3), the index in a real PostgreSQL, both started by
//! `scripts/backends.sh` for this test binary. Each case gets its own key prefix and schema.

mod services;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use deriva_core::store::conformance::Harness;
use deriva_core::{CAddr, Result, Store};
use deriva_remote::{BackendMetrics, RemoteConfig};
use object_store::ObjectStoreExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;

use services::Backends;

static CASE: AtomicU32 = AtomicU32::new(0);

/// One case's place in the shared services: a key prefix and a PostgreSQL schema.
struct RemoteHarness {
    services: Arc<Backends>,
    prefix: String,
    schema: String,
}

impl RemoteHarness {
    fn new() -> Self {
        let n = CASE.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}_{n}", std::process::id());
        Self {
            services: services::shared(),
            prefix: format!("conformance-{tag}"),
            schema: format!("conformance_{tag}"),
        }
    }

    fn config(&self) -> RemoteConfig {
        RemoteConfig {
            blob_store: format!("s3://{}/{}", self.services.bucket(), self.prefix),
            aws: self.services.aws_env(),
            index: self.services.pg_url(),
            schema: self.schema.clone(),
            pool_size: 8,
            local_cache: None,
            output_tier: false,
            node_id: "conformance".into(),
        }
    }
}

#[async_trait]
impl Harness for RemoteHarness {
    async fn open(&self) -> Result<Store> {
        let remote = deriva_remote::open(&self.config(), Arc::new(BackendMetrics::noop())).await?;
        Ok(remote.store)
    }

    async fn corrupt_blob(&self, addr: CAddr, bytes: &[u8]) {
        let s3 = AmazonS3Builder::new()
            .with_endpoint(self.services.s3_endpoint())
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id(self.services.access_key())
            .with_secret_access_key(self.services.secret_key())
            .with_bucket_name(self.services.bucket())
            .build()
            .expect("an S3 client");
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

deriva_core::conformance_tests!(RemoteHarness::new());
