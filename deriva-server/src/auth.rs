//! Scoped bearer tokens (`--auth-tokens FILE`).
//!
//! Each line of the file is `sha256:<hex of the token's SHA-256> SCOPES NAME`: SCOPES a comma
//! list of `read`, `write` and `admin`, NAME what logs and spans call the caller (`auth.name`).
//! Blank lines and lines starting with `#` are skipped. The file holds hashes, never tokens.
//!
//! The file is read again by [`Tokens::reload`] (SIGHUP): a token removed from it is refused
//! from the next request on, on connections already open too; a file that does not read or
//! parse leaves the tokens in use as they were. A file that other users may write is refused
//! (at start and on reload), naming it and its mode; one they may read is loaded with a warning
//! ([`read_secret_file`], also used for the TLS key).
//!
//! A request carries `authorization: Bearer <token>`. The server hashes the token and compares
//! the hash with every entry in constant time (no early exit, and the same work whichever
//! entry matches, if any). A missing, malformed or unknown token is `UNAUTHENTICATED`; a token
//! without the scope an RPC needs is `PERMISSION_DENIED`. Messages name the scope needed,
//! never the tokens or names that exist.

use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use subtle::ConstantTimeEq as _;

pub use deriva_util::token::Scope;

/// The span field (and so the log field) naming the caller under `--auth-tokens`: the name of
/// its token's entry, never the token.
pub const AUTH_NAME: &str = "auth.name";

/// One line of the token file.
#[derive(Clone)]
struct Entry {
    digest: [u8; 32],
    scopes: u8,
    name: String,
}

/// The tokens the server accepts: the entries of the file, swapped whole by
/// [`Tokens::reload`].
pub struct Tokens {
    /// The file they were read from (`None`: parsed from text, nothing to reload).
    path: Option<PathBuf>,
    entries: RwLock<Arc<[Entry]>>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: never the hashes.
        f.debug_struct("Tokens")
            .field("path", &self.path)
            .field("names", &self.names())
            .finish()
    }
}

/// Reads a file that holds secrets (`flag` names it in errors and warnings): refused if users
/// other than its owner may write it (group or others `w`), so that no one else can grant
/// themselves a token or swap the key; a warning if they may read it. The mode is that of the
/// file opened (a symbolic link's target), read from the open handle, so the check and the read
/// see the same file.
pub(crate) fn read_secret_file(path: &Path, flag: &str) -> Result<Vec<u8>, String> {
    let mut file =
        std::fs::File::open(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = file
            .metadata()
            .map_err(|e| format!("{flag} {}: {e}", path.display()))?
            .permissions()
            .mode()
            & 0o7777;
        if mode & 0o022 != 0 {
            return Err(format!(
                "{flag} {}: mode {mode:04o} lets other users write it; refused (chmod go-w, \
                 0600 is best)",
                path.display()
            ));
        }
        if mode & 0o044 != 0 {
            tracing::warn!(
                "{flag} {}: mode {mode:04o} lets other users read it (chmod go-r, 0600 is best)",
                path.display()
            );
        }
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    Ok(bytes)
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
    /// Reads and parses the token file at `path` (see [`read_secret_file`] for its mode).
    pub fn load(path: &Path) -> Result<Self, String> {
        let entries = Self::read(path)?;
        Ok(Self {
            path: Some(path.to_owned()),
            entries: RwLock::new(entries.into()),
        })
    }

    /// Reads the file [`Tokens::load`] read again, and uses its entries from the next request
    /// on: the number of tokens. On an error (naming the file) the tokens in use stay.
    pub fn reload(&self) -> Result<usize, String> {
        let path = self
            .path
            .as_deref()
            .ok_or("the tokens were not read from a file")?;
        let entries = Self::read(path)?;
        let count = entries.len();
        *self.entries.write() = entries.into();
        Ok(count)
    }

    /// The file the tokens were read from.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn read(path: &Path) -> Result<Vec<Entry>, String> {
        let bytes = read_secret_file(path, "--auth-tokens")?;
        let text = String::from_utf8(bytes)
            .map_err(|_| format!("--auth-tokens {}: not UTF-8 text", path.display()))?;
        Self::parse_entries(&text).map_err(|e| format!("--auth-tokens {}: {e}", path.display()))
    }

    /// Parses the text of a token file; the error names the line and what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        Ok(Self {
            path: None,
            entries: RwLock::new(Self::parse_entries(text)?.into()),
        })
    }

    fn parse_entries(text: &str) -> Result<Vec<Entry>, String> {
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
            let bits = deriva_util::token::parse_scopes(scopes).map_err(at)?;
            deriva_util::token::check_name(name).map_err(at)?;
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
        Ok(entries)
    }

    /// The names of the entries, in file order.
    pub fn names(&self) -> Vec<String> {
        self.entries.read().iter().map(|e| e.name.clone()).collect()
    }

    /// Checks the `authorization` value of a request for `needed` against the tokens in use
    /// now; the caller's name if it may.
    pub fn check(&self, authorization: Option<&[u8]>, needed: Scope) -> Result<String, AuthError> {
        self.identify(authorization)?.require(needed)
    }

    /// The caller the `authorization` value of a request names, among the tokens in use now,
    /// with every scope of its entry: one hash and one pass over the entries answer every
    /// question about it.
    pub fn identify(&self, authorization: Option<&[u8]>) -> Result<Caller, AuthError> {
        let value = authorization.ok_or(AuthError::Missing)?;
        let token = std::str::from_utf8(value)
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Malformed)?;
        let digest = deriva_util::token::digest(token);
        // The entries in use now (a reload swaps the whole list, never part of it).
        let entries = self.entries.read().clone();
        // Every entry is compared, in constant time; the match, if any, is picked without a
        // branch on the secret.
        let mut found: Option<&Entry> = None;
        for entry in entries.iter() {
            let equal = bool::from(entry.digest.ct_eq(&digest));
            found = if equal { Some(entry) } else { found };
        }
        let entry = found.ok_or(AuthError::Unknown)?;
        Ok(Caller {
            name: entry.name.clone(),
            scopes: entry.scopes,
        })
    }
}

