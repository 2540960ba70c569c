//! C_Initialize, C_Finalize and C_GetInfo (PKCS#11 2.40 §5.4 "General-purpose functions").
//!
//! While the library is initialized, [`ACTIVE`] points at the backend: the only thing a forwarded call reads
//! before calling the backend (one atomic load, no lock).

use super::{args, guard};
use crate::backend::{self, Backend};
use crate::config::Config;
use crate::{log, objects, sessions};
use cryptoki_sys::*;
use std::ffi::c_void;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Mutex;

static ACTIVE: AtomicPtr<Backend> = AtomicPtr::new(std::ptr::null_mut());

/// What C_Initialize established, for C_Finalize and for fork detection.
struct Initialized {
    pid: u32,
    /// False when the backend was already initialized by someone else in this process (it answered
    /// CKR_CRYPTOKI_ALREADY_INITIALIZED): then C_Finalize leaves it initialized.
    owns_backend: bool,
    /// The configuration this process resolved: a child forked while the library is initialized uses it as it
    /// is (servers such as nginx clear their workers' environment, and may drop the rights to read the file).
    config: Config,
}

/// What a forked child takes over from its parent's initialization.
struct Parent {
    config: Config,
    owned_backend: bool,
    /// The backend objects and sessions the parent's shim owned.
    objects: Vec<CK_OBJECT_HANDLE>,
    sessions: Vec<(CK_SESSION_HANDLE, CK_SLOT_ID)>,
}

/// Serializes C_Initialize and C_Finalize only; never taken on any other call.
static LIFECYCLE: Mutex<Option<Initialized>> = Mutex::new(None);

/// The backend, or CKR_CRYPTOKI_NOT_INITIALIZED.
#[inline(always)]
pub(crate) fn active() -> Result<&'static Backend, CK_RV> {
    // SAFETY: ACTIVE is NULL or points at the leaked backend, which is never freed.
    unsafe { ACTIVE.load(Ordering::Acquire).as_ref() }.ok_or(CKR_CRYPTOKI_NOT_INITIALIZED)
}

/// The arguments the backend gets, from the application's, checked as PKCS#11 2.40 §5.4 says. The
/// application's mutex callbacks and CKF_LIBRARY_CANT_CREATE_OS_THREADS are passed on; CKF_OS_LOCKING_OK is
/// always added, because the shim may call the backend from several threads (SoftHSM2 turns its locking
/// off without it). A backend that cannot lock as asked answers CKR_CANT_LOCK, which the application gets.
/// The shim's own locks guard a few instructions each, never across a backend call or a callback.
fn backend_init_args(args: Option<CK_C_INITIALIZE_ARGS>) -> Result<CK_C_INITIALIZE_ARGS, CK_RV> {
    let mut passed = CK_C_INITIALIZE_ARGS { flags: CKF_OS_LOCKING_OK, ..Default::default() };
    let Some(a) = args else { return Ok(passed) };
    if !a.pReserved.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    let given = [a.CreateMutex.is_some(), a.DestroyMutex.is_some(), a.LockMutex.is_some(), a.UnlockMutex.is_some()];
    match given.iter().filter(|g| **g).count() {
        0 => {}
        4 => {
            passed.CreateMutex = a.CreateMutex;
            passed.DestroyMutex = a.DestroyMutex;
            passed.LockMutex = a.LockMutex;
            passed.UnlockMutex = a.UnlockMutex;
        }
        _ => return Err(CKR_ARGUMENTS_BAD),
    }
    passed.flags |= a.flags & CKF_LIBRARY_CANT_CREATE_OS_THREADS;
    Ok(passed)
}

/// C_Initialize (§5.4): reads the configuration, loads the backend once and initializes it.
pub(crate) unsafe extern "C" fn C_Initialize(p_init_args: *mut c_void) -> CK_RV {
    guard("C_Initialize", || {
        // SAFETY: the application passes NULL or a CK_C_INITIALIZE_ARGS.
        initialize(unsafe { args::init_args(p_init_args) })
    })
}

