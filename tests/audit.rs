//! The audit log: a hash chain in the key store, each entry sealed by a MAC made in the HSM, and its heads
//! appended to a file beside the config, that `audit::verify` and `p11shim audit verify` check, finding the
//! first edited, removed, reordered, re-hashed or cut-off entry; and a log that cannot be written makes the
//! operation fail. Both engines; the database is edited behind the store's back the way a writer of the
//! database would (no shim is loaded in this process, so a second SQLite connection here is safe). The
//! library tests seal in software with a key of their own; the command's tests seal in SoftHSM2.

mod common;

use common::pg::TestDb;
use common::sealer::SoftwareSealer;
use p11shim::audit::{self, Trail};
use p11shim::auth::{self, Logons, NewUser};
use p11shim::config::{LogonPolicy, Mode};
use p11shim::store::{self, AuditEntry, KeyStore};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

enum Fixture {
    Sqlite { dir: tempfile::TempDir, path: PathBuf, url: String },
    Postgres { dir: tempfile::TempDir, db: TestDb },
}

fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let url = format!("sqlite:{}", path.display());
    Fixture::Sqlite { dir, path, url }
}

fn postgres() -> Fixture {
    Fixture::Postgres { dir: tempfile::tempdir().unwrap(), db: TestDb::fresh() }
}

impl Fixture {
    fn url(&self) -> &str {
        match self {
            Fixture::Sqlite { url, .. } => url,
            Fixture::Postgres { db, .. } => db.url(),
        }
    }
    fn dir(&self) -> &Path {
        match self {
            Fixture::Sqlite { dir, .. } | Fixture::Postgres { dir, .. } => dir.path(),
        }
    }
    fn open(&self) -> Box<dyn KeyStore> {
        store::open(self.url()).unwrap()
    }
    /// Runs `sql` on a connection of its own, bypassing the store.
    fn raw(&self, sql: &str) {
        match self {
            Fixture::Sqlite { path, .. } => rusqlite::Connection::open(path).unwrap().execute_batch(sql).unwrap(),
            Fixture::Postgres { db, .. } => {
                ::postgres::Client::connect(db.url(), ::postgres::NoTls).unwrap().batch_execute(sql).unwrap()
            }
        }
    }
}

macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(&super::sqlite()) } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::$name(&super::postgres()) } )*
        }
    };
}

both_engines!(
    an_untouched_log_verifies,
    an_edited_field_is_found_at_its_entry,
    a_rehashed_tail_is_found_by_its_mac,
    a_tail_rewritten_with_the_mac_key_is_found_by_the_head_file,
    a_truncated_log_is_found_by_the_head_file,
    an_unsealed_entry_after_sealed_ones_is_found,
    entries_from_before_sealing_are_vouched_for_by_the_first_sealed_one,
    a_removed_entry_is_named,
    a_removed_first_entry_is_named,
    swapped_entries_are_found_at_the_first_of_them,
    an_unwritable_log_fails_the_operation_and_still_reports_the_refusal,
    cli_show_and_verify,
);

static SEALER: std::sync::LazyLock<SoftwareSealer> =
    std::sync::LazyLock::new(|| SoftwareSealer::new(b"audit test MAC key"));

/// The fixture's trail: sealed by [`SEALER`], heads in DIR/audit.head.
fn trail<'a>(fx: &Fixture, store: &'a dyn KeyStore) -> Trail<'a> {
    Trail { store, sealer: Some(&*SEALER), also: Vec::new(), head: Some(fx.dir().join("audit.head")), mode: Mode::Fips }
}

/// A store with five entries: seq 1..=5, actions "action 1".."action 5".
fn five_entries(fx: &Fixture) -> Box<dyn KeyStore> {
    let store = fx.open();
    for n in 1..=5 {
        trail(fx, &*store).record("alice,bob", &format!("action {n}"), "Prod.*", n, "ok").unwrap();
    }
    store
}

