//! The simulator through the `cryptoki` crate (and raw calls where cryptoki hides the protocol): slots and
//! tokens, login rules, every mechanism against independent implementations, the attribute rules of PKCS#11
//! 2.40, session objects and handles, and concurrent use.

mod common;

use common::*;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use cryptoki_sys::*;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::DecodePrivateKey;
use rsa::traits::{PrivateKeyParts, PublicKeyParts};
use sha2::Digest;

const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

fn pin(p: &str) -> AuthPin {
    AuthPin::new(p.into())
}

fn setup(test: &str) -> (std::path::PathBuf, Loaded) {
    let dir = test_dir(test);
    let config = write_config(&dir, &two_slots("standard"));
    let loaded = load(&config, None);
    (dir, loaded)
}

fn attr_bytes(s: &Session, o: ObjectHandle, ty: AttributeType) -> Vec<u8> {
    match s.get_attributes(o, &[ty]).unwrap().pop() {
        Some(Attribute::Value(v) | Attribute::EcPoint(v) | Attribute::EcParams(v) | Attribute::Modulus(v))
        | Some(Attribute::CheckValue(v) | Attribute::Label(v) | Attribute::Id(v)) => v,
        other => panic!("{ty:?}: {other:?}"),
    }
}

fn attr_bool(s: &Session, o: ObjectHandle, ty: AttributeType) -> bool {
    match s.get_attributes(o, &[ty]).unwrap().pop() {
        Some(
            Attribute::Local(b)
            | Attribute::AlwaysSensitive(b)
            | Attribute::NeverExtractable(b)
            | Attribute::Sensitive(b)
            | Attribute::Extractable(b)
            | Attribute::Private(b)
            | Attribute::Token(b),
        ) => b,
        other => panic!("{ty:?}: {other:?}"),
    }
}

fn aes_key(s: &Session, value: &[u8], extra: &[Attribute]) -> ObjectHandle {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Value(value.to_vec()),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
    ];
    t.extend_from_slice(extra);
    s.create_object(&t).unwrap()
}

#[test]
fn library_slots_and_tokens() {
    let (_dir, m) = setup("slots");
    let p11 = m.p11();
    let info = p11.get_library_info().unwrap();
    assert_eq!(info.cryptoki_version().major(), 2);
    assert_eq!(info.cryptoki_version().minor(), 40);
    assert!(info.manufacturer_id().starts_with("Utimaco IS GmbH"), "{}", info.manufacturer_id());
    let slots = p11.get_all_slots().unwrap();
    assert_eq!(slots.len(), 2);
    assert_eq!(slots[0].id(), 0);
    assert_eq!(p11.get_slot_info(slots[1]).unwrap().slot_description(), "SLOT_0001");
    let t = p11.get_token_info(slots[0]).unwrap();
    assert_eq!(t.label(), "test");
    assert_eq!(t.model(), "CSSIM standard");
    assert!(t.token_initialized() && t.user_pin_initialized() && t.login_required());
    // Slot 1 is not initialized: no session until C_InitToken.
    assert!(!p11.get_token_info(slots[1]).unwrap().token_initialized());
    assert_eq!(rv(p11.open_rw_session(slots[1])), CKR_TOKEN_NOT_RECOGNIZED);
    p11.init_token(slots[1], &pin("so-pin-2"), "second").unwrap();
    let t = p11.get_token_info(slots[1]).unwrap();
    assert_eq!(t.label(), "second");
    assert!(t.token_initialized() && !t.user_pin_initialized());
    // Re-initializing needs the SO PIN and no open session.
    let s = p11.open_rw_session(slots[1]).unwrap();
    assert_eq!(rv(p11.init_token(slots[1], &pin("so-pin-2"), "again")), CKR_SESSION_EXISTS);
    drop(s);
    assert_eq!(rv(p11.init_token(slots[1], &pin("wrong-pin"), "again")), CKR_PIN_INCORRECT);
    assert!(p11.get_mechanism_list(slots[0]).unwrap().contains(&MechanismType::AES_KEY_WRAP_PAD));
    let info = p11.get_mechanism_info(slots[0], MechanismType::RSA_PKCS_KEY_PAIR_GEN).unwrap();
    assert_eq!((info.min_key_size(), info.max_key_size()), (2048, 4096));
    assert!(info.generate_key_pair());
    let info = p11.get_mechanism_info(slots[0], MechanismType::AES_KEY_WRAP_PAD).unwrap();
    assert!(info.wrap() && info.unwrap() && !info.sign());
}

#[test]
fn login_rules() {
    let (_dir, m) = setup("login");
    let p11 = m.p11();
    let slot = slot(p11, 0);
    let ro = p11.open_ro_session(slot).unwrap();
    let rw = p11.open_rw_session(slot).unwrap();
    // The SO cannot log in while a read-only session exists.
    assert_eq!(rv(rw.login(UserType::So, Some(&pin(SO_PIN)))), CKR_SESSION_READ_ONLY_EXISTS);
    assert_eq!(rv(rw.login(UserType::User, Some(&pin("wrong-pin")))), CKR_PIN_INCORRECT);
    rw.login(UserType::User, Some(&pin(USER_PIN))).unwrap();
    // Login is per application: both sessions are logged in.
    assert_eq!(rv(ro.login(UserType::User, Some(&pin(USER_PIN)))), CKR_USER_ALREADY_LOGGED_IN);
    assert_eq!(rv(ro.login(UserType::So, Some(&pin(SO_PIN)))), CKR_USER_ANOTHER_ALREADY_LOGGED_IN);
    // C_SetPIN needs a R/W session.
    assert_eq!(rv(ro.set_pin(&pin(USER_PIN), &pin("new-user-pin"))), CKR_SESSION_READ_ONLY);
    assert_eq!(rv(rw.set_pin(&pin("wrong-pin"), &pin("new-user-pin"))), CKR_PIN_INCORRECT);
    assert_eq!(rv(rw.set_pin(&pin(USER_PIN), &pin("123"))), CKR_PIN_LEN_RANGE);
    rw.set_pin(&pin(USER_PIN), &pin("new-user-pin")).unwrap();
    rw.logout().unwrap();
    assert_eq!(rv(rw.logout()), CKR_USER_NOT_LOGGED_IN);
    assert_eq!(rv(rw.login(UserType::User, Some(&pin(USER_PIN)))), CKR_PIN_INCORRECT);
    rw.login(UserType::User, Some(&pin("new-user-pin"))).unwrap();
    rw.logout().unwrap();
    drop(ro);
    // The SO: C_InitPIN in a R/W session only.
    rw.login(UserType::So, Some(&pin(SO_PIN))).unwrap();
    assert_eq!(rv(p11.open_ro_session(slot)), CKR_SESSION_READ_WRITE_SO_EXISTS);
    rw.init_pin(&pin(USER_PIN)).unwrap();
    rw.logout().unwrap();
    rw.login(UserType::User, Some(&pin(USER_PIN))).unwrap();
    assert_eq!(rv(rw.init_pin(&pin(USER_PIN))), CKR_USER_NOT_LOGGED_IN);
    // A token without a user PIN.
    let s2 = slot_1_initialized(p11);
    assert_eq!(rv(s2.login(UserType::User, Some(&pin(USER_PIN)))), CKR_USER_PIN_NOT_INITIALIZED);
    // Closing the last session logs the slot out.
    drop(rw);
    let s = p11.open_rw_session(slot).unwrap();
    assert_eq!(s.get_session_info().unwrap().session_state(), cryptoki::session::SessionState::RwPublic);
}

