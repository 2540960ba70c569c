//! Hostile templates: every malformed template an application can pass to the nine functions that take one
//! (C_CreateObject, C_GenerateKey, C_GenerateKeyPair, C_UnwrapKey, C_DeriveKey, C_CopyObject,
//! C_FindObjectsInit, C_SetAttributeValue, C_GetAttributeValue) gets a CK_RV PKCS#11 lists for that
//! function, never a crash, in a pass-through slot and in a database slot, through the shim. Run by
//! tests/templates.rs (SoftHSM2) and tests/templates_cssim.rs (the simulator).
//!
//! Each function's cases run in a child process (this test binary re-run as `hostile_child`), which prints a
//! line before and after each call: a child that dies names the case it died in, and the next child goes on
//! from the case after it, so one crash fails the test with the name of every case that crashed.
//!
//! Each binary writes a p11shim.toml with one database slot ([`DATABASE`]) and one pass-through slot
//! ([`PLAIN`]); the database token's MBK set is made with the `p11shim` command, and it holds one stored key
//! ([`STORED`]) whose attributes the C_SetAttributeValue and C_GetAttributeValue cases use.
//!
//! The well-formed cases of the pass-through slot must get what the backend loaded directly answers (their
//! templates go to it unchanged); the malformed ones get the shim's answer, the same in both slot kinds:
//! CKR_ATTRIBUTE_VALUE_INVALID for a malformed value, CKR_ARGUMENTS_BAD for a NULL template with a count or
//! more attributes than any template holds, and in C_GetAttributeValue's query, which lists neither
//! CKR_ATTRIBUTE_VALUE_INVALID nor CKR_TEMPLATE_INCONSISTENT, CKR_ARGUMENTS_BAD for all.
//!
//! Also: a key with CKA_ALLOWED_MECHANISMS and attribute arrays reads back as given in both slot kinds, and
//! `pkcs11-tool --keypairgen --allowed-mechanisms` (six mechanisms) through the shim does not crash.
//!
//! `backend_direct_answers` (ignored: it measures, asserts nothing) runs the same cases against the backend
//! loaded directly and prints what it does with each: which ones crash it, and which CK_RVs it gives.
#![allow(dead_code)]

use crate::common::{self, new_token, pkcs11, user_session, SO_PIN, USER_PIN};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::Attribute;
use cryptoki_sys::*;
use std::ffi::c_void;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::ptr::null_mut;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The pass-through token.
pub const PLAIN: &str = "tplain";
/// The database token.
pub const DATABASE: &str = "tdb";
/// The label of the stored key in [`DATABASE`].
pub const STORED: &str = "stored-target";

const ENV_MODULE: &str = "TEMPLATES_MODULE";
const ENV_TOKEN: &str = "TEMPLATES_TOKEN";
const ENV_FUNCTION: &str = "TEMPLATES_FUNCTION";
const ENV_FROM: &str = "TEMPLATES_FROM";
const ENV_UPTO: &str = "TEMPLATES_UPTO";
/// The test's name in libtest, for the child runs.
const CHILD_TEST: &str = "hostile_child";

/// The per-value bound of the shim's template reader (src/ffi/args.rs).
const MAX_VALUE: CK_ULONG = 1 << 24;
/// The shim's bound on the attributes of one template, nested ones included.
const MAX_ATTRIBUTES: usize = 4096;

/// The nine functions that take a template.
pub const FUNCTIONS: [Function; 9] = [
    Function::CreateObject,
    Function::GenerateKey,
    Function::GenerateKeyPair,
    Function::UnwrapKey,
    Function::DeriveKey,
    Function::CopyObject,
    Function::FindObjectsInit,
    Function::SetAttributeValue,
    Function::GetAttributeValue,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Function {
    CreateObject,
    GenerateKey,
    GenerateKeyPair,
    UnwrapKey,
    DeriveKey,
    CopyObject,
    FindObjectsInit,
    SetAttributeValue,
    GetAttributeValue,
}

impl Function {
    pub fn name(self) -> &'static str {
        match self {
            Function::CreateObject => "C_CreateObject",
            Function::GenerateKey => "C_GenerateKey",
            Function::GenerateKeyPair => "C_GenerateKeyPair",
            Function::UnwrapKey => "C_UnwrapKey",
            Function::DeriveKey => "C_DeriveKey",
            Function::CopyObject => "C_CopyObject",
            Function::FindObjectsInit => "C_FindObjectsInit",
            Function::SetAttributeValue => "C_SetAttributeValue",
            Function::GetAttributeValue => "C_GetAttributeValue",
        }
    }

    fn from_name(name: &str) -> Function {
        *FUNCTIONS.iter().find(|f| f.name() == name).unwrap_or_else(|| panic!("unknown function {name}"))
    }

    /// C_GetAttributeValue reads no values: its template is a query, where a NULL pValue asks for a length.
    fn is_query(self) -> bool {
        self == Function::GetAttributeValue
    }

    /// The CK_RVs PKCS#11 2.40 lists for the function (§5.7, §5.13).
    pub fn listed(self) -> Vec<CK_RV> {
        let mut listed = vec![
            CKR_OK,
            CKR_ARGUMENTS_BAD,
            CKR_CRYPTOKI_NOT_INITIALIZED,
            CKR_DEVICE_ERROR,
            CKR_DEVICE_MEMORY,
            CKR_DEVICE_REMOVED,
            CKR_FUNCTION_FAILED,
            CKR_GENERAL_ERROR,
            CKR_HOST_MEMORY,
            CKR_SESSION_CLOSED,
            CKR_SESSION_HANDLE_INVALID,
        ];
        // What every function that makes or changes an object lists besides.
        let making = [
            CKR_ATTRIBUTE_READ_ONLY,
            CKR_ATTRIBUTE_TYPE_INVALID,
            CKR_ATTRIBUTE_VALUE_INVALID,
            CKR_PIN_EXPIRED,
            CKR_SESSION_READ_ONLY,
            CKR_TEMPLATE_INCONSISTENT,
            CKR_TOKEN_WRITE_PROTECTED,
            CKR_USER_NOT_LOGGED_IN,
        ];
        // What the key management functions list besides (§5.13).
        let key_management = [
            CKR_CURVE_NOT_SUPPORTED,
            CKR_DOMAIN_PARAMS_INVALID,
            CKR_FUNCTION_CANCELED,
            CKR_MECHANISM_INVALID,
            CKR_MECHANISM_PARAM_INVALID,
            CKR_OPERATION_ACTIVE,
            CKR_TEMPLATE_INCOMPLETE,
        ];
        match self {
            Function::CreateObject => {
                listed.extend(making);
                listed.extend([CKR_CURVE_NOT_SUPPORTED, CKR_DOMAIN_PARAMS_INVALID, CKR_TEMPLATE_INCOMPLETE]);
            }
            Function::CopyObject => {
                listed.extend(making);
                listed.extend([CKR_ACTION_PROHIBITED, CKR_OBJECT_HANDLE_INVALID]);
            }
            Function::GenerateKey | Function::GenerateKeyPair => {
                listed.extend(making);
                listed.extend(key_management);
            }
            Function::UnwrapKey => {
                listed.extend(making);
                listed.extend(key_management);
                listed.extend([
                    CKR_BUFFER_TOO_SMALL,
                    CKR_UNWRAPPING_KEY_HANDLE_INVALID,
                    CKR_UNWRAPPING_KEY_SIZE_RANGE,
                    CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT,
                    CKR_WRAPPED_KEY_INVALID,
                    CKR_WRAPPED_KEY_LEN_RANGE,
                ]);
            }
            Function::DeriveKey => {
                listed.extend(making);
                listed.extend(key_management);
                listed.extend([CKR_KEY_HANDLE_INVALID, CKR_KEY_SIZE_RANGE, CKR_KEY_TYPE_INCONSISTENT]);
            }
            Function::FindObjectsInit => listed.extend([
                CKR_ATTRIBUTE_TYPE_INVALID,
                CKR_ATTRIBUTE_VALUE_INVALID,
                CKR_OPERATION_ACTIVE,
                CKR_PIN_EXPIRED,
            ]),
            Function::SetAttributeValue => {
                listed.extend(making.iter().filter(|&&rv| rv != CKR_PIN_EXPIRED));
                listed.extend([CKR_ACTION_PROHIBITED, CKR_OBJECT_HANDLE_INVALID]);
            }
            Function::GetAttributeValue => listed.extend([
                CKR_ATTRIBUTE_SENSITIVE,
                CKR_ATTRIBUTE_TYPE_INVALID,
                CKR_BUFFER_TOO_SMALL,
                CKR_OBJECT_HANDLE_INVALID,
            ]),
        }
        listed
    }
}

