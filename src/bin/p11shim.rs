//! `p11shim`: the operator's command. Thin: every command calls library functions (p11shim::admin).

use clap::{Parser, Subcommand};
use p11shim::admin::{self, Pin};
use p11shim::config::{Config, ENV_CONFIG};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(
    name = "p11shim",
    version,
    about = "Administer p11shim: the master backup key (MBK) of a token, and the key store",
    long_about = "Administer p11shim, the PKCS#11 module that forwards to your HSM's module and keeps keys of \
database slots in an RDBMS, wrapped under the HSM's master backup key (MBK).\n\n\
The configuration is the module's own (p11shim.toml): --config, or $P11SHIM_CONFIG, or /etc/p11shim/p11shim.toml.\n\
PINs are prompted on a terminal; for scripts give them in a file (--so-pin-file, --user-pin-file) or in the \
environment (P11SHIM_SO_PIN, P11SHIM_USER_PIN). PINs are never logged or echoed."
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
    Mbk(MbkCommand),
}

#[derive(Subcommand)]
enum MbkCommand {
    /// Create the MBK set inside the HSM: an AES-256 key that can only wrap and unwrap (trusted, extractable
    /// only under a trusted key) and an HMAC key for record MACs. Needs the SO PIN (to create them) and the
    /// user PIN (to check the user can use them). Refuses if the token already has one.
    Create {
        /// The token's label.
        #[arg(long, value_name = "LABEL")]
        token: String,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Print the fingerprint of a token's MBK set: it identifies the set without revealing anything about
    /// it; two HSMs holding the same set show the same fingerprint. No PIN needed.
    Show {
        /// The token's label.
        #[arg(long, value_name = "LABEL")]
        token: String,
    },
}

#[derive(clap::Args)]
struct PinArgs {
    /// Read the SO PIN from this file (first line); else $P11SHIM_SO_PIN; else prompt.
    #[arg(long, value_name = "FILE")]
    so_pin_file: Option<PathBuf>,
    /// Read the user PIN from this file (first line); else $P11SHIM_USER_PIN; else prompt.
    #[arg(long, value_name = "FILE")]
    user_pin_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
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

fn run(cli: Cli) -> Result<(), String> {
    let config = config(cli.config)?;
    match cli.command {
        Command::Mbk(MbkCommand::Create { token, pins }) => {
            let so = pin("SO", pins.so_pin_file, "P11SHIM_SO_PIN")?;
            let user = pin("user", pins.user_pin_file, "P11SHIM_USER_PIN")?;
            let set = admin::mbk_create(&config, &token, &so, &user).map_err(|e| e.to_string())?;
            println!("Created the master backup key set on token {token:?}.");
            println!("  fingerprint:    {}", set.fingerprint);
            println!("  wrap mechanism: {}", admin::mechanism_name(set.wrap));
            println!("  user check:     the user can wrap, unwrap and MAC with it");
            Ok(())
        }
        Command::Mbk(MbkCommand::Show { token }) => {
            let set = admin::mbk_show(&config, &token).map_err(|e| e.to_string())?;
            println!("token:          {token}");
            println!("fingerprint:    {}", set.fingerprint);
            println!("wrap mechanism: {}", admin::mechanism_name(set.wrap));
            Ok(())
        }
    }
}

/// A PIN from a file, the environment, or a prompt on the terminal, in that order.
fn pin(who: &str, file: Option<PathBuf>, env: &str) -> Result<Pin, String> {
    if let Some(path) = file {
        let text = Zeroizing::new(
            std::fs::read(&path).map_err(|e| format!("cannot read the {who} PIN file {}: {e}", path.display()))?,
        );
        let line = text.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return Err(format!("the {who} PIN file {} is empty", path.display()));
        }
        return Ok(Pin(Zeroizing::new(line.to_vec())));
    }
    if let Some(value) = std::env::var_os(env).filter(|v| !v.is_empty()) {
        return Ok(Pin(Zeroizing::new(value.into_encoded_bytes())));
    }
    if !std::io::stdin().is_terminal() {
        return Err(format!("no {who} PIN: give --{}-pin-file or set {env}", who.to_lowercase()));
    }
    let typed = Zeroizing::new(
        rpassword::prompt_password(format!("{who} PIN: ")).map_err(|e| format!("cannot read the {who} PIN: {e}"))?,
    );
    Ok(Pin(Zeroizing::new(typed.as_bytes().to_vec())))
}
