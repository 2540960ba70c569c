//! A fleet of hosts on one PostgreSQL key store, under load, and through a restart of the server.
//!
//! `cargo bench --bench fleet` (the full run):
//! 1. set-up: a throwaway PostgreSQL cluster (scripts/pg-cluster.sh); 8 "hosts", each a process of its own
//!    with its own shim configuration and SoftHSM2 token directory (softhsm-config/setup-token.sh), all
//!    naming the same store. The MBK is made on host 0 with `p11shim mbk create` and cloned to every other
//!    host with `p11shim mbk clone-request` (on the host), `clone-to` (on host 0) and `clone-accept` (on the
//!    host); `mbk show` must then give one fingerprint on every host;
//! 2. populate: 100,000 stored HMAC keys (generic secrets labelled k0000000…) made through the shim, in
//!    parallel by all hosts (4 threads each), timed;
//! 3. load: every host runs 4 threads, each with a session of its own, for 30 s, each operation drawn at
//!    random (`FLEET_MIX`, default 70,10,10,5,5):
//!    - use (70 %): C_FindObjects by the label of a random key of the 100,000, then C_SignInit + C_Sign
//!      (HMAC-SHA256, 64 B) with the key found, so the HSM cache and the store both work;
//!    - held (10 %): C_SignInit + C_Sign with the handle of one of the keys of this thread's last 4 uses
//!      (loaded, no find: what `[store] outage_grace` keeps working while the store is away);
//!    - find (10 %): the find alone;
//!    - create (5 %): C_GenerateKey of a stored key with a label of its own;
//!    - destroy (5 %): C_DestroyObject of a key this thread created in the run (a create when it has none).
//!
//!    A use or find that does not find exactly one key counts as failed. Reported per kind: throughput,
//!    p50 and p99 latency over the whole fleet; and the PostgreSQL connections of each process, sampled from
//!    pg_stat_activity (grouped by application_name: "p11shim pid PID", which the shim sets unless the URL
//!    names one; `FLEET_APP_NAME=url` puts "fleet-hN" in each host's URL instead);
//! 4. restart: the same load with the server stopped in the middle (`pg-cluster.sh pause`, then `start`:
//!    same port, same data), once per `[store] outage_grace` variant (`FLEET_GRACES`). Every failed
//!    operation is recorded with its time and CK_RV. Asserted: only CKR_DEVICE_ERROR, and only by
//!    operations that overlap the outage window (from the pause to `FLEET_RECOVERY` seconds after the
//!    server accepts connections again).
//!
//! After each run the store is read directly (the `postgres` crate) and checked: every populated key once;
//! every key whose creation returned CKR_OK and that was not destroyed, exactly once; every key whose
//! destroy returned CKR_OK, gone; a key whose creation or destroy failed (the commit may have landed before
//! the connection died) at most once; no other row. The plain load run must have no failure at all.
//!
//! The summary table is printed at the end and written to target/fleet-summary.txt; every failed operation
//! (times, host, kind, CK_RV) to target/bench-fleet/failures-runN.txt. Everything else lives
//! under target/bench-fleet/ (wiped at the start). The shim and the CLI are those of the bench's profile:
//! `cargo build --release --workspace --lib --bins` first (`cargo bench` does not build the cdylib).
//!
//! Environment knobs (full run / under `cargo test`):
//! - FLEET_HOSTS=8/2, FLEET_THREADS=4/2: processes and threads per process;
//! - FLEET_KEYS=100000/300: keys populated;
//! - FLEET_SECS=30/3: length of the load run; FLEET_RESTART_SECS=30/8: of each restart run;
//! - FLEET_PAUSE_AT=10/1.5: seconds into a restart run at which the server is stopped; FLEET_OUTAGE=5/1: how
//!   long it stays down; FLEET_RECOVERY=5/3: seconds after it accepts connections again until which a
//!   failure still counts as in the window;
//! - FLEET_MIX=70,10,10,5,5: percentages of use, held, find, create, destroy;
//! - FLEET_MAX_CONNECTIONS (unset): written as `[store] max_connections` when set; every process must stay
//!   within it (default 4) plus one (its change listener);
//! - FLEET_GRACES=0s,default: the restart runs, one per `[store] outage_grace` value ("default" writes none);
//! - FLEET_APP_NAME=shim: "url" sets application_name=fleet-hN in each host's URL;
//! - SOFTHSM2_MODULE: libsofthsm2.so if it is not in a usual place.
//!
//! Without `--bench` (cargo test --benches / --all-targets) it runs small: 2 hosts of 2 threads, 300 keys,
//! a 3 s load and one short restart per grace variant, with every assertion.
#![deny(unsafe_op_in_unsafe_fn)]

#[macro_use]
#[path = "common/api.rs"]
mod api;
#[path = "../tests/common/pg.rs"]
#[allow(dead_code)]
mod pg;

use api::{attr, load, ok, softhsm_path, Api, YES};
use cryptoki_sys::*;
use pg::PgCluster;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SO_PIN: &str = "12345678";
const USER_PIN: &str = "123456";
/// The database slot's token on every host.
const DB: &str = "fleet";
/// `[store] max_connections` when the configuration does not say.
const DEFAULT_MAX_CONNECTIONS: usize = 4;
/// Handles of recently found keys each thread keeps for `Kind::Held` (4 threads x 4 stay within the
/// default `[store] hsm_cache` of 32 loaded keys per process).
const HELD: usize = 4;
/// A find that returned CKR_OK but not exactly one key: recorded as this (not a PKCS#11 value).
const WRONG_COUNT: CK_RV = 0xF1EE_7001;

// -----------------------------------------------------------------------------------------------------------
// Calling the shim

