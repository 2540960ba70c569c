//! An application's attribute template (src/ffi/args.rs): a CK_ATTRIBUTE array built from the input, with
//! values in their own buffers, attribute arrays (CKA_WRAP_TEMPLATE, …) nested at unaligned addresses, NULL
//! values, lengths the shim must refuse without reading, a misaligned or NULL array, a count past the limit.
//! `template` (what C_CreateObject and the other input calls read), `check_template` as input and as a
//! C_GetAttributeValue query, and `names` run on it; the result is compared with what the builder put in,
//! and whether it is refused with what PKCS#11 and the shim's limits say. Then each attribute read is
//! answered with `answer` into buffers of input-chosen sizes (the C_GetAttributeValue protocol).
//! AddressSanitizer sees every read and write of the application's memory.
#![no_main]

use cryptoki_sys::*;
use libfuzzer_sys::fuzz_target;
use p11shim::attrs::{layout, Attr, Layout, Template, Value, CKA_P11SHIM_GROUP};
use p11shim::ffi::args::{answer, check_template, names, template, TemplateKind};
use std::ffi::c_void;
use std::ptr::null_mut;

const ATTRIBUTE_SIZE: usize = std::mem::size_of::<CK_ATTRIBUTE>();
/// The shim's limits (src/ffi/args.rs): longest value, attributes in one template.
const MAX_VALUE: CK_ULONG = 1 << 24;
const MAX_ATTRIBUTES: usize = 4096;

const TYPES: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_TOKEN,
    CKA_LABEL,
    CKA_VALUE,
    CKA_KEY_TYPE,
    CKA_SENSITIVE,
    CKA_WRAP_TEMPLATE,
    CKA_UNWRAP_TEMPLATE,
    CKA_DERIVE_TEMPLATE,
    CKA_ALLOWED_MECHANISMS,
    CKA_P11SHIM_GROUP,
    CKA_VENDOR_DEFINED | CKF_ARRAY_ATTRIBUTE | 1,
];

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        taken.to_vec()
    }
    fn ty(&mut self) -> CK_ATTRIBUTE_TYPE {
        let pick = self.byte() as usize;
        match TYPES.get(pick) {
            Some(ty) => *ty,
            None if pick < 128 => (pick as CK_ATTRIBUTE_TYPE) << (pick % 24),
            None => CK_ATTRIBUTE_TYPE::from_le_bytes(self.bytes(8).try_into().unwrap_or([0xff; 8])),
        }
    }
}

/// The application's memory: every buffer an array points into, alive until the run ends. A buffer is never
/// resized after a pointer into it is taken.
#[derive(Default)]
struct Memory(Vec<Box<[u8]>>);

impl Memory {
    fn keep(&mut self, bytes: Vec<u8>) -> *mut u8 {
        let mut buffer = bytes.into_boxed_slice();
        let ptr = buffer.as_mut_ptr();
        self.0.push(buffer);
        ptr
    }
    /// `attrs` laid out as an array `offset` bytes into a fresh buffer (so possibly unaligned).
    fn array(&mut self, attrs: &[CK_ATTRIBUTE], offset: usize) -> *mut CK_ATTRIBUTE {
        let base = self.keep(vec![0; offset + attrs.len() * ATTRIBUTE_SIZE]);
        // SAFETY: the buffer holds `offset` bytes and then room for every attribute.
        unsafe {
            let first = base.add(offset) as *mut CK_ATTRIBUTE;
            for (i, a) in attrs.iter().enumerate() {
                std::ptr::write_unaligned(first.add(i), *a);
            }
            first
        }
    }
}

/// What the shim must make of an attribute: its value, or a refusal of the whole template.
#[derive(Debug)]
enum Model {
    Bytes(Vec<u8>),
    Array(Vec<(CK_ATTRIBUTE_TYPE, Model)>),
    Refused,
}

impl Model {
    fn refused(&self) -> bool {
        match self {
            Model::Refused => true,
            Model::Bytes(_) => false,
            Model::Array(inner) => inner.iter().any(|(_, m)| m.refused()),
        }
    }
    fn attributes(&self) -> usize {
        match self {
            Model::Array(inner) => inner.len() + inner.iter().map(|(_, m)| m.attributes()).sum::<usize>(),
            _ => 0,
        }
    }
    fn attr(&self, ty: CK_ATTRIBUTE_TYPE) -> Attr {
        match self {
            Model::Bytes(b) => Attr::bytes(ty, b),
            Model::Array(inner) => Attr::array(ty, inner.iter().map(|(t, m)| m.attr(*t)).collect()),
            Model::Refused => unreachable!("a refused template has no value"),
        }
    }
}

