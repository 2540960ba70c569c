//! The CryptoServer firmware modes: FIPS refuses clear-text import and export of secret and private keys (but
//! not unwrapping under a key, nor export under a trusted key); CC does that and refuses overwriting a token
//! key (same class, label and id). Each refusal is CKR_ACTION_PROHIBITED (or CKR_ATTRIBUTE_SENSITIVE for
//! reading a value) with a log line naming the rule.

mod common;

use common::*;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::Attribute;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use cryptoki_sys::*;

fn setup(test: &str, mode: &str) -> (std::path::PathBuf, Loaded) {
    let dir = test_dir(test);
    let config = write_config(&dir, &two_slots(mode));
    let loaded = load(&config, None);
    (dir, loaded)
}

fn aes_template(value: &[u8]) -> Vec<(CK_ATTRIBUTE_TYPE, V)> {
    vec![(CKA_CLASS, ul(CKO_SECRET_KEY)), (CKA_KEY_TYPE, ul(CKK_AES)), (CKA_VALUE, by(value))]
}

/// What FIPS and CC firmware have in common.
fn fips_rules(test: &str, mode: &str) {
    let (dir, m) = setup(test, mode);
    let p11 = m.p11();
    assert_eq!(p11.get_token_info(slot(p11, 0)).unwrap().model(), format!("CSSIM {mode}"));
    let raw = Raw::new();
    // The SO makes a trusted wrapping key (generated: it cannot be imported).
    let so = p11.open_rw_session(slot(p11, 0)).unwrap();
    so.login(UserType::So, Some(&AuthPin::new(SO_PIN.into()))).unwrap();
    let trusted = so
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::ValueLen(32.into()),
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Trusted(true),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
                Attribute::Label(b"trusted".to_vec()),
            ],
        )
        .unwrap();
    so.logout().unwrap();
    drop(so);
    let s = user_session(p11);
    let h = s.handle();
    // Clear-text import of a secret or private key is refused; a public key is fine.
    assert_eq!(raw.create(h, &aes_template(&[1; 16])), Err(CKR_ACTION_PROHIBITED));
    let rsa_private = [
        (CKA_CLASS, ul(CKO_PRIVATE_KEY)),
        (CKA_KEY_TYPE, ul(CKK_RSA)),
        (CKA_MODULUS, by(&[0xc1; 256])),
        (CKA_PRIVATE_EXPONENT, by(&[0x11; 256])),
    ];
    assert_eq!(raw.create(h, &rsa_private), Err(CKR_ACTION_PROHIBITED));
    let ec_public = [
        (CKA_CLASS, ul(CKO_PUBLIC_KEY)),
        (CKA_KEY_TYPE, ul(CKK_EC)),
        (CKA_EC_PARAMS, by(&[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07])),
        (CKA_EC_POINT, by(&p256_point())),
    ];
    raw.create(h, &ec_public).unwrap();
    let log = log_of(&dir);
    assert!(log.contains("FIPS: clear-text import of secret key refused (rule fips.import_clear)"), "{log}");
    assert!(log.contains("FIPS: clear-text import of private key refused (rule fips.import_clear)"), "{log}");
    // Generated keys are fine, but their values do not come out in clear, even when extractable.
    let key = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::ValueLen(16.into()),
                Attribute::Extractable(true),
                Attribute::Sensitive(false),
                Attribute::Wrap(true),
            ],
        )
        .unwrap();
    assert_eq!(raw.get(h, key.handle(), CKA_VALUE).0, CKR_ATTRIBUTE_SENSITIVE);
    assert!(log_of(&dir).contains("(rule fips.export_clear)"));
    // Export under an untrusted key is refused; under the SO's trusted key it works, and so does unwrapping.
    let other =
        s.generate_key(&Mechanism::AesKeyGen, &[Attribute::ValueLen(16.into()), Attribute::Wrap(true)]).unwrap();
    assert_eq!(raw.wrap(h, CKM_AES_KEY_WRAP_PAD, other.handle(), key.handle()), Err(CKR_ACTION_PROHIBITED));
    assert!(log_of(&dir).contains(
        "FIPS: export of secret key under a wrapping key without CKA_TRUSTED refused (rule fips.export_untrusted)"
    ));
    let wrapped = raw.wrap(h, CKM_AES_KEY_WRAP_PAD, trusted.handle(), key.handle()).unwrap();
    let t = [(CKA_CLASS, ul(CKO_SECRET_KEY)), (CKA_KEY_TYPE, ul(CKK_AES)), (CKA_ENCRYPT, bl(true))];
    let back = raw.unwrap(h, CKM_AES_KEY_WRAP_PAD, trusted.handle(), &wrapped, &t).unwrap();
    let a = s.encrypt(&Mechanism::AesEcb, key, &[0; 16]).unwrap();
    assert_eq!(s.encrypt(&Mechanism::AesEcb, oh(back), &[0; 16]).unwrap(), a, "the same key came back");
}

