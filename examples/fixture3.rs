//! fixture3: a tiny PKCS#11 3.0 module (no cryptography) that the tests load behind the shim.
//!
//! It pins down what the shim must do with a 3.x backend and with a backend whose object handles use the
//! top bit, and it reports back what it was given so a test can check it:
//! - C_GetTokenInfo: `serialNumber` = the flags of the last C_Initialize as 16 hex digits, `model` =
//!   "user:" + the username of the last C_LoginUser.
//! - C_GetSessionInfo: `ulDeviceError` = how many times C_SessionCancel was called on that session.
//! - C_GetAttributeValue(CKA_ID) = the object handle the fixture received, as 8 big-endian bytes.
//!
//! Exports C_GetFunctionList (the 2.40 list), C_GetInterfaceList and C_GetInterface ("PKCS 11" 3.0, the
//! default, then 2.40). One slot (id 7) with one token. Generated keys get handles 0x8000_0000_0000_0001,
//! 0x8000_0000_0000_0002, … Every function not listed as implemented returns CKR_FUNCTION_NOT_SUPPORTED.
#![deny(unsafe_op_in_unsafe_fn)]
#![allow(non_snake_case)]

use cryptoki_sys::*;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::c_void;
use std::sync::{Mutex, MutexGuard};

pub const SLOT: CK_SLOT_ID = 7;
/// The first handle C_GenerateKey returns; the next ones count up from it.
pub const FIRST_KEY: CK_OBJECT_HANDLE = 0x8000_0000_0000_0001;

// ---------------------------------------------------------------------------------------------------------
// State

struct Session {
    flags: CK_FLAGS,
    /// The objects a C_FindObjectsInit found and C_FindObjects has not returned yet.
    find: Option<Vec<CK_OBJECT_HANDLE>>,
    cancels: CK_ULONG,
}

struct State {
    initialized: bool,
    init_flags: CK_FLAGS,
    sessions: BTreeMap<CK_SESSION_HANDLE, Session>,
    next_session: CK_SESSION_HANDLE,
    objects: BTreeSet<CK_OBJECT_HANDLE>,
    next_key: CK_OBJECT_HANDLE,
    user: String,
    logged_in: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    initialized: false,
    init_flags: 0,
    sessions: BTreeMap::new(),
    next_session: 1,
    objects: BTreeSet::new(),
    next_key: FIRST_KEY,
    user: String::new(),
    logged_in: false,
});

type Rv = Result<(), CK_RV>;

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The state, if C_Initialize was called.
fn initialized() -> Result<MutexGuard<'static, State>, CK_RV> {
    let s = state();
    if s.initialized {
        Ok(s)
    } else {
        Err(CKR_CRYPTOKI_NOT_INITIALIZED)
    }
}

fn check_initialized() -> Rv {
    initialized().map(drop)
}

impl State {
    fn session(&mut self, h: CK_SESSION_HANDLE) -> Result<&mut Session, CK_RV> {
        self.sessions.get_mut(&h).ok_or(CKR_SESSION_HANDLE_INVALID)
    }
}

fn rv(result: Rv) -> CK_RV {
    result.err().unwrap_or(CKR_OK)
}

/// Writes `value` through an out pointer the caller passed.
///
/// # Safety
/// `ptr` is NULL or valid for writing a `T`.
unsafe fn out<T>(ptr: *mut T, value: T) -> Rv {
    if ptr.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-NULL, and the caller promises it is writable.
    unsafe { ptr.write(value) };
    Ok(())
}

/// The bytes of a (pointer, length) argument.
///
/// # Safety
/// `ptr` is NULL or valid for reading `len` bytes.
unsafe fn bytes<'a>(ptr: *const u8, len: CK_ULONG) -> &'a [u8] {
    if ptr.is_null() {
        return &[];
    }
    // SAFETY: non-NULL, and the caller promises `len` readable bytes.
    unsafe { std::slice::from_raw_parts(ptr, len as usize) }
}

/// A blank-padded PKCS#11 text field.
fn padded<const N: usize>(text: &str) -> [u8; N] {
    let mut field = [b' '; N];
    let n = text.len().min(N);
    field[..n].copy_from_slice(&text.as_bytes()[..n]);
    field
}

