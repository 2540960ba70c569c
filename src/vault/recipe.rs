//! How a key's object is made again in the HSM from what the key store or a backup holds: the template and
//! the key of the MBK set that unwraps it, so that the HSM enforces everything the application set.

use crate::attrs::{self, Template};
use crate::backend::Backend;
use crate::backup::mbk::MbkSet;
use crate::error::Result;
use cryptoki_sys::*;

/// How a key's object is made again in the HSM from its attributes (a stored key loaded for use, or a backup
/// record restored or checked): the template, and for a secret the key that unwraps its blob.
pub struct Recipe {
    pub template: Template,
    /// The MBK or the load key, for a secret; None for a public object, made with C_CreateObject.
    pub unwrapper: Option<CK_OBJECT_HANDLE>,
    /// A secret kept as the device's blob: the device restores it with exactly the attributes it was backed
    /// up with (the template only says token or session object).
    pub device: bool,
}

/// The attributes that only name an object (the first two, any object; all, a key).
const NAMES: [CK_ATTRIBUTE_TYPE; 4] = [CKA_LABEL, CKA_ID, CKA_SUBJECT, CKA_APPLICATION];

impl Recipe {
    /// The object as `attrs` describe it (as a token or session object): every attribute one may give at
    /// creation, so the HSM enforces the key's sensitivity, extractability, usage, allowed mechanisms and
    /// re-authentication as the application set them; a secret is private, whatever it says (a stored key is
    /// usable only after login). None for a secret no unwrapping key of the set may give (see
    /// MbkSet::unwrapper_for).
    pub fn exact(set: &MbkSet, attrs: &Template, class: u64, token: bool) -> Option<Recipe> {
        if set.is_device() {
            return Some(Recipe::device(attrs, class, token));
        }
        let unwrapper = if attrs::has_secret(class) { Some(set.unwrapper_for(attrs)?) } else { None };
        Some(Recipe { template: settable(attrs, class, token), unwrapper, device: false })
    }

    /// A device set's recipe: a secret is the device's blob, restored as it was backed up; a public object
    /// is made with C_CreateObject as with a set of objects.
    fn device(attrs: &Template, class: u64, token: bool) -> Recipe {
        Recipe { template: settable(attrs, class, token), unwrapper: None, device: attrs::has_secret(class) }
    }

    /// The recipe without the attributes that only name the object (label and id; a key's subject and
    /// application too; a certificate needs its subject), which the HSM does not use: a stored object's loaded
    /// copy, whose names the shim answers from its row. A find compares every object's names (SoftHSM2 copies
    /// each non-empty byte string it compares, about 2.7 µs an object; an empty one costs next to nothing),
    /// so loaded copies without names cost finds almost nothing.
    pub fn unnamed(mut self, class: CK_OBJECT_CLASS) -> Recipe {
        let key = matches!(class, CKO_SECRET_KEY | CKO_PRIVATE_KEY | CKO_PUBLIC_KEY);
        for ty in NAMES.into_iter().take(if key { NAMES.len() } else { 2 }) {
            self.template.remove(ty);
        }
        self
    }

    /// As [`Recipe::exact`] for the attributes [`restorable`] gives a backup record: only backups restore
    /// this way.
    pub fn restorable(set: &MbkSet, attrs: &Template, class: u64, token: bool) -> Recipe {
        if set.is_device() {
            return Recipe::device(attrs, class, token);
        }
        let attrs = restorable(attrs, class);
        let unwrapper = if attrs::has_secret(class) { set.unwrapper_for(&attrs).or(Some(set.mbk)) } else { None };
        Recipe { template: settable(&attrs, class, token), unwrapper, device: false }
    }

    /// Makes the object in `session`: unwraps `wrapped` (made with `wrap_mech`) or creates it.
    pub fn make(
        &self,
        backend: &Backend,
        session: CK_SESSION_HANDLE,
        wrap_mech: CK_MECHANISM_TYPE,
        wrapped: &[u8],
    ) -> Result<CK_OBJECT_HANDLE> {
        if self.device {
            let token = self.template.bool(CKA_TOKEN) == Some(true);
            return backend.device_restore(session, wrapped, token).map_err(crate::backup::mbk::device_error);
        }
        match self.unwrapper {
            Some(unwrapper) => {
                let mech = crate::hsm::Mechanism::plain(wrap_mech);
                backend.unwrap_key(session, &mech, unwrapper, wrapped, &self.template)
            }
            None => backend.create_object(session, &self.template),
        }
    }
}

