//! `p11shim verify`: checks a backup completely without changing anything: the format, every MAC and the
//! trailer, that it was made under this token's MBK, and that every secret in it unwraps in this HSM (as a
//! session object, destroyed at once). No HSM vendor tool offers this; operators ask for it.

use super::error::{BackupError, BackupResult};
use super::import::{check, make};
use super::work::{audit, describe, Authorizer, Work};
use crate::attrs;
use crate::audit::Trail;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub fingerprint: String,
    pub filter: String,
    pub time: String,
    pub records: u64,
    /// Secrets unwrapped in the HSM and destroyed again.
    pub unwrapped: u64,
    pub groups: BTreeMap<String, u64>,
}

/// Verifies `file`; the logged-on users need 00000002 for every group the file holds (as for a restore,
/// since every secret is unwrapped in the HSM).
/// `progress` is called with the number of records checked so far.
pub fn verify(
    trail: &Trail,
    work: &Work,
    who: &dyn Authorizer,
    file: &Path,
    progress: &dyn Fn(u64),
) -> BackupResult<VerifyReport> {
    let result = run(work, who, file, progress);
    let (count, outcome) = match &result {
        Ok(r) => (r.records, format!("ok: {} records, {} secrets unwrap", r.records, r.unwrapped)),
        Err(e) => (0, format!("failed: {e}")),
    };
    let action = if matches!(&result, Err(e) if e.is_refusal()) { "refused: verify" } else { "verify" };
    audit(trail, &who.who(), action, &file.display().to_string(), count, &outcome)?;
    result
}

fn run(work: &Work, who: &dyn Authorizer, file: &Path, progress: &dyn Fn(u64)) -> BackupResult<VerifyReport> {
    let mut report = VerifyReport::default();
    let t = &work.token;
    let header = check(work, file, &mut |number, record| {
        progress(number);
        who.allow_group(&record.group).map_err(|why| BackupError::Denied { action: "verify", why })?;
        report.records += 1;
        *report.groups.entry(record.group.clone()).or_default() += 1;
        if attrs::has_secret(record.class) {
            let h = make(work, record, false).map_err(|cause| BackupError::Hsm {
                record: number,
                name: describe(&record.label, &record.id, &record.group),
                what: "its secret does not unwrap in this HSM".into(),
                cause,
            })?;
            t.backend.destroy_object(t.session, h)?;
            report.unwrapped += 1;
        }
        Ok(())
    })?;
    report.fingerprint = header.mbk;
    report.filter = header.filter;
    report.time = header.time;
    Ok(report)
}
