//! The shared key store: PostgreSQL, for several hosts using the same keys.
//!
//! Connections come from a small pool; a connection that fails at the connection level is closed along with
//! every idle one (a server restart or a network cut kills them all), and the next call connects afresh, so
//! the application recovers on its own when the server returns. A background thread LISTENs for the
//! notifications a trigger sends on every change to `keys`, which makes [`KeyStore::generation`] free of
//! round trips.

use super::changes::{Change, ChangeLog};
use super::pgtls::{self, Tls};
use super::{
    chain, find_sql, foreign_schema, from_db, newer_schema, redact, split_user, to_db, AuditDraft, AuditEntry, BadRow,
    KeyQuery, KeyRow, KeyStore, Param, RowRead, StoreError, StoreResult, StoreTx, UserDelete, UserRow, AUDIT_COLUMNS,
    COLUMNS, SCHEMA_VERSION, USER_COLUMNS,
};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, Config, Statement};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

/// Used when the URL sets no `connect_timeout`: an unreachable host must not hang the application.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Used when the URL sets no `tcp_user_timeout` (see `open`).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// The channel the trigger notifies on.
const CHANNEL: &str = "p11shim_keys";
/// Serializes migrations between processes (pg_advisory_xact_lock key: "p11shim" in ASCII).
const MIGRATION_LOCK: i64 = 0x0070_3131_7368_696d;
/// Serializes audit appenders between processes and hosts ("p11audit" in ASCII).
const AUDIT_LOCK: i64 = 0x7031_3161_7564_6974;
/// Serializes the creation of the first user and deletions of users between processes and hosts
/// ("p11users" in ASCII).
const USERS_LOCK: i64 = 0x7031_3175_7365_7273;
/// Rows fetched per round trip by the streaming reads (scan, audit_scan).
const SCAN_BATCH: i32 = 1000;
/// After a connection attempt that failed slowly (SLOW_FAILURE or more: a host that does not answer, rather
/// than one that refuses), calls within RETRY_AFTER fail at once with its error instead of waiting as long
/// again: one attempt a second however many calls a process serves, and each call quick to fail (which is
/// what keys used under outage_grace need). Quick refusals are tried again at every call, so a server that
/// returns is used by the first call after.
const SLOW_FAILURE: Duration = Duration::from_millis(100);
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Reconnect delays of the listener: doubled from MIN to MAX while the server stays away.
const LISTEN_BACKOFF_MIN: Duration = Duration::from_millis(100);
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long the listener waits for a notification before it looks whether the store is being dropped. A
/// store being dropped wakes it at once with a notification on its own channel (see `Drop`); this bounds the
/// wait only when that notification cannot be sent (the server is unreachable). One wake-up a second of an
/// idle process, microseconds each.
const LISTEN_POLL: Duration = Duration::from_secs(1);
/// How long dropping the store waits for the server to answer before it notifies its listener (else the
/// listener ends at its next LISTEN_POLL).
const WAKE_CHECK: Duration = Duration::from_millis(500);
/// While the server is away, how often the listener's backoff sleep looks whether the store is being dropped.
const STOP_SLICE: Duration = Duration::from_millis(100);
/// After this long without traffic the listener pings the server: a silently dropped connection (no RST)
/// would otherwise look like a quiet database forever.
const LISTEN_PING_AFTER: Duration = Duration::from_secs(10);

/// One migration per schema version, applied in order inside the opening transaction.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"CREATE TABLE keys (
        id        TEXT COLLATE "C" PRIMARY KEY,
        token     TEXT NOT NULL,
        grp       TEXT NOT NULL,
        class     BIGINT NOT NULL,
        key_type  BIGINT NOT NULL,
        label     BYTEA NOT NULL,
        ckid      BYTEA NOT NULL,
        attrs     BYTEA NOT NULL,
        wrapped   BYTEA NOT NULL,
        wrap_mech BIGINT NOT NULL,
        mbk       TEXT NOT NULL,
        mac       BYTEA NOT NULL,
        version   BIGINT NOT NULL,
        created   TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE INDEX keys_token_label ON keys (token, label);
    CREATE INDEX keys_token_ckid ON keys (token, ckid);
    CREATE INDEX keys_token_grp ON keys (token, grp);
    CREATE INDEX keys_token_class ON keys (token, class);
    -- Delivered at commit, so a listener never hears of a change it cannot yet read. Identical
    -- notifications of one transaction are folded into one.
    CREATE FUNCTION p11shim_keys_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('p11shim_keys', '');
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER keys_notify AFTER INSERT OR UPDATE OR DELETE ON keys
        FOR EACH ROW EXECUTE FUNCTION p11shim_keys_notify();"#,
    ),
    (
        2,
        r#"CREATE TABLE users (
        name        TEXT COLLATE "C" PRIMARY KEY,
        perm        TEXT NOT NULL,
        group_regex TEXT NOT NULL,
        auth        TEXT NOT NULL,
        secret      BYTEA NOT NULL,
        version     BIGINT NOT NULL,
        created     TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    -- scan() walks the keys in (token, id) byte order through a cursor without sorting them all first.
    CREATE INDEX keys_token_id ON keys (token COLLATE "C", id);"#,
    ),
    (
        3,
        r#"CREATE TABLE audit (
        seq    BIGINT PRIMARY KEY,
        time   TEXT NOT NULL,
        who    TEXT NOT NULL,
        action TEXT NOT NULL,
        grp    TEXT NOT NULL,
        count  BIGINT NOT NULL,
        result TEXT NOT NULL,
        prev   BYTEA NOT NULL,
        hash   BYTEA NOT NULL
    );"#,
    ),
    (
        4,
        r#"-- The notification names the row, so a listener can tell which rows it holds are still current.
    CREATE OR REPLACE FUNCTION p11shim_keys_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('p11shim_keys', CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END);
        RETURN NULL;
    END
    $$;"#,
    ),
    (
        5,
        r#"ALTER TABLE users ADD COLUMN failed BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN last_failed BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN mac BYTEA NOT NULL DEFAULT '\x'::bytea;
    ALTER TABLE audit ADD COLUMN mode TEXT NOT NULL DEFAULT '',
        ADD COLUMN mac BYTEA NOT NULL DEFAULT '\x'::bytea,
        ADD COLUMN mbk TEXT NOT NULL DEFAULT '';"#,
    ),
    (
        6,
        r#"CREATE TABLE seal_keys (
        mbk     TEXT PRIMARY KEY NOT NULL,
        blob    BYTEA NOT NULL,
        created TIMESTAMPTZ NOT NULL DEFAULT now()
    );"#,
    ),
];

