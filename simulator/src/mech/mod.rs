//! The mechanisms: what the token offers (C_GetMechanismList/Info), their parameters in safe form, the
//! keys they work with, and the multi-part operation states.

pub mod aes;
pub mod ec;
pub mod rsa;

use crate::object::Object;
use crate::Result;
use cryptoki_sys::*;
use digest::Digest;
use hmac::{Hmac, Mac};
use zeroize::Zeroizing;

/// A mechanism parameter, copied out of the caller's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param {
    None,
    /// Plain bytes (an IV).
    Bytes(Vec<u8>),
    Gcm {
        iv: Vec<u8>,
        aad: Vec<u8>,
        tag_bits: usize,
    },
    Oaep {
        hash: CK_MECHANISM_TYPE,
        mgf: CK_RSA_PKCS_MGF_TYPE,
        label: Vec<u8>,
    },
    Pss {
        hash: CK_MECHANISM_TYPE,
        mgf: CK_RSA_PKCS_MGF_TYPE,
        salt_len: usize,
    },
    Ecdh {
        kdf: CK_EC_KDF_TYPE,
        shared: Vec<u8>,
        public: Vec<u8>,
    },
}

/// A mechanism with its parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mechanism {
    pub ty: CK_MECHANISM_TYPE,
    pub param: Param,
}

/// What the token offers: (mechanism, min key size, max key size, flags). Key sizes are in bytes for AES and
/// generic secrets (as SoftHSM2 reports them) and in bits for RSA and EC. Every mechanism is CKF_HW: the
/// simulated CryptoServer does all of it in the device (and `pkcs11-tool --test` signs only with such).
pub const MECHANISMS: &[(CK_MECHANISM_TYPE, CK_ULONG, CK_ULONG, CK_FLAGS)] = {
    const ENC: CK_FLAGS = CKF_HW | CKF_ENCRYPT | CKF_DECRYPT;
    const SIG: CK_FLAGS = CKF_HW | CKF_SIGN | CKF_VERIFY;
    const WRAP: CK_FLAGS = CKF_HW | CKF_WRAP | CKF_UNWRAP;
    const EC: CK_FLAGS = CKF_HW | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS;
    &[
        (CKM_AES_KEY_GEN, 16, 32, CKF_HW | CKF_GENERATE),
        (CKM_AES_ECB, 16, 32, ENC),
        (CKM_AES_CBC, 16, 32, ENC),
        (CKM_AES_CBC_PAD, 16, 32, ENC),
        (CKM_AES_GCM, 16, 32, ENC),
        (CKM_AES_KEY_WRAP, 16, 32, WRAP),
        (CKM_AES_KEY_WRAP_PAD, 16, 32, WRAP),
        (CKM_AES_KEY_WRAP_KWP, 16, 32, WRAP),
        (CKM_GENERIC_SECRET_KEY_GEN, 1, 512, CKF_HW | CKF_GENERATE),
        (CKM_SHA_1, 0, 0, CKF_HW | CKF_DIGEST),
        (CKM_SHA224, 0, 0, CKF_HW | CKF_DIGEST),
        (CKM_SHA256, 0, 0, CKF_HW | CKF_DIGEST),
        (CKM_SHA384, 0, 0, CKF_HW | CKF_DIGEST),
        (CKM_SHA512, 0, 0, CKF_HW | CKF_DIGEST),
        (CKM_SHA_1_HMAC, 1, 512, SIG),
        (CKM_SHA224_HMAC, 1, 512, SIG),
        (CKM_SHA256_HMAC, 1, 512, SIG),
        (CKM_SHA384_HMAC, 1, 512, SIG),
        (CKM_SHA512_HMAC, 1, 512, SIG),
        (CKM_RSA_PKCS_KEY_PAIR_GEN, 2048, 4096, CKF_HW | CKF_GENERATE_KEY_PAIR),
        (CKM_RSA_PKCS, 2048, 4096, ENC | SIG | WRAP),
        (CKM_SHA1_RSA_PKCS, 2048, 4096, SIG),
        (CKM_SHA224_RSA_PKCS, 2048, 4096, SIG),
        (CKM_SHA256_RSA_PKCS, 2048, 4096, SIG),
        (CKM_SHA384_RSA_PKCS, 2048, 4096, SIG),
        (CKM_SHA512_RSA_PKCS, 2048, 4096, SIG),
        (CKM_RSA_PKCS_PSS, 2048, 4096, SIG),
        (CKM_SHA1_RSA_PKCS_PSS, 2048, 4096, SIG),
        (CKM_SHA224_RSA_PKCS_PSS, 2048, 4096, SIG),
        (CKM_SHA256_RSA_PKCS_PSS, 2048, 4096, SIG),
        (CKM_SHA384_RSA_PKCS_PSS, 2048, 4096, SIG),
        (CKM_SHA512_RSA_PKCS_PSS, 2048, 4096, SIG),
        (CKM_RSA_PKCS_OAEP, 2048, 4096, ENC | WRAP),
        (CKM_EC_KEY_PAIR_GEN, 256, 384, CKF_GENERATE_KEY_PAIR | EC),
        (CKM_ECDSA, 256, 384, SIG | EC),
        (CKM_ECDSA_SHA1, 256, 384, SIG | EC),
        (CKM_ECDSA_SHA224, 256, 384, SIG | EC),
        (CKM_ECDSA_SHA256, 256, 384, SIG | EC),
        (CKM_ECDSA_SHA384, 256, 384, SIG | EC),
        (CKM_ECDSA_SHA512, 256, 384, SIG | EC),
        (CKM_ECDH1_DERIVE, 256, 384, CKF_DERIVE | EC),
    ]
};

