//! C_InitToken of a database slot. The spec destroys every token object, so the token's stored keys go with
//! it: their rows are deleted, and a new MBK set is made with the SO PIN the call gives, leaving an empty,
//! working database slot. Every such initialization is audited.
//!
//! A store shared by several hosts (PostgreSQL) is different: the token's rows there are the keys of every
//! host holding that token's MBK, and one host re-initializing its HSM must not destroy them. So there the
//! call is refused while the store holds rows of the token, before the HSM is touched.

use super::{lock, Vault};
use crate::admin::Pin;
use crate::backup::mbk;
use crate::error::{Error, Result};
use crate::objects;
use crate::sessions;
use crate::store::KeyQuery;
use cryptoki_sys::*;

/// What initializing a token does to the key store.
pub struct InitPlan {
    /// The database slots whose rows go: the token's label before and after.
    labels: Vec<String>,
    /// The label the token gets, when it names a database slot: its MBK set is made.
    new_database: Option<String>,
}

impl Vault {
    /// What C_InitToken(slot, …, `label`) does to the key store, or None when neither the token nor its new
    /// label is a database slot. Refused (CKR_TOKEN_WRITE_PROTECTED, logged) on a shared store holding rows
    /// of the token.
    pub fn init_plan(&self, slot: CK_SLOT_ID, label: &str) -> Result<Option<InitPlan>> {
        let old = self
            .backend
            .token_info(slot)
            .ok()
            .filter(|info| info.flags & CKF_TOKEN_INITIALIZED != 0)
            .map(|info| crate::hsm::padded_text(&info.label));
        let is_database = |l: &str| self.slots.iter().any(|s| s.token == l);
        let mut labels: Vec<String> = old.into_iter().filter(|l| is_database(l)).collect();
        if is_database(label) && !labels.iter().any(|l| l == label) {
            labels.push(label.to_string());
        }
        if labels.is_empty() {
            return Ok(None);
        }
        let store = self.store()?;
        if self.url.starts_with("postgres") {
            for l in &labels {
                let rows = self.logged(
                    "reading the key store",
                    store.find(&KeyQuery { token: l.clone(), ..Default::default() }),
                )?;
                if !rows.is_empty() {
                    crate::error!(
                        "C_InitToken of database slot {l:?} refused: the shared key store {} holds {} stored keys of that token, which other hosts with the same MBK use too; initializing would destroy them for every host. Delete them first (or back them up and restore after), or initialize the token with the HSM vendor's tool",
                        store.describe(),
                        rows.len()
                    );
                    return Err(Error::Rv(CKR_TOKEN_WRITE_PROTECTED));
                }
            }
        }
        Ok(Some(InitPlan { labels, new_database: is_database(label).then(|| label.to_string()) }))
    }

