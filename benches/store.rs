//! What keeping token objects in the key store costs: stored keys used through the shim against
//! SoftHSM2's own keys used directly, with the real SoftHSM2 and the real key store (SQLite, and PostgreSQL).
//!
//! `cargo bench --bench store` measures, for each engine:
//! 1. warm use: C_SignInit+C_Sign / C_EncryptInit+C_Encrypt with a stored key that is already loaded (through
//!    the shim) against a native SoftHSM2 session key of the same kind (called directly), and the same
//!    native key through the shim (forwarding only); plus `KeyStore::generation()` and `KeyStore::get()`
//!    alone;
//! 2. first use: C_EncryptInit+C_Encrypt on a stored key that is not loaded, against a native C_UnwrapKey of
//!    an AES-256 key with CKM_AES_KEY_WRAP_PAD; twice: (a) in a fresh process, where the handle comes from a
//!    find by label (which reads the row) and the first use checks the row's MAC in the HSM and unwraps the
//!    key under the MBK; (b) in the process that made the keys, after C_Logout+C_Login (not timed), where
//!    the shim holds each row and knows its MAC: the first use is the unwrap;
//! 3. C_FindObjects by label (Init + FindObjects + Final, one match) with 1k, 10k and 100k stored keys in the
//!    slot, against SoftHSM2's file token store holding as many token objects;
//! 4. creating stored AES keys through the shim (C_GenerateKey, CKA_TOKEN=true): keys per second, against
//!    SoftHSM2 creating token objects;
//! 5. the creation paths where the shim makes a key twice (as asked, to read the backend's answers, then as
//!    the twin it wraps): C_UnwrapKey into a stored key against the same native unwrap, and the first
//!    C_GenerateKey of a request shape against a second of that shape and a native generation.
//! 6. C_FindObjects by label as a process uses more and more stored keys (0, 100, 1,000 and 10,000 of a
//!    population of 10,000): each key used is loaded into the HSM, which keeps at most `[store] hsm_cache`
//!    of them (the default, "bounded"), against no bound ("unbounded", up to 1,000 used); on SoftHSM2 and on
//!    the CryptoServer simulator (libcssim.so) with its device MBK and without it (an MBK set), SQLite; in
//!    processes of their own (phase `cache`).
//!
//! Each engine (and SoftHSM2's own token store) runs in a child process of this one (this binary started
//! again with STORE_BENCH_PHASE set), with a SoftHSM2 token directory of its own: one shim configuration
//! names one key store, and SoftHSM2 loads every object of a token directory at C_Initialize. In a child,
//! SoftHSM2 is initialized directly first, then the shim, which accepts CKR_CRYPTOKI_ALREADY_INITIALIZED: one
//! SoftHSM2 instance, so native and stored keys are measured in the same process, in alternating rounds.
//! The parent prints a summary table of all phases (also written to target/bench-store/summary.txt).
//!
//! Set-up (under target/bench-store/, wiped at the start): tokens made with softhsm-config/setup-token.sh,
//! the MBK with `target/release/p11shim mbk create`, the shim is target/release/libp11shim.so (build both
//! first: `cargo build --release --workspace --lib --bins`; item 6 also loads the simulator, libcssim.so). PostgreSQL: the server named by P11SHIM_BENCH_PG_URL (rows
//! of the token `p11shim-bench` are deleted before and after), else a throwaway cluster started with
//! scripts/pg-cluster.sh and stopped at the end.
//!
//! Environment knobs:
//! - STORE_BENCH_SIZES=1000,10000,100000: key counts at which finds are measured (item 3);
//! - STORE_BENCH_CREATE=10000: keys created for the creation rate (item 4; the population of item 3 grows
//!   from these);
//! - STORE_BENCH_ENGINES=sqlite,postgres,softhsm,cache: which phases run;
//! - STORE_BENCH_CACHE_USED=0,100,1000,10000: the numbers of used keys at which item 6 finds (the last is
//!   the population);
//! - STORE_BENCH_SOFTHSM_BUDGET=360: seconds SoftHSM2 may spend creating token objects; it stops at the
//!   next batch boundary after that, and the sizes it did not reach are reported as not measured;
//! - STORE_BENCH_FIRST_KEYS=100, STORE_BENCH_FIRST_ROUNDS=10: stored keys and log-in rounds of item 2;
//! - STORE_BENCH_CRITERION=0: skip the criterion groups (only the summary);
//! - SOFTHSM2_MODULE: libsofthsm2.so if it is not in a usual place.
//!
//! Criterion arguments work as usual (filters apply to the criterion groups; the summary always runs).
//! Without `--bench` (cargo test --benches) every phase runs once with a few hundred keys.
#![deny(unsafe_op_in_unsafe_fn)]

#[macro_use]
#[path = "common/api.rs"]
mod api;

use api::{attr, load, ok, softhsm_path, Api, NO, YES};
use criterion::{black_box, BenchmarkId, Criterion};
use cryptoki_sys::*;
use p11shim::store;
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

const SO_PIN: &str = "12345678";
const USER_PIN: &str = "123456";
/// The token of native session keys (items 1 and 2).
const PLAIN: &str = "plain";
/// The database slot's token (stored keys).
const DB: &str = "p11shim-bench";
/// The token of SoftHSM2's own token objects (items 3 and 4, phase softhsm).
const NATIVE: &str = "native";
/// prime256v1 (1.2.840.10045.3.1.7), DER.
const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// Keys are created and timed in batches of this many (fewer when a size is smaller).
const BATCH: usize = 1000;

// -----------------------------------------------------------------------------------------------------------
// Calling a module

impl Api {
    fn generate_key(self, s: CK_SESSION_HANDLE, mechanism: CK_MECHANISM_TYPE, t: &mut [CK_ATTRIBUTE]) -> CK_ULONG {
        let mut m = CK_MECHANISM { mechanism, pParameter: null_mut(), ulParameterLen: 0 };
        let mut key = 0;
        ok(call!(self, C_GenerateKey(s, &mut m, t.as_mut_ptr(), t.len() as CK_ULONG, &mut key)), "C_GenerateKey");
        key
    }

    /// An AES-256 key: a token object when `token` (a stored key on a database slot), labelled `label`.
    fn aes_key(self, s: CK_SESSION_HANDLE, token: bool, label: &[u8]) -> CK_OBJECT_HANDLE {
        let len: CK_ULONG = 32;
        let tok = if token { YES } else { NO };
        let mut t = [
            attr(CKA_TOKEN, &tok),
            attr(CKA_LABEL, label),
            attr(CKA_VALUE_LEN, &len),
            attr(CKA_ENCRYPT, &YES),
            attr(CKA_DECRYPT, &YES),
            attr(CKA_SENSITIVE, &YES),
        ];
        self.generate_key(s, CKM_AES_KEY_GEN, &mut t)
    }

    /// A 32-byte generic secret for HMAC.
    fn hmac_key(self, s: CK_SESSION_HANDLE, token: bool) -> CK_OBJECT_HANDLE {
        let len: CK_ULONG = 32;
        let tok = if token { YES } else { NO };
        let mut t = [
            attr(CKA_TOKEN, &tok),
            attr(CKA_LABEL, b"hmac".as_slice()),
            attr(CKA_VALUE_LEN, &len),
            attr(CKA_SIGN, &YES),
            attr(CKA_VERIFY, &YES),
            attr(CKA_SENSITIVE, &YES),
        ];
        self.generate_key(s, CKM_GENERIC_SECRET_KEY_GEN, &mut t)
    }

    /// An EC P-256 key pair; returns the private key (a token object when `token`).
    fn ec_key(self, s: CK_SESSION_HANDLE, token: bool) -> CK_OBJECT_HANDLE {
        let tok = if token { YES } else { NO };
        let mut public = [
            attr(CKA_TOKEN, &tok),
            attr(CKA_VERIFY, &YES),
            attr(CKA_EC_PARAMS, &P256),
            attr(CKA_LABEL, b"ec".as_slice()),
        ];
        let mut private = [
            attr(CKA_TOKEN, &tok),
            attr(CKA_PRIVATE, &YES),
            attr(CKA_SENSITIVE, &YES),
            attr(CKA_SIGN, &YES),
            attr(CKA_LABEL, b"ec".as_slice()),
        ];
        let mut m = CK_MECHANISM { mechanism: CKM_EC_KEY_PAIR_GEN, pParameter: null_mut(), ulParameterLen: 0 };
        let (mut pub_key, mut priv_key) = (0, 0);
        let rv = call!(
            self,
            C_GenerateKeyPair(
                s,
                &mut m,
                public.as_mut_ptr(),
                public.len() as CK_ULONG,
                private.as_mut_ptr(),
                private.len() as CK_ULONG,
                &mut pub_key,
                &mut priv_key
            )
        );
        ok(rv, "C_GenerateKeyPair(EC P-256)");
        priv_key
    }

    /// Find by label: Init, one FindObjects, Final; the number of objects found.
    fn find_label(self, s: CK_SESSION_HANDLE, label: &[u8]) -> usize {
        self.find_handles(s, label).len()
    }

    /// Find by label: Init, one FindObjects, Final; the handles found (up to 4).
    fn find_handles(self, s: CK_SESSION_HANDLE, label: &[u8]) -> Vec<CK_OBJECT_HANDLE> {
        let mut t = [attr(CKA_LABEL, label)];
        ok(call!(self, C_FindObjectsInit(s, t.as_mut_ptr(), 1)), "C_FindObjectsInit");
        let mut found = [0 as CK_OBJECT_HANDLE; 4];
        let mut n: CK_ULONG = 0;
        ok(call!(self, C_FindObjects(s, found.as_mut_ptr(), found.len() as CK_ULONG, &mut n)), "C_FindObjects");
        ok(call!(self, C_FindObjectsFinal(s)), "C_FindObjectsFinal");
        black_box(&found);
        found[..n as usize].to_vec()
    }
}

// -----------------------------------------------------------------------------------------------------------
// The operations of item 1

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    AesEcb16,
    AesCbc1k,
    Hmac1k,
    Ecdsa,
}

impl Op {
    const ALL: [Op; 4] = [Op::AesEcb16, Op::AesCbc1k, Op::Hmac1k, Op::Ecdsa];

