//! Progress of a long command on the terminal: one line on stderr, redrawn at most ten times a second, erased
//! when the command ends. Nothing at all when stderr is not a terminal or the output is JSON, so that logs
//! and scripts never see it.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    what: &'static str,
    total: Option<u64>,
    on: bool,
    started: Instant,
    drawn: Option<Instant>,
}

impl Progress {
    /// `what` names the items ("keys exported"); `total` when it is known.
    pub fn new(what: &'static str, total: Option<u64>, json: bool) -> Progress {
        Progress { what, total, on: !json && std::io::stderr().is_terminal(), started: Instant::now(), drawn: None }
    }

    /// `done` items so far; drawn only if the command has run for a second and the last drawing is 100 ms old.
    pub fn update(&mut self, done: u64) {
        if !self.on || self.started.elapsed() < Duration::from_secs(1) {
            return;
        }
        if self.drawn.is_some_and(|t| t.elapsed() < Duration::from_millis(100)) {
            return;
        }
        self.drawn = Some(Instant::now());
        let line = match self.total {
            Some(total) if total > 0 => {
                format!("{}: {done} of {total} ({}%)", self.what, done.saturating_mul(100) / total)
            }
            _ => format!("{}: {done}", self.what),
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{line} ({}s)", self.started.elapsed().as_secs());
        let _ = err.flush();
    }

    /// A step whose length is not known in items (an RSA key pair made in the HSM, a set of keys wrapped):
    /// `what…` at once on a terminal, erased when the value is dropped.
    pub fn working(what: &'static str, json: bool) -> Progress {
        let mut p = Progress::new(what, None, json);
        if p.on {
            p.drawn = Some(Instant::now());
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{what}…");
            let _ = err.flush();
        }
        p
    }

    /// Erases the line, so that what the command prints next starts clean.
    pub fn finish(&mut self) {
        if self.drawn.take().is_some() {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
