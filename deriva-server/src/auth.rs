//! Scoped bearer tokens (`--auth-tokens FILE`).
//!
//! Each line of the file is `sha256:<hex of the token's SHA-256> SCOPES NAME`: SCOPES a comma
//! list of `read`, `write` and `admin`, NAME what logs and spans call the caller (`auth.name`).
//! Blank lines and lines starting with `#` are skipped. The file holds hashes, never tokens.
//!
//! A request carries `authorization: Bearer <token>`. The server hashes the token and compares
//! the hash with every entry in constant time (no early exit, and the same work whichever
//! entry matches, if any). A missing, malformed or unknown token is `UNAUTHENTICATED`; a token
//! without the scope an RPC needs is `PERMISSION_DENIED`. Messages name the scope needed,
//! never the tokens or names that exist.

use std::fmt;
use std::path::Path;

use subtle::ConstantTimeEq as _;

pub use deriva_core::token::Scope;

/// One line of the token file.
#[derive(Clone)]
struct Entry {
    digest: [u8; 32],
    scopes: u8,
    name: String,
}

/// The tokens the server accepts.
#[derive(Clone)]
pub struct Tokens {
    entries: Vec<Entry>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: never the hashes.
        f.debug_struct("Tokens")
            .field("names", &self.names())
            .finish()
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No `authorization` metadata.
    Missing,
    /// `authorization` is not `Bearer <token>`.
    Malformed,
    /// The token is in no entry.
    Unknown,
    /// The token (its entry's name) lacks the scope.
    Scope {
        /// The scope the request needs.
        needed: Scope,
        /// The caller, by its entry's name.
        name: String,
    },
}

impl AuthError {
    /// The `reason` label of `deriva_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::Unknown => "unknown",
            Self::Scope { .. } => "scope",
        }
    }

    /// The message a refused caller gets, naming the scope needed.
    pub fn message(&self, needed: Scope) -> String {
        match self {
            Self::Missing => format!(
                "this server requires a bearer token (authorization: Bearer …) with the {needed} scope"
            ),
            Self::Malformed => format!(
                "the authorization metadata is not `Bearer <token>`; a token with the {needed} scope is required"
            ),
            Self::Unknown => {
                format!(
                    "the bearer token is not accepted; a token with the {needed} scope is required"
                )
            }
            Self::Scope { needed, .. } => {
                format!("the bearer token lacks the {needed} scope this call requires")
            }
        }
    }

    /// The gRPC status: `UNAUTHENTICATED`, or `PERMISSION_DENIED` for a missing scope.
    pub fn status(&self, needed: Scope) -> tonic::Status {
        match self {
            Self::Scope { .. } => tonic::Status::permission_denied(self.message(needed)),
            _ => tonic::Status::unauthenticated(self.message(needed)),
        }
    }
}

impl Tokens {
    /// Reads and parses the token file at `path`.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--auth-tokens {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("--auth-tokens {}: {e}", path.display()))
    }

    /// Parses the text of a token file; the error names the line and what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut entries: Vec<Entry> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |what: String| format!("line {}: {what}", i + 1);
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [hash, scopes, name] = fields[..] else {
                return Err(at(format!(
                    "expected `sha256:<64 hex> SCOPES NAME`, found {} fields",
                    fields.len()
                )));
            };
            let digest = hash
                .strip_prefix("sha256:")
                .and_then(|h| hex::decode(h).ok())
                .and_then(|d| <[u8; 32]>::try_from(d).ok())
                .ok_or_else(|| {
                    at("the first field must be `sha256:` and the 64 hex characters of the token's SHA-256 (not the token)".into())
                })?;
            let bits = deriva_core::token::parse_scopes(scopes).map_err(at)?;
            deriva_core::token::check_name(name).map_err(at)?;
            if entries.iter().any(|e| e.digest == digest) {
                return Err(at("the same token hash appears twice".into()));
            }
            entries.push(Entry {
                digest,
                scopes: bits,
                name: name.to_owned(),
            });
        }
        if entries.is_empty() {
            return Err("no token: every request would be refused".into());
        }
        Ok(Self { entries })
    }

    /// The names of the entries, in file order.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }

    /// Checks the `authorization` value of a request for `needed`; the caller's name if it
    /// may.
    pub fn check(&self, authorization: Option<&[u8]>, needed: Scope) -> Result<&str, AuthError> {
        let value = authorization.ok_or(AuthError::Missing)?;
        let token = std::str::from_utf8(value)
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Malformed)?;
        let digest = deriva_core::token::digest(token);
        // Every entry is compared, in constant time; the match, if any, is picked without a
        // branch on the secret.
        let mut found: Option<&Entry> = None;
        for entry in &self.entries {
            let equal = bool::from(entry.digest.ct_eq(&digest));
            found = if equal { Some(entry) } else { found };
        }
        let entry = found.ok_or(AuthError::Unknown)?;
        if entry.scopes & needed.bit() == 0 {
            return Err(AuthError::Scope {
                needed,
                name: entry.name.clone(),
            });
        }
        Ok(&entry.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(lines: &[(&str, &str, &str)]) -> String {
        lines
            .iter()
            .map(|(token, scopes, name)| {
                format!("{} {scopes} {name}\n", deriva_core::token::hashed(token))
            })
            .collect()
    }

    #[test]
    fn tokens_grant_exactly_their_scopes() {
        let text = format!(
            "# comment\n\n{}",
            file(&[("t-read", "read", "reader"), ("t-rw", "read,write", "ci")])
        );
        let tokens = Tokens::parse(&text).unwrap();
        assert_eq!(tokens.names(), ["reader", "ci"]);
        assert_eq!(
            tokens.check(Some(b"Bearer t-read"), Scope::Read),
            Ok("reader")
        );
        assert_eq!(tokens.check(Some(b"bearer  t-rw "), Scope::Write), Ok("ci"));
        assert_eq!(
            tokens.check(Some(b"Bearer t-read"), Scope::Write),
            Err(AuthError::Scope {
                needed: Scope::Write,
                name: "reader".into()
            })
        );
        assert_eq!(tokens.check(None, Scope::Read), Err(AuthError::Missing));
        assert_eq!(
            tokens.check(Some(b"Basic dXNlcg=="), Scope::Read),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            tokens.check(Some(b"Bearer "), Scope::Read),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            tokens.check(Some(b"Bearer nope"), Scope::Read),
            Err(AuthError::Unknown)
        );
        let msg = AuthError::Unknown.message(Scope::Admin);
        assert!(msg.contains("admin") && !msg.contains("reader") && !msg.contains("ci"));
    }

    #[test]
    fn bad_files_name_the_line() {
        for (text, want) in [
            ("sha256:abc read x\n", "line 1: the first field"),
            ("deriva_tok read x\n", "not the token"),
            (&file(&[("a", "read,root", "x")]), "unknown scope \"root\""),
            (&file(&[("a", "read", "bad name!")]), "found 4 fields"),
            (&file(&[("a", "read", "b@d!")]), "must be 1 to 64 letters"),
            (
                &file(&[("a", "read", "x"), ("a", "write", "y")]),
                "line 2: the same token hash",
            ),
            ("# nothing\n", "no token"),
        ] {
            let err = Tokens::parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
