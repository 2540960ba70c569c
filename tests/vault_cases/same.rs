//! A database slot answers like the token in pass-through: the same creation calls, made once in each, give
//! objects whose every attribute reads the same (defaults included: the backend's own answers, never an
//! assumption) and that behave the same when an application tries to take them out.

use super::custody::Raw;
use super::*;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::MechanismType;
use cryptoki_sys::*;

/// What a case makes, with the flags under test added to the key's template.
#[derive(Clone, Copy, Debug)]
enum Make {
    Aes,
    Generic,
    EcPair,
    RsaPair,
    ImportAes,
    UnwrapAes,
    DeriveGeneric,
    CopyAes,
    Data,
    Certificate,
}

/// The flags a case gives (None: omitted, so the backend's default applies).
#[derive(Clone, Copy, Debug, Default)]
struct Flags {
    sensitive: Option<bool>,
    extractable: Option<bool>,
    trusted_only: Option<bool>,
    private: Option<bool>,
    always_authenticate: Option<bool>,
    allowed: bool,
}

impl Flags {
    fn attrs(&self) -> Vec<Attribute> {
        let mut a = Vec::new();
        if let Some(v) = self.sensitive {
            a.push(Attribute::Sensitive(v));
        }
        if let Some(v) = self.extractable {
            a.push(Attribute::Extractable(v));
        }
        if let Some(v) = self.trusted_only {
            a.push(Attribute::WrapWithTrusted(v));
        }
        if let Some(v) = self.private {
            a.push(Attribute::Private(v));
        }
        if let Some(v) = self.always_authenticate {
            a.push(Attribute::AlwaysAuthenticate(v));
        }
        a
    }
}

/// Every case: each kind of object, and for keys every combination of sensitive and extractable given or
/// omitted (and more where they matter).
fn cases() -> Vec<(Make, Flags)> {
    let tri = [None, Some(true), Some(false)];
    let mut all = Vec::new();
    for make in
        [Make::Aes, Make::Generic, Make::EcPair, Make::ImportAes, Make::UnwrapAes, Make::DeriveGeneric, Make::CopyAes]
    {
        for sensitive in tri {
            for extractable in tri {
                all.push((make, Flags { sensitive, extractable, ..Default::default() }));
            }
        }
    }
    for trusted_only in [Some(true), Some(false)] {
        for extractable in [None, Some(true)] {
            all.push((Make::Aes, Flags { sensitive: Some(true), extractable, trusted_only, ..Default::default() }));
        }
    }
    all.push((Make::Aes, Flags { private: Some(false), ..Default::default() }));
    all.push((Make::Aes, Flags { private: Some(false), sensitive: Some(true), ..Default::default() }));
    all.push((Make::Aes, Flags { allowed: true, sensitive: Some(true), ..Default::default() }));
    all.push((Make::EcPair, Flags { always_authenticate: Some(true), sensitive: Some(true), ..Default::default() }));
    all.push((Make::EcPair, Flags { allowed: true, ..Default::default() }));
    all.push((Make::RsaPair, Flags::default()));
    all.push((Make::RsaPair, Flags { sensitive: Some(true), extractable: Some(true), ..Default::default() }));
    all.push((Make::Data, Flags::default()));
    all.push((Make::Certificate, Flags::default()));
    all
}

