//! The shared key store: PostgreSQL, for several hosts using the same keys.
//!
//! Connections come from a small pool; a connection that fails at the connection level is closed along with
//! every idle one (a server restart or a network cut kills them all), and the next call connects afresh, so
//! the application recovers on its own when the server returns. A background thread LISTENs for the
//! notifications a trigger sends on every change to `keys`, which makes [`KeyStore::generation`] free of
//! round trips.

use super::{
    find_sql, foreign_schema, from_db, newer_schema, redact, to_db, KeyQuery, KeyRow, KeyStore, Param, StoreError,
    StoreResult, COLUMNS, SCHEMA_VERSION,
};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, Config, NoTls, Statement};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Used when the URL sets no `connect_timeout`: an unreachable host must not hang the application.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept for reuse; more are opened under load and closed when handed back.
const MAX_IDLE: usize = 8;
/// The channel the trigger notifies on.
const CHANNEL: &str = "p11shim_keys";
/// Serializes migrations between processes (pg_advisory_xact_lock key: "p11shim" in ASCII).
const MIGRATION_LOCK: i64 = 0x0070_3131_7368_696d;
/// Reconnect delays of the listener: doubled from MIN to MAX while the server stays away.
const LISTEN_BACKOFF_MIN: Duration = Duration::from_millis(100);
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long the listener waits for a notification before it checks whether the store still exists.
const LISTEN_POLL: Duration = Duration::from_millis(500);
/// After this long without traffic the listener pings the server: a silently dropped connection (no RST)
/// would otherwise look like a quiet database forever.
const LISTEN_PING_AFTER: Duration = Duration::from_secs(10);

/// One migration per schema version, applied in order inside the opening transaction.
const MIGRATIONS: &[(i64, &str)] = &[(
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
)];

pub struct PostgresStore {
    config: Config,
    /// The URL without its password, the name in every message.
    name: String,
    /// Connections not in use. The mutex guards only the push and pop, never a statement.
    idle: Mutex<Vec<Pooled>>,
    /// Shared with the listener thread, which holds only a weak reference and ends when the store is gone.
    changes: Arc<Changes>,
}

/// What the listener thread tells the store.
struct Changes {
    /// Bumped for each notification, for each commit of this store, and when the listener reconnects.
    generation: AtomicU64,
    /// Whether the listener is connected and LISTENing; while it is not, every generation is new.
    listening: AtomicBool,
}

struct Pooled {
    client: Client,
    /// Statements prepared on this connection, by SQL text: saves a round trip per call.
    statements: HashMap<String, Statement>,
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
    /// Connects to `url`, brings the schema up to date and starts the change listener.
    pub fn open(url: &str) -> StoreResult<PostgresStore> {
        let name = redact(url);
        // The parser's messages name the offending option, never its value: safe to show.
        let mut config: Config =
            url.parse().map_err(|e: postgres::Error| StoreError::Url { url: name.clone(), cause: e.to_string() })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let store = PostgresStore {
            config,
            name,
            idle: Mutex::new(Vec::new()),
            changes: Arc::new(Changes { generation: AtomicU64::new(0), listening: AtomicBool::new(false) }),
        };
        let mut pooled = store.connect()?;
        match migrate(&mut pooled.client) {
            Ok(Ok(())) => {}
            Ok(Err(Some(found))) => return Err(newer_schema(&store.name, found)),
            Ok(Err(None)) => return Err(foreign_schema(&store.name)),
            Err(e) => return Err(store.unavailable(&e)),
        }
        store.give_back(pooled);
        // Listening before the first generation() avoids a start-up window in which every call says
        // "changed"; if this fails the thread keeps trying.
        let listener = listen(&store.config).ok();
        store.changes.listening.store(listener.is_some(), Ordering::SeqCst);
        let (weak, config) = (Arc::downgrade(&store.changes), store.config.clone());
        // Should the thread not start, generation() just keeps saying "changed": slow but correct.
        let _ = std::thread::Builder::new().name("p11shim-pg-listen".into()).spawn(move || {
            let _down = DownOnExit(weak.clone());
            listen_loop(&weak, &config, listener);
        });
        Ok(store)
    }

    fn connect(&self) -> StoreResult<Pooled> {
        let client = self.config.connect(NoTls).map_err(|e| self.unavailable(&e))?;
        Ok(Pooled { client, statements: HashMap::new() })
    }

    fn give_back(&self, pooled: Pooled) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(pooled);
        }
    }

    fn unavailable(&self, e: &postgres::Error) -> StoreError {
        // Display of postgres::Error is often just "db error"; the DbError has the server's message.
        let cause = match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => e.to_string(),
        };
        StoreError::Unavailable { store: self.name.clone(), cause }
    }

    /// Runs `f` on a pooled connection (one call, one transaction). When a reused connection turns out to
    /// be broken, a read (`retry`) is run once more on a new connection: the idle pool may hold connections
    /// from before a server restart. A write is not retried, since it may have been committed before the
    /// connection died; the caller gets `Unavailable`.
    fn run<T>(&self, retry: bool, f: impl Fn(&mut Pooled) -> Result<T, postgres::Error>) -> StoreResult<T> {
        let reused = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let fresh = reused.is_none();
        let mut pooled = match reused {
            Some(pooled) => pooled,
            None => self.connect()?,
        };
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
                drop(pooled);
                let stale = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
                drop(stale); // closed outside the lock
                if !retry || fresh {
                    return Err(self.unavailable(&e));
                }
                let mut pooled = self.connect()?;
                match f(&mut pooled) {
                    Ok(value) => {
                        self.give_back(pooled);
                        Ok(value)
                    }
                    Err(e) => {
                        if !broken(&e, &pooled.client) {
                            self.give_back(pooled);
                        }
                        Err(self.unavailable(&e))
                    }
                }
            }
        }
    }

    /// Counts a commit made through this store at once, without waiting for its notification to come back.
    fn wrote(&self) {
        self.changes.generation.fetch_add(1, Ordering::SeqCst);
    }
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

