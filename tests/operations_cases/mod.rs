//! Everyday PKCS#11 work through the shim, with cryptoki as the application, against the backend of the
//! test binary (tests/operations.rs: SoftHSM2, tests/operations_cssim.rs: the simulator): information equal
//! to the backend direct, PINs and login, key generation, sign/verify, encrypt/decrypt, digests, multi-part
//! operations, wrap/unwrap, ECDH, object search, attributes, copy/destroy, random, and threads.
//!
//! Most tests share one token with keys made once ([`keys`]); a session of that token stays open and
//! logged in for the whole run, so no test may log out of it. Tests that change PINs or log out use
//! tokens of their own.

use crate::common::{self, backend, backend_path, functions, new_token, pkcs11, shim_path, user_session, Backend};
use crate::common::{SO_PIN, USER_PIN};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use cryptoki_sys::*;
use std::sync::OnceLock;

const P256_OID: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
const P384_OID: &[u8] = &[0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22];

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn pin(p: &str) -> AuthPin {
    AuthPin::new(p.into())
}

/// Asserts that `result` failed with `expected`.
#[track_caller]
fn assert_rv<T: std::fmt::Debug>(result: cryptoki::error::Result<T>, expected: RvError) {
    match result {
        Err(Error::Pkcs11(rv, _)) => assert_eq!(rv, expected),
        other => panic!("expected {expected:?}, got {other:?}"),
    }
}

/// The value of one attribute, as cryptoki decodes it.
fn attr(s: &Session, h: ObjectHandle, t: AttributeType) -> Attribute {
    let mut v = s.get_attributes(h, &[t]).expect("C_GetAttributeValue");
    assert_eq!(v.len(), 1, "attribute {t:?} unavailable");
    v.remove(0)
}

fn bytes(s: &Session, h: ObjectHandle, t: AttributeType) -> Vec<u8> {
    match attr(s, h, t) {
        Attribute::Value(v)
        | Attribute::Label(v)
        | Attribute::Application(v)
        | Attribute::Id(v)
        | Attribute::Modulus(v)
        | Attribute::PublicExponent(v)
        | Attribute::EcParams(v)
        | Attribute::EcPoint(v) => v,
        other => panic!("not a byte attribute: {other:?}"),
    }
}

fn ec_point(s: &Session, public: ObjectHandle) -> Vec<u8> {
    bytes(s, public, AttributeType::EcPoint)
}

/// The keys most tests use, on the token "operations-keys", made once.
struct Keys {
    slot: Slot,
    rsa_pub: ObjectHandle,
    rsa_priv: ObjectHandle,
    ec256_pub: ObjectHandle,
    ec256_priv: ObjectHandle,
    ec384_pub: ObjectHandle,
    ec384_priv: ObjectHandle,
    /// AES-256, not extractable; encrypts and wraps.
    aes: ObjectHandle,
    /// Generic secret of 32 bytes, extractable; HMAC.
    generic: ObjectHandle,
}

fn ec_pair(s: &Session, oid: &[u8], label: &str) -> (ObjectHandle, ObjectHandle) {
    s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[
            Attribute::Token(true),
            Attribute::EcParams(oid.to_vec()),
            Attribute::Verify(true),
            Attribute::Label(label.into()),
            Attribute::Id(label.into()),
        ],
        &[
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(true),
            Attribute::Sign(true),
            Attribute::Label(label.into()),
            Attribute::Id(label.into()),
        ],
    )
    .unwrap_or_else(|e| panic!("C_GenerateKeyPair EC {label}: {e}"))
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let slot = new_token("operations-keys");
        let s = user_session(slot);
        let (rsa_pub, rsa_priv) = s
            .generate_key_pair(
                &Mechanism::RsaPkcsKeyPairGen,
                &[
                    Attribute::Token(true),
                    Attribute::ModulusBits(2048.into()),
                    Attribute::PublicExponent(vec![1, 0, 1]),
                    Attribute::Verify(true),
                    Attribute::Encrypt(true),
                    Attribute::Label("rsa".into()),
                    Attribute::Id(vec![0xAA, 1]),
                ],
                &[
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(true),
                    Attribute::Sign(true),
                    Attribute::Decrypt(true),
                    Attribute::Label("rsa".into()),
                    Attribute::Id(vec![0xAA, 1]),
                ],
            )
            .expect("C_GenerateKeyPair RSA-2048");
        let (ec256_pub, ec256_priv) = ec_pair(&s, P256_OID, "ec256");
        let (ec384_pub, ec384_priv) = ec_pair(&s, P384_OID, "ec384");
        let aes = s
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Token(true),
                    Attribute::ValueLen(32.into()),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Wrap(true),
                    Attribute::Unwrap(true),
                    Attribute::Extractable(false),
                    Attribute::Label("aes".into()),
                ],
            )
            .expect("C_GenerateKey AES-256");
        let generic = s
            .generate_key(
                &Mechanism::GenericSecretKeyGen,
                &[
                    Attribute::Token(true),
                    Attribute::ValueLen(32.into()),
                    Attribute::Sign(true),
                    Attribute::Verify(true),
                    Attribute::Extractable(true),
                    Attribute::Label("generic".into()),
                ],
            )
            .expect("C_GenerateKey generic secret");
        // Keep this session open for the whole run: the token stays logged in for every test's sessions.
        std::mem::forget(s);
        Keys { slot, rsa_pub, rsa_priv, ec256_pub, ec256_priv, ec384_pub, ec384_priv, aes, generic }
    })
}

fn session() -> Session {
    user_session(keys().slot)
}

// ---------------------------------------------------------------------------------------------------
// Information: the shim's own C_GetInfo, and everything else equal to the backend direct.

/// A PKCS#11 blank-padded string as text.
fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end().to_string()
}

#[test]
fn library_info_is_the_shims_and_names_the_backend() {
    let info = pkcs11().get_library_info().expect("C_GetInfo");
    assert_eq!(info.manufacturer_id(), "p11shim");
    assert_eq!(info.library_description(), backend().shim_description(), "p11shim/<backend manufacturer>");
    assert_eq!((info.library_version().major(), info.library_version().minor()), (0, 1));

    let shim = functions(&shim_path());
    let direct = functions(&backend_path());
    let mut a: CK_INFO = Default::default();
    let mut b: CK_INFO = Default::default();
    // SAFETY: valid out pointers; the library is initialized (pkcs11() above).
    let (ra, rb) = unsafe { (shim.C_GetInfo.unwrap()(&mut a), direct.C_GetInfo.unwrap()(&mut b)) };
    assert_eq!((ra, rb), (CKR_OK, CKR_OK));
    assert_eq!(
        (a.cryptokiVersion.major, a.cryptokiVersion.minor),
        (b.cryptokiVersion.major, b.cryptokiVersion.minor),
        "the shim must report the backend's cryptoki version"
    );
    assert_eq!(a.flags, b.flags);
    assert_eq!(text(&a.manufacturerID), "p11shim");
    assert_eq!(a.manufacturerID.len(), 32);
    assert!(a.manufacturerID[7..].iter().all(|&c| c == b' '), "blank padded");
    assert!(a.libraryDescription.iter().all(|&c| c != 0), "blank padded, no NUL");
    // SAFETY: NULL is an invalid out pointer the spec says to refuse.
    let rv = unsafe { shim.C_GetInfo.unwrap()(std::ptr::null_mut()) };
    assert_eq!(rv, CKR_ARGUMENTS_BAD);
}