/// The templates tried. Input templates (every function but C_GetAttributeValue) get the function's usual
/// template with one attribute added; C_GetAttributeValue gets a query of one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// The usual template: the call succeeds.
    WellFormed,
    /// With a well-formed attribute array (CKA_WRAP_TEMPLATE) and mechanism array (CKA_ALLOWED_MECHANISMS).
    WellFormedArrays,
    /// A NULL pValue with ulValueLen 8 (in a query: a length query, which is legal).
    NullValueWithLength,
    /// ulValueLen = CK_UNAVAILABLE_INFORMATION with a buffer.
    UnavailableLength,
    /// ulValueLen = 4 GiB with an 8-byte buffer (a 64-byte one in a query).
    HugeLength,
    /// CKA_WRAP_TEMPLATE with a NULL pValue and the length of one CK_ATTRIBUTE.
    NullAttributeArrayWithLength,
    /// CKA_WRAP_TEMPLATE whose length is not a multiple of sizeof(CK_ATTRIBUTE).
    AttributeArrayRagged,
    /// CKA_WRAP_TEMPLATE claiming 2^30 CK_ATTRIBUTEs (one is there).
    AttributeArrayTooLong,
    /// CKA_ALLOWED_MECHANISMS whose length is not a multiple of sizeof(CK_MECHANISM_TYPE).
    MechanismArrayRagged,
    /// CKA_ALLOWED_MECHANISMS claiming 8 GiB (three mechanisms are there).
    MechanismArrayTooLong,
    /// CKA_WRAP_TEMPLATE holding an attribute with a NULL pValue and ulValueLen 1.
    InnerNullValueWithLength,
    /// CKA_WRAP_TEMPLATE holding an attribute whose ulValueLen is 4 GiB (its buffer holds 8 bytes).
    InnerHugeLength,
    /// CKA_WRAP_TEMPLATE holding a CKA_UNWRAP_TEMPLATE: two levels, where PKCS#11 allows one.
    NestedAttributeArray,
    /// CKA_WRAP_TEMPLATE whose value is itself: endless nesting.
    SelfNestedAttributeArray,
    /// A query of CKA_WRAP_TEMPLATE with a buffer of two elements, the first with a buffer, the second with
    /// a NULL pValue and ulValueLen 64.
    ArrayElementsMixed,
    /// pTemplate NULL, ulCount 2.
    NullTemplateWithCount,
    /// 4097 attributes (CKA_LABEL repeated).
    TooManyAttributes,
    /// Five CKA_LABELs of 16 MiB each: 80 MiB in one template.
    TooManyBytes,
}

const INPUT_CASES: &[Case] = &[
    Case::WellFormed,
    Case::WellFormedArrays,
    Case::NullValueWithLength,
    Case::UnavailableLength,
    Case::HugeLength,
    Case::NullAttributeArrayWithLength,
    Case::AttributeArrayRagged,
    Case::AttributeArrayTooLong,
    Case::MechanismArrayRagged,
    Case::MechanismArrayTooLong,
    Case::InnerNullValueWithLength,
    Case::InnerHugeLength,
    Case::NestedAttributeArray,
    Case::SelfNestedAttributeArray,
    Case::NullTemplateWithCount,
    Case::TooManyAttributes,
    Case::TooManyBytes,
];

const QUERY_CASES: &[Case] = &[
    Case::WellFormed,
    Case::WellFormedArrays,
    Case::NullValueWithLength,
    Case::UnavailableLength,
    Case::HugeLength,
    Case::AttributeArrayRagged,
    Case::AttributeArrayTooLong,
    Case::MechanismArrayRagged,
    Case::MechanismArrayTooLong,
    Case::InnerHugeLength,
    Case::ArrayElementsMixed,
    Case::NullTemplateWithCount,
    Case::TooManyAttributes,
];

pub fn cases(function: Function) -> &'static [Case] {
    if function.is_query() {
        QUERY_CASES
    } else {
        INPUT_CASES
    }
}

/// What the shim must answer.
#[derive(Debug)]
pub enum Expected {
    Exactly(CK_RV),
    /// What the backend answers when called directly: a well-formed template goes to it unchanged.
    SameAsDirect,
    /// Any CK_RV the function lists (where the answer is the backend's or the vault's to give).
    Listed,
}

