//! Attribute templates as safe values: what the shim reads from an application's template, sends to the
//! backend, and keeps in a key store row. Values are zeroized on drop (a template may carry a CKA_VALUE).

use cryptoki_sys::*;
use zeroize::Zeroizing;

/// The vendor attribute holding a stored key's group (include/p11shim.h); never forwarded to the backend.
/// Its value keeps bit 30 clear: that bit is CKF_ARRAY_ATTRIBUTE, which would make it a template attribute.
pub const CKA_P11SHIM_GROUP: CK_ATTRIBUTE_TYPE = CKA_VENDOR_DEFINED | 0x0053_4801;

/// The longest key group name, in characters.
pub const GROUP_MAX: usize = 64;

/// The one rule for key group names, wherever a name is given (CKA_P11SHIM_GROUP, `default_group`,
/// `p11shim keys set-group`): 1 to 64 characters, printable (no control, format or bidirectional characters,
/// which would hide in logs and terminals), and no space at either end. A group regex can then always name
/// a group exactly ('.' matches every character of it).
pub fn check_group(name: &str) -> std::result::Result<(), String> {
    let count = name.chars().count();
    if count == 0 || count > GROUP_MAX {
        return Err(format!("group name {name:?}: use 1 to {GROUP_MAX} characters (it has {count})"));
    }
    if let Some(c) = name.chars().find(|c| c.is_control() || is_invisible(*c)) {
        return Err(format!("group name {name:?}: the character {:?} (U+{:04X}) is not printable", c, c as u32));
    }
    if name.starts_with(char::is_whitespace) || name.ends_with(char::is_whitespace) {
        return Err(format!("group name {name:?}: no space at the start or the end"));
    }
    Ok(())
}

/// Format characters that print as nothing or reorder text (zero-width, bidirectional controls, BOM) and
/// separators other than the space.
fn is_invisible(c: char) -> bool {
    matches!(c as u32, 0x00AD | 0x061C | 0x180E | 0x200B..=0x200F | 0x2028..=0x202E | 0x2060..=0x206F | 0xFEFF)
        || (c.is_whitespace() && c != ' ')
}

#[derive(Clone, PartialEq, Eq)]
pub enum Value {
    /// Plain values, and mechanism arrays (CKA_ALLOWED_MECHANISMS) as the CK_MECHANISM_TYPEs' bytes in
    /// native order, as they lie in memory: see [`Attr::mechanisms`].
    Bytes(Zeroizing<Vec<u8>>),
    /// Attribute arrays ([`Layout::Attributes`]: CKA_WRAP_TEMPLATE, CKA_UNWRAP_TEMPLATE, CKA_DERIVE_TEMPLATE).
    Array(Vec<Attr>),
}

/// How an attribute's value lies in a CK_ATTRIBUTE. The CKF_ARRAY_ATTRIBUTE bit of a type says that its
/// value is an array, not of what: the three template attributes hold CK_ATTRIBUTEs, CKA_ALLOWED_MECHANISMS
/// holds CK_MECHANISM_TYPEs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Bytes: every type not named below, vendor types with the array bit included (their layout is the
    /// vendor's, so the shim passes their bytes as they are).
    Bytes,
    /// An array of CK_ATTRIBUTE (a template inside the attribute; PKCS#11 allows one level of nesting).
    Attributes,
    /// An array of CK_MECHANISM_TYPE.
    Mechanisms,
}

/// The one table of array layouts: every reader and writer of templates asks it.
pub fn layout(ty: CK_ATTRIBUTE_TYPE) -> Layout {
    match ty {
        CKA_WRAP_TEMPLATE | CKA_UNWRAP_TEMPLATE | CKA_DERIVE_TEMPLATE => Layout::Attributes,
        CKA_ALLOWED_MECHANISMS => Layout::Mechanisms,
        _ => Layout::Bytes,
    }
}

/// Whether an attribute type's value is an array of attributes (a template attribute).
pub fn is_template_type(ty: CK_ATTRIBUTE_TYPE) -> bool {
    layout(ty) == Layout::Attributes
}

/// The size of one element of a mechanism array.
pub const MECHANISM_SIZE: usize = std::mem::size_of::<CK_MECHANISM_TYPE>();

