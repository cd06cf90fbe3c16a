//! [`ObjectOutputs`]: the shared output tier in the object store, at `outputs/<recipe hex>`.
//!
//! An output has no address of its own to check against, and its key is only where it was put:
//! anyone who may write to the bucket could copy one recipe's output under another's key. So
//! each object opens with a header that names the recipe it is the output of, and the hash of
//! the output, then carries the output's materialization record:
//!
//! | bytes | what |
//! |---|---|
//! | 0..4 | [`MAGIC`], `DRVO` |
//! | 4 | [`VERSION`], 2 (1: no record fields, the output follows the hash) |
//! | 5..37 | the recipe address |
//! | 37..69 | the BLAKE3 hash of the output |
//! | 69..73 | `n`, the length of the record, `u32` little-endian; 0 for none |
//! | 73..73+n | the record: its `SignedRecord` envelope (`deriva_core::provenance`) |
//! | 73+n..105+n | the BLAKE3 hash of the record (only if `n` > 0) |
//! | then | the output |
//!
//! A read checks both: an object that names another recipe (moved or copied) or whose bytes do
//! not match their hash is [`DerivaError::Corrupted`], never data, and the executor computes
//! the output again and overwrites it. So is a damaged record: one whose bytes do not match
//! their hash, that does not decode, names another recipe, or tells another output hash or
//! size than the header's. A version-1 object is read as the output with no record. An object in another
//! format (the header before this one was the hash alone, with no magic; or a version this
//! build does not know) is a miss: the tier is a cache, so the output is computed and the
//! object replaced. This does not stop a writer who forges a whole object (the header is not a
//! signature); it keeps an object from answering for a recipe it was not computed for.
//!
//! The index knows which outputs the tier holds: a row of `outputs` with `stored` (migration 6;
//! migration 7 added `stored`, the record and its audits, see `records.rs`) per object. Whether
//! an output is there is asked of PostgreSQL, never of the object store, so a fresh recipe
//! costs no object-store request that misses. A put writes the object and then its row, with
//! the record and its audits reset, in one statement (a row with `stored` always names an
//! object that is there); a delete removes the row and then the object. A row without `stored`
//! holds only a record (`PgRecords::put` on a node without the tier): not an output of the
//! tier. An object without a row (written before the table existed, or whose row was lost with
//! a crash between the two) is a miss: the output is computed again and written with its row.
//! `list` still lists the objects (for `deriva-server migrate`).
//!
//! The row's `size` is also the output's recorded size ([`OutputSizes`]) for the memory
//! budget's up-front check, written with the output at no extra cost (any row answers, stored
//! or not). The engine asks for it just before it asks for the output; so that this costs no
//! second round trip, the answer (the row, or none) is kept for the next `get` or `contains`
//! of that recipe, once, within [`ANSWER_KEPT`].

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use deriva_core::error::Result;
use deriva_core::provenance::SignedRecord;
use deriva_core::{CAddr, DerivaError};
use deriva_store::{OutputSizes, OutputStore, StoredOutput};

use crate::objects::Objects;
use crate::pg::{Call, Pg};

/// The first bytes of every output-tier object.
const MAGIC: [u8; 4] = *b"DRVO";
/// The version of the header laid out in the module docs.
const VERSION: u8 = 2;
/// The version before records: the output follows the hash.
const VERSION_1: u8 = 1;
const HASH_LEN: usize = 32;
/// Magic, version, recipe address, output hash.
const HEADER_LEN: usize = MAGIC.len() + 1 + HASH_LEN + HASH_LEN;
/// The length of the record, after the version-1 header.
const RECORD_LEN_LEN: usize = 4;

/// How long the index's answer about a recipe's output ([`OutputSizes::recorded`]) stands in
/// for the next `get` or `contains` of it.
pub const ANSWER_KEPT: std::time::Duration = std::time::Duration::from_secs(1);

/// The most answers kept at once (beyond it, the oldest are dropped).
const ANSWERS: usize = 256;

/// A row of `outputs`: the output's size, and whether the output tier holds its object.
#[derive(Debug, Clone, Copy)]
struct Row {
    size: u64,
    stored: bool,
}

