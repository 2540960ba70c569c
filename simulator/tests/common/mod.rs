//! Shared support for the simulator's integration tests: where libcssim.so (and the shim) are, a directory
//! and configuration per test, the module loaded through cryptoki with one configuration at a time, raw calls
//! for what cryptoki hides (the length-query protocol, exact return values), and external tools.
#![allow(dead_code)] // each test binary uses its own part of this module

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use cryptoki_sys::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};

pub const SO_PIN: &str = "so-pin-1234";
pub const USER_PIN: &str = "user-pin-1234";

/// `debug` or `release`: the profile this test binary was built in (`<target>/<profile>/deps/<name>`).
fn profile_and_target() -> (String, PathBuf) {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("test binary in <target>/<profile>/deps");
    let profile = profile_dir.file_name().unwrap().to_string_lossy().into_owned();
    (profile, profile_dir.parent().unwrap().to_path_buf())
}

/// The target directory: $CARGO_TARGET_DIR when set at run time, else the one this test binary is in,
/// else `<workspace>/target`.
fn target_dir() -> PathBuf {
    let (_, exe_target) = profile_and_target();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        let dir = if dir.is_relative() { workspace().join(dir) } else { dir };
        if dir.exists() {
            return dir;
        }
    }
    if exe_target.exists() {
        return exe_target;
    }
    workspace().join("target")
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A library built by cargo in this test's profile, checked to be newer than the sources it comes from.
fn built_library(name: &str, sources: &Path, build: &str) -> PathBuf {
    let (profile, _) = profile_and_target();
    let path = target_dir().join(&profile).join(name);
    assert!(path.exists(), "{} does not exist: run `{build}` first (scripts in simulator/README.md)", path.display());
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap();
    let mut stack = vec![sources.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t > built) {
                panic!("{} is newer than {}: run `{build}` before the tests", p.display(), path.display());
            }
        }
    }
    path
}

/// libcssim.so of this profile.
pub fn module_path() -> PathBuf {
    let (profile, _) = profile_and_target();
    let release = if profile == "release" { " --release" } else { "" };
    built_library(
        "libcssim.so",
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &format!("cargo build -p cssim{release}"),
    )
}

/// libp11shim.so of this profile (the shim in front of the simulator).
pub fn shim_path() -> PathBuf {
    let (profile, _) = profile_and_target();
    let release = if profile == "release" { " --release" } else { "" };
    built_library("libp11shim.so", &workspace().join("src"), &format!("cargo build -p p11shim --lib{release}"))
}

/// A fresh directory for one test: `<target>/cssim-tests/<binary>/<test>`.
pub fn test_dir(test: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let stem = exe.file_stem().unwrap().to_string_lossy().into_owned();
    let binary = stem.rsplit_once('-').map_or(stem.as_str(), |(n, _)| n).to_string();
    let dir = target_dir().join("cssim-tests").join(binary).join(test);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `<dir>/cssim.toml` (state `state.json`, log `cssim.log`, then `extra`) and returns its path.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("cssim.toml");
    std::fs::write(&path, format!("state = \"state.json\"\nlog_file = \"cssim.log\"\n{extra}")).unwrap();
    path
}

/// The two slots of most tests, slot 0 pre-initialized with the test PINs.
pub fn two_slots(mode: &str) -> String {
    format!(
        "mode = \"{mode}\"\n[[slot]]\nlabel = \"test\"\nso_pin = \"{SO_PIN}\"\nuser_pin = \"{USER_PIN}\"\n[[slot]]\n"
    )
}

pub fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("cssim.log")).unwrap_or_default()
}

/// One process holds one instance of the module, with one configuration at a time: tests that load it take
/// this lock, so they run one after the other.
static MODULE_LOCK: Mutex<()> = Mutex::new(());

/// The module loaded and initialized with a configuration; finalized when dropped.
pub struct Loaded {
    pub p11: Option<Pkcs11>,
    _guard: MutexGuard<'static, ()>,
}

impl Loaded {
    pub fn p11(&self) -> &Pkcs11 {
        self.p11.as_ref().unwrap()
    }

    /// Finalizes now (the next [`load`] of this test may use another configuration).
    pub fn finalize(mut self) {
        self.p11.take().unwrap().finalize().unwrap();
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Some(p) = self.p11.take() {
            let _ = p.finalize();
        }
    }
}