pub struct PostgresStore {
    config: Config,
    /// Plaintext or TLS, as the URL's sslmode and certificates say.
    tls: Tls,
    /// The URL without its password, the name in every message.
    name: String,
    /// Connections not in use. The mutex guards only the push and pop, never a statement.
    idle: Mutex<Vec<Pooled>>,
    /// How many connections are open (idle or in use), at most `[store] max_connections`.
    slots: Arc<Slots>,
    /// The last failed connection attempt: when, and the error (see RETRY_AFTER).
    failed: Mutex<Option<(Instant, String)>>,
    /// Shared with the listener thread, which holds only a weak reference.
    changes: Arc<Changes>,
    /// Stopped and joined when the store is dropped (C_Finalize): no thread of the shim outlives it.
    listener: Option<std::thread::JoinHandle<()>>,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.changes.stop.store(true, Ordering::SeqCst);
        // Wakes the listener now rather than at its next LISTEN_POLL, through a connection that answers now (a
        // bounded check first: a server gone silent must not hold C_Finalize up).
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        if let Some(mut pooled) = idle.filter(|_| self.changes.listening.load(Ordering::SeqCst)) {
            let tls = &self.tls;
            if tls.clean(|| pooled.client.is_valid(WAKE_CHECK)).is_ok() {
                let _ = tls.clean(|| pooled.client.batch_execute(&format!("NOTIFY {}", self.changes.wake)));
            }
        }
        if let Some(thread) = self.listener.take() {
            let _ = thread.join();
        }
    }
}

/// What the listener thread tells the store.
struct Changes {
    /// Bumped for each notification, for each commit of this store, and when the listener reconnects; with
    /// the row each change concerns when that is known.
    log: ChangeLog,
    /// Whether the listener is connected and LISTENing; while it is not, every generation is new.
    listening: AtomicBool,
    /// While the listener is down: the last generation and the moment before it went down.
    lost: Mutex<Option<(u64, Instant)>>,
    /// The server process ids of this store's open connections: the notifications of their commits are
    /// this store's own writes, already counted (with the version they wrote) when they committed. An id
    /// is removed when its connection closes, before the server can give it to another client.
    own: Mutex<HashSet<i32>>,
    /// Set when the store is dropped: the listener ends at its next wake-up.
    stop: AtomicBool,
    /// This store's own channel, on which its listener also listens: a notification there wakes it to stop.
    wake: String,
}

impl Changes {
    fn own(&self) -> std::sync::MutexGuard<'_, HashSet<i32>> {
        self.own.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lost(&self) -> std::sync::MutexGuard<'_, Option<(u64, Instant)>> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The listener is down: what it heard up to now is recorded before the generations start to say
    /// "changed" at every call.
    fn down(&self) {
        let mut lost = self.lost();
        if self.listening.load(Ordering::SeqCst) || lost.is_none() {
            *lost = Some((self.log.current(), Instant::now()));
        }
        self.listening.store(false, Ordering::SeqCst);
    }

    /// The listener is up again.
    fn up(&self) {
        let mut lost = self.lost();
        self.listening.store(true, Ordering::SeqCst);
        *lost = None;
    }
}

/// The count of open connections and its bound. Lock order: `open`, then `idle`.
struct Slots {
    open: Mutex<usize>,
    /// Signalled when a connection goes back to the pool or is closed.
    freed: Condvar,
    max: usize,
}

impl Slots {
    fn open(&self) -> std::sync::MutexGuard<'_, usize> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives up a slot (a connection closed, or one that could not be opened).
    fn release(&self) {
        let mut open = self.open();
        *open = open.saturating_sub(1);
        self.freed.notify_one();
    }
}

thread_local! {
    /// Connections this thread holds across calls into the store (a scan handing out rows, a transaction):
    /// a thread that holds one may open another beyond the bound, so that a callback using the store
    /// cannot wait forever for the connection its own thread holds.
    static HOLDING: Cell<u32> = const { Cell::new(0) };
}

/// Counts a connection held by this thread until dropped.
struct Holding;

impl Holding {
    fn new() -> Holding {
        HOLDING.with(|h| h.set(h.get() + 1));
        Holding
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        HOLDING.with(|h| h.set(h.get().saturating_sub(1)));
    }
}

struct Pooled {
    client: Client,
    /// Statements prepared on this connection, by SQL text: saves a round trip per call.
    statements: HashMap<String, Statement>,
    /// The connection's server process id, listed in `Changes::own` while the connection is open.
    pid: i32,
    changes: Weak<Changes>,
    /// Its slot, given up when it is dropped (closed).
    slots: Arc<Slots>,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(changes) = self.changes.upgrade() {
            changes.own().remove(&self.pid);
        }
        self.slots.release();
    }
}