fn slot_1_initialized(p11: &cryptoki::context::Pkcs11) -> Session {
    let slot = slot(p11, 1);
    p11.init_token(slot, &pin(SO_PIN), "one").unwrap();
    p11.open_rw_session(slot).unwrap()
}

#[test]
fn aes_modes_against_known_answers() {
    let (_dir, m) = setup("aes");
    let s = user_session(m.p11());
    // FIPS-197 C.1 and SP 800-38A F.2.1.
    let k = aes_key(&s, &hex::decode("000102030405060708090a0b0c0d0e0f").unwrap(), &[]);
    let ct = s.encrypt(&Mechanism::AesEcb, k, &hex::decode("00112233445566778899aabbccddeeff").unwrap()).unwrap();
    assert_eq!(hex::encode(ct), "69c4e0d86a7b0430d8cdb78070b4c55a");
    let k = aes_key(&s, &hex::decode("2b7e151628aed2a6abf7158809cf4f3c").unwrap(), &[]);
    let iv: [u8; 16] = hex::decode("000102030405060708090a0b0c0d0e0f").unwrap().try_into().unwrap();
    let pt = hex::decode("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51").unwrap();
    let ct = s.encrypt(&Mechanism::AesCbc(iv), k, &pt).unwrap();
    assert_eq!(hex::encode(&ct), "7649abac8119b246cee98e9b12e9197d5086cb9b507219ee95db113a917678b2");
    assert_eq!(s.decrypt(&Mechanism::AesCbc(iv), k, &ct).unwrap(), pt);
    assert_eq!(rv(s.encrypt(&Mechanism::AesCbc(iv), k, &pt[..20])), CKR_DATA_LEN_RANGE);
    // CBC-PAD, multi-part in uneven pieces, equals single-part.
    let msg: Vec<u8> = (0..=100u8).collect();
    let single = s.encrypt(&Mechanism::AesCbcPad(iv), k, &msg).unwrap();
    assert_eq!(single.len(), 112);
    s.encrypt_init(&Mechanism::AesCbcPad(iv), k).unwrap();
    let mut multi = Vec::new();
    for piece in msg.chunks(7) {
        multi.extend(s.encrypt_update(piece).unwrap());
    }
    multi.extend(s.encrypt_final().unwrap());
    assert_eq!(multi, single);
    s.decrypt_init(&Mechanism::AesCbcPad(iv), k).unwrap();
    let mut back = Vec::new();
    for piece in single.chunks(13) {
        back.extend(s.decrypt_update(piece).unwrap());
    }
    back.extend(s.decrypt_final().unwrap());
    assert_eq!(back, msg);
    let mut bad = single.clone();
    bad[111] ^= 0xff;
    assert_eq!(rv(s.decrypt(&Mechanism::AesCbcPad(iv), k, &bad)), CKR_ENCRYPTED_DATA_INVALID);
    // GCM (NIST test case 4 of the GCM spec, 128-bit key).
    let key = hex::decode("feffe9928665731c6d6a8f9467308308").unwrap();
    let k = aes_key(&s, &key, &[]);
    let mut iv = hex::decode("cafebabefacedbaddecaf888").unwrap();
    let aad = hex::decode("feedfacedeadbeeffeedfacedeadbeefabaddad2").unwrap();
    let pt = hex::decode("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39").unwrap();
    let ct = s.encrypt(&Mechanism::AesGcm(GcmParams::new(&mut iv, &aad, 128.into()).unwrap()), k, &pt).unwrap();
    assert_eq!(
        hex::encode(&ct),
        "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e0915bc94fbc3221a5db94fae95ae7121a47"
    );
    let back = s.decrypt(&Mechanism::AesGcm(GcmParams::new(&mut iv, &aad, 128.into()).unwrap()), k, &ct).unwrap();
    assert_eq!(back, pt);
    let mut tampered = ct.clone();
    tampered[0] ^= 1;
    let r = s.decrypt(&Mechanism::AesGcm(GcmParams::new(&mut iv, &aad, 128.into()).unwrap()), k, &tampered);
    assert_eq!(rv(r), CKR_ENCRYPTED_DATA_INVALID);
    // Key generation: CKA_LOCAL, CKA_KEY_GEN_MECHANISM, CKA_CHECK_VALUE (KCV).
    let g = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[Attribute::ValueLen(32.into()), Attribute::Extractable(true), Attribute::Sensitive(false)],
        )
        .unwrap();
    let value = attr_bytes(&s, g, AttributeType::Value);
    assert_eq!(value.len(), 32);
    assert!(attr_bool(&s, g, AttributeType::Local));
    assert!(!attr_bool(&s, g, AttributeType::AlwaysSensitive));
    let mut block = [0u8; 16];
    {
        use aes::cipher::{BlockEncrypt, KeyInit};
        aes::Aes256::new_from_slice(&value).unwrap().encrypt_block((&mut block).into());
    }
    assert_eq!(attr_bytes(&s, g, AttributeType::CheckValue), block[..3]);
    match s.get_attributes(g, &[AttributeType::KeyGenMechanism]).unwrap()[0] {
        Attribute::KeyGenMechanism(m) => assert_eq!(m, MechanismType::AES_KEY_GEN),
        ref other => panic!("{other:?}"),
    }
    assert_eq!(rv(s.generate_key(&Mechanism::AesKeyGen, &[Attribute::ValueLen(20.into())])), CKR_KEY_SIZE_RANGE);
    assert_eq!(rv(s.generate_key(&Mechanism::AesKeyGen, &[])), CKR_TEMPLATE_INCOMPLETE);
}

