//! The object store: leaf bytes at `<prefix>leaves/<hex>` (and computed outputs at
//! `<prefix>outputs/<hex>`) in an S3-compatible bucket, through the `object_store` crate.
//!
//! Writes are conditional creates (`If-None-Match: *`): an address always names the same
//! bytes, so "already there" is success. Every call is bounded: see [`RETRY`] and
//! [`CONNECT_TIMEOUT`] / [`REQUEST_TIMEOUT`]. A call that still fails is
//! [`DerivaError::Unavailable`], naming the bucket.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deriva_core::error::Result;
use deriva_core::{CAddr, DerivaError};
use deriva_store::ByteStream;
use deriva_util::redact::redact_url;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::{
    BackoffConfig, Certificate, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig, WriteMultipart,
};

use deriva_store::observe::{BackendMetrics, Call, Target};

/// Retries of one object-store request: at most 2 more tries, 50 ms then 100 ms apart (with
/// jitter), and never past 5 s from the first try. The crate's default (10 tries over up to
/// 3 minutes) would hold every request of a server for minutes while the store is down.
pub const RETRY: RetryConfig = RetryConfig {
    backoff: BackoffConfig {
        init_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_secs(1),
        base: 2.0,
    },
    max_retries: 2,
    retry_timeout: Duration::from_secs(5),
};
/// Time allowed to open a connection to the object store.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for one whole request, body included. Large leaves go in parts of
/// [`PART_BYTES`], so one part must fit in it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Leaves larger than this are uploaded in parts (multipart upload).
pub const MULTIPART_THRESHOLD: usize = 16 * 1024 * 1024;
/// Size of one part of a multipart upload.
pub const PART_BYTES: usize = 8 * 1024 * 1024;

const PUT: Call = Call::Object {
    op: "put",
    method: "PutObject",
};
const PUT_MULTIPART: Call = Call::Object {
    op: "put_multipart",
    method: "CompleteMultipartUpload",
};
const GET: Call = Call::Object {
    op: "get",
    method: "GetObject",
};
const HEAD: Call = Call::Object {
    op: "head",
    method: "HeadObject",
};
const DELETE: Call = Call::Object {
    op: "delete",
    method: "DeleteObject",
};
const LIST: Call = Call::Object {
    op: "list",
    method: "ListObjectsV2",
};

/// Whether a write created the object or found it there already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    Created,
    Existed,
}

/// One bucket (and prefix) of an S3-compatible object store.
#[derive(Debug)]
pub(crate) struct Objects {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    prefix: String,
    /// `the object store s3://bucket/prefix`, for errors.
    name: String,
    metrics: Arc<BackendMetrics>,
}

