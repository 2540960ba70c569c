//! What per-group backup and restore cost: the real `p11shim backup`, `restore` and `verify`
//! commands over SoftHSM2 and a SQLite key store, timed from outside (wall clock of the child process) with
//! their peak memory (`ru_maxrss` of the child, from `wait4`).
//!
//! `cargo bench --bench backup` measures, for N = 1,000, 10,000 and 100,000 stored AES-256 keys in the group
//! `Bench` of a database slot:
//! 1. `p11shim backup --group Bench --out F --logon op` (every row's MAC checked in the HSM, every record
//!    sealed in the HSM, the file written and fsynced);
//! 2. `p11shim restore F --logon op` into a database slot of a **fresh** key store (rows inserted: the
//!    import figure), and once, at the end with the largest file, into a second database slot of the
//!    **same** store;
//! 3. `p11shim restore F --token bench-native --logon op` into a token that is not a database slot
//!    (SoftHSM2 token objects, one file each; slow, so only at the sizes of BACKUP_BENCH_NATIVE), then the
//!    same restore once more into the full token (every key present: what restore's one C_FindObjects per
//!    record costs when SoftHSM2 holds N token objects);
//! 4. `p11shim verify F` (every MAC again, and every secret unwrapped in the HSM as a session object);
//! 5. the same commands on an empty group (N = 0): the fixed cost of a command (process start, argon2 logon,
//!    token open and login, finding the MBK, the audit entry, fsyncs), so that the per-key rate can be read
//!    apart from it: "net keys/s" = N / (t(N) − t(0)).
//!
//! Each command runs BACKUP_BENCH_RUNS times (default 3); the table gives the median and the range.
//!
//! How the keys are made: the first BACKUP_BENCH_CREATE keys (default 1,000) by C_GenerateKey with
//! CKA_TOKEN=true through libp11shim.so (this binary again, as a child process: the rate is reported). Each
//! such key costs one SQLite transaction with synchronous=FULL, i.e. one fsync, which on this VM's disk is
//! about 5 ms, so 100,000 keys made that way would take minutes. The rest are made by a child that uses the
//! p11shim library over the same token: a fresh AES-256 session key per record, generated in SoftHSM2 and
//! wrapped under the MBK with C_WrapKey, the record sealed in the HSM, written to a backup file with the
//! attributes of a key made by the shim (new id and label), and that file is then restored into the key
//! store with `p11shim restore` (one transaction). The rows are real rows, sealed by restore: the store
//! cannot tell them from keys made by C_GenerateKey.
//!
//! Set-up (under <target>/bench-backup/, wiped at the start): a SoftHSM2 instance with three tokens made by
//! softhsm-config/setup-token.sh: `bench-db` (database slot, default_group Bench, its MBK made by
//! `p11shim mbk create`), `bench-db2` (a second database slot on the same store) and `bench-native` (not a
//! database slot), both given bench-db's MBK with `mbk export-shares` / `mbk import-shares`. Users `admin`
//! (10000000, first user, with the SO PIN) and `op` (00000002, group regex `Bench`) in the main store and in
//! the restore store. The restore store and the native token are reset from pristine copies before every
//! restore. Build first: `cargo build --release --lib --bins` (the CLI and libp11shim.so are taken from the
//! target directory of this bench binary).
//!
//! Environment knobs:
//! - BACKUP_BENCH_SIZES=1000,10000,100000: key counts (ascending; the population grows between sizes);
//! - BACKUP_BENCH_RUNS=3: runs per command and size;
//! - BACKUP_BENCH_CREATE=1000: keys made by C_GenerateKey through the shim (the rest are seeded);
//! - BACKUP_BENCH_NATIVE=1000: sizes at which the restore into the native token is measured ("" for none);
//!   BACKUP_BENCH_NATIVE_RUNS=2;
//! - BACKUP_BENCH_PERF=1: also record `perf record -g` of the largest backup, restore and verify into
//!   <target>/bench-backup/perf-*.data (if perf is installed);
//! - SOFTHSM2_MODULE: libsofthsm2.so if it is not in a usual place.
//!
//! Without `--bench` (cargo test --benches) it runs once with 200 keys. The summary is printed at the end and
//! written to <target>/bench-backup/summary.txt.
#![deny(unsafe_op_in_unsafe_fn)]

#[path = "common/api.rs"]
mod api;

use api::softhsm_path;
use p11shim::attrs::{Attr, Template};
use p11shim::backup::format::{BackupReader, BackupWriter, Header, Sealer};
use p11shim::backup::work::Work;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const SO_PIN: &str = "12345678";
const USER_PIN: &str = "123456";
/// The database slot whose keys are backed up.
const DB: &str = "bench-db";
/// A second database slot on the same key store.
const DB2: &str = "bench-db2";
/// A token that is not a database slot: restores make SoftHSM2 token objects.
const NATIVE: &str = "bench-native";
const GROUP: &str = "Bench";
const ADMIN_PASSWORD: &str = "admin-bench-password";
const OP_PASSWORD: &str = "op-bench-password";
/// The seed of the Ed25519 key of `opk`, the same rights as `op` but a signature logon (no argon2).
const OPK_SEED: [u8; 32] = [7; 32];

