//! Safe adapters for the pointers the shim itself reads or writes. Every function checks for NULL and
//! answers CKR_ARGUMENTS_BAD, as the spec asks for pointers it forbids to be NULL.

use crate::attrs::{layout, Attr, Layout, Template, Value, MECHANISM_SIZE};
use cryptoki_sys::*;

/// Writes `value` through an out pointer.
///
/// # Safety
/// `ptr` is NULL or valid for writing a `T`.
pub unsafe fn write_out<T>(ptr: *mut T, value: T) -> Result<(), CK_RV> {
    if ptr.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-NULL, and the caller promises it is valid for writes.
    unsafe { ptr.write(value) };
    Ok(())
}

/// The application's C_Initialize arguments, if any.
///
/// # Safety
/// `ptr` is NULL or points to a CK_C_INITIALIZE_ARGS.
pub unsafe fn init_args(ptr: *const std::ffi::c_void) -> Option<CK_C_INITIALIZE_ARGS> {
    // SAFETY: the caller promises NULL or a valid CK_C_INITIALIZE_ARGS.
    unsafe { (ptr as *const CK_C_INITIALIZE_ARGS).as_ref().copied() }
}

/// A mutable view of an array the application passed, if it is not NULL.
///
/// # Safety
/// `ptr` is NULL or valid for `len` elements.
pub unsafe fn slice_mut<'a, T>(ptr: *mut T, len: CK_ULONG) -> Option<&'a mut [T]> {
    // A misaligned array, or one longer than any address space, cannot be what the application has.
    if ptr.is_null()
        || !ptr.is_aligned()
        || (len as usize).checked_mul(std::mem::size_of::<T>()).is_none_or(|n| n > isize::MAX as usize)
    {
        return None;
    }
    // SAFETY: non-NULL, and the caller promises `len` valid elements.
    Some(unsafe { std::slice::from_raw_parts_mut(ptr, len as usize) })
}

/// Values longer than this in a template are refused (no real attribute comes near it).
const MAX_VALUE: CK_ULONG = 1 << 24;
/// Attributes in one template, those inside attribute arrays included: real templates hold a few dozen.
const MAX_ATTRIBUTES: usize = 4096;
/// Bytes of values in one template: four values of the largest size.
const MAX_TEMPLATE_BYTES: usize = 4 * MAX_VALUE as usize;

const ATTRIBUTE_SIZE: usize = std::mem::size_of::<CK_ATTRIBUTE>();

/// What a template is for: it decides what is well formed and which CK_RV a malformed one gets (only
/// values PKCS#11 lists for the function).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateKind {
    /// Values the function reads: C_CreateObject, C_CopyObject, C_GenerateKey, C_GenerateKeyPair,
    /// C_UnwrapKey, C_DeriveKey, C_FindObjectsInit, C_SetAttributeValue. A malformed value is
    /// CKR_ATTRIBUTE_VALUE_INVALID, which all of them list (C_FindObjectsInit lists no
    /// CKR_TEMPLATE_INCONSISTENT); a NULL template with a count, or more than [`MAX_ATTRIBUTES`], is
    /// CKR_ARGUMENTS_BAD.
    Input,
    /// C_GetAttributeValue's query: buffers the function writes, where a NULL pValue asks for a length. A
    /// malformed one is CKR_ARGUMENTS_BAD: the function lists neither CKR_ATTRIBUTE_VALUE_INVALID nor
    /// CKR_TEMPLATE_INCONSISTENT.
    Query,
}

/// What a template may still hold.
struct Budget {
    attributes: usize,
    bytes: usize,
}

impl Budget {
    fn new() -> Budget {
        Budget { attributes: MAX_ATTRIBUTES, bytes: MAX_TEMPLATE_BYTES }
    }
    fn take_attributes(&mut self, n: usize) -> bool {
        self.attributes.checked_sub(n).map(|left| self.attributes = left).is_some()
    }
    fn take_bytes(&mut self, n: usize) -> bool {
        self.bytes.checked_sub(n).map(|left| self.bytes = left).is_some()
    }
}

/// The number of entries of an application's template, when it can be a template at all.
fn entries(ptr: *const CK_ATTRIBUTE, count: CK_ULONG, budget: &mut Budget) -> Result<usize, CK_RV> {
    if count == 0 {
        return Ok(0);
    }
    let count = usize::try_from(count).map_err(|_| CKR_ARGUMENTS_BAD)?;
    // A CK_ATTRIBUTE_PTR is aligned in any real application; the shim's own views of it need that.
    if ptr.is_null() || !ptr.is_aligned() || !budget.take_attributes(count) {
        return Err(CKR_ARGUMENTS_BAD);
    }
    Ok(count)
}

