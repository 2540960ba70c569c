//! The backup file (src/backup/format/): what it looks like, that every edit, truncation, reordering or
//! splice of records and chunks is refused and located, that format 1 files still read, that records of
//! any size the store accepts stream through with memory bounded by a record, and that files are only ever
//! written as private regular files.
//!
//! The memory tests run in a child process of their own (this binary re-run with `--exact`), so that the
//! peak RSS (VmHWM) they measure is theirs alone. Run with `--release --nocapture` for the 100,000-record
//! figures; a debug build (unoptimized SHA-256 and hex) writes 20,000.

mod common;

use common::sealer::SoftwareSealer;
use p11shim::backup::format::{
    verify_file, BackupReader, BackupWriter, ErrorKind, FormatError, Header, Record, RecordKind, Sealer, Summary, CHUNK,
};
use p11shim::error::{Error, Result};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

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

/// A record with a label of `label` bytes and attributes (a data object's value) of `value` bytes.
fn big(i: u64, label: usize, value: usize) -> Record {
    Record {
        label: (0..label).map(|b| b"abcdefghijklmnopqrstuvwxyz"[b % 26]).collect(),
        attrs: (0..value).map(|b| (b as u32).wrapping_mul(2_654_435_761) as u8 ^ i as u8).collect(),
        ..record(i)
    }
}

fn write_records(path: &Path, records: &[Record]) -> Summary {
    let mut w = BackupWriter::create(path, header()).unwrap();
    for r in records {
        w.write(r, &sealer()).unwrap();
    }
    w.finish(&sealer()).unwrap()
}

fn write(path: &Path, n: u64) -> Summary {
    write_records(path, &(0..n).map(record).collect::<Vec<_>>())
}

fn read_all(path: &Path, sealer: &dyn Sealer) -> std::result::Result<(Header, Vec<Record>), FormatError> {
    let mut r = BackupReader::open(path)?;
    let mut out = Vec::new();
    while let Some((n, rec)) = r.next_record(sealer)? {
        assert_eq!(n, out.len() as u64 + 1);
        out.push(rec);
    }
    Ok((r.summary().unwrap().header, out))
}

fn verify_error(path: &Path) -> FormatError {
    match verify_file(path, &sealer()) {
        Ok(s) => panic!("{} verified: {s:?}", path.display()),
        Err(e) => e,
    }
}

