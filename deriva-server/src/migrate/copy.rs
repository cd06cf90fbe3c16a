//! The copy (and the dry run): leaves, then recipes by depth, then outputs and pins.

use crate::error::code_of;
use deriva_core::CAddr;
use deriva_core::DerivaError;
use deriva_core::Recipe;
use std::collections::BTreeMap;

use super::BATCH;
use super::LiveCounters;
use super::MigrateError;
use super::Migration;
use super::Mode;
use super::ObjectKind;
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

pub(super) async fn copy(
    run: &Arc<Migration>,
    leaves: Vec<CAddr>,
    recipes: Vec<(CAddr, u32)>,
    outputs: Vec<CAddr>,
) -> Result<(), MigrateError> {
    run.bar.set_prefix("leaves");
    for chunk in leaves.chunks(BATCH) {
        // One lookup per batch of what the destination lacks; the rest is skipped.
        let absent = absent(run, ObjectKind::Leaf, chunk).await?;
        let present = (chunk.len() - absent.len()) as u64;
        LiveCounters::add(&run.leaves.skipped, present);
        run.bar.inc(present);
        for_each(run, absent, copy_leaf).await?;
    }
    run.say("leaves done");
    run.bar.set_prefix("recipes");
    copy_recipes(run, recipes).await?;
    run.say("recipes done");
    if !outputs.is_empty() {
        run.bar.set_prefix("outputs");
        for_each(run, outputs, copy_output).await?;
        run.say("outputs done");
    }
    copy_pins(run).await
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

/// Copies one leaf that the destination lacks.
async fn copy_leaf(run: Arc<Migration>, addr: CAddr) -> Result<(), MigrateError> {
    let counts = &run.leaves;
    let dst = run.dst.blobs();
    let size = run
        .src
        .blobs()
        .size(addr)
        .await
        .map_err(|e| MigrateError::store(format!("sizing leaf {addr} in the source"), &e))?;
    let Some(size) = size else {
        run.failed(counts, format!("leaf {addr}: no longer in the source"));
        run.step(0);
        return Ok(());
    };
    if run.mode == Mode::DryRun {
        LiveCounters::add(&counts.copied, 1);
        LiveCounters::add(&counts.bytes, size);
        run.step(size);
        return Ok(());
    }
    if size > STREAM_ABOVE {
        return stream_leaf(run, addr, size).await;
    }
    let _permit = run
        .budget
        .acquire_many(run.permits(size))
        .await
        .expect("the budget semaphore is never closed");
    // The source's read verifies the bytes against the address (a damaged leaf is Corrupted).
    let read = run.src.blobs().get(addr).await;
    let Some(data) = run.source_read(counts, &format!("leaf {addr}"), read)? else {
        return Ok(());
    };
    let len = data.len() as u64;
    // The destination hashes what it writes: the address it returns is that hash.
    let written = dst
        .put(data)
        .await
        .map_err(|e| MigrateError::store(format!("writing leaf {addr} to the destination"), &e))?;
    if written != addr {
        return Err(data_loss(format!(
            "leaf {addr}: the bytes written to the destination hash to {written}"
        )));
    }
    LiveCounters::add(&counts.copied, 1);
    LiveCounters::add(&counts.bytes, len);
    run.step(len);
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

/// Copies recipes level by level, shallowest first, so that each one's inputs are in the
/// destination before it is.
async fn copy_recipes(
    run: &Arc<Migration>,
    recipes: Vec<(CAddr, u32)>,
) -> Result<(), MigrateError> {
    let mut levels: BTreeMap<u32, Vec<CAddr>> = BTreeMap::new();
    for (addr, depth) in recipes {
        levels.entry(depth).or_default().push(addr);
    }
    let counts = &run.recipes;
    for addrs in levels.into_values() {
        for chunk in addrs.chunks(BATCH) {
            let missing = absent(run, ObjectKind::Recipe, chunk).await?;
            let present = (chunk.len() - missing.len()) as u64;
            LiveCounters::add(&counts.skipped, present);
            run.bar.inc(present);
            if run.mode == Mode::DryRun {
                LiveCounters::add(&counts.copied, missing.len() as u64);
                run.bar.inc(missing.len() as u64);
                continue;
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
                continue;
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
    let len = output.len() as u64;
    if run.mode == Mode::Copy {
        dst.put(recipe, output).await.map_err(|e| {
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
