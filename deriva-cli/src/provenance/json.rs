//! The JSON of `deriva provenance --json`: one object for the address asked, its inputs
//! nested in it ([`JsonEntry`], [`JsonNode`]).

use serde::Serialize;

use super::{Entry, Kind, Provenance, Signature, Step};
use crate::human::rfc3339;

impl Provenance {
    /// The JSON object of the address asked, its inputs nested in it to the depth asked (see
    /// [`JsonEntry`]).
    pub fn json(&self) -> JsonEntry {
        // The entries being walked, each with the inputs made so far.
        let mut open: Vec<(&Entry, Vec<JsonNode>)> = Vec::new();
        let mut root = None;
        self.walk(|step| match step {
            Step::Enter(entry, _) => open.push((entry, Vec::new())),
            Step::Repeat(entry, _) => {
                if let Some((_, inputs)) = open.last_mut() {
                    inputs.push(JsonNode::Repeated {
                        addr: entry.addr.to_string(),
                        kind: entry.kind.as_str(),
                        repeated: true,
                    });
                }
            }
            Step::Unexplored(addr) => {
                if let Some((_, inputs)) = open.last_mut() {
                    inputs.push(JsonNode::Unexplored {
                        addr: addr.to_string(),
                        kind: "unexplored",
                    });
                }
            }
            Step::Leave(..) => {
                let Some((entry, inputs)) = open.pop() else {
                    return;
                };
                let made = json_entry(entry, inputs);
                match open.last_mut() {
                    Some((_, parent)) => parent.push(JsonNode::Entry(Box::new(made))),
                    None => root = Some(made),
                }
            }
        });
        let mut root = root.unwrap_or_else(|| json_entry(&self.entries[0], Vec::new()));
        root.truncated = Some(self.truncated);
        root
    }
}

/// One address in the JSON of `deriva provenance --json`.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum JsonNode {
    /// An entry, described in full.
    Entry(Box<JsonEntry>),
    /// An entry described in full earlier in the object (depth-first, inputs in order): a
    /// DAG's shared input. `repeated` is always `true`.
    Repeated {
        /// The address.
        addr: String,
        /// `leaf`, `recipe` or `missing`.
        kind: &'static str,
        /// Always `true`.
        repeated: bool,
    },
    /// An input the answer has no entry for: below the depth asked, or cut by truncation.
    Unexplored {
        /// The address.
        addr: String,
        /// Always `unexplored`.
        kind: &'static str,
    },
}

/// The JSON of one entry. Every field is present; `null` for what is unknown or does not
/// apply (a leaf has no function, a recipe not computed has no node).
#[derive(Debug, Clone, Serialize)]
pub struct JsonEntry {
    /// The address, 64 hex characters.
    pub addr: String,
    /// `leaf`, `recipe` or `missing`.
    pub kind: &'static str,
    /// A recipe's `name/version`.
    pub function: Option<String>,
    /// The node that computed the output.
    pub node: Option<String>,
    /// The compute span's trace id, 32 hex characters.
    pub trace_id: Option<String>,
    /// The compute span's id, 16 hex characters.
    pub span_id: Option<String>,
    /// When the compute started, RFC 3339 UTC with microseconds.
    pub computed_at: Option<String>,
    /// How long the compute took.
    pub duration_seconds: Option<f64>,
    /// BLAKE3 of the output, 64 hex characters.
    pub output_hash: Option<String>,
    /// The output's size.
    pub output_bytes: Option<u64>,
    /// A leaf's size.
    pub size: Option<u64>,
    /// When a leaf was stored, RFC 3339 UTC.
    pub stored_at: Option<String>,
    /// A recipe's audits.
    pub audits: Option<JsonAudits>,
    /// A recipe's: whether an audit ever disagreed.
    pub disputed: Option<bool>,
    /// A computed recipe's: whether its record is signed.
    pub signed: Option<bool>,
    /// A computed recipe's: `ok`, `fails`, `unsigned` or `unchecked` (no `--verify-key`).
    pub signature: Option<&'static str>,
    /// Why the signature fails, or why the record could not be read.
    pub error: Option<String>,
    /// A recipe's inputs, in order (a leaf's and a missing address's are empty).
    pub inputs: Vec<JsonNode>,
    /// The address asked only: whether the server cut its answer short of the depth asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated: Option<bool>,
}

/// A recipe's audit tallies in the JSON.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct JsonAudits {
    /// Recomputations that gave the same bytes.
    #[serde(rename = "match")]
    pub matches: u64,
    /// Recomputations that gave other bytes.
    pub mismatch: u64,
    /// Recomputations that failed.
    pub error: u64,
}

fn json_entry(entry: &Entry, inputs: Vec<JsonNode>) -> JsonEntry {
    let recipe = entry.kind == Kind::Recipe;
    let leaf = entry.kind == Kind::Leaf;
    let record = entry.record.as_ref().ok().and_then(Option::as_ref);
    let span = record.and_then(|s| s.record.span);
    let error = match (&entry.record, &entry.signature) {
        (_, Some(Signature::Fails(why))) => Some(why.clone()),
        (Err(e), _) => Some(format!("the record does not decode: {e}")),
        _ => None,
    };
    JsonEntry {
        addr: entry.addr.to_string(),
        kind: entry.kind.as_str(),
        function: entry.function.clone(),
        node: record.map(|s| s.record.node.clone()),
        trace_id: span.map(|s| s.trace_hex()),
        span_id: span.map(|s| s.span_hex()),
        computed_at: record.and_then(|s| rfc3339(s.record.started_at_micros)),
        duration_seconds: record.map(|s| s.record.duration_micros as f64 / 1e6),
        output_hash: record.map(|s| s.record.output_hash.to_string()),
        output_bytes: record.map(|s| s.record.output_bytes),
        size: leaf.then_some(entry.leaf_size),
        stored_at: (leaf && entry.stored_at_micros != 0)
            .then(|| rfc3339(entry.stored_at_micros))
            .flatten(),
        audits: recipe.then_some(JsonAudits {
            matches: entry.audits.matches,
            mismatch: entry.audits.mismatches,
            error: entry.audits.errors,
        }),
        disputed: recipe.then_some(entry.audits.disputed()),
        signed: record.map(|s| s.signature.is_some()),
        signature: entry.signature.as_ref().map(Signature::as_str),
        error,
        inputs,
        truncated: None,
    }
}
