//! The provenance flags: sampled audits, record signatures, and where a trace that this node no
//! longer holds is shown.

use std::path::PathBuf;

use deriva_compute::OnMismatch;

/// `--audit-*`, `--on-mismatch`, `--signing-key`, `--trace-url-template`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProvenanceArgs {
    /// Fraction of hits of computed outputs (0 to 1) that are computed again in the background
    /// and compared with the output's record (deriva_audit_total, the record's audits); 0 turns
    /// audits off. On the remote backend a node audits only outputs another node computed.
    #[arg(long, env = "DERIVA_AUDIT_SAMPLE_RATIO", default_value_t = 0.0, value_parser = parse_sample_ratio)]
    pub audit_sample_ratio: f64,
    /// Most audits running at once; an audit also starts only while a compute slot is free, so
    /// requests come first.
    #[arg(long, env = "DERIVA_AUDIT_MAX_CONCURRENT", default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub audit_max_concurrent: usize,
    /// What an audit that gets other bytes does: keep (serve the output, marked disputed) or
    /// evict (drop it everywhere, as Invalidate would; the next Get computes it again).
    #[arg(long, env = "DERIVA_ON_MISMATCH", value_enum, default_value_t = MismatchAction::Keep)]
    pub on_mismatch: MismatchAction,
    /// Sign every materialization record with this ed25519 private key (PKCS#8 PEM; `deriva-server
    /// keygen` makes one); `deriva provenance --verify-key` checks the signatures.
    #[arg(long, env = "DERIVA_SIGNING_KEY", value_name = "PEM")]
    pub signing_key: Option<PathBuf>,
    /// Where the debug pages send a link to a trace this node no longer holds (a hit's origin
    /// computed on another node or long ago): a URL with {trace_id}, such as
    /// https://jaeger.example/trace/{trace_id}.
    #[arg(long, env = "DERIVA_TRACE_URL_TEMPLATE", value_parser = parse_trace_url_template)]
    pub trace_url_template: Option<String>,
}

/// `--on-mismatch`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MismatchAction {
    /// Keep serving the disputed output.
    #[default]
    Keep,
    /// Drop the disputed output.
    Evict,
}

impl From<MismatchAction> for OnMismatch {
    fn from(action: MismatchAction) -> Self {
        match action {
            MismatchAction::Keep => OnMismatch::Keep,
            MismatchAction::Evict => OnMismatch::Evict,
        }
    }
}

/// The provenance settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProvenanceConfig {
    /// `--audit-sample-ratio`.
    pub audit_sample_ratio: f64,
    /// `--audit-max-concurrent`.
    pub audit_max_concurrent: usize,
    /// `--on-mismatch`.
    pub on_mismatch: OnMismatch,
    /// `--signing-key`.
    pub signing_key: Option<PathBuf>,
    /// `--trace-url-template`.
    pub trace_url_template: Option<String>,
}

impl ProvenanceArgs {
    /// The settings these flags describe.
    pub fn into_config(self) -> ProvenanceConfig {
        ProvenanceConfig {
            audit_sample_ratio: self.audit_sample_ratio,
            audit_max_concurrent: self.audit_max_concurrent,
            on_mismatch: self.on_mismatch.into(),
            signing_key: self.signing_key.filter(|p| !p.as_os_str().is_empty()),
            trace_url_template: self.trace_url_template.filter(|t| !t.is_empty()),
        }
    }
}

impl ProvenanceConfig {
    /// The defaults: no audits (at most one at a time once on), keep, unsigned, no template.
    pub fn new() -> Self {
        Self {
            audit_max_concurrent: 1,
            ..Self::default()
        }
    }
}

fn parse_sample_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a fraction from 0 to 1")),
    }
}

fn parse_trace_url_template(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Ok(String::new());
    }
    if !(s.starts_with("http://") || s.starts_with("https://")) {
        return Err(format!("{s:?} is not an http:// or https:// URL"));
    }
    if !s.contains("{trace_id}") {
        return Err(format!(
            "{s:?} has no {{trace_id}}, the place of the trace id"
        ));
    }
    if s.chars()
        .any(|c| c.is_control() || c == '"' || c == '<' || c == '>')
    {
        return Err(format!("{s:?} holds characters a link cannot"));
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_named() {
        for bad in ["-0.1", "1.5", "NaN", "x"] {
            assert!(
                parse_sample_ratio(bad).unwrap_err().contains("fraction"),
                "{bad}"
            );
        }
        assert_eq!(parse_sample_ratio("1").unwrap(), 1.0);
        let err = parse_trace_url_template("https://jaeger/trace/").unwrap_err();
        assert!(err.contains("{trace_id}"), "{err}");
        let err = parse_trace_url_template("javascript:alert(1)//{trace_id}").unwrap_err();
        assert!(err.contains("http"), "{err}");
        let err = parse_trace_url_template("https://j/\"{trace_id}").unwrap_err();
        assert!(err.contains("characters"), "{err}");
        assert_eq!(
            parse_trace_url_template("https://jaeger.example/trace/{trace_id}").unwrap(),
            "https://jaeger.example/trace/{trace_id}"
        );
    }
}
