//! Every PKCS#11 function, in one list. Functions listed under `forward!` go to the backend unchanged (with
//! object handles translated where marked); the short list of functions written by hand — the map of what
//! the shim changes — is in `FUNCTION_LIST_2_40` below: C_Initialize, C_Finalize, C_GetInfo,
//! C_GetFunctionList, C_OpenSession, C_CloseSession, C_CloseAllSessions, and for 3.0 C_GetInterfaceList,
//! C_GetInterface; and in `objects`, where stored keys and the group attribute are handled:
//! C_Login, C_Logout, C_CreateObject, C_CopyObject, C_DestroyObject, C_GetObjectSize, C_GetAttributeValue,
//! C_SetAttributeValue, C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal, C_GenerateKey,
//! C_GenerateKeyPair, C_WrapKey, C_UnwrapKey, C_DeriveKey; and C_InitToken in `token`.
//!
//! Argument marks: `#[handle(CKR_X)]` an object handle going in (a shim handle is turned into the backend's,
//! a stored key's HSM copy held loaded until the backend returns; an unknown one, or one of the shim's own
//! objects, fails with CKR_X); `#[init(CKR_X)]` the key of a C_*Init call: the same, and a stored key stays
//! loaded while it is the session's latest key of that operation (first argument: the session); `#[out]` a
//! pointer to an object handle coming out (a backend handle in the shim's range is replaced by its alias).
#![allow(non_snake_case)]

use super::exports::{C_GetFunctionList, C_GetInterface, C_GetInterfaceList};
use super::guard;
use super::lifecycle::{active, C_Finalize, C_GetInfo, C_Initialize};
use super::objects::{
    C_CopyObject, C_CreateObject, C_DeriveKey, C_DestroyObject, C_FindObjects, C_FindObjectsFinal, C_FindObjectsInit,
    C_GenerateKey, C_GenerateKeyPair, C_GetAttributeValue, C_GetObjectSize, C_Login, C_Logout, C_SetAttributeValue,
    C_UnwrapKey, C_WrapKey,
};
use super::sessions::{C_CloseAllSessions, C_CloseSession, C_OpenSession};
use super::token::C_InitToken;
use crate::objects;
use cryptoki_sys::*;
use std::ffi::c_void;

macro_rules! backend_fn {
    (f, $backend:ident, $name:ident) => {
        $backend.f.$name
    };
    (f3, $backend:ident, $name:ident) => {
        $backend.f3.as_ref().and_then(|t| t.$name)
    };
}

macro_rules! handle_in {
    ($arg:ident, $first:ident, $name:ident) => {};
    (out $arg:ident, $first:ident, $name:ident) => {};
    (handle($rv:ident) $arg:ident, $first:ident, $name:ident) => {
        // The guard lives to the end of the call: the copy is not evicted while the backend uses it.
        let ($arg, _held) = objects::hold($arg, $rv)?;
    };
    (init($rv:ident) $arg:ident, $first:ident, $name:ident) => {
        let ($arg, _held) = objects::hold($arg, $rv)?;
        if let Some(held) = &_held {
            crate::vault::pin($first, stringify!($name), held.key());
        }
    };
}

macro_rules! handle_out {
    ($arg:ident) => {};
    (handle $arg:ident) => {};
    (init $arg:ident) => {};
    (out $arg:ident) => {
        if !$arg.is_null() {
            // SAFETY: the backend returned CKR_OK, so it wrote a handle there.
            unsafe { *$arg = objects::from_backend(*$arg) };
        }
    };
}

