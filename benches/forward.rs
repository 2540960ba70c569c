//! What forwarding through the shim costs: SoftHSM2 called directly vs through libp11shim.so, in one
//! process, on the same SoftHSM2 instance (the shim's backend is the library this benchmark loaded, so the
//! same sessions and key handles work through both).
//!
//! `cargo bench --bench forward` runs the criterion groups (direct and shim side by side, 1 and 2 threads),
//! then its own interleaved measurement (median of several rounds, direct and shim alternating) and prints a
//! summary table of the differences and ratios; BENCHMARKS.md records the figures.
//!
//! Set-up: a fresh SoftHSM2 token under <target>/bench-tokens; SoftHSM2 is initialized directly first (with
//! CKF_OS_LOCKING_OK, as the shim does), then the shim, which finds it already initialized and accepts that.
//!
//! Environment: FORWARD_AA=1 makes the "shim" column call SoftHSM2 directly too (an A/A run: the noise
//! floor of the method on this machine); FORWARD_NO_SUMMARY=1 skips the summary; SOFTHSM2_MODULE names
//! libsofthsm2.so if it is not in a usual place. Criterion arguments work as usual, e.g.
//! `cargo bench --bench forward -- get_session_info` (a filter that matches nothing runs only the summary).
#![deny(unsafe_op_in_unsafe_fn)]

use criterion::{black_box, Criterion};
use cryptoki_sys::*;
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SO_PIN: &str = "12345678";
const USER_PIN: &str = "123456";
const LABEL: &str = "p11shim-bench";
/// prime256v1 (1.2.840.10045.3.1.7), DER.
const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

// -----------------------------------------------------------------------------------------------------------
// The two paths

/// The few entries the benchmark calls, from one function list (SoftHSM2's own, or the shim's).
#[derive(Clone, Copy)]
struct Api {
    name: &'static str,
    f: &'static CK_FUNCTION_LIST,
}

macro_rules! call {
    ($api:expr, $f:ident ( $($arg:expr),* $(,)? )) => {{
        let f = $api.f.$f.expect(concat!(stringify!($f), " is NULL"));
        // SAFETY: every call site passes arguments valid for the call.
        unsafe { f($($arg),*) }
    }};
}

fn ok(rv: CK_RV, what: &str) {
    if rv != CKR_OK {
        failed(rv, what);
    }
}

#[cold]
#[inline(never)]
fn failed(rv: CK_RV, what: &str) -> ! {
    panic!("{what} failed: CK_RV {rv:#x}");
}

impl Api {
    fn open(&self, slot: CK_SLOT_ID) -> CK_SESSION_HANDLE {
        let mut s = 0;
        ok(
            call!(self, C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, null_mut(), None, &mut s)),
            "C_OpenSession",
        );
        s
    }

    fn close(&self, s: CK_SESSION_HANDLE) {
        ok(call!(self, C_CloseSession(s)), "C_CloseSession");
    }
}

/// Loads a module with RTLD_NOW|RTLD_LOCAL, never to be unloaded (SoftHSM2 must not be dlclose'd), and
/// returns its 2.40 function list.
fn load(path: &Path) -> &'static CK_FUNCTION_LIST {
    // SAFETY: loading a PKCS#11 module runs its initializers, which is what it is made for.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
    type GetFunctionList = unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV;
    // SAFETY: the PKCS#11 signature of C_GetFunctionList.
    let get = *unsafe { lib.get::<GetFunctionList>(b"C_GetFunctionList\0") }.expect("C_GetFunctionList");
    let mut list = null_mut();
    // SAFETY: valid out pointer.
    ok(unsafe { get(&mut list) }, "C_GetFunctionList");
    std::mem::forget(lib);
    // SAFETY: the list is static in the module, which stays loaded.
    unsafe { &*list }
}

// -----------------------------------------------------------------------------------------------------------
// The operations

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    SessionInfo,
    EcdsaSign,
    HmacSha256,
}

impl Op {
    const ALL: [Op; 3] = [Op::SessionInfo, Op::EcdsaSign, Op::HmacSha256];

