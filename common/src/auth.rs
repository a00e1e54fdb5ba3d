//! The shared secret: read from a file only its owner can read, and turned
//! into the link's pre-shared key (`link.rs`: the Noise handshake and the
//! encryption are the `snow` crate's, nothing here is a protocol).
//!
//! Two kinds of secret file, read by two functions with their own rules:
//!
//! * the link key ([`Secret::from_file`], `--secret-file`): the pre-shared
//!   key of the Noise `NNpsk0` handshake. One recorded handshake lets anyone
//!   test guesses of it offline, so it must be a random key, never a
//!   passphrase: either raw bytes (at least [`LINK_KEY_LEN`] of them, with at
//!   least [`MIN_DISTINCT_BYTES`] distinct values; what `castor keygen`
//!   writes, [`generate_secret_file`]), used as they are (no newline is
//!   trimmed from a binary key), or hex text of at least
//!   `2 * LINK_KEY_LEN` digits (surrounding whitespace and newlines
//!   trimmed), decoded: the key is the decoded bytes, which must have as
//!   many distinct values too. Any other text is refused as a passphrase.
//!   Base64 is not accepted: a letters-only passphrase of the right length
//!   is valid base64, so accepting it would let passphrases back in.
//! * a bearer token ([`Secret::token_from_file`], `--control-token`): at
//!   least 16 printable ASCII bytes without spaces (it travels in an HTTP
//!   header); a trailing newline is ignored.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

/// Length of MACs, keys and nonces.
pub const MAC_LEN: usize = 32;
/// Bytes of a link key (at least; what `castor keygen` writes).
pub const LINK_KEY_LEN: usize = 32;
/// Distinct byte values a link key must have at least (32 random bytes
/// have about 30; a passphrase or a pattern fewer).
pub const MIN_DISTINCT_BYTES: usize = 16;
/// Bytes of a bearer token (at least).
pub const MIN_TOKEN_LEN: usize = 16;

/// Errors of authentication material.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("secret file {path}: {err}")]
    SecretFile { path: String, err: String },
    #[error(
        "{origin}: {got} bytes of key, at least {LINK_KEY_LEN} random bytes (or {} hex digits) are needed; \
         run `castor keygen FILE` to make a link key and copy FILE to both nodes",
        2 * LINK_KEY_LEN
    )]
    LinkKeyTooShort { origin: String, got: usize },
    #[error(
        "{origin}: only {distinct} distinct byte values (at least {MIN_DISTINCT_BYTES}): a pattern, not a random \
         key; run `castor keygen FILE` to make a link key and copy FILE to both nodes"
    )]
    LinkKeyLowEntropy { origin: String, distinct: usize },
    #[error(
        "{origin}: a text passphrase is not a link key (one recorded handshake lets anyone test guesses \
         offline); the key must be {LINK_KEY_LEN} random bytes or {} hex digits: run `castor keygen FILE` \
         to make one and copy FILE to both nodes",
        2 * LINK_KEY_LEN
    )]
    LinkKeyIsText { origin: String },
    #[error("key file {0} exists: not overwritten (--force replaces it, and both nodes need the new one)")]
    KeyFileExists(String),
    #[error("token file {path}: a bearer token must be at least {MIN_TOKEN_LEN} bytes (got {got})")]
    TokenTooShort { path: String, got: usize },
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

/// A fresh random link key: [`LINK_KEY_LEN`] bytes from the OS, drawn again
/// in the (about 1e-14 likely) case that they would not pass
/// [`Secret::new`]'s checks (all printable, or too few distinct values).
fn generate_key() -> Result<Zeroizing<Vec<u8>>, AuthError> {
    loop {
        let mut k = Zeroizing::new(vec![0u8; LINK_KEY_LEN]);
        getrandom::fill(&mut k).map_err(|e| AuthError::Random(e.to_string()))?;
        if link_key(k.clone(), "a generated key").is_ok() {
            return Ok(k);
        }
    }
}

/// Makes a link key file (`castor keygen`): [`LINK_KEY_LEN`] random bytes,
/// mode 0600. An existing file is refused ([`AuthError::KeyFileExists`])
/// unless `force`.
pub fn generate_secret_file(path: &std::path::Path, force: bool) -> Result<(), AuthError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file_err = |e: std::io::Error| AuthError::SecretFile { path: path.display().to_string(), err: e.to_string() };
    let key = generate_key()?;
    if force {
        return write_secret_file(path, &key).map_err(file_err);
    }
    let mut f = match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(AuthError::KeyFileExists(path.display().to_string()))
        }
        Err(e) => return Err(file_err(e)),
    };
    f.write_all(&key).and_then(|()| f.sync_all()).map_err(file_err)
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