/// Runs `direct`, `shim`, `direct` until the two direct answers agree (other tests may be adding
/// tokens or sessions meanwhile), then asserts the shim's answer equals them.
fn assert_same<T: PartialEq + std::fmt::Debug>(what: &str, direct: impl Fn() -> T, shim: impl Fn() -> T) {
    for _ in 0..20 {
        let d1 = direct();
        let s = shim();
        let d2 = direct();
        if d1 == d2 {
            assert_eq!(s, d1, "{what}: through the shim vs the backend direct");
            return;
        }
    }
    panic!("{what}: the backend's own answer kept changing");
}

/// C_GetSlotList as (rv, slots).
fn slot_list(f: &CK_FUNCTION_LIST, present: CK_BBOOL) -> (CK_RV, Vec<CK_SLOT_ID>) {
    let mut n: CK_ULONG = 0;
    // SAFETY: NULL list asks for the count; valid out pointer.
    let rv = unsafe { f.C_GetSlotList.unwrap()(present, std::ptr::null_mut(), &mut n) };
    if rv != CKR_OK {
        return (rv, vec![]);
    }
    let mut v = vec![0; n as usize + 4];
    n = v.len() as CK_ULONG;
    // SAFETY: `v` has room for `n` ids.
    let rv = unsafe { f.C_GetSlotList.unwrap()(present, v.as_mut_ptr(), &mut n) };
    v.truncate(n as usize);
    (rv, v)
}

fn slot_info(f: &CK_FUNCTION_LIST, slot: CK_SLOT_ID) -> (CK_RV, String) {
    let mut i: CK_SLOT_INFO = Default::default();
    // SAFETY: valid out pointer.
    let rv = unsafe { f.C_GetSlotInfo.unwrap()(slot, &mut i) };
    let s = format!(
        "{:?}|{:?}|{:x}|{}.{}|{}.{}",
        text(&i.slotDescription),
        text(&i.manufacturerID),
        i.flags,
        i.hardwareVersion.major,
        i.hardwareVersion.minor,
        i.firmwareVersion.major,
        i.firmwareVersion.minor
    );
    (rv, s)
}

fn token_info(f: &CK_FUNCTION_LIST, slot: CK_SLOT_ID) -> (CK_RV, String) {
    let mut i: CK_TOKEN_INFO = Default::default();
    // SAFETY: valid out pointer.
    let rv = unsafe { f.C_GetTokenInfo.unwrap()(slot, &mut i) };
    let s = format!(
        "{:?}|{:?}|{:?}|{:?}|{:x}|{}/{}|{}/{}|{}..{}|{}/{}|{}/{}|{}.{}|{}.{}|{:?}",
        i.label,
        i.manufacturerID,
        i.model,
        i.serialNumber,
        i.flags,
        i.ulMaxSessionCount,
        i.ulSessionCount,
        i.ulMaxRwSessionCount,
        i.ulRwSessionCount,
        i.ulMinPinLen,
        i.ulMaxPinLen,
        i.ulTotalPublicMemory,
        i.ulFreePublicMemory,
        i.ulTotalPrivateMemory,
        i.ulFreePrivateMemory,
        i.hardwareVersion.major,
        i.hardwareVersion.minor,
        i.firmwareVersion.major,
        i.firmwareVersion.minor,
        i.utcTime
    );
    (rv, s)
}

fn mechanism_list(f: &CK_FUNCTION_LIST, slot: CK_SLOT_ID) -> (CK_RV, Vec<CK_MECHANISM_TYPE>) {
    let mut n: CK_ULONG = 0;
    // SAFETY: NULL list asks for the count.
    let rv = unsafe { f.C_GetMechanismList.unwrap()(slot, std::ptr::null_mut(), &mut n) };
    if rv != CKR_OK {
        return (rv, vec![]);
    }
    let mut v = vec![0; n as usize];
    // SAFETY: `v` has room for `n` entries.
    let rv = unsafe { f.C_GetMechanismList.unwrap()(slot, v.as_mut_ptr(), &mut n) };
    v.truncate(n as usize);
    (rv, v)
}

fn mechanism_info(
    f: &CK_FUNCTION_LIST,
    slot: CK_SLOT_ID,
    m: CK_MECHANISM_TYPE,
) -> (CK_RV, CK_ULONG, CK_ULONG, CK_FLAGS) {
    let mut i: CK_MECHANISM_INFO = Default::default();
    // SAFETY: valid out pointer.
    let rv = unsafe { f.C_GetMechanismInfo.unwrap()(slot, m, &mut i) };
    (rv, i.ulMinKeySize, i.ulMaxKeySize, i.flags)
}

#[test]
fn slot_token_and_mechanism_information_equal_backend_direct() {
    let slot = keys().slot.id();
    let shim = functions(&shim_path());
    let direct = functions(&backend_path());

    for present in [CK_FALSE, CK_TRUE] {
        assert_same("C_GetSlotList", || slot_list(direct, present), || slot_list(shim, present));
    }
    let (_, slots) = slot_list(direct, CK_FALSE);
    assert!(slots.contains(&slot), "the keys' token is listed");
    for s in slots.iter().copied().chain([0xDEAD_BEEF]) {
        assert_same("C_GetSlotInfo", || slot_info(direct, s), || slot_info(shim, s));
        assert_same("C_GetTokenInfo", || token_info(direct, s), || token_info(shim, s));
    }
    assert_eq!(slot_info(shim, 0xDEAD_BEEF).0, CKR_SLOT_ID_INVALID);

    let (rv, mechs) = mechanism_list(direct, slot);
    assert_eq!(rv, CKR_OK);
    assert!(mechs.len() > 20, "the backends have many mechanisms: {mechs:?}");
    assert_eq!(mechanism_list(shim, slot), (CKR_OK, mechs.clone()));
    for &m in mechs.iter().chain(&[CKM_VENDOR_DEFINED | 0x1234]) {
        assert_eq!(mechanism_info(shim, slot, m), mechanism_info(direct, slot, m), "C_GetMechanismInfo(0x{m:x})");
    }
    assert_eq!(mechanism_info(shim, slot, CKM_VENDOR_DEFINED | 0x1234).0, CKR_MECHANISM_INVALID);

    // The count protocol: a too small buffer gives CKR_BUFFER_TOO_SMALL and the needed count.
    let mut one = [0 as CK_MECHANISM_TYPE; 1];
    let mut n: CK_ULONG = 1;
    // SAFETY: `one` has room for 1 entry.
    let rv = unsafe { shim.C_GetMechanismList.unwrap()(slot, one.as_mut_ptr(), &mut n) };
    assert_eq!((rv, n), (CKR_BUFFER_TOO_SMALL, mechs.len() as CK_ULONG));

    // And cryptoki reads the same through the shim (it leaves out the mechanisms it has no name for).
    let via_cryptoki: Vec<CK_MECHANISM_TYPE> =
        pkcs11().get_mechanism_list(keys().slot).expect("C_GetMechanismList").iter().map(|m| **m).collect();
    let known: Vec<CK_MECHANISM_TYPE> = mechs.iter().copied().filter(|m| via_cryptoki.contains(m)).collect();
    assert_eq!(via_cryptoki, known);
    assert!(via_cryptoki.len() >= 30, "{via_cryptoki:?}");
    // DOMAIN.md: the RFC 5649 wrap of SoftHSM2 (and the simulator) is 0x210A; the wrap test relies on it.
    assert!(mechs.contains(&CKM_AES_KEY_WRAP_PAD), "CKM_AES_KEY_WRAP_PAD (0x210A) offered");
}

