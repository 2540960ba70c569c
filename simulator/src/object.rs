//! Objects and the attribute rules of PKCS#11 2.40 (section 4): which attributes an object class has, their
//! defaults, which may be given at creation, changed later, copied, or read.
//!
//! An object is a map from attribute type to value, stored as raw bytes in the host's encoding (CK_ULONG in
//! native byte order, CK_BBOOL one byte), so templates compare byte for byte. Template-valued attributes
//! (CKA_WRAP_TEMPLATE…) hold their own map.

use crate::Result;
use cryptoki_sys::*;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use zeroize::Zeroize;

/// Attribute bytes, zeroized on drop, stored as hex in the state file.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bytes(pub Vec<u8>);

impl Drop for Bytes {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Bytes, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text).map(Bytes).map_err(serde::de::Error::custom)
    }
}

/// One attribute value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Attr {
    Bytes(Bytes),
    /// An attribute array (CKF_ARRAY_ATTRIBUTE): CKA_WRAP_TEMPLATE, CKA_UNWRAP_TEMPLATE, CKA_DERIVE_TEMPLATE.
    Template(#[serde(deserialize_with = "template_from_text_keys")] BTreeMap<CK_ATTRIBUTE_TYPE, Bytes>),
}

/// An untagged enum is deserialized from buffered content, where JSON object keys stay strings; a
/// BTreeMap<CK_ATTRIBUTE_TYPE, _> cannot be read from those directly (serde does not parse them as numbers
/// there), so a template stored in the state file is read with string keys and parsed here.
fn template_from_text_keys<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<BTreeMap<CK_ATTRIBUTE_TYPE, Bytes>, D::Error> {
    BTreeMap::<String, Bytes>::deserialize(d)?
        .into_iter()
        .map(|(k, v)| k.parse().map(|k| (k, v)).map_err(serde::de::Error::custom))
        .collect()
}

impl Attr {
    pub fn bytes(v: impl Into<Vec<u8>>) -> Attr {
        Attr::Bytes(Bytes(v.into()))
    }
    pub fn bool(b: bool) -> Attr {
        Attr::bytes(vec![b as u8])
    }
    pub fn ulong(v: CK_ULONG) -> Attr {
        Attr::bytes(v.to_ne_bytes().to_vec())
    }
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Attr::Bytes(b) => Some(&b.0),
            Attr::Template(_) => None,
        }
    }
}

/// A caller's template, in order.
pub type Template = Vec<(CK_ATTRIBUTE_TYPE, Attr)>;

pub fn template_get(t: &Template, ty: CK_ATTRIBUTE_TYPE) -> Option<&Attr> {
    t.iter().rev().find(|(k, _)| *k == ty).map(|(_, v)| v)
}

pub fn template_bytes(t: &Template, ty: CK_ATTRIBUTE_TYPE) -> Option<&[u8]> {
    template_get(t, ty).and_then(Attr::as_bytes)
}

pub fn template_ulong(t: &Template, ty: CK_ATTRIBUTE_TYPE) -> Result<Option<CK_ULONG>> {
    template_bytes(t, ty).map(decode_ulong).transpose()
}

fn decode_ulong(b: &[u8]) -> Result<CK_ULONG> {
    let arr: [u8; std::mem::size_of::<CK_ULONG>()] = b.try_into().map_err(|_| CKR_ATTRIBUTE_VALUE_INVALID)?;
    Ok(CK_ULONG::from_ne_bytes(arr))
}

/// What shape an attribute's value has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Ulong,
    Date,
    Template,
    MechanismList,
    Bytes,
}

pub fn kind(ty: CK_ATTRIBUTE_TYPE) -> Kind {
    match ty {
        CKA_TOKEN
        | CKA_PRIVATE
        | CKA_MODIFIABLE
        | CKA_COPYABLE
        | CKA_DESTROYABLE
        | CKA_DERIVE
        | CKA_LOCAL
        | CKA_ENCRYPT
        | CKA_VERIFY
        | CKA_VERIFY_RECOVER
        | CKA_WRAP
        | CKA_TRUSTED
        | CKA_SENSITIVE
        | CKA_DECRYPT
        | CKA_SIGN
        | CKA_SIGN_RECOVER
        | CKA_UNWRAP
        | CKA_EXTRACTABLE
        | CKA_ALWAYS_SENSITIVE
        | CKA_NEVER_EXTRACTABLE
        | CKA_WRAP_WITH_TRUSTED
        | CKA_ALWAYS_AUTHENTICATE => Kind::Bool,
        CKA_CLASS
        | CKA_KEY_TYPE
        | CKA_KEY_GEN_MECHANISM
        | CKA_MODULUS_BITS
        | CKA_VALUE_LEN
        | CKA_CERTIFICATE_TYPE
        | CKA_CERTIFICATE_CATEGORY
        | CKA_JAVA_MIDP_SECURITY_DOMAIN
        | CKA_NAME_HASH_ALGORITHM => Kind::Ulong,
        CKA_START_DATE | CKA_END_DATE => Kind::Date,
        CKA_WRAP_TEMPLATE | CKA_UNWRAP_TEMPLATE | CKA_DERIVE_TEMPLATE => Kind::Template,
        CKA_ALLOWED_MECHANISMS => Kind::MechanismList,
        _ => Kind::Bytes,
    }
}

