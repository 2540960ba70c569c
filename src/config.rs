//! p11shim.toml → [`Config`]. Env `P11SHIM_CONFIG` names the file (default `/etc/p11shim/p11shim.toml`);
//! env `P11SHIM_MODULE` names the backend module and overrides `module`, and is enough on its own.

use crate::error::{Error, Result};
use crate::log::Level;
use serde::Deserialize;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG: &str = "/etc/p11shim/p11shim.toml";
pub const ENV_CONFIG: &str = "P11SHIM_CONFIG";
pub const ENV_MODULE: &str = "P11SHIM_MODULE";

/// The settings as written in the file; every key is optional here and unknown keys are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    module: Option<PathBuf>,
    log_file: Option<PathBuf>,
    log_level: Option<Level>,
    store: Option<StoreFile>,
    #[serde(default)]
    slot: Vec<SlotFile>,
    #[serde(default)]
    mode: Mode,
    logon: Option<LogonFile>,
    audit: Option<AuditFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogonFile {
    lockout_after: Option<u32>,
    delay: Option<String>,
    delay_max: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditFile {
    head_file: Option<PathBuf>,
}

/// How failed logons of the permission model's users are throttled (`[logon]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogonPolicy {
    /// After this many failed logons in a row the user is locked until an administrator unlocks it (0: never).
    pub lockout_after: u32,
    /// After the n-th failed logon in a row, the user's next logon is refused for `delay × 2^(n-1)`, at most
    /// `delay_max` (zero: no delay).
    pub delay: std::time::Duration,
    pub delay_max: std::time::Duration,
}

impl Default for LogonPolicy {
    fn default() -> LogonPolicy {
        LogonPolicy {
            lockout_after: 0,
            delay: std::time::Duration::from_secs(1),
            delay_max: std::time::Duration::from_secs(300),
        }
    }
}

impl LogonPolicy {
    /// How long after the `failed`-th failure in a row the next logon must wait.
    pub fn wait_after(&self, failed: u32) -> std::time::Duration {
        if failed == 0 || self.delay.is_zero() {
            return std::time::Duration::ZERO;
        }
        let factor = 1u32 << failed.saturating_sub(1).min(20);
        self.delay.saturating_mul(factor).min(self.delay_max)
    }
}

/// The HSM's security mode, as the operator declares it: what whole-store operations and restores
/// may do.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Everything allowed, including whole-store backup and restore (`p11shim db backup/restore`).
    #[default]
    Standard,
    /// FIPS: whole-store backup and restore refused; keys are backed up per group under the MBK.
    Fips,
    /// Common Criteria: as FIPS, and restoring over an existing key (`--overwrite`) is refused too.
    Cc,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Standard => "standard",
            Mode::Fips => "fips",
            Mode::Cc => "cc",
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    url: Option<String>,
    hsm_cache: Option<usize>,
    max_connections: Option<usize>,
    outage_grace: Option<String>,
}

/// How many stored keys a process keeps loaded in the HSM when the config does not say (see README).
pub const DEFAULT_HSM_CACHE: usize = 32;
/// How many connections to a PostgreSQL store one process opens for statements when the config does not say
/// (its change listener has one more): enough for a few threads using keys at once, since a use of a key
/// whose row is held needs no round trip.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4;
/// How long a key confirmed current keeps working while the key store cannot be reached, when the config
/// does not say: a restart of PostgreSQL (seconds) or a failover to a standby (tens of seconds) passes
/// unnoticed by applications using keys they used within this time, and a key destroyed or changed elsewhere
/// meanwhile works here at most this long after this process last saw it current.
pub const DEFAULT_OUTAGE_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlotFile {
    token: String,
    #[serde(default)]
    storage: Storage,
    default_group: Option<String>,
}

/// Where a slot keeps the token objects the application creates.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// In the HSM, as the backend does (pass-through).
    #[default]
    Hsm,
    /// In the key store, wrapped under the MBK.
    Database,
}