// ---------------------------------------------------------------------------------------------------
// Tokens, PINs, login.

#[test]
fn init_token_init_pin_set_pin_and_login() {
    let p = pkcs11();
    let slot = new_token("operations-pins");
    let info = p.get_token_info(slot).unwrap();
    assert!(info.token_initialized() && info.user_pin_initialized());
    assert_eq!(info.label(), "operations-pins");

    let s = p.open_rw_session(slot).unwrap();
    assert_eq!(s.get_session_info().unwrap().session_state(), SessionState::RwPublic);
    assert_rv(s.login(UserType::User, Some(&pin("wrong-pin"))), RvError::PinIncorrect);
    s.login(UserType::User, Some(&pin(USER_PIN))).unwrap();
    assert_eq!(s.get_session_info().unwrap().session_state(), SessionState::RwUser);
    assert_rv(s.login(UserType::User, Some(&pin(USER_PIN))), RvError::UserAlreadyLoggedIn);
    assert_rv(s.login(UserType::So, Some(&pin(SO_PIN))), RvError::UserAnotherAlreadyLoggedIn);

    // C_SetPIN by the user: the new PIN works, the old one is refused.
    s.set_pin(&pin(USER_PIN), &pin("user-pin-5678")).unwrap();
    s.logout().unwrap();
    // A C_Logout when nobody is logged in: the shim passes on the backend's answer. SoftHSM2 2.6.1 answers
    // CKR_OK, the simulator CKR_USER_NOT_LOGGED_IN (as the spec says).
    match backend() {
        Backend::SoftHsm2 => s.logout().unwrap(),
        Backend::Simulator => assert_rv(s.logout(), RvError::UserNotLoggedIn),
    }
    assert_rv(s.login(UserType::User, Some(&pin(USER_PIN))), RvError::PinIncorrect);
    s.login(UserType::User, Some(&pin("user-pin-5678"))).unwrap();
    s.logout().unwrap();

    // C_InitPIN by the SO resets the user PIN; C_SetPIN by the SO changes the SO PIN.
    s.login(UserType::So, Some(&pin(SO_PIN))).unwrap();
    assert_eq!(s.get_session_info().unwrap().session_state(), SessionState::RwSecurityOfficer);
    s.init_pin(&pin("user-pin-reset")).unwrap();
    s.set_pin(&pin(SO_PIN), &pin("so-pin-5678")).unwrap();
    s.logout().unwrap();
    assert_rv(s.login(UserType::User, Some(&pin("user-pin-5678"))), RvError::PinIncorrect);
    s.login(UserType::User, Some(&pin("user-pin-reset"))).unwrap();
    s.logout().unwrap();
    assert_rv(s.login(UserType::So, Some(&pin(SO_PIN))), RvError::PinIncorrect);
    s.login(UserType::So, Some(&pin("so-pin-5678"))).unwrap();
    s.logout().unwrap();

    // C_InitToken is refused while a session is open and with a wrong SO PIN; with the right one it
    // re-initializes the token (new label, user PIN gone).
    assert_rv(p.init_token(slot, &pin("so-pin-5678"), "operations-pins2"), RvError::SessionExists);
    s.close().unwrap();
    assert_rv(p.init_token(slot, &pin(SO_PIN), "operations-pins2"), RvError::PinIncorrect);
    p.init_token(slot, &pin("so-pin-5678"), "operations-pins2").unwrap();
    let slot2 = common::find_token("operations-pins2").expect("re-initialized token");
    let info = p.get_token_info(slot2).unwrap();
    assert!(info.token_initialized() && !info.user_pin_initialized());
    let s = p.open_rw_session(slot2).unwrap();
    assert_rv(s.login(UserType::User, Some(&pin("user-pin-reset"))), RvError::UserPinNotInitialized);
}

#[test]
fn login_state_is_per_token_and_close_all_sessions_logs_out() {
    let p = pkcs11();
    let slot = new_token("operations-login");
    let a = p.open_rw_session(slot).unwrap();
    let b = p.open_ro_session(slot).unwrap();
    a.login(UserType::User, Some(&pin(USER_PIN))).unwrap();
    assert_eq!(b.get_session_info().unwrap().session_state(), SessionState::RoUser);
    // A private object made in one session is visible in the other.
    let h = a
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Label("private-data".into()),
            Attribute::Value(vec![1, 2, 3]),
        ])
        .unwrap();
    assert_eq!(b.find_objects(&[Attribute::Label("private-data".into())]).unwrap(), vec![h]);
    b.logout().unwrap();
    assert_eq!(a.get_session_info().unwrap().session_state(), SessionState::RwPublic);
    assert!(a.find_objects(&[Attribute::Label("private-data".into())]).unwrap().is_empty());

    // C_CloseAllSessions closes both, and with the last session the login ends.
    a.login(UserType::User, Some(&pin(USER_PIN))).unwrap();
    let shim = functions(&shim_path());
    // SAFETY: no pointers.
    assert_eq!(unsafe { shim.C_CloseAllSessions.unwrap()(slot.id()) }, CKR_OK);
    let mut i: CK_SESSION_INFO = Default::default();
    // SAFETY: valid out pointer.
    let rv = unsafe { shim.C_GetSessionInfo.unwrap()(a.handle(), &mut i) };
    assert_eq!(rv, CKR_SESSION_HANDLE_INVALID);
    // SAFETY: valid out pointer.
    let rv = unsafe { shim.C_GetSessionInfo.unwrap()(b.handle(), &mut i) };
    assert_eq!(rv, CKR_SESSION_HANDLE_INVALID);
    std::mem::forget(a); // already closed
    std::mem::forget(b);
    let c = p.open_ro_session(slot).unwrap();
    assert_eq!(c.get_session_info().unwrap().session_state(), SessionState::RoPublic);
}

// ---------------------------------------------------------------------------------------------------
// Keys.

#[test]
fn generated_keys_have_the_requested_attributes() {
    let k = keys();
    let s = session();
    let class = |h| attr(&s, h, AttributeType::Class);
    let key_type = |h| attr(&s, h, AttributeType::KeyType);

    assert_eq!(class(k.rsa_pub), Attribute::Class(ObjectClass::PUBLIC_KEY));
    assert_eq!(class(k.rsa_priv), Attribute::Class(ObjectClass::PRIVATE_KEY));
    assert_eq!(key_type(k.rsa_priv), Attribute::KeyType(KeyType::RSA));
    assert_eq!(bytes(&s, k.rsa_pub, AttributeType::Modulus).len(), 256);
    assert_eq!(bytes(&s, k.rsa_pub, AttributeType::PublicExponent), vec![1, 0, 1]);
    assert_eq!(attr(&s, k.rsa_pub, AttributeType::ModulusBits), Attribute::ModulusBits(2048.into()));
    assert_eq!(bytes(&s, k.rsa_priv, AttributeType::Modulus), bytes(&s, k.rsa_pub, AttributeType::Modulus));
    assert_eq!(attr(&s, k.rsa_priv, AttributeType::Local), Attribute::Local(true));
    assert_eq!(attr(&s, k.rsa_priv, AttributeType::Sensitive), Attribute::Sensitive(true));

    for (public, private, oid, point_len) in
        [(k.ec256_pub, k.ec256_priv, P256_OID, 65), (k.ec384_pub, k.ec384_priv, P384_OID, 97)]
    {
        assert_eq!(key_type(private), Attribute::KeyType(KeyType::EC));
        assert_eq!(bytes(&s, public, AttributeType::EcParams), oid);
        assert_eq!(bytes(&s, private, AttributeType::EcParams), oid);
        // DER OCTET STRING around an uncompressed point.
        let point = ec_point(&s, public);
        assert_eq!(&point[..3], &[0x04, point_len as u8, 0x04]);
        assert_eq!(point.len(), 2 + point_len);
    }

    assert_eq!(key_type(k.aes), Attribute::KeyType(KeyType::AES));
    assert_eq!(attr(&s, k.aes, AttributeType::ValueLen), Attribute::ValueLen(32.into()));
    assert_eq!(class(k.generic), Attribute::Class(ObjectClass::SECRET_KEY));
    assert_eq!(key_type(k.generic), Attribute::KeyType(KeyType::GENERIC_SECRET));
    assert_eq!(bytes(&s, k.generic, AttributeType::Value).len(), 32);
}

