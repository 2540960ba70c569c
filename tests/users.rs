//! Users and permissions: the CryptoServer rules, each pinned down by a test, run against
//! both key store engines; then the `p11shim user` command end to end with a real SoftHSM2 token (the first
//! user needs its SO PIN).

mod common;

use argon2::password_hash::PasswordHasher;
use common::pg::TestDb;
use common::sealer::SoftwareSealer;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::SigningKey;
use p11shim::audit::Trail;
use p11shim::auth::{self, AuthError, Credential, Logons, Need, NewUser};
use p11shim::config::{LogonPolicy, Mode};
use p11shim::store::{self, AuditEntry, KeyStore};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use zeroize::Zeroizing;

enum Fixture {
    Sqlite { dir: tempfile::TempDir, url: String },
    Postgres { dir: tempfile::TempDir, db: TestDb },
}

fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("keys.db").display());
    Fixture::Sqlite { dir, url }
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
    /// Runs `sql` on a connection of its own, as a writer of the database would (bypassing the store).
    fn raw(&self, sql: &str) {
        match self {
            Fixture::Sqlite { dir, .. } => {
                rusqlite::Connection::open(dir.path().join("keys.db")).unwrap().execute_batch(sql).unwrap()
            }
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
    exmpkey_user_plus_prodkey_user_without_level_cannot_back_up_prodkey,
    levels_of_matching_users_add_up_for_a_group,
    group_regex_must_match_the_whole_group_name,
    key_store_needs_02000000,
    users_table_needs_two_admins,
    user_administration_needs_10000000_and_refusals_are_audited,
    wrong_password_and_unknown_user_fail_alike,
    logon_sign_verifies_a_fresh_challenge_with_the_stored_key,
    password_users_cannot_logon_sign_and_key_users_cannot_use_a_password,
    a_user_cannot_log_on_twice,
    passwords_are_stored_as_argon2id_hashes_only,
    invalid_names_masks_and_regexes_are_refused_by_name,
    passwd_by_the_user_or_an_admin_only,
    the_last_user_administrator_cannot_be_deleted,
    two_admins_deleting_each_other_at_once_leave_one,
    public_key_files_in_three_formats,
    cli_first_user_needs_the_so_pin,
    cli_four_first_users_at_once_make_one,
    cli_user_commands_end_to_end,
    cli_stacked_logon_failure_runs_nothing,
    rows_inserted_edited_or_moved_by_a_database_writer_are_refused,
    failed_logons_delay_the_next_and_lock_until_an_admin_unlocks,
    thirty_wrong_passwords_in_a_row_do_not_let_the_right_one_in_at_once,
    unsealed_rows_of_an_earlier_version_are_resealed_once_by_an_admin,
);

const PW: &str = "correct horse";

/// The MAC key that seals users and the audit log, in software here (the shim's is the HSM's).
static SEALER: std::sync::LazyLock<SoftwareSealer> =
    std::sync::LazyLock::new(|| SoftwareSealer::new(b"users test MAC key"));

/// No wait after a failed logon: the rules tests fail logons on purpose (throttling is tested on its own).
const POLICY: LogonPolicy =
    LogonPolicy { lockout_after: 0, delay: std::time::Duration::ZERO, delay_max: std::time::Duration::ZERO };

/// The store's audit trail and users, sealed by [`SEALER`].
fn trail(store: &dyn KeyStore) -> Trail<'_> {
    Trail { store, sealer: Some(&*SEALER), also: Vec::new(), head: None, mode: Mode::Standard }
}

/// Seals a row as the HSM would.
fn sealed(mut row: p11shim::store::UserRow) -> p11shim::store::UserRow {
    auth::seal_restored(&*SEALER, &mut row).unwrap();
    row
}

fn password(p: &str) -> Credential {
    Credential::Password(Zeroizing::new(p.as_bytes().to_vec()))
}

/// The argon2id hash of [`PW`] with tiny parameters: the rules tests log on many times, and the default
/// parameters (as `add_user` uses, tested below) cost most of a second each in a debug build. Logon
/// verifies with the parameters recorded in the hash.
fn cheap_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| {
        let params = argon2::Params::new(64, 1, 1, None).unwrap();
        let argon2 = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        argon2.hash_password(PW.as_bytes()).unwrap().to_string()
    })
}

/// Puts a password user straight into the store (the SO-PIN path is tested through the CLI below).
fn seed(store: &dyn KeyStore, name: &str, perm: &str, regex: &str) {
    let user = NewUser { name: name.into(), perm: perm.into(), group_regex: regex.into(), credential: password(PW) };
    let credential = Credential::SignKey([9; 32]); // checked by user_row, replaced below: no hashing here
    let mut row = auth::user_row(&NewUser { credential, ..user }).unwrap();
    row.auth = auth::AUTH_PASSWORD.into();
    row.secret = cheap_hash().as_bytes().to_vec();
    store.user_insert(&sealed(row)).unwrap();
}

/// A fresh Ed25519 key pair; the private key written as PEM PKCS#8 to DIR/NAME.key.
fn key_pair(dir: &Path, name: &str) -> (SigningKey, PathBuf) {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).unwrap();
    let key = SigningKey::from_bytes(&seed);
    let path = dir.join(format!("{name}.key"));
    std::fs::write(&path, key.to_pkcs8_pem(Default::default()).unwrap().as_bytes()).unwrap();
    (key, path)
}

/// Puts a signature-logon user into the store; its private key file.
fn seed_sign(store: &dyn KeyStore, dir: &Path, name: &str, perm: &str, regex: &str) -> PathBuf {
    let (key, path) = key_pair(dir, name);
    let credential = Credential::SignKey(key.verifying_key().to_bytes());
    let user = NewUser { name: name.into(), perm: perm.into(), group_regex: regex.into(), credential };
    store.user_insert(&sealed(auth::user_row(&user).unwrap())).unwrap();
    path
}

/// Logs these password users on, in order.
fn logons(store: &dyn KeyStore, names: &[&str]) -> Logons {
    let mut logons = Logons::new();
    for name in names {
        logons
            .logon_password(&trail(store), &POLICY, name, PW.as_bytes())
            .unwrap_or_else(|e| panic!("logon {name}: {e}"));
    }
    logons
}

fn audit(store: &dyn KeyStore) -> Vec<AuditEntry> {
    let mut entries = Vec::new();
    store
        .audit_scan(&mut |e| {
            entries.push(e);
            Ok(())
        })
        .unwrap();
    entries
}

