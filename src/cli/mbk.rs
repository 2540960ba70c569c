//! `p11shim mbk …`: the master backup key set of a token.

use super::pins::PinArgs;
use super::{CliResult, Outcome};
use crate::admin;
use crate::config::Config;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum MbkCommand {
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

pub fn run(config: &Config, command: MbkCommand) -> CliResult {
    match command {
        MbkCommand::Create { token, pins } => {
            let (so, user) = (pins.so()?, pins.user()?);
            let set = admin::mbk_create(config, &token, &so, &user).map_err(|e| e.to_string())?;
            println!("Created the master backup key set on token {token:?}.");
            println!("  fingerprint:    {}", set.fingerprint);
            println!("  wrap mechanism: {}", admin::mechanism_name(set.wrap));
            println!("  user check:     the user can wrap, unwrap and MAC with it");
        }
        MbkCommand::Show { token } => {
            let set = admin::mbk_show(config, &token).map_err(|e| e.to_string())?;
            println!("token:          {token}");
            println!("fingerprint:    {}", set.fingerprint);
            println!("wrap mechanism: {}", admin::mechanism_name(set.wrap));
        }
    }
    Ok(Outcome::Done)
}
