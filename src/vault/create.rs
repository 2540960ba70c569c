//! Making stored keys. A token object the application creates in a database slot is kept in the key store
//! when the HSM can give it back exactly as the application made it; otherwise it stays in the HSM as an
//! ordinary token object of the token's group. What the application reads of a stored key is the backend's
//! own answer for the object made exactly as asked, never an assumption.
//!
//! How (for secret and private keys):
//! 1. The object is made as the application asked, as a session object of its session (the *probe*), and its
//!    attributes are read: the backend's defaults, its provenance flags, everything.
//! 2. If the MBK set can load it back exactly (see MbkSet::unwrapper_for): an extractable one is wrapped
//!    under the MBK as it is; an unextractable one cannot be wrapped, so a *twin* is made by the same call
//!    with only sensitive, extractable and wrap-with-trusted changed, wrapped, and described by the probe's
//!    answers for those flags and the two flags that follow from them (CKA_ALWAYS_SENSITIVE,
//!    CKA_NEVER_EXTRACTABLE). For C_UnwrapKey, C_DeriveKey and C_CreateObject the twin is the same key; for
//!    key generation it is a fresh key, the probe having never left the shim.
//! 3. Otherwise (a value the application may read, a public or trusted key, a key the HSM cannot wrap such
//!    as EdDSA on SoftHSM2, an unextractable key being copied) the object is made once more as the
//!    application asked, as a token object: the HSM holds it, and the log says why.
//!
//! Key generation learns per request shape what the backend makes of it, so only the first request of a
//! shape in a process pays for the probe. Every object the shim makes here is its own until destroyed: the
//! application cannot name it. A crash at any point leaves either no row or a complete one.

use super::{new_id, Vault};
use crate::attrs::{self, Attr, Template, CKA_P11SHIM_GROUP};
use crate::backup::mbk::MbkSet;
use crate::config::SlotConfig;
use crate::error::{Error, Result};
use crate::objects;
use crate::store::KeyRow;
use cryptoki_sys::*;
use std::sync::Arc;

/// The attributes a twin changes, and those the backend derives from them: a twin's row takes these from the
/// probe.
const TWIN_CHANGES: [CK_ATTRIBUTE_TYPE; 5] =
    [CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_WRAP_WITH_TRUSTED, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE];
/// What a device set's twin changes: it is private.
const DEVICE_TWIN_CHANGES: [CK_ATTRIBUTE_TYPE; 1] = [CKA_PRIVATE];

fn twin_changes(set: &MbkSet) -> &'static [CK_ATTRIBUTE_TYPE] {
    if set.is_device() {
        &DEVICE_TWIN_CHANGES
    } else {
        &TWIN_CHANGES
    }
}

/// How many request shapes a process remembers.
const SHAPES_KEPT: usize = 256;

/// What the backend makes of one shape of key generation request.
#[derive(Clone)]
pub enum Shape {
    /// Stored by way of a twin; the probe's answers for TWIN_CHANGES.
    Twin(Vec<Attr>),
    /// Kept in the HSM, for this reason.
    Resident(String),
}

/// A template of the application's for a token object in a database slot, and what the vault learned from it.
pub struct Request {
    pub group: String,
    /// The application named the group.
    pub named_group: bool,
    /// As asked, as a session object, without the group: what the probe is made from.
    pub exact: Template,
    /// As asked, without the group: a key the HSM keeps itself.
    pub as_token: Template,
}

impl Request {
    /// The twin's template: as asked, but sensitive and extractable under a trusted key only, so that it can
    /// be wrapped under the MBK and its value never read; with a device MBK, as asked but private, so that
    /// nobody without the user's login can restore its blob into a usable key.
    fn twin(&self, set: &MbkSet) -> Template {
        let mut t = self.exact.clone();
        if set.is_device() {
            t.set(Attr::bool(CKA_PRIVATE, true));
            return t;
        }
        t.set(Attr::bool(CKA_SENSITIVE, true));
        t.set(Attr::bool(CKA_EXTRACTABLE, true));
        t.set(Attr::bool(CKA_WRAP_WITH_TRUSTED, true));
        t
    }
}