impl Pooled {
    fn statement(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.execute(&statement, params)
    }

    /// A transaction holding the advisory lock `key` until it ends: callers on every connection and host
    /// queue for it, and each then sees what the one before committed (READ COMMITTED takes a new snapshot
    /// per statement).
    fn locked(&mut self, key: i64) -> Result<postgres::Transaction<'_>, postgres::Error> {
        let lock = self.statement("SELECT pg_advisory_xact_lock($1)")?;
        let mut tx = self.client.transaction()?;
        tx.execute(&lock, &[&key])?;
        Ok(tx)
    }

    fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<postgres::Row>, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.query(&statement, params)
    }
}

/// Whether `e` leaves `client` unusable: anything but an ordinary SQL error (severity ERROR) on an open
/// connection. FATAL covers "terminating connection due to administrator command" from a stopping server.
fn broken(e: &postgres::Error, client: &Client) -> bool {
    client.is_closed() || e.as_db_error().is_none_or(|db| db.severity() != "ERROR")
}

impl PostgresStore {
    /// Connects to `url`, brings the schema up to date and starts the change listener; `max_connections`
    /// bounds the connections the store opens for statements.
    pub fn open(url: &str, max_connections: usize) -> StoreResult<PostgresStore> {
        let name = redact(url);
        // The parser's messages name the offending option, never its value: safe to show.
        let bad_url = |cause: String| StoreError::Url { url: name.clone(), cause };
        let (url, tls) = pgtls::split(url).map_err(bad_url)?;
        let tls = tls.connector().map_err(bad_url)?;
        let mut config: Config = url.parse().map_err(|e: postgres::Error| bad_url(e.to_string()))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A host that died or dropped off the network (no reset) fails a call once what it sent stays
        // unacknowledged this long, rather than when the kernel gives up after many minutes.
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        // Names this process's connections in pg_stat_activity, unless the URL names them.
        if config.get_application_name().is_none() {
            config.application_name(&format!("p11shim pid {}", std::process::id()));
        }
        let mut store = PostgresStore {
            config,
            tls,
            name,
            idle: Mutex::new(Vec::new()),
            failed: Mutex::new(None),
            slots: Arc::new(Slots { open: Mutex::new(0), freed: Condvar::new(), max: max_connections.max(1) }),
            changes: Arc::new(Changes {
                log: ChangeLog::default(),
                listening: AtomicBool::new(false),
                lost: Mutex::new(None),
                own: Mutex::new(HashSet::new()),
                stop: AtomicBool::new(false),
                wake: wake_channel(),
            }),
            listener: None,
        };
        let (mut pooled, _) = store.acquire()?;
        match store.tls.clean(|| migrate(&mut pooled.client)) {
            Ok(Ok(())) => {}
            Ok(Err(Some(found))) => return Err(newer_schema(&store.name, found)),
            Ok(Err(None)) => return Err(foreign_schema(&store.name)),
            Err(e) => return Err(store.unavailable(&e)),
        }
        store.give_back(pooled);
        // Listening before the first generation() avoids a start-up window in which every call says
        // "changed"; if this fails the thread keeps trying.
        let listener = listen(&store.config, &store.tls, &store.changes.wake).ok();
        if listener.is_some() {
            store.changes.up();
        } else {
            store.changes.down();
        }
        let (weak, config, tls) = (Arc::downgrade(&store.changes), store.config.clone(), store.tls.clone());
        // Should the thread not start, generation() just keeps saying "changed": slow but correct.
        store.listener = crate::threads::spawn("p11shim-pg-listen", move || {
            let _down = DownOnExit(weak.clone());
            listen_loop(&weak, &config, &tls, listener);
        })
        .ok();
        Ok(store)
    }