/// Checks that a value has its attribute's shape.
pub fn check_shape(ty: CK_ATTRIBUTE_TYPE, value: &Attr) -> Result<()> {
    let ok = match (kind(ty), value) {
        (Kind::Template, Attr::Template(inner)) => {
            inner.iter().all(|(t, v)| check_shape(*t, &Attr::Bytes(v.clone())).is_ok())
        }
        (Kind::Template, Attr::Bytes(_)) | (_, Attr::Template(_)) => false,
        (Kind::Bool, Attr::Bytes(b)) => b.0.len() == 1,
        (Kind::Ulong, Attr::Bytes(b)) => b.0.len() == std::mem::size_of::<CK_ULONG>(),
        (Kind::Date, Attr::Bytes(b)) => b.0.is_empty() || (b.0.len() == 8 && b.0.iter().all(u8::is_ascii_digit)),
        (Kind::MechanismList, Attr::Bytes(b)) => b.0.len() % std::mem::size_of::<CK_ULONG>() == 0,
        (Kind::Bytes, Attr::Bytes(_)) => true,
    };
    if ok {
        Ok(())
    } else {
        Err(CKR_ATTRIBUTE_VALUE_INVALID)
    }
}

// Attribute flags (PKCS#11 2.40 table 10 footnotes).
/// May be changed by C_SetAttributeValue (footnote 8), subject to the one-way rules.
const M: u8 = 1;
/// Required by C_CreateObject (footnote 1).
const C: u8 = 2;
/// Set by the token only; never in a template (footnote 2/4).
const T: u8 = 4;
/// Key material: not in a C_GenerateKey(Pair)/C_UnwrapKey/C_DeriveKey template (footnotes 6, 7).
const G: u8 = 8;
/// A secret component: unreadable when the object is sensitive or unextractable (footnote 7 of reading).
const S: u8 = 16;

