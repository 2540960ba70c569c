//! The key store: rows of MBK-wrapped keys in an RDBMS. SQLite (embedded, the default) and PostgreSQL (shared
//! between hosts) behind one trait. The store knows nothing about PKCS#11 handles or the HSM: a row is bytes
//! and numbers; the vault (src/vault) gives them meaning and checks their MAC.

use std::fmt;

pub mod changes;
mod pgtls;
mod postgres;
pub mod sqlite;

/// One stored key (or public key) as kept in a row.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRow {
    /// 32 lowercase hex digits (128 random bits), chosen by the vault; primary key.
    pub id: String,
    /// Label of the backend token the key belongs to (a database slot).
    pub token: String,
    /// The key's group (CKA_P11SHIM_GROUP).
    pub group: String,
    /// CKA_CLASS, CKA_KEY_TYPE, CKA_LABEL, CKA_ID: copied out of `attrs` so that finds can use an index.
    pub class: u64,
    pub key_type: u64,
    pub label: Vec<u8>,
    pub ckid: Vec<u8>,
    /// The non-sensitive attributes, serialized by the vault (opaque here).
    pub attrs: Vec<u8>,
    /// The secret part wrapped under the MBK; empty for public keys.
    pub wrapped: Vec<u8>,
    /// The PKCS#11 mechanism that wrapped it (CKM_AES_KEY_WRAP_PAD 0x210A or CKM_AES_KEY_WRAP_KWP 0x210B).
    pub wrap_mech: u64,
    /// Fingerprint of the MBK that wrapped it.
    pub mbk: String,
    /// MAC computed inside the HSM over all fields above (the vault defines the exact bytes).
    pub mac: Vec<u8>,
    /// Bumped by every update; lets `update` refuse a lost update.
    pub version: i64,
}

impl fmt::Debug for KeyRow {
    // Never print the wrapped blob or the MAC in full: logs stay short, and a blob is nobody's business.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRow")
            .field("id", &self.id)
            .field("token", &self.token)
            .field("group", &self.group)
            .field("class", &self.class)
            .field("label", &String::from_utf8_lossy(&self.label))
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// What a find asks for: every `Some` field must match exactly; `token` always.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyQuery {
    pub token: String,
    pub group: Option<String>,
    pub class: Option<u64>,
    pub key_type: Option<u64>,
    pub label: Option<Vec<u8>>,
    pub ckid: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or answered with an I/O-level failure (maps to CKR_DEVICE_ERROR).
    /// The message names the store (url without password) and the cause.
    #[error("key store {store} unavailable: {cause}")]
    Unavailable { store: String, cause: String },
    /// A row with this id already exists.
    #[error("key store {store}: a key with id {id} already exists")]
    Duplicate { store: String, id: String },
    /// The schema is newer than this build knows, or the database content is not ours.
    #[error("key store {store}: {cause}")]
    Schema { store: String, cause: String },
    /// The configured URL cannot be used.
    #[error("key store url {url:?}: {cause}")]
    Url { url: String, cause: String },
    /// What the HSM seals (an audit entry) could not be sealed; nothing was written.
    #[error("{0}")]
    Sealing(String),
    /// The database refused a value over one of its limits (PostgreSQL: a label too long for its index).
    #[error("key store {store}: a value is over the database's limits: {cause}")]
    Limit { store: String, cause: String },
    /// A key row that cannot be read: a column holds a value of the wrong type (or NULL), written outside
    /// p11shim. The other rows are unaffected.
    #[error("key store {store}: row {} cannot be read ({}); it was changed outside p11shim: restore the key from a backup or delete the row", row.id, row.cause)]
    BadRow { store: String, row: Box<BadRow> },
}

impl StoreError {
    /// What kind of failure this is (see [`crate::error::ErrorKind`]).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            StoreError::Unavailable { .. } => ErrorKind::Unavailable,
            StoreError::BadRow { .. } => ErrorKind::Damaged,
            StoreError::Schema { .. }
            | StoreError::Limit { .. }
            | StoreError::Sealing(_)
            | StoreError::Duplicate { .. }
            | StoreError::Url { .. } => ErrorKind::Failed,
        }
    }
}

