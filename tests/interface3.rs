//! The shim's PKCS#11 3.0 interface and its object handle space, over the 3.0 fixture (examples/fixture3.rs)
//! and over SoftHSM2 (2.40 only).
//!
//! Not repeated against the CryptoServer simulator (unlike operations, lifecycle, scripts, differential and
//! the stored keys, which have `_cssim` twins): these tests are about the fixture, a 3.0 module, and its
//! made-up handles; the simulator is a 2.40 module like SoftHSM2, whose 2.40-only case is covered here.
//!
//! A process can have only one backend (it is loaded once and never unloaded), and the shim's state lives as
//! long as the process, so every test re-runs this binary as a child process that does the checks
//! (`--exact NAME` with INTERFACE3_CHILD=NAME set) with the backend it needs in P11SHIM_MODULE.
#![deny(unsafe_op_in_unsafe_fn)]

mod common;

use cryptoki_sys::*;
use libloading::Library;
use std::ffi::{c_void, CStr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr::null_mut;

/// The fixture's first key handle as the fixture itself numbers it (see examples/fixture3.rs).
const FIXTURE_FIRST_KEY: CK_OBJECT_HANDLE = 0x8000_0000_0000_0001;
const FIXTURE_SLOT: CK_SLOT_ID = 7;
const CHILD_ENV: &str = "INTERFACE3_CHILD";

// -----------------------------------------------------------------------------------------------------------
// Where things are, and the child-process harness

/// <target>/debug, from <target>/debug/deps/interface3-<hash>.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("<target>/<profile>/deps/<test>").to_path_buf()
}

fn shim_path() -> PathBuf {
    common::shim_path()
}

/// The fixture module. `cargo test` builds it with the other examples; `cargo test --test interface3` does
/// not, so then it is built here, once.
fn fixture_path() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let p = profile_dir().join("examples").join("libfixture3.so");
            if !p.exists() {
                let release = profile_dir().file_name().is_some_and(|n| n == "release");
                let status = Command::new(env!("CARGO"))
                    .args(["build", "--quiet", "--example", "fixture3", "--manifest-path"])
                    .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
                    .args(release.then_some("--release"))
                    .env("CARGO_TARGET_DIR", profile_dir().parent().unwrap())
                    .status()
                    .expect("running cargo build --example fixture3");
                assert!(status.success() && p.exists(), "could not build {}", p.display());
            }
            p
        })
        .clone()
}

fn softhsm_path() -> PathBuf {
    common::softhsm_path()
}

/// A SoftHSM2 configuration with an empty token directory under <target>/test-tokens/interface3/.
fn softhsm_conf(name: &str) -> PathBuf {
    common::fresh_softhsm_dir(&common::test_dir().join(name))
}

