//! The backup file: versioned, line-oriented text, one record per key, written and read as a stream.
//!
//! ```text
//! P11SHIM-BACKUP 1
//! {"format":1,"mbk":"…","time":"…","source":"…","filter":"…","count":2                   }
//! R {"kind":"stored","id":"…","token":"…","group":"…","class":4,…,"mbk":"…","mac":"<hex>"}
//! R {"kind":"hsm",…}
//! T {"count":2,"mac":"<hex>"}
//! ```
//!
//! Every record carries its own MAC (made in the HSM by a [`Sealer`]) over its canonical bytes, so a record
//! checks alone. The trailer MAC covers the exact header bytes, a hash chain over the record MACs and the
//! count, so truncation, removal, insertion, duplication, reordering and any header edit fail at the end. The
//! header's count is reserved as a fixed-width field and filled in by [`BackupWriter::finish`]. A line must be
//! exactly what the writer would write for the values it holds (lowercase hex, fixed field order): any edited
//! byte is refused, not only those that change a value.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

pub const MAGIC: &str = "P11SHIM-BACKUP";
pub const FORMAT_VERSION: u32 = 1;

const RECORD_DOMAIN: &[u8] = b"p11shim backup record v1\0";
const TRAILER_DOMAIN: &[u8] = b"p11shim backup trailer v1\0";
/// Width of the header's count field: u64::MAX has 20 digits.
const COUNT_WIDTH: usize = 20;
/// A line longer than this is refused on writing and reading, so a damaged file cannot exhaust memory.
pub const MAX_LINE: usize = 16 << 20;
const MAX_MAGIC_LINE: u64 = 64;

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

/// The file's header (line 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// Fingerprint of the MBK set the records are wrapped and sealed under.
    pub mbk: String,
    /// When the backup was made, RFC 3339 UTC (see [`utc_now`]).
    pub time: String,
    /// Where it was made: host and store.
    pub source: String,
    /// The group regex it was made for.
    pub filter: String,
    /// Number of records. Ignored by [`BackupWriter::create`]; written by [`BackupWriter::finish`].
    pub count: u64,
}

impl Header {
    /// A header of the current format version; the count is filled in when the file is finished.
    pub fn new(
        mbk: impl Into<String>,
        time: impl Into<String>,
        source: impl Into<String>,
        filter: impl Into<String>,
    ) -> Self {
        Header {
            format: FORMAT_VERSION,
            mbk: mbk.into(),
            time: time.into(),
            source: source.into(),
            filter: filter.into(),
            count: 0,
        }
    }

    /// Line 2 as written: the count left-aligned in a fixed-width field so that it can be patched in place.
    fn line(&self) -> (Vec<u8>, usize) {
        let mut s = format!(
            "{{\"format\":{},\"mbk\":{},\"time\":{},\"source\":{},\"filter\":{},\"count\":",
            self.format,
            json_str(&self.mbk),
            json_str(&self.time),
            json_str(&self.source),
            json_str(&self.filter)
        );
        let count_at = s.len();
        s.push_str(&count_field(self.count));
        s.push_str("}\n");
        (s.into_bytes(), count_at)
    }
}

fn count_field(count: u64) -> String {
    format!("{count:<COUNT_WIDTH$}")
}

/// The current time as RFC 3339 UTC, seconds precision, for [`Header::time`].
pub fn utc_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Where a key came from: a key store row, or a key that lived in the HSM (a token object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordKind {
    Stored,
    Hsm,
}

impl RecordKind {
    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Stored => "stored",
            RecordKind::Hsm => "hsm",
        }
    }
    fn byte(self) -> u8 {
        match self {
            RecordKind::Stored => 1,
            RecordKind::Hsm => 2,
        }
    }
    fn from_name(name: &str) -> Option<RecordKind> {
        match name {
            "stored" => Some(RecordKind::Stored),
            "hsm" => Some(RecordKind::Hsm),
            _ => None,
        }
    }
}

/// One key.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: RecordKind,
    pub id: String,
    pub token: String,
    pub group: String,
    pub class: u64,
    pub key_type: u64,
    pub label: Vec<u8>,
    pub ckid: Vec<u8>,
    /// Canonical attribute encoding (crate::attrs::Template::encode), public parts in clear.
    pub attrs: Vec<u8>,
    /// The secret wrapped under the MBK; empty for public objects.
    pub wrapped: Vec<u8>,
    pub wrap_mech: u64,
    /// Fingerprint of the MBK that wrapped it.
    pub mbk: String,
}

impl fmt::Debug for Record {
    // The wrapped blob is nobody's business in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("kind", &self.kind)
            .field("id", &self.id)
            .field("token", &self.token)
            .field("group", &self.group)
            .field("class", &self.class)
            .field("key_type", &self.key_type)
            .field("label", &String::from_utf8_lossy(&self.label))
            .field("ckid", &hex::encode(&self.ckid))
            .field("attrs", &format_args!("{} bytes", self.attrs.len()))
            .field("wrapped", &format_args!("{} bytes", self.wrapped.len()))
            .field("wrap_mech", &format_args!("{:#x}", self.wrap_mech))
            .field("mbk", &self.mbk)
            .finish()
    }
}

impl Record {
    /// The bytes the record MAC covers: a domain string, then every field in a fixed order; strings and byte
    /// strings prefixed with their length (u32 BE), numbers as u64 BE, the kind as one byte.
    pub fn mac_input(&self) -> Vec<u8> {
        let variable = [
            self.id.as_bytes(),
            self.token.as_bytes(),
            self.group.as_bytes(),
            &self.label,
            &self.ckid,
            &self.attrs,
            &self.wrapped,
            self.mbk.as_bytes(),
        ];
        let mut out =
            Vec::with_capacity(RECORD_DOMAIN.len() + 1 + 24 + variable.iter().map(|v| 4 + v.len()).sum::<usize>());
        out.extend_from_slice(RECORD_DOMAIN);
        out.push(self.kind.byte());
        let field = |out: &mut Vec<u8>, v: &[u8]| {
            // Lines are capped far below 4 GiB (MAX_LINE), so a field always fits.
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v);
        };
        field(&mut out, self.id.as_bytes());
        field(&mut out, self.token.as_bytes());
        field(&mut out, self.group.as_bytes());
        out.extend_from_slice(&self.class.to_be_bytes());
        out.extend_from_slice(&self.key_type.to_be_bytes());
        field(&mut out, &self.label);
        field(&mut out, &self.ckid);
        field(&mut out, &self.attrs);
        field(&mut out, &self.wrapped);
        out.extend_from_slice(&self.wrap_mech.to_be_bytes());
        field(&mut out, self.mbk.as_bytes());
        out
    }

    /// The record's line, without the newline.
    fn line(&self, mac: &[u8]) -> String {
        format!(
            "R {{\"kind\":\"{}\",\"id\":{},\"token\":{},\"group\":{},\"class\":{},\"key_type\":{},\"label\":\"{}\",\"ckid\":\"{}\",\"attrs\":\"{}\",\"wrapped\":\"{}\",\"wrap_mech\":{},\"mbk\":{},\"mac\":\"{}\"}}",
            self.kind.name(),
            json_str(&self.id),
            json_str(&self.token),
            json_str(&self.group),
            self.class,
            self.key_type,
            hex::encode(&self.label),
            hex::encode(&self.ckid),
            hex::encode(&self.attrs),
            hex::encode(&self.wrapped),
            self.wrap_mech,
            json_str(&self.mbk),
            hex::encode(mac),
        )
    }
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

