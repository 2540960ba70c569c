//! Rules measured on SoftHSM2 2.6.1 that the simulator follows: keys with CKA_ALWAYS_AUTHENTICATE and
//! C_Login(CKU_CONTEXT_SPECIFIC), copies of unmodifiable objects.

mod common;

use common::*;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::types::AuthPin;
use cryptoki_sys::*;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rsa::traits::{PrivateKeyParts, PublicKeyParts};
use std::ptr::null_mut;

const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

fn setup(test: &str) -> (std::path::PathBuf, Loaded) {
    let dir = test_dir(test);
    let config = write_config(&dir, &two_slots("standard"));
    let loaded = load(&config, None);
    (dir, loaded)
}

fn pin(p: &str) -> AuthPin {
    AuthPin::new(p.into())
}

fn context_login(s: &Session, p: &str) -> CK_RV {
    match s.login(UserType::ContextSpecific, Some(&pin(p))) {
        Ok(()) => CKR_OK,
        other => rv(other),
    }
}

/// C_Sign after an initialization made elsewhere (cryptoki's `sign` initializes too): a length query,
/// then the signature.
fn sign(h: CK_SESSION_HANDLE, data: &[u8]) -> Result<Vec<u8>, CK_RV> {
    let f = functions();
    let mut data = data.to_vec();
    let mut len = 0;
    // SAFETY: valid input, a NULL output buffer (length query) and a valid length pointer.
    let rv = unsafe { f.C_Sign.unwrap()(h, data.as_mut_ptr(), data.len() as CK_ULONG, null_mut(), &mut len) };
    if rv != CKR_OK {
        return Err(rv);
    }
    let mut out = vec![0u8; len as usize];
    // SAFETY: an output buffer of the length the module gave.
    let rv = unsafe { f.C_Sign.unwrap()(h, data.as_mut_ptr(), data.len() as CK_ULONG, out.as_mut_ptr(), &mut len) };
    if rv != CKR_OK {
        return Err(rv);
    }
    out.truncate(len as usize);
    Ok(out)
}

/// C_Decrypt after C_DecryptInit, into a buffer large enough for an RSA-2048 block.
fn decrypt(h: CK_SESSION_HANDLE, data: &[u8]) -> Result<Vec<u8>, CK_RV> {
    let mut data = data.to_vec();
    let mut out = vec![0u8; 256];
    let mut len = out.len() as CK_ULONG;
    // SAFETY: valid input and output buffers.
    let rv = unsafe {
        functions().C_Decrypt.unwrap()(h, data.as_mut_ptr(), data.len() as CK_ULONG, out.as_mut_ptr(), &mut len)
    };
    if rv != CKR_OK {
        return Err(rv);
    }
    out.truncate(len as usize);
    Ok(out)
}

/// A P-256 key pair; the private key's template gets `private` too.
fn ec_pair(s: &Session, private: &[Attribute]) -> (ObjectHandle, ObjectHandle) {
    let mut t = vec![Attribute::Sign(true)];
    t.extend_from_slice(private);
    s.generate_key_pair(&Mechanism::EccKeyPairGen, &[Attribute::EcParams(P256.to_vec()), Attribute::Verify(true)], &t)
        .unwrap()
}

/// The test RSA key imported (RSA key generation is slow in debug builds); the private key's template gets
/// `private` too.
fn rsa_pair(s: &Session, private: &[Attribute]) -> (ObjectHandle, ObjectHandle) {
    use rsa::pkcs8::DecodePrivateKey;
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(include_str!("data/rsa2048.pem")).unwrap();
    let be = |v: &rsa::BigUint| v.to_bytes_be();
    let public = s
        .create_object(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Modulus(be(key.n())),
            Attribute::PublicExponent(be(key.e())),
            Attribute::Encrypt(true),
            Attribute::Verify(true),
        ])
        .unwrap();
    let mut t = vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Modulus(be(key.n())),
        Attribute::PublicExponent(be(key.e())),
        Attribute::PrivateExponent(be(key.d())),
        Attribute::Prime1(be(&key.primes()[0])),
        Attribute::Prime2(be(&key.primes()[1])),
        Attribute::Sign(true),
        Attribute::Decrypt(true),
    ];
    t.extend_from_slice(private);
    (public, s.create_object(&t).unwrap())
}

