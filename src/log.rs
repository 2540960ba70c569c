//! The shim's log: off by default (a library must not write to an application's stderr unless asked).
//! `log_file`/`log_level` in the config turn it on. Set-up failures are always reported, to the log file when
//! one is configured, else to stderr, as one line. PINs and key values are never passed here.

use std::fs::File;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::SystemTime;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Level {
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Off => "OFF",
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        }
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Off as u8);
/// The log's file descriptor (-1: none), opened O_APPEND. A line is one write(2), so lines from threads and
/// processes never interleave, and no lock is taken: a process forked while another thread logs must not find
/// a lock held by a thread it does not have. The descriptor keeps its number while it is the shim's: a new
/// log file is dup3'ed onto it, so a thread writing meanwhile writes to the old file or the new one, never
/// to a descriptor reused for something else.
static FD: AtomicI32 = AtomicI32::new(-1);
/// The file the descriptor was opened on (st_dev, st_ino): a descriptor that no longer shows it was closed
/// by the application (a daemon that closes every descriptor after fork), and its number is not ours.
static DEV: AtomicU64 = AtomicU64::new(0);
static INO: AtomicU64 = AtomicU64::new(0);
/// The configured path while logging is on, else null. Each path is leaked, never freed (a thread may be
/// reading the old one while C_Initialize sets another); C_Initialize with the same path reuses it.
static PATH: AtomicPtr<PathBuf> = AtomicPtr::new(std::ptr::null_mut());
/// When the path was last compared with the descriptor: the second since the epoch, and the process.
static CHECKED_SECOND: AtomicU64 = AtomicU64::new(0);
static CHECKED_PID: AtomicU32 = AtomicU32::new(0);
/// A failed reopen was reported (once, to the file still open), until a reopen succeeds.
static REOPEN_FAILED: AtomicBool = AtomicBool::new(false);

/// Points the log at `file` (appending; created 0600, never through a symbolic link, a regular file only)
/// with `level`; `None` turns logging off.
pub fn configure(file: Option<&Path>, level: Level) -> std::io::Result<()> {
    let Some(path) = file else {
        LEVEL.store(Level::Off as u8, Ordering::Relaxed);
        PATH.store(std::ptr::null_mut(), Ordering::Release);
        return Ok(());
    };
    install(crate::files::open_append_private(path)?)?;
    // SAFETY: PATH is null or a leaked PathBuf, never freed.
    if unsafe { PATH.load(Ordering::Acquire).as_ref() }.is_none_or(|p| p != path) {
        PATH.store(Box::into_raw(Box::new(path.to_path_buf())), Ordering::Release);
    }
    REOPEN_FAILED.store(false, Ordering::Relaxed);
    LEVEL.store(level as u8, Ordering::Relaxed);
    Ok(())
}

/// Whether a log file can be opened at `path` (see [`crate::files::check_append_target`]); nothing is created.
pub fn check_file(path: &Path) -> std::io::Result<()> {
    crate::files::check_append_target(path)
}

/// Makes `file` the log: dup3'ed onto the shim's descriptor, or, when there is none or its number is someone
/// else's now, as a new one (the old number is left to its owner).
fn install(file: File) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    let current = FD.load(Ordering::Acquire);
    if fd_identity(current) == Some((DEV.load(Ordering::Relaxed), INO.load(Ordering::Relaxed))) {
        dup_onto(file.as_raw_fd(), current)?;
    } else if FD.compare_exchange(current, file.as_raw_fd(), Ordering::AcqRel, Ordering::Acquire).is_ok() {
        let _ = file.into_raw_fd();
    } else {
        // Another thread installed one meanwhile: that one is the log.
        return Ok(());
    }
    DEV.store(meta.dev(), Ordering::Relaxed);
    INO.store(meta.ino(), Ordering::Relaxed);
    Ok(())
}

/// `from` onto `to`, atomically, keeping close-on-exec.
fn dup_onto(from: i32, to: i32) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    // SAFETY: both are open descriptors of this process; dup3 replaces `to` atomically.
    let rv = unsafe { libc::dup3(from, to, libc::O_CLOEXEC) };
    #[cfg(not(target_os = "linux"))]
    // SAFETY: as above; the flag is set again on the new descriptor.
    let rv = unsafe {
        match libc::dup2(from, to) {
            rv if rv < 0 => rv,
            _ => libc::fcntl(to, libc::F_SETFD, libc::FD_CLOEXEC),
        }
    };
    if rv < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[inline]
pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

/// Writes one line if `level` is enabled.
pub fn write(level: Level, message: std::fmt::Arguments<'_>) {
    if enabled(level) {
        let now = SystemTime::now();
        let pid = std::process::id();
        follow_rotation(now, pid);
        emit(FD.load(Ordering::Acquire), &line(now, pid, level, message));
    }
}

