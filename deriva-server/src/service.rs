//! [`DerivaService`], the tonic implementation of `service Deriva`. It decodes requests, calls
//! the executor (its one road to the store), and encodes answers; errors become statuses in
//! [`crate::error`]. The shutdown cutoff, the telemetry and the tokens are applied around it, by
//! [`crate::rpc::RpcLayer`].

use std::pin::Pin;
use std::time::Duration;

use deriva_compute::{AsyncExecutor, CascadePolicy, Described, GcOptions, ProvenanceTree};
use deriva_core::provenance::unix_micros;
use deriva_core::{DerivaError, FunctionId, Recipe};
use futures::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

use deriva_proto::addr_bytes;

use crate::auth::{Caller, Scope};
use crate::error::{ApiError, ApiResult, parse_addr};
use crate::telemetry::ServerMetrics;
use crate::trace_store::{TraceRecord, TraceStore};

/// How long `Explain` waits for a trace that is still finishing.
const EXPLAIN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);
use crate::proto::deriva_server::Deriva;
use crate::proto::*;

/// The gRPC service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DerivaService {
    exec: AsyncExecutor,
    chunk_bytes: usize,
    metrics: ServerMetrics,
    traces: Option<TraceStore>,
    node: NodeInfo,
    /// The remote backend's nodes and their heartbeat interval.
    cluster: Option<(deriva_store_remote::PgNodes, std::time::Duration)>,
    /// The shortest grace period a `GarbageCollect` may ask for (`--gc-min-grace`).
    gc_min_grace: Duration,
}

/// What `ClusterStatus` says of this node.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    name: String,
    grpc_addr: String,
    started: std::time::Instant,
    /// When it started, in seconds since the Unix epoch: a new value per process.
    incarnation: u64,
}

impl NodeInfo {
    /// This node, named `name`, serving gRPC on `grpc_addr`, started now.
    pub fn new(name: String, grpc_addr: String) -> Self {
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            name,
            grpc_addr,
            started: std::time::Instant::now(),
            incarnation,
        }
    }

    /// What this node says of itself now, over `exec`.
    pub fn beat(&self, exec: &AsyncExecutor) -> deriva_store_remote::NodeBeat {
        let cache = exec.cache().stats();
        deriva_store_remote::NodeBeat {
            name: self.name.clone(),
            grpc_addr: self.grpc_addr.clone(),
            role: "server".into(),
            incarnation: self.incarnation,
            cache_entries: cache.entries(),
            cache_bytes: cache.size_bytes(),
            blob_count: exec.store_counters().blobs(),
            cpu_load: load_per_cpu(),
        }
    }
}

/// The stream type of `Get`.
pub type GetStream = Pin<Box<dyn Stream<Item = Result<GetResponse, Status>> + Send + 'static>>;

impl DerivaService {
    /// A service over `exec`, answering `Get` in chunks of `chunk_bytes`.
    pub fn new(exec: AsyncExecutor, chunk_bytes: usize, metrics: ServerMetrics) -> Self {
        Self {
            exec,
            chunk_bytes: chunk_bytes.max(1),
            metrics,
            traces: None,
            node: NodeInfo::new("deriva-server".into(), String::new()),
            cluster: None,
            gc_min_grace: crate::config::defaults::GC_MIN_GRACE_DURATION,
        }
    }

    /// Refuses a `GarbageCollect` whose grace period is below `min` (`--gc-min-grace`).
    pub fn with_gc_min_grace(mut self, min: Duration) -> Self {
        self.gc_min_grace = min;
        self
    }

    /// Answers `ClusterStatus` from the heartbeats in `nodes`, written every `interval`.
    pub fn with_cluster(
        mut self,
        cluster: Option<(deriva_store_remote::PgNodes, std::time::Duration)>,
    ) -> Self {
        self.cluster = cluster;
        self
    }

    /// Describes this node in `ClusterStatus` as `node`.
    pub fn with_node(mut self, node: NodeInfo) -> Self {
        self.node = node;
        self
    }

    /// Answers `Explain` from `traces`.
    pub fn with_trace_store(mut self, traces: Option<TraceStore>) -> Self {
        self.traces = traces;
        self
    }
}

