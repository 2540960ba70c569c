//! The object functions the shim writes by hand (PKCS#11 2.40 §5.7, §5.13, §5.6 C_Logout). On a database
//! slot, token objects the application creates become stored keys, and stored keys are found,
//! read, changed and destroyed through the vault. Everywhere, the group attribute (CKA_P11SHIM_GROUP) is
//! the shim's and never reaches the backend. Without database slots these are the plain forwarders of A
//! plus one check of the template for the group attribute.

use super::{args, guard, lifecycle::active};
use crate::attrs::{Attr, Template, Value, CKA_P11SHIM_GROUP};
use crate::config::SlotConfig;
use crate::hsm::AppMechanism;
use crate::objects;
use crate::vault::{self, Answer, Made, PublicHalf, Request, Vault};
use cryptoki_sys::*;
use std::sync::Arc;

type Rv = Result<CK_RV, CK_RV>;

/// A database slot's vault and config, for an application session.
#[derive(Clone)]
struct Database {
    vault: Arc<Vault>,
    slot: CK_SLOT_ID,
    policy: SlotConfig,
}

fn database(session: CK_SESSION_HANDLE) -> Option<Database> {
    let vault = vault::current()?;
    let (slot, policy) = vault.database_slot(session)?;
    Some(Database { vault, slot, policy })
}

/// The group attribute outside a stored key's template: refused with a clear reason.
fn group_not_here() -> CK_RV {
    crate::warn!(
        "CKA_P11SHIM_GROUP applies only to token objects (CKA_TOKEN=true) created in a slot with storage = \"database\"; refused"
    );
    CKR_ATTRIBUTE_TYPE_INVALID
}

/// The application's creation template when it asks for a stored object: a token object in a database
/// slot. `Ok(None)`: create as the backend does.
///
/// # Safety
/// `template`/`count` are the application's template.
unsafe fn stored_creation(
    session: CK_SESSION_HANDLE,
    template: *const CK_ATTRIBUTE,
    count: CK_ULONG,
) -> Result<Option<(Database, Request)>, CK_RV> {
    // SAFETY: the caller's promise.
    let has_group = unsafe { args::names(template, count, CKA_P11SHIM_GROUP) };
    let db = match database(session) {
        Some(db) => db,
        None if has_group => return Err(group_not_here()),
        None => return Ok(None),
    };
    // SAFETY: the caller's promise.
    let parsed = unsafe { args::template(template, count) }?;
    if parsed.bool(CKA_TOKEN) != Some(true) {
        return if has_group { Err(group_not_here()) } else { Ok(None) };
    }
    let request = db.vault.request(&db.policy, parsed)?;
    Ok(Some((db, request)))
}

/// Makes a token object of the application's in a database slot (stored, or kept in the HSM) with `make`,
/// and writes its handle.
fn create_stored(
    session: CK_SESSION_HANDLE,
    db: &Database,
    request: &Request,
    shape: Option<Vec<u8>>,
    out: *mut CK_OBJECT_HANDLE,
    make: &dyn Fn(&Template) -> crate::error::Result<CK_OBJECT_HANDLE>,
) -> Rv {
    if out.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    let class = request.exact.ulong(CKA_CLASS);
    let made = db.vault.create(session, db.slot, &db.policy, request, class, shape, &PublicHalf::Plain, &|t| {
        make(t).map(|key| Made { key, public: None })
    })?;
    // SAFETY: checked non-NULL; the application passes room for a handle.
    unsafe { args::write_out(out, made.key) }?;
    Ok(CKR_OK)
}

/// C_CreateObject (§5.7).
pub(crate) unsafe extern "C" fn C_CreateObject(
    s: CK_SESSION_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    object: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_CreateObject", || {
        let backend = active()?;
        // SAFETY: the application's template.
        if let Some((db, request)) = unsafe { stored_creation(s, template, count) }? {
            return create_stored(s, &db, &request, None, object, &|t| backend.create_object(s, t));
        }
        let f = backend.f.C_CreateObject.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
        // SAFETY: the application's template (checked, not copied: it goes to the backend as it is).
        unsafe { args::check_template(template, count, args::TemplateKind::Input) }?;
        // SAFETY: the application's arguments, unchanged.
        let rv = unsafe { f(s, template, count, object) };
        Ok(out_handle(rv, object))
    })
}

