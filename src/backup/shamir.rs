//! M-of-N secret sharing (Shamir) over GF(256), for `mbk export-shares` / `mbk import-shares`.
//!
//! Each byte of the secret is the constant term of its own random polynomial of degree M-1; share `i` holds
//! the polynomials' values at x = i. Any M shares give the secret back by Lagrange interpolation at 0; fewer
//! give a value that says nothing about it. Field arithmetic uses no tables and no data-dependent branches, so
//! its timing does not depend on the secret.
//!
//! The text form of a share, one line, for a file or paper:
//! `p11shim-share v1 <id>/<shares> threshold <m> <fingerprint> <hex data> <checksum>`, where the checksum is
//! the first 4 bytes of SHA-256 over the canonical text before it, so a mistyped share is refused rather than
//! giving a wrong key, and the fingerprint keeps shares of different MBK sets apart.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::fmt;
use zeroize::{Zeroize, Zeroizing};

const TEXT_TAG: &str = "p11shim-share";
const TEXT_VERSION: &str = "v1";

/// One share: its x coordinate (1..=255), the threshold, and the polynomials' values at x. Zeroized on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Share {
    pub id: u8,
    pub threshold: u8,
    pub data: Vec<u8>,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.data.zeroize();
    }
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Share {{ id: {}, threshold: {}, data: {} bytes }}", self.id, self.threshold, self.data.len())
    }
}

/// A share read from its text form, with what the text says about the set it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedShare {
    pub share: Share,
    /// How many shares were made (N).
    pub shares: u8,
    /// The caller's label for the secret (the MBK fingerprint).
    pub fingerprint: String,
}

fn invalid(message: impl Into<String>) -> Error {
    Error::Other(message.into())
}

/// Splits `secret` into `shares` shares, any `threshold` of which give it back (2 ≤ threshold ≤ shares ≤ 255).
pub fn split(secret: &[u8], threshold: u8, shares: u8) -> Result<Vec<Share>> {
    if secret.is_empty() {
        return Err(invalid("secret sharing: the secret is empty"));
    }
    if threshold < 2 || threshold > shares {
        return Err(invalid(format!(
            "secret sharing: the threshold must be at least 2 and at most the number of shares (got {threshold} of {shares})"
        )));
    }
    // coefficients[j * len + k]: coefficient of x^(j+1) in byte k's polynomial.
    let mut coefficients = Zeroizing::new(vec![0u8; (threshold as usize - 1) * secret.len()]);
    getrandom::fill(&mut coefficients).map_err(|e| invalid(format!("secret sharing: no randomness: {e}")))?;
    let out = (1..=shares)
        .map(|x| {
            let data = secret
                .iter()
                .enumerate()
                .map(|(k, &constant)| {
                    // Horner, from the highest coefficient down to the secret byte.
                    let mut y = 0u8;
                    for j in (0..threshold as usize - 1).rev() {
                        y = gf_mul(y, x) ^ coefficients[j * secret.len() + k];
                    }
                    gf_mul(y, x) ^ constant
                })
                .collect();
            Share { id: x, threshold, data }
        })
        .collect();
    Ok(out)
}

