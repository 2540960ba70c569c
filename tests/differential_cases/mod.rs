//! Differential test: one scripted sequence of raw PKCS#11 calls, run against the backend directly and then
//! through the shim, must give the same log of (call, CK_RV, outputs): the shim returns what the backend
//! returns. The backend is the test binary's (tests/differential.rs: SoftHSM2, tests/differential_cssim.rs:
//! the simulator); the script is the same for both, and where the backends differ (mechanisms, return
//! values, slot numbering) each log simply records its backend's answers.
//!
//! Each run is a child process (this test binary re-executed with `P11SHIM_DIFF_MODULE` set) with a
//! fresh backend directory of its own: a backend loaded twice in one process would be one instance, and a
//! fresh process makes session and object handles start from the same place, so they are compared too.
//! The backend is run twice directly first: if those two logs differ, the script itself is not
//! deterministic.
//!
//! The sequence covers argument checks before and after C_Initialize, slot/token/mechanism information,
//! C_InitToken/C_InitPIN/C_SetPIN/C_Login with right and wrong PINs, sessions, objects and attributes
//! (length query, CKR_BUFFER_TOO_SMALL, sensitive, invalid type), search, digests, HMAC with a fixed key,
//! AES-ECB/CBC/CBC-PAD/GCM with fixed keys, AES key wrap (RFC 3394 and 5649) and unwrap, ECDH with a fixed
//! private key, RSA and EC key pairs (lengths and verification only: their values are random), operations
//! not initialized or already active, invalid handles and mechanisms, NULL pointers, the functions
//! SoftHSM2 does not support, C_Finalize(non-NULL), and a second C_Initialize that finds the token again.
//! Slot ids and token serial numbers (random in SoftHSM2) are logged by order of appearance.

#![allow(dead_code)] // tests/differential.rs uses a few helpers for its own test

use crate::common::{self, backend, Backend};
use cryptoki_sys::*;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr::null_mut;

pub const ENV_MODULE: &str = "P11SHIM_DIFF_MODULE";
pub const ENV_LOG: &str = "P11SHIM_DIFF_LOG";
/// The test's name in libtest, for the child runs.
pub const TEST_NAME: &str = "differential_cases::shim_behaves_exactly_like_the_backend_direct";

pub const SO_PIN: &[u8] = b"so-pin-1234";
pub const USER_PIN: &[u8] = b"user-pin-1234";
pub const NEW_USER_PIN: &[u8] = b"user-pin-5678";
/// The value a missing function pointer gives instead of a CK_RV.
pub const NO_FUNCTION: CK_RV = 0xFFFF_FFFF_0000_0000;

pub const P256_OID: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
/// The P-256 base point, uncompressed.
pub const P256_G: &str = "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296\
                      4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5";

#[test]
pub fn shim_behaves_exactly_like_the_backend_direct() {
    if let Some(module) = std::env::var_os(ENV_MODULE) {
        // Child: run the script and write the log.
        let (log, manufacturer) = run_script(Path::new(&module));
        let path = PathBuf::from(std::env::var_os(ENV_LOG).expect("P11SHIM_DIFF_LOG"));
        std::fs::write(&path, log.join("\n") + "\n").expect("write log");
        std::fs::write(path.with_extension("manufacturer"), manufacturer).expect("write manufacturer");
        return;
    }
    let direct = common::backend_path();
    let shim = common::shim_path();
    let manufacturer = backend().manufacturer();
    let direct1 = run_child("direct-1", &direct, manufacturer);
    let direct2 = run_child("direct-2", &direct, manufacturer);
    assert!(direct1.len() > 200, "the script logs every call: {} lines", direct1.len());
    if let Some(diff) = first_difference(&direct1, &direct2) {
        panic!("the script is not deterministic: two runs against {:?} direct differ\n{diff}", backend());
    }
    let mut through_shim = run_child("shim", &shim, "p11shim");
    shims_own_answers(&direct1, &mut through_shim);
    if let Some(diff) = first_difference(&direct1, &through_shim) {
        panic!(
            "through the shim differs from {:?} direct (logs in {})\n{diff}",
            backend(),
            common::test_dir().display()
        );
    }
}