pub type StoreResult<T> = std::result::Result<T, StoreError>;

/// A key row as a scan reads it: the row, or one that cannot be read.
#[derive(Debug)]
pub enum RowRead {
    Row(KeyRow),
    Bad(BadRow),
}

/// A key row that cannot be read: its id (or a description of it when even the id cannot be read), its token
/// and group when those columns can be read, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    pub id: String,
    pub token: Option<String>,
    pub group: Option<String>,
    pub cause: String,
}

/// The rows of a find that can be read; each one that cannot is left out with one log line naming it, so that
/// one row changed outside p11shim does not make every find on its token fail.
pub(crate) fn readable(store: &str, rows: Vec<RowRead>) -> Vec<KeyRow> {
    rows.into_iter()
        .filter_map(|read| match read {
            RowRead::Row(row) => Some(row),
            RowRead::Bad(bad) => {
                crate::warn!("key store {store}: row {} cannot be read ({}): left out of the find", bad.id, bad.cause);
                None
            }
        })
        .collect()
}

/// A key store. Implementations are shared between threads; no method holds a lock while another method of
/// the same store waits on the database for longer than one statement. Every method is one transaction.
pub trait KeyStore: Send + Sync {
    /// A printable name: "sqlite:/path/keys.db" or the PostgreSQL url with any password removed.
    fn describe(&self) -> String;
    /// Inserts a new row (its `version` is stored as given, normally 1). Duplicate id → `Duplicate`.
    fn insert(&self, row: &KeyRow) -> StoreResult<()>;
    /// The row with this id, if any.
    fn get(&self, id: &str) -> StoreResult<Option<KeyRow>>;
    /// Every row matching `query`, ordered by id. Uses indexes: a find by label among 100k rows is ≤ 1 ms.
    fn find(&self, query: &KeyQuery) -> StoreResult<Vec<KeyRow>>;
    /// Replaces the row `row.id` if its stored version is `row.version - 1`; false if the row is gone or
    /// was changed meanwhile (nothing written then).
    fn update(&self, row: &KeyRow) -> StoreResult<bool>;
    /// Deletes the row; false if it was not there.
    fn delete(&self, id: &str) -> StoreResult<bool>;
    /// A number that changes whenever any process or host commits a change to the keys table (insert,
    /// update, delete). Cheap (no round trip for SQLite: PRAGMA data_version on a pooled connection
    /// combined with a per-store in-process counter, ~1 µs; for PostgreSQL: a counter bumped by
    /// LISTEN/NOTIFY on a background connection, falling back to "changed every time" while that
    /// connection is down). It may also change without a commit (a new pooled connection, a reconnect):
    /// equal values mean "nothing changed", different ones only "re-validate". For PostgreSQL another
    /// host's commit shows up with the notification's latency (normally well under a millisecond).
    fn generation(&self) -> StoreResult<u64>;
    /// Whether row `id` at `version`, known current at generation `at`, is known current at generation
    /// `now` too (both from `generation()`), so that it need not be read again. Equal generations always
    /// are; otherwise an engine that knows which rows changed in between (PostgreSQL: notifications name
    /// them) can say so. False means "read the row again", never "it changed".
    fn unchanged_since(&self, id: &str, version: i64, at: u64, now: u64) -> bool {
        let _ = (id, version);
        at == now
    }
    /// While the store's change feed is down: the moment it went down, if row `id` at `version`, known
    /// current at generation `at`, was still current then (no change concerning it was heard between `at`
    /// and that moment). None when the feed is up, or the engine has none, or the row may have changed.
    fn current_when_lost(&self, id: &str, version: i64, at: u64) -> Option<std::time::Instant> {
        let _ = (id, version, at);
        None
    }
    /// Whether a row with this id exists (a primary-key lookup).
    fn exists(&self, id: &str) -> StoreResult<bool>;

    // ---- whole-store iteration, bulk changes, users, audit -------------------------------------------------