/// What one creation call made: the key (or the only object), and a key pair's public half.
pub struct Made {
    pub key: CK_OBJECT_HANDLE,
    pub public: Option<CK_OBJECT_HANDLE>,
}

/// A key pair's public half: stored (its request) or the application's session object.
pub enum PublicHalf {
    Stored(Request),
    Plain,
}

/// What the application gets: handles for the key and for a key pair's public half.
pub struct Created {
    pub key: CK_OBJECT_HANDLE,
    pub public: Option<CK_OBJECT_HANDLE>,
}

/// Where an object's bytes come from when it is stored.
enum Keep {
    /// A public object: stored with its values, nothing wrapped.
    Public,
    /// Extractable under a trusted key, sensitive: wrapped as it is.
    Wrap,
    /// Unextractable: wrapped by way of a twin.
    Twin,
    /// Kept in the HSM, for this reason.
    Resident(String),
}

/// How a key with these attributes is kept (see the module comment).
fn keep(set: &MbkSet, view: &Template, class: CK_OBJECT_CLASS) -> Keep {
    if view.bool(CKA_TRUSTED) == Some(true) {
        return Keep::Resident(
            "it is trusted (CKA_TRUSTED), which only the SO can set, so the shim could not load it back as it is"
                .into(),
        );
    }
    if !attrs::has_secret(class) {
        return Keep::Public;
    }
    if set.is_device() {
        // The device's blob gives the key back exactly as it is; only a value the application may read stays
        // in the HSM (the shim answers a stored key's secret parts as sensitive).
        return match (view.bool(CKA_SENSITIVE), view.bool(CKA_EXTRACTABLE), view.bool(CKA_PRIVATE)) {
            (Some(true), _, Some(true)) | (_, Some(false), Some(true)) => Keep::Wrap,
            (Some(true), _, _) | (_, Some(false), _) => Keep::Twin,
            _ => Keep::Resident("its value can be read (CKA_SENSITIVE=false, CKA_EXTRACTABLE=true)".into()),
        };
    }
    match set.unwrapper_for(view) {
        Some(h) if Some(h) == set.load => Keep::Twin,
        Some(_) => Keep::Wrap,
        None if view.bool(CKA_SENSITIVE) != Some(true) => Keep::Resident(
            "its value can be read (CKA_SENSITIVE=false, CKA_EXTRACTABLE=true), and no stored key may be loaded readable".into(),
        ),
        None => Keep::Resident(
            "it may be wrapped under any key (CKA_EXTRACTABLE=true, CKA_WRAP_WITH_TRUSTED=false), and a stored key loads extractable under trusted keys only".into(),
        ),
    }
}

/// Errors of a twin or a wrap that mean "the HSM cannot keep this key in the store", not a failure.
fn cannot(e: &Error) -> bool {
    matches!(
        e,
        Error::Rv(
            CKR_KEY_NOT_WRAPPABLE
                | CKR_KEY_UNEXTRACTABLE
                | CKR_KEY_FUNCTION_NOT_PERMITTED
                | CKR_KEY_SIZE_RANGE
                | CKR_KEY_TYPE_INCONSISTENT
                | CKR_MECHANISM_INVALID
                | CKR_TEMPLATE_INCONSISTENT
                | CKR_ATTRIBUTE_READ_ONLY
                | CKR_ATTRIBUTE_VALUE_INVALID
                | CKR_ATTRIBUTE_TYPE_INVALID
                | CKR_ACTION_PROHIBITED
        )
    )
}

