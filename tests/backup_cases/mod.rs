//! Per-group backup, restore and verify under the MBK, users and permissions, FIPS/CC mode, the MBK between
//! HSMs, crash safety and the audit log, end to end: every step runs the real `p11shim` command,
//! `pkcs11-tool` (through the shim, or SoftHSM2 itself to look at a token's own objects) and `openssl` in child
//! processes, each test with its own SoftHSM2 token directory and its own key store.
//!
//! tests/backup_sqlite.rs and tests/backup_postgres.rs run these same cases (`backup_cases!`), one key store
//! engine per binary. No PKCS#11 module is loaded in the test process itself: the key store is read (and, for
//! the audit case, edited) in-process, which is safe only because of that.
#![allow(dead_code)]

use crate::common::{self, pg::TestDb};
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::SigningKey;
use p11shim::backup::format::{BackupReader, Sealer};
use p11shim::store::{self, KeyRow, KeyStore};
use serde_json::Value;
use std::cell::RefCell;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const SO_PIN: &str = "so-pin-1234";
pub const USER_PIN: &str = "user-pin-1234";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// The outcome of a child process, with what it printed (for messages).
pub struct Out {
    pub what: String,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    fn describe(&self) -> String {
        format!(
            "`{}` ended with {:?} (signal {:?})\n--- stdout\n{}\n--- stderr\n{}",
            self.what, self.code, self.signal, self.stdout, self.stderr
        )
    }
    /// Asserts exit status 0.
    #[track_caller]
    pub fn ok(self) -> Out {
        assert_eq!(self.code, Some(0), "{}", self.describe());
        self
    }
    /// Asserts this exit status.
    #[track_caller]
    pub fn status(self, code: i32) -> Out {
        assert_eq!(self.code, Some(code), "{}", self.describe());
        self
    }
    /// Asserts a failure (exit status 1, 4, 5, 6 or 7: not a usage error, not a partial success) and that
    /// stderr contains every one of `parts`.
    #[track_caller]
    pub fn fails(self, parts: &[&str]) -> Out {
        assert!(matches!(self.code, Some(1 | 4..=7)), "expected a failure: {}", self.describe());
        for p in parts {
            assert!(self.stderr.contains(p), "expected {p:?} in the error: {}", self.describe());
        }
        self
    }
    /// Asserts a refusal (exit status 5) naming every one of `parts`.
    #[track_caller]
    pub fn denied(self, parts: &[&str]) -> Out {
        assert_eq!(self.code, Some(5), "expected a refusal: {}", self.describe());
        self.fails(parts)
    }
    /// Asserts damaged input (exit status 6) named by every one of `parts`.
    #[track_caller]
    pub fn damaged(self, parts: &[&str]) -> Out {
        assert_eq!(self.code, Some(6), "expected damaged input: {}", self.describe());
        self.fails(parts)
    }
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.describe()))
    }
    /// The error message: stderr's "p11shim: " line.
    pub fn error(&self) -> String {
        self.stderr.lines().filter_map(|l| l.strip_prefix("p11shim: ")).collect::<Vec<_>>().join("\n")
    }
}

fn run(mut c: Command, what: String) -> Out {
    let out = c.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    Out {
        what,
        code: out.status.code(),
        signal: out.status.signal(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[derive(Clone)]
struct Slot {
    token: String,
    database: bool,
    group: String,
}

/// One test's world: a SoftHSM2 token directory, a key store, a p11shim.toml, users and their key files.
pub struct Lab {
    pub name: String,
    pub dir: PathBuf,
    pub engine: Engine,
    url: RefCell<String>,
    dbs: RefCell<Vec<TestDb>>,
    slots: RefCell<Vec<Slot>>,
    mode: RefCell<String>,
}

impl Lab {
    pub fn new(engine: Engine, name: &str) -> Lab {
        let dir = common::test_dir().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("users")).expect("create the test directory");
        let lab = Lab {
            name: name.into(),
            dir,
            engine,
            url: RefCell::new(String::new()),
            dbs: RefCell::new(Vec::new()),
            slots: RefCell::new(Vec::new()),
            mode: RefCell::new("standard".into()),
        };
        lab.new_store("keys");
        lab
    }

    /// Points the config at a fresh, empty key store (SQLite: DIR/NAME.db; PostgreSQL: a new database).
    pub fn new_store(&self, name: &str) {
        let url = match self.engine {
            Engine::Sqlite => format!("sqlite:{}", self.dir.join(format!("{name}.db")).display()),
            Engine::Postgres => {
                let db = TestDb::fresh();
                let url = db.url().to_string();
                self.dbs.borrow_mut().push(db);
                url
            }
        };
        *self.url.borrow_mut() = url;
        self.write_config();
    }

    pub fn url(&self) -> String {
        self.url.borrow().clone()
    }

    pub fn set_mode(&self, mode: &str) {
        *self.mode.borrow_mut() = mode.into();
        self.write_config();
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("p11shim.toml")
    }

    fn softhsm_conf(&self) -> PathBuf {
        self.dir.join("hsm/softhsm2.conf")
    }

    fn write_config(&self) {
        let mut text = format!(
            "module = \"{}\"\nlog_file = \"shim.log\"\nmode = \"{}\"\n[logon]\ndelay = \"0s\"\n[store]\nurl = \"{}\"\n",
            common::SOFTHSM,
            self.mode.borrow(),
            self.url.borrow()
        );
        for s in self.slots.borrow().iter() {
            text.push_str(&format!("[[slot]]\ntoken = \"{}\"\ndefault_group = \"{}\"\n", s.token, s.group));
            if s.database {
                text.push_str("storage = \"database\"\n");
            }
        }
        std::fs::write(self.config_path(), text).expect("write p11shim.toml");
    }

    /// A new SoftHSM2 token `label` (softhsm-config/setup-token.sh), a database slot or not, with this group.
    fn token(&self, label: &str, database: bool, group: &str) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm-config/setup-token.sh");
        let mut c = Command::new("bash");
        c.arg(script).arg(self.dir.join("hsm")).args([label, SO_PIN, USER_PIN]);
        run(c, format!("setup-token.sh {label}")).ok();
        self.slots.borrow_mut().push(Slot { token: label.into(), database, group: group.into() });
        self.write_config();
    }

    /// A database slot: its token objects become rows of the key store.
    pub fn db_token(&self, label: &str, group: &str) {
        self.token(label, true, group);
    }

    /// A pass-through slot: keys are the HSM's own ("HSM keys"); `group` is its default_group.
    pub fn native_token(&self, label: &str, group: &str) {
        self.token(label, false, group);
    }

    fn env(&self, c: &mut Command) {
        c.env("SOFTHSM2_CONF", self.softhsm_conf())
            .env("P11SHIM_CONFIG", self.config_path())
            .env_remove("P11SHIM_MODULE")
            .env("P11SHIM_SO_PIN", SO_PIN)
            .env("P11SHIM_USER_PIN", USER_PIN)
            .current_dir(&self.dir);
    }

    /// The `p11shim` command with this lab's environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_p11shim"));
        self.env(&mut c);
        c.args(args);
        c
    }

    pub fn p11shim(&self, args: &[&str]) -> Out {
        run(self.cmd(args), format!("p11shim {}", args.join(" ")))
    }

    /// `p11shim ARGS` with extra environment variables.
    pub fn p11shim_env(&self, args: &[&str], vars: &[(&str, &str)]) -> Out {
        let mut c = self.cmd(args);
        c.envs(vars.iter().copied());
        run(c, format!("p11shim {}", args.join(" ")))
    }

    /// `pkcs11-tool` through the shim on token `token`, logged in as the user.
    pub fn tool(&self, token: &str, args: &[&str]) -> Out {
        self.tool_with(&common::shim_path(), token, args)
    }

    /// `pkcs11-tool` on SoftHSM2 itself: what the HSM holds, without the shim.
    pub fn hsm_tool(&self, token: &str, args: &[&str]) -> Out {
        self.tool_with(Path::new(common::SOFTHSM), token, args)
    }

    fn tool_with(&self, module: &Path, token: &str, args: &[&str]) -> Out {
        let mut c = Command::new("pkcs11-tool");
        self.env(&mut c);
        c.arg("--module").arg(module).args(["--token-label", token, "--login", "--pin", USER_PIN]).args(args);
        run(c, format!("pkcs11-tool ({}) --token-label {token} {}", module.display(), args.join(" ")))
    }

    /// A path in the test directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn p(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    // ---- the MBK ----------------------------------------------------------------------------------------

    pub fn mbk_create(&self, token: &str) -> String {
        self.p11shim(&["mbk", "create", "--token", token]).ok();
        self.fingerprint(token).expect("an MBK after mbk create")
    }

    /// The fingerprint `mbk show` prints, or None when the token has no MBK (the command fails).
    pub fn fingerprint(&self, token: &str) -> Option<String> {
        let out = self.p11shim(&["mbk", "show", "--token", token]);
        if out.code != Some(0) {
            assert!(out.stderr.contains("no master backup key"), "{}", out.describe());
            return None;
        }
        out.stdout.lines().find_map(|l| l.strip_prefix("fingerprint:").map(|f| f.trim().to_string()))
    }

    /// Clones the MBK of `from` to `to` (clone-request, clone-to, clone-accept).
    pub fn clone_mbk(&self, from: &str, to: &str) {
        let (req, resp) = (self.p(&format!("req-{to}.json")), self.p(&format!("resp-{to}.json")));
        self.p11shim(&["mbk", "clone-request", "--token", to, "--out", &req]).ok();
        self.p11shim(&["mbk", "clone-to", &req, "--token", from, "--out", &resp]).ok();
        self.p11shim(&["mbk", "clone-accept", &resp, "--token", to]).ok();
        assert_eq!(self.fingerprint(to), self.fingerprint(from), "fingerprints after cloning {from} → {to}");
    }

    // ---- users ------------------------------------------------------------------------------------------

    /// Writes a fresh Ed25519 key pair DIR/users/NAME.key (PEM PKCS#8) and NAME.pub (PEM public key).
    fn key_pair(&self, name: &str) -> (PathBuf, PathBuf) {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("randomness");
        let key = SigningKey::from_bytes(&seed);
        let private = self.dir.join(format!("users/{name}.key"));
        let public = self.dir.join(format!("users/{name}.pub"));
        std::fs::write(&private, key.to_pkcs8_pem(Default::default()).unwrap().as_bytes()).unwrap();
        std::fs::write(&public, key.verifying_key().to_public_key_pem(Default::default()).unwrap()).unwrap();
        (private, public)
    }

    /// The `--logon` value of a signature user made by [`Lab::user`].
    pub fn logon(&self, name: &str) -> String {
        format!("{name},{}", self.dir.join(format!("users/{name}.key")).display())
    }

    /// The first user, "admin" (10000000, '.*', signature logon), created with the SO PIN of `token`.
    pub fn admin(&self, token: &str) {
        let (_, public) = self.key_pair("admin");
        let public = public.display().to_string();
        self.p11shim(&[
            "user",
            "add",
            "admin",
            "--perm",
            "10000000",
            "--group-regex",
            ".*",
            "--sign-key",
            &public,
            "--token",
            token,
        ])
        .ok();
    }

    /// A signature-logon user, added by admin.
    pub fn user(&self, name: &str, perm: &str, regex: &str) -> String {
        let (_, public) = self.key_pair(name);
        let (public, admin) = (public.display().to_string(), self.logon("admin"));
        self.p11shim(&[
            "user",
            "add",
            name,
            "--perm",
            perm,
            "--group-regex",
            regex,
            "--sign-key",
            &public,
            "--logon",
            &admin,
        ])
        .ok();
        self.logon(name)
    }

    /// A password user, added by admin.
    pub fn password_user(&self, name: &str, perm: &str, regex: &str, password: &str) {
        let admin = self.logon("admin");
        self.p11shim_env(
            &["user", "add", name, "--perm", perm, "--group-regex", regex, "--password", "--logon", &admin],
            &[("P11SHIM_NEW_PASSWORD", password)],
        )
        .ok();
    }

    // ---- what the store and the HSM hold ------------------------------------------------------------------

    pub fn store(&self) -> Box<dyn KeyStore> {
        store::open(&self.url()).unwrap_or_else(|e| panic!("open the key store {}: {e}", self.url()))
    }

    /// Every key row, ordered by (token, id).
    pub fn rows(&self) -> Vec<KeyRow> {
        let mut rows = Vec::new();
        self.store()
            .scan(&mut |r| {
                rows.push(r);
                Ok(())
            })
            .expect("scan the key store");
        rows
    }

    pub fn rows_of(&self, token: &str) -> Vec<KeyRow> {
        self.rows().into_iter().filter(|r| r.token == token).collect()
    }

    /// Labels of the rows of `token`, sorted.
    pub fn labels_of(&self, token: &str) -> Vec<String> {
        let mut l: Vec<String> =
            self.rows_of(token).iter().map(|r| String::from_utf8_lossy(&r.label).into_owned()).collect();
        l.sort();
        l
    }

    /// What SoftHSM2 itself holds on `token` (pkcs11-tool -O, logged in): the token's own objects.
    pub fn hsm_objects(&self, token: &str) -> String {
        self.hsm_tool(token, &["--list-objects"]).ok().stdout
    }

    /// Everything a restore could change: the key rows and the objects of every token in the HSM.
    pub fn snapshot(&self) -> Snapshot {
        // A database slot's token holds only its MBK set in the HSM; a restore adds rows there.
        let tokens: Vec<String> = self.slots.borrow().iter().filter(|s| !s.database).map(|s| s.token.clone()).collect();
        Snapshot { rows: self.rows(), objects: tokens.iter().map(|t| (t.clone(), self.hsm_objects(t))).collect() }
    }

    /// The audit log as `audit show --json` prints it.
    pub fn audit(&self) -> Vec<Value> {
        match self.p11shim(&["audit", "show", "--json"]).ok().json() {
            Value::Array(a) => a,
            other => panic!("audit show --json: not an array: {other}"),
        }
    }

    /// Runs `sql` on the key store's database (sqlite3 CLI, or a PostgreSQL client).
    pub fn sql(&self, sql: &str) {
        let url = self.url();
        match self.engine {
            Engine::Sqlite => {
                let path = url.strip_prefix("sqlite:").unwrap();
                let mut c = Command::new("sqlite3");
                c.arg(path).arg(sql);
                run(c, format!("sqlite3 {path} {sql:?}")).ok();
            }
            Engine::Postgres => {
                let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
                client.batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
        }
    }

    /// Whether another connection holds a write transaction on the key store now (SQLite: BEGIN IMMEDIATE is
    /// refused at once; PostgreSQL: a backend of this database has written in an open transaction).
    pub fn write_transaction_open(&self) -> bool {
        let url = self.url();
        match self.engine {
            Engine::Sqlite => {
                let c = rusqlite::Connection::open(url.strip_prefix("sqlite:").unwrap()).expect("open the database");
                c.busy_timeout(Duration::ZERO).unwrap();
                match c.execute_batch("BEGIN IMMEDIATE; ROLLBACK;") {
                    Ok(()) => false,
                    Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::DatabaseBusy => true,
                    Err(e) => panic!("probing {url}: {e}"),
                }
            }
            Engine::Postgres => {
                let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
                let row = client
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                         AND pid <> pg_backend_pid() AND backend_xid IS NOT NULL",
                        &[],
                    )
                    .expect("pg_stat_activity");
                row.get::<_, i64>(0) > 0
            }
        }
    }

    /// Makes or reads a big object on `token` through the shim, in a child process as [`Lab::bulk_keys`]
    /// does (see [`big_objects`]).
    pub fn big(&self, token: &str, what: &str) {
        let mut c = Command::new(std::env::current_exe().unwrap());
        self.env(&mut c);
        c.args(["--exact", "backup_child", "--nocapture", "--test-threads=1"])
            .env("BACKUP_CHILD_TOKEN", token)
            .env("BACKUP_CHILD_BIG", what);
        let out = run(c, format!("backup_child: {what} on {token}"));
        assert!(out.code == Some(0) && out.stdout.contains("@@DONE"), "{}", out.describe());
    }

    /// Makes `n` AES-256 token keys labelled `PREFIX-I` on `token` through the shim, in one child process (this
    /// test binary re-run as `backup_child`, which loads the shim with cryptoki). Returns the time it took.
    pub fn bulk_keys(&self, token: &str, prefix: &str, n: usize) -> Duration {
        let started = Instant::now();
        let mut c = Command::new(std::env::current_exe().unwrap());
        self.env(&mut c);
        c.args(["--exact", "backup_child", "--nocapture", "--test-threads=1"])
            .env("BACKUP_CHILD_TOKEN", token)
            .env("BACKUP_CHILD_PREFIX", prefix)
            .env("BACKUP_CHILD_KEYS", n.to_string());
        let out = run(c, format!("backup_child: {n} keys on {token}"));
        assert!(out.code == Some(0) && out.stdout.contains(&format!("@@MADE {n}")), "{}", out.describe());
        started.elapsed()
    }
}