/// The shim's answer to each case, the same in both slot kinds.
pub fn expected(function: Function, case: Case, database: bool) -> Expected {
    use Case::*;
    match (function.is_query(), case) {
        (_, WellFormed | WellFormedArrays) if !database => Expected::SameAsDirect,
        (_, WellFormed) => Expected::Exactly(CKR_OK),
        // Whether a stored key may hold attribute and mechanism arrays is the vault's to say.
        (_, WellFormedArrays) => Expected::Listed,
        (_, NullTemplateWithCount | TooManyAttributes) => Expected::Exactly(CKR_ARGUMENTS_BAD),
        // A NULL pValue in a query asks for the length.
        (true, NullValueWithLength) => Expected::Exactly(CKR_OK),
        (true, _) => Expected::Exactly(CKR_ARGUMENTS_BAD),
        (false, _) => Expected::Exactly(CKR_ATTRIBUTE_VALUE_INVALID),
    }
}

// ---------------------------------------------------------------------------------------------------
// The parent: configuration, tokens, children.

static READY: OnceLock<()> = OnceLock::new();

/// Writes this binary's p11shim.toml, loads the shim, makes both tokens, the database token's MBK set and
/// its stored key. Call first in every test.
pub fn init() {
    READY.get_or_init(|| {
        common::setup();
        let dir = common::test_dir();
        let db = dir.join("keys.db");
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
        let config = format!(
            "module = \"{}\"\nlog_file = \"shim.log\"\nlog_level = \"info\"\n[store]\nurl = \"sqlite:{}\"\n\
             [[slot]]\ntoken = \"{DATABASE}\"\nstorage = \"database\"\n[[slot]]\ntoken = \"{PLAIN}\"\n",
            common::backend_path().display(),
            db.display()
        );
        let path = dir.join("p11shim.toml");
        std::fs::write(&path, config).expect("write p11shim.toml");
        let _ = std::fs::remove_file(dir.join("shim.log"));
        std::env::set_var("P11SHIM_CONFIG", &path);
        pkcs11();
        new_token(PLAIN);
        let slot = new_token(DATABASE);
        mbk_create(DATABASE);
        let session = user_session(slot);
        session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Token(true),
                    Attribute::Label(STORED.into()),
                    Attribute::ValueLen(32.into()),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                ],
            )
            .expect("C_GenerateKey (the stored key)");
    });
}

/// `p11shim mbk create` for `token`; a token that already has an MBK set (C_InitToken through the shim may
/// make one) is fine.
fn mbk_create(token: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_p11shim"))
        .env("P11SHIM_SO_PIN", SO_PIN)
        .env("P11SHIM_USER_PIN", USER_PIN)
        .args(["mbk", "create", "--token", token])
        .output()
        .expect("run p11shim");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || stderr.contains("already"),
        "p11shim mbk create --token {token}: {stderr}{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// What one call did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Returned(CK_RV),
    /// The process died in the call (a signal, an abort, a timeout).
    Died(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Returned(rv) => write!(f, "{}", common::rv_name(*rv)),
            Outcome::Died(how) => write!(f, "died ({how})"),
        }
    }
}

/// Runs the first `upto` cases of `function` on token `token` through `module` (the shim or the backend), in
/// children; a child that dies is followed by one that starts at the next case.
pub fn run_cases(module: &Path, token: &str, function: Function, upto: usize) -> Vec<(Case, Outcome)> {
    let all = &cases(function)[..upto];
    let mut outcomes: Vec<(Case, Outcome)> = Vec::new();
    while outcomes.len() < all.len() {
        let from = outcomes.len();
        let (status, stdout, stderr) = run_child(module, token, function, from, upto);
        let mut started: Option<usize> = None;
        for line in stdout.lines() {
            if let Some((_, rest)) = line.split_once("@@START ") {
                started = rest.split(' ').next().and_then(|i| i.parse().ok());
            } else if let Some((_, rest)) = line.split_once("@@RV ") {
                let fields: Vec<&str> = rest.split(' ').collect();
                let i: usize = fields[0].parse().expect("case index");
                let rv = CK_RV::from_str_radix(fields[2].trim_start_matches("0x"), 16).expect("rv");
                assert_eq!(i, outcomes.len(), "cases in order");
                outcomes.push((all[i], Outcome::Returned(rv)));
                started = None;
            }
        }
        if outcomes.len() == all.len() {
            break;
        }
        match started {
            Some(i) if i == outcomes.len() => outcomes.push((all[i], Outcome::Died(status))),
            _ => panic!(
                "the child for {} on {token} through {} failed before case {} ({status}):\n{stdout}\n{stderr}",
                function.name(),
                module.display(),
                outcomes.len()
            ),
        }
    }
    outcomes
}

/// One child run: its exit (described), stdout and stderr.
fn run_child(module: &Path, token: &str, function: Function, from: usize, upto: usize) -> (String, String, String) {
    let dir = common::test_dir();
    let out_path = dir.join(format!("child-{token}-{}-{from}.out", function.name()));
    let err_path = out_path.with_extension("err");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads", "1"])
        .env(ENV_MODULE, module)
        .env(ENV_TOKEN, token)
        .env(ENV_FUNCTION, function.name())
        .env(ENV_FROM, from.to_string())
        .env(ENV_UPTO, upto.to_string())
        .stdout(Stdio::from(std::fs::File::create(&out_path).expect("child stdout")))
        .stderr(Stdio::from(std::fs::File::create(&err_path).expect("child stderr")))
        .spawn()
        .expect("re-run the test binary");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break match status.signal() {
                Some(signal) => format!("signal {signal}"),
                None => format!("exit status {}", status.code().unwrap_or(-1)),
            };
        }
        if started.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            let _ = child.wait();
            break "timed out after 300 s".to_string();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    (status, stdout, stderr)
}

