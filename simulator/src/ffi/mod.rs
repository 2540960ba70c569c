//! The C ABI: the only place with `extern "C"` and raw pointers. The library exports three symbols:
//! C_GetFunctionList (the 2.40 table), C_GetInterfaceList and C_GetInterface ([`interface`]: "PKCS 11" 2.40,
//! whose function list is that same table, and the vendor interface "CSSIM MBK"). Every other function is
//! reached through the tables.
//!
//! Every entry point has the same shape ([`entry`]): catch_unwind (a panic becomes CKR_GENERAL_ERROR), the
//! initialized module, the fault machinery, then the function on safe types from [`crate::module`].

// The entry points carry their PKCS#11 names.
#![allow(non_snake_case)]

mod args;
mod interface;

use crate::module::{self, Module, Step};
use crate::Result;
use args::{
    capacity, mechanism, out, slice, slice_mut, template, write_attributes, write_bytes, write_list, write_out,
};
use cryptoki_sys::*;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

pub use interface::{C_GetInterface, C_GetInterfaceList};

fn guard(f: impl FnOnce() -> Result<()>) -> CK_RV {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => CKR_OK,
        Ok(Err(rv)) => rv,
        Err(_) => {
            if let Ok(m) = module::get() {
                m.log.line("panic caught at the C boundary: CKR_GENERAL_ERROR");
            }
            CKR_GENERAL_ERROR
        }
    }
}

/// One counted call of `name`: the module, its faults, then `f`.
fn entry(name: &'static str, f: impl FnOnce(&Module) -> Result<()>) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        m.before(name)?;
        f(&m)
    })
}

/// [`entry`] for a call that continues or finishes an operation of session `h` (C_EncryptUpdate, C_Sign,
/// …): when a fault fails it, the operation ends, as PKCS#11 says of a call that fails (§5.8–5.12) and as a
/// device that failed in the middle would leave it.
fn entry_op(name: &'static str, h: CK_SESSION_HANDLE, f: impl FnOnce(&Module) -> Result<()>) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        if let Err(rv) = m.before(name) {
            m.end_operation(h, name);
            return Err(rv);
        }
        f(&m)
    })
}

fn not_supported(name: &'static str) -> CK_RV {
    entry(name, |_| Err(CKR_FUNCTION_NOT_SUPPORTED))
}

