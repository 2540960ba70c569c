//! Real servers whose private keys live in a database slot, through the shim, over SoftHSM2 (tests/servers.rs):
//! nginx serving TLS with an EC key it reaches through the OpenSSL pkcs11 engine ([`nginx`]), and OpenSSH
//! logging in with a user key through `ssh -I` and through ssh-agent, and proving its host key through the
//! agent ([`openssh`]).
//!
//! Every test has its own directory under `common::test_dir()`: a SoftHSM2 token directory with one token,
//! initialized with SoftHSM2 directly (as an HSM vendor's tool would), its own p11shim.toml (that token is a
//! database slot; the shim logs at debug level to `shim.log` beside it) and its own key store (an SQLite file
//! there, or a database of its own on the PostgreSQL server of tests/common/pg.rs). `p11shim mbk create`
//! makes the token's MBK; everything after that runs through the shim in child processes. This process loads
//! no PKCS#11 module, so it may open the key store itself to check what was stored.
//!
//! Servers run in process groups of their own ([`Server`]): dropping the guard (a failed assertion included)
//! kills the whole group, and a watchdog kills it if this process dies without unwinding. No server outlives
//! its test.
#![allow(dead_code)] // each test uses its own part of the helpers

pub mod nginx;
pub mod openssh;

use crate::common;
use crate::common::pg::TestDb;
use p11shim::store::{self, KeyQuery, KeyRow};

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const SO_PIN: &str = "so-pin-1234";
pub const USER_PIN: &str = "user-pin-1234";

pub const CKO_PUBLIC_KEY: u64 = 2;
pub const CKO_PRIVATE_KEY: u64 = 3;

/// How long a tool that should answer at once (pkcs11-tool, openssl, ssh-keygen, curl, ssh) may take before
/// it is killed and reported as hung.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// `name` on PATH or in the sbin directories (not on every user's PATH), or a failure that names the package.
pub fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed (apt-get install {package}, or bash scripts/install-deps.sh); this test \
                 needs it"
            )
        })
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Where a test keeps its key store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// `keys.db` in the test directory.
    Sqlite,
    /// A database of its own on the PostgreSQL server the test binary shares (tests/common/pg.rs).
    Postgres,
}

/// The output of one command, with the command line for messages.
#[derive(Debug)]
pub struct Out {
    pub what: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Killed after the timeout.
    pub timed_out: bool,
}

impl Out {
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }

    #[track_caller]
    pub fn ok(self) -> Out {
        assert!(self.success(), "{}", self.failure());
        self
    }

    /// The command, its exit status and its output, for a failure message.
    pub fn failure(&self) -> String {
        let status = if self.timed_out {
            "was killed after its timeout (hung?)".to_string()
        } else {
            format!("exited with {:?}", self.code)
        };
        format!("`{}` {status}\n--- stdout\n{}--- stderr\n{}", self.what, self.stdout, self.stderr)
    }
}

/// `cmd` as one line, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` in a process group of its own with stdin from /dev/null and its output in files of `dir`,
/// killing the group after `timeout`.
pub fn run_in(dir: &Path, mut cmd: Command, timeout: Duration) -> Out {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, Ordering::SeqCst);
    let what = describe(&cmd);
    let (out_path, err_path) = (dir.join(format!(".out-{n}")), dir.join(format!(".err-{n}")));
    let out_file = std::fs::File::create(&out_path).expect("create a stdout file");
    let err_file = std::fs::File::create(&err_path).expect("create a stderr file");
    cmd.stdin(Stdio::null()).stdout(out_file).stderr(err_file).process_group(0);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("running {what}: {e}"));
    let deadline = Instant::now() + timeout;
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            break (Some(status), false);
        }
        if Instant::now() >= deadline {
            kill_group(child.id());
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let read = |p: &Path| {
        let text = String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
        let _ = std::fs::remove_file(p);
        text
    };
    Out { what, code: status.and_then(|s| s.code()), stdout: read(&out_path), stderr: read(&err_path), timed_out }
}

/// SIGKILL to every process of the group `pgid`.
pub fn kill_group(pgid: u32) {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
    unsafe { libc::kill(-(pgid as libc::pid_t), libc::SIGKILL) };
}

/// One process of /proc: its pid, parent, process group and command line.
#[derive(Clone, Debug)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub pgrp: u32,
    pub cmdline: String,
}

