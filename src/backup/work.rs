//! What backup, restore and verify share: the token they work on (a logged-in session, its MBK set), the
//! HSM-made MACs, who may do what, the conversion between key store rows and backup records, and the audit
//! trail.

use super::format::{Record, RecordKind, Sealer};
pub use super::mbk::HsmSealer;
use super::mbk::{self, MbkSet};
use crate::admin::{Pin, Token};
use crate::attrs::{Attr, Template};
use crate::audit::Trail;
use crate::config::{Config, Storage};
use crate::error::{Error, Result};
use crate::store::KeyRow;
use cryptoki_sys::*;

/// A logged-in session on the token a backup command works with, and that token's MBK set.
pub struct Work {
    pub token: Token,
    pub set: MbkSet,
    /// Whether the token is a database slot (restores insert rows) or not (restores make token objects).
    pub database: bool,
    /// The group of the token's own (HSM-resident) keys: its slot's default_group, else its label.
    pub slot_group: String,
    /// Where a restore into the token's own objects keeps its journal: the config file's directory.
    pub state_dir: std::path::PathBuf,
    /// The session is this command's own (not an application's): a restore may roll back an interrupted
    /// one with it, which looks at every object the session sees.
    pub own_session: bool,
}

/// The directory of the config file (the current directory for a bare file name): restore journals and
/// locks live there.
pub fn state_dir(config: &Config) -> std::path::PathBuf {
    match config.source.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    }
}

impl Work {
    /// Opens the token `label` of the config, logs the user in, finds the MBK set.
    pub fn open(config: &Config, label: &str, user_pin: &Pin) -> Result<Work> {
        let mut token = Token::open(config, label)?;
        token.login(CKU_USER, user_pin)?;
        Work::on(config, token, label, true)
    }

    /// Opens the token `label` without a login: enough for what needs only the MBK set's public keys (the
    /// MAC key that seals users and the audit log and checks stored rows; stored keys' blobs, which are
    /// wrapped already). Private objects of the token are out of sight then.
    pub fn open_public(config: &Config, label: &str) -> Result<Work> {
        Work::on(config, Token::open(config, label)?, label, true)
    }

    /// As `open_public`, without refusing a config whose other `[[slot]]`s name tokens the backend lacks
    /// (`p11shim status` reports those), and without making anything (a device MBK's seal key).
    pub fn open_public_lenient(config: &Config, label: &str) -> Result<Work> {
        Work::on(config, Token::open_lenient(config, label)?, label, false)
    }

    fn on(config: &Config, token: Token, label: &str, create: bool) -> Result<Work> {
        let set =
            mbk::find(token.backend, token.session, token.slot)?.ok_or_else(|| Error::Missing(mbk::missing(label)))?;
        let slot = config.slots.iter().find(|s| s.token == label);
        let mut work = Work {
            database: slot.is_some_and(|s| s.storage == Storage::Database),
            slot_group: slot.map(|s| s.default_group.clone()).unwrap_or_else(|| label.to_string()),
            state_dir: state_dir(config),
            own_session: true,
            token,
            set,
        };
        work.attach_seal(config, create)?;
        Ok(work)
    }

    /// Works with an application's logged-in session (the C interface).
    pub fn borrowed(config: &Config, token: Token) -> Result<Work> {
        let set = mbk::find(token.backend, token.session, token.slot)?
            .ok_or_else(|| Error::Missing(mbk::missing(&token.label)))?;
        let slot = config.slots.iter().find(|s| s.token == token.label);
        let mut work = Work {
            database: slot.is_some_and(|s| s.storage == Storage::Database),
            slot_group: slot.map(|s| s.default_group.clone()).unwrap_or_else(|| token.label.clone()),
            state_dir: state_dir(config),
            own_session: false,
            token,
            set,
        };
        work.attach_seal(config, true)?;
        Ok(work)
    }

    pub fn sealer(&self) -> HsmSealer<'_> {
        HsmSealer { backend: self.token.backend, session: self.token.session, set: &self.set }
    }

    /// The set whose MAC key checks a backup file with this header: the token's, or for a file a device MBK
    /// made, a copy of the token's device set that seals with the seal key the file carries (the file's MBK
    /// must be the device's: the fingerprints are compared before any record is read).
    pub fn file_set(&self, header: &super::format::Header) -> std::result::Result<MbkSet, super::error::BackupError> {
        match (&header.seal, self.set.is_device()) {
            (None, false) => Ok(self.set.clone()),
            (Some(seal), true) => Ok(mbk::device_seal_of(&self.set, seal.clone())),
            (seal, _) => Err(super::error::BackupError::Other(Error::Damaged(format!(
                "the backup was made with {}, but token {:?} uses {} ({})",
                if seal.is_some() { "an HSM's own (device) MBK" } else { "a p11shim MBK set" },
                self.token.label,
                if self.set.is_device() { "the HSM's own (device) MBK" } else { "a p11shim MBK set" },
                self.set.fingerprint
            )))),
        }
    }

    /// Attaches the key store's seal key to a device set, made if the store has none yet (see
    /// [`mbk::attach_seal`]); nothing for a set of objects.
    fn attach_seal(&mut self, config: &Config, create: bool) -> Result<()> {
        if !self.set.is_device() {
            return Ok(());
        }
        let store = crate::store::open_with(&config.store_url, &config.store)?;
        mbk::attach_seal(&mut self.set, self.token.backend, self.token.session, store.as_ref(), create)
    }

    /// Checks a key store row's MAC with this token's MAC key.
    pub fn row_intact(&self, row: &KeyRow) -> Result<bool> {
        self.sealer().check(&crate::vault::mac_input(row), &row.mac)
    }
}

