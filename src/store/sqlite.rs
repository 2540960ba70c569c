//! The embedded key store: one SQLite file shared by the processes of one host.
//!
//! WAL lets readers run while one process writes; `busy_timeout` makes concurrent writers (threads or
//! processes) queue instead of failing; `synchronous=FULL` makes every commit durable, so a kill -9 or a
//! power cut loses at most the transaction in flight, never half a row. Every method is one statement, and
//! so one transaction, except `begin` (a transaction held open by the caller) and `audit_append` (read the
//! last entry and append after it, under the write lock).

use super::{
    chain, find_sql, foreign_schema, from_db, newer_schema, split_user, to_db, AuditDraft, AuditEntry, BadRow,
    KeyQuery, KeyRow, KeyStore, Param, RowRead, StoreError, StoreResult, StoreTx, UserDelete, UserRow, AUDIT_COLUMNS,
    COLUMNS, SCHEMA_VERSION, USER_COLUMNS,
};
use rusqlite::{ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a statement waits for another connection's write lock before it gives up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections kept for reuse; more are opened under load and closed when handed back.
const MAX_IDLE: usize = 8;

/// One migration per schema version, applied in order inside the opening transaction.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE keys (
        id        TEXT PRIMARY KEY NOT NULL,
        token     TEXT NOT NULL,
        grp       TEXT NOT NULL,
        class     INTEGER NOT NULL,
        key_type  INTEGER NOT NULL,
        label     BLOB NOT NULL,
        ckid      BLOB NOT NULL,
        attrs     BLOB NOT NULL,
        wrapped   BLOB NOT NULL,
        wrap_mech INTEGER NOT NULL,
        mbk       TEXT NOT NULL,
        mac       BLOB NOT NULL,
        version   INTEGER NOT NULL,
        created   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
    );
    CREATE INDEX keys_token_label ON keys(token, label);
    CREATE INDEX keys_token_ckid ON keys(token, ckid);
    CREATE INDEX keys_token_grp ON keys(token, grp);
    CREATE INDEX keys_token_class ON keys(token, class);",
    ),
    (
        2,
        "CREATE TABLE users (
        name        TEXT PRIMARY KEY NOT NULL,
        perm        TEXT NOT NULL,
        group_regex TEXT NOT NULL,
        auth        TEXT NOT NULL,
        secret      BLOB NOT NULL,
        version     INTEGER NOT NULL,
        created     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
    );
    -- scan() walks the keys in (token, id) order without sorting them all first.
    CREATE INDEX keys_token_id ON keys(token, id);",
    ),
    (
        3,
        "CREATE TABLE audit (
        seq    INTEGER PRIMARY KEY NOT NULL,
        time   TEXT NOT NULL,
        who    TEXT NOT NULL,
        action TEXT NOT NULL,
        grp    TEXT NOT NULL,
        count  INTEGER NOT NULL,
        result TEXT NOT NULL,
        prev   BLOB NOT NULL,
        hash   BLOB NOT NULL
    );",
    ),
    // PostgreSQL's notifications name the changed row from version 4; SQLite has nothing to change.
    (4, ""),
    (
        5,
        "ALTER TABLE users ADD COLUMN failed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE users ADD COLUMN last_failed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE users ADD COLUMN mac BLOB NOT NULL DEFAULT x'';
    ALTER TABLE audit ADD COLUMN mode TEXT NOT NULL DEFAULT '';
    ALTER TABLE audit ADD COLUMN mac BLOB NOT NULL DEFAULT x'';
    ALTER TABLE audit ADD COLUMN mbk TEXT NOT NULL DEFAULT '';",
    ),
    (
        6,
        "CREATE TABLE seal_keys (
        mbk     TEXT PRIMARY KEY NOT NULL,
        blob    BLOB NOT NULL,
        created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
    );",
    ),
];

pub struct SqliteStore {
    path: PathBuf,
    /// "sqlite:PATH", the name in every message.
    name: String,
    /// Connections not in use. The mutex guards only the push and pop, never a statement.
    idle: Mutex<Vec<Pooled>>,
    /// See [`KeyStore::generation`] below: bumped by this store's own commits and whenever one of its
    /// connections observes, through `PRAGMA data_version`, a commit made by any other connection.
    generation: Arc<AtomicU64>,
    /// True while the watcher thread keeps `generation` current (it clears it when it stops for any reason).
    watching: Arc<AtomicBool>,
    /// Stopped and joined when the store is dropped (C_Finalize): no thread of the shim outlives it.
    _watcher: Option<Watcher>,
    /// The WAL file's path, whose times each commit of this store touches (see [`SqliteStore::wrote`]).
    wal: std::ffi::CString,
}