fn distinct(b: &[u8]) -> usize {
    let mut seen = [false; 256];
    b.iter().for_each(|&c| seen[c as usize] = true);
    seen.iter().filter(|&&s| s).count()
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The link key in `raw` (the module's rules): raw bytes as they are, or
/// hex text decoded. `origin` names where it came from, for the error.
fn link_key(raw: Zeroizing<Vec<u8>>, origin: &str) -> Result<Zeroizing<Vec<u8>>, AuthError> {
    let text = raw.iter().all(|c| c.is_ascii_graphic() || c.is_ascii_whitespace());
    let key = if text {
        let t = raw.trim_ascii();
        if !t.iter().all(|&c| hex_digit(c).is_some()) || !t.len().is_multiple_of(2) {
            return Err(AuthError::LinkKeyIsText { origin: origin.to_string() });
        }
        Zeroizing::new(
            t.chunks_exact(2)
                .map(|p| (hex_digit(p[0]).unwrap_or(0) << 4) | hex_digit(p[1]).unwrap_or(0))
                .collect::<Vec<u8>>(),
        )
    } else {
        raw
    };
    if key.len() < LINK_KEY_LEN {
        return Err(AuthError::LinkKeyTooShort { origin: origin.to_string(), got: key.len() });
    }
    let d = distinct(&key);
    if d < MIN_DISTINCT_BYTES {
        return Err(AuthError::LinkKeyLowEntropy { origin: origin.to_string(), distinct: d });
    }
    Ok(key)
}

/// Reads a file only its owner may read (group or others: refused).
fn read_private_file(path: &std::path::Path) -> Result<Zeroizing<Vec<u8>>, AuthError> {
    use std::os::unix::fs::PermissionsExt;
    let file_err = |e: std::io::Error| AuthError::SecretFile { path: path.display().to_string(), err: e.to_string() };
    let mode = std::fs::metadata(path).map_err(file_err)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AuthError::SecretFileMode { path: path.display().to_string(), mode });
    }
    Ok(Zeroizing::new(std::fs::read(path).map_err(file_err)?))
}

impl Secret {
    /// A link key from its bytes, by the module's rules (raw bytes, or hex
    /// text decoded); a passphrase is refused.
    pub fn new(bytes: Vec<u8>) -> Result<Self, AuthError> {
        Ok(Secret(link_key(Zeroizing::new(bytes), "the link key")?))
    }

    /// A fresh random link key, in memory (tests, benches, fuzzing: both
    /// ends of a link made in one process share it).
    pub fn generate() -> Result<Self, AuthError> {
        Ok(Secret(generate_key()?))
    }

    /// Reads the link key file (`--secret-file`; the module's rules). A
    /// file that group or others can read is refused, and so is a
    /// passphrase, a short key or a pattern, with a pointer to `castor keygen`.
    pub fn from_file(path: &std::path::Path) -> Result<Self, AuthError> {
        let raw = read_private_file(path)?;
        Ok(Secret(link_key(raw, &format!("secret file {}", path.display()))?))
    }

