//! Writing a backup: a private temporary file next to the target, records streamed into it, and the target
//! appearing only when the file is complete.

use super::record::{
    chunks_of, line, sha256, trailer_mac_input, ChunkLine, HeaderLine, HexRef, RecordLine, TrailerLine,
};
use super::{sealed, FormatError, FormatResult, Header, Record, RecordKind, Sealer, Summary, FORMAT_VERSION};
use super::{MAGIC, MAX_FIELD, MAX_LINE};
use crate::files;
use serde::Serialize;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// A temporary file of an earlier writer for the same target whose process no longer runs (it was killed):
/// it holds wrapped keys and is never a backup. The writer removes it and says so, so that the operator
/// hears of the interrupted backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Leftover {
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// The pid in its name (no longer running).
    pub pid: u32,
    /// Whether it was removed (else why not).
    pub removed: std::result::Result<(), String>,
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} bytes) was left by an interrupted backup (pid {}, no longer running)",
            self.path.display(),
            self.bytes,
            self.pid
        )?;
        match &self.removed {
            Ok(()) => write!(f, "; removed"),
            Err(why) => write!(f, "; it could not be removed: {why}"),
        }
    }
}

/// Streams records into a temporary file next to the target; the target appears only when [`finish`] succeeds.
///
/// [`finish`]: BackupWriter::finish
pub struct BackupWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    header: Header,
    head_digest: [u8; 32],
    chain: [u8; 32],
    count: u64,
    stored: u64,
    hsm: u64,
    bytes: u64,
    overwrite: bool,
    leftovers: Vec<Leftover>,
    done: bool,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FormatError + '_ {
    move |source| FormatError::Io { path: path.to_path_buf(), source }
}

fn output_err(path: &Path) -> impl FnOnce(io::Error) -> FormatError + '_ {
    move |source| FormatError::Output { path: path.to_path_buf(), source }
}

impl BackupWriter {
    /// Starts a backup that will refuse to replace an existing file.
    pub fn create(path: &Path, header: Header) -> FormatResult<BackupWriter> {
        Self::create_with(path, header, false)
    }

    /// Starts a backup; `overwrite` lets [`finish`](BackupWriter::finish) replace an existing regular file
    /// (never a directory, device node, FIFO, socket or symbolic link).
    pub fn create_with(path: &Path, mut header: Header, overwrite: bool) -> FormatResult<BackupWriter> {
        if header.format != FORMAT_VERSION {
            return Err(FormatError::Invalid(format!(
                "cannot write format version {} (this p11shim writes version {FORMAT_VERSION})",
                header.format
            )));
        }
        files::check_output_target(path, overwrite).map_err(output_err(path))?;
        let name = path
            .file_name()
            .ok_or_else(|| FormatError::Invalid(format!("{}: not a file name", path.display())))?
            .to_string_lossy()
            .into_owned();
        let dir = parent_dir(path);
        let leftovers = remove_abandoned_temps(&dir, &name);
        let (tmp, file) = create_temp(&dir, &name)?;
        header.count = 0;
        let head = [format!("{MAGIC} {FORMAT_VERSION}\n").into_bytes(), line("", &HeaderLine::of(&header))].concat();
        let mut writer = BackupWriter {
            path: path.to_path_buf(),
            tmp,
            out: Some(BufWriter::with_capacity(1 << 16, file)),
            header,
            head_digest: sha256(&[&head]),
            bytes: head.len() as u64,
            chain: [0; 32],
            count: 0,
            stored: 0,
            hsm: 0,
            overwrite,
            leftovers,
            done: false,
        };
        let out = writer.out.as_mut().expect("open");
        out.write_all(&head).map_err(io_err(&writer.tmp))?;
        Ok(writer)
    }