#[test]
fn digests_and_hmac() {
    let (_dir, m) = setup("digest");
    let s = user_session(m.p11());
    assert_eq!(
        hex::encode(s.digest(&Mechanism::Sha256, b"abc").unwrap()),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(hex::encode(s.digest(&Mechanism::Sha1, b"abc").unwrap()), "a9993e364706816aba3e25717850c26c9cd0d89d");
    for (mech, len) in [(Mechanism::Sha224, 28), (Mechanism::Sha384, 48), (Mechanism::Sha512, 64)] {
        assert_eq!(s.digest(&mech, b"abc").unwrap().len(), len);
    }
    s.digest_init(&Mechanism::Sha512).unwrap();
    s.digest_update(b"a").unwrap();
    s.digest_update(b"bc").unwrap();
    assert_eq!(s.digest_final().unwrap(), sha2::Sha512::digest(b"abc").to_vec());
    // C_DigestKey hashes the key's value.
    let k = aes_key(&s, &[5; 16], &[]);
    s.digest_init(&Mechanism::Sha256).unwrap();
    s.digest_key(k).unwrap();
    assert_eq!(s.digest_final().unwrap(), sha2::Sha256::digest([5u8; 16]).to_vec());
    // HMAC-SHA256 (RFC 4231 test case 2) with a created generic secret, and with an AES key.
    let key = s
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Value(b"Jefe".to_vec()),
            Attribute::Sign(true),
            Attribute::Verify(true),
        ])
        .unwrap();
    let mac = s.sign(&Mechanism::Sha256Hmac, key, b"what do ya want for nothing?").unwrap();
    assert_eq!(hex::encode(&mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    s.verify(&Mechanism::Sha256Hmac, key, b"what do ya want for nothing?", &mac).unwrap();
    assert_eq!(rv(s.verify(&Mechanism::Sha256Hmac, key, b"what do ya want for nothing!", &mac)), CKR_SIGNATURE_INVALID);
    assert_eq!(rv(s.verify(&Mechanism::Sha256Hmac, key, b"x", &mac[..31])), CKR_SIGNATURE_LEN_RANGE);
    let g = s
        .generate_key(&Mechanism::GenericSecretKeyGen, &[Attribute::ValueLen(48.into()), Attribute::Sign(true)])
        .unwrap();
    for mech in [Mechanism::Sha1Hmac, Mechanism::Sha384Hmac, Mechanism::Sha512Hmac] {
        let one = s.sign(&mech, g, b"data").unwrap();
        s.sign_init(&mech, g).unwrap();
        s.sign_update(b"da").unwrap();
        s.sign_update(b"ta").unwrap();
        assert_eq!(s.sign_final().unwrap(), one);
    }
    let a = aes_key(&s, &[1; 32], &[Attribute::Sign(true)]);
    assert_eq!(s.sign(&Mechanism::Sha256Hmac, a, b"m").unwrap().len(), 32);
    // A key without CKA_SIGN may not sign.
    let no_sign = aes_key(&s, &[1; 32], &[Attribute::Sign(false)]);
    assert_eq!(rv(s.sign(&Mechanism::Sha256Hmac, no_sign, b"m")), CKR_KEY_FUNCTION_NOT_PERMITTED);
    // Random numbers.
    let r = s.generate_random_vec(64).unwrap();
    assert_eq!(r.len(), 64);
    assert_ne!(r, s.generate_random_vec(64).unwrap());
    s.seed_random(b"seed").unwrap();
}

#[test]
fn ec_keys_ecdsa_and_ecdh() {
    let (_dir, m) = setup("ec");
    let s = user_session(m.p11());
    for (params, len) in [(P256, 32), (P384, 48)] {
        let (public, private) = s
            .generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &[Attribute::EcParams(params.to_vec()), Attribute::Verify(true), Attribute::Token(true)],
                &[Attribute::Sign(true), Attribute::Derive(true), Attribute::Token(true), Attribute::Sensitive(true)],
            )
            .unwrap();
        let point = attr_bytes(&s, public, AttributeType::EcPoint);
        // A DER OCTET STRING around the uncompressed point, like SoftHSM2.
        assert_eq!((point[0], point[1] as usize, point[2]), (0x04, 2 * len + 1, 0x04));
        assert_eq!(attr_bytes(&s, private, AttributeType::EcParams), params);
        assert!(
            attr_bool(&s, private, AttributeType::AlwaysSensitive)
                && attr_bool(&s, private, AttributeType::NeverExtractable)
        );
        let digest = sha2::Sha256::digest(b"message");
        let sig = s.sign(&Mechanism::Ecdsa, private, &digest).unwrap();
        assert_eq!(sig.len(), 2 * len);
        s.verify(&Mechanism::Ecdsa, public, &digest, &sig).unwrap();
        let sig2 = s.sign(&Mechanism::EcdsaSha256, private, b"message").unwrap();
        s.verify(&Mechanism::Ecdsa, public, &digest, &sig2).unwrap();
        s.verify(&Mechanism::EcdsaSha256, public, b"message", &sig2).unwrap();
        assert_eq!(rv(s.verify(&Mechanism::EcdsaSha256, public, b"massage", &sig2)), CKR_SIGNATURE_INVALID);
        if len == 32 {
            // Independent check with the p256 crate.
            let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point[2..]).unwrap();
            let sig = p256::ecdsa::Signature::from_slice(&sig).unwrap();
            vk.verify_prehash(&digest, &sig).unwrap();
        } else {
            let sig = s.sign(&Mechanism::EcdsaSha384, private, b"m").unwrap();
            s.verify(&Mechanism::EcdsaSha384, public, b"m", &sig).unwrap();
        }
        // The private value is sensitive.
        let raw = Raw::new();
        assert_eq!(raw.get(s.handle(), private.handle(), CKA_VALUE).0, CKR_ATTRIBUTE_SENSITIVE);
    }
    // ECDH between a token key and an outside P-256 key: both sides get the same secret.
    let (_, private) = s
        .generate_key_pair(&Mechanism::EccKeyPairGen, &[Attribute::EcParams(P256.to_vec())], &[Attribute::Derive(true)])
        .unwrap();
    let other = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let other_point = other.public_key().to_encoded_point(false);
    let derived = s
        .derive_key(
            &Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(EcKdf::null(), other_point.as_bytes())),
            private,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Extractable(true),
            ],
        )
        .unwrap();
    let value = attr_bytes(&s, derived, AttributeType::Value);
    let ec_point = {
        let public = s.find_objects(&[Attribute::Class(ObjectClass::PUBLIC_KEY)]).unwrap();
        // The last public key made belongs to `private`.
        let p = *public.iter().max_by_key(|h| h.handle()).unwrap();
        attr_bytes(&s, p, AttributeType::EcPoint)
    };
    let ours = p256::PublicKey::from_sec1_bytes(&ec_point[2..]).unwrap();
    let expected = p256::ecdh::diffie_hellman(other.to_nonzero_scalar(), ours.as_affine());
    assert_eq!(value, expected.raw_secret_bytes().to_vec());
    // An AES key derived the same way encrypts.
    let aes = s
        .derive_key(
            &Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(EcKdf::null(), other_point.as_bytes())),
            private,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(16.into()),
                Attribute::Encrypt(true),
            ],
        )
        .unwrap();
    assert_eq!(s.encrypt(&Mechanism::AesEcb, aes, &[0; 16]).unwrap().len(), 16);
    assert!(!attr_bool(&s, aes, AttributeType::Local));
    // Unknown curves are refused.
    let r = s.generate_key_pair(&Mechanism::EccKeyPairGen, &[Attribute::EcParams(vec![6, 3, 1, 2, 3])], &[]);
    assert_eq!(rv(r), CKR_CURVE_NOT_SUPPORTED);
}