/// Every case of `function` through the shim on `token`: the expected CK_RV, never a crash. All mismatches
/// are reported at once.
pub fn hostile_through_the_shim(token: &str, function: Function) {
    init();
    let database = token == DATABASE;
    let all = cases(function);
    let outcomes = run_cases(&common::shim_path(), token, function, all.len());
    // The well-formed cases come first: the backend directly gives the answers to compare them with.
    let well_formed = all.iter().take_while(|c| matches!(c, Case::WellFormed | Case::WellFormedArrays)).count();
    let direct = if database { vec![] } else { run_cases(&common::backend_path(), token, function, well_formed) };
    let mut wrong = Vec::new();
    for (i, (case, outcome)) in outcomes.iter().enumerate() {
        println!("{} in {token}: {case:?}: {outcome}", function.name());
        let fine = match (expected(function, *case, database), outcome) {
            (Expected::Exactly(want), Outcome::Returned(rv)) => rv == &want,
            (Expected::SameAsDirect, Outcome::Returned(_)) => Some(outcome) == direct.get(i).map(|(_, o)| o),
            (Expected::Listed, Outcome::Returned(rv)) => function.listed().contains(rv),
            (_, Outcome::Died(_)) => false,
        };
        if !fine {
            wrong.push(format!(
                "  {case:?}: {outcome}, expected {:?}",
                match expected(function, *case, database) {
                    Expected::Exactly(rv) => common::rv_name(rv),
                    Expected::SameAsDirect => format!("the backend's answer, {}", direct[i].1),
                    Expected::Listed => "a CK_RV PKCS#11 lists".into(),
                }
            ));
        }
    }
    assert!(wrong.is_empty(), "{} in {token} through the shim:\n{}", function.name(), wrong.join("\n"));
}

/// Prints what the backend does with every case when loaded directly (no assertion: a measurement).
pub fn backend_direct_answers() {
    init();
    let module = common::backend_path();
    let mut report = format!("{:?} directly, token {PLAIN}:\n", common::backend());
    for function in FUNCTIONS {
        for (case, outcome) in run_cases(&module, PLAIN, function, cases(function).len()) {
            report += &format!("  {:22} {case:30?} {outcome}\n", function.name());
        }
    }
    println!("{report}");
    std::fs::write(common::test_dir().join("direct-answers.txt"), &report).expect("write the report");
}

/// pkcs11-tool --keypairgen with --allowed-mechanisms through the shim on `token`: its CK_RV if it failed.
/// Panics if pkcs11-tool died of a signal.
pub fn pkcs11_tool_allowed_mechanisms(token: &str) -> Option<String> {
    init();
    let label = format!("pss-{}", std::process::id());
    let out = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(common::shim_path())
        .args(["--token-label", token, "--login", "--pin", USER_PIN])
        .args(["--keypairgen", "--key-type", "RSA:2048", "--label", &label])
        .args([
            "--allowed-mechanisms",
            "RSA-PKCS-PSS,SHA256-RSA-PKCS-PSS,SHA384-RSA-PKCS-PSS,SHA512-RSA-PKCS-PSS,RSA-PKCS,SHA256-RSA-PKCS",
        ])
        .output()
        .expect("run pkcs11-tool");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.signal().is_none(),
        "pkcs11-tool died of signal {:?} in {token}:\n{stderr}",
        out.status.signal()
    );
    if out.status.success() {
        return None;
    }
    // "error: PKCS11 function C_GenerateKeyPair failed: rv = CKR_TEMPLATE_INCONSISTENT (0xd1)"
    let rv = stderr
        .lines()
        .find_map(|l| l.split_once("C_GenerateKeyPair failed: rv = ").map(|(_, r)| r.to_string()))
        .unwrap_or_else(|| panic!("pkcs11-tool failed in {token} without a C_GenerateKeyPair CK_RV:\n{stderr}"));
    let hex = rv.rsplit_once("(0x").and_then(|(_, h)| h.strip_suffix(')')).expect("CK_RV in hex");
    let value = CK_RV::from_str_radix(hex, 16).expect("CK_RV");
    assert!(
        Function::GenerateKeyPair.listed().contains(&value),
        "pkcs11-tool in {token}: C_GenerateKeyPair returned {rv}, which PKCS#11 does not list for it"
    );
    Some(rv)
}

// ---------------------------------------------------------------------------------------------------
// The child: one session, the objects the function needs, then one call per case.

/// Memory for the templates of one child: leaked, as the process ends after the calls.
fn leak<T>(v: Vec<T>) -> *mut T {
    Box::leak(v.into_boxed_slice()).as_mut_ptr()
}

fn raw(ty: CK_ATTRIBUTE_TYPE, ptr: *mut c_void, len: CK_ULONG) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE { type_: ty, pValue: ptr, ulValueLen: len }
}

fn bytes(ty: CK_ATTRIBUTE_TYPE, value: &[u8]) -> CK_ATTRIBUTE {
    raw(ty, leak(value.to_vec()).cast(), value.len() as CK_ULONG)
}

fn boolean(ty: CK_ATTRIBUTE_TYPE, value: bool) -> CK_ATTRIBUTE {
    bytes(ty, &[value as u8])
}

fn ulong(ty: CK_ATTRIBUTE_TYPE, value: CK_ULONG) -> CK_ATTRIBUTE {
    bytes(ty, &value.to_ne_bytes())
}

fn array(ty: CK_ATTRIBUTE_TYPE, elements: Vec<CK_ATTRIBUTE>) -> CK_ATTRIBUTE {
    let len = (elements.len() * std::mem::size_of::<CK_ATTRIBUTE>()) as CK_ULONG;
    raw(ty, leak(elements).cast(), len)
}

fn mechanisms(ty: CK_ATTRIBUTE_TYPE, list: &[CK_MECHANISM_TYPE]) -> CK_ATTRIBUTE {
    let len = std::mem::size_of_val(list) as CK_ULONG;
    raw(ty, leak(list.to_vec()).cast(), len)
}

/// A buffer of `n` zero bytes for an answer.
fn buffer(ty: CK_ATTRIBUTE_TYPE, n: usize) -> CK_ATTRIBUTE {
    raw(ty, leak(vec![0u8; n]).cast(), n as CK_ULONG)
}

const ATTRIBUTE_SIZE: CK_ULONG = std::mem::size_of::<CK_ATTRIBUTE>() as CK_ULONG;
const MECHANISM_SIZE: CK_ULONG = std::mem::size_of::<CK_MECHANISM_TYPE>() as CK_ULONG;
const FOUR_GIB: CK_ULONG = 1 << 32;