impl Api {
    /// A stored 32-byte generic secret for HMAC labelled `label`.
    fn hmac_key(self, s: CK_SESSION_HANDLE, label: &[u8]) -> Result<CK_OBJECT_HANDLE, CK_RV> {
        let len: CK_ULONG = 32;
        let mut t = [
            attr(CKA_TOKEN, &YES),
            attr(CKA_LABEL, label),
            attr(CKA_VALUE_LEN, &len),
            attr(CKA_SIGN, &YES),
            attr(CKA_VERIFY, &YES),
            attr(CKA_SENSITIVE, &YES),
        ];
        let mut m = CK_MECHANISM { mechanism: CKM_GENERIC_SECRET_KEY_GEN, pParameter: null_mut(), ulParameterLen: 0 };
        let mut key = 0;
        match call!(self, C_GenerateKey(s, &mut m, t.as_mut_ptr(), t.len() as CK_ULONG, &mut key)) {
            CKR_OK => Ok(key),
            rv => Err(rv),
        }
    }

    /// Find by label: Init, one FindObjects, Final; the one handle found (WRONG_COUNT if not exactly one).
    fn find_one(self, s: CK_SESSION_HANDLE, label: &[u8]) -> Result<CK_OBJECT_HANDLE, CK_RV> {
        let mut t = [attr(CKA_LABEL, label)];
        let rv = call!(self, C_FindObjectsInit(s, t.as_mut_ptr(), 1));
        if rv != CKR_OK {
            return Err(rv);
        }
        let mut found = [0 as CK_OBJECT_HANDLE; 2];
        let mut n: CK_ULONG = 0;
        let rv = call!(self, C_FindObjects(s, found.as_mut_ptr(), found.len() as CK_ULONG, &mut n));
        let end = call!(self, C_FindObjectsFinal(s));
        match (rv, end) {
            (CKR_OK, CKR_OK) if n == 1 => Ok(found[0]),
            (CKR_OK, CKR_OK) => Err(WRONG_COUNT),
            (CKR_OK, rv) | (rv, _) => Err(rv),
        }
    }

    /// C_SignInit + C_Sign, HMAC-SHA256 of 64 bytes.
    fn hmac(self, s: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> Result<(), CK_RV> {
        let mut m = CK_MECHANISM { mechanism: CKM_SHA256_HMAC, pParameter: null_mut(), ulParameterLen: 0 };
        let rv = call!(self, C_SignInit(s, &mut m, key));
        if rv != CKR_OK {
            return Err(rv);
        }
        let mut data = [0x5au8; 64];
        let mut mac = [0u8; 32];
        let mut len = mac.len() as CK_ULONG;
        match call!(self, C_Sign(s, data.as_mut_ptr(), data.len() as CK_ULONG, mac.as_mut_ptr(), &mut len)) {
            CKR_OK => Ok(()),
            rv => Err(rv),
        }
    }

    fn destroy(self, s: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> Result<(), CK_RV> {
        match call!(self, C_DestroyObject(s, key)) {
            CKR_OK => Ok(()),
            rv => Err(rv),
        }
    }
}

// -----------------------------------------------------------------------------------------------------------
// Knobs

#[derive(Clone)]
struct Knobs {
    bench_mode: bool,
    hosts: usize,
    threads: usize,
    keys: usize,
    secs: f64,
    restart_secs: f64,
    pause_at: f64,
    outage: f64,
    recovery: f64,
    /// Cumulative thresholds out of 100 for use, held, find, create (destroy takes the rest).
    mix: [u32; 4],
    max_connections: Option<usize>,
    graces: Vec<String>,
    app_name_in_url: bool,
}

fn env_num(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

impl Knobs {
    fn from_env() -> Knobs {
        let bench_mode = std::env::args().any(|a| a == "--bench");
        let pick = |full: f64, quick: f64| if bench_mode { full } else { quick };
        let mix_text = std::env::var("FLEET_MIX").unwrap_or_else(|_| "70,10,10,5,5".into());
        let mix: Vec<u32> = mix_text
            .split(',')
            .map(|s| s.trim().parse().unwrap_or_else(|_| panic!("FLEET_MIX: {s:?} is not a number")))
            .collect();
        assert!(mix.len() == 5 && mix.iter().sum::<u32>() == 100, "FLEET_MIX needs five percentages summing to 100");
        let graces = std::env::var("FLEET_GRACES").unwrap_or_else(|_| "0s,default".into());
        let graces: Vec<String> = graces.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        let knobs = Knobs {
            bench_mode,
            hosts: env_num("FLEET_HOSTS", pick(8.0, 2.0)) as usize,
            threads: env_num("FLEET_THREADS", pick(4.0, 2.0)) as usize,
            keys: env_num("FLEET_KEYS", pick(100_000.0, 300.0)) as usize,
            secs: env_num("FLEET_SECS", pick(30.0, 3.0)),
            restart_secs: env_num("FLEET_RESTART_SECS", pick(30.0, 8.0)),
            pause_at: env_num("FLEET_PAUSE_AT", pick(10.0, 1.5)),
            outage: env_num("FLEET_OUTAGE", pick(5.0, 1.0)),
            recovery: env_num("FLEET_RECOVERY", pick(5.0, 3.0)),
            mix: [0, 1, 2, 3].map(|i| mix[..=i].iter().sum()),
            max_connections: std::env::var("FLEET_MAX_CONNECTIONS")
                .ok()
                .map(|v| v.trim().parse().unwrap_or_else(|_| panic!("FLEET_MAX_CONNECTIONS={v:?} is not a number"))),
            graces,
            app_name_in_url: std::env::var("FLEET_APP_NAME").is_ok_and(|v| v == "url"),
        };
        assert!(knobs.hosts >= 1 && knobs.threads >= 1 && knobs.keys >= 1, "FLEET_HOSTS, _THREADS, _KEYS >= 1");
        knobs
    }
}

// -----------------------------------------------------------------------------------------------------------
// Paths and set-up

/// <target>/<profile>, from <target>/<profile>/deps/fleet-<hash>.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("<target>/<profile>/deps/<bench>").to_path_buf()
}

fn target_dir() -> PathBuf {
    profile_dir().parent().expect("<target>").to_path_buf()
}

fn scratch_dir() -> PathBuf {
    target_dir().join("bench-fleet")
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A file built by cargo in this profile, checked to be newer than every source file of the crate (`cargo
/// test` builds the library as an rlib for this binary, not the cdylib it loads).
fn built(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    let build = if profile_dir().ends_with("release") { "cargo build --release" } else { "cargo build" };
    assert!(path.exists(), "{} is missing: {build} --workspace --lib --bins", path.display());
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).expect("mtime");
    let mut stack = vec![repo().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src").flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t > built) {
                panic!("{} is newer than {}: {build} --workspace --lib --bins", p.display(), path.display());
            }
        }
    }
    path
}

