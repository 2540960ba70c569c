//! Stored keys, run through the shim with one key store engine and one backend per test binary:
//! tests/vault_sqlite.rs and tests/vault_postgres.rs run these same cases (`vault_cases!`) over SoftHSM2,
//! tests/vault_sqlite_cssim.rs over the CryptoServer simulator (whose MBK set uses the same CKA_TRUSTED,
//! CKA_WRAP_WITH_TRUSTED, CKA_UNWRAP_TEMPLATE and HMAC as SoftHSM2's).
//!
//! Each test binary writes a p11shim.toml whose database slots are the tokens `db01`…`db40` (each test
//! makes its own) and whose `plain` token is a pass-through slot. Each test creates its token and the MBK
//! (with the real `p11shim` command), then works through the shim with cryptoki.
#![allow(dead_code)]

use crate::common::{self, backend, new_token, pkcs11, user_session, Backend, SO_PIN, USER_PIN};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use p11shim::store::{self, KeyQuery, KeyRow};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

mod cache;
mod custody;
mod same;
pub use cache::*;
pub use custody::*;
pub use same::*;

/// CKA_P11SHIM_GROUP (include/p11shim.h).
pub const GROUP: u64 = 0x8000_0000 | 0x0053_4801;

pub fn group_attr(g: &str) -> Attribute {
    Attribute::VendorDefined((AttributeType::VendorDefined(GROUP), g.as_bytes().to_vec()))
}

static STORE_URL: OnceLock<String> = OnceLock::new();

/// The HSM cache of this binary's configuration (`[store] hsm_cache`).
pub const HSM_CACHE: usize = 8;

/// Sets up this binary's config with the key store at `url` and loads the shim. Call first in every test.
/// `[store] outage_grace` of the cases' config.
pub const OUTAGE_GRACE: std::time::Duration = std::time::Duration::from_secs(4);

pub fn init(url: impl FnOnce() -> String) {
    STORE_URL.get_or_init(|| {
        let url = url();
        common::setup();
        let dir = common::test_dir();
        let mut config = format!(
            // A small HSM cache: every case runs with keys evicted and loaded again.
            // A short outage grace: the outage case sees it end.
            "module = \"{}\"\nlog_file = \"shim.log\"\nlog_level = \"debug\"\n[store]\nurl = \"{url}\"\nhsm_cache = {HSM_CACHE}\noutage_grace = \"{}s\"\n",
            common::backend_path().display(),
            OUTAGE_GRACE.as_secs()
        );
        for i in 1..=40 {
            config.push_str(&format!(
                "[[slot]]\ntoken = \"db{i:02}\"\nstorage = \"database\"\ndefault_group = \"G{i:02}\"\n"
            ));
        }
        config.push_str("[[slot]]\ntoken = \"plain\"\n");
        let path = dir.join("p11shim.toml");
        std::fs::write(&path, config).expect("write p11shim.toml");
        let _ = std::fs::remove_file(dir.join("shim.log"));
        std::env::set_var("P11SHIM_CONFIG", &path);
        pkcs11();
        url
    });
}

pub fn store_url() -> String {
    STORE_URL.get().expect("init first").clone()
}

/// The key store is read and edited from a child process (this test binary re-run as `store_child`): a
/// second copy of SQLite in this process beside the shim's own would break SQLite's POSIX locks (closing
/// one copy's file descriptor drops the other's locks) and lose the shim's commits.
/// The seal key blob the store keeps for the device MBK `mbk` (read by the store child); empty if none.
pub fn seal_blob(mbk: &str) -> Vec<u8> {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "store_child", "--nocapture", "--test-threads=1"])
        .env("VAULT_STORE_OP", "seal")
        .env("VAULT_STORE_ARG", mbk)
        .env("VAULT_STORE_URL", store_url())
        .output()
        .expect("run the store child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find_map(|l| l.split_once("@@SEAL ").map(|(_, b)| b.trim().to_string()));
    hex::decode(line.expect("the child printed the seal key")).expect("hex")
}

fn store_op(op: &str, arg: &str) -> Vec<KeyRow> {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "store_child", "--nocapture", "--test-threads=1"])
        .env("VAULT_STORE_OP", op)
        .env("VAULT_STORE_ARG", arg)
        .env("VAULT_STORE_URL", store_url())
        .output()
        .expect("run the store child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("@@DONE"),
        "store child {op}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // libtest prints "test store_child ... " on the line our first output continues.
    stdout.lines().filter_map(|l| l.split_once("@@ROW ").map(|(_, row)| row)).map(decode_row).collect()
}

/// The child's side of [`store_op`]; does nothing in a normal test run.
pub fn store_child() {
    let (Ok(op), Ok(arg), Ok(url)) =
        (std::env::var("VAULT_STORE_OP"), std::env::var("VAULT_STORE_ARG"), std::env::var("VAULT_STORE_URL"))
    else {
        return;
    };
    let store = store::open(&url).expect("open the key store");
    match op.as_str() {
        "rows" => {
            for row in store.find(&KeyQuery { token: arg, ..Default::default() }).expect("find") {
                println!("@@ROW {}", encode_row(&row));
            }
        }
        "update" => assert!(store.update(&decode_row(&arg)).expect("update"), "row changed meanwhile"),
        "seal" => println!("@@SEAL {}", hex::encode(store.seal_key(&arg).expect("read").unwrap_or_default())),
        other => panic!("unknown store op {other}"),
    }
    println!("@@DONE");
}

fn encode_row(r: &KeyRow) -> String {
    [
        hex::encode(&r.id),
        hex::encode(&r.token),
        hex::encode(&r.group),
        r.class.to_string(),
        r.key_type.to_string(),
        hex::encode(&r.label),
        hex::encode(&r.ckid),
        hex::encode(&r.attrs),
        hex::encode(&r.wrapped),
        r.wrap_mech.to_string(),
        hex::encode(&r.mbk),
        hex::encode(&r.mac),
        r.version.to_string(),
    ]
    .join(",")
}

