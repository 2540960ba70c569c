//! A store's change counter ([`super::KeyStore::generation`]) with a log of what the recent changes
//! were, so that a row this process holds, known current at one generation, can be known current at a
//! later one without asking the database: true when none of the changes in between can concern it. With
//! PostgreSQL, where asking is a server round trip, this is what keeps a first use after a find or a
//! create, and a use after other hosts changed *other* keys, off the network.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Generations remembered; older ones count as "anything may have changed".
const KEPT: usize = 4096;

/// One change to the keys table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Anything may have changed (a bulk commit, a reconnect, changes nobody listened for).
    Any,
    /// A connection of this process failed: a write of its own on it may have committed unheard. Anything
    /// may have changed, except for [`ChangeLog::heard_unchanged`], which asks what other hosts did.
    Lost,
    /// Row `id` was inserted, updated or deleted by another process or host.
    Row(u128),
    /// This process wrote row `id`, leaving it at `version` (None: deleted). A row this process holds at
    /// that version is the one it wrote, so this change does not make it stale.
    Own(u128, Option<i64>),
}

impl Change {
    /// A change to row `id` by someone else ([`Change::Any`] for an id that is not ours: 32 hex digits).
    pub fn row(id: &str) -> Change {
        parse_id(id).map_or(Change::Any, Change::Row)
    }

    /// This process's write of row `id`, leaving it at `version` (None: deleted).
    pub fn own(id: &str, version: Option<i64>) -> Change {
        parse_id(id).map_or(Change::Any, |id| Change::Own(id, version))
    }
}

fn parse_id(id: &str) -> Option<u128> {
    (id.len() == 32).then(|| u128::from_str_radix(id, 16).ok()).flatten()
}

pub struct ChangeLog {
    generation: AtomicU64,
    /// (generation, change) for the last KEPT generations, in order and without gaps: every bump appends
    /// under this lock.
    recent: Mutex<VecDeque<(u64, Change)>>,
}

impl Default for ChangeLog {
    fn default() -> Self {
        ChangeLog { generation: AtomicU64::new(0), recent: Mutex::new(VecDeque::with_capacity(KEPT)) }
    }
}

impl ChangeLog {
    /// The current generation: an atomic load.
    pub fn current(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Counts one change; returns the new generation.
    pub fn bump(&self, change: Change) -> u64 {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        if recent.len() == KEPT {
            recent.pop_front();
        }
        recent.push_back((generation, change));
        generation
    }

    /// Whether row `id` at `version`, known current at generation `at`, is known current at `now` too: the
    /// log holds every generation after `at` up to `now`, and none of them is a change that can concern it.
    pub fn unchanged_since(&self, id: &str, version: i64, at: u64, now: u64) -> bool {
        self.unchanged(id, version, at, now, false)
    }

    /// As [`ChangeLog::unchanged_since`], but a failed connection of this process does not count: whether
    /// anything heard of other hosts concerned the row. A store losing its server sees its pooled
    /// connections fail a moment before its listener does: that failure says nothing of other hosts.
    pub fn heard_unchanged(&self, id: &str, version: i64, at: u64, now: u64) -> bool {
        self.unchanged(id, version, at, now, true)
    }

    fn unchanged(&self, id: &str, version: i64, at: u64, now: u64, ignore_lost: bool) -> bool {
        if at == now {
            return true;
        }
        let Some(id) = parse_id(id).filter(|_| at < now) else { return false };
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        match (recent.front(), recent.back()) {
            (Some(&(first, _)), Some(&(last, _))) if first <= at + 1 && last >= now => {}
            _ => return false,
        }
        recent.iter().rev().skip_while(|(g, _)| *g > now).take_while(|(g, _)| *g > at).all(
            |(_, change)| match *change {
                Change::Any => false,
                Change::Lost => ignore_lost,
                Change::Row(other) => other != id,
                Change::Own(other, v) => other != id || v == Some(version),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "000102030405060708090a0b0c0d0e0f";
    const B: &str = "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff";

    #[test]
    fn other_rows_changes_leave_a_row_current() {
        let log = ChangeLog::default();
        let at = log.current();
        log.bump(Change::row(B));
        log.bump(Change::own(B, Some(3)));
        log.bump(Change::own(B, None));
        assert!(log.unchanged_since(A, 1, at, log.current()));
        assert!(!log.unchanged_since(B, 1, at, log.current()));
    }

    #[test]
    fn a_change_to_the_row_or_anything_makes_it_stale() {
        let log = ChangeLog::default();
        let at = log.current();
        log.bump(Change::row(A));
        assert!(!log.unchanged_since(A, 1, at, log.current()));
        let at = log.current();
        log.bump(Change::Any);
        assert!(!log.unchanged_since(A, 1, at, log.current()));
        // An id that is not 32 hex digits cannot be told apart: it counts as anything.
        let at = log.current();
        log.bump(Change::row("not-an-id"));
        assert!(!log.unchanged_since(A, 1, at, log.current()));
    }

    #[test]
    fn own_writes_keep_the_version_they_wrote_only() {
        let log = ChangeLog::default();
        let at = log.current();
        log.bump(Change::own(A, Some(2)));
        let now = log.current();
        assert!(log.unchanged_since(A, 2, at, now), "the row this process wrote");
        assert!(!log.unchanged_since(A, 1, at, now), "the version before the write");
        log.bump(Change::own(A, None));
        assert!(!log.unchanged_since(A, 2, at, log.current()), "deleted");
    }

    #[test]
    fn a_lost_connection_is_a_change_but_not_one_heard() {
        let log = ChangeLog::default();
        let at = log.current();
        log.bump(Change::Lost);
        assert!(!log.unchanged_since(A, 1, at, log.current()));
        assert!(log.heard_unchanged(A, 1, at, log.current()));
        log.bump(Change::row(A));
        assert!(!log.heard_unchanged(A, 1, at, log.current()), "a change heard still counts");
    }

    #[test]
    fn only_the_generations_between_count() {
        let log = ChangeLog::default();
        log.bump(Change::row(A));
        let at = log.current();
        log.bump(Change::row(B));
        let now = log.current();
        log.bump(Change::row(A));
        assert!(log.unchanged_since(A, 1, at, now), "A's changes are before `at` and after `now`");
        assert!(!log.unchanged_since(A, 1, at, log.current()));
        assert!(!log.unchanged_since(A, 1, now, at), "time does not run backwards");
    }

    #[test]
    fn generations_no_longer_logged_count_as_changes() {
        let log = ChangeLog::default();
        let at = log.current();
        for _ in 0..KEPT + 1 {
            log.bump(Change::row(B));
        }
        assert!(!log.unchanged_since(A, 1, at, log.current()), "the first change after `at` is forgotten");
        let at = log.current() - KEPT as u64 + 1;
        assert!(log.unchanged_since(A, 1, at, log.current()));
    }
}
