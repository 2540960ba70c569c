//! The backup file at scale: 100,000 records written and verified with flat memory.
//!
//! Alone in its test binary so that the process's peak RSS (VmHWM) is this test's. Run with `--release
//! --nocapture` for the 100,000-record figures; a debug build (unoptimized SHA-256 and hex) writes 20,000.

use p11shim::backup::format::{verify_file, BackupReader, BackupWriter, Header, Record, RecordKind, SoftwareSealer};
use std::time::Instant;

const RECORDS: u64 = if cfg!(debug_assertions) { 20_000 } else { 100_000 };
/// Peak RSS may grow by at most this much over the whole run: buffers, not records.
const FLAT: u64 = 8 << 20;

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// An AES key as the vault stores it: a template of ~15 attributes, a 40-byte RFC 5649 blob.
fn record(i: u64) -> Record {
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
        mbk: "0123abcd-4567ef01-89abcdef-00112233".into(),
    }
}

#[test]
fn a_100k_record_backup_streams_with_flat_memory() {
    let sealer = SoftwareSealer::new(b"test MAC key");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("100k.p11b");
    let header = Header::new("0123abcd-4567ef01-89abcdef-00112233", "2025-01-02T03:04:05Z", "bench:store", ".*");

    let hwm_start = status_kib("VmHWM:");
    let started = Instant::now();
    let mut writer = BackupWriter::create(&path, header).unwrap();
    for i in 0..RECORDS {
        writer.write(&record(i), &sealer).unwrap();
    }
    let written = writer.finish(&sealer).unwrap();
    let write_time = started.elapsed();
    let hwm_written = status_kib("VmHWM:");

    // Reading record by record, comparing as it goes (the importer's loop); the trailer is checked at the end.
    let started = Instant::now();
    let mut reader = BackupReader::open(&path).unwrap();
    let mut expected = 0;
    while let Some((n, r)) = reader.next_record(&sealer).unwrap() {
        assert_eq!(n, expected + 1);
        assert_eq!(r, record(expected));
        expected += 1;
    }
    let read_time = started.elapsed();
    let verified = reader.summary().unwrap();
    let hwm_end = status_kib("VmHWM:");
    assert_eq!(verify_file(&path, &sealer).unwrap(), verified);

    assert_eq!(written, verified);
    assert_eq!((verified.records, verified.hsm, verified.stored), (RECORDS, RECORDS / 10, RECORDS - RECORDS / 10));
    assert_eq!(expected, RECORDS);
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
}
