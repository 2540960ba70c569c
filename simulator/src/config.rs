//! The configuration: the TOML file named by `CSSIM_CONFIG`, and the fault table from `CSSIM_FAULTS`.

use crate::faults::FaultConfig;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The environment variable that names the configuration file.
pub const CONFIG_ENV: &str = "CSSIM_CONFIG";
/// The environment variable that replaces the `[faults]` table of the configuration file.
pub const FAULTS_ENV: &str = "CSSIM_FAULTS";

/// Which firmware the simulated CryptoServer runs: it decides which key operations are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No refusals beyond PKCS#11's own rules.
    #[default]
    Standard,
    /// No clear-text import or export of secret and private keys.
    Fips,
    /// FIPS, and no overwriting of a key (same class, label and id) on a token.
    Cc,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Standard => "standard",
            Mode::Fips => "fips",
            Mode::Cc => "cc",
        }
    }

    /// FIPS rules apply (FIPS and CC firmware).
    pub fn fips(self) -> bool {
        self != Mode::Standard
    }
}

/// One `[[slot]]`: an optional pre-initialized token.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotConfig {
    /// Token label; with `so_pin`, the token is initialized at C_Initialize unless it already is.
    pub label: Option<String>,
    pub so_pin: Option<String>,
    /// The user PIN set when the token is pre-initialized.
    pub user_pin: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state: Option<PathBuf>,
    #[serde(default)]
    mode: Mode,
    log_file: Option<PathBuf>,
    device_mbk: Option<bool>,
    #[serde(default)]
    slot: Vec<SlotConfig>,
    #[serde(default)]
    faults: FaultConfig,
}

/// The whole configuration, paths resolved against the configuration file's directory.
#[derive(Debug, Clone)]
pub struct Config {
    pub state: PathBuf,
    pub mode: Mode,
    pub log_file: Option<PathBuf>,
    /// Whether the device has a master backup key facility (the vendor interface "CSSIM MBK" and the admin
    /// tool's `mbk` commands); default true.
    pub device_mbk: bool,
    pub slots: Vec<SlotConfig>,
    pub faults: FaultConfig,
}

impl Config {
    /// Reads `CSSIM_CONFIG` (required) and `CSSIM_FAULTS` (optional).
    pub fn from_env() -> std::result::Result<Config, String> {
        let path = std::env::var_os(CONFIG_ENV)
            .ok_or_else(|| format!("{CONFIG_ENV} is not set: it must name the simulator's TOML configuration"))?;
        let faults = std::env::var(FAULTS_ENV).ok();
        Config::load(Path::new(&path), faults.as_deref())
    }

    /// Reads the configuration file at `path`; `faults`, when given, replaces its `[faults]` table.
    pub fn load(path: &Path, faults: Option<&str>) -> std::result::Result<Config, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Config::parse(&text, &base, faults).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses a configuration whose relative paths are relative to `base`.
    pub fn parse(text: &str, base: &Path, faults: Option<&str>) -> std::result::Result<Config, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut fault_config = match faults {
            Some(inline) => FaultConfig::parse(inline).map_err(|e| format!("{FAULTS_ENV}: {e}"))?,
            None => raw.faults,
        };
        if let Some(reset) = fault_config.reset_file.take() {
            fault_config.reset_file = Some(base.join(reset));
        }
        fault_config.validate()?;
        let mut slots = raw.slot;
        if slots.is_empty() {
            slots.push(SlotConfig::default());
        }
        for (i, slot) in slots.iter().enumerate() {
            if slot.label.is_some() != slot.so_pin.is_some() {
                return Err(format!("slot {i}: a pre-initialized token needs both `label` and `so_pin`"));
            }
            if slot.user_pin.is_some() && slot.so_pin.is_none() {
                return Err(format!("slot {i}: `user_pin` needs `label` and `so_pin`"));
            }
            if slot.label.as_ref().is_some_and(|l| l.len() > 32) {
                return Err(format!("slot {i}: a token label has at most 32 bytes"));
            }
        }
        Ok(Config {
            state: base.join(raw.state.unwrap_or_else(|| PathBuf::from("cssim-state.json"))),
            mode: raw.mode,
            log_file: raw.log_file.map(|p| base.join(p)),
            device_mbk: raw.device_mbk.unwrap_or(true),
            slots,
            faults: fault_config,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_relative_to_the_config_file() {
        let c =
            Config::parse("state = \"s.json\"\nlog_file = \"l.log\"\nmode = \"cc\"\n", Path::new("/x"), None).unwrap();
        assert_eq!(c.state, Path::new("/x/s.json"));
        assert_eq!(c.log_file.as_deref(), Some(Path::new("/x/l.log")));
        assert_eq!(c.mode, Mode::Cc);
        assert_eq!(c.slots.len(), 1);
        assert!(c.device_mbk, "a device has an MBK facility unless the configuration says otherwise");
        let c = Config::parse("device_mbk = false\n", Path::new("/x"), None).unwrap();
        assert!(!c.device_mbk);
    }

    #[test]
    fn env_faults_replace_the_table() {
        let text = "[faults]\nlatency_us = 5\n";
        let c = Config::parse(text, Path::new("/x"), None).unwrap();
        assert_eq!(c.faults.latency_us, 5);
        let c = Config::parse(text, Path::new("/x"), Some("fail = [{function=\"C_Sign\", nth=3, rv=0x30}]")).unwrap();
        assert_eq!(c.faults.latency_us, 0);
        assert_eq!(c.faults.fail.len(), 1);
    }

    #[test]
    fn mistakes_are_reported() {
        assert!(Config::parse("mode = \"fast\"", Path::new("/"), None).is_err());
        assert!(Config::parse("stat = \"x\"", Path::new("/"), None).is_err());
        assert!(Config::parse("device_mbk = \"yes\"", Path::new("/"), None).is_err());
        assert!(Config::parse("device_mbks = true", Path::new("/"), None).is_err());
        assert!(Config::parse("[[slot]]\nlabel = \"a\"", Path::new("/"), None).is_err());
        assert!(Config::parse("", Path::new("/"), Some("fail = [{function=\"C_Nope\", rv=5}]")).is_err());
    }
}