// -----------------------------------------------------------------------------------------------------------
// Knobs

struct Knobs {
    sizes: Vec<usize>,
    runs: usize,
    create: usize,
    native: Vec<usize>,
    native_runs: usize,
    perf: bool,
}

fn env_list(name: &str, default: &str) -> Vec<usize> {
    let text = std::env::var(name).unwrap_or_else(|_| default.to_string());
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('_', "").parse().unwrap_or_else(|_| panic!("{name}: not a list of numbers: {text:?}")))
        .collect()
}

fn env_num(name: &str, default: usize) -> usize {
    env_list(name, &default.to_string()).first().copied().unwrap_or(default)
}

impl Knobs {
    fn from_env() -> Knobs {
        // `cargo bench` passes --bench; `cargo test --benches` does not: a smoke run then.
        let quick = !std::env::args().any(|a| a == "--bench");
        let (sizes, runs, create, native) =
            if quick { ("200", 1, 200, "200") } else { ("1000,10000,100000", 3, 1000, "1000") };
        let mut sizes = env_list("BACKUP_BENCH_SIZES", sizes);
        sizes.sort_unstable();
        sizes.dedup();
        assert!(!sizes.is_empty() && sizes[0] > 0, "BACKUP_BENCH_SIZES must name sizes > 0");
        Knobs {
            sizes,
            runs: env_num("BACKUP_BENCH_RUNS", runs).max(1),
            create: env_num("BACKUP_BENCH_CREATE", create),
            native: env_list("BACKUP_BENCH_NATIVE", native),
            native_runs: env_num("BACKUP_BENCH_NATIVE_RUNS", 2).max(1),
            perf: std::env::var("BACKUP_BENCH_PERF").is_ok_and(|v| v == "1"),
        }
    }
}

// -----------------------------------------------------------------------------------------------------------
// Paths

/// <target>/<profile>, from <target>/<profile>/deps/backup-<hash>.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("<target>/<profile>/deps/<bench>").to_path_buf()
}

fn scratch_dir() -> PathBuf {
    profile_dir().parent().expect("<target>").join("bench-backup")
}

fn built(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    assert!(path.exists(), "{} is missing: cargo build --release --lib --bins", path.display());
    path
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// -----------------------------------------------------------------------------------------------------------
// Running a command, with its wall time and peak memory

struct Run {
    secs: f64,
    /// Peak resident set of the child, KiB (ru_maxrss).
    rss_kib: u64,
    stdout: String,
}

/// The environment every child gets: one SoftHSM2 instance, one shim config.
#[derive(Clone)]
struct Env {
    softhsm_conf: PathBuf,
    config: PathBuf,
}

impl Env {
    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env("SOFTHSM2_CONF", &self.softhsm_conf)
            .env("P11SHIM_CONFIG", &self.config)
            .env_remove("P11SHIM_MODULE")
            .env("P11SHIM_SO_PIN", SO_PIN)
            .env("P11SHIM_USER_PIN", USER_PIN)
            .env("P11SHIM_PASSWORD_ADMIN", ADMIN_PASSWORD)
            .env("P11SHIM_PASSWORD_OP", OP_PASSWORD)
            .stdin(Stdio::null());
        c
    }
}

/// Runs `c` to the end with stdout and stderr in files under `dir`; panics unless it exits 0.
fn run(mut c: Command, dir: &Path, what: &str) -> Run {
    let out_path = dir.join("last.stdout");
    let err_path = dir.join("last.stderr");
    c.stdout(File::create(&out_path).unwrap()).stderr(File::create(&err_path).unwrap());
    let start = Instant::now();
    let child = c.spawn().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the child is ours and not yet reaped (std::process::Child does not wait on drop).
    let got = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(got, pid, "{what}: wait4: {}", std::io::Error::last_os_error());
    drop(child);
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    assert!(
        ok,
        "{what} failed (wait status {status:#x})\nstdout:\n{}\nstderr:\n{}",
        tail(&stdout),
        tail(&std::fs::read_to_string(&err_path).unwrap_or_default())
    );
    Run { secs, rss_kib: usage.ru_maxrss as u64, stdout }
}

