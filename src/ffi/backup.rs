//! The vendor interface "P11SHIM Backup" 2.0 (include/p11shim.h), obtained with
//! `C_GetInterface("P11SHIM Backup", NULL, &iface, 0)`: logon and logoff of the permission model's users on
//! a PKCS#11 session (password, or an Ed25519 signature over a challenge the shim issues; logons stack as
//! with the command's `--logon`), and export, import and verify of backup files. The session must be logged
//! in as the token's user (the HSM work needs it); what it may back up, restore or verify is what its
//! p11shim logons may, checked by the same code as the `p11shim` command (the logons are the
//! [`crate::backup::work::Authorizer`]), with the same mode rules and the same audit entries. Without a logon
//! the calls answer CKR_USER_NOT_LOGGED_IN; a logon without the permission, CKR_ACTION_PROHIBITED.

use super::{guard, lifecycle::active};
use crate::admin::Token;
use crate::audit::Trail;
use crate::auth::{self, session, AuthError};
use crate::backup::export::{self, ExportOptions};
use crate::backup::import::{self, ImportOptions};
use crate::backup::verify;
use crate::backup::work::Work;
use crate::config::Config;
use crate::error::Result;
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
    pub logon: unsafe extern "C" fn(CK_SESSION_HANDLE, *const c_char, *const CK_BYTE, CK_ULONG) -> CK_RV,
    pub get_challenge: unsafe extern "C" fn(CK_SESSION_HANDLE, *const c_char, *mut CK_BYTE, *mut CK_ULONG) -> CK_RV,
    pub logon_sign: unsafe extern "C" fn(CK_SESSION_HANDLE, *const c_char, *const CK_BYTE, CK_ULONG) -> CK_RV,
    pub logoff: unsafe extern "C" fn(CK_SESSION_HANDLE, *const c_char) -> CK_RV,
}

pub const IMPORT_OVERWRITE: CK_FLAGS = 0x1;
pub const IMPORT_DRY_RUN: CK_FLAGS = 0x2;

pub static BACKUP_FUNCTIONS: BackupFunctionList = BackupFunctionList {
    version: CK_VERSION { major: 2, minor: 0 },
    export_group: P11SHIM_ExportGroup,
    import_file: P11SHIM_ImportFile,
    verify_file: P11SHIM_VerifyFile,
    logon: P11SHIM_Logon,
    get_challenge: P11SHIM_GetChallenge,
    logon_sign: P11SHIM_LogonSign,
    logoff: P11SHIM_Logoff,
};

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

/// `len` bytes at `p` (NULL with length 0 is an empty slice), or CKR_ARGUMENTS_BAD.
///
/// # Safety
/// `p` is NULL or valid for `len` bytes.
unsafe fn bytes<'a>(p: *const CK_BYTE, len: CK_ULONG) -> std::result::Result<&'a [u8], CK_RV> {
    match (p.is_null(), len) {
        (true, 0) => Ok(&[]),
        (true, _) => Err(CKR_ARGUMENTS_BAD),
        // SAFETY: the caller's promise.
        (false, _) => {
            Ok(unsafe { std::slice::from_raw_parts(p, usize::try_from(len).map_err(|_| CKR_ARGUMENTS_BAD)?) })
        }
    }
}

/// What every call works with: the config, the store, and the application's logged-in session as the work
/// token (whose MBK set's MAC key seals users and the audit trail).
struct Ctx {
    config: Config,
    store: Box<dyn crate::store::KeyStore>,
    work: Work,
}

impl Ctx {
    fn of(session: CK_SESSION_HANDLE) -> std::result::Result<Ctx, CK_RV> {
        let backend = active()?;
        let info = backend.session_info(session).map_err(|e| e.rv())?;
        if !matches!(info.state, CKS_RO_USER_FUNCTIONS | CKS_RW_USER_FUNCTIONS) {
            return Err(CKR_USER_NOT_LOGGED_IN);
        }
        let setup = || -> Result<Ctx> {
            let config = Config::from_env()?;
            let store = crate::store::open_with(&config.store_url, &config.store)?;
            let token = Token::borrowed(backend, info.slotID, session)?;
            let work = Work::borrowed(&config, token)?;
            Ok(Ctx { config, store, work })
        };
        setup().map_err(|e| failed("P11SHIM backup interface", e))
    }

    fn with_trail<R>(&self, f: impl FnOnce(&Trail) -> R) -> R {
        let sealer = self.work.sealer();
        f(&Trail::new(self.store.as_ref(), Some(&sealer), &self.config))
    }

