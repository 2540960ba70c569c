//! What real third-party tools see in a database slot, compared with a pass-through slot, through the shim,
//! over the backend of the test binary (tests/dbtools.rs: SoftHSM2, tests/dbtools_cssim.rs: the simulator).
//!
//! Every test has its own backend directory (a fresh SoftHSM2 token directory, or a simulator state file
//! with two empty slots), its own p11shim.toml and its own SQLite key store. The p11shim.toml names two
//! tokens: [`PASS`] (pass-through) and [`DB`] (`storage = "database"`). Both are initialized with the backend
//! directly (pkcs11-tool on the backend module, never through the shim), then `p11shim mbk create --token
//! database` makes the database token's MBK. Everything after that runs through the shim, in child
//! processes: this process loads no PKCS#11 module, so it may open the SQLite key store itself to check what
//! was stored.
//!
//! - **Java (SunPKCS11)**: keytool makes an EC P-256 and an RSA-2048 key pair with self-signed certificates
//!   in each slot, lists them, jarsigner signs a jar with each key and verifies it.
//! - **Listings**: one pkcs11-tool command (a key, a key pair, a certificate, a data object) in each slot,
//!   then `pkcs11-tool --list-objects`, `p11tool --list-all` and a PyKCS11 script listing every object's
//!   attributes: apart from what legitimately differs (handles, slot ids, serial numbers, key material, the
//!   token's label, the order of the objects), each tool must show the same thing in both slots.
//! - **The key store**: the database slot's public objects (public keys, certificates, data objects) are rows
//!   of it, and it holds nothing else than what the test made there. Secret and private keys may be rows or
//!   stay in the HSM as token objects (when the shim cannot give a key back from the store exactly as it was
//!   made): that is not checked, as tools must see the same either way.
//!
//! Every difference found is collected, and a test fails at its end with all of them (each a diff: `-` the
//! pass-through slot, `+` the database slot), so one run shows everything a database slot still gets wrong.
//! A missing tool fails the test with the package to install (scripts/install-deps.sh installs them all).
//!
//! The helpers of tests/scripts_cases are not shared: including that module would run its tests again in
//! these binaries. [`mask_hex`] is its masking of slot ids and key material, repeated here.
#![allow(dead_code)] // each test binary runs its own part of the cases

use crate::common::{self, backend, Backend};
use p11shim::store::{self, KeyQuery, KeyRow};

use std::path::{Path, PathBuf};
use std::process::Command;

pub const SO_PIN: &str = "so-pin-1234";
pub const USER_PIN: &str = "user-pin-1234";
/// The pass-through token's label.
pub const PASS: &str = "passthru";
/// The database token's label.
pub const DB: &str = "database";
/// Both, in the order they are initialized (and compared: the pass-through slot is the reference).
pub const TOKENS: [&str; 2] = [PASS, DB];

const CKO_DATA: u64 = 0;
const CKO_CERTIFICATE: u64 = 1;
const CKO_PUBLIC_KEY: u64 = 2;

/// `name` on PATH, or a failure that says which package to install.
pub fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed (apt-get install {package}); this test needs it"))
}

/// Debian's own Python: python3-pykcs11 installs PyKCS11 for it, and the `python3` first on PATH may be
/// another one (pyenv, a virtualenv) that cannot import it.
pub fn debian_python() -> PathBuf {
    let python = PathBuf::from("/usr/bin/python3");
    let ok = Command::new(&python).args(["-c", "import PyKCS11"]).output().is_ok_and(|o| o.status.success());
    assert!(ok, "{} cannot import PyKCS11 (apt-get install python3-pykcs11); this test needs it", python.display());
    python
}

/// The PyKCS11 lister beside this file.
pub fn lister_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dbtools_cases/list_objects.py")
}

/// The output of one command, with the command line for messages.
#[derive(Debug)]
pub struct Out {
    pub what: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    #[track_caller]
    pub fn ok(self) -> Out {
        assert!(self.success(), "{}", self.failure());
        self
    }

    /// The command, its exit status and its output, for a failure message.
    pub fn failure(&self) -> String {
        format!("`{}` exited with {:?}\n--- stdout\n{}--- stderr\n{}", self.what, self.code, self.stdout, self.stderr)
    }
}

/// One test's backend, shim configuration and key store, with its two tokens initialized and the database
/// token's MBK made.
pub struct Fixture {
    pub dir: PathBuf,
    /// softhsm2.conf or cssim.toml.
    pub backend_conf: PathBuf,
    /// p11shim.toml.
    pub config: PathBuf,
    /// The SQLite key store.
    pub store: PathBuf,
}