    fn name(self) -> &'static str {
        match self {
            Op::AesEcb16 => "AES-256-ECB encrypt 16 B",
            Op::AesCbc1k => "AES-256-CBC encrypt 1 KiB",
            Op::Hmac1k => "HMAC-SHA256 sign 1 KiB",
            Op::Ecdsa => "ECDSA P-256 sign 32 B",
        }
    }

    fn id(self) -> &'static str {
        match self {
            Op::AesEcb16 => "aes_ecb_16",
            Op::AesCbc1k => "aes_cbc_1k",
            Op::Hmac1k => "hmac_sha256_1k",
            Op::Ecdsa => "ecdsa_p256_sign",
        }
    }
}

/// One key per operation kind.
#[derive(Clone, Copy)]
struct Keys {
    aes: CK_OBJECT_HANDLE,
    hmac: CK_OBJECT_HANDLE,
    ec: CK_OBJECT_HANDLE,
}

impl Keys {
    fn make(api: Api, s: CK_SESSION_HANDLE, token: bool) -> Keys {
        Keys { aes: api.aes_key(s, token, b"aes"), hmac: api.hmac_key(s, token), ec: api.ec_key(s, token) }
    }

    fn for_op(&self, op: Op) -> CK_OBJECT_HANDLE {
        match op {
            Op::AesEcb16 | Op::AesCbc1k => self.aes,
            Op::Hmac1k => self.hmac,
            Op::Ecdsa => self.ec,
        }
    }
}

/// One way of running the operations: a module, a session of it, and the keys.
#[derive(Clone, Copy)]
struct Path3 {
    api: Api,
    session: CK_SESSION_HANDLE,
    keys: Keys,
}

#[inline(always)]
fn run_op(p: Path3, op: Op) {
    let key = p.keys.for_op(op);
    match op {
        Op::AesEcb16 => crypt(p.api, p.session, CKM_AES_ECB, &mut [], key, &[0x11; 16], &mut [0; 16]),
        Op::AesCbc1k => crypt(p.api, p.session, CKM_AES_CBC, &mut [7; 16], key, &[0x22; 1024], &mut [0; 1024]),
        Op::Hmac1k => sign(p.api, p.session, CKM_SHA256_HMAC, key, &[0xa5; 1024], &mut [0; 32]),
        Op::Ecdsa => sign(p.api, p.session, CKM_ECDSA, key, &[0x5a; 32], &mut [0; 64]),
    }
}

fn crypt(
    api: Api,
    s: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_TYPE,
    param: &mut [u8],
    key: CK_OBJECT_HANDLE,
    data: &[u8],
    out: &mut [u8],
) {
    let mut m = CK_MECHANISM {
        mechanism,
        pParameter: if param.is_empty() { null_mut() } else { param.as_mut_ptr() as *mut c_void },
        ulParameterLen: param.len() as CK_ULONG,
    };
    ok(call!(api, C_EncryptInit(s, &mut m, key)), "C_EncryptInit");
    let mut len = out.len() as CK_ULONG;
    let rv = call!(
        api,
        C_Encrypt(s, black_box(data.as_ptr()) as *mut u8, data.len() as CK_ULONG, out.as_mut_ptr(), &mut len)
    );
    ok(rv, "C_Encrypt");
    black_box(&out[..len as usize]);
}

fn sign(
    api: Api,
    s: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_TYPE,
    key: CK_OBJECT_HANDLE,
    data: &[u8],
    out: &mut [u8],
) {
    let mut m = CK_MECHANISM { mechanism, pParameter: null_mut(), ulParameterLen: 0 };
    ok(call!(api, C_SignInit(s, &mut m, key)), "C_SignInit");
    let mut len = out.len() as CK_ULONG;
    let rv =
        call!(api, C_Sign(s, black_box(data.as_ptr()) as *mut u8, data.len() as CK_ULONG, out.as_mut_ptr(), &mut len));
    ok(rv, "C_Sign");
    black_box(&out[..len as usize]);
}

fn verify(api: Api, s: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE, data: &[u8], mac: &[u8]) {
    let mut m = CK_MECHANISM { mechanism: CKM_SHA256_HMAC, pParameter: null_mut(), ulParameterLen: 0 };
    ok(call!(api, C_VerifyInit(s, &mut m, key)), "C_VerifyInit");
    let rv = call!(
        api,
        C_Verify(s, data.as_ptr() as *mut u8, data.len() as CK_ULONG, mac.as_ptr() as *mut u8, mac.len() as CK_ULONG)
    );
    ok(rv, "C_Verify");
}

fn time_ops(p: Path3, op: Op, iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        run_op(p, op);
    }
    start.elapsed()
}

// -----------------------------------------------------------------------------------------------------------
// Statistics and results

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// The `q` quantile (0..=1) by nearest rank.
fn quantile(v: &[f64], q: f64) -> f64 {
    let v = sorted(v);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn median(v: &[f64]) -> f64 {
    quantile(v, 0.5)
}

/// Named figures of one phase: written by the child as `key value` lines, read back by the parent.
#[derive(Default)]
struct Results {
    map: BTreeMap<String, f64>,
    file: Option<PathBuf>,
}

impl Results {
    fn set(&mut self, key: impl Into<String>, value: f64) {
        self.map.insert(key.into(), value);
        self.save();
    }

    /// Median, 10th and 90th percentiles and count of `samples` under `key`.
    fn spread(&mut self, key: &str, samples: &[f64]) {
        self.map.insert(format!("{key}.median"), median(samples));
        self.map.insert(format!("{key}.p10"), quantile(samples, 0.1));
        self.map.insert(format!("{key}.p90"), quantile(samples, 0.9));
        self.set(format!("{key}.n"), samples.len() as f64);
    }

    /// Written after every figure, so that what was measured before a failure is kept.
    fn save(&self) {
        if let Some(file) = &self.file {
            let text: String = self.map.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
            std::fs::write(file, text).expect("write the results file");
        }
    }

    fn load(file: &Path, prefix: &str, into: &mut BTreeMap<String, f64>) {
        let Ok(text) = std::fs::read_to_string(file) else { return };
        for line in text.lines() {
            if let Some((k, v)) = line.split_once(' ') {
                if let Ok(v) = v.parse() {
                    into.insert(format!("{prefix}.{k}"), v);
                }
            }
        }
    }
}

/// A small deterministic generator for the labels to find.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

// -----------------------------------------------------------------------------------------------------------
// Knobs

#[derive(Clone)]
struct Knobs {
    bench_mode: bool,
    sizes: Vec<usize>,
    create: usize,
    phases: Vec<String>,
    softhsm_max: usize,
    softhsm_budget: Duration,
    first_keys: usize,
    first_rounds: usize,
    criterion: bool,
    /// Item 6: used keys at which finds are timed (ascending, from 0; the last is the population).
    cache_used: Vec<usize>,
}

fn env_num(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// A comma-separated list of numbers from the environment variable `name` (else `default`), ascending, each once.
fn numbers(name: &str, default: &str) -> Vec<usize> {
    let text = std::env::var(name).unwrap_or_else(|_| default.into());
    let mut list: Vec<usize> = text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap_or_else(|_| panic!("{name}: {s:?} is not a number")))
        .collect();
    list.sort_unstable();
    list.dedup();
    list
}

impl Knobs {
    fn from_env() -> Knobs {
        let bench_mode = std::env::args().any(|a| a == "--bench");
        // Under `cargo test --benches` (no --bench): every phase once, small.
        let (sizes, create, first_keys, first_rounds) =
            if bench_mode { ("1000,10000,100000", 10_000, 100, 10) } else { ("200", 200, 10, 2) };
        let sizes = numbers("STORE_BENCH_SIZES", sizes);
        assert!(sizes.iter().all(|&n| n > 0), "STORE_BENCH_SIZES must be positive");
        let phases = std::env::var("STORE_BENCH_ENGINES").unwrap_or_else(|_| "sqlite,postgres,softhsm,cache".into());
        let phases: Vec<String> = phases.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        for p in &phases {
            assert!(
                ["sqlite", "postgres", "softhsm", "cache"].contains(&p.as_str()),
                "unknown phase {p:?} in STORE_BENCH_ENGINES"
            );
        }
        let used = if bench_mode { "0,100,1000,10000" } else { "0,20,60" };
        let mut cache_used = numbers("STORE_BENCH_CACHE_USED", used);
        if cache_used.first() != Some(&0) {
            cache_used.insert(0, 0);
        }
        assert!(cache_used.len() > 1, "STORE_BENCH_CACHE_USED needs a positive number of keys");
        Knobs {
            bench_mode,
            sizes,
            cache_used,
            create: env_num("STORE_BENCH_CREATE", create),
            phases,
            softhsm_max: env_num("STORE_BENCH_SOFTHSM_MAX", 10_000),
            softhsm_budget: Duration::from_secs(env_num("STORE_BENCH_SOFTHSM_BUDGET", 900) as u64),
            first_keys: env_num("STORE_BENCH_FIRST_KEYS", first_keys).max(1),
            first_rounds: env_num("STORE_BENCH_FIRST_ROUNDS", first_rounds).max(1),
            criterion: std::env::var("STORE_BENCH_CRITERION").map_or(true, |v| v != "0"),
        }
    }

    /// The population a key-creating phase builds: every find size, and the creation count.
    fn population(&self) -> usize {
        self.sizes.iter().copied().max().unwrap_or(0).max(self.create)
    }

    fn criterion(&self) -> Criterion {
        Criterion::default()
            .measurement_time(Duration::from_secs(3))
            .warm_up_time(Duration::from_secs(1))
            .sample_size(30)
            .without_plots()
            .configure_from_args()
    }
}

// -----------------------------------------------------------------------------------------------------------
// Paths and set-up

/// <target>/<profile>, from <target>/<profile>/deps/store-<hash>.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("<target>/<profile>/deps/<bench>").to_path_buf()
}

fn scratch_dir() -> PathBuf {
    profile_dir().parent().expect("<target>").join("bench-store")
}

fn shim_path() -> PathBuf {
    let path = profile_dir().join("libp11shim.so");
    assert!(path.exists(), "{} is missing: cargo build --release --lib --bins", path.display());
    path
}