/// The test RSA key (made once with OpenSSL: RSA key generation is slow in debug builds).
fn rsa_test_key() -> rsa::RsaPrivateKey {
    rsa::RsaPrivateKey::from_pkcs8_pem(include_str!("data/rsa2048.pem")).unwrap()
}

fn import_rsa(s: &Session, key: &rsa::RsaPrivateKey) -> (ObjectHandle, ObjectHandle) {
    let be = |v: &rsa::BigUint| v.to_bytes_be();
    let public = s
        .create_object(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Modulus(be(key.n())),
            Attribute::PublicExponent(be(key.e())),
            Attribute::Verify(true),
            Attribute::Encrypt(true),
            Attribute::Wrap(true),
        ])
        .unwrap();
    let private = s
        .create_object(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Modulus(be(key.n())),
            Attribute::PublicExponent(be(key.e())),
            Attribute::PrivateExponent(be(key.d())),
            Attribute::Prime1(be(&key.primes()[0])),
            Attribute::Prime2(be(&key.primes()[1])),
            Attribute::Sign(true),
            Attribute::Decrypt(true),
            Attribute::Unwrap(true),
            Attribute::Sensitive(true),
        ])
        .unwrap();
    (public, private)
}

#[test]
fn rsa_signatures_and_encryption() {
    let (_dir, m) = setup("rsa");
    let s = user_session(m.p11());
    let key = rsa_test_key();
    let public_key = key.to_public_key();
    let (public, private) = import_rsa(&s, &key);
    match s.get_attributes(public, &[AttributeType::ModulusBits]).unwrap()[0] {
        Attribute::ModulusBits(b) => assert_eq!(u64::from(b), 2048),
        ref other => panic!("{other:?}"),
    }
    // PKCS#1 v1.5 with the hash inside and outside the token: identical and verified by the rsa crate.
    let digest = sha2::Sha256::digest(b"message");
    let sig = s.sign(&Mechanism::Sha256RsaPkcs, private, b"message").unwrap();
    public_key.verify(rsa::Pkcs1v15Sign::new::<sha2::Sha256>(), &digest, &sig).unwrap();
    let mut digest_info = hex::decode("3031300d060960864801650304020105000420").unwrap();
    digest_info.extend_from_slice(&digest);
    assert_eq!(s.sign(&Mechanism::RsaPkcs, private, &digest_info).unwrap(), sig);
    s.verify(&Mechanism::Sha256RsaPkcs, public, b"message", &sig).unwrap();
    assert_eq!(rv(s.verify(&Mechanism::Sha256RsaPkcs, public, b"other", &sig)), CKR_SIGNATURE_INVALID);
    for mech in [Mechanism::Sha1RsaPkcs, Mechanism::Sha384RsaPkcs, Mechanism::Sha512RsaPkcs] {
        let sig = s.sign(&mech, private, b"m").unwrap();
        s.verify(&mech, public, b"m", &sig).unwrap();
    }
    // PSS, prehashed and with the hash inside.
    let pss = PkcsPssParams { hash_alg: MechanismType::SHA256, mgf: PkcsMgfType::MGF1_SHA256, s_len: 32.into() };
    let sig = s.sign(&Mechanism::RsaPkcsPss(pss), private, &digest).unwrap();
    public_key.verify(rsa::Pss::new_with_salt::<sha2::Sha256>(32), &digest, &sig).unwrap();
    s.verify(&Mechanism::Sha256RsaPkcsPss(pss), public, b"message", &sig).unwrap();
    let sig = s.sign(&Mechanism::Sha256RsaPkcsPss(pss), private, b"message").unwrap();
    public_key.verify(rsa::Pss::new_with_salt::<sha2::Sha256>(32), &digest, &sig).unwrap();
    let wrong = PkcsPssParams { hash_alg: MechanismType::SHA1, mgf: PkcsMgfType::MGF1_SHA1, s_len: 20.into() };
    assert_eq!(rv(s.sign(&Mechanism::Sha256RsaPkcsPss(wrong), private, b"m")), CKR_MECHANISM_PARAM_INVALID);
    // Encryption: PKCS#1 v1.5, OAEP SHA-1 and SHA-256 with a label; the rsa crate decrypts what the token made.
    let ct = s.encrypt(&Mechanism::RsaPkcs, public, b"secret").unwrap();
    assert_eq!(s.decrypt(&Mechanism::RsaPkcs, private, &ct).unwrap(), b"secret");
    assert_eq!(key.decrypt(rsa::Pkcs1v15Encrypt, &ct).unwrap(), b"secret");
    for (hash, mgf) in
        [(MechanismType::SHA1, PkcsMgfType::MGF1_SHA1), (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256)]
    {
        let label = b"label";
        let oaep = PkcsOaepParams::new(hash, mgf, PkcsOaepSource::data_specified(label));
        let ct = s.encrypt(&Mechanism::RsaPkcsOaep(oaep), public, b"secret").unwrap();
        assert_eq!(s.decrypt(&Mechanism::RsaPkcsOaep(oaep), private, &ct).unwrap(), b"secret");
        let padding = if hash == MechanismType::SHA1 {
            rsa::Oaep::new_with_label::<sha1::Sha1, _>("label")
        } else {
            rsa::Oaep::new_with_label::<sha2::Sha256, _>("label")
        };
        assert_eq!(key.decrypt(padding, &ct).unwrap(), b"secret");
        let no_label = PkcsOaepParams::new(hash, mgf, PkcsOaepSource::empty());
        assert_eq!(rv(s.decrypt(&Mechanism::RsaPkcsOaep(no_label), private, &ct)), CKR_ENCRYPTED_DATA_INVALID);
    }
    // OAEP wrap and unwrap of an AES key.
    let aes = aes_key(&s, &[7; 32], &[Attribute::Extractable(true)]);
    let oaep =
        PkcsOaepParams::new(MechanismType::SHA256, PkcsMgfType::MGF1_SHA256, PkcsOaepSource::data_specified(b"L"));
    let wrapped = s.wrap_key(&Mechanism::RsaPkcsOaep(oaep), public, aes).unwrap();
    assert_eq!(wrapped.len(), 256);
    let back = s
        .unwrap_key(
            &Mechanism::RsaPkcsOaep(oaep),
            private,
            &wrapped,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Encrypt(true),
                Attribute::Extractable(true),
            ],
        )
        .unwrap();
    assert_eq!(attr_bytes(&s, back, AttributeType::Value), [7; 32]);
    assert!(!attr_bool(&s, back, AttributeType::Local));
    // Key pair generation (one, 2048 bits: slow in debug builds).
    let (gpub, gpriv) = s
        .generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &[Attribute::ModulusBits(2048.into()), Attribute::Verify(true)],
            &[Attribute::Sign(true)],
        )
        .unwrap();
    let sig = s.sign(&Mechanism::Sha256RsaPkcs, gpriv, b"m").unwrap();
    s.verify(&Mechanism::Sha256RsaPkcs, gpub, b"m", &sig).unwrap();
    assert_eq!(attr_bytes(&s, gpub, AttributeType::Modulus).len(), 256);
    let r = s.generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &[Attribute::ModulusBits(1024.into())], &[]);
    assert_eq!(rv(r), CKR_KEY_SIZE_RANGE);
}