/// Follows the file when it was moved or removed (logrotate's `create`, or `mv` and a new file): at most once
/// a second, and at the first line of a forked child, one thread compares the path's (st_dev, st_ino) with
/// the descriptor's, and reopens the path if they differ or nothing is there, so the next lines go to the new
/// file. `copytruncate` needs nothing: O_APPEND writes at the new end. Lines written between the move and
/// the check, or by other threads while the check reopens, go to the moved file: none is lost. No lock, no
/// thread: two syscalls a second.
fn follow_rotation(now: SystemTime, pid: u32) {
    let second = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let last = CHECKED_SECOND.load(Ordering::Relaxed);
    if last == second && CHECKED_PID.load(Ordering::Relaxed) == pid {
        return;
    }
    // One thread checks; the others write on meanwhile.
    if CHECKED_SECOND.compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed).is_err() {
        return;
    }
    CHECKED_PID.store(pid, Ordering::Relaxed);
    // SAFETY: PATH is null or a leaked PathBuf, never freed.
    let Some(path) = (unsafe { PATH.load(Ordering::Acquire).as_ref() }) else { return };
    // A descriptor that does not show the file it was opened on is someone else's now (or closed, or none
    // since a failed reopen): the log gets a new one, and the old number is left to its owner.
    let fd = FD.load(Ordering::Acquire);
    let (ours, current) = match fd_identity(fd) {
        Some(id) => (id == (DEV.load(Ordering::Relaxed), INO.load(Ordering::Relaxed)), id),
        None => (false, (0, 0)),
    };
    if ours {
        use std::os::unix::fs::MetadataExt;
        match std::fs::symlink_metadata(path) {
            Ok(meta) if (meta.dev(), meta.ino()) == current => return,
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return,
            _ => {}
        }
    }
    match crate::files::open_append_private(path).and_then(install) {
        Ok(()) => REOPEN_FAILED.store(false, Ordering::Relaxed),
        Err(_) if !ours => {
            // Never a line into a descriptor that is not the log's; the next check tries again.
            let _ = FD.compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Relaxed);
        }
        Err(e) => {
            if !REOPEN_FAILED.swap(true, Ordering::Relaxed) {
                let text = format_args!(
                    "log_file {}: cannot reopen it after it was moved or removed ({e}); writing on to the moved file",
                    path.display()
                );
                emit(fd, &line(now, pid, Level::Warn, text));
            }
        }
    }
}

/// The (st_dev, st_ino) of an open descriptor, None if it is not open.
fn fd_identity(fd: i32) -> Option<(u64, u64)> {
    if fd < 0 {
        return None;
    }
    // SAFETY: fstat fills the zeroed struct it is given; a descriptor that is not open gives EBADF.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid stat to fill.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    Some((st.st_dev as u64, st.st_ino as u64))
}

/// A fatal set-up error: to the log file when there is one, else to stderr, whatever the level.
pub fn fatal(message: std::fmt::Arguments<'_>) {
    let (now, pid) = (SystemTime::now(), std::process::id());
    let on = LEVEL.load(Ordering::Relaxed) != Level::Off as u8;
    if on {
        follow_rotation(now, pid);
    }
    let fd = match FD.load(Ordering::Acquire) {
        fd if fd >= 0 && on => fd,
        _ => libc::STDERR_FILENO,
    };
    emit(fd, &line(now, pid, Level::Error, message));
}

/// One line, in one write(2) (O_APPEND makes it atomic against other writers of the file).
fn emit(fd: i32, text: &str) {
    if fd < 0 {
        return;
    }
    let mut bytes = Vec::with_capacity(text.len() + 1);
    bytes.extend_from_slice(text.as_bytes());
    bytes.push(b'\n');
    // SAFETY: `bytes` is valid for its length; a failed write of a log line is not worth an error.
    let _ = unsafe { libc::write(fd, bytes.as_ptr() as *const libc::c_void, bytes.len()) };
}

fn line(now: SystemTime, pid: u32, level: Level, message: std::fmt::Arguments<'_>) -> String {
    format!("{} p11shim[{pid}] {}: {}", humantime::format_rfc3339_millis(now), level.name(), message)
}

#[macro_export]
macro_rules! log_at {
    ($level:expr, $($arg:tt)*) => {
        if $crate::log::enabled($level) {
            $crate::log::write($level, format_args!($($arg)*))
        }
    };
}
#[macro_export]
macro_rules! error { ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Error, $($arg)*) }; }
#[macro_export]
macro_rules! warn { ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Warn, $($arg)*) }; }
#[macro_export]
macro_rules! info { ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Info, $($arg)*) }; }
#[macro_export]
macro_rules! debug { ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Debug, $($arg)*) }; }

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads log while the file is moved away: every line is whole, none is lost, and once the check has
    /// run the lines go to the new file (lines of other threads written while the check reopens it may still
    /// go to the moved one). Other unit tests of this process may log meanwhile: only this test's lines count.
    #[test]
    fn threads_logging_across_a_move_lose_no_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("shim.log");
        configure(Some(&log), Level::Info).unwrap();
        let write_lines = |tag: &'static str| {
            let threads: Vec<_> = (0..4)
                .map(|t| {
                    std::thread::spawn(move || {
                        for i in 0..500 {
                            write(Level::Info, format_args!("rotation-test {tag} thread {t} line {i} end"));
                        }
                    })
                })
                .collect();
            threads.into_iter().for_each(|t| t.join().unwrap());
        };
        write_lines("before");
        std::fs::rename(&log, dir.path().join("shim.log.1")).unwrap();
        let moving = std::thread::spawn(move || write_lines("during"));
        moving.join().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        write_lines("after");
        write(Level::Info, format_args!("rotation-test final end"));
        let ours = |name: &str| -> Vec<String> {
            std::fs::read_to_string(dir.path().join(name))
                .unwrap()
                .lines()
                .filter(|l| l.contains("rotation-test"))
                .map(str::to_string)
                .collect()
        };
        let (old, new) = (ours("shim.log.1"), ours("shim.log"));
        for l in old.iter().chain(&new) {
            assert!(l.starts_with("20") && l.ends_with(" end") && l.matches("rotation-test").count() == 1, "{l:?}");
        }
        assert_eq!(old.len() + new.len(), 3 * 4 * 500 + 1, "every line, once");
        assert!(new.last().is_some_and(|l| l.contains("final")), "the last line is in the new file");
        assert!(!old.iter().any(|l| l.contains("final")));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&log).unwrap().permissions().mode() & 0o777, 0o600);
        configure(None, Level::Off).unwrap();
    }
}
