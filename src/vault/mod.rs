//! Stored keys: token objects of database slots live as rows of the key store, their secret
//! wrapped under the token's MBK and every row authenticated by a MAC made in the HSM. The application sees
//! ordinary token objects with handles in the shim's range; the first use of one loads it into the HSM as a
//! session object held by the shim (unwrap under the MBK), and later uses hit that copy while the store says
//! nothing changed.
//!
//! Locks here guard maps for a few instructions; none is held while the backend or the store works.

mod create;
mod find;
mod init;
mod object;
mod recipe;

pub use create::{shape_key, Created, Made, PublicHalf, Request};
pub use find::FindState;
pub use object::Answer;
pub use recipe::{restorable, unwrap_mechanism, Recipe};

use crate::attrs::Template;
use crate::backend::Backend;
use crate::backup::format::Sealer;
use crate::backup::mbk::{self, MbkSet};
use crate::config::{Config, SlotConfig, Storage};
use crate::error::{Error, Result};
use crate::objects::{self, ShimObject};
use crate::sessions;
use crate::store::{self, KeyRow, KeyStore};
use cryptoki_sys::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

/// A stored key as this process knows it: which row, and the HSM copy it may have loaded.
pub struct StoredKey {
    pub id: String,
    pub slot: CK_SLOT_ID,
    state: Mutex<KeyState>,
    /// The warm path without a lock: the loaded copy and the generation it was last known current at,
    /// published from `state` (0 and u64::MAX when there is nothing to use).
    fast_handle: AtomicU64,
    fast_generation: AtomicU64,
    /// Calls using the HSM copy right now (objects::InFlight): it is not evicted meanwhile.
    in_flight: AtomicU32,
    /// Sessions whose latest operation of some kind was started with this key (see `Vault::pin`): it is not
    /// evicted while any is, so that no operation loses its key halfway.
    pins: AtomicU32,
    /// The (session, operation kind) that pinned it last, encoded (0: none): spares the pin table's lock
    /// when a session starts the same operation with the same key again.
    last_pin: AtomicU64,
    /// Used since the cache's hand last passed it (CLOCK, the usual approximation of least recently used).
    referenced: AtomicBool,
}

impl StoredKey {
    fn new(id: &str, slot: CK_SLOT_ID) -> StoredKey {
        StoredKey {
            id: id.to_string(),
            slot,
            state: Mutex::new(KeyState::default()),
            fast_handle: AtomicU64::new(0),
            fast_generation: AtomicU64::new(u64::MAX),
            in_flight: AtomicU32::new(0),
            pins: AtomicU32::new(0),
            last_pin: AtomicU64::new(0),
            referenced: AtomicBool::new(true),
        }
    }