/// A backup record's attributes as custody lets its key come back: a key the HSM held itself may have been
/// backed up with a value one could read (or wrap under any key); no unwrap may give that, so it comes back
/// sensitive and extractable under trusted keys only, and its row says so.
pub fn restorable(attrs: &Template, class: u64) -> Template {
    // (A device set restores its blobs exactly: see Recipe::restorable.)
    let mut attrs = attrs.clone();
    if attrs::has_secret(class) && attrs.bool(CKA_EXTRACTABLE) != Some(false) {
        attrs.set(attrs::Attr::bool(CKA_SENSITIVE, true));
        attrs.set(attrs::Attr::bool(CKA_WRAP_WITH_TRUSTED, true));
        attrs.set(attrs::Attr::bool(CKA_EXTRACTABLE, true));
    }
    attrs
}

/// The mechanism that unwraps a blob recorded as made with `recorded`: RFC 5649 as this backend names it (the
/// set's keys are allowed that one mechanism; a backup from an HSM that names it otherwise says the other).
pub fn unwrap_mechanism(set: &MbkSet, recorded: CK_MECHANISM_TYPE) -> CK_MECHANISM_TYPE {
    if matches!(recorded, CKM_AES_KEY_WRAP_PAD | CKM_AES_KEY_WRAP_KWP) {
        set.wrap
    } else {
        recorded
    }
}

fn is_empty(a: &attrs::Attr) -> bool {
    match &a.value {
        attrs::Value::Bytes(b) => b.is_empty(),
        attrs::Value::Array(inner) => inner.is_empty(),
    }
}

