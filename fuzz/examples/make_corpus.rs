//! Writes the seed corpus (fuzz/corpus/TARGET/NAME) with the library's own writers: backups by
//! `BackupWriter` and `db::backup` sealed under the corpus MAC key, share texts by `shamir::split` and
//! `to_text`, stored attributes by `Template::encode`, a users row with a real argon2id PHC string and an
//! Ed25519 key, configuration files, and templates in the `template` target's input layout.
//!
//! cargo run --manifest-path fuzz/Cargo.toml --example make_corpus -- fuzz/corpus

use cryptoki_sys::*;
use p11shim::attrs::{Attr, Template, CKA_P11SHIM_GROUP};
use p11shim::backup::db;
use p11shim::backup::format::{BackupWriter, Header, Record, RecordKind};
use p11shim::backup::shamir;
use p11shim::store::{KeyRow, UserRow};
use p11shim_fuzz::{hmac_sealer, MemStore};
use std::fs;
use std::path::{Path, PathBuf};

const FP: &str = "0123abcd-4567ef01-89abcdef-00112233";

fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join(name), bytes).unwrap();
}

fn aes_key(label: &str, group: &str) -> Template {
    Template(vec![
        Attr::ulong(CKA_CLASS, CKO_SECRET_KEY),
        Attr::ulong(CKA_KEY_TYPE, CKK_AES),
        Attr::bytes(CKA_LABEL, label.as_bytes()),
        Attr::bytes(CKA_ID, &[0x01, 0x02]),
        Attr::bool(CKA_TOKEN, true),
        Attr::bool(CKA_SENSITIVE, true),
        Attr::bool(CKA_ENCRYPT, true),
        Attr::ulong(CKA_VALUE_LEN, 32),
        Attr::bytes(CKA_P11SHIM_GROUP, group.as_bytes()),
    ])
}

fn wrapping_key() -> Template {
    Template(vec![
        Attr::ulong(CKA_CLASS, CKO_SECRET_KEY),
        Attr::ulong(CKA_KEY_TYPE, CKK_AES),
        Attr::bool(CKA_WRAP, true),
        Attr::mechanisms(CKA_ALLOWED_MECHANISMS, &[CKM_AES_KEY_WRAP_PAD, CKM_AES_GCM]),
        Attr::array(
            CKA_WRAP_TEMPLATE,
            vec![Attr::ulong(CKA_CLASS, CKO_SECRET_KEY), Attr::bool(CKA_EXTRACTABLE, false)],
        ),
        Attr::array(CKA_UNWRAP_TEMPLATE, vec![Attr::bool(CKA_SENSITIVE, true)]),
    ])
}

fn rsa_public() -> Template {
    Template(vec![
        Attr::ulong(CKA_CLASS, CKO_PUBLIC_KEY),
        Attr::ulong(CKA_KEY_TYPE, CKK_RSA),
        Attr::bytes(CKA_MODULUS, &[0xc3; 128]),
        Attr::bytes(CKA_PUBLIC_EXPONENT, &[1, 0, 1]),
        Attr::ulong(CKA_MODULUS_BITS, 1024),
        Attr::bool(CKA_VERIFY, true),
    ])
}

fn row(i: u8, attrs: &Template) -> KeyRow {
    let class = attrs.ulong(CKA_CLASS).unwrap_or(CKO_SECRET_KEY);
    KeyRow {
        id: format!("{i:032x}"),
        token: "prod-db".into(),
        group: format!("ProdKey{i}"),
        class,
        key_type: attrs.ulong(CKA_KEY_TYPE).unwrap_or(CKK_AES),
        label: attrs.bytes(CKA_LABEL).unwrap_or(b"key").to_vec(),
        ckid: vec![i],
        attrs: attrs.encode(),
        wrapped: if class == CKO_PUBLIC_KEY { Vec::new() } else { vec![0xa5 ^ i; 40] },
        wrap_mech: CKM_AES_KEY_WRAP_PAD,
        mbk: FP.into(),
        mac: hmac_sealer().mac(&[i]).to_vec(),
        version: 1,
    }
}

