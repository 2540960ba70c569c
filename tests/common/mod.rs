//! Shared support for the integration tests: where the shim and its backend are, a fresh backend directory
//! per test binary, the process-wide cryptoki context for the shim, and fresh tokens.
//!
//! **Backends.** The shim's integration tests run against two backends ([`Backend`]): SoftHSM2 and the
//! CryptoServer simulator (`libcssim.so`, simulator/). A process can load only one backend through the shim,
//! so each suite is one set of cases (`tests/<suite>_cases/mod.rs`) compiled into two test binaries:
//! `tests/<suite>.rs` against SoftHSM2 and `tests/<suite>_cssim.rs` against the simulator. The backend of a
//! binary is chosen by its name ([`backend`]): a name ending in `_cssim` means the simulator, any other
//! SoftHSM2 (the default, so every other test binary keeps running against SoftHSM2).
//!
//! Every test binary gets `<target>/test-tokens/<binary>/` (wiped at first use) with its own backend
//! configuration (`softhsm2.conf` and a token directory, or `cssim.toml` with [`SIM_SLOTS`] empty slots and
//! its state file), so binaries never see each other's tokens. The environment is set once, before any
//! module is loaded: `P11SHIM_MODULE` names the backend, `SOFTHSM2_CONF` or `CSSIM_CONFIG` its configuration
//! (child processes inherit both), `P11SHIM_CONFIG` and `CSSIM_FAULTS` are removed.
//!
//! A backend loaded directly and through the shim in one process is one instance (one dlopen handle): both
//! see the same tokens, sessions and object handles, and it can be initialized only once.
#![allow(dead_code)] // each test binary uses its own part of this module

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use cryptoki_sys::{CK_FUNCTION_LIST, CK_RV};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once, OnceLock};

pub mod pg;
pub mod sealer;

/// The SO PIN of every token made by [`new_token`].
pub const SO_PIN: &str = "so-pin-1234";
/// The user PIN of every token made by [`new_token`].
pub const USER_PIN: &str = "user-pin-1234";
/// SoftHSM2, the default backend the shim forwards to.
pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// How many slots the simulator offers in [`setup`]'s configuration (all empty until C_InitToken): enough
/// for the tokens of the biggest test binary (the stored-key suites make 41).
pub const SIM_SLOTS: usize = 48;
/// The suffix of the test binaries that run against the simulator.
pub const SIM_SUFFIX: &str = "_cssim";

/// The module behind the shim in a test binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SoftHSM2 2.6 (Debian's libsofthsm2.so).
    SoftHsm2,
    /// The CryptoServer simulator, libcssim.so of this workspace.
    Simulator,
}

impl Backend {
    /// The manufacturerID the backend reports in C_GetInfo (the shim reports `p11shim/<this>`, truncated
    /// to 32 bytes).
    pub fn manufacturer(self) -> &'static str {
        match self {
            Backend::SoftHsm2 => "SoftHSM",
            Backend::Simulator => "Utimaco IS GmbH (simulated)",
        }
    }

    /// The library description the shim reports for this backend, unpadded.
    pub fn shim_description(self) -> String {
        let mut d = format!("p11shim/{}", self.manufacturer());
        d.truncate(32);
        d
    }

    /// The module's path.
    pub fn path(self) -> PathBuf {
        match self {
            Backend::SoftHsm2 => softhsm_path(),
            Backend::Simulator => cssim_path(),
        }
    }
}

/// This test binary's backend: the simulator when its name ends in [`SIM_SUFFIX`], else SoftHSM2.
pub fn backend() -> Backend {
    if binary_name().ends_with(SIM_SUFFIX) {
        Backend::Simulator
    } else {
        Backend::SoftHsm2
    }
}

/// The module of this binary's backend (loaded through the shim, or directly for comparisons).
pub fn backend_path() -> PathBuf {
    backend().path()
}

/// `<target>/debug` (the profile directory): the test binary is `<target>/debug/deps/<name>-<hash>`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("test binary {} is not in <target>/<profile>/deps", exe.display()))
        .to_path_buf()
}