    /// A call begins to use the key's HSM copy. Sequentially consistent with the eviction's unpublishing and
    /// looking (see `try_unload`): either the eviction sees this use, or this use sees no copy to use.
    pub(crate) fn begin_use(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn end_use(&self) {
        self.in_flight.fetch_sub(1, Ordering::Release);
    }

    /// Publishes `st` for the warm path; called with the state lock held, after every change to it.
    fn publish(&self, st: &KeyState) {
        match (st.gone, st.loaded, st.checked) {
            (false, Some(h), Some(g)) => {
                // The handle before the generation: a reader that sees this generation sees this handle.
                self.fast_handle.store(h, Ordering::SeqCst);
                self.fast_generation.store(g, Ordering::SeqCst);
            }
            _ => {
                self.fast_generation.store(u64::MAX, Ordering::SeqCst);
                self.fast_handle.store(0, Ordering::SeqCst);
            }
        }
    }

    /// One step of the cache's hand over this key (see `Vault::admit`).
    fn try_unload(&self) -> Unload {
        if self.pins.load(Ordering::SeqCst) > 0 || self.in_flight.load(Ordering::SeqCst) > 0 {
            return Unload::Busy;
        }
        if self.referenced.swap(false, Ordering::Relaxed) {
            return Unload::Recent;
        }
        let mut st = lock(&self.state);
        let Some(h) = st.loaded.take() else { return Unload::Stale };
        // Unpublished first, then looked at again: a use that began before this is seen here and keeps the
        // copy; one that begins after finds no copy and loads one.
        let checked = st.checked.take();
        self.publish(&st);
        if self.in_flight.load(Ordering::SeqCst) > 0 || self.pins.load(Ordering::SeqCst) > 0 {
            st.loaded = Some(h);
            st.checked = checked;
            self.publish(&st);
            return Unload::Busy;
        }
        Unload::Unloaded(h)
    }

    /// Takes the loaded copy's handle out of the key's state (it must be checked again before any use), and
    /// marks the key gone when its row is (dropping the row held).
    fn take_copy(&self, gone: bool) -> Option<CK_OBJECT_HANDLE> {
        let mut st = lock(&self.state);
        st.gone |= gone;
        if gone {
            st.kept = None;
        }
        st.checked = None;
        let copy = st.loaded.take();
        self.publish(&st);
        copy
    }

    /// The loaded copy, if it is known current at `generation`.
    fn warm(&self, generation: u64) -> Option<CK_OBJECT_HANDLE> {
        if self.fast_generation.load(Ordering::SeqCst) != generation {
            return None;
        }
        Some(self.fast_handle.load(Ordering::SeqCst)).filter(|h| *h != 0)
    }

    /// Marks the key used, for the cache's hand (a store only when the mark was clear: no cache line
    /// bouncing between threads that use the same key).
    fn touch(&self) {
        if !self.referenced.load(Ordering::Relaxed) {
            self.referenced.store(true, Ordering::Relaxed);
        }
    }
}

/// What the cache's hand did with a key.
enum Unload {
    /// In use, or pinned by an operation: kept.
    Busy,
    /// Used since the hand last passed: kept, and its mark cleared.
    Recent,
    /// No copy loaded any more (logged out, destroyed, evicted): its entry goes.
    Stale,
    /// Unloaded: this copy is to be destroyed.
    Unloaded(CK_OBJECT_HANDLE),
}

/// The keys whose copy is loaded, in the order the cache's hand walks them.
#[derive(Default)]
struct Clock {
    keys: Vec<Arc<StoredKey>>,
    hand: usize,
}

/// The operation kind of a C_*Init function, for pins: a session has at most one operation of each kind.
fn op_kind(init: &str) -> u8 {
    match init {
        "C_EncryptInit" => 1,
        "C_DecryptInit" => 2,
        "C_SignInit" => 3,
        "C_VerifyInit" => 4,
        "C_SignRecoverInit" => 5,
        "C_VerifyRecoverInit" => 6,
        "C_MessageEncryptInit" => 7,
        "C_MessageDecryptInit" => 8,
        "C_MessageSignInit" => 9,
        "C_MessageVerifyInit" => 10,
        _ => 15,
    }
}

/// A C_*Init call with a stored key (objects::hold): the key stays loaded while it is the session's latest of
/// that kind.
pub fn pin(session: CK_SESSION_HANDLE, init: &str, key: &Arc<StoredKey>) {
    if let Some(vault) = current() {
        vault.pin(session, op_kind(init), key);
    }
}

impl KeyState {
    /// The loaded copy was found current at `generation`, by asking the store.
    fn confirm(&mut self, generation: u64) {
        self.checked = Some(generation);
        self.confirmed = Some(std::time::Instant::now());
        self.graced = false;
    }
}

#[derive(Default)]
struct KeyState {
    /// The session object holding the key in the HSM, if loaded.
    loaded: Option<CK_OBJECT_HANDLE>,
    /// The row version the loaded copy was made from.
    version: i64,
    /// The store generation at which the copy was last known to be current.
    checked: Option<u64>,
    /// When a call last found the copy current by asking the store (a warm use, which asks nothing,
    /// leaves it as it is: see `Vault::in_grace`).
    confirmed: Option<std::time::Instant>,
    /// The copy is being used under `[store] outage_grace` (logged once per outage).
    graced: bool,
    /// The row is gone (destroyed here or elsewhere): the handle stays invalid.
    gone: bool,
    /// The key's row as this process last read or wrote it, if memory allows.
    kept: Option<Kept>,
}

/// At most one log line a second for one kind of failure.
#[derive(Default)]
struct RateLimit {
    /// (last logged, failures not logged since)
    state: Mutex<(Option<std::time::Instant>, u64)>,
}

impl RateLimit {
    /// Some(failures not logged since the last line) when a line is due now; else counts this one.
    fn due(&self) -> Option<u64> {
        let mut st = lock(&self.state);
        match st.0 {
            Some(last) if last.elapsed() < std::time::Duration::from_secs(1) => {
                st.1 += 1;
                None
            }
            _ => {
                let unlogged = std::mem::take(&mut st.1);
                st.0 = Some(std::time::Instant::now());
                Some(unlogged)
            }
        }
    }
}

/// A row this process holds, and the store generation at which it was known current: while the store
/// says nothing that concerns it changed since, a use needs no read of the store (with PostgreSQL, no
/// round trip). Rows come from finds, creations and loads; together they take at most KEPT_BUDGET bytes.
struct Kept {
    row: Arc<KeyRow>,
    at: u64,
    /// Its MAC was checked in the HSM, or this process made it: a load need not check it again.
    verified: bool,
    /// When it was last read, written or found current.
    seen: std::time::Instant,
    bytes: usize,
}

/// Memory for kept rows, for all keys of the process together; beyond it, rows are read when used.
const KEPT_BUDGET: usize = 32 << 20;
static KEPT_BYTES: AtomicUsize = AtomicUsize::new(0);

impl Kept {
    /// Takes `row` if the budget allows.
    fn new(row: Arc<KeyRow>, at: u64, verified: bool) -> Option<Kept> {
        let bytes = 160
            + row.id.len()
            + row.token.len()
            + row.group.len()
            + row.label.len()
            + row.ckid.len()
            + row.attrs.len()
            + row.wrapped.len()
            + row.mbk.len()
            + row.mac.len();
        let reserved = KEPT_BYTES.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
            (used + bytes <= KEPT_BUDGET).then_some(used + bytes)
        });
        reserved.is_ok().then_some(Kept { row, at, verified, seen: std::time::Instant::now(), bytes })
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        KEPT_BYTES.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoredKey({})", self.id)
    }
}