impl Lab {
    /// Starts writer `i` of [`window_writer`] on `token`: this test binary re-run as `backup_child`, loading
    /// the shim with cryptoki, in a process of its own, as a host of its own: on a copy of the token directory
    /// (same token, same MBK set; SoftHSM2 is not safe for several processes writing one token directory),
    /// with the same config and so the same key store.
    pub fn window_writer(&self, token: &str, i: usize, k: usize, dir: &Path) -> std::process::Child {
        let mut c = Command::new(std::env::current_exe().unwrap());
        self.env(&mut c);
        c.env("SOFTHSM2_CONF", common::softhsm_copy(&self.dir.join("hsm"), &self.dir.join(format!("host-{i}"))));
        c.args(["--exact", "backup_child", "--nocapture", "--test-threads=1"])
            .env("BACKUP_CHILD_TOKEN", token)
            .env("BACKUP_CHILD_WINDOW", format!("{i},{k},{}", dir.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c.spawn().expect("start a writer")
    }
}

/// The child's side of [`Lab::bulk_keys`]; does nothing in a normal test run.
pub fn child() {
    if let (Ok(token), Ok(what)) = (std::env::var("BACKUP_CHILD_TOKEN"), std::env::var("BACKUP_CHILD_BIG")) {
        return big_objects(&token, &what);
    }
    if let (Ok(token), Ok(what)) = (std::env::var("BACKUP_CHILD_TOKEN"), std::env::var("BACKUP_CHILD_WINDOW")) {
        return window_writer(&token, &what);
    }
    let (Ok(token), Ok(prefix), Ok(n)) =
        (std::env::var("BACKUP_CHILD_TOKEN"), std::env::var("BACKUP_CHILD_PREFIX"), std::env::var("BACKUP_CHILD_KEYS"))
    else {
        return;
    };
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::Attribute;
    let n: usize = n.parse().unwrap();
    let s = child_session(&token);
    for i in 0..n {
        s.generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::Label(format!("{prefix}-{i}").into_bytes()),
                Attribute::Id((i as u32).to_be_bytes().to_vec()),
                Attribute::ValueLen(32.into()),
                Attribute::Encrypt(true),
            ],
        )
        .unwrap_or_else(|e| panic!("key {i}: {e}"));
    }
    println!("@@MADE {n}");
}

/// A child's R/W session on `token` through the shim, the user logged in.
fn child_session(token: &str) -> cryptoki::session::Session {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    let p = Pkcs11::new(common::shim_path()).expect("load the shim");
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("C_Initialize");
    let slot = p
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|s| p.get_token_info(*s).map(|i| i.label() == token).unwrap_or(false))
        .expect("the token");
    let s = p.open_rw_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::new(USER_PIN.into()))).unwrap();
    s
}

/// The child's side of [`Lab::window_writer`]: "I,K,DIR" keeps a sliding window of AES keys labelled
/// `wI-SEQ` on `token`: it makes key n, then destroys key n-K, so that at every moment its keys are exactly
/// the sequence numbers of one run of K or K+1. It writes DIR/ready-I once a window is full, and stops
/// when DIR/stop exists, printing how many keys it made.
fn window_writer(token: &str, what: &str) {
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::Attribute;
    let parts: Vec<&str> = what.split(',').collect();
    let [writer, k, dir] = parts[..] else { panic!("BACKUP_CHILD_WINDOW is I,K,DIR: {what}") };
    let (k, dir): (usize, &Path) = (k.parse().unwrap(), Path::new(dir));
    let s = child_session(token);
    let mut live = std::collections::VecDeque::new();
    let mut n = 0u64;
    while !dir.join("stop").exists() {
        let key = s
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Token(true),
                    Attribute::Label(format!("w{writer}-{n}").into_bytes()),
                    Attribute::ValueLen(16.into()),
                    Attribute::Encrypt(true),
                ],
            )
            .unwrap_or_else(|e| panic!("writer {writer}, key {n}: {e}"));
        live.push_back(key);
        if live.len() > k {
            s.destroy_object(live.pop_front().unwrap()).unwrap_or_else(|e| panic!("writer {writer}, destroy: {e}"));
        }
        n += 1;
        if n == k as u64 + 1 {
            std::fs::write(dir.join(format!("ready-{writer}")), b"").unwrap();
        }
    }
    println!("@@MADE {n}");
}

/// The label of [`Lab::big`]'s key: `size` bytes, not all alike.
pub fn big_label(size: usize) -> Vec<u8> {
    (0..size).map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789"[(i * 7 + i / 36) % 36]).collect()
}

/// The value of [`Lab::big`]'s data object: `size` bytes.
pub fn big_value(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0]).collect()
}

/// The child's side of [`Lab::big`]: "label:N" makes an AES key (CKA_ID 77) with a label of N bytes,
/// "data" a data object "bigdata" with a value of [`BIG`] bytes, "read:PATH" writes that object's value to
/// PATH. Command-line tools cannot: an argument holds at most 128 KiB, and pkcs11-tool reads and writes at
/// most 5,000 bytes of an object.
fn big_objects(token: &str, what: &str) {
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    let s = child_session(token);
    let data = [Attribute::Class(ObjectClass::DATA), Attribute::Label(b"bigdata".to_vec())];
    match what {
        label if label.starts_with("label:") => {
            let size: usize = label["label:".len()..].parse().unwrap();
            s.generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Token(true),
                    Attribute::Label(big_label(size)),
                    Attribute::Id(vec![0x77]),
                    Attribute::ValueLen(32.into()),
                    Attribute::Encrypt(true),
                ],
            )
            .unwrap_or_else(|e| panic!("a key with a label of {size} bytes: {e}"));
        }
        label if label.starts_with("refused-label:") => {
            let size: usize = label["refused-label:".len()..].parse().unwrap();
            let e = s
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Token(true),
                        Attribute::Label(big_label(size)),
                        Attribute::Id(vec![0x78]),
                        Attribute::ValueLen(32.into()),
                    ],
                )
                .expect_err("a label over the store's limit");
            let rv = match e {
                cryptoki::error::Error::Pkcs11(rv, _) => rv,
                e => panic!("{e}"),
            };
            assert_eq!(rv, cryptoki::error::RvError::DeviceMemory, "a value over the store's limit is no outage");
        }
        "data" => {
            let mut t = data.to_vec();
            t.extend([Attribute::Token(true), Attribute::Value(big_value(BIG))]);
            s.create_object(&t).unwrap_or_else(|e| panic!("a data object of {BIG} bytes: {e}"));
        }
        read => {
            let path = read.strip_prefix("read:").expect("label, data or read:PATH");
            let found = s.find_objects(&data).unwrap();
            assert_eq!(found.len(), 1, "one bigdata object");
            let attrs = s.get_attributes(found[0], &[AttributeType::Value]).unwrap();
            let Some(Attribute::Value(v)) = attrs.into_iter().next() else { panic!("no CKA_VALUE") };
            std::fs::write(path, v).unwrap();
        }
    }
    println!("@@DONE");
}

#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    rows: Vec<KeyRow>,
    objects: Vec<(String, String)>,
}

/// Runs one case per test with the engine of the binary, and the child entry point of [`Lab::bulk_keys`].
#[macro_export]
macro_rules! backup_cases {
    ($engine:expr; $($name:ident),* $(,)?) => {
        #[test]
        fn backup_child() {
            backup_cases::child()
        }
        $(
            #[test]
            fn $name() {
                backup_cases::$name($engine)
            }
        )*
    };
}

// ---- small helpers ---------------------------------------------------------------------------------------

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("{key} is not a string in {v}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

/// The labels of a restore report's list ("\"k1\" (id …, group \"G\")" → "k1"), sorted.
fn labels(v: &Value, key: &str) -> Vec<String> {
    let mut l: Vec<String> = v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} is not a list in {v}"))
        .iter()
        .map(|e| e["label"].as_str().unwrap_or_else(|| panic!("an item without a label in {v}")).to_string())
        .collect();
    l.sort();
    l
}