    fn name(self) -> &'static str {
        match self {
            Op::SessionInfo => "C_GetSessionInfo",
            Op::EcdsaSign => "ECDSA P-256 sign (32 B digest)",
            Op::HmacSha256 => "HMAC-SHA256 sign (1 KiB)",
        }
    }

    fn id(self) -> &'static str {
        match self {
            Op::SessionInfo => "get_session_info",
            Op::EcdsaSign => "ecdsa_p256_sign",
            Op::HmacSha256 => "hmac_sha256_1k",
        }
    }
}

#[derive(Clone, Copy)]
struct Keys {
    ec_private: CK_OBJECT_HANDLE,
    hmac: CK_OBJECT_HANDLE,
}

/// One operation, through `api`, in session `s`.
#[inline(always)]
fn run_once(api: Api, op: Op, keys: Keys, s: CK_SESSION_HANDLE) {
    match op {
        Op::SessionInfo => {
            let mut info = CK_SESSION_INFO { slotID: 0, state: 0, flags: 0, ulDeviceError: 0 };
            ok(call!(api, C_GetSessionInfo(s, &mut info)), "C_GetSessionInfo");
            black_box(info.state);
        }
        Op::EcdsaSign => {
            let digest = [0x5au8; 32];
            sign(api, s, CKM_ECDSA, keys.ec_private, &digest, &mut [0u8; 64]);
        }
        Op::HmacSha256 => {
            let data = [0xa5u8; 1024];
            sign(api, s, CKM_SHA256_HMAC, keys.hmac, &data, &mut [0u8; 32]);
        }
    }
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

// -----------------------------------------------------------------------------------------------------------
// Timing: one thread, or two threads each with its own session

/// Runs `iters` operations on the calling thread; returns the elapsed time.
fn time_one(api: Api, op: Op, keys: Keys, s: CK_SESSION_HANDLE, iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        run_once(api, op, keys, s);
    }
    start.elapsed()
}

/// Two worker threads, each with its own session, that run `iters` operations each on request; the time is
/// from the moment both are released to the moment both are done.
struct Pair {
    start: Arc<Barrier>,
    done: Arc<Barrier>,
    iters: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl Pair {
    fn new(api: Api, op: Op, keys: Keys, slot: CK_SLOT_ID) -> Pair {
        let start = Arc::new(Barrier::new(3));
        let done = Arc::new(Barrier::new(3));
        let iters = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..2)
            .map(|_| {
                let (start, done, iters, stop) = (start.clone(), done.clone(), iters.clone(), stop.clone());
                std::thread::spawn(move || {
                    let s = api.open(slot);
                    loop {
                        start.wait();
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        for _ in 0..iters.load(Ordering::Acquire) {
                            run_once(api, op, keys, s);
                        }
                        done.wait();
                    }
                    api.close(s);
                })
            })
            .collect();
        Pair { start, done, iters, stop, workers }
    }

