//! The audit log: every backup, restore, verify, user change, failed logon and refusal appends an entry to a
//! hash-chained table in the key store (see [`crate::store::AuditEntry::compute_hash`]). Each entry's hash
//! covers its content, its sequence number and the previous entry's hash, so an edited, removed or
//! reordered entry breaks the chain from there on; [`verify`] finds the first break.
//!
//! Nothing fails silently: when an entry cannot be written the operation that wanted it fails too.

use crate::store::{AuditDraft, AuditEntry, KeyStore, StoreError};
use std::fmt;

/// An audit entry could not be written: the operation it records must not count as done.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the audit log entry for {action:?}: {cause}")]
pub struct AuditError {
    pub action: String,
    pub cause: StoreError,
}

/// The current time as RFC 3339 UTC with microseconds ("2025-01-31T12:00:00.123456Z").
pub fn now() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

/// Appends one entry: `who` (logged-on user names comma-separated, "SO", or "-"), `action` ("backup",
/// "user add alice", …), the `group` concerned ("" when none), how many keys, and the `result` ("ok" or the
/// error). The entry as stored, or an error that the caller must report.
pub fn record(
    store: &dyn KeyStore,
    who: &str,
    action: &str,
    group: &str,
    count: i64,
    result: &str,
) -> Result<AuditEntry, AuditError> {
    let draft = AuditDraft {
        time: now(),
        who: who.to_string(),
        action: action.to_string(),
        group: group.to_string(),
        count,
        result: result.to_string(),
    };
    store.audit_append(draft).map_err(|cause| AuditError { action: action.to_string(), cause })
}

/// Records a refusal of `action` ("refused: ACTION", result = the reason) and returns the message to
/// report: the reason, followed by the audit failure if the entry could not be written. A refusal is
/// always reported, whether or not the log took it.
pub fn record_refusal(store: &dyn KeyStore, who: &str, action: &str, group: &str, reason: &str) -> String {
    match record(store, who, &format!("refused: {action}"), group, 0, reason) {
        Ok(_) => reason.to_string(),
        Err(e) => format!("{reason} (and {e})"),
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries read.
    pub entries: u64,
    /// The last entry's seq and hash (hex) when the chain is intact: note them somewhere else to detect a
    /// later truncation of the log's tail, which the chain alone cannot show.
    pub head: Option<(i64, String)>,
    /// The first entry that breaks the chain.
    pub first_bad: Option<BadEntry>,
}

/// Where and why the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEntry {
    /// The first seq at which the log is not what was written (for a missing entry, the missing seq).
    pub seq: i64,
    pub reason: String,
}

impl fmt::Display for BadEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "audit entry {}: {}", self.seq, self.reason)
    }
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// Walks the whole log (streaming) and checks that seq runs 1, 2, 3… without gaps, that each entry's `prev`
/// is its predecessor's hash (32 zero bytes for the first), and that each hash matches the entry's content.
/// Stops at the first break.
pub fn verify(store: &dyn KeyStore) -> Result<VerifyReport, StoreError> {
    let mut expected_seq = 1i64;
    let mut prev = vec![0u8; 32];
    let mut entries = 0u64;
    let mut first_bad: Option<BadEntry> = None;
    let stop = || StoreError::Schema { store: String::new(), cause: String::new() };
    let scanned = store.audit_scan(&mut |entry| {
        entries += 1;
        let bad = |reason: String| Some(BadEntry { seq: expected_seq, reason });
        first_bad = if entry.seq > expected_seq {
            bad(format!("missing (the log jumps from {} to {}): removed", expected_seq - 1, entry.seq))
        } else if entry.seq < expected_seq {
            bad(format!("seq {} appears after {}: duplicated or reordered", entry.seq, expected_seq - 1))
        } else if entry.prev != prev {
            bad(if expected_seq == 1 {
                "the first entry does not start the chain: entries before it were removed".into()
            } else {
                format!(
                    "does not follow entry {}: an entry before it was edited, removed or reordered",
                    expected_seq - 1
                )
            })
        } else if entry.hash != AuditEntry::compute_hash(entry.seq, &entry.prev, &entry.draft) {
            bad("its content does not match its hash: edited or moved".into())
        } else {
            None
        };
        if first_bad.is_some() {
            return Err(stop());
        }
        prev = entry.hash;
        expected_seq += 1;
        Ok(())
    });
    match scanned {
        Ok(()) => {}
        Err(_) if first_bad.is_some() => {}
        Err(e) => return Err(e),
    }
    let head = (first_bad.is_none() && entries > 0).then(|| (expected_seq - 1, hex::encode(&prev)));
    Ok(VerifyReport { entries, head, first_bad })
}