/// Entry `i` of an array of CK_ATTRIBUTE the application passed, read as it lies: an attribute array's
/// value is a void pointer, which promises no alignment.
///
/// # Safety
/// `base` is valid for at least `i + 1` CK_ATTRIBUTEs.
unsafe fn entry(base: *const CK_ATTRIBUTE, i: usize) -> CK_ATTRIBUTE {
    // SAFETY: the caller's promise; read_unaligned needs no alignment.
    unsafe { std::ptr::read_unaligned(base.add(i)) }
}

/// The length of a value the function reads, if it can be read at all.
fn input_len(a: &CK_ATTRIBUTE) -> Result<usize, CK_RV> {
    if a.ulValueLen == CK_UNAVAILABLE_INFORMATION
        || a.ulValueLen > MAX_VALUE
        || (a.pValue.is_null() && a.ulValueLen > 0)
    {
        return Err(CKR_ATTRIBUTE_VALUE_INVALID);
    }
    Ok(a.ulValueLen as usize)
}

/// Reads `count` attributes at `base` by the layout of each type into `out`, or with `out` None only checks
/// them (nothing is copied). Attribute arrays nest one level: "any attribute with a CKF_ARRAY_ATTRIBUTE
/// value is limited to one level of recursion" (PKCS#11 3.0 §4.1.2).
///
/// # Safety
/// `base` is valid for `count` attributes, each value valid for its length.
unsafe fn read_attributes(
    base: *const CK_ATTRIBUTE,
    count: usize,
    nested: bool,
    budget: &mut Budget,
    mut out: Option<&mut Vec<Attr>>,
) -> Result<(), CK_RV> {
    for i in 0..count {
        // SAFETY: i < count (the caller's promise).
        let a = unsafe { entry(base, i) };
        let len = input_len(&a)?;
        match layout(a.type_) {
            Layout::Attributes => {
                if nested || len % ATTRIBUTE_SIZE != 0 || !budget.take_attributes(len / ATTRIBUTE_SIZE) {
                    return Err(CKR_ATTRIBUTE_VALUE_INVALID);
                }
                let n = len / ATTRIBUTE_SIZE;
                let mut inner = out.as_ref().map(|_| Vec::with_capacity(n));
                // SAFETY: an attribute array's value is `n` CK_ATTRIBUTEs (non-NULL when n > 0, checked).
                unsafe { read_attributes(a.pValue as *const CK_ATTRIBUTE, n, true, budget, inner.as_mut()) }?;
                if let (Some(out), Some(inner)) = (out.as_deref_mut(), inner) {
                    out.push(Attr::array(a.type_, inner));
                }
            }
            kind => {
                if (kind == Layout::Mechanisms && len % MECHANISM_SIZE != 0) || !budget.take_bytes(len) {
                    return Err(CKR_ATTRIBUTE_VALUE_INVALID);
                }
                if let Some(out) = out.as_deref_mut() {
                    let value = if len == 0 {
                        &[][..]
                    } else {
                        // SAFETY: non-NULL (checked) and valid for its length (the caller's promise).
                        unsafe { std::slice::from_raw_parts(a.pValue as *const u8, len) }
                    };
                    out.push(Attr::bytes(a.type_, value));
                }
            }
        }
    }
    Ok(())
}

/// The length of a buffer the function writes.
fn query_len(a: &CK_ATTRIBUTE) -> Result<usize, CK_RV> {
    if a.ulValueLen == CK_UNAVAILABLE_INFORMATION || a.ulValueLen > MAX_VALUE {
        return Err(CKR_ARGUMENTS_BAD);
    }
    Ok(a.ulValueLen as usize)
}