impl Fixture {
    pub fn new(test: &str) -> Fixture {
        let dir = common::test_dir().join(test);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).expect("wipe the test directory");
        }
        std::fs::create_dir_all(&dir).expect("create the test directory");
        let backend_conf = match backend() {
            Backend::SoftHsm2 => common::fresh_softhsm_dir(&dir),
            Backend::Simulator => common::fresh_cssim_dir(&dir, TOKENS.len(), ""),
        };
        let store = dir.join("keys.db");
        let config = dir.join("p11shim.toml");
        std::fs::write(
            &config,
            format!(
                "module = \"{}\"\nlog_file = \"shim.log\"\nlog_level = \"debug\"\n\n[store]\nurl = \"sqlite:{}\"\n\n\
                 [[slot]]\ntoken = \"{PASS}\"\nstorage = \"hsm\"\n\n[[slot]]\ntoken = \"{DB}\"\nstorage = \"database\"\n",
                common::backend_path().display(),
                store.display()
            ),
        )
        .expect("write p11shim.toml");
        let fx = Fixture { dir, backend_conf, config, store };
        // With the backend directly. SoftHSM2 lists its initialized tokens first and keeps one empty slot
        // last; the simulator has two fixed slots: either way the i-th token goes to slot index i.
        let module = common::backend_path();
        for (i, label) in TOKENS.iter().enumerate() {
            let index = i.to_string();
            fx.p11(&module, &["--init-token", "--slot-index", &index, "--label", label, "--so-pin", SO_PIN]).ok();
            fx.p11(
                &module,
                &[
                    "--token-label",
                    label,
                    "--init-pin",
                    "--login",
                    "--login-type",
                    "so",
                    "--so-pin",
                    SO_PIN,
                    "--pin",
                    USER_PIN,
                ],
            )
            .ok();
        }
        let mut mbk = fx.command(Path::new(env!("CARGO_BIN_EXE_p11shim")));
        mbk.args(["mbk", "create", "--token", DB]).env("P11SHIM_SO_PIN", SO_PIN).env("P11SHIM_USER_PIN", USER_PIN);
        fx.run(mbk).ok();
        fx
    }

    /// `program` with the environment that points it (and the shim in it) at this test's backend and
    /// p11shim.toml, and nothing else that could change what it loads.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        let var = match backend() {
            Backend::SoftHsm2 => "SOFTHSM2_CONF",
            Backend::Simulator => "CSSIM_CONFIG",
        };
        cmd.current_dir(&self.dir)
            .env(var, &self.backend_conf)
            .env("P11SHIM_CONFIG", &self.config)
            .env_remove("P11SHIM_MODULE")
            .env_remove("CSSIM_FAULTS")
            .env_remove("OPENSSL_CONF")
            .env_remove("PKCS11_MODULE_PATH")
            .env_remove("JAVA_TOOL_OPTIONS")
            .env_remove("_JAVA_OPTIONS")
            .env_remove("GNUTLS_PIN");
        cmd
    }

    pub fn run(&self, mut cmd: Command) -> Out {
        let what = format!(
            "{} {}",
            cmd.get_program().to_string_lossy(),
            cmd.get_args().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
        );
        let o = cmd.output().unwrap_or_else(|e| panic!("running {what}: {e}"));
        Out {
            what,
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// `pkcs11-tool --module <module> <args>`.
    pub fn p11(&self, module: &Path, args: &[&str]) -> Out {
        let mut cmd = self.command(&tool("pkcs11-tool", "opensc"));
        cmd.arg("--module").arg(module).args(args);
        self.run(cmd)
    }

    /// `pkcs11-tool` through the shim, logged in as the user on `token`.
    pub fn p11_user(&self, token: &str, args: &[&str]) -> Out {
        let mut all = vec!["--token-label", token, "--login", "--pin", USER_PIN];
        all.extend(args);
        self.p11(&common::shim_path(), &all)
    }

    /// The rows the key store holds for `token`. No PKCS#11 module is loaded in this process, so opening
    /// the SQLite file here cannot disturb a shim's locks.
    pub fn rows(&self, token: &str) -> Vec<KeyRow> {
        let store = store::open(&format!("sqlite:{}", self.store.display())).expect("open the key store");
        store.find(&KeyQuery { token: token.to_string(), ..Default::default() }).expect("read the key store")
    }

    /// The index of `token` in the shim's slot list (C_GetSlotList(CK_FALSE), the list SunPKCS11's
    /// `slotListIndex` counts in), from `pkcs11-tool -L` through the shim.
    pub fn slot_index(&self, token: &str) -> usize {
        let out = self.p11(&common::shim_path(), &["--list-slots"]).ok();
        let mut index = None;
        for line in out.stdout.lines() {
            if let Some(rest) = line.strip_prefix("Slot ") {
                index = rest.split_whitespace().next().and_then(|n| n.parse::<usize>().ok());
            } else if line.trim_start().strip_prefix("token label").and_then(|r| r.trim_start().strip_prefix(':'))
                == Some(&format!(" {token}"))
            {
                return index.unwrap_or_else(|| panic!("a token label before any slot:\n{}", out.stdout));
            }
        }
        panic!("token {token:?} is not in the shim's slot list:\n{}", out.stdout)
    }
}

/// Failures collected along a test, reported together at its end.
#[derive(Default)]
pub struct Findings(Vec<String>);

impl Findings {
    pub fn fail(&mut self, what: impl Into<String>) {
        self.0.push(what.into());
    }

    /// Records `what` unless `ok`; returns `ok`.
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) -> bool {
        if !ok {
            self.fail(what());
        }
        ok
    }

    /// Records a difference between the pass-through slot's text and the database slot's.
    pub fn same(&mut self, what: &str, pass: &str, db: &str) -> bool {
        if pass == db {
            return true;
        }
        self.fail(format!(
            "{what}: differs between the pass-through slot (-) and the database slot (+):\n{}",
            diff(pass, db)
        ));
        false
    }

    #[track_caller]
    pub fn assert_none(self, test: &str) {
        if !self.0.is_empty() {
            panic!(
                "{test}: {} finding(s):\n\n{}",
                self.0.len(),
                self.0.iter().enumerate().map(|(i, f)| format!("[{}] {f}", i + 1)).collect::<Vec<_>>().join("\n\n")
            );
        }
    }
}