    /// An idle connection (`false`), or a new one (`true`) if fewer than `max_connections` are open; else
    /// waits for one to be handed back or closed, up to the connect timeout.
    fn acquire(&self) -> StoreResult<(Pooled, bool)> {
        let wait = self.config.get_connect_timeout().copied().unwrap_or(CONNECT_TIMEOUT);
        let until = Instant::now() + wait;
        let nested = HOLDING.with(|h| h.get()) > 0;
        let mut open = self.slots.open();
        loop {
            if let Some(pooled) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
                return Ok((pooled, false));
            }
            if *open < self.slots.max || nested {
                *open += 1;
                drop(open);
                return self.connect().map(|pooled| (pooled, true));
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StoreError::Unavailable {
                    store: self.name.clone(),
                    cause: format!(
                        "all {} connections of this process are in use and none was handed back within {} (raise [store] max_connections)",
                        self.slots.max,
                        humantime::format_duration(wait)
                    ),
                });
            }
            open = self.slots.freed.wait_timeout(open, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Opens a connection in a slot taken by the caller (given up again if the connection fails).
    fn connect(&self) -> StoreResult<Pooled> {
        let recent = self.failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some((when, cause)) = recent.filter(|(when, _)| when.elapsed() < RETRY_AFTER) {
            self.slots.release();
            let ago = when.elapsed().as_millis();
            return Err(StoreError::Unavailable { store: self.name.clone(), cause: format!("{cause} ({ago} ms ago)") });
        }
        let started = Instant::now();
        let connected = self.tls.connect(&self.config).map_err(|e| self.unavailable(&e)).and_then(|mut client| {
            let pid = self.tls.clean(|| client.query_one("SELECT pg_backend_pid()", &[]));
            let pid: i32 = pid.map_err(|e| self.unavailable(&e))?.get(0);
            Ok((client, pid))
        });
        let (client, pid) = connected.inspect_err(|e| {
            let cause = match e {
                StoreError::Unavailable { cause, .. } => cause.clone(),
                other => other.to_string(),
            };
            if started.elapsed() >= SLOW_FAILURE {
                *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), cause));
            }
            self.slots.release();
        })?;
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.changes.own().insert(pid);
        let changes = Arc::downgrade(&self.changes);
        Ok(Pooled { client, statements: HashMap::new(), pid, changes, slots: self.slots.clone() })
    }

    fn give_back(&self, pooled: Pooled) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(pooled);
        let _open = self.slots.open();
        self.slots.freed.notify_one();
    }

    fn unavailable(&self, e: &postgres::Error) -> StoreError {
        // Display of postgres::Error is often just "db error"; the DbError has the server's message.
        let cause = match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => with_sources(e),
        };
        // Class 54, "program limit exceeded" (an index row too large for a long label), is the server refusing
        // this value, not an outage: retrying or reconnecting would not help.
        if e.as_db_error().is_some_and(|db| db.code().code().starts_with("54")) {
            return StoreError::Limit { store: self.name.clone(), cause };
        }
        StoreError::Unavailable { store: self.name.clone(), cause }
    }

    /// Runs `f` on a pooled connection (one call, one transaction). When a reused connection turns out to
    /// be broken, a read (`retry`) is run once more on a new connection: the idle pool may hold connections
    /// from before a server restart. A write is not retried, since it may have been committed before the
    /// connection died; the caller gets `Unavailable`.
    fn run<T>(&self, retry: bool, f: impl FnMut(&mut Pooled) -> Result<T, postgres::Error>) -> StoreResult<T> {
        self.run_with(&|| retry, f)
    }

    /// [`PostgresStore::run`] with the retry decided after the failure (a stream retries only if it has not
    /// handed out a row yet).
    fn run_with<T>(
        &self,
        retry: &dyn Fn() -> bool,
        f: impl FnMut(&mut Pooled) -> Result<T, postgres::Error>,
    ) -> StoreResult<T> {
        self.tls.clean(|| self.run_clean(retry, f))
    }

    fn run_clean<T>(
        &self,
        retry: &dyn Fn() -> bool,
        mut f: impl FnMut(&mut Pooled) -> Result<T, postgres::Error>,
    ) -> StoreResult<T> {
        let (mut pooled, fresh) = self.acquire()?;
        match f(&mut pooled) {
            Ok(value) => {
                self.give_back(pooled);
                Ok(value)
            }
            Err(e) if !broken(&e, &pooled.client) => {
                self.give_back(pooled);
                Err(self.unavailable(&e))
            }
            Err(e) => {
                self.lost(pooled);
                let stale = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
                drop(stale); // closed outside the lock
                if !retry() || fresh {
                    return Err(self.unavailable(&e));
                }
                let mut pooled = self.acquire()?.0;
                match f(&mut pooled) {
                    Ok(value) => {
                        self.give_back(pooled);
                        Ok(value)
                    }
                    Err(e) => {
                        if broken(&e, &pooled.client) {
                            self.lost(pooled);
                        } else {
                            self.give_back(pooled);
                        }
                        Err(self.unavailable(&e))
                    }
                }
            }
        }
    }

    /// Counts a commit made through this store at once (its notification is not counted again).
    fn wrote(&self, change: Change) {
        self.changes.log.bump(change);
    }

    /// Closes a connection that failed. A write on it may have committed without this store hearing so,
    /// and its notification may already have been passed over as this store's own: count a change to
    /// anything (but not one heard of other hosts: the server going away fails pooled connections a moment
    /// before the listener's, and what the listener heard until then still holds for `current_when_lost`).
    fn lost(&self, pooled: Pooled) {
        self.wrote(Change::Lost);
        drop(pooled);
    }
}

/// `e` and the errors beneath it (a TLS handshake's says which certificate check failed), on one line.
fn with_sources(e: &postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        let more = inner.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = inner.source();
    }
    text.replace('\n', " ")
}

/// Applies the missing migrations in one transaction holding an advisory lock, so that processes opening
/// the store at once apply each migration exactly once.
/// `Ok(Err(Some(v)))`: the database has a newer schema `v`; `Ok(Err(None))`: its `keys` table is not ours.
fn migrate(client: &mut Client) -> Result<Result<(), Option<i64>>, postgres::Error> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    let row = tx.query_one("SELECT to_regclass('schema_version') IS NOT NULL, to_regclass('keys') IS NOT NULL", &[])?;
    let (had_versions, has_keys): (bool, bool) = (row.get(0), row.get(1));
    if !had_versions {
        if has_keys {
            return Ok(Err(None));
        }
        tx.batch_execute(
            "CREATE TABLE schema_version (
                version BIGINT PRIMARY KEY,
                applied TIMESTAMPTZ NOT NULL DEFAULT now()
            )",
        )?;
    }
    let found: i64 = tx.query_one("SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_version", &[])?.get(0);
    if found > SCHEMA_VERSION {
        return Ok(Err(Some(found)));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(version, _)| *version > found) {
        tx.batch_execute(sql)?;
        tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[version])?;
    }
    tx.commit()?;
    Ok(Ok(()))
}

