//! Database slots in real processes: what a server does with a PKCS#11 module, done to the shim by a C
//! application (tests/process_cases/harness.c, built here with `cc`) that loads it with dlopen, forks
//! workers, unloads and reloads it, and sits idle. tests/process.rs runs these cases over SoftHSM2 and
//! tests/process_cssim.rs over the CryptoServer simulator, each on SQLite and on PostgreSQL.
//!
//! What they hold the shim to (README, "What the shim guarantees"; ARCHITECTURE.md, "Guest in another
//! process"):
//! - a forked child that calls C_Initialize works with its parent's configuration, while the parent's store
//!   threads run and another process writes to the store; children that never call C_Initialize exit cleanly;
//!   the store stays intact;
//! - no way of unloading the module crashes the application, under load;
//! - no thread of the shim is alive once C_Finalize has returned;
//! - an idle process costs no CPU, and still sees another process's change at its next use.
//!
//! Every process runs under a deadline and in a process group of its own: a hang is killed and reported as
//! a failure that says where it hung, never a stuck test run. Each test has its own directory, backend
//! token, p11shim.toml and key store, so tests never see each other's changes. This binary never loads the
//! shim itself, so it may open a SQLite store directly (a second copy of SQLite in a process that has the
//! shim's open would break SQLite's locks).
#![allow(dead_code)]

use crate::common::{self, pg::TestDb, Backend, SO_PIN, USER_PIN};
use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The database slot's token label.
pub const TOKEN: &str = "proc";
/// Stored EC P-256 key pairs made for every test: key0, key1, …
const KEYS: usize = 4;
/// Forked workers in the storm (each C_Initialize … C_Finalize), how many run at once, and how long one may
/// take before it counts as hung (a worker normally takes well under a second).
const STORM_WORKERS: usize = 512;
const STORM_BATCH: usize = 8;
const STORM_DEADLINE: Duration = Duration::from_secs(20);
/// How long the storm may go on before it stops by itself (it normally takes well under a minute).
const STORM_BUDGET: Duration = Duration::from_secs(120);
/// Runs of each way of unloading; all but the first quarter of them with both cores kept busy.
const UNLOAD_RUNS: usize = 40;
/// How long one unload run may take (it normally takes well under a second, a few with the cores busy).
const UNLOAD_DEADLINE: Duration = Duration::from_secs(20);
/// How long the idle process does nothing, and the CPU it may use meanwhile: 0.1 % of a core.
const IDLE_WINDOW: Duration = Duration::from_secs(60);
const IDLE_CPU_SHARE: f64 = 0.001;

/// The key store of a test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgres",
        })
    }
}

/// The C harness, built once per test binary.
fn harness() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/process_cases/harness.c");
        let dir = common::test_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("harness");
        let cc = Command::new("cc")
            .args(["-Wall", "-Wextra", "-Werror", "-std=c11", "-O1", "-pthread", "-I", "/usr/include/p11-kit-1", "-o"])
            .arg(&exe)
            .arg(&source)
            .arg("-ldl")
            .output()
            .expect("cc (build-essential)");
        assert!(
            cc.status.success(),
            "cc {}: {} (needs libp11-kit-dev for pkcs11.h: scripts/install-deps.sh)",
            source.display(),
            String::from_utf8_lossy(&cc.stderr)
        );
        exe
    })
}

/// The shim under test, checked once per test binary to be built from the current sources: every process of
/// a test run uses that build, even if the sources change meanwhile.
fn shim() -> &'static Path {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(common::shim_path)
}

/// A process of the harness (or anything else) in a process group of its own, its output in files. Dropping
/// it kills the whole group (the process and any child it forked), so that a failing test leaves nothing
/// behind.
pub struct Running {
    child: Child,
    what: String,
    stdout: PathBuf,
    stderr: PathBuf,
    stdin: Option<ChildStdin>,
    reaped: bool,
}

/// How a process ended.
pub struct Finished {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// Processes of its group still there after it exited (killed then).
    pub left_behind: bool,
    /// It did not exit in time and was killed (how long it was given); `stacks` then has its threads' stacks
    /// if gdb is there.
    pub hung: Option<String>,
    pub stacks: String,
}

