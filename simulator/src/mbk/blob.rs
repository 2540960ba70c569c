//! Key backup blobs (what `cxitool BackupKey` gets from the firmware): a key object with all its attributes,
//! its secret components encrypted under the device MBK, everything authenticated.
//!
//! Format version 1 (integers big-endian):
//!
//! ```text
//! magic        8   "CSSIMMBK"
//! version      2   1
//! fingerprint 16   of the MBK the blob was made under
//! created      8   Unix seconds
//! class        8   CKA_CLASS
//! key type     8   CKA_KEY_TYPE
//! clear len    4   then that many bytes: the attributes that are not secret components
//! nonce       12   AES-GCM nonce (random)
//! sealed len   4   then that many bytes: AES-256-GCM of the secret components, with its 16-byte tag
//! ```
//!
//! The GCM key is HMAC-SHA256(MBK, "cssim mbk blob key aes-256-gcm"); its additional data is every byte before
//! the sealed part, so the tag covers the whole blob. Attributes are encoded as `type (8) | kind (1: 0 bytes,
//! 1 attribute array) | length (4) | value`, an attribute array's value as `type (8) | length (4) | value`
//! per element; values are as the object holds them (CK_ULONG in the host's byte order).

// CK_ULONG is u64 on 64-bit Linux, narrower elsewhere: the format's 8-byte fields are written with casts.
#![allow(clippy::unnecessary_cast)]

use super::{Fingerprint, Mbk};
use crate::object::{Attr, Bytes, Object};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use cryptoki_sys::*;
use rand::RngCore;
use std::collections::BTreeMap;
use zeroize::Zeroizing;

pub const MAGIC: &[u8; 8] = b"CSSIMMBK";
pub const VERSION: u16 = 1;
const NONCE_LEN: usize = 12;

/// Why a blob cannot be restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobError {
    /// Not a blob, truncated, or an unknown format version.
    Format,
    /// Made under another MBK (the header's fingerprint says so).
    WrongMbk(Fingerprint),
    /// The tag does not verify: altered or damaged.
    Mac,
}

/// The clear header of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fingerprint: Fingerprint,
    pub created: u64,
    pub class: CK_OBJECT_CLASS,
    pub key_type: CK_KEY_TYPE,
}

/// A blob taken apart, not yet verified.
struct Parts<'a> {
    header: Header,
    clear: &'a [u8],
    nonce: &'a [u8],
    /// Everything before the sealed part (the GCM additional data).
    aad: &'a [u8],
    sealed: &'a [u8],
}

/// Reads big-endian fields off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BlobError> {
        if self.0.len() < n {
            return Err(BlobError::Format);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, BlobError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().map_err(|_| BlobError::Format)?))
    }
    fn u32(&mut self) -> Result<usize, BlobError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().map_err(|_| BlobError::Format)?) as usize)
    }
    fn u64(&mut self) -> Result<u64, BlobError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().map_err(|_| BlobError::Format)?))
    }
}

fn put_value(out: &mut Vec<u8>, value: &[u8]) {
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
}

fn encode<'a>(attrs: impl Iterator<Item = (&'a CK_ATTRIBUTE_TYPE, &'a Attr)>) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::new());
    for (ty, value) in attrs {
        out.extend_from_slice(&(*ty as u64).to_be_bytes());
        match value {
            Attr::Bytes(b) => {
                out.push(0);
                put_value(&mut out, &b.0);
            }
            Attr::Template(t) => {
                let mut inner = Zeroizing::new(Vec::new());
                for (ity, iv) in t {
                    inner.extend_from_slice(&(*ity as u64).to_be_bytes());
                    put_value(&mut inner, &iv.0);
                }
                out.push(1);
                put_value(&mut out, &inner);
            }
        }
    }
    out
}

