//! `deriva provenance`: a `Provenance` answer read into a [`Provenance`] (each entry decoded,
//! each record's signature checked if a key is given), and rendered as a tree for a terminal
//! ([`Provenance::text`]) or as one JSON object ([`Provenance::json`]).
//!
//! The server answers a flat list, breadth-first from the address asked, each address once; an
//! entry's inputs name other entries. Both renderings walk it depth-first from the address
//! asked, in input order, without recursion (a chain may be as deep as [`MAX_DEPTH`]). An
//! address met again (an input shared in a DAG) is described once, at its first place, and
//! only referred to after, so the output grows with the DAG, not with its paths. An input
//! without an entry (below the depth asked, or cut when the answer was truncated) is
//! `unexplored`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deriva_core::CAddr;
use deriva_core::provenance::{Audits, SignedRecord};
use deriva_proto::{ProvenanceEntry, ProvenanceResponse, addr_from_bytes};
use deriva_util::signing::VerifyingKey;

use crate::human::{age_text, bytes_text, duration_text, indent, rfc3339};

mod json;
#[cfg(test)]
mod tests;

pub use json::{JsonAudits, JsonEntry, JsonNode};

/// The levels of inputs `deriva provenance` asks for when not given `--depth`: deep enough for
/// the usual pipeline, short enough to read on a terminal.
pub const DEFAULT_DEPTH: u32 = 8;
/// The largest `--depth`. The server answers at most 4,096 entries anyway.
pub const MAX_DEPTH: u32 = 1024;
/// Deepest level of the tree indented; deeper lines show their level instead.
const MAX_INDENT: usize = 16;

/// What is stored at an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A leaf.
    Leaf,
    /// A recipe.
    Recipe,
    /// Nothing (an input collected, or never stored).
    Missing,
}

impl Kind {
    /// `leaf`, `recipe` or `missing`, as the server and the JSON name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Leaf => "leaf",
            Self::Recipe => "recipe",
            Self::Missing => "missing",
        }
    }
}

/// What became of a record's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// Signed, and the signature verifies with the key given.
    Ok,
    /// With a key given: the signature does not verify, or the record does not decode or is
    /// not this recipe's. Why.
    Fails(String),
    /// No signature (allowed: a node without a signing key).
    Unsigned,
    /// Signed, or unreadable, but no key was given to check it.
    Unchecked,
}

impl Signature {
    /// `ok`, `fails`, `unsigned` or `unchecked`: its value in the JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Fails(_) => "fails",
            Self::Unsigned => "unsigned",
            Self::Unchecked => "unchecked",
        }
    }
}

/// One address of the answer, decoded.
#[derive(Debug, Clone)]
struct Entry {
    addr: CAddr,
    kind: Kind,
    /// Levels below the address asked (the server's breadth-first depth).
    depth: u32,
    leaf_size: u64,
    /// When a leaf was stored, microseconds since the Unix epoch; 0 if unknown.
    stored_at_micros: u64,
    /// A recipe's `name/version`.
    function: Option<String>,
    inputs: Vec<CAddr>,
    /// A recipe's record: `Ok(None)` if not computed, `Err` if it does not decode.
    record: Result<Option<SignedRecord>, String>,
    audits: Audits,
    /// `None` without a record.
    signature: Option<Signature>,
}

/// The provenance of one address: its entry and those of its inputs, to the depth asked.
#[derive(Debug, Clone)]
pub struct Provenance {
    /// The answer's entries, the address asked first.
    entries: Vec<Entry>,
    /// Where each address is in `entries`.
    index: HashMap<CAddr, usize>,
    /// The depth asked.
    depth: u32,
    /// Whether the server cut the answer short of that depth.
    truncated: bool,
    /// Whether signatures were checked.
    checked: bool,
}