fn initialize(app_args: Option<CK_C_INITIALIZE_ARGS>) -> Result<CK_RV, CK_RV> {
    let mut state = LIFECYCLE.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    let inherited = match state.as_ref() {
        Some(s) if s.pid == pid => return Err(CKR_CRYPTOKI_ALREADY_INITIALIZED),
        // A forked child: what the parent set up is not ours. Start afresh (no work was done at fork time),
        // with the parent's configuration and its log (the descriptor is inherited).
        Some(s) => {
            let parent = Parent {
                config: s.config.clone(),
                owned_backend: s.owns_backend,
                objects: objects::owned_handles(),
                sessions: sessions::internal_sessions(),
            };
            forget_state(&mut state, true);
            Some(parent)
        }
        None => None,
    };
    crate::forks::register();
    let backend_args = backend_init_args(app_args)?;
    let config = match &inherited {
        Some(parent) => parent.config.clone(),
        None => {
            let (config, ignored) = Config::from_env_noting().map_err(|e| setup_failed(&e))?;
            if let Err(e) = log::configure(config.log_file.as_deref(), config.log_level) {
                let file = config.log_file.as_deref().unwrap_or(std::path::Path::new("")).display().to_string();
                log::fatal(format_args!(
                    "configuration file {}: cannot open log_file {file}: {e}",
                    config.source.display()
                ));
                return Err(CKR_GENERAL_ERROR);
            }
            if !ignored.is_empty() {
                crate::warn!("{ignored}");
            }
            config
        }
    };
    let backend = backend::load(&config).map_err(|e| setup_failed(&e))?;
    // The lifecycle lock is held across the backend's C_Initialize on purpose: two racing C_Initialize calls
    // must not both initialize it. No other call takes this lock.
    let owns_backend = match (backend.initialize(backend_args), &inherited) {
        (CKR_OK, _) => true,
        // A forked child whose backend kept the parent's state across fork (SoftHSM2 does): it is this
        // process's copy of what the parent had, finalized as the parent would have. The parent's objects
        // and sessions of the shim's are in it too: they stay the shim's, never the application's to name.
        (CKR_CRYPTOKI_ALREADY_INITIALIZED, Some(parent)) => {
            crate::debug!(
                "backend {} kept its initialization across fork (CKR_CRYPTOKI_ALREADY_INITIALIZED in this child): {} objects and {} sessions of the parent's stay the shim's",
                backend.path.display(),
                parent.objects.len(),
                parent.sessions.len()
            );
            for &h in &parent.objects {
                objects::own(h);
            }
            for &(session, slot) in &parent.sessions {
                sessions::opened_internal(session, slot);
            }
            parent.owned_backend
        }
        (CKR_CRYPTOKI_ALREADY_INITIALIZED, None) => {
            crate::info!(
                "backend {} was already initialized in this process; p11shim will not finalize it",
                backend.path.display()
            );
            false
        }
        (rv, _) => {
            crate::error!("backend {}: C_Initialize returned {}", backend.path.display(), crate::error::rv_name(rv));
            return Err(rv);
        }
    };
    crate::vault::start(backend, &config);
    crate::info!("initialized over {} (config {})", backend.path.display(), config.source.display());
    let check = (inherited.is_none() && !config.slots.is_empty()).then(|| config.clone());
    *state = Some(Initialized { pid, owns_backend, config });
    ACTIVE.store(backend as *const Backend as *mut Backend, Ordering::Release);
    drop(state);
    if let Some(config) = check {
        warn_missing_slots(backend, &config);
    }
    Ok(CKR_OK)
}

/// A `[[slot]]` whose token the backend does not have is not an error here (a token may be initialized or
/// plugged in later, and the application must start), but the operator must not miss it: one WARN line
/// per slot, and `p11shim status` shows it as a problem. Called without the lifecycle lock.
fn warn_missing_slots(backend: &'static Backend, config: &Config) {
    let present = match crate::admin::tokens(backend) {
        Ok(present) => present,
        Err(e) => return crate::warn!("cannot list the backend's tokens to check the [[slot]]s: {e}"),
    };
    for missing in crate::admin::missing_slots(config, backend, &present) {
        crate::warn!(
            "configuration file {}: {missing}: the slot is pass-through until a token with this label appears; keys made there go into the HSM, not into the key store",
            config.source.display()
        );
    }
}

fn setup_failed(error: &crate::error::Error) -> CK_RV {
    log::fatal(format_args!("C_Initialize failed: {error}"));
    error.rv()
}

