//! The whole-store backup file (src/backup/db.rs): `db::restore` into an in-memory key store, under the real
//! HMAC-SHA256 check and under a sealer that takes every MAC as valid (to reach the line parsing behind the
//! trailer MAC), with and without the users table allowed. What restores is backed up again with
//! `db::backup` and restored once more: the second restore must give the same rows and users.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p11shim::attrs::Template;
use p11shim::backup::db;
use p11shim::backup::format::Sealer;
use p11shim::store::{KeyRow, UserRow};
use p11shim_fuzz::{hmac_sealer, scratch_file, AcceptAll, MemStore};

fn rows(store: &MemStore) -> Vec<KeyRow> {
    let mut rows = store.rows.lock().unwrap().clone();
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    rows
}

fn users(store: &MemStore) -> Vec<UserRow> {
    let mut users = store.users.lock().unwrap().clone();
    // A restored user is sealed again with its new version: the seal is not what travels.
    users.iter_mut().for_each(|u| {
        u.version = 1;
        u.mac.clear();
    });
    users.sort_by(|a, b| a.name.cmp(&b.name));
    users
}

fuzz_target!(|data: &[u8]| {
    let path = scratch_file(data);
    let real = hmac_sealer();
    for sealer in [&real as &dyn Sealer, &AcceptAll] {
        for users_denied in [None, Some("the users table is not yours")] {
            let store = MemStore::default();
            match db::restore(&store, sealer, None, path, users_denied, &|_| {}) {
                Ok(summary) => {
                    let (rows, users) = (rows(&store), users(&store));
                    assert!(rows.len() as u64 <= summary.keys && users.len() as u64 <= summary.users);
                    assert!(users_denied.is_none() || summary.users == 0);
                    for row in &rows {
                        let _ = Template::decode(&row.attrs);
                    }
                    // Back up what was restored, and restore that again.
                    let out = path.with_file_name("again");
                    let _ = std::fs::remove_file(&out);
                    let written = db::backup(&store, sealer, &out, true, &|_| {}).expect("backing up a memory store");
                    assert_eq!((written.keys, written.users), (rows.len() as u64, users.len() as u64));
                    let second = MemStore::default();
                    let again = db::restore(&second, sealer, None, &out, None, &|_| {})
                        .expect("a backup just written restores");
                    assert_eq!((again.keys, again.users), (written.keys, written.users));
                    assert!(self::rows(&second) == rows, "rows survive a backup and restore");
                    assert!(self::users(&second) == users, "users survive a backup and restore");
                }
                Err(e) => {
                    let _ = e.to_string();
                    assert!(store.rows.lock().unwrap().is_empty(), "a refused restore changes nothing");
                    assert!(store.users.lock().unwrap().is_empty(), "a refused restore changes nothing");
                }
            }
        }
    }
});