/// The PKCS#11 length protocol for an array result: NULL asks for the count.
///
/// # Safety
/// `count` is NULL or a valid CK_ULONG; `list` is NULL or valid for `*count` elements.
unsafe fn write_array<T: Copy>(items: &[T], list: *mut T, count: *mut CK_ULONG) -> Rv {
    if count.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: checked non-NULL; the caller promises it is valid.
    let room = unsafe { *count } as usize;
    // SAFETY: as above.
    unsafe { *count = items.len() as CK_ULONG };
    if list.is_null() {
        return Ok(());
    }
    if room < items.len() {
        return Err(CKR_BUFFER_TOO_SMALL);
    }
    // SAFETY: the caller promises room for `room` >= items.len() elements.
    unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), list, items.len()) };
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// General-purpose functions

unsafe extern "C" fn C_Initialize(p_init_args: *mut c_void) -> CK_RV {
    let mut s = state();
    if s.initialized {
        return CKR_CRYPTOKI_ALREADY_INITIALIZED;
    }
    // SAFETY: the caller passes NULL or a CK_C_INITIALIZE_ARGS.
    let flags = match unsafe { (p_init_args as *const CK_C_INITIALIZE_ARGS).as_ref() } {
        None => 0,
        Some(a) if !a.pReserved.is_null() => return CKR_ARGUMENTS_BAD,
        Some(a) => a.flags,
    };
    s.initialized = true;
    s.init_flags = flags;
    CKR_OK
}

unsafe extern "C" fn C_Finalize(p_reserved: *mut c_void) -> CK_RV {
    if !p_reserved.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    let mut s = state();
    if !s.initialized {
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    }
    s.initialized = false;
    s.sessions.clear();
    s.logged_in = false;
    CKR_OK
}

unsafe extern "C" fn C_GetInfo(p_info: *mut CK_INFO) -> CK_RV {
    rv((|| {
        check_initialized()?;
        let info = CK_INFO {
            cryptokiVersion: CK_VERSION { major: 3, minor: 0 },
            manufacturerID: padded("fixture3"),
            flags: 0,
            libraryDescription: padded("p11shim test fixture"),
            libraryVersion: CK_VERSION { major: 3, minor: 0 },
        };
        // SAFETY: the caller passes room for a CK_INFO.
        unsafe { out(p_info, info) }
    })())
}

/// # Safety
/// `pp_list` is NULL or valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(pp_list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    // SAFETY: the caller passes a valid out pointer; the list is never written through the pointer.
    rv(unsafe { out(pp_list, &LIST_2_40 as *const CK_FUNCTION_LIST as *mut CK_FUNCTION_LIST) })
}

// ---------------------------------------------------------------------------------------------------------
// Slots and tokens

unsafe extern "C" fn C_GetSlotList(_token_present: CK_BBOOL, p_list: *mut CK_SLOT_ID, p_count: *mut CK_ULONG) -> CK_RV {
    rv((|| {
        check_initialized()?;
        // SAFETY: the caller follows the length protocol.
        unsafe { write_array(&[SLOT], p_list, p_count) }
    })())
}

unsafe extern "C" fn C_GetSlotInfo(slot: CK_SLOT_ID, p_info: *mut CK_SLOT_INFO) -> CK_RV {
    rv((|| {
        check_initialized()?;
        if slot != SLOT {
            return Err(CKR_SLOT_ID_INVALID);
        }
        let info = CK_SLOT_INFO {
            slotDescription: padded("fixture3 slot"),
            manufacturerID: padded("fixture3"),
            flags: CKF_TOKEN_PRESENT,
            hardwareVersion: CK_VERSION { major: 3, minor: 0 },
            firmwareVersion: CK_VERSION { major: 3, minor: 0 },
        };
        // SAFETY: the caller passes room for a CK_SLOT_INFO.
        unsafe { out(p_info, info) }
    })())
}