impl Finished {
    pub fn ok(&self) -> bool {
        self.hung.is_none() && self.status.success()
    }

    /// "exit status 3", "killed by SIGSEGV" or "hung (…)".
    pub fn how(&self) -> String {
        match &self.hung {
            Some(waited) => format!("hung: {waited}, killed"),
            None => describe_status(self.status),
        }
    }

    /// The first line of stdout that starts with `prefix`.
    pub fn line(&self, prefix: &str) -> Option<&str> {
        self.stdout.lines().find(|l| l.starts_with(prefix))
    }

    /// Everything a failure message needs: how it ended and what it printed (stderr's end only).
    pub fn report(&self) -> String {
        format!(
            "{} ended with {}\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.how(),
            self.stdout,
            tail(&self.stderr, 60)
        )
    }
}

/// The stacks of every thread of process `pid` (gdb, when installed; it is not needed otherwise), the frames
/// only, at most 40 per thread.
fn gdb_stacks(pid: u32) -> String {
    if !Path::new("/usr/bin/gdb").exists() {
        return String::new();
    }
    let out = Command::new("timeout")
        .args(["60", "/usr/bin/gdb", "-p", &pid.to_string(), "-batch", "-nx", "-ex", "thread apply all bt 40"])
        .stdin(Stdio::null())
        .output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let frames: Vec<&str> = text.lines().filter(|l| l.starts_with('#') || l.starts_with("Thread ")).collect();
    format!("its threads (gdb):\n{}", frames.join("\n"))
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => {
            format!("killed by {}{}", signal_name(sig), if status.core_dumped() { " (core)" } else { "" })
        }
        _ => format!("{status}"),
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGILL => "SIGILL".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGFPE => "SIGFPE".into(),
        other => format!("signal {other}"),
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let skip = all.len().saturating_sub(lines);
    let mut out = if skip > 0 { format!("[… {skip} lines]\n") } else { String::new() };
    out += &all[skip..].join("\n");
    out
}

impl Running {
    fn spawn(mut cmd: Command, what: &str, dir: &Path, stdin: bool) -> Running {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let base = dir.join(format!("{}-{n}", what.replace([' ', '/'], "_")));
        let (stdout, stderr) = (base.with_extension("out"), base.with_extension("err"));
        // SAFETY: prctl(2) is async-signal-safe. Should the test binary die (killed by a CI timeout), its
        // processes die with it instead of running on in their own process groups.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        };
        cmd.process_group(0)
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdin = child.stdin.take();
        Running { child, what: what.to_string(), stdout, stderr, stdin, reaped: false }
    }

