//! The audit log: every backup, restore, verify, group change, user change, MBK operation, failed logon and
//! refusal appends an entry to a chained table in the key store. Each entry's hash covers its content, its
//! sequence number and the previous entry's hash (see [`crate::store::AuditEntry::compute_hash`]), and each
//! entry is sealed: an HMAC made inside the HSM with the MBK set's MAC key over that hash. A writer of the
//! database can edit, remove or reorder entries and recompute the hashes, but cannot make the MACs, so
//! [`verify`] finds the first entry that is not what was written.
//!
//! What the chain alone cannot show is a log cut short, or a tail rewritten by someone who can also use the
//! HSM's MAC key (a holder of the HSM's user PIN, or any process that can open a session on it): so every
//! process that appends also appends the new head (seq and hash) to the head file beside the config
//! ([`crate::config::Config::audit_head`]), fsynced, where the database's writers cannot reach. The highest
//! head in that file certifies every entry up to it (the hashes chain them).
//!
//! Nothing fails silently: when an entry cannot be written the operation that wanted it fails too.

use crate::backup::format::Sealer;
use crate::config::{Config, Mode};
use crate::store::{AuditDraft, AuditEntry, KeyStore, StoreError};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

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

/// What an audit entry's MAC is made over: a fixed context, the fingerprint of the MBK set sealing it, and the
/// entry's hash (which covers everything else).
pub fn seal_input(mbk: &str, hash: &[u8]) -> Vec<u8> {
    let mut input = b"p11shim audit seal v1\0".to_vec();
    input.extend_from_slice(mbk.as_bytes());
    input.push(0);
    input.extend_from_slice(hash);
    input
}

/// Where audit entries go and what seals them: the key store, the token's MAC key (None when the token has
/// no MBK set yet), the head file and the mode operations run in.
pub struct Trail<'a> {
    pub store: &'a dyn KeyStore,
    /// Seals new entries and users rows, and checks them.
    pub sealer: Option<&'a dyn Sealer>,
    /// The MAC keys of other MBK sets at hand (other tokens of the config): they check what they sealed (a
    /// store may serve tokens of several sets).
    pub also: Vec<&'a dyn Sealer>,
    /// The head file (None: not kept, e.g. in unit tests).
    pub head: Option<PathBuf>,
    pub mode: Mode,
}

impl<'a> Trail<'a> {
    /// The trail of `config`'s store, sealed by `sealer`.
    pub fn new(store: &'a dyn KeyStore, sealer: Option<&'a dyn Sealer>, config: &Config) -> Trail<'a> {
        Trail { store, sealer, also: Vec::new(), head: config.audit_head.clone(), mode: config.mode }
    }

    /// Appends one entry: `who` (logged-on user names comma-separated, "SO of TOKEN", or "-"), `action`
    /// ("backup", "user add alice", …), the `group` concerned ("" when none), how many keys, and the `result`
    /// ("ok" or the error). The entry as stored, or an error that the caller must report.
    pub fn record(
        &self,
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
            mode: self.mode.to_string(),
        };
        let seal = |hash: &[u8], last_sealed: bool| -> Result<(Vec<u8>, String), StoreError> {
            match self.sealer {
                Some(sealer) => {
                    let mbk = sealer.key_name();
                    let mac = sealer
                        .seal(&seal_input(&mbk, hash))
                        .map_err(|e| StoreError::Sealing(format!("the HSM could not seal the entry: {e}")))?;
                    Ok((mac, mbk))
                }
                None if last_sealed => Err(StoreError::Sealing(
                    "the log's entries are sealed by the HSM, and this token has no MBK set to seal with (create \
                     or clone it first)"
                        .into(),
                )),
                None => Ok((Vec::new(), String::new())),
            }
        };
        let entry =
            self.store.audit_append(draft, &seal).map_err(|cause| AuditError { action: action.to_string(), cause })?;
        if let Some(head) = &self.head {
            if let Err(e) = append_head(head, &entry) {
                crate::warn!(
                    "audit entry {} written, but not its head to {}: {e} (a truncation of the log after it would not be detected from this host)",
                    entry.seq,
                    head.display()
                );
            }
        }
        Ok(entry)
    }

    /// Records a refusal of `action` ("refused: ACTION", result = the reason) and returns the message to
    /// report: the reason, followed by the audit failure if the entry could not be written. A refusal is
    /// always reported, whether or not the log took it.
    pub fn record_refusal(&self, who: &str, action: &str, group: &str, reason: &str) -> String {
        match self.record(who, &format!("refused: {action}"), group, 0, reason) {
            Ok(_) => reason.to_string(),
            Err(e) => format!("{reason} (and {e})"),
        }
    }
}

