//! Safe adapters for C arguments: input slices, templates and mechanisms copied out of the caller's memory,
//! and outputs written with the length-query protocol.

use crate::mech::{Mechanism, Param};
use crate::module::Out;
use crate::object::{kind, Attr, Bytes, Kind, Template};
use crate::Result;
use cryptoki_sys::*;
use std::collections::BTreeMap;
use std::mem::size_of;

/// The caller's `len` items at `ptr` (NULL is fine for zero items). A misaligned pointer or a length past
/// the address space is CKR_ARGUMENTS_BAD: no caller's memory can be like that, and building the slice
/// would be undefined (debug builds abort).
///
/// # Safety
/// `ptr` must be NULL or point to `len` readable items that outlive the returned slice.
pub unsafe fn slice<'a, T>(ptr: *const T, len: CK_ULONG) -> Result<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    let len = checked_len::<T>(ptr, len)?;
    // SAFETY: the caller guarantees `len` readable items at `ptr`, checked non-NULL, aligned and addressable.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// As [`slice`], writable.
///
/// # Safety
/// `ptr` must be NULL or point to `len` writable items that outlive the returned slice.
pub unsafe fn slice_mut<'a, T>(ptr: *mut T, len: CK_ULONG) -> Result<&'a mut [T]> {
    if len == 0 {
        return Ok(&mut []);
    }
    let len = checked_len::<T>(ptr, len)?;
    // SAFETY: the caller guarantees `len` writable items at `ptr`, checked non-NULL, aligned and addressable.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// `len` items at `ptr` as a slice length, if such a slice can exist.
fn checked_len<T>(ptr: *const T, len: CK_ULONG) -> Result<usize> {
    let len = usize::try_from(len).map_err(|_| CKR_ARGUMENTS_BAD)?;
    let fits = len.checked_mul(size_of::<T>()).is_some_and(|bytes| bytes <= isize::MAX as usize);
    if ptr.is_null() || !ptr.is_aligned() || !fits {
        return Err(CKR_ARGUMENTS_BAD);
    }
    Ok(len)
}

/// A required out pointer.
///
/// # Safety
/// `ptr` must be NULL or valid for writes of a `T`.
pub unsafe fn out<'a, T>(ptr: *mut T) -> Result<&'a mut T> {
    // SAFETY: the caller guarantees a NULL or writable pointer; NULL becomes an error.
    unsafe { ptr.as_mut() }.ok_or(CKR_ARGUMENTS_BAD)
}

/// Template values longer than this are refused: no attribute comes near it (p11shim has the same limit),
/// and a length that cannot be the caller's buffer must not be read.
const MAX_VALUE_LEN: CK_ULONG = 1 << 24;

/// Copies a template (attribute arrays of CKA_WRAP_TEMPLATE… included). Malformed values are
/// CKR_ATTRIBUTE_VALUE_INVALID: a NULL value with a length, a length of CK_UNAVAILABLE_INFORMATION or past
/// [`MAX_VALUE_LEN`], an attribute array whose length is not a whole number of CK_ATTRIBUTEs or that holds
/// another attribute array, a mechanism list (CKA_ALLOWED_MECHANISMS) whose length is not a whole number of
/// CK_MECHANISM_TYPEs.
///
/// # Safety
/// `ptr` must point to `count` CK_ATTRIBUTEs whose values are readable for their lengths.
pub unsafe fn template(ptr: *const CK_ATTRIBUTE, count: CK_ULONG) -> Result<Template> {
    // SAFETY: forwarded from the caller.
    let attrs = unsafe { slice(ptr, count)? };
    attrs
        .iter()
        .map(|a| {
            let value = if kind(a.type_) == Kind::Template {
                // SAFETY: forwarded from the caller.
                Attr::Template(unsafe { attribute_array(a)? })
            } else {
                // SAFETY: forwarded from the caller.
                Attr::Bytes(unsafe { value_bytes(a)? })
            };
            Ok((a.type_, value))
        })
        .collect()
}

/// The elements of an attribute array, each a plain value (arrays nest one level only).
///
/// # Safety
/// `a.pValue` must be NULL or hold `a.ulValueLen` readable bytes of CK_ATTRIBUTEs with readable values.
unsafe fn attribute_array(a: &CK_ATTRIBUTE) -> Result<BTreeMap<CK_ATTRIBUTE_TYPE, Bytes>> {
    let elem = size_of::<CK_ATTRIBUTE>() as CK_ULONG;
    if !valid_len(a) || !a.ulValueLen.is_multiple_of(elem) {
        return Err(CKR_ATTRIBUTE_VALUE_INVALID);
    }
    let base = a.pValue as *const CK_ATTRIBUTE;
    let mut map = BTreeMap::new();
    for i in 0..(a.ulValueLen / elem) as usize {
        // SAFETY: element i lies within the caller's `ulValueLen` bytes; a void pointer promises no alignment.
        let inner = unsafe { std::ptr::read_unaligned(base.add(i)) };
        if kind(inner.type_) == Kind::Template {
            return Err(CKR_ATTRIBUTE_VALUE_INVALID);
        }
        // SAFETY: each element's value is readable for its length (the caller's promise).
        map.insert(inner.type_, unsafe { value_bytes(&inner)? });
    }
    Ok(map)
}

/// A plain value.
///
/// # Safety
/// `a.pValue` must be NULL or readable for `a.ulValueLen` bytes.
unsafe fn value_bytes(a: &CK_ATTRIBUTE) -> Result<Bytes> {
    if !valid_len(a) {
        return Err(CKR_ATTRIBUTE_VALUE_INVALID);
    }
    if kind(a.type_) == Kind::MechanismList && !a.ulValueLen.is_multiple_of(size_of::<CK_MECHANISM_TYPE>() as CK_ULONG)
    {
        return Err(CKR_ATTRIBUTE_VALUE_INVALID);
    }
    // SAFETY: forwarded from the caller; the length is bounded and the pointer non-NULL when it is not 0.
    let v = unsafe { slice(a.pValue as *const u8, a.ulValueLen) }.map_err(|_| CKR_ATTRIBUTE_VALUE_INVALID)?;
    Ok(Bytes(v.to_vec()))
}

/// Whether a template value's length can be read at all.
fn valid_len(a: &CK_ATTRIBUTE) -> bool {
    a.ulValueLen <= MAX_VALUE_LEN && !(a.pValue.is_null() && a.ulValueLen > 0)
}

/// Reads a parameter structure of exactly its size.
///
/// # Safety
/// `p` must point to `len` readable bytes.
unsafe fn param<T: Copy>(p: *const std::ffi::c_void, len: CK_ULONG) -> Result<T> {
    if p.is_null() || len as usize != size_of::<T>() {
        return Err(CKR_MECHANISM_PARAM_INVALID);
    }
    // SAFETY: `len` readable bytes are a `T` (C structure, any alignment).
    Ok(unsafe { std::ptr::read_unaligned(p as *const T) })
}

/// The GCM parameters of PKCS#11 2.40 errata headers, without ulIvBits (OpenSC and others still use them).
#[repr(C)]
#[derive(Clone, Copy)]
struct GcmParamsLegacy {
    p_iv: *mut u8,
    iv_len: CK_ULONG,
    p_aad: *mut u8,
    aad_len: CK_ULONG,
    tag_bits: CK_ULONG,
}

/// Copies a mechanism and its parameter.
///
/// # Safety
/// `ptr` must be NULL or point to a CK_MECHANISM whose parameter is readable for its length.
pub unsafe fn mechanism(ptr: *const CK_MECHANISM) -> Result<Mechanism> {
    // SAFETY: forwarded from the caller.
    let m = unsafe { ptr.as_ref() }.ok_or(CKR_ARGUMENTS_BAD)?;
    let (p, len) = (m.pParameter as *const std::ffi::c_void, m.ulParameterLen);
    // SAFETY (all blocks below): pointers inside the parameter structures are the caller's, valid for their lengths.
    let param = match m.mechanism {
        CKM_AES_GCM => {
            if len as usize == size_of::<CK_GCM_PARAMS>() {
                let g: CK_GCM_PARAMS = unsafe { param(p, len)? };
                Param::Gcm {
                    iv: unsafe { slice(g.pIv, g.ulIvLen)? }.to_vec(),
                    aad: unsafe { slice(g.pAAD, g.ulAADLen)? }.to_vec(),
                    tag_bits: g.ulTagBits as usize,
                }
            } else {
                let g: GcmParamsLegacy = unsafe { param(p, len)? };
                Param::Gcm {
                    iv: unsafe { slice(g.p_iv, g.iv_len)? }.to_vec(),
                    aad: unsafe { slice(g.p_aad, g.aad_len)? }.to_vec(),
                    tag_bits: g.tag_bits as usize,
                }
            }
        }
        CKM_RSA_PKCS_OAEP => {
            let o: CK_RSA_PKCS_OAEP_PARAMS = unsafe { param(p, len)? };
            let label = match o.source {
                CKZ_DATA_SPECIFIED => unsafe { slice(o.pSourceData as *const u8, o.ulSourceDataLen)? }.to_vec(),
                0 if o.ulSourceDataLen == 0 => Vec::new(),
                _ => return Err(CKR_MECHANISM_PARAM_INVALID),
            };
            Param::Oaep { hash: o.hashAlg, mgf: o.mgf, label }
        }
        CKM_RSA_PKCS_PSS
        | CKM_SHA1_RSA_PKCS_PSS
        | CKM_SHA224_RSA_PKCS_PSS
        | CKM_SHA256_RSA_PKCS_PSS
        | CKM_SHA384_RSA_PKCS_PSS
        | CKM_SHA512_RSA_PKCS_PSS => {
            let s: CK_RSA_PKCS_PSS_PARAMS = unsafe { param(p, len)? };
            Param::Pss { hash: s.hashAlg, mgf: s.mgf, salt_len: s.sLen as usize }
        }
        CKM_ECDH1_DERIVE => {
            let e: CK_ECDH1_DERIVE_PARAMS = unsafe { param(p, len)? };
            Param::Ecdh {
                kdf: e.kdf,
                shared: unsafe { slice(e.pSharedData, e.ulSharedDataLen)? }.to_vec(),
                public: unsafe { slice(e.pPublicData, e.ulPublicDataLen)? }.to_vec(),
            }
        }
        _ if p.is_null() || len == 0 => Param::None,
        _ => Param::Bytes(unsafe { slice(p as *const u8, len)? }.to_vec()),
    };
    Ok(Mechanism { ty: m.mechanism, param })
}

/// The capacity of an output buffer: None for a length query (NULL buffer).
///
/// # Safety
/// `len` must be NULL or readable.
pub unsafe fn capacity(buf: *const u8, len: *const CK_ULONG) -> Result<Option<usize>> {
    // SAFETY: forwarded from the caller.
    let len = unsafe { len.as_ref() }.ok_or(CKR_ARGUMENTS_BAD)?;
    Ok(if buf.is_null() { None } else { Some(*len as usize) })
}

/// Writes an output (or its length) with the length-query protocol.
///
/// # Safety
/// `buf` must be NULL or writable for `*len` bytes; `len` must be writable.
pub unsafe fn write_out(out: Out, buf: *mut u8, len: *mut CK_ULONG) -> Result<()> {
    // SAFETY: forwarded from the caller.
    let len = unsafe { self::out(len)? };
    match out {
        Out::Done(data) => {
            if !data.is_empty() {
                // SAFETY: `capacity` saw a non-NULL buffer of at least `*len` >= data.len() bytes.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len()) };
            }
            *len = data.len() as CK_ULONG;
            Ok(())
        }
        Out::Query(n) => {
            *len = n as CK_ULONG;
            Ok(())
        }
        Out::TooSmall(n) => {
            *len = n as CK_ULONG;
            Err(CKR_BUFFER_TOO_SMALL)
        }
    }
}

/// Writes bytes computed afresh on every call (C_WrapKey) with the length-query protocol.
///
/// # Safety
/// As [`write_out`].
pub unsafe fn write_bytes(data: &[u8], buf: *mut u8, len: *mut CK_ULONG) -> Result<()> {
    // SAFETY: forwarded from the caller.
    let out = match unsafe { capacity(buf, len)? } {
        None => Out::Query(data.len()),
        Some(c) if c < data.len() => Out::TooSmall(data.len()),
        Some(_) => Out::Done(data.to_vec()),
    };
    // SAFETY: forwarded from the caller.
    unsafe { write_out(out, buf, len) }
}

/// Writes a list (slots, mechanisms) with the length-query protocol.
///
/// # Safety
/// `buf` must be NULL or writable for `*count` items; `count` must be readable and writable.
pub unsafe fn write_list<T: Copy>(items: &[T], buf: *mut T, count: *mut CK_ULONG) -> Result<()> {
    // SAFETY: forwarded from the caller.
    let count = unsafe { out(count)? };
    if buf.is_null() {
        *count = items.len() as CK_ULONG;
        return Ok(());
    }
    if (*count as usize) < items.len() {
        *count = items.len() as CK_ULONG;
        return Err(CKR_BUFFER_TOO_SMALL);
    }
    // SAFETY: `buf` holds at least `*count` >= items.len() items.
    unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), buf, items.len()) };
    *count = items.len() as CK_ULONG;
    Ok(())
}