fn listen(config: &Config) -> Result<Client, postgres::Error> {
    let mut client = config.connect(NoTls)?;
    client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    Ok(client)
}

/// Marks the listener down when its thread ends, however it ends.
struct DownOnExit(Weak<Changes>);

impl Drop for DownOnExit {
    fn drop(&mut self) {
        if let Some(changes) = self.0.upgrade() {
            changes.listening.store(false, Ordering::SeqCst);
        }
    }
}

/// The listener thread: counts notifications while connected, reconnects with backoff while not, and ends
/// once the store is dropped. It touches only `Changes`, never the pool.
fn listen_loop(weak: &Weak<Changes>, config: &Config, mut client: Option<Client>) {
    let mut backoff = LISTEN_BACKOFF_MIN;
    let mut last_traffic = Instant::now();
    loop {
        let Some(changes) = weak.upgrade() else { return };
        match client.take() {
            Some(mut c) => match wait(&mut c, &changes, &mut last_traffic) {
                Ok(()) => client = Some(c),
                Err(()) => changes.listening.store(false, Ordering::SeqCst),
            },
            None => match listen(config) {
                Ok(c) => {
                    // Changes made while nobody listened are lost: one bump invalidates whatever callers
                    // cached before. It comes before `listening`, so no caller sees the old value again.
                    changes.generation.fetch_add(1, Ordering::SeqCst);
                    changes.listening.store(true, Ordering::SeqCst);
                    client = Some(c);
                    backoff = LISTEN_BACKOFF_MIN;
                    last_traffic = Instant::now();
                }
                Err(_) => {
                    drop(changes);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(LISTEN_BACKOFF_MAX);
                }
            },
        }
    }
}

/// Waits up to LISTEN_POLL for notifications and counts them; `Err` when the connection is gone.
fn wait(client: &mut Client, changes: &Changes, last_traffic: &mut Instant) -> Result<(), ()> {
    {
        let mut notifications = client.notifications();
        let mut iter = notifications.timeout_iter(LISTEN_POLL);
        while iter.next().map_err(drop)?.is_some() {
            changes.generation.fetch_add(1, Ordering::SeqCst);
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

fn read_row(r: &postgres::Row) -> KeyRow {
    KeyRow {
        id: r.get(0),
        token: r.get(1),
        group: r.get(2),
        class: from_db(r.get(3)),
        key_type: from_db(r.get(4)),
        label: r.get(5),
        ckid: r.get(6),
        attrs: r.get(7),
        wrapped: r.get(8),
        wrap_mech: from_db(r.get(9)),
        mbk: r.get(10),
        mac: r.get(11),
        version: r.get(12),
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
        let sql = format!(
            "INSERT INTO keys ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (id) DO NOTHING"
        );
        let (class, key_type, wrap_mech) = (to_db(row.class), to_db(row.key_type), to_db(row.wrap_mech));
        let inserted = self.run(false, |p| {
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
        })?;
        if inserted == 0 {
            return Err(StoreError::Duplicate { store: self.name.clone(), id: row.id.clone() });
        }
        self.wrote();
        Ok(())
    }

    fn get(&self, id: &str) -> StoreResult<Option<KeyRow>> {
        let sql = format!("SELECT {COLUMNS} FROM keys WHERE id = $1");
        let rows = self.run(true, |p| p.query(&sql, &[&id]))?;
        Ok(rows.first().map(read_row))
    }

    fn find(&self, query: &KeyQuery) -> StoreResult<Vec<KeyRow>> {
        let (sql, params) = find_sql(query, |n| format!("${n}"));
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(Param::as_pg).collect();
        let rows = self.run(true, |p| p.query(&sql, &params))?;
        Ok(rows.iter().map(read_row).collect())
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
            self.wrote();
        }
        Ok(updated > 0)
    }

    fn delete(&self, id: &str) -> StoreResult<bool> {
        let deleted = self.run(false, |p| p.execute("DELETE FROM keys WHERE id = $1", &[&id]))?;
        if deleted > 0 {
            self.wrote();
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
            Ok(changes.generation.load(Ordering::SeqCst))
        } else {
            Ok(changes.generation.fetch_add(1, Ordering::SeqCst) + 1)
        }
    }

    fn exists(&self, id: &str) -> StoreResult<bool> {
        let rows = self.run(true, |p| p.query("SELECT 1 FROM keys WHERE id = $1", &[&id]))?;
        Ok(!rows.is_empty())
    }
}
