//! `p11shim restore`: merges a backup into a token, line by line. Keys in the target and not in the file
//! stay; a key already present is skipped unless `--overwrite` (refused in CC mode). The whole file is
//! checked first (wrong MBK, a bad MAC anywhere, truncation, an unknown version → nothing modified, and the
//! error names the first bad record); then it is applied all or nothing: one transaction for a database
//! slot, and for a token's own objects every object made is destroyed again if a later record fails, and a
//! journal (src/backup/journal.rs) lets the next restore roll back one that was killed.

use super::error::{BackupError, BackupResult};
use super::format::{BackupReader, Header, Record, Sealer};
use super::journal::{self, Journal, Triple};
use super::work::{self, audit, describe, row_of_record, Authorizer, HsmSealer, Work};
use crate::attrs::{Attr, Template};
use crate::audit::Trail;
use crate::config::Mode;
use crate::error::{Error, Result};
use crate::store::KeyStore;
use cryptoki_sys::*;
use std::path::Path;

pub struct ImportOptions<'a> {
    pub file: &'a Path,
    pub overwrite: bool,
    pub dry_run: bool,
    pub mode: Mode,
    /// Called with the records read so far: in the check of the whole file, then while restoring.
    pub progress: &'a dyn Fn(Pass, u64),
}

/// Which pass over the file a restore is in, for progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Every MAC and the trailer, before anything is touched.
    Check,
    /// Record by record into the target.
    Restore,
}

/// Keys by what restore did (or, with `dry_run`, would do) with them.
#[derive(Debug, Default)]
pub struct ImportReport {
    pub fingerprint: String,
    pub records: u64,
    pub added: KeyList,
    pub skipped: KeyList,
    pub overwritten: KeyList,
    pub dry_run: bool,
    /// An interrupted restore into the same token that this one rolled back or finished first.
    pub recovered: Option<String>,
}

pub fn import(trail: &Trail, work: &Work, who: &dyn Authorizer, opts: &ImportOptions) -> BackupResult<ImportReport> {
    let result = run(trail.store, work, who, opts);
    let action = match &result {
        Err(e) if e.is_refusal() => "refused: restore",
        _ if opts.dry_run => "restore --dry-run",
        _ => "restore",
    };
    let (count, outcome) = match &result {
        Ok(r) => (
            (r.added.len() + r.overwritten.len()) as u64,
            format!("ok: {} added, {} skipped, {} overwritten", r.added.len(), r.skipped.len(), r.overwritten.len()),
        ),
        Err(e) => (0, format!("failed: {e}")),
    };
    audit(trail, &who.who(), action, &opts.file.display().to_string(), count, &outcome)?;
    result
}

/// A key a restore added, skipped or overwrote, as scripts see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyItem {
    pub id: String,
    /// The label as text, or as 0x-prefixed hex when it is not printable UTF-8.
    pub label: String,
    pub group: String,
    pub class: String,
    pub key_type: String,
}

impl KeyItem {
    fn of(record: &Record, id: &str) -> KeyItem {
        KeyItem {
            id: id.to_string(),
            label: label_text(&record.label),
            group: record.group.clone(),
            class: crate::error::class_name(record.class),
            key_type: crate::error::key_type_name(record.key_type),
        }
    }
}

/// A label as listings show it: as text, or as 0x-prefixed hex when it is not printable UTF-8.
pub fn label_text(label: &[u8]) -> String {
    match std::str::from_utf8(label) {
        Ok(text) if !text.chars().any(char::is_control) => text.to_string(),
        _ => format!("0x{}", hex::encode(label)),
    }
}

impl std::fmt::Display for KeyItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} (id {}, group {:?}, {} {})", self.label, self.id, self.group, self.class, self.key_type)
    }
}

/// How many keys, and the first [`NAMES_KEPT`] of them: memory stays flat with the key count.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeyList {
    pub count: u64,
    pub items: Vec<KeyItem>,
}

/// How many keys a report lists per list.
pub const NAMES_KEPT: usize = 10_000;