fn strings(list: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

fn sha256_file(path: &Path) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

/// Key material a round trip compares: what a key does, made with pkcs11-tool.
struct Made {
    /// AES-ECB ciphertext of `block`.
    aes: Vec<u8>,
    /// HMAC-SHA256 of `data` with the generic secret.
    hmac: Vec<u8>,
    /// RSA PKCS#1 v1.5 SHA-256 signature of `data` (deterministic).
    rsa: Vec<u8>,
}

/// Writes DIR/data (the message) and DIR/digest (its SHA-256) and DIR/block (two AES blocks).
fn inputs(lab: &Lab) {
    std::fs::write(lab.path("data"), b"p11shim round trip: signed before the backup, verified after the restore")
        .unwrap();
    let mut c = Command::new("openssl");
    c.args(["dgst", "-sha256", "-binary", "-out", &lab.p("digest"), &lab.p("data")]);
    run(c, "openssl dgst".into()).ok();
    std::fs::write(lab.path("block"), [0x42u8; 32]).unwrap();
}

/// The four key kinds of the round trip on `token`: AES (id 01), generic secret (02), RSA-2048 (03), EC
/// P-256 (04).
fn make_four_keys(lab: &Lab, token: &str) {
    lab.tool(token, &["--keygen", "--key-type", "AES:32", "--label", "aes", "--id", "01"]).ok();
    lab.tool(token, &["--keygen", "--key-type", "GENERIC:32", "--label", "hmac", "--id", "02"]).ok();
    lab.tool(token, &["--keypairgen", "--key-type", "rsa:2048", "--label", "rsa", "--id", "03"]).ok();
    lab.tool(token, &["--keypairgen", "--key-type", "EC:prime256v1", "--label", "ec", "--id", "04"]).ok();
}

/// Uses the four keys on `token` (through `tool`): AES ciphertext, HMAC, RSA signature; an ECDSA signature
/// in DIR/sig-ec-TAG (DER, as openssl wants it).
fn use_four_keys(lab: &Lab, tool: &dyn Fn(&[&str]) -> Out, tag: &str) -> Made {
    let out = |name: &str| lab.p(&format!("{name}-{tag}"));
    let (data, block, digest) = (lab.p("data"), lab.p("block"), lab.p("digest"));
    tool(&["--encrypt", "-m", "AES-ECB", "--id", "01", "-i", &block, "-o", &out("aes")]).ok();
    tool(&["--sign", "-m", "SHA256-HMAC", "--id", "02", "-i", &data, "-o", &out("hmac")]).ok();
    tool(&["--sign", "-m", "SHA256-RSA-PKCS", "--id", "03", "-i", &data, "-o", &out("rsa")]).ok();
    tool(&["--sign", "-m", "ECDSA", "--signature-format", "openssl", "--id", "04", "-i", &digest, "-o", &out("ec")])
        .ok();
    let read = |name: &str| std::fs::read(out(name)).unwrap();
    Made { aes: read("aes"), hmac: read("hmac"), rsa: read("rsa") }
}

/// `openssl dgst -sha256 -verify PUB -signature SIG data` with a DER public key as pkcs11-tool exports it.
fn openssl_verifies(lab: &Lab, public_der: &str, signature: &str) -> Out {
    let pem = lab.p(&format!("{public_der}.pem"));
    let mut c = Command::new("openssl");
    c.args(["pkey", "-pubin", "-inform", "DER", "-in", &lab.p(public_der), "-out", &pem]);
    run(c, format!("openssl pkey {public_der}")).ok();
    let mut c = Command::new("openssl");
    c.args(["dgst", "-sha256", "-verify", &pem, "-signature", &lab.p(signature), &lab.p("data")]);
    run(c, format!("openssl dgst -verify {public_der} -signature {signature}"))
}

/// Checks the keys on `token` do what the originals did: same AES ciphertext and HMAC, the old ciphertext
/// decrypts, and new signatures verify with the OLD public keys (exported before the backup).
fn same_keys(lab: &Lab, tool: &dyn Fn(&[&str]) -> Out, before: &Made, tag: &str) {
    let after = use_four_keys(lab, tool, tag);
    assert_eq!(after.aes, before.aes, "{tag}: the restored AES key encrypts the block as the original did");
    assert_eq!(after.hmac, before.hmac, "{tag}: the restored generic secret gives the same HMAC");
    assert_eq!(after.rsa, before.rsa, "{tag}: RSA PKCS#1 v1.5 is deterministic: same signature as before");
    tool(&[
        "--decrypt",
        "-m",
        "AES-ECB",
        "--id",
        "01",
        "-i",
        &lab.p("aes-before"),
        "-o",
        &lab.p(&format!("plain-{tag}")),
    ])
    .ok();
    assert_eq!(std::fs::read(lab.path(&format!("plain-{tag}"))).unwrap(), [0x42u8; 32], "{tag}: old ciphertext");
    openssl_verifies(lab, "rsa.der", &format!("rsa-{tag}")).ok();
    let ec = openssl_verifies(lab, "ec.der", &format!("ec-{tag}")).ok();
    assert!(ec.stdout.contains("Verified OK"), "{tag}: {}", ec.stdout);
}

fn delete_four_keys(lab: &Lab, token: &str) {
    for (ty, id) in [("secrkey", "01"), ("secrkey", "02"), ("privkey", "03"), ("pubkey", "03"), ("privkey", "04")]
        .into_iter()
        .chain([("pubkey", "04")])
    {
        lab.tool(token, &["--delete-object", "--type", ty, "--id", id]).ok();
    }
}

// ---- 1. round trip ---------------------------------------------------------------------------------------

/// AES, generic secret, RSA-2048 and EC P-256 keys of a database slot: used before the backup, destroyed,
/// restored; the restored keys make the same ciphertext, HMAC and RSA signature, and their signatures verify
/// with the old public keys. Then the same backup into another HSM (a native token with a cloned MBK): the
/// keys become that HSM's own token objects and do the same.
pub fn round_trip_of_aes_generic_rsa_and_ec_keys(engine: Engine) {
    let lab = Lab::new(engine, "round_trip");
    lab.db_token("prod", "ProdKey");
    lab.mbk_create("prod");
    lab.admin("prod");
    let carol = lab.user("carol", "00000002", "Prod.*");
    inputs(&lab);
    make_four_keys(&lab, "prod");
    let before = use_four_keys(&lab, &|a| lab.tool("prod", a), "before");
    lab.tool("prod", &["--read-object", "--type", "pubkey", "--id", "03", "-o", &lab.p("rsa.der")]).ok();
    lab.tool("prod", &["--read-object", "--type", "pubkey", "--id", "04", "-o", &lab.p("ec.der")]).ok();
    openssl_verifies(&lab, "rsa.der", "rsa-before").ok();
    openssl_verifies(&lab, "ec.der", "ec-before").ok();
    let rows_before = lab.rows_of("prod");
    assert_eq!(rows_before.len(), 6, "AES, generic, RSA pair, EC pair are 6 rows: {rows_before:?}");

    let file = lab.p("prod.p11b");
    let report =
        lab.p11shim(&["backup", "--group", "Prod.*", "--out", &file, "--token", "prod", "--logon", &carol, "--json"]);
    let report = report.ok().json();
    assert_eq!((n(&report, "exported"), n(&report, "stored"), n(&report, "hsm")), (6, 6, 0), "{report}");
    assert_eq!(report["not_exported"], Value::Array(vec![]), "{report}");
    assert_eq!(report["groups"]["ProdKey"], 6, "{report}");

    delete_four_keys(&lab, "prod");
    assert_eq!(lab.rows_of("prod"), vec![], "every key destroyed before the restore");
    assert!(
        lab.tool("prod", &["--sign", "-m", "SHA256-HMAC", "--id", "02", "-i", &lab.p("data"), "-o", &lab.p("x")]).code
            != Some(0)
    );

    let restored = lab.p11shim(&["restore", &file, "--token", "prod", "--logon", &carol, "--json"]).ok().json();
    assert_eq!(labels(&restored, "added"), strings(&["aes", "ec", "ec", "hmac", "rsa", "rsa"]), "{restored}");
    assert_eq!((n(&restored, "records"), restored["skipped"].as_array().unwrap().len()), (6, 0), "{restored}");
    let strip = |rows: Vec<KeyRow>| -> Vec<_> {
        rows.into_iter()
            .map(|r| (r.id, r.token, r.group, r.class, r.key_type, r.label, r.ckid, r.attrs, r.wrapped, r.mbk))
            .collect()
    };
    assert_eq!(strip(lab.rows_of("prod")), strip(rows_before), "the restored rows are the rows that were backed up");
    same_keys(&lab, &|a| lab.tool("prod", a), &before, "restored");

    // Into another HSM with a cloned MBK: a pass-through slot, so the keys become its own token objects.
    lab.native_token("far", "FarKeys");
    lab.clone_mbk("prod", "far");
    let before_far = lab.snapshot();
    let dry = lab.p11shim(&["restore", &file, "--token", "far", "--logon", &carol, "--json", "--dry-run"]);
    assert_eq!(labels(&dry.ok().json(), "added").len(), 6);
    assert_eq!(lab.snapshot(), before_far, "restore --dry-run into a native token made objects");
    let far = lab.p11shim(&["restore", &file, "--token", "far", "--logon", &carol, "--json"]).ok().json();
    assert_eq!(labels(&far, "added"), strings(&["aes", "ec", "ec", "hmac", "rsa", "rsa"]), "{far}");
    let objects = lab.hsm_objects("far");
    for label in ["aes", "hmac", "rsa", "ec"] {
        assert!(objects.contains(&format!("label:      {label}\n")), "{label} is a token object in far: {objects}");
    }
    assert!(lab.rows_of("far").is_empty(), "a pass-through slot gets no rows");
    // pkcs11-tool made the secrets not extractable: their values could never be read, and still cannot.
    for id in ["01", "02"] {
        let read = |tool: &dyn Fn(&[&str]) -> Out| {
            tool(&["--read-object", "--type", "secrkey", "--id", id, "-o", &lab.p(&format!("value-{id}"))])
        };
        let original = read(&|a| lab.tool("prod", a));
        assert_ne!(original.code, Some(0), "the original's value is not readable: {}", original.stderr);
        let copy = read(&|a| lab.hsm_tool("far", a));
        assert_ne!(
            copy.code,
            Some(0),
            "secret {id} restored into far can be read in clear (CKA_VALUE), the original could not: {}",
            lab.hsm_objects("far")
        );
    }
    same_keys(&lab, &|a| lab.hsm_tool("far", a), &before, "far");
    // Restoring again finds them present.
    let again = lab.p11shim(&["restore", &file, "--token", "far", "--logon", &carol, "--json"]).ok().json();
    assert_eq!((labels(&again, "added").len(), labels(&again, "skipped").len()), (0, 6), "{again}");
}

/// The same backup restored into a second database slot of the same store (same MBK, cloned): the keys are
/// added for that slot, and the first slot keeps its own keys, with or without --overwrite. (Token labels here
/// are never prefixes of one another: pkcs11-tool --token-label matches a prefix.)
pub fn restore_into_a_second_database_slot_of_the_same_store(engine: Engine) {
    let lab = Lab::new(engine, "second_slot");
    lab.db_token("prod", "ProdKey");
    lab.db_token("copy", "ProdCopy");
    lab.mbk_create("prod");
    lab.clone_mbk("prod", "copy");
    lab.admin("prod");
    let carol = lab.user("carol", "00000002", "Prod.*");
    inputs(&lab);
    lab.tool("prod", &["--keygen", "--key-type", "AES:32", "--label", "aes", "--id", "01"]).ok();
    lab.tool("prod", &["--keypairgen", "--key-type", "EC:prime256v1", "--label", "ec", "--id", "04"]).ok();
    lab.tool("prod", &["--encrypt", "-m", "AES-ECB", "--id", "01", "-i", &lab.p("block"), "-o", &lab.p("ct-prod")])
        .ok();
    let file = lab.p("prod.p11b");
    lab.p11shim(&["backup", "--group", "ProdKey", "--out", &file, "--token", "prod", "--logon", &carol]).ok();
    let prod_rows = lab.rows_of("prod");
    assert_eq!(prod_rows.len(), 3);

    let report = lab.p11shim(&["restore", &file, "--token", "copy", "--logon", &carol, "--json"]).ok().json();
    let prod_after = lab.rows_of("prod");
    assert_eq!(prod_after, prod_rows, "restoring into copy must not touch prod's keys");
    assert_eq!(
        labels(&report, "added"),
        strings(&["aes", "ec", "ec"]),
        "the keys are not in copy, so a restore into copy adds them (they are present only in prod): {report}"
    );
    assert_eq!(lab.labels_of("copy"), strings(&["aes", "ec", "ec"]));
    lab.tool("copy", &["--encrypt", "-m", "AES-ECB", "--id", "01", "-i", &lab.p("block"), "-o", &lab.p("ct-copy")])
        .ok();
    assert_eq!(std::fs::read(lab.path("ct-copy")).unwrap(), std::fs::read(lab.path("ct-prod")).unwrap());

    let again = lab.p11shim(&["restore", &file, "--token", "copy", "--logon", &carol, "--json"]).ok().json();
    assert_eq!(labels(&again, "skipped"), strings(&["aes", "ec", "ec"]), "restored twice: present now: {again}");
    let back = lab.p11shim(&["restore", &file, "--token", "prod", "--logon", &carol, "--json"]).ok().json();
    assert_eq!(labels(&back, "skipped"), strings(&["aes", "ec", "ec"]), "present in prod all along: {back}");
    let over = lab.p11shim(&["restore", &file, "--token", "copy", "--logon", &carol, "--overwrite", "--json"]);
    assert_eq!(labels(&over.ok().json(), "overwritten"), strings(&["aes", "ec", "ec"]));
    assert_eq!(lab.rows_of("prod"), prod_rows, "restore --overwrite into copy must not move prod's keys to copy");
    assert_eq!(lab.labels_of("copy"), strings(&["aes", "ec", "ec"]));
}

// ---- 2. merge, skip, overwrite, dry run ------------------------------------------------------------------

pub fn restore_merges_skips_overwrites_and_dry_run_changes_nothing(engine: Engine) {
    let lab = Lab::new(engine, "merge");
    lab.db_token("prod", "ProdKey");
    lab.mbk_create("prod");
    lab.admin("prod");
    let carol = lab.user("carol", "00000002", "Prod.*");
    for (label, id) in [("a", "01"), ("b", "02"), ("c", "03")] {
        lab.tool("prod", &["--keygen", "--key-type", "AES:32", "--label", label, "--id", id]).ok();
    }
    let file = lab.p("abc.p11b");
    lab.p11shim(&["backup", "--group", "ProdKey", "--out", &file, "--token", "prod", "--logon", &carol]).ok();
    let original: Vec<KeyRow> = lab.rows_of("prod");

    // b goes, d comes (not in the file), c changes (its CKA_ID).
    lab.tool("prod", &["--delete-object", "--type", "secrkey", "--id", "02"]).ok();
    lab.tool("prod", &["--keygen", "--key-type", "AES:32", "--label", "d", "--id", "04"]).ok();
    lab.tool("prod", &["--set-id", "33", "--id", "03", "--type", "secrkey"]).ok();
    let ckid = |label: &str| {
        lab.rows_of("prod").into_iter().find(|r| r.label == label.as_bytes()).map(|r| hex::encode(r.ckid))
    };
    assert_eq!(ckid("c").as_deref(), Some("33"), "c's CKA_ID changed before the restore");
    let restore = |extra: &[&str]| {
        let mut args = vec!["restore", &file, "--token", "prod", "--logon", &carol, "--json"];
        args.extend_from_slice(extra);
        lab.p11shim(&args).ok().json()
    };

    let before = lab.snapshot();
    let dry = restore(&["--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(
        (labels(&dry, "added"), labels(&dry, "skipped"), labels(&dry, "overwritten")),
        (strings(&["b"]), strings(&["a", "c"]), vec![]),
        "{dry}"
    );
    assert_eq!(lab.snapshot(), before, "restore --dry-run changed something");
    let dry_over = restore(&["--dry-run", "--overwrite"]);
    assert_eq!(
        (labels(&dry_over, "added"), labels(&dry_over, "skipped"), labels(&dry_over, "overwritten")),
        (strings(&["b"]), vec![], strings(&["a", "c"])),
        "{dry_over}"
    );
    assert_eq!(lab.snapshot(), before, "restore --dry-run --overwrite changed something");

    let real = restore(&[]);
    assert_eq!(real["added"], dry["added"], "the restore did what the dry run said");
    assert_eq!(real["skipped"], dry["skipped"]);
    assert_eq!(real["overwritten"], dry["overwritten"]);
    assert_eq!(lab.labels_of("prod"), strings(&["a", "b", "c", "d"]), "merged: d (not in the file) stays");
    assert_eq!(ckid("c").as_deref(), Some("33"), "a present key is skipped, not replaced");
    let b = lab.rows_of("prod").into_iter().find(|r| r.label == b"b").unwrap();
    assert_eq!(Some(&b), original.iter().find(|r| r.label == b"b"), "b is back as it was");

    let over = restore(&["--overwrite"]);
    assert_eq!(
        (labels(&over, "added"), labels(&over, "skipped"), labels(&over, "overwritten")),
        (vec![], vec![], strings(&["a", "b", "c"])),
        "{over}"
    );
    assert_eq!(lab.labels_of("prod"), strings(&["a", "b", "c", "d"]), "d stays after --overwrite too");
    assert_eq!(ckid("c").as_deref(), Some("03"), "--overwrite put back the backed-up c");
    let audit = lab.audit();
    let actions: Vec<&str> = audit.iter().map(|e| s(e, "action")).collect();
    assert!(
        actions.ends_with(&["restore --dry-run", "restore --dry-run", "restore", "restore"]),
        "dry runs are audited as such: {actions:?}"
    );
}

// ---- 3. integrity ----------------------------------------------------------------------------------------

/// Replaces the first character of field `field`'s value (after a quote) in a record line with another of
/// the same kind (hex digit for hex digit, letter for letter), so that the line stays well-formed.
fn flip_value(line: &str, field: &str, offset: usize) -> String {
    let key = format!("\"{field}\":");
    let mut at = line.find(&key).unwrap_or_else(|| panic!("no {key} in {line}")) + key.len();
    if line.as_bytes()[at] == b'"' {
        at += 1;
    }
    at += offset;
    let mut bytes = line.as_bytes().to_vec();
    let c = bytes[at];
    bytes[at] = match c {
        b'0'..=b'8' => c + 1,
        b'9' => b'8',
        b'a'..=b'e' | b'A'..=b'Y' | b'g'..=b'y' => c + 1,
        b'f' | b'z' | b'Z' => c - 1,
        _ => c ^ 1,
    };
    String::from_utf8(bytes).unwrap()
}

const RECORD_FIELDS: [&str; 13] = [
    "kind",
    "id",
    "token",
    "group",
    "class",
    "key_type",
    "label",
    "ckid",
    "attrs",
    "wrapped",
    "wrap_mech",
    "mbk",
    "mac",
];

/// A file whose lines are `lines` (each without its newline).
fn put(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

/// Every damaged backup is refused by restore (into a database slot and into a native token) with an error
/// naming the first bad record, and changes nothing; verify reports the same problem; the good file verifies
/// and unwraps every secret.
pub fn damaged_backups_are_refused_and_change_nothing(engine: Engine) {
    let lab = Lab::new(engine, "integrity");
    lab.db_token("prod", "ProdKey");
    lab.native_token("far", "FarKeys");
    lab.mbk_create("prod");
    lab.clone_mbk("prod", "far");
    lab.admin("prod");
    let carol = lab.user("carol", "00000002", "Prod.*");
    lab.tool("prod", &["--keygen", "--key-type", "AES:32", "--label", "aes", "--id", "01"]).ok();
    lab.tool("prod", &["--keygen", "--key-type", "GENERIC:32", "--label", "hmac", "--id", "02"]).ok();
    lab.tool("prod", &["--keypairgen", "--key-type", "EC:prime256v1", "--label", "ec", "--id", "04"]).ok();
    let good = lab.path("good.p11b");
    lab.p11shim(&["backup", "--group", "ProdKey", "--out", &lab.p("good.p11b"), "--token", "prod", "--logon", &carol])
        .ok();
    let verified =
        lab.p11shim(&["verify", &lab.p("good.p11b"), "--token", "far", "--logon", &carol, "--json"]).ok().json();
    assert_eq!((n(&verified, "records"), n(&verified, "unwrapped")), (4, 3), "3 secrets and 1 public key: {verified}");
    assert_eq!(verified["ok"], true);
    // So that a restore would change something: two keys gone from the database slot.
    lab.tool("prod", &["--delete-object", "--type", "secrkey", "--id", "01"]).ok();
    lab.tool("prod", &["--delete-object", "--type", "privkey", "--id", "04"]).ok();
    let lines: Vec<String> = std::fs::read_to_string(&good).unwrap().lines().map(String::from).collect();
    assert_eq!(lines.len(), 7, "magic, header, 4 records, trailer");
    // Record k (1-based) is line k + 1; pick the first record from the second on with every field non-empty.
    let k = (2..=4).find(|k| !lines[k + 1].contains("\"wrapped\":\"\"")).expect("a secret record after the first");
    let before = lab.snapshot();
    let bad = lab.path("bad.p11b");

    // Every damaged file: restore into both slots refuses it the same way, verify too, nothing changes.
    let refused = |what: &str, expect: &[&str]| -> String {
        let mut messages = Vec::new();
        for token in ["prod", "far"] {
            let r = lab.p11shim(&["restore", &lab.p("bad.p11b"), "--token", token, "--logon", &carol]);
            messages.push(r.fails(expect).error());
            assert_eq!(lab.snapshot(), before, "{what}: the refused restore into {token} changed something");
        }
        let v = lab.p11shim(&["verify", &lab.p("bad.p11b"), "--token", "prod", "--logon", &carol]);
        messages.push(v.fails(expect).error());
        // The same message, but for the target's name (a wrong-MBK error names the token).
        let same = |m: &String| m.replace("token \"far\"", "token \"prod\"");
        assert!(
            messages.iter().all(|m| same(m) == same(&messages[0])),
            "{what}: restore and verify say the same: {messages:?}"
        );
        messages.swap_remove(0)
    };

    for field in RECORD_FIELDS {
        let mut l = lines.clone();
        l[k + 1] = flip_value(&l[k + 1], field, 0);
        put(&bad, &l);
        let message = refused(field, &[&format!("record {k}")]);
        assert!(message.starts_with(&format!("record {k}")), "{field}: the error starts with the record: {message}");
        // The same flip in a later record too: the first bad one is named.
        if k < 4 && ["group", "wrapped", "mac"].contains(&field) {
            l[5] = flip_value(&l[5], field, 0);
            put(&bad, &l);
            let message = refused(field, &[&format!("record {k}")]);
            assert!(!message.contains("record 4"), "{message}");
        }
    }
    // The header: each field, and the magic line.
    for (field, expect) in [
        ("format", "format"),
        ("mbk", "wrong MBK"),
        ("time", "trailer MAC"),
        ("source", "trailer MAC"),
        ("filter", "trailer MAC"),
    ] {
        let mut l = lines.clone();
        l[1] = flip_value(&l[1], field, 0);
        put(&bad, &l);
        refused(&format!("header {field}"), &[expect]);
    }
    let mut l = lines.clone();
    l[0] = "P11SHIM-BACKUP 3".into();
    put(&bad, &l);
    refused("version 3", &["written by a newer p11shim: format version 3"]);
    l[0] = "P11SHIM-BACKUQ 1".into();
    put(&bad, &l);
    refused("magic", &["not a p11shim backup"]);
    // The trailer.
    for (field, expect) in [("count", "record count"), ("mac", "trailer MAC")] {
        let mut l = lines.clone();
        l[6] = flip_value(&l[6], field, 0);
        put(&bad, &l);
        refused(&format!("trailer {field}"), &[expect]);
    }

    // Truncated anywhere.
    let bytes = std::fs::read(&good).unwrap();
    let line_start = |i: usize| lines[..i].iter().map(|l| l.len() + 1).sum::<usize>();
    for (what, cut, expect) in [
        ("in the header", line_start(1) + 20, "truncated".to_string()),
        ("after the header", line_start(2), "truncated: no trailer after record 0".to_string()),
        ("within record k", line_start(k + 1) + 100, format!("truncated: record {k} is cut short")),
        ("after record 3", line_start(5), "truncated: no trailer after record 3".to_string()),
        ("within the trailer", line_start(6) + 10, "truncated".to_string()),
        ("before the last newline", bytes.len() - 1, "truncated".to_string()),
    ] {
        std::fs::write(&bad, &bytes[..cut]).unwrap();
        refused(&format!("cut {what}"), &[&expect]);
    }
    std::fs::write(&bad, b"").unwrap();
    refused("empty", &["not a p11shim backup"]);

    // Reordered, removed, duplicated records.
    let mut l = lines.clone();
    l.swap(3, 4);
    put(&bad, &l);
    refused("records 2 and 3 swapped", &["trailer MAC"]);
    let mut l = lines.clone();
    l.remove(k + 1);
    put(&bad, &l);
    refused("a record removed", &["record count"]);
    let mut l = lines.clone();
    let dup = l[3].clone();
    l.insert(4, dup);
    put(&bad, &l);
    refused("a record duplicated", &["record count: the trailer says 4, the file holds 5"]);

    // Wrong MBK: a token with an MBK of its own, database slot or native.
    lab.db_token("other", "ProdOther");
    lab.native_token("alien", "Alien");
    lab.mbk_create("other");
    lab.mbk_create("alien");
    let before = lab.snapshot();
    for token in ["other", "alien"] {
        lab.p11shim(&["restore", &lab.p("good.p11b"), "--token", token, "--logon", &carol])
            .fails(&["wrong MBK", "nothing was modified"]);
        assert_eq!(lab.snapshot(), before, "a wrong-MBK restore into {token} changed something");
        lab.p11shim(&["verify", &lab.p("good.p11b"), "--token", token, "--logon", &carol]).fails(&["wrong MBK"]);
    }

    // And the good file still restores, every key at once.
    let r = lab.p11shim(&["restore", &lab.p("good.p11b"), "--token", "prod", "--logon", &carol, "--json"]).ok().json();
    assert_eq!(labels(&r, "added"), strings(&["aes", "ec"]), "{r}");
    let v = lab.p11shim(&["verify", &lab.p("good.p11b"), "--token", "prod", "--logon", &carol]).ok();
    assert!(v.stdout.contains("4 records") && v.stdout.contains("3 secrets unwrap"), "{}", v.stdout);
}

// ---- 4. permissions ----------------------------------------------------------------------------------------

pub fn permissions_follow_the_cryptoserver_rules(engine: Engine) {
    let lab = Lab::new(engine, "permissions");
    lab.db_token("prod", "ProdKey");
    lab.mbk_create("prod");
    lab.admin("prod");
    lab.password_user("alice", "00000002", "ExmpKey", "alice-password");
    let alice_pw = [("P11SHIM_PASSWORD_ALICE", "alice-password")];
    let bob = lab.user("bob", "00000000", "ProdKey");
    let carol = lab.user("carol", "00000002", "Prod.*");
    let dba = lab.user("dba", "02000000", ".*");
    let admin = lab.logon("admin");
    lab.tool("prod", &["--keygen", "--key-type", "AES:32", "--label", "k", "--id", "01"]).ok();
    let file = lab.p("prod.p11b");
    let last = |lab: &Lab| lab.audit().pop().expect("an audit entry");

    // The seed's example: 00000002 in ExmpKey plus 00000000 in ProdKey cannot back up ProdKey.
    lab.p11shim_env(
        &["backup", "--group", "ProdKey", "--out", &file, "--token", "prod", "--logon", "alice", "--logon", &bob],
        &alice_pw,
    )
    .denied(&["export denied"]);
    assert!(!lab.path("prod.p11b").exists(), "a refused backup writes no file");
    let e = last(&lab);
    assert_eq!((s(&e, "action"), s(&e, "who"), s(&e, "group")), ("refused: backup", "alice,bob", "ProdKey"), "{e}");
    assert!(s(&e, "result").contains("export denied"), "{e}");
    // A user with 00000002 whose regex matches can.
    lab.p11shim(&["backup", "--group", "ProdKey", "--out", &file, "--token", "prod", "--logon", &carol]).ok();
    assert!(lab.path("prod.p11b").exists());
    // Alone, bob (level 0) and alice (other group) cannot either; a backup of alice's own group is allowed.
    lab.p11shim(&["backup", "--group", "ProdKey", "--out", &lab.p("x.p11b"), "--token", "prod", "--logon", &bob])
        .denied(&["export denied"]);
    lab.p11shim_env(
        &["backup", "--group", "Prod.*", "--out", &lab.p("x.p11b"), "--token", "prod", "--logon", "alice"],
        &alice_pw,
    )
    .denied(&["export denied"]);
    assert!(!lab.path("x.p11b").exists());

    // Restore likewise.
    lab.tool("prod", &["--delete-object", "--type", "secrkey", "--id", "01"]).ok();
    let before = lab.snapshot();
    lab.p11shim_env(&["restore", &file, "--token", "prod", "--logon", "alice", "--logon", &bob], &alice_pw)
        .denied(&["import denied"]);
    assert_eq!(lab.snapshot(), before, "a refused restore changed something");
    let e = last(&lab);
    assert_eq!((s(&e, "action"), s(&e, "who")), ("refused: restore", "alice,bob"), "{e}");
    assert!(s(&e, "result").contains("import denied"), "{e}");
    lab.p11shim(&["restore", &file, "--token", "prod", "--logon", &bob]).denied(&["import denied"]);
    lab.p11shim(&["restore", &file, "--token", "prod", "--dry-run", "--logon", &bob]).denied(&["import denied"]);
    assert_eq!(lab.snapshot(), before);
    lab.p11shim(&["restore", &file, "--token", "prod", "--logon", &carol]).ok();
    assert_eq!(lab.labels_of("prod"), ["k"]);

    // The whole store needs 02000000; the users table 12000000 (10000000 + 02000000, not either alone).
    let db = |name: &str, users: bool, logons: &[&str]| {
        let out = lab.p(name);
        let mut args = vec!["db", "backup", "--out", &out, "--token", "prod"];
        if users {
            args.push("--users");
        }
        for l in logons {
            args.extend(["--logon", *l]);
        }
        lab.p11shim(&args)
    };
    db("db1.bak", false, &[&carol]).denied(&["export denied"]);
    db("db1.bak", false, &[&admin]).denied(&["export denied"]);
    assert!(!lab.path("db1.bak").exists());
    assert_eq!(s(&last(&lab), "action"), "refused: db backup");
    db("db1.bak", false, &[&dba]).ok();
    assert!(lab.path("db1.bak").exists());
    db("db2.bak", true, &[&dba]).denied(&["export denied"]);
    db("db2.bak", true, &[&admin]).denied(&["export denied"]);
    db("db2.bak", true, &[&carol, &dba]).denied(&["export denied"]);
    assert!(!lab.path("db2.bak").exists());
    db("db2.bak", true, &[&admin, &dba]).ok();
    let users = std::fs::read_to_string(lab.path("db2.bak")).unwrap().lines().filter(|l| l.starts_with("U ")).count();
    assert_eq!(users, 5, "admin, alice, bob, carol, dba");
    lab.p11shim(&["db", "restore", &lab.p("db1.bak"), "--token", "prod", "--logon", &carol]).denied(&["import denied"]);
    lab.p11shim(&["db", "restore", &lab.p("db1.bak"), "--token", "prod", "--logon", &dba]).ok();
    // Restoring the users table changes every user: it needs what backing it up needs (12000000), not only
    // 02000000, or a key store administrator could put back users (and rights) that were deleted.
    lab.p11shim(&["user", "delete", "bob", "--logon", &admin]).ok();
    let users = || lab.store().user_list().unwrap().into_iter().map(|u| u.name).collect::<Vec<_>>();
    let without_bob = users();
    let r = lab.p11shim(&["db", "restore", &lab.p("db2.bak"), "--token", "prod", "--logon", &dba]);
    assert_eq!(users(), without_bob, "db restore of a users table with 02000000 only put users back: {}", r.stdout);
    r.denied(&["import denied", "users table"]);
    assert_eq!(s(&last(&lab), "action"), "refused: db restore");
    lab.p11shim(&["db", "restore", &lab.p("db2.bak"), "--token", "prod", "--logon", &admin, "--logon", &dba]).ok();
    assert!(users().contains(&"bob".to_string()), "restored by 10000000 + 02000000");

    // Stacked logons: if one fails, nothing runs (no file), whichever position it has.
    let wrong_key = lab.dir.join("users/carol.key").display().to_string();
    for logons in [
        vec![carol.clone(), format!("bob,{wrong_key}")],
        vec![format!("bob,{wrong_key}"), carol.clone()],
        vec![carol.clone(), "nobody".to_string()],
        vec![carol.clone(), "alice".to_string()],
    ] {
        let out = lab.p("stacked.p11b");
        let mut args = vec!["backup", "--group", "ProdKey", "--out", &out, "--token", "prod"];
        for l in &logons {
            args.extend(["--logon", l.as_str()]);
        }
        let r = lab.p11shim_env(
            &args,
            &[("P11SHIM_PASSWORD_ALICE", "wrong-password"), ("P11SHIM_PASSWORD_NOBODY", "whatever-123")],
        );
        r.denied(&["logon failed for"]);
        assert!(!lab.path("stacked.p11b").exists(), "{logons:?}: a failed logon wrote the backup");
        let mut args = vec!["db", "backup", "--users", "--out", &out, "--token", "prod", "--logon", &admin, "--logon"];
        let failing = format!("dba,{wrong_key}");
        args.push(&failing);
        lab.p11shim(&args).denied(&["logon failed for dba"]);
        assert!(!lab.path("stacked.p11b").exists());
    }
    let before = lab.snapshot();
    lab.tool("prod", &["--delete-object", "--type", "secrkey", "--id", "01"]).ok();
    let gone = lab.snapshot();
    lab.p11shim(&["restore", &file, "--token", "prod", "--logon", &carol, "--logon", &format!("bob,{wrong_key}")])
        .denied(&["logon failed for bob"]);
    assert_eq!(lab.snapshot(), gone, "a restore whose second logon fails changes nothing");
    assert_ne!(gone, before);
    let refusals: Vec<String> = lab
        .audit()
        .iter()
        .filter(|e| s(e, "action").starts_with("refused: logon"))
        .map(|e| s(e, "who").to_string())
        .collect();
    assert!(refusals.len() >= 9, "every failed logon is audited: {refusals:?}");
}

// ---- 5. modes ----------------------------------------------------------------------------------------------

pub fn fips_and_cc_refuse_the_whole_store_and_cc_refuses_overwrite(engine: Engine) {
    let lab = Lab::new(engine, "modes");
    lab.db_token("prod", "ProdKey");
    lab.mbk_create("prod");
    lab.admin("prod");
    let carol = lab.user("carol", "00000002", "Prod.*");
    let dba = lab.user("dba", "02000000", ".*");
    lab.tool("prod", &["--keygen", "--key-type", "AES:32", "--label", "k", "--id", "01"]).ok();
    let (whole, group) = (lab.p("whole.bak"), lab.p("group.p11b"));
    // Standard: the whole store round-trips.
    lab.p11shim(&["db", "backup", "--out", &whole, "--token", "prod", "--logon", &dba]).ok();
    let rows = lab.rows();
    lab.tool("prod", &["--delete-object", "--type", "secrkey", "--id", "01"]).ok();
    assert!(lab.rows().is_empty());
    lab.p11shim(&["db", "restore", &whole, "--token", "prod", "--logon", &dba]).ok();
    assert_eq!(lab.rows(), rows, "db restore put the row back as it was");
    lab.p11shim(&["backup", "--group", "ProdKey", "--out", &group, "--token", "prod", "--logon", &carol]).ok();

    for mode in ["fips", "cc"] {
        lab.set_mode(mode);
        let out = lab.p(&format!("whole-{mode}.bak"));
        let r = lab.p11shim(&["db", "backup", "--out", &out, "--token", "prod", "--logon", &dba]);
        r.fails(&[&format!("{mode} mode"), "p11shim backup --group"]);
        assert!(!lab.path(&format!("whole-{mode}.bak")).exists());
        let before = lab.snapshot();
        lab.p11shim(&["db", "restore", &whole, "--token", "prod", "--logon", &dba]).fails(&[
            &format!("{mode} mode"),
            "p11shim backup --group",
            "p11shim restore",
        ]);
        assert_eq!(lab.snapshot(), before);
        let audit = lab.audit();
        let actions: Vec<&str> = audit.iter().rev().take(2).map(|e| s(e, "action")).collect();
        assert_eq!(actions, ["refused: db restore", "refused: db backup"], "{mode}");
        // The per-group path works.
        let out = lab.p(&format!("group-{mode}.p11b"));
        lab.p11shim(&["backup", "--group", "ProdKey", "--out", &out, "--token", "prod", "--logon", &carol]).ok();
        lab.p11shim(&["restore", &out, "--token", "prod", "--logon", &carol]).ok();
        let over = lab.p11shim(&["restore", &group, "--token", "prod", "--logon", &carol, "--overwrite", "--json"]);
        if mode == "cc" {
            over.fails(&["--overwrite is not allowed in CC mode"]);
            assert_eq!(lab.snapshot(), before, "a refused --overwrite changed something");
            assert_eq!(s(&lab.audit().pop().unwrap(), "action"), "refused: restore");
            lab.p11shim(&["restore", &group, "--token", "prod", "--logon", &carol, "--overwrite", "--dry-run"])
                .fails(&["CC mode"]);
        } else {
            assert_eq!(labels(&over.ok().json(), "overwritten"), ["k"]);
        }
    }
    lab.set_mode("standard");
    lab.p11shim(&["db", "backup", "--out", &lab.p("whole-again.bak"), "--token", "prod", "--logon", &dba]).ok();
}

// ---- 6. HSM keys -------------------------------------------------------------------------------------------

pub fn hsm_keys_are_wrapped_and_unwrappable_ones_listed(engine: Engine) {
    let lab = Lab::new(engine, "hsm_keys");
    lab.native_token("hsm1", "HsmKeys");
    lab.native_token("hsm2", "HsmTwo");
    lab.db_token("vault", "Vault");
    lab.mbk_create("hsm1");
    lab.clone_mbk("hsm1", "hsm2");
    lab.clone_mbk("hsm1", "vault");
    lab.admin("hsm1");
    let hugo = lab.user("hugo", "00000002", "Hsm.*");
    lab.hsm_tool("hsm1", &["--keygen", "--key-type", "AES:32", "--label", "movable", "--id", "01", "--extractable"])
        .ok();
    lab.hsm_tool("hsm1", &["--keygen", "--key-type", "AES:32", "--label", "fixed", "--id", "02"]).ok();
    std::fs::write(lab.path("block"), [0x42u8; 32]).unwrap();
    lab.hsm_tool("hsm1", &["--encrypt", "-m", "AES-ECB", "--id", "01", "-i", &lab.p("block"), "-o", &lab.p("ct")]).ok();

    let file = lab.p("hsm1.p11b");
    let r =
        lab.p11shim(&["backup", "--group", "HsmKeys", "--out", &file, "--token", "hsm1", "--logon", &hugo, "--json"]);
    let r = r.status(3);
    assert!(r.stderr.contains("1 keys could not be exported"), "{}", r.stderr);
    let report = r.json();
    assert_eq!((n(&report, "exported"), n(&report, "hsm"), n(&report, "stored")), (1, 1, 0), "{report}");
    let skipped = report["not_exported"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "only the unextractable key, not the MBK set: {report}");
    assert!(s(&skipped[0], "key").contains("\"fixed\""), "{report}");
    assert!(s(&skipped[0], "why").contains("not extractable"), "{report}");
    // The text report lists it too.
    let text = lab.p11shim(&[
        "backup",
        "--group",
        "HsmKeys",
        "--out",
        &lab.p("text.p11b"),
        "--token",
        "hsm1",
        "--logon",
        &hugo,
    ]);
    let text = text.status(3);
    assert!(text.stdout.contains("NOT EXPORTED") && text.stdout.contains("\"fixed\""), "{}", text.stdout);
    let records = std::fs::read_to_string(&file).unwrap();
    assert_eq!(records.lines().filter(|l| l.starts_with("R ")).count(), 1);
    assert!(records.contains(&hex::encode("movable")) && !records.contains(&hex::encode("fixed")));
    let v = lab.p11shim(&["verify", &file, "--token", "hsm2", "--logon", &hugo, "--json"]).ok().json();
    assert_eq!((n(&v, "records"), n(&v, "unwrapped")), (1, 1), "{v}");

    // Elsewhere: another HSM's own objects, and a database slot.
    let r = lab.p11shim(&["restore", &file, "--token", "hsm2", "--logon", &hugo, "--json"]).ok().json();
    assert_eq!(labels(&r, "added"), ["movable"], "{r}");
    lab.hsm_tool("hsm2", &["--encrypt", "-m", "AES-ECB", "--id", "01", "-i", &lab.p("block"), "-o", &lab.p("ct2")])
        .ok();
    assert_eq!(std::fs::read(lab.path("ct2")).unwrap(), std::fs::read(lab.path("ct")).unwrap(), "same key on hsm2");
    let r = lab.p11shim(&["restore", &file, "--token", "vault", "--logon", &hugo, "--json"]).ok().json();
    assert_eq!(labels(&r, "added"), ["movable"], "{r}");
    let rows = lab.rows_of("vault");
    assert_eq!((rows.len(), rows[0].group.as_str()), (1, "HsmKeys"), "the key keeps its group: {rows:?}");
    lab.tool("vault", &["--encrypt", "-m", "AES-ECB", "--id", "01", "-i", &lab.p("block"), "-o", &lab.p("ct3")]).ok();
    assert_eq!(std::fs::read(lab.path("ct3")).unwrap(), std::fs::read(lab.path("ct")).unwrap(), "same key in vault");
}

/// Keys a database slot keeps in the HSM (here an EdDSA private key, which SoftHSM2 cannot wrap) belong to the
/// token's group: a backup of that group holds the stored keys and lists the one it cannot export.
pub fn keys_kept_in_the_hsm_are_listed_by_backup(engine: Engine) {
    let lab = Lab::new(engine, "kept");
    lab.db_token("vault", "Vault");
    lab.mbk_create("vault");
    lab.admin("vault");
    let op = lab.user("op", "00000002", "Vault");
    lab.tool("vault", &["--keypairgen", "--key-type", "EC:edwards25519", "--label", "ed", "--id", "01"]).ok();
    lab.tool("vault", &["--keygen", "--key-type", "AES:32", "--label", "aes", "--id", "02", "--sensitive"]).ok();
    let mut stored = lab.labels_of("vault");
    stored.sort();
    assert_eq!(stored, ["aes", "ed"], "the AES key and the EdDSA public key are rows; the private key is not");
    let file = lab.p("vault.p11b");
    let r = lab.p11shim(&["backup", "--group", "Vault", "--out", &file, "--token", "vault", "--logon", &op, "--json"]);
    let report = r.status(3).json();
    assert_eq!((n(&report, "stored"), n(&report, "hsm")), (2, 0), "{report}");
    let skipped = report["not_exported"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{report}");
    let (key, why) = (skipped[0]["key"].as_str().unwrap(), skipped[0]["why"].as_str().unwrap());
    assert!(key.contains("\"ed\"") && key.contains("HSM key"), "{report}");
    // pkcs11-tool made it unextractable, as the HSM keeps it.
    assert!(why.contains("not extractable"), "{report}");

    // Without the user PIN, a backup takes the stored keys only, and only when asked to (--stored-only): they
    // are wrapped under the MBK already, and the token's own keys would need the user's login.
    let no_pin = [("P11SHIM_USER_PIN", "")];
    let all = ["backup", "--group", "Vault", "--out", &lab.p("nopin.p11b"), "--token", "vault", "--logon", &op];
    lab.p11shim_env(&all, &no_pin).status(2);
    let stored_only = [
        "backup",
        "--group",
        "Vault",
        "--out",
        &lab.p("stored.p11b"),
        "--token",
        "vault",
        "--logon",
        &op,
        "--stored-only",
        "--json",
    ];
    let r = lab.p11shim_env(&stored_only, &no_pin).ok().json();
    assert_eq!((n(&r, "stored"), n(&r, "hsm"), n(&r, "exported")), (2, 0, 2), "{r}");
    assert!(r["not_exported"].as_array().unwrap().is_empty(), "the token's keys are not looked at: {r}");
    // Still under the group rules, and the file is a complete backup of what it holds.
    let nobody = ["backup", "--group", "Vault", "--out", &lab.p("nobody.p11b"), "--token", "vault", "--stored-only"];
    lab.p11shim_env(&nobody, &no_pin).denied(&["export denied", "00000002"]);
    lab.p11shim(&["verify", &lab.p("stored.p11b"), "--token", "vault", "--logon", &op]).ok();
}

// ---- 7. the MBK between HSMs -----------------------------------------------------------------------------

pub fn mbk_clones_and_shares(engine: Engine) {
    let lab = Lab::new(engine, "mbk");
    for t in ["src", "dst", "dst2", "sh1", "sh2", "sh3", "other"] {
        lab.native_token(t, t);
    }
    let fp = lab.mbk_create("src");
    assert_eq!(lab.fingerprint("dst"), None);
    lab.clone_mbk("src", "dst");
    assert_eq!(lab.fingerprint("dst").as_deref(), Some(fp.as_str()));
    let accepted = lab.p11shim(&["mbk", "clone-accept", &lab.p("resp-dst.json"), "--token", "dst"]);
    accepted.fails(&["already has a master backup key"]);
    // A backup of src restores on dst.
    lab.admin("src");
    let u = lab.user("u", "00000002", "src");
    lab.hsm_tool("src", &["--keygen", "--key-type", "AES:32", "--label", "k", "--id", "01", "--extractable"]).ok();
    lab.p11shim(&["backup", "--group", "src", "--out", &lab.p("src.p11b"), "--token", "src", "--logon", &u]).ok();
    let r = lab.p11shim(&["restore", &lab.p("src.p11b"), "--token", "dst", "--logon", &u, "--json"]).ok().json();
    assert_eq!(labels(&r, "added"), ["k"]);

    // A response for another request is refused, and nothing is installed.
    let (req_a, req_b, resp_a) = (lab.p("req-a.json"), lab.p("req-b.json"), lab.p("resp-a.json"));
    lab.p11shim(&["mbk", "clone-request", "--token", "dst2", "--out", &req_a]).ok();
    lab.p11shim(&["mbk", "clone-request", "--token", "dst2", "--out", &req_b]).ok();
    lab.p11shim(&["mbk", "clone-to", &req_a, "--token", "src", "--out", &resp_a]).ok();
    lab.p11shim(&["mbk", "clone-accept", &resp_a, "--token", "dst2"]).fails(&["answers request"]);
    assert_eq!(lab.fingerprint("dst2"), None, "no MBK installed from a response to another request");
    lab.p11shim(&["mbk", "clone-accept", &lab.p("resp-dst.json"), "--token", "dst2"]).fails(&["answers request"]);
    lab.p11shim(&["mbk", "clone-accept", &resp_a, "--token", "sh3"]).fails(&["no transport key"]);
    assert_eq!(lab.fingerprint("dst2"), None);
    let resp_b = lab.p("resp-b.json");
    lab.p11shim(&["mbk", "clone-to", &req_b, "--token", "src", "--out", &resp_b]).ok();
    lab.p11shim(&["mbk", "clone-accept", &resp_b, "--token", "dst2"]).ok();
    assert_eq!(lab.fingerprint("dst2").as_deref(), Some(fp.as_str()));

    // Shares: 3 of 5 rebuild it; 2 do not; shares of different MBKs do not mix.
    let shares = lab.p("shares");
    lab.p11shim(&["mbk", "export-shares", "--token", "src", "--threshold", "3", "--shares", "5", "--out-dir", &shares])
        .ok();
    let share = |dir: &str, i: u8| lab.p(&format!("{dir}/mbk-share-{i}-of-5.txt"));
    for i in 1..=5 {
        assert!(Path::new(&share("shares", i)).exists(), "share {i}");
    }
    let (s1, s3, s5) = (share("shares", 1), share("shares", 3), share("shares", 5));
    lab.p11shim(&["mbk", "import-shares", "--token", "sh1", &s5, &s1, &s3]).ok();
    assert_eq!(lab.fingerprint("sh1").as_deref(), Some(fp.as_str()), "3 of 5 shares rebuild the MBK");
    let r = lab.p11shim(&["restore", &lab.p("src.p11b"), "--token", "sh1", "--logon", &u, "--json"]).ok().json();
    assert_eq!(labels(&r, "added"), ["k"]);
    let two = lab.p11shim(&["mbk", "import-shares", "--token", "sh2", &s1, &s3]);
    assert_eq!(two.code, Some(1), "2 of 3 shares: {}", two.stderr);
    assert!(two.stderr.contains("3 needed"), "{}", two.stderr);
    assert_eq!(lab.fingerprint("sh2"), None, "no MBK from 2 shares");
    let other_fp = lab.mbk_create("other");
    assert_ne!(other_fp, fp);
    lab.p11shim(&["restore", &lab.p("src.p11b"), "--token", "other", "--logon", &u]).fails(&["wrong MBK"]);
    let other = lab.p("other-shares");
    lab.p11shim(&[
        "mbk",
        "export-shares",
        "--token",
        "other",
        "--threshold",
        "3",
        "--shares",
        "5",
        "--out-dir",
        &other,
    ])
    .ok();
    let o2 = share("other-shares", 2);
    lab.p11shim(&["mbk", "import-shares", "--token", "sh3", &s1, &s3, &o2]).damaged(&["different MBKs"]);
    assert_eq!(lab.fingerprint("sh3"), None, "no MBK from mixed shares");
    // A share whose fingerprint line was changed to match does not help either.
    let forged = lab.p("forged-share.txt");
    std::fs::write(&forged, std::fs::read_to_string(&o2).unwrap().replace(&other_fp, &fp)).unwrap();
    let r = lab.p11shim(&["mbk", "import-shares", "--token", "sh3", &s1, &s3, &forged]);
    assert_eq!(r.code, Some(6), "a forged share is damaged input: {}", r.describe());
    assert_eq!(lab.fingerprint("sh3"), None, "no MBK from a forged share");
}

// ---- 8. crash safety ---------------------------------------------------------------------------------------

const BULK: usize = 3000;

/// kill -9 during a backup of a few thousand keys leaves no file under the target name; kill -9 during a
/// restore of it into a database slot leaves the store as it was (all or nothing).
pub fn kill_9_during_backup_or_restore_changes_nothing(engine: Engine) {
    let lab = Lab::new(engine, "kill9");
    lab.db_token("bulk", "Bulk");
    lab.mbk_create("bulk");
    lab.admin("bulk");
    let u = lab.user("u", "00000002", "Bulk");
    let made = lab.bulk_keys("bulk", "k", BULK);
    eprintln!("{engine:?}: {BULK} keys made through the shim in {made:?}");
    let file = lab.p("bulk.p11b");
    let started = Instant::now();
    let r = lab.p11shim(&["backup", "--group", "Bulk", "--out", &file, "--token", "bulk", "--logon", &u, "--json"]);
    let backup_time = started.elapsed();
    assert_eq!(n(&r.ok().json(), "exported"), BULK as u64);
    eprintln!("{engine:?}: backup of {BULK} keys in {backup_time:?}");

    // kill -9 during the backup, once it is writing records (its temporary file has grown past the header),
    // at once or a little later: nothing under the name.
    let killed = lab.p("killed.p11b");
    let mut landed = 0;
    for fraction in [0.0, 0.1, 0.25] {
        let mut child = lab
            .cmd(&["backup", "--group", "Bulk", "--out", &killed, "--token", "bulk", "--logon", &u])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let temp = lab.path(&format!(".killed.p11b.tmp-{}", child.id()));
        let deadline = Instant::now() + backup_time * 3 + Duration::from_secs(10);
        let mut writing = false;
        while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            if std::fs::metadata(&temp).is_ok_and(|m| m.len() > 4096) {
                writing = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(backup_time.mul_f64(fraction));
        let _ = child.kill();
        let status = child.wait().unwrap();
        if status.signal() == Some(9) && writing {
            landed += 1;
            assert!(!lab.path("killed.p11b").exists(), "a backup killed while writing left a file under its name");
        } else if lab.path("killed.p11b").exists() {
            std::fs::remove_file(&killed).unwrap();
        }
    }
    assert!(landed >= 2, "only {landed} of 3 kills hit a backup while it was writing");
    let leftovers: Vec<String> = std::fs::read_dir(&lab.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".killed.p11b.tmp-"))
        .collect();
    eprintln!("{engine:?}: temporary files left by killed backups: {leftovers:?}");
    assert!(
        leftovers.iter().all(|n| n[".killed.p11b.tmp-".len()..].chars().all(|c| c.is_ascii_digit())),
        "only .NAME.tmp-PID files: {leftovers:?}"
    );
    lab.p11shim(&["backup", "--group", "Bulk", "--out", &killed, "--token", "bulk", "--logon", &u]).ok();
    lab.p11shim(&["verify", &killed, "--token", "bulk", "--logon", &u]).ok();
    // The next backup to that name removed what the killed ones left (they hold wrapped keys).
    let still: Vec<String> = std::fs::read_dir(&lab.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".killed.p11b.tmp-"))
        .collect();
    assert!(still.is_empty(), "temporary files of killed backups are removed by the next backup: {still:?}");

    // kill -9 during a restore into a database slot: a fresh store with a few keys of its own.
    lab.new_store("second");
    for (label, id) in [("own-1", "f1"), ("own-2", "f2"), ("own-3", "f3")] {
        lab.tool("bulk", &["--keygen", "--key-type", "AES:32", "--label", label, "--id", id]).ok();
    }
    // The users live in the first store: a new admin here.
    lab.admin("bulk");
    let u = lab.user("u", "00000002", "Bulk");
    let before = lab.rows();
    assert_eq!(before.len(), 3);
    let started = Instant::now();
    let dry = lab.p11shim(&["restore", &file, "--token", "bulk", "--logon", &u, "--dry-run", "--json"]).ok().json();
    let dry_time = started.elapsed();
    assert_eq!(labels(&dry, "added").len(), BULK);
    eprintln!("{engine:?}: restore --dry-run of {BULK} keys in {dry_time:?}");
    // Each restore is killed once its write transaction is open (rows inserted, not committed), at once or a
    // little later.
    let mut landed = Vec::new();
    let mut completed = false;
    for fraction in [0.0, 0.1, 0.2, 0.3] {
        let mut child = lab
            .cmd(&["restore", &file, "--token", "bulk", "--logon", &u])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + dry_time * 3 + Duration::from_secs(10);
        let mut writing = false;
        while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            if lab.write_transaction_open() {
                writing = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(dry_time.mul_f64(fraction));
        let _ = child.kill();
        let status = child.wait().unwrap();
        let rows = lab.rows();
        if rows == before {
            if writing && status.signal() == Some(9) {
                landed.push(fraction);
            }
            continue;
        }
        assert_eq!(rows.len(), BULK + 3, "after a kill at {fraction}: all or nothing, not {} rows", rows.len());
        completed = true;
        break;
    }
    eprintln!("{engine:?}: restore killed with its transaction open, {landed:?} of the dry run's time later; completed: {completed}");
    assert!(landed.len() >= 2, "too few kills hit a restore with its transaction open: {landed:?}");
    if !completed {
        lab.p11shim(&["restore", &file, "--token", "bulk", "--logon", &u]).ok();
    }
    assert_eq!(lab.rows().len(), BULK + 3);
    let again = lab.p11shim(&["restore", &file, "--token", "bulk", "--logon", &u, "--json"]).ok().json();
    assert_eq!(labels(&again, "skipped").len(), BULK);
    std::fs::write(lab.path("block"), [0x42u8; 32]).unwrap();
    let last = format!("{:08x}", BULK - 1);
    lab.tool("bulk", &["--encrypt", "-m", "AES-ECB", "--id", &last, "-i", &lab.p("block"), "-o", &lab.p("x")]).ok();
}

// ---- 9. audit ----------------------------------------------------------------------------------------------

/// kill -9 during a restore into a token's own objects (a pass-through slot): the HSM keeps what the
/// killed restore made, but its journal is left behind, and the next restore into that token rolls it
/// back before anything else, so the token is as before; then a full restore makes every key once.
pub fn kill_9_during_a_native_restore_is_rolled_back_by_the_next(engine: Engine) {
    const KEYS: usize = 400;
    let lab = Lab::new(engine, "kill9native");
    lab.db_token("src", "Src");
    lab.mbk_create("src");
    lab.admin("src");
    let u = lab.user("u", "00000002", "Src");
    lab.bulk_keys("src", "k", KEYS);
    let file = lab.p("src.p11b");
    lab.p11shim(&["backup", "--group", "Src", "--out", &file, "--token", "src", "--logon", &u]).ok();
    lab.native_token("far", "Far");
    lab.clone_mbk("src", "far");
    let objects = |lab: &Lab| lab.hsm_objects("far").matches("label:").count();
    let before = lab.hsm_objects("far");
    let journal = lab.config_path().parent().unwrap().join(format!(".p11shim-restore-{}.journal", hex::encode("far")));
    let mut child = lab
        .cmd(&["restore", &file, "--token", "far", "--logon", &u])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !journal.exists() && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(2));
    }
    // Making {KEYS} token objects takes SoftHSM2 seconds: 300 ms into it, some are made.
    std::thread::sleep(Duration::from_millis(300));
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert!(
        status.signal() == Some(9) && journal.exists(),
        "the restore was to be killed while making objects: it ended with {status}"
    );
    let partial = objects(&lab);
    let base = before.matches("label:").count();
    assert!(partial > base && partial < base + KEYS, "killed mid-way: {base} objects before, {partial} now");
    // The next restore (a dry run here) rolls the killed one back first, and says so.
    let dry = lab.p11shim(&["restore", &file, "--token", "far", "--logon", &u, "--dry-run", "--json"]).ok();
    assert!(dry.stderr.contains("rolled back an interrupted restore into token \"far\""), "{}", dry.stderr);
    assert_eq!(n(&dry.json(), "added_count"), KEYS as u64);
    assert_eq!(lab.hsm_objects("far"), before, "the token is as it was before the killed restore");
    assert!(!journal.exists(), "the journal is gone once rolled back");
    let done = lab.p11shim(&["restore", &file, "--token", "far", "--logon", &u, "--json"]).ok();
    assert_eq!(n(&done.json(), "added_count"), KEYS as u64);
    assert_eq!(objects(&lab), base + KEYS, "every key made once");
    assert!(!journal.exists(), "a restore that ends removes its journal");

    // --overwrite killed once every object is made (the journal says "committed") and it is destroying the
    // ones it replaces: the next restore finishes it, so each key is there once, in its new object.
    let mut child = lab
        .cmd(&["restore", &file, "--token", "far", "--logon", &u, "--overwrite"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let committed = || std::fs::read_to_string(&journal).is_ok_and(|j| j.contains("\"committed\":true"));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !committed() && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert!(
        status.signal() == Some(9) && committed(),
        "the restore was to be killed while destroying replaced objects: it ended with {status}"
    );
    let between = objects(&lab);
    assert!(between > base + KEYS, "replaced objects were left when it was killed: {between}");
    let dry = lab.p11shim(&["restore", &file, "--token", "far", "--logon", &u, "--dry-run", "--json"]).ok();
    assert!(dry.stderr.contains("finished an interrupted restore into token \"far\""), "{}", dry.stderr);
    assert_eq!(n(&dry.json(), "skipped_count"), KEYS as u64, "every key is present");
    assert_eq!(objects(&lab), base + KEYS, "each key once: the replaced objects are gone");
    assert!(!journal.exists());
}

pub fn audit_records_everything_and_detects_an_edit(engine: Engine) {
    let lab = Lab::new(engine, "audit");
    lab.db_token("prod", "ProdKey");
    lab.mbk_create("prod");
    lab.admin("prod");
    let carol = lab.user("carol", "00000002", "Prod.*");
    let bob = lab.user("bob", "00000000", "ProdKey");
    lab.tool("prod", &["--keygen", "--key-type", "AES:32", "--label", "k", "--id", "01"]).ok();
    lab.tool("prod", &["--keygen", "--key-type", "AES:32", "--label", "l", "--id", "02"]).ok();
    let file = lab.p("prod.p11b");
    lab.p11shim(&["backup", "--group", "ProdKey", "--out", &file, "--token", "prod", "--logon", &carol]).ok();
    lab.p11shim(&["verify", &file, "--token", "prod"]).denied(&["verify denied", "00000002"]);
    lab.p11shim(&["verify", &file, "--token", "prod", "--logon", &carol]).ok();
    lab.tool("prod", &["--delete-object", "--type", "secrkey", "--id", "01"]).ok();
    lab.p11shim(&["restore", &file, "--token", "prod", "--logon", &carol]).ok();
    lab.p11shim(&["backup", "--group", "ProdKey", "--out", &lab.p("x"), "--token", "prod", "--logon", &bob]).fails(&[]);
    let (_, new_pub) = lab.key_pair("carol2");
    let admin = lab.logon("admin");
    lab.p11shim(&["user", "passwd", "carol", "--sign-key", &new_pub.display().to_string(), "--logon", &admin]).ok();
    lab.p11shim(&["user", "delete", "bob", "--logon", &admin]).ok();
    lab.p11shim(&["user", "delete", "carol", "--logon", &carol]).denied(&["logon failed for carol"]);
    let mut broken = std::fs::read_to_string(&file).unwrap();
    broken.truncate(broken.len() - 30);
    std::fs::write(lab.path("broken.p11b"), broken).unwrap();
    // carol's new key (this lab's config turns off the wait after a failed logon).
    let carol2 = format!("carol,{}", lab.dir.join("users/carol2.key").display());
    lab.p11shim(&["verify", &lab.p("broken.p11b"), "--token", "prod", "--logon", &carol2]).fails(&["truncated"]);

    let audit = lab.audit();
    let rows: Vec<(String, String, String, u64, String)> = audit
        .iter()
        .map(|e| {
            (s(e, "who").into(), s(e, "action").into(), s(e, "group").into(), n(e, "count"), s(e, "result").into())
        })
        .collect();
    let seqs: Vec<u64> = audit.iter().map(|e| n(e, "seq")).collect();
    assert_eq!(seqs, (1..=audit.len() as u64).collect::<Vec<_>>());
    let find = |who: &str, action: &str| {
        rows.iter()
            .position(|r| r.0 == who && r.1 == action)
            .unwrap_or_else(|| panic!("no audit entry {who} | {action} in {rows:#?}"))
    };
    let order = [
        find("SO of prod", "user add admin"),
        find("admin", "user add carol"),
        find("admin", "user add bob"),
        find("carol", "backup"),
        find("-", "refused: verify"),
        find("carol", "verify"),
        find("carol", "restore"),
        find("bob", "refused: backup"),
        find("admin", "user passwd carol"),
        find("admin", "user delete bob"),
        find("carol", "refused: logon (signature)"),
    ];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "in the order they happened: {order:?} in {rows:#?}");
    let backup = &rows[order[3]];
    assert_eq!((backup.2.as_str(), backup.3, backup.4.as_str()), ("ProdKey", 2, "ok"), "{backup:?}");
    assert!(rows[order[4]].4.contains("verify denied"), "{:?}", rows[order[4]]);
    let verify = &rows[order[5]];
    assert!(verify.2.ends_with("prod.p11b") && verify.3 == 2 && verify.4.starts_with("ok"), "{verify:?}");
    let restore = &rows[order[6]];
    assert_eq!((restore.3, restore.4.as_str()), (1, "ok: 1 added, 1 skipped, 0 overwritten"), "{restore:?}");
    assert!(rows[order[7]].4.contains("export denied"), "{:?}", rows[order[7]]);
    let failed_verify = rows.iter().rev().find(|r| r.1 == "verify").unwrap();
    assert!(failed_verify.4.starts_with("failed") && failed_verify.4.contains("truncated"), "{failed_verify:?}");

    let ok = lab.p11shim(&["audit", "verify"]).ok();
    assert!(ok.stdout.contains(&format!("intact: {} entries", audit.len())), "{}", ok.stdout);
    assert!(ok.stdout.contains("MAC verified in the HSM"), "{}", ok.stdout);
    // An edited entry: the backup's result.
    let seq = seqs[order[3]];
    lab.sql(&format!("UPDATE audit SET count = 0 WHERE seq = {seq}"));
    lab.p11shim(&["audit", "verify"]).fails(&[&format!("audit entry {seq}"), "edited"]);
    let shown = lab.audit();
    assert_eq!(n(&shown[order[3]], "count"), 0, "audit show shows the log as it is");
    // Put it back: intact again; then remove one.
    lab.sql(&format!("UPDATE audit SET count = 2 WHERE seq = {seq}"));
    lab.p11shim(&["audit", "verify"]).ok();
    lab.sql(&format!("DELETE FROM audit WHERE seq = {}", seq + 1));
    lab.p11shim(&["audit", "verify"]).fails(&[&format!("audit entry {}", seq + 1), "missing"]);
}

/// What an operator meets around the backups: `status`, `keys list` and `keys set-group`, the exit statuses
/// scripts rely on, a backup that matches nothing, a key row changed outside p11shim, and a [[slot]] naming a
/// token the backend does not have.
pub fn operator_commands_and_exit_statuses(engine: Engine) {
    let last = |lab: &Lab| lab.audit().pop().expect("an audit entry");
    let lab = Lab::new(engine, "operator");
    lab.db_token("prod", "ProdKey");
    let fingerprint = lab.mbk_create("prod");
    lab.admin("prod");
    let carol = lab.user("carol", "00000002", "Prod.*");
    lab.tool("prod", &["--keygen", "--key-type", "AES:32", "--label", "a1", "--id", "01"]).ok();
    lab.tool("prod", &["--keygen", "--key-type", "AES:32", "--label", "a2", "--id", "02"]).ok();

    // status: everything at a glance, exit 0 when all is well.
    let status = lab.p11shim(&["status", "--json"]).ok().json();
    let slot = &status["slots"][0];
    assert_eq!((slot["token"].as_str(), slot["storage"].as_str()), (Some("prod"), Some("database")), "{status}");
    assert_eq!(slot["mbk"].as_str(), Some(fingerprint.as_str()), "{status}");
    assert_eq!((slot["present"].as_bool(), n(slot, "stored_keys")), (Some(true), 2), "{status}");
    assert_eq!(n(&status["store"], "keys"), 2, "{status}");
    assert_eq!(n(&status["store"]["users"], "sealed"), 2, "{status}");
    assert_eq!(status["store"]["audit"]["chain"], "intact", "{status}");
    assert_eq!(status["problems"], Value::Array(vec![]), "{status}");
    let text = lab.p11shim(&["status"]).ok().stdout;
    assert!(text.contains("no problems found") && text.contains(&fingerprint), "{text}");

    // keys list: structured items.
    let list = lab.p11shim(&["keys", "list", "--json"]).ok().json();
    let keys = list["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{list}");
    assert!(keys
        .iter()
        .all(|k| k["class"] == "CKO_SECRET_KEY" && k["key_type"] == "CKK_AES" && k["group"] == "ProdKey"));
    let a1 = keys.iter().find(|k| k["label"] == "a1").unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(lab.p11shim(&["keys", "list", "--group", "Nope", "--json"]).ok().json()["keys"], Value::Array(vec![]));

    // keys set-group: 00000002 for both groups; refused and audited otherwise; an invalid name is a usage error.
    lab.p11shim(&["keys", "set-group", &a1, "ProdOther", "--logon", &carol]).ok();
    let row = |id: &str| lab.rows().into_iter().find(|r| r.id == id).unwrap();
    assert_eq!(row(&a1).group, "ProdOther");
    assert_eq!(s(&last(&lab), "action"), "key group change");
    lab.p11shim(&["keys", "set-group", &a1, "HR", "--logon", &carol]).denied(&["denied", "HR"]);
    assert_eq!(row(&a1).group, "ProdOther", "a refused move changes nothing");
    assert_eq!(s(&last(&lab), "action"), "refused: key group change");
    lab.p11shim(&["keys", "set-group", &a1, "a\nb", "--logon", &carol]).status(2);
    let missing =
        lab.p11shim(&["--json", "keys", "set-group", "00ff", "ProdKey", "--token", "prod", "--logon", &carol]);
    let missing = missing.status(4);
    assert_eq!(missing.json()["error"]["kind"], "not-found", "{}", missing.describe());
    // The module agrees: the moved key is found by its new group through pkcs11-tool.
    let objects = lab.tool("prod", &["--list-objects", "--type", "secrkey"]).ok().stdout;
    assert!(objects.contains("a1") && objects.contains("a2"), "{objects}");

    // A backup that matches nothing: exit 4, no file, the nearest groups named; an existing file stays.
    let out = lab.p("nothing.p11b");
    let r = lab.p11shim(&["backup", "--group", "Prod", "--out", &out, "--token", "prod", "--logon", &carol]);
    r.status(4);
    assert!(lab.p11shim(&["backup", "--group", "Prod", "--out", &out, "--token", "prod"]).stderr.contains("'ProdKey'"));
    assert!(!lab.path("nothing.p11b").exists());
    std::fs::write(lab.path("nothing.p11b"), b"the last good backup").unwrap();
    let args = ["backup", "--group", "Prod", "--out", &out, "--replace", "--token", "prod", "--logon", &carol];
    lab.p11shim(&args).status(4);
    assert_eq!(std::fs::read(lab.path("nothing.p11b")).unwrap(), b"the last good backup");
    // Unless the operator asks for an empty backup.
    let empty = lab.p("empty.p11b");
    let args = ["backup", "--group", "Prod", "--out", &empty, "--allow-empty", "--token", "prod", "--json"];
    assert_eq!(n(&lab.p11shim(&args).ok().json(), "exported"), 0);
    assert!(lab.path("empty.p11b").exists());
    // Denied is 5; a damaged file is 6.
    let good = lab.p("good.p11b");
    lab.p11shim(&["backup", "--group", "Prod.*", "--out", &good, "--token", "prod", "--logon", &carol]).ok();
    lab.p11shim(&["verify", &good, "--token", "prod"]).denied(&[]);
    // Restore's items are structured, for scripts.
    let dry = lab.p11shim(&["restore", &good, "--dry-run", "--token", "prod", "--logon", &carol, "--json"]).ok().json();
    let item = &dry["skipped"][0];
    assert_eq!((item["class"].as_str(), item["key_type"].as_str()), (Some("CKO_SECRET_KEY"), Some("CKK_AES")), "{dry}");
    assert!(item["id"].as_str().is_some_and(|id| id.len() == 32) && item["group"].as_str().is_some(), "{dry}");
    assert_eq!(n(&dry, "skipped_count"), 2, "{dry}");
    let mut damaged = std::fs::read_to_string(lab.path("good.p11b")).unwrap();
    damaged.truncate(damaged.len() - 20);
    std::fs::write(lab.path("damaged.p11b"), damaged).unwrap();
    lab.p11shim(&["verify", &lab.p("damaged.p11b"), "--token", "prod", "--logon", &carol]).damaged(&[]);

    // A row changed outside p11shim: named by id, left out of finds with one log line, not exported.
    let a2 = keys.iter().find(|k| k["label"] == "a2").unwrap()["id"].as_str().unwrap().to_string();
    match engine {
        Engine::Sqlite => lab.sql(&format!("UPDATE keys SET wrapped = 'not a blob' WHERE id = '{a2}'")),
        Engine::Postgres => lab.sql(&format!(
            "ALTER TABLE keys ALTER COLUMN wrapped DROP NOT NULL; UPDATE keys SET wrapped = NULL WHERE id = '{a2}'"
        )),
    }
    let listed = lab.p11shim(&["keys", "list"]).status(3);
    assert!(listed.stdout.contains(&format!("{a2}  UNREADABLE")), "{}", listed.describe());
    let objects = lab.tool("prod", &["--list-objects", "--type", "secrkey"]).ok().stdout;
    assert!(objects.contains("a1") && !objects.contains("a2"), "{objects}");
    let log = std::fs::read_to_string(lab.path("shim.log")).unwrap();
    assert!(log.contains(&format!("row {a2} cannot be read")), "{log}");
    let partial = lab.p("partial.p11b");
    let args = ["backup", "--group", "Prod.*", "--out", &partial, "--token", "prod", "--logon", &carol, "--json"];
    let r = lab.p11shim(&args).status(3);
    let report = r.json();
    assert_eq!(n(&report, "exported"), 1, "{report}");
    let why = report["not_exported"].to_string();
    assert!(why.contains(&a2) && why.contains("cannot be read"), "{report}");
    // Its group (readable) is checked like any other: without a logon for it, no file naming the row.
    let nobody = lab.p("nobody.p11b");
    lab.p11shim(&["backup", "--group", "ProdKey", "--out", &nobody, "--stored-only", "--token", "prod"]).denied(&[]);
    assert!(!lab.path("nobody.p11b").exists());

    // A [[slot]] naming a token the backend does not have: the command refuses, status shows it, the module
    // starts and logs one WARN line.
    let config = std::fs::read_to_string(lab.config_path()).unwrap();
    std::fs::write(lab.config_path(), format!("{config}[[slot]]\ntoken = \"prdo\"\nstorage = \"database\"\n")).unwrap();
    let refused = lab.p11shim(&["mbk", "show", "--token", "prod"]).status(1);
    assert!(refused.stderr.contains("\"prdo\" names no token") && refused.stderr.contains("did you mean \"prod\""));
    let status = lab.p11shim(&["status", "--json"]).status(3).json();
    assert!(status["problems"].to_string().contains("prdo"), "{status}");
    lab.tool("prod", &["--list-objects", "--type", "secrkey"]).ok();
    let log = std::fs::read_to_string(lab.path("shim.log")).unwrap();
    assert!(log.lines().any(|l| l.contains("WARN") && l.contains("\"prdo\" names no token")), "{log}");
    std::fs::write(lab.config_path(), config).unwrap();

    // The key store out of reach: status says so with exit 7.
    let unreachable = match engine {
        Engine::Sqlite => "sqlite:/nonexistent/p11shim/keys.db".to_string(),
        Engine::Postgres => "postgres://postgres@127.0.0.1:1/p11shim".to_string(),
    };
    let text = std::fs::read_to_string(lab.config_path()).unwrap().replace(&lab.url(), &unreachable);
    std::fs::write(lab.path("unreachable.toml"), text).unwrap();
    let r = lab.p11shim(&["--config", &lab.p("unreachable.toml"), "status"]).status(7);
    assert!(r.stdout.contains("UNAVAILABLE"), "{}", r.describe());
    // With --json, the status document is the only one on stdout.
    let r = lab.p11shim(&["--config", &lab.p("unreachable.toml"), "status", "--json"]).status(7);
    assert_eq!(r.json()["store"]["reachable"], false, "{}", r.describe());
}

// ---- records of any size -----------------------------------------------------------------------------------

/// The size of the big objects: 9 MiB, over half the 16 MiB a format 1 line could hold once in hex.
const BIG: usize = 9 << 20;

/// Runs `cmd` under /usr/bin/time: the result, the seconds it took and its peak RSS in KiB.
fn timed(lab: &Lab, args: &[&str]) -> (Out, f64, u64) {
    let mut c = Command::new("/usr/bin/time");
    c.args(["-f", "@@TIME %e %M", env!("CARGO_BIN_EXE_p11shim")]).args(args);
    lab.env(&mut c);
    let out = run(c, format!("p11shim {}", args.join(" ")));
    let line = out.stderr.lines().rev().find(|l| l.starts_with("@@TIME ")).expect("/usr/bin/time's line").to_string();
    let mut f = line.split_whitespace().skip(1);
    let secs = f.next().unwrap().parse().unwrap();
    let kib = f.next().unwrap().parse().unwrap();
    (out, secs, kib)
}

pub fn a_9_mb_data_object_and_a_9_mb_label_back_up_verify_and_restore_byte_exact(engine: Engine) {
    let lab = Lab::new(engine, "big");
    lab.db_token("prod", "ProdKey");
    lab.mbk_create("prod");
    lab.admin("prod");
    let carol = lab.user("carol", "00000002", "Prod.*");
    lab.big("prod", "data");
    // PostgreSQL indexes (token, label) with a btree, whose entries hold at most 8191 bytes (after
    // compression): the store refuses a longer label there when the key is made, so that engine gets the
    // longest label it takes, well below a chunk; the data object's value is 9 MiB on both.
    let label_size = match engine {
        Engine::Sqlite => BIG,
        Engine::Postgres => 2000,
    };
    lab.big("prod", &format!("label:{label_size}"));
    if engine == Engine::Postgres {
        // A longer label is refused as over the store's limits (CKR_DEVICE_MEMORY), not as an outage.
        lab.big("prod", &format!("refused-label:{BIG}"));
    }
    lab.tool("prod", &["--keygen", "--key-type", "AES:32", "--label", "small", "--id", "01"]).ok();
    let before: Vec<KeyRow> = lab.rows_of("prod");
    assert_eq!(before.len(), 3, "the data object and both keys are rows of the store");
    assert!(before.iter().any(|r| r.label == big_label(label_size)), "the long label is stored whole");
    let value = big_value(BIG);
    let data_row = before.iter().find(|r| r.label == b"bigdata").expect("the data object's row");
    assert!(data_row.attrs.len() > BIG, "the value is stored whole: {} bytes of attributes", data_row.attrs.len());

    let (b, backup_secs, backup_kib) = timed(
        &lab,
        &["backup", "--group", "ProdKey", "--out", &lab.p("big.p11b"), "--token", "prod", "--logon", &carol],
    );
    b.ok();
    let file_bytes = std::fs::metadata(lab.path("big.p11b")).unwrap().len();
    let longest = std::fs::read(lab.path("big.p11b")).unwrap().split(|&b| b == b'\n').map(<[u8]>::len).max().unwrap();
    assert!(longest < 3 << 20, "no line holds a whole object: {longest} bytes");
    let (v, verify_secs, verify_kib) =
        timed(&lab, &["verify", &lab.p("big.p11b"), "--token", "prod", "--logon", &carol, "--json"]);
    let v = v.ok().json();
    assert_eq!((n(&v, "records"), n(&v, "unwrapped")), (3, 2), "{v}");

    // Gone, and back.
    lab.tool("prod", &["--delete-object", "--type", "data", "--label", "bigdata"]).ok();
    lab.tool("prod", &["--delete-object", "--type", "secrkey", "--id", "77"]).ok();
    assert_eq!(lab.rows_of("prod").len(), 1);
    let (r, restore_secs, restore_kib) =
        timed(&lab, &["restore", &lab.p("big.p11b"), "--token", "prod", "--logon", &carol, "--json"]);
    let r = r.ok().json();
    assert_eq!(n(&r, "added_count"), 2, "{r}");
    let after = lab.rows_of("prod");
    let key = |r: &KeyRow| (r.id.clone(), r.class, r.label.clone(), r.ckid.clone(), r.attrs.clone(), r.wrapped.clone());
    let (mut b, mut a): (Vec<_>, Vec<_>) = (before.iter().map(key).collect(), after.iter().map(key).collect());
    b.sort();
    a.sort();
    assert!(a == b, "the rows are back byte for byte");
    // And the HSM path reads the same value.
    lab.big("prod", &format!("read:{}", lab.p("read.bin")));
    assert!(std::fs::read(lab.path("read.bin")).unwrap() == value, "the data object's value is byte-exact");
    std::fs::write(lab.path("block"), [0x42u8; 32]).unwrap();
    lab.tool("prod", &["--encrypt", "-m", "AES-ECB", "--id", "77", "-i", &lab.p("block"), "-o", &lab.p("enc.bin")])
        .ok();
    eprintln!(
        "@@FIGURES file {file_bytes} bytes; backup {backup_secs} s, {backup_kib} KiB peak RSS; verify {verify_secs} s, \
         {verify_kib} KiB; restore {restore_secs} s, {restore_kib} KiB"
    );
}

// ---- a backup while hosts write ------------------------------------------------------------------------------

/// A [`Sealer`] that takes every MAC as good: the test reads what a backup file holds without the HSM whose
/// key made the MACs (the restore checks them).
struct Unchecked;

impl Sealer for Unchecked {
    fn seal(&self, _: &[u8]) -> p11shim::error::Result<Vec<u8>> {
        Ok(vec![0; 32])
    }
    fn check(&self, _: &[u8], _: &[u8]) -> p11shim::error::Result<bool> {
        Ok(true)
    }
}

/// (group, label) of every record of a backup file, in file order, read with the library's reader.
fn records_of(path: &Path) -> Vec<(String, String)> {
    let mut r = BackupReader::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    while let Some((_, record)) = r.next_record(&Unchecked).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
        out.push((record.group, String::from_utf8(record.label).expect("a UTF-8 label")));
    }
    out
}

/// Writer processes of [`window_writer`], and the size of each one's window.
const WRITERS: usize = 4;
const WINDOW: usize = 6;

/// Backups of a group that 4 processes keep changing through the shim (each a sliding window of keys, see
/// [`window_writer`]) are each one snapshot: every writer's keys in a file are one run of WINDOW or
/// WINDOW+1 sequence numbers, as at every moment in the store. A read that is not one snapshot (rows of
/// different moments) sees a run with a hole, or too long or too short. Each file restores into a fresh
/// store as exactly the keys it lists.
pub fn a_backup_while_hosts_write_is_one_snapshot(engine: Engine) {
    let started = Instant::now();
    let lab = Lab::new(engine, "snapshot");
    lab.db_token("snap", "Snap");
    lab.mbk_create("snap");
    lab.admin("snap");
    let u = lab.user("u", "00000002", "Snap");
    lab.tool("snap", &["--keygen", "--key-type", "AES:16", "--label", "still", "--id", "01"]).ok();
    let flags = lab.path("writers");
    std::fs::create_dir_all(&flags).unwrap();
    let mut writers: Vec<_> = (0..WRITERS).map(|i| lab.window_writer("snap", i, WINDOW, &flags)).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (0..WRITERS).any(|i| !flags.join(format!("ready-{i}")).exists()) {
        if let Some(i) = writers.iter_mut().position(|w| w.try_wait().unwrap().is_some()) {
            let out = writers.swap_remove(i).wait_with_output().unwrap();
            panic!(
                "a writer ended before its window was full:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(Instant::now() < deadline, "the writers' windows are not full after 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let writing = Instant::now();

    let mut files = Vec::new();
    let mut took = Vec::new();
    for b in 0..3 {
        let file = lab.p(&format!("snap-{b}.p11b"));
        let t = Instant::now();
        let r = lab.p11shim(&["backup", "--group", "Snap", "--out", &file, "--token", "snap", "--logon", &u, "--json"]);
        took.push(t.elapsed());
        let r = r.ok().json();
        assert_eq!(r["not_exported"], Value::Array(vec![]), "{r}");
        files.push((file, n(&r, "exported")));
        std::thread::sleep(Duration::from_millis(150));
    }
    std::fs::write(flags.join("stop"), b"").unwrap();
    let written = writing.elapsed();
    let made: Vec<u64> = writers
        .into_iter()
        .map(|w| {
            let out = w.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "a writer failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
            let made = stdout.split("@@MADE ").nth(1).and_then(|r| r.split_whitespace().next());
            made.unwrap_or_else(|| panic!("no @@MADE: {stdout}")).parse().unwrap()
        })
        .collect();

    // Each file: one snapshot. `runs[b][i]` is writer i's run in file b.
    let mut runs = Vec::new();
    for (file, exported) in &files {
        let records = records_of(Path::new(file));
        assert_eq!(records.len() as u64, *exported, "{file}: the report's count");
        assert!(records.iter().all(|(g, _)| g == "Snap"), "{file}: {records:?}");
        assert_eq!(records.iter().filter(|(_, l)| l == "still").count(), 1, "{file}: the key nobody changes");
        let mut of_file = Vec::new();
        for i in 0..WRITERS {
            let prefix = format!("w{i}-");
            let seqs: std::collections::BTreeSet<u64> =
                records.iter().filter_map(|(_, l)| l.strip_prefix(&prefix)).map(|s| s.parse().unwrap()).collect();
            let (first, last) = (*seqs.first().expect("keys of every writer"), *seqs.last().unwrap());
            assert!(
                (seqs.len() == WINDOW || seqs.len() == WINDOW + 1) && last - first + 1 == seqs.len() as u64,
                "{file}: writer {i}'s keys are not one run of {WINDOW} or {} keys, as at any one moment: {seqs:?}",
                WINDOW + 1
            );
            of_file.push((first, last));
        }
        assert_eq!(records.len(), 1 + of_file.iter().map(|(f, l)| (l - f + 1) as usize).sum::<usize>(), "{file}");
        runs.push(of_file);
    }
    // The writers wrote while the backups ran: each file saw other windows than the one before. (Not every
    // writer moves every time: SQLite's waiting writers retry after sleeps, and one can lose to the others
    // for a second or more.)
    for b in 1..runs.len() {
        assert!(runs[b] != runs[b - 1], "no writer moved on between backups {} and {b}: {runs:?}", b - 1);
    }

    // Each file restores into a fresh store as exactly its keys.
    for (b, (file, _)) in files.iter().enumerate() {
        lab.new_store(&format!("restored-{b}"));
        lab.admin("snap");
        let u = lab.user("u", "00000002", "Snap");
        let r = lab.p11shim(&["restore", file, "--token", "snap", "--logon", &u, "--json"]).ok().json();
        let mut want: Vec<String> = records_of(Path::new(file)).into_iter().map(|(_, l)| l).collect();
        want.sort();
        assert_eq!(n(&r, "added_count"), want.len() as u64, "{r}");
        assert_eq!(lab.labels_of("snap"), want, "{file} restored into a fresh store");
    }
    eprintln!(
        "@@FIGURES {engine:?}: {WRITERS} writers made {made:?} keys in {written:?} (window {WINDOW}); backups of \
         {:?} keys took {took:?}; runs {runs:?}; the case took {:?}",
        files.iter().map(|f| f.1).collect::<Vec<_>>(),
        started.elapsed()
    );
}

/// PostgreSQL: the backup's view of `keys` (its search path puts the schema `gate` first) holds each scan of
/// the key list on its first row until the table `gate_open` has a row.
const GATE: &str = "
    CREATE TABLE public.gate_open (open boolean);
    CREATE SCHEMA gate;
    CREATE FUNCTION gate.pass() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
    BEGIN
        IF current_query() LIKE '%FROM keys ORDER BY%' THEN
            FOR i IN 1..1200 LOOP
                EXIT WHEN EXISTS (SELECT 1 FROM public.gate_open);
                PERFORM pg_sleep(0.025);
            END LOOP;
        END IF;
        RETURN true;
    END $$;
    CREATE VIEW gate.keys AS SELECT * FROM public.keys WHERE gate.pass();
";

/// PostgreSQL: a group that appears between a backup's permission check (its first scan) and the scan whose
/// rows it writes is checked too: the backup is refused as any other, and leaves no file. The test holds the
/// first scan (after its snapshot) with [`GATE`] while a key moves into a group the user may not export.
pub fn a_group_that_appears_during_a_backup_is_checked(engine: Engine) {
    assert_eq!(engine, Engine::Postgres, "the gate is a PostgreSQL view");
    let started = Instant::now();
    let lab = Lab::new(engine, "late_group");
    lab.db_token("snap", "SnapA");
    lab.mbk_create("snap");
    lab.admin("snap");
    let u = lab.user("u", "00000002", "SnapA");
    let mover = lab.user("mover", "00000002", "Snap.*");
    lab.tool("snap", &["--keygen", "--key-type", "AES:16", "--label", "a", "--id", "01"]).ok();
    lab.tool("snap", &["--keygen", "--key-type", "AES:16", "--label", "b", "--id", "02"]).ok();
    let b = lab.rows().into_iter().find(|r| r.label == b"b").expect("key b").id;
    lab.sql(GATE);
    // The backup's own config: the same store, seen through the gate.
    let url = lab.url();
    let gated_url = format!("{url}{}options=-csearch_path%3Dgate%2Cpublic", if url.contains('?') { '&' } else { '?' });
    let config = std::fs::read_to_string(lab.config_path()).unwrap();
    let gated = lab.path("gated.toml");
    std::fs::write(&gated, config.replace(&format!("url = \"{url}\""), &format!("url = \"{gated_url}\""))).unwrap();
    assert!(std::fs::read_to_string(&gated).unwrap().contains(&gated_url));

    let mut db = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    // Starts a backup through the gate and returns once its first scan is held there.
    let held = |db: &mut postgres::Client, name: &str| {
        let mut child = lab
            .cmd(&["backup", "--group", "Snap.*", "--out", &lab.p(name), "--token", "snap", "--logon", &u, "--json"])
            .env("P11SHIM_CONFIG", &gated)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let waiting: i64 = db
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND wait_event = 'PgSleep' AND query LIKE '%FROM keys ORDER BY%'",
                    &[],
                )
                .unwrap()
                .get(0);
            if waiting == 1 {
                return child;
            }
            assert!(child.try_wait().unwrap().is_none(), "the backup ended before its scan reached the gate");
            assert!(Instant::now() < deadline, "the backup's scan is not held at the gate after 20 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let finish = |child: std::process::Child, what: &str| {
        let out = child.wait_with_output().unwrap();
        Out {
            what: what.into(),
            code: out.status.code(),
            signal: out.status.signal(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };

    // Held, then let go with nothing changed: the gate itself changes nothing.
    let child = held(&mut db, "first.p11b");
    db.batch_execute("INSERT INTO gate_open VALUES (true)").unwrap();
    let r = finish(child, "backup through the gate").ok().json();
    assert_eq!((n(&r, "exported"), &r["groups"]["SnapA"]), (2, &Value::from(2)), "{r}");

    // Held after the permission check's snapshot, while b moves to SnapB: the writing scan meets SnapB.
    db.batch_execute("DELETE FROM gate_open").unwrap();
    let child = held(&mut db, "late.p11b");
    lab.p11shim(&["keys", "set-group", &b, "SnapB", "--token", "snap", "--logon", &mover]).ok();
    db.batch_execute("INSERT INTO gate_open VALUES (true)").unwrap();
    finish(child, "backup through the gate, a key moved meanwhile").denied(&["export denied", "SnapB"]);
    let left: Vec<String> = std::fs::read_dir(&lab.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("late.p11b"))
        .collect();
    assert!(left.is_empty(), "a refused backup leaves no file, nor its temporary file: {left:?}");
    let e = lab.audit().pop().expect("an audit entry");
    assert_eq!((s(&e, "action"), s(&e, "group")), ("refused: backup", "Snap.*"), "{e}");
    assert!(s(&e, "result").contains("export denied"), "{e}");
    // Without the gate the same backup is refused at its permission check, as before.
    lab.p11shim(&["backup", "--group", "Snap.*", "--out", &lab.p("late.p11b"), "--token", "snap", "--logon", &u])
        .denied(&["export denied", "SnapB"]);
    eprintln!("@@FIGURES the case took {:?}", started.elapsed());
}
