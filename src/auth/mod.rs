//! Users and permissions, after the CryptoServer model: a user has a name, a permission mask (8 hex
//! digits, one level per user-group slot, slot 0 rightmost), a group regex (the CXI_GROUP: which key groups
//! the user's slot-0 level counts for) and either a password (kept as an argon2id hash) or an Ed25519 public
//! key (signature logon, LogonSign). Users log on for one command; several logons stack and their levels
//! add up per slot ([`Logons`]); an operation states what it needs ([`Need`]) and is refused ([`Denied`])
//! when the logged-on users together do not have it.
//!
//! User administration lives here too: the first user can only be created with the token's SO PIN
//! ([`so_logon`]); after that, adding or deleting users or changing another user's credential needs
//! [`Need::UserAdmin`] (10000000). Every change, failed logon and refusal is written to the audit log.
//!
//! Every users row is sealed: an HMAC made inside the HSM with the MBK set's MAC key over all its columns
//! ([`seal_input`]). A row edited, inserted or renamed by someone who can write the database but not use the
//! HSM is refused at logon. Failed logons are counted in the row (so the count is sealed too): each failure
//! makes the user wait longer before the next attempt, and `[logon] lockout_after` locks the user until an
//! administrator unlocks it.

mod keys;
mod perm;
pub mod session;

pub use keys::{read_public_key, read_signing_key};
pub use perm::{Denied, Need, Perm};

use crate::admin::{Pin, Token};
use crate::audit::{AuditError, Trail};
use crate::config::{Config, LogonPolicy, Storage};
use crate::store::{StoreError, UserDelete, UserRow};
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
    /// A logon refused before the credential was looked at: the user is locked, or must wait after failed
    /// logons (written to the audit log).
    #[error("{0}")]
    Throttled(String),
    /// Anything else that stops the operation: unknown user, SO login failure, a lost update.
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

impl AuthError {
    /// What kind of failure this is (see [`crate::error::ErrorKind`]).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            AuthError::LogonFailed(_) | AuthError::Refused(_) | AuthError::Throttled(_) => ErrorKind::Denied,
            AuthError::Invalid(_) | AuthError::Failed(_) => ErrorKind::Failed,
            AuthError::Store(e) => e.kind(),
            AuthError::Audit(e) => e.cause.kind(),
        }
    }
}

impl From<crate::error::Error> for AuthError {
    fn from(e: crate::error::Error) -> AuthError {
        match e {
            crate::error::Error::Store(e) => AuthError::Store(e),
            e => AuthError::Failed(e.to_string()),
        }
    }
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

/// What a users row's MAC is made over: a fixed context and every column but the MAC, each length-prefixed.
pub fn seal_input(row: &UserRow) -> Vec<u8> {
    let mut input = b"p11shim user seal v1\0".to_vec();
    for part in [
        row.name.as_bytes(),
        row.perm.as_bytes(),
        row.group_regex.as_bytes(),
        row.auth.as_bytes(),
        &row.secret,
        &row.version.to_be_bytes(),
        &row.failed.to_be_bytes(),
        &row.last_failed.to_be_bytes(),
    ] {
        input.extend_from_slice(&(part.len() as u32).to_be_bytes());
        input.extend_from_slice(part);
    }
    input
}

/// Seals `row` with the trail's MAC key.
fn seal(trail: &Trail, row: &mut UserRow) -> Result<()> {
    let sealer = trail.sealer.ok_or_else(|| {
        AuthError::Failed(
            "users are sealed with the MAC key of the token's MBK set, and this token has none: create it first \
             (`p11shim mbk create`)"
                .into(),
        )
    })?;
    row.mac = sealer.seal(&seal_input(row))?;
    Ok(())
}

/// Whether a users row is as the HSM sealed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealState {
    Intact,
    /// Written before users were sealed (schema version 5): `p11shim user reseal` seals them once.
    Unsealed,
    /// Its MAC does not verify: edited, inserted or renamed by a writer of the store.
    Broken,
    /// No MAC key at hand to check it.
    Unchecked,
}

impl SealState {
    pub fn name(self) -> &'static str {
        match self {
            SealState::Intact => "sealed",
            SealState::Unsealed => "UNSEALED",
            SealState::Broken => "BROKEN SEAL",
            SealState::Unchecked => "unchecked",
        }
    }
}