fn cli_path() -> PathBuf {
    let path = profile_dir().join("p11shim");
    assert!(path.exists(), "{} is missing: cargo build --release --lib --bins", path.display());
    path
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `dir/softhsm2.conf` with `labels` initialized (softhsm-config/setup-token.sh); returns the conf path.
fn make_tokens(dir: &Path, labels: &[&str]) -> PathBuf {
    for label in labels {
        let out = Command::new("bash")
            .arg(repo().join("softhsm-config/setup-token.sh"))
            .args([&dir.to_string_lossy(), *label, SO_PIN, USER_PIN])
            .stderr(Stdio::null())
            .output()
            .expect("run setup-token.sh");
        assert!(out.status.success(), "setup-token.sh {label} failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    dir.join("softhsm2.conf")
}

/// Writes a shim configuration at `path`: `module`, the store at `url` with the `[store]` lines `store_extra`,
/// and the database slot `DB`.
fn write_config(path: &Path, module: &Path, url: &str, store_extra: &str) {
    let text = format!(
        "module = \"{}\"\nlog_file = \"shim.log\"\nlog_level = \"warn\"\n[store]\nurl = \"{url}\"\n{store_extra}\
         [[slot]]\ntoken = \"{DB}\"\nstorage = \"database\"\ndefault_group = \"bench\"\n",
        module.display()
    );
    std::fs::write(path, text).expect("write p11shim.toml");
}

/// `p11shim mbk create` for the token `DB`, with the configuration `config` and the backend's own variable.
fn mbk_create(backend_env: (&str, &Path), config: &Path) {
    let out = Command::new(cli_path())
        .args(["mbk", "create", "--token", DB])
        .env(backend_env.0, backend_env.1)
        .env("P11SHIM_CONFIG", config)
        .env_remove("P11SHIM_MODULE")
        .env("P11SHIM_SO_PIN", SO_PIN)
        .env("P11SHIM_USER_PIN", USER_PIN)
        .output()
        .expect("run p11shim mbk create");
    assert!(out.status.success(), "p11shim mbk create: {}", String::from_utf8_lossy(&out.stderr));
}

/// A throwaway PostgreSQL cluster (scripts/pg-cluster.sh), stopped and removed when dropped.
struct PgCluster {
    dir: PathBuf,
}

impl PgCluster {
    fn start() -> (PgCluster, String) {
        // Short: the server's unix socket lives in this directory.
        let dir = std::env::temp_dir().join(format!("p11shim-bench-pg-{}", std::process::id()));
        let out = Command::new("bash")
            .arg(repo().join("scripts/pg-cluster.sh"))
            .arg("start")
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .expect("run pg-cluster.sh");
        let cluster = PgCluster { dir };
        assert!(
            out.status.success(),
            "pg-cluster.sh start failed (install postgresql, or set P11SHIM_BENCH_PG_URL): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (cluster, String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("scripts/pg-cluster.sh"))
            .arg("stop")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output();
    }
}

/// Deletes the benchmark token's rows from a PostgreSQL key store that is not ours to throw away.
fn clear_pg_rows(url: &str) {
    if let Ok(mut client) = postgres::Client::connect(url, postgres::NoTls) {
        // The table does not exist before the shim first opened this database: nothing to clear then.
        let _ = client.execute("DELETE FROM keys WHERE token = $1", &[&DB]);
    }
}

/// Sets the PostgreSQL server's durability settings (our own throwaway cluster only: scripts/pg-cluster.sh
/// starts it with fsync and synchronous_commit off). `durable`: every commit is flushed to disk, as SQLite's
/// synchronous=FULL does, so that creation rates compare.
fn pg_durability(url: &str, durable: bool) {
    let mut client = postgres::Client::connect(url, postgres::NoTls).expect("connect to PostgreSQL");
    let v = if durable { "on" } else { "off" };
    for setting in ["fsync", "synchronous_commit", "full_page_writes"] {
        client.batch_execute(&format!("ALTER SYSTEM SET {setting} = {v}")).expect("ALTER SYSTEM");
    }
    client.batch_execute("SELECT pg_reload_conf()").expect("pg_reload_conf");
    // The reload is asynchronous: wait until this connection sees it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let fsync: String = client.query_one("SHOW fsync", &[]).expect("SHOW fsync").get(0);
        if fsync == v {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the server flushes commits: 1 when fsync and synchronous_commit are both on.
fn pg_is_durable(url: &str) -> Option<f64> {
    let mut client = postgres::Client::connect(url, postgres::NoTls).ok()?;
    let mut on = |name: &str| -> Option<bool> {
        let v: String = client.query_one(&format!("SHOW {name}"), &[]).ok()?.get(0);
        Some(v == "on")
    };
    Some(if on("fsync")? && on("synchronous_commit")? { 1.0 } else { 0.0 })
}

// -----------------------------------------------------------------------------------------------------------
// The parent: set-up, one child per phase, the summary

fn parent(knobs: &Knobs) {
    let root = scratch_dir();
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("create the scratch dir");
    let started = Instant::now();
    let mut all = BTreeMap::new();
    let mut failures = Vec::new();
    for phase in &knobs.phases {
        let dir = root.join(phase);
        std::fs::create_dir_all(&dir).unwrap();
        let mut url = String::new();
        let mut cluster = None;
        let external_pg = std::env::var("P11SHIM_BENCH_PG_URL").ok().filter(|u| !u.is_empty());
        let conf = if phase == "softhsm" {
            make_tokens(&dir, &[NATIVE])
        } else if phase == "cache" {
            // Its own set-up, for each backend (see cache_phase).
            PathBuf::new()
        } else {
            url = match phase.as_str() {
                "sqlite" => format!("sqlite:{}", dir.join("keys.db").display()),
                _ => match &external_pg {
                    Some(url) => {
                        clear_pg_rows(url);
                        url.clone()
                    }
                    None => {
                        let (c, url) = PgCluster::start();
                        pg_durability(&url, true);
                        cluster = Some(c);
                        url
                    }
                },
            };
            let conf = make_tokens(&dir, &[PLAIN, DB]);
            let config = dir.join("p11shim.toml");
            write_config(&config, &softhsm_path(), &url, "");
            mbk_create(("SOFTHSM2_CONF", &conf), &config);
            conf
        };
        let results = dir.join("results.txt");
        let what = match (phase.as_str(), url.is_empty()) {
            ("cache", _) => "the HSM cache, SQLite, SoftHSM2 and the simulator".to_string(),
            (_, true) => "SoftHSM2 token objects".to_string(),
            _ => url.clone(),
        };
        println!("\n=== store bench phase {phase} ({what}) ===");
        let t = Instant::now();
        let status = Command::new(std::env::current_exe().unwrap())
            .args(std::env::args().skip(1))
            .env("STORE_BENCH_PHASE", phase)
            .env("STORE_BENCH_DIR", &dir)
            .env("STORE_BENCH_URL", &url)
            .env("STORE_BENCH_RESULTS", &results)
            .env("STORE_BENCH_OWN_PG", if cluster.is_some() { "1" } else { "0" })
            .env("SOFTHSM2_CONF", &conf)
            .env("P11SHIM_CONFIG", dir.join("p11shim.toml"))
            .env_remove("P11SHIM_MODULE")
            .status()
            .expect("run the phase");
        println!("=== phase {phase}: {:.0} s ===", t.elapsed().as_secs_f64());
        if !status.success() {
            failures.push(format!("phase {phase} failed ({status}); see above"));
        }
        Results::load(&results, phase, &mut all);
        all.insert(format!("{phase}.phase_secs"), t.elapsed().as_secs_f64());
        if phase == "postgres" {
            if let Some(url) = &external_pg {
                clear_pg_rows(url);
            }
        }
        drop(cluster);
    }
    let table = summary(knobs, &all, started.elapsed());
    println!("{table}");
    let path = root.join("summary.txt");
    let _ = std::fs::write(&path, &table);
    println!("(also written to {})", path.display());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// -----------------------------------------------------------------------------------------------------------
// A child: one engine (stored keys against native keys) or SoftHSM2's own token store; and the short-lived
// processes a child starts (a key store probe, finds in a fresh process)

/// SoftHSM2 initialized directly, then the shim over the same instance.
fn modules() -> (Api, Api) {
    let direct = load(&softhsm_path());
    direct.initialize("SoftHSM2 C_Initialize");
    let shim = load(&shim_path());
    ok(call!(shim, C_Initialize(null_mut())), "shim C_Initialize over an initialized SoftHSM2");
    (direct, shim)
}

fn child(knobs: &Knobs, phase: &str) {
    let mut results =
        Results { file: std::env::var_os("STORE_BENCH_RESULTS").map(PathBuf::from), ..Default::default() };
    match phase {
        "softhsm" => {
            let mut c = knobs.criterion();
            softhsm_phase(knobs, &mut results, &mut c);
            c.final_summary();
        }
        "probe" => store_probe(&mut results),
        "cold" => cold_first_use(knobs, &mut results),
        "find" => fresh_finds(&mut results),
        "cache" => cache_phase(knobs, &mut results),
        "cache-run" => cache_run(knobs, &mut results),
        engine => {
            let mut c = knobs.criterion();
            engine_phase(knobs, engine, &mut results, &mut c);
            c.final_summary();
        }
    }
}

/// Runs this binary as `phase` with the environment of this process (and `env`); its results, or none if
/// it failed.
fn run_helper(phase: &str, env: &[(&str, String)]) -> BTreeMap<String, f64> {
    let dir = PathBuf::from(std::env::var("STORE_BENCH_DIR").expect("STORE_BENCH_DIR"));
    let file = dir.join(format!("{phase}-results.txt"));
    let _ = std::fs::remove_file(&file);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(std::env::args().skip(1)).env("STORE_BENCH_PHASE", phase).env("STORE_BENCH_RESULTS", &file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd.stdout(Stdio::null()).status().expect("run a helper process");
    if !status.success() {
        eprintln!("helper process {phase} failed ({status})");
    }
    let mut got = BTreeMap::new();
    Results::load(&file, "x", &mut got);
    got.into_iter().map(|(k, v)| (k["x.".len()..].to_string(), v)).collect()
}

fn engine_phase(knobs: &Knobs, engine: &str, results: &mut Results, c: &mut Criterion) {
    let (direct, shim) = modules();
    let plain = direct.slot(PLAIN);
    let db = direct.slot(DB);
    let native_session = direct.open(plain);
    direct.login(native_session);
    let forwarded_session = shim.open(plain);
    let stored_session = shim.open(db);
    shim.login(stored_session);
    let url = std::env::var("STORE_BENCH_URL").expect("STORE_BENCH_URL");
    if engine == "postgres" {
        if let Some(d) = pg_is_durable(&url) {
            results.set("pg_durable", d);
        }
    }

    // Item 1: warm use.
    let native_keys = Keys::make(direct, native_session, false);
    let stored_keys = Keys::make(shim, stored_session, true);
    assert!(stored_keys.aes & (1 << 63) != 0, "a stored key has a shim handle");
    let native = Path3 { api: direct, session: native_session, keys: native_keys };
    let forwarded = Path3 { api: shim, session: forwarded_session, keys: native_keys };
    let stored = Path3 { api: shim, session: stored_session, keys: stored_keys };
    for op in Op::ALL {
        run_op(stored, op); // the first use loads the key
        run_op(forwarded, op);
    }
    if knobs.criterion {
        for op in Op::ALL {
            let mut group = c.benchmark_group(format!("store_{engine}/warm/{}", op.id()));
            for (name, p) in [("native", native), ("stored", stored)] {
                group.bench_function(name, |b| b.iter_custom(|iters| time_ops(p, op, iters)));
            }
            group.finish();
        }
    }
    if knobs.bench_mode {
        warm_summary(results, native, forwarded, stored);
    }
    // The key store's own calls, from another process on the same store (see store_probe).
    for (k, v) in run_helper("probe", &[]) {
        results.set(format!("probe.{k}"), v);
    }

    // Item 2: first use against a native unwrap: in this process (rows held), then in a fresh one.
    first_use(knobs, results, c, engine, direct, native_session, shim, stored_session);
    for (k, v) in run_helper("cold", &[]) {
        results.set(format!("cold.{k}"), v);
    }

    // Items 3 and 4: create the population through the shim, find at each size, in this process (which
    // has a handle for every key it created) and in a fresh one.
    let own_pg = engine == "postgres" && std::env::var("STORE_BENCH_OWN_PG").is_ok_and(|v| v == "1");
    let mut after_create = || {
        if own_pg && knobs.population() > knobs.create {
            // Item 4 is measured with durable commits; the rest of the population only needs to exist.
            pg_durability(&url, false);
            println!("(PostgreSQL: fsync off for the rest of the population)");
        }
    };
    let mut at_size = |size: usize, results: &mut Results, c: &mut Criterion| {
        find_at(results, knobs.criterion.then_some(c), engine, shim, stored_session, size);
        for (k, v) in run_helper("find", &[("STORE_BENCH_FIND_SIZE", size.to_string())]) {
            results.set(format!("fresh.{k}"), v);
        }
        if let Some(m) = results.map.get(&format!("fresh.find.{size:07}_us.median")) {
            println!("find among {size} in a fresh process: median {m:.1} µs");
        }
    };
    populate(results, c, knobs, shim, stored_session, knobs.population(), None, &mut after_create, &mut at_size);

    // Item 5: the other creation paths.
    creation_paths(results, direct, native_session, shim, stored_session);
}

/// Item 5: what making a stored key costs where the shim makes the object twice (as asked, to read the
/// backend's answers, then as its wrappable twin), against the same call made natively (a session object,
/// destroyed untimed): C_UnwrapKey of an unextractable key (every time), and the first key generation of a
/// request shape (the shim remembers each shape) against a second of the same shape.
fn creation_paths(
    results: &mut Results,
    direct: Api,
    native_session: CK_SESSION_HANDLE,
    shim: Api,
    stored_session: CK_SESSION_HANDLE,
) {
    const UNWRAPS: usize = 200;
    const SHAPES: usize = 16;
    let native = NativeUnwrap::new(direct, native_session, false);
    let stored = NativeUnwrap::new(shim, stored_session, false);
    let (mut unwrap_native, mut unwrap_stored) = (Vec::new(), Vec::new());
    for i in 0..UNWRAPS {
        unwrap_native.push(native.time_us());
        unwrap_stored.push(stored.time_stored_us(format!("u{i:04}").as_bytes()));
    }
    results.spread("create.unwrap_native_us", &unwrap_native);
    results.spread("create.unwrap_stored_us", &unwrap_stored);
    // Sixteen shapes: the AES key's usage flags differ.
    let (mut generate_native, mut first, mut again) = (Vec::new(), Vec::new(), Vec::new());
    for shape in 0..SHAPES {
        let flag = |bit: usize| if shape & (1 << bit) != 0 { YES } else { NO };
        let [encrypt, wrap, unwrap, derive] = [flag(0), flag(1), flag(2), flag(3)];
        let len: CK_ULONG = 32;
        let timed = |api: Api, session: CK_SESSION_HANDLE, token: bool, label: &[u8]| {
            let tok = if token { YES } else { NO };
            let mut t = [
                attr(CKA_TOKEN, &tok),
                attr(CKA_LABEL, label),
                attr(CKA_VALUE_LEN, &len),
                attr(CKA_ENCRYPT, &encrypt),
                attr(CKA_WRAP, &wrap),
                attr(CKA_UNWRAP, &unwrap),
                attr(CKA_DERIVE, &derive),
                attr(CKA_SENSITIVE, &YES),
            ];
            let start = Instant::now();
            let key = api.generate_key(session, CKM_AES_KEY_GEN, &mut t);
            let us = start.elapsed().as_nanos() as f64 / 1000.0;
            if !token {
                ok(call!(api, C_DestroyObject(session, key)), "C_DestroyObject");
            }
            us
        };
        generate_native.push(timed(direct, native_session, false, b"native"));
        first.push(timed(shim, stored_session, true, format!("shape{shape:02}a").as_bytes()));
        again.push(timed(shim, stored_session, true, format!("shape{shape:02}b").as_bytes()));
    }
    results.spread("create.generate_native_us", &generate_native);
    results.spread("create.generate_first_us", &first);
    results.spread("create.generate_again_us", &again);
    ok(call!(direct, C_DestroyObject(native_session, native.wrapping)), "C_DestroyObject");
    ok(call!(shim, C_DestroyObject(stored_session, stored.wrapping)), "C_DestroyObject");
}

/// Item 1's own measurement: alternating rounds, native / forwarded / stored.
fn warm_summary(results: &mut Results, native: Path3, forwarded: Path3, stored: Path3) {
    const ROUNDS: usize = 101;
    const ROUND_TIME: Duration = Duration::from_millis(10);
    for op in Op::ALL {
        let paths = [native, forwarded, stored];
        let mut n = 4u64;
        let mut t = time_ops(native, op, n);
        while t < ROUND_TIME / 4 {
            n *= 2;
            t = time_ops(native, op, n);
        }
        let iters = ((ROUND_TIME.as_secs_f64() / t.as_secs_f64()) * n as f64).max(1.0) as u64;
        for p in paths {
            time_ops(p, op, iters / 4 + 1);
        }
        let mut ns: [Vec<f64>; 3] = Default::default();
        for round in 0..ROUNDS {
            // Rotate which path goes first, so that none is favoured by drift within a round.
            for k in 0..3 {
                let i = (round + k) % 3;
                ns[i].push(time_ops(paths[i], op, iters).as_nanos() as f64 / iters as f64);
            }
        }
        let key = format!("warm.{}", op.id());
        let ratio = |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(a, b)| a / b).collect() };
        let diff = |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(a, b)| a - b).collect() };
        results.spread(&format!("{key}.native_ns"), &ns[0]);
        results.spread(&format!("{key}.forwarded_ns"), &ns[1]);
        results.spread(&format!("{key}.stored_ns"), &ns[2]);
        // Throughput ratio stored / native = native time / stored time, per round.
        results.spread(&format!("{key}.throughput_ratio"), &ratio(&ns[0], &ns[2]));
        results.spread(&format!("{key}.forwarded_ratio"), &ratio(&ns[0], &ns[1]));
        results.spread(&format!("{key}.stored_minus_native_ns"), &diff(&ns[2], &ns[0]));
        results.spread(&format!("{key}.stored_minus_forwarded_ns"), &diff(&ns[2], &ns[1]));
        println!("warm {}: done", op.name());
    }
}

/// A process of its own (started by the engine phase) that opens the same key store with the library's
/// `p11shim::store::open` and times the two calls a use of a stored key makes: `generation()` (every use)
/// and `get(id)` (a first use). Not in the engine phase's process: a second SQLite library there must not
/// open the shim's file (closing its descriptor would drop the shim's POSIX locks).
fn store_probe(results: &mut Results) {
    let url = std::env::var("STORE_BENCH_URL").expect("STORE_BENCH_URL");
    let store = store::open(&url).expect("open the key store");
    let query = store::KeyQuery { token: DB.into(), label: Some(b"aes".to_vec()), ..Default::default() };
    let rows = store.find(&query).expect("find the stored AES key");
    let id = rows.first().expect("the stored key labelled aes").id.clone();
    for _ in 0..1000 {
        black_box(store.generation().expect("generation"));
    }
    // Per call, in batches of 100 calls (the clock's own cost stays out of the figure).
    let generation: Vec<f64> = (0..300)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..100 {
                black_box(store.generation().expect("generation"));
            }
            t.elapsed().as_nanos() as f64 / 100.0
        })
        .collect();
    results.spread("generation_ns", &generation);
    let get: Vec<f64> = (0..2000)
        .map(|_| {
            let t = Instant::now();
            black_box(store.get(&id).expect("get").expect("the row"));
            t.elapsed().as_nanos() as f64
        })
        .collect();
    results.spread("get_ns", &get);
}

/// Item 2: per key and round, native C_UnwrapKey under a session and under a token wrapping key, the stored
/// key's first use and then its warm use (C_EncryptInit + C_Encrypt AES-ECB 16 B), and native HMAC-SHA256
/// verifies of 512 B (the size of a row's MAC input) with a session and with a token key.
#[allow(clippy::too_many_arguments)]
fn first_use(
    knobs: &Knobs,
    results: &mut Results,
    c: &mut Criterion,
    engine: &str,
    direct: Api,
    native_session: CK_SESSION_HANDLE,
    shim: Api,
    stored_session: CK_SESSION_HANDLE,
) {
    let keys: Vec<CK_OBJECT_HANDLE> =
        (0..knobs.first_keys).map(|i| shim.aes_key(stored_session, true, format!("first{i:04}").as_bytes())).collect();
    let unwrap_session = NativeUnwrap::new(direct, native_session, false);
    let unwrap_token = NativeUnwrap::new(direct, native_session, true);
    let mac_data = [0x42u8; 512];
    let mac_keys = [direct.hmac_key(native_session, false), direct.hmac_key(native_session, true)];
    let macs = mac_keys.map(|k| {
        let mut mac = [0u8; 32];
        sign(direct, native_session, CKM_SHA256_HMAC, k, &mac_data, &mut mac);
        mac
    });
    let relogin = || {
        shim.logout(stored_session);
        shim.login(stored_session);
    };
    let use_key = |key: CK_OBJECT_HANDLE| use_aes(shim, stored_session, key);
    let mut s: [Vec<f64>; 6] = Default::default();
    let [first, warm, unwrap_s, unwrap_t, verify_s, verify_t] = &mut s;
    for round in 0..knobs.first_rounds {
        relogin();
        for (i, &key) in keys.iter().enumerate() {
            let native_first = (round + i) % 2 == 0;
            if native_first {
                unwrap_s.push(unwrap_session.time_us());
                unwrap_t.push(unwrap_token.time_us());
            }
            first.push(timed(&|| use_key(key)));
            warm.push(timed(&|| use_key(key)));
            if !native_first {
                unwrap_s.push(unwrap_session.time_us());
                unwrap_t.push(unwrap_token.time_us());
            }
            verify_s.push(timed(&|| verify(direct, native_session, mac_keys[0], &mac_data, &macs[0])));
            verify_t.push(timed(&|| verify(direct, native_session, mac_keys[1], &mac_data, &macs[1])));
        }
    }
    first_use_spreads(results, "first.", first, warm, unwrap_s, unwrap_t);
    results.spread("first.native_verify512_us", verify_s);
    results.spread("first.native_verify512_token_us", verify_t);
    println!("first use: done ({} samples)", first.len());

    if knobs.criterion {
        let mut group = c.benchmark_group(format!("store_{engine}/first_use"));
        group.bench_function("native_unwrap", |b| {
            b.iter_custom(|iters| (0..iters).map(|_| unwrap_session.time()).sum());
        });
        group.bench_function("native_unwrap_token_key", |b| {
            b.iter_custom(|iters| (0..iters).map(|_| unwrap_token.time()).sum());
        });
        group.bench_function("stored_first_use", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters as usize;
                while left > 0 {
                    relogin();
                    for &key in keys.iter().take(left) {
                        let t = Instant::now();
                        use_key(key);
                        total += t.elapsed();
                    }
                    left = left.saturating_sub(keys.len());
                }
                total
            });
        });
        group.finish();
    }
    relogin();
}