fn tail(s: &str) -> String {
    let lines: Vec<_> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The number in `text` just before `suffix` on a line that starts (after spaces) with `prefix`.
fn number(text: &str, prefix: &str, suffix: &str) -> Option<u64> {
    text.lines().map(str::trim_start).filter(|l| l.starts_with(prefix)).find_map(|l| {
        let at = l.find(suffix)?;
        l[..at].split_whitespace().last()?.parse().ok()
    })
}

// -----------------------------------------------------------------------------------------------------------
// Statistics

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// Timings and peak memory of one command at one size.
#[derive(Default, Clone)]
struct Sample {
    secs: Vec<f64>,
    rss_kib: Vec<u64>,
}

impl Sample {
    fn push(&mut self, r: &Run) {
        self.secs.push(r.secs);
        self.rss_kib.push(r.rss_kib);
    }
    fn median(&self) -> f64 {
        median(&self.secs)
    }
    fn peak_mib(&self) -> f64 {
        self.rss_kib.iter().copied().max().unwrap_or(0) as f64 / 1024.0
    }
}

// -----------------------------------------------------------------------------------------------------------
// The parent: set-up, population, measurement, summary

struct Bench {
    dir: PathBuf,
    main: Env,
    restore: Env,
    cli: PathBuf,
    /// The restore store with its users only, copied over restore.db before each restore.
    restore_pristine: Vec<(PathBuf, PathBuf)>,
    /// The native token's directory and its pristine copy (MBK only).
    native_dir: PathBuf,
    native_pristine: PathBuf,
}

fn setup_token(dir: &Path, label: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(repo().join("softhsm-config/setup-token.sh"))
        .args([&dir.to_string_lossy(), label, SO_PIN, USER_PIN])
        .stderr(Stdio::null())
        .output()
        .expect("run setup-token.sh");
    assert!(out.status.success(), "setup-token.sh {label} failed: {}", String::from_utf8_lossy(&out.stdout));
    dir.join("softhsm2.conf")
}

fn token_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("tokens")).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

