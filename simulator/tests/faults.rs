//! Fault injection, seen from outside: failing the Nth or every Nth call, seeded random failures, latency
//! (without holding locks), device removal and its reset, lost sessions, the environment replacing the
//! configuration's table, and a process dying in the middle of writing the state file (by the fault and by
//! SIGKILL at random moments) leaving the old or the new state, never a corrupt one.

mod common;

use common::*;
use cryptoki_sys::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn config(test: &str, extra: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = test_dir(test);
    let config = write_config(&dir, &format!("{}{extra}", two_slots("standard")));
    (dir, config)
}

#[test]
fn nth_and_every_nth_call_fail_with_the_given_value() {
    let (dir, config) = config("nth", "");
    let m = load_raw(&config, Some("fail = [{function=\"C_Digest\", nth=3, rv=0x30}, {function=\"C_DigestInit\", every=2, rv=\"CKR_DEVICE_MEMORY\"}]"));
    let h = m.open(0).unwrap();
    let results: Vec<_> = (0..6).map(|_| m.digest(h, b"x").err()).collect();
    // C_DigestInit calls 2, 4, 6 fail; calls 1, 3, 5 reach C_Digest calls 1, 2, 3, and the 3rd fails.
    assert_eq!(
        results,
        [None, Some(CKR_DEVICE_MEMORY), None, Some(CKR_DEVICE_MEMORY), Some(CKR_DEVICE_ERROR), Some(CKR_DEVICE_MEMORY)]
    );
    let log = log_of(&dir);
    assert!(log.contains("fault: C_Digest call 3 fails with 0x30"), "{log}");
    // Counting restarts with C_Initialize.
    assert_eq!(m.finalize(), CKR_OK);
    assert_eq!(m.initialize(), CKR_OK);
    let h = m.open(0).unwrap();
    assert_eq!(m.digest(h, b"x").err(), None);
}

#[test]
fn seeded_probability_repeats_exactly() {
    let (_dir, config) = config("probability", "");
    let run = |seed: u64| -> Vec<bool> {
        let m = load_raw(
            &config,
            Some(&format!("seed = {seed}\nfail = [{{function=\"C_GetInfo\", probability=0.5, rv=5}}]")),
        );
        (0..40).map(|_| m.info() == CKR_GENERAL_ERROR).collect()
    };
    let a = run(11);
    assert_eq!(a, run(11), "same seed, same failures");
    assert_ne!(a, run(12), "another seed, other failures");
    let n = a.iter().filter(|f| **f).count();
    assert!((8..=32).contains(&n), "{n} of 40 failed with p = 0.5");
    // `after`: every call after the first N.
    let m = load_raw(&config, Some("fail = [{function=\"C_GetInfo\", after=2, rv=5}]"));
    assert_eq!((0..4).map(|_| m.info()).collect::<Vec<_>>(), [CKR_OK, CKR_OK, CKR_GENERAL_ERROR, CKR_GENERAL_ERROR]);
}

#[test]
fn latency_is_added_without_holding_locks() {
    let (_dir, config) = config("latency", "");
    let m = load_raw(&config, Some("latency_us = 20000"));
    let start = Instant::now();
    for _ in 0..5 {
        assert_eq!(m.info(), CKR_OK);
    }
    let one_thread = start.elapsed();
    assert!(one_thread >= Duration::from_millis(100), "5 calls × 20 ms took {one_thread:?}");
    // 8 threads × 5 calls: serialized that would be 800 ms; sleeping outside the locks it is about 100 ms.
    let h = m.open(0).unwrap();
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..5 {
                    assert_eq!(m.session_state(h), Ok(CKS_RW_PUBLIC_SESSION));
                }
            });
        }
    });
    let parallel = start.elapsed();
    assert!(parallel < Duration::from_millis(500), "8 threads took {parallel:?}: latency is serialized");
}