/// C_GenerateKey (§5.13).
pub(crate) unsafe extern "C" fn C_GenerateKey(
    s: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_GenerateKey", || {
        let backend = active()?;
        // SAFETY: the application's template.
        if let Some((db, request)) = unsafe { stored_creation(s, template, count) }? {
            // SAFETY: the application's mechanism, valid during this call.
            let mech = unsafe { AppMechanism::new(mechanism) };
            let kind = mech.kind().ok_or(CKR_ARGUMENTS_BAD)?;
            let shape = vault::shape_key(db.slot, kind, &[&request.exact]);
            return create_stored(s, &db, &request, Some(shape), key, &|t| backend.generate_key_app(s, mech, t));
        }
        let f = backend.f.C_GenerateKey.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
        // SAFETY: the application's template (checked, not copied: it goes to the backend as it is).
        unsafe { args::check_template(template, count, args::TemplateKind::Input) }?;
        // SAFETY: the application's arguments, unchanged.
        let rv = unsafe { f(s, mechanism, template, count, key) };
        Ok(out_handle(rv, key))
    })
}

/// C_UnwrapKey (§5.13).
pub(crate) unsafe extern "C" fn C_UnwrapKey(
    s: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    unwrapping_key: CK_OBJECT_HANDLE,
    wrapped: *mut CK_BYTE,
    wrapped_len: CK_ULONG,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_UnwrapKey", || {
        let backend = active()?;
        let (unwrapping, _held) = objects::hold(unwrapping_key, CKR_UNWRAPPING_KEY_HANDLE_INVALID)?;
        // SAFETY: the application's template.
        if let Some((db, request)) = unsafe { stored_creation(s, template, count) }? {
            // SAFETY: the application's mechanism and wrapped bytes, valid during this call.
            let (mech, blob) = unsafe { (AppMechanism::new(mechanism), args::bytes(wrapped, wrapped_len)?) };
            return create_stored(s, &db, &request, None, key, &|t| {
                backend.unwrap_key_app(s, mech, unwrapping, blob, t)
            });
        }
        let f = backend.f.C_UnwrapKey.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
        // SAFETY: the application's template (checked, not copied: it goes to the backend as it is).
        unsafe { args::check_template(template, count, args::TemplateKind::Input) }?;
        // SAFETY: the application's arguments, with the unwrapping key translated.
        let rv = unsafe { f(s, mechanism, unwrapping, wrapped, wrapped_len, template, count, key) };
        Ok(out_handle(rv, key))
    })
}

/// C_DeriveKey (§5.13). Handles inside the mechanism's parameter are checked and translated like the base
/// key (see `mechanism`).
pub(crate) unsafe extern "C" fn C_DeriveKey(
    s: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    base_key: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_DeriveKey", || {
        let backend = active()?;
        let (base, _held) = objects::hold(base_key, CKR_KEY_HANDLE_INVALID)?;
        // SAFETY: the application's mechanism, valid during this call.
        let mut translated = unsafe { super::mechanism::Translated::new(mechanism) }?;
        let mechanism = translated.as_ptr();
        // SAFETY: the application's template.
        if let Some((db, request)) = unsafe { stored_creation(s, template, count) }? {
            // SAFETY: the (translated) mechanism, valid during this call.
            let mech = unsafe { AppMechanism::new(mechanism) };
            return create_stored(s, &db, &request, None, key, &|t| backend.derive_key_app(s, mech, base, t));
        }
        let f = backend.f.C_DeriveKey.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
        // SAFETY: the application's template (checked, not copied: it goes to the backend as it is).
        unsafe { args::check_template(template, count, args::TemplateKind::Input) }?;
        // SAFETY: the application's arguments, with the base key (and any handle in the parameter) translated.
        let rv = unsafe { f(s, mechanism, base, template, count, key) };
        Ok(out_handle(rv, key))
    })
}

