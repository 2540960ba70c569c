//! `p11shim keys …`: the stored keys, listed by token, group and label, and moved between groups.

use super::backup::TokenArg;
use super::exit::{CliResult, Failure, Outcome};
use super::users::{logons, open_store, other_tokens, LogonArgs, Seals};
use clap::Subcommand;
use p11shim::backup::import::label_text;
use p11shim::backup::keys::{self, KeyFilter};
use p11shim::backup::work::Work;
use p11shim::config::Config;
use p11shim::error::{class_name, key_type_name};
use p11shim::store::KeyRow;
use serde_json::json;

#[derive(Subcommand)]
pub enum KeysCommand {
    /// List the keys of the key store: id, token, group, class, key type and label, ordered by token and
    /// id; rows that cannot be read are listed apart (exit status 3). Reads the store only: no PIN, no
    /// logon. Keys the HSM keeps itself (pass-through slots, and keys a database slot left in the HSM) are
    /// not in the store: list them with `pkcs11-tool -O`.
    List {
        /// Only keys of this token.
        #[arg(long, value_name = "LABEL")]
        token: Option<String>,
        /// Only keys whose group matches this regular expression (matched against the whole group name).
        #[arg(long, value_name = "REGEX")]
        group: Option<String>,
        /// Only keys with exactly this label (CKA_LABEL).
        #[arg(long, value_name = "TEXT")]
        label: Option<String>,
    },
    /// Move a stored key to another group (CKA_P11SHIM_GROUP), which decides who may back it up and restore
    /// it. Needs 00000002 for the key's group and for the new one from the logged-on users (--logon), as a
    /// backup from one and a restore into the other would; refusals and moves are audited. The key's row is
    /// re-sealed in the HSM (the token's MBK set's MAC key): no PIN needed.
    SetGroup {
        /// The key's id (the first column of `p11shim keys list`).
        id: String,
        /// The new group: 1 to 64 printable characters.
        group: String,
        #[command(flatten)]
        token: TokenArg,
        #[command(flatten)]
        logon: LogonArgs,
    },
}

pub fn run(config: &Config, command: KeysCommand, json: bool) -> CliResult {
    match command {
        KeysCommand::List { token, group, label } => list(config, token, group, label, json),
        KeysCommand::SetGroup { id, group, token, logon } => set_group(config, &id, &group, &token, &logon, json),
    }
}

fn item(row: &KeyRow) -> serde_json::Value {
    json!({"id": row.id, "token": row.token, "group": row.group, "class": class_name(row.class),
           "key_type": key_type_name(row.key_type), "label": label_text(&row.label), "ckid": hex::encode(&row.ckid),
           "mbk": row.mbk})
}

fn list(config: &Config, token: Option<String>, group: Option<String>, label: Option<String>, json: bool) -> CliResult {
    let store = open_store(config)?;
    let filter =
        KeyFilter { token: token.as_deref(), group: group.as_deref(), label: label.as_deref().map(str::as_bytes) };
    let (rows, bad) = keys::list(store.as_ref(), &filter).map_err(|e| match e.kind() {
        p11shim::error::ErrorKind::Failed => Failure::usage(e.to_string()),
        _ => e.into(),
    })?;
    if json {
        let bad: Vec<_> = bad.iter().map(|b| json!({"id": b.id, "why": b.cause})).collect();
        println!(
            "{}",
            json!({"store": store.describe(), "keys": rows.iter().map(item).collect::<Vec<_>>(), "unreadable": bad})
        );
    } else {
        println!("{:<32}  {:<16}  {:<20}  {:<15}  {:<18}  label", "id", "token", "group", "class", "key type");
        for row in &rows {
            println!(
                "{:<32}  {:<16}  {:<20}  {:<15}  {:<18}  {}",
                row.id,
                row.token,
                row.group,
                class_name(row.class),
                key_type_name(row.key_type),
                label_text(&row.label)
            );
        }
        for b in &bad {
            println!("{:<32}  UNREADABLE: {}", b.id, b.cause);
        }
        println!("{} keys in {}", rows.len(), store.describe());
    }
    if !bad.is_empty() {
        return Ok(Outcome::Attention(format!(
            "{} rows of the key store cannot be read (listed above): restore those keys from a backup or delete the rows",
            bad.len()
        )));
    }
    Ok(Outcome::Done)
}

fn set_group(config: &Config, id: &str, group: &str, token: &TokenArg, logon: &LogonArgs, json: bool) -> CliResult {
    p11shim::attrs::check_group(group).map_err(Failure::usage)?;
    let store = open_store(config)?;
    let label = match &token.token {
        Some(t) => t.clone(),
        // The key's own token, when the row names one.
        None => match store.get(id)? {
            Some(row) => row.token,
            None => token.label(config)?,
        },
    };
    let work = Work::open_public(config, &label)?;
    let others = other_tokens(config, &work);
    let seals = Seals::new(&work, &others);
    let trail = seals.trail(store.as_ref(), config);
    let users = logons(&trail, config, &logon.logon)?;
    let moved = keys::set_group(&trail, &work, &users, id, group)?;
    let same = moved.from == moved.to;
    if json {
        println!(
            "{}",
            json!({"id": moved.id, "label": label_text(&moved.label), "from": moved.from, "to": moved.to, "moved": !same})
        );
    } else if same {
        println!("Stored key {} ({}) is in group {:?} already.", moved.id, label_text(&moved.label), moved.to);
    } else {
        println!(
            "Stored key {} ({}) moved from group {:?} to {:?}.",
            moved.id,
            label_text(&moved.label),
            moved.from,
            moved.to
        );
    }
    Ok(Outcome::Done)
}
