//! Elliptic curves P-256 and P-384: key pairs and their attributes (CKA_EC_PARAMS as the DER OID, CKA_EC_POINT as
//! a DER OCTET STRING around the uncompressed point, like SoftHSM2), ECDSA with raw r‖s signatures, ECDH.

use crate::object::{Attr, Object, Template};
use crate::Result;
use cryptoki_sys::*;
use ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use pkcs8::{DecodePrivateKey, EncodePrivateKey};
use rand::rngs::OsRng;
use zeroize::Zeroizing;

const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Curve {
    P256,
    P384,
}

impl Curve {
    /// The curve named by CKA_EC_PARAMS (a DER OID).
    pub fn from_params(params: &[u8]) -> Option<Curve> {
        match params {
            P256_OID => Some(Curve::P256),
            P384_OID => Some(Curve::P384),
            _ => None,
        }
    }

    pub fn params(self) -> &'static [u8] {
        match self {
            Curve::P256 => P256_OID,
            Curve::P384 => P384_OID,
        }
    }

    /// The size of a field element in bytes.
    pub fn field_len(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
        }
    }
}

/// A private key.
pub enum EcSecret {
    P256(p256::SecretKey),
    P384(p384::SecretKey),
}

/// A public key.
pub enum EcPublic {
    P256(p256::PublicKey),
    P384(p384::PublicKey),
}

/// The DER OCTET STRING around an uncompressed point (all points here are shorter than 128 bytes).
fn octet_string(point: &[u8]) -> Vec<u8> {
    let mut v = vec![0x04, point.len() as u8];
    v.extend_from_slice(point);
    v
}

/// The point of a CKA_EC_POINT or an ECDH public value: raw SEC1 bytes or the DER OCTET STRING around them.
fn sec1_point(bytes: &[u8], curve: Curve) -> &[u8] {
    let raw = 2 * curve.field_len() + 1;
    if bytes.len() == raw + 2 && bytes[0] == 0x04 && bytes[1] as usize == raw {
        &bytes[2..]
    } else {
        bytes
    }
}

/// ECDSA takes the leftmost field-size bytes of the input, left-padded with zeros when shorter.
fn field_input(input: &[u8], curve: Curve) -> Vec<u8> {
    let n = curve.field_len();
    if input.len() >= n {
        input[..n].to_vec()
    } else {
        let mut v = vec![0; n - input.len()];
        v.extend_from_slice(input);
        v
    }
}

impl EcSecret {
    pub fn generate(curve: Curve) -> EcSecret {
        match curve {
            Curve::P256 => EcSecret::P256(p256::SecretKey::random(&mut OsRng)),
            Curve::P384 => EcSecret::P384(p384::SecretKey::random(&mut OsRng)),
        }
    }

    pub fn from_object(obj: &Object) -> Result<EcSecret> {
        let curve = Curve::from_params(obj.get(CKA_EC_PARAMS).unwrap_or_default()).ok_or(CKR_KEY_TYPE_INCONSISTENT)?;
        let value = obj.get(CKA_VALUE).ok_or(CKR_KEY_TYPE_INCONSISTENT)?;
        let value = field_input(value, curve);
        let bad = |_| CKR_KEY_TYPE_INCONSISTENT;
        Ok(match curve {
            Curve::P256 => EcSecret::P256(p256::SecretKey::from_slice(&value).map_err(bad)?),
            Curve::P384 => EcSecret::P384(p384::SecretKey::from_slice(&value).map_err(bad)?),
        })
    }

    pub fn curve(&self) -> Curve {
        match self {
            EcSecret::P256(_) => Curve::P256,
            EcSecret::P384(_) => Curve::P384,
        }
    }

    pub fn public(&self) -> EcPublic {
        match self {
            EcSecret::P256(k) => EcPublic::P256(k.public_key()),
            EcSecret::P384(k) => EcPublic::P384(k.public_key()),
        }
    }

    /// CKA_EC_PARAMS and CKA_VALUE.
    pub fn material(&self) -> Template {
        let value = match self {
            EcSecret::P256(k) => k.to_bytes().to_vec(),
            EcSecret::P384(k) => k.to_bytes().to_vec(),
        };
        vec![(CKA_EC_PARAMS, Attr::bytes(self.curve().params())), (CKA_VALUE, Attr::bytes(value))]
    }

    /// ECDSA over `input` (a hash, or raw data for CKM_ECDSA): r‖s.
    pub fn sign(&self, input: &[u8]) -> Vec<u8> {
        let z = field_input(input, self.curve());
        let r = match self {
            EcSecret::P256(k) => {
                let s: std::result::Result<p256::ecdsa::Signature, _> =
                    p256::ecdsa::SigningKey::from(k).sign_prehash(&z);
                s.map(|s| s.to_bytes().to_vec())
            }
            EcSecret::P384(k) => {
                let s: std::result::Result<p384::ecdsa::Signature, _> =
                    p384::ecdsa::SigningKey::from(k).sign_prehash(&z);
                s.map(|s| s.to_bytes().to_vec())
            }
        };
        r.expect("ECDSA over a field-size input does not fail")
    }

