//! Differential test against the CryptoServer simulator: the same script as tests/differential.rs (in
//! tests/differential_cases), through the shim and directly, must give the same log. The test of one shared
//! instance (tests/differential.rs) depends on SoftHSM2's slot numbering and is not repeated here.
mod common;
mod differential_cases;
