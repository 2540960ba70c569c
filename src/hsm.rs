//! The calls the shim makes into the backend for itself (stored keys, the MBK, the CLI), with safe types.
//! Like `backend`, this is a boundary: the raw pointers built here live only for the duration of a call.

use crate::attrs::{layout, mechanisms_from_bytes, Attr, Layout, Template, Value};
use crate::backend::Backend;
use crate::error::{rv_ok, Error, Result};
use cryptoki_sys::*;
use std::ffi::c_void;
use zeroize::Zeroizing;

/// A mechanism the application passed (its pointer goes to the backend unchanged). Only `ffi` makes one.
#[derive(Clone, Copy)]
pub struct AppMechanism(*mut CK_MECHANISM);

impl AppMechanism {
    /// # Safety
    /// `ptr` is what the application passed to the current call; it stays valid while that call runs.
    pub unsafe fn new(ptr: *mut CK_MECHANISM) -> AppMechanism {
        AppMechanism(ptr)
    }
    /// The mechanism type, if the pointer is not NULL.
    pub fn kind(&self) -> Option<CK_MECHANISM_TYPE> {
        // SAFETY: NULL or the application's valid mechanism (see `new`).
        unsafe { self.0.as_ref() }.map(|m| m.mechanism)
    }
}

/// A mechanism the shim chooses; its parameter by value.
pub struct Mechanism {
    pub kind: CK_MECHANISM_TYPE,
    param: Param,
}

enum Param {
    None,
    Oaep(CK_RSA_PKCS_OAEP_PARAMS),
}

impl Mechanism {
    pub fn plain(kind: CK_MECHANISM_TYPE) -> Mechanism {
        Mechanism { kind, param: Param::None }
    }
    /// CKM_RSA_PKCS_OAEP with `hash` and the matching MGF1, no label.
    pub fn rsa_oaep(hash: CK_MECHANISM_TYPE) -> Mechanism {
        let mgf = match hash {
            CKM_SHA256 => CKG_MGF1_SHA256,
            CKM_SHA384 => CKG_MGF1_SHA384,
            CKM_SHA512 => CKG_MGF1_SHA512,
            _ => CKG_MGF1_SHA1,
        };
        let params = CK_RSA_PKCS_OAEP_PARAMS {
            hashAlg: hash,
            mgf,
            source: CKZ_DATA_SPECIFIED,
            pSourceData: std::ptr::null_mut(),
            ulSourceDataLen: 0,
        };
        Mechanism { kind: CKM_RSA_PKCS_OAEP, param: Param::Oaep(params) }
    }
    fn raw(&self) -> CK_MECHANISM {
        let (ptr, len) = match &self.param {
            Param::None => (std::ptr::null_mut(), 0),
            Param::Oaep(p) => (p as *const _ as *mut c_void, std::mem::size_of::<CK_RSA_PKCS_OAEP_PARAMS>()),
        };
        CK_MECHANISM { mechanism: self.kind, pParameter: ptr, ulParameterLen: len as CK_ULONG }
    }
}

/// A template laid out as CK_ATTRIBUTEs pointing into `Template` (which must outlive it), each value as its
/// type's layout says: attribute arrays as arrays of CK_ATTRIBUTE, mechanism arrays as arrays of
/// CK_MECHANISM_TYPE (aligned for them), the rest as bytes.
struct Raw {
    attrs: Vec<CK_ATTRIBUTE>,
    /// The attribute arrays' elements, which `attrs` point into.
    _nested: Vec<Raw>,
    /// The mechanism arrays, which `attrs` point into.
    _mechanisms: Vec<Vec<CK_MECHANISM_TYPE>>,
}