/// The key a request shape for key generation is known by: the slot, the mechanism and the templates less
/// what names an object (label, id, dates, subject, group), which does not change what the backend makes.
pub fn shape_key(slot: CK_SLOT_ID, mechanism: CK_MECHANISM_TYPE, templates: &[&Template]) -> Vec<u8> {
    const NAMES: [CK_ATTRIBUTE_TYPE; 8] =
        [CKA_LABEL, CKA_ID, CKA_SUBJECT, CKA_START_DATE, CKA_END_DATE, CKA_APPLICATION, CKA_TOKEN, CKA_P11SHIM_GROUP];
    let mut key = Vec::new();
    key.extend_from_slice(&slot.to_be_bytes());
    key.extend_from_slice(&mechanism.to_be_bytes());
    for t in templates {
        let shape = Template(t.0.iter().filter(|a| !NAMES.contains(&a.ty)).cloned().collect()).encode();
        key.extend_from_slice(&(shape.len() as u64).to_be_bytes());
        key.extend_from_slice(&shape);
    }
    key
}

impl Vault {
    /// Reads an application's template for a token object in a database slot: the group out, the rest as
    /// asked.
    pub fn request(&self, policy: &SlotConfig, mut template: Template) -> Result<Request> {
        let named = template.remove(CKA_P11SHIM_GROUP);
        let group = match &named {
            Some(a) => group_value(a)?,
            None => policy.default_group.clone(),
        };
        let as_token = template.clone();
        template.set(Attr::bool(CKA_TOKEN, false));
        Ok(Request { group, named_group: named.is_some(), exact: template, as_token })
    }

    /// Checks what every creation needs before anything is made: a read/write session, the key store, and an
    /// MBK set that keeps custody.
    pub fn ready(&self, session: CK_SESSION_HANDLE, slot: CK_SLOT_ID, policy: &SlotConfig) -> Result<MbkSet> {
        let info = self.backend.session_info(session)?;
        if info.flags & CKF_RW_SESSION == 0 {
            return Err(Error::Rv(CKR_SESSION_READ_ONLY));
        }
        self.store()?;
        self.mbk(slot, &policy.token)
    }