/// The attribute a case adds to an input template.
fn hostile_attribute(case: Case, allowed: &[CK_MECHANISM_TYPE]) -> Vec<CK_ATTRIBUTE> {
    use Case::*;
    let one_element = || leak(vec![boolean(CKA_ENCRYPT, true)]).cast::<c_void>();
    let three_mechanisms = || leak(vec![CKM_AES_CBC, CKM_AES_ECB, CKM_AES_CBC_PAD]).cast::<c_void>();
    match case {
        WellFormed => vec![],
        WellFormedArrays => vec![
            array(CKA_WRAP_TEMPLATE, vec![boolean(CKA_EXTRACTABLE, false)]),
            mechanisms(CKA_ALLOWED_MECHANISMS, allowed),
        ],
        NullValueWithLength => vec![raw(CKA_LABEL, null_mut(), 8)],
        UnavailableLength => vec![raw(CKA_LABEL, leak(b"hostile!".to_vec()).cast(), CK_UNAVAILABLE_INFORMATION)],
        HugeLength => vec![raw(CKA_LABEL, leak(b"hostile!".to_vec()).cast(), FOUR_GIB)],
        NullAttributeArrayWithLength => vec![raw(CKA_WRAP_TEMPLATE, null_mut(), ATTRIBUTE_SIZE)],
        AttributeArrayRagged => vec![raw(CKA_WRAP_TEMPLATE, one_element(), ATTRIBUTE_SIZE + 1)],
        AttributeArrayTooLong => vec![raw(CKA_WRAP_TEMPLATE, one_element(), ATTRIBUTE_SIZE << 30)],
        MechanismArrayRagged => vec![raw(CKA_ALLOWED_MECHANISMS, three_mechanisms(), 3 * MECHANISM_SIZE - 4)],
        MechanismArrayTooLong => vec![raw(CKA_ALLOWED_MECHANISMS, three_mechanisms(), MECHANISM_SIZE << 30)],
        InnerNullValueWithLength => vec![array(CKA_WRAP_TEMPLATE, vec![raw(CKA_ENCRYPT, null_mut(), 1)])],
        InnerHugeLength => {
            vec![array(CKA_WRAP_TEMPLATE, vec![raw(CKA_LABEL, leak(b"hostile!".to_vec()).cast(), FOUR_GIB)])]
        }
        NestedAttributeArray => {
            vec![array(CKA_WRAP_TEMPLATE, vec![array(CKA_UNWRAP_TEMPLATE, vec![boolean(CKA_ENCRYPT, true)])])]
        }
        SelfNestedAttributeArray => {
            let me = leak(vec![raw(CKA_WRAP_TEMPLATE, null_mut(), ATTRIBUTE_SIZE)]);
            // SAFETY: `me` is a leaked one-element array; it now points at itself.
            unsafe { (*me).pValue = me.cast() };
            vec![raw(CKA_WRAP_TEMPLATE, me.cast(), ATTRIBUTE_SIZE)]
        }
        TooManyAttributes => (0..=MAX_ATTRIBUTES).map(|_| bytes(CKA_LABEL, b"x")).collect(),
        TooManyBytes => {
            let big = leak(vec![b'x'; MAX_VALUE as usize]).cast::<c_void>();
            (0..5).map(|_| raw(CKA_LABEL, big, MAX_VALUE)).collect()
        }
        ArrayElementsMixed | NullTemplateWithCount => unreachable!("{case:?} is not an added attribute"),
    }
}

/// The query entries of a C_GetAttributeValue case.
fn query(case: Case) -> Vec<CK_ATTRIBUTE> {
    use Case::*;
    let encrypt_decrypt = |first_len: CK_ULONG, second: CK_ATTRIBUTE| {
        leak(vec![raw(CKA_ENCRYPT, leak(vec![0u8; 8]).cast(), first_len), second]).cast::<c_void>()
    };
    match case {
        WellFormed => vec![buffer(CKA_LABEL, 64)],
        WellFormedArrays => vec![
            array(CKA_WRAP_TEMPLATE, vec![buffer(CKA_ENCRYPT, 8), buffer(CKA_DECRYPT, 8)]),
            buffer(CKA_ALLOWED_MECHANISMS, 8 * MECHANISM_SIZE as usize),
        ],
        NullValueWithLength => vec![raw(CKA_LABEL, null_mut(), 8)],
        UnavailableLength => vec![raw(CKA_LABEL, leak(vec![0u8; 64]).cast(), CK_UNAVAILABLE_INFORMATION)],
        HugeLength => vec![raw(CKA_LABEL, leak(vec![0u8; 64]).cast(), FOUR_GIB)],
        AttributeArrayRagged => {
            vec![raw(CKA_WRAP_TEMPLATE, encrypt_decrypt(8, buffer(CKA_DECRYPT, 8)), 2 * ATTRIBUTE_SIZE + 1)]
        }
        AttributeArrayTooLong => {
            vec![raw(CKA_WRAP_TEMPLATE, encrypt_decrypt(8, buffer(CKA_DECRYPT, 8)), ATTRIBUTE_SIZE << 30)]
        }
        MechanismArrayRagged => {
            vec![raw(CKA_ALLOWED_MECHANISMS, leak(vec![0u8; 64]).cast(), 4 * MECHANISM_SIZE + 3)]
        }
        MechanismArrayTooLong => vec![raw(CKA_ALLOWED_MECHANISMS, leak(vec![0u8; 64]).cast(), MECHANISM_SIZE << 30)],
        InnerHugeLength => {
            vec![raw(CKA_WRAP_TEMPLATE, encrypt_decrypt(FOUR_GIB, buffer(CKA_DECRYPT, 8)), 2 * ATTRIBUTE_SIZE)]
        }
        ArrayElementsMixed => {
            vec![raw(CKA_WRAP_TEMPLATE, encrypt_decrypt(8, raw(CKA_DECRYPT, null_mut(), 64)), 2 * ATTRIBUTE_SIZE)]
        }
        TooManyAttributes => (0..=MAX_ATTRIBUTES).map(|_| raw(CKA_LABEL, null_mut(), 0)).collect(),
        _ => unreachable!("{case:?} is not a query case"),
    }
}

/// The template a case passes: (pointer, count).
fn template_of(case: Case, base: Vec<CK_ATTRIBUTE>, allowed: &[CK_MECHANISM_TYPE]) -> (*mut CK_ATTRIBUTE, CK_ULONG) {
    if case == Case::NullTemplateWithCount {
        return (null_mut(), 2);
    }
    let mut list = base;
    list.extend(hostile_attribute(case, allowed));
    let n = list.len() as CK_ULONG;
    (leak(list), n)
}

macro_rules! call {
    ($f:expr, $name:ident ( $($arg:expr),* $(,)? )) => {{
        let func = $f.$name.expect(stringify!($name));
        // SAFETY: the arguments are live (leaked) buffers, or the hostile values the case is about.
        unsafe { func($($arg),*) }
    }};
}