#[test]
fn key_wrap_rfc3394_rfc5649_and_pkcs8() {
    let (_dir, m) = setup("wrap");
    let s = user_session(m.p11());
    let raw = Raw::new();
    let h = s.handle();
    let kek = aes_key(
        &s,
        &hex::decode("000102030405060708090a0b0c0d0e0f").unwrap(),
        &[Attribute::Wrap(true), Attribute::Unwrap(true)],
    );
    let target =
        aes_key(&s, &hex::decode("00112233445566778899aabbccddeeff").unwrap(), &[Attribute::Extractable(true)]);
    // RFC 3394 4.1.
    let w = raw.wrap(h, CKM_AES_KEY_WRAP, kek.handle(), target.handle()).unwrap();
    assert_eq!(hex::encode(&w), "1fa68b0a8112b447aef34bd8fb5a7b829d3e862371d2cfe5");
    // RFC 5649 under both of its mechanism numbers: the same bytes.
    let pad = raw.wrap(h, CKM_AES_KEY_WRAP_PAD, kek.handle(), target.handle()).unwrap();
    assert_eq!(pad, raw.wrap(h, CKM_AES_KEY_WRAP_KWP, kek.handle(), target.handle()).unwrap());
    assert_eq!(pad.len(), 24);
    let t = [
        (CKA_CLASS, ul(CKO_SECRET_KEY)),
        (CKA_KEY_TYPE, ul(CKK_AES)),
        (CKA_EXTRACTABLE, bl(true)),
        (CKA_ENCRYPT, bl(true)),
    ];
    let back = raw.unwrap(h, CKM_AES_KEY_WRAP_KWP, kek.handle(), &pad, &t).unwrap();
    assert_eq!(raw.get(h, back, CKA_VALUE).1.unwrap(), hex::decode("00112233445566778899aabbccddeeff").unwrap());
    let mut bad = pad.clone();
    bad[5] ^= 1;
    assert_eq!(raw.unwrap(h, CKM_AES_KEY_WRAP_PAD, kek.handle(), &bad, &t), Err(CKR_WRAPPED_KEY_INVALID));
    // A non-extractable key cannot leave.
    let locked = aes_key(&s, &[3; 16], &[Attribute::Extractable(false)]);
    assert_eq!(raw.wrap(h, CKM_AES_KEY_WRAP_PAD, kek.handle(), locked.handle()), Err(CKR_KEY_UNEXTRACTABLE));
    // An EC private key wraps as PKCS#8 (as SoftHSM2) and unwraps without CKA_EC_PARAMS in the template.
    let (public, private) = s
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[Attribute::EcParams(P256.to_vec()), Attribute::Verify(true)],
            &[Attribute::Sign(true), Attribute::Extractable(true), Attribute::Sensitive(true)],
        )
        .unwrap();
    let wrapped = raw.wrap(h, CKM_AES_KEY_WRAP_PAD, kek.handle(), private.handle()).unwrap();
    let kek_value = hex::decode("000102030405060708090a0b0c0d0e0f").unwrap();
    let mut plain = aes_kw::KekAes128::try_from(&kek_value[..]).unwrap().unwrap_with_padding_vec(&wrapped).unwrap();
    let from_pkcs8 = p256::SecretKey::from_pkcs8_der(&plain).expect("the wrapped EC key is PKCS#8");
    let point = attr_bytes(&s, public, AttributeType::EcPoint);
    assert_eq!(from_pkcs8.public_key().to_encoded_point(false).as_bytes(), &point[2..]);
    plain.iter_mut().for_each(|b| *b = 0);
    let t = [
        (CKA_CLASS, ul(CKO_PRIVATE_KEY)),
        (CKA_KEY_TYPE, ul(CKK_EC)),
        (CKA_SIGN, bl(true)),
        (CKA_SENSITIVE, bl(true)),
        (CKA_PRIVATE, bl(true)),
    ];
    let unwrapped = raw.unwrap(h, CKM_AES_KEY_WRAP_PAD, kek.handle(), &wrapped, &t).unwrap();
    let unwrapped = oh(unwrapped);
    assert_eq!(attr_bytes(&s, unwrapped, AttributeType::EcParams), P256);
    assert!(
        !attr_bool(&s, unwrapped, AttributeType::Local) && !attr_bool(&s, unwrapped, AttributeType::AlwaysSensitive)
    );
    let digest = sha2::Sha256::digest(b"m");
    let sig = s.sign(&Mechanism::Ecdsa, unwrapped, &digest).unwrap();
    s.verify(&Mechanism::Ecdsa, public, &digest, &sig).unwrap();
    // An RSA private key too.
    let (rpub, rpriv) = import_rsa(&s, &rsa_test_key());
    assert_eq!(rv(s.update_attributes(rpriv, &[Attribute::Extractable(true)])), CKR_ATTRIBUTE_READ_ONLY);
    let rsa_private = s
        .create_object(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Modulus(rsa_test_key().n().to_bytes_be()),
            Attribute::PublicExponent(rsa_test_key().e().to_bytes_be()),
            Attribute::PrivateExponent(rsa_test_key().d().to_bytes_be()),
            Attribute::Extractable(true),
        ])
        .unwrap();
    let wrapped = raw.wrap(h, CKM_AES_KEY_WRAP_PAD, kek.handle(), rsa_private.handle()).unwrap();
    let t = [(CKA_CLASS, ul(CKO_PRIVATE_KEY)), (CKA_KEY_TYPE, ul(CKK_RSA)), (CKA_SIGN, bl(true))];
    let back = oh(raw.unwrap(h, CKM_AES_KEY_WRAP_PAD, kek.handle(), &wrapped, &t).unwrap());
    let sig = s.sign(&Mechanism::Sha256RsaPkcs, back, b"m").unwrap();
    s.verify(&Mechanism::Sha256RsaPkcs, rpub, b"m", &sig).unwrap();
    // A public key cannot be wrapped.
    assert_eq!(raw.wrap(h, CKM_AES_KEY_WRAP_PAD, kek.handle(), public.handle()), Err(CKR_KEY_NOT_WRAPPABLE));
}

