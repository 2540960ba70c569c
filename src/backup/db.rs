//! `p11shim db backup` / `db restore`: the whole key store (and, on request, the users table) in one file —
//! the analog of `csadm BackupDatabase`. Allowed in standard mode only: FIPS and CC firmware refuse whole-
//! database backups, and so does p11shim in those modes, pointing to the per-group path.
//!
//! The file: a magic line, then one JSON line per key row ("K") and per user ("U"), then a trailer whose
//! MAC (made in the HSM with the MBK set's MAC key) covers a SHA-256 chain over every line before it. Rows
//! keep their own MACs, so a restored row is as trustworthy as it was in the store.

use super::error::{BackupError, BackupResult};
use super::format::writer::{create_temp, parent_dir, remove_abandoned_temps};
use super::format::{FormatError, Leftover, Sealer, MAX_FIELD};
use crate::config::Mode;
use crate::files;
use crate::store::{KeyRow, KeyStore, UserRow};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;

const MAGIC: &str = "P11SHIM-DB-BACKUP 1";

/// The longest line a restore reads: a key row whose byte fields hold [`MAX_FIELD`] bytes in all (as hex),
/// and its names. SQLite limits a whole row to 10^9 bytes, so every row of an SQLite store fits; a longer
/// line is refused before it is held in memory.
pub const MAX_DB_LINE: u64 = 2 * MAX_FIELD + (1 << 20);

/// Refuses whole-store operations outside standard mode, naming the per-group path.
pub fn allowed(mode: Mode, what: &str) -> BackupResult<()> {
    if mode == Mode::Standard {
        return Ok(());
    }
    Err(BackupError::Refused(format!(
        "{what} of the whole key store is not allowed in {mode} mode (mode = \"{mode}\" in p11shim.toml), as on FIPS/CC HSM firmware; back up and restore per group instead: `p11shim backup --group REGEX --out FILE` and `p11shim restore FILE`"
    )))
}

#[derive(Serialize, Deserialize)]
struct RowLine {
    id: String,
    token: String,
    group: String,
    class: u64,
    key_type: u64,
    label: String,
    ckid: String,
    attrs: String,
    wrapped: String,
    wrap_mech: u64,
    mbk: String,
    mac: String,
}

#[derive(Serialize, Deserialize)]
struct UserLine {
    name: String,
    perm: String,
    group_regex: String,
    auth: String,
    secret: String,
}

/// A seal key of a device MBK (see backup::mbk::Device): the rows sealed under that MBK need it.
#[derive(Serialize, Deserialize)]
struct SealLine {
    mbk: String,
    blob: String,
}

