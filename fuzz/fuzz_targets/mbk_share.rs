//! MBK shares (src/backup/shamir.rs): each line through `Share::from_text`, all lines through
//! `combine_texts`; a share that parses is written again with `to_text` and must read back the same. The
//! same bytes also go to `combine` as shares (id, threshold, data), past the text checksums that the fuzzer
//! cannot forge.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p11shim::backup::shamir::{combine, combine_texts, Share};

const FP: &str = "fuzz-0123abcd";

fn texts(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<&str> = text.lines().collect();
    for line in &lines {
        if let Ok(parsed) = Share::from_text(line) {
            let again = parsed.share.to_text(parsed.shares, &parsed.fingerprint).expect("a share read can be written");
            assert_eq!(Share::from_text(&again).expect("a share written reads back"), parsed);
        }
    }
    if let Ok((secret, fingerprint)) = combine_texts(&lines) {
        assert!(!secret.is_empty() && !fingerprint.is_empty());
    }
}

/// `[count, threshold, length, then per share: id, data...]`.
fn shares(data: &[u8]) {
    let [count, threshold, len, rest @ ..] = data else { return };
    let (count, len) = (*count as usize % 9, *len as usize % 33);
    let mut shares = Vec::new();
    for chunk in rest.chunks(len + 1).take(count) {
        let (id, value) = chunk.split_first().unwrap_or((&0, &[]));
        shares.push(Share { id: *id, threshold: *threshold, data: value.to_vec() });
    }
    for share in &shares {
        if let Ok(text) = share.to_text(count as u8, FP) {
            let parsed = Share::from_text(&text).expect("a share written reads back");
            assert!(parsed.share == *share && parsed.shares == count as u8 && parsed.fingerprint == FP);
        }
    }
    if let Ok(secret) = combine(&shares) {
        assert_eq!(secret.len(), shares[0].data.len());
        assert!(shares.len() >= *threshold as usize);
    }
}

fuzz_target!(|data: &[u8]| {
    texts(data);
    shares(data);
});