#[test]
fn device_removal_until_the_reset_file_appears() {
    let (dir, config) = config("removal", "[faults]\nremove_after = 4\nreset_file = \"reset\"\n");
    let m = load_raw(&config, None);
    let h = m.open(0).unwrap(); // call 1
    assert_eq!(m.login(h, USER_PIN), CKR_OK); // 2
    assert_eq!(m.session_state(h), Ok(CKS_RW_USER_FUNCTIONS)); // 3
    assert_eq!(m.slot_flags(0).map(|f| f & CKF_TOKEN_PRESENT), Ok(CKF_TOKEN_PRESENT)); // 4
                                                                                       // From call 5 on the device is gone: the token is absent, everything else is CKR_DEVICE_REMOVED.
    assert_eq!(m.session_state(h), Err(CKR_DEVICE_REMOVED));
    assert_eq!(m.token_info(0).err(), Some(CKR_TOKEN_NOT_PRESENT));
    assert_eq!(m.slot_flags(0).map(|f| f & CKF_TOKEN_PRESENT), Ok(0));
    assert_eq!(m.slot_count(true), Ok(0));
    assert_eq!(m.slot_count(false), Ok(2));
    assert_eq!(m.info(), CKR_OK);
    assert_eq!(m.open(0), Err(CKR_DEVICE_REMOVED));
    assert_eq!(m.session_state(h), Err(CKR_DEVICE_REMOVED));
    assert!(log_of(&dir).contains("fault: device removed at call 5"), "{}", log_of(&dir));
    // The reset file brings it back (and is consumed); the old sessions are gone.
    std::fs::write(dir.join("reset"), b"").unwrap();
    assert_eq!(m.session_state(h), Err(CKR_SESSION_HANDLE_INVALID));
    assert!(!dir.join("reset").exists());
    let h2 = m.open(0).unwrap();
    assert_eq!(m.session_state(h2), Ok(CKS_RW_PUBLIC_SESSION), "the login ended with the device");
    assert!(m.token_info(0).is_ok());
    // Counting restarted at the reset: four calls later it is removed again.
    assert_eq!(m.session_state(h2), Err(CKR_DEVICE_REMOVED));
    // C_Finalize + C_Initialize is a reset too.
    assert_eq!(m.finalize(), CKR_OK);
    assert_eq!(m.initialize(), CKR_OK);
    assert!(m.open(0).is_ok());
}

#[test]
fn all_sessions_are_invalidated_at_the_chosen_call() {
    let (dir, config) = config("invalidate", "");
    let m = load_raw(&config, Some("invalidate_sessions_at = 4"));
    let a = m.open(0).unwrap(); // 1
    let b = m.open(1).err(); // 2: slot 1 has no token
    assert_eq!(b, Some(CKR_TOKEN_NOT_RECOGNIZED));
    assert_eq!(m.login(a, USER_PIN), CKR_OK); // 3
    assert_eq!(m.session_state(a), Err(CKR_SESSION_HANDLE_INVALID)); // 4: before it runs, all sessions go
    assert_eq!(m.digest(a, b"x").err(), Some(CKR_SESSION_HANDLE_INVALID));
    let c = m.open(0).unwrap();
    assert_ne!(c, a, "session handles are not reused");
    assert_eq!(m.session_state(c), Ok(CKS_RW_PUBLIC_SESSION), "the login went with the sessions");
    assert!(log_of(&dir).contains("all sessions invalidated at call 4"));
}

#[test]
fn the_environment_replaces_the_configured_faults() {
    let (_dir, config) = config("env", "[faults]\nfail = [{function=\"C_GetInfo\", rv=0x30}]\n");
    let m = load_raw(&config, None);
    assert_eq!(m.info(), CKR_DEVICE_ERROR);
    drop(m);
    let m = load_raw(&config, Some("fail = [{function=\"C_GetSlotList\", nth=1, rv=0x32}]"));
    assert_eq!(m.info(), CKR_OK);
    assert_eq!(m.slot_count(false), Err(CKR_DEVICE_REMOVED));
    assert_eq!(m.slot_count(false), Ok(2));
    drop(m);
    // A mistake in the fault syntax fails C_Initialize (with one line on stderr), it is not ignored.
    let m = load_raw(&config, Some("fail = [{function=\"C_GetInfo\", rv=1}]"));
    assert_eq!(m.finalize(), CKR_OK);
    std::env::set_var("CSSIM_FAULTS", "fial = []");
    assert_eq!(m.initialize(), CKR_GENERAL_ERROR);
    std::env::remove_var("CSSIM_FAULTS");
    assert_eq!(m.initialize(), CKR_OK);
}

