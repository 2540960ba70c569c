//! The shim under real tools, over the backend of the test binary (tests/scripts.rs: SoftHSM2,
//! tests/scripts_cssim.rs: the simulator): OpenSC's `pkcs11-tool` gives the same output and exit status
//! through the shim as with the backend directly, and OpenSSL's pkcs11 engine (libengine-pkcs11-openssl)
//! signs with token keys and makes a self-signed certificate through the shim that plain OpenSSL accepts.
//!
//! Every test has its own backend directories (SoftHSM2 token directories or simulator state files; the
//! tools are separate processes; the env of each command names the config). A missing tool fails the test
//! with the package to install.
#![allow(dead_code)] // tests/scripts.rs uses `normalize` only

use crate::common::{self, backend, Backend};

use std::path::{Path, PathBuf};
use std::process::Command;

pub const SO_PIN: &str = "so-pin-1234";
pub const USER_PIN: &str = "user-pin-1234";

/// `name` on PATH, or a failure that says what to install.
pub fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed (apt-get install {package}); this test needs it"))
}

pub fn pkcs11_tool() -> PathBuf {
    tool("pkcs11-tool", "opensc")
}

pub fn openssl() -> PathBuf {
    tool("openssl", "openssl")
}

/// The output of one command.
#[derive(Debug, PartialEq)]
pub struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    #[track_caller]
    fn ok(self) -> Out {
        assert_eq!(self.code, Some(0), "command failed:\n{}{}", self.stdout, self.stderr);
        self
    }
}

/// The environment that points a process at the backend configured by `conf` (SoftHSM2's softhsm2.conf or
/// the simulator's cssim.toml), directly or through the shim.
pub fn backend_env(cmd: &mut Command, conf: &Path) {
    let var = match backend() {
        Backend::SoftHsm2 => "SOFTHSM2_CONF",
        Backend::Simulator => "CSSIM_CONFIG",
    };
    cmd.env(var, conf).env("P11SHIM_MODULE", common::backend_path()).env_remove("CSSIM_FAULTS");
}