const COMMON: &[(CK_ATTRIBUTE_TYPE, u8)] = &[
    (CKA_CLASS, C),
    (CKA_TOKEN, 0),
    (CKA_PRIVATE, 0),
    (CKA_MODIFIABLE, 0),
    (CKA_COPYABLE, M),
    (CKA_DESTROYABLE, M),
    (CKA_LABEL, M),
];
const DATA: &[(CK_ATTRIBUTE_TYPE, u8)] = &[(CKA_APPLICATION, M), (CKA_OBJECT_ID, M), (CKA_VALUE, M)];
const CERTIFICATE: &[(CK_ATTRIBUTE_TYPE, u8)] = &[
    (CKA_CERTIFICATE_TYPE, C),
    (CKA_TRUSTED, M),
    (CKA_CERTIFICATE_CATEGORY, 0),
    (CKA_CHECK_VALUE, 0),
    (CKA_START_DATE, M),
    (CKA_END_DATE, M),
    (CKA_PUBLIC_KEY_INFO, 0),
    (CKA_SUBJECT, M),
    (CKA_ID, M),
    (CKA_ISSUER, M),
    (CKA_SERIAL_NUMBER, M),
    (CKA_VALUE, C),
    (CKA_URL, 0),
    (CKA_HASH_OF_SUBJECT_PUBLIC_KEY, 0),
    (CKA_HASH_OF_ISSUER_PUBLIC_KEY, 0),
    (CKA_JAVA_MIDP_SECURITY_DOMAIN, 0),
];
const KEY: &[(CK_ATTRIBUTE_TYPE, u8)] = &[
    (CKA_KEY_TYPE, C),
    (CKA_ID, M),
    (CKA_START_DATE, M),
    (CKA_END_DATE, M),
    (CKA_DERIVE, M),
    (CKA_LOCAL, T),
    (CKA_KEY_GEN_MECHANISM, T),
    (CKA_ALLOWED_MECHANISMS, 0),
];
const PUBLIC: &[(CK_ATTRIBUTE_TYPE, u8)] = &[
    (CKA_SUBJECT, M),
    (CKA_ENCRYPT, M),
    (CKA_VERIFY, M),
    (CKA_VERIFY_RECOVER, M),
    (CKA_WRAP, M),
    (CKA_TRUSTED, M),
    (CKA_WRAP_TEMPLATE, 0),
    (CKA_PUBLIC_KEY_INFO, 0),
];
const PRIVATE: &[(CK_ATTRIBUTE_TYPE, u8)] = &[
    (CKA_SUBJECT, M),
    (CKA_SENSITIVE, M),
    (CKA_DECRYPT, M),
    (CKA_SIGN, M),
    (CKA_SIGN_RECOVER, M),
    (CKA_UNWRAP, M),
    (CKA_EXTRACTABLE, M),
    (CKA_ALWAYS_SENSITIVE, T),
    (CKA_NEVER_EXTRACTABLE, T),
    (CKA_WRAP_WITH_TRUSTED, M),
    (CKA_UNWRAP_TEMPLATE, 0),
    (CKA_ALWAYS_AUTHENTICATE, 0),
    (CKA_PUBLIC_KEY_INFO, 0),
];
const SECRET: &[(CK_ATTRIBUTE_TYPE, u8)] = &[
    (CKA_SENSITIVE, M),
    (CKA_ENCRYPT, M),
    (CKA_DECRYPT, M),
    (CKA_SIGN, M),
    (CKA_VERIFY, M),
    (CKA_WRAP, M),
    (CKA_UNWRAP, M),
    (CKA_EXTRACTABLE, M),
    (CKA_ALWAYS_SENSITIVE, T),
    (CKA_NEVER_EXTRACTABLE, T),
    (CKA_CHECK_VALUE, 0),
    (CKA_WRAP_WITH_TRUSTED, M),
    (CKA_TRUSTED, M),
    (CKA_WRAP_TEMPLATE, 0),
    (CKA_UNWRAP_TEMPLATE, 0),
    (CKA_VALUE, C | G | S),
    (CKA_VALUE_LEN, 0),
];
const RSA_PUBLIC: &[(CK_ATTRIBUTE_TYPE, u8)] = &[(CKA_MODULUS, C | G), (CKA_MODULUS_BITS, 0), (CKA_PUBLIC_EXPONENT, C)];
const RSA_PRIVATE: &[(CK_ATTRIBUTE_TYPE, u8)] = &[
    (CKA_MODULUS, C | G),
    (CKA_PUBLIC_EXPONENT, G),
    (CKA_PRIVATE_EXPONENT, C | G | S),
    (CKA_PRIME_1, G | S),
    (CKA_PRIME_2, G | S),
    (CKA_EXPONENT_1, G | S),
    (CKA_EXPONENT_2, G | S),
    (CKA_COEFFICIENT, G | S),
];
const EC_PUBLIC: &[(CK_ATTRIBUTE_TYPE, u8)] = &[(CKA_EC_PARAMS, C), (CKA_EC_POINT, C | G)];
const EC_PRIVATE: &[(CK_ATTRIBUTE_TYPE, u8)] = &[(CKA_EC_PARAMS, C), (CKA_VALUE, C | G | S)];

/// The attributes an object of this class and key type has, with their flags; `None` for what the simulator
/// does not store.
fn schema(class: CK_OBJECT_CLASS, key_type: Option<CK_KEY_TYPE>) -> Result<Vec<(CK_ATTRIBUTE_TYPE, u8)>> {
    let parts: Vec<&[(CK_ATTRIBUTE_TYPE, u8)]> = match (class, key_type) {
        (CKO_DATA, _) => vec![COMMON, DATA],
        (CKO_CERTIFICATE, _) => vec![COMMON, CERTIFICATE],
        (CKO_SECRET_KEY, Some(CKK_AES | CKK_GENERIC_SECRET)) => vec![COMMON, KEY, SECRET],
        (CKO_PUBLIC_KEY, Some(CKK_RSA)) => vec![COMMON, KEY, PUBLIC, RSA_PUBLIC],
        (CKO_PUBLIC_KEY, Some(CKK_EC)) => vec![COMMON, KEY, PUBLIC, EC_PUBLIC],
        (CKO_PRIVATE_KEY, Some(CKK_RSA)) => vec![COMMON, KEY, PRIVATE, RSA_PRIVATE],
        (CKO_PRIVATE_KEY, Some(CKK_EC)) => vec![COMMON, KEY, PRIVATE, EC_PRIVATE],
        (CKO_SECRET_KEY | CKO_PUBLIC_KEY | CKO_PRIVATE_KEY, None) => return Err(CKR_TEMPLATE_INCOMPLETE),
        (CKO_SECRET_KEY | CKO_PUBLIC_KEY | CKO_PRIVATE_KEY, Some(_)) => return Err(CKR_TEMPLATE_INCONSISTENT),
        _ => return Err(CKR_ATTRIBUTE_VALUE_INVALID),
    };
    let mut out: Vec<(CK_ATTRIBUTE_TYPE, u8)> = Vec::new();
    for (ty, flags) in parts.into_iter().flatten() {
        match out.iter_mut().find(|(t, _)| t == ty) {
            Some(entry) => entry.1 |= flags,
            None => out.push((*ty, *flags)),
        }
    }
    Ok(out)
}

