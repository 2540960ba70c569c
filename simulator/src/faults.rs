//! Fault injection: failing chosen calls, latency, device removal, lost sessions, a crash while writing state.
//!
//! Calls are counted per process from C_Initialize (C_Initialize, C_GetFunctionList, C_GetInterfaceList and
//! C_GetInterface are not counted; the vendor functions of "CSSIM MBK" are):
//! the first counted call is number 1. Every decision is deterministic given the configuration and `seed`.

use cryptoki_sys::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// The names of the PKCS#11 2.40 functions (the order of CK_FUNCTION_LIST).
pub const FUNCTIONS: &[&str] = &[
    "C_Initialize",
    "C_Finalize",
    "C_GetInfo",
    "C_GetFunctionList",
    "C_GetSlotList",
    "C_GetSlotInfo",
    "C_GetTokenInfo",
    "C_GetMechanismList",
    "C_GetMechanismInfo",
    "C_InitToken",
    "C_InitPIN",
    "C_SetPIN",
    "C_OpenSession",
    "C_CloseSession",
    "C_CloseAllSessions",
    "C_GetSessionInfo",
    "C_GetOperationState",
    "C_SetOperationState",
    "C_Login",
    "C_Logout",
    "C_CreateObject",
    "C_CopyObject",
    "C_DestroyObject",
    "C_GetObjectSize",
    "C_GetAttributeValue",
    "C_SetAttributeValue",
    "C_FindObjectsInit",
    "C_FindObjects",
    "C_FindObjectsFinal",
    "C_EncryptInit",
    "C_Encrypt",
    "C_EncryptUpdate",
    "C_EncryptFinal",
    "C_DecryptInit",
    "C_Decrypt",
    "C_DecryptUpdate",
    "C_DecryptFinal",
    "C_DigestInit",
    "C_Digest",
    "C_DigestUpdate",
    "C_DigestKey",
    "C_DigestFinal",
    "C_SignInit",
    "C_Sign",
    "C_SignUpdate",
    "C_SignFinal",
    "C_SignRecoverInit",
    "C_SignRecover",
    "C_VerifyInit",
    "C_Verify",
    "C_VerifyUpdate",
    "C_VerifyFinal",
    "C_VerifyRecoverInit",
    "C_VerifyRecover",
    "C_DigestEncryptUpdate",
    "C_DecryptDigestUpdate",
    "C_SignEncryptUpdate",
    "C_DecryptVerifyUpdate",
    "C_GenerateKey",
    "C_GenerateKeyPair",
    "C_WrapKey",
    "C_UnwrapKey",
    "C_DeriveKey",
    "C_SeedRandom",
    "C_GenerateRandom",
    "C_GetFunctionStatus",
    "C_CancelFunction",
    "C_WaitForSlotEvent",
];

/// The functions of the vendor interface "CSSIM MBK": counted and failed like the PKCS#11 functions.
pub const VENDOR_FUNCTIONS: &[&str] = &["CSSIM_GetMbkInfo", "CSSIM_BackupKey", "CSSIM_RestoreKey"];

/// Return values that a fault rule may name instead of giving the number.
const RV_NAMES: &[(&str, CK_RV)] = &[
    ("CKR_OK", CKR_OK),
    ("CKR_HOST_MEMORY", CKR_HOST_MEMORY),
    ("CKR_GENERAL_ERROR", CKR_GENERAL_ERROR),
    ("CKR_FUNCTION_FAILED", CKR_FUNCTION_FAILED),
    ("CKR_ARGUMENTS_BAD", CKR_ARGUMENTS_BAD),
    ("CKR_ACTION_PROHIBITED", CKR_ACTION_PROHIBITED),
    ("CKR_DATA_INVALID", CKR_DATA_INVALID),
    ("CKR_DEVICE_ERROR", CKR_DEVICE_ERROR),
    ("CKR_DEVICE_MEMORY", CKR_DEVICE_MEMORY),
    ("CKR_DEVICE_REMOVED", CKR_DEVICE_REMOVED),
    ("CKR_FUNCTION_CANCELED", CKR_FUNCTION_CANCELED),
    ("CKR_KEY_HANDLE_INVALID", CKR_KEY_HANDLE_INVALID),
    ("CKR_OBJECT_HANDLE_INVALID", CKR_OBJECT_HANDLE_INVALID),
    ("CKR_OPERATION_ACTIVE", CKR_OPERATION_ACTIVE),
    ("CKR_PIN_INCORRECT", CKR_PIN_INCORRECT),
    ("CKR_PIN_LOCKED", CKR_PIN_LOCKED),
    ("CKR_SESSION_CLOSED", CKR_SESSION_CLOSED),
    ("CKR_SESSION_COUNT", CKR_SESSION_COUNT),
    ("CKR_SESSION_HANDLE_INVALID", CKR_SESSION_HANDLE_INVALID),
    ("CKR_TOKEN_NOT_PRESENT", CKR_TOKEN_NOT_PRESENT),
    ("CKR_USER_NOT_LOGGED_IN", CKR_USER_NOT_LOGGED_IN),
    ("CKR_BUFFER_TOO_SMALL", CKR_BUFFER_TOO_SMALL),
    ("CKR_CRYPTOKI_NOT_INITIALIZED", CKR_CRYPTOKI_NOT_INITIALIZED),
];