fn copy_tree(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status().expect("cp -a");
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

fn config_text(url: &str, slots: &[&str]) -> String {
    let mut s = format!("module = \"{}\"\n[store]\nurl = \"{url}\"\n", softhsm_path().display());
    for slot in slots {
        write!(s, "[[slot]]\ntoken = \"{slot}\"\nstorage = \"database\"\ndefault_group = \"{GROUP}\"\n").unwrap();
    }
    s
}

impl Bench {
    fn setup() -> Bench {
        let dir = scratch_dir();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the scratch dir");
        let hsm = dir.join("hsm");
        setup_token(&hsm, DB);
        setup_token(&hsm, DB2);
        let before = token_dirs(&hsm);
        let softhsm_conf = setup_token(&hsm, NATIVE);
        let native_dir =
            token_dirs(&hsm).into_iter().find(|d| !before.contains(d)).expect("the native token's directory");
        std::fs::write(dir.join("p11shim.toml"), config_text("sqlite:keys.db", &[DB, DB2])).unwrap();
        std::fs::write(dir.join("restore.toml"), config_text("sqlite:restore.db", &[DB])).unwrap();
        let main = Env { softhsm_conf: softhsm_conf.clone(), config: dir.join("p11shim.toml") };
        let restore = Env { softhsm_conf, config: dir.join("restore.toml") };
        let cli = built("p11shim");
        let mut b = Bench {
            dir: dir.clone(),
            main,
            restore,
            cli,
            restore_pristine: Vec::new(),
            native_dir: native_dir.clone(),
            native_pristine: dir.join("native-pristine"),
        };
        let main = b.main.clone();
        b.cli(&main, &["mbk", "create", "--token", DB], "mbk create");
        let shares = dir.join("shares");
        std::fs::create_dir_all(&shares).unwrap();
        let s = shares.to_string_lossy().to_string();
        b.cli(
            &main,
            &["mbk", "export-shares", "--token", DB, "--threshold", "2", "--shares", "2", "--out-dir", &s],
            "mbk export-shares",
        );
        let files: Vec<String> =
            std::fs::read_dir(&shares).unwrap().map(|e| e.unwrap().path().to_string_lossy().to_string()).collect();
        for token in [DB2, NATIVE] {
            let mut args = vec!["mbk", "import-shares", "--token", token];
            args.extend(files.iter().map(String::as_str));
            b.cli(&main, &args, "mbk import-shares");
        }
        let restore = b.restore.clone();
        let key = ed25519_dalek::SigningKey::from_bytes(&OPK_SEED);
        let public = dir.join("opk.pub");
        std::fs::write(dir.join("opk.key"), hex::encode(OPK_SEED)).unwrap();
        std::fs::write(&public, hex::encode(key.verifying_key().to_bytes())).unwrap();
        for env in [&main, &restore] {
            let mut c = env.command(&b.cli);
            c.args(["user", "add", "admin", "--perm", "10000000", "--group-regex", ".*", "--password"])
                .env("P11SHIM_NEW_PASSWORD", ADMIN_PASSWORD);
            run(c, &dir, "user add admin");
            let mut c = env.command(&b.cli);
            c.args(["user", "add", "op", "--perm", "00000002", "--group-regex", GROUP, "--password", "--logon"])
                .arg("admin")
                .env("P11SHIM_NEW_PASSWORD", OP_PASSWORD);
            run(c, &dir, "user add op");
            let mut c = env.command(&b.cli);
            c.args(["user", "add", "opk", "--perm", "00000002", "--group-regex", GROUP, "--sign-key"])
                .arg(&public)
                .args(["--logon", "admin"]);
            run(c, &dir, "user add opk");
        }
        for suffix in ["", "-wal", "-shm"] {
            let live = dir.join(format!("restore.db{suffix}"));
            if live.exists() {
                let copy = dir.join(format!("restore-pristine.db{suffix}"));
                std::fs::copy(&live, &copy).unwrap();
                b.restore_pristine.push((copy, live));
            }
        }
        copy_tree(&native_dir, &b.native_pristine);
        b
    }

    fn cli(&self, env: &Env, args: &[&str], what: &str) -> Run {
        let mut c = env.command(&self.cli);
        c.args(args);
        run(c, &self.dir, what)
    }

    fn reset_restore_store(&self) {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(self.dir.join(format!("restore.db{suffix}")));
        }
        for (copy, live) in &self.restore_pristine {
            std::fs::copy(copy, live).unwrap();
        }
    }

    fn reset_native(&self) {
        copy_tree(&self.native_pristine, &self.native_dir);
    }

    /// `--logon op` (password) or, with `key`, `--logon opk,KEYFILE` (signature).
    fn logon(&self, key: bool) -> String {
        if key {
            format!("opk,{}", self.dir.join("opk.key").display())
        } else {
            "op".into()
        }
    }

    fn backup(&self, out: &Path) -> Run {
        self.backup_as(out, false)
    }

    fn backup_as(&self, out: &Path, key: bool) -> Run {
        let o = out.to_string_lossy();
        let who = self.logon(key);
        // --allow-empty: the fixed cost of a backup is measured with no key.
        let args = ["backup", "--group", GROUP, "--out", &o, "--replace", "--allow-empty", "--logon", &who];
        self.cli(&self.main, &args, "backup")
    }

    fn verify(&self, file: &Path) -> Run {
        self.cli(&self.main, &["verify", &file.to_string_lossy(), "--logon", "op"], "verify")
    }

    /// Restores into the fresh restore store.
    fn restore_fresh(&self, file: &Path) -> Run {
        self.restore_fresh_as(file, false)
    }

    fn restore_fresh_as(&self, file: &Path, key: bool) -> Run {
        self.reset_restore_store();
        let who = self.logon(key);
        self.cli(&self.restore, &["restore", &file.to_string_lossy(), "--logon", &who], "restore into a fresh store")
    }

    fn restore_to(&self, file: &Path, token: &str) -> Run {
        let f = file.to_string_lossy();
        self.cli(&self.main, &["restore", &f, "--token", token, "--logon", "op"], "restore")
    }

    /// This binary again, as a child of one phase.
    fn child(&self, phase: &str, vars: &[(&str, String)]) -> Run {
        let mut c = self.main.command(&std::env::current_exe().unwrap());
        c.env("BACKUP_BENCH_PHASE", phase);
        for (k, v) in vars {
            c.env(k, v);
        }
        run(c, &self.dir, phase)
    }
}

fn result(stdout: &str, key: &str) -> f64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT ")?.strip_prefix(key)?.strip_prefix('=')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no RESULT {key} in:\n{stdout}"))
}

fn expect_count(r: &Run, what: &str, n: usize) -> u64 {
    let got = match what {
        "backup" => number(&r.stdout, "Backup ", " keys under MBK"),
        "added" => number(&r.stdout, "", " were added"),
        "skipped" => number(&r.stdout, "", " were skipped"),
        "verify" => number(&r.stdout, "", " records, every MAC"),
        _ => unreachable!(),
    };
    let got = got.unwrap_or_else(|| panic!("{what}: no count in the output:\n{}", tail(&r.stdout)));
    if n != usize::MAX {
        assert_eq!(got, n as u64, "{what}: expected {n}, the command said {got}:\n{}", tail(&r.stdout));
    }
    got
}

#[derive(Default)]
struct Results {
    /// (operation, N) → sample.
    samples: BTreeMap<(String, usize), Sample>,
    create_rate: f64,
    created: usize,
    seed_rate: f64,
    /// Primitive costs in the HSM, µs.
    prims: BTreeMap<String, f64>,
    file_bytes: BTreeMap<usize, u64>,
    /// Restore into the second database slot of the same store: (N, added, skipped, secs).
    same_store: Option<(usize, u64, u64, f64)>,
    perf: Vec<String>,
}