/// Checks a C_GetAttributeValue query: each buffer's stated length can be a buffer, arrays are whole
/// elements, and an attribute array's elements are buffers or length queries.
///
/// # Safety
/// `base` is valid for `count` attributes, each non-NULL pValue valid for its length.
unsafe fn check_query(base: *const CK_ATTRIBUTE, count: usize, budget: &mut Budget) -> Result<(), CK_RV> {
    for i in 0..count {
        // SAFETY: i < count (the caller's promise).
        let a = unsafe { entry(base, i) };
        if a.pValue.is_null() {
            // A length query: ulValueLen is only written.
            continue;
        }
        let len = query_len(&a)?;
        match layout(a.type_) {
            Layout::Bytes => {}
            Layout::Mechanisms if len % MECHANISM_SIZE == 0 => {}
            Layout::Mechanisms => return Err(CKR_ARGUMENTS_BAD),
            Layout::Attributes => {
                if len % ATTRIBUTE_SIZE != 0 || !budget.take_attributes(len / ATTRIBUTE_SIZE) {
                    return Err(CKR_ARGUMENTS_BAD);
                }
                let elements = base_elements(&a, len / ATTRIBUTE_SIZE);
                // An element without a buffer asks for its length, and says so with ulValueLen 0 when others
                // have buffers: SoftHSM2 2.6.1 then fills in values and writes through a NULL pValue whose
                // stated length is large enough.
                let with_buffers = elements.iter().any(|e| !e.pValue.is_null());
                for e in &elements {
                    if e.pValue.is_null() {
                        if with_buffers && e.ulValueLen != 0 {
                            return Err(CKR_ARGUMENTS_BAD);
                        }
                    } else {
                        query_len(e)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// The elements of an attribute array buffer the application passed (copies of the CK_ATTRIBUTEs).
fn base_elements(a: &CK_ATTRIBUTE, n: usize) -> Vec<CK_ATTRIBUTE> {
    let base = a.pValue as *const CK_ATTRIBUTE;
    // SAFETY: the buffer holds `n` CK_ATTRIBUTEs: its stated length, checked a whole number of them, is the
    // application's promise.
    (0..n).map(|j| unsafe { entry(base, j) }).collect()
}

/// Checks an application's template without copying anything: for the calls that forward it to the backend
/// unchanged, so that a malformed one gets the same answer as in a database slot (where [`template`]
/// reads it) and never reaches a backend that would read past its buffers.
///
/// # Safety
/// `ptr` is NULL or valid for `count` attributes, each value (for a query: each non-NULL buffer) valid for
/// its length.
pub unsafe fn check_template(ptr: *const CK_ATTRIBUTE, count: CK_ULONG, kind: TemplateKind) -> Result<(), CK_RV> {
    let mut budget = Budget::new();
    let n = entries(ptr, count, &mut budget)?;
    match kind {
        // SAFETY: the caller's promise.
        TemplateKind::Input => unsafe { read_attributes(ptr, n, false, &mut budget, None) },
        // SAFETY: the caller's promise.
        TemplateKind::Query => unsafe { check_query(ptr, n, &mut budget) },
    }
}

/// An application's template as a safe value, each attribute read by its layout (see [`layout`]):
/// attribute arrays as [`Value::Array`], mechanism arrays and everything else as bytes. A malformed template
/// is refused as [`TemplateKind::Input`] says, before anything is copied.
///
/// # Safety
/// `ptr` is NULL or valid for `count` attributes, each value valid for its length.
pub unsafe fn template(ptr: *const CK_ATTRIBUTE, count: CK_ULONG) -> Result<Template, CK_RV> {
    // SAFETY: the caller's promise.
    unsafe { check_template(ptr, count, TemplateKind::Input) }?;
    // The reading checks again as it goes: the application's memory may have changed since.
    let mut budget = Budget::new();
    let n = entries(ptr, count, &mut budget)?;
    let mut attrs = Vec::with_capacity(n);
    // SAFETY: the caller's promise.
    unsafe { read_attributes(ptr, n, false, &mut budget, Some(&mut attrs)) }?;
    Ok(Template(attrs))
}

/// Answers one entry of an application's C_GetAttributeValue template with `value`, by the spec's protocol
/// (PKCS#11 3.0 §5.7.5): a NULL pValue asks for the length; a buffer too small gets CK_UNAVAILABLE_INFORMATION
/// and CKR_BUFFER_TOO_SMALL. An attribute array is answered into the application's array of CK_ATTRIBUTEs,
/// element by element in the same way (each element's type is set; its pValue NULL asks for its length).
///
/// # Safety
/// `entry.pValue` is NULL or valid for `entry.ulValueLen` bytes; for an attribute array, each element's
/// pValue is NULL or valid for its ulValueLen bytes.
pub unsafe fn answer(entry: &mut CK_ATTRIBUTE, value: &Value) -> CK_RV {
    match value {
        // SAFETY: the caller's promise, passed on.
        Value::Bytes(bytes) => unsafe { answer_bytes(entry, bytes) },
        Value::Array(inner) => {
            let need = inner.len() * ATTRIBUTE_SIZE;
            if entry.pValue.is_null() {
                entry.ulValueLen = need as CK_ULONG;
                return CKR_OK;
            }
            if entry.ulValueLen == CK_UNAVAILABLE_INFORMATION {
                return CKR_ARGUMENTS_BAD;
            }
            if (entry.ulValueLen as usize) < need {
                entry.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                return CKR_BUFFER_TOO_SMALL;
            }
            let base = entry.pValue as *mut CK_ATTRIBUTE;
            let mut rv = CKR_OK;
            for (i, attr) in inner.iter().enumerate() {
                // SAFETY: room for `inner.len()` CK_ATTRIBUTEs (checked above), the application's array,
                // read and written as it lies (a void pointer promises no alignment).
                let mut element = unsafe { std::ptr::read_unaligned(base.add(i)) };
                element.type_ = attr.ty;
                // One level of recursion only (the spec's limit): a nested array is not answered.
                let this = match &attr.value {
                    // SAFETY: each element's buffer is the application's, valid for its stated length.
                    Value::Bytes(bytes) => unsafe { answer_bytes(&mut element, bytes) },
                    Value::Array(_) => {
                        element.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                        CKR_ATTRIBUTE_TYPE_INVALID
                    }
                };
                // SAFETY: as the read above.
                unsafe { std::ptr::write_unaligned(base.add(i), element) };
                if this != CKR_OK {
                    rv = this;
                }
            }
            entry.ulValueLen = need as CK_ULONG;
            rv
        }
    }
}

/// [`answer`] for a plain value.
///
/// # Safety
/// `entry.pValue` is NULL or valid for `entry.ulValueLen` bytes.
unsafe fn answer_bytes(entry: &mut CK_ATTRIBUTE, value: &[u8]) -> CK_RV {
    if entry.pValue.is_null() {
        entry.ulValueLen = value.len() as CK_ULONG;
        return CKR_OK;
    }
    // Not the length of any buffer: the application did not say how much room it has.
    if entry.ulValueLen == CK_UNAVAILABLE_INFORMATION {
        return CKR_ARGUMENTS_BAD;
    }
    if (entry.ulValueLen as usize) < value.len() {
        entry.ulValueLen = CK_UNAVAILABLE_INFORMATION;
        return CKR_BUFFER_TOO_SMALL;
    }
    // SAFETY: the buffer holds at least value.len() bytes (checked above).
    unsafe { std::ptr::copy_nonoverlapping(value.as_ptr(), entry.pValue as *mut u8, value.len()) };
    entry.ulValueLen = value.len() as CK_ULONG;
    CKR_OK
}

/// Whether an application's template names an attribute type (no copy made). A template that cannot be one
/// (NULL with a count, too many entries) names nothing: the call's check of the template refuses it.
///
/// # Safety
/// As for [`template`].
pub unsafe fn names(ptr: *const CK_ATTRIBUTE, count: CK_ULONG, ty: CK_ATTRIBUTE_TYPE) -> bool {
    let Ok(n) = entries(ptr, count, &mut Budget::new()) else {
        return false;
    };
    // SAFETY: `n` attributes (the caller's promise).
    (0..n).any(|i| unsafe { entry(ptr, i) }.type_ == ty)
}

/// The bytes an application passed, if the pointer is not NULL (an empty slice for a zero length).
///
/// # Safety
/// `ptr` is NULL or valid for `len` bytes.
pub unsafe fn bytes<'a>(ptr: *const u8, len: CK_ULONG) -> Result<&'a [u8], CK_RV> {
    match (ptr.is_null(), len) {
        (_, 0) => Ok(&[]),
        (true, _) => Err(CKR_ARGUMENTS_BAD),
        // SAFETY: non-NULL, `len` bytes (the caller's promise).
        (false, _) => Ok(unsafe { std::slice::from_raw_parts(ptr, len as usize) }),
    }
}

/// Copies `text` into a blank-padded, not NUL-terminated PKCS#11 string field.
pub fn pad_into(field: &mut [CK_UTF8CHAR], text: &str) {
    field.fill(b' ');
    let mut end = text.len().min(field.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    field[..end].copy_from_slice(&text.as_bytes()[..end]);
}

/// A blank-padded PKCS#11 string field as text, without its padding.
pub fn unpad(field: &[CK_UTF8CHAR]) -> String {
    String::from_utf8_lossy(field).trim_end_matches([' ', '\0']).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_round_trips_and_truncates_on_char_boundaries() {
        let mut field = [0u8; 8];
        pad_into(&mut field, "p11");
        assert_eq!(&field, b"p11     ");
        assert_eq!(unpad(&field), "p11");
        pad_into(&mut field, "abcdefgé");
        assert_eq!(&field, b"abcdefg ");
    }

    #[test]
    fn answers_follow_the_length_query_protocol() {
        let value = Value::Bytes(b"abc".to_vec().into());
        let mut entry = CK_ATTRIBUTE { type_: CKA_LABEL, pValue: std::ptr::null_mut(), ulValueLen: 0 };
        // SAFETY: NULL asks for the length.
        assert_eq!(unsafe { answer(&mut entry, &value) }, CKR_OK);
        assert_eq!(entry.ulValueLen, 3);
        let mut small = [0u8; 2];
        entry.pValue = small.as_mut_ptr() as *mut _;
        entry.ulValueLen = 2;
        // SAFETY: two bytes of room, as stated.
        assert_eq!(unsafe { answer(&mut entry, &value) }, CKR_BUFFER_TOO_SMALL);
        assert_eq!(entry.ulValueLen, CK_UNAVAILABLE_INFORMATION);
    }

    #[test]
    fn attribute_arrays_are_answered_element_by_element() {
        let value = Value::Array(vec![Attr::bool(CKA_SENSITIVE, true), Attr::bytes(CKA_LABEL, b"xyz")]);
        let mut entry = CK_ATTRIBUTE { type_: CKA_UNWRAP_TEMPLATE, pValue: std::ptr::null_mut(), ulValueLen: 0 };
        // SAFETY: NULL asks for the length.
        assert_eq!(unsafe { answer(&mut entry, &value) }, CKR_OK);
        assert_eq!(entry.ulValueLen as usize, 2 * std::mem::size_of::<CK_ATTRIBUTE>());
        let mut elements = [CK_ATTRIBUTE { type_: 0, pValue: std::ptr::null_mut(), ulValueLen: 0 }; 2];
        entry.pValue = elements.as_mut_ptr() as *mut _;
        // SAFETY: room for two elements whose pValues are NULL (length queries).
        assert_eq!(unsafe { answer(&mut entry, &value) }, CKR_OK);
        assert_eq!((elements[0].type_, elements[0].ulValueLen), (CKA_SENSITIVE, 1));
        assert_eq!((elements[1].type_, elements[1].ulValueLen), (CKA_LABEL, 3));
        let (mut flag, mut label) = ([0u8; 1], [0u8; 3]);
        elements[0].pValue = flag.as_mut_ptr() as *mut _;
        elements[1].pValue = label.as_mut_ptr() as *mut _;
        // SAFETY: each element's buffer is as long as stated.
        assert_eq!(unsafe { answer(&mut entry, &value) }, CKR_OK);
        assert_eq!((flag, &label), ([1], b"xyz"));
        elements[1].ulValueLen = 1;
        // SAFETY: as above, the second buffer now stated as one byte.
        assert_eq!(unsafe { answer(&mut entry, &value) }, CKR_BUFFER_TOO_SMALL);
        assert_eq!(elements[1].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    }

    /// Raw templates for the tests: the attributes and the memory they point into.
    fn raw(ty: CK_ATTRIBUTE_TYPE, value: &[u8]) -> CK_ATTRIBUTE {
        CK_ATTRIBUTE { type_: ty, pValue: value.as_ptr() as *mut _, ulValueLen: value.len() as CK_ULONG }
    }

    fn raw_array(ty: CK_ATTRIBUTE_TYPE, elements: &[CK_ATTRIBUTE]) -> CK_ATTRIBUTE {
        CK_ATTRIBUTE {
            type_: ty,
            pValue: elements.as_ptr() as *mut _,
            ulValueLen: (elements.len() * ATTRIBUTE_SIZE) as CK_ULONG,
        }
    }

    fn read(list: &[CK_ATTRIBUTE]) -> Result<Template, CK_RV> {
        // SAFETY: every test attribute points into memory alive for the call, as long as stated, or is one
        // of the malformed values the reader must refuse without reading.
        unsafe { template(list.as_ptr(), list.len() as CK_ULONG) }
    }

    fn check(list: &[CK_ATTRIBUTE], kind: TemplateKind) -> Result<(), CK_RV> {
        // SAFETY: as in `read`.
        unsafe { check_template(list.as_ptr(), list.len() as CK_ULONG, kind) }
    }

    fn with_len(mut a: CK_ATTRIBUTE, len: CK_ULONG) -> CK_ATTRIBUTE {
        a.ulValueLen = len;
        a
    }

    const TRUE: [u8; 1] = [1];

    #[test]
    fn each_attribute_is_read_by_its_layout() {
        let mechanisms = crate::attrs::mechanisms_to_bytes(&[CKM_RSA_PKCS_PSS, CKM_SHA256_RSA_PKCS_PSS, CKM_RSA_PKCS]);
        let inner = [raw(CKA_SENSITIVE, &TRUE), raw(CKA_ALLOWED_MECHANISMS, &mechanisms)];
        let vendor_array = CKA_VENDOR_DEFINED | CKF_ARRAY_ATTRIBUTE | 7;
        let list = [
            raw(CKA_LABEL, b"k"),
            raw(CKA_ALLOWED_MECHANISMS, &mechanisms),
            raw_array(CKA_UNWRAP_TEMPLATE, &inner),
            raw(vendor_array, b"vendor bytes"),
            raw_array(CKA_DERIVE_TEMPLATE, &[]),
        ];
        let t = read(&list).expect("a well-formed template");
        assert_eq!(t.bytes(CKA_LABEL), Some(&b"k"[..]));
        // Three mechanism numbers: a CK_ATTRIBUTE's size, which the old reader took for one attribute.
        assert_eq!(
            t.mechanisms(CKA_ALLOWED_MECHANISMS),
            Some(vec![CKM_RSA_PKCS_PSS, CKM_SHA256_RSA_PKCS_PSS, CKM_RSA_PKCS])
        );
        let Some(Value::Array(unwrap)) = t.get(CKA_UNWRAP_TEMPLATE).map(|a| &a.value) else {
            panic!("CKA_UNWRAP_TEMPLATE is an attribute array");
        };
        let unwrap = Template(unwrap.clone());
        assert_eq!(unwrap.bool(CKA_SENSITIVE), Some(true));
        assert_eq!(unwrap.mechanisms(CKA_ALLOWED_MECHANISMS).map(|m| m.len()), Some(3));
        assert_eq!(t.bytes(vendor_array), Some(&b"vendor bytes"[..]));
        assert!(matches!(t.get(CKA_DERIVE_TEMPLATE).map(|a| &a.value), Some(Value::Array(v)) if v.is_empty()));
        assert_eq!(check(&list, TemplateKind::Input), Ok(()));
    }

    #[test]
    fn malformed_values_are_attribute_value_invalid() {
        let one = [raw(CKA_ENCRYPT, &TRUE)];
        let mechanisms = crate::attrs::mechanisms_to_bytes(&[CKM_AES_CBC, CKM_AES_ECB, CKM_AES_GCM]);
        let null = std::ptr::null_mut();
        let label = raw(CKA_LABEL, b"12345678");
        let mut itself = [CK_ATTRIBUTE { type_: CKA_WRAP_TEMPLATE, pValue: null, ulValueLen: ATTRIBUTE_SIZE as _ }];
        itself[0].pValue = itself.as_mut_ptr() as *mut _;
        let nested_inner = [raw_array(CKA_WRAP_TEMPLATE, &one)];
        let cases: Vec<(&str, CK_ATTRIBUTE)> = vec![
            ("NULL value with a length", CK_ATTRIBUTE { type_: CKA_LABEL, pValue: null, ulValueLen: 8 }),
            ("CK_UNAVAILABLE_INFORMATION", with_len(label, CK_UNAVAILABLE_INFORMATION)),
            ("past the per-value bound", with_len(label, MAX_VALUE + 1)),
            ("4 GiB", with_len(label, 1 << 32)),
            (
                "NULL attribute array with a length",
                CK_ATTRIBUTE { type_: CKA_WRAP_TEMPLATE, pValue: null, ulValueLen: 24 },
            ),
            ("ragged attribute array", with_len(raw_array(CKA_WRAP_TEMPLATE, &one), ATTRIBUTE_SIZE as CK_ULONG + 1)),
            (
                "attribute array of 2^30 entries",
                with_len(raw_array(CKA_WRAP_TEMPLATE, &one), (ATTRIBUTE_SIZE as CK_ULONG) << 30),
            ),
            ("ragged mechanism array", with_len(raw(CKA_ALLOWED_MECHANISMS, &mechanisms), 20)),
            ("mechanism array of 8 GiB", with_len(raw(CKA_ALLOWED_MECHANISMS, &mechanisms), 8 << 30)),
            (
                "inner NULL value with a length",
                raw_array(CKA_WRAP_TEMPLATE, &[CK_ATTRIBUTE { type_: CKA_ENCRYPT, pValue: null, ulValueLen: 1 }]),
            ),
            ("inner 4 GiB", raw_array(CKA_WRAP_TEMPLATE, &[with_len(label, 1 << 32)])),
            ("an attribute array in an attribute array", raw_array(CKA_UNWRAP_TEMPLATE, &nested_inner)),
            ("an attribute array holding itself", itself[0]),
        ];
        for (what, hostile) in cases {
            let list = [raw(CKA_TOKEN, &TRUE), hostile];
            assert_eq!(read(&list).err(), Some(CKR_ATTRIBUTE_VALUE_INVALID), "{what}");
            assert_eq!(check(&list, TemplateKind::Input), Err(CKR_ATTRIBUTE_VALUE_INVALID), "{what}");
        }
    }

    #[test]
    fn templates_are_bounded() {
        // SAFETY: NULL with a count is refused before anything is read.
        assert_eq!(unsafe { template(std::ptr::null(), 2) }.err(), Some(CKR_ARGUMENTS_BAD));
        // SAFETY: as above.
        assert_eq!(unsafe { check_template(std::ptr::null(), 2, TemplateKind::Query) }, Err(CKR_ARGUMENTS_BAD));
        // SAFETY: NULL with no count is an empty template.
        assert_eq!(unsafe { template(std::ptr::null(), 0) }.map(|t| t.0.len()), Ok(0));

        let many = vec![raw(CKA_LABEL, b"x"); MAX_ATTRIBUTES + 1];
        assert_eq!(read(&many).err(), Some(CKR_ARGUMENTS_BAD), "more attributes than any template holds");
        assert_eq!(check(&many, TemplateKind::Query), Err(CKR_ARGUMENTS_BAD));
        assert_eq!(read(&many[..MAX_ATTRIBUTES]).map(|t| t.0.len()), Ok(MAX_ATTRIBUTES));
        // Attributes inside attribute arrays count too.
        let inner = vec![raw(CKA_ENCRYPT, &TRUE); MAX_ATTRIBUTES];
        assert_eq!(read(&[raw_array(CKA_WRAP_TEMPLATE, &inner)]).err(), Some(CKR_ATTRIBUTE_VALUE_INVALID));
        assert!(read(&[raw_array(CKA_WRAP_TEMPLATE, &inner[1..])]).is_ok());

        // The largest value is fine, and four of them; a fifth is past the template's bound (refused
        // before anything is copied).
        let big = vec![b'x'; MAX_VALUE as usize];
        assert_eq!(read(&[raw(CKA_LABEL, &big)]).map(|t| t.bytes(CKA_LABEL).map(<[u8]>::len)), Ok(Some(big.len())));
        let bytes = vec![raw(CKA_LABEL, &big); 5];
        assert_eq!(check(&bytes[..4], TemplateKind::Input), Ok(()));
        assert_eq!(check(&bytes, TemplateKind::Input), Err(CKR_ATTRIBUTE_VALUE_INVALID));
        assert_eq!(read(&bytes).err(), Some(CKR_ATTRIBUTE_VALUE_INVALID));
    }

    #[test]
    fn a_misaligned_template_is_refused_and_names_nothing() {
        let list = [raw(CKA_LABEL, b"x"), raw(CKA_LABEL, b"y")];
        let misaligned = (list.as_ptr() as *const u8).wrapping_add(1) as *const CK_ATTRIBUTE;
        // SAFETY: refused before anything is read.
        assert_eq!(unsafe { check_template(misaligned, 1, TemplateKind::Input) }, Err(CKR_ARGUMENTS_BAD));
        // SAFETY: as above.
        assert!(!unsafe { names(misaligned, 1, CKA_LABEL) });
        // SAFETY: NULL and a count past any template: nothing is read.
        assert!(!unsafe { names(std::ptr::null(), 3, CKA_LABEL) });
        // SAFETY: as above.
        assert!(!unsafe { names(list.as_ptr(), CK_ULONG::MAX, CKA_LABEL) });
        // SAFETY: two valid attributes.
        assert!(unsafe { names(list.as_ptr(), 2, CKA_LABEL) });
    }

    #[test]
    fn queries_are_checked_as_buffers() {
        let null = std::ptr::null_mut();
        let mut buf = [0u8; 64];
        let b = buf.as_mut_ptr() as *mut std::ffi::c_void;
        let mut e1 = [0u8; 8];
        let elements_with_buffers = [
            CK_ATTRIBUTE { type_: 0, pValue: e1.as_mut_ptr() as *mut _, ulValueLen: 8 },
            CK_ATTRIBUTE { type_: 0, pValue: null, ulValueLen: 0 },
        ];
        let length_queries = [
            CK_ATTRIBUTE { type_: 0, pValue: null, ulValueLen: 12345 },
            CK_ATTRIBUTE { type_: 0, pValue: null, ulValueLen: CK_UNAVAILABLE_INFORMATION },
        ];
        let fine = [
            CK_ATTRIBUTE { type_: CKA_LABEL, pValue: null, ulValueLen: 8 },
            CK_ATTRIBUTE { type_: CKA_LABEL, pValue: null, ulValueLen: CK_UNAVAILABLE_INFORMATION },
            CK_ATTRIBUTE { type_: CKA_LABEL, pValue: b, ulValueLen: 64 },
            CK_ATTRIBUTE { type_: CKA_ALLOWED_MECHANISMS, pValue: b, ulValueLen: 64 },
            raw_array(CKA_WRAP_TEMPLATE, &elements_with_buffers),
            raw_array(CKA_WRAP_TEMPLATE, &length_queries),
        ];
        assert_eq!(check(&fine, TemplateKind::Query), Ok(()));
        // A NULL pValue is a length query, not a malformed value, in a query only.
        assert_eq!(check(&fine[..1], TemplateKind::Input), Err(CKR_ATTRIBUTE_VALUE_INVALID));

        let mut e2 = [0u8; 8];
        let mixed = [
            CK_ATTRIBUTE { type_: 0, pValue: e2.as_mut_ptr() as *mut _, ulValueLen: 8 },
            CK_ATTRIBUTE { type_: 0, pValue: null, ulValueLen: 64 },
        ];
        let huge_element = [CK_ATTRIBUTE { type_: 0, pValue: e2.as_mut_ptr() as *mut _, ulValueLen: 1 << 32 }];
        let cases = [
            (
                "CK_UNAVAILABLE_INFORMATION",
                CK_ATTRIBUTE { type_: CKA_LABEL, pValue: b, ulValueLen: CK_UNAVAILABLE_INFORMATION },
            ),
            ("4 GiB", CK_ATTRIBUTE { type_: CKA_LABEL, pValue: b, ulValueLen: 1 << 32 }),
            ("ragged attribute array", with_len(raw_array(CKA_WRAP_TEMPLATE, &elements_with_buffers), 49)),
            (
                "attribute array of 2^30 entries",
                with_len(raw_array(CKA_WRAP_TEMPLATE, &elements_with_buffers), 24 << 30),
            ),
            ("ragged mechanism array", CK_ATTRIBUTE { type_: CKA_ALLOWED_MECHANISMS, pValue: b, ulValueLen: 35 }),
            ("an element of 4 GiB", raw_array(CKA_WRAP_TEMPLATE, &huge_element)),
            ("a length query with a length beside buffers", raw_array(CKA_WRAP_TEMPLATE, &mixed)),
        ];
        for (what, hostile) in cases {
            assert_eq!(check(&[fine[0], hostile], TemplateKind::Query), Err(CKR_ARGUMENTS_BAD), "{what}");
        }
    }

    #[test]
    fn answers_take_no_unstated_room_and_write_misaligned_arrays() {
        let value = Value::Bytes(b"abc".to_vec().into());
        let mut buf = [0u8; 8];
        let mut entry = CK_ATTRIBUTE {
            type_: CKA_LABEL,
            pValue: buf.as_mut_ptr() as *mut _,
            ulValueLen: CK_UNAVAILABLE_INFORMATION,
        };
        // SAFETY: a buffer whose length is not stated: nothing is written.
        assert_eq!(unsafe { answer(&mut entry, &value) }, CKR_ARGUMENTS_BAD);
        assert_eq!(buf, [0; 8]);

        let array = Value::Array(vec![Attr::bytes(CKA_LABEL, b"xyz")]);
        let mut room = [0u8; ATTRIBUTE_SIZE + 1];
        let element = CK_ATTRIBUTE { type_: 0, pValue: buf.as_mut_ptr() as *mut _, ulValueLen: 8 };
        // SAFETY: `room` holds one CK_ATTRIBUTE at offset 1.
        unsafe { std::ptr::write_unaligned(room.as_mut_ptr().add(1) as *mut CK_ATTRIBUTE, element) };
        let mut entry = CK_ATTRIBUTE {
            type_: CKA_WRAP_TEMPLATE,
            // SAFETY: within `room`.
            pValue: unsafe { room.as_mut_ptr().add(1) } as *mut _,
            ulValueLen: ATTRIBUTE_SIZE as CK_ULONG,
        };
        // SAFETY: one element at a void pointer with no alignment, its buffer of 8 bytes.
        assert_eq!(unsafe { answer(&mut entry, &array) }, CKR_OK);
        // SAFETY: as written above.
        let back = unsafe { std::ptr::read_unaligned(room.as_ptr().add(1) as *const CK_ATTRIBUTE) };
        assert_eq!((back.type_, back.ulValueLen), (CKA_LABEL, 3));
        assert_eq!(&buf[..3], b"xyz");
        entry.ulValueLen = ATTRIBUTE_SIZE as CK_ULONG - 1;
        // SAFETY: as above, with less room stated than one element.
        assert_eq!(unsafe { answer(&mut entry, &array) }, CKR_BUFFER_TOO_SMALL);
        assert_eq!(entry.ulValueLen, CK_UNAVAILABLE_INFORMATION);
    }

    #[test]
    fn null_out_pointer_is_arguments_bad() {
        // SAFETY: NULL is allowed and checked.
        assert_eq!(unsafe { write_out::<u64>(std::ptr::null_mut(), 1) }, Err(CKR_ARGUMENTS_BAD));
    }
}