/// A line diff of `a` (-) and `b` (+), in hunks with three lines of context, each hunk headed by the block
/// (the last line that starts in the first column) its first changed line is in.
pub fn diff(a: &str, b: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    // Longest common subsequence, from the ends.
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    let mut ops: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            ops.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            ops.push(('-', a[i]));
            i += 1;
        } else {
            ops.push(('+', b[j]));
            j += 1;
        }
    }
    const CONTEXT: usize = 3;
    let changed: Vec<usize> = (0..ops.len()).filter(|&k| ops[k].0 != ' ').collect();
    let mut out = String::new();
    let mut k = 0;
    while k < changed.len() {
        let first = changed[k];
        let start = first.saturating_sub(CONTEXT);
        let mut end = changed[k];
        while k < changed.len() && changed[k] <= end + 2 * CONTEXT + 1 {
            end = changed[k];
            k += 1;
        }
        let block = ops[..=first].iter().rev().find(|(_, l)| !l.starts_with([' ', '\t']) && !l.is_empty());
        let end = (end + CONTEXT + 1).min(ops.len());
        out += &format!("@@ {}\n", block.map(|(_, l)| *l).unwrap_or(""));
        for (op, line) in &ops[start..end] {
            out += &format!("{op} {line}\n");
        }
    }
    out
}

/// Replaces `0x` numbers of 5 digits or more (slot ids) by `0x<id>` and runs of 32 or more hex digits (key
/// material) by `<hex>` (as tests/scripts_cases does).
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

/// `text` cut into blocks, each starting at a line for which `starts` holds, sorted (a tool lists objects in
/// the module's order, which differs between a backend's token and the key store). Lines before the first
/// block stay first.
pub fn sorted_blocks(text: &str, starts: impl Fn(&str) -> bool) -> String {
    let mut head = Vec::new();
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    for line in text.lines() {
        if starts(line) {
            blocks.push(vec![line]);
        } else if let Some(block) = blocks.last_mut() {
            block.push(line);
        } else {
            head.push(line);
        }
    }
    // Blank lines between blocks are separators, not content.
    for block in &mut blocks {
        while block.last().is_some_and(|l| l.trim().is_empty()) {
            block.pop();
        }
    }
    blocks.sort();
    head.into_iter().chain(blocks.into_iter().flatten()).collect::<Vec<_>>().join("\n")
}