/// In the parent: runs test `name` in a child process with `envs` set and checks it passed; returns false.
/// In that child: returns true, and the caller does the checks.
fn in_child(name: &str, envs: &[(&str, &Path)]) -> bool {
    if std::env::var(CHILD_ENV).as_deref() == Ok(name) {
        return true;
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .env_remove("P11SHIM_CONFIG")
        .envs(envs.iter().map(|(k, v)| (k, v.as_os_str())))
        .output()
        .expect("re-running the test binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child `{name}` failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    false
}

fn with_fixture(name: &str) -> bool {
    in_child(name, &[("P11SHIM_MODULE", &fixture_path())])
}

// -----------------------------------------------------------------------------------------------------------
// Raw access to a module's three exported functions

type GetFunctionList = unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV;
type GetInterfaceList = unsafe extern "C" fn(*mut CK_INTERFACE, *mut CK_ULONG) -> CK_RV;
type GetInterface = unsafe extern "C" fn(*mut CK_UTF8CHAR, *mut CK_VERSION, *mut *mut CK_INTERFACE, CK_FLAGS) -> CK_RV;

struct Module {
    get_function_list: GetFunctionList,
    get_interface_list: GetInterfaceList,
    get_interface: GetInterface,
    _lib: Library,
}

impl Module {
    fn open(path: &Path) -> Module {
        // SAFETY: a PKCS#11 module is made to be loaded; loading the same path again gives the same instance.
        let lib = unsafe { Library::new(path) }.unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
        // SAFETY: the PKCS#11 signatures of these three symbols.
        unsafe {
            Module {
                get_function_list: *lib.get::<GetFunctionList>(b"C_GetFunctionList\0").unwrap(),
                get_interface_list: *lib.get::<GetInterfaceList>(b"C_GetInterfaceList\0").unwrap(),
                get_interface: *lib.get::<GetInterface>(b"C_GetInterface\0").unwrap(),
                _lib: lib,
            }
        }
    }

    fn function_list(&self) -> *const CK_FUNCTION_LIST {
        let mut list = null_mut();
        // SAFETY: valid out pointer.
        assert_eq!(unsafe { (self.get_function_list)(&mut list) }, CKR_OK);
        list
    }

    /// C_GetInterfaceList with the length protocol.
    fn interfaces(&self) -> Vec<CK_INTERFACE> {
        let mut count: CK_ULONG = 0;
        // SAFETY: NULL list asks for the count.
        assert_eq!(unsafe { (self.get_interface_list)(null_mut(), &mut count) }, CKR_OK);
        let mut list =
            vec![CK_INTERFACE { pInterfaceName: null_mut(), pFunctionList: null_mut(), flags: 0 }; count as usize];
        // SAFETY: room for `count` entries.
        assert_eq!(unsafe { (self.get_interface_list)(list.as_mut_ptr(), &mut count) }, CKR_OK);
        list.truncate(count as usize);
        list
    }

    /// C_GetInterface; Ok(the interface pointer) or Err(rv).
    fn interface(
        &self,
        name: Option<&CStr>,
        version: Option<(u8, u8)>,
        flags: CK_FLAGS,
    ) -> Result<*const CK_INTERFACE, CK_RV> {
        let mut version = version.map(|(major, minor)| CK_VERSION { major, minor });
        let p_version = version.as_mut().map_or(null_mut(), |v| v as *mut CK_VERSION);
        let p_name = name.map_or(null_mut(), |n| n.as_ptr() as *mut CK_UTF8CHAR);
        let mut iface = null_mut();
        // SAFETY: NULL or valid name and version, valid out pointer.
        match unsafe { (self.get_interface)(p_name, p_version, &mut iface, flags) } {
            CKR_OK => {
                assert!(!iface.is_null(), "C_GetInterface returned CKR_OK and a NULL interface");
                Ok(iface)
            }
            rv => Err(rv),
        }
    }

    /// The default interface's 3.0 function list.
    fn list_3_0(&self) -> &'static CK_FUNCTION_LIST_3_0 {
        let iface = self.interface(None, None, 0).expect("default interface");
        // SAFETY: the interface is static in the module, which is never unloaded.
        let list = unsafe { (*iface).pFunctionList as *const CK_FUNCTION_LIST_3_0 };
        // SAFETY: checked to be a 3.0 list before it is read as one.
        let list = unsafe { &*list };
        assert_eq!((list.version.major, list.version.minor), (3, 0));
        list
    }
}

fn name_of(iface: &CK_INTERFACE) -> String {
    assert!(!iface.pInterfaceName.is_null());
    // SAFETY: interface names are NUL-terminated static strings.
    unsafe { CStr::from_ptr(iface.pInterfaceName as *const std::ffi::c_char) }.to_string_lossy().into_owned()
}

fn version_of(iface: &CK_INTERFACE) -> (u8, u8) {
    assert!(!iface.pFunctionList.is_null());
    // SAFETY: every function list starts with its CK_VERSION.
    let v = unsafe { *(iface.pFunctionList as *const CK_VERSION) };
    (v.major, v.minor)
}

fn text(field: &[u8]) -> String {
    String::from_utf8_lossy(field).trim_end().to_string()
}

/// Calls a function-list entry, which must be present.
macro_rules! call {
    ($list:expr, $f:ident ( $($arg:expr),* $(,)? )) => {{
        let f = $list.$f.expect(concat!(stringify!($f), " is NULL in the function list"));
        // SAFETY: the arguments are valid for the call, as each test builds them.
        unsafe { f($($arg),*) }
    }};
}

// -----------------------------------------------------------------------------------------------------------
// Small PKCS#11 helpers over a 3.0 list

fn initialize(f: &CK_FUNCTION_LIST_3_0, flags: Option<CK_FLAGS>) -> CK_RV {
    let mut args = CK_C_INITIALIZE_ARGS {
        CreateMutex: None,
        DestroyMutex: None,
        LockMutex: None,
        UnlockMutex: None,
        flags: flags.unwrap_or(0),
        pReserved: null_mut(),
    };
    let p = if flags.is_some() { &mut args as *mut _ as *mut c_void } else { null_mut() };
    call!(f, C_Initialize(p))
}

fn token_info(f: &CK_FUNCTION_LIST_3_0) -> CK_TOKEN_INFO {
    // SAFETY: plain data.
    let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
    assert_eq!(call!(f, C_GetTokenInfo(FIXTURE_SLOT, &mut info)), CKR_OK);
    info
}

/// The flags the fixture's C_Initialize received (it shows them as the token's serial number).
fn fixture_init_flags(f: &CK_FUNCTION_LIST_3_0) -> CK_FLAGS {
    CK_FLAGS::from_str_radix(&text(&token_info(f).serialNumber), 16).expect("hex flags in serialNumber")
}

fn open_session(f: &CK_FUNCTION_LIST_3_0) -> CK_SESSION_HANDLE {
    let mut s = 0;
    let rv = call!(f, C_OpenSession(FIXTURE_SLOT, CKF_SERIAL_SESSION | CKF_RW_SESSION, null_mut(), None, &mut s));
    assert_eq!(rv, CKR_OK);
    s
}

fn session_info(f: &CK_FUNCTION_LIST_3_0, s: CK_SESSION_HANDLE) -> CK_SESSION_INFO {
    let mut info = CK_SESSION_INFO { slotID: 0, state: 0, flags: 0, ulDeviceError: 0 };
    assert_eq!(call!(f, C_GetSessionInfo(s, &mut info)), CKR_OK);
    info
}

fn generate_key(f: &CK_FUNCTION_LIST_3_0, s: CK_SESSION_HANDLE) -> CK_OBJECT_HANDLE {
    let mut mechanism =
        CK_MECHANISM { mechanism: CKM_GENERIC_SECRET_KEY_GEN, pParameter: null_mut(), ulParameterLen: 0 };
    let mut key = 0;
    assert_eq!(call!(f, C_GenerateKey(s, &mut mechanism, null_mut(), 0, &mut key)), CKR_OK);
    key
}

/// CKA_ID of an object: for the fixture, the handle it received.
fn object_id(
    f: &CK_FUNCTION_LIST_3_0,
    s: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
) -> Result<CK_OBJECT_HANDLE, CK_RV> {
    let mut id = [0u8; 8];
    let mut attr = CK_ATTRIBUTE { type_: CKA_ID, pValue: id.as_mut_ptr() as *mut c_void, ulValueLen: 8 };
    match call!(f, C_GetAttributeValue(s, object, &mut attr, 1)) {
        CKR_OK => {
            assert_eq!(attr.ulValueLen, 8);
            Ok(CK_OBJECT_HANDLE::from_be_bytes(id))
        }
        rv => Err(rv),
    }
}

fn find_all(f: &CK_FUNCTION_LIST_3_0, s: CK_SESSION_HANDLE, batch: usize) -> Vec<CK_OBJECT_HANDLE> {
    assert_eq!(call!(f, C_FindObjectsInit(s, null_mut(), 0)), CKR_OK);
    let mut all = Vec::new();
    loop {
        let mut buf = vec![0; batch];
        let mut n = 0;
        assert_eq!(call!(f, C_FindObjects(s, buf.as_mut_ptr(), batch as CK_ULONG, &mut n)), CKR_OK);
        assert!(n as usize <= batch);
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n as usize]);
    }
    assert_eq!(call!(f, C_FindObjectsFinal(s)), CKR_OK);
    all
}