    fn stdout_now(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr_now(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Kills the process group; true if any process of it was still there.
    fn kill_group(&mut self) -> bool {
        let group = self.child.id() as i32;
        // SAFETY: plain kill(2) of the process group this test started (the group's id is its leader's pid,
        // which stays reserved while any member lives).
        let any = unsafe { libc::kill(-group, 0) } == 0;
        // SAFETY: as above.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        any
    }

    /// Waits until the process exits, at most `timeout`; then kills it and its group and fails the test with
    /// what it printed.
    pub fn finish(self, timeout: Duration) -> Finished {
        let done = self.finish_within(timeout);
        assert!(done.hung.is_none(), "{}\n{}", done.report(), done.stacks);
        done
    }

    /// Waits until the process exits, at most `timeout`; then takes its threads' stacks (when gdb is there)
    /// and kills it and its group: the result says it hung.
    pub fn finish_within(self, timeout: Duration) -> Finished {
        self.finish_when(timeout, None)
    }

    /// As [`Running::finish_within`], and once the process has printed its `last` line it must exit within
    /// `grace`, however long `timeout` is.
    pub fn finish_when(mut self, timeout: Duration, last: Option<(&str, Duration)>) -> Finished {
        drop(self.stdin.take());
        let mut deadline = Instant::now() + timeout;
        let mut waiting = format!("no exit within {timeout:?}");
        let mut last = last;
        let mut hung = None;
        let mut stacks = String::new();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waitpid") {
                break status;
            }
            if let Some((line, grace)) = last {
                if self.stdout_now().lines().any(|l| l.starts_with(line)) {
                    deadline = deadline.min(Instant::now() + grace);
                    waiting = format!("no exit within {grace:?} of printing {line}");
                    last = None;
                }
            }
            if Instant::now() >= deadline {
                hung = Some(waiting);
                stacks = gdb_stacks(self.child.id());
                self.kill_group();
                break self.child.wait().expect("waitpid");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.reaped = true;
        // Its forked children, should any have outlived it, go with it.
        let left_behind = self.kill_group();
        Finished {
            what: self.what.clone(),
            status,
            stdout: self.stdout_now(),
            stderr: self.stderr_now(),
            left_behind,
            hung,
            stacks,
        }
    }

    /// Waits for a line of stdout that starts with `prefix`, at most `timeout`; fails the test (killing the
    /// process) if the process exits or the time runs out first.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.stdout_now().lines().find(|l| l.starts_with(prefix)) {
                return line.to_string();
            }
            let exited = self.child.try_wait().expect("waitpid");
            if exited.is_some() || Instant::now() >= deadline {
                let (how, stacks) = match exited {
                    Some(status) => (format!("ended with {}", describe_status(status)), String::new()),
                    None => (
                        format!("printed no {prefix} line within {timeout:?} (hung; killed)"),
                        gdb_stacks(self.child.id()),
                    ),
                };
                self.kill_group();
                panic!(
                    "{} {how}\nstdout:\n{}\nstderr:\n{}\n{stacks}",
                    self.what,
                    self.stdout_now(),
                    tail(&self.stderr_now(), 60)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes a line to the process's stdin.
    pub fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("started with stdin");
        stdin.write_all(format!("{line}\n").as_bytes()).and_then(|_| stdin.flush()).expect("write to stdin");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill_group();
            let _ = self.child.wait();
        }
    }
}

/// `2 × harness spin`: both cores busy while it lives (the spinners end by themselves after `limit`).
struct Load(Vec<Running>);

impl Load {
    fn start(dir: &Path, limit: Duration) -> Load {
        Load(
            (0..2)
                .map(|_| {
                    let mut cmd = Command::new(harness());
                    cmd.args(["spin", &limit.as_secs().to_string()]);
                    Running::spawn(cmd, "spin", dir, false)
                })
                .collect(),
        )
    }
}

/// A test's own world: a directory, a fresh backend with the database token `proc` (its MBK made by
/// C_InitToken through the shim, [`KEYS`] stored EC key pairs), a p11shim.toml and a key store.
pub struct Fixture {
    pub engine: Engine,
    pub dir: PathBuf,
    config: PathBuf,
    backend_env: Vec<(&'static str, OsString)>,
    store_url: String,
    _db: Option<TestDb>,
}

impl Fixture {
    pub fn new(test: &str, engine: Engine) -> Fixture {
        let dir = common::test_dir().join(format!("{test}-{engine}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // The module is named by p11shim.toml only: a forked child must get everything from its parent.
        let backend_env: Vec<(&'static str, OsString)> = common::fresh_backend_env(&dir.join("hsm"), 2)
            .into_iter()
            .filter(|(k, _)| *k != "P11SHIM_MODULE")
            .collect();
        let (store_url, db) = match engine {
            Engine::Sqlite => (format!("sqlite:{}", dir.join("keys.db").display()), None),
            Engine::Postgres => {
                let db = TestDb::fresh();
                (db.url().to_string(), Some(db))
            }
        };
        let config = dir.join("p11shim.toml");
        std::fs::write(
            &config,
            format!(
                "module = \"{}\"\nlog_file = \"shim.log\"\nlog_level = \"info\"\n[store]\nurl = \"{store_url}\"\n\
                 [[slot]]\ntoken = \"{TOKEN}\"\nstorage = \"database\"\ndefault_group = \"Proc\"\n",
                common::backend_path().display()
            ),
        )
        .unwrap();
        let fixture = Fixture { engine, dir, config, backend_env, store_url, _db: db };
        let init = fixture.run("init", &["init", SO_PIN, USER_PIN, &KEYS.to_string()], Duration::from_secs(120));
        assert!(init.ok() && init.line("INIT").is_some(), "setting up the token: {}", init.report());
        fixture
    }

    /// The harness in `mode`, with this test's configuration and backend, and only them: no P11SHIM_MODULE,
    /// no CSSIM_FAULTS from the test's own environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(harness());
        cmd.arg(args[0]).arg(shim()).arg(TOKEN);
        if args[0] != "init" {
            // `init` takes the SO PIN and the user PIN, every other mode the user PIN.
            cmd.arg(USER_PIN);
        }
        cmd.args(&args[1..]);
        for key in ["P11SHIM_CONFIG", "P11SHIM_MODULE", "SOFTHSM2_CONF", "CSSIM_CONFIG", "CSSIM_FAULTS"] {
            cmd.env_remove(key);
        }
        cmd.envs(self.backend_env.iter().map(|(k, v)| (*k, v))).env("P11SHIM_CONFIG", &self.config);
        cmd
    }

    pub fn start(&self, what: &str, args: &[&str]) -> Running {
        Running::spawn(self.command(args), what, &self.dir, false)
    }

    pub fn start_with_stdin(&self, what: &str, args: &[&str]) -> Running {
        Running::spawn(self.command(args), what, &self.dir, true)
    }

    pub fn run(&self, what: &str, args: &[&str], timeout: Duration) -> Finished {
        self.start(what, args).finish(timeout)
    }

    /// A process that creates, uses and destroys stored keys in a loop until `stop` exists. Over SoftHSM2 it
    /// works on a copy of the token directory (same token, same MBK set; SoftHSM2 is not safe for several
    /// processes writing one token directory, and what is shared here is the key store); the simulator's
    /// device is shared by processes, as a network HSM is.
    pub fn start_writer(&self, stop: &Path) -> Running {
        let mut cmd = self.command(&["writer", &stop.to_string_lossy(), "400"]);
        if common::backend() == Backend::SoftHsm2 {
            cmd.env("SOFTHSM2_CONF", common::softhsm_copy(&self.dir.join("hsm"), &self.dir.join("writer-hsm")));
        }
        Running::spawn(cmd, "writer", &self.dir, false)
    }

    /// The shim's log lines above INFO (every process of the test writes to it), each kind once.
    fn log_problems(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("shim.log")).unwrap_or_default();
        let lines: Vec<&str> =
            log.lines().filter(|l| !l.trim().is_empty() && !l.contains(" INFO: ") && !l.contains(" DEBUG: ")).collect();
        if lines.is_empty() {
            "  (none)".into()
        } else {
            distinct(&lines.join("\n"), 10)
        }
    }

    /// Stops a writer started by [`Fixture::start_writer`]; a problem if it failed or made nothing.
    fn stop_writer(&self, writer: Running, stop: &Path, problems: &mut Vec<String>) -> String {
        std::fs::write(stop, b"stop").unwrap();
        let done = writer.finish(Duration::from_secs(60));
        match done.line("WRITER") {
            Some(line) if done.ok() && !line.contains("made_and_destroyed=0 ") => line.to_string(),
            _ => {
                problems.push(format!("the process writing to the store failed meanwhile: {}", done.report()));
                String::new()
            }
        }
    }

    /// The labels of the stored rows of [`TOKEN`], sorted, read without the shim.
    fn stored_labels(&self) -> Result<Vec<String>, String> {
        let mut labels: Vec<String> = match self.engine {
            Engine::Sqlite => {
                let conn = rusqlite::Connection::open(self.dir.join("keys.db")).map_err(|e| e.to_string())?;
                let mut stmt = conn.prepare("SELECT label FROM keys WHERE token = ?1").map_err(|e| e.to_string())?;
                let rows = stmt.query_map([TOKEN], |r| r.get::<_, Vec<u8>>(0)).map_err(|e| e.to_string())?;
                rows.map(|r| r.map(|l| String::from_utf8_lossy(&l).into_owned()).map_err(|e| e.to_string()))
                    .collect::<Result<_, _>>()?
            }
            Engine::Postgres => {
                let mut client =
                    postgres::Client::connect(&self.store_url, postgres::NoTls).map_err(|e| e.to_string())?;
                let rows =
                    client.query("SELECT label FROM keys WHERE token = $1", &[&TOKEN]).map_err(|e| e.to_string())?;
                rows.iter().map(|r| String::from_utf8_lossy(r.get::<_, &[u8]>(0)).into_owned()).collect()
            }
        };
        labels.sort();
        Ok(labels)
    }

    /// The store after the processes are gone: SQLite's own check passes, exactly the test's key pairs are
    /// there (the writer's keys are all destroyed again), and every key still signs through the shim.
    fn check_store(&self, problems: &mut Vec<String>) -> String {
        let mut report = String::new();
        if self.engine == Engine::Sqlite {
            let check = rusqlite::Connection::open(self.dir.join("keys.db")).and_then(|c| {
                let mut stmt = c.prepare("PRAGMA integrity_check")?;
                let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
                rows.collect::<rusqlite::Result<Vec<String>>>()
            });
            match check {
                Ok(rows) if rows == ["ok"] => report += "integrity_check ok; ",
                Ok(rows) => problems.push(format!("PRAGMA integrity_check: {rows:?}")),
                Err(e) => problems.push(format!("PRAGMA integrity_check could not run: {e}")),
            }
        }
        let want: Vec<String> = (0..KEYS).flat_map(|i| [format!("key{i}"), format!("key{i}")]).collect();
        match self.stored_labels() {
            Ok(labels) if labels == want => report += &format!("{} rows as made; ", labels.len()),
            Ok(labels) => problems.push(format!("the store's rows are {labels:?}, expected {want:?}")),
            Err(e) => problems.push(format!("cannot read the store: {e}")),
        }
        let verify = self.run("verify", &["verify", &KEYS.to_string()], Duration::from_secs(60));
        if verify.ok() && verify.line("VERIFY").is_some() {
            report += "every key signs and verifies";
        } else {
            problems.push(format!("the stored keys no longer all sign: {}", verify.report()));
        }
        report
    }
}

/// `key=value` from a line of the harness.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
}

fn number(line: &str, key: &str) -> i64 {
    field(line, key).and_then(|v| v.parse().ok()).unwrap_or(-1)
}

fn fail_with(what: &str, problems: &[String]) {
    assert!(problems.is_empty(), "{what}:\n- {}", problems.join("\n- "));
}

/// The fork storm: a parent that uses a stored key forks [`STORM_WORKERS`] workers, [`STORM_BATCH`] at a
/// time, each of which initializes the module (without P11SHIM_CONFIG: it must use its parent's
/// configuration), logs in, finds a stored key by label, signs and finalizes; with every batch two children
/// that never call C_Initialize end with exit(0) and _exit(0). Meanwhile another process creates and
/// destroys stored keys. No child may hang, crash or fail; the parent keeps working; the store is intact.
pub fn fork_storm(engine: Engine) {
    let fx = Fixture::new("storm", engine);
    let stop = fx.dir.join("writer.stop");
    let writer = fx.start_writer(&stop);
    let started = Instant::now();
    let storm = fx
        .start(
            "storm",
            &[
                "storm",
                &KEYS.to_string(),
                &STORM_WORKERS.to_string(),
                &STORM_BATCH.to_string(),
                &STORM_DEADLINE.as_secs().to_string(),
                &STORM_BUDGET.as_secs().to_string(),
            ],
        )
        // The storm stops by itself within its budget plus one deadline per hung batch and a backtrace; once
        // it has finalized (DONE) the parent must exit at once.
        .finish_when(
            STORM_BUDGET + STORM_DEADLINE * 3 + Duration::from_secs(120),
            Some(("DONE", Duration::from_secs(20))),
        );
    let mut problems = Vec::new();
    let wrote = fx.stop_writer(writer, &stop, &mut problems);
    let counts = storm.line("STORM").unwrap_or("").to_string();
    println!("{engine}: {counts}\n{engine}: {}\n{engine}: {wrote}", storm.line("STEPS").unwrap_or(""));
    println!("{engine}: storm took {:.1} s", started.elapsed().as_secs_f64());
    if !storm.ok() || storm.line("DONE").is_none() {
        problems.push(format!("the parent did not finish its storm: {}\n{}", storm.report(), storm.stacks));
    }
    if storm.left_behind {
        problems.push("forked children outlived the parent (killed)".into());
    }
    if !counts.is_empty() {
        let forks = number(&counts, "forks");
        for (key, what) in [
            ("hung", "children hung (killed after the deadline)"),
            ("crashed", "children were killed by a signal"),
            ("failed", "children failed a step"),
            ("parent_failed", "times the parent could no longer sign between batches"),
        ] {
            let n = number(&counts, key);
            if n != 0 {
                problems.push(format!("{n} {what}"));
            }
        }
        if number(&counts, "stopped_early") != 0 {
            problems.push(format!(
                "the storm stopped early: only {} workers of {STORM_WORKERS}",
                number(&counts, "workers")
            ));
        }
        if number(&counts, "ok") != forks || forks < STORM_WORKERS as i64 {
            problems.push(format!("{} of {forks} children exited 0", number(&counts, "ok")));
        }
        if let Some(steps) = storm.line("STEPS").filter(|s| *s != "STEPS none") {
            problems.push(format!("where: {steps}"));
        }
        if problems.iter().any(|p| p.contains("children")) {
            // gdb's backtrace of the first hung child, as it is; every other line once per kind.
            let (stacks, lines): (Vec<&str>, Vec<&str>) =
                storm.stderr.lines().partition(|l| l.starts_with('#') || l.starts_with("Thread "));
            problems.push(format!(
                "what the processes wrote on stderr, each kind of line once:\n{}",
                distinct(&lines.join("\n"), 20)
            ));
            if !stacks.is_empty() {
                problems.push(format!(
                    "the first hung child's threads (gdb):\n{}",
                    stacks.iter().take(60).copied().collect::<Vec<_>>().join("\n")
                ));
            }
            problems.push(format!("the shim's log, warnings and errors:\n{}", fx.log_problems()));
        }
    } else if storm.ok() {
        problems.push(format!("no STORM line: {}", storm.report()));
    }
    let store = fx.check_store(&mut problems);
    println!("{engine}: store after the storm: {store}");
    fail_with(&format!("fork storm on {engine} over {:?}", common::backend()), &problems);
}

/// The kinds of line in `text` (numbers other than hexadecimal ones made `N`, so that lines differing only in
/// a pid or a time are one kind), each with its count, the most frequent first, at most `kinds` of them.
fn distinct(text: &str, kinds: usize) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for line in text.lines() {
        let kind: String = line
            .split(' ')
            .map(|word| {
                if word.starts_with("0x") {
                    return word.to_string();
                }
                let mut out = String::new();
                for c in word.chars() {
                    if !c.is_ascii_digit() {
                        out.push(c);
                    } else if !out.ends_with('N') {
                        out.push('N');
                    }
                }
                out
            })
            .collect::<Vec<_>>()
            .join(" ");
        match counts.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => counts.push((kind, 1)),
        }
    }
    counts.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let more = counts.len().saturating_sub(kinds);
    let mut lines: Vec<String> = counts.into_iter().take(kinds).map(|(k, n)| format!("  {n} x {k}")).collect();
    if more > 0 {
        lines.push(format!("  … and {more} other kinds of line"));
    }
    lines.join("\n")
}