#[derive(Serialize, Deserialize)]
struct Trailer {
    keys: u64,
    users: u64,
    mac: String,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct DbSummary {
    pub keys: u64,
    pub users: u64,
    /// Temporary files of killed whole-store backups to the same file, found and removed (backup only).
    pub leftovers: Vec<Leftover>,
}

fn chain_step(chain: &mut [u8; 32], line: &[u8]) {
    let next = Sha256::new().chain_update(&chain[..]).chain_update(line).finalize();
    chain.copy_from_slice(&next);
}

fn trailer_input(chain: &[u8; 32], keys: u64, users: u64) -> Vec<u8> {
    let mut v = b"p11shim db backup trailer v1\0".to_vec();
    v.extend_from_slice(chain);
    v.extend_from_slice(&keys.to_be_bytes());
    v.extend_from_slice(&users.to_be_bytes());
    v
}

/// Writes the whole store (keys; users when `with_users`) to `out`, which must not exist: a private
/// temporary file (0600, never through a link), fsync, then a hard link to the name (refused atomically if
/// the name appeared meanwhile).
/// `progress` is called with the number of keys written so far.
pub fn backup(
    store: &dyn KeyStore,
    sealer: &dyn Sealer,
    out: &Path,
    with_users: bool,
    progress: &dyn Fn(u64),
) -> BackupResult<DbSummary> {
    files::check_output_target(out, false).map_err(|source| FormatError::Output { path: out.to_path_buf(), source })?;
    let name = out
        .file_name()
        .ok_or_else(|| FormatError::Invalid(format!("{} is not a file name", out.display())))?
        .to_string_lossy()
        .into_owned();
    let dir = parent_dir(out);
    let leftovers = remove_abandoned_temps(&dir, &name);
    let (temp, file) = create_temp(&dir, &name)?;
    let io = |e: std::io::Error| BackupError::from(FormatError::Io { path: temp.clone(), source: e });
    let result = (|| {
        let mut w = BufWriter::new(file);
        let mut chain = [0u8; 32];
        let mut summary = DbSummary { leftovers, ..Default::default() };
        let mut put = |w: &mut BufWriter<File>, line: Vec<u8>| -> BackupResult<()> {
            chain_step(&mut chain, &line);
            w.write_all(&line).and_then(|_| w.write_all(b"\n")).map_err(io)
        };
        put(&mut w, MAGIC.as_bytes().to_vec())?;
        let seal_keys = store.seal_keys()?;
        for (mbk, blob) in seal_keys.clone() {
            put(&mut w, line("S ", &SealLine { mbk, blob: hex::encode(blob) }))?;
        }
        let mut failed = None;
        store
            .scan(&mut |row| {
                if let Err(e) = put(&mut w, line("K ", &row_line(&row))) {
                    failed = Some(e);
                    return Err(crate::store::StoreError::Schema { store: String::new(), cause: "stopped".into() });
                }
                summary.keys += 1;
                progress(summary.keys);
                Ok(())
            })
            .or_else(|e| failed.take().map_or(Err(BackupError::from(e)), Err))?;
        // A row is sealed only once its seal key is in the store: read after the rows, the seal keys cover
        // every row read. One that appeared meanwhile is not in the file, whose seal keys come first.
        if store.seal_keys()? != seal_keys {
            return Err(BackupError::Refused(
                "a seal key was added to the key store while it was read (a host used a new device MBK): nothing \
                 was written; run the backup again"
                    .into(),
            ));
        }
        if with_users {
            for u in store.user_list()? {
                let user = UserLine {
                    name: u.name,
                    perm: u.perm,
                    group_regex: u.group_regex,
                    auth: u.auth,
                    secret: hex::encode(&u.secret),
                };
                put(&mut w, line("U ", &user))?;
                summary.users += 1;
            }
        }
        let mac = sealer.seal(&trailer_input(&chain, summary.keys, summary.users))?;
        let trailer = Trailer { keys: summary.keys, users: summary.users, mac: hex::encode(mac) };
        let mut last = line("T ", &trailer);
        last.push(b'\n');
        w.write_all(&last).map_err(io)?;
        let file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        match std::fs::hard_link(&temp, out) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let exists = std::io::Error::new(e.kind(), "exists; choose another name or remove it first");
                return Err(FormatError::Output { path: out.to_path_buf(), source: exists }.into());
            }
            // A filesystem without hard links: check, then rename.
            Err(_) => {
                files::check_output_target(out, false)
                    .map_err(|source| FormatError::Output { path: out.to_path_buf(), source })?;
                std::fs::rename(&temp, out).map_err(io)?;
            }
        }
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(summary)
    })();
    let _ = std::fs::remove_file(&temp);
    result
}

/// One line's bytes: the prefix and the JSON, without the newline.
fn line(prefix: &str, value: &impl Serialize) -> Vec<u8> {
    let mut out = prefix.as_bytes().to_vec();
    serde_json::to_writer(&mut out, value).expect("plain data always serializes");
    out
}
fn row_line(r: &KeyRow) -> RowLine {
    RowLine {
        id: r.id.clone(),
        token: r.token.clone(),
        group: r.group.clone(),
        class: r.class,
        key_type: r.key_type,
        label: hex::encode(&r.label),
        ckid: hex::encode(&r.ckid),
        attrs: hex::encode(&r.attrs),
        wrapped: hex::encode(&r.wrapped),
        wrap_mech: r.wrap_mech,
        mbk: r.mbk.clone(),
        mac: hex::encode(&r.mac),
    }
}

