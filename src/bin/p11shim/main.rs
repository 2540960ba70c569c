//! `p11shim`: the operator's command: argument parsing (clap) and dispatch, calling the same library code
//! paths as the module. Each command group has its own file; every
//! command calls library functions and prints their result. Exit status: 0 success, 1 failure, 2 usage
//! error (clap), 3 success that needs attention (e.g. keys that could not be backed up, a change that could
//! not be audited).

mod audit;
mod backup;
mod docs;
mod mbk;
mod pins;
mod users;

use clap::{Parser, Subcommand};
use p11shim::config::{Config, ENV_CONFIG};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "p11shim",
    version,
    about = "Administer p11shim: the master backup key (MBK) of a token, the key store, users, backups, audit",
    long_about = "Administer p11shim, the PKCS#11 module that forwards to your HSM's module and keeps keys of \
database slots in an RDBMS, wrapped under the HSM's master backup key (MBK).\n\n\
The configuration is the module's own (p11shim.toml): --config, or $P11SHIM_CONFIG, or /etc/p11shim/p11shim.toml.\n\
PINs are prompted on a terminal; for scripts give them in a file (--so-pin-file, --user-pin-file) or in the \
environment (P11SHIM_SO_PIN, P11SHIM_USER_PIN). PINs and passwords are never logged or echoed."
)]
struct Cli {
    /// The p11shim.toml to use (default: $P11SHIM_CONFIG, else /etc/p11shim/p11shim.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The master backup key set of a token. PINs: the SO PIN for every change (create also the user PIN);
    /// none for show.
    #[command(subcommand)]
    Mbk(mbk::MbkCommand),
    /// Back up every key whose group matches REGEX into one file, each secret wrapped under the MBK (stored
    /// keys and the token's own keys). Needs 00000002 from logged-on users (--logon) whose group regex
    /// matches each group, and the token's user PIN (its own keys are wrapped in the HSM under the user's
    /// login); with --stored-only no PIN (stored keys are wrapped already). Keys that cannot be exported are
    /// listed and the exit status is 3.
    Backup(backup::BackupArgs),
    /// Restore a backup file into a token, line by line (merge): all or nothing; keys present are skipped
    /// unless --overwrite. A wrong MBK, a bad MAC, a truncated file or an unknown version modify nothing.
    /// Needs 00000002 for each group in the file (--logon) and the user PIN (every secret is unwrapped in
    /// the HSM).
    Restore(backup::RestoreArgs),
    /// Check a backup completely without changing anything: format, every MAC, the MBK, and that every
    /// secret unwraps in this HSM. Needs 00000002 for each group in the file (--logon) and the user PIN.
    Verify(backup::VerifyArgs),
    /// The whole key store at once (the BackupDatabase analog): standard mode only. Needs 02000000 (and
    /// 12000000 for the users table) and the user PIN.
    #[command(subcommand)]
    Db(backup::DbCommand),
    /// Users of the permission model (masks, group regexes, password or signature logon; sealed by the HSM;
    /// failed logons throttled). No PIN, but the SO PIN for the first user.
    #[command(subcommand)]
    User(users::UserCommand),
    /// The audit log, chained and sealed by the HSM: show it, verify it. No PIN, no logon.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Write the man pages and shell completions into DIR (man/, completions/), for packaging.
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
}

/// What a command ends with: success, failure (message), or success that needs attention (status 3).
pub enum Outcome {
    Done,
    Attention(String),
}

pub type CliResult = Result<Outcome, String>;

fn main() -> ExitCode {
    // Die quietly when the reader of our output goes away (`p11shim audit show | head`), as Unix tools do,
    // rather than panic on a broken pipe. Every change a command makes is committed before it prints.
    // SAFETY: setting a signal's disposition to the default, before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    if let Command::GenerateDocs { dir } = &cli.command {
        return match docs::generate(<Cli as clap::CommandFactory>::command(), dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("p11shim: {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    let result = config(cli.config).and_then(|config| match cli.command {
        Command::Mbk(c) => mbk::run(&config, c),
        Command::Backup(a) => backup::backup(&config, a),
        Command::Restore(a) => backup::restore(&config, a),
        Command::Verify(a) => backup::verify(&config, a),
        Command::Db(c) => backup::db(&config, c),
        Command::User(c) => users::run(&config, c),
        Command::Audit(c) => audit::run(&config, c),
        Command::GenerateDocs { .. } => unreachable!("handled before the configuration is read"),
    });
    match result {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Attention(message)) => {
            eprintln!("p11shim: {message}");
            ExitCode::from(3)
        }
        Err(message) => {
            eprintln!("p11shim: {message}");
            ExitCode::FAILURE
        }
    }
}

fn config(path: Option<PathBuf>) -> Result<Config, String> {
    if let Some(p) = path {
        std::env::set_var(ENV_CONFIG, p);
    }
    Config::from_env().map_err(|e| e.to_string())
}