/// One attribute at `depth` (0: the template itself, 1: inside an attribute array).
fn attribute(input: &mut Input, memory: &mut Memory, depth: usize) -> (CK_ATTRIBUTE, Model) {
    let ty = input.ty();
    let mode = input.byte();
    let refuse_arrays = |model: Model| if depth > 0 { Model::Refused } else { model };
    let mut a = CK_ATTRIBUTE { type_: ty, pValue: null_mut(), ulValueLen: 0 };
    match mode % 4 {
        // A value in its own buffer (an attribute array's value of a size the shim refuses unread).
        0 if layout(ty) != Layout::Attributes
            || input.0.first().is_some_and(|&n| !(n as usize).is_multiple_of(ATTRIBUTE_SIZE)) =>
        {
            let len = input.byte() as usize;
            let mut value = input.bytes(len);
            if layout(ty) == Layout::Attributes && !value.is_empty() && value.len().is_multiple_of(ATTRIBUTE_SIZE) {
                // Cut short by the end of the input to whole attributes: keep it a length the shim refuses.
                value.push(0);
            }
            a.ulValueLen = value.len() as CK_ULONG;
            a.pValue = memory.keep(if value.is_empty() { vec![0] } else { value.clone() }) as *mut c_void;
            let model = match layout(ty) {
                Layout::Attributes if value.is_empty() => refuse_arrays(Model::Array(Vec::new())),
                Layout::Attributes => Model::Refused,
                Layout::Mechanisms if !value.len().is_multiple_of(8) => Model::Refused,
                _ => Model::Bytes(value),
            };
            (a, model)
        }
        // No value: a zero length reads as empty, any other length is refused.
        1 => {
            a.ulValueLen = (input.byte() % 3) as CK_ULONG;
            let model = match (a.ulValueLen, layout(ty)) {
                (0, Layout::Attributes) => refuse_arrays(Model::Array(Vec::new())),
                (0, _) => Model::Bytes(Vec::new()),
                _ => Model::Refused,
            };
            (a, model)
        }
        // A length no value has: refused before the value is read (the buffer behind it is one byte).
        3 => {
            a.pValue = memory.keep(vec![0]) as *mut c_void;
            a.ulValueLen = [CK_UNAVAILABLE_INFORMATION, MAX_VALUE + 1, 1 << 40][input.byte() as usize % 3];
            (a, Model::Refused)
        }
        // An array of attributes, at an unaligned address; read as bytes unless the type is a template one.
        _ => {
            let n = if depth < 2 { input.byte() as usize % 6 } else { 0 };
            let (elements, models): (Vec<CK_ATTRIBUTE>, Vec<(CK_ATTRIBUTE_TYPE, Model)>) = (0..n)
                .map(|_| {
                    let (e, m) = attribute(input, memory, depth + 1);
                    (e, (e.type_, m))
                })
                .unzip();
            let first = memory.array(&elements, (mode as usize >> 2) % 8);
            a.pValue = first as *mut c_void;
            a.ulValueLen = (n * ATTRIBUTE_SIZE) as CK_ULONG;
            let model = match layout(ty) {
                Layout::Attributes => refuse_arrays(Model::Array(models)),
                _ => {
                    // SAFETY: the array just written, n * ATTRIBUTE_SIZE bytes.
                    let bytes = unsafe { std::slice::from_raw_parts(first as *const u8, n * ATTRIBUTE_SIZE) };
                    Model::Bytes(bytes.to_vec())
                }
            };
            (a, model)
        }
    }
}