/// An answer of the index about a recipe's output: the recipe, its row if it has one, and when
/// it was asked.
type Answer = (CAddr, Option<Row>, std::time::Instant);

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

    /// The row of the output of `recipe`, if it has one.
    async fn row(&self, recipe: &CAddr) -> Result<Option<Row>> {
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
                "SELECT size, stored FROM {s}.outputs WHERE recipe = $1",
                &[&key],
            )
            .await?;
        Ok(row.map(|r| Row {
            size: r.get::<_, i64>(0).max(0) as u64,
            stored: r.get(1),
        }))
    }

    /// Whether the index records an object of the output of `recipe` (a row with `stored`):
    /// the answer kept from [`OutputSizes::recorded`] if it is recent, else a query.
    async fn indexed(&self, recipe: &CAddr) -> Result<bool> {
        let kept = {
            let mut answers = self.answers.lock();
            let at = answers.iter().position(|(r, _, _)| r == recipe);
            at.map(|i| answers.swap_remove(i))
        };
        let row = match kept {
            Some((_, row, at)) if at.elapsed() < ANSWER_KEPT => row,
            _ => self.row(recipe).await?,
        };
        Ok(row.is_some_and(|r| r.stored))
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

/// The object that stores `output`, whose BLAKE3 hash is `hash`, as the output of `recipe`,
/// with its `record` and that record's envelope (`SignedRecord::to_bytes`): the caller has
/// both already, for the row.
fn encode(
    recipe: &CAddr,
    output: &[u8],
    hash: &blake3::Hash,
    record: Option<(&SignedRecord, &[u8])>,
) -> Result<Bytes> {
    if let Some((signed, _)) = record {
        let r = &signed.record;
        if r.recipe != *recipe
            || r.output_hash.as_bytes() != hash.as_bytes()
            || r.output_bytes != output.len() as u64
        {
            return Err(DerivaError::InvalidInput(format!(
                "the record of recipe {} with an output of {} bytes hashing to {} does not \
                 describe the output of {} bytes stored for recipe {recipe}",
                r.recipe,
                r.output_bytes,
                r.output_hash,
                output.len()
            )));
        }
    }
    let record = record.map_or(&[][..], |(_, envelope)| envelope);
    let record_len = u32::try_from(record.len()).map_err(|_| {
        DerivaError::InvalidInput(format!(
            "a materialization record of {} bytes for recipe {recipe}",
            record.len()
        ))
    })?;
    let checksum = if record.is_empty() { 0 } else { HASH_LEN };
    let mut object = BytesMut::with_capacity(
        HEADER_LEN + RECORD_LEN_LEN + record.len() + checksum + output.len(),
    );
    object.put_slice(&MAGIC);
    object.put_u8(VERSION);
    object.put_slice(recipe.as_bytes());
    object.put_slice(hash.as_bytes());
    object.put_u32_le(record_len);
    if !record.is_empty() {
        object.put_slice(record);
        object.put_slice(blake3::hash(record).as_bytes());
    }
    object.put_slice(output);
    Ok(object.freeze())
}

/// The record of a version-2 `object` of `recipe` (see the module docs) and where its output
/// starts; damage to the record's length, bytes or checksum is `Corrupted` (by `damaged`).
fn record_section(
    recipe: &CAddr,
    object: &[u8],
    where_: &str,
    damaged: impl Fn(String) -> DerivaError,
) -> Result<(Option<SignedRecord>, usize)> {
    let len_end = HEADER_LEN + RECORD_LEN_LEN;
    let len = object
        .get(HEADER_LEN..len_end)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| damaged("its header ends before the length of its record".into()))?;
    if len == 0 {
        return Ok((None, len_end));
    }
    let end = len_end
        .checked_add(len)
        .and_then(|end| end.checked_add(HASH_LEN))
        .filter(|end| *end <= object.len())
        .ok_or_else(|| {
            damaged(format!(
                "a record of {len} bytes and its checksum in {} bytes after the header",
                object.len() - len_end
            ))
        })?;
    let (envelope, checksum) = object[len_end..end].split_at(len);
    if blake3::hash(envelope).as_bytes()[..] != checksum[..] {
        return Err(damaged(format!(
            "its record's {len} bytes do not match their checksum"
        )));
    }
    let record = crate::records::decode_record(recipe, envelope, where_)?;
    Ok((Some(record), end))
}

