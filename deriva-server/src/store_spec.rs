//! [`StoreSpec`]: which store a process opens, parsed once from its flags, and the one
//! [`StoreSpec::open`] that opens it, used by the server ([`Server::connect`]) and by
//! `deriva-server migrate` for each of its sides.
//!
//! It lives here rather than in `deriva-store`, which the plan draws it in: it names both
//! backends, and they depend on `deriva-store`, so `deriva-store` cannot name them.
//!
//! [`Server::connect`]: crate::Server::connect

use std::path::PathBuf;
use std::sync::Arc;

use deriva_core::DerivaError;
use deriva_store::Store;
use deriva_store::observe::BackendMetrics;
use deriva_store_local::LocalOptions;
use deriva_store_remote::{PgBus, PgNodes, RemoteConfig};
use opentelemetry::metrics::Meter;

use crate::config::Config;
use deriva_util::redact::redact_url;

/// Which store to open, and how.
#[derive(Debug, Clone)]
pub enum StoreSpec {
    /// The local store in a data directory: recipes in redb, leaf bytes in files.
    Local {
        /// The data directory.
        dir: PathBuf,
        /// How it writes.
        options: LocalOptions,
    },
    /// The remote backend: leaves in an object store, the index in PostgreSQL.
    Remote(RemoteConfig),
}

/// An open store, and what the remote backend shares between the nodes that use it.
#[derive(Debug)]
pub struct OpenedStore {
    /// The store.
    pub store: Store,
    /// The remote backend's channel of invalidations and its table of nodes; `None` on the
    /// local store.
    pub cluster: Option<(PgBus, PgNodes)>,
}

impl StoreSpec {
    /// The store the server's flags name: the remote backend when `--blob-store` and `--index`
    /// are given (an error naming the missing flag if only one is), else the local store in
    /// `--data-dir`. `node_id` (the node's `service.instance.id`) tells its own invalidations
    /// from the other nodes'.
    pub fn from_config(config: &Config, node_id: &str) -> Result<Self, String> {
        Ok(match config.remote()? {
            Some(mut remote) => {
                node_id.clone_into(&mut remote.node_id);
                Self::Remote(remote)
            }
            None => Self::Local {
                dir: config.data_dir.clone(),
                options: LocalOptions {
                    inline_leaf_bytes: config.inline_leaf_bytes,
                },
            },
        })
    }

    /// Names the store, its secrets hidden: `local /var/lib/deriva`,
    /// `remote s3://bucket + postgres://user:***@host/db (schema deriva)`.
    pub fn describe(&self) -> String {
        match self {
            Self::Local { dir, .. } => format!("local {}", dir.display()),
            Self::Remote(remote) => format!(
                "remote {} + {} (schema {})",
                redact_url(&remote.blob_store),
                redact_url(&remote.index),
                remote.schema
            ),
        }
    }

    /// Opens the store: the local one on the blocking pool (it scans its blob directory), the
    /// remote one by connecting to PostgreSQL and migrating its schema (the object store is not
    /// contacted: see [`Store::check`]). The backend's instruments (`deriva_store::observe`)
    /// are built on `meter`. A remote backend that cannot be reached is [`DerivaError::Unavailable`].
    pub async fn open(&self, meter: &Meter) -> Result<OpenedStore, DerivaError> {
        match self {
            Self::Local { dir, options } => {
                let (dir, options) = (dir.clone(), *options);
                let metrics = Arc::new(BackendMetrics::new(meter));
                let store = tokio::task::spawn_blocking(move || {
                    deriva_store_local::open_observed(dir, options, metrics)
                })
                .await
                .map_err(|e| DerivaError::from_join("opening the store", e))??;
                Ok(OpenedStore {
                    store,
                    cluster: None,
                })
            }
            Self::Remote(remote) => {
                let metrics = Arc::new(BackendMetrics::new(meter));
                let opened = deriva_store_remote::open(remote, metrics).await?;
                Ok(OpenedStore {
                    store: opened.store,
                    cluster: Some((opened.bus, opened.nodes)),
                })
            }
        }
    }
}