fn decode_row(line: &str) -> KeyRow {
    let f: Vec<&str> = line.split(',').collect();
    let bytes = |i: usize| hex::decode(f[i]).expect("hex");
    let text = |i: usize| String::from_utf8(bytes(i)).expect("utf8");
    KeyRow {
        id: text(0),
        token: text(1),
        group: text(2),
        class: f[3].parse().unwrap(),
        key_type: f[4].parse().unwrap(),
        label: bytes(5),
        ckid: bytes(6),
        attrs: bytes(7),
        wrapped: bytes(8),
        wrap_mech: f[9].parse().unwrap(),
        mbk: text(10),
        mac: bytes(11),
        version: f[12].parse().unwrap(),
    }
}

pub fn shim_log() -> String {
    std::fs::read_to_string(common::test_dir().join("shim.log")).unwrap_or_default()
}

/// The `p11shim` command with this binary's environment. The command refuses a config whose [[slot]]s name
/// tokens the backend does not have, and this binary's config names 40 that the tests make as they go: the
/// command gets a config of its own (beside the shared one, so the same audit head file and restore journals)
/// with the slots whose tokens exist now.
pub fn cli() -> Command {
    static CONFIGS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let present: Vec<String> = pkcs11()
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .filter_map(|slot| pkcs11().get_token_info(slot).ok())
        .map(|info| info.label().trim_end().to_string())
        .collect();
    let shared = std::fs::read_to_string(config_path()).expect("the shared p11shim.toml");
    let mut parts = shared.split("[[slot]]\n");
    let mut config = parts.next().unwrap_or_default().to_string();
    for slot in parts {
        let label = slot.lines().next().and_then(|l| l.strip_prefix("token = ")).unwrap_or_default().trim_matches('"');
        if present.iter().any(|p| p == label) {
            config.push_str("[[slot]]\n");
            config.push_str(slot);
        }
    }
    let n = CONFIGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = common::test_dir().join(format!("cli-{n}.toml"));
    std::fs::write(&path, config).expect("write the command's config");
    let mut c = Command::new(env!("CARGO_BIN_EXE_p11shim"));
    c.env("P11SHIM_CONFIG", &path).env("P11SHIM_SO_PIN", SO_PIN).env("P11SHIM_USER_PIN", USER_PIN);
    c
}

/// A fresh database token `label` with its MBK (made by C_InitToken through the shim), and a logged-in R/W
/// session on it.
pub fn db_token(label: &str) -> (Slot, Session) {
    let slot = new_token(label);
    let out = cli().args(["mbk", "show", "--token", label]).output().expect("run p11shim");
    assert!(out.status.success(), "p11shim mbk show after C_InitToken: {}", String::from_utf8_lossy(&out.stderr));
    (slot, user_session(slot))
}

pub fn new_aes(session: &Session, label: &str) -> ObjectHandle {
    session.generate_key(&Mechanism::AesKeyGen, &aes_template(label)).expect("C_GenerateKey (stored AES)")
}

pub use crate::common::{aes_template, hmac_key, rv};

pub fn ec_pair(session: &Session, label: &str, token: bool) -> (ObjectHandle, ObjectHandle) {
    let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(token),
                Attribute::EcParams(p256),
                Attribute::Verify(true),
                Attribute::Label(label.into()),
            ],
            &[
                Attribute::Token(token),
                Attribute::Sign(true),
                Attribute::Label(label.into()),
                Attribute::Sensitive(true),
            ],
        )
        .expect("C_GenerateKeyPair")
}

pub fn find_labels(session: &Session, template: &[Attribute]) -> Vec<String> {
    let mut labels: Vec<String> = session
        .find_objects(template)
        .expect("C_FindObjects")
        .into_iter()
        .map(|h| match session.get_attributes(h, &[AttributeType::Label]).expect("label").pop() {
            Some(Attribute::Label(l)) => String::from_utf8_lossy(&l).into_owned(),
            _ => String::new(),
        })
        .collect();
    labels.sort();
    labels
}

fn rows(token: &str) -> Vec<KeyRow> {
    store_op("rows", token)
}

fn encrypt_roundtrip(session: &Session, key: ObjectHandle) -> Result<(), Error> {
    let iv = [7u8; 16];
    let plain = b"sixteen byte msg".to_vec();
    let ct = session.encrypt(&Mechanism::AesCbc(iv), key, &plain)?;
    assert_ne!(ct, plain);
    assert_eq!(session.decrypt(&Mechanism::AesCbc(iv), key, &ct)?, plain);
    Ok(())
}

/// The backend's token holds no object with this label: the key lives only in the store.
fn not_in_hsm_token(slot_label: &str, label: &str) {
    let p = pkcs11();
    let slot = common::find_token(slot_label).expect("token");
    let s = p.open_ro_session(slot).expect("session");
    // Through the shim, a find with CKA_TOKEN=true would include stored keys; ask the backend itself (the
    // same instance as the shim's).
    let raw = common::functions(&common::backend_path());
    let mut t = [cryptoki_sys::CK_ATTRIBUTE {
        type_: cryptoki_sys::CKA_LABEL,
        pValue: label.as_ptr() as *mut _,
        ulValueLen: label.len() as _,
    }];
    let mut found = [0u64; 8];
    let mut n = 0;
    // SAFETY: valid template and buffers; the session is the backend's own handle (same instance).
    unsafe {
        assert_eq!(raw.C_FindObjectsInit.unwrap()(s.handle(), t.as_mut_ptr(), 1), 0);
        assert_eq!(raw.C_FindObjects.unwrap()(s.handle(), found.as_mut_ptr(), 8, &mut n), 0);
        raw.C_FindObjectsFinal.unwrap()(s.handle());
    }
    for h in &found[..n as usize] {
        // SAFETY: a handle SoftHSM2 just returned.
        let tok = s.get_attributes(unsafe { ObjectHandle::new_from_raw(*h) }, &[AttributeType::Token]);
        assert_ne!(
            tok.ok().and_then(|mut v| v.pop()),
            Some(Attribute::Token(true)),
            "{label} is a token object in the backend"
        );
    }
}