/// A return value in the configuration: a number (`0x30`) or a name (`"CKR_DEVICE_ERROR"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RvSpec")]
pub struct Rv(pub CK_RV);

#[derive(Deserialize)]
#[serde(untagged)]
enum RvSpec {
    Number(u64),
    Name(String),
}

impl TryFrom<RvSpec> for Rv {
    type Error = String;
    fn try_from(spec: RvSpec) -> Result<Rv, String> {
        match spec {
            RvSpec::Number(n) => Ok(Rv(n as CK_RV)),
            RvSpec::Name(name) => RV_NAMES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, rv)| Rv(*rv))
                .ok_or_else(|| format!("unknown return value name {name:?} (give the number instead)")),
        }
    }
}

/// One `fail` rule: the calls of `function` it matches return `rv` instead of running. A rule with several
/// conditions matches when all hold; a rule without any matches every call.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailRule {
    pub function: String,
    /// Only the Nth call of the function.
    pub nth: Option<u64>,
    /// Every Nth call: N, 2N, 3N…
    pub every: Option<u64>,
    /// Every call after the first N.
    pub after: Option<u64>,
    /// Each call with this probability (0.0–1.0), drawn from the seeded generator.
    pub probability: Option<f64>,
    pub rv: Rv,
}

/// The `[faults]` table (or `CSSIM_FAULTS`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    /// Seed of the generator behind `probability` and `latency_jitter_us`.
    #[serde(default)]
    pub seed: u64,
    /// Added to every counted call, before it runs, with no lock held.
    #[serde(default)]
    pub latency_us: u64,
    /// A uniformly drawn extra latency of 0..=this many microseconds.
    #[serde(default)]
    pub latency_jitter_us: u64,
    #[serde(default)]
    pub fail: Vec<FailRule>,
    /// After this many calls the device is removed: CKR_DEVICE_REMOVED (token absent) until reset.
    pub remove_after: Option<u64>,
    /// When this file appears the removed device comes back (the file is deleted and counting restarts).
    pub reset_file: Option<PathBuf>,
    /// At this call (before it runs) every session of the process is closed and every login ends.
    pub invalidate_sessions_at: Option<u64>,
    /// The Nth write of the state file aborts the process half-way through the temporary file.
    pub crash_during_write: Option<u64>,
}

impl FaultConfig {
    /// Parses the body of a `[faults]` table (the syntax of `CSSIM_FAULTS`).
    pub fn parse(text: &str) -> Result<FaultConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    pub fn validate(&self) -> Result<(), String> {
        for rule in &self.fail {
            let name = rule.function.as_str();
            if !FUNCTIONS.contains(&name) && !VENDOR_FUNCTIONS.contains(&name) {
                return Err(format!("fail: unknown function {:?}", rule.function));
            }
            if rule.function == "C_Initialize" || rule.function == "C_GetFunctionList" {
                return Err(format!("fail: {} is not counted and cannot fail", rule.function));
            }
            if rule.nth == Some(0) || rule.every == Some(0) {
                return Err("fail: `nth` and `every` count from 1".into());
            }
            if rule.probability.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
                return Err("fail: `probability` is between 0.0 and 1.0".into());
            }
        }
        if self.reset_file.is_some() && self.remove_after.is_none() {
            return Err("`reset_file` needs `remove_after`".into());
        }
        Ok(())
    }

    /// Whether any fault is configured (the per-call path is skipped otherwise).
    pub fn any(&self) -> bool {
        self.latency_us > 0
            || self.latency_jitter_us > 0
            || !self.fail.is_empty()
            || self.remove_after.is_some()
            || self.invalidate_sessions_at.is_some()
    }
}

/// What the fault machinery decided for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Fail the call with this value instead of running it.
    pub fail: Option<CK_RV>,
    /// The device is (now) removed.
    pub removed: bool,
    /// The device was removed by this call: close every session.
    pub removed_now: bool,
    /// Close every session before running this call.
    pub invalidate_sessions: bool,
}

struct Counters {
    total: u64,
    /// `total` when the device last came back (remove_after counts from here).
    base: u64,
    removed: bool,
    per_function: HashMap<&'static str, u64>,
    rng: ChaCha8Rng,
}

/// The fault state of one C_Initialize.
pub struct Faults {
    config: FaultConfig,
    counters: Mutex<Counters>,
}

impl Faults {
    pub fn new(config: FaultConfig) -> Faults {
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Faults {
            config,
            counters: Mutex::new(Counters { total: 0, base: 0, removed: false, per_function: HashMap::new(), rng }),
        }
    }

    pub fn config(&self) -> &FaultConfig {
        &self.config
    }