    /// Makes a token object of the application's in a database slot with `make` (which makes it from a
    /// template in the application's session): stored, or kept in the HSM (see the module comment).
    /// `shape` names a key generation request; `public` is a key pair's public half.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &self,
        session: CK_SESSION_HANDLE,
        slot: CK_SLOT_ID,
        policy: &SlotConfig,
        request: &Request,
        class: Option<CK_OBJECT_CLASS>,
        shape: Option<Vec<u8>>,
        public: &PublicHalf,
        make: &dyn Fn(&Template) -> Result<Made>,
    ) -> Result<Created> {
        let set = self.ready(session, slot, policy)?;
        let cx = Context { vault: self, session, slot, policy, set: &set, request, public, make };
        let known = shape.as_ref().and_then(|k| super::lock(&self.shapes).get(k).cloned());
        let (created, learned) = match known {
            Some(Shape::Resident(why)) => (cx.resident(&why)?, None),
            Some(Shape::Twin(probed)) => cx.twin(&probed)?,
            None => cx.probe(class)?,
        };
        if let (Some(k), Some(learned)) = (shape, learned) {
            let mut shapes = super::lock(&self.shapes);
            if shapes.len() < SHAPES_KEPT {
                shapes.insert(k, learned);
            }
        }
        Ok(created)
    }

    /// A public object of a key pair made by one call (the private half not stored): stored from the object.
    pub fn store_public(
        &self,
        session: CK_SESSION_HANDLE,
        slot: CK_SLOT_ID,
        policy: &SlotConfig,
        request: &Request,
        object: CK_OBJECT_HANDLE,
    ) -> Result<CK_OBJECT_HANDLE> {
        objects::own(object);
        let stored = (|| {
            let set = self.ready(session, slot, policy)?;
            let view = self.view_of(session, object)?;
            self.insert_row(slot, policy, &set, &request.group, view, Vec::new())
        })();
        self.discard(session, object);
        stored
    }

    /// C_CopyObject of a stored key into a stored key: the backend copies the HSM copy (`source`, loaded) as a
    /// session object, which checks the application's template by its own rules; the new row is the source's
    /// with the attributes the template named as the backend answered them for that copy, and the same
    /// wrapped secret. A copy that could not be loaded back as it is stays in the HSM.
    pub fn copy_stored(
        &self,
        session: CK_SESSION_HANDLE,
        slot: CK_SLOT_ID,
        policy: &SlotConfig,
        key: &super::StoredKey,
        request: &Request,
        make: &dyn Fn(&Template) -> Result<CK_OBJECT_HANDLE>,
    ) -> Result<CK_OBJECT_HANDLE> {
        let (row, source, _) = self.row_of(session, key)?;
        if source.bool(CKA_COPYABLE) == Some(false) {
            return Err(Error::Rv(CKR_ACTION_PROHIBITED));
        }
        let name = format!("a copy of stored key {}", key.id);
        let mover = match request.named_group && request.group != row.group {
            true => Some(self.authorize_move(session, slot, &row.token, &name, &row.group, &request.group)?),
            false => None,
        };
        let set = self.ready(session, slot, policy)?;
        let copy = self.made(make(&request.exact)?);
        let result = (|| {
            let answered = self.view_of(session, copy)?;
            let mut view = source.clone();
            for a in &request.exact.0 {
                if a.ty == CKA_TOKEN {
                    continue;
                }
                match answered.get(a.ty) {
                    Some(got) => view.set(got.clone()),
                    None => {
                        view.remove(a.ty);
                    }
                }
            }
            let group = if request.named_group { request.group.clone() } else { row.group.clone() };
            let mut how = keep(&set, &view, row.class);
            // A device blob holds the attributes it was made with: the copy is backed up as the HSM made it,
            // and only while it is private (its blob must not be usable without a login).
            let device_copy = set.is_device() && attrs::has_secret(row.class);
            if device_copy
                && !matches!(how, Keep::Resident(_))
                && self.backend.attributes(session, copy, &[CKA_PRIVATE])?.bool(CKA_PRIVATE) != Some(true)
            {
                how = Keep::Resident("the copy is not private (CKA_PRIVATE=false)".into());
            }
            match how {
                Keep::Resident(why) => {
                    let cx = Context {
                        vault: self,
                        session,
                        slot,
                        policy,
                        set: &set,
                        request,
                        public: &PublicHalf::Plain,
                        make: &|t: &Template| make(t).map(|key| Made { key, public: None }),
                    };
                    cx.resident(&why).map(|c| c.key)
                }
                _ if device_copy => {
                    let blob = set.wrap(self.backend, session, copy)?;
                    self.insert_row(slot, policy, &set, &group, view, blob)
                }
                _ => self.insert_row(slot, policy, &set, &group, view, row.wrapped.clone()),
            }
        })();
        self.discard(session, copy);
        if let Some(who) = &mover {
            self.record_move(slot, &row.token, who, (&name, &row.group, &request.group), result.is_ok());
        }
        result
    }

    /// An object the shim just made: its own until discarded.
    fn made(&self, handle: CK_OBJECT_HANDLE) -> CK_OBJECT_HANDLE {
        objects::own(handle);
        handle
    }

    /// Destroys an object the shim made in the application's session.
    fn discard(&self, session: CK_SESSION_HANDLE, handle: CK_OBJECT_HANDLE) {
        if let Err(e) = self.backend.destroy_object(session, handle) {
            crate::warn!("destroying a temporary object of a new stored key failed: {e}");
        }
        objects::disown(handle);
    }

    /// What the application reads of an object: the backend's answers (values too, for a public object),
    /// as a token object.
    fn view_of(&self, session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> Result<Template> {
        let class = self
            .backend
            .attributes(session, object, &[CKA_CLASS])?
            .ulong(CKA_CLASS)
            .ok_or_else(|| Error::Other("the new object has no CKA_CLASS".into()))?;
        let mut types = attrs::KEPT.to_vec();
        if !attrs::has_secret(class) {
            types.extend_from_slice(attrs::PUBLIC_VALUES);
        }
        let mut view = self.backend.attributes(session, object, &types)?;
        view.set(Attr::bool(CKA_TOKEN, true));
        Ok(view)
    }

    /// Wraps an object of the application's session under the MBK.
    fn wrap(&self, session: CK_SESSION_HANDLE, set: &MbkSet, object: CK_OBJECT_HANDLE) -> Result<Vec<u8>> {
        set.wrap(self.backend, session, object)
    }

    /// Seals and inserts a row; the application's handle for it.
    fn insert_row(
        &self,
        slot: CK_SLOT_ID,
        policy: &SlotConfig,
        set: &MbkSet,
        group: &str,
        view: Template,
        wrapped: Vec<u8>,
    ) -> Result<CK_OBJECT_HANDLE> {
        let store = self.store()?;
        let class = view.ulong(CKA_CLASS).ok_or_else(|| Error::Other("the new object has no CKA_CLASS".into()))?;
        let mut row = KeyRow {
            id: new_id()?,
            token: policy.token.clone(),
            group: group.to_string(),
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
        let (handle, key) = self.handle_for(&row.id, slot);
        // This process made the row: its first use needs neither a read nor a MAC check.
        self.keep(&key, Arc::new(row), at, true);
        Ok(handle)
    }
}

/// One creation in progress.
struct Context<'a> {
    vault: &'a Vault,
    session: CK_SESSION_HANDLE,
    slot: CK_SLOT_ID,
    policy: &'a SlotConfig,
    set: &'a MbkSet,
    request: &'a Request,
    public: &'a PublicHalf,
    make: &'a dyn Fn(&Template) -> Result<Made>,
}

