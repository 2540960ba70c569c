//! Rules measured on SoftHSM2 2.6.1 that the simulator follows: keys with CKA_ALWAYS_AUTHENTICATE and
//! C_Login(CKU_CONTEXT_SPECIFIC), copies of unmodifiable objects, the C_GetAttributeValue protocol of
//! attribute arrays, and templates that are malformed on purpose (answered, never a crash). Also what must
//! keep working around them: CKA_ALLOWED_MECHANISMS, unwrap templates, CKA_WRAP_WITH_TRUSTED and
//! CKA_TRUSTED.

mod common;

use common::*;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::types::AuthPin;
use cryptoki_sys::*;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rsa::traits::{PrivateKeyParts, PublicKeyParts};
use std::mem::size_of;
use std::ptr::null_mut;

const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const ATTR: CK_ULONG = size_of::<CK_ATTRIBUTE>() as CK_ULONG;

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

fn get_raw(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE, t: &mut [CK_ATTRIBUTE]) -> CK_RV {
    // SAFETY: the caller's attributes are NULL or point to buffers of their lengths.
    unsafe { functions().C_GetAttributeValue.unwrap()(h, obj, t.as_mut_ptr(), t.len() as CK_ULONG) }
}

fn empty() -> CK_ATTRIBUTE {
    CK_ATTRIBUTE { type_: 0, pValue: null_mut(), ulValueLen: 0 }
}