/// One step of the depth-first walk of [`Provenance::walk`]; `level` is the place in the tree
/// (0 for the address asked).
enum Step<'a> {
    /// An entry met for the first time; its inputs follow, then its [`Step::Leave`].
    Enter(&'a Entry, usize),
    /// An entry already described above.
    Repeat(&'a Entry, usize),
    /// An input without an entry.
    Unexplored(CAddr),
    /// The end of an entry's inputs.
    Leave(&'a Entry, usize),
}

impl Provenance {
    /// Reads the answer to `Provenance{asked, depth}`, checking every record's signature with
    /// `key` if given. An answer that does not start with `asked`, or holds a malformed
    /// address or an unknown kind, is an error (the message says what).
    pub fn read(
        asked: CAddr,
        depth: u32,
        answer: &ProvenanceResponse,
        key: Option<&VerifyingKey>,
    ) -> Result<Self, String> {
        let mut entries = Vec::with_capacity(answer.entries.len());
        let mut index = HashMap::with_capacity(answer.entries.len());
        for raw in &answer.entries {
            let entry = read_entry(raw, key)?;
            index.entry(entry.addr).or_insert(entries.len());
            entries.push(entry);
        }
        match entries.first() {
            None => return Err("the server answered no entries".into()),
            Some(first) if first.addr != asked => {
                return Err(format!(
                    "the server answered the provenance of {} instead",
                    first.addr
                ));
            }
            Some(_) => {}
        }
        Ok(Self {
            entries,
            index,
            depth,
            truncated: answer.truncated,
            checked: key.is_some(),
        })
    }

    /// The recipes whose record fails verification, with why, in the answer's order (none
    /// unless a key was given).
    pub fn failures(&self) -> Vec<(CAddr, &str)> {
        self.entries
            .iter()
            .filter_map(|e| match &e.signature {
                Some(Signature::Fails(why)) => Some((e.addr, why.as_str())),
                _ => None,
            })
            .collect()
    }

    /// Walks the tree depth-first from the address asked, inputs in order, calling `visit` for
    /// each step. Iterative: a deep chain does not recurse.
    fn walk<'a>(&'a self, mut visit: impl FnMut(Step<'a>)) {
        let mut seen = vec![false; self.entries.len()];
        seen[0] = true;
        visit(Step::Enter(&self.entries[0], 0));
        // (entry, its next input) for each entry being walked, the root at the bottom.
        let mut stack: Vec<(usize, usize)> = vec![(0, 0)];
        while let Some(&(at, next)) = stack.last() {
            let entry = &self.entries[at];
            let level = stack.len();
            let Some(input) = entry.inputs.get(next) else {
                stack.pop();
                visit(Step::Leave(entry, level - 1));
                continue;
            };
            if let Some(top) = stack.last_mut() {
                top.1 += 1;
            }
            match self.index.get(input) {
                None => visit(Step::Unexplored(*input)),
                Some(&j) if seen[j] => visit(Step::Repeat(&self.entries[j], level)),
                Some(&j) => {
                    seen[j] = true;
                    visit(Step::Enter(&self.entries[j], level));
                    stack.push((j, 0));
                }
            }
        }
    }

    /// The tree for a terminal: a header, one line per entry indented by its place in the
    /// tree (ages counted to `now`), a line per address shown again, a line per entry whose
    /// inputs were not explored, and the tallies of signatures if checked and a last line if
    /// the answer was truncated.
    pub fn text(&self, now: SystemTime) -> String {
        let mut out = format!(
            "provenance of {} (depth {}, {} entries)\n",
            self.entries[0].addr,
            self.depth,
            self.entries.len()
        );
        // Unexplored inputs of each entry being walked.
        let mut unexplored: Vec<usize> = Vec::new();
        self.walk(|step| match step {
            Step::Enter(entry, level) => {
                unexplored.push(0);
                let _ = writeln!(
                    out,
                    "{}{}",
                    indent(level, MAX_INDENT),
                    entry_line(entry, now)
                );
            }
            Step::Repeat(entry, level) => {
                let _ = writeln!(
                    out,
                    "{}{} {} (shown above)",
                    indent(level, MAX_INDENT),
                    entry.kind.as_str(),
                    entry.addr.short()
                );
            }
            Step::Unexplored(_) => {
                if let Some(n) = unexplored.last_mut() {
                    *n += 1;
                }
            }
            Step::Leave(entry, level) => {
                let n = unexplored.pop().unwrap_or(0);
                if n > 0 {
                    let why = if entry.depth < self.depth {
                        "cut: the answer was truncated".to_owned()
                    } else {
                        format!("below --depth {}", self.depth)
                    };
                    let inputs = if n == 1 { "input" } else { "inputs" };
                    let _ = writeln!(
                        out,
                        "{}… {n} {inputs} not shown ({why})",
                        indent(level + 1, MAX_INDENT)
                    );
                }
            }
        });
        if self.checked {
            let count = |s: &str| {
                self.entries
                    .iter()
                    .filter(|e| e.signature.as_ref().is_some_and(|g| g.as_str() == s))
                    .count()
            };
            let _ = writeln!(
                out,
                "signatures: {} OK, {} unsigned, {} FAIL",
                count("ok"),
                count("unsigned"),
                count("fails")
            );
        }
        if self.truncated {
            let _ = writeln!(
                out,
                "(truncated: the server stopped at {} entries; inputs past them are not shown)",
                self.entries.len()
            );
        }
        out
    }
}

/// Decodes one entry of the answer and checks its record's signature with `key`.
fn read_entry(raw: &ProvenanceEntry, key: Option<&VerifyingKey>) -> Result<Entry, String> {
    let addr = addr_from_bytes("addr", &raw.addr).map_err(|e| format!("an entry's {e}"))?;
    let kind = match raw.kind.as_str() {
        "leaf" => Kind::Leaf,
        "recipe" => Kind::Recipe,
        "missing" => Kind::Missing,
        other => return Err(format!("entry {addr}: an unknown kind {other:?}")),
    };
    let inputs = raw
        .inputs
        .iter()
        .map(|i| addr_from_bytes("input", i).map_err(|e| format!("entry {addr}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let record = if raw.record.is_empty() {
        Ok(None)
    } else {
        SignedRecord::from_bytes(&raw.record)
            .map(Some)
            .map_err(|e| e.to_string())
    };
    let signature = check(&addr, &inputs, &record, key);
    Ok(Entry {
        addr,
        kind,
        depth: raw.depth,
        leaf_size: raw.leaf_size,
        stored_at_micros: raw.stored_at_unix_micros,
        function: (kind == Kind::Recipe)
            .then(|| format!("{}/{}", raw.function_name, raw.function_version)),
        inputs,
        record,
        audits: Audits {
            matches: raw.audit_match,
            mismatches: raw.audit_mismatch,
            errors: raw.audit_error,
        },
        signature,
    })
}

/// What becomes of the signature of the record of the recipe `addr` (whose inputs are
/// `inputs`): with `key`, it must decode, be this recipe's and verify over
/// [`deriva_core::provenance::Record::canonical_bytes`]. `None` without a record.
fn check(
    addr: &CAddr,
    inputs: &[CAddr],
    record: &Result<Option<SignedRecord>, String>,
    key: Option<&VerifyingKey>,
) -> Option<Signature> {
    let signed = match record {
        Ok(None) => return None,
        Err(e) => {
            return Some(match key {
                Some(_) => Signature::Fails(format!("the record does not decode: {e}")),
                None => Signature::Unchecked,
            });
        }
        Ok(Some(signed)) => signed,
    };
    let (Some(key), Some(signature)) = (key, &signed.signature) else {
        return Some(match signed.signature {
            None => Signature::Unsigned,
            Some(_) => Signature::Unchecked,
        });
    };
    let record = &signed.record;
    Some(if record.recipe != *addr {
        Signature::Fails(format!(
            "the record is of another recipe, {}",
            record.recipe
        ))
    } else if record.inputs != inputs {
        Signature::Fails("the record's inputs are not the recipe's".into())
    } else if !key.verify(&record.canonical_bytes(), signature) {
        Signature::Fails(format!(
            "the signature does not verify with the key {}",
            key.fingerprint()
        ))
    } else {
        Signature::Ok
    })
}

/// How long before `now` the time `micros` was, and the time itself:
/// `3 d ago (2026-12-04T10:00:00.000000Z)`.
fn when(micros: u64, now: SystemTime) -> String {
    let at = UNIX_EPOCH + Duration::from_micros(micros);
    let age = now.duration_since(at).unwrap_or_default();
    let time = rfc3339(micros).unwrap_or_else(|| "beyond the year 9999".into());
    format!("{} ago ({time})", age_text(age))
}

/// An entry's line of the tree: its kind, short address and what is known of it.
fn entry_line(entry: &Entry, now: SystemTime) -> String {
    let head = format!("{} {}", entry.kind.as_str(), entry.addr.short());
    let mut parts: Vec<String> = Vec::new();
    match entry.kind {
        Kind::Leaf => {
            parts.push(format!("{head} {}", bytes_text(entry.leaf_size)));
            parts.push(if entry.stored_at_micros == 0 {
                "put time unknown".into()
            } else {
                format!("put {}", when(entry.stored_at_micros, now))
            });
        }
        Kind::Missing => {
            parts.push(head);
            parts.push("not stored (collected, or never put)".into());
        }
        Kind::Recipe => {
            parts.push(format!(
                "{head} {}",
                entry.function.as_deref().unwrap_or_default()
            ));
            match &entry.record {
                Ok(None) => parts.push("not computed".into()),
                Err(e) => parts.push(format!("record unreadable: {e}")),
                Ok(Some(signed)) => {
                    let r = &signed.record;
                    parts.push(r.node.clone());
                    parts.push(when(r.started_at_micros, now));
                    parts.push(duration_text(r.duration_micros));
                    parts.push(r.span.map_or_else(
                        || "no trace".to_owned(),
                        |s| format!("trace {}", s.trace_hex()),
                    ));
                }
            }
            let a = entry.audits;
            if a.matches + a.mismatches + a.errors == 0 {
                if matches!(entry.record, Ok(Some(_))) {
                    parts.push("not audited".into());
                }
            } else {
                let mut audits = format!("audits {} match, {} mismatch", a.matches, a.mismatches);
                if a.errors > 0 {
                    let _ = write!(audits, ", {} error", a.errors);
                }
                parts.push(audits);
            }
            if a.disputed() {
                parts.push("DISPUTED".into());
            }
            match &entry.signature {
                None => {}
                Some(Signature::Ok) => parts.push("signature OK".into()),
                Some(Signature::Fails(why)) => parts.push(format!("signature FAILS: {why}")),
                Some(Signature::Unsigned) => parts.push("unsigned".into()),
                Some(Signature::Unchecked) if matches!(entry.record, Ok(Some(_))) => {
                    parts.push("signed".into());
                }
                Some(Signature::Unchecked) => {}
            }
        }
    }
    parts.join(" · ")
}
