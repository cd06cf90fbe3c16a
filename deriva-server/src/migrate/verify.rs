//! `--verify`: the destination read back, the source looked up in it.

use deriva_core::CAddr;
use deriva_core::DerivaError;
use std::sync::Arc;

use super::BATCH;
use super::ERRORS_KEPT;
use super::LiveCounters;
use super::MigrateError;
use super::Migration;
use super::ObjectKind;
use super::STREAM_ABOVE;
use super::STREAM_CHUNK;
use super::absent;
use super::for_each;
use super::output_in_destination;
use super::pin_sets;
use futures::TryStreamExt as _;

/// `--verify`: every destination object read back and verified; every source object looked
/// up in the destination. Damage is counted and reported, not a stop.
pub(super) async fn verify(
    run: &Arc<Migration>,
    src_leaves: Vec<CAddr>,
    src_recipes: Vec<(CAddr, u32)>,
    src_outputs: Vec<CAddr>,
) -> Result<(), MigrateError> {
    let list = |what: &'static str, e: DerivaError| {
        MigrateError::store(format!("listing the destination's {what}"), &e)
    };
    let dst_leaves = run
        .dst
        .blobs()
        .list()
        .await
        .map_err(|e| list("leaves", e))?;
    let dst_recipes = run
        .dst
        .recipes()
        .list()
        .await
        .map_err(|e| list("recipes", e))?;
    let dst_outputs = match (run.src.outputs(), run.dst.outputs()) {
        (Some(_), Some(tier)) => tier.list().await.map_err(|e| list("outputs", e))?,
        _ => Vec::new(),
    };
    run.say(format_args!(
        "the destination holds {} leaves, {} recipes, {} outputs",
        dst_leaves.len(),
        dst_recipes.len(),
        dst_outputs.len()
    ));
    run.bar.set_length(
        (dst_leaves.len() + dst_recipes.len() + dst_outputs.len()) as u64
            + (src_leaves.len() + src_recipes.len() + src_outputs.len()) as u64,
    );
    run.bar.set_prefix("leaves");
    for_each(run, dst_leaves, verify_leaf).await?;
    run.bar.set_prefix("recipes");
    let dst_recipes = dst_recipes.into_iter().map(|(a, _)| a).collect();
    for_each(run, dst_recipes, verify_recipe).await?;
    run.bar.set_prefix("outputs");
    for_each(run, dst_outputs, verify_output).await?;

    // Everything of the source is in the destination.
    run.bar.set_prefix("source");
    let src_recipes: Vec<CAddr> = src_recipes.into_iter().map(|(a, _)| a).collect();
    for (kind, addrs) in [
        (ObjectKind::Leaf, &src_leaves),
        (ObjectKind::Recipe, &src_recipes),
    ] {
        for chunk in addrs.chunks(BATCH) {
            let absent = absent(run, kind, chunk).await?;
            run.bar.inc((chunk.len() - absent.len()) as u64);
            for addr in absent {
                let counts = match kind {
                    ObjectKind::Leaf => &run.leaves,
                    ObjectKind::Recipe => &run.recipes,
                };
                run.missing_unless(counts, false, || format!("{} {addr}", kind.name()));
            }
        }
    }
    for_each(run, src_outputs, |run, recipe| async move {
        let present = output_in_destination(&run, recipe).await?;
        run.missing_unless(&run.outputs, present, || format!("output of {recipe}"));
        Ok(())
    })
    .await?;
    let (src_pins, dst_pins) = pin_sets(run).await?;
    for addr in src_pins {
        let present = dst_pins.contains(&addr);
        if present {
            LiveCounters::add(&run.pins.checked, 1);
        }
        run.missing_unless(&run.pins, present, || format!("pin {addr}"));
    }
    Ok(())
}

impl Migration {
    /// Counts an object of the source that the destination lacks, unless `present`.
    fn missing_unless(&self, counts: &LiveCounters, present: bool, what: impl FnOnce() -> String) {
        if !present {
            LiveCounters::add(&counts.missing, 1);
            let mut errors = self.errors.lock();
            if errors.len() < ERRORS_KEPT {
                errors.push(format!("{}: not in the destination", what()));
            }
        }
        self.bar.inc(1);
    }

    /// Counts the outcome of reading one destination object back: verified, or damaged.
    fn checked<T>(
        &self,
        counts: &LiveCounters,
        what: String,
        read: deriva_core::Result<Option<T>>,
        len: impl FnOnce(&T) -> u64,
    ) -> Result<(), MigrateError> {
        match read {
            Ok(Some(value)) => {
                let n = len(&value);
                LiveCounters::add(&counts.checked, 1);
                LiveCounters::add(&counts.bytes, n);
                self.step(n);
            }
            Ok(None) => {
                self.failed(counts, format!("{what}: listed but cannot be read"));
                self.step(0);
            }
            Err(e @ DerivaError::Corrupted { .. }) => {
                self.failed(counts, format!("{what}: {e}"));
                self.step(0);
            }
            Err(e) => return Err(MigrateError::store(format!("reading {what}"), &e)),
        }
        Ok(())
    }
}

async fn verify_leaf(run: Arc<Migration>, addr: CAddr) -> Result<(), MigrateError> {
    let size = run
        .dst
        .blobs()
        .size(addr)
        .await
        .map_err(|e| MigrateError::store(format!("sizing leaf {addr} in the destination"), &e))?
        .unwrap_or(0);
    if size > STREAM_ABOVE {
        // Read through, a chunk at a time; the stream's end says whether the bytes match.
        let read = match run.dst.blobs().get_stream(addr, STREAM_CHUNK).await {
            Ok(Some(chunks)) => chunks
                .try_fold(0u64, |n, chunk| async move { Ok(n + chunk.len() as u64) })
                .await
                .map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        return run.checked(&run.leaves, format!("leaf {addr}"), read, |n| *n);
    }
    let _permit = run
        .budget
        .acquire_many(run.permits(size))
        .await
        .expect("the budget semaphore is never closed");
    let read = run.dst.blobs().get(addr).await;
    run.checked(&run.leaves, format!("leaf {addr}"), read, |b| {
        b.len() as u64
    })
}

async fn verify_recipe(run: Arc<Migration>, addr: CAddr) -> Result<(), MigrateError> {
    let read = run.dst.get_recipe(addr).await;
    if let Ok(Some(stored)) = &read {
        let inputs = stored.recipe.inputs().to_vec();
        let absent = run
            .dst
            .recipes()
            .first_missing_input(inputs, run.dst.blobs().as_ref())
            .await
            .map_err(|e| {
                MigrateError::store(format!("checking the inputs of recipe {addr}"), &e)
            })?;
        if let Some(input) = absent {
            run.failed(
                &run.recipes,
                format!("recipe {addr}: its input {input} is not in the destination"),
            );
            run.step(0);
            return Ok(());
        }
    }
    run.checked(&run.recipes, format!("recipe {addr}"), read, |_| 0)
}

async fn verify_output(run: Arc<Migration>, recipe: CAddr) -> Result<(), MigrateError> {
    let Some(tier) = run.dst.outputs() else {
        return Ok(());
    };
    let read = tier.get(recipe).await;
    run.checked(&run.outputs, format!("the output of {recipe}"), read, |b| {
        b.len() as u64
    })
}
