//! Materialization records: who computed an output, where, when, from what, and in which trace.
//!
//! Every computed output has a [`Record`], made by the node that ran the function. It travels
//! with the output (the memory cache entry, the spill index, the output-tier object) and is kept
//! by the store (a redb table locally, the `outputs` row in PostgreSQL) for as long as the output
//! is. A record may be signed ([`SignedRecord`]) over its canonical encoding, below; the audit
//! tallies ([`Audits`]) are kept beside it, counted by every node that recomputes the output to
//! check it, and are not signed (no node holds the key of another).
//!
//! ### Canonical record encoding, version 1
//!
//! Integers are little-endian; strings are UTF-8 preceded by their `u32` byte length.
//!
//! | field | bytes |
//! |---|---|
//! | encoding version | one byte, `0x01` |
//! | recipe address | 32 |
//! | function name, function version | two strings |
//! | inputs | `u32` count, then each input address (32 bytes), in recipe order |
//! | output hash (BLAKE3 of the output) | 32 |
//! | output size | `u64` |
//! | node name | string, at most [`MAX_NODE_LEN`] bytes |
//! | start of the compute | `u64`, microseconds since the Unix epoch |
//! | duration of the compute | `u64`, microseconds |
//! | trace id, span id of the compute span | 16 and 8 bytes, all zero when there was none |
//!
//! A signed record's envelope is the canonical encoding, then one byte (`0` unsigned, `1`
//! signed), then the 64-byte ed25519 signature if signed. The stored form adds the audit
//! tallies: three `u64` (matches, mismatches, errors). Golden vectors in `tests/it/golden.rs`
//! pin all three.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::addr::{ADDR_LEN, CAddr};
use crate::error::Result;
use crate::recipe::{FunctionId, MAX_INPUTS, Reader, put_len, put_str};

/// Version byte that opens every canonical record encoding.
pub const RECORD_ENCODING_VERSION: u8 = 1;
/// Longest node name a record holds, in bytes.
pub const MAX_NODE_LEN: usize = 256;
/// Length of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// The compute span of a record: W3C trace and span ids.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SpanRef {
    /// The trace id.
    pub trace_id: [u8; 16],
    /// The span id.
    pub span_id: [u8; 8],
}

impl SpanRef {
    /// The span a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`) names; `None` if it is
    /// malformed or names the invalid (all-zero) trace or span.
    pub fn from_traceparent(traceparent: &str) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || flags.len() != 2 || version == "ff" {
            return None;
        }
        let mut out = Self::default();
        hex::decode_to_slice(trace, &mut out.trace_id).ok()?;
        hex::decode_to_slice(span, &mut out.span_id).ok()?;
        (!out.is_none()).then_some(out)
    }

    /// Whether this is the invalid (all-zero) reference, which stands for "no span".
    pub fn is_none(&self) -> bool {
        self.trace_id == [0; 16] || self.span_id == [0; 8]
    }

    /// The trace id, 32 lowercase hex characters.
    pub fn trace_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// The span id, 16 lowercase hex characters.
    pub fn span_hex(&self) -> String {
        hex::encode(self.span_id)
    }

    /// The W3C `traceparent` of this span, sampled.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-01", self.trace_hex(), self.span_hex())
    }
}

impl fmt::Debug for SpanRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.trace_hex(), self.span_hex())
    }
}

/// What a node records of one compute of a recipe.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Record {
    /// The recipe computed.
    pub recipe: CAddr,
    /// Its function.
    pub function: FunctionId,
    /// Its inputs, in recipe order.
    pub inputs: Vec<CAddr>,
    /// BLAKE3 of the output (the address the output would have as a leaf).
    pub output_hash: CAddr,
    /// The output's size in bytes.
    pub output_bytes: u64,
    /// The node that ran the function (`--node-name`).
    pub node: String,
    /// When the function started, in microseconds since the Unix epoch.
    pub started_at_micros: u64,
    /// How long the function ran, in microseconds.
    pub duration_micros: u64,
    /// The compute span, if it had a valid context.
    pub span: Option<SpanRef>,
}