fn entries(store: &dyn KeyStore) -> Vec<AuditEntry> {
    let mut all = Vec::new();
    store
        .audit_scan(&mut |e| {
            all.push(e);
            Ok(())
        })
        .unwrap();
    all
}

fn first_bad(fx: &Fixture, store: &dyn KeyStore) -> (i64, String) {
    let report = audit::verify(&trail(fx, store)).unwrap();
    let bad = report.first_bad.expect("verify must find the break");
    assert!(report.head.is_none());
    (bad.seq, bad.reason)
}

fn hex_literal(fx: &Fixture, bytes: &[u8]) -> String {
    match fx {
        Fixture::Sqlite { .. } => format!("x'{}'", hex::encode(bytes)),
        Fixture::Postgres { .. } => format!("'\\x{}'::bytea", hex::encode(bytes)),
    }
}

/// What a writer of the database does to hide an edit of entry `from`: recomputes the hash of it and of
/// every entry after it, each linked to the one before; with `mac`, it can also seal them (someone who can
/// use the HSM's MAC key: a PIN holder, or anyone with a session on the HSM).
fn rewrite_tail(fx: &Fixture, store: &dyn KeyStore, from: i64, mac: bool) {
    let mut prev = Vec::new();
    for mut e in entries(store) {
        if e.seq < from {
            prev = e.hash;
            continue;
        }
        if e.seq == from {
            e.draft.result = "ok (nothing happened here)".into();
        }
        let hash = AuditEntry::compute_hash(e.seq, &prev, &e.draft);
        let seal = if mac { SEALER.mac(&audit::seal_input(&e.mbk, &hash)).to_vec() } else { e.mac.clone() };
        fx.raw(&format!(
            "UPDATE audit SET result = '{}', prev = {}, hash = {}, mac = {} WHERE seq = {}",
            e.draft.result,
            hex_literal(fx, &prev),
            hex_literal(fx, &hash),
            hex_literal(fx, &seal),
            e.seq
        ));
        prev = hash;
    }
}

fn an_untouched_log_verifies(fx: &Fixture) {
    let store = fx.open();
    let empty = audit::verify(&trail(fx, &*store)).unwrap();
    assert!(empty.ok() && empty.entries == 0 && empty.head.is_none());
    let store = five_entries(fx);
    let report = audit::verify(&trail(fx, &*store)).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!((report.entries, report.sealed, report.unsealed), (5, 5, 0));
    assert_eq!(report.head_file, Some((fx.dir().join("audit.head"), Some(5))));
    let last = entries(&*store).pop().unwrap();
    assert_eq!(report.head, Some((5, hex::encode(&last.hash))));
    assert_eq!((last.draft.who.as_str(), last.draft.count, last.draft.group.as_str()), ("alice,bob", 5, "Prod.*"));
    assert_eq!(last.draft.mode, "fips", "the entry records the mode it ran in");
    assert!(last.draft.time.ends_with('Z') && last.draft.time.len() == 27, "RFC 3339 UTC: {}", last.draft.time);
    assert_eq!(last.mac, SEALER.mac(&audit::seal_input("", &last.hash)), "sealed over its hash");
    let checked = report.checked().join("\n");
    assert!(checked.contains("5 entries sealed") && checked.contains("head file"), "{checked}");
    // The head file holds one line per entry, mode 0600.
    use std::os::unix::fs::PermissionsExt;
    let head = fx.dir().join("audit.head");
    assert_eq!(std::fs::read_to_string(&head).unwrap().lines().count(), 5);
    assert_eq!(std::fs::metadata(&head).unwrap().permissions().mode() & 0o777, 0o600);
}

fn an_edited_field_is_found_at_its_entry(fx: &Fixture) {
    for (column, value) in [
        ("count", "99"),
        ("who", "'mallory'"),
        ("result", "'ok!'"),
        ("action", "'x'"),
        ("grp", "''"),
        ("time", "'2000-01-01T00:00:00Z'"),
        ("mode", "'standard'"),
    ] {
        let store = five_entries(fx);
        fx.raw(&format!("UPDATE audit SET {column} = {value} WHERE seq = 3"));
        let (seq, reason) = first_bad(fx, &*store);
        assert_eq!(seq, 3, "{column}");
        assert!(reason.contains("edited"), "{column}: {reason}");
        fx.raw("DELETE FROM audit");
        std::fs::remove_file(fx.dir().join("audit.head")).unwrap();
    }
}

