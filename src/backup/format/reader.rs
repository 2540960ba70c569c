//! Reading a backup as a stream, format 1 or 2: every record's MAC is checked as it is read, the trailer at
//! the end. Memory: one record and one line.

use super::record::{
    line, parse_record_line, sha256, trailer_mac_input, Bytes, ChunkLine, HeaderLine, HeaderLineV1, HexRef, RecordLine,
    TrailerLine, BYTE_FIELDS, COUNT_WIDTH,
};
use super::{sealed, FormatError, FormatResult, Header, Record, RecordKind, Sealer, Summary};
use super::{CHUNK, FORMAT_VERSION, MAGIC, MAX_FIELD, MAX_LINE, OLDEST_READ};
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

const MAX_MAGIC_LINE: u64 = 64;

/// Reads a backup as a stream, checking every record's MAC as it goes and the trailer at the end.
pub struct BackupReader {
    path: PathBuf,
    input: BufReader<File>,
    version: u32,
    header: Header,
    head_digest: [u8; 32],
    chain: [u8; 32],
    count: u64,
    stored: u64,
    hsm: u64,
    bytes: u64,
    line: Vec<u8>,
    chunk: Vec<u8>,
    state: ReadState,
}

impl fmt::Debug for BackupReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackupReader")
            .field("path", &self.path)
            .field("version", &self.version)
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

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FormatError + '_ {
    move |source| FormatError::Io { path: path.to_path_buf(), source }
}

impl BackupReader {
    /// Opens a backup and reads its magic line and header.
    pub fn open(path: &Path) -> FormatResult<BackupReader> {
        let file = File::open(path).map_err(io_err(path))?;
        let mut input = BufReader::with_capacity(1 << 16, file);
        let mut magic = Vec::new();
        let got = read_line(&mut input, &mut magic, MAX_MAGIC_LINE).map_err(io_err(path))?;
        let version = check_magic(&magic, &got)?;
        let mut line = Vec::new();
        match read_line(&mut input, &mut line, MAX_LINE as u64).map_err(io_err(path))? {
            Line::Full => {}
            Line::Eof => return Err(FormatError::CutShort { what: "the header".into() }),
            Line::Partial => {
                let what = if line.len() >= MAX_LINE { "the header (too long)" } else { "the header" };
                return Err(FormatError::CutShort { what: what.into() });
            }
        }
        let header = parse_header(&line, version)?;
        let head_digest = sha256(&[&magic, &line]);
        Ok(BackupReader {
            path: path.to_path_buf(),
            input,
            version,
            header,
            head_digest,
            chain: [0; 32],
            count: 0,
            stored: 0,
            hsm: 0,
            bytes: (magic.len() + line.len()) as u64,
            line,
            chunk: Vec::new(),
            state: ReadState::Records,
        })
    }

