//! The administrator's operations on a simulated device, behind the `cssim-admin` tool: loading the master
//! backup key (MBK) from m-of-n shares (`csadm MBKImport`), generating one inside and writing its shares
//! (`csadm MBKGenerate`), showing its fingerprint.
//!
//! They change the state file as the module does (the same lock and crash-safe write); a module running in
//! another process sees the new MBK at its next call that reads the state. Every refusal changes nothing.
//! Secrets (the MBK, share data) are zeroized after use and never printed or logged.

pub use crate::mbk::Fingerprint;

use crate::config::Config;
use crate::log::Log;
use crate::mbk::share::Share;
use crate::mbk::{shamir, Mbk};
use crate::object::Bytes;
use crate::store::Store;
use cryptoki_sys::CK_RV;
use rand::RngCore;
use std::fmt;
use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why an operation was refused or failed, in words for the administrator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminError(pub String);

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AdminError {}

impl From<CK_RV> for AdminError {
    fn from(rv: CK_RV) -> AdminError {
        AdminError(format!("the device state file could not be locked, read or written (CK_RV {rv:#x})"))
    }
}

fn refused(message: impl Into<String>) -> AdminError {
    AdminError(message.into())
}

/// What `generate` did.
#[derive(Debug)]
pub struct Generated {
    pub fingerprint: Fingerprint,
    /// The share files, share 1 first.
    pub files: Vec<PathBuf>,
    /// The MBK it replaced (with `replace`).
    pub replaced: Option<Fingerprint>,
}

/// What `import` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Imported {
    /// The MBK is loaded now (`replaced`: the one it replaced).
    Loaded { fingerprint: Fingerprint, replaced: Option<Fingerprint> },
    /// The device already held this MBK: nothing changed.
    AlreadyLoaded(Fingerprint),
}

/// One device: its configuration and its state file.
pub struct Device {
    config_path: PathBuf,
    config: Config,
    store: Store,
    log: Log,
}

/// The name of share `index` of `shares`.
pub fn share_file_name(index: u8, shares: u8) -> String {
    format!("mbk-share-{index}-of-{shares}.txt")
}

impl Device {
    /// The device of the configuration file at `config_path`.
    pub fn open(config_path: &Path) -> Result<Device, AdminError> {
        let config = Config::load(config_path, None).map_err(AdminError)?;
        let log = Log::open(config.log_file.as_deref()).map_err(|e| {
            AdminError(format!("log file {}: {e}", config.log_file.as_deref().unwrap_or(Path::new("")).display()))
        })?;
        let store = Store::open(&config.state, None).map_err(AdminError)?;
        Ok(Device { config_path: config_path.to_path_buf(), config, store, log })
    }

    /// Whether the device has an MBK facility (`device_mbk` in the configuration).
    pub fn has_mbk_facility(&self) -> bool {
        self.config.device_mbk
    }

    fn require_facility(&self) -> Result<(), AdminError> {
        if self.config.device_mbk {
            return Ok(());
        }
        Err(refused(format!("this device has no MBK facility (device_mbk = false in {})", self.config_path.display())))
    }

    /// Logs and returns a refusal.
    fn refuse(&self, command: &str, e: AdminError) -> AdminError {
        self.log.line(&format!("admin: mbk {command} refused: {e}"));
        e
    }

    /// The device's MBK, as the state file has it now.
    fn current(&mut self) -> Result<Option<Mbk>, AdminError> {
        self.store.refresh()?;
        stored_mbk(self.store.state.mbk.as_ref())
    }

    /// The fingerprint of the device's MBK, if it holds one.
    pub fn fingerprint(&mut self) -> Result<Option<Fingerprint>, AdminError> {
        self.require_facility()?;
        Ok(self.current()?.map(|m| m.fingerprint()))
    }

    /// Generates an MBK inside, writes `shares` share files to `out` of which `threshold` rebuild it, and
    /// loads it. Refused when the device holds an MBK (unless `replace`) or a share file exists already.
    pub fn generate(
        &mut self,
        shares: u32,
        threshold: u32,
        out: &Path,
        replace: bool,
    ) -> Result<Generated, AdminError> {
        self.generate_inner(shares, threshold, out, replace).map_err(|e| self.refuse("generate", e))
    }

