//! What the fuzz targets share: the sealers, an in-memory key store and a scratch file. None of it parses
//! anything: every target calls the library's own readers.

use p11shim::backup::format::Sealer;

/// The tests' HMAC-SHA256 sealer (tests/common/sealer.rs): the library has none, it seals in the HSM.
#[path = "../../tests/common/sealer.rs"]
mod sealer;
use p11shim::error::Result;
use p11shim::store::{
    AuditDraft, AuditEntry, AuditSeal, KeyQuery, KeyRow, KeyStore, StoreResult, StoreTx, UserDelete, UserRow,
};
pub use sealer::SoftwareSealer;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// The MAC key of the seed corpus: files written by `examples/make_corpus.rs` verify under it.
pub const MAC_KEY: &[u8] = b"p11shim fuzz corpus MAC key";

/// HMAC-SHA256 under [`MAC_KEY`]: the real check, which a mutated record or trailer fails.
pub fn hmac_sealer() -> SoftwareSealer {
    SoftwareSealer::new(MAC_KEY)
}

/// A sealer that takes every MAC as valid, so that the fuzzer reaches the code behind the MAC checks (the
/// canonical-form checks, the count, what restore does with a line) as someone holding the MAC key would.
/// It seals like [`hmac_sealer`].
pub struct AcceptAll;

impl Sealer for AcceptAll {
    fn seal(&self, data: &[u8]) -> Result<Vec<u8>> {
        hmac_sealer().seal(data)
    }
    fn check(&self, _data: &[u8], _mac: &[u8]) -> Result<bool> {
        Ok(true)
    }
}

/// `data` written to this process's scratch file (in a private temporary directory, on tmpfs when there is
/// one), for the readers that take a path.
pub fn scratch_file(data: &[u8]) -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        tempfile::Builder::new().prefix("p11shim-fuzz-").tempdir_in(base).expect("a scratch directory")
    });
    let path = FILE.get_or_init(|| dir.path().join("input"));
    std::fs::write(path, data).expect("writing the scratch file");
    path
}

/// A key store in memory: what restore and logon need, nothing persistent.
#[derive(Default)]
pub struct MemStore {
    pub rows: Mutex<Vec<KeyRow>>,
    pub users: Mutex<Vec<UserRow>>,
    pub audit: Mutex<Vec<AuditEntry>>,
    /// Seal keys of device MBKs, by fingerprint (ordered, as the stores list them).
    pub seals: Mutex<std::collections::BTreeMap<String, Vec<u8>>>,
}

impl MemStore {
    pub fn with(rows: Vec<KeyRow>, users: Vec<UserRow>) -> MemStore {
        MemStore { rows: Mutex::new(rows), users: Mutex::new(users), audit: Mutex::default(), seals: Mutex::default() }
    }
}

fn upsert(rows: &mut Vec<KeyRow>, row: &KeyRow) {
    match rows.iter_mut().find(|r| r.id == row.id) {
        Some(r) => *r = row.clone(),
        None => rows.push(row.clone()),
    }
}