/// One line of the head file: "SEQ HASH-HEX".
fn head_line(entry: &AuditEntry) -> String {
    format!("{} {}\n", entry.seq, hex::encode(&entry.hash))
}

/// Appends the entry's head to the file (created 0600, never through a symlink, a regular file only: a FIFO
/// there would block every append) and fsyncs it. One write of a short line with O_APPEND: lines of
/// concurrent processes never mix.
fn append_head(path: &Path, entry: &AuditEntry) -> std::io::Result<()> {
    let mut file = crate::files::open_append_private(path)?;
    file.write_all(head_line(entry).as_bytes())?;
    file.sync_data()
}

/// The highest head recorded in the head file: (seq, hash), None for a missing or empty file.
fn read_head(path: &Path) -> Result<Option<(i64, Vec<u8>)>, String> {
    let read = || -> std::io::Result<String> {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut crate::files::open_read_regular(path)?, &mut text)?;
        Ok(text)
    };
    let text = match read() {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read the audit head file {}: {e}", path.display())),
    };
    let mut best: Option<(i64, Vec<u8>)> = None;
    for (number, line) in text.lines().enumerate() {
        let parsed = line.split_once(' ').and_then(|(seq, hash)| {
            Some((seq.parse::<i64>().ok()?, hex::decode(hash).ok().filter(|h| h.len() == 32)?))
        });
        let Some((seq, hash)) = parsed else {
            return Err(format!("audit head file {} line {}: not \"SEQ HASH\"", path.display(), number + 1));
        };
        if best.as_ref().is_none_or(|(s, _)| seq > *s) {
            best = Some((seq, hash));
        }
    }
    Ok(best)
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifyReport {
    /// Entries read.
    pub entries: u64,
    /// The last entry's seq and hash (hex) when the log is intact.
    pub head: Option<(i64, String)>,
    /// The first entry that breaks the log.
    pub first_bad: Option<BadEntry>,
    /// Entries whose MAC was checked in the HSM.
    pub sealed: u64,
    /// Entries written before sealing began (schema version 5, or before the token had an MBK set): only
    /// their hashes are checked, and the first sealed entry after them vouches for them.
    pub unsealed: u64,
    /// False when no MAC key was at hand (no MBK set): then MACs were not checked.
    pub macs_checked: bool,
    /// Sealed entries whose MBK set is not at hand here, by fingerprint: their MACs were not checked.
    pub unverifiable: std::collections::BTreeMap<String, u64>,
    /// What the head file said: (path, highest seq it records), or why it was not used.
    pub head_file: Option<(PathBuf, Option<i64>)>,
}

/// Where and why the log breaks.
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

    /// What was checked, in one sentence per check.
    pub fn checked(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "{} entries read: sequence numbers contiguous from 1, each linked to the previous entry's hash, each hash matching its content",
            self.entries
        )];
        if self.macs_checked {
            let checked = self.sealed - self.unverifiable.values().sum::<u64>();
            lines.push(format!(
                "{checked} entries sealed: each MAC verified in the HSM with the MAC key of its MBK set; {} older entries before them unsealed, vouched for by the first sealed entry's chain",
                self.unsealed
            ));
            for (mbk, n) in &self.unverifiable {
                lines.push(format!(
                    "{n} entries sealed under MBK set {mbk}, which no token here holds: their MACs were NOT checked (run audit verify where that set is)"
                ));
            }
        } else {
            lines.push("MACs NOT checked: this token has no MBK set (its MAC key seals the log)".into());
        }
        match &self.head_file {
            Some((path, Some(seq))) => lines.push(format!(
                "head file {}: the log holds its highest head (entry {seq}) with the same hash, so nothing up to it was rewritten or cut off",
                path.display()
            )),
            Some((path, None)) => {
                lines.push(format!("head file {}: none written yet (nothing to compare)", path.display()))
            }
            None => lines.push("no head file compared".into()),
        }
        lines
    }
}

