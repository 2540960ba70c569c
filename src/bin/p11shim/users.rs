//! `p11shim user …`: the users of the permission model, and `--logon`, the logon stack every command that
//! needs permissions shares ([`LogonArgs`], [`logons`]).

use super::backup::TokenArg;
use super::exit::{CliResult, Failure, Outcome};
use clap::Subcommand;
use p11shim::admin::Pin;
use p11shim::audit::Trail;
use p11shim::auth::{self, Credential, Logons, NewUser};
use p11shim::backup::format::Sealer;
use p11shim::backup::work::{HsmSealer, Work};
use p11shim::config::Config;
use p11shim::store::{self, KeyStore};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The permission model, for the help texts.
const MODEL: &str = "\
Permission model (as a Utimaco CryptoServer): a user has a permission mask of 8 hex digits, one level per \
user-group slot, slot 0 being the rightmost digit, and a group regex naming the key groups the user works on \
(it must match the whole group name). Several users can log on for one command (--logon, repeated); their \
levels add up per slot. Backing up or restoring the keys of group G needs 00000002 from users whose group regex \
matches G; the whole key store needs 02000000; the users table 12000000 (e.g. two administrators, 10000000 + \
02000000); user administration 10000000. The first user can only be created with the token's SO PIN and must \
be a user administrator.

Logon: --logon NAME logs on with a password, read from $P11SHIM_PASSWORD_<NAME> (upper case, other characters \
than letters and digits as _) or prompted on the terminal; --logon NAME,KEYFILE logs on by signature \
(LogonSign) with the Ed25519 private key in KEYFILE (PEM PKCS#8, 32 raw bytes or 64 hex digits). If one logon \
fails, the command stops.

Every user's row is sealed by the HSM (an HMAC made with the MAC key of the token's MBK set), so the commands that log users on or change them open the token (--token, default the config's first database slot; no PIN needed). Failed logons are counted in the row: after each one the user waits longer before the next attempt ([logon] delay, doubling up to delay_max), and with [logon] lockout_after = N the user is locked after N failures in a row until a user administrator runs `p11shim user unlock NAME`.";

/// `--logon NAME[,KEYFILE]`, repeatable: the users to log on for this command, in order.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct LogonArgs {
    /// Log a user on for this command: NAME (password from $P11SHIM_PASSWORD_<NAME> or a prompt) or
    /// NAME,KEYFILE (signature logon with an Ed25519 private key). Repeat to stack logons; their permission
    /// levels add up.
    #[arg(long = "logon", value_name = "NAME[,KEYFILE]")]
    pub logon: Vec<String>,
}

/// Logs on every `--logon` in order; the first failure stops (and nothing after it runs).
pub fn logons(trail: &Trail, config: &Config, specs: &[String]) -> Result<Logons, Failure> {
    logons_into(Logons::new(), trail, config, specs)
}

fn logons_into(mut logons: Logons, trail: &Trail, config: &Config, specs: &[String]) -> Result<Logons, Failure> {
    for spec in specs {
        match spec.split_once(',') {
            Some((name, key_file)) => {
                if key_file.is_empty() {
                    return Err(Failure::usage(format!("--logon {spec}: no key file after the comma")));
                }
                logons.logon_sign(trail, &config.logon, name, Path::new(key_file))?;
            }
            None => {
                let password = logon_password(spec).map_err(Failure::usage)?;
                logons.logon_password(trail, &config.logon, spec, &password)?;
            }
        }
    }
    Ok(logons)
}

/// The token whose MBK set's MAC key seals the users and the audit log, opened without a PIN: `--token`, else
/// the config's first database slot, else its first [[slot]] whose token has an MBK set.
pub fn sealing_token(config: &Config, token: &TokenArg) -> Result<Work, Failure> {
    if token.token.is_some() || config.slots.iter().any(|s| s.storage == p11shim::config::Storage::Database) {
        return Ok(Work::open_public(config, &token.label(config)?)?);
    }
    config.slots.iter().find_map(|s| Work::open_public(config, &s.token).ok()).ok_or_else(|| {
        Failure::new(
            super::exit::Exit::NothingMatched,
            format!(
                "no token of {} has a master backup key set, whose MAC key seals users and the audit log: create \
                 one (`p11shim mbk create --token LABEL`) or name the token with --token",
                config.source.display()
            ),
        )
    })
}

