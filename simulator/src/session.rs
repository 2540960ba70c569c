//! Sessions: their slot, whether they are read/write, and the operations in progress.

use crate::mech::{Cipher, Hasher, Signer};
use cryptoki_sys::*;
use std::sync::{Mutex, MutexGuard, PoisonError};
use zeroize::Zeroizing;

/// An operation and the output it computed but could not yet deliver (length query, buffer too small).
pub struct Op<T> {
    pub state: T,
    pub pending: Option<Zeroizing<Vec<u8>>>,
}

impl<T> Op<T> {
    pub fn new(state: T) -> Op<T> {
        Op { state, pending: None }
    }
}

/// A C_FindObjects search: the handles found at C_FindObjectsInit.
pub struct Find {
    pub handles: Vec<CK_OBJECT_HANDLE>,
    pub pos: usize,
}

/// The operations of one session (each kind at most once at a time).
#[derive(Default)]
pub struct Ops {
    pub find: Option<Find>,
    pub encrypt: Option<Op<Cipher>>,
    pub decrypt: Option<Op<Cipher>>,
    pub sign: Option<Op<Signer>>,
    pub verify: Option<Signer>,
    pub digest: Option<Op<Hasher>>,
}

pub struct Session {
    pub slot: usize,
    pub rw: bool,
    ops: Mutex<Ops>,
}

impl Session {
    pub fn new(slot: usize, rw: bool) -> Session {
        Session { slot, rw, ops: Mutex::new(Ops::default()) }
    }

    /// The operations; taken after the module lock, never before it.
    pub fn ops(&self) -> MutexGuard<'_, Ops> {
        self.ops.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
