//! Mechanism parameters that carry object handles (all of them derive mechanisms): CKM_CONCATENATE_BASE_AND_KEY
//! (the parameter is a handle), CKM_ECMQV_DERIVE, CKM_X9_42_DH_HYBRID_DERIVE and
//! CKM_X9_42_MQV_DERIVE (a private key, and for MQV a public key), CKM_HKDF_DERIVE and CKM_HKDF_DATA (a salt
//! key). A handle there is checked and translated like any key argument: one of the shim's own objects is
//! refused with CKR_KEY_HANDLE_INVALID, a stored key is given as its HSM copy. The application's parameter is
//! never written: a translated one is a copy that lives for the call. Any other mechanism, or a parameter of
//! an unexpected length, goes to the backend unchanged.

use crate::objects;
use cryptoki_sys::*;
use std::ffi::c_void;

/// A parameter copied so that its handles could be translated.
enum Param {
    Handle(CK_OBJECT_HANDLE),
    Ecmqv(CK_ECMQV_DERIVE_PARAMS),
    X942Dh2(CK_X9_42_DH2_DERIVE_PARAMS),
    X942Mqv(CK_X9_42_MQV_DERIVE_PARAMS),
    Hkdf(CK_HKDF_PARAMS),
}

/// The application's mechanism, or a copy of it whose parameter's handles are the backend's (stored keys'
/// HSM copies held loaded while this lives).
pub struct Translated {
    original: *mut CK_MECHANISM,
    copy: Option<(CK_MECHANISM, Box<Param>)>,
    _held: Vec<objects::InFlight>,
}