/// The config's other tokens that have an MBK set, opened without a PIN: their MAC keys check users rows and
/// audit entries sealed through them (a store may serve tokens of several MBK sets).
pub fn other_tokens(config: &Config, work: &Work) -> Vec<Work> {
    let mine = &work.token.label;
    config.slots.iter().filter(|s| s.token != *mine).filter_map(|s| Work::open_public(config, &s.token).ok()).collect()
}

/// The MAC keys of a command: its token's, which seals, and the others', which check.
pub struct Seals<'w> {
    main: HsmSealer<'w>,
    others: Vec<HsmSealer<'w>>,
}

impl<'w> Seals<'w> {
    pub fn new(main: &'w Work, others: &'w [Work]) -> Seals<'w> {
        Seals { main: main.sealer(), others: others.iter().map(Work::sealer).collect() }
    }

    /// The audit trail of `store`, sealed by the command's token.
    pub fn trail<'a>(&'a self, store: &'a dyn KeyStore, config: &Config) -> Trail<'a> {
        let mut trail = Trail::new(store, Some(&self.main), config);
        trail.also = self.others.iter().map(|s| s as &dyn Sealer).collect();
        trail
    }
}

/// `P11SHIM_PASSWORD_<NAME>`: the name in upper case, every character but letters and digits as `_`.
pub fn password_env(name: &str) -> String {
    let upper: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("P11SHIM_PASSWORD_{upper}")
}

fn logon_password(name: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    let env = password_env(name);
    if let Some(value) = std::env::var_os(&env).filter(|v| !v.is_empty()) {
        return Ok(Zeroizing::new(value.into_encoded_bytes()));
    }
    if !std::io::stdin().is_terminal() {
        return Err(format!("no password for --logon {name}: set {env} or run on a terminal"));
    }
    prompt(&format!("password of user {name}: "))
}

fn prompt(text: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    let typed = Zeroizing::new(rpassword::prompt_password(text).map_err(|e| format!("cannot read the password: {e}"))?);
    Ok(Zeroizing::new(typed.as_bytes().to_vec()))
}

/// The password of a new user or a password change: $P11SHIM_NEW_PASSWORD, or typed twice.
fn new_password(name: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    if let Some(value) = std::env::var_os("P11SHIM_NEW_PASSWORD").filter(|v| !v.is_empty()) {
        return Ok(Zeroizing::new(value.into_encoded_bytes()));
    }
    if !std::io::stdin().is_terminal() {
        return Err(format!("no new password for user {name}: set P11SHIM_NEW_PASSWORD or run on a terminal"));
    }
    let first = prompt(&format!("new password of user {name}: "))?;
    let again = prompt(&format!("new password of user {name} (again): "))?;
    if first != again {
        return Err("the two passwords differ; nothing changed".into());
    }
    Ok(first)
}

/// `--password | --sign-key PUBFILE`: how the user will log on.
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
pub struct CredentialArgs {
    /// Log on with a password: read from $P11SHIM_NEW_PASSWORD, or typed twice on the terminal. Stored as
    /// an argon2id hash, never in clear.
    #[arg(long)]
    password: bool,
    /// Log on by signature (LogonSign) with the Ed25519 key pair whose public key is in PUBFILE (PEM
    /// "PUBLIC KEY", 32 raw bytes or 64 hex digits).
    #[arg(long, value_name = "PUBFILE")]
    sign_key: Option<PathBuf>,
}