    /// Calls `f` with every key row, ordered by (token, id), streaming: memory stays flat however many rows
    /// there are (SQLite: one statement stepping; PostgreSQL: a portal/cursor fetching in batches). One
    /// consistent snapshot. `f` returning an error stops the scan and returns that error; so does a row
    /// that cannot be read ([`StoreError::BadRow`], naming it): use `scan_rows` to go on past such rows.
    fn scan(&self, f: &mut dyn FnMut(KeyRow) -> StoreResult<()>) -> StoreResult<()> {
        let store = self.describe();
        self.scan_rows(&mut |read| match read {
            RowRead::Row(row) => f(row),
            RowRead::Bad(bad) => Err(StoreError::BadRow { store: store.clone(), row: Box::new(bad) }),
        })
    }
    /// As `scan`, but a row that cannot be read is handed to `f` as [`RowRead::Bad`] and the scan goes on.
    fn scan_rows(&self, f: &mut dyn FnMut(RowRead) -> StoreResult<()>) -> StoreResult<()> {
        self.scan(&mut |row| f(RowRead::Row(row)))
    }
    /// The number of key rows per (token, group), ordered by token and group.
    fn key_counts(&self) -> StoreResult<Vec<(String, String, u64)>> {
        let mut counts = std::collections::BTreeMap::<(String, String), u64>::new();
        self.scan_rows(&mut |read| {
            if let RowRead::Row(row) = read {
                *counts.entry((row.token, row.group)).or_default() += 1;
            }
            Ok(())
        })?;
        Ok(counts.into_iter().map(|((t, g), n)| (t, g, n)).collect())
    }
    /// The schema version of the store (see [`SCHEMA_VERSION`]).
    fn schema_version(&self) -> StoreResult<i64> {
        Ok(SCHEMA_VERSION)
    }
    /// A transaction for bulk changes (restore): nothing is visible to others until `commit`; dropping it
    /// without `commit` rolls everything back. Holds one connection for its life (SQLite: BEGIN IMMEDIATE,
    /// so other writers wait until it ends).
    fn begin(&self) -> StoreResult<Box<dyn StoreTx + '_>>;

    /// Users: insert a new user; `Duplicate` (id = name) if the name exists.
    fn user_insert(&self, user: &UserRow) -> StoreResult<()>;
    /// Inserts `user` only if there is no user at all (the first user, whom the SO PIN creates): true if
    /// inserted, false if a user exists (nothing written). Concurrent calls, from any process or host, make
    /// one first user.
    fn user_insert_first(&self, user: &UserRow) -> StoreResult<bool>;
    /// Replaces a user if its stored version is `user.version - 1`; false if gone or changed meanwhile.
    fn user_update(&self, user: &UserRow) -> StoreResult<bool>;
    fn user_get(&self, name: &str) -> StoreResult<Option<UserRow>>;
    /// All users, ordered by name (byte order).
    fn user_list(&self) -> StoreResult<Vec<UserRow>>;
    /// Deletes the user; false if it was not there.
    fn user_delete(&self, name: &str) -> StoreResult<bool>;
    /// Deletes the user if `allowed` accepts the users that would remain, all in one transaction that
    /// concurrent calls (and [`KeyStore::user_insert_first`]) from any process or host wait for: so two
    /// deletions at once cannot together break what each checked (at least one user administrator).
    fn user_delete_if(&self, name: &str, allowed: &dyn Fn(&[UserRow]) -> bool) -> StoreResult<UserDelete>;

    /// Appends to the audit log in one transaction that serializes appenders (SQLite: BEGIN IMMEDIATE;
    /// PostgreSQL: an advisory transaction lock): reads the last entry, and inserts `entry` with
    /// `seq = last.seq + 1` (1 for the first) and `prev = last.hash` (32 zero bytes for the first), its
    /// `hash` computed by [`AuditEntry::compute_hash`]. Returns the entry as stored.
    /// `seal` makes the entry's MAC (see [`AuditSeal`]).
    fn audit_append(&self, entry: AuditDraft, seal: AuditSeal) -> StoreResult<AuditEntry>;
    /// Every audit entry in `seq` order, streaming like `scan`.
    fn audit_scan(&self, f: &mut dyn FnMut(AuditEntry) -> StoreResult<()>) -> StoreResult<()>;

    // ---- seal keys of device MBKs (see backup::mbk::Device) ---------------------------------------------