/// A native C_UnwrapKey of an AES-256 key (CKM_AES_KEY_WRAP_PAD under an AES-256 wrapping key: a session
/// object, or a token object as the MBK is) into a session object with the attributes the shim gives its
/// loaded copies; the object is destroyed after the clock stops.
struct NativeUnwrap {
    api: Api,
    session: CK_SESSION_HANDLE,
    wrapping: CK_OBJECT_HANDLE,
    blob: Vec<u8>,
}

impl NativeUnwrap {
    fn new(api: Api, session: CK_SESSION_HANDLE, token: bool) -> NativeUnwrap {
        let len: CK_ULONG = 32;
        let tok = if token { YES } else { NO };
        let mut t = [
            attr(CKA_TOKEN, &tok),
            attr(CKA_PRIVATE, &YES),
            attr(CKA_VALUE_LEN, &len),
            attr(CKA_WRAP, &YES),
            attr(CKA_UNWRAP, &YES),
            attr(CKA_SENSITIVE, &YES),
            attr(CKA_EXTRACTABLE, &NO),
        ];
        let wrapping = api.generate_key(session, CKM_AES_KEY_GEN, &mut t);
        let mut t = [
            attr(CKA_TOKEN, &NO),
            attr(CKA_VALUE_LEN, &len),
            attr(CKA_ENCRYPT, &YES),
            attr(CKA_EXTRACTABLE, &YES),
            attr(CKA_SENSITIVE, &YES),
        ];
        let key = api.generate_key(session, CKM_AES_KEY_GEN, &mut t);
        let mut m = CK_MECHANISM { mechanism: CKM_AES_KEY_WRAP_PAD, pParameter: null_mut(), ulParameterLen: 0 };
        let mut blob = vec![0u8; 64];
        let mut n = blob.len() as CK_ULONG;
        ok(call!(api, C_WrapKey(session, &mut m, wrapping, key, blob.as_mut_ptr(), &mut n)), "C_WrapKey");
        blob.truncate(n as usize);
        ok(call!(api, C_DestroyObject(session, key)), "C_DestroyObject");
        NativeUnwrap { api, session, wrapping, blob }
    }