pub fn stored_key_is_a_row_not_an_hsm_object() {
    let (_slot, s) = db_token("db01");
    let key = new_aes(&s, "k1");
    assert!(key.handle() & (1 << 63) != 0, "stored keys have shim handles");
    let rows = rows("db01");
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.label, b"k1");
    assert_eq!(row.group, "G01", "the slot's default_group");
    // The device's own blob where it keeps its MBK; else RFC 5649 under the MBK set.
    let how = if common::device_mbk() { p11shim::backup::mbk::DEVICE_BLOB } else { cryptoki_sys::CKM_AES_KEY_WRAP_PAD };
    assert_eq!(row.wrap_mech, how);
    assert!(!row.wrapped.is_empty() && !row.mac.is_empty());
    not_in_hsm_token("db01", "k1");
    encrypt_roundtrip(&s, key).expect("a stored key encrypts and decrypts");
    assert_eq!(s.get_attributes(key, &[AttributeType::Token]).unwrap(), vec![Attribute::Token(true)]);
}

pub fn stored_keys_sign_verify_and_mac() {
    let (_slot, s) = db_token("db02");
    let (public, private) = ec_pair(&s, "ec", true);
    let sig = s.sign(&Mechanism::Ecdsa, private, &[9u8; 32]).expect("ECDSA with a stored key");
    s.verify(&Mechanism::Ecdsa, public, &[9u8; 32], &sig).expect("verify with a stored public key");
    let hmac = hmac_key(&s, "mac");
    let tag = s.sign(&Mechanism::Sha256Hmac, hmac, b"data").expect("HMAC");
    s.verify(&Mechanism::Sha256Hmac, hmac, b"data", &tag).expect("HMAC verify");
    let classes: Vec<u64> = rows("db02").iter().map(|r| r.class).collect();
    assert_eq!(classes.len(), 3, "public, private and secret rows: {classes:?}");
    // A mixed pair: only the token half is stored.
    let (p2, q2) = ec_pair_mixed(&s);
    assert!(p2.handle() & (1 << 63) == 0 && q2.handle() & (1 << 63) != 0);
    assert_eq!(rows("db02").len(), 4);
}

fn ec_pair_mixed(s: &Session) -> (ObjectHandle, ObjectHandle) {
    let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[Attribute::Token(false), Attribute::EcParams(p256), Attribute::Verify(true)],
        &[Attribute::Token(true), Attribute::Sign(true), Attribute::Label(b"half".to_vec())],
    )
    .expect("mixed pair")
}

pub fn find_by_any_attribute_and_group() {
    let (_slot, s) = db_token("db03");
    let mut t = aes_template("a");
    t.push(Attribute::Id(vec![1]));
    s.generate_key(&Mechanism::AesKeyGen, &t).unwrap();
    let mut t = aes_template("b");
    t.push(group_attr("Prod"));
    t.push(Attribute::Id(vec![2]));
    s.generate_key(&Mechanism::AesKeyGen, &t).unwrap();
    ec_pair(&s, "c", true);
    // A session object is not stored, and is found as before.
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[Attribute::Token(false), Attribute::ValueLen(16.into()), Attribute::Label(b"sess".to_vec())],
    )
    .unwrap();
    assert_eq!(rows("db03").len(), 4);
    assert_eq!(find_labels(&s, &[Attribute::Label(b"a".to_vec())]), vec!["a"]);
    assert_eq!(find_labels(&s, &[Attribute::Id(vec![2])]), vec!["b"]);
    assert_eq!(find_labels(&s, &[Attribute::Class(ObjectClass::SECRET_KEY)]), vec!["a", "b", "sess"]);
    assert_eq!(find_labels(&s, &[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Token(true)]), vec!["a", "b"]);
    assert_eq!(find_labels(&s, &[Attribute::KeyType(KeyType::EC)]), vec!["c", "c"]);
    assert_eq!(find_labels(&s, &[group_attr("Prod")]), vec!["b"]);
    assert_eq!(find_labels(&s, &[group_attr("G03")]), vec!["a", "c", "c"]);
    assert_eq!(find_labels(&s, &[group_attr("G03"), Attribute::Class(ObjectClass::PRIVATE_KEY)]), vec!["c"]);
    assert_eq!(find_labels(&s, &[group_attr("Nope")]), Vec::<String>::new());
    assert_eq!(find_labels(&s, &[Attribute::Label(b"b".to_vec()), Attribute::Encrypt(true)]), vec!["b"]);
    assert_eq!(find_labels(&s, &[Attribute::Label(b"b".to_vec()), Attribute::Encrypt(false)]), Vec::<String>::new());
    // The shim's own MBK set is not the application's business.
    assert!(find_labels(&s, &[]).iter().all(|l| !l.starts_with("p11shim-mbk")), "{:?}", find_labels(&s, &[]));
    // The group is readable, the same handle comes back every time.
    let b = s.find_objects(&[Attribute::Label(b"b".to_vec())]).unwrap()[0];
    assert_eq!(s.find_objects(&[Attribute::Label(b"b".to_vec())]).unwrap()[0], b);
    let got = s.get_attributes(b, &[AttributeType::VendorDefined(GROUP)]).unwrap();
    assert_eq!(got, vec![group_attr("Prod")]);
    // One rule for group names: a control character, an invisible one, 65 characters or a space at an end is
    // refused, and nothing is stored.
    for bad in ["a\nb", "zero\u{200B}width", &"g".repeat(65), " Prod", ""] {
        let mut t = aes_template("bad-group");
        t.push(group_attr(bad));
        let e = s.generate_key(&Mechanism::AesKeyGen, &t).unwrap_err();
        assert_eq!(rv(e), RvError::AttributeValueInvalid, "group {bad:?}");
    }
    assert_eq!(rows("db03").len(), 4, "no key with a bad group name was stored");
    // Private keys are invisible without login.
    let ro = pkcs11().open_ro_session(common::find_token("db03").unwrap()).unwrap();
    ro.logout().ok();
    drop(s);
    let anon = find_labels(&ro, &[Attribute::Token(true)]);
    assert!(!anon.contains(&"a".to_string()), "private stored keys are hidden without login: {anon:?}");
}