/// Splits `s3://BUCKET[/PREFIX]` into the bucket and the key prefix (empty, or ending in `/`).
pub(crate) fn parse_url(url: &str) -> Result<(String, String)> {
    let bad = |why: &str| {
        DerivaError::InvalidInput(format!(
            "--blob-store {:?}: {why} (expected s3://BUCKET or s3://BUCKET/PREFIX)",
            redact_url(url)
        ))
    };
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| bad("only s3:// object stores are supported"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(bad("the bucket name is empty"));
    }
    if bucket.contains(['@', ':']) {
        return Err(bad(
            "credentials do not belong in the URL: give them as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        ));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.split('/').any(|part| part == "." || part == "..") {
        return Err(bad("the prefix may not contain . or .. segments"));
    }
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    Ok((bucket.to_owned(), prefix))
}

/// The certificates of the PEM file `AWS_CA_BUNDLE` names, at least one.
fn ca_bundle(path: &str) -> Result<Vec<Certificate>> {
    let invalid = |why: String| DerivaError::InvalidInput(format!("AWS_CA_BUNDLE={path}: {why}"));
    let pem = std::fs::read(path).map_err(|e| invalid(e.to_string()))?;
    let certs = Certificate::from_pem_bundle(&pem).map_err(|e| invalid(e.to_string()))?;
    if certs.is_empty() {
        return Err(invalid("no PEM certificate in it".to_owned()));
    }
    Ok(certs)
}

impl Objects {
    /// Connects (lazily: no request is made) to the bucket named by `url`, with the endpoint,
    /// region and credentials of `aws`: the standard `AWS_*` variables, as (name, value).
    pub(crate) fn open(
        url: &str,
        aws: &[(String, String)],
        metrics: Arc<BackendMetrics>,
    ) -> Result<Self> {
        let (bucket, prefix) = parse_url(url)?;
        // object_store's reqwest has no crypto provider of its own: it takes the process's.
        deriva_util::crypto::use_ring();
        let mut builder = AmazonS3Builder::new();
        let mut endpoint = String::new();
        let mut options = ClientOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT);
        for (name, value) in aws {
            // The AWS tools' variable for the CAs of an endpoint that a private CA signed:
            // trusted beside the machine's own.
            if name == "AWS_CA_BUNDLE" && !value.is_empty() {
                for cert in ca_bundle(value)? {
                    options = options.with_root_certificate(cert);
                }
                continue;
            }
            let Ok(key) = name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() else {
                continue;
            };
            if matches!(
                key,
                AmazonS3ConfigKey::Endpoint | AmazonS3ConfigKey::S3Endpoint
            ) {
                endpoint.clone_from(value);
            }
            builder = builder.with_config(key, value);
        }
        let mut builder = builder
            .with_bucket_name(&bucket)
            .with_retry(RETRY)
            .with_client_options(options);
        // An endpoint written as http:// is a deliberate choice (a local SeaweedFS or MinIO):
        // allow it without also asking for AWS_ALLOW_HTTP.
        if endpoint.starts_with("http://") {
            builder = builder.with_allow_http(true);
        }
        let store = builder.build().map_err(|e| {
            DerivaError::InvalidInput(format!("--blob-store {}: {e}", redact_url(url)))
        })?;
        Ok(Self {
            store: Arc::new(store),
            name: format!(
                "the object store {}",
                redact_url(&format!("s3://{bucket}/{prefix}"))
            ),
            bucket,
            prefix,
            metrics,
        })
    }

    /// What a call on `key` works on, for its span.
    fn target<'a>(&'a self, key: &'a Path) -> Target<'a> {
        Target::Object {
            bucket: &self.bucket,
            key: key.as_ref(),
        }
    }

    /// Names the store in messages: `the object store s3://bucket/prefix/`.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The key of the leaf at `addr`.
    pub(crate) fn leaf_key(&self, addr: &CAddr) -> Path {
        Path::from(format!("{}leaves/{}", self.prefix, addr.to_hex()))
    }

    /// The key of the computed output of the recipe at `addr`.
    pub(crate) fn output_key(&self, addr: &CAddr) -> Path {
        Path::from(format!("{}outputs/{}", self.prefix, addr.to_hex()))
    }

    fn unavailable(&self, what: &str, key: &Path, err: object_store::Error) -> DerivaError {
        DerivaError::Unavailable {
            backend: self.name.clone(),
            message: format!("{what} {key}: {}", crate::with_causes(&err)),
        }
    }

    /// Writes `data` at `key` unless an object is there already. Large data goes in parts.
    pub(crate) async fn create(&self, key: &Path, data: Bytes) -> Result<Written> {
        if data.len() > MULTIPART_THRESHOLD {
            return self.create_multipart(key, data).await;
        }
        self.metrics
            .call(PUT, self.target(key), async {
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..PutOptions::default()
                };
                match self.store.put_opts(key, PutPayload::from(data), opts).await {
                    Ok(_) => Ok(Written::Created),
                    Err(object_store::Error::AlreadyExists { .. }) => Ok(Written::Existed),
                    Err(e) => Err(self.unavailable("writing", key, e)),
                }
            })
            .await
    }

    /// Replaces whatever is at `key` with `data` (to repair a damaged object).
    pub(crate) async fn overwrite(&self, key: &Path, data: Bytes) -> Result<()> {
        self.metrics
            .call(PUT, self.target(key), async {
                self.store
                    .put(key, PutPayload::from(data))
                    .await
                    .map(drop)
                    .map_err(|e| self.unavailable("rewriting", key, e))
            })
            .await
    }

    /// A multipart upload, for data above [`MULTIPART_THRESHOLD`]. S3 has no conditional
    /// create for multipart uploads everywhere, so a HEAD first skips data already there;
    /// two nodes racing both upload the same bytes, which is harmless.
    async fn create_multipart(&self, key: &Path, data: Bytes) -> Result<Written> {
        use futures::StreamExt as _;
        if self.size(key).await?.is_some() {
            return Ok(Written::Existed);
        }
        let parts: Vec<Result<Bytes>> = data
            .chunks(PART_BYTES)
            .map(|part| Ok(data.slice_ref(part)))
            .collect();
        self.upload_stream(key, None, futures::stream::iter(parts).boxed())
            .await?;
        Ok(Written::Created)
    }

    /// The bytes at `key`, unverified; `None` if there is no object.
    pub(crate) async fn get(&self, key: &Path) -> Result<Option<Bytes>> {
        self.metrics
            .call(GET, self.target(key), async {
                let result = match self.store.get(key).await {
                    Ok(result) => result,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(self.unavailable("reading", key, e)),
                };
                result
                    .bytes()
                    .await
                    .map(Some)
                    .map_err(|e| self.unavailable("reading", key, e))
            })
            .await
    }

    /// The object at `key` as a stream of chunks of at most `chunk_bytes` (unverified); `None`
    /// if there is none. Only the request that opens the stream is timed and traced.
    pub(crate) async fn get_stream(
        &self,
        key: &Path,
        chunk_bytes: usize,
    ) -> Result<Option<ByteStream>> {
        use futures::StreamExt as _;
        let result = self
            .metrics
            .call(GET, self.target(key), async {
                match self.store.get(key).await {
                    Ok(result) => Ok(Some(result)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(self.unavailable("reading", key, e)),
                }
            })
            .await?;
        let Some(result) = result else {
            return Ok(None);
        };
        let (name, key, chunk) = (self.name.clone(), key.clone(), chunk_bytes.max(1));
        let chunks = result
            .into_stream()
            .map(move |item| match item {
                // The body's own pieces, cut to at most `chunk` bytes each.
                Ok(bytes) => futures::stream::iter(
                    (0..bytes.len())
                        .step_by(chunk)
                        .map(|at| Ok(bytes.slice(at..(at + chunk).min(bytes.len()))))
                        .collect::<Vec<_>>(),
                )
                .left_stream(),
                Err(e) => {
                    futures::stream::once(futures::future::ready(Err(DerivaError::Unavailable {
                        backend: name.clone(),
                        message: format!("reading {key}: {e}"),
                    })))
                    .right_stream()
                }
            })
            .flatten()
            .boxed();
        Ok(Some(chunks))
    }

    /// Uploads `data` to `key` in parts and, with `expected`, hashes it on the way and completes
    /// the upload only if its bytes hash to `expected`: else it is aborted (nothing becomes
    /// visible) and the error is [`DerivaError::Corrupted`]. An error item of `data` aborts it
    /// too. At most two parts are in flight. Returns the size.
    pub(crate) async fn upload_stream(
        &self,
        key: &Path,
        expected: Option<CAddr>,
        mut data: ByteStream,
    ) -> Result<u64> {
        use futures::StreamExt as _;
        self.metrics
            .call(PUT_MULTIPART, self.target(key), async {
                let upload = self
                    .store
                    .put_multipart(key)
                    .await
                    .map_err(|e| self.unavailable("starting the upload of", key, e))?;
                let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
                let mut hasher = blake3::Hasher::new();
                let mut len = 0u64;
                let failure = loop {
                    let chunk = match data.next().await {
                        Some(Ok(chunk)) => chunk,
                        Some(Err(e)) => break Some(e),
                        None => break None,
                    };
                    if let Err(e) = writer.wait_for_capacity(2).await {
                        break Some(self.unavailable("uploading", key, e));
                    }
                    if expected.is_some() {
                        hasher.update(&chunk);
                    }
                    len += chunk.len() as u64;
                    writer.put(chunk);
                };
                let failure = failure.or_else(|| {
                    let expected = expected?;
                    let found = CAddr::from(*hasher.finalize().as_bytes());
                    (found != expected).then(|| DerivaError::Corrupted {
                        addr: expected,
                        detail: format!("the {len} bytes given hash to {found}"),
                    })
                });
                if let Some(e) = failure {
                    if let Err(abort) = writer.abort().await {
                        tracing::warn!(%key, error = %abort, "could not abort a multipart upload");
                    }
                    return Err(e);
                }
                writer
                    .finish()
                    .await
                    .map_err(|e| self.unavailable("completing the upload of", key, e))?;
                Ok(len)
            })
            .await
    }

    /// The size of the object at `key`; `None` if there is none.
    pub(crate) async fn size(&self, key: &Path) -> Result<Option<u64>> {
        self.metrics
            .call(HEAD, self.target(key), async {
                match self.store.head(key).await {
                    Ok(meta) => Ok(Some(meta.size)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(self.unavailable("looking up", key, e)),
                }
            })
            .await
    }

    /// Deletes the object at `key`; deleting nothing is no error.
    pub(crate) async fn delete(&self, key: &Path) -> Result<()> {
        self.metrics
            .call(DELETE, self.target(key), async {
                match self.store.delete(key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(self.unavailable("deleting", key, e)),
                }
            })
            .await
    }

    /// One page of the addresses of the objects under `{prefix}{dir}/` whose name is an
    /// address: at most `limit`, those after `after`, in key order (which is the addresses'
    /// byte order: the names are lowercase hex). A bulk listing, for `deriva-server migrate`:
    /// never for index questions. Names that are no address are skipped. S3 lists in pages of
    /// its own, asked for as the page fills, starting after `after`'s key.
    pub(crate) async fn list_addrs_page(
        &self,
        dir: &str,
        after: Option<CAddr>,
        limit: usize,
    ) -> Result<Vec<CAddr>> {
        use futures::{StreamExt as _, TryStreamExt as _};
        let prefix = Path::from(format!("{}{dir}", self.prefix));
        self.metrics
            .call(LIST, self.target(&prefix), async {
                let listed = match after {
                    Some(after) => {
                        let offset = Path::from(format!("{}{dir}/{}", self.prefix, after.to_hex()));
                        self.store.list_with_offset(Some(&prefix), &offset)
                    }
                    None => self.store.list(Some(&prefix)),
                };
                listed
                    .try_filter_map(|m| async move {
                        Ok(m.location
                            .filename()
                            .and_then(|n| n.parse::<CAddr>().ok().filter(|a| a.to_hex() == n)))
                    })
                    .take(limit)
                    .try_collect()
                    .await
                    .map_err(|e| self.unavailable("listing", &prefix, e))
            })
            .await
    }

    /// A real signed request (a HEAD of a key that need not exist), for health checks.
    pub(crate) async fn check(&self) -> Result<()> {
        let key = Path::from(format!("{}health-check", self.prefix));
        self.size(&key).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_url("s3://b").unwrap(), ("b".into(), "".into()));
        assert_eq!(parse_url("s3://b/").unwrap(), ("b".into(), "".into()));
        assert_eq!(
            parse_url("s3://b/team/deriva/").unwrap(),
            ("b".into(), "team/deriva/".into())
        );
        for bad in ["b", "http://b", "s3://", "s3:///p", "s3://b/../x"] {
            let err = parse_url(bad).unwrap_err();
            assert!(
                matches!(&err, DerivaError::InvalidInput(m) if m.contains("--blob-store")),
                "{bad}: {err}"
            );
        }
        let err = parse_url("s3://key:s3/cret@b/p").unwrap_err().to_string();
        assert!(err.contains("credentials do not belong"), "{err}");
        assert!(!err.contains("s3/cret"), "{err}");
    }
}