// -----------------------------------------------------------------------------------------------------------
// Over the 3.0 fixture

#[test]
fn fixture_interfaces_are_3_0_then_2_40_and_the_shims_own() {
    if !with_fixture("fixture_interfaces_are_3_0_then_2_40_and_the_shims_own") {
        return;
    }
    let shim = Module::open(&shim_path());
    let fixture = Module::open(&fixture_path());
    let fixture_3_0 = fixture.interface(None, None, 0).unwrap();
    // SAFETY: static in the fixture.
    let fixture_lists =
        [unsafe { (*fixture_3_0).pFunctionList } as *const c_void, fixture.function_list() as *const c_void];

    // Asked before C_Initialize, as cryptoki does.
    let mut count: CK_ULONG = 0;
    // SAFETY: NULL list asks for the count.
    assert_eq!(unsafe { (shim.get_interface_list)(null_mut(), &mut count) }, CKR_OK);
    assert_eq!(count, 2, "3.0 and 2.40 over a 3.0 backend");
    let mut one = [CK_INTERFACE { pInterfaceName: null_mut(), pFunctionList: null_mut(), flags: 0 }];
    let mut room: CK_ULONG = 1;
    // SAFETY: room for one entry.
    assert_eq!(unsafe { (shim.get_interface_list)(one.as_mut_ptr(), &mut room) }, CKR_BUFFER_TOO_SMALL);
    assert_eq!(room, 2, "CKR_BUFFER_TOO_SMALL must report the count needed");
    // SAFETY: NULL count is refused.
    assert_eq!(unsafe { (shim.get_interface_list)(null_mut(), null_mut()) }, CKR_ARGUMENTS_BAD);

    let list = shim.interfaces();
    let described: Vec<_> = list.iter().map(|i| (name_of(i), version_of(i))).collect();
    assert_eq!(described, [("PKCS 11".to_string(), (3, 0)), ("PKCS 11".to_string(), (2, 40))]);
    for iface in &list {
        assert!(
            !fixture_lists.contains(&(iface.pFunctionList as *const c_void)),
            "a table of the fixture's leaked out"
        );
    }

    // The default is 3.0, in the shim's memory, with the shim's table.
    let default = shim.interface(None, None, 0).expect("C_GetInterface(NULL, NULL, &p, 0)");
    assert_ne!(default, fixture_3_0, "C_GetInterface returned the fixture's CK_INTERFACE");
    // SAFETY: static in the shim.
    let default = unsafe { *default };
    assert_eq!((name_of(&default), version_of(&default)), ("PKCS 11".to_string(), (3, 0)));
    assert_eq!(default.pFunctionList, list[0].pFunctionList);
    assert!(!fixture_lists.contains(&(default.pFunctionList as *const c_void)));

    // Named and versioned requests.
    let pkcs11 = Some(c"PKCS 11");
    let v240 = shim.interface(pkcs11, Some((2, 40)), 0).expect("PKCS 11 2.40");
    // SAFETY: static in the shim.
    assert_eq!(version_of(unsafe { &*v240 }), (2, 40));
    // SAFETY: as above.
    assert_eq!(unsafe { (*v240).pFunctionList }, list[1].pFunctionList);
    // SAFETY: as above.
    assert_eq!(version_of(unsafe { &*shim.interface(pkcs11, None, 0).unwrap() }), (3, 0));
    // SAFETY: as above.
    assert_eq!(version_of(unsafe { &*shim.interface(None, Some((3, 0)), 0).unwrap() }), (3, 0));
    // SAFETY: as above.
    assert_eq!(version_of(unsafe { &*shim.interface(None, Some((2, 40)), 0).unwrap() }), (2, 40));

    assert_eq!(shim.interface(Some(c"PKCS 12"), None, 0), Err(CKR_ARGUMENTS_BAD), "unknown name");
    assert_eq!(shim.interface(Some(c"Vendor XYZ"), Some((3, 0)), 0), Err(CKR_ARGUMENTS_BAD), "unknown name");
    assert_eq!(shim.interface(pkcs11, Some((9, 9)), 0), Err(CKR_ARGUMENTS_BAD), "unknown version");
    assert_eq!(shim.interface(None, Some((3, 1)), 0), Err(CKR_ARGUMENTS_BAD), "unknown version");
    assert_eq!(shim.interface(None, None, 0x4000_0000), Err(CKR_ARGUMENTS_BAD), "unknown flags");
    // Fork safety is a flag the shim may or may not claim; if it answers, the interface must claim it.
    if let Ok(i) = shim.interface(None, None, CKF_INTERFACE_FORK_SAFE) {
        // SAFETY: static in the shim.
        assert_ne!(unsafe { (*i).flags } & CKF_INTERFACE_FORK_SAFE, 0);
    }
    // SAFETY: NULL ppInterface is refused.
    assert_eq!(unsafe { (shim.get_interface)(null_mut(), null_mut(), null_mut(), 0) }, CKR_ARGUMENTS_BAD);

    // C_GetFunctionList gives the shim's 2.40 table.
    let f240 = shim.function_list();
    assert!(!fixture_lists.contains(&(f240 as *const c_void)));
    // SAFETY: a valid table.
    assert_eq!(unsafe { ((*f240).version.major, (*f240).version.minor) }, (2, 40));
    // SAFETY: NULL is refused.
    assert_eq!(unsafe { (shim.get_function_list)(null_mut()) }, CKR_ARGUMENTS_BAD);

    // Every entry of the 3.0 table is present (the spec forbids NULL entries).
    let f = shim.list_3_0();
    // SAFETY: CK_FUNCTION_LIST_3_0 is a CK_VERSION (padded to 8 bytes) followed by 92 function pointers.
    let entries = unsafe { std::slice::from_raw_parts((f as *const CK_FUNCTION_LIST_3_0 as *const usize).add(1), 92) };
    let missing: Vec<_> = entries.iter().enumerate().filter(|(_, p)| **p == 0).map(|(i, _)| i).collect();
    assert!(missing.is_empty(), "NULL entries in the shim's 3.0 table at indexes {missing:?}");
}