/// After a change to the database's files, how long the watcher keeps looking for it to become visible (the
/// writer's WAL write comes before its fsync and its commit), and how often: every STEP_FIRST at first, then
/// less often, up to STEP_MAX.
const SETTLE: Duration = Duration::from_secs(2);
const STEP_FIRST: Duration = Duration::from_millis(1);
const STEP_FAST_LOOKS: u32 = 20;
const STEP_MAX: Duration = Duration::from_millis(250);

/// A SQLite connection opened and closed under [`crate::forks::quiet`]: opening and closing take SQLite's
/// process-wide mutexes too.
struct Conn(std::mem::ManuallyDrop<rusqlite::Connection>);

impl Conn {
    fn open(path: &Path, flags: OpenFlags) -> rusqlite::Result<Conn> {
        let _quiet = crate::forks::quiet();
        rusqlite::Connection::open_with_flags(path, flags).map(|c| Conn(std::mem::ManuallyDrop::new(c)))
    }
}

impl std::ops::Deref for Conn {
    type Target = rusqlite::Connection;
    fn deref(&self) -> &rusqlite::Connection {
        &self.0
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut rusqlite::Connection {
        &mut self.0
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let _quiet = crate::forks::quiet();
        // SAFETY: dropped once, here; the field is never used again.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.0) };
    }
}

struct Pooled {
    conn: Conn,
    /// The connection's `PRAGMA data_version` when this store last looked.
    data_version: i64,
}

/// A connection taken from the pool; handed back when dropped unless discarded after an error.
struct Lease<'a> {
    store: &'a SqliteStore,
    pooled: Option<Pooled>,
}

impl Lease<'_> {
    fn get(&mut self) -> &mut Pooled {
        self.pooled.as_mut().expect("lease used after discard")
    }

    /// Runs `f` on the connection; on an error the connection is closed rather than reused, since its state
    /// (an open transaction, a broken file handle) is unknown.
    fn run<T>(&mut self, f: impl FnOnce(&mut Pooled) -> rusqlite::Result<T>) -> StoreResult<T> {
        let _quiet = crate::forks::quiet();
        match f(self.get()) {
            Ok(value) => Ok(value),
            Err(e) => {
                self.pooled = None;
                Err(self.store.error(e))
            }
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(pooled) = self.pooled.take() {
            let mut idle = self.store.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(pooled);
            }
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed, mode 0600) the database file at `path` and brings its schema up to date.
    /// The directory must exist: a missing one is more likely a typo in the configuration than a wish.
    pub fn open(path: &Path) -> StoreResult<SqliteStore> {
        let name = format!("sqlite:{}", path.display());
        let url_error = |cause: String| StoreError::Url { url: name.clone(), cause };
        if path.as_os_str().is_empty() {
            return Err(url_error("no file name: use sqlite:PATH".into()));
        }
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            let what = if dir.exists() { "is not a directory" } else { "does not exist" };
            return Err(url_error(format!("directory {} {what}", dir.display())));
        }
        create_private(path).map_err(|e| StoreError::Unavailable {
            store: name.clone(),
            cause: format!("cannot create {}: {e}", path.display()),
        })?;

        let store = SqliteStore {
            path: path.to_path_buf(),
            name,
            idle: Mutex::new(Vec::new()),
            generation: Arc::new(AtomicU64::new(0)),
            watching: Arc::new(AtomicBool::new(false)),
            _watcher: None,
            wal: std::ffi::CString::new([path.as_os_str().as_encoded_bytes(), b"-wal"].concat()).map_err(|_| {
                StoreError::Url { url: format!("sqlite:{}", path.display()), cause: "the path holds a NUL byte".into() }
            })?,
        };
        let mut lease = store.lease()?;
        lease.run(|pooled| migrate(&mut pooled.conn))?.map_err(|found| store.schema_error(found))?;
        drop(lease);
        let watcher = Watcher::start(&store.path, store.generation.clone(), store.watching.clone())
            .inspect_err(|e| {
                crate::warn!("{}: cannot start the change watcher ({e}); checking on every use instead", store.name)
            })
            .ok();
        Ok(SqliteStore { _watcher: watcher, ..store })
    }

    fn lease(&self) -> StoreResult<Lease<'_>> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let pooled = match idle {
            Some(pooled) => pooled,
            None => self.connect()?,
        };
        Ok(Lease { store: self, pooled: Some(pooled) })
    }

    fn connect(&self) -> StoreResult<Pooled> {
        // Without SQLITE_OPEN_CREATE: `open` created the file; if it vanished since, an empty new store
        // would hide the loss.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let setup = || -> rusqlite::Result<(Conn, String)> {
            let conn = Conn::open(&self.path, flags)?;
            let _quiet = crate::forks::quiet();
            conn.busy_timeout(BUSY_TIMEOUT)?;
            let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            // 32 find variants plus the fixed statements.
            conn.set_prepared_statement_cache_capacity(48);
            Ok((conn, mode))
        };
        // Switching a new file to WAL takes an exclusive lock that SQLite does not wait for (the busy handler
        // is not called there): processes opening a fresh store at once get SQLITE_BUSY. Try again for as
        // long as a statement would wait.
        let started = Instant::now();
        let (conn, mode) = loop {
            match setup() {
                Err(e)
                    if matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
                        && started.elapsed() < BUSY_TIMEOUT =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                other => break other.map_err(|e| self.error(e))?,
            }
        };
        if !mode.eq_ignore_ascii_case("wal") {
            // e.g. a file system without shared memory: refuse rather than silently lose concurrency.
            return Err(StoreError::Unavailable {
                store: self.name.clone(),
                cause: format!("cannot use the WAL journal mode (got {mode})"),
            });
        }
        let data_version = {
            let _quiet = crate::forks::quiet();
            data_version(&conn).map_err(|e| self.error(e))?
        };
        // A new connection's data_version says nothing about commits made before it was opened; count it as
        // a change so that a generation read before those commits can never equal one read after them.
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(Pooled { conn, data_version })
    }

    fn error(&self, e: rusqlite::Error) -> StoreError {
        if e.sqlite_error_code() == Some(ErrorCode::NotADatabase) {
            return StoreError::Schema { store: self.name.clone(), cause: format!("not an SQLite database: {e}") };
        }
        StoreError::Unavailable { store: self.name.clone(), cause: e.to_string() }
    }

    fn schema_error(&self, found: Option<i64>) -> StoreError {
        match found {
            Some(found) => newer_schema(&self.name, found),
            None => foreign_schema(&self.name),
        }
    }

    /// Counts a commit made through this store (its own connection's data_version does not change for it),
    /// and tells the watchers of other processes that it is visible now: setting the WAL file's times is an
    /// inotify event they wait for (by path: no descriptor is opened, so none of SQLite's locks is touched).
    fn wrote(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        // SAFETY: a NUL-terminated path; NULL times mean "now". A failure only leaves the watchers to notice
        // the commit by looking (see Watcher).
        unsafe { libc::utimensat(libc::AT_FDCWD, self.wal.as_ptr(), std::ptr::null(), 0) };
    }
}

