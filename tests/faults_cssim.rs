//! Reliability through the shim with the simulator's fault injection (simulator/README.md, "Fault
//! injection"): a device error in the middle of multi-part operations, lost sessions (also under the shim's
//! own sessions of a database slot), a network HSM's latency with eight threads, and a device removed and
//! returned. In every case the application gets the backend's CK_RV unchanged, and the shim works again
//! afterwards. Simulator only: SoftHSM2 cannot inject faults.
//!
//! Faults are read at C_Initialize and counted per process, so every test runs its body in a child process
//! (this binary re-run with `FAULTS_CHILD` set) with its own device (`<test dir>/<test>/cssim.toml`, one
//! pre-initialized token) and `CSSIM_FAULTS`. The child loads the shim with cryptoki and prints what it
//! measured; the parent checks the exit status, with a deadline (a hang is a failure, not a stuck suite).

mod common;

use common::{SO_PIN, USER_PIN};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD: &str = "FAULTS_CHILD";
/// The label of the pre-initialized token on slot 0.
const TOKEN: &str = "faults";

/// The device of one test: `<test dir>/<test>`, with `cssim.toml` (token [`TOKEN`] on SLOT_0000, one empty
/// slot), its state file and its log.
fn device_dir(test: &str) -> PathBuf {
    common::test_dir().join(test)
}

fn write_device(test: &str) -> PathBuf {
    let dir = device_dir(test);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("cssim.toml");
    std::fs::write(
        &conf,
        format!(
            "state = \"cssim-state.json\"\nlog_file = \"cssim.log\"\n[[slot]]\nlabel = \"{TOKEN}\"\n\
             so_pin = \"{SO_PIN}\"\nuser_pin = \"{USER_PIN}\"\n[[slot]]\n"
        ),
    )
    .unwrap();
    common::give_device_mbk(&conf);
    conf
}

/// In the parent: runs `test` in a child with the device of [`write_device`] (made by the caller), the
/// faults `faults` (the body of a `[faults]` table) and `envs`; fails if the child fails or runs longer
/// than `deadline`; returns its stdout. In the child: None, and the caller runs the body.
fn in_child(test: &str, faults: &str, envs: &[(&str, PathBuf)], deadline: Duration) -> Option<String> {
    if std::env::var(CHILD).as_deref() == Ok(test) {
        return None;
    }
    let dir = device_dir(test);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, test)
        .env("CSSIM_CONFIG", dir.join("cssim.toml"))
        .env("CSSIM_FAULTS", faults)
        .env("P11SHIM_MODULE", common::cssim_path())
        .env_remove("P11SHIM_CONFIG")
        .envs(envs.iter().map(|(k, v)| (*k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("re-run the test binary");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{test}: the child did not finish within {deadline:?} (a deadlock?)\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let log = std::fs::read_to_string(dir.join("cssim.log")).unwrap_or_default();
    assert!(
        status.success(),
        "{test}: child failed ({status})\nstdout:\n{stdout}\nstderr:\n{stderr}\ncssim.log:\n{log}"
    );
    assert!(stdout.contains("CHILD-DONE"), "{test}: the body did not run\n{stdout}");
    Some(stdout.into_owned())
}

/// The shim, loaded with cryptoki in the child (never finalized: the process ends).
fn shim() -> Pkcs11 {
    let p = Pkcs11::new(common::shim_path()).expect("load the shim");
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("C_Initialize through the shim");
    p
}

fn token_slot(p: &Pkcs11) -> Slot {
    p.get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|&s| p.get_token_info(s).map(|i| i.label() == TOKEN).unwrap_or(false))
        .expect("the faults token")
}

fn login(s: &Session) {
    match s.login(UserType::User, Some(&AuthPin::new(USER_PIN.into()))) {
        Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("C_Login: {e}"),
    }
}

fn user_session(p: &Pkcs11, slot: Slot) -> Session {
    let s = p.open_rw_session(slot).expect("C_OpenSession");
    login(&s);
    s
}

/// The CK_RV of a failed call (panics if it worked or failed outside PKCS#11).
#[track_caller]
fn rv<T: std::fmt::Debug>(r: cryptoki::error::Result<T>) -> RvError {
    match r {
        Err(Error::Pkcs11(rv, _)) => rv,
        other => panic!("expected a PKCS#11 error, got {other:?}"),
    }
}

fn aes_key(s: &Session, token: bool, label: &str) -> ObjectHandle {
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Token(token),
            Attribute::ValueLen(32.into()),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(label.as_bytes().to_vec()),
        ],
    )
    .expect("C_GenerateKey AES")
}