#[test]
fn fixture_3_0_functions_reach_the_backend() {
    if !with_fixture("fixture_3_0_functions_reach_the_backend") {
        return;
    }
    let shim = Module::open(&shim_path());
    let f = shim.list_3_0();
    assert_eq!(initialize(f, None), CKR_OK);

    // SAFETY: plain data.
    let mut info: CK_INFO = unsafe { std::mem::zeroed() };
    assert_eq!(call!(f, C_GetInfo(&mut info)), CKR_OK);
    assert_eq!(text(&info.manufacturerID), "p11shim");
    assert_eq!(text(&info.libraryDescription), "p11shim/fixture3");
    assert_eq!((info.libraryVersion.major, info.libraryVersion.minor), (0, 1));
    assert_eq!((info.cryptokiVersion.major, info.cryptokiVersion.minor), (3, 0), "the backend's cryptokiVersion");

    let mut slots = [0; 4];
    let mut n: CK_ULONG = 4;
    assert_eq!(call!(f, C_GetSlotList(CK_TRUE, slots.as_mut_ptr(), &mut n)), CKR_OK);
    assert_eq!(&slots[..n as usize], &[FIXTURE_SLOT]);

    let s = open_session(f);
    let login = |user: &str, pin: &str| {
        call!(
            f,
            C_LoginUser(
                s,
                CKU_USER,
                pin.as_ptr() as *mut u8,
                pin.len() as CK_ULONG,
                user.as_ptr() as *mut u8,
                user.len() as CK_ULONG
            )
        )
    };
    assert_eq!(login("bob", "1234"), CKR_PIN_INCORRECT);
    assert_eq!(text(&token_info(f).model), "user:bob", "the fixture saw the username");
    assert_eq!(login("alice", "1234"), CKR_OK);
    assert_eq!(text(&token_info(f).model), "user:alice");
    assert_eq!(session_info(f, s).state, CKS_RW_USER_FUNCTIONS);
    assert_eq!(login("alice", "1234"), CKR_USER_ALREADY_LOGGED_IN);

    assert_eq!(call!(f, C_SessionCancel(s, CKF_SIGN)), CKR_OK);
    assert_eq!(call!(f, C_SessionCancel(s, CKF_ENCRYPT)), CKR_OK);
    assert_eq!(session_info(f, s).ulDeviceError, 2, "the fixture counted two C_SessionCancel calls");
    assert_eq!(call!(f, C_SessionCancel(s + 1000, 0)), CKR_SESSION_HANDLE_INVALID);

    // A 3.0 function the fixture does not implement is forwarded, and the fixture's answer comes back.
    let mut mechanism = CK_MECHANISM { mechanism: CKM_AES_GCM, pParameter: null_mut(), ulParameterLen: 0 };
    assert_eq!(call!(f, C_MessageEncryptInit(s, &mut mechanism, 1)), CKR_FUNCTION_NOT_SUPPORTED);

    assert_eq!(call!(f, C_CloseSession(s)), CKR_OK);
    assert_eq!(call!(f, C_Finalize(null_mut())), CKR_OK);
    assert_eq!(call!(f, C_Finalize(null_mut())), CKR_CRYPTOKI_NOT_INITIALIZED);
    assert_eq!(call!(f, C_SessionCancel(s, 0)), CKR_CRYPTOKI_NOT_INITIALIZED);
}