fn actions(store: &dyn KeyStore) -> Vec<String> {
    audit(store).into_iter().map(|e| format!("{} | {}", e.draft.who, e.draft.action)).collect()
}

fn exmpkey_user_plus_prodkey_user_without_level_cannot_back_up_prodkey(fx: &Fixture) {
    let store = fx.open();
    seed(&*store, "alice", "00000002", "ExmpKey");
    seed(&*store, "bob", "00000000", "ProdKey.*");
    let both = logons(&*store, &["alice", "bob"]);
    let denied = both.require(Need::Group("ProdKey".into())).unwrap_err();
    assert_eq!(
        denied.doing("backup").to_string(),
        "backup of group ProdKey needs 00000002 from users whose group matches ProdKey; \
         logged on: alice 00000002 (ExmpKey), bob 00000000 (ProdKey.*)"
    );
    // alice's level counts for her own group.
    both.require(Need::Group("ExmpKey".into())).unwrap();
    // And a user with the level in ProdKey can.
    seed(&*store, "carol", "00000002", "ProdKey.*");
    logons(&*store, &["carol"]).require(Need::Group("ProdKey".into())).unwrap();
}

fn levels_of_matching_users_add_up_for_a_group(fx: &Fixture) {
    let store = fx.open();
    seed(&*store, "p1", "00000001", "Prod.*");
    seed(&*store, "p2", "00000001", "Prod.*|Test");
    seed(&*store, "e1", "00000001", "Exmp.*");
    let prod = Need::Group("ProdKey".into());
    logons(&*store, &["p1"]).require(prod.clone()).unwrap_err();
    logons(&*store, &["p1", "e1"]).require(prod.clone()).unwrap_err();
    logons(&*store, &["p1", "p2"]).require(prod.clone()).unwrap();
    logons(&*store, &["p2", "e1"]).require(Need::Group("Test".into())).unwrap_err();
}

fn group_regex_must_match_the_whole_group_name(fx: &Fixture) {
    let store = fx.open();
    seed(&*store, "prod", "00000002", "Prod");
    seed(&*store, "prodstar", "00000002", "Prod.*");
    seed(&*store, "alt", "00000002", "A|B");
    let user = |name| logons(&*store, &[name]);
    let group = |g: &str| Need::Group(g.into());
    user("prod").require(group("Prod")).unwrap();
    user("prod").require(group("ProdKey")).unwrap_err(); // not a prefix match
    user("prodstar").require(group("ProdKey")).unwrap();
    user("prodstar").require(group("XProdKey")).unwrap_err(); // not a substring match
    let alt = user("alt");
    alt.require(group("A")).unwrap();
    alt.require(group("B")).unwrap();
    alt.require(group("AB")).unwrap_err(); // the alternation is anchored as a whole
}

fn key_store_needs_02000000(fx: &Fixture) {
    let store = fx.open();
    seed(&*store, "admin", "02000000", "Other");
    seed(&*store, "half1", "01000000", "x");
    seed(&*store, "half2", "01000000", "y");
    seed(&*store, "keyuser", "00000002", ".*");
    logons(&*store, &["admin"]).require(Need::KeyStore).unwrap(); // whatever its group regex
    logons(&*store, &["half1", "half2"]).require(Need::KeyStore).unwrap();
    let denied = logons(&*store, &["half1", "keyuser"]).require(Need::KeyStore).unwrap_err();
    let message = denied.to_string();
    assert!(message.contains("needs 02000000") && message.contains("half1 01000000 (x)"), "{message}");
    logons(&*store, &["keyuser"]).require(Need::Group("AnyGroup".into())).unwrap();
    let nobody = Logons::new().require(Need::KeyStore).unwrap_err().to_string();
    assert!(nobody.contains("logged on: nobody"), "{nobody}");
}

fn users_table_needs_two_admins(fx: &Fixture) {
    let store = fx.open();
    seed(&*store, "useradmin", "10000000", ".*");
    seed(&*store, "csadmin", "02000000", ".*");
    seed(&*store, "both", "12000000", ".*");
    logons(&*store, &["useradmin", "csadmin"]).require(Need::UsersTable).unwrap();
    let alone = logons(&*store, &["useradmin"]).require(Need::UsersTable).unwrap_err();
    assert!(alone.to_string().contains("needs 12000000"), "{alone}");
    logons(&*store, &["csadmin"]).require(Need::UsersTable).unwrap_err();
    logons(&*store, &["both"]).require(Need::UsersTable).unwrap();
    // And the masks of the other needs.
    logons(&*store, &["useradmin"]).require(Need::UserAdmin).unwrap();
    logons(&*store, &["csadmin"]).require(Need::UserAdmin).unwrap_err();
}

fn user_administration_needs_10000000_and_refusals_are_audited(fx: &Fixture) {
    let store = fx.open();
    seed(&*store, "admin", "10000000", ".*");
    seed(&*store, "csadmin", "02000000", ".*");
    let new = |name: &str| NewUser {
        name: name.into(),
        perm: "00000002".into(),
        group_regex: "Prod.*".into(),
        credential: password("new user pw"),
    };
    let cs = logons(&*store, &["csadmin"]);
    let err = auth::add_user(&trail(&*store), &cs, None, new("dave")).unwrap_err();
    assert!(matches!(err, AuthError::Refused(_)), "{err:?}");
    assert!(err.to_string().contains("user add dave denied") && err.to_string().contains("10000000"), "{err}");
    assert_eq!(store.user_get("dave").unwrap(), None);
    let err = auth::delete_user(&trail(&*store), &cs, "admin").unwrap_err();
    assert!(matches!(err, AuthError::Refused(_)), "{err:?}");
    assert!(store.user_get("admin").unwrap().is_some());

    let admin = logons(&*store, &["admin"]);
    let info = auth::add_user(&trail(&*store), &admin, None, new("dave")).unwrap();
    assert_eq!((info.perm.as_str(), info.auth.as_str()), ("00000002", "password"));
    let err = auth::add_user(&trail(&*store), &admin, None, new("dave")).unwrap_err();
    assert!(err.to_string().contains("user dave already exists"), "{err}");
    auth::delete_user(&trail(&*store), &admin, "dave").unwrap();
    assert_eq!(store.user_get("dave").unwrap(), None);
    let err = auth::delete_user(&trail(&*store), &admin, "dave").unwrap_err();
    assert!(err.to_string().contains("no user dave"), "{err}");

    assert_eq!(
        actions(&*store),
        vec![
            "csadmin | refused: user add dave",
            "csadmin | refused: user delete admin",
            "admin | user add dave",
            "admin | user add dave",
            "admin | user delete dave",
            "admin | user delete dave",
        ]
    );
    let results: Vec<String> = audit(&*store).into_iter().map(|e| e.draft.result).collect();
    assert!(results[3].starts_with("failed: user dave already exists"), "failures are audited too: {results:?}");
    assert!(results[5].starts_with("failed: no user dave"), "{results:?}");
    let refusal = &audit(&*store)[0].draft;
    assert!(refusal.result.contains("needs 10000000"), "the refusal's reason is logged: {}", refusal.result);
    assert!(p11shim::audit::verify(&trail(&*store)).unwrap().ok());
}