fn always_authenticate(s: &Session, key: ObjectHandle) -> bool {
    match s.get_attributes(key, &[AttributeType::AlwaysAuthenticate]).unwrap().pop() {
        Some(Attribute::AlwaysAuthenticate(b)) => b,
        other => panic!("CKA_ALWAYS_AUTHENTICATE: {other:?}"),
    }
}

#[test]
fn always_authenticate_key_signs_once_per_context_login() {
    let (_dir, m) = setup("always-auth-sign");
    let s = user_session(m.p11());
    let h = s.handle();
    let (public, key) = ec_pair(&s, &[Attribute::AlwaysAuthenticate(true)]);
    assert!(always_authenticate(&s, key));
    let digest = [7u8; 32];
    // A context login after C_SignInit lets this signature through, length query included.
    s.sign_init(&Mechanism::Ecdsa, key).unwrap();
    assert_eq!(context_login(&s, USER_PIN), CKR_OK);
    let signature = sign(h, &digest).unwrap();
    s.verify(&Mechanism::Ecdsa, public, &digest, &signature).unwrap();
    // The login stays as it was.
    assert_eq!(s.get_session_info().unwrap().session_state(), SessionState::RwUser);
    // The next use needs another context login: without it the first call fails and ends the operation.
    s.sign_init(&Mechanism::Ecdsa, key).unwrap();
    assert_eq!(sign(h, &digest), Err(CKR_USER_NOT_LOGGED_IN));
    assert_eq!(sign(h, &digest), Err(CKR_OPERATION_NOT_INITIALIZED));
    // Nothing is left waiting for a context login after that.
    assert_eq!(context_login(&s, USER_PIN), CKR_OPERATION_NOT_INITIALIZED);
    s.sign_init(&Mechanism::Ecdsa, key).unwrap();
    assert_eq!(context_login(&s, USER_PIN), CKR_OK);
    // One login authorizes one operation, not two.
    assert_eq!(context_login(&s, USER_PIN), CKR_OPERATION_NOT_INITIALIZED);
    s.verify(&Mechanism::Ecdsa, public, &digest, &sign(h, &digest).unwrap()).unwrap();
    // Multi-part: each step checks; one login covers every step of its operation.
    s.sign_init(&Mechanism::EcdsaSha256, key).unwrap();
    assert_eq!(rv(s.sign_update(b"da")), CKR_USER_NOT_LOGGED_IN);
    assert_eq!(rv(s.sign_update(b"ta")), CKR_OPERATION_NOT_INITIALIZED);
    s.sign_init(&Mechanism::EcdsaSha256, key).unwrap();
    assert_eq!(rv(s.sign_final()), CKR_USER_NOT_LOGGED_IN);
    s.sign_init(&Mechanism::EcdsaSha256, key).unwrap();
    assert_eq!(context_login(&s, USER_PIN), CKR_OK);
    s.sign_update(b"da").unwrap();
    s.sign_update(b"ta").unwrap();
    let signature = s.sign_final().unwrap();
    s.verify(&Mechanism::EcdsaSha256, public, b"data", &signature).unwrap();
    // A key without the attribute needs nothing, and a context login during its operation has no object.
    let (plain_public, plain) = ec_pair(&s, &[]);
    assert!(!always_authenticate(&s, plain), "CKA_ALWAYS_AUTHENTICATE defaults to false");
    s.sign_init(&Mechanism::Ecdsa, plain).unwrap();
    assert_eq!(context_login(&s, USER_PIN), CKR_OPERATION_NOT_INITIALIZED);
    s.verify(&Mechanism::Ecdsa, plain_public, &digest, &sign(h, &digest).unwrap()).unwrap();
}

