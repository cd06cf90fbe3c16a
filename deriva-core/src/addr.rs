//! [`CAddr`], the 32-byte BLAKE3 address of every leaf and recipe.

use std::fmt;
use std::str::FromStr;

/// Length of an address in bytes.
pub const ADDR_LEN: usize = 32;

/// A content address: 32 bytes of BLAKE3 output.
///
/// A leaf's address is `blake3(bytes)`, the same digest `b3sum` prints. A recipe's address is
/// computed by [`Recipe::addr`](crate::Recipe::addr) in a separate BLAKE3 domain, so the two
/// kinds can never collide.
///
/// `Display` prints the full 64-character lowercase hex; `Debug` prints a short form
/// (`CAddr(1a2b3c4d…)`) that keeps logs readable.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CAddr([u8; ADDR_LEN]);

impl CAddr {
    /// Wraps 32 raw bytes.
    pub const fn from_bytes(bytes: [u8; ADDR_LEN]) -> Self {
        Self(bytes)
    }

    /// Parses 32 raw bytes, as they travel on the wire.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, AddrParseError> {
        let array: [u8; ADDR_LEN] = bytes
            .try_into()
            .map_err(|_| AddrParseError::RawLength { found: bytes.len() })?;
        Ok(Self(array))
    }

    /// The address of a leaf: the plain BLAKE3 hash of its bytes.
    pub fn for_leaf(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; ADDR_LEN] {
        &self.0
    }

    /// Full lowercase hex (64 characters); the same as `to_string()`.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 8 hex characters, for compact human output.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for CAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; ADDR_LEN * 2];
        // Cannot fail: the buffer is exactly twice the input length.
        hex::encode_to_slice(self.0, &mut buf).map_err(|_| fmt::Error)?;
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for CAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CAddr({}…)", self.short())
    }
}

impl From<[u8; ADDR_LEN]> for CAddr {
    fn from(bytes: [u8; ADDR_LEN]) -> Self {
        Self(bytes)
    }
}

impl AsRef<[u8]> for CAddr {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Why a string or byte slice is not an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrParseError {
    /// A hex address must be exactly 64 characters.
    #[error("an address is 64 hex characters, got {found}")]
    HexLength {
        /// The number of characters given.
        found: usize,
    },
    /// A character outside `0-9a-fA-F`.
    #[error("an address is hex, but character {index} is {found:?}")]
    NonHex {
        /// Zero-based character position.
        index: usize,
        /// The offending character.
        found: char,
    },
    /// A raw address must be exactly 32 bytes.
    #[error("an address is 32 bytes, got {found}")]
    RawLength {
        /// The number of bytes given.
        found: usize,
    },
}

impl FromStr for CAddr {
    type Err = AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some((index, found)) = s.char_indices().find(|(_, c)| !c.is_ascii_hexdigit()) {
            // Report the character position, not the byte offset.
            let index = s[..index].chars().count();
            return Err(AddrParseError::NonHex { index, found });
        }
        if s.len() != ADDR_LEN * 2 {
            return Err(AddrParseError::HexLength { found: s.len() });
        }
        let mut out = [0u8; ADDR_LEN];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| AddrParseError::HexLength { found: s.len() })?;
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_address_is_plain_blake3_as_b3sum_prints_it() {
        // The official BLAKE3 test vector for the empty input (what `b3sum /dev/null` prints).
        assert_eq!(
            CAddr::for_leaf(b"").to_string(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        // `printf abc | b3sum`
        assert_eq!(
            CAddr::for_leaf(b"abc").to_string(),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }

    #[test]
    fn hex_round_trip_and_case_insensitive_parse() {
        let a = CAddr::for_leaf(b"hello");
        let hex = a.to_string();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex.parse::<CAddr>().unwrap(), a);
        assert_eq!(hex.to_uppercase().parse::<CAddr>().unwrap(), a);
        assert_eq!(format!("{a:?}"), format!("CAddr({}…)", &hex[..8]));
    }

    #[test]
    fn parse_errors_say_what_was_wrong() {
        assert_eq!(
            "abc".parse::<CAddr>(),
            Err(AddrParseError::HexLength { found: 3 })
        );
        let mut bad = "0".repeat(64);
        bad.replace_range(10..11, "g");
        assert_eq!(
            bad.parse::<CAddr>(),
            Err(AddrParseError::NonHex {
                index: 10,
                found: 'g'
            })
        );
        let err = "é".repeat(3).parse::<CAddr>().unwrap_err();
        assert_eq!(
            err,
            AddrParseError::NonHex {
                index: 0,
                found: 'é'
            }
        );
        assert!(err.to_string().contains("character 0"));
        assert_eq!(
            CAddr::from_slice(&[0u8; 31]),
            Err(AddrParseError::RawLength { found: 31 })
        );
        assert!(CAddr::from_slice(&[7u8; 32]).is_ok());
    }
}
