//! # deriva-proto
//!
//! Deriva's wire contract: the messages and the `Deriva` service of `proto/deriva.proto`,
//! compiled by `build.rs` (with a vendored `protoc`, so a fresh machine needs none installed).
//! Both sides use this crate: the server implements [`deriva_server::Deriva`] and serves it
//! with [`deriva_server::DerivaServer`]; the `deriva` client calls
//! [`deriva_client::DerivaClient`].
//!
//! - The messages, such as [`GetRequest`] and [`TraceSpan`], sit at the crate root. `bytes`
//!   fields decode as [`bytes::Bytes`], so the chunks of a `Get` share one buffer.
//! - [`addr_bytes`] and [`addr_from_bytes`] convert between a [`CAddr`] and the 32 raw bytes
//!   that an address field holds on the wire.

use bytes::Bytes;
use deriva_core::{AddrParseError, CAddr};

/// The code generated from `proto/deriva.proto`; everything in it is re-exported at the root.
#[allow(clippy::all, missing_docs, missing_debug_implementations)]
mod generated {
    tonic::include_proto!("deriva");
}

pub use generated::*;

/// An address as the wire carries it: its 32 raw bytes.
pub fn addr_bytes(addr: &CAddr) -> Bytes {
    Bytes::copy_from_slice(addr.as_bytes())
}

/// An address field of a message that does not hold an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {source}")]
pub struct BadAddr {
    /// The field, such as `addr` or `inputs[2]`.
    pub field: String,
    /// What is wrong with it; for raw bytes, always the length found.
    pub source: AddrParseError,
}

/// Reads the address in the field named `field`, which must be exactly 32 bytes. The error
/// names the field and the length found, such as `inputs[2]: an address is 32 bytes, got 31`.
pub fn addr_from_bytes(field: &str, raw: &[u8]) -> Result<CAddr, BadAddr> {
    CAddr::from_slice(raw).map_err(|source| BadAddr {
        field: field.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_their_wire_bytes() {
        let addr = CAddr::for_leaf(b"deriva");
        let wire = addr_bytes(&addr);
        assert_eq!(wire.len(), 32);
        assert_eq!(&wire[..], addr.as_bytes());
        assert_eq!(addr_from_bytes("addr", &wire), Ok(addr));
    }

    #[test]
    fn a_wrong_length_names_the_field_and_the_length() {
        for len in [0, 31, 33] {
            let err = addr_from_bytes("inputs[2]", &vec![7; len]).unwrap_err();
            assert_eq!(err.field, "inputs[2]");
            assert_eq!(err.source, AddrParseError::RawLength { found: len });
            assert_eq!(
                err.to_string(),
                format!("inputs[2]: an address is 32 bytes, got {len}")
            );
        }
    }

    #[test]
    fn messages_carry_addresses_as_bytes() {
        use prost::Message as _;
        let addr = CAddr::for_leaf(b"x");
        let request = GetRequest {
            addr: addr_bytes(&addr),
        };
        let decoded = GetRequest::decode(request.encode_to_vec().as_slice()).unwrap();
        assert_eq!(addr_from_bytes("addr", &decoded.addr), Ok(addr));
    }
}