/// The attack: edit an entry and re-hash every later one. The hashes chain again, but the MACs
/// (made in the HSM over each hash) do not verify.
fn a_rehashed_tail_is_found_by_its_mac(fx: &Fixture) {
    let store = five_entries(fx);
    rewrite_tail(fx, &*store, 3, false);
    let (seq, reason) = first_bad(fx, &*store);
    assert_eq!(seq, 3);
    assert!(reason.contains("MAC does not verify"), "{reason}");
}

/// Someone who can also use the HSM's MAC key re-seals the rewritten tail: the head file, out of the
/// database's reach, still has the hash entry 5 had when it was written.
fn a_tail_rewritten_with_the_mac_key_is_found_by_the_head_file(fx: &Fixture) {
    let store = five_entries(fx);
    rewrite_tail(fx, &*store, 3, true);
    let (seq, reason) = first_bad(fx, &*store);
    assert_eq!(seq, 5, "the highest head the file recorded");
    assert!(reason.contains("head file") && reason.contains("rewritten"), "{reason}");
    // Without the head file the rewrite would pass: this is what the file is for.
    let blind = Trail { head: None, ..trail(fx, &*store) };
    assert!(audit::verify(&blind).unwrap().ok());
}

fn a_truncated_log_is_found_by_the_head_file(fx: &Fixture) {
    let store = five_entries(fx);
    fx.raw("DELETE FROM audit WHERE seq >= 4");
    let (seq, reason) = first_bad(fx, &*store);
    assert_eq!(seq, 4);
    assert!(reason.contains("ends at entry 3") && reason.contains("truncated"), "{reason}");
    // Emptied altogether.
    fx.raw("DELETE FROM audit");
    assert_eq!(first_bad(fx, &*store).0, 1);
}

fn an_unsealed_entry_after_sealed_ones_is_found(fx: &Fixture) {
    let store = five_entries(fx);
    fx.raw(&format!("UPDATE audit SET mac = {} WHERE seq = 4", hex_literal(fx, &[])));
    let (seq, reason) = first_bad(fx, &*store);
    assert_eq!(seq, 4);
    assert!(reason.contains("not sealed, after sealed entries"), "{reason}");
    // And a process without the MAC key cannot append to a sealed log at all.
    let unsealed = Trail { sealer: None, ..trail(fx, &*store) };
    let err = unsealed.record("-", "mbk create", "", 0, "failed").unwrap_err().to_string();
    assert!(err.contains("no MBK set to seal with"), "{err}");
}

/// A log written before sealing began (an earlier version, or before the token had an MBK set): its entries
/// are unsealed, and the first sealed entry, which chains their hashes, vouches for them; an edit among them
/// breaks the chain there.
fn entries_from_before_sealing_are_vouched_for_by_the_first_sealed_one(fx: &Fixture) {
    let store = fx.open();
    let early = Trail { sealer: None, ..trail(fx, &*store) };
    early.record("SO of t", "init", "", 0, "ok").unwrap();
    early.record("SO of t", "mbk create", "", 0, "failed: no PIN").unwrap();
    trail(fx, &*store).record("admin", "user add bob", "", 0, "ok").unwrap();
    let report = audit::verify(&trail(fx, &*store)).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!((report.unsealed, report.sealed), (2, 1));
    fx.raw("UPDATE audit SET result = 'ok' WHERE seq = 2");
    assert_eq!(first_bad(fx, &*store).0, 2);
}

fn a_removed_entry_is_named(fx: &Fixture) {
    let store = five_entries(fx);
    fx.raw("DELETE FROM audit WHERE seq = 3");
    let (seq, reason) = first_bad(fx, &*store);
    assert_eq!(seq, 3);
    assert!(reason.contains("missing") && reason.contains("removed"), "{reason}");
}