impl Raw {
    fn new(template: &Template) -> Raw {
        Raw::of(&template.0)
    }
    fn of(list: &[Attr]) -> Raw {
        let mut nested = Vec::new();
        let mut mechanisms = Vec::new();
        let mut attrs = Vec::with_capacity(list.len());
        for a in list {
            let (ptr, len) = match (&a.value, layout(a.ty)) {
                (Value::Array(inner), _) => {
                    let raw = Raw::of(inner);
                    let p = raw.attrs.as_ptr() as *mut c_void;
                    let len = raw.attrs.len() * std::mem::size_of::<CK_ATTRIBUTE>();
                    nested.push(raw);
                    (p, len)
                }
                // The bytes of a Vec<u8> promise no alignment; a backend reads CK_MECHANISM_TYPEs.
                (Value::Bytes(b), Layout::Mechanisms) => match mechanisms_from_bytes(b) {
                    Some(list) => {
                        let p = list.as_ptr() as *mut c_void;
                        mechanisms.push(list);
                        (p, b.len())
                    }
                    // Not whole mechanism types: given as they are, for the backend to refuse.
                    None => (b.as_ptr() as *mut c_void, b.len()),
                },
                (Value::Bytes(b), _) => (b.as_ptr() as *mut c_void, b.len()),
            };
            attrs.push(CK_ATTRIBUTE {
                type_: a.ty,
                pValue: if len == 0 { std::ptr::null_mut() } else { ptr },
                ulValueLen: len as CK_ULONG,
            });
        }
        Raw { attrs, _nested: nested, _mechanisms: mechanisms }
    }
    fn ptr(&mut self) -> (*mut CK_ATTRIBUTE, CK_ULONG) {
        (
            if self.attrs.is_empty() { std::ptr::null_mut() } else { self.attrs.as_mut_ptr() },
            self.attrs.len() as CK_ULONG,
        )
    }
}

/// One attribute being read by [`Backend::attributes`]: a buffer for a value, or for an attribute array its
/// elements (as the backend describes them) and their buffers.
struct Fetched {
    ty: CK_ATTRIBUTE_TYPE,
    value: Zeroizing<Vec<u8>>,
    elements: Vec<CK_ATTRIBUTE>,
    element_values: Vec<Zeroizing<Vec<u8>>>,
}

impl Fetched {
    fn new(ty: CK_ATTRIBUTE_TYPE, len: usize) -> Fetched {
        let (value, elements) = match layout(ty) {
            Layout::Attributes => {
                let n = len / std::mem::size_of::<CK_ATTRIBUTE>();
                let none = CK_ATTRIBUTE { type_: 0, pValue: std::ptr::null_mut(), ulValueLen: 0 };
                (Zeroizing::new(Vec::new()), vec![none; n])
            }
            _ => (Zeroizing::new(vec![0u8; len]), Vec::new()),
        };
        Fetched { ty, value, elements, element_values: Vec::new() }
    }

    fn is_array(&self) -> bool {
        layout(self.ty) == Layout::Attributes
    }

    fn has_elements(&self) -> bool {
        !self.elements.is_empty()
    }

    /// The CK_ATTRIBUTE asking for this attribute, pointing into `self`.
    fn raw(&mut self) -> CK_ATTRIBUTE {
        let (ptr, len) = if self.is_array() {
            let bytes = self.elements.len() * std::mem::size_of::<CK_ATTRIBUTE>();
            (self.elements.as_mut_ptr() as *mut c_void, bytes)
        } else {
            (self.value.as_mut_ptr() as *mut c_void, self.value.len())
        };
        CK_ATTRIBUTE {
            type_: self.ty,
            pValue: if len == 0 { std::ptr::null_mut() } else { ptr },
            ulValueLen: len as CK_ULONG,
        }
    }

    /// After the call that filled in the plain value, or the array's element types and lengths: the value's
    /// length, and buffers for the elements' values.
    fn answered(&mut self, len: CK_ULONG) -> Result<()> {
        if !self.is_array() {
            self.value.truncate(len as usize);
            return Ok(());
        }
        for e in &mut self.elements {
            // An element the backend cannot describe would leave the array half read.
            if e.ulValueLen == CK_UNAVAILABLE_INFORMATION || e.ulValueLen > MAX_ELEMENT {
                return Err(Error::Rv(CKR_GENERAL_ERROR));
            }
            let mut buffer = Zeroizing::new(vec![0u8; e.ulValueLen as usize]);
            e.pValue = if buffer.is_empty() { std::ptr::null_mut() } else { buffer.as_mut_ptr() as *mut c_void };
            self.element_values.push(buffer);
        }
        Ok(())
    }