/// Runs `cmd` with the backend configured by `conf` (and the shim pointed at it).
pub fn run(mut cmd: Command, conf: &Path) -> Out {
    backend_env(&mut cmd, conf);
    cmd.env_remove("P11SHIM_CONFIG").env_remove("OPENSSL_CONF").env_remove("PKCS11_MODULE_PATH");
    let what = format!("{cmd:?}");
    let o = cmd.output().unwrap_or_else(|e| panic!("running {what}: {e}"));
    Out {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// `pkcs11-tool --module <module> <args>`.
pub fn p11(module: &Path, conf: &Path, args: &[&str]) -> Out {
    let mut cmd = Command::new(pkcs11_tool());
    cmd.arg("--module").arg(module).args(args);
    run(cmd, conf)
}

/// A fresh backend directory for one test and one module, with its configuration (softhsm2.conf, or
/// cssim.toml with two empty slots).
pub fn fresh(test: &str, which: &str) -> (PathBuf, PathBuf) {
    let dir = common::test_dir().join(test).join(which);
    let conf = match backend() {
        Backend::SoftHsm2 => common::fresh_softhsm_dir(&dir),
        Backend::Simulator => common::fresh_cssim_dir(&dir, 2, ""),
    };
    (dir, conf)
}

/// Output with what differs between two runs by nature made uniform: slot ids and serial numbers
/// (SoftHSM2 makes them at random), key material, and the library lines of `--show-info`, which are the
/// shim's own.
pub fn normalize(text: &str) -> String {
    text.lines()
        .map(|line| {
            let t = line.trim_start();
            if t.starts_with("Manufacturer ") || t.starts_with("Library ") {
                return "<library info>".to_string();
            }
            if let Some((key, _)) = line.split_once("serial num") {
                return format!("{key}serial num <serial>");
            }
            mask_hex(line)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Replaces `0x` numbers of 5 digits or more (slot ids) by `0x<id>` and runs of 32 or more hex digits
/// (key material) by `<hex>`.
pub fn mask_hex(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '0' && chars.get(i + 1) == Some(&'x') {
            let n = chars[i + 2..].iter().take_while(|c| c.is_ascii_hexdigit()).count();
            if n >= 5 {
                out.push_str("0x<id>");
                i += 2 + n;
                continue;
            }
        }
        if chars[i].is_ascii_hexdigit() && (i == 0 || !chars[i - 1].is_ascii_alphanumeric()) {
            let n = chars[i..].iter().take_while(|c| c.is_ascii_hexdigit()).count();
            if n >= 32 {
                out.push_str("<hex>");
                i += n;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

#[track_caller]
pub fn assert_same(what: &str, direct: &Out, shim: &Out) {
    assert_eq!(
        shim.code, direct.code,
        "{what}: exit status through the shim vs direct\nshim: {shim:#?}\ndirect: {direct:#?}"
    );
    assert_eq!(normalize(&shim.stdout), normalize(&direct.stdout), "{what}: stdout through the shim vs direct");
    assert_eq!(normalize(&shim.stderr), normalize(&direct.stderr), "{what}: stderr through the shim vs direct");
}

/// Initializes the token "tools" with a user PIN in the directory of `conf`, through `module`.
pub fn init_token(module: &Path, conf: &Path) -> Vec<Out> {
    vec![
        p11(module, conf, &["--init-token", "--slot-index", "0", "--label", "tools", "--so-pin", SO_PIN]),
        p11(
            module,
            conf,
            &[
                "--token-label",
                "tools",
                "--init-pin",
                "--login",
                "--login-type",
                "so",
                "--so-pin",
                SO_PIN,
                "--pin",
                USER_PIN,
            ],
        ),
    ]
}

pub fn keygen(module: &Path, conf: &Path, key_type: &str, id: &str, label: &str) -> Out {
    p11(
        module,
        conf,
        &[
            "--token-label",
            "tools",
            "--login",
            "--pin",
            USER_PIN,
            "--keypairgen",
            "--key-type",
            key_type,
            "--id",
            id,
            "--label",
            label,
        ],
    )
}

#[test]
pub fn pkcs11_tool_init_keygen_and_listings_match_direct() {
    let shim = common::shim_path();
    let direct_module = common::backend_path();
    let mut logs = Vec::new();
    for (which, module) in [("direct", &direct_module), ("shim", &shim)] {
        let (_, conf) = fresh("listings", which);
        let mut log = vec![
            p11(module, &conf, &["--show-info"]),
            p11(module, &conf, &["--list-slots"]),
            p11(module, &conf, &["--list-token-slots"]),
        ];
        log.extend(init_token(module, &conf));
        log.push(p11(module, &conf, &["--list-slots"]));
        log.push(p11(module, &conf, &["--token-label", "tools", "--list-mechanisms"]));
        log.push(keygen(module, &conf, "EC:prime256v1", "01", "ec"));
        log.push(keygen(module, &conf, "EC:secp384r1", "03", "ec384"));
        log.push(keygen(module, &conf, "rsa:2048", "02", "rsa"));
        log.push(keygen(module, &conf, "EC:no-such-curve", "04", "bad"));
        log.push(p11(module, &conf, &["--token-label", "tools", "--login", "--pin", "wrong-pin", "--list-objects"]));
        log.push(p11(module, &conf, &["--token-label", "no-such-token", "--list-objects"]));
        logs.push((conf, log));
    }
    let (direct_conf, direct) = &logs[0];
    let (shim_conf, through_shim) = &logs[1];
    assert_eq!(direct.len(), through_shim.len());
    let steps = [
        "--show-info",
        "--list-slots",
        "--list-token-slots",
        "--init-token",
        "--init-pin",
        "--list-slots after init",
        "--list-mechanisms",
        "--keypairgen EC:prime256v1",
        "--keypairgen EC:secp384r1",
        "--keypairgen rsa:2048",
        "--keypairgen EC:no-such-curve",
        "--list-objects with a wrong PIN",
        "--list-objects on a missing token",
    ];
    for ((step, d), s) in steps.iter().zip(direct).zip(through_shim) {
        assert_same(step, d, s);
    }
    // The steps that should work did, and the failures are the expected ones.
    for i in 0..=10 {
        if i != 10 {
            assert_eq!(direct[i].code, Some(0), "{}: {:#?}", steps[i], direct[i]);
        }
    }
    assert_ne!(direct[10].code, Some(0), "unknown curve");
    assert!(direct[11].stderr.contains("CKR_PIN_INCORRECT"), "{:#?}", direct[11]);
    assert_ne!(direct[12].code, Some(0));
    // --show-info names the shim and the backend.
    assert!(through_shim[0].stdout.contains("Manufacturer     p11shim"), "{}", through_shim[0].stdout);
    assert!(through_shim[0].stdout.contains(&backend().shim_description()), "{}", through_shim[0].stdout);
    assert!(
        direct[0].stdout.contains(&format!("Manufacturer     {}", backend().manufacturer())),
        "{}",
        direct[0].stdout
    );
    assert!(direct[7].stdout.contains("EC_POINT 256 bits") && direct[9].stdout.contains("RSA 2048 bits"));

    // Listing the objects of one token directory: the same through the shim and direct (one directory,
    // so the same order of objects).
    for conf in [direct_conf, shim_conf] {
        let args = ["--token-label", "tools", "--login", "--pin", USER_PIN, "--list-objects"];
        let d = p11(&direct_module, conf, &args).ok();
        let s = p11(&shim, conf, &args).ok();
        assert_eq!(s, d, "--list-objects of one token directory");
        assert_eq!(d.stdout.matches("Private Key Object").count(), 3, "{}", d.stdout);
        assert_eq!(d.stdout.matches("Public Key Object").count(), 3, "{}", d.stdout);
    }
}

/// A token "tools" with RSA-2048 (id 02, "rsa") and P-256 (id 01, "ec") keys made through the shim.
pub fn token_with_keys(test: &str) -> (PathBuf, PathBuf) {
    let shim = common::shim_path();
    let (dir, conf) = fresh(test, "token");
    for out in init_token(&shim, &conf) {
        out.ok();
    }
    keygen(&shim, &conf, "rsa:2048", "02", "rsa").ok();
    keygen(&shim, &conf, "EC:prime256v1", "01", "ec").ok();
    (dir, conf)
}

/// Exports the public key with this label as PEM (pkcs11-tool through the shim, then plain OpenSSL).
pub fn export_public_key(dir: &Path, conf: &Path, label: &str) -> PathBuf {
    let der = dir.join(format!("{label}.pub.der"));
    let pem = dir.join(format!("{label}.pub.pem"));
    p11(
        &common::shim_path(),
        conf,
        &[
            "--token-label",
            "tools",
            "--read-object",
            "--type",
            "pubkey",
            "--label",
            label,
            "--output-file",
            der.to_str().unwrap(),
        ],
    )
    .ok();
    let mut cmd = Command::new(openssl());
    cmd.args(["pkey", "-pubin", "-inform", "DER", "-in"]).arg(&der).arg("-out").arg(&pem);
    run(cmd, conf).ok();
    pem
}

/// `openssl dgst -sha256 -verify <pem> -signature <sig> <data>` with plain OpenSSL (no engine).
pub fn openssl_verify(conf: &Path, pem: &Path, sig: &Path, data: &Path) -> Out {
    let mut cmd = Command::new(openssl());
    cmd.args(["dgst", "-sha256", "-verify"]).arg(pem).arg("-signature").arg(sig).arg(data);
    run(cmd, conf)
}

#[test]
pub fn pkcs11_tool_sign_verify_and_self_test_match_direct() {
    let shim = common::shim_path();
    let direct_module = common::backend_path();
    let (dir, conf) = token_with_keys("sign");
    let data = dir.join("data.txt");
    std::fs::write(&data, b"signed by pkcs11-tool through p11shim\n").unwrap();
    let mut cmd = Command::new(openssl());
    let digest = dir.join("data.sha256");
    cmd.args(["dgst", "-sha256", "-binary", "-out"]).arg(&digest).arg(&data);
    run(cmd, &conf).ok();

    let sign = |module: &Path, args: &[&str], input: &Path, out: &Path| {
        let mut a = vec!["--token-label", "tools", "--login", "--pin", USER_PIN, "--sign"];
        a.extend(args);
        a.extend(["--input-file", input.to_str().unwrap(), "--output-file", out.to_str().unwrap()]);
        p11(module, &conf, &a)
    };
    // RSA PKCS#1 v1.5 is deterministic: the same signature through the shim and direct.
    let (rsa_shim, rsa_direct) = (dir.join("rsa.shim.sig"), dir.join("rsa.direct.sig"));
    let s = sign(&shim, &["--id", "02", "--mechanism", "SHA256-RSA-PKCS"], &data, &rsa_shim);
    let d = sign(&direct_module, &["--id", "02", "--mechanism", "SHA256-RSA-PKCS"], &data, &rsa_direct);
    assert_same("--sign SHA256-RSA-PKCS", &d, &s);
    assert_eq!(s.code, Some(0), "{s:#?}");
    let sig = std::fs::read(&rsa_shim).unwrap();
    assert_eq!(sig.len(), 256);
    assert_eq!(sig, std::fs::read(&rsa_direct).unwrap(), "the RSA signature through the shim equals direct");
    let rsa_pem = export_public_key(&dir, &conf, "rsa");
    let v = openssl_verify(&conf, &rsa_pem, &rsa_shim, &data).ok();
    assert!(v.stdout.contains("Verified OK"), "{v:#?}");

    // ECDSA over the SHA-256 digest (SoftHSM2 2.6.1 has no ECDSA-SHA256), DER-encoded for OpenSSL.
    let ec_pem = export_public_key(&dir, &conf, "ec");
    for (module, name) in [(&shim, "shim"), (&direct_module, "direct")] {
        let out = dir.join(format!("ec.{name}.sig"));
        sign(module, &["--id", "01", "--mechanism", "ECDSA", "--signature-format", "openssl"], &digest, &out).ok();
        let v = openssl_verify(&conf, &ec_pem, &out, &data).ok();
        assert!(v.stdout.contains("Verified OK"), "{name}: {v:#?}");
    }
    // A tampered message does not verify.
    let other = dir.join("other.txt");
    std::fs::write(&other, b"not what was signed\n").unwrap();
    let v = openssl_verify(&conf, &ec_pem, &dir.join("ec.shim.sig"), &other);
    assert_ne!(v.code, Some(0), "{v:#?}");

    // pkcs11-tool --verify through the shim and direct (it exits 0 either way and says which).
    for (input, expected) in [(&data, "Signature is valid"), (&other, "Invalid signature")] {
        let mut args = vec!["--token-label", "tools", "--verify", "--id", "02", "--mechanism", "SHA256-RSA-PKCS"];
        args.extend(["--input-file", input.to_str().unwrap(), "--signature-file", rsa_shim.to_str().unwrap()]);
        let s = p11(&shim, &conf, &args);
        assert_same("--verify", &p11(&direct_module, &conf, &args), &s);
        assert!(s.stdout.contains(expected), "{s:#?}");
    }

    // The self-test: the same output and exit status. (With SoftHSM2 2.6.1 it ends in a failure of its
    // own: its RSA-OAEP takes SHA-1 only.)
    let args = ["--token-label", "tools", "--login", "--pin", USER_PIN, "--test"];
    let d = p11(&direct_module, &conf, &args);
    let s = p11(&shim, &conf, &args);
    assert_same("--test", &d, &s);
    assert!(s.stdout.contains("all 4 digest functions seem to work"), "{s:#?}");
    assert!(s.stdout.contains("RSA-PKCS: OK"), "{s:#?}");
    // Listing the objects: the same.
    let args = ["--token-label", "tools", "--login", "--pin", USER_PIN, "--list-objects"];
    assert_eq!(p11(&shim, &conf, &args).ok(), p11(&direct_module, &conf, &args).ok());
}

/// The OpenSSL engines directory (`openssl version -e`).
pub fn engines_dir() -> PathBuf {
    let out = Command::new(openssl()).args(["version", "-e"]).output().expect("openssl version -e");
    let text = String::from_utf8_lossy(&out.stdout);
    let dir =
        text.split('"').nth(1).unwrap_or_else(|| panic!("cannot read ENGINESDIR from `openssl version -e`: {text}"));
    PathBuf::from(dir)
}

/// An OpenSSL config that loads the pkcs11 engine with `module`.
pub fn engine_config(dir: &Path, module: &Path) -> PathBuf {
    let engine = engines_dir().join("pkcs11.so");
    assert!(
        engine.exists(),
        "{} is missing (apt-get install libengine-pkcs11-openssl); this test needs it",
        engine.display()
    );
    let path = dir.join(format!("openssl-{}.cnf", module.file_stem().unwrap().to_string_lossy()));
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

/// `openssl <args>` with the pkcs11 engine loading `module` (config file and PKCS11_MODULE_PATH).
pub fn openssl_engine(config: &Path, module: &Path, conf: &Path, args: &[&str]) -> Out {
    let mut cmd = Command::new(openssl());
    cmd.args(args);
    backend_env(&mut cmd, conf);
    cmd.env_remove("P11SHIM_CONFIG").env("OPENSSL_CONF", config).env("PKCS11_MODULE_PATH", module);
    let o = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    Out {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

pub fn key_uri(label: &str) -> String {
    format!("pkcs11:token=tools;object={label};type=private?pin-value={USER_PIN}")
}

#[test]
pub fn openssl_engine_signs_and_certifies_with_token_keys() {
    let shim = common::shim_path();
    let direct_module = common::backend_path();
    let (dir, conf) = token_with_keys("engine");
    let config = engine_config(&dir, &shim);
    let data = dir.join("data.txt");
    std::fs::write(&data, b"signed by openssl through the pkcs11 engine and p11shim\n").unwrap();

    for label in ["rsa", "ec"] {
        let sig = dir.join(format!("{label}.engine.sig"));
        let out = openssl_engine(
            &config,
            &shim,
            &conf,
            &[
                "dgst",
                "-sha256",
                "-engine",
                "pkcs11",
                "-keyform",
                "engine",
                "-sign",
                &key_uri(label),
                "-out",
                sig.to_str().unwrap(),
                data.to_str().unwrap(),
            ],
        )
        .ok();
        assert!(out.stderr.contains("Engine \"pkcs11\" set"), "{out:#?}");
        let pem = export_public_key(&dir, &conf, label);
        let v = openssl_verify(&conf, &pem, &sig, &data).ok();
        assert!(v.stdout.contains("Verified OK"), "{label}: {v:#?}");
    }
    // RSA PKCS#1 v1.5 is deterministic: the engine gives the same signature over the backend directly.
    let direct_config = engine_config(&dir, &direct_module);
    let direct_sig = dir.join("rsa.direct.sig");
    openssl_engine(
        &direct_config,
        &direct_module,
        &conf,
        &[
            "dgst",
            "-sha256",
            "-engine",
            "pkcs11",
            "-keyform",
            "engine",
            "-sign",
            &key_uri("rsa"),
            "-out",
            direct_sig.to_str().unwrap(),
            data.to_str().unwrap(),
        ],
    )
    .ok();
    assert_eq!(std::fs::read(dir.join("rsa.engine.sig")).unwrap(), std::fs::read(&direct_sig).unwrap());
    // A wrong PIN fails.
    let bad = openssl_engine(
        &config,
        &shim,
        &conf,
        &[
            "dgst",
            "-sha256",
            "-engine",
            "pkcs11",
            "-keyform",
            "engine",
            "-sign",
            "pkcs11:token=tools;object=rsa;type=private?pin-value=wrong-pin",
            "-out",
            dir.join("bad.sig").to_str().unwrap(),
            data.to_str().unwrap(),
        ],
    );
    assert_ne!(bad.code, Some(0), "{bad:#?}");

    // Self-signed certificates with each key; plain OpenSSL verifies them, and their public key is the
    // token's.
    for label in ["rsa", "ec"] {
        let cert = dir.join(format!("{label}.cert.pem"));
        openssl_engine(
            &config,
            &shim,
            &conf,
            &[
                "req",
                "-new",
                "-x509",
                "-engine",
                "pkcs11",
                "-keyform",
                "engine",
                "-key",
                &key_uri(label),
                "-subj",
                &format!("/CN=p11shim {label} test"),
                "-days",
                "1",
                "-sha256",
                "-out",
                cert.to_str().unwrap(),
            ],
        )
        .ok();
        let mut cmd = Command::new(openssl());
        cmd.args(["verify", "-CAfile"]).arg(&cert).arg(&cert);
        let v = run(cmd, &conf).ok();
        assert!(v.stdout.trim_end().ends_with(": OK"), "{label}: {v:#?}");
        let mut cmd = Command::new(openssl());
        cmd.args(["x509", "-noout", "-pubkey", "-in"]).arg(&cert);
        let cert_key = run(cmd, &conf).ok().stdout;
        let token_key = std::fs::read_to_string(dir.join(format!("{label}.pub.pem"))).unwrap();
        assert_eq!(cert_key, token_key, "{label}: the certificate holds the token's public key");
        let mut cmd = Command::new(openssl());
        cmd.args(["x509", "-noout", "-subject", "-in"]).arg(&cert);
        let subject = run(cmd, &conf).ok().stdout;
        assert!(subject.contains(&format!("p11shim {label} test")), "{subject}");
    }
}
