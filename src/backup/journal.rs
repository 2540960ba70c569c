//! Crash safety for restores into a token's own objects (a slot without `storage = "database"`). The HSM
//! makes each object visible as soon as it is made, so such a restore cannot be one transaction, as a
//! restore into the key store is. Before it makes anything, it writes a journal beside the config file:
//! the objects it will make, and the objects it will destroy at the end (those `--overwrite` replaces). It
//! holds a lock while it runs. A restore killed before its end leaves the journal behind. The next restore
//! into that token on this host finds it and rolls the dead one back: it destroys the objects the dead one
//! made. If the dead restore had made them all (the journal says "committed"), the next one finishes it
//! instead, by destroying the objects they replace.
//!
//! Objects are told apart by (class, label, CKA_ID). Where a restore replaces objects of the same (class,
//! label, CKA_ID), they are told apart by a fingerprint: SHA-256 of their public attributes. Secret values
//! are never read for it; a secret key's CKA_CHECK_VALUE is used where the HSM gives one.
//!
//! An HSM may not make a token object atomically: SoftHSM2 creates the object's file with default
//! attributes, then writes the template into it, so a restore killed inside C_UnwrapKey can leave an object
//! with no label and no CKA_ID. A rollback destroys such blank objects too, except those that were there
//! before (by fingerprint). An application that makes blank objects in the same token while a restore is
//! killed could lose them to that rollback.

use super::work::Work;
use crate::attrs::{Attr, Template};
use crate::error::{Error, Result};
use cryptoki_sys::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The objects with an empty (or no) label and CKA_ID, of any class, with their fingerprints. A half-made
/// object may lack attributes altogether, even CKA_TOKEN (SoftHSM2 then reads it as a session object),
/// which a find template cannot ask for: every object the session sees is looked at. The restore's
/// session has no session objects of its own here, and other processes' are not visible to it.
fn blank_objects(work: &Work) -> Result<Vec<(CK_OBJECT_HANDLE, String)>> {
    let t = &work.token;
    let mut blank = Vec::new();
    for h in t.backend.find(t.session, &Template(Vec::new()))? {
        let a = t.backend.attributes(t.session, h, &[CKA_CLASS, CKA_LABEL, CKA_ID])?;
        if a.bytes(CKA_LABEL).unwrap_or_default().is_empty() && a.bytes(CKA_ID).unwrap_or_default().is_empty() {
            let class = a.ulong(CKA_CLASS).unwrap_or(u64::MAX);
            blank.push((h, fingerprint(work, h, class)?));
        }
    }
    Ok(blank)
}

/// An object's class, label and CKA_ID (hex): what a backup record and a token object have in common.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Hash, Debug)]
pub struct Triple {
    pub class: u64,
    pub label: String,
    pub id: String,
}

impl Triple {
    pub fn new(class: u64, label: &[u8], id: &[u8]) -> Triple {
        Triple { class, label: hex::encode(label), id: hex::encode(id) }
    }

    fn template(&self) -> Result<Template> {
        let bytes = |h: &str| hex::decode(h).map_err(|_| Error::Other(format!("restore journal: bad hex {h:?}")));
        Ok(Template(vec![
            Attr::bool(CKA_TOKEN, true),
            Attr::ulong(CKA_CLASS, self.class),
            Attr::bytes(CKA_LABEL, &bytes(&self.label)?),
            Attr::bytes(CKA_ID, &bytes(&self.id)?),
        ]))
    }
}

#[derive(Serialize, Deserialize)]
struct Body {
    format: u32,
    token: String,
    pid: u32,
    /// Every object is made: what is left is destroying `old`.
    committed: bool,
    /// One entry per object the restore makes.
    made: Vec<Triple>,
    /// The objects it replaces, destroyed once everything is made: (triple, fingerprint).
    old: Vec<(Triple, String)>,
    /// Fingerprints of the token objects with no label and no CKA_ID before the restore began.
    blank: Vec<String>,
}

/// A restore in progress: the lock, and the journal once written.
pub struct Journal {
    dir: PathBuf,
    token: String,
    _lock: File,
    body: Option<Body>,
}

fn name(token: &str, what: &str) -> String {
    format!(".p11shim-restore-{}.{what}", hex::encode(token))
}

