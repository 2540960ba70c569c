//! PINs and passwords for the command: from a file, the environment, or a prompt on the terminal.

use super::exit::Failure;
use p11shim::admin::Pin;
use std::io::IsTerminal;
use std::path::PathBuf;
use zeroize::Zeroizing;

/// `--so-pin-file` / `--user-pin-file`, for commands that need the token's PINs.
#[derive(clap::Args)]
pub struct PinArgs {
    /// Read the SO PIN from this file (first line); else $P11SHIM_SO_PIN; else prompt.
    #[arg(long, value_name = "FILE")]
    pub so_pin_file: Option<PathBuf>,
    /// Read the user PIN from this file (first line); else $P11SHIM_USER_PIN; else prompt.
    #[arg(long, value_name = "FILE")]
    pub user_pin_file: Option<PathBuf>,
}

impl PinArgs {
    pub fn so(&self) -> Result<Pin, Failure> {
        secret("SO PIN", self.so_pin_file.clone(), "P11SHIM_SO_PIN", "--so-pin-file")
    }
    pub fn user(&self) -> Result<Pin, Failure> {
        secret("user PIN", self.user_pin_file.clone(), "P11SHIM_USER_PIN", "--user-pin-file")
    }
}

/// A secret from `file` (its first line), else the environment variable `env`, else a prompt on the
/// terminal; `what` names it in messages ("SO PIN", "password of user alice"), `flag` the option to give.
pub fn secret(what: &str, file: Option<PathBuf>, env: &str, flag: &str) -> Result<Pin, Failure> {
    if let Some(path) = file {
        let text = Zeroizing::new(
            std::fs::read(&path)
                .map_err(|e| Failure::usage(format!("cannot read the {what} file {}: {e}", path.display())))?,
        );
        let line = text.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return Err(Failure::usage(format!("the {what} file {} is empty", path.display())));
        }
        return Ok(Pin(Zeroizing::new(line.to_vec())));
    }
    if let Some(value) = std::env::var_os(env).filter(|v| !v.is_empty()) {
        return Ok(Pin(Zeroizing::new(value.into_encoded_bytes())));
    }
    if !std::io::stdin().is_terminal() {
        return Err(Failure::usage(format!("no {what}: give {flag} or set {env}")));
    }
    let typed = Zeroizing::new(
        rpassword::prompt_password(format!("{what}: ")).map_err(|e| format!("cannot read the {what}: {e}"))?,
    );
    Ok(Pin(Zeroizing::new(typed.as_bytes().to_vec())))
}