fn verify_err(path: &Path) -> String {
    let e = verify_error(path);
    assert_eq!(e.kind(), ErrorKind::Damaged, "{e}");
    e.to_string()
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

fn text(l: &[u8]) -> String {
    String::from_utf8(l.to_vec()).unwrap()
}

#[test]
fn software_sealer_is_hmac_sha256() {
    // RFC 4231 test cases 1, 2 and 6 (a key longer than the block).
    let cases: [(&[u8], &[u8], &str); 3] = [
        (&[0x0b; 20], b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
        (b"Jefe", b"what do ya want for nothing?", "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
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
    assert_eq!(l[0], "P11SHIM-BACKUP 2");
    assert_eq!(
        l[1],
        format!(
            r#"{{"format":2,"mbk":"{FP}","time":"2025-01-02T03:04:05Z","source":"host1:/var/lib/p11shim/keys.db","filter":"Prod.*"}}"#
        )
    );
    let r: serde_json::Value = serde_json::from_str(l[2].strip_prefix("R ").unwrap()).unwrap();
    assert_eq!(r["kind"], "stored");
    assert_eq!(r["group"], "ProdKey \"0\" é");
    assert_eq!(r["label"], hex::encode("key 0"));
    assert_eq!(r["mac"].as_str().unwrap().len(), 64);
    assert_eq!(r["mac"], hex::encode(sealer().mac(&record(0).mac_input())));
    assert!(l[4].starts_with(r#"T {"count":2,"mac":""#), "{}", l[4]);
    assert!(text.ends_with("\"}\n"));
}

#[test]
fn a_long_field_follows_its_record_in_numbered_chunk_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.p11b");
    let r = big(1, CHUNK + 10, 2 * CHUNK);
    write_records(&path, &[record(0), r.clone(), record(2)]);
    let l = lines(&path);
    // magic, header, record 1, record 2 + 2 label chunks + 2 attrs chunks, record 3, trailer
    assert_eq!(l.len(), 10);
    let r2: serde_json::Value = serde_json::from_slice(&l[3][2..]).unwrap();
    assert_eq!(r2["label"], serde_json::json!({ "chunked": CHUNK + 10 }));
    assert_eq!(r2["attrs"], serde_json::json!({ "chunked": 2 * CHUNK }));
    assert_eq!(r2["ckid"], hex::encode(1u64.to_be_bytes()));
    for (i, (field, len)) in [("label", CHUNK), ("label", 10), ("attrs", CHUNK), ("attrs", CHUNK)].iter().enumerate() {
        let c: serde_json::Value = serde_json::from_slice(&l[4 + i][2..]).unwrap();
        assert_eq!((c["n"].as_u64().unwrap(), c["field"].as_str().unwrap()), (i as u64 + 1, *field));
        assert_eq!(c["data"].as_str().unwrap().len(), 2 * len);
    }
    assert!(l.iter().all(|l| l.len() < 2 * CHUNK + 100));
    let (_, records) = read_all(&path, &sealer()).unwrap();
    assert_eq!(records, [record(0), r, record(2)]);
}

#[test]
fn record_mac_inputs_are_fixed() {
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
    let fields = |domain: &[u8], wide: bool| {
        let len = |n: usize| if wide { (n as u64).to_be_bytes().to_vec() } else { (n as u32).to_be_bytes().to_vec() };
        let mut e = domain.to_vec();
        e.push(2);
        for s in [&b"i"[..], b"t", b"g"] {
            e.extend(len(s.len()));
            e.extend(s);
        }
        e.extend(3u64.to_be_bytes());
        e.extend(0x1fu64.to_be_bytes());
        for b in [&b"L"[..], &[], &[9, 9], &[7]] {
            e.extend(len(b.len()));
            e.extend(b);
        }
        e.extend(0x210au64.to_be_bytes());
        e.extend(len(1));
        e.extend(b"m");
        e
    };
    assert_eq!(r.mac_input_v1(), fields(b"p11shim backup record v1\0", false));
    use sha2::Digest;
    let digest = sha2::Sha256::digest(fields(b"p11shim backup record v2\0", true));
    assert_eq!(r.mac_input(), [&b"p11shim backup record v2\0"[..], &digest[..]].concat());
    // Moving bytes from one field to the next changes the input (length prefixes).
    let shifted = Record { id: "it".into(), token: "".into(), ..r.clone() };
    assert_ne!(shifted.mac_input(), Record { token: "t".into(), ..r.clone() }.mac_input());
    assert_ne!(shifted.mac_input_v1(), Record { token: "t".into(), ..r }.mac_input_v1());
}

/// Where a record line's value of `field` starts, and how long it is.
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

/// A different character of the same kind (digit for digit, hex for hex, letter for letter).
fn flip(b: &mut u8) {
    *b = match *b {
        b'9' => b'8',
        b'0'..=b'8' => *b + 1,
        b'f' => b'e',
        b'a'..=b'e' => *b + 1,
        other => other ^ 1,
    };
}

#[test]
fn a_changed_value_in_each_field_fails_that_records_mac() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.p11b");
    write(&path, 3);
    let original = lines(&path);
    for field in
        ["id", "token", "group", "class", "key_type", "label", "ckid", "attrs", "wrapped", "wrap_mech", "mbk", "mac"]
    {
        let mut l = original.clone();
        let (at, len) = value_span(&l[3], field);
        assert!(len > 0, "{field}");
        flip(&mut l[3][at]);
        put(&path, &l);
        let e = verify_error(&path);
        assert!(matches!(e, FormatError::RecordMac { record: 2, .. }), "{field}: {e}");
        assert_eq!(e.record(), Some(2));
    }
    let mut l = original.clone();
    l[3] = text(&l[3]).replace(r#""kind":"stored""#, r#""kind":"hsm""#).into_bytes();
    put(&path, &l);
    assert!(verify_err(&path).starts_with("record 2 (id 00000000000000000000000000000001): record MAC"));
    // A field the record does not have, or one missing, or of another type.
    let mut l = original.clone();
    l[3] = text(&l[3]).replace(r#""ckid":"#, r#""ckidx":"#).into_bytes();
    put(&path, &l);
    let err = verify_err(&path);
    assert!(err.starts_with("record 2: not a valid record line: unknown field `ckidx`"), "{err}");
    let mut l = original;
    l[3] = text(&l[3]).replace(r#""class":4"#, r#""class":"4""#).into_bytes();
    put(&path, &l);
    assert!(verify_err(&path).starts_with("record 2: not a valid record line: invalid type"));
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
            // Records are lines 2..=4 (0-based); a change in record k names record k, except when the leading R
            // becomes a T and the line reads as a (bad) trailer.
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
    replace(&path, &original[..40]);
    assert_eq!(verify_err(&path), "truncated: the header is cut short");
    replace(&path, &original[..0]);
    assert_eq!(verify_err(&path), "not a p11shim backup (empty file)");
    replace(&path, &original[..5]);
    assert_eq!(verify_err(&path), "truncated: the magic line is cut short");
}

/// Rewrites the count in the trailer, as a careful forger would.
fn fix_count(l: &mut [Vec<u8>], count: u64) {
    let last = l.len() - 1;
    let trailer = text(&l[last]);
    let mac = trailer.split("\"mac\":").nth(1).unwrap();
    l[last] = format!("T {{\"count\":{count},\"mac\":{mac}").into_bytes();
}

const TRAILER_MAC: &str = "trailer MAC: records removed, reordered or the header edited";

#[test]
fn reordered_removed_duplicated_or_inserted_records_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.p11b");
    write(&path, 3);
    let original = lines(&path);

    let mut l = original.clone();
    l.swap(2, 3);
    put(&path, &l);
    assert_eq!(verify_err(&path), TRAILER_MAC);
    // The records themselves still check alone.
    let mut r = BackupReader::open(&path).unwrap();
    assert_eq!(r.next_record(&sealer()).unwrap().unwrap().1, record(1));

    let mut l = original.clone();
    l.remove(3);
    put(&path, &l);
    assert_eq!(verify_err(&path), "record count: the trailer says 3, the file holds 2: records removed or added");
    fix_count(&mut l, 2);
    put(&path, &l);
    assert_eq!(verify_err(&path), TRAILER_MAC);

    let mut l = original.clone();
    l.insert(4, l[3].clone());
    put(&path, &l);
    assert_eq!(verify_err(&path), "record count: the trailer says 3, the file holds 4: records removed or added");
    fix_count(&mut l, 4);
    put(&path, &l);
    assert_eq!(verify_err(&path), TRAILER_MAC);

    // A valid record of another backup made with the same key.
    let other = dir.path().join("other.p11b");
    write_records(&other, &[record(99)]);
    let mut l = original.clone();
    l.insert(3, lines(&other)[2].clone());
    fix_count(&mut l, 4);
    put(&path, &l);
    assert_eq!(verify_err(&path), TRAILER_MAC);

    // The last record dropped and the trailer taken from a shorter backup of the same keys made at another time.
    let two = dir.path().join("two.p11b");
    let mut w = BackupWriter::create(&two, Header { time: "2025-01-02T03:04:06Z".into(), ..header() }).unwrap();
    w.write(&record(0), &sealer()).unwrap();
    w.write(&record(1), &sealer()).unwrap();
    w.finish(&sealer()).unwrap();
    let mut l = original.clone();
    l.truncate(4);
    l.push(lines(&two)[4].clone());
    put(&path, &l);
    assert_eq!(verify_err(&path), TRAILER_MAC);

    // A header edited consistently (still canonical JSON).
    let mut l = original.clone();
    l[1] = text(&l[1]).replace("Prod.*", "Test.*").into_bytes();
    put(&path, &l);
    assert_eq!(verify_err(&path), TRAILER_MAC);
    // Or not canonically (a space).
    let mut l = original.clone();
    l[1] = text(&l[1]).replace(",\"time\"", ", \"time\"").into_bytes();
    put(&path, &l);
    assert_eq!(verify_err(&path), "header: not in canonical form: the line was edited");

    // Anything after the trailer.
    let mut l = original;
    l.push(b"\n".to_vec());
    put(&path, &l);
    assert_eq!(verify_err(&path), "data after the trailer");
}

/// A file of three records whose second has a 3-chunk label and a 2-chunk value: lines 0 magic, 1 header,
/// 2 record 1, 3 record 2, 4..=6 label chunks, 7..=8 attrs chunks, 9 record 3, 10 trailer.
fn chunked_file(path: &Path) -> Vec<Vec<u8>> {
    write_records(path, &[record(0), big(1, 2 * CHUNK + 5, CHUNK + 7), record(2)]);
    let l = lines(path);
    assert_eq!(l.len(), 11);
    l
}

#[test]
fn chunks_flipped_dropped_reordered_duplicated_or_cut_are_refused_and_located() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.p11b");
    let original = chunked_file(&path);
    verify_file(&path, &sealer()).unwrap();
    let chunk_err = |l: &[Vec<u8>]| {
        put(&path, l);
        let e = verify_error(&path);
        assert_eq!(e.kind(), ErrorKind::Damaged, "{e}");
        assert_eq!(e.record(), Some(2), "{e}");
        e.to_string()
    };

    // A byte of data in each chunk: the record MAC.
    for at in 4..=8 {
        let mut l = original.clone();
        let (pos, len) = value_span(&l[at], "data");
        flip(&mut l[at][pos + len / 2]);
        let err = chunk_err(&l);
        assert!(err.starts_with("record 2 (id 00000000000000000000000000000001): record MAC does not match"), "{err}");
    }
    // Uppercase hex: the same bytes, not the writer's line.
    let mut l = original.clone();
    let (pos, _) = value_span(&l[5], "data");
    let at = pos + l[5][pos..].iter().position(|b| (b'a'..=b'f').contains(b)).unwrap();
    l[5][at] = l[5][at].to_ascii_uppercase();
    assert_eq!(chunk_err(&l), "record 2: chunk 2: not in canonical form: the line was edited");
    // A chunk dropped.
    let mut l = original.clone();
    l.remove(5);
    assert!(chunk_err(&l).starts_with("record 2: chunk 2: chunk 3 of `label` where chunk 2 of `label` was expected"));
    let mut l = original.clone();
    l.remove(8);
    assert!(chunk_err(&l).starts_with("record 2: chunk 5: missing: the record's `attrs` continues"));
    // Two chunks swapped, across fields too.
    for (a, b) in [(4, 5), (6, 7), (5, 8)] {
        let mut l = original.clone();
        l.swap(a, b);
        let err = chunk_err(&l);
        assert!(err.contains("where chunk"), "{a}<->{b}: {err}");
    }
    // Swapped and renumbered (a careful forger): the MAC.
    let mut l = original.clone();
    l.swap(4, 5);
    l[4] = text(&l[4]).replacen("\"n\":2", "\"n\":1", 1).into_bytes();
    l[5] = text(&l[5]).replacen("\"n\":1", "\"n\":2", 1).into_bytes();
    assert!(chunk_err(&l).contains("record MAC does not match"));
    // A chunk duplicated.
    let mut l = original.clone();
    l.insert(5, l[4].clone());
    assert!(chunk_err(&l).starts_with("record 2: chunk 2: chunk 1 of `label`"));
    // The last chunk of a field twice (the field would be too long).
    let mut l = original.clone();
    l.insert(7, l[6].clone());
    assert!(chunk_err(&l).starts_with("record 2: chunk 4: chunk 3 of `label`"));
    // A short chunk, or a full chunk cut.
    let mut l = original.clone();
    let (pos, len) = value_span(&l[4], "data");
    l[4].drain(pos + len - 2..pos + len);
    assert!(chunk_err(&l).starts_with("record 2: chunk 1: "), "{}", chunk_err(&l));
    // A chunk line where a record is expected.
    let mut l = original.clone();
    l.insert(9, l[8].clone());
    put(&path, &l);
    assert!(verify_err(&path).starts_with("record 3: a chunk line where a record"));
    // The announced length changed: the chunks no longer fit it, or the MAC.
    let mut l = original.clone();
    l[3] = text(&l[3])
        .replace(&format!("{{\"chunked\":{}}}", CHUNK + 7), &format!("{{\"chunked\":{}}}", CHUNK + 6))
        .into_bytes();
    assert!(chunk_err(&l).starts_with("record 2: chunk 5: "));
    // A long field announced inline-sized: not what the writer writes.
    let mut l = original.clone();
    l[3] = text(&l[3]).replace(&format!("{{\"chunked\":{}}}", CHUNK + 7), "{\"chunked\":7}").into_bytes();
    put(&path, &l);
    assert!(matches!(verify_error(&path), FormatError::NotCanonical { record: 2, .. }));
    // An absurd length is refused before anything is read.
    let mut l = original.clone();
    l[3] = text(&l[3]).replace(&format!("{{\"chunked\":{}}}", CHUNK + 7), "{\"chunked\":99999999999999}").into_bytes();
    assert!(chunk_err(&l).contains("99999999999999 bytes announced; a backup holds at most"));

    // Truncated within a record: in a chunk, between chunks.
    let bytes = original.concat();
    let start = |i: usize| original[..i].iter().map(Vec::len).sum::<usize>();
    replace(&path, &bytes[..start(5) + 1000]);
    assert_eq!(verify_err(&path), "truncated: record 2 (in chunk 2) is cut short");
    replace(&path, &bytes[..start(6)]);
    assert_eq!(verify_err(&path), "truncated: record 2 (chunk 3 is missing) is cut short");
    replace(&path, &bytes[..start(4)]);
    assert_eq!(verify_err(&path), "truncated: record 2 (chunk 1 is missing) is cut short");
    // Every cut of the file is refused.
    for cut in (0..bytes.len()).step_by(bytes.len() / 50) {
        replace(&path, &bytes[..cut]);
        verify_err(&path);
    }
    put(&path, &original);
    assert_eq!(read_all(&path, &sealer()).unwrap().1[1], big(1, 2 * CHUNK + 5, CHUNK + 7));
}

#[test]
fn newer_versions_and_other_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.p11b");
    write(&path, 1);
    let mut l = lines(&path);
    l[0] = b"P11SHIM-BACKUP 3\n".to_vec();
    put(&path, &l);
    assert_eq!(
        verify_err(&path),
        "written by a newer p11shim: format version 3 (this p11shim reads versions 1 to 2); verify or restore it with that version or a later one"
    );
    // Later versions may change everything after the magic line.
    replace(&path, b"P11SHIM-BACKUP 17\n\x00\x01 whatever");
    assert!(matches!(verify_error(&path), FormatError::UnknownVersion(17)));
    for (content, why) in [
        (&b"hello\n"[..], "not a p11shim backup (the first line is not P11SHIM-BACKUP VERSION)"),
        (
            b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x03\x00",
            "not a p11shim backup (the first line is not P11SHIM-BACKUP VERSION)",
        ),
        (b"P11SHIM-BACKUP x\n{}\n", "not a p11shim backup (the format version is not a number)"),
        (b"P11SHIM-BACKUP 01\n{}\n", "not a p11shim backup (the format version is not a number)"),
        (b"P11SHIM-BACKUP 0\n{}\n", "unknown format version 0 (this p11shim reads versions 1 to 2)"),
    ] {
        replace(&path, content);
        assert_eq!(verify_err(&path), why);
    }
    // A file a text transfer converted to CR LF, and a whole-store backup, are named as such.
    replace(&path, b"P11SHIM-BACKUP 2\r\n{}\r\n");
    assert!(verify_err(&path).contains("lines end with CR LF"), "{}", verify_err(&path));
    replace(&path, b"P11SHIM-DB-BACKUP 1\nK {}\n");
    assert!(verify_err(&path).contains("whole-store backup") && verify_err(&path).contains("p11shim db restore"));
    // The header's own format field must agree with the magic line.
    write(&dir.path().join("c.p11b"), 1);
    let mut l = lines(&dir.path().join("c.p11b"));
    l[1] = text(&l[1]).replace("\"format\":2", "\"format\":1").into_bytes();
    put(&path, &l);
    assert_eq!(verify_err(&path), "header: format 1 does not match the magic line's version 2");
    assert!(BackupWriter::create(&dir.path().join("v1"), Header { format: 1, ..header() }).is_err());
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
    assert_eq!(verify_file(&empty, &other).unwrap_err().to_string(), TRAILER_MAC);
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
fn a_killed_writers_temporary_file_is_reported_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.p11b");
    // A pid that does not run: the highest pid the kernel hands out, plus one.
    let max: u32 = fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    let dead = dir.path().join(format!(".b.p11b.tmp-{}", max + 1));
    fs::write(&dead, vec![b'x'; 1234]).unwrap();
    // One of a live process (this one's parent) and one of another target stay.
    let live = dir.path().join(format!(".b.p11b.tmp-{}", std::os::unix::process::parent_id()));
    fs::write(&live, b"busy").unwrap();
    let other = dir.path().join(format!(".c.p11b.tmp-{}", max + 1));
    fs::write(&other, b"other").unwrap();
    let w = BackupWriter::create(&path, header()).unwrap();
    let found = w.leftovers().to_vec();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].path.clone(), found[0].bytes, found[0].pid), (dead.clone(), 1234, max + 1));
    assert!(found[0].removed.is_ok());
    assert!(found[0].to_string().contains("1234 bytes) was left by an interrupted backup"), "{}", found[0]);
    assert!(!dead.exists() && live.exists() && other.exists());
    w.finish(&sealer()).unwrap();
    let w = BackupWriter::create_with(&path, header(), true).unwrap();
    assert!(w.leftovers().is_empty());
}

#[test]
fn finish_refuses_an_existing_file_unless_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.p11b");
    replace(&path, b"precious");
    let e = BackupWriter::create(&path, header()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.to_string().contains("exists"), "{e}");

    // The file appears while the backup is being written.
    fs::remove_file(&path).unwrap();
    let mut w = BackupWriter::create(&path, header()).unwrap();
    w.write(&record(0), &sealer()).unwrap();
    replace(&path, b"precious");
    let err = w.finish(&sealer()).unwrap_err().to_string();
    assert!(err.ends_with("b.p11b: exists; refusing to replace it (overwrite not requested)"), "{err}");
    assert_eq!(fs::read_to_string(&path).unwrap(), "precious");
    assert_eq!(dir_entries(dir.path()), ["b.p11b"]);

    let mut w = BackupWriter::create_with(&path, header(), true).unwrap();
    w.write(&record(0), &sealer()).unwrap();
    w.finish(&sealer()).unwrap();
    assert_eq!(read_all(&path, &sealer()).unwrap().1, [record(0)]);
    assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(dir_entries(dir.path()), ["b.p11b"]);
}

