//! The HSM's own master backup key, end to end over simulated CryptoServers: devices get their MBK as
//! administrators give it (generated inside one device, loaded into another from m-of-n shares), p11shim keeps
//! stored keys as the device's blobs and makes no MBK object, per-group backups move between devices that
//! hold the same MBK and nowhere else, hosts with devices of one MBK share one key store, a whole-store
//! backup moves into another store, and a device without its MBK is named as such. Everything runs in child
//! processes (the `p11shim` command, pkcs11-tool through the shim and on the simulator itself).
mod common;

use common::{SO_PIN, USER_PIN};
use p11shim::store::{self, KeyQuery};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TOKEN: &str = "keys";
const GROUP: &str = "Pay";

/// A simulated CryptoServer: its configuration (one initialized token, [`TOKEN`]) and state.
struct Device {
    conf: PathBuf,
}

impl Device {
    fn new(root: &Path, name: &str) -> Device {
        Device::in_mode(root, name, "standard")
    }

    /// A device whose firmware runs in `mode` ("standard", "fips" or "cc").
    fn in_mode(root: &Path, name: &str, mode: &str) -> Device {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("cssim.toml");
        std::fs::write(
            &conf,
            format!(
                "state = \"cssim-state.json\"\nlog_file = \"cssim.log\"\nmode = \"{mode}\"\n\
                 [[slot]]\nlabel = \"{TOKEN}\"\nso_pin = \"{SO_PIN}\"\nuser_pin = \"{USER_PIN}\"\n"
            ),
        )
        .unwrap();
        Device { conf }
    }

    fn admin(&self, args: &[&str]) -> String {
        common::cssim_admin(&self.conf, args)
    }

    /// The device's MBK fingerprint as its own tool shows it.
    fn fingerprint(&self) -> String {
        let shown = self.admin(&["mbk", "show"]);
        shown.lines().find_map(|l| l.strip_prefix("fingerprint:")).expect("an MBK").trim().to_string()
    }

    /// Labels of every object of the token, as the simulator itself lists them (a logged-in session).
    fn objects(&self) -> Vec<String> {
        let out = Command::new("pkcs11-tool")
            .arg("--module")
            .arg(common::cssim_path())
            .args(["--token-label", TOKEN, "--login", "--pin", USER_PIN, "--list-objects"])
            .env("CSSIM_CONFIG", &self.conf)
            .env_remove("CSSIM_FAULTS")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("label:"))
            .map(|l| l.trim().to_string())
            .collect()
    }
}

/// A host: p11shim with a database slot on a device's token and a key store of its own (or another host's).
struct Host {
    dir: PathBuf,
    conf: PathBuf,
    url: String,
}

impl Host {
    fn new(root: &Path, name: &str, device: &Device, store: &str) -> Host {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite:{}", root.join(store).display());
        std::fs::write(
            dir.join("p11shim.toml"),
            format!(
                "module = \"{}\"\nlog_file = \"shim.log\"\n[store]\nurl = \"{url}\"\n\
                 [[slot]]\ntoken = \"{TOKEN}\"\nstorage = \"database\"\ndefault_group = \"{GROUP}\"\n",
                common::cssim_path().display()
            ),
        )
        .unwrap();
        Host { dir, conf: device.conf.clone(), url }
    }

    fn env(&self, c: &mut Command) {
        c.current_dir(&self.dir)
            .env("CSSIM_CONFIG", &self.conf)
            .env("P11SHIM_CONFIG", self.dir.join("p11shim.toml"))
            .env("P11SHIM_SO_PIN", SO_PIN)
            .env("P11SHIM_USER_PIN", USER_PIN)
            .env("P11SHIM_PASSWORD_ADMIN", "admin-password")
            .env("P11SHIM_PASSWORD_OP", "operator-password")
            .env("P11SHIM_PASSWORD_KEEPER", "keeper-password")
            .env_remove("P11SHIM_MODULE")
            .env_remove("CSSIM_FAULTS");
    }