// ---------------------------------------------------------------------------------------------------
// Sign and verify.

/// Signs, verifies, and checks that a tampered message fails with CKR_SIGNATURE_INVALID.
fn sign_verify(s: &Session, m: &Mechanism, private: ObjectHandle, public: ObjectHandle, data: &[u8]) -> Vec<u8> {
    let sig = s.sign(m, private, data).unwrap_or_else(|e| panic!("C_Sign {m:?}: {e}"));
    s.verify(m, public, data, &sig).unwrap_or_else(|e| panic!("C_Verify {m:?}: {e}"));
    let mut tampered = data.to_vec();
    tampered[0] ^= 1;
    assert_rv(s.verify(m, public, &tampered, &sig), RvError::SignatureInvalid);
    let mut bad_sig = sig.clone();
    *bad_sig.last_mut().unwrap() ^= 1;
    assert_rv(s.verify(m, public, data, &bad_sig), RvError::SignatureInvalid);
    sig
}

const DIGEST_INFO_SHA256: &str = "3031300d060960864801650304020105000420";

#[test]
fn rsa_pkcs1_and_pss_sign_verify() {
    let k = keys();
    let s = session();
    let data = b"message signed through the shim";

    let sig = sign_verify(&s, &Mechanism::Sha256RsaPkcs, k.rsa_priv, k.rsa_pub, data);
    assert_eq!(sig.len(), 256);
    // PKCS#1 v1.5 is deterministic, and opening the signature with the public key (raw RSA) shows
    // EMSA-PKCS1-v1_5 over SHA-256 of the message.
    assert_eq!(s.sign(&Mechanism::Sha256RsaPkcs, k.rsa_priv, data).unwrap(), sig);
    let digest = s.digest(&Mechanism::Sha256, data).unwrap();
    match backend() {
        Backend::SoftHsm2 => {
            let em = s.encrypt(&Mechanism::RsaX509, k.rsa_pub, &sig).unwrap();
            let mut expected = vec![0x00, 0x01];
            expected.resize(256 - 19 - 32 - 1, 0xFF);
            expected.push(0);
            expected.extend(hex(DIGEST_INFO_SHA256));
            expected.extend(&digest);
            assert_eq!(em, expected);
        }
        // The simulator has no raw RSA (CKM_RSA_X_509): refused as it would be directly.
        Backend::Simulator => assert_rv(s.encrypt(&Mechanism::RsaX509, k.rsa_pub, &sig), RvError::MechanismInvalid),
    }
    // CKM_RSA_PKCS over a DigestInfo gives the same signature.
    let mut digest_info = hex(DIGEST_INFO_SHA256);
    digest_info.extend(&digest);
    assert_eq!(sign_verify(&s, &Mechanism::RsaPkcs, k.rsa_priv, k.rsa_pub, &digest_info), sig);

    let pss = PkcsPssParams { hash_alg: MechanismType::SHA256, mgf: PkcsMgfType::MGF1_SHA256, s_len: 32.into() };
    let a = sign_verify(&s, &Mechanism::Sha256RsaPkcsPss(pss), k.rsa_priv, k.rsa_pub, data);
    let b = s.sign(&Mechanism::Sha256RsaPkcsPss(pss), k.rsa_priv, data).unwrap();
    assert_eq!(a.len(), 256);
    assert_ne!(a, b, "PSS signatures are salted");
    sign_verify(&s, &Mechanism::RsaPkcsPss(pss), k.rsa_priv, k.rsa_pub, &digest);
    // A PSS signature is not a PKCS#1 v1.5 one.
    assert_rv(s.verify(&Mechanism::Sha256RsaPkcs, k.rsa_pub, data, &a), RvError::SignatureInvalid);
}

#[test]
fn ecdsa_p256_and_p384_sign_verify() {
    // SoftHSM2 2.6.1 (Debian) has CKM_ECDSA only, no CKM_ECDSA_SHAxxx: the digest is made by C_Digest. The
    // simulator has both.
    let k = keys();
    let s = session();
    let data = b"ecdsa through the shim";
    let d256 = s.digest(&Mechanism::Sha256, data).unwrap();
    let d384 = s.digest(&Mechanism::Sha384, data).unwrap();
    let sig = sign_verify(&s, &Mechanism::Ecdsa, k.ec256_priv, k.ec256_pub, &d256);
    assert_eq!(sig.len(), 64);
    let again = s.sign(&Mechanism::Ecdsa, k.ec256_priv, &d256).unwrap();
    match backend() {
        Backend::SoftHsm2 => assert_ne!(again, sig, "SoftHSM2's ECDSA is randomized"),
        // RustCrypto's ecdsa uses deterministic nonces (RFC 6979).
        Backend::Simulator => assert_eq!(again, sig, "the simulator's ECDSA is deterministic (RFC 6979)"),
    }
    let sig384 = sign_verify(&s, &Mechanism::Ecdsa, k.ec384_priv, k.ec384_pub, &d384);
    assert_eq!(sig384.len(), 96);
    // A signature does not verify under another key.
    assert_rv(s.verify(&Mechanism::Ecdsa, k.ec384_pub, &d384, &sig), RvError::SignatureLenRange);
    let (other_pub, _) = s
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[Attribute::Token(false), Attribute::EcParams(P256_OID.to_vec())],
            &[Attribute::Token(false), Attribute::Sign(true)],
        )
        .unwrap();
    assert_rv(s.verify(&Mechanism::Ecdsa, other_pub, &d256, &sig), RvError::SignatureInvalid);
    // CKM_ECDSA_SHA256: SoftHSM2 lacks it and the shim refuses it as SoftHSM2 would directly; the simulator
    // has it, and it signs the SHA-256 digest the same as CKM_ECDSA.
    match backend() {
        Backend::SoftHsm2 => assert_rv(s.sign(&Mechanism::EcdsaSha256, k.ec256_priv, data), RvError::MechanismInvalid),
        Backend::Simulator => {
            let hashed = s.sign(&Mechanism::EcdsaSha256, k.ec256_priv, data).unwrap();
            s.verify(&Mechanism::Ecdsa, k.ec256_pub, &d256, &hashed).unwrap();
        }
    }
}

fn create_secret(s: &Session, value: &[u8], key_type: KeyType) -> ObjectHandle {
    s.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(key_type),
        Attribute::Token(false),
        Attribute::Value(value.to_vec()),
        Attribute::Sign(true),
        Attribute::Verify(true),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
    ])
    .expect("C_CreateObject secret key")
}

