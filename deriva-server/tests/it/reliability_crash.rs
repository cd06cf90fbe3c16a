//! Crash safety under load: the real `deriva-server` binary, concurrent clients writing leaves
//! and recipes, SIGKILL at a random moment, restart on the same data directory, and checks that
//! every acknowledged put survived byte for byte, that nothing left in `blobs/tmp/` is served,
//! and that `Status` and the storage gauges agree with what is on disk.
//!
//! Bounded form: 5 kills. `DERIVA_LONG=1` runs 10 times as many (`DERIVA_LONG=N`: N times).
//! `DERIVA_SEED=S` replays a run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deriva_core::{CAddr, FunctionId, Params, Recipe};
use deriva_server::proto::deriva_client::DerivaClient;
use deriva_server::proto::{PutLeafRequest, PutRecipeRequest, StatusRequest};
use deriva_testkit::rpc::get_addr;
use deriva_testkit::{Rng, ServerProcess, long_factor, sample};
use futures::StreamExt;
use parking_lot::Mutex;
use tonic::Code;
use tonic::transport::Channel;

/// What the writers did, across every round.
#[derive(Default)]
struct Ledger {
    /// Leaves sent (acknowledged or not), by address.
    attempted_leaves: BTreeSet<CAddr>,
    /// Recipes sent (acknowledged or not), by address.
    attempted_recipes: BTreeSet<CAddr>,
    /// Acknowledged leaves and their bytes.
    leaves: BTreeMap<CAddr, Bytes>,
    /// Acknowledged recipes and the bytes they must materialize to.
    recipes: BTreeMap<CAddr, Bytes>,
    /// Acknowledged puts (duplicates included).
    acks: u64,
}

/// One writer: leaves of random sizes and `concat/v1` recipes over its acknowledged leaves,
/// until `stop`. An error before `killed` fails the test; after it, the writer ends.
async fn writer(
    mut client: DerivaClient<Channel>,
    mut rng: Rng,
    id: u64,
    ledger: Arc<Mutex<Ledger>>,
    killed: Arc<AtomicBool>,
) -> Result<(), String> {
    let concat = FunctionId::new("concat", "v1").unwrap();
    let mut mine: Vec<(CAddr, Bytes)> = Vec::new();
    for seq in 0u64.. {
        if mine.len() >= 2 && rng.chance(35) {
            let a = &mine[rng.below(mine.len() as u64) as usize];
            let b = &mine[rng.below(mine.len() as u64) as usize];
            let recipe = Recipe::new(concat.clone(), vec![a.0, b.0], Params::new()).unwrap();
            let addr = recipe.addr();
            let want: Bytes = [a.1.as_ref(), b.1.as_ref()].concat().into();
            ledger.lock().attempted_recipes.insert(addr);
            let req = PutRecipeRequest {
                function_name: "concat".into(),
                function_version: "v1".into(),
                inputs: vec![
                    Bytes::copy_from_slice(a.0.as_bytes()),
                    Bytes::copy_from_slice(b.0.as_bytes()),
                ],
                params: Default::default(),
            };
            match client.put_recipe(req).await {
                Ok(r) => {
                    let got = r.into_inner().addr;
                    if got.as_ref() != addr.as_bytes() {
                        return Err(format!(
                            "writer {id}: recipe acknowledged under another address"
                        ));
                    }
                    let mut l = ledger.lock();
                    l.recipes.insert(addr, want);
                    l.acks += 1;
                }
                Err(e) if killed.load(Ordering::SeqCst) => {
                    let _ = e;
                    return Ok(());
                }
                Err(e) => {
                    return Err(format!(
                        "writer {id}: PutRecipe failed before the kill: {e}"
                    ));
                }
            }
        } else {
            let size = match rng.below(20) {
                0 => 0,
                1 => 64 * 1024 + rng.below(192 * 1024) as usize,
                _ => rng.below(8 * 1024) as usize,
            };
            let mut data = format!("writer {id} put {seq} ").into_bytes();
            data.extend(rng.bytes(size));
            if size == 0 {
                data.clear();
            }
            let data = Bytes::from(data);
            let addr = CAddr::for_leaf(&data);
            ledger.lock().attempted_leaves.insert(addr);
            match client.put_leaf(PutLeafRequest { data: data.clone() }).await {
                Ok(r) => {
                    if r.into_inner().addr.as_ref() != addr.as_bytes() {
                        return Err(format!(
                            "writer {id}: leaf acknowledged under another address"
                        ));
                    }
                    mine.push((addr, data.clone()));
                    let mut l = ledger.lock();
                    l.leaves.insert(addr, data);
                    l.acks += 1;
                }
                Err(e) if killed.load(Ordering::SeqCst) => {
                    let _ = e;
                    return Ok(());
                }
                Err(e) => return Err(format!("writer {id}: PutLeaf failed before the kill: {e}")),
            }
        }
    }
    Ok(())
}

