//! The key store's behaviour, written once and run against both engines: SQLite (a file in a fresh
//! directory per test) and PostgreSQL (a fresh database per test on the throwaway server of
//! tests/common/pg.rs). Engine-specific behaviour (a missing directory, a server that goes away) follows.

mod common;

use common::pg::{PgCluster, TestDb};
use p11shim::store::{
    self, AuditDraft, AuditEntry, KeyQuery, KeyRow, KeyStore, StoreError, StoreResult, UserRow, SCHEMA_VERSION,
};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// An empty database of one engine (not yet opened) and how to reach it behind the store's back.
enum Fixture {
    Sqlite { _dir: tempfile::TempDir, path: PathBuf, url: String },
    Postgres { db: TestDb },
}

fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keys.db");
    let url = format!("sqlite:{}", path.display());
    Fixture::Sqlite { _dir: dir, path, url }
}

fn postgres() -> Fixture {
    Fixture::Postgres { db: TestDb::fresh() }
}

impl Fixture {
    fn url(&self) -> &str {
        match self {
            Fixture::Sqlite { url, .. } => url,
            Fixture::Postgres { db } => db.url(),
        }
    }

    fn open(&self) -> Box<dyn KeyStore> {
        store::open(self.url()).unwrap_or_else(|e| panic!("open {}: {e}", self.url()))
    }

    /// Runs `sql` on a connection of its own, bypassing the store.
    fn raw(&self, sql: &str) {
        match self {
            Fixture::Sqlite { path, .. } => rusqlite::Connection::open(path).unwrap().execute_batch(sql).unwrap(),
            Fixture::Postgres { db } => {
                ::postgres::Client::connect(db.url(), ::postgres::NoTls).unwrap().batch_execute(sql).unwrap()
            }
        }
    }

    fn schema_versions(&self) -> Vec<i64> {
        let sql = "SELECT version FROM schema_version ORDER BY version";
        match self {
            Fixture::Sqlite { path, .. } => {
                let conn = rusqlite::Connection::open(path).unwrap();
                let mut stmt = conn.prepare(sql).unwrap();
                stmt.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
            }
            Fixture::Postgres { db } => {
                let mut client = ::postgres::Client::connect(db.url(), ::postgres::NoTls).unwrap();
                client.query(sql, &[]).unwrap().iter().map(|r| r.get(0)).collect()
            }
        }
    }
}

/// Runs each behaviour below once per engine: `sqlite::NAME` and `postgres::NAME`.
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

