//! The device state file: tokens, token objects and the device's master backup key (MBK), shared by every
//! process that loads the module and by the admin tool.
//!
//! Writes are crash-safe (temporary file in the same directory, fsync, rename over the state file, fsync the
//! directory) and serialized between processes by an flock on `<state>.lock`; a writer re-reads the state
//! under the lock first, so changes of other processes are never lost. Readers need no lock: the state file
//! is always either the old or the new version. A process re-reads the file when its identity (inode, size,
//! mtime) changed.

use crate::object::{Bytes, Object};
use crate::token::PinHash;
use crate::Result;
use cryptoki_sys::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// One initialized token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenState {
    pub label: String,
    pub serial: String,
    pub so_pin: PinHash,
    pub user_pin: Option<PinHash>,
    /// Token objects by their persistent id (unique in the state file, never reused).
    pub objects: BTreeMap<u64, Object>,
}

/// Everything the state file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceState {
    pub format: u32,
    /// Incremented by every write.
    pub generation: u64,
    /// The next persistent object id.
    pub next_uid: u64,
    /// Initialized tokens by slot index.
    pub tokens: BTreeMap<usize, TokenState>,
    /// The device's master backup key (AES-256), loaded by the admin tool; never a PKCS#11 object. The file
    /// stands for the device's secure memory: the key is in it in clear, as all key material of the simulator.
    /// Absent in state files written before the MBK existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mbk: Option<Bytes>,
}

impl Default for DeviceState {
    fn default() -> DeviceState {
        DeviceState { format: 1, generation: 0, next_uid: 1, tokens: BTreeMap::new(), mbk: None }
    }
}

impl DeviceState {
    /// A fresh persistent object id.
    pub fn new_uid(&mut self) -> u64 {
        let uid = self.next_uid;
        self.next_uid += 1;
        uid
    }
}

/// What identifies one version of the state file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

fn file_id(path: &Path) -> Option<FileId> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileId { dev: m.dev(), ino: m.ino(), size: m.size(), mtime: m.mtime(), mtime_nsec: m.mtime_nsec() })
}

/// The state file of one process.
pub struct Store {
    path: PathBuf,
    lock_path: PathBuf,
    /// The version last read or written; None when the file did not exist.
    seen: Option<FileId>,
    pub state: DeviceState,
    writes: u64,
    crash_at_write: Option<u64>,
}

/// An exclusive flock, released when dropped (the file is closed).
struct FileLock(#[allow(dead_code)] File);

impl FileLock {
    fn acquire(path: &Path) -> std::io::Result<FileLock> {
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
        loop {
            // SAFETY: flock on a file descriptor this function owns for the life of the returned guard.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(FileLock(file));
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

impl Store {
    /// Opens the state at `path` (a missing file is an empty device). `crash_at_write` is the fault that
    /// aborts the process in the middle of that write.
    pub fn open(path: &Path, crash_at_write: Option<u64>) -> std::result::Result<Store, String> {
        let mut lock_name = path.file_name().ok_or("the state path names no file")?.to_os_string();
        lock_name.push(".lock");
        let mut store = Store {
            path: path.to_path_buf(),
            lock_path: path.with_file_name(lock_name),
            seen: None,
            state: DeviceState::default(),
            writes: 0,
            crash_at_write,
        };
        store.load().map_err(|e| format!("reading {}: {e}", path.display()))?;
        Ok(store)
    }

    fn load(&mut self) -> std::result::Result<(), String> {
        // Identity first: if the file is replaced between the stat and the read, the next refresh reads again.
        let id = file_id(&self.path);
        // The file's text holds key material (keys, the MBK): zeroized once parsed.
        self.state = match std::fs::read(&self.path).map(Zeroizing::new) {
            Ok(data) => serde_json::from_slice(&data).map_err(|e| format!("corrupt state file: {e}"))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => DeviceState::default(),
            Err(e) => return Err(e.to_string()),
        };
        self.seen = id;
        Ok(())
    }

    /// Re-reads the state file if another process changed it; returns whether it did.
    pub fn refresh(&mut self) -> Result<bool> {
        if file_id(&self.path) == self.seen {
            return Ok(false);
        }
        self.load().map_err(|_| CKR_DEVICE_ERROR)?;
        Ok(true)
    }

    /// Changes the state with `f` under the inter-process lock, on the newest state, and writes it. Nothing
    /// changes (in memory or on disk) when `f` fails.
    pub fn mutate<R>(&mut self, f: impl FnOnce(&mut DeviceState) -> Result<R>) -> Result<R> {
        self.update(f)
    }

    /// [`Store::mutate`] with the caller's error type (the admin tool's messages); the store's own failures
    /// are CK_RVs (CKR_DEVICE_ERROR: the lock, a corrupt file, the write).
    pub fn update<R, E: From<CK_RV>>(
        &mut self,
        f: impl FnOnce(&mut DeviceState) -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        let _lock = FileLock::acquire(&self.lock_path).map_err(|_| CKR_DEVICE_ERROR)?;
        self.refresh()?;
        let before = self.state.clone();
        let result = match f(&mut self.state) {
            Ok(r) => r,
            Err(e) => {
                self.state = before;
                return Err(e);
            }
        };
        self.state.generation += 1;
        if let Err(e) = self.write() {
            self.state = before;
            return Err(e.into());
        }
        Ok(result)
    }

    fn write(&mut self) -> Result<()> {
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = self.path.file_name().ok_or(CKR_GENERAL_ERROR)?.to_string_lossy().into_owned();
        let prefix = format!(".{name}.tmp.");
        // Under the lock no other write is in progress: temporary files left are from crashed writers.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let tmp = dir.join(format!("{prefix}{}", std::process::id()));
        let data = Zeroizing::new(serde_json::to_vec_pretty(&self.state).map_err(|_| CKR_GENERAL_ERROR)?);
        self.writes += 1;
        let io = |_| CKR_DEVICE_ERROR;
        let mut file = File::create(&tmp).map_err(io)?;
        if self.crash_at_write == Some(self.writes) {
            // The fault `crash_during_write`: die with half a temporary file on disk.
            let _ = file.write_all(&data[..data.len() / 2]);
            let _ = file.sync_all();
            std::process::abort();
        }
        file.write_all(&data).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        self.seen = file_id(&self.path);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_stores_see_each_others_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mut a = Store::open(&path, None).unwrap();
        let mut b = Store::open(&path, None).unwrap();
        a.mutate(|s| Ok(s.new_uid())).unwrap();
        // b writes on top of a's change, not over it.
        let uid = b.mutate(|s| Ok(s.new_uid())).unwrap();
        assert_eq!(uid, 2);
        assert!(a.refresh().unwrap());
        assert_eq!(a.state.next_uid, 3);
        assert_eq!(a.state.generation, 2);
        // A failed change leaves everything as it was.
        assert_eq!(
            a.mutate(|s| -> Result<()> {
                s.next_uid = 99;
                Err(CKR_FUNCTION_FAILED)
            }),
            Err(CKR_FUNCTION_FAILED)
        );
        assert_eq!(a.state.next_uid, 3);
        assert!(!a.refresh().unwrap());
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_an_empty_device() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"{\"format\": 1, \"gener").unwrap();
        assert!(Store::open(&path, None).is_err());
    }
}
