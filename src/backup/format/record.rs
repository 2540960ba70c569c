//! What a backup holds (the header, one record per key, the trailer), the serde structs of its lines, and
//! the bytes each MAC covers in each format version.

use super::{FormatError, FormatResult, CHUNK, INLINE_MAX};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

const RECORD_DOMAIN_V1: &[u8] = b"p11shim backup record v1\0";
const RECORD_DOMAIN_V2: &[u8] = b"p11shim backup record v2\0";
const TRAILER_DOMAIN_V1: &[u8] = b"p11shim backup trailer v1\0";
const TRAILER_DOMAIN_V2: &[u8] = b"p11shim backup trailer v2\0";
/// Width of a format 1 header's count field: u64::MAX has 20 digits.
pub(super) const COUNT_WIDTH: usize = 20;

/// The file's header (line 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The format version ([`super::FORMAT_VERSION`] when written by this p11shim).
    pub format: u32,
    /// Fingerprint of the MBK set the records are wrapped and sealed under.
    pub mbk: String,
    /// When the backup was made, RFC 3339 UTC (see [`utc_now`]).
    pub time: String,
    /// Where it was made: host and store.
    pub source: String,
    /// The group regex it was made for.
    pub filter: String,
    /// Number of records. Ignored by [`super::BackupWriter::create`]. Format 1 headers hold it; a format 2
    /// file says it in its trailer only, so a reader's header has 0 until the trailer has been checked, and
    /// the [`super::Summary`] has it.
    pub count: u64,
    /// Set when a device's own MBK made the file (the header says `"mbk_kind":"device"`): the blob, under that
    /// MBK, of the seal key whose MACs the file carries, so that any device holding the MBK checks them.
    /// None for an MBK set of p11shim's (no `mbk_kind` in the header).
    pub seal: Option<Vec<u8>>,
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
            format: super::FORMAT_VERSION,
            mbk: mbk.into(),
            time: time.into(),
            source: source.into(),
            filter: filter.into(),
            count: 0,
            seal: None,
        }
    }
}

/// Line 2 of a format 2 file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HeaderLine<'a> {
    pub format: u32,
    #[serde(borrow)]
    pub mbk: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub time: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub source: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub filter: std::borrow::Cow<'a, str>,
    /// "device" when a device's own MBK made the file; absent for an MBK set.
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    pub mbk_kind: Option<std::borrow::Cow<'a, str>>,
    /// The seal key's device blob (hex), with `mbk_kind`.
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    pub seal: Option<std::borrow::Cow<'a, str>>,
}

/// The `mbk_kind` of a file a device's own MBK made.
pub(super) const DEVICE_KIND: &str = "device";

impl<'a> HeaderLine<'a> {
    pub fn of(h: &'a Header) -> Self {
        HeaderLine {
            format: h.format,
            mbk: h.mbk.as_str().into(),
            time: h.time.as_str().into(),
            source: h.source.as_str().into(),
            filter: h.filter.as_str().into(),
            mbk_kind: h.seal.as_ref().map(|_| DEVICE_KIND.into()),
            seal: h.seal.as_ref().map(|b| hex::encode(b).into()),
        }
    }
}

/// Line 2 of a format 1 file: the count is written left-aligned in a [`COUNT_WIDTH`] field (patched when
/// the file was finished), which only a reader's canonical check needs to know.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HeaderLineV1 {
    pub format: u32,
    pub mbk: String,
    pub time: String,
    pub source: String,
    pub filter: String,
    pub count: u64,
}

/// The trailer line's JSON (after "T ").
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TrailerLine {
    pub count: u64,
    pub mac: Hex,
}

/// A chunk line's JSON (after "C "): part of a byte field too long for its record's line.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ChunkLine<'a> {
    /// 1-based, within the record.
    pub n: u64,
    #[serde(borrow)]
    pub field: std::borrow::Cow<'a, str>,
    pub data: HexRef<'a>,
}

/// Bytes written as lowercase hex (reading accepts only what this writes: the canonical check compares).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Hex(pub Vec<u8>);

impl Serialize for Hex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Hex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        hex::decode(s.as_bytes()).map(Hex).map_err(|e| serde::de::Error::custom(format!("not hex: {e}")))
    }
}

/// Borrowed bytes to write as hex, or owned bytes read from hex.
pub(super) enum HexRef<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl HexRef<'_> {
    pub fn bytes(&self) -> &[u8] {
        match self {
            HexRef::Borrowed(b) => b,
            HexRef::Owned(b) => b,
        }
    }
}

impl Serialize for HexRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.bytes()))
    }
}