/// Walks the whole log (streaming) and checks that seq runs 1, 2, 3… without gaps, that each entry's `prev`
/// is its predecessor's hash (32 zero bytes for the first), that each hash matches the entry's content,
/// that each sealed entry's MAC verifies in the HSM (with the trail's sealer, or one of `also`, whichever
/// holds the MBK set that sealed it) and that no unsealed entry follows a sealed one; then that the highest
/// head of the head file is in the log with the same hash. Stops at the first break.
pub fn verify(trail: &Trail) -> Result<VerifyReport, StoreError> {
    let mut report = VerifyReport { macs_checked: trail.sealer.is_some(), ..Default::default() };
    let sealers: Vec<(String, &dyn Sealer)> =
        trail.sealer.into_iter().chain(trail.also.iter().copied()).map(|s| (s.key_name(), s)).collect();
    let mut expected_seq = 1i64;
    let mut prev = vec![0u8; 32];
    let mut sealing_began = false;
    let mut seq_hashes_wanted = match &trail.head {
        Some(path) => {
            let head = read_head(path).map_err(StoreError::Sealing)?;
            report.head_file = Some((path.clone(), head.as_ref().map(|(seq, _)| *seq)));
            head
        }
        None => None,
    };
    let mut first_bad: Option<BadEntry> = None;
    let stop = || StoreError::Schema { store: String::new(), cause: String::new() };
    let scanned = trail.store.audit_scan(&mut |entry| {
        report.entries += 1;
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
        } else if entry.mac.is_empty() && sealing_began {
            bad("not sealed, after sealed entries: written or rewritten by someone who can write the key store but not use the HSM's MAC key".into())
        } else if let (false, true) = (entry.mac.is_empty(), report.macs_checked) {
            match sealers.iter().find(|(name, _)| *name == entry.mbk) {
                None => {
                    *report.unverifiable.entry(entry.mbk.clone()).or_default() += 1;
                    None
                }
                Some((_, sealer)) => match sealer.check(&seal_input(&entry.mbk, &entry.hash), &entry.mac) {
                    Ok(true) => None,
                    Ok(false) => bad("its MAC does not verify in the HSM: rewritten by someone who can write the key store".into()),
                    Err(e) => {
                        return Err(StoreError::Sealing(format!("cannot check entry {}'s MAC in the HSM: {e}", entry.seq)))
                    }
                },
            }
        } else {
            None
        };
        if first_bad.is_none() {
            if let Some((seq, hash)) = &seq_hashes_wanted {
                if *seq == entry.seq {
                    if *hash != entry.hash {
                        first_bad = bad("its hash differs from the one the head file recorded when it was written: this entry (and the log up to it) was rewritten".into());
                    } else {
                        seq_hashes_wanted = None;
                    }
                }
            }
        }
        if first_bad.is_some() {
            return Err(stop());
        }
        if entry.mac.is_empty() {
            report.unsealed += 1;
        } else {
            sealing_began = true;
            report.sealed += 1;
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
    if first_bad.is_none() {
        if let Some((seq, _)) = seq_hashes_wanted {
            first_bad = Some(BadEntry {
                seq: expected_seq,
                reason: format!(
                    "missing: the log ends at entry {}, but the head file recorded entry {seq}: the log was truncated",
                    expected_seq - 1
                ),
            });
        }
    }
    report.head = (first_bad.is_none() && report.entries > 0).then(|| (expected_seq - 1, hex::encode(&prev)));
    report.first_bad = first_bad;
    Ok(report)
}