fn listen(config: &Config, tls: &Tls, wake: &str) -> Result<Client, postgres::Error> {
    let mut client = tls.connect(config)?;
    tls.clean(|| client.batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {wake}")))?;
    Ok(client)
}

/// A channel name of this store's own: the process id and a counter (stores of one process differ).
fn wake_channel() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("p11shim_wake_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Marks the listener down when its thread ends, however it ends.
struct DownOnExit(Weak<Changes>);

impl Drop for DownOnExit {
    fn drop(&mut self) {
        if let Some(changes) = self.0.upgrade() {
            changes.down();
        }
    }
}

/// The listener thread: counts notifications while connected, reconnects with backoff while not, and ends
/// once the store is being dropped. It touches only `Changes`, never the pool.
fn listen_loop(weak: &Weak<Changes>, config: &Config, tls: &Tls, mut client: Option<Client>) {
    let mut backoff = LISTEN_BACKOFF_MIN;
    let mut last_traffic = Instant::now();
    loop {
        let Some(changes) = weak.upgrade().filter(|c| !c.stop.load(Ordering::SeqCst)) else { return };
        match client.take() {
            Some(mut c) => match wait(&mut c, &changes, &mut last_traffic) {
                Ok(()) => client = Some(c),
                Err(()) => changes.down(),
            },
            None => match listen(config, tls, &changes.wake) {
                Ok(c) => {
                    // Changes made while nobody listened are lost: one bump invalidates whatever callers
                    // cached before. It comes before `listening`, so no caller sees the old value again.
                    changes.log.bump(Change::Any);
                    changes.up();
                    client = Some(c);
                    backoff = LISTEN_BACKOFF_MIN;
                    last_traffic = Instant::now();
                }
                Err(_) => {
                    // In slices, so that a store being dropped is not kept waiting.
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !changes.stop.load(Ordering::SeqCst) {
                        std::thread::sleep(STOP_SLICE.min(until.saturating_duration_since(Instant::now())));
                    }
                    backoff = (backoff * 2).min(LISTEN_BACKOFF_MAX);
                }
            },
        }
    }
}

/// Waits for notifications and counts them, until none came for LISTEN_POLL or one came on the store's wake
/// channel; `Err` when the connection is gone.
fn wait(client: &mut Client, changes: &Changes, last_traffic: &mut Instant) -> Result<(), ()> {
    {
        let mut notifications = client.notifications();
        let mut iter = notifications.timeout_iter(LISTEN_POLL);
        while let Some(notification) = iter.next().map_err(drop)? {
            if notification.channel() == changes.wake {
                break;
            }
            if !changes.own().contains(&notification.process_id()) {
                changes.log.bump(Change::row(notification.payload()));
            }
            *last_traffic = Instant::now();
        }
    }
    if client.is_closed() {
        return Err(());
    }
    if last_traffic.elapsed() >= LISTEN_PING_AFTER {
        client.is_valid(CONNECT_TIMEOUT).map_err(drop)?;
        *last_traffic = Instant::now();
    }
    Ok(())
}

fn read_user(r: &postgres::Row) -> UserRow {
    UserRow {
        name: r.get(0),
        perm: r.get(1),
        group_regex: r.get(2),
        auth: r.get(3),
        secret: r.get(4),
        version: r.get(5),
        failed: r.get(6),
        last_failed: r.get(7),
        mac: r.get(8),
    }
}

/// The placeholders of [`USER_COLUMNS`] and their values.
const USER_VALUES: &str = "$1, $2, $3, $4, $5, $6, $7, $8, $9";

fn user_params(user: &UserRow) -> [&(dyn postgres::types::ToSql + Sync); 9] {
    [
        &user.name,
        &user.perm,
        &user.group_regex,
        &user.auth,
        &user.secret,
        &user.version,
        &user.failed,
        &user.last_failed,
        &user.mac,
    ]
}

fn read_audit(r: &postgres::Row) -> AuditEntry {
    AuditEntry {
        seq: r.get(0),
        draft: AuditDraft {
            time: r.get(1),
            who: r.get(2),
            action: r.get(3),
            group: r.get(4),
            count: r.get(5),
            result: r.get(6),
            mode: r.get(9),
        },
        prev: r.get(7),
        hash: r.get(8),
        mac: r.get(10),
        mbk: r.get(11),
    }
}

/// `INSERT INTO keys …` of one row; with `replace`, an existing row of that id is overwritten whatever its
/// version. The number of rows written (0: the id exists and `replace` is false).
fn write_key(p: &mut Pooled, row: &KeyRow, replace: bool) -> Result<u64, postgres::Error> {
    let conflict = if replace {
        "DO UPDATE SET token = excluded.token, grp = excluded.grp, class = excluded.class, \
         key_type = excluded.key_type, label = excluded.label, ckid = excluded.ckid, attrs = excluded.attrs, \
         wrapped = excluded.wrapped, wrap_mech = excluded.wrap_mech, mbk = excluded.mbk, mac = excluded.mac, \
         version = excluded.version"
    } else {
        "DO NOTHING"
    };
    let sql = format!(
        "INSERT INTO keys ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
         ON CONFLICT (id) {conflict}"
    );
    let (class, key_type, wrap_mech) = (to_db(row.class), to_db(row.key_type), to_db(row.wrap_mech));
    p.execute(
        &sql,
        &[
            &row.id,
            &row.token,
            &row.group,
            &class,
            &key_type,
            &row.label,
            &row.ckid,
            &row.attrs,
            &row.wrapped,
            &wrap_mech,
            &row.mbk,
            &row.mac,
            &row.version,
        ],
    )
}

impl PostgresStore {
    /// Runs `sql` through a portal in one read-only transaction (one snapshot), fetching SCAN_BATCH rows
    /// per round trip and handing each to `f`: memory holds one batch. An error of `f` stops the scan and is
    /// returned as it is. A stale pooled connection is replaced only while no row has been handed out.
    fn stream<T>(
        &self,
        sql: &str,
        read: fn(&postgres::Row) -> T,
        f: &mut dyn FnMut(T) -> StoreResult<()>,
    ) -> StoreResult<()> {
        let delivered = Cell::new(false);
        let mut stopped = None;
        // The rows' callback may use the store while this connection is held.
        let _holding = Holding::new();
        let tls = &self.tls;
        self.run_with(&|| !delivered.get(), |p| {
            let statement = p.statement(sql)?;
            let mut tx = p.client.build_transaction().read_only(true).start()?;
            let portal = tx.bind(&statement, &[])?;
            loop {
                // The callback may have used OpenSSL (the HSM's library) on this thread meanwhile.
                let rows = tls.clean(|| tx.query_portal(&portal, SCAN_BATCH))?;
                for row in &rows {
                    delivered.set(true);
                    if let Err(e) = f(read(row)) {
                        stopped = Some(e);
                        return tls.clean(|| tx.commit());
                    }
                }
                if rows.len() < SCAN_BATCH as usize {
                    return tls.clean(|| tx.commit());
                }
            }
        })?;
        stopped.map_or(Ok(()), Err)
    }
}

/// A transaction on one pooled connection (see [`KeyStore::begin`]), opened with BEGIN and ended with
/// COMMIT or, when dropped uncommitted, ROLLBACK; the connection goes back to the pool only if that worked.
struct PostgresTx<'a> {
    store: &'a PostgresStore,
    pooled: Option<Pooled>,
    /// The thread that began it holds its connection until it ends.
    _holding: Holding,
}

impl PostgresTx<'_> {
    fn run<T>(&mut self, f: impl FnOnce(&mut Pooled) -> Result<T, postgres::Error>) -> StoreResult<T> {
        let Some(pooled) = self.pooled.as_mut() else {
            return Err(StoreError::Unavailable {
                store: self.store.name.clone(),
                cause: "the transaction's connection failed earlier".into(),
            });
        };
        match self.store.tls.clean(|| f(pooled)) {
            Ok(value) => Ok(value),
            Err(e) => {
                if broken(&e, &pooled.client) {
                    if let Some(pooled) = self.pooled.take() {
                        self.store.lost(pooled);
                    }
                }
                Err(self.store.unavailable(&e))
            }
        }
    }
}