fn wrong_password_and_unknown_user_fail_alike(fx: &Fixture) {
    let store = fx.open();
    seed(&*store, "alice", "00000002", ".*");
    let mut logons = Logons::new();
    let wrong = logons.logon_password(&trail(&*store), &POLICY, "alice", b"not her password").unwrap_err();
    let unknown = logons.logon_password(&trail(&*store), &POLICY, "mallory", PW.as_bytes()).unwrap_err();
    assert!(matches!(wrong, AuthError::LogonFailed(_)), "{wrong:?}");
    assert_eq!(wrong.to_string(), "logon failed for alice");
    assert_eq!(unknown.to_string(), "logon failed for mallory", "no hint whether the user exists");
    assert!(logons.is_empty());
    // The log says which it was, for the administrators.
    let results: Vec<String> =
        audit(&*store).into_iter().map(|e| format!("{}: {}", e.draft.who, e.draft.result)).collect();
    assert_eq!(results, vec!["alice: wrong password; failed logons in a row: 1", "mallory: no such user"]);
    // A name no user can have (bytes from an application) is logged quoted and cut short.
    let hostile = format!("evil\n\x1b[2J{}", "x".repeat(5000));
    let err = Logons::new().logon_password(&trail(&*store), &POLICY, &hostile, b"pw").unwrap_err().to_string();
    assert!(err.starts_with("logon failed for \"evil\\n\\u{1b}[2J") && err.len() < 120, "{err}");
    let who = audit(&*store).pop().unwrap().draft.who;
    assert!(!who.contains('\n') && who.ends_with('…') && who.len() < 100, "{who}");
    logons.logon_password(&trail(&*store), &POLICY, "alice", PW.as_bytes()).unwrap();
    assert_eq!(logons.who(), "alice");
}

fn logon_sign_verifies_a_fresh_challenge_with_the_stored_key(fx: &Fixture) {
    let store = fx.open();
    let key_file = seed_sign(&*store, fx.dir(), "signer", "00000002", "Prod.*");
    let (_, other_key) = key_pair(fx.dir(), "other");
    let mut logons = Logons::new();
    let err = logons.logon_sign(&trail(&*store), &POLICY, "signer", &other_key).unwrap_err();
    assert_eq!(err.to_string(), "logon failed for signer");
    assert!(audit(&*store)[0].draft.result.contains("wrong key"), "{:?}", audit(&*store)[0]);
    assert!(logons.is_empty());
    logons.logon_sign(&trail(&*store), &POLICY, "signer", &key_file).unwrap();
    logons.require(Need::Group("ProdX".into())).unwrap();
    // Raw and hex private keys work as well as PEM.
    let key = auth::read_signing_key(&key_file).unwrap();
    let raw = fx.dir().join("raw.key");
    std::fs::write(&raw, key.to_bytes()).unwrap();
    let hexfile = fx.dir().join("hex.key");
    std::fs::write(&hexfile, format!("{}\n", hex::encode(key.to_bytes()))).unwrap();
    for file in [&raw, &hexfile] {
        Logons::new()
            .logon_sign(&trail(&*store), &POLICY, "signer", file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
    let garbage = fx.dir().join("garbage.key");
    std::fs::write(&garbage, b"not a key").unwrap();
    let err = Logons::new().logon_sign(&trail(&*store), &POLICY, "signer", &garbage).unwrap_err().to_string();
    assert!(err.contains(&garbage.display().to_string()) && err.contains("PRIVATE KEY"), "{err}");
}

fn password_users_cannot_logon_sign_and_key_users_cannot_use_a_password(fx: &Fixture) {
    let store = fx.open();
    seed(&*store, "pwuser", "00000002", ".*");
    let key_file = seed_sign(&*store, fx.dir(), "keyuser", "00000002", ".*");
    let mut logons = Logons::new();
    let err = logons.logon_sign(&trail(&*store), &POLICY, "pwuser", &key_file).unwrap_err();
    assert_eq!(err.to_string(), "logon failed for pwuser");
    let err = logons.logon_password(&trail(&*store), &POLICY, "keyuser", PW.as_bytes()).unwrap_err();
    assert_eq!(err.to_string(), "logon failed for keyuser");
    assert!(logons.is_empty());
    let results: Vec<String> = audit(&*store).into_iter().map(|e| e.draft.result).collect();
    assert!(results[0].contains("logs on with a password") && results[1].contains("signature key"), "{results:?}");
}

fn a_user_cannot_log_on_twice(fx: &Fixture) {
    let store = fx.open();
    seed(&*store, "half", "01000000", ".*");
    let mut logons = logons(&*store, &["half"]);
    let err = logons.logon_password(&trail(&*store), &POLICY, "half", PW.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("already logged on"), "{err}");
    logons.require(Need::KeyStore).unwrap_err(); // 01000000 counted once, not twice
}

fn passwords_are_stored_as_argon2id_hashes_only(fx: &Fixture) {
    let store = fx.open();
    seed(&*store, "admin", "10000000", ".*");
    let secret = "Sup3r-Secret-Passw0rd";
    let user =
        NewUser { name: "eve".into(), perm: "00000002".into(), group_regex: ".*".into(), credential: password(secret) };
    auth::add_user(&trail(&*store), &logons(&*store, &["admin"]), None, user).unwrap();
    let row = store.user_get("eve").unwrap().unwrap();
    let stored = String::from_utf8(row.secret.clone()).unwrap();
    assert!(stored.starts_with("$argon2id$v=19$"), "{stored}");
    assert!(!stored.contains(secret));
    assert!(!format!("{row:?}").contains(&stored), "Debug hides the hash");
    for e in audit(&*store) {
        assert!(!format!("{e:?}").contains(secret));
    }
    if let Fixture::Sqlite { dir, .. } = fx {
        drop(store); // checkpoint the WAL into the file
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "password in clear on disk");
        }
    }
    let mut fresh = Logons::new();
    fresh.logon_password(&trail(&*fx.open()), &POLICY, "eve", secret.as_bytes()).unwrap();
}

