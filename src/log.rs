//! The shim's log: off by default (a library must not write to an application's stderr unless asked).
//! `log_file`/`log_level` in the config turn it on. Set-up failures are always reported, to the log file when
//! one is configured, else to stderr, as one line. PINs and key values are never passed here.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};

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
/// a lock held by a thread it does not have. The descriptor keeps its number for the life of the process: a
/// new log file is dup2'ed onto it, so a thread writing meanwhile writes to the old file or the new one, never
/// to a descriptor reused for something else.
static FD: AtomicI32 = AtomicI32::new(-1);

/// Points the log at `file` (appending) with `level`; `None` turns logging off.
pub fn configure(file: Option<&Path>, level: Level) -> std::io::Result<()> {
    let Some(path) = file else {
        LEVEL.store(Level::Off as u8, Ordering::Relaxed);
        return Ok(());
    };
    let opened = OpenOptions::new().create(true).append(true).open(path)?;
    let current = FD.load(Ordering::Acquire);
    if current < 0 {
        FD.store(opened.into_raw_fd(), Ordering::Release);
    } else {
        // SAFETY: both are open descriptors of this process; dup2 replaces `current` atomically.
        if unsafe { libc::dup2(opened.as_raw_fd(), current) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    LEVEL.store(level as u8, Ordering::Relaxed);
    Ok(())
}

#[inline]
pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

/// Writes one line if `level` is enabled.
pub fn write(level: Level, message: std::fmt::Arguments<'_>) {
    if enabled(level) {
        emit(FD.load(Ordering::Acquire), &line(level, message));
    }
}

/// A fatal set-up error: to the log file when there is one, else to stderr, whatever the level.
pub fn fatal(message: std::fmt::Arguments<'_>) {
    let fd = match FD.load(Ordering::Acquire) {
        fd if fd >= 0 && LEVEL.load(Ordering::Relaxed) != Level::Off as u8 => fd,
        _ => libc::STDERR_FILENO,
    };
    emit(fd, &line(Level::Error, message));
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

fn line(level: Level, message: std::fmt::Arguments<'_>) -> String {
    format!(
        "{} p11shim[{}] {}: {}",
        humantime::format_rfc3339_millis(std::time::SystemTime::now()),
        std::process::id(),
        level.name(),
        message
    )
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
