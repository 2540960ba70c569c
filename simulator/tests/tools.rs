//! The simulator under real tools, directly and through p11shim (P11SHIM_MODULE=libcssim.so): OpenSC's
//! `pkcs11-tool` initializes a token, makes RSA, EC and AES keys and passes `--test`; OpenSSL's pkcs11 engine
//! signs with simulator keys through the shim and plain OpenSSL verifies the signatures.
//!
//! Needs `pkcs11-tool` (opensc), `openssl`, libengine-pkcs11-openssl, and the shim built in this profile
//! (`cargo build -p p11shim --lib`); a missing one fails the test with what to install or build.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const TOKEN: &str = "tools";

fn openssl() -> PathBuf {
    tool("openssl", "openssl")
}

/// A fresh, uninitialized simulator and the token "tools" made by pkcs11-tool through `module`, with an
/// RSA-2048 key pair (id 02, "rsa"), a P-256 key pair (id 01, "ec") and an AES-256 key (id 03, "aes").
fn token_with_keys(test: &str, module: &Path) -> (PathBuf, PathBuf) {
    let dir = test_dir(test);
    let config = write_config(&dir, "[[slot]]\n");
    p11tool(module, &config, &["--init-token", "--slot-index", "0", "--label", TOKEN, "--so-pin", SO_PIN]).ok();
    p11tool(
        module,
        &config,
        &["--token-label", TOKEN, "--init-pin", "--login", "--login-type", "so", "--so-pin", SO_PIN, "--pin", USER_PIN],
    )
    .ok();
    let login = ["--token-label", TOKEN, "--login", "--pin", USER_PIN];
    for (kind, key, id, label) in [
        ("--keypairgen", "rsa:2048", "02", "rsa"),
        ("--keypairgen", "EC:prime256v1", "01", "ec"),
        ("--keygen", "AES:32", "03", "aes"),
    ] {
        let mut args = login.to_vec();
        args.extend([kind, "--key-type", key, "--id", id, "--label", label]);
        let out = p11tool(module, &config, &args).ok();
        assert!(out.stdout.contains("generated"), "{out:?}");
    }
    (dir, config)
}

/// `pkcs11-tool --test` passes: the checks it prints and "No errors".
#[track_caller]
fn assert_self_test(out: &Out) {
    assert_eq!(out.code, Some(0), "{out:#?}");
    for line in [
        "C_SeedRandom() and C_GenerateRandom():\n  seems to be OK",
        "all 4 digest functions seem to work",
        "all 4 signature functions seem to work",
        "RSA-PKCS: OK",
        "SHA256-RSA-PKCS: OK",
        "No errors",
    ] {
        assert!(out.stdout.contains(line), "`{line}` missing from --test:\n{}{}", out.stdout, out.stderr);
    }
    assert!(!out.stdout.contains("ERR") && !out.stdout.to_lowercase().contains("failed"), "{}", out.stdout);
}

#[test]
fn pkcs11_tool_test_passes_directly_and_through_the_shim() {
    let sim = module_path();
    let shim = shim_path();
    let (_dir, config) = token_with_keys("selftest", &sim);
    let listing = p11tool(&sim, &config, &["--list-slots"]).ok();
    assert!(listing.stdout.contains("SLOT_0000") && listing.stdout.contains("CSSIM standard"), "{}", listing.stdout);
    let args = ["--token-label", TOKEN, "--login", "--pin", USER_PIN, "--test"];
    let direct = p11tool(&sim, &config, &args);
    assert_self_test(&direct);
    // Through the shim: its own library info in front of the simulator's, and the same self-test.
    let info = p11tool(&shim, &config, &["--show-info"]).ok();
    assert!(
        info.stdout.contains("Manufacturer     p11shim") && info.stdout.contains("p11shim/Utimaco"),
        "{}",
        info.stdout
    );
    let through = p11tool(&shim, &config, &args);
    assert_self_test(&through);
    assert_eq!(through.stdout, direct.stdout, "--test through the shim and direct");
    let list = ["--token-label", TOKEN, "--login", "--pin", USER_PIN, "--list-objects"];
    let direct = p11tool(&sim, &config, &list).ok();
    assert_eq!(p11tool(&shim, &config, &list).ok(), direct);
    assert_eq!(direct.stdout.matches("Private Key Object").count(), 2, "{}", direct.stdout);
    assert_eq!(direct.stdout.matches("Secret Key Object; AES length 32").count(), 1, "{}", direct.stdout);
}

/// Exports a public key as PEM (pkcs11-tool, then plain OpenSSL).
fn export_public_key(module: &Path, dir: &Path, config: &Path, label: &str) -> PathBuf {
    let der = dir.join(format!("{label}.pub.der"));
    let pem = dir.join(format!("{label}.pub.pem"));
    let der_arg = der.to_str().unwrap();
    p11tool(
        module,
        config,
        &["--token-label", TOKEN, "--read-object", "--type", "pubkey", "--label", label, "--output-file", der_arg],
    )
    .ok();
    let mut cmd = Command::new(openssl());
    cmd.args(["pkey", "-pubin", "-inform", "DER", "-in"]).arg(&der).arg("-out").arg(&pem);
    run(cmd, config, None).ok();
    pem
}

fn openssl_verify(config: &Path, pem: &Path, sig: &Path, digest: &Path) -> Out {
    let mut cmd = Command::new(openssl());
    cmd.args(["pkeyutl", "-verify", "-pubin", "-inkey"]).arg(pem).arg("-in").arg(digest).arg("-sigfile").arg(sig);
    cmd.args(["-pkeyopt", "digest:sha256"]);
    run(cmd, config, None)
}

