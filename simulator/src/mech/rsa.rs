//! RSA: key pairs and their attributes, PKCS#1 v1.5 and PSS signatures, PKCS#1 v1.5 and OAEP encryption,
//! PKCS#8 for wrapping private keys.

use super::{HashAlg, Key, Mechanism, Param};
use crate::object::{Attr, Object, Template};
use crate::Result;
use cryptoki_sys::*;
use rand::rngs::OsRng;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use rsa::traits::{PrivateKeyParts, PublicKeyParts};
use rsa::{BigUint, Oaep, Pkcs1v15Encrypt, Pkcs1v15Sign, Pss, RsaPrivateKey, RsaPublicKey};
use zeroize::Zeroizing;

pub const MIN_BITS: usize = 2048;
pub const MAX_BITS: usize = 4096;

pub fn generate(bits: usize, exponent: &[u8]) -> Result<RsaPrivateKey> {
    if !(MIN_BITS..=MAX_BITS).contains(&bits) {
        return Err(CKR_KEY_SIZE_RANGE);
    }
    let e = BigUint::from_bytes_be(exponent);
    RsaPrivateKey::new_with_exp(&mut OsRng, bits, &e).map_err(|_| CKR_TEMPLATE_INCONSISTENT)
}

fn uint(obj: &Object, ty: CK_ATTRIBUTE_TYPE) -> Option<BigUint> {
    obj.get(ty).filter(|b| !b.is_empty()).map(BigUint::from_bytes_be)
}

pub fn public_from(obj: &Object) -> Result<RsaPublicKey> {
    let n = uint(obj, CKA_MODULUS).ok_or(CKR_KEY_TYPE_INCONSISTENT)?;
    let e = uint(obj, CKA_PUBLIC_EXPONENT).ok_or(CKR_KEY_TYPE_INCONSISTENT)?;
    RsaPublicKey::new_with_max_size(n, e, 16384).map_err(|_| CKR_KEY_TYPE_INCONSISTENT)
}

pub fn private_from(obj: &Object) -> Result<RsaPrivateKey> {
    let n = uint(obj, CKA_MODULUS).ok_or(CKR_KEY_TYPE_INCONSISTENT)?;
    let d = uint(obj, CKA_PRIVATE_EXPONENT).ok_or(CKR_KEY_TYPE_INCONSISTENT)?;
    let e = uint(obj, CKA_PUBLIC_EXPONENT).unwrap_or_else(|| BigUint::from(65537u32));
    let primes: Vec<BigUint> = [uint(obj, CKA_PRIME_1), uint(obj, CKA_PRIME_2)].into_iter().flatten().collect();
    let primes = if primes.len() == 2 { primes } else { Vec::new() };
    RsaPrivateKey::from_components(n, e, d, primes).map_err(|_| CKR_KEY_TYPE_INCONSISTENT)
}

fn be(v: &BigUint) -> Attr {
    Attr::bytes(v.to_bytes_be())
}

/// The public key's attributes.
pub fn public_material(key: &RsaPublicKey) -> Template {
    vec![(CKA_MODULUS, be(key.n())), (CKA_PUBLIC_EXPONENT, be(key.e()))]
}

/// The private key's attributes (with the CRT values, as SoftHSM2 stores them).
pub fn private_material(key: &RsaPrivateKey) -> Template {
    let mut t =
        vec![(CKA_MODULUS, be(key.n())), (CKA_PUBLIC_EXPONENT, be(key.e())), (CKA_PRIVATE_EXPONENT, be(key.d()))];
    if let [p, q] = key.primes() {
        t.push((CKA_PRIME_1, be(p)));
        t.push((CKA_PRIME_2, be(q)));
    }
    if let (Some(dp), Some(dq), Some(qinv)) = (key.dp(), key.dq(), key.crt_coefficient()) {
        t.push((CKA_EXPONENT_1, be(dp)));
        t.push((CKA_EXPONENT_2, be(dq)));
        t.push((CKA_COEFFICIENT, be(&qinv)));
    }
    t
}