/// Creates `path` with mode 0600 if it does not exist, so that SQLite (which would use 0644) opens a private
/// file; SQLite gives its -wal and -shm files the database file's mode.
fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Applies the missing migrations in one IMMEDIATE transaction: the write lock is taken before the version
/// is read, so processes opening a fresh file at once apply each migration exactly once.
/// `Ok(Err(Some(v)))`: the file has a newer schema `v`; `Ok(Err(None))`: the file is not ours.
fn migrate(conn: &mut rusqlite::Connection) -> rusqlite::Result<Result<(), Option<i64>>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let had_versions: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version')",
        [],
        |r| r.get(0),
    )?;
    if !had_versions {
        let has_keys: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'keys')",
            [],
            |r| r.get(0),
        )?;
        if has_keys {
            return Ok(Err(None));
        }
        tx.execute_batch(
            "CREATE TABLE schema_version (
                version INTEGER PRIMARY KEY NOT NULL,
                applied TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
            )",
        )?;
    }
    let found: i64 = tx.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Ok(Err(Some(found)));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(version, _)| *version > found) {
        tx.execute_batch(sql)?;
        tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [version])?;
    }
    tx.commit()?;
    Ok(Ok(()))
}

/// The change watcher: a thread that sleeps in poll(2) until the database's files change (inotify on their
/// directory: every commit, by any process of this host, writes the WAL), then asks SQLite whether another
/// connection committed (`PRAGMA data_version`, on a connection of its own) and bumps the generation when one
/// did. A writer's WAL write comes before its commit is visible (its fsync and the WAL index update follow):
/// p11shim's own writers (this library, the p11shim command) touch the WAL file's times once the commit is
/// visible, which wakes the watcher at once; for any other writer it keeps asking for a while after each
/// change (SETTLE), every millisecond at first. So an idle process costs nothing, a change is seen as soon as
/// the watcher runs after a p11shim commit (within a few milliseconds of any other), and `generation()` —
/// called before every use of a loaded stored key — is an atomic load. The thread never holds a lock of the
/// shim's but [`crate::forks::quiet`] around its SQLite calls, and it is stopped (an eventfd) and joined when
/// the store is dropped.
struct Watcher {
    stop: OwnedFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(path: &Path, generation: Arc<AtomicU64>, watching: Arc<AtomicBool>) -> std::io::Result<Watcher> {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file = path.file_name().map(|f| f.as_encoded_bytes().to_vec()).unwrap_or_default();
        // SAFETY: plain system calls; the descriptors are owned from here on.
        let (inotify, stop) = unsafe {
            let inotify = libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK);
            if inotify < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let inotify = OwnedFd::from_raw_fd(inotify);
            let stop = libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK);
            if stop < 0 {
                return Err(std::io::Error::last_os_error());
            }
            (inotify, OwnedFd::from_raw_fd(stop))
        };
        let dir_c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::other("the directory's name holds a NUL byte"))?;
        let mask = libc::IN_MODIFY
            | libc::IN_ATTRIB
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM;
        // SAFETY: a valid descriptor and NUL-terminated path.
        if unsafe { libc::inotify_add_watch(inotify.as_raw_fd(), dir_c.as_ptr(), mask) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stop_fd = stop.as_raw_fd();
        let path = path.to_path_buf();
        let thread = crate::threads::spawn("p11shim-sqlite-watch", move || {
            watch(&path, &file, inotify, stop_fd, &generation, &watching)
        })?;
        Ok(Watcher { stop, thread: Some(thread) })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: an eventfd takes 8-byte writes.
        unsafe { libc::write(self.stop.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether an inotify event of the directory names the database or one of SQLite's files beside it.
fn concerns(file: &[u8], name: &[u8]) -> bool {
    let name = name.split(|b| *b == 0).next().unwrap_or_default();
    name.strip_prefix(file).is_some_and(|rest| matches!(rest, b"" | b"-wal" | b"-journal"))
}

/// The watcher thread's body (see [`Watcher`]).
fn watch(path: &Path, file: &[u8], inotify: OwnedFd, stop: i32, generation: &AtomicU64, watching: &AtomicBool) {
    struct Down<'a>(&'a AtomicBool);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }
    let _down = Down(watching);
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let opened = {
        let _quiet = crate::forks::quiet();
        Conn::open(path, flags).and_then(|conn| Ok((data_version(&conn)?, conn)))
    };
    let Ok((mut seen, conn)) = opened else { return };
    // Commits between the store's opening and this first look count once, so that nothing checked before
    // this moment passes for current.
    generation.fetch_add(1, Ordering::SeqCst);
    watching.store(true, Ordering::Release);
    let mut settle: Option<(Instant, Duration, u32)> = None;
    let mut events = [0u8; 4096];
    loop {
        let timeout = match settle {
            None => -1,
            Some((_, step, _)) => step.as_millis() as i32,
        };
        let mut fds = [
            libc::pollfd { fd: inotify.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two valid pollfds.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if ready < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents != 0 {
            let mut changed = false;
            loop {
                // SAFETY: reads into a buffer of its length.
                let n =
                    unsafe { libc::read(inotify.as_raw_fd(), events.as_mut_ptr() as *mut libc::c_void, events.len()) };
                if n <= 0 {
                    break;
                }
                let mut at = 0;
                while at + std::mem::size_of::<libc::inotify_event>() <= n as usize {
                    // SAFETY: the kernel wrote a whole event here (read unaligned from the byte buffer).
                    let event = unsafe { (events.as_ptr().add(at) as *const libc::inotify_event).read_unaligned() };
                    let start = at + std::mem::size_of::<libc::inotify_event>();
                    let name = &events[start..(start + event.len as usize).min(n as usize)];
                    changed |= event.mask & libc::IN_Q_OVERFLOW != 0 || concerns(file, name);
                    at = start + event.len as usize;
                }
            }
            if changed {
                settle = Some((Instant::now() + SETTLE, STEP_FIRST, 0));
            }
        }
        let Some((until, step, looks)) = settle else { continue };
        let current = {
            let _quiet = crate::forks::quiet();
            data_version(&conn)
        };
        match current {
            Ok(v) if v != seen => {
                seen = v;
                generation.fetch_add(1, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(_) => return,
        }
        settle = (Instant::now() < until).then(|| {
            let looks = looks + 1;
            (until, if looks < STEP_FAST_LOOKS { step } else { (step * 2).min(STEP_MAX) }, looks)
        });
    }
}

fn data_version(conn: &rusqlite::Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))
}

/// A row, or why it cannot be read when a column holds a value of the wrong type (written outside p11shim).
fn read_row_checked(r: &rusqlite::Row<'_>) -> rusqlite::Result<RowRead> {
    match read_row(r) {
        Ok(row) => Ok(RowRead::Row(row)),
        Err(
            e @ (rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)),
        ) => {
            let id = r.get::<_, String>(0).unwrap_or_else(|_| match r.get_ref(0) {
                Ok(v) => format!("with id {v:?}"),
                Err(_) => "without id".into(),
            });
            let (token, group) = (r.get(1).ok(), r.get(2).ok());
            Ok(RowRead::Bad(BadRow { id, token, group, cause: e.to_string() }))
        }
        Err(e) => Err(e),
    }
}

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRow> {
    Ok(KeyRow {
        id: r.get(0)?,
        token: r.get(1)?,
        group: r.get(2)?,
        class: from_db(r.get(3)?),
        key_type: from_db(r.get(4)?),
        label: r.get(5)?,
        ckid: r.get(6)?,
        attrs: r.get(7)?,
        wrapped: r.get(8)?,
        wrap_mech: from_db(r.get(9)?),
        mbk: r.get(10)?,
        mac: r.get(11)?,
        version: r.get(12)?,
    })
}

/// The placeholders of [`USER_COLUMNS`] and their values.
const USER_VALUES: &str = "?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9";

fn user_params(user: &UserRow) -> [&dyn rusqlite::ToSql; 9] {
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

fn read_user(r: &rusqlite::Row<'_>) -> rusqlite::Result<UserRow> {
    Ok(UserRow {
        name: r.get(0)?,
        perm: r.get(1)?,
        group_regex: r.get(2)?,
        auth: r.get(3)?,
        secret: r.get(4)?,
        version: r.get(5)?,
        failed: r.get(6)?,
        last_failed: r.get(7)?,
        mac: r.get(8)?,
    })
}

fn read_audit(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditEntry> {
    Ok(AuditEntry {
        seq: r.get(0)?,
        draft: AuditDraft {
            time: r.get(1)?,
            who: r.get(2)?,
            action: r.get(3)?,
            group: r.get(4)?,
            count: r.get(5)?,
            result: r.get(6)?,
            mode: r.get(9)?,
        },
        prev: r.get(7)?,
        hash: r.get(8)?,
        mac: r.get(10)?,
        mbk: r.get(11)?,
    })
}

/// Inserts `row`; with `replace`, an existing row of that id is overwritten whatever its version.
/// The number of rows written (0: the id exists and `replace` is false).
fn write_key(conn: &rusqlite::Connection, row: &KeyRow, replace: bool) -> rusqlite::Result<usize> {
    let conflict = if replace {
        "DO UPDATE SET token = excluded.token, grp = excluded.grp, class = excluded.class, \
         key_type = excluded.key_type, label = excluded.label, ckid = excluded.ckid, attrs = excluded.attrs, \
         wrapped = excluded.wrapped, wrap_mech = excluded.wrap_mech, mbk = excluded.mbk, mac = excluded.mac, \
         version = excluded.version"
    } else {
        "DO NOTHING"
    };
    let sql = format!(
        "INSERT INTO keys ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
         ON CONFLICT (id) {conflict}"
    );
    conn.prepare_cached(&sql)?.execute(rusqlite::params![
        row.id,
        row.token,
        row.group,
        to_db(row.class),
        to_db(row.key_type),
        row.label,
        row.ckid,
        row.attrs,
        row.wrapped,
        to_db(row.wrap_mech),
        row.mbk,
        row.mac,
        row.version,
    ])
}

impl SqliteStore {
    /// Steps one statement over `sql`, handing each row read by `read` to `f`: the statement's read
    /// transaction is the snapshot, and only the current row is in memory. An error of `f` stops the scan
    /// and is returned as it is (the connection stays usable).
    fn stream<T>(
        &self,
        sql: &str,
        read: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
        f: &mut dyn FnMut(T) -> StoreResult<()>,
    ) -> StoreResult<()> {
        let mut lease = self.lease()?;
        let mut stopped = None;
        lease.run(|p| {
            let mut stmt = p.conn.prepare(sql)?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                if let Err(e) = f(read(row)?) {
                    stopped = Some(e);
                    break;
                }
            }
            Ok(())
        })?;
        stopped.map_or(Ok(()), Err)
    }
}

/// A transaction on one leased connection (see [`KeyStore::begin`]); rolled back when dropped uncommitted.
struct SqliteTx<'a> {
    lease: Lease<'a>,
    open: bool,
}

impl StoreTx for SqliteTx<'_> {
    fn insert(&mut self, row: &KeyRow) -> StoreResult<()> {
        if self.lease.run(|p| write_key(&p.conn, row, false))? == 0 {
            return Err(StoreError::Duplicate { store: self.lease.store.name.clone(), id: row.id.clone() });
        }
        Ok(())
    }

    fn replace(&mut self, row: &KeyRow) -> StoreResult<()> {
        self.lease.run(|p| write_key(&p.conn, row, true)).map(drop)
    }

    fn exists(&mut self, id: &str) -> StoreResult<bool> {
        self.lease.run(|p| {
            p.conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM keys WHERE id = ?1)")?.query_row([id], |r| r.get(0))
        })
    }

    fn commit(mut self: Box<Self>) -> StoreResult<()> {
        self.open = false;
        self.lease.run(|p| p.conn.execute_batch("COMMIT"))?;
        self.lease.store.wrote();
        Ok(())
    }
}

