//! `deriva provenance`: the `Provenance` answer as a tree or JSON, and the verdict of
//! `--verify-key`.

use std::path::Path;
use std::time::SystemTime;

use deriva_util::signing::VerifyingKey;

use super::emit;
use crate::args::parse_addr;
use crate::client::{CliError, Target};
use crate::provenance::Provenance;

/// Prints the provenance of `addr` to `depth` (a tree, or JSON with `json`); with `verify_key`,
/// checks every record and fails naming each recipe whose record does not verify, after
/// printing.
pub(super) async fn provenance(
    server: &Target,
    addr: &str,
    depth: u32,
    json: bool,
    verify_key: Option<&Path>,
) -> Result<(), CliError> {
    let addr = parse_addr("provenance", addr)?;
    // The key is read before any RPC: a bad file fails the same way with or without a server.
    let key = verify_key
        .map(|path| {
            VerifyingKey::load(path).map_err(|e| CliError::Usage(format!("--verify-key: {e}")))
        })
        .transpose()?;
    let answer = crate::client::provenance(server, addr, depth).await?;
    let tree = Provenance::read(addr, depth, &answer, key.as_ref()).map_err(|message| {
        CliError::Failed {
            context: format!("provenance {addr}"),
            message,
        }
    })?;
    if json {
        let text = serde_json::to_string_pretty(&tree.json()).map_err(|e| CliError::Failed {
            context: format!("provenance {addr}"),
            message: e.to_string(),
        })?;
        emit(&format!("{text}\n"))?;
    } else {
        emit(&tree.text(SystemTime::now()))?;
    }
    verdict(&tree)
}

/// `Ok` unless a record failed verification; else an error naming every such recipe.
fn verdict(tree: &Provenance) -> Result<(), CliError> {
    let failures = tree.failures();
    if failures.is_empty() {
        return Ok(());
    }
    let named: Vec<String> = failures
        .iter()
        .map(|(addr, why)| format!("{addr} ({why})"))
        .collect();
    Err(CliError::Failed {
        context: "provenance --verify-key".into(),
        message: format!(
            "{} record(s) fail verification: {}",
            failures.len(),
            named.join(", ")
        ),
    })
}