#[test]
fn always_authenticate_key_decrypts_once_per_context_login() {
    let (_dir, m) = setup("always-auth-decrypt");
    let s = user_session(m.p11());
    let h = s.handle();
    let (public, key) = rsa_pair(&s, &[Attribute::AlwaysAuthenticate(true)]);
    let ciphertext = s.encrypt(&Mechanism::RsaPkcs, public, b"secret").unwrap();
    s.decrypt_init(&Mechanism::RsaPkcs, key).unwrap();
    assert_eq!(decrypt(h, &ciphertext), Err(CKR_USER_NOT_LOGGED_IN));
    assert_eq!(decrypt(h, &ciphertext), Err(CKR_OPERATION_NOT_INITIALIZED));
    s.decrypt_init(&Mechanism::RsaPkcs, key).unwrap();
    assert_eq!(context_login(&s, USER_PIN), CKR_OK);
    assert_eq!(decrypt(h, &ciphertext).unwrap(), b"secret");
    s.decrypt_init(&Mechanism::RsaPkcs, key).unwrap();
    assert_eq!(rv(s.decrypt_update(&ciphertext)), CKR_USER_NOT_LOGGED_IN);
    // Two operations waiting at once (the simulator runs a signature and a decryption side by side): the
    // login serves the one initialized last, as PKCS#11 has it follow that initialization.
    s.sign_init(&Mechanism::Sha256RsaPkcs, key).unwrap();
    s.decrypt_init(&Mechanism::RsaPkcs, key).unwrap();
    assert_eq!(context_login(&s, USER_PIN), CKR_OK);
    assert_eq!(decrypt(h, &ciphertext).unwrap(), b"secret");
    assert_eq!(sign(h, b"m"), Err(CKR_USER_NOT_LOGGED_IN));
    s.sign_init(&Mechanism::Sha256RsaPkcs, key).unwrap();
    assert_eq!(context_login(&s, USER_PIN), CKR_OK);
    let signature = sign(h, b"m").unwrap();
    s.verify(&Mechanism::Sha256RsaPkcs, public, b"m", &signature).unwrap();
}

#[test]
fn context_login_errors() {
    let (_dir, m) = setup("context-login-errors");
    let p11 = m.p11();
    // Not logged in and nothing to authorize.
    let public = p11.open_rw_session(slot(p11, 0)).unwrap();
    assert_eq!(context_login(&public, USER_PIN), CKR_OPERATION_NOT_INITIALIZED);
    drop(public);
    let s = user_session(p11);
    let h = s.handle();
    assert_eq!(context_login(&s, USER_PIN), CKR_OPERATION_NOT_INITIALIZED);
    let (public, key) = ec_pair(&s, &[Attribute::AlwaysAuthenticate(true), Attribute::Token(true)]);
    // A wrong PIN is refused and the operation keeps waiting; the right one then authorizes it.
    s.sign_init(&Mechanism::Ecdsa, key).unwrap();
    assert_eq!(context_login(&s, "wrong-pin"), CKR_PIN_INCORRECT);
    assert_eq!(s.get_session_info().unwrap().session_state(), SessionState::RwUser);
    // The SO PIN is not the user's.
    assert_eq!(context_login(&s, SO_PIN), CKR_PIN_INCORRECT);
    assert_eq!(context_login(&s, USER_PIN), CKR_OK);
    s.verify(&Mechanism::Ecdsa, public, &[1; 32], &sign(h, &[1; 32]).unwrap()).unwrap();
    // The session must still be logged in as the user.
    s.sign_init(&Mechanism::Ecdsa, key).unwrap();
    s.logout().unwrap();
    assert_eq!(context_login(&s, USER_PIN), CKR_USER_NOT_LOGGED_IN);
    assert_eq!(sign(h, &[1; 32]), Err(CKR_USER_NOT_LOGGED_IN));
    // A user type the module does not know.
    let mut p = USER_PIN.as_bytes().to_vec();
    // SAFETY: a valid PIN buffer.
    let rv = unsafe { functions().C_Login.unwrap()(h, 7, p.as_mut_ptr(), p.len() as CK_ULONG) };
    assert_eq!(rv, CKR_USER_TYPE_INVALID);
}