    /// The session's logons for `action` on `subject`: without any, the refusal is audited (as the
    /// command's would be) and the answer is CKR_USER_NOT_LOGGED_IN.
    fn logged(&self, session: CK_SESSION_HANDLE, action: &str, subject: &str) -> std::result::Result<Logged, CK_RV> {
        Logged::of(session).inspect_err(|_| {
            let reason = format!("{action} denied: no p11shim user is logged on to the session (P11SHIM_Logon)");
            crate::warn!("{}", self.with_trail(|t| t.record_refusal("-", action, subject, &reason)));
        })
    }
}

fn failed(what: &str, e: impl Into<crate::backup::error::BackupError>) -> CK_RV {
    let e = e.into();
    crate::error!("{what}: {e}");
    e.rv()
}

fn auth_failed(what: &str, e: AuthError) -> CK_RV {
    crate::warn!("{what}: {e}");
    match e {
        AuthError::LogonFailed(_) => CKR_PIN_INCORRECT,
        AuthError::Throttled(_) => CKR_PIN_LOCKED,
        AuthError::Invalid(_) => CKR_ARGUMENTS_BAD,
        AuthError::Store(crate::store::StoreError::Unavailable { .. }) => CKR_DEVICE_ERROR,
        _ => CKR_FUNCTION_FAILED,
    }
}

/// The session's logons for one call that needs them: CKR_USER_NOT_LOGGED_IN when there are none. They are
/// handed back when the call ends.
struct Logged {
    session: CK_SESSION_HANDLE,
    auth: Option<session::SessionAuth>,
}

impl Logged {
    fn of(session: CK_SESSION_HANDLE) -> std::result::Result<Logged, CK_RV> {
        let auth = session::take(session);
        let empty = auth.logons.is_empty();
        let logged = Logged { session, auth: Some(auth) };
        if empty {
            return Err(CKR_USER_NOT_LOGGED_IN);
        }
        Ok(logged)
    }
    fn logons(&self) -> &auth::Logons {
        &self.auth.as_ref().expect("present until dropped").logons
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(auth) = self.auth.take() {
            session::put(self.session, auth);
        }
    }
}

/// Logs the user `name` on to the session with a password. CKR_PIN_INCORRECT for a failed logon (unknown
/// user, wrong password, a user who logs on by signature: the audit log says which), CKR_PIN_LOCKED while
/// the user is locked or must wait after failed logons, CKR_USER_ALREADY_LOGGED_IN for a second logon of
/// the same user.
pub(crate) unsafe extern "C" fn P11SHIM_Logon(
    session: CK_SESSION_HANDLE,
    name: *const c_char,
    password: *const CK_BYTE,
    password_len: CK_ULONG,
) -> CK_RV {
    guard("P11SHIM_Logon", || {
        // SAFETY: the application passes a NUL-terminated string and `password_len` bytes.
        let (name, password) = unsafe { (text(name)?, bytes(password, password_len)?) };
        let password = zeroize::Zeroizing::new(password.to_vec());
        let ctx = Ctx::of(session)?;
        let mut auth = session::take(session);
        let result = if auth.logons.is_logged_on(&name) {
            Err(CKR_USER_ALREADY_LOGGED_IN)
        } else {
            ctx.with_trail(|trail| auth.logons.logon_password(trail, &ctx.config.logon, &name, &password))
                .map_err(|e| auth_failed("P11SHIM_Logon", e))
        };
        session::put(session, auth);
        result.map(|()| CKR_OK)
    })
}

/// A fresh challenge for a signature logon of `name` on this session, with the PKCS#11 convention for
/// output buffers (NULL: the length; too small: CKR_BUFFER_TOO_SMALL). The user's Ed25519 key signs
/// exactly these bytes; P11SHIM_LogonSign takes the signature. Each challenge is usable once, for 60 s.
pub(crate) unsafe extern "C" fn P11SHIM_GetChallenge(
    session: CK_SESSION_HANDLE,
    name: *const c_char,
    challenge: *mut CK_BYTE,
    challenge_len: *mut CK_ULONG,
) -> CK_RV {
    guard("P11SHIM_GetChallenge", || {
        // SAFETY: the application passes a NUL-terminated string.
        let name = unsafe { text(name) }?;
        if challenge_len.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        auth::check_name(&name).map_err(|_| CKR_ARGUMENTS_BAD)?;
        let len = auth::challenge_len(&name);
        // SAFETY: non-NULL; room for a CK_ULONG.
        let room = unsafe { *challenge_len };
        // SAFETY: as above.
        unsafe { *challenge_len = len as CK_ULONG };
        if challenge.is_null() {
            return Ok(CKR_OK);
        }
        if (room as usize) < len {
            return Ok(CKR_BUFFER_TOO_SMALL);
        }
        Ctx::of(session)?;
        let message = auth::challenge(&name).map_err(|e| auth_failed("P11SHIM_GetChallenge", e))?;
        if message.len() != len {
            return Err(CKR_GENERAL_ERROR);
        }
        // SAFETY: the application's buffer holds `room` ≥ len bytes, and the message is len bytes.
        unsafe { std::ptr::copy_nonoverlapping(message.as_ptr(), challenge, len) };
        let mut auth = session::take(session);
        auth.issue(&name, message);
        session::put(session, auth);
        Ok(CKR_OK)
    })
}

