//! The vendor interface "P11SHIM Backup" (include/p11shim.h), obtained with
//! `C_GetInterface("P11SHIM Backup", NULL, &iface, 0)`: export, import and verify of backup files on an
//! application's logged-in session. The session's login is the authorization (the `p11shim` command's
//! users and permission masks are for operators); every call is written to the audit log with
//! "pkcs11-session" as who, and the config's mode applies (CC refuses overwrite).

use super::{guard, lifecycle::active};
use crate::admin::Token;
use crate::backup::export::{self, ExportOptions};
use crate::backup::import::{self, ImportOptions};
use crate::backup::verify;
use crate::backup::work::{Authorizer, Work};
use crate::config::Config;
use crate::error::{Error, Result};
use cryptoki_sys::*;
use std::ffi::{c_char, CStr};
use std::path::PathBuf;

/// `P11SHIM_BACKUP_FUNCTION_LIST` of include/p11shim.h.
#[repr(C)]
pub struct BackupFunctionList {
    pub version: CK_VERSION,
    pub export_group: unsafe extern "C" fn(CK_SESSION_HANDLE, *const c_char, *const c_char, *mut CK_ULONG) -> CK_RV,
    pub import_file:
        unsafe extern "C" fn(CK_SESSION_HANDLE, *const c_char, CK_FLAGS, *mut CK_ULONG, *mut CK_ULONG) -> CK_RV,
    pub verify_file: unsafe extern "C" fn(CK_SESSION_HANDLE, *const c_char, *mut CK_ULONG) -> CK_RV,
}

pub const IMPORT_OVERWRITE: CK_FLAGS = 0x1;
pub const IMPORT_DRY_RUN: CK_FLAGS = 0x2;

pub static BACKUP_FUNCTIONS: BackupFunctionList = BackupFunctionList {
    version: CK_VERSION { major: 1, minor: 0 },
    export_group: P11SHIM_ExportGroup,
    import_file: P11SHIM_ImportFile,
    verify_file: P11SHIM_VerifyFile,
};

/// The application's session is the authorization: any group.
struct SessionAuthorizer(String);

impl Authorizer for SessionAuthorizer {
    fn allow_group(&self, _group: &str) -> std::result::Result<(), String> {
        Ok(())
    }
    fn who(&self) -> String {
        self.0.clone()
    }
}