/// C_GenerateKeyPair (§5.13): each half that is a token object in a database slot is stored (or kept in the
/// HSM when it cannot be); the private half decides how the pair is made.
pub(crate) unsafe extern "C" fn C_GenerateKeyPair(
    s: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    public_template: *mut CK_ATTRIBUTE,
    public_count: CK_ULONG,
    private_template: *mut CK_ATTRIBUTE,
    private_count: CK_ULONG,
    public_key: *mut CK_OBJECT_HANDLE,
    private_key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_GenerateKeyPair", || {
        let backend = active()?;
        // SAFETY: the application's templates.
        let public = unsafe { stored_creation(s, public_template, public_count) }?;
        // SAFETY: as above.
        let private = unsafe { stored_creation(s, private_template, private_count) }?;
        if public.is_none() && private.is_none() {
            let f = backend.f.C_GenerateKeyPair.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
            // SAFETY: the application's templates (checked, not copied: they go to the backend as they are).
            unsafe { args::check_template(public_template, public_count, args::TemplateKind::Input) }?;
            // SAFETY: as above.
            unsafe { args::check_template(private_template, private_count, args::TemplateKind::Input) }?;
            // SAFETY: the application's arguments, unchanged.
            let rv = unsafe {
                f(s, mechanism, public_template, public_count, private_template, private_count, public_key, private_key)
            };
            let rv = out_handle(rv, public_key);
            return Ok(out_handle(rv, private_key));
        }
        if public_key.is_null() || private_key.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: the application's mechanism, valid during this call.
        let mech = unsafe { AppMechanism::new(mechanism) };
        let kind = mech.kind().ok_or(CKR_ARGUMENTS_BAD)?;
        let (pt, public_half, db) = match public {
            Some((db, request)) => (request.exact.clone(), PublicHalf::Stored(request), Some(db)),
            // SAFETY: the application's template.
            None => (unsafe { args::template(public_template, public_count) }?, PublicHalf::Plain, None),
        };
        let (p, q) = match private {
            Some((db, request)) => {
                let shape = vault::shape_key(db.slot, kind, &[&pt, &request.exact]);
                let made = db.vault.create(
                    s,
                    db.slot,
                    &db.policy,
                    &request,
                    Some(CKO_PRIVATE_KEY),
                    Some(shape),
                    &public_half,
                    &|t| backend.generate_key_pair_app(s, mech, &pt, t).map(|(p, q)| Made { key: q, public: Some(p) }),
                )?;
                (made.public.ok_or(CKR_GENERAL_ERROR)?, made.key)
            }
            None => {
                let (PublicHalf::Stored(request), Some(db)) = (&public_half, db) else {
                    return Err(CKR_GENERAL_ERROR);
                };
                // SAFETY: the application's template.
                let qt = unsafe { args::template(private_template, private_count) }?;
                let (hp, hq) = backend.generate_key_pair_app(s, mech, &pt, &qt)?;
                let p = db.vault.store_public(s, db.slot, &db.policy, request, hp).inspect_err(|_| {
                    let _ = backend.destroy_object(s, hq);
                })?;
                (p, objects::from_backend(hq))
            }
        };
        // SAFETY: both checked non-NULL above.
        unsafe {
            *public_key = p;
            *private_key = q;
        }
        Ok(CKR_OK)
    })
}

