//! The object handle space. Backend handles pass through unchanged; handles with the top bit set belong to
//! the shim (stored keys are there). A backend that itself hands out a handle with the top bit set
//! gets an alias in the shim's range, so the two spaces never collide whatever values the backend uses.
//! The lookup costs one branch for ordinary handles: no lock, no allocation.
//!
//! Backend objects that are the shim's own (the MBK set, the HSM copies of stored keys, objects it makes
//! while creating a stored key) are *owned*: an application naming one gets the invalid-handle CK_RV of the
//! argument, as if it did not exist. While the shim owns nothing (every process without database slots)
//! that check is one atomic load.

use cryptoki_sys::{CK_OBJECT_HANDLE, CK_RV, CK_ULONG};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Handles with this bit set are the shim's.
pub const SHIM_HANDLE_BIT: CK_OBJECT_HANDLE = 1 << (CK_ULONG::BITS - 1);

/// What a shim handle stands for.
#[derive(Debug, Clone)]
pub enum ShimObject {
    /// A backend object whose own handle has the top bit set.
    Alias(CK_OBJECT_HANDLE),
    /// A key kept in the key store; loaded into the HSM on first use.
    Stored(Arc<crate::vault::StoredKey>),
}

#[derive(Default)]
struct Table {
    objects: HashMap<CK_OBJECT_HANDLE, ShimObject>,
    alias_of: HashMap<CK_OBJECT_HANDLE, CK_OBJECT_HANDLE>,
}

static TABLE: RwLock<Option<Table>> = RwLock::new(None);
/// Shim handles count up from a distinctive base ("SH" below the top bit), far from the small numbers
/// backends usually hand out, so that a shim handle is recognisable in a log.
static NEXT: AtomicU64 = AtomicU64::new(0x0053_4800_0000_0001);

#[inline]
pub fn is_shim_handle(handle: CK_OBJECT_HANDLE) -> bool {
    handle & SHIM_HANDLE_BIT != 0
}

/// The backend handle for an application's handle; `invalid` is the CK_RV for an unknown shim handle
/// (CKR_KEY_HANDLE_INVALID, CKR_OBJECT_HANDLE_INVALID, … depending on the argument).
#[inline]
pub fn to_backend(handle: CK_OBJECT_HANDLE, invalid: CK_RV) -> Result<CK_OBJECT_HANDLE, CK_RV> {
    if !is_shim_handle(handle) {
        if OWNED_ANY.load(Ordering::Acquire) && is_owned(handle) {
            return Err(invalid);
        }
        return Ok(handle);
    }
    resolve(handle, invalid)
}

/// Whether the shim owns any backend object (see the module comment): one atomic load, false in every process
/// without database slots.
static OWNED_ANY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The owned objects. Readers (every key-taking call with a backend handle, in a process with database
/// slots) must not take a lock: they look at `FILTER`, a bit per hash bucket set while any owned handle falls
/// in it, with atomic loads only; a handle whose bit is clear is not owned. Only a set bit (an owned handle,
/// or another in its bucket) leads to the exact set, under its lock. Writers (a key loaded, destroyed or made)
/// keep a count per bucket, so a bit is cleared only when its last owned handle goes.
struct Owned {
    set: std::collections::HashSet<CK_OBJECT_HANDLE>,
    buckets: Vec<u32>,
}

const FILTER_BITS: usize = 16384;
static FILTER: [AtomicU64; FILTER_BITS / 64] = [const { AtomicU64::new(0) }; FILTER_BITS / 64];
static OWNED: std::sync::Mutex<Option<Owned>> = std::sync::Mutex::new(None);

/// A handle's filter bucket (Fibonacci hashing: backends hand out small consecutive numbers).
#[inline]
fn bucket(handle: CK_OBJECT_HANDLE) -> usize {
    (handle.wrapping_mul(0x9e37_79b9_7f4a_7c15_u64 as CK_ULONG) >> (CK_ULONG::BITS - FILTER_BITS.trailing_zeros()))
        as usize
}

fn owned() -> std::sync::MutexGuard<'static, Option<Owned>> {
    OWNED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Marks a backend object as the shim's own: from now on the application cannot name it.
pub fn own(backend: CK_OBJECT_HANDLE) {
    let mut guard = owned();
    let owned = guard.get_or_insert_with(|| Owned { set: Default::default(), buckets: vec![0; FILTER_BITS] });
    if owned.set.insert(backend) {
        let b = bucket(backend);
        owned.buckets[b] += 1;
        // Before the call returns, so that no later call can miss it.
        FILTER[b / 64].fetch_or(1 << (b % 64), Ordering::Release);
        OWNED_ANY.store(true, Ordering::Release);
    }
}

/// Gives up a backend object the shim destroyed (its handle may be the backend's to reuse).
pub fn disown(backend: CK_OBJECT_HANDLE) {
    let mut guard = owned();
    let Some(owned) = guard.as_mut() else { return };
    if owned.set.remove(&backend) {
        let b = bucket(backend);
        owned.buckets[b] -= 1;
        if owned.buckets[b] == 0 {
            FILTER[b / 64].fetch_and(!(1 << (b % 64)), Ordering::Release);
        }
        OWNED_ANY.store(!owned.set.is_empty(), Ordering::Release);
    }
}

/// Whether a backend object is the shim's own.
#[inline]
pub fn is_owned(backend: CK_OBJECT_HANDLE) -> bool {
    let b = bucket(backend);
    if FILTER[b / 64].load(Ordering::Acquire) & (1 << (b % 64)) == 0 {
        return false;
    }
    owned().as_ref().is_some_and(|o| o.set.contains(&backend))
}

#[cold]
fn resolve(handle: CK_OBJECT_HANDLE, invalid: CK_RV) -> Result<CK_OBJECT_HANDLE, CK_RV> {
    let (backend, _in_flight) = hold_shim(handle, invalid)?;
    Ok(backend)
}

/// A stored key whose HSM copy a call is using: the copy is not evicted from the HSM until this is dropped,
/// after the backend call that uses it returned.
pub struct InFlight(Arc<crate::vault::StoredKey>);

impl InFlight {
    pub fn key(&self) -> &Arc<crate::vault::StoredKey> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end_use();
    }
}