#[test]
fn get_attribute_value_protocol() {
    let (_dir, m) = setup("getattr");
    let s = user_session(m.p11());
    let f = functions();
    let k = aes_key(&s, &[9; 16], &[Attribute::Sensitive(true), Attribute::Label(b"k".to_vec())]);
    let mut label = [0u8; 1];
    let mut small = [0u8; 2];
    let mut class = [0u8; 8];
    let mut t = [
        CK_ATTRIBUTE { type_: CKA_LABEL, pValue: std::ptr::null_mut(), ulValueLen: 0 },
        CK_ATTRIBUTE { type_: CKA_VALUE, pValue: label.as_mut_ptr().cast(), ulValueLen: 16 },
        CK_ATTRIBUTE { type_: CKA_MODULUS, pValue: std::ptr::null_mut(), ulValueLen: 0 },
        CK_ATTRIBUTE { type_: CKA_KEY_TYPE, pValue: small.as_mut_ptr().cast(), ulValueLen: 2 },
        CK_ATTRIBUTE { type_: CKA_CLASS, pValue: class.as_mut_ptr().cast(), ulValueLen: 8 },
    ];
    // SAFETY: a valid template of writable buffers.
    let rv = unsafe { f.C_GetAttributeValue.unwrap()(s.handle(), k.handle(), t.as_mut_ptr(), t.len() as CK_ULONG) };
    // Every entry is processed; the call reports one of the errors.
    assert!([CKR_ATTRIBUTE_SENSITIVE, CKR_ATTRIBUTE_TYPE_INVALID, CKR_BUFFER_TOO_SMALL].contains(&rv), "{rv:#x}");
    assert_eq!(t[0].ulValueLen, 1, "NULL pValue: the length");
    assert_eq!(t[1].ulValueLen, CK_UNAVAILABLE_INFORMATION, "sensitive");
    assert_eq!(t[2].ulValueLen, CK_UNAVAILABLE_INFORMATION, "not an attribute of an AES key");
    assert_eq!(t[3].ulValueLen, CK_UNAVAILABLE_INFORMATION, "too small");
    assert_eq!(t[4].ulValueLen, 8);
    assert_eq!(CK_ULONG::from_ne_bytes(class), CKO_SECRET_KEY);
    let raw = Raw::new();
    assert_eq!(raw.get(s.handle(), k.handle(), CKA_VALUE).0, CKR_ATTRIBUTE_SENSITIVE);
    assert_eq!(raw.get(s.handle(), k.handle(), CKA_MODULUS).0, CKR_ATTRIBUTE_TYPE_INVALID);
    assert_eq!(raw.get(s.handle(), k.handle(), CKA_LABEL), (CKR_OK, Some(b"k".to_vec())));
    // One entry too small alone: CKR_BUFFER_TOO_SMALL.
    let mut one = [CK_ATTRIBUTE { type_: CKA_LABEL, pValue: small.as_mut_ptr().cast(), ulValueLen: 0 }];
    // SAFETY: as above.
    let rv = unsafe { f.C_GetAttributeValue.unwrap()(s.handle(), k.handle(), one.as_mut_ptr(), 1) };
    assert_eq!((rv, one[0].ulValueLen), (CKR_BUFFER_TOO_SMALL, CK_UNAVAILABLE_INFORMATION));
    // C_GetObjectSize.
    let mut size = 0;
    // SAFETY: a valid out pointer.
    assert_eq!(unsafe { f.C_GetObjectSize.unwrap()(s.handle(), k.handle(), &mut size) }, CKR_OK);
    assert!(size > 16);
    // Output length queries keep the operation (C_Encrypt with a NULL buffer, then a small one, then enough).
    let mut mech = CK_MECHANISM { mechanism: CKM_AES_ECB, pParameter: std::ptr::null_mut(), ulParameterLen: 0 };
    // SAFETY: valid arguments.
    assert_eq!(unsafe { f.C_EncryptInit.unwrap()(s.handle(), &mut mech, k.handle()) }, CKR_OK);
    let mut data = [0u8; 32];
    let mut out = [0u8; 32];
    let mut len: CK_ULONG = 0;
    // SAFETY: valid arguments.
    unsafe {
        assert_eq!(f.C_Encrypt.unwrap()(s.handle(), data.as_mut_ptr(), 32, std::ptr::null_mut(), &mut len), CKR_OK);
        assert_eq!(len, 32);
        len = 16;
        assert_eq!(
            f.C_Encrypt.unwrap()(s.handle(), data.as_mut_ptr(), 32, out.as_mut_ptr(), &mut len),
            CKR_BUFFER_TOO_SMALL
        );
        assert_eq!(len, 32);
        assert_eq!(f.C_Encrypt.unwrap()(s.handle(), data.as_mut_ptr(), 32, out.as_mut_ptr(), &mut len), CKR_OK);
        // The operation is over now.
        assert_eq!(
            f.C_Encrypt.unwrap()(s.handle(), data.as_mut_ptr(), 32, out.as_mut_ptr(), &mut len),
            CKR_OPERATION_NOT_INITIALIZED
        );
    }
    assert_eq!(out[..16], out[16..], "ECB of two equal blocks");
}