pub fn to_pkcs8(key: &RsaPrivateKey) -> Result<Zeroizing<Vec<u8>>> {
    key.to_pkcs8_der().map(|d| Zeroizing::new(d.as_bytes().to_vec())).map_err(|_| CKR_FUNCTION_FAILED)
}

pub fn from_pkcs8(der: &[u8]) -> Option<RsaPrivateKey> {
    RsaPrivateKey::from_pkcs8_der(der).ok()
}

fn pkcs1v15_sign(hash: HashAlg) -> Pkcs1v15Sign {
    match hash {
        HashAlg::Sha1 => Pkcs1v15Sign::new::<sha1::Sha1>(),
        HashAlg::Sha224 => Pkcs1v15Sign::new::<sha2::Sha224>(),
        HashAlg::Sha256 => Pkcs1v15Sign::new::<sha2::Sha256>(),
        HashAlg::Sha384 => Pkcs1v15Sign::new::<sha2::Sha384>(),
        HashAlg::Sha512 => Pkcs1v15Sign::new::<sha2::Sha512>(),
    }
}

#[derive(Debug, Clone, Copy)]
enum Scheme {
    /// PKCS#1 v1.5; with the DigestInfo prefix of this hash, or over raw input (CKM_RSA_PKCS).
    Pkcs1(Option<HashAlg>),
    Pss {
        hash: HashAlg,
        salt_len: usize,
    },
}

impl Scheme {
    fn sign(self, key: &RsaPrivateKey, input: &[u8]) -> rsa::Result<Vec<u8>> {
        match self {
            Scheme::Pkcs1(h) => {
                key.sign_with_rng(&mut OsRng, h.map_or_else(Pkcs1v15Sign::new_unprefixed, pkcs1v15_sign), input)
            }
            Scheme::Pss { hash, salt_len } => {
                key.sign_with_rng(&mut OsRng, Pss { blinded: false, digest: hash.dyn_digest(), salt_len }, input)
            }
        }
    }
}

/// An RSA signature or verification.
pub struct RsaSigner {
    key: Key,
    scheme: Scheme,
}

impl RsaSigner {
    /// The signer and the hash the mechanism applies to the data first (None: the input is signed as given).
    pub fn new(mechanism: &Mechanism, key: Key, sign: bool) -> Result<(RsaSigner, Option<HashAlg>)> {
        match (&key, sign) {
            (Key::RsaPrivate(_), true) | (Key::RsaPublic(_), false) => {}
            _ => return Err(CKR_KEY_TYPE_INCONSISTENT),
        }
        let pss = |expected: Option<HashAlg>| -> Result<Scheme> {
            let Param::Pss { hash, mgf, salt_len } = mechanism.param else {
                return Err(CKR_MECHANISM_PARAM_INVALID);
            };
            let hash = HashAlg::from_digest_mechanism(hash).ok_or(CKR_MECHANISM_PARAM_INVALID)?;
            if HashAlg::from_mgf(mgf) != Some(hash) || expected.is_some_and(|e| e != hash) {
                return Err(CKR_MECHANISM_PARAM_INVALID);
            }
            Ok(Scheme::Pss { hash, salt_len })
        };
        let (scheme, prehash) = match mechanism.ty {
            CKM_RSA_PKCS => (Scheme::Pkcs1(None), None),
            CKM_SHA1_RSA_PKCS => (Scheme::Pkcs1(Some(HashAlg::Sha1)), Some(HashAlg::Sha1)),
            CKM_SHA224_RSA_PKCS => (Scheme::Pkcs1(Some(HashAlg::Sha224)), Some(HashAlg::Sha224)),
            CKM_SHA256_RSA_PKCS => (Scheme::Pkcs1(Some(HashAlg::Sha256)), Some(HashAlg::Sha256)),
            CKM_SHA384_RSA_PKCS => (Scheme::Pkcs1(Some(HashAlg::Sha384)), Some(HashAlg::Sha384)),
            CKM_SHA512_RSA_PKCS => (Scheme::Pkcs1(Some(HashAlg::Sha512)), Some(HashAlg::Sha512)),
            CKM_RSA_PKCS_PSS => (pss(None)?, None),
            CKM_SHA1_RSA_PKCS_PSS => (pss(Some(HashAlg::Sha1))?, Some(HashAlg::Sha1)),
            CKM_SHA224_RSA_PKCS_PSS => (pss(Some(HashAlg::Sha224))?, Some(HashAlg::Sha224)),
            CKM_SHA256_RSA_PKCS_PSS => (pss(Some(HashAlg::Sha256))?, Some(HashAlg::Sha256)),
            CKM_SHA384_RSA_PKCS_PSS => (pss(Some(HashAlg::Sha384))?, Some(HashAlg::Sha384)),
            CKM_SHA512_RSA_PKCS_PSS => (pss(Some(HashAlg::Sha512))?, Some(HashAlg::Sha512)),
            _ => return Err(CKR_MECHANISM_INVALID),
        };
        Ok((RsaSigner { key, scheme }, prehash))
    }