/// Who may back up or restore which group: the users logged on for the command (the `p11shim` command's
/// `--logon`, or the P11SHIM_Logon calls of the C interface on a PKCS#11 session).
pub trait Authorizer {
    /// Ok when the group may be exported or imported; else the reason ("export denied: …").
    fn allow_group(&self, group: &str) -> std::result::Result<(), String>;
    /// Names of whoever is acting, for the audit trail.
    fn who(&self) -> String;
}

impl Authorizer for crate::auth::Logons {
    fn allow_group(&self, group: &str) -> std::result::Result<(), String> {
        self.require(crate::auth::Need::Group(group.to_string())).map_err(|d| d.to_string())
    }
    fn who(&self) -> String {
        crate::auth::Logons::who(self)
    }
}

/// A group filter: a regular expression that must match the whole group name.
pub fn group_filter(text: &str) -> Result<regex::Regex> {
    regex::Regex::new(&format!("^(?:{text})$"))
        .map_err(|e| Error::Other(format!("group filter {text:?} is not a valid regular expression: {e}")))
}

/// A record for a key store row (its secret is already wrapped under the MBK). Takes the row: a data
/// object's value or a long label is not copied.
pub fn record_of_row(row: KeyRow) -> Record {
    Record {
        kind: RecordKind::Stored,
        id: row.id,
        token: row.token,
        group: row.group,
        class: row.class,
        key_type: row.key_type,
        label: row.label,
        ckid: row.ckid,
        attrs: row.attrs,
        wrapped: row.wrapped,
        wrap_mech: row.wrap_mech,
        mbk: row.mbk,
    }
}

/// The key store row a record becomes on the token `token` (its MAC still to be made).
pub fn row_of_record(record: &Record, token: &str) -> KeyRow {
    KeyRow {
        id: record.id.clone(),
        token: token.to_string(),
        group: record.group.clone(),
        class: record.class,
        key_type: record.key_type,
        label: record.label.clone(),
        ckid: record.ckid.clone(),
        attrs: record.attrs.clone(),
        wrapped: record.wrapped.clone(),
        wrap_mech: record.wrap_mech,
        mbk: record.mbk.clone(),
        mac: Vec::new(),
        version: 1,
    }
}

/// The row id a record gets when restored into the database slot `token`: its own id on the token it came
/// from, else an id derived from the target token and that id. Ids are unique in the whole store, so a key
/// restored into a second database slot of the same store must not take (or, with --overwrite, replace) the
/// row of the slot it came from; deriving the id keeps a second restore into that slot finding it present.
pub fn restored_id(record: &Record, token: &str) -> String {
    if record.token == token {
        return record.id.clone();
    }
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"p11shim restored key id v1\0");
    for part in [token.as_bytes(), record.id.as_bytes()] {
        h.update((part.len() as u32).to_be_bytes());
        h.update(part);
    }
    hex::encode(&h.finalize()[..16])
}

/// A readable name for a record or key in reports: its label, id and group.
pub fn describe(label: &[u8], id: &str, group: &str) -> String {
    format!("{:?} (id {id}, group {group:?})", String::from_utf8_lossy(label))
}

/// Appends to the audit trail; a failure to record is an error of the command.
pub fn audit(trail: &Trail, who: &str, action: &str, group: &str, count: u64, result: &str) -> Result<()> {
    trail
        .record(who, action, group, count as i64, result)
        .map(|_| ())
        .map_err(|e| Error::Other(format!("cannot write the audit log: {e}")))
}

/// The token objects of the HSM that a backup may hold: keys, not the MBK set.
pub fn hsm_keys(work: &Work) -> Result<Vec<CK_OBJECT_HANDLE>> {
    let t = &work.token;
    let all = t.backend.find(t.session, &Template(vec![Attr::bool(CKA_TOKEN, true)]))?;
    let mut keys = Vec::new();
    let own = work.set.handles();
    for h in all {
        if own.contains(&h) {
            continue;
        }
        let class = t.backend.attributes(t.session, h, &[CKA_CLASS])?.ulong(CKA_CLASS);
        if matches!(class, Some(CKO_SECRET_KEY | CKO_PRIVATE_KEY | CKO_PUBLIC_KEY)) {
            keys.push(h);
        }
    }
    Ok(keys)
}

/// A stable id for a key that lived in the HSM: from its token, class, label and CKA_ID, so that restoring
/// the same backup twice finds it present.
pub fn hsm_key_id(token: &str, class: u64, label: &[u8], ckid: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"p11shim hsm key id v1\0");
    for part in [token.as_bytes(), &class.to_be_bytes(), label, ckid] {
        h.update((part.len() as u32).to_be_bytes());
        h.update(part);
    }
    hex::encode(&h.finalize()[..16])
}