#[test]
fn always_authenticate_attribute_rules() {
    let (_dir, m) = setup("always-auth-attributes");
    let s = user_session(m.p11());
    let h = s.handle();
    let raw = Raw::new();
    let (_, key) = ec_pair(&s, &[Attribute::AlwaysAuthenticate(true)]);
    let (_, plain) = ec_pair(&s, &[]);
    // Set at creation only: C_SetAttributeValue and a copy that changes it are refused either way.
    assert_eq!(raw.set(h, key.handle(), &[(CKA_ALWAYS_AUTHENTICATE, bl(false))]), CKR_ATTRIBUTE_READ_ONLY);
    assert_eq!(raw.set(h, plain.handle(), &[(CKA_ALWAYS_AUTHENTICATE, bl(true))]), CKR_ATTRIBUTE_READ_ONLY);
    assert_eq!(rv(s.copy_object(key, &[Attribute::AlwaysAuthenticate(false)])), CKR_ATTRIBUTE_READ_ONLY);
    assert_eq!(rv(s.copy_object(plain, &[Attribute::AlwaysAuthenticate(true)])), CKR_ATTRIBUTE_READ_ONLY);
    // A copy keeps it (and so needs its context login).
    let copy = s.copy_object(key, &[Attribute::AlwaysAuthenticate(true)]).unwrap();
    assert!(always_authenticate(&s, copy));
    s.sign_init(&Mechanism::Ecdsa, copy).unwrap();
    assert_eq!(sign(h, &[1; 32]), Err(CKR_USER_NOT_LOGGED_IN));
    // Only private keys have it, and only private objects may set it (as SoftHSM2).
    assert_eq!(rv(s.copy_object(key, &[Attribute::Private(false)])), CKR_TEMPLATE_INCONSISTENT);
    let ec_private = |extra: &[(CK_ATTRIBUTE_TYPE, V)]| {
        let mut t = vec![
            (CKA_CLASS, ul(CKO_PRIVATE_KEY)),
            (CKA_KEY_TYPE, ul(CKK_EC)),
            (CKA_EC_PARAMS, by(P256)),
            (CKA_VALUE, by(&[7; 32])),
            (CKA_SIGN, bl(true)),
        ];
        t.extend(extra.iter().map(|(ty, v)| (*ty, copy_v(v))));
        t
    };
    let created = raw.create(h, &ec_private(&[(CKA_ALWAYS_AUTHENTICATE, bl(true))])).unwrap();
    assert!(always_authenticate(&s, oh(created)));
    let public_always = ec_private(&[(CKA_PRIVATE, bl(false)), (CKA_ALWAYS_AUTHENTICATE, bl(true))]);
    assert_eq!(raw.create(h, &public_always), Err(CKR_TEMPLATE_INCONSISTENT));
    raw.create(h, &ec_private(&[(CKA_PRIVATE, bl(false)), (CKA_ALWAYS_AUTHENTICATE, bl(false))])).unwrap();
    assert_eq!(raw.create(h, &ec_private(&[(CKA_ALWAYS_AUTHENTICATE, by(&[1, 0]))])), Err(CKR_ATTRIBUTE_VALUE_INVALID));
    let aes = [
        (CKA_CLASS, ul(CKO_SECRET_KEY)),
        (CKA_KEY_TYPE, ul(CKK_AES)),
        (CKA_VALUE, by(&[1; 16])),
        (CKA_ALWAYS_AUTHENTICATE, bl(false)),
    ];
    assert_eq!(raw.create(h, &aes), Err(CKR_ATTRIBUTE_TYPE_INVALID));
    let r = s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[Attribute::EcParams(P256.to_vec()), Attribute::AlwaysAuthenticate(true)],
        &[Attribute::Sign(true)],
    );
    assert_eq!(rv(r), CKR_ATTRIBUTE_TYPE_INVALID);
    // C_UnwrapKey: in the caller's template, and demanded by the unwrapping key's CKA_UNWRAP_TEMPLATE.
    let kek = raw
        .create(
            h,
            &[
                (CKA_CLASS, ul(CKO_SECRET_KEY)),
                (CKA_KEY_TYPE, ul(CKK_AES)),
                (CKA_VALUE, by(&[3; 32])),
                (CKA_WRAP, bl(true)),
                (CKA_UNWRAP, bl(true)),
            ],
        )
        .unwrap();
    let strict = raw
        .create(
            h,
            &[
                (CKA_CLASS, ul(CKO_SECRET_KEY)),
                (CKA_KEY_TYPE, ul(CKK_AES)),
                (CKA_VALUE, by(&[3; 32])),
                (CKA_UNWRAP, bl(true)),
                (CKA_UNWRAP_TEMPLATE, V::T(vec![(CKA_ALWAYS_AUTHENTICATE, vec![1])])),
            ],
        )
        .unwrap();
    let extractable = raw.create(h, &ec_private(&[(CKA_EXTRACTABLE, bl(true))])).unwrap();
    let wrapped = raw.wrap(h, CKM_AES_KEY_WRAP_PAD, kek, extractable).unwrap();
    let t = |always: Option<bool>| {
        let mut t = vec![(CKA_CLASS, ul(CKO_PRIVATE_KEY)), (CKA_KEY_TYPE, ul(CKK_EC)), (CKA_SIGN, bl(true))];
        if let Some(a) = always {
            t.push((CKA_ALWAYS_AUTHENTICATE, bl(a)));
        }
        t
    };
    let unwrapped = oh(raw.unwrap(h, CKM_AES_KEY_WRAP_PAD, kek, &wrapped, &t(Some(true))).unwrap());
    assert!(always_authenticate(&s, unwrapped));
    s.sign_init(&Mechanism::Ecdsa, unwrapped).unwrap();
    assert_eq!(sign(h, &[1; 32]), Err(CKR_USER_NOT_LOGGED_IN));
    assert_eq!(raw.unwrap(h, CKM_AES_KEY_WRAP_PAD, strict, &wrapped, &t(None)), Err(CKR_TEMPLATE_INCONSISTENT));
    assert_eq!(raw.unwrap(h, CKM_AES_KEY_WRAP_PAD, strict, &wrapped, &t(Some(false))), Err(CKR_TEMPLATE_INCONSISTENT));
    let unwrapped = oh(raw.unwrap(h, CKM_AES_KEY_WRAP_PAD, strict, &wrapped, &t(Some(true))).unwrap());
    s.sign_init(&Mechanism::Ecdsa, unwrapped).unwrap();
    assert_eq!(context_login(&s, USER_PIN), CKR_OK);
    sign(h, &[1; 32]).unwrap();
    // Unwrap and derive are single calls with no place for a context login: the attribute does not stop
    // them (as SoftHSM2, which checks it at C_SignInit and C_DecryptInit only).
    let (_, agreeing) = ec_pair(&s, &[Attribute::AlwaysAuthenticate(true), Attribute::Derive(true)]);
    let peer = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let point = peer.public_key().to_encoded_point(false);
    let params = Ecdh1DeriveParams::new(EcKdf::null(), point.as_bytes());
    s.derive_key(
        &Mechanism::Ecdh1Derive(params),
        agreeing,
        &[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::KeyType(KeyType::GENERIC_SECRET)],
    )
    .unwrap();
}

