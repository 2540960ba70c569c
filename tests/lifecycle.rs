//! The module's life cycle and set-up through the built libp11shim.so, against SoftHSM2: the cases in
//! tests/lifecycle_cases (which tests/lifecycle_cssim.rs runs against the simulator), and here the set-up
//! errors that never load a backend (exports, configuration errors, unloadable modules): they need no
//! second backend.

mod common;
mod lifecycle_cases;

use lifecycle_cases::*;
use std::process::Command;

#[test]
fn exports_exactly_the_three_interface_functions() {
    let out = Command::new("nm").args(["-D", "--defined-only"]).arg(common::shim_path()).output().expect("run nm");
    assert!(out.status.success(), "nm failed: {}", text(&out.stderr));
    let mut exported: Vec<String> = text(&out.stdout)
        .lines()
        .filter_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            // Functions and data the library defines; version-script and weak runtime symbols are not ours.
            (parts.len() == 3 && matches!(parts[1], "T" | "D" | "B" | "R")).then(|| parts[2].to_string())
        })
        .collect();
    exported.sort();
    assert_eq!(exported, ["C_GetFunctionList", "C_GetInterface", "C_GetInterfaceList"]);
}

#[test]
fn missing_config_file_is_named() {
    let line = failing_setup(
        "missing_config_file_is_named",
        &[("P11SHIM_CONFIG", "/nonexistent/p11shim.toml"), ("P11SHIM_MODULE", "")],
    );
    if std::env::var(CHILD).is_err() {
        assert!(line.contains("/nonexistent/p11shim.toml") && line.contains("cannot read"), "{line}");
    }
}

#[test]
fn unknown_config_key_is_named() {
    let path = write_config("unknown_key", "module = \"/usr/lib/softhsm/libsofthsm2.so\"\nlog_levle = \"debug\"\n");
    let line = failing_setup(
        "unknown_config_key_is_named",
        &[("P11SHIM_CONFIG", path.to_str().unwrap()), ("P11SHIM_MODULE", "")],
    );
    if std::env::var(CHILD).is_err() {
        assert!(line.contains(path.to_str().unwrap()) && line.contains("log_levle"), "{line}");
    }
}

#[test]
fn invalid_config_file_is_named() {
    let path = write_config("invalid", "module = [\n");
    let line = failing_setup(
        "invalid_config_file_is_named",
        &[("P11SHIM_CONFIG", path.to_str().unwrap()), ("P11SHIM_MODULE", "")],
    );
    if std::env::var(CHILD).is_err() {
        assert!(line.contains(path.to_str().unwrap()), "{line}");
    }
}

#[test]
fn module_that_cannot_be_loaded_is_named() {
    let line = failing_setup("module_that_cannot_be_loaded_is_named", &[("P11SHIM_MODULE", "/nonexistent/libhsm.so")]);
    if std::env::var(CHILD).is_err() {
        assert!(line.contains("/nonexistent/libhsm.so") && line.contains("cannot load"), "{line}");
    }
}

#[test]
fn library_without_pkcs11_entry_is_refused() {
    let line = failing_setup(
        "library_without_pkcs11_entry_is_refused",
        &[("P11SHIM_MODULE", "/lib/x86_64-linux-gnu/libz.so.1")],
    );
    if std::env::var(CHILD).is_err() {
        assert!(line.contains("libz.so.1") && line.contains("C_GetFunctionList"), "{line}");
    }
}

#[test]
fn setup_errors_go_to_the_log_file_when_there_is_one() {
    let log = common::test_dir().join("setup-errors.log");
    let _ = std::fs::remove_file(&log);
    let path = write_config(
        "log_file",
        &format!("module = \"/nonexistent/libhsm.so\"\nlog_file = \"{}\"\nlog_level = \"error\"\n", log.display()),
    );
    let test = "setup_errors_go_to_the_log_file_when_there_is_one";
    let Some(out) = in_child(test, &[("P11SHIM_CONFIG", path.to_str().unwrap()), ("P11SHIM_MODULE", "")]) else {
        println!("C_Initialize={}", rv(initialize(shim())));
        return;
    };
    let (stdout, stderr) = passed(out);
    assert!(stdout.contains("C_Initialize=CKR_GENERAL_ERROR"), "{stdout}");
    assert!(!stderr.contains("p11shim"), "nothing on stderr when a log file is set: {stderr}");
    let logged = std::fs::read_to_string(&log).expect("the log file");
    assert_eq!(logged.lines().count(), 1, "{logged}");
    assert!(logged.contains("/nonexistent/libhsm.so"), "{logged}");
}

/// `module` naming the shim itself (its own file, or a copy of it elsewhere) would forward every call to
/// itself: C_Initialize refuses it at once with one line that says so (it used to hang forever).
#[test]
fn the_shim_is_refused_as_its_own_backend() {
    let own = common::shim_path();
    let copy = common::test_dir().join("self-backend").join("libcopy-of-shim.so");
    if std::env::var(CHILD).is_err() {
        std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
        std::fs::copy(&own, &copy).expect("copy the shim");
    }
    for (case, module) in [("own file", own.clone()), ("a copy", copy.clone())] {
        let test = "the_shim_is_refused_as_its_own_backend";
        if std::env::var(CHILD).as_deref() == Ok(test) {
            if std::env::var("P11SHIM_MODULE").as_deref() == Ok(module.to_str().unwrap()) {
                println!("C_Initialize={}", rv(initialize(shim())));
            }
            continue;
        }
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, test)
            .env_remove("P11SHIM_CONFIG")
            .env("P11SHIM_MODULE", &module)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("re-run the test binary");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{case}: C_Initialize hung");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let (stdout, stderr) = passed(child.wait_with_output().unwrap());
        assert!(stdout.contains("C_Initialize=CKR_GENERAL_ERROR"), "{case}: {stdout}");
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("p11shim")).collect();
        assert_eq!(lines.len(), 1, "{case}: one line: {stderr}");
        assert!(
            lines[0].contains("p11shim itself") && lines[0].contains(module.to_str().unwrap()),
            "{case}: {}",
            lines[0]
        );
    }
}
