//! What the tests on the remote backend share: the real services ([`services`], from
//! `deriva-store-remote`'s tests), a place of each test's own in them ([`Space`]), a node on them
//! ([`node`]), and waiting for a condition ([`wait_for`]).

#![allow(dead_code)]

#[path = "../../../deriva-store-remote/tests/it/services/mod.rs"]
pub mod services;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use services::Backends;

use crate::common::{DEADLINE, ServerProcess};

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A place of its own in the shared services for one test: a key prefix and a schema.
pub struct Space {
    /// The key prefix in the bucket.
    pub prefix: String,
    /// The PostgreSQL schema.
    pub schema: String,
}

impl Space {
    /// A new place, named after `test`.
    pub fn new(test: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{test}_{}_{n}", std::process::id());
        Self {
            prefix: format!("cluster-{tag}"),
            schema: format!("t_{tag}"),
        }
    }
}

/// A node on `services`, in `space`, with `extra` flags.
pub fn node(services: &Backends, space: &Space, extra: &[&str]) -> ServerProcess {
    let mut options = ServerProcess::options()
        .args([
            "--blob-store".to_owned(),
            format!("s3://{}/{}", services.bucket(), space.prefix),
            "--index".to_owned(),
            services.pg_url(),
            "--index-schema".to_owned(),
            space.schema.clone(),
        ])
        .args(extra.iter().copied());
    for (key, value) in services.aws_env() {
        options = options.env(key, value);
    }
    options.start()
}

/// Waits until `done` holds, asking again every 20 ms, for at most [`DEADLINE`].
pub async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
