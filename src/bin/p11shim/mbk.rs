//! `p11shim mbk …`: the master backup key set of a token.

use super::exit::{CliResult, Failure, Outcome};
use super::pins::PinArgs;
use super::progress::Progress;
use super::users::open_store;
use clap::Subcommand;
use p11shim::admin;
use p11shim::audit::Trail;
use p11shim::backup::clone;
use p11shim::backup::work::Work;
use p11shim::config::Config;
use std::path::PathBuf;

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
    /// Step 1 of cloning the MBK to this HSM (run on the TARGET): make an RSA-3072 transport key pair in the
    /// HSM and write its public key to REQUEST. Needs the SO PIN.
    CloneRequest {
        /// The token's label.
        #[arg(long, value_name = "LABEL")]
        token: String,
        /// Where to write the request (must not exist).
        #[arg(long, value_name = "REQUEST")]
        out: PathBuf,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Step 2 (run on the SOURCE): wrap this token's MBK set for the request's transport key (RSA-OAEP) and
    /// write the response. The MBK never appears in clear. Needs the SO PIN (it marks the transport key
    /// trusted for this one wrap).
    CloneTo {
        /// The request file from step 1.
        request: PathBuf,
        /// The token's label.
        #[arg(long, value_name = "LABEL")]
        token: String,
        /// Where to write the response for the target (must not exist).
        #[arg(long, value_name = "RESPONSE")]
        out: PathBuf,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Step 3 (run on the TARGET): unwrap the MBK set from the response, check its fingerprint, install it,
    /// and destroy the transport keys. Needs the SO PIN.
    CloneAccept {
        /// The response file from step 2.
        response: PathBuf,
        /// The token's label.
        #[arg(long, value_name = "LABEL")]
        token: String,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Disaster recovery: split the MBK set into N Shamir shares of which M rebuild it. THIS PUTS THE MBK ON
    /// THIS HOST (in memory, zeroized after use) and in the share files; a FIPS HSM refuses it. Needs the
    /// SO PIN.
    ExportShares {
        /// The token's label.
        #[arg(long, value_name = "LABEL")]
        token: String,
        /// M: how many shares rebuild the MBK.
        #[arg(long, value_name = "M")]
        threshold: u8,
        /// N: how many shares to write.
        #[arg(long, value_name = "N")]
        shares: u8,
        /// Directory for the share files mbk-share-I-of-N.txt (mode 0600; hand each to another custodian).
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Rebuild the MBK set from M share files and install it on a token that has none. Needs the SO PIN.
    ImportShares {
        /// The token's label.
        #[arg(long, value_name = "LABEL")]
        token: String,
        /// The share files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        pins: PinArgs,
    },
}

fn so_token(config: &Config, label: &str, pins: &PinArgs) -> Result<admin::Token, Failure> {
    let pin = pins.so()?;
    let mut token = admin::Token::open(config, label)?;
    token.login(cryptoki_sys::CKU_SO, &pin)?;
    Ok(token)
}

/// Prints the text lines, or nothing with --json (the command's JSON value is printed at its end).
struct Out {
    json: bool,
}

impl Out {
    fn line(&self, text: impl std::fmt::Display) {
        if !self.json {
            println!("{text}");
        }
    }
}

/// What a command did: the audit log's summary and the JSON value for --json.
fn execute(config: &Config, command: MbkCommand, out: &Out) -> Result<(String, serde_json::Value), Failure> {
    use serde_json::json;
    Ok(match command {
        MbkCommand::Create { token, pins } => {
            let (so, user) = (pins.so()?, pins.user()?);
            let working = Progress::working("creating the MBK set in the HSM", out.json);
            let set = admin::mbk_create(config, &token, &so, &user)?;
            drop(working);
            if set.is_device() {
                out.line(format!("Token {token:?}: the HSM keeps its own master backup key (device MBK), which p11shim uses; it made no MBK object."));
                out.line(format!("  fingerprint:    {}", set.fingerprint));
                out.line("  key store:      the seal key for this MBK is in the key store (as the device's blob)");
                out.line("  user check:     the user can back up and restore keys under it");
                return Ok((
                    format!("ok: device MBK {} in use", set.fingerprint),
                    json!({"token": token, "kind": "device", "fingerprint": set.fingerprint}),
                ));
            }
            out.line(format!("Created the master backup key set on token {token:?}."));
            out.line(format!("  fingerprint:    {}", set.fingerprint));
            out.line(format!("  wrap mechanism: {}", admin::mechanism_name(set.wrap)));
            out.line("  user check:     the user can wrap, unwrap and MAC with it");
            (
                format!("ok: MBK set {}", set.fingerprint),
                json!({"token": token, "fingerprint": set.fingerprint, "wrap": admin::mechanism_name(set.wrap)}),
            )
        }
        MbkCommand::Show { token } => {
            let set = admin::mbk_show(config, &token)?;
            if set.is_device() {
                out.line(format!("token:          {token}"));
                out.line("kind:           device (the HSM's own MBK is in use; p11shim has no MBK object)");
                out.line(format!("fingerprint:    {}", set.fingerprint));
                return Ok((String::new(), json!({"token": token, "kind": "device", "fingerprint": set.fingerprint})));
            }
            out.line(format!("token:          {token}"));
            out.line(format!("fingerprint:    {}", set.fingerprint));
            out.line(format!("wrap mechanism: {}", admin::mechanism_name(set.wrap)));
            if let Some(why) = &set.outdated {
                out.line(format!("OUTDATED:       {why}"));
            }
            (
                String::new(),
                json!({"token": token, "kind": "set", "fingerprint": set.fingerprint,
                       "wrap": admin::mechanism_name(set.wrap), "outdated": set.outdated}),
            )
        }
        MbkCommand::CloneRequest { token, out: file, pins } => {
            let t = so_token(config, &token, &pins)?;
            let working = Progress::working("making an RSA-3072 transport key pair in the HSM", out.json);
            let req = clone::request(&t)?;
            drop(working);
            clone::write_json(&file, &req)?;
            out.line(format!("Clone request {} written (transport key {}).", file.display(), req.request_id));
            out.line(format!(
                "Next, on the source HSM: p11shim mbk clone-to {} --token SOURCE --out RESPONSE",
                file.display()
            ));
            (
                format!("ok: transport key {} made, request {}", req.request_id, file.display()),
                json!({"token": token, "request": file, "transport_key": req.request_id}),
            )
        }
        MbkCommand::CloneTo { request, token, out: file, pins } => {
            let req: clone::CloneRequest = clone::read_json(&request)?;
            let t = so_token(config, &token, &pins)?;
            let working = Progress::working("wrapping the MBK set for the transport key", out.json);
            let resp = clone::respond(&t, &req)?;
            drop(working);
            clone::write_json(&file, &resp)?;
            out.line(format!("Clone response {} written for transport key {}.", file.display(), req.request_id));
            out.line(format!("  MBK fingerprint: {}", resp.fingerprint));
            out.line(format!(
                "Next, on the target HSM: p11shim mbk clone-accept {} --token {}",
                file.display(),
                req.token
            ));
            (
                format!(
                    "ok: MBK set {} wrapped for transport key {} of token {:?}",
                    resp.fingerprint, req.request_id, req.token
                ),
                json!({"token": token, "response": file, "fingerprint": resp.fingerprint,
                       "transport_key": req.request_id, "target_token": req.token}),
            )
        }
        MbkCommand::CloneAccept { response, token, pins } => {
            let resp: clone::CloneResponse = clone::read_json(&response)?;
            let t = so_token(config, &token, &pins)?;
            let working = Progress::working("unwrapping and installing the MBK set", out.json);
            let set = clone::accept(&t, &resp)?;
            drop(working);
            out.line(format!("The MBK set is installed on token {token:?}; transport keys destroyed."));
            out.line(format!("  fingerprint: {} (matches the source's)", set.fingerprint));
            (
                format!("ok: MBK set {} installed from {}", set.fingerprint, response.display()),
                json!({"token": token, "fingerprint": set.fingerprint}),
            )
        }
        MbkCommand::ExportShares { token, threshold, shares, out_dir, pins } => {
            let t = so_token(config, &token, &pins)?;
            let working = Progress::working("splitting the MBK set into shares", out.json);
            let files = clone::export_shares(&t, threshold, shares, &out_dir)?;
            drop(working);
            out.line(format!("{shares} shares written; any {threshold} rebuild the MBK set of token {token:?}:"));
            for f in &files {
                out.line(format!("  {}", f.display()));
            }
            out.line("The MBK was in this host's memory during the split (zeroized since): hand out the shares now.");
            (
                format!("ok: {shares} shares, any {threshold} rebuild the MBK set, written to {}", out_dir.display()),
                json!({"token": token, "threshold": threshold, "shares": files}),
            )
        }
        MbkCommand::ImportShares { token, files, pins } => {
            let t = so_token(config, &token, &pins)?;
            let working = Progress::working("rebuilding and installing the MBK set", out.json);
            let set = clone::import_shares(&t, &files)?;
            drop(working);
            out.line(format!("The MBK set is installed on token {token:?} from {} shares.", files.len()));
            out.line(format!("  fingerprint: {}", set.fingerprint));
            (
                format!("ok: MBK set {} installed from {} shares", set.fingerprint, files.len()),
                json!({"token": token, "fingerprint": set.fingerprint}),
            )
        }
    })
}

impl MbkCommand {
    /// The token the command works on, and its audit action (None for `show`, which changes nothing).
    fn audited(&self) -> (String, Option<&'static str>) {
        match self {
            MbkCommand::Create { token, .. } => (token.clone(), Some("mbk create")),
            MbkCommand::Show { token } => (token.clone(), None),
            MbkCommand::CloneRequest { token, .. } => (token.clone(), Some("mbk clone-request")),
            MbkCommand::CloneTo { token, .. } => (token.clone(), Some("mbk clone-to")),
            MbkCommand::CloneAccept { token, .. } => (token.clone(), Some("mbk clone-accept")),
            MbkCommand::ExportShares { token, .. } => (token.clone(), Some("mbk export-shares")),
            MbkCommand::ImportShares { token, .. } => (token.clone(), Some("mbk import-shares")),
        }
    }
}

pub fn run(config: &Config, command: MbkCommand, json: bool) -> CliResult {
    let (label, action) = command.audited();
    let result = execute(config, command, &Out { json });
    if json {
        if let Ok((_, value)) = &result {
            println!("{value}");
        }
    }
    let Some(action) = action else { return result.map(|_| Outcome::Done) };
    let outcome = match &result {
        Ok((summary, _)) => summary.clone(),
        Err(e) => format!("failed: {}", e.message),
    };
    // Sealed with the token's MBK set as it is now, else with that of another token of the config (a failed
    // create or a target awaiting its clone has none); with none at all the entry is unsealed, which the log
    // takes only while none of its entries is sealed.
    let recorded = open_store(config).and_then(|store| {
        let work = std::iter::once(label.as_str())
            .chain(config.slots.iter().map(|s| s.token.as_str()).filter(|t| *t != label))
            .find_map(|t| Work::open_public(config, t).ok());
        let sealer = work.as_ref().map(Work::sealer);
        let trail =
            Trail::new(store.as_ref(), sealer.as_ref().map(|s| s as &dyn p11shim::backup::format::Sealer), config);
        trail.record(&format!("SO of {label}"), action, "", 0, &outcome).map(drop).map_err(Failure::from)
    });
    match (result, recorded) {
        (Ok(_), Ok(())) => Ok(Outcome::Done),
        (Ok(_), Err(e)) => Ok(Outcome::Attention(format!("{action} done, but not audited: {}", e.message))),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(audit)) => {
            Err(Failure::new(e.exit, format!("{} (and not audited: {})", e.message, audit.message)))
        }
    }
}
