//! The MBK share file: one line of text, versioned, with a checksum and the fingerprint of the MBK it belongs
//! to (what a CryptoServer keeps on an administrator's smart card):
//!
//! ```text
//! CSSIM-MBK-SHARE 1 index=2 threshold=2 shares=3 split=<16 hex> fingerprint=<fingerprint> data=<64 hex> check=<8 hex>
//! ```
//!
//! `split` is random per split (shares of two splits never combine), `data` the share's bytes, `check` the
//! first 4 bytes of SHA-256 of the line up to the space before `check=` (it catches damage, not forgery: the
//! rebuilt key's fingerprint must match as well).

use super::{Fingerprint, MBK_LEN};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// The first word of every share file.
pub const MAGIC: &str = "CSSIM-MBK-SHARE";
/// The share format written; the only one read.
pub const VERSION: u32 = 1;

/// One share of an MBK.
pub struct Share {
    /// 1..=shares.
    pub index: u8,
    pub threshold: u8,
    pub shares: u8,
    pub split: [u8; 8],
    pub fingerprint: Fingerprint,
    /// [`MBK_LEN`] bytes.
    pub data: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Share {
    /// Everything but the share's bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Share({} of {}, threshold {}, MBK {})", self.index, self.shares, self.threshold, self.fingerprint)
    }
}

fn checksum(body: &str) -> String {
    hex::encode(&Sha256::digest(body.as_bytes())[..4])
}

impl Share {
    /// The file's content (one line and a newline); zeroized on drop.
    pub fn to_text(&self) -> Zeroizing<String> {
        let body = Zeroizing::new(format!(
            "{MAGIC} {VERSION} index={} threshold={} shares={} split={} fingerprint={} data={}",
            self.index,
            self.threshold,
            self.shares,
            hex::encode(self.split),
            self.fingerprint,
            Zeroizing::new(hex::encode(&self.data[..])).as_str()
        ));
        Zeroizing::new(format!("{} check={}\n", body.as_str(), checksum(&body)))
    }

    /// Reads a share file's content; the error says what is wrong with it (the caller names the file).
    pub fn parse(text: &str) -> Result<Share, String> {
        let line = text.strip_suffix('\n').unwrap_or(text);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let mut words = line.split(' ');
        if words.next() != Some(MAGIC) {
            return Err(format!("not an MBK share (it does not start with {MAGIC})"));
        }
        match words.next().map(str::parse::<u32>) {
            Some(Ok(VERSION)) => {}
            Some(Ok(v)) => return Err(format!("share format version {v} is not known (this tool reads {VERSION})")),
            _ => return Err("damaged: no share format version".into()),
        }
        let (body, check) = line.rsplit_once(" check=").ok_or("damaged: no check= field")?;
        if check != checksum(body) {
            return Err("damaged: its checksum does not match its content".into());
        }
        let mut field = |name: &str| -> Result<&str, String> {
            let word = words.next().ok_or_else(|| format!("damaged: no {name}= field"))?;
            word.strip_prefix(name)
                .and_then(|w| w.strip_prefix('='))
                .ok_or_else(|| format!("damaged: {name}= expected, found {:?}", word.split('=').next().unwrap_or("")))
        };
        let number = |name: &str, text: &str| -> Result<u8, String> {
            text.parse::<u8>().map_err(|_| format!("invalid {name}={text}: a number from 1 to 255"))
        };
        let index = number("index", field("index")?)?;
        let threshold = number("threshold", field("threshold")?)?;
        let shares = number("shares", field("shares")?)?;
        let split_text = field("split")?;
        let fingerprint: Fingerprint = field("fingerprint")?.parse()?;
        let data = Zeroizing::new(hex::decode(field("data")?).map_err(|_| "invalid data=: not hex".to_string())?);
        if data.len() != MBK_LEN {
            return Err(format!("invalid data=: {} bytes, an MBK share has {MBK_LEN}", data.len()));
        }
        let mut split = [0u8; 8];
        hex::decode_to_slice(split_text, &mut split).map_err(|_| format!("invalid split={split_text}"))?;
        if threshold == 0 || threshold > shares || index == 0 || index > shares {
            return Err(format!("invalid share numbers: index {index}, threshold {threshold}, shares {shares}"));
        }
        Ok(Share { index, threshold, shares, split, fingerprint, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share() -> Share {
        Share {
            index: 2,
            threshold: 2,
            shares: 3,
            split: [1, 2, 3, 4, 5, 6, 7, 8],
            fingerprint: Fingerprint([0xab; 16]),
            data: Zeroizing::new(vec![0x5a; 32]),
        }
    }

    #[test]
    fn round_trip() {
        let text = share().to_text();
        assert!(text.starts_with(
            "CSSIM-MBK-SHARE 1 index=2 threshold=2 shares=3 split=0102030405060708 \
             fingerprint=abababab-abababab-abababab-abababab data=5a5a"
        ));
        let back = Share::parse(&text).unwrap();
        assert_eq!((back.index, back.threshold, back.shares, back.split), (2, 2, 3, [1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(back.fingerprint, Fingerprint([0xab; 16]));
        assert_eq!(&back.data[..], &[0x5a; 32]);
    }

    #[test]
    fn damage_is_caught() {
        let text = share().to_text().to_string();
        let flipped = text.replace("data=5a5a", "data=5b5a");
        assert!(Share::parse(&flipped).unwrap_err().contains("checksum"));
        let index = text.replace("index=2", "index=1");
        assert!(Share::parse(&index).unwrap_err().contains("checksum"));
        assert!(Share::parse(&text.replace(" 1 index", " 2 index")).unwrap_err().contains("version 2"));
        assert!(Share::parse("hello\n").unwrap_err().contains("not an MBK share"));
        assert!(Share::parse(&text[..text.len() - 5]).is_err());
        assert!(Share::parse("").is_err());
    }
}