impl Drop for SqliteTx<'_> {
    fn drop(&mut self) {
        if self.open && self.lease.pooled.is_some() {
            // A connection whose rollback failed is closed rather than pooled (closing rolls back).
            let _ = self.lease.run(|p| p.conn.execute_batch("ROLLBACK"));
        }
    }
}

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Param::Text(s) => s.to_sql(),
            Param::Int(n) => n.to_sql(),
            Param::Blob(b) => b.to_sql(),
        }
    }
}

impl KeyStore for SqliteStore {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn insert(&self, row: &KeyRow) -> StoreResult<()> {
        let inserted = self.lease()?.run(|p| write_key(&p.conn, row, false))?;
        if inserted == 0 {
            return Err(StoreError::Duplicate { store: self.name.clone(), id: row.id.clone() });
        }
        self.wrote();
        Ok(())
    }

    fn get(&self, id: &str) -> StoreResult<Option<KeyRow>> {
        let sql = format!("SELECT {COLUMNS} FROM keys WHERE id = ?1");
        let read = self.lease()?.run(|p| p.conn.prepare_cached(&sql)?.query_row([id], read_row_checked).optional())?;
        match read {
            None => Ok(None),
            Some(RowRead::Row(row)) => Ok(Some(row)),
            Some(RowRead::Bad(bad)) => Err(StoreError::BadRow { store: self.name.clone(), row: Box::new(bad) }),
        }
    }