/// Checks a row's seal in the HSM, with the trail's MAC key or another one at hand (the row may have been
/// sealed through a token of another MBK set sharing the store).
pub fn seal_state(trail: &Trail, row: &UserRow) -> Result<SealState> {
    if row.mac.is_empty() {
        return Ok(SealState::Unsealed);
    }
    let Some(sealer) = trail.sealer else { return Ok(SealState::Unchecked) };
    let input = seal_input(row);
    for sealer in std::iter::once(sealer).chain(trail.also.iter().copied()) {
        if sealer.check(&input, &row.mac)? {
            return Ok(SealState::Intact);
        }
    }
    Ok(SealState::Broken)
}

/// A user as shown by `user list`: no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub perm: String,
    pub group_regex: String,
    /// "password" or "sign".
    pub auth: String,
    /// Failed logons in a row.
    pub failed: i64,
    /// Locked by `[logon] lockout_after` until an administrator unlocks it.
    pub locked: bool,
    pub seal: SealState,
}

impl UserInfo {
    fn of(row: &UserRow, policy: &LogonPolicy, seal: SealState) -> UserInfo {
        UserInfo {
            name: row.name.clone(),
            perm: row.perm.clone(),
            group_regex: row.group_regex.clone(),
            auth: row.auth.clone(),
            failed: row.failed,
            locked: locked(policy, row),
            seal,
        }
    }
}

fn locked(policy: &LogonPolicy, row: &UserRow) -> bool {
    policy.lockout_after > 0 && row.failed >= i64::from(policy.lockout_after)
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
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

/// How a logon proves who it is.
enum Proof<'a> {
    Password(&'a [u8]),
    /// A signature made with the user's Ed25519 key over `message`, which this process issued.
    Signature {
        message: &'a [u8],
        signature: &'a [u8],
    },
}

impl Proof<'_> {
    fn method(&self) -> &'static str {
        match self {
            Proof::Password(_) => "password",
            Proof::Signature { .. } => "signature",
        }
    }
}

/// The users logged on for one command (or one PKCS#11 session), in logon order. Their levels add up per
/// slot.
#[derive(Debug, Default)]
pub struct Logons {
    users: Vec<LoggedOn>,
    /// Accept rows written before users were sealed (only `p11shim user reseal`, which seals them).
    unsealed_ok: bool,
}

impl Logons {
    pub fn new() -> Logons {
        Logons::default()
    }

