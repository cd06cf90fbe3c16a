//! Ed25519 keys for signing materialization records: a private key in PKCS#8 PEM
//! (`-----BEGIN PRIVATE KEY-----`, as `openssl genpkey -algorithm ed25519` writes it, or
//! `deriva-server keygen`), a public key in SubjectPublicKeyInfo PEM
//! (`-----BEGIN PUBLIC KEY-----`, as `openssl pkey -pubout` writes it). Over `ring`, which the
//! TLS stack already links.

use std::fmt;
use std::path::Path;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};

/// Length of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// The DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410): the algorithm
/// `1.3.101.112` and a 33-byte bit string, whose last 32 bytes are the key.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Why a key could not be read.
#[derive(Debug)]
pub struct KeyError(String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

/// A private signing key.
pub struct SigningKey(Ed25519KeyPair);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SigningKey")
            .field(&self.public().fingerprint())
            .finish()
    }
}

impl SigningKey {
    /// Parses a PKCS#8 PEM private key (v1, as OpenSSL writes it, or v2).
    pub fn from_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|e| {
            KeyError(format!(
                "not a PEM private key (-----BEGIN PRIVATE KEY-----): {e}"
            ))
        })?;
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
            .map(Self)
            .map_err(|e| KeyError(format!("not an ed25519 PKCS#8 key: {e}")))
    }

    /// A new key, as PKCS#8 PEM, from the operating system's randomness.
    pub fn generate_pem() -> Result<String, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let der = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|e| KeyError(format!("cannot make a key: {e}")))?;
        Ok(pem("PRIVATE KEY", der.as_ref()))
    }

    /// The signature of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        let mut out = [0; SIGNATURE_LEN];
        out.copy_from_slice(self.0.sign(message).as_ref());
        out
    }

    /// The public half.
    pub fn public(&self) -> VerifyingKey {
        let mut key = [0; 32];
        key.copy_from_slice(self.0.public_key().as_ref());
        VerifyingKey(key)
    }
}

/// A public key that checks signatures.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct VerifyingKey([u8; 32]);

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("VerifyingKey")
            .field(&self.fingerprint())
            .finish()
    }
}

impl VerifyingKey {
    /// Reads a SubjectPublicKeyInfo PEM public key from `path`.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let pem = std::fs::read(path).map_err(|e| {
            KeyError(format!(
                "cannot read the public key {}: {e}",
                path.display()
            ))
        })?;
        Self::from_pem(&pem)
            .map_err(|e| KeyError(format!("the public key {}: {e}", path.display())))
    }

    /// Parses a SubjectPublicKeyInfo PEM ed25519 public key.
    pub fn from_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let der = SubjectPublicKeyInfoDer::from_pem_slice(pem).map_err(|e| {
            KeyError(format!(
                "not a PEM public key (-----BEGIN PUBLIC KEY-----): {e}"
            ))
        })?;
        let der: &[u8] = der.as_ref();
        match der.strip_prefix(&SPKI_PREFIX[..]) {
            Some(key) if key.len() == 32 => {
                let mut out = [0; 32];
                out.copy_from_slice(key);
                Ok(Self(out))
            }
            _ => Err(KeyError("not an ed25519 public key".into())),
        }
    }

    /// The key as SubjectPublicKeyInfo PEM.
    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        pem("PUBLIC KEY", &der)
    }

    /// The first 8 bytes of the key, in hex: enough to tell keys apart in messages.
    pub fn fingerprint(&self) -> String {
        hex_prefix(&self.0)
    }

    /// Whether `signature` is this key's over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8; SIGNATURE_LEN]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, signature)
            .is_ok()
    }
}

fn hex_prefix(key: &[u8; 32]) -> String {
    key[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// `der` as a PEM block labelled `label`, 64 base64 characters a line.
fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made with `openssl genpkey -algorithm ed25519` (PKCS#8 v1) and `openssl pkey -pubout`.
    const OPENSSL_KEY: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIF/lU1b9XGjTcmtoIV1C+S4WcCKVMSFxqEfdb/ZC9ne5
-----END PRIVATE KEY-----
";

    const OPENSSL_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAGLYFRp34YAm8iTivQjhWpzZjDHjsCbbMBPm0q8UiUK0=
-----END PUBLIC KEY-----
";

    #[test]
    fn a_made_key_signs_and_its_public_half_verifies() {
        let key = SigningKey::from_pem(SigningKey::generate_pem().unwrap().as_bytes()).unwrap();
        let public = VerifyingKey::from_pem(key.public().to_pem().as_bytes()).unwrap();
        assert_eq!(public, key.public());
        let signature = key.sign(b"a record");
        assert!(public.verify(b"a record", &signature));
        assert!(!public.verify(b"a recorD", &signature));
        let mut altered = signature;
        altered[0] ^= 1;
        assert!(!public.verify(b"a record", &altered));
        let other = SigningKey::from_pem(SigningKey::generate_pem().unwrap().as_bytes()).unwrap();
        assert!(!other.public().verify(b"a record", &signature));
    }

    #[test]
    fn openssl_keys_are_read_and_bad_ones_are_named() {
        let key = SigningKey::from_pem(OPENSSL_KEY.as_bytes()).unwrap();
        let pem = key.public().to_pem();
        assert_eq!(pem, OPENSSL_PUBLIC);
        let err = SigningKey::from_pem(b"garbage").unwrap_err().to_string();
        assert!(err.contains("BEGIN PRIVATE KEY"), "{err}");
        let err = VerifyingKey::from_pem(OPENSSL_KEY.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("BEGIN PUBLIC KEY"), "{err}");
        let err = VerifyingKey::load(Path::new("/nonexistent/key.pem"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/key.pem"), "{err}");
    }
}
