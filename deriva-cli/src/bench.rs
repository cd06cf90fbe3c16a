//! `deriva bench`: a load generator in the spirit of redis-benchmark. It prepares its own data,
//! runs one workload from many concurrent clients for a duration or a request count, and
//! reports throughput and latency percentiles.
//!
//! Workloads (each request is timed from send to the last byte received):
//!
//! | workload | setup | one request |
//! |---|---|---|
//! | `status` | – | `Status`: a unary call that does no work, the server's per-RPC cost |
//! | `cached-get` | a leaf of `--size` bytes and a `reverse/v1` recipe over it, fetched once so it is cached | `Get` of the recipe: a cache hit |
//! | `leaf-get` | a leaf of `--size` bytes | `Get` of the leaf: a read from the blob store, hash verified |
//! | `compute-get` | a leaf of `--size` bytes, unique to this run | `PutRecipe` of a fresh `slice/v1` over it (untimed), then its `Get`, which computes |
//! | `put-leaf` | – | `PutLeaf` of `--size` fresh bytes (fsynced by the server) |
//! | `mixed` | all of the above | 70 % cached-get, 20 % compute-get, 10 % put-leaf |
//!
//! Bench requests carry no `traceparent`, so the server's own sampling decides what is traced.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deriva_core::CAddr;

use deriva_proto::{GetRequest, PutLeafRequest, PutRecipeRequest, StatusRequest};

use crate::client::{CliError, Client, Target, code_words, connect};

/// The workloads of `deriva bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// A Status call, which does no work: the per-RPC cost.
    Status,
    /// Get of an address already cached.
    CachedGet,
    /// Get of a leaf.
    LeafGet,
    /// Get of a fresh recipe, computing a small function each time.
    ComputeGet,
    /// Put of a fresh leaf.
    PutLeaf,
    /// 70% cached-get, 20% compute-get, 10% put-leaf.
    Mixed,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::CachedGet => "cached-get",
            Self::LeafGet => "leaf-get",
            Self::ComputeGet => "compute-get",
            Self::PutLeaf => "put-leaf",
            Self::Mixed => "mixed",
        }
    }
}

/// `deriva bench` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Concurrent clients (each with its own connection).
    #[arg(short = 'c', long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,
    /// How long to run, such as 10s, 500ms or 1m (ignored with --requests).
    #[arg(short = 'd', long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Run exactly this many requests instead of for a duration.
    #[arg(short = 'n', long)]
    pub requests: Option<u64>,
    /// What each request does.
    #[arg(short = 'w', long, value_enum, default_value = "cached-get")]
    pub workload: Workload,
    /// Size of the leaf values, in bytes or with a unit (KiB, MiB).
    #[arg(short = 's', long, default_value = "1KiB", value_parser = deriva_util::size::parse_size)]
    pub size: u64,
    /// The function of the cached-get recipe (one input, no params), NAME/VERSION: another
    /// one for a server with other builtins, such as the original Deriva's uppercase/1.0.0.
    #[arg(long, default_value = "reverse/v1", value_parser = parse_function)]
    pub function: (String, String),
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `NAME/VERSION`, both parts non-empty.
fn parse_function(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((name, version)) if !name.is_empty() && !version.is_empty() => {
            Ok((name.to_owned(), version.to_owned()))
        }
        _ => Err(format!("{s:?} is not NAME/VERSION, such as reverse/v1")),
    }
}

/// Parses `10s`, `500ms`, `2m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 10s or 500ms"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {s:?}; use ms, s or m"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// What a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// The workload.
    pub workload: String,
    /// Concurrent clients.
    pub concurrency: u32,
    /// Bytes per leaf.
    pub size: u64,
    /// How the data was prepared.
    pub setup: String,
    /// Requests that succeeded.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Wall time of the measured part, in seconds.
    pub elapsed_secs: f64,
    /// Successful requests per second.
    pub throughput_rps: f64,
    /// Latency percentiles and mean, in microseconds.
    pub latency_us: Latency,
    /// The first error seen, if any.
    pub first_error: Option<String>,
}

/// Latency figures in microseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
    /// Mean.
    pub mean: u64,
}

impl Latency {
    /// Percentiles of `samples` (sorted in place).
    pub fn of(samples: &mut [u64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1]
        };
        Self {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            max: samples[samples.len() - 1],
            mean: samples.iter().sum::<u64>() / samples.len() as u64,
        }
    }
}

impl Report {
    /// The human-readable report.
    pub fn text(&self) -> String {
        let l = &self.latency_us;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "workload:     {} (size {} B, concurrency {})",
            self.workload, self.size, self.concurrency
        );
        let _ = writeln!(out, "setup:        {}", self.setup);
        let _ = writeln!(
            out,
            "requests:     {} ok, {} errors in {:.2} s",
            self.requests, self.errors, self.elapsed_secs
        );
        let _ = writeln!(out, "throughput:   {:.0} req/s", self.throughput_rps);
        let _ = writeln!(
            out,
            "latency:      p50 {}  p99 {}  p999 {}  max {}  mean {}",
            us(l.p50),
            us(l.p99),
            us(l.p999),
            us(l.max),
            us(l.mean)
        );
        if let Some(e) = &self.first_error {
            let _ = writeln!(out, "first error:  {e}");
        }
        out
    }
}