#[test]
fn fixture_backend_is_initialized_with_os_locking() {
    if !with_fixture("fixture_backend_is_initialized_with_os_locking") {
        return;
    }
    let shim = Module::open(&shim_path());
    let f = shim.list_3_0();

    assert_eq!(initialize(f, None), CKR_OK, "C_Initialize(NULL)");
    assert_eq!(fixture_init_flags(f), CKF_OS_LOCKING_OK);
    assert_eq!(initialize(f, None), CKR_CRYPTOKI_ALREADY_INITIALIZED);
    assert_eq!(call!(f, C_Finalize(null_mut())), CKR_OK);

    assert_eq!(initialize(f, Some(0)), CKR_OK, "C_Initialize with flags 0");
    assert_eq!(fixture_init_flags(f), CKF_OS_LOCKING_OK);
    assert_eq!(call!(f, C_Finalize(null_mut())), CKR_OK);

    assert_eq!(initialize(f, Some(CKF_LIBRARY_CANT_CREATE_OS_THREADS)), CKR_OK);
    assert_eq!(fixture_init_flags(f), CKF_OS_LOCKING_OK | CKF_LIBRARY_CANT_CREATE_OS_THREADS);
    assert_eq!(call!(f, C_Finalize(null_mut())), CKR_OK);

    assert_eq!(initialize(f, Some(CKF_OS_LOCKING_OK | CKF_LIBRARY_CANT_CREATE_OS_THREADS)), CKR_OK);
    assert_eq!(fixture_init_flags(f), CKF_OS_LOCKING_OK | CKF_LIBRARY_CANT_CREATE_OS_THREADS);
    assert_eq!(call!(f, C_Finalize(null_mut())), CKR_OK);
}