#[test]
fn overwrite_never_replaces_a_device_directory_fifo_or_link() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let target = dir.path().join("target");
    fs::write(&target, b"kept").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let sub = dir.path().join("sub");
    fs::create_dir(&sub).unwrap();
    for (path, what) in
        [(Path::new("/dev/null"), "device node"), (&sub, "directory"), (&fifo, "FIFO"), (&link, "symbolic link")]
    {
        let e = BackupWriter::create_with(path, header(), true).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.to_string().contains(what), "{what}: {e}");
    }
    // One that appears while the backup is being written.
    let out = dir.path().join("out");
    let w = BackupWriter::create_with(&out, header(), true).unwrap();
    std::os::unix::fs::symlink(&target, &out).unwrap();
    assert!(w.finish(&sealer()).unwrap_err().to_string().contains("symbolic link"));
    assert_eq!(fs::read(&target).unwrap(), b"kept");
    assert!(fs::symlink_metadata("/dev/null").unwrap().file_type().is_symlink() || Path::new("/dev/null").exists());
}

struct FailingSealer;
impl Sealer for FailingSealer {
    fn seal(&self, _: &[u8]) -> Result<Vec<u8>> {
        Err(Error::Rv(cryptoki_sys::CKR_DEVICE_REMOVED))
    }
    fn check(&self, _: &[u8], _: &[u8]) -> Result<bool> {
        Err(Error::Rv(cryptoki_sys::CKR_DEVICE_REMOVED))
    }
}