/// The flags of a mechanism, or CKR_MECHANISM_INVALID.
pub fn flags(ty: CK_MECHANISM_TYPE) -> Result<CK_FLAGS> {
    MECHANISMS.iter().find(|m| m.0 == ty).map(|m| m.3).ok_or(CKR_MECHANISM_INVALID)
}

/// Checks that `ty` is offered for `what` (a CKF_ function flag).
pub fn require(ty: CK_MECHANISM_TYPE, what: CK_FLAGS) -> Result<()> {
    if flags(ty)? & what == 0 {
        return Err(CKR_MECHANISM_INVALID);
    }
    Ok(())
}

/// A hash function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlg {
    /// The digest mechanism (CKM_SHA256…) as named in OAEP/PSS parameters.
    pub fn from_digest_mechanism(m: CK_MECHANISM_TYPE) -> Option<HashAlg> {
        Some(match m {
            CKM_SHA_1 => HashAlg::Sha1,
            CKM_SHA224 => HashAlg::Sha224,
            CKM_SHA256 => HashAlg::Sha256,
            CKM_SHA384 => HashAlg::Sha384,
            CKM_SHA512 => HashAlg::Sha512,
            _ => return None,
        })
    }

    /// The MGF1 function with this hash.
    pub fn mgf(self) -> CK_RSA_PKCS_MGF_TYPE {
        match self {
            HashAlg::Sha1 => CKG_MGF1_SHA1,
            HashAlg::Sha224 => CKG_MGF1_SHA224,
            HashAlg::Sha256 => CKG_MGF1_SHA256,
            HashAlg::Sha384 => CKG_MGF1_SHA384,
            HashAlg::Sha512 => CKG_MGF1_SHA512,
        }
    }

    pub fn from_mgf(mgf: CK_RSA_PKCS_MGF_TYPE) -> Option<HashAlg> {
        [HashAlg::Sha1, HashAlg::Sha224, HashAlg::Sha256, HashAlg::Sha384, HashAlg::Sha512]
            .into_iter()
            .find(|h| h.mgf() == mgf)
    }

    pub fn len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    pub fn hasher(self) -> Hasher {
        match self {
            HashAlg::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            HashAlg::Sha224 => Hasher::Sha224(sha2::Sha224::new()),
            HashAlg::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            HashAlg::Sha384 => Hasher::Sha384(sha2::Sha384::new()),
            HashAlg::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn dyn_digest(self) -> Box<dyn digest::DynDigest + Send + Sync> {
        match self {
            HashAlg::Sha1 => Box::new(sha1::Sha1::new()),
            HashAlg::Sha224 => Box::new(sha2::Sha224::new()),
            HashAlg::Sha256 => Box::new(sha2::Sha256::new()),
            HashAlg::Sha384 => Box::new(sha2::Sha384::new()),
            HashAlg::Sha512 => Box::new(sha2::Sha512::new()),
        }
    }

    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        let mut h = self.hasher();
        h.update(data);
        h.finish()
    }
}

