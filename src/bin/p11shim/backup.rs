//! `p11shim backup`, `restore`, `verify` (per group, under the MBK) and `db backup` / `db restore` (the whole
//! store, standard mode only).

use super::pins::PinArgs;
use super::users::{logons, open_store, other_tokens, LogonArgs, Seals};
use super::{CliResult, Outcome};
use clap::{Args, Subcommand};
use p11shim::auth::Need;
use p11shim::backup::export::{self, ExportOptions};
use p11shim::backup::import::{self, ImportOptions};
use p11shim::backup::work::{audit, Work};
use p11shim::backup::{db, verify};
use p11shim::config::{Config, Storage};
use serde_json::json;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Args)]
pub struct TokenArg {
    /// The token to work with (default: the first `storage = "database"` slot of the config).
    #[arg(long, value_name = "LABEL")]
    pub token: Option<String>,
}

impl TokenArg {
    pub fn label(&self, config: &Config) -> Result<String, String> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        config.slots.iter().find(|s| s.storage == Storage::Database).map(|s| s.token.clone()).ok_or_else(|| {
            format!("no --token given and {} has no [[slot]] with storage = \"database\"", config.source.display())
        })
    }
}

#[derive(Args)]
pub struct BackupArgs {
    /// Back up every key whose group matches this regular expression (matched against the whole group).
    #[arg(long, value_name = "REGEX")]
    pub group: String,
    /// The backup file to write; it appears under this name only when complete.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Replace FILE if it exists.
    #[arg(long)]
    pub replace: bool,
    /// Back up only keys of the key store, and no key the token keeps itself: then no user PIN is needed
    /// (stored keys are wrapped under the MBK already; the token's own keys need the user's login to be
    /// wrapped). The token's own keys are not looked at.
    #[arg(long)]
    pub stored_only: bool,
    /// Print a JSON summary on stdout (for scripts) instead of the report.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub token: TokenArg,
    #[command(flatten)]
    pub logon: LogonArgs,
    #[command(flatten)]
    pub pins: PinArgs,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// The backup file.
    pub file: PathBuf,
    /// Replace keys that are already present (refused in CC mode). Without it they are skipped.
    #[arg(long)]
    pub overwrite: bool,
    /// Check the file and report what would be added, skipped and overwritten; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub token: TokenArg,
    #[command(flatten)]
    pub logon: LogonArgs,
    #[command(flatten)]
    pub pins: PinArgs,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// The backup file.
    pub file: PathBuf,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub token: TokenArg,
    #[command(flatten)]
    pub logon: LogonArgs,
    #[command(flatten)]
    pub pins: PinArgs,
}

