//! Everyday PKCS#11 work through the shim, against the CryptoServer simulator (libcssim.so). The cases are
//! in tests/operations_cases; tests/operations.rs runs them against SoftHSM2.
mod common;
mod operations_cases;