    /// The device is removed at the moment.
    pub fn removed(&self) -> bool {
        self.counters.lock().unwrap_or_else(|e| e.into_inner()).removed
    }

    /// Counts one call of `function`, decides its fate and sleeps the configured latency (no lock held).
    pub fn on_call(&self, function: &'static str) -> (Verdict, Option<String>) {
        if !self.config.any() {
            return (Verdict { fail: None, removed: false, removed_now: false, invalidate_sessions: false }, None);
        }
        let mut note = None;
        let (verdict, sleep) = {
            let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
            c.total += 1;
            let total = c.total;
            let count = {
                let n = c.per_function.entry(function).or_insert(0);
                *n += 1;
                *n
            };
            if c.removed {
                if let Some(reset) = &self.config.reset_file {
                    if reset.exists() {
                        let _ = std::fs::remove_file(reset);
                        c.removed = false;
                        c.base = total - 1;
                        note = Some(format!("fault: device back ({} appeared) at call {total}", reset.display()));
                    }
                }
            }
            let mut removed_now = false;
            if let Some(n) = self.config.remove_after {
                if !c.removed && total - c.base > n {
                    c.removed = true;
                    removed_now = true;
                    note = Some(format!("fault: device removed at call {total} ({function})"));
                }
            }
            let invalidate_sessions = self.config.invalidate_sessions_at == Some(total);
            if invalidate_sessions {
                note = Some(format!("fault: all sessions invalidated at call {total} ({function})"));
            }
            let mut fail = None;
            for rule in self.config.fail.iter().filter(|r| r.function == function) {
                let mut hit = rule.nth.is_none_or(|n| count == n)
                    && rule.every.is_none_or(|n| count % n == 0)
                    && rule.after.is_none_or(|n| count > n);
                if let Some(p) = rule.probability {
                    // Drawn for every call of the function, so the sequence depends on the seed alone.
                    let draw: f64 = c.rng.gen();
                    hit &= draw < p;
                }
                if hit {
                    fail = Some(rule.rv.0);
                    note = Some(format!("fault: {function} call {count} fails with {:#x}", rule.rv.0));
                    break;
                }
            }
            let mut sleep = self.config.latency_us;
            if self.config.latency_jitter_us > 0 {
                sleep += c.rng.gen_range(0..=self.config.latency_jitter_us);
            }
            (Verdict { fail, removed: c.removed, removed_now, invalidate_sessions }, sleep)
        };
        if sleep > 0 {
            std::thread::sleep(Duration::from_micros(sleep));
        }
        (verdict, note)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(text: &str) -> Faults {
        let c = FaultConfig::parse(text).unwrap();
        c.validate().unwrap();
        Faults::new(c)
    }

    #[test]
    fn nth_and_every() {
        let f = faults(
            "fail = [{function=\"C_Sign\", nth=3, rv=0x30}, {function=\"C_Digest\", every=2, rv=\"CKR_DEVICE_ERROR\"}]",
        );
        let sign: Vec<_> = (0..5).map(|_| f.on_call("C_Sign").0.fail).collect();
        assert_eq!(sign, [None, None, Some(0x30), None, None]);
        let digest: Vec<_> = (0..4).map(|_| f.on_call("C_Digest").0.fail).collect();
        assert_eq!(digest, [None, Some(CKR_DEVICE_ERROR), None, Some(CKR_DEVICE_ERROR)]);
    }

    #[test]
    fn probability_is_deterministic_per_seed() {
        let run = |seed: u64| -> Vec<bool> {
            let f = faults(&format!("seed = {seed}\nfail = [{{function=\"C_Sign\", probability=0.5, rv=5}}]"));
            (0..64).map(|_| f.on_call("C_Sign").0.fail.is_some()).collect()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let hits = run(7).iter().filter(|h| **h).count();
        assert!((16..=48).contains(&hits), "{hits}");
    }

    #[test]
    fn removal_counts_every_call() {
        let f = faults("remove_after = 2");
        assert!(!f.on_call("C_GetInfo").0.removed);
        assert!(!f.on_call("C_GetInfo").0.removed);
        let v = f.on_call("C_GetInfo").0;
        assert!(v.removed && v.removed_now);
        let v = f.on_call("C_GetInfo").0;
        assert!(v.removed && !v.removed_now);
    }

    #[test]
    fn bad_rules_are_refused() {
        for text in [
            "fail = [{function=\"C_Sgn\", rv=5}]",
            "fail = [{function=\"C_Sign\", nth=0, rv=5}]",
            "fail = [{function=\"C_Sign\", rv=\"CKR_NOPE\"}]",
            "reset_file = \"x\"",
            "latency = 5",
        ] {
            assert!(FaultConfig::parse(text).and_then(|c| c.validate()).is_err(), "{text}");
        }
        let vendor = FaultConfig::parse("fail = [{function=\"CSSIM_BackupKey\", nth=1, rv=0x30}]").unwrap();
        assert_eq!(vendor.validate(), Ok(()));
    }
}