/// pkcs11-tool's stderr without the line naming the slot it chose (its index and id differ), sorted.
fn pkcs11_tool_stderr(stderr: &str) -> String {
    let mut lines: Vec<String> =
        stderr.lines().filter(|l| !l.starts_with("Using slot ") && !l.trim().is_empty()).map(mask_hex).collect();
    lines.sort();
    lines.join("\n")
}

/// pkcs11-tool output: slot ids, key material and the handles it prints for data objects ("Data object
/// 2") masked, objects sorted.
fn pkcs11_tool_stdout(stdout: &str) -> String {
    let masked = stdout
        .lines()
        .map(|line| match line.strip_prefix("Data object ") {
            Some(n) if !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) => "Data object <handle>".to_string(),
            _ => mask_hex(line),
        })
        .collect::<Vec<_>>()
        .join("\n");
    sorted_blocks(&masked, |l| !l.starts_with([' ', '\t']) && !l.trim().is_empty())
}

/// What one tool shows in one slot, normalized.
pub struct Listing {
    pub text: String,
    /// How many objects the tool listed.
    pub objects: usize,
}

/// `pkcs11-tool --list-objects --login` through the shim: stdout and stderr (its warnings, such as a
/// CKA_VALUE it could not read, say something about the objects too).
pub fn list_pkcs11_tool(fx: &Fixture, token: &str) -> Result<Listing, String> {
    let out = fx.p11_user(token, &["--list-objects"]);
    if !out.success() {
        return Err(out.failure());
    }
    let stdout = pkcs11_tool_stdout(&out.stdout);
    let objects = stdout.lines().filter(|l| l.contains(" Object;") || l.starts_with("Data object ")).count();
    Ok(Listing { text: format!("{stdout}\n--- stderr\n{}", pkcs11_tool_stderr(&out.stderr)), objects })
}

/// `p11tool --list-all --login` (GnuTLS) through the shim, the PIN in GNUTLS_PIN. p11tool shows the
/// object's type and key algorithm, label, ID and the flags CKA_WRAP/UNWRAP, CKA_PRIVATE, CKA_SENSITIVE,
/// CKA_EXTRACTABLE, CKA_NEVER_EXTRACTABLE, CKA_TRUSTED, CKA_ALWAYS_AUTHENTICATE and the certificate's
/// expiry; not the other usage flags, CKA_LOCAL, CKA_MODIFIABLE or CKA_ALLOWED_MECHANISMS (PyKCS11 does).
pub fn list_p11tool(fx: &Fixture, token: &str) -> Result<Listing, String> {
    let mut cmd = fx.command(&tool("p11tool", "gnutls-bin"));
    cmd.arg("--provider")
        .arg(common::shim_path())
        .args(["--list-all", "--login", &format!("pkcs11:token={token}")])
        .env("GNUTLS_PIN", USER_PIN);
    let out = fx.run(cmd);
    if !out.success() {
        return Err(out.failure());
    }
    // The URL names the token's serial number and label, which differ between the slots; the objects are
    // numbered in listing order.
    let normalized = out
        .stdout
        .lines()
        .map(|line| {
            if line.starts_with("Object ") && line.ends_with(':') {
                return "Object:".to_string();
            }
            line.split(';')
                .map(|part| {
                    if part.starts_with("serial=") {
                        "serial=<serial>".to_string()
                    } else if part == format!("token={token}") {
                        "token=<token>".to_string()
                    } else {
                        mask_hex(part)
                    }
                })
                .collect::<Vec<_>>()
                .join(";")
        })
        .collect::<Vec<_>>()
        .join("\n");
    let stdout = sorted_blocks(&normalized, |l| l == "Object:");
    let objects = stdout.lines().filter(|l| *l == "Object:").count();
    let stderr = out.stderr.lines().map(mask_hex).collect::<Vec<_>>().join("\n");
    Ok(Listing { text: format!("{stdout}\n--- stderr\n{stderr}"), objects })
}

/// tests/dbtools_cases/list_objects.py (PyKCS11) through the shim: every object with the attributes listed
/// there, one per line, each read on its own.
pub fn list_pykcs11(fx: &Fixture, token: &str) -> Result<Listing, String> {
    let mut cmd = fx.command(&debian_python());
    cmd.arg(lister_script()).arg(common::shim_path()).args([token, USER_PIN]);
    let out = fx.run(cmd);
    if !out.success() {
        return Err(out.failure());
    }
    let stdout = sorted_blocks(&out.stdout, |l| l.starts_with("object "));
    let objects = stdout.lines().filter(|l| l.starts_with("object ")).count();
    Ok(Listing { text: format!("{stdout}\n--- stderr\n{}", out.stderr.trim_end()), objects })
}

