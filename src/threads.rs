//! The shim's own threads (the SQLite change watcher, the PostgreSQL listener). They are started with every
//! signal blocked: a process-directed signal is delivered to any thread that does not block it, and a thread
//! of a library must never take one of the application's. nginx's master, for one, blocks its signals in its
//! own thread and waits for them in sigsuspend(2): a SIGQUIT or SIGCHLD taken by a thread of the shim's runs
//! nginx's handler there and leaves the master asleep, so it never quits.

use std::io;
use std::thread::{Builder, JoinHandle};

/// Spawns a thread named `name` running `f`, with every signal blocked in it (the calling thread's mask is
/// blocked across the spawn, which the new thread inherits, then restored).
pub fn spawn<F>(name: &str, f: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    // SAFETY: plain signal-mask calls on this thread with sigset_t values that live for the calls.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let spawned = Builder::new().name(name.into()).spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        spawned
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_shim_thread_blocks_every_signal_and_the_caller_keeps_its_mask() {
        // SAFETY: reading signal masks into zeroed sigset_t values.
        let mask = || unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set);
            [libc::SIGQUIT, libc::SIGCHLD, libc::SIGHUP, libc::SIGTERM, libc::SIGUSR1]
                .map(|sig| libc::sigismember(&set, sig) == 1)
        };
        let before = mask();
        let inside = super::spawn("p11shim-test", move || {
            assert_eq!(mask(), [true; 5], "every signal blocked in the shim's thread");
        })
        .expect("spawn")
        .join();
        assert!(inside.is_ok(), "the thread's check failed");
        assert_eq!(mask(), before, "the caller's mask is as it was");
    }
}
