//! [`StoreLocation`]: where the source or the destination keeps its store, from the flags, and
//! how it is opened.

use super::MigrateError;
use crate::store_spec::StoreSpec;
use deriva_store::Store;
use deriva_store_local::LocalOptions;
use deriva_util::redact::redact_url;
use opentelemetry::metrics::{MeterProvider as _, NoopMeterProvider};
use std::path::PathBuf;
use tonic::Code;

/// Where one side of a migration (the source or the destination) keeps its store: a local
/// directory, or a remote object store and index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum StoreLocation {
    Local(PathBuf),
    Remote {
        blob_store: String,
        index: String,
        schema: String,
    },
}

impl StoreLocation {
    pub(super) fn from_flags(
        flags: (&str, &str, &str),
        dir: Option<PathBuf>,
        blob_store: Option<String>,
        index: Option<String>,
        schema: String,
    ) -> Result<Self, MigrateError> {
        let (dir_flag, blob_flag, index_flag) = flags;
        let blob_store = blob_store.filter(|s| !s.is_empty());
        let index = index.filter(|s| !s.is_empty());
        match (blob_store, index) {
            (Some(blob_store), Some(index)) => Ok(Self::Remote {
                blob_store,
                index,
                schema,
            }),
            (Some(_), None) => Err(MigrateError::usage(format!(
                "{blob_flag} needs {index_flag} too"
            ))),
            (None, Some(_)) => Err(MigrateError::usage(format!(
                "{index_flag} needs {blob_flag} too"
            ))),
            (None, None) => dir.map(Self::Local).ok_or_else(|| {
                MigrateError::usage(format!(
                    "no destination: give {dir_flag}, or {blob_flag} and {index_flag}"
                ))
            }),
        }
    }

    pub(super) fn describe(&self) -> String {
        match self {
            Self::Local(dir) => format!("local {}", dir.display()),
            Self::Remote {
                blob_store,
                index,
                schema,
            } => format!(
                "remote {} + {} (schema {schema})",
                redact_url(blob_store),
                redact_url(index)
            ),
        }
    }

    /// The store this side is, as the `role` (`source`, `destination`) of a migration: a
    /// remote one with no local cache nor upload spool (a migration puts leaves by their
    /// addresses), with the output tier if `outputs`; a remote source's schema is never
    /// created (a mistyped one must not be created, empty).
    fn spec(&self, role: &str, outputs: bool) -> StoreSpec {
        match self {
            Self::Local(dir) => StoreSpec::Local {
                dir: dir.clone(),
                options: LocalOptions::default(),
            },
            Self::Remote {
                blob_store,
                index,
                schema,
            } => StoreSpec::Remote(deriva_store_remote::RemoteConfig {
                blob_store: blob_store.clone(),
                aws: deriva_store_remote::aws_env(),
                index: index.clone(),
                schema: schema.clone(),
                pool_size: 16,
                local_cache: None,
                spool_dir: None,
                output_tier: outputs,
                create_schema: role != "source",
                node_id: format!("migrate-{}", std::process::id()),
                compute_lease_ttl: deriva_store_remote::LEASE_TTL,
            }),
        }
    }

    /// Opens this side. A local source must exist already (opening creates a store); a remote
    /// side must answer (its object store too).
    pub(super) async fn open(&self, role: &str, outputs: bool) -> Result<Store, MigrateError> {
        let what = format!("opening the {role}, {}", self.describe());
        if let Self::Local(dir) = self
            && role == "source"
            && !dir.join("deriva.redb").is_file()
        {
            return Err(MigrateError {
                code: Code::NotFound,
                message: format!(
                    "the source {} holds no Deriva store (no deriva.redb)",
                    dir.display()
                ),
            });
        }
        let meter = NoopMeterProvider::new().meter("deriva-server-migrate");
        let opened = self
            .spec(role, outputs)
            .open(&meter)
            .await
            .map_err(|e| MigrateError::store(&what, &e))?;
        if opened.cluster.is_some() {
            opened
                .store
                .check()
                .await
                .map_err(|e| MigrateError::store(&what, &e))?;
        }
        Ok(opened.store)
    }
}