#[test]
fn sealer_errors_pass_through_unchanged_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.p11b");
    let mut w = BackupWriter::create(&path, header()).unwrap();
    let err = w.write(&record(0), &FailingSealer).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert_eq!(Error::from(err).rv(), cryptoki_sys::CKR_DEVICE_REMOVED);
    w.write(&record(0), &sealer()).unwrap();
    assert_eq!(Error::from(w.finish(&FailingSealer).unwrap_err()).rv(), cryptoki_sys::CKR_DEVICE_REMOVED);
    assert_eq!(dir_entries(dir.path()), Vec::<String>::new());
    write(&path, 1);
    assert_eq!(verify_file(&path, &FailingSealer).unwrap_err().kind(), ErrorKind::Unavailable);
}

#[test]
fn debug_hides_the_wrapped_secret() {
    let text = format!("{:?}", record(1));
    assert!(text.contains("wrapped: 40 bytes"), "{text}");
    assert!(!text.contains(&hex::encode(&record(1).wrapped)));
}

// ---- format 1 ---------------------------------------------------------------------------------------------

/// A format 1 file as p11shim 0.1 wrote it (src/backup/format.rs of that version): the header with a count
/// padded to 20 characters, each record one line with every field in hex, the record MAC over
/// `mac_input_v1`, the trailer MAC under the v1 domain.
fn write_v1(path: &Path, records: &[Record], sealer: &SoftwareSealer) {
    use sha2::Digest;
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let h = header();
    let head = format!(
        "P11SHIM-BACKUP 1\n{{\"format\":1,\"mbk\":{},\"time\":{},\"source\":{},\"filter\":{},\"count\":{:<20}}}\n",
        q(&h.mbk),
        q(&h.time),
        q(&h.source),
        q(&h.filter),
        records.len()
    );
    let mut out = head.clone();
    let mut chain = [0u8; 32];
    for r in records {
        let mac = sealer.mac(&r.mac_input_v1());
        out += &format!(
            "R {{\"kind\":\"{}\",\"id\":{},\"token\":{},\"group\":{},\"class\":{},\"key_type\":{},\"label\":\"{}\",\"ckid\":\"{}\",\"attrs\":\"{}\",\"wrapped\":\"{}\",\"wrap_mech\":{},\"mbk\":{},\"mac\":\"{}\"}}\n",
            r.kind.name(), q(&r.id), q(&r.token), q(&r.group), r.class, r.key_type, hex::encode(&r.label),
            hex::encode(&r.ckid), hex::encode(&r.attrs), hex::encode(&r.wrapped), r.wrap_mech, q(&r.mbk), hex::encode(mac)
        );
        chain = sha2::Sha256::new().chain_update(chain).chain_update(mac).finalize().into();
    }
    let head_digest: [u8; 32] = sha2::Sha256::digest(head.as_bytes()).into();
    let input =
        [&b"p11shim backup trailer v1\0"[..], &head_digest, &chain, &(records.len() as u64).to_be_bytes()].concat();
    out += &format!("T {{\"count\":{},\"mac\":\"{}\"}}\n", records.len(), hex::encode(sealer.mac(&input)));
    replace(path, out.as_bytes());
}