/// A running hash.
#[derive(Clone)]
pub enum Hasher {
    Sha1(sha1::Sha1),
    Sha224(sha2::Sha224),
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha224(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha224(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha384(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
        }
    }
}

/// A running HMAC.
#[derive(Clone)]
pub enum HmacState {
    Sha1(Hmac<sha1::Sha1>),
    Sha224(Hmac<sha2::Sha224>),
    Sha256(Hmac<sha2::Sha256>),
    Sha384(Hmac<sha2::Sha384>),
    Sha512(Hmac<sha2::Sha512>),
}

impl HmacState {
    pub fn new(hash: HashAlg, key: &[u8]) -> Result<HmacState> {
        let bad = |_| CKR_KEY_SIZE_RANGE;
        Ok(match hash {
            HashAlg::Sha1 => HmacState::Sha1(Hmac::new_from_slice(key).map_err(bad)?),
            HashAlg::Sha224 => HmacState::Sha224(Hmac::new_from_slice(key).map_err(bad)?),
            HashAlg::Sha256 => HmacState::Sha256(Hmac::new_from_slice(key).map_err(bad)?),
            HashAlg::Sha384 => HmacState::Sha384(Hmac::new_from_slice(key).map_err(bad)?),
            HashAlg::Sha512 => HmacState::Sha512(Hmac::new_from_slice(key).map_err(bad)?),
        })
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            HmacState::Sha1(m) => m.update(data),
            HmacState::Sha224(m) => m.update(data),
            HmacState::Sha256(m) => m.update(data),
            HmacState::Sha384(m) => m.update(data),
            HmacState::Sha512(m) => m.update(data),
        }
    }

    pub fn finish(self) -> Vec<u8> {
        match self {
            HmacState::Sha1(m) => m.finalize().into_bytes().to_vec(),
            HmacState::Sha224(m) => m.finalize().into_bytes().to_vec(),
            HmacState::Sha256(m) => m.finalize().into_bytes().to_vec(),
            HmacState::Sha384(m) => m.finalize().into_bytes().to_vec(),
            HmacState::Sha512(m) => m.finalize().into_bytes().to_vec(),
        }
    }
}

/// The key material of an object, parsed for use.
pub enum Key {
    Secret { key_type: CK_KEY_TYPE, value: Zeroizing<Vec<u8>> },
    RsaPrivate(Box<::rsa::RsaPrivateKey>),
    RsaPublic(::rsa::RsaPublicKey),
    EcPrivate(ec::EcSecret),
    EcPublic(ec::EcPublic),
}

impl Key {
    /// Parses the key of `obj` (CKR_KEY_TYPE_INCONSISTENT if it holds no usable key).
    pub fn from_object(obj: &Object) -> Result<Key> {
        let bad = CKR_KEY_TYPE_INCONSISTENT;
        Ok(match (obj.class(), obj.key_type()) {
            (CKO_SECRET_KEY, Some(kt)) => {
                Key::Secret { key_type: kt, value: Zeroizing::new(obj.get(CKA_VALUE).ok_or(bad)?.to_vec()) }
            }
            (CKO_PRIVATE_KEY, Some(CKK_RSA)) => Key::RsaPrivate(Box::new(rsa::private_from(obj)?)),
            (CKO_PUBLIC_KEY, Some(CKK_RSA)) => Key::RsaPublic(rsa::public_from(obj)?),
            (CKO_PRIVATE_KEY, Some(CKK_EC)) => Key::EcPrivate(ec::EcSecret::from_object(obj)?),
            (CKO_PUBLIC_KEY, Some(CKK_EC)) => Key::EcPublic(ec::EcPublic::from_object(obj)?),
            _ => return Err(bad),
        })
    }
}

/// Checks the key material of a new object (C_CreateObject): CKR_ATTRIBUTE_VALUE_INVALID when it cannot be
/// used (wrong AES length, unknown curve, inconsistent RSA components).
pub fn check_material(obj: &Object) -> Result<()> {
    if obj.class() == CKO_SECRET_KEY {
        let len = obj.get(CKA_VALUE).map_or(0, <[u8]>::len);
        let ok = match obj.key_type() {
            Some(CKK_AES) => matches!(len, 16 | 24 | 32),
            _ => len > 0,
        };
        return if ok { Ok(()) } else { Err(CKR_ATTRIBUTE_VALUE_INVALID) };
    }
    if obj.is_key() {
        if obj.key_type() == Some(CKK_EC) {
            let params = obj.get(CKA_EC_PARAMS).unwrap_or_default();
            ec::Curve::from_params(params).ok_or(CKR_CURVE_NOT_SUPPORTED)?;
        }
        Key::from_object(obj).map_err(|_| CKR_ATTRIBUTE_VALUE_INVALID)?;
    }
    Ok(())
}