/// Makes one case's object(s) in `s` as token objects labelled `label`; the handle of the key (or object)
/// under test, and a key pair's public half. `peer` is an EC point for ECDH; `kek` a session wrapping key.
fn make(
    s: &Session,
    make: Make,
    flags: Flags,
    label: &str,
    kek: ObjectHandle,
    peer: &[u8],
) -> Result<Vec<ObjectHandle>, RvError> {
    let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let mut key = vec![Attribute::Token(true), Attribute::Label(label.as_bytes().to_vec())];
    key.extend(flags.attrs());
    let secret = |kind: KeyType| vec![Attribute::Class(ObjectClass::SECRET_KEY), Attribute::KeyType(kind)];
    let made = match make {
        Make::Aes => {
            key.extend([Attribute::ValueLen(32.into()), Attribute::Encrypt(true)]);
            if flags.allowed {
                key.push(Attribute::AllowedMechanisms(vec![MechanismType::AES_ECB, MechanismType::AES_CBC]));
            }
            s.generate_key(&Mechanism::AesKeyGen, &key).map(|k| vec![k])
        }
        Make::Generic => {
            key.extend([Attribute::ValueLen(32.into()), Attribute::Sign(true)]);
            s.generate_key(&Mechanism::GenericSecretKeyGen, &key).map(|k| vec![k])
        }
        Make::EcPair | Make::RsaPair => {
            key.push(Attribute::Sign(true));
            if flags.allowed {
                key.push(Attribute::AllowedMechanisms(vec![MechanismType::ECDSA]));
            }
            let mut public =
                vec![Attribute::Token(true), Attribute::Label(label.as_bytes().to_vec()), Attribute::Verify(true)];
            let mechanism = if matches!(make, Make::EcPair) {
                public.push(Attribute::EcParams(p256));
                Mechanism::EccKeyPairGen
            } else {
                public.extend([Attribute::ModulusBits(2048.into()), Attribute::PublicExponent(vec![1, 0, 1])]);
                Mechanism::RsaPkcsKeyPairGen
            };
            s.generate_key_pair(&mechanism, &public, &key).map(|(p, q)| vec![q, p])
        }
        Make::ImportAes => {
            key.extend(secret(KeyType::AES));
            key.extend([Attribute::Value(vec![0x5a; 32]), Attribute::Encrypt(true)]);
            s.create_object(&key).map(|k| vec![k])
        }
        Make::UnwrapAes => {
            key.extend(secret(KeyType::AES));
            key.push(Attribute::Encrypt(true));
            let inner = s
                .create_object(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Token(false),
                    Attribute::Value(vec![0x3c; 32]),
                    Attribute::Extractable(true),
                ])
                .expect("a key to wrap");
            let blob = s.wrap_key(&Mechanism::AesKeyWrapPad, kek, inner).expect("a wrapped key");
            s.unwrap_key(&Mechanism::AesKeyWrapPad, kek, &blob, &key).map(|k| vec![k])
        }
        Make::DeriveGeneric => {
            key.extend(secret(KeyType::GENERIC_SECRET));
            key.extend([Attribute::ValueLen(32.into()), Attribute::Sign(true)]);
            let base = s
                .generate_key_pair(
                    &Mechanism::EccKeyPairGen,
                    &[Attribute::Token(false), Attribute::EcParams(p256)],
                    &[Attribute::Token(false), Attribute::Derive(true)],
                )
                .expect("an ECDH key pair")
                .1;
            let params = Ecdh1DeriveParams::new(EcKdf::null(), peer);
            s.derive_key(&Mechanism::Ecdh1Derive(params), base, &key).map(|k| vec![k])
        }
        Make::CopyAes => {
            let mut session_key =
                vec![Attribute::Token(false), Attribute::ValueLen(32.into()), Attribute::Encrypt(true)];
            session_key.extend(flags.attrs());
            let source = s.generate_key(&Mechanism::AesKeyGen, &session_key).expect("a session key to copy");
            s.copy_object(source, &[Attribute::Token(true), Attribute::Label(label.as_bytes().to_vec())])
                .map(|k| vec![k])
        }
        Make::Data => s
            .create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Application(b"same".to_vec()),
                Attribute::Value(b"some data".to_vec()),
            ])
            .map(|k| vec![k]),
        Make::Certificate => s
            .create_object(&[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::CertificateType(cryptoki::object::CertificateType::X_509),
                Attribute::Token(true),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Subject(b"\x30\x00".to_vec()),
                Attribute::Value(b"\x30\x03\x02\x01\x01".to_vec()),
            ])
            .map(|k| vec![k]),
    };
    made.map_err(rv)
}

/// Attributes compared by value.
const SAME_VALUE: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_KEY_TYPE,
    CKA_TOKEN,
    CKA_PRIVATE,
    CKA_MODIFIABLE,
    CKA_COPYABLE,
    CKA_DESTROYABLE,
    CKA_LABEL,
    CKA_ID,
    CKA_SENSITIVE,
    CKA_EXTRACTABLE,
    CKA_ALWAYS_SENSITIVE,
    CKA_NEVER_EXTRACTABLE,
    CKA_LOCAL,
    CKA_KEY_GEN_MECHANISM,
    CKA_WRAP_WITH_TRUSTED,
    CKA_ALWAYS_AUTHENTICATE,
    CKA_TRUSTED,
    CKA_ENCRYPT,
    CKA_DECRYPT,
    CKA_SIGN,
    CKA_VERIFY,
    CKA_SIGN_RECOVER,
    CKA_VERIFY_RECOVER,
    CKA_WRAP,
    CKA_UNWRAP,
    CKA_DERIVE,
    CKA_VALUE_LEN,
    CKA_MODULUS_BITS,
    CKA_PUBLIC_EXPONENT,
    CKA_EC_PARAMS,
    CKA_ALLOWED_MECHANISMS,
    CKA_APPLICATION,
    CKA_SUBJECT,
    CKA_CERTIFICATE_TYPE,
];