pub struct Vault {
    backend: &'static Backend,
    url: String,
    store: OnceLock<Box<dyn KeyStore>>,
    opening: Mutex<()>,
    /// The database slots of the config.
    slots: Vec<SlotConfig>,
    /// Backend slot id → index into `slots` (None: not a database slot), learned from token labels.
    policy: RwLock<HashMap<CK_SLOT_ID, Option<usize>>>,
    /// Row id → the handle the application knows it by, so a key keeps one handle.
    handles: Mutex<HashMap<String, (CK_OBJECT_HANDLE, Arc<StoredKey>)>>,
    /// Idle sessions of the shim's own, per slot (operations on them are never concurrent).
    pool: Mutex<HashMap<CK_SLOT_ID, Vec<CK_SESSION_HANDLE>>>,
    mbks: Mutex<HashMap<CK_SLOT_ID, MbkSet>>,
    finds: Mutex<HashMap<CK_SESSION_HANDLE, FindState>>,
    /// The keys whose copy is loaded in the HSM: at most `cache` (`[store] hsm_cache`), least recently used
    /// evicted first (CLOCK).
    loaded: Mutex<Clock>,
    cache: usize,
    /// `[store] max_connections` and `outage_grace`.
    options: store::StoreOptions,
    /// When a store failure was last logged, and how many were not since.
    outage_log: RateLimit,
    /// Each session's latest operation of each kind started with a stored key.
    pins: Mutex<HashMap<(CK_SESSION_HANDLE, u8), Arc<StoredKey>>>,
    /// What the backend makes of each shape of key generation request (see `create`).
    shapes: Mutex<HashMap<Vec<u8>, create::Shape>>,
    /// Where audit entries of group changes also write their head, and the mode they record.
    audit_head: Option<std::path::PathBuf>,
    mode: crate::config::Mode,
}

static VAULT: RwLock<Option<Arc<Vault>>> = RwLock::new(None);

/// Sets up the vault after the backend's C_Initialize, when the config has database slots. The store is
/// opened on first need, so a database that is down makes stored keys fail with CKR_DEVICE_ERROR, not the
/// whole library.
pub fn start(backend: &'static Backend, config: &Config) {
    let slots: Vec<SlotConfig> = config.slots.iter().filter(|s| s.storage == Storage::Database).cloned().collect();
    let vault = (!slots.is_empty()).then(|| {
        Arc::new(Vault {
            backend,
            url: config.store_url.clone(),
            store: OnceLock::new(),
            opening: Mutex::new(()),
            slots,
            policy: RwLock::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            pool: Mutex::new(HashMap::new()),
            mbks: Mutex::new(HashMap::new()),
            finds: Mutex::new(HashMap::new()),
            shapes: Mutex::new(HashMap::new()),
            loaded: Mutex::new(Clock::default()),
            cache: config.hsm_cache,
            options: config.store,
            outage_log: RateLimit::default(),
            pins: Mutex::new(HashMap::new()),
            audit_head: config.audit_head.clone(),
            mode: config.mode,
        })
    });
    *VAULT.write().unwrap_or_else(|e| e.into_inner()) = vault;
}

/// Drops the vault (C_Finalize). In a forked child the parent's connections are not ours to close:
/// `forked` leaks them instead.
pub fn stop(forked: bool) {
    let old = VAULT.write().unwrap_or_else(|e| e.into_inner()).take();
    if forked {
        std::mem::forget(old);
        // The parent's kept rows are leaked with it: none of that memory is the child's to count.
        KEPT_BYTES.store(0, Ordering::Relaxed);
    }
}

/// The vault's handle held for writing across a fork (see crate::forks).
pub(crate) fn fork_guard() -> Box<dyn std::any::Any> {
    Box::new(VAULT.write().unwrap_or_else(|e| e.into_inner()))
}

