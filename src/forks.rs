//! Forks while another thread holds a lock. A child forked while another thread of its parent holds a mutex
//! finds it locked forever: SQLite's process-wide mutexes (its allocator, page cache, open-file list; nginx's
//! workers hung in their first SQLite call), and the shim's own tables, which a child's first call takes.
//! So every SQLite call of the shim's, from its own watcher thread or an application's thread, holds
//! [`quiet`]'s read lock, and a `pthread_atfork` handler (registered at the first C_Initialize) takes, before
//! the fork, the shim's process-wide locks and that lock for writing, and releases them on both sides after: a
//! fork waits until no thread of the shim is inside SQLite or one of its tables (a few microseconds, or one
//! statement: a backup's scan is one), and the child starts with every one of them free. The handlers do
//! nothing else.
//!
//! The locks are taken in the order the code nests them (the vault's handle, the handle and owned-object
//! tables, the session table, then SQLite's), so the handler cannot deadlock with another thread. None of the
//! tables is held across a call into the backend; SQLite's lock is, only in a backup's scan (its callback
//! checks each row's MAC in the HSM): a backend that forked inside such a call would wait for the scan.

use std::cell::RefCell;
use std::sync::{Once, RwLock, RwLockReadGuard, RwLockWriteGuard};

static LOCK: RwLock<()> = RwLock::new(());
static REGISTER: Once = Once::new();

/// The locks the forking thread holds, from the prepare handler to the parent's or child's.
struct Held {
    _vault: Box<dyn std::any::Any>,
    _objects: Box<dyn std::any::Any>,
    _sessions: Box<dyn std::any::Any>,
    _sqlite: RwLockWriteGuard<'static, ()>,
}

thread_local! {
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

/// Registers the fork handlers, once per process (C_Initialize).
pub fn register() {
    REGISTER.call_once(|| {
        // SAFETY: the handlers are plain functions of this library, which is never unloaded (-z nodelete).
        let rv = unsafe { libc::pthread_atfork(Some(prepare), Some(release), Some(release)) };
        if rv != 0 {
            crate::warn!("pthread_atfork failed ({rv}): a process forked while the shim is busy may hang");
        }
    });
}

thread_local! {
    /// How many [`Quiet`] guards this thread holds: only the outermost takes the lock (a read lock taken again
    /// by its holder while a fork waits for the write lock would wait forever).
    static DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// See [`quiet`].
pub struct Quiet {
    _read: Option<RwLockReadGuard<'static, ()>>,
}

impl Drop for Quiet {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// Held across one call into SQLite (opening and closing a connection included): no fork happens meanwhile.
/// A thread may nest them (a scan's callback that calls the store again).
pub fn quiet() -> Quiet {
    register();
    let outer = DEPTH.with(|d| {
        d.set(d.get() + 1);
        d.get() == 1
    });
    Quiet { _read: outer.then(|| LOCK.read().unwrap_or_else(|e| e.into_inner())) }
}

extern "C" fn prepare() {
    let vault = crate::vault::fork_guard();
    let objects = crate::objects::fork_guard();
    let sessions = crate::sessions::fork_guard();
    let sqlite = LOCK.write().unwrap_or_else(|e| e.into_inner());
    HELD.with(|h| {
        *h.borrow_mut() = Some(Held { _vault: vault, _objects: objects, _sessions: sessions, _sqlite: sqlite })
    });
}

extern "C" fn release() {
    HELD.with(|h| drop(h.borrow_mut().take()));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests share the one fork lock: each runs alone, so that no other test's threads hold it when one
    /// checks that it is free.
    static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn alone() -> std::sync::MutexGuard<'static, ()> {
        ALONE.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[test]
    fn a_child_forked_while_threads_use_the_shims_tables_finds_them_free() {
        let _alone = alone();
        use std::sync::atomic::{AtomicBool, Ordering};
        register();
        static STOP: AtomicBool = AtomicBool::new(false);
        let busy: Vec<_> = (0..2u64)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !STOP.load(Ordering::Relaxed) {
                        n += 1;
                        // A new alias (the handle table, written) and a session (the session table).
                        crate::objects::from_backend(crate::objects::SHIM_HANDLE_BIT | (t << 40) | n);
                        crate::sessions::opened_by_app(t << 40 | n, 0);
                        crate::sessions::closed_by_app(t << 40 | n);
                        drop(quiet());
                    }
                })
            })
            .collect();
        let mut hung = 0;
        for _ in 0..200 {
            // SAFETY: fork in a test; the child makes a few calls of this crate and leaves with _exit.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: a signal ends a child that hangs on a lock its parent's thread held at the fork.
                unsafe { libc::alarm(5) };
                crate::objects::from_backend(crate::objects::SHIM_HANDLE_BIT | 7);
                crate::sessions::opened_by_app(7, 0);
                let _ = crate::objects::owned_handles();
                drop(quiet());
                // SAFETY: end the child without running the test harness's destructors.
                unsafe { libc::_exit(0) };
            }
            assert!(pid > 0, "fork");
            let mut status = 0;
            // SAFETY: waiting for our own child.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
                hung += 1;
            }
        }
        STOP.store(true, Ordering::Relaxed);
        for t in busy {
            t.join().unwrap();
        }
        assert_eq!(hung, 0, "children that hung on a lock held at the fork, of 200");
    }

    #[test]
    fn a_thread_may_nest_quiet_while_a_fork_waits() {
        let _alone = alone();
        register();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let outer = quiet();
            let forker = std::thread::spawn(|| {
                // SAFETY: fork in a test; the child leaves at once.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    // SAFETY: end the child without running the test harness's destructors.
                    unsafe { libc::_exit(0) };
                }
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
            });
            // The fork now waits for the write lock; a scan's callback calls the store again.
            std::thread::sleep(std::time::Duration::from_millis(50));
            let inner = quiet();
            drop(inner);
            drop(outer);
            forker.join().unwrap();
            done.send(()).unwrap();
        });
        assert!(finished.recv_timeout(std::time::Duration::from_secs(10)).is_ok(), "deadlocked");
    }

    #[test]
    fn a_fork_waits_for_sqlite_calls_and_the_child_is_free() {
        let _alone = alone();
        drop(quiet());
        // SAFETY: fork in a test; the child only takes the lock and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // The lock the prepare handler took is released in the child: a call proceeds at once.
            let free = LOCK.try_write().is_ok();
            // SAFETY: end the child without running the test harness's destructors.
            unsafe { libc::_exit(if free { 0 } else { 1 }) };
        }
        assert!(pid > 0, "fork");
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child found the lock free");
        assert!(LOCK.try_write().is_ok(), "and so does the parent");
    }
}