#[test]
fn hmac_sha256_known_answer_and_tamper() {
    let k = keys();
    let s = session();
    // RFC 4231 test case 6 (a key longer than the block; SoftHSM2 wants HMAC keys of 32 bytes or more).
    let key = create_secret(&s, &[0xAA; 131], KeyType::GENERIC_SECRET);
    let data = b"Test Using Larger Than Block-Size Key - Hash Key First";
    let mac = sign_verify(&s, &Mechanism::Sha256Hmac, key, key, data);
    assert_eq!(mac, hex("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"));

    let mac = sign_verify(&s, &Mechanism::Sha256Hmac, k.generic, k.generic, data);
    assert_eq!(mac.len(), 32);
    assert_ne!(mac, hex("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"));
    s.destroy_object(key).unwrap();
}

// ---------------------------------------------------------------------------------------------------
// Encrypt and decrypt.

#[test]
fn aes_gcm_known_answer_and_round_trip() {
    let k = keys();
    let s = session();
    // McGrew & Viega GCM test case 14: AES-256, zero key, zero IV, one zero block.
    let zero_key = create_secret(&s, &[0; 32], KeyType::AES);
    let mut iv = [0u8; 12];
    let ct =
        s.encrypt(&Mechanism::AesGcm(GcmParams::new(&mut iv, &[], 128.into()).unwrap()), zero_key, &[0; 16]).unwrap();
    assert_eq!(ct, hex("cea7403d4d606b6e074ec5d3baf39d18 d0d1c8a799996bf0265b98b5d48ab919"));
    s.destroy_object(zero_key).unwrap();

    let plain = b"AES-GCM through the shim, with additional data";
    let aad = b"header";
    let mut iv = [7u8; 12];
    let ct = s.encrypt(&Mechanism::AesGcm(GcmParams::new(&mut iv, aad, 128.into()).unwrap()), k.aes, plain).unwrap();
    assert_eq!(ct.len(), plain.len() + 16);
    let pt = s.decrypt(&Mechanism::AesGcm(GcmParams::new(&mut iv, aad, 128.into()).unwrap()), k.aes, &ct).unwrap();
    assert_eq!(pt, plain);
    // A tampered ciphertext or the wrong AAD fails authentication; SoftHSM2 2.6.1 reports that as
    // CKR_GENERAL_ERROR (not CKR_ENCRYPTED_DATA_INVALID), the simulator as CKR_ENCRYPTED_DATA_INVALID, and the
    // shim passes on the backend's answer.
    let auth_failure = match backend() {
        Backend::SoftHsm2 => RvError::GeneralError,
        Backend::Simulator => RvError::EncryptedDataInvalid,
    };
    let mut tampered = ct.clone();
    tampered[3] ^= 1;
    assert_rv(
        s.decrypt(&Mechanism::AesGcm(GcmParams::new(&mut iv, aad, 128.into()).unwrap()), k.aes, &tampered),
        auth_failure,
    );
    assert_rv(
        s.decrypt(&Mechanism::AesGcm(GcmParams::new(&mut iv, b"other", 128.into()).unwrap()), k.aes, &ct),
        auth_failure,
    );
    // The session is usable afterwards.
    let pt = s.decrypt(&Mechanism::AesGcm(GcmParams::new(&mut iv, aad, 128.into()).unwrap()), k.aes, &ct).unwrap();
    assert_eq!(pt, plain);
}

#[test]
fn aes_cbc_pad_and_rsa_oaep_round_trip() {
    let k = keys();
    let s = session();
    // FIPS 197 appendix C.3 through AES-ECB, and the same block through AES-CBC with a zero IV.
    let key = create_secret(&s, &hex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"), KeyType::AES);
    let block = hex("00112233445566778899aabbccddeeff");
    let expected = hex("8ea2b7ca516745bfeafc49904b496089");
    assert_eq!(s.encrypt(&Mechanism::AesEcb, key, &block).unwrap(), expected);
    assert_eq!(s.encrypt(&Mechanism::AesCbc([0; 16]), key, &block).unwrap(), expected);
    s.destroy_object(key).unwrap();

    let plain = b"thirty-seven bytes of AES-CBC-PAD....";
    assert_eq!(plain.len(), 37);
    let iv = [9u8; 16];
    let ct = s.encrypt(&Mechanism::AesCbcPad(iv), k.aes, plain).unwrap();
    assert_eq!(ct.len(), 48);
    assert_eq!(s.decrypt(&Mechanism::AesCbcPad(iv), k.aes, &ct).unwrap(), plain);
    // Another IV changes the first block.
    let ct2 = s.encrypt(&Mechanism::AesCbcPad([8; 16]), k.aes, plain).unwrap();
    assert_ne!(ct[..16], ct2[..16]);
    // CBC without padding refuses a partial block.
    assert_rv(s.encrypt(&Mechanism::AesCbc(iv), k.aes, plain), RvError::DataLenRange);

    // SoftHSM2 2.6.1 does OAEP with SHA-1 and MGF1-SHA1 only; the simulator with SHA-2 as well.
    let oaep = PkcsOaepParams::new(MechanismType::SHA1, PkcsMgfType::MGF1_SHA1, PkcsOaepSource::empty());
    let m = Mechanism::RsaPkcsOaep(oaep);
    let secret = b"a secret for RSA-OAEP";
    let ct = s.encrypt(&m, k.rsa_pub, secret).unwrap();
    assert_eq!(ct.len(), 256);
    assert_ne!(s.encrypt(&m, k.rsa_pub, secret).unwrap(), ct, "OAEP is randomized");
    assert_eq!(s.decrypt(&m, k.rsa_priv, &ct).unwrap(), secret);
    let mut bad = ct.clone();
    bad[100] ^= 1;
    assert!(s.decrypt(&m, k.rsa_priv, &bad).is_err(), "a corrupted OAEP ciphertext must fail");
    let sha256 = Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
        MechanismType::SHA256,
        PkcsMgfType::MGF1_SHA256,
        PkcsOaepSource::empty(),
    ));
    match backend() {
        Backend::SoftHsm2 => assert_rv(s.encrypt(&sha256, k.rsa_pub, secret), RvError::ArgumentsBad),
        // The simulator does OAEP with SHA-2 too.
        Backend::Simulator => {
            let ct = s.encrypt(&sha256, k.rsa_pub, secret).unwrap();
            assert_eq!(s.decrypt(&sha256, k.rsa_priv, &ct).unwrap(), secret);
        }
    }
}