fn trailer_line(count: u64, mac: &[u8]) -> String {
    format!("T {{\"count\":{count},\"mac\":\"{}\"}}", hex::encode(mac))
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

/// Why a backup file cannot be written or read. Converts into [`Error`] (as `Error::Other`, the message).
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("not a p11shim backup ({0})")]
    NotABackup(String),
    #[error("unknown format version {0} (this p11shim reads version {FORMAT_VERSION})")]
    UnknownVersion(u32),
    #[error("header: {0}")]
    Header(String),
    #[error("record {record}: field `{field}`: {detail}")]
    Field { record: u64, field: String, detail: String },
    #[error("record {record}: {detail}")]
    Record { record: u64, detail: String },
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
    #[error("trailer MAC: records removed, reordered or the header edited")]
    TrailerMac,
    #[error("data after the trailer")]
    AfterTrailer,
    #[error("{0} exists; refusing to replace it (overwrite not requested)")]
    Exists(PathBuf),
    #[error("{0}")]
    Invalid(String),
}

impl FormatError {
    /// The record the error is about (1-based), when it is about one.
    pub fn record(&self) -> Option<u64> {
        match self {
            FormatError::Field { record, .. }
            | FormatError::Record { record, .. }
            | FormatError::RecordMac { record, .. }
            | FormatError::NotCanonical { record, .. }
            | FormatError::TooManyRecords { record, .. } => Some(*record),
            _ => None,
        }
    }
}

impl From<FormatError> for Error {
    fn from(e: FormatError) -> Error {
        Error::Other(e.to_string())
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| FormatError::Io { path: path.to_path_buf(), source }.into()
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn trailer_mac_input(head_digest: &[u8; 32], chain: &[u8; 32], count: u64) -> Vec<u8> {
    [TRAILER_DOMAIN, head_digest, chain, &count.to_be_bytes()].concat()
}

fn magic_line() -> String {
    format!("{MAGIC} {FORMAT_VERSION}\n")
}

/// Streams records into a temporary file next to the target; the target appears only when [`finish`] succeeds.
///
/// [`finish`]: BackupWriter::finish
pub struct BackupWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    header: Header,
    /// The magic and header lines as written (count still the placeholder).
    head: Vec<u8>,
    count_at: u64,
    chain: [u8; 32],
    count: u64,
    stored: u64,
    hsm: u64,
    bytes: u64,
    overwrite: bool,
    done: bool,
}

impl BackupWriter {
    /// Starts a backup that will refuse to replace an existing file.
    pub fn create(path: &Path, header: Header) -> Result<BackupWriter> {
        Self::create_with(path, header, false)
    }

    /// Starts a backup; `overwrite` lets [`finish`](BackupWriter::finish) replace an existing file.
    pub fn create_with(path: &Path, mut header: Header, overwrite: bool) -> Result<BackupWriter> {
        if header.format != FORMAT_VERSION {
            return Err(FormatError::Invalid(format!(
                "cannot write format version {} (this p11shim writes version {FORMAT_VERSION})",
                header.format
            ))
            .into());
        }
        if !overwrite && fs::symlink_metadata(path).is_ok() {
            return Err(FormatError::Exists(path.to_path_buf()).into());
        }
        let name = path
            .file_name()
            .ok_or_else(|| FormatError::Invalid(format!("{}: not a file name", path.display())))?
            .to_string_lossy()
            .into_owned();
        remove_abandoned_temps(&parent_dir(path), &name);
        let (tmp, file) = create_temp(&parent_dir(path), &name)?;
        header.count = 0;
        let magic = magic_line();
        let (line, count_at) = header.line();
        let head = [magic.as_bytes(), &line].concat();
        let mut writer = BackupWriter {
            path: path.to_path_buf(),
            tmp,
            out: Some(BufWriter::with_capacity(1 << 16, file)),
            header,
            count_at: (magic.len() + count_at) as u64,
            bytes: head.len() as u64,
            head,
            chain: [0; 32],
            count: 0,
            stored: 0,
            hsm: 0,
            overwrite,
            done: false,
        };
        let (out, head) = (writer.out.as_mut().expect("open"), &writer.head);
        out.write_all(head).map_err(io_err(&writer.tmp))?;
        Ok(writer)
    }

    /// Seals and appends one record.
    pub fn write(&mut self, record: &Record, sealer: &dyn Sealer) -> Result<()> {
        let record_no = self.count + 1;
        let mac = sealer.seal(&record.mac_input())?;
        if mac.is_empty() {
            return Err(FormatError::Invalid(format!(
                "record {record_no} (id {}): the sealer returned an empty MAC",
                record.id
            ))
            .into());
        }
        let mut line = record.line(&mac);
        if line.len() > MAX_LINE {
            return Err(FormatError::Record {
                record: record_no,
                detail: format!("id {}: {} bytes as a line; at most {MAX_LINE} fit in a backup", record.id, line.len()),
            }
            .into());
        }
        line.push('\n');
        let out = self.out.as_mut().expect("a writer is open until finished");
        out.write_all(line.as_bytes()).map_err(io_err(&self.tmp))?;
        self.chain = sha256(&[&self.chain, &mac]);
        self.count = record_no;
        self.bytes += line.len() as u64;
        match record.kind {
            RecordKind::Stored => self.stored += 1,
            RecordKind::Hsm => self.hsm += 1,
        }
        Ok(())
    }