fn invalid_names_masks_and_regexes_are_refused_by_name(fx: &Fixture) {
    let store = fx.open();
    seed(&*store, "admin", "10000000", ".*");
    let admin = logons(&*store, &["admin"]);
    let add = |name: &str, perm: &str, regex: &str, pw: &str| {
        let user =
            NewUser { name: name.into(), perm: perm.into(), group_regex: regex.into(), credential: password(pw) };
        auth::add_user(&trail(&*store), &admin, None, user).unwrap_err().to_string()
    };
    let long = "x".repeat(33);
    for (name, expect) in
        [("", "user name \"\""), (long.as_str(), "1 to 32"), ("a b", "user name \"a b\""), ("so", "reserved")]
    {
        let err = add(name, "00000002", ".*", "long enough");
        assert!(err.contains(expect), "{name:?}: {err}");
    }
    let err = add("ok", "0000002", ".*", "long enough");
    assert!(err.contains("permission mask \"0000002\"") && err.contains("8 hex digits"), "{err}");
    let err = add("ok", "0000000z", ".*", "long enough");
    assert!(err.contains("\"0000000z\""), "{err}");
    let err = add("ok", "00000002", "Prod[", "long enough");
    assert!(err.contains("group regex \"Prod[\"") && err.contains("not a valid regular expression"), "{err}");
    let err = add("ok", "00000002", "", "long enough");
    assert!(err.contains("group regex is empty"), "{err}");
    let err = add("ok", "00000002", ".*", "short");
    assert!(err.contains("password") && err.contains("at least 8"), "{err}");
    assert_eq!(store.user_list().unwrap().len(), 1, "nothing was added");
    assert!(auth::add_user(
        &trail(&*store),
        &admin,
        None,
        NewUser {
            name: "A.b-c_9".into(),
            perm: "0000000a".into(),
            group_regex: "(Prod|Test)Key".into(),
            credential: password("long enough")
        }
    )
    .is_ok());
    assert_eq!(store.user_get("A.b-c_9").unwrap().unwrap().perm, "0000000A", "stored normalized");
}

fn passwd_by_the_user_or_an_admin_only(fx: &Fixture) {
    let store = fx.open();
    seed(&*store, "admin", "10000000", ".*");
    seed(&*store, "alice", "00000002", ".*");
    seed(&*store, "bob", "00000002", ".*");
    let alice = logons(&*store, &["alice"]);
    let err = auth::change_credential(&trail(&*store), &alice, "bob", password("bobs new pw")).unwrap_err();
    assert!(matches!(err, AuthError::Refused(_)) && err.to_string().contains("10000000"), "{err}");
    auth::change_credential(&trail(&*store), &alice, "alice", password("alices new pw")).unwrap();
    let mut l = Logons::new();
    assert!(
        l.logon_password(&trail(&*store), &POLICY, "alice", PW.as_bytes()).is_err(),
        "the old password no longer works"
    );
    l.logon_password(&trail(&*store), &POLICY, "alice", b"alices new pw").unwrap();
    // An admin may switch a user to signature logon.
    let (key, key_file) = key_pair(fx.dir(), "bob");
    let admin = logons(&*store, &["admin"]);
    auth::change_credential(&trail(&*store), &admin, "bob", Credential::SignKey(key.verifying_key().to_bytes()))
        .unwrap();
    Logons::new().logon_sign(&trail(&*store), &POLICY, "bob", &key_file).unwrap();
    assert_eq!(store.user_get("bob").unwrap().unwrap().version, 2);
    let err = auth::change_credential(&trail(&*store), &admin, "nobody", password("whatever1")).unwrap_err();
    assert!(err.to_string().contains("no user nobody"), "{err}");
    let log = actions(&*store);
    assert!(log.contains(&"alice | refused: user passwd bob".to_string()), "{log:?}");
    assert!(
        log.contains(&"alice | user passwd alice".to_string()) && log.contains(&"admin | user passwd bob".to_string())
    );
}

fn the_last_user_administrator_cannot_be_deleted(fx: &Fixture) {
    let store = fx.open();
    seed(&*store, "admin", "10000000", ".*");
    seed(&*store, "admin2", "1000000F", ".*");
    let admin = logons(&*store, &["admin"]);
    auth::delete_user(&trail(&*store), &admin, "admin2").unwrap();
    let err = auth::delete_user(&trail(&*store), &admin, "admin").unwrap_err();
    assert!(err.to_string().contains("no user administrator"), "{err}");
    assert!(store.user_get("admin").unwrap().is_some());
}