/// Copies one value into a caller's attribute: NULL → its length; too small → CK_UNAVAILABLE_INFORMATION.
///
/// # Safety
/// `a.pValue` must be NULL or writable for `a.ulValueLen` bytes.
unsafe fn write_value(a: &mut CK_ATTRIBUTE, value: &[u8]) -> Result<()> {
    if a.pValue.is_null() {
        a.ulValueLen = value.len() as CK_ULONG;
        return Ok(());
    }
    if (a.ulValueLen as usize) < value.len() {
        a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
        return Err(CKR_BUFFER_TOO_SMALL);
    }
    // SAFETY: the caller's buffer holds at least value.len() bytes.
    unsafe { std::ptr::copy_nonoverlapping(value.as_ptr(), a.pValue as *mut u8, value.len()) };
    a.ulValueLen = value.len() as CK_ULONG;
    Ok(())
}

/// C_GetAttributeValue's answers: every entry is processed; the call's result is the most telling error
/// (CKR_ATTRIBUTE_SENSITIVE, then CKR_ATTRIBUTE_TYPE_INVALID, then CKR_BUFFER_TOO_SMALL).
///
/// # Safety
/// `attrs` are the caller's attributes with writable values of their lengths.
pub unsafe fn write_attributes(attrs: &mut [CK_ATTRIBUTE], values: Vec<Result<Attr>>) -> Result<()> {
    let rank = |rv: CK_RV| match rv {
        CKR_ATTRIBUTE_SENSITIVE => 3,
        CKR_ATTRIBUTE_TYPE_INVALID => 2,
        _ => 1,
    };
    let mut worst: Option<CK_RV> = None;
    let mut note = |rv: CK_RV| {
        if worst.is_none_or(|w| rank(rv) > rank(w)) {
            worst = Some(rv);
        }
    };
    for (a, value) in attrs.iter_mut().zip(values) {
        match value {
            Err(rv) => {
                a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                note(rv);
            }
            // SAFETY: forwarded from the caller.
            Ok(Attr::Bytes(b)) => unsafe { write_value(a, &b.0) }.unwrap_or_else(&mut note),
            Ok(Attr::Template(t)) => {
                let need = t.len() * size_of::<CK_ATTRIBUTE>();
                if a.pValue.is_null() {
                    a.ulValueLen = need as CK_ULONG;
                } else if (a.ulValueLen as usize) < need {
                    a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    note(CKR_BUFFER_TOO_SMALL);
                } else {
                    let base = a.pValue as *mut CK_ATTRIBUTE;
                    for (i, (ty, v)) in t.iter().enumerate() {
                        // SAFETY: the caller's value holds at least t.len() CK_ATTRIBUTEs; a void pointer
                        // promises no alignment.
                        let mut inner = unsafe { std::ptr::read_unaligned(base.add(i)) };
                        inner.type_ = *ty;
                        // SAFETY: each element's value is the caller's, NULL or writable for its length.
                        unsafe { write_value(&mut inner, &v.0) }.unwrap_or_else(&mut note);
                        // SAFETY: as the read above.
                        unsafe { std::ptr::write_unaligned(base.add(i), inner) };
                    }
                    a.ulValueLen = need as CK_ULONG;
                }
            }
        }
    }
    worst.map_or(Ok(()), Err)
}
