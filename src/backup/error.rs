//! The errors of backup, restore and verify (per group and whole store), typed by what went wrong, so that
//! the command (exit status), the C interface (CK_RV) and the audit trail (refused or failed) decide from
//! the variant, never from a message. [`BackupError::kind`] says which [`ErrorKind`] an error is.

pub use super::format::ErrorKind;
use super::format::FormatError;
use crate::error::Error;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The backup file: damaged, truncated, of an unknown version, unreadable, or an output that cannot be
    /// written (see [`FormatError::kind`]).
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The file was made under another MBK than the target's; nothing was modified.
    #[error("wrong MBK: {file} was made under MBK {file_mbk}, but token {token:?} has MBK {token_mbk}; restore it on an HSM holding that MBK, or clone the MBK (p11shim mbk clone-request/clone-to/clone-accept); nothing was modified")]
    WrongMbk { file: PathBuf, file_mbk: String, token: String, token_mbk: String },
    /// A record is wrapped under another MBK than the file's own (a file assembled from two backups).
    #[error("record {record} (id {id}): wrapped under MBK {record_mbk}, not {token_mbk}; nothing was modified")]
    RecordMbk { record: u64, id: String, record_mbk: String, token_mbk: String },
    /// The logged-on users may not: `action` is "export", "import" or "verify"; `why` the authorizer's
    /// reason.
    #[error("{action} denied: {why}")]
    Denied { action: &'static str, why: String },
    /// What the configured mode forbids (an overwrite in CC mode, a whole-store operation outside
    /// standard mode).
    #[error("refused: {0}")]
    Refused(String),
    /// A whole-store backup file that is not intact (db backup / db restore).
    #[error("{file}: {detail}; nothing was modified")]
    DamagedDb { file: PathBuf, detail: String },
    /// A record checked in the file but could not be made in the HSM.
    #[error("record {record} ({name}): {what}: {cause}")]
    Hsm { record: u64, name: String, what: String, cause: Error },
    /// A backup whose group filter matches no key: no file is written (and one that exists stays).
    #[error("the group regex {filter:?} matches no key{where_}; no file was written")]
    NothingMatched { filter: String, where_: String },
    /// The file changed between the check and the restore.
    #[error("{0} changed during the restore")]
    Changed(PathBuf),
    /// The key store, the HSM, or anything else below, as it came.
    #[error(transparent)]
    Other(#[from] Error),
}

impl BackupError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            BackupError::Format(e) => e.kind(),
            BackupError::WrongMbk { .. } | BackupError::RecordMbk { .. } => ErrorKind::WrongMbk,
            BackupError::Denied { .. } | BackupError::Refused(_) => ErrorKind::Denied,
            BackupError::DamagedDb { .. } | BackupError::Changed(_) => ErrorKind::Damaged,
            BackupError::Hsm { cause, .. } => cause.kind(),
            BackupError::Other(e) => e.kind(),
            BackupError::NothingMatched { .. } => ErrorKind::NotFound,
        }
    }

    /// Whether the logged-on users or the mode refused the operation (the audit trail says "refused").
    pub fn is_refusal(&self) -> bool {
        self.kind() == ErrorKind::Denied
    }

    /// The CK_RV the C interface returns for it.
    pub fn rv(&self) -> cryptoki_sys::CK_RV {
        use cryptoki_sys::*;
        match self {
            BackupError::Other(Error::Rv(rv)) | BackupError::Format(FormatError::Sealer(Error::Rv(rv))) => *rv,
            e if e.kind() == ErrorKind::Denied => CKR_ACTION_PROHIBITED,
            e if e.kind() == ErrorKind::Unavailable => CKR_DEVICE_ERROR,
            _ => CKR_FUNCTION_FAILED,
        }
    }
}

impl From<crate::store::StoreError> for BackupError {
    fn from(e: crate::store::StoreError) -> Self {
        BackupError::Other(Error::Store(e))
    }
}

impl From<BackupError> for Error {
    fn from(e: BackupError) -> Error {
        match e {
            BackupError::Other(e) | BackupError::Format(FormatError::Sealer(e)) => e,
            e => Error::Other(e.to_string()),
        }
    }
}

pub type BackupResult<T> = std::result::Result<T, BackupError>;