/// Small leaves, rows of `leaves.redb`: (count, bytes). Read with redb itself while no server
/// has the store open. A row is `last put (8 bytes) ‖ the leaf's bytes`.
fn scan_rows(dir: &Path) -> (u64, u64) {
    let path = dir.join("leaves.redb");
    if !path.exists() {
        return (0, 0);
    }
    let db = redb::Database::open(&path).expect("opening leaves.redb");
    let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
    let table: redb::TableDefinition<&[u8; 32], &[u8]> = redb::TableDefinition::new("leaves");
    let table = txn.open_table(table).unwrap();
    let (mut count, mut bytes) = (0, 0);
    for row in redb::ReadableTable::iter(&table).unwrap() {
        let (_, value) = row.unwrap();
        count += 1;
        bytes += value.value().len() as u64 - 8;
    }
    (count, bytes)
}

/// Blob files under their real addresses: (count, bytes). And the names in `blobs/tmp/`.
fn scan_blobs(dir: &Path) -> (u64, u64, Vec<String>) {
    let blobs = dir.join("blobs");
    let (mut count, mut bytes) = (0, 0);
    let mut tmp = Vec::new();
    let Ok(entries) = std::fs::read_dir(&blobs) else {
        return (0, 0, tmp);
    };
    for shard in entries.map(Result::unwrap) {
        let name = shard.file_name().into_string().unwrap();
        for f in std::fs::read_dir(shard.path()).unwrap().map(Result::unwrap) {
            let fname = f.file_name().into_string().unwrap();
            if name == "tmp" {
                tmp.push(fname);
            } else if fname.len() == 64 && fname.starts_with(&name) {
                count += 1;
                bytes += f.metadata().unwrap().len();
            }
        }
    }
    (count, bytes, tmp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_puts_survive_sigkill_under_load() {
    let rounds = 5 * long_factor();
    let writers = 4u64;
    let mut rng = Rng::from_env("crash campaign");
    let seed = rng.0;
    let data = tempfile::tempdir().unwrap();
    let dir = data.path();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut restarts = Vec::new();
    let mut tmp_seen = 0usize;
    let mut tmp_only: Vec<CAddr> = Vec::new();
    let mut last_scan = (0, 0);

    for round in 0..=rounds {
        let ctx = format!("seed {seed}, round {round}");
        // Rows are counted before the server opens the store (redb's lock is the server's then).
        let (rows, row_bytes) = scan_rows(dir);
        let t0 = Instant::now();
        let mut server = ServerProcess::options().dir(dir).start();
        let mut client = server.client().await;
        if round > 0 {
            restarts.push(t0.elapsed());
        }
        // The store opened cleanly: no temporary file is left, and none is served.
        let (files, file_bytes, tmp) = scan_blobs(dir);
        let (count, bytes) = (files + rows, file_bytes + row_bytes);
        assert!(
            tmp.is_empty(),
            "{ctx}: blobs/tmp/ holds {tmp:?} after the restart"
        );
        for addr in &tmp_only {
            let e = get_addr(&mut client, addr).await.expect_err(&format!(
                "{ctx}: {addr} existed only in blobs/tmp/ yet Get answered it"
            ));
            assert_eq!(e.code(), Code::NotFound, "{ctx}: Get {addr}: {e}");
        }
        // Every acknowledged put is readable, byte for byte.
        let (leaves, recipes, attempted_leaves, attempted_recipes) = {
            let l = ledger.lock();
            (
                l.leaves.clone(),
                l.recipes.clone(),
                l.attempted_leaves.len() as u64,
                l.attempted_recipes.len() as u64,
            )
        };
        let lost: Vec<String> = futures::stream::iter(leaves.iter().chain(recipes.iter()))
            .map(|(addr, want)| {
                let mut client = client.clone();
                async move {
                    match get_addr(&mut client, addr).await {
                        Ok(got) if got == want.as_ref() => None,
                        Ok(got) => {
                            Some(format!("{addr}: {} bytes, want {}", got.len(), want.len()))
                        }
                        Err(e) => Some(format!("{addr}: {e}")),
                    }
                }
            })
            .buffer_unordered(8)
            .filter_map(|x| async move { x })
            .collect()
            .await;
        assert!(
            lost.is_empty(),
            "{ctx}: {} acknowledged puts lost or changed:\n{}\nserver:\n{}",
            lost.len(),
            lost.join("\n"),
            server.stderr()
        );
        // The counts agree with the data.
        let status = client.status(StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(
            status.blob_count, count,
            "{ctx}: Status blobs vs blob files and small-leaf rows ({files} files, {rows} rows)"
        );
        assert!(
            (leaves.len() as u64..=attempted_leaves).contains(&count),
            "{ctx}: {count} blobs, {} acknowledged, {attempted_leaves} sent",
            leaves.len()
        );
        assert!(
            (recipes.len() as u64..=attempted_recipes).contains(&status.recipe_count),
            "{ctx}: {} recipes, {} acknowledged, {attempted_recipes} sent",
            status.recipe_count,
            recipes.len()
        );
        let metrics = server.scrape().await;
        let gauge = |name: &str| sample(&metrics, name).unwrap_or(-1.0);
        assert_eq!(
            gauge("deriva_dag_recipes"),
            status.recipe_count as f64,
            "{ctx}"
        );
        assert_eq!(gauge("deriva_storage_blobs"), count as f64, "{ctx}");
        assert_eq!(gauge("deriva_storage_blob_bytes"), bytes as f64, "{ctx}");
        last_scan = (files, rows);
        if round == rounds {
            break;
        }

        // Load, then SIGKILL at a random moment.
        let killed = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..writers {
            let client = server.client().await;
            let wrng = Rng(rng.next_u64());
            tasks.push(tokio::spawn(writer(
                client,
                wrng,
                round * writers + w,
                ledger.clone(),
                killed.clone(),
            )));
        }
        let at = Duration::from_millis(300 + rng.below(1200));
        tokio::time::sleep(at).await;
        killed.store(true, Ordering::SeqCst);
        server.kill();
        for t in tasks {
            t.await.unwrap().unwrap_or_else(|e| panic!("{ctx}: {e}"));
        }
        // Whatever the kill left in tmp/ must never be served: note the addresses that are
        // only there. Plant one more, a complete file of bytes never put, to be sure the
        // check has something to check.
        let (_, _, tmp) = scan_blobs(dir);
        tmp_seen += tmp.len();
        let planted = format!("never acknowledged, round {round}, seed {seed}");
        let planted_addr = CAddr::for_leaf(planted.as_bytes());
        std::fs::write(
            dir.join("blobs/tmp")
                .join(format!("{}.1.0.tmp", planted_addr.to_hex())),
            &planted,
        )
        .unwrap();
        tmp_only.push(planted_addr);
        for name in tmp {
            let addr: CAddr = name[..64].parse().unwrap();
            let hex = addr.to_hex();
            if !dir.join("blobs").join(&hex[..2]).join(&hex).exists() {
                tmp_only.push(addr);
            }
        }
    }
    let l = ledger.lock();
    let mean = restarts.iter().sum::<Duration>() / restarts.len() as u32;
    let max = restarts.iter().max().unwrap();
    let (files, rows) = last_scan;
    eprintln!(
        "crash campaign: seed {seed}, {rounds} SIGKILLs, {} puts acknowledged ({} leaves, {} recipes distinct), \
         {} distinct sent, 0 lost, {tmp_seen} temporary files left by kills, restart mean {mean:?} max {max:?}; \
         leaves at the end: {rows} small-leaf rows, {files} files",
        l.acks,
        l.leaves.len(),
        l.recipes.len(),
        l.attempted_leaves.len() + l.attempted_recipes.len(),
    );
    assert!(l.acks > 0, "no put was acknowledged");
}