/// The name of this test binary without cargo's hash (`operations`, `differential`, …).
pub fn binary_name() -> String {
    let exe = std::env::current_exe().expect("current_exe");
    let stem = exe.file_stem().expect("binary name").to_string_lossy().into_owned();
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_string(),
        _ => stem,
    }
}

/// The shim under test: `<target>/debug/libp11shim.so`, built by `cargo test` (the lib is a cdylib).
pub fn shim_path() -> PathBuf {
    let path = profile_dir().join("libp11shim.so");
    assert!(path.exists(), "{} does not exist: build the crate (cargo build / cargo test) first", path.display());
    assert_fresh(&path);
    path
}

/// Fails when a source file is newer than the built library: `cargo test` builds the crate as an rlib for
/// the tests, not the cdylib they load, so testing would silently use an old shim.
pub fn assert_fresh(library: &Path) {
    let built = std::fs::metadata(library).and_then(|m| m.modified()).expect("library mtime");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![src];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t > built) {
                panic!(
                    "{} is newer than {}: run `cargo build --lib --examples` before `cargo test` (scripts/test.sh does)",
                    path.display(),
                    library.display()
                );
            }
        }
    }
}

/// SoftHSM2, the real module behind the shim.
pub fn softhsm_path() -> PathBuf {
    let path = PathBuf::from(SOFTHSM);
    assert!(path.exists(), "{SOFTHSM} is missing: apt-get install softhsm2");
    path
}

/// The simulator, `<target>/debug/libcssim.so`, built by `cargo build --workspace --lib`.
pub fn cssim_path() -> PathBuf {
    let path = profile_dir().join("libcssim.so");
    assert!(path.exists(), "{} does not exist: run `cargo build --workspace --lib` first", path.display());
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).expect("library mtime");
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("simulator").join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read simulator/src").flatten() {
            if entry.path().is_dir() {
                stack.push(entry.path());
            } else if entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t > built) {
                panic!(
                    "{} is newer than {}: run `cargo build --workspace --lib`",
                    entry.path().display(),
                    path.display()
                );
            }
        }
    }
    path
}

/// `<target>/test-tokens/<binary>`: this binary's backend directory (SoftHSM2 tokens or simulator state).
pub fn test_dir() -> PathBuf {
    profile_dir().parent().expect("target dir").join("test-tokens").join(binary_name())
}

/// Writes `<dir>/softhsm2.conf` with its token directory `<dir>/tokens`, empty (wiped if it existed),
/// and returns the config file's path.
pub fn fresh_softhsm_dir(dir: &Path) -> PathBuf {
    let tokens = dir.join("tokens");
    if tokens.exists() {
        std::fs::remove_dir_all(&tokens).expect("wipe token dir");
    }
    std::fs::create_dir_all(&tokens).expect("create token dir");
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokens.display()),
    )
    .expect("write softhsm2.conf");
    conf
}

/// A copy of the SoftHSM2 token directory `<from>/tokens` in `to` (wiped first), with a `softhsm2.conf` naming
/// it; returns the conf path: same tokens, same MBKs, for a second process that makes keys at once or gets
/// killed (SoftHSM2 is neither crash-safe nor safe for several processes reading token files while one writes
/// them; the key store is what such tests share).
pub fn softhsm_copy(from: &Path, to: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).expect("create the copy's folder");
    let status = std::process::Command::new("cp").arg("-r").arg(from.join("tokens")).arg(to).status().expect("cp");
    assert!(status.success(), "copy the token directory {}", from.join("tokens").display());
    let conf = to.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            to.join("tokens").display()
        ),
    )
    .expect("write softhsm2.conf");
    conf
}