fn a_removed_first_entry_is_named(fx: &Fixture) {
    let store = five_entries(fx);
    fx.raw("DELETE FROM audit WHERE seq = 1");
    assert_eq!(first_bad(fx, &*store).0, 1);
}

fn swapped_entries_are_found_at_the_first_of_them(fx: &Fixture) {
    let store = five_entries(fx);
    fx.raw(
        "UPDATE audit SET seq = -1 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 4; \
         UPDATE audit SET seq = 4 WHERE seq = -1;",
    );
    let (seq, reason) = first_bad(fx, &*store);
    assert_eq!(seq, 2);
    assert!(reason.contains("does not follow entry 1"), "{reason}");
}

fn an_unwritable_log_fails_the_operation_and_still_reports_the_refusal(fx: &Fixture) {
    let store = fx.open();
    fx.raw("ALTER TABLE audit RENAME TO audit_gone");
    let t = trail(fx, &*store);
    let err = t.record("alice", "backup", "Prod", 3, "ok").unwrap_err();
    assert!(err.to_string().contains("cannot write the audit log entry for \"backup\""), "{err}");
    // A refusal is reported with the audit failure.
    let message = t.record_refusal("-", "backup", "Prod", "backup denied: needs 00000002");
    assert!(message.starts_with("backup denied: needs 00000002 (and cannot write the audit log"), "{message}");
    // Through the user administration: a refused add says both; the permission check still holds.
    let user = NewUser {
        name: "first".into(),
        perm: "10000000".into(),
        group_regex: ".*".into(),
        credential: auth::Credential::SignKey([0x5A; 32]),
    };
    let err = auth::add_user(&t, &Logons::new(), None, user).unwrap_err().to_string();
    assert!(
        err.contains("only be created with the token's SO PIN") && err.contains("cannot write the audit log"),
        "{err}"
    );
    assert!(store.user_list().unwrap().is_empty());
    // A failed logon is still a failed logon.
    let err = Logons::new().logon_password(&t, &LogonPolicy::default(), "nobody", b"password").unwrap_err().to_string();
    assert!(err.starts_with("logon failed for nobody (and cannot write the audit log"), "{err}");
}