#[test]
fn format_1_files_still_verify_and_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.p11b");
    let records: Vec<Record> = (0..5).map(record).chain([big(5, 100_000, 3_000_000)]).collect();
    write_v1(&path, &records, &sealer());
    let summary = verify_file(&path, &sealer()).unwrap();
    assert_eq!((summary.records, summary.header.format, summary.header.count), (6, 1, 6));
    let mut r = BackupReader::open(&path).unwrap();
    assert_eq!((r.version(), r.header().count), (1, 6));
    let mut read = Vec::new();
    while let Some((_, rec)) = r.next_record(&sealer()).unwrap() {
        read.push(rec);
    }
    assert_eq!(read, records);

    // Its checks hold as they did.
    let original = lines(&path);
    let mut l = original.clone();
    let at = value_span(&l[3], "wrapped").0;
    flip(&mut l[3][at]);
    put(&path, &l);
    assert!(matches!(verify_error(&path), FormatError::RecordMac { record: 2, .. }));
    let mut l = original.clone();
    l.insert(4, l[3].clone());
    put(&path, &l);
    assert_eq!(verify_err(&path), "record 7: the header announces only 6 records");
    let mut l = original.clone();
    l.remove(3);
    put(&path, &l);
    assert!(verify_err(&path).starts_with("record count: the header says 6, the trailer says 6, the file holds 5"));
    let mut l = original.clone();
    l[1] = text(&l[1]).replace("\"count\":6 ", "\"count\":6").into_bytes();
    put(&path, &l);
    assert_eq!(verify_err(&path), "header: not in canonical form: the line was edited");
    let mut l = original.clone();
    l[1] = text(&l[1]).replace("Prod.*", "Test.*").into_bytes();
    put(&path, &l);
    assert_eq!(verify_err(&path), TRAILER_MAC);
    // A format 1 file cannot hold a chunked field, nor a format 2 record line (other MAC input).
    let mut l = original.clone();
    let v2 = dir.path().join("v2.p11b");
    write_records(&v2, &[record(1)]);
    l[3] = lines(&v2)[2].clone();
    put(&path, &l);
    assert!(matches!(verify_error(&path), FormatError::RecordMac { record: 2, .. }));
    let mut l = original.clone();
    l[3] = text(&l[3])
        .replacen(&format!("\"label\":\"{}\"", hex::encode(&records[1].label)), "\"label\":{\"chunked\":70000}", 1)
        .into_bytes();
    put(&path, &l);
    assert!(verify_err(&path).starts_with("record 2: field `label`: chunked, which format 1 does not allow"));
    // A format 1 file under a format 2 magic line (or the reverse) fails its header.
    let mut l = original;
    l[0] = b"P11SHIM-BACKUP 2\n".to_vec();
    put(&path, &l);
    assert!(verify_err(&path).starts_with("header: "));
}