fn hmac_key(s: &Session) -> ObjectHandle {
    s.generate_key(
        &Mechanism::GenericSecretKeyGen,
        &[Attribute::Token(false), Attribute::ValueLen(32.into()), Attribute::Sign(true), Attribute::Verify(true)],
    )
    .expect("C_GenerateKey generic secret")
}

/// Calls `op` until it fails (at most `limit` times) and returns the failure and how many calls worked.
fn until_failure(limit: usize, mut op: impl FnMut() -> cryptoki::error::Result<()>) -> (RvError, usize) {
    for i in 0..limit {
        if let Err(e) = op() {
            return (rv::<()>(Err(e)), i);
        }
    }
    panic!("no failure within {limit} calls: the fault did not fire");
}

fn done() {
    println!("CHILD-DONE");
}

// ---------------------------------------------------------------------------------------------------

/// The 3rd C_SignUpdate and the 2nd update of a multi-part encryption (C_EncryptUpdate call 4: cryptoki asks
/// for the output length first) fail with CKR_DEVICE_ERROR: the application gets
/// exactly that, the operation is over (as PKCS#11 says of a failed update), and the same session runs new
/// operations whose results equal the single-part ones.
#[test]
fn device_error_in_the_middle_of_multi_part_operations() {
    let test = "device_error_in_the_middle_of_multi_part_operations";
    let faults = r#"fail = [{function="C_SignUpdate", nth=3, rv="CKR_DEVICE_ERROR"}, {function="C_EncryptUpdate", nth=4, rv="CKR_DEVICE_ERROR"}]"#;
    if std::env::var(CHILD).is_err() {
        write_device(test);
    }
    let Some(_) = in_child(test, faults, &[], Duration::from_secs(60)) else {
        let p = shim();
        let s = user_session(&p, token_slot(&p));
        let mac_key = hmac_key(&s);
        let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let whole = s.sign(&Mechanism::Sha256Hmac, mac_key, &data).unwrap();

        s.sign_init(&Mechanism::Sha256Hmac, mac_key).unwrap();
        s.sign_update(&data[..100]).unwrap();
        s.sign_update(&data[100..200]).unwrap();
        assert_eq!(rv(s.sign_update(&data[200..])), RvError::DeviceError, "the backend's CK_RV, unchanged");
        // The failed update ended the operation: a new one starts on the same session and gives the same MAC.
        s.sign_init(&Mechanism::Sha256Hmac, mac_key).expect("C_SignInit after the device error");
        for part in data.chunks(100) {
            s.sign_update(part).unwrap();
        }
        assert_eq!(s.sign_final().unwrap(), whole);

        let key = aes_key(&s, false, "aes");
        let iv = [5u8; 16];
        let single = s.encrypt(&Mechanism::AesCbcPad(iv), key, &data).unwrap();
        s.encrypt_init(&Mechanism::AesCbcPad(iv), key).unwrap();
        s.encrypt_update(&data[..64]).unwrap();
        assert_eq!(rv(s.encrypt_update(&data[64..])), RvError::DeviceError);
        s.encrypt_init(&Mechanism::AesCbcPad(iv), key).expect("C_EncryptInit after the device error");
        let mut multi = Vec::new();
        for part in data.chunks(64) {
            multi.extend(s.encrypt_update(part).unwrap());
        }
        multi.extend(s.encrypt_final().unwrap());
        assert_eq!(multi, single);
        assert_eq!(s.decrypt(&Mechanism::AesCbcPad(iv), key, &multi).unwrap(), data);
        done();
        return;
    };
    let log = std::fs::read_to_string(device_dir(test).join("cssim.log")).unwrap();
    assert!(log.contains("fault: C_SignUpdate call 3 fails with 0x30"), "{log}");
    assert!(log.contains("fault: C_EncryptUpdate call 4 fails with 0x30"), "{log}");
}