/// The 2.40 function list (§5.4).
static FUNCTION_LIST: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
    version: CK_VERSION { major: 2, minor: 40 },
    C_Initialize: Some(C_Initialize),
    C_Finalize: Some(C_Finalize),
    C_GetInfo: Some(C_GetInfo),
    C_GetFunctionList: Some(C_GetFunctionList),
    C_GetSlotList: Some(C_GetSlotList),
    C_GetSlotInfo: Some(C_GetSlotInfo),
    C_GetTokenInfo: Some(C_GetTokenInfo),
    C_GetMechanismList: Some(C_GetMechanismList),
    C_GetMechanismInfo: Some(C_GetMechanismInfo),
    C_InitToken: Some(C_InitToken),
    C_InitPIN: Some(C_InitPIN),
    C_SetPIN: Some(C_SetPIN),
    C_OpenSession: Some(C_OpenSession),
    C_CloseSession: Some(C_CloseSession),
    C_CloseAllSessions: Some(C_CloseAllSessions),
    C_GetSessionInfo: Some(C_GetSessionInfo),
    C_GetOperationState: Some(C_GetOperationState),
    C_SetOperationState: Some(C_SetOperationState),
    C_Login: Some(C_Login),
    C_Logout: Some(C_Logout),
    C_CreateObject: Some(C_CreateObject),
    C_CopyObject: Some(C_CopyObject),
    C_DestroyObject: Some(C_DestroyObject),
    C_GetObjectSize: Some(C_GetObjectSize),
    C_GetAttributeValue: Some(C_GetAttributeValue),
    C_SetAttributeValue: Some(C_SetAttributeValue),
    C_FindObjectsInit: Some(C_FindObjectsInit),
    C_FindObjects: Some(C_FindObjects),
    C_FindObjectsFinal: Some(C_FindObjectsFinal),
    C_EncryptInit: Some(C_EncryptInit),
    C_Encrypt: Some(C_Encrypt),
    C_EncryptUpdate: Some(C_EncryptUpdate),
    C_EncryptFinal: Some(C_EncryptFinal),
    C_DecryptInit: Some(C_DecryptInit),
    C_Decrypt: Some(C_Decrypt),
    C_DecryptUpdate: Some(C_DecryptUpdate),
    C_DecryptFinal: Some(C_DecryptFinal),
    C_DigestInit: Some(C_DigestInit),
    C_Digest: Some(C_Digest),
    C_DigestUpdate: Some(C_DigestUpdate),
    C_DigestKey: Some(C_DigestKey),
    C_DigestFinal: Some(C_DigestFinal),
    C_SignInit: Some(C_SignInit),
    C_Sign: Some(C_Sign),
    C_SignUpdate: Some(C_SignUpdate),
    C_SignFinal: Some(C_SignFinal),
    C_SignRecoverInit: Some(C_SignRecoverInit),
    C_SignRecover: Some(C_SignRecover),
    C_VerifyInit: Some(C_VerifyInit),
    C_Verify: Some(C_Verify),
    C_VerifyUpdate: Some(C_VerifyUpdate),
    C_VerifyFinal: Some(C_VerifyFinal),
    C_VerifyRecoverInit: Some(C_VerifyRecoverInit),
    C_VerifyRecover: Some(C_VerifyRecover),
    C_DigestEncryptUpdate: Some(C_DigestEncryptUpdate),
    C_DecryptDigestUpdate: Some(C_DecryptDigestUpdate),
    C_SignEncryptUpdate: Some(C_SignEncryptUpdate),
    C_DecryptVerifyUpdate: Some(C_DecryptVerifyUpdate),
    C_GenerateKey: Some(C_GenerateKey),
    C_GenerateKeyPair: Some(C_GenerateKeyPair),
    C_WrapKey: Some(C_WrapKey),
    C_UnwrapKey: Some(C_UnwrapKey),
    C_DeriveKey: Some(C_DeriveKey),
    C_SeedRandom: Some(C_SeedRandom),
    C_GenerateRandom: Some(C_GenerateRandom),
    C_GetFunctionStatus: Some(C_GetFunctionStatus),
    C_CancelFunction: Some(C_CancelFunction),
    C_WaitForSlotEvent: Some(C_WaitForSlotEvent),
};

/// C_GetFunctionList (§5.4).
///
/// # Safety
/// `list` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    guard(|| {
        // SAFETY: the caller passes NULL or a writable pointer.
        let list = unsafe { out(list)? };
        // Callers never write through it; the pointer type is the C API's.
        *list = &FUNCTION_LIST as *const CK_FUNCTION_LIST as *mut CK_FUNCTION_LIST;
        Ok(())
    })
}

/// C_Initialize (§5.4): mutex callbacks all or none; without CKF_OS_LOCKING_OK the application's callbacks
/// would have to be used, which this module cannot (CKR_CANT_LOCK).
unsafe extern "C" fn C_Initialize(init_args: *mut c_void) -> CK_RV {
    guard(|| {
        // SAFETY: NULL or a CK_C_INITIALIZE_ARGS, as C_Initialize's contract says.
        if let Some(a) = unsafe { (init_args as *const CK_C_INITIALIZE_ARGS).as_ref() } {
            if !a.pReserved.is_null() {
                return Err(CKR_ARGUMENTS_BAD);
            }
            let given =
                [a.CreateMutex.is_some(), a.DestroyMutex.is_some(), a.LockMutex.is_some(), a.UnlockMutex.is_some()];
            let n = given.iter().filter(|g| **g).count();
            if n != 0 && n != 4 {
                return Err(CKR_ARGUMENTS_BAD);
            }
            if n == 4 && a.flags & CKF_OS_LOCKING_OK == 0 {
                return Err(CKR_CANT_LOCK);
            }
        }
        module::initialize()
    })
}

