//! `p11shim backup`: every key whose group matches a filter, into one backup file, each secret wrapped under
//! the MBK (stored keys are already; the token's own keys are wrapped with C_WrapKey, never in clear).
//! Keys that cannot be exported are listed, never silently skipped. Streams: memory stays flat.

use super::error::{BackupError, BackupResult};
use super::format::{BackupWriter, Header, Leftover, Record, RecordKind, FORMAT_VERSION};
use super::work::{self, audit, describe, record_of_row, Authorizer, Work};
use crate::attrs::{self, Template};
use crate::audit::Trail;
use crate::error::Error;
use crate::store::{KeyStore, RowRead, StoreError};
use cryptoki_sys::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub struct ExportOptions<'a> {
    /// The group filter (a regular expression matching whole group names).
    pub filter: &'a str,
    pub out: &'a Path,
    /// Replace `out` if it exists.
    pub replace: bool,
    /// Only keys of the key store: the token's own keys are left out (they need the user's login to be
    /// wrapped; stored keys are wrapped already).
    pub stored_only: bool,
    /// Write a backup with no key when nothing matches; else that is [`BackupError::NothingMatched`] and no
    /// file is written.
    pub allow_empty: bool,
}

/// A key that was not exported, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub key: String,
    pub why: String,
}

#[derive(Debug, Default)]
pub struct ExportReport {
    pub path: PathBuf,
    pub fingerprint: String,
    pub exported: u64,
    pub stored: u64,
    pub hsm: u64,
    pub groups: BTreeMap<String, u64>,
    pub skipped: Vec<Skipped>,
    /// Temporary files of killed backups to the same file, found and removed: each deserves a warning.
    pub leftovers: Vec<Leftover>,
}

/// Exports every key of the store and of the work token whose group matches the filter. `progress` is
/// called with the number of keys written so far.
pub fn export(
    trail: &Trail,
    work: &Work,
    who: &dyn Authorizer,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(u64),
) -> BackupResult<ExportReport> {
    let result = run(trail.store, work, who, opts, progress);
    let (count, outcome) = match &result {
        Ok(r) if r.skipped.is_empty() => (r.exported, "ok".to_string()),
        Ok(r) => (r.exported, format!("ok, {} keys could not be exported", r.skipped.len())),
        Err(e) => (0, format!("failed: {e}")),
    };
    let action = if matches!(&result, Err(e) if e.is_refusal()) { "refused: backup" } else { "backup" };
    audit(trail, &who.who(), action, opts.filter, count, &outcome)?;
    result
}

fn run(
    store: &dyn KeyStore,
    work: &Work,
    who: &dyn Authorizer,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(u64),
) -> BackupResult<ExportReport> {
    let filter = work::group_filter(opts.filter)?;
    let include_hsm = !opts.stored_only && filter.is_match(&work.slot_group);
    // First the permission check over every group the backup would hold: all or nothing, before a file is
    // made. A row that cannot be read counts when its group matches, or cannot be read either: its group,
    // when readable, is checked like any other.
    let mut groups = BTreeSet::new();
    let mut matched = false;
    store.scan_rows(&mut |read| {
        let group = match read {
            RowRead::Row(row) if filter.is_match(&row.group) => Some(row.group),
            RowRead::Row(_) => return Ok(()),
            RowRead::Bad(bad) if bad.group.as_deref().is_none_or(|g| filter.is_match(g)) => bad.group,
            RowRead::Bad(_) => return Ok(()),
        };
        matched = true;
        groups.extend(group);
        Ok(())
    })?;
    if include_hsm {
        groups.insert(work.slot_group.clone());
    }
    let nothing = |where_: String| BackupError::NothingMatched { filter: opts.filter.to_string(), where_ };
    if !matched && !include_hsm && !opts.allow_empty {
        return Err(nothing(format!(" in {}", store.describe())));
    }
    let mut checked = Checked { who, groups: BTreeSet::new() };
    for g in &groups {
        checked.allow(g)?;
    }

    let header = Header {
        format: FORMAT_VERSION,
        mbk: work.set.fingerprint.clone(),
        time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        source: format!("{}; {}", hostname(), store.describe()),
        filter: opts.filter.to_string(),
        count: 0,
        seal: work.set.device.as_ref().and_then(|d| d.seal.clone()),
    };
    let mut writer = BackupWriter::create_with(opts.out, header, opts.replace)?;
    let sealer = work.sealer();
    let mut report =
        ExportReport { path: opts.out.to_path_buf(), fingerprint: work.set.fingerprint.clone(), ..Default::default() };
    report.leftovers = writer.leftovers().to_vec();
    let mut failure: Option<BackupError> = None;
    // The rows written are those of this scan, one snapshot of the store, which is not the first scan's:
    // a group that has appeared since is checked when its first row is met, and a refusal then leaves no
    // file either (the writer's temporary file goes with it).
    let scanned = store.scan_rows(&mut |read| {
        let row = match read {
            RowRead::Row(row) if filter.is_match(&row.group) => row,
            RowRead::Row(_) => return Ok(()),
            RowRead::Bad(bad) if bad.group.as_deref().is_none_or(|g| filter.is_match(g)) => {
                if let Some(g) = &bad.group {
                    if let Err(e) = checked.allow(g) {
                        failure = Some(e);
                        return Err(StoreError::Schema { store: String::new(), cause: "stopped".into() });
                    }
                }
                let group = bad.group.as_deref().map_or(String::new(), |g| format!(", group {g:?}"));
                let why = format!("its row cannot be read ({}): it was changed outside p11shim", bad.cause);
                report.skipped.push(Skipped { key: format!("stored key (id {}{group})", bad.id), why });
                return Ok(());
            }
            RowRead::Bad(_) => return Ok(()),
        };
        if let Err(e) = checked.allow(&row.group) {
            failure = Some(e);
            return Err(StoreError::Schema { store: String::new(), cause: "stopped".into() });
        }
        let name = describe(&row.label, &row.id, &row.group);
        let why = if row.mbk != work.set.fingerprint {
            Some(format!("wrapped under MBK {}, not this token's ({})", row.mbk, work.set.fingerprint))
        } else {
            match work.row_intact(&row) {
                Ok(true) => None,
                Ok(false) => Some("its row MAC does not match: the row was changed outside p11shim".into()),
                Err(e) => {
                    failure = Some(e.into());
                    return Err(StoreError::Schema { store: String::new(), cause: "stopped".into() });
                }
            }
        };
        if let Some(why) = why {
            report.skipped.push(Skipped { key: format!("stored key {name}"), why });
            return Ok(());
        }
        let record = record_of_row(row);
        if let Err(e) = writer.write(&record, &sealer) {
            failure = Some(e.into());
            return Err(StoreError::Schema { store: String::new(), cause: "stopped".into() });
        }
        report.stored += 1;
        *report.groups.entry(record.group).or_default() += 1;
        progress(report.stored);
        Ok(())
    });
    if let Some(e) = failure {
        return Err(e);
    }
    scanned?;
    if include_hsm {
        for handle in work::hsm_keys(work)? {
            match hsm_record(work, handle) {
                Ok(record) => {
                    writer.write(&record, &sealer)?;
                    report.hsm += 1;
                    *report.groups.entry(record.group).or_default() += 1;
                    progress(report.stored + report.hsm);
                }
                Err((key, why)) => report.skipped.push(Skipped { key, why }),
            }
        }
    }
    report.exported = report.stored + report.hsm;
    if report.exported == 0 && report.skipped.is_empty() && !opts.allow_empty {
        // The token's group matched, and it holds no key: the writer's temporary file goes with it.
        return Err(nothing(format!(" in {} nor in token {:?}", store.describe(), work.token.label)));
    }
    writer.finish(&sealer)?;
    Ok(report)
}