fn copy_v(v: &V) -> V {
    match v {
        V::B(b) => V::B(b.clone()),
        V::T(t) => V::T(t.clone()),
    }
}

/// Every attribute of a secret key that the simulator keeps, as read back.
fn secret_key_attributes(raw: &Raw, h: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> Vec<(CK_ULONG, Vec<u8>)> {
    [
        CKA_CLASS,
        CKA_TOKEN,
        CKA_PRIVATE,
        CKA_MODIFIABLE,
        CKA_COPYABLE,
        CKA_DESTROYABLE,
        CKA_LABEL,
        CKA_ID,
        CKA_ENCRYPT,
        CKA_DECRYPT,
        CKA_SIGN,
        CKA_VERIFY,
        CKA_WRAP,
        CKA_UNWRAP,
        CKA_DERIVE,
        CKA_SENSITIVE,
        CKA_EXTRACTABLE,
        CKA_VALUE,
        CKA_CHECK_VALUE,
    ]
    .into_iter()
    .map(|ty| (ty, raw.get(h, key, ty).1.unwrap_or_else(|| panic!("attribute {ty:#x}"))))
    .collect()
}

#[test]
fn copy_of_an_unmodifiable_object_changes_nothing() {
    let (_dir, m) = setup("copy-unmodifiable");
    let s = user_session(m.p11());
    let h = s.handle();
    let raw = Raw::new();
    let fixed = s
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Value(vec![1; 16]),
            Attribute::Modifiable(false),
            Attribute::Decrypt(false),
            Attribute::Extractable(true),
            Attribute::Label(b"fixed".to_vec()),
        ])
        .unwrap();
    // Any change is refused, even towards less (CKA_TOKEN) or more protection (CKA_DECRYPT false → true is
    // a new use).
    for change in [
        Attribute::Decrypt(true),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Modifiable(true),
        Attribute::Label(b"other".to_vec()),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Copyable(false),
    ] {
        assert_eq!(rv(s.copy_object(fixed, std::slice::from_ref(&change))), CKR_ATTRIBUTE_READ_ONLY, "{change:?}");
    }
    // The other answers come first, as for any copy.
    assert_eq!(raw_copy(h, fixed.handle(), &[(CKA_MODULUS, by(&[1]))]), Err(CKR_ATTRIBUTE_TYPE_INVALID));
    assert_eq!(raw_copy(h, fixed.handle(), &[(CKA_DECRYPT, by(&[1, 1]))]), Err(CKR_ATTRIBUTE_VALUE_INVALID));
    // Values equal to the object's are no change: the copy is the object.
    let same = [
        Attribute::Decrypt(false),
        Attribute::Token(false),
        Attribute::Modifiable(false),
        Attribute::Label(b"fixed".to_vec()),
    ];
    for template in [&same[..], &[]] {
        let copy = s.copy_object(fixed, template).unwrap();
        assert_ne!(copy.handle(), fixed.handle());
        assert_eq!(secret_key_attributes(&raw, h, copy.handle()), secret_key_attributes(&raw, h, fixed.handle()));
        assert_eq!(rv(s.decrypt(&Mechanism::AesEcb, copy, &[0; 16])), CKR_KEY_FUNCTION_NOT_PERMITTED);
    }
    // CKA_COPYABLE false still wins over everything.
    let locked = s
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Value(vec![1; 16]),
            Attribute::Modifiable(false),
            Attribute::Copyable(false),
        ])
        .unwrap();
    assert_eq!(rv(s.copy_object(locked, &[Attribute::Decrypt(true)])), CKR_ACTION_PROHIBITED);
    assert_eq!(rv(s.copy_object(locked, &[])), CKR_ACTION_PROHIBITED);
    // A modifiable object's copy still takes changes, and may be made unmodifiable.
    let open = s
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Value(vec![1; 16]),
            Attribute::Decrypt(false),
        ])
        .unwrap();
    let copy = s.copy_object(open, &[Attribute::Decrypt(true), Attribute::Modifiable(false)]).unwrap();
    assert_eq!(s.decrypt(&Mechanism::AesEcb, copy, &[0; 16]).unwrap().len(), 16);
    assert_eq!(rv(s.copy_object(copy, &[Attribute::Decrypt(false)])), CKR_ATTRIBUTE_READ_ONLY);
}

fn raw_copy(
    h: CK_SESSION_HANDLE,
    obj: CK_OBJECT_HANDLE,
    t: &[(CK_ATTRIBUTE_TYPE, V)],
) -> Result<CK_OBJECT_HANDLE, CK_RV> {
    let mut t = raw_template(t);
    let mut copy = 0;
    // SAFETY: a valid template and out pointer.
    let rv = unsafe {
        functions().C_CopyObject.unwrap()(h, obj, t.attrs.as_mut_ptr(), t.attrs.len() as CK_ULONG, &mut copy)
    };
    if rv == CKR_OK {
        Ok(copy)
    } else {
        Err(rv)
    }
}