    fn time(&self) -> Duration {
        let (class, key_type): (CK_OBJECT_CLASS, CK_KEY_TYPE) = (CKO_SECRET_KEY, CKK_AES);
        let mut t = [
            attr(CKA_CLASS, &class),
            attr(CKA_KEY_TYPE, &key_type),
            attr(CKA_TOKEN, &NO),
            attr(CKA_PRIVATE, &YES),
            attr(CKA_SENSITIVE, &YES),
            attr(CKA_ENCRYPT, &YES),
            attr(CKA_DECRYPT, &YES),
            attr(CKA_EXTRACTABLE, &YES),
            attr(CKA_WRAP_WITH_TRUSTED, &YES),
            attr(CKA_LABEL, b"unwrapped".as_slice()),
        ];
        let (elapsed, key) = self.unwrap(&mut t);
        ok(call!(self.api, C_DestroyObject(self.session, key)), "C_DestroyObject");
        elapsed
    }

    /// C_UnwrapKey of the blob with template `t`: the time, and the new object.
    fn unwrap(&self, t: &mut [CK_ATTRIBUTE]) -> (Duration, CK_OBJECT_HANDLE) {
        let mut m = CK_MECHANISM { mechanism: CKM_AES_KEY_WRAP_PAD, pParameter: null_mut(), ulParameterLen: 0 };
        let mut key = 0;
        let start = Instant::now();
        let rv = call!(
            self.api,
            C_UnwrapKey(
                self.session,
                &mut m,
                self.wrapping,
                self.blob.as_ptr() as *mut u8,
                self.blob.len() as CK_ULONG,
                t.as_mut_ptr(),
                t.len() as CK_ULONG,
                &mut key
            )
        );
        let elapsed = start.elapsed();
        ok(rv, "C_UnwrapKey");
        (elapsed, key)
    }

    fn time_us(&self) -> f64 {
        self.time().as_nanos() as f64 / 1000.0
    }

    /// C_UnwrapKey of the blob into a token object labelled `label` (a stored key on a database slot), as an
    /// application makes an unextractable key: the time, in µs.
    fn time_stored_us(&self, label: &[u8]) -> f64 {
        let (class, key_type): (CK_OBJECT_CLASS, CK_KEY_TYPE) = (CKO_SECRET_KEY, CKK_AES);
        let mut t = [
            attr(CKA_CLASS, &class),
            attr(CKA_KEY_TYPE, &key_type),
            attr(CKA_TOKEN, &YES),
            attr(CKA_PRIVATE, &YES),
            attr(CKA_SENSITIVE, &YES),
            attr(CKA_ENCRYPT, &YES),
            attr(CKA_LABEL, label),
        ];
        self.unwrap(&mut t).0.as_nanos() as f64 / 1000.0
    }
}

/// Creates AES keys labelled k0000000… in batches, timing each batch, up to `target`; calls `after_create`
/// once the creation count (item 4) is reached and `at_size` at each find size. `budget`: stop at the first
/// batch boundary after this much creation time.
#[allow(clippy::too_many_arguments)]
fn populate(
    results: &mut Results,
    c: &mut Criterion,
    knobs: &Knobs,
    api: Api,
    session: CK_SESSION_HANDLE,
    target: usize,
    budget: Option<Duration>,
    after_create: &mut dyn FnMut(),
    at_size: &mut dyn FnMut(usize, &mut Results, &mut Criterion),
) {
    let mut checkpoints: Vec<usize> = knobs.sizes.iter().copied().filter(|&n| n <= target).collect();
    checkpoints.push(knobs.create.min(target));
    checkpoints.push(target);
    checkpoints.sort_unstable();
    checkpoints.dedup();
    let batch = BATCH.min(checkpoints[0]).max(1);
    let (mut created, mut spent) = (0usize, Duration::ZERO);
    let started = Instant::now();
    for &checkpoint in &checkpoints {
        while created < checkpoint {
            if budget.is_some_and(|b| spent > b) {
                results.set("create.capped_at", created as f64);
                println!("stopped creating at {created} objects after {:.0} s (budget)", spent.as_secs_f64());
                return;
            }
            let n = batch.min(checkpoint - created);
            let t = Instant::now();
            for i in created..created + n {
                black_box(api.aes_key(session, true, label(i).as_bytes()));
            }
            let elapsed = t.elapsed();
            spent += elapsed;
            created += n;
            results.set(format!("create.batch.{created:07}"), n as f64 / elapsed.as_secs_f64());
            if created % (10 * batch) == 0 || created == checkpoint {
                println!(
                    "created {created} keys in {:.1} s ({:.0}/s in the last batch; {:.0} s wall)",
                    spent.as_secs_f64(),
                    n as f64 / elapsed.as_secs_f64(),
                    started.elapsed().as_secs_f64()
                );
            }
        }
        if checkpoint == knobs.create.min(target) {
            results.set("create.count", created as f64);
            results.set("create.secs", spent.as_secs_f64());
            after_create();
        }
        if knobs.sizes.contains(&checkpoint) {
            at_size(checkpoint, results, c);
        }
    }
    results.set("create.total", created as f64);
    results.set("create.total_secs", spent.as_secs_f64());
}

fn label(i: usize) -> String {
    format!("k{i:07}")
}