fn parent(knobs: &Knobs) {
    let started = Instant::now();
    let b = Bench::setup();
    println!("backup bench: set-up done in {:.1} s ({})", started.elapsed().as_secs_f64(), b.dir.display());
    let mut res = Results::default();

    // N = 0: the fixed cost of each command.
    let empty = b.dir.join("backup-0.p11b");
    for _ in 0..knobs.runs {
        let r = b.backup(&empty);
        expect_count(&r, "backup", 0);
        res.samples.entry(("backup".into(), 0)).or_default().push(&r);
        let r = b.verify(&empty);
        res.samples.entry(("verify".into(), 0)).or_default().push(&r);
        let r = b.restore_fresh(&empty);
        res.samples.entry(("restore-db".into(), 0)).or_default().push(&r);
        if !knobs.native.is_empty() {
            b.reset_native();
            let r = b.restore_to(&empty, NATIVE);
            res.samples.entry(("restore-native".into(), 0)).or_default().push(&r);
        }
    }
    memory_pass(&b, &mut res, &empty, 0);
    println!("fixed costs measured ({:.0} s so far)", started.elapsed().as_secs_f64());

    let mut population = 0usize;
    let mut template: Option<PathBuf> = None;
    for &n in &knobs.sizes {
        // Grow the population to n: by C_GenerateKey through the shim first, then seeded.
        let by_create = knobs.create.saturating_sub(res.created).min(n - population);
        if by_create > 0 {
            let r = b.child("create", &[("BACKUP_BENCH_N", by_create.to_string())]);
            res.create_rate = result(&r.stdout, "keys_per_sec");
            res.created += by_create;
            population += by_create;
            println!("created {by_create} keys with C_GenerateKey through the shim: {:.0} keys/s", res.create_rate);
        }
        if population < n {
            let template_file = match &template {
                Some(t) => t.clone(),
                None => {
                    // A backup of the created keys gives the record to copy.
                    assert!(population > 0, "BACKUP_BENCH_CREATE must be at least 1");
                    let t = b.dir.join("template.p11b");
                    b.backup(&t);
                    template = Some(t.clone());
                    t
                }
            };
            let seed = b.dir.join("seed.p11b");
            let r = b.child(
                "seed",
                &[
                    ("BACKUP_BENCH_N", (n - population).to_string()),
                    ("BACKUP_BENCH_TEMPLATE", template_file.to_string_lossy().into()),
                    ("BACKUP_BENCH_OUT", seed.to_string_lossy().into()),
                    ("BACKUP_BENCH_FIRST", population.to_string()),
                ],
            );
            res.seed_rate = result(&r.stdout, "keys_per_sec");
            for key in ["hmac_sign_us", "hmac_verify_us", "unwrap_destroy_us", "gen_wrap_us"] {
                res.prims.insert(key.into(), result(&r.stdout, key));
            }
            let r = b.restore_to(&seed, DB);
            expect_count(&r, "added", n - population);
            println!(
                "seeded {} keys ({:.0} keys/s made, {:.1} s to restore into the store)",
                n - population,
                res.seed_rate,
                r.secs
            );
            let _ = std::fs::remove_file(&seed);
            population = n;
        }

        let file = b.dir.join(format!("backup-{n}.p11b"));
        for run in 0..knobs.runs {
            let r = b.backup(&file);
            expect_count(&r, "backup", n);
            res.samples.entry(("backup".into(), n)).or_default().push(&r);
            let r = b.verify(&file);
            expect_count(&r, "verify", n);
            res.samples.entry(("verify".into(), n)).or_default().push(&r);
            let r = b.restore_fresh(&file);
            expect_count(&r, "added", n);
            res.samples.entry(("restore-db".into(), n)).or_default().push(&r);
            println!(
                "N={n} run {}: backup {:.2} s, verify {:.2} s, restore {:.2} s ({:.0} s so far)",
                run + 1,
                res.samples[&("backup".to_string(), n)].secs[run],
                res.samples[&("verify".to_string(), n)].secs[run],
                r.secs,
                started.elapsed().as_secs_f64()
            );
        }
        memory_pass(&b, &mut res, &file, n);
        res.file_bytes.insert(n, std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0));
        if knobs.native.contains(&n) {
            for _ in 0..knobs.native_runs {
                b.reset_native();
                let r = b.restore_to(&file, NATIVE);
                expect_count(&r, "added", n);
                println!("N={n}: restore into the native token {:.1} s", r.secs);
                res.samples.entry(("restore-native".into(), n)).or_default().push(&r);
            }
            // Again into the full token: every key present, so only restore's one C_FindObjects per record.
            let r = b.restore_to(&file, NATIVE);
            expect_count(&r, "skipped", n);
            println!("N={n}: restore into the native token again (all present) {:.1} s", r.secs);
            res.samples.entry(("restore-native-again".into(), n)).or_default().push(&r);
            b.reset_native();
        }
        if knobs.perf && Some(&n) == knobs.sizes.last() {
            res.perf = perf(&b, &file);
        }
        // Keep only the largest file (for a look afterwards).
        if Some(&n) != knobs.sizes.last() {
            let _ = std::fs::remove_file(&file);
        }
    }
    // Last (its rows are in the group Bench too, so later backups would hold them): the largest backup
    // into the second database slot of the same store.
    let n = *knobs.sizes.last().unwrap();
    let r = b.restore_to(&b.dir.join(format!("backup-{n}.p11b")), DB2);
    let added = expect_count(&r, "added", usize::MAX);
    let skipped = expect_count(&r, "skipped", usize::MAX);
    res.same_store = Some((n, added, skipped, r.secs));
    let table = summary(knobs, &res, started.elapsed().as_secs_f64());
    println!("{table}");
    let path = b.dir.join("summary.txt");
    let _ = std::fs::write(&path, &table);
    println!("(also written to {})", path.display());
}

