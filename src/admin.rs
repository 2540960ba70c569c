//! What the `p11shim` command does, as library functions: it talks to the backend directly (not through
//! the shim's C interface), with the same configuration, the same code for the MBK and the same key store.

use crate::backend::{self, Backend};
use crate::backup::mbk::{self, MbkSet};
use crate::config::Config;
use crate::error::{rv_name, Error, Result};
use cryptoki_sys::*;
use zeroize::Zeroizing;

/// A PIN, zeroized when dropped and never printed.
pub struct Pin(pub Zeroizing<Vec<u8>>);

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pin(***)")
    }
}

/// A session on a token named by its label, on the backend the config names. Logs out, closes and
/// finalizes when dropped.
pub struct Token {
    pub backend: &'static Backend,
    pub slot: CK_SLOT_ID,
    pub label: String,
    pub session: CK_SESSION_HANDLE,
    logged_in: bool,
    /// False when the backend was already initialized in this process (then it is left initialized).
    owns_backend: bool,
    /// False for an application's session lent to the shim (the C API): then nothing is closed on drop.
    owns_session: bool,
}

impl Token {
    pub fn open(config: &Config, label: &str) -> Result<Token> {
        let backend = backend::load(config)?;
        let args = CK_C_INITIALIZE_ARGS { flags: CKF_OS_LOCKING_OK, ..Default::default() };
        let owns_backend = match backend.initialize(args) {
            CKR_OK => true,
            CKR_CRYPTOKI_ALREADY_INITIALIZED => false,
            rv => {
                return Err(Error::Backend {
                    path: backend.path.clone(),
                    cause: format!("C_Initialize: {}", rv_name(rv)),
                })
            }
        };
        let finalize = || {
            if owns_backend {
                let _ = backend.finalize();
            }
        };
        let slot = match backend.find_token(label) {
            Ok(Some(slot)) => slot,
            Ok(None) => {
                finalize();
                return Err(Error::Other(format!(
                    "no initialized token labelled {label:?} in {} (list them with `pkcs11-tool --module {} -L`)",
                    backend.path.display(),
                    backend.path.display()
                )));
            }
            Err(e) => {
                finalize();
                return Err(e);
            }
        };
        let session = backend.open_session(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION).inspect_err(|_| finalize())?;
        Ok(Token {
            backend,
            slot,
            label: label.to_string(),
            session,
            logged_in: false,
            owns_backend,
            owns_session: true,
        })
    }

    /// An application's session, lent for one call (the "P11SHIM Backup" C interface): its login is the
    /// application's, and dropping the Token leaves the session and the backend as they are.
    pub fn borrowed(backend: &'static Backend, slot: CK_SLOT_ID, session: CK_SESSION_HANDLE) -> Result<Token> {
        let label = crate::hsm::padded_text(&backend.token_info(slot)?.label);
        Ok(Token { backend, slot, label, session, logged_in: false, owns_backend: false, owns_session: false })
    }

    pub fn login(&mut self, user: CK_USER_TYPE, pin: &Pin) -> Result<()> {
        self.logout();
        let who = if user == CKU_SO { "SO" } else { "user" };
        self.backend.login(self.session, user, &pin.0).map_err(|e| match e {
            Error::Rv(CKR_PIN_INCORRECT) => Error::Other(format!("token {:?}: wrong {who} PIN", self.label)),
            Error::Rv(CKR_PIN_LOCKED) => Error::Other(format!("token {:?}: the {who} PIN is locked", self.label)),
            e => Error::Other(format!("token {:?}: {who} login failed: {e}", self.label)),
        })?;
        self.logged_in = true;
        Ok(())
    }

    pub fn logout(&mut self) {
        if std::mem::take(&mut self.logged_in) {
            let _ = self.backend.logout(self.session);
        }
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        if !self.owns_session {
            return;
        }
        self.logout();
        let _ = self.backend.close_session(self.session);
        if self.owns_backend {
            let _ = self.backend.finalize();
        }
    }
}

/// `p11shim mbk create`: makes the key set as the SO, then checks as the user that it works.
pub fn mbk_create(config: &Config, label: &str, so_pin: &Pin, user_pin: &Pin) -> Result<MbkSet> {
    let mut token = Token::open(config, label)?;
    token.login(CKU_SO, so_pin)?;
    let set = mbk::create(token.backend, token.session, token.slot)
        .map_err(|e| Error::Other(format!("token {label:?}: creating the master backup key: {e}")))?;
    token.login(CKU_USER, user_pin)?;
    mbk::self_test(token.backend, token.session, &set).map_err(|e| {
        Error::Other(format!(
            "token {label:?}: the master backup key was created (fingerprint {}) but the user cannot use it: {e}",
            set.fingerprint
        ))
    })?;
    Ok(set)
}

/// `p11shim mbk show`: the key set's fingerprint (no PIN needed: both keys are public objects).
pub fn mbk_show(config: &Config, label: &str) -> Result<MbkSet> {
    let token = Token::open(config, label)?;
    mbk::find(token.backend, token.session, token.slot)?.ok_or_else(|| Error::Other(mbk::missing(label)))
}

/// The spec's name of a mechanism the MBK may use.
pub fn mechanism_name(m: CK_MECHANISM_TYPE) -> &'static str {
    match m {
        CKM_AES_KEY_WRAP_PAD => "CKM_AES_KEY_WRAP_PAD (RFC 5649)",
        CKM_AES_KEY_WRAP_KWP => "CKM_AES_KEY_WRAP_KWP (RFC 5649)",
        _ => "unknown",
    }
}