/// A C string argument, or CKR_ARGUMENTS_BAD.
///
/// # Safety
/// `p` is NULL or NUL-terminated.
unsafe fn text(p: *const c_char) -> std::result::Result<String, CK_RV> {
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-NULL and NUL-terminated (the caller's promise).
    unsafe { CStr::from_ptr(p) }.to_str().map(str::to_string).map_err(|_| CKR_ARGUMENTS_BAD)
}

/// The work context for a logged-in application session.
fn work_for(session: CK_SESSION_HANDLE) -> std::result::Result<(Config, Box<dyn crate::store::KeyStore>, Work), CK_RV> {
    let backend = active()?;
    let info = backend.session_info(session).map_err(|e| e.rv())?;
    if !matches!(info.state, CKS_RO_USER_FUNCTIONS | CKS_RW_USER_FUNCTIONS) {
        return Err(CKR_USER_NOT_LOGGED_IN);
    }
    let setup = || -> Result<_> {
        let config = Config::from_env()?;
        let store = crate::store::open(&config.store_url)?;
        let token = Token::borrowed(backend, info.slotID, session)?;
        let work = Work::borrowed(&config, token)?;
        Ok((config, store, work))
    };
    setup().map_err(|e| failed("P11SHIM backup interface", e))
}

fn failed(what: &str, e: Error) -> CK_RV {
    crate::error!("{what}: {e}");
    match e {
        Error::Rv(rv) => rv,
        Error::Store(crate::store::StoreError::Unavailable { .. }) => CKR_DEVICE_ERROR,
        _ => CKR_FUNCTION_FAILED,
    }
}

/// Exports every key whose group matches `group_regex` into the backup file `path` (which must not exist).
pub(crate) unsafe extern "C" fn P11SHIM_ExportGroup(
    session: CK_SESSION_HANDLE,
    group_regex: *const c_char,
    path: *const c_char,
    exported: *mut CK_ULONG,
) -> CK_RV {
    guard("P11SHIM_ExportGroup", || {
        // SAFETY: the application passes NUL-terminated strings.
        let (filter, out) = unsafe { (text(group_regex)?, text(path)?) };
        let (_, store, work) = work_for(session)?;
        let who = SessionAuthorizer(format!("pkcs11-session@{}", work.token.label));
        let opts = ExportOptions { filter: &filter, out: &PathBuf::from(out), replace: false };
        let report =
            export::export(store.as_ref(), &work, &who, &opts, &mut |_| {}).map_err(|e| failed("export", e))?;
        if !report.skipped.is_empty() {
            for s in &report.skipped {
                crate::warn!("export: {} was not exported: {}", s.key, s.why);
            }
        }
        if !exported.is_null() {
            // SAFETY: non-NULL; the application passes room for a CK_ULONG.
            unsafe { *exported = report.exported as CK_ULONG };
        }
        Ok(if report.skipped.is_empty() { CKR_OK } else { CKR_KEY_UNEXTRACTABLE })
    })
}

/// Restores a backup file into the session's token (all or nothing). Flags: P11SHIM_IMPORT_OVERWRITE,
/// P11SHIM_IMPORT_DRY_RUN.
pub(crate) unsafe extern "C" fn P11SHIM_ImportFile(
    session: CK_SESSION_HANDLE,
    path: *const c_char,
    flags: CK_FLAGS,
    added: *mut CK_ULONG,
    skipped: *mut CK_ULONG,
) -> CK_RV {
    guard("P11SHIM_ImportFile", || {
        // SAFETY: the application passes a NUL-terminated string.
        let file = PathBuf::from(unsafe { text(path) }?);
        if flags & !(IMPORT_OVERWRITE | IMPORT_DRY_RUN) != 0 {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let (config, store, work) = work_for(session)?;
        let who = SessionAuthorizer(format!("pkcs11-session@{}", work.token.label));
        let opts = ImportOptions {
            file: &file,
            overwrite: flags & IMPORT_OVERWRITE != 0,
            dry_run: flags & IMPORT_DRY_RUN != 0,
            mode: config.mode,
        };
        let report = import::import(store.as_ref(), &work, &who, &opts).map_err(|e| failed("import", e))?;
        // SAFETY: each is NULL or room for a CK_ULONG.
        unsafe {
            if !added.is_null() {
                *added = (report.added.len() + report.overwritten.len()) as CK_ULONG;
            }
            if !skipped.is_null() {
                *skipped = report.skipped.len() as CK_ULONG;
            }
        }
        Ok(CKR_OK)
    })
}

/// Checks a backup file completely (MACs, MBK, every secret unwraps here) without changing anything.
pub(crate) unsafe extern "C" fn P11SHIM_VerifyFile(
    session: CK_SESSION_HANDLE,
    path: *const c_char,
    records: *mut CK_ULONG,
) -> CK_RV {
    guard("P11SHIM_VerifyFile", || {
        // SAFETY: the application passes a NUL-terminated string.
        let file = PathBuf::from(unsafe { text(path) }?);
        let (_, store, work) = work_for(session)?;
        let who = SessionAuthorizer(format!("pkcs11-session@{}", work.token.label));
        let report = verify::verify(store.as_ref(), &work, &who, &file).map_err(|e| failed("verify", e))?;
        if !records.is_null() {
            // SAFETY: non-NULL; room for a CK_ULONG.
            unsafe { *records = report.records as CK_ULONG };
        }
        Ok(CKR_OK)
    })
}