/// All sessions of the process are closed by the device at call 60: the application's next call gets
/// CKR_SESSION_HANDLE_INVALID unchanged, every old handle is dead, and new sessions log in and work with
/// new and old token keys.
#[test]
fn lost_sessions_are_reported_unchanged_and_new_sessions_work() {
    let test = "lost_sessions_are_reported_unchanged_and_new_sessions_work";
    if std::env::var(CHILD).is_err() {
        write_device(test);
    }
    let Some(_) = in_child(test, "invalidate_sessions_at = 60", &[], Duration::from_secs(60)) else {
        let p = shim();
        let slot = token_slot(&p);
        let s = user_session(&p, slot);
        let other = p.open_ro_session(slot).unwrap();
        let token_key = aes_key(&s, true, "kept");
        let session_key = aes_key(&s, false, "lost");
        let block = [9u8; 16];
        let expected = s.encrypt(&Mechanism::AesEcb, token_key, &block).unwrap();
        let (failure, worked) = until_failure(200, || s.encrypt(&Mechanism::AesEcb, session_key, &block).map(|_| ()));
        assert_eq!(failure, RvError::SessionHandleInvalid, "after {worked} encryptions");
        assert_eq!(rv(other.get_session_info()), RvError::SessionHandleInvalid, "every session is gone");
        let s = user_session(&p, slot);
        assert_eq!(s.encrypt(&Mechanism::AesEcb, token_key, &block).unwrap(), expected, "a token key works on");
        let fresh = aes_key(&s, false, "new");
        s.encrypt(&Mechanism::AesEcb, fresh, &block).expect("a new session key works");
        assert!(s.encrypt(&Mechanism::AesEcb, session_key, &block).is_err(), "the session key died with its session");
        std::mem::forget(other);
        done();
        return;
    };
    let log = std::fs::read_to_string(device_dir(test).join("cssim.log")).unwrap();
    assert!(log.contains("all sessions invalidated at call 60"), "{log}");
}

