//! Hostile templates through the shim over SoftHSM2, in a pass-through slot and in a database slot. The cases
//! are in tests/templates_cases; tests/templates_cssim.rs runs them over the simulator.
mod common;
mod templates_cases;

templates_cases!();