/// Runs the script in a child process against `module` with a fresh backend directory; returns its log.
/// The manufacturer C_GetInfo reported (left out of the log, as it differs by design) shows which module
/// answered.
pub fn run_child(name: &str, module: &Path, manufacturer: &str) -> Vec<String> {
    let dir = common::test_dir().join(name);
    let env = common::fresh_backend_env(&dir, 2);
    let log_path = dir.join("calls.log");
    let _ = std::fs::remove_file(&log_path);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads", "1"])
        .env(ENV_MODULE, module)
        .env(ENV_LOG, &log_path)
        .envs(env)
        .env_remove("P11SHIM_CONFIG")
        .env_remove("CSSIM_FAULTS")
        .output()
        .expect("re-run the test binary");
    assert!(
        out.status.success(),
        "the {name} run against {} failed ({}):\n{}\n{}",
        module.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let reported = std::fs::read_to_string(log_path.with_extension("manufacturer")).unwrap_or_default();
    assert_eq!(reported, manufacturer, "C_GetInfo's manufacturerID in the {name} run");
    std::fs::read_to_string(&log_path)
        .unwrap_or_else(|e| panic!("{}: {e}", log_path.display()))
        .lines()
        .map(String::from)
        .collect()
}

/// Calls the shim answers itself instead of forwarding them: C_Initialize while the library is initialized
/// (the shim does not call the backend's C_Initialize again). Whatever its arguments, the shim answers
/// CKR_CRYPTOKI_ALREADY_INITIALIZED, as SoftHSM2 does; the simulator checks the arguments first
/// (CKR_ARGUMENTS_BAD), which PKCS#11 allows too. Where the logs differ only there, the shim's line is
/// checked and then replaced by the backend's.
fn shims_own_answers(direct: &[String], shim: &mut [String]) {
    const OWN: [&str; 2] = ["C_Initialize(CreateMutex only, initialized)", "C_Initialize(pReserved set, initialized)"];
    for (d, s) in direct.iter().zip(shim.iter_mut()) {
        if d != s && OWN.iter().any(|own| d.starts_with(own) && s.starts_with(own)) {
            assert!(s.contains("CryptokiAlreadyInitialized"), "the shim's own answer: {s}");
            *s = d.clone();
        }
    }
}

/// The first difference between two logs with its context, and every other differing line (the script
/// is the same, so the logs stay aligned unless a difference changes its path).
pub fn first_difference(a: &[String], b: &[String]) -> Option<String> {
    let n = a.len().max(b.len());
    let differing: Vec<usize> = (0..n).filter(|&i| a.get(i) != b.get(i)).collect();
    let &i = differing.first()?;
    let line = |log: &[String], j: usize| log.get(j).map_or("<end of log>", String::as_str).to_string();
    let context = |log: &[String]| -> String {
        (i.saturating_sub(3)..(i + 2).min(log.len()))
            .map(|j| format!("  {}{j:4}: {}\n", if j == i { ">" } else { " " }, log[j]))
            .collect()
    };
    let mut text = format!(
        "first difference at line {i}:\n  direct: {}\n  other:  {}\n\ndirect around it:\n{}other around it:\n{}",
        line(a, i),
        line(b, i),
        context(a),
        context(b)
    );
    text += &format!("\n{} differing lines in all", differing.len());
    for &j in differing.iter().skip(1).take(20) {
        text += &format!("\n  {j:4} direct: {}\n  {j:4} other:  {}", line(a, j), line(b, j));
    }
    Some(text)
}

// ---------------------------------------------------------------------------------------------------
// The recorder.

pub fn hx(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

pub fn rv_text(rv: CK_RV) -> String {
    if rv == NO_FUNCTION {
        "NO_FUNCTION".into()
    } else {
        common::rv_name(rv)
    }
}

pub fn len_text(n: CK_ULONG) -> String {
    if n == CK_UNAVAILABLE_INFORMATION {
        "UNAVAILABLE".into()
    } else {
        n.to_string()
    }
}

pub fn blank(b: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(b).trim_end())
}

/// Calls a function of the list, or gives NO_FUNCTION if its pointer is NULL.
macro_rules! ck {
    ($r:expr, $name:ident ( $($arg:expr),* $(,)? )) => {
        match $r.f.$name {
            // SAFETY: the script passes pointers to live buffers of the stated lengths, or NULL where it
            // tests that the module refuses NULL.
            Some(func) => unsafe { func($($arg),*) },
            None => NO_FUNCTION,
        }
    };
}

pub struct Run {
    f: &'static CK_FUNCTION_LIST,
    log: Vec<String>,
    slots: Vec<CK_SLOT_ID>,
    serials: Vec<String>,
    /// Set while outputs are random: [`Run::finish`] logs their lengths only.
    random_output: bool,
    manufacturer: String,
}

impl Run {
    fn rec(&mut self, call: impl AsRef<str>, rv: CK_RV, out: impl AsRef<str>) {
        let out = out.as_ref();
        let line = if out.is_empty() {
            format!("{} -> {}", call.as_ref(), rv_text(rv))
        } else {
            format!("{} -> {} | {out}", call.as_ref(), rv_text(rv))
        };
        self.log.push(line);
    }

    /// A slot id by order of first appearance (SoftHSM2 derives ids of initialized tokens from their
    /// random serial numbers).
    fn slot(&mut self, id: CK_SLOT_ID) -> String {
        if id == BAD_SLOT {
            return "bad-slot".into();
        }
        let i = self.slots.iter().position(|&s| s == id).unwrap_or_else(|| {
            self.slots.push(id);
            self.slots.len() - 1
        });
        format!("slot#{i}")
    }

    fn serial(&mut self, s: &[u8]) -> String {
        let s = String::from_utf8_lossy(s).trim_end().to_string();
        let i = self.serials.iter().position(|x| *x == s).unwrap_or_else(|| {
            self.serials.push(s);
            self.serials.len() - 1
        });
        format!("serial#{i}")
    }
}

pub const BAD_SLOT: CK_SLOT_ID = 0x0BAD_5107;
pub const BAD_SESSION: CK_SESSION_HANDLE = 0x0BAD_5E55;
pub const BAD_OBJECT: CK_OBJECT_HANDLE = 0x0BAD_0B1E;

/// A template whose values live as long as it does.
#[derive(Default)]
pub struct Template {
    attrs: Vec<CK_ATTRIBUTE>,
    values: Vec<Vec<u8>>,
}

impl Template {
    fn bytes(mut self, t: CK_ATTRIBUTE_TYPE, v: &[u8]) -> Self {
        self.values.push(v.to_vec());
        let v = self.values.last_mut().unwrap();
        self.attrs.push(CK_ATTRIBUTE { type_: t, pValue: v.as_mut_ptr().cast(), ulValueLen: v.len() as CK_ULONG });
        self
    }
    fn bool(self, t: CK_ATTRIBUTE_TYPE, b: bool) -> Self {
        self.bytes(t, &[if b { CK_TRUE } else { CK_FALSE }])
    }
    fn ulong(self, t: CK_ATTRIBUTE_TYPE, v: CK_ULONG) -> Self {
        self.bytes(t, &v.to_ne_bytes())
    }
    fn ptr(&mut self) -> *mut CK_ATTRIBUTE {
        self.attrs.as_mut_ptr()
    }
    fn len(&self) -> CK_ULONG {
        self.attrs.len() as CK_ULONG
    }
}

pub fn mech(m: CK_MECHANISM_TYPE) -> CK_MECHANISM {
    CK_MECHANISM { mechanism: m, pParameter: null_mut(), ulParameterLen: 0 }
}

pub fn mech_with<T>(m: CK_MECHANISM_TYPE, param: &mut T) -> CK_MECHANISM {
    CK_MECHANISM {
        mechanism: m,
        pParameter: (param as *mut T).cast(),
        ulParameterLen: std::mem::size_of::<T>() as CK_ULONG,
    }
}

pub fn mech_bytes(m: CK_MECHANISM_TYPE, param: &mut [u8]) -> CK_MECHANISM {
    CK_MECHANISM { mechanism: m, pParameter: param.as_mut_ptr().cast(), ulParameterLen: param.len() as CK_ULONG }
}

// Application-supplied mutex callbacks (the script is single-threaded; they only count).
pub static MUTEX_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
pub extern "C" fn create_mutex(m: *mut *mut c_void) -> CK_RV {
    MUTEX_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if m.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: the library passes a valid out pointer.
    unsafe { *m = Box::into_raw(Box::new(0u8)).cast() };
    CKR_OK
}
pub extern "C" fn destroy_mutex(_: *mut c_void) -> CK_RV {
    CKR_OK
}
pub extern "C" fn lock_mutex(_: *mut c_void) -> CK_RV {
    CKR_OK
}
pub extern "C" fn unlock_mutex(_: *mut c_void) -> CK_RV {
    CKR_OK
}

pub fn init_args(flags: CK_FLAGS) -> CK_C_INITIALIZE_ARGS {
    CK_C_INITIALIZE_ARGS {
        CreateMutex: None,
        DestroyMutex: None,
        LockMutex: None,
        UnlockMutex: None,
        flags,
        pReserved: null_mut(),
    }
}

// ---------------------------------------------------------------------------------------------------
// Steps that several parts of the script use.

impl Run {
    fn initialize(&mut self, what: &str, args: Option<&mut CK_C_INITIALIZE_ARGS>) -> CK_RV {
        let p = args.map_or(null_mut(), |a| (a as *mut CK_C_INITIALIZE_ARGS).cast());
        let rv = ck!(self, C_Initialize(p));
        self.rec(format!("C_Initialize({what})"), rv, "");
        rv
    }

    fn slot_list(&mut self, present: bool) -> Vec<CK_SLOT_ID> {
        let flag = if present { CK_TRUE } else { CK_FALSE };
        let mut n: CK_ULONG = 0;
        let rv = ck!(self, C_GetSlotList(flag, null_mut(), &mut n));
        self.rec(format!("C_GetSlotList({present}, NULL)"), rv, format!("count={n}"));
        let mut v = vec![0; n as usize];
        let rv = ck!(self, C_GetSlotList(flag, v.as_mut_ptr(), &mut n));
        v.truncate(n as usize);
        let names: Vec<String> = v.iter().map(|&s| self.slot(s)).collect();
        self.rec(format!("C_GetSlotList({present})"), rv, names.join(","));
        v
    }

    fn slot_info(&mut self, slot: CK_SLOT_ID) {
        let mut i: CK_SLOT_INFO = Default::default();
        let rv = ck!(self, C_GetSlotInfo(slot, &mut i));
        let name = self.slot(slot);
        self.rec(
            format!("C_GetSlotInfo({name})"),
            rv,
            format!(
                "{} {} flags={:x} hw={}.{} fw={}.{}",
                blank(&i.slotDescription),
                blank(&i.manufacturerID),
                i.flags,
                i.hardwareVersion.major,
                i.hardwareVersion.minor,
                i.firmwareVersion.major,
                i.firmwareVersion.minor
            ),
        );
    }

    fn token_info(&mut self, slot: CK_SLOT_ID) -> CK_FLAGS {
        let mut i: CK_TOKEN_INFO = Default::default();
        let rv = ck!(self, C_GetTokenInfo(slot, &mut i));
        let name = self.slot(slot);
        let serial = if rv == CKR_OK { self.serial(&i.serialNumber) } else { String::new() };
        self.rec(
            format!("C_GetTokenInfo({name})"),
            rv,
            format!(
                "label={} {} {} {serial} flags={:x} sessions={}/{} rw={}/{} pin={}..{} public={}/{} private={}/{} hw={}.{} fw={}.{} time={}",
                blank(&i.label),
                blank(&i.manufacturerID),
                blank(&i.model),
                i.flags,
                len_text(i.ulSessionCount),
                len_text(i.ulMaxSessionCount),
                len_text(i.ulRwSessionCount),
                len_text(i.ulMaxRwSessionCount),
                i.ulMinPinLen,
                i.ulMaxPinLen,
                len_text(i.ulFreePublicMemory),
                len_text(i.ulTotalPublicMemory),
                len_text(i.ulFreePrivateMemory),
                len_text(i.ulTotalPrivateMemory),
                i.hardwareVersion.major,
                i.hardwareVersion.minor,
                i.firmwareVersion.major,
                i.firmwareVersion.minor,
                // SoftHSM2 fills in the current time.
                if i.utcTime.iter().all(u8::is_ascii_digit) { "<time>".into() } else { blank(&i.utcTime) }
            ),
        );
        i.flags
    }

    fn session_info(&mut self, what: &str, session: CK_SESSION_HANDLE) {
        let mut i: CK_SESSION_INFO = Default::default();
        let rv = ck!(self, C_GetSessionInfo(session, &mut i));
        let slot = if rv == CKR_OK { self.slot(i.slotID) } else { String::new() };
        self.rec(
            format!("C_GetSessionInfo({what}={session})"),
            rv,
            format!("{slot} state={} flags={:x} err={}", i.state, i.flags, i.ulDeviceError),
        );
    }

    fn open_session(&mut self, slot: CK_SLOT_ID, flags: CK_FLAGS) -> CK_SESSION_HANDLE {
        let mut h: CK_SESSION_HANDLE = 0;
        let rv = ck!(self, C_OpenSession(slot, flags, null_mut(), None, &mut h));
        let name = self.slot(slot);
        self.rec(format!("C_OpenSession({name}, flags={flags:x})"), rv, format!("session={h}"));
        h
    }

    fn login(&mut self, s: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: &[u8]) -> CK_RV {
        let rv = ck!(self, C_Login(s, user, pin.as_ptr() as *mut u8, pin.len() as CK_ULONG));
        self.rec(format!("C_Login({s}, user={user}, pin={})", String::from_utf8_lossy(pin)), rv, "");
        rv
    }

    fn logout(&mut self, s: CK_SESSION_HANDLE) {
        let rv = ck!(self, C_Logout(s));
        self.rec(format!("C_Logout({s})"), rv, "");
    }

    fn create(&mut self, what: &str, s: CK_SESSION_HANDLE, mut t: Template) -> CK_OBJECT_HANDLE {
        let mut h: CK_OBJECT_HANDLE = 0;
        let rv = ck!(self, C_CreateObject(s, t.ptr(), t.len(), &mut h));
        self.rec(format!("C_CreateObject({what})"), rv, format!("object={h}"));
        h
    }

    /// C_GetAttributeValue with the length query first, then buffers of the returned lengths.
    fn attributes(&mut self, s: CK_SESSION_HANDLE, o: CK_OBJECT_HANDLE, types: &[CK_ATTRIBUTE_TYPE]) {
        let mut t: Vec<CK_ATTRIBUTE> =
            types.iter().map(|&type_| CK_ATTRIBUTE { type_, pValue: null_mut(), ulValueLen: 0 }).collect();
        let rv = ck!(self, C_GetAttributeValue(s, o, t.as_mut_ptr(), t.len() as CK_ULONG));
        let lens: Vec<String> = t.iter().map(|a| format!("{:x}:{}", a.type_, len_text(a.ulValueLen))).collect();
        self.rec(format!("C_GetAttributeValue({o}, lengths)"), rv, lens.join(" "));
        let mut bufs: Vec<Vec<u8>> = t
            .iter()
            .map(|a| vec![0u8; if a.ulValueLen == CK_UNAVAILABLE_INFORMATION { 0 } else { a.ulValueLen as usize }])
            .collect();
        for (a, b) in t.iter_mut().zip(bufs.iter_mut()) {
            a.pValue = if b.is_empty() { null_mut() } else { b.as_mut_ptr().cast() };
            a.ulValueLen = b.len() as CK_ULONG;
        }
        let rv = ck!(self, C_GetAttributeValue(s, o, t.as_mut_ptr(), t.len() as CK_ULONG));
        let values: Vec<String> = t
            .iter()
            .zip(&bufs)
            .map(|(a, b)| {
                if a.ulValueLen == CK_UNAVAILABLE_INFORMATION {
                    format!("{:x}=UNAVAILABLE", a.type_)
                } else {
                    format!("{:x}={}", a.type_, hx(&b[..(a.ulValueLen as usize).min(b.len())]))
                }
            })
            .collect();
        self.rec(format!("C_GetAttributeValue({o}, values)"), rv, values.join(" "));
    }

    /// One attribute into a buffer of `len` bytes (None: pValue NULL).
    fn attribute_into(&mut self, s: CK_SESSION_HANDLE, o: CK_OBJECT_HANDLE, t: CK_ATTRIBUTE_TYPE, len: Option<usize>) {
        let mut buf = vec![0xEEu8; len.unwrap_or(0)];
        let mut a = CK_ATTRIBUTE {
            type_: t,
            pValue: if len.is_some() { buf.as_mut_ptr().cast() } else { null_mut() },
            ulValueLen: buf.len() as CK_ULONG,
        };
        let rv = ck!(self, C_GetAttributeValue(s, o, &mut a, 1));
        let shown = if a.ulValueLen == CK_UNAVAILABLE_INFORMATION {
            &buf[..]
        } else {
            &buf[..(a.ulValueLen as usize).min(buf.len())]
        };
        self.rec(
            format!("C_GetAttributeValue({s}, {o}, {t:x}, buffer={len:?})"),
            rv,
            format!("len={} value={}", len_text(a.ulValueLen), hx(shown)),
        );
    }

    fn find(&mut self, what: &str, s: CK_SESSION_HANDLE, mut t: Template, max: usize) -> Vec<CK_OBJECT_HANDLE> {
        let rv = ck!(self, C_FindObjectsInit(s, t.ptr(), t.len()));
        self.rec(format!("C_FindObjectsInit({what})"), rv, "");
        let mut all = Vec::new();
        loop {
            let mut buf = vec![0 as CK_OBJECT_HANDLE; max];
            let mut n: CK_ULONG = 0;
            let rv = ck!(self, C_FindObjects(s, buf.as_mut_ptr(), max as CK_ULONG, &mut n));
            buf.truncate(n as usize);
            self.rec(format!("C_FindObjects({what}, max={max})"), rv, format!("{buf:?}"));
            if rv != CKR_OK || n == 0 || all.len() > 1000 {
                break;
            }
            all.extend(buf);
        }
        let rv = ck!(self, C_FindObjectsFinal(s));
        self.rec(format!("C_FindObjectsFinal({what})"), rv, "");
        all
    }

    /// C_Digest with the length query, a too small buffer and the real one.
    fn digest(&mut self, s: CK_SESSION_HANDLE, m: CK_MECHANISM_TYPE, data: &[u8]) {
        let mut mm = mech(m);
        let rv = ck!(self, C_DigestInit(s, &mut mm));
        self.rec(format!("C_DigestInit({m:x})"), rv, "");
        self.finish("C_Digest", s, data, |r, s, d, out, n| {
            ck!(r, C_Digest(s, d.as_ptr() as *mut u8, d.len() as CK_ULONG, out, n))
        });
    }

    /// The output protocol of a single-part function: NULL (length), 1 byte (too small), full buffer.
    fn finish(
        &mut self,
        name: &str,
        s: CK_SESSION_HANDLE,
        data: &[u8],
        call: impl Fn(&Run, CK_SESSION_HANDLE, &[u8], *mut u8, *mut CK_ULONG) -> CK_RV,
    ) -> Vec<u8> {
        let mut n: CK_ULONG = 0;
        let rv = call(self, s, data, null_mut(), &mut n);
        self.rec(format!("{name}({s}, NULL)"), rv, format!("len={}", len_text(n)));
        let mut small = [0u8; 1];
        let mut n1: CK_ULONG = 1;
        let rv1 = call(self, s, data, small.as_mut_ptr(), &mut n1);
        self.rec(format!("{name}({s}, 1 byte)"), rv1, format!("len={}", len_text(n1)));
        let mut out = vec![0u8; (n as usize).max(n1 as usize).clamp(1, 4096)];
        let mut n2 = out.len() as CK_ULONG;
        let rv = call(self, s, data, out.as_mut_ptr(), &mut n2);
        out.truncate((n2 as usize).min(out.len()));
        let shown = if self.random_output { "<random>".into() } else { hx(&out) };
        self.rec(format!("{name}({s})"), rv, format!("len={} {shown}", len_text(n2)));
        out
    }

    fn sign(
        &mut self,
        s: CK_SESSION_HANDLE,
        m: &mut CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
        data: &[u8],
        show: bool,
    ) -> Vec<u8> {
        let rv = ck!(self, C_SignInit(s, m, key));
        self.rec(format!("C_SignInit({:x}, key={key})", m.mechanism), rv, "");
        let mut n: CK_ULONG = 0;
        let rv = ck!(self, C_Sign(s, data.as_ptr() as *mut u8, data.len() as CK_ULONG, null_mut(), &mut n));
        self.rec(format!("C_Sign({s}, NULL)"), rv, format!("len={}", len_text(n)));
        let mut out = vec![0u8; n.clamp(1, 4096) as usize];
        let mut n = out.len() as CK_ULONG;
        let rv = ck!(self, C_Sign(s, data.as_ptr() as *mut u8, data.len() as CK_ULONG, out.as_mut_ptr(), &mut n));
        out.truncate((n as usize).min(out.len()));
        let shown = if show { hx(&out) } else { String::from("<random>") };
        self.rec(format!("C_Sign({s})"), rv, format!("len={} {shown}", len_text(n)));
        out
    }

    fn verify(&mut self, s: CK_SESSION_HANDLE, m: &mut CK_MECHANISM, key: CK_OBJECT_HANDLE, data: &[u8], sig: &[u8]) {
        let rv = ck!(self, C_VerifyInit(s, m, key));
        self.rec(format!("C_VerifyInit({:x}, key={key})", m.mechanism), rv, "");
        let rv = ck!(
            self,
            C_Verify(
                s,
                data.as_ptr() as *mut u8,
                data.len() as CK_ULONG,
                sig.as_ptr() as *mut u8,
                sig.len() as CK_ULONG
            )
        );
        self.rec(format!("C_Verify({s}, data={}, sig={} bytes)", hx(&data[..data.len().min(8)]), sig.len()), rv, "");
    }

    fn encrypt(&mut self, s: CK_SESSION_HANDLE, m: &mut CK_MECHANISM, key: CK_OBJECT_HANDLE, data: &[u8]) -> Vec<u8> {
        let rv = ck!(self, C_EncryptInit(s, m, key));
        self.rec(format!("C_EncryptInit({:x}, key={key})", m.mechanism), rv, "");
        self.finish("C_Encrypt", s, data, |r, s, d, out, n| {
            ck!(r, C_Encrypt(s, d.as_ptr() as *mut u8, d.len() as CK_ULONG, out, n))
        })
    }

    fn decrypt(&mut self, s: CK_SESSION_HANDLE, m: &mut CK_MECHANISM, key: CK_OBJECT_HANDLE, data: &[u8]) -> Vec<u8> {
        let rv = ck!(self, C_DecryptInit(s, m, key));
        self.rec(format!("C_DecryptInit({:x}, key={key})", m.mechanism), rv, "");
        self.finish("C_Decrypt", s, data, |r, s, d, out, n| {
            ck!(r, C_Decrypt(s, d.as_ptr() as *mut u8, d.len() as CK_ULONG, out, n))
        })
    }

    fn wrap(
        &mut self,
        s: CK_SESSION_HANDLE,
        m: CK_MECHANISM_TYPE,
        wrapping: CK_OBJECT_HANDLE,
        key: CK_OBJECT_HANDLE,
        show: bool,
    ) -> Vec<u8> {
        let mut mm = mech(m);
        let mut n: CK_ULONG = 0;
        let rv = ck!(self, C_WrapKey(s, &mut mm, wrapping, key, null_mut(), &mut n));
        self.rec(format!("C_WrapKey({m:x}, {wrapping}, {key}, NULL)"), rv, format!("len={}", len_text(n)));
        let mut small = [0u8; 1];
        let mut n1: CK_ULONG = 1;
        let rv = ck!(self, C_WrapKey(s, &mut mm, wrapping, key, small.as_mut_ptr(), &mut n1));
        self.rec(format!("C_WrapKey({m:x}, {wrapping}, {key}, 1 byte)"), rv, format!("len={}", len_text(n1)));
        let mut out = vec![0u8; n.clamp(1, 8192) as usize];
        let mut n = out.len() as CK_ULONG;
        let rv = ck!(self, C_WrapKey(s, &mut mm, wrapping, key, out.as_mut_ptr(), &mut n));
        out.truncate((n as usize).min(out.len()));
        let shown = if show { hx(&out) } else { "<contains random key>".into() };
        self.rec(format!("C_WrapKey({m:x}, {wrapping}, {key})"), rv, format!("len={} {shown}", len_text(n)));
        out
    }

    fn unwrap(
        &mut self,
        what: &str,
        s: CK_SESSION_HANDLE,
        m: CK_MECHANISM_TYPE,
        unwrapping: CK_OBJECT_HANDLE,
        wrapped: &[u8],
        mut t: Template,
    ) -> CK_OBJECT_HANDLE {
        let mut mm = mech(m);
        let mut h: CK_OBJECT_HANDLE = 0;
        let rv = ck!(
            self,
            C_UnwrapKey(
                s,
                &mut mm,
                unwrapping,
                wrapped.as_ptr() as *mut u8,
                wrapped.len() as CK_ULONG,
                t.ptr(),
                t.len(),
                &mut h
            )
        );
        self.rec(format!("C_UnwrapKey({what}, {m:x}, {unwrapping})"), rv, format!("object={h}"));
        h
    }

    fn destroy(&mut self, s: CK_SESSION_HANDLE, o: CK_OBJECT_HANDLE) {
        let rv = ck!(self, C_DestroyObject(s, o));
        self.rec(format!("C_DestroyObject({o})"), rv, "");
    }
}

pub fn secret_key(key_type: CK_KEY_TYPE, value: &[u8]) -> Template {
    Template::default()
        .ulong(CKA_CLASS, CKO_SECRET_KEY)
        .ulong(CKA_KEY_TYPE, key_type)
        .bool(CKA_TOKEN, false)
        .bytes(CKA_VALUE, value)
}

// ---------------------------------------------------------------------------------------------------
// The script.

/// Runs the script; returns the log and the manufacturerID from C_GetInfo.
pub fn run_script(module: &Path) -> (Vec<String>, String) {
    let f = common::raw_functions(module);
    let mut r = Run {
        f,
        log: Vec::new(),
        slots: Vec::new(),
        serials: Vec::new(),
        random_output: false,
        manufacturer: String::new(),
    };

    // The function list itself: the version and which entries are present.
    // SAFETY: CK_FUNCTION_LIST is a CK_VERSION (padded to 8 bytes) and 68 pointers.
    let words = unsafe { &*(f as *const CK_FUNCTION_LIST as *const [usize; 69]) };
    let present: String = words[1..].iter().map(|&w| if w == 0 { '0' } else { '1' }).collect();
    r.rec("function list", CKR_OK, format!("version={}.{} present={present}", f.version.major, f.version.minor));
    let rv = ck!(r, C_GetFunctionList(null_mut()));
    r.rec("C_GetFunctionList(NULL)", rv, "");
    let mut again: *mut CK_FUNCTION_LIST = null_mut();
    let rv = ck!(r, C_GetFunctionList(&mut again));
    r.rec("C_GetFunctionList", rv, format!("same table={}", std::ptr::eq(again, f)));

    before_initialize(&mut r);
    let slot = tokens_and_pins(&mut r);
    let s = r.open_session(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION);
    r.login(s, CKU_USER, NEW_USER_PIN);
    objects(&mut r, s);
    digests(&mut r, s);
    let keys = symmetric(&mut r, s);
    wrap_and_derive(&mut r, s, keys);
    asymmetric(&mut r, s, slot, keys);
    unsupported(&mut r, s, keys);
    closing(&mut r, s, slot);
    (r.log, r.manufacturer)
}

pub fn before_initialize(r: &mut Run) {
    let mut info: CK_INFO = Default::default();
    let rv = ck!(r, C_GetInfo(&mut info));
    r.rec("C_GetInfo before C_Initialize", rv, "");
    let mut n: CK_ULONG = 0;
    let rv = ck!(r, C_GetSlotList(CK_FALSE, null_mut(), &mut n));
    r.rec("C_GetSlotList before C_Initialize", rv, "");
    let mut h: CK_SESSION_HANDLE = 0;
    let rv = ck!(r, C_OpenSession(0, CKF_SERIAL_SESSION, null_mut(), None, &mut h));
    r.rec("C_OpenSession before C_Initialize", rv, "");
    let rv = ck!(r, C_Finalize(null_mut()));
    r.rec("C_Finalize before C_Initialize", rv, "");

    // Mutex callbacks must be all or none; pReserved must be NULL.
    let mut some = init_args(0);
    some.CreateMutex = Some(create_mutex);
    r.initialize("CreateMutex only", Some(&mut some));
    let mut reserved = init_args(CKF_OS_LOCKING_OK);
    let mut junk = 0u8;
    reserved.pReserved = (&mut junk as *mut u8).cast();
    r.initialize("pReserved set", Some(&mut reserved));
    // All four callbacks with CKF_OS_LOCKING_OK: accepted; then finalize and start again. (Callbacks
    // without CKF_OS_LOCKING_OK differ on purpose: SoftHSM2 accepts them, the shim answers CKR_CANT_LOCK
    // because it locks with OS primitives; the lifecycle tests cover that.)
    let mut all = init_args(CKF_OS_LOCKING_OK);
    all.CreateMutex = Some(create_mutex);
    all.DestroyMutex = Some(destroy_mutex);
    all.LockMutex = Some(lock_mutex);
    all.UnlockMutex = Some(unlock_mutex);
    if r.initialize("all four callbacks and CKF_OS_LOCKING_OK", Some(&mut all)) == CKR_OK {
        let rv = ck!(r, C_Finalize(null_mut()));
        r.rec("C_Finalize", rv, "");
    }
    let mut no_threads = init_args(CKF_OS_LOCKING_OK | CKF_LIBRARY_CANT_CREATE_OS_THREADS);
    if r.initialize("CKF_LIBRARY_CANT_CREATE_OS_THREADS", Some(&mut no_threads)) == CKR_OK {
        let rv = ck!(r, C_Finalize(null_mut()));
        r.rec("C_Finalize", rv, "");
    }
    let mut junk = 0u8;
    let rv = ck!(r, C_Finalize((&mut junk as *mut u8).cast()));
    r.rec("C_Finalize(non-NULL) before C_Initialize", rv, "");
    let mut ok = init_args(CKF_OS_LOCKING_OK);
    r.initialize("CKF_OS_LOCKING_OK", Some(&mut ok));
    // Bad arguments once initialized: which check comes first.
    let mut some = init_args(0);
    some.CreateMutex = Some(create_mutex);
    r.initialize("CreateMutex only, initialized", Some(&mut some));
    let mut reserved = init_args(CKF_OS_LOCKING_OK);
    reserved.pReserved = (&mut junk as *mut u8).cast();
    r.initialize("pReserved set, initialized", Some(&mut reserved));
    r.initialize("NULL, again", None);
    let mut ok = init_args(CKF_OS_LOCKING_OK);
    r.initialize("CKF_OS_LOCKING_OK, again", Some(&mut ok));

    let rv = ck!(r, C_GetInfo(&mut info));
    // The manufacturer, description and library version are the shim's own by design.
    r.manufacturer = String::from_utf8_lossy(&info.manufacturerID).trim_end().to_string();
    r.rec(
        "C_GetInfo",
        rv,
        format!("cryptoki={}.{} flags={:x}", info.cryptokiVersion.major, info.cryptokiVersion.minor, info.flags),
    );
    let rv = ck!(r, C_GetInfo(null_mut()));
    r.rec("C_GetInfo(NULL)", rv, "");
}

/// Slots, the uninitialized token, C_InitToken, PINs; returns the token's slot, with the user PIN set
/// to NEW_USER_PIN, no session open.
pub fn tokens_and_pins(r: &mut Run) -> CK_SLOT_ID {
    let rv = ck!(r, C_GetSlotList(CK_FALSE, null_mut(), null_mut()));
    r.rec("C_GetSlotList(count NULL)", rv, "");
    let slots = r.slot_list(false);
    let mut buf = [0 as CK_SLOT_ID; 4];
    let mut n: CK_ULONG = 0;
    let rv = ck!(r, C_GetSlotList(CK_FALSE, buf.as_mut_ptr(), &mut n));
    r.rec("C_GetSlotList(buffer of 0)", rv, format!("count={n}"));
    r.slot_list(true);
    let empty = slots[0];
    r.slot_info(empty);
    r.slot_info(BAD_SLOT);
    let rv = ck!(r, C_GetSlotInfo(empty, null_mut()));
    r.rec("C_GetSlotInfo(NULL)", rv, "");
    r.token_info(empty);
    r.token_info(BAD_SLOT);

    // Mechanisms.
    let mut n: CK_ULONG = 0;
    let rv = ck!(r, C_GetMechanismList(empty, null_mut(), &mut n));
    r.rec("C_GetMechanismList(NULL)", rv, format!("count={n}"));
    let mut mechs = vec![0 as CK_MECHANISM_TYPE; n as usize];
    let mut one: CK_ULONG = 1;
    let rv = ck!(r, C_GetMechanismList(empty, mechs.as_mut_ptr(), &mut one));
    r.rec("C_GetMechanismList(buffer of 1)", rv, format!("count={one}"));
    let rv = ck!(r, C_GetMechanismList(empty, mechs.as_mut_ptr(), &mut n));
    mechs.truncate(n as usize);
    r.rec("C_GetMechanismList", rv, format!("{mechs:x?}"));
    let rv = ck!(r, C_GetMechanismList(BAD_SLOT, null_mut(), &mut n));
    r.rec("C_GetMechanismList(bad slot)", rv, "");
    for m in mechs.iter().copied().chain([CKM_VENDOR_DEFINED | 0x77]) {
        let mut i: CK_MECHANISM_INFO = Default::default();
        let rv = ck!(r, C_GetMechanismInfo(empty, m, &mut i));
        r.rec(
            format!("C_GetMechanismInfo({m:x})"),
            rv,
            format!("{}..{} flags={:x}", i.ulMinKeySize, i.ulMaxKeySize, i.flags),
        );
    }
    let mut i: CK_MECHANISM_INFO = Default::default();
    let rv = ck!(r, C_GetMechanismInfo(empty, CKM_SHA256, null_mut()));
    r.rec("C_GetMechanismInfo(NULL)", rv, "");
    let rv = ck!(r, C_GetMechanismInfo(BAD_SLOT, CKM_SHA256, &mut i));
    r.rec("C_GetMechanismInfo(bad slot)", rv, "");

    // The uninitialized token.
    r.open_session(empty, CKF_SERIAL_SESSION);
    let mut label = [b' '; 32];
    label[..12].copy_from_slice(b"differential");
    let rv = ck!(r, C_InitToken(empty, null_mut(), 4, label.as_mut_ptr()));
    r.rec("C_InitToken(pin NULL)", rv, "");
    let rv = ck!(r, C_InitToken(empty, SO_PIN.as_ptr() as *mut u8, SO_PIN.len() as CK_ULONG, null_mut()));
    r.rec("C_InitToken(label NULL)", rv, "");
    let rv = ck!(r, C_InitToken(empty, b"123".as_ptr() as *mut u8, 3, label.as_mut_ptr()));
    r.rec("C_InitToken(pin too short)", rv, "");
    let rv = ck!(r, C_InitToken(BAD_SLOT, SO_PIN.as_ptr() as *mut u8, SO_PIN.len() as CK_ULONG, label.as_mut_ptr()));
    r.rec("C_InitToken(bad slot)", rv, "");
    let rv = ck!(r, C_InitToken(empty, SO_PIN.as_ptr() as *mut u8, SO_PIN.len() as CK_ULONG, label.as_mut_ptr()));
    r.rec("C_InitToken", rv, "");

    // SoftHSM2 renumbers: the token is found again by its flags.
    let slots = r.slot_list(true);
    let mut slot = BAD_SLOT;
    for &s in &slots {
        if r.token_info(s) & CKF_TOKEN_INITIALIZED != 0 {
            slot = s;
        }
    }
    r.slot_info(slot);

    // Sessions.
    r.open_session(slot, 0);
    let rv = ck!(r, C_OpenSession(slot, CKF_SERIAL_SESSION, null_mut(), None, null_mut()));
    r.rec("C_OpenSession(phSession NULL)", rv, "");
    r.open_session(BAD_SLOT, CKF_SERIAL_SESSION);
    let rw = r.open_session(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION);
    let ro = r.open_session(slot, CKF_SERIAL_SESSION);
    r.session_info("rw", rw);
    r.session_info("ro", ro);
    r.session_info("bad", BAD_SESSION);
    let rv = ck!(r, C_GetSessionInfo(rw, null_mut()));
    r.rec("C_GetSessionInfo(NULL)", rv, "");
    r.token_info(slot);

    // Login and PINs.
    r.login(rw, CKU_USER, USER_PIN);
    let rv = ck!(r, C_Login(rw, CKU_SO, null_mut(), 8));
    r.rec("C_Login(pin NULL)", rv, "");
    r.login(rw, 7, SO_PIN);
    r.login(BAD_SESSION, CKU_SO, SO_PIN);
    r.login(rw, CKU_SO, SO_PIN); // a read-only session exists
    let rv = ck!(r, C_CloseSession(ro));
    r.rec("C_CloseSession(ro)", rv, "");
    r.login(rw, CKU_SO, b"wrong-so-pin");
    r.token_info(slot);
    r.login(rw, CKU_SO, SO_PIN);
    r.session_info("rw", rw);
    r.token_info(slot);
    r.open_session(slot, CKF_SERIAL_SESSION); // read-only while the SO is logged in
    let rv = ck!(r, C_InitPIN(rw, null_mut(), 4));
    r.rec("C_InitPIN(NULL)", rv, "");
    let rv = ck!(r, C_InitPIN(rw, USER_PIN.as_ptr() as *mut u8, USER_PIN.len() as CK_ULONG));
    r.rec("C_InitPIN", rv, "");
    r.logout(rw);
    r.logout(rw);
    let rv = ck!(r, C_InitPIN(rw, USER_PIN.as_ptr() as *mut u8, USER_PIN.len() as CK_ULONG));
    r.rec("C_InitPIN(not logged in)", rv, "");
    r.login(rw, CKU_USER, b"wrong-user-pin");
    r.token_info(slot);
    r.login(rw, CKU_USER, USER_PIN);
    r.login(rw, CKU_USER, USER_PIN);
    r.login(rw, CKU_SO, SO_PIN);
    r.session_info("rw", rw);
    let set_pin = |r: &mut Run, what: &str, old: &[u8], new: &[u8]| {
        let rv = ck!(
            r,
            C_SetPIN(
                rw,
                old.as_ptr() as *mut u8,
                old.len() as CK_ULONG,
                new.as_ptr() as *mut u8,
                new.len() as CK_ULONG
            )
        );
        r.rec(format!("C_SetPIN({what})"), rv, "");
    };
    set_pin(r, "wrong old", b"wrong-user-pin", NEW_USER_PIN);
    set_pin(r, "new too short", USER_PIN, b"12");
    set_pin(r, "user", USER_PIN, NEW_USER_PIN);
    let rv = ck!(r, C_SetPIN(rw, null_mut(), 4, NEW_USER_PIN.as_ptr() as *mut u8, NEW_USER_PIN.len() as CK_ULONG));
    r.rec("C_SetPIN(old NULL)", rv, "");
    r.logout(rw);
    r.login(rw, CKU_USER, USER_PIN);
    r.login(rw, CKU_USER, NEW_USER_PIN);
    r.logout(rw);
    let rv = ck!(r, C_CloseAllSessions(slot));
    r.rec("C_CloseAllSessions", rv, "");
    r.session_info("rw", rw);
    r.token_info(slot);
    // C_InitToken with sessions open is refused.
    let s = r.open_session(slot, CKF_SERIAL_SESSION);
    let rv = ck!(r, C_InitToken(slot, SO_PIN.as_ptr() as *mut u8, SO_PIN.len() as CK_ULONG, label.as_mut_ptr()));
    r.rec("C_InitToken(session open)", rv, "");
    let rv = ck!(r, C_CloseSession(s));
    r.rec("C_CloseSession", rv, "");
    let rv = ck!(r, C_CloseSession(s));
    r.rec("C_CloseSession(again)", rv, "");
    slot
}

pub fn objects(r: &mut Run, s: CK_SESSION_HANDLE) {
    r.session_info("user", s);
    let rv = ck!(r, C_CreateObject(s, null_mut(), 3, &mut 0));
    r.rec("C_CreateObject(template NULL)", rv, "");
    let data = r.create(
        "data",
        s,
        Template::default()
            .ulong(CKA_CLASS, CKO_DATA)
            .bool(CKA_TOKEN, false)
            .bytes(CKA_LABEL, b"data-object")
            .bytes(CKA_APPLICATION, b"differential")
            .bytes(CKA_VALUE, b"some data"),
    );
    let token_data = r.create(
        "token data",
        s,
        Template::default()
            .ulong(CKA_CLASS, CKO_DATA)
            .bool(CKA_TOKEN, true)
            .bool(CKA_PRIVATE, true)
            .bytes(CKA_LABEL, b"token-data")
            .bytes(CKA_VALUE, b"persisted"),
    );
    r.create(
        "secret without value",
        s,
        Template::default().ulong(CKA_CLASS, CKO_SECRET_KEY).ulong(CKA_KEY_TYPE, CKK_AES),
    );
    r.create("data with CKA_ID", s, Template::default().ulong(CKA_CLASS, CKO_DATA).bytes(CKA_ID, b"x"));
    r.create("bad class", s, Template::default().ulong(CKA_CLASS, 0x7777).bool(CKA_TOKEN, false));
    r.create("bad session", BAD_SESSION, Template::default().ulong(CKA_CLASS, CKO_DATA));

    let mut size: CK_ULONG = 0;
    let rv = ck!(r, C_GetObjectSize(s, data, &mut size));
    r.rec("C_GetObjectSize(data)", rv, format!("size={}", len_text(size)));
    let rv = ck!(r, C_GetObjectSize(s, BAD_OBJECT, &mut size));
    r.rec("C_GetObjectSize(bad)", rv, "");

    r.attributes(
        s,
        data,
        &[CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_MODIFIABLE, CKA_LABEL, CKA_APPLICATION, CKA_VALUE, CKA_OBJECT_ID],
    );
    r.attributes(s, data, &[CKA_LABEL, CKA_VENDOR_DEFINED | 0x99, CKA_VALUE]);
    r.attributes(s, BAD_OBJECT, &[CKA_CLASS]);
    r.attribute_into(s, data, CKA_LABEL, None);
    r.attribute_into(s, data, CKA_LABEL, Some(5));
    r.attribute_into(s, data, CKA_LABEL, Some(11));
    r.attribute_into(s, data, CKA_LABEL, Some(40));
    r.attribute_into(BAD_SESSION, data, CKA_LABEL, Some(40));
    let rv = ck!(r, C_GetAttributeValue(s, data, null_mut(), 1));
    r.rec("C_GetAttributeValue(template NULL)", rv, "");

    let set = |r: &mut Run, what: &str, o: CK_OBJECT_HANDLE, mut t: Template| {
        let rv = ck!(r, C_SetAttributeValue(s, o, t.ptr(), t.len()));
        r.rec(format!("C_SetAttributeValue({what})"), rv, "");
    };
    set(r, "label", data, Template::default().bytes(CKA_LABEL, b"renamed"));
    set(r, "class", data, Template::default().ulong(CKA_CLASS, CKO_SECRET_KEY));
    set(r, "bad object", BAD_OBJECT, Template::default().bytes(CKA_LABEL, b"x"));
    r.attributes(s, data, &[CKA_LABEL]);

    // Copy and destroy.
    let mut copy: CK_OBJECT_HANDLE = 0;
    let mut t = Template::default().bytes(CKA_LABEL, b"copy");
    let rv = ck!(r, C_CopyObject(s, data, t.ptr(), t.len(), &mut copy));
    r.rec("C_CopyObject(data)", rv, format!("object={copy}"));
    r.attributes(s, copy, &[CKA_LABEL, CKA_VALUE]);
    r.destroy(s, copy);
    r.destroy(s, copy);
    r.attributes(s, copy, &[CKA_LABEL]);
    let rv = ck!(r, C_CopyObject(s, BAD_OBJECT, t.ptr(), t.len(), &mut copy));
    r.rec("C_CopyObject(bad)", rv, "");

    // Search.
    let rv = ck!(r, C_FindObjects(s, [0; 4].as_mut_ptr(), 4, &mut 0));
    r.rec("C_FindObjects without init", rv, "");
    let rv = ck!(r, C_FindObjectsFinal(s));
    r.rec("C_FindObjectsFinal without init", rv, "");
    let rv = ck!(r, C_FindObjectsInit(s, null_mut(), 1));
    r.rec("C_FindObjectsInit(NULL, 1)", rv, "");
    for i in 0..12u8 {
        r.create(
            "numbered",
            s,
            Template::default()
                .ulong(CKA_CLASS, CKO_DATA)
                .bool(CKA_TOKEN, i % 2 == 0)
                .bytes(CKA_LABEL, b"numbered")
                .bytes(CKA_VALUE, &[i]),
        );
    }
    r.find("all", s, Template::default(), 50);
    r.find("numbered by 5", s, Template::default().bytes(CKA_LABEL, b"numbered"), 5);
    r.find("numbered on token", s, Template::default().bytes(CKA_LABEL, b"numbered").bool(CKA_TOKEN, true), 1);
    r.find("value 7", s, Template::default().bytes(CKA_VALUE, &[7]), 10);
    r.find("renamed", s, Template::default().bytes(CKA_LABEL, b"renamed").ulong(CKA_CLASS, CKO_DATA), 10);
    r.find("nothing", s, Template::default().bytes(CKA_LABEL, b"nothing"), 10);
    let mut t = Template::default();
    let rv = ck!(r, C_FindObjectsInit(s, t.ptr(), 0));
    r.rec("C_FindObjectsInit", rv, "");
    let rv = ck!(r, C_FindObjectsInit(s, t.ptr(), 0));
    r.rec("C_FindObjectsInit(active)", rv, "");
    let rv = ck!(r, C_FindObjects(s, null_mut(), 4, &mut 0));
    r.rec("C_FindObjects(NULL)", rv, "");
    let rv = ck!(r, C_FindObjectsFinal(s));
    r.rec("C_FindObjectsFinal", rv, "");
    r.attributes(s, token_data, &[CKA_LABEL, CKA_TOKEN, CKA_PRIVATE]);
}

pub fn digests(r: &mut Run, s: CK_SESSION_HANDLE) {
    let rv = ck!(r, C_Digest(s, b"x".as_ptr() as *mut u8, 1, null_mut(), &mut 0));
    r.rec("C_Digest without init", rv, "");
    for m in [CKM_MD5, CKM_SHA_1, CKM_SHA224, CKM_SHA256, CKM_SHA384, CKM_SHA512] {
        r.digest(s, m, b"abc");
    }
    r.digest(s, CKM_SHA256, b"");
    let rv = ck!(r, C_Digest(s, b"x".as_ptr() as *mut u8, 1, null_mut(), &mut 0));
    r.rec("C_Digest after C_Digest", rv, "");
    let mut m = mech(CKM_SHA256);
    let rv = ck!(r, C_DigestInit(s, &mut m));
    r.rec("C_DigestInit", rv, "");
    let rv = ck!(r, C_DigestInit(s, &mut m));
    r.rec("C_DigestInit(active)", rv, "");
    for part in [&b"multi"[..], b"-", b"part"] {
        let rv = ck!(r, C_DigestUpdate(s, part.as_ptr() as *mut u8, part.len() as CK_ULONG));
        r.rec("C_DigestUpdate", rv, "");
    }
    let rv = ck!(r, C_DigestUpdate(s, null_mut(), 4));
    r.rec("C_DigestUpdate(NULL, 4)", rv, "");
    r.finish("C_DigestFinal", s, b"", |r, s, _, out, n| ck!(r, C_DigestFinal(s, out, n)));
    let mut bad = mech(CKM_VENDOR_DEFINED | 0x77);
    let rv = ck!(r, C_DigestInit(s, &mut bad));
    r.rec("C_DigestInit(bad mechanism)", rv, "");
    let rv = ck!(r, C_DigestInit(s, null_mut()));
    r.rec("C_DigestInit(NULL)", rv, "");
    let rv = ck!(r, C_DigestInit(BAD_SESSION, &mut m));
    r.rec("C_DigestInit(bad session)", rv, "");
}

#[derive(Clone, Copy)]
pub struct SymmetricKeys {
    hmac: CK_OBJECT_HANDLE,
    aes128: CK_OBJECT_HANDLE,
    aes256: CK_OBJECT_HANDLE,
}

pub fn symmetric(r: &mut Run, s: CK_SESSION_HANDLE) -> SymmetricKeys {
    let hmac_value: Vec<u8> = (0..32u8).collect();
    let hmac = r.create(
        "HMAC key",
        s,
        secret_key(CKK_GENERIC_SECRET, &hmac_value)
            .bool(CKA_SIGN, true)
            .bool(CKA_VERIFY, true)
            .bool(CKA_SENSITIVE, false)
            .bool(CKA_EXTRACTABLE, true)
            .bytes(CKA_LABEL, b"hmac"),
    );
    let aes128 = r.create(
        "AES-128",
        s,
        secret_key(CKK_AES, &unhex("000102030405060708090a0b0c0d0e0f"))
            .bool(CKA_ENCRYPT, true)
            .bool(CKA_DECRYPT, true)
            .bool(CKA_SENSITIVE, true)
            .bool(CKA_EXTRACTABLE, false),
    );
    let aes256 = r.create(
        "AES-256 wrapping",
        s,
        secret_key(CKK_AES, &[0x42; 32])
            .bool(CKA_ENCRYPT, true)
            .bool(CKA_DECRYPT, true)
            .bool(CKA_WRAP, true)
            .bool(CKA_UNWRAP, true),
    );
    r.attributes(
        s,
        hmac,
        &[
            CKA_CLASS,
            CKA_KEY_TYPE,
            CKA_VALUE_LEN,
            CKA_VALUE,
            CKA_SENSITIVE,
            CKA_ALWAYS_SENSITIVE,
            CKA_EXTRACTABLE,
            CKA_NEVER_EXTRACTABLE,
            CKA_LOCAL,
            CKA_SIGN,
            CKA_ENCRYPT,
            CKA_CHECK_VALUE,
        ],
    );
    r.attributes(s, aes128, &[CKA_VALUE_LEN, CKA_VALUE, CKA_SENSITIVE, CKA_CHECK_VALUE]);
    r.attribute_into(s, aes128, CKA_VALUE, None);
    r.attribute_into(s, aes128, CKA_VALUE, Some(16));
    let mut t = Template::default().bool(CKA_SENSITIVE, false);
    let rv = ck!(r, C_SetAttributeValue(s, aes128, t.ptr(), t.len()));
    r.rec("C_SetAttributeValue(SENSITIVE false)", rv, "");

    // HMAC.
    let data = b"what do ya want for nothing?";
    let rv = ck!(r, C_Sign(s, data.as_ptr() as *mut u8, data.len() as CK_ULONG, null_mut(), &mut 0));
    r.rec("C_Sign without init", rv, "");
    let mut m = mech(CKM_SHA256_HMAC);
    let rv = ck!(r, C_SignInit(s, &mut m, hmac));
    r.rec("C_SignInit(HMAC)", rv, "");
    let mac = r.finish("C_Sign", s, data, |r, s, d, out, n| {
        ck!(r, C_Sign(s, d.as_ptr() as *mut u8, d.len() as CK_ULONG, out, n))
    });
    let rv = ck!(r, C_SignInit(s, &mut m, hmac));
    r.rec("C_SignInit(HMAC)", rv, "");
    let rv = ck!(r, C_SignInit(s, &mut m, hmac));
    r.rec("C_SignInit(active)", rv, "");
    for part in [&data[..10], &data[10..]] {
        let rv = ck!(r, C_SignUpdate(s, part.as_ptr() as *mut u8, part.len() as CK_ULONG));
        r.rec("C_SignUpdate", rv, "");
    }
    r.finish("C_SignFinal", s, b"", |r, s, _, out, n| ck!(r, C_SignFinal(s, out, n)));
    r.verify(s, &mut m, hmac, data, &mac);
    r.verify(s, &mut m, hmac, b"what do ya want for something?", &mac);
    r.verify(s, &mut m, hmac, data, &mac[..20]);
    let rv = ck!(r, C_VerifyInit(s, &mut m, hmac));
    r.rec("C_VerifyInit", rv, "");
    let rv = ck!(r, C_VerifyUpdate(s, data.as_ptr() as *mut u8, data.len() as CK_ULONG));
    r.rec("C_VerifyUpdate", rv, "");
    let rv = ck!(r, C_VerifyFinal(s, mac.as_ptr() as *mut u8, mac.len() as CK_ULONG));
    r.rec("C_VerifyFinal", rv, "");
    let rv = ck!(r, C_VerifyFinal(s, mac.as_ptr() as *mut u8, mac.len() as CK_ULONG));
    r.rec("C_VerifyFinal(not initialized)", rv, "");
    let mut sha1 = mech(CKM_SHA_1_HMAC);
    r.sign(s, &mut sha1, hmac, data, true);
    let rv = ck!(r, C_SignInit(s, &mut m, aes128));
    r.rec("C_SignInit(HMAC with an AES key)", rv, "");
    let rv = ck!(r, C_SignInit(s, &mut m, BAD_OBJECT));
    r.rec("C_SignInit(bad key)", rv, "");
    let mut bad = mech(CKM_VENDOR_DEFINED | 0x77);
    let rv = ck!(r, C_SignInit(s, &mut bad, hmac));
    r.rec("C_SignInit(bad mechanism)", rv, "");
    let rv = ck!(r, C_SignInit(s, null_mut(), hmac));
    r.rec("C_SignInit(NULL)", rv, "");
    let mut aes_as_hmac = mech(CKM_SHA256_HMAC);
    let rv = ck!(r, C_VerifyInit(s, &mut aes_as_hmac, aes128));
    r.rec("C_VerifyInit(HMAC with an AES key)", rv, "");

    // AES with fixed keys: FIPS 197 C.1, then CBC, CBC-PAD and GCM.
    let block = unhex("00112233445566778899aabbccddeeff");
    let mut ecb = mech(CKM_AES_ECB);
    let ct = r.encrypt(s, &mut ecb, aes128, &block);
    r.decrypt(s, &mut ecb, aes128, &ct);
    r.encrypt(s, &mut ecb, aes128, &block[..15]);
    let rv = ck!(r, C_Encrypt(s, block.as_ptr() as *mut u8, 16, null_mut(), &mut 0));
    r.rec("C_Encrypt without init", rv, "");
    let mut iv = [7u8; 16];
    let mut cbc = mech_bytes(CKM_AES_CBC, &mut iv);
    let two_blocks = [block.clone(), block.clone()].concat();
    let ct = r.encrypt(s, &mut cbc, aes128, &two_blocks);
    r.decrypt(s, &mut cbc, aes128, &ct);
    let mut short_iv = [7u8; 8];
    let mut bad_cbc = mech_bytes(CKM_AES_CBC, &mut short_iv);
    let rv = ck!(r, C_EncryptInit(s, &mut bad_cbc, aes128));
    r.rec("C_EncryptInit(CBC, 8-byte IV)", rv, "");
    let mut iv2 = [9u8; 16];
    let mut pad = mech_bytes(CKM_AES_CBC_PAD, &mut iv2);
    let plain = b"thirty-seven bytes of AES-CBC-PAD....";
    let ct = r.encrypt(s, &mut pad, aes128, plain);
    r.decrypt(s, &mut pad, aes128, &ct);
    let mut bad_ct = ct.clone();
    *bad_ct.last_mut().unwrap() ^= 0x55;
    r.decrypt(s, &mut pad, aes128, &bad_ct);
    r.decrypt(s, &mut pad, aes128, &ct[..20]);
    // Multi-part CBC-PAD.
    let rv = ck!(r, C_EncryptInit(s, &mut pad, aes128));
    r.rec("C_EncryptInit(CBC-PAD)", rv, "");
    let rv = ck!(r, C_EncryptInit(s, &mut pad, aes128));
    r.rec("C_EncryptInit(active)", rv, "");
    let mut all: Vec<u8> = Vec::new();
    for part in plain.chunks(10) {
        let mut out = [0u8; 64];
        let mut n: CK_ULONG = 64;
        let rv = ck!(r, C_EncryptUpdate(s, part.as_ptr() as *mut u8, part.len() as CK_ULONG, out.as_mut_ptr(), &mut n));
        r.rec("C_EncryptUpdate", rv, format!("len={n} {}", hx(&out[..n as usize])));
        all.extend(&out[..n as usize]);
    }
    let mut out = [0u8; 64];
    let mut n: CK_ULONG = 64;
    let rv = ck!(r, C_EncryptFinal(s, out.as_mut_ptr(), &mut n));
    r.rec("C_EncryptFinal", rv, format!("len={n} {}", hx(&out[..n as usize])));
    all.extend(&out[..n as usize]);
    let rv = ck!(r, C_DecryptInit(s, &mut pad, aes128));
    r.rec("C_DecryptInit(CBC-PAD)", rv, "");
    for part in all.chunks(16) {
        let mut out = [0u8; 64];
        let mut n: CK_ULONG = 64;
        let rv = ck!(r, C_DecryptUpdate(s, part.as_ptr() as *mut u8, part.len() as CK_ULONG, out.as_mut_ptr(), &mut n));
        r.rec("C_DecryptUpdate", rv, format!("len={n} {}", hx(&out[..n as usize])));
    }
    let mut n: CK_ULONG = 64;
    let rv = ck!(r, C_DecryptFinal(s, out.as_mut_ptr(), &mut n));
    r.rec("C_DecryptFinal", rv, format!("len={n} {}", hx(&out[..n as usize])));
    let rv = ck!(r, C_DecryptFinal(s, out.as_mut_ptr(), &mut n));
    r.rec("C_DecryptFinal(not initialized)", rv, "");

    let mut gcm_iv = [3u8; 12];
    let mut aad = *b"header";
    let mut gcm = CK_GCM_PARAMS {
        pIv: gcm_iv.as_mut_ptr(),
        ulIvLen: 12,
        ulIvBits: 96,
        pAAD: aad.as_mut_ptr(),
        ulAADLen: aad.len() as CK_ULONG,
        ulTagBits: 128,
    };
    let mut gcm_m = mech_with(CKM_AES_GCM, &mut gcm);
    let ct = r.encrypt(s, &mut gcm_m, aes256, b"GCM with a fixed key and IV");
    r.decrypt(s, &mut gcm_m, aes256, &ct);
    let mut bad_ct = ct.clone();
    bad_ct[0] ^= 1;
    r.decrypt(s, &mut gcm_m, aes256, &bad_ct);
    gcm.ulTagBits = 130;
    let mut gcm_m = mech_with(CKM_AES_GCM, &mut gcm);
    let rv = ck!(r, C_EncryptInit(s, &mut gcm_m, aes256));
    r.rec("C_EncryptInit(GCM, tag 130 bits)", rv, "");
    let mut no_param = mech(CKM_AES_GCM);
    let rv = ck!(r, C_EncryptInit(s, &mut no_param, aes256));
    r.rec("C_EncryptInit(GCM, no parameter)", rv, "");
    let mut ecb = mech(CKM_AES_ECB);
    let rv = ck!(r, C_EncryptInit(s, &mut ecb, hmac));
    r.rec("C_EncryptInit(AES with an HMAC key)", rv, "");
    SymmetricKeys { hmac, aes128, aes256 }
}

pub fn wrap_and_derive(r: &mut Run, s: CK_SESSION_HANDLE, k: SymmetricKeys) {
    // RFC 3394 and RFC 5649 are deterministic: the wrapped bytes are compared.
    r.wrap(s, CKM_AES_KEY_WRAP, k.aes256, k.hmac, true);
    let wrapped = r.wrap(s, CKM_AES_KEY_WRAP_PAD, k.aes256, k.hmac, true);
    r.wrap(s, CKM_AES_KEY_WRAP_PAD, k.aes256, k.aes128, true); // not extractable
    r.wrap(s, CKM_AES_KEY_WRAP_PAD, k.hmac, k.hmac, true); // not a wrapping key
    r.wrap(s, CKM_AES_KEY_WRAP_PAD, BAD_OBJECT, k.hmac, true);
    let unwrap_template = || {
        Template::default()
            .ulong(CKA_CLASS, CKO_SECRET_KEY)
            .ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET)
            .bool(CKA_TOKEN, false)
            .bool(CKA_SENSITIVE, false)
            .bool(CKA_EXTRACTABLE, true)
            .bool(CKA_SIGN, true)
    };
    let unwrapped = r.unwrap("generic", s, CKM_AES_KEY_WRAP_PAD, k.aes256, &wrapped, unwrap_template());
    r.attributes(s, unwrapped, &[CKA_CLASS, CKA_KEY_TYPE, CKA_VALUE, CKA_LOCAL]);
    let mut corrupt = wrapped.clone();
    corrupt[5] ^= 1;
    r.unwrap("corrupt", s, CKM_AES_KEY_WRAP_PAD, k.aes256, &corrupt, unwrap_template());
    r.unwrap("short", s, CKM_AES_KEY_WRAP_PAD, k.aes256, &wrapped[..7], unwrap_template());
    r.unwrap(
        "no class",
        s,
        CKM_AES_KEY_WRAP_PAD,
        k.aes256,
        &wrapped,
        Template::default().ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET),
    );
    let mut h: CK_OBJECT_HANDLE = 0;
    let mut m = mech(CKM_AES_KEY_WRAP_PAD);
    let rv = ck!(r, C_UnwrapKey(s, &mut m, k.aes256, null_mut(), 40, null_mut(), 0, &mut h));
    r.rec("C_UnwrapKey(NULL)", rv, "");

    // ECDH with a fixed private key and the base point as the peer: the shared secret is fixed too.
    let d: Vec<u8> = (1..=32u8).collect();
    let ec = r.create(
        "EC private key",
        s,
        Template::default()
            .ulong(CKA_CLASS, CKO_PRIVATE_KEY)
            .ulong(CKA_KEY_TYPE, CKK_EC)
            .bool(CKA_TOKEN, false)
            .bool(CKA_PRIVATE, true)
            .bool(CKA_DERIVE, true)
            .bool(CKA_SIGN, true)
            .bytes(CKA_EC_PARAMS, P256_OID)
            .bytes(CKA_VALUE, &d),
    );
    r.attributes(s, ec, &[CKA_KEY_TYPE, CKA_EC_PARAMS, CKA_VALUE, CKA_SENSITIVE, CKA_LOCAL]);
    let mut g = unhex(P256_G);
    let mut params = CK_ECDH1_DERIVE_PARAMS {
        kdf: CKD_NULL,
        ulSharedDataLen: 0,
        pSharedData: null_mut(),
        ulPublicDataLen: g.len() as CK_ULONG,
        pPublicData: g.as_mut_ptr(),
    };
    let derive = |r: &mut Run, what: &str, m: &mut CK_MECHANISM, mut t: Template| {
        let mut h: CK_OBJECT_HANDLE = 0;
        let rv = ck!(r, C_DeriveKey(s, m, ec, t.ptr(), t.len(), &mut h));
        r.rec(format!("C_DeriveKey({what})"), rv, format!("object={h}"));
        h
    };
    let readable = || {
        Template::default()
            .ulong(CKA_CLASS, CKO_SECRET_KEY)
            .ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET)
            .bool(CKA_TOKEN, false)
            .bool(CKA_SENSITIVE, false)
            .bool(CKA_EXTRACTABLE, true)
    };
    let mut m = mech_with(CKM_ECDH1_DERIVE, &mut params);
    let shared = derive(r, "ECDH", &mut m, readable());
    r.attributes(s, shared, &[CKA_VALUE_LEN, CKA_VALUE, CKA_LOCAL, CKA_ALWAYS_SENSITIVE]);
    let mut m = mech_with(CKM_ECDH1_DERIVE, &mut params);
    let aes = derive(
        r,
        "ECDH to AES-128",
        &mut m,
        Template::default()
            .ulong(CKA_CLASS, CKO_SECRET_KEY)
            .ulong(CKA_KEY_TYPE, CKK_AES)
            .ulong(CKA_VALUE_LEN, 16)
            .bool(CKA_TOKEN, false)
            .bool(CKA_ENCRYPT, true),
    );
    let mut ecb = mech(CKM_AES_ECB);
    r.encrypt(s, &mut ecb, aes, &[0u8; 16]);
    let mut no_param = mech(CKM_ECDH1_DERIVE);
    derive(r, "no parameter", &mut no_param, readable());
    let mut bad_point = [4u8; 65];
    let mut bad = CK_ECDH1_DERIVE_PARAMS { ulPublicDataLen: 65, pPublicData: bad_point.as_mut_ptr(), ..params };
    let mut m = mech_with(CKM_ECDH1_DERIVE, &mut bad);
    derive(r, "point not on the curve", &mut m, readable());
}

