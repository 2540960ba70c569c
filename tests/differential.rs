//! Differential test against SoftHSM2: the script of tests/differential_cases (which
//! tests/differential_cssim.rs runs against the simulator), and here a test of how SoftHSM2 loaded directly
//! and through the shim in one process shares one instance, which depends on SoftHSM2's slot numbering.

mod common;
mod differential_cases;

use cryptoki_sys::*;
use differential_cases::{init_args, SO_PIN};
use std::process::Command;
use std::ptr::null_mut;

#[test]
/// SoftHSM2 loaded directly and through the shim in one process is one instance. When the application
/// initialized it directly first, the shim's C_Initialize succeeds and its C_Finalize leaves it initialized;
/// when the shim initialized it, the shim's C_Finalize finalizes it. Runs in a child process of its own.
fn shim_and_direct_share_one_softhsm_instance() {
    const CHILD: &str = "P11SHIM_SHARED_CHILD";
    if std::env::var_os(CHILD).is_some() {
        shared_instance_child();
        return;
    }
    let dir = common::test_dir().join("shared");
    let conf = common::fresh_softhsm_dir(&dir);
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["shim_and_direct_share_one_softhsm_instance", "--exact", "--nocapture", "--test-threads", "1"])
        .env(CHILD, "1")
        .env("SOFTHSM2_CONF", &conf)
        .env("P11SHIM_MODULE", common::SOFTHSM)
        .env_remove("P11SHIM_CONFIG")
        .output()
        .expect("re-run the test binary");
    assert!(
        out.status.success(),
        "child failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn shared_instance_child() {
    let direct = common::raw_functions(&common::softhsm_path());
    let shim = common::raw_functions(&common::shim_path());
    let slot_count = |f: &CK_FUNCTION_LIST| {
        let mut n: CK_ULONG = 0;
        // SAFETY: NULL list asks for the count.
        let rv = unsafe { f.C_GetSlotList.unwrap()(CK_FALSE, null_mut(), &mut n) };
        (rv, n)
    };
    let init = |f: &CK_FUNCTION_LIST| {
        let mut args = init_args(CKF_OS_LOCKING_OK);
        // SAFETY: valid CK_C_INITIALIZE_ARGS.
        unsafe { f.C_Initialize.unwrap()((&mut args as *mut CK_C_INITIALIZE_ARGS).cast()) }
    };
    // SAFETY: NULL is the only valid argument.
    let finalize = |f: &CK_FUNCTION_LIST| unsafe { f.C_Finalize.unwrap()(null_mut()) };
    let session_valid = |f: &CK_FUNCTION_LIST, s: CK_SESSION_HANDLE| {
        let mut info: CK_SESSION_INFO = Default::default();
        // SAFETY: valid out pointer.
        unsafe { f.C_GetSessionInfo.unwrap()(s, &mut info) }
    };

    // The application initialized SoftHSM2 itself, then loads the shim.
    assert_eq!(init(direct), CKR_OK);
    assert_eq!(init(shim), CKR_OK, "the shim accepts a backend that is already initialized");
    assert_eq!(init(shim), CKR_CRYPTOKI_ALREADY_INITIALIZED);
    assert_eq!(slot_count(shim), slot_count(direct));
    let mut s: CK_SESSION_HANDLE = 0;
    // SAFETY: valid out pointer; no callback.
    let rv = unsafe { shim.C_OpenSession.unwrap()(0, CKF_SERIAL_SESSION, null_mut(), None, &mut s) };
    // Slot 0 holds an uninitialized token: SoftHSM2 refuses a session on it, the same either way.
    let mut d: CK_SESSION_HANDLE = 0;
    // SAFETY: as above.
    let rv_direct = unsafe { direct.C_OpenSession.unwrap()(0, CKF_SERIAL_SESSION, null_mut(), None, &mut d) };
    assert_eq!(rv, rv_direct);
    let mut label = [b' '; 32];
    label[..6].copy_from_slice(b"shared");
    // SAFETY: PIN and a 32-byte label.
    let rv = unsafe {
        shim.C_InitToken.unwrap()(0, SO_PIN.as_ptr() as *mut u8, SO_PIN.len() as CK_ULONG, label.as_mut_ptr())
    };
    assert_eq!(rv, CKR_OK);
    // SoftHSM2 adds the next empty slot when asked for the count.
    assert_eq!(slot_count(direct), (CKR_OK, 2), "the token initialized through the shim is seen directly");
    let mut slots = [0 as CK_SLOT_ID; 4];
    let mut n: CK_ULONG = 4;
    // SAFETY: room for 4.
    assert_eq!(unsafe { direct.C_GetSlotList.unwrap()(CK_TRUE, slots.as_mut_ptr(), &mut n) }, CKR_OK);
    assert_eq!(n, 2);
    let slot = slots[0];
    // SAFETY: valid out pointer; no callback.
    let rv = unsafe { shim.C_OpenSession.unwrap()(slot, CKF_SERIAL_SESSION, null_mut(), None, &mut s) };
    assert_eq!(rv, CKR_OK);
    assert_eq!(session_valid(direct, s), CKR_OK, "one instance: the shim's session is SoftHSM2's");

    // The shim's C_Finalize leaves the backend to its owner.
    assert_eq!(finalize(shim), CKR_OK);
    assert_eq!(slot_count(shim).0, CKR_CRYPTOKI_NOT_INITIALIZED);
    assert_eq!(slot_count(direct).0, CKR_OK, "SoftHSM2 is still initialized");
    assert_eq!(session_valid(direct, s), CKR_OK, "and its sessions are still open");
    assert_eq!(init(shim), CKR_OK);
    assert_eq!(session_valid(shim, s), CKR_OK);
    assert_eq!(finalize(shim), CKR_OK);
    assert_eq!(finalize(direct), CKR_OK);
    assert_eq!(slot_count(direct).0, CKR_CRYPTOKI_NOT_INITIALIZED);

    // The shim initialized SoftHSM2: its C_Finalize finalizes it.
    assert_eq!(init(shim), CKR_OK);
    assert_eq!(init(direct), CKR_CRYPTOKI_ALREADY_INITIALIZED, "one instance");
    assert_eq!(finalize(shim), CKR_OK);
    assert_eq!(slot_count(direct).0, CKR_CRYPTOKI_NOT_INITIALIZED);
    assert_eq!(finalize(direct), CKR_CRYPTOKI_NOT_INITIALIZED);
}
