//! The module's life cycle through the built libp11shim.so, against the CryptoServer simulator. The cases are
//! in tests/lifecycle_cases; tests/lifecycle.rs runs them against SoftHSM2, with the set-up errors that never
//! load a backend.
mod common;
mod lifecycle_cases;