/// The same for measurements that are run only on request.
macro_rules! both_engines_ignored {
    ($($name:ident),* $(,)?) => {
        mod sqlite_measure {
            $( #[test] #[ignore] fn $name() { super::$name(&super::sqlite()) } )*
        }
        mod postgres_measure {
            $( #[test] #[ignore] fn $name() { super::$name(&super::postgres()) } )*
        }
    };
}

both_engines!(
    inserted_row_reads_back_identically,
    duplicate_id_is_refused,
    find_matches_every_given_field_in_id_order,
    update_refuses_a_lost_update,
    delete_removes_the_row,
    generation_changes_with_commits_of_other_connections_only,
    generation_changes_with_own_commits,
    unchanged_since_tells_which_rows_may_have_changed,
    four_threads_insert_into_one_store,
    four_stores_opened_at_once_insert_concurrently,
    four_processes_insert_at_once,
    reopening_migrates_once_and_keeps_the_rows,
    newer_schema_is_refused_naming_both_versions,
    foreign_keys_table_is_refused,
    transaction_commit_makes_every_change_visible_at_once,
    dropped_transaction_rolls_back,
    duplicate_inside_a_transaction_leaves_it_usable,
    scan_streams_10k_rows_in_token_id_order,
    scan_stops_at_the_callbacks_error,
    users_crud_with_version_check,
    audit_chain_links_each_entry_to_the_previous,
    audit_appended_by_four_processes_is_one_contiguous_chain,
    version_1_store_migrates_to_users_and_audit,
    another_processes_commits_are_seen_without_a_use,
    a_store_is_dropped_at_once,
);

fn id(n: u32) -> String {
    format!("{n:032x}")
}

fn row(n: u32, token: &str, group: &str, label: &str) -> KeyRow {
    KeyRow {
        id: id(n),
        token: token.into(),
        group: group.into(),
        class: 4,     // CKO_SECRET_KEY
        key_type: 31, // CKK_AES
        label: label.as_bytes().to_vec(),
        ckid: vec![n as u8],
        attrs: b"attrs".to_vec(),
        wrapped: vec![0xAB; 40],
        wrap_mech: 0x210A,
        mbk: "mbk-fingerprint".into(),
        mac: vec![0xCD; 32],
        version: 1,
    }
}

fn ids(rows: &[KeyRow]) -> Vec<String> {
    rows.iter().map(|r| r.id.clone()).collect()
}

/// Polls until `store`'s generation differs from `old` (PostgreSQL hears of other connections' commits
/// asynchronously); the new generation.
fn changed_from(store: &dyn KeyStore, old: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let now = store.generation().unwrap();
        if now != old {
            return now;
        }
        assert!(Instant::now() < deadline, "generation of {} still {old} after 2 s", store.describe());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A generation that holds still for 100 ms: late notifications of earlier commits have arrived.
fn settled(store: &dyn KeyStore) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = store.generation().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        if store.generation().unwrap() == before {
            return before;
        }
        assert!(Instant::now() < deadline, "generation of {} never settles", store.describe());
    }
}

fn inserted_row_reads_back_identically(fx: &Fixture) {
    let store = fx.open();
    let mut key = row(7, "tok", "payments", "label\0with\u{ff}bytes");
    key.class = u64::MAX - 1; // above i64::MAX: vendor-defined values must survive the signed column
    key.key_type = 0x8000_0001;
    key.label.push(0xFF);
    key.wrapped.clear(); // a public key
    store.insert(&key).unwrap();

    assert_eq!(store.get(&key.id).unwrap(), Some(key.clone()));
    assert!(store.exists(&key.id).unwrap());
    assert_eq!(store.get(&id(8)).unwrap(), None);
    assert!(!store.exists(&id(8)).unwrap());
    let found = store.find(&KeyQuery { token: "tok".into(), class: Some(u64::MAX - 1), ..Default::default() });
    assert_eq!(found.unwrap(), vec![key]);
}

fn duplicate_id_is_refused(fx: &Fixture) {
    let store = fx.open();
    let first = row(1, "tok", "g", "first");
    store.insert(&first).unwrap();
    let err = store.insert(&row(1, "tok", "g", "second")).unwrap_err();
    match &err {
        StoreError::Duplicate { store: name, id: dup } => {
            assert_eq!(dup, &first.id);
            assert_eq!(name, &store.describe());
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }
    assert!(err.to_string().contains(&first.id), "{err}");
    assert_eq!(store.get(&first.id).unwrap(), Some(first));
}

fn find_matches_every_given_field_in_id_order(fx: &Fixture) {
    let store = fx.open();
    let mut rows = Vec::new();
    // Inserted out of id order, so that the order of the result is the store's doing.
    for n in [9u32, 3, 7, 1, 5, 2, 8, 4, 6] {
        let mut r = row(n, if n <= 6 { "alpha" } else { "beta" }, if n % 2 == 0 { "even" } else { "odd" }, "k");
        r.class = if n % 3 == 0 { 3 } else { 4 };
        r.key_type = if n < 5 { 31 } else { 0 };
        r.label = format!("label-{}", n % 4).into_bytes();
        r.ckid = vec![(n % 2) as u8, 0xEE];
        store.insert(&r).unwrap();
        rows.push(r);
    }
    let expect = |pred: &dyn Fn(&KeyRow) -> bool| -> Vec<String> {
        let mut ids: Vec<String> = rows.iter().filter(|r| pred(r)).map(|r| r.id.clone()).collect();
        ids.sort();
        ids
    };
    let q = |token: &str| KeyQuery { token: token.into(), ..Default::default() };
    let cases: Vec<(KeyQuery, Vec<String>)> = vec![
        (q("alpha"), expect(&|r| r.token == "alpha")),
        (q("gamma"), vec![]),
        (KeyQuery { group: Some("even".into()), ..q("alpha") }, expect(&|r| r.token == "alpha" && r.group == "even")),
        (KeyQuery { class: Some(3), ..q("alpha") }, expect(&|r| r.token == "alpha" && r.class == 3)),
        (KeyQuery { key_type: Some(0), ..q("beta") }, expect(&|r| r.token == "beta" && r.key_type == 0)),
        (
            KeyQuery { label: Some(b"label-1".to_vec()), ..q("alpha") },
            expect(&|r| r.token == "alpha" && r.label == b"label-1"),
        ),
        (KeyQuery { ckid: Some(vec![1, 0xEE]), ..q("beta") }, expect(&|r| r.token == "beta" && r.ckid == [1, 0xEE])),
        (
            KeyQuery {
                group: Some("odd".into()),
                class: Some(4),
                key_type: Some(31),
                label: Some(b"label-1".to_vec()),
                ckid: Some(vec![1, 0xEE]),
                ..q("alpha")
            },
            expect(&|r| {
                r.token == "alpha" && r.group == "odd" && r.class == 4 && r.key_type == 31 && r.label == b"label-1"
            }),
        ),
        (KeyQuery { label: Some(b"label-".to_vec()), ..q("alpha") }, vec![]), // exact match, not a prefix
        (KeyQuery { label: Some(vec![]), ..q("alpha") }, vec![]),
    ];
    for (query, want) in cases {
        let got = ids(&store.find(&query).unwrap());
        assert_eq!(got, want, "{query:?}");
    }
    assert_eq!(ids(&store.find(&q("alpha")).unwrap()).len(), 6, "sanity: the fixture has six alpha rows");
}

fn update_refuses_a_lost_update(fx: &Fixture) {
    let store = fx.open();
    let v1 = row(1, "tok", "g", "before");
    store.insert(&v1).unwrap();

    let v2 = KeyRow { version: 2, label: b"after".to_vec(), group: "h".into(), mac: vec![1; 32], ..v1.clone() };
    assert!(store.update(&v2).unwrap());
    assert_eq!(store.get(&v1.id).unwrap(), Some(v2.clone()));

    // A second writer that also read version 1 would write version 2 again: refused, nothing written.
    let stale = KeyRow { label: b"lost".to_vec(), ..v2.clone() };
    assert!(!store.update(&stale).unwrap());
    assert_eq!(store.get(&v1.id).unwrap(), Some(v2.clone()));

    let v3 = KeyRow { version: 3, ..v2.clone() };
    assert!(store.update(&v3).unwrap());
    assert_eq!(store.get(&v1.id).unwrap().unwrap().version, 3);

    assert!(!store.update(&KeyRow { version: 2, ..row(99, "tok", "g", "gone") }).unwrap());
    assert!(!store.exists(&id(99)).unwrap(), "update never inserts");
}

fn delete_removes_the_row(fx: &Fixture) {
    let store = fx.open();
    store.insert(&row(1, "tok", "g", "a")).unwrap();
    store.insert(&row(2, "tok", "g", "b")).unwrap();
    assert!(store.delete(&id(1)).unwrap());
    assert!(!store.exists(&id(1)).unwrap());
    assert_eq!(store.get(&id(1)).unwrap(), None);
    assert!(!store.delete(&id(1)).unwrap());
    assert_eq!(ids(&store.find(&KeyQuery { token: "tok".into(), ..Default::default() }).unwrap()), vec![id(2)]);
}

fn generation_changes_with_commits_of_other_connections_only(fx: &Fixture) {
    let reader = fx.open();
    let writer = fx.open();
    let mut seen = settled(&*reader);

    let mut key = row(1, "tok", "g", "a");
    writer.insert(&key).unwrap();
    seen = changed_from(&*reader, seen);
    assert_eq!(settled(&*reader), seen, "one commit, then nothing more");

    key.version = 2;
    assert!(writer.update(&key).unwrap());
    changed_from(&*reader, seen);
    seen = settled(&*reader);

    // Reads and writes that change nothing leave it alone.
    assert!(!writer.update(&key).unwrap()); // stale version
    assert!(!writer.delete(&id(2)).unwrap());
    assert!(writer.insert(&key).is_err()); // duplicate
    writer.get(&key.id).unwrap();
    writer.find(&KeyQuery { token: "tok".into(), ..Default::default() }).unwrap();
    reader.get(&key.id).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(reader.generation().unwrap(), seen, "no commit, no change");

    assert!(writer.delete(&key.id).unwrap());
    changed_from(&*reader, seen);
}

fn generation_changes_with_own_commits(fx: &Fixture) {
    let store = fx.open();
    let before = settled(&*store);
    store.insert(&row(1, "tok", "g", "a")).unwrap();
    // At once, not when a notification comes back: the process that wrote must not use a stale cache.
    assert_ne!(store.generation().unwrap(), before);
}

/// Whether a row this process holds is still current after others' commits. PostgreSQL's notifications name
/// the row, so commits to other rows leave it current; SQLite knows only that something changed.
fn unchanged_since_tells_which_rows_may_have_changed(fx: &Fixture) {
    let reader = fx.open();
    let writer = fx.open();
    let (a, mut b) = (row(1, "tok", "g", "a"), row(2, "tok", "g", "b"));
    writer.insert(&a).unwrap();
    writer.insert(&b).unwrap();
    let at = settled(&*reader);
    assert!(reader.unchanged_since(&a.id, 1, at, at), "no change at all");

    b.version = 2;
    assert!(writer.update(&b).unwrap());
    let now = changed_from(&*reader, at);
    let postgres = matches!(fx, Fixture::Postgres { .. });
    assert_eq!(reader.unchanged_since(&a.id, 1, at, now), postgres, "another row was updated");
    assert!(!reader.unchanged_since(&b.id, 1, at, now), "this row was updated");

    let at = settled(&*reader);
    assert!(writer.delete(&a.id).unwrap());
    let now = changed_from(&*reader, at);
    assert!(!reader.unchanged_since(&a.id, 1, at, now), "this row was deleted");

    // The reader's own write: the row it wrote stays current, the version before does not; and the
    // notification of its own commit, when it comes back, is not counted a second time.
    let at = settled(&*reader);
    b.version = 3;
    assert!(reader.update(&b).unwrap());
    let now = reader.generation().unwrap();
    assert_ne!(now, at);
    assert_eq!(reader.unchanged_since(&b.id, 3, at, now), postgres, "the version this store wrote");
    assert!(!reader.unchanged_since(&b.id, 2, at, now), "the version before its write");
    if postgres {
        assert_eq!(settled(&*reader), now, "the notification of its own commit");
    }
}

fn four_threads_insert_into_one_store(fx: &Fixture) {
    let store = fx.open();
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let store = &store;
            s.spawn(move || {
                for i in 0..250 {
                    store.insert(&row(t * 1000 + i, "tok", "g", "x")).unwrap();
                }
            });
        }
    });
    assert_all_1000_present(&*store);
}

