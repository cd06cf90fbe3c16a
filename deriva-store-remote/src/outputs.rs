//! [`ObjectOutputs`]: the shared output tier in the object store, at `outputs/<recipe hex>`.
//!
//! An output has no address of its own to check against, and its key is only where it was put:
//! anyone who may write to the bucket could copy one recipe's output under another's key. So
//! each object opens with a header that names the recipe it is the output of, and the hash of
//! the output:
//!
//! | bytes | what |
//! |---|---|
//! | 0..4 | [`MAGIC`], `DRVO` |
//! | 4 | [`VERSION`], 1 |
//! | 5..37 | the recipe address |
//! | 37..69 | the BLAKE3 hash of the output |
//! | 69.. | the output |
//!
//! A read checks both: an object that names another recipe (moved or copied) or whose bytes do
//! not match their hash is [`DerivaError::Corrupted`], never data, and the executor computes
//! the output again and overwrites it. An object in another format (the header before this one
//! was the hash alone, with no magic; or a version this build does not know) is a miss: the
//! tier is a cache, so the output is computed and the object replaced. This does not stop a
//! writer who forges a whole object (the header is not a signature); it keeps an object from
//! answering for a recipe it was not computed for.
//!
//! The index knows which outputs the tier holds: a row of `outputs(recipe, size, hash,
//! written_at)` (migration 6) per object. Whether an output is there is asked of PostgreSQL,
//! never of the object store, so a fresh recipe costs no object-store request that misses. A
//! put writes the object and then its row (a row always names an object that is there); a
//! delete removes the row and then the object. An object without a row (written before the
//! table existed, or whose row was lost with a crash between the two) is a miss: the output is
//! computed again and written with its row. `list` still lists the objects (for
//! `deriva-server migrate`).
//!
//! The row's `size` is also the output's recorded size ([`OutputSizes`]) for the memory
//! budget's up-front check, written with the output at no extra cost. The engine asks for it
//! just before it asks for the output; so that this costs no second round trip, the answer
//! (the row, or none) is kept for the next `get` or `contains` of that recipe, once, within
//! [`ANSWER_KEPT`].

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use deriva_core::error::Result;
use deriva_core::{CAddr, DerivaError};
use deriva_store::{OutputSizes, OutputStore};

use crate::objects::Objects;
use crate::pg::{Call, Pg};

/// The first bytes of every output-tier object.
const MAGIC: [u8; 4] = *b"DRVO";
/// The version of the header laid out in the module docs.
const VERSION: u8 = 1;
const HASH_LEN: usize = 32;
/// Magic, version, recipe address, output hash.
const HEADER_LEN: usize = MAGIC.len() + 1 + HASH_LEN + HASH_LEN;

/// How long the index's answer about a recipe's output ([`OutputSizes::recorded`]) stands in
/// for the next `get` or `contains` of it.
pub const ANSWER_KEPT: std::time::Duration = std::time::Duration::from_secs(1);

/// The most answers kept at once (beyond it, the oldest are dropped).
const ANSWERS: usize = 256;

/// An answer of the index about a recipe's output: the recipe, the output's size if it has a
/// row, and when it was asked.
type Answer = (CAddr, Option<u64>, std::time::Instant);

/// Computed outputs in the object store, indexed in PostgreSQL.
#[derive(Debug, Clone)]
pub struct ObjectOutputs {
    objects: Arc<Objects>,
    pg: Arc<Pg>,
    /// The index's latest answers (the output's size, or none), for one next question each.
    answers: Arc<parking_lot::Mutex<Vec<Answer>>>,
}

impl ObjectOutputs {
    pub(crate) fn new(objects: Arc<Objects>, pg: Arc<Pg>) -> Self {
        Self {
            objects,
            pg,
            answers: Arc::default(),
        }
    }

    /// The size the index records for the output of `recipe`, if it has a row.
    async fn indexed_size(&self, recipe: &CAddr) -> Result<Option<u64>> {
        const FIND: Call = Call {
            op: "find_output",
            operation: "SELECT",
            table: "outputs",
            context: "looking up a stored output",
        };
        let key = recipe.as_bytes().to_vec();
        let row = self
            .pg
            .query_opt(
                FIND,
                "SELECT size FROM {s}.outputs WHERE recipe = $1",
                &[&key],
            )
            .await?;
        Ok(row.map(|r| r.get::<_, i64>(0).max(0) as u64))
    }

