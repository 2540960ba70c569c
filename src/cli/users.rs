//! `p11shim user …`: the users of the permission model, and `--logon`, the logon stack every command that
//! needs permissions shares ([`LogonArgs`], [`logons`]).

use super::{CliResult, Outcome};
use crate::admin::Pin;
use crate::auth::{self, Credential, Logons, NewUser};
use crate::config::Config;
use crate::store::{self, KeyStore};
use clap::Subcommand;
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
fails, the command stops.";

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
pub fn logons(store: &dyn KeyStore, specs: &[String]) -> Result<Logons, String> {
    let mut logons = Logons::new();
    for spec in specs {
        match spec.split_once(',') {
            Some((name, key_file)) => {
                if key_file.is_empty() {
                    return Err(format!("--logon {spec}: no key file after the comma"));
                }
                logons.logon_sign(store, name, Path::new(key_file)).map_err(|e| e.to_string())?;
            }
            None => {
                let password = logon_password(spec)?;
                logons.logon_password(store, spec, &password).map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(logons)
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
    fn read(&self, name: &str) -> Result<Credential, String> {
        match &self.sign_key {
            Some(path) => Ok(Credential::SignKey(auth::read_public_key(path).map_err(|e| e.to_string())?)),
            None => Ok(Credential::Password(new_password(name)?)),
        }
    }
}

#[derive(Subcommand)]
#[command(after_long_help = MODEL)]
pub enum UserCommand {
    /// Create a user. The first user needs the token's SO PIN (--so-pin-file or $P11SHIM_SO_PIN, checked by
    /// an SO login on --token or the config's first database slot) and must be a user administrator; after
    /// that, logged-on users with 10000000 (--logon).
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
        /// The token whose SO PIN is given (default: the config's first database slot).
        #[arg(long, value_name = "LABEL")]
        token: Option<String>,
    },
    /// List the users: name, mask, group regex and how they log on (no secrets). Needs no logon.
    List {
        /// One JSON array for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Delete a user (needs 10000000 from the logged-on users; the last user administrator cannot go).
    #[command(after_long_help = MODEL)]
    Delete {
        name: String,
        #[command(flatten)]
        logon: LogonArgs,
    },
    /// Change a user's password or key: by a user administrator (10000000), or by the user logged on.
    #[command(after_long_help = MODEL)]
    Passwd {
        name: String,
        #[command(flatten)]
        credential: CredentialArgs,
        #[command(flatten)]
        logon: LogonArgs,
    },
}

/// The key store the config names.
pub fn open_store(config: &Config) -> Result<Box<dyn KeyStore>, String> {
    store::open(&config.store_url).map_err(|e| e.to_string())
}

pub fn run(config: &Config, command: UserCommand) -> CliResult {
    let store = open_store(config)?;
    let store = &*store;
    match command {
        UserCommand::Add { name, perm, group_regex, credential, logon, so_pin_file, token } => {
            let so_pin_given =
                so_pin_file.is_some() || std::env::var_os("P11SHIM_SO_PIN").is_some_and(|v| !v.is_empty());
            // Checked before anything is asked for, so that a typo costs no PIN or password prompt.
            auth::check_name(&name).map_err(|e| e.to_string())?;
            auth::Perm::parse(&perm)?;
            auth::group_regex(&group_regex).map_err(|e| e.to_string())?;
            let first = store.user_list().map_err(|e| e.to_string())?.is_empty();
            let so = if first {
                let pin: Pin = super::pins::secret("SO PIN", so_pin_file, "P11SHIM_SO_PIN", "--so-pin-file")?;
                Some(auth::so_logon(store, config, token.as_deref(), &pin).map_err(|e| e.to_string())?)
            } else {
                None
            };
            let logons = logons(store, &logon.logon)?;
            let credential = credential.read(&name)?;
            let user = NewUser { name, perm, group_regex, credential };
            let info = auth::add_user(store, &logons, so.as_ref(), user).map_err(|e| match e {
                auth::AuthError::Refused(message) if !first && so_pin_given => {
                    format!("{message} (the SO PIN creates only the first user; log on as a user administrator)")
                }
                e => e.to_string(),
            })?;
            println!("Added user {} ({} {}, logs on with {}).", info.name, info.perm, info.group_regex, info.auth);
        }
        UserCommand::List { json } => {
            let users = auth::list_users(store).map_err(|e| e.to_string())?;
            if json {
                let list: Vec<_> = users
                    .iter()
                    .map(|u| {
                        serde_json::json!({"name": u.name, "perm": u.perm, "group_regex": u.group_regex, "auth": u.auth})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else if users.is_empty() {
                println!("No users yet: create the first with `p11shim user add` and the token's SO PIN.");
            } else {
                println!("{:<32}  {:<8}  {:<8}  group regex", "name", "perm", "logon");
                for u in &users {
                    println!("{:<32}  {:<8}  {:<8}  {}", u.name, u.perm, u.auth, u.group_regex);
                }
            }
        }
        UserCommand::Delete { name, logon } => {
            let logons = logons(store, &logon.logon)?;
            auth::delete_user(store, &logons, &name).map_err(|e| e.to_string())?;
            println!("Deleted user {name}.");
        }
        UserCommand::Passwd { name, credential, logon } => {
            let logons = logons(store, &logon.logon)?;
            let credential = credential.read(&name)?;
            auth::change_credential(store, &logons, &name, credential).map_err(|e| e.to_string())?;
            println!("Changed the credential of user {name}.");
        }
    }
    Ok(Outcome::Done)
}