/// Every process /proc shows (those that vanish while it is read are left out).
pub fn processes() -> Vec<Proc> {
    let mut all = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return all };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid pgrp …": comm may hold spaces and parentheses, so split after the last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(ppid), Some(pgrp)) =
            (fields.get(1).and_then(|f| f.parse().ok()), fields.get(2).and_then(|f| f.parse().ok()))
        else {
            continue;
        };
        // A zombie has no command line: it is gone as far as these tests care.
        if fields.first() == Some(&"Z") {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim().to_string())
            .unwrap_or_default();
        all.push(Proc { pid, ppid, pgrp, cmdline });
    }
    all
}

/// A server started by a test, in a process group of its own (the group's id is the server's pid). Dropping
/// it kills the whole group; a watchdog shell kills the group if this process dies without dropping it.
pub struct Server {
    pub name: String,
    child: Child,
    watchdog: Option<Child>,
    /// The file its stdout and stderr go to.
    pub output: PathBuf,
}

impl Server {
    pub fn start(name: &str, mut cmd: Command, output: &Path) -> Server {
        let what = describe(&cmd);
        let file = std::fs::File::create(output).expect("create the server's output file");
        cmd.stdin(Stdio::null()).stdout(file.try_clone().expect("clone the output file")).stderr(file).process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {name} ({what}): {e}"));
        // Its own process group and stdio: Ctrl-C on the test run must not kill the watchdog before the
        // server, and it must not hold cargo's pipes.
        let watch = format!(
            "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -KILL -{pgid} 2>/dev/null",
            me = std::process::id(),
            pgid = child.id()
        );
        let watchdog = Command::new("sh")
            .args(["-c", &watch])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .ok();
        Server { name: name.to_string(), child, watchdog, output: output.to_path_buf() }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the server has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the server to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The processes still in the server's group (the server's own children included).
    pub fn group(&self) -> Vec<Proc> {
        let pgid = self.pid();
        processes().into_iter().filter(|p| p.pgrp == pgid).collect()
    }

    /// The server's live children.
    pub fn children(&self) -> Vec<Proc> {
        let pid = self.pid();
        processes().into_iter().filter(|p| p.ppid == pid).collect()
    }