/// A backend token the config says something about, named by its label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotConfig {
    pub token: String,
    pub storage: Storage,
    /// The group of keys created without CKA_P11SHIM_GROUP (default: the token label).
    pub default_group: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where the settings came from: the file, or the environment alone.
    pub source: PathBuf,
    /// The real PKCS#11 module.
    pub module: PathBuf,
    pub log_file: Option<PathBuf>,
    pub log_level: Level,
    /// The key store url: `sqlite:PATH` (absolute after resolution) or `postgres://…`.
    pub store_url: String,
    /// How many stored keys a process keeps loaded in the HSM at most (`[store] hsm_cache`).
    pub hsm_cache: usize,
    /// `[store] max_connections` and `outage_grace`.
    pub store: crate::store::StoreOptions,
    pub slots: Vec<SlotConfig>,
    pub mode: Mode,
    /// `[logon]`: throttling and lockout of failed logons.
    pub logon: LogonPolicy,
    /// `[audit] head_file`: where every process that appends to the audit log also appends the new head (seq
    /// and hash), out of the key store's reach (default: `audit.head` beside the config file; none for a
    /// configuration from the environment alone, which has no file to be beside).
    pub audit_head: Option<PathBuf>,
}

impl Config {
    /// Reads the configuration the environment points at; in a process that runs with AT_SECURE (see
    /// [`crate::secure`]) the environment is ignored and only [`DEFAULT_CONFIG`] is read.
    pub fn from_env() -> Result<Config> {
        Config::from_env_noting().map(|(config, _)| config)
    }

    /// As [`Config::from_env`], and which of the environment's overrides an AT_SECURE process ignored (for
    /// the log). A `log_file` where no log can be appended is an error here, in the module and the command.
    pub fn from_env_noting() -> Result<(Config, Ignored)> {
        let (config, ignored) =
            Config::read(crate::secure::is_secure(), &|name| std::env::var_os(name), Path::new(DEFAULT_CONFIG))?;
        if let Some(file) = &config.log_file {
            crate::log::check_file(file).map_err(|e| Error::Config {
                path: config.source.clone(),
                cause: format!("log_file {}: {e}", file.display()),
            })?;
        }
        Ok((config, ignored))
    }

    /// The configuration `env` points at, or in `secure` mode the file `default` alone, whose path must be
    /// root's alone (see [`crate::secure::open_trusted`]).
    fn read(secure: bool, env: &dyn Fn(&str) -> Option<OsString>, default: &Path) -> Result<(Config, Ignored)> {
        let named = env(ENV_CONFIG).filter(|v| !v.is_empty());
        let module = env(ENV_MODULE).filter(|v| !v.is_empty()).map(PathBuf::from);
        if secure {
            let ignored = Ignored(
                [(ENV_CONFIG, named.is_some()), (ENV_MODULE, module.is_some())]
                    .into_iter()
                    .filter_map(|(name, set)| set.then_some(name))
                    .collect(),
            );
            return Config::read_trusted(default, &ignored).map(|config| (config, ignored));
        }
        let path = named.clone().map(PathBuf::from).unwrap_or_else(|| default.to_path_buf());
        // Without P11SHIM_CONFIG, P11SHIM_MODULE alone is enough: the default file is optional then.
        if named.is_none() && module.is_some() && !path.exists() {
            let config = Config::resolve(ConfigFile::default(), module, PathBuf::from(format!("${ENV_MODULE}")))?;
            return Ok((config, Ignored::default()));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Config {
            path: path.clone(),
            cause: if e.kind() == std::io::ErrorKind::NotFound {
                format!("cannot read it: {e} (set {ENV_CONFIG} to a config file, or {ENV_MODULE} to the PKCS#11 module to load)")
            } else {
                format!("cannot read it: {e}")
            },
        })?;
        Ok((Config::parse(&text, &path, module)?, Ignored::default()))
    }

