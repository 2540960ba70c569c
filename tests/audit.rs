//! The audit log (issue C item 9): a hash chain in the key store that `audit::verify` and `p11shim audit
//! verify` check, finding the first edited, removed or reordered entry; and a log that cannot be written
//! makes the operation fail. Both engines; the database is edited behind the store's back (no shim is
//! loaded in this process, so a second SQLite connection here is safe).

mod common;

use common::pg::TestDb;
use p11shim::audit;
use p11shim::auth::{self, Logons, NewUser};
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
    an_edit_with_a_recomputed_hash_is_found_at_the_next_entry,
    a_removed_entry_is_named,
    a_removed_first_entry_is_named,
    swapped_entries_are_found_at_the_first_of_them,
    an_unwritable_log_fails_the_operation_and_still_reports_the_refusal,
    cli_show_and_verify,
);

/// A store with five entries: seq 1..=5, actions "action 1".."action 5".
fn five_entries(fx: &Fixture) -> Box<dyn KeyStore> {
    let store = fx.open();
    for n in 1..=5 {
        audit::record(&*store, "alice,bob", &format!("action {n}"), "Prod.*", n, "ok").unwrap();
    }
    store
}

fn first_bad(store: &dyn KeyStore) -> (i64, String) {
    let report = audit::verify(store).unwrap();
    let bad = report.first_bad.expect("verify must find the break");
    assert!(report.head.is_none());
    (bad.seq, bad.reason)
}

fn an_untouched_log_verifies(fx: &Fixture) {
    let store = fx.open();
    let empty = audit::verify(&*store).unwrap();
    assert!(empty.ok() && empty.entries == 0 && empty.head.is_none());
    let store = five_entries(fx);
    let report = audit::verify(&*store).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.entries, 5);
    let mut last: Option<AuditEntry> = None;
    store
        .audit_scan(&mut |e| {
            last = Some(e);
            Ok(())
        })
        .unwrap();
    let last = last.unwrap();
    assert_eq!(report.head, Some((5, hex::encode(&last.hash))));
    assert_eq!((last.draft.who.as_str(), last.draft.count, last.draft.group.as_str()), ("alice,bob", 5, "Prod.*"));
    assert!(last.draft.time.ends_with('Z') && last.draft.time.len() == 27, "RFC 3339 UTC: {}", last.draft.time);
}

fn an_edited_field_is_found_at_its_entry(fx: &Fixture) {
    for (column, value) in [
        ("count", "99"),
        ("who", "'mallory'"),
        ("result", "'ok!'"),
        ("action", "'x'"),
        ("grp", "''"),
        ("time", "'2000-01-01T00:00:00Z'"),
    ] {
        let store = five_entries(fx);
        fx.raw(&format!("UPDATE audit SET {column} = {value} WHERE seq = 3"));
        let (seq, reason) = first_bad(&*store);
        assert_eq!(seq, 3, "{column}");
        assert!(reason.contains("edited"), "{column}: {reason}");
        fx.raw("DELETE FROM audit");
    }
}

fn an_edit_with_a_recomputed_hash_is_found_at_the_next_entry(fx: &Fixture) {
    let store = five_entries(fx);
    let mut third = None;
    store
        .audit_scan(&mut |e| {
            if e.seq == 3 {
                third = Some(e);
            }
            Ok(())
        })
        .unwrap();
    let mut third = third.unwrap();
    third.draft.count = 0;
    let forged = hex::encode(AuditEntry::compute_hash(3, &third.prev, &third.draft));
    let set_hash = match fx {
        Fixture::Sqlite { .. } => format!("x'{forged}'"),
        Fixture::Postgres { .. } => format!("'\\x{forged}'::bytea"),
    };
    fx.raw(&format!("UPDATE audit SET count = 0, hash = {set_hash} WHERE seq = 3"));
    let (seq, reason) = first_bad(&*store);
    assert_eq!(seq, 4);
    assert!(reason.contains("does not follow entry 3"), "{reason}");
}

fn a_removed_entry_is_named(fx: &Fixture) {
    let store = five_entries(fx);
    fx.raw("DELETE FROM audit WHERE seq = 3");
    let (seq, reason) = first_bad(&*store);
    assert_eq!(seq, 3);
    assert!(reason.contains("missing") && reason.contains("removed"), "{reason}");
}

fn a_removed_first_entry_is_named(fx: &Fixture) {
    let store = five_entries(fx);
    fx.raw("DELETE FROM audit WHERE seq = 1");
    assert_eq!(first_bad(&*store).0, 1);
}

fn swapped_entries_are_found_at_the_first_of_them(fx: &Fixture) {
    let store = five_entries(fx);
    fx.raw(
        "UPDATE audit SET seq = -1 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 4; \
         UPDATE audit SET seq = 4 WHERE seq = -1;",
    );
    let (seq, reason) = first_bad(&*store);
    assert_eq!(seq, 2);
    assert!(reason.contains("does not follow entry 1"), "{reason}");
}

fn an_unwritable_log_fails_the_operation_and_still_reports_the_refusal(fx: &Fixture) {
    let store = fx.open();
    fx.raw("ALTER TABLE audit RENAME TO audit_gone");
    let err = audit::record(&*store, "alice", "backup", "Prod", 3, "ok").unwrap_err();
    assert!(err.to_string().contains("cannot write the audit log entry for \"backup\""), "{err}");
    // A refusal is reported with the audit failure.
    let message = audit::record_refusal(&*store, "-", "backup", "Prod", "backup denied: needs 00000002");
    assert!(message.starts_with("backup denied: needs 00000002 (and cannot write the audit log"), "{message}");
    // Through the user administration: a refused add says both; the permission check still holds.
    let user = NewUser {
        name: "first".into(),
        perm: "10000000".into(),
        group_regex: ".*".into(),
        credential: auth::Credential::SignKey([0x5A; 32]),
    };
    let err = auth::add_user(&*store, &Logons::new(), None, user).unwrap_err().to_string();
    assert!(
        err.contains("only be created with the token's SO PIN") && err.contains("cannot write the audit log"),
        "{err}"
    );
    assert!(store.user_list().unwrap().is_empty());
    // A failed logon is still a failed logon.
    let err = Logons::new().logon_password(&*store, "nobody", b"password").unwrap_err().to_string();
    assert!(err.starts_with("logon failed for nobody (and cannot write the audit log"), "{err}");
}

fn cli_show_and_verify(fx: &Fixture) {
    let _store = five_entries(fx);
    let config = fx.dir().join("p11shim.toml");
    std::fs::write(&config, format!("module = \"{}\"\n[store]\nurl = \"{}\"\n", common::SOFTHSM, fx.url())).unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_p11shim"))
            .args(args)
            .env("P11SHIM_CONFIG", &config)
            .env_remove("P11SHIM_MODULE")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run(&["audit", "verify"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("intact: 5 entries"));
    let out = run(&["audit", "show", "--json"]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = json.as_array().unwrap();
    assert_eq!(entries.len(), 5);
    assert_eq!(entries[2]["seq"], 3);
    assert_eq!(entries[2]["action"], "action 3");
    assert_eq!(entries[2]["who"], "alice,bob");
    assert_eq!(entries[2]["count"], 3);
    assert_eq!(entries[2]["prev"], entries[1]["hash"]);
    let text = String::from_utf8(run(&["audit", "show"]).stdout).unwrap();
    assert!(text.lines().count() == 6 && text.contains("action 5"), "{text}");

    fx.raw("UPDATE audit SET result = 'failed' WHERE seq = 4");
    let out = run(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("audit entry 4:") && err.contains("edited"), "{err}");
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