/// C_CopyObject (§5.7): a copy of a stored key is stored unless CKA_TOKEN=false; a copy of a backend object
/// is stored (or kept in the HSM, see vault::create) when the template asks for a token object in a database
/// slot.
pub(crate) unsafe extern "C" fn C_CopyObject(
    s: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    new_object: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_CopyObject", || {
        let backend = active()?;
        let stored = objects::stored_key(object);
        let (source, _held) = objects::hold(object, CKR_OBJECT_HANDLE_INVALID)?;
        // SAFETY: the application's template.
        let has_group = unsafe { args::names(template, count, CKA_P11SHIM_GROUP) };
        let db = database(s);
        if stored.is_none() {
            // A copy is a token object when the template says so, else when its source is one.
            let token = db.is_some()
                // SAFETY: as above.
                && match unsafe { args::template(template, count) }?.bool(CKA_TOKEN) {
                    Some(token) => token,
                    None => backend.attributes(s, source, &[CKA_TOKEN]).map_err(CK_RV::from)?.bool(CKA_TOKEN) == Some(true),
                };
            if has_group && !token {
                return Err(group_not_here());
            }
            if !token {
                let f = backend.f.C_CopyObject.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
                // SAFETY: the application's template (checked, not copied: it goes to the backend as it is).
                unsafe { args::check_template(template, count, args::TemplateKind::Input) }?;
                // SAFETY: the application's arguments, with the object translated.
                let rv = unsafe { f(s, source, template, count, new_object) };
                return Ok(out_handle(rv, new_object));
            }
        }
        if new_object.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: the application's template.
        let parsed = unsafe { args::template(template, count) }?;
        let Some(db) = db else {
            return Err(if has_group { group_not_here() } else { CKR_OBJECT_HANDLE_INVALID });
        };
        if stored.is_some() && parsed.bool(CKA_TOKEN) == Some(false) {
            if has_group {
                return Err(group_not_here());
            }
            let copy = backend.copy_object(s, source, &parsed)?;
            // SAFETY: the application's out pointer, checked non-NULL.
            unsafe { args::write_out(new_object, objects::from_backend(copy)) }?;
            return Ok(CKR_OK);
        }
        let mut parsed = parsed;
        parsed.set(Attr::bool(CKA_TOKEN, true));
        let request = db.vault.request(&db.policy, parsed)?;
        let make = |t: &Template| backend.copy_object(s, source, t);
        let handle = match &stored {
            Some(key) => db.vault.copy_stored(s, db.slot, &db.policy, key, &request, &make)?,
            None => {
                let got = backend.attributes(s, source, &[CKA_CLASS, CKA_TOKEN]).map_err(CK_RV::from)?;
                // A key the HSM keeps belongs to the token's group: a copy into another group moves it.
                let from = &db.policy.default_group;
                let moving = request.named_group && got.bool(CKA_TOKEN) == Some(true) && request.group != *from;
                let name = format!("a copy of HSM key {source} of token {:?}", db.policy.token);
                let mover = match moving {
                    true => Some(db.vault.authorize_move(s, db.slot, &db.policy.token, &name, from, &request.group)?),
                    false => None,
                };
                let made = db.vault.create(
                    s,
                    db.slot,
                    &db.policy,
                    &request,
                    got.ulong(CKA_CLASS),
                    None,
                    &PublicHalf::Plain,
                    &|t| make(t).map(|key| Made { key, public: None }),
                );
                if let Some(who) = &mover {
                    db.vault.record_move(db.slot, &db.policy.token, who, (&name, from, &request.group), made.is_ok());
                }
                made?.key
            }
        };
        // SAFETY: checked non-NULL.
        unsafe { args::write_out(new_object, handle) }?;
        Ok(CKR_OK)
    })
}