fn us(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1} ms", v as f64 / 1000.0)
    } else {
        format!("{v} µs")
    }
}

/// The data a workload needs, prepared once.
#[derive(Debug, Clone)]
struct Prepared {
    cached: Bytes,
    leaf: Bytes,
    /// Leaf for compute-get: unique to this run, so its recipes are never already cached.
    fresh_leaf: Bytes,
    size: u64,
    nonce: u64,
}

/// `size` bytes, different for every `(nonce, seq)`.
fn payload(size: u64, nonce: u64, seq: u64) -> Vec<u8> {
    let mut x = nonce ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x2545_F491_4F6C_DD1D;
    let mut out = Vec::with_capacity(size as usize + 16);
    out.extend_from_slice(&nonce.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    while (out.len() as u64) < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size.max(16) as usize);
    out
}

/// Stores what the workload reads: nothing for `status`; otherwise a leaf, a leaf unique to
/// this run and a recipe of `--function` (`reverse/v1`) over the first, fetched once so that it is cached. Only
/// the answers' addresses are used, so a server that answers fixed ones (the transport floor)
/// can be prepared too.
async fn prepare(client: &mut Client, args: &BenchArgs) -> Result<Prepared, CliError> {
    if args.workload == Workload::Status {
        return Ok(Prepared {
            cached: Bytes::new(),
            leaf: Bytes::new(),
            fresh_leaf: Bytes::new(),
            size: args.size,
            nonce: 0,
        });
    }
    let rpc = |what: &'static str| {
        move |s: tonic::Status| CliError::Rpc {
            context: format!("bench setup: {what}"),
            status: s,
        }
    };
    let nonce = u64::from_le_bytes(
        uuid::Uuid::new_v4().as_bytes()[..8]
            .try_into()
            .unwrap_or([7; 8]),
    );
    let leaf_data = payload(args.size, 0, 0);
    let leaf = client
        .put_leaf(PutLeafRequest {
            data: leaf_data.into(),
        })
        .await
        .map_err(rpc("put leaf"))?
        .into_inner()
        .addr;
    let fresh = payload(args.size, nonce, 0);
    let fresh_leaf = client
        .put_leaf(PutLeafRequest { data: fresh.into() })
        .await
        .map_err(rpc("put leaf"))?
        .into_inner()
        .addr;
    let recipe = PutRecipeRequest {
        function_name: args.function.0.clone(),
        function_version: args.function.1.clone(),
        inputs: vec![leaf.clone()],
        params: Default::default(),
    };
    let cached = client
        .put_recipe(recipe)
        .await
        .map_err(rpc("put recipe"))?
        .into_inner()
        .addr;
    drain(client, &cached)
        .await
        .map_err(rpc("warm the cache"))?;
    Ok(Prepared {
        cached,
        leaf,
        fresh_leaf,
        size: args.size,
        nonce,
    })
}

/// The report's `setup`: what [`prepare`] stored for `workload`.
fn describe(workload: Workload, p: &Prepared, (name, version): &(String, String)) -> String {
    match workload {
        Workload::Status => "none; each request is one Status call".to_owned(),
        Workload::CachedGet => format!(
            "put a {} B leaf and {name}/{version} over it ({}), fetched once to cache it",
            p.size,
            hex8(&p.cached)
        ),
        Workload::LeafGet => format!("put a {} B leaf ({})", p.size, hex8(&p.leaf)),
        Workload::ComputeGet => format!(
            "put a {} B leaf unique to this run ({}); each request stores a new slice/v1 recipe over it (untimed) and gets it",
            p.size,
            hex8(&p.fresh_leaf)
        ),
        Workload::PutLeaf => format!("none; each request puts {} fresh bytes", p.size),
        Workload::Mixed => {
            "all of the above; 70% cached-get, 20% compute-get, 10% put-leaf".to_owned()
        }
    }
}

fn hex8(addr: &[u8]) -> String {
    CAddr::from_slice(addr)
        .map(|a| a.short())
        .unwrap_or_default()
}

async fn drain(client: &mut Client, addr: &Bytes) -> Result<u64, tonic::Status> {
    let mut stream = client
        .get(GetRequest { addr: addr.clone() })
        .await?
        .into_inner();
    let mut n = 0;
    while let Some(msg) = stream.message().await? {
        n += msg.chunk.len() as u64;
    }
    Ok(n)
}

/// The workload a request of `workload` with sequence number `seq` runs (`mixed` spreads).
fn effective(workload: Workload, seq: u64) -> Workload {
    match workload {
        Workload::Mixed => match seq % 10 {
            0 => Workload::PutLeaf,
            1 | 2 => Workload::ComputeGet,
            _ => Workload::CachedGet,
        },
        w => w,
    }
}