#[test]
fn pkcs11_tool_signs_through_the_shim_and_openssl_verifies() {
    let sim = module_path();
    let shim = shim_path();
    let (dir, config) = token_with_keys("sign", &shim);
    let data = dir.join("data.txt");
    std::fs::write(&data, b"signed by the simulator through p11shim\n").unwrap();
    let digest = dir.join("data.sha256");
    let mut cmd = Command::new(openssl());
    cmd.args(["dgst", "-sha256", "-binary", "-out"]).arg(&digest).arg(&data);
    run(cmd, &config, None).ok();
    let sign = |module: &Path, args: &[&str], input: &Path, out: &Path| {
        let mut a = vec!["--token-label", TOKEN, "--login", "--pin", USER_PIN, "--sign"];
        a.extend(args);
        a.extend(["--input-file", input.to_str().unwrap(), "--output-file", out.to_str().unwrap()]);
        p11tool(module, &config, &a).ok()
    };
    // RSA PKCS#1 v1.5 is deterministic: the same bytes through the shim and direct; OpenSSL verifies them.
    let (rsa_shim, rsa_direct) = (dir.join("rsa.shim.sig"), dir.join("rsa.direct.sig"));
    sign(&shim, &["--id", "02", "--mechanism", "SHA256-RSA-PKCS"], &data, &rsa_shim);
    sign(&sim, &["--id", "02", "--mechanism", "SHA256-RSA-PKCS"], &data, &rsa_direct);
    assert_eq!(std::fs::read(&rsa_shim).unwrap(), std::fs::read(&rsa_direct).unwrap());
    let rsa_pem = export_public_key(&shim, &dir, &config, "rsa");
    let v = openssl_verify(&config, &rsa_pem, &rsa_shim, &digest).ok();
    assert!(v.stdout.contains("Signature Verified Successfully"), "{v:#?}");
    // ECDSA over the digest, DER-encoded for OpenSSL; and ECDSA-SHA256 in the token.
    let ec_pem = export_public_key(&shim, &dir, &config, "ec");
    let ec_sig = dir.join("ec.sig");
    sign(&shim, &["--id", "01", "--mechanism", "ECDSA", "--signature-format", "openssl"], &digest, &ec_sig);
    let v = openssl_verify(&config, &ec_pem, &ec_sig, &digest).ok();
    assert!(v.stdout.contains("Signature Verified Successfully"), "{v:#?}");
    let ec_sig2 = dir.join("ec2.sig");
    sign(&shim, &["--id", "01", "--mechanism", "ECDSA-SHA256", "--signature-format", "openssl"], &data, &ec_sig2);
    openssl_verify(&config, &ec_pem, &ec_sig2, &digest).ok();
    // A signature over other data does not verify.
    let other = dir.join("other.sha256");
    std::fs::write(&other, [0u8; 32]).unwrap();
    assert_ne!(openssl_verify(&config, &ec_pem, &ec_sig, &other).code, Some(0));
}

/// An OpenSSL config that loads the pkcs11 engine with `module`.
fn engine_config(dir: &Path, module: &Path) -> PathBuf {
    let out = Command::new(openssl()).args(["version", "-e"]).output().expect("openssl version -e");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let engines = PathBuf::from(text.split('"').nth(1).unwrap_or_else(|| panic!("no ENGINESDIR in `{text}`")));
    let engine = engines.join("pkcs11.so");
    assert!(engine.exists(), "{} is missing (apt-get install libengine-pkcs11-openssl)", engine.display());
    let path = dir.join("openssl-engine.cnf");
    std::fs::write(
        &path,
        format!(
            "openssl_conf = openssl_init\n\n[openssl_init]\nengines = engine_section\n\n[engine_section]\npkcs11 = pkcs11_section\n\n\
             [pkcs11_section]\nengine_id = pkcs11\ndynamic_path = {}\nMODULE_PATH = {}\ninit = 0\n",
            engine.display(),
            module.display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn openssl_engine_signs_with_simulator_keys_through_the_shim() {
    let shim = shim_path();
    let (dir, config) = token_with_keys("engine", &shim);
    let engine = engine_config(&dir, &shim);
    let digest = dir.join("data.sha256");
    std::fs::write(&digest, [0x5a; 32]).unwrap();
    for label in ["ec", "rsa"] {
        let sig = dir.join(format!("{label}.engine.sig"));
        let uri = format!("pkcs11:token={TOKEN};object={label};type=private?pin-value={USER_PIN}");
        let mut cmd = Command::new(openssl());
        cmd.args(["pkeyutl", "-engine", "pkcs11", "-keyform", "engine", "-sign", "-inkey", &uri, "-in"]);
        cmd.arg(&digest).arg("-out").arg(&sig).args(["-pkeyopt", "digest:sha256"]);
        cmd.env("CSSIM_CONFIG", &config)
            .env("P11SHIM_MODULE", module_path())
            .env_remove("P11SHIM_CONFIG")
            .env_remove("CSSIM_FAULTS")
            .env("OPENSSL_CONF", &engine)
            .env("PKCS11_MODULE_PATH", &shim);
        let o = cmd.output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success() && stderr.contains("Engine \"pkcs11\" set"), "{label}: {stdout}{stderr}");
        assert!(std::fs::metadata(&sig).unwrap().len() > 0);
        let pem = export_public_key(&shim, &dir, &config, label);
        let v = openssl_verify(&config, &pem, &sig, &digest).ok();
        assert!(v.stdout.contains("Signature Verified Successfully"), "{label}: {v:#?}");
    }
}
