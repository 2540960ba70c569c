//! Users and permissions (issue C), after the CryptoServer model: a user has a name, a permission mask (8 hex
//! digits, one level per user-group slot, slot 0 rightmost), a group regex (the CXI_GROUP: which key groups
//! the user's slot-0 level counts for) and either a password (kept as an argon2id hash) or an Ed25519 public
//! key (signature logon, LogonSign). Users log on for one command; several logons stack and their levels
//! add up per slot ([`Logons`]); an operation states what it needs ([`Need`]) and is refused ([`Denied`])
//! when the logged-on users together do not have it.
//!
//! User administration lives here too: the first user can only be created with the token's SO PIN
//! ([`so_logon`]); after that, adding or deleting users or changing another user's credential needs
//! [`Need::UserAdmin`] (10000000). Every change, failed logon and refusal is written to the audit log.

mod keys;
mod perm;

pub use keys::{read_public_key, read_signing_key};
pub use perm::{Denied, Need, Perm};

use crate::admin::{Pin, Token};
use crate::audit::{self, AuditError};
use crate::config::{Config, Storage};
use crate::store::{KeyStore, StoreError, UserDelete, UserRow};
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use regex::Regex;
use std::path::Path;
use std::sync::OnceLock;
use zeroize::Zeroizing;

/// The shortest password accepted for a new user or a password change.
pub const MIN_PASSWORD_LEN: usize = 8;

/// The `auth` column: how a user logs on.
pub const AUTH_PASSWORD: &str = "password";
pub const AUTH_SIGN: &str = "sign";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A name, mask, regex, password or key that cannot be used; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// A logon that failed (unknown user, wrong password, wrong key, wrong method: one message for all).
    #[error("{0}")]
    LogonFailed(String),
    /// A refusal (already written to the audit log, or the message says it could not be).
    #[error("{0}")]
    Refused(String),
    /// Anything else that stops the operation: unknown user, SO login failure, a lost update.
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

type Result<T> = std::result::Result<T, AuthError>;

/// Checks a user name: 1 to 32 characters from `[A-Za-z0-9_.-]`, not starting with '-', not "SO" (which
/// names the token's security officer in the audit log).
pub fn check_name(name: &str) -> Result<()> {
    let valid_chars = name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if name.is_empty() || name.len() > 32 || !valid_chars || name.starts_with('-') {
        return Err(AuthError::Invalid(format!(
            "user name {name:?}: use 1 to 32 characters from A-Z a-z 0-9 _ . - (not starting with -)"
        )));
    }
    if name.eq_ignore_ascii_case("SO") {
        return Err(AuthError::Invalid(format!(
            "user name {name:?} is reserved: the audit log names the token's security officer SO"
        )));
    }
    Ok(())
}

/// Compiles a group regex as it is used: anchored, so it must match the whole group name.
pub fn group_regex(pattern: &str) -> Result<Regex> {
    if pattern.is_empty() {
        return Err(AuthError::Invalid(
            "group regex is empty: give the groups the user may work on, e.g. 'Prod.*' (or '.*' for every group)"
                .into(),
        ));
    }
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        let detail = e.to_string().lines().last().unwrap_or_default().trim().to_string();
        AuthError::Invalid(format!("group regex {pattern:?}: not a valid regular expression: {detail}"))
    })
}

/// How a new or changed user logs on. The password is zeroized when dropped.
pub enum Credential {
    Password(Zeroizing<Vec<u8>>),
    /// An Ed25519 public key (see [`read_public_key`]).
    SignKey([u8; 32]),
}

