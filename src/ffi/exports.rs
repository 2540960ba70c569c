//! The only exported symbols: C_GetFunctionList, C_GetInterfaceList, C_GetInterface (PKCS#11 3.0 §5.2).
//! Every other function is reached through the tables, so a host that loads modules with RTLD_GLOBAL
//! cannot interpose our C_Initialize onto the backend's.

use super::guard;
use super::table::{FUNCTION_LIST_2_40, FUNCTION_LIST_3_0};
use crate::backend;
use crate::config::Config;
use cryptoki_sys::*;
use std::ffi::{c_void, CStr};

/// A CK_INTERFACE in static memory (it holds pointers to other statics only).
#[repr(transparent)]
pub struct Interface(CK_INTERFACE);
// SAFETY: the pointers inside point at immutable statics.
unsafe impl Sync for Interface {}

const PKCS11: &CStr = c"PKCS 11";
const BACKUP: &CStr = c"P11SHIM Backup";

/// The vendor interface "P11SHIM Backup" (include/p11shim.h): returned by C_GetInterface when asked for by
/// name, never listed by C_GetInterfaceList (applications enumerating interfaces expect "PKCS 11" ones).
static BACKUP_INTERFACE: Interface = Interface(CK_INTERFACE {
    pInterfaceName: BACKUP.as_ptr() as *mut CK_UTF8CHAR,
    pFunctionList: &super::backup::BACKUP_FUNCTIONS as *const super::backup::BackupFunctionList as *mut c_void,
    flags: 0,
});

const fn interface(list: *const c_void) -> Interface {
    Interface(CK_INTERFACE {
        pInterfaceName: PKCS11.as_ptr() as *mut CK_UTF8CHAR,
        pFunctionList: list as *mut c_void,
        flags: 0,
    })
}

/// What the shim offers over a backend with a 3.x interface: 3.0 first (the default), then 2.40.
static WITH_3_0: [Interface; 2] = [
    interface(&FUNCTION_LIST_3_0 as *const CK_FUNCTION_LIST_3_0 as *const c_void),
    interface(&FUNCTION_LIST_2_40 as *const CK_FUNCTION_LIST as *const c_void),
];
/// What the shim offers over a 2.40-only backend (SoftHSM2 2.6).
static ONLY_2_40: [Interface; 1] = [interface(&FUNCTION_LIST_2_40 as *const CK_FUNCTION_LIST as *const c_void)];

/// The interfaces on offer. They depend on the backend, which applications ask about before C_Initialize, when
/// nothing may be loaded yet (loading runs the module's code, and only C_Initialize decides, with its checks,
/// what may be loaded). Until the backend is loaded, the module the configuration names is read, not loaded,
/// for a C_GetInterface of its own; when that cannot be told, 2.40 only.
fn offered() -> &'static [Interface] {
    let has_3x = match backend::loaded() {
        Some(b) => b.f3.is_some(),
        None => Config::from_env().ok().and_then(|c| backend::declares_get_interface(&c.module)).unwrap_or(false),
    };
    if has_3x {
        &WITH_3_0
    } else {
        &ONLY_2_40
    }
}

fn version_of(iface: &CK_INTERFACE) -> CK_VERSION {
    // SAFETY: every function list starts with its CK_VERSION, and ours are statics.
    unsafe { *(iface.pFunctionList as *const CK_VERSION) }
}

/// C_GetFunctionList (2.40 §5.4): the 2.40 table.
///
/// # Safety
/// `pp_function_list` is NULL or valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(pp_function_list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    guard("C_GetFunctionList", || {
        let list = &FUNCTION_LIST_2_40 as *const CK_FUNCTION_LIST as *mut CK_FUNCTION_LIST;
        // SAFETY: the application passes NULL or room for a pointer.
        unsafe { super::args::write_out(pp_function_list, list) }?;
        Ok(CKR_OK)
    })
}

/// C_GetInterfaceList (3.0 §5.4): NULL list → the count; a list too small → CKR_BUFFER_TOO_SMALL.
///
/// # Safety
/// `p_count` is NULL or valid; `p_list` is NULL or valid for `*p_count` entries.
#[no_mangle]
pub unsafe extern "C" fn C_GetInterfaceList(p_list: *mut CK_INTERFACE, p_count: *mut CK_ULONG) -> CK_RV {
    guard("C_GetInterfaceList", || {
        if p_count.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let offer = offered();
        // SAFETY: checked non-NULL; the application's count.
        let room = unsafe { *p_count };
        // SAFETY: as above.
        unsafe { *p_count = offer.len() as CK_ULONG };
        if p_list.is_null() {
            return Ok(CKR_OK);
        }
        if (room as usize) < offer.len() {
            return Ok(CKR_BUFFER_TOO_SMALL);
        }
        // SAFETY: the application's list has room for `room` >= offer.len() entries.
        let list = unsafe { super::args::slice_mut(p_list, offer.len() as CK_ULONG) }.ok_or(CKR_ARGUMENTS_BAD)?;
        for (slot, iface) in list.iter_mut().zip(offer) {
            *slot = iface.0;
        }
        Ok(CKR_OK)
    })
}

/// C_GetInterface (3.0 §5.4): a NULL name asks for the default; a NULL version for any; the interface's
/// flags must include `flags`. No match → CKR_ARGUMENTS_BAD. The CK_INTERFACE returned is the shim's own.
///
/// # Safety
/// `p_name` is NULL or NUL-terminated; `p_version` NULL or valid; `pp_interface` valid for a pointer.
#[no_mangle]
pub unsafe extern "C" fn C_GetInterface(
    p_name: *mut CK_UTF8CHAR,
    p_version: *mut CK_VERSION,
    pp_interface: *mut *mut CK_INTERFACE,
    flags: CK_FLAGS,
) -> CK_RV {
    guard("C_GetInterface", || {
        if pp_interface.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: the application passes NULL or a NUL-terminated name.
        let name = (!p_name.is_null()).then(|| unsafe { CStr::from_ptr(p_name as *const std::ffi::c_char) });
        // SAFETY: the application passes NULL or a valid CK_VERSION.
        let version = unsafe { p_version.as_ref() }.copied();
        if name == Some(BACKUP) {
            let v = version_of(&BACKUP_INTERFACE.0);
            if version.is_some_and(|w| w.major != v.major || w.minor != v.minor) || flags != 0 {
                return Err(CKR_ARGUMENTS_BAD);
            }
            // SAFETY: checked non-NULL above.
            unsafe { *pp_interface = &BACKUP_INTERFACE.0 as *const CK_INTERFACE as *mut CK_INTERFACE };
            return Ok(CKR_OK);
        }
        let found = offered().iter().find(|i| {
            let v = version_of(&i.0);
            // SAFETY: our interface names are static C strings.
            name.is_none_or(|n| n == unsafe { CStr::from_ptr(i.0.pInterfaceName as *const std::ffi::c_char) })
                && version.is_none_or(|w| w.major == v.major && w.minor == v.minor)
                && i.0.flags & flags == flags
        });
        let found = found.ok_or(CKR_ARGUMENTS_BAD)?;
        // SAFETY: checked non-NULL above.
        unsafe { *pp_interface = &found.0 as *const CK_INTERFACE as *mut CK_INTERFACE };
        Ok(CKR_OK)
    })
}
