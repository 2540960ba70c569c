//! Calling a PKCS#11 module from the benches: its 2.40 function list, loaded once and never unloaded, and
//! the calls every bench makes (initialize, find a token's slot, open a session, log in with the bench's
//! `USER_PIN`), and where SoftHSM2's module is. Included by the benches with
//! `#[macro_use] #[path = "common/api.rs"] mod api;`.
#![allow(dead_code, unused_macros)]

use cryptoki_sys::*;
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::ptr::null_mut;

/// One module's 2.40 function list (SoftHSM2's own, or the shim's).
#[derive(Clone, Copy)]
pub struct Api {
    pub f: &'static CK_FUNCTION_LIST,
}

macro_rules! call {
    ($api:expr, $f:ident ( $($arg:expr),* $(,)? )) => {{
        let f = $api.f.$f.expect(concat!(stringify!($f), " is NULL"));
        // SAFETY: every call site passes arguments valid for the call.
        unsafe { f($($arg),*) }
    }};
}

pub fn ok(rv: CK_RV, what: &str) {
    if rv != CKR_OK {
        failed(rv, what);
    }
}

#[cold]
#[inline(never)]
fn failed(rv: CK_RV, what: &str) -> ! {
    panic!("{what} failed: CK_RV {rv:#x}");
}

/// Loads a module with RTLD_NOW|RTLD_LOCAL, never to be unloaded, and returns its 2.40 function list.
pub fn load(path: &Path) -> Api {
    // SAFETY: loading a PKCS#11 module runs its initializers, which is what it is made for.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
    type GetFunctionList = unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV;
    // SAFETY: the PKCS#11 signature of C_GetFunctionList.
    let get = *unsafe { lib.get::<GetFunctionList>(b"C_GetFunctionList\0") }.expect("C_GetFunctionList");
    let mut list = null_mut();
    // SAFETY: valid out pointer.
    ok(unsafe { get(&mut list) }, "C_GetFunctionList");
    std::mem::forget(lib);
    // SAFETY: the list is static in the module, which stays loaded.
    Api { f: unsafe { &*list } }
}

pub fn attr<T: ?Sized>(type_: CK_ATTRIBUTE_TYPE, value: &T) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_,
        pValue: value as *const T as *const c_void as *mut c_void,
        ulValueLen: std::mem::size_of_val(value) as CK_ULONG,
    }
}

pub const YES: CK_BBOOL = CK_TRUE;
pub const NO: CK_BBOOL = CK_FALSE;

impl Api {
    pub fn initialize(self, what: &str) {
        let mut args = CK_C_INITIALIZE_ARGS {
            CreateMutex: None,
            DestroyMutex: None,
            LockMutex: None,
            UnlockMutex: None,
            flags: CKF_OS_LOCKING_OK,
            pReserved: null_mut(),
        };
        ok(call!(self, C_Initialize(&mut args as *mut _ as *mut c_void)), what);
    }

    /// The slot whose token is labelled `label`.
    pub fn slot(self, label: &str) -> CK_SLOT_ID {
        let mut n: CK_ULONG = 0;
        ok(call!(self, C_GetSlotList(CK_TRUE, null_mut(), &mut n)), "C_GetSlotList");
        let mut list = vec![0; n as usize];
        ok(call!(self, C_GetSlotList(CK_TRUE, list.as_mut_ptr(), &mut n)), "C_GetSlotList");
        let mut want = [b' '; 32];
        want[..label.len()].copy_from_slice(label.as_bytes());
        list.into_iter()
            .take(n as usize)
            .find(|&slot| {
                // SAFETY: plain data.
                let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
                call!(self, C_GetTokenInfo(slot, &mut info)) == CKR_OK && info.label == want
            })
            .unwrap_or_else(|| panic!("no token labelled {label:?}"))
    }

    pub fn open(self, slot: CK_SLOT_ID) -> CK_SESSION_HANDLE {
        let mut s = 0;
        ok(
            call!(self, C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, null_mut(), None, &mut s)),
            "C_OpenSession",
        );
        s
    }

    pub fn login(self, s: CK_SESSION_HANDLE) {
        let pin = crate::USER_PIN.as_bytes().as_ptr() as *mut u8;
        ok(call!(self, C_Login(s, CKU_USER, pin, crate::USER_PIN.len() as CK_ULONG)), "C_Login");
    }

    pub fn logout(self, s: CK_SESSION_HANDLE) {
        ok(call!(self, C_Logout(s)), "C_Logout");
    }
}

/// SoftHSM2's module: SOFTHSM2_MODULE, else the first of its usual places that exists.
pub fn softhsm_path() -> PathBuf {
    [
        std::env::var_os("SOFTHSM2_MODULE").map(PathBuf::from),
        Some("/usr/lib/softhsm/libsofthsm2.so".into()),
        Some("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so".into()),
        Some("/usr/local/lib/softhsm/libsofthsm2.so".into()),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.exists())
    .expect("libsofthsm2.so not found (apt-get install softhsm2, or set SOFTHSM2_MODULE)")
}