fn decode(data: &[u8], into: &mut BTreeMap<CK_ATTRIBUTE_TYPE, Attr>) -> Result<(), BlobError> {
    let mut r = Reader(data);
    while !r.0.is_empty() {
        let ty = r.u64()? as CK_ATTRIBUTE_TYPE;
        let kind = r.take(1)?[0];
        let len = r.u32()?;
        let value = r.take(len)?;
        let attr = match kind {
            0 => Attr::bytes(value.to_vec()),
            1 => {
                let mut inner = Reader(value);
                let mut t = BTreeMap::new();
                while !inner.0.is_empty() {
                    let ity = inner.u64()? as CK_ATTRIBUTE_TYPE;
                    let n = inner.u32()?;
                    t.insert(ity, Bytes(inner.take(n)?.to_vec()));
                }
                Attr::Template(t)
            }
            _ => return Err(BlobError::Format),
        };
        if into.insert(ty, attr).is_some() {
            return Err(BlobError::Format);
        }
    }
    Ok(())
}

/// Makes the blob of a key object under `mbk`.
pub fn seal(mbk: &Mbk, object: &Object, created: u64) -> Result<Vec<u8>, CK_RV> {
    let (secret, clear): (Vec<_>, Vec<_>) = object.attrs.iter().partition(|(ty, _)| object.is_secret_component(**ty));
    let clear = encode(clear.into_iter());
    let secret = encode(secret.into_iter());
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let mut blob = Vec::with_capacity(80 + clear.len() + secret.len());
    blob.extend_from_slice(MAGIC);
    blob.extend_from_slice(&VERSION.to_be_bytes());
    blob.extend_from_slice(&mbk.fingerprint().0);
    blob.extend_from_slice(&created.to_be_bytes());
    blob.extend_from_slice(&(object.class() as u64).to_be_bytes());
    blob.extend_from_slice(&(object.key_type().unwrap_or(CK_UNAVAILABLE_INFORMATION) as u64).to_be_bytes());
    put_value(&mut blob, &clear);
    blob.extend_from_slice(&nonce);
    // The sealed length is known before sealing: GCM adds its 16-byte tag.
    blob.extend_from_slice(&((secret.len() + 16) as u32).to_be_bytes());
    let key = mbk.blob_key();
    let cipher = Aes256Gcm::new_from_slice(key.as_ref()).map_err(|_| CKR_GENERAL_ERROR)?;
    let sealed =
        cipher.encrypt(&Nonce::from(nonce), Payload { msg: &secret, aad: &blob }).map_err(|_| CKR_GENERAL_ERROR)?;
    blob.extend_from_slice(&sealed);
    Ok(blob)
}

fn parts(blob: &[u8]) -> Result<Parts<'_>, BlobError> {
    let mut r = Reader(blob);
    if r.take(MAGIC.len())? != MAGIC || r.u16()? != VERSION {
        return Err(BlobError::Format);
    }
    let mut fingerprint = [0u8; 16];
    fingerprint.copy_from_slice(r.take(16)?);
    let header = Header {
        fingerprint: Fingerprint(fingerprint),
        created: r.u64()?,
        class: r.u64()? as CK_OBJECT_CLASS,
        key_type: r.u64()? as CK_KEY_TYPE,
    };
    let clear_len = r.u32()?;
    let clear = r.take(clear_len)?;
    let nonce = r.take(NONCE_LEN)?;
    let sealed_len = r.u32()?;
    let aad = &blob[..blob.len() - r.0.len()];
    let sealed = r.take(sealed_len)?;
    if !r.0.is_empty() || sealed.len() < 16 {
        return Err(BlobError::Format);
    }
    Ok(Parts { header, clear, nonce, aad, sealed })
}

/// The header of a blob (format checked, nothing verified).
#[cfg(test)]
pub fn header(blob: &[u8]) -> Result<Header, BlobError> {
    parts(blob).map(|p| p.header)
}