fn flags_of(schema: &[(CK_ATTRIBUTE_TYPE, u8)], ty: CK_ATTRIBUTE_TYPE) -> Option<u8> {
    schema.iter().find(|(t, _)| *t == ty).map(|(_, f)| *f)
}

/// How an object comes to be: decides which attributes a template may hold and what the token sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Create,
    Generate(CK_MECHANISM_TYPE),
    Unwrap,
    Derive,
}

/// A PKCS#11 object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    pub attrs: BTreeMap<CK_ATTRIBUTE_TYPE, Attr>,
}

impl Object {
    pub fn get(&self, ty: CK_ATTRIBUTE_TYPE) -> Option<&[u8]> {
        self.attrs.get(&ty).and_then(Attr::as_bytes)
    }
    pub fn bool(&self, ty: CK_ATTRIBUTE_TYPE) -> bool {
        self.get(ty).is_some_and(|b| b.first().is_some_and(|v| *v != 0))
    }
    pub fn ulong(&self, ty: CK_ATTRIBUTE_TYPE) -> Option<CK_ULONG> {
        self.get(ty).and_then(|b| decode_ulong(b).ok())
    }
    pub fn class(&self) -> CK_OBJECT_CLASS {
        self.ulong(CKA_CLASS).unwrap_or(CK_UNAVAILABLE_INFORMATION)
    }
    pub fn key_type(&self) -> Option<CK_KEY_TYPE> {
        self.ulong(CKA_KEY_TYPE)
    }
    pub fn is_token(&self) -> bool {
        self.bool(CKA_TOKEN)
    }
    pub fn is_private(&self) -> bool {
        self.bool(CKA_PRIVATE)
    }
    pub fn is_key(&self) -> bool {
        matches!(self.class(), CKO_SECRET_KEY | CKO_PRIVATE_KEY | CKO_PUBLIC_KEY)
    }
    /// A secret or private key (what FIPS rules protect).
    pub fn is_secret(&self) -> bool {
        matches!(self.class(), CKO_SECRET_KEY | CKO_PRIVATE_KEY)
    }
    pub fn set(&mut self, ty: CK_ATTRIBUTE_TYPE, value: Attr) {
        self.attrs.insert(ty, value);
    }
    pub fn label(&self) -> &[u8] {
        self.get(CKA_LABEL).unwrap_or_default()
    }
    pub fn id(&self) -> &[u8] {
        self.get(CKA_ID).unwrap_or_default()
    }

    /// Whether the object has every attribute of `template` with the same value (C_FindObjects).
    pub fn matches(&self, template: &Template) -> bool {
        template.iter().all(|(ty, value)| self.attrs.get(ty) == Some(value))
    }

    /// A rough size in bytes (C_GetObjectSize).
    pub fn size(&self) -> usize {
        self.attrs
            .values()
            .map(|v| {
                16 + match v {
                    Attr::Bytes(b) => b.0.len(),
                    Attr::Template(t) => t.values().map(|b| 16 + b.0.len()).sum(),
                }
            })
            .sum()
    }

    fn schema(&self) -> Result<Vec<(CK_ATTRIBUTE_TYPE, u8)>> {
        schema(self.class(), self.key_type())
    }

    /// Whether `ty` is a secret component that may not be read now (sensitive or unextractable object).
    pub fn is_sensitive(&self, ty: CK_ATTRIBUTE_TYPE) -> bool {
        let secret = self.schema().ok().and_then(|s| flags_of(&s, ty)).is_some_and(|f| f & S != 0);
        secret && (self.bool(CKA_SENSITIVE) || !self.bool(CKA_EXTRACTABLE))
    }

    /// Whether `ty` is a secret component (sensitive or not).
    pub fn is_secret_component(&self, ty: CK_ATTRIBUTE_TYPE) -> bool {
        self.schema().ok().and_then(|s| flags_of(&s, ty)).is_some_and(|f| f & S != 0)
    }