/// Loads the module with `CSSIM_CONFIG=config` and `CSSIM_FAULTS=faults` (unset when None).
pub fn load(config: &Path, faults: Option<&str>) -> Loaded {
    let guard = MODULE_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    // Under the lock: no other test of this process touches the environment or the module meanwhile.
    std::env::set_var("CSSIM_CONFIG", config);
    match faults {
        Some(f) => std::env::set_var("CSSIM_FAULTS", f),
        None => std::env::remove_var("CSSIM_FAULTS"),
    }
    let p11 = Pkcs11::new(module_path()).expect("loading libcssim.so");
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("C_Initialize");
    Loaded { p11: Some(p11), _guard: guard }
}

pub fn slot(p11: &Pkcs11, i: usize) -> Slot {
    p11.get_all_slots().unwrap()[i]
}

/// A R/W session on slot 0 logged in as the user.
pub fn user_session(p11: &Pkcs11) -> Session {
    let s = p11.open_rw_session(slot(p11, 0)).unwrap();
    s.login(UserType::User, Some(&AuthPin::new(USER_PIN.into()))).unwrap();
    s
}

/// The CK_RV of a cryptoki error (panics on other errors).
#[track_caller]
pub fn rv<T: std::fmt::Debug>(r: Result<T, Error>) -> CK_RV {
    match r {
        Err(Error::Pkcs11(e, _)) => rv_value(e),
        other => panic!("expected a PKCS#11 error, got {other:?}"),
    }
}

/// An object handle from a raw value (the tests mix raw calls and cryptoki).
pub fn oh(h: CK_OBJECT_HANDLE) -> cryptoki::object::ObjectHandle {
    // SAFETY: cryptoki calls this unsafe only because a made-up handle may not exist; the module checks.
    unsafe { cryptoki::object::ObjectHandle::new_from_raw(h) }
}

/// cryptoki has no conversion back to the number: find it.
pub fn rv_value(e: RvError) -> CK_RV {
    use cryptoki::error::Rv;
    (1..0x400).find(|v| matches!(Rv::from(*v), Rv::Error(x) if x == e)).unwrap_or_else(|| panic!("no CK_RV for {e:?}"))
}

/// The module's 2.40 function list, for raw calls (the library stays loaded by the process).
pub fn functions() -> &'static CK_FUNCTION_LIST {
    type GetFunctionList = unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV;
    // SAFETY: loading the module again gives the same instance; its initializers are harmless.
    let lib = unsafe { libloading::Library::new(module_path()) }.expect("dlopen libcssim.so");
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: C_GetFunctionList has this signature and `list` is a valid out pointer.
    let rv = unsafe { lib.get::<GetFunctionList>(b"C_GetFunctionList\0").unwrap()(&mut list) };
    assert_eq!(rv, CKR_OK);
    std::mem::forget(lib);
    // SAFETY: the table is static in the module, which is never unloaded (forgotten handle above).
    unsafe { &*list }
}

/// `name` on PATH, or a failure that says what to install.
pub fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed (apt-get install {package}); this test needs it"))
}

/// The output of one command.
#[derive(Debug, PartialEq)]
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    #[track_caller]
    pub fn ok(self) -> Out {
        assert_eq!(self.code, Some(0), "command failed:\n{}{}", self.stdout, self.stderr);
        self
    }
}