    fn find(&self, query: &KeyQuery) -> StoreResult<Vec<KeyRow>> {
        let (sql, params) = find_sql(query, |n| format!("?{n}"), "+id");
        self.lease()?
            .run(|p| {
                let mut stmt = p.conn.prepare_cached(&sql)?;
                let rows = stmt.query_map(rusqlite::params_from_iter(params.iter()), read_row_checked)?;
                rows.collect::<rusqlite::Result<Vec<RowRead>>>()
            })
            .map(|rows| super::readable(&self.name, rows))
    }

    fn update(&self, row: &KeyRow) -> StoreResult<bool> {
        // One statement: the version check and the write are atomic without an explicit transaction.
        let sql = "UPDATE keys SET token = ?2, grp = ?3, class = ?4, key_type = ?5, label = ?6, ckid = ?7, \
                   attrs = ?8, wrapped = ?9, wrap_mech = ?10, mbk = ?11, mac = ?12, version = ?13 \
                   WHERE id = ?1 AND version = ?14";
        let updated = self.lease()?.run(|p| {
            p.conn.prepare_cached(sql)?.execute(rusqlite::params![
                row.id,
                row.token,
                row.group,
                to_db(row.class),
                to_db(row.key_type),
                row.label,
                row.ckid,
                row.attrs,
                row.wrapped,
                to_db(row.wrap_mech),
                row.mbk,
                row.mac,
                row.version,
                row.version.wrapping_sub(1),
            ])
        })?;
        if updated > 0 {
            self.wrote();
        }
        Ok(updated > 0)
    }