fn record(r: &KeyRow, kind: RecordKind) -> Record {
    Record {
        kind,
        id: r.id.clone(),
        token: r.token.clone(),
        group: r.group.clone(),
        class: r.class,
        key_type: r.key_type,
        label: r.label.clone(),
        ckid: r.ckid.clone(),
        attrs: r.attrs.clone(),
        wrapped: r.wrapped.clone(),
        wrap_mech: r.wrap_mech,
        mbk: r.mbk.clone(),
    }
}

fn keys() -> Vec<KeyRow> {
    vec![row(1, &aes_key("k1", "ProdKey1")), row(2, &wrapping_key()), row(3, &rsa_public())]
}

fn sign_user() -> UserRow {
    let public = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes();
    UserRow {
        name: "alice".into(),
        perm: "00000002".into(),
        group_regex: "Prod.*".into(),
        auth: "sign".into(),
        secret: public.to_vec(),
        version: 1,
        failed: 0,
        last_failed: 0,
        mac: Vec::new(),
    }
}

fn password_user() -> UserRow {
    use argon2::password_hash::PasswordHasher;
    let phc = argon2::Argon2::default().hash_password(b"correct horse battery").unwrap().to_string();
    UserRow {
        name: "bob".into(),
        perm: "12000000".into(),
        group_regex: ".*".into(),
        auth: "password".into(),
        secret: phc.into_bytes(),
        version: 1,
        failed: 0,
        last_failed: 0,
        mac: Vec::new(),
    }
}

fn user_row_input(u: &UserRow, group: &str) -> Vec<u8> {
    let (name, perm, regex, auth, failed, last) = (&u.name, &u.perm, &u.group_regex, &u.auth, u.failed, u.last_failed);
    let mut v = format!("{name}\n{perm}\n{regex}\n{auth}\n{group}\n{failed}\n{last}\n").into_bytes();
    v.extend_from_slice(&u.secret);
    v
}

fn backups(dir: &Path, scratch: &Path) {
    for (name, rows) in [("empty.p11b", Vec::new()), ("one.p11b", keys()[..1].to_vec()), ("three.p11b", keys())] {
        let path = scratch.join(name);
        let header = Header::new(FP, "2026-01-02T03:04:05Z", "host1:/var/lib/p11shim/keys.db", "Prod.*");
        let mut w = BackupWriter::create(&path, header).unwrap();
        for (i, r) in rows.iter().enumerate() {
            let kind = if i == 1 { RecordKind::Hsm } else { RecordKind::Stored };
            w.write(&record(r, kind), &hmac_sealer()).unwrap();
        }
        w.finish(&hmac_sealer()).unwrap();
        put(dir, "backup_file", name, &fs::read(&path).unwrap());
    }
}

fn db_backups(dir: &Path, scratch: &Path) {
    for (name, rows, users, with_users) in [
        ("empty.p11db", Vec::new(), Vec::new(), false),
        ("keys.p11db", keys(), Vec::new(), false),
        ("keys-users.p11db", keys()[..2].to_vec(), vec![sign_user(), password_user()], true),
    ] {
        let path = scratch.join(name);
        let store = MemStore::with(rows, users);
        db::backup(&store, &hmac_sealer(), &path, with_users).unwrap();
        put(dir, "db_backup", name, &fs::read(&path).unwrap());
    }
}

fn shares(dir: &Path) {
    let secret: Vec<u8> = (0..32).collect();
    for (m, n, take) in [(2u8, 3u8, 2usize), (3, 5, 3), (2, 2, 1), (3, 4, 4)] {
        let split = shamir::split(&secret, m, n).unwrap();
        let text: String = split[..take].iter().map(|s| format!("{}\n", s.to_text(n, FP).unwrap().as_str())).collect();
        put(dir, "mbk_share", &format!("{m}of{n}-{take}.txt"), text.as_bytes());
    }
    // The same shares as the target's structured form: count, threshold, length, then id and data per share.
    let split = shamir::split(&secret[..8], 2, 3).unwrap();
    let mut raw = vec![2, 2, 8];
    for s in &split[..2] {
        raw.push(s.id);
        raw.extend_from_slice(&s.data);
    }
    put(dir, "mbk_share", "structured-2of3", &raw);
}