    /// Builds an object from a caller's template plus what the token made (`material`: key values for
    /// generate/unwrap/derive), with the defaults and the token-set attributes of PKCS#11 2.40.
    pub fn build(template: &Template, material: Template, origin: Origin, is_so: bool) -> Result<Object> {
        let class = template_ulong(template, CKA_CLASS)?
            .or_else(|| {
                material
                    .iter()
                    .find(|(t, _)| *t == CKA_CLASS)
                    .and_then(|(_, v)| v.as_bytes())
                    .and_then(|b| decode_ulong(b).ok())
            })
            .ok_or(CKR_TEMPLATE_INCOMPLETE)?;
        let key_type = template_ulong(template, CKA_KEY_TYPE)?.or_else(|| {
            material
                .iter()
                .find(|(t, _)| *t == CKA_KEY_TYPE)
                .and_then(|(_, v)| v.as_bytes())
                .and_then(|b| decode_ulong(b).ok())
        });
        let schema = schema(class, key_type)?;
        let mut obj = Object::default();
        for (ty, value) in template {
            let flags = flags_of(&schema, *ty).ok_or(CKR_ATTRIBUTE_TYPE_INVALID)?;
            check_shape(*ty, value)?;
            if flags & T != 0 {
                return Err(CKR_ATTRIBUTE_READ_ONLY);
            }
            if flags & G != 0 && origin != Origin::Create {
                return Err(CKR_TEMPLATE_INCONSISTENT);
            }
            if *ty == CKA_TRUSTED && value.as_bytes() != Some(&[0]) && !is_so {
                return Err(CKR_ATTRIBUTE_READ_ONLY);
            }
            obj.attrs.insert(*ty, value.clone());
        }
        for (ty, value) in material {
            // What the token computed wins over the caller's claims of the same attribute, which must agree.
            if let Some(given) = obj.attrs.get(&ty) {
                if *given != value && ty != CKA_VALUE_LEN {
                    return Err(CKR_TEMPLATE_INCONSISTENT);
                }
            }
            obj.attrs.insert(ty, value);
        }
        for (ty, flags) in &schema {
            if obj.attrs.contains_key(ty) {
                continue;
            }
            if flags & C != 0 && origin == Origin::Create {
                return Err(CKR_TEMPLATE_INCOMPLETE);
            }
            if let Some(default) = default_value(class, *ty, origin) {
                obj.attrs.insert(*ty, default);
            }
        }
        obj.token_set(origin);
        obj.check_consistency()?;
        Ok(obj)
    }

    /// Rules between attributes: a key needing a PIN for each use is a private object, so that whoever uses
    /// it is logged in as the user (CKR_TEMPLATE_INCONSISTENT, as SoftHSM2).
    fn check_consistency(&self) -> Result<()> {
        if self.bool(CKA_ALWAYS_AUTHENTICATE) && !self.is_private() {
            return Err(CKR_TEMPLATE_INCONSISTENT);
        }
        Ok(())
    }

    /// The attributes the token keeps: CKA_LOCAL, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE,
    /// CKA_KEY_GEN_MECHANISM, CKA_VALUE_LEN, CKA_MODULUS_BITS.
    fn token_set(&mut self, origin: Origin) {
        let class = self.class();
        if self.is_key() {
            let (local, mechanism) = match origin {
                Origin::Generate(m) => (true, m),
                _ => (false, CK_UNAVAILABLE_INFORMATION),
            };
            self.set(CKA_LOCAL, Attr::bool(local));
            self.set(CKA_KEY_GEN_MECHANISM, Attr::ulong(mechanism));
        }
        if class == CKO_SECRET_KEY || class == CKO_PRIVATE_KEY {
            let generated = matches!(origin, Origin::Generate(_));
            let always_sensitive = generated && self.bool(CKA_SENSITIVE);
            let never_extractable = generated && !self.bool(CKA_EXTRACTABLE);
            self.set(CKA_ALWAYS_SENSITIVE, Attr::bool(always_sensitive));
            self.set(CKA_NEVER_EXTRACTABLE, Attr::bool(never_extractable));
        }
        if class == CKO_SECRET_KEY {
            let len = self.get(CKA_VALUE).map_or(0, <[u8]>::len);
            self.set(CKA_VALUE_LEN, Attr::ulong(len as CK_ULONG));
        }
        if class == CKO_PUBLIC_KEY && self.key_type() == Some(CKK_RSA) {
            let bits = self.get(CKA_MODULUS).map_or(0, bit_length);
            self.set(CKA_MODULUS_BITS, Attr::ulong(bits as CK_ULONG));
        }
    }