/// Finds by the labels `next` gives (one key each), each timed alone, in µs: at least `least`, at most `most`,
/// and no more once `time` has passed.
fn timed_finds(
    api: Api,
    session: CK_SESSION_HANDLE,
    (most, least, time): (usize, usize, Duration),
    mut next: impl FnMut() -> String,
) -> Vec<f64> {
    let mut us = Vec::new();
    let start = Instant::now();
    while us.len() < most && (us.len() < least || start.elapsed() < time) {
        let l = next();
        let t = Instant::now();
        let n = api.find_label(session, l.as_bytes());
        us.push(t.elapsed().as_nanos() as f64 / 1000.0);
        assert_eq!(n, 1, "one key labelled {l}");
    }
    us
}

/// Item 3 at one size: finds of random existing labels, each timed (at least 50; at most 1000 or ~5 s).
fn find_at(
    results: &mut Results,
    c: Option<&mut Criterion>,
    who: &str,
    api: Api,
    session: CK_SESSION_HANDLE,
    size: usize,
) {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ size as u64);
    for _ in 0..20 {
        assert_eq!(api.find_label(session, label(rng.below(size)).as_bytes()), 1, "one key per label");
    }
    let us = timed_finds(api, session, (1000, 50, Duration::from_secs(5)), || label(rng.below(size)));
    results.spread(&format!("find.{size:07}_us"), &us);
    println!("find among {size}: median {:.1} µs over {}", median(&us), us.len());
    if let Some(c) = c {
        let mut group = c.benchmark_group(format!("store_{who}/find_by_label"));
        if median(&us) > 2000.0 {
            group.sample_size(10);
        }
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(api.find_label(session, label(rng.below(size)).as_bytes()));
                }
                start.elapsed()
            })
        });
        group.finish();
    }
}

/// Item 3 in a process of its own (started by the engine phase while it waits): the shim loaded alone, as
/// an application would, which knows only the handles of the keys it finds.
/// Microseconds `f` takes.
fn timed(f: &dyn Fn()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_nanos() as f64 / 1000.0
}

/// One use of an AES key: C_EncryptInit + C_Encrypt, AES-ECB of 16 B.
fn use_aes(api: Api, session: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) {
    run_op(Path3 { api, session, keys: Keys { aes: key, hmac: 0, ec: 0 } }, Op::AesEcb16);
}

/// Item 2's figures from paired samples (first and warm use of each key, native unwraps beside them), as
/// `{prefix}stored_first_us`, `{prefix}load_us` (first − warm), `{prefix}load_over_unwrap` and so on.
fn first_use_spreads(results: &mut Results, prefix: &str, first: &[f64], warm: &[f64], us: &[f64], ut: &[f64]) {
    let per = |a: &[f64], b: &[f64], f: fn(f64, f64) -> f64| -> Vec<f64> {
        a.iter().zip(b).map(|(a, b)| f(*a, *b)).collect()
    };
    let load = per(first, warm, |f, w| f - w);
    for (name, samples) in [
        ("stored_first_us", first.to_vec()),
        ("stored_warm_us", warm.to_vec()),
        ("native_unwrap_us", us.to_vec()),
        ("native_unwrap_token_us", ut.to_vec()),
        ("load_over_unwrap", per(&load, us, |l, u| l / u)),
        ("load_over_unwrap_token", per(&load, ut, |l, u| l / u)),
        ("first_over_unwrap", per(first, us, |f, u| f / u)),
        ("first_over_unwrap_token", per(first, ut, |f, u| f / u)),
    ] {
        results.spread(&format!("{prefix}{name}"), &samples);
    }
    results.spread(&format!("{prefix}load_us"), &load);
}

/// Item 2 in a fresh process, as an application that starts: each key's handle comes from a find by label
/// (which reads its row), and the first use then checks the row's MAC in the HSM and unwraps the key under
/// the MBK. The keys are item 2's, created by the engine process; native unwraps alternate with them.
fn cold_first_use(knobs: &Knobs, results: &mut Results) {
    let (direct, shim) = modules();
    let native_session = direct.open(direct.slot(PLAIN));
    direct.login(native_session);
    let stored_session = shim.open(shim.slot(DB));
    shim.login(stored_session);
    let unwrap_session = NativeUnwrap::new(direct, native_session, false);
    let unwrap_token = NativeUnwrap::new(direct, native_session, true);
    let use_key = |key: CK_OBJECT_HANDLE| use_aes(shim, stored_session, key);
    let mut s: [Vec<f64>; 5] = Default::default();
    let [find, first, warm, unwrap_s, unwrap_t] = &mut s;
    for i in 0..knobs.first_keys {
        let native_first = i % 2 == 0;
        if native_first {
            unwrap_s.push(unwrap_session.time_us());
            unwrap_t.push(unwrap_token.time_us());
        }
        let label = format!("first{i:04}");
        let t = Instant::now();
        let found = shim.find_handles(stored_session, label.as_bytes());
        find.push(t.elapsed().as_nanos() as f64 / 1000.0);
        assert_eq!(found.len(), 1, "one key labelled {label}");
        first.push(timed(&|| use_key(found[0])));
        warm.push(timed(&|| use_key(found[0])));
        if !native_first {
            unwrap_s.push(unwrap_session.time_us());
            unwrap_t.push(unwrap_token.time_us());
        }
    }
    results.spread("find_us", find);
    first_use_spreads(results, "", first, warm, unwrap_s, unwrap_t);
    ok(call!(direct, C_DestroyObject(native_session, unwrap_token.wrapping)), "C_DestroyObject");
    ok(call!(shim, C_CloseSession(stored_session)), "C_CloseSession");
    ok(call!(shim, C_Finalize(null_mut())), "shim C_Finalize");
}

fn fresh_finds(results: &mut Results) {
    let size = env_num("STORE_BENCH_FIND_SIZE", 0);
    let shim = load(&shim_path());
    ok(call!(shim, C_Initialize(null_mut())), "shim C_Initialize");
    let session = shim.open(shim.slot(DB));
    shim.login(session);
    find_at(results, None, "fresh", shim, session, size);
    ok(call!(shim, C_CloseSession(session)), "C_CloseSession");
    ok(call!(shim, C_Finalize(null_mut())), "shim C_Finalize");
}

// -----------------------------------------------------------------------------------------------------------
// Item 6: finds as stored keys are used (the HSM cache)

/// The simulator of this workspace, beside the shim.
fn cssim_path() -> PathBuf {
    let path = profile_dir().join("libcssim.so");
    assert!(path.exists(), "{} is missing: cargo build --release --workspace --lib", path.display());
    path
}