    /// Reads a bearer token file (`--control-token`): owner-only like the
    /// link key, at least [`MIN_TOKEN_LEN`] printable ASCII bytes without
    /// spaces (it travels in an HTTP header); a trailing newline is ignored.
    pub fn token_from_file(path: &std::path::Path) -> Result<Self, AuthError> {
        let mut t = read_private_file(path)?;
        while t.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
            t.pop();
        }
        if t.len() < MIN_TOKEN_LEN {
            return Err(AuthError::TokenTooShort { path: path.display().to_string(), got: t.len() });
        }
        if !t.iter().all(|c| c.is_ascii_graphic()) {
            return Err(AuthError::TokenNotText(path.display().to_string()));
        }
        Ok(Secret(t))
    }

    /// Whether `presented` equals this secret (in time that does not depend
    /// on where they differ).
    pub fn matches(&self, presented: &[u8]) -> bool {
        // `subtle`: the comparison takes the same time wherever the bytes
        // differ (only a length difference returns early)
        bool::from(subtle::ConstantTimeEq::ct_eq(self.0.as_slice(), presented))
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
    got.len() == MAC_LEN && bool::from(subtle::ConstantTimeEq::ct_eq(expected.as_slice(), got))
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
        let key: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(73).wrapping_add(5)).collect();
        let s = Secret::new(key.clone()).expect("secret");
        assert!(verify(&s.mac(&[b"x"]), &s.mac(&[b"x"])));
        assert!(!verify(&s.mac(&[b"x"]), &s.mac(&[b"y"])));
        let mut other_key = key.clone();
        other_key[31] ^= 1;
        let other = Secret::new(other_key.clone()).expect("secret");
        assert!(!verify(&s.mac(&[b"x"]), &other.mac(&[b"x"])));
        assert!(matches!(Secret::new(key[..31].to_vec()), Err(AuthError::LinkKeyTooShort { got: 31, .. })));
        assert!(s.matches(&key));
        assert!(!s.matches(&other_key) && !s.matches(&key[..31]) && !s.matches(b""));
        // the same key as hex text is the same key
        let hex: String = key.iter().map(|b| format!("{b:02X}")).collect();
        let h = Secret::new(format!("{hex}\n").into_bytes()).expect("hex");
        assert!(verify(&s.mac(&[b"x"]), &h.mac(&[b"x"])));
        let (a, b) = (Secret::generate().expect("random"), Secret::generate().expect("random"));
        assert!(a.matches(&a.0) && !a.matches(&b.0), "two generated keys are different");
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
        generate_secret_file(&p, false).unwrap();
        assert!(Secret::from_file(&p).is_ok());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Secret::from_file(&p).unwrap_err();
        assert!(matches!(e, AuthError::SecretFileMode { mode: 0o644, .. }), "{e}");
        // writing it again makes it private again
        generate_secret_file(&p, true).unwrap();
        assert!(Secret::from_file(&p).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn private_file(name: &str, bytes: &[u8]) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("castor-linkkey-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("secret");
        write_secret_file(&p, bytes).unwrap();
        (dir, p)
    }

    /// What a human would type is no link key: one recorded handshake
    /// lets anyone test guesses offline.
    #[test]
    fn a_passphrase_is_refused_as_a_link_key() {
        for pass in [&b"cli-test-secret-0123456789\n"[..], b"correct horse battery staple, and then some more words\n"]
        {
            let (dir, p) = private_file("pass", pass);
            let e = Secret::from_file(&p).expect_err("a passphrase was accepted as the link key");
            assert!(e.to_string().contains("castor keygen"), "{e}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn short_hex_is_refused_long_hex_is_accepted() {
        // 32 hex digits: 16 bytes of key
        let (dir, p) = private_file("shorthex", b"00112233445566778899aabbccddeeff\n");
        let e = Secret::from_file(&p).expect_err("16 bytes of hex were accepted");
        assert!(e.to_string().contains("castor keygen"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        let hex: String = (0u8..32).map(|i| format!("{:02x}", i.wrapping_mul(73).wrapping_add(5))).collect();
        let (dir, p) = private_file("longhex", format!("  {hex}\n").as_bytes());
        Secret::from_file(&p).expect("64 hex digits");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn thirty_two_bytes_of_a_pattern_are_refused() {
        let pattern: Vec<u8> = (0..64).map(|i| [0x00, 0x01, 0xfe, 0xff][i % 4]).collect();
        let (dir, p) = private_file("pattern", &pattern);
        let e = Secret::from_file(&p).expect_err("a 4-value pattern was accepted");
        assert!(e.to_string().contains("castor keygen"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// What `castor keygen` writes: 32 bytes, mode 0600, accepted as the
    /// link key; an existing file is kept unless forced.
    #[test]
    fn a_generated_key_file_is_accepted_and_never_overwritten_unforced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("castor-keygen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..200 {
            let p = dir.join(format!("key{i}"));
            generate_secret_file(&p, false).unwrap();
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
            assert_eq!(std::fs::read(&p).unwrap().len(), LINK_KEY_LEN);
            Secret::from_file(&p).expect("keygen output accepted");
        }
        let p = dir.join("key0");
        let before = std::fs::read(&p).unwrap();
        assert!(matches!(generate_secret_file(&p, false), Err(AuthError::KeyFileExists(_))));
        assert_eq!(std::fs::read(&p).unwrap(), before, "an unforced keygen changed an existing key");
        generate_secret_file(&p, true).unwrap();
        assert_ne!(std::fs::read(&p).unwrap(), before);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_token_keeps_its_own_rule() {
        let (dir, p) = private_file("token", b"control-token-0123456789\n");
        let t = Secret::token_from_file(&p).expect("a printable token");
        assert!(t.matches(b"control-token-0123456789"));
        std::fs::remove_dir_all(&dir).unwrap();
        let (dir, p) = private_file("shorttoken", b"short-token\n");
        assert!(matches!(Secret::token_from_file(&p), Err(AuthError::TokenTooShort { got: 11, .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
