//! cssim-admin: the administrator's tool of a simulated CryptoServer (cssim), as `csadm` is a real one's. It
//! manages the device's master backup key (MBK); every command calls [`cssim::admin`].

use clap::{Parser, Subcommand};
use cssim::admin::{Device, Imported};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cssim-admin",
    version,
    about = "Administers a simulated CryptoServer (cssim): the device's master backup key (MBK)",
    long_about = "Administers a simulated CryptoServer (cssim), the device of a cssim.toml configuration: its \
                  master backup key (MBK), which the vendor interface \"CSSIM MBK\" of libcssim.so backs keys up \
                  under. Changes are written to the device's state file with the module's lock and crash-safe \
                  write; running applications see them at their next call.\n\nExit status: 0 success, 1 refused \
                  or failed (nothing changed), 2 usage error."
)]
struct Cli {
    /// The simulator's configuration file (default: $CSSIM_CONFIG).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The device's master backup key: generate, import from shares, show.
    #[command(subcommand)]
    Mbk(Mbk),
}

#[derive(Subcommand)]
enum Mbk {
    /// Generates an MBK inside the device, writes it as N share files of which M rebuild it, and loads it
    /// (as csadm MBKGenerate).
    #[command(long_about = "Generates an AES-256 MBK inside the device, splits it M-of-N (Shamir over GF(256)), \
                            writes DIR/mbk-share-<i>-of-<N>.txt (mode 0600, never over an existing file; DIR is \
                            created with mode 0700 if missing) and loads it. Refused when the device holds an MBK, \
                            unless --replace. Prints the fingerprint. 1 <= M <= N <= 255, and M >= 2 unless N = 1.")]
    Generate {
        /// N: how many shares to write.
        #[arg(long, value_name = "N")]
        shares: u32,
        /// M: how many shares rebuild the MBK.
        #[arg(long, value_name = "M")]
        threshold: u32,
        /// The directory the share files go to.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace the MBK the device holds (keys backed up under it then restore only where it is loaded).
        #[arg(long)]
        replace: bool,
    },
    /// Loads the MBK from at least M of its share files (as csadm MBKImport).
    #[command(long_about = "Loads the MBK rebuilt from at least M of its share files. Refused, changing nothing: \
                            too few shares, shares of different MBKs or splits, a damaged share, a share given \
                            twice, a device holding another MBK (unless --replace). Loading the MBK the device \
                            holds already changes nothing and succeeds. Prints the fingerprint.")]
    Import {
        /// Share files written by `mbk generate`.
        #[arg(required = true, value_name = "SHARE")]
        shares: Vec<PathBuf>,
        /// Replace another MBK the device holds.
        #[arg(long)]
        replace: bool,
    },
    /// Shows the fingerprint of the device's MBK (`fingerprint: …` or `no MBK`).
    Show {
        /// Print {"device_mbk":true,"loaded":…,"fingerprint":…|null}.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("cssim-admin: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let config = match cli.config.or_else(|| std::env::var_os(cssim::config::CONFIG_ENV).map(PathBuf::from)) {
        Some(c) => c,
        None => return Err(format!("no device: give --config PATH or set {}", cssim::config::CONFIG_ENV)),
    };
    let mut device = Device::open(&config).map_err(|e| e.to_string())?;
    let Command::Mbk(command) = cli.command;
    match command {
        Mbk::Generate { shares, threshold, out, replace } => {
            let g = device.generate(shares, threshold, &out, replace).map_err(|e| e.to_string())?;
            match g.replaced {
                Some(old) => println!("generated an MBK inside the device and loaded it, replacing {old}"),
                None => println!("generated an MBK inside the device and loaded it"),
            }
            println!("{threshold} of these {shares} shares rebuild it:");
            for f in &g.files {
                println!("  {}", f.display());
            }
            println!("fingerprint: {}", g.fingerprint);
        }
        Mbk::Import { shares, replace } => match device.import(&shares, replace).map_err(|e| e.to_string())? {
            Imported::Loaded { fingerprint, replaced } => {
                match replaced {
                    Some(old) => println!("loaded the MBK from {} shares, replacing {old}", shares.len()),
                    None => println!("loaded the MBK from {} shares", shares.len()),
                }
                println!("fingerprint: {fingerprint}");
            }
            Imported::AlreadyLoaded(fingerprint) => {
                println!("the device holds this MBK already: nothing changed");
                println!("fingerprint: {fingerprint}");
            }
        },
        Mbk::Show { json } => {
            if json && !device.has_mbk_facility() {
                // The document says why before the refusal below.
                println!("{}", show_json(false, None));
            }
            let fingerprint = device.fingerprint().map_err(|e| e.to_string())?;
            if json {
                println!("{}", show_json(true, fingerprint.map(|f| f.to_string())));
            } else {
                match fingerprint {
                    Some(f) => println!("fingerprint: {f}"),
                    None => println!("no MBK"),
                }
            }
        }
    }
    Ok(())
}

/// `{"device_mbk":…,"loaded":…,"fingerprint":…|null}`, fields in this order.
fn show_json(device_mbk: bool, fingerprint: Option<String>) -> String {
    format!(
        "{{\"device_mbk\":{device_mbk},\"loaded\":{},\"fingerprint\":{}}}",
        fingerprint.is_some(),
        serde_json::Value::from(fingerprint)
    )
}