    /// Records written so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The temporary file being written (removed if the writer is dropped unfinished).
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Fills in the count, writes the trailer, fsyncs, and puts the file under its name (then fsyncs the
    /// directory). Refuses to replace an existing file unless the writer was created with `overwrite`.
    pub fn finish(mut self, sealer: &dyn Sealer) -> Result<Summary> {
        let file = self
            .out
            .take()
            .expect("a writer is open until finished")
            .into_inner()
            .map_err(|e| io_err(&self.tmp)(e.into_error()))?;
        // From here an error drops `file` and then `self`, whose Drop removes the temporary file.
        let field = count_field(self.count);
        file.write_all_at(field.as_bytes(), self.count_at).map_err(io_err(&self.tmp))?;
        let at = self.count_at as usize;
        self.head[at..at + COUNT_WIDTH].copy_from_slice(field.as_bytes());
        self.header.count = self.count;

        let mac = sealer.seal(&trailer_mac_input(&sha256(&[&self.head]), &self.chain, self.count))?;
        let line = trailer_line(self.count, &mac) + "\n";
        let mut out = BufWriter::new(file);
        out.write_all(line.as_bytes()).map_err(io_err(&self.tmp))?;
        let file = out.into_inner().map_err(|e| io_err(&self.tmp)(e.into_error()))?;
        file.sync_all().map_err(io_err(&self.tmp))?;
        drop(file);
        self.bytes += line.len() as u64;

        self.publish()?;
        self.done = true;
        Ok(Summary {
            path: self.path.clone(),
            header: self.header.clone(),
            records: self.count,
            stored: self.stored,
            hsm: self.hsm,
            bytes: self.bytes,
        })
    }

    /// Moves the finished temporary file to its name. Without overwrite, a hard link refuses atomically if the
    /// name exists (rename would replace it); filesystems without hard links fall back to check-then-rename.
    fn publish(&self) -> Result<()> {
        if self.overwrite {
            fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
        } else {
            match fs::hard_link(&self.tmp, &self.path) {
                Ok(()) => fs::remove_file(&self.tmp).map_err(io_err(&self.tmp))?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(FormatError::Exists(self.path.clone()).into());
                }
                Err(_) => {
                    if fs::symlink_metadata(&self.path).is_ok() {
                        return Err(FormatError::Exists(self.path.clone()).into());
                    }
                    fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
                }
            }
        }
        let dir = parent_dir(&self.path);
        File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err(&dir))
    }
}

impl fmt::Debug for BackupWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackupWriter")
            .field("path", &self.path)
            .field("tmp", &self.tmp)
            .field("count", &self.count)
            .finish()
    }
}

impl Drop for BackupWriter {
    fn drop(&mut self) {
        if !self.done {
            drop(self.out.take());
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Removes `.NAME.tmp-PID…` files left by writers that were killed (their PID no longer runs): they hold
/// wrapped keys and are never a backup. Best effort; a file that cannot be removed is left.
fn remove_abandoned_temps(dir: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&prefix) else { continue };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(pid) = pid.parse::<u32>() else { continue };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// `.NAME.tmp-PID` (mode 0600) in `dir`; a suffix is added if that name is taken (another writer of this
/// process for the same target, or the leftover of a killed process that had the same pid).
fn create_temp(dir: &Path, name: &str) -> Result<(PathBuf, File)> {
    let base = format!(".{name}.tmp-{}", std::process::id());
    for n in 0..1000 {
        let tmp = dir.join(if n == 0 { base.clone() } else { format!("{base}-{n}") });
        match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(&tmp)(e)),
        }
    }
    Err(FormatError::Invalid(format!("{}: no free temporary name for {base}", dir.display())).into())
}

/// Reads a backup as a stream, checking every record's MAC as it goes and the trailer at the end.
pub struct BackupReader {
    path: PathBuf,
    input: BufReader<File>,
    header: Header,
    head_digest: [u8; 32],
    chain: [u8; 32],
    count: u64,
    stored: u64,
    hsm: u64,
    bytes: u64,
    line: Vec<u8>,
    state: ReadState,
}

impl fmt::Debug for BackupReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackupReader")
            .field("path", &self.path)
            .field("count", &self.count)
            .field("state", &self.state)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Records,
    Verified,
    Failed,
}

enum Line {
    Full,
    Partial,
    Eof,
}