/// Public attributes that tell two objects of one (class, label, CKA_ID) apart. CKA_VALUE is asked for
/// public objects only (certificates, data, public keys); a secret's value is never read.
fn fingerprint_types(class: u64) -> Vec<CK_ATTRIBUTE_TYPE> {
    let mut types = vec![
        CKA_CLASS,
        CKA_KEY_TYPE,
        CKA_LABEL,
        CKA_ID,
        CKA_MODULUS,
        CKA_PUBLIC_EXPONENT,
        CKA_EC_PARAMS,
        CKA_EC_POINT,
        CKA_VALUE_LEN,
        CKA_CHECK_VALUE,
        CKA_SUBJECT,
        CKA_ISSUER,
        CKA_SERIAL_NUMBER,
    ];
    if !matches!(class, CKO_SECRET_KEY | CKO_PRIVATE_KEY) {
        types.push(CKA_VALUE);
    }
    types
}

pub fn fingerprint(work: &Work, handle: CK_OBJECT_HANDLE, class: u64) -> Result<String> {
    use sha2::{Digest, Sha256};
    let t = &work.token;
    let attrs = t.backend.attributes(t.session, handle, &fingerprint_types(class))?;
    Ok(hex::encode(Sha256::digest(attrs.encode())))
}

impl Journal {
    /// Takes the token's restore lock (refused while another restore into it runs on this host), and
    /// rolls back or finishes a restore that died, if it left a journal. Returns what it did, for the
    /// operator.
    pub fn open(work: &Work, dir: &Path) -> Result<(Journal, Option<String>)> {
        let token = work.token.label.clone();
        let lock_path = dir.join(name(&token, "lock"));
        let lock = crate::files::open_append_private(&lock_path)
            .map_err(|e| Error::Other(format!("restore lock {}: {e}", lock_path.display())))?;
        if let Err(e) = try_lock(&lock) {
            return Err(Error::Other(if e.kind() == std::io::ErrorKind::WouldBlock {
                format!(
                    "another restore into token {token:?} is running on this host ({} is locked); nothing was modified",
                    lock_path.display()
                )
            } else {
                format!("restore lock {}: {e}", lock_path.display())
            }));
        }
        let mut journal = Journal { dir: dir.to_path_buf(), token, _lock: lock, body: None };
        if !work.own_session && std::fs::symlink_metadata(journal.path()).is_ok() {
            // An application's session may hold blank session objects of its own, which a rollback cannot
            // tell from a half-made token object: the command does it, with a session of its own.
            return Err(Error::Other(format!(
                "an interrupted restore into token {:?} left its journal {}; run `p11shim restore FILE --token {} \
                 --dry-run` to roll it back first; nothing was modified",
                journal.token,
                journal.path().display(),
                journal.token
            )));
        }
        let recovered = journal.recover(work)?;
        Ok((journal, recovered))
    }

    fn path(&self) -> PathBuf {
        self.dir.join(name(&self.token, "journal"))
    }

