//! The session and object calls the shim writes by hand (PKCS#11 2.40 §5.6, §5.7): it records which
//! sessions are the application's, so that C_CloseAllSessions spares the shim's own, and it translates
//! object handles that came out of the backend in the shim's range (see `objects`).

use super::{guard, lifecycle::active};
use crate::sessions;
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
        crate::auth::session::closed(session);
        if let Some(vault) = crate::vault::current() {
            vault.find_final(session);
            vault.session_closed(session);
        }
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
        for &session in &mine {
            crate::auth::session::closed(session);
        }
        if let Some(vault) = crate::vault::current() {
            for &session in &mine {
                vault.find_final(session);
                vault.session_closed(session);
            }
        }
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
