//! The vendor interface "P11SHIM Backup" from C: a C program compiled with `cc` against include/p11shim.h
//! (and Debian's p11-kit pkcs11.h) makes a stored key, exports its group, verifies the file, destroys the
//! key, imports the file and checks the restored key is the same key (tests/c/backup_roundtrip.c).
mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn a_c_program_round_trips_a_key_through_the_backup_interface() {
    let shim = common::shim_path();
    let dir = common::test_dir();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));

    // A SoftHSM2 token made a database slot, with its MBK.
    let out = Command::new("bash")
        .arg(root.join("softhsm-config/setup-token.sh"))
        .args([dir.join("hsm").to_str().unwrap(), "capi", "so-pin-1", "user-pin-1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "setup-token.sh: {}", String::from_utf8_lossy(&out.stderr));
    let conf = dir.join("hsm/softhsm2.conf");
    let config = dir.join("p11shim.toml");
    std::fs::write(
        &config,
        format!(
            "module = \"{}\"\nlog_file = \"shim.log\"\n[store]\nurl = \"sqlite:keys.db\"\n[[slot]]\ntoken = \"capi\"\nstorage = \"database\"\n",
            common::SOFTHSM
        ),
    )
    .unwrap();
    let env = [("SOFTHSM2_CONF", conf.as_os_str()), ("P11SHIM_CONFIG", config.as_os_str())];
    let mbk = Command::new(env!("CARGO_BIN_EXE_p11shim"))
        .args(["mbk", "create", "--token", "capi"])
        .envs(env)
        .env_remove("P11SHIM_MODULE")
        .env("P11SHIM_SO_PIN", "so-pin-1")
        .env("P11SHIM_USER_PIN", "user-pin-1")
        .output()
        .unwrap();
    assert!(mbk.status.success(), "mbk create: {}", String::from_utf8_lossy(&mbk.stderr));

    let exe = dir.join("backup_roundtrip");
    let cc = Command::new("cc")
        .args(["-Wall", "-Wextra", "-Werror", "-std=c11", "-D_DEFAULT_SOURCE"])
        .arg("-I")
        .arg(root.join("include"))
        .args(["-I", "/usr/include/p11-kit-1", "-o"])
        .arg(&exe)
        .arg(root.join("tests/c/backup_roundtrip.c"))
        .arg("-ldl")
        .output()
        .expect("cc (build-essential)");
    assert!(
        cc.status.success(),
        "cc: {} (needs libp11-kit-dev for pkcs11.h: scripts/install-deps.sh)",
        String::from_utf8_lossy(&cc.stderr)
    );
    let run = Command::new(&exe)
        .arg(&shim)
        .args(["capi", "user-pin-1"])
        .arg(dir.join("capi.backup"))
        .envs(env)
        .env_remove("P11SHIM_MODULE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success() && stdout.ends_with("PASS\n"), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("ok   the restored key is the same key"));
    assert!(dir.join("capi.backup").exists());
}