/// The three listings of each slot, compared; `objects` is how many objects each slot must hold.
pub fn compare_listings(fx: &Fixture, findings: &mut Findings, objects: usize) {
    type Lister = fn(&Fixture, &str) -> Result<Listing, String>;
    let listers: [(&str, Lister); 3] = [
        ("pkcs11-tool --list-objects", list_pkcs11_tool),
        ("p11tool --list-all", list_p11tool),
        ("PyKCS11 (list_objects.py)", list_pykcs11),
    ];
    for (tool, list) in listers {
        let mut texts = Vec::new();
        for token in TOKENS {
            match list(fx, token) {
                Ok(listing) => {
                    findings.check(listing.objects == objects, || {
                        format!(
                            "{tool} in the {token} slot: {} objects, expected {objects}:\n{}",
                            listing.objects, listing.text
                        )
                    });
                    texts.push(Some(listing.text));
                }
                Err(failure) => {
                    findings.fail(format!("{tool} in the {token} slot failed: {failure}"));
                    texts.push(None);
                }
            }
        }
        if let [Some(pass), Some(db)] = &texts[..] {
            findings.same(tool, pass, db);
        }
    }
}

/// One pkcs11-tool command making objects, run in a fresh token of each kind through the shim: its own
/// output, the three listings and the key store must show the same in both.
pub struct Case {
    /// The test's name (its directory).
    pub test: &'static str,
    /// The arguments after `--login --pin …`.
    pub args: Vec<String>,
    /// How many objects the command makes.
    pub objects: usize,
    /// The classes of the public objects it makes (public keys, certificates, data objects), which a
    /// database slot always keeps in the key store. Its secret and private keys may be rows too, or stay in
    /// the HSM as token objects of the database token when the shim cannot give them back from the store
    /// exactly as they were made: the listings must show the same either way.
    pub stored: Vec<u64>,
    /// Strings the pass-through slot's `pkcs11-tool --list-objects` must show: proof that the command made
    /// what the case is about (and not, say, nothing in both slots).
    pub expect: Vec<&'static str>,
}

impl Case {
    pub fn new(test: &'static str, args: &[&str], objects: usize, stored: &[u64], expect: &[&'static str]) -> Case {
        let args = args.iter().map(|a| a.to_string()).collect();
        Case { test, args, objects, stored: stored.to_vec(), expect: expect.to_vec() }
    }

    /// The `--label` the command gives its objects.
    fn label(&self) -> &str {
        let at = self.args.iter().position(|a| a == "--label").expect("every case names its objects");
        &self.args[at + 1]
    }

    pub fn run(&self) {
        let fx = Fixture::new(self.test);
        self.run_in(&fx);
    }

    pub fn run_in(&self, fx: &Fixture) {
        let mut findings = Findings::default();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let made: Vec<Out> = TOKENS.iter().map(|token| fx.p11_user(token, &args)).collect();
        // The pass-through slot is the reference: the case itself must work there.
        let pass = &made[0];
        assert!(pass.success(), "the command fails in the pass-through slot: {}", pass.failure());
        let listing = list_pkcs11_tool(fx, PASS).unwrap_or_else(|f| panic!("listing the pass-through slot: {f}"));
        for want in &self.expect {
            assert!(listing.text.contains(want), "the pass-through slot shows no {want:?}:\n{}", listing.text);
        }
        let db = &made[1];
        if !db.success() {
            // Nothing was made there: the listings would only say so three more times.
            findings.fail(format!(
                "the command fails in the database slot (so the listings were not compared): {}",
                db.failure()
            ));
            findings.assert_none(self.test);
            return;
        }
        findings.same("the command's stdout", &pkcs11_tool_stdout(&pass.stdout), &pkcs11_tool_stdout(&db.stdout));
        findings.same("the command's stderr", &pkcs11_tool_stderr(&pass.stderr), &pkcs11_tool_stderr(&db.stderr));
        compare_listings(fx, &mut findings, self.objects);
        // The database slot's public objects are rows of the key store (so the listings above compared
        // stored objects with native ones), its rows are only what the command made, and the pass-through
        // slot has none.
        let rows = fx.rows(DB);
        let label = self.label().as_bytes();
        for &class in &self.stored {
            findings.check(rows.iter().filter(|r| r.class == class && r.label == label).count() == 1, || {
                format!(
                    "the key store holds no (or several) rows of class {class} labelled {:?}: {rows:#?}",
                    self.label()
                )
            });
        }
        findings.check(rows.len() <= self.objects && rows.iter().all(|r| r.label == label), || {
            format!("the key store holds rows the command did not make ({} objects): {rows:#?}", self.objects)
        });
        let native = fx.rows(PASS);
        findings
            .check(native.is_empty(), || format!("the key store holds rows for the pass-through token: {native:#?}"));
        findings.assert_none(self.test);
    }
}