#[derive(Subcommand)]
pub enum DbCommand {
    /// Back up the whole key store (the BackupDatabase analog): standard mode only. Needs 02000000 (and
    /// 12000000 with --users).
    Backup {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Include the users table.
        #[arg(long)]
        users: bool,
        #[command(flatten)]
        token: TokenArg,
        #[command(flatten)]
        logon: LogonArgs,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Restore a whole-store backup (rows and users it holds replace those present): standard mode only.
    /// Needs 02000000 (and 12000000 when the file holds the users table).
    Restore {
        file: PathBuf,
        #[command(flatten)]
        token: TokenArg,
        #[command(flatten)]
        logon: LogonArgs,
        #[command(flatten)]
        pins: PinArgs,
    },
}

pub fn backup(config: &Config, a: BackupArgs) -> CliResult {
    let store = open_store(config)?;
    let label = a.token.label(config)?;
    let work =
        if a.stored_only { Work::open_public(config, &label) } else { Work::open(config, &label, &a.pins.user()?) }
            .map_err(|e| e.to_string())?;
    let others = other_tokens(config, &work);
    let seals = Seals::new(&work, &others);
    let trail = seals.trail(store.as_ref(), config);
    let users = logons(&trail, config, &a.logon.logon)?;
    let tty = std::io::stderr().is_terminal() && !a.json;
    let mut progress = |n: u64| {
        if tty && n % 500 == 0 {
            eprint!("\rexported {n} keys…");
        }
    };
    let opts = ExportOptions { filter: &a.group, out: &a.out, replace: a.replace, stored_only: a.stored_only };
    let report = export::export(&trail, &work, &users, &opts, &mut progress).map_err(|e| e.to_string())?;
    if tty {
        eprint!("\r");
    }
    if a.json {
        let skipped: Vec<_> = report.skipped.iter().map(|s| json!({"key": s.key, "why": s.why})).collect();
        println!(
            "{}",
            json!({"file": report.path, "mbk": report.fingerprint, "exported": report.exported, "stored": report.stored,
                   "hsm": report.hsm, "groups": report.groups, "not_exported": skipped})
        );
    } else {
        println!("Backup {} written: {} keys under MBK {}", report.path.display(), report.exported, report.fingerprint);
        println!("  from the key store: {}; from token {label:?}: {}", report.stored, report.hsm);
        for (g, n) in &report.groups {
            println!("  group {g}: {n}");
        }
        for s in &report.skipped {
            println!("  NOT EXPORTED: {}: {}", s.key, s.why);
        }
    }
    if report.skipped.is_empty() {
        Ok(Outcome::Done)
    } else {
        Ok(Outcome::Attention(format!("{} keys could not be exported (listed above)", report.skipped.len())))
    }
}

pub fn restore(config: &Config, a: RestoreArgs) -> CliResult {
    let store = open_store(config)?;
    let label = a.token.label(config)?;
    let work = Work::open(config, &label, &a.pins.user()?).map_err(|e| e.to_string())?;
    let others = other_tokens(config, &work);
    let seals = Seals::new(&work, &others);
    let trail = seals.trail(store.as_ref(), config);
    let users = logons(&trail, config, &a.logon.logon)?;
    let opts = ImportOptions { file: &a.file, overwrite: a.overwrite, dry_run: a.dry_run, mode: config.mode };
    let report = import::import(&trail, &work, &users, &opts).map_err(|e| e.to_string())?;
    if let Some(recovered) = &report.recovered {
        eprintln!("p11shim: first {recovered}");
    }
    let verb = if a.dry_run { "would be" } else { "were" };
    if a.json {
        println!(
            "{}",
            json!({"file": a.file, "token": label, "dry_run": a.dry_run, "records": report.records,
                   "added": report.added.names, "skipped": report.skipped.names, "overwritten": report.overwritten.names,
                   "added_count": report.added.count, "skipped_count": report.skipped.count,
                   "overwritten_count": report.overwritten.count, "names_kept_per_list": import::NAMES_KEPT,
                   "recovered": report.recovered})
        );
    } else {
        println!("{} records in {} (MBK {})", report.records, a.file.display(), report.fingerprint);
        for (what, list) in
            [("added", &report.added), ("skipped (present)", &report.skipped), ("overwritten", &report.overwritten)]
        {
            println!("  {} {verb} {what}", list.len());
            for k in list.names.iter().take(50) {
                println!("    {k}");
            }
            if list.len() > 50 {
                println!("    … and {} more", list.len() - 50);
            }
        }
    }
    Ok(Outcome::Done)
}

pub fn verify(config: &Config, a: VerifyArgs) -> CliResult {
    let store = open_store(config)?;
    let label = a.token.label(config)?;
    let work = Work::open(config, &label, &a.pins.user()?).map_err(|e| e.to_string())?;
    let others = other_tokens(config, &work);
    let seals = Seals::new(&work, &others);
    let trail = seals.trail(store.as_ref(), config);
    let users = logons(&trail, config, &a.logon.logon)?;
    let report = verify::verify(&trail, &work, &users, &a.file).map_err(|e| e.to_string())?;
    if a.json {
        println!(
            "{}",
            json!({"file": a.file, "ok": true, "mbk": report.fingerprint, "records": report.records,
                   "unwrapped": report.unwrapped, "groups": report.groups, "filter": report.filter, "time": report.time})
        );
    } else {
        println!("{}: OK", a.file.display());
        println!(
            "  made {} with filter {:?} under MBK {} (this token's)",
            report.time, report.filter, report.fingerprint
        );
        println!(
            "  {} records, every MAC and the trailer intact; {} secrets unwrap in token {label:?}",
            report.records, report.unwrapped
        );
        for (g, n) in &report.groups {
            println!("  group {g}: {n}");
        }
    }
    Ok(Outcome::Done)
}

pub fn db(config: &Config, command: DbCommand) -> CliResult {
    let store = open_store(config)?;
    match command {
        DbCommand::Backup { out, users: with_users, token, logon, pins } => {
            let work = Work::open(config, &token.label(config)?, &pins.user()?).map_err(|e| e.to_string())?;
            let others = other_tokens(config, &work);
            let seals = Seals::new(&work, &others);
            let trail = seals.trail(store.as_ref(), config);
            let who = logons(&trail, config, &logon.logon)?;
            let checked = db::allowed(config.mode, "backup")
                .map_err(|e| e.to_string())
                .and_then(|_| who.require(Need::KeyStore).map_err(|d| format!("export denied: {d}")))
                .and_then(|_| {
                    if with_users {
                        who.require(Need::UsersTable).map_err(|d| format!("export denied: {d}"))
                    } else {
                        Ok(())
                    }
                });
            if let Err(e) = checked {
                audit(&trail, &who.who(), "refused: db backup", "", 0, &e).map_err(|e| e.to_string())?;
                return Err(e);
            }
            let result = db::backup(store.as_ref(), &work.sealer(), &out, with_users).map_err(|e| e.to_string());
            let outcome = match &result {
                Ok(s) => format!("ok: {} keys, {} users", s.keys, s.users),
                Err(e) => format!("failed: {e}"),
            };
            let n = result.as_ref().map(|s| s.keys).unwrap_or(0);
            audit(&trail, &who.who(), "db backup", "", n, &outcome).map_err(|e| e.to_string())?;
            let s = result?;
            println!("Whole-store backup {} written: {} keys, {} users", out.display(), s.keys, s.users);
        }
        DbCommand::Restore { file, token, logon, pins } => {
            let work = Work::open(config, &token.label(config)?, &pins.user()?).map_err(|e| e.to_string())?;
            let others = other_tokens(config, &work);
            let seals = Seals::new(&work, &others);
            let trail = seals.trail(store.as_ref(), config);
            let who = logons(&trail, config, &logon.logon)?;
            let checked = db::allowed(config.mode, "restore")
                .map_err(|e| e.to_string())
                .and_then(|_| who.require(Need::KeyStore).map_err(|d| format!("import denied: {d}")));
            if let Err(e) = checked {
                audit(&trail, &who.who(), "refused: db restore", "", 0, &e).map_err(|e| e.to_string())?;
                return Err(e);
            }
            let users_denied = who.require(Need::UsersTable).err().map(|d| d.to_string());
            let result =
                db::restore(store.as_ref(), &work.sealer(), &file, users_denied.as_deref()).map_err(|e| e.to_string());
            let (action, outcome) = match &result {
                Ok(s) => ("db restore", format!("ok: {} keys, {} users", s.keys, s.users)),
                Err(e) if e.starts_with("import denied") => ("refused: db restore", e.clone()),
                Err(e) => ("db restore", format!("failed: {e}")),
            };
            let n = result.as_ref().map(|s| s.keys).unwrap_or(0);
            audit(&trail, &who.who(), action, "", n, &outcome).map_err(|e| e.to_string())?;
            let s = result?;
            println!("Whole-store backup {} restored: {} keys, {} users", file.display(), s.keys, s.users);
        }
    }
    Ok(Outcome::Done)
}
