//! Everyday PKCS#11 work through the shim, against SoftHSM2. The cases are in tests/operations_cases;
//! tests/operations_cssim.rs runs them against the simulator.
mod common;
mod operations_cases;