impl CredentialArgs {
    fn read(&self, name: &str) -> Result<Credential, Failure> {
        match &self.sign_key {
            Some(path) => Ok(Credential::SignKey(auth::read_public_key(path)?)),
            None => Ok(Credential::Password(new_password(name)?)),
        }
    }
}

#[derive(Subcommand)]
#[command(after_long_help = MODEL)]
pub enum UserCommand {
    /// Create a user. The first user needs the token's SO PIN (--so-pin-file or $P11SHIM_SO_PIN, checked by
    /// an SO login on --token or the config's first database slot) and must be a user administrator; after
    /// that, logged-on users with 10000000 (--logon). No user PIN.
    #[command(after_long_help = MODEL)]
    Add {
        /// 1 to 32 characters from A-Z a-z 0-9 _ . -
        name: String,
        /// Permission mask: 8 hex digits, slot 0 rightmost (00000002 key user, 02000000 key store admin,
        /// 10000000 user admin).
        #[arg(long, value_name = "MASK")]
        perm: String,
        /// The key groups the user works on, as a regular expression matching whole group names ('Prod.*').
        #[arg(long, value_name = "REGEX")]
        group_regex: String,
        #[command(flatten)]
        credential: CredentialArgs,
        #[command(flatten)]
        logon: LogonArgs,
        /// The SO PIN, for the first user only: read from this file (first line); else $P11SHIM_SO_PIN; else
        /// prompted.
        #[arg(long, value_name = "FILE")]
        so_pin_file: Option<PathBuf>,
        #[command(flatten)]
        token: TokenArg,
    },
    /// List the users: name, mask, group regex, how they log on, failed logons in a row (and whether locked),
    /// and whether the row's seal verifies in the HSM. Needs no logon and no PIN.
    List {
        #[command(flatten)]
        token: TokenArg,
    },
    /// Delete a user (needs 10000000 from the logged-on users; the last user administrator cannot go). No PIN.
    #[command(after_long_help = MODEL)]
    Delete {
        /// The user's name.
        name: String,
        #[command(flatten)]
        logon: LogonArgs,
        #[command(flatten)]
        token: TokenArg,
    },
    /// Change a user's password or key: by a user administrator (10000000), or by the user logged on. No PIN.
    #[command(after_long_help = MODEL)]
    Passwd {
        /// The user's name.
        name: String,
        #[command(flatten)]
        credential: CredentialArgs,
        #[command(flatten)]
        logon: LogonArgs,
        #[command(flatten)]
        token: TokenArg,
    },
    /// Clear a user's failed-logon count, which lifts a lockout ([logon] lockout_after) and the wait after
    /// failures. Needs 10000000 from the logged-on users. No PIN.
    #[command(after_long_help = MODEL)]
    Unlock {
        /// The user's name.
        name: String,
        #[command(flatten)]
        logon: LogonArgs,
        #[command(flatten)]
        token: TokenArg,
    },
    /// Seal the users of a key store made by an earlier version (before users were sealed by the HSM), once:
    /// user administrators (10000000) log on (their rows are accepted unsealed for this command only) and
    /// every row is sealed with the token's MAC key. Refused once any row is sealed. Check the list it prints:
    /// a row someone inserted before is sealed too. No PIN.
    #[command(after_long_help = MODEL)]
    Reseal {
        #[command(flatten)]
        logon: LogonArgs,
        #[command(flatten)]
        token: TokenArg,
    },
}

/// Prints what a command did: `value` with --json, else `text`.
pub fn done(json: bool, value: serde_json::Value, text: String) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

/// The key store the config names.
pub fn open_store(config: &Config) -> Result<Box<dyn KeyStore>, Failure> {
    Ok(store::open_with(&config.store_url, &config.store)?)
}