/// One backup and one restore with the signature logon: their peak memory without argon2's 19 MiB (which
/// the password logon allocates first and frees, so that it hides any growth below it in ru_maxrss).
fn memory_pass(b: &Bench, res: &mut Results, file: &Path, n: usize) {
    let r = b.backup_as(file, true);
    expect_count(&r, "backup", n);
    res.samples.entry(("backup-key".into(), n)).or_default().push(&r);
    let r = b.restore_fresh_as(file, true);
    expect_count(&r, "added", n);
    res.samples.entry(("restore-db-key".into(), n)).or_default().push(&r);
}

/// `perf record -g` of one backup, restore and verify of `file`, if perf is installed.
fn perf(b: &Bench, file: &Path) -> Vec<String> {
    if Command::new("perf").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        return vec!["perf not installed".into()];
    }
    let mut out = Vec::new();
    let f = file.to_string_lossy().to_string();
    let jobs: [(&str, &Env, Vec<&str>); 3] = [
        ("backup", &b.main, vec!["backup", "--group", GROUP, "--out", &f, "--replace", "--logon", "op"]),
        ("verify", &b.main, vec!["verify", &f, "--logon", "op"]),
        ("restore", &b.restore, vec!["restore", &f, "--logon", "op"]),
    ];
    for (name, env, args) in jobs {
        if name == "restore" {
            b.reset_restore_store();
        }
        let data = b.dir.join(format!("perf-{name}.data"));
        let mut c = env.command(Path::new("perf"));
        c.args(["record", "-g", "-o"]).arg(&data).arg("--").arg(&b.cli).args(&args);
        run(c, &b.dir, "perf record");
        out.push(format!("perf report -i {} --no-children", data.display()));
    }
    out
}