/// The state file parses and holds this many token objects in slot 0.
fn objects_in_state(state: &Path) -> usize {
    let text = std::fs::read_to_string(state).expect("the state file exists");
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("corrupt state file: {e}\n{text}"));
    v["tokens"]["0"]["objects"].as_object().expect("slot 0's objects").len()
}

#[test]
fn a_crash_in_the_middle_of_a_write_leaves_the_old_state() {
    let (dir, config) = config("crash", "");
    let module = module_path();
    let keygen = |label: &str, faults: Option<&str>| {
        let mut cmd = Command::new(tool("pkcs11-tool", "opensc"));
        cmd.arg("--module").arg(&module).args(["--token-label", "test", "--login", "--pin", USER_PIN]);
        cmd.args(["--keygen", "--key-type", "AES:16", "--label", label]);
        run(cmd, &config, faults)
    };
    keygen("first", None).ok();
    let state = dir.join("state.json");
    let before = std::fs::read(&state).unwrap();
    assert_eq!(objects_in_state(&state), 1);
    // The first write of this process aborts it with half a temporary file on disk.
    let crashed = keygen("second", Some("crash_during_write = 1"));
    assert_ne!(crashed.code, Some(0), "{crashed:?}");
    assert_eq!(std::fs::read(&state).unwrap(), before, "the state file is untouched");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".state.json.tmp."))
        .collect();
    assert_eq!(leftovers.len(), 1, "the half-written temporary file");
    // The next process reads the old state, and its write removes the leftover.
    let listed =
        p11tool(&module, &config, &["--token-label", "test", "--login", "--pin", USER_PIN, "--list-objects"]).ok();
    assert!(listed.stdout.contains("first") && !listed.stdout.contains("second"), "{}", listed.stdout);
    keygen("third", None).ok();
    assert_eq!(objects_in_state(&state), 2);
    assert!(!std::fs::read_dir(&dir).unwrap().flatten().any(|e| e.file_name().to_string_lossy().contains(".tmp.")));
}

#[test]
fn sigkill_at_random_moments_never_corrupts_the_state() {
    let (dir, config) = config("sigkill", "");
    let writer = {
        let exe = std::env::current_exe().unwrap();
        let examples = exe.parent().unwrap().parent().unwrap().join("examples").join("cssim_writer");
        assert!(
            examples.exists(),
            "{} is missing: `cargo test -p cssim` (all targets) or `cargo build -p cssim --examples` builds it",
            examples.display()
        );
        examples
    };
    let state = dir.join("state.json");
    let mut previous = 0;
    // A fixed sequence of kill delays (a small LCG): repeatable, spread over start-up and the write loop.
    let mut x: u64 = 12345;
    for round in 0..8 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let delay = 150 + (x >> 33) % 250;
        let mut child = Command::new(&writer)
            .arg(module_path())
            .arg(USER_PIN)
            .env("CSSIM_CONFIG", &config)
            .env_remove("CSSIM_FAULTS")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "round {round}: the writer was killed");
        if state.exists() {
            let n = objects_in_state(&state);
            assert!(n >= previous, "round {round}: objects went from {previous} to {n}");
            previous = n;
        }
    }
    assert!(previous > 0, "the writer wrote something in 8 rounds");
    // The module reads what is left, and can write on top of it.
    let listed = p11tool(
        &module_path(),
        &config,
        &["--token-label", "test", "--login", "--pin", USER_PIN, "--list-objects", "--type", "data"],
    )
    .ok();
    assert_eq!(listed.stdout.matches("Data object").count(), previous, "{}", listed.stdout);
}