    /// Rolls back (or finishes) the restore whose journal is here.
    fn recover(&mut self, work: &Work) -> Result<Option<String>> {
        let path = self.path();
        let read = |path: &Path| -> std::io::Result<Vec<u8>> {
            let mut text = Vec::new();
            std::io::Read::read_to_end(&mut crate::files::open_read_regular(path)?, &mut text)?;
            Ok(text)
        };
        let text = match read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::Other(format!("restore journal {}: {e}; nothing was modified", path.display())))
            }
        };
        let body: Body = serde_json::from_slice(&text).map_err(|e| {
            Error::Other(format!(
                "restore journal {}: cannot be read ({e}); check token {:?} by hand, then remove the file",
                path.display(),
                self.token
            ))
        })?;
        if body.format != 1 || body.token != self.token {
            return Err(Error::Other(format!(
                "restore journal {}: format {} for token {:?} is not this build's (format 1, token {:?})",
                path.display(),
                body.format,
                body.token,
                self.token
            )));
        }
        let t = &work.token;
        let mut made_per: HashMap<&Triple, usize> = HashMap::new();
        for m in &body.made {
            *made_per.entry(m).or_default() += 1;
        }
        let mut old_per: HashMap<&Triple, Vec<&str>> = HashMap::new();
        for (triple, fp) in &body.old {
            old_per.entry(triple).or_default().push(fp);
        }
        let mut destroyed = 0usize;
        let mut destroy = |h: CK_OBJECT_HANDLE| -> Result<()> {
            t.backend.destroy_object(t.session, h)?;
            destroyed += 1;
            Ok(())
        };
        if !body.committed {
            // Roll back: of each triple, keep the objects the dead restore found there (matched by
            // fingerprint), destroy the rest; and the blank objects a killed C_UnwrapKey may have left.
            // `keep`: fingerprints of objects that were there before, each matching one object at most.
            let mut destroy_new = |objects: Vec<(CK_OBJECT_HANDLE, String)>, mut keep: Vec<&str>| -> Result<()> {
                for (h, fp) in objects {
                    match keep.iter().position(|k| *k == fp) {
                        Some(i) => {
                            keep.swap_remove(i);
                        }
                        None => destroy(h)?,
                    }
                }
                Ok(())
            };
            destroy_new(blank_objects(work)?, body.blank.iter().map(String::as_str).collect())?;
            for triple in made_per.keys() {
                let objects = t
                    .backend
                    .find(t.session, &triple.template()?)?
                    .into_iter()
                    .map(|h| Ok((h, fingerprint(work, h, triple.class)?)))
                    .collect::<Result<Vec<_>>>()?;
                destroy_new(objects, old_per.get(triple).cloned().unwrap_or_default())?;
            }
        } else {
            // Finish: of each triple, destroy the replaced objects, keeping as many as the restore made.
            for (triple, olds) in &old_per {
                let mut left: Vec<&str> = olds.clone();
                let found = t.backend.find(t.session, &triple.template()?)?;
                let mut remaining = found.len();
                let made = made_per.get(triple).copied().unwrap_or(0);
                for h in found {
                    if remaining <= made {
                        break;
                    }
                    let fp = fingerprint(work, h, triple.class)?;
                    if let Some(i) = left.iter().position(|k| *k == fp) {
                        left.swap_remove(i);
                        destroy(h)?;
                        remaining -= 1;
                    }
                }
            }
        }
        remove(&path)?;
        let what = if body.committed {
            format!(
                "finished an interrupted restore into token {:?} (process {}): {destroyed} replaced object(s) destroyed",
                self.token, body.pid
            )
        } else {
            format!(
                "rolled back an interrupted restore into token {:?} (process {}): {destroyed} object(s) it had made destroyed",
                self.token, body.pid
            )
        };
        crate::warn!("{what}");
        Ok(Some(what))
    }

    /// Writes the plan (durably) before anything is made.
    pub fn begin(&mut self, work: &Work, made: Vec<Triple>, old: Vec<(Triple, String)>) -> Result<()> {
        let blank = blank_objects(work)?.into_iter().map(|(_, fp)| fp).collect();
        self.body = Some(Body {
            format: 1,
            token: self.token.clone(),
            pid: std::process::id(),
            committed: false,
            made,
            old,
            blank,
        });
        self.write("nothing was modified")
    }

    /// Every object is made: from here on, an interruption is finished, not rolled back.
    pub fn commit(&mut self) -> Result<()> {
        if let Some(body) = self.body.as_mut() {
            body.committed = true;
        }
        self.write("the objects made are rolled back by the next restore into this token")
    }

    /// The restore ended (done, or failed and cleaned up after itself): the journal goes.
    pub fn end(&mut self) -> Result<()> {
        self.body = None;
        remove(&self.path())
    }

    /// Writes the journal durably (temporary file, fsync, rename); `otherwise` says what a failure leaves. The
    /// temporary file is made afresh (0600, O_EXCL): what a dead restore left there is removed first, and a
    /// link or a device put there in between is refused, never written through.
    fn write(&self, otherwise: &str) -> Result<()> {
        let path = self.path();
        let temp = self.dir.join(format!("{}.tmp", name(&self.token, "journal")));
        let fail = |file: &Path, e: std::io::Error| {
            Error::Other(format!("restore journal {}: {e}; {otherwise}", file.display()))
        };
        let text = serde_json::to_vec(&self.body).map_err(|e| Error::Other(e.to_string()))?;
        match std::fs::remove_file(&temp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(&temp, e)),
            _ => {}
        }
        let mut f = crate::files::create_new_private(&temp).map_err(|e| fail(&temp, e))?;
        let fail = |e: std::io::Error| fail(&path, e);
        f.write_all(&text).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        std::fs::rename(&temp, &path).map_err(fail)?;
        sync_dir(&self.dir);
        Ok(())
    }
}

/// An exclusive lock on `file` for the life of the process's descriptor (flock: released when the file is
/// closed or the process dies), or WouldBlock if another process holds it. (`File::try_lock` needs Rust
/// 1.89; the crate's MSRV is 1.85.)
fn try_lock(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this File owns and keeps open; no memory is passed.
    let rv = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rv == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                sync_dir(dir);
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Other(format!("restore journal {}: cannot be removed: {e}", path.display()))),
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Where an interrupted restore into `token` leaves its journal (`dir` is the config's directory).
pub fn journal_path(dir: &Path, token: &str) -> PathBuf {
    dir.join(name(token, "journal"))
}