impl Context<'_> {
    /// Makes an object with `template`; the shim's own until it is stored, discarded or handed over.
    fn make(&self, template: &Template) -> Result<Made> {
        let made = (self.make)(template)?;
        self.vault.made(made.key);
        if let Some(p) = made.public {
            self.vault.made(p);
        }
        Ok(made)
    }

    /// Destroys everything a call made.
    fn discard(&self, made: &Made) {
        self.vault.discard(self.session, made.key);
        if let Some(p) = made.public {
            self.vault.discard(self.session, p);
        }
    }

    /// Steps 1 and 2 of the module comment; the shape learned, when there is one to learn.
    fn probe(&self, class: Option<CK_OBJECT_CLASS>) -> Result<(Created, Option<Shape>)> {
        let probe = self.make(&self.request.exact)?;
        let decided = (|| {
            let view = self.vault.view_of(self.session, probe.key)?;
            let class = view.ulong(CKA_CLASS).or(class).unwrap_or(CKO_SECRET_KEY);
            Ok::<_, Error>((keep(self.set, &view, class), view))
        })();
        let (how, view) = match decided {
            Ok(d) => d,
            Err(e) => {
                self.discard(&probe);
                return Err(e);
            }
        };
        match how {
            Keep::Public => self.finish(probe, view, Vec::new()).map(|c| (c, None)),
            Keep::Wrap => match self.vault.wrap(self.session, self.set, probe.key) {
                Ok(blob) => self.finish(probe, view, blob).map(|c| (c, None)),
                Err(e) if cannot(&e) => {
                    self.discard(&probe);
                    self.kept(format!("the HSM cannot wrap it under the MBK ({e})"))
                }
                Err(e) => {
                    self.discard(&probe);
                    Err(e)
                }
            },
            Keep::Twin => {
                self.discard(&probe);
                let probed: Vec<Attr> = twin_changes(self.set).iter().filter_map(|t| view.get(*t).cloned()).collect();
                self.twin(&probed)
            }
            Keep::Resident(why) => {
                self.discard(&probe);
                self.kept(why)
            }
        }
    }

    /// Stores the key by way of a twin, described with the probe's answers `probed`; the HSM keeps it when it
    /// cannot make or wrap the twin.
    fn twin(&self, probed: &[Attr]) -> Result<(Created, Option<Shape>)> {
        let learned = Shape::Twin(probed.to_vec());
        let twin = match self.make(&self.request.twin(self.set)) {
            Ok(t) => t,
            Err(e) if cannot(&e) => {
                return self.kept(format!("the HSM cannot make it extractable under the MBK only ({e})"));
            }
            Err(e) => return Err(e),
        };
        let wrapped = self
            .vault
            .wrap(self.session, self.set, twin.key)
            .and_then(|blob| Ok((blob, self.vault.view_of(self.session, twin.key)?)));
        match wrapped {
            Ok((blob, mut view)) => {
                for a in probed {
                    view.set(a.clone());
                }
                self.finish(twin, view, blob).map(|c| (c, Some(learned)))
            }
            Err(e) if cannot(&e) => {
                self.discard(&twin);
                self.kept(format!("the HSM cannot wrap it under the MBK ({e})"))
            }
            Err(e) => {
                self.discard(&twin);
                Err(e)
            }
        }
    }

    /// Step 3, learned for the request's shape.
    fn kept(&self, why: String) -> Result<(Created, Option<Shape>)> {
        self.resident(&why).map(|c| (c, Some(Shape::Resident(why))))
    }

    /// Stores the key of `made` (its row: `view`, `wrapped`) and its public half, then destroys the key's
    /// temporary object. Whatever fails, nothing of it is left.
    fn finish(&self, made: Made, view: Template, wrapped: Vec<u8>) -> Result<Created> {
        let stored = self.vault.insert_row(self.slot, self.policy, self.set, &self.request.group, view, wrapped);
        self.vault.discard(self.session, made.key);
        let key = match stored {
            Ok(h) => h,
            Err(e) => {
                if let Some(p) = made.public {
                    self.vault.discard(self.session, p);
                }
                return Err(e);
            }
        };
        match self.hand_over_public(made.public) {
            Ok(public) => Ok(Created { key, public }),
            Err(e) => {
                if let Some(k) = objects::stored_key(key) {
                    let _ = self.vault.destroy(self.session, key, &k);
                }
                Err(e)
            }
        }
    }

    /// A key pair's public half: stored, or handed to the application as the session object it asked for.
    fn hand_over_public(&self, public: Option<CK_OBJECT_HANDLE>) -> Result<Option<CK_OBJECT_HANDLE>> {
        let Some(p) = public else { return Ok(None) };
        match self.public {
            PublicHalf::Stored(req) => self.vault.store_public(self.session, self.slot, self.policy, req, p).map(Some),
            PublicHalf::Plain => {
                objects::disown(p);
                Ok(Some(objects::from_backend(p)))
            }
        }
    }

    /// Step 3 of the module comment: the key made as the application asked, as a token object in the HSM, of
    /// the token's group (a key the HSM keeps has no other). Refused when the application asked for another
    /// group.
    fn resident(&self, why: &str) -> Result<Created> {
        let token_group = &self.policy.default_group;
        if self.request.named_group && self.request.group != *token_group {
            crate::warn!(
                "a token object in database slot {:?} cannot be a stored key because {why}; the HSM would keep it, but then it belongs to the token's group {token_group:?}, not to the group {:?} the template names (CKA_P11SHIM_GROUP): refused with CKR_TEMPLATE_INCONSISTENT",
                self.policy.token,
                self.request.group
            );
            return Err(Error::Rv(CKR_TEMPLATE_INCONSISTENT));
        }
        let made = self.make(&self.request.as_token)?;
        crate::warn!(
            "a token object in database slot {:?} is kept in the HSM as an ordinary token object (group {token_group:?}), not in the key store, because {why}",
            self.policy.token
        );
        objects::disown(made.key);
        let key = objects::from_backend(made.key);
        match self.hand_over_public(made.public) {
            Ok(public) => Ok(Created { key, public }),
            Err(e) => {
                let _ = self.vault.backend.destroy_object(self.session, made.key);
                Err(e)
            }
        }
    }
}