fn summary(knobs: &Knobs, res: &Results, total_secs: f64) -> String {
    let mut s = String::new();
    let w = &mut s;
    writeln!(w, "\np11shim per-group backup and restore: summary ({total_secs:.0} s in all)").unwrap();
    writeln!(
        w,
        "SoftHSM2 + SQLite key store; wall clock of the real commands, median of {} runs (min-max); \
         net keys/s = N / (t(N) - t(0)); peak RSS = max ru_maxrss over the runs",
        knobs.runs
    )
    .unwrap();
    let names = [
        ("backup", "backup --group Bench (export)"),
        ("restore-db", "restore into a database slot (fresh store: rows inserted)"),
        ("restore-native", "restore into a native slot (SoftHSM2 token objects)"),
        ("restore-native-again", "the same restore again into the native slot (all present: skipped; finds only)"),
        ("verify", "verify (MACs + every secret unwrapped as a session object)"),
    ];
    for (op, title) in names {
        let sizes: Vec<usize> = res.samples.keys().filter(|(o, _)| o == op).map(|(_, n)| *n).collect();
        if sizes.is_empty() {
            continue;
        }
        writeln!(w, "\n{title}").unwrap();
        writeln!(
            w,
            "{:>8} {:>22} {:>10} {:>10} {:>9} {:>12}",
            "keys", "seconds (min-max)", "keys/s", "net keys/s", "µs/key", "peak RSS MiB"
        )
        .unwrap();
        let fixed_op = if op == "restore-native-again" { "restore-native" } else { op };
        let fixed = res.samples.get(&(fixed_op.to_string(), 0)).map(Sample::median).unwrap_or(0.0);
        for n in sizes {
            let sm = &res.samples[&(op.to_string(), n)];
            let t = sm.median();
            let range = format!("{:.3} ({:.3}-{:.3})", t, min(&sm.secs), max(&sm.secs));
            let (rate, net, per) = if n == 0 {
                ("fixed".to_string(), String::new(), String::new())
            } else {
                let net_t = (t - fixed).max(1e-9);
                (
                    format!("{:.0}", n as f64 / t),
                    format!("{:.0}", n as f64 / net_t),
                    format!("{:.1}", net_t / n as f64 * 1e6),
                )
            };
            writeln!(w, "{n:>8} {range:>22} {rate:>10} {net:>10} {per:>9} {:>12.1}", sm.peak_mib()).unwrap();
        }
    }
    writeln!(
        w,
        "\nPeak RSS (MiB) of the commands; \"key logon\": one run with `--logon opk,KEYFILE` (Ed25519), without \
         the\n19 MiB argon2 buffer of a password logon, which is freed before the keys are read and so hides \
         growth below it"
    )
    .unwrap();
    writeln!(
        w,
        "{:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "keys", "backup", "(key)", "restore", "(key)", "native", "verify"
    )
    .unwrap();
    let mut sizes: Vec<usize> = res.samples.keys().map(|(_, n)| *n).collect();
    sizes.sort_unstable();
    sizes.dedup();
    for n in sizes {
        let cell = |op: &str| {
            res.samples.get(&(op.to_string(), n)).map(|s| format!("{:.1}", s.peak_mib())).unwrap_or("-".into())
        };
        writeln!(
            w,
            "{n:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            cell("backup"),
            cell("backup-key"),
            cell("restore-db"),
            cell("restore-db-key"),
            cell("restore-native"),
            cell("verify")
        )
        .unwrap();
    }
    if let (Some(pw), Some(key)) = (res.samples.get(&("backup".into(), 0)), res.samples.get(&("backup-key".into(), 0)))
    {
        writeln!(
            w,
            "\nFixed cost of an empty backup: {:.3} s with the password logon (median), {:.3} s with the key logon \
             (one run); verify (password logon): {:.3} s",
            pw.median(),
            key.median(),
            res.samples.get(&("verify".into(), 0)).map(Sample::median).unwrap_or(0.0)
        )
        .unwrap();
    }
    writeln!(w, "\nKey creation").unwrap();
    writeln!(
        w,
        "  C_GenerateKey AES-256 CKA_TOKEN=true through the shim (one SQLite transaction + fsync each): \
         {:.0} keys/s ({} keys)",
        res.create_rate, res.created
    )
    .unwrap();
    if res.seed_rate > 0.0 {
        writeln!(w, "  seeded records (generate + C_WrapKey under the MBK + HMAC seal): {:.0} keys/s", res.seed_rate)
            .unwrap();
    }
    if !res.prims.is_empty() {
        writeln!(w, "\nHSM operations alone (SoftHSM2, same token and session kind as the commands), µs each").unwrap();
        for (k, v) in &res.prims {
            writeln!(w, "  {k:<20} {v:>8.1}").unwrap();
        }
    }
    if let Some((n, added, skipped, secs)) = res.same_store {
        writeln!(
            w,
            "\nRestore of the {n}-key backup into a second database slot ({DB2}) of the same store: \
             {added} added, {skipped} skipped as present, {secs:.2} s"
        )
        .unwrap();
    }
    if !res.file_bytes.is_empty() {
        writeln!(w, "\nBackup file size").unwrap();
        for (n, bytes) in &res.file_bytes {
            writeln!(
                w,
                "  {n:>8} keys: {:.1} MiB ({:.0} bytes/key)",
                *bytes as f64 / 1048576.0,
                *bytes as f64 / *n as f64
            )
            .unwrap();
        }
    }
    for p in &res.perf {
        writeln!(w, "  {p}").unwrap();
    }
    s
}

// -----------------------------------------------------------------------------------------------------------
// Children

/// Makes BACKUP_BENCH_N stored AES-256 keys with C_GenerateKey (CKA_TOKEN=true) through libp11shim.so.
fn child_create() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::Attribute;
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    let n = env_num("BACKUP_BENCH_N", 0);
    let p = Pkcs11::new(built("libp11shim.so")).expect("load the shim");
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("C_Initialize through the shim");
    let slot = p
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|&s| p.get_token_info(s).map(|i| i.label() == DB).unwrap_or(false))
        .expect("the database slot");
    let s = p.open_rw_session(slot).expect("C_OpenSession");
    s.login(UserType::User, Some(&AuthPin::new(USER_PIN.into()))).expect("C_Login");
    let start = Instant::now();
    for i in 0..n {
        s.generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::ValueLen(32.into()),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Label(format!("created-{i:06}").into_bytes()),
                Attribute::Id(format!("{i:06}").into_bytes()),
            ],
        )
        .expect("C_GenerateKey");
    }
    let secs = start.elapsed().as_secs_f64();
    println!("RESULT keys_per_sec={}", n as f64 / secs);
    drop(s);
    p.finalize().expect("C_Finalize");
}