#[test]
fn fixture_top_bit_handles_get_aliases() {
    if !with_fixture("fixture_top_bit_handles_get_aliases") {
        return;
    }
    let shim = Module::open(&shim_path());
    let f = shim.list_3_0();
    assert_eq!(initialize(f, None), CKR_OK);
    let s = open_session(f);

    let aliases: Vec<_> = (0..3).map(|_| generate_key(f, s)).collect();
    let backend: Vec<_> = aliases.iter().map(|a| object_id(f, s, *a).expect("CKA_ID through the alias")).collect();
    assert_eq!(
        backend,
        [FIXTURE_FIRST_KEY, FIXTURE_FIRST_KEY + 1, FIXTURE_FIRST_KEY + 2],
        "the fixture received its own handles"
    );
    for (a, b) in aliases.iter().zip(&backend) {
        assert!(!backend.contains(a), "the application sees alias {a:#x}, which is a backend handle (its own: {b:#x}); a forwarder that forgot to translate would go unnoticed");
    }
    let mut unique = aliases.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 3, "three keys, three aliases: {aliases:x?}");

    // Found objects come back with the same aliases, whatever the batch size.
    for batch in [10, 1, 2] {
        let mut found = find_all(f, s, batch);
        found.sort();
        assert_eq!(found, unique, "C_FindObjects (batches of {batch})");
    }

    // A shim handle that stands for nothing is refused by the shim; an alias reaches the backend's own handle.
    let mut mechanism = CK_MECHANISM { mechanism: CKM_SHA256_HMAC, pParameter: null_mut(), ulParameterLen: 0 };
    assert_eq!(call!(f, C_SignInit(s, &mut mechanism, (1 << 63) | 0xdead_beef)), CKR_KEY_HANDLE_INVALID);
    assert_eq!(call!(f, C_SignInit(s, &mut mechanism, aliases[0])), CKR_FUNCTION_NOT_SUPPORTED, "the fixture's answer");
    assert_eq!(object_id(f, s, (1 << 63) | 0xdead_beef), Err(CKR_OBJECT_HANDLE_INVALID));

    // Destroy through the alias; then the alias is dead.
    assert_eq!(call!(f, C_DestroyObject(s, aliases[0])), CKR_OK);
    assert_eq!(object_id(f, s, aliases[0]), Err(CKR_OBJECT_HANDLE_INVALID));
    assert_eq!(call!(f, C_DestroyObject(s, aliases[0])), CKR_OBJECT_HANDLE_INVALID);
    let mut found = find_all(f, s, 10);
    found.sort();
    assert_eq!(found, &unique[1..]);
    assert_eq!(object_id(f, s, aliases[1]), Ok(FIXTURE_FIRST_KEY + 1));

    // C_Finalize forgets the aliases; the fixture keeps its objects, which get new aliases.
    assert_eq!(call!(f, C_Finalize(null_mut())), CKR_OK);
    assert_eq!(initialize(f, None), CKR_OK);
    let s = open_session(f);
    assert_eq!(object_id(f, s, aliases[1]), Err(CKR_OBJECT_HANDLE_INVALID), "an alias from before C_Finalize");
    let found = find_all(f, s, 10);
    let mut ids: Vec<_> = found.iter().map(|h| object_id(f, s, *h).unwrap()).collect();
    ids.sort();
    assert_eq!(ids, [FIXTURE_FIRST_KEY + 1, FIXTURE_FIRST_KEY + 2]);
    for h in &found {
        assert!(!backend.contains(h), "alias {h:#x} is a backend handle");
    }
    assert_eq!(call!(f, C_Finalize(null_mut())), CKR_OK);
}