    /// The seal key blob kept for the device MBK with this fingerprint, if any.
    fn seal_key(&self, mbk: &str) -> StoreResult<Option<Vec<u8>>>;
    /// Stores the seal key blob for `mbk` unless one is there already (then nothing is written): true if
    /// stored. Concurrent calls from any process or host store one.
    fn seal_key_insert(&self, mbk: &str, blob: &[u8]) -> StoreResult<bool>;
    /// Whether any key row or audit entry is sealed under the MBK with this fingerprint.
    fn sealed_under(&self, mbk: &str) -> StoreResult<bool>;
    /// Every seal key: (fingerprint, blob), ordered by fingerprint.
    fn seal_keys(&self) -> StoreResult<Vec<(String, Vec<u8>)>>;
}

/// A bulk-change transaction on the key rows (see [`KeyStore::begin`]).
pub trait StoreTx {
    /// Inserts a row; `Duplicate` if its id exists (the transaction stays usable).
    fn insert(&mut self, row: &KeyRow) -> StoreResult<()>;
    /// Inserts or replaces the row with this id, whatever its version.
    fn replace(&mut self, row: &KeyRow) -> StoreResult<()>;
    /// Whether a row with this id exists (as this transaction sees it).
    fn exists(&mut self, id: &str) -> StoreResult<bool>;
    /// Makes every change visible at once (and bumps `generation`).
    fn commit(self: Box<Self>) -> StoreResult<()>;
}

/// A user of the shim's permission model, kept in the store.
#[derive(Clone, PartialEq, Eq)]
pub struct UserRow {
    pub name: String,
    /// 8 hex digits, one permission level per user-group slot; slot 0 is the rightmost digit.
    pub perm: String,
    /// A regular expression over key groups (the CXI_GROUP of a CryptoServer user).
    pub group_regex: String,
    /// "password" (then `secret` is an argon2id PHC string) or "sign" (then `secret` is the 32-byte
    /// Ed25519 public key).
    pub auth: String,
    pub secret: Vec<u8>,
    /// Bumped by every update.
    pub version: i64,
    /// Failed logons in a row (cleared by a successful one, or by an administrator).
    pub failed: i64,
    /// When the last failed logon happened, in milliseconds since the Unix epoch (0: none).
    pub last_failed: i64,
    /// HMAC made in the HSM over every column above (see `auth::seal_input`); empty in a row written before
    /// schema version 5, which no logon accepts until an administrator reseals it.
    pub mac: Vec<u8>,
}

impl fmt::Debug for UserRow {
    // The secret is a password hash or a public key: neither belongs in a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserRow")
            .field("name", &self.name)
            .field("perm", &self.perm)
            .field("group_regex", &self.group_regex)
            .field("auth", &self.auth)
            .field("version", &self.version)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// What [`KeyStore::user_delete_if`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserDelete {
    Deleted(UserRow),
    NotFound,
    /// Not deleted: the users that would remain were not allowed.
    Refused(UserRow),
}

/// Splits `users` into the one named `name` and the others, for [`KeyStore::user_delete_if`].
fn split_user(users: Vec<UserRow>, name: &str) -> (Option<UserRow>, Vec<UserRow>) {
    let (victim, rest): (Vec<UserRow>, Vec<UserRow>) = users.into_iter().partition(|u| u.name == name);
    (victim.into_iter().next(), rest)
}

/// An audit entry before the store places it in the chain.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct AuditDraft {
    /// RFC 3339 UTC.
    pub time: String,
    /// Who: the logged-on user names, comma-separated ("SO" for the token SO, "-" for nobody).
    pub who: String,
    /// What: "backup", "restore", "verify", "user add", "refused: backup", …
    pub action: String,
    /// The group filter or group concerned ("" when none).
    pub group: String,
    /// How many keys.
    pub count: i64,
    /// "ok", or the error.
    pub result: String,
    /// The security mode the operation ran in ("standard", "fips", "cc"); empty in entries written before
    /// schema version 5.
    pub mode: String,
}