/// Writes `<dir>/cssim.toml` for the simulator with `slots` empty slots (no token until C_InitToken), its
/// state file `<dir>/cssim-state.json` (wiped if it existed), a log `<dir>/cssim.log` and `extra` TOML at the
/// top level (before the slots: `mode = …`, a `[faults]` table must come last), and returns its path.
pub fn fresh_cssim_dir(dir: &Path, slots: usize, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("create simulator dir");
    for name in ["cssim-state.json", "cssim-state.json.lock", "cssim.log"] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let conf = dir.join("cssim.toml");
    let (top, faults) = match extra.find("[faults]") {
        Some(i) => extra.split_at(i),
        None => (extra, ""),
    };
    let mut text = format!("state = \"cssim-state.json\"\nlog_file = \"cssim.log\"\n{top}\n");
    text += &"[[slot]]\n".repeat(slots);
    text += faults;
    std::fs::write(&conf, text).expect("write cssim.toml");
    conf
}

/// A fresh configuration of this binary's backend in `dir` and the environment a process needs to use it
/// (directly or through the shim): `P11SHIM_MODULE` and `SOFTHSM2_CONF` or `CSSIM_CONFIG`. The simulator gets
/// `slots` empty slots; SoftHSM2 makes its own.
pub fn fresh_backend_env(dir: &Path, slots: usize) -> Vec<(&'static str, std::ffi::OsString)> {
    match backend() {
        Backend::SoftHsm2 => {
            vec![("P11SHIM_MODULE", softhsm_path().into()), ("SOFTHSM2_CONF", fresh_softhsm_dir(dir).into())]
        }
        Backend::Simulator => {
            vec![("P11SHIM_MODULE", cssim_path().into()), ("CSSIM_CONFIG", fresh_cssim_dir(dir, slots, "").into())]
        }
    }
}

/// Prepares this binary's backend directory and the environment, once. Call it before loading any module
/// ([`pkcs11`] and [`functions`] call it themselves).
pub fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let env = fresh_backend_env(&test_dir(), SIM_SLOTS);
        // Set once, before any module is loaded and before any test thread reads the environment.
        for (key, value) in env {
            std::env::set_var(key, value);
        }
        std::env::remove_var("P11SHIM_CONFIG");
        std::env::remove_var("CSSIM_FAULTS");
    });
}

/// The process-wide cryptoki context for the shim, initialized with OS locking. It is never finalized
/// or dropped: cryptoki cannot initialize one library twice in a process.
pub fn pkcs11() -> &'static Pkcs11 {
    static CONTEXT: OnceLock<Pkcs11> = OnceLock::new();
    CONTEXT.get_or_init(|| {
        setup();
        let path = shim_path();
        let p = Pkcs11::new(&path).unwrap_or_else(|e| panic!("loading {} with cryptoki: {e}", path.display()));
        p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .unwrap_or_else(|e| panic!("C_Initialize through the shim: {e}"));
        p
    })
}

/// The 2.40 function list of the module at `path` (the shim or the backend), for raw calls, after
/// [`setup`]. The library stays loaded for the life of the process. Loading the backend here and through
/// the shim gives the same instance.
pub fn functions(path: &Path) -> &'static CK_FUNCTION_LIST {
    setup();
    raw_functions(path)
}

/// [`functions`] without [`setup`]: for a process that prepared its environment itself.
pub fn raw_functions(path: &Path) -> &'static CK_FUNCTION_LIST {
    type GetFunctionList = unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV;
    // SAFETY: loading a PKCS#11 module runs its initializers, which is how such modules are meant to be used.
    let lib = unsafe { libloading::Library::new(path) }.unwrap_or_else(|e| panic!("dlopen {}: {e}", path.display()));
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: every PKCS#11 module exports C_GetFunctionList with this signature; `list` is a valid out pointer.
    let rv = unsafe {
        let get = lib
            .get::<GetFunctionList>(b"C_GetFunctionList\0")
            .unwrap_or_else(|e| panic!("{} has no C_GetFunctionList: {e}", path.display()));
        get(&mut list)
    };
    assert_eq!(rv, cryptoki_sys::CKR_OK, "C_GetFunctionList of {}", path.display());
    assert!(!list.is_null(), "C_GetFunctionList of {} gave NULL", path.display());
    // Never unload: the table lives in the library (and SoftHSM2 must never be dlclose'd).
    std::mem::forget(lib);
    // SAFETY: the table is static data of a library that is never unloaded.
    unsafe { &*list }
}