    fn into_attr(self) -> Attr {
        if !self.is_array() {
            return Attr { ty: self.ty, value: Value::Bytes(self.value) };
        }
        let inner = self
            .elements
            .iter()
            .zip(self.element_values)
            .map(|(e, mut value)| {
                value.truncate(e.ulValueLen as usize);
                Attr { ty: e.type_, value: Value::Bytes(value) }
            })
            .collect();
        Attr::array(self.ty, inner)
    }
}

/// The longest element value of an attribute array the shim reads from the backend (as for templates the
/// application passes).
const MAX_ELEMENT: CK_ULONG = 1 << 24;

fn func<T>(f: Option<T>) -> Result<T> {
    f.ok_or(Error::Rv(CKR_FUNCTION_NOT_SUPPORTED))
}

impl Backend {
    pub fn slot_list(&self, token_present: bool) -> Result<Vec<CK_SLOT_ID>> {
        let f = func(self.f.C_GetSlotList)?;
        loop {
            let mut count: CK_ULONG = 0;
            // SAFETY: NULL list asks for the count.
            rv_ok(unsafe { f(token_present as CK_BBOOL, std::ptr::null_mut(), &mut count) })?;
            let mut slots = vec![0; count as usize];
            // SAFETY: room for `count` slots.
            match unsafe { f(token_present as CK_BBOOL, slots.as_mut_ptr(), &mut count) } {
                CKR_OK => {
                    slots.truncate(count as usize);
                    return Ok(slots);
                }
                CKR_BUFFER_TOO_SMALL => continue,
                rv => return Err(Error::Rv(rv)),
            }
        }
    }

    pub fn token_info(&self, slot: CK_SLOT_ID) -> Result<CK_TOKEN_INFO> {
        let f = func(self.f.C_GetTokenInfo)?;
        // SAFETY: plain data.
        let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
        // SAFETY: valid out pointer.
        rv_ok(unsafe { f(slot, &mut info) })?;
        Ok(info)
    }

    /// The slot holding the token with this label.
    pub fn find_token(&self, label: &str) -> Result<Option<CK_SLOT_ID>> {
        for slot in self.slot_list(true)? {
            if let Ok(info) = self.token_info(slot) {
                if info.flags & CKF_TOKEN_INITIALIZED != 0 && padded_text(&info.label) == label {
                    return Ok(Some(slot));
                }
            }
        }
        Ok(None)
    }

    pub fn mechanisms(&self, slot: CK_SLOT_ID) -> Result<Vec<CK_MECHANISM_TYPE>> {
        let f = func(self.f.C_GetMechanismList)?;
        let mut count: CK_ULONG = 0;
        // SAFETY: NULL list asks for the count.
        rv_ok(unsafe { f(slot, std::ptr::null_mut(), &mut count) })?;
        let mut list = vec![0; count as usize];
        // SAFETY: room for `count` entries.
        rv_ok(unsafe { f(slot, list.as_mut_ptr(), &mut count) })?;
        list.truncate(count as usize);
        Ok(list)
    }

    pub fn session_info(&self, session: CK_SESSION_HANDLE) -> Result<CK_SESSION_INFO> {
        let f = func(self.f.C_GetSessionInfo)?;
        // SAFETY: plain data.
        let mut info: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
        // SAFETY: valid out pointer.
        rv_ok(unsafe { f(session, &mut info) })?;
        Ok(info)
    }

    pub fn login(&self, session: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: &[u8]) -> Result<()> {
        let f = func(self.f.C_Login)?;
        // SAFETY: the PIN is only read during the call.
        rv_ok(unsafe { f(session, user, pin.as_ptr() as *mut u8, pin.len() as CK_ULONG) })
    }