impl<'de> Deserialize<'de> for HexRef<'_> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Hex::deserialize(d).map(|h| HexRef::Owned(h.0))
    }
}

/// A byte field in a record line: inline hex, or (format 2) the length of the bytes that follow in chunk lines.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
pub(super) enum Bytes<'a> {
    Inline(HexRef<'a>),
    Chunked { chunked: u64 },
}

impl<'a> Bytes<'a> {
    /// How the writer of `version` writes `b`: chunked when longer than [`INLINE_MAX`] (format 2).
    pub fn of(b: &'a [u8], version: u32) -> Self {
        if version >= 2 && b.len() > INLINE_MAX {
            Bytes::Chunked { chunked: b.len() as u64 }
        } else {
            Bytes::Inline(HexRef::Borrowed(b))
        }
    }
}

/// A record line's JSON (after "R ").
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RecordLine<'a> {
    pub kind: RecordKind,
    #[serde(borrow)]
    pub id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub token: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub group: std::borrow::Cow<'a, str>,
    pub class: u64,
    pub key_type: u64,
    #[serde(borrow)]
    pub label: Bytes<'a>,
    #[serde(borrow)]
    pub ckid: Bytes<'a>,
    #[serde(borrow)]
    pub attrs: Bytes<'a>,
    #[serde(borrow)]
    pub wrapped: Bytes<'a>,
    pub wrap_mech: u64,
    #[serde(borrow)]
    pub mbk: std::borrow::Cow<'a, str>,
    pub mac: HexRef<'a>,
}

/// The byte fields of a record, in the order their chunk lines follow the record line.
pub(super) const BYTE_FIELDS: [&str; 4] = ["label", "ckid", "attrs", "wrapped"];

impl<'a> RecordLine<'a> {
    /// The line the writer of `version` writes for `r` sealed with `mac`.
    pub fn of(r: &'a Record, mac: &'a [u8], version: u32) -> Self {
        RecordLine {
            kind: r.kind,
            id: r.id.as_str().into(),
            token: r.token.as_str().into(),
            group: r.group.as_str().into(),
            class: r.class,
            key_type: r.key_type,
            label: Bytes::of(&r.label, version),
            ckid: Bytes::of(&r.ckid, version),
            attrs: Bytes::of(&r.attrs, version),
            wrapped: Bytes::of(&r.wrapped, version),
            wrap_mech: r.wrap_mech,
            mbk: r.mbk.as_str().into(),
            mac: HexRef::Borrowed(mac),
        }
    }
}

/// The chunk lines that follow `r`'s line, in order: (number, field, bytes).
pub(super) fn chunks_of(r: &Record, version: u32) -> impl Iterator<Item = (u64, &'static str, &[u8])> {
    let fields = [&r.label[..], &r.ckid, &r.attrs, &r.wrapped];
    BYTE_FIELDS
        .into_iter()
        .zip(fields)
        .filter(move |(_, b)| matches!(Bytes::of(b, version), Bytes::Chunked { .. }))
        .flat_map(|(name, b)| b.chunks(CHUNK).map(move |c| (name, c)))
        .enumerate()
        .map(|(i, (name, c))| (i as u64 + 1, name, c))
}

/// Serializes one line: the prefix, the JSON, a newline.
pub(super) fn line(prefix: &str, value: &impl Serialize) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(prefix.as_bytes());
    serde_json::to_writer(&mut out, value).expect("plain data always serializes");
    out.push(b'\n');
    out
}

/// The current time as RFC 3339 UTC, seconds precision, for [`Header::time`].
pub fn utc_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Where a key came from: a key store row, or a key that lived in the HSM (a token object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
        let short = |b: &[u8]| if b.len() > 64 { format!("{} bytes", b.len()) } else { hex::encode(b) };
        f.debug_struct("Record")
            .field("kind", &self.kind)
            .field("id", &self.id)
            .field("token", &self.token)
            .field("group", &self.group)
            .field("class", &self.class)
            .field("key_type", &self.key_type)
            .field("label", &String::from_utf8_lossy(&self.label[..self.label.len().min(64)]))
            .field("ckid", &short(&self.ckid))
            .field("attrs", &format_args!("{} bytes", self.attrs.len()))
            .field("wrapped", &format_args!("{} bytes", self.wrapped.len()))
            .field("wrap_mech", &format_args!("{:#x}", self.wrap_mech))
            .field("mbk", &self.mbk)
            .finish()
    }
}