fn attrs(dir: &Path) {
    put(dir, "stored_attrs", "aes", &aes_key("k1", "ProdKey1").encode());
    put(dir, "stored_attrs", "wrapping", &wrapping_key().encode());
    put(dir, "stored_attrs", "rsa-public", &rsa_public().encode());
    put(dir, "stored_attrs", "empty", &[]);
}

fn users(dir: &Path) {
    put(dir, "user_row", "sign", &user_row_input(&sign_user(), "ProdKey1"));
    put(dir, "user_row", "password", &user_row_input(&password_user(), "Any"));
    let admin = UserRow { perm: "12000000".into(), group_regex: "(Prod|Test)[A-Z]+[0-9]{1,3}".into(), ..sign_user() };
    put(dir, "user_row", "sign-admin", &user_row_input(&admin, "TestKEY42"));
    let throttled = UserRow { failed: 2, last_failed: 1_767_225_600_000, ..sign_user() };
    put(dir, "user_row", "sign-throttled", &user_row_input(&throttled, "ProdKey1"));
}

fn configs(dir: &Path) {
    let files = [
        ("minimal.toml", "module = \"/usr/lib/softhsm/libsofthsm2.so\"\n"),
        (
            "full.toml",
            r#"module = "/usr/lib/softhsm/libsofthsm2.so"
log_file = "p11shim.log"
log_level = "debug"
mode = "standard"

[store]
url = "sqlite:keys.db"
hsm_cache = 64

[[slot]]
token = "prod-db"
storage = "database"
default_group = "ProdKey"

[[slot]]
token = "hsm-only"
storage = "hsm"

[logon]
lockout_after = 5
delay = "250ms"
delay_max = "5m"

[audit]
head_file = "/var/lib/p11shim/audit-head"
"#,
        ),
        (
            "postgres.toml",
            r#"module = "/opt/hsm/lib/libcs_pkcs11_R3.so"
mode = "fips"
[store]
url = "postgres://p11shim:secret@db.example:5432/keys"
[[slot]]
token = "shared"
storage = "database"
"#,
        ),
        ("bad.toml", "module = 3\n[store]\nhsm_cache = 0\n"),
    ];
    for (name, text) in files {
        put(dir, "config", name, text.as_bytes());
    }
}

/// The `template` target's input: flags, count, then per attribute a type index (into its TYPES), a mode and
/// the mode's bytes; then one answer mode per attribute read.
fn templates(dir: &Path) {
    const CLASS: u8 = 0;
    const LABEL: u8 = 2;
    const SENSITIVE: u8 = 5;
    const WRAP_TEMPLATE: u8 = 6;
    const ALLOWED_MECHANISMS: u8 = 9;
    const GROUP: u8 = 10;
    let bytes = |ty: u8, value: &[u8]| [&[ty, 0, value.len() as u8][..], value].concat();
    let class = bytes(CLASS, &CKO_SECRET_KEY.to_ne_bytes());
    let label = bytes(LABEL, b"my key");
    let mechanisms = bytes(ALLOWED_MECHANISMS, &[CKM_AES_GCM.to_ne_bytes(), CKM_AES_CBC.to_ne_bytes()].concat());
    // An attribute array (mode 2, 1 byte off its alignment) of two attributes.
    let wrap = [&[WRAP_TEMPLATE, 2 | 4, 2][..], &bytes(SENSITIVE, &[1]), &label].concat();
    let seeds: [(&str, Vec<u8>); 4] = [
        ("plain", [&[4, 3][..], &class, &label, &bytes(GROUP, b"ProdKey"), &[0, 2, 6]].concat()),
        ("mechanisms", [&[4, 2][..], &class, &mechanisms, &[2, 2]].concat()),
        ("wrap-template", [&[4, 2][..], &class, &wrap, &[2, 2, 1, 8, 3]].concat()),
        ("null-value", [&[4, 1][..], &[LABEL, 1, 0][..], &[0]].concat()),
    ];
    for (name, seed) in seeds {
        put(dir, "template", name, &seed);
    }
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/corpus".into()));
    let scratch = tempfile::tempdir().unwrap();
    backups(&dir, scratch.path());
    db_backups(&dir, scratch.path());
    shares(&dir);
    attrs(&dir);
    users(&dir);
    configs(&dir);
    templates(&dir);
    println!("seed corpus written to {}", dir.display());
}