/// Microseconds since the Unix epoch of `at` (0 before the epoch).
pub fn unix_micros(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl Record {
    /// When the function started.
    pub fn started_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.started_at_micros)
    }

    /// How long the function ran.
    pub fn duration(&self) -> Duration {
        Duration::from_micros(self.duration_micros)
    }

    /// How long ago the function started, by `now` (zero if in the future).
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.started_at()).unwrap_or_default()
    }

    /// The canonical encoding (see the module docs), which a signature covers.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            1 + ADDR_LEN * (2 + self.inputs.len())
                + 16
                + self.function.name().len()
                + self.function.version().len()
                + 8
                + self.node.len()
                + 44,
        );
        self.encode_into(&mut out);
        out
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(RECORD_ENCODING_VERSION);
        out.extend_from_slice(self.recipe.as_bytes());
        put_str(out, self.function.name());
        put_str(out, self.function.version());
        put_len(out, self.inputs.len());
        for input in &self.inputs {
            out.extend_from_slice(input.as_bytes());
        }
        out.extend_from_slice(self.output_hash.as_bytes());
        out.extend_from_slice(&self.output_bytes.to_le_bytes());
        put_str(out, &self.node);
        out.extend_from_slice(&self.started_at_micros.to_le_bytes());
        out.extend_from_slice(&self.duration_micros.to_le_bytes());
        let span = self.span.unwrap_or_default();
        out.extend_from_slice(&span.trace_id);
        out.extend_from_slice(&span.span_id);
    }

    /// Decodes [`Record::canonical_bytes`] (the whole of `bytes`).
    pub fn from_canonical_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = reader(bytes);
        let record = Self::decode(&mut r)?;
        r.end()?;
        Ok(record)
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let version = r.take(1)?[0];
        if version != RECORD_ENCODING_VERSION {
            return Err(r.err(format!("unknown record encoding version {version}")));
        }
        let recipe = r.addr()?;
        let name = r.string()?;
        let version = r.string()?;
        let function = FunctionId::new(name, version).map_err(|e| r.err(e))?;
        let n_inputs = r.len()?;
        if n_inputs > MAX_INPUTS {
            return Err(r.err(format!("{n_inputs} inputs; the limit is {MAX_INPUTS}")));
        }
        let mut inputs = Vec::with_capacity(n_inputs);
        for _ in 0..n_inputs {
            inputs.push(r.addr()?);
        }
        let output_hash = r.addr()?;
        let output_bytes = r.u64()?;
        let node = r.string()?;
        if node.len() > MAX_NODE_LEN {
            return Err(r.err(format!(
                "a node name of {} bytes; the limit is {MAX_NODE_LEN}",
                node.len()
            )));
        }
        let started_at_micros = r.u64()?;
        let duration_micros = r.u64()?;
        let mut span = SpanRef::default();
        span.trace_id.copy_from_slice(r.take(16)?);
        span.span_id.copy_from_slice(r.take(8)?);
        Ok(Self {
            recipe,
            function,
            inputs,
            output_hash,
            output_bytes,
            node,
            started_at_micros,
            duration_micros,
            span: (!span.is_none()).then_some(span),
        })
    }
}

/// A record and, if the node that made it has a signing key, its ed25519 signature over
/// [`Record::canonical_bytes`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SignedRecord {
    /// The record.
    pub record: Record,
    /// The signature, if any.
    pub signature: Option<[u8; SIGNATURE_LEN]>,
}

impl SignedRecord {
    /// The envelope: the canonical encoding, then the signature (see the module docs).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.record.canonical_bytes();
        self.signature_into(&mut out);
        out
    }

    fn signature_into(&self, out: &mut Vec<u8>) {
        match &self.signature {
            Some(signature) => {
                out.push(1);
                out.extend_from_slice(signature);
            }
            None => out.push(0),
        }
    }

    /// Decodes [`SignedRecord::to_bytes`] (the whole of `bytes`).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = reader(bytes);
        let signed = Self::decode(&mut r)?;
        r.end()?;
        Ok(signed)
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let record = Record::decode(r)?;
        let signature = match r.take(1)?[0] {
            0 => None,
            1 => {
                let mut signature = [0; SIGNATURE_LEN];
                signature.copy_from_slice(r.take(SIGNATURE_LEN)?);
                Some(signature)
            }
            other => return Err(r.err(format!("a signature flag of {other}"))),
        };
        Ok(Self { record, signature })
    }
}

/// What one audit (a recomputation of a stored output, compared with its record) found.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum AuditResult {
    /// The same bytes came out.
    Match,
    /// Other bytes came out: the function is not deterministic (or one of the two runs was
    /// damaged).
    Mismatch,
    /// The recomputation failed.
    Error,
}

impl AuditResult {
    /// `match`, `mismatch` or `error`: the `result` label of `deriva_audit_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Match => "match",
            Self::Mismatch => "mismatch",
            Self::Error => "error",
        }
    }
}