/// The groups the logged-on users were found to be allowed to export, each asked about once.
struct Checked<'a> {
    who: &'a dyn Authorizer,
    groups: BTreeSet<String>,
}

impl Checked<'_> {
    /// Ok when `group` was allowed before or is now; else the refusal a backup ends with.
    fn allow(&mut self, group: &str) -> BackupResult<()> {
        if !self.groups.contains(group) {
            self.who.allow_group(group).map_err(|why| BackupError::Denied { action: "export", why })?;
            self.groups.insert(group.to_string());
        }
        Ok(())
    }
}

/// A record for a key that lives in the HSM: its attributes, and its secret wrapped under the MBK.
fn hsm_record(work: &Work, handle: CK_OBJECT_HANDLE) -> std::result::Result<Record, (String, String)> {
    let t = &work.token;
    let fail = |what: String| (format!("HSM key (handle {handle}) on token {:?}", t.label), what);
    let class = t
        .backend
        .attributes(t.session, handle, &[CKA_CLASS])
        .ok()
        .and_then(|a| a.ulong(CKA_CLASS))
        .ok_or_else(|| fail("its class cannot be read".into()))?;
    let secret = attrs::has_secret(class);
    let mut types = attrs::KEPT.to_vec();
    if !secret {
        types.extend_from_slice(attrs::PUBLIC_VALUES);
    }
    let mut view: Template =
        t.backend.attributes(t.session, handle, &types).map_err(|e| fail(format!("its attributes: {e}")))?;
    view.set(attrs::Attr::bool(CKA_TOKEN, true));
    let label = view.bytes(CKA_LABEL).unwrap_or_default().to_vec();
    let ckid = view.bytes(CKA_ID).unwrap_or_default().to_vec();
    let id = work::hsm_key_id(&t.label, class, &label, &ckid);
    let name = format!("HSM key {}", describe(&label, &id, &work.slot_group));
    let wrapped = if secret {
        work.set.wrap(t.backend, t.session, handle).map_err(|e| {
            let why = match e {
                Error::Rv(CKR_KEY_UNEXTRACTABLE) => "not extractable: it cannot leave the HSM, not even wrapped".into(),
                Error::Rv(CKR_KEY_NOT_WRAPPABLE) => "not wrappable under the MBK".into(),
                e => format!("wrapping under the MBK failed: {e}"),
            };
            (name.clone(), why)
        })?
    } else {
        Vec::new()
    };
    Ok(Record {
        kind: RecordKind::Hsm,
        id,
        token: t.label.clone(),
        group: work.slot_group.clone(),
        class,
        key_type: view.ulong(CKA_KEY_TYPE).unwrap_or(CK_UNAVAILABLE_INFORMATION),
        label,
        ckid,
        attrs: view.encode(),
        wrapped,
        wrap_mech: work.set.wrap,
        mbk: work.set.fingerprint.clone(),
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
