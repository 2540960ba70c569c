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
    /// Opens the token `label`. Refused (a configuration error) when a `[[slot]]` of the config names a token
    /// the backend does not have: a typo there would make a slot silently pass-through.
    pub fn open(config: &Config, label: &str) -> Result<Token> {
        Token::open_with(config, label, true)
    }

    /// As `open`, without the check of the config's other slots (`p11shim status` reports them instead).
    pub fn open_lenient(config: &Config, label: &str) -> Result<Token> {
        Token::open_with(config, label, false)
    }

    fn open_with(config: &Config, label: &str, check_slots: bool) -> Result<Token> {
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
        let present = match tokens(backend) {
            Ok(present) => present,
            Err(e) => {
                finalize();
                return Err(e);
            }
        };
        let missing = if check_slots { missing_slots(config, backend, &present) } else { Vec::new() };
        if !missing.is_empty() {
            finalize();
            return Err(Error::Config {
                path: config.source.clone(),
                cause: format!("{}: fix the label (`p11shim status` shows every slot)", missing.join("; ")),
            });
        }
        let Some(slot) = present.iter().find(|(_, l)| l == label).map(|(slot, _)| *slot) else {
            finalize();
            let hint = label_hint(label, present.iter().map(|(_, l)| l.as_str()));
            return Err(Error::Missing(format!(
                "no initialized token labelled {label:?} in {}{hint} (list them with `p11shim status` or `pkcs11-tool --module {} -L`)",
                backend.path.display(),
                backend.path.display()
            )));
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
            Error::Rv(CKR_PIN_INCORRECT) => {
                Error::Denied(format!("token {:?}: wrong {who} PIN (CKR_PIN_INCORRECT)", self.label))
            }
            Error::Rv(CKR_PIN_LOCKED) => {
                Error::Denied(format!("token {:?}: the {who} PIN is locked (CKR_PIN_LOCKED)", self.label))
            }
            Error::Rv(rv) if Error::Rv(rv).kind() == crate::error::ErrorKind::Denied => {
                Error::Denied(format!("token {:?}: {who} login failed: {}", self.label, rv_name(rv)))
            }
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

/// The labels of the backend's initialized tokens, with their slots (the backend must be initialized).
pub fn tokens(backend: &Backend) -> Result<Vec<(CK_SLOT_ID, String)>> {
    let mut tokens = Vec::new();
    for slot in backend.slot_list(true)? {
        if let Ok(info) = backend.token_info(slot) {
            if info.flags & CKF_TOKEN_INITIALIZED != 0 {
                tokens.push((slot, crate::hsm::padded_text(&info.label)));
            }
        }
    }
    Ok(tokens)
}

/// One message for each `[[slot]]` of the config whose token the backend does not have: it names the label,
/// lists the labels present and suggests the nearest. Such a slot is pass-through until a
/// token with its label appears, so keys made there go into the HSM and not into the key store.
pub fn missing_slots(config: &Config, backend: &Backend, present: &[(CK_SLOT_ID, String)]) -> Vec<String> {
    let labels: Vec<&str> = present.iter().map(|(_, l)| l.as_str()).collect();
    config
        .slots
        .iter()
        .filter(|s| !labels.contains(&s.token.as_str()))
        .map(|s| {
            let list = if labels.is_empty() {
                "it has no initialized token".to_string()
            } else {
                format!("its tokens: {}", labels.iter().map(|l| format!("{l:?}")).collect::<Vec<_>>().join(", "))
            };
            let hint = label_hint(&s.token, labels.iter().copied());
            format!("[[slot]] token = {:?} names no token of {} ({list}){hint}", s.token, backend.path.display())
        })
        .collect()
}

/// "; did you mean "LABEL"?" for the token label nearest to `label`, or nothing.
fn label_hint<'a>(label: &str, labels: impl IntoIterator<Item = &'a str>) -> String {
    nearest(label, labels).first().map(|n| format!("; did you mean {n:?}?")).unwrap_or_default()
}

/// The candidates closest to `word` (edit distance at most a third of its length, at least 2), nearest
/// first, at most three: for "did you mean" hints on labels and group names.
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    let lower = word.to_lowercase();
    let mut scored: Vec<(usize, &str)> = candidates
        .into_iter()
        .filter(|c| *c != word)
        .map(|c| {
            let c_lower = c.to_lowercase();
            // A prefix ("Pay" for "Payments") is as near as a typo.
            let d = if c_lower.starts_with(&lower) || lower.starts_with(&c_lower) {
                1
            } else {
                edit_distance(&lower, &c_lower)
            };
            (d, c)
        })
        .filter(|(d, _)| *d <= limit)
        .collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().take(3).map(|(_, c)| c).collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            let next = (row[j + 1] + 1).min(row[j] + 1).min(prev + cost);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
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
    let mut set = set;
    if set.is_device() {
        let store = crate::store::open_with(&config.store_url, &config.store)?;
        mbk::attach_seal(&mut set, token.backend, token.session, store.as_ref(), true)?;
    }
    Ok(set)
}

/// `p11shim mbk show`: the key set's fingerprint (no PIN needed: both keys are public objects).
pub fn mbk_show(config: &Config, label: &str) -> Result<MbkSet> {
    let token = Token::open(config, label)?;
    mbk::find(token.backend, token.session, token.slot)?.ok_or_else(|| Error::Missing(mbk::missing(label)))
}

/// The spec's name of a mechanism the MBK may use.
pub fn mechanism_name(m: CK_MECHANISM_TYPE) -> &'static str {
    match m {
        CKM_AES_KEY_WRAP_PAD => "CKM_AES_KEY_WRAP_PAD (RFC 5649)",
        CKM_AES_KEY_WRAP_KWP => "CKM_AES_KEY_WRAP_KWP (RFC 5649)",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::nearest;

    #[test]
    fn typos_and_prefixes_are_near_and_strangers_are_not() {
        assert_eq!(nearest("paymnets", ["payments", "hr", "Paymaster"]), vec!["payments"]);
        assert_eq!(nearest("Pay", ["Payments", "PayOut", "HR"]), vec!["PayOut", "Payments"]);
        assert!(nearest("xyz", ["payments", "hr-records"]).is_empty());
        assert!(nearest("same", ["same"]).is_empty());
    }
}