unsafe extern "C" fn C_GetTokenInfo(slot: CK_SLOT_ID, p_info: *mut CK_TOKEN_INFO) -> CK_RV {
    rv((|| {
        let s = initialized()?;
        if slot != SLOT {
            return Err(CKR_SLOT_ID_INVALID);
        }
        let rw = s.sessions.values().filter(|x| x.flags & CKF_RW_SESSION != 0).count();
        let info = CK_TOKEN_INFO {
            label: padded("fixture3"),
            manufacturerID: padded("fixture3"),
            model: padded(&format!("user:{}", s.user)),
            serialNumber: padded(&format!("{:016x}", s.init_flags)),
            flags: CKF_TOKEN_INITIALIZED | CKF_USER_PIN_INITIALIZED,
            ulMaxSessionCount: CK_EFFECTIVELY_INFINITE,
            ulSessionCount: s.sessions.len() as CK_ULONG,
            ulMaxRwSessionCount: CK_EFFECTIVELY_INFINITE,
            ulRwSessionCount: rw as CK_ULONG,
            ulMaxPinLen: 64,
            ulMinPinLen: 4,
            ulTotalPublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulTotalPrivateMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePrivateMemory: CK_UNAVAILABLE_INFORMATION,
            hardwareVersion: CK_VERSION { major: 3, minor: 0 },
            firmwareVersion: CK_VERSION { major: 3, minor: 0 },
            utcTime: [b' '; 16],
        };
        // SAFETY: the caller passes room for a CK_TOKEN_INFO.
        unsafe { out(p_info, info) }
    })())
}

// ---------------------------------------------------------------------------------------------------------
// Sessions

unsafe extern "C" fn C_OpenSession(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    _application: *mut c_void,
    _notify: CK_NOTIFY,
    p_session: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    rv((|| {
        let mut s = initialized()?;
        if slot != SLOT {
            return Err(CKR_SLOT_ID_INVALID);
        }
        if flags & CKF_SERIAL_SESSION == 0 {
            return Err(CKR_SESSION_PARALLEL_NOT_SUPPORTED);
        }
        let handle = s.next_session;
        // SAFETY: the caller passes a valid out pointer.
        unsafe { out(p_session, handle) }?;
        s.next_session += 1;
        s.sessions.insert(handle, Session { flags, find: None, cancels: 0 });
        Ok(())
    })())
}

unsafe extern "C" fn C_CloseSession(session: CK_SESSION_HANDLE) -> CK_RV {
    rv((|| {
        let mut s = initialized()?;
        s.sessions.remove(&session).ok_or(CKR_SESSION_HANDLE_INVALID)?;
        if s.sessions.is_empty() {
            s.logged_in = false;
        }
        Ok(())
    })())
}

unsafe extern "C" fn C_CloseAllSessions(slot: CK_SLOT_ID) -> CK_RV {
    rv((|| {
        let mut s = initialized()?;
        if slot != SLOT {
            return Err(CKR_SLOT_ID_INVALID);
        }
        s.sessions.clear();
        s.logged_in = false;
        Ok(())
    })())
}

unsafe extern "C" fn C_GetSessionInfo(session: CK_SESSION_HANDLE, p_info: *mut CK_SESSION_INFO) -> CK_RV {
    rv((|| {
        let mut s = initialized()?;
        let logged_in = s.logged_in;
        let x = s.session(session)?;
        let rw = x.flags & CKF_RW_SESSION != 0;
        let state = match (logged_in, rw) {
            (false, false) => CKS_RO_PUBLIC_SESSION,
            (false, true) => CKS_RW_PUBLIC_SESSION,
            (true, false) => CKS_RO_USER_FUNCTIONS,
            (true, true) => CKS_RW_USER_FUNCTIONS,
        };
        let info = CK_SESSION_INFO { slotID: SLOT, state, flags: x.flags, ulDeviceError: x.cancels };
        // SAFETY: the caller passes room for a CK_SESSION_INFO.
        unsafe { out(p_info, info) }
    })())
}

