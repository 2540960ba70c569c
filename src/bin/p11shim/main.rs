//! `p11shim`: the operator's command: argument parsing (clap) and dispatch, calling the same library code
//! paths as the module. Each command group has its own file; every command calls library functions and
//! prints their result, as text or (--json) as one JSON document on stdout. The exit statuses are in
//! [`exit::Exit`].

mod audit;
mod backup;
mod docs;
mod exit;
mod keys;
mod mbk;
mod pins;
mod progress;
mod status;
mod users;

use clap::{Parser, Subcommand};
use exit::{Exit, Failure};
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
environment (P11SHIM_SO_PIN, P11SHIM_USER_PIN). PINs and passwords are never logged or echoed.\n\n\
Start with `p11shim status`: it shows the backend, every slot, the key store and the audit log, and what needs \
an operator, with the command that fixes it.",
    after_long_help = format!("Exit status (the same for every command):\n{}", Exit::table())
)]
struct Cli {
    /// The p11shim.toml to use (default: $P11SHIM_CONFIG, else /etc/p11shim/p11shim.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the result as one JSON document on stdout (for scripts); a failure prints {"error": {"exit",
    /// "kind", "message"}} there. Progress is never printed then.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The state of the whole installation at a glance: backend, mode, every slot (token present, MBK set),
    /// key store (reachable, schema, keys per token and group, users), audit log, pending restores, and each
    /// problem with the command that fixes it. Exit status 3 when something needs an operator, 7 when the
    /// store or the HSM cannot be reached. No PIN, no logon.
    Status(status::StatusArgs),
    /// Stored keys: list them by token, group and label; move a key to another group (authorized like a
    /// backup of both groups, audited).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
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
    GenerateDocs {
        /// The directory to write man/ and completions/ into.
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    // Die quietly when the reader of our output goes away (`p11shim audit show | head`), as Unix tools do,
    // rather than panic on a broken pipe. Every change a command makes is committed before it prints.
    // SAFETY: setting a signal's disposition to the default, before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            // --help and --version print on stdout and succeed; every other parse error is a usage error.
            return ExitCode::from(if usage { Exit::Usage.code() } else { Exit::Ok.code() });
        }
    };
    if let Command::GenerateDocs { dir } = &cli.command {
        return match docs::generate(<Cli as clap::CommandFactory>::command(), dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("p11shim: {}: {e}", dir.display());
                ExitCode::from(Exit::Failed.code())
            }
        };
    }
    let json = cli.json;
    let result = config(cli.config).and_then(|config| match cli.command {
        Command::Status(a) => status::run(&config, a, json),
        Command::Keys(c) => keys::run(&config, c, json),
        Command::Mbk(c) => mbk::run(&config, c, json),
        Command::Backup(a) => backup::backup(&config, a, json),
        Command::Restore(a) => backup::restore(&config, a, json),
        Command::Verify(a) => backup::verify(&config, a, json),
        Command::Db(c) => backup::db(&config, c, json),
        Command::User(c) => users::run(&config, c, json),
        Command::Audit(c) => audit::run(&config, c, json),
        Command::GenerateDocs { .. } => unreachable!("handled before the configuration is read"),
    });
    exit::finish(result, json)
}

fn config(path: Option<PathBuf>) -> Result<Config, Failure> {
    if let Some(p) = path {
        std::env::set_var(ENV_CONFIG, p);
    }
    let config = Config::from_env()?;
    // What the library logs while a command runs (a rolled-back restore, an audit head file that could not be
    // written) goes to the module's log too, when it exists: a command run as root never creates it, so the
    // application's user keeps owning it.
    if let Some(file) = config.log_file.as_deref().filter(|f| f.exists()) {
        let _ = p11shim::log::configure(Some(file), config.log_level);
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every command, option and argument says what it is for: `--help` has no empty line.
    #[test]
    fn every_command_and_option_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() && !cmd.is_hide_set() && path != " p11shim help" && !path.ends_with(" help") {
                missing.push(format!("{path}: no about"));
            }
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && !arg.is_hide_set() && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path}: {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "without help:\n{}", missing.join("\n"));
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