/// Encryption and decryption states.
pub enum Cipher {
    Block(Box<aes::BlockMode>),
    Gcm(aes::Gcm),
    Rsa(rsa::RsaCipher),
}

impl Cipher {
    /// Starts `mechanism` with `key` (`encrypt`: which direction).
    pub fn new(mechanism: &Mechanism, key: Key, encrypt: bool) -> Result<Cipher> {
        match mechanism.ty {
            CKM_AES_ECB | CKM_AES_CBC | CKM_AES_CBC_PAD => {
                Ok(Cipher::Block(Box::new(aes::BlockMode::new(mechanism, &secret_of(&key, CKK_AES)?, encrypt)?)))
            }
            CKM_AES_GCM => Ok(Cipher::Gcm(aes::Gcm::new(mechanism, &secret_of(&key, CKK_AES)?, encrypt)?)),
            CKM_RSA_PKCS | CKM_RSA_PKCS_OAEP => Ok(Cipher::Rsa(rsa::RsaCipher::new(mechanism, key, encrypt)?)),
            _ => Err(CKR_MECHANISM_INVALID),
        }
    }

    pub fn update(&mut self, data: &[u8]) -> Result<Vec<u8>> {
        match self {
            Cipher::Block(b) => b.update(data),
            Cipher::Gcm(g) => {
                g.buffer.extend_from_slice(data);
                Ok(Vec::new())
            }
            Cipher::Rsa(r) => {
                r.buffer.extend_from_slice(data);
                Ok(Vec::new())
            }
        }
    }

    pub fn finish(&mut self) -> Result<Vec<u8>> {
        match self {
            Cipher::Block(b) => b.finish(),
            Cipher::Gcm(g) => g.finish(),
            Cipher::Rsa(r) => r.finish(),
        }
    }

    /// Single-part: C_Encrypt / C_Decrypt.
    pub fn single(&mut self, data: &[u8]) -> Result<Vec<u8>> {
        let mut out = self.update(data)?;
        out.extend(self.finish()?);
        Ok(out)
    }
}

/// The value of a secret key of type `key_type` (CKR_KEY_TYPE_INCONSISTENT otherwise).
pub fn secret_of(key: &Key, key_type: CK_KEY_TYPE) -> Result<Zeroizing<Vec<u8>>> {
    match key {
        Key::Secret { key_type: kt, value } if *kt == key_type => Ok(value.clone()),
        _ => Err(CKR_KEY_TYPE_INCONSISTENT),
    }
}

/// What a signature mechanism does with its input before the key sees it.
enum Input {
    Hash(Hasher),
    Buffer(Zeroizing<Vec<u8>>),
    Mac(HmacState),
}

enum SignKey {
    Rsa(rsa::RsaSigner),
    Ecdsa(Key),
    Hmac(usize),
}

/// A signature (or verification) in progress.
pub struct Signer {
    input: Input,
    key: SignKey,
}

impl Signer {
    /// Starts `mechanism` with `key` (`sign`: which direction, which key class is needed).
    pub fn new(mechanism: &Mechanism, key: Key, sign: bool) -> Result<Signer> {
        let hash = |h| Input::Hash(HashAlg::hasher(h));
        let raw = || Input::Buffer(Zeroizing::new(Vec::new()));
        let (input, key) = match mechanism.ty {
            CKM_SHA_1_HMAC | CKM_SHA224_HMAC | CKM_SHA256_HMAC | CKM_SHA384_HMAC | CKM_SHA512_HMAC => {
                let h = match mechanism.ty {
                    CKM_SHA_1_HMAC => HashAlg::Sha1,
                    CKM_SHA224_HMAC => HashAlg::Sha224,
                    CKM_SHA256_HMAC => HashAlg::Sha256,
                    CKM_SHA384_HMAC => HashAlg::Sha384,
                    _ => HashAlg::Sha512,
                };
                let value = match &key {
                    Key::Secret { key_type: CKK_GENERIC_SECRET | CKK_AES, value } => value.clone(),
                    _ => return Err(CKR_KEY_TYPE_INCONSISTENT),
                };
                (Input::Mac(HmacState::new(h, &value)?), SignKey::Hmac(h.len()))
            }
            CKM_ECDSA | CKM_ECDSA_SHA1 | CKM_ECDSA_SHA224 | CKM_ECDSA_SHA256 | CKM_ECDSA_SHA384 | CKM_ECDSA_SHA512 => {
                match (&key, sign) {
                    (Key::EcPrivate(_), true) | (Key::EcPublic(_), false) => {}
                    _ => return Err(CKR_KEY_TYPE_INCONSISTENT),
                }
                let input = match mechanism.ty {
                    CKM_ECDSA => raw(),
                    CKM_ECDSA_SHA1 => hash(HashAlg::Sha1),
                    CKM_ECDSA_SHA224 => hash(HashAlg::Sha224),
                    CKM_ECDSA_SHA256 => hash(HashAlg::Sha256),
                    CKM_ECDSA_SHA384 => hash(HashAlg::Sha384),
                    _ => hash(HashAlg::Sha512),
                };
                (input, SignKey::Ecdsa(key))
            }
            _ => {
                let (signer, prehash) = rsa::RsaSigner::new(mechanism, key, sign)?;
                (prehash.map_or_else(raw, hash), SignKey::Rsa(signer))
            }
        };
        Ok(Signer { input, key })
    }