impl BackupReader {
    /// Opens a backup and reads its magic line and header.
    pub fn open(path: &Path) -> Result<BackupReader> {
        let file = File::open(path).map_err(io_err(path))?;
        let mut input = BufReader::with_capacity(1 << 16, file);
        let mut magic = Vec::new();
        let got = read_line(&mut input, &mut magic, MAX_MAGIC_LINE).map_err(io_err(path))?;
        check_magic(&magic, &got)?;
        let mut line = Vec::new();
        match read_line(&mut input, &mut line, MAX_LINE as u64).map_err(io_err(path))? {
            Line::Full => {}
            Line::Eof => return Err(FormatError::CutShort { what: "the header".into() }.into()),
            Line::Partial => {
                let what = if line.len() >= MAX_LINE { "the header (too long)" } else { "the header" };
                return Err(FormatError::CutShort { what: what.into() }.into());
            }
        }
        let header = parse_header(&line)?;
        let head_digest = sha256(&[&magic, &line]);
        Ok(BackupReader {
            path: path.to_path_buf(),
            input,
            header,
            head_digest,
            chain: [0; 32],
            count: 0,
            stored: 0,
            hsm: 0,
            bytes: (magic.len() + line.len()) as u64,
            line,
            state: ReadState::Records,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The next record, its MAC checked, with its 1-based number; `None` once the trailer has been read and
    /// checked. After an error every later call fails too.
    pub fn next_record(&mut self, sealer: &dyn Sealer) -> Result<Option<(u64, Record)>> {
        match self.state {
            ReadState::Verified => return Ok(None),
            ReadState::Failed => {
                return Err(FormatError::Invalid(format!(
                    "{}: reading stopped at an earlier error (after record {})",
                    self.path.display(),
                    self.count
                ))
                .into())
            }
            ReadState::Records => {}
        }
        let result = self.step(sealer);
        match &result {
            Ok(None) => self.state = ReadState::Verified,
            Ok(Some(_)) => {}
            Err(_) => self.state = ReadState::Failed,
        }
        result
    }

    /// What the file holds, once every record and the trailer have been read and checked.
    pub fn summary(&self) -> Option<Summary> {
        (self.state == ReadState::Verified).then(|| Summary {
            path: self.path.clone(),
            header: self.header.clone(),
            records: self.count,
            stored: self.stored,
            hsm: self.hsm,
            bytes: self.bytes,
        })
    }

    fn step(&mut self, sealer: &dyn Sealer) -> Result<Option<(u64, Record)>> {
        let mut line = std::mem::take(&mut self.line);
        let got = read_line(&mut self.input, &mut line, MAX_LINE as u64 + 1).map_err(io_err(&self.path));
        let result = got.and_then(|got| self.take_line(&line, got, sealer));
        self.line = line;
        result
    }

    fn take_line(&mut self, line: &[u8], got: Line, sealer: &dyn Sealer) -> Result<Option<(u64, Record)>> {
        let next = self.count + 1;
        match got {
            Line::Eof => return Err(FormatError::NoTrailer { after: self.count }.into()),
            Line::Partial if line.len() > MAX_LINE => {
                return Err(FormatError::Record { record: next, detail: format!("longer than {MAX_LINE} bytes") }.into())
            }
            Line::Partial if line.starts_with(b"T ") => {
                return Err(FormatError::CutShort { what: format!("the trailer (after record {})", self.count) }.into())
            }
            Line::Partial => return Err(FormatError::CutShort { what: format!("record {next}") }.into()),
            Line::Full => {}
        }
        self.bytes += line.len() as u64;
        let body = &line[..line.len() - 1];
        if let Some(json) = body.strip_prefix(b"T ") {
            self.check_trailer(json, body, sealer)?;
            let mut rest = [0u8; 1];
            if self.input.read(&mut rest).map_err(io_err(&self.path))? != 0 {
                return Err(FormatError::AfterTrailer.into());
            }
            return Ok(None);
        }
        let Some(json) = body.strip_prefix(b"R ") else {
            return Err(FormatError::Record {
                record: next,
                detail: "neither a record (R) nor the trailer (T) line".into(),
            }
            .into());
        };
        if next > self.header.count {
            return Err(FormatError::TooManyRecords { record: next, count: self.header.count }.into());
        }
        let (record, mac) = parse_record(next, json)?;
        if !sealer.check(&record.mac_input(), &mac)? {
            return Err(FormatError::RecordMac { record: next, id: record.id }.into());
        }
        if record.line(&mac).as_bytes() != body {
            return Err(FormatError::NotCanonical { record: next, id: record.id }.into());
        }
        self.chain = sha256(&[&self.chain, &mac]);
        self.count = next;
        match record.kind {
            RecordKind::Stored => self.stored += 1,
            RecordKind::Hsm => self.hsm += 1,
        }
        Ok(Some((next, record)))
    }

    fn check_trailer(&self, json: &[u8], body: &[u8], sealer: &dyn Sealer) -> Result<()> {
        let after = self.count;
        let bad = |detail: String| -> Error { FormatError::Trailer { after, detail }.into() };
        let map = parse_object(json).map_err(bad)?;
        let mut fields = Fields { map, record: 0 };
        let count = fields.u64("count").map_err(|e| bad(e.to_string()))?;
        let mac = fields.hex("mac").map_err(|e| bad(e.to_string()))?;
        fields.done().map_err(|e| bad(e.to_string()))?;
        if trailer_line(count, &mac).as_bytes() != body {
            return Err(bad("not in canonical form: the line was edited".into()));
        }
        if count != self.count || count != self.header.count {
            return Err(
                FormatError::CountMismatch { header: self.header.count, trailer: count, records: self.count }.into()
            );
        }
        if !sealer.check(&trailer_mac_input(&self.head_digest, &self.chain, count), &mac)? {
            return Err(FormatError::TrailerMac.into());
        }
        Ok(())
    }
}

/// Reads the whole file and checks everything the file alone can prove: every record MAC, the count, the
/// trailer MAC.
pub fn verify_file(path: &Path, sealer: &dyn Sealer) -> Result<Summary> {
    let mut reader = BackupReader::open(path)?;
    while reader.next_record(sealer)?.is_some() {}
    Ok(reader.summary().expect("verified"))
}

/// Reads one line (keeping the '\n') of at most `max` bytes.
fn read_line(input: &mut impl BufRead, buf: &mut Vec<u8>, max: u64) -> io::Result<Line> {
    buf.clear();
    input.by_ref().take(max).read_until(b'\n', buf)?;
    Ok(match buf.last() {
        None => Line::Eof,
        Some(b'\n') => Line::Full,
        Some(_) => Line::Partial,
    })
}

fn check_magic(line: &[u8], got: &Line) -> Result<()> {
    let prefix = format!("{MAGIC} ");
    let full = matches!(got, Line::Full);
    if !line.starts_with(prefix.as_bytes()) {
        if !full && !line.is_empty() && prefix.as_bytes().starts_with(line) {
            return Err(FormatError::CutShort { what: "the magic line".into() }.into());
        }
        let what =
            if line.is_empty() { "empty file".to_string() } else { format!("the first line is not {MAGIC} VERSION") };
        return Err(FormatError::NotABackup(what).into());
    }
    let version = &line[prefix.len()..];
    let digits = version.strip_suffix(b"\n").unwrap_or(version);
    let parsed = std::str::from_utf8(digits)
        .ok()
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()) && (d.len() == 1 || !d.starts_with('0')))
        .and_then(|d| d.parse::<u32>().ok());
    match parsed {
        Some(v) if v != FORMAT_VERSION => Err(FormatError::UnknownVersion(v).into()),
        Some(_) if !full => Err(FormatError::CutShort { what: "the magic line".into() }.into()),
        Some(_) => Ok(()),
        None if !full => Err(FormatError::CutShort { what: "the magic line".into() }.into()),
        None => Err(FormatError::NotABackup("the format version is not a number".into()).into()),
    }
}

fn parse_header(line: &[u8]) -> Result<Header> {
    let body = &line[..line.len() - 1];
    let header: Header = serde_json::from_slice(body).map_err(|e| FormatError::Header(e.to_string()))?;
    if header.format != FORMAT_VERSION {
        return Err(FormatError::Header(format!(
            "format {} does not match the magic line's version {FORMAT_VERSION}",
            header.format
        ))
        .into());
    }
    if header.line().0 != line {
        return Err(FormatError::Header("not in canonical form: the line was edited".into()).into());
    }
    Ok(header)
}

fn parse_object(json: &[u8]) -> std::result::Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(json) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("not a JSON object".into()),
        Err(e) => Err(format!("not valid JSON: {e}")),
    }
}

/// Takes the fields out of one parsed line, naming the field in every error.
struct Fields {
    map: Map<String, Value>,
    record: u64,
}

