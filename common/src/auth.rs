//! The shared secret: read from a file only its owner can read, and turned
//! into the link's pre-shared key (`link.rs`: the Noise handshake and the
//! encryption are the `snow` crate's, nothing here is a protocol).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

/// Length of MACs, keys and nonces.
pub const MAC_LEN: usize = 32;

/// Errors of authentication material.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("secret file {path}: {err}")]
    SecretFile { path: String, err: String },
    #[error("the shared secret must be at least 16 bytes (got {0})")]
    SecretTooShort(usize),
    #[error("no randomness available: {0}")]
    Random(String),
    #[error("secret file {path} can be read by group or others (mode {mode:03o}): chmod 600 it")]
    SecretFileMode { path: String, mode: u32 },
    #[error("token file {0}: a bearer token must be printable ASCII without spaces")]
    TokenNotText(String),
}

/// Writes a secret file only its owner can read (mode 0600).
pub fn write_secret_file(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    // an existing file keeps its mode on open: set it
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)
}

/// A 32-byte key.
pub type Key = [u8; MAC_LEN];

/// The long-term shared secret (or a bearer token): its bytes are zeroed
/// when the last copy is dropped.
#[derive(Clone)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.0.len())
    }
}

impl Secret {
    /// Wraps secret bytes (at least 16).
    pub fn new(bytes: Vec<u8>) -> Result<Self, AuthError> {
        if bytes.len() < 16 {
            return Err(AuthError::SecretTooShort(bytes.len()));
        }
        Ok(Secret(Zeroizing::new(bytes)))
    }

    /// Reads a secret file (trailing newline ignored). A file that group or
    /// others can read is refused.
    pub fn from_file(path: &std::path::Path) -> Result<Self, AuthError> {
        use std::os::unix::fs::PermissionsExt;
        let file_err =
            |e: std::io::Error| AuthError::SecretFile { path: path.display().to_string(), err: e.to_string() };
        let mode = std::fs::metadata(path).map_err(file_err)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(AuthError::SecretFileMode { path: path.display().to_string(), mode });
        }
        let mut b = Zeroizing::new(std::fs::read(path).map_err(file_err)?);
        while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
            b.pop();
        }
        if b.len() < 16 {
            return Err(AuthError::SecretTooShort(b.len()));
        }
        Ok(Secret(b))
    }

    /// Reads a bearer token file: like [`Secret::from_file`], and printable
    /// ASCII without spaces (it travels in an HTTP header).
    pub fn token_from_file(path: &std::path::Path) -> Result<Self, AuthError> {
        let t = Self::from_file(path)?;
        if !t.0.iter().all(|c| c.is_ascii_graphic()) {
            return Err(AuthError::TokenNotText(path.display().to_string()));
        }
        Ok(t)
    }

    /// Whether `presented` equals this secret (in time that does not depend
    /// on where they differ).
    pub fn matches(&self, presented: &[u8]) -> bool {
        presented.len() == self.0.len() && self.0.iter().zip(presented).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// The bytes as text (a bearer token, checked printable when read).
    pub fn as_text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    /// HMAC-SHA256 of the concatenated parts under this secret.
    pub fn mac(&self, parts: &[&[u8]]) -> Key {
        mac(&self.0, parts)
    }
}

/// HMAC-SHA256 of the concatenated parts under `key`.
pub fn mac(key: &[u8], parts: &[&[u8]]) -> Key {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Constant-time comparison of two MACs.
pub fn verify(expected: &Key, got: &[u8]) -> bool {
    got.len() == MAC_LEN && expected.iter().zip(got).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// A fresh random nonce.
pub fn nonce() -> Result<Key, AuthError> {
    let mut n = [0u8; MAC_LEN];
    getrandom::fill(&mut n).map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_differ_by_secret_and_verify() {
        let s = Secret::new(b"0123456789abcdef".to_vec()).expect("secret");
        assert!(verify(&s.mac(&[b"x"]), &s.mac(&[b"x"])));
        assert!(!verify(&s.mac(&[b"x"]), &s.mac(&[b"y"])));
        let other = Secret::new(b"0123456789abcdeX".to_vec()).expect("secret");
        assert!(!verify(&s.mac(&[b"x"]), &other.mac(&[b"x"])));
        assert!(Secret::new(b"short".to_vec()).is_err());
        assert!(s.matches(b"0123456789abcdef"));
        assert!(!s.matches(b"0123456789abcdeX") && !s.matches(b"0123456789abcde") && !s.matches(b""));
    }
}

#[cfg(test)]
mod file_tests {
    use super::*;

    #[test]
    fn a_secret_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("castor-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("secret");
        write_secret_file(&p, b"a-secret-of-enough-bytes\n").unwrap();
        assert!(Secret::from_file(&p).is_ok());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Secret::from_file(&p).unwrap_err();
        assert!(matches!(e, AuthError::SecretFileMode { mode: 0o644, .. }), "{e}");
        // writing it again makes it private again
        write_secret_file(&p, b"a-secret-of-enough-bytes").unwrap();
        assert!(Secret::from_file(&p).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
