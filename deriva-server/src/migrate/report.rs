//! What a migration reports: [`Report`], with one [`ObjectCounts`] per kind of object.

use indicatif::HumanBytes;
use serde::Serialize;

/// Counts of one kind of object. In a copy: `copied` were written now, `skipped` were in the
/// destination already, `failed` could not be copied (gone from the source, or an input
/// missing). In a dry run, `copied` would be. In `--verify`: `checked` were read back and
/// verified, `failed` are damaged (or a recipe's input is missing), `missing` are in the
/// source but not in the destination. `bytes` were copied (or would be, or were read back).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ObjectCounts {
    /// Written now (or, in a dry run, to be written).
    pub copied: u64,
    /// Already in the destination.
    pub skipped: u64,
    /// Could not be copied, or (verify) damaged in the destination.
    pub failed: u64,
    /// (verify) Read back and verified.
    pub checked: u64,
    /// (verify) In the source, not in the destination.
    pub missing: u64,
    /// Bytes copied, to be copied, or read back.
    pub bytes: u64,
}

/// The final report (`--json` prints it).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Report {
    /// `copy`, `dry-run` or `verify`.
    pub mode: String,
    /// The source, as the logs name it (passwords hidden).
    pub source: String,
    /// The destination, likewise.
    pub destination: String,
    /// Leaves.
    pub leaves: ObjectCounts,
    /// Recipes (with their edges and depths).
    pub recipes: ObjectCounts,
    /// The output tier (`--include-outputs` only).
    pub outputs: Option<ObjectCounts>,
    /// Materialization records (their audits start again in the destination).
    #[serde(default)]
    pub records: ObjectCounts,
    /// Pins (the roots garbage collection keeps), copied after what they name.
    #[serde(default)]
    pub pins: ObjectCounts,
    /// Leaf and output bytes copied (or to be, or read back).
    pub bytes: u64,
    /// Seconds from start to end.
    pub duration_seconds: f64,
    /// The first failures, each naming its object (all are counted in the tallies).
    pub errors: Vec<String>,
}

impl Report {
    /// Objects that failed, or (verify) are damaged or missing.
    pub fn problems(&self) -> u64 {
        [
            Some(&self.leaves),
            Some(&self.recipes),
            self.outputs.as_ref(),
            Some(&self.records),
            Some(&self.pins),
        ]
        .into_iter()
        .flatten()
        .map(|t| t.failed + t.missing)
        .sum()
    }

    /// The report for a person, one line per kind.
    pub fn human(&self) -> String {
        let mut out = format!(
            "{} {} -> {} in {:.1} s, {}\n",
            self.mode,
            self.source,
            self.destination,
            self.duration_seconds,
            HumanBytes(self.bytes)
        );
        let kinds = [
            ("leaves", Some(&self.leaves)),
            ("recipes", Some(&self.recipes)),
        ];
        for (name, tally) in kinds.into_iter().chain([
            ("outputs", self.outputs.as_ref()),
            ("records", Some(&self.records)),
            ("pins", Some(&self.pins)),
        ]) {
            let Some(t) = tally else { continue };
            let line = if self.mode == "verify" {
                format!(
                    "  {name}: {} verified, {} damaged, {} missing\n",
                    t.checked, t.failed, t.missing
                )
            } else {
                let verb = if self.mode == "dry-run" {
                    "to copy"
                } else {
                    "copied"
                };
                format!(
                    "  {name}: {} {verb}, {} already there, {} failed\n",
                    t.copied, t.skipped, t.failed
                )
            };
            out.push_str(&line);
        }
        for e in &self.errors {
            out.push_str(&format!("  error: {e}\n"));
        }
        out
    }
}
