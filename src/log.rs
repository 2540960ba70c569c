//! The shim's log: off by default (a library must not write to an application's stderr unless asked).
//! `log_file`/`log_level` in the config turn it on. Set-up failures are always reported, to the log file when
//! one is configured, else to stderr, as one line. PINs and key values are never passed here.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

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
static SINK: Mutex<Option<File>> = Mutex::new(None);

/// Points the log at `file` (appending) with `level`; `None` turns logging off.
pub fn configure(file: Option<&Path>, level: Level) -> std::io::Result<()> {
    let sink = match file {
        Some(path) => Some(OpenOptions::new().create(true).append(true).open(path)?),
        None => None,
    };
    let on = sink.is_some();
    *SINK.lock().unwrap_or_else(|e| e.into_inner()) = sink;
    LEVEL.store(if on { level as u8 } else { Level::Off as u8 }, Ordering::Relaxed);
    Ok(())
}

#[inline]
pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

/// Writes one line if `level` is enabled.
pub fn write(level: Level, message: std::fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let mut sink = SINK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(file) = sink.as_mut() {
        let _ = writeln!(file, "{}", line(level, message));
    }
}

/// A fatal set-up error: to the log file when there is one, else to stderr, whatever the level.
pub fn fatal(message: std::fmt::Arguments<'_>) {
    let text = line(Level::Error, message);
    let mut sink = SINK.lock().unwrap_or_else(|e| e.into_inner());
    match sink.as_mut() {
        Some(file) => {
            let _ = writeln!(file, "{text}");
        }
        None => eprintln!("{text}"),
    }
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