// ---- size and memory --------------------------------------------------------------------------------------

fn status_kib(field: &str) -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Runs `body` in a child process (this binary, only the test `name`), so that VmHWM is the body's own.
fn alone(name: &str, body: impl FnOnce()) {
    if std::env::var("BACKUP_FORMAT_ALONE").as_deref() == Ok(name) {
        body();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("BACKUP_FORMAT_ALONE", name)
        .output()
        .unwrap();
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name} in a child process: {}", String::from_utf8_lossy(&out.stdout));
}

/// An AES key as the vault stores it: a template of ~15 attributes, a 40-byte RFC 5649 blob.
fn aes_record(i: u64) -> Record {
    Record {
        kind: if i % 10 == 0 { RecordKind::Hsm } else { RecordKind::Stored },
        id: format!("{:032x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        token: "prod-db".into(),
        group: format!("ProdKey{}", i % 16),
        class: 4,
        key_type: 0x1f,
        label: format!("payments key {i}").into_bytes(),
        ckid: i.to_be_bytes().to_vec(),
        attrs: (0..240u32).map(|b| (b as u8) ^ (i as u8)).collect(),
        wrapped: vec![(i % 251) as u8; 40],
        wrap_mech: 0x210a,
        mbk: FP.into(),
    }
}

#[test]
fn a_100k_record_backup_streams_with_flat_memory() {
    alone("a_100k_record_backup_streams_with_flat_memory", || {
        const RECORDS: u64 = if cfg!(debug_assertions) { 20_000 } else { 100_000 };
        // Peak RSS may grow by at most this much over the whole run: buffers, not records.
        const FLAT: u64 = 8 << 20;
        let sealer = SoftwareSealer::new(b"test MAC key");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("100k.p11b");
        let header = Header::new(FP, "2025-01-02T03:04:05Z", "bench:store", ".*");

        let hwm_start = status_kib("VmHWM:");
        let started = Instant::now();
        let mut writer = BackupWriter::create(&path, header).unwrap();
        for i in 0..RECORDS {
            writer.write(&aes_record(i), &sealer).unwrap();
        }
        let written = writer.finish(&sealer).unwrap();
        let write_time = started.elapsed();
        let hwm_written = status_kib("VmHWM:");

        let started = Instant::now();
        let mut reader = BackupReader::open(&path).unwrap();
        let mut expected = 0;
        while let Some((n, r)) = reader.next_record(&sealer).unwrap() {
            assert_eq!(n, expected + 1);
            assert_eq!(r, aes_record(expected));
            expected += 1;
        }
        let read_time = started.elapsed();
        let verified = reader.summary().unwrap();
        let hwm_end = status_kib("VmHWM:");
        assert_eq!(verify_file(&path, &sealer).unwrap(), verified);
        assert_eq!(written, verified);
        assert_eq!((verified.records, verified.hsm, verified.stored), (RECORDS, RECORDS / 10, RECORDS - RECORDS / 10));
        let per_sec = |d: std::time::Duration| (RECORDS as f64 / d.as_secs_f64()) as u64;
        eprintln!(
            "{RECORDS} records, file {} MB: write {write_time:.2?} ({}/s), read+verify+compare {read_time:.2?} ({}/s); \
             VmHWM start {} KiB, after write +{} KiB, after reads +{} KiB",
            verified.bytes >> 20,
            per_sec(write_time),
            per_sec(read_time),
            hwm_start,
            hwm_written - hwm_start,
            hwm_end - hwm_start,
        );
        assert!(verified.bytes > 2 * FLAT, "the file ({} bytes) must dwarf the memory bound", verified.bytes);
        assert!((hwm_end - hwm_start) * 1024 < FLAT, "peak RSS grew by {} KiB", hwm_end - hwm_start);
    });
}

#[test]
fn a_9_mb_object_and_a_9_mb_label_stream_with_memory_bounded_by_the_record() {
    alone("a_9_mb_object_and_a_9_mb_label_stream_with_memory_bounded_by_the_record", || {
        const SIZE: usize = 9 << 20;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.p11b");
        let data_object = Record { class: 0, key_type: u64::MAX, wrapped: vec![], ..big(1, 12, SIZE) };
        let long_label = big(2, SIZE, 300);
        let hwm_start = status_kib("VmHWM:");
        let started = Instant::now();
        let mut w = BackupWriter::create(&path, header()).unwrap();
        for (i, r) in [&record(0), &data_object, &long_label, &record(3)].into_iter().enumerate() {
            w.write(r, &sealer()).unwrap_or_else(|e| panic!("record {i}: {e}"));
        }
        let written = w.finish(&sealer()).unwrap();
        let write_time = started.elapsed();
        let hwm_written = status_kib("VmHWM:");
        let started = Instant::now();
        let verified = verify_file(&path, &sealer()).unwrap();
        let verify_time = started.elapsed();
        let hwm_verified = status_kib("VmHWM:");
        assert_eq!(written, verified);
        let (_, records) = read_all(&path, &sealer()).unwrap();
        assert!(records[1] == data_object && records[2] == long_label, "byte-exact");
        assert!(fs::read(&path).unwrap().split(|&b| b == b'\n').all(|l| l.len() <= 2 * CHUNK + 100));
        eprintln!(
            "two 9 MiB records, file {} MB: write {write_time:.2?}, verify {verify_time:.2?}; VmHWM start {hwm_start} KiB \
             (holding the records), write +{} KiB, verify +{} KiB",
            verified.bytes >> 20,
            hwm_written - hwm_start,
            hwm_verified - hwm_written,
        );
        // Writing keeps no copy of a record (the MAC hashes it in place); reading builds one record at a time.
        assert!((hwm_written - hwm_start) * 1024 < 8 << 20, "write grew peak RSS by {} KiB", hwm_written - hwm_start);
        assert!(
            (hwm_verified - hwm_start) * 1024 < 3 * SIZE as u64,
            "verify grew peak RSS by {} KiB",
            hwm_verified - hwm_start
        );
    });
}

// ---- the whole-store backup (db backup / db restore) ---------------------------------------------------------

fn row(i: u64, value: usize) -> p11shim::store::KeyRow {
    p11shim::store::KeyRow {
        id: format!("{i:032x}"),
        token: "prod".into(),
        group: "ProdKey".into(),
        class: 0,
        key_type: 0,
        label: format!("row {i}").into_bytes(),
        ckid: vec![i as u8],
        attrs: (0..value).map(|b| b as u8).collect(),
        wrapped: vec![],
        wrap_mech: 0x210a,
        mbk: FP.into(),
        mac: vec![7; 32],
        version: 1,
    }
}

#[test]
fn whole_store_backups_are_private_regular_files_and_restore_line_by_line() {
    use p11shim::backup::{db, error::BackupError};
    let dir = tempfile::tempdir().unwrap();
    let store = p11shim::store::open(&format!("sqlite:{}", dir.path().join("a.db").display())).unwrap();
    for (i, size) in [(1, 10), (2, 3 << 20), (3, 0)] {
        store.insert(&row(i, size)).unwrap();
    }
    let out = dir.path().join("all.p11db");
    // Leftovers of a killed run are reported; outputs that are not new regular files are refused.
    let max: u32 = fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    let dead = dir.path().join(format!(".all.p11db.tmp-{}", max + 1));
    fs::write(&dead, b"wrapped keys").unwrap();
    let s = db::backup(store.as_ref(), &sealer(), &out, false, &|_| {}).unwrap();
    assert_eq!((s.keys, s.users, s.leftovers.len()), (3, 0, 1));
    assert_eq!((s.leftovers[0].path.clone(), s.leftovers[0].bytes), (dead.clone(), 12));
    assert!(!dead.exists());
    assert_eq!(fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
    for path in [&out, Path::new("/dev/null"), dir.path()] {
        let e = db::backup(store.as_ref(), &sealer(), path, false, &|_| {}).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{}: {e}", path.display());
    }
    assert!(dir_entries(dir.path()).iter().all(|n| !n.contains(".tmp-")), "no temporary file stays");

    // Restored into another store, row for row.
    let other = p11shim::store::open(&format!("sqlite:{}", dir.path().join("b.db").display())).unwrap();
    assert_eq!(db::restore(other.as_ref(), &sealer(), None, &out, None, &|_| {}).unwrap().keys, 3);
    let got = other.get(&format!("{:032x}", 2)).unwrap().unwrap();
    assert!(got.attrs == row(2, 3 << 20).attrs);

    // Damaged: refused, nothing changed.
    let empty = || p11shim::store::open(&format!("sqlite:{}", dir.path().join("c.db").display())).unwrap();
    let bytes = fs::read(&out).unwrap();
    let bad = dir.path().join("bad.p11db");
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 1;
    let mut after = bytes.clone();
    after.extend_from_slice(b"K {}\n");
    for (what, content) in [
        ("cut", &bytes[..bytes.len() - 10]),
        ("cut at a line", &bytes[..bytes.iter().position(|&b| b == b'\n').unwrap() + 1]),
        ("flipped", &flipped[..]),
        ("after the trailer", &after[..]),
        ("not one", &b"hello\n"[..]),
    ] {
        replace(&bad, content);
        let c = empty();
        let e = db::restore(c.as_ref(), &sealer(), None, &bad, None, &|_| {}).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Damaged, "{what}: {e}");
        assert!(matches!(e, BackupError::DamagedDb { .. }), "{what}: {e}");
        assert!(c.get(&format!("{:032x}", 1)).unwrap().is_none(), "{what}: nothing restored");
    }
    // Another MAC key: the trailer.
    let e = db::restore(empty().as_ref(), &SoftwareSealer::new(b"other"), None, &out, None, &|_| {}).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Damaged);
    // Whole-store operations outside standard mode are refused, as denied.
    let e = db::allowed(p11shim::config::Mode::Cc, "backup").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Denied);
}