/// The name of a CK_RV, for messages (`CKR_PIN_INCORRECT`, …).
pub fn rv_name(rv: CK_RV) -> String {
    format!("{:?} (0x{rv:x})", cryptoki::error::Rv::from(rv))
}

/// Initializes a fresh token labelled `label` (unique in this binary) through the shim, sets its user
/// PIN to [`USER_PIN`] (SO PIN [`SO_PIN`]) and returns its slot. (Through the shim, a token whose label
/// names a database slot gets its MBK set from C_InitToken.)
///
/// SoftHSM2 keeps one slot with an uninitialized token and renumbers after C_InitToken; the simulator has
/// [`SIM_SLOTS`] fixed slots. Either way the token is initialized on a slot with an uninitialized token and
/// then found again by its label. Serialized by a mutex.
pub fn new_token(label: &str) -> Slot {
    make_token(label, |slot| pkcs11().init_token(slot, &AuthPin::new(SO_PIN.into()), label).map_err(|e| e.to_string()))
}

/// As [`new_token`], but C_InitToken goes to the backend directly, as an HSM vendor's tool would: the shim
/// does nothing for it (no MBK set is made).
pub fn new_token_on_backend(label: &str) -> Slot {
    make_token(label, |slot| {
        let f = functions(&backend_path());
        let mut padded = [b' '; 32];
        padded[..label.len()].copy_from_slice(label.as_bytes());
        // SAFETY: the PIN and the 32-byte label live for the call.
        let rv = unsafe {
            f.C_InitToken.expect("C_InitToken")(
                slot.id(),
                SO_PIN.as_ptr() as *mut u8,
                SO_PIN.len() as cryptoki_sys::CK_ULONG,
                padded.as_mut_ptr(),
            )
        };
        if rv == cryptoki_sys::CKR_OK {
            Ok(())
        } else {
            Err(rv_name(rv))
        }
    })
}

fn make_token(label: &str, init: impl FnOnce(Slot) -> Result<(), String>) -> Slot {
    static LOCK: Mutex<()> = Mutex::new(());
    assert!(label.len() <= 32, "token label {label:?} is longer than 32 bytes");
    let p = pkcs11();
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut empty = None;
    for slot in p.get_slots_with_token().expect("C_GetSlotList") {
        let info = p.get_token_info(slot).expect("C_GetTokenInfo");
        if !info.token_initialized() {
            empty = Some(slot);
        } else {
            assert_ne!(info.label(), label, "a token labelled {label:?} already exists");
        }
    }
    let empty = empty.unwrap_or_else(|| panic!("{:?} offers no slot with an uninitialized token", backend()));
    init(empty).unwrap_or_else(|e| panic!("C_InitToken({label}): {e}"));
    let slot = find_token(label).unwrap_or_else(|| panic!("token {label:?} not found after C_InitToken"));
    let session = p.open_rw_session(slot).expect("C_OpenSession");
    session.login(UserType::So, Some(&AuthPin::new(SO_PIN.into()))).expect("C_Login(SO)");
    session.init_pin(&AuthPin::new(USER_PIN.into())).expect("C_InitPIN");
    session.logout().expect("C_Logout");
    slot
}

/// The slot of the initialized token labelled `label`.
pub fn find_token(label: &str) -> Option<Slot> {
    let p = pkcs11();
    p.get_slots_with_initialized_token()
        .expect("C_GetSlotList")
        .into_iter()
        .find(|&s| p.get_token_info(s).map(|i| i.label() == label).unwrap_or(false))
}

/// A R/W session on `slot` logged in as the user. If the token is already logged in (another session of
/// this process did it), the session shares that state.
pub fn user_session(slot: Slot) -> Session {
    let session = pkcs11().open_rw_session(slot).expect("C_OpenSession");
    match session.login(UserType::User, Some(&AuthPin::new(USER_PIN.into()))) {
        Ok(()) => {}
        Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("C_Login(user): {e}"),
    }
    session
}
