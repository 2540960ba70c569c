//! The interfaces (PKCS#11 3.0 §5.4 C_GetInterfaceList, C_GetInterface): "PKCS 11" 2.40 (the module's function
//! list) and, when the device has an MBK facility, the vendor interface "CSSIM MBK" 1.0
//! (`include/cssim_mbk.h`): the device MBK's fingerprint, key backup and restore under it.

use super::args::{capacity, out, slice, slice_mut, template, write_bytes};
use super::{entry, guard, FUNCTION_LIST};
use crate::config::Config;
use crate::module;
use cryptoki_sys::*;
use std::ffi::{c_void, CStr};

/// A CK_INTERFACE in static memory (it points at other statics only).
#[repr(transparent)]
struct Interface(CK_INTERFACE);
// SAFETY: the pointers inside point at immutable statics (a C string and a function list).
unsafe impl Sync for Interface {}

const PKCS11: &CStr = c"PKCS 11";
/// The vendor interface's name (CSSIM_MBK_INTERFACE_NAME).
const MBK: &CStr = c"CSSIM MBK";

/// CSSIM_MBK_INFO.
#[repr(C)]
pub struct MbkInfo {
    pub loaded: CK_BBOOL,
    pub fingerprint: [CK_BYTE; 16],
}

/// CSSIM_MBK_FUNCTION_LIST.
#[repr(C)]
pub struct MbkFunctionList {
    pub version: CK_VERSION,
    pub CSSIM_GetMbkInfo: Option<unsafe extern "C" fn(CK_SLOT_ID, *mut MbkInfo) -> CK_RV>,
    pub CSSIM_BackupKey:
        Option<unsafe extern "C" fn(CK_SESSION_HANDLE, CK_OBJECT_HANDLE, *mut CK_BYTE, *mut CK_ULONG) -> CK_RV>,
    pub CSSIM_RestoreKey: Option<
        unsafe extern "C" fn(
            CK_SESSION_HANDLE,
            *mut CK_BYTE,
            CK_ULONG,
            *mut CK_ATTRIBUTE,
            CK_ULONG,
            *mut CK_OBJECT_HANDLE,
        ) -> CK_RV,
    >,
}

// The layouts of include/cssim_mbk.h (x86_64 and aarch64 Linux: CK_ULONG and pointers of 8 bytes).
const _: () = assert!(std::mem::size_of::<MbkInfo>() == 17);
const _: () = assert!(std::mem::size_of::<MbkFunctionList>() == 8 + 3 * std::mem::size_of::<usize>());

static MBK_FUNCTIONS: MbkFunctionList = MbkFunctionList {
    version: CK_VERSION { major: 1, minor: 0 },
    CSSIM_GetMbkInfo: Some(CSSIM_GetMbkInfo),
    CSSIM_BackupKey: Some(CSSIM_BackupKey),
    CSSIM_RestoreKey: Some(CSSIM_RestoreKey),
};

static PKCS11_INTERFACE: Interface = Interface(CK_INTERFACE {
    pInterfaceName: PKCS11.as_ptr() as *mut CK_UTF8CHAR,
    pFunctionList: &FUNCTION_LIST as *const CK_FUNCTION_LIST as *mut c_void,
    flags: 0,
});

static MBK_INTERFACE: Interface = Interface(CK_INTERFACE {
    pInterfaceName: MBK.as_ptr() as *mut CK_UTF8CHAR,
    pFunctionList: &MBK_FUNCTIONS as *const MbkFunctionList as *mut c_void,
    flags: 0,
});

static WITH_MBK: [&Interface; 2] = [&PKCS11_INTERFACE, &MBK_INTERFACE];
static WITHOUT_MBK: [&Interface; 1] = [&PKCS11_INTERFACE];

/// The interfaces on offer: "CSSIM MBK" only when the device has an MBK facility. Applications ask before
/// C_Initialize too; then the configuration `CSSIM_CONFIG` names is read (unreadable: no vendor interface,
/// C_Initialize would fail anyway).
fn offered() -> &'static [&'static Interface] {
    let device_mbk = match module::get() {
        Ok(m) => m.config.device_mbk,
        Err(_) => Config::from_env().is_ok_and(|c| c.device_mbk),
    };
    if device_mbk {
        &WITH_MBK
    } else {
        &WITHOUT_MBK
    }
}

fn version_of(iface: &CK_INTERFACE) -> CK_VERSION {
    // SAFETY: both our function lists start with their CK_VERSION, and both are statics.
    unsafe { *(iface.pFunctionList as *const CK_VERSION) }
}

fn name_of(iface: &CK_INTERFACE) -> &'static CStr {
    // SAFETY: our interface names are static C strings.
    unsafe { CStr::from_ptr(iface.pInterfaceName as *const std::ffi::c_char) }
}