/// The attributes of `attrs` one may give when making the object again (the HSM sets the rest, which the
/// application reads from the row), as a token or session object.
fn settable(attrs: &Template, class: u64, token: bool) -> Template {
    let secret = attrs::has_secret(class);
    let mut t = Template(
        attrs
            .0
            .iter()
            .filter(|a| attrs::SETTABLE.contains(&a.ty))
            // SoftHSM2 unwraps private keys from PKCS#8 and refuses public components in the template.
            .filter(|a| {
                !(class == CKO_PRIVATE_KEY
                    && matches!(a.ty, CKA_MODULUS | CKA_PUBLIC_EXPONENT | CKA_EC_PARAMS | CKA_EC_POINT))
            })
            .filter(|a| !(secret && a.ty == CKA_VALUE))
            .filter(|a| secret || !matches!(a.ty, CKA_SENSITIVE | CKA_EXTRACTABLE | CKA_WRAP_WITH_TRUSTED))
            // An empty list of allowed mechanisms or an empty template is the backend's default (no limit), and
            // SoftHSM2 refuses one given explicitly.
            .filter(|a| {
                !(matches!(attrs::layout(a.ty), attrs::Layout::Attributes | attrs::Layout::Mechanisms) && is_empty(a))
            })
            .cloned()
            .collect(),
    );
    t.set(attrs::Attr::bool(CKA_TOKEN, token));
    if secret {
        // Both unwrapping keys make private objects only (see backup::mbk).
        t.set(attrs::Attr::bool(CKA_PRIVATE, true));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attrs::Attr;

    fn set() -> MbkSet {
        MbkSet::for_tests()
    }

    fn key(extra: &[Attr]) -> Template {
        let mut t = Template(vec![
            Attr::ulong(CKA_CLASS, CKO_SECRET_KEY),
            Attr::bool(CKA_SENSITIVE, false),
            Attr::bool(CKA_EXTRACTABLE, false),
            Attr::bool(CKA_PRIVATE, false),
            Attr::bool(CKA_LOCAL, true),
            Attr::bool(CKA_ALWAYS_AUTHENTICATE, true),
            Attr::bytes(CKA_ALLOWED_MECHANISMS, &[]),
            Attr::array(CKA_WRAP_TEMPLATE, vec![]),
        ]);
        for a in extra {
            t.set(a.clone());
        }
        t
    }

    #[test]
    fn a_stored_key_loads_as_made_private_and_without_empty_lists() {
        let r = Recipe::exact(&set(), &key(&[]), CKO_SECRET_KEY, false).expect("unextractable: loadable");
        assert_eq!(r.unwrapper, Some(3), "the load key");
        let t = &r.template;
        assert_eq!(t.bool(CKA_SENSITIVE), Some(false), "as the application made it");
        assert_eq!(t.bool(CKA_EXTRACTABLE), Some(false));
        assert_eq!(t.bool(CKA_ALWAYS_AUTHENTICATE), Some(true));
        assert_eq!(t.bool(CKA_PRIVATE), Some(true), "a stored key's copy is private");
        assert_eq!(t.bool(CKA_TOKEN), Some(false));
        assert!(t.get(CKA_LOCAL).is_none(), "the HSM's to set");
        assert!(t.get(CKA_ALLOWED_MECHANISMS).is_none() && t.get(CKA_WRAP_TEMPLATE).is_none(), "empty: the default");
        let limited = key(&[Attr::bytes(CKA_ALLOWED_MECHANISMS, &CKM_AES_ECB.to_ne_bytes())]);
        let r = Recipe::exact(&set(), &limited, CKO_SECRET_KEY, false).unwrap();
        assert_eq!(r.template.bytes(CKA_ALLOWED_MECHANISMS), Some(&CKM_AES_ECB.to_ne_bytes()[..]));
    }

    #[test]
    fn a_loaded_copy_has_no_names_and_keeps_everything_else() {
        let named = key(&[
            Attr::bytes(CKA_LABEL, b"web"),
            Attr::bytes(CKA_ID, b"\x01"),
            Attr::bytes(CKA_SUBJECT, b"cn"),
            Attr::bytes(CKA_APPLICATION, b"app"),
        ]);
        let full = Recipe::exact(&set(), &named, CKO_SECRET_KEY, false).unwrap();
        let copy = Recipe::exact(&set(), &named, CKO_SECRET_KEY, false).unwrap().unnamed(CKO_SECRET_KEY);
        for ty in NAMES {
            assert!(full.template.get(ty).is_some(), "{ty:#x} in the exact recipe");
            assert!(copy.template.get(ty).is_none(), "{ty:#x} not in a loaded copy");
        }
        assert_eq!(copy.template.0.len(), full.template.0.len() - NAMES.len());
        assert!(copy.template.0.iter().all(|a| full.template.get(a.ty) == Some(a)), "the rest as it was");
        assert_eq!(copy.unwrapper, full.unwrapper);
        // A certificate keeps its subject (C_CreateObject requires it) and a data object its application.
        let cert = Template(vec![
            Attr::ulong(CKA_CLASS, CKO_CERTIFICATE),
            Attr::bytes(CKA_LABEL, b"web"),
            Attr::bytes(CKA_SUBJECT, b"cn"),
            Attr::bytes(CKA_VALUE, b"der"),
        ]);
        let copy = Recipe::exact(&set(), &cert, CKO_CERTIFICATE, false).unwrap().unnamed(CKO_CERTIFICATE);
        assert_eq!(copy.template.bytes(CKA_SUBJECT), Some(&b"cn"[..]));
        assert!(copy.template.get(CKA_LABEL).is_none());
    }

    #[test]
    fn a_readable_backup_record_comes_back_protected() {
        let readable = key(&[Attr::bool(CKA_EXTRACTABLE, true)]);
        assert!(Recipe::exact(&set(), &readable, CKO_SECRET_KEY, false).is_none(), "never loaded as it is");
        let r = Recipe::restorable(&set(), &readable, CKO_SECRET_KEY, true);
        assert_eq!(r.unwrapper, Some(1), "the MBK");
        for (ty, want) in [(CKA_SENSITIVE, true), (CKA_EXTRACTABLE, true), (CKA_WRAP_WITH_TRUSTED, true)] {
            assert_eq!(r.template.bool(ty), Some(want), "{ty:#x}");
        }
        assert_eq!(r.template.bool(CKA_TOKEN), Some(true));
        let unextractable = Recipe::restorable(&set(), &key(&[]), CKO_SECRET_KEY, true);
        assert_eq!((unextractable.unwrapper, unextractable.template.bool(CKA_SENSITIVE)), (Some(3), Some(false)));
    }
}