/// An uncompressed P-256 point (the generator).
fn p256_point() -> Vec<u8> {
    let mut v = vec![0x04, 0x41, 0x04];
    v.extend(hex::decode("6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296").unwrap());
    v.extend(hex::decode("4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5").unwrap());
    v
}

#[test]
fn fips_refuses_clear_text_import_and_export() {
    fips_rules("fips", "fips");
}

#[test]
fn cc_has_the_fips_rules() {
    fips_rules("cc-fips", "cc");
}

#[test]
fn standard_mode_allows_clear_text_and_overwriting() {
    let (dir, m) = setup("standard", "standard");
    let s = user_session(m.p11());
    let raw = Raw::new();
    let mut t = aes_template(&[1; 16]);
    t.push((CKA_EXTRACTABLE, bl(true)));
    t.push((CKA_TOKEN, bl(true)));
    t.push((CKA_LABEL, by(b"k")));
    let k = raw.create(s.handle(), &t).unwrap();
    assert_eq!(raw.get(s.handle(), k, CKA_VALUE).1.unwrap(), [1; 16]);
    raw.create(s.handle(), &t).unwrap();
    assert!(!log_of(&dir).contains("refused"));
}

#[test]
fn cc_refuses_overwriting_a_token_key() {
    let (dir, m) = setup("cc", "cc");
    let p11 = m.p11();
    let s = user_session(p11);
    let raw = Raw::new();
    let gen = |label: &[u8], id: &[u8], token: bool| {
        s.generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::ValueLen(16.into()),
                Attribute::Token(token),
                Attribute::Label(label.to_vec()),
                Attribute::Id(id.to_vec()),
            ],
        )
    };
    let first = gen(b"k", b"\x01", true).unwrap();
    assert_eq!(rv(gen(b"k", b"\x01", true)), CKR_ACTION_PROHIBITED);
    assert!(log_of(&dir).contains("CC: overwriting key (same class, label and id) refused (rule cc.no_overwrite)"));
    // Another id, or a session object, is not an overwrite.
    let second = gen(b"k", b"\x02", true).unwrap();
    gen(b"k", b"\x01", false).unwrap();
    // Renaming a key onto another is an overwrite too.
    assert_eq!(raw.set(s.handle(), second.handle(), &[(CKA_ID, by(b"\x01"))]), CKR_ACTION_PROHIBITED);
    // A key pair has two classes: one label and id for both is fine; a second pair like it is not.
    let pair = |label: &[u8]| {
        s.generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::EcParams(vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]),
                Attribute::Token(true),
                Attribute::Label(label.to_vec()),
                Attribute::Id(b"\x09".to_vec()),
            ],
            &[Attribute::Token(true), Attribute::Label(label.to_vec()), Attribute::Id(b"\x09".to_vec())],
        )
    };
    pair(b"ec").unwrap();
    assert_eq!(rv(pair(b"ec")), CKR_ACTION_PROHIBITED);
    // After C_DestroyObject the label and id are free again.
    s.destroy_object(first).unwrap();
    gen(b"k", b"\x01", true).unwrap();
    // Another process (pkcs11-tool) sees the same refusal on the shared state.
    let out = p11tool(
        &module_path(),
        &dir.join("cssim.toml"),
        &[
            "--token-label",
            "test",
            "--login",
            "--pin",
            USER_PIN,
            "--keygen",
            "--key-type",
            "AES:16",
            "--label",
            "k",
            "--id",
            "01",
        ],
    );
    assert_ne!(out.code, Some(0), "{out:?}");
    // OpenSC (2.40 names) prints CKR_ACTION_PROHIBITED as "unknown PKCS11 error (0x1b)".
    assert!(out.stderr.contains("C_GenerateKey failed") && out.stderr.contains("(0x1b)"), "{out:?}");
}