    fn delete(&self, id: &str) -> StoreResult<bool> {
        let deleted = self.lease()?.run(|p| p.conn.prepare_cached("DELETE FROM keys WHERE id = ?1")?.execute([id]))?;
        if deleted > 0 {
            self.wrote();
        }
        Ok(deleted > 0)
    }

    /// `PRAGMA data_version` changes, for one connection, whenever any *other* connection (in this process
    /// or another) commits; it is local (no I/O when nothing changed) but per connection, and a pooled
    /// connection's own commits leave it unchanged. So the generation is a per-store counter bumped (a) by
    /// each commit of this store, (b) when a connection sees its data_version move since it last looked,
    /// and (c) when a connection is opened. Every bump happens before the connection goes back to the pool,
    /// so any generation read after a commit differs from every generation read before it, whichever
    /// pooled connection serves the call. Spurious bumps only cost a re-validation.
    fn generation(&self) -> StoreResult<u64> {
        // While the watcher runs, an atomic load. A watcher that ended, or never started, leaves this call to
        // look itself.
        if self.watching.load(Ordering::Acquire) {
            return Ok(self.generation.load(Ordering::Acquire));
        }
        let mut lease = self.lease()?;
        let current = lease.run(|p| data_version(&p.conn))?;
        let pooled = lease.get();
        if current != pooled.data_version {
            pooled.data_version = current;
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        Ok(self.generation.load(Ordering::SeqCst))
    }

    fn exists(&self, id: &str) -> StoreResult<bool> {
        self.lease()?.run(|p| {
            p.conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM keys WHERE id = ?1)")?.query_row([id], |r| r.get(0))
        })
    }