/// An audit entry as stored: the draft, its place in the chain and its hash.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct AuditEntry {
    pub seq: i64,
    pub draft: AuditDraft,
    /// The previous entry's hash (32 zero bytes for the first).
    pub prev: Vec<u8>,
    /// SHA-256 over `prev` and the fields (see `compute_hash`).
    pub hash: Vec<u8>,
    /// HMAC made in the HSM over `hash` (see `audit::seal_input`): what a writer of the database cannot make.
    /// Empty in entries written before schema version 5 (or before the token had an MBK set).
    pub mac: Vec<u8>,
    /// The fingerprint of the MBK set whose MAC key made `mac` (a store may serve tokens of several sets).
    pub mbk: String,
}

impl AuditEntry {
    /// SHA-256("p11shim audit v1" | seq | prev | time | who | action | group | count | result), each field
    /// length-prefixed (u32 BE); entries that record a mode use "p11shim audit v2" and add the mode. Editing,
    /// removing or reordering an entry breaks the chain after it.
    pub fn compute_hash(seq: i64, prev: &[u8], d: &AuditDraft) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(if d.mode.is_empty() { &b"p11shim audit v1\0"[..] } else { &b"p11shim audit v2\0"[..] });
        let mut field = |b: &[u8]| {
            h.update((b.len() as u32).to_be_bytes());
            h.update(b);
        };
        field(&seq.to_be_bytes());
        field(prev);
        field(d.time.as_bytes());
        field(d.who.as_bytes());
        field(d.action.as_bytes());
        field(d.group.as_bytes());
        field(&d.count.to_be_bytes());
        field(d.result.as_bytes());
        if !d.mode.is_empty() {
            field(d.mode.as_bytes());
        }
        h.finalize().to_vec()
    }
}

/// Opens the store named by `url`: `sqlite:PATH` (relative paths are taken as given; the caller resolves
/// them against the config file) or `postgres://…` / `postgresql://…`. Creates the schema or migrates it
/// to the current version (versioned migrations; safe when several processes open the store at once).
pub fn open(url: &str) -> StoreResult<Box<dyn KeyStore>> {
    open_with(url, &StoreOptions::default())
}

/// The `[store]` settings a store is opened with, beside its URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// The most connections to a PostgreSQL server one process opens for statements (its change listener
    /// has one more); a call finding all in use waits for one.
    pub max_connections: usize,
    /// How long after a key was last confirmed current it keeps working while the store cannot be reached.
    pub outage_grace: std::time::Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_connections: crate::config::DEFAULT_MAX_CONNECTIONS,
            outage_grace: crate::config::DEFAULT_OUTAGE_GRACE,
        }
    }
}

/// Opens the store at `url` with `options`.
pub fn open_with(url: &str, options: &StoreOptions) -> StoreResult<Box<dyn KeyStore>> {
    if let Some(path) = url.strip_prefix("sqlite:") {
        Ok(Box::new(sqlite::SqliteStore::open(std::path::Path::new(path))?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Box::new(postgres::PostgresStore::open(url, options.max_connections)?))
    } else {
        Err(StoreError::Url { url: redact(url), cause: "use sqlite:PATH or postgres://USER@HOST:PORT/DB".into() })
    }
}

/// `url` with any password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    let url = redact_password_param(url);
    if let Some((scheme, rest)) = url.split_once("://") {
        // The first '@' ends the credentials, as in the postgres crate's own URL parser: whatever it would take
        // as the password is what must be hidden, even if the password itself contains '/' or '?'.
        if let Some((userinfo, host)) = rest.split_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
    }
    url
}

/// libpq-style URLs may also carry the password as a query parameter (`?password=…`).
fn redact_password_param(url: &str) -> String {
    let Some((head, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => param.to_string(),
        })
        .collect();
    format!("{head}?{}", params.join("&"))
}

/// The schema version this build creates and understands. Each engine keeps one migration per version:
/// 1 keys, 2 users (and an index for whole-store scans), 3 audit, 4 notifications naming the changed row
/// (PostgreSQL; nothing to change in SQLite), 5 users sealed by the HSM with failed-logon counters, audit
/// entries sealed by the HSM and recording the mode.
pub const SCHEMA_VERSION: i64 = 6;

/// The columns of `users` in the order both engines read and write them.
const USER_COLUMNS: &str = "name, perm, group_regex, auth, secret, version, failed, last_failed, mac";