impl KeyList {
    fn push(&mut self, item: KeyItem) {
        self.count += 1;
        if self.items.len() < NAMES_KEPT {
            self.items.push(item);
        }
    }
    pub fn len(&self) -> usize {
        self.count as usize
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

fn run(store: &dyn KeyStore, work: &Work, who: &dyn Authorizer, opts: &ImportOptions) -> BackupResult<ImportReport> {
    if opts.overwrite && opts.mode == Mode::Cc {
        return Err(BackupError::Refused(
            "--overwrite is not allowed in CC mode (mode = \"cc\"); restore without it, or destroy the keys first"
                .into(),
        ));
    }
    // Pass 1: the whole file, before anything is touched.
    let header = check(work, opts.file, &mut |number, record| {
        (opts.progress)(Pass::Check, number);
        who.allow_group(&record.group).map_err(|why| BackupError::Denied { action: "import", why })
    })?;
    let mut report = ImportReport { fingerprint: header.mbk.clone(), dry_run: opts.dry_run, ..Default::default() };
    // Pass 2: plan (and apply) record by record; the reader checks every MAC again, as the file could have
    // changed since pass 1.
    let sealer = work.sealer();
    let file_set = work.file_set(&header)?;
    let file_sealer = HsmSealer { backend: work.token.backend, session: work.token.session, set: &file_set };
    let mut reader = BackupReader::open(opts.file)?;
    if work.database {
        let mut tx = store.begin()?;
        while let Some((number, record)) = reader.next_record(&file_sealer)? {
            report.records += 1;
            (opts.progress)(Pass::Restore, number);
            let id = work::restored_id(&record, &work.token.label);
            let name = KeyItem::of(&record, &id);
            let exists = tx.exists(&id)?;
            if exists && !opts.overwrite {
                report.skipped.push(name);
                continue;
            }
            if !opts.dry_run {
                let mut row = row_of_record(&record, &work.token.label);
                row.id = id;
                if let Some(attrs) = Template::decode(&row.attrs) {
                    row.attrs = crate::vault::restorable(&attrs, row.class).encode();
                }
                row.mac = sealer.seal(&crate::vault::mac_input(&row)).map_err(BackupError::Other)?;
                if exists {
                    tx.replace(&row)?;
                } else {
                    tx.insert(&row)?;
                }
            }
            if exists {
                report.overwritten.push(name);
            } else {
                report.added.push(name);
            }
        }
        if !opts.dry_run {
            tx.commit()?;
        }
        return Ok(report);
    }
    // A token's own objects. First the lock and the journal: a restore into this token that died is rolled
    // back (or finished) before anything else.
    let (mut journal, recovered) = Journal::open(work, &work.state_dir)?;
    report.recovered = recovered;
    // One look at the token's objects, not a find per record: a find reads every object of the token
    // (SoftHSM2 opens each object file), which made a restore quadratic.
    let index = TokenIndex::read(work)?;
    // The plan, record by record: what is made (and what it replaces). A (class, label, CKA_ID) that an
    // earlier record of the file takes is present for the later ones.
    let mut planned: std::collections::HashSet<Triple> = std::collections::HashSet::new();
    let mut make_list: Vec<Triple> = Vec::new();
    let mut replaced: Vec<(Triple, CK_OBJECT_HANDLE)> = Vec::new();
    while let Some((_, record)) = reader.next_record(&file_sealer)? {
        report.records += 1;
        let name = KeyItem::of(&record, &record.id);
        let triple = Triple::new(record.class, &record.label, &record.ckid);
        let existing = index.present(&record);
        if planned.contains(&triple) || (!existing.is_empty() && !opts.overwrite) {
            report.skipped.push(name);
            continue;
        }
        planned.insert(triple.clone());
        make_list.push(triple.clone());
        if existing.is_empty() {
            report.added.push(name);
        } else {
            replaced.extend(existing.into_iter().map(|h| (triple.clone(), h)));
            report.overwritten.push(name);
        }
    }
    if opts.dry_run || make_list.is_empty() {
        return Ok(report);
    }
    let old = replaced
        .iter()
        .map(|(triple, h)| Ok((triple.clone(), journal::fingerprint(work, *h, triple.class)?)))
        .collect::<Result<Vec<_>>>()?;
    journal.begin(work, make_list.clone(), old)?;
    // Make them; on any failure destroy what was made (and if that fails too, the journal stays for the
    // next restore to roll back).
    let t = &work.token;
    let mut made: Vec<CK_OBJECT_HANDLE> = Vec::new();
    let mut reader = BackupReader::open(opts.file)?;
    let mut next = make_list.iter();
    let mut expected = next.next();
    let applied = (|| -> BackupResult<()> {
        while let Some((number, record)) = reader.next_record(&file_sealer)? {
            let Some(want) = expected else { break };
            if Triple::new(record.class, &record.label, &record.ckid) != *want {
                continue;
            }
            (opts.progress)(Pass::Restore, number);
            let name = describe(&record.label, &record.id, &record.group);
            let h = make(work, &record, true).map_err(|cause| BackupError::Hsm {
                record: number,
                name,
                what: format!("cannot be made on token {:?}", t.label),
                cause,
            })?;
            made.push(h);
            expected = next.next();
        }
        match expected {
            None => Ok(()),
            Some(_) => Err(BackupError::Changed(opts.file.to_path_buf())),
        }
    })();
    if let Err(e) = applied {
        let failed = made.iter().filter(|h| t.backend.destroy_object(t.session, **h).is_err()).count();
        if failed == 0 {
            journal.end()?;
        }
        return Err(e);
    }
    journal.commit()?;
    for (_, h) in replaced {
        t.backend.destroy_object(t.session, h)?;
    }
    journal.end()?;
    Ok(report)
}

/// Reads the whole file: format, MBK, every record MAC, the trailer. `each` sees every record.
pub fn check(work: &Work, file: &Path, each: &mut dyn FnMut(u64, &Record) -> BackupResult<()>) -> BackupResult<Header> {
    let mut reader = BackupReader::open(file)?;
    let header = reader.header().clone();
    if header.mbk != work.set.fingerprint {
        return Err(BackupError::WrongMbk {
            file: file.to_path_buf(),
            file_mbk: header.mbk,
            token: work.token.label.clone(),
            token_mbk: work.set.fingerprint.clone(),
        });
    }
    let file_set = work.file_set(&header)?;
    let sealer = HsmSealer { backend: work.token.backend, session: work.token.session, set: &file_set };
    while let Some((number, record)) = reader.next_record(&sealer)? {
        if record.mbk != work.set.fingerprint {
            return Err(BackupError::RecordMbk {
                record: number,
                id: record.id,
                record_mbk: record.mbk,
                token_mbk: work.set.fingerprint.clone(),
            });
        }
        each(number, &record)?;
    }
    Ok(header)
}

/// The target token's objects by (class, label, CKA_ID): a record's key is present when one matches.
struct TokenIndex(std::collections::HashMap<(u64, Vec<u8>, Vec<u8>), Vec<CK_OBJECT_HANDLE>>);

impl TokenIndex {
    fn read(work: &Work) -> Result<TokenIndex> {
        let t = &work.token;
        let mut index = std::collections::HashMap::new();
        for h in t.backend.find(t.session, &Template(vec![Attr::bool(CKA_TOKEN, true)]))? {
            let a = t.backend.attributes(t.session, h, &[CKA_CLASS, CKA_LABEL, CKA_ID])?;
            let Some(class) = a.ulong(CKA_CLASS) else { continue };
            let key =
                (class, a.bytes(CKA_LABEL).unwrap_or_default().to_vec(), a.bytes(CKA_ID).unwrap_or_default().to_vec());
            index.entry(key).or_insert_with(Vec::new).push(h);
        }
        Ok(TokenIndex(index))
    }

    fn present(&self, record: &Record) -> Vec<CK_OBJECT_HANDLE> {
        self.0.get(&(record.class, record.label.clone(), record.ckid.clone())).cloned().unwrap_or_default()
    }
}

/// Makes a record's object in the HSM (a token object, or a session object to be destroyed after a check):
/// exactly as the record describes it where custody allows, else as the closest object it allows (see
/// vault::Recipe::restorable).
pub fn make(work: &Work, record: &Record, token: bool) -> Result<CK_OBJECT_HANDLE> {
    let attrs = Template::decode(&record.attrs).ok_or_else(|| Error::Other("attributes cannot be decoded".into()))?;
    let set = work.set.current(&work.token.label)?;
    let recipe = crate::vault::Recipe::restorable(set, &attrs, record.class, token);
    let t = &work.token;
    recipe.make(t.backend, t.session, crate::vault::unwrap_mechanism(set, record.wrap_mech), &record.wrapped)
}