/// A mechanism array's bytes as mechanism types; `None` unless the length is a whole number of them.
pub fn mechanisms_from_bytes(bytes: &[u8]) -> Option<Vec<CK_MECHANISM_TYPE>> {
    if bytes.len() % MECHANISM_SIZE != 0 {
        return None;
    }
    bytes.chunks_exact(MECHANISM_SIZE).map(|m| Some(CK_MECHANISM_TYPE::from_ne_bytes(m.try_into().ok()?))).collect()
}

/// Mechanism types as a mechanism array's bytes.
pub fn mechanisms_to_bytes(list: &[CK_MECHANISM_TYPE]) -> Vec<u8> {
    list.iter().flat_map(|m| m.to_ne_bytes()).collect()
}

#[derive(Clone, PartialEq, Eq)]
pub struct Attr {
    pub ty: CK_ATTRIBUTE_TYPE,
    pub value: Value,
}

impl std::fmt::Debug for Attr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Values are not printed: a template may hold a secret.
        write!(f, "Attr({:#x})", self.ty)
    }
}

impl Attr {
    pub fn bytes(ty: CK_ATTRIBUTE_TYPE, value: &[u8]) -> Attr {
        Attr { ty, value: Value::Bytes(Zeroizing::new(value.to_vec())) }
    }
    pub fn bool(ty: CK_ATTRIBUTE_TYPE, value: bool) -> Attr {
        Attr::bytes(ty, &[value as u8])
    }
    pub fn ulong(ty: CK_ATTRIBUTE_TYPE, value: CK_ULONG) -> Attr {
        Attr::bytes(ty, &value.to_ne_bytes())
    }
    pub fn array(ty: CK_ATTRIBUTE_TYPE, attrs: Vec<Attr>) -> Attr {
        Attr { ty, value: Value::Array(attrs) }
    }
    /// A mechanism array (CKA_ALLOWED_MECHANISMS).
    pub fn mechanisms(ty: CK_ATTRIBUTE_TYPE, list: &[CK_MECHANISM_TYPE]) -> Attr {
        Attr { ty, value: Value::Bytes(Zeroizing::new(mechanisms_to_bytes(list))) }
    }
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match &self.value {
            Value::Bytes(b) => Some(b),
            Value::Array(_) => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self.as_bytes()? {
            [b] => Some(*b != 0),
            _ => None,
        }
    }
    pub fn as_ulong(&self) -> Option<CK_ULONG> {
        Some(CK_ULONG::from_ne_bytes(self.as_bytes()?.try_into().ok()?))
    }
    /// The value as a mechanism array; `None` if it is not bytes of whole mechanism types.
    pub fn as_mechanisms(&self) -> Option<Vec<CK_MECHANISM_TYPE>> {
        mechanisms_from_bytes(self.as_bytes()?)
    }
}

/// Whether an attribute type has the CKF_ARRAY_ATTRIBUTE bit. The bit does not say how the value is laid
/// out (CKA_ALLOWED_MECHANISMS has it and holds mechanism types, not attributes): to read or write a value,
/// or to ask whether it is a template attribute, use [`layout`] or [`is_template_type`].
pub fn is_array_type(ty: CK_ATTRIBUTE_TYPE) -> bool {
    ty & CKF_ARRAY_ATTRIBUTE != 0
}

/// A template: attributes in the order given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Template(pub Vec<Attr>);