#[test]
fn set_copy_destroy_rules() {
    let (_dir, m) = setup("setattr");
    let s = user_session(m.p11());
    let raw = Raw::new();
    let h = s.handle();
    let k = aes_key(&s, &[1; 16], &[Attribute::Extractable(true)]);
    // Sensitive only false → true; extractable only true → false.
    s.update_attributes(k, &[Attribute::Sensitive(true)]).unwrap();
    assert_eq!(rv(s.update_attributes(k, &[Attribute::Sensitive(false)])), CKR_ATTRIBUTE_READ_ONLY);
    s.update_attributes(k, &[Attribute::Extractable(false)]).unwrap();
    assert_eq!(rv(s.update_attributes(k, &[Attribute::Extractable(true)])), CKR_ATTRIBUTE_READ_ONLY);
    assert!(!attr_bool(&s, k, AttributeType::NeverExtractable), "it was extractable once");
    // Read-only attributes.
    assert_eq!(rv(s.update_attributes(k, &[Attribute::Value(vec![2; 16])])), CKR_ATTRIBUTE_READ_ONLY);
    assert_eq!(rv(s.update_attributes(k, &[Attribute::Class(ObjectClass::DATA)])), CKR_ATTRIBUTE_READ_ONLY);
    assert_eq!(raw.set(h, k.handle(), &[(CKA_LOCAL, bl(true))]), CKR_ATTRIBUTE_READ_ONLY);
    assert_eq!(raw.set(h, k.handle(), &[(CKA_MODULUS, by(&[1]))]), CKR_ATTRIBUTE_TYPE_INVALID);
    assert_eq!(
        raw.set(h, k.handle(), &[(CKA_LABEL, by(b"x")), (CKA_ENCRYPT, by(&[1, 2]))]),
        CKR_ATTRIBUTE_VALUE_INVALID
    );
    assert_eq!(attr_bytes(&s, k, AttributeType::Label), b"", "all or nothing");
    // CKA_WRAP_WITH_TRUSTED only false → true.
    s.update_attributes(k, &[Attribute::WrapWithTrusted(true)]).unwrap();
    assert_eq!(rv(s.update_attributes(k, &[Attribute::WrapWithTrusted(false)])), CKR_ATTRIBUTE_READ_ONLY);
    // CKA_MODIFIABLE false: no change at all.
    let fixed = aes_key(&s, &[1; 16], &[Attribute::Modifiable(false)]);
    assert_eq!(rv(s.update_attributes(fixed, &[Attribute::Label(b"x".to_vec())])), CKR_ACTION_PROHIBITED);
    // CKA_COPYABLE false: no copy; a copy takes the template's changes.
    let nocopy = aes_key(&s, &[1; 16], &[Attribute::Copyable(false)]);
    assert_eq!(rv(s.copy_object(nocopy, &[])), CKR_ACTION_PROHIBITED);
    let copy = s.copy_object(k, &[Attribute::Label(b"copy".to_vec())]).unwrap();
    assert_eq!(attr_bytes(&s, copy, AttributeType::Label), b"copy");
    assert_ne!(copy.handle(), k.handle());
    assert_eq!(rv(s.copy_object(k, &[Attribute::Value(vec![0; 16])])), CKR_ATTRIBUTE_READ_ONLY);
    // CKA_DESTROYABLE false: no destroy.
    let keep = aes_key(&s, &[1; 16], &[Attribute::Destroyable(false)]);
    assert_eq!(rv(s.destroy_object(keep)), CKR_ACTION_PROHIBITED);
    s.destroy_object(copy).unwrap();
    assert_eq!(rv(s.get_attributes(copy, &[AttributeType::Label])), CKR_OBJECT_HANDLE_INVALID);
    // Create: type invalid, read-only, incomplete, bad values.
    let aes = |extra: &[(CK_ATTRIBUTE_TYPE, V)]| {
        let mut t = vec![(CKA_CLASS, ul(CKO_SECRET_KEY)), (CKA_KEY_TYPE, ul(CKK_AES)), (CKA_VALUE, by(&[1; 16]))];
        t.extend(extra.iter().map(|(a, v)| {
            (
                *a,
                match v {
                    V::B(b) => V::B(b.clone()),
                    V::T(t) => V::T(t.clone()),
                },
            )
        }));
        t
    };
    assert_eq!(raw.create(h, &aes(&[(CKA_MODULUS, by(&[1]))])), Err(CKR_ATTRIBUTE_TYPE_INVALID));
    assert_eq!(raw.create(h, &aes(&[(CKA_ALWAYS_SENSITIVE, bl(true))])), Err(CKR_ATTRIBUTE_READ_ONLY));
    assert_eq!(raw.create(h, &aes(&[(CKA_VALUE, by(&[1; 15]))])), Err(CKR_ATTRIBUTE_VALUE_INVALID));
    assert_eq!(raw.create(h, &aes(&[(CKA_CHECK_VALUE, by(&[1, 2, 3]))])), Err(CKR_ATTRIBUTE_VALUE_INVALID));
    assert_eq!(
        raw.create(h, &[(CKA_CLASS, ul(CKO_SECRET_KEY)), (CKA_KEY_TYPE, ul(CKK_AES))]),
        Err(CKR_TEMPLATE_INCOMPLETE)
    );
    // CKA_TRUSTED may be set true by the SO only.
    assert_eq!(raw.create(h, &aes(&[(CKA_TRUSTED, bl(true))])), Err(CKR_ATTRIBUTE_READ_ONLY));
    assert_eq!(raw.set(h, k.handle(), &[(CKA_TRUSTED, bl(true))]), CKR_ATTRIBUTE_READ_ONLY);
    // Data objects.
    let d = s
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(b"app".to_vec()),
            Attribute::Value(b"v".to_vec()),
        ])
        .unwrap();
    assert_eq!(attr_bytes(&s, d, AttributeType::Value), b"v");
    assert!(!attr_bool(&s, d, AttributeType::Private), "data objects are public by default");
    assert!(attr_bool(&s, k, AttributeType::Private), "secret keys are private by default");
}