/// Runs `cmd` with the simulator configured by `config` (and the shim, if loaded, pointed at the simulator).
pub fn run(mut cmd: Command, config: &Path, faults: Option<&str>) -> Out {
    cmd.env("CSSIM_CONFIG", config)
        .env("P11SHIM_MODULE", module_path())
        .env_remove("P11SHIM_CONFIG")
        .env_remove("OPENSSL_CONF")
        .env_remove("PKCS11_MODULE_PATH");
    match faults {
        Some(f) => cmd.env("CSSIM_FAULTS", f),
        None => cmd.env_remove("CSSIM_FAULTS"),
    };
    let what = format!("{cmd:?}");
    let o = cmd.output().unwrap_or_else(|e| panic!("running {what}: {e}"));
    Out {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// `pkcs11-tool --module <module> <args>` with the simulator configured by `config`.
pub fn p11tool(module: &Path, config: &Path, args: &[&str]) -> Out {
    let mut cmd = Command::new(tool("pkcs11-tool", "opensc"));
    cmd.arg("--module").arg(module).args(args);
    run(cmd, config, None)
}

/// A raw attribute value: bytes, or an attribute array (CKA_WRAP_TEMPLATE…).
pub enum V {
    B(Vec<u8>),
    T(Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>),
}

pub fn ul(v: CK_ULONG) -> V {
    V::B(v.to_ne_bytes().to_vec())
}

pub fn bl(v: bool) -> V {
    V::B(vec![v as u8])
}

pub fn by(v: &[u8]) -> V {
    V::B(v.to_vec())
}

/// A C template whose values live as long as it does.
pub struct RawTemplate {
    pub attrs: Vec<CK_ATTRIBUTE>,
    _values: Vec<Vec<u8>>,
    _inner: Vec<Vec<CK_ATTRIBUTE>>,
}

pub fn raw_template(t: &[(CK_ATTRIBUTE_TYPE, V)]) -> RawTemplate {
    let mut values = Vec::new();
    let mut inner_arrays = Vec::new();
    let mut attrs = Vec::new();
    for (ty, v) in t {
        match v {
            V::B(b) => {
                let mut b = b.clone();
                attrs.push(CK_ATTRIBUTE { type_: *ty, pValue: b.as_mut_ptr().cast(), ulValueLen: b.len() as CK_ULONG });
                values.push(b);
            }
            V::T(inner) => {
                let mut arr = Vec::new();
                for (ity, iv) in inner {
                    let mut b = iv.clone();
                    arr.push(CK_ATTRIBUTE {
                        type_: *ity,
                        pValue: b.as_mut_ptr().cast(),
                        ulValueLen: b.len() as CK_ULONG,
                    });
                    values.push(b);
                }
                let len = arr.len() * std::mem::size_of::<CK_ATTRIBUTE>();
                attrs.push(CK_ATTRIBUTE { type_: *ty, pValue: arr.as_mut_ptr().cast(), ulValueLen: len as CK_ULONG });
                inner_arrays.push(arr);
            }
        }
    }
    RawTemplate { attrs, _values: values, _inner: inner_arrays }
}

/// Raw calls on an open session (handles from cryptoki's `Session::handle`).
pub struct Raw {
    pub f: &'static CK_FUNCTION_LIST,
}

impl Raw {
    pub fn new() -> Raw {
        Raw { f: functions() }
    }

    pub fn create(&self, h: CK_SESSION_HANDLE, t: &[(CK_ATTRIBUTE_TYPE, V)]) -> Result<CK_OBJECT_HANDLE, CK_RV> {
        let mut t = raw_template(t);
        let mut obj = 0;
        // SAFETY: a valid template and out pointer.
        let rv =
            unsafe { self.f.C_CreateObject.unwrap()(h, t.attrs.as_mut_ptr(), t.attrs.len() as CK_ULONG, &mut obj) };
        if rv == CKR_OK {
            Ok(obj)
        } else {
            Err(rv)
        }
    }

    pub fn set(&self, h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE, t: &[(CK_ATTRIBUTE_TYPE, V)]) -> CK_RV {
        let mut t = raw_template(t);
        // SAFETY: a valid template.
        unsafe { self.f.C_SetAttributeValue.unwrap()(h, obj, t.attrs.as_mut_ptr(), t.attrs.len() as CK_ULONG) }
    }

    /// One attribute with the length-query protocol: (rv, value).
    pub fn get(&self, h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE, ty: CK_ATTRIBUTE_TYPE) -> (CK_RV, Option<Vec<u8>>) {
        let mut a = CK_ATTRIBUTE { type_: ty, pValue: std::ptr::null_mut(), ulValueLen: 0 };
        // SAFETY: one attribute with a NULL value: a length query.
        let rv = unsafe { self.f.C_GetAttributeValue.unwrap()(h, obj, &mut a, 1) };
        if rv != CKR_OK {
            if [CKR_ATTRIBUTE_SENSITIVE, CKR_ATTRIBUTE_TYPE_INVALID].contains(&rv) {
                assert_eq!(a.ulValueLen, CK_UNAVAILABLE_INFORMATION, "a failed entry has CK_UNAVAILABLE_INFORMATION");
            }
            return (rv, None);
        }
        let mut buf = vec![0u8; a.ulValueLen as usize];
        a.pValue = buf.as_mut_ptr().cast();
        // SAFETY: a buffer of the length the module gave.
        let rv = unsafe { self.f.C_GetAttributeValue.unwrap()(h, obj, &mut a, 1) };
        buf.truncate(a.ulValueLen as usize);
        (rv, Some(buf))
    }

    pub fn wrap(
        &self,
        h: CK_SESSION_HANDLE,
        mech: CK_MECHANISM_TYPE,
        wrapping: CK_OBJECT_HANDLE,
        key: CK_OBJECT_HANDLE,
    ) -> Result<Vec<u8>, CK_RV> {
        let mut m = CK_MECHANISM { mechanism: mech, pParameter: std::ptr::null_mut(), ulParameterLen: 0 };
        let mut len = 0;
        // SAFETY: a length query, then a buffer of that length.
        let rv = unsafe { self.f.C_WrapKey.unwrap()(h, &mut m, wrapping, key, std::ptr::null_mut(), &mut len) };
        if rv != CKR_OK {
            return Err(rv);
        }
        let mut buf = vec![0u8; len as usize];
        // SAFETY: as above.
        let rv = unsafe { self.f.C_WrapKey.unwrap()(h, &mut m, wrapping, key, buf.as_mut_ptr(), &mut len) };
        if rv != CKR_OK {
            return Err(rv);
        }
        buf.truncate(len as usize);
        Ok(buf)
    }

    pub fn unwrap(
        &self,
        h: CK_SESSION_HANDLE,
        mech: CK_MECHANISM_TYPE,
        unwrapping: CK_OBJECT_HANDLE,
        wrapped: &[u8],
        t: &[(CK_ATTRIBUTE_TYPE, V)],
    ) -> Result<CK_OBJECT_HANDLE, CK_RV> {
        let mut m = CK_MECHANISM { mechanism: mech, pParameter: std::ptr::null_mut(), ulParameterLen: 0 };
        let mut t = raw_template(t);
        let mut wrapped = wrapped.to_vec();
        let mut obj = 0;
        // SAFETY: valid mechanism, wrapped key, template and out pointer.
        let rv = unsafe {
            self.f.C_UnwrapKey.unwrap()(
                h,
                &mut m,
                unwrapping,
                wrapped.as_mut_ptr(),
                wrapped.len() as CK_ULONG,
                t.attrs.as_mut_ptr(),
                t.attrs.len() as CK_ULONG,
                &mut obj,
            )
        };
        if rv == CKR_OK {
            Ok(obj)
        } else {
            Err(rv)
        }
    }
}

impl Default for Raw {
    fn default() -> Raw {
        Raw::new()
    }
}

/// The module initialized through raw calls only (every call is counted by the fault machinery, so tests
/// that count calls must know each one); finalized when dropped.
pub struct RawLoaded {
    pub f: &'static CK_FUNCTION_LIST,
    _guard: MutexGuard<'static, ()>,
}

impl RawLoaded {
    pub fn initialize(&self) -> CK_RV {
        let mut args = CK_C_INITIALIZE_ARGS {
            CreateMutex: None,
            DestroyMutex: None,
            LockMutex: None,
            UnlockMutex: None,
            flags: CKF_OS_LOCKING_OK,
            pReserved: std::ptr::null_mut(),
        };
        // SAFETY: valid arguments.
        unsafe { self.f.C_Initialize.unwrap()((&mut args as *mut CK_C_INITIALIZE_ARGS).cast()) }
    }

    pub fn finalize(&self) -> CK_RV {
        // SAFETY: NULL is the only valid argument.
        unsafe { self.f.C_Finalize.unwrap()(std::ptr::null_mut()) }
    }

    pub fn open(&self, slot: CK_SLOT_ID) -> Result<CK_SESSION_HANDLE, CK_RV> {
        let mut h = 0;
        // SAFETY: valid arguments.
        let rv = unsafe {
            self.f.C_OpenSession.unwrap()(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, std::ptr::null_mut(), None, &mut h)
        };
        if rv == CKR_OK {
            Ok(h)
        } else {
            Err(rv)
        }
    }

    pub fn login(&self, h: CK_SESSION_HANDLE, pin: &str) -> CK_RV {
        let mut pin = pin.as_bytes().to_vec();
        // SAFETY: valid arguments.
        unsafe { self.f.C_Login.unwrap()(h, CKU_USER, pin.as_mut_ptr(), pin.len() as CK_ULONG) }
    }

    pub fn info(&self) -> CK_RV {
        // SAFETY: a zeroed CK_INFO is a valid out buffer.
        let mut info: CK_INFO = unsafe { std::mem::zeroed() };
        // SAFETY: valid out pointer.
        unsafe { self.f.C_GetInfo.unwrap()(&mut info) }
    }

    pub fn session_state(&self, h: CK_SESSION_HANDLE) -> Result<CK_STATE, CK_RV> {
        // SAFETY: a zeroed CK_SESSION_INFO is a valid out buffer.
        let mut info: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
        // SAFETY: valid out pointer.
        let rv = unsafe { self.f.C_GetSessionInfo.unwrap()(h, &mut info) };
        if rv == CKR_OK {
            Ok(info.state)
        } else {
            Err(rv)
        }
    }

    pub fn token_info(&self, slot: CK_SLOT_ID) -> Result<CK_TOKEN_INFO, CK_RV> {
        // SAFETY: a zeroed CK_TOKEN_INFO is a valid out buffer.
        let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
        // SAFETY: valid out pointer.
        let rv = unsafe { self.f.C_GetTokenInfo.unwrap()(slot, &mut info) };
        if rv == CKR_OK {
            Ok(info)
        } else {
            Err(rv)
        }
    }

    pub fn slot_flags(&self, slot: CK_SLOT_ID) -> Result<CK_FLAGS, CK_RV> {
        // SAFETY: a zeroed CK_SLOT_INFO is a valid out buffer.
        let mut info: CK_SLOT_INFO = unsafe { std::mem::zeroed() };
        // SAFETY: valid out pointer.
        let rv = unsafe { self.f.C_GetSlotInfo.unwrap()(slot, &mut info) };
        if rv == CKR_OK {
            Ok(info.flags)
        } else {
            Err(rv)
        }
    }

    pub fn slot_count(&self, token_present: bool) -> Result<CK_ULONG, CK_RV> {
        let mut n = 0;
        // SAFETY: a count query.
        let rv = unsafe { self.f.C_GetSlotList.unwrap()(token_present as CK_BBOOL, std::ptr::null_mut(), &mut n) };
        if rv == CKR_OK {
            Ok(n)
        } else {
            Err(rv)
        }
    }

    /// SHA-256 of `data` in one C_DigestInit + C_Digest.
    pub fn digest(&self, h: CK_SESSION_HANDLE, data: &[u8]) -> Result<Vec<u8>, CK_RV> {
        let mut m = CK_MECHANISM { mechanism: CKM_SHA256, pParameter: std::ptr::null_mut(), ulParameterLen: 0 };
        // SAFETY: valid arguments.
        let rv = unsafe { self.f.C_DigestInit.unwrap()(h, &mut m) };
        if rv != CKR_OK {
            return Err(rv);
        }
        let mut data = data.to_vec();
        let mut out = vec![0u8; 32];
        let mut len: CK_ULONG = 32;
        // SAFETY: valid arguments.
        let rv = unsafe {
            self.f.C_Digest.unwrap()(h, data.as_mut_ptr(), data.len() as CK_ULONG, out.as_mut_ptr(), &mut len)
        };
        if rv == CKR_OK {
            Ok(out)
        } else {
            Err(rv)
        }
    }
}

impl Drop for RawLoaded {
    fn drop(&mut self) {
        self.finalize();
    }
}

/// Loads the module with `CSSIM_CONFIG` and `CSSIM_FAULTS` and C_Initialize through raw calls.
pub fn load_raw(config: &Path, faults: Option<&str>) -> RawLoaded {
    let guard = MODULE_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    std::env::set_var("CSSIM_CONFIG", config);
    match faults {
        Some(f) => std::env::set_var("CSSIM_FAULTS", f),
        None => std::env::remove_var("CSSIM_FAULTS"),
    }
    let loaded = RawLoaded { f: functions(), _guard: guard };
    assert_eq!(loaded.initialize(), CKR_OK);
    loaded
}