fn ok(rv: CK_RV, what: &str) {
    assert_eq!(rv, CKR_OK, "{what}: {}", common::rv_name(rv));
}

struct Child {
    f: &'static CK_FUNCTION_LIST,
    s: CK_SESSION_HANDLE,
    /// A token object in a database slot is a stored key; elsewhere the children make session objects.
    token: bool,
}

const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

impl Child {
    fn generate_aes(&self, extra: Vec<CK_ATTRIBUTE>) -> CK_OBJECT_HANDLE {
        let mut t = vec![
            boolean(CKA_TOKEN, false),
            ulong(CKA_VALUE_LEN, 32),
            boolean(CKA_ENCRYPT, true),
            boolean(CKA_DECRYPT, true),
            boolean(CKA_WRAP, true),
            boolean(CKA_UNWRAP, true),
            boolean(CKA_EXTRACTABLE, true),
            boolean(CKA_SENSITIVE, false),
        ];
        t.extend(extra);
        let mut m = CK_MECHANISM { mechanism: CKM_AES_KEY_GEN, pParameter: null_mut(), ulParameterLen: 0 };
        let mut h = 0;
        ok(call!(self.f, C_GenerateKey(self.s, &mut m, t.as_mut_ptr(), t.len() as CK_ULONG, &mut h)), "AES key");
        h
    }

    fn find(&self, label: &str) -> CK_OBJECT_HANDLE {
        let mut t = [bytes(CKA_LABEL, label.as_bytes())];
        ok(call!(self.f, C_FindObjectsInit(self.s, t.as_mut_ptr(), 1)), "find init");
        let mut h = [0; 2];
        let mut n = 0;
        ok(call!(self.f, C_FindObjects(self.s, h.as_mut_ptr(), 2, &mut n)), "find");
        ok(call!(self.f, C_FindObjectsFinal(self.s)), "find final");
        assert_eq!(n, 1, "one object labelled {label}");
        h[0]
    }

    /// Calls `function` with the case's template.
    fn run(&self, function: Function, case: Case) -> CK_RV {
        let (f, s, token) = (self.f, self.s, self.token);
        let mut handle: CK_OBJECT_HANDLE = 0;
        let secret = |label: &str| {
            vec![
                ulong(CKA_CLASS, CKO_SECRET_KEY),
                ulong(CKA_KEY_TYPE, CKK_AES),
                boolean(CKA_TOKEN, token),
                bytes(CKA_LABEL, label.as_bytes()),
                boolean(CKA_ENCRYPT, true),
            ]
        };
        let aes_allowed = [CKM_AES_CBC, CKM_AES_ECB];
        match function {
            Function::CreateObject => {
                let mut base = secret("created");
                base.push(bytes(CKA_VALUE, &[0x11; 32]));
                let (t, n) = template_of(case, base, &aes_allowed);
                call!(f, C_CreateObject(s, t, n, &mut handle))
            }
            Function::GenerateKey => {
                let base = vec![boolean(CKA_TOKEN, token), ulong(CKA_VALUE_LEN, 32), boolean(CKA_ENCRYPT, true)];
                let (t, n) = template_of(case, base, &aes_allowed);
                let mut m = CK_MECHANISM { mechanism: CKM_AES_KEY_GEN, pParameter: null_mut(), ulParameterLen: 0 };
                call!(f, C_GenerateKey(s, &mut m, t, n, &mut handle))
            }
            Function::GenerateKeyPair => {
                let base = vec![boolean(CKA_TOKEN, token), bytes(CKA_EC_PARAMS, &P256), boolean(CKA_VERIFY, true)];
                let (pt, pn) = template_of(case, base, &[CKM_ECDSA]);
                let mut private = [boolean(CKA_TOKEN, token), boolean(CKA_SIGN, true), boolean(CKA_SENSITIVE, true)];
                let mut m = CK_MECHANISM { mechanism: CKM_EC_KEY_PAIR_GEN, pParameter: null_mut(), ulParameterLen: 0 };
                let mut other = 0;
                call!(f, C_GenerateKeyPair(s, &mut m, pt, pn, private.as_mut_ptr(), 3, &mut handle, &mut other))
            }
            Function::UnwrapKey => {
                let kek = self.generate_aes(vec![]);
                let key = self.generate_aes(vec![]);
                let mut m = CK_MECHANISM { mechanism: CKM_AES_KEY_WRAP, pParameter: null_mut(), ulParameterLen: 0 };
                let mut blob = [0u8; 64];
                let mut len = blob.len() as CK_ULONG;
                ok(call!(f, C_WrapKey(s, &mut m, kek, key, blob.as_mut_ptr(), &mut len)), "wrap");
                let (t, n) = template_of(case, secret("unwrapped"), &aes_allowed);
                call!(f, C_UnwrapKey(s, &mut m, kek, blob.as_mut_ptr(), len, t, n, &mut handle))
            }
            Function::DeriveKey => {
                let (public, private) = self.ec_pair();
                let mut point = buffer(CKA_EC_POINT, 128);
                ok(call!(f, C_GetAttributeValue(s, public, &mut point, 1)), "EC point");
                let mut params = CK_ECDH1_DERIVE_PARAMS {
                    kdf: CKD_NULL,
                    ulSharedDataLen: 0,
                    pSharedData: null_mut(),
                    ulPublicDataLen: point.ulValueLen,
                    pPublicData: point.pValue.cast(),
                };
                let mut m = CK_MECHANISM {
                    mechanism: CKM_ECDH1_DERIVE,
                    pParameter: (&mut params as *mut CK_ECDH1_DERIVE_PARAMS).cast(),
                    ulParameterLen: std::mem::size_of::<CK_ECDH1_DERIVE_PARAMS>() as CK_ULONG,
                };
                let mut base = secret("derived");
                base.push(ulong(CKA_VALUE_LEN, 32));
                let (t, n) = template_of(case, base, &aes_allowed);
                call!(f, C_DeriveKey(s, &mut m, private, t, n, &mut handle))
            }
            Function::CopyObject => {
                let source = self.generate_aes(vec![]);
                let base = vec![boolean(CKA_TOKEN, token), bytes(CKA_LABEL, b"copied")];
                let (t, n) = template_of(case, base, &aes_allowed);
                call!(f, C_CopyObject(s, source, t, n, &mut handle))
            }
            Function::FindObjectsInit => {
                let (t, n) = template_of(case, vec![bytes(CKA_LABEL, b"nothing")], &aes_allowed);
                let rv = call!(f, C_FindObjectsInit(s, t, n));
                if rv == CKR_OK {
                    ok(call!(f, C_FindObjectsFinal(s)), "find final");
                }
                rv
            }
            Function::SetAttributeValue => {
                let target = self.target();
                let (t, n) = template_of(case, vec![bytes(CKA_LABEL, self.target_label().as_bytes())], &aes_allowed);
                call!(f, C_SetAttributeValue(s, target, t, n))
            }
            Function::GetAttributeValue => {
                let target = self.target();
                if case == Case::NullTemplateWithCount {
                    return call!(f, C_GetAttributeValue(s, target, null_mut(), 2));
                }
                let mut q = query(case);
                call!(f, C_GetAttributeValue(s, target, q.as_mut_ptr(), q.len() as CK_ULONG))
            }
        }
    }