/// The command on a real token: what it writes is sealed by SoftHSM2's MAC key and verifies; an attacker's
/// re-hashed tail is found by its MAC; a tail re-sealed with the HSM's MAC key (which anyone with a session on
/// the token can use) is found by the head file.
fn cli_show_and_verify(fx: &Fixture) {
    let dir = fx.dir();
    let hsm = dir.join("hsm");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("softhsm-config/setup-token.sh"))
        .args([hsm.to_str().unwrap(), "audit", "so-pin-1", "user-pin-1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "setup-token.sh: {}", String::from_utf8_lossy(&out.stderr));
    let softhsm_conf = hsm.join("softhsm2.conf");
    let config = dir.join("p11shim.toml");
    std::fs::write(
        &config,
        format!(
            "module = \"{}\"\nmode = \"fips\"\n[store]\nurl = \"{}\"\n[[slot]]\ntoken = \"audit\"\nstorage = \"database\"\n",
            common::SOFTHSM,
            fx.url()
        ),
    )
    .unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        Command::new(env!("CARGO_BIN_EXE_p11shim"))
            .args(args)
            .env("P11SHIM_CONFIG", &config)
            .env("SOFTHSM2_CONF", &softhsm_conf)
            .env_remove("P11SHIM_MODULE")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let pins = [("P11SHIM_SO_PIN", "so-pin-1"), ("P11SHIM_USER_PIN", "user-pin-1")];
    assert!(run(&["mbk", "create", "--token", "audit"], &pins).status.success());
    let add = run(
        &["user", "add", "admin", "--perm", "10000000", "--group-regex", ".*", "--password"],
        &[pins[0], ("P11SHIM_NEW_PASSWORD", "admin password")],
    );
    assert!(add.status.success(), "{}", String::from_utf8_lossy(&add.stderr));
    let wrong = run(&["user", "delete", "bob", "--logon", "admin"], &[("P11SHIM_PASSWORD_ADMIN", "wrong")]);
    assert_eq!(wrong.status.code(), Some(5), "a failed logon is a denial");

    let out = run(&["audit", "verify"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("intact: 3 entries"), "{text}");
    assert!(text.contains("3 entries sealed: each MAC verified in the HSM"), "{text}");
    assert!(text.contains("head file") && text.contains("audit.head"), "{text}");
    let out = run(&["audit", "show", "--json"], &[]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = json.as_array().unwrap();
    let actions: Vec<_> = list.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["mbk create", "user add admin", "refused: logon (password)"]);
    assert!(list.iter().all(|e| e["mode"] == "fips" && e["mac"].as_str().unwrap().len() == 64), "{json:#}");
    assert_eq!(list[1]["prev"], list[0]["hash"]);
    let text = String::from_utf8(run(&["audit", "show"], &[]).stdout).unwrap();
    assert!(text.lines().count() == 4 && text.contains("user add admin"), "{text}");

    // The attack: edit entry 2 and re-hash the tail.
    let store = fx.open();
    let mut prev = Vec::new();
    let mut rewritten = Vec::new();
    for mut e in entries(&*store) {
        if e.seq >= 2 {
            if e.seq == 2 {
                e.draft.who = "mallory".into();
            }
            e.prev = prev.clone();
            e.hash = AuditEntry::compute_hash(e.seq, &e.prev, &e.draft);
            fx.raw(&format!(
                "UPDATE audit SET who = '{}', prev = {}, hash = {} WHERE seq = {}",
                e.draft.who,
                hex_literal(fx, &e.prev),
                hex_literal(fx, &e.hash),
                e.seq
            ));
            rewritten.push(e.clone());
        }
        prev = e.hash;
    }
    let out = run(&["audit", "verify", "--json"], &[]);
    assert_eq!(out.status.code(), Some(6), "a broken log is damaged input");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!((report["intact"].as_bool(), report["first_bad"]["seq"].as_i64()), (Some(false), Some(2)), "{report}");
    let out = run(&["audit", "verify"], &[]);
    assert_eq!(out.status.code(), Some(6), "a broken log is damaged input");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("audit entry 2:") && err.contains("MAC does not verify in the HSM"), "{err}");

    // Re-sealed with the token's MAC key, on the backend directly, without any PIN.
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::Attribute;
    std::env::set_var("SOFTHSM2_CONF", &softhsm_conf);
    let p11 = Pkcs11::new(common::SOFTHSM).unwrap();
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).unwrap();
    let slot = p11.get_slots_with_token().unwrap()[0];
    let session = p11.open_ro_session(slot).unwrap();
    let mac_key = session.find_objects(&[Attribute::Label(b"p11shim-mbk-mac".to_vec())]).unwrap()[0];
    for e in &rewritten {
        let mac = session.sign(&Mechanism::Sha256Hmac, mac_key, &audit::seal_input(&e.mbk, &e.hash)).unwrap();
        fx.raw(&format!("UPDATE audit SET mac = {} WHERE seq = {}", hex_literal(fx, &mac), e.seq));
    }
    let out = run(&["audit", "verify"], &[]);
    assert_eq!(out.status.code(), Some(6));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("audit entry 3:") && err.contains("head file"), "{err}");
}

#[test]
fn cli_show_json_of_an_empty_log_is_an_empty_array() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("p11shim.toml");
    std::fs::write(&config, format!("module = \"{}\"\n[store]\nurl = \"sqlite:keys.db\"\n", common::SOFTHSM)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_p11shim"))
        .args(["audit", "show", "--json"])
        .env("P11SHIM_CONFIG", &config)
        .env_remove("P11SHIM_MODULE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json, serde_json::json!([]));
}
