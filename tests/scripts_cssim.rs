//! The shim under real tools (pkcs11-tool, the OpenSSL pkcs11 engine), against the CryptoServer simulator.
//! The cases are in tests/scripts_cases; tests/scripts.rs runs them against SoftHSM2.
mod common;
mod scripts_cases;