impl Template {
    pub fn get(&self, ty: CK_ATTRIBUTE_TYPE) -> Option<&Attr> {
        self.0.iter().find(|a| a.ty == ty)
    }
    pub fn bytes(&self, ty: CK_ATTRIBUTE_TYPE) -> Option<&[u8]> {
        self.get(ty)?.as_bytes()
    }
    pub fn bool(&self, ty: CK_ATTRIBUTE_TYPE) -> Option<bool> {
        self.get(ty)?.as_bool()
    }
    pub fn ulong(&self, ty: CK_ATTRIBUTE_TYPE) -> Option<CK_ULONG> {
        self.get(ty)?.as_ulong()
    }
    pub fn mechanisms(&self, ty: CK_ATTRIBUTE_TYPE) -> Option<Vec<CK_MECHANISM_TYPE>> {
        self.get(ty)?.as_mechanisms()
    }
    /// Sets `attr`, replacing any attribute of the same type.
    pub fn set(&mut self, attr: Attr) {
        self.remove(attr.ty);
        self.0.push(attr);
    }
    pub fn remove(&mut self, ty: CK_ATTRIBUTE_TYPE) -> Option<Attr> {
        let i = self.0.iter().position(|a| a.ty == ty)?;
        Some(self.0.remove(i))
    }
    /// Whether every attribute of `wanted` is here with the same value (C_FindObjects matching).
    pub fn matches(&self, wanted: &Template) -> bool {
        wanted.0.iter().all(|w| self.get(w.ty).is_some_and(|a| a.value == w.value))
    }

    /// A canonical byte form: sorted by type, each `type u64 | kind u8 | len u32 | value`, arrays nested.
    /// Used for the rows of the key store and covered by their MAC, so it must never change for version 1.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        encode_into(&self.0, &mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Template> {
        let mut pos = 0;
        let attrs = decode_from(bytes, &mut pos, bytes.len(), false)?;
        (pos == bytes.len()).then_some(Template(attrs))
    }
}

fn encode_into(attrs: &[Attr], out: &mut Vec<u8>) {
    let mut sorted: Vec<&Attr> = attrs.iter().collect();
    sorted.sort_by_key(|a| a.ty);
    for a in sorted {
        out.extend_from_slice(&a.ty.to_be_bytes());
        match &a.value {
            Value::Bytes(b) => {
                out.push(0);
                out.extend_from_slice(&(b.len() as u32).to_be_bytes());
                out.extend_from_slice(b);
            }
            Value::Array(inner) => {
                let mut nested = Vec::new();
                encode_into(inner, &mut nested);
                out.push(1);
                out.extend_from_slice(&(nested.len() as u32).to_be_bytes());
                out.extend_from_slice(&nested);
            }
        }
    }
}

/// Reads attributes up to `end`. An attribute array holds plain values only (`nested`: reading one): PKCS#11
/// allows one level of nesting and every writer keeps to it, and following deeper arrays would let a row's
/// bytes recurse until the stack overflows (rows are decoded before their MAC is checked, to find keys).
fn decode_from(bytes: &[u8], pos: &mut usize, end: usize, nested: bool) -> Option<Vec<Attr>> {
    let mut attrs = Vec::new();
    while *pos < end {
        let take = |pos: &mut usize, n: usize| -> Option<&[u8]> {
            let s = bytes.get(*pos..(*pos).checked_add(n)?)?;
            *pos += n;
            Some(s)
        };
        let ty = u64::from_be_bytes(take(pos, 8)?.try_into().ok()?) as CK_ATTRIBUTE_TYPE;
        let kind = take(pos, 1)?[0];
        let len = u32::from_be_bytes(take(pos, 4)?.try_into().ok()?) as usize;
        let inner_end = pos.checked_add(len).filter(|e| *e <= end)?;
        let value = match kind {
            0 => Value::Bytes(Zeroizing::new(take(pos, len)?.to_vec())),
            1 if !nested => Value::Array(decode_from(bytes, pos, inner_end, true)?),
            _ => return None,
        };
        if *pos != inner_end {
            return None;
        }
        attrs.push(Attr { ty, value });
    }
    Some(attrs)
}