pub fn asymmetric(r: &mut Run, s: CK_SESSION_HANDLE, slot: CK_SLOT_ID, k: SymmetricKeys) {
    // Key pairs: random values, so only results, sizes and verification are logged. SoftHSM2 makes RSA-1024
    // (fast); the simulator's smallest RSA key is 2048 bits.
    let bits: CK_ULONG = match backend() {
        Backend::SoftHsm2 => 1024,
        Backend::Simulator => 2048,
    };
    let mut pub_t = Template::default()
        .bool(CKA_TOKEN, true)
        .ulong(CKA_MODULUS_BITS, bits)
        .bytes(CKA_PUBLIC_EXPONENT, &[1, 0, 1])
        .bool(CKA_VERIFY, true)
        .bytes(CKA_LABEL, b"rsa");
    let mut priv_t = Template::default()
        .bool(CKA_TOKEN, true)
        .bool(CKA_PRIVATE, true)
        .bool(CKA_SENSITIVE, true)
        .bool(CKA_SIGN, true)
        .bytes(CKA_LABEL, b"rsa");
    let (mut rsa_pub, mut rsa_priv) = (0, 0);
    let mut m = mech(CKM_RSA_PKCS_KEY_PAIR_GEN);
    let rv = ck!(
        r,
        C_GenerateKeyPair(s, &mut m, pub_t.ptr(), pub_t.len(), priv_t.ptr(), priv_t.len(), &mut rsa_pub, &mut rsa_priv)
    );
    r.rec(format!("C_GenerateKeyPair(RSA-{bits})"), rv, format!("public={rsa_pub} private={rsa_priv}"));
    let rv = ck!(r, C_GenerateKeyPair(s, &mut m, null_mut(), 1, priv_t.ptr(), priv_t.len(), &mut 0, &mut 0));
    r.rec("C_GenerateKeyPair(NULL template)", rv, "");
    let mut no_bits = Template::default().bool(CKA_TOKEN, false);
    let rv =
        ck!(r, C_GenerateKeyPair(s, &mut m, no_bits.ptr(), no_bits.len(), priv_t.ptr(), priv_t.len(), &mut 0, &mut 0));
    r.rec("C_GenerateKeyPair(no modulus bits)", rv, "");
    r.attribute_into(s, rsa_pub, CKA_MODULUS, None);
    r.attribute_into(s, rsa_pub, CKA_PUBLIC_EXPONENT, Some(3));
    r.attribute_into(s, rsa_priv, CKA_PRIVATE_EXPONENT, None);
    r.attributes(
        s,
        rsa_priv,
        &[
            CKA_CLASS,
            CKA_KEY_TYPE,
            CKA_SENSITIVE,
            CKA_ALWAYS_SENSITIVE,
            CKA_EXTRACTABLE,
            CKA_NEVER_EXTRACTABLE,
            CKA_LOCAL,
            CKA_KEY_GEN_MECHANISM,
        ],
    );
    let data = b"signed by a fresh RSA key";
    let mut m = mech(CKM_SHA256_RSA_PKCS);
    let sig = r.sign(s, &mut m, rsa_priv, data, false);
    r.verify(s, &mut m, rsa_pub, data, &sig);
    r.verify(s, &mut m, rsa_pub, b"tampered", &sig);
    let mut pss_params = CK_RSA_PKCS_PSS_PARAMS { hashAlg: CKM_SHA256, mgf: CKG_MGF1_SHA256, sLen: 32 };
    let mut pss = mech_with(CKM_SHA256_RSA_PKCS_PSS, &mut pss_params);
    let sig = r.sign(s, &mut pss, rsa_priv, data, false);
    r.verify(s, &mut pss, rsa_pub, data, &sig);
    // Raw RSA with the public key opens a PKCS#1 v1.5 signature: the padded DigestInfo, fixed.
    let sig = r.sign(s, &mut m, rsa_priv, data, false);
    let mut raw = mech(CKM_RSA_X_509);
    r.encrypt(s, &mut raw, rsa_pub, &sig);
    let mut oaep_params = CK_RSA_PKCS_OAEP_PARAMS {
        hashAlg: CKM_SHA_1,
        mgf: CKG_MGF1_SHA1,
        source: CKZ_DATA_SPECIFIED,
        pSourceData: null_mut(),
        ulSourceDataLen: 0,
    };
    let mut oaep = mech_with(CKM_RSA_PKCS_OAEP, &mut oaep_params);
    r.random_output = true;
    r.encrypt(s, &mut oaep, rsa_pub, b"OAEP");
    r.random_output = false;
    oaep_params.hashAlg = CKM_SHA256;
    let mut oaep = mech_with(CKM_RSA_PKCS_OAEP, &mut oaep_params);
    let rv = ck!(r, C_EncryptInit(s, &mut oaep, rsa_pub));
    r.rec("C_EncryptInit(OAEP with SHA-256)", rv, "");
    let rv = ck!(r, C_SignInit(s, &mut m, rsa_pub));
    r.rec("C_SignInit(with a public key)", rv, "");

    let mut ec_pub_t = Template::default().bool(CKA_TOKEN, false).bytes(CKA_EC_PARAMS, P256_OID).bool(CKA_VERIFY, true);
    let mut ec_priv_t = Template::default().bool(CKA_TOKEN, false).bool(CKA_PRIVATE, true).bool(CKA_SIGN, true);
    let (mut ec_pub, mut ec_priv) = (0, 0);
    let mut m = mech(CKM_EC_KEY_PAIR_GEN);
    let rv = ck!(
        r,
        C_GenerateKeyPair(
            s,
            &mut m,
            ec_pub_t.ptr(),
            ec_pub_t.len(),
            ec_priv_t.ptr(),
            ec_priv_t.len(),
            &mut ec_pub,
            &mut ec_priv
        )
    );
    r.rec("C_GenerateKeyPair(P-256)", rv, format!("public={ec_pub} private={ec_priv}"));
    r.attribute_into(s, ec_pub, CKA_EC_POINT, None);
    r.attributes(s, ec_pub, &[CKA_EC_PARAMS, CKA_KEY_TYPE]);
    let digest = [0x5Au8; 32];
    let mut ecdsa = mech(CKM_ECDSA);
    let sig = r.sign(s, &mut ecdsa, ec_priv, &digest, false);
    r.verify(s, &mut ecdsa, ec_pub, &digest, &sig);
    r.verify(s, &mut ecdsa, ec_pub, &[0xA5; 32], &sig);
    let mut bad_curve =
        Template::default().bool(CKA_TOKEN, false).bytes(CKA_EC_PARAMS, &[0x06, 0x03, 0x2A, 0x03, 0x04]);
    let rv = ck!(
        r,
        C_GenerateKeyPair(
            s,
            &mut m,
            bad_curve.ptr(),
            bad_curve.len(),
            ec_priv_t.ptr(),
            ec_priv_t.len(),
            &mut 0,
            &mut 0
        )
    );
    r.rec("C_GenerateKeyPair(unknown curve)", rv, "");
    let mut t = Template::default().ulong(CKA_VALUE_LEN, 32).bool(CKA_TOKEN, false);
    let mut h: CK_OBJECT_HANDLE = 0;
    let mut aes_gen = mech(CKM_AES_KEY_GEN);
    let rv = ck!(r, C_GenerateKey(s, &mut aes_gen, t.ptr(), t.len(), &mut h));
    r.rec("C_GenerateKey(AES-256)", rv, format!("object={h}"));
    r.attributes(s, h, &[CKA_VALUE_LEN, CKA_LOCAL, CKA_KEY_GEN_MECHANISM]);
    let mut bad_len = Template::default().ulong(CKA_VALUE_LEN, 17).bool(CKA_TOKEN, false);
    let rv = ck!(r, C_GenerateKey(s, &mut aes_gen, bad_len.ptr(), bad_len.len(), &mut h));
    r.rec("C_GenerateKey(AES, 17 bytes)", rv, "");

    // Random: only results and lengths.
    let mut buf = [0u8; 32];
    let rv = ck!(r, C_GenerateRandom(s, buf.as_mut_ptr(), 32));
    r.rec("C_GenerateRandom(32)", rv, format!("nonzero={}", buf.iter().any(|&b| b != 0)));
    let rv = ck!(r, C_GenerateRandom(s, null_mut(), 16));
    r.rec("C_GenerateRandom(NULL)", rv, "");
    let rv = ck!(r, C_GenerateRandom(BAD_SESSION, buf.as_mut_ptr(), 32));
    r.rec("C_GenerateRandom(bad session)", rv, "");
    let rv = ck!(r, C_SeedRandom(s, b"seed".as_ptr() as *mut u8, 4));
    r.rec("C_SeedRandom", rv, "");
    let rv = ck!(r, C_SeedRandom(s, null_mut(), 4));
    r.rec("C_SeedRandom(NULL)", rv, "");

    // Sign before login: the private key is out of reach once the user logs out.
    r.logout(s);
    r.session_info("public", s);
    let mut m = mech(CKM_SHA256_RSA_PKCS);
    let rv = ck!(r, C_SignInit(s, &mut m, rsa_priv));
    r.rec("C_SignInit(private key, not logged in)", rv, "");
    let mut hm = mech(CKM_SHA256_HMAC);
    r.sign(s, &mut hm, k.hmac, b"session key, not logged in", true);
    r.find("rsa, not logged in", s, Template::default().bytes(CKA_LABEL, b"rsa"), 10);
    r.attributes(s, rsa_pub, &[CKA_LABEL, CKA_MODULUS_BITS]);
    let mut label = [b' '; 32];
    let rv = ck!(r, C_InitToken(slot, SO_PIN.as_ptr() as *mut u8, SO_PIN.len() as CK_ULONG, label.as_mut_ptr()));
    r.rec("C_InitToken(session open)", rv, "");
    r.login(s, CKU_USER, NEW_USER_PIN);
}

