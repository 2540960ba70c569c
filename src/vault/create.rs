//! Making stored keys: the object is made in the HSM as a session object of the application's session
//! (so the backend applies its own rules to the template and the mechanism), read back, wrapped under the
//! MBK, sealed with a MAC and inserted; then the temporary object is destroyed. The first use loads it
//! again under the shim's own session. A crash at any point leaves either no row or a complete one.

use super::{new_id, Vault};
use crate::attrs::{self, Attr, Template, CKA_P11SHIM_GROUP};
use crate::backup::mbk::MbkSet;
use crate::config::SlotConfig;
use crate::error::{Error, Result};
use crate::store::KeyRow;
use cryptoki_sys::*;

/// What the application asked for that the HSM object does not carry.
pub(super) struct Request {
    group: String,
    extractable: bool,
}

/// A template of the application's for a stored object, and what the vault learned from it.
pub struct Prepared {
    pub template: Template,
    request: Request,
}

impl Vault {
    /// Turns an application's template for a token object into one for the temporary session object: takes
    /// out the group, remembers CKA_EXTRACTABLE, and for secrets asks for "extractable only under a trusted
    /// key" (the MBK is the trusted key that wraps it).
    pub fn prepare(&self, policy: &SlotConfig, mut template: Template, secret: bool) -> Result<Prepared> {
        let group = match template.remove(CKA_P11SHIM_GROUP) {
            Some(a) => group_value(&a)?,
            None => policy.default_group.clone(),
        };
        if let Some(a) = template.0.iter().find(|a| attrs::is_array_type(a.ty)) {
            crate::warn!(
                "a stored key cannot carry attribute {:#x} (a template attribute); create it with CKA_TOKEN=false or in a slot without storage = \"database\"",
                a.ty
            );
            return Err(Error::Rv(CKR_TEMPLATE_INCONSISTENT));
        }
        let extractable = template.bool(CKA_EXTRACTABLE).unwrap_or(true);
        template.set(Attr::bool(CKA_TOKEN, false));
        if secret {
            template.set(Attr::bool(CKA_EXTRACTABLE, true));
            template.set(Attr::bool(CKA_WRAP_WITH_TRUSTED, true));
        }
        Ok(Prepared { template, request: Request { group, extractable } })
    }

    /// Checks what every creation needs before anything is made: a read/write session and an MBK.
    pub fn ready(&self, session: CK_SESSION_HANDLE, slot: CK_SLOT_ID, policy: &SlotConfig) -> Result<MbkSet> {
        let info = self.backend.session_info(session)?;
        if info.flags & CKF_RW_SESSION == 0 {
            return Err(Error::Rv(CKR_SESSION_READ_ONLY));
        }
        self.store()?;
        self.mbk(slot, &policy.token)
    }

    /// Stores the object `temp` (a session object of the application's) as a token object; destroys `temp`
    /// whatever happens. Returns the application's handle for the stored key.
    pub fn adopt(
        &self,
        session: CK_SESSION_HANDLE,
        slot: CK_SLOT_ID,
        policy: &SlotConfig,
        set: &MbkSet,
        temp: CK_OBJECT_HANDLE,
        prepared: &Prepared,
    ) -> Result<CK_OBJECT_HANDLE> {
        let stored = self.store_row(slot, policy, set, temp, &prepared.request);
        if let Err(e) = self.backend.destroy_object(session, temp) {
            crate::warn!("destroying the temporary copy of a new stored key failed: {e}");
        }
        let (row, at) = stored?;
        let (handle, key) = self.handle_for(&row.id, slot);
        // This process made the row: its first use needs neither a read nor a MAC check.
        self.keep(&key, std::sync::Arc::new(row), at, true);
        Ok(handle)
    }

    fn store_row(
        &self,
        slot: CK_SLOT_ID,
        policy: &SlotConfig,
        set: &MbkSet,
        temp: CK_OBJECT_HANDLE,
        request: &Request,
    ) -> Result<(KeyRow, u64)> {
        let store = self.store()?;
        let (view, wrapped, class) = self.with_session(slot, |s| {
            let class = self
                .backend
                .attributes(s, temp, &[CKA_CLASS])?
                .ulong(CKA_CLASS)
                .ok_or_else(|| Error::Other("the new object has no CKA_CLASS".into()))?;
            let secret = attrs::has_secret(class);
            let mut types = attrs::KEPT.to_vec();
            if !secret {
                types.extend_from_slice(attrs::PUBLIC_VALUES);
            }
            let view = self.backend.attributes(s, temp, &types)?;
            let wrapped =
                if secret { self.backend.wrap_key(s, &set.wrap_mechanism(), set.mbk, temp)? } else { Vec::new() };
            Ok((view, wrapped, class))
        })?;
        let view = application_view(view, class, request);
        let mut row = KeyRow {
            id: new_id()?,
            token: policy.token.clone(),
            group: request.group.clone(),
            class,
            key_type: view.ulong(CKA_KEY_TYPE).unwrap_or(CK_UNAVAILABLE_INFORMATION),
            label: view.bytes(CKA_LABEL).unwrap_or_default().to_vec(),
            ckid: view.bytes(CKA_ID).unwrap_or_default().to_vec(),
            attrs: view.encode(),
            wrapped,
            wrap_mech: set.wrap,
            mbk: set.fingerprint.clone(),
            mac: Vec::new(),
            version: 1,
        };
        self.seal(slot, set, &mut row)?;
        let at = self.logged("checking the key store for changes", store.generation())?;
        self.logged("storing a new key", store.insert(&row))?;
        crate::debug!("stored key {} (group {:?}) created", row.id, row.group);
        Ok((row, at))
    }
}

/// The attributes the application sees: a token object, extractable as it asked (the HSM copy is
/// extractable only under the MBK, which the application cannot use).
fn application_view(mut view: Template, class: CK_OBJECT_CLASS, request: &Request) -> Template {
    view.set(Attr::bool(CKA_TOKEN, true));
    if attrs::has_secret(class) {
        view.set(Attr::bool(CKA_EXTRACTABLE, request.extractable));
        let local = view.bool(CKA_LOCAL).unwrap_or(false);
        view.set(Attr::bool(CKA_NEVER_EXTRACTABLE, local && !request.extractable));
        view.set(Attr::bool(CKA_WRAP_WITH_TRUSTED, true));
    }
    view
}

/// A CKA_P11SHIM_GROUP value: non-empty UTF-8 without control characters.
pub(super) fn group_value(a: &Attr) -> Result<String> {
    let text = a.as_bytes().and_then(|b| std::str::from_utf8(b).ok());
    match text {
        Some(g) if !g.is_empty() && !g.chars().any(char::is_control) => Ok(g.to_string()),
        _ => {
            crate::warn!("CKA_P11SHIM_GROUP must be non-empty UTF-8 text without control characters");
            Err(Error::Rv(CKR_ATTRIBUTE_VALUE_INVALID))
        }
    }
}