/// As [`to_backend`], for a call that gives the handle to the backend: a stored key's HSM copy stays loaded
/// until the returned guard is dropped (keep it alive across the backend call).
#[inline]
pub fn hold(handle: CK_OBJECT_HANDLE, invalid: CK_RV) -> Result<(CK_OBJECT_HANDLE, Option<InFlight>), CK_RV> {
    if !is_shim_handle(handle) {
        if OWNED_ANY.load(Ordering::Acquire) && is_owned(handle) {
            return Err(invalid);
        }
        return Ok((handle, None));
    }
    hold_shim(handle, invalid)
}

#[cold]
fn hold_shim(handle: CK_OBJECT_HANDLE, invalid: CK_RV) -> Result<(CK_OBJECT_HANDLE, Option<InFlight>), CK_RV> {
    match lookup(handle).ok_or(invalid)? {
        ShimObject::Alias(backend) => Ok((backend, None)),
        // Outside the table's lock: loading may call the store and the backend.
        ShimObject::Stored(key) => {
            key.begin_use();
            let held = InFlight(key);
            let backend = crate::vault::resolve(held.key(), invalid)?;
            Ok((backend, Some(held)))
        }
    }
}

/// What a shim handle stands for, if it is one the shim gave out.
pub fn lookup(handle: CK_OBJECT_HANDLE) -> Option<ShimObject> {
    let table = TABLE.read().unwrap_or_else(|e| e.into_inner());
    table.as_ref()?.objects.get(&handle).cloned()
}

/// The stored key a handle stands for, if it is one.
pub fn stored_key(handle: CK_OBJECT_HANDLE) -> Option<Arc<crate::vault::StoredKey>> {
    if !is_shim_handle(handle) {
        return None;
    }
    match lookup(handle)? {
        ShimObject::Stored(key) => Some(key),
        ShimObject::Alias(_) => None,
    }
}

/// Every stored key this process has a handle for.
pub fn stored_keys() -> Vec<Arc<crate::vault::StoredKey>> {
    let table = TABLE.read().unwrap_or_else(|e| e.into_inner());
    let Some(table) = table.as_ref() else { return Vec::new() };
    table
        .objects
        .values()
        .filter_map(|o| match o {
            ShimObject::Stored(k) => Some(k.clone()),
            ShimObject::Alias(_) => None,
        })
        .collect()
}

/// The handle the application sees for a handle the backend returned.
#[inline]
pub fn from_backend(handle: CK_OBJECT_HANDLE) -> CK_OBJECT_HANDLE {
    if !is_shim_handle(handle) {
        return handle;
    }
    alias(handle)
}

#[cold]
fn alias(backend: CK_OBJECT_HANDLE) -> CK_OBJECT_HANDLE {
    let mut guard = TABLE.write().unwrap_or_else(|e| e.into_inner());
    let table = guard.get_or_insert_with(Table::default);
    if let Some(shim) = table.alias_of.get(&backend) {
        return *shim;
    }
    let shim = allocate_in(table, ShimObject::Alias(backend));
    table.alias_of.insert(backend, shim);
    shim
}

/// Gives `object` a new handle in the shim's range.
pub fn allocate(object: ShimObject) -> CK_OBJECT_HANDLE {
    let mut guard = TABLE.write().unwrap_or_else(|e| e.into_inner());
    allocate_in(guard.get_or_insert_with(Table::default), object)
}