impl KeyStore for MemStore {
    fn describe(&self) -> String {
        "memory".into()
    }
    fn seal_key(&self, mbk: &str) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.seals.lock().unwrap().get(mbk).cloned())
    }
    fn seal_key_insert(&self, mbk: &str, blob: &[u8]) -> StoreResult<bool> {
        let mut seals = self.seals.lock().unwrap();
        if seals.contains_key(mbk) {
            return Ok(false);
        }
        seals.insert(mbk.to_string(), blob.to_vec());
        Ok(true)
    }
    fn sealed_under(&self, mbk: &str) -> StoreResult<bool> {
        Ok(self.rows.lock().unwrap().iter().any(|r| r.mbk == mbk))
    }
    fn seal_keys(&self) -> StoreResult<Vec<(String, Vec<u8>)>> {
        Ok(self.seals.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
    fn insert(&self, row: &KeyRow) -> StoreResult<()> {
        upsert(&mut self.rows.lock().unwrap(), row);
        Ok(())
    }
    fn get(&self, id: &str) -> StoreResult<Option<KeyRow>> {
        Ok(self.rows.lock().unwrap().iter().find(|r| r.id == id).cloned())
    }
    fn find(&self, query: &KeyQuery) -> StoreResult<Vec<KeyRow>> {
        Ok(self.rows.lock().unwrap().iter().filter(|r| r.token == query.token).cloned().collect())
    }
    fn update(&self, row: &KeyRow) -> StoreResult<bool> {
        upsert(&mut self.rows.lock().unwrap(), row);
        Ok(true)
    }
    fn delete(&self, id: &str) -> StoreResult<bool> {
        let mut rows = self.rows.lock().unwrap();
        let before = rows.len();
        rows.retain(|r| r.id != id);
        Ok(rows.len() != before)
    }
    fn generation(&self) -> StoreResult<u64> {
        Ok(0)
    }
    fn exists(&self, id: &str) -> StoreResult<bool> {
        Ok(self.rows.lock().unwrap().iter().any(|r| r.id == id))
    }
    fn scan(&self, f: &mut dyn FnMut(KeyRow) -> StoreResult<()>) -> StoreResult<()> {
        let rows = self.rows.lock().unwrap().clone();
        rows.into_iter().try_for_each(f)
    }
    fn begin(&self) -> StoreResult<Box<dyn StoreTx + '_>> {
        Ok(Box::new(MemTx { store: self, rows: Vec::new() }))
    }
    fn user_insert(&self, user: &UserRow) -> StoreResult<()> {
        self.users.lock().unwrap().push(user.clone());
        Ok(())
    }
    fn user_insert_first(&self, user: &UserRow) -> StoreResult<bool> {
        let mut users = self.users.lock().unwrap();
        let first = users.is_empty();
        if first {
            users.push(user.clone());
        }
        Ok(first)
    }
    fn user_update(&self, user: &UserRow) -> StoreResult<bool> {
        let mut users = self.users.lock().unwrap();
        match users.iter_mut().find(|u| u.name == user.name) {
            Some(u) => *u = user.clone(),
            None => users.push(user.clone()),
        }
        Ok(true)
    }
    fn user_get(&self, name: &str) -> StoreResult<Option<UserRow>> {
        Ok(self.users.lock().unwrap().iter().find(|u| u.name == name).cloned())
    }
    fn user_list(&self) -> StoreResult<Vec<UserRow>> {
        Ok(self.users.lock().unwrap().clone())
    }
    fn user_delete(&self, name: &str) -> StoreResult<bool> {
        let mut users = self.users.lock().unwrap();
        let before = users.len();
        users.retain(|u| u.name != name);
        Ok(users.len() != before)
    }
    fn user_delete_if(&self, name: &str, allowed: &dyn Fn(&[UserRow]) -> bool) -> StoreResult<UserDelete> {
        let mut users = self.users.lock().unwrap();
        let Some(at) = users.iter().position(|u| u.name == name) else { return Ok(UserDelete::NotFound) };
        let rest: Vec<UserRow> = users.iter().filter(|u| u.name != name).cloned().collect();
        if !allowed(&rest) {
            return Ok(UserDelete::Refused(users[at].clone()));
        }
        Ok(UserDelete::Deleted(users.remove(at)))
    }
    fn audit_append(&self, draft: AuditDraft, seal: AuditSeal) -> StoreResult<AuditEntry> {
        let mut audit = self.audit.lock().unwrap();
        let (seq, prev, last_sealed) = match audit.last() {
            Some(e) => (e.seq + 1, e.hash.clone(), !e.mac.is_empty()),
            None => (1, vec![0; 32], false),
        };
        let hash = AuditEntry::compute_hash(seq, &prev, &draft);
        let (mac, mbk) = seal(&hash, last_sealed)?;
        let entry = AuditEntry { seq, draft, prev, hash, mac, mbk };
        audit.push(entry.clone());
        Ok(entry)
    }
    fn audit_scan(&self, f: &mut dyn FnMut(AuditEntry) -> StoreResult<()>) -> StoreResult<()> {
        let entries = self.audit.lock().unwrap().clone();
        entries.into_iter().try_for_each(f)
    }
}

struct MemTx<'a> {
    store: &'a MemStore,
    rows: Vec<KeyRow>,
}

impl StoreTx for MemTx<'_> {
    fn insert(&mut self, row: &KeyRow) -> StoreResult<()> {
        self.rows.push(row.clone());
        Ok(())
    }
    fn replace(&mut self, row: &KeyRow) -> StoreResult<()> {
        upsert(&mut self.rows, row);
        Ok(())
    }
    fn exists(&mut self, id: &str) -> StoreResult<bool> {
        Ok(self.rows.iter().any(|r| r.id == id) || self.store.exists(id)?)
    }
    fn commit(self: Box<Self>) -> StoreResult<()> {
        let mut rows = self.store.rows.lock().unwrap();
        for row in &self.rows {
            upsert(&mut rows, row);
        }
        Ok(())
    }
}