    pub fn logout(&self, session: CK_SESSION_HANDLE) -> Result<()> {
        // SAFETY: no pointers.
        rv_ok(unsafe { func(self.f.C_Logout)?(session) })
    }

    pub fn generate_key(
        &self,
        session: CK_SESSION_HANDLE,
        mech: &Mechanism,
        template: &Template,
    ) -> Result<CK_OBJECT_HANDLE> {
        let f = func(self.f.C_GenerateKey)?;
        let mut m = mech.raw();
        let mut raw = Raw::new(template);
        let (p, n) = raw.ptr();
        let mut handle = 0;
        // SAFETY: mechanism and template point into values alive for the call.
        rv_ok(unsafe { f(session, &mut m, p, n, &mut handle) })?;
        Ok(handle)
    }

    /// C_GenerateKey with the application's mechanism.
    pub fn generate_key_pair(
        &self,
        session: CK_SESSION_HANDLE,
        mech: &Mechanism,
        public: &Template,
        private: &Template,
    ) -> Result<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)> {
        let f = func(self.f.C_GenerateKeyPair)?;
        let mut m = mech.raw();
        let (mut rp, mut rq) = (Raw::new(public), Raw::new(private));
        let ((pp, pn), (qp, qn)) = (rp.ptr(), rq.ptr());
        let (mut hp, mut hq) = (0, 0);
        // SAFETY: mechanism and templates point into values alive for the call.
        rv_ok(unsafe { f(session, &mut m, pp, pn, qp, qn, &mut hp, &mut hq) })?;
        Ok((hp, hq))
    }

    pub fn generate_key_app(
        &self,
        session: CK_SESSION_HANDLE,
        mech: AppMechanism,
        template: &Template,
    ) -> Result<CK_OBJECT_HANDLE> {
        let f = func(self.f.C_GenerateKey)?;
        let mut raw = Raw::new(template);
        let (p, n) = raw.ptr();
        let mut handle = 0;
        // SAFETY: the application's mechanism pointer is valid for this call (AppMechanism::new).
        rv_ok(unsafe { f(session, mech.0, p, n, &mut handle) })?;
        Ok(handle)
    }

    pub fn generate_key_pair_app(
        &self,
        session: CK_SESSION_HANDLE,
        mech: AppMechanism,
        public: &Template,
        private: &Template,
    ) -> Result<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)> {
        let f = func(self.f.C_GenerateKeyPair)?;
        let (mut rp, mut rq) = (Raw::new(public), Raw::new(private));
        let ((pp, pn), (qp, qn)) = (rp.ptr(), rq.ptr());
        let (mut hp, mut hq) = (0, 0);
        // SAFETY: as in generate_key_app.
        rv_ok(unsafe { f(session, mech.0, pp, pn, qp, qn, &mut hp, &mut hq) })?;
        Ok((hp, hq))
    }

    pub fn unwrap_key_app(
        &self,
        session: CK_SESSION_HANDLE,
        mech: AppMechanism,
        unwrapping: CK_OBJECT_HANDLE,
        wrapped: &[u8],
        template: &Template,
    ) -> Result<CK_OBJECT_HANDLE> {
        let f = func(self.f.C_UnwrapKey)?;
        let mut raw = Raw::new(template);
        let (p, n) = raw.ptr();
        let mut handle = 0;
        // SAFETY: as in generate_key_app; the wrapped bytes are only read.
        rv_ok(unsafe {
            f(session, mech.0, unwrapping, wrapped.as_ptr() as *mut u8, wrapped.len() as CK_ULONG, p, n, &mut handle)
        })?;
        Ok(handle)
    }

    pub fn derive_key_app(
        &self,
        session: CK_SESSION_HANDLE,
        mech: AppMechanism,
        base: CK_OBJECT_HANDLE,
        template: &Template,
    ) -> Result<CK_OBJECT_HANDLE> {
        let f = func(self.f.C_DeriveKey)?;
        let mut raw = Raw::new(template);
        let (p, n) = raw.ptr();
        let mut handle = 0;
        // SAFETY: as in generate_key_app.
        rv_ok(unsafe { f(session, mech.0, base, p, n, &mut handle) })?;
        Ok(handle)
    }

    pub fn create_object(&self, session: CK_SESSION_HANDLE, template: &Template) -> Result<CK_OBJECT_HANDLE> {
        let f = func(self.f.C_CreateObject)?;
        let mut raw = Raw::new(template);
        let (p, n) = raw.ptr();
        let mut handle = 0;
        // SAFETY: the template points into `template`, alive for the call.
        rv_ok(unsafe { f(session, p, n, &mut handle) })?;
        Ok(handle)
    }

    pub fn copy_object(
        &self,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        template: &Template,
    ) -> Result<CK_OBJECT_HANDLE> {
        let f = func(self.f.C_CopyObject)?;
        let mut raw = Raw::new(template);
        let (p, n) = raw.ptr();
        let mut handle = 0;
        // SAFETY: as in create_object.
        rv_ok(unsafe { f(session, object, p, n, &mut handle) })?;
        Ok(handle)
    }

    pub fn destroy_object(&self, session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> Result<()> {
        // SAFETY: no pointers.
        rv_ok(unsafe { func(self.f.C_DestroyObject)?(session, object) })
    }

    pub fn set_attributes(
        &self,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        template: &Template,
    ) -> Result<()> {
        let f = func(self.f.C_SetAttributeValue)?;
        let mut raw = Raw::new(template);
        let (p, n) = raw.ptr();
        // SAFETY: as in create_object.
        rv_ok(unsafe { f(session, object, p, n) })
    }

    /// The values of `types` on `object`; an attribute the object lacks or hides is left out. Attribute arrays
    /// are read by C_GetAttributeValue's protocol for them (PKCS#11 3.0 §5.7.5): their lengths, then their
    /// elements' types and lengths, then the values; mechanism arrays are bytes like other values.
    pub fn attributes(
        &self,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        types: &[CK_ATTRIBUTE_TYPE],
    ) -> Result<Template> {
        let f = func(self.f.C_GetAttributeValue)?;
        let mut query: Vec<CK_ATTRIBUTE> =
            types.iter().map(|&t| CK_ATTRIBUTE { type_: t, pValue: std::ptr::null_mut(), ulValueLen: 0 }).collect();
        // SAFETY: NULL values ask for the lengths.
        let rv = unsafe { f(session, object, query.as_mut_ptr(), query.len() as CK_ULONG) };
        if !matches!(rv, CKR_OK | CKR_ATTRIBUTE_SENSITIVE | CKR_ATTRIBUTE_TYPE_INVALID) {
            return Err(Error::Rv(rv));
        }
        let mut fetch: Vec<Fetched> = query
            .iter()
            .filter(|a| a.ulValueLen != CK_UNAVAILABLE_INFORMATION)
            .map(|a| Fetched::new(a.type_, a.ulValueLen as usize))
            .collect();
        // Plain values, and each attribute array's elements with NULL values (asking their types and lengths).
        let mut raw: Vec<CK_ATTRIBUTE> = fetch.iter_mut().map(Fetched::raw).collect();
        if !raw.is_empty() {
            // SAFETY: each value points to a buffer of the length announced (an array: its elements).
            rv_ok(unsafe { f(session, object, raw.as_mut_ptr(), raw.len() as CK_ULONG) })?;
        }
        for (fetched, answered) in fetch.iter_mut().zip(&raw) {
            fetched.answered(answered.ulValueLen)?;
        }
        // The attribute arrays' values, into buffers of the lengths just announced.
        let mut arrays: Vec<CK_ATTRIBUTE> = fetch.iter_mut().filter(|a| a.has_elements()).map(Fetched::raw).collect();
        if !arrays.is_empty() {
            // SAFETY: each array points to its elements, each element to a buffer of the length announced.
            rv_ok(unsafe { f(session, object, arrays.as_mut_ptr(), arrays.len() as CK_ULONG) })?;
        }
        Ok(Template(fetch.into_iter().map(Fetched::into_attr).collect()))
    }

    pub fn find(&self, session: CK_SESSION_HANDLE, template: &Template) -> Result<Vec<CK_OBJECT_HANDLE>> {
        let (init, next, fin) =
            (func(self.f.C_FindObjectsInit)?, func(self.f.C_FindObjects)?, func(self.f.C_FindObjectsFinal)?);
        let mut raw = Raw::new(template);
        let (p, n) = raw.ptr();
        // SAFETY: as in create_object.
        rv_ok(unsafe { init(session, p, n) })?;
        let mut found = Vec::new();
        let result = loop {
            let mut batch = [0 as CK_OBJECT_HANDLE; 64];
            let mut count: CK_ULONG = 0;
            // SAFETY: room for 64 handles.
            match unsafe { next(session, batch.as_mut_ptr(), batch.len() as CK_ULONG, &mut count) } {
                CKR_OK if count == 0 => break Ok(()),
                CKR_OK => found.extend_from_slice(&batch[..(count as usize).min(batch.len())]),
                rv => break Err(Error::Rv(rv)),
            }
        };
        // SAFETY: no pointers.
        let _ = unsafe { fin(session) };
        result.map(|_| found)
    }

    /// C_FindObjectsInit with a template of the shim's making (the application's, less the shim's own
    /// attributes); the application then drives the find.
    pub fn find_init(&self, session: CK_SESSION_HANDLE, template: &Template) -> CK_RV {
        let Some(init) = self.f.C_FindObjectsInit else { return CKR_FUNCTION_NOT_SUPPORTED };
        let mut raw = Raw::new(template);
        let (p, n) = raw.ptr();
        // SAFETY: as in create_object.
        unsafe { init(session, p, n) }
    }

    pub fn wrap_key(
        &self,
        session: CK_SESSION_HANDLE,
        mech: &Mechanism,
        wrapping: CK_OBJECT_HANDLE,
        key: CK_OBJECT_HANDLE,
    ) -> Result<Vec<u8>> {
        let f = func(self.f.C_WrapKey)?;
        let mut m = mech.raw();
        let mut len: CK_ULONG = 0;
        // SAFETY: NULL output asks for the length.
        rv_ok(unsafe { f(session, &mut m, wrapping, key, std::ptr::null_mut(), &mut len) })?;
        let mut out = vec![0u8; len as usize];
        // SAFETY: room for `len` bytes.
        rv_ok(unsafe { f(session, &mut m, wrapping, key, out.as_mut_ptr(), &mut len) })?;
        out.truncate(len as usize);
        Ok(out)
    }

    pub fn unwrap_key(
        &self,
        session: CK_SESSION_HANDLE,
        mech: &Mechanism,
        unwrapping: CK_OBJECT_HANDLE,
        wrapped: &[u8],
        template: &Template,
    ) -> Result<CK_OBJECT_HANDLE> {
        let f = func(self.f.C_UnwrapKey)?;
        let mut m = mech.raw();
        let mut raw = Raw::new(template);
        let (p, n) = raw.ptr();
        let mut handle = 0;
        // SAFETY: every pointer refers to a value alive for the call; the wrapped bytes are only read.
        rv_ok(unsafe {
            f(session, &mut m, unwrapping, wrapped.as_ptr() as *mut u8, wrapped.len() as CK_ULONG, p, n, &mut handle)
        })?;
        Ok(handle)
    }

    pub fn sign(
        &self,
        session: CK_SESSION_HANDLE,
        mech: &Mechanism,
        key: CK_OBJECT_HANDLE,
        data: &[u8],
    ) -> Result<Vec<u8>> {
        let (init, sign) = (func(self.f.C_SignInit)?, func(self.f.C_Sign)?);
        let mut m = mech.raw();
        // SAFETY: the mechanism lives for the call.
        rv_ok(unsafe { init(session, &mut m, key) })?;
        let mut out = vec![0u8; 512];
        let mut len = out.len() as CK_ULONG;
        // SAFETY: room for `len` bytes; the data is only read.
        rv_ok(unsafe { sign(session, data.as_ptr() as *mut u8, data.len() as CK_ULONG, out.as_mut_ptr(), &mut len) })?;
        out.truncate(len as usize);
        Ok(out)
    }

    pub fn verify(
        &self,
        session: CK_SESSION_HANDLE,
        mech: &Mechanism,
        key: CK_OBJECT_HANDLE,
        data: &[u8],
        signature: &[u8],
    ) -> Result<()> {
        let (init, verify) = (func(self.f.C_VerifyInit)?, func(self.f.C_Verify)?);
        let mut m = mech.raw();
        // SAFETY: the mechanism lives for the call.
        rv_ok(unsafe { init(session, &mut m, key) })?;
        // SAFETY: both buffers are only read.
        rv_ok(unsafe {
            verify(
                session,
                data.as_ptr() as *mut u8,
                data.len() as CK_ULONG,
                signature.as_ptr() as *mut u8,
                signature.len() as CK_ULONG,
            )
        })
    }
}

