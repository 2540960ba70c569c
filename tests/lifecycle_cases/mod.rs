//! The module's life cycle through the built libp11shim.so over the backend of the test binary
//! (tests/lifecycle.rs: SoftHSM2, tests/lifecycle_cssim.rs: the simulator), with raw PKCS#11 calls:
//! C_Initialize argument rules, double init / finalize, fork, NULL pointers, the log, C_GetInfo. The set-up
//! errors that never load a backend (exports, configuration errors, unloadable modules) are in
//! tests/lifecycle.rs only.
//!
//! Every test runs its body in a child process (a re-run of this binary with `LIFECYCLE_CHILD` set), because
//! the shim loads its backend and reads its configuration once per process, and a test must see the shim's
//! stderr.
#![allow(dead_code)] // the helpers serve tests/lifecycle.rs too

use crate::common::{self, backend};
use cryptoki_sys::*;
use std::ffi::c_void;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::ptr::null_mut;

pub const CHILD: &str = "LIFECYCLE_CHILD";

/// In the parent: runs `test` (its name in libtest: `lifecycle_cases::…` for the cases here) in a child with
/// `envs` (on top of this binary's backend with a fresh directory of the test's own) and returns its output.
/// In the child: returns None, and the caller runs the body.
pub fn in_child(test: &str, envs: &[(&str, &str)]) -> Option<Output> {
    if std::env::var(CHILD).as_deref() == Ok(test) {
        return None;
    }
    let dir = common::test_dir().join(test.replace("::", "-"));
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, test)
        .env_remove("P11SHIM_CONFIG")
        .env_remove("CSSIM_FAULTS")
        .envs(common::fresh_backend_env(&dir, 2))
        .envs(envs.iter().copied())
        .output()
        .expect("re-run the test binary");
    Some(out)
}

pub fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// Asserts the child passed and returns its stdout and stderr.
pub fn passed(out: Output) -> (String, String) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "child failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    (stdout, stderr)
}

/// The shim's 2.40 function list (the library stays loaded).
pub fn shim() -> &'static CK_FUNCTION_LIST {
    let lib = unsafe { libloading::Library::new(common::shim_path()) }.expect("load the shim");
    let get: libloading::Symbol<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV> =
        unsafe { lib.get(b"C_GetFunctionList\0") }.unwrap();
    let mut list = null_mut();
    assert_eq!(unsafe { get(&mut list) }, CKR_OK);
    std::mem::forget(lib);
    unsafe { &*list }
}

pub fn initialize(f: &CK_FUNCTION_LIST) -> CK_RV {
    let mut args = CK_C_INITIALIZE_ARGS { flags: CKF_OS_LOCKING_OK, ..Default::default() };
    unsafe { f.C_Initialize.unwrap()(&mut args as *mut _ as *mut c_void) }
}

pub fn rv(r: CK_RV) -> String {
    p11shim::error::rv_name(r)
}

/// Initializes a token labelled `label` with user PIN `pin` and returns its slot, found by its label
/// (SoftHSM2 renumbers its slots).
pub fn make_token(f: &CK_FUNCTION_LIST, label: &str, pin: &str) -> CK_SLOT_ID {
    let mut count = 0;
    unsafe { f.C_GetSlotList.unwrap()(CK_FALSE, null_mut(), &mut count) };
    let mut slots = vec![0; count as usize];
    assert_eq!(unsafe { f.C_GetSlotList.unwrap()(CK_FALSE, slots.as_mut_ptr(), &mut count) }, CKR_OK);
    let mut padded = [b' '; 32];
    padded[..label.len()].copy_from_slice(label.as_bytes());
    let so = b"so-pin-1234";
    let r = unsafe { f.C_InitToken.unwrap()(slots[0], so.as_ptr() as *mut _, so.len() as _, padded.as_mut_ptr()) };
    assert_eq!(r, CKR_OK, "C_InitToken: {}", rv(r));
    let mut count = 0;
    unsafe { f.C_GetSlotList.unwrap()(CK_TRUE, null_mut(), &mut count) };
    let mut slots = vec![0; count as usize];
    unsafe { f.C_GetSlotList.unwrap()(CK_TRUE, slots.as_mut_ptr(), &mut count) };
    let slot = *slots
        .iter()
        .find(|s| {
            let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
            unsafe { f.C_GetTokenInfo.unwrap()(**s, &mut info) };
            info.label == padded
        })
        .expect("the new token");
    let session = open(f, slot);
    assert_eq!(unsafe { f.C_Login.unwrap()(session, CKU_SO, so.as_ptr() as *mut _, so.len() as _) }, CKR_OK);
    assert_eq!(unsafe { f.C_InitPIN.unwrap()(session, pin.as_ptr() as *mut _, pin.len() as _) }, CKR_OK);
    assert_eq!(unsafe { f.C_CloseSession.unwrap()(session) }, CKR_OK);
    slot
}

