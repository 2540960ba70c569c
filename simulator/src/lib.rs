//! cssim: a CryptoServer simulator, as a PKCS#11 2.40 module (`libcssim.so`).
//!
//! It stands in for a Utimaco CryptoServer behind p11shim in tests and demos: slots `SLOT_0000`…, tokens and
//! token objects persisted in one state file shared by every process that loads the module, the FIPS and CC
//! firmware refusals (no clear-text key import or export, no overwriting keys), and fault injection
//! (failures, latency, device removal, lost sessions), and the device's master backup key (MBK) with the vendor
//! interface "CSSIM MBK" that backs keys up under it. See `README.md` for the configuration.
//!
//! Layers, from the C ABI down: [`ffi`] (the only place with raw pointers) → [`module`] (the PKCS#11
//! functions on safe types) → [`object`] (attribute rules), [`mech`] (the cryptography), [`mbk`] (the MBK,
//! its shares and key blobs), [`store`] (persistence), [`config`] and [`faults`]. [`admin`] is the library
//! side of the `cssim-admin` tool.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod admin;
pub mod config;
pub mod faults;
mod ffi;
mod log;
mod mbk;
mod mech;
mod module;
mod object;
mod session;
mod store;
mod token;

pub use ffi::{C_GetFunctionList, C_GetInterface, C_GetInterfaceList};

/// Every module function returns a `CK_RV` on failure: `Err(CKR_X)?` reads naturally.
pub(crate) type Result<T> = std::result::Result<T, cryptoki_sys::CK_RV>;