impl Backend {
    /// The device's MBK as `CSSIM_GetMbkInfo` reports it for `slot`: None when the backend has no device
    /// MBK interface; `loaded` false when the device holds no MBK.
    pub fn device_mbk_info(&self, slot: CK_SLOT_ID) -> Result<Option<crate::backend::DeviceMbkInfo>> {
        let Some(get) = self.device_mbk.and_then(|d| d.get_info) else { return Ok(None) };
        let mut info = crate::backend::DeviceMbkInfo::default();
        // SAFETY: a valid out pointer to a struct of the interface's layout.
        rv_ok(unsafe { get(slot, &mut info) })?;
        Ok(Some(info))
    }

    /// The key's blob under the device's MBK (`CSSIM_BackupKey`): encrypted and MAC'd inside the device,
    /// with all the key's attributes.
    pub fn device_backup(&self, session: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> Result<Vec<u8>> {
        let backup = self.device_mbk.and_then(|d| d.backup_key).ok_or(Error::Rv(CKR_FUNCTION_NOT_SUPPORTED))?;
        let mut len: CK_ULONG = 0;
        // SAFETY: NULL output asks for the length.
        rv_ok(unsafe { backup(session, key, std::ptr::null_mut(), &mut len) })?;
        let mut out = vec![0u8; len as usize];
        // SAFETY: room for `len` bytes.
        rv_ok(unsafe { backup(session, key, out.as_mut_ptr(), &mut len) })?;
        out.truncate(len as usize);
        Ok(out)
    }

    /// Makes the object a device blob holds, with exactly its attributes, as a session object of `session`
    /// or a token object (`CSSIM_RestoreKey`). A blob of another MBK or a damaged one creates nothing.
    pub fn device_restore(&self, session: CK_SESSION_HANDLE, blob: &[u8], token: bool) -> Result<CK_OBJECT_HANDLE> {
        let restore = self.device_mbk.and_then(|d| d.restore_key).ok_or(Error::Rv(CKR_FUNCTION_NOT_SUPPORTED))?;
        let template = Template(vec![Attr::bool(CKA_TOKEN, token)]);
        let mut raw = Raw::new(&template);
        let (p, n) = raw.ptr();
        let mut handle = 0;
        // SAFETY: every pointer refers to a value alive for the call; the blob is only read.
        rv_ok(unsafe { restore(session, blob.as_ptr() as *mut u8, blob.len() as CK_ULONG, p, n, &mut handle) })?;
        Ok(handle)
    }
}

/// A blank-padded PKCS#11 string field as text.
pub fn padded_text(field: &[CK_UTF8CHAR]) -> String {
    String::from_utf8_lossy(field).trim_end_matches([' ', '\0']).to_string()
}