unsafe extern "C" fn C_Finalize(reserved: *mut c_void) -> CK_RV {
    if !reserved.is_null() {
        return guard(|| module::get().and(Err(CKR_ARGUMENTS_BAD)));
    }
    let rv = entry("C_Finalize", |_| Ok(()));
    if rv != CKR_OK {
        return rv;
    }
    guard(module::finalize)
}

unsafe extern "C" fn C_GetInfo(info: *mut CK_INFO) -> CK_RV {
    entry("C_GetInfo", |m| {
        // SAFETY: NULL or writable, as the API says.
        *unsafe { out(info)? } = m.info();
        Ok(())
    })
}

unsafe extern "C" fn C_GetSlotList(token_present: CK_BBOOL, list: *mut CK_SLOT_ID, count: *mut CK_ULONG) -> CK_RV {
    // SAFETY: the caller's list and count, per the API.
    entry("C_GetSlotList", |m| unsafe { write_list(&m.slot_list(token_present != 0), list, count) })
}

unsafe extern "C" fn C_GetSlotInfo(slot: CK_SLOT_ID, info: *mut CK_SLOT_INFO) -> CK_RV {
    entry("C_GetSlotInfo", |m| {
        let i = m.slot_info(slot)?;
        // SAFETY: NULL or writable.
        *unsafe { out(info)? } = i;
        Ok(())
    })
}

unsafe extern "C" fn C_GetTokenInfo(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO) -> CK_RV {
    entry("C_GetTokenInfo", |m| {
        let i = m.token_info(slot)?;
        // SAFETY: NULL or writable.
        *unsafe { out(info)? } = i;
        Ok(())
    })
}

unsafe extern "C" fn C_GetMechanismList(slot: CK_SLOT_ID, list: *mut CK_MECHANISM_TYPE, count: *mut CK_ULONG) -> CK_RV {
    // SAFETY: the caller's list and count.
    entry("C_GetMechanismList", |m| unsafe { write_list(&m.mechanism_list(slot)?, list, count) })
}

unsafe extern "C" fn C_GetMechanismInfo(
    slot: CK_SLOT_ID,
    ty: CK_MECHANISM_TYPE,
    info: *mut CK_MECHANISM_INFO,
) -> CK_RV {
    entry("C_GetMechanismInfo", |m| {
        let i = m.mechanism_info(slot, ty)?;
        // SAFETY: NULL or writable.
        *unsafe { out(info)? } = i;
        Ok(())
    })
}

unsafe extern "C" fn C_InitToken(
    slot: CK_SLOT_ID,
    pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
    label: *mut CK_UTF8CHAR,
) -> CK_RV {
    entry("C_InitToken", |m| {
        // SAFETY: the PIN is readable for its length; the label is 32 bytes (§5.5).
        let (pin, label) = unsafe { (pin_of(pin, pin_len)?, slice(label, 32)?) };
        m.init_token(slot, pin, label.try_into().map_err(|_| CKR_ARGUMENTS_BAD)?)
    })
}

/// A PIN argument; NULL (protected authentication path) is not offered.
///
/// # Safety
/// `pin` must be NULL or readable for `len` bytes.
unsafe fn pin_of<'a>(pin: *const u8, len: CK_ULONG) -> Result<&'a [u8]> {
    if pin.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: forwarded.
    unsafe { slice(pin, len) }
}

unsafe extern "C" fn C_InitPIN(h: CK_SESSION_HANDLE, pin: *mut CK_UTF8CHAR, len: CK_ULONG) -> CK_RV {
    // SAFETY: the PIN is readable for its length.
    entry("C_InitPIN", |m| m.init_pin(h, unsafe { pin_of(pin, len)? }))
}

unsafe extern "C" fn C_SetPIN(
    h: CK_SESSION_HANDLE,
    old: *mut CK_UTF8CHAR,
    old_len: CK_ULONG,
    new: *mut CK_UTF8CHAR,
    new_len: CK_ULONG,
) -> CK_RV {
    // SAFETY: both PINs are readable for their lengths.
    entry("C_SetPIN", |m| m.set_pin(h, unsafe { pin_of(old, old_len)? }, unsafe { pin_of(new, new_len)? }))
}