/// The 1-minute load average divided by the number of CPUs (0 where it cannot be read).
fn load_per_cpu() -> f32 {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse::<f32>().ok())
        .unwrap_or(0.0);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    load / cpus as f32
}

fn reply<T>(result: ApiResult<T>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

// Every call but `Status` runs under the shutdown cutoff of `crate::rpc::RpcLayer`: when the
// shutdown grace is over, what is still running answers UNAVAILABLE.
#[tonic::async_trait]
impl Deriva for DerivaService {
    async fn put_leaf(
        &self,
        request: Request<PutLeafRequest>,
    ) -> Result<Response<PutLeafResponse>, Status> {
        let data = request.into_inner().data;
        let addr = self.exec.put_leaf(data).await.map_err(ApiError::from);
        reply(addr.map(|a| PutLeafResponse {
            addr: addr_bytes(&a),
        }))
    }

    async fn put_leaf_stream(
        &self,
        request: Request<Streaming<PutLeafStreamRequest>>,
    ) -> Result<Response<PutLeafResponse>, Status> {
        // Chunks are written as they come (to a file, hashed on the way); the address is known,
        // and the leaf stored, only at the end. A stream that breaks off (a message over the
        // limit, a client that hangs up) stores nothing, and its status is the answer.
        let broke_off = std::sync::Arc::new(parking_lot::Mutex::new(None::<Status>));
        let seen = broke_off.clone();
        let chunks = request
            .into_inner()
            .map(move |item| {
                item.map(|req| req.chunk).map_err(|status| {
                    let err = DerivaError::InvalidInput(format!(
                        "the upload broke off before its end: {}",
                        status.message()
                    ));
                    *seen.lock() = Some(status);
                    err
                })
            })
            .boxed();
        let put = self.exec.put_leaf_stream(chunks).await;
        if put.is_err()
            && let Some(status) = broke_off.lock().take()
        {
            return Err(status);
        }
        reply(put.map_err(ApiError::from).map(|addr| PutLeafResponse {
            addr: addr_bytes(&addr),
        }))
    }

    async fn put_recipe(
        &self,
        request: Request<PutRecipeRequest>,
    ) -> Result<Response<PutRecipeResponse>, Status> {
        let req = request.into_inner();
        let answer: ApiResult<_> = async {
            let function = FunctionId::new(req.function_name, req.function_version)?;
            let inputs = req
                .inputs
                .iter()
                .enumerate()
                .map(|(i, raw)| parse_addr(&format!("inputs[{i}]"), raw))
                .collect::<ApiResult<Vec<_>>>()?;
            let recipe = Recipe::new(function, inputs, req.params)?;
            // The store does its blocking work (redb, fsync) on the blocking pool.
            let start = std::time::Instant::now();
            let addr = self.exec.put_recipe(recipe).await;
            self.metrics.record_dag_insert(start.elapsed());
            let addr = addr?;
            Ok(PutRecipeResponse {
                addr: addr_bytes(&addr),
            })
        }
        .await;
        reply(answer)
    }

    type GetStream = GetStream;

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<Self::GetStream>, Status> {
        let req = request.into_inner();
        let answer: ApiResult<_> = async {
            let addr = parse_addr("addr", &req.addr)?;
            // A leaf streams from the store as it is sent; an output is cut into slices of one
            // `Bytes`. A leaf whose bytes turn out not to match its address ends the stream with
            // DATA_LOSS instead of OK (a client keeps what it got only after an OK end).
            let mut chunks = self.exec.get_stream(addr, self.chunk_bytes).await?;
            // The stream is polled by the connection, outside the call: each poll runs in the
            // request's span (a traced request) or scope (an untraced one), so that the reads it
            // makes build spans only when the request is traced, and the error of its end is
            // logged with the request's trace id.
            let span = tracing::Span::current();
            let mut scope = deriva_core::untraced::current();
            let answers: GetStream = Box::pin(futures::stream::poll_fn(move |cx| {
                let _in_request = span.enter();
                deriva_core::untraced::within(&mut scope, || {
                    chunks.poll_next_unpin(cx).map(|item| {
                        item.map(|chunk| {
                            chunk
                                .map(|chunk| GetResponse { chunk })
                                .map_err(|e| Status::from(ApiError::from(e)))
                        })
                    })
                })
            }));
            Ok(answers)
        }
        .await;
        reply(answer)
    }

    async fn resolve(
        &self,
        request: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        let req = request.into_inner();
        let answer: ApiResult<_> = async {
            let addr = parse_addr("addr", &req.addr)?;
            let Some(recipe) = self.exec.recipe(addr).await? else {
                return Ok(ResolveResponse::default());
            };
            Ok(ResolveResponse {
                found: true,
                function_name: recipe.function().name().to_owned(),
                function_version: recipe.function().version().to_owned(),
                inputs: recipe.inputs().iter().map(addr_bytes).collect(),
                params: recipe
                    .params()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })
        }
        .await;
        reply(answer)
    }

    async fn invalidate(
        &self,
        request: Request<InvalidateRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        let req = request.into_inner();
        let answer: ApiResult<_> = async {
            let addr = parse_addr("addr", &req.addr)?;
            let report = self.exec.invalidate(addr, req.cascade).await?;
            Ok(InvalidateResponse {
                was_cached: report.was_cached,
                evicted_count: report.evicted.len() as u64,
            })
        }
        .await;
        reply(answer)
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let store = self.exec.store_counters();
        let cache = self.exec.cache().stats();
        let exec = self.exec.stats();
        let (passed, failed) = (exec.verifications_passed(), exec.verifications_failed());
        let (gc_phase, gc_done, gc_total) = store.gc_progress().get();
        Ok(Response::new(StatusResponse {
            recipe_count: store.recipes(),
            blob_count: store.blobs(),
            cache_entries: cache.entries(),
            cache_size_bytes: cache.size_bytes(),
            cache_hit_rate: cache.hit_rate(),
            verification_mode: self.exec.verification_mode().to_string(),
            verification_total: passed + failed,
            verification_passed: passed,
            verification_failed: failed,
            verification_failure_rate: exec.verification_failure_rate(),
            gc_phase: gc_phase.as_str().to_owned(),
            gc_done,
            gc_total,
        }))
    }

    /// The trace of the request. With tokens (the caller known), only a trace of that caller's
    /// own request, or any trace for an admin; any other is answered exactly as an unknown id,
    /// so that a caller learns neither its tree nor that it exists.
    async fn explain(
        &self,
        request: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let req = request.into_inner();
        let answer: ApiResult<_> = async {
            let Some(traces) = &self.traces else {
                return Err(ApiError::TraceStoreOff);
            };
            let id = req.trace_id.trim();
            if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ApiError::BadTraceId {
                    got: id.chars().take(40).collect(),
                });
            }
            let visible = |trace: &TraceRecord| {
                caller
                    .as_ref()
                    .is_none_or(|c| c.has(Scope::Admin) || trace.caller() == Some(c.name.as_str()))
            };
            // The request being explained may still be closing its span.
            let Some(trace) = traces.wait_for_visible(id, EXPLAIN_PATIENCE, visible).await else {
                return Err(ApiError::TraceNotFound {
                    trace_id: id.to_owned(),
                });
            };
            Ok(ExplainResponse {
                trace_id: trace.trace_id.clone(),
                request_id: trace.request_id.clone(),
                method: trace.method.clone(),
                status_code: trace.status_code,
                duration_us: trace.duration_us,
                dropped_spans: trace.dropped_spans,
                spans: trace
                    .spans
                    .iter()
                    .map(|s| TraceSpan {
                        id: s.id,
                        parent: s.parent.unwrap_or(0),
                        name: s.name.to_owned(),
                        fields: s
                            .fields
                            .iter()
                            .map(|(k, v)| TraceField {
                                key: (*k).to_owned(),
                                value: v.clone(),
                            })
                            .collect(),
                        start_us: s.start_us,
                        duration_us: s.duration_us,
                    })
                    .collect(),
            })
        }
        .await;
        reply(answer)
    }

    async fn verify(
        &self,
        request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let req = request.into_inner();
        let answer: ApiResult<_> = async {
            let addr = parse_addr("addr", &req.addr)?;
            let report = self.exec.verify(addr).await?;
            Ok(VerifyResponse {
                deterministic: report.deterministic,
                output_hash: report.output_hash.to_hex(),
                output_size: report.output_size,
                compute_time_us: u64::try_from(report.compute_time.as_micros()).unwrap_or(u64::MAX),
                error: if report.deterministic {
                    String::new()
                } else {
                    format!(
                        "{addr}: two runs gave different outputs ({} and {})",
                        report.output_hash, report.second_hash
                    )
                },
            })
        }
        .await;
        reply(answer)
    }

    async fn cascade_invalidate(
        &self,
        request: Request<CascadeInvalidateRequest>,
    ) -> Result<Response<CascadeInvalidateResponse>, Status> {
        let req = request.into_inner();
        let answer: ApiResult<_> = async {
            let addr = parse_addr("addr", &req.addr)?;
            let policy = CascadePolicy::parse(&req.policy);
            let report = self
                .exec
                .cascade_invalidate(addr, true, policy, req.include_root)
                .await?;
            Ok(CascadeInvalidateResponse {
                evicted_count: report.evicted.len() as u64,
                traversed_count: report.traversed,
                max_depth: report.max_depth,
                bytes_reclaimed: report.bytes_reclaimed,
                evicted_addrs: if req.detail_addrs {
                    report.evicted.iter().map(addr_bytes).collect()
                } else {
                    Vec::new()
                },
                duration_micros: u64::try_from(report.duration.as_micros()).unwrap_or(u64::MAX),
            })
        }
        .await;
        reply(answer)
    }

    async fn garbage_collect(
        &self,
        request: Request<GcRequest>,
    ) -> Result<Response<GcResponse>, Status> {
        let req = request.into_inner();
        let answer: ApiResult<_> = async {
            // `GcRequest{}` asks for a grace period of 0: everything unpinned, at once. Below the
            // operator's floor a collection is refused, a dry run too (it reports a collection that
            // may not run).
            let grace = Duration::from_secs(req.grace_period_secs);
            if grace < self.gc_min_grace {
                return Err(ApiError::GraceBelowMinimum {
                    asked_secs: req.grace_period_secs,
                    min_secs: self.gc_min_grace.as_secs(),
                });
            }
            let options = GcOptions {
                grace,
                dry_run: req.dry_run,
                max_removals: req.max_removals,
            };
            let report = self.exec.garbage_collect(options).await?;
            let store = &report.store;
            Ok(GcResponse {
                blobs_removed: store.blobs_removed,
                recipes_removed: store.recipes_removed,
                cache_entries_removed: report.cache_entries_removed,
                bytes_reclaimed_blobs: store.bytes_reclaimed,
                bytes_reclaimed_cache: report.bytes_reclaimed_cache,
                total_bytes_reclaimed: store.bytes_reclaimed + report.bytes_reclaimed_cache,
                live_blobs: store.live_blobs,
                live_recipes: store.live_recipes,
                pinned_count: store.pinned,
                duration_micros: u64::try_from(report.duration.as_micros()).unwrap_or(u64::MAX),
                removed_addrs: if req.detail_addrs {
                    store.removed.iter().map(|r| addr_bytes(&r.addr)).collect()
                } else {
                    Vec::new()
                },
                dry_run: report.dry_run,
                removed_addrs_truncated: req.detail_addrs && store.removed_truncated,
            })
        }
        .await;
        reply(answer)
    }

    async fn pin(&self, request: Request<PinRequest>) -> Result<Response<PinResponse>, Status> {
        let req = request.into_inner();
        let answer: ApiResult<_> = async {
            let was_new = self.exec.pin(parse_addr("addr", &req.addr)?).await?;
            Ok(PinResponse { was_new })
        }
        .await;
        reply(answer)
    }

    async fn unpin(
        &self,
        request: Request<UnpinRequest>,
    ) -> Result<Response<UnpinResponse>, Status> {
        let req = request.into_inner();
        let answer: ApiResult<_> = async {
            let was_pinned = self.exec.unpin(parse_addr("addr", &req.addr)?).await?;
            Ok(UnpinResponse { was_pinned })
        }
        .await;
        reply(answer)
    }

    async fn list_pins(
        &self,
        _: Request<ListPinsRequest>,
    ) -> Result<Response<ListPinsResponse>, Status> {
        let answer: ApiResult<_> = async {
            let pins = self.exec.pins().await?;
            Ok(ListPinsResponse {
                count: pins.len() as u64,
                addrs: pins.iter().map(addr_bytes).collect(),
            })
        }
        .await;
        reply(answer)
    }

    /// Every node with a heartbeat row on the remote backend; else this node alone.
    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let answer: ApiResult<_> = async {
            let info = |beat: deriva_store_remote::NodeBeat, state: &str, uptime_secs: u64| {
                ClusterNodeInfo {
                    name: beat.name,
                    addr: beat.grpc_addr.clone(),
                    state: state.to_owned(),
                    incarnation: beat.incarnation,
                    grpc_addr: beat.grpc_addr,
                    role: beat.role,
                    cache_entries: beat.cache_entries,
                    cache_bytes: beat.cache_bytes,
                    blob_count: beat.blob_count,
                    cpu_load: beat.cpu_load,
                    uptime_secs,
                }
            };
            let nodes = match &self.cluster {
                Some((nodes, interval)) => nodes
                    .list(*interval)
                    .await?
                    .into_iter()
                    .map(|row| info(row.beat, row.state, row.uptime_secs))
                    .collect(),
                None => vec![info(
                    self.node.beat(&self.exec),
                    "alive",
                    self.node.started.elapsed().as_secs(),
                )],
            };
            let count = |state: &str| nodes.iter().filter(|n| n.state == state).count() as u64;
            Ok(ClusterStatusResponse {
                alive_count: count("alive"),
                suspect_count: count("suspect"),
                dead_count: count("dead"),
                nodes,
            })
        }
        .await;
        reply(answer)
    }

    /// The records of `addr`'s closure, to the depth asked (see
    /// [`AsyncExecutor::provenance`]).
    async fn provenance(
        &self,
        request: Request<ProvenanceRequest>,
    ) -> Result<Response<ProvenanceResponse>, Status> {
        let req = request.into_inner();
        let answer: ApiResult<_> = async {
            let addr = parse_addr("addr", &req.addr)?;
            let tree = self.exec.provenance(addr, req.depth).await?;
            Ok(provenance_response(tree))
        }
        .await;
        reply(answer)
    }
}

