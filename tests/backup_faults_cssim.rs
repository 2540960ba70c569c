//! Backup and restore interrupted by device faults: the simulator fails a
//! chosen call of the `p11shim` command's process (CSSIM_FAULTS). An interrupted backup leaves no file
//! under its name; an interrupted restore leaves the target unchanged, both in a database slot (one
//! transaction) and in a token's own objects (what was made is destroyed again). Simulator only: SoftHSM2
//! cannot inject faults. The test process never loads a PKCS#11 module: everything runs in child processes.
mod common;

use common::{SO_PIN, USER_PIN};
use p11shim::store::{self, KeyQuery};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SRC: &str = "src";
const DST: &str = "dst";
const KEYS: usize = 12;

struct Lab {
    dir: PathBuf,
    url: String,
}

impl Lab {
    fn new() -> Lab {
        let dir = common::test_dir();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("cssim.toml"),
            format!(
                "state = \"cssim-state.json\"\nlog_file = \"cssim.log\"\n\
                 [[slot]]\nlabel = \"{SRC}\"\nso_pin = \"{SO_PIN}\"\nuser_pin = \"{USER_PIN}\"\n\
                 [[slot]]\nlabel = \"{DST}\"\nso_pin = \"{SO_PIN}\"\nuser_pin = \"{USER_PIN}\"\n"
            ),
        )
        .unwrap();
        common::give_device_mbk(&dir.join("cssim.toml"));
        let url = format!("sqlite:{}", dir.join("keys.db").display());
        std::fs::write(
            dir.join("p11shim.toml"),
            format!(
                "module = \"{}\"\nlog_file = \"shim.log\"\n[store]\nurl = \"{url}\"\n\
                 [[slot]]\ntoken = \"{SRC}\"\nstorage = \"database\"\ndefault_group = \"Faulty\"\n",
                common::cssim_path().display()
            ),
        )
        .unwrap();
        Lab { dir, url }
    }

    fn env(&self, c: &mut Command, faults: &str) {
        c.env("CSSIM_CONFIG", self.dir.join("cssim.toml"))
            .env("P11SHIM_CONFIG", self.dir.join("p11shim.toml"))
            .env("CSSIM_FAULTS", faults)
            .env("P11SHIM_SO_PIN", SO_PIN)
            .env("P11SHIM_USER_PIN", USER_PIN)
            .env("P11SHIM_PASSWORD_ADMIN", "admin-password")
            .env("P11SHIM_PASSWORD_OP", "operator-password")
            .env_remove("P11SHIM_MODULE");
    }

    /// `p11shim ARGS` with the simulator failing as `faults` says.
    fn p11shim(&self, args: &[&str], faults: &str) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_p11shim"));
        c.args(args).current_dir(&self.dir);
        self.env(&mut c, faults);
        c.output().unwrap()
    }

    /// `p11shim user add ARGS --password` with the new user's password.
    fn add_user(&self, args: &[&str], password: &str) {
        let mut c = Command::new(env!("CARGO_BIN_EXE_p11shim"));
        c.args(["user", "add"]).args(args).arg("--password").env("P11SHIM_NEW_PASSWORD", password);
        self.env(&mut c, "");
        let out = c.output().unwrap();
        assert!(out.status.success(), "user add {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.p11shim(args, "");
        assert!(out.status.success(), "p11shim {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// pkcs11-tool on `token`, through the shim or (`direct`) on the simulator itself.
    fn tool(&self, token: &str, direct: bool, args: &[&str]) -> String {
        let module = if direct { common::cssim_path() } else { common::shim_path() };
        let mut c = Command::new("pkcs11-tool");
        c.arg("--module").arg(&module).args(["--token-label", token, "--login", "--pin", USER_PIN]).args(args);
        self.env(&mut c, "");
        let out = c.output().unwrap();
        assert!(out.status.success(), "pkcs11-tool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn stored_labels(&self) -> Vec<String> {
        let store = store::open(&self.url).unwrap();
        let mut labels: Vec<String> = store
            .find(&KeyQuery { token: SRC.into(), ..Default::default() })
            .unwrap()
            .into_iter()
            .map(|r| String::from_utf8_lossy(&r.label).into_owned())
            .collect();
        labels.sort();
        labels
    }

    /// Labels of the secret keys that are the simulator's own token objects on `token`.
    fn device_keys(&self, token: &str) -> Vec<String> {
        let listing = self.tool(token, true, &["--list-objects", "--type", "secrkey"]);
        let mut labels: Vec<String> = listing
            .lines()
            .filter_map(|l| l.trim().strip_prefix("label:"))
            .map(|l| l.trim().to_string())
            .filter(|l| !l.starts_with("p11shim-"))
            .collect();
        labels.sort();
        labels
    }
}

fn failed_with(out: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure ({what}), got success");
    assert!(stderr.contains(what), "the error names {what}: {stderr}");
}

fn no_file(path: &Path) {
    assert!(!path.exists(), "{} exists after an interrupted backup", path.display());
}

#[test]
fn interrupted_backups_and_restores_change_nothing() {
    let lab = Lab::new();
    lab.ok(&["mbk", "create", "--token", SRC]);
    // The second token needs the same MBK, so that it can take the backup: a device that keeps its own MBK
    // has one for all its tokens; else the MBK set is cloned.
    if common::device_mbk() {
        lab.ok(&["mbk", "create", "--token", DST]);
    } else {
        let (req, resp) = (lab.dir.join("req.json"), lab.dir.join("resp.json"));
        lab.ok(&["mbk", "clone-request", "--token", DST, "--out", req.to_str().unwrap()]);
        lab.ok(&["mbk", "clone-to", req.to_str().unwrap(), "--token", SRC, "--out", resp.to_str().unwrap()]);
        lab.ok(&["mbk", "clone-accept", resp.to_str().unwrap(), "--token", DST]);
    }
    lab.add_user(&["admin", "--perm", "10000000", "--group-regex", ".*"], "admin-password");
    lab.add_user(&["op", "--perm", "00000002", "--group-regex", "Faulty", "--logon", "admin"], "operator-password");
    for i in 0..KEYS {
        lab.tool(SRC, false, &["--keygen", "--key-type", "AES:16", "--label", &format!("k{i:02}")]);
    }
    let all = lab.stored_labels();
    assert_eq!(all.len(), KEYS);

    // Backup: the 5th record MAC fails with CKR_DEVICE_ERROR; then the device is removed after a few calls.
    let file = lab.dir.join("faulty.p11b");
    let backup = ["backup", "--group", "Faulty", "--out", file.to_str().unwrap(), "--logon", "op"];
    let out = lab.p11shim(&backup, r#"fail = [{function="C_Sign", nth=5, rv="CKR_DEVICE_ERROR"}]"#);
    failed_with(&out, "CKR_DEVICE_ERROR");
    no_file(&file);
    let out = lab.p11shim(&backup, "remove_after = 40");
    failed_with(&out, "CKR_DEVICE_REMOVED");
    no_file(&file);
    let leftovers: Vec<_> = std::fs::read_dir(&lab.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".faulty.p11b"))
        .collect();
    assert!(leftovers.is_empty(), "an interrupted backup removes its temporary file: {leftovers:?}");
    // Without faults it works, and the file is complete.
    lab.ok(&backup);
    assert!(lab.ok(&["verify", file.to_str().unwrap(), "--logon", "op"]).contains(&format!("{KEYS} records")));

    // Restore into the database slot after losing half the keys: a fault in the middle changes nothing.
    for i in (0..KEYS).step_by(2) {
        lab.tool(SRC, false, &["--delete-object", "--type", "secrkey", "--label", &format!("k{i:02}")]);
    }
    let before = lab.stored_labels();
    assert_eq!(before.len(), KEYS / 2);
    let restore = ["restore", file.to_str().unwrap(), "--logon", "op"];
    let out = lab.p11shim(&restore, r#"fail = [{function="C_Sign", nth=3, rv="CKR_DEVICE_ERROR"}]"#);
    failed_with(&out, "CKR_DEVICE_ERROR");
    assert_eq!(lab.stored_labels(), before, "an interrupted restore leaves the key store as it was");
    lab.ok(&restore);
    assert_eq!(lab.stored_labels(), all, "the restore without faults brings every key back");

    // Restore into the second device's own objects: what was made before the fault is destroyed again.
    assert!(lab.device_keys(DST).is_empty());
    let restore = ["restore", file.to_str().unwrap(), "--token", DST, "--logon", "op"];
    // The device's own restore makes each key where it keeps its MBK; else C_UnwrapKey under the MBK set.
    let make = if common::device_mbk() { "CSSIM_RestoreKey" } else { "C_UnwrapKey" };
    let fault = format!(r#"fail = [{{function="{make}", nth=6, rv="CKR_DEVICE_ERROR"}}]"#);
    let out = lab.p11shim(&restore, &fault);
    failed_with(&out, "CKR_DEVICE_ERROR");
    assert!(lab.device_keys(DST).is_empty(), "no half restore on the device: {:?}", lab.device_keys(DST));
    lab.ok(&restore);
    assert_eq!(lab.device_keys(DST), all);
}
