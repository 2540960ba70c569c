//! AES: ECB, CBC, CBC with PKCS#7 padding (streaming), GCM, key wrap (RFC 3394) and key wrap with padding
//! (RFC 5649), and the key check value.

// generic-array 0.14 (under the RustCrypto 0.10 crates) deprecates itself in favour of 1.x; the cipher APIs of
// these crate versions take its arrays.
#![allow(deprecated)]

use super::{Mechanism, Param};
use crate::Result;
use aes::cipher::{generic_array::GenericArray, BlockDecrypt, BlockEncrypt, KeyInit};
use aes_gcm::aead::{Aead, Payload};
use aes_gcm::AesGcm;
use cryptoki_sys::*;
use zeroize::Zeroizing;

/// AES with a key of 128, 192 or 256 bits.
#[derive(Clone)]
pub enum Aes {
    A128(aes::Aes128),
    A192(aes::Aes192),
    A256(aes::Aes256),
}

impl Aes {
    pub fn new(key: &[u8]) -> Result<Aes> {
        Ok(match key.len() {
            16 => Aes::A128(aes::Aes128::new(GenericArray::from_slice(key))),
            24 => Aes::A192(aes::Aes192::new(GenericArray::from_slice(key))),
            32 => Aes::A256(aes::Aes256::new(GenericArray::from_slice(key))),
            _ => return Err(CKR_KEY_SIZE_RANGE),
        })
    }

    fn encrypt_block(&self, block: &mut [u8]) {
        let b = GenericArray::from_mut_slice(block);
        match self {
            Aes::A128(c) => c.encrypt_block(b),
            Aes::A192(c) => c.encrypt_block(b),
            Aes::A256(c) => c.encrypt_block(b),
        }
    }

    fn decrypt_block(&self, block: &mut [u8]) {
        let b = GenericArray::from_mut_slice(block);
        match self {
            Aes::A128(c) => c.decrypt_block(b),
            Aes::A192(c) => c.decrypt_block(b),
            Aes::A256(c) => c.decrypt_block(b),
        }
    }
}

/// The key check value: the first three bytes of the encryption of a zero block.
pub fn check_value(key: &[u8]) -> Result<Vec<u8>> {
    let mut block = [0u8; 16];
    Aes::new(key)?.encrypt_block(&mut block);
    Ok(block[..3].to_vec())
}

/// ECB or CBC, with or without padding, one direction, fed in pieces.
pub struct BlockMode {
    cipher: Aes,
    /// The chaining value for CBC.
    chain: Option<[u8; 16]>,
    pad: bool,
    encrypt: bool,
    buffer: Zeroizing<Vec<u8>>,
}

impl BlockMode {
    pub fn new(mechanism: &Mechanism, key: &[u8], encrypt: bool) -> Result<BlockMode> {
        let chain = match (mechanism.ty, &mechanism.param) {
            (CKM_AES_ECB, Param::None) => None,
            (CKM_AES_ECB, Param::Bytes(b)) if b.is_empty() => None,
            (CKM_AES_CBC | CKM_AES_CBC_PAD, Param::Bytes(iv)) => {
                Some(<[u8; 16]>::try_from(iv.as_slice()).map_err(|_| CKR_MECHANISM_PARAM_INVALID)?)
            }
            _ => return Err(CKR_MECHANISM_PARAM_INVALID),
        };
        Ok(BlockMode {
            cipher: Aes::new(key)?,
            chain,
            pad: mechanism.ty == CKM_AES_CBC_PAD,
            encrypt,
            buffer: Zeroizing::new(Vec::new()),
        })
    }

    fn process(&mut self, data: &mut [u8]) {
        for block in data.chunks_mut(16) {
            match (&mut self.chain, self.encrypt) {
                (None, true) => self.cipher.encrypt_block(block),
                (None, false) => self.cipher.decrypt_block(block),
                (Some(chain), true) => {
                    block.iter_mut().zip(chain.iter()).for_each(|(b, c)| *b ^= c);
                    self.cipher.encrypt_block(block);
                    chain.copy_from_slice(block);
                }
                (Some(chain), false) => {
                    let next: [u8; 16] = block.try_into().expect("16-byte block");
                    self.cipher.decrypt_block(block);
                    block.iter_mut().zip(chain.iter()).for_each(|(b, c)| *b ^= c);
                    *chain = next;
                }
            }
        }
    }

    /// Processes the whole blocks available; when decrypting with padding, the last block waits for `finish`.
    pub fn update(&mut self, data: &[u8]) -> Result<Vec<u8>> {
        self.buffer.extend_from_slice(data);
        let mut n = self.buffer.len() / 16 * 16;
        if !self.encrypt && self.pad && n == self.buffer.len() && n > 0 {
            n -= 16;
        }
        let mut out: Vec<u8> = self.buffer.drain(..n).collect();
        self.process(&mut out);
        Ok(out)
    }