/// A `slice/v1` recipe over the run's fresh leaf with a distinct `(offset, length)` per `seq`:
/// one no one has computed yet.
fn fresh_recipe(p: &Prepared, seq: u64) -> PutRecipeRequest {
    let size = p.size.max(16);
    let offset = seq % size;
    let length = (seq / size) % (size - offset + 1);
    PutRecipeRequest {
        function_name: "slice".into(),
        function_version: "v1".into(),
        inputs: vec![p.fresh_leaf.clone()],
        params: [
            ("offset".to_string(), offset.to_string()),
            ("length".to_string(), length.to_string()),
        ]
        .into(),
    }
}

/// Runs request `seq` and returns the time of its measured part.
async fn timed(
    client: &mut Client,
    p: &Prepared,
    workload: Workload,
    seq: u64,
) -> Result<Duration, tonic::Status> {
    let start = match effective(workload, seq) {
        Workload::Status => {
            let start = Instant::now();
            client.status(StatusRequest {}).await?;
            start
        }
        Workload::CachedGet => {
            let start = Instant::now();
            drain(client, &p.cached).await?;
            start
        }
        Workload::LeafGet => {
            let start = Instant::now();
            drain(client, &p.leaf).await?;
            start
        }
        Workload::PutLeaf => {
            let data = payload(p.size, p.nonce, seq + 1);
            let start = Instant::now();
            client
                .put_leaf(PutLeafRequest { data: data.into() })
                .await?;
            start
        }
        Workload::ComputeGet | Workload::Mixed => {
            let addr = client
                .put_recipe(fresh_recipe(p, seq))
                .await?
                .into_inner()
                .addr;
            let start = Instant::now();
            drain(client, &addr).await?;
            start
        }
    };
    Ok(start.elapsed())
}

/// Runs the benchmark against `target` and returns the report.
pub async fn run(target: &Target, args: &BenchArgs) -> Result<Report, CliError> {
    let mut setup_client = connect(target).await?;
    let prepared = prepare(&mut setup_client, args).await?;
    let setup = describe(args.workload, &prepared, &args.function);
    let prepared = Arc::new(prepared);
    let mut clients = Vec::with_capacity(args.concurrency as usize);
    for _ in 0..args.concurrency {
        clients.push(connect(target).await?);
    }

    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(parking_lot::Mutex::new(None::<String>));
    let limit = args.requests;
    let start = Instant::now();
    let deadline = start + args.duration;
    let workers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let (p, next, stop, errors, first_error) = (
                prepared.clone(),
                next.clone(),
                stop.clone(),
                errors.clone(),
                first_error.clone(),
            );
            let workload = args.workload;
            tokio::spawn(async move {
                let mut samples = Vec::new();
                loop {
                    if stop.load(Ordering::Relaxed)
                        || (limit.is_none() && Instant::now() >= deadline)
                    {
                        break;
                    }
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    if limit.is_some_and(|n| seq >= n) {
                        break;
                    }
                    let result = timed(&mut client, &p, workload, seq).await;
                    match result {
                        Ok(elapsed) => samples.push(elapsed.as_micros() as u64),
                        Err(status) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            first_error.lock().get_or_insert_with(|| {
                                format!("{}: {}", code_words(status.code()), status.message())
                            });
                        }
                    }
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::new();
    for w in workers {
        match w.await {
            Ok(s) => samples.extend(s),
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                return Err(CliError::Failed {
                    context: "bench".into(),
                    message: format!("a client task failed: {e}"),
                });
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let requests = samples.len() as u64;
    Ok(Report {
        workload: args.workload.name().to_owned(),
        concurrency: args.concurrency,
        size: args.size,
        setup,
        requests,
        errors: errors.load(Ordering::Relaxed),
        elapsed_secs: elapsed,
        throughput_rps: if elapsed > 0.0 {
            requests as f64 / elapsed
        } else {
            0.0
        },
        latency_us: Latency::of(&mut samples),
        first_error: first_error.lock().take(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5h").unwrap_err().contains("unit"));
    }

    #[test]
    fn percentiles() {
        let mut v: Vec<u64> = (1..=1000).collect();
        let l = Latency::of(&mut v);
        assert_eq!(
            (l.p50, l.p99, l.p999, l.max, l.mean),
            (500, 990, 999, 1000, 500)
        );
        assert_eq!(Latency::of(&mut []).p50, 0);
    }

    #[test]
    fn payloads_differ_by_nonce_and_seq_and_have_the_size() {
        assert_eq!(payload(1024, 1, 2).len(), 1024);
        assert_ne!(payload(64, 1, 2), payload(64, 1, 3));
        assert_ne!(payload(64, 1, 2), payload(64, 2, 2));
        assert_eq!(payload(64, 1, 2), payload(64, 1, 2));
    }
}