/// The key object of a blob made under `mbk`: format, then the MBK's fingerprint (before any cryptography),
/// then the tag; the attributes must agree with the header's class and key type.
pub fn open(mbk: &Mbk, blob: &[u8]) -> Result<Object, BlobError> {
    let p = parts(blob)?;
    if p.header.fingerprint != mbk.fingerprint() {
        return Err(BlobError::WrongMbk(p.header.fingerprint));
    }
    let key = mbk.blob_key();
    let cipher = Aes256Gcm::new_from_slice(key.as_ref()).map_err(|_| BlobError::Mac)?;
    let nonce: [u8; NONCE_LEN] = p.nonce.try_into().map_err(|_| BlobError::Format)?;
    let secret = Zeroizing::new(
        cipher.decrypt(&Nonce::from(nonce), Payload { msg: p.sealed, aad: p.aad }).map_err(|_| BlobError::Mac)?,
    );
    let mut object = Object::default();
    decode(p.clear, &mut object.attrs)?;
    decode(&secret, &mut object.attrs)?;
    if !object.is_key()
        || object.class() != p.header.class
        || object.key_type().unwrap_or(CK_UNAVAILABLE_INFORMATION) != p.header.key_type
    {
        return Err(BlobError::Format);
    }
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aes_key() -> Object {
        let mut o = Object::default();
        o.set(CKA_CLASS, Attr::ulong(CKO_SECRET_KEY));
        o.set(CKA_KEY_TYPE, Attr::ulong(CKK_AES));
        o.set(CKA_VALUE, Attr::bytes(vec![0x42; 32]));
        o.set(CKA_LABEL, Attr::bytes(b"label".to_vec()));
        o.set(CKA_SENSITIVE, Attr::bool(true));
        let mut t = BTreeMap::new();
        t.insert(CKA_EXTRACTABLE, Bytes(vec![0]));
        o.set(CKA_UNWRAP_TEMPLATE, Attr::Template(t));
        o
    }

    #[test]
    fn round_trip_and_the_secret_is_not_in_clear() {
        let mbk = Mbk::from_bytes(&[1; 32]).unwrap();
        let blob = seal(&mbk, &aes_key(), 1_700_000_000).unwrap();
        assert!(!blob.windows(32).any(|w| w == [0x42; 32]));
        assert!(blob.windows(5).any(|w| w == b"label"), "non-secret attributes are in clear");
        assert_eq!(open(&mbk, &blob).unwrap(), aes_key());
        let h = header(&blob).unwrap();
        assert_eq!((h.created, h.class, h.key_type), (1_700_000_000, CKO_SECRET_KEY, CKK_AES));
        assert_eq!(h.fingerprint, mbk.fingerprint());
    }

    #[test]
    fn every_alteration_is_refused() {
        let mbk = Mbk::from_bytes(&[1; 32]).unwrap();
        let blob = seal(&mbk, &aes_key(), 5).unwrap();
        let other = Mbk::from_bytes(&[2; 32]).unwrap();
        assert_eq!(open(&other, &blob), Err(BlobError::WrongMbk(mbk.fingerprint())));
        let clear_len = u32::from_be_bytes(blob[50..54].try_into().unwrap()) as usize;
        let sealed_len_at = 54 + clear_len + 12;
        for i in 0..blob.len() {
            let mut b = blob.clone();
            b[i] ^= 0x01;
            let expected = match i {
                // magic, version, and the two length fields: the blob cannot be read.
                0..=9 | 50..=53 => BlobError::Format,
                _ if (sealed_len_at..sealed_len_at + 4).contains(&i) => BlobError::Format,
                10..=25 => BlobError::WrongMbk(Fingerprint({
                    let mut f = mbk.fingerprint().0;
                    f[i - 10] ^= 1;
                    f
                })),
                // created, class, key type, clear attributes, nonce, ciphertext, tag.
                _ => BlobError::Mac,
            };
            assert_eq!(open(&mbk, &b).unwrap_err(), expected, "byte {i}");
        }
        for n in 0..blob.len() {
            assert_eq!(open(&mbk, &blob[..n]).unwrap_err(), BlobError::Format, "truncated to {n}");
        }
        let mut longer = blob.clone();
        longer.push(0);
        assert_eq!(open(&mbk, &longer).unwrap_err(), BlobError::Format);
    }
}
