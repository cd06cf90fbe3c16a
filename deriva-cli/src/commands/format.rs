//! The `format_*` functions: each server answer as the text `deriva` prints.

use std::fmt::Write as _;

use deriva_core::CAddr;
use deriva_proto::{
    CascadeInvalidateResponse, ClusterStatusResponse, GcResponse, InvalidateResponse,
    ResolveResponse, StatusResponse, VerifyResponse,
};

/// Lowercase hex of raw bytes (for a 32-byte address, the same as `CAddr`'s `Display`).
fn hex(raw: &[u8]) -> String {
    raw.iter()
        .fold(String::with_capacity(raw.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// `ResolveResponse` as text: `function:`, `version:`, `inputs:` and `params:` (sorted by
/// key), one item per indented line; or a line saying the address is not a recipe.
pub fn format_resolve(addr: &CAddr, r: &ResolveResponse) -> String {
    if !r.found {
        return format!("{addr}: not a recipe (a leaf, or an address the server does not know)\n");
    }
    let mut out = format!(
        "function: {}\nversion: {}\n",
        r.function_name, r.function_version
    );
    if r.inputs.is_empty() {
        out.push_str("inputs: (none)\n");
    } else {
        out.push_str("inputs:\n");
        for input in &r.inputs {
            let _ = writeln!(out, "  {}", hex(input));
        }
    }
    if r.params.is_empty() {
        out.push_str("params: (none)\n");
    } else {
        out.push_str("params:\n");
        let mut params: Vec<_> = r.params.iter().collect();
        params.sort();
        for (k, v) in params {
            let _ = writeln!(out, "  {k}={v}");
        }
    }
    out
}

/// `InvalidateResponse` as `was_cached:` and `evicted_count:` lines.
pub fn format_invalidate(r: &InvalidateResponse) -> String {
    format!(
        "was_cached: {}\nevicted_count: {}\n",
        r.was_cached, r.evicted_count
    )
}

/// `CascadeInvalidateResponse` as `key: value` lines (`dry_run: true` first for a dry run),
/// then the evicted addresses, if the server listed them, one per line after `evicted:`.
pub fn format_cascade(r: &CascadeInvalidateResponse, dry_run: bool) -> String {
    let mut out = String::new();
    if dry_run {
        out.push_str("dry_run: true\n");
    }
    let _ = write!(
        out,
        "evicted_count: {}\ntraversed_count: {}\nmax_depth: {}\nbytes_reclaimed: {}\n",
        r.evicted_count, r.traversed_count, r.max_depth, r.bytes_reclaimed
    );
    if !r.evicted_addrs.is_empty() {
        out.push_str("evicted:\n");
        for raw in &r.evicted_addrs {
            let _ = writeln!(out, "  {}", hex(raw));
        }
    }
    out
}

/// `GcResponse` as `key: value` lines in the proto's order, `dry_run:` first (for a dry run
/// with a note that nothing was removed and the counts are what would be); with `detail`, the
/// removed addresses after `removed:` (`would_remove:` in a dry run), one per line, or
/// `(none)`; a line says so when the server listed only the first ones.
pub fn format_gc(r: &GcResponse, detail: bool) -> String {
    let mut out = if r.dry_run {
        "dry_run: true (nothing was removed: the counts are what would be removed)\n".to_owned()
    } else {
        "dry_run: false\n".to_owned()
    };
    let _ = write!(
        out,
        "blobs_removed: {}\nrecipes_removed: {}\ncache_entries_removed: {}\n\
         bytes_reclaimed_blobs: {}\nbytes_reclaimed_cache: {}\ntotal_bytes_reclaimed: {}\n\
         live_blobs: {}\nlive_recipes: {}\npinned_count: {}\nduration_micros: {}\n",
        r.blobs_removed,
        r.recipes_removed,
        r.cache_entries_removed,
        r.bytes_reclaimed_blobs,
        r.bytes_reclaimed_cache,
        r.total_bytes_reclaimed,
        r.live_blobs,
        r.live_recipes,
        r.pinned_count,
        r.duration_micros,
    );
    if detail {
        let header = if r.dry_run { "would_remove" } else { "removed" };
        if r.removed_addrs.is_empty() {
            let _ = writeln!(out, "{header}: (none)");
        } else {
            let _ = writeln!(out, "{header}:");
            for raw in &r.removed_addrs {
                let _ = writeln!(out, "  {}", hex(raw));
            }
            if r.removed_addrs_truncated {
                let _ = writeln!(
                    out,
                    "  (the first {} only: the counts above cover them all)",
                    r.removed_addrs.len()
                );
            }
        }
    }
    out
}

/// `ClusterStatusResponse`: one line per node (name, state, role, gRPC address, uptime,
/// cache entries and bytes, blobs, load per CPU), then the counts by state.
pub fn format_cluster(r: &ClusterStatusResponse) -> String {
    let mut out = String::new();
    for n in &r.nodes {
        let _ = writeln!(
            out,
            "{} {} {} {} up {}s cache {} entries {} B blobs {} load {:.2}",
            n.name,
            n.state,
            n.role,
            n.grpc_addr,
            n.uptime_secs,
            n.cache_entries,
            n.cache_bytes,
            n.blob_count,
            n.cpu_load
        );
    }
    let _ = writeln!(
        out,
        "alive: {}, suspect: {}, dead: {}",
        r.alive_count, r.suspect_count, r.dead_count
    );
    out
}

/// Every field of `StatusResponse`, one `key: value` per line, in the proto's order.
pub fn format_status(s: &StatusResponse) -> String {
    format!(
        "recipe_count: {}\nblob_count: {}\ncache_entries: {}\ncache_size_bytes: {}\n\
         cache_hit_rate: {}\nverification_mode: {}\nverification_total: {}\n\
         verification_passed: {}\nverification_failed: {}\nverification_failure_rate: {}\n",
        s.recipe_count,
        s.blob_count,
        s.cache_entries,
        s.cache_size_bytes,
        s.cache_hit_rate,
        s.verification_mode,
        s.verification_total,
        s.verification_passed,
        s.verification_failed,
        s.verification_failure_rate,
    )
}

/// `VerifyResponse` as `deterministic:`, `output_hash:`, `output_size:` and `compute_time_us:`
/// lines, plus `error:` when the server gave one.
pub fn format_verify(v: &VerifyResponse) -> String {
    let mut out = format!(
        "deterministic: {}\noutput_hash: {}\noutput_size: {}\ncompute_time_us: {}\n",
        v.deterministic, v.output_hash, v.output_size, v.compute_time_us
    );
    if !v.error.is_empty() {
        let _ = writeln!(out, "error: {}", v.error.replace('\n', " "));
    }
    out
}
