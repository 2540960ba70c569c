//! C_FindObjects on database slots: stored keys matching the template (from the store, with indexed
//! columns narrowing the query), then the backend's own objects, less the shim's own (the MBK set, the HSM
//! copies of stored keys, objects being made). The token's own token objects belong to the token's group, so
//! a find by that group finds them too.

use super::{lock, Vault};
use crate::attrs::{Template, CKA_P11SHIM_GROUP};
use crate::config::SlotConfig;
use crate::error::{Error, Result};
use crate::store::KeyQuery;
use cryptoki_sys::*;
use std::collections::VecDeque;

/// One application session's find in progress.
pub struct FindState {
    stored: VecDeque<CK_OBJECT_HANDLE>,
    /// Whether the backend's own objects can match (then its find runs too).
    native: bool,
}

impl Vault {
    /// Starts a find; returns the template to pass to the backend's C_FindObjectsInit, or None when only
    /// stored keys can match (a template naming a group other than the token's).
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
                let Some(attrs) = Template::decode(&row.attrs) else {
                    crate::warn!(
                        "key store {}: row {} has attributes that cannot be decoded: left out of the find",
                        store.describe(),
                        row.id
                    );
                    continue;
                };
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
        let native = match template.get(CKA_P11SHIM_GROUP) {
            None => true,
            // Session objects have no group; the token's own objects have the token's.
            Some(_) if template.bool(CKA_TOKEN) == Some(false) => false,
            Some(g) => g.as_bytes() == Some(policy.default_group.as_bytes()),
        };
        if native && template.get(CKA_P11SHIM_GROUP).is_some() {
            native_template.set(crate::attrs::Attr::bool(CKA_TOKEN, true));
        }
        if native {
            // The MBK set is the shim's: its keys must be known as such before the backend's find lists them.
            self.claim_mbk(slot);
        }
        lock(&self.finds).insert(session, FindState { stored, native });
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

    /// Whether a backend handle found by the backend's find is the shim's own, not the application's.
    pub fn find_hides(&self, handle: CK_OBJECT_HANDLE) -> bool {
        crate::objects::is_owned(handle)
    }

    /// Ends the session's find; whether the backend's find was running (None: not the vault's find).
    pub fn find_final(&self, session: CK_SESSION_HANDLE) -> Option<bool> {
        lock(&self.finds).remove(&session).map(|s| s.native)
    }
}