/// A CKA_P11SHIM_GROUP value: UTF-8 text that is a valid group name ([`crate::attrs::check_group`]).
pub(super) fn group_value(a: &Attr) -> Result<String> {
    let Some(text) = a.as_bytes().and_then(|b| std::str::from_utf8(b).ok()) else {
        crate::warn!("CKA_P11SHIM_GROUP must be UTF-8 text");
        return Err(Error::Rv(CKR_ATTRIBUTE_VALUE_INVALID));
    };
    match crate::attrs::check_group(text) {
        Ok(()) => Ok(text.to_string()),
        Err(why) => {
            crate::warn!("CKA_P11SHIM_GROUP: {why}");
            Err(Error::Rv(CKR_ATTRIBUTE_VALUE_INVALID))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> MbkSet {
        MbkSet::for_tests()
    }

    fn key(flags: &[(CK_ATTRIBUTE_TYPE, bool)]) -> Template {
        let mut t = Template(vec![Attr::bool(CKA_PRIVATE, true)]);
        for (ty, v) in flags {
            t.set(Attr::bool(*ty, *v));
        }
        t
    }

    #[test]
    fn what_is_stored_and_what_the_hsm_keeps() {
        let how = |flags: &[(CK_ATTRIBUTE_TYPE, bool)]| match keep(&set(), &key(flags), CKO_SECRET_KEY) {
            Keep::Public => "public",
            Keep::Wrap => "wrap",
            Keep::Twin => "twin",
            Keep::Resident(_) => "resident",
        };
        // SoftHSM2's defaults: neither sensitive nor extractable.
        assert_eq!(how(&[(CKA_SENSITIVE, false), (CKA_EXTRACTABLE, false)]), "twin");
        assert_eq!(how(&[(CKA_SENSITIVE, true), (CKA_EXTRACTABLE, false)]), "twin");
        assert_eq!(how(&[(CKA_SENSITIVE, true), (CKA_EXTRACTABLE, true), (CKA_WRAP_WITH_TRUSTED, true)]), "wrap");
        assert_eq!(how(&[(CKA_SENSITIVE, false), (CKA_EXTRACTABLE, true)]), "resident");
        assert_eq!(how(&[(CKA_SENSITIVE, true), (CKA_EXTRACTABLE, true), (CKA_WRAP_WITH_TRUSTED, false)]), "resident");
        assert_eq!(how(&[(CKA_EXTRACTABLE, false), (CKA_PRIVATE, false)]), "twin", "a public key: loaded private");
        assert_eq!(how(&[(CKA_EXTRACTABLE, false), (CKA_TRUSTED, true)]), "resident");
        assert!(matches!(keep(&set(), &key(&[]), CKO_CERTIFICATE), Keep::Public));
    }

    #[test]
    fn request_shapes_ignore_names() {
        let a = Template(vec![Attr::bytes(CKA_LABEL, b"a"), Attr::bool(CKA_SIGN, true)]);
        let b = Template(vec![Attr::bytes(CKA_LABEL, b"b"), Attr::bool(CKA_SIGN, true), Attr::bytes(CKA_ID, b"1")]);
        let c =
            Template(vec![Attr::bytes(CKA_LABEL, b"a"), Attr::bool(CKA_SIGN, true), Attr::bool(CKA_SENSITIVE, true)]);
        assert_eq!(shape_key(1, CKM_AES_KEY_GEN, &[&a]), shape_key(1, CKM_AES_KEY_GEN, &[&b]));
        assert_ne!(shape_key(1, CKM_AES_KEY_GEN, &[&a]), shape_key(1, CKM_AES_KEY_GEN, &[&c]));
        assert_ne!(shape_key(1, CKM_AES_KEY_GEN, &[&a]), shape_key(2, CKM_AES_KEY_GEN, &[&a]));
        assert_ne!(shape_key(1, CKM_AES_KEY_GEN, &[&a]), shape_key(1, CKM_GENERIC_SECRET_KEY_GEN, &[&a]));
    }
}