/// The attributes of an object that are read back after creation and kept in its row (what the application
/// can read without touching the key). Secret values (CKA_VALUE of secret keys, private key components) are
/// never in this list for secret and private keys; see `public_values`.
pub const KEPT: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_PRIVATE,
    CKA_MODIFIABLE,
    CKA_LABEL,
    CKA_COPYABLE,
    CKA_DESTROYABLE,
    CKA_KEY_TYPE,
    CKA_ID,
    CKA_START_DATE,
    CKA_END_DATE,
    CKA_DERIVE,
    CKA_LOCAL,
    CKA_KEY_GEN_MECHANISM,
    CKA_SUBJECT,
    CKA_ENCRYPT,
    CKA_VERIFY,
    CKA_VERIFY_RECOVER,
    CKA_WRAP,
    CKA_TRUSTED,
    CKA_DECRYPT,
    CKA_SIGN,
    CKA_SIGN_RECOVER,
    CKA_UNWRAP,
    CKA_SENSITIVE,
    CKA_EXTRACTABLE,
    CKA_ALWAYS_SENSITIVE,
    CKA_NEVER_EXTRACTABLE,
    CKA_WRAP_WITH_TRUSTED,
    CKA_ALWAYS_AUTHENTICATE,
    CKA_VALUE_LEN,
    CKA_CHECK_VALUE,
    CKA_MODULUS,
    CKA_MODULUS_BITS,
    CKA_PUBLIC_EXPONENT,
    CKA_EC_PARAMS,
    CKA_EC_POINT,
    CKA_APPLICATION,
    CKA_OBJECT_ID,
    CKA_CERTIFICATE_TYPE,
    CKA_ISSUER,
    CKA_SERIAL_NUMBER,
    CKA_CERTIFICATE_CATEGORY,
    CKA_URL,
    CKA_HASH_OF_SUBJECT_PUBLIC_KEY,
    CKA_HASH_OF_ISSUER_PUBLIC_KEY,
    CKA_ALLOWED_MECHANISMS,
    CKA_WRAP_TEMPLATE,
    CKA_UNWRAP_TEMPLATE,
    CKA_DERIVE_TEMPLATE,
    CKA_PRIME,
    CKA_SUBPRIME,
    CKA_BASE,
    CKA_VALUE_BITS,
];

/// Attributes that are public on public objects (public keys, certificates, data) and kept in the row for
/// them, but secret on secret and private keys and never kept there.
pub const PUBLIC_VALUES: &[CK_ATTRIBUTE_TYPE] = &[CKA_VALUE];

/// The secret components of a key of this class and type: never stored, never answered from a row (a stored
/// key's are always sensitive). An attribute the key type does not have is not one of them (an RSA private
/// key has no CKA_VALUE), and domain parameters (CKA_PRIME, CKA_SUBPRIME, CKA_BASE) are public.
pub fn secret_parts(class: CK_OBJECT_CLASS, key_type: CK_KEY_TYPE) -> &'static [CK_ATTRIBUTE_TYPE] {
    match (class, key_type) {
        (CKO_SECRET_KEY, _) => &[CKA_VALUE],
        (CKO_PRIVATE_KEY, CKK_RSA) => {
            &[CKA_PRIVATE_EXPONENT, CKA_PRIME_1, CKA_PRIME_2, CKA_EXPONENT_1, CKA_EXPONENT_2, CKA_COEFFICIENT]
        }
        (CKO_PRIVATE_KEY, _) => &[CKA_VALUE],
        _ => &[],
    }
}

/// Whether objects of this class hold a secret that is kept wrapped under the MBK.
pub fn has_secret(class: CK_OBJECT_CLASS) -> bool {
    matches!(class, CKO_SECRET_KEY | CKO_PRIVATE_KEY)
}

/// Attributes the application may change with C_SetAttributeValue on a stored key (PKCS#11 2.40 §4.4
/// table 15 and the key tables), besides the special one-way ones handled by the vault.
pub const MODIFIABLE: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_LABEL,
    CKA_ID,
    CKA_START_DATE,
    CKA_END_DATE,
    CKA_SUBJECT,
    CKA_DERIVE,
    CKA_ENCRYPT,
    CKA_DECRYPT,
    CKA_SIGN,
    CKA_VERIFY,
    CKA_SIGN_RECOVER,
    CKA_VERIFY_RECOVER,
    CKA_WRAP,
    CKA_UNWRAP,
    CKA_APPLICATION,
];