/// The wire form of a provenance tree.
pub fn provenance_response(tree: ProvenanceTree) -> ProvenanceResponse {
    let entries = tree
        .entries
        .into_iter()
        .map(|entry| {
            let mut out = ProvenanceEntry {
                addr: addr_bytes(&entry.addr),
                depth: entry.depth,
                ..ProvenanceEntry::default()
            };
            match entry.described {
                Described::Leaf(stat) => {
                    out.kind = "leaf".into();
                    out.leaf_size = stat.size;
                    out.stored_at_unix_micros = stat.stored_at.map_or(0, unix_micros);
                }
                Described::Recipe { recipe, record } => {
                    out.kind = "recipe".into();
                    out.function_name = recipe.function().name().to_owned();
                    out.function_version = recipe.function().version().to_owned();
                    out.inputs = recipe.inputs().iter().map(addr_bytes).collect();
                    if let Some(record) = record {
                        out.record = record.signed.to_bytes().into();
                        out.audit_match = record.audits.matches;
                        out.audit_mismatch = record.audits.mismatches;
                        out.audit_error = record.audits.errors;
                    }
                }
                Described::Missing => out.kind = "missing".into(),
            }
            out
        })
        .collect();
    ProvenanceResponse {
        entries,
        truncated: tree.truncated,
    }
}

impl DerivaService {
    /// The executor the service runs on.
    pub fn executor(&self) -> &AsyncExecutor {
        &self.exec
    }
}