    /// Logons for `p11shim user reseal`: rows not sealed yet are accepted (the command seals them).
    pub fn for_reseal() -> Logons {
        Logons { users: Vec::new(), unsealed_ok: true }
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

    /// Logs `name` off; false if not logged on.
    pub fn logoff(&mut self, name: &str) -> bool {
        let before = self.users.len();
        self.users.retain(|u| u.name != name);
        self.users.len() != before
    }

    /// Logs everyone off.
    pub fn clear(&mut self) {
        self.users.clear();
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
    pub fn logon_password(&mut self, trail: &Trail, policy: &LogonPolicy, name: &str, password: &[u8]) -> Result<()> {
        self.logon(trail, policy, name, Proof::Password(password))
    }

    /// Logs `name` on by signature (LogonSign): a fresh random challenge is signed with the Ed25519
    /// private key in `key_file` and verified with the user's stored public key.
    pub fn logon_sign(&mut self, trail: &Trail, policy: &LogonPolicy, name: &str, key_file: &Path) -> Result<()> {
        let key = read_signing_key(key_file)?;
        self.logon_sign_with(trail, policy, name, &key)
    }

    /// [`Logons::logon_sign`] with the private key already read.
    pub fn logon_sign_with(&mut self, trail: &Trail, policy: &LogonPolicy, name: &str, key: &SigningKey) -> Result<()> {
        let message = challenge(name)?;
        let signature = key.sign(&message).to_bytes();
        self.logon_signed(trail, policy, name, &message, &signature)
    }

    /// Logs `name` on with `signature` over `message`, a challenge from [`challenge`] that the caller issued
    /// to the signer (and uses once).
    pub fn logon_signed(
        &mut self,
        trail: &Trail,
        policy: &LogonPolicy,
        name: &str,
        message: &[u8],
        signature: &[u8],
    ) -> Result<()> {
        self.logon(trail, policy, name, Proof::Signature { message, signature })
    }

    fn logon(&mut self, trail: &Trail, policy: &LogonPolicy, name: &str, proof: Proof) -> Result<()> {
        let method = proof.method();
        if self.is_logged_on(name) {
            return Err(AuthError::LogonFailed(format!(
                "user {name} is already logged on in this command: each user counts once"
            )));
        }
        let row = if check_name(name).is_ok() { trail.store.user_get(name)? } else { None };
        let Some(row) = row else {
            if let Proof::Password(password) = proof {
                // As long as a real check, so that timing does not tell whether the user exists.
                let _ = Argon2::default().verify_password(password, dummy_hash());
            }
            return Err(failed_logon(trail, name, method, "no such user"));
        };
        match seal_state(trail, &row)? {
            SealState::Intact => {}
            SealState::Unsealed if self.unsealed_ok => {}
            SealState::Unsealed => {
                let reason = format!(
                    "user {name} in {} is not sealed (written before this version, or by someone who can write the key store): an administrator must reseal the users once with `p11shim user reseal`",
                    trail.store.describe()
                );
                return Err(AuthError::LogonFailed(trail.record_refusal(
                    name,
                    &format!("logon ({method})"),
                    "",
                    &reason,
                )));
            }
            SealState::Broken => {
                let reason = format!(
                    "user {name} in {} does not match its seal: the row was edited, inserted or renamed by someone who can write the key store; refused",
                    trail.store.describe()
                );
                crate::error!("{reason}");
                return Err(AuthError::LogonFailed(trail.record_refusal(
                    name,
                    &format!("logon ({method})"),
                    "",
                    &reason,
                )));
            }
            SealState::Unchecked => {
                return Err(AuthError::Failed(format!(
                    "cannot check user {name}'s seal: the token has no MBK set (its MAC key seals the users)"
                )))
            }
        }
        if locked(policy, &row) {
            let reason = format!(
                "user {name} is locked after {} failed logons in a row; a user administrator unlocks it with `p11shim user unlock {name}`",
                row.failed
            );
            return Err(AuthError::Throttled(trail.record_refusal(name, &format!("logon ({method})"), "", &reason)));
        }
        let wait = policy.wait_after(row.failed.clamp(0, i64::from(u32::MAX)) as u32);
        let allowed_at = row.last_failed.saturating_add(wait.as_millis() as i64);
        let now = now_ms();
        if row.failed > 0 && now < allowed_at {
            let reason = format!(
                "logon of {name} refused: {} failed logons in a row; try again in {:.1} s",
                row.failed,
                (allowed_at - now) as f64 / 1000.0
            );
            return Err(AuthError::Throttled(trail.record_refusal(name, &format!("logon ({method})"), "", &reason)));
        }
        let wrong = match proof {
            Proof::Password(_) if row.auth != AUTH_PASSWORD => {
                Some("the user logs on with a signature key (--logon NAME,KEYFILE)")
            }
            Proof::Signature { .. } if row.auth != AUTH_SIGN => Some("the user logs on with a password"),
            Proof::Password(password) => {
                let phc = String::from_utf8_lossy(&row.secret);
                Argon2::default().verify_password(password, phc.as_ref()).is_err().then_some("wrong password")
            }
            Proof::Signature { message, signature } => {
                let stored: Option<[u8; 32]> = row.secret.as_slice().try_into().ok();
                let signature = ed25519_dalek::Signature::from_slice(signature).ok();
                let verified = stored.and_then(|bytes| VerifyingKey::from_bytes(&bytes).ok()).is_some_and(|public| {
                    signature.is_some_and(|signature| public.verify_strict(message, &signature).is_ok())
                });
                (!verified).then_some("the signature does not verify with the user's public key (wrong key)")
            }
        };
        if let Some(reason) = wrong {
            let counted = if row.mac.is_empty() { Ok(row.failed) } else { count_failure(trail, &row) };
            let reason = match counted {
                Ok(failed) if policy.lockout_after > 0 && failed >= i64::from(policy.lockout_after) => {
                    format!("{reason}; failed logons in a row: {failed}: the user is now locked")
                }
                Ok(failed) => format!("{reason}; failed logons in a row: {failed}"),
                Err(e) => format!("{reason}; the failure could not be counted: {e}"),
            };
            return Err(failed_logon(trail, name, method, &reason));
        }
        if row.failed > 0 && !row.mac.is_empty() {
            update_user(trail, name, |u| {
                u.failed = 0;
                u.last_failed = 0;
            })?;
        }
        self.users.push(LoggedOn::from_row(&row)?);
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

/// Counts one more failed logon in the user's row (resealed); the count afterwards.
fn count_failure(trail: &Trail, row: &UserRow) -> Result<i64> {
    let updated = update_user(trail, &row.name, |u| {
        u.failed = u.failed.saturating_add(1);
        u.last_failed = now_ms();
    })?;
    Ok(updated.failed)
}

/// Reads user `name`, checks its seal, applies `change`, bumps the version, reseals and writes it; retried
/// when another process changed the row meanwhile. The row as written.
fn update_user(trail: &Trail, name: &str, change: impl Fn(&mut UserRow)) -> Result<UserRow> {
    for _ in 0..10 {
        let Some(mut row) = trail.store.user_get(name)? else {
            return Err(AuthError::Failed(format!("no user {name}")));
        };
        if seal_state(trail, &row)? == SealState::Broken {
            return Err(AuthError::Failed(format!(
                "user {name} in {} does not match its seal: refused to change it",
                trail.store.describe()
            )));
        }
        change(&mut row);
        row.version += 1;
        seal(trail, &mut row)?;
        if trail.store.user_update(&row)? {
            return Ok(row);
        }
    }
    Err(AuthError::Failed(format!("user {name} was changed by others ten times meanwhile: try again")))
}

/// A fresh challenge for a signature logon of `name`: what the user's Ed25519 key must sign. A fixed
/// context, the user's name and 32 random bytes, so that a signature made for anything else (or another
/// user) never verifies.
pub fn challenge(name: &str) -> Result<Vec<u8>> {
    let mut random = [0u8; CHALLENGE_RANDOM];
    getrandom::fill(&mut random).map_err(|e| AuthError::Failed(format!("cannot make a logon challenge: {e}")))?;
    let mut message = CHALLENGE_CONTEXT.to_vec();
    message.extend_from_slice(name.as_bytes());
    message.push(0);
    message.extend_from_slice(&random);
    Ok(message)
}

/// How long [`challenge`]'s message for `name` is.
pub fn challenge_len(name: &str) -> usize {
    CHALLENGE_CONTEXT.len() + name.len() + 1 + CHALLENGE_RANDOM
}

const CHALLENGE_CONTEXT: &[u8] = b"p11shim LogonSign v1\0";
const CHALLENGE_RANDOM: usize = 32;

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
fn failed_logon(trail: &Trail, name: &str, method: &str, reason: &str) -> AuthError {
    // A name no user can have (an application's bytes, through the C interface) is logged quoted and cut
    // short: control characters and megabytes stay out of the log and off the operator's terminal.
    let name = if check_name(name).is_ok() {
        name.to_string()
    } else {
        let mut quoted = format!("{:?}", name.chars().take(64).collect::<String>());
        if name.chars().count() > 64 {
            quoted.push('…');
        }
        quoted
    };
    let shown = format!("logon failed for {name}");
    let message = match trail.record(&name, &format!("refused: logon ({method})"), "", 0, reason) {
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
pub fn so_logon(trail: &Trail, config: &Config, token: Option<&str>, pin: &Pin) -> Result<SoLogon> {
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
        return Err(AuthError::LogonFailed(trail.record_refusal(&who, "logon (SO PIN)", "", &reason)));
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
pub fn add_user(trail: &Trail, logons: &Logons, so: Option<&SoLogon>, user: NewUser) -> Result<UserInfo> {
    check_name(&user.name)?;
    let perm = Perm::parse(&user.perm).map_err(AuthError::Invalid)?;
    group_regex(&user.group_regex)?;
    let action = format!("user add {}", user.name);
    let store = trail.store;
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
            return Err(refused(trail, logons, &action, &user.group_regex, &reason));
        }
        (false, _) => {
            if let Err(denied) = logons.require(Need::UserAdmin) {
                let mut reason = format!("{action} denied: {}", denied.doing("user administration"));
                if so.is_some() {
                    reason.push_str(" (the SO PIN creates only the first user)");
                }
                return Err(refused(trail, logons, &action, &user.group_regex, &reason));
            }
            logons.who()
        }
    };
    let mut row = user_row(&user)?;
    if let Err(e) = seal(trail, &mut row) {
        return Err(failed(trail, &who, &action, &user.group_regex, e));
    }
    if first {
        // Only if the table is still empty: another first user may have been added meanwhile.
        if !store.user_insert_first(&row)? {
            let reason = format!(
                "{action} denied: another user was created meanwhile, and the SO PIN creates only the first user; \
                 log on as a user administrator (10000000)"
            );
            return Err(AuthError::Refused(trail.record_refusal(&who, &action, &user.group_regex, &reason)));
        }
    } else {
        match store.user_insert(&row) {
            Ok(()) => {}
            Err(StoreError::Duplicate { .. }) => {
                let e = AuthError::Failed(format!("user {} already exists", user.name));
                return Err(failed(trail, &who, &action, &user.group_regex, e));
            }
            Err(e) => return Err(e.into()),
        }
    }
    done(trail, &who, &action, &row.group_regex)?;
    Ok(UserInfo::of(&row, &LogonPolicy::default(), SealState::Intact))
}

/// The row `user` is stored as (the password hashed; not sealed yet), after checking every field. [`add_user`]
/// uses it; so can a restore of the users table.
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
        failed: 0,
        last_failed: 0,
        mac: Vec::new(),
    })
}

/// Seals a users row restored from a whole-store backup (whose MAC the HSM checked).
pub fn seal_restored(sealer: &dyn crate::backup::format::Sealer, row: &mut UserRow) -> crate::error::Result<()> {
    row.mac = sealer.seal(&seal_input(row))?;
    Ok(())
}

/// Deletes a user; needs [`Need::UserAdmin`]. Refused if no user administrator would remain.
pub fn delete_user(trail: &Trail, logons: &Logons, name: &str) -> Result<()> {
    let action = format!("user delete {name}");
    if let Err(denied) = logons.require(Need::UserAdmin) {
        let reason = format!("{action} denied: {}", denied.doing("user administration"));
        return Err(refused(trail, logons, &action, "", &reason));
    }
    // The check and the deletion are one transaction: two deletions at once cannot remove the last two
    // administrators. Only sealed rows count: a row a writer of the store inserted is no administrator.
    let admins_remain = |rest: &[UserRow]| {
        rest.iter()
            .filter(|u| matches!(seal_state(trail, u), Ok(SealState::Intact)))
            .filter_map(|u| Perm::parse(&u.perm).ok())
            .map(|p| u32::from(p.level(7)))
            .sum::<u32>()
            >= 1
    };
    match trail.store.user_delete_if(name, &admins_remain)? {
        UserDelete::NotFound => {
            Err(failed(trail, &logons.who(), &action, "", AuthError::Failed(format!("no user {name}"))))
        }
        UserDelete::Refused(victim) => {
            let reason = format!(
                "{action} denied: it would leave no user administrator (slot 7 ≥ 1, e.g. 10000000); add another first"
            );
            Err(refused(trail, logons, &action, &victim.group_regex, &reason))
        }
        UserDelete::Deleted(victim) => done(trail, &logons.who(), &action, &victim.group_regex),
    }
}

/// Changes a user's password or key (and so possibly how the user logs on): by a user administrator, or by
/// the user while logged on.
pub fn change_credential(trail: &Trail, logons: &Logons, name: &str, credential: Credential) -> Result<()> {
    let action = format!("user passwd {name}");
    if !logons.is_logged_on(name) {
        if let Err(denied) = logons.require(Need::UserAdmin) {
            let reason = format!(
                "{action} denied: {} (or log on as {name} to change your own)",
                denied.doing("changing another user's credential")
            );
            return Err(refused(trail, logons, &action, "", &reason));
        }
    }
    let (auth, secret) = credential.stored()?;
    match update_user(trail, name, |u| {
        u.auth = auth.into();
        u.secret = secret.clone();
    }) {
        Ok(row) => done(trail, &logons.who(), &action, &row.group_regex),
        Err(e) => Err(failed(trail, &logons.who(), &action, "", e)),
    }
}

/// Clears a user's failed-logon count (and so a lockout); needs [`Need::UserAdmin`].
pub fn unlock_user(trail: &Trail, logons: &Logons, name: &str) -> Result<i64> {
    let action = format!("user unlock {name}");
    if let Err(denied) = logons.require(Need::UserAdmin) {
        let reason = format!("{action} denied: {}", denied.doing("user administration"));
        return Err(refused(trail, logons, &action, "", &reason));
    }
    let before = trail.store.user_get(name)?.map(|u| u.failed).unwrap_or(0);
    match update_user(trail, name, |u| {
        u.failed = 0;
        u.last_failed = 0;
    }) {
        Ok(row) => {
            trail
                .record(&logons.who(), &action, &row.group_regex, 0, &format!("ok: {before} failed logons cleared"))
                .map_err(|e| AuthError::Failed(format!("{action}: done, but {e}")))?;
            Ok(before)
        }
        Err(e) => Err(failed(trail, &logons.who(), &action, "", e)),
    }
}

/// Seals every users row written before users were sealed (schema version 5): once, by user
/// administrators (10000000) logged on with [`Logons::for_reseal`], and only while no row is sealed yet
/// (after that an unsealed row is refused for good: delete and re-add it). The names sealed.
pub fn reseal_users(trail: &Trail, logons: &Logons) -> Result<Vec<String>> {
    let action = "user reseal";
    if let Err(denied) = logons.require(Need::UserAdmin) {
        let reason = format!("{action} denied: {}", denied.doing("resealing the users"));
        return Err(refused(trail, logons, action, "", &reason));
    }
    let users = trail.store.user_list()?;
    if users.iter().any(|u| !u.mac.is_empty()) {
        let reason = format!(
            "{action} denied: users in {} are sealed already, so an unsealed row was not written by an earlier version: delete it (`p11shim user delete`) and add the user again",
            trail.store.describe()
        );
        return Err(refused(trail, logons, action, "", &reason));
    }
    let mut names = Vec::new();
    for user in users {
        let row = update_user(trail, &user.name, |_| {}).map_err(|e| failed(trail, &logons.who(), action, "", e))?;
        names.push(row.name);
    }
    trail
        .record(&logons.who(), action, "", 0, &format!("ok: sealed {}", names.join(", ")))
        .map_err(|e| AuthError::Failed(format!("{action}: done, but {e}")))?;
    Ok(names)
}

/// Every user, by name, without secrets, with the state of its seal. Needs no logon (as CryptoServer's
/// ListUsers).
pub fn list_users(trail: &Trail, policy: &LogonPolicy) -> Result<Vec<UserInfo>> {
    trail.store.user_list()?.iter().map(|row| Ok(UserInfo::of(row, policy, seal_state(trail, row)?))).collect()
}

/// Records a refusal and returns its error.
fn refused(trail: &Trail, logons: &Logons, action: &str, group: &str, reason: &str) -> AuthError {
    AuthError::Refused(trail.record_refusal(&logons.who(), action, group, reason))
}

/// Records a change that failed, and returns its error (with the audit failure, if any).
fn failed(trail: &Trail, who: &str, action: &str, group: &str, e: AuthError) -> AuthError {
    match trail.record(who, action, group, 0, &format!("failed: {e}")) {
        Ok(_) => e,
        Err(audit) => AuthError::Failed(format!("{e} (and {audit})")),
    }
}

/// Records a change that was made; if the log cannot take it, the command fails saying the change is done.
fn done(trail: &Trail, who: &str, action: &str, group: &str) -> Result<()> {
    trail
        .record(who, action, group, 0, "ok")
        .map(drop)
        .map_err(|e| AuthError::Failed(format!("{action}: done, but {e}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_challenge_is_as_long_as_challenge_len_says() {
        for name in ["a", "alice", &"x".repeat(32)] {
            assert_eq!(super::challenge(name).unwrap().len(), super::challenge_len(name), "{name}");
        }
    }
}
