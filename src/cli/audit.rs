//! `p11shim audit …`: show and verify the hash-chained audit log.

use super::users::open_store;
use super::{CliResult, Outcome};
use crate::audit;
use crate::config::Config;
use crate::store::{AuditEntry, StoreError};
use clap::Subcommand;
use std::io::Write;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Print the audit log, oldest first: seq, time, who (logged-on users), action, group, key count, result.
    Show {
        /// One JSON array (entries with seq, time, who, action, group, count, result, prev, hash in hex).
        #[arg(long)]
        json: bool,
    },
    /// Check the log's hash chain: contiguous seq from 1, each entry linked to the previous one's hash, each
    /// hash matching its entry. Exit status 1 names the first bad entry (edited, removed or reordered). On
    /// success it prints the last entry's hash: keep it elsewhere to detect a later truncation of the tail.
    Verify,
}

pub fn run(config: &Config, command: AuditCommand) -> CliResult {
    let store = open_store(config)?;
    match command {
        AuditCommand::Show { json } => show(&*store, json),
        AuditCommand::Verify => {
            let report = audit::verify(&*store).map_err(|e| e.to_string())?;
            match (&report.first_bad, &report.head) {
                (Some(bad), _) => {
                    Err(format!("audit log of {} is broken: {bad} ({} entries read)", store.describe(), report.entries))
                }
                (None, Some((seq, hash))) => {
                    println!("audit log intact: {} entries, last seq {seq}, last hash {hash}", report.entries);
                    Ok(Outcome::Done)
                }
                (None, None) => {
                    println!("audit log empty");
                    Ok(Outcome::Done)
                }
            }
        }
    }
}

fn show(store: &dyn crate::store::KeyStore, json: bool) -> CliResult {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut first = true;
    let io = |e: std::io::Error| StoreError::Unavailable { store: "stdout".into(), cause: e.to_string() };
    if json {
        write!(out, "[").map_err(|e| e.to_string())?;
    } else {
        writeln!(
            out,
            "{:>6}  {:<27}  {:<16}  {:<24}  {:<12}  {:>5}  result",
            "seq", "time", "who", "action", "group", "keys"
        )
        .map_err(|e| e.to_string())?;
    }
    store
        .audit_scan(&mut |e: AuditEntry| {
            let d = &e.draft;
            if json {
                let value = serde_json::json!({
                    "seq": e.seq, "time": d.time, "who": d.who, "action": d.action, "group": d.group,
                    "count": d.count, "result": d.result, "prev": hex::encode(&e.prev), "hash": hex::encode(&e.hash),
                });
                write!(out, "{}\n{value}", if first { "" } else { "," }).map_err(io)?;
            } else {
                writeln!(
                    out,
                    "{:>6}  {:<27}  {:<16}  {:<24}  {:<12}  {:>5}  {}",
                    e.seq, d.time, d.who, d.action, d.group, d.count, d.result
                )
                .map_err(io)?;
            }
            first = false;
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    if json {
        writeln!(out, "{}]", if first { "" } else { "\n" }).map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())?;
    Ok(Outcome::Done)
}