/// The audits of one record so far.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Audits {
    /// Recomputations that gave the same bytes.
    pub matches: u64,
    /// Recomputations that gave other bytes.
    pub mismatches: u64,
    /// Recomputations that failed.
    pub errors: u64,
}

impl Audits {
    /// Counts one more audit.
    pub fn add(&mut self, result: AuditResult) {
        let n = match result {
            AuditResult::Match => &mut self.matches,
            AuditResult::Mismatch => &mut self.mismatches,
            AuditResult::Error => &mut self.errors,
        };
        *n = n.saturating_add(1);
    }

    /// Whether a recomputation ever disagreed: the output is disputed.
    pub fn disputed(&self) -> bool {
        self.mismatches > 0
    }
}

/// A stored record: the signed record and its audits.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Provenance {
    /// The record, as its node made it.
    pub signed: SignedRecord,
    /// The audits counted since.
    pub audits: Audits,
}

impl Provenance {
    /// An unaudited record.
    pub fn new(signed: SignedRecord) -> Self {
        Self {
            signed,
            audits: Audits::default(),
        }
    }

    /// The record.
    pub fn record(&self) -> &Record {
        &self.signed.record
    }

    /// The stored form: the envelope, then the tallies (see the module docs).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.signed.to_bytes();
        for n in [
            self.audits.matches,
            self.audits.mismatches,
            self.audits.errors,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out
    }

    /// Decodes [`Provenance::to_bytes`] (the whole of `bytes`).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = reader(bytes);
        let signed = SignedRecord::decode(&mut r)?;
        let audits = Audits {
            matches: r.u64()?,
            mismatches: r.u64()?,
            errors: r.u64()?,
        };
        r.end()?;
        Ok(Self { signed, audits })
    }
}

fn reader(bytes: &[u8]) -> Reader<'_> {
    Reader {
        bytes,
        pos: 0,
        what: "a materialization record",
    }
}

impl Reader<'_> {
    fn addr(&mut self) -> Result<CAddr> {
        let raw = self.take(ADDR_LEN)?;
        CAddr::from_slice(raw).map_err(|e| self.err(e))
    }

    fn u64(&mut self) -> Result<u64> {
        let raw: [u8; 8] = self
            .take(8)?
            .try_into()
            .map_err(|_| self.err("truncated"))?;
        Ok(u64::from_le_bytes(raw))
    }

    fn end(&self) -> Result<()> {
        if self.pos != self.bytes.len() {
            return Err(self.err(format!("{} trailing bytes", self.bytes.len() - self.pos)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            recipe: CAddr::from([7; 32]),
            function: FunctionId::new("concat", "v1").unwrap(),
            inputs: vec![CAddr::for_leaf(b"a"), CAddr::for_leaf(b"b")],
            output_hash: CAddr::for_leaf(b"ab"),
            output_bytes: 2,
            node: "node-a".into(),
            started_at_micros: 1_765_000_000_000_000,
            duration_micros: 3_100_000,
            span: SpanRef::from_traceparent(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        }
    }

    #[test]
    fn every_form_round_trips_and_rejects_damage() {
        let signed = SignedRecord {
            record: record(),
            signature: Some([9; SIGNATURE_LEN]),
        };
        let mut stored = Provenance::new(signed.clone());
        stored.audits.add(AuditResult::Mismatch);
        assert!(stored.audits.disputed());
        assert_eq!(
            Record::from_canonical_bytes(&record().canonical_bytes()).unwrap(),
            record()
        );
        assert_eq!(
            SignedRecord::from_bytes(&signed.to_bytes()).unwrap(),
            signed
        );
        assert_eq!(Provenance::from_bytes(&stored.to_bytes()).unwrap(), stored);
        let bytes = stored.to_bytes();
        for cut in [0, 1, 40, bytes.len() - 1] {
            let err = Provenance::from_bytes(&bytes[..cut])
                .unwrap_err()
                .to_string();
            assert!(err.contains("materialization record"), "{err}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Provenance::from_bytes(&longer).is_err());
        let mut flag = signed.to_bytes();
        let at = record().canonical_bytes().len();
        flag[at] = 2;
        assert!(SignedRecord::from_bytes(&flag).is_err());
    }

    #[test]
    fn a_traceparent_names_a_span_or_nothing() {
        let span = record().span.unwrap();
        assert_eq!(span.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            span.traceparent(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(SpanRef::from_traceparent(bad), None, "{bad}");
        }
        let mut none = record();
        none.span = None;
        assert_eq!(
            Record::from_canonical_bytes(&none.canonical_bytes()).unwrap(),
            none
        );
    }
}