    /// What the server wrote to its stdout and stderr.
    pub fn output_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.output).unwrap_or_default()).into_owned()
    }

    /// Waits until something accepts connections on 127.0.0.1:`port`; an error if the server exits first
    /// or nothing listens within `timeout`.
    pub fn wait_for_port(&mut self, port: u16, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            if let Some(status) = self.exited() {
                return Err(format!("{} exited ({status}) before listening on port {port}", self.name));
            }
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("{} does not listen on port {port} after {timeout:?}", self.name));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the unix socket `path` exists; an error if the server exits first or after `timeout`.
    pub fn wait_for_socket(&mut self, path: &Path, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Err(format!("{} exited ({status}) before making {}", self.name, path.display()));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("{} made no socket {} after {timeout:?}", self.name, path.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the whole group at once and reaps the server.
    pub fn kill(&mut self) {
        kill_group(self.pid());
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exited().is_none() || !self.group().is_empty() {
            self.kill();
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// One test's SoftHSM2 token (a database slot), p11shim.toml and key store, the token initialized with
/// SoftHSM2 directly and its MBK made by `p11shim mbk create`.
pub struct Fixture {
    pub dir: PathBuf,
    pub softhsm_conf: PathBuf,
    /// p11shim.toml.
    pub config: PathBuf,
    /// The shim's log (debug level), shared by every process of the test that loads the shim.
    pub log: PathBuf,
    /// The token's label.
    pub token: String,
    pub store_url: String,
    /// Dropped with the fixture: the PostgreSQL database of the test.
    _db: Option<TestDb>,
}

impl Fixture {
    pub fn new(test: &str, token: &str, store: Store) -> Fixture {
        let dir = common::test_dir().join(test);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).expect("wipe the test directory");
        }
        std::fs::create_dir_all(&dir).expect("create the test directory");
        let softhsm_conf = common::fresh_softhsm_dir(&dir);
        let (store_url, db) = match store {
            Store::Sqlite => (format!("sqlite:{}", dir.join("keys.db").display()), None),
            Store::Postgres => {
                let db = TestDb::fresh();
                (db.url().to_string(), Some(db))
            }
        };
        let config = dir.join("p11shim.toml");
        let log = dir.join("shim.log");
        std::fs::write(
            &config,
            format!(
                "module = \"{}\"\nlog_file = \"{}\"\nlog_level = \"debug\"\n\n[store]\nurl = \"{store_url}\"\n\n\
                 [[slot]]\ntoken = \"{token}\"\nstorage = \"database\"\n",
                common::softhsm_path().display(),
                log.display()
            ),
        )
        .expect("write p11shim.toml");
        let fx = Fixture { dir, softhsm_conf, config, log, token: token.to_string(), store_url, _db: db };
        let softhsm = common::softhsm_path();
        fx.p11(&softhsm, &["--init-token", "--slot-index", "0", "--label", token, "--so-pin", SO_PIN]).ok();
        fx.p11(
            &softhsm,
            &[
                "--token-label",
                token,
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
        let mut mbk = fx.command(Path::new(env!("CARGO_BIN_EXE_p11shim")));
        mbk.args(["mbk", "create", "--token", token]).env("P11SHIM_SO_PIN", SO_PIN).env("P11SHIM_USER_PIN", USER_PIN);
        fx.run(mbk).ok();
        fx
    }

    /// `program` in the test directory with none of the variables that point a process at the shim, the
    /// backend, an OpenSSL engine, an SSH agent or a proxy: what a process that needs none of them gets.
    pub fn bare_command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.dir);
        for var in [
            "P11SHIM_CONFIG",
            "P11SHIM_MODULE",
            "SOFTHSM2_CONF",
            "CSSIM_CONFIG",
            "CSSIM_FAULTS",
            "OPENSSL_CONF",
            "PKCS11_MODULE_PATH",
            "SSH_AUTH_SOCK",
            "SSH_AGENT_PID",
            "SSH_ASKPASS",
            "SSH_ASKPASS_REQUIRE",
            "DISPLAY",
            "http_proxy",
            "https_proxy",
            "HTTPS_PROXY",
            "all_proxy",
            "ALL_PROXY",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    /// [`Fixture::bare_command`] with the environment a process that loads the shim needs:
    /// `P11SHIM_CONFIG` (this test's p11shim.toml) and `SOFTHSM2_CONF` (the backend's own configuration).
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = self.bare_command(program);
        cmd.env("P11SHIM_CONFIG", &self.config).env("SOFTHSM2_CONF", &self.softhsm_conf);
        cmd
    }

    pub fn run(&self, cmd: Command) -> Out {
        run_in(&self.dir, cmd, TOOL_TIMEOUT)
    }

    /// `pkcs11-tool --module <module> <args>` with the shim's environment.
    pub fn p11(&self, module: &Path, args: &[&str]) -> Out {
        let mut cmd = self.command(&tool("pkcs11-tool", "opensc"));
        cmd.arg("--module").arg(module).args(args);
        self.run(cmd)
    }

    /// `pkcs11-tool` logged in as the user on the token, through `module`.
    pub fn p11_user(&self, module: &Path, args: &[&str]) -> Out {
        let mut all = vec!["--token-label", self.token.as_str(), "--login", "--pin", USER_PIN];
        all.extend(args);
        self.p11(module, &all)
    }

    /// Generates a key pair through the shim with pkcs11-tool (`key_type` as pkcs11-tool names it).
    pub fn keypair(&self, key_type: &str, id: &str, label: &str) {
        self.p11_user(&common::shim_path(), &["--keypairgen", "--key-type", key_type, "--id", id, "--label", label])
            .ok();
    }

    /// The key store's rows for the token. This process loads no PKCS#11 module, so opening the store here
    /// cannot disturb a shim's SQLite locks.
    pub fn rows(&self) -> Vec<KeyRow> {
        let store = store::open(&self.store_url).expect("open the key store");
        store.find(&KeyQuery { token: self.token.clone(), ..Default::default() }).expect("read the key store")
    }

    /// The key pair labelled `label` is stored: its private and public keys are rows of the key store, the
    /// shim shows the private key, and SoftHSM2's own token holds no object with that label.
    #[track_caller]
    pub fn assert_stored(&self, label: &str) {
        let rows = self.rows();
        for (class, what) in [(CKO_PRIVATE_KEY, "private"), (CKO_PUBLIC_KEY, "public")] {
            let n = rows.iter().filter(|r| r.class == class && r.label == label.as_bytes()).count();
            assert_eq!(n, 1, "the key store holds {n} {what} key rows labelled {label:?} (want 1): {rows:#?}");
        }
        let private = rows.iter().find(|r| r.class == CKO_PRIVATE_KEY && r.label == label.as_bytes()).unwrap();
        assert!(!private.wrapped.is_empty(), "the private key's row holds no wrapped secret: {private:#?}");
        let has_label =
            |text: &str| text.lines().any(|l| l.trim_start().strip_prefix("label:").map(str::trim) == Some(label));
        let shim = self.p11_user(&common::shim_path(), &["--list-objects", "--type", "privkey"]).ok();
        assert!(has_label(&shim.stdout), "the shim shows no private key labelled {label:?}:\n{}", shim.stdout);
        let direct = self.p11_user(&common::softhsm_path(), &["--list-objects"]).ok();
        assert!(
            !has_label(&direct.stdout),
            "SoftHSM2's own token holds an object labelled {label:?}: the key is not (only) a stored key:\n{}",
            direct.stdout
        );
    }

    /// The shim's log.
    pub fn shim_log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// The shim's log lines at ERROR or WARN.
    pub fn shim_log_problems(&self) -> Vec<String> {
        self.shim_log().lines().filter(|l| l.contains(" ERROR: ") || l.contains(" WARN: ")).map(String::from).collect()
    }

    /// What the shim logged for each of the processes `pids`: each distinct message once, with its count.
    pub fn shim_log_of(&self, pids: &[u32]) -> String {
        let log = self.shim_log();
        let mut out = String::new();
        for pid in pids {
            let tag = format!(" p11shim[{pid}] ");
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(&tag)).collect();
            let _ = writeln!(out, "pid {pid}: {} line(s)", lines.len());
            for line in tally(lines.iter().map(|l| log_message(l))).lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        out
    }

    /// The shim's log holds none of the PINs.
    pub fn pins_in_log(&self) -> bool {
        let log = self.shim_log();
        log.contains(USER_PIN) || log.contains(SO_PIN)
    }

    /// An OpenSSL configuration that loads the pkcs11 engine (libp11) with the shim as its module, and
    /// `init = 1`: OpenSSL initializes the engine when it reads the file (in a server, at start-up, in the
    /// process that will fork), so that `ENGINE_load_private_key` may use it.
    pub fn openssl_cnf(&self, name: &str, init: bool) -> PathBuf {
        let engine = engines_dir().join("pkcs11.so");
        assert!(
            engine.exists(),
            "{} is missing (apt-get install libengine-pkcs11-openssl); this test needs it",
            engine.display()
        );
        let path = self.dir.join(name);
        std::fs::write(
            &path,
            format!(
                "openssl_conf = openssl_init\n\n[openssl_init]\nengines = engine_section\n\n[engine_section]\n\
                 pkcs11 = pkcs11_section\n\n[pkcs11_section]\nengine_id = pkcs11\ndynamic_path = {}\nMODULE_PATH = {}\n\
                 init = {}\n\n[req]\ndistinguished_name = req_dn\n\n[req_dn]\n",
                engine.display(),
                common::shim_path().display(),
                u8::from(init)
            ),
        )
        .expect("write openssl.cnf");
        path
    }

    /// The public key labelled `label` as PEM, read through the shim (pkcs11-tool, then plain OpenSSL).
    ///
    /// An EC P-256 key is taken from `pkcs11-tool --list-objects` (its CKA_EC_POINT and CKA_EC_PARAMS), not
    /// with `--read-object`: OpenSC 0.23.0's `--read-object` of an EC public key reads memory it has freed
    /// (valgrind shows it with SoftHSM2 directly as well) and fails now and then with "cannot create
    /// EVP_PKEY", depending on the process's heap.
    pub fn public_key_pem(&self, label: &str) -> String {
        let der = self.dir.join(format!("{label}.pub.der"));
        let listing =
            self.p11(&common::shim_path(), &["--token-label", &self.token, "--list-objects", "--type", "pubkey"]).ok();
        // `--label` does not filter `--list-objects`: find the object's block.
        let mut blocks: Vec<Vec<&str>> = Vec::new();
        for line in listing.stdout.lines() {
            if line.starts_with(|c: char| !c.is_whitespace()) {
                blocks.push(vec![line]);
            } else if let Some(block) = blocks.last_mut() {
                block.push(line);
            }
        }
        let field = |block: &[&str], name: &str| {
            block.iter().find_map(|l| l.trim_start().strip_prefix(name)).map(|v| v.trim().to_string())
        };
        let block = blocks
            .iter()
            .find(|b| field(b, "label:").as_deref() == Some(label))
            .unwrap_or_else(|| panic!("the shim lists no public key labelled {label:?}:\n{}", listing.stdout));
        if block[0].starts_with("Public Key Object; EC ") {
            const P256_OID: &str = "06082a8648ce3d030107";
            const P256_SPKI_PREFIX: &str = "3059301306072a8648ce3d020106082a8648ce3d030107034200";
            assert_eq!(field(block, "EC_PARAMS:").as_deref(), Some(P256_OID), "{label}: not a P-256 key: {block:?}");
            let point = field(block, "EC_POINT:").unwrap_or_default();
            // CKA_EC_POINT is the DER OCTET STRING (04 41) of the uncompressed point (04 X Y).
            let raw = point.strip_prefix("0441").filter(|p| p.len() == 130 && p.starts_with("04"));
            let raw = raw.unwrap_or_else(|| panic!("{label}: unexpected CKA_EC_POINT {point}"));
            std::fs::write(&der, hex::decode(format!("{P256_SPKI_PREFIX}{raw}")).expect("hex")).unwrap();
        } else {
            self.p11(
                &common::shim_path(),
                &[
                    "--token-label",
                    &self.token,
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
        }
        let mut cmd = self.bare_command(&tool("openssl", "openssl"));
        cmd.args(["pkey", "-pubin", "-inform", "DER", "-in"]).arg(&der);
        self.run(cmd).ok().stdout
    }
}

/// The OpenSSL engines directory (`openssl version -e`).
pub fn engines_dir() -> PathBuf {
    let out = Command::new(tool("openssl", "openssl")).args(["version", "-e"]).output().expect("openssl version -e");
    let text = String::from_utf8_lossy(&out.stdout);
    let dir =
        text.split('"').nth(1).unwrap_or_else(|| panic!("cannot read ENGINESDIR from `openssl version -e`: {text}"));
    PathBuf::from(dir)
}

/// Failures collected along a test and reported together at its end, with context (logs) for the report.
#[derive(Default)]
pub struct Findings {
    pub failures: Vec<String>,
    /// What the test saw on the way (phases, timings), printed with the failures or, with `--nocapture`, on
    /// success.
    pub notes: Vec<String>,
}

impl Findings {
    pub fn fail(&mut self, what: impl Into<String>) {
        self.failures.push(what.into());
    }

    pub fn note(&mut self, what: impl Into<String>) {
        let what = what.into();
        eprintln!("{what}");
        self.notes.push(what);
    }

    /// Records `what` unless `ok`; returns `ok`.
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) -> bool {
        if !ok {
            self.fail(what());
        }
        ok
    }

    /// Panics with every failure, the notes and `context` (log excerpts) if anything failed.
    #[track_caller]
    pub fn assert_none(&self, test: &str, context: impl FnOnce() -> String) {
        if self.failures.is_empty() {
            return;
        }
        let mut text = format!("{test}: {} finding(s):\n\n", self.failures.len());
        for (i, f) in self.failures.iter().enumerate() {
            let _ = writeln!(text, "[{}] {f}\n", i + 1);
        }
        let _ = writeln!(text, "--- what the test saw\n{}\n", self.notes.join("\n"));
        text += &context();
        panic!("{text}");
    }
}

/// How many distinct items [`tally`] shows.
const TALLY_MAX: usize = 12;

/// Counts of equal items, most frequent first (at most [`TALLY_MAX`] of them), for messages
/// ("200x curl exit 35: …").
pub fn tally<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for item in items {
        *counts.entry(item.as_ref().to_string()).or_default() += 1;
    }
    let mut sorted: Vec<(String, usize)> = counts.into_iter().collect();
    sorted.sort_by_key(|item| std::cmp::Reverse(item.1));
    let mut lines: Vec<String> = sorted.iter().take(TALLY_MAX).map(|(item, n)| format!("{n}x {item}")).collect();
    if sorted.len() > TALLY_MAX {
        lines.push(format!("… and {} other distinct line(s)", sorted.len() - TALLY_MAX));
    }
    lines.join("\n")
}

/// A log line without what differs between repeats of one message: the shim's time and pid
/// (`<time> p11shim[<pid>] `), or nginx's time, pid#tid and connection number (`<date> <time> [crit] 12#12: *3 `).
pub fn log_message(line: &str) -> String {
    if let Some(i) = line.find(" p11shim[") {
        if let Some(j) = line[i..].find("] ") {
            return line[i + j + 2..].to_string();
        }
    }
    let Some(open) = line.find(" [") else { return line.to_string() };
    let Some(close) = line[open..].find("] ").map(|j| open + j + 2) else { return line.to_string() };
    let level = &line[open + 1..close];
    let mut rest = &line[close..];
    if let Some((ids, after)) = rest.split_once(": ") {
        if ids.chars().all(|c| c.is_ascii_digit() || c == '#') {
            rest = after;
        }
    }
    if let Some(after) = rest.strip_prefix('*') {
        if let Some((n, after)) = after.split_once(' ') {
            if n.chars().all(|c| c.is_ascii_digit()) {
                rest = after;
            }
        }
    }
    format!("{level}{rest}")
}
