//! The device's master backup key (MBK): an AES-256 key the device holds outside any token, as a CryptoServer
//! does. Administrators load it from m-of-n shares or generate it inside ([`crate::admin`]); the vendor
//! interface "CSSIM MBK" backs keys up as blobs encrypted and authenticated under it ([`blob`]).
//!
//! The MBK is never a PKCS#11 object. Keys derived from it (by HMAC-SHA256 with distinct labels) serve one
//! purpose each: the fingerprint that names it, the blob key.

pub mod blob;
pub mod shamir;
pub mod share;

use cryptoki_sys::{CKR_VENDOR_DEFINED, CK_RV};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::fmt;
use zeroize::Zeroizing;

/// The device holds no MBK.
pub const CKR_CSSIM_NO_MBK: CK_RV = CKR_VENDOR_DEFINED + 0x4353_0001;
/// The blob was made under another MBK.
pub const CKR_CSSIM_WRONG_MBK: CK_RV = CKR_VENDOR_DEFINED + 0x4353_0002;
/// The blob's MAC does not verify: altered or damaged.
pub const CKR_CSSIM_BLOB_MAC: CK_RV = CKR_VENDOR_DEFINED + 0x4353_0003;
/// Not a blob, truncated, or an unknown blob version.
pub const CKR_CSSIM_BLOB_FORMAT: CK_RV = CKR_VENDOR_DEFINED + 0x4353_0004;

/// The length of an MBK in bytes (AES-256).
pub const MBK_LEN: usize = 32;

/// A master backup key; zeroized on drop, never printed.
#[derive(Clone)]
pub struct Mbk(Zeroizing<[u8; MBK_LEN]>);

impl fmt::Debug for Mbk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mbk({})", self.fingerprint())
    }
}

impl Mbk {
    /// A fresh random MBK (the operating system's generator).
    pub fn generate() -> Mbk {
        let mut key = Zeroizing::new([0u8; MBK_LEN]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        Mbk(key)
    }

    /// An MBK from its bytes (None unless exactly [`MBK_LEN`] of them).
    pub fn from_bytes(bytes: &[u8]) -> Option<Mbk> {
        let mut key = Zeroizing::new([0u8; MBK_LEN]);
        if bytes.len() != MBK_LEN {
            return None;
        }
        key.copy_from_slice(bytes);
        Some(Mbk(key))
    }

    pub fn as_bytes(&self) -> &[u8; MBK_LEN] {
        &self.0
    }

    /// HMAC-SHA256(MBK, label): one key or value per label, none revealing the MBK or another.
    fn derive(&self, label: &[u8]) -> Zeroizing<[u8; 32]> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_ref()).expect("HMAC takes any key length");
        mac.update(label);
        Zeroizing::new(mac.finalize().into_bytes().into())
    }

    /// The fingerprint: the first 16 bytes of HMAC-SHA256(MBK, "cssim mbk fingerprint").
    pub fn fingerprint(&self) -> Fingerprint {
        let full = self.derive(b"cssim mbk fingerprint");
        let mut fp = [0u8; 16];
        fp.copy_from_slice(&full[..16]);
        Fingerprint(fp)
    }

    /// The AES-256-GCM key of backup blobs.
    fn blob_key(&self) -> Zeroizing<[u8; 32]> {
        self.derive(b"cssim mbk blob key aes-256-gcm")
    }
}

/// What names an MBK without revealing it: 16 bytes, written as 32 hex digits in groups of 8
/// (`abababab-abababab-abababab-abababab`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 16]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, group) in self.0.chunks(4).enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            f.write_str(&hex::encode(group))?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = String;

    /// The written form: four groups of 8 hex digits joined by `-`.
    fn from_str(text: &str) -> Result<Fingerprint, String> {
        let groups: Vec<&str> = text.split('-').collect();
        if groups.len() != 4 || groups.iter().any(|g| g.len() != 8) {
            return Err(format!("not a fingerprint (4 groups of 8 hex digits): {text:?}"));
        }
        let bytes = hex::decode(groups.concat()).map_err(|_| format!("not a fingerprint (hex digits): {text:?}"))?;
        let mut fp = [0u8; 16];
        fp.copy_from_slice(&bytes);
        Ok(Fingerprint(fp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_is_hmac_of_a_label() {
        let mbk = Mbk::from_bytes(&[7; 32]).unwrap();
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&[7; 32]).unwrap();
        mac.update(b"cssim mbk fingerprint");
        let full = mac.finalize().into_bytes();
        assert_eq!(mbk.fingerprint().0, full[..16]);
        let text = mbk.fingerprint().to_string();
        assert_eq!(text.len(), 35);
        assert_eq!(text.matches('-').count(), 3);
        assert_eq!(text.parse::<Fingerprint>().unwrap(), mbk.fingerprint());
        assert_ne!(Mbk::generate().fingerprint(), mbk.fingerprint());
        assert!(Mbk::from_bytes(&[7; 31]).is_none());
        assert!("abababab-abababab-abababab".parse::<Fingerprint>().is_err());
        assert!("abababab-abababab-abababab-ababazab".parse::<Fingerprint>().is_err());
    }

    #[test]
    fn debug_output_shows_no_key() {
        let mbk = Mbk::from_bytes(&[0xa5; 32]).unwrap();
        let shown = format!("{mbk:?}");
        assert!(!shown.contains("a5a5a5a5"), "{shown}");
    }
}