/// C_GetInterfaceList (3.0 §5.4): NULL list → the count; a list too small → CKR_BUFFER_TOO_SMALL with the
/// count. Not counted by the fault machinery (as C_GetFunctionList).
///
/// # Safety
/// `count` must be NULL or valid; `list` NULL or writable for `*count` entries.
#[no_mangle]
pub unsafe extern "C" fn C_GetInterfaceList(list: *mut CK_INTERFACE, count: *mut CK_ULONG) -> CK_RV {
    guard(|| {
        let offer = offered();
        // SAFETY: the caller passes NULL or a valid count.
        let count = unsafe { out(count)? };
        if list.is_null() {
            *count = offer.len() as CK_ULONG;
            return Ok(());
        }
        if (*count as usize) < offer.len() {
            *count = offer.len() as CK_ULONG;
            return Err(CKR_BUFFER_TOO_SMALL);
        }
        // SAFETY: the caller's list has room for `*count` >= offer.len() entries.
        let entries = unsafe { slice_mut(list, offer.len() as CK_ULONG)? };
        for (entry, iface) in entries.iter_mut().zip(offer) {
            *entry = iface.0;
        }
        *count = offer.len() as CK_ULONG;
        Ok(())
    })
}

/// C_GetInterface (3.0 §5.4): a NULL name asks for the default interface ("PKCS 11" 2.40), a NULL version
/// for any version of the named one; the interface's flags must include `flags`. Anything not offered →
/// CKR_ARGUMENTS_BAD. The CK_INTERFACE returned is the module's own static. Not counted by the fault machinery.
///
/// # Safety
/// `name` must be NULL or NUL-terminated; `version` NULL or valid; `interface` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn C_GetInterface(
    name: *mut CK_UTF8CHAR,
    version: *mut CK_VERSION,
    interface: *mut *mut CK_INTERFACE,
    flags: CK_FLAGS,
) -> CK_RV {
    guard(|| {
        // SAFETY: the caller passes NULL or a writable pointer.
        let interface = unsafe { out(interface)? };
        // SAFETY: the caller passes NULL or a NUL-terminated name.
        let name = (!name.is_null()).then(|| unsafe { CStr::from_ptr(name as *const std::ffi::c_char) });
        // SAFETY: the caller passes NULL or a valid CK_VERSION.
        let version = unsafe { version.as_ref() }.copied();
        let found = offered()
            .iter()
            .find(|i| {
                let v = version_of(&i.0);
                name.unwrap_or(PKCS11) == name_of(&i.0)
                    && version.is_none_or(|w| (w.major, w.minor) == (v.major, v.minor))
                    && i.0.flags & flags == flags
            })
            .ok_or(CKR_ARGUMENTS_BAD)?;
        // Callers never write through it; the pointer type is the C API's.
        *interface = &found.0 as *const CK_INTERFACE as *mut CK_INTERFACE;
        Ok(())
    })
}

/// CSSIM_GetMbkInfo: whether the device behind `slot` holds an MBK, and its fingerprint (zero when none).
unsafe extern "C" fn CSSIM_GetMbkInfo(slot: CK_SLOT_ID, info: *mut MbkInfo) -> CK_RV {
    entry("CSSIM_GetMbkInfo", |m| {
        // SAFETY: NULL or writable, as the header says.
        let info = unsafe { out(info)? };
        let fingerprint = m.mbk_info(slot)?;
        *info =
            MbkInfo { loaded: fingerprint.is_some() as CK_BBOOL, fingerprint: fingerprint.map_or([0; 16], |f| f.0) };
        Ok(())
    })
}

/// CSSIM_BackupKey: the key's blob under the device MBK, with the length-query protocol.
unsafe extern "C" fn CSSIM_BackupKey(
    h: CK_SESSION_HANDLE,
    key: CK_OBJECT_HANDLE,
    blob: *mut CK_BYTE,
    len: *mut CK_ULONG,
) -> CK_RV {
    entry("CSSIM_BackupKey", |m| {
        // SAFETY: the caller's output buffer and length.
        unsafe {
            capacity(blob, len)?;
            let data = m.backup_key(h, key)?;
            write_bytes(&data, blob, len)
        }
    })
}

/// CSSIM_RestoreKey: creates the key a blob holds; the template may hold CKA_TOKEN only.
unsafe extern "C" fn CSSIM_RestoreKey(
    h: CK_SESSION_HANDLE,
    blob: *mut CK_BYTE,
    blob_len: CK_ULONG,
    t: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    entry("CSSIM_RestoreKey", |m| {
        // SAFETY: the caller's blob, template and out pointer.
        let (data, t, key) = unsafe { (slice(blob, blob_len)?, template(t, count)?, out(key)?) };
        *key = m.restore_key(h, data, &t)?;
        Ok(())
    })
}