#[test]
fn fixture_second_backend_in_one_process_is_refused() {
    if !with_fixture("fixture_second_backend_in_one_process_is_refused") {
        return;
    }
    let shim = Module::open(&shim_path());
    let f = shim.list_3_0();
    assert_eq!(initialize(f, None), CKR_OK);
    assert_eq!(call!(f, C_Finalize(null_mut())), CKR_OK);
    // The test runs single-threaded in its own process.
    std::env::set_var("P11SHIM_MODULE", softhsm_path());
    assert_eq!(initialize(f, None), CKR_GENERAL_ERROR, "another backend in the same process");
    std::env::set_var("P11SHIM_MODULE", fixture_path());
    assert_eq!(initialize(f, None), CKR_OK, "the first backend again");
    assert_eq!(call!(f, C_Finalize(null_mut())), CKR_OK);
}

#[test]
fn fixture_through_cryptoki_is_3_0() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, AttributeType};

    if !with_fixture("fixture_through_cryptoki_is_3_0") {
        return;
    }
    let pkcs11 = Pkcs11::new(shim_path()).expect("Pkcs11::new over the shim");
    assert!(pkcs11.is_fn_supported(Function::LoginUser), "cryptoki took the shim for 2.40");
    assert!(pkcs11.is_fn_supported(Function::SessionCancel));
    pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).unwrap();
    let info = pkcs11.get_library_info().unwrap();
    assert_eq!(info.manufacturer_id(), "p11shim");
    assert_eq!(info.library_description(), "p11shim/fixture3");
    assert_eq!((info.cryptoki_version().major(), info.cryptoki_version().minor()), (3, 0));

    let slot = pkcs11.get_slots_with_token().unwrap()[0];
    assert_eq!(slot.id(), FIXTURE_SLOT);
    let session = pkcs11.open_rw_session(slot).unwrap();
    let key = session.generate_key(&Mechanism::GenericSecretKeyGen, &[]).unwrap();
    assert_eq!(session.find_objects(&[]).unwrap(), vec![key]);
    let attrs = session.get_attributes(key, &[AttributeType::Id]).unwrap();
    let Some(Attribute::Id(id)) = attrs.first() else { panic!("no CKA_ID: {attrs:?}") };
    let backend = CK_OBJECT_HANDLE::from_be_bytes(id.as_slice().try_into().unwrap());
    assert_eq!(backend, FIXTURE_FIRST_KEY);
    assert_ne!(key.handle(), backend);
    session.destroy_object(key).unwrap();
    assert!(session.find_objects(&[]).unwrap().is_empty());
    drop(session);
    pkcs11.finalize().unwrap();
}