/// Unloading, as applications do it, [`UNLOAD_RUNS`] times each way, while another process writes to the
/// store (its changes wake any thread of the module that waits for changes), all but the first quarter of the
/// runs with both cores busy (a thread of the module left running is then scheduled late, after the module
/// is gone):
/// a. C_Finalize, dlclose, exit; b. dlclose without C_Finalize, exit; c. exit without either (atexit handlers
/// and static destructors run while the module is initialized); d. C_Finalize, dlclose, dlopen again,
/// C_Initialize, sign, C_Finalize, dlclose, exit. Three runs in four make their PKCS#11 calls on a worker
/// thread that ends before the main thread unloads, as a server's thread pool does: then no thread-local
/// destructor of the application's threads keeps the module mapped, and dlclose really unmaps it unless the
/// module itself prevents that. Every run must exit 0.
pub fn unload(engine: Engine) {
    let fx = Fixture::new("unload", engine);
    let stop = fx.dir.join("writer.stop");
    let writer = fx.start_writer(&stop);
    let started = Instant::now();
    let mut failures: Vec<String> = Vec::new();
    let mut counts = [[0usize; 2]; 4]; // [mode][failed, ran]
    let (mut lingering, mut unmapped, mut hangs, mut stacks_shown) = (0, 0, 0, false);
    let mut load = None;
    'runs: for run in 0..UNLOAD_RUNS {
        if run == UNLOAD_RUNS / 4 {
            load = Some(Load::start(&fx.dir, Duration::from_secs(120)));
        }
        let (on, on_what) = if run % 4 == 0 { ("main", "the main thread") } else { ("thread", "a worker thread") };
        for (m, mode) in ["a", "b", "c", "d"].into_iter().enumerate() {
            if hangs >= 3 {
                break 'runs;
            }
            let done = fx.start(&format!("unload-{mode}-{on}"), &["unload", mode, on]).finish_within(UNLOAD_DEADLINE);
            counts[m][1] += 1;
            hangs += usize::from(done.hung.is_some());
            lingering += usize::from(done.line("THREADS-AFTER-FINALIZE").is_some());
            unmapped += usize::from(done.line("MAPPED-AFTER-DLCLOSE no").is_some());
            if !done.ok() || done.line("DONE").is_none() {
                counts[m][0] += 1;
                if failures.len() < 8 {
                    let loaded = if load.is_some() { ", cores busy" } else { "" };
                    failures.push(format!(
                        "mode {mode} run {run} (calls on {on_what}{loaded}): {}; stdout: {}; stderr: {}",
                        done.how(),
                        done.stdout.trim().replace('\n', " | "),
                        tail(&done.stderr, 5).replace('\n', " | ")
                    ));
                    if done.hung.is_some() && !stacks_shown {
                        stacks_shown = true;
                        failures.push(done.stacks.clone());
                    }
                }
            }
        }
    }
    drop(load);
    let mut problems = Vec::new();
    let wrote = fx.stop_writer(writer, &stop, &mut problems);
    let summary: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .zip(counts)
        .map(|(mode, [failed, ran])| format!("{mode}: {failed} of {ran} failed"))
        .collect();
    println!(
        "{engine}: unload runs in {:.1} s: {}\n{engine}: {lingering} runs saw a p11shim thread after C_Finalize; \
         {unmapped} dlclose calls unmapped the module\n{engine}: {wrote}",
        started.elapsed().as_secs_f64(),
        summary.join(", ")
    );
    if hangs >= 3 {
        problems.push(format!("stopped after {hangs} hung runs"));
    }
    if counts.iter().any(|[failed, _]| *failed > 0) {
        problems.push(format!("runs that did not exit 0: {}", summary.join(", ")));
        problems.extend(failures);
    }
    fail_with(&format!("unloading on {engine} over {:?}", common::backend()), &problems);
}