    fn generate_inner(
        &mut self,
        shares: u32,
        threshold: u32,
        out: &Path,
        replace: bool,
    ) -> Result<Generated, AdminError> {
        self.require_facility()?;
        let (n, m) = match (u8::try_from(shares), u8::try_from(threshold)) {
            (Ok(n), Ok(m)) if m >= 1 && n >= 1 && m <= n => (n, m),
            _ => return Err(refused("the threshold M and the number of shares N need 1 <= M <= N <= 255")),
        };
        if m < 2 && n > 1 {
            return Err(refused(
                "a threshold of 1 makes every share the MBK itself: use --threshold 2 or more (or 1 share)",
            ));
        }
        let replaced = self.current()?.map(|k| k.fingerprint());
        if let Some(fp) = replaced {
            if !replace {
                return Err(refused(format!(
                    "the device already holds an MBK (fingerprint {fp}); --replace replaces it (keys backed up under \
                     it restore only on a device that holds it)"
                )));
            }
        }
        let files: Vec<PathBuf> = (1..=n).map(|i| out.join(share_file_name(i, n))).collect();
        if let Some(existing) = files.iter().find(|f| f.symlink_metadata().is_ok()) {
            return Err(refused(format!("{}: a share file exists already; nothing was written", existing.display())));
        }
        if !out.is_dir() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(out)
                .map_err(|e| refused(format!("{}: cannot create the share directory: {e}", out.display())))?;
        }
        let mbk = Mbk::generate();
        let fingerprint = mbk.fingerprint();
        let mut split = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(&mut split);
        let parts = shamir::split(mbk.as_bytes(), m, n);
        let mut written = Vec::new();
        let remove_written = |written: &[&PathBuf]| {
            for f in written {
                let _ = std::fs::remove_file(f);
            }
        };
        for ((index, data), file) in parts.into_iter().zip(&files) {
            let share = Share { index, threshold: m, shares: n, split, fingerprint, data };
            if let Err(e) = write_new(file, share.to_text().as_bytes()) {
                remove_written(&written);
                return Err(refused(format!("{}: cannot write the share: {e}; nothing was loaded", file.display())));
            }
            written.push(file);
        }
        let key = Bytes(mbk.as_bytes().to_vec());
        let loaded = self.store.update(|state| {
            if state.mbk.is_some() && !replace {
                return Err(refused("another process loaded an MBK meanwhile; --replace replaces it"));
            }
            state.mbk = Some(key);
            Ok(())
        });
        if let Err(e) = loaded {
            remove_written(&written);
            return Err(e);
        }
        self.log.line(&format!(
            "admin: MBK generated inside and loaded, fingerprint {fingerprint}{}; {m} of {n} shares rebuild it, written to {}",
            replaced.map_or(String::new(), |r| format!(" (replaces {r})")),
            out.display()
        ));
        Ok(Generated { fingerprint, files, replaced })
    }

    /// Loads the MBK rebuilt from share files. Refused, changing nothing: too few shares, shares of different
    /// MBKs or splits, a damaged share, one given twice, a rebuilt key whose fingerprint is not the one the
    /// shares name, a device holding another MBK (unless `replace`).
    pub fn import(&mut self, files: &[PathBuf], replace: bool) -> Result<Imported, AdminError> {
        self.import_inner(files, replace).map_err(|e| self.refuse("import", e))
    }

    fn import_inner(&mut self, files: &[PathBuf], replace: bool) -> Result<Imported, AdminError> {
        self.require_facility()?;
        let mut shares: Vec<(&PathBuf, Share)> = Vec::new();
        for file in files {
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(file)
                    .map_err(|e| refused(format!("{}: cannot read the share: {e}", file.display())))?,
            );
            let share = Share::parse(&text).map_err(|e| refused(format!("{}: {e}", file.display())))?;
            if let Some((first_file, first)) = shares.first() {
                if (share.fingerprint, share.split, share.threshold, share.shares)
                    != (first.fingerprint, first.split, first.threshold, first.shares)
                {
                    return Err(refused(format!(
                        "{}: a share of another MBK or split than {} (MBK {}, {} of {}; the first names MBK {}, {} of {})",
                        file.display(),
                        first_file.display(),
                        share.fingerprint,
                        share.threshold,
                        share.shares,
                        first.fingerprint,
                        first.threshold,
                        first.shares
                    )));
                }
            }
            if let Some((twin, _)) = shares.iter().find(|(_, s)| s.index == share.index) {
                return Err(refused(format!(
                    "{}: share {} of {} is given twice (also {})",
                    file.display(),
                    share.index,
                    share.shares,
                    twin.display()
                )));
            }
            shares.push((file, share));
        }
        let Some((_, first)) = shares.first() else {
            return Err(refused("no share given"));
        };
        let (fingerprint, threshold, total) = (first.fingerprint, first.threshold, first.shares);
        if shares.len() < threshold as usize {
            return Err(refused(format!(
                "too few shares: this MBK needs {threshold} of its {total} shares, {} given",
                shares.len()
            )));
        }
        let points: Vec<(u8, &[u8])> = shares.iter().map(|(_, s)| (s.index, &s.data[..])).collect();
        let rebuilt = shamir::combine(&points);
        let mbk = Mbk::from_bytes(&rebuilt).ok_or_else(|| refused("the shares do not rebuild a 32-byte key"))?;
        if mbk.fingerprint() != fingerprint {
            return Err(refused(format!(
                "the shares do not rebuild the MBK they name (fingerprint {fingerprint}): one of them is damaged or \
                 altered"
            )));
        }
        let current = self.current()?.map(|k| k.fingerprint());
        if current == Some(fingerprint) {
            self.log
                .line(&format!("admin: MBK import of the MBK the device holds, fingerprint {fingerprint}: no change"));
            return Ok(Imported::AlreadyLoaded(fingerprint));
        }
        let key = Bytes(mbk.as_bytes().to_vec());
        let replaced = self.store.update(|state| {
            let held = stored_mbk(state.mbk.as_ref())?.map(|k| k.fingerprint());
            match held {
                Some(fp) if fp != fingerprint && !replace => Err(refused(format!(
                    "the device holds another MBK (fingerprint {fp}); --replace replaces it (keys backed up under it \
                     restore only on a device that holds it)"
                ))),
                _ => {
                    state.mbk = Some(key);
                    Ok(held.filter(|fp| *fp != fingerprint))
                }
            }
        })?;
        self.log.line(&format!(
            "admin: MBK imported from {} of {total} shares, fingerprint {fingerprint}{}",
            shares.len(),
            replaced.map_or(String::new(), |r| format!(" (replaces {r})"))
        ));
        Ok(Imported::Loaded { fingerprint, replaced })
    }
}

/// The MBK of a state file (a malformed one is an error, never "no MBK").
fn stored_mbk(stored: Option<&Bytes>) -> Result<Option<Mbk>, AdminError> {
    match stored {
        None => Ok(None),
        Some(b) => Mbk::from_bytes(&b.0)
            .map(Some)
            .ok_or_else(|| refused("the state file holds a malformed MBK (not 32 bytes)")),
    }
}

/// Writes a new file readable by its owner only (refused if it exists), and syncs it.
fn write_new(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(data)?;
    file.sync_all()
}
