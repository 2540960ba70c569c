//! The backup file: versioned, line-oriented text, one record per key, written and read as a stream.
//!
//! Format 2 (written by this p11shim):
//!
//! ```text
//! P11SHIM-BACKUP 2
//! {"format":2,"mbk":"…","time":"…","source":"…","filter":"…"}
//! R {"kind":"stored","id":"…","token":"…","group":"…","class":4,…,"label":"<hex>",…,"mbk":"…","mac":"<hex>"}
//! R {"kind":"stored",…,"attrs":{"chunked":9437184},…,"mac":"<hex>"}
//! C {"n":1,"field":"attrs","data":"<hex of at most CHUNK bytes>"}
//! C {"n":2,"field":"attrs","data":"<hex>"}
//! T {"count":2,"mac":"<hex>"}
//! ```
//!
//! A byte field (label, CKA_ID, attributes, wrapped secret) of at most [`INLINE_MAX`] bytes is written in its
//! record's line; a longer one is announced in the line by its length and follows in chunk lines of
//! [`CHUNK`] bytes, numbered within the record, in field order. So a line never holds more than a few MiB
//! whatever the size of a key or data object, and reading needs memory for one record and one chunk line.
//!
//! Every record carries its own MAC (made in the HSM by a [`Sealer`]) over a SHA-256 digest of its fields
//! (hashed in place, never copied into one buffer), so a record checks alone. The trailer MAC covers the
//! exact magic and header bytes, a hash chain over the record MACs and the count, so truncation, removal,
//! insertion, duplication, reordering and any header edit fail at the end. Every line must be exactly what the
//! writer would write for the values it holds (lowercase hex, fixed field order, chunk boundaries): any
//! edited byte is refused, not only those that change a value.
//!
//! Format 1 (every field in one line, at most [`MAX_LINE`] bytes; the header holds the record count) is still
//! read and verified: see [`record`] for both record MACs.

mod reader;
pub mod record;
pub(crate) mod writer;

pub use reader::{verify_file, BackupReader};
pub use record::{utc_now, Header, Record, RecordKind};
pub use writer::{BackupWriter, Leftover};

use crate::error::{Error, Result};
use serde::Serialize;
use std::io;
use std::path::PathBuf;

pub const MAGIC: &str = "P11SHIM-BACKUP";
/// The version this p11shim writes.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest version this p11shim reads.
pub const OLDEST_READ: u32 = 1;
/// A line longer than this is refused on reading (and a record line on writing), so a damaged file cannot
/// exhaust memory. Chunk lines hold 2 × [`CHUNK`] hex digits, far below it.
pub const MAX_LINE: usize = 16 << 20;
/// A byte field longer than this leaves its record's line for chunk lines (format 2).
pub const INLINE_MAX: usize = 64 << 10;
/// Bytes of a field per chunk line.
pub const CHUNK: usize = 1 << 20;
/// The longest byte field a backup holds: the key stores' own limit on a value (SQLite's default maximum
/// length of a blob is 10^9 bytes, PostgreSQL's bytea 1 GiB). A reader refuses a longer announced length
/// before reading any of it.
pub const MAX_FIELD: u64 = 1 << 30;

/// Computes and checks MACs; in the shim the HSM does it with the MBK set's MAC key (HMAC-SHA256).
pub trait Sealer {
    /// MAC of `data` (HMAC-SHA256 in the HSM; 32 bytes).
    fn seal(&self, data: &[u8]) -> Result<Vec<u8>>;
    /// Whether `mac` is `data`'s MAC.
    fn check(&self, data: &[u8], mac: &[u8]) -> Result<bool>;
    /// Names the MAC key: the fingerprint of the MBK set it belongs to (audit entries record it).
    fn key_name(&self) -> String {
        String::new()
    }
}

/// What a finished or verified file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub path: PathBuf,
    pub header: Header,
    /// Number of records (equals `header.count`).
    pub records: u64,
    /// Records of kind Stored and Hsm.
    pub stored: u64,
    pub hsm: u64,
    /// Size of the file in bytes.
    pub bytes: u64,
}