impl StoreTx for PostgresTx<'_> {
    fn insert(&mut self, row: &KeyRow) -> StoreResult<()> {
        if self.run(|p| write_key(p, row, false))? == 0 {
            return Err(StoreError::Duplicate { store: self.store.name.clone(), id: row.id.clone() });
        }
        Ok(())
    }

    fn replace(&mut self, row: &KeyRow) -> StoreResult<()> {
        self.run(|p| write_key(p, row, true)).map(drop)
    }

    fn exists(&mut self, id: &str) -> StoreResult<bool> {
        Ok(!self.run(|p| p.query("SELECT 1 FROM keys WHERE id = $1", &[&id]))?.is_empty())
    }

    fn commit(mut self: Box<Self>) -> StoreResult<()> {
        self.run(|p| p.client.batch_execute("COMMIT"))?;
        let pooled = self.pooled.take();
        if let Some(pooled) = pooled {
            self.store.give_back(pooled);
        }
        self.store.wrote(Change::Any);
        Ok(())
    }
}

impl Drop for PostgresTx<'_> {
    fn drop(&mut self) {
        if let Some(mut pooled) = self.pooled.take() {
            if self.store.tls.clean(|| pooled.client.batch_execute("ROLLBACK")).is_ok() {
                self.store.give_back(pooled);
            }
        }
    }
}

/// A row, or why it cannot be read (a NULL or a column whose type was changed outside p11shim).
fn read_row(r: &postgres::Row) -> RowRead {
    let read = || -> Result<KeyRow, postgres::Error> {
        Ok(KeyRow {
            id: r.try_get(0)?,
            token: r.try_get(1)?,
            group: r.try_get(2)?,
            class: from_db(r.try_get(3)?),
            key_type: from_db(r.try_get(4)?),
            label: r.try_get(5)?,
            ckid: r.try_get(6)?,
            attrs: r.try_get(7)?,
            wrapped: r.try_get(8)?,
            wrap_mech: from_db(r.try_get(9)?),
            mbk: r.try_get(10)?,
            mac: r.try_get(11)?,
            version: r.try_get(12)?,
        })
    };
    match read() {
        Ok(row) => RowRead::Row(row),
        Err(e) => {
            let id = r.try_get::<_, String>(0).unwrap_or_else(|_| "without a readable id".into());
            let (token, group) = (r.try_get(1).ok(), r.try_get(2).ok());
            RowRead::Bad(BadRow { id, token, group, cause: e.to_string() })
        }
    }
}

impl Param<'_> {
    fn as_pg(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Text(s) => s,
            Param::Int(n) => n,
            Param::Blob(b) => b,
        }
    }
}

impl KeyStore for PostgresStore {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn insert(&self, row: &KeyRow) -> StoreResult<()> {
        let inserted = self.run(false, |p| write_key(p, row, false))?;
        if inserted == 0 {
            return Err(StoreError::Duplicate { store: self.name.clone(), id: row.id.clone() });
        }
        self.wrote(Change::own(&row.id, Some(row.version)));
        Ok(())
    }

    fn get(&self, id: &str) -> StoreResult<Option<KeyRow>> {
        let sql = format!("SELECT {COLUMNS} FROM keys WHERE id = $1");
        let rows = self.run(true, |p| p.query(&sql, &[&id]))?;
        match rows.first().map(read_row) {
            None => Ok(None),
            Some(RowRead::Row(row)) => Ok(Some(row)),
            Some(RowRead::Bad(bad)) => Err(StoreError::BadRow { store: self.name.clone(), row: Box::new(bad) }),
        }
    }

