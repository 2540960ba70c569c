//! C_InitToken (PKCS#11 2.40 §5.5), written by hand for database slots: initializing a token destroys its
//! objects, stored keys included, and a database slot needs a new MBK set (see vault::init).

use super::{args, guard, lifecycle::active};
use crate::admin::Pin;
use cryptoki_sys::*;
use zeroize::Zeroizing;

/// C_InitToken (§5.5).
pub(crate) unsafe extern "C" fn C_InitToken(
    slot: CK_SLOT_ID,
    pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
    label: *mut CK_UTF8CHAR,
) -> CK_RV {
    guard("C_InitToken", || {
        let backend = active()?;
        let f = backend.f.C_InitToken.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
        let vault = match crate::vault::current() {
            Some(v) if !label.is_null() => v,
            // SAFETY: the application's arguments, unchanged.
            _ => return Ok(unsafe { f(slot, pin, pin_len, label) }),
        };
        // SAFETY: the label is 32 bytes (the spec's CK_UTF8CHAR[32]).
        let name = crate::hsm::padded_text(unsafe { args::bytes(label, 32) }?);
        let Some(plan) = vault.init_plan(slot, &name)? else {
            // SAFETY: the application's arguments, unchanged.
            return Ok(unsafe { f(slot, pin, pin_len, label) });
        };
        // SAFETY: the application's PIN, `pin_len` bytes (NULL with a protected authentication path).
        let so_pin = Pin(Zeroizing::new(unsafe { args::bytes(pin, pin_len) }?.to_vec()));
        vault.release_slot(slot);
        // SAFETY: the application's arguments, unchanged.
        let rv = unsafe { f(slot, pin, pin_len, label) };
        if rv != CKR_OK {
            return Ok(rv);
        }
        vault.initialized(&plan, &so_pin).map_err(|_| CKR_FUNCTION_FAILED)?;
        Ok(CKR_OK)
    })
}