pub fn unsupported(r: &mut Run, s: CK_SESSION_HANDLE, k: SymmetricKeys) {
    let rv = ck!(r, C_GetFunctionStatus(s));
    r.rec("C_GetFunctionStatus", rv, "");
    let rv = ck!(r, C_CancelFunction(s));
    r.rec("C_CancelFunction", rv, "");
    let mut n: CK_ULONG = 0;
    let rv = ck!(r, C_GetOperationState(s, null_mut(), &mut n));
    r.rec("C_GetOperationState", rv, format!("len={}", len_text(n)));
    let mut state = [0u8; 16];
    let rv = ck!(r, C_SetOperationState(s, state.as_mut_ptr(), 16, 0, 0));
    r.rec("C_SetOperationState", rv, "");
    let mut slot: CK_SLOT_ID = 0;
    let rv = ck!(r, C_WaitForSlotEvent(CKF_DONT_BLOCK, &mut slot, null_mut()));
    r.rec("C_WaitForSlotEvent(CKF_DONT_BLOCK)", rv, "");
    let rv = ck!(r, C_WaitForSlotEvent(CKF_DONT_BLOCK, null_mut(), null_mut()));
    r.rec("C_WaitForSlotEvent(slot NULL)", rv, "");
    let mut out = [0u8; 64];
    let mut n: CK_ULONG = 64;
    let data = [0u8; 16];
    let rv = ck!(r, C_DigestEncryptUpdate(s, data.as_ptr() as *mut u8, 16, out.as_mut_ptr(), &mut n));
    r.rec("C_DigestEncryptUpdate", rv, "");
    let rv = ck!(r, C_DecryptDigestUpdate(s, data.as_ptr() as *mut u8, 16, out.as_mut_ptr(), &mut n));
    r.rec("C_DecryptDigestUpdate", rv, "");
    let rv = ck!(r, C_SignEncryptUpdate(s, data.as_ptr() as *mut u8, 16, out.as_mut_ptr(), &mut n));
    r.rec("C_SignEncryptUpdate", rv, "");
    let rv = ck!(r, C_DecryptVerifyUpdate(s, data.as_ptr() as *mut u8, 16, out.as_mut_ptr(), &mut n));
    r.rec("C_DecryptVerifyUpdate", rv, "");
    let mut m = mech(CKM_RSA_PKCS);
    let rv = ck!(r, C_SignRecoverInit(s, &mut m, k.aes128));
    r.rec("C_SignRecoverInit", rv, "");
    let rv = ck!(r, C_SignRecover(s, data.as_ptr() as *mut u8, 16, out.as_mut_ptr(), &mut n));
    r.rec("C_SignRecover", rv, "");
    let rv = ck!(r, C_VerifyRecoverInit(s, &mut m, k.aes128));
    r.rec("C_VerifyRecoverInit", rv, "");
    let rv = ck!(r, C_VerifyRecover(s, data.as_ptr() as *mut u8, 16, out.as_mut_ptr(), &mut n));
    r.rec("C_VerifyRecover", rv, "");
    let rv = ck!(r, C_DigestKey(s, k.hmac));
    r.rec("C_DigestKey(not initialized)", rv, "");
    let mut sha = mech(CKM_SHA256);
    let rv = ck!(r, C_DigestInit(s, &mut sha));
    r.rec("C_DigestInit", rv, "");
    let rv = ck!(r, C_DigestKey(s, k.hmac));
    r.rec("C_DigestKey(HMAC key)", rv, "");
    r.finish("C_DigestFinal", s, b"", |r, s, _, out, n| ck!(r, C_DigestFinal(s, out, n)));
}

