//! Hostile templates through the shim over the CryptoServer simulator, in a pass-through slot and in a
//! database slot. The cases are in tests/templates_cases; tests/templates.rs runs them over SoftHSM2.
mod common;
mod templates_cases;

templates_cases!();