    /// `path` read through [`crate::secure::open_trusted`], with no override; a failure also says what the
    /// environment asked for in vain.
    fn read_trusted(path: &Path, ignored: &Ignored) -> Result<Config> {
        let fail = |cause: String, why_said: bool| {
            let cause = match (ignored.is_empty(), why_said) {
                (true, _) => cause,
                (false, true) => format!("{cause}; {} ignored as well", ignored.subject()),
                (false, false) => format!("{cause}; {ignored}"),
            };
            Error::Config { path: path.to_path_buf(), cause }
        };
        let mut file = crate::secure::open_trusted(path).map_err(|refusal| {
            let why_said = matches!(refusal, crate::secure::Refusal::Untrusted { .. });
            fail(refusal.to_string(), why_said)
        })?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text).map_err(|e| fail(format!("cannot read it: {e}"), false))?;
        Config::parse(&text, path, None).map_err(|e| match e {
            Error::Config { cause, .. } => fail(cause, false),
            e => e,
        })
    }

    /// Parses `text` read from `path`; `module_override` is `P11SHIM_MODULE`.
    pub fn parse(text: &str, path: &Path, module_override: Option<PathBuf>) -> Result<Config> {
        let file: ConfigFile = toml::from_str(text)
            .map_err(|e| Error::Config { path: path.to_path_buf(), cause: one_line(&e.to_string()) })?;
        Config::resolve(file, module_override, path.to_path_buf())
    }

    fn resolve(file: ConfigFile, module_override: Option<PathBuf>, source: PathBuf) -> Result<Config> {
        let base = source.parent().map(Path::to_path_buf).unwrap_or_default();
        let relative_to_file =
            |p: PathBuf| if p.is_relative() && !base.as_os_str().is_empty() { base.join(p) } else { p };
        let module = match module_override {
            Some(m) => m,
            None => relative_to_file(file.module.ok_or_else(|| Error::Config {
                path: source.clone(),
                cause: format!("no `module` set: name the real PKCS#11 module, e.g. module = \"/usr/lib/softhsm/libsofthsm2.so\" (or set {ENV_MODULE})"),
            })?),
        };
        let log_file = file.log_file.map(relative_to_file);
        let log_level = match (&log_file, file.log_level) {
            (Some(_), Some(level)) => level,
            (Some(_), None) => Level::Info,
            (None, _) => Level::Off,
        };
        let store_file = file.store.unwrap_or_default();
        let store = store_options(&store_file, &source)?;
        let (store_url, hsm_cache) = (store_file.url, store_file.hsm_cache);
        let hsm_cache = match hsm_cache {
            None => DEFAULT_HSM_CACHE,
            Some(n) if (1..=1_000_000).contains(&n) => n,
            Some(n) => {
                return Err(Error::Config {
                    path: source,
                    cause: format!(
                        "[store] hsm_cache = {n}: the number of stored keys kept loaded in the HSM is 1 to 1000000"
                    ),
                })
            }
        };
        let store_url = match store_url {
            Some(url) => match url.strip_prefix("sqlite:") {
                Some(path) => format!("sqlite:{}", relative_to_file(PathBuf::from(path)).display()),
                None if url.starts_with("postgres://") || url.starts_with("postgresql://") => url,
                None => {
                    return Err(Error::Config {
                        path: source,
                        cause: format!(
                            "[store] url {:?}: use \"sqlite:PATH\" or \"postgres://USER@HOST:PORT/DB\"",
                            crate::store::redact(&url)
                        ),
                    })
                }
            },
            None => format!("sqlite:{}", relative_to_file(PathBuf::from("keys.db")).display()),
        };
        let mut slots: Vec<SlotConfig> = Vec::new();
        for s in file.slot {
            if s.token.is_empty() || slots.iter().any(|o| o.token == s.token) {
                return Err(Error::Config {
                    path: source,
                    cause: format!(
                        "[[slot]] token {:?}: each [[slot]] names a different, non-empty token label",
                        s.token
                    ),
                });
            }
            if let Err(why) = check_label(&s.token) {
                return Err(Error::Config { path: source, cause: format!("[[slot]] token {:?}: {why}", s.token) });
            }
            let default_group = s.default_group.unwrap_or_else(|| s.token.clone());
            if let Err(why) = crate::attrs::check_group(&default_group) {
                return Err(Error::Config {
                    path: source,
                    cause: format!("[[slot]] token {:?}: default_group: {why}", s.token),
                });
            }
            slots.push(SlotConfig { token: s.token, storage: s.storage, default_group });
        }
        let logon = logon_policy(file.logon.unwrap_or_default(), &source)?;
        let audit_head = match file.audit.and_then(|a| a.head_file) {
            Some(path) => Some(relative_to_file(path)),
            None if base.as_os_str().is_empty() => None,
            None => Some(base.join(DEFAULT_AUDIT_HEAD)),
        };
        Ok(Config {
            source,
            module,
            log_file,
            log_level,
            store_url,
            hsm_cache,
            store,
            slots,
            mode: file.mode,
            logon,
            audit_head,
        })
    }
}

/// The environment variables that would have chosen the configuration or the module, set but ignored because
/// the process runs with AT_SECURE.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ignored(pub Vec<&'static str>);

