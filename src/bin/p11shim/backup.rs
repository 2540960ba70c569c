//! `p11shim backup`, `restore`, `verify` (per group, under the MBK) and `db backup` / `db restore` (the whole
//! store, standard mode only).

use super::exit::Exit;
use super::exit::{CliResult, Failure, Outcome};
use super::pins::PinArgs;
use super::progress::Progress;
use super::users::{logons, open_store, other_tokens, LogonArgs, Seals};
use clap::{Args, Subcommand};
use p11shim::auth::Need;
use p11shim::backup::export::{self, ExportOptions};
use p11shim::backup::import::{self, ImportOptions, Pass};
use p11shim::backup::work::{audit, Work};
use p11shim::backup::{db, verify};
use p11shim::config::{Config, Storage};
use p11shim::error::ErrorKind;
use serde_json::json;
use std::cell::RefCell;
use std::path::PathBuf;

#[derive(Args)]
pub struct TokenArg {
    /// The token to work with (default: the first `storage = "database"` slot of the config).
    #[arg(long, value_name = "LABEL")]
    pub token: Option<String>,
}

impl TokenArg {
    pub fn label(&self, config: &Config) -> Result<String, Failure> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        config.slots.iter().find(|s| s.storage == Storage::Database).map(|s| s.token.clone()).ok_or_else(|| {
            Failure::usage(format!(
                "no --token given and {} has no [[slot]] with storage = \"database\"",
                config.source.display()
            ))
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
    /// Write the file even when the regex matches no key (a backup with no key, exit status 0). Without it,
    /// a backup that matches nothing writes no file (an existing FILE stays) and exits with status 4.
    #[arg(long)]
    pub allow_empty: bool,
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
        /// The file to write; refused if anything exists there. It appears under this name only when complete.
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
        /// The whole-store backup file (written by `p11shim db backup`).
        file: PathBuf,
        #[command(flatten)]
        token: TokenArg,
        #[command(flatten)]
        logon: LogonArgs,
        #[command(flatten)]
        pins: PinArgs,
    },
}

/// The token, the key store and the sealers a backup command works with; users logged on from `--logon`.
struct Session {
    work: Work,
    others: Vec<Work>,
}

impl Session {
    fn open(config: &Config, token: &TokenArg, pins: Option<&PinArgs>) -> Result<Session, Failure> {
        let label = token.label(config)?;
        let work = match pins {
            Some(pins) => Work::open(config, &label, &pins.user()?)?,
            None => Work::open_public(config, &label)?,
        };
        let others = other_tokens(config, &work);
        Ok(Session { work, others })
    }
}

pub fn backup(config: &Config, a: BackupArgs, json: bool) -> CliResult {
    p11shim::backup::work::group_filter(&a.group).map_err(|e| Failure::usage(format!("--group: {e}")))?;
    let store = open_store(config)?;
    let s = Session::open(config, &a.token, (!a.stored_only).then_some(&a.pins))?;
    let seals = Seals::new(&s.work, &s.others);
    let trail = seals.trail(store.as_ref(), config);
    let users = logons(&trail, config, &a.logon.logon)?;
    let mut bar = Progress::new("keys exported", None, json);
    let mut progress = |n: u64| bar.update(n);
    let opts = ExportOptions {
        filter: &a.group,
        out: &a.out,
        replace: a.replace,
        stored_only: a.stored_only,
        allow_empty: a.allow_empty,
    };
    let report = match export::export(&trail, &s.work, &users, &opts, &mut progress) {
        Ok(report) => report,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let groups = known_groups(store.as_ref(), &s.work);
            return Err(nothing_matched(&a.group, &groups, e));
        }
        Err(e) => return Err(e.into()),
    };
    bar.finish();
    for leftover in &report.leftovers {
        eprintln!("p11shim: warning: {leftover}");
    }
    let label = &s.work.token.label;
    if json {
        let skipped: Vec<_> = report.skipped.iter().map(|s| json!({"key": s.key, "why": s.why})).collect();
        let leftovers: Vec<String> = report.leftovers.iter().map(|l| l.to_string()).collect();
        println!(
            "{}",
            json!({"file": report.path, "token": label, "mbk": report.fingerprint, "exported": report.exported,
                   "stored": report.stored, "hsm": report.hsm, "groups": report.groups, "not_exported": skipped,
                   "leftovers": leftovers})
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

/// Every group the key store and the token hold, for "did you mean" hints.
fn known_groups(store: &dyn p11shim::store::KeyStore, work: &Work) -> Vec<String> {
    let mut groups: Vec<String> = store.key_counts().unwrap_or_default().into_iter().map(|(_, g, _)| g).collect();
    groups.push(work.slot_group.clone());
    groups.sort();
    groups.dedup();
    groups
}

/// A backup whose group regex matched no key: exit status 4, naming the regex and the nearest groups.
fn nothing_matched(regex: &str, groups: &[String], e: p11shim::backup::error::BackupError) -> Failure {
    let near = p11shim::admin::nearest(regex, groups.iter().map(String::as_str));
    let matched: Vec<&String> = match p11shim::backup::work::group_filter(regex) {
        Ok(re) => groups.iter().filter(|g| re.is_match(g)).collect(),
        Err(_) => Vec::new(),
    };
    let hint = if !matched.is_empty() {
        format!(
            "the groups it matches hold no key: {} (--allow-empty writes an empty backup)",
            quoted(matched.into_iter())
        )
    } else if near.is_empty() {
        format!(
            "groups present: {}",
            if groups.is_empty() { "none".to_string() } else { quoted(groups.iter().take(20)) }
        )
    } else {
        format!("did you mean {}? (the regex must match whole group names: 'Pay.*')", quoted(near.iter()))
    };
    Failure::new(Exit::NothingMatched, format!("{e}; {hint}"))
}

fn quoted<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|g| format!("'{g}'")).collect::<Vec<_>>().join(", ")
}

pub fn restore(config: &Config, a: RestoreArgs, json: bool) -> CliResult {
    let store = open_store(config)?;
    let s = Session::open(config, &a.token, Some(&a.pins))?;
    let seals = Seals::new(&s.work, &s.others);
    let trail = seals.trail(store.as_ref(), config);
    let users = logons(&trail, config, &a.logon.logon)?;
    let bar = RefCell::new(Progress::new("records checked", None, json));
    let progress = |pass: Pass, n: u64| {
        let mut bar = bar.borrow_mut();
        if pass == Pass::Restore && n == 1 {
            *bar = Progress::new(if a.dry_run { "records planned" } else { "records restored" }, None, json);
        }
        bar.update(n);
    };
    let opts = ImportOptions {
        file: &a.file,
        overwrite: a.overwrite,
        dry_run: a.dry_run,
        mode: config.mode,
        progress: &progress,
    };
    let report = import::import(&trail, &s.work, &users, &opts)?;
    bar.borrow_mut().finish();
    if let Some(recovered) = &report.recovered {
        eprintln!("p11shim: first {recovered}");
    }
    let label = &s.work.token.label;
    let verb = if a.dry_run { "would be" } else { "were" };
    if json {
        println!(
            "{}",
            json!({"file": a.file, "token": label, "mbk": report.fingerprint, "dry_run": a.dry_run,
                   "records": report.records, "added": report.added.items, "skipped": report.skipped.items,
                   "overwritten": report.overwritten.items, "added_count": report.added.count,
                   "skipped_count": report.skipped.count, "overwritten_count": report.overwritten.count,
                   "items_kept_per_list": import::NAMES_KEPT, "recovered": report.recovered})
        );
    } else {
        println!("{} records in {} (MBK {})", report.records, a.file.display(), report.fingerprint);
        for (what, list) in
            [("added", &report.added), ("skipped (present)", &report.skipped), ("overwritten", &report.overwritten)]
        {
            println!("  {} {verb} {what}", list.len());
            for k in list.items.iter().take(50) {
                println!("    {k}");
            }
            if list.len() > 50 {
                println!("    … and {} more", list.len() - 50);
            }
        }
    }
    Ok(Outcome::Done)
}

pub fn verify(config: &Config, a: VerifyArgs, json: bool) -> CliResult {
    let store = open_store(config)?;
    let s = Session::open(config, &a.token, Some(&a.pins))?;
    let seals = Seals::new(&s.work, &s.others);
    let trail = seals.trail(store.as_ref(), config);
    let users = logons(&trail, config, &a.logon.logon)?;
    let bar = RefCell::new(Progress::new("records verified", None, json));
    let report = verify::verify(&trail, &s.work, &users, &a.file, &|n| bar.borrow_mut().update(n))?;
    bar.borrow_mut().finish();
    let label = &s.work.token.label;
    if json {
        println!(
            "{}",
            json!({"file": a.file, "ok": true, "token": label, "mbk": report.fingerprint, "records": report.records,
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

/// A refusal of a whole-store command: audited, then the failure with exit status 5.
fn refused(trail: &p11shim::audit::Trail, who: &str, action: &str, why: String) -> CliResult {
    audit(trail, who, &format!("refused: {action}"), "", 0, &why)?;
    Err(Failure::denied(why))
}

/// What both whole-store commands do first: open the token, log the users on, check the mode and 02000000
/// (each refusal audited); then `f` with the audit trail, the users and the token.
fn whole_store(
    config: &Config,
    store: &dyn p11shim::store::KeyStore,
    (token, logon, pins): (&TokenArg, &LogonArgs, &PinArgs),
    what: &str,
    f: impl FnOnce(&p11shim::audit::Trail, &p11shim::auth::Logons, &Work) -> CliResult,
) -> CliResult {
    let s = Session::open(config, token, Some(pins))?;
    let seals = Seals::new(&s.work, &s.others);
    let trail = seals.trail(store, config);
    let who = logons(&trail, config, &logon.logon)?;
    let action = format!("db {what}");
    if let Err(e) = db::allowed(config.mode, what) {
        audit(&trail, &who.who(), &format!("refused: {action}"), "", 0, &e.to_string())?;
        return Err(e.into());
    }
    let direction = if what == "backup" { "export" } else { "import" };
    if let Err(d) = who.require(Need::KeyStore) {
        return refused(&trail, &who.who(), &action, format!("{direction} denied: {d}"));
    }
    f(&trail, &who, &s.work)
}

/// The end of a whole-store command: its summary, as text or JSON.
fn print_db(json: bool, done: &str, file: &std::path::Path, store: &str, summary: &db::DbSummary) {
    if json {
        println!("{}", json!({"file": file, "store": store, "keys": summary.keys, "users": summary.users}));
    } else {
        println!("Whole-store backup {} {done}: {} keys, {} users", file.display(), summary.keys, summary.users);
    }
}

pub fn db(config: &Config, command: DbCommand, json: bool) -> CliResult {
    let store = open_store(config)?;
    match command {
        DbCommand::Backup { out, users: with_users, token, logon, pins } => {
            whole_store(config, store.as_ref(), (&token, &logon, &pins), "backup", |trail, who, work| {
                if with_users {
                    if let Err(d) = who.require(Need::UsersTable) {
                        return refused(trail, &who.who(), "db backup", format!("export denied: {d}"));
                    }
                }
                p11shim::files::check_output_target(&out, false)
                    .map_err(|e| Failure::from(format!("{}: {e}", out.display())))?;
                let bar = RefCell::new(Progress::new("keys written", None, json));
                let progress = |n| bar.borrow_mut().update(n);
                let result = db::backup(store.as_ref(), &work.sealer(), &out, with_users, &progress);
                bar.borrow_mut().finish();
                if let Ok(summary) = &result {
                    for leftover in &summary.leftovers {
                        eprintln!("p11shim: warning: {leftover}");
                    }
                }
                let outcome = match &result {
                    Ok(s) => format!("ok: {} keys, {} users", s.keys, s.users),
                    Err(e) => format!("failed: {e}"),
                };
                let n = result.as_ref().map(|s| s.keys).unwrap_or(0);
                audit(trail, &who.who(), "db backup", "", n, &outcome)?;
                print_db(json, "written", &out, &store.describe(), &result?);
                Ok(Outcome::Done)
            })
        }
        DbCommand::Restore { file, token, logon, pins } => {
            whole_store(config, store.as_ref(), (&token, &logon, &pins), "restore", |trail, who, work| {
                let users_denied = who.require(Need::UsersTable).err().map(|d| d.to_string());
                let bar = RefCell::new(Progress::new("lines read", None, json));
                let progress = |n| bar.borrow_mut().update(n);
                // A device MBK's rows were sealed with the seal key of the store the file came from.
                let theirs = match work.set.is_device() {
                    true => db::seal_keys_of(&file)?
                        .into_iter()
                        .find(|(mbk, _)| *mbk == work.set.fingerprint)
                        .map(|(_, blob)| p11shim::backup::mbk::device_seal_of(&work.set, blob)),
                    false => None,
                };
                let file_sealer = theirs.as_ref().map(|set| p11shim::backup::mbk::HsmSealer {
                    backend: work.token.backend,
                    session: work.token.session,
                    set,
                });
                let file_sealer = file_sealer.as_ref().map(|s| s as &dyn p11shim::backup::format::Sealer);
                let result =
                    db::restore(store.as_ref(), &work.sealer(), file_sealer, &file, users_denied.as_deref(), &progress);
                bar.borrow_mut().finish();
                let (action, outcome) = match &result {
                    Ok(s) => ("db restore", format!("ok: {} keys, {} users", s.keys, s.users)),
                    Err(e) if e.kind() == ErrorKind::Denied => ("refused: db restore", e.to_string()),
                    Err(e) => ("db restore", format!("failed: {e}")),
                };
                let n = result.as_ref().map(|s| s.keys).unwrap_or(0);
                audit(trail, &who.who(), action, "", n, &outcome)?;
                print_db(json, "restored", &file, &store.describe(), &result?);
                Ok(Outcome::Done)
            })
        }
    }
}