    pub fn finish(&mut self) -> Result<Vec<u8>> {
        let mut rest = Zeroizing::new(std::mem::take(&mut *self.buffer));
        match (self.encrypt, self.pad) {
            (true, true) => {
                let n = 16 - rest.len() % 16;
                rest.extend(std::iter::repeat_n(n as u8, n));
                let mut out = rest.to_vec();
                self.process(&mut out);
                Ok(out)
            }
            (true, false) if rest.is_empty() => Ok(Vec::new()),
            (true, false) => Err(CKR_DATA_LEN_RANGE),
            (false, true) => {
                if rest.len() != 16 {
                    return Err(CKR_ENCRYPTED_DATA_LEN_RANGE);
                }
                let mut out = rest.to_vec();
                self.process(&mut out);
                let n = out[15] as usize;
                if n == 0 || n > 16 || !out[16 - n..].iter().all(|b| *b as usize == n) {
                    return Err(CKR_ENCRYPTED_DATA_INVALID);
                }
                out.truncate(16 - n);
                Ok(out)
            }
            (false, false) if rest.is_empty() => Ok(Vec::new()),
            (false, false) => Err(CKR_ENCRYPTED_DATA_LEN_RANGE),
        }
    }
}

/// AES-GCM with a 96-bit IV and a 96- or 128-bit tag; the whole message is processed at the end.
pub struct Gcm {
    key: Zeroizing<Vec<u8>>,
    iv: Vec<u8>,
    aad: Vec<u8>,
    tag_len: usize,
    encrypt: bool,
    pub buffer: Zeroizing<Vec<u8>>,
}

impl Gcm {
    pub fn new(mechanism: &Mechanism, key: &[u8], encrypt: bool) -> Result<Gcm> {
        let Param::Gcm { iv, aad, tag_bits } = &mechanism.param else {
            return Err(CKR_MECHANISM_PARAM_INVALID);
        };
        if iv.len() != 12 || !matches!(tag_bits, 96 | 128) {
            return Err(CKR_MECHANISM_PARAM_INVALID);
        }
        Aes::new(key)?;
        Ok(Gcm {
            key: Zeroizing::new(key.to_vec()),
            iv: iv.clone(),
            aad: aad.clone(),
            tag_len: tag_bits / 8,
            encrypt,
            buffer: Zeroizing::new(Vec::new()),
        })
    }

    pub fn finish(&mut self) -> Result<Vec<u8>> {
        let data = std::mem::take(&mut *self.buffer);
        let data = Zeroizing::new(data);
        macro_rules! run {
            ($aes:ty, $tag:ty) => {{
                let c = AesGcm::<$aes, aes_gcm::aead::consts::U12, $tag>::new_from_slice(&self.key)
                    .map_err(|_| CKR_KEY_SIZE_RANGE)?;
                let nonce = GenericArray::from_slice(&self.iv);
                let payload = Payload { msg: &data, aad: &self.aad };
                if self.encrypt {
                    c.encrypt(nonce, payload).map_err(|_| CKR_FUNCTION_FAILED)
                } else {
                    if data.len() < self.tag_len {
                        return Err(CKR_ENCRYPTED_DATA_LEN_RANGE);
                    }
                    c.decrypt(nonce, payload).map_err(|_| CKR_ENCRYPTED_DATA_INVALID)
                }
            }};
        }
        use aes_gcm::aead::consts::{U12, U16};
        match (self.key.len(), self.tag_len) {
            (16, 16) => run!(aes::Aes128, U16),
            (24, 16) => run!(aes::Aes192, U16),
            (32, 16) => run!(aes::Aes256, U16),
            (16, 12) => run!(aes::Aes128, U12),
            (24, 12) => run!(aes::Aes192, U12),
            (32, 12) => run!(aes::Aes256, U12),
            _ => Err(CKR_KEY_SIZE_RANGE),
        }
    }
}

/// AES key wrap: RFC 3394 (`pad` false: CKM_AES_KEY_WRAP) or RFC 5649 (`pad` true).
pub fn wrap(key: &[u8], data: &[u8], pad: bool) -> Result<Vec<u8>> {
    if !pad && (!data.len().is_multiple_of(8) || data.len() < 16) {
        return Err(CKR_KEY_SIZE_RANGE);
    }
    macro_rules! run {
        ($kek:ty) => {{
            let kek = <$kek>::new(GenericArray::from_slice(key));
            if pad {
                kek.wrap_with_padding_vec(data)
            } else {
                kek.wrap_vec(data)
            }
        }};
    }
    let r = match key.len() {
        16 => run!(aes_kw::KekAes128),
        24 => run!(aes_kw::KekAes192),
        32 => run!(aes_kw::KekAes256),
        _ => return Err(CKR_KEY_SIZE_RANGE),
    };
    r.map_err(|_| CKR_FUNCTION_FAILED)
}