pub fn attributes_follow_the_spec() {
    let (_slot, s) = db_token("db04");
    let key = new_aes(&s, "attr");
    let got = s.get_attributes(key, &[AttributeType::Value, AttributeType::Sensitive, AttributeType::Label]).unwrap();
    assert_eq!(got, vec![Attribute::Sensitive(true), Attribute::Label(b"attr".to_vec())], "CKA_VALUE never readable");
    s.update_attributes(key, &[Attribute::Label(b"renamed".to_vec()), Attribute::Encrypt(false)]).expect("modifiable");
    assert_eq!(rows("db04")[0].label, b"renamed");
    assert_eq!(
        rv(s.encrypt(&Mechanism::AesEcb, key, &[0u8; 16]).unwrap_err()),
        RvError::KeyFunctionNotPermitted,
        "new flags apply"
    );
    assert_eq!(rv(s.update_attributes(key, &[Attribute::Sensitive(false)]).unwrap_err()), RvError::AttributeReadOnly);
    assert_eq!(
        rv(s.update_attributes(key, &[Attribute::Class(ObjectClass::DATA)]).unwrap_err()),
        RvError::AttributeReadOnly
    );
    // Moving a key to another group needs p11shim users logged on to the session with 00000002 for both
    // groups (P11SHIM_Logon, tested from C in tests/c_api.rs): a session with none is refused.
    assert_eq!(rv(s.update_attributes(key, &[group_attr("Moved")]).unwrap_err()), RvError::ActionProhibited);
    assert_ne!(rows("db04")[0].group, "Moved");
    assert_eq!(
        rv(s.copy_object(key, &[group_attr("Moved")]).unwrap_err()),
        RvError::ActionProhibited,
        "nor may a copy go into another group"
    );
    assert!(shim_log().contains("denied") && shim_log().contains("P11SHIM_Logon"), "{}", shim_log());
    // Unextractable stored keys refuse C_WrapKey.
    s.update_attributes(key, &[Attribute::Extractable(false)]).unwrap();
    let wrapping = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[Attribute::Token(false), Attribute::ValueLen(32.into()), Attribute::Wrap(true)],
        )
        .unwrap();
    assert_eq!(rv(s.wrap_key(&Mechanism::AesKeyWrapPad, wrapping, key).unwrap_err()), RvError::KeyUnextractable);
    // The group attribute is never sent to the backend: on a pass-through object it is simply not there.
    let plain =
        s.generate_key(&Mechanism::AesKeyGen, &[Attribute::Token(false), Attribute::ValueLen(16.into())]).unwrap();
    assert_eq!(s.get_attributes(plain, &[AttributeType::VendorDefined(GROUP)]).unwrap(), vec![]);
    let mut t = aes_template("sess");
    t[0] = Attribute::Token(false);
    t.push(group_attr("X"));
    assert_eq!(rv(s.generate_key(&Mechanism::AesKeyGen, &t).unwrap_err()), RvError::AttributeTypeInvalid);
    // An unextractable, non-sensitive stored key: neither it nor a session copy of it shows its value.
    let hidden = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::ValueLen(16.into()),
                Attribute::Sensitive(false),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
            ],
        )
        .unwrap();
    assert_eq!(s.get_attributes(hidden, &[AttributeType::Value]).unwrap(), vec![]);
    let copy = s.copy_object(hidden, &[Attribute::Token(false)]).expect("a session copy");
    assert_eq!(s.get_attributes(copy, &[AttributeType::Value]).unwrap(), vec![], "the copy's value stays hidden");
}

pub fn destroy_deletes_the_row_and_other_processes_see_it() {
    let (_slot, s) = db_token("db05");
    let a = new_aes(&s, "gone");
    let b = new_aes(&s, "elsewhere");
    encrypt_roundtrip(&s, b).unwrap();
    s.destroy_object(a).expect("destroy");
    assert_eq!(rows("db05").len(), 1);
    assert_eq!(rv(s.encrypt(&Mechanism::AesEcb, a, &[0u8; 16]).unwrap_err()), RvError::KeyHandleInvalid);
    // Another process destroys `b` (pkcs11-tool through the shim); here its handle stops working.
    let out = Command::new("pkcs11-tool")
        .args([
            "--module",
            &common::shim_path().to_string_lossy(),
            "--token-label",
            "db05",
            "--login",
            "--pin",
            USER_PIN,
        ])
        .args(["--delete-object", "--type", "secrkey", "--label", "elsewhere"])
        .output()
        .expect("pkcs11-tool");
    assert!(out.status.success(), "pkcs11-tool --delete-object: {}", String::from_utf8_lossy(&out.stderr));
    assert!(rows("db05").is_empty());
    assert_eq!(
        refused_after_change(&s, b),
        RvError::KeyHandleInvalid,
        "a key destroyed elsewhere is not used from the cache"
    );
}