    fn scan_rows(&self, f: &mut dyn FnMut(RowRead) -> StoreResult<()>) -> StoreResult<()> {
        self.stream(&format!("SELECT {COLUMNS} FROM keys ORDER BY token, id"), read_row_checked, f)
    }

    fn key_counts(&self) -> StoreResult<Vec<(String, String, u64)>> {
        self.lease()?.run(|p| {
            let mut stmt = p.conn.prepare(
                "SELECT CAST(token AS TEXT), CAST(grp AS TEXT), COUNT(*) FROM keys GROUP BY 1, 2 ORDER BY 1, 2",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))?;
            rows.collect()
        })
    }

    fn seal_key(&self, mbk: &str) -> StoreResult<Option<Vec<u8>>> {
        self.lease()?.run(|p| {
            p.conn
                .prepare_cached("SELECT blob FROM seal_keys WHERE mbk = ?1")?
                .query_row([mbk], |r| r.get(0))
                .optional()
        })
    }

    fn seal_key_insert(&self, mbk: &str, blob: &[u8]) -> StoreResult<bool> {
        let n = self.lease()?.run(|p| {
            p.conn
                .prepare_cached("INSERT INTO seal_keys (mbk, blob) VALUES (?1, ?2) ON CONFLICT (mbk) DO NOTHING")?
                .execute(rusqlite::params![mbk, blob])
        })?;
        self.wrote();
        Ok(n == 1)
    }

    fn sealed_under(&self, mbk: &str) -> StoreResult<bool> {
        self.lease()?.run(|p| {
            p.conn
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM keys WHERE mbk = ?1) OR EXISTS (SELECT 1 FROM audit WHERE mbk = ?1)",
                )?
                .query_row([mbk], |r| r.get(0))
        })
    }

    fn seal_keys(&self) -> StoreResult<Vec<(String, Vec<u8>)>> {
        self.lease()?.run(|p| {
            let mut stmt = p.conn.prepare_cached("SELECT mbk, blob FROM seal_keys ORDER BY mbk")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    fn schema_version(&self) -> StoreResult<i64> {
        self.lease()?
            .run(|p| p.conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| r.get(0)))
    }

    fn begin(&self) -> StoreResult<Box<dyn StoreTx + '_>> {
        let mut lease = self.lease()?;
        lease.run(|p| p.conn.execute_batch("BEGIN IMMEDIATE"))?;
        Ok(Box::new(SqliteTx { lease, open: true }))
    }

    fn user_insert(&self, user: &UserRow) -> StoreResult<()> {
        let sql = format!("INSERT INTO users ({USER_COLUMNS}) VALUES ({USER_VALUES}) ON CONFLICT (name) DO NOTHING");
        let inserted = self.lease()?.run(|p| p.conn.prepare_cached(&sql)?.execute(user_params(user)))?;
        if inserted == 0 {
            return Err(StoreError::Duplicate { store: self.name.clone(), id: user.name.clone() });
        }
        Ok(())
    }

    fn user_insert_first(&self, user: &UserRow) -> StoreResult<bool> {
        let sql = format!("INSERT INTO users ({USER_COLUMNS}) VALUES ({USER_VALUES})");
        self.lease()?.run(|p| {
            // IMMEDIATE: the write lock is taken before the table is looked at, so two first users cannot
            // both find it empty.
            let tx = p.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let any: bool = tx.prepare_cached("SELECT EXISTS (SELECT 1 FROM users)")?.query_row([], |r| r.get(0))?;
            if any {
                return Ok(false);
            }
            tx.prepare_cached(&sql)?.execute(user_params(user))?;
            tx.commit()?;
            Ok(true)
        })
    }

    fn user_update(&self, user: &UserRow) -> StoreResult<bool> {
        let sql = "UPDATE users SET perm = ?2, group_regex = ?3, auth = ?4, secret = ?5, version = ?6, failed = ?7, \
                   last_failed = ?8, mac = ?9 WHERE name = ?1 AND version = ?10";
        let updated = self.lease()?.run(|p| {
            let mut params = user_params(user).to_vec();
            let previous = user.version.wrapping_sub(1);
            params.push(&previous);
            p.conn.prepare_cached(sql)?.execute(params.as_slice())
        })?;
        Ok(updated > 0)
    }

    fn user_get(&self, name: &str) -> StoreResult<Option<UserRow>> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE name = ?1");
        self.lease()?.run(|p| p.conn.prepare_cached(&sql)?.query_row([name], read_user).optional())
    }

    fn user_list(&self) -> StoreResult<Vec<UserRow>> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users ORDER BY name");
        self.lease()?.run(|p| p.conn.prepare_cached(&sql)?.query_map([], read_user)?.collect())
    }

    fn user_delete(&self, name: &str) -> StoreResult<bool> {
        let deleted =
            self.lease()?.run(|p| p.conn.prepare_cached("DELETE FROM users WHERE name = ?1")?.execute([name]))?;
        Ok(deleted > 0)
    }

    fn user_delete_if(&self, name: &str, allowed: &dyn Fn(&[UserRow]) -> bool) -> StoreResult<UserDelete> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users ORDER BY name");
        self.lease()?.run(|p| {
            // IMMEDIATE: the write lock is taken before the users are read.
            let tx = p.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let users = tx.prepare_cached(&sql)?.query_map([], read_user)?.collect::<rusqlite::Result<Vec<_>>>()?;
            let (victim, rest) = split_user(users, name);
            let Some(victim) = victim else { return Ok(UserDelete::NotFound) };
            if !allowed(&rest) {
                return Ok(UserDelete::Refused(victim));
            }
            tx.prepare_cached("DELETE FROM users WHERE name = ?1")?.execute([name])?;
            tx.commit()?;
            Ok(UserDelete::Deleted(victim))
        })
    }

    fn audit_append(&self, draft: AuditDraft, seal: super::AuditSeal) -> StoreResult<AuditEntry> {
        let insert =
            format!("INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)");
        self.lease()?.run(|p| {
            // IMMEDIATE: the write lock is taken before the last entry is read, so appenders in other
            // connections and processes queue (busy_timeout) and each sees its predecessor's entry.
            let tx = p.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let last = tx
                .prepare_cached("SELECT seq, hash, mac FROM audit ORDER BY seq DESC LIMIT 1")?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            let entry = match chain(last, draft, seal) {
                Ok(entry) => entry,
                Err(e) => return Ok(Err(e)),
            };
            let d = &entry.draft;
            tx.prepare_cached(&insert)?.execute(rusqlite::params![
                entry.seq, d.time, d.who, d.action, d.group, d.count, d.result, entry.prev, entry.hash, d.mode,
                entry.mac, entry.mbk
            ])?;
            tx.commit()?;
            Ok(Ok(entry))
        })?
    }

    fn audit_scan(&self, f: &mut dyn FnMut(AuditEntry) -> StoreResult<()>) -> StoreResult<()> {
        self.stream(&format!("SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq"), read_audit, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    #[test]
    fn the_watcher_runs_and_with_it_down_every_call_looks() {
        let dir = dir();
        let path = dir.path().join("keys.db");
        let mut store = SqliteStore::open(&path).expect("open");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !store.watching.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the watcher never started");
            std::thread::sleep(Duration::from_millis(5));
        }
        let other = rusqlite::Connection::open(&path).expect("a second connection");
        // The watcher down (stopped and joined, as when it could not start or its connection failed).
        store._watcher = None;
        assert!(!store.watching.load(Ordering::Acquire), "a stopped watcher says so");
        let before = store.generation().expect("generation");
        other.execute("UPDATE schema_version SET version = version", []).expect("a commit elsewhere");
        assert_ne!(store.generation().expect("generation"), before, "seen by the very next call, without a watcher");
        let after = store.generation().expect("generation");
        assert_eq!(store.generation().expect("generation"), after, "and no change without a commit");
    }

    #[test]
    fn the_wal_is_touched_by_each_commit() {
        let dir = dir();
        let path = dir.path().join("keys.db");
        let store = SqliteStore::open(&path).expect("open");
        let wal = dir.path().join("keys.db-wal");
        let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        std::fs::File::options().write(true).open(&wal).expect("the WAL").set_modified(old).expect("set mtime");
        store.wrote();
        let now = std::fs::metadata(&wal).expect("the WAL").modified().expect("mtime");
        assert!(now > old + Duration::from_secs(1_000_000), "the WAL's times were not touched: {now:?}");
    }
}