/// A caller whose token is in the file: its entry's name and scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The entry's name (`auth.name`).
    pub name: String,
    scopes: u8,
}

impl Caller {
    /// Whether its token has `scope`.
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes & scope.bit() != 0
    }

    /// Its name if its token has `needed`, else [`AuthError::Scope`].
    pub fn require(self, needed: Scope) -> Result<String, AuthError> {
        if self.has(needed) {
            Ok(self.name)
        } else {
            Err(AuthError::Scope {
                needed,
                name: self.name,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(lines: &[(&str, &str, &str)]) -> String {
        lines
            .iter()
            .map(|(token, scopes, name)| {
                format!("{} {scopes} {name}\n", deriva_util::token::hashed(token))
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
            Ok("reader".to_owned())
        );
        assert_eq!(
            tokens.check(Some(b"bearer  t-rw "), Scope::Write),
            Ok("ci".to_owned())
        );
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

    #[test]
    fn reload_swaps_the_tokens_and_a_bad_file_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let write = |text: &str| {
            std::fs::write(&path, text).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
        };
        write(&file(&[("old", "read", "old")]));
        let tokens = Tokens::load(&path).unwrap();
        assert_eq!(
            tokens.check(Some(b"Bearer old"), Scope::Read),
            Ok("old".into())
        );

        write(&file(&[("new", "read", "new")]));
        assert_eq!(tokens.reload(), Ok(1));
        assert_eq!(
            tokens.check(Some(b"Bearer old"), Scope::Read),
            Err(AuthError::Unknown)
        );
        assert_eq!(
            tokens.check(Some(b"Bearer new"), Scope::Read),
            Ok("new".into())
        );

        write("sha256:nothex read broken\n");
        let err = tokens.reload().unwrap_err();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("line 1"),
            "{err}"
        );
        assert_eq!(
            tokens.check(Some(b"Bearer new"), Scope::Read),
            Ok("new".into())
        );

        let parsed = Tokens::parse(&file(&[("p", "read", "p")])).unwrap();
        assert!(parsed.reload().is_err(), "nothing to reload");
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_file_others_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, file(&[("t", "read", "t")])).unwrap();
        for (mode, refused) in [
            (0o600, false),
            (0o644, false),
            (0o640, false),
            (0o666, true),
            (0o620, true),
            (0o602, true),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let loaded = Tokens::load(&path);
            assert_eq!(loaded.is_err(), refused, "mode {mode:o}: {loaded:?}");
            if let Err(e) = loaded {
                assert!(
                    e.contains(&format!("{mode:04o}")) && e.contains(&path.display().to_string()),
                    "{e}"
                );
            }
        }
    }
}
