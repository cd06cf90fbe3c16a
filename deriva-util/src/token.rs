//! Bearer tokens for `--auth-tokens`: how a token is made and how it is hashed for the token
//! file, shared by the server (which compares hashes) and the `deriva token new` command
//! (which makes one).
//!
//! A token is `deriva_` followed by 64 hex characters: 32 bytes from the operating system's
//! random source. The token file holds `sha256:<64 hex>`, the SHA-256 of the token's text,
//! never the token.

use std::fmt;

use sha2::{Digest, Sha256};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Get, Resolve, Status, Explain, ClusterStatus.
    Read,
    /// PutLeaf, PutLeafStream, PutRecipe, Invalidate, CascadeInvalidate, Verify.
    Write,
    /// GarbageCollect, Pin, Unpin, ListPins; `/metrics` and `/debug/*`.
    Admin,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 3] = [Self::Read, Self::Write, Self::Admin];

    /// The name in the token file: `read`, `write`, `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
        }
    }

    /// This scope's bit in a set of scopes.
    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses a comma list of scopes (`read,write`) into a set of [`Scope::bit`]s.
pub fn parse_scopes(list: &str) -> Result<u8, String> {
    let mut bits = 0u8;
    for name in list.split(',') {
        let scope = Scope::ALL
            .into_iter()
            .find(|s| s.as_str() == name)
            .ok_or_else(|| {
                format!("unknown scope {name:?}: use read, write and admin, comma-separated")
            })?;
        bits |= scope.bit();
    }
    Ok(bits)
}

/// Checks a token's name: 1 to 64 letters, digits, `.`, `_`, `-` or `@` (it appears in logs
/// and spans as `auth.name`).
pub fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "the name {name:?} must be 1 to 64 letters, digits, `.`, `_`, `-` or `@`"
        ))
    }
}

/// The prefix of every token `deriva token new` makes (tokens made otherwise work too).
pub const TOKEN_PREFIX: &str = "deriva_";

/// The SHA-256 of a token's text.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A token's entry in the token file: `sha256:<hex of its SHA-256>`.
pub fn hashed(token: &str) -> String {
    format!("sha256:{}", hex::encode(digest(token)))
}

/// A fresh random token; an error if the operating system gives no randomness.
pub fn new_token() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a token: {e}"))?;
    Ok(format!("{TOKEN_PREFIX}{}", hex::encode(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hash_as_sha256_of_their_text() {
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 64);
        // `printf %s abc | sha256sum`
        assert_eq!(
            hashed("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