impl Credential {
    /// (auth, secret) as stored: an argon2id PHC string for a password (never the password itself).
    fn stored(&self) -> Result<(&'static str, Vec<u8>)> {
        match self {
            Credential::Password(password) => {
                if password.len() < MIN_PASSWORD_LEN {
                    return Err(AuthError::Invalid(format!(
                        "password: too short, use at least {MIN_PASSWORD_LEN} characters"
                    )));
                }
                let phc = Argon2::default()
                    .hash_password(password)
                    .map_err(|e| AuthError::Failed(format!("cannot hash the password: {e}")))?;
                Ok((AUTH_PASSWORD, phc.to_string().into_bytes()))
            }
            Credential::SignKey(key) => Ok((AUTH_SIGN, key.to_vec())),
        }
    }
}

/// A user as shown by `user list`: no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub perm: String,
    pub group_regex: String,
    /// "password" or "sign".
    pub auth: String,
}

impl From<&UserRow> for UserInfo {
    fn from(row: &UserRow) -> UserInfo {
        UserInfo {
            name: row.name.clone(),
            perm: row.perm.clone(),
            group_regex: row.group_regex.clone(),
            auth: row.auth.clone(),
        }
    }
}

/// A user logged on for this command.
#[derive(Debug, Clone)]
pub struct LoggedOn {
    pub name: String,
    pub perm: Perm,
    pub group_regex: String,
    regex: Regex,
}

impl LoggedOn {
    fn from_row(row: &UserRow) -> Result<LoggedOn> {
        let damaged = |what: String| {
            AuthError::Failed(format!("user {} in the key store has {what}: fix it with `p11shim user`", row.name))
        };
        let perm = Perm::parse(&row.perm).map_err(|e| damaged(format!("an invalid mask ({e})")))?;
        let regex = group_regex(&row.group_regex).map_err(|e| damaged(format!("an invalid group regex ({e})")))?;
        Ok(LoggedOn { name: row.name.clone(), perm, group_regex: row.group_regex.clone(), regex })
    }

    /// Whether this user's group regex matches the whole of `group`.
    pub fn matches(&self, group: &str) -> bool {
        self.regex.is_match(group)
    }
}

/// The users logged on for one command, in logon order. Their levels add up per slot.
#[derive(Debug, Default)]
pub struct Logons {
    users: Vec<LoggedOn>,
}

impl Logons {
    pub fn new() -> Logons {
        Logons::default()
    }