    /// The header. A format 2 header's count is 0 until the trailer has been read (see [`Header::count`]).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The file's format version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The next record, its MAC checked, with its 1-based number; `None` once the trailer has been read and
    /// checked. After an error every later call fails too.
    pub fn next_record(&mut self, sealer: &dyn Sealer) -> FormatResult<Option<(u64, Record)>> {
        match self.state {
            ReadState::Verified => return Ok(None),
            ReadState::Failed => return Err(FormatError::Stopped { path: self.path.clone(), after: self.count }),
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

    fn step(&mut self, sealer: &dyn Sealer) -> FormatResult<Option<(u64, Record)>> {
        let mut line = std::mem::take(&mut self.line);
        let got = read_line(&mut self.input, &mut line, MAX_LINE as u64 + 1).map_err(io_err(&self.path));
        let result = got.and_then(|got| self.take_line(&line, got, sealer));
        // Keep the buffer for the next line, unless a long record made it big.
        if line.capacity() <= 4 * CHUNK {
            self.line = line;
        }
        result
    }

    fn take_line(&mut self, line: &[u8], got: Line, sealer: &dyn Sealer) -> FormatResult<Option<(u64, Record)>> {
        let next = self.count + 1;
        match got {
            Line::Eof => return Err(FormatError::NoTrailer { after: self.count }),
            Line::Partial if line.len() > MAX_LINE => {
                return Err(FormatError::Record { record: next, detail: format!("longer than {MAX_LINE} bytes") })
            }
            Line::Partial if line.starts_with(b"T ") => {
                return Err(FormatError::CutShort { what: format!("the trailer (after record {})", self.count) })
            }
            Line::Partial => return Err(FormatError::CutShort { what: format!("record {next}") }),
            Line::Full => {}
        }
        self.bytes += line.len() as u64;
        let body = &line[..line.len() - 1];
        if let Some(json) = body.strip_prefix(b"T ") {
            self.check_trailer(json, line, sealer)?;
            let mut rest = [0u8; 1];
            if self.input.read(&mut rest).map_err(io_err(&self.path))? != 0 {
                return Err(FormatError::AfterTrailer);
            }
            self.header.count = self.count;
            return Ok(None);
        }
        let Some(json) = body.strip_prefix(b"R ") else {
            let detail = if body.starts_with(b"C ") {
                "a chunk line where a record (R) or the trailer (T) line was expected".into()
            } else {
                "neither a record (R) nor the trailer (T) line".into()
            };
            return Err(FormatError::Record { record: next, detail });
        };
        if self.version == 1 && next > self.header.count {
            return Err(FormatError::TooManyRecords { record: next, count: self.header.count });
        }
        let parsed = parse_record_line(next, json, self.version)?;
        let chunked: Vec<(&'static str, u64)> = BYTE_FIELDS
            .iter()
            .zip([&parsed.label, &parsed.ckid, &parsed.attrs, &parsed.wrapped])
            .filter_map(|(name, b)| match b {
                Bytes::Chunked { chunked } => Some((*name, *chunked)),
                Bytes::Inline(_) => None,
            })
            .collect();
        let (mut record, mac) = Record::from_line(parsed);
        self.read_chunks(next, &mut record, &chunked)?;
        if !sealer.check(&record.mac_input_of(self.version), &mac).map_err(sealed)? {
            return Err(FormatError::RecordMac { record: next, id: record.id });
        }
        if !self.canonical(&record, &mac, line) {
            return Err(FormatError::NotCanonical { record: next, id: record.id });
        }
        self.chain = sha256(&[&self.chain, &mac]);
        self.count = next;
        match record.kind {
            RecordKind::Stored => self.stored += 1,
            RecordKind::Hsm => self.hsm += 1,
        }
        Ok(Some((next, record)))
    }

    /// Whether `line` is exactly what the writer of this version writes for the record.
    fn canonical(&self, record: &Record, mac: &[u8], line: &[u8]) -> bool {
        self::line("R ", &RecordLine::of(record, mac, self.version)) == line
    }

    /// Reads the chunk lines of the record's chunked fields (in field order), into the record.
    fn read_chunks(
        &mut self,
        record_no: u64,
        record: &mut Record,
        chunked: &[(&'static str, u64)],
    ) -> FormatResult<()> {
        let mut n = 0u64;
        for &(field, len) in chunked {
            if len > MAX_FIELD {
                return Err(FormatError::Record {
                    record: record_no,
                    detail: format!("field `{field}`: {len} bytes announced; a backup holds at most {MAX_FIELD}"),
                });
            }
            if len as usize <= super::INLINE_MAX {
                // The writer writes such a field inline.
                return Err(FormatError::NotCanonical { record: record_no, id: record.id.clone() });
            }
            let target = record.field_mut(field).expect("a byte field");
            target.reserve_exact((len as usize).min(64 << 20));
            while (target.len() as u64) < len {
                n += 1;
                let mut buf = std::mem::take(&mut self.chunk);
                let got = read_line(&mut self.input, &mut buf, MAX_LINE as u64 + 1).map_err(io_err(&self.path));
                let result = got.and_then(|got| {
                    let want = (len - target.len() as u64).min(CHUNK as u64) as usize;
                    take_chunk(record_no, n, field, want, &buf, got).map(|data| {
                        target.extend_from_slice(&data);
                        buf.len() as u64
                    })
                });
                if buf.capacity() <= 4 * CHUNK {
                    self.chunk = buf;
                }
                self.bytes += result?;
            }
        }
        Ok(())
    }

    fn check_trailer(&self, json: &[u8], line: &[u8], sealer: &dyn Sealer) -> FormatResult<()> {
        let after = self.count;
        let bad = |detail: String| FormatError::Trailer { after, detail };
        let t: TrailerLine = serde_json::from_slice(json).map_err(|e| bad(format!("not a valid trailer: {e}")))?;
        if self::line("T ", &t) != line {
            return Err(bad("not in canonical form: the line was edited".into()));
        }
        if self.version == 1 {
            if t.count != self.count || t.count != self.header.count {
                return Err(FormatError::CountMismatch {
                    header: self.header.count,
                    trailer: t.count,
                    records: self.count,
                });
            }
        } else if t.count != self.count {
            return Err(FormatError::TrailerCount { trailer: t.count, records: self.count });
        }
        let input = trailer_mac_input(self.version, &self.head_digest, &self.chain, t.count);
        if !sealer.check(&input, &t.mac.0).map_err(sealed)? {
            return Err(FormatError::TrailerMac);
        }
        Ok(())
    }
}

/// One chunk line: the `n`th of the record, of `field`, holding `want` bytes (all the rest of the field, or
/// a full [`CHUNK`]).
fn take_chunk(record: u64, n: u64, field: &str, want: usize, line: &[u8], got: Line) -> FormatResult<Vec<u8>> {
    let err = |detail: String| FormatError::Chunk { record, chunk: n, detail };
    match got {
        Line::Eof => return Err(FormatError::CutShort { what: format!("record {record} (chunk {n} is missing)") }),
        Line::Partial if line.len() > MAX_LINE => return Err(err(format!("longer than {MAX_LINE} bytes"))),
        Line::Partial => return Err(FormatError::CutShort { what: format!("record {record} (in chunk {n})") }),
        Line::Full => {}
    }
    let body = &line[..line.len() - 1];
    let Some(json) = body.strip_prefix(b"C ") else {
        return Err(err(format!("missing: the record's `{field}` continues in chunk lines, and this line is not one")));
    };
    let c: ChunkLine<'_> = serde_json::from_slice(json).map_err(|e| err(format!("not a valid chunk line: {e}")))?;
    if c.n != n || c.field != field {
        return Err(err(format!(
            "chunk {} of `{}` where chunk {n} of `{field}` was expected: chunks removed, reordered or duplicated",
            c.n, c.field
        )));
    }
    if c.data.bytes().len() != want {
        return Err(err(format!(
            "{} bytes where {want} were expected: chunks removed, cut or joined",
            c.data.bytes().len()
        )));
    }
    if line_of_chunk(&c) != line {
        return Err(err("not in canonical form: the line was edited".into()));
    }
    Ok(match c.data {
        HexRef::Owned(v) => v,
        HexRef::Borrowed(v) => v.to_vec(),
    })
}

fn line_of_chunk(c: &ChunkLine<'_>) -> Vec<u8> {
    line("C ", c)
}

/// Reads the whole file and checks everything the file alone can prove: every record MAC, the count, the
/// trailer MAC.
pub fn verify_file(path: &Path, sealer: &dyn Sealer) -> FormatResult<Summary> {
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

/// The version the magic line names, if this p11shim reads it.
fn check_magic(line: &[u8], got: &Line) -> FormatResult<u32> {
    let prefix = format!("{MAGIC} ");
    let full = matches!(got, Line::Full);
    if !line.starts_with(prefix.as_bytes()) {
        if !full && !line.is_empty() && prefix.as_bytes().starts_with(line) {
            return Err(FormatError::CutShort { what: "the magic line".into() });
        }
        if line.starts_with(b"P11SHIM-DB-BACKUP ") {
            return Err(FormatError::NotABackup(
                "it is a whole-store backup (written by `p11shim db backup`): restore it with `p11shim db restore`; \
                 `verify` and `restore` read per-group backups"
                    .into(),
            ));
        }
        let what =
            if line.is_empty() { "empty file".to_string() } else { format!("the first line is not {MAGIC} VERSION") };
        return Err(FormatError::NotABackup(what));
    }
    let version = &line[prefix.len()..];
    let digits = version.strip_suffix(b"\n").unwrap_or(version);
    let parsed = std::str::from_utf8(digits)
        .ok()
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()) && (d.len() == 1 || !d.starts_with('0')))
        .and_then(|d| d.parse::<u32>().ok());
    match parsed {
        Some(v) if !(OLDEST_READ..=FORMAT_VERSION).contains(&v) => Err(FormatError::UnknownVersion(v)),
        Some(_) if !full => Err(FormatError::CutShort { what: "the magic line".into() }),
        Some(v) => Ok(v),
        None if !full => Err(FormatError::CutShort { what: "the magic line".into() }),
        None if digits.ends_with(b"\r") => Err(FormatError::NotABackup(
            "its lines end with CR LF: a text transfer converted it; copy backups as binary files (if only the line \
             ends changed, `sed -i 's/\\r$//' FILE` gives back the original, which its MACs then confirm)"
                .into(),
        )),
        None => Err(FormatError::NotABackup("the format version is not a number".into())),
    }
}

fn parse_header(line: &[u8], version: u32) -> FormatResult<Header> {
    let body = &line[..line.len() - 1];
    let bad = |e: serde_json::Error| FormatError::Header(e.to_string());
    let edited = || FormatError::Header("not in canonical form: the line was edited".into());
    let mismatch =
        |format: u32| FormatError::Header(format!("format {format} does not match the magic line's version {version}"));
    if version == 1 {
        let h: HeaderLineV1 = serde_json::from_slice(body).map_err(bad)?;
        if h.format != version {
            return Err(mismatch(h.format));
        }
        // The writer padded the count to a fixed width: the line is the compact JSON with spaces before
        // the closing brace.
        let compact = super::record::line("", &h);
        let pad = COUNT_WIDTH.saturating_sub(h.count.to_string().len());
        let at = compact.len() - 2;
        let expected = [&compact[..at], &vec![b' '; pad][..], &compact[at..]].concat();
        if expected != line {
            return Err(edited());
        }
        return Ok(Header {
            format: h.format,
            mbk: h.mbk,
            time: h.time,
            source: h.source,
            filter: h.filter,
            count: h.count,
            seal: None,
        });
    }
    let h: HeaderLine<'_> = serde_json::from_slice(body).map_err(bad)?;
    if h.format != version {
        return Err(mismatch(h.format));
    }
    if super::record::line("", &h) != line {
        return Err(edited());
    }
    let seal = match (h.mbk_kind.as_deref(), h.seal.as_deref()) {
        (None, None) => None,
        (Some(super::record::DEVICE_KIND), Some(seal)) => {
            Some(hex::decode(seal).map_err(|e| FormatError::Header(format!("the seal key blob is not hex: {e}")))?)
        }
        (Some(kind), _) if kind != super::record::DEVICE_KIND => {
            return Err(FormatError::Header(format!("unknown MBK kind {kind:?} (written by a newer p11shim?)")))
        }
        _ => return Err(FormatError::Header("mbk_kind \"device\" and the seal key blob go together".into())),
    };
    Ok(Header {
        format: h.format,
        mbk: h.mbk.into_owned(),
        time: h.time.into_owned(),
        source: h.source.into_owned(),
        filter: h.filter.into_owned(),
        count: 0,
        seal,
    })
}