    fn check_input(&self, input: &[u8], size: usize) -> Result<()> {
        let ok = match self.scheme {
            Scheme::Pkcs1(None) => input.len() + 11 <= size,
            Scheme::Pkcs1(Some(h)) | Scheme::Pss { hash: h, .. } => input.len() == h.len(),
        };
        if ok {
            Ok(())
        } else {
            Err(CKR_DATA_LEN_RANGE)
        }
    }

    pub fn sign(&self, input: &[u8]) -> Result<Vec<u8>> {
        let Key::RsaPrivate(k) = &self.key else { return Err(CKR_GENERAL_ERROR) };
        self.check_input(input, k.size())?;
        self.scheme.sign(k, input).map_err(|_| CKR_FUNCTION_FAILED)
    }

    pub fn verify(&self, input: &[u8], signature: &[u8]) -> Result<()> {
        let Key::RsaPublic(k) = &self.key else { return Err(CKR_GENERAL_ERROR) };
        if signature.len() != k.size() {
            return Err(CKR_SIGNATURE_LEN_RANGE);
        }
        if self.check_input(input, k.size()).is_err() {
            return Err(CKR_SIGNATURE_INVALID);
        }
        let r = match self.scheme {
            Scheme::Pkcs1(h) => k.verify(h.map_or_else(Pkcs1v15Sign::new_unprefixed, pkcs1v15_sign), input, signature),
            Scheme::Pss { hash, salt_len } => {
                k.verify(Pss { blinded: false, digest: hash.dyn_digest(), salt_len }, input, signature)
            }
        };
        r.map_err(|_| CKR_SIGNATURE_INVALID)
    }
}

/// PKCS#1 v1.5 or OAEP padding.
#[derive(Debug, Clone)]
enum Padding {
    Pkcs1,
    Oaep { hash: HashAlg, mgf: HashAlg, label: Option<String> },
}

impl Padding {
    fn from(mechanism: &Mechanism) -> Result<Padding> {
        match (mechanism.ty, &mechanism.param) {
            (CKM_RSA_PKCS, Param::None) => Ok(Padding::Pkcs1),
            (CKM_RSA_PKCS, Param::Bytes(b)) if b.is_empty() => Ok(Padding::Pkcs1),
            (CKM_RSA_PKCS_OAEP, Param::Oaep { hash, mgf, label }) => {
                let hash = HashAlg::from_digest_mechanism(*hash).ok_or(CKR_MECHANISM_PARAM_INVALID)?;
                let mgf = HashAlg::from_mgf(*mgf).ok_or(CKR_MECHANISM_PARAM_INVALID)?;
                // The rsa crate takes OAEP labels as text: binary labels are refused rather than mangled.
                let label = match label.is_empty() {
                    true => None,
                    false => Some(String::from_utf8(label.clone()).map_err(|_| CKR_MECHANISM_PARAM_INVALID)?),
                };
                Ok(Padding::Oaep { hash, mgf, label })
            }
            (CKM_RSA_PKCS | CKM_RSA_PKCS_OAEP, _) => Err(CKR_MECHANISM_PARAM_INVALID),
            _ => Err(CKR_MECHANISM_INVALID),
        }
    }