    /// For C_DeriveKey: CKA_ALWAYS_SENSITIVE and CKA_NEVER_EXTRACTABLE follow the base key (2.40 §4.9).
    pub fn inherit_from_base(&mut self, base: &Object) {
        let always = base.bool(CKA_ALWAYS_SENSITIVE) && self.bool(CKA_SENSITIVE);
        let never = base.bool(CKA_NEVER_EXTRACTABLE) && !self.bool(CKA_EXTRACTABLE);
        self.set(CKA_ALWAYS_SENSITIVE, Attr::bool(always));
        self.set(CKA_NEVER_EXTRACTABLE, Attr::bool(never));
    }

    /// Checks one change of C_SetAttributeValue or of a C_CopyObject template (`copy`: CKA_TOKEN,
    /// CKA_PRIVATE and CKA_MODIFIABLE may change too, unless the object is unmodifiable).
    fn check_change(
        &self,
        schema: &[(CK_ATTRIBUTE_TYPE, u8)],
        ty: CK_ATTRIBUTE_TYPE,
        value: &Attr,
        is_so: bool,
        copy: bool,
    ) -> Result<()> {
        let flags = flags_of(schema, ty).ok_or(CKR_ATTRIBUTE_TYPE_INVALID)?;
        check_shape(ty, value)?;
        let current = self.attrs.get(&ty);
        if copy && !self.bool(CKA_MODIFIABLE) {
            // As SoftHSM2: the copy of an unmodifiable object is the object itself, and repeating a value
            // changes nothing.
            return if current == Some(value) { Ok(()) } else { Err(CKR_ATTRIBUTE_READ_ONLY) };
        }
        let new_true = value.as_bytes().is_some_and(|b| b.first().is_some_and(|v| *v != 0));
        let copy_may = copy && matches!(ty, CKA_TOKEN | CKA_PRIVATE | CKA_MODIFIABLE);
        if flags & M == 0 && !copy_may {
            return if current == Some(value) && copy { Ok(()) } else { Err(CKR_ATTRIBUTE_READ_ONLY) };
        }
        let was_true = self.bool(ty);
        let allowed = match ty {
            // Only ever towards more protection.
            CKA_SENSITIVE | CKA_WRAP_WITH_TRUSTED => new_true || !was_true,
            CKA_EXTRACTABLE | CKA_COPYABLE => !new_true || was_true,
            CKA_MODIFIABLE => !new_true || was_true,
            CKA_TRUSTED => !new_true || is_so,
            _ => true,
        };
        if allowed {
            Ok(())
        } else {
            Err(CKR_ATTRIBUTE_READ_ONLY)
        }
    }

    /// C_SetAttributeValue: all changes or none.
    pub fn apply_changes(&mut self, template: &Template, is_so: bool) -> Result<()> {
        if !self.bool(CKA_MODIFIABLE) {
            return Err(CKR_ACTION_PROHIBITED);
        }
        let schema = self.schema()?;
        for (ty, value) in template {
            self.check_change(&schema, *ty, value, is_so, false)?;
        }
        for (ty, value) in template {
            self.attrs.insert(*ty, value.clone());
        }
        Ok(())
    }

    /// C_CopyObject: the copy with the template's changes.
    pub fn copy_with(&self, template: &Template, is_so: bool) -> Result<Object> {
        if !self.bool(CKA_COPYABLE) {
            return Err(CKR_ACTION_PROHIBITED);
        }
        let schema = self.schema()?;
        for (ty, value) in template {
            self.check_change(&schema, *ty, value, is_so, true)?;
        }
        let mut copy = self.clone();
        for (ty, value) in template {
            copy.attrs.insert(*ty, value.clone());
        }
        copy.check_consistency()?;
        Ok(copy)
    }
}

/// The number of significant bits of a big-endian integer.
pub fn bit_length(bytes: &[u8]) -> usize {
    match bytes.iter().position(|b| *b != 0) {
        Some(i) => (bytes.len() - i - 1) * 8 + (8 - bytes[i].leading_zeros() as usize),
        None => 0,
    }
}