/// Writes a backup file of BACKUP_BENCH_N fresh AES-256 keys, each generated in SoftHSM2 and wrapped under
/// the MBK (C_WrapKey), with the attributes of the first record of BACKUP_BENCH_TEMPLATE (a key the shim
/// made) under a new id, label and CKA_ID. Also times the HSM operations the commands are made of.
fn child_seed() {
    use cryptoki_sys::*;
    use p11shim::hsm::Mechanism;
    let n = env_num("BACKUP_BENCH_N", 0);
    let first = env_num("BACKUP_BENCH_FIRST", 0);
    let template = PathBuf::from(std::env::var("BACKUP_BENCH_TEMPLATE").unwrap());
    let out = PathBuf::from(std::env::var("BACKUP_BENCH_OUT").unwrap());
    let config = p11shim::config::Config::from_env().expect("the config");
    let pin = p11shim::admin::Pin(zeroize::Zeroizing::new(USER_PIN.as_bytes().to_vec()));
    let work = Work::open(&config, DB, &pin).expect("open the token");
    let sealer = work.sealer();
    let model = {
        let mut r = BackupReader::open(&template).expect("open the template backup");
        r.next_record(&sealer).expect("read the template").expect("the template has a record").1
    };
    let model_attrs = Template::decode(&model.attrs).expect("the template's attributes");
    let t = &work.token;
    let gen = Template(vec![
        Attr::bool(CKA_TOKEN, false),
        Attr::ulong(CKA_VALUE_LEN, 32),
        Attr::bool(CKA_EXTRACTABLE, true),
        Attr::bool(CKA_SENSITIVE, true),
    ]);
    let aes = Mechanism::plain(CKM_AES_KEY_GEN);
    let mut nonce = [0u8; 4];
    getrandom::fill(&mut nonce).unwrap();
    let header = Header::new(work.set.fingerprint.clone(), "1970-01-01T00:00:00Z", "bench seed", GROUP);
    let mut writer = BackupWriter::create_with(&out, header, true).expect("create the seed file");
    let start = Instant::now();
    let mut last = model.clone();
    for i in 0..n {
        let k = first + i;
        let h = t.backend.generate_key(t.session, &aes, &gen).expect("generate");
        let wrapped = t.backend.wrap_key(t.session, &work.set.wrap_mechanism(), work.set.mbk, h).expect("wrap");
        t.backend.destroy_object(t.session, h).expect("destroy");
        let label = format!("seeded-{k:07}").into_bytes();
        let ckid = format!("{k:07}").into_bytes();
        let mut attrs = model_attrs.clone();
        attrs.set(Attr::bytes(CKA_LABEL, &label));
        attrs.set(Attr::bytes(CKA_ID, &ckid));
        let record = p11shim::backup::format::Record {
            id: format!("{}{:024x}", hex::encode(nonce), k),
            label,
            ckid,
            attrs: attrs.encode(),
            wrapped,
            ..model.clone()
        };
        writer.write(&record, &sealer).expect("write a record");
        last = record;
    }
    writer.finish(&sealer).expect("finish the seed file");
    println!("RESULT keys_per_sec={}", n as f64 / start.elapsed().as_secs_f64());

    // The HSM operations the commands are made of, alone.
    let iters = 2000;
    let data = last.mac_input();
    let start = Instant::now();
    let mut mac = Vec::new();
    for _ in 0..iters {
        mac = sealer.seal(&data).unwrap();
    }
    println!("RESULT hmac_sign_us={}", start.elapsed().as_secs_f64() / iters as f64 * 1e6);
    let start = Instant::now();
    for _ in 0..iters {
        assert!(sealer.check(&data, &mac).unwrap());
    }
    println!("RESULT hmac_verify_us={}", start.elapsed().as_secs_f64() / iters as f64 * 1e6);
    let start = Instant::now();
    for _ in 0..iters {
        let h = p11shim::backup::import::make(&work, &last, false).expect("unwrap");
        t.backend.destroy_object(t.session, h).unwrap();
    }
    println!("RESULT unwrap_destroy_us={}", start.elapsed().as_secs_f64() / iters as f64 * 1e6);
    let start = Instant::now();
    for _ in 0..iters {
        let h = t.backend.generate_key(t.session, &aes, &gen).unwrap();
        t.backend.wrap_key(t.session, &work.set.wrap_mechanism(), work.set.mbk, h).unwrap();
        t.backend.destroy_object(t.session, h).unwrap();
    }
    println!("RESULT gen_wrap_us={}", start.elapsed().as_secs_f64() / iters as f64 * 1e6);
}

fn main() {
    match std::env::var("BACKUP_BENCH_PHASE").as_deref() {
        Ok("create") => child_create(),
        Ok("seed") => child_seed(),
        _ => parent(&Knobs::from_env()),
    }
}