// -----------------------------------------------------------------------------------------------------------
// Over SoftHSM2 2.6 (2.40 only)

#[test]
fn softhsm_is_offered_as_2_40_only() {
    let name = "softhsm_is_offered_as_2_40_only";
    if std::env::var(CHILD_ENV).as_deref() != Ok(name) {
        let conf = softhsm_conf(name);
        in_child(name, &[("P11SHIM_MODULE", &softhsm_path()), ("SOFTHSM2_CONF", &conf)]);
        return;
    }
    let shim = Module::open(&shim_path());
    let list = shim.interfaces();
    assert_eq!(list.len(), 1, "only 2.40 over SoftHSM2: {:?}", list.iter().map(version_of).collect::<Vec<_>>());
    assert_eq!((name_of(&list[0]), version_of(&list[0])), ("PKCS 11".to_string(), (2, 40)));
    let default = shim.interface(None, None, 0).expect("C_GetInterface(NULL, NULL, &p, 0)");
    // SAFETY: static in the shim.
    assert_eq!(version_of(unsafe { &*default }), (2, 40));
    assert_eq!(shim.interface(None, Some((3, 0)), 0), Err(CKR_ARGUMENTS_BAD));
    assert_eq!(shim.interface(Some(c"PKCS 11"), Some((2, 40)), 0).map(|_| ()), Ok(()));

    // SAFETY: a valid 2.40 table.
    let f = unsafe { &*shim.function_list() };
    // SAFETY: as above.
    assert_eq!(unsafe { (*default).pFunctionList } as *const CK_FUNCTION_LIST, f as *const _);
    // SAFETY: NULL init args.
    assert_eq!(unsafe { f.C_Initialize.unwrap()(null_mut()) }, CKR_OK);
    // SAFETY: plain data.
    let mut info: CK_INFO = unsafe { std::mem::zeroed() };
    // SAFETY: valid out pointer.
    assert_eq!(unsafe { f.C_GetInfo.unwrap()(&mut info) }, CKR_OK);
    assert_eq!(text(&info.libraryDescription), "p11shim/SoftHSM");
    // SAFETY: NULL is the only valid argument.
    assert_eq!(unsafe { f.C_Finalize.unwrap()(null_mut()) }, CKR_OK);

    let pkcs11 = cryptoki::context::Pkcs11::new(shim_path()).expect("Pkcs11::new over the shim");
    assert!(!pkcs11.is_fn_supported(cryptoki::context::Function::LoginUser), "cryptoki was offered 3.0 over SoftHSM2");
}