/// C_DestroyObject (§5.7): a stored key's row is deleted; the shim forgets its own handles.
pub(crate) unsafe extern "C" fn C_DestroyObject(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> CK_RV {
    guard("C_DestroyObject", || {
        let backend = active()?;
        if let Some(key) = objects::stored_key(object) {
            let vault = vault::current().ok_or(CKR_OBJECT_HANDLE_INVALID)?;
            vault.destroy(session, object, &key)?;
            return Ok(CKR_OK);
        }
        let backend_object = objects::to_backend(object, CKR_OBJECT_HANDLE_INVALID)?;
        let f = backend.f.C_DestroyObject.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
        // SAFETY: no pointers.
        let rv = unsafe { f(session, backend_object) };
        if rv == CKR_OK {
            objects::forget(object);
        }
        Ok(rv)
    })
}

/// C_GetObjectSize (§5.7).
pub(crate) unsafe extern "C" fn C_GetObjectSize(
    s: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    size: *mut CK_ULONG,
) -> CK_RV {
    guard("C_GetObjectSize", || {
        let backend = active()?;
        if let Some(key) = objects::stored_key(object) {
            if size.is_null() {
                return Err(CKR_ARGUMENTS_BAD);
            }
            let vault = vault::current().ok_or(CKR_OBJECT_HANDLE_INVALID)?;
            let n = vault.object_size(s, &key)?;
            // SAFETY: checked non-NULL.
            unsafe { args::write_out(size, n) }?;
            return Ok(CKR_OK);
        }
        let object = objects::to_backend(object, CKR_OBJECT_HANDLE_INVALID)?;
        let f = backend.f.C_GetObjectSize.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
        // SAFETY: the application's arguments.
        Ok(unsafe { f(s, object, size) })
    })
}

/// C_GetAttributeValue (§5.7): a stored key answers from its row (secret parts never, unless the key is
/// neither sensitive nor unextractable, when the HSM copy answers); the group attribute is answered by the
/// shim, never asked of the backend.
pub(crate) unsafe extern "C" fn C_GetAttributeValue(
    s: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    guard("C_GetAttributeValue", || {
        let backend = active()?;
        let f = backend.f.C_GetAttributeValue.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
        // SAFETY: the application's template: a query for the backend or the row, checked, never copied.
        unsafe { args::check_template(template, count, args::TemplateKind::Query) }?;
        if let Some(key) = objects::stored_key(object) {
            let vault = vault::current().ok_or(CKR_OBJECT_HANDLE_INVALID)?;
            // SAFETY: the application's template array, `count` entries.
            let entries = unsafe { args::slice_mut(template, count) }.ok_or(CKR_ARGUMENTS_BAD)?;
            let types: Vec<CK_ATTRIBUTE_TYPE> = entries.iter().map(|a| a.type_).collect();
            let answers = vault.get_attributes(s, &key, &types)?;
            let mut rv = CKR_OK;
            for (entry, answer) in entries.iter_mut().zip(answers) {
                let this = match answer {
                    // SAFETY: the entry's buffer is the application's, valid for its stated length.
                    Answer::Value(v) => unsafe { args::answer(entry, &v) },
                    Answer::Sensitive => {
                        entry.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                        CKR_ATTRIBUTE_SENSITIVE
                    }
                    Answer::Invalid => {
                        entry.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                        CKR_ATTRIBUTE_TYPE_INVALID
                    }
                };
                // The spec's order of precedence: sensitive and invalid before too small.
                rv = match (rv, this) {
                    (CKR_OK, x)
                    | (CKR_BUFFER_TOO_SMALL, x @ (CKR_ATTRIBUTE_SENSITIVE | CKR_ATTRIBUTE_TYPE_INVALID)) => x,
                    (r, _) => r,
                };
            }
            return Ok(rv);
        }
        let object = objects::to_backend(object, CKR_OBJECT_HANDLE_INVALID)?;
        // SAFETY: the application's template.
        if !unsafe { args::names(template, count, CKA_P11SHIM_GROUP) } {
            // SAFETY: the application's arguments, with the object translated.
            return Ok(unsafe { f(s, object, template, count) });
        }
        // A backend object's group is the shim's to answer: the token's group for a token object of a database
        // slot (the HSM keeps it), none otherwise. The backend answers the rest.
        let group = token_group(s, object);
        // SAFETY: the application's template array, `count` entries.
        let entries = unsafe { args::slice_mut(template, count) }.ok_or(CKR_ARGUMENTS_BAD)?;
        let mut others: Vec<CK_ATTRIBUTE> = entries.iter().filter(|a| a.type_ != CKA_P11SHIM_GROUP).copied().collect();
        let rv = if others.is_empty() {
            CKR_OK
        } else {
            // SAFETY: copies of the application's entries, pointing at its buffers.
            unsafe { f(s, object, others.as_mut_ptr(), others.len() as CK_ULONG) }
        };
        if rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_OBJECT_HANDLE_INVALID {
            return Ok(rv);
        }
        let mut answered = others.into_iter();
        let mut group_rv = CKR_OK;
        for entry in entries.iter_mut() {
            if entry.type_ == CKA_P11SHIM_GROUP {
                group_rv = match &group {
                    // SAFETY: the entry's buffer is the application's, valid for its stated length.
                    Some(g) => unsafe { args::answer(entry, &Value::Bytes(g.as_bytes().to_vec().into())) },
                    None => {
                        entry.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                        CKR_ATTRIBUTE_TYPE_INVALID
                    }
                };
            } else if let Some(a) = answered.next() {
                entry.ulValueLen = a.ulValueLen;
            }
        }
        Ok(match (rv, group_rv) {
            (CKR_OK, g) => g,
            (CKR_BUFFER_TOO_SMALL, g @ CKR_ATTRIBUTE_TYPE_INVALID) => g,
            (r, _) => r,
        })
    })
}

/// The group of a backend object as the shim answers it: the token's group for a token object of a
/// database slot (a key the HSM keeps itself), None otherwise.
fn token_group(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> Option<String> {
    let db = database(session)?;
    let backend = active().ok()?;
    let token = backend.attributes(session, object, &[CKA_TOKEN]).ok()?.bool(CKA_TOKEN)?;
    token.then(|| db.policy.default_group.clone())
}

/// C_SetAttributeValue (§5.7).
pub(crate) unsafe extern "C" fn C_SetAttributeValue(
    s: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    guard("C_SetAttributeValue", || {
        let backend = active()?;
        if let Some(key) = objects::stored_key(object) {
            let vault = vault::current().ok_or(CKR_OBJECT_HANDLE_INVALID)?;
            // SAFETY: the application's template.
            let changes = unsafe { args::template(template, count) }?;
            vault.set_attributes(s, &key, &changes)?;
            return Ok(CKR_OK);
        }
        let object = objects::to_backend(object, CKR_OBJECT_HANDLE_INVALID)?;
        let f = backend.f.C_SetAttributeValue.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
        // SAFETY: the application's template.
        if unsafe { args::names(template, count, CKA_P11SHIM_GROUP) } {
            // SAFETY: as above.
            let mut changes = unsafe { args::template(template, count) }?;
            let asked = changes.remove(CKA_P11SHIM_GROUP);
            let Some(group) = token_group(s, object) else { return Err(group_not_here()) };
            if asked.as_ref().and_then(|a| a.as_bytes()) != Some(group.as_bytes()) {
                crate::warn!(
                    "a key the HSM keeps itself belongs to its token's group {group:?}; its CKA_P11SHIM_GROUP cannot change (move it into the key store with C_CopyObject if it can be stored): refused with CKR_ATTRIBUTE_READ_ONLY"
                );
                return Err(CKR_ATTRIBUTE_READ_ONLY);
            }
            return backend.set_attributes(s, object, &changes).map(|_| CKR_OK).map_err(CK_RV::from);
        }
        // SAFETY: the application's template (checked, not copied: it goes to the backend as it is).
        unsafe { args::check_template(template, count, args::TemplateKind::Input) }?;
        // SAFETY: the application's arguments, with the object translated.
        Ok(unsafe { f(s, object, template, count) })
    })
}

/// C_WrapKey (§5.13): a stored key's HSM copy carries the application's CKA_EXTRACTABLE and
/// CKA_WRAP_WITH_TRUSTED, so the backend decides, as for its own keys.
pub(crate) unsafe extern "C" fn C_WrapKey(
    s: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    wrapping_key: CK_OBJECT_HANDLE,
    key: CK_OBJECT_HANDLE,
    wrapped: *mut CK_BYTE,
    wrapped_len: *mut CK_ULONG,
) -> CK_RV {
    guard("C_WrapKey", || {
        let backend = active()?;
        let (wrapping, _held_wrapping) = objects::hold(wrapping_key, CKR_WRAPPING_KEY_HANDLE_INVALID)?;
        let (key, _held_key) = objects::hold(key, CKR_KEY_HANDLE_INVALID)?;
        let f = backend.f.C_WrapKey.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
        // SAFETY: the application's arguments, with the handles translated.
        Ok(unsafe { f(s, mechanism, wrapping, key, wrapped, wrapped_len) })
    })
}

/// C_FindObjectsInit (§5.7): on a database slot, stored keys are found in the key store.
pub(crate) unsafe extern "C" fn C_FindObjectsInit(
    s: CK_SESSION_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    guard("C_FindObjectsInit", || {
        let backend = active()?;
        let f = backend.f.C_FindObjectsInit.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
        let Some(db) = database(s) else {
            // SAFETY: the application's template.
            if unsafe { args::names(template, count, CKA_P11SHIM_GROUP) } {
                return Err(group_not_here());
            }
            // SAFETY: the application's template (checked, not copied: it goes to the backend as it is).
            unsafe { args::check_template(template, count, args::TemplateKind::Input) }?;
            // SAFETY: the application's arguments, unchanged.
            return Ok(unsafe { f(s, template, count) });
        };
        // SAFETY: the application's template.
        let parsed = unsafe { args::template(template, count) }?;
        match db.vault.find_init(s, db.slot, &db.policy, &parsed)? {
            None => Ok(CKR_OK),
            Some(native) => {
                let rv = backend.find_init(s, &native);
                if rv != CKR_OK {
                    db.vault.find_final(s);
                }
                Ok(rv)
            }
        }
    })
}

/// C_FindObjects (§5.7): stored keys first, then the backend's objects (less the shim's own); backend
/// handles in the shim's range are replaced by their aliases.
pub(crate) unsafe extern "C" fn C_FindObjects(
    session: CK_SESSION_HANDLE,
    ph_object: *mut CK_OBJECT_HANDLE,
    max_count: CK_ULONG,
    pul_count: *mut CK_ULONG,
) -> CK_RV {
    guard("C_FindObjects", || {
        let backend = active()?;
        let f = backend.f.C_FindObjects.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
        if let Some(vault) = vault::current() {
            if pul_count.is_null() || (ph_object.is_null() && max_count > 0) {
                return Err(CKR_ARGUMENTS_BAD);
            }
            if let Some((mut found, native)) = vault.find_take(session, max_count as usize) {
                let max = max_count as usize;
                while native && found.len() < max {
                    let mut batch = vec![0 as CK_OBJECT_HANDLE; max - found.len()];
                    let mut n: CK_ULONG = 0;
                    // SAFETY: room for batch.len() handles.
                    let rv = unsafe { f(session, batch.as_mut_ptr(), batch.len() as CK_ULONG, &mut n) };
                    if rv != CKR_OK {
                        return Ok(rv);
                    }
                    if n == 0 {
                        break;
                    }
                    let got = batch.iter().take(n as usize).filter(|h| !vault.find_hides(**h));
                    found.extend(got.map(|h| objects::from_backend(*h)));
                }
                // SAFETY: the application's array holds max_count handles; found.len() ≤ max_count.
                if let Some(out) = unsafe { args::slice_mut(ph_object, found.len() as CK_ULONG) } {
                    out.copy_from_slice(&found);
                }
                // SAFETY: checked non-NULL.
                unsafe { *pul_count = found.len() as CK_ULONG };
                return Ok(CKR_OK);
            }
        }
        // SAFETY: the application's arguments go to the backend unchanged.
        let rv = unsafe { f(session, ph_object, max_count, pul_count) };
        if rv == CKR_OK && !pul_count.is_null() {
            // SAFETY: the backend wrote the count; it cannot exceed the room the application gave.
            let found = unsafe { *pul_count }.min(max_count);
            // SAFETY: the application's array holds `max_count` handles, `found` of them written.
            if let Some(handles) = unsafe { args::slice_mut(ph_object, found) } {
                for h in handles {
                    *h = objects::from_backend(*h);
                }
            }
        }
        Ok(rv)
    })
}

/// C_FindObjectsFinal (§5.7).
pub(crate) unsafe extern "C" fn C_FindObjectsFinal(s: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_FindObjectsFinal", || {
        let backend = active()?;
        let f = backend.f.C_FindObjectsFinal.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
        if let Some(native) = vault::current().and_then(|v| v.find_final(s)) {
            if !native {
                return Ok(CKR_OK);
            }
        }
        // SAFETY: no pointers.
        Ok(unsafe { f(s) })
    })
}

