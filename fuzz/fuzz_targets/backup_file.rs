//! The per-group backup file (src/backup/format/): `BackupReader::open`, `next_record` to the end and
//! `verify_file`, under the real HMAC-SHA256 check and under a sealer that takes every MAC as valid (to reach
//! the canonical-form, count and trailer checks behind the MACs). Each record's attributes go through
//! `Template::decode`, as restore does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p11shim::attrs::Template;
use p11shim::backup::format::{verify_file, BackupReader, Sealer};
use p11shim_fuzz::{hmac_sealer, scratch_file, AcceptAll};
use std::path::Path;

/// Reads the whole file; the number of records if it verified.
fn read(path: &Path, size: usize, sealer: &dyn Sealer) -> Option<u64> {
    let mut reader = BackupReader::open(path).ok()?;
    let count = reader.header().count;
    let mut read = 0;
    loop {
        match reader.next_record(sealer) {
            Ok(Some((number, record))) => {
                assert_eq!(number, read + 1, "records are numbered in order");
                // Format 1 headers announce the count; format 2 says it in the trailer only.
                assert!(reader.version() != 1 || number <= count, "no more records than the header announces");
                read = number;
                let _ = record.mac_input();
                let _ = format!("{record:?}");
                let _ = Template::decode(&record.attrs);
            }
            Ok(None) => {
                let summary = reader.summary().expect("a verified file has a summary");
                assert_eq!((summary.records, summary.header.count), (read, read));
                assert_eq!(summary.stored + summary.hsm, read);
                assert_eq!(summary.bytes, size as u64, "a verified file is all records");
                assert!(reader.next_record(sealer).unwrap().is_none());
                return Some(read);
            }
            Err(e) => {
                let _ = e.to_string();
                assert!(reader.summary().is_none());
                assert!(reader.next_record(sealer).is_err(), "a reader stops at its first error");
                return None;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let path = scratch_file(data);
    let sealer = hmac_sealer();
    let real = read(path, data.len(), &sealer);
    let lax = read(path, data.len(), &AcceptAll);
    if real.is_some() {
        assert_eq!(real, lax, "what verifies under the key verifies when every MAC is taken as valid");
    }
    match verify_file(path, &sealer) {
        Ok(summary) => assert_eq!(Some(summary.records), real),
        Err(_) => assert_eq!(real, None),
    }
});