/// What a use of `key` ends in once this process has heard of another process's change to it. Hearing of
/// it takes a moment (PostgreSQL's notification, SQLite's watcher: about a millisecond, more on a loaded
/// machine), during which the key may still be used as it was; the README says so.
fn refused_after_change(s: &Session, key: ObjectHandle) -> RvError {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match s.encrypt(&Mechanism::AesEcb, key, &[0u8; 16]) {
            Err(e) => return rv(e),
            Ok(_) => {
                assert!(std::time::Instant::now() < deadline, "a change made elsewhere was not noticed in 5 s");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

pub fn keys_survive_a_restart_and_are_seen_by_other_processes() {
    let (_slot, s) = db_token("db06");
    let (public, _private) = ec_pair(&s, "signer", true);
    // Another process signs with the stored private key through the shim.
    let dir = common::test_dir();
    let data = dir.join("db06.data");
    let sig = dir.join("db06.sig");
    std::fs::write(&data, [5u8; 32]).unwrap();
    let out = Command::new("pkcs11-tool")
        .args([
            "--module",
            &common::shim_path().to_string_lossy(),
            "--token-label",
            "db06",
            "--login",
            "--pin",
            USER_PIN,
        ])
        .args(["--sign", "--mechanism", "ECDSA", "--label", "signer", "--input-file"])
        .arg(&data)
        .arg("--output-file")
        .arg(&sig)
        .output()
        .expect("pkcs11-tool");
    assert!(out.status.success(), "pkcs11-tool --sign: {}", String::from_utf8_lossy(&out.stderr));
    let signature = std::fs::read(&sig).unwrap();
    s.verify(&Mechanism::Ecdsa, public, &[5u8; 32], &signature).expect("the other process signed with the same key");
}

pub fn handles_survive_close_all_sessions_and_logout() {
    let (slot, s) = db_token("db07");
    let key = new_aes(&s, "stay");
    encrypt_roundtrip(&s, key).unwrap();
    let raw = common::functions(&common::shim_path());
    // SAFETY: a plain call with a slot id; the sessions it closes are not used again.
    assert_eq!(unsafe { raw.C_CloseAllSessions.unwrap()(slot.id()) }, 0, "C_CloseAllSessions");
    std::mem::forget(s);
    let s = user_session(slot);
    encrypt_roundtrip(&s, key).expect("after C_CloseAllSessions");
    s.logout().unwrap();
    assert!(s.encrypt(&Mechanism::AesEcb, key, &[0u8; 16]).is_err(), "a private key needs a login");
    let s = user_session(slot);
    encrypt_roundtrip(&s, key).expect("after logout and a new login");
}

/// A database token initialized with the HSM's own tool has no MBK set until an operator makes one. On a
/// device that keeps its own MBK there is nothing to make: the token works at once, and `mbk` says so.
pub fn missing_mbk_says_how_to_create_it() {
    let slot = common::new_token_on_backend("db08");
    let s = user_session(slot);
    if common::device_mbk() {
        let k = s.generate_key(&Mechanism::AesKeyGen, &aes_template("x")).expect("no MBK to create first");
        encrypt_roundtrip(&s, k).expect("and it works");
        let device = common::cssim_admin(&common::test_dir().join("cssim.toml"), &["mbk", "show"]);
        let device_fp = device.lines().find_map(|l| l.strip_prefix("fingerprint:")).expect("the device's").trim();
        for _ in 0..2 {
            let made = cli().args(["mbk", "create", "--token", "db08"]).output().unwrap();
            assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
            let text = String::from_utf8_lossy(&made.stdout);
            assert!(text.contains("keeps its own master backup key") && text.contains(device_fp), "{text}");
        }
        let shown = cli().args(["mbk", "show", "--token", "db08", "--json"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
        assert_eq!(v["kind"], "device");
        assert_eq!(v["fingerprint"], device_fp, "p11shim shows the device's own fingerprint");
        let dir = common::test_dir().join("db08-shares");
        let shares = ["mbk", "export-shares", "--token", "db08", "--threshold", "2", "--shares", "3", "--out-dir"];
        let shares: Vec<&str> = shares.into_iter().chain([dir.to_str().unwrap()]).collect();
        let request = ["mbk", "clone-request", "--token", "db08", "--out", dir.to_str().unwrap()];
        for (command, args) in [("export-shares", &shares[..]), ("clone-request", &request[..])] {
            let refused = cli().args(args).output().unwrap();
            assert!(!dir.exists(), "mbk {command} wrote nothing");
            assert_eq!(refused.status.code(), Some(5), "mbk {command} is refused: nothing of p11shim's to share");
            assert!(String::from_utf8_lossy(&refused.stderr).contains("cssim-admin mbk import"));
        }
        return;
    }
    let e = s.generate_key(&Mechanism::AesKeyGen, &aes_template("x")).unwrap_err();
    assert_eq!(rv(e), RvError::GeneralError);
    assert!(shim_log().contains("p11shim mbk create --token db08"), "log: {}", shim_log());
    let out = cli().args(["mbk", "show", "--token", "db08"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("p11shim mbk create --token db08"));
    // A second `mbk create` is refused: every stored key depends on the first.
    cli().args(["mbk", "create", "--token", "db08"]).output().unwrap();
    let again = cli().args(["mbk", "create", "--token", "db08"]).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already has a master backup key"));
    let shown = cli().args(["mbk", "show", "--token", "db08"]).output().unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    let fp = text.lines().find(|l| l.starts_with("fingerprint:")).expect("fingerprint line");
    assert_eq!(fp.split_whitespace().nth(1).unwrap().len(), 35, "{fp}");
}

/// A row edited in the database (each column in turn) is refused when loaded; other keys are unaffected.
pub fn edited_rows_are_refused() {
    let (_slot, s) = db_token("db09");
    let good = new_aes(&s, "good");
    type Edit = fn(&mut KeyRow);
    let edits: Vec<(&str, Edit)> = vec![
        ("group", |r| r.group = "Other".into()),
        ("label", |r| r.label = b"evil".to_vec()),
        ("id", |r| r.ckid = vec![9]),
        ("attrs (CKA_SIGN flipped)", |r| {
            let mut t = p11shim::attrs::Template::decode(&r.attrs).unwrap();
            let sign = t.bool(cryptoki_sys::CKA_SIGN).unwrap_or(false);
            t.set(p11shim::attrs::Attr::bool(cryptoki_sys::CKA_SIGN, !sign));
            r.attrs = t.encode();
        }),
        ("wrapped blob", |r| {
            let n = r.wrapped.len();
            r.wrapped[n - 1] ^= 1
        }),
        ("class", |r| r.class = 3),
        ("key type", |r| r.key_type = 0x10),
        ("wrap mechanism", |r| r.wrap_mech = 0x210B),
        ("mbk fingerprint", |r| r.mbk = "00000000-00000000-00000000-00000000".into()),
        ("mac", |r| r.mac[0] ^= 1),
    ];
    for (i, (what, edit)) in edits.into_iter().enumerate() {
        let label = format!("victim{i}");
        let key = new_aes(&s, &label);
        let row = rows("db09").into_iter().find(|r| r.label == label.as_bytes()).expect("victim row");
        let mut edited = row.clone();
        edit(&mut edited);
        edited.version += 1;
        store_op("update", &encode_row(&edited));
        assert_eq!(refused_after_change(&s, key), RvError::GeneralError, "edited {what}: refused");
        let log = shim_log();
        assert!(
            log.lines().any(|l| l.contains(&row.id) && l.contains("the key is refused")),
            "edited {what}: a log line names the key {} and says it is refused",
            row.id
        );
        encrypt_roundtrip(&s, good).unwrap_or_else(|e| panic!("after editing {what}, other keys still work: {e}"));
    }
}

/// Runs pkcs11-tool through the shim, logged in on token `token`, with `args`.
fn pkcs11_tool(token: &str, args: &[&str]) {
    let out = Command::new("pkcs11-tool")
        .args([
            "--module",
            &common::shim_path().to_string_lossy(),
            "--token-label",
            token,
            "--login",
            "--pin",
            USER_PIN,
        ])
        .args(args)
        .output()
        .expect("pkcs11-tool");
    assert!(out.status.success(), "pkcs11-tool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The rows the shim holds. A first use after a create or a find reads nothing more from the store while
/// nothing that concerns the key changed. With PostgreSQL, whose notifications name the changed row,
/// another process's new key does not make this one read again; SQLite knows only that something changed
/// and reads the row once more. A key destroyed elsewhere is read again (and found gone) with both.
pub fn held_rows_spare_the_store() {
    let (_slot, s) = db_token("db13");
    let made = new_aes(&s, "made");
    new_aes(&s, "found");
    let id = |label: &str| rows("db13").into_iter().find(|r| r.label == label.as_bytes()).expect("row").id;
    let (made_id, found_id) = (id("made"), id("found"));
    // This process's reads (pkcs11-tool's shim logs to the same file).
    let reads = |id: &str| {
        let (me, line) = (format!("p11shim[{}]", std::process::id()), format!("stored key {id}: reading its row"));
        shim_log().lines().filter(|l| l.contains(&me) && l.contains(&line)).count()
    };
    let found = s.find_objects(&[Attribute::Label(b"found".to_vec())]).unwrap();
    assert_eq!(found.len(), 1);
    // Another process makes a key in the same store.
    pkcs11_tool("db13", &["--keygen", "--key-type", "AES:32", "--label", "elsewhere"]);
    std::thread::sleep(std::time::Duration::from_millis(300)); // its change has been heard of here
    encrypt_roundtrip(&s, made).expect("first use of the key made here");
    encrypt_roundtrip(&s, found[0]).expect("first use of the key found here");
    let postgres = store_url().starts_with("postgres");
    for (what, id) in [("made", &made_id), ("found", &found_id)] {
        let n = reads(id);
        if postgres {
            assert_eq!(n, 0, "{what}: another key's change does not make the row be read again");
        } else {
            assert!(n <= 1, "{what}: read at most once ({n})");
        }
    }
    let before = reads(&found_id);
    pkcs11_tool("db13", &["--delete-object", "--type", "secrkey", "--label", "found"]);
    assert_eq!(refused_after_change(&s, found[0]), RvError::KeyHandleInvalid, "destroyed elsewhere");
    assert_eq!(reads(&found_id), before + 1, "its row was read again, and found gone");
    encrypt_roundtrip(&s, made).expect("the other key is unaffected");
}

/// Four processes create keys at once into one store: none lost, none doubled.
pub fn four_processes_create_at_once() {
    let (_slot, s) = db_token("db10");
    drop(s);
    let module = common::shim_path();
    let children: Vec<_> = (0..4)
        .map(|p| {
            let script = (0..10)
                .map(|i| {
                    format!(
                        "out=$(pkcs11-tool --module {} --token-label db10 --login --pin {USER_PIN} --keygen --key-type AES:16 --label p{p}k{i} 2>&1) || {{ echo \"p{p}k{i} failed: $out\" >&2; exit 1; }}",
                        module.display()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            Command::new("bash")
                .arg("-c")
                .arg(script)
                .envs(backend_for_child(&format!("creator{p}")))
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a creating process failed");
    }
    let mut labels: Vec<Vec<u8>> = rows("db10").into_iter().map(|r| r.label).collect();
    labels.sort();
    let mut want: Vec<Vec<u8>> = (0..4).flat_map(|p| (0..10).map(move |i| format!("p{p}k{i}").into_bytes())).collect();
    want.sort();
    assert_eq!(labels, want);
}

/// The backend of child processes that make keys at once or get killed. SoftHSM2: a copy of this binary's
/// token directory (same tokens, same MBKs) with its own softhsm2.conf, as SoftHSM2 is neither crash-safe
/// nor safe for several processes reading token files while one writes them, and these tests are about the
/// key store, which is shared. The simulator: the same device as this process (its state file is shared by
/// processes and crash-safe, like a network HSM).
fn backend_for_child(name: &str) -> Vec<(&'static str, PathBuf)> {
    match backend() {
        Backend::SoftHsm2 => vec![("SOFTHSM2_CONF", token_copy(name))],
        Backend::Simulator => vec![],
    }
}

fn token_copy(name: &str) -> PathBuf {
    let dir = common::test_dir();
    common::softhsm_copy(&dir, &dir.join(name))
}

/// kill -9 in the middle of creating keys leaves only complete rows, each of which loads.
///
/// Over SoftHSM2 the killed processes work on a copy of the token directory (same tokens, same MBK):
/// SoftHSM2 itself is not crash-safe, and this process's SoftHSM2 must not see its files half-written. The
/// simulator's device is crash-safe and shared: they work on this process's device.
pub fn kill_during_create_leaves_no_half_row() {
    let (slot, s) = db_token("db11");
    let child_backend = backend_for_child("killed");
    let module = common::shim_path();
    let script = format!(
        "for i in $(seq 1 200); do pkcs11-tool --module {} --token-label db11 --login --pin {USER_PIN} --keygen --key-type AES:16 --label k$i >/dev/null 2>&1; done",
        module.display()
    );
    // Kill the whole process group while a create is most likely in flight.
    let mut child = Command::new("setsid").args(["bash", "-c", &script]).envs(child_backend).spawn().expect("spawn");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // SAFETY: plain kill(2) of the child's process group.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
    let rows = rows("db11");
    assert!(!rows.is_empty(), "some keys were created before the kill");
    drop(s);
    let s = user_session(slot);
    for row in &rows {
        let h = s.find_objects(&[Attribute::Label(row.label.clone())]).unwrap();
        assert_eq!(h.len(), 1, "{:?}", row);
        s.encrypt(&Mechanism::AesEcb, h[0], &[0u8; 16]).unwrap_or_else(|e| panic!("row {} loads: {e}", row.id));
    }
}

/// Every way of making a token object stores it: C_CreateObject, C_UnwrapKey, C_DeriveKey, C_CopyObject.
pub fn every_creation_path_stores() {
    let (slot, s) = db_token("db12");
    // C_CreateObject: a secret key with its value, and a data object.
    let created = s
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Value(vec![0x11; 32]),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(b"imported".to_vec()),
        ])
        .expect("C_CreateObject of a token secret key");
    let data = s
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Label(b"note".to_vec()),
            Attribute::Value(b"hello".to_vec()),
        ])
        .expect("C_CreateObject of a token data object");
    assert_eq!(s.get_attributes(data, &[AttributeType::Value]).unwrap(), vec![Attribute::Value(b"hello".to_vec())]);
    // The same value in a native session key gives the same ciphertext: the stored key is that key.
    let native = s
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Value(vec![0x11; 32]),
            Attribute::Encrypt(true),
        ])
        .unwrap();
    let block = [3u8; 16];
    assert_eq!(
        s.encrypt(&Mechanism::AesEcb, created, &block).unwrap(),
        s.encrypt(&Mechanism::AesEcb, native, &block).unwrap()
    );
    // C_UnwrapKey into a token key, under a stored wrapping key.
    let kek = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::ValueLen(32.into()),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
                Attribute::Label(b"kek".to_vec()),
            ],
        )
        .unwrap();
    let wrapping_native = s
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Value(vec![0x22; 32]),
            Attribute::Extractable(true),
            Attribute::Encrypt(true),
        ])
        .unwrap();
    let wrapped = s.wrap_key(&Mechanism::AesKeyWrapPad, kek, wrapping_native).expect("wrap under a stored key");
    let unwrapped = s
        .unwrap_key(
            &Mechanism::AesKeyWrapPad,
            kek,
            &wrapped,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(true),
                Attribute::Encrypt(true),
                Attribute::Label(b"unwrapped".to_vec()),
            ],
        )
        .expect("C_UnwrapKey into a token key");
    assert_eq!(
        s.encrypt(&Mechanism::AesEcb, unwrapped, &block).unwrap(),
        s.encrypt(&Mechanism::AesEcb, wrapping_native, &block).unwrap()
    );
    // C_DeriveKey (ECDH) into a token key, from a stored private key.
    let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let (_pa, qa) = s
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[Attribute::Token(true), Attribute::EcParams(p256), Attribute::Label(b"alice".to_vec())],
            &[Attribute::Token(true), Attribute::Derive(true), Attribute::Label(b"alice".to_vec())],
        )
        .unwrap();
    let (pb, _qb) = ec_pair(&s, "bob", false);
    let point = match s.get_attributes(pb, &[AttributeType::EcPoint]).unwrap().pop() {
        Some(Attribute::EcPoint(p)) => p,
        other => panic!("EC point: {other:?}"),
    };
    let raw_point = if point.len() == 67 && point[0] == 0x04 { point[2..].to_vec() } else { point };
    let params = cryptoki::mechanism::elliptic_curve::Ecdh1DeriveParams::new(
        cryptoki::mechanism::elliptic_curve::EcKdf::null(),
        &raw_point,
    );
    let derived = s
        .derive_key(
            &Mechanism::Ecdh1Derive(params),
            qa,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Token(true),
                Attribute::ValueLen(32.into()),
                Attribute::Label(b"derived".to_vec()),
                Attribute::Sign(true),
            ],
        )
        .expect("C_DeriveKey into a token key");
    s.sign(&Mechanism::Sha256Hmac, derived, b"x").expect("use the derived stored key");
    // C_CopyObject: a stored key's copy is stored (same group unless given); a native key copied as a token
    // object is stored.
    let copy = s.copy_object(created, &[Attribute::Label(b"copy".to_vec())]).expect("copy a stored key");
    assert!(copy.handle() & (1 << 63) != 0);
    assert_eq!(
        s.encrypt(&Mechanism::AesEcb, copy, &block).unwrap(),
        s.encrypt(&Mechanism::AesEcb, native, &block).unwrap()
    );
    // An unextractable key cannot be wrapped into the store (nor made extractable by a copy): the HSM keeps the
    // copy as an ordinary token object of the token's group, and the log says why.
    // A device that keeps its own MBK backs up any key, so there the copy is stored as it is.
    let kept = s
        .copy_object(native, &[Attribute::Token(true), Attribute::Label(b"kept".to_vec())])
        .expect("an unextractable key copied as a token object");
    if common::device_mbk() {
        assert!(kept.handle() & (1 << 63) != 0, "stored as the device's blob");
        assert!(rows("db12").iter().any(|r| r.label == b"kept"), "its row");
    } else {
        assert!(kept.handle() & (1 << 63) == 0, "a backend handle: the HSM holds it");
        assert!(
            shim_log().contains("kept in the HSM as an ordinary token object (group \"G12\")"),
            "a log line says why: {}",
            shim_log()
        );
    }
    assert_eq!(
        s.encrypt(&Mechanism::AesEcb, kept, &block).unwrap(),
        s.encrypt(&Mechanism::AesEcb, native, &block).unwrap()
    );
    assert_eq!(
        s.get_attributes(kept, &[AttributeType::Token, AttributeType::Extractable]).unwrap(),
        vec![Attribute::Token(true), Attribute::Extractable(false)]
    );
    // A key whose value may be read cannot be stored (nothing may load it readable): the HSM keeps its copy.
    let readable = s
        .copy_object(wrapping_native, &[Attribute::Token(true), Attribute::Label(b"readable".to_vec())])
        .expect("copy a readable native key → token");
    assert!(readable.handle() & (1 << 63) == 0, "kept in the HSM");
    assert!(shim_log().contains("because its value can be read"), "{}", shim_log());
    // A sensitive key extractable under trusted keys only is wrapped into the store as it is.
    let adoptable = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Encrypt(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(true),
                Attribute::WrapWithTrusted(true),
            ],
        )
        .unwrap();
    let adopted = s
        .copy_object(adoptable, &[Attribute::Token(true), Attribute::Label(b"adopted".to_vec())])
        .expect("copy native → token");
    assert!(adopted.handle() & (1 << 63) != 0);
    assert_eq!(
        s.encrypt(&Mechanism::AesEcb, adopted, &block).unwrap(),
        s.encrypt(&Mechanism::AesEcb, adoptable, &block).unwrap()
    );
    let mut labels: Vec<String> = rows("db12").iter().map(|r| String::from_utf8_lossy(&r.label).into_owned()).collect();
    labels.sort();
    let mut expected = vec!["adopted", "alice", "alice", "copy", "derived", "imported", "kek", "note", "unwrapped"];
    if common::device_mbk() {
        expected.insert(7, "kept");
    }
    assert_eq!(labels, expected);
    // A read-only session cannot make token objects.
    let ro = pkcs11().open_ro_session(slot).unwrap();
    assert_eq!(rv(ro.generate_key(&Mechanism::AesKeyGen, &aes_template("ro")).unwrap_err()), RvError::SessionReadOnly);
}