impl Record {
    /// The fields in the order every MAC input takes them: the kind, then strings, numbers and byte
    /// strings.
    fn visit(&self, put_len: &mut dyn FnMut(&[u8]), put: &mut dyn FnMut(&[u8])) {
        put(&[self.kind.byte()]);
        for v in [self.id.as_bytes(), self.token.as_bytes(), self.group.as_bytes()] {
            put_len(v);
            put(v);
        }
        put(&self.class.to_be_bytes());
        put(&self.key_type.to_be_bytes());
        for v in [&self.label[..], &self.ckid, &self.attrs, &self.wrapped] {
            put_len(v);
            put(v);
        }
        put(&self.wrap_mech.to_be_bytes());
        put_len(self.mbk.as_bytes());
        put(self.mbk.as_bytes());
    }

    /// The bytes the record MAC covers in format 1: a domain string, then every field in a fixed order;
    /// strings and byte strings prefixed with their length (u32 BE), numbers as u64 BE, the kind as one
    /// byte. (A format 1 line held at most [`super::MAX_LINE`] bytes, so a length always fit.)
    pub fn mac_input_v1(&self) -> Vec<u8> {
        let out = std::cell::RefCell::new(RECORD_DOMAIN_V1.to_vec());
        self.visit(&mut |v| out.borrow_mut().extend_from_slice(&(v.len() as u32).to_be_bytes()), &mut |v| {
            out.borrow_mut().extend_from_slice(v)
        });
        out.into_inner()
    }

    /// The bytes the record MAC covers in format 2: a domain string and the SHA-256 digest of the domain
    /// and the fields (as in format 1, lengths as u64 BE). The digest is computed over the fields in place,
    /// so a record of any size is sealed without a copy.
    pub fn mac_input(&self) -> Vec<u8> {
        let h = std::cell::RefCell::new(Sha256::new());
        h.borrow_mut().update(RECORD_DOMAIN_V2);
        self.visit(&mut |v| h.borrow_mut().update((v.len() as u64).to_be_bytes()), &mut |v| h.borrow_mut().update(v));
        [RECORD_DOMAIN_V2, &h.into_inner().finalize()[..]].concat()
    }

    /// The record MAC input of a format version.
    pub(super) fn mac_input_of(&self, version: u32) -> Vec<u8> {
        if version == 1 {
            self.mac_input_v1()
        } else {
            self.mac_input()
        }
    }

    /// The record a line describes, with its byte fields empty where they are chunked, and its MAC.
    pub(super) fn from_line(l: RecordLine<'_>) -> (Record, Vec<u8>) {
        let bytes = |b: Bytes<'_>| match b {
            Bytes::Inline(HexRef::Owned(v)) => v,
            Bytes::Inline(HexRef::Borrowed(v)) => v.to_vec(),
            Bytes::Chunked { .. } => Vec::new(),
        };
        let mac = l.mac.bytes().to_vec();
        let record = Record {
            kind: l.kind,
            id: l.id.into_owned(),
            token: l.token.into_owned(),
            group: l.group.into_owned(),
            class: l.class,
            key_type: l.key_type,
            label: bytes(l.label),
            ckid: bytes(l.ckid),
            attrs: bytes(l.attrs),
            wrapped: bytes(l.wrapped),
            wrap_mech: l.wrap_mech,
            mbk: l.mbk.into_owned(),
        };
        (record, mac)
    }

    /// The byte field named `name`.
    pub(super) fn field_mut(&mut self, name: &str) -> Option<&mut Vec<u8>> {
        match name {
            "label" => Some(&mut self.label),
            "ckid" => Some(&mut self.ckid),
            "attrs" => Some(&mut self.attrs),
            "wrapped" => Some(&mut self.wrapped),
            _ => None,
        }
    }
}

/// The bytes the trailer MAC covers.
pub(super) fn trailer_mac_input(version: u32, head_digest: &[u8; 32], chain: &[u8; 32], count: u64) -> Vec<u8> {
    let domain = if version == 1 { TRAILER_DOMAIN_V1 } else { TRAILER_DOMAIN_V2 };
    [domain, head_digest, chain, &count.to_be_bytes()].concat()
}

pub(super) fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// A record line's JSON, parsed (format 1 allows no chunked field).
pub(super) fn parse_record_line(record: u64, json: &[u8], version: u32) -> FormatResult<RecordLine<'_>> {
    let l: RecordLine<'_> = serde_json::from_slice(json)
        .map_err(|e| FormatError::Record { record, detail: format!("not a valid record line: {e}") })?;
    if version == 1 {
        for (name, b) in BYTE_FIELDS.iter().zip([&l.label, &l.ckid, &l.attrs, &l.wrapped]) {
            if matches!(b, Bytes::Chunked { .. }) {
                return Err(FormatError::Record {
                    record,
                    detail: format!("field `{name}`: chunked, which format 1 does not allow"),
                });
            }
        }
    }
    Ok(l)
}
