//! C_FindObjects on database slots: stored keys matching the template (from the store, with indexed
//! columns narrowing the query), then the backend's own objects, less the shim's (the MBK set and the HSM
//! copies of stored keys, which are the shim's business).

use super::{lock, Vault};
use crate::attrs::{Template, CKA_P11SHIM_GROUP};
use crate::config::SlotConfig;
use crate::error::{Error, Result};
use crate::store::KeyQuery;
use cryptoki_sys::*;
use std::collections::{HashSet, VecDeque};

/// One application session's find in progress.
pub struct FindState {
    stored: VecDeque<CK_OBJECT_HANDLE>,
    /// Whether the backend's own objects can match (then its find runs too).
    native: bool,
    hidden: HashSet<CK_OBJECT_HANDLE>,
}

impl Vault {
    /// Starts a find; returns the template to pass to the backend's C_FindObjectsInit, or None when only
    /// stored keys can match (a template naming a group).
    pub fn find_init(
        &self,
        session: CK_SESSION_HANDLE,
        slot: CK_SLOT_ID,
        policy: &SlotConfig,
        template: &Template,
    ) -> Result<Option<Template>> {
        if lock(&self.finds).contains_key(&session) {
            return Err(Error::Rv(CKR_OPERATION_ACTIVE));
        }
        let mut native_template = template.clone();
        let group = native_template.remove(CKA_P11SHIM_GROUP);
        let group = group.map(|a| String::from_utf8_lossy(a.as_bytes().unwrap_or_default()).into_owned());
        let logged_in = self.user_logged_in(session)?;
        let mut stored = VecDeque::new();
        if template.bool(CKA_TOKEN) != Some(false) {
            let query = KeyQuery {
                token: policy.token.clone(),
                group,
                class: template.ulong(CKA_CLASS),
                key_type: template.ulong(CKA_KEY_TYPE),
                label: template.bytes(CKA_LABEL).map(<[u8]>::to_vec),
                ckid: template.bytes(CKA_ID).map(<[u8]>::to_vec),
            };
            let store = self.store()?;
            // Read before the rows: they are current at this generation (or later).
            let generation = self.logged("checking the key store for changes", store.generation())?;
            let rows = self.logged("finding stored keys", store.find(&query))?;
            for row in rows {
                let Some(attrs) = Template::decode(&row.attrs) else { continue };
                let visible = logged_in || attrs.bool(CKA_PRIVATE) == Some(false);
                let mut own = attrs;
                own.set(crate::attrs::Attr::bool(CKA_TOKEN, true));
                if visible && own.matches(&native_template) {
                    let (handle, key) = self.handle_for(&row.id, slot);
                    // Its first use needs no second read of the row (its MAC is checked then).
                    self.keep(&key, std::sync::Arc::new(row), generation, false);
                    stored.push_back(handle);
                }
            }
        }
        let native = template.get(CKA_P11SHIM_GROUP).is_none();
        if native {
            // The MBK set is the shim's: learn its handles so the backend's find can leave it out.
            let _ = self.mbk(slot, &policy.token);
        }
        // The HSM copies of stored keys are hidden too, through `copies` (not a walk over every key).
        let hidden: HashSet<CK_OBJECT_HANDLE> = self.mbk_handles(slot).into_iter().collect();
        lock(&self.finds).insert(session, FindState { stored, native, hidden });
        Ok(native.then_some(native_template))
    }

    /// Up to `max` stored keys of the session's find; whether the backend's find runs too; None when the
    /// session has no find of the vault's.
    pub fn find_take(&self, session: CK_SESSION_HANDLE, max: usize) -> Option<(Vec<CK_OBJECT_HANDLE>, bool)> {
        let mut finds = lock(&self.finds);
        let state = finds.get_mut(&session)?;
        let n = max.min(state.stored.len());
        Some((state.stored.drain(..n).collect(), state.native))
    }

    /// Whether a backend handle found in the session's find is the shim's own, not the application's.
    pub fn find_hides(&self, session: CK_SESSION_HANDLE, handle: CK_OBJECT_HANDLE) -> bool {
        lock(&self.copies).contains(&handle)
            || lock(&self.finds).get(&session).is_some_and(|s| s.hidden.contains(&handle))
    }

    /// Ends the session's find; whether the backend's find was running (None: not the vault's find).
    pub fn find_final(&self, session: CK_SESSION_HANDLE) -> Option<bool> {
        lock(&self.finds).remove(&session).map(|s| s.native)
    }
}