/// The secret, from at least `threshold` distinct shares of one split. Shares beyond the threshold must agree
/// with the others (a share that passed its checksum but belongs elsewhere is caught).
pub fn combine(shares: &[Share]) -> Result<Zeroizing<Vec<u8>>> {
    let first = shares.first().ok_or_else(|| invalid("secret sharing: no shares"))?;
    let (threshold, len) = (first.threshold, first.data.len());
    if threshold < 2 || len == 0 {
        return Err(invalid(format!("secret sharing: share {} is malformed", first.id)));
    }
    for (i, s) in shares.iter().enumerate() {
        if s.threshold != threshold {
            return Err(invalid(format!(
                "secret sharing: share {} has threshold {}, share {} has {threshold}: shares of different splits",
                s.id, s.threshold, first.id
            )));
        }
        if s.data.len() != len {
            return Err(invalid(format!(
                "secret sharing: share {} holds {} bytes, share {} holds {len}: shares of different splits",
                s.id,
                s.data.len(),
                first.id
            )));
        }
        if s.id == 0 {
            return Err(invalid("secret sharing: share id 0 is not a share"));
        }
        if shares[..i].iter().any(|o| o.id == s.id) {
            return Err(invalid(format!("secret sharing: share {} given twice", s.id)));
        }
    }
    if shares.len() < threshold as usize {
        return Err(invalid(format!("secret sharing: {} shares given, {threshold} needed", shares.len())));
    }
    let (base, extra) = shares.split_at(threshold as usize);
    let secret = interpolate(base, 0);
    for s in extra {
        if *interpolate(base, s.id) != s.data {
            return Err(invalid(format!(
                "secret sharing: share {} does not agree with shares {}: one of them is from another split or damaged",
                s.id,
                base.iter().map(|b| b.id.to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    Ok(secret)
}

/// The polynomials through `points`, evaluated at `x` (Lagrange); `points` have distinct ids and equal lengths.
fn interpolate(points: &[Share], x: u8) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(vec![0u8; points[0].data.len()]);
    for (j, pj) in points.iter().enumerate() {
        // l_j(x) = prod_{m != j} (x - x_m) / (x_j - x_m); minus is xor in GF(2^8).
        let (mut num, mut den) = (1u8, 1u8);
        for (m, pm) in points.iter().enumerate() {
            if m != j {
                num = gf_mul(num, x ^ pm.id);
                den = gf_mul(den, pj.id ^ pm.id);
            }
        }
        let weight = gf_mul(num, gf_inv(den));
        for (o, &y) in out.iter_mut().zip(&pj.data) {
            *o ^= gf_mul(weight, y);
        }
    }
    out
}

/// Multiplication in GF(2^8) modulo x^8 + x^4 + x^3 + x + 1 (AES), without branches on the operands.
fn gf_mul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0u8;
    for _ in 0..8 {
        p ^= a & (b & 1).wrapping_neg();
        let carry = (a >> 7).wrapping_neg();
        a = (a << 1) ^ (0x1b & carry);
        b >>= 1;
    }
    p
}

/// a^254 = a^-1 for a != 0 (and 0 for 0), by a fixed chain of squarings and multiplications.
fn gf_inv(a: u8) -> u8 {
    let mut result = 1u8;
    let mut power = a;
    // 254 = 0b1111_1110
    for bit in 0..8 {
        if (254 >> bit) & 1 == 1 {
            result = gf_mul(result, power);
        }
        power = gf_mul(power, power);
    }
    result
}

fn checksum(canonical: &str) -> String {
    hex::encode(&Sha256::digest(canonical.as_bytes())[..4])
}

fn check_fingerprint(fingerprint: &str) -> Result<()> {
    if fingerprint.is_empty() || !fingerprint.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(format!(
            "secret sharing: the fingerprint {fingerprint:?} must be printable ASCII without spaces"
        )));
    }
    Ok(())
}

impl Share {
    /// The share as one line of text (no newline); `shares` is N, `fingerprint` names the secret.
    pub fn to_text(&self, shares: u8, fingerprint: &str) -> Result<Zeroizing<String>> {
        check_fingerprint(fingerprint)?;
        if self.id == 0 || self.id > shares || self.threshold < 2 || self.threshold > shares || self.data.is_empty() {
            return Err(invalid(format!(
                "secret sharing: share {}/{shares} threshold {} cannot be written",
                self.id, self.threshold
            )));
        }
        let mut text = self.canonical(shares, fingerprint);
        let sum = checksum(&text);
        text.push(' ');
        text.push_str(&sum);
        Ok(text)
    }

    fn canonical(&self, shares: u8, fingerprint: &str) -> Zeroizing<String> {
        let data = Zeroizing::new(hex::encode(&self.data));
        Zeroizing::new(format!(
            "{TEXT_TAG} {TEXT_VERSION} {}/{shares} threshold {} {fingerprint} {}",
            self.id,
            self.threshold,
            data.as_str()
        ))
    }

    /// Reads a share's text form; refuses a mistyped or damaged share (checksum), whatever the spacing and
    /// the case of the hex digits.
    pub fn from_text(text: &str) -> Result<ParsedShare> {
        let bad = |why: &str| Error::Damaged(format!("not a valid p11shim share: {why}"));
        let tokens: Vec<&str> = text.split_whitespace().collect();
        let [tag, version, position, word, threshold, fingerprint, data, sum] = tokens[..] else {
            if tokens.first() != Some(&TEXT_TAG) {
                return Err(bad("it does not start with \"p11shim-share\""));
            }
            return Err(bad(&format!("{} words, expected 8", tokens.len())));
        };
        if tag != TEXT_TAG {
            return Err(bad("it does not start with \"p11shim-share\""));
        }
        if version != TEXT_VERSION {
            return Err(bad(&format!("unknown share version {version:?} (this p11shim reads v1)")));
        }
        let number = |s: &str, what: &str| -> Result<u8> {
            s.parse::<u8>()
                .ok()
                .filter(|_| s.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| bad(&format!("{what} {s:?}")))
        };
        let (id, shares) = position.split_once('/').ok_or_else(|| bad("no <id>/<shares>"))?;
        let (id, shares) = (number(id, "share id")?, number(shares, "share count")?);
        if word != "threshold" {
            return Err(bad("no \"threshold\""));
        }
        let threshold = number(threshold, "threshold")?;
        check_fingerprint(fingerprint)?;
        let data = Zeroizing::new(hex::decode(data).map_err(|_| bad("the share data is not hex"))?);
        let share = Share { id, threshold, data: data.to_vec() };
        if checksum(&share.canonical(shares, fingerprint)) != sum.to_ascii_lowercase() {
            return Err(bad("checksum mismatch (mistyped or damaged)"));
        }
        if id == 0 || id > shares || threshold < 2 || threshold > shares || share.data.is_empty() {
            return Err(bad(&format!("share {id}/{shares} threshold {threshold} is impossible")));
        }
        Ok(ParsedShare { share, shares, fingerprint: fingerprint.to_string() })
    }
}

/// The secret and its fingerprint from share texts, refusing shares of different secrets or different splits.
pub fn combine_texts<S: AsRef<str>>(texts: &[S]) -> Result<(Zeroizing<Vec<u8>>, String)> {
    let parsed = texts.iter().map(|t| Share::from_text(t.as_ref())).collect::<Result<Vec<_>>>()?;
    let first = parsed.first().ok_or_else(|| invalid("secret sharing: no shares"))?;
    for p in &parsed {
        if p.fingerprint != first.fingerprint {
            return Err(invalid(format!(
                "secret sharing: share {} is for {}, share {} for {}: shares of different keys",
                p.share.id, p.fingerprint, first.share.id, first.fingerprint
            )));
        }
        if p.shares != first.shares {
            return Err(invalid(format!(
                "secret sharing: share {} is one of {}, share {} one of {}: shares of different splits",
                p.share.id, p.shares, first.share.id, first.shares
            )));
        }
    }
    let shares: Vec<Share> = parsed.iter().map(|p| p.share.clone()).collect();
    Ok((combine(&shares)?, first.fingerprint.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "0123abcd-4567ef01-89abcdef-00112233";

    fn random(len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        getrandom::fill(&mut v).unwrap();
        v
    }

    /// Every subset of `n` items, as index lists.
    fn subsets(n: usize) -> impl Iterator<Item = Vec<usize>> {
        (0u32..1 << n).map(move |mask| (0..n).filter(|i| mask >> i & 1 == 1).collect())
    }

    fn pick(shares: &[Share], idx: &[usize]) -> Vec<Share> {
        idx.iter().map(|&i| shares[i].clone()).collect()
    }

    #[test]
    fn field_arithmetic_is_gf256() {
        // FIPS 197, 4.2: {57} • {83} = {c1}, {57} • {13} = {fe}.
        assert_eq!(gf_mul(0x57, 0x83), 0xc1);
        assert_eq!(gf_mul(0x57, 0x13), 0xfe);
        assert_eq!(gf_inv(0), 0);
        for a in 1..=255u8 {
            assert_eq!(gf_mul(a, gf_inv(a)), 1, "inverse of {a}");
            for b in [0u8, 1, 2, 0x53, 0xca, 0xff] {
                assert_eq!(gf_mul(a, b), gf_mul(b, a));
            }
        }
    }

    #[test]
    fn every_3_subset_of_a_3_of_5_split_reconstructs_and_every_smaller_one_does_not() {
        let secret = random(32);
        let shares = split(&secret, 3, 5).unwrap();
        assert_eq!(shares.len(), 5);
        assert_eq!(shares.iter().map(|s| s.id).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        let (mut enough, mut too_few) = (0, 0);
        for idx in subsets(5) {
            let chosen = pick(&shares, &idx);
            if idx.len() >= 3 {
                assert_eq!(*combine(&chosen).unwrap(), secret, "subset {idx:?}");
                enough += 1;
            } else if !idx.is_empty() {
                let err = combine(&chosen).unwrap_err().to_string();
                assert!(err.contains("3 needed"), "{err}");
                // The arithmetic itself: M-1 points determine some other value, not the secret.
                assert_ne!(*interpolate(&chosen, 0), secret, "subset {idx:?}");
                too_few += 1;
            }
        }
        assert_eq!((enough, too_few), (16, 15));
    }

    #[test]
    fn lying_about_the_threshold_gives_a_different_value() {
        let secret = random(32);
        let shares = split(&secret, 3, 5).unwrap();
        let forged: Vec<Share> =
            shares[..2].iter().map(|s| Share { id: s.id, threshold: 2, data: s.data.clone() }).collect();
        assert_ne!(*combine(&forged).unwrap(), secret);
    }

    #[test]
    fn random_secrets_and_parameters_round_trip() {
        for round in 0..200 {
            let params = random(3);
            let n = 2 + params[0] % 20;
            let m = 2 + params[1] % (n - 1);
            let len = 1 + params[2] as usize % 64;
            let secret = random(len);
            let mut shares = split(&secret, m, n).unwrap();
            assert!(shares.iter().all(|s| s.threshold == m && s.data.len() == len));
            // A random M-subset, in random order.
            let order = random(n as usize);
            let mut idx: Vec<usize> = (0..n as usize).collect();
            idx.sort_by_key(|&i| order[i]);
            idx.truncate(m as usize);
            assert_eq!(*combine(&pick(&shares, &idx)).unwrap(), secret, "round {round}: {m} of {n}, {len} bytes");
            // All N together agree too.
            shares.reverse();
            assert_eq!(*combine(&shares).unwrap(), secret);
        }
    }

    #[test]
    fn full_range_255_shares() {
        let secret = random(32);
        let shares = split(&secret, 255, 255).unwrap();
        assert_eq!(*combine(&shares).unwrap(), secret);
        let shares = split(&secret, 2, 255).unwrap();
        assert_eq!(*combine(&shares[253..]).unwrap(), secret);
    }

    #[test]
    fn split_refuses_bad_parameters() {
        for (m, n) in [(0, 5), (1, 5), (6, 5), (2, 1), (0, 0)] {
            assert!(split(b"k", m, n).is_err(), "{m} of {n}");
        }
        assert!(split(b"", 2, 3).is_err());
    }

    #[test]
    fn shares_are_fresh_each_time() {
        let secret = random(32);
        let a = split(&secret, 2, 3).unwrap();
        let b = split(&secret, 2, 3).unwrap();
        assert_ne!(a[0].data, b[0].data);
        assert!(a.iter().all(|s| s.data != secret));
    }

    #[test]
    fn combine_refuses_mismatched_shares() {
        let secret = random(16);
        let shares = split(&secret, 2, 3).unwrap();
        let other = split(&random(17), 2, 3).unwrap();
        let other_m = split(&random(16), 3, 3).unwrap();
        let cases: Vec<(Vec<Share>, &str)> = vec![
            (vec![], "no shares"),
            (vec![shares[0].clone(), shares[0].clone()], "given twice"),
            (vec![shares[0].clone(), other[1].clone()], "bytes"),
            (vec![shares[0].clone(), other_m[1].clone()], "threshold"),
            (vec![shares[0].clone(), Share { id: 0, threshold: 2, data: shares[1].data.clone() }], "id 0"),
            (vec![shares[0].clone()], "2 needed"),
        ];
        for (given, needle) in cases {
            let err = combine(&given).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        // A third share from another split of the same length and threshold disagrees with the first two.
        let foreign = split(&random(16), 2, 3).unwrap();
        let err = combine(&[shares[0].clone(), shares[1].clone(), foreign[2].clone()]).unwrap_err().to_string();
        assert!(err.contains("does not agree"), "{err}");
    }

    #[test]
    fn text_form_round_trips() {
        let secret = random(32);
        let shares = split(&secret, 3, 5).unwrap();
        let texts: Vec<String> = shares.iter().map(|s| s.to_text(5, FP).unwrap().to_string()).collect();
        assert!(texts[1].starts_with(&format!("p11shim-share v1 2/5 threshold 3 {FP} ")), "{}", texts[1]);
        assert_eq!(texts[1].split(' ').count(), 8);
        for (s, t) in shares.iter().zip(&texts) {
            let parsed = Share::from_text(t).unwrap();
            assert_eq!(parsed, ParsedShare { share: s.clone(), shares: 5, fingerprint: FP.into() });
        }
        // Humans retype: extra spaces, a newline, upper-case hex are fine.
        let sloppy = format!(
            "  {}\n",
            texts[0]
                .replace(' ', "   ")
                .to_uppercase()
                .replace("P11SHIM-SHARE   V1", "p11shim-share v1")
                .replace("THRESHOLD", "threshold")
                .replace(&FP.to_uppercase(), FP)
        );
        assert_eq!(Share::from_text(&sloppy).unwrap().share, shares[0]);
        let (got, fp) = combine_texts(&[&texts[4], &texts[0], &texts[2]]).unwrap();
        assert_eq!((got.to_vec(), fp.as_str()), (secret, FP));
    }

    #[test]
    fn every_single_character_change_of_a_share_text_is_refused() {
        let shares = split(&random(32), 3, 5).unwrap();
        let text = shares[2].to_text(5, FP).unwrap().to_string();
        let mut tried = 0;
        for i in 0..text.len() {
            for with in [b'0', b'7', b'a', b'f', b'x', b'-', b' ', b'/'] {
                let mut bytes = text.clone().into_bytes();
                if bytes[i] == with || bytes[i].eq_ignore_ascii_case(&with) && bytes[i].is_ascii_hexdigit() {
                    continue;
                }
                bytes[i] = with;
                let changed = String::from_utf8(bytes).unwrap();
                assert!(
                    Share::from_text(&changed).is_err(),
                    "accepted with byte {i} set to {:?}: {changed}",
                    with as char
                );
                tried += 1;
            }
        }
        assert!(tried > 1000);
        // Swapped adjacent hex digits (the classic typo), a dropped character, a share cut short.
        let data_at = text.rfind(' ').unwrap() - 10;
        let mut swapped = text.clone().into_bytes();
        swapped.swap(data_at, data_at + 1);
        if swapped != text.as_bytes() {
            assert!(Share::from_text(std::str::from_utf8(&swapped).unwrap()).is_err());
        }
        let mut dropped = text.clone();
        dropped.remove(data_at);
        assert!(Share::from_text(&dropped).is_err());
        assert!(Share::from_text(&text[..text.len() - 1]).is_err());
        assert!(Share::from_text(&text[..text.len() / 2]).is_err());
        assert!(Share::from_text("").is_err());
    }

    #[test]
    fn shares_of_different_keys_or_splits_are_not_mixed() {
        let a = split(&random(32), 2, 3).unwrap();
        let b = split(&random(32), 2, 4).unwrap();
        let other_fp = "ffffffff-ffffffff-ffffffff-ffffffff";
        let err = combine_texts(&[a[0].to_text(3, FP).unwrap(), a[1].to_text(3, other_fp).unwrap()]).unwrap_err();
        assert!(err.to_string().contains("different keys"), "{err}");
        let err = combine_texts(&[a[0].to_text(3, FP).unwrap(), b[1].to_text(4, FP).unwrap()]).unwrap_err();
        assert!(err.to_string().contains("different splits"), "{err}");
        assert!(a[0].to_text(3, "with space").is_err());
        assert!(a[0].to_text(3, "").is_err());
        assert!(a[0].to_text(0, FP).is_err());
    }

    #[test]
    fn debug_does_not_show_the_data() {
        let s = Share { id: 1, threshold: 2, data: vec![0xAB; 4] };
        assert_eq!(format!("{s:?}"), "Share { id: 1, threshold: 2, data: 4 bytes }");
    }
}