fn four_stores_opened_at_once_insert_concurrently(fx: &Fixture) {
    // Four opens of a new database race through the migration too.
    std::thread::scope(|s| {
        for t in 0..4u32 {
            s.spawn(move || {
                let store = fx.open();
                for i in 0..250 {
                    store.insert(&row(t * 1000 + i, "tok", "g", "x")).unwrap();
                }
            });
        }
    });
    assert_all_1000_present(&*fx.open());
    assert_eq!(fx.schema_versions(), (1..=SCHEMA_VERSION).collect::<Vec<_>>());
}

fn four_processes_insert_at_once(fx: &Fixture) {
    // Each child is this test binary running `child_process_inserts_250_rows` alone.
    let children: Vec<_> = (0..4u32)
        .map(|t| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "child_process_inserts_250_rows", "--ignored", "--test-threads=1"])
                .env(CHILD_ENV, format!("{t} {}", fx.url()))
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn a child test process")
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success(), "a child process failed");
    }
    assert_all_1000_present(&*fx.open());
}

/// "T URL" for [`child_process_inserts_250_rows`].
const CHILD_ENV: &str = "P11SHIM_STORE_TEST_CHILD";

#[test]
#[ignore = "run by four_processes_insert_at_once in a child process"]
fn child_process_inserts_250_rows() {
    let Ok(arg) = std::env::var(CHILD_ENV) else { return };
    let (t, url) = arg.split_once(' ').expect("T URL");
    let t: u32 = t.parse().unwrap();
    let store = store::open(url).unwrap_or_else(|e| panic!("child {t}: {e}"));
    for i in 0..250 {
        store.insert(&row(t * 1000 + i, "tok", "g", "x")).unwrap_or_else(|e| panic!("child {t}: {e}"));
    }
}

fn assert_all_1000_present(store: &dyn KeyStore) {
    let rows = store.find(&KeyQuery { token: "tok".into(), ..Default::default() }).unwrap();
    let got: BTreeSet<String> = rows.iter().map(|r| r.id.clone()).collect();
    let want: BTreeSet<String> = (0..4).flat_map(|t| (0..250).map(move |i| id(t * 1000 + i))).collect();
    assert_eq!(rows.len(), 1000, "no duplicates");
    assert_eq!(got, want);
}

fn reopening_migrates_once_and_keeps_the_rows(fx: &Fixture) {
    let key = row(1, "tok", "g", "a");
    fx.open().insert(&key).unwrap();
    let again = fx.open();
    assert_eq!(again.get(&key.id).unwrap(), Some(key));
    drop(again);
    fx.open();
    assert_eq!(fx.schema_versions(), (1..=SCHEMA_VERSION).collect::<Vec<_>>());
}