/// A database slot over the simulator (SQLite key store): the device closes every session of the process,
/// the application's and the shim's own (where stored keys are loaded). The application reopens its
/// session and logs in; its stored keys keep their handles and work again.
#[test]
fn stored_keys_work_after_the_shims_own_sessions_were_lost() {
    let test = "stored_keys_work_after_the_shims_own_sessions_were_lost";
    let dir = device_dir(test);
    let config = dir.join("p11shim.toml");
    if std::env::var(CHILD).is_err() {
        let cssim = write_device(test);
        std::fs::write(
            &config,
            format!(
                "module = \"{}\"\nlog_file = \"shim.log\"\nlog_level = \"info\"\n[store]\nurl = \"sqlite:{}\"\n\
                 [[slot]]\ntoken = \"{TOKEN}\"\nstorage = \"database\"\n",
                common::cssim_path().display(),
                dir.join("keys.db").display()
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_p11shim"))
            .args(["mbk", "create", "--token", TOKEN])
            .env("P11SHIM_CONFIG", &config)
            .env("CSSIM_CONFIG", &cssim)
            .env_remove("CSSIM_FAULTS")
            .env("P11SHIM_SO_PIN", SO_PIN)
            .env("P11SHIM_USER_PIN", USER_PIN)
            .output()
            .unwrap();
        assert!(out.status.success(), "p11shim mbk create: {}", String::from_utf8_lossy(&out.stderr));
    }
    let envs = [("P11SHIM_CONFIG", config.clone())];
    let Some(_) = in_child(test, "invalidate_sessions_at = 120", &envs, Duration::from_secs(60)) else {
        let p = shim();
        let slot = token_slot(&p);
        let s = user_session(&p, slot);
        let stored = aes_key(&s, true, "stored");
        assert!(stored.handle() & (1 << 63) != 0, "a stored key (shim handle)");
        let block = [3u8; 16];
        let expected = s.encrypt(&Mechanism::AesEcb, stored, &block).expect("the stored key loads and works");
        let (failure, worked) = until_failure(300, || s.encrypt(&Mechanism::AesEcb, stored, &block).map(|_| ()));
        assert_eq!(failure, RvError::SessionHandleInvalid, "after {worked} encryptions");
        let s = user_session(&p, slot);
        assert_eq!(
            s.encrypt(&Mechanism::AesEcb, stored, &block).expect("the stored key after the sessions were lost"),
            expected
        );
        let found = s.find_objects(&[Attribute::Label(b"stored".to_vec())]).unwrap();
        assert_eq!(found, vec![stored], "the same handle");
        let second = aes_key(&s, true, "second");
        s.encrypt(&Mechanism::AesEcb, second, &block).expect("a new stored key");
        done();
        return;
    };
    let log = std::fs::read_to_string(dir.join("cssim.log")).unwrap();
    assert!(log.contains("all sessions invalidated at call 120"), "{log}");
}

/// Every call of the device takes 2 ms (a network HSM; the simulator sleeps holding no lock). Eight
/// threads, each with its own session, do random and HMAC calls at once: no deadlock, and throughput scales
/// with threads because the shim holds no lock across a backend call. Asserts at least 3× the calls per
/// second of one thread (8× is the ideal; the machine may have 2 cores, but the threads mostly sleep).
#[test]
fn latency_of_2ms_with_eight_threads_scales() {
    let test = "latency_of_2ms_with_eight_threads_scales";
    if std::env::var(CHILD).is_err() {
        write_device(test);
    }
    /// Per thread: this many random + HMAC pairs, each pair 4 backend calls of 2 ms (C_GenerateRandom,
    /// C_SignInit, C_Sign for the length, C_Sign).
    const PAIRS: usize = 25;
    let Some(stdout) = in_child(test, "latency_us = 2000", &[], Duration::from_secs(120)) else {
        let p = shim();
        let slot = token_slot(&p);
        let setup = user_session(&p, slot);
        let key = setup
            .generate_key(
                &Mechanism::GenericSecretKeyGen,
                &[
                    Attribute::Token(true),
                    Attribute::ValueLen(32.into()),
                    Attribute::Sign(true),
                    Attribute::Verify(true),
                ],
            )
            .unwrap();
        let work = |s: &Session| {
            for i in 0..PAIRS {
                let mut buf = [0u8; 16];
                s.generate_random_slice(&mut buf).unwrap();
                s.sign(&Mechanism::Sha256Hmac, key, &[i as u8; 20]).unwrap();
            }
        };
        let ops_per_second = |threads: usize| {
            // Each thread opens its session, then all start together (the clock starts with them).
            let barrier = std::sync::Barrier::new(threads + 1);
            let started = std::thread::scope(|scope| {
                for _ in 0..threads {
                    let barrier = &barrier;
                    let p = &p;
                    scope.spawn(move || {
                        let s = p.open_ro_session(slot).unwrap();
                        barrier.wait();
                        work(&s);
                    });
                }
                barrier.wait();
                Instant::now()
            });
            // The scope has joined every thread.
            let elapsed = started.elapsed();
            (elapsed, (threads * PAIRS * 2) as f64 / elapsed.as_secs_f64())
        };
        let (t1, one) = ops_per_second(1);
        let (t8, eight) = ops_per_second(8);
        println!("RESULT 1 thread: {} ops (random or HMAC) in {t1:.2?} = {one:.0} ops/s", PAIRS * 2);
        println!("RESULT 8 threads: {} ops in {t8:.2?} = {eight:.0} ops/s", 8 * PAIRS * 2);
        println!("RESULT speed-up {:.1}x", eight / one);
        assert!(eight >= 3.0 * one, "8 threads: {eight:.0} ops/s, 1 thread: {one:.0} ops/s");
        done();
        return;
    };
    let dir = device_dir(test);
    let figures: String = stdout.lines().filter_map(|l| l.find("RESULT").map(|i| format!("{}\n", &l[i..]))).collect();
    // Shown with --nocapture, and kept in <test dir>/throughput.txt: the figures of this machine.
    print!("{figures}");
    std::fs::write(dir.join("throughput.txt"), figures).unwrap();
}

/// The device goes away after 80 calls: the application gets CKR_DEVICE_REMOVED (and CKR_TOKEN_NOT_PRESENT
/// from C_GetTokenInfo, no slot with a token) unchanged. When the device is back (the reset file appears),
/// old sessions stay invalid, new sessions log in and work with the token's keys; a C_Finalize and
/// C_Initialize afterwards work too.
#[test]
fn device_removed_and_returned() {
    let test = "device_removed_and_returned";
    if std::env::var(CHILD).is_err() {
        write_device(test);
    }
    let faults = "remove_after = 80\nreset_file = \"reset\"";
    let Some(_) = in_child(test, faults, &[], Duration::from_secs(60)) else {
        let p = shim();
        let slot = token_slot(&p);
        let s = user_session(&p, slot);
        let key = aes_key(&s, true, "survivor");
        let block = [7u8; 16];
        let expected = s.encrypt(&Mechanism::AesEcb, key, &block).unwrap();
        let (failure, worked) = until_failure(300, || s.encrypt(&Mechanism::AesEcb, key, &block).map(|_| ()));
        assert_eq!(failure, RvError::DeviceRemoved, "after {worked} encryptions");
        assert_eq!(rv(s.generate_random_vec(8)), RvError::DeviceRemoved);
        assert_eq!(rv(p.get_token_info(slot)), RvError::TokenNotPresent);
        assert!(p.get_slots_with_token().unwrap().is_empty(), "no token present");
        assert!(!p.get_slot_info(slot).unwrap().token_present());
        assert_eq!(rv(p.open_rw_session(slot)), RvError::DeviceRemoved);

        std::fs::write(device_dir(test).join("reset"), b"").unwrap();
        assert_eq!(rv(s.generate_random_vec(8)), RvError::SessionHandleInvalid, "old sessions stay invalid");
        let s2 = user_session(&p, slot);
        let key2 = s2.find_objects(&[Attribute::Label(b"survivor".to_vec())]).unwrap();
        assert_eq!(key2.len(), 1, "the token key is still there");
        assert_eq!(s2.encrypt(&Mechanism::AesEcb, key2[0], &block).unwrap(), expected);
        std::mem::forget(s);
        drop(s2);

        // A full restart of the library over the returned device.
        p.finalize().expect("C_Finalize");
        let p = shim();
        let s3 = user_session(&p, token_slot(&p));
        let key3 = s3.find_objects(&[Attribute::Label(b"survivor".to_vec())]).unwrap();
        assert_eq!(s3.encrypt(&Mechanism::AesEcb, key3[0], &block).unwrap(), expected);
        done();
        return;
    };
    let log = std::fs::read_to_string(device_dir(test).join("cssim.log")).unwrap();
    assert!(log.contains("device removed at call 81"), "{log}");
    assert!(log.contains("device back"), "{log}");
}
