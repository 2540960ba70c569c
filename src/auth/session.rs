//! The permission model's logons on PKCS#11 sessions: what the vendor interface's P11SHIM_Logon and
//! P11SHIM_LogonSign add to a session, and what its exports, imports, verifies and the session's changes of
//! a key's group (CKA_P11SHIM_GROUP) are checked against. A session's logons end with the session
//! (C_CloseSession, C_CloseAllSessions, C_Finalize) or with P11SHIM_Logoff.
//!
//! The table is touched only by those calls and by closing a session that has logons (an atomic count
//! keeps every other close off its lock); no call into the backend, the store or the HSM is made under it:
//! a logon takes the session's entry out, works, and puts it back.

use super::{Logons, Need};
use cryptoki_sys::CK_SESSION_HANDLE;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a challenge for a signature logon stays usable.
pub const CHALLENGE_LIFETIME: Duration = Duration::from_secs(60);

/// One session's logons and its outstanding challenges (one per user name, each usable once).
#[derive(Default)]
pub struct SessionAuth {
    pub logons: Logons,
    challenges: HashMap<String, (Vec<u8>, Instant)>,
}

impl SessionAuth {
    /// Remembers `message` as the challenge issued to `name` (replacing an earlier one).
    pub fn issue(&mut self, name: &str, message: Vec<u8>) {
        self.challenges.insert(name.to_string(), (message, Instant::now()));
    }

    /// The challenge issued to `name`, if it is still fresh; it is gone afterwards either way.
    pub fn redeem(&mut self, name: &str) -> Option<Vec<u8>> {
        let (message, issued) = self.challenges.remove(name)?;
        (issued.elapsed() <= CHALLENGE_LIFETIME).then_some(message)
    }

    fn is_empty(&self) -> bool {
        self.logons.is_empty() && self.challenges.is_empty()
    }
}

static TABLE: Mutex<Option<HashMap<CK_SESSION_HANDLE, SessionAuth>>> = Mutex::new(None);
/// Entries in TABLE: a session close looks at the table only when there are some.
static ENTRIES: AtomicUsize = AtomicUsize::new(0);

fn table() -> std::sync::MutexGuard<'static, Option<HashMap<CK_SESSION_HANDLE, SessionAuth>>> {
    TABLE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes the session's entry out of the table (an empty one if it has none), to be worked on without the
/// lock and handed back with [`put`].
pub fn take(session: CK_SESSION_HANDLE) -> SessionAuth {
    let mut table = table();
    let taken = table.as_mut().and_then(|t| t.remove(&session));
    if taken.is_some() {
        ENTRIES.fetch_sub(1, Ordering::Relaxed);
    }
    taken.unwrap_or_default()
}

/// Puts a session's entry back (dropped if it holds nothing).
pub fn put(session: CK_SESSION_HANDLE, auth: SessionAuth) {
    if auth.is_empty() {
        return;
    }
    let mut table = table();
    if table.get_or_insert_with(HashMap::new).insert(session, auth).is_none() {
        ENTRIES.fetch_add(1, Ordering::Relaxed);
    }
}

/// Whether the session's logged-on users together have `need`: `Err` names what was missing (for the audit
/// trail) and the users (the audit trail's who); `Ok` gives the users' names.
pub fn require(session: CK_SESSION_HANDLE, need: Need) -> Result<String, (String, String)> {
    let table = table();
    let logons = table.as_ref().and_then(|t| t.get(&session)).map(|a| &a.logons);
    let who = logons.map(Logons::who).unwrap_or_else(|| "-".into());
    match logons {
        Some(logons) => logons.require(need).map(|()| who.clone()).map_err(|d| (d.to_string(), who)),
        None => Err((Logons::new().require(need).err().map(|d| d.to_string()).unwrap_or_default(), who)),
    }
}

/// The session was closed: its logons end.
pub fn closed(session: CK_SESSION_HANDLE) {
    if ENTRIES.load(Ordering::Relaxed) == 0 {
        return;
    }
    drop(take(session));
}

/// Every session is gone (C_Finalize, a fork's child): every logon ends.
pub fn clear() {
    let mut table = table();
    if let Some(t) = table.take() {
        ENTRIES.fetch_sub(t.len(), Ordering::Relaxed);
    }
}
