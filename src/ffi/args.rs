//! Safe adapters for the pointers the shim itself reads or writes. Every function checks for NULL and
//! answers CKR_ARGUMENTS_BAD, as the spec asks for pointers it forbids to be NULL.

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