    /// Before the backend's C_InitToken: the shim's own sessions on the slot would make it fail
    /// (CKR_SESSION_EXISTS), and what the shim holds in the token goes with them. The keys stay known: if the
    /// backend refuses (a wrong SO PIN), they work on; if it initializes the token, their rows are deleted and
    /// their next use finds them gone.
    pub fn release_slot(&self, slot: CK_SLOT_ID) {
        for s in lock(&self.pool).remove(&slot).unwrap_or_default() {
            sessions::closed_internal(s);
            let _ = self.backend.close_session(s);
        }
        for key in objects::stored_keys().into_iter().filter(|k| k.slot == slot) {
            // The copy was a session object of a session just closed.
            if let Some(h) = key.take_copy(false) {
                objects::disown(h);
            }
        }
        if let Some(set) = lock(&self.mbks).remove(&slot) {
            for h in set.handles() {
                objects::disown(h);
            }
        }
        // SoftHSM2 renumbers its slots after C_InitToken: what is known of every slot may be stale.
        self.policy.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// After the backend's C_InitToken succeeded: the token's rows are deleted and, when its label names a
    /// database slot, its MBK set is made as the SO. Audited either way.
    pub fn initialized(&self, plan: &InitPlan, so_pin: &Pin) -> Result<()> {
        let store = self.store()?;
        let mut deleted = 0u64;
        for label in &plan.labels {
            let rows = self.logged(
                "reading the key store",
                store.find(&KeyQuery { token: label.clone(), ..Default::default() }),
            )?;
            for row in rows {
                if self.logged("deleting a stored key", store.delete(&row.id))? {
                    deleted += 1;
                }
            }
        }
        let made = match &plan.new_database {
            Some(label) => self.make_mbk(label, so_pin).map(Some),
            None => Ok(None),
        };
        let who = format!("pkcs11-so@{}", plan.new_database.as_deref().unwrap_or(&plan.labels[0]));
        let result = match &made {
            Ok(Some((fp, _))) if self.backend.device_mbk.is_some() => {
                format!("ok: {deleted} stored keys destroyed; the HSM's own MBK {fp} is used")
            }
            Ok(Some((fp, _))) => format!("ok: {deleted} stored keys destroyed; new MBK set {fp}"),
            Ok(None) => format!("ok: {deleted} stored keys destroyed; the token is no longer a database slot"),
            Err(e) => format!("failed: {deleted} stored keys destroyed, but no MBK set: {e}"),
        };
        let action = format!("init-token {}", plan.labels.join(", "));
        // The token's old MBK set is gone with it: the entry is sealed with the new one, if it was made; else
        // it is unsealed, which the log accepts only while none of its entries is sealed (else it is refused
        // and the log line below is the record).
        let record = |t: &crate::audit::Trail| t.record(&who, &action, "", deleted as i64, &result);
        let recorded = match (&made, &plan.new_database) {
            (Ok(Some((_, slot))), Some(label)) => self.with_new_set(*slot, label, record),
            _ => self.audit_trail(None).map(|t| record(&t)),
        };
        match recorded {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => crate::error!("C_InitToken: {e}"),
            Err(e) => crate::error!("C_InitToken: {e}"),
        }
        crate::info!("C_InitToken of database slot {}: {result}", plan.labels.join(", "));
        made.map(|_| ())
    }

    /// Calls `f` with the audit trail sealed by the freshly made MBK set of `label`, on a session of the shim's
    /// own opened for it and closed after it: a session left open would keep the token's login (the SO's,
    /// next) alive after the application closes its own, as PKCS#11 logs out only with the last session.
    fn with_new_set<R>(&self, slot: CK_SLOT_ID, label: &str, f: impl FnOnce(&crate::audit::Trail) -> R) -> Result<R> {
        let session = self.backend.open_session(slot, CKF_SERIAL_SESSION)?;
        sessions::opened_internal(session, slot);
        let result = (|| {
            let mut set = mbk::find(self.backend, session, slot)?.ok_or_else(|| Error::Missing(mbk::missing(label)))?;
            mbk::attach_seal(&mut set, self.backend, session, self.store()?, true)?;
            let sealer = mbk::HsmSealer { backend: self.backend, session, set: &set };
            Ok(f(&self.audit_trail(Some(&sealer))?))
        })();
        sessions::closed_internal(session);
        let _ = self.backend.close_session(session);
        result
    }

    /// Makes the MBK set of the freshly initialized token `label` as its SO; its fingerprint and the token's
    /// slot.
    fn make_mbk(&self, label: &str, so_pin: &Pin) -> Result<(String, CK_SLOT_ID)> {
        let slot = self
            .backend
            .find_token(label)?
            .ok_or_else(|| Error::Other(format!("token {label:?} not found after C_InitToken")))?;
        let session = self.backend.open_session(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION)?;
        sessions::opened_internal(session, slot);
        let made = self.backend.login(session, CKU_SO, &so_pin.0).and_then(|()| {
            let set = mbk::create(self.backend, session, slot);
            let _ = self.backend.logout(session);
            set
        });
        sessions::closed_internal(session);
        let _ = self.backend.close_session(session);
        let set = made.inspect_err(|e| {
            crate::error!(
                "C_InitToken: token {label:?} was initialized, but its MBK set could not be made ({e}); create it with `p11shim mbk create --token {label}`"
            )
        })?;
        Ok((set.fingerprint, slot))
    }
}
