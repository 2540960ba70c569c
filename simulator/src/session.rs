//! Sessions: their slot, whether they are read/write, and the operations in progress.

use crate::mech::{Cipher, Hasher, Signer};
use cryptoki_sys::*;
use std::sync::{Mutex, MutexGuard, PoisonError};
use zeroize::Zeroizing;

/// An operation and the output it computed but could not yet deliver (length query, buffer too small).
pub struct Op<T> {
    pub state: T,
    pub pending: Option<Zeroizing<Vec<u8>>>,
    /// Some(n) while the operation waits for C_Login(CKU_CONTEXT_SPECIFIC) (its key has
    /// CKA_ALWAYS_AUTHENTICATE); n orders the session's initializations, because the login serves the
    /// operation initialized last (PKCS#11 2.40 §5.6).
    pub awaiting_login: Option<u64>,
}

impl<T> Op<T> {
    pub fn new(state: T) -> Op<T> {
        Op { state, pending: None, awaiting_login: None }
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
    /// Initializations so far that waited for a context login (orders [`Op::awaiting_login`]).
    inits: u64,
}

impl Ops {
    /// The mark of an operation initialized now with a CKA_ALWAYS_AUTHENTICATE key.
    pub fn await_login(&mut self) -> Option<u64> {
        self.inits += 1;
        Some(self.inits)
    }

    /// The wait that C_Login(CKU_CONTEXT_SPECIFIC) ends: the latest-initialized operation still waiting.
    /// Only signing and decryption use private keys, the only keys with CKA_ALWAYS_AUTHENTICATE.
    pub fn awaiting_login(&mut self) -> Option<&mut Option<u64>> {
        let sign = self.sign.as_mut().map(|o| &mut o.awaiting_login);
        let decrypt = self.decrypt.as_mut().map(|o| &mut o.awaiting_login);
        [sign, decrypt].into_iter().flatten().filter(|w| w.is_some()).max_by_key(|w| **w)
    }
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