pub fn open(f: &CK_FUNCTION_LIST, slot: CK_SLOT_ID) -> CK_SESSION_HANDLE {
    let mut session = 0;
    let r =
        unsafe { f.C_OpenSession.unwrap()(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, null_mut(), None, &mut session) };
    assert_eq!(r, CKR_OK, "C_OpenSession: {}", rv(r));
    session
}

pub fn session_valid(f: &CK_FUNCTION_LIST, session: CK_SESSION_HANDLE) -> bool {
    let mut info: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
    unsafe { f.C_GetSessionInfo.unwrap()(session, &mut info) == CKR_OK }
}

pub unsafe extern "C" fn create_mutex(_: *mut *mut c_void) -> CK_RV {
    CKR_OK
}
pub unsafe extern "C" fn mutex_op(_: *mut c_void) -> CK_RV {
    CKR_OK
}

/// Runs C_Initialize in a child with `envs`, which must fail with CKR_GENERAL_ERROR; returns its stderr.
pub fn failing_setup(test: &str, envs: &[(&str, &str)]) -> String {
    let Some(out) = in_child(test, envs) else {
        let r = initialize(shim());
        println!("C_Initialize={}", rv(r));
        return String::new();
    };
    let (stdout, stderr) = passed(out);
    assert!(stdout.contains("C_Initialize=CKR_GENERAL_ERROR"), "stdout: {stdout}\nstderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("p11shim")).collect();
    assert_eq!(lines.len(), 1, "exactly one line from the shim on stderr: {stderr}");
    lines[0].to_string()
}

pub fn write_config(test: &str, body: &str) -> PathBuf {
    let dir = common::test_dir().join(format!("{test}-config"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("p11shim.toml");
    std::fs::write(&path, body).unwrap();
    path
}

#[test]
fn calls_before_initialize_and_after_finalize_are_refused() {
    let Some(out) = in_child("lifecycle_cases::calls_before_initialize_and_after_finalize_are_refused", &[]) else {
        let f = shim();
        let mut count = 0;
        assert_eq!(unsafe { f.C_GetSlotList.unwrap()(CK_FALSE, null_mut(), &mut count) }, CKR_CRYPTOKI_NOT_INITIALIZED);
        let mut info: CK_INFO = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { f.C_GetInfo.unwrap()(&mut info) }, CKR_CRYPTOKI_NOT_INITIALIZED);
        assert_eq!(unsafe { f.C_Finalize.unwrap()(null_mut()) }, CKR_CRYPTOKI_NOT_INITIALIZED);
        assert_eq!(initialize(f), CKR_OK);
        assert_eq!(initialize(f), CKR_CRYPTOKI_ALREADY_INITIALIZED);
        assert_eq!(unsafe { f.C_Finalize.unwrap()(std::ptr::dangling_mut::<c_void>()) }, CKR_ARGUMENTS_BAD);
        assert_eq!(unsafe { f.C_Finalize.unwrap()(null_mut()) }, CKR_OK);
        assert_eq!(unsafe { f.C_GetSlotList.unwrap()(CK_FALSE, null_mut(), &mut count) }, CKR_CRYPTOKI_NOT_INITIALIZED);
        assert_eq!(unsafe { f.C_Finalize.unwrap()(null_mut()) }, CKR_CRYPTOKI_NOT_INITIALIZED);
        // Finalize then initialize again works, with NULL arguments too.
        assert_eq!(unsafe { f.C_Initialize.unwrap()(null_mut()) }, CKR_OK);
        assert_eq!(unsafe { f.C_GetSlotList.unwrap()(CK_FALSE, null_mut(), &mut count) }, CKR_OK);
        assert!(count >= 1);
        assert_eq!(unsafe { f.C_Finalize.unwrap()(null_mut()) }, CKR_OK);
        println!("CHILD-DONE");
        return;
    };
    let (stdout, stderr) = passed(out);
    assert!(stdout.contains("CHILD-DONE"), "{stdout}");
    assert!(!stderr.contains("p11shim"), "logging is off by default, yet the shim wrote: {stderr}");
}

#[test]
fn initialize_arguments_follow_the_spec() {
    let Some(out) = in_child("lifecycle_cases::initialize_arguments_follow_the_spec", &[]) else {
        let f = shim();
        let call = |args: &mut CK_C_INITIALIZE_ARGS| unsafe { f.C_Initialize.unwrap()(args as *mut _ as *mut c_void) };
        let some = CK_C_INITIALIZE_ARGS { CreateMutex: Some(create_mutex), ..Default::default() };
        assert_eq!(call(&mut some.clone()), CKR_ARGUMENTS_BAD, "some but not all callbacks");
        let all = CK_C_INITIALIZE_ARGS {
            CreateMutex: Some(create_mutex),
            DestroyMutex: Some(mutex_op),
            LockMutex: Some(mutex_op),
            UnlockMutex: Some(mutex_op),
            ..Default::default()
        };
        assert_eq!(call(&mut all.clone()), CKR_OK, "callbacks only: passed on to the backend, which accepts them");
        assert_eq!(call(&mut all.clone()), CKR_CRYPTOKI_ALREADY_INITIALIZED);
        assert_eq!(call(&mut some.clone()), CKR_CRYPTOKI_ALREADY_INITIALIZED, "initialized is checked first");
        assert_eq!(unsafe { f.C_Finalize.unwrap()(std::ptr::dangling_mut()) }, CKR_ARGUMENTS_BAD);
        assert_eq!(unsafe { f.C_Finalize.unwrap()(null_mut()) }, CKR_OK);
        assert_eq!(
            unsafe { f.C_Finalize.unwrap()(std::ptr::dangling_mut()) },
            CKR_CRYPTOKI_NOT_INITIALIZED,
            "not initialized is checked first"
        );
        let reserved = CK_C_INITIALIZE_ARGS { pReserved: 8 as *mut c_void, ..Default::default() };
        assert_eq!(call(&mut reserved.clone()), CKR_ARGUMENTS_BAD, "pReserved must be NULL");
        let mut both = CK_C_INITIALIZE_ARGS { flags: CKF_OS_LOCKING_OK, ..all };
        assert_eq!(call(&mut both), CKR_OK, "callbacks and OS locking: the library may choose OS locking");
        assert_eq!(unsafe { f.C_Finalize.unwrap()(null_mut()) }, CKR_OK);
        let mut no_threads = CK_C_INITIALIZE_ARGS { flags: CKF_LIBRARY_CANT_CREATE_OS_THREADS, ..Default::default() };
        assert_eq!(call(&mut no_threads), CKR_OK);
        println!("CHILD-DONE");
        return;
    };
    assert!(passed(out).0.contains("CHILD-DONE"));
}

#[test]
fn null_pointers_are_arguments_bad() {
    let Some(out) = in_child("lifecycle_cases::null_pointers_are_arguments_bad", &[]) else {
        let lib = unsafe { libloading::Library::new(common::shim_path()) }.unwrap();
        let get_list: libloading::Symbol<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV> =
            unsafe { lib.get(b"C_GetFunctionList\0") }.unwrap();
        assert_eq!(unsafe { get_list(null_mut()) }, CKR_ARGUMENTS_BAD);
        let get_iface: libloading::Symbol<
            unsafe extern "C" fn(*mut CK_UTF8CHAR, *mut CK_VERSION, *mut *mut CK_INTERFACE, CK_FLAGS) -> CK_RV,
        > = unsafe { lib.get(b"C_GetInterface\0") }.unwrap();
        assert_eq!(unsafe { get_iface(null_mut(), null_mut(), null_mut(), 0) }, CKR_ARGUMENTS_BAD);
        let list_ifaces: libloading::Symbol<unsafe extern "C" fn(*mut CK_INTERFACE, *mut CK_ULONG) -> CK_RV> =
            unsafe { lib.get(b"C_GetInterfaceList\0") }.unwrap();
        assert_eq!(unsafe { list_ifaces(null_mut(), null_mut()) }, CKR_ARGUMENTS_BAD);
        let f = shim();
        assert_eq!(initialize(f), CKR_OK);
        assert_eq!(unsafe { f.C_GetInfo.unwrap()(null_mut()) }, CKR_ARGUMENTS_BAD);
        assert_eq!(unsafe { f.C_GetSlotList.unwrap()(CK_FALSE, null_mut(), null_mut()) }, CKR_ARGUMENTS_BAD);
        let slot = make_token(f, "nulls", "123456");
        assert_eq!(
            unsafe { f.C_OpenSession.unwrap()(slot, CKF_SERIAL_SESSION, null_mut(), None, null_mut()) },
            CKR_ARGUMENTS_BAD
        );
        let session = open(f, slot);
        assert_eq!(unsafe { f.C_GetSessionInfo.unwrap()(session, null_mut()) }, CKR_ARGUMENTS_BAD);
        assert_eq!(unsafe { f.C_FindObjectsInit.unwrap()(session, null_mut(), 1) }, CKR_ARGUMENTS_BAD);
        println!("CHILD-DONE");
        return;
    };
    assert!(passed(out).0.contains("CHILD-DONE"));
}

#[test]
fn get_info_names_the_shim_and_the_backend() {
    let Some(out) = in_child("lifecycle_cases::get_info_names_the_shim_and_the_backend", &[]) else {
        let f = shim();
        assert_eq!(initialize(f), CKR_OK);
        let mut info: CK_INFO = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { f.C_GetInfo.unwrap()(&mut info) }, CKR_OK);
        assert_eq!(&info.manufacturerID, b"p11shim                         ");
        let mut description = [b' '; 32];
        let name = backend().shim_description();
        description[..name.len()].copy_from_slice(name.as_bytes());
        assert_eq!(String::from_utf8_lossy(&info.libraryDescription), String::from_utf8_lossy(&description));
        assert_eq!((info.libraryVersion.major, info.libraryVersion.minor), (0, 1));
        assert_eq!((info.cryptokiVersion.major, info.cryptokiVersion.minor), (2, 40));
        println!("CHILD-DONE");
        return;
    };
    assert!(passed(out).0.contains("CHILD-DONE"));
}

#[test]
fn the_log_never_holds_a_pin() {
    let log = common::test_dir().join("pins.log");
    let _ = std::fs::remove_file(&log);
    let path = write_config(
        "pins",
        &format!(
            "module = \"{}\"\nlog_file = \"{}\"\nlog_level = \"trace\"\n",
            common::backend_path().display(),
            log.display()
        ),
    );
    let test = "lifecycle_cases::the_log_never_holds_a_pin";
    let Some(out) = in_child(test, &[("P11SHIM_CONFIG", path.to_str().unwrap()), ("P11SHIM_MODULE", "")]) else {
        let f = shim();
        assert_eq!(initialize(f), CKR_OK);
        let slot = make_token(f, "pins", "secret-pin-4711");
        let session = open(f, slot);
        let pin = b"secret-pin-4711";
        assert_eq!(unsafe { f.C_Login.unwrap()(session, CKU_USER, pin.as_ptr() as *mut _, pin.len() as _) }, CKR_OK);
        let wrong = b"wrong-pin-0815";
        assert_eq!(unsafe { f.C_Logout.unwrap()(session) }, CKR_OK);
        let r = unsafe { f.C_Login.unwrap()(session, CKU_USER, wrong.as_ptr() as *mut _, wrong.len() as _) };
        assert_eq!(r, CKR_PIN_INCORRECT);
        assert_eq!(unsafe { f.C_Finalize.unwrap()(null_mut()) }, CKR_OK);
        return;
    };
    passed(out);
    let logged = std::fs::read_to_string(&log).expect("the log file");
    assert!(logged.contains("initialized over"), "the log is on: {logged}");
    assert!(!logged.contains("secret-pin-4711") && !logged.contains("wrong-pin-0815"), "{logged}");
    assert!(!logged.contains("so-pin-1234"), "{logged}");
}

#[test]
fn a_forked_child_can_initialize_and_work() {
    let Some(out) = in_child("lifecycle_cases::a_forked_child_can_initialize_and_work", &[]) else {
        let f = shim();
        assert_eq!(initialize(f), CKR_OK);
        let slot = make_token(f, "fork", "123456");
        let parent_session = open(f, slot);
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // The child: it must call C_Initialize, which must work, and then be able to use the token.
            let code = (|| {
                let r = initialize(f);
                if r != CKR_OK {
                    eprintln!("child C_Initialize: {}", rv(r));
                    return 2;
                }
                let session = open(f, slot);
                let pin = b"123456";
                let r = unsafe { f.C_Login.unwrap()(session, CKU_USER, pin.as_ptr() as *mut _, pin.len() as _) };
                if r != CKR_OK {
                    eprintln!("child C_Login: {}", rv(r));
                    return 3;
                }
                let mut random = [0u8; 16];
                let r = unsafe { f.C_GenerateRandom.unwrap()(session, random.as_mut_ptr(), 16) };
                if r != CKR_OK || random == [0; 16] {
                    eprintln!("child C_GenerateRandom: {}", rv(r));
                    return 4;
                }
                if unsafe { f.C_Finalize.unwrap()(null_mut()) } != CKR_OK {
                    return 5;
                }
                0
            })();
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child did not exit normally");
        assert_eq!(libc::WEXITSTATUS(status), 0, "child failed (see stderr)");
        // The parent is unaffected.
        assert!(session_valid(f, parent_session));
        assert_eq!(unsafe { f.C_Finalize.unwrap()(null_mut()) }, CKR_OK);
        println!("CHILD-DONE");
        return;
    };
    assert!(passed(out).0.contains("CHILD-DONE"));
}

/// The shim's own sessions (opened through the library's internals, as stored keys are)
/// survive the application's C_CloseAllSessions, while the application's sessions are closed.
#[test]
fn close_all_sessions_spares_the_shims_own_sessions() {
    let Some(out) = in_child("lifecycle_cases::close_all_sessions_spares_the_shims_own_sessions", &[]) else {
        // Linked as a Rust library here, so the test can reach the session table the shim uses.
        let mut list = null_mut();
        assert_eq!(unsafe { p11shim::ffi::exports::C_GetFunctionList(&mut list) }, CKR_OK);
        let f = unsafe { &*list };
        assert_eq!(initialize(f), CKR_OK);
        let slot = make_token(f, "closeall", "123456");
        let backend = p11shim::backend::loaded().expect("backend loaded");
        let internal = backend.open_session(slot, CKF_SERIAL_SESSION).expect("internal session");
        p11shim::sessions::opened_internal(internal, slot);
        let app = [open(f, slot), open(f, slot)];
        assert_eq!(unsafe { f.C_CloseSession.unwrap()(internal) }, CKR_SESSION_HANDLE_INVALID, "not the app's");
        assert_eq!(unsafe { f.C_CloseAllSessions.unwrap()(slot) }, CKR_OK);
        assert!(app.iter().all(|s| !session_valid(f, *s)), "the application's sessions are closed");
        assert!(session_valid(f, internal), "the shim's own session survives");
        // Without internal sessions C_CloseAllSessions is the backend's, return values included.
        p11shim::sessions::closed_internal(internal);
        backend.close_session(internal);
        let again = open(f, slot);
        assert_eq!(unsafe { f.C_CloseAllSessions.unwrap()(slot) }, CKR_OK);
        assert!(!session_valid(f, again));
        assert_eq!(unsafe { f.C_CloseAllSessions.unwrap()(0xdead_beef) }, CKR_SLOT_ID_INVALID);
        println!("CHILD-DONE");
        return;
    };
    assert!(passed(out).0.contains("CHILD-DONE"));
}
