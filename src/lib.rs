//! p11shim: a PKCS#11 module that loads the real HSM module, forwards every call to it, and adds key groups,
//! per-group backup under the HSM's master backup key and key storage in an RDBMS.
//!
//! A request enters at [`ffi`], is checked and turned into safe types, and goes to the forwarder (or, for
//! what the shim adds, to its own modules), which talk to [`backend`].
#![deny(unsafe_op_in_unsafe_fn)]

pub mod admin;
pub mod attrs;
pub mod audit;
pub mod auth;
pub mod backend;
pub mod backup;
pub mod config;
pub mod error;
pub mod ffi;
pub mod files;
pub mod forks;
pub mod hsm;
pub mod log;
pub mod objects;
pub mod secure;
pub mod sessions;
pub mod store;
pub mod threads;
pub mod vault;

/// The shim's version, reported as the library version by C_GetInfo.
pub const VERSION_MAJOR: u8 = 0;
pub const VERSION_MINOR: u8 = 1;