/// PKCS#11 3.0 only. Records the username whatever the outcome.
unsafe extern "C" fn C_LoginUser(
    session: CK_SESSION_HANDLE,
    user_type: CK_USER_TYPE,
    p_pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
    p_username: *mut CK_UTF8CHAR,
    username_len: CK_ULONG,
) -> CK_RV {
    rv((|| {
        let mut s = initialized()?;
        s.session(session)?;
        if user_type != CKU_USER {
            return Err(CKR_USER_TYPE_INVALID);
        }
        // SAFETY: the caller passes (pointer, length) pairs.
        let (pin, username) = unsafe { (bytes(p_pin, pin_len), bytes(p_username, username_len)) };
        s.user = String::from_utf8_lossy(username).into_owned();
        if s.logged_in {
            return Err(CKR_USER_ALREADY_LOGGED_IN);
        }
        if username != b"alice" || pin != b"1234" {
            return Err(CKR_PIN_INCORRECT);
        }
        s.logged_in = true;
        Ok(())
    })())
}

/// PKCS#11 3.0 only. Counts the calls per session (read back as CK_SESSION_INFO.ulDeviceError).
unsafe extern "C" fn C_SessionCancel(session: CK_SESSION_HANDLE, _flags: CK_FLAGS) -> CK_RV {
    rv((|| {
        initialized()?.session(session)?.cancels += 1;
        Ok(())
    })())
}

// ---------------------------------------------------------------------------------------------------------
// Objects

/// Makes a "key" (no value: this fixture does no cryptography) whose handle has the top bit set.
unsafe extern "C" fn C_GenerateKey(
    session: CK_SESSION_HANDLE,
    p_mechanism: *mut CK_MECHANISM,
    _template: *mut CK_ATTRIBUTE,
    _count: CK_ULONG,
    p_key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    rv((|| {
        let mut s = initialized()?;
        s.session(session)?;
        if p_mechanism.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let key = s.next_key;
        // SAFETY: the caller passes a valid out pointer.
        unsafe { out(p_key, key) }?;
        s.next_key += 1;
        s.objects.insert(key);
        Ok(())
    })())
}