    pub fn users(&self) -> &[LoggedOn] {
        &self.users
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn is_logged_on(&self, name: &str) -> bool {
        self.users.iter().any(|u| u.name == name)
    }

    /// The audit log's `who`: the names comma-separated, or "-" for nobody.
    pub fn who(&self) -> String {
        if self.users.is_empty() {
            return "-".into();
        }
        self.users.iter().map(|u| u.name.as_str()).collect::<Vec<_>>().join(",")
    }

    /// Logs `name` on with a password (verified against the stored argon2id hash). Unknown user, wrong
    /// password and a user who logs on with a key all give the same "logon failed for NAME"; the audit
    /// log records which it was.
    pub fn logon_password(&mut self, store: &dyn KeyStore, name: &str, password: &[u8]) -> Result<()> {
        let row = self.candidate(store, name)?;
        let reason = match &row {
            None => {
                // As long as a real check, so that timing does not tell whether the user exists.
                let _ = Argon2::default().verify_password(password, dummy_hash());
                "no such user"
            }
            Some(row) if row.auth != AUTH_PASSWORD => "the user logs on with a signature key (--logon NAME,KEYFILE)",
            Some(row) => {
                let phc = String::from_utf8_lossy(&row.secret);
                match Argon2::default().verify_password(password, phc.as_ref()) {
                    Ok(()) => return self.push(row),
                    Err(_) => "wrong password",
                }
            }
        };
        Err(failed_logon(store, name, "password", reason))
    }

    /// Logs `name` on by signature (LogonSign): a fresh random challenge is signed with the Ed25519
    /// private key in `key_file` and verified with the user's stored public key.
    pub fn logon_sign(&mut self, store: &dyn KeyStore, name: &str, key_file: &Path) -> Result<()> {
        let key = read_signing_key(key_file)?;
        self.logon_sign_with(store, name, &key)
    }

    /// [`Logons::logon_sign`] with the private key already read.
    pub fn logon_sign_with(&mut self, store: &dyn KeyStore, name: &str, key: &SigningKey) -> Result<()> {
        let row = self.candidate(store, name)?;
        let reason = match &row {
            None => "no such user",
            Some(row) if row.auth != AUTH_SIGN => "the user logs on with a password",
            Some(row) => {
                let mut challenge = Zeroizing::new([0u8; 32]);
                getrandom::fill(challenge.as_mut())
                    .map_err(|e| AuthError::Failed(format!("cannot make a logon challenge: {e}")))?;
                let message = challenge_message(name, challenge.as_ref());
                let signature = key.sign(&message);
                let stored: Option<[u8; 32]> = row.secret.as_slice().try_into().ok();
                let verified = stored
                    .and_then(|bytes| VerifyingKey::from_bytes(&bytes).ok())
                    .is_some_and(|public| public.verify_strict(&message, &signature).is_ok());
                if verified {
                    return self.push(row);
                }
                "the signature does not verify with the user's public key (wrong key file)"
            }
        };
        Err(failed_logon(store, name, "signature", reason))
    }

    /// The stored user `name`, after refusing a second logon of the same user (its levels would count twice).
    fn candidate(&self, store: &dyn KeyStore, name: &str) -> Result<Option<UserRow>> {
        if self.is_logged_on(name) {
            return Err(AuthError::LogonFailed(format!(
                "user {name} is already logged on in this command: each user counts once"
            )));
        }
        if check_name(name).is_err() {
            return Ok(None);
        }
        Ok(store.user_get(name)?)
    }

    fn push(&mut self, row: &UserRow) -> Result<()> {
        self.users.push(LoggedOn::from_row(row)?);
        Ok(())
    }

    /// Whether the logged-on users together have what `need` asks: per slot, the sum of their levels
    /// reaches the mask; for [`Need::Group`] only users whose group regex matches the group count.
    pub fn require(&self, need: Need) -> std::result::Result<(), Denied> {
        let mut sum = [0u32; 8];
        for user in &self.users {
            if need.group().is_none_or(|group| user.matches(group)) {
                perm::add(&mut sum, user.perm);
            }
        }
        if perm::reaches(&sum, need.mask()) {
            return Ok(());
        }
        let have = if self.users.is_empty() {
            "nobody (log on with --logon NAME or --logon NAME,KEYFILE)".to_string()
        } else {
            self.users
                .iter()
                .map(|u| format!("{} {} ({})", u.name, u.perm, u.group_regex))
                .collect::<Vec<_>>()
                .join(", ")
        };
        Err(Denied::new(need, have))
    }
}

/// What a signature logon signs: a fixed context, the user's name and the challenge, so that a signature
/// made for anything else (or another user) never verifies.
fn challenge_message(name: &str, challenge: &[u8]) -> Vec<u8> {
    let mut message = b"p11shim LogonSign v1\0".to_vec();
    message.extend_from_slice(name.as_bytes());
    message.push(0);
    message.extend_from_slice(challenge);
    message
}

/// A hash to verify against when the user does not exist (made once per process).
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let mut random = [0u8; 16];
        let _ = getrandom::fill(&mut random);
        Argon2::default().hash_password(&random).map(|h| h.to_string()).unwrap_or_default()
    })
}

/// Records a failed logon and returns its error, which says the same whatever the reason.
fn failed_logon(store: &dyn KeyStore, name: &str, method: &str, reason: &str) -> AuthError {
    let shown = format!("logon failed for {name}");
    let message = match audit::record(store, name, &format!("refused: logon ({method})"), "", 0, reason) {
        Ok(_) => shown,
        Err(e) => format!("{shown} (and {e})"),
    };
    AuthError::LogonFailed(message)
}

/// Proof that the token's SO logged on in this command: the only way to create the first user.
#[derive(Debug)]
pub struct SoLogon {
    token: String,
}