/// Attributes that can be given when the shim recreates an object in the HSM from its row (C_CreateObject
/// for public objects, C_UnwrapKey for secrets): everything the HSM enforces on the key's use. The rest
/// (CKA_LOCAL, CKA_KEY_GEN_MECHANISM, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE, …) are the HSM's to set,
/// and are answered from the row. CKA_MODIFIABLE, CKA_COPYABLE and CKA_DESTROYABLE are not given either:
/// the shim enforces them on the row, and the HSM copy is the shim's own, which the application cannot name.
pub const SETTABLE: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_KEY_TYPE,
    CKA_PRIVATE,
    CKA_LABEL,
    CKA_ID,
    CKA_START_DATE,
    CKA_END_DATE,
    CKA_DERIVE,
    CKA_SUBJECT,
    CKA_ENCRYPT,
    CKA_VERIFY,
    CKA_VERIFY_RECOVER,
    CKA_WRAP,
    CKA_DECRYPT,
    CKA_SIGN,
    CKA_SIGN_RECOVER,
    CKA_UNWRAP,
    CKA_SENSITIVE,
    CKA_EXTRACTABLE,
    CKA_WRAP_WITH_TRUSTED,
    CKA_ALWAYS_AUTHENTICATE,
    CKA_ALLOWED_MECHANISMS,
    CKA_WRAP_TEMPLATE,
    CKA_UNWRAP_TEMPLATE,
    CKA_DERIVE_TEMPLATE,
    CKA_MODULUS,
    CKA_PUBLIC_EXPONENT,
    CKA_EC_PARAMS,
    CKA_EC_POINT,
    CKA_VALUE,
    CKA_APPLICATION,
    CKA_OBJECT_ID,
    CKA_CERTIFICATE_TYPE,
    CKA_ISSUER,
    CKA_SERIAL_NUMBER,
    CKA_CERTIFICATE_CATEGORY,
    CKA_URL,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_canonical_and_round_trips() {
        let a = Template(vec![
            Attr::bytes(CKA_LABEL, b"k1"),
            Attr::bool(CKA_SIGN, true),
            Attr::array(CKA_UNWRAP_TEMPLATE, vec![Attr::bool(CKA_WRAP_WITH_TRUSTED, true)]),
        ]);
        let mut b = a.clone();
        b.0.reverse();
        assert_eq!(a.encode(), b.encode());
        let back = Template::decode(&a.encode()).unwrap();
        assert!(back.matches(&a) && a.matches(&back));
    }

    #[test]
    fn truncated_or_padded_encodings_are_refused() {
        let bytes = Template(vec![Attr::bytes(CKA_LABEL, b"abc")]).encode();
        assert!(Template::decode(&bytes[..bytes.len() - 1]).is_none());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Template::decode(&longer).is_none());
    }

    #[test]
    fn arrays_nested_in_attribute_arrays_are_refused_without_recursion() {
        let one = Template(vec![Attr::array(CKA_WRAP_TEMPLATE, vec![Attr::bool(CKA_SENSITIVE, true)])]).encode();
        assert!(Template::decode(&one).is_some());
        let array_header =
            |ty: CK_ATTRIBUTE_TYPE, len: usize| [&ty.to_be_bytes()[..], &[1], &(len as u32).to_be_bytes()].concat();
        let two = [array_header(CKA_UNWRAP_TEMPLATE, one.len()), one].concat();
        assert!(Template::decode(&two).is_none());
        // 100000 levels (1.3 MB): decoding used to recurse into each and overflow the stack.
        let levels = 100_000;
        let deep: Vec<u8> = (0..levels).flat_map(|i| array_header(CKA_WRAP_TEMPLATE, 13 * (levels - 1 - i))).collect();
        assert!(Template::decode(&deep).is_none());
    }

    #[test]
    fn the_group_attribute_is_a_plain_vendor_attribute() {
        const { assert!(CKA_P11SHIM_GROUP >= CKA_VENDOR_DEFINED) };
        assert!(!is_array_type(CKA_P11SHIM_GROUP));
    }

    #[test]
    fn the_layout_table_names_each_array_attribute() {
        for ty in [CKA_WRAP_TEMPLATE, CKA_UNWRAP_TEMPLATE, CKA_DERIVE_TEMPLATE] {
            assert_eq!(layout(ty), Layout::Attributes, "{ty:#x}");
            assert!(is_template_type(ty));
        }
        assert_eq!(layout(CKA_ALLOWED_MECHANISMS), Layout::Mechanisms);
        assert!(!is_template_type(CKA_ALLOWED_MECHANISMS));
        // The array bit alone says nothing about the layout: a vendor type with it is bytes.
        let vendor_array = CKA_VENDOR_DEFINED | CKF_ARRAY_ATTRIBUTE | 0x42;
        assert!(is_array_type(vendor_array));
        assert_eq!(layout(vendor_array), Layout::Bytes);
        for ty in [CKA_LABEL, CKA_VALUE, CKA_CLASS, CKA_P11SHIM_GROUP] {
            assert_eq!(layout(ty), Layout::Bytes, "{ty:#x}");
        }
        // Every type the table names has the bit, as PKCS#11 defines them.
        for ty in [CKA_WRAP_TEMPLATE, CKA_UNWRAP_TEMPLATE, CKA_DERIVE_TEMPLATE, CKA_ALLOWED_MECHANISMS] {
            assert!(is_array_type(ty), "{ty:#x}");
        }
    }

    #[test]
    fn mechanism_arrays_are_native_mechanism_types() {
        let list = [CKM_RSA_PKCS_PSS, CKM_SHA256_RSA_PKCS_PSS, CKM_RSA_PKCS];
        let a = Attr::mechanisms(CKA_ALLOWED_MECHANISMS, &list);
        assert_eq!(a.as_bytes().map(<[u8]>::len), Some(3 * MECHANISM_SIZE));
        assert_eq!(a.as_bytes().map(<[u8]>::to_vec), Some(mechanisms_to_bytes(&list)));
        assert_eq!(a.as_mechanisms(), Some(list.to_vec()));
        assert_eq!(Template(vec![a]).mechanisms(CKA_ALLOWED_MECHANISMS), Some(list.to_vec()));
        assert_eq!(mechanisms_from_bytes(&[]), Some(vec![]));
        assert_eq!(mechanisms_from_bytes(&[0; MECHANISM_SIZE + 1]), None, "not a whole number of mechanisms");
        assert_eq!(Attr::array(CKA_WRAP_TEMPLATE, vec![]).as_mechanisms(), None);
    }

    /// The encoding is covered by the MACs of stored rows: these bytes must never change.
    #[test]
    fn the_encoding_is_fixed() {
        let t = Template(vec![
            Attr::bool(CKA_SIGN, true),
            Attr::mechanisms(CKA_ALLOWED_MECHANISMS, &[CKM_ECDSA]),
            Attr::array(CKA_UNWRAP_TEMPLATE, vec![Attr::bool(CKA_WRAP_WITH_TRUSTED, true)]),
        ]);
        let expected = concat!(
            "0000000000000108",
            "00",
            "00000001",
            "01",
            "0000000040000212",
            "01",
            "0000000e",
            "0000000000000210",
            "00",
            "00000001",
            "01",
            "0000000040000600",
            "00",
            "00000008",
            "4110000000000000",
        );
        assert_eq!(hex::encode(t.encode()), expected);
        let back = Template::decode(&t.encode()).expect("decodes");
        assert!(back.matches(&t) && t.matches(&back));
    }

    #[test]
    fn matching_compares_values() {
        let t = Template(vec![Attr::bytes(CKA_LABEL, b"x"), Attr::ulong(CKA_CLASS, CKO_SECRET_KEY)]);
        assert!(t.matches(&Template(vec![Attr::ulong(CKA_CLASS, CKO_SECRET_KEY)])));
        assert!(!t.matches(&Template(vec![Attr::bytes(CKA_LABEL, b"y")])));
        assert!(!t.matches(&Template(vec![Attr::bytes(CKA_ID, b"x")])));
    }

    #[test]
    fn group_names_follow_one_rule() {
        for good in ["Pay", "Payments-2026", "HR records", "Zahlungsverkehr-Ä", &"g".repeat(GROUP_MAX)] {
            assert_eq!(check_group(good), Ok(()), "{good:?}");
        }
        for bad in [
            "",
            "a\nb",
            "tab\there",
            " lead",
            "trail ",
            "zero\u{200B}width",
            "bidi\u{202E}",
            &"g".repeat(GROUP_MAX + 1),
        ] {
            assert!(check_group(bad).is_err(), "{bad:?}");
        }
        assert!(check_group("a\nb").unwrap_err().contains("U+000A"));
    }
}