/// Never hands out a value the backend itself uses in the shim's range (the handle being aliased, or one
/// aliased before): handles are interpreted through the table, so equal values would be harmless, but
/// distinct ones keep logs and debugging unambiguous.
fn allocate_in(table: &mut Table, object: ShimObject) -> CK_OBJECT_HANDLE {
    let stands_for = match &object {
        ShimObject::Alias(backend) => Some(*backend),
        ShimObject::Stored(_) => None,
    };
    let handle = loop {
        let candidate = SHIM_HANDLE_BIT | (NEXT.fetch_add(1, Ordering::Relaxed) as CK_OBJECT_HANDLE & !SHIM_HANDLE_BIT);
        if Some(candidate) != stands_for && !table.alias_of.contains_key(&candidate) {
            break candidate;
        }
    };
    table.objects.insert(handle, object);
    handle
}

/// Forgets a handle whose object was destroyed.
pub fn forget(handle: CK_OBJECT_HANDLE) {
    if !is_shim_handle(handle) {
        return;
    }
    let mut guard = TABLE.write().unwrap_or_else(|e| e.into_inner());
    if let Some(table) = guard.as_mut() {
        if let Some(ShimObject::Alias(backend)) = table.objects.remove(&handle) {
            table.alias_of.remove(&backend);
        }
    }
}

/// The handle table and the owned objects, held across a fork (see crate::forks), in that order.
pub(crate) fn fork_guard() -> Box<dyn std::any::Any> {
    let table = TABLE.write().unwrap_or_else(|e| e.into_inner());
    Box::new((table, owned()))
}

/// The backend objects the shim owns (a forked child whose backend kept its parent's state owns them too).
pub fn owned_handles() -> Vec<CK_OBJECT_HANDLE> {
    owned().as_ref().map(|o| o.set.iter().copied().collect()).unwrap_or_default()
}

/// Drops every shim handle and every owned object (C_Finalize, or C_Initialize in a forked child).
pub fn clear() {
    *TABLE.write().unwrap_or_else(|e| e.into_inner()) = None;
    *owned() = None;
    for word in &FILTER {
        word.store(0, Ordering::Release);
    }
    OWNED_ANY.store(false, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki_sys::{CKR_KEY_HANDLE_INVALID, CKR_OBJECT_HANDLE_INVALID};

    #[test]
    fn ordinary_handles_pass_unchanged() {
        assert_eq!(from_backend(42), 42);
        assert_eq!(to_backend(42, CKR_KEY_HANDLE_INVALID), Ok(42));
    }

    #[test]
    fn backend_handles_in_the_shim_range_get_a_stable_alias() {
        let backend = SHIM_HANDLE_BIT | 5;
        let a = from_backend(backend);
        assert!(is_shim_handle(a));
        assert_ne!(a, backend, "the alias must not be the backend's own value");
        assert_eq!(from_backend(backend), a, "same backend object, same alias");
        assert_eq!(to_backend(a, CKR_KEY_HANDLE_INVALID), Ok(backend));
        forget(a);
        assert_eq!(to_backend(a, CKR_OBJECT_HANDLE_INVALID), Err(CKR_OBJECT_HANDLE_INVALID));
    }

    #[test]
    fn the_filter_never_forgets_an_owned_handle() {
        // Handles that share buckets: giving up one keeps the others owned.
        let base = 0x5511_0000;
        let same: Vec<CK_OBJECT_HANDLE> =
            (base..base + 200_000).filter(|h| bucket(*h) == bucket(base)).take(3).collect();
        assert_eq!(same.len(), 3);
        for h in &same {
            own(*h);
        }
        disown(same[0]);
        assert!(!is_owned(same[0]));
        assert!(is_owned(same[1]) && is_owned(same[2]), "the bucket's other handles stay owned");
        disown(same[1]);
        disown(same[2]);
        assert!(same.iter().all(|h| !is_owned(*h)));
    }

    #[test]
    fn owned_backend_objects_are_invalid_to_the_application() {
        let h = 0x7777_0001;
        assert_eq!(to_backend(h, CKR_KEY_HANDLE_INVALID), Ok(h));
        own(h);
        assert_eq!(to_backend(h, CKR_KEY_HANDLE_INVALID), Err(CKR_KEY_HANDLE_INVALID));
        assert_eq!(to_backend(h, CKR_OBJECT_HANDLE_INVALID), Err(CKR_OBJECT_HANDLE_INVALID));
        assert_eq!(to_backend(h + 1, CKR_KEY_HANDLE_INVALID), Ok(h + 1), "only that object");
        disown(h);
        assert_eq!(to_backend(h, CKR_KEY_HANDLE_INVALID), Ok(h));
    }

    #[test]
    fn unknown_shim_handle_is_invalid() {
        assert_eq!(to_backend(SHIM_HANDLE_BIT | 0xdead_beef_0000, CKR_KEY_HANDLE_INVALID), Err(CKR_KEY_HANDLE_INVALID));
    }
}