impl Ignored {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// "P11SHIM_CONFIG and P11SHIM_MODULE are", "P11SHIM_MODULE is".
    fn subject(&self) -> String {
        format!("{} {}", self.0.join(" and "), if self.0.len() == 1 { "is" } else { "are" })
    }
}

impl std::fmt::Display for Ignored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ignored because {}; only {DEFAULT_CONFIG} is read", self.subject(), crate::secure::WHY)
    }
}

/// The audit head file's name beside the config file when `[audit] head_file` is not set.
pub const DEFAULT_AUDIT_HEAD: &str = "audit.head";

/// A duration setting `[section] key` from its text, or `default` when it is not set.
fn duration(source: &Path, key: &str, text: Option<&str>, default: std::time::Duration) -> Result<std::time::Duration> {
    match text {
        None => Ok(default),
        Some(text) => humantime::parse_duration(text.trim()).map_err(|e| Error::Config {
            path: source.to_path_buf(),
            cause: format!("{key} = {text:?}: not a duration ({e}); write e.g. \"1s\", \"250ms\", \"5m\" or \"0s\""),
        }),
    }
}

fn store_options(file: &StoreFile, source: &Path) -> Result<crate::store::StoreOptions> {
    let max_connections = match file.max_connections {
        None => DEFAULT_MAX_CONNECTIONS,
        Some(n) if (1..=64).contains(&n) => n,
        Some(n) => {
            return Err(Error::Config {
                path: source.to_path_buf(),
                cause: format!(
                    "[store] max_connections = {n}: the connections a process opens to the key store are 1 to 64"
                ),
            })
        }
    };
    let outage_grace = duration(source, "[store] outage_grace", file.outage_grace.as_deref(), DEFAULT_OUTAGE_GRACE)?;
    if outage_grace > std::time::Duration::from_secs(3600) {
        return Err(Error::Config {
            path: source.to_path_buf(),
            cause: format!(
                "[store] outage_grace = {:?}: at most 1h (a key destroyed elsewhere keeps working here that long)",
                humantime::format_duration(outage_grace).to_string()
            ),
        });
    }
    Ok(crate::store::StoreOptions { max_connections, outage_grace })
}

fn logon_policy(file: LogonFile, source: &Path) -> Result<LogonPolicy> {
    let default = LogonPolicy::default();
    let duration = |key: &str, text: Option<String>, default: std::time::Duration| {
        duration(source, &format!("[logon] {key}"), text.as_deref(), default)
    };
    let delay = duration("delay", file.delay, default.delay)?;
    let delay_max = duration("delay_max", file.delay_max, default.delay_max)?;
    if delay > delay_max || delay_max > std::time::Duration::from_secs(24 * 3600) {
        return Err(Error::Config {
            path: source.to_path_buf(),
            cause: format!(
                "[logon] delay ({}) must not exceed delay_max ({}), which is at most 24h",
                humantime::format_duration(delay),
                humantime::format_duration(delay_max)
            ),
        });
    }
    Ok(LogonPolicy { lockout_after: file.lockout_after.unwrap_or(default.lockout_after), delay, delay_max })
}

/// toml's messages span several lines (a snippet of the file); the log wants one.
fn one_line(message: &str) -> String {
    message
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !is_snippet(l) && !l.chars().all(|c| c == '^' || c == ' '))
        .collect::<Vec<_>>()
        .join(": ")
}

