//! Ed25519 key files for signature logon: public keys as PEM SPKI ("PUBLIC KEY"), 32 raw bytes or 64 hex
//! digits; private keys as PEM PKCS#8 ("PRIVATE KEY"), 32 raw bytes or 64 hex digits.

use super::AuthError;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use std::path::Path;
use zeroize::Zeroizing;

fn read(path: &Path, what: &str) -> Result<Zeroizing<Vec<u8>>, AuthError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|e| AuthError::Invalid(format!("cannot read the {what} file {}: {e}", path.display())))
}

/// 32 bytes from a file holding exactly 32 raw bytes, or 64 hex digits (surrounding white space allowed).
fn raw_or_hex(bytes: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
    let mut out = Zeroizing::new([0u8; 32]);
    if bytes.len() == 32 {
        out.copy_from_slice(bytes);
        return Some(out);
    }
    let text = std::str::from_utf8(bytes).ok()?.trim();
    if text.len() == 64 {
        hex::decode_to_slice(text, out.as_mut()).ok()?;
        return Some(out);
    }
    None
}

/// Reads an Ed25519 public key for `--sign-key` and checks it is a usable (not weak) point.
pub fn read_public_key(path: &Path) -> Result<[u8; 32], AuthError> {
    let bytes = read(path, "public key")?;
    let bad = |why: String| {
        AuthError::Invalid(format!(
            "public key file {}: {why} (give an Ed25519 public key as PEM \"PUBLIC KEY\", 32 raw bytes or 64 hex \
             digits)",
            path.display()
        ))
    };
    let key = match std::str::from_utf8(&bytes) {
        Ok(text) if text.contains("-----BEGIN") => VerifyingKey::from_public_key_pem(text.trim())
            .map_err(|e| bad(format!("not an Ed25519 PEM public key: {e}")))?,
        _ => {
            let raw =
                raw_or_hex(&bytes).ok_or_else(|| bad(format!("{} bytes, no key format recognized", bytes.len())))?;
            VerifyingKey::from_bytes(&raw).map_err(|_| bad("not a point on the Ed25519 curve".into()))?
        }
    };
    if key.is_weak() {
        return Err(bad("a weak (small-order) key, which anything would verify against".into()));
    }
    Ok(key.to_bytes())
}

/// Reads an Ed25519 private key for a signature logon (`--logon NAME,KEYFILE`).
pub fn read_signing_key(path: &Path) -> Result<SigningKey, AuthError> {
    let bytes = read(path, "private key")?;
    let bad = |why: String| {
        AuthError::Invalid(format!(
            "private key file {}: {why} (give an Ed25519 private key as PEM PKCS#8 \"PRIVATE KEY\", 32 raw bytes \
             or 64 hex digits)",
            path.display()
        ))
    };
    match std::str::from_utf8(&bytes) {
        Ok(text) if text.contains("-----BEGIN") => {
            SigningKey::from_pkcs8_pem(text.trim()).map_err(|e| bad(format!("not an Ed25519 PKCS#8 PEM key: {e}")))
        }
        _ => {
            let raw =
                raw_or_hex(&bytes).ok_or_else(|| bad(format!("{} bytes, no key format recognized", bytes.len())))?;
            Ok(SigningKey::from_bytes(&raw))
        }
    }
}
