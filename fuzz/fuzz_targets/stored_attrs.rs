//! A key row's attributes as stored (src/attrs.rs): `Template::decode`; what decodes encodes canonically
//! (`encode` sorts by type) and decodes again to the same template, sorted. The accessors the vault uses and
//! `vault::restorable` (what restore keeps of a record's attributes) run on the result.
#![no_main]

use cryptoki_sys::*;
use libfuzzer_sys::fuzz_target;
use p11shim::attrs::{Attr, Template, Value};

/// The template in the canonical order: sorted by type at each level, stable.
fn sorted(attrs: &[Attr]) -> Vec<Attr> {
    let mut out: Vec<Attr> = attrs
        .iter()
        .map(|a| match &a.value {
            Value::Bytes(_) => a.clone(),
            Value::Array(inner) => Attr::array(a.ty, sorted(inner)),
        })
        .collect();
    out.sort_by_key(|a| a.ty);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some(template) = Template::decode(data) else { return };
    let encoded = template.encode();
    let again = Template::decode(&encoded).expect("an encoding decodes");
    assert!(again.0 == sorted(&template.0), "decode(encode(t)) is t in canonical order");
    assert_eq!(again.encode(), encoded, "the encoding is canonical");
    if encoded == data {
        assert!(again == template);
    }
    let class = template.ulong(CKA_CLASS).unwrap_or(CKO_SECRET_KEY);
    let _ = (template.bool(CKA_PRIVATE), template.bytes(CKA_LABEL), template.mechanisms(CKA_ALLOWED_MECHANISMS));
    let restorable = p11shim::vault::restorable(&template, class);
    assert!(Template::decode(&restorable.encode()).is_some());
});