    /// Time for `iters` operations on each thread, both running at once.
    fn time(&self, iters: u64) -> Duration {
        self.iters.store(iters, Ordering::Release);
        self.start.wait();
        let t = Instant::now();
        self.done.wait();
        t.elapsed()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.start.wait();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Runs an operation on one thread (in a session of its own) or on two.
enum Runner {
    One { api: Api, op: Op, keys: Keys, session: CK_SESSION_HANDLE },
    Two(Pair),
}

impl Runner {
    fn new(b: &Bench, api: Api, op: Op, threads: usize) -> Runner {
        match threads {
            1 => Runner::One { api, op, keys: b.keys, session: api.open(b.slot) },
            2 => Runner::Two(Pair::new(api, op, b.keys, b.slot)),
            _ => unreachable!("1 or 2 threads"),
        }
    }

    /// Time for `iters` operations (on each thread).
    fn time(&self, iters: u64) -> Duration {
        match self {
            Runner::One { api, op, keys, session } => time_one(*api, *op, *keys, *session, iters),
            Runner::Two(pair) => pair.time(iters),
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if let Runner::One { api, session, .. } = self {
            api.close(*session);
        }
    }
}

// -----------------------------------------------------------------------------------------------------------
// Set-up

/// <target>/<profile>, from <target>/<profile>/deps/forward-<hash>.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("<target>/<profile>/deps/<bench>").to_path_buf()
}

fn softhsm_path() -> PathBuf {
    [
        std::env::var_os("SOFTHSM2_MODULE").map(PathBuf::from),
        Some("/usr/lib/softhsm/libsofthsm2.so".into()),
        Some("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so".into()),
        Some("/usr/local/lib/softhsm/libsofthsm2.so".into()),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.exists())
    .expect("libsofthsm2.so not found (apt-get install softhsm2, or set SOFTHSM2_MODULE)")
}

/// A fresh SoftHSM2 configuration and token directory under <target>/bench-tokens.
fn fresh_softhsm_conf() -> PathBuf {
    let dir = profile_dir().parent().unwrap().join("bench-tokens").join("forward");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("tokens")).unwrap();
    let conf = dir.join("softhsm2.conf");
    let text = format!(
        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
        dir.join("tokens").display()
    );
    std::fs::write(&conf, text).unwrap();
    conf
}

fn padded<const N: usize>(text: &str) -> [u8; N] {
    let mut field = [b' '; N];
    field[..text.len()].copy_from_slice(text.as_bytes());
    field
}

fn slots(api: Api, token_present: bool) -> Vec<CK_SLOT_ID> {
    let mut n: CK_ULONG = 0;
    ok(call!(api, C_GetSlotList(token_present as CK_BBOOL, null_mut(), &mut n)), "C_GetSlotList");
    let mut list = vec![0; n as usize];
    ok(call!(api, C_GetSlotList(token_present as CK_BBOOL, list.as_mut_ptr(), &mut n)), "C_GetSlotList");
    list.truncate(n as usize);
    list
}

fn token_label(api: Api, slot: CK_SLOT_ID) -> [u8; 32] {
    // SAFETY: plain data.
    let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
    ok(call!(api, C_GetTokenInfo(slot, &mut info)), "C_GetTokenInfo");
    info.label
}

/// Initializes a token on SoftHSM2's free slot and logs the user in; returns the slot (SoftHSM2 renumbers it
/// after C_InitToken) and a session that stays open, so the login lasts.
fn init_token(api: Api) -> (CK_SLOT_ID, CK_SESSION_HANDLE) {
    let free = *slots(api, false).last().expect("a free SoftHSM2 slot");
    let mut label = padded::<32>(LABEL);
    let so = SO_PIN.as_bytes().as_ptr() as *mut u8;
    ok(call!(api, C_InitToken(free, so, SO_PIN.len() as CK_ULONG, label.as_mut_ptr())), "C_InitToken");
    let slot = slots(api, true).into_iter().find(|s| token_label(api, *s) == label).expect("the new token");
    let s = api.open(slot);
    let user = USER_PIN.as_bytes().as_ptr() as *mut u8;
    ok(call!(api, C_Login(s, CKU_SO, so, SO_PIN.len() as CK_ULONG)), "C_Login(SO)");
    ok(call!(api, C_InitPIN(s, user, USER_PIN.len() as CK_ULONG)), "C_InitPIN");
    ok(call!(api, C_Logout(s)), "C_Logout");
    ok(call!(api, C_Login(s, CKU_USER, user, USER_PIN.len() as CK_ULONG)), "C_Login(USER)");
    (slot, s)
}

fn attr<T>(type_: CK_ATTRIBUTE_TYPE, value: &T) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_,
        pValue: value as *const T as *mut c_void,
        ulValueLen: std::mem::size_of_val(value) as CK_ULONG,
    }
}