fn ulongs(values: &[CK_ULONG]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

#[test]
fn attribute_arrays_are_read_with_the_spec_protocol() {
    let (_dir, m) = setup("array-read");
    let s = user_session(m.p11());
    let h = s.handle();
    let raw = Raw::new();
    let key = raw
        .create(
            h,
            &[
                (CKA_CLASS, ul(CKO_SECRET_KEY)),
                (CKA_KEY_TYPE, ul(CKK_AES)),
                (CKA_VALUE, by(&[2; 16])),
                (CKA_WRAP, bl(true)),
                (CKA_WRAP_TEMPLATE, V::T(vec![(CKA_LABEL, b"abc".to_vec()), (CKA_EXTRACTABLE, vec![1])])),
                (CKA_ALLOWED_MECHANISMS, V::B(ulongs(&[CKM_AES_KEY_WRAP, CKM_AES_KEY_WRAP_PAD]))),
            ],
        )
        .unwrap();
    // NULL value: the length of the array, n × sizeof(CK_ATTRIBUTE).
    let mut a = [CK_ATTRIBUTE { type_: CKA_WRAP_TEMPLATE, pValue: null_mut(), ulValueLen: 0 }];
    assert_eq!(get_raw(h, key, &mut a), CKR_OK);
    assert_eq!(a[0].ulValueLen, 2 * ATTR);
    // Room for the array, elements with NULL values: each element's type and length.
    let mut inner = [empty(), empty()];
    a[0].pValue = inner.as_mut_ptr().cast();
    assert_eq!(get_raw(h, key, &mut a), CKR_OK);
    assert_eq!(a[0].ulValueLen, 2 * ATTR);
    let mut got: Vec<_> = inner.iter().map(|i| (i.type_, i.ulValueLen)).collect();
    got.sort();
    assert_eq!(got, [(CKA_LABEL, 3), (CKA_EXTRACTABLE, 1)]);
    // Buffers of those lengths: the values.
    let mut bufs: Vec<Vec<u8>> = inner.iter().map(|i| vec![0u8; i.ulValueLen as usize]).collect();
    for (i, b) in inner.iter_mut().zip(bufs.iter_mut()) {
        i.pValue = b.as_mut_ptr().cast();
    }
    assert_eq!(get_raw(h, key, &mut a), CKR_OK);
    let mut values: Vec<_> = inner.iter().zip(&bufs).map(|(i, b)| (i.type_, b.clone())).collect();
    values.sort();
    assert_eq!(values, [(CKA_LABEL, b"abc".to_vec()), (CKA_EXTRACTABLE, vec![1])]);
    // One element's buffer too small: that element is CK_UNAVAILABLE_INFORMATION, the other is filled,
    // and the call says CKR_BUFFER_TOO_SMALL.
    let label = inner.iter().position(|i| i.type_ == CKA_LABEL).unwrap();
    let mut short = [0u8; 2];
    let mut one = [0u8; 1];
    inner[label] = CK_ATTRIBUTE { type_: 0, pValue: short.as_mut_ptr().cast(), ulValueLen: 2 };
    inner[1 - label] = CK_ATTRIBUTE { type_: 0, pValue: one.as_mut_ptr().cast(), ulValueLen: 1 };
    assert_eq!(get_raw(h, key, &mut a), CKR_BUFFER_TOO_SMALL);
    assert_eq!((inner[label].type_, inner[label].ulValueLen), (CKA_LABEL, CK_UNAVAILABLE_INFORMATION));
    assert_eq!((inner[1 - label].type_, inner[1 - label].ulValueLen, one), (CKA_EXTRACTABLE, 1, [1]));
    // No room for the array.
    a[0].ulValueLen = ATTR;
    assert_eq!(get_raw(h, key, &mut a), CKR_BUFFER_TOO_SMALL);
    assert_eq!(a[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    // An array in a byte buffer at an odd address (the value is a void pointer, with no alignment promised).
    let mut bytes = vec![0u8; 2 * ATTR as usize + 1];
    a[0] = CK_ATTRIBUTE {
        type_: CKA_WRAP_TEMPLATE,
        // SAFETY: one byte into a buffer of 2 × sizeof(CK_ATTRIBUTE) + 1 bytes.
        pValue: unsafe { bytes.as_mut_ptr().add(1) }.cast(),
        ulValueLen: 2 * ATTR,
    };
    assert_eq!(get_raw(h, key, &mut a), CKR_OK);
    // SAFETY: the module wrote two CK_ATTRIBUTEs there; read them without assuming alignment.
    let read: Vec<CK_ATTRIBUTE> = (0..2)
        .map(|i| unsafe { std::ptr::read_unaligned(bytes.as_ptr().add(1).cast::<CK_ATTRIBUTE>().add(i)) })
        .collect();
    let mut got: Vec<_> = read.iter().map(|i| (i.type_, i.ulValueLen)).collect();
    got.sort();
    assert_eq!(got, [(CKA_LABEL, 3), (CKA_EXTRACTABLE, 1)]);
    // An attribute array the key does not restrict: empty.
    let mut u = [CK_ATTRIBUTE { type_: CKA_UNWRAP_TEMPLATE, pValue: null_mut(), ulValueLen: 0 }];
    assert_eq!(get_raw(h, key, &mut u), CKR_OK);
    assert_eq!(u[0].ulValueLen, 0);
    // CKA_ALLOWED_MECHANISMS is plain bytes, n × sizeof(CK_MECHANISM_TYPE), not an attribute array.
    assert_eq!(
        raw.get(h, key, CKA_ALLOWED_MECHANISMS),
        (CKR_OK, Some(ulongs(&[CKM_AES_KEY_WRAP, CKM_AES_KEY_WRAP_PAD])))
    );
    let mut small = [0u8; 8];
    let mut b = [CK_ATTRIBUTE { type_: CKA_ALLOWED_MECHANISMS, pValue: small.as_mut_ptr().cast(), ulValueLen: 8 }];
    assert_eq!(get_raw(h, key, &mut b), CKR_BUFFER_TOO_SMALL);
    assert_eq!(b[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    match s.get_attributes(oh(key), &[AttributeType::AllowedMechanisms]).unwrap().pop() {
        Some(Attribute::AllowedMechanisms(m)) => {
            assert_eq!(m, [MechanismType::AES_KEY_WRAP, MechanismType::AES_KEY_WRAP_PAD])
        }
        other => panic!("{other:?}"),
    }
    // Both kinds in one call, with an attribute the key does not have.
    let mut mechs = [0u8; 16];
    let mut arr = [empty(), empty()];
    let mut t = [
        CK_ATTRIBUTE { type_: CKA_ALLOWED_MECHANISMS, pValue: mechs.as_mut_ptr().cast(), ulValueLen: 16 },
        CK_ATTRIBUTE { type_: CKA_MODULUS, pValue: null_mut(), ulValueLen: 0 },
        CK_ATTRIBUTE { type_: CKA_WRAP_TEMPLATE, pValue: arr.as_mut_ptr().cast(), ulValueLen: 2 * ATTR },
    ];
    assert_eq!(get_raw(h, key, &mut t), CKR_ATTRIBUTE_TYPE_INVALID);
    assert_eq!(t.map(|a| a.ulValueLen), [16, CK_UNAVAILABLE_INFORMATION, 2 * ATTR]);
    assert_eq!(mechs.to_vec(), ulongs(&[CKM_AES_KEY_WRAP, CKM_AES_KEY_WRAP_PAD]));
    assert!(arr.iter().all(|i| i.type_ != 0 && i.ulValueLen != 0));
}

/// A raw attribute for the hostile templates: any pointer, any length.
fn attr(type_: CK_ATTRIBUTE_TYPE, p: *mut std::ffi::c_void, len: CK_ULONG) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE { type_, pValue: p, ulValueLen: len }
}

#[test]
fn malformed_templates_are_refused_never_a_crash() {
    let (_dir, m) = setup("hostile");
    let s = user_session(m.p11());
    let h = s.handle();
    let raw = Raw::new();
    let f = functions();
    let kek = raw
        .create(
            h,
            &[
                (CKA_CLASS, ul(CKO_SECRET_KEY)),
                (CKA_KEY_TYPE, ul(CKK_AES)),
                (CKA_VALUE, by(&[3; 16])),
                (CKA_WRAP, bl(true)),
                (CKA_UNWRAP, bl(true)),
            ],
        )
        .unwrap();
    let target = raw
        .create(
            h,
            &[
                (CKA_CLASS, ul(CKO_SECRET_KEY)),
                (CKA_KEY_TYPE, ul(CKK_AES)),
                (CKA_VALUE, by(&[4; 16])),
                (CKA_EXTRACTABLE, bl(true)),
            ],
        )
        .unwrap();
    let wrapped = raw.wrap(h, CKM_AES_KEY_WRAP, kek, target).unwrap();
    let mut label = *b"label";
    let lp = label.as_mut_ptr().cast();
    let mut element = [attr(CKA_LABEL, lp, 5)];
    let ep = element.as_mut_ptr().cast();
    let mut null_element = [attr(CKA_LABEL, null_mut(), 5)];
    let mut huge_element = [attr(CKA_LABEL, lp, 1 << 40)];
    let mut nested = [attr(CKA_WRAP_TEMPLATE, ep, ATTR)];
    let mut mechanisms = [0u8; 16];
    let mp = mechanisms.as_mut_ptr().cast();
    let mut mechanism_element = [attr(CKA_ALLOWED_MECHANISMS, mp, 7)];
    let cases: Vec<(&str, CK_ATTRIBUTE)> = vec![
        ("NULL value with a length", attr(CKA_LABEL, null_mut(), 5)),
        ("CK_UNAVAILABLE_INFORMATION length", attr(CKA_LABEL, lp, CK_UNAVAILABLE_INFORMATION)),
        ("huge length", attr(CKA_LABEL, lp, 1 << 40)),
        ("array length not a whole number of CK_ATTRIBUTEs", attr(CKA_WRAP_TEMPLATE, ep, ATTR + 1)),
        ("array shorter than one CK_ATTRIBUTE", attr(CKA_WRAP_TEMPLATE, ep, 7)),
        ("NULL array with a length", attr(CKA_UNWRAP_TEMPLATE, null_mut(), ATTR)),
        ("huge array", attr(CKA_UNWRAP_TEMPLATE, ep, ATTR << 40)),
        (
            "array element with a NULL value and a length",
            attr(CKA_WRAP_TEMPLATE, null_element.as_mut_ptr().cast(), ATTR),
        ),
        ("array element with a huge length", attr(CKA_WRAP_TEMPLATE, huge_element.as_mut_ptr().cast(), ATTR)),
        ("arrays nested two levels", attr(CKA_UNWRAP_TEMPLATE, nested.as_mut_ptr().cast(), ATTR)),
        ("mechanism list of 7 bytes", attr(CKA_ALLOWED_MECHANISMS, mp, 7)),
        (
            "array element: a mechanism list of 7 bytes",
            attr(CKA_UNWRAP_TEMPLATE, mechanism_element.as_mut_ptr().cast(), ATTR),
        ),
        ("mechanism list of 12 bytes", attr(CKA_ALLOWED_MECHANISMS, mp, 12)),
    ];
    let mut class = CKO_SECRET_KEY.to_ne_bytes();
    let mut key_type = CKK_AES.to_ne_bytes();
    let mut value = [5u8; 16];
    let mut len = CK_ULONG::to_ne_bytes(16);
    for (what, bad) in &cases {
        let base = [attr(CKA_CLASS, class.as_mut_ptr().cast(), 8), attr(CKA_KEY_TYPE, key_type.as_mut_ptr().cast(), 8)];
        let mut created = base.to_vec();
        created.extend([attr(CKA_VALUE, value.as_mut_ptr().cast(), 16), *bad]);
        let mut obj = 0;
        // SAFETY: the template points to live buffers, except for the lengths and NULLs under test, which
        // the module must refuse before reading.
        let r = unsafe { f.C_CreateObject.unwrap()(h, created.as_mut_ptr(), created.len() as CK_ULONG, &mut obj) };
        assert_eq!(r, CKR_ATTRIBUTE_VALUE_INVALID, "C_CreateObject, {what}");
        let mut generated = vec![attr(CKA_VALUE_LEN, len.as_mut_ptr().cast(), 8), *bad];
        let mut mech = CK_MECHANISM { mechanism: CKM_AES_KEY_GEN, pParameter: null_mut(), ulParameterLen: 0 };
        // SAFETY: as above.
        let r = unsafe { f.C_GenerateKey.unwrap()(h, &mut mech, generated.as_mut_ptr(), 2, &mut obj) };
        assert_eq!(r, CKR_ATTRIBUTE_VALUE_INVALID, "C_GenerateKey, {what}");
        let mut unwrapped = base.to_vec();
        unwrapped.push(*bad);
        let mut mech = CK_MECHANISM { mechanism: CKM_AES_KEY_WRAP, pParameter: null_mut(), ulParameterLen: 0 };
        let mut w = wrapped.clone();
        // SAFETY: as above.
        let r = unsafe {
            f.C_UnwrapKey.unwrap()(
                h,
                &mut mech,
                kek,
                w.as_mut_ptr(),
                w.len() as CK_ULONG,
                unwrapped.as_mut_ptr(),
                3,
                &mut obj,
            )
        };
        assert_eq!(r, CKR_ATTRIBUTE_VALUE_INVALID, "C_UnwrapKey, {what}");
        let mut one = [*bad];
        // SAFETY: as above.
        let r = unsafe { f.C_FindObjectsInit.unwrap()(h, one.as_mut_ptr(), 1) };
        assert_eq!(r, CKR_ATTRIBUTE_VALUE_INVALID, "C_FindObjectsInit, {what}");
        // SAFETY: as above.
        let r = unsafe { f.C_SetAttributeValue.unwrap()(h, target, one.as_mut_ptr(), 1) };
        assert_eq!(r, CKR_ATTRIBUTE_VALUE_INVALID, "C_SetAttributeValue, {what}");
        // SAFETY: as above.
        let r = unsafe { f.C_CopyObject.unwrap()(h, target, one.as_mut_ptr(), 1, &mut obj) };
        assert_eq!(r, CKR_ATTRIBUTE_VALUE_INVALID, "C_CopyObject, {what}");
    }
    // A key pair template too.
    let mut params = P256.to_vec();
    let mut public = [attr(CKA_EC_PARAMS, params.as_mut_ptr().cast(), params.len() as CK_ULONG)];
    let mut private = [cases[4].1];
    let mut mech = CK_MECHANISM { mechanism: CKM_EC_KEY_PAIR_GEN, pParameter: null_mut(), ulParameterLen: 0 };
    let (mut a, mut b) = (0, 0);
    // SAFETY: as above.
    let r = unsafe {
        f.C_GenerateKeyPair.unwrap()(h, &mut mech, public.as_mut_ptr(), 1, private.as_mut_ptr(), 1, &mut a, &mut b)
    };
    assert_eq!(r, CKR_ATTRIBUTE_VALUE_INVALID);
    // C_GetAttributeValue: a template that cannot be the caller's memory is CKR_ARGUMENTS_BAD.
    let mut t = [attr(CKA_LABEL, null_mut(), 0); 2];
    for count in [CK_UNAVAILABLE_INFORMATION, 1 << 62] {
        // SAFETY: the count is refused before the array is read.
        assert_eq!(unsafe { f.C_GetAttributeValue.unwrap()(h, target, t.as_mut_ptr(), count) }, CKR_ARGUMENTS_BAD);
    }
    // SAFETY: as above; a NULL template with a count.
    assert_eq!(unsafe { f.C_GetAttributeValue.unwrap()(h, target, null_mut(), 1) }, CKR_ARGUMENTS_BAD);
    let mut bytes = vec![0u8; 3 * ATTR as usize];
    // SAFETY: a misaligned template is refused before it is read.
    let odd = unsafe { bytes.as_mut_ptr().add(1) }.cast::<CK_ATTRIBUTE>();
    // SAFETY: as above.
    assert_eq!(unsafe { f.C_GetAttributeValue.unwrap()(h, target, odd, 1) }, CKR_ARGUMENTS_BAD);
    // SAFETY: as above.
    assert_eq!(unsafe { f.C_CreateObject.unwrap()(h, odd, 1, &mut a) }, CKR_ARGUMENTS_BAD);
    // Huge buffer lengths with a real buffer are only room to spare: the value is copied.
    let mut buf = [0u8; 16];
    let mut big = [attr(CKA_VALUE, buf.as_mut_ptr().cast(), CK_UNAVAILABLE_INFORMATION)];
    assert_eq!(get_raw(h, target, &mut big), CKR_OK);
    assert_eq!((big[0].ulValueLen, buf), (16, [4; 16]));
    // The module is unharmed.
    let label_only = [(CKA_CLASS, ul(CKO_DATA)), (CKA_LABEL, by(b"after"))];
    let d = raw.create(h, &label_only).unwrap();
    assert_eq!(raw.get(h, d, CKA_LABEL), (CKR_OK, Some(b"after".to_vec())));
}

#[test]
fn allowed_mechanisms_unwrap_templates_and_trust_still_hold() {
    let (_dir, m) = setup("keep-working");
    let p11 = m.p11();
    let raw = Raw::new();
    // CKA_TRUSTED: true only by the SO.
    let so = p11.open_rw_session(slot(p11, 0)).unwrap();
    so.login(UserType::So, Some(&pin(SO_PIN))).unwrap();
    let trusted = raw
        .create(
            so.handle(),
            &[
                (CKA_CLASS, ul(CKO_SECRET_KEY)),
                (CKA_KEY_TYPE, ul(CKK_AES)),
                (CKA_VALUE, by(&[9; 32])),
                (CKA_PRIVATE, bl(false)),
                (CKA_TOKEN, bl(true)),
                (CKA_TRUSTED, bl(true)),
                (CKA_WRAP, bl(true)),
                (CKA_UNWRAP, bl(true)),
                (CKA_ALLOWED_MECHANISMS, V::B(ulongs(&[CKM_AES_KEY_WRAP_PAD]))),
                (CKA_UNWRAP_TEMPLATE, V::T(vec![(CKA_SENSITIVE, vec![1]), (CKA_LABEL, b"in".to_vec())])),
            ],
        )
        .unwrap();
    so.logout().unwrap();
    drop(so);
    let s = user_session(p11);
    let h = s.handle();
    let aes = |extra: &[(CK_ATTRIBUTE_TYPE, V)]| {
        let mut t = vec![(CKA_CLASS, ul(CKO_SECRET_KEY)), (CKA_KEY_TYPE, ul(CKK_AES)), (CKA_VALUE, by(&[1; 16]))];
        t.extend(extra.iter().map(|(ty, v)| (*ty, copy_v(v))));
        t
    };
    assert_eq!(raw.create(h, &aes(&[(CKA_TRUSTED, bl(true))])), Err(CKR_ATTRIBUTE_READ_ONLY));
    let untrusted = raw.create(h, &aes(&[(CKA_WRAP, bl(true))])).unwrap();
    assert_eq!(raw.set(h, untrusted, &[(CKA_TRUSTED, bl(true))]), CKR_ATTRIBUTE_READ_ONLY);
    // CKA_WRAP_WITH_TRUSTED: only a trusted key wraps it.
    let guarded = raw.create(h, &aes(&[(CKA_EXTRACTABLE, bl(true)), (CKA_WRAP_WITH_TRUSTED, bl(true))])).unwrap();
    assert_eq!(raw.wrap(h, CKM_AES_KEY_WRAP_PAD, untrusted, guarded), Err(CKR_KEY_NOT_WRAPPABLE));
    // CKA_ALLOWED_MECHANISMS: other mechanisms are refused.
    assert_eq!(raw.wrap(h, CKM_AES_KEY_WRAP, trusted, guarded), Err(CKR_MECHANISM_INVALID));
    let wrapped = raw.wrap(h, CKM_AES_KEY_WRAP_PAD, trusted, guarded).unwrap();
    // The unwrap template: every attribute, with its value, in the caller's template.
    let base = [(CKA_CLASS, ul(CKO_SECRET_KEY)), (CKA_KEY_TYPE, ul(CKK_AES))];
    let with = |extra: &[(CK_ATTRIBUTE_TYPE, V)]| {
        let mut t: Vec<_> = base.iter().map(|(ty, v)| (*ty, copy_v(v))).collect();
        t.extend(extra.iter().map(|(ty, v)| (*ty, copy_v(v))));
        t
    };
    for partial in
        [with(&[]), with(&[(CKA_SENSITIVE, bl(true))]), with(&[(CKA_SENSITIVE, bl(true)), (CKA_LABEL, by(b"other"))])]
    {
        assert_eq!(raw.unwrap(h, CKM_AES_KEY_WRAP_PAD, trusted, &wrapped, &partial), Err(CKR_TEMPLATE_INCONSISTENT));
    }
    let full = with(&[(CKA_SENSITIVE, bl(true)), (CKA_LABEL, by(b"in")), (CKA_ENCRYPT, bl(true))]);
    let k = raw.unwrap(h, CKM_AES_KEY_WRAP_PAD, trusted, &wrapped, &full).unwrap();
    assert_eq!(raw.get(h, k, CKA_VALUE).0, CKR_ATTRIBUTE_SENSITIVE);
    assert_eq!(raw.get(h, k, CKA_LABEL), (CKR_OK, Some(b"in".to_vec())));
    // A key restricted to one mechanism, made through cryptoki's typed attribute.
    let ecb_only = s
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Value(vec![1; 16]),
            Attribute::Encrypt(true),
            Attribute::AllowedMechanisms(vec![MechanismType::AES_ECB]),
        ])
        .unwrap();
    assert_eq!(s.encrypt(&Mechanism::AesEcb, ecb_only, &[0; 16]).unwrap().len(), 16);
    assert_eq!(rv(s.encrypt(&Mechanism::AesCbc([0; 16]), ecb_only, &[0; 16])), CKR_MECHANISM_INVALID);
    // It is set at creation only.
    assert_eq!(
        raw.set(h, ecb_only.handle(), &[(CKA_ALLOWED_MECHANISMS, V::B(ulongs(&[CKM_AES_CBC])))]),
        CKR_ATTRIBUTE_READ_ONLY
    );
}