#[test]
fn digests_known_answers() {
    let s = session();
    for (m, expected) in [
        (Mechanism::Sha1, "a9993e364706816aba3e25717850c26c9cd0d89d"),
        (Mechanism::Sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        (
            Mechanism::Sha512,
            "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
             2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
        ),
    ] {
        assert_eq!(s.digest(&m, b"abc").unwrap(), hex(expected), "{m:?}");
        s.digest_init(&m).unwrap();
        s.digest_update(b"a").unwrap();
        s.digest_update(b"").unwrap();
        s.digest_update(b"bc").unwrap();
        assert_eq!(s.digest_final().unwrap(), hex(expected), "multi-part {m:?}");
    }
}

// ---------------------------------------------------------------------------------------------------
// Multi-part operations.

#[test]
fn multi_part_sign_verify_encrypt_decrypt() {
    let k = keys();
    let s = session();
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
    let chunks = |n| data.chunks(n).collect::<Vec<_>>();

    for (m, private, public) in
        [(Mechanism::Sha256RsaPkcs, k.rsa_priv, k.rsa_pub), (Mechanism::Sha256Hmac, k.generic, k.generic)]
    {
        let single = s.sign(&m, private, &data).unwrap();
        s.sign_init(&m, private).unwrap();
        for c in chunks(97) {
            s.sign_update(c).unwrap();
        }
        assert_eq!(s.sign_final().unwrap(), single, "multi-part {m:?} equals single-part");
        s.verify_init(&m, public).unwrap();
        for c in chunks(300) {
            s.verify_update(c).unwrap();
        }
        s.verify_final(&single).unwrap();
        s.verify_init(&m, public).unwrap();
        s.verify_update(&data[1..]).unwrap();
        assert_rv(s.verify_final(&single), RvError::SignatureInvalid);
    }
    // RSA-PSS: multi-part signature, single-part verification.
    let pss = Mechanism::Sha256RsaPkcsPss(PkcsPssParams {
        hash_alg: MechanismType::SHA256,
        mgf: PkcsMgfType::MGF1_SHA256,
        s_len: 32.into(),
    });
    s.sign_init(&pss, k.rsa_priv).unwrap();
    for c in chunks(128) {
        s.sign_update(c).unwrap();
    }
    let sig = s.sign_final().unwrap();
    s.verify(&pss, k.rsa_pub, &data, &sig).unwrap();
    // C_SignUpdate without C_SignInit.
    assert_rv(s.sign_update(b"x"), RvError::OperationNotInitialized);

    let iv = [3u8; 16];
    let single = s.encrypt(&Mechanism::AesCbcPad(iv), k.aes, &data).unwrap();
    s.encrypt_init(&Mechanism::AesCbcPad(iv), k.aes).unwrap();
    let mut multi = Vec::new();
    for c in chunks(33) {
        multi.extend(s.encrypt_update(c).unwrap());
    }
    multi.extend(s.encrypt_final().unwrap());
    assert_eq!(multi, single);
    s.decrypt_init(&Mechanism::AesCbcPad(iv), k.aes).unwrap();
    let mut plain = Vec::new();
    for c in multi.chunks(50) {
        plain.extend(s.decrypt_update(c).unwrap());
    }
    plain.extend(s.decrypt_final().unwrap());
    assert_eq!(plain, data);

    let digest = s.digest(&Mechanism::Sha256, &data).unwrap();
    s.digest_init(&Mechanism::Sha256).unwrap();
    for c in chunks(10) {
        s.digest_update(c).unwrap();
    }
    assert_eq!(s.digest_final().unwrap(), digest);
}

// ---------------------------------------------------------------------------------------------------
// Wrap, unwrap, derive.

#[test]
fn wrap_and_unwrap_with_aes_key_wrap_pad() {
    let k = keys();
    let s = session();
    let m = Mechanism::AesKeyWrapPad;

    // A secret key: the unwrapped copy computes the same HMAC.
    let wrapped = s.wrap_key(&m, k.aes, k.generic).expect("C_WrapKey generic secret");
    assert_eq!(wrapped.len(), 40);
    let secret = s
        .unwrap_key(
            &m,
            k.aes,
            &wrapped,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Token(false),
                Attribute::Sign(true),
            ],
        )
        .expect("C_UnwrapKey generic secret");
    let data = b"wrapped and unwrapped";
    assert_eq!(
        s.sign(&Mechanism::Sha256Hmac, secret, data).unwrap(),
        s.sign(&Mechanism::Sha256Hmac, k.generic, data).unwrap()
    );

    // An EC private key (PKCS#8 inside; no CKA_EC_PARAMS in the template): the unwrapped key signs and
    // the original public key verifies.
    let wrapped = s.wrap_key(&m, k.aes, k.ec256_priv).expect("C_WrapKey EC private key");
    let ec = s
        .unwrap_key(
            &m,
            k.aes,
            &wrapped,
            &[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::EC),
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sign(true),
            ],
        )
        .expect("C_UnwrapKey EC private key");
    assert_eq!(bytes(&s, ec, AttributeType::EcParams), P256_OID);
    let sig = s.sign(&Mechanism::Ecdsa, ec, &[0x5A; 32]).unwrap();
    s.verify(&Mechanism::Ecdsa, k.ec256_pub, &[0x5A; 32], &sig).unwrap();

    // An RSA private key: PKCS#1 v1.5 is deterministic, so the signatures are equal.
    let wrapped = s.wrap_key(&m, k.aes, k.rsa_priv).expect("C_WrapKey RSA private key");
    let rsa = s
        .unwrap_key(
            &m,
            k.aes,
            &wrapped,
            &[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::RSA),
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sign(true),
            ],
        )
        .expect("C_UnwrapKey RSA private key");
    let sig = s.sign(&Mechanism::Sha256RsaPkcs, rsa, data).unwrap();
    assert_eq!(sig, s.sign(&Mechanism::Sha256RsaPkcs, k.rsa_priv, data).unwrap());
    s.verify(&Mechanism::Sha256RsaPkcs, k.rsa_pub, data, &sig).unwrap();

    // A key that is not extractable cannot be wrapped; garbage does not unwrap.
    assert_rv(s.wrap_key(&m, k.aes, k.aes), RvError::KeyUnextractable);
    let mut garbage = wrapped.clone();
    garbage[10] ^= 1;
    assert!(
        s.unwrap_key(
            &m,
            k.aes,
            &garbage,
            &[Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::KeyType(KeyType::RSA), Attribute::Token(false),],
        )
        .is_err(),
        "a corrupted wrapped key must not unwrap"
    );
    for h in [secret, ec, rsa] {
        s.destroy_object(h).unwrap();
    }
}

#[test]
fn ecdh_both_sides_derive_the_same_secret() {
    let s = session();
    let pair = || {
        s.generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[Attribute::Token(false), Attribute::EcParams(P256_OID.to_vec())],
            &[Attribute::Token(false), Attribute::Private(true), Attribute::Derive(true)],
        )
        .unwrap()
    };
    let (a_pub, a_priv) = pair();
    let (b_pub, b_priv) = pair();
    let a_point = ec_point(&s, a_pub);
    let b_point = ec_point(&s, b_pub);
    let derive = |private, peer: &[u8], template: &[Attribute]| {
        s.derive_key(&Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(EcKdf::null(), peer)), private, template)
            .expect("C_DeriveKey ECDH")
    };

    let readable = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ];
    let a = bytes(&s, derive(a_priv, &b_point, &readable), AttributeType::Value);
    let b = bytes(&s, derive(b_priv, &a_point, &readable), AttributeType::Value);
    assert_eq!(a.len(), 32);
    assert_eq!(a, b);

    // Sensitive AES keys: what one side encrypts the other decrypts.
    let aes = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
    ];
    let ka = derive(a_priv, &b_point, &aes);
    let kb = derive(b_priv, &a_point, &aes);
    let iv = [1u8; 16];
    let ct = s.encrypt(&Mechanism::AesCbcPad(iv), ka, b"agreed").unwrap();
    assert_eq!(s.decrypt(&Mechanism::AesCbcPad(iv), kb, &ct).unwrap(), b"agreed");
    // A third party's key derives something else.
    let (_, c_priv) = pair();
    let c = bytes(&s, derive(c_priv, &b_point, &readable), AttributeType::Value);
    assert_ne!(c, a);
}

// ---------------------------------------------------------------------------------------------------
// Objects and attributes.