    /// Whether the index has a row for the output of `recipe`: the answer kept from
    /// [`OutputSizes::recorded`] if it is recent, else a query.
    async fn indexed(&self, recipe: &CAddr) -> Result<bool> {
        let kept = {
            let mut answers = self.answers.lock();
            let at = answers.iter().position(|(r, _, _)| r == recipe);
            at.map(|i| answers.swap_remove(i))
        };
        match kept {
            Some((_, size, at)) if at.elapsed() < ANSWER_KEPT => Ok(size.is_some()),
            _ => Ok(self.indexed_size(recipe).await?.is_some()),
        }
    }

    /// Deletes the row of the output of `recipe`.
    async fn unindex(&self, recipe: &CAddr) -> Result<()> {
        const DELETE: Call = Call {
            op: "delete_output",
            operation: "DELETE",
            table: "outputs",
            context: "deleting a stored output's row",
        };
        let key = recipe.as_bytes().to_vec();
        self.pg
            .query(DELETE, "DELETE FROM {s}.outputs WHERE recipe = $1", &[&key])
            .await?;
        Ok(())
    }
}

/// The object that stores `output` as the output of `recipe`.
fn encode(recipe: &CAddr, output: &[u8]) -> Bytes {
    let mut object = BytesMut::with_capacity(HEADER_LEN + output.len());
    object.put_slice(&MAGIC);
    object.put_u8(VERSION);
    object.put_slice(recipe.as_bytes());
    object.put_slice(blake3::hash(output).as_bytes());
    object.put_slice(output);
    object.freeze()
}

/// What an object read at the key of `recipe` holds: its output, checked; `Ok(None)` if it is
/// in another format (a miss); [`DerivaError::Corrupted`] (whose detail says what is wrong, to
/// follow `where_` in the message) if it is the output of another recipe, or damaged.
fn decode(recipe: &CAddr, object: Bytes, where_: &str) -> Result<Option<Bytes>> {
    let damaged = |detail: String| DerivaError::Corrupted {
        addr: *recipe,
        detail: format!("the stored output in {where_}: {detail}"),
    };
    if !object.starts_with(&MAGIC) {
        tracing::debug!(%recipe, "an output-tier object in the format before its header had a version: a miss");
        return Ok(None);
    }
    if object.len() < HEADER_LEN {
        return Err(damaged(format!(
            "{} bytes, shorter than its {HEADER_LEN}-byte header",
            object.len()
        )));
    }
    let version = object[MAGIC.len()];
    if version != VERSION {
        tracing::debug!(%recipe, version, "an output-tier object of an unknown version: a miss");
        return Ok(None);
    }
    let fields = &object[MAGIC.len() + 1..HEADER_LEN];
    let (named, hash) = fields.split_at(HASH_LEN);
    let named = CAddr::from_slice(named).map_err(|e| damaged(format!("its header: {e}")))?;
    if named != *recipe {
        return Err(damaged(format!(
            "it is the output of recipe {named}, not of this one"
        )));
    }
    let output = object.slice(HEADER_LEN..);
    if blake3::hash(&output).as_bytes()[..] != hash[..] {
        return Err(damaged(format!(
            "its {} bytes do not match their hash",
            output.len()
        )));
    }
    Ok(Some(output))
}

#[async_trait]
impl OutputStore for ObjectOutputs {
    /// The index first: without a row, a miss that asks the object store nothing.
    async fn get(&self, recipe: CAddr) -> Result<Option<deriva_store::StoredOutput>> {
        if !self.indexed(&recipe).await? {
            return Ok(None);
        }
        let Some(object) = self.objects.get(&self.objects.output_key(&recipe)).await? else {
            return Ok(None);
        };
        Ok(
            decode(&recipe, object, self.objects.name())?.map(|bytes| deriva_store::StoredOutput {
                bytes,
                record: None,
            }),
        )
    }