pub fn closing(r: &mut Run, s: CK_SESSION_HANDLE, slot: CK_SLOT_ID) {
    r.find("token objects", s, Template::default().bool(CKA_TOKEN, true), 100);
    let rv = ck!(r, C_CloseSession(s));
    r.rec("C_CloseSession", rv, "");
    let rv = ck!(r, C_CloseSession(s));
    r.rec("C_CloseSession(again)", rv, "");
    let rv = ck!(r, C_CloseSession(BAD_SESSION));
    r.rec("C_CloseSession(bad)", rv, "");
    let a = r.open_session(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION);
    r.open_session(slot, CKF_SERIAL_SESSION);
    r.token_info(slot);
    let rv = ck!(r, C_CloseAllSessions(slot));
    r.rec("C_CloseAllSessions", rv, "");
    let rv = ck!(r, C_CloseAllSessions(BAD_SLOT));
    r.rec("C_CloseAllSessions(bad slot)", rv, "");
    r.session_info("closed", a);
    let mut junk = 0u8;
    let rv = ck!(r, C_Finalize((&mut junk as *mut u8).cast()));
    r.rec("C_Finalize(non-NULL)", rv, "");
    let rv = ck!(r, C_Finalize(null_mut()));
    r.rec("C_Finalize", rv, "");
    let rv = ck!(r, C_Finalize(null_mut()));
    r.rec("C_Finalize(again)", rv, "");
    r.session_info("after finalize", a);

    // A second life: the token and its objects are still there (SoftHSM2 numbers the slots anew).
    r.initialize("NULL, second life", None);
    let slots = r.slot_list(true);
    let mut slot = BAD_SLOT;
    for s in slots {
        if r.token_info(s) & CKF_TOKEN_INITIALIZED != 0 {
            slot = s;
        }
    }
    let s = r.open_session(slot, CKF_SERIAL_SESSION);
    r.login(s, CKU_USER, NEW_USER_PIN);
    // SoftHSM2 reloads token objects in directory order, which varies: log them sorted, without handles.
    let mut t = Template::default().bool(CKA_TOKEN, true);
    let rv = ck!(r, C_FindObjectsInit(s, t.ptr(), t.len()));
    r.rec("C_FindObjectsInit(token objects after restart)", rv, "");
    let mut found = [0 as CK_OBJECT_HANDLE; 100];
    let mut n: CK_ULONG = 0;
    let rv = ck!(r, C_FindObjects(s, found.as_mut_ptr(), 100, &mut n));
    let mut objects: Vec<String> = found[..n as usize]
        .iter()
        .map(|&o| {
            let mut class = [0u8; 8];
            let mut label = [0u8; 32];
            let mut t = [
                CK_ATTRIBUTE { type_: CKA_CLASS, pValue: class.as_mut_ptr().cast(), ulValueLen: 8 },
                CK_ATTRIBUTE { type_: CKA_LABEL, pValue: label.as_mut_ptr().cast(), ulValueLen: 32 },
            ];
            let rv = ck!(r, C_GetAttributeValue(s, o, t.as_mut_ptr(), 2));
            format!(
                "{} class={} label={}",
                rv_text(rv),
                hx(&class),
                blank(&label[..(t[1].ulValueLen as usize).min(32)])
            )
        })
        .collect();
    objects.sort();
    r.rec("C_FindObjects(token objects after restart)", rv, format!("count={n} {objects:?}"));
    let rv = ck!(r, C_FindObjectsFinal(s));
    r.rec("C_FindObjectsFinal", rv, "");
    let rv = ck!(r, C_Finalize(null_mut()));
    r.rec("C_Finalize", rv, "");
}