fn shim_path() -> PathBuf {
    built("libp11shim.so")
}

fn cli_path() -> PathBuf {
    built("p11shim")
}

/// Milliseconds since the Unix epoch: the one clock of the parent and every host.
fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as u64
}

/// One host: its directory, SoftHSM2 configuration and shim configuration.
struct Host {
    dir: PathBuf,
    softhsm_conf: PathBuf,
    config: PathBuf,
}

impl Host {
    fn make(root: &Path, index: usize) -> Host {
        let dir = root.join(format!("host{index}"));
        std::fs::create_dir_all(&dir).expect("create a host dir");
        let out = Command::new("bash")
            .arg(repo().join("softhsm-config/setup-token.sh"))
            .args([&dir.to_string_lossy(), DB, SO_PIN, USER_PIN])
            .stderr(Stdio::null())
            .output()
            .expect("run setup-token.sh");
        assert!(out.status.success(), "setup-token.sh failed: {}", String::from_utf8_lossy(&out.stdout));
        Host { softhsm_conf: dir.join("softhsm2.conf"), config: dir.join("p11shim.toml"), dir }
    }

    /// Writes the shim configuration: the store at `url` with the `[store]` lines `store_extra`.
    fn configure(&self, url: &str, store_extra: &str) {
        let text = format!(
            "module = \"{}\"\nlog_file = \"shim.log\"\nlog_level = \"warn\"\n[store]\nurl = \"{url}\"\n{store_extra}\
             [[slot]]\ntoken = \"{DB}\"\nstorage = \"database\"\ndefault_group = \"fleet\"\n",
            softhsm_path().display()
        );
        std::fs::write(&self.config, text).expect("write p11shim.toml");
    }

