//! Real recipes for `scripts/scale/`, as PostgreSQL `COPY … FROM STDIN` text (the default text
//! format: tab-separated, `\\x` hex for `bytea`).
//!
//! ```text
//! cargo run --release -p deriva-core --example scale-fill -- LEAVES RECIPES TABLE
//! ```
//!
//! TABLE is `recipes` (columns `addr, encoding, depth`), `edges` (`input, recipe`) or `pins`
//! (`addr`); the three runs with the same LEAVES and RECIPES describe the same recipes, so a
//! script pipes each into its table. The leaves are those the script writes itself with
//! `generate_series(1, LEAVES)`: leaf `i` has the 32-byte big-endian `i` as its address (they
//! have no bytes; only the index knows them).
//!
//! The recipes, all `concat/v1` with two distinct inputs and a param `n` that makes each one
//! unique:
//! - 80 % at depth 1, over two leaves drawn from the first 3 % of the leaves (a few leaves are
//!   shared inputs, as in a real store where most leaves are inputs of nothing);
//! - 15 % at depth 2, over two recipes of depth 1;
//! - the rest at depth 3, over two recipes of depth 2.
//!
//! `pins` pins every 100th recipe of depth 3, the first included (and so everything below it). The generator holds
//! the addresses of the recipes of depths 1 and 2 (32 bytes each: 32 MB at a million recipes),
//! never the output.

use std::io::{self, BufWriter, Write};
use std::process::ExitCode;

use deriva_core::{CAddr, FunctionId, Recipe};

/// A well-mixed 64-bit function of `x` (SplitMix64's finaliser), for picking inputs
/// deterministically.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Two distinct indices below `n` (at least 2), picked by `k`.
fn two(k: u64, n: u64) -> (u64, u64) {
    let a = mix(k) % n;
    let b = (a + 1 + mix(k ^ 0x5555_5555) % (n - 1)) % n;
    (a, b)
}

/// The address of leaf `i` (1-based), as the script's `decode(lpad(to_hex(i), 64, '0'), 'hex')`.
fn leaf(i: u64) -> CAddr {
    let mut bytes = [0u8; 32];
    bytes[24..].copy_from_slice(&i.to_be_bytes());
    CAddr::from_bytes(bytes)
}

fn usage(why: &str) -> ExitCode {
    eprintln!("scale-fill: {why}\nusage: scale-fill LEAVES RECIPES recipes|edges|pins");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [leaves, recipes, table] = args.as_slice() else {
        return usage("three arguments expected");
    };
    let (Ok(leaves), Ok(recipes)) = (leaves.parse::<u64>(), recipes.parse::<u64>()) else {
        return usage("LEAVES and RECIPES are counts");
    };
    let table = table.as_str();
    if !matches!(table, "recipes" | "edges" | "pins") {
        return usage(&format!("unknown table {table:?}"));
    }
    let inputs = (leaves * 3 / 100).max(2);
    let depth1 = recipes * 80 / 100;
    let depth2 = recipes * 15 / 100;
    if leaves < 2 || depth1 < 2 || depth2 < 2 {
        return usage("at least 2 leaves and 14 recipes");
    }
    match write(table, inputs, depth1, depth2, recipes) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (psql failed): its own error says why.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("scale-fill: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write(table: &str, inputs: u64, depth1: u64, depth2: u64, recipes: u64) -> io::Result<()> {
    let concat = FunctionId::new("concat", "v1").expect("a valid function id");
    let mut out = BufWriter::with_capacity(1 << 20, io::stdout().lock());
    let mut below: Vec<CAddr> = Vec::new();
    let mut level: Vec<CAddr> = Vec::with_capacity(depth1 as usize);
    for k in 0..recipes {
        let depth = if k < depth1 {
            1
        } else if k < depth1 + depth2 {
            2
        } else {
            3
        };
        if k == depth1 || k == depth1 + depth2 {
            below = std::mem::take(&mut level);
        }
        let (a, b) = if depth == 1 {
            let (a, b) = two(k, inputs);
            (leaf(a + 1), leaf(b + 1))
        } else {
            let (a, b) = two(k, below.len() as u64);
            (below[a as usize], below[b as usize])
        };
        let recipe = Recipe::new(concat.clone(), vec![a, b], [("n", k.to_string())])
            .expect("a valid recipe");
        let addr = recipe.addr();
        if depth < 3 {
            level.push(addr);
        }
        match table {
            "recipes" => writeln!(
                out,
                "\\\\x{}\t\\\\x{}\t{depth}",
                addr.to_hex(),
                hex::encode(recipe.canonical_bytes())
            )?,
            "edges" => {
                for input in [a, b] {
                    writeln!(out, "\\\\x{}\t\\\\x{}", input.to_hex(), addr.to_hex())?;
                }
            }
            _ if depth == 3 && (k - depth1 - depth2).is_multiple_of(100) => {
                writeln!(out, "\\\\x{}", addr.to_hex())?
            }
            _ => {}
        }
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_picks_distinct_indices_in_range() {
        for n in [2, 3, 10, 1000] {
            for k in 0..10_000 {
                let (a, b) = two(k, n);
                assert!(a < n && b < n && a != b, "{k} {n}: {a} {b}");
            }
        }
    }

    #[test]
    fn leaf_addresses_are_big_endian_counters() {
        assert_eq!(leaf(1).to_hex(), format!("{}01", "0".repeat(62)));
        assert_eq!(leaf(256).to_hex(), format!("{}0100", "0".repeat(60)));
    }
}