unsafe extern "C" fn C_DestroyObject(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> CK_RV {
    rv((|| {
        let mut s = initialized()?;
        s.session(session)?;
        if !s.objects.remove(&object) {
            return Err(CKR_OBJECT_HANDLE_INVALID);
        }
        Ok(())
    })())
}

/// CKA_ID is the handle this call received (8 bytes, big-endian); CKA_CLASS is CKO_SECRET_KEY.
unsafe extern "C" fn C_GetAttributeValue(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    p_template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    rv((|| {
        let mut s = initialized()?;
        s.session(session)?;
        if !s.objects.contains(&object) {
            return Err(CKR_OBJECT_HANDLE_INVALID);
        }
        if p_template.is_null() && count != 0 {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let mut result = Ok(());
        for i in 0..count as usize {
            // SAFETY: the caller passes `count` attributes.
            let attr = unsafe { &mut *p_template.add(i) };
            let value = match attr.type_ {
                CKA_ID => object.to_be_bytes().to_vec(),
                CKA_CLASS => CKO_SECRET_KEY.to_ne_bytes().to_vec(),
                _ => {
                    attr.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    result = Err(CKR_ATTRIBUTE_TYPE_INVALID);
                    continue;
                }
            };
            if attr.pValue.is_null() {
                attr.ulValueLen = value.len() as CK_ULONG;
            } else if (attr.ulValueLen as usize) < value.len() {
                attr.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                result = Err(CKR_BUFFER_TOO_SMALL);
            } else {
                // SAFETY: the caller passes ulValueLen >= value.len() writable bytes at pValue.
                unsafe { std::ptr::copy_nonoverlapping(value.as_ptr(), attr.pValue as *mut u8, value.len()) };
                attr.ulValueLen = value.len() as CK_ULONG;
            }
        }
        result
    })())
}

/// Finds every object, whatever the template.
unsafe extern "C" fn C_FindObjectsInit(
    session: CK_SESSION_HANDLE,
    _template: *mut CK_ATTRIBUTE,
    _count: CK_ULONG,
) -> CK_RV {
    rv((|| {
        let mut s = initialized()?;
        let found: Vec<_> = s.objects.iter().copied().collect();
        let x = s.session(session)?;
        if x.find.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        x.find = Some(found);
        Ok(())
    })())
}

unsafe extern "C" fn C_FindObjects(
    session: CK_SESSION_HANDLE,
    p_objects: *mut CK_OBJECT_HANDLE,
    max: CK_ULONG,
    p_count: *mut CK_ULONG,
) -> CK_RV {
    rv((|| {
        let mut s = initialized()?;
        let pending = s.session(session)?.find.as_mut().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        if p_objects.is_null() || p_count.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let n = pending.len().min(max as usize);
        // SAFETY: the caller passes room for `max` >= n handles and a valid count pointer.
        unsafe {
            std::ptr::copy_nonoverlapping(pending.as_ptr(), p_objects, n);
            *p_count = n as CK_ULONG;
        }
        pending.drain(..n);
        Ok(())
    })())
}

unsafe extern "C" fn C_FindObjectsFinal(session: CK_SESSION_HANDLE) -> CK_RV {
    rv((|| {
        initialized()?.session(session)?.find.take().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        Ok(())
    })())
}

// ---------------------------------------------------------------------------------------------------------
// Interfaces (PKCS#11 3.0 §5.2)

/// The interfaces this module offers, the default first. Shared, never written.
struct Interfaces([CK_INTERFACE; 2]);
// SAFETY: the pointers are to static, immutable data (the name and the function lists).
unsafe impl Sync for Interfaces {}

static INTERFACES: Interfaces = Interfaces([
    CK_INTERFACE {
        pInterfaceName: c"PKCS 11".as_ptr() as *mut CK_UTF8CHAR,
        pFunctionList: &LIST_3_0 as *const CK_FUNCTION_LIST_3_0 as *mut c_void,
        flags: 0,
    },
    CK_INTERFACE {
        pInterfaceName: c"PKCS 11".as_ptr() as *mut CK_UTF8CHAR,
        pFunctionList: &LIST_2_40 as *const CK_FUNCTION_LIST as *mut c_void,
        flags: 0,
    },
]);

/// # Safety
/// `p_count` is NULL or a valid CK_ULONG; `p_list` is NULL or has room for `*p_count` interfaces.
#[no_mangle]
pub unsafe extern "C" fn C_GetInterfaceList(p_list: *mut CK_INTERFACE, p_count: *mut CK_ULONG) -> CK_RV {
    // SAFETY: the caller follows the length protocol.
    rv(unsafe { write_array(&INTERFACES.0, p_list, p_count) })
}

/// # Safety
/// `p_name` is NULL or NUL-terminated; `p_version` is NULL or a CK_VERSION; `pp_interface` is NULL or valid
/// for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn C_GetInterface(
    p_name: *mut CK_UTF8CHAR,
    p_version: *mut CK_VERSION,
    pp_interface: *mut *mut CK_INTERFACE,
    flags: CK_FLAGS,
) -> CK_RV {
    if pp_interface.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: the caller passes NULL or a NUL-terminated name.
    let name = (!p_name.is_null()).then(|| unsafe { std::ffi::CStr::from_ptr(p_name as *const std::ffi::c_char) });
    // SAFETY: the caller passes NULL or a CK_VERSION.
    let version = unsafe { p_version.as_ref() };
    let found = INTERFACES.0.iter().find(|i| {
        // SAFETY: every pFunctionList above starts with its CK_VERSION.
        let v = unsafe { *(i.pFunctionList as *const CK_VERSION) };
        name.is_none_or(|n| n.to_bytes() == b"PKCS 11")
            && version.is_none_or(|w| (w.major, w.minor) == (v.major, v.minor))
            && i.flags & flags == flags
    });
    match found {
        Some(i) => {
            // SAFETY: checked non-NULL; the interface is static and never written through the pointer.
            unsafe { *pp_interface = i as *const CK_INTERFACE as *mut CK_INTERFACE };
            CKR_OK
        }
        None => CKR_ARGUMENTS_BAD,
    }
}

// ---------------------------------------------------------------------------------------------------------
// The function lists

/// A "function not supported" entry for a function-list slot of any signature.
trait Unsupported {
    const STUB: Self;
}

macro_rules! unsupported {
    ($($name:ident($($arg:ident),*);)*) => {$(
        unsafe extern "C" fn $name<$($arg),*>($(_: $arg),*) -> CK_RV {
            CKR_FUNCTION_NOT_SUPPORTED
        }
        impl<$($arg),*> Unsupported for Option<unsafe extern "C" fn($($arg),*) -> CK_RV> {
            const STUB: Self = Some($name::<$($arg),*>);
        }
    )*};
}

unsupported! {
    unsupported1(A);
    unsupported2(A, B);
    unsupported3(A, B, C);
    unsupported4(A, B, C, D);
    unsupported5(A, B, C, D, E);
    unsupported6(A, B, C, D, E, F);
    unsupported7(A, B, C, D, E, F, G);
    unsupported8(A, B, C, D, E, F, G, H);
    unsupported9(A, B, C, D, E, F, G, H, I);
}

/// The 2.40 list and the 3.0 list, which repeats the 2.40 entries and adds the 3.0 ones.
macro_rules! function_lists {
    (
        implemented: [$($i:ident),* $(,)?],
        unsupported: [$($u:ident),* $(,)?],
        implemented_3_0: [$($i3:ident),* $(,)?],
        unsupported_3_0: [$($u3:ident),* $(,)?] $(,)?
    ) => {
        static LIST_2_40: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
            version: CK_VERSION { major: 2, minor: 40 },
            $($i: Some($i),)*
            $($u: Unsupported::STUB,)*
        };
        static LIST_3_0: CK_FUNCTION_LIST_3_0 = CK_FUNCTION_LIST_3_0 {
            version: CK_VERSION { major: 3, minor: 0 },
            $($i: Some($i),)*
            $($u: Unsupported::STUB,)*
            $($i3: Some($i3),)*
            $($u3: Unsupported::STUB,)*
        };
    };
}