impl Fields {
    fn err(&self, field: &str, detail: impl Into<String>) -> FormatError {
        FormatError::Field { record: self.record, field: field.into(), detail: detail.into() }
    }
    fn take(&mut self, field: &str) -> std::result::Result<Value, FormatError> {
        self.map.remove(field).ok_or_else(|| self.err(field, "missing"))
    }
    fn str(&mut self, field: &str) -> std::result::Result<String, FormatError> {
        match self.take(field)? {
            Value::String(s) => Ok(s),
            _ => Err(self.err(field, "not a string")),
        }
    }
    fn u64(&mut self, field: &str) -> std::result::Result<u64, FormatError> {
        match self.take(field)? {
            Value::Number(n) => n.as_u64().ok_or_else(|| self.err(field, "not an unsigned 64-bit integer")),
            _ => Err(self.err(field, "not a number")),
        }
    }
    fn hex(&mut self, field: &str) -> std::result::Result<Vec<u8>, FormatError> {
        let s = self.str(field)?;
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(self.err(field, "hex digits must be lowercase"));
        }
        hex::decode(&s).map_err(|e| self.err(field, format!("not hex: {e}")))
    }
    fn done(&self) -> std::result::Result<(), FormatError> {
        match self.map.keys().next() {
            Some(k) => Err(self.err(k, "unknown field")),
            None => Ok(()),
        }
    }
}

fn parse_record(record: u64, json: &[u8]) -> Result<(Record, Vec<u8>)> {
    let map = parse_object(json).map_err(|detail| FormatError::Record { record, detail })?;
    let mut f = Fields { map, record };
    let kind = f.str("kind")?;
    let kind = RecordKind::from_name(&kind)
        .ok_or_else(|| f.err("kind", format!("{kind:?} is neither \"stored\" nor \"hsm\"")))?;
    let parsed = Record {
        kind,
        id: f.str("id")?,
        token: f.str("token")?,
        group: f.str("group")?,
        class: f.u64("class")?,
        key_type: f.u64("key_type")?,
        label: f.hex("label")?,
        ckid: f.hex("ckid")?,
        attrs: f.hex("attrs")?,
        wrapped: f.hex("wrapped")?,
        wrap_mech: f.u64("wrap_mech")?,
        mbk: f.str("mbk")?,
    };
    let mac = f.hex("mac")?;
    f.done()?;
    Ok((parsed, mac))
}

/// HMAC-SHA256 computed on the host with a key the caller holds. For tests and tools that have no HSM; the
/// shim itself seals in the HSM, where the MAC key never leaves.
pub struct SoftwareSealer {
    key: Zeroizing<[u8; 64]>,
}