/// Restores a whole-store backup: checks the file completely first (reading it line by line), then reads
/// it again and replaces every row it holds in one transaction, committed only if the second reading
/// hashes to what the first checked (users one by one after it; a user that exists is replaced).
/// `users_denied` is why the logged-on users may not replace the users table (12000000), if they may not:
/// a file that holds users is then refused before anything is changed.
/// `file_sealer` is the file's own when its MACs were made with another key than `sealer`'s (a device MBK's
/// seal key of another store, see [`seal_keys_of`]): every row's MAC is then checked with it and the row
/// sealed again with `sealer`.
pub fn restore(
    store: &dyn KeyStore,
    sealer: &dyn Sealer,
    file_sealer: Option<&dyn Sealer>,
    file: &Path,
    users_denied: Option<&str>,
    progress: &dyn Fn(u64),
) -> BackupResult<DbSummary> {
    let checked = read_lines(file, &mut |number, _| {
        progress(number);
        Ok(())
    })?;
    if !file_sealer
        .unwrap_or(sealer)
        .check(&trailer_input(&checked.chain, checked.keys, checked.users), &checked.mac)?
        || checked.trailer_keys != checked.keys
        || checked.trailer_users != checked.users
    {
        return Err(damaged(
            file,
            "the trailer MAC does not match: the file was changed, truncated or made under another MBK",
        ));
    }
    if let Some(why) = users_denied {
        if checked.users > 0 {
            return Err(BackupError::Denied {
                action: "import",
                why: format!("{} holds the users table: {why}", file.display()),
            });
        }
    }
    let mut tx = store.begin()?;
    let mut summary = DbSummary::default();
    let mut users = Vec::new();
    let again = read_lines(file, &mut |number, line| {
        let bad = |what: String| damaged(file, &format!("line {number}: {what}"));
        if let Some(json) = line.strip_prefix(b"K ") {
            let r: RowLine = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
            let hexf = |s: &str, f: &str| hex::decode(s).map_err(|_| bad(format!("{f} is not hex")));
            let mut row = KeyRow {
                label: hexf(&r.label, "label")?,
                ckid: hexf(&r.ckid, "ckid")?,
                attrs: hexf(&r.attrs, "attrs")?,
                wrapped: hexf(&r.wrapped, "wrapped")?,
                mac: hexf(&r.mac, "mac")?,
                id: r.id,
                token: r.token,
                group: r.group,
                class: r.class,
                key_type: r.key_type,
                wrap_mech: r.wrap_mech,
                mbk: r.mbk,
                version: 1,
            };
            if let Some(theirs) = file_sealer.filter(|_| row.mbk == sealer.key_name()) {
                let input = crate::vault::mac_input(&row);
                if !theirs.check(&input, &row.mac)? {
                    return Err(bad(format!("stored key {}: its MAC does not match: the row was changed", row.id)));
                }
                row.mac = sealer.seal(&input)?;
            }
            tx.replace(&row)?;
            summary.keys += 1;
            progress(number);
        } else if let Some(json) = line.strip_prefix(b"U ") {
            let u: UserLine = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
            let secret = hex::decode(&u.secret).map_err(|_| bad("secret is not hex".into()))?;
            users.push(UserRow {
                name: u.name,
                perm: u.perm,
                group_regex: u.group_regex,
                auth: u.auth,
                secret,
                version: 1,
                failed: 0,
                last_failed: 0,
                mac: Vec::new(),
            });
        }
        Ok(())
    })?;
    if again.chain != checked.chain || again.mac != checked.mac {
        return Err(BackupError::Changed(file.to_path_buf()));
    }
    tx.commit()?;
    for mut u in users {
        match store.user_get(&u.name)? {
            Some(old) => {
                u.version = old.version + 1;
                crate::auth::seal_restored(sealer, &mut u)?;
                store.user_update(&u)?;
            }
            None => {
                crate::auth::seal_restored(sealer, &mut u)?;
                store.user_insert(&u)?
            }
        }
        summary.users += 1;
    }
    Ok(summary)
}