    fn p11shim(&self, args: &[&str]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_p11shim"));
        c.args(args);
        self.env(&mut c);
        c.output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.p11shim(args);
        assert!(
            out.status.success(),
            "p11shim {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The first user (made with the SO PIN), an operator for the group and a keeper of the whole store.
    fn users(&self) {
        for (args, password) in [
            (vec!["admin", "--perm", "10000000", "--group-regex", ".*"], "admin-password"),
            (vec!["op", "--perm", "00000002", "--group-regex", GROUP, "--logon", "admin"], "operator-password"),
            (vec!["keeper", "--perm", "02000000", "--group-regex", ".*", "--logon", "admin"], "keeper-password"),
        ] {
            let mut c = Command::new(env!("CARGO_BIN_EXE_p11shim"));
            c.args(["user", "add"]).args(&args).arg("--password").env("P11SHIM_NEW_PASSWORD", password);
            self.env(&mut c);
            let out = c.output().unwrap();
            assert!(out.status.success(), "user add {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    /// pkcs11-tool through the shim, logged in.
    fn tool(&self, args: &[&str]) -> Output {
        let mut c = Command::new("pkcs11-tool");
        c.arg("--module").arg(common::shim_path()).args(["--token-label", TOKEN, "--login", "--pin", USER_PIN]);
        c.args(args);
        self.env(&mut c);
        c.output().unwrap()
    }

    fn tool_ok(&self, args: &[&str]) -> String {
        let out = self.tool(args);
        assert!(out.status.success(), "pkcs11-tool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// ECDSA signature of `data` with the stored key "ec", into `sig`.
    fn sign(&self, data: &Path, sig: &Path) {
        self.tool_ok(&[
            "--sign",
            "--mechanism",
            "ECDSA",
            "--label",
            "ec",
            "-i",
            data.to_str().unwrap(),
            "-o",
            sig.to_str().unwrap(),
        ]);
    }

    /// Whether the stored public key "ec" verifies `sig` over `data`.
    fn verifies(&self, data: &Path, sig: &Path) -> bool {
        let out = self.tool(&[
            "--verify",
            "--mechanism",
            "ECDSA",
            "--label",
            "ec",
            "-i",
            data.to_str().unwrap(),
            "--signature-file",
            sig.to_str().unwrap(),
        ]);
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Signature is valid")
    }

    /// The labels of the token's rows in this host's key store (read in this process: it loads no module).
    fn stored(&self) -> Vec<String> {
        let store = store::open(&self.url).unwrap();
        let mut labels: Vec<String> = store
            .find(&KeyQuery { token: TOKEN.into(), ..Default::default() })
            .unwrap()
            .into_iter()
            .map(|r| String::from_utf8_lossy(&r.label).into_owned())
            .collect();
        labels.sort();
        labels
    }
}

fn fails_with(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected a failure naming {what:?}, got success");
    assert!(stderr.contains(what), "the error names {what:?}: {stderr}");
    stderr
}

/// Generates an MBK in `device`, 2 of 3 shares into `shares`.
fn generate(device: &Device, shares: &Path) -> String {
    let out =
        device.admin(&["mbk", "generate", "--shares", "3", "--threshold", "2", "--out", shares.to_str().unwrap()]);
    assert!(out.contains("fingerprint"), "{out}");
    device.fingerprint()
}

fn share(shares: &Path, i: u8) -> String {
    shares.join(format!("mbk-share-{i}-of-3.txt")).to_string_lossy().into_owned()
}

#[test]
fn devices_of_one_mbk_share_keys_backups_and_a_store_and_no_other_device_can() {
    let root = common::test_dir().join("devices");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();

    // Device A generates its MBK; device B (FIPS firmware: no clear-text key import or export) loads it from
    // two of the three shares; device C has another.
    let (a, b, c) = (Device::new(&root, "dev-a"), Device::in_mode(&root, "dev-b", "fips"), Device::new(&root, "dev-c"));
    let shares = root.join("shares-a");
    let fingerprint = generate(&a, &shares);
    b.admin(&["mbk", "import", &share(&shares, 1), &share(&shares, 3)]);
    assert_eq!(b.fingerprint(), fingerprint, "the same shares, the same MBK");
    generate(&c, &root.join("shares-c"));
    assert_ne!(c.fingerprint(), fingerprint);

    // Host A keeps its keys in its own store, as the device's blobs.
    let host_a = Host::new(&root, "host-a", &a, "a.db");
    let shown = host_a.ok(&["mbk", "show", "--token", TOKEN, "--json"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!((shown["kind"].as_str(), shown["fingerprint"].as_str()), (Some("device"), Some(fingerprint.as_str())));
    host_a.users();
    host_a.tool_ok(&["--keypairgen", "--key-type", "EC:prime256v1", "--label", "ec", "--id", "01"]);
    host_a.tool_ok(&["--keygen", "--key-type", "AES:32", "--label", "aes", "--id", "02"]);
    assert_eq!(host_a.stored(), ["aes", "ec", "ec"], "the private key, its public key and the AES key are rows");
    let on_a = a.objects();
    assert!(on_a.iter().all(|l| !l.starts_with("p11shim")), "no MBK object of p11shim's on the device: {on_a:?}");
    let status = host_a.ok(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let slot = status["slots"].as_array().unwrap().iter().find(|s| s["token"] == TOKEN).expect("the slot").clone();
    assert_eq!((slot["mbk_kind"].as_str(), slot["mbk"].as_str()), (Some("device"), Some(fingerprint.as_str())));
    let data = root.join("data");
    std::fs::write(&data, [7u8; 32]).unwrap();

    // A per-group backup on A records that the device's MBK made it.
    let file = root.join("pay.p11b");
    host_a.ok(&["backup", "--group", GROUP, "--out", file.to_str().unwrap(), "--logon", "op"]);
    let text = std::fs::read_to_string(&file).unwrap();
    let header = text.lines().nth(1).unwrap();
    assert!(header.contains("\"mbk_kind\":\"device\"") && header.contains(&fingerprint), "{header}");

    // Host B, a store of its own on device B: it verifies and restores the backup, and the keys work there.
    let host_b = Host::new(&root, "host-b", &b, "b.db");
    host_b.users();
    host_b.ok(&["mbk", "create", "--token", TOKEN]);
    assert!(host_b.ok(&["verify", file.to_str().unwrap(), "--logon", "op"]).contains("3 records"));
    host_b.ok(&["restore", file.to_str().unwrap(), "--logon", "op"]);
    assert_eq!(host_b.stored(), ["aes", "ec", "ec"]);
    let sig = root.join("sig-b");
    host_b.sign(&data, &sig);
    assert!(host_a.verifies(&data, &sig), "the restored private key on B is A's");

    // A tampered copy is refused before anything changes.
    let tampered = root.join("tampered.p11b");
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let record = lines.iter().position(|l| l.starts_with("R ")).expect("a record");
    let at = lines[record].find("\"wrapped\":\"").expect("a wrapped blob") + 20;
    let flipped = if &lines[record][at..at + 1] == "0" { "1" } else { "0" };
    lines[record].replace_range(at..at + 1, flipped);
    std::fs::write(&tampered, lines.join("\n") + "\n").unwrap();
    let host_t = Host::new(&root, "host-t", &b, "t.db");
    host_t.users();
    host_t.ok(&["mbk", "create", "--token", TOKEN]);
    let out = host_t.p11shim(&["restore", tampered.to_str().unwrap(), "--logon", "op"]);
    assert_eq!(out.status.code(), Some(6), "damaged input: {}", String::from_utf8_lossy(&out.stderr));
    assert!(host_t.stored().is_empty(), "nothing restored from a tampered file");

    // Device C holds another MBK: the backup is refused there, and nothing is made.
    let host_c = Host::new(&root, "host-c", &c, "c.db");
    host_c.users();
    host_c.ok(&["mbk", "create", "--token", TOKEN]);
    let refused = host_c.p11shim(&["restore", file.to_str().unwrap(), "--logon", "op"]);
    assert_eq!(refused.status.code(), Some(6), "another MBK: {}", String::from_utf8_lossy(&refused.stderr));
    fails_with(&refused, &fingerprint);
    assert!(host_c.stored().is_empty());
    assert!(c.objects().iter().all(|l| l != "aes" && l != "ec"), "nothing made on device C");

    // A second host on device B shares A's store: A's keys work there (same MBK, the store's seal key).
    let host_b2 = Host::new(&root, "host-b2", &b, "a.db");
    let sig = root.join("sig-b2");
    host_b2.sign(&data, &sig);
    assert!(host_a.verifies(&data, &sig));
    // Device C cannot use that store's keys: its rows and seal key are under another MBK.
    let host_c2 = Host::new(&root, "host-c2", &c, "a.db");
    let out = host_c2.tool(&["--sign", "--mechanism", "ECDSA", "--label", "ec", "-i", data.to_str().unwrap()]);
    assert!(!out.status.success(), "device C signed with a key of A's store");

    // A whole-store backup of A's store restores into a new store on device B: its rows are checked with
    // A's seal key (in the file) and sealed again with the new store's own.
    let whole = root.join("a.p11db");
    host_a.ok(&["db", "backup", "--out", whole.to_str().unwrap(), "--logon", "keeper"]);
    assert!(std::fs::read_to_string(&whole).unwrap().lines().any(|l| l.starts_with("S ")), "the seal key is in it");
    let host_b3 = Host::new(&root, "host-b3", &b, "b3.db");
    host_b3.users();
    host_b3.ok(&["db", "restore", whole.to_str().unwrap(), "--logon", "keeper"]);
    assert_eq!(host_b3.stored(), ["aes", "ec", "ec"]);
    let sig = root.join("sig-b3");
    host_b3.sign(&data, &sig);
    assert!(host_a.verifies(&data, &sig));

    // p11shim has nothing of its own to clone or share on such a device.
    let out = host_a.p11shim(&[
        "mbk",
        "export-shares",
        "--token",
        TOKEN,
        "--threshold",
        "2",
        "--shares",
        "3",
        "--out-dir",
        root.join("p11shim-shares").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(5));
    fails_with(&out, "csadm MBKImport");
    assert!(!root.join("p11shim-shares").exists());
}

#[test]
fn a_device_without_its_mbk_says_how_to_load_it() {
    let root = common::test_dir().join("no-mbk");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let device = Device::new(&root, "dev");
    let host = Host::new(&root, "host", &device, "keys.db");
    let out = host.p11shim(&["mbk", "show", "--token", TOKEN]);
    let stderr = fails_with(&out, "holds none");
    assert!(stderr.contains("csadm MBKImport") && stderr.contains("cssim-admin mbk import"), "{stderr}");
    let out = host.tool(&["--keygen", "--key-type", "AES:32", "--label", "k"]);
    assert!(!out.status.success(), "no key is stored without the device's MBK");
    let log = std::fs::read_to_string(host.dir.join("shim.log")).unwrap_or_default();
    assert!(log.contains("cssim-admin mbk import"), "the log says how to load it: {log}");
    assert!(host.stored().is_empty());
    // Once the administrator loads it, the same token works.
    generate(&device, &root.join("shares"));
    host.tool_ok(&["--keygen", "--key-type", "AES:32", "--label", "k"]);
    assert_eq!(host.stored(), ["k"]);
}