/// Gives the simulated device of `conf` its own MBK, as its administrators would (p11shim then keeps stored
/// keys as the device's blobs), unless it holds one from an earlier run.
fn device_mbk(conf: &Path) {
    let admin = profile_dir().join("cssim-admin");
    let run = |args: &[&str]| {
        let out = Command::new(&admin).arg("--config").arg(conf).args(args).output().expect("run cssim-admin");
        assert!(out.status.success(), "cssim-admin {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    if run(&["mbk", "show"]).contains("fingerprint") {
        return;
    }
    let shares = conf.with_file_name("mbk-shares");
    let _ = std::fs::remove_dir_all(&shares);
    run(&["mbk", "generate", "--shares", "1", "--threshold", "1", "--out", &shares.to_string_lossy()]);
}

/// Item 6 for each backend, with the key store on SQLite: the population is made once (a process of its
/// own), then each variant runs in a fresh process: "bounded" with the default `hsm_cache` (8 under `cargo
/// test`, where the population is small), "unbounded" with no practical bound, up to 1,000 used keys.
fn cache_phase(knobs: &Knobs, results: &mut Results) {
    let root = PathBuf::from(std::env::var("STORE_BENCH_DIR").expect("STORE_BENCH_DIR"));
    for backend in CACHE_BACKENDS {
        let dir = root.join(backend);
        std::fs::create_dir_all(&dir).expect("create the cache bench dir");
        let (module, env) = match backend {
            "softhsm" => (softhsm_path(), ("SOFTHSM2_CONF", make_tokens(&dir, &[DB]))),
            // The simulator with its device MBK (stored keys are its blobs), and without it (an MBK set).
            "cssim" | "cssim-set" => {
                let conf = dir.join("cssim.toml");
                let switch = if backend == "cssim" { "" } else { "device_mbk = false\n" };
                std::fs::write(
                    &conf,
                    format!("state = \"cssim-state.json\"\nlog_file = \"cssim.log\"\n{switch}[[slot]]\n"),
                )
                .expect("write cssim.toml");
                if backend == "cssim" {
                    device_mbk(&conf);
                }
                (cssim_path(), ("CSSIM_CONFIG", conf))
            }
            other => unreachable!("item 6 backend {other}"),
        };
        let url = format!("sqlite:{}", dir.join("keys.db").display());
        let bounded = if knobs.bench_mode { String::new() } else { "hsm_cache = 8\n".into() };
        let used = |max: usize| -> String {
            knobs.cache_used.iter().filter(|&&n| n <= max).map(usize::to_string).collect::<Vec<_>>().join(",")
        };
        let population = *knobs.cache_used.last().expect("levels");
        let runs = [
            ("populate", String::new(), population.to_string()),
            ("bounded", bounded, used(usize::MAX)),
            ("unbounded", "hsm_cache = 1000000\n".into(), used(1000)),
        ];
        for (variant, cache, levels) in runs {
            let config = dir.join(format!("p11shim-{variant}.toml"));
            write_config(&config, &module, &url, &cache);
            if variant == "populate" && backend == "softhsm" {
                mbk_create((env.0, &env.1), &config);
            }
            let t = Instant::now();
            let got = run_helper(
                "cache-run",
                &[
                    (env.0, env.1.display().to_string()),
                    ("P11SHIM_CONFIG", config.display().to_string()),
                    ("STORE_BENCH_CACHE_MODULE", module.display().to_string()),
                    ("STORE_BENCH_CACHE_VARIANT", variant.to_string()),
                    ("STORE_BENCH_CACHE_LEVELS", levels),
                    ("STORE_BENCH_CACHE_INIT", (backend != "softhsm" && variant == "populate").to_string()),
                ],
            );
            assert!(!got.is_empty(), "item 6, {backend} {variant}: the helper process failed");
            println!("item 6, {backend} {variant}: {:.0} s", t.elapsed().as_secs_f64());
            for (k, v) in got {
                results.set(format!("{backend}.{variant}.{k}"), v);
            }
        }
    }
}

/// Item 6's backends: SoftHSM2 (an MBK set), the simulator with its device MBK, and without it (an MBK set).
const CACHE_BACKENDS: [&str; 3] = ["softhsm", "cssim", "cssim-set"];

/// The labels of item 6's population.
fn cache_label(i: usize) -> String {
    format!("c{i:07}")
}

/// One run of item 6 (a process of its own): the shim loaded alone, as an application would; the backend
/// loaded too (the same instance) only to count the shim's copies in the HSM.
fn cache_run(knobs: &Knobs, results: &mut Results) {
    let variant = std::env::var("STORE_BENCH_CACHE_VARIANT").expect("STORE_BENCH_CACHE_VARIANT");
    let levels: Vec<usize> = std::env::var("STORE_BENCH_CACHE_LEVELS")
        .expect("STORE_BENCH_CACHE_LEVELS")
        .split(',')
        .map(|n| n.parse().expect("a number"))
        .collect();
    let shim = load(&shim_path());
    ok(call!(shim, C_Initialize(null_mut())), "shim C_Initialize");
    if std::env::var("STORE_BENCH_CACHE_INIT").is_ok_and(|v| v == "true") {
        init_db_token(shim);
    }
    let session = shim.open(shim.slot(DB));
    shim.login(session);
    if variant == "populate" {
        let t = Instant::now();
        for i in 0..levels[0] {
            black_box(shim.aes_key(session, true, cache_label(i).as_bytes()));
        }
        results.set("populate_secs", t.elapsed().as_secs_f64());
        ok(call!(shim, C_Finalize(null_mut())), "shim C_Finalize");
        return;
    }
    let population = knobs.cache_used.last().copied().expect("levels");
    let backend = load(Path::new(&std::env::var("STORE_BENCH_CACHE_MODULE").expect("STORE_BENCH_CACHE_MODULE")));
    let watcher = backend.open(shim.slot(DB));
    let copies = || {
        let mut t = [attr(CKA_TOKEN, &NO)];
        let mut n = 0;
        let mut found = vec![0; 4096];
        ok(call!(backend, C_FindObjectsInit(watcher, t.as_mut_ptr(), 1)), "C_FindObjectsInit (backend)");
        let mut all = 0;
        loop {
            ok(call!(backend, C_FindObjects(watcher, found.as_mut_ptr(), 4096, &mut n)), "C_FindObjects (backend)");
            if n == 0 {
                break;
            }
            all += n as usize;
        }
        ok(call!(backend, C_FindObjectsFinal(watcher)), "C_FindObjectsFinal (backend)");
        all
    };
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut finds = |name: &str, results: &mut Results| {
        let bounds = if knobs.bench_mode { (3000, 300, Duration::from_secs(4)) } else { (100, 100, Duration::ZERO) };
        let us = timed_finds(shim, session, bounds, || cache_label(rng.below(population)));
        results.spread(&format!("find.{name}_us"), &us);
    };
    // Warm-up (caches, the allocator, the CPU's clock), not timed: the first finds of a process are slower.
    for i in 0..300 {
        black_box(shim.find_label(session, cache_label(i % population).as_bytes()));
    }
    let mut used = 0;
    for &level in &levels {
        let t = Instant::now();
        while used < level {
            let found = shim.find_handles(session, cache_label(used).as_bytes());
            assert_eq!(found.len(), 1, "one key labelled {}", cache_label(used));
            use_aes(shim, session, found[0]);
            used += 1;
        }
        if level > 0 {
            results.set(format!("use.{level:05}_us"), t.elapsed().as_nanos() as f64 / 1000.0 / level as f64);
        }
        results.set(format!("copies.{level:05}"), copies() as f64);
        finds(&format!("{level:05}"), results);
    }
    // None used again: logging out drops every copy.
    shim.logout(session);
    shim.login(session);
    results.set("copies.again", copies() as f64);
    finds("again", results);
    ok(call!(shim, C_CloseSession(session)), "C_CloseSession");
    ok(call!(shim, C_Finalize(null_mut())), "shim C_Finalize");
}

/// The simulator's fresh slot made a database token through the shim: C_InitToken (which makes the MBK set
/// on a database slot's token), then the user PIN.
fn init_db_token(shim: Api) {
    let mut n: CK_ULONG = 1;
    let mut slot = 0;
    ok(call!(shim, C_GetSlotList(CK_FALSE, &mut slot, &mut n)), "C_GetSlotList");
    let mut label = [b' '; 32];
    label[..DB.len()].copy_from_slice(DB.as_bytes());
    let so = SO_PIN.as_bytes().as_ptr() as *mut u8;
    ok(call!(shim, C_InitToken(slot, so, SO_PIN.len() as CK_ULONG, label.as_mut_ptr())), "C_InitToken");
    let s = shim.open(slot);
    ok(call!(shim, C_Login(s, CKU_SO, so, SO_PIN.len() as CK_ULONG)), "C_Login (SO)");
    let user = USER_PIN.as_bytes().as_ptr() as *mut u8;
    ok(call!(shim, C_InitPIN(s, user, USER_PIN.len() as CK_ULONG)), "C_InitPIN");
    ok(call!(shim, C_CloseSession(s)), "C_CloseSession");
}

fn softhsm_phase(knobs: &Knobs, results: &mut Results, c: &mut Criterion) {
    let direct = load(&softhsm_path());
    direct.initialize("SoftHSM2 C_Initialize");
    let session = direct.open(direct.slot(NATIVE));
    direct.login(session);
    let target = knobs.population().min(knobs.softhsm_max);
    if target < knobs.population() {
        results.set("create.max", target as f64);
    }
    let mut at_size = |size: usize, results: &mut Results, c: &mut Criterion| {
        find_at(results, knobs.criterion.then_some(c), "softhsm", direct, session, size);
    };
    populate(results, c, knobs, direct, session, target, Some(knobs.softhsm_budget), &mut || {}, &mut at_size);
}

// -----------------------------------------------------------------------------------------------------------
// The summary

fn summary(knobs: &Knobs, r: &BTreeMap<String, f64>, took: Duration) -> String {
    let mut out = String::new();
    let get = |key: &str| r.get(key).copied();
    let fmt = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    // "median (p10-p90)" of a spread.
    let spread = |key: &str, digits: usize| match get(&format!("{key}.median")) {
        Some(m) => format!(
            "{m:.digits$} ({}-{})",
            fmt(get(&format!("{key}.p10")), digits),
            fmt(get(&format!("{key}.p90")), digits)
        ),
        None => "-".to_string(),
    };
    let has = |p: &str| knobs.phases.iter().any(|x| x == p);
    let engines: Vec<&str> = ["sqlite", "postgres"].into_iter().filter(|e| has(e)).collect();
    let _ = writeln!(out, "\np11shim stored keys: summary ({:.0} s in all)", took.as_secs_f64());
    for p in &knobs.phases {
        let _ = write!(out, "  {p} {} s", fmt(get(&format!("{p}.phase_secs")), 0));
    }
    let _ = writeln!(out);

    let _ = writeln!(
        out,
        "\n1. Warm use, ns per operation: 101 alternating rounds of ~10 ms per path; medians; diff and throughput are\n   \
         medians of per-round pairs; throughput = native time / stored time (target >= 0.98); fwd = native time /\n   \
         time of the same native key through the shim"
    );
    let _ = writeln!(
        out,
        "{:<26} {:<9} {:>8} {:>8} {:>8} {:>7} {:>24} {:>7}",
        "operation", "engine", "native", "via shim", "stored", "diff", "throughput (p10-p90)", "fwd"
    );
    for op in Op::ALL {
        for e in &engines {
            let k = |f: &str| get(&format!("{e}.warm.{}.{f}.median", op.id()));
            let _ = writeln!(
                out,
                "{:<26} {:<9} {:>8} {:>8} {:>8} {:>7} {:>24} {:>7}",
                op.name(),
                e,
                fmt(k("native_ns"), 0),
                fmt(k("forwarded_ns"), 0),
                fmt(k("stored_ns"), 0),
                fmt(k("stored_minus_native_ns"), 0),
                spread(&format!("{e}.warm.{}.throughput_ratio", op.id()), 3),
                fmt(k("forwarded_ratio"), 3),
            );
        }
    }
    let _ = writeln!(out, "\n   Key store calls alone (another process, same store), ns: median (p10-p90)");
    for e in &engines {
        let _ = writeln!(
            out,
            "   {e:<9} generation() {:<22} get(id) {}",
            spread(&format!("{e}.probe.generation_ns"), 0),
            spread(&format!("{e}.probe.get_ns"), 0)
        );
    }

    let _ = writeln!(
        out,
        "\n2. First use (row read + MAC check + unwrap) vs native C_UnwrapKey (AES-256, CKM_AES_KEY_WRAP_PAD), µs,\n   \
         medians; first and warm use: C_EncryptInit+C_Encrypt AES-ECB 16 B on a stored key; load = first - warm\n   \
         per key; unwrap under a session wrapping key (s) and under a token wrapping key (t, as the MBK is);\n   \
         target: load <= 2 x unwrap"
    );
    let _ = writeln!(
        out,
        "{:<9} {:>8} {:>8} {:>20} {:>6} {:>7} {:>8} {:>8} {:>8} {:>8} {:>11} {:>6}",
        "engine",
        "unwrap s",
        "unwrap t",
        "first (p10-p90)",
        "warm",
        "load",
        "load/s",
        "load/t",
        "first/s",
        "first/t",
        "HMAC s / t",
        "n"
    );
    // One row of item 2 for engine `e` and the results under `which` ("first" or "cold"); `last` fills the
    // second-to-last column.
    let first_row = |out: &mut String, e: &str, which: &str, last: String| {
        let k = |f: &str| get(&format!("{e}.{which}.{f}.median"));
        let _ = writeln!(
            out,
            "{:<9} {:>8} {:>8} {:>20} {:>6} {:>7} {:>8} {:>8} {:>8} {:>8} {:>11} {:>6}",
            e,
            fmt(k("native_unwrap_us"), 1),
            fmt(k("native_unwrap_token_us"), 1),
            spread(&format!("{e}.{which}.stored_first_us"), 1),
            fmt(k("stored_warm_us"), 1),
            fmt(k("load_us"), 1),
            fmt(k("load_over_unwrap"), 2),
            fmt(k("load_over_unwrap_token"), 2),
            fmt(k("first_over_unwrap"), 2),
            fmt(k("first_over_unwrap_token"), 2),
            last,
            fmt(get(&format!("{e}.{which}.stored_first_us.n")), 0),
        );
    };
    for e in &engines {
        let k = |f: &str| get(&format!("{e}.first.{f}.median"));
        let hmac = format!("{} / {}", fmt(k("native_verify512_us"), 1), fmt(k("native_verify512_token_us"), 1));
        first_row(&mut out, e, "first", hmac);
    }
    let _ = writeln!(
        out,
        "   (rows: this process holds each key's row (made here, MAC known): after C_Logout/C_Login the first use is\n   \
         the unwrap only)\n\n   In a fresh process: the handle comes from a find by label (which reads the row); the\n   \
         first use checks the row's MAC in the HSM and unwraps (no second read)"
    );
    for e in &engines {
        first_row(&mut out, e, "cold", format!("find {}", fmt(get(&format!("{e}.cold.find_us.median")), 1)));
    }

    let _ = writeln!(
        out,
        "\n3. C_FindObjects by label (Init + FindObjects + Final, one match), µs: median (p10-p90); target <= 1000 µs\n   \
         and flat. \"creator\": the process that created the keys (it holds a handle for each); \"fresh\": a new\n   \
         process that loads the shim and only finds"
    );
    let mut columns: Vec<(String, String)> = Vec::new();
    for e in &engines {
        columns.push((format!("{e} (creator)"), format!("{e}.find")));
        columns.push((format!("{e} (fresh)"), format!("{e}.fresh.find")));
    }
    if has("softhsm") {
        columns.push(("SoftHSM2 token objects".into(), "softhsm.find".into()));
    }
    let _ = write!(out, "{:>7}", "keys");
    for (name, _) in &columns {
        let _ = write!(out, " {name:>24}");
    }
    let _ = writeln!(out);
    for size in &knobs.sizes {
        let _ = write!(out, "{size:>7}");
        for (_, key) in &columns {
            let cell = spread(&format!("{key}.{size:07}_us"), 1);
            let _ = write!(out, " {:>24}", if cell == "-" { "not measured" } else { &cell });
        }
        let _ = writeln!(out);
    }
    if let Some(max) = get("softhsm.create.max") {
        let _ = writeln!(out, "   SoftHSM2 token objects capped at {max:.0} (STORE_BENCH_SOFTHSM_MAX)");
        let rate = get("softhsm.create.total").zip(get("softhsm.create.total_secs")).map(|(n, s)| n / s);
        let measured =
            knobs.sizes.iter().rev().find_map(|&n| Some((n, get(&format!("softhsm.find.{n:07}_us.median"))?)));
        if let (Some(rate), Some((n, us))) = (rate, measured) {
            let want = knobs.population();
            let _ = writeln!(
                out,
                "   at {want}: creating them would take ~{:.0} min at the rate measured ({rate:.0}/s); a find \
                 ~{:.0} ms if it stays linear ({:.1} ms at {n}) - estimates, not measured",
                want as f64 / rate / 60.0,
                us / 1000.0 * want as f64 / n as f64,
                us / 1000.0
            );
        }
    }
    if let Some(cap) = get("softhsm.create.capped_at") {
        let _ = writeln!(out, "   SoftHSM2 stopped at {cap:.0} token objects (STORE_BENCH_SOFTHSM_BUDGET)");
    }

    let _ = writeln!(
        out,
        "\n4. Creating AES-256 keys one at a time (C_GenerateKey, CKA_TOKEN=true, one thread): keys per second;\n   \
         batches of {BATCH}; \"all\": the whole population of the phase"
    );
    let _ = writeln!(
        out,
        "{:<24} {:>7} {:>8} {:>7} {:>24} {:>18} {:>11}",
        "store", "keys", "seconds", "keys/s", "per batch med (min-max)", "all", "last batch"
    );
    for e in ["sqlite", "postgres", "softhsm"].into_iter().filter(|e| has(e)) {
        let count = get(&format!("{e}.create.count"));
        let secs = get(&format!("{e}.create.secs"));
        let upto = count.unwrap_or(0.0) as usize;
        let prefix = format!("{e}.create.batch.");
        let batch = |k: &str| k.strip_prefix(&prefix).and_then(|n| n.parse::<usize>().ok());
        let batches: Vec<f64> = r.iter().filter_map(|(k, v)| batch(k).filter(|&n| n <= upto).map(|_| *v)).collect();
        let last = r.iter().rfind(|(k, _)| batch(k).is_some()).map(|(_, v)| *v);
        let all = match (get(&format!("{e}.create.total")), get(&format!("{e}.create.total_secs"))) {
            (Some(n), Some(s)) => format!("{n:.0} in {s:.0} s"),
            _ => "-".into(),
        };
        let name = match e {
            "softhsm" => "SoftHSM2 token objects".to_string(),
            "postgres" => match get("postgres.pg_durable") {
                Some(d) if d > 0.5 => "postgres (durable)".to_string(),
                Some(_) => "postgres (fsync off)".to_string(),
                None => "postgres".to_string(),
            },
            _ => "sqlite (synchronous=FULL)".to_string(),
        };
        let per_batch = format!(
            "{} ({}-{})",
            fmt((!batches.is_empty()).then(|| median(&batches)), 0),
            fmt(batches.iter().copied().reduce(f64::min), 0),
            fmt(batches.iter().copied().reduce(f64::max), 0)
        );
        let _ = writeln!(
            out,
            "{:<24} {:>7} {:>8} {:>7} {:>24} {:>18} {:>11}",
            name,
            fmt(count, 0),
            fmt(secs, 1),
            fmt(count.zip(secs).map(|(n, s)| n / s), 0),
            per_batch,
            all,
            fmt(last, 0),
        );
    }

    let _ = writeln!(
        out,
        "\n5. Where the shim makes a key twice (as asked, to read the backend's answers, then as its wrappable twin),\n   \
         µs per key, medians (p10-p90): C_UnwrapKey of an unextractable AES key into a stored key against the same\n   \
         native unwrap (a session object); C_GenerateKey of a new request shape (16 shapes) and of one seen before,\n   \
         against a native generation"
    );
    let _ = writeln!(
        out,
        "{:<9} {:>20} {:>20} {:>6} {:>20} {:>20} {:>20}",
        "engine", "unwrap native", "unwrap stored", "ratio", "generate native", "new shape", "seen shape"
    );
    let spread = |k: &str| match (get(&format!("{k}.median")), get(&format!("{k}.p10")), get(&format!("{k}.p90"))) {
        (Some(m), Some(lo), Some(hi)) => format!("{m:.1} ({lo:.1}-{hi:.1})"),
        _ => "-".into(),
    };
    for e in ["sqlite", "postgres"].into_iter().filter(|e| has(e)) {
        let ratio = get(&format!("{e}.create.unwrap_stored_us.median"))
            .zip(get(&format!("{e}.create.unwrap_native_us.median")))
            .map(|(s, n)| s / n);
        let _ = writeln!(
            out,
            "{:<9} {:>20} {:>20} {:>6} {:>20} {:>20} {:>20}",
            e,
            spread(&format!("{e}.create.unwrap_native_us")),
            spread(&format!("{e}.create.unwrap_stored_us")),
            fmt(ratio, 2),
            spread(&format!("{e}.create.generate_native_us")),
            spread(&format!("{e}.create.generate_first_us")),
            spread(&format!("{e}.create.generate_again_us")),
        );
    }

    if has("cache") {
        let _ = writeln!(
            out,
            "\n6. C_FindObjects by label (one match among {} stored keys) as the process uses more of them, µs:\n   \
             median (p10-p90), and its ratio to the find with none used (the mean of the first and of the one after\n   \
             C_Logout/C_Login, which drops every copy); target <= 1.2. copies: the shim's objects in the HSM.\n   \
             bounded: the default [store] hsm_cache{}; unbounded: hsm_cache = 1000000",
            knobs.cache_used.last().copied().unwrap_or(0),
            if knobs.bench_mode { "" } else { " (8 under cargo test)" }
        );
        let _ = writeln!(
            out,
            "{:<9} {:<10} {:>8} {:>24} {:>6} {:>7} {:>10}",
            "backend", "cache", "used", "find", "ratio", "copies", "use µs/key"
        );
        for backend in CACHE_BACKENDS {
            for variant in ["bounded", "unbounded"] {
                let k = |f: &str| format!("cache.{backend}.{variant}.{f}");
                let none =
                    get(&k("find.00000_us.median")).zip(get(&k("find.again_us.median"))).map(|(a, b)| (a + b) / 2.0);
                let mut levels: Vec<String> = knobs.cache_used.iter().map(|n| format!("{n:05}")).collect();
                levels.push("again".into());
                for level in levels {
                    let Some(m) = get(&k(&format!("find.{level}_us.median"))) else { continue };
                    let used = match level.parse::<usize>() {
                        Ok(n) => n.to_string(),
                        Err(_) => "0 again".to_string(),
                    };
                    let _ = writeln!(
                        out,
                        "{:<9} {:<10} {:>8} {:>24} {:>6} {:>7} {:>10}",
                        backend,
                        variant,
                        used,
                        spread(&k(&format!("find.{level}_us"))),
                        fmt(none.map(|n| m / n), 2),
                        fmt(get(&k(&format!("copies.{level}"))), 0),
                        fmt(get(&k(&format!("use.{level}_us"))), 1),
                    );
                }
            }
        }
    }
    out
}

fn main() {
    let knobs = Knobs::from_env();
    match std::env::var("STORE_BENCH_PHASE") {
        Ok(phase) => {
            // Multi-threaded before anything is measured (see benches/forward.rs: glibc skips atomics while a
            // process has only ever had one thread).
            std::thread::spawn(|| ()).join().expect("a thread");
            child(&knobs, &phase);
        }
        Err(_) => parent(&knobs),
    }
}