#[test]
fn find_objects_by_label_id_and_class() {
    let k = keys();
    let s = session();
    let mut made = Vec::new();
    for i in 0..25u8 {
        made.push(
            s.create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(false),
                Attribute::Label("find-me".into()),
                Attribute::Application(vec![0x77, i]),
                Attribute::Value(vec![i; 4]),
            ])
            .unwrap(),
        );
    }
    // More results than one C_FindObjects call returns in cryptoki.
    let mut found = s.find_objects(&[Attribute::Label("find-me".into())]).unwrap();
    found.sort_by_key(|h| h.handle());
    let mut expected = made.clone();
    expected.sort_by_key(|h| h.handle());
    assert_eq!(found, expected);
    assert_eq!(s.find_objects(&[Attribute::Application(vec![0x77, 3])]).unwrap(), vec![made[3]]);
    assert_eq!(
        s.find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Label("find-me".into()),
            Attribute::Value(vec![7; 4])
        ])
        .unwrap(),
        vec![made[7]]
    );
    assert!(s.find_objects(&[Attribute::Label("operations-nothing".into())]).unwrap().is_empty());

    // Token keys by class and id / label.
    assert_eq!(
        s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::Id(vec![0xAA, 1])]).unwrap(),
        vec![k.rsa_priv]
    );
    assert_eq!(
        s.find_objects(&[Attribute::Class(ObjectClass::PUBLIC_KEY), Attribute::Label("rsa".into())]).unwrap(),
        vec![k.rsa_pub]
    );
    let mut ec = s.find_objects(&[Attribute::KeyType(KeyType::EC), Attribute::Token(true)]).unwrap();
    ec.sort_by_key(|h| h.handle());
    let mut expected = vec![k.ec256_pub, k.ec256_priv, k.ec384_pub, k.ec384_priv];
    expected.sort_by_key(|h| h.handle());
    assert_eq!(ec, expected);
    for h in made {
        s.destroy_object(h).unwrap();
    }
    assert!(s.find_objects(&[Attribute::Label("find-me".into())]).unwrap().is_empty());
}

/// One raw C_GetAttributeValue: for each (type, buffer length or None for a NULL pValue), the returned
/// ulValueLen and bytes.
type RawAttrs = (CK_RV, Vec<(CK_ULONG, Vec<u8>)>);

fn get_raw(
    f: &CK_FUNCTION_LIST,
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    query: &[(CK_ATTRIBUTE_TYPE, Option<usize>)],
) -> RawAttrs {
    let mut bufs: Vec<Vec<u8>> = query.iter().map(|(_, len)| vec![0xEE; len.unwrap_or(0)]).collect();
    let mut template: Vec<CK_ATTRIBUTE> = query
        .iter()
        .zip(bufs.iter_mut())
        .map(|((t, len), buf)| CK_ATTRIBUTE {
            type_: *t,
            pValue: if len.is_some() { buf.as_mut_ptr().cast() } else { std::ptr::null_mut() },
            ulValueLen: buf.len() as CK_ULONG,
        })
        .collect();
    // SAFETY: each pValue is NULL or points to ulValueLen writable bytes that outlive the call.
    let rv =
        unsafe { f.C_GetAttributeValue.unwrap()(session, object, template.as_mut_ptr(), template.len() as CK_ULONG) };
    let out = template
        .iter()
        .zip(bufs)
        .map(|(a, b)| {
            let n = (a.ulValueLen as usize).min(b.len());
            (a.ulValueLen, if a.ulValueLen == CK_UNAVAILABLE_INFORMATION { b } else { b[..n].to_vec() })
        })
        .collect();
    (rv, out)
}

#[test]
fn get_attribute_value_length_protocol_equals_backend_direct() {
    let k = keys();
    let s = session();
    let shim = functions(&shim_path());
    let direct = functions(&backend_path());
    let (sh, rsa_pub, rsa_priv) = (s.handle(), k.rsa_pub.handle(), k.rsa_priv.handle());
    let same = |object: CK_OBJECT_HANDLE, query: &[(CK_ATTRIBUTE_TYPE, Option<usize>)]| {
        let a = get_raw(shim, sh, object, query);
        let b = get_raw(direct, sh, object, query);
        assert_eq!(a, b, "C_GetAttributeValue({object}, {query:?}): shim vs direct");
        a
    };

    // pValue NULL: the length.
    assert_eq!(same(rsa_pub, &[(CKA_LABEL, None)]), (CKR_OK, vec![(3, vec![])]));
    assert_eq!(same(rsa_pub, &[(CKA_MODULUS, None)]), (CKR_OK, vec![(256, vec![])]));
    // Exact buffer: the value.
    assert_eq!(same(rsa_pub, &[(CKA_LABEL, Some(3))]), (CKR_OK, vec![(3, b"rsa".to_vec())]));
    // Larger buffer: the value and its length.
    assert_eq!(same(rsa_pub, &[(CKA_LABEL, Some(10))]), (CKR_OK, vec![(3, b"rsa".to_vec())]));
    // Too small: CKR_BUFFER_TOO_SMALL and CK_UNAVAILABLE_INFORMATION.
    let (rv, out) = same(rsa_pub, &[(CKA_LABEL, Some(2))]);
    assert_eq!(rv, CKR_BUFFER_TOO_SMALL);
    assert_eq!(out[0].0, CK_UNAVAILABLE_INFORMATION);
    // Sensitive: CKR_ATTRIBUTE_SENSITIVE and CK_UNAVAILABLE_INFORMATION, with or without a buffer.
    for len in [None, Some(512)] {
        let (rv, out) = same(rsa_priv, &[(CKA_PRIVATE_EXPONENT, len)]);
        assert_eq!(rv, CKR_ATTRIBUTE_SENSITIVE);
        assert_eq!(out[0].0, CK_UNAVAILABLE_INFORMATION);
    }
    // Unknown type: CKR_ATTRIBUTE_TYPE_INVALID.
    let (rv, out) = same(rsa_pub, &[(CKA_VENDOR_DEFINED | 0x4242, Some(8))]);
    assert_eq!(rv, CKR_ATTRIBUTE_TYPE_INVALID);
    assert_eq!(out[0].0, CK_UNAVAILABLE_INFORMATION);
    // Mixed: every attribute is processed; the sensitive one is reported.
    let (rv, out) = same(
        rsa_priv,
        &[(CKA_CLASS, Some(8)), (CKA_PRIVATE_EXPONENT, Some(256)), (CKA_MODULUS, None), (CKA_ID, Some(2))],
    );
    assert_eq!(rv, CKR_ATTRIBUTE_SENSITIVE);
    assert_eq!(out[0], (8, (CKO_PRIVATE_KEY as CK_ULONG).to_ne_bytes().to_vec()));
    assert_eq!(out[1].0, CK_UNAVAILABLE_INFORMATION);
    assert_eq!(out[2], (256, vec![]));
    assert_eq!(out[3], (2, vec![0xAA, 1]));

    // Bad handles and a NULL template.
    assert_eq!(same(0xFFFF_FF00, &[(CKA_CLASS, Some(8))]).0, CKR_OBJECT_HANDLE_INVALID);
    let a = get_raw(shim, 0xFFFF_FF00, rsa_pub, &[(CKA_CLASS, Some(8))]);
    assert_eq!(a, get_raw(direct, 0xFFFF_FF00, rsa_pub, &[(CKA_CLASS, Some(8))]));
    assert_eq!(a.0, CKR_SESSION_HANDLE_INVALID);
    // SAFETY: a NULL template with a count of 1, which the module must refuse.
    let (ra, rb) = unsafe {
        (
            shim.C_GetAttributeValue.unwrap()(sh, rsa_pub, std::ptr::null_mut(), 1),
            direct.C_GetAttributeValue.unwrap()(sh, rsa_pub, std::ptr::null_mut(), 1),
        )
    };
    assert_eq!((ra, rb), (CKR_ARGUMENTS_BAD, CKR_ARGUMENTS_BAD));
}