impl SoftwareSealer {
    pub fn new(key: &[u8]) -> Self {
        let mut block = Zeroizing::new([0u8; 64]);
        if key.len() > 64 {
            block[..32].copy_from_slice(&sha256(&[key]));
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        SoftwareSealer { key: block }
    }

    pub fn mac(&self, data: &[u8]) -> [u8; 32] {
        let pad = |b: u8| -> Zeroizing<[u8; 64]> { Zeroizing::new(self.key.map(|k| k ^ b)) };
        let inner = sha256(&[pad(0x36).as_slice(), data]);
        sha256(&[pad(0x5c).as_slice(), &inner])
    }
}

impl Sealer for SoftwareSealer {
    fn seal(&self, data: &[u8]) -> Result<Vec<u8>> {
        Ok(self.mac(data).to_vec())
    }
    fn check(&self, data: &[u8], mac: &[u8]) -> Result<bool> {
        let expected = self.mac(data);
        // Constant time in the content: a forger learns nothing from how long a comparison took.
        Ok(mac.len() == expected.len() && mac.iter().zip(expected.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const FP: &str = "0123abcd-4567ef01-89abcdef-00112233";

    fn sealer() -> SoftwareSealer {
        SoftwareSealer::new(b"the MBK set's MAC key, in a test")
    }

    fn header() -> Header {
        Header::new(FP, "2025-01-02T03:04:05Z", "host1:/var/lib/p11shim/keys.db", "Prod.*")
    }

    fn record(i: u64) -> Record {
        Record {
            kind: if i % 3 == 2 { RecordKind::Hsm } else { RecordKind::Stored },
            id: format!("{i:032x}"),
            token: "prod-db".into(),
            group: format!("ProdKey \"{}\" é", i % 7),
            class: 4,
            key_type: 0x1f,
            label: format!("key {i}").into_bytes(),
            ckid: i.to_be_bytes().to_vec(),
            attrs: (0..48).map(|b| (b as u8).wrapping_mul(i as u8 | 1)).collect(),
            wrapped: if i % 5 == 4 { vec![] } else { vec![0xA5 ^ i as u8; 40] },
            wrap_mech: 0x210A,
            mbk: FP.into(),
        }
    }

    fn write(path: &Path, n: u64) -> Summary {
        let mut w = BackupWriter::create(path, header()).unwrap();
        for i in 0..n {
            w.write(&record(i), &sealer()).unwrap();
        }
        w.finish(&sealer()).unwrap()
    }

    fn read_all(path: &Path, sealer: &dyn Sealer) -> Result<(Header, Vec<Record>)> {
        let mut r = BackupReader::open(path)?;
        let mut out = Vec::new();
        while let Some((n, rec)) = r.next_record(sealer)? {
            assert_eq!(n, out.len() as u64 + 1);
            out.push(rec);
        }
        Ok((r.header().clone(), out))
    }

    fn verify_err(path: &Path) -> String {
        match verify_file(path, &sealer()) {
            Ok(s) => panic!("{} verified: {s:?}", path.display()),
            Err(e) => e.to_string(),
        }
    }

    /// The file's lines, each with its '\n'.
    fn lines(path: &Path) -> Vec<Vec<u8>> {
        fs::read(path).unwrap().split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec).collect()
    }

    fn put(path: &Path, lines: &[Vec<u8>]) {
        replace(path, &lines.concat());
    }

    /// Removes before writing: ext4 flushes a file truncated and rewritten in place on close (auto_da_alloc),
    /// which costs milliseconds per case.
    fn replace(path: &Path, bytes: &[u8]) {
        let _ = fs::remove_file(path);
        fs::write(path, bytes).unwrap();
    }

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn software_sealer_is_hmac_sha256() {
        // RFC 4231 test cases 1, 2 and 6 (a key longer than the block).
        let cases: [(&[u8], &[u8], &str); 3] = [
            (&[0x0b; 20], b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
            (
                b"Jefe",
                b"what do ya want for nothing?",
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
            (
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First",
                "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
            ),
        ];
        for (key, data, mac) in cases {
            let s = SoftwareSealer::new(key);
            assert_eq!(hex::encode(s.mac(data)), mac);
            assert!(s.check(data, &hex::decode(mac).unwrap()).unwrap());
            assert!(!s.check(data, &[0; 32]).unwrap());
            assert!(!s.check(data, &[]).unwrap());
        }
    }

    #[test]
    fn round_trips_0_1_and_1000_records() {
        let dir = tempfile::tempdir().unwrap();
        for n in [0u64, 1, 1000] {
            let path = dir.path().join(format!("b{n}.p11b"));
            let written = write(&path, n);
            let (h, records) = read_all(&path, &sealer()).unwrap();
            assert_eq!(h, Header { count: n, ..header() });
            assert_eq!(records, (0..n).map(record).collect::<Vec<_>>());
            let verified = verify_file(&path, &sealer()).unwrap();
            assert_eq!(verified, written);
            assert_eq!(verified.records, n);
            assert_eq!(verified.stored + verified.hsm, n);
            assert_eq!(verified.bytes, fs::metadata(&path).unwrap().len());
        }
        assert_eq!(dir_entries(dir.path()), ["b0.p11b", "b1.p11b", "b1000.p11b"]);
    }

    #[test]
    fn the_file_is_text_one_item_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.p11b");
        write(&path, 2);
        let text = fs::read_to_string(&path).unwrap();
        let l: Vec<&str> = text.lines().collect();
        assert_eq!(l.len(), 5);
        assert_eq!(l[0], "P11SHIM-BACKUP 1");
        assert_eq!(
            l[1],
            format!(
                r#"{{"format":1,"mbk":"{FP}","time":"2025-01-02T03:04:05Z","source":"host1:/var/lib/p11shim/keys.db","filter":"Prod.*","count":2                   }}"#
            )
        );
        let h: serde_json::Value = serde_json::from_str(l[1]).unwrap();
        assert_eq!(h["count"], 2);
        let r: serde_json::Value = serde_json::from_str(l[2].strip_prefix("R ").unwrap()).unwrap();
        assert_eq!(r["kind"], "stored");
        assert_eq!(r["group"], "ProdKey \"0\" é");
        assert_eq!(r["label"], hex::encode("key 0"));
        assert_eq!(r["mac"].as_str().unwrap().len(), 64);
        assert_eq!(r["mac"], hex::encode(sealer().mac(&record(0).mac_input())));
        assert!(l[4].starts_with(r#"T {"count":2,"mac":""#), "{}", l[4]);
        assert!(text.ends_with("\"}\n"));
        for line in &l {
            eprintln!("{line}");
        }
    }

    #[test]
    fn record_mac_input_is_fixed() {
        let r = Record {
            kind: RecordKind::Hsm,
            id: "i".into(),
            token: "t".into(),
            group: "g".into(),
            class: 3,
            key_type: 0x1f,
            label: b"L".to_vec(),
            ckid: vec![],
            attrs: vec![9, 9],
            wrapped: vec![7],
            wrap_mech: 0x210a,
            mbk: "m".into(),
        };
        let mut expected = b"p11shim backup record v1\0\x02".to_vec();
        for (len, bytes) in [(1u32, &b"i"[..]), (1, b"t"), (1, b"g")] {
            expected.extend(len.to_be_bytes());
            expected.extend(bytes);
        }
        expected.extend(3u64.to_be_bytes());
        expected.extend(0x1fu64.to_be_bytes());
        for bytes in [&b"L"[..], &[], &[9, 9], &[7]] {
            expected.extend((bytes.len() as u32).to_be_bytes());
            expected.extend(bytes);
        }
        expected.extend(0x210au64.to_be_bytes());
        expected.extend(1u32.to_be_bytes());
        expected.extend(b"m");
        assert_eq!(r.mac_input(), expected);
        // Moving bytes from one field to the next changes the input (length prefixes).
        let shifted = Record { id: "it".into(), token: "".into(), ..r.clone() };
        assert_ne!(shifted.mac_input(), Record { token: "t".into(), ..r }.mac_input());
    }

    /// Where record 2's value of `field` starts in its line, and how long it is.
    fn value_span(line: &[u8], field: &str) -> (usize, usize) {
        let text = std::str::from_utf8(line).unwrap();
        let key = format!("\"{field}\":");
        let mut at = text.find(&key).unwrap() + key.len();
        let quoted = text.as_bytes()[at] == b'"';
        if quoted {
            at += 1;
        }
        let end = text[at..].find(if quoted { '"' } else { ',' }).unwrap() + at;
        (at, end - at)
    }

    #[test]
    fn a_changed_value_in_each_field_fails_that_records_mac() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.p11b");
        write(&path, 3);
        let original = lines(&path);
        let fields = [
            "id",
            "token",
            "group",
            "class",
            "key_type",
            "label",
            "ckid",
            "attrs",
            "wrapped",
            "wrap_mech",
            "mbk",
            "mac",
        ];
        for field in fields {
            let mut l = original.clone();
            let (at, len) = value_span(&l[3], field);
            assert!(len > 0, "{field}");
            // A different character of the same kind (digit for digit, hex for hex, letter for letter).
            let b = &mut l[3][at];
            *b = match *b {
                b'9' => b'8',
                b'0'..=b'8' => *b + 1,
                b'f' => b'e',
                b'a'..=b'e' => *b + 1,
                other => other ^ 1,
            };
            put(&path, &l);
            let err = verify_err(&path);
            assert!(err.starts_with("record 2 (id ") && err.contains("record MAC does not match"), "{field}: {err}");
        }
        // The kind, for the other kind.
        let mut l = original.clone();
        l[3] = String::from_utf8(l[3].clone()).unwrap().replace(r#""kind":"stored""#, r#""kind":"hsm""#).into_bytes();
        put(&path, &l);
        assert!(verify_err(&path).starts_with("record 2 (id 00000000000000000000000000000001): record MAC"));
        // A field the record does not have, or one missing.
        let mut l = original.clone();
        l[3] = String::from_utf8(l[3].clone()).unwrap().replace(r#""ckid":"#, r#""ckidx":"#).into_bytes();
        put(&path, &l);
        assert_eq!(verify_err(&path), "record 2: field `ckid`: missing");
        let mut l = original;
        l[3] = String::from_utf8(l[3].clone()).unwrap().replace(r#""class":4"#, r#""class":"4""#).into_bytes();
        put(&path, &l);
        assert_eq!(verify_err(&path), "record 2: field `class`: not a number");
    }

    #[test]
    fn every_changed_byte_anywhere_is_detected_and_located() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.p11b");
        write(&path, 3);
        let original = fs::read(&path).unwrap();
        let starts: Vec<usize> = std::iter::once(0)
            .chain(original.iter().enumerate().filter(|(_, &b)| b == b'\n').map(|(i, _)| i + 1))
            .collect();
        let mut tried = 0;
        for pos in 0..original.len() {
            let line = starts.iter().rposition(|&s| s <= pos).unwrap();
            let b = original[pos];
            for with in [b ^ 0x01, b ^ 0x20, b'0', b'a', b'"', b'\n', b' ', b'\\', 0x80] {
                if with == b {
                    continue;
                }
                let mut bytes = original.clone();
                bytes[pos] = with;
                replace(&path, &bytes);
                let err = verify_err(&path);
                tried += 1;
                // Records are lines 2..=4 (0-based); a change in record k names record k, except when the leading
                // R becomes a T and the line reads as a (bad) trailer.
                if (2..=4).contains(&line) && !(pos == starts[line] && with == b'T') {
                    let k = line - 1;
                    assert!(
                        err.starts_with(&format!("record {k}")) || err.contains(&format!("record {k} is cut short")),
                        "byte {pos} (line {line}) {b:#x} -> {with:#x}: {err}"
                    );
                }
            }
        }
        assert!(tried > 10_000, "{tried}");
    }

    #[test]
    fn truncation_anywhere_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.p11b");
        write(&path, 3);
        let original = fs::read(&path).unwrap();
        for cut in 0..original.len() {
            replace(&path, &original[..cut]);
            let err = verify_err(&path);
            let at_boundary = cut > 0 && original[cut - 1] == b'\n';
            let newlines = original[..cut].iter().filter(|&&b| b == b'\n').count();
            if at_boundary && newlines >= 2 {
                assert_eq!(err, format!("truncated: no trailer after record {}", newlines - 2), "cut at {cut}");
            } else if !at_boundary && (3..=5).contains(&newlines) {
                assert!(
                    err == format!("truncated: record {} is cut short", newlines - 1)
                        || err.starts_with("truncated: the trailer (after record 3) is cut short"),
                    "cut at {cut}: {err}"
                );
            } else {
                assert!(
                    err.contains("truncated") || err.contains("cut short") || err.starts_with("not a p11shim backup"),
                    "cut at {cut}: {err}"
                );
            }
        }
        // Cut within the header line and right after the magic line.
        replace(&path, &original[..40]);
        assert_eq!(verify_err(&path), "truncated: the header is cut short");
        replace(&path, &original[..0]);
        assert_eq!(verify_err(&path), "not a p11shim backup (empty file)");
        replace(&path, &original[..5]);
        assert_eq!(verify_err(&path), "truncated: the magic line is cut short");
    }

    /// Rewrites the count in the header (keeping its width) and in the trailer, as a careful forger would.
    fn fix_counts(l: &mut [Vec<u8>], count: u64) {
        let header = String::from_utf8(l[1].clone()).unwrap();
        let at = header.find("\"count\":").unwrap() + 8;
        l[1] = format!("{}{}}}\n", &header[..at], count_field(count)).into_bytes();
        let last = l.len() - 1;
        let trailer = String::from_utf8(l[last].clone()).unwrap();
        let mac = trailer.split("\"mac\":").nth(1).unwrap();
        l[last] = format!("T {{\"count\":{count},\"mac\":{mac}").into_bytes();
    }

    #[test]
    fn reordered_removed_duplicated_or_inserted_records_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.p11b");
        write(&path, 3);
        let original = lines(&path);

        let mut l = original.clone();
        l.swap(2, 3);
        put(&path, &l);
        assert_eq!(verify_err(&path), "trailer MAC: records removed, reordered or the header edited");
        // The records themselves still check alone.
        let mut r = BackupReader::open(&path).unwrap();
        assert_eq!(r.next_record(&sealer()).unwrap().unwrap().1, record(1));

        let mut l = original.clone();
        l.remove(3);
        put(&path, &l);
        assert_eq!(
            verify_err(&path),
            "record count: the header says 3, the trailer says 3, the file holds 2: records removed or added"
        );
        fix_counts(&mut l, 2);
        put(&path, &l);
        assert_eq!(verify_err(&path), "trailer MAC: records removed, reordered or the header edited");

        let mut l = original.clone();
        l.insert(4, l[3].clone());
        put(&path, &l);
        assert_eq!(verify_err(&path), "record 4: the header announces only 3 records");
        fix_counts(&mut l, 4);
        put(&path, &l);
        assert_eq!(verify_err(&path), "trailer MAC: records removed, reordered or the header edited");

        // A valid record of another backup made with the same key.
        let other = dir.path().join("other.p11b");
        let mut w = BackupWriter::create(&other, header()).unwrap();
        w.write(&record(99), &sealer()).unwrap();
        w.finish(&sealer()).unwrap();
        let mut l = original.clone();
        l.insert(3, lines(&other)[2].clone());
        fix_counts(&mut l, 4);
        put(&path, &l);
        assert_eq!(verify_err(&path), "trailer MAC: records removed, reordered or the header edited");

        // The last record dropped and the trailer taken from a shorter backup of the same keys made at another
        // time. (With the same header too, the result would be byte for byte that backup: nothing to detect.)
        let two = dir.path().join("two.p11b");
        let mut w = BackupWriter::create(&two, Header { time: "2025-01-02T03:04:06Z".into(), ..header() }).unwrap();
        w.write(&record(0), &sealer()).unwrap();
        w.write(&record(1), &sealer()).unwrap();
        w.finish(&sealer()).unwrap();
        let mut l = original.clone();
        l.truncate(4);
        l.push(lines(&two)[4].clone());
        fix_counts(&mut l, 2);
        put(&path, &l);
        assert_eq!(verify_err(&path), "trailer MAC: records removed, reordered or the header edited");

        // A header edited consistently (still canonical JSON).
        let mut l = original.clone();
        l[1] = String::from_utf8(l[1].clone()).unwrap().replace("Prod.*", "Test.*").into_bytes();
        put(&path, &l);
        assert_eq!(verify_err(&path), "trailer MAC: records removed, reordered or the header edited");

        // Anything after the trailer.
        let mut l = original;
        l.push(b"\n".to_vec());
        put(&path, &l);
        assert_eq!(verify_err(&path), "data after the trailer");
    }

    #[test]
    fn unknown_versions_and_other_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.p11b");
        write(&path, 1);
        let mut l = lines(&path);
        l[0] = b"P11SHIM-BACKUP 2\n".to_vec();
        put(&path, &l);
        assert_eq!(verify_err(&path), "unknown format version 2 (this p11shim reads version 1)");
        // Later versions may change everything after the magic line.
        replace(&path, b"P11SHIM-BACKUP 17\n\x00\x01 whatever");
        assert_eq!(verify_err(&path), "unknown format version 17 (this p11shim reads version 1)");
        for (content, why) in [
            (&b"hello\n"[..], "not a p11shim backup (the first line is not P11SHIM-BACKUP VERSION)"),
            (
                b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x03\x00",
                "not a p11shim backup (the first line is not P11SHIM-BACKUP VERSION)",
            ),
            (b"P11SHIM-BACKUP x\n{}\n", "not a p11shim backup (the format version is not a number)"),
            (b"P11SHIM-BACKUP 01\n{}\n", "not a p11shim backup (the format version is not a number)"),
        ] {
            replace(&path, content);
            assert_eq!(verify_err(&path), why);
        }
        // The header's own format field must agree with the magic line.
        write(&dir.path().join("c.p11b"), 1);
        let mut l = lines(&dir.path().join("c.p11b"));
        l[1] = String::from_utf8(l[1].clone()).unwrap().replace("\"format\":1", "\"format\":2").into_bytes();
        put(&path, &l);
        assert_eq!(verify_err(&path), "header: format 2 does not match the magic line's version 1");
        assert!(BackupWriter::create(&dir.path().join("v2"), Header { format: 2, ..header() }).is_err());
    }

    #[test]
    fn another_mac_key_fails_the_first_record_or_the_trailer() {
        let dir = tempfile::tempdir().unwrap();
        let other = SoftwareSealer::new(b"another HSM's MAC key");
        let path = dir.path().join("b.p11b");
        write(&path, 2);
        assert_eq!(
            verify_file(&path, &other).unwrap_err().to_string(),
            "record 1 (id 00000000000000000000000000000000): record MAC does not match: the record was altered, or sealed with another MBK set's MAC key"
        );
        let empty = dir.path().join("empty.p11b");
        write(&empty, 0);
        assert_eq!(
            verify_file(&empty, &other).unwrap_err().to_string(),
            "trailer MAC: records removed, reordered or the header edited"
        );
    }

    #[test]
    fn a_reader_stops_at_the_first_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.p11b");
        write(&path, 3);
        let mut l = lines(&path);
        l[3][5] ^= 1;
        put(&path, &l);
        let mut r = BackupReader::open(&path).unwrap();
        assert!(r.next_record(&sealer()).unwrap().is_some());
        assert!(r.next_record(&sealer()).is_err());
        assert!(r.next_record(&sealer()).is_err());
        assert!(r.summary().is_none());

        write(&dir.path().join("ok.p11b"), 1);
        let mut r = BackupReader::open(&dir.path().join("ok.p11b")).unwrap();
        assert!(r.summary().is_none());
        assert!(r.next_record(&sealer()).unwrap().is_some());
        assert!(r.next_record(&sealer()).unwrap().is_none());
        assert!(r.next_record(&sealer()).unwrap().is_none());
        assert_eq!(r.summary().unwrap().records, 1);
    }

    #[test]
    fn a_writer_dropped_unfinished_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.p11b");
        let mut w = BackupWriter::create(&path, header()).unwrap();
        for i in 0..100 {
            w.write(&record(i), &sealer()).unwrap();
        }
        let tmp = w.temp_path().to_path_buf();
        assert_eq!(tmp.file_name().unwrap().to_string_lossy(), format!(".b.p11b.tmp-{}", std::process::id()));
        assert!(tmp.exists() && !path.exists());
        assert_eq!(fs::metadata(&tmp).unwrap().permissions().mode() & 0o777, 0o600);
        drop(w);
        assert_eq!(dir_entries(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn finish_refuses_an_existing_file_unless_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.p11b");
        replace(&path, b"precious");
        assert!(BackupWriter::create(&path, header()).unwrap_err().to_string().contains("refusing to replace it"));

        // The file appears while the backup is being written.
        fs::remove_file(&path).unwrap();
        let mut w = BackupWriter::create(&path, header()).unwrap();
        w.write(&record(0), &sealer()).unwrap();
        replace(&path, b"precious");
        let err = w.finish(&sealer()).unwrap_err().to_string();
        assert!(err.ends_with("b.p11b exists; refusing to replace it (overwrite not requested)"), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "precious");
        assert_eq!(dir_entries(dir.path()), ["b.p11b"]);

        let mut w = BackupWriter::create_with(&path, header(), true).unwrap();
        w.write(&record(0), &sealer()).unwrap();
        w.finish(&sealer()).unwrap();
        assert_eq!(read_all(&path, &sealer()).unwrap().1, [record(0)]);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(dir_entries(dir.path()), ["b.p11b"]);
    }

    struct FailingSealer;
    impl Sealer for FailingSealer {
        fn seal(&self, _: &[u8]) -> Result<Vec<u8>> {
            Err(Error::Rv(cryptoki_sys::CKR_USER_NOT_LOGGED_IN))
        }
        fn check(&self, _: &[u8], _: &[u8]) -> Result<bool> {
            Err(Error::Rv(cryptoki_sys::CKR_USER_NOT_LOGGED_IN))
        }
    }

    #[test]
    fn sealer_errors_pass_through_unchanged_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.p11b");
        let mut w = BackupWriter::create(&path, header()).unwrap();
        let err = w.write(&record(0), &FailingSealer).unwrap_err();
        assert_eq!(err.rv(), cryptoki_sys::CKR_USER_NOT_LOGGED_IN);
        w.write(&record(0), &sealer()).unwrap();
        assert_eq!(w.finish(&FailingSealer).unwrap_err().rv(), cryptoki_sys::CKR_USER_NOT_LOGGED_IN);
        assert_eq!(dir_entries(dir.path()), Vec::<String>::new());
        write(&path, 1);
        assert_eq!(verify_file(&path, &FailingSealer).unwrap_err().rv(), cryptoki_sys::CKR_USER_NOT_LOGGED_IN);
    }

    #[test]
    fn debug_hides_the_wrapped_secret() {
        let text = format!("{:?}", record(1));
        assert!(text.contains("wrapped: 40 bytes"), "{text}");
        assert!(!text.contains(&hex::encode(&record(1).wrapped)));
    }
}
