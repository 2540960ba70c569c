//! Object management on stored keys: attributes read from the row (after its MAC is checked), changes
//! written back atomically, destroy deletes the row.

use super::{create::group_value, lock, StoredKey, Vault};
use crate::attrs::{self, Attr, Template, Value, CKA_P11SHIM_GROUP};
use crate::error::{Error, Result};
use crate::store::KeyRow;
use cryptoki_sys::*;
use std::sync::Arc;

/// The answer for one attribute of a stored key.
#[derive(PartialEq, Eq)]
pub enum Answer {
    Value(Value),
    /// A secret part: no stored key's can be read (a key whose value may be read is kept in the HSM).
    Sensitive,
    /// The object has no such attribute.
    Invalid,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Value(_) => f.write_str("Value(..)"),
            Answer::Sensitive => f.write_str("Sensitive"),
            Answer::Invalid => f.write_str("Invalid"),
        }
    }
}

impl Vault {
    /// The row of a key the session may see, its MAC checked, and its attributes.
    /// Also returns the store generation the row is current at.
    pub(super) fn row_of(&self, session: CK_SESSION_HANDLE, key: &StoredKey) -> Result<(Arc<KeyRow>, Template, u64)> {
        if lock(&key.state).gone {
            return Err(Error::Rv(CKR_OBJECT_HANDLE_INVALID));
        }
        let store = self.store()?;
        let generation = self.logged("checking the key store for changes", store.generation())?;
        let Some((row, verified)) = self.current_row(store, key, generation)? else {
            return Err(Error::Rv(CKR_OBJECT_HANDLE_INVALID));
        };
        let set = self.mbk(key.slot, &row.token)?;
        let attrs = if verified {
            self.decode(&set, &row)?
        } else {
            let attrs = self.check(key.slot, &set, &row)?;
            self.keep(key, row.clone(), generation, true);
            attrs
        };
        if attrs.bool(CKA_PRIVATE) != Some(false) && !self.user_logged_in(session)? {
            return Err(Error::Rv(CKR_OBJECT_HANDLE_INVALID));
        }
        Ok((row, attrs, generation))
    }

    pub fn get_attributes(
        &self,
        session: CK_SESSION_HANDLE,
        key: &StoredKey,
        types: &[CK_ATTRIBUTE_TYPE],
    ) -> Result<Vec<Answer>> {
        let (row, attrs, _) = self.row_of(session, key)?;
        Ok(types
            .iter()
            .map(|&ty| {
                if ty == CKA_P11SHIM_GROUP {
                    return Answer::Value(Value::Bytes(row.group.as_bytes().to_vec().into()));
                }
                if ty == CKA_TOKEN {
                    return Answer::Value(Value::Bytes(vec![CK_TRUE].into()));
                }
                if let Some(a) = attrs.get(ty) {
                    return Answer::Value(a.value.clone());
                }
                if attrs::secret_parts(row.class as CK_OBJECT_CLASS, row.key_type as CK_KEY_TYPE).contains(&ty) {
                    return Answer::Sensitive;
                }
                Answer::Invalid
            })
            .collect())
    }

    /// The size the application is told: what the row holds for the key.
    pub fn object_size(&self, session: CK_SESSION_HANDLE, key: &StoredKey) -> Result<CK_ULONG> {
        let (row, _, _) = self.row_of(session, key)?;
        Ok((row.attrs.len() + row.wrapped.len()) as CK_ULONG)
    }