    pub fn update(&mut self, data: &[u8]) {
        match &mut self.input {
            Input::Hash(h) => h.update(data),
            Input::Buffer(b) => b.extend_from_slice(data),
            Input::Mac(m) => m.update(data),
        }
    }

    fn take_input(&mut self) -> Input {
        std::mem::replace(&mut self.input, Input::Buffer(Zeroizing::new(Vec::new())))
    }

    pub fn sign(&mut self) -> Result<Vec<u8>> {
        match (self.take_input(), &self.key) {
            (Input::Mac(m), _) => Ok(m.finish()),
            (input, SignKey::Ecdsa(Key::EcPrivate(k))) => Ok(k.sign(&input_bytes(input))),
            (input, SignKey::Rsa(r)) => r.sign(&input_bytes(input)),
            _ => Err(CKR_GENERAL_ERROR),
        }
    }

    pub fn verify(&mut self, signature: &[u8]) -> Result<()> {
        match (self.take_input(), &self.key) {
            (Input::Mac(m), SignKey::Hmac(len)) => {
                if signature.len() != *len {
                    return Err(CKR_SIGNATURE_LEN_RANGE);
                }
                let mac = m.finish();
                if subtle_eq(&mac, signature) {
                    Ok(())
                } else {
                    Err(CKR_SIGNATURE_INVALID)
                }
            }
            (input, SignKey::Ecdsa(Key::EcPublic(k))) => k.verify(&input_bytes(input), signature),
            (input, SignKey::Rsa(r)) => r.verify(&input_bytes(input), signature),
            _ => Err(CKR_GENERAL_ERROR),
        }
    }
}

fn input_bytes(input: Input) -> Zeroizing<Vec<u8>> {
    match input {
        Input::Hash(h) => Zeroizing::new(h.finish()),
        Input::Buffer(b) => b,
        Input::Mac(m) => Zeroizing::new(m.finish()),
    }
}

/// Constant-time comparison of equal-length slices.
fn subtle_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_the_standard_ones() {
        assert_eq!(
            hex::encode(HashAlg::Sha256.digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hex::encode(HashAlg::Sha1.digest(b"abc")), "a9993e364706816aba3e25717850c26c9cd0d89d");
        for h in [HashAlg::Sha1, HashAlg::Sha224, HashAlg::Sha256, HashAlg::Sha384, HashAlg::Sha512] {
            assert_eq!(h.digest(b"").len(), h.len());
            assert_eq!(HashAlg::from_mgf(h.mgf()), Some(h));
        }
    }

    #[test]
    fn hmac_sign_and_verify() {
        let key = Key::Secret { key_type: CKK_GENERIC_SECRET, value: Zeroizing::new(b"key".to_vec()) };
        let m = Mechanism { ty: CKM_SHA256_HMAC, param: Param::None };
        let mut s = Signer::new(&m, key, true).unwrap();
        s.update(b"The quick brown fox jumps over the lazy dog");
        let mac = s.sign().unwrap();
        // RFC 4231-style known answer (Wikipedia's HMAC_SHA256 example).
        assert_eq!(hex::encode(&mac), "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8");
        let key = Key::Secret { key_type: CKK_GENERIC_SECRET, value: Zeroizing::new(b"key".to_vec()) };
        let mut v = Signer::new(&m, key, false).unwrap();
        v.update(b"The quick brown fox jumps over the lazy dog!");
        assert_eq!(v.verify(&mac), Err(CKR_SIGNATURE_INVALID));
    }
}