    fn ec_pair(&self) -> (CK_OBJECT_HANDLE, CK_OBJECT_HANDLE) {
        let mut public = [boolean(CKA_TOKEN, false), bytes(CKA_EC_PARAMS, &P256)];
        let mut private = [boolean(CKA_TOKEN, false), boolean(CKA_DERIVE, true), boolean(CKA_SENSITIVE, true)];
        let mut m = CK_MECHANISM { mechanism: CKM_EC_KEY_PAIR_GEN, pParameter: null_mut(), ulParameterLen: 0 };
        let (mut p, mut q) = (0, 0);
        let rv = call!(
            self.f,
            C_GenerateKeyPair(self.s, &mut m, public.as_mut_ptr(), 2, private.as_mut_ptr(), 3, &mut p, &mut q)
        );
        ok(rv, "EC key pair");
        (p, q)
    }

    /// The object C_SetAttributeValue and C_GetAttributeValue work on: the stored key in a database slot,
    /// elsewhere a session key with a wrap template and allowed mechanisms.
    fn target(&self) -> CK_OBJECT_HANDLE {
        if self.token {
            return self.find(STORED);
        }
        self.generate_aes(vec![
            bytes(CKA_LABEL, self.target_label().as_bytes()),
            array(CKA_WRAP_TEMPLATE, vec![boolean(CKA_ENCRYPT, true), boolean(CKA_DECRYPT, true)]),
            mechanisms(CKA_ALLOWED_MECHANISMS, &[CKM_AES_CBC, CKM_AES_ECB]),
        ])
    }

    fn target_label(&self) -> &'static str {
        if self.token {
            STORED
        } else {
            "target"
        }
    }
}

/// The child's side; does nothing in a normal test run.
pub fn hostile_child() {
    let (Some(module), Some(token), Some(function), Some(from), Some(upto)) = (
        std::env::var_os(ENV_MODULE),
        std::env::var(ENV_TOKEN).ok(),
        std::env::var(ENV_FUNCTION).ok(),
        std::env::var(ENV_FROM).ok(),
        std::env::var(ENV_UPTO).ok(),
    ) else {
        return;
    };
    let function = Function::from_name(&function);
    let (from, upto): (usize, usize) = (from.parse().expect(ENV_FROM), upto.parse().expect(ENV_UPTO));
    // The parent prepared the environment and the tokens: no common::setup here (it would wipe them).
    let f = common::raw_functions(&PathBuf::from(module));
    let mut args = CK_C_INITIALIZE_ARGS {
        CreateMutex: None,
        DestroyMutex: None,
        LockMutex: None,
        UnlockMutex: None,
        flags: CKF_OS_LOCKING_OK,
        pReserved: null_mut(),
    };
    ok(call!(f, C_Initialize((&mut args as *mut CK_C_INITIALIZE_ARGS).cast())), "C_Initialize");
    let slot = slot_of(f, &token);
    let mut s = 0;
    ok(call!(f, C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, null_mut(), None, &mut s)), "session");
    let rv = call!(f, C_Login(s, CKU_USER, USER_PIN.as_ptr() as *mut u8, USER_PIN.len() as CK_ULONG));
    assert!(rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN, "C_Login: {}", common::rv_name(rv));
    let child = Child { f, s, token: token == DATABASE };
    let mut out = std::io::stdout();
    for (i, case) in cases(function).iter().enumerate().take(upto).skip(from) {
        writeln!(out, "@@START {i} {case:?}").unwrap();
        out.flush().unwrap();
        let rv = child.run(function, *case);
        writeln!(out, "@@RV {i} {case:?} {rv:#x}").unwrap();
        out.flush().unwrap();
    }
    // Leave the backend's state as it is for the next child: no C_Finalize needed, the process ends.
}

fn slot_of(f: &CK_FUNCTION_LIST, label: &str) -> CK_SLOT_ID {
    let mut slots = [0 as CK_SLOT_ID; 64];
    let mut n = slots.len() as CK_ULONG;
    ok(call!(f, C_GetSlotList(CK_TRUE, slots.as_mut_ptr(), &mut n)), "slot list");
    for &slot in &slots[..n as usize] {
        // SAFETY: plain data.
        let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
        if call!(f, C_GetTokenInfo(slot, &mut info)) == CKR_OK
            && String::from_utf8_lossy(&info.label).trim_end() == label
        {
            return slot;
        }
    }
    panic!("no token labelled {label}");
}