/// The vault, when database slots are configured and the library is initialized.
pub fn current() -> Option<Arc<Vault>> {
    VAULT.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The backend handle of a stored key for an operation (objects::to_backend). Loads it on first use; an
/// unknown or destroyed key is `invalid`; a store that cannot be reached is CKR_DEVICE_ERROR; a row that
/// fails its MAC is CKR_GENERAL_ERROR.
pub fn resolve(key: &Arc<StoredKey>, invalid: CK_RV) -> std::result::Result<CK_OBJECT_HANDLE, CK_RV> {
    key.touch();
    {
        // The warm path: no lock but the vault's read lock, no allocation, no reference count.
        let guard = VAULT.read().unwrap_or_else(|e| e.into_inner());
        let vault = guard.as_ref().ok_or(invalid)?;
        if let Some(generation) = vault.store.get().and_then(|s| s.generation().ok()) {
            if let Some(h) = key.warm(generation) {
                return Ok(h);
            }
        }
    }
    let vault = current().ok_or(invalid)?;
    vault.resolve(key, invalid).map_err(|e| e.rv())
}

impl Vault {
    fn store(&self) -> Result<&dyn KeyStore> {
        if let Some(s) = self.store.get() {
            return Ok(s.as_ref());
        }
        let _opening = lock(&self.opening);
        if self.store.get().is_none() {
            let opened = store::open_with(&self.url, &self.options).inspect_err(|e| crate::error!("{e}"))?;
            crate::info!("key store {} opened", opened.describe());
            let _ = self.store.set(opened);
        }
        Ok(self.store.get().map(|s| s.as_ref()).expect("set above"))
    }

    /// Logs a store failure once per call and passes it on (CKR_DEVICE_ERROR for an unreachable store).
    /// A store that cannot be reached is logged at most once a second (with how many such failures were not):
    /// during an outage every call would otherwise log a line.
    fn logged<T>(&self, what: &str, r: store::StoreResult<T>) -> Result<T> {
        r.map_err(|e| {
            if e.kind() != crate::error::ErrorKind::Unavailable {
                crate::error!("{what}: {e}");
            } else if let Some(unlogged) = self.outage_log.due() {
                let more =
                    if unlogged > 0 { format!(" ({unlogged} more such failures not logged)") } else { String::new() };
                crate::error!("{what}: {e}{more}");
            }
            Error::Store(e)
        })
    }

    /// The database slot config for a backend slot, if it is one.
    pub fn policy(&self, slot: CK_SLOT_ID) -> Option<&SlotConfig> {
        if let Some(known) = self.policy.read().unwrap_or_else(|e| e.into_inner()).get(&slot) {
            return known.map(|i| &self.slots[i]);
        }
        // Slots are matched by token label: backends renumber slots, labels are what operators name. A slot
        // whose token is not initialized yet is not remembered: it may become a database slot.
        let info = self.backend.token_info(slot).ok()?;
        let index = self.slots.iter().position(|s| s.token == crate::hsm::padded_text(&info.label));
        if info.flags & CKF_TOKEN_INITIALIZED != 0 {
            self.policy.write().unwrap_or_else(|e| e.into_inner()).insert(slot, index);
        }
        index.map(|i| &self.slots[i])
    }

    /// Runs `f` on an idle session of the shim's own on `slot` (opened on demand, read/write). A session the
    /// backend no longer knows (closed by the device, which then closed the other idle ones too) is dropped
    /// with the other idle sessions of the slot, and `f` runs once more on a fresh session.
    fn with_session<R>(&self, slot: CK_SLOT_ID, f: impl Fn(CK_SESSION_HANDLE) -> Result<R>) -> Result<R> {
        let idle = lock(&self.pool).get_mut(&slot).and_then(Vec::pop);
        let pooled = idle.is_some();
        let session = match idle {
            Some(s) => s,
            None => {
                let s = self.backend.open_session(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION)?;
                sessions::opened_internal(s, slot);
                s
            }
        };
        let result = f(session);
        if matches!(result, Err(Error::Rv(CKR_SESSION_HANDLE_INVALID | CKR_SESSION_CLOSED | CKR_DEVICE_REMOVED))) {
            sessions::closed_internal(session);
            let _ = self.backend.close_session(session);
            if pooled && matches!(result, Err(Error::Rv(CKR_SESSION_HANDLE_INVALID | CKR_SESSION_CLOSED))) {
                let others = lock(&self.pool).remove(&slot).unwrap_or_default();
                for s in others {
                    sessions::closed_internal(s);
                    let _ = self.backend.close_session(s);
                }
                crate::warn!("the shim's own sessions on slot {slot} were closed by the backend; opening a new one");
                return self.with_session(slot, f);
            }
        } else {
            lock(&self.pool).entry(slot).or_default().push(session);
        }
        result
    }

    /// The token's MBK set; an error that says how to create it if there is none, or how to replace one that
    /// does not keep custody. Its keys are the shim's own from then on: the application cannot name them.
    fn mbk(&self, slot: CK_SLOT_ID, token: &str) -> Result<MbkSet> {
        if let Some(set) = lock(&self.mbks).get(&slot) {
            return Ok(set.clone());
        }
        let found = self
            .with_session(slot, |s| mbk::find(self.backend, s, slot))
            .inspect_err(|e| crate::error!("token {token:?}: {e}"))?;
        let Some(mut set) = found else {
            let message = mbk::missing(token);
            crate::error!("{message}");
            return Err(Error::Missing(message));
        };
        for h in set.handles() {
            objects::own(h);
        }
        set.current(token)?;
        if set.is_device() {
            let store = self.store()?;
            set = self.with_session(slot, |s| {
                let mut attached = set.clone();
                mbk::attach_seal(&mut attached, self.backend, s, store, true)?;
                Ok(attached)
            })?;
        }
        lock(&self.mbks).insert(slot, set.clone());
        Ok(set)
    }

    /// Learns the slot's MBK set if it has one, so that its keys are the shim's own before the application
    /// can see them (a find, an attribute read). A missing or outdated set is not an error here.
    pub fn claim_mbk(&self, slot: CK_SLOT_ID) {
        if lock(&self.mbks).contains_key(&slot) {
            return;
        }
        if let Ok(Some(set)) = self.with_session(slot, |s| mbk::find(self.backend, s, slot)) {
            for h in set.handles() {
                objects::own(h);
            }
            // A device set is kept once its seal key is attached (Vault::mbk).
            if set.outdated.is_none() && !set.is_device() {
                lock(&self.mbks).insert(slot, set);
            }
        }
    }

    /// The application's handle for a row, the same one every time.
    fn handle_for(&self, id: &str, slot: CK_SLOT_ID) -> (CK_OBJECT_HANDLE, Arc<StoredKey>) {
        let mut handles = lock(&self.handles);
        if let Some((h, key)) = handles.get(id) {
            return (*h, key.clone());
        }
        let key = Arc::new(StoredKey::new(id, slot));
        let h = objects::allocate(ShimObject::Stored(key.clone()));
        handles.insert(id.to_string(), (h, key.clone()));
        (h, key)
    }

    fn resolve(&self, key: &Arc<StoredKey>, invalid: CK_RV) -> Result<CK_OBJECT_HANDLE> {
        let store = self.store()?;
        let generation = self.logged("checking the key store for changes", store.generation())?;
        {
            let mut st = lock(&key.state);
            if st.gone {
                return Err(Error::Rv(invalid));
            }
            if let (Some(h), Some(checked)) = (st.loaded, st.checked) {
                if store.unchanged_since(&key.id, st.version, checked, generation) {
                    st.confirm(generation);
                    key.publish(&st);
                    return Ok(h);
                }
            }
        }
        // Something changed somewhere: is this key still there, and still the version we loaded?
        let current = match self.current_row(store, key, generation) {
            Err(Error::Store(e)) if e.kind() == crate::error::ErrorKind::Unavailable => {
                return self.in_grace(store, key).ok_or(Error::Store(e));
            }
            current => current,
        };
        let Some((row, verified)) = current? else {
            return Err(Error::Rv(invalid));
        };
        {
            let mut st = lock(&key.state);
            if let Some(h) = st.loaded.filter(|_| st.version == row.version) {
                st.confirm(generation);
                key.publish(&st);
                return Ok(h);
            }
        }
        let fresh = self.load(key.slot, &row, verified)?;
        self.keep(key, row.clone(), generation, true);
        let (keep, stale) = {
            let mut st = lock(&key.state);
            let result = if st.gone {
                (None, Some(fresh))
            } else if st.loaded.is_some() && st.version == row.version {
                // Another thread loaded the same version meanwhile: use its copy.
                st.confirm(generation);
                (st.loaded, Some(fresh))
            } else {
                let old = st.loaded.replace(fresh);
                st.version = row.version;
                st.confirm(generation);
                (Some(fresh), old)
            };
            key.publish(&st);
            result
        };
        if let Some(stale) = stale {
            self.destroy_own(key.slot, stale);
        }
        if keep == Some(fresh) {
            self.admit(key);
        }
        keep.ok_or(Error::Rv(invalid))
    }

    /// A copy of a key to use while the store cannot be reached, if the key was last known current less than
    /// `[store] outage_grace` ago: when a call last confirmed it with the store, or, for a key used on the
    /// warm path since, when the store's change feed went down having heard of no change to it. The loaded
    /// copy; or, for a key evicted from the HSM cache, a copy loaded from the row this process holds (its
    /// MAC checked in the HSM unless it was before). Neither is marked current (the next call asks the
    /// store again), so a key destroyed or changed elsewhere meanwhile is refused as soon as the store
    /// answers.
    fn in_grace(&self, store: &dyn KeyStore, key: &Arc<StoredKey>) -> Option<CK_OBJECT_HANDLE> {
        let grace = self.options.outage_grace;
        let within = |confirmed: Option<std::time::Instant>, version: i64, at: u64| {
            let last = confirmed.max(store.current_when_lost(&key.id, version, at))?;
            Some(last.elapsed()).filter(|ago| *ago <= grace)
        };
        let (row, verified) = {
            let mut st = lock(&key.state);
            if st.gone || grace.is_zero() {
                return None;
            }
            if let (Some(h), Some(checked)) = (st.loaded, st.checked) {
                let ago = within(st.confirmed, st.version, checked)?;
                self.graced(key, &mut st, ago);
                return Some(h);
            }
            let kept = st.kept.as_ref()?;
            within(Some(kept.seen), kept.row.version, kept.at)?;
            (kept.row.clone(), kept.verified)
        };
        let fresh = self.load(key.slot, &row, verified).ok()?;
        let (use_, stale) = {
            let mut st = lock(&key.state);
            let kept = st.kept.as_ref().filter(|k| *k.row == *row).map(|k| (k.at, k.seen));
            match (st.gone, st.loaded, kept) {
                (false, None, Some((at, seen))) => {
                    // Current when the row was: checked at its generation, confirmed when it was seen.
                    st.loaded = Some(fresh);
                    st.version = row.version;
                    st.checked = Some(at);
                    st.confirmed = Some(seen);
                    key.publish(&st);
                    let ago = seen.elapsed();
                    self.graced(key, &mut st, ago);
                    (Some(fresh), None)
                }
                // Another thread loaded a copy meanwhile, or the key changed or went: not this copy.
                (false, Some(h), _) => (Some(h), Some(fresh)),
                _ => (None, Some(fresh)),
            }
        };
        if let Some(stale) = stale {
            self.destroy_own(key.slot, stale);
        }
        if use_ == Some(fresh) {
            self.admit(key);
        }
        use_
    }

    /// Logs, once per outage, that a key's copy is used under the grace.
    fn graced(&self, key: &StoredKey, st: &mut KeyState, ago: std::time::Duration) {
        if !std::mem::replace(&mut st.graced, true) {
            crate::info!(
                "stored key {}: the key store cannot be reached; its copy, known current {} ago, is used for up \
                 to outage_grace = {}",
                key.id,
                humantime::format_duration(std::time::Duration::from_millis(ago.as_millis() as u64)),
                humantime::format_duration(self.options.outage_grace)
            );
        }
    }

    /// A key whose copy was just loaded joins the cache; while the cache holds more than `cache` keys, the
    /// hand walks it: a key in use or pinned by an operation stays, one used since the hand last passed
    /// stays once more, and the first other is evicted (its copy destroyed; its next use loads it again).
    /// When every key is in use or pinned, the cache stays over its size until some are not.
    fn admit(&self, key: &Arc<StoredKey>) {
        let victims = {
            let mut clock = lock(&self.loaded);
            // Once per key: a key loaded again (after a logout, or a change elsewhere) may still be listed.
            if !clock.keys.iter().any(|k| Arc::ptr_eq(k, key)) {
                clock.keys.push(key.clone());
            }
            if clock.keys.len() > self.cache {
                // Keys whose copy went another way (a logout, a destroy, a change elsewhere) leave first: the
                // cache counts copies.
                clock.keys.retain(|k| lock(&k.state).loaded.is_some());
            }
            let mut victims = Vec::new();
            let mut steps = 2 * clock.keys.len() + 1;
            while clock.keys.len() > self.cache && steps > 0 {
                steps -= 1;
                if clock.hand >= clock.keys.len() {
                    clock.hand = 0;
                }
                let at = clock.hand;
                let candidate = clock.keys[at].clone();
                if Arc::ptr_eq(&candidate, key) {
                    clock.hand += 1;
                    continue;
                }
                match candidate.try_unload() {
                    Unload::Busy | Unload::Recent => clock.hand += 1,
                    Unload::Stale => {
                        clock.keys.swap_remove(at);
                    }
                    Unload::Unloaded(h) => {
                        clock.keys.swap_remove(at);
                        victims.push((candidate.slot, h));
                    }
                }
            }
            if clock.keys.len() > self.cache {
                crate::debug!(
                    "{} stored keys are loaded in the HSM, over hsm_cache = {}: the others are in use or in an operation",
                    clock.keys.len(),
                    self.cache
                );
            }
            victims
        };
        for (slot, h) in victims {
            self.destroy_own(slot, h);
        }
    }

    /// Records that `session`'s latest operation of `kind` was started with `key`.
    fn pin(&self, session: CK_SESSION_HANDLE, kind: u8, key: &Arc<StoredKey>) {
        let code = if session < (1 << 59) { session << 4 | CK_ULONG::from(kind) } else { 0 };
        if code != 0 && key.last_pin.load(Ordering::Relaxed) == code {
            return;
        }
        let mut pins = lock(&self.pins);
        match pins.insert((session, kind), key.clone()) {
            Some(previous) if Arc::ptr_eq(&previous, key) => {}
            Some(previous) => {
                previous.pins.fetch_sub(1, Ordering::SeqCst);
                previous.last_pin.store(0, Ordering::Relaxed);
                key.pins.fetch_add(1, Ordering::SeqCst);
            }
            None => {
                key.pins.fetch_add(1, Ordering::SeqCst);
            }
        }
        key.last_pin.store(code, Ordering::Relaxed);
    }

    /// A session ends (C_CloseSession, C_CloseAllSessions): its operations with it, and its pins.
    pub fn session_closed(&self, session: CK_SESSION_HANDLE) {
        lock(&self.pins).retain(|(s, _), key| {
            if *s != session {
                return true;
            }
            key.pins.fetch_sub(1, Ordering::SeqCst);
            key.last_pin.store(0, Ordering::Relaxed);
            false
        });
    }

    /// The key's row as current at `generation` (read before), and whether its MAC is known good: the
    /// row this process holds if the store says nothing concerning it changed since, else the row read
    /// from the store. None when the row is gone (the key is then marked gone here).
    fn current_row(
        &self,
        store: &dyn KeyStore,
        key: &StoredKey,
        generation: u64,
    ) -> Result<Option<(Arc<KeyRow>, bool)>> {
        let held = {
            let st = lock(&key.state);
            st.kept.as_ref().map(|k| (k.row.clone(), k.at, k.verified))
        };
        if let Some((row, at, verified)) = &held {
            if store.unchanged_since(&key.id, row.version, *at, generation) {
                return Ok(Some((row.clone(), *verified)));
            }
        }
        crate::debug!("stored key {}: reading its row from the key store", key.id);
        let Some(read) = self.logged("reading a stored key", store.get(&key.id))? else {
            crate::info!("stored key {} was destroyed (by this or another process); its handle is now invalid", key.id);
            self.forget_copy(key, true);
            return Ok(None);
        };
        // The same bytes as a row whose MAC was checked need no second check.
        let verified = held.is_some_and(|(row, _, verified)| verified && *row == read);
        let read = Arc::new(read);
        self.keep(key, read.clone(), generation, verified);
        Ok(Some((read, verified)))
    }

    /// Remembers `row` as the key's row, current at generation `at` (read before it was read or written).
    fn keep(&self, key: &StoredKey, row: Arc<KeyRow>, at: u64, verified: bool) {
        let mut st = lock(&key.state);
        if st.gone {
            return;
        }
        if let Some(k) = st.kept.as_mut().filter(|k| *k.row == *row) {
            k.at = at;
            k.verified |= verified;
            k.seen = std::time::Instant::now();
            return;
        }
        st.kept = None;
        st.kept = Kept::new(row, at, verified);
    }

    /// Drops this process's HSM copy of a key (and marks the key gone when its row is, dropping its row).
    fn forget_copy(&self, key: &StoredKey, gone: bool) {
        if let Some(h) = key.take_copy(gone) {
            self.destroy_own(key.slot, h);
        }
    }

    /// Destroys an object of the shim's own (in one of its sessions) and gives up its handle.
    fn destroy_own(&self, slot: CK_SLOT_ID, handle: CK_OBJECT_HANDLE) {
        let _ = self.with_session(slot, |s| self.backend.destroy_object(s, handle));
        objects::disown(handle);
    }

    /// Checks a row's MAC (unless `verified`) and recreates its object in the HSM, exactly as the application
    /// made it, as a session object of the shim's own.
    fn load(&self, slot: CK_SLOT_ID, row: &KeyRow, verified: bool) -> Result<CK_OBJECT_HANDLE> {
        let set = self.mbk(slot, &row.token)?;
        let attrs = if verified { self.decode(&set, row)? } else { self.check(slot, &set, row)? };
        let Some(recipe) = Recipe::exact(&set, &attrs, row.class, false).map(|r| r.unnamed(row.class)) else {
            return Err(self.refuse(
                row,
                "its attributes describe a key whose value could be read or wrapped under any key, which no stored key may be (the row was forged, or made by an earlier version)",
            ));
        };
        let mech = unwrap_mechanism(&set, row.wrap_mech);
        let made = self.with_session(slot, |s| {
            let h = recipe.make(self.backend, s, mech, &row.wrapped)?;
            if recipe.device {
                if let Err(why) = self.blob_agrees(s, h, &attrs) {
                    let _ = self.backend.destroy_object(s, h);
                    return Err(self.refuse(row, &why));
                }
            }
            Ok(h)
        });
        match made {
            Ok(h) => {
                objects::own(h);
                Ok(h)
            }
            Err(e) => {
                crate::warn!("loading stored key {} into the HSM failed: {e}", row.id);
                Err(e)
            }
        }
    }

    /// Verifies a row's MAC in the HSM and that it was wrapped under this token's MBK; returns its
    /// attributes. A row changed outside p11shim is refused with one clear log line and CKR_GENERAL_ERROR.
    fn check(&self, slot: CK_SLOT_ID, set: &MbkSet, row: &KeyRow) -> Result<Template> {
        if !(VaultSealer { vault: self, slot, set }.check(&mac_input(row), &row.mac)?) {
            return Err(self.refuse(row, "its MAC does not match: the row was changed outside p11shim"));
        }
        self.decode(set, row)
    }

    /// A row's attributes, once its MAC is known good; refused if another MBK wrapped it.
    fn decode(&self, set: &MbkSet, row: &KeyRow) -> Result<Template> {
        if row.mbk != set.fingerprint {
            return Err(self.refuse(
                row,
                &format!("it was wrapped under MBK {}, but this token's MBK is {}", row.mbk, set.fingerprint),
            ));
        }
        Template::decode(&row.attrs).ok_or_else(|| self.refuse(row, "its attributes cannot be decoded"))
    }

    /// A device blob carries the key's attributes, which the device enforces; the row carries what the
    /// application reads. They must agree on everything that decides what the key may do (its class, type,
    /// usage, sensitivity, extractability, re-authentication, allowed mechanisms): else what the shim
    /// reports would not be true of the key in the HSM (a row forged by a holder of the user PIN who can
    /// write the store, or a blob put under another row).
    fn blob_agrees(
        &self,
        session: CK_SESSION_HANDLE,
        copy: CK_OBJECT_HANDLE,
        row: &Template,
    ) -> std::result::Result<(), String> {
        const DECIDING: [CK_ATTRIBUTE_TYPE; 17] = [
            CKA_CLASS,
            CKA_KEY_TYPE,
            CKA_ENCRYPT,
            CKA_DECRYPT,
            CKA_SIGN,
            CKA_VERIFY,
            CKA_SIGN_RECOVER,
            CKA_VERIFY_RECOVER,
            CKA_WRAP,
            CKA_UNWRAP,
            CKA_DERIVE,
            CKA_SENSITIVE,
            CKA_EXTRACTABLE,
            CKA_WRAP_WITH_TRUSTED,
            CKA_ALWAYS_AUTHENTICATE,
            CKA_TRUSTED,
            CKA_ALLOWED_MECHANISMS,
        ];
        let present: Vec<CK_ATTRIBUTE_TYPE> = DECIDING.into_iter().filter(|ty| row.get(*ty).is_some()).collect();
        let blob = self
            .backend
            .attributes(session, copy, &present)
            .map_err(|e| format!("its blob's attributes cannot be read ({e})"))?;
        match present.into_iter().find(|ty| blob.get(*ty) != row.get(*ty)) {
            None => Ok(()),
            Some(ty) => Err(format!(
                "its row and its device blob disagree on {} (the row was changed outside p11shim, or holds another key's blob)",
                crate::error::attr_name(ty)
            )),
        }
    }

    /// A stored key refused: one clear log line naming it, its store and why.
    fn refuse(&self, row: &KeyRow, why: &str) -> Error {
        let message = format!(
            "stored key {} (label {:?}, group {:?}) in {}: {why}; the key is refused",
            row.id,
            String::from_utf8_lossy(&row.label),
            row.group,
            self.store.get().map(|s| s.describe()).unwrap_or_default()
        );
        crate::error!("{message}");
        Error::Other(message)
    }

    /// Computes a row's MAC in the HSM.
    /// A session's move of a stored key (`key`, for messages) from group `from` to group `to`: a change of its
    /// CKA_P11SHIM_GROUP, or a copy into another group. The session's p11shim logons (P11SHIM_Logon) need
    /// 00000002 for both groups, as a backup from one and a restore into the other would: else
    /// CKR_ACTION_PROHIBITED, audited. The logged-on users' names on success.
    pub(crate) fn authorize_move(
        &self,
        session: CK_SESSION_HANDLE,
        slot: CK_SLOT_ID,
        token: &str,
        key: &str,
        from: &str,
        to: &str,
    ) -> Result<String> {
        let need = |g: &str| crate::auth::session::require(session, crate::auth::Need::Group(g.to_string()));
        match need(from).and_then(|_| need(to)) {
            Ok(who) => Ok(who),
            Err((why, who)) => {
                let reason = format!(
                    "moving {key} from group {from:?} to {to:?} denied: {why} (log p11shim users on to the session with P11SHIM_Logon)"
                );
                crate::warn!("{reason}");
                let _ = self.trail(slot, token, |t| t.record_refusal(&who, "key group change", from, &reason));
                Err(Error::Rv(CKR_ACTION_PROHIBITED))
            }
        }
    }

    /// Records a move [`Vault::authorize_move`] allowed, once it is done (or failed).
    pub(crate) fn record_move(&self, slot: CK_SLOT_ID, token: &str, who: &str, moved: (&str, &str, &str), ok: bool) {
        let (key, from, to) = moved;
        let result =
            if ok { format!("ok: {key} moved to {to:?}") } else { format!("failed: {key} not moved to {to:?}") };
        match self.trail(slot, token, |t| t.record(who, "key group change", from, 1, &result)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => crate::error!("{key} moved from group {from:?} to {to:?}, but not audited: {e}"),
            Err(e) => crate::error!("{key} moved from group {from:?} to {to:?}, but not audited: {e}"),
        }
    }

    /// The audit trail of this slot: the store, sealed with the slot's MBK set's MAC key.
    pub(crate) fn trail<R>(
        &self,
        slot: CK_SLOT_ID,
        token: &str,
        f: impl FnOnce(&crate::audit::Trail) -> R,
    ) -> Result<R> {
        let set = self.mbk(slot, token)?;
        let sealer = VaultSealer { vault: self, slot, set: &set };
        Ok(f(&self.audit_trail(Some(&sealer))?))
    }

    /// The store's audit trail, sealed by `sealer` (None: unsealed entries).
    pub(crate) fn audit_trail<'a>(
        &'a self,
        sealer: Option<&'a dyn crate::backup::format::Sealer>,
    ) -> Result<crate::audit::Trail<'a>> {
        Ok(crate::audit::Trail {
            store: self.store()?,
            sealer,
            also: Vec::new(),
            head: self.audit_head.clone(),
            mode: self.mode,
        })
    }

    fn seal(&self, slot: CK_SLOT_ID, set: &MbkSet, row: &mut KeyRow) -> Result<()> {
        row.mac = VaultSealer { vault: self, slot, set }.seal(&mac_input(row))?;
        Ok(())
    }

    /// C_Logout on a slot: private session objects vanish with the login, so the copies are dropped first
    /// and loaded again after the next login. Handles stay valid.
    pub fn logout(&self, slot: CK_SLOT_ID) {
        for key in objects::stored_keys() {
            if key.slot == slot {
                self.forget_copy(&key, false);
            }
        }
    }

    /// Whether the application's session is logged in as the user (private objects are visible then).
    fn user_logged_in(&self, session: CK_SESSION_HANDLE) -> Result<bool> {
        let info = self.backend.session_info(session)?;
        Ok(matches!(info.state, CKS_RO_USER_FUNCTIONS | CKS_RW_USER_FUNCTIONS))
    }

    /// The application's session on a database slot, checked: its slot config.
    pub fn database_slot(&self, session: CK_SESSION_HANDLE) -> Option<(CK_SLOT_ID, SlotConfig)> {
        let slot = sessions::slot_of(session)?;
        self.policy(slot).map(|p| (slot, p.clone()))
    }
}

