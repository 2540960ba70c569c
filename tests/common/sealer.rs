//! HMAC-SHA256 computed on the host with a key the test holds: a [`Sealer`] for tests and tools that have no
//! HSM. The shim itself seals in the HSM, where the MAC key never leaves; this is not part of the library.
//! The fuzz crate includes this file too (fuzz/src/lib.rs).

use p11shim::backup::format::Sealer;
use p11shim::error::Result;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub struct SoftwareSealer {
    key: Zeroizing<[u8; 64]>,
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
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