impl SoLogon {
    /// The label of the token the SO logged on to.
    pub fn token(&self) -> &str {
        &self.token
    }
}

/// Logs on as the SO of the token labelled `token`, or else of the config's first database slot, to prove
/// the caller holds the SO PIN; logs out again at once. A failed login is written to the audit log.
pub fn so_logon(store: &dyn KeyStore, config: &Config, token: Option<&str>, pin: &Pin) -> Result<SoLogon> {
    let label = match token {
        Some(label) => label.to_string(),
        None => {
            config.slots.iter().find(|s| s.storage == Storage::Database).map(|s| s.token.clone()).ok_or_else(|| {
                AuthError::Failed(format!(
                    "no database slot in {}: name the token whose SO PIN you give with --token LABEL",
                    config.source.display()
                ))
            })?
        }
    };
    let mut session = Token::open(config, &label).map_err(|e| AuthError::Failed(e.to_string()))?;
    if let Err(e) = session.login(cryptoki_sys::CKU_SO, pin) {
        let reason = e.to_string();
        let who = format!("SO of {label}");
        return Err(AuthError::LogonFailed(audit::record_refusal(store, &who, "logon (SO PIN)", "", &reason)));
    }
    Ok(SoLogon { token: label })
}

/// A user to create.
pub struct NewUser {
    pub name: String,
    /// 8 hex digits.
    pub perm: String,
    pub group_regex: String,
    pub credential: Credential,
}

/// Creates a user. With no user in the store yet this needs `so` (the SO PIN was given) and the new user
/// must be a user administrator (slot 7 ≥ 1), or nobody could ever administer users; after that it needs
/// [`Need::UserAdmin`] from `logons`.
pub fn add_user(store: &dyn KeyStore, logons: &Logons, so: Option<&SoLogon>, user: NewUser) -> Result<UserInfo> {
    check_name(&user.name)?;
    let perm = Perm::parse(&user.perm).map_err(AuthError::Invalid)?;
    group_regex(&user.group_regex)?;
    let action = format!("user add {}", user.name);
    let first = store.user_list()?.is_empty();
    let who = match (first, so) {
        (true, Some(so)) => {
            if perm.level(7) < 1 {
                return Err(AuthError::Invalid(format!(
                    "the first user must be a user administrator (a mask with slot 7 ≥ 1, e.g. 10000000 or \
                     12000000), or no user could ever be added again; {} has {perm}",
                    user.name
                )));
            }
            format!("SO of {}", so.token)
        }
        (true, None) => {
            let reason = format!(
                "{action} denied: the first user can only be created with the token's SO PIN \
                 (--so-pin-file FILE or P11SHIM_SO_PIN)"
            );
            return Err(refused(store, logons, &action, &user.group_regex, &reason));
        }
        (false, _) => {
            if let Err(denied) = logons.require(Need::UserAdmin) {
                let mut reason = format!("{action} denied: {}", denied.doing("user administration"));
                if so.is_some() {
                    reason.push_str(" (the SO PIN creates only the first user)");
                }
                return Err(refused(store, logons, &action, &user.group_regex, &reason));
            }
            logons.who()
        }
    };
    let row = user_row(&user)?;
    if first {
        // Only if the table is still empty: another first user may have been added meanwhile.
        if !store.user_insert_first(&row)? {
            let reason = format!(
                "{action} denied: another user was created meanwhile, and the SO PIN creates only the first user; \
                 log on as a user administrator (10000000)"
            );
            return Err(AuthError::Refused(audit::record_refusal(store, &who, &action, &user.group_regex, &reason)));
        }
    } else {
        match store.user_insert(&row) {
            Ok(()) => {}
            Err(StoreError::Duplicate { .. }) => {
                return Err(AuthError::Failed(format!("user {} already exists", user.name)));
            }
            Err(e) => return Err(e.into()),
        }
    }
    done(store, &who, &action, &row.group_regex)?;
    Ok(UserInfo::from(&row))
}