    fn find(&self, query: &KeyQuery) -> StoreResult<Vec<KeyRow>> {
        let (sql, params) = find_sql(query, |n| format!("${n}"), "id");
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(Param::as_pg).collect();
        let rows = self.run(true, |p| p.query(&sql, &params))?;
        Ok(super::readable(&self.name, rows.iter().map(read_row).collect()))
    }

    fn update(&self, row: &KeyRow) -> StoreResult<bool> {
        // One statement: the version check and the write are atomic without an explicit transaction.
        let sql = "UPDATE keys SET token = $2, grp = $3, class = $4, key_type = $5, label = $6, ckid = $7, \
                   attrs = $8, wrapped = $9, wrap_mech = $10, mbk = $11, mac = $12, version = $13 \
                   WHERE id = $1 AND version = $14";
        let (class, key_type, wrap_mech) = (to_db(row.class), to_db(row.key_type), to_db(row.wrap_mech));
        let previous = row.version.wrapping_sub(1);
        let updated = self.run(false, |p| {
            p.execute(
                sql,
                &[
                    &row.id,
                    &row.token,
                    &row.group,
                    &class,
                    &key_type,
                    &row.label,
                    &row.ckid,
                    &row.attrs,
                    &row.wrapped,
                    &wrap_mech,
                    &row.mbk,
                    &row.mac,
                    &row.version,
                    &previous,
                ],
            )
        })?;
        if updated > 0 {
            self.wrote(Change::own(&row.id, Some(row.version)));
        }
        Ok(updated > 0)
    }

    fn delete(&self, id: &str) -> StoreResult<bool> {
        let deleted = self.run(false, |p| p.execute("DELETE FROM keys WHERE id = $1", &[&id]))?;
        if deleted > 0 {
            self.wrote(Change::own(id, None));
        }
        Ok(deleted > 0)
    }

    /// A counter bumped by the listener thread for each notification from the `keys` trigger (sent at
    /// commit by any process on any host), by this store's own commits (at once, ahead of their
    /// notification), and once when the listener reconnects (changes it missed). While the listener is
    /// down every call returns a new value, so callers re-validate instead of trusting a stale cache.
    /// A commit by another process becomes visible here with the notification's latency (a local round
    /// trip, typically well under a millisecond).
    fn generation(&self) -> StoreResult<u64> {
        let changes = &self.changes;
        if changes.listening.load(Ordering::SeqCst) {
            Ok(changes.log.current())
        } else {
            Ok(changes.log.bump(Change::Any))
        }
    }

    /// From the change log: other hosts' commits are known by row (the notification names it), this
    /// store's own by row and version.
    fn unchanged_since(&self, id: &str, version: i64, at: u64, now: u64) -> bool {
        self.changes.log.unchanged_since(id, version, at, now)
    }

    fn current_when_lost(&self, id: &str, version: i64, at: u64) -> Option<Instant> {
        let lost = *self.changes.lost();
        let (last, when) = lost?;
        (at <= last && self.changes.log.heard_unchanged(id, version, at, last)).then_some(when)
    }

    fn exists(&self, id: &str) -> StoreResult<bool> {
        let rows = self.run(true, |p| p.query("SELECT 1 FROM keys WHERE id = $1", &[&id]))?;
        Ok(!rows.is_empty())
    }