/// C_Logout (§5.6): private session objects go with the login, so the HSM copies of stored keys on the
/// slot are dropped first; their handles stay valid and load again after the next login.
pub(crate) unsafe extern "C" fn C_Logout(s: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_Logout", || {
        let backend = active()?;
        if let Some(db) = database(s) {
            db.vault.logout(db.slot);
        }
        let f = backend.f.C_Logout.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
        // SAFETY: no pointers.
        Ok(unsafe { f(s) })
    })
}

/// C_Login (§5.6): a login that succeeds is a new one. HSM copies of stored keys loaded under an earlier login
/// may be gone with it (ended by C_Logout, or by the device closing every session of the process, which
/// also ends its logins), so the copies on the slot are dropped; their handles stay valid and load again.
/// A context-specific login (CKU_CONTEXT_SPECIFIC, for a key with CKA_ALWAYS_AUTHENTICATE) is not a new
/// login: it authorizes the operation just started with such a key's copy, which must stay.
pub(crate) unsafe extern "C" fn C_Login(
    s: CK_SESSION_HANDLE,
    user: CK_USER_TYPE,
    pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
) -> CK_RV {
    guard("C_Login", || {
        let backend = active()?;
        let f = backend.f.C_Login.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
        // SAFETY: the application's arguments go to the backend unchanged.
        let rv = unsafe { f(s, user, pin, pin_len) };
        if rv == CKR_OK && user != CKU_CONTEXT_SPECIFIC {
            if let Some(db) = database(s) {
                db.vault.logout(db.slot);
            }
        }
        Ok(rv)
    })
}

/// After a backend call that returned a new object handle: the application's view of it.
fn out_handle(rv: CK_RV, out: *mut CK_OBJECT_HANDLE) -> CK_RV {
    if rv == CKR_OK && !out.is_null() {
        // SAFETY: the backend returned CKR_OK, so it wrote a handle there.
        unsafe { *out = objects::from_backend(*out) };
    }
    rv
}
