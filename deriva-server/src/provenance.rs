//! Record signatures: the engine's [`RecordSigner`] over `--signing-key`, and
//! `deriva-server keygen`, which makes a key.

use std::io::Write as _;
use std::path::Path;

use deriva_compute::RecordSigner;
use deriva_util::signing::{SIGNATURE_LEN, SigningKey};

/// Signs records with an ed25519 key.
#[derive(Debug)]
pub struct KeySigner(SigningKey);

impl KeySigner {
    /// The key in the PKCS#8 PEM file at `path`: refused if other users may write the file,
    /// a warning if they may read it (as for every file of secrets).
    pub fn load(path: &Path) -> Result<Self, String> {
        let pem = crate::auth::read_secret_file(path, "--signing-key")?;
        SigningKey::from_pem(&pem)
            .map(Self)
            .map_err(|e| format!("--signing-key {}: {e}", path.display()))
    }
}

impl RecordSigner for KeySigner {
    fn sign(&self, canonical: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.0.sign(canonical)
    }
}

/// `deriva-server keygen OUT`: writes a new private key to `OUT` (PKCS#8 PEM, mode 0600, never
/// over an existing file) and its public key to `OUT.pub` (SubjectPublicKeyInfo PEM), for
/// `--signing-key` and `deriva provenance --verify-key`.
pub fn keygen(out: &Path) -> Result<String, String> {
    let private = SigningKey::generate_pem().map_err(|e| e.to_string())?;
    let key = SigningKey::from_pem(private.as_bytes()).map_err(|e| e.to_string())?;
    let public_path = {
        let mut p = out.as_os_str().to_owned();
        p.push(".pub");
        std::path::PathBuf::from(p)
    };
    let create = |path: &Path, mode: u32, text: &str| -> Result<(), String> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    if public_path.exists() {
        return Err(format!(
            "{} exists already; choose another name",
            public_path.display()
        ));
    }
    create(out, 0o600, &private)?;
    create(&public_path, 0o644, &key.public().to_pem())?;
    Ok(format!(
        "private key: {} (for --signing-key; keep it secret)\npublic key:  {} (for deriva provenance --verify-key)\nfingerprint: {}",
        out.display(),
        public_path.display(),
        key.public().fingerprint()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use deriva_util::signing::VerifyingKey;

    #[test]
    fn keygen_writes_a_pair_that_signs_and_verifies_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("node.pem");
        let said = keygen(&out).unwrap();
        assert!(said.contains("node.pem.pub"), "{said}");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let signer = KeySigner::load(&out).unwrap();
        let public = VerifyingKey::load(&dir.path().join("node.pem.pub")).unwrap();
        assert!(public.verify(b"x", &signer.sign(b"x")));
        let err = keygen(&out).unwrap_err();
        assert!(err.contains("exists"), "{err}");
        // A key others may write is refused.
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = KeySigner::load(&out).unwrap_err();
        assert!(
            err.contains("--signing-key") && err.contains("refused"),
            "{err}"
        );
    }
}