pub fn aes32_keygen() {
    Case::new(
        "aes32_keygen",
        &["--keygen", "--key-type", "AES:32", "--label", "aes32", "--id", "01"],
        1,
        &[],
        &["Secret Key Object; AES length 32", "label:      aes32"],
    )
    .run();
}

pub fn aes16_sensitive_keygen() {
    Case::new(
        "aes16_sensitive_keygen",
        &["--keygen", "--key-type", "AES:16", "--sensitive", "--label", "aes16", "--id", "02"],
        1,
        &[],
        &["Secret Key Object; AES length 16", "label:      aes16", "sensitive"],
    )
    .run();
}

pub fn aes_extractable_keygen() {
    Case::new(
        "aes_extractable_keygen",
        &["--keygen", "--key-type", "AES:32", "--extractable", "--label", "aesx", "--id", "03"],
        1,
        &[],
        &["Secret Key Object; AES length 32", "label:      aesx", "extractable"],
    )
    .run();
}

pub fn ec_p256_keypairgen() {
    Case::new(
        "ec_p256_keypairgen",
        &["--keypairgen", "--key-type", "EC:prime256v1", "--label", "ec", "--id", "04"],
        2,
        &[CKO_PUBLIC_KEY],
        &["Private Key Object; EC", "Public Key Object; EC  EC_POINT 256 bits", "label:      ec"],
    )
    .run();
}

pub fn ec_extractable_keypairgen() {
    Case::new(
        "ec_extractable_keypairgen",
        &["--keypairgen", "--key-type", "EC:prime256v1", "--extractable", "--label", "ecx", "--id", "05"],
        2,
        &[CKO_PUBLIC_KEY],
        &["Private Key Object; EC", "label:      ecx", "extractable"],
    )
    .run();
}

pub fn rsa2048_keypairgen() {
    Case::new(
        "rsa2048_keypairgen",
        &["--keypairgen", "--key-type", "rsa:2048", "--label", "rsa", "--id", "06"],
        2,
        &[CKO_PUBLIC_KEY],
        &["Private Key Object; RSA", "Public Key Object; RSA 2048 bits", "label:      rsa"],
    )
    .run();
}

/// SoftHSM2 only: the simulator has no EdDSA (no CKM_EC_EDWARDS_KEY_PAIR_GEN).
pub fn ed25519_keypairgen() {
    Case::new(
        "ed25519_keypairgen",
        &["--keypairgen", "--key-type", "EC:edwards25519", "--label", "ed", "--id", "07"],
        2,
        &[CKO_PUBLIC_KEY],
        &["Private Key Object; EC_EDWARDS", "label:      ed"],
    )
    .run();
}

/// CKA_ALLOWED_MECHANISMS (pkcs11-tool puts the list on the private key; --list-objects and PyKCS11 show it,
/// p11tool does not).
pub fn ec_allowed_mechanisms_keypairgen() {
    Case::new(
        "ec_allowed_mechanisms_keypairgen",
        &[
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--allowed-mechanisms",
            "ECDSA,ECDSA-SHA256",
            "--label",
            "ecallowed",
            "--id",
            "08",
        ],
        2,
        &[CKO_PUBLIC_KEY],
        &["Private Key Object; EC", "label:      ecallowed", "Allowed mechanisms: ECDSA,ECDSA-SHA256"],
    )
    .run();
}

/// `--write-object` of a DER certificate (made by plain OpenSSL, the same file into both slots).
pub fn certificate_write_object() {
    let fx = Fixture::new("certificate_write_object");
    let cert = fx.dir.join("cert.der");
    let mut openssl = fx.command(&tool("openssl", "openssl"));
    openssl
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout"])
        .arg(fx.dir.join("cert.key.pem"))
        .args(["-subj", "/CN=p11shim dbtools", "-days", "2", "-outform", "DER", "-out"])
        .arg(&cert);
    fx.run(openssl).ok();
    let cert = cert.to_str().unwrap();
    Case::new(
        "certificate_write_object",
        &["--write-object", cert, "--type", "cert", "--label", "cert", "--id", "09"],
        1,
        &[CKO_CERTIFICATE],
        &["Certificate Object; type = X.509 cert", "label:      cert", "CN=p11shim dbtools"],
    )
    .run_in(&fx);
}