/// The seal keys a whole-store backup holds: (device MBK fingerprint, blob). Its trailer MAC is made with
/// the one of the MBK that made the file, which a restore into a store without it must use.
pub fn seal_keys_of(file: &Path) -> BackupResult<Vec<(String, Vec<u8>)>> {
    let mut seals = Vec::new();
    read_lines(file, &mut |number, line| {
        if let Some(json) = line.strip_prefix(b"S ") {
            let bad = |what: String| damaged(file, &format!("line {number}: {what}"));
            let s: SealLine = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
            seals.push((s.mbk, hex::decode(&s.blob).map_err(|_| bad("the seal key blob is not hex".into()))?));
        }
        Ok(())
    })?;
    Ok(seals)
}

fn damaged(file: &Path, detail: &str) -> BackupError {
    BackupError::DamagedDb { file: file.to_path_buf(), detail: detail.to_string() }
}

/// What one reading of a whole-store backup found.
struct Lines {
    chain: [u8; 32],
    keys: u64,
    users: u64,
    trailer_keys: u64,
    trailer_users: u64,
    mac: Vec<u8>,
}

/// Reads the file line by line (each at most [`MAX_DB_LINE`] bytes), hashing every line before the trailer
/// into the chain and handing it (with its 1-based number) to `each`; returns the chain and the trailer.
fn read_lines(file: &Path, each: &mut dyn FnMut(u64, &[u8]) -> BackupResult<()>) -> BackupResult<Lines> {
    let f = File::open(file).map_err(|source| FormatError::Io { path: file.to_path_buf(), source })?;
    let mut input = BufReader::with_capacity(1 << 16, f);
    let mut chain = [0u8; 32];
    let (mut keys, mut users) = (0u64, 0u64);
    let mut buf = Vec::new();
    for number in 1u64.. {
        buf.clear();
        input
            .by_ref()
            .take(MAX_DB_LINE + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|source| FormatError::Io { path: file.to_path_buf(), source })?;
        if buf.is_empty() {
            break;
        }
        if buf.last() != Some(&b'\n') {
            let why = if buf.len() as u64 > MAX_DB_LINE { "longer than any row" } else { "cut short" };
            return Err(damaged(file, &format!("truncated: line {number} is {why}")));
        }
        buf.pop();
        let line = &buf[..];
        if number == 1 && line != MAGIC.as_bytes() {
            let what = if line.starts_with(b"P11SHIM-BACKUP ") {
                "it is a per-group backup (written by `p11shim backup`): restore it with `p11shim restore`".to_string()
            } else if line.ends_with(b"\r") {
                "its lines end with CR LF: a text transfer converted it; copy backups as binary files".to_string()
            } else {
                format!("not a p11shim whole-store backup ({MAGIC})")
            };
            return Err(damaged(file, &what));
        }
        if let Some(json) = line.strip_prefix(b"T ") {
            let t: Trailer = serde_json::from_slice(json).map_err(|e| damaged(file, &format!("trailer: {e}")))?;
            let mut rest = [0u8; 1];
            if input.read(&mut rest).map_err(|source| FormatError::Io { path: file.to_path_buf(), source })? != 0 {
                return Err(damaged(file, "data after the trailer"));
            }
            return Ok(Lines {
                chain,
                keys,
                users,
                trailer_keys: t.keys,
                trailer_users: t.users,
                mac: hex::decode(&t.mac).unwrap_or_default(),
            });
        }
        chain_step(&mut chain, line);
        keys += line.starts_with(b"K ") as u64;
        users += line.starts_with(b"U ") as u64;
        each(number, line)?;
    }
    Err(damaged(file, "truncated (no trailer)"))
}