    /// A command run with this host's configuration.
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("SOFTHSM2_CONF", &self.softhsm_conf)
            .env("P11SHIM_CONFIG", &self.config)
            .env_remove("P11SHIM_MODULE")
            .env("P11SHIM_SO_PIN", SO_PIN)
            .env("P11SHIM_USER_PIN", USER_PIN)
            .stdin(Stdio::null());
        cmd
    }

    /// `p11shim ARGS…` on this host; its stdout.
    fn cli(&self, args: &[&str]) -> String {
        self.cli_allowing(args, None)
    }

    /// `p11shim ARGS…` on this host; its stdout. `partial`: a message with which exit status 3 ("done, but
    /// needs attention") is accepted.
    fn cli_allowing(&self, args: &[&str], partial: Option<&str>) -> String {
        let out = self.command(&cli_path()).args(args).output().expect("run p11shim");
        let accepted =
            partial.is_some_and(|m| out.status.code() == Some(3) && String::from_utf8_lossy(&out.stderr).contains(m));
        assert!(
            out.status.success() || accepted,
            "p11shim {} on {}: {}\n{}",
            args.join(" "),
            self.dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fingerprint(&self) -> String {
        let text = self.cli(&["mbk", "show", "--token", DB]);
        text.lines()
            .find_map(|l| l.strip_prefix("fingerprint:").map(|f| f.trim().to_string()))
            .unwrap_or_else(|| panic!("no fingerprint in mbk show: {text}"))
    }
}

/// The MBK made on host 0 and cloned to every other host: requests on the hosts (in parallel, each makes
/// an RSA-3072 transport key), responses on host 0 (one after another), accepts on the hosts (in parallel).
fn share_mbk(hosts: &[Host]) {
    hosts[0].cli(&["mbk", "create", "--token", DB]);
    let others = &hosts[1..];
    let file = |h: &Host, name: &str| h.dir.join(name).to_string_lossy().into_owned();
    std::thread::scope(|s| {
        for h in others {
            // The request cannot be audited: the target has no MBK yet, its configuration names no other
            // token, and the shared log already holds sealed entries (exit status 3, "not audited").
            s.spawn(move || {
                let out = file(h, "clone-req.json");
                h.cli_allowing(&["mbk", "clone-request", "--token", DB, "--out", &out], Some("not audited"))
            });
        }
    });
    for h in others {
        hosts[0].cli(&[
            "mbk",
            "clone-to",
            &file(h, "clone-req.json"),
            "--token",
            DB,
            "--out",
            &file(h, "clone-resp.json"),
        ]);
    }
    std::thread::scope(|s| {
        for h in others {
            s.spawn(move || h.cli(&["mbk", "clone-accept", &file(h, "clone-resp.json"), "--token", DB]));
        }
    });
    let fingerprints: Vec<String> = hosts.iter().map(Host::fingerprint).collect();
    assert!(fingerprints.iter().all(|f| *f == fingerprints[0]), "one MBK on every host: {fingerprints:?}");
}

/// `url` with `application_name=NAME` added.
fn with_app_name(url: &str, name: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={name}")
}

/// Children of this process, killed (by their own pid) if the parent unwinds before waiting for them.
struct Children(Vec<Child>);

impl Children {
    fn pids(&self) -> Vec<u32> {
        self.0.iter().map(Child::id).collect()
    }

    /// Waits for every child; the failures as messages.
    fn wait(mut self, what: &str) -> Vec<String> {
        let mut failures = Vec::new();
        for (i, mut child) in std::mem::take(&mut self.0).into_iter().enumerate() {
            let status = child.wait().expect("wait for a host");
            if !status.success() {
                failures.push(format!("{what}: host {i} failed ({status})"));
            }
        }
        failures
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// -----------------------------------------------------------------------------------------------------------
// Operations and their records

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Use,
    Held,
    Find,
    Create,
    Destroy,
}

impl Kind {
    const ALL: [Kind; 5] = [Kind::Use, Kind::Held, Kind::Find, Kind::Create, Kind::Destroy];

    fn name(self) -> &'static str {
        match self {
            Kind::Use => "use (find + HMAC sign)",
            Kind::Held => "HMAC sign, held handle",
            Kind::Find => "find by label",
            Kind::Create => "create",
            Kind::Destroy => "destroy",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Kind::Use => "use",
            Kind::Held => "held",
            Kind::Find => "find",
            Kind::Create => "create",
            Kind::Destroy => "destroy",
        }
    }

    fn from_u32(v: u32) -> Kind {
        Kind::ALL[v as usize]
    }
}

/// One operation: kind, result, start and duration in µs from the run's start, and the sequence number of
/// the key made or destroyed (create, destroy).
#[derive(Clone, Copy)]
struct Record {
    kind: Kind,
    rv: CK_RV,
    start_us: u32,
    dur_us: u32,
    seq: u32,
}

impl Record {
    const SIZE: usize = 20;

    fn write(&self, out: &mut Vec<u8>) {
        for v in [self.kind as u32, self.rv as u32, self.start_us, self.dur_us, self.seq] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn read(b: &[u8]) -> Record {
        let v = |i: usize| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().unwrap());
        Record { kind: Kind::from_u32(v(0)), rv: v(1) as CK_RV, start_us: v(2), dur_us: v(3), seq: v(4) }
    }
}

/// The label of a key created during run `run` by `host`'s thread `thread`, its `seq`th.
fn created_label(run: usize, host: usize, thread: usize, seq: u32) -> String {
    format!("c{run}-{host}-{thread}-{seq}")
}

fn populated_label(i: usize) -> String {
    format!("k{i:07}")
}

/// A small deterministic generator.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

// -----------------------------------------------------------------------------------------------------------
// The hosts (children)

fn env_usize(name: &str) -> usize {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} unset")).parse().unwrap_or_else(|_| panic!("{name}"))
}

/// The shim initialized, logged in, and one session per thread.
fn host_sessions(threads: usize) -> (Api, Vec<CK_SESSION_HANDLE>) {
    let shim = load(&shim_path());
    shim.initialize("C_Initialize");
    let slot = shim.slot(DB);
    let sessions: Vec<CK_SESSION_HANDLE> = (0..threads).map(|_| shim.open(slot)).collect();
    shim.login(sessions[0]);
    (shim, sessions)
}

/// Phase `populate`: this host's share of the keys, across its threads.
fn host_populate(knobs: &Knobs) {
    let host = env_usize("FLEET_HOST");
    let (shim, sessions) = host_sessions(knobs.threads);
    std::thread::scope(|s| {
        for (t, &session) in sessions.iter().enumerate() {
            s.spawn(move || {
                let mine =
                    (0..knobs.keys).filter(|i| i % knobs.hosts == host && (i / knobs.hosts) % knobs.threads == t);
                for i in mine {
                    let label = populated_label(i);
                    if let Err(rv) = shim.hmac_key(session, label.as_bytes()) {
                        panic!("host {host}: creating {label}: CK_RV {rv:#x}");
                    }
                }
            });
        }
    });
    ok(call!(shim, C_Finalize(null_mut())), "C_Finalize");
}