/// A quoted line of the file in toml's message: "12 | text".
fn is_snippet(line: &str) -> bool {
    line.split_once(" |").is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// A token label as PKCS#11 has it: at most 32 bytes of UTF-8 (CK_TOKEN_INFO pads it with spaces, so one at
/// the end could never match), printable.
fn check_label(label: &str) -> std::result::Result<(), String> {
    if label.len() > 32 {
        return Err(format!(
            "a token label has at most 32 bytes (this one has {}), so no token can have it",
            label.len()
        ));
    }
    if label.ends_with(' ') {
        return Err(
            "a token label cannot end with a space (PKCS#11 pads labels with spaces), so no token can have it".into()
        );
    }
    if label.chars().any(char::is_control) {
        return Err("a token label has no control characters".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("/etc/p11shim/p11shim.toml"), None)
    }

    #[test]
    fn slot_labels_and_group_names_that_cannot_work_are_refused() {
        let slot = |token: &str, group: &str| {
            parse(&format!(
                "module = \"/m.so\"\n[[slot]]\ntoken = {token:?}\nstorage = \"database\"\ndefault_group = {group:?}"
            ))
        };
        let e = slot(&"t".repeat(33), "G").unwrap_err().to_string();
        assert!(e.contains("/etc/p11shim/p11shim.toml") && e.contains("at most 32 bytes"), "{e}");
        let e = slot("pay ", "G").unwrap_err().to_string();
        assert!(e.contains("end with a space"), "{e}");
        let e = slot("pay", "a\nb").unwrap_err().to_string();
        assert!(e.contains("default_group") && e.contains("U+000A"), "{e}");
        let e = slot("pay", "").unwrap_err().to_string();
        assert!(e.contains("default_group") && e.contains("1 to 64"), "{e}");
        assert!(slot(&"t".repeat(32), "Payments").is_ok());
    }

    #[test]
    fn minimal_file_names_the_module() {
        let c = parse("module = \"/usr/lib/softhsm/libsofthsm2.so\"").unwrap();
        assert_eq!(c.module, PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"));
        assert_eq!(c.log_level, Level::Off);
        assert_eq!(c.log_file, None);
    }

    #[test]
    fn unknown_key_is_refused_and_named() {
        let e = parse("module = \"/x.so\"\nmodul = 3").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("/etc/p11shim/p11shim.toml"), "{text}");
        assert!(text.contains("modul"), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
    }

    #[test]
    fn invalid_toml_is_refused() {
        let e = parse("module = ").unwrap_err();
        assert!(e.to_string().contains("p11shim.toml"));
        assert_eq!(e.rv(), cryptoki_sys::CKR_GENERAL_ERROR);
    }

    #[test]
    fn missing_module_says_how_to_fix() {
        let e = parse("log_level = \"debug\"").unwrap_err();
        assert!(e.to_string().contains("no `module` set"), "{e}");
    }

    #[test]
    fn env_module_overrides_file() {
        let c = Config::parse("module = \"/a.so\"", Path::new("/c.toml"), Some("/b.so".into())).unwrap();
        assert_eq!(c.module, PathBuf::from("/b.so"));
    }

    #[test]
    fn relative_paths_are_relative_to_the_file() {
        let c = Config::parse(
            "module = \"lib/m.so\"\nlog_file = \"shim.log\"\nlog_level = \"debug\"",
            Path::new("/srv/p/p11shim.toml"),
            None,
        )
        .unwrap();
        assert_eq!(c.module, PathBuf::from("/srv/p/lib/m.so"));
        assert_eq!(c.log_file, Some(PathBuf::from("/srv/p/shim.log")));
        assert_eq!(c.log_level, Level::Debug);
    }

    #[test]
    fn store_and_slots() {
        let c = Config::parse(
            "module = \"/m.so\"\n[store]\nurl = \"sqlite:db/keys.db\"\n[[slot]]\ntoken = \"t1\"\nstorage = \"database\"\ndefault_group = \"Prod\"\n[[slot]]\ntoken = \"t2\"",
            Path::new("/srv/p/p11shim.toml"),
            None,
        )
        .unwrap();
        assert_eq!(c.store_url, "sqlite:/srv/p/db/keys.db");
        assert_eq!(
            c.slots[0],
            SlotConfig { token: "t1".into(), storage: Storage::Database, default_group: "Prod".into() }
        );
        assert_eq!(c.slots[1], SlotConfig { token: "t2".into(), storage: Storage::Hsm, default_group: "t2".into() });
    }

    #[test]
    fn store_connections_and_outage_grace_have_defaults_and_bounds() {
        let c = Config::parse("module = \"/m.so\"", Path::new("/c.toml"), None).unwrap();
        assert_eq!(c.store.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(c.store.outage_grace, DEFAULT_OUTAGE_GRACE);
        let text = "module = \"/m.so\"\n[store]\nmax_connections = 9\noutage_grace = \"0s\"";
        let c = Config::parse(text, Path::new("/c.toml"), None).unwrap();
        assert_eq!((c.store.max_connections, c.store.outage_grace), (9, std::time::Duration::ZERO));
        for (bad, says) in [
            ("max_connections = 0", "max_connections = 0"),
            ("max_connections = 65", "max_connections = 65"),
            ("outage_grace = \"soon\"", "outage_grace = \"soon\": not a duration"),
            ("outage_grace = \"2h\"", "at most 1h"),
        ] {
            let text = format!("module = \"/m.so\"\n[store]\n{bad}");
            let e = Config::parse(&text, Path::new("/c.toml"), None).unwrap_err().to_string();
            assert!(e.contains("/c.toml") && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn hsm_cache_has_a_default_and_a_range() {
        let c = Config::parse("module = \"/m.so\"", Path::new("/c.toml"), None).unwrap();
        assert_eq!(c.hsm_cache, DEFAULT_HSM_CACHE);
        let c = Config::parse("module = \"/m.so\"\n[store]\nhsm_cache = 3", Path::new("/c.toml"), None).unwrap();
        assert_eq!(c.hsm_cache, 3);
        for bad in ["0", "1000001"] {
            let text = format!("module = \"/m.so\"\n[store]\nhsm_cache = {bad}");
            let e = Config::parse(&text, Path::new("/c.toml"), None).unwrap_err().to_string();
            assert!(e.contains("/c.toml") && e.contains(&format!("hsm_cache = {bad}")), "{e}");
        }
        let e = Config::parse("module = \"/m.so\"\n[store]\nhsm_cache = -1", Path::new("/c.toml"), None);
        let e = e.unwrap_err().to_string();
        assert!(e.contains("/c.toml") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn default_store_is_beside_the_file_and_bad_urls_are_refused() {
        let c = Config::parse("module = \"/m.so\"", Path::new("/srv/p/p11shim.toml"), None).unwrap();
        assert_eq!(c.store_url, "sqlite:/srv/p/keys.db");
        let e = parse("module = \"/m.so\"\n[store]\nurl = \"mysql://u:secret@h/db\"").unwrap_err().to_string();
        assert!(e.contains("mysql://u:***@h/db") && !e.contains("secret"), "{e}");
        let e = parse("module = \"/m.so\"\n[[slot]]\ntoken = \"a\"\n[[slot]]\ntoken = \"a\"").unwrap_err().to_string();
        assert!(e.contains("\"a\""), "{e}");
        assert!(parse("module = \"/m.so\"\n[[slot]]\ntoken = \"a\"\nstorage = \"cloud\"").is_err());
    }

    #[test]
    fn mode_defaults_to_standard_and_is_checked() {
        assert_eq!(parse("module = \"/m.so\"").unwrap().mode, Mode::Standard);
        assert_eq!(parse("module = \"/m.so\"\nmode = \"cc\"").unwrap().mode, Mode::Cc);
        assert!(parse("module = \"/m.so\"\nmode = \"paranoid\"").unwrap_err().to_string().contains("paranoid"));
    }

    #[test]
    fn logon_policy_and_audit_head() {
        let c = parse("module = \"/m.so\"").unwrap();
        assert_eq!(c.logon, LogonPolicy::default());
        assert_eq!(c.audit_head, Some(PathBuf::from("/etc/p11shim/audit.head")));
        let env_only = Config::parse("module = \"/m.so\"", Path::new("$P11SHIM_MODULE"), None).unwrap();
        assert_eq!(env_only.audit_head, None, "no file to be beside: not the current directory");
        let c = parse("module = \"/m.so\"\n[logon]\nlockout_after = 5\ndelay = \"100ms\"\ndelay_max = \"2s\"\n[audit]\nhead_file = \"/var/lib/p11shim/head\"")
            .unwrap();
        assert_eq!(c.logon.lockout_after, 5);
        assert_eq!(c.logon.wait_after(0), std::time::Duration::ZERO);
        assert_eq!(c.logon.wait_after(1), std::time::Duration::from_millis(100));
        assert_eq!(c.logon.wait_after(3), std::time::Duration::from_millis(400));
        assert_eq!(c.logon.wait_after(30), std::time::Duration::from_secs(2));
        assert_eq!(c.audit_head, Some(PathBuf::from("/var/lib/p11shim/head")));
        let e = parse("module = \"/m.so\"\n[logon]\ndelay = \"soon\"").unwrap_err().to_string();
        assert!(e.contains("[logon] delay") && e.contains("soon"), "{e}");
        let e = parse("module = \"/m.so\"\n[logon]\ndelay = \"10s\"\ndelay_max = \"1s\"").unwrap_err().to_string();
        assert!(e.contains("delay_max"), "{e}");
    }

    /// The environment of an attacker who points both variables at files of their own.
    fn attacker_env(name: &str) -> Option<OsString> {
        match name {
            ENV_CONFIG => Some("/tmp/attacker/p11shim.toml".into()),
            ENV_MODULE => Some("/tmp/attacker/evil.so".into()),
            _ => None,
        }
    }

    /// A default config of root's, root's alone, naming `module`.
    fn default_config() -> (tempfile::TempDir, PathBuf) {
        let (dir, file) = crate::secure::tests::tree();
        std::fs::write(&file, "module = \"/usr/lib/softhsm/libsofthsm2.so\"\nlog_level = \"debug\"").unwrap();
        (dir, file)
    }

    #[test]
    fn secure_mode_ignores_the_environment_and_reads_the_default_file() {
        if !crate::secure::tests::root("secure_mode_ignores_the_environment_and_reads_the_default_file") {
            return;
        }
        let (_dir, default) = default_config();
        let (c, ignored) = Config::read(true, &attacker_env, &default).unwrap();
        assert_eq!(c.source, default);
        assert_eq!(c.module, PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"), "not P11SHIM_MODULE");
        assert_eq!(ignored.0, [ENV_CONFIG, ENV_MODULE]);
        let said = ignored.to_string();
        assert!(
            said.starts_with("P11SHIM_CONFIG and P11SHIM_MODULE are ignored because") && said.contains("AT_SECURE")
        );
        let (_, ignored) = Config::read(true, &|_| None, &default).unwrap();
        assert!(ignored.is_empty(), "nothing set, nothing ignored");
        let only_module = |n: &str| (n == ENV_MODULE).then(|| OsString::from("/x.so"));
        let (_, ignored) = Config::read(true, &only_module, &default).unwrap();
        assert_eq!(ignored.to_string().split(" is ignored").next(), Some("P11SHIM_MODULE"));

        // Outside secure mode, the environment chooses, as it always did.
        let env = |n: &str| match n {
            ENV_CONFIG => Some(default.clone().into_os_string()),
            ENV_MODULE => Some("/b.so".into()),
            _ => None,
        };
        let (c, ignored) = Config::read(false, &env, Path::new("/nonexistent/p11shim.toml")).unwrap();
        assert_eq!((c.source, c.module, ignored.is_empty()), (default.clone(), PathBuf::from("/b.so"), true));
    }

    #[test]
    fn secure_mode_refuses_a_default_file_others_could_change() {
        if !crate::secure::tests::root("secure_mode_refuses_a_default_file_others_could_change") {
            return;
        }
        use crate::secure::tests::{chmod, chown};
        let (dir, default) = default_config();
        let refused = |what: &str| {
            let e = Config::read(true, &attacker_env, &default).unwrap_err();
            assert_eq!(e.rv(), cryptoki_sys::CKR_GENERAL_ERROR);
            let e = e.to_string();
            assert!(e.starts_with(&format!("configuration file {}: refused because", default.display())), "{e}");
            assert!(e.contains(what), "{what}: {e}");
            assert!(e.contains("; P11SHIM_CONFIG and P11SHIM_MODULE are ignored as well"), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        };
        chmod(&default, 0o666);
        refused("(file) is writable by group and others (mode 0666)");
        chmod(&default, 0o644);
        chown(&default, 65534);
        refused("(file) is owned by uid 65534, not root");
        chown(&default, 0);
        chmod(&dir.path().join("sub"), 0o777);
        refused(&format!("{} (directory) is writable by group and others", dir.path().join("sub").display()));
        chmod(&dir.path().join("sub"), 0o755);
        assert!(Config::read(true, &attacker_env, &default).is_ok());

        // A missing default file is an error, never a reason to fall back on the environment.
        let missing = dir.path().join("sub/none.toml");
        let e = Config::read(true, &attacker_env, &missing).unwrap_err().to_string();
        assert!(e.contains("No such file") && e.contains("P11SHIM_MODULE are ignored because this process"), "{e}");
        // Nor is a default file that is no valid configuration.
        std::fs::write(&default, "module = ").unwrap();
        let e = Config::read(true, &attacker_env, &default).unwrap_err().to_string();
        assert!(e.contains("TOML parse error") && e.contains("P11SHIM_MODULE are ignored because"), "{e}");
    }

    #[test]
    fn bad_log_level_is_refused() {
        assert!(parse("module = \"/a.so\"\nlog_level = \"loud\"").is_err());
    }
}