/// `forked`: in a child after fork, whose inherited connections and handles are the parent's.
fn forget_state(state: &mut Option<Initialized>, forked: bool) {
    ACTIVE.store(std::ptr::null_mut(), Ordering::Release);
    crate::vault::stop(forked);
    crate::auth::session::clear();
    sessions::clear();
    objects::clear();
    *state = None;
}

/// C_Finalize (§5.4).
pub(crate) unsafe extern "C" fn C_Finalize(p_reserved: *mut c_void) -> CK_RV {
    guard("C_Finalize", || {
        let mut state = LIFECYCLE.lock().unwrap_or_else(|e| e.into_inner());
        let backend = active()?;
        if !p_reserved.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let owns = match state.as_ref() {
            Some(s) if s.pid == std::process::id() => s.owns_backend,
            _ => return Err(CKR_CRYPTOKI_NOT_INITIALIZED),
        };
        if owns {
            let rv = backend.finalize();
            if rv != CKR_OK {
                return Ok(rv);
            }
        }
        forget_state(&mut state, false);
        crate::info!("finalized");
        Ok(CKR_OK)
    })
}

/// C_GetInfo (§5.4): the shim's identity and version, naming the backend; the rest is the backend's.
pub(crate) unsafe extern "C" fn C_GetInfo(p_info: *mut CK_INFO) -> CK_RV {
    guard("C_GetInfo", || {
        let backend = active()?;
        if p_info.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let mut info = backend.info().map_err(|e| e.rv())?;
        let backend_name = args::unpad(&info.manufacturerID);
        args::pad_into(&mut info.manufacturerID, "p11shim");
        args::pad_into(&mut info.libraryDescription, &format!("p11shim/{backend_name}"));
        info.libraryVersion = CK_VERSION { major: crate::VERSION_MAJOR, minor: crate::VERSION_MINOR };
        // SAFETY: checked non-NULL above; the application passes room for a CK_INFO.
        unsafe { args::write_out(p_info, info) }?;
        Ok(CKR_OK)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" fn create(_: *mut *mut c_void) -> CK_RV {
        CKR_OK
    }
    unsafe extern "C" fn other(_: *mut c_void) -> CK_RV {
        CKR_OK
    }

    fn args(callbacks: usize, flags: CK_FLAGS) -> CK_C_INITIALIZE_ARGS {
        CK_C_INITIALIZE_ARGS {
            CreateMutex: (callbacks > 0).then_some(create as _),
            DestroyMutex: (callbacks > 1).then_some(other as _),
            LockMutex: (callbacks > 2).then_some(other as _),
            UnlockMutex: (callbacks > 3).then_some(other as _),
            flags,
            pReserved: std::ptr::null_mut(),
        }
    }

    fn flags(args: Option<CK_C_INITIALIZE_ARGS>) -> Result<CK_FLAGS, CK_RV> {
        backend_init_args(args).map(|a| a.flags)
    }

    #[test]
    fn locking_requests_follow_the_spec() {
        assert_eq!(flags(None), Ok(CKF_OS_LOCKING_OK));
        assert_eq!(flags(Some(args(0, 0))), Ok(CKF_OS_LOCKING_OK));
        assert_eq!(flags(Some(args(0, CKF_OS_LOCKING_OK))), Ok(CKF_OS_LOCKING_OK));
        assert_eq!(flags(Some(args(2, CKF_OS_LOCKING_OK))), Err(CKR_ARGUMENTS_BAD));
        assert_eq!(flags(Some(args(1, 0))), Err(CKR_ARGUMENTS_BAD));
        let callbacks_only = backend_init_args(Some(args(4, 0))).unwrap();
        assert!(callbacks_only.CreateMutex.is_some() && callbacks_only.UnlockMutex.is_some(), "passed on");
        assert_eq!(callbacks_only.flags, CKF_OS_LOCKING_OK);
        assert_eq!(
            flags(Some(args(0, CKF_LIBRARY_CANT_CREATE_OS_THREADS))),
            Ok(CKF_OS_LOCKING_OK | CKF_LIBRARY_CANT_CREATE_OS_THREADS)
        );
        let mut reserved = args(0, 0);
        reserved.pReserved = std::ptr::dangling_mut::<c_void>();
        assert_eq!(flags(Some(reserved)), Err(CKR_ARGUMENTS_BAD));
    }
}