/// Defaults for attributes the template left out (SoftHSM2's choices where the spec leaves it to the token:
/// private and secret keys are private objects; keys are not sensitive and not extractable unless asked).
fn default_value(class: CK_OBJECT_CLASS, ty: CK_ATTRIBUTE_TYPE, origin: Origin) -> Option<Attr> {
    let _ = origin;
    Some(match ty {
        CKA_TOKEN
        | CKA_DERIVE
        | CKA_TRUSTED
        | CKA_SENSITIVE
        | CKA_EXTRACTABLE
        | CKA_WRAP_WITH_TRUSTED
        | CKA_ALWAYS_AUTHENTICATE => Attr::bool(false),
        CKA_PRIVATE => Attr::bool(matches!(class, CKO_PRIVATE_KEY | CKO_SECRET_KEY)),
        CKA_MODIFIABLE | CKA_COPYABLE | CKA_DESTROYABLE | CKA_ENCRYPT | CKA_DECRYPT | CKA_SIGN | CKA_VERIFY
        | CKA_SIGN_RECOVER | CKA_VERIFY_RECOVER | CKA_WRAP | CKA_UNWRAP => Attr::bool(true),
        CKA_CERTIFICATE_CATEGORY | CKA_JAVA_MIDP_SECURITY_DOMAIN => Attr::ulong(0),
        CKA_WRAP_TEMPLATE | CKA_UNWRAP_TEMPLATE | CKA_DERIVE_TEMPLATE => Attr::Template(BTreeMap::new()),
        CKA_LABEL
        | CKA_ID
        | CKA_SUBJECT
        | CKA_START_DATE
        | CKA_END_DATE
        | CKA_ALLOWED_MECHANISMS
        | CKA_PUBLIC_KEY_INFO
        | CKA_APPLICATION
        | CKA_OBJECT_ID
        | CKA_ISSUER
        | CKA_SERIAL_NUMBER
        | CKA_URL
        | CKA_HASH_OF_SUBJECT_PUBLIC_KEY
        | CKA_HASH_OF_ISSUER_PUBLIC_KEY => Attr::bytes(Vec::new()),
        CKA_VALUE if class == CKO_DATA => Attr::bytes(Vec::new()),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aes_template(extra: &[(CK_ATTRIBUTE_TYPE, Attr)]) -> Template {
        let mut t = vec![
            (CKA_CLASS, Attr::ulong(CKO_SECRET_KEY)),
            (CKA_KEY_TYPE, Attr::ulong(CKK_AES)),
            (CKA_VALUE, Attr::bytes(vec![7; 16])),
        ];
        t.extend(extra.iter().cloned());
        t
    }

    #[test]
    fn defaults_and_token_set_attributes() {
        let o = Object::build(&aes_template(&[]), vec![], Origin::Create, false).unwrap();
        assert!(o.is_private() && !o.is_token() && o.bool(CKA_MODIFIABLE) && !o.bool(CKA_LOCAL));
        assert_eq!(o.ulong(CKA_VALUE_LEN), Some(16));
        assert_eq!(o.ulong(CKA_KEY_GEN_MECHANISM), Some(CK_UNAVAILABLE_INFORMATION));
        assert!(!o.bool(CKA_ALWAYS_SENSITIVE) && !o.bool(CKA_NEVER_EXTRACTABLE));
    }

    #[test]
    fn template_errors() {
        let build = |t: &Template, origin| Object::build(t, vec![], origin, false).map(|_| ());
        assert_eq!(
            build(&aes_template(&[(CKA_MODULUS, Attr::bytes(vec![1]))]), Origin::Create),
            Err(CKR_ATTRIBUTE_TYPE_INVALID)
        );
        assert_eq!(
            build(&aes_template(&[(CKA_LOCAL, Attr::bool(true))]), Origin::Create),
            Err(CKR_ATTRIBUTE_READ_ONLY)
        );
        assert_eq!(
            build(&aes_template(&[(CKA_TOKEN, Attr::bytes(vec![1, 0]))]), Origin::Create),
            Err(CKR_ATTRIBUTE_VALUE_INVALID)
        );
        assert_eq!(
            build(&aes_template(&[(CKA_TRUSTED, Attr::bool(true))]), Origin::Create),
            Err(CKR_ATTRIBUTE_READ_ONLY)
        );
        assert_eq!(build(&aes_template(&[]), Origin::Generate(CKM_AES_KEY_GEN)), Err(CKR_TEMPLATE_INCONSISTENT));
        let no_value = vec![(CKA_CLASS, Attr::ulong(CKO_SECRET_KEY)), (CKA_KEY_TYPE, Attr::ulong(CKK_AES))];
        assert_eq!(build(&no_value, Origin::Create), Err(CKR_TEMPLATE_INCOMPLETE));
        assert!(Object::build(&aes_template(&[(CKA_TRUSTED, Attr::bool(true))]), vec![], Origin::Create, true).is_ok());
    }

    #[test]
    fn one_way_attributes() {
        let mut o = Object::build(&aes_template(&[(CKA_EXTRACTABLE, Attr::bool(true))]), vec![], Origin::Create, false)
            .unwrap();
        o.apply_changes(&vec![(CKA_SENSITIVE, Attr::bool(true))], false).unwrap();
        assert_eq!(o.apply_changes(&vec![(CKA_SENSITIVE, Attr::bool(false))], false), Err(CKR_ATTRIBUTE_READ_ONLY));
        o.apply_changes(&vec![(CKA_EXTRACTABLE, Attr::bool(false))], false).unwrap();
        assert_eq!(o.apply_changes(&vec![(CKA_EXTRACTABLE, Attr::bool(true))], false), Err(CKR_ATTRIBUTE_READ_ONLY));
        assert_eq!(o.apply_changes(&vec![(CKA_VALUE, Attr::bytes(vec![1; 16]))], false), Err(CKR_ATTRIBUTE_READ_ONLY));
        // All or nothing.
        let r = o.apply_changes(&vec![(CKA_LABEL, Attr::bytes(b"x".to_vec())), (CKA_CLASS, Attr::ulong(0))], false);
        assert_eq!(r, Err(CKR_ATTRIBUTE_READ_ONLY));
        assert_eq!(o.label(), b"");
    }

    #[test]
    fn copies_of_unmodifiable_objects_change_nothing() {
        let fixed = Object::build(&aes_template(&[(CKA_MODIFIABLE, Attr::bool(false))]), vec![], Origin::Create, false)
            .unwrap();
        let copy = |t: Template| fixed.copy_with(&t, false);
        assert_eq!(copy(vec![(CKA_DECRYPT, Attr::bool(false))]), Err(CKR_ATTRIBUTE_READ_ONLY));
        assert_eq!(copy(vec![(CKA_TOKEN, Attr::bool(true))]), Err(CKR_ATTRIBUTE_READ_ONLY));
        assert_eq!(copy(vec![(CKA_MODULUS, Attr::bytes(vec![1]))]), Err(CKR_ATTRIBUTE_TYPE_INVALID));
        assert_eq!(copy(vec![(CKA_DECRYPT, Attr::bool(true)), (CKA_TOKEN, Attr::bool(false))]), Ok(fixed.clone()));
        let open = Object::build(&aes_template(&[]), vec![], Origin::Create, false).unwrap();
        assert!(!open.copy_with(&vec![(CKA_DECRYPT, Attr::bool(false))], false).unwrap().bool(CKA_DECRYPT));
    }

    #[test]
    fn always_authenticate_keys_are_private_objects() {
        let ec = |extra: &[(CK_ATTRIBUTE_TYPE, Attr)]| {
            let mut t = vec![
                (CKA_CLASS, Attr::ulong(CKO_PRIVATE_KEY)),
                (CKA_KEY_TYPE, Attr::ulong(CKK_EC)),
                (CKA_EC_PARAMS, Attr::bytes(vec![6, 8])),
                (CKA_VALUE, Attr::bytes(vec![1; 32])),
            ];
            t.extend(extra.iter().cloned());
            Object::build(&t, vec![], Origin::Create, false)
        };
        let key = ec(&[(CKA_ALWAYS_AUTHENTICATE, Attr::bool(true))]).unwrap();
        assert!(key.is_private() && key.bool(CKA_ALWAYS_AUTHENTICATE));
        let public = [(CKA_ALWAYS_AUTHENTICATE, Attr::bool(true)), (CKA_PRIVATE, Attr::bool(false))];
        assert_eq!(ec(&public), Err(CKR_TEMPLATE_INCONSISTENT));
        assert_eq!(key.copy_with(&vec![(CKA_PRIVATE, Attr::bool(false))], false), Err(CKR_TEMPLATE_INCONSISTENT));
        assert!(!ec(&[]).unwrap().bool(CKA_ALWAYS_AUTHENTICATE));
    }

    #[test]
    fn attribute_arrays_survive_the_state_file() {
        let mut attrs = BTreeMap::new();
        attrs.insert(CKA_LABEL, Attr::bytes(b"mbk".to_vec()));
        attrs.insert(CKA_UNWRAP_TEMPLATE, Attr::Template(BTreeMap::from([(CKA_WRAP_WITH_TRUSTED, Bytes(vec![1]))])));
        attrs.insert(CKA_WRAP_TEMPLATE, Attr::Template(BTreeMap::new()));
        let json = serde_json::to_string(&attrs).unwrap();
        let back: BTreeMap<CK_ATTRIBUTE_TYPE, Attr> = serde_json::from_str(&json).expect(&json);
        assert_eq!(back, attrs);
    }

    #[test]
    fn bit_lengths() {
        assert_eq!(bit_length(&[0, 0x80, 0]), 16);
        assert_eq!(bit_length(&[1]), 1);
        assert_eq!(bit_length(&[]), 0);
    }
}