/// Session keys (no disk I/O while signing): an EC P-256 key pair and a 32-byte generic secret for HMAC.
fn make_keys(api: Api, s: CK_SESSION_HANDLE) -> Keys {
    let (yes, no): (CK_BBOOL, CK_BBOOL) = (CK_TRUE, CK_FALSE);
    let mut public = [attr(CKA_TOKEN, &no), attr(CKA_VERIFY, &yes), attr(CKA_EC_PARAMS, &P256)];
    let mut private = [attr(CKA_TOKEN, &no), attr(CKA_PRIVATE, &yes), attr(CKA_SENSITIVE, &yes), attr(CKA_SIGN, &yes)];
    let mut m = CK_MECHANISM { mechanism: CKM_EC_KEY_PAIR_GEN, pParameter: null_mut(), ulParameterLen: 0 };
    let (mut ec_public, mut ec_private) = (0, 0);
    let rv = call!(
        api,
        C_GenerateKeyPair(
            s,
            &mut m,
            public.as_mut_ptr(),
            public.len() as CK_ULONG,
            private.as_mut_ptr(),
            private.len() as CK_ULONG,
            &mut ec_public,
            &mut ec_private
        )
    );
    ok(rv, "C_GenerateKeyPair(EC P-256)");

    let (class, key_type, len): (CK_OBJECT_CLASS, CK_KEY_TYPE, CK_ULONG) = (CKO_SECRET_KEY, CKK_GENERIC_SECRET, 32);
    let mut secret = [
        attr(CKA_CLASS, &class),
        attr(CKA_KEY_TYPE, &key_type),
        attr(CKA_VALUE_LEN, &len),
        attr(CKA_TOKEN, &no),
        attr(CKA_SIGN, &yes),
    ];
    let mut m = CK_MECHANISM { mechanism: CKM_GENERIC_SECRET_KEY_GEN, pParameter: null_mut(), ulParameterLen: 0 };
    let mut hmac = 0;
    ok(
        call!(api, C_GenerateKey(s, &mut m, secret.as_mut_ptr(), secret.len() as CK_ULONG, &mut hmac)),
        "C_GenerateKey(HMAC)",
    );
    Keys { ec_private, hmac }
}

struct Bench {
    direct: Api,
    shim: Api,
    /// The shim's function list even under FORWARD_AA.
    real_shim: Api,
    slot: CK_SLOT_ID,
    keys: Keys,
    keeper: CK_SESSION_HANDLE,
}

fn set_up() -> Bench {
    let conf = fresh_softhsm_conf();
    let softhsm = softhsm_path();
    let shim_path = profile_dir().join("libp11shim.so");
    assert!(shim_path.exists(), "{} is missing: `cargo bench` builds it", shim_path.display());
    // Set while no other thread runs, and before either library reads them.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    std::env::set_var("P11SHIM_MODULE", &softhsm);
    std::env::remove_var("P11SHIM_CONFIG");

    let direct = Api { name: "direct", f: load(&softhsm) };
    let mut args = CK_C_INITIALIZE_ARGS {
        CreateMutex: None,
        DestroyMutex: None,
        LockMutex: None,
        UnlockMutex: None,
        flags: CKF_OS_LOCKING_OK,
        pReserved: null_mut(),
    };
    ok(call!(direct, C_Initialize(&mut args as *mut _ as *mut c_void)), "SoftHSM2 C_Initialize");
    let shim = Api { name: "shim", f: load(&shim_path) };
    ok(call!(shim, C_Initialize(null_mut())), "shim C_Initialize over an initialized SoftHSM2");
    // FORWARD_AA=1: an A/A control; the "shim" column calls SoftHSM2 directly too, which shows the noise floor.
    let real_shim = shim;
    let shim = if std::env::var_os("FORWARD_AA").is_some() { Api { name: "shim", f: direct.f } } else { shim };

    let (slot, keeper) = init_token(direct);
    let keys = make_keys(direct, keeper);
    // The keys work through the shim too (one SoftHSM2 instance; handles pass through unchanged).
    let s = shim.open(slot);
    for op in Op::ALL {
        run_once(shim, op, keys, s);
    }
    shim.close(s);
    Bench { direct, shim, real_shim, slot, keys, keeper }
}

// -----------------------------------------------------------------------------------------------------------
// Criterion groups

fn criterion_groups(c: &mut Criterion, b: &Bench) {
    for op in Op::ALL {
        for threads in [1, 2] {
            let mut group =
                c.benchmark_group(format!("{}/{threads} thread{}", op.id(), if threads == 1 { "" } else { "s" }));
            for api in [b.direct, b.shim] {
                let runner = Runner::new(b, api, op, threads);
                group.bench_function(api.name, |bench| bench.iter_custom(|iters| runner.time(iters)));
            }
            group.finish();
        }
    }
}

// -----------------------------------------------------------------------------------------------------------
// The summary: our own interleaved rounds, median per case

const ROUNDS: usize = 101;
const ROUND_TIME: Duration = Duration::from_millis(10);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One case of the summary: medians over the rounds, and medians of the paired (adjacent-round) differences
/// and ratios, which cancel most of the drift a shared machine causes.
struct Figures {
    direct: f64,
    shim: f64,
    diff: f64,
    ratio: f64,
}