    fn scan_rows(&self, f: &mut dyn FnMut(RowRead) -> StoreResult<()>) -> StoreResult<()> {
        self.stream(&format!(r#"SELECT {COLUMNS} FROM keys ORDER BY token COLLATE "C", id"#), read_row, f)
    }

    fn key_counts(&self) -> StoreResult<Vec<(String, String, u64)>> {
        let sql =
            r#"SELECT token, grp, COUNT(*) FROM keys GROUP BY token, grp ORDER BY token COLLATE "C", grp COLLATE "C""#;
        let rows = self.run(true, |p| p.query(sql, &[]))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2) as u64)).collect())
    }

    fn seal_key(&self, mbk: &str) -> StoreResult<Option<Vec<u8>>> {
        let rows = self.run(true, |p| p.query("SELECT blob FROM seal_keys WHERE mbk = $1", &[&mbk]))?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    fn seal_key_insert(&self, mbk: &str, blob: &[u8]) -> StoreResult<bool> {
        let n = self.run(false, |p| {
            p.execute("INSERT INTO seal_keys (mbk, blob) VALUES ($1, $2) ON CONFLICT (mbk) DO NOTHING", &[&mbk, &blob])
        })?;
        Ok(n == 1)
    }

    fn sealed_under(&self, mbk: &str) -> StoreResult<bool> {
        let rows = self.run(true, |p| {
            p.query(
                "SELECT EXISTS (SELECT 1 FROM keys WHERE mbk = $1) OR EXISTS (SELECT 1 FROM audit WHERE mbk = $1)",
                &[&mbk],
            )
        })?;
        Ok(rows.first().map(|r| r.get(0)).unwrap_or(false))
    }

    fn seal_keys(&self) -> StoreResult<Vec<(String, Vec<u8>)>> {
        let rows = self.run(true, |p| p.query("SELECT mbk, blob FROM seal_keys ORDER BY mbk", &[]))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn schema_version(&self) -> StoreResult<i64> {
        let rows = self.run(true, |p| p.query("SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_version", &[]))?;
        Ok(rows.first().map(|r| r.get(0)).unwrap_or(0))
    }

    fn begin(&self) -> StoreResult<Box<dyn StoreTx + '_>> {
        // A pooled connection may be stale (a server restart): BEGIN writes nothing, so on a broken
        // connection it is tried once more on a new one.
        let (mut pooled, _) = self.acquire()?;
        if let Err(e) = self.tls.clean(|| pooled.client.batch_execute("BEGIN")) {
            if !broken(&e, &pooled.client) {
                self.give_back(pooled);
                return Err(self.unavailable(&e));
            }
            drop(pooled);
            let stale = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
            drop(stale); // closed outside the lock (closing takes the slots' lock)
            pooled = self.acquire()?.0;
            self.tls.clean(|| pooled.client.batch_execute("BEGIN")).map_err(|e| self.unavailable(&e))?;
        }
        Ok(Box::new(PostgresTx { store: self, pooled: Some(pooled), _holding: Holding::new() }))
    }

    fn user_insert(&self, user: &UserRow) -> StoreResult<()> {
        let sql = format!("INSERT INTO users ({USER_COLUMNS}) VALUES ({USER_VALUES}) ON CONFLICT (name) DO NOTHING");
        let inserted = self.run(false, |p| p.execute(&sql, &user_params(user)))?;
        if inserted == 0 {
            return Err(StoreError::Duplicate { store: self.name.clone(), id: user.name.clone() });
        }
        Ok(())
    }

    fn user_insert_first(&self, user: &UserRow) -> StoreResult<bool> {
        let insert = format!("INSERT INTO users ({USER_COLUMNS}) VALUES ({USER_VALUES})");
        self.run(false, |p| {
            let (any, insert) = (p.statement("SELECT EXISTS (SELECT 1 FROM users)")?, p.statement(&insert)?);
            // A second first user waits here, then sees the first one.
            let mut tx = p.locked(USERS_LOCK)?;
            if tx.query_one(&any, &[])?.get::<_, bool>(0) {
                return Ok(false);
            }
            tx.execute(&insert, &user_params(user))?;
            tx.commit()?;
            Ok(true)
        })
    }

    fn user_update(&self, user: &UserRow) -> StoreResult<bool> {
        let sql = "UPDATE users SET perm = $2, group_regex = $3, auth = $4, secret = $5, version = $6, failed = $7, \
                   last_failed = $8, mac = $9 WHERE name = $1 AND version = $10";
        let previous = user.version.wrapping_sub(1);
        let updated = self.run(false, |p| {
            let mut params = user_params(user).to_vec();
            params.push(&previous);
            p.execute(sql, &params)
        })?;
        Ok(updated > 0)
    }

    fn user_get(&self, name: &str) -> StoreResult<Option<UserRow>> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE name = $1");
        Ok(self.run(true, |p| p.query(&sql, &[&name]))?.first().map(read_user))
    }

    fn user_list(&self) -> StoreResult<Vec<UserRow>> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users ORDER BY name");
        Ok(self.run(true, |p| p.query(&sql, &[]))?.iter().map(read_user).collect())
    }

    fn user_delete(&self, name: &str) -> StoreResult<bool> {
        Ok(self.run(false, |p| p.execute("DELETE FROM users WHERE name = $1", &[&name]))? > 0)
    }

    fn user_delete_if(&self, name: &str, allowed: &dyn Fn(&[UserRow]) -> bool) -> StoreResult<UserDelete> {
        let list = format!("SELECT {USER_COLUMNS} FROM users ORDER BY name");
        self.run(false, |p| {
            let (list, delete) = (p.statement(&list)?, p.statement("DELETE FROM users WHERE name = $1")?);
            // A concurrent deletion waits here, then reads what this one left.
            let mut tx = p.locked(USERS_LOCK)?;
            let users = tx.query(&list, &[])?.iter().map(read_user).collect();
            let (victim, rest) = split_user(users, name);
            let Some(victim) = victim else { return Ok(UserDelete::NotFound) };
            if !allowed(&rest) {
                return Ok(UserDelete::Refused(victim));
            }
            tx.execute(&delete, &[&name])?;
            tx.commit()?;
            Ok(UserDelete::Deleted(victim))
        })
    }

    fn audit_append(&self, draft: AuditDraft, seal: super::AuditSeal) -> StoreResult<AuditEntry> {
        let insert =
            format!("INSERT INTO audit ({AUDIT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)");
        self.run(false, |p| {
            let last_sql = "SELECT seq, hash, mac FROM audit ORDER BY seq DESC LIMIT 1";
            let (last, insert) = (p.statement(last_sql)?, p.statement(&insert)?);
            // Appenders on every connection and host queue here, and each reads the entry its predecessor
            // committed.
            let mut tx = p.locked(AUDIT_LOCK)?;
            let last = tx.query_opt(&last, &[])?.map(|r| (r.get(0), r.get(1), r.get(2)));
            let entry = match chain(last, draft.clone(), seal) {
                Ok(entry) => entry,
                Err(e) => return Ok(Err(e)),
            };
            let d = &entry.draft;
            tx.execute(
                &insert,
                &[
                    &entry.seq,
                    &d.time,
                    &d.who,
                    &d.action,
                    &d.group,
                    &d.count,
                    &d.result,
                    &entry.prev,
                    &entry.hash,
                    &d.mode,
                    &entry.mac,
                    &entry.mbk,
                ],
            )?;
            tx.commit()?;
            Ok(Ok(entry))
        })?
    }

    fn audit_scan(&self, f: &mut dyn FnMut(AuditEntry) -> StoreResult<()>) -> StoreResult<()> {
        self.stream(&format!("SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq"), read_audit, f)
    }
}