    fn oaep(hash: HashAlg, mgf: HashAlg, label: &Option<String>) -> Oaep {
        Oaep { digest: hash.dyn_digest(), mgf_digest: mgf.dyn_digest(), label: label.clone() }
    }

    fn encrypt(&self, key: &RsaPublicKey, data: &[u8]) -> Result<Vec<u8>> {
        let r = match self {
            Padding::Pkcs1 => key.encrypt(&mut OsRng, Pkcs1v15Encrypt, data),
            Padding::Oaep { hash, mgf, label } => key.encrypt(&mut OsRng, Padding::oaep(*hash, *mgf, label), data),
        };
        r.map_err(|e| match e {
            rsa::Error::MessageTooLong => CKR_DATA_LEN_RANGE,
            _ => CKR_FUNCTION_FAILED,
        })
    }

    fn decrypt(&self, key: &RsaPrivateKey, data: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        if data.len() != key.size() {
            return Err(CKR_ENCRYPTED_DATA_LEN_RANGE);
        }
        let r = match self {
            Padding::Pkcs1 => key.decrypt_blinded(&mut OsRng, Pkcs1v15Encrypt, data),
            Padding::Oaep { hash, mgf, label } => {
                key.decrypt_blinded(&mut OsRng, Padding::oaep(*hash, *mgf, label), data)
            }
        };
        r.map(Zeroizing::new).map_err(|_| CKR_ENCRYPTED_DATA_INVALID)
    }
}

/// RSA encryption or decryption (single-part; multi-part collects the input).
pub struct RsaCipher {
    key: Key,
    padding: Padding,
    pub buffer: Zeroizing<Vec<u8>>,
}

impl RsaCipher {
    pub fn new(mechanism: &Mechanism, key: Key, encrypt: bool) -> Result<RsaCipher> {
        match (&key, encrypt) {
            (Key::RsaPublic(_), true) | (Key::RsaPrivate(_), false) => {}
            _ => return Err(CKR_KEY_TYPE_INCONSISTENT),
        }
        Ok(RsaCipher { key, padding: Padding::from(mechanism)?, buffer: Zeroizing::new(Vec::new()) })
    }

    pub fn finish(&mut self) -> Result<Vec<u8>> {
        let data = Zeroizing::new(std::mem::take(&mut *self.buffer));
        match &self.key {
            Key::RsaPublic(k) => self.padding.encrypt(k, &data),
            Key::RsaPrivate(k) => self.padding.decrypt(k, &data).map(|z| z.to_vec()),
            _ => Err(CKR_GENERAL_ERROR),
        }
    }
}

/// Wraps `data` (a secret key's value) under an RSA public key.
pub fn wrap(mechanism: &Mechanism, key: &RsaPublicKey, data: &[u8]) -> Result<Vec<u8>> {
    Padding::from(mechanism)?
        .encrypt(key, data)
        .map_err(|e| if e == CKR_DATA_LEN_RANGE { CKR_KEY_SIZE_RANGE } else { e })
}

/// Unwraps a secret key's value with an RSA private key.
pub fn unwrap(mechanism: &Mechanism, key: &RsaPrivateKey, data: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    Padding::from(mechanism)?.decrypt(key, data).map_err(|e| match e {
        CKR_ENCRYPTED_DATA_LEN_RANGE => CKR_WRAPPED_KEY_LEN_RANGE,
        _ => CKR_WRAPPED_KEY_INVALID,
    })
}