/// Logs `name` on with an Ed25519 signature (64 bytes) over the challenge P11SHIM_GetChallenge last issued
/// to that name on this session. Without a fresh challenge: CKR_OPERATION_NOT_INITIALIZED.
pub(crate) unsafe extern "C" fn P11SHIM_LogonSign(
    session: CK_SESSION_HANDLE,
    name: *const c_char,
    signature: *const CK_BYTE,
    signature_len: CK_ULONG,
) -> CK_RV {
    guard("P11SHIM_LogonSign", || {
        // SAFETY: the application passes a NUL-terminated string and `signature_len` bytes.
        let (name, signature) = unsafe { (text(name)?, bytes(signature, signature_len)?) };
        let ctx = Ctx::of(session)?;
        let mut auth = session::take(session);
        let result = match auth.redeem(&name) {
            None => Err(CKR_OPERATION_NOT_INITIALIZED),
            Some(_) if auth.logons.is_logged_on(&name) => Err(CKR_USER_ALREADY_LOGGED_IN),
            Some(message) => ctx
                .with_trail(|trail| auth.logons.logon_signed(trail, &ctx.config.logon, &name, &message, signature))
                .map_err(|e| auth_failed("P11SHIM_LogonSign", e)),
        };
        session::put(session, auth);
        result.map(|()| CKR_OK)
    })
}

/// Logs `name` off the session (NULL: every user). CKR_USER_NOT_LOGGED_IN if that user is not logged on.
pub(crate) unsafe extern "C" fn P11SHIM_Logoff(session: CK_SESSION_HANDLE, name: *const c_char) -> CK_RV {
    guard("P11SHIM_Logoff", || {
        active()?;
        // SAFETY: the application passes NULL or a NUL-terminated string.
        let name = if name.is_null() { None } else { Some(unsafe { text(name) }?) };
        let mut auth = session::take(session);
        let result = match name {
            None => {
                auth.logons.clear();
                Ok(CKR_OK)
            }
            Some(name) if auth.logons.logoff(&name) => Ok(CKR_OK),
            Some(_) => Err(CKR_USER_NOT_LOGGED_IN),
        };
        session::put(session, auth);
        result
    })
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
        let ctx = Ctx::of(session)?;
        let logged = ctx.logged(session, "backup", &filter)?;
        let opts = ExportOptions {
            filter: &filter,
            out: &PathBuf::from(out),
            replace: false,
            stored_only: false,
            // The C interface reports the count; a caller tells an empty backup by it.
            allow_empty: true,
        };
        let report = ctx
            .with_trail(|trail| export::export(trail, &ctx.work, logged.logons(), &opts, &mut |_| {}))
            .map_err(|e| failed("export", e))?;
        for s in &report.skipped {
            crate::warn!("export: {} was not exported: {}", s.key, s.why);
        }
        for l in &report.leftovers {
            crate::warn!("export: {l}");
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
        let ctx = Ctx::of(session)?;
        let logged = ctx.logged(session, "restore", &file.display().to_string())?;
        let opts = ImportOptions {
            file: &file,
            overwrite: flags & IMPORT_OVERWRITE != 0,
            dry_run: flags & IMPORT_DRY_RUN != 0,
            mode: ctx.config.mode,
            progress: &|_, _| {},
        };
        let report = ctx
            .with_trail(|trail| import::import(trail, &ctx.work, logged.logons(), &opts))
            .map_err(|e| failed("import", e))?;
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
        let ctx = Ctx::of(session)?;
        let logged = ctx.logged(session, "verify", &file.display().to_string())?;
        let report = ctx
            .with_trail(|trail| verify::verify(trail, &ctx.work, logged.logons(), &file, &|_| {}))
            .map_err(|e| failed("verify", e))?;
        if !records.is_null() {
            // SAFETY: non-NULL; room for a CK_ULONG.
            unsafe { *records = report.records as CK_ULONG };
        }
        Ok(CKR_OK)
    })
}