unsafe extern "C" fn C_OpenSession(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    _app: *mut c_void,
    _notify: CK_NOTIFY,
    session: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    entry("C_OpenSession", |m| {
        // SAFETY: NULL or writable.
        let session = unsafe { out(session)? };
        *session = m.open_session(slot, flags)?;
        Ok(())
    })
}

unsafe extern "C" fn C_CloseSession(h: CK_SESSION_HANDLE) -> CK_RV {
    entry("C_CloseSession", |m| m.close_session(h))
}

unsafe extern "C" fn C_CloseAllSessions(slot: CK_SLOT_ID) -> CK_RV {
    entry("C_CloseAllSessions", |m| m.close_all_sessions(slot))
}

unsafe extern "C" fn C_GetSessionInfo(h: CK_SESSION_HANDLE, info: *mut CK_SESSION_INFO) -> CK_RV {
    entry("C_GetSessionInfo", |m| {
        let i = m.session_info(h)?;
        // SAFETY: NULL or writable.
        *unsafe { out(info)? } = i;
        Ok(())
    })
}

unsafe extern "C" fn C_GetOperationState(_h: CK_SESSION_HANDLE, _state: *mut CK_BYTE, _len: *mut CK_ULONG) -> CK_RV {
    not_supported("C_GetOperationState")
}

unsafe extern "C" fn C_SetOperationState(
    _h: CK_SESSION_HANDLE,
    _state: *mut CK_BYTE,
    _len: CK_ULONG,
    _enc: CK_OBJECT_HANDLE,
    _auth: CK_OBJECT_HANDLE,
) -> CK_RV {
    not_supported("C_SetOperationState")
}

unsafe extern "C" fn C_Login(h: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: *mut CK_UTF8CHAR, len: CK_ULONG) -> CK_RV {
    // SAFETY: the PIN is readable for its length.
    entry("C_Login", |m| m.login(h, user, unsafe { pin_of(pin, len)? }))
}

unsafe extern "C" fn C_Logout(h: CK_SESSION_HANDLE) -> CK_RV {
    entry("C_Logout", |m| m.logout(h))
}

unsafe extern "C" fn C_CreateObject(
    h: CK_SESSION_HANDLE,
    t: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    object: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    entry("C_CreateObject", |m| {
        // SAFETY: the caller's template and out pointer.
        let (t, object) = unsafe { (template(t, count)?, out(object)?) };
        *object = m.create_object(h, &t)?;
        Ok(())
    })
}

unsafe extern "C" fn C_CopyObject(
    h: CK_SESSION_HANDLE,
    obj: CK_OBJECT_HANDLE,
    t: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    object: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    entry("C_CopyObject", |m| {
        // SAFETY: the caller's template and out pointer.
        let (t, object) = unsafe { (template(t, count)?, out(object)?) };
        *object = m.copy_object(h, obj, &t)?;
        Ok(())
    })
}

unsafe extern "C" fn C_DestroyObject(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE) -> CK_RV {
    entry("C_DestroyObject", |m| m.destroy_object(h, obj))
}

unsafe extern "C" fn C_GetObjectSize(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE, size: *mut CK_ULONG) -> CK_RV {
    entry("C_GetObjectSize", |m| {
        // SAFETY: NULL or writable.
        let size = unsafe { out(size)? };
        *size = m.object_size(h, obj)? as CK_ULONG;
        Ok(())
    })
}

unsafe extern "C" fn C_GetAttributeValue(
    h: CK_SESSION_HANDLE,
    obj: CK_OBJECT_HANDLE,
    t: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    entry("C_GetAttributeValue", |m| {
        // SAFETY: `count` writable attributes at `t` (a NULL, misaligned or impossible array is refused).
        let attrs = unsafe { slice_mut(t, count)? };
        let types: Vec<CK_ATTRIBUTE_TYPE> = attrs.iter().map(|a| a.type_).collect();
        let values = m.attribute_values(h, obj, &types)?;
        // SAFETY: the caller's attribute values are NULL or writable for their lengths.
        unsafe { write_attributes(attrs, values) }
    })
}

unsafe extern "C" fn C_SetAttributeValue(
    h: CK_SESSION_HANDLE,
    obj: CK_OBJECT_HANDLE,
    t: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's template.
    entry("C_SetAttributeValue", |m| m.set_attribute_values(h, obj, &unsafe { template(t, count)? }))
}

