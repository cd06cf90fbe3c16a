//! The names of Deriva's spans and of the fields they carry: one constant per name, used by the
//! code that opens the span (`deriva-compute`'s executor, `deriva-server`'s RPC layer), by the
//! server's trace store and by the client's `--explain` rendering. Renaming a span here renames
//! it everywhere. `deriva-compute` re-exports this module as `deriva_compute::spans`; its
//! `tests/spans.rs` pins the names as literals, since they are what Jaeger and `--explain`
//! users see.
//!
//! The names live in `deriva-core` because the `deriva` client, which renders them, depends on
//! `deriva-core` and `deriva-proto` only.

/// The server span of one RPC, the root of a request's tree.
pub const RPC: &str = "rpc";
/// One level of materialization: cache, then leaf, then recipe.
pub const MATERIALIZE: &str = "materialize";
/// The cache lookup at the start of a materialization.
pub const CACHE_CHECK: &str = "cache_check";
/// The read of a leaf from the blob store.
pub const LEAF_READ: &str = "leaf_read";
/// One run of a recipe's function.
pub const COMPUTE: &str = "compute";
/// The second run of a function, compared with the first.
pub const VERIFY: &str = "verify";
/// The insertion of a computed output into the cache.
pub const CACHE_PUT: &str = "cache_put";
/// A `Verify` call: materialize the inputs, then compute twice.
pub const VERIFY_RECIPE: &str = "verify_recipe";
/// A sampled recomputation of a hit, compared with the output's record: a trace of its own,
/// linked to the compute it checks.
pub const AUDIT: &str = "audit";
/// An `Invalidate` call.
pub const INVALIDATE: &str = "invalidate";

/// A read of the shared output tier, before computing a recipe; `found` tells whether it
/// held the output.
pub const OUTPUT_READ: &str = "output_read";
/// A write of a computed output to the shared output tier.
pub const OUTPUT_WRITE: &str = "output_write";
/// A write of a computed output larger than the spill threshold to the local spill directory
/// (instead of the memory cache); `bytes` is its size.
pub const SPILL_WRITE: &str = "spill_write";
/// A garbage collection (`GarbageCollect`, or the periodic one of `--gc-interval`).
pub const GC: &str = "gc";
/// The mark of a garbage collection: finding, where the data is, what must stay; `live` and
/// `candidates` count them.
pub const GC_MARK: &str = "mark";
/// The sweep of a garbage collection: the conditional deletes; `removed` and `kept` count
/// them.
pub const GC_SWEEP: &str = "sweep";
/// A client call to the object store (S3 API), with the OpenTelemetry semantic-convention
/// attributes `rpc.system=aws-api`, `rpc.method`, `aws.s3.bucket` and `aws.s3.key`.
pub const OBJECT_STORE: &str = "object_store";
/// A client call to a database: the PostgreSQL index (`db.system.name=postgresql`) or the local
/// backend's redb (`db.system.name=redb`), with `db.operation.name` and `db.collection.name`.
pub const INDEX_DB: &str = "index_db";
/// An operation on the local backend's leaf files, with `deriva.store.op` (`get`, `put`, …).
/// The local backend's redb transactions are [`INDEX_DB`] spans with `db.system.name=redb`.
pub const LEAF_FILE: &str = "leaf_file";

/// Field names.
pub mod field {
    /// Addresses a garbage collection's mark found live.
    pub const LIVE: &str = "live";
    /// Addresses the mark found eligible for removal.
    pub const CANDIDATES: &str = "candidates";
    /// Whether a garbage collection only reports.
    pub const DRY_RUN: &str = "dry_run";
    /// Items a garbage collection removed (or would, in a dry run).
    pub const REMOVED: &str = "removed";
    /// Candidates a garbage collection's conditional deletes kept.
    pub const KEPT: &str = "kept";
    /// The grace period of a garbage collection, in seconds.
    pub const GRACE_SECS: &str = "grace_secs";
    /// The address a span works on (hex).
    pub const ADDR: &str = "addr";
    /// How deep in the recipe DAG a materialization is (0 for the requested address).
    pub const DEPTH: &str = "depth";
    /// How a materialization ended: `hit`, `leaf`, `computed` or `error`.
    pub const RESULT: &str = "result";
    /// Whether the cache held the address.
    pub const HIT: &str = "hit";
    /// Whether a leaf or recipe was found.
    pub const FOUND: &str = "found";
    /// The function id, `name/version`.
    pub const FUNCTION: &str = "function";
    /// Total size of a compute's inputs.
    pub const INPUT_BYTES: &str = "input_bytes";
    /// Size of a compute's output.
    pub const OUTPUT_BYTES: &str = "output_bytes";
    /// Size of what was put into the cache.
    pub const BYTES: &str = "bytes";
    /// Whether the verification run agreed with the first.
    pub const PASSED: &str = "passed";
    /// Whether a `Verify` found the recipe deterministic.
    pub const DETERMINISTIC: &str = "deterministic";
    /// Whether an invalidation cascades to dependents.
    pub const CASCADE: &str = "cascade";
    /// `invalidate`: what it does with what it finds (`immediate`, `dry_run`, `none`).
    pub const POLICY: &str = "policy";
    /// How many cache entries an invalidation removed.
    pub const EVICTED: &str = "evicted";
    /// The request id of an RPC (the `x-request-id` header or a new UUID).
    pub const REQUEST_ID: &str = "request_id";
    /// The trace id of an RPC, 32 hex characters.
    pub const TRACE_ID: &str = "trace_id";
    /// The gRPC method of an RPC, as in `rpc.method`.
    pub const RPC_METHOD: &str = "rpc.method";
    /// On a `materialize` span that hit (memory cache, spill, output tier): the node that
    /// computed the output, from its record. The span also links to the compute span.
    pub const ORIGIN_NODE: &str = "deriva.origin.node";
    /// Seconds since the output was computed.
    pub const ORIGIN_AGE_SECONDS: &str = "deriva.origin.age_seconds";
    /// How long the compute took, in seconds.
    pub const ORIGIN_DURATION_SECONDS: &str = "deriva.origin.duration_seconds";
    /// The trace id of the compute span, 32 hex characters (the link, for the trace store).
    pub const ORIGIN_TRACE_ID: &str = "deriva.origin.trace_id";
    /// The span id of the compute span, 16 hex characters.
    pub const ORIGIN_SPAN_ID: &str = "deriva.origin.span_id";
}
