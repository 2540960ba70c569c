//! The simulator's log: one line per refusal, fault and failure, only when `log_file` is configured (a library
//! must not write to an application's stderr). PINs and key values are never logged.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Log {
    file: Option<Mutex<File>>,
}

impl Log {
    pub fn open(path: Option<&Path>) -> std::io::Result<Log> {
        let file = match path {
            Some(p) => Some(Mutex::new(OpenOptions::new().create(true).append(true).open(p)?)),
            None => None,
        };
        Ok(Log { file })
    }

    /// Appends `<unix seconds>.<millis> pid <pid> <message>` (one write, so lines of processes do not mix).
    pub fn line(&self, message: &str) {
        let Some(file) = &self.file else { return };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let line = format!("{}.{:03} pid {} {message}\n", now.as_secs(), now.subsec_millis(), std::process::id());
        let mut f = file.lock().unwrap_or_else(|e| e.into_inner());
        let _ = f.write_all(line.as_bytes());
    }
}