/// A key made with CKA_ALLOWED_MECHANISMS (three mechanisms: the size of one CK_ATTRIBUTE, which the shim once
/// took for one) and two attribute arrays, on `token` through the shim (a stored key in the database slot),
/// reads back as given by C_GetAttributeValue's protocol for arrays: lengths, then the elements' types and
/// lengths, then the values.
pub fn array_attributes_read_back(token: &str) {
    init();
    let slot = common::find_token(token).expect("token");
    let session = user_session(slot);
    let f = common::functions(&common::shim_path());
    let s = session.handle();
    let allowed = [CKM_AES_CBC, CKM_AES_ECB, CKM_AES_CBC_PAD];
    let label = format!("arrays-{}", std::process::id());
    let mut t = vec![
        boolean(CKA_TOKEN, token == DATABASE),
        bytes(CKA_LABEL, label.as_bytes()),
        ulong(CKA_VALUE_LEN, 32),
        boolean(CKA_ENCRYPT, true),
        boolean(CKA_WRAP, true),
        boolean(CKA_UNWRAP, true),
        mechanisms(CKA_ALLOWED_MECHANISMS, &allowed),
        array(CKA_WRAP_TEMPLATE, vec![boolean(CKA_EXTRACTABLE, false), bytes(CKA_LABEL, b"wrapped")]),
        array(CKA_UNWRAP_TEMPLATE, vec![boolean(CKA_SENSITIVE, true)]),
    ];
    let mut m = CK_MECHANISM { mechanism: CKM_AES_KEY_GEN, pParameter: null_mut(), ulParameterLen: 0 };
    let mut key = 0;
    ok(call!(f, C_GenerateKey(s, &mut m, t.as_mut_ptr(), t.len() as CK_ULONG, &mut key)), "C_GenerateKey with arrays");
    if token == DATABASE {
        assert!(key & (1 << 63) != 0, "a stored key (P11SHIM_HANDLE_BIT)");
    }

    // Lengths.
    let types = [CKA_ALLOWED_MECHANISMS, CKA_WRAP_TEMPLATE, CKA_UNWRAP_TEMPLATE];
    let mut q: Vec<CK_ATTRIBUTE> = types.iter().map(|&ty| raw(ty, null_mut(), 0)).collect();
    ok(call!(f, C_GetAttributeValue(s, key, q.as_mut_ptr(), 3)), "lengths");
    assert_eq!(q[0].ulValueLen, 3 * MECHANISM_SIZE, "CKA_ALLOWED_MECHANISMS: three mechanism types");
    assert_eq!(q[1].ulValueLen, 2 * ATTRIBUTE_SIZE, "CKA_WRAP_TEMPLATE: two attributes");
    assert_eq!(q[2].ulValueLen, ATTRIBUTE_SIZE, "CKA_UNWRAP_TEMPLATE: one attribute");
    // The elements' types and lengths.
    let blank = |n: CK_ULONG| vec![raw(0, null_mut(), 0); (n / ATTRIBUTE_SIZE) as usize];
    let (mut wrap, mut unwrap) = (blank(q[1].ulValueLen), blank(q[2].ulValueLen));
    let mut list = vec![0 as CK_MECHANISM_TYPE; 3];
    q[0].pValue = list.as_mut_ptr().cast();
    q[1].pValue = wrap.as_mut_ptr().cast();
    q[2].pValue = unwrap.as_mut_ptr().cast();
    ok(call!(f, C_GetAttributeValue(s, key, q.as_mut_ptr(), 3)), "element types and lengths");
    list.sort();
    let mut want = allowed.to_vec();
    want.sort();
    assert_eq!(list, want, "CKA_ALLOWED_MECHANISMS as given");
    // The values.
    for element in wrap.iter_mut().chain(unwrap.iter_mut()) {
        element.pValue = leak(vec![0u8; element.ulValueLen as usize]).cast();
    }
    ok(call!(f, C_GetAttributeValue(s, key, q[1..].as_mut_ptr(), 2)), "element values");
    let read = |elements: &[CK_ATTRIBUTE]| {
        let mut v: Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)> = elements
            .iter()
            // SAFETY: each element's buffer holds the ulValueLen bytes just written.
            .map(|e| {
                (e.type_, unsafe { std::slice::from_raw_parts(e.pValue as *const u8, e.ulValueLen as usize) }.to_vec())
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(read(&wrap), vec![(CKA_LABEL, b"wrapped".to_vec()), (CKA_EXTRACTABLE, vec![CK_FALSE])]);
    assert_eq!(read(&unwrap), vec![(CKA_SENSITIVE, vec![CK_TRUE])]);
    ok(call!(f, C_DestroyObject(s, key)), "C_DestroyObject");
}

/// One #[test] per (slot, function) through the shim, the pkcs11-tool runs, the measurement of the backend
/// directly (ignored) and the child entry.
#[macro_export]
macro_rules! templates_cases {
    () => {
        #[test]
        fn hostile_child() {
            templates_cases::hostile_child();
        }

        #[test]
        #[ignore = "a measurement of the backend loaded directly; prints what it does with each case"]
        #[serial_test::serial]
        fn backend_direct_answers() {
            templates_cases::backend_direct_answers();
        }

        #[test]
        #[serial_test::serial]
        fn array_attributes_read_back_in_a_pass_through_slot() {
            templates_cases::array_attributes_read_back(templates_cases::PLAIN);
        }

        #[test]
        #[serial_test::serial]
        fn array_attributes_read_back_in_a_database_slot() {
            templates_cases::array_attributes_read_back(templates_cases::DATABASE);
        }

        #[test]
        #[serial_test::serial]
        fn pkcs11_tool_allowed_mechanisms_in_a_pass_through_slot() {
            let rv = templates_cases::pkcs11_tool_allowed_mechanisms(templates_cases::PLAIN);
            assert_eq!(rv, None, "pkcs11-tool --keypairgen --allowed-mechanisms in a pass-through slot");
        }

        #[test]
        #[serial_test::serial]
        fn pkcs11_tool_allowed_mechanisms_in_a_database_slot() {
            // Whether a stored key may carry CKA_ALLOWED_MECHANISMS is the vault's to say: no crash, and a
            // CK_RV PKCS#11 lists for C_GenerateKeyPair.
            let rv = templates_cases::pkcs11_tool_allowed_mechanisms(templates_cases::DATABASE);
            println!("pkcs11-tool --allowed-mechanisms in a database slot: {}", rv.as_deref().unwrap_or("CKR_OK"));
        }

        templates_cases!(@each
            c_create_object => CreateObject,
            c_generate_key => GenerateKey,
            c_generate_key_pair => GenerateKeyPair,
            c_unwrap_key => UnwrapKey,
            c_derive_key => DeriveKey,
            c_copy_object => CopyObject,
            c_find_objects_init => FindObjectsInit,
            c_set_attribute_value => SetAttributeValue,
            c_get_attribute_value => GetAttributeValue,
        );
    };
    (@each $($name:ident => $function:ident),* $(,)?) => {
        mod hostile_in_a_pass_through_slot {
            use super::templates_cases::{self, Function};
            $(
                #[test]
                #[serial_test::serial]
                fn $name() {
                    templates_cases::hostile_through_the_shim(templates_cases::PLAIN, Function::$function);
                }
            )*
        }
        mod hostile_in_a_database_slot {
            use super::templates_cases::{self, Function};
            $(
                #[test]
                #[serial_test::serial]
                fn $name() {
                    templates_cases::hostile_through_the_shim(templates_cases::DATABASE, Function::$function);
                }
            )*
        }
    };
}