/// Two administrators delete each other at once, from two connections (as two processes would): one
/// deletion goes through, the other is refused, and an administrator remains. 20 rounds.
fn two_admins_deleting_each_other_at_once_leave_one(fx: &Fixture) {
    for round in 0..20 {
        let (a, b) = (format!("a{round}"), format!("b{round}"));
        let setup = fx.open();
        seed(&*setup, &a, "10000000", ".*");
        seed(&*setup, &b, "10000000", ".*");
        seed(&*setup, &format!("u{round}"), "00000002", ".*");
        let barrier = std::sync::Barrier::new(2);
        let results: Vec<bool> = std::thread::scope(|s| {
            let runs: Vec<_> = [(&a, &b), (&b, &a)]
                .into_iter()
                .map(|(me, victim)| {
                    let (barrier, store) = (&barrier, fx.open());
                    s.spawn(move || {
                        let me = logons(&*store, &[me.as_str()]);
                        barrier.wait();
                        auth::delete_user(&trail(&*store), &me, victim).is_ok()
                    })
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|ok| **ok).count(), 1, "round {round}: {results:?}");
        let admins = setup.user_list().unwrap().into_iter().filter(|u| u.perm.starts_with('1')).count();
        assert_eq!(admins, 1, "round {round}: one administrator remains");
        // The next round starts from no administrator of this round's.
        for u in setup.user_list().unwrap() {
            setup.user_delete(&u.name).unwrap();
        }
    }
}

fn public_key_files_in_three_formats(fx: &Fixture) {
    let (key, _) = key_pair(fx.dir(), "k");
    let public = key.verifying_key().to_bytes();
    let pem = fx.dir().join("k.pub.pem");
    std::fs::write(&pem, key.verifying_key().to_public_key_pem(Default::default()).unwrap()).unwrap();
    let raw = fx.dir().join("k.pub.raw");
    std::fs::write(&raw, public).unwrap();
    let hexfile = fx.dir().join("k.pub.hex");
    std::fs::write(&hexfile, hex::encode(public)).unwrap();
    for file in [&pem, &raw, &hexfile] {
        assert_eq!(auth::read_public_key(file).unwrap(), public, "{}", file.display());
    }
    let bad = fx.dir().join("bad.pub");
    std::fs::write(&bad, "zz".repeat(32)).unwrap();
    let err = auth::read_public_key(&bad).unwrap_err().to_string();
    assert!(err.contains(&bad.display().to_string()) && err.contains("PUBLIC KEY"), "{err}");
    // The identity point (a weak key) would accept forged signatures: refused.
    let weak = fx.dir().join("weak.pub");
    let mut identity = [0u8; 32];
    identity[0] = 1;
    std::fs::write(&weak, identity).unwrap();
    assert!(auth::read_public_key(&weak).unwrap_err().to_string().contains("weak"));
}

// ---- The command, end to end, with a SoftHSM2 token ----

const SO_PIN: &str = "so-pin-9876";

/// A p11shim.toml naming a fresh SoftHSM2 token "users" (a database slot) and the fixture's store.
struct Cli {
    config: PathBuf,
    softhsm_conf: String,
}

impl Cli {
    fn new(fx: &Fixture) -> Cli {
        let hsm = fx.dir().join("hsm");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm-config/setup-token.sh");
        let out = Command::new("bash")
            .arg(script)
            .args([hsm.to_str().unwrap(), "users", SO_PIN, "user-pin-1"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "setup-token.sh: {}", String::from_utf8_lossy(&out.stderr));
        let softhsm_conf = hsm.join("softhsm2.conf").display().to_string();
        let config = fx.dir().join("p11shim.toml");
        // A delay after a failed logon that outlasts the next command even on a loaded machine.
        std::fs::write(
            &config,
            format!(
                "module = \"{}\"\n[store]\nurl = \"{}\"\n[logon]\ndelay = \"1m\"\n[[slot]]\ntoken = \"users\"\nstorage = \"database\"\n",
                common::SOFTHSM,
                fx.url()
            ),
        )
        .unwrap();
        let cli = Cli { config, softhsm_conf };
        // Users are sealed with the MAC key of the token's MBK set.
        cli.ok(
            &["mbk", "create", "--token", "users"],
            &[("P11SHIM_SO_PIN", SO_PIN), ("P11SHIM_USER_PIN", "user-pin-1")],
        );
        cli
    }

    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_p11shim"));
        cmd.args(args)
            .env("P11SHIM_CONFIG", &self.config)
            .env("SOFTHSM2_CONF", &self.softhsm_conf)
            .env_remove("P11SHIM_MODULE")
            .env_remove("P11SHIM_SO_PIN")
            .env_remove("P11SHIM_NEW_PASSWORD")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    /// Runs and expects success; stdout.
    fn ok(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self.run(args, env);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and expects a failure (exit status 1, 2, 4, 5, 6 or 7); stderr.
    fn fails(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self.run(args, env);
        assert!(
            matches!(out.status.code(), Some(1 | 2 | 4..=7)),
            "{args:?} should fail: {:?} {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }
}

fn cli_first_user_needs_the_so_pin(fx: &Fixture) {
    let cli = Cli::new(fx);
    let add_admin = ["user", "add", "admin", "--perm", "12000000", "--group-regex", ".*", "--password"];
    let pw = ("P11SHIM_NEW_PASSWORD", "admin password");
    let err = cli.fails(&add_admin, &[pw]);
    assert!(err.contains("no SO PIN") && err.contains("P11SHIM_SO_PIN"), "{err}");
    let err = cli.fails(&add_admin, &[pw, ("P11SHIM_SO_PIN", "wrong-pin")]);
    assert!(err.contains("wrong SO PIN"), "{err}");
    let pin_file = fx.dir().join("so.pin");
    std::fs::write(&pin_file, format!("{SO_PIN}\n")).unwrap();
    let pin_arg = ["--so-pin-file", pin_file.to_str().unwrap()];
    let err = cli.fails(
        &["user", "add", "keyuser", "--perm", "00000002", "--group-regex", ".*", "--password", pin_arg[0], pin_arg[1]],
        &[pw],
    );
    assert!(err.contains("first user must be a user administrator"), "{err}");
    let err = cli.fails(&[&add_admin[..], &pin_arg, &["--token", "nosuchtoken"]].concat(), &[pw]);
    assert!(err.contains("nosuchtoken"), "{err}");
    let store = fx.open();
    assert!(store.user_list().unwrap().is_empty());

    let out = cli.ok(&[&add_admin[..], &pin_arg].concat(), &[pw]);
    assert!(out.contains("Added user admin"), "{out}");
    // After the first user, the SO PIN is no help: user administration needs 10000000 from logged-on users.
    let add_bob = ["user", "add", "bob", "--perm", "00000002", "--group-regex", "Prod.*", "--password"];
    let err = cli.fails(&[&add_bob[..], &pin_arg].concat(), &[pw]);
    assert!(
        err.contains("user add bob denied")
            && err.contains("10000000")
            && err.contains("SO PIN creates only the first"),
        "{err}"
    );
    cli.ok(
        &[&add_bob[..], &["--logon", "admin"]].concat(),
        &[("P11SHIM_PASSWORD_ADMIN", "admin password"), ("P11SHIM_NEW_PASSWORD", "bob password")],
    );
    let log = actions(&*store);
    assert_eq!(
        log,
        vec![
            "SO of users | mbk create",
            "SO of users | refused: logon (SO PIN)",
            "SO of users | user add admin",
            "- | refused: user add bob",
            "admin | user add bob",
        ]
    );
}

/// Four processes add a first user at once, each with the SO PIN: one of them becomes the first user, the
/// others are refused (the SO PIN creates only the first user), and the audit log says so.
fn cli_four_first_users_at_once_make_one(fx: &Fixture) {
    let cli = Cli::new(fx);
    let pin_file = fx.dir().join("so.pin");
    std::fs::write(&pin_file, format!("{SO_PIN}\n")).unwrap();
    // Each process gets a copy of the token: SoftHSM2 is not safe with several processes on one token
    // directory. The store, where the race is, is the one they share.
    let confs: Vec<String> = (0..4)
        .map(|i| {
            let copy = fx.dir().join(format!("hsm{i}"));
            let status = Command::new("cp").arg("-a").arg(fx.dir().join("hsm")).arg(&copy).status().unwrap();
            assert!(status.success(), "copy the token directory");
            let conf = copy.join("softhsm2.conf");
            let text = format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                copy.join("tokens").display()
            );
            std::fs::write(&conf, text).unwrap();
            conf.display().to_string()
        })
        .collect();
    let outputs: Vec<Output> = std::thread::scope(|s| {
        let runs: Vec<_> = confs
            .iter()
            .enumerate()
            .map(|(i, conf)| {
                let (cli, pin_file) = (&cli, &pin_file);
                s.spawn(move || {
                    let name = format!("admin{i}");
                    let args = [
                        "user",
                        "add",
                        &name,
                        "--perm",
                        "12000000",
                        "--group-regex",
                        ".*",
                        "--password",
                        "--so-pin-file",
                    ];
                    cli.run(
                        &[&args[..], &[pin_file.to_str().unwrap()]].concat(),
                        &[("P11SHIM_NEW_PASSWORD", "first password"), ("SOFTHSM2_CONF", conf)],
                    )
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let added = outputs.iter().filter(|o| o.status.success()).count();
    let errors: Vec<_> = outputs.iter().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).collect();
    assert_eq!(added, 1, "exactly one first user: {errors:?}");
    for o in outputs.iter().filter(|o| !o.status.success()) {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("the SO PIN creates only the first user"), "{err}");
    }
    let store = fx.open();
    assert_eq!(store.user_list().unwrap().len(), 1);
    let log = actions(&*store);
    assert_eq!(log.iter().filter(|a| a.starts_with("SO of users | user add admin")).count(), 1, "{log:?}");
    assert_eq!(log.iter().filter(|a| a.contains("refused: user add admin")).count(), 3, "{log:?}");
}

fn cli_user_commands_end_to_end(fx: &Fixture) {
    let cli = Cli::new(fx);
    let admin_env = ("P11SHIM_PASSWORD_ADMIN", "admin password");
    cli.ok(
        &["user", "add", "admin", "--perm", "10000000", "--group-regex", ".*", "--password"],
        &[("P11SHIM_SO_PIN", SO_PIN), ("P11SHIM_NEW_PASSWORD", "admin password")],
    );
    let (key, key_file) = key_pair(fx.dir(), "signer");
    let pub_file = fx.dir().join("signer.pub");
    std::fs::write(&pub_file, key.verifying_key().to_public_key_pem(Default::default()).unwrap()).unwrap();
    cli.ok(
        &[
            "user",
            "add",
            "signer",
            "--perm",
            "00000002",
            "--group-regex",
            "Prod.*",
            "--sign-key",
            pub_file.to_str().unwrap(),
            "--logon",
            "admin",
        ],
        &[admin_env],
    );
    // --password and --sign-key are exclusive, and one is required (usage error, status 2).
    let out =
        cli.run(&["user", "add", "x", "--perm", "00000002", "--group-regex", ".*", "--logon", "admin"], &[admin_env]);
    assert_eq!(out.status.code(), Some(2));

    let list = cli.ok(&["user", "list"], &[]);
    assert!(
        list.contains("admin") && list.contains("signer") && list.contains("Prod.*") && list.contains("sign"),
        "{list}"
    );
    assert!(!list.contains("argon2"), "no secrets: {list}");
    let json: serde_json::Value = serde_json::from_str(&cli.ok(&["user", "list", "--json"], &[])).unwrap();
    assert_eq!(json[1]["name"], "signer");
    assert_eq!(json[1]["perm"], "00000002");
    assert_eq!(json[1]["auth"], "sign");
    assert!(json[0].get("secret").is_none());

    // The signer changes its own key, logged on by signature.
    let (key2, key2_file) = key_pair(fx.dir(), "signer2");
    let pub2 = fx.dir().join("signer2.pub");
    std::fs::write(&pub2, hex::encode(key2.verifying_key().to_bytes())).unwrap();
    let me = format!("signer,{}", key_file.display());
    cli.ok(&["user", "passwd", "signer", "--sign-key", pub2.to_str().unwrap(), "--logon", &me], &[]);
    let err = cli.fails(&["user", "delete", "signer", "--logon", &me], &[]);
    assert!(err.contains("logon failed for signer"), "the old key no longer works: {err}");
    let err = cli.fails(&["user", "delete", "signer", "--logon", &format!("signer,{}", key2_file.display())], &[]);
    assert!(err.contains("1 failed logons in a row; try again in"), "right after a failure the user waits: {err}");
    let json: serde_json::Value = serde_json::from_str(&cli.ok(&["user", "list", "--json"], &[])).unwrap();
    let signer = json.as_array().unwrap().iter().find(|u| u["name"] == "signer").unwrap().clone();
    assert_eq!((signer["failed_logons"].as_i64(), signer["seal"].as_str()), (Some(1), Some("sealed")), "{json}");
    let out = cli.ok(&["user", "unlock", "signer", "--logon", "admin"], &[admin_env]);
    assert!(out.contains("Unlocked user signer (1 failed logons cleared)"), "{out}");
    let err = cli.fails(&["user", "delete", "signer", "--logon", &format!("signer,{}", key2_file.display())], &[]);
    assert!(err.contains("user delete signer denied"), "{err}");
    cli.ok(&["user", "delete", "signer", "--logon", "admin"], &[admin_env]);
    assert!(!cli.ok(&["user", "list"], &[]).contains("signer"));

    let verify = cli.ok(&["audit", "verify"], &[]);
    assert!(verify.contains("intact"), "{verify}");
    let shown = cli.ok(&["audit", "show"], &[]);
    for action in
        ["user add admin", "user add signer", "user passwd signer", "refused: user delete signer", "user delete signer"]
    {
        assert!(shown.contains(action), "{action} in:\n{shown}");
    }
    let help = cli.ok(&["user", "add", "--help"], &[]);
    assert!(help.contains("slot 0") && help.contains("12000000") && help.contains("--logon"), "{help}");
}

fn cli_stacked_logon_failure_runs_nothing(fx: &Fixture) {
    let cli = Cli::new(fx);
    cli.ok(
        &["user", "add", "admin", "--perm", "10000000", "--group-regex", ".*", "--password"],
        &[("P11SHIM_SO_PIN", SO_PIN), ("P11SHIM_NEW_PASSWORD", "admin password")],
    );
    cli.ok(
        &["user", "add", "victim", "--perm", "00000002", "--group-regex", ".*", "--password", "--logon", "admin"],
        &[("P11SHIM_PASSWORD_ADMIN", "admin password"), ("P11SHIM_NEW_PASSWORD", "victim password")],
    );
    let store = fx.open();
    let before = audit(&*store).len();
    // admin logs on fine, victim's logon fails: the delete must not run, and the third logon is not tried.
    let err = cli.fails(
        &["user", "delete", "victim", "--logon", "admin", "--logon", "victim", "--logon", "ghost"],
        &[("P11SHIM_PASSWORD_ADMIN", "admin password"), ("P11SHIM_PASSWORD_VICTIM", "wrong")],
    );
    assert!(err.contains("logon failed for victim"), "{err}");
    assert!(store.user_get("victim").unwrap().is_some(), "nothing ran after the failed logon");
    let after: Vec<String> =
        audit(&*store)[before..].iter().map(|e| format!("{} | {}", e.draft.who, e.draft.action)).collect();
    assert_eq!(after, vec!["victim | refused: logon (password)"]);
}

/// The attack: anyone who can write the database made himself an administrator by inserting a row (copying
/// another user's credential), or by editing his own mask. Every row is sealed by the HSM's MAC key now: an
/// inserted, edited or renamed row is refused at logon, with one line naming the user and the store.
fn rows_inserted_edited_or_moved_by_a_database_writer_are_refused(fx: &Fixture) {
    let store = fx.open();
    seed(&*store, "admin", "10000000", ".*");
    seed(&*store, "alice", "00000002", "Pay.*");
    seed(&*store, "bob", "00000002", "HR.*");
    let refused = |name: &str| {
        let err = Logons::new().logon_password(&trail(&*store), &POLICY, name, PW.as_bytes()).unwrap_err();
        assert!(matches!(err, AuthError::LogonFailed(_)), "{err:?}");
        err.to_string()
    };
    // Inserted: a copy of admin's row under another name, with a full mask, and with admin's MAC or none.
    fx.raw(
        "INSERT INTO users (name, perm, group_regex, auth, secret, version, failed, last_failed, mac) \
         SELECT 'mallory', 'FFFFFFFF', '.*', auth, secret, version, failed, last_failed, mac FROM users WHERE name = 'admin'",
    );
    let err = refused("mallory");
    assert!(
        err.contains("user mallory in") && err.contains(&store.describe()) && err.contains("does not match its seal"),
        "{err}"
    );
    fx.raw("UPDATE users SET mac = (SELECT mac FROM users WHERE name = 'bob') WHERE name = 'mallory'");
    assert!(refused("mallory").contains("does not match its seal"));
    fx.raw("DELETE FROM users WHERE name = 'mallory'");
    fx.raw(
        "INSERT INTO users (name, perm, group_regex, auth, secret, version) \
         SELECT 'mallory', 'FFFFFFFF', '.*', auth, secret, 1 FROM users WHERE name = 'admin'",
    );
    assert!(refused("mallory").contains("is not sealed"), "an unsealed insert is refused too");
    // Edited: alice widens her own mask and group regex.
    fx.raw("UPDATE users SET perm = '12000000' WHERE name = 'alice'");
    assert!(refused("alice").contains("does not match its seal"));
    fx.raw("UPDATE users SET perm = '00000002', group_regex = '.*' WHERE name = 'alice'");
    assert!(refused("alice").contains("does not match its seal"));
    fx.raw("UPDATE users SET group_regex = 'Pay.*' WHERE name = 'alice'");
    Logons::new()
        .logon_password(&trail(&*store), &POLICY, "alice", PW.as_bytes())
        .expect("restored: the seal holds again");
    // Moved: bob's row renamed to carol (same credential, same MAC).
    fx.raw("UPDATE users SET name = 'carol' WHERE name = 'bob'");
    assert!(refused("carol").contains("does not match its seal"));
    // A sealed row counts as an administrator when the last one would be deleted; a forged one does not.
    fx.raw("UPDATE users SET perm = '10000000' WHERE name = 'carol'");
    let admin = logons(&*store, &["admin"]);
    let err = auth::delete_user(&trail(&*store), &admin, "admin").unwrap_err().to_string();
    assert!(err.contains("no user administrator"), "a forged administrator does not count: {err}");
    // Every refusal is audited, and `user list` shows the seals.
    let refusals = audit(&*store).iter().filter(|e| e.draft.result.contains("seal")).count();
    assert!(refusals >= 5, "{:?}", actions(&*store));
    let listed = auth::list_users(&trail(&*store), &POLICY).unwrap();
    let seal = |n: &str| listed.iter().find(|u| u.name == n).unwrap().seal;
    assert_eq!(
        (seal("admin"), seal("carol"), seal("mallory")),
        (auth::SealState::Intact, auth::SealState::Broken, auth::SealState::Unsealed)
    );
}

/// Failed logons are counted in the (sealed) row: each makes the next attempt wait longer, and after
/// `lockout_after` failures in a row the user is locked until an administrator unlocks it; all audited.
fn failed_logons_delay_the_next_and_lock_until_an_admin_unlocks(fx: &Fixture) {
    use std::time::Duration;
    let store = fx.open();
    seed(&*store, "admin", "10000000", ".*");
    seed(&*store, "alice", "00000002", ".*");
    let policy =
        LogonPolicy { lockout_after: 3, delay: Duration::from_millis(100), delay_max: Duration::from_millis(250) };
    let t = trail(&*store);
    let attempt = |password: &str| Logons::new().logon_password(&t, &policy, "alice", password.as_bytes());
    assert!(matches!(attempt("wrong 1").unwrap_err(), AuthError::LogonFailed(_)));
    assert_eq!(store.user_get("alice").unwrap().unwrap().failed, 1);
    let err = attempt(PW).unwrap_err();
    assert!(matches!(err, AuthError::Throttled(_)) && err.to_string().contains("try again in"), "{err:?}");
    assert_eq!(store.user_get("alice").unwrap().unwrap().failed, 1, "a throttled attempt is not counted");
    std::thread::sleep(Duration::from_millis(120));
    assert!(matches!(attempt("wrong 2").unwrap_err(), AuthError::LogonFailed(_)));
    std::thread::sleep(Duration::from_millis(120));
    let err = attempt(PW).unwrap_err();
    assert!(matches!(err, AuthError::Throttled(_)), "the wait doubled to 200 ms: {err:?}");
    std::thread::sleep(Duration::from_millis(120));
    assert!(matches!(attempt("wrong 3").unwrap_err(), AuthError::LogonFailed(_)));
    std::thread::sleep(Duration::from_millis(300));
    let err = attempt(PW).unwrap_err();
    assert!(
        err.to_string().contains("locked after 3 failed logons") && err.to_string().contains("user unlock alice"),
        "{err}"
    );
    // The count is sealed: clearing it in the database breaks the seal instead.
    let row = store.user_get("alice").unwrap().unwrap();
    fx.raw("UPDATE users SET failed = 0, last_failed = 0 WHERE name = 'alice'");
    assert!(attempt(PW).unwrap_err().to_string().contains("does not match its seal"));
    fx.raw(&format!(
        "UPDATE users SET failed = {}, last_failed = {} WHERE name = 'alice'",
        row.failed, row.last_failed
    ));
    // Only a user administrator unlocks.
    let alice_as_admin = Logons::new();
    assert!(matches!(auth::unlock_user(&t, &alice_as_admin, "alice").unwrap_err(), AuthError::Refused(_)));
    let admin = logons(&*store, &["admin"]);
    assert_eq!(auth::unlock_user(&t, &admin, "alice").unwrap(), 3);
    attempt(PW).expect("unlocked");
    assert_eq!(store.user_get("alice").unwrap().unwrap().failed, 0);
    let log = actions(&*store);
    assert!(log.contains(&"admin | user unlock alice".to_string()), "{log:?}");
    assert!(log.contains(&"- | refused: user unlock alice".to_string()), "{log:?}");
    assert_eq!(log.iter().filter(|a| *a == "alice | refused: logon (password)").count(), 7, "{log:?}");
    // A success clears the count.
    std::thread::sleep(Duration::from_millis(10));
    assert!(attempt("wrong again").is_err());
    std::thread::sleep(Duration::from_millis(120));
    attempt(PW).unwrap();
    assert_eq!(store.user_get("alice").unwrap().unwrap().failed, 0);
}

/// Measured before throttling: 30 wrong passwords took 1.5 s and the right one still worked. With the
/// default policy (1 s after the first failure, doubling), the 29 attempts after the first are refused
/// before the password is looked at, and so is the right password right after them.
fn thirty_wrong_passwords_in_a_row_do_not_let_the_right_one_in_at_once(fx: &Fixture) {
    let store = fx.open();
    seed(&*store, "alice", "00000002", ".*");
    let policy = LogonPolicy::default();
    let t = trail(&*store);
    let started = std::time::Instant::now();
    let mut throttled = 0;
    for i in 0..30 {
        match Logons::new().logon_password(&t, &policy, "alice", format!("guess {i}").as_bytes()) {
            Err(AuthError::Throttled(_)) => throttled += 1,
            Err(AuthError::LogonFailed(_)) => {}
            other => panic!("attempt {i}: {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(throttled, 29, "only the first guess was checked");
    assert_eq!(store.user_get("alice").unwrap().unwrap().failed, 1);
    let err = Logons::new().logon_password(&t, &policy, "alice", PW.as_bytes()).unwrap_err();
    assert!(matches!(err, AuthError::Throttled(_)), "{err:?}");
    println!("30 wrong passwords: {elapsed:?}, 1 checked, 29 refused unchecked; the right one refused too");
}

/// Rows of a store made before users were sealed have no MAC: nobody logs on with them, but a user
/// administrator may seal them all once (`p11shim user reseal`), logged on for that alone; after that an
/// unsealed row is refused for good.
fn unsealed_rows_of_an_earlier_version_are_resealed_once_by_an_admin(fx: &Fixture) {
    let store = fx.open();
    seed(&*store, "admin", "10000000", ".*");
    seed(&*store, "alice", "00000002", ".*");
    fx.raw(
        "UPDATE users SET mac = ''::bytea"
            .replace(
                "''::bytea",
                match fx {
                    Fixture::Sqlite { .. } => "x''",
                    Fixture::Postgres { .. } => "'\\x'::bytea",
                },
            )
            .as_str(),
    );
    let t = trail(&*store);
    let err = Logons::new().logon_password(&t, &POLICY, "admin", PW.as_bytes()).unwrap_err().to_string();
    assert!(err.contains("is not sealed") && err.contains("p11shim user reseal"), "{err}");
    // A non-administrator cannot reseal.
    let mut alice = Logons::for_reseal();
    alice.logon_password(&t, &POLICY, "alice", PW.as_bytes()).unwrap();
    assert!(matches!(auth::reseal_users(&t, &alice).unwrap_err(), AuthError::Refused(_)));
    let mut admin = Logons::for_reseal();
    admin.logon_password(&t, &POLICY, "admin", PW.as_bytes()).unwrap();
    assert_eq!(auth::reseal_users(&t, &admin).unwrap(), vec!["admin", "alice"]);
    logons(&*store, &["admin", "alice"]);
    // Once any row is sealed, an unsealed one is not an earlier version's: no second reseal.
    fx.raw(
        "INSERT INTO users (name, perm, group_regex, auth, secret, version) \
         SELECT 'mallory', 'FFFFFFFF', '.*', auth, secret, 1 FROM users WHERE name = 'admin'",
    );
    let mut admin = Logons::for_reseal();
    admin.logon_password(&t, &POLICY, "admin", PW.as_bytes()).unwrap();
    let err = auth::reseal_users(&t, &admin).unwrap_err().to_string();
    assert!(err.contains("sealed already"), "{err}");
    assert!(Logons::new().logon_password(&t, &POLICY, "mallory", PW.as_bytes()).is_err());
    assert!(actions(&*store).contains(&"admin | user reseal".to_string()));
}