/// The inverse of [`wrap`]; CKR_WRAPPED_KEY_INVALID when the integrity check fails.
pub fn unwrap(key: &[u8], data: &[u8], pad: bool) -> Result<Zeroizing<Vec<u8>>> {
    if !data.len().is_multiple_of(8) || data.len() < 16 {
        return Err(CKR_WRAPPED_KEY_LEN_RANGE);
    }
    macro_rules! run {
        ($kek:ty) => {{
            let kek = <$kek>::new(GenericArray::from_slice(key));
            if pad {
                kek.unwrap_with_padding_vec(data)
            } else {
                kek.unwrap_vec(data)
            }
        }};
    }
    let r = match key.len() {
        16 => run!(aes_kw::KekAes128),
        24 => run!(aes_kw::KekAes192),
        32 => run!(aes_kw::KekAes256),
        _ => return Err(CKR_KEY_SIZE_RANGE),
    };
    r.map(Zeroizing::new).map_err(|_| CKR_WRAPPED_KEY_INVALID)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        ty: CK_MECHANISM_TYPE,
        param: Param,
        key: &[u8],
        data: &[u8],
        encrypt: bool,
        pieces: usize,
    ) -> Result<Vec<u8>> {
        let m = Mechanism { ty, param };
        let mut b = BlockMode::new(&m, key, encrypt)?;
        let mut out = Vec::new();
        let step = data.len().div_ceil(pieces.max(1)).max(1);
        for chunk in data.chunks(step) {
            out.extend(b.update(chunk)?);
        }
        out.extend(b.finish()?);
        Ok(out)
    }

    #[test]
    fn fips197_and_sp800_38a_vectors() {
        // FIPS-197 C.1.
        let key = hex::decode("000102030405060708090a0b0c0d0e0f").unwrap();
        let pt = hex::decode("00112233445566778899aabbccddeeff").unwrap();
        assert_eq!(
            hex::encode(run(CKM_AES_ECB, Param::None, &key, &pt, true, 1).unwrap()),
            "69c4e0d86a7b0430d8cdb78070b4c55a"
        );
        // SP 800-38A F.2.1 (first two blocks), in pieces of odd sizes.
        let key = hex::decode("2b7e151628aed2a6abf7158809cf4f3c").unwrap();
        let iv = hex::decode("000102030405060708090a0b0c0d0e0f").unwrap();
        let pt = hex::decode("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51").unwrap();
        let ct = run(CKM_AES_CBC, Param::Bytes(iv.clone()), &key, &pt, true, 3).unwrap();
        assert_eq!(hex::encode(&ct), "7649abac8119b246cee98e9b12e9197d5086cb9b507219ee95db113a917678b2");
        assert_eq!(run(CKM_AES_CBC, Param::Bytes(iv.clone()), &key, &ct, false, 5).unwrap(), pt);
        assert_eq!(run(CKM_AES_CBC, Param::Bytes(iv.clone()), &key, &pt[..17], true, 1), Err(CKR_DATA_LEN_RANGE));
        for len in [0, 1, 15, 16, 17, 32] {
            let ct = run(CKM_AES_CBC_PAD, Param::Bytes(iv.clone()), &key, &pt[..len], true, 2).unwrap();
            assert_eq!(ct.len(), (len / 16 + 1) * 16);
            assert_eq!(run(CKM_AES_CBC_PAD, Param::Bytes(iv.clone()), &key, &ct, false, 3).unwrap(), &pt[..len]);
        }
    }

    #[test]
    fn key_wrap_vectors() {
        // RFC 3394 4.1 and RFC 5649 section 6.
        let kek = hex::decode("000102030405060708090A0B0C0D0E0F").unwrap();
        let data = hex::decode("00112233445566778899AABBCCDDEEFF").unwrap();
        let w = wrap(&kek, &data, false).unwrap();
        assert_eq!(hex::encode(&w), "1fa68b0a8112b447aef34bd8fb5a7b829d3e862371d2cfe5");
        assert_eq!(*unwrap(&kek, &w, false).unwrap(), data);
        let kek = hex::decode("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8").unwrap();
        let w = wrap(&kek, &hex::decode("466f7250617369").unwrap(), true).unwrap();
        assert_eq!(hex::encode(&w), "afbeb0f07dfbf5419200f2ccb50bb24f");
        let mut bad = w.clone();
        bad[3] ^= 1;
        assert_eq!(unwrap(&kek, &bad, true).map(|_| ()), Err(CKR_WRAPPED_KEY_INVALID));
    }

    #[test]
    fn gcm_round_trip_and_tag_check() {
        let key = [3u8; 32];
        let m =
            Mechanism { ty: CKM_AES_GCM, param: Param::Gcm { iv: vec![1; 12], aad: b"aad".to_vec(), tag_bits: 128 } };
        let mut g = Gcm::new(&m, &key, true).unwrap();
        g.buffer.extend_from_slice(b"hello");
        let ct = g.finish().unwrap();
        assert_eq!(ct.len(), 5 + 16);
        let mut d = Gcm::new(&m, &key, false).unwrap();
        d.buffer.extend_from_slice(&ct);
        assert_eq!(d.finish().unwrap(), b"hello");
        let mut d = Gcm::new(&m, &key, false).unwrap();
        let mut bad = ct.clone();
        bad[0] ^= 1;
        d.buffer.extend_from_slice(&bad);
        assert_eq!(d.finish(), Err(CKR_ENCRYPTED_DATA_INVALID));
    }

    #[test]
    fn kcv() {
        // The KCV of the all-zero AES-128 key.
        assert_eq!(hex::encode(check_value(&[0; 16]).unwrap()), "66e94b");
    }
}