/// What an object read at the key of `recipe` holds: its output and record, checked;
/// `Ok(None)` if it is in another format (a miss); [`DerivaError::Corrupted`] (whose detail
/// says what is wrong, to follow `where_` in the message) if it is the output of another
/// recipe, or damaged (its output or its record).
fn decode(recipe: &CAddr, object: Bytes, where_: &str) -> Result<Option<StoredOutput>> {
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
    if version != VERSION && version != VERSION_1 {
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
    let (record, start) = if version == VERSION_1 {
        (None, HEADER_LEN)
    } else {
        record_section(recipe, &object, where_, damaged)?
    };
    let output = object.slice(start..);
    if blake3::hash(&output).as_bytes()[..] != hash[..] {
        return Err(damaged(format!(
            "its {} bytes do not match their hash",
            output.len()
        )));
    }
    if let Some(signed) = &record {
        let r = &signed.record;
        if r.output_hash.as_bytes()[..] != hash[..] || r.output_bytes != output.len() as u64 {
            return Err(damaged(format!(
                "its record tells an output of {} bytes hashing to {}, not this one",
                r.output_bytes, r.output_hash
            )));
        }
    }
    Ok(Some(StoredOutput {
        bytes: output,
        record,
    }))
}

#[async_trait]
impl OutputStore for ObjectOutputs {
    /// The index first: without a row with `stored`, a miss that asks the object store nothing.
    async fn get(&self, recipe: CAddr) -> Result<Option<StoredOutput>> {
        if !self.indexed(&recipe).await? {
            return Ok(None);
        }
        let Some(object) = self.objects.get(&self.objects.output_key(&recipe)).await? else {
            return Ok(None);
        };
        decode(&recipe, object, self.objects.name())
    }

    /// The object, then its row with the record and audits reset, in one statement.
    async fn put(&self, recipe: CAddr, output: Bytes, record: Option<&SignedRecord>) -> Result<()> {
        const INDEX: Call = Call {
            op: "put_output",
            operation: "INSERT",
            table: "outputs",
            context: "recording a stored output",
        };
        // The output is hashed, and the record encoded, once: for the object and the row.
        let digest = blake3::hash(&output);
        let envelope = record.map(SignedRecord::to_bytes);
        let object = encode(&recipe, &output, &digest, record.zip(envelope.as_deref()))?;
        self.objects
            .overwrite(&self.objects.output_key(&recipe), object)
            .await?;
        let key = recipe.as_bytes().to_vec();
        let (size, hash) = (output.len() as i64, digest.as_bytes().to_vec());
        self.pg
            .query(
                INDEX,
                "INSERT INTO {s}.outputs (recipe, size, hash, record, stored)
                 VALUES ($1, $2, $3, $4, true)
                 ON CONFLICT (recipe) DO UPDATE
                 SET size = excluded.size, hash = excluded.hash, written_at = now(),
                     record = excluded.record, stored = true,
                     audit_match = 0, audit_mismatch = 0, audit_error = 0",
                &[&key, &size, &hash, &envelope],
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

/// The size in the output's row (written with the output or its record, stored or not);
/// recording is that write.
#[async_trait]
impl OutputSizes for ObjectOutputs {
    async fn recorded(&self, recipe: CAddr) -> Result<Option<u64>> {
        let row = self.row(&recipe).await?;
        let mut answers = self.answers.lock();
        answers.retain(|(r, _, at)| *r != recipe && at.elapsed() < ANSWER_KEPT);
        if answers.len() >= ANSWERS {
            answers.remove(0);
        }
        answers.push((recipe, row, std::time::Instant::now()));
        Ok(row.map(|r| r.size))
    }

    async fn record(&self, _recipe: CAddr, _size: u64) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use deriva_core::FunctionId;
    use deriva_core::provenance::{Record, SpanRef};

    use super::*;

    fn recipe(n: u8) -> CAddr {
        CAddr::from([n; 32])
    }

    fn record_of(recipe: CAddr, output: &[u8], signed: bool) -> SignedRecord {
        SignedRecord {
            record: Record {
                recipe,
                function: FunctionId::new("concat", "1").unwrap(),
                inputs: vec![CAddr::for_leaf(b"a"), CAddr::for_leaf(b"b")],
                output_hash: CAddr::for_leaf(output),
                output_bytes: output.len() as u64,
                node: "node-a".into(),
                started_at_micros: 1_700_000_000_000_000,
                duration_micros: 3_100_000,
                span: Some(SpanRef {
                    trace_id: [7; 16],
                    span_id: [9; 8],
                }),
            },
            signature: signed.then_some([5; 64]),
        }
    }

    fn object(recipe: &CAddr, output: &[u8], record: Option<&SignedRecord>) -> Bytes {
        try_object(recipe, output, record).unwrap()
    }

    fn try_object(recipe: &CAddr, output: &[u8], record: Option<&SignedRecord>) -> Result<Bytes> {
        let envelope = record.map(SignedRecord::to_bytes);
        encode(
            recipe,
            output,
            &blake3::hash(output),
            record.zip(envelope.as_deref()),
        )
    }

    fn stored(output: &'static [u8], record: Option<SignedRecord>) -> Option<StoredOutput> {
        Some(StoredOutput {
            bytes: Bytes::from_static(output),
            record,
        })
    }

    fn corrupted(result: Result<Option<StoredOutput>>) -> String {
        match result {
            Err(DerivaError::Corrupted { addr, detail }) => {
                assert_eq!(addr, recipe(1), "the recipe asked for");
                detail
            }
            other => panic!("expected Corrupted, got {other:?}"),
        }
    }

    /// The object of version 1: the header, then the output.
    fn version_1(recipe: &CAddr, output: &[u8]) -> Bytes {
        let mut object = MAGIC.to_vec();
        object.push(VERSION_1);
        object.extend_from_slice(recipe.as_bytes());
        object.extend_from_slice(blake3::hash(output).as_bytes());
        object.extend_from_slice(output);
        object.into()
    }

    #[test]
    fn an_object_answers_for_its_own_recipe_only() {
        let object = object(&recipe(1), b"the output", None);
        assert_eq!(object.len(), HEADER_LEN + RECORD_LEN_LEN + 10);
        assert_eq!(
            decode(&recipe(1), object, "s3://b/").unwrap(),
            stored(b"the output", None)
        );
        let moved = corrupted(decode(
            &recipe(1),
            self::object(&recipe(2), b"the output", None),
            "s3://b/",
        ));
        assert!(moved.contains(&recipe(2).to_hex()), "{moved}");
        assert!(moved.contains("s3://b/"), "{moved}");
        // An empty output has a header all the same.
        assert_eq!(
            decode(&recipe(1), self::object(&recipe(1), b"", None), "s3://b/").unwrap(),
            stored(b"", None)
        );
    }

    /// Version 2 carries the record, signed or not, and gives it back; a version-1 object is
    /// still the output, with no record.
    #[test]
    fn the_record_travels_with_the_output() {
        for signed in [false, true] {
            let record = record_of(recipe(1), b"the output", signed);
            let object = object(&recipe(1), b"the output", Some(&record));
            assert_eq!(object[MAGIC.len()], 2);
            assert_eq!(
                object.len(),
                HEADER_LEN + RECORD_LEN_LEN + record.to_bytes().len() + HASH_LEN + 10
            );
            assert_eq!(
                decode(&recipe(1), object, "s3://b/").unwrap(),
                stored(b"the output", Some(record))
            );
        }
        assert_eq!(
            decode(&recipe(1), version_1(&recipe(1), b"old output"), "s3://b/").unwrap(),
            stored(b"old output", None)
        );
        let detail = corrupted(decode(
            &recipe(1),
            version_1(&recipe(1), b"old output").slice(..HEADER_LEN + 3),
            "s3://b/",
        ));
        assert!(detail.contains("do not match their hash"), "{detail}");
    }

    /// A record that does not describe the output is refused at the put.
    #[test]
    fn a_record_of_another_output_is_refused() {
        for record in [
            record_of(recipe(2), b"the output", false),
            record_of(recipe(1), b"another output", false),
        ] {
            let err = try_object(&recipe(1), b"the output", Some(&record)).unwrap_err();
            assert!(
                matches!(&err, DerivaError::InvalidInput(m) if m.contains("does not describe")),
                "{err}"
            );
        }
    }

    /// A version-2 object of `recipe` whose record section holds `envelope`, with a checksum
    /// that matches it, then `output`.
    fn with_envelope(recipe: &CAddr, envelope: &[u8], output: &[u8]) -> Bytes {
        let mut object = object(recipe, output, None)[..HEADER_LEN].to_vec();
        object.extend_from_slice(&(envelope.len() as u32).to_le_bytes());
        object.extend_from_slice(envelope);
        object.extend_from_slice(blake3::hash(envelope).as_bytes());
        object.extend_from_slice(output);
        object.into()
    }

    /// A damaged record is Corrupted like damaged bytes: a byte changed anywhere in it (its
    /// checksum), a length past the end, a header cut before the length; and, checksum
    /// intact, one that does not decode, names another recipe, or tells another output.
    #[test]
    fn a_damaged_record_is_corrupted() {
        let record = record_of(recipe(1), b"the output", true);
        let envelope = record.to_bytes();
        let good = object(&recipe(1), b"the output", Some(&record)).to_vec();
        assert_eq!(
            good,
            with_envelope(&recipe(1), &envelope, b"the output").to_vec()
        );
        let at = HEADER_LEN + RECORD_LEN_LEN;
        // The start time, the node name (inside fields that still decode), the signature.
        let node_at = at + envelope.len() - 1 - 64 - 24 - 16 - "node-a".len();
        for byte in [node_at, node_at + 6, at + envelope.len() - 1] {
            let mut changed = good.clone();
            changed[byte] ^= 1;
            let detail = corrupted(decode(&recipe(1), changed.into(), "s3://b/"));
            assert!(detail.contains("do not match their checksum"), "{detail}");
        }

        // Its length runs past the object's end.
        let mut too_long = good.clone();
        too_long[HEADER_LEN..at].copy_from_slice(&(u32::MAX).to_le_bytes());
        let detail = corrupted(decode(&recipe(1), too_long.into(), "s3://b/"));
        assert!(detail.contains("a record of 4294967295 bytes"), "{detail}");

        // A header cut before the length.
        let detail = corrupted(decode(
            &recipe(1),
            Bytes::from(good[..HEADER_LEN + 2].to_vec()),
            "s3://b/",
        ));
        assert!(
            detail.contains("before the length of its record"),
            "{detail}"
        );

        // The record's encoding version byte, changed: it no longer decodes.
        let mut undecodable = envelope.clone();
        undecodable[0] = 0x7f;
        let detail = corrupted(decode(
            &recipe(1),
            with_envelope(&recipe(1), &undecodable, b"the output"),
            "s3://b/",
        ));
        assert!(detail.contains("materialization record"), "{detail}");

        // Another recipe's record, in this recipe's object.
        let other = record_of(recipe(2), b"the output", false).to_bytes();
        let detail = corrupted(decode(
            &recipe(1),
            with_envelope(&recipe(1), &other, b"the output"),
            "s3://b/",
        ));
        assert!(detail.contains(&recipe(2).to_hex()), "{detail}");

        // A record that tells another output.
        let another = record_of(recipe(1), b"another output", false).to_bytes();
        let detail = corrupted(decode(
            &recipe(1),
            with_envelope(&recipe(1), &another, b"the output"),
            "s3://b/",
        ));
        assert!(detail.contains("its record tells an output"), "{detail}");
    }

    #[test]
    fn damage_is_corrupted_and_other_formats_are_misses() {
        let mut flipped = object(&recipe(1), b"the output", None).to_vec();
        *flipped.last_mut().unwrap() ^= 1;
        let detail = corrupted(decode(&recipe(1), flipped.into(), "s3://b/"));
        assert!(detail.contains("do not match their hash"), "{detail}");
        let short = object(&recipe(1), b"x", None).slice(..HEADER_LEN - 1);
        let detail = corrupted(decode(&recipe(1), short, "s3://b/"));
        assert!(
            detail.contains("shorter than its 69-byte header"),
            "{detail}"
        );
        // Before the version: the output's hash, then the output.
        let mut legacy = blake3::hash(b"old").as_bytes().to_vec();
        legacy.extend_from_slice(b"old");
        assert_eq!(decode(&recipe(1), legacy.into(), "s3://b/").unwrap(), None);
        let mut newer = object(&recipe(1), b"the output", None).to_vec();
        newer[MAGIC.len()] = VERSION + 1;
        assert_eq!(decode(&recipe(1), newer.into(), "s3://b/").unwrap(), None);
    }
}
