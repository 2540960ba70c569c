//! `p11shim db backup` / `db restore`: the whole key store (and, on request, the users table) in one file —
//! the analog of `csadm BackupDatabase`. Allowed in standard mode only: FIPS and CC firmware refuse whole-
//! database backups, and so does p11shim in those modes, pointing to the per-group path.
//!
//! The file: a magic line, then one JSON line per key row ("K") and per user ("U"), then a trailer whose
//! MAC (made in the HSM with the MBK set's MAC key) covers a SHA-256 chain over every line before it. Rows
//! keep their own MACs, so a restored row is as trustworthy as it was in the store.

use super::format::Sealer;
use crate::config::Mode;
use crate::error::{Error, Result};
use crate::store::{KeyRow, KeyStore, UserRow};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;

const MAGIC: &str = "P11SHIM-DB-BACKUP 1";

/// Refuses whole-store operations outside standard mode, naming the per-group path.
pub fn allowed(mode: Mode, what: &str) -> Result<()> {
    if mode == Mode::Standard {
        return Ok(());
    }
    Err(Error::Other(format!(
        "refused: {what} of the whole key store is not allowed in {mode} mode (mode = \"{mode}\" in p11shim.toml), as on FIPS/CC HSM firmware; back up and restore per group instead: `p11shim backup --group REGEX --out FILE` and `p11shim restore FILE`"
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

/// Writes the whole store (keys; users when `with_users`) to `out` (temporary file, fsync, rename).
pub fn backup(store: &dyn KeyStore, sealer: &dyn Sealer, out: &Path, with_users: bool) -> Result<DbSummary> {
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = out.file_name().ok_or_else(|| Error::Other(format!("{} is not a file name", out.display())))?;
    let temp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let io = |e: std::io::Error| Error::Other(format!("writing {}: {e}", temp.display()));
    let result = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp).map_err(io)?;
        let mut w = BufWriter::new(file);
        let mut chain = [0u8; 32];
        let mut summary = DbSummary::default();
        let mut put = |w: &mut BufWriter<std::fs::File>, line: String| -> Result<()> {
            chain_step(&mut chain, line.as_bytes());
            w.write_all(line.as_bytes()).and_then(|_| w.write_all(b"\n")).map_err(io)
        };
        put(&mut w, MAGIC.to_string())?;
        let mut failed = None;
        store
            .scan(&mut |row| {
                let line = format!("K {}", serde_json::to_string(&row_line(&row)).expect("plain data"));
                if let Err(e) = put(&mut w, line) {
                    failed = Some(e);
                    return Err(crate::store::StoreError::Schema { store: String::new(), cause: "stopped".into() });
                }
                summary.keys += 1;
                Ok(())
            })
            .or_else(|e| failed.take().map_or(Err(Error::Store(e)), Err))?;
        if with_users {
            for u in store.user_list()? {
                let line = UserLine {
                    name: u.name,
                    perm: u.perm,
                    group_regex: u.group_regex,
                    auth: u.auth,
                    secret: hex::encode(&u.secret),
                };
                put(&mut w, format!("U {}", serde_json::to_string(&line).expect("plain data")))?;
                summary.users += 1;
            }
        }
        let mac = sealer.seal(&trailer_input(&chain, summary.keys, summary.users))?;
        let trailer = Trailer { keys: summary.keys, users: summary.users, mac: hex::encode(mac) };
        writeln!(w, "T {}", serde_json::to_string(&trailer).expect("plain data")).map_err(io)?;
        let file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        if out.exists() {
            return Err(Error::Other(format!("{} exists; choose another name or remove it first", out.display())));
        }
        std::fs::rename(&temp, out).map_err(io)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(summary)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
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

/// Restores a whole-store backup: checks the file completely first, then replaces every row and user it
/// holds in one transaction (users one by one after it; a user that exists is replaced). `users_denied` is
/// why the logged-on users may not replace the users table (12000000), if they may not: a file that holds
/// users is then refused before anything is changed.
pub fn restore(
    store: &dyn KeyStore,
    sealer: &dyn Sealer,
    file: &Path,
    users_denied: Option<&str>,
) -> Result<DbSummary> {
    let lines = read_checked(sealer, file)?;
    if let Some(why) = users_denied {
        if lines.iter().any(|l| l.starts_with("U ")) {
            return Err(Error::Denied(format!("import denied: {} holds the users table: {why}", file.display())));
        }
    }
    let mut tx = store.begin()?;
    let mut summary = DbSummary::default();
    let mut users = Vec::new();
    for (number, line) in lines.iter().enumerate().skip(1) {
        let bad = |e: serde_json::Error| Error::Other(format!("{} line {}: {e}", file.display(), number + 1));
        if let Some(json) = line.strip_prefix("K ") {
            let r: RowLine = serde_json::from_str(json).map_err(bad)?;
            let hexf = |s: &str, f: &str| {
                hex::decode(s)
                    .map_err(|_| Error::Other(format!("{} line {}: {f} is not hex", file.display(), number + 1)))
            };
            let row = KeyRow {
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
            tx.replace(&row)?;
            summary.keys += 1;
        } else if let Some(json) = line.strip_prefix("U ") {
            let u: UserLine = serde_json::from_str(json).map_err(bad)?;
            let secret = hex::decode(&u.secret)
                .map_err(|_| Error::Other(format!("{} line {}: secret is not hex", file.display(), number + 1)))?;
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

/// Every line of the file (without the trailer), after checking the chain and the trailer MAC.
fn read_checked(sealer: &dyn Sealer, file: &Path) -> Result<Vec<String>> {
    let f = std::fs::File::open(file).map_err(|e| Error::Other(format!("cannot read {}: {e}", file.display())))?;
    let mut chain = [0u8; 32];
    let mut lines = Vec::new();
    let (mut keys, mut users) = (0u64, 0u64);
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(|e| Error::Other(format!("reading {}: {e}", file.display())))?;
        if lines.is_empty() && line != MAGIC {
            return Err(Error::Other(format!("{} is not a p11shim whole-store backup ({MAGIC})", file.display())));
        }
        if let Some(json) = line.strip_prefix("T ") {
            let t: Trailer =
                serde_json::from_str(json).map_err(|e| Error::Other(format!("{}: trailer: {e}", file.display())))?;
            let mac = hex::decode(&t.mac).unwrap_or_default();
            if t.keys != keys || t.users != users || !sealer.check(&trailer_input(&chain, keys, users), &mac)? {
                return Err(Error::Other(format!(
                    "{}: the trailer MAC does not match: the file was changed, truncated or made under another MBK; nothing was modified",
                    file.display()
                )));
            }
            return Ok(lines);
        }
        chain_step(&mut chain, line.as_bytes());
        keys += line.starts_with("K ") as u64;
        users += line.starts_with("U ") as u64;
        lines.push(line);
    }
    Err(Error::Other(format!("{}: truncated (no trailer); nothing was modified", file.display())))
}
