//! A throwaway PostgreSQL server for the tests, made by scripts/pg-cluster.sh (Debian's postgresql package).
//!
//! [`pg_url`] is the server every test of a binary shares: `P11SHIM_TEST_PG_URL` when set (CI starts one
//! cluster for all binaries), else one cluster per test binary, started at first use and removed when the
//! binary exits. Tests that stop the server start their own [`PgCluster`], so that the shared one never goes
//! away under a test running in parallel. [`TestDb`] gives a test a database of its own on either.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once, OnceLock};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg-cluster.sh")
}

/// Runs `pg-cluster.sh CMD DIR`; its stdout, or a panic carrying its stderr (which names the package to
/// install when the server binaries are missing).
fn cluster(cmd: &str, dir: &Path) -> String {
    cluster_args(cmd, &[dir])
}

/// Runs `pg-cluster.sh CMD DIRS…`, as [`cluster`].
fn cluster_args(cmd: &str, dirs: &[&Path]) -> String {
    let dir = dirs.last().expect("a directory");
    let out = Command::new("bash")
        .arg(script())
        .arg(cmd)
        .args(dirs)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script().display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pg-cluster.sh {cmd} {} failed ({}):\n{stderr}\nThe PostgreSQL tests need the Debian package postgresql \
         (bash scripts/install-deps.sh) or P11SHIM_TEST_PG_URL naming a server where they may create databases.",
        dir.display(),
        out.status
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A PostgreSQL cluster in a temporary directory, stopped and removed on drop or, when kept in a static, when
/// the test binary exits (or, if it is killed, by a watchdog within a second or two).
pub struct PgCluster {
    dir: PathBuf,
    url: String,
}

impl PgCluster {
    pub fn start() -> PgCluster {
        let dir = new_dir();
        // Before the start: a test binary killed while the cluster starts must not leave it running.
        watchdog(&dir);
        let url = cluster("start", &dir);
        remove_at_exit(&dir);
        PgCluster { dir, url }
    }

    /// A streaming standby of the running `primary`, on a port of its own, which the primary replicates to
    /// synchronously from now on: a commit on the primary returns once the standby has its WAL, so every
    /// commit a client saw succeed survives [`PgCluster::promote`] after the primary is lost. Removed as
    /// [`PgCluster::start`]'s clusters are. Stopping the standby while the primary runs makes the primary's
    /// commits wait for it.
    pub fn standby(primary: &PgCluster) -> PgCluster {
        let dir = new_dir();
        watchdog(&dir);
        let url = cluster_args("start-standby", &[&primary.dir, &dir]);
        remove_at_exit(&dir);
        PgCluster { dir, url }
    }

    /// Makes this standby a primary; returns once it accepts writes.
    pub fn promote(&self) {
        cluster("promote", &self.dir);
    }

    /// Stops the server at once, as a crash would (no checkpoint, connections cut); the data and the port
    /// stay.
    pub fn kill(&self) {
        cluster("kill", &self.dir);
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        let text = std::fs::read_to_string(self.dir.join("port")).expect("the cluster's port file");
        text.trim().parse().expect("a port number")
    }

    /// `postgres://postgres@127.0.0.1:PORT/p11shim`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The cluster's directory (the server's data is in `data/`, owned by the postgres user when run as root).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the server; the data and the port stay for [`PgCluster::resume`].
    pub fn pause(&self) {
        cluster("pause", &self.dir);
    }

    /// Starts the server again on the same port with the same data.
    pub fn resume(&self) {
        cluster("start", &self.dir);
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        live().retain(|dir| dir != &self.dir);
        remove(&self.dir);
    }
}

/// A new directory name for a cluster of this process, nothing there yet.
fn new_dir() -> PathBuf {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, Ordering::SeqCst);
    // Short: the server's unix socket lives in this directory and socket paths are limited to ~107 bytes.
    let dir = std::env::temp_dir().join(format!("p11shim-pg-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Stops the cluster in `dir` and removes it. Never panics: it runs in Drop and in an exit handler.
fn remove(dir: &Path) {
    let _ = Command::new("bash").arg(script()).arg("stop").arg(dir).stdin(Stdio::null()).stdout(Stdio::null()).status();
}

/// Clusters not yet dropped: those in statics (never dropped) are removed when the test binary exits.
fn live() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

fn remove_at_exit(dir: &Path) {
    static REGISTER: Once = Once::new();
    live().push(dir.to_path_buf());
    REGISTER.call_once(|| {
        // SAFETY: registers a plain `extern "C" fn()` that does not unwind.
        unsafe { libc::atexit(remove_live) };
    });
}

extern "C" fn remove_live() {
    let dirs = std::mem::take(&mut *live());
    for dir in dirs {
        remove(&dir);
    }
}

/// Removes the cluster if this process dies without running its exit handlers (Ctrl-C, kill, abort): a
/// detached shell that waits for our pid to go away. Its stdio is null so that it never holds cargo's pipes.
fn watchdog(dir: &Path) {
    let watch = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; exec bash '{script}' stop '{dir}'",
        pid = std::process::id(),
        script = script().display(),
        dir = dir.display()
    );
    let _ = Command::new("sh")
        .args(["-c", &watch])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// The URL of the server this test binary's PostgreSQL tests share (see the module comment).
pub fn pg_url() -> String {
    if let Ok(url) = std::env::var("P11SHIM_TEST_PG_URL") {
        return url;
    }
    static SHARED: OnceLock<PgCluster> = OnceLock::new();
    SHARED.get_or_init(PgCluster::start).url().to_string()
}

/// `url` with its database name replaced by `db` (any `?parameters` kept).
fn with_database(url: &str, db: &str) -> String {
    let (head, params) = match url.split_once('?') {
        Some((head, params)) => (head, format!("?{params}")),
        None => (url, String::new()),
    };
    let after_scheme = head.find("://").map_or(0, |i| i + 3);
    let host_end = head[after_scheme..].find('/').map_or(head.len(), |i| after_scheme + i);
    format!("{}/{db}{params}", &head[..host_end])
}

/// A database of its own for one test on the server at `server_url`, dropped (with any connections still
/// open to it) when this value is.
pub struct TestDb {
    server_url: String,
    name: String,
    url: String,
}

impl TestDb {
    pub fn create(server_url: &str) -> TestDb {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let name = format!("p11shim_test_{}_{}_{nanos}", std::process::id(), COUNT.fetch_add(1, Ordering::SeqCst));
        let mut admin = postgres::Client::connect(server_url, postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to the test server: {e}"));
        admin.batch_execute(&format!("CREATE DATABASE {name}")).expect("CREATE DATABASE");
        TestDb { server_url: server_url.to_string(), url: with_database(server_url, &name), name }
    }

    /// A database of its own on the shared server.
    pub fn fresh() -> TestDb {
        TestDb::create(&pg_url())
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Best effort: the server may be gone (a test that stopped it); a throwaway cluster is removed anyway.
        if let Ok(mut admin) = postgres::Client::connect(&self.server_url, postgres::NoTls) {
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}