#[test]
fn set_attribute_value_and_read_only_attributes() {
    keys(); // logs the token in
    let s = session();
    // A key of its own: SoftHSM2 reloads a token object's attributes from its file after a refused
    // C_SetAttributeValue, and a thread reading the object meanwhile can find CKA_SIGN missing
    // (CKR_KEY_FUNCTION_NOT_PERMITTED in another test's C_SignInit). The shared keys() stay untouched.
    let (rsa_pub, rsa_priv) = s
        .generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &[Attribute::Token(true), Attribute::ModulusBits(2048.into()), Attribute::PublicExponent(vec![1, 0, 1])],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Sign(true),
                Attribute::Label("read-only attributes".into()),
            ],
        )
        .expect("C_GenerateKeyPair RSA-2048");
    let h = s
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(false),
            Attribute::Label("before".into()),
            Attribute::Value(vec![1]),
        ])
        .unwrap();
    s.update_attributes(h, &[Attribute::Label("after".into())]).unwrap();
    assert_eq!(bytes(&s, h, AttributeType::Label), b"after");
    assert_eq!(s.find_objects(&[Attribute::Label("after".into())]).unwrap(), vec![h]);

    // Read-only and one-way attributes: the shim's answer is the backend's.
    let shim = functions(&shim_path());
    let direct = functions(&backend_path());
    let set = |f: &CK_FUNCTION_LIST, object: ObjectHandle, t: CK_ATTRIBUTE_TYPE, value: &mut [u8]| {
        let mut a = CK_ATTRIBUTE { type_: t, pValue: value.as_mut_ptr().cast(), ulValueLen: value.len() as CK_ULONG };
        // SAFETY: one attribute whose value outlives the call.
        unsafe { f.C_SetAttributeValue.unwrap()(s.handle(), object.handle(), &mut a, 1) }
    };
    for (object, t, value) in [
        (h, CKA_CLASS, (CKO_SECRET_KEY as CK_ULONG).to_ne_bytes().to_vec()),
        (h, CKA_VALUE, vec![9, 9]),
        (rsa_priv, CKA_SENSITIVE, vec![CK_FALSE]),
        (rsa_priv, CKA_KEY_TYPE, (CKK_EC as CK_ULONG).to_ne_bytes().to_vec()),
    ] {
        let (mut v1, mut v2) = (value.clone(), value.clone());
        let a = set(shim, object, t, &mut v1);
        let b = set(direct, object, t, &mut v2);
        assert_eq!(a, b, "C_SetAttributeValue(0x{t:x})");
        // A data object's CKA_VALUE is modifiable by the spec (2.40 table 26): the simulator allows it,
        // SoftHSM2 2.6.1 refuses it. Everything else here is refused by both.
        if !(t == CKA_VALUE && backend() == Backend::Simulator) {
            assert_ne!(a, CKR_OK, "C_SetAttributeValue(0x{t:x}) must be refused");
        }
    }
    assert_eq!(attr(&s, rsa_priv, AttributeType::Sensitive), Attribute::Sensitive(true));
    s.destroy_object(h).unwrap();
    s.destroy_object(rsa_priv).unwrap();
    s.destroy_object(rsa_pub).unwrap();
}

#[test]
fn copy_and_destroy_objects() {
    let s = session();
    let h = s
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(false),
            Attribute::Label("original".into()),
            Attribute::Value(b"payload".to_vec()),
        ])
        .unwrap();
    let copy = s.copy_object(h, &[Attribute::Label("copy".into())]).unwrap();
    assert_ne!(copy, h);
    assert_eq!(bytes(&s, copy, AttributeType::Label), b"copy");
    assert_eq!(bytes(&s, copy, AttributeType::Value), b"payload");
    assert_eq!(bytes(&s, h, AttributeType::Label), b"original");

    s.destroy_object(copy).unwrap();
    assert_rv(s.get_attributes(copy, &[AttributeType::Label]), RvError::ObjectHandleInvalid);
    assert_rv(s.destroy_object(copy), RvError::ObjectHandleInvalid);
    assert_rv(s.copy_object(copy, &[]), RvError::ObjectHandleInvalid);
    assert_eq!(bytes(&s, h, AttributeType::Value), b"payload");

    // A token object copy lives on the token, in another session too.
    let token_copy = s.copy_object(h, &[Attribute::Token(true), Attribute::Label("token-copy".into())]).unwrap();
    let other = session();
    assert_eq!(other.find_objects(&[Attribute::Label("token-copy".into())]).unwrap(), vec![token_copy]);
    other.destroy_object(token_copy).unwrap();
    assert!(s.find_objects(&[Attribute::Label("token-copy".into())]).unwrap().is_empty());
    s.destroy_object(h).unwrap();
}

#[test]
fn random_bytes() {
    let s = session();
    let a = s.generate_random_vec(32).unwrap();
    let b = s.generate_random_vec(32).unwrap();
    assert_eq!(a.len(), 32);
    assert_ne!(a, b);
    assert!(a.iter().any(|&x| x != 0));
    let mut buf = [0u8; 1000];
    s.generate_random_slice(&mut buf).unwrap();
    let distinct: std::collections::HashSet<u8> = buf.iter().copied().collect();
    assert!(distinct.len() > 200, "1000 random bytes take many values");
    s.seed_random(b"more entropy").unwrap();
}

// ---------------------------------------------------------------------------------------------------
// Threads.

#[test]
fn eight_threads_sign_verify_and_encrypt_at_once() {
    let k = keys();
    let barrier = std::sync::Barrier::new(8);
    std::thread::scope(|scope| {
        for t in 0..8u8 {
            let barrier = &barrier;
            scope.spawn(move || {
                let s = session();
                barrier.wait();
                for i in 0..25u8 {
                    let data = [t, i, 0x5A, t ^ i].repeat(10 + i as usize);
                    let digest = s.digest(&Mechanism::Sha256, &data).unwrap();
                    let sig = s.sign(&Mechanism::Ecdsa, k.ec256_priv, &digest).unwrap();
                    s.verify(&Mechanism::Ecdsa, k.ec256_pub, &digest, &sig).unwrap();
                    let mac = s.sign(&Mechanism::Sha256Hmac, k.generic, &data).unwrap();
                    s.verify(&Mechanism::Sha256Hmac, k.generic, &data, &mac).unwrap();
                    let mut iv = [t; 12];
                    iv[0] = i;
                    let ct = s
                        .encrypt(&Mechanism::AesGcm(GcmParams::new(&mut iv, &[t], 128.into()).unwrap()), k.aes, &data)
                        .unwrap();
                    let pt = s
                        .decrypt(&Mechanism::AesGcm(GcmParams::new(&mut iv, &[t], 128.into()).unwrap()), k.aes, &ct)
                        .unwrap();
                    assert_eq!(pt, data, "thread {t} iteration {i}");
                }
                s.close().unwrap();
            });
        }
    });
}
