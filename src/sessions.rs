//! Which backend sessions are the application's and which are the shim's own. The application's
//! C_CloseAllSessions must not close the shim's internal sessions (stored keys are kept loaded in them),
//! so when the shim holds sessions on a slot, C_CloseAllSessions closes the application's one by one.
//! Only C_OpenSession/C_CloseSession/C_CloseAllSessions touch this table; no other call pays for it.

use cryptoki_sys::{CK_SESSION_HANDLE, CK_SLOT_ID};
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
struct Table {
    app: HashMap<CK_SESSION_HANDLE, CK_SLOT_ID>,
    internal: HashMap<CK_SESSION_HANDLE, CK_SLOT_ID>,
}

static TABLE: Mutex<Option<Table>> = Mutex::new(None);

fn with<R>(f: impl FnOnce(&mut Table) -> R) -> R {
    let mut guard = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(Table::default))
}

pub fn opened_by_app(session: CK_SESSION_HANDLE, slot: CK_SLOT_ID) {
    with(|t| t.app.insert(session, slot));
}

/// Forgets an application session; returns its slot if it was known.
pub fn closed_by_app(session: CK_SESSION_HANDLE) -> Option<CK_SLOT_ID> {
    with(|t| t.app.remove(&session))
}

/// Takes the application's sessions on `slot` out of the table, to be closed.
pub fn take_app_sessions(slot: CK_SLOT_ID) -> Vec<CK_SESSION_HANDLE> {
    with(|t| {
        let mine: Vec<_> = t.app.iter().filter(|(_, s)| **s == slot).map(|(h, _)| *h).collect();
        for h in &mine {
            t.app.remove(h);
        }
        mine
    })
}

/// The slot of an application's session.
pub fn slot_of(session: CK_SESSION_HANDLE) -> Option<CK_SLOT_ID> {
    with(|t| t.app.get(&session).copied())
}

pub fn opened_internal(session: CK_SESSION_HANDLE, slot: CK_SLOT_ID) {
    with(|t| t.internal.insert(session, slot));
}

pub fn closed_internal(session: CK_SESSION_HANDLE) {
    with(|t| t.internal.remove(&session));
}

pub fn has_internal(slot: CK_SLOT_ID) -> bool {
    with(|t| t.internal.values().any(|s| *s == slot))
}

pub fn is_internal(session: CK_SESSION_HANDLE) -> bool {
    with(|t| t.internal.contains_key(&session))
}

/// The session table held across a fork (see crate::forks).
pub(crate) fn fork_guard() -> Box<dyn std::any::Any> {
    Box::new(TABLE.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The shim's own sessions and their slots.
pub fn internal_sessions() -> Vec<(CK_SESSION_HANDLE, CK_SLOT_ID)> {
    with(|t| t.internal.iter().map(|(h, s)| (*h, *s)).collect())
}

/// Forgets every session (C_Finalize, or C_Initialize in a forked child).
pub fn clear() {
    *TABLE.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_all_takes_only_the_apps_sessions_of_that_slot() {
        opened_by_app(1001, 1);
        opened_by_app(1002, 1);
        opened_by_app(1003, 2);
        opened_internal(1004, 1);
        let mut taken = take_app_sessions(1);
        taken.sort();
        assert_eq!(taken, vec![1001, 1002]);
        assert!(has_internal(1));
        assert!(is_internal(1004));
        assert_eq!(closed_by_app(1003), Some(2));
        assert_eq!(closed_by_app(1003), None);
        closed_internal(1004);
        assert!(!has_internal(1));
    }
}