    /// C_SetAttributeValue on a stored key: the spec's rules for which attributes may change and how, then
    /// one atomic update of the row (retried if another process changed it meanwhile).
    pub fn set_attributes(&self, session: CK_SESSION_HANDLE, key: &StoredKey, changes: &Template) -> Result<()> {
        for _attempt in 0..5 {
            let (row, attrs, at) = self.row_of(session, key)?;
            if self.backend.session_info(session)?.flags & CKF_RW_SESSION == 0 {
                return Err(Error::Rv(CKR_SESSION_READ_ONLY));
            }
            if attrs.bool(CKA_MODIFIABLE) == Some(false) {
                return Err(Error::Rv(CKR_ACTION_PROHIBITED));
            }
            let (attrs, group) = apply_changes(attrs, &row.group, changes)?;
            let name = format!("stored key {}", key.id);
            let mover = match group != row.group {
                true => Some(self.authorize_move(session, key.slot, &row.token, &name, &row.group, &group)?),
                false => None,
            };
            let set = self.mbk(key.slot, &row.token)?;
            let wrapped = if set.is_device() && attrs::has_secret(row.class) {
                self.device_rewrap(key.slot, &row, changes)?
            } else {
                row.wrapped.clone()
            };
            let mut updated = KeyRow {
                wrapped,
                label: attrs.bytes(CKA_LABEL).unwrap_or_default().to_vec(),
                ckid: attrs.bytes(CKA_ID).unwrap_or_default().to_vec(),
                attrs: attrs.encode(),
                group,
                version: row.version + 1,
                ..KeyRow::clone(&row)
            };
            self.seal(key.slot, &set, &mut updated)?;
            let written = self.logged("updating a stored key", self.store()?.update(&updated));
            if let Some(who) = &mover {
                let ok = matches!(written, Ok(true));
                if ok || written.is_err() {
                    self.record_move(key.slot, &row.token, who, (&name, &row.group, &updated.group), ok);
                }
            }
            if written? {
                // The row as written, current when `row` was (the update checked that it still was); the HSM
                // copy carries the old flags: the next use loads the new version.
                self.keep(key, Arc::new(updated), at, true);
                self.forget_copy(key, false);
                return Ok(());
            }
            // Changed meanwhile: the row held here may be older than the store knows yet; read it again.
            lock(&key.state).kept = None;
        }
        crate::warn!("stored key {}: changed by others five times while being updated; giving up", key.id);
        Err(Error::Rv(CKR_FUNCTION_FAILED))
    }

    /// C_DestroyObject on a stored key: deletes its row; the handle is invalid afterwards everywhere.
    pub fn destroy(&self, session: CK_SESSION_HANDLE, handle: CK_OBJECT_HANDLE, key: &StoredKey) -> Result<()> {
        let (_, attrs, _) = self.row_of(session, key)?;
        if self.backend.session_info(session)?.flags & CKF_RW_SESSION == 0 {
            return Err(Error::Rv(CKR_SESSION_READ_ONLY));
        }
        if attrs.bool(CKA_DESTROYABLE) == Some(false) {
            return Err(Error::Rv(CKR_ACTION_PROHIBITED));
        }
        let deleted = self.logged("deleting a stored key", self.store()?.delete(&key.id))?;
        self.forget_copy(key, true);
        lock(&self.handles).remove(&key.id);
        crate::objects::forget(handle);
        if deleted {
            Ok(())
        } else {
            Err(Error::Rv(CKR_OBJECT_HANDLE_INVALID))
        }
    }
}

impl Vault {
    /// A device blob holds the key's attributes, which the device enforces when it restores it: an attribute
    /// change makes a new blob. The old one is restored as a session object of the shim's, the change is
    /// made there (so the HSM checks it by its own rules), and the object is backed up again.
    fn device_rewrap(&self, slot: CK_SLOT_ID, row: &KeyRow, changes: &Template) -> Result<Vec<u8>> {
        let hsm =
            Template(changes.0.iter().filter(|a| !matches!(a.ty, CKA_P11SHIM_GROUP | CKA_TOKEN)).cloned().collect());
        if hsm.0.is_empty() {
            return Ok(row.wrapped.clone());
        }
        self.with_session(slot, |s| {
            let copy = self.backend.device_restore(s, &row.wrapped, false).map_err(crate::backup::mbk::device_error)?;
            crate::objects::own(copy);
            let blob = self.backend.set_attributes(s, copy, &hsm).and_then(|()| self.backend.device_backup(s, copy));
            let _ = self.backend.destroy_object(s, copy);
            crate::objects::disown(copy);
            blob
        })
    }
}