unsafe extern "C" fn C_FindObjectsInit(h: CK_SESSION_HANDLE, t: *mut CK_ATTRIBUTE, count: CK_ULONG) -> CK_RV {
    // SAFETY: the caller's template.
    entry("C_FindObjectsInit", |m| m.find_init(h, &unsafe { template(t, count)? }))
}

unsafe extern "C" fn C_FindObjects(
    h: CK_SESSION_HANDLE,
    objects: *mut CK_OBJECT_HANDLE,
    max: CK_ULONG,
    count: *mut CK_ULONG,
) -> CK_RV {
    entry("C_FindObjects", |m| {
        // SAFETY: NULL or writable.
        let count = unsafe { out(count)? };
        if objects.is_null() && max > 0 {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let found = m.find(h, max as usize)?;
        if !found.is_empty() {
            // SAFETY: `objects` holds `max` >= found.len() handles.
            unsafe { std::ptr::copy_nonoverlapping(found.as_ptr(), objects, found.len()) };
        }
        *count = found.len() as CK_ULONG;
        Ok(())
    })
}

unsafe extern "C" fn C_FindObjectsFinal(h: CK_SESSION_HANDLE) -> CK_RV {
    entry("C_FindObjectsFinal", |m| m.find_final(h))
}

/// C_EncryptInit/C_DecryptInit.
unsafe fn crypt_init(
    name: &'static str,
    h: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
    encrypt: bool,
) -> CK_RV {
    // SAFETY: the caller's mechanism.
    entry(name, |m| m.encrypt_init(h, &unsafe { mechanism(mech)? }, key, encrypt))
}

/// C_Encrypt, C_EncryptUpdate, C_Decrypt… (`input`: None for …Final).
unsafe fn crypt(
    name: &'static str,
    h: CK_SESSION_HANDLE,
    encrypt: bool,
    input: Option<(*mut CK_BYTE, CK_ULONG)>,
    single: bool,
    buf: *mut CK_BYTE,
    len: *mut CK_ULONG,
) -> CK_RV {
    entry_op(name, h, |m| {
        // SAFETY: the caller's input and output buffers.
        unsafe {
            let cap = capacity(buf, len)?;
            let data = match input {
                Some((p, n)) => Some(slice(p, n)?),
                None => None,
            };
            let step = match (data, single) {
                (Some(d), true) => Step::Single(d),
                (Some(d), false) => Step::Update(d),
                (None, _) => Step::Final,
            };
            write_out(m.crypt(h, encrypt, step, cap)?, buf, len)
        }
    })
}

unsafe extern "C" fn C_EncryptInit(h: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE) -> CK_RV {
    // SAFETY: forwarded.
    unsafe { crypt_init("C_EncryptInit", h, mech, key, true) }
}

unsafe extern "C" fn C_Encrypt(
    h: CK_SESSION_HANDLE,
    d: *mut CK_BYTE,
    n: CK_ULONG,
    o: *mut CK_BYTE,
    l: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: forwarded.
    unsafe { crypt("C_Encrypt", h, true, Some((d, n)), true, o, l) }
}

unsafe extern "C" fn C_EncryptUpdate(
    h: CK_SESSION_HANDLE,
    d: *mut CK_BYTE,
    n: CK_ULONG,
    o: *mut CK_BYTE,
    l: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: forwarded.
    unsafe { crypt("C_EncryptUpdate", h, true, Some((d, n)), false, o, l) }
}

unsafe extern "C" fn C_EncryptFinal(h: CK_SESSION_HANDLE, o: *mut CK_BYTE, l: *mut CK_ULONG) -> CK_RV {
    // SAFETY: forwarded.
    unsafe { crypt("C_EncryptFinal", h, true, None, false, o, l) }
}

unsafe extern "C" fn C_DecryptInit(h: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE) -> CK_RV {
    // SAFETY: forwarded.
    unsafe { crypt_init("C_DecryptInit", h, mech, key, false) }
}

unsafe extern "C" fn C_Decrypt(
    h: CK_SESSION_HANDLE,
    d: *mut CK_BYTE,
    n: CK_ULONG,
    o: *mut CK_BYTE,
    l: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: forwarded.
    unsafe { crypt("C_Decrypt", h, false, Some((d, n)), true, o, l) }
}

unsafe extern "C" fn C_DecryptUpdate(
    h: CK_SESSION_HANDLE,
    d: *mut CK_BYTE,
    n: CK_ULONG,
    o: *mut CK_BYTE,
    l: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: forwarded.
    unsafe { crypt("C_DecryptUpdate", h, false, Some((d, n)), false, o, l) }
}

unsafe extern "C" fn C_DecryptFinal(h: CK_SESSION_HANDLE, o: *mut CK_BYTE, l: *mut CK_ULONG) -> CK_RV {
    // SAFETY: forwarded.
    unsafe { crypt("C_DecryptFinal", h, false, None, false, o, l) }
}

unsafe extern "C" fn C_DigestInit(h: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM) -> CK_RV {
    // SAFETY: the caller's mechanism.
    entry("C_DigestInit", |m| m.digest_init(h, &unsafe { mechanism(mech)? }))
}

unsafe extern "C" fn C_Digest(
    h: CK_SESSION_HANDLE,
    d: *mut CK_BYTE,
    n: CK_ULONG,
    o: *mut CK_BYTE,
    l: *mut CK_ULONG,
) -> CK_RV {
    entry_op("C_Digest", h, |m| {
        // SAFETY: the caller's buffers.
        unsafe {
            let cap = capacity(o, l)?;
            write_out(m.digest(h, Step::Single(slice(d, n)?), cap)?, o, l)
        }
    })
}

unsafe extern "C" fn C_DigestUpdate(h: CK_SESSION_HANDLE, d: *mut CK_BYTE, n: CK_ULONG) -> CK_RV {
    // SAFETY: the caller's input.
    entry_op("C_DigestUpdate", h, |m| m.digest(h, Step::Update(unsafe { slice(d, n)? }), None).map(|_| ()))
}

unsafe extern "C" fn C_DigestKey(h: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> CK_RV {
    entry_op("C_DigestKey", h, |m| m.digest_key(h, key))
}

unsafe extern "C" fn C_DigestFinal(h: CK_SESSION_HANDLE, o: *mut CK_BYTE, l: *mut CK_ULONG) -> CK_RV {
    entry_op("C_DigestFinal", h, |m| {
        // SAFETY: the caller's buffers.
        unsafe {
            let cap = capacity(o, l)?;
            write_out(m.digest(h, Step::Final, cap)?, o, l)
        }
    })
}

unsafe extern "C" fn C_SignInit(h: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE) -> CK_RV {
    // SAFETY: the caller's mechanism.
    entry("C_SignInit", |m| m.sign_init(h, &unsafe { mechanism(mech)? }, key, true))
}

unsafe extern "C" fn C_Sign(
    h: CK_SESSION_HANDLE,
    d: *mut CK_BYTE,
    n: CK_ULONG,
    o: *mut CK_BYTE,
    l: *mut CK_ULONG,
) -> CK_RV {
    entry_op("C_Sign", h, |m| {
        // SAFETY: the caller's buffers.
        unsafe {
            let cap = capacity(o, l)?;
            write_out(m.sign(h, Step::Single(slice(d, n)?), cap)?, o, l)
        }
    })
}

unsafe extern "C" fn C_SignUpdate(h: CK_SESSION_HANDLE, d: *mut CK_BYTE, n: CK_ULONG) -> CK_RV {
    // SAFETY: the caller's input.
    entry_op("C_SignUpdate", h, |m| m.sign(h, Step::Update(unsafe { slice(d, n)? }), None).map(|_| ()))
}

unsafe extern "C" fn C_SignFinal(h: CK_SESSION_HANDLE, o: *mut CK_BYTE, l: *mut CK_ULONG) -> CK_RV {
    entry_op("C_SignFinal", h, |m| {
        // SAFETY: the caller's buffers.
        unsafe {
            let cap = capacity(o, l)?;
            write_out(m.sign(h, Step::Final, cap)?, o, l)
        }
    })
}

unsafe extern "C" fn C_SignRecoverInit(
    _h: CK_SESSION_HANDLE,
    _mech: *mut CK_MECHANISM,
    _key: CK_OBJECT_HANDLE,
) -> CK_RV {
    not_supported("C_SignRecoverInit")
}

unsafe extern "C" fn C_SignRecover(
    _h: CK_SESSION_HANDLE,
    _d: *mut CK_BYTE,
    _n: CK_ULONG,
    _o: *mut CK_BYTE,
    _l: *mut CK_ULONG,
) -> CK_RV {
    not_supported("C_SignRecover")
}

unsafe extern "C" fn C_VerifyInit(h: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE) -> CK_RV {
    // SAFETY: the caller's mechanism.
    entry("C_VerifyInit", |m| m.sign_init(h, &unsafe { mechanism(mech)? }, key, false))
}

unsafe extern "C" fn C_Verify(
    h: CK_SESSION_HANDLE,
    d: *mut CK_BYTE,
    n: CK_ULONG,
    s: *mut CK_BYTE,
    sn: CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's data and signature.
    entry_op("C_Verify", h, |m| m.verify(h, Some(unsafe { slice(d, n)? }), unsafe { slice(s, sn)? }))
}

unsafe extern "C" fn C_VerifyUpdate(h: CK_SESSION_HANDLE, d: *mut CK_BYTE, n: CK_ULONG) -> CK_RV {
    // SAFETY: the caller's data.
    entry_op("C_VerifyUpdate", h, |m| m.verify_update(h, unsafe { slice(d, n)? }))
}

unsafe extern "C" fn C_VerifyFinal(h: CK_SESSION_HANDLE, s: *mut CK_BYTE, sn: CK_ULONG) -> CK_RV {
    // SAFETY: the caller's signature.
    entry_op("C_VerifyFinal", h, |m| m.verify(h, None, unsafe { slice(s, sn)? }))
}

unsafe extern "C" fn C_VerifyRecoverInit(
    _h: CK_SESSION_HANDLE,
    _mech: *mut CK_MECHANISM,
    _key: CK_OBJECT_HANDLE,
) -> CK_RV {
    not_supported("C_VerifyRecoverInit")
}

unsafe extern "C" fn C_VerifyRecover(
    _h: CK_SESSION_HANDLE,
    _s: *mut CK_BYTE,
    _n: CK_ULONG,
    _o: *mut CK_BYTE,
    _l: *mut CK_ULONG,
) -> CK_RV {
    not_supported("C_VerifyRecover")
}

unsafe extern "C" fn C_DigestEncryptUpdate(
    _h: CK_SESSION_HANDLE,
    _d: *mut CK_BYTE,
    _n: CK_ULONG,
    _o: *mut CK_BYTE,
    _l: *mut CK_ULONG,
) -> CK_RV {
    not_supported("C_DigestEncryptUpdate")
}

unsafe extern "C" fn C_DecryptDigestUpdate(
    _h: CK_SESSION_HANDLE,
    _d: *mut CK_BYTE,
    _n: CK_ULONG,
    _o: *mut CK_BYTE,
    _l: *mut CK_ULONG,
) -> CK_RV {
    not_supported("C_DecryptDigestUpdate")
}

unsafe extern "C" fn C_SignEncryptUpdate(
    _h: CK_SESSION_HANDLE,
    _d: *mut CK_BYTE,
    _n: CK_ULONG,
    _o: *mut CK_BYTE,
    _l: *mut CK_ULONG,
) -> CK_RV {
    not_supported("C_SignEncryptUpdate")
}

unsafe extern "C" fn C_DecryptVerifyUpdate(
    _h: CK_SESSION_HANDLE,
    _d: *mut CK_BYTE,
    _n: CK_ULONG,
    _o: *mut CK_BYTE,
    _l: *mut CK_ULONG,
) -> CK_RV {
    not_supported("C_DecryptVerifyUpdate")
}

unsafe extern "C" fn C_GenerateKey(
    h: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    t: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    entry("C_GenerateKey", |m| {
        // SAFETY: the caller's mechanism, template and out pointer.
        let (mech, t, key) = unsafe { (mechanism(mech)?, template(t, count)?, out(key)?) };
        *key = m.generate_key(h, &mech, &t)?;
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)] // the C signature
unsafe extern "C" fn C_GenerateKeyPair(
    h: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    public: *mut CK_ATTRIBUTE,
    public_count: CK_ULONG,
    private: *mut CK_ATTRIBUTE,
    private_count: CK_ULONG,
    public_key: *mut CK_OBJECT_HANDLE,
    private_key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    entry("C_GenerateKeyPair", |m| {
        // SAFETY: the caller's mechanism, templates and out pointers.
        let (mech, public, private, public_key, private_key) = unsafe {
            (
                mechanism(mech)?,
                template(public, public_count)?,
                template(private, private_count)?,
                out(public_key)?,
                out(private_key)?,
            )
        };
        (*public_key, *private_key) = m.generate_key_pair(h, &mech, &public, &private)?;
        Ok(())
    })
}

unsafe extern "C" fn C_WrapKey(
    h: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    wrapping: CK_OBJECT_HANDLE,
    key: CK_OBJECT_HANDLE,
    o: *mut CK_BYTE,
    l: *mut CK_ULONG,
) -> CK_RV {
    entry("C_WrapKey", |m| {
        // SAFETY: the caller's mechanism and output buffers.
        unsafe {
            capacity(o, l)?;
            let wrapped = m.wrap_key(h, &mechanism(mech)?, wrapping, key)?;
            write_bytes(&wrapped, o, l)
        }
    })
}

#[allow(clippy::too_many_arguments)] // the C signature
unsafe extern "C" fn C_UnwrapKey(
    h: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    unwrapping: CK_OBJECT_HANDLE,
    wrapped: *mut CK_BYTE,
    wrapped_len: CK_ULONG,
    t: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    entry("C_UnwrapKey", |m| {
        // SAFETY: the caller's mechanism, wrapped key, template and out pointer.
        let (mech, wrapped, t, key) =
            unsafe { (mechanism(mech)?, slice(wrapped, wrapped_len)?, template(t, count)?, out(key)?) };
        *key = m.unwrap_key(h, &mech, unwrapping, wrapped, &t)?;
        Ok(())
    })
}

unsafe extern "C" fn C_DeriveKey(
    h: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    base: CK_OBJECT_HANDLE,
    t: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    entry("C_DeriveKey", |m| {
        // SAFETY: the caller's mechanism, template and out pointer.
        let (mech, t, key) = unsafe { (mechanism(mech)?, template(t, count)?, out(key)?) };
        *key = m.derive_key(h, &mech, base, &t)?;
        Ok(())
    })
}

unsafe extern "C" fn C_SeedRandom(h: CK_SESSION_HANDLE, seed: *mut CK_BYTE, len: CK_ULONG) -> CK_RV {
    entry("C_SeedRandom", |m| {
        // SAFETY: the caller's seed (checked, then ignored).
        unsafe { slice(seed, len)? };
        m.seed_random(h)
    })
}

unsafe extern "C" fn C_GenerateRandom(h: CK_SESSION_HANDLE, buf: *mut CK_BYTE, len: CK_ULONG) -> CK_RV {
    entry("C_GenerateRandom", |m| {
        // SAFETY: `len` writable bytes at `buf` (NULL or an impossible length is refused).
        let out = unsafe { slice_mut(buf, len)? };
        m.generate_random(h, out)
    })
}

unsafe extern "C" fn C_GetFunctionStatus(_h: CK_SESSION_HANDLE) -> CK_RV {
    entry("C_GetFunctionStatus", |_| Err(CKR_FUNCTION_NOT_PARALLEL))
}

unsafe extern "C" fn C_CancelFunction(_h: CK_SESSION_HANDLE) -> CK_RV {
    entry("C_CancelFunction", |_| Err(CKR_FUNCTION_NOT_PARALLEL))
}

unsafe extern "C" fn C_WaitForSlotEvent(_flags: CK_FLAGS, _slot: *mut CK_SLOT_ID, _reserved: *mut c_void) -> CK_RV {
    not_supported("C_WaitForSlotEvent")
}
