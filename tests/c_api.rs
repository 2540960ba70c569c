//! The vendor interface "P11SHIM Backup" 2.0 from C: a C program compiled with `cc` against include/p11shim.h
//! (and Debian's p11-kit pkcs11.h, OpenSSL for Ed25519) logs users of the permission model on to a session
//! and checks every refusal and permission (tests/c/backup_roundtrip.c): no logon, a user of another group,
//! stacked logons reaching the mask, a signature logon, group changes; then a stored key's round trip through
//! export, verify, import. Afterwards the audit log holds what it did, sealed, and verifies.
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
            "module = \"{}\"\nlog_file = \"shim.log\"\n[store]\nurl = \"sqlite:keys.db\"\n[logon]\ndelay = \"200ms\"\n[[slot]]\ntoken = \"capi\"\nstorage = \"database\"\n",
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
    let cli = |args: &[&str], extra: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_p11shim"))
            .args(args)
            .envs(env)
            .envs(extra.iter().copied())
            .env_remove("P11SHIM_MODULE")
            .output()
            .unwrap();
        assert!(out.status.success(), "p11shim {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(
        &["user", "add", "admin", "--perm", "10000000", "--group-regex", ".*", "--password"],
        &[("P11SHIM_SO_PIN", "so-pin-1"), ("P11SHIM_NEW_PASSWORD", "admin-pass")],
    );
    let admin = [("P11SHIM_PASSWORD_ADMIN", "admin-pass")];
    for (name, perm, regex, password) in
        [("hrops", "00000002", "HR.*", "hrops-pass"), ("half1", "00000001", "CApi", "half1-pass")]
    {
        let mut env = admin.to_vec();
        env.push(("P11SHIM_NEW_PASSWORD", password));
        cli(&["user", "add", name, "--perm", perm, "--group-regex", regex, "--password", "--logon", "admin"], &env);
    }
    let half2_key = dir.join("half2.pem");
    let half2_pub = dir.join("half2.pub");
    for args in [
        vec!["genpkey", "-algorithm", "ed25519", "-out", half2_key.to_str().unwrap()],
        vec!["pkey", "-in", half2_key.to_str().unwrap(), "-pubout", "-out", half2_pub.to_str().unwrap()],
    ] {
        let out = Command::new("openssl").args(&args).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    cli(
        &["user", "add", "half2", "--perm", "00000001", "--group-regex", "CApi", "--sign-key"]
            .into_iter()
            .chain([half2_pub.to_str().unwrap(), "--logon", "admin"])
            .collect::<Vec<_>>(),
        &admin,
    );

    let exe = dir.join("backup_roundtrip");
    let cc = Command::new("cc")
        .args(["-Wall", "-Wextra", "-Werror", "-std=c11", "-D_DEFAULT_SOURCE"])
        .arg("-I")
        .arg(root.join("include"))
        .args(["-I", "/usr/include/p11-kit-1", "-o"])
        .arg(&exe)
        .arg(root.join("tests/c/backup_roundtrip.c"))
        .args(["-ldl", "-lcrypto"])
        .output()
        .expect("cc (build-essential)");
    assert!(
        cc.status.success(),
        "cc: {} (needs libp11-kit-dev for pkcs11.h and libssl-dev: scripts/install-deps.sh)",
        String::from_utf8_lossy(&cc.stderr)
    );
    let run = Command::new(&exe)
        .arg(&shim)
        .args(["capi", "user-pin-1"])
        .arg(dir.join("capi.backup"))
        .arg(&half2_key)
        .envs(env)
        .env_remove("P11SHIM_MODULE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success() && stdout.ends_with("PASS\n"), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("ok   the restored key is the same key"));
    assert!(dir.join("capi.backup").exists());

    // What the program did is in the audit log, under the names of the users who did it, and the log verifies.
    let log: Vec<serde_json::Value> = serde_json::from_str(&cli(&["audit", "show", "--json"], &[])).unwrap();
    let has = |who: &str, action: &str, result: &str| {
        log.iter().any(|e| {
            e["who"] == who
                && e["action"] == action
                && e["result"].as_str().is_some_and(|r| r.contains(result))
                && e["mac"].as_str().is_some_and(|m| m.len() == 64)
        })
    };
    assert!(has("hrops", "refused: backup", "export denied"), "{log:#?}");
    assert!(has("-", "refused: backup", ""), "the export without a logon is recorded: {log:#?}");
    assert!(has("hrops", "refused: logon (password)", "wrong password"), "{log:#?}");
    assert!(has("half1,half2", "backup", "ok"), "{log:#?}");
    assert!(has("half1,half2", "restore", "ok: 1 added"), "{log:#?}");
    assert!(has("hrops", "key group change", "ok"), "{log:#?}");
    assert!(has("half1,half2,hrops", "key group change", "ok"), "{log:#?}");
    assert!(has("half1,half2", "refused: key group change", "denied"), "{log:#?}");
    let verified = cli(&["audit", "verify"], &[]);
    assert!(verified.contains("intact") && verified.contains("MAC verified in the HSM"), "{verified}");
}