pub fn run(config: &Config, command: UserCommand, json: bool) -> CliResult {
    let store = open_store(config)?;
    let token = match &command {
        UserCommand::Add { token, .. }
        | UserCommand::List { token, .. }
        | UserCommand::Delete { token, .. }
        | UserCommand::Passwd { token, .. }
        | UserCommand::Unlock { token, .. }
        | UserCommand::Reseal { token, .. } => token,
    };
    let work = sealing_token(config, token)?;
    let others = other_tokens(config, &work);
    let seals = Seals::new(&work, &others);
    let trail = seals.trail(store.as_ref(), config);
    let store = &*store;
    match command {
        UserCommand::Add { name, perm, group_regex, credential, logon, so_pin_file, token } => {
            let so_pin_given =
                so_pin_file.is_some() || std::env::var_os("P11SHIM_SO_PIN").is_some_and(|v| !v.is_empty());
            // Checked before anything is asked for, so that a typo costs no PIN or password prompt.
            auth::check_name(&name).map_err(|e| Failure::usage(e.to_string()))?;
            auth::Perm::parse(&perm).map_err(Failure::usage)?;
            auth::group_regex(&group_regex).map_err(|e| Failure::usage(e.to_string()))?;
            let first = store.user_list()?.is_empty();
            let so = if first {
                let pin: Pin = super::pins::secret("SO PIN", so_pin_file, "P11SHIM_SO_PIN", "--so-pin-file")?;
                Some(auth::so_logon(&trail, config, token.token.as_deref(), &pin)?)
            } else {
                None
            };
            let logons = logons(&trail, config, &logon.logon)?;
            let credential = credential.read(&name)?;
            let user = NewUser { name, perm, group_regex, credential };
            let info = auth::add_user(&trail, &logons, so.as_ref(), user).map_err(|e| match e {
                auth::AuthError::Refused(message) if !first && so_pin_given => Failure::denied(format!(
                    "{message} (the SO PIN creates only the first user; log on as a user administrator)"
                )),
                e => e.into(),
            })?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"added": info.name, "perm": info.perm, "group_regex": info.group_regex,
                                       "auth": info.auth})
                );
            } else {
                println!("Added user {} ({} {}, logs on with {}).", info.name, info.perm, info.group_regex, info.auth);
            }
        }
        UserCommand::List { .. } => {
            let users = auth::list_users(&trail, &config.logon)?;
            if json {
                let list: Vec<_> = users
                    .iter()
                    .map(|u| {
                        serde_json::json!({"name": u.name, "perm": u.perm, "group_regex": u.group_regex, "auth": u.auth,
                                           "failed_logons": u.failed, "locked": u.locked, "seal": u.seal.name()})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else if users.is_empty() {
                println!("No users yet: create the first with `p11shim user add` and the token's SO PIN.");
            } else {
                println!(
                    "{:<32}  {:<8}  {:<8}  {:<11}  {:<14}  group regex",
                    "name", "perm", "logon", "seal", "failed logons"
                );
                for u in &users {
                    let failed = if u.locked { format!("{} LOCKED", u.failed) } else { u.failed.to_string() };
                    println!(
                        "{:<32}  {:<8}  {:<8}  {:<11}  {:<14}  {}",
                        u.name,
                        u.perm,
                        u.auth,
                        u.seal.name(),
                        failed,
                        u.group_regex
                    );
                }
                if users.iter().any(|u| u.seal != auth::SealState::Intact) {
                    return Ok(Outcome::Attention(
                        "some users are not sealed or their seal is broken: they cannot log on (see README, Users)"
                            .into(),
                    ));
                }
            }
        }
        UserCommand::Delete { name, logon, .. } => {
            let logons = logons(&trail, config, &logon.logon)?;
            auth::delete_user(&trail, &logons, &name)?;
            done(json, serde_json::json!({"deleted": name}), format!("Deleted user {name}."));
        }
        UserCommand::Passwd { name, credential, logon, .. } => {
            let logons = logons(&trail, config, &logon.logon)?;
            let credential = credential.read(&name)?;
            auth::change_credential(&trail, &logons, &name, credential)?;
            done(json, serde_json::json!({"changed": name}), format!("Changed the credential of user {name}."));
        }
        UserCommand::Unlock { name, logon, .. } => {
            let logons = logons(&trail, config, &logon.logon)?;
            let cleared = auth::unlock_user(&trail, &logons, &name)?;
            done(
                json,
                serde_json::json!({"unlocked": name, "failed_logons_cleared": cleared}),
                format!("Unlocked user {name} ({cleared} failed logons cleared)."),
            );
        }
        UserCommand::Reseal { logon, .. } => {
            let logons = logons_into(Logons::for_reseal(), &trail, config, &logon.logon)?;
            let names = auth::reseal_users(&trail, &logons)?;
            done(
                json,
                serde_json::json!({"sealed": names, "store": store.describe()}),
                format!("Sealed {} users in {}: {}", names.len(), store.describe(), names.join(", ")),
            );
        }
    }
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p11shim::config::Mode;
    use p11shim::error::Result;

    /// A MAC in software (the shim's is the HSM's): enough to seal rows the logon checks.
    struct TestSealer;
    impl Sealer for TestSealer {
        fn seal(&self, data: &[u8]) -> Result<Vec<u8>> {
            use sha2::Digest;
            Ok(sha2::Sha256::new_with_prefix(b"users test MAC key").chain_update(data).finalize().to_vec())
        }
        fn check(&self, data: &[u8], mac: &[u8]) -> Result<bool> {
            Ok(self.seal(data)? == mac)
        }
    }

    const PW: &str = "correct horse";

    fn seed(store: &dyn KeyStore, name: &str) {
        let params = argon2::Params::new(64, 1, 1, None).unwrap();
        let argon2 = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        use argon2::PasswordHasher;
        let hash = argon2.hash_password(PW.as_bytes()).unwrap().to_string();
        let user = NewUser {
            name: name.into(),
            perm: "00000001".into(),
            group_regex: ".*".into(),
            credential: Credential::SignKey([9; 32]),
        };
        let mut row = auth::user_row(&user).unwrap();
        row.auth = auth::AUTH_PASSWORD.into();
        row.secret = hash.into_bytes();
        auth::seal_restored(&TestSealer, &mut row).unwrap();
        store.user_insert(&row).unwrap();
    }

    #[test]
    fn stacked_logons_stop_at_the_first_failure() {
        let dir = tempfile::tempdir().unwrap();
        let store = store::open(&format!("sqlite:{}", dir.path().join("k.db").display())).unwrap();
        seed(&*store, "s_one");
        seed(&*store, "s_two");
        // SAFETY of the test: these variables are read only by this test (names unique to it).
        std::env::set_var("P11SHIM_PASSWORD_S_ONE", PW);
        std::env::set_var("P11SHIM_PASSWORD_S_TWO", "wrong password");
        let config = Config::parse(
            "module = \"/m.so\"\n[logon]\ndelay = \"0s\"\ndelay_max = \"0s\"",
            Path::new("/c.toml"),
            None,
        )
        .unwrap();
        let trail =
            Trail { store: &*store, sealer: Some(&TestSealer), also: Vec::new(), head: None, mode: Mode::Standard };
        let specs = ["s_one".to_string(), "s_two".to_string(), "s_three".to_string()];
        let err = logons(&trail, &config, &specs).unwrap_err();
        assert_eq!(err.message, "logon failed for s_two");
        assert_eq!(err.exit, super::super::exit::Exit::Denied);
        // s_three was never tried: no password asked (none is set, stdin is not a terminal), nothing logged.
        let mut actions = Vec::new();
        store
            .audit_scan(&mut |e| {
                actions.push(format!("{} | {}", e.draft.who, e.draft.action));
                Ok(())
            })
            .unwrap();
        assert_eq!(actions, vec!["s_two | refused: logon (password)"]);
        assert_eq!(password_env("a.b-c_9"), "P11SHIM_PASSWORD_A_B_C_9");
    }
}