/// Reads a `T` parameter, if the mechanism's parameter has exactly its size.
///
/// # Safety
/// `m.pParameter` is NULL or valid for `m.ulParameterLen` bytes.
unsafe fn read<T: Copy>(m: &CK_MECHANISM) -> Option<T> {
    if m.pParameter.is_null() || m.ulParameterLen as usize != std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: non-NULL and as long as a T (the caller's promise); read unaligned, as C gives no alignment
    // guarantee we could check.
    Some(unsafe { (m.pParameter as *const T).read_unaligned() })
}

/// Translates one handle of a parameter; whether it changed.
fn translate(handle: &mut CK_OBJECT_HANDLE, held: &mut Vec<objects::InFlight>) -> Result<bool, CK_RV> {
    let (backend, in_flight) = objects::hold(*handle, CKR_KEY_HANDLE_INVALID)?;
    held.extend(in_flight);
    let changed = backend != *handle;
    *handle = backend;
    Ok(changed)
}

impl Translated {
    /// # Safety
    /// `mechanism` is NULL or the application's valid mechanism for the current call.
    pub unsafe fn new(mechanism: *mut CK_MECHANISM) -> Result<Translated, CK_RV> {
        let unchanged = Translated { original: mechanism, copy: None, _held: Vec::new() };
        // SAFETY: NULL or valid (the caller's promise).
        let Some(m) = (unsafe { mechanism.as_ref() }) else { return Ok(unchanged) };
        // SAFETY: the parameter is the application's, valid for its stated length.
        let param = unsafe {
            match m.mechanism {
                CKM_CONCATENATE_BASE_AND_KEY => read::<CK_OBJECT_HANDLE>(m).map(Param::Handle),
                CKM_ECMQV_DERIVE => read(m).map(Param::Ecmqv),
                CKM_X9_42_DH_HYBRID_DERIVE => read(m).map(Param::X942Dh2),
                CKM_X9_42_MQV_DERIVE => read(m).map(Param::X942Mqv),
                CKM_HKDF_DERIVE | CKM_HKDF_DATA => read(m).map(Param::Hkdf),
                _ => None,
            }
        };
        let Some(mut param) = param else { return Ok(unchanged) };
        let mut held = Vec::new();
        let h = &mut held;
        let changed = match &mut param {
            Param::Handle(x) => translate(x, h)?,
            Param::Ecmqv(p) => translate(&mut p.hPrivateData, h)? | translate(&mut p.publicKey, h)?,
            Param::X942Dh2(p) => translate(&mut p.hPrivateData, h)?,
            Param::X942Mqv(p) => translate(&mut p.hPrivateData, h)? | translate(&mut p.publicKey, h)?,
            Param::Hkdf(p) if p.ulSaltType == CKF_HKDF_SALT_KEY => translate(&mut p.hSaltKey, h)?,
            Param::Hkdf(_) => false,
        };
        if !changed {
            return Ok(unchanged);
        }
        let mut param = Box::new(param);
        let pointer: *mut c_void = match param.as_mut() {
            Param::Handle(h) => h as *mut _ as *mut c_void,
            Param::Ecmqv(p) => p as *mut _ as *mut c_void,
            Param::X942Dh2(p) => p as *mut _ as *mut c_void,
            Param::X942Mqv(p) => p as *mut _ as *mut c_void,
            Param::Hkdf(p) => p as *mut _ as *mut c_void,
        };
        let copy = CK_MECHANISM { mechanism: m.mechanism, pParameter: pointer, ulParameterLen: m.ulParameterLen };
        Ok(Translated { original: mechanism, copy: Some((copy, param)), _held: held })
    }

    /// The mechanism to give the backend; valid while `self` lives.
    pub fn as_ptr(&mut self) -> *mut CK_MECHANISM {
        match &mut self.copy {
            Some((m, _)) => m,
            None => self.original,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mechanism<T>(kind: CK_MECHANISM_TYPE, param: &mut T) -> CK_MECHANISM {
        CK_MECHANISM {
            mechanism: kind,
            pParameter: param as *mut T as *mut c_void,
            ulParameterLen: std::mem::size_of::<T>() as CK_ULONG,
        }
    }

    #[test]
    fn handles_in_parameters_are_checked_like_key_arguments() {
        let owned = 0x6611_0001;
        objects::own(owned);
        let mut handle: CK_OBJECT_HANDLE = owned;
        let mut m = mechanism(CKM_CONCATENATE_BASE_AND_KEY, &mut handle);
        // SAFETY: a valid mechanism with a handle parameter.
        assert_eq!(unsafe { Translated::new(&mut m) }.err(), Some(CKR_KEY_HANDLE_INVALID));

        // SAFETY: plain data.
        let mut ecmqv: CK_ECMQV_DERIVE_PARAMS = unsafe { std::mem::zeroed() };
        ecmqv.hPrivateData = 5;
        ecmqv.publicKey = owned;
        let mut m = mechanism(CKM_ECMQV_DERIVE, &mut ecmqv);
        // SAFETY: as above.
        assert_eq!(unsafe { Translated::new(&mut m) }.err(), Some(CKR_KEY_HANDLE_INVALID), "the public key too");

        // SAFETY: plain data.
        let mut hkdf: CK_HKDF_PARAMS = unsafe { std::mem::zeroed() };
        hkdf.ulSaltType = CKF_HKDF_SALT_DATA;
        hkdf.hSaltKey = owned;
        let mut m = mechanism(CKM_HKDF_DERIVE, &mut hkdf);
        // SAFETY: as above.
        assert!(unsafe { Translated::new(&mut m) }.is_ok(), "no salt key: the handle field is not one");
        hkdf.ulSaltType = CKF_HKDF_SALT_KEY;
        let mut m = mechanism(CKM_HKDF_DERIVE, &mut hkdf);
        // SAFETY: as above.
        assert_eq!(unsafe { Translated::new(&mut m) }.err(), Some(CKR_KEY_HANDLE_INVALID));
        objects::disown(owned);
    }

    #[test]
    fn ordinary_parameters_pass_unchanged() {
        // SAFETY: plain data.
        let mut mqv: CK_X9_42_MQV_DERIVE_PARAMS = unsafe { std::mem::zeroed() };
        mqv.hPrivateData = 42;
        mqv.publicKey = 43;
        let mut m = mechanism(CKM_X9_42_MQV_DERIVE, &mut mqv);
        let original: *mut CK_MECHANISM = &mut m;
        // SAFETY: a valid mechanism.
        let mut t = unsafe { Translated::new(original) }.unwrap();
        assert_eq!(t.as_ptr(), original, "nothing to translate: the application's own mechanism");
        let mut data = [0u8; 4];
        let mut m = mechanism(CKM_SHA256_HMAC, &mut data);
        let original: *mut CK_MECHANISM = &mut m;
        // SAFETY: as above.
        assert_eq!(unsafe { Translated::new(original) }.unwrap().as_ptr(), original);
    }

    #[test]
    fn aliased_handles_are_translated_into_a_copy() {
        let backend = objects::SHIM_HANDLE_BIT | 0x77;
        let alias = objects::from_backend(backend);
        let mut handle = alias;
        let mut m = mechanism(CKM_CONCATENATE_BASE_AND_KEY, &mut handle);
        let original: *mut CK_MECHANISM = &mut m;
        // SAFETY: a valid mechanism with a handle parameter.
        let mut t = unsafe { Translated::new(original) }.unwrap();
        let given = t.as_ptr();
        assert_ne!(given, original);
        // SAFETY: the copy lives as long as `t`.
        let param = unsafe { *((*given).pParameter as *const CK_OBJECT_HANDLE) };
        assert_eq!(param, backend);
        assert_eq!(handle, alias, "the application's parameter is not written");
        objects::forget(alias);
    }
}
