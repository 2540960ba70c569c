//! The session and object calls the shim writes by hand (PKCS#11 2.40 §5.6, §5.7): it records which
//! sessions are the application's, so that C_CloseAllSessions spares the shim's own, and it translates
//! object handles that came out of the backend in the shim's range (see `objects`).

use super::{args, guard, lifecycle::active};
use crate::{objects, sessions};
use cryptoki_sys::*;
use std::ffi::c_void;

/// C_OpenSession (§5.6).
pub(crate) unsafe extern "C" fn C_OpenSession(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    application: *mut c_void,
    notify: CK_NOTIFY,
    ph_session: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    guard("C_OpenSession", || {
        let backend = active()?;
        let f = backend.f.C_OpenSession.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
        // SAFETY: the application's arguments go to the backend unchanged.
        let rv = unsafe { f(slot, flags, application, notify, ph_session) };
        if rv == CKR_OK && !ph_session.is_null() {
            // SAFETY: the backend just wrote the handle there.
            sessions::opened_by_app(unsafe { *ph_session }, slot);
        }
        Ok(rv)
    })
}

/// C_CloseSession (§5.6).
pub(crate) unsafe extern "C" fn C_CloseSession(session: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_CloseSession", || {
        let backend = active()?;
        if sessions::is_internal(session) {
            // Not the application's to close, whatever value it guessed.
            return Err(CKR_SESSION_HANDLE_INVALID);
        }
        // Forget it before the backend may hand the same handle to another thread's C_OpenSession.
        let slot = sessions::closed_by_app(session);
        let rv = backend.close_session(session);
        if let (Some(slot), false) =
            (slot, matches!(rv, CKR_OK | CKR_SESSION_HANDLE_INVALID | CKR_SESSION_CLOSED | CKR_DEVICE_REMOVED))
        {
            sessions::opened_by_app(session, slot);
        }
        Ok(rv)
    })
}

/// C_CloseAllSessions (§5.6): closes the application's sessions on the slot, never the shim's own.
pub(crate) unsafe extern "C" fn C_CloseAllSessions(slot: CK_SLOT_ID) -> CK_RV {
    guard("C_CloseAllSessions", || {
        let backend = active()?;
        let mine = sessions::take_app_sessions(slot);
        if !sessions::has_internal(slot) {
            return Ok(backend.close_all_sessions(slot));
        }
        for session in mine {
            let rv = backend.close_session(session);
            if rv != CKR_OK && rv != CKR_SESSION_HANDLE_INVALID {
                crate::warn!("C_CloseAllSessions: closing session {session} returned {}", crate::error::rv_name(rv));
            }
        }
        Ok(CKR_OK)
    })
}

/// C_DestroyObject (§5.7): also forgets the handle if it was the shim's.
pub(crate) unsafe extern "C" fn C_DestroyObject(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> CK_RV {
    guard("C_DestroyObject", || {
        let backend = active()?;
        let backend_object = objects::to_backend(object, CKR_OBJECT_HANDLE_INVALID)?;
        let f = backend.f.C_DestroyObject.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
        // SAFETY: no pointers.
        let rv = unsafe { f(session, backend_object) };
        if rv == CKR_OK {
            objects::forget(object);
        }
        Ok(rv)
    })
}

/// C_FindObjects (§5.7): handles in the shim's range are replaced by their aliases.
pub(crate) unsafe extern "C" fn C_FindObjects(
    session: CK_SESSION_HANDLE,
    ph_object: *mut CK_OBJECT_HANDLE,
    max_count: CK_ULONG,
    pul_count: *mut CK_ULONG,
) -> CK_RV {
    guard("C_FindObjects", || {
        let backend = active()?;
        let f = backend.f.C_FindObjects.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
        // SAFETY: the application's arguments go to the backend unchanged.
        let rv = unsafe { f(session, ph_object, max_count, pul_count) };
        if rv == CKR_OK && !pul_count.is_null() {
            // SAFETY: the backend wrote the count; it cannot exceed the room the application gave.
            let found = unsafe { *pul_count }.min(max_count);
            // SAFETY: the application's array holds `max_count` handles, `found` of them written.
            if let Some(handles) = unsafe { args::slice_mut(ph_object, found) } {
                for h in handles {
                    *h = objects::from_backend(*h);
                }
            }
        }
        Ok(rv)
    })
}
