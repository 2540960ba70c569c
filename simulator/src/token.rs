//! Tokens: PINs (salted SHA-256 in the state file), the fixed-width text fields of the info structures.

use crate::Result;
use cryptoki_sys::*;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MIN_PIN_LEN: usize = 4;
pub const MAX_PIN_LEN: usize = 255;

/// The manufacturer of the library, slots and tokens (32 characters at most).
pub const MANUFACTURER: &str = "Utimaco IS GmbH (simulated)";

/// A PIN as stored: a random salt and SHA-256(salt ‖ PIN), both hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinHash {
    salt: String,
    hash: String,
}

impl PinHash {
    pub fn new(pin: &[u8]) -> PinHash {
        let mut salt = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        PinHash { salt: hex::encode(salt), hash: hash(&salt, pin) }
    }

    pub fn verify(&self, pin: &[u8]) -> bool {
        let Ok(salt) = hex::decode(&self.salt) else { return false };
        let computed = hash(&salt, pin);
        // Equal-time comparison of the hex digests.
        computed.len() == self.hash.len()
            && computed.bytes().zip(self.hash.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

fn hash(salt: &[u8], pin: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(pin);
    hex::encode(h.finalize())
}

/// Checks a new PIN's length (CKR_PIN_LEN_RANGE).
pub fn check_pin_len(pin: &[u8]) -> Result<()> {
    if (MIN_PIN_LEN..=MAX_PIN_LEN).contains(&pin.len()) {
        Ok(())
    } else {
        Err(CKR_PIN_LEN_RANGE)
    }
}

/// `text` in a blank-padded fixed-width field (truncated if longer).
pub fn padded<const N: usize>(text: &str) -> [u8; N] {
    let mut field = [b' '; N];
    let bytes = text.as_bytes();
    let n = bytes.len().min(N);
    field[..n].copy_from_slice(&bytes[..n]);
    field
}

/// A label from a blank-padded field.
pub fn unpadded(field: &[u8]) -> String {
    String::from_utf8_lossy(field).trim_end_matches([' ', '\0']).to_string()
}

/// The slot description: CryptoServer names slot N as CXI group SLOT_000N.
pub fn slot_name(slot: usize) -> String {
    format!("SLOT_{slot:04}")
}

/// A token's serial number (16 characters).
pub fn serial(slot: usize) -> String {
    format!("CSSIM{slot:011}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins() {
        let h = PinHash::new(b"1234");
        assert!(h.verify(b"1234"));
        assert!(!h.verify(b"12345"));
        assert_ne!(PinHash::new(b"1234"), h, "salted");
        assert_eq!(check_pin_len(b"123"), Err(CKR_PIN_LEN_RANGE));
    }

    #[test]
    fn fields() {
        assert_eq!(&padded::<6>("ab"), b"ab    ");
        assert_eq!(unpadded(b"ab    "), "ab");
        assert_eq!(slot_name(1), "SLOT_0001");
        assert_eq!(serial(3).len(), 16);
    }
}