pub use crate::error::ErrorKind;

/// Why a backup file cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// The output cannot be written there: it exists (without overwrite), or it is not a regular file.
    #[error("{path}: {source}")]
    Output { path: PathBuf, source: io::Error },
    #[error("not a p11shim backup ({0})")]
    NotABackup(String),
    #[error("{}", unknown_version(*.0))]
    UnknownVersion(u32),
    #[error("header: {0}")]
    Header(String),
    #[error("record {record}: {detail}")]
    Record { record: u64, detail: String },
    #[error("record {record}: chunk {chunk}: {detail}")]
    Chunk { record: u64, chunk: u64, detail: String },
    #[error("record {record} (id {id}): record MAC does not match: the record was altered, or sealed with another MBK set's MAC key")]
    RecordMac { record: u64, id: String },
    #[error("record {record} (id {id}): not in canonical form: the line was edited")]
    NotCanonical { record: u64, id: String },
    #[error("record {record}: the header announces only {count} records")]
    TooManyRecords { record: u64, count: u64 },
    #[error("truncated: no trailer after record {after}")]
    NoTrailer { after: u64 },
    #[error("truncated: {what} is cut short")]
    CutShort { what: String },
    #[error("trailer (after record {after}): {detail}")]
    Trailer { after: u64, detail: String },
    #[error("record count: the header says {header}, the trailer says {trailer}, the file holds {records}: records removed or added")]
    CountMismatch { header: u64, trailer: u64, records: u64 },
    #[error("record count: the trailer says {trailer}, the file holds {records}: records removed or added")]
    TrailerCount { trailer: u64, records: u64 },
    #[error("trailer MAC: records removed, reordered or the header edited")]
    TrailerMac,
    #[error("data after the trailer")]
    AfterTrailer,
    /// A record that cannot be written: a line that would exceed [`MAX_LINE`], a field over [`MAX_FIELD`].
    #[error("record {record} (id {id}): {detail}")]
    TooLarge { record: u64, id: String, detail: String },
    /// The reader stopped at an earlier error.
    #[error("{path}: reading stopped at an earlier error (after record {after})")]
    Stopped { path: PathBuf, after: u64 },
    /// The sealer (the HSM) failed; the error as it came.
    #[error(transparent)]
    Sealer(Error),
    #[error("{0}")]
    Invalid(String),
}

fn unknown_version(v: u32) -> String {
    let reads = format!("this p11shim reads versions {OLDEST_READ} to {FORMAT_VERSION}");
    if v > FORMAT_VERSION {
        format!("written by a newer p11shim: format version {v} ({reads}); verify or restore it with that version or a later one")
    } else {
        format!("unknown format version {v} ({reads})")
    }
}

impl FormatError {
    /// The record the error is about (1-based), when it is about one.
    pub fn record(&self) -> Option<u64> {
        match self {
            FormatError::Record { record, .. }
            | FormatError::Chunk { record, .. }
            | FormatError::RecordMac { record, .. }
            | FormatError::NotCanonical { record, .. }
            | FormatError::TooManyRecords { record, .. }
            | FormatError::TooLarge { record, .. } => Some(*record),
            _ => None,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            FormatError::Io { .. } | FormatError::Output { .. } => ErrorKind::Io,
            FormatError::Sealer(e) => e.kind(),
            FormatError::TooLarge { .. } | FormatError::Invalid(_) => ErrorKind::Failed,
            _ => ErrorKind::Damaged,
        }
    }
}

impl From<FormatError> for Error {
    fn from(e: FormatError) -> Error {
        match e {
            FormatError::Sealer(e) => e,
            e => Error::Other(e.to_string()),
        }
    }
}

pub(crate) type FormatResult<T> = std::result::Result<T, FormatError>;

pub(crate) fn sealed(e: Error) -> FormatError {
    FormatError::Sealer(e)
}