    /// Seals and appends one record: its line, then the chunk lines of its long fields.
    pub fn write(&mut self, record: &Record, sealer: &dyn Sealer) -> FormatResult<()> {
        let record_no = self.count + 1;
        let too_large = |detail: String| FormatError::TooLarge { record: record_no, id: record.id.clone(), detail };
        for (name, b) in
            [("label", &record.label), ("ckid", &record.ckid), ("attrs", &record.attrs), ("wrapped", &record.wrapped)]
        {
            if b.len() as u64 > MAX_FIELD {
                return Err(too_large(format!(
                    "{name} has {} bytes; a backup holds at most {MAX_FIELD} per field",
                    b.len()
                )));
            }
        }
        let mac = sealer.seal(&record.mac_input()).map_err(sealed)?;
        if mac.is_empty() {
            return Err(FormatError::Invalid(format!(
                "record {record_no} (id {}): the sealer returned an empty MAC",
                record.id
            )));
        }
        let head = line("R ", &RecordLine::of(record, &mac, FORMAT_VERSION));
        if head.len() > MAX_LINE {
            return Err(too_large(format!(
                "{} bytes as a record line (its names); at most {MAX_LINE} fit",
                head.len()
            )));
        }
        let out = self.out.as_mut().expect("a writer is open until finished");
        out.write_all(&head).map_err(io_err(&self.tmp))?;
        self.bytes += head.len() as u64;
        for (n, field, data) in chunks_of(record, FORMAT_VERSION) {
            let chunk = line("C ", &ChunkLine { n, field: field.into(), data: HexRef::Borrowed(data) });
            out.write_all(&chunk).map_err(io_err(&self.tmp))?;
            self.bytes += chunk.len() as u64;
        }
        self.chain = sha256(&[&self.chain, &mac]);
        self.count = record_no;
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

    /// Temporary files of killed writers for the same target that [`create`](BackupWriter::create) found
    /// (and removed, unless it could not): the command warns about each.
    pub fn leftovers(&self) -> &[Leftover] {
        &self.leftovers
    }

    /// Writes the trailer, fsyncs, and puts the file under its name (then fsyncs the directory). Refuses to
    /// replace an existing file unless the writer was created with `overwrite`, and never replaces anything
    /// but a regular file.
    pub fn finish(mut self, sealer: &dyn Sealer) -> FormatResult<Summary> {
        let mut out = self.out.take().expect("a writer is open until finished");
        // From here an error drops `out` and then `self`, whose Drop removes the temporary file.
        let mac = sealer
            .seal(&trailer_mac_input(FORMAT_VERSION, &self.head_digest, &self.chain, self.count))
            .map_err(sealed)?;
        let trailer = line("T ", &TrailerLine { count: self.count, mac: super::record::Hex(mac) });
        out.write_all(&trailer).map_err(io_err(&self.tmp))?;
        let file = out.into_inner().map_err(|e| io_err(&self.tmp)(e.into_error()))?;
        file.sync_all().map_err(io_err(&self.tmp))?;
        drop(file);
        self.bytes += trailer.len() as u64;
        self.header.count = self.count;

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
    /// With overwrite, what is there now is checked again: a regular file, or nothing.
    fn publish(&self) -> FormatResult<()> {
        if self.overwrite {
            files::check_output_target(&self.path, true).map_err(output_err(&self.path))?;
            fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
        } else {
            let exists = || {
                output_err(&self.path)(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "exists; refusing to replace it (overwrite not requested)",
                ))
            };
            match fs::hard_link(&self.tmp, &self.path) {
                Ok(()) => fs::remove_file(&self.tmp).map_err(io_err(&self.tmp))?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(exists()),
                Err(_) => {
                    if fs::symlink_metadata(&self.path).is_ok() {
                        return Err(exists());
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

pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Finds the `.NAME.tmp-PID…` files in `dir` left by writers that were killed (their PID no longer runs),
/// removes them (they hold wrapped keys and are never a backup) and says what it found. Only regular files
/// are touched; a file that cannot be removed is reported as such.
pub(crate) fn remove_abandoned_temps(dir: &Path, name: &str) -> Vec<Leftover> {
    let prefix = format!(".{name}.tmp-");
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else { return found };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&prefix) else { continue };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(pid) = pid.parse::<u32>() else { continue };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        let Ok(meta) = fs::symlink_metadata(entry.path()) else { continue };
        if alive || !meta.file_type().is_file() {
            continue;
        }
        let removed = fs::remove_file(entry.path()).map_err(|e| e.to_string());
        found.push(Leftover { path: entry.path(), bytes: meta.len(), pid, removed });
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// `.NAME.tmp-PID` (mode 0600, never through a link) in `dir`; a suffix is added if that name is taken
/// (another writer of this process for the same target, or the leftover of a killed process that had the
/// same pid).
pub(crate) fn create_temp(dir: &Path, name: &str) -> FormatResult<(PathBuf, File)> {
    let base = format!(".{name}.tmp-{}", std::process::id());
    for n in 0..1000 {
        let tmp = dir.join(if n == 0 { base.clone() } else { format!("{base}-{n}") });
        match files::create_new_private(&tmp) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(&tmp)(e)),
        }
    }
    Err(FormatError::Invalid(format!("{}: no free temporary name for {base}", dir.display())))
}