/// Answers `attr` into a query entry whose buffer the input chooses, and checks the answer.
fn answer_one(input: &mut Input, memory: &mut Memory, attr: &Attr) {
    let need = match &attr.value {
        Value::Bytes(b) => b.len(),
        Value::Array(inner) => inner.len() * ATTRIBUTE_SIZE,
    };
    let mut entry = CK_ATTRIBUTE { type_: attr.ty, pValue: null_mut(), ulValueLen: 0 };
    let mode = input.byte();
    let mut elements = Vec::new();
    match mode % 4 {
        0 => {}
        1 if need > 0 => {
            entry.pValue = memory.keep(vec![0xa5; (need - 1).max(1)]) as *mut c_void;
            entry.ulValueLen = (need - 1) as CK_ULONG;
        }
        3 => {
            entry.pValue = memory.keep(vec![0]) as *mut c_void;
            entry.ulValueLen = CK_UNAVAILABLE_INFORMATION;
        }
        _ => match &attr.value {
            Value::Bytes(_) => {
                let room = need + (mode as usize >> 2) % 4;
                entry.pValue = memory.keep(vec![0xa5; room.max(1)]) as *mut c_void;
                entry.ulValueLen = room as CK_ULONG;
            }
            Value::Array(inner) => {
                // Each element a length query, or a buffer of some size; the array itself unaligned.
                let queries = input.byte() & 1 == 0;
                for _ in inner {
                    let mut e = CK_ATTRIBUTE { type_: 0, pValue: null_mut(), ulValueLen: 0 };
                    if !queries {
                        let room = input.byte() as usize % 40;
                        e.pValue = memory.keep(vec![0xa5; room.max(1)]) as *mut c_void;
                        e.ulValueLen = room as CK_ULONG;
                    }
                    elements.push(e);
                }
                entry.pValue = memory.array(&elements, (mode as usize >> 2) % 8) as *mut c_void;
                entry.ulValueLen = need as CK_ULONG;
            }
        },
    }
    let given = entry;
    // SAFETY: every pValue is NULL or a buffer of the stated length, the elements' too.
    let rv = unsafe { answer(&mut entry, &attr.value) };
    match (&attr.value, given.pValue.is_null()) {
        (_, true) => assert!(rv == CKR_OK && entry.ulValueLen as usize == need),
        _ if given.ulValueLen == CK_UNAVAILABLE_INFORMATION => assert_eq!(rv, CKR_ARGUMENTS_BAD),
        _ if (given.ulValueLen as usize) < need => {
            assert!(rv == CKR_BUFFER_TOO_SMALL && entry.ulValueLen == CK_UNAVAILABLE_INFORMATION)
        }
        (Value::Bytes(b), false) => {
            assert!(rv == CKR_OK && entry.ulValueLen as usize == b.len());
            // SAFETY: the buffer given, at least b.len() bytes.
            let written = unsafe { std::slice::from_raw_parts(given.pValue as *const u8, b.len()) };
            assert_eq!(written, &b[..]);
        }
        (Value::Array(inner), false) => {
            assert_eq!(entry.ulValueLen as usize, need);
            let base = given.pValue as *const CK_ATTRIBUTE;
            let mut all_ok = true;
            for (i, (a, before)) in inner.iter().zip(&elements).enumerate() {
                // SAFETY: the element array given, `inner.len()` elements.
                let e = unsafe { std::ptr::read_unaligned(base.add(i)) };
                assert_eq!(e.type_, a.ty);
                let Value::Bytes(b) = &a.value else {
                    all_ok = false;
                    continue;
                };
                if before.pValue.is_null() {
                    assert_eq!(e.ulValueLen as usize, b.len());
                } else if (before.ulValueLen as usize) < b.len() {
                    assert_eq!(e.ulValueLen, CK_UNAVAILABLE_INFORMATION);
                    all_ok = false;
                } else {
                    // SAFETY: the element's buffer, at least b.len() bytes.
                    let written = unsafe { std::slice::from_raw_parts(before.pValue as *const u8, b.len()) };
                    assert!(e.ulValueLen as usize == b.len() && written == &b[..]);
                }
            }
            assert_eq!(rv == CKR_OK, all_ok);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut memory = Memory::default();
    let flags = input.byte();
    let count = input.byte() as usize % 17;
    let (attrs, models): (Vec<CK_ATTRIBUTE>, Vec<Model>) =
        (0..count).map(|_| attribute(&mut input, &mut memory, 0)).unzip();

    // The array itself: aligned, or one byte off (refused unread); NULL with a count (refused); a count past
    // the limit over the array built (refused unread).
    let mut ptr: *const CK_ATTRIBUTE = memory.array(&attrs, if flags & 1 == 1 { 1 } else { 0 });
    let mut stated = count as CK_ULONG;
    let bad_array = match (flags >> 1) % 8 {
        0 if count > 0 => {
            ptr = std::ptr::null();
            true
        }
        1 => {
            stated = (MAX_ATTRIBUTES + 1 + input.byte() as usize) as CK_ULONG;
            true
        }
        _ => count > 0 && flags & 1 == 1,
    };
    let attributes = count + models.iter().map(Model::attributes).sum::<usize>();
    let refused = bad_array || attributes > MAX_ATTRIBUTES || models.iter().any(Model::refused);

    // SAFETY: `ptr` is NULL, misaligned or valid for `count` attributes (and `stated` is `count` unless the
    // shim must refuse it before reading); every value is valid for its length unless its length is one the
    // shim must refuse before reading.
    let (read, checked, queried) = unsafe {
        (
            template(ptr, stated),
            check_template(ptr, stated, TemplateKind::Input),
            check_template(ptr, stated, TemplateKind::Query),
        )
    };
    assert_eq!(read.as_ref().err().copied(), checked.err(), "reading and checking agree");
    assert_eq!(read.is_err(), refused, "refused exactly when malformed: {models:?}");
    if bad_array {
        assert_eq!(queried, Err(CKR_ARGUMENTS_BAD));
    }
    for ty in TYPES {
        // SAFETY: as above.
        let named = unsafe { names(ptr, stated, *ty) };
        assert_eq!(named, !bad_array && attrs.iter().any(|a| a.type_ == *ty));
    }
    let Ok(read) = read else { return };

    let expected = Template(attrs.iter().zip(&models).map(|(a, m)| m.attr(a.type_)).collect());
    assert!(read == expected, "the template read is the one built");
    assert!(Template::decode(&read.encode()).is_some());
    for attr in &read.0 {
        answer_one(&mut input, &mut memory, attr);
    }
});
