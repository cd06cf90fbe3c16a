//! The copy (and the dry run): leaves, then recipes by depth, then outputs, materialization
//! records and pins.

use crate::error::code_of;
use bytes::Bytes;
use deriva_core::CAddr;
use deriva_core::DerivaError;
use deriva_core::Recipe;
use deriva_core::provenance::Provenance;
use std::collections::HashSet;

use super::BATCH;
use super::LiveCounters;
use super::MigrateError;
use super::Migration;
use super::Mode;
use super::ObjectKind;
use super::SMALL_BATCH_BYTES;
use super::STREAM_ABOVE;
use super::STREAM_CHUNK;
use super::STREAM_MEMORY;
use super::absent;
use super::data_loss;
use super::for_each;
use super::output_in_destination;
use super::pin_sets;
use futures::{StreamExt as _, TryStreamExt as _};
use std::sync::Arc;
use tonic::Code;

pub(super) async fn copy(run: &Arc<Migration>, outputs: bool) -> Result<(), MigrateError> {
    run.bar.set_prefix("leaves");
    let mut leaves = run.src.blobs().list_pages(BATCH);
    while let Some(page) = leaves.try_next().await.map_err(listing("leaves"))? {
        copy_leaf_page(run, page).await?;
    }
    run.say("leaves done");
    run.bar.set_prefix("recipes");
    let mut recipes = run.src.recipes().list_pages(BATCH);
    while let Some(page) = recipes.try_next().await.map_err(listing("recipes"))? {
        copy_recipe_page(run, page.into_iter().map(|(addr, _)| addr).collect()).await?;
    }
    run.say("recipes done");
    if let Some(tier) = run.src.outputs().filter(|_| outputs) {
        run.bar.set_prefix("outputs");
        let mut pages = tier.list_pages(BATCH);
        while let Some(page) = pages.try_next().await.map_err(listing("output tier"))? {
            run.bar.inc_length(page.len() as u64);
            for_each(run, page, copy_output).await?;
        }
        run.say("outputs done");
    }
    if let Some(records) = run.src.records().filter(|_| run.dst.records().is_some()) {
        run.bar.set_prefix("records");
        let mut pages = records.list_pages(BATCH);
        while let Some(page) = pages.try_next().await.map_err(listing("records"))? {
            run.bar.inc_length(page.len() as u64);
            for_each(run, page, copy_record).await?;
        }
        run.say("records done");
    }
    copy_pins(run).await
}

/// Copies one materialization record, unless the destination has the same (an output copied
/// with its record, or an earlier run). Its audits start again in the destination.
async fn copy_record(run: Arc<Migration>, provenance: Provenance) -> Result<(), MigrateError> {
    let counts = &run.records;
    let recipe = provenance.record().recipe;
    let Some(dst) = run.dst.records() else {
        return Ok(());
    };
    let there = dst.get(recipe).await.map_err(|e| {
        MigrateError::store(
            format!("looking up the record of {recipe} in the destination"),
            &e,
        )
    })?;
    if there.is_some_and(|there| there.signed == provenance.signed) {
        LiveCounters::add(&counts.skipped, 1);
        run.step(0);
        return Ok(());
    }
    if run.mode == Mode::Copy {
        dst.put(&provenance.signed).await.map_err(|e| {
            MigrateError::store(
                format!("writing the record of {recipe} to the destination"),
                &e,
            )
        })?;
    }
    LiveCounters::add(&counts.copied, 1);
    run.step(0);
    Ok(())
}