/// The columns of `audit` in the order both engines read and write them.
const AUDIT_COLUMNS: &str = "seq, time, who, action, grp, count, result, prev, hash, mode, mac, mbk";

/// What seals an audit entry as it is appended: called inside the appending transaction with the entry's
/// hash and whether the entry before it is sealed; its MAC and the fingerprint of the MBK set that made it
/// (both empty for an unsealed entry), or an error that aborts the append.
pub type AuditSeal<'a> = &'a dyn Fn(&[u8], bool) -> StoreResult<(Vec<u8>, String)>;

/// The `prev` of the first audit entry.
const AUDIT_GENESIS: [u8; 32] = [0; 32];

/// Places `draft` after the entry (seq, hash, mac) `last` (None for an empty log) and seals it.
fn chain(last: Option<(i64, Vec<u8>, Vec<u8>)>, draft: AuditDraft, seal: AuditSeal) -> StoreResult<AuditEntry> {
    let (seq, prev, last_sealed) = match last {
        Some((seq, hash, mac)) => (seq + 1, hash, !mac.is_empty()),
        None => (1, AUDIT_GENESIS.to_vec(), false),
    };
    let hash = AuditEntry::compute_hash(seq, &prev, &draft);
    let (mac, mbk) = seal(&hash, last_sealed)?;
    Ok(AuditEntry { seq, draft, prev, hash, mac, mbk })
}

/// The columns of `keys` in the order both engines read and write them.
const COLUMNS: &str = "id, token, grp, class, key_type, label, ckid, attrs, wrapped, wrap_mech, mbk, mac, version";

/// PKCS#11 numbers are CK_ULONG (u64 here) but both engines store signed 64-bit integers: keep the bit
/// pattern so that vendor values above i64::MAX round-trip and still compare equal in a WHERE clause.
fn to_db(n: u64) -> i64 {
    n as i64
}

fn from_db(n: i64) -> u64 {
    n as u64
}

/// One value bound to a find's WHERE clause.
enum Param<'a> {
    Text(&'a str),
    Int(i64),
    Blob(&'a [u8]),
}

/// `SELECT … FROM keys WHERE …` for `query` and its parameters, with `placeholder(n)` naming the n-th
/// (1-based) parameter in the engine's syntax. Each field is an equality on an indexed (token, …) prefix.
/// `order` is the ORDER BY expression: SQLite needs `+id` (the unary plus keeps its planner from choosing the
/// (token, id) index to avoid the sort, which turned a find by label into a scan of every row).
fn find_sql<'a>(query: &'a KeyQuery, placeholder: impl Fn(usize) -> String, order: &str) -> (String, Vec<Param<'a>>) {
    let mut params = vec![Param::Text(&query.token)];
    let mut sql = format!("SELECT {COLUMNS} FROM keys WHERE token = {}", placeholder(1));
    let mut add = |column: &str, param: Param<'a>| {
        params.push(param);
        sql.push_str(&format!(" AND {column} = {}", placeholder(params.len())));
    };
    if let Some(group) = &query.group {
        add("grp", Param::Text(group));
    }
    if let Some(class) = query.class {
        add("class", Param::Int(to_db(class)));
    }
    if let Some(key_type) = query.key_type {
        add("key_type", Param::Int(to_db(key_type)));
    }
    if let Some(label) = &query.label {
        add("label", Param::Blob(label));
    }
    if let Some(ckid) = &query.ckid {
        add("ckid", Param::Blob(ckid));
    }
    sql.push_str(" ORDER BY ");
    sql.push_str(order);
    (sql, params)
}

fn newer_schema(store: &str, found: i64) -> StoreError {
    StoreError::Schema {
        store: store.to_string(),
        cause: format!(
            "schema version {found} is newer than this build of p11shim understands (version {SCHEMA_VERSION}); \
             upgrade p11shim"
        ),
    }
}

fn foreign_schema(store: &str) -> StoreError {
    StoreError::Schema {
        store: store.to_string(),
        cause: "a table named keys exists but no schema_version: not a p11shim key store".into(),
    }
}

#[cfg(test)]
mod tests;