/// The pass-through slot of the same config behaves as without a store.
pub fn plain_slot_is_untouched() {
    let slot = new_token("plain");
    let s = user_session(slot);
    let key = s.generate_key(&Mechanism::AesKeyGen, &aes_template("native")).unwrap();
    assert!(key.handle() & (1 << 63) == 0, "a native handle");
    assert!(rows("plain").is_empty());
    encrypt_roundtrip(&s, key).unwrap();
    let mut t = aes_template("g");
    t.push(group_attr("X"));
    assert_eq!(rv(s.generate_key(&Mechanism::AesKeyGen, &t).unwrap_err()), RvError::AttributeTypeInvalid);
}

pub fn config_path() -> PathBuf {
    common::test_dir().join("p11shim.toml")
}

/// One #[test] per case, in a binary that defines `fn init()` choosing its engine; and `store_child` and
/// `custody_child`. Every binary runs every case: `vault_cases!();`.
#[macro_export]
macro_rules! vault_cases {
    () => {
        vault_cases!(
            stored_key_is_a_row_not_an_hsm_object,
            stored_keys_sign_verify_and_mac,
            find_by_any_attribute_and_group,
            attributes_follow_the_spec,
            destroy_deletes_the_row_and_other_processes_see_it,
            keys_survive_a_restart_and_are_seen_by_other_processes,
            handles_survive_close_all_sessions_and_logout,
            missing_mbk_says_how_to_create_it,
            edited_rows_are_refused,
            four_processes_create_at_once,
            kill_during_create_leaves_no_half_row,
            plain_slot_is_untouched,
            every_creation_path_stores,
            held_rows_spare_the_store,
            custody_holds_against_a_pin_holder,
            custody_holds_without_the_pin,
            forged_rows_never_give_the_value,
            always_authenticate_needs_a_context_login,
            unwrappable_keys_are_kept_by_the_hsm,
            init_token_empties_a_database_slot,
            same_attributes_as_pass_through,
            the_hsm_holds_at_most_hsm_cache_copies,
            an_operation_keeps_its_key_through_evictions,
            threads_share_the_cache_without_losing_a_call,
        );
    };
    ($($name:ident),* $(,)?) => {
    #[test]
    fn store_child() {
        vault_cases::store_child();
    }
    #[test]
    fn custody_child() {
        vault_cases::custody_child();
    }
    $(
        #[test]
        #[serial_test::serial]
        fn $name() {
            init();
            vault_cases::$name();
        }
    )* };
}
