//! `--verify`: the destination read back, the source looked up in it.

use deriva_core::CAddr;
use deriva_core::DerivaError;
use deriva_core::provenance::Provenance;
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
use futures::{StreamExt as _, TryStreamExt as _};

/// `--verify`: every destination object read back and verified; every source object looked
/// up in the destination. Damage is counted and reported, not a stop. Both sides are read a
/// page at a time.
pub(super) async fn verify(run: &Arc<Migration>, outputs: bool) -> Result<(), MigrateError> {
    let listing = |side: &'static str, what: &'static str| {
        move |e: DerivaError| MigrateError::store(format!("listing the {side}'s {what}"), &e)
    };
    let tiers = match (run.src.outputs(), run.dst.outputs()) {
        (Some(src), Some(dst)) if outputs => Some((src, dst)),
        _ => None,
    };
    run.bar.set_prefix("leaves");
    let mut pages = run.dst.blobs().list_pages(BATCH);
    while let Some(page) = pages
        .try_next()
        .await
        .map_err(listing("destination", "leaves"))?
    {
        futures::stream::iter(page)
            .map(|(addr, size)| verify_leaf(run.clone(), addr, size))
            .buffer_unordered(run.concurrency)
            .try_for_each(|()| async { Ok(()) })
            .await?;
    }
    run.bar.set_prefix("recipes");
    let mut pages = run.dst.recipes().list_pages(BATCH);
    while let Some(page) = pages
        .try_next()
        .await
        .map_err(listing("destination", "recipes"))?
    {
        let addrs = page.into_iter().map(|(addr, _)| addr).collect();
        for_each(run, addrs, verify_recipe).await?;
    }
    if let Some((_, dst)) = tiers {
        run.bar.set_prefix("outputs");
        let mut pages = dst.list_pages(BATCH);
        while let Some(page) = pages
            .try_next()
            .await
            .map_err(listing("destination", "outputs"))?
        {
            run.bar.inc_length(page.len() as u64);
            for_each(run, page, verify_output).await?;
        }
    }

    // Everything of the source is in the destination.
    run.bar.set_prefix("source");
    let leaves = run.src.blobs().list_pages(BATCH).map_ok(|page| {
        let addrs: Vec<CAddr> = page.into_iter().map(|(addr, _)| addr).collect();
        addrs
    });
    let recipes = run
        .src
        .recipes()
        .list_pages(BATCH)
        .map_ok(|page| page.into_iter().map(|(addr, _)| addr).collect());
    for (kind, mut pages) in [
        (ObjectKind::Leaf, leaves.boxed()),
        (ObjectKind::Recipe, recipes.boxed()),
    ] {
        let what = match kind {
            ObjectKind::Leaf => "leaves",
            ObjectKind::Recipe => "recipes",
        };
        while let Some(addrs) = pages.try_next().await.map_err(listing("source", what))? {
            look_up(run, kind, &addrs).await?;
        }
    }
    if let Some((src, _)) = tiers {
        let mut pages = src.list_pages(BATCH);
        while let Some(page) = pages
            .try_next()
            .await
            .map_err(listing("source", "outputs"))?
        {
            run.bar.inc_length(page.len() as u64);
            for_each(run, page, |run, recipe| async move {
                let present = output_in_destination(&run, recipe).await?;
                run.missing_unless(&run.outputs, present, || format!("output of {recipe}"));
                Ok(())
            })
            .await?;
        }
    }
    if let (Some(src), Some(_)) = (run.src.records(), run.dst.records()) {
        run.bar.set_prefix("records");
        let mut pages = src.list_pages(BATCH);
        while let Some(page) = pages
            .try_next()
            .await
            .map_err(listing("source", "records"))?
        {
            run.bar.inc_length(page.len() as u64);
            for_each(run, page, verify_record).await?;
        }
    }
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

/// Counts the objects of `addrs` (a page of the source's) that the destination lacks, in one
/// lookup.
async fn look_up(run: &Migration, kind: ObjectKind, addrs: &[CAddr]) -> Result<(), MigrateError> {
    let absent = absent(run, kind, addrs).await?;
    run.bar.inc((addrs.len() - absent.len()) as u64);
    let counts = match kind {
        ObjectKind::Leaf => &run.leaves,
        ObjectKind::Recipe => &run.recipes,
    };
    for addr in absent {
        run.missing_unless(counts, false, || format!("{} {addr}", kind.name()));
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

async fn verify_leaf(run: Arc<Migration>, addr: CAddr, size: u64) -> Result<(), MigrateError> {
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
    run.checked(&run.outputs, format!("the output of {recipe}"), read, |o| {
        o.bytes.len() as u64
    })
}

/// The source's record of an output, looked up in the destination: the same record there is
/// checked, another one (or a damaged one) failed, none missing.
async fn verify_record(run: Arc<Migration>, provenance: Provenance) -> Result<(), MigrateError> {
    let Some(dst) = run.dst.records() else {
        return Ok(());
    };
    let recipe = provenance.record().recipe;
    let what = || format!("the record of {recipe}");
    match dst.get(recipe).await {
        Ok(Some(there)) if there.signed == provenance.signed => {
            LiveCounters::add(&run.records.checked, 1);
            run.step(0);
        }
        Ok(Some(_)) => {
            run.failed(&run.records, format!("{}: another record", what()));
            run.step(0);
        }
        Ok(None) => run.missing_unless(&run.records, false, what),
        Err(e @ DerivaError::Corrupted { .. }) => {
            run.failed(&run.records, format!("{}: {e}", what()));
            run.step(0);
        }
        Err(e) => return Err(MigrateError::store(format!("reading {}", what()), &e)),
    }
    Ok(())
}
