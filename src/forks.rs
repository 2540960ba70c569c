//! Forks while a thread is inside SQLite. SQLite keeps process-wide mutexes (its allocator, page cache,
//! open-file list); a child forked while another thread holds one finds it locked forever, and hangs in its
//! first SQLite call (nginx's workers did, in C_Initialize). So every SQLite call of the shim's, from its own
//! watcher thread or an application's thread, holds [`quiet`]'s read lock, and a `pthread_atfork` handler
//! takes the write lock before the fork and releases it on both sides after: a fork waits until no thread of
//! the shim is inside SQLite (a few microseconds, or one statement), and the child starts with SQLite's
//! mutexes free. The handlers do nothing else.

use std::cell::RefCell;
use std::sync::{Once, RwLock, RwLockReadGuard, RwLockWriteGuard};

static LOCK: RwLock<()> = RwLock::new(());
static REGISTER: Once = Once::new();

thread_local! {
    /// The write lock taken by the forking thread, from the prepare handler to the parent's or child's.
    static HELD: RefCell<Option<RwLockWriteGuard<'static, ()>>> = const { RefCell::new(None) };
}

/// Held across one call into SQLite: no fork happens meanwhile.
pub fn quiet() -> RwLockReadGuard<'static, ()> {
    REGISTER.call_once(|| {
        // SAFETY: the handlers are plain functions of this library, which is never unloaded (-z nodelete).
        let rv = unsafe { libc::pthread_atfork(Some(prepare), Some(release), Some(release)) };
        if rv != 0 {
            crate::warn!("pthread_atfork failed ({rv}): a process forked while the shim uses SQLite may hang");
        }
    });
    LOCK.read().unwrap_or_else(|e| e.into_inner())
}

extern "C" fn prepare() {
    let guard = LOCK.write().unwrap_or_else(|e| e.into_inner());
    HELD.with(|h| *h.borrow_mut() = Some(guard));
}

extern "C" fn release() {
    HELD.with(|h| drop(h.borrow_mut().take()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fork_waits_for_sqlite_calls_and_the_child_is_free() {
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