fn newer_schema_is_refused_naming_both_versions(fx: &Fixture) {
    fx.open().insert(&row(1, "tok", "g", "a")).unwrap();
    fx.raw("INSERT INTO schema_version (version) VALUES (99)");
    let err = store::open(fx.url()).err().expect("a newer schema must be refused");
    assert!(matches!(err, StoreError::Schema { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("99"), "{message}");
    assert!(message.contains(&format!("version {SCHEMA_VERSION}")), "{message}");
    assert!(message.contains(&store::redact(fx.url())), "names the store: {message}");
}

fn foreign_keys_table_is_refused(fx: &Fixture) {
    fx.raw("CREATE TABLE keys (name TEXT)");
    let err = store::open(fx.url()).err().expect("a database that is not ours must be refused");
    assert!(matches!(err, StoreError::Schema { .. }), "{err:?}");
}

fn all_rows(store: &dyn KeyStore) -> Vec<KeyRow> {
    let mut rows = Vec::new();
    store
        .scan(&mut |row| {
            rows.push(row);
            Ok(())
        })
        .unwrap();
    rows
}

fn transaction_commit_makes_every_change_visible_at_once(fx: &Fixture) {
    let store = fx.open();
    let other = fx.open();
    let old = row(1, "tok", "g", "old");
    store.insert(&old).unwrap();
    let before = settled(&*other);

    let mut tx = store.begin().unwrap();
    tx.insert(&row(2, "tok", "g", "new")).unwrap();
    let replaced = KeyRow { label: b"replaced".to_vec(), version: 7, ..old.clone() };
    tx.replace(&replaced).unwrap();
    tx.replace(&row(3, "tok", "g", "upserted")).unwrap();
    assert!(tx.exists(&id(2)).unwrap(), "the transaction sees its own insert");
    assert!(!tx.exists(&id(4)).unwrap());
    // Not yet visible to anyone else.
    assert!(!other.exists(&id(2)).unwrap());
    assert_eq!(other.get(&old.id).unwrap(), Some(old.clone()));
    tx.commit().unwrap();

    assert_eq!(other.get(&old.id).unwrap(), Some(replaced));
    assert!(other.exists(&id(2)).unwrap() && other.exists(&id(3)).unwrap());
    changed_from(&*other, before);
    assert_ne!(store.generation().unwrap(), before, "the committing store knows at once");
}

fn dropped_transaction_rolls_back(fx: &Fixture) {
    let store = fx.open();
    let old = row(1, "tok", "g", "old");
    store.insert(&old).unwrap();
    {
        let mut tx = store.begin().unwrap();
        tx.insert(&row(2, "tok", "g", "new")).unwrap();
        tx.replace(&KeyRow { label: b"replaced".to_vec(), ..old.clone() }).unwrap();
        // dropped without commit
    }
    assert!(!store.exists(&id(2)).unwrap());
    assert_eq!(store.get(&old.id).unwrap(), Some(old));
    // The connection went back to the pool in a usable state: other writes work (SQLite: the write lock of
    // BEGIN IMMEDIATE was released, or this would wait and fail).
    store.insert(&row(3, "tok", "g", "after")).unwrap();
    let mut tx = store.begin().unwrap();
    tx.insert(&row(4, "tok", "g", "again")).unwrap();
    tx.commit().unwrap();
    assert_eq!(ids(&all_rows(&*store)), vec![id(1), id(3), id(4)]);
}

fn duplicate_inside_a_transaction_leaves_it_usable(fx: &Fixture) {
    let store = fx.open();
    store.insert(&row(1, "tok", "g", "there")).unwrap();
    let mut tx = store.begin().unwrap();
    tx.insert(&row(2, "tok", "g", "a")).unwrap();
    match tx.insert(&row(1, "tok", "g", "dup")) {
        Err(StoreError::Duplicate { id: dup, .. }) => assert_eq!(dup, id(1)),
        other => panic!("expected Duplicate, got {other:?}"),
    }
    match tx.insert(&row(2, "tok", "g", "dup of my own")) {
        Err(StoreError::Duplicate { id: dup, .. }) => assert_eq!(dup, id(2)),
        other => panic!("expected Duplicate, got {other:?}"),
    }
    tx.insert(&row(3, "tok", "g", "b")).unwrap();
    tx.commit().unwrap();
    assert_eq!(ids(&all_rows(&*store)), vec![id(1), id(2), id(3)]);
    assert_eq!(store.get(&id(1)).unwrap().unwrap().label, b"there");
}

fn scan_streams_10k_rows_in_token_id_order(fx: &Fixture) {
    let store = fx.open();
    let mut tx = store.begin().unwrap();
    // Ids and tokens inserted out of order; "Z" < "a" in byte order (not in a locale's).
    let tokens = ["beta", "alpha", "Zulu"];
    for n in 0..10_000u32 {
        let scrambled = n.wrapping_mul(7919) % 10_000;
        tx.insert(&row(scrambled, tokens[(n % 3) as usize], "g", "x")).unwrap();
    }
    tx.commit().unwrap();
    let mut count = 0usize;
    let mut last: Option<(String, String)> = None;
    store
        .scan(&mut |r| {
            let key = (r.token.clone(), r.id.clone());
            if let Some(prev) = &last {
                let before = (prev.0.as_bytes(), prev.1.as_bytes()) < (key.0.as_bytes(), key.1.as_bytes());
                assert!(before, "{prev:?} then {key:?}: not in (token, id) byte order");
            }
            last = Some(key);
            count += 1;
            Ok(())
        })
        .unwrap();
    assert_eq!(count, 10_000);
    assert_eq!(last.unwrap().0, "beta");
}

fn scan_stops_at_the_callbacks_error(fx: &Fixture) {
    let store = fx.open();
    for n in 0..21 {
        store.insert(&row(n, "tok", "g", "x")).unwrap();
    }
    let mut seen = 0;
    let err = store
        .scan(&mut |_| {
            seen += 1;
            if seen == 5 {
                return Err(StoreError::Schema { store: "test".into(), cause: "stop here".into() });
            }
            Ok(())
        })
        .unwrap_err();
    assert_eq!(seen, 5);
    assert!(err.to_string().contains("stop here"), "{err}");
    // The store is still fine afterwards.
    assert_eq!(all_rows(&*store).len(), 21);
}

fn user(name: &str) -> UserRow {
    UserRow {
        name: name.into(),
        perm: "00000002".into(),
        group_regex: "Prod.*".into(),
        auth: "password".into(),
        secret: b"$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".to_vec(),
        version: 1,
        failed: 0,
        last_failed: 0,
        mac: vec![9; 32],
    }
}

fn users_crud_with_version_check(fx: &Fixture) {
    let store = fx.open();
    assert_eq!(store.user_list().unwrap(), vec![]);
    let bob = user("bob");
    let alice = UserRow { auth: "sign".into(), secret: vec![7; 32], perm: "10000000".into(), ..user("alice") };
    store.user_insert(&bob).unwrap();
    store.user_insert(&alice).unwrap();
    match store.user_insert(&user("bob")) {
        Err(StoreError::Duplicate { id, .. }) => assert_eq!(id, "bob"),
        other => panic!("expected Duplicate, got {other:?}"),
    }
    assert_eq!(store.user_get("bob").unwrap(), Some(bob.clone()));
    assert_eq!(store.user_get("carol").unwrap(), None);
    assert_eq!(store.user_list().unwrap(), vec![alice.clone(), bob.clone()], "ordered by name");

    let bob2 = UserRow { version: 2, group_regex: "Exmp.*".into(), ..bob.clone() };
    assert!(store.user_update(&bob2).unwrap());
    assert!(!store.user_update(&bob2).unwrap(), "a second writer with the same base version loses");
    assert!(!store.user_update(&UserRow { version: 5, ..bob.clone() }).unwrap());
    assert_eq!(store.user_get("bob").unwrap(), Some(bob2));
    assert!(!store.user_update(&UserRow { version: 2, ..user("nobody") }).unwrap(), "update never inserts");
    assert_eq!(store.user_get("nobody").unwrap(), None);

    assert!(store.user_delete("bob").unwrap());
    assert!(!store.user_delete("bob").unwrap());
    assert_eq!(store.user_list().unwrap(), vec![alice]);
    // Users are not keys: the keys table and its generation are untouched.
    assert_eq!(all_rows(&*store).len(), 0);
}

fn draft(action: &str, n: i64) -> AuditDraft {
    AuditDraft {
        time: "2025-01-01T00:00:00.000000Z".into(),
        who: "alice,bob".into(),
        action: action.into(),
        group: "Prod.*".into(),
        count: n,
        result: "ok".into(),
        mode: "standard".into(),
    }
}

/// A stand-in for the HSM's MAC: the hash reversed (the store only keeps what the seal gives).
fn seal(hash: &[u8], _last_sealed: bool) -> StoreResult<(Vec<u8>, String)> {
    Ok((hash.iter().rev().copied().collect(), "test-mbk".into()))
}

fn audit_entries(store: &dyn KeyStore) -> Vec<AuditEntry> {
    let mut entries = Vec::new();
    store
        .audit_scan(&mut |e| {
            entries.push(e);
            Ok(())
        })
        .unwrap();
    entries
}

/// Asserts that `entries` are seq 1..=n, each linked to the one before and hashed over its content.
fn assert_valid_chain(entries: &[AuditEntry]) {
    let mut prev = vec![0u8; 32];
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, i as i64 + 1, "contiguous seq");
        assert_eq!(e.prev, prev, "entry {} links to its predecessor", e.seq);
        assert_eq!(e.hash, AuditEntry::compute_hash(e.seq, &e.prev, &e.draft), "entry {} hash", e.seq);
        prev = e.hash.clone();
    }
}