/// The row `user` is stored as (the password hashed), after checking every field. [`add_user`] uses it; so
/// can a restore of the users table.
pub fn user_row(user: &NewUser) -> Result<UserRow> {
    check_name(&user.name)?;
    let perm = Perm::parse(&user.perm).map_err(AuthError::Invalid)?;
    group_regex(&user.group_regex)?;
    let (auth, secret) = user.credential.stored()?;
    Ok(UserRow {
        name: user.name.clone(),
        perm: perm.to_string(),
        group_regex: user.group_regex.clone(),
        auth: auth.into(),
        secret,
        version: 1,
    })
}

/// Deletes a user; needs [`Need::UserAdmin`]. Refused if no user administrator would remain.
pub fn delete_user(store: &dyn KeyStore, logons: &Logons, name: &str) -> Result<()> {
    let action = format!("user delete {name}");
    if let Err(denied) = logons.require(Need::UserAdmin) {
        let reason = format!("{action} denied: {}", denied.doing("user administration"));
        return Err(refused(store, logons, &action, "", &reason));
    }
    // The check and the deletion are one transaction: two deletions at once cannot remove the last two
    // administrators.
    let admins_remain = |rest: &[UserRow]| {
        rest.iter().filter_map(|u| Perm::parse(&u.perm).ok()).map(|p| u32::from(p.level(7))).sum::<u32>() >= 1
    };
    match store.user_delete_if(name, &admins_remain)? {
        UserDelete::NotFound => Err(AuthError::Failed(format!("no user {name}"))),
        UserDelete::Refused(victim) => {
            let reason = format!(
                "{action} denied: it would leave no user administrator (slot 7 ≥ 1, e.g. 10000000); add another first"
            );
            Err(refused(store, logons, &action, &victim.group_regex, &reason))
        }
        UserDelete::Deleted(victim) => done(store, &logons.who(), &action, &victim.group_regex),
    }
}

/// Changes a user's password or key (and so possibly how the user logs on): by a user administrator, or by
/// the user while logged on.
pub fn change_credential(store: &dyn KeyStore, logons: &Logons, name: &str, credential: Credential) -> Result<()> {
    let action = format!("user passwd {name}");
    if !logons.is_logged_on(name) {
        if let Err(denied) = logons.require(Need::UserAdmin) {
            let reason = format!(
                "{action} denied: {} (or log on as {name} to change your own)",
                denied.doing("changing another user's credential")
            );
            return Err(refused(store, logons, &action, "", &reason));
        }
    }
    let Some(row) = store.user_get(name)? else {
        return Err(AuthError::Failed(format!("no user {name}")));
    };
    let (auth, secret) = credential.stored()?;
    let changed = UserRow { auth: auth.into(), secret, version: row.version + 1, ..row };
    if !store.user_update(&changed)? {
        return Err(AuthError::Failed(format!("user {name} was changed or deleted meanwhile: try again")));
    }
    done(store, &logons.who(), &action, &changed.group_regex)
}

/// Every user, by name, without secrets. Needs no logon (as CryptoServer's ListUsers).
pub fn list_users(store: &dyn KeyStore) -> Result<Vec<UserInfo>> {
    Ok(store.user_list()?.iter().map(UserInfo::from).collect())
}

/// Records a refusal and returns its error.
fn refused(store: &dyn KeyStore, logons: &Logons, action: &str, group: &str, reason: &str) -> AuthError {
    AuthError::Refused(audit::record_refusal(store, &logons.who(), action, group, reason))
}

/// Records a change that was made; if the log cannot take it, the command fails saying the change is done.
fn done(store: &dyn KeyStore, who: &str, action: &str, group: &str) -> Result<()> {
    audit::record(store, who, action, group, 0, "ok")
        .map(drop)
        .map_err(|e| AuthError::Failed(format!("{action}: done, but {e}")))
}
