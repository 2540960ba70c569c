//! The `p11shim` command: argument parsing (clap) and dispatch. Each command group has its own file; every
//! command calls library functions and prints their result. Exit status: 0 success, 1 failure, 2 usage
//! error (clap), 3 partial success that needs attention (e.g. keys that could not be backed up).

mod mbk;
pub mod pins;

use crate::config::{Config, ENV_CONFIG};
use clap::{Parser, Subcommand};
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
    /// The master backup key set of a token.
    #[command(subcommand)]
    Mbk(mbk::MbkCommand),
}

/// What a command ends with: success, failure (message), or success that needs attention (status 3).
pub enum Outcome {
    Done,
    Attention(String),
}

pub type CliResult = Result<Outcome, String>;

/// Runs the command line of this process.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = config(cli.config).and_then(|config| match cli.command {
        Command::Mbk(c) => mbk::run(&config, c),
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