/// Phase `load`: the mixed load from FLEET_START_MS for FLEET_RUN_SECS; each thread's records written to
/// FLEET_OUT-tT.ops.
fn host_load(knobs: &Knobs) {
    let host = env_usize("FLEET_HOST");
    let run = env_usize("FLEET_RUN");
    let secs: f64 = std::env::var("FLEET_RUN_SECS").expect("FLEET_RUN_SECS").parse().expect("FLEET_RUN_SECS");
    let out = PathBuf::from(std::env::var("FLEET_OUT").expect("FLEET_OUT"));
    let go = PathBuf::from(std::env::var("FLEET_GO").expect("FLEET_GO"));
    let (shim, sessions) = host_sessions(knobs.threads);
    // Ready: the parent names the start time once every host is.
    std::fs::write(format!("{}.ready", out.display()), b"").expect("write the ready file");
    let start_ms: u64 = loop {
        if let Ok(text) = std::fs::read_to_string(&go) {
            break text.trim().parse().expect("the start time");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let now = wall_ms();
    assert!(start_ms > now, "host {host} was ready {} ms after the start", now - start_ms);
    let start = Instant::now() + Duration::from_millis(start_ms - now);
    let end = start + Duration::from_secs_f64(secs);
    std::thread::sleep(start - Instant::now());
    std::thread::scope(|s| {
        for (t, &session) in sessions.iter().enumerate() {
            let out = out.clone();
            s.spawn(move || {
                let mut rng =
                    XorShift(0x9e37_79b9_7f4a_7c15 ^ (((run * 1000 + host * 100 + t) as u64 + 1) * 0x2545_f491));
                let mut records = Vec::new();
                let mut mine: Vec<(u32, CK_OBJECT_HANDLE)> = Vec::new();
                // Handles of the keys of the last few successful uses.
                let mut held: Vec<CK_OBJECT_HANDLE> = Vec::new();
                let mut seq = 0u32;
                loop {
                    let t0 = Instant::now();
                    if t0 >= end {
                        break;
                    }
                    let roll = (rng.next() % 100) as u32;
                    let mut kind = match roll {
                        r if r < knobs.mix[0] => Kind::Use,
                        r if r < knobs.mix[1] => Kind::Held,
                        r if r < knobs.mix[2] => Kind::Find,
                        r if r < knobs.mix[3] => Kind::Create,
                        _ => Kind::Destroy,
                    };
                    if kind == Kind::Destroy && mine.is_empty() {
                        kind = Kind::Create;
                    }
                    if kind == Kind::Held && held.is_empty() {
                        kind = Kind::Use;
                    }
                    let mut key_seq = 0;
                    let result = match kind {
                        Kind::Use => {
                            let label = populated_label(rng.below(knobs.keys));
                            shim.find_one(session, label.as_bytes()).and_then(|key| {
                                shim.hmac(session, key)?;
                                if held.len() == HELD {
                                    held.remove(0);
                                }
                                held.push(key);
                                Ok(())
                            })
                        }
                        Kind::Held => shim.hmac(session, held[rng.below(held.len())]),
                        Kind::Find => {
                            let label = populated_label(rng.below(knobs.keys));
                            shim.find_one(session, label.as_bytes()).map(drop)
                        }
                        Kind::Create => {
                            key_seq = seq;
                            seq += 1;
                            let label = created_label(run, host, t, key_seq);
                            shim.hmac_key(session, label.as_bytes()).map(|key| mine.push((key_seq, key)))
                        }
                        Kind::Destroy => {
                            let (s, key) = mine.swap_remove(rng.below(mine.len()));
                            key_seq = s;
                            shim.destroy(session, key)
                        }
                    };
                    let t1 = Instant::now();
                    Record {
                        kind,
                        rv: result.err().unwrap_or(CKR_OK),
                        start_us: (t0 - start).as_micros() as u32,
                        dur_us: (t1 - t0).as_micros() as u32,
                        seq: key_seq,
                    }
                    .write(&mut records);
                }
                let path = PathBuf::from(format!("{}-t{t}.ops", out.display()));
                std::fs::write(&path, records).expect("write the records");
            });
        }
    });
    ok(call!(shim, C_Finalize(null_mut())), "C_Finalize");
}

// -----------------------------------------------------------------------------------------------------------
// The parent: set-up, runs, checks, summary

/// Starts every host as phase `phase` with the environment `env` gives for its index; returns them running.
fn spawn_hosts(hosts: &[Host], phase: &str, env: &dyn Fn(usize) -> Vec<(&'static str, String)>) -> Children {
    let children = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let mut cmd = h.command(&std::env::current_exe().unwrap());
            cmd.args(std::env::args().skip(1)).env("FLEET_PHASE", phase).env("FLEET_HOST", i.to_string());
            for (k, v) in env(i) {
                cmd.env(k, v);
            }
            cmd.spawn().expect("start a host")
        })
        .collect();
    Children(children)
}

fn pg(url: &str) -> postgres::Client {
    postgres::Client::connect(&with_app_name(url, "fleet-bench"), postgres::NoTls).expect("connect to PostgreSQL")
}

/// The rows of the fleet's token, by label.
fn rows_by_label(url: &str) -> HashMap<String, i64> {
    let mut client = pg(url);
    client
        .query("SELECT label, count(*) FROM keys WHERE token = $1 GROUP BY label", &[&DB])
        .expect("read the store")
        .into_iter()
        .map(|r| (String::from_utf8_lossy(r.get::<_, &[u8]>(0)).into_owned(), r.get(1)))
        .collect()
}

/// Polls the number of stored keys while the hosts populate, printing progress.
fn populate_progress(url: &str, target: usize, done: &AtomicBool, started: Instant) {
    let mut client = pg(url);
    let mut last = 0i64;
    while !done.load(Ordering::SeqCst) {
        for _ in 0..50 {
            if done.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let n: i64 = client.query_one("SELECT count(*) FROM keys WHERE token = $1", &[&DB]).map_or(0, |r| r.get(0));
        if n != last {
            let s = started.elapsed().as_secs_f64();
            println!("populate: {n} of {target} keys, {s:.0} s, {:.0} keys/s", n as f64 / s);
            last = n;
        }
    }
}

/// Maximum connections seen per application_name while sampling.
#[derive(Default)]
struct ConnSamples {
    max: BTreeMap<String, i64>,
    samples: usize,
}

/// Samples pg_stat_activity every 100 ms until `stop`, reconnecting while the server is away.
fn sample_connections(url: &str, stop: &AtomicBool, into: &Mutex<ConnSamples>) {
    let mut client: Option<postgres::Client> = None;
    while !stop.load(Ordering::SeqCst) {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = postgres::Client::connect(&with_app_name(url, "fleet-sampler"), postgres::NoTls).ok();
        }
        if let Some(c) = &mut client {
            let q = "SELECT application_name, count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND backend_type = 'client backend' \
                     AND pid <> pg_backend_pid() GROUP BY 1";
            match c.query(q, &[]) {
                Ok(rows) => {
                    let mut s = into.lock().unwrap();
                    s.samples += 1;
                    for r in rows {
                        let (name, n): (String, i64) = (r.get(0), r.get(1));
                        let m = s.max.entry(name).or_insert(0);
                        *m = (*m).max(n);
                    }
                }
                Err(_) => client = None,
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where each key created in a run stands, from the hosts' records.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fate {
    /// Created (CKR_OK) and not destroyed: exactly one row.
    Live,
    /// Destroyed (CKR_OK): no row.
    Gone,
    /// A creation or destroy that failed: the commit may have landed before the connection died; at most one row.
    Unsure,
}

/// What a run measured.
struct RunResult {
    name: String,
    secs: f64,
    records: Vec<(usize, Record)>,
    conns: ConnSamples,
    /// Milliseconds from the run's start: the pause began, the server accepted connections again.
    outage: Option<(f64, f64)>,
    /// Application names mapped to hosts.
    host_names: Vec<String>,
}

#[allow(clippy::too_many_arguments)]
fn run_load(
    knobs: &Knobs,
    hosts: &[Host],
    cluster: &PgCluster,
    run: usize,
    name: &str,
    secs: f64,
    restart: bool,
    ledger: &mut HashMap<String, Fate>,
) -> RunResult {
    let root = scratch_dir();
    let out = |h: usize| root.join(format!("run{run}-h{h}"));
    let go = root.join(format!("run{run}.start"));
    let env_for = |h: usize| -> Vec<(&'static str, String)> {
        vec![
            ("FLEET_RUN", run.to_string()),
            ("FLEET_GO", go.to_string_lossy().into_owned()),
            ("FLEET_RUN_SECS", secs.to_string()),
            ("FLEET_OUT", out(h).to_string_lossy().into_owned()),
        ]
    };
    let mut children = spawn_hosts(hosts, "load", &env_for);
    // Every host initialized and logged in: start all at once, shortly.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !(0..hosts.len()).all(|h| Path::new(&format!("{}.ready", out(h).display())).exists()) {
        assert!(Instant::now() < deadline, "{name}: the hosts were not ready within 300 s");
        if let Some(h) = children.0.iter_mut().position(|c| c.try_wait().is_ok_and(|s| s.is_some())) {
            panic!("{name}: host {h} ended before it was ready");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let start_ms = wall_ms() + 200;
    let tmp = root.join(format!("run{run}.start.tmp"));
    std::fs::write(&tmp, start_ms.to_string()).expect("write the start time");
    std::fs::rename(&tmp, &go).expect("publish the start time");
    let pids = children.pids();
    let stop = AtomicBool::new(false);
    let conns = Mutex::new(ConnSamples::default());
    let mut outage = None;
    std::thread::scope(|s| {
        s.spawn(|| sample_connections(cluster.url(), &stop, &conns));
        if restart {
            let at = start_ms + (knobs.pause_at * 1000.0) as u64;
            std::thread::sleep(Duration::from_millis(at.saturating_sub(wall_ms())));
            let paused = wall_ms();
            cluster.pause();
            println!("{name}: server stopped at {:.1} s", (wall_ms() - start_ms) as f64 / 1000.0);
            std::thread::sleep(Duration::from_secs_f64(knobs.outage));
            cluster.resume();
            let back = wall_ms();
            println!("{name}: server accepting connections at {:.1} s", (back - start_ms) as f64 / 1000.0);
            outage = Some(((paused - start_ms) as f64, (back - start_ms) as f64));
        }
        std::thread::sleep(Duration::from_millis((start_ms + (secs * 1000.0) as u64).saturating_sub(wall_ms())));
        let failures = children.wait(name);
        stop.store(true, Ordering::SeqCst);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    });
    let mut records = Vec::new();
    for h in 0..hosts.len() {
        for t in 0..knobs.threads {
            let path = PathBuf::from(format!("{}-t{t}.ops", out(h).display()));
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            for chunk in bytes.chunks_exact(Record::SIZE) {
                let r = Record::read(chunk);
                if matches!(r.kind, Kind::Create | Kind::Destroy) {
                    let label = created_label(run, h, t, r.seq);
                    let fate = match (r.kind, r.rv) {
                        (Kind::Create, CKR_OK) => Fate::Live,
                        (Kind::Destroy, CKR_OK) => Fate::Gone,
                        _ => Fate::Unsure,
                    };
                    // A destroy that failed leaves a created key unsure; a create that failed has no destroy.
                    ledger.insert(label, fate);
                }
                records.push((h, r));
            }
        }
    }
    let host_names = (0..hosts.len())
        .map(|h| if knobs.app_name_in_url { format!("fleet-h{h}") } else { format!("p11shim pid {}", pids[h]) })
        .collect();
    RunResult { name: name.to_string(), secs, records, conns: conns.into_inner().unwrap(), outage, host_names }
}

/// The store against the ledger and the population; the problems found.
fn check_store(url: &str, keys: usize, ledger: &HashMap<String, Fate>) -> Vec<String> {
    let rows = rows_by_label(url);
    let mut problems = Vec::new();
    for i in 0..keys {
        let label = populated_label(i);
        let n = rows.get(&label).copied().unwrap_or(0);
        if n != 1 {
            problems.push(format!("populated key {label}: {n} rows"));
        }
    }
    for (label, fate) in ledger {
        let n = rows.get(label).copied().unwrap_or(0);
        let good = match fate {
            Fate::Live => n == 1,
            Fate::Gone => n == 0,
            Fate::Unsure => n <= 1,
        };
        if !good {
            problems.push(format!("key {label} ({fate:?}): {n} rows"));
        }
    }
    for (label, n) in &rows {
        if !label.starts_with('k') && !ledger.contains_key(label) {
            problems.push(format!("a row nobody made: {label:?} ({n})"));
        }
    }
    problems.truncate(20);
    problems
}

/// The `q` quantile (0..=1) by nearest rank of sorted `v`.
fn quantile(v: &[u32], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize] as f64
}

/// Every failed operation of a run, one line each: start and end (ms from the run's start), host, kind, CK_RV.
fn write_failures(path: &Path, r: &RunResult) {
    let mut text = String::from("# start_ms end_ms host kind ck_rv\n");
    for (h, rec) in r.records.iter().filter(|(_, x)| x.rv != CKR_OK) {
        let (start, end) = (rec.start_us as f64 / 1000.0, (rec.start_us + rec.dur_us) as f64 / 1000.0);
        let _ = writeln!(text, "{start:.3} {end:.3} {h} {} {:#x}", rec.kind.short(), rec.rv);
    }
    std::fs::write(path, text).expect("write the failures file");
}

/// Failures of a run outside its outage window (or any, without one), and any that is not CKR_DEVICE_ERROR.
fn check_failures(r: &RunResult, recovery: f64) -> Vec<String> {
    let mut problems = Vec::new();
    for (h, rec) in &r.records {
        if rec.rv == CKR_OK {
            continue;
        }
        let (start, end) = (rec.start_us as f64 / 1000.0, (rec.start_us + rec.dur_us) as f64 / 1000.0);
        let in_window = r.outage.is_some_and(|(paused, back)| end >= paused && start <= back + recovery * 1000.0);
        if !in_window || rec.rv != CKR_DEVICE_ERROR {
            problems.push(format!(
                "{}: host {h} {} at {start:.0}-{end:.0} ms: CK_RV {:#x}{}",
                r.name,
                rec.kind.short(),
                rec.rv,
                if in_window { "" } else { " (outside the outage window)" }
            ));
        }
    }
    let n = problems.len();
    problems.truncate(20);
    if n > 20 {
        problems.push(format!("… {} more", n - 20));
    }
    problems
}

fn fmt_ms(us: f64) -> String {
    if us.is_nan() {
        "-".into()
    } else {
        format!("{:.2}", us / 1000.0)
    }
}

/// The table of one run.
fn run_table(out: &mut String, r: &RunResult, hosts: usize) {
    let _ = writeln!(out, "\n{} ({:.0} s):", r.name, r.secs);
    let _ = writeln!(
        out,
        "{:<24} {:>9} {:>10} {:>9} {:>9} {:>8}",
        "operation", "ok", "ops/s", "p50 ms", "p99 ms", "failed"
    );
    let mut total = (0usize, 0usize);
    for kind in Kind::ALL {
        let mut lat: Vec<u32> =
            r.records.iter().filter(|(_, x)| x.kind == kind && x.rv == CKR_OK).map(|(_, x)| x.dur_us).collect();
        lat.sort_unstable();
        let failed = r.records.iter().filter(|(_, x)| x.kind == kind && x.rv != CKR_OK).count();
        total.0 += lat.len();
        total.1 += failed;
        let _ = writeln!(
            out,
            "{:<24} {:>9} {:>10.0} {:>9} {:>9} {:>8}",
            kind.name(),
            lat.len(),
            lat.len() as f64 / r.secs,
            fmt_ms(quantile(&lat, 0.5)),
            fmt_ms(quantile(&lat, 0.99)),
            failed
        );
    }
    let _ = writeln!(
        out,
        "{:<24} {:>9} {:>10.0} {:>9} {:>9} {:>8}",
        "all",
        total.0,
        total.0 as f64 / r.secs,
        "",
        "",
        total.1
    );
    let per_host: Vec<String> =
        r.host_names.iter().map(|n| r.conns.max.get(n).map_or("-".into(), |m| m.to_string())).collect();
    let others: Vec<String> = r
        .conns
        .max
        .iter()
        .filter(|(n, _)| !r.host_names.contains(n) && !n.starts_with("fleet-"))
        .map(|(n, m)| format!("{n:?}: {m}"))
        .collect();
    let _ = writeln!(
        out,
        "PostgreSQL connections per process, max over {} samples: {} (hosts 0..{}){}",
        r.conns.samples,
        per_host.join(" "),
        hosts - 1,
        if others.is_empty() { String::new() } else { format!("; other names: {}", others.join(", ")) }
    );
    if let Some((paused, back)) = r.outage {
        let _ = writeln!(
            out,
            "server stopped at {:.1} s, accepting again at {:.1} s (down {:.1} s)",
            paused / 1000.0,
            back / 1000.0,
            (back - paused) / 1000.0
        );
        let failed: Vec<&Record> = r.records.iter().map(|(_, x)| x).filter(|x| x.rv != CKR_OK).collect();
        if let (Some(first), Some(last)) =
            (failed.iter().map(|x| x.start_us).min(), failed.iter().map(|x| x.start_us + x.dur_us).max())
        {
            let mut by_rv: BTreeMap<CK_RV, usize> = BTreeMap::new();
            for x in &failed {
                *by_rv.entry(x.rv).or_default() += 1;
            }
            let rvs: Vec<String> = by_rv.iter().map(|(rv, n)| format!("{rv:#x} x{n}")).collect();
            let _ = writeln!(
                out,
                "failed operations: {} ({}), first started {:+.2} s from the stop, last ended {:+.2} s from the restart",
                failed.len(),
                rvs.join(", "),
                (first as f64 / 1000.0 - paused) / 1000.0,
                (last as f64 / 1000.0 - back) / 1000.0
            );
        } else {
            let _ = writeln!(out, "failed operations: none");
        }
    }
}

fn grace_line(grace: &str) -> String {
    if grace == "default" {
        String::new()
    } else {
        format!("outage_grace = \"{grace}\"\n")
    }
}

fn parent(knobs: &Knobs) {
    let wall = Instant::now();
    let root = scratch_dir();
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("create the scratch dir");
    let mut report = String::new();
    let mut failures = Vec::new();

    // Set-up.
    let t = Instant::now();
    let cluster = PgCluster::start();
    let hosts: Vec<Host> = (0..knobs.hosts).map(|i| Host::make(&root, i)).collect();
    let max_conn = knobs.max_connections.map_or(String::new(), |n| format!("max_connections = {n}\n"));
    let configure = |extra: &str| {
        for (i, h) in hosts.iter().enumerate() {
            let url = if knobs.app_name_in_url {
                with_app_name(cluster.url(), &format!("fleet-h{i}"))
            } else {
                cluster.url().to_string()
            };
            h.configure(&url, &format!("{max_conn}{extra}"));
        }
    };
    configure("");
    share_mbk(&hosts);
    let setup_secs = t.elapsed().as_secs_f64();
    println!("set-up: {} hosts, one MBK (cloned), {setup_secs:.1} s", knobs.hosts);

    // Populate.
    let t = Instant::now();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| populate_progress(cluster.url(), knobs.keys, &done, t));
        let children = spawn_hosts(&hosts, "populate", &|_| Vec::new());
        let f = children.wait("populate");
        done.store(true, Ordering::SeqCst);
        assert!(f.is_empty(), "{}", f.join("\n"));
    });
    let populate_secs = t.elapsed().as_secs_f64();
    println!("populate: {} keys in {populate_secs:.1} s", knobs.keys);
    let mut ledger = HashMap::new();
    let problems = check_store(cluster.url(), knobs.keys, &ledger);
    assert!(problems.is_empty(), "after populating: {}", problems.join("\n"));

    let _ = writeln!(
        report,
        "fleet bench{}: {} hosts x {} threads, one PostgreSQL store, {} stored HMAC keys; mix \
         use/held/find/create/destroy {}/{}/{}/{}/{} %",
        if knobs.bench_mode { "" } else { " (small: without --bench)" },
        knobs.hosts,
        knobs.threads,
        knobs.keys,
        knobs.mix[0],
        knobs.mix[1] - knobs.mix[0],
        knobs.mix[2] - knobs.mix[1],
        knobs.mix[3] - knobs.mix[2],
        100 - knobs.mix[3]
    );
    let _ = writeln!(
        report,
        "[store] max_connections: {}; application_name: {}",
        knobs.max_connections.map_or("default".into(), |n| n.to_string()),
        if knobs.app_name_in_url { "fleet-hN in the URL" } else { "the shim's own" }
    );
    let _ = writeln!(
        report,
        "set-up (cluster, tokens, MBK create + {} clones): {setup_secs:.1} s; populate: {} keys in {populate_secs:.1} s \
         ({:.0} keys/s)",
        knobs.hosts - 1,
        knobs.keys,
        knobs.keys as f64 / populate_secs
    );

    // The runs: the load, then one restart per grace variant.
    let mut runs = vec![("load".to_string(), String::new(), false)];
    for g in &knobs.graces {
        runs.push((format!("restart, outage_grace {g}"), grace_line(g), true));
    }
    for (run, (name, extra, restart)) in runs.into_iter().enumerate() {
        configure(&extra);
        println!("\n=== {name} ===");
        let secs = if restart { knobs.restart_secs } else { knobs.secs };
        let r = run_load(knobs, &hosts, &cluster, run, &name, secs, restart, &mut ledger);
        let mut table = String::new();
        run_table(&mut table, &r, knobs.hosts);
        print!("{table}");
        report.push_str(&table);
        failures.extend(check_failures(&r, knobs.recovery));
        write_failures(&root.join(format!("failures-run{run}.txt")), &r);
        let problems = check_store(cluster.url(), knobs.keys, &ledger);
        if !problems.is_empty() {
            failures.push(format!("{name}: the store does not match the operations:\n{}", problems.join("\n")));
        }
        let missing: Vec<&String> = r.host_names.iter().filter(|n| !r.conns.max.contains_key(*n)).collect();
        if !missing.is_empty() {
            failures.push(format!("{name}: no connection seen under application_name {missing:?}"));
        }
        // At most max_connections for statements, plus the change listener.
        let limit = knobs.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        for n in &r.host_names {
            if let Some(&m) = r.conns.max.get(n) {
                if m > limit as i64 + 1 {
                    failures.push(format!("{name}: {n} had {m} connections (max_connections = {limit}, + listener)"));
                }
            }
        }
    }
    let counts = ledger.values().fold([0usize; 3], |mut a, f| {
        a[*f as usize] += 1;
        a
    });
    let _ = writeln!(
        report,
        "\nstore check after every run: {} populated keys once each; created keys: {} live (once), {} destroyed \
         (gone), {} unsure (failed create/destroy: at most once): {}",
        knobs.keys,
        counts[0],
        counts[1],
        counts[2],
        if failures.is_empty() { "ok" } else { "FAILED" }
    );
    let _ = writeln!(report, "wall time: {:.0} s", wall.elapsed().as_secs_f64());
    drop(cluster);
    println!("\n{report}");
    let path = target_dir().join("fleet-summary.txt");
    let _ = std::fs::File::create(&path).and_then(|mut f| f.write_all(report.as_bytes()));
    println!("(also written to {})", path.display());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn main() {
    let knobs = Knobs::from_env();
    match std::env::var("FLEET_PHASE").as_deref() {
        Ok("populate") => host_populate(&knobs),
        Ok("load") => host_load(&knobs),
        Ok(other) => panic!("unknown FLEET_PHASE {other:?}"),
        Err(_) => parent(&knobs),
    }
}