/// MACs with a slot's MBK set made on the vault's own sessions.
struct VaultSealer<'a> {
    vault: &'a Vault,
    slot: CK_SLOT_ID,
    set: &'a MbkSet,
}

impl VaultSealer<'_> {
    /// The MBK set's sealer on a pooled session of the slot.
    fn on<R>(&self, f: impl Fn(&mbk::HsmSealer) -> Result<R>) -> Result<R> {
        let v = self.vault;
        v.with_session(self.slot, |session| f(&mbk::HsmSealer { backend: v.backend, session, set: self.set }))
    }
}

impl crate::backup::format::Sealer for VaultSealer<'_> {
    fn key_name(&self) -> String {
        self.set.fingerprint.clone()
    }
    fn seal(&self, data: &[u8]) -> Result<Vec<u8>> {
        self.on(|sealer| sealer.seal(data))
    }
    fn check(&self, data: &[u8], mac: &[u8]) -> Result<bool> {
        self.on(|sealer| sealer.check(data, mac))
    }
}

/// The bytes a row's MAC covers: every field but the MAC and the version counter, each length-prefixed.
pub fn mac_input(row: &KeyRow) -> Vec<u8> {
    let mut out = b"p11shim key row v1\0".to_vec();
    let mut field = |b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    };
    field(row.id.as_bytes());
    field(row.token.as_bytes());
    field(row.group.as_bytes());
    field(&row.class.to_be_bytes());
    field(&row.key_type.to_be_bytes());
    field(&row.label);
    field(&row.ckid);
    field(&row.attrs);
    field(&row.wrapped);
    field(&row.wrap_mech.to_be_bytes());
    field(row.mbk.as_bytes());
    out
}

/// A fresh row id: 128 random bits as hex.
fn new_id() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| Error::Other(format!("no randomness for a key id: {e}")))?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::RateLimit;

    #[test]
    fn failures_are_logged_once_a_second_with_a_count_of_the_others() {
        let limit = RateLimit::default();
        assert_eq!(limit.due(), Some(0), "the first is logged");
        assert_eq!(limit.due(), None);
        assert_eq!(limit.due(), None);
        std::thread::sleep(std::time::Duration::from_millis(1010));
        assert_eq!(limit.due(), Some(2), "the next line says how many were not");
    }
}