    /// ECDH (CKD_NULL): the x coordinate of the shared point.
    pub fn ecdh(&self, public: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let point = sec1_point(public, self.curve());
        let bad = |_| CKR_MECHANISM_PARAM_INVALID;
        Ok(Zeroizing::new(match self {
            EcSecret::P256(k) => {
                let peer = p256::PublicKey::from_sec1_bytes(point).map_err(bad)?;
                p256::ecdh::diffie_hellman(k.to_nonzero_scalar(), peer.as_affine()).raw_secret_bytes().to_vec()
            }
            EcSecret::P384(k) => {
                let peer = p384::PublicKey::from_sec1_bytes(point).map_err(bad)?;
                p384::ecdh::diffie_hellman(k.to_nonzero_scalar(), peer.as_affine()).raw_secret_bytes().to_vec()
            }
        }))
    }

    pub fn to_pkcs8(&self) -> Result<Zeroizing<Vec<u8>>> {
        let der = match self {
            EcSecret::P256(k) => k.to_pkcs8_der(),
            EcSecret::P384(k) => k.to_pkcs8_der(),
        };
        der.map(|d| Zeroizing::new(d.as_bytes().to_vec())).map_err(|_| CKR_FUNCTION_FAILED)
    }

    pub fn from_pkcs8(der: &[u8]) -> Option<EcSecret> {
        if let Ok(k) = p256::SecretKey::from_pkcs8_der(der) {
            return Some(EcSecret::P256(k));
        }
        p384::SecretKey::from_pkcs8_der(der).ok().map(EcSecret::P384)
    }
}

impl EcPublic {
    pub fn from_object(obj: &Object) -> Result<EcPublic> {
        let curve = Curve::from_params(obj.get(CKA_EC_PARAMS).unwrap_or_default()).ok_or(CKR_KEY_TYPE_INCONSISTENT)?;
        let point = sec1_point(obj.get(CKA_EC_POINT).ok_or(CKR_KEY_TYPE_INCONSISTENT)?, curve);
        let bad = |_| CKR_KEY_TYPE_INCONSISTENT;
        Ok(match curve {
            Curve::P256 => EcPublic::P256(p256::PublicKey::from_sec1_bytes(point).map_err(bad)?),
            Curve::P384 => EcPublic::P384(p384::PublicKey::from_sec1_bytes(point).map_err(bad)?),
        })
    }

    pub fn curve(&self) -> Curve {
        match self {
            EcPublic::P256(_) => Curve::P256,
            EcPublic::P384(_) => Curve::P384,
        }
    }

    /// CKA_EC_PARAMS and CKA_EC_POINT.
    pub fn material(&self) -> Template {
        let point = match self {
            EcPublic::P256(k) => k.to_encoded_point(false).as_bytes().to_vec(),
            EcPublic::P384(k) => k.to_encoded_point(false).as_bytes().to_vec(),
        };
        vec![(CKA_EC_PARAMS, Attr::bytes(self.curve().params())), (CKA_EC_POINT, Attr::bytes(octet_string(&point)))]
    }

    pub fn verify(&self, input: &[u8], signature: &[u8]) -> Result<()> {
        let curve = self.curve();
        if signature.len() != 2 * curve.field_len() {
            return Err(CKR_SIGNATURE_LEN_RANGE);
        }
        let z = field_input(input, curve);
        let ok = match self {
            EcPublic::P256(k) => p256::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|s| p256::ecdsa::VerifyingKey::from(k).verify_prehash(&z, &s).is_ok()),
            EcPublic::P384(k) => p384::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|s| p384::ecdsa::VerifyingKey::from(k).verify_prehash(&z, &s).is_ok()),
        };
        if ok {
            Ok(())
        } else {
            Err(CKR_SIGNATURE_INVALID)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_ecdh_pkcs8() {
        for curve in [Curve::P256, Curve::P384] {
            let a = EcSecret::generate(curve);
            let b = EcSecret::generate(curve);
            let digest = [9u8; 32];
            let sig = a.sign(&digest);
            assert_eq!(sig.len(), 2 * curve.field_len());
            a.public().verify(&digest, &sig).unwrap();
            assert_eq!(b.public().verify(&digest, &sig), Err(CKR_SIGNATURE_INVALID));
            let point_of = |k: &EcSecret| k.public().material()[1].1.as_bytes().unwrap().to_vec();
            let (pa, pb) = (point_of(&a), point_of(&b));
            assert_eq!(pa[0], 0x04);
            assert_eq!(pa[1] as usize, pa.len() - 2);
            assert_eq!(*a.ecdh(&pb).unwrap(), *b.ecdh(&pa[2..]).unwrap());
            let der = a.to_pkcs8().unwrap();
            let back = EcSecret::from_pkcs8(&der).unwrap();
            assert_eq!(back.curve(), curve);
            back.public().verify(&digest, &sig).unwrap();
        }
    }
}