/// Applies C_SetAttributeValue changes to a stored key's attributes (PKCS#11 2.40 §4.4 and the key tables).
fn apply_changes(mut attrs: Template, group: &str, changes: &Template) -> Result<(Template, String)> {
    let mut group = group.to_string();
    for change in &changes.0 {
        // Template attributes are fixed when a key is made (the backends answer so too).
        let value = change.as_bytes().ok_or(Error::Rv(CKR_ATTRIBUTE_READ_ONLY))?;
        if change.ty == CKA_ALLOWED_MECHANISMS && attrs.bytes(CKA_ALLOWED_MECHANISMS) != Some(value) {
            return Err(Error::Rv(CKR_ATTRIBUTE_READ_ONLY));
        }
        let current = attrs.bytes(change.ty).map(<[u8]>::to_vec);
        let flag = change.as_bool();
        match change.ty {
            CKA_P11SHIM_GROUP => group = group_value(change)?,
            ty if attrs::MODIFIABLE.contains(&ty) => {
                if is_flag(ty) && flag.is_none() {
                    return Err(Error::Rv(CKR_ATTRIBUTE_VALUE_INVALID));
                }
                attrs.set(change.clone());
            }
            // One-way switches: sensitive only false → true, extractable only true → false, and a stored
            // key is always wrap-with-trusted.
            CKA_SENSITIVE => match (attrs.bool(CKA_SENSITIVE), flag) {
                (_, None) => return Err(Error::Rv(CKR_ATTRIBUTE_VALUE_INVALID)),
                (Some(true), Some(false)) => return Err(Error::Rv(CKR_ATTRIBUTE_READ_ONLY)),
                (_, Some(v)) => attrs.set(Attr::bool(CKA_SENSITIVE, v)),
            },
            CKA_EXTRACTABLE => match (attrs.bool(CKA_EXTRACTABLE), flag) {
                (_, None) => return Err(Error::Rv(CKR_ATTRIBUTE_VALUE_INVALID)),
                (Some(false), Some(true)) => return Err(Error::Rv(CKR_ATTRIBUTE_READ_ONLY)),
                (_, Some(v)) => attrs.set(Attr::bool(CKA_EXTRACTABLE, v)),
            },
            CKA_TOKEN if flag == Some(true) => {}
            // Read-only attributes may be "set" to the value they have.
            _ if current.as_deref() == Some(value) => {}
            CKA_WRAP_WITH_TRUSTED | CKA_TOKEN => return Err(Error::Rv(CKR_ATTRIBUTE_READ_ONLY)),
            _ if current.is_none() && !attrs::KEPT.contains(&change.ty) => {
                return Err(Error::Rv(CKR_ATTRIBUTE_TYPE_INVALID))
            }
            _ => return Err(Error::Rv(CKR_ATTRIBUTE_READ_ONLY)),
        }
    }
    Ok((attrs, group))
}

fn is_flag(ty: CK_ATTRIBUTE_TYPE) -> bool {
    !matches!(ty, CKA_LABEL | CKA_ID | CKA_START_DATE | CKA_END_DATE | CKA_SUBJECT | CKA_APPLICATION)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Template {
        Template(vec![
            Attr::bytes(CKA_LABEL, b"k"),
            Attr::bool(CKA_SIGN, true),
            Attr::bool(CKA_SENSITIVE, true),
            Attr::bool(CKA_EXTRACTABLE, false),
            Attr::ulong(CKA_CLASS, CKO_SECRET_KEY),
        ])
    }

    fn change(attrs: Vec<Attr>) -> Result<(Template, String)> {
        apply_changes(key(), "G", &Template(attrs))
    }

    #[test]
    fn modifiable_attributes_and_group_change() {
        let (t, g) = change(vec![
            Attr::bytes(CKA_LABEL, b"new"),
            Attr::bool(CKA_SIGN, false),
            Attr::bytes(CKA_P11SHIM_GROUP, b"Prod"),
        ])
        .unwrap();
        assert_eq!(t.bytes(CKA_LABEL), Some(&b"new"[..]));
        assert_eq!(t.bool(CKA_SIGN), Some(false));
        assert_eq!(g, "Prod");
    }

    #[test]
    fn one_way_attributes_only_go_one_way() {
        let rv = |r: Result<(Template, String)>| r.map(|_| ()).map_err(|e| e.rv());
        assert_eq!(rv(change(vec![Attr::bool(CKA_SENSITIVE, false)])), Err(CKR_ATTRIBUTE_READ_ONLY));
        assert_eq!(rv(change(vec![Attr::bool(CKA_EXTRACTABLE, true)])), Err(CKR_ATTRIBUTE_READ_ONLY));
        assert_eq!(rv(change(vec![Attr::bool(CKA_WRAP_WITH_TRUSTED, false)])), Err(CKR_ATTRIBUTE_READ_ONLY));
        assert_eq!(rv(change(vec![Attr::ulong(CKA_CLASS, CKO_DATA)])), Err(CKR_ATTRIBUTE_READ_ONLY));
        assert_eq!(rv(change(vec![Attr::ulong(CKA_CLASS, CKO_SECRET_KEY)])), Ok(()));
        assert_eq!(rv(change(vec![Attr::bytes(CKA_P11SHIM_GROUP, b"")])), Err(CKR_ATTRIBUTE_VALUE_INVALID));
        assert_eq!(rv(change(vec![Attr::bytes(CKA_SIGN, b"xx")])), Err(CKR_ATTRIBUTE_VALUE_INVALID));
    }
}