fn audit_chain_links_each_entry_to_the_previous(fx: &Fixture) {
    let store = fx.open();
    let first = store.audit_append(draft("backup", 3), &seal).unwrap();
    assert_eq!(first.seq, 1);
    assert_eq!(first.prev, vec![0u8; 32]);
    assert_eq!(first.draft, draft("backup", 3));
    let second = store.audit_append(draft("restore", 4), &seal).unwrap();
    assert_eq!((second.seq, &second.prev), (2, &first.hash));
    let entries = audit_entries(&*store);
    assert_eq!(entries, vec![first, second], "stored as returned");
    assert_valid_chain(&entries);
    // Reopening continues the chain.
    let third = fx.open().audit_append(draft("verify", 0), &seal).unwrap();
    assert_eq!(third.seq, 3);
    assert_valid_chain(&audit_entries(&*store));
    let entries = audit_entries(&*store);
    for e in &entries {
        assert_eq!(e.mac, e.hash.iter().rev().copied().collect::<Vec<_>>(), "entry {}: the seal's MAC is kept", e.seq);
        assert_eq!(e.mbk, "test-mbk", "and the MBK set that made it");
    }
    // The seal is told whether the last entry is sealed, and its error aborts the append: nothing written.
    let refuse = |_: &[u8], last_sealed: bool| -> StoreResult<(Vec<u8>, String)> {
        assert!(last_sealed, "the last entry is sealed");
        Err(StoreError::Sealing("no MAC key".into()))
    };
    let err = store.audit_append(draft("refused", 0), &refuse).unwrap_err();
    assert!(err.to_string().contains("no MAC key"), "{err}");
    assert_eq!(audit_entries(&*store), entries, "nothing appended");
}

fn audit_appended_by_four_processes_is_one_contiguous_chain(fx: &Fixture) {
    let children: Vec<_> = (0..4u32)
        .map(|t| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "child_process_appends_50_audit_entries", "--ignored", "--test-threads=1"])
                .env(AUDIT_CHILD_ENV, format!("{t} {}", fx.url()))
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn a child test process")
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success(), "a child process failed");
    }
    let entries = audit_entries(&*fx.open());
    assert_eq!(entries.len(), 200);
    assert_valid_chain(&entries);
    // Every child's entries are all there, each once, in the child's own order.
    for t in 0..4 {
        let mine: Vec<i64> =
            entries.iter().filter(|e| e.draft.action == format!("child {t}")).map(|e| e.draft.count).collect();
        assert_eq!(mine, (0..50).collect::<Vec<_>>(), "child {t}");
    }
}

