//! `p11shim audit …`: show and verify the hash-chained audit log.

use super::backup::TokenArg;
use super::exit::{CliResult, Exit, Failure, Outcome};
use super::users::{open_store, other_tokens, sealing_token, Seals};
use clap::Subcommand;
use p11shim::audit;
use p11shim::config::Config;
use p11shim::store::{AuditEntry, StoreError};
use std::io::Write;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Print the audit log, oldest first: seq, time, who (logged-on users), action, group, key count, result,
    /// the mode the operation ran in, and whether the entry is sealed by the HSM. No PIN, no logon.
    /// With --json: one JSON array of entries (seq, time, who, action, group, count, result, mode, and prev,
    /// hash and mac in hex).
    Show,
    /// Check the whole log: contiguous seq from 1, each entry linked to the previous one's hash, each hash
    /// matching its entry, each entry's MAC verified in the HSM (the MAC key of the token's MBK set: a writer
    /// of the database cannot make it), no unsealed entry after a sealed one, and the highest head of the
    /// head file ([audit] head_file, default audit.head beside the config) present with the same hash (so a
    /// truncated log or a tail rewritten by someone who can use the HSM is found). Exit status 1 names the
    /// first bad entry. Prints what was checked. No PIN, no logon.
    Verify {
        #[command(flatten)]
        token: TokenArg,
    },
}

pub fn run(config: &Config, command: AuditCommand, json: bool) -> CliResult {
    let store = open_store(config)?;
    match command {
        AuditCommand::Show => show(&*store, json),
        AuditCommand::Verify { token } => {
            let work = sealing_token(config, &token)?;
            // The other tokens of the config check the entries their MBK sets sealed.
            let others = other_tokens(config, &work);
            let seals = Seals::new(&work, &others);
            let report = audit::verify(&seals.trail(store.as_ref(), config))?;
            let checked = report.checked();
            if json {
                let value = serde_json::json!({
                    "store": store.describe(), "entries": report.entries, "intact": report.first_bad.is_none(),
                    "first_bad": report.first_bad.as_ref().map(|b| serde_json::json!({"seq": b.seq, "reason": b.reason})),
                    "last": report.head.as_ref().map(|(seq, hash)| serde_json::json!({"seq": seq, "hash": hash})),
                    "checked": checked, "unverifiable": report.unverifiable.len(),
                });
                println!("{value}");
            }
            match (&report.first_bad, &report.head) {
                (Some(bad), _) => {
                    if !json {
                        println!("audit log of {} is BROKEN at entry {}: {}", store.describe(), bad.seq, bad.reason);
                        println!("checked up to there ({} entries read):", report.entries);
                        for line in &checked {
                            println!("  {line}");
                        }
                    }
                    // With --json the report above is the document: it names the bad entry.
                    let message = format!("audit log of {} is broken: {bad}", store.describe());
                    Err(if json {
                        Failure::reported(Exit::Damaged, message)
                    } else {
                        Failure::new(Exit::Damaged, message)
                    })
                }
                (None, head) => {
                    if !json {
                        match head {
                            Some((seq, hash)) => println!(
                                "audit log of {} intact: {} entries, last seq {seq}, last hash {hash}",
                                store.describe(),
                                report.entries
                            ),
                            None => println!("audit log of {} empty", store.describe()),
                        }
                        println!("checked:");
                        for line in &checked {
                            println!("  {line}");
                        }
                    }
                    if report.unverifiable.is_empty() {
                        Ok(Outcome::Done)
                    } else {
                        Ok(Outcome::Attention(
                            "some entries were sealed under MBK sets no token of this config holds: their MACs were not checked".into(),
                        ))
                    }
                }
            }
        }
    }
}

fn show(store: &dyn p11shim::store::KeyStore, json: bool) -> CliResult {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut first = true;
    let io = |e: std::io::Error| StoreError::Unavailable { store: "stdout".into(), cause: e.to_string() };
    if json {
        write!(out, "[").map_err(io)?;
    } else {
        writeln!(
            out,
            "{:>6}  {:<27}  {:<16}  {:<24}  {:<12}  {:>5}  {:<8}  {:<6}  result",
            "seq", "time", "who", "action", "group", "keys", "mode", "sealed"
        )
        .map_err(io)?;
    }
    store.audit_scan(&mut |e: AuditEntry| {
        let d = &e.draft;
        if json {
            let value = serde_json::json!({
                "seq": e.seq, "time": d.time, "who": d.who, "action": d.action, "group": d.group,
                "count": d.count, "result": d.result, "mode": d.mode, "prev": hex::encode(&e.prev),
                "hash": hex::encode(&e.hash), "mac": hex::encode(&e.mac), "mbk": e.mbk,
            });
            write!(out, "{}\n{value}", if first { "" } else { "," }).map_err(io)?;
        } else {
            writeln!(
                out,
                "{:>6}  {:<27}  {:<16}  {:<24}  {:<12}  {:>5}  {:<8}  {:<6}  {}",
                e.seq,
                d.time,
                d.who,
                d.action,
                d.group,
                d.count,
                if d.mode.is_empty() { "-" } else { &d.mode },
                if e.mac.is_empty() { "no" } else { "yes" },
                d.result
            )
            .map_err(io)?;
        }
        first = false;
        Ok(())
    })?;
    if json {
        writeln!(out, "{}]", if first { "" } else { "\n" }).map_err(io)?;
    }
    out.flush().map_err(io)?;
    Ok(Outcome::Done)
}