/// `--write-object` of a data object with an application label.
pub fn data_write_object() {
    let fx = Fixture::new("data_write_object");
    let data = fx.dir.join("data.bin");
    std::fs::write(&data, b"a data object written by pkcs11-tool through p11shim\n").unwrap();
    let data = data.to_str().unwrap();
    Case::new(
        "data_write_object",
        &["--write-object", data, "--type", "data", "--label", "data", "--application-label", "dbtools"],
        1,
        &[CKO_DATA],
        &["Data object", "label:          'data'", "application:    'dbtools'"],
    )
    .run_in(&fx);
}

/// The JDK tools, or a failure that says which package to install.
fn jdk(name: &str) -> PathBuf {
    tool(name, "openjdk-17-jdk-headless")
}

/// SunPKCS11's config for one slot: the shim as the library, the token by its index in the slot list.
fn java_config(fx: &Fixture, token: &str) -> PathBuf {
    let path = fx.dir.join(format!("sunpkcs11-{token}.cfg"));
    std::fs::write(
        &path,
        format!(
            "name = p11shim-{token}\nlibrary = {}\nslotListIndex = {}\n",
            common::shim_path().display(),
            fx.slot_index(token)
        ),
    )
    .expect("write the SunPKCS11 config");
    path
}

/// `keytool`/`jarsigner` arguments that open the PKCS#11 keystore of `cfg`.
fn pkcs11_keystore(cfg: &Path) -> Vec<String> {
    ["-keystore", "NONE", "-storetype", "PKCS11", "-addprovider", "SunPKCS11", "-providerArg"]
        .iter()
        .map(|s| s.to_string())
        .chain([cfg.display().to_string(), "-storepass".into(), USER_PIN.into()])
        .collect()
}

/// The key pairs Java makes: (alias, keytool's key arguments, the signature algorithm jarsigner uses).
const JAVA_KEYS: [(&str, &[&str], &str); 2] = [
    ("ecsigner", &["-keyalg", "EC", "-groupname", "secp256r1"], "SHA256withECDSA"),
    ("rsasigner", &["-keyalg", "RSA", "-keysize", "2048"], "SHA256withRSA"),
];