macro_rules! forward {
    ($table:ident; $( $name:ident ( $first:ident : $fty:ty $(, $(#[$mark:ident $(($rv:ident))?])? $arg:ident : $ty:ty )* ); )*) => { $(
        /// Forwarded to the backend's function of the same name.
        pub(crate) unsafe extern "C" fn $name( $first: $fty $(, $arg: $ty )* ) -> CK_RV {
            guard(stringify!($name), || {
                let backend = active()?;
                $( handle_in!($( $mark $(($rv))? )? $arg, $first, $name); )*
                let Some(f) = backend_fn!($table, backend, $name) else {
                    return Ok(CKR_FUNCTION_NOT_SUPPORTED);
                };
                // SAFETY: the application's arguments go to the backend unchanged (object handles
                // translated above); pointer validity is the application's promise, as with the backend.
                let rv = unsafe { f( $first $(, $arg )* ) };
                if rv == CKR_OK {
                    $( handle_out!($( $mark )? $arg); )*
                }
                Ok(rv)
            })
        }
    )* };
}

forward! { f;
    C_GetSlotList(token_present: CK_BBOOL, slots: *mut CK_SLOT_ID, count: *mut CK_ULONG);
    C_GetSlotInfo(slot: CK_SLOT_ID, info: *mut CK_SLOT_INFO);
    C_GetTokenInfo(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO);
    C_GetMechanismList(slot: CK_SLOT_ID, list: *mut CK_MECHANISM_TYPE, count: *mut CK_ULONG);
    C_GetMechanismInfo(slot: CK_SLOT_ID, mechanism: CK_MECHANISM_TYPE, info: *mut CK_MECHANISM_INFO);
    C_InitPIN(s: CK_SESSION_HANDLE, pin: *mut CK_UTF8CHAR, pin_len: CK_ULONG);
    C_SetPIN(s: CK_SESSION_HANDLE, old: *mut CK_UTF8CHAR, old_len: CK_ULONG, new: *mut CK_UTF8CHAR, new_len: CK_ULONG);
    C_GetSessionInfo(s: CK_SESSION_HANDLE, info: *mut CK_SESSION_INFO);
    C_GetOperationState(s: CK_SESSION_HANDLE, state: *mut CK_BYTE, len: *mut CK_ULONG);
    C_SetOperationState(s: CK_SESSION_HANDLE, state: *mut CK_BYTE, len: CK_ULONG,
        #[handle(CKR_KEY_HANDLE_INVALID)] enc_key: CK_OBJECT_HANDLE, #[handle(CKR_KEY_HANDLE_INVALID)] auth_key: CK_OBJECT_HANDLE);
    C_EncryptInit(s: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, #[init(CKR_KEY_HANDLE_INVALID)] key: CK_OBJECT_HANDLE);
    C_Encrypt(s: CK_SESSION_HANDLE, data: *mut CK_BYTE, data_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_EncryptUpdate(s: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_EncryptFinal(s: CK_SESSION_HANDLE, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_DecryptInit(s: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, #[init(CKR_KEY_HANDLE_INVALID)] key: CK_OBJECT_HANDLE);
    C_Decrypt(s: CK_SESSION_HANDLE, data: *mut CK_BYTE, data_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_DecryptUpdate(s: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_DecryptFinal(s: CK_SESSION_HANDLE, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_DigestInit(s: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM);
    C_Digest(s: CK_SESSION_HANDLE, data: *mut CK_BYTE, data_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_DigestUpdate(s: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG);
    C_DigestKey(s: CK_SESSION_HANDLE, #[handle(CKR_KEY_HANDLE_INVALID)] key: CK_OBJECT_HANDLE);
    C_DigestFinal(s: CK_SESSION_HANDLE, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_SignInit(s: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, #[init(CKR_KEY_HANDLE_INVALID)] key: CK_OBJECT_HANDLE);
    C_Sign(s: CK_SESSION_HANDLE, data: *mut CK_BYTE, data_len: CK_ULONG, sig: *mut CK_BYTE, sig_len: *mut CK_ULONG);
    C_SignUpdate(s: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG);
    C_SignFinal(s: CK_SESSION_HANDLE, sig: *mut CK_BYTE, sig_len: *mut CK_ULONG);
    C_SignRecoverInit(s: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, #[init(CKR_KEY_HANDLE_INVALID)] key: CK_OBJECT_HANDLE);
    C_SignRecover(s: CK_SESSION_HANDLE, data: *mut CK_BYTE, data_len: CK_ULONG, sig: *mut CK_BYTE, sig_len: *mut CK_ULONG);
    C_VerifyInit(s: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, #[init(CKR_KEY_HANDLE_INVALID)] key: CK_OBJECT_HANDLE);
    C_Verify(s: CK_SESSION_HANDLE, data: *mut CK_BYTE, data_len: CK_ULONG, sig: *mut CK_BYTE, sig_len: CK_ULONG);
    C_VerifyUpdate(s: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG);
    C_VerifyFinal(s: CK_SESSION_HANDLE, sig: *mut CK_BYTE, sig_len: CK_ULONG);
    C_VerifyRecoverInit(s: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, #[init(CKR_KEY_HANDLE_INVALID)] key: CK_OBJECT_HANDLE);
    C_VerifyRecover(s: CK_SESSION_HANDLE, sig: *mut CK_BYTE, sig_len: CK_ULONG, data: *mut CK_BYTE, data_len: *mut CK_ULONG);
    C_DigestEncryptUpdate(s: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_DecryptDigestUpdate(s: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_SignEncryptUpdate(s: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_DecryptVerifyUpdate(s: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_SeedRandom(s: CK_SESSION_HANDLE, seed: *mut CK_BYTE, seed_len: CK_ULONG);
    C_GenerateRandom(s: CK_SESSION_HANDLE, out: *mut CK_BYTE, out_len: CK_ULONG);
    C_GetFunctionStatus(s: CK_SESSION_HANDLE);
    C_CancelFunction(s: CK_SESSION_HANDLE);
    C_WaitForSlotEvent(flags: CK_FLAGS, slot: *mut CK_SLOT_ID, reserved: *mut c_void);
}

forward! { f3;
    C_LoginUser(s: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: *mut CK_UTF8CHAR, pin_len: CK_ULONG,
        username: *mut CK_UTF8CHAR, username_len: CK_ULONG);
    C_SessionCancel(s: CK_SESSION_HANDLE, flags: CK_FLAGS);
    C_MessageEncryptInit(s: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, #[init(CKR_KEY_HANDLE_INVALID)] key: CK_OBJECT_HANDLE);
    C_EncryptMessage(s: CK_SESSION_HANDLE, param: *mut c_void, param_len: CK_ULONG, aad: *mut CK_BYTE, aad_len: CK_ULONG,
        plain: *mut CK_BYTE, plain_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_EncryptMessageBegin(s: CK_SESSION_HANDLE, param: *mut c_void, param_len: CK_ULONG, aad: *mut CK_BYTE, aad_len: CK_ULONG);
    C_EncryptMessageNext(s: CK_SESSION_HANDLE, param: *mut c_void, param_len: CK_ULONG, part: *mut CK_BYTE,
        part_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG, flags: CK_FLAGS);
    C_MessageEncryptFinal(s: CK_SESSION_HANDLE);
    C_MessageDecryptInit(s: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, #[init(CKR_KEY_HANDLE_INVALID)] key: CK_OBJECT_HANDLE);
    C_DecryptMessage(s: CK_SESSION_HANDLE, param: *mut c_void, param_len: CK_ULONG, aad: *mut CK_BYTE, aad_len: CK_ULONG,
        cipher: *mut CK_BYTE, cipher_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_DecryptMessageBegin(s: CK_SESSION_HANDLE, param: *mut c_void, param_len: CK_ULONG, aad: *mut CK_BYTE, aad_len: CK_ULONG);
    C_DecryptMessageNext(s: CK_SESSION_HANDLE, param: *mut c_void, param_len: CK_ULONG, part: *mut CK_BYTE,
        part_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG, flags: CK_FLAGS);
    C_MessageDecryptFinal(s: CK_SESSION_HANDLE);
    C_MessageSignInit(s: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, #[init(CKR_KEY_HANDLE_INVALID)] key: CK_OBJECT_HANDLE);
    C_SignMessage(s: CK_SESSION_HANDLE, param: *mut c_void, param_len: CK_ULONG, data: *mut CK_BYTE, data_len: CK_ULONG,
        sig: *mut CK_BYTE, sig_len: *mut CK_ULONG);
    C_SignMessageBegin(s: CK_SESSION_HANDLE, param: *mut c_void, param_len: CK_ULONG);
    C_SignMessageNext(s: CK_SESSION_HANDLE, param: *mut c_void, param_len: CK_ULONG, data: *mut CK_BYTE, data_len: CK_ULONG,
        sig: *mut CK_BYTE, sig_len: *mut CK_ULONG);
    C_MessageSignFinal(s: CK_SESSION_HANDLE);
    C_MessageVerifyInit(s: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, #[init(CKR_KEY_HANDLE_INVALID)] key: CK_OBJECT_HANDLE);
    C_VerifyMessage(s: CK_SESSION_HANDLE, param: *mut c_void, param_len: CK_ULONG, data: *mut CK_BYTE, data_len: CK_ULONG,
        sig: *mut CK_BYTE, sig_len: CK_ULONG);
    C_VerifyMessageBegin(s: CK_SESSION_HANDLE, param: *mut c_void, param_len: CK_ULONG);
    C_VerifyMessageNext(s: CK_SESSION_HANDLE, param: *mut c_void, param_len: CK_ULONG, data: *mut CK_BYTE, data_len: CK_ULONG,
        sig: *mut CK_BYTE, sig_len: CK_ULONG);
    C_MessageVerifyFinal(s: CK_SESSION_HANDLE);
}

/// Builds a function table from the names of its entries, each the function of that name in scope.
macro_rules! function_table {
    ($ty:ident { $major:literal . $minor:literal } $( $name:ident ),* $(,)?) => {
        $ty {
            version: CK_VERSION { major: $major, minor: $minor },
            $( $name: Some($name) ),*
        }
    };
}

/// The 68 functions of PKCS#11 2.40.
macro_rules! functions_2_40 {
    ($callback:ident ! ( $($prefix:tt)* ) $($extra:ident),*) => {
        $callback!( $($prefix)*
            C_Initialize, C_Finalize, C_GetInfo, C_GetFunctionList, C_GetSlotList, C_GetSlotInfo, C_GetTokenInfo,
            C_GetMechanismList, C_GetMechanismInfo, C_InitToken, C_InitPIN, C_SetPIN, C_OpenSession, C_CloseSession,
            C_CloseAllSessions, C_GetSessionInfo, C_GetOperationState, C_SetOperationState, C_Login, C_Logout,
            C_CreateObject, C_CopyObject, C_DestroyObject, C_GetObjectSize, C_GetAttributeValue, C_SetAttributeValue,
            C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal, C_EncryptInit, C_Encrypt, C_EncryptUpdate,
            C_EncryptFinal, C_DecryptInit, C_Decrypt, C_DecryptUpdate, C_DecryptFinal, C_DigestInit, C_Digest,
            C_DigestUpdate, C_DigestKey, C_DigestFinal, C_SignInit, C_Sign, C_SignUpdate, C_SignFinal,
            C_SignRecoverInit, C_SignRecover, C_VerifyInit, C_Verify, C_VerifyUpdate, C_VerifyFinal,
            C_VerifyRecoverInit, C_VerifyRecover, C_DigestEncryptUpdate, C_DecryptDigestUpdate,
            C_SignEncryptUpdate, C_DecryptVerifyUpdate, C_GenerateKey, C_GenerateKeyPair, C_WrapKey, C_UnwrapKey,
            C_DeriveKey, C_SeedRandom, C_GenerateRandom, C_GetFunctionStatus, C_CancelFunction,
            C_WaitForSlotEvent $(, $extra)*
        )
    };
}

/// The 2.40 table, offered always (C_GetFunctionList and the "PKCS 11" 2.40 interface).
pub static FUNCTION_LIST_2_40: CK_FUNCTION_LIST = functions_2_40!(function_table!(CK_FUNCTION_LIST { 2 . 40 }));

/// The 3.0 table, offered only when the backend has a 3.x interface.
pub static FUNCTION_LIST_3_0: CK_FUNCTION_LIST_3_0 = functions_2_40!(function_table!(CK_FUNCTION_LIST_3_0 { 3 . 0 })
    C_GetInterfaceList, C_GetInterface, C_LoginUser, C_SessionCancel, C_MessageEncryptInit, C_EncryptMessage,
    C_EncryptMessageBegin, C_EncryptMessageNext, C_MessageEncryptFinal, C_MessageDecryptInit, C_DecryptMessage,
    C_DecryptMessageBegin, C_DecryptMessageNext, C_MessageDecryptFinal, C_MessageSignInit, C_SignMessage,
    C_SignMessageBegin, C_SignMessageNext, C_MessageSignFinal, C_MessageVerifyInit, C_VerifyMessage,
    C_VerifyMessageBegin, C_VerifyMessageNext, C_MessageVerifyFinal);
