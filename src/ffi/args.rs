//! Safe adapters for the pointers the shim itself reads or writes. Every function checks for NULL and
//! answers CKR_ARGUMENTS_BAD, as the spec asks for pointers it forbids to be NULL.

use crate::attrs::{is_array_type, Attr, Template};
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
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-NULL, and the caller promises `len` valid elements.
    Some(unsafe { std::slice::from_raw_parts_mut(ptr, len as usize) })
}

/// Values longer than this in a template are refused (no real attribute comes near it).
const MAX_VALUE: CK_ULONG = 1 << 24;

/// An application's template as a safe value (nested templates included).
///
/// # Safety
/// `ptr` is NULL or valid for `count` attributes, each value valid for its length.
pub unsafe fn template(ptr: *const CK_ATTRIBUTE, count: CK_ULONG) -> Result<Template, CK_RV> {
    if count == 0 {
        return Ok(Template::default());
    }
    if ptr.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-NULL, `count` attributes (the caller's promise).
    let raw = unsafe { std::slice::from_raw_parts(ptr, count as usize) };
    let mut attrs = Vec::with_capacity(raw.len());
    for a in raw {
        if a.ulValueLen == CK_UNAVAILABLE_INFORMATION
            || a.ulValueLen > MAX_VALUE
            || (a.pValue.is_null() && a.ulValueLen > 0)
        {
            return Err(CKR_ATTRIBUTE_VALUE_INVALID);
        }
        if is_array_type(a.type_) {
            let n = a.ulValueLen as usize / std::mem::size_of::<CK_ATTRIBUTE>();
            // SAFETY: an array attribute's value is an array of CK_ATTRIBUTE of that byte length.
            let inner = unsafe { template(a.pValue as *const CK_ATTRIBUTE, n as CK_ULONG) }?;
            attrs.push(Attr::array(a.type_, inner.0));
        } else if a.ulValueLen == 0 {
            attrs.push(Attr::bytes(a.type_, &[]));
        } else {
            // SAFETY: non-NULL and valid for its length (the caller's promise).
            let value = unsafe { std::slice::from_raw_parts(a.pValue as *const u8, a.ulValueLen as usize) };
            attrs.push(Attr::bytes(a.type_, value));
        }
    }
    Ok(Template(attrs))
}

/// Whether an application's template names an attribute type (no copy made).
///
/// # Safety
/// As for [`template`].
pub unsafe fn names(ptr: *const CK_ATTRIBUTE, count: CK_ULONG, ty: CK_ATTRIBUTE_TYPE) -> bool {
    if ptr.is_null() || count == 0 {
        return false;
    }
    // SAFETY: non-NULL, `count` attributes.
    unsafe { std::slice::from_raw_parts(ptr, count as usize) }.iter().any(|a| a.type_ == ty)
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
    fn null_out_pointer_is_arguments_bad() {
        // SAFETY: NULL is allowed and checked.
        assert_eq!(unsafe { write_out::<u64>(std::ptr::null_mut(), 1) }, Err(CKR_ARGUMENTS_BAD));
    }
}