/// Attributes compared by their answer only (a freshly generated key's values differ from the other's):
/// present, sensitive, absent.
const SAME_ANSWER: &[CK_ATTRIBUTE_TYPE] =
    &[CKA_VALUE, CKA_CHECK_VALUE, CKA_MODULUS, CKA_EC_POINT, CKA_PRIVATE_EXPONENT, CKA_PRIME_1, CKA_COEFFICIENT];

/// How an object reads and behaves, as lines to compare.
fn describe(raw: &Raw, s: CK_SESSION_HANDLE, h: u64, kek: u64, deterministic: bool) -> Vec<String> {
    let mut lines = Vec::new();
    for &ty in SAME_VALUE {
        lines.push(format!("{ty:#x} = {:?}", raw.get(s, h, ty)));
    }
    for &ty in SAME_ANSWER {
        let got = raw.get(s, h, ty);
        lines.push(match got {
            Ok(v) if deterministic => format!("{ty:#x} = {v:?}"),
            Ok(_) => format!("{ty:#x} present"),
            Err(e) => format!("{ty:#x} {}", common::rv_name(e)),
        });
    }
    if raw.get(s, h, CKA_CLASS).ok() != Some(custody::u(CKO_DATA)) {
        let wrapped = raw.wrap(s, CKM_AES_KEY_WRAP_PAD, kek, h).map(|_| "wraps").map_err(common::rv_name);
        lines.push(format!("wrapped under an untrusted key: {wrapped:?}"));
    }
    lines
}

/// The same calls in a pass-through and a database slot, table-driven: every attribute reads the same, and
/// the objects behave the same when wrapped under an untrusted key.
pub fn same_attributes_as_pass_through() {
    let (_db_slot, db) = db_token("db27");
    let plain = user_session(new_token("same-plain"));
    let raw = Raw::shim();
    let kek_template = [
        Attribute::Token(false),
        Attribute::Encrypt(true),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Extractable(true),
    ];
    // The same wrapping key in each slot (a session object: the application's own).
    let kek = |session: &Session| {
        let mut t = kek_template.to_vec();
        t.extend([
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Value(vec![0x11; 32]),
        ]);
        session.create_object(&t).unwrap()
    };
    let keks = [kek(&db), kek(&plain)];
    let peer = {
        let (public, _) = ec_pair(&plain, "peer", false);
        let point = plain.get_attributes(public, &[AttributeType::EcPoint]).unwrap();
        let Some(Attribute::EcPoint(point)) = point.into_iter().next() else { panic!("an EC point") };
        if point.len() == 67 && point[0] == 0x04 {
            point[2..].to_vec()
        } else {
            point
        }
    };
    let mut differences = Vec::new();
    let mut stored = 0;
    let cases = cases();
    for (i, (kind, flags)) in cases.iter().enumerate() {
        let label = format!("c{i}");
        // A derived key comes from a base key made afresh in each slot: its value differs.
        let deterministic = matches!(kind, Make::ImportAes | Make::UnwrapAes | Make::Data | Make::Certificate);
        let mut seen = Vec::new();
        for (session, kek) in [(&plain, keks[1]), (&db, keks[0])] {
            let made = make(session, *kind, *flags, &label, kek, &peer);
            seen.push(match made {
                Err(e) => vec![format!("refused: {e:?}")],
                Ok(handles) => {
                    stored += handles.iter().filter(|h| h.handle() & (1 << 63) != 0).count();
                    handles
                        .iter()
                        .flat_map(|h| describe(&raw, session.handle(), h.handle(), kek.handle(), deterministic))
                        .collect()
                }
            });
        }
        let (pass_through, database) = (&seen[0], &seen[1]);
        if pass_through != database {
            let diff: Vec<String> = pass_through
                .iter()
                .zip(database)
                .filter(|(a, b)| a != b)
                .map(|(a, b)| format!("    pass-through {a}\n    database     {b}"))
                .collect();
            differences.push(format!("case {i} {kind:?} {flags:?}:\n{}", diff.join("\n")));
        }
    }
    assert!(
        differences.is_empty(),
        "{} of {} cases differ:\n{}",
        differences.len(),
        cases.len(),
        differences.join("\n")
    );
    assert!(stored > cases.len() / 2, "most objects of the database slot are stored keys ({stored})");
}