function_lists! {
    implemented: [
        C_Initialize, C_Finalize, C_GetInfo, C_GetFunctionList, C_GetSlotList, C_GetSlotInfo, C_GetTokenInfo,
        C_OpenSession, C_CloseSession, C_CloseAllSessions, C_GetSessionInfo, C_GenerateKey, C_DestroyObject,
        C_GetAttributeValue, C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal,
    ],
    unsupported: [
        C_GetMechanismList, C_GetMechanismInfo, C_InitToken, C_InitPIN, C_SetPIN, C_GetOperationState,
        C_SetOperationState, C_Login, C_Logout, C_CreateObject, C_CopyObject, C_GetObjectSize,
        C_SetAttributeValue, C_EncryptInit, C_Encrypt, C_EncryptUpdate, C_EncryptFinal, C_DecryptInit,
        C_Decrypt, C_DecryptUpdate, C_DecryptFinal, C_DigestInit, C_Digest, C_DigestUpdate, C_DigestKey,
        C_DigestFinal, C_SignInit, C_Sign, C_SignUpdate, C_SignFinal, C_SignRecoverInit, C_SignRecover,
        C_VerifyInit, C_Verify, C_VerifyUpdate, C_VerifyFinal, C_VerifyRecoverInit, C_VerifyRecover,
        C_DigestEncryptUpdate, C_DecryptDigestUpdate, C_SignEncryptUpdate, C_DecryptVerifyUpdate,
        C_GenerateKeyPair, C_WrapKey, C_UnwrapKey, C_DeriveKey, C_SeedRandom, C_GenerateRandom,
        C_GetFunctionStatus, C_CancelFunction, C_WaitForSlotEvent,
    ],
    implemented_3_0: [C_GetInterfaceList, C_GetInterface, C_LoginUser, C_SessionCancel],
    unsupported_3_0: [
        C_MessageEncryptInit, C_EncryptMessage, C_EncryptMessageBegin, C_EncryptMessageNext,
        C_MessageEncryptFinal, C_MessageDecryptInit, C_DecryptMessage, C_DecryptMessageBegin,
        C_DecryptMessageNext, C_MessageDecryptFinal, C_MessageSignInit, C_SignMessage, C_SignMessageBegin,
        C_SignMessageNext, C_MessageSignFinal, C_MessageVerifyInit, C_VerifyMessage, C_VerifyMessageBegin,
        C_VerifyMessageNext, C_MessageVerifyFinal,
    ],
}