/// Nanoseconds per operation (per thread), direct and shim measured in short alternating rounds.
fn measure(b: &Bench, op: Op, threads: usize) -> Figures {
    let runners = [Runner::new(b, b.direct, op, threads), Runner::new(b, b.shim, op, threads)];
    // Iterations per round, from a short calibration run of the direct path.
    let mut n = 16u64;
    let mut t = runners[0].time(n);
    while t < ROUND_TIME / 4 {
        n *= 2;
        t = runners[0].time(n);
    }
    let iters = ((ROUND_TIME.as_secs_f64() / t.as_secs_f64()) * n as f64).max(1.0) as u64;
    runners[1].time(iters / 4 + 1); // warm the shim path as well
    let (mut d, mut s) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let time = |i: usize| runners[i].time(iters).as_nanos() as f64 / iters as f64;
        // Alternate which path goes first, so neither is favoured by drift within a pair.
        if round % 2 == 0 {
            d.push(time(0));
            s.push(time(1));
        } else {
            s.push(time(1));
            d.push(time(0));
        }
    }
    let diffs = d.iter().zip(&s).map(|(d, s)| s - d).collect();
    let ratios = d.iter().zip(&s).map(|(d, s)| s / d).collect();
    Figures { direct: median(d), shim: median(s), diff: median(diffs), ratio: median(ratios) }
}

fn summary(b: &Bench) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\np11shim forward: ns per operation and thread ({ROUNDS} rounds of ~{} ms per path, direct and shim alternating;\n\
         medians; diff and ratio are medians of the per-round pairs)",
        ROUND_TIME.as_millis()
    );
    let _ = writeln!(
        out,
        "{:<32} {:>7} {:>12} {:>12} {:>10} {:>12}",
        "operation", "threads", "direct ns", "shim ns", "diff ns", "shim/direct"
    );
    let mut scaling = Vec::new();
    for op in Op::ALL {
        let mut per_thread = Vec::new();
        for threads in [1, 2] {
            let f = measure(b, op, threads);
            let _ = writeln!(
                out,
                "{:<32} {:>7} {:>12.1} {:>12.1} {:>10.1} {:>12.4}",
                op.name(),
                threads,
                f.direct,
                f.shim,
                f.diff,
                f.ratio
            );
            per_thread.push(f);
        }
        // Throughput with 2 threads / throughput with 1 thread = 2 * t1 / t2.
        let (one, two) = (&per_thread[0], &per_thread[1]);
        scaling.push((op, 2.0 * one.direct / two.direct, 2.0 * one.shim / two.shim));
    }
    let _ = writeln!(out, "\n2-thread scaling (throughput with 2 threads / with 1 thread; 2.0 is perfect)");
    let _ = writeln!(out, "{:<32} {:>8} {:>8}", "operation", "direct", "shim");
    for (op, d, s) in scaling {
        let _ = writeln!(out, "{:<32} {:>8.2} {:>8.2}", op.name(), d, s);
    }
    out
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    // Make the process multi-threaded before anything is measured. glibc and libstdc++ skip atomics and locks
    // while a process has only ever had one thread (__libc_single_threaded), which makes SoftHSM2's
    // C_GetSessionInfo ~20 ns faster; without this, whichever benchmark runs first (before the 2-thread
    // benchmarks or criterion's analysis threads exist) gets that advantage, which looked like a shim cost.
    std::thread::spawn(|| ()).join().expect("a thread");
    let b = set_up();
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30)
        .without_plots()
        .configure_from_args();
    criterion_groups(&mut c, &b);
    c.final_summary();
    // Under `cargo test` (no --bench), criterion only checks that each benchmark runs; so do we.
    if bench_mode && std::env::var_os("FORWARD_NO_SUMMARY").is_none() {
        let table = summary(&b);
        println!("{table}");
        let path = profile_dir().parent().unwrap().join("bench-tokens").join("forward-summary.txt");
        let _ = std::fs::write(&path, &table);
        println!("(also written to {})", path.display());
    }
    b.direct.close(b.keeper);
    ok(call!(b.real_shim, C_Finalize(null_mut())), "shim C_Finalize");
    ok(call!(b.direct, C_Finalize(null_mut())), "SoftHSM2 C_Finalize");
}