#[test]
fn trusted_wrapping_and_templates() {
    let (dir, m) = setup("trusted");
    let p11 = m.p11();
    let raw = Raw::new();
    // The SO makes a trusted (public) wrapping key on the token.
    let so = p11.open_rw_session(slot(p11, 0)).unwrap();
    so.login(UserType::So, Some(&pin(SO_PIN))).unwrap();
    let trusted_value = [4u8; 32];
    let t = [
        (CKA_CLASS, ul(CKO_SECRET_KEY)),
        (CKA_KEY_TYPE, ul(CKK_AES)),
        (CKA_VALUE, by(&trusted_value)),
        (CKA_TOKEN, bl(true)),
        (CKA_PRIVATE, bl(false)),
        (CKA_TRUSTED, bl(true)),
        (CKA_WRAP, bl(true)),
        (CKA_UNWRAP, bl(true)),
        (CKA_LABEL, by(b"trusted")),
        (CKA_UNWRAP_TEMPLATE, V::T(vec![(CKA_SENSITIVE, vec![1]), (CKA_EXTRACTABLE, vec![0])])),
    ];
    let trusted = raw.create(so.handle(), &t).unwrap();
    // The SO may create only public objects.
    let private = [
        (CKA_CLASS, ul(CKO_SECRET_KEY)),
        (CKA_KEY_TYPE, ul(CKK_AES)),
        (CKA_VALUE, by(&[1; 16])),
        (CKA_PRIVATE, bl(true)),
    ];
    assert_eq!(raw.create(so.handle(), &private), Err(CKR_USER_NOT_LOGGED_IN));
    so.logout().unwrap();
    drop(so);
    let s = user_session(p11);
    let h = s.handle();
    let untrusted = aes_key(&s, &[5; 32], &[Attribute::Wrap(true)]).handle();
    let guarded = raw
        .create(
            h,
            &[
                (CKA_CLASS, ul(CKO_SECRET_KEY)),
                (CKA_KEY_TYPE, ul(CKK_AES)),
                (CKA_VALUE, by(&[6; 16])),
                (CKA_EXTRACTABLE, bl(true)),
                (CKA_WRAP_WITH_TRUSTED, bl(true)),
            ],
        )
        .unwrap();
    assert_eq!(raw.wrap(h, CKM_AES_KEY_WRAP_PAD, untrusted, guarded), Err(CKR_KEY_NOT_WRAPPABLE));
    let wrapped = raw.wrap(h, CKM_AES_KEY_WRAP_PAD, trusted, guarded).unwrap();
    // The unwrap template of the trusted key is enforced: the caller's template must carry its values.
    let base = [(CKA_CLASS, ul(CKO_SECRET_KEY)), (CKA_KEY_TYPE, ul(CKK_AES))];
    assert_eq!(raw.unwrap(h, CKM_AES_KEY_WRAP_PAD, trusted, &wrapped, &base), Err(CKR_TEMPLATE_INCONSISTENT));
    let mut full: Vec<_> = base.into_iter().collect();
    full.push((CKA_SENSITIVE, bl(true)));
    full.push((CKA_EXTRACTABLE, bl(false)));
    let k = raw.unwrap(h, CKM_AES_KEY_WRAP_PAD, trusted, &wrapped, &full).unwrap();
    assert_eq!(raw.get(h, k, CKA_VALUE).0, CKR_ATTRIBUTE_SENSITIVE);
    // A wrap template on the wrapping key: only keys with those values can be wrapped by it.
    let picky = raw
        .create(
            h,
            &[
                (CKA_CLASS, ul(CKO_SECRET_KEY)),
                (CKA_KEY_TYPE, ul(CKK_AES)),
                (CKA_VALUE, by(&[8; 16])),
                (CKA_WRAP, bl(true)),
                (CKA_WRAP_TEMPLATE, V::T(vec![(CKA_LABEL, b"ok".to_vec())])),
            ],
        )
        .unwrap();
    let plain = aes_key(&s, &[1; 16], &[Attribute::Extractable(true)]);
    assert_eq!(raw.wrap(h, CKM_AES_KEY_WRAP_PAD, picky, plain.handle()), Err(CKR_KEY_NOT_WRAPPABLE));
    s.update_attributes(plain, &[Attribute::Label(b"ok".to_vec())]).unwrap();
    raw.wrap(h, CKM_AES_KEY_WRAP_PAD, picky, plain.handle()).unwrap();
    // The template attribute reads back as an attribute array.
    let mut inner = [CK_ATTRIBUTE { type_: 0, pValue: std::ptr::null_mut(), ulValueLen: 0 }];
    let mut a = CK_ATTRIBUTE {
        type_: CKA_WRAP_TEMPLATE,
        pValue: inner.as_mut_ptr().cast(),
        ulValueLen: std::mem::size_of::<CK_ATTRIBUTE>() as CK_ULONG,
    };
    // SAFETY: an attribute array of one entry with a NULL value: its type and length come back.
    let rv = unsafe { raw.f.C_GetAttributeValue.unwrap()(h, picky, &mut a, 1) };
    assert_eq!((rv, inner[0].type_, inner[0].ulValueLen), (CKR_OK, CKA_LABEL, 2));
    drop(s);
    let _ = dir;
}

#[test]
fn visibility_sessions_and_handles() {
    let (_dir, m) = setup("visibility");
    let p11 = m.p11();
    let slot = slot(p11, 0);
    let raw = Raw::new();
    let public_session = p11.open_ro_session(slot).unwrap();
    // R/O sessions cannot create token objects; private objects need the user.
    let data = |token: bool, private: bool| {
        [(CKA_CLASS, ul(CKO_DATA)), (CKA_TOKEN, bl(token)), (CKA_PRIVATE, bl(private)), (CKA_LABEL, by(b"d"))]
    };
    assert_eq!(raw.create(public_session.handle(), &data(true, false)), Err(CKR_SESSION_READ_ONLY));
    assert_eq!(raw.create(public_session.handle(), &data(false, true)), Err(CKR_USER_NOT_LOGGED_IN));
    let public_obj = raw.create(public_session.handle(), &data(false, false)).unwrap();
    let s = user_session(p11);
    let private_token = raw.create(s.handle(), &data(true, true)).unwrap();
    let private_session_obj = raw.create(s.handle(), &data(false, true)).unwrap();
    let found = |sess: &Session| -> Vec<u64> {
        let mut v: Vec<u64> =
            sess.find_objects(&[Attribute::Label(b"d".to_vec())]).unwrap().iter().map(|h| h.handle()).collect();
        v.sort();
        v
    };
    assert_eq!(found(&s), vec![public_obj, private_token, private_session_obj]);
    // Handles are small, distinct, increasing.
    assert!(public_obj < private_token && private_token < private_session_obj && private_session_obj < 100);
    s.logout().unwrap();
    // Private objects vanish from view; private session objects are destroyed by C_Logout.
    assert_eq!(found(&public_session), vec![public_obj]);
    assert_eq!(raw.get(public_session.handle(), private_token, CKA_LABEL).0, CKR_OBJECT_HANDLE_INVALID);
    s.login(UserType::User, Some(&pin(USER_PIN))).unwrap();
    assert_eq!(found(&s), vec![public_obj, private_token]);
    // Session objects die with their session; handles are never reused.
    let temp = raw.create(s.handle(), &data(false, false)).unwrap();
    drop(public_session);
    assert_eq!(found(&s), vec![private_token, temp]);
    let again = raw.create(s.handle(), &data(false, false)).unwrap();
    assert!(again > temp);
    // C_CloseAllSessions destroys the slot's session objects and logs out.
    // SAFETY: a plain call with a slot id.
    assert_eq!(unsafe { raw.f.C_CloseAllSessions.unwrap()(slot.id()) }, CKR_OK);
    let s = user_session(p11);
    assert_eq!(found(&s), vec![private_token]);
    assert_eq!(rv(s.get_attributes(oh(again), &[AttributeType::Label])), CKR_OBJECT_HANDLE_INVALID);
    // Sessions from slot 1 do not see slot 0's objects.
    let other = slot_1_initialized(p11);
    assert_eq!(raw.get(other.handle(), private_token, CKA_LABEL).0, CKR_OBJECT_HANDLE_INVALID);
    assert!(other.find_objects(&[]).unwrap().is_empty());
}

#[test]
fn many_threads_share_the_module() {
    let (_dir, m) = setup("threads");
    let p11 = m.p11();
    let s = user_session(p11);
    let key = s
        .generate_key(
            &Mechanism::GenericSecretKeyGen,
            &[Attribute::ValueLen(32.into()), Attribute::Sign(true), Attribute::Token(true)],
        )
        .unwrap();
    let expected = s.sign(&Mechanism::Sha256Hmac, key, b"thread").unwrap();
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                let mine = p11.open_ro_session(slot(p11, 0)).unwrap();
                for _ in 0..50 {
                    assert_eq!(mine.sign(&Mechanism::Sha256Hmac, key, b"thread").unwrap(), expected);
                    let k = mine.generate_key(&Mechanism::AesKeyGen, &[Attribute::ValueLen(16.into())]).unwrap();
                    mine.destroy_object(k).unwrap();
                }
            });
        }
    });
}