    /// The object, then its row.
    async fn put(
        &self,
        recipe: CAddr,
        output: Bytes,
        _record: Option<&deriva_core::SignedRecord>,
    ) -> Result<()> {
        const INDEX: Call = Call {
            op: "put_output",
            operation: "INSERT",
            table: "outputs",
            context: "recording a stored output",
        };
        self.objects
            .overwrite(&self.objects.output_key(&recipe), encode(&recipe, &output))
            .await?;
        let key = recipe.as_bytes().to_vec();
        let (size, hash) = (
            output.len() as i64,
            blake3::hash(&output).as_bytes().to_vec(),
        );
        self.pg
            .query(
                INDEX,
                "INSERT INTO {s}.outputs (recipe, size, hash) VALUES ($1, $2, $3)
                 ON CONFLICT (recipe) DO UPDATE
                 SET size = excluded.size, hash = excluded.hash, written_at = now()",
                &[&key, &size, &hash],
            )
            .await?;
        Ok(())
    }

    /// The row, then the object.
    async fn delete(&self, recipe: CAddr) -> Result<()> {
        self.unindex(&recipe).await?;
        self.objects.delete(&self.objects.output_key(&recipe)).await
    }

    /// Whether the index records an output of `recipe` (whose object a read checks).
    async fn contains(&self, recipe: CAddr) -> Result<bool> {
        self.indexed(&recipe).await
    }

    async fn list_page(&self, after: Option<CAddr>, limit: usize) -> Result<Vec<CAddr>> {
        self.objects.list_addrs_page("outputs", after, limit).await
    }
}

/// The size in the output's row (written with the output); recording is that write.
#[async_trait]
impl OutputSizes for ObjectOutputs {
    async fn recorded(&self, recipe: CAddr) -> Result<Option<u64>> {
        let size = self.indexed_size(&recipe).await?;
        let mut answers = self.answers.lock();
        answers.retain(|(r, _, at)| *r != recipe && at.elapsed() < ANSWER_KEPT);
        if answers.len() >= ANSWERS {
            answers.remove(0);
        }
        answers.push((recipe, size, std::time::Instant::now()));
        Ok(size)
    }

    async fn record(&self, _recipe: CAddr, _size: u64) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(n: u8) -> CAddr {
        CAddr::from([n; 32])
    }

    fn corrupted(result: Result<Option<Bytes>>) -> String {
        match result {
            Err(DerivaError::Corrupted { addr, detail }) => {
                assert_eq!(addr, recipe(1), "the recipe asked for");
                detail
            }
            other => panic!("expected Corrupted, got {other:?}"),
        }
    }

    #[test]
    fn an_object_answers_for_its_own_recipe_only() {
        let object = encode(&recipe(1), b"the output");
        assert_eq!(object.len(), HEADER_LEN + 10);
        assert_eq!(
            decode(&recipe(1), object.clone(), "s3://b/").unwrap(),
            Some(Bytes::from_static(b"the output"))
        );
        let moved = corrupted(decode(
            &recipe(1),
            encode(&recipe(2), b"the output"),
            "s3://b/",
        ));
        assert!(moved.contains(&recipe(2).to_hex()), "{moved}");
        assert!(moved.contains("s3://b/"), "{moved}");
        // An empty output has a header all the same.
        assert_eq!(
            decode(&recipe(1), encode(&recipe(1), b""), "s3://b/").unwrap(),
            Some(Bytes::new())
        );
    }

    #[test]
    fn damage_is_corrupted_and_other_formats_are_misses() {
        let mut flipped = encode(&recipe(1), b"the output").to_vec();
        *flipped.last_mut().unwrap() ^= 1;
        let detail = corrupted(decode(&recipe(1), flipped.into(), "s3://b/"));
        assert!(detail.contains("do not match their hash"), "{detail}");
        let short = encode(&recipe(1), b"x").slice(..HEADER_LEN - 1);
        let detail = corrupted(decode(&recipe(1), short, "s3://b/"));
        assert!(
            detail.contains("shorter than its 69-byte header"),
            "{detail}"
        );
        // Before the version: the output's hash, then the output.
        let mut legacy = blake3::hash(b"old").as_bytes().to_vec();
        legacy.extend_from_slice(b"old");
        assert_eq!(decode(&recipe(1), legacy.into(), "s3://b/").unwrap(), None);
        let mut newer = encode(&recipe(1), b"the output").to_vec();
        newer[MAGIC.len()] = VERSION + 1;
        assert_eq!(decode(&recipe(1), newer.into(), "s3://b/").unwrap(), None);
    }
}