/// After C_Finalize returns, no thread of the shim is alive (the shim names its threads "p11shim-…"), five
/// times over in one process.
pub fn threads_end_with_finalize(engine: Engine) {
    let fx = Fixture::new("threads", engine);
    let done = fx.run("threads", &["threads", "5"], Duration::from_secs(60));
    println!("{engine}: {}", done.stdout.trim());
    let alive = done.line("ALIVE-AFTER-FINALIZE").map(str::to_string);
    assert!(
        done.ok() && alive.is_none() && done.line("DONE").is_some(),
        "on {engine} over {:?}, a thread of the shim outlives C_Finalize: {}",
        common::backend(),
        alive.unwrap_or_else(|| done.report())
    );
}

/// An idle process with a database slot: it signs once with key0 and key1, then does nothing for
/// [`IDLE_WINDOW`]; its CPU time (utime + stime of /proc/self/stat, every thread) over that window must stay
/// within [`IDLE_CPU_SHARE`] of a core. Then another process destroys key0, and the idle process's very next
/// use of key0 must fail with CKR_KEY_HANDLE_INVALID or CKR_OBJECT_HANDLE_INVALID, while key1 still signs.
///
/// Both engines are measured at once, each in its own process with its own store: the window dominates the
/// time of this test binary, and a process's CPU time is its own whatever else runs. For the same reason the
/// test is not serial with the others (it shares no store with them).
pub fn idle_costs_nothing_and_sees_changes(engines: &[Engine]) {
    let fixtures: Vec<Fixture> = engines.iter().map(|&e| Fixture::new("idle", e)).collect();
    let window = IDLE_WINDOW.as_secs().to_string();
    let mut idle: Vec<Running> =
        fixtures.iter().map(|fx| fx.start_with_stdin(&format!("idle-{}", fx.engine), &["idle", &window])).collect();
    for p in &mut idle {
        p.wait_line("READY", Duration::from_secs(60));
    }
    let measured: Vec<String> =
        idle.iter_mut().map(|p| p.wait_line("IDLE", IDLE_WINDOW + Duration::from_secs(60))).collect();
    let mut problems = Vec::new();
    let limit_ms = IDLE_WINDOW.as_secs_f64() * 1000.0 * IDLE_CPU_SHARE;
    for (fx, line) in fixtures.iter().zip(&measured) {
        println!("{}: {line}", fx.engine);
        let stat_ms: f64 = field(line, "stat_ms").and_then(|v| v.parse().ok()).unwrap_or(f64::MAX);
        if stat_ms > limit_ms {
            problems.push(format!(
                "{}: the idle process used {stat_ms} ms of CPU in {window} s (limit {limit_ms} ms, {} % of a core): {line}",
                fx.engine,
                IDLE_CPU_SHARE * 100.0
            ));
        }
    }
    for (fx, p) in fixtures.iter().zip(&mut idle) {
        let destroyed = fx.run("destroy", &["destroy", "key0"], Duration::from_secs(60));
        if !destroyed.ok() {
            problems.push(format!("{}: destroying key0 in another process failed: {}", fx.engine, destroyed.report()));
            continue;
        }
        // The other process has committed and exited: the very next use here must know.
        p.say("use");
        let used = p.wait_line("USE", Duration::from_secs(30));
        println!("{}: after another process destroyed key0: {used}", fx.engine);
        let rv = |key: &str| field(&used, key).and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok());
        let (key0, key1) = (rv("key0"), rv("key1"));
        if !matches!(key0, Some(cryptoki_sys::CKR_KEY_HANDLE_INVALID | cryptoki_sys::CKR_OBJECT_HANDLE_INVALID)) {
            problems.push(format!(
                "{}: the first use of key0 after another process destroyed it returned {}, not CKR_KEY_HANDLE_INVALID",
                fx.engine,
                key0.map(common::rv_name).unwrap_or_else(|| used.clone())
            ));
        }
        if key1 != Some(cryptoki_sys::CKR_OK) {
            problems.push(format!(
                "{}: key1, untouched, no longer signs: {}",
                fx.engine,
                key1.map(common::rv_name).unwrap_or_else(|| used.clone())
            ));
        }
    }
    for p in idle {
        let done = p.finish_within(Duration::from_secs(30));
        if !done.ok() || done.line("DONE").is_none() {
            problems.push(format!("the idle process did not finish cleanly: {}\n{}", done.report(), done.stacks));
        }
    }
    fail_with(&format!("idle database slots over {:?}", common::backend()), &problems);
}

/// One #[test] per case: `serial` ones take turns (they load the machine: forks, busy cores), `beside` ones
/// run alongside them.
#[macro_export]
macro_rules! process_cases {
    (serial: [$($name:ident => $body:expr),* $(,)?], beside: [$($free:ident => $free_body:expr),* $(,)?] $(,)?) => {
        $(
            #[test]
            #[serial_test::serial]
            fn $name() {
                $body;
            }
        )*
        $(
            #[test]
            fn $free() {
                $free_body;
            }
        )*
    };
}