/// "T URL" for [`child_process_appends_50_audit_entries`].
const AUDIT_CHILD_ENV: &str = "P11SHIM_STORE_TEST_AUDIT_CHILD";

#[test]
#[ignore = "run by audit_appended_by_four_processes_is_one_contiguous_chain in a child process"]
fn child_process_appends_50_audit_entries() {
    let Ok(arg) = std::env::var(AUDIT_CHILD_ENV) else { return };
    let (t, url) = arg.split_once(' ').expect("T URL");
    let store = store::open(url).unwrap_or_else(|e| panic!("child {t}: {e}"));
    for i in 0..50 {
        store.audit_append(draft(&format!("child {t}"), i), &seal).unwrap_or_else(|e| panic!("child {t}: {e}"));
    }
}

/// Writes from another process, one at a time: the generation of a store here moves by itself (no call of
/// this store but `generation()`, an atomic load) within the bound the README states, for commits made
/// through p11shim's store (which touches the WAL file's times once the commit is visible, on SQLite; NOTIFY
/// on PostgreSQL) and, on SQLite, for commits by a plain SQLite connection (found by looking again after the
/// WAL changed). The delays are printed; the bounds are generous for a busy 2-core machine.
fn another_processes_commits_are_seen_without_a_use(fx: &Fixture) {
    const WRITES: usize = 30;
    let reader = fx.open();
    reader.insert(&row(0, "tok", "g", "seed")).unwrap();
    let writers: &[&str] = match fx {
        Fixture::Sqlite { .. } => &["store", "plain"],
        Fixture::Postgres { .. } => &["store"],
    };
    for &how in writers {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_process_writes_when_asked", "--ignored", "--test-threads=1", "--nocapture"])
            .env(WRITER_CHILD_ENV, format!("{how} {}", fx.url()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the writer");
        let mut to_child = child.stdin.take().unwrap();
        let mut from_child = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut delays = Vec::new();
        for i in 0..WRITES {
            let before = settled(&*reader);
            use std::io::{BufRead, Write};
            writeln!(to_child, "{}", i + 1).unwrap();
            to_child.flush().unwrap();
            let mut line = String::new();
            let committed = loop {
                line.clear();
                assert!(from_child.read_line(&mut line).unwrap() > 0, "the writer ended early");
                // libtest prints "test NAME ... " on the line the first output continues.
                if let Some((_, ns)) = line.trim().split_once("COMMITTED ") {
                    break ns.parse::<u128>().unwrap();
                }
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            while reader.generation().unwrap() == before {
                assert!(Instant::now() < deadline, "{how} writer: commit {i} not seen here after 5 s");
                std::thread::yield_now();
            }
            let seen = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
            delays.push(seen.saturating_sub(committed) as f64 / 1e6);
        }
        drop(to_child);
        assert!(child.wait().unwrap().success(), "the writer failed");
        delays.sort_by(f64::total_cmp);
        let (median, worst) = (delays[WRITES / 2], delays[WRITES - 1]);
        println!("{how} writer on {}: seen {median:.3} ms after the commit (median), at worst {worst:.3} ms", fx.url());
        let bound = if how == "store" { 100.0 } else { 600.0 };
        assert!(worst < bound, "{how} writer: a commit was seen {worst:.1} ms after it returned: {delays:?}");
    }
}

/// "HOW URL" for [`child_process_writes_when_asked`]: HOW is `store` (p11shim's store) or `plain` (a plain
/// SQLite connection).
const WRITER_CHILD_ENV: &str = "P11SHIM_STORE_TEST_WRITER";

#[test]
#[ignore = "run by another_processes_commits_are_seen_without_a_use in a child process"]
fn child_process_writes_when_asked() {
    let Ok(arg) = std::env::var(WRITER_CHILD_ENV) else { return };
    let (how, url) = arg.split_once(' ').expect("HOW URL");
    let store = (how == "store").then(|| store::open(url).unwrap());
    let plain = (how == "plain").then(|| rusqlite::Connection::open(url.trim_start_matches("sqlite:")).unwrap());
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).unwrap() > 0 {
        let n: u32 = line.trim().parse().unwrap();
        line.clear();
        let label = format!("w{n}");
        match (&store, &plain) {
            (Some(store), _) => store.insert(&row(1000 + n, "tok", "g", &label)).unwrap(),
            (_, Some(conn)) => {
                conn.execute("UPDATE keys SET label = ?1", [label.as_bytes()]).unwrap();
            }
            _ => unreachable!(),
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        println!("COMMITTED {now}");
    }
}

/// Dropping a store (C_Finalize) stops and joins its thread without waiting for it to wake by itself.
fn a_store_is_dropped_at_once(fx: &Fixture) {
    for _ in 0..3 {
        let store = fx.open();
        store.generation().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        drop(store);
        let took = t.elapsed();
        assert!(took < Duration::from_millis(300), "dropping {} took {took:?}", fx.url());
    }
}

fn version_1_store_migrates_to_users_and_audit(fx: &Fixture) {
    // A store made by the previous release: schema version 1, keys only.
    let v1 = match fx {
        Fixture::Sqlite { .. } => {
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY NOT NULL, applied TEXT NOT NULL DEFAULT '');
             INSERT INTO schema_version (version) VALUES (1);
             CREATE TABLE keys (id TEXT PRIMARY KEY NOT NULL, token TEXT NOT NULL, grp TEXT NOT NULL,
                class INTEGER NOT NULL, key_type INTEGER NOT NULL, label BLOB NOT NULL, ckid BLOB NOT NULL,
                attrs BLOB NOT NULL, wrapped BLOB NOT NULL, wrap_mech INTEGER NOT NULL, mbk TEXT NOT NULL,
                mac BLOB NOT NULL, version INTEGER NOT NULL, created TEXT NOT NULL DEFAULT '');
             INSERT INTO keys VALUES ('00000000000000000000000000000001', 'tok', 'g', 4, 31, x'61', x'01', x'',
                x'', 8458, 'mbk', x'', 1, '');"
        }
        Fixture::Postgres { .. } => {
            "CREATE TABLE schema_version (version BIGINT PRIMARY KEY, applied TIMESTAMPTZ NOT NULL DEFAULT now());
             INSERT INTO schema_version (version) VALUES (1);
             CREATE TABLE keys (id TEXT COLLATE \"C\" PRIMARY KEY, token TEXT NOT NULL, grp TEXT NOT NULL,
                class BIGINT NOT NULL, key_type BIGINT NOT NULL, label BYTEA NOT NULL, ckid BYTEA NOT NULL,
                attrs BYTEA NOT NULL, wrapped BYTEA NOT NULL, wrap_mech BIGINT NOT NULL, mbk TEXT NOT NULL,
                mac BYTEA NOT NULL, version BIGINT NOT NULL, created TIMESTAMPTZ NOT NULL DEFAULT now());
             INSERT INTO keys VALUES ('00000000000000000000000000000001', 'tok', 'g', 4, 31, '\\x61', '\\x01',
                '\\x', '\\x', 8458, 'mbk', '\\x', 1);"
        }
    };
    fx.raw(v1);
    let store = fx.open();
    assert_eq!(fx.schema_versions(), (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    assert_eq!(ids(&all_rows(&*store)), vec![id(1)]);
    store.user_insert(&user("alice")).unwrap();
    store.audit_append(draft("backup", 1), &seal).unwrap();
}

// ---- SQLite only ----

#[test]
fn sqlite_missing_directory_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let err = store::open(&format!("sqlite:{}/keys.db", missing.display())).err().expect("must fail");
    assert!(matches!(err, StoreError::Url { .. }), "{err:?}");
    assert!(err.to_string().contains(&missing.display().to_string()), "{err}");
    assert!(!missing.exists(), "the directory is not created");
}

#[test]
fn sqlite_file_is_private_and_in_wal_mode() {
    use std::os::unix::fs::PermissionsExt;
    let Fixture::Sqlite { path, .. } = &sqlite() else { unreachable!() };
    let store = store::open(&format!("sqlite:{}", path.display())).unwrap();
    store.insert(&row(1, "tok", "g", "a")).unwrap();
    // The WAL and shared-memory files hold row data too; SQLite gives them the database file's mode.
    for file in [path.clone(), path.with_extension("db-wal"), path.with_extension("db-shm")] {
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}: {mode:o}", file.display());
    }
    let journal: String =
        rusqlite::Connection::open(path).unwrap().query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(journal, "wal");
}

#[test]
fn sqlite_file_that_is_not_a_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    std::fs::write(&path, vec![b'x'; 4096]).unwrap();
    let err = store::open(&format!("sqlite:{}", path.display())).err().expect("must fail");
    assert!(matches!(err, StoreError::Schema { .. }), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
}

// ---- PostgreSQL only ----

#[test]
fn postgres_store_recovers_when_the_server_returns() {
    let cluster = PgCluster::start();
    let db = TestDb::create(cluster.url());
    let store = store::open(db.url()).unwrap();
    let key = row(1, "tok", "g", "a");
    store.insert(&key).unwrap();
    settled(&*store);

    cluster.pause();
    for err in [store.get(&key.id).err(), store.insert(&row(2, "tok", "g", "b")).err()] {
        let err = err.expect("the server is down");
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
        assert!(err.to_string().contains(&store.describe()), "names the store: {err}");
    }
    // Without its listener the store cannot know what changed: every generation is new.
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.generation().unwrap() == store.generation().unwrap() {
        assert!(Instant::now() < deadline, "generation still steady 5 s after the server went away");
        std::thread::sleep(Duration::from_millis(10));
    }

    cluster.resume();
    // The same store object, no re-open: the first call after the server's return succeeds.
    assert_eq!(store.get(&key.id).unwrap(), Some(key.clone()));
    store.insert(&row(3, "tok", "g", "c")).unwrap();
    let seen = settled(&*store); // the listener is back
    let other = store::open(db.url()).unwrap();
    other.insert(&row(4, "tok", "g", "d")).unwrap();
    changed_from(&*store, seen);
}

/// The connections to the server named `name` in pg_stat_activity.
fn connections_named(url: &str, name: &str) -> i64 {
    let mut client = ::postgres::Client::connect(url, ::postgres::NoTls).unwrap();
    client.query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", &[&name]).unwrap().get(0)
}

#[test]
fn postgres_connections_are_named_by_process_unless_the_url_names_them() {
    let db = TestDb::fresh();
    let store = store::open(db.url()).unwrap();
    store.get(&id(1)).unwrap();
    assert!(connections_named(db.url(), &format!("p11shim pid {}", std::process::id())) >= 1);
    let named = store::open(&format!("{}?application_name=billing-7", db.url())).unwrap();
    named.get(&id(1)).unwrap();
    assert_eq!(connections_named(db.url(), "billing-7"), 2, "one for statements, one for the listener");
}

#[test]
fn postgres_connections_of_a_process_are_bounded() {
    let db = TestDb::fresh();
    let options = store::StoreOptions { max_connections: 2, ..Default::default() };
    // A name of its own: the other tests of this process open stores too.
    let name = format!("bounded-{}", std::process::id());
    let store = store::open_with(&format!("{}?application_name={name}", db.url()), &options).unwrap();
    for n in 0..20 {
        store.insert(&row(n, "tok", "g", &format!("k{n}"))).unwrap();
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let most = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut most = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                most = most.max(connections_named(db.url(), &name));
                std::thread::sleep(Duration::from_millis(5));
            }
            most
        });
        let workers: Vec<_> = (0..8)
            .map(|t| {
                let store = &store;
                s.spawn(move || {
                    for i in 0..150 {
                        let query = KeyQuery {
                            token: "tok".into(),
                            label: Some(format!("k{}", (t + i) % 20).into_bytes()),
                            ..Default::default()
                        };
                        assert_eq!(store.find(&query).unwrap().len(), 1);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        sampler.join().unwrap()
    });
    // Two for statements, one for the change listener; 8 threads shared them.
    assert!((2..=3).contains(&most), "{most} connections seen with max_connections = 2");

    // All connections busy: another thread waits up to the connect timeout, then is told why.
    let options = store::StoreOptions { max_connections: 1, ..Default::default() };
    let busy = store::open_with(&format!("{}?connect_timeout=1", db.url()), &options).unwrap();
    let tx = busy.begin().unwrap();
    let waited = Instant::now();
    let err = std::thread::scope(|s| s.spawn(|| busy.get(&id(1)).unwrap_err()).join().unwrap());
    assert!(waited.elapsed() >= Duration::from_millis(900), "waited {:?}", waited.elapsed());
    assert!(
        err.to_string().contains(
            "all 1 connections of this process are in use and none was handed back within 1s \
         (raise [store] max_connections)"
        ),
        "{err}"
    );
    drop(tx);
    assert!(busy.get(&id(1)).unwrap().is_some(), "the connection handed back serves the next call");

    // A scan holds its connection while its callback uses the store: with one connection allowed, the
    // callback still gets one (else it would wait for its own thread).
    let options = store::StoreOptions { max_connections: 1, ..Default::default() };
    let one = store::open_with(db.url(), &options).unwrap();
    let mut seen = 0;
    one.scan_rows(&mut |read| {
        if let store::RowRead::Row(r) = read {
            assert!(one.get(&r.id)?.is_some());
            seen += 1;
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, 20);
}

#[test]
fn postgres_store_says_which_rows_were_current_when_its_feed_was_lost() {
    let cluster = PgCluster::start();
    let db = TestDb::create(cluster.url());
    let store = store::open(db.url()).unwrap();
    let (a, b) = (row(1, "tok", "g", "a"), row(2, "tok", "g", "b"));
    store.insert(&a).unwrap();
    store.insert(&b).unwrap();
    let at = settled(&*store);
    assert_eq!(store.current_when_lost(&a.id, 1, at), None, "the feed is up");
    // Another host changes b: this store hears of it.
    let other = store::open(db.url()).unwrap();
    let mut b2 = b.clone();
    b2.version = 2;
    other.update(&b2).unwrap();
    drop(other);
    let heard = changed_from(&*store, at);
    settled(&*store);

    let before = Instant::now();
    cluster.pause();
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.generation().unwrap() == store.generation().unwrap() {
        assert!(Instant::now() < deadline, "the feed still up 5 s after the server went away");
        std::thread::sleep(Duration::from_millis(10));
    }
    let lost = store.current_when_lost(&a.id, 1, at).expect("a was current when the feed went down");
    assert!(lost >= before && lost <= Instant::now(), "the moment the feed went down");
    assert_eq!(store.current_when_lost(&b.id, 1, at), None, "b changed after `at`");
    assert!(store.current_when_lost(&b.id, 2, heard).is_some(), "b's new version, known current after the change");
    let later = store.generation().unwrap();
    assert_eq!(store.current_when_lost(&a.id, 1, later), None, "a generation after the loss proves nothing");

    cluster.resume();
    assert_eq!(store.get(&a.id).unwrap(), Some(a.clone()));
    settled(&*store);
    assert_eq!(store.current_when_lost(&a.id, 1, at), None, "the feed is up again");
}

// ---- Measurements (not assertions): cargo test --release --test store -- --ignored --nocapture ----

both_engines_ignored!(measure_find_by_label_among_100k_rows_and_generation);

fn measure_find_by_label_among_100k_rows_and_generation(fx: &Fixture) {
    let store = fx.open();
    // Filled behind the store's back in one statement: 100k single-row commits would measure fsync instead.
    let fill = match fx {
        Fixture::Sqlite { .. } => {
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000)
             INSERT INTO keys (id, token, grp, class, key_type, label, ckid, attrs, wrapped, wrap_mech, mbk, mac, version)
             SELECT printf('%032x', i), 'bench', 'g' || (i % 10), 4, 31, CAST('label-' || i AS BLOB),
                    CAST(i AS BLOB), zeroblob(200), zeroblob(40), 8458, 'mbk', zeroblob(32), 1 FROM n"
        }
        Fixture::Postgres { .. } => {
            "INSERT INTO keys (id, token, grp, class, key_type, label, ckid, attrs, wrapped, wrap_mech, mbk, mac, version)
             SELECT lpad(to_hex(i), 32, '0'), 'bench', 'g' || (i % 10), 4, 31, convert_to('label-' || i, 'UTF8'),
                    convert_to(i::text, 'UTF8'), decode(repeat('00', 200), 'hex'), decode(repeat('00', 40), 'hex'),
                    8458, 'mbk', decode(repeat('00', 32), 'hex'), 1 FROM generate_series(1, 100000) AS i;
             ANALYZE keys"
        }
    };
    fx.raw(fill);
    let query = KeyQuery { token: "bench".into(), label: Some(b"label-54321".to_vec()), ..Default::default() };
    assert_eq!(store.find(&query).unwrap().len(), 1);
    let mut times: Vec<Duration> = (0..1000)
        .map(|_| {
            let t = Instant::now();
            store.find(&query).unwrap();
            t.elapsed()
        })
        .collect();
    times.sort();
    let n = 1_000_000u32;
    let t = Instant::now();
    for _ in 0..n {
        store.generation().unwrap();
    }
    let per_generation = t.elapsed() / n;
    println!(
        "{}: find by label among 100k rows: median {:?}, p99 {:?}, max {:?}; generation(): {:?} per call",
        store.describe(),
        times[500],
        times[990],
        times[999],
        per_generation
    );
}