/// Java's SunPKCS11 provider through the shim, in a pass-through slot and in a database slot:
///
/// 1. `keytool -genkeypair` of an EC P-256 and an RSA-2048 key pair. SunPKCS11 generates a session key
///    pair, signs the self-signed certificate with it, then C_CopyObject(private key, {CKA_TOKEN=true,
///    CKA_ID=alias}) and C_CreateObject of the certificate (CKA_ID=alias, CKA_LABEL=alias). It stores no
///    public key object.
/// 2. `keytool -list`: each alias is a PrivateKeyEntry.
/// 3. `jarsigner` signs a jar (made with `jar`) with each key; `jarsigner -verify -verbose -certs` with the
///    same keystore says "jar verified." and marks the signer's certificate as found in the keystore.
/// 4. `pkcs11-tool --list-objects` through the shim shows, for each alias, a private key and a certificate
///    with CKA_ID = the alias; the listings of both slots are the same (flags included); and the key store
///    holds the database slot's certificates, nothing of the pass-through slot's.
pub fn java_keytool_and_jarsigner() {
    let fx = Fixture::new("java_keytool_and_jarsigner");
    let mut findings = Findings::default();
    // One small jar, signed in each slot with each key.
    std::fs::write(fx.dir.join("hello.txt"), b"signed by jarsigner with a key made by keytool through p11shim\n")
        .unwrap();
    let mut jar = fx.command(&jdk("jar"));
    jar.args(["--create", "--file", "app.jar", "hello.txt"]);
    fx.run(jar).ok();

    for token in TOKENS {
        let cfg = java_config(&fx, token);
        let store = pkcs11_keystore(&cfg);
        let mut made = Vec::new();
        for (alias, key_args, sigalg) in JAVA_KEYS {
            let mut keytool = fx.command(&jdk("keytool"));
            keytool.arg("-genkeypair").args(&store).args(["-alias", alias]).args(key_args).args([
                "-sigalg",
                sigalg,
                "-dname",
                &format!("CN=p11shim {alias}, O=dbtools"),
                "-validity",
                "2",
            ]);
            let out = fx.run(keytool);
            if findings.check(out.success(), || format!("{token} slot: keytool -genkeypair {alias}: {}", out.failure()))
            {
                made.push(alias);
            }
        }
        if token == PASS {
            assert_eq!(made.len(), JAVA_KEYS.len(), "the pass-through slot must work: {}", findings.0.join("\n"));
        }

        let mut keytool = fx.command(&jdk("keytool"));
        keytool.arg("-list").args(&store);
        let list = fx.run(keytool);
        if findings.check(list.success(), || format!("{token} slot: keytool -list: {}", list.failure())) {
            for (alias, _, _) in JAVA_KEYS {
                let entry = format!("{alias}, PrivateKeyEntry");
                findings.check(list.stdout.lines().any(|l| l.starts_with(&entry)), || {
                    format!("{token} slot: keytool -list shows no {entry:?}:\n{}", list.stdout)
                });
            }
        }

        for (alias, _, sigalg) in JAVA_KEYS {
            if !made.contains(&alias) {
                findings.fail(format!("{token} slot: jarsigner with {alias} not run: keytool could not make the key"));
                continue;
            }
            let signed = format!("app-{token}-{alias}.jar");
            let mut sign = fx.command(&jdk("jarsigner"));
            sign.args(&store).args(["-sigalg", sigalg, "-signedjar", &signed, "app.jar", alias]);
            let out = fx.run(sign);
            if !findings.check(out.success() && out.stdout.contains("jar signed."), || {
                format!("{token} slot: jarsigner {alias}: {}", out.failure())
            }) {
                continue;
            }
            let mut verify = fx.command(&jdk("jarsigner"));
            verify.args(["-verify", "-verbose", "-certs"]).args(&store).args([&signed, alias]);
            let out = fx.run(verify);
            // "k": at least one of the signer's certificates is in the keystore given (the token).
            let in_keystore = out.stdout.lines().any(|l| l.trim_start().starts_with("smk ") && l.contains("hello.txt"));
            findings.check(out.success() && out.stdout.contains("jar verified.") && in_keystore, || {
                format!(
                    "{token} slot: jarsigner -verify of the jar signed with {alias} (want \"jar verified.\" and hello.txt \
                     marked smk): {}",
                    out.failure()
                )
            });
        }
    }

    // What SunPKCS11 left in each token: a private key and a certificate per alias, CKA_ID = the alias.
    let mut listings = Vec::new();
    for token in TOKENS {
        match list_pkcs11_tool(&fx, token) {
            Ok(listing) => {
                for (alias, _, _) in JAVA_KEYS {
                    let id = format!("  ID:         {}", hex::encode(alias));
                    for kind in ["Private Key Object", "Certificate Object"] {
                        let found = listing
                            .text
                            .split('\n')
                            .collect::<Vec<_>>()
                            .windows(4)
                            .any(|w| w[0].starts_with(kind) && w[1..].iter().any(|l| *l == id));
                        findings.check(found, || {
                            format!(
                                "{token} slot: pkcs11-tool --list-objects shows no {kind} with the ID of {alias}:\n{}",
                                listing.text
                            )
                        });
                    }
                }
                listings.push(Some(listing.text));
            }
            Err(failure) => {
                findings.fail(format!("{token} slot: pkcs11-tool --list-objects failed: {failure}"));
                listings.push(None);
            }
        }
    }
    if let [Some(pass), Some(db)] = &listings[..] {
        findings.same("pkcs11-tool --list-objects after keytool", pass, db);
    }
    // The database slot's certificates are rows of the key store. (Its private keys may be rows too, or
    // stay in the HSM as token objects when the shim cannot give them back from the store exactly as they
    // were made; the listings above show the same either way.)
    let rows = fx.rows(DB);
    for (alias, _, _) in JAVA_KEYS {
        findings.check(rows.iter().any(|r| r.class == CKO_CERTIFICATE && r.ckid == alias.as_bytes()), || {
            format!("the key store holds no certificate row with the ID of {alias}: {rows:#?}")
        });
    }
    let native = fx.rows(PASS);
    findings.check(native.is_empty(), || format!("the key store holds rows for the pass-through token: {native:#?}"));
    findings.assert_none("java_keytool_and_jarsigner");
}

/// One #[test] per case named, in a binary that declares `mod common; mod dbtools_cases;`.
#[macro_export]
macro_rules! dbtools_cases {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                dbtools_cases::$name();
            }
        )*
    };
}