/// One page of the source's leaves (with their sizes): what the destination lacks (one
/// lookup), then the small ones in batches, the large ones streamed one by one.
async fn copy_leaf_page(run: &Arc<Migration>, page: Vec<(CAddr, u64)>) -> Result<(), MigrateError> {
    let addrs: Vec<CAddr> = page.iter().map(|(addr, _)| *addr).collect();
    let lacking: HashSet<CAddr> = absent(run, ObjectKind::Leaf, &addrs)
        .await?
        .into_iter()
        .collect();
    let present = (page.len() - lacking.len()) as u64;
    LiveCounters::add(&run.leaves.skipped, present);
    run.bar.inc(present);
    let (large, small): (Vec<_>, Vec<_>) = page
        .into_iter()
        .filter(|(addr, _)| lacking.contains(addr))
        .partition(|(_, size)| *size > STREAM_ABOVE);
    if run.mode == Mode::DryRun {
        let (n, bytes) = (
            lacking.len() as u64,
            large.iter().chain(&small).map(|(_, size)| size).sum(),
        );
        LiveCounters::add(&run.leaves.copied, n);
        LiveCounters::add(&run.leaves.bytes, bytes);
        run.steps(n, bytes);
        return Ok(());
    }
    // Small leaves in batches of at most SMALL_BATCH_BYTES, two batches at a time: one is read
    // while the other is written.
    let mut batches: Vec<Vec<(CAddr, u64)>> = Vec::new();
    let mut bytes = 0u64;
    for leaf in small {
        if batches.is_empty() || bytes + leaf.1 > SMALL_BATCH_BYTES {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += leaf.1;
        batches.last_mut().expect("a batch was pushed").push(leaf);
    }
    futures::stream::iter(batches)
        .map(|batch| copy_small_leaves(run, batch))
        .buffer_unordered(2)
        .try_for_each(|()| async { Ok(()) })
        .await?;
    futures::stream::iter(large)
        .map(|(addr, size)| stream_leaf(run.clone(), addr, size))
        .buffer_unordered(run.concurrency)
        .try_for_each(|()| async { Ok(()) })
        .await
}

/// Copies a batch of small leaves the destination lacks: read from the source at most
/// `--concurrency` at a time (each read verifies), then written with one
/// [`BlobStore::put_many`](deriva_store::BlobStore::put_many) (one multi-row `INSERT` on the
/// remote backend, one group of commits on the local one). Its bytes are held against the
/// budget until they are written.
async fn copy_small_leaves(
    run: &Arc<Migration>,
    batch: Vec<(CAddr, u64)>,
) -> Result<(), MigrateError> {
    let counts = &run.leaves;
    let total: u64 = batch.iter().map(|(_, size)| size).sum();
    let _permit = run
        .budget
        .acquire_many(run.permits(total))
        .await
        .expect("the budget semaphore is never closed");
    let read: Vec<(CAddr, deriva_core::Result<Option<Bytes>>)> = futures::stream::iter(batch)
        .map(|(addr, _)| async move { (addr, run.src.blobs().get(addr).await) })
        .buffered(run.concurrency)
        .collect()
        .await;
    let mut addrs = Vec::with_capacity(read.len());
    let mut data = Vec::with_capacity(read.len());
    for (addr, read) in read {
        // The source's read verifies the bytes against the address (a damaged leaf is
        // Corrupted); one gone since the listing is counted as failed.
        if let Some(bytes) = run.source_read(counts, &format!("leaf {addr}"), read)? {
            addrs.push(addr);
            data.push(bytes);
        }
    }
    if data.is_empty() {
        return Ok(());
    }
    let len: u64 = data.iter().map(|d| d.len() as u64).sum();
    // The destination hashes what it writes: the addresses it returns are those hashes.
    let written = run
        .dst
        .blobs()
        .put_many(data)
        .await
        .map_err(|e| MigrateError::store("writing leaves to the destination", &e))?;
    if let Some((addr, written)) = addrs.iter().zip(&written).find(|(a, w)| a != w) {
        return Err(data_loss(format!(
            "leaf {addr}: the bytes written to the destination hash to {written}"
        )));
    }
    LiveCounters::add(&counts.copied, addrs.len() as u64);
    LiveCounters::add(&counts.bytes, len);
    run.steps(addrs.len() as u64, len);
    Ok(())
}

/// An error of a listing of the source.
fn listing(what: &'static str) -> impl Fn(DerivaError) -> MigrateError {
    move |e| MigrateError::store(format!("listing the source's {what}"), &e)
}

/// Pins the destination's copies of what the source pins (last: a pin names something that
/// must be there).
async fn copy_pins(run: &Migration) -> Result<(), MigrateError> {
    let (src, dst) = pin_sets(run).await?;
    for addr in src {
        if dst.contains(&addr) {
            LiveCounters::add(&run.pins.skipped, 1);
        } else if run.mode == Mode::DryRun {
            LiveCounters::add(&run.pins.copied, 1);
        } else {
            match run.dst.pin(addr).await {
                Ok(_) => LiveCounters::add(&run.pins.copied, 1),
                Err(e) if code_of(&e) == Code::Unavailable => {
                    return Err(MigrateError::store(format!("pinning {addr}"), &e));
                }
                Err(e) => run.failed(&run.pins, format!("pin {addr}: {e}")),
            }
        }
    }
    Ok(())
}

/// Copies a large leaf as a stream: the source's read hashes it as it goes (a damaged source
/// ends the stream with an error, which stops the write), and the destination's write hashes
/// it again and commits only if it matches the address.
async fn stream_leaf(run: Arc<Migration>, addr: CAddr, size: u64) -> Result<(), MigrateError> {
    let counts = &run.leaves;
    let _permit = run
        .budget
        .acquire_many(run.permits(size.min(STREAM_MEMORY)))
        .await
        .expect("the budget semaphore is never closed");
    let read = run.src.blobs().get_stream(addr, STREAM_CHUNK).await;
    let Some(chunks) = run.source_read(counts, &format!("leaf {addr}"), read)? else {
        return Ok(());
    };
    match run.dst.blobs().put_stream(addr, chunks).await {
        Ok(()) => {}
        Err(e @ DerivaError::Corrupted { .. }) => {
            return Err(data_loss(format!("leaf {addr}: {e}")));
        }
        Err(e) => {
            return Err(MigrateError::store(
                format!("streaming leaf {addr} to the destination"),
                &e,
            ));
        }
    }
    LiveCounters::add(&counts.copied, 1);
    LiveCounters::add(&counts.bytes, size);
    run.step(size);
    Ok(())
}

/// Copies one page of the source's recipes, in the listing's order of depth: every recipe's
/// inputs are in the destination before it is (leaves were copied first; recipes of lower
/// depth came on earlier pages or earlier in this one). One lookup of what the destination
/// lacks, the reads at most `--concurrency` at a time, one batch of puts.
async fn copy_recipe_page(run: &Arc<Migration>, addrs: Vec<CAddr>) -> Result<(), MigrateError> {
    let counts = &run.recipes;
    let missing = absent(run, ObjectKind::Recipe, &addrs).await?;
    let present = (addrs.len() - missing.len()) as u64;
    LiveCounters::add(&counts.skipped, present);
    run.bar.inc(present);
    if run.mode == Mode::DryRun {
        LiveCounters::add(&counts.copied, missing.len() as u64);
        run.bar.inc(missing.len() as u64);
        return Ok(());
    }
    let read: Vec<(CAddr, Option<Recipe>)> = futures::stream::iter(missing)
        .map(|addr| {
            let run = run.clone();
            async move {
                match run.src.get_recipe(addr).await {
                    Ok(found) => Ok((addr, found.map(|s| s.recipe))),
                    Err(e @ DerivaError::Corrupted { .. }) => {
                        Err(data_loss(format!("recipe {addr} in the source: {e}")))
                    }
                    Err(e) => Err(MigrateError::store(
                        format!("reading recipe {addr} from the source"),
                        &e,
                    )),
                }
            }
        })
        .buffered(run.concurrency)
        .try_collect()
        .await?;
    let mut batch = Vec::with_capacity(read.len());
    for (addr, recipe) in read {
        match recipe {
            Some(recipe) => batch.push(recipe),
            None => {
                run.failed(counts, format!("recipe {addr}: no longer in the source"));
                run.bar.inc(1);
            }
        }
    }
    if batch.is_empty() {
        return Ok(());
    }
    let n = batch.len() as u64;
    match run.dst.put_recipes(batch.clone()).await {
        Ok(_) => {
            LiveCounters::add(&counts.copied, n);
            run.bar.inc(n);
        }
        // An input failed to copy: write the others one by one.
        Err(DerivaError::MissingInput { .. }) => {
            for recipe in batch {
                put_one_recipe(run, recipe).await?;
            }
        }
        Err(e) => {
            return Err(MigrateError::store(
                "writing recipes to the destination",
                &e,
            ));
        }
    }
    Ok(())
}

async fn put_one_recipe(run: &Migration, recipe: Recipe) -> Result<(), MigrateError> {
    let addr = recipe.addr();
    match run.dst.put_recipe(recipe).await {
        Ok(_) => LiveCounters::add(&run.recipes.copied, 1),
        Err(DerivaError::MissingInput { input }) => run.failed(
            &run.recipes,
            format!("recipe {addr}: its input {input} is not in the destination"),
        ),
        Err(e) => {
            return Err(MigrateError::store(
                format!("writing recipe {addr} to the destination"),
                &e,
            ));
        }
    }
    run.bar.inc(1);
    Ok(())
}

async fn copy_output(run: Arc<Migration>, recipe: CAddr) -> Result<(), MigrateError> {
    let counts = &run.outputs;
    let (Some(src), Some(dst)) = (run.src.outputs(), run.dst.outputs()) else {
        return Ok(());
    };
    if output_in_destination(&run, recipe).await? {
        LiveCounters::add(&counts.skipped, 1);
        run.step(0);
        return Ok(());
    }
    let read = src.get(recipe).await;
    let Some(output) = run.source_read(counts, &format!("the output of {recipe}"), read)? else {
        return Ok(());
    };
    let len = output.bytes.len() as u64;
    if run.mode == Mode::Copy {
        // With the record it was stored with (its audits start again in the destination).
        let put = dst.put(recipe, output.bytes, output.record.as_ref());
        put.await.map_err(|e| {
            MigrateError::store(
                format!("writing the output of {recipe} to the destination"),
                &e,
            )
        })?;
    }
    LiveCounters::add(&counts.copied, 1);
    LiveCounters::add(&counts.bytes, len);
    run.step(len);
    Ok(())
}
