//! The PKCS#11 functions on safe types. [`crate::ffi`] turns the C arguments into these and the results back.
//!
//! Locking: one module lock ([`Inner`]: tokens, sessions, logins, handles) held only for look-ups and changes,
//! never during cryptography or fault latency; each session has its own lock for its operations, taken after
//! the module lock and never before it.

use crate::config::{Config, Mode};
use crate::faults::Faults;
use crate::log::Log;
use crate::mbk::blob::{self, BlobError};
use crate::mbk::{Fingerprint, Mbk, CKR_CSSIM_BLOB_FORMAT, CKR_CSSIM_BLOB_MAC, CKR_CSSIM_NO_MBK, CKR_CSSIM_WRONG_MBK};
use crate::mech::{self, aes, ec, rsa, Cipher, HashAlg, Key, Mechanism, Param, Signer};
use crate::object::{check_shape, template_bytes, template_get, template_ulong, Attr, Object, Origin, Template};
use crate::session::{Find, Op, Session};
use crate::store::{Store, TokenState};
use crate::token::{self, PinHash, MANUFACTURER};
use crate::Result;
use cryptoki_sys::*;
use rand::RngCore;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use zeroize::Zeroizing;

/// The initialized module, if any.
static MODULE: RwLock<Option<Arc<Module>>> = RwLock::new(None);

/// The module of this process (a forked child must call C_Initialize again).
pub fn get() -> Result<Arc<Module>> {
    let guard = MODULE.read().unwrap_or_else(PoisonError::into_inner);
    match guard.as_ref() {
        Some(m) if m.pid == std::process::id() => Ok(m.clone()),
        _ => Err(CKR_CRYPTOKI_NOT_INITIALIZED),
    }
}

/// C_Initialize: reads the configuration and the state file.
pub fn initialize() -> Result<()> {
    let mut guard = MODULE.write().unwrap_or_else(PoisonError::into_inner);
    if guard.as_ref().is_some_and(|m| m.pid == std::process::id()) {
        return Err(CKR_CRYPTOKI_ALREADY_INITIALIZED);
    }
    let module = Module::new().map_err(|e| {
        // The one line a library may print on its own: a set-up error the caller cannot see otherwise.
        eprintln!("cssim: {e}");
        CKR_GENERAL_ERROR
    })?;
    *guard = Some(Arc::new(module));
    Ok(())
}

/// C_Finalize.
pub fn finalize() -> Result<()> {
    let mut guard = MODULE.write().unwrap_or_else(PoisonError::into_inner);
    match guard.as_ref() {
        Some(m) if m.pid == std::process::id() => {
            *guard = None;
            Ok(())
        }
        _ => Err(CKR_CRYPTOKI_NOT_INITIALIZED),
    }
}

/// An output of the length-query protocol (PKCS#11 2.40 §5.2).
#[derive(Debug)]
pub enum Out {
    /// The output; it fits the caller's buffer.
    Done(Vec<u8>),
    /// The caller asked for the length (NULL buffer); the operation goes on.
    Query(usize),
    /// The caller's buffer is too small; the operation goes on.
    TooSmall(usize),
}

/// Delivers an output computed once: a length query or a too-small buffer keeps it for the next call.
fn produce(
    pending: &mut Option<Zeroizing<Vec<u8>>>,
    capacity: Option<usize>,
    compute: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<Out> {
    let data = match pending.take() {
        Some(d) => d,
        None => Zeroizing::new(compute()?),
    };
    match capacity {
        None => {
            let n = data.len();
            *pending = Some(data);
            Ok(Out::Query(n))
        }
        Some(c) if c < data.len() => {
            let n = data.len();
            *pending = Some(data);
            Ok(Out::TooSmall(n))
        }
        Some(_) => Ok(Out::Done(data.to_vec())),
    }
}

/// Ends the operation in `slot` unless the output is still to be delivered.
fn settle<T>(slot: &mut Option<T>, r: &Result<Out>) {
    if matches!(r, Ok(Out::Done(_)) | Err(_)) {
        *slot = None;
    }
}

/// Where an object handle points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjRef {
    Token { slot: usize, uid: u64 },
    Session,
}

struct SessionObject {
    slot: usize,
    session: CK_SESSION_HANDLE,
    object: Object,
}

struct Inner {
    store: Store,
    sessions: HashMap<CK_SESSION_HANDLE, Arc<Session>>,
    next_session: CK_SESSION_HANDLE,
    /// Who is logged in to each slot (per process, as with a real HSM's application login).
    login: Vec<Option<CK_USER_TYPE>>,
    handles: HashMap<CK_OBJECT_HANDLE, ObjRef>,
    token_handles: HashMap<(usize, u64), CK_OBJECT_HANDLE>,
    session_objects: HashMap<CK_OBJECT_HANDLE, SessionObject>,
    next_handle: CK_OBJECT_HANDLE,
}

pub struct Module {
    pid: u32,
    pub config: Config,
    pub faults: Faults,
    pub log: Log,
    inner: Mutex<Inner>,
}

impl Module {
    fn new() -> std::result::Result<Module, String> {
        let config = Config::from_env()?;
        let log = Log::open(config.log_file.as_deref())
            .map_err(|e| format!("log file {}: {e}", config.log_file.as_ref().unwrap().display()))?;
        let mut store = Store::open(&config.state, config.faults.crash_during_write)?;
        // Pre-initialized tokens of the configuration, unless the state already has them.
        let missing: Vec<usize> = (0..config.slots.len())
            .filter(|i| config.slots[*i].so_pin.is_some() && !store.state.tokens.contains_key(i))
            .collect();
        if !missing.is_empty() {
            store
                .mutate(|state| {
                    for i in &missing {
                        let slot = &config.slots[*i];
                        state.tokens.entry(*i).or_insert_with(|| TokenState {
                            label: slot.label.clone().unwrap_or_default(),
                            serial: token::serial(*i),
                            so_pin: PinHash::new(slot.so_pin.as_deref().unwrap_or_default().as_bytes()),
                            user_pin: slot.user_pin.as_ref().map(|p| PinHash::new(p.as_bytes())),
                            objects: Default::default(),
                        });
                    }
                    Ok(())
                })
                .map_err(|rv| format!("writing {}: CK_RV {rv:#x}", config.state.display()))?;
        }
        log.line(&format!(
            "initialized: mode {}, {} slot(s), state {}",
            config.mode.name(),
            config.slots.len(),
            config.state.display()
        ));
        let slots = config.slots.len();
        Ok(Module {
            pid: std::process::id(),
            faults: Faults::new(config.faults.clone()),
            config,
            log,
            inner: Mutex::new(Inner {
                store,
                sessions: HashMap::new(),
                next_session: 1,
                login: vec![None; slots],
                handles: HashMap::new(),
                token_handles: HashMap::new(),
                session_objects: HashMap::new(),
                next_handle: 1,
            }),
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn mode(&self) -> Mode {
        self.config.mode
    }

    /// Runs the fault machinery for one call of `function` (after C_Initialize).
    pub fn before(&self, function: &'static str) -> Result<()> {
        let (verdict, note) = self.faults.on_call(function);
        if let Some(note) = note {
            self.log.line(&note);
        }
        if verdict.invalidate_sessions || verdict.removed_now {
            let mut inner = self.inner();
            let all: Vec<_> = inner.sessions.keys().copied().collect();
            for h in all {
                inner.remove_session(h);
            }
        }
        if let Some(rv) = verdict.fail {
            return Err(rv);
        }
        if verdict.removed {
            return match function {
                "C_Finalize" | "C_GetInfo" | "C_GetSlotList" | "C_GetSlotInfo" => Ok(()),
                "C_GetTokenInfo" => Err(CKR_TOKEN_NOT_PRESENT),
                _ => Err(CKR_DEVICE_REMOVED),
            };
        }
        Ok(())
    }

    /// Ends the operation of session `h` that `function` (C_SignUpdate, C_Encrypt, …) belongs to: the call
    /// failed before it ran (a fault).
    pub fn end_operation(&self, h: CK_SESSION_HANDLE, function: &str) {
        let Ok(session) = self.inner().session(h) else { return };
        let mut ops = session.ops();
        let kind = function.trim_start_matches("C_");
        if kind.starts_with("Encrypt") {
            ops.encrypt = None;
        } else if kind.starts_with("Decrypt") {
            ops.decrypt = None;
        } else if kind.starts_with("Sign") {
            ops.sign = None;
        } else if kind.starts_with("Verify") {
            ops.verify = None;
        } else if kind.starts_with("Digest") {
            ops.digest = None;
        }
    }

    fn slot(&self, id: CK_SLOT_ID) -> Result<usize> {
        let i = usize::try_from(id).map_err(|_| CKR_SLOT_ID_INVALID)?;
        if i < self.config.slots.len() {
            Ok(i)
        } else {
            Err(CKR_SLOT_ID_INVALID)
        }
    }

    fn refuse(&self, message: &str) -> CK_RV {
        self.log.line(message);
        CKR_ACTION_PROHIBITED
    }

    // --- General, slots and tokens (PKCS#11 2.40 §5.4–5.5) ---

    pub fn info(&self) -> CK_INFO {
        CK_INFO {
            cryptokiVersion: CK_VERSION { major: 2, minor: 40 },
            manufacturerID: token::padded(MANUFACTURER),
            flags: 0,
            libraryDescription: token::padded("CryptoServer simulator (cssim)"),
            libraryVersion: CK_VERSION { major: 0, minor: 1 },
        }
    }

    pub fn slot_list(&self, token_present: bool) -> Vec<CK_SLOT_ID> {
        if token_present && self.faults.removed() {
            return Vec::new();
        }
        (0..self.config.slots.len() as CK_SLOT_ID).collect()
    }

    pub fn slot_info(&self, id: CK_SLOT_ID) -> Result<CK_SLOT_INFO> {
        let slot = self.slot(id)?;
        Ok(CK_SLOT_INFO {
            slotDescription: token::padded(&token::slot_name(slot)),
            manufacturerID: token::padded(MANUFACTURER),
            flags: if self.faults.removed() { 0 } else { CKF_TOKEN_PRESENT },
            hardwareVersion: CK_VERSION { major: 5, minor: 0 },
            firmwareVersion: CK_VERSION { major: 5, minor: 0 },
        })
    }

    pub fn token_info(&self, id: CK_SLOT_ID) -> Result<CK_TOKEN_INFO> {
        let slot = self.slot(id)?;
        let mut inner = self.inner();
        inner.store.refresh()?;
        let token = inner.store.state.tokens.get(&slot);
        let mut flags = CKF_RNG | CKF_LOGIN_REQUIRED | CKF_RESTORE_KEY_NOT_NEEDED;
        if token.is_some() {
            flags |= CKF_TOKEN_INITIALIZED;
        }
        if token.is_some_and(|t| t.user_pin.is_some()) {
            flags |= CKF_USER_PIN_INITIALIZED;
        }
        let sessions = inner.sessions.values().filter(|s| s.slot == slot);
        let (all, rw) = sessions.fold((0, 0), |(a, r), s| (a + 1, r + s.rw as CK_ULONG));
        Ok(CK_TOKEN_INFO {
            label: token::padded(token.map_or("", |t| t.label.as_str())),
            manufacturerID: token::padded(MANUFACTURER),
            model: token::padded(&format!("CSSIM {}", self.mode().name())),
            serialNumber: token::padded(&token.map_or_else(|| token::serial(slot), |t| t.serial.clone())),
            flags,
            ulMaxSessionCount: CK_EFFECTIVELY_INFINITE,
            ulSessionCount: all,
            ulMaxRwSessionCount: CK_EFFECTIVELY_INFINITE,
            ulRwSessionCount: rw,
            ulMaxPinLen: token::MAX_PIN_LEN as CK_ULONG,
            ulMinPinLen: token::MIN_PIN_LEN as CK_ULONG,
            ulTotalPublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulTotalPrivateMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePrivateMemory: CK_UNAVAILABLE_INFORMATION,
            hardwareVersion: CK_VERSION { major: 5, minor: 0 },
            firmwareVersion: CK_VERSION { major: 5, minor: 0 },
            utcTime: [b' '; 16],
        })
    }

    pub fn mechanism_list(&self, id: CK_SLOT_ID) -> Result<Vec<CK_MECHANISM_TYPE>> {
        self.slot(id)?;
        Ok(mech::MECHANISMS.iter().map(|m| m.0).collect())
    }

    pub fn mechanism_info(&self, id: CK_SLOT_ID, ty: CK_MECHANISM_TYPE) -> Result<CK_MECHANISM_INFO> {
        self.slot(id)?;
        let m = mech::MECHANISMS.iter().find(|m| m.0 == ty).ok_or(CKR_MECHANISM_INVALID)?;
        Ok(CK_MECHANISM_INFO { ulMinKeySize: m.1, ulMaxKeySize: m.2, flags: m.3 })
    }

    /// C_InitToken: a new token (or a re-initialized one: all its objects and its user PIN are gone).
    pub fn init_token(&self, id: CK_SLOT_ID, so_pin: &[u8], label: &[u8; 32]) -> Result<()> {
        let slot = self.slot(id)?;
        token::check_pin_len(so_pin)?;
        let mut inner = self.inner();
        if inner.sessions.values().any(|s| s.slot == slot) {
            return Err(CKR_SESSION_EXISTS);
        }
        let label = token::unpadded(label);
        inner.store.mutate(|state| {
            if let Some(t) = state.tokens.get(&slot) {
                if !t.so_pin.verify(so_pin) {
                    return Err(CKR_PIN_INCORRECT);
                }
            }
            state.tokens.insert(
                slot,
                TokenState {
                    label,
                    serial: token::serial(slot),
                    so_pin: PinHash::new(so_pin),
                    user_pin: None,
                    objects: Default::default(),
                },
            );
            Ok(())
        })?;
        inner.login[slot] = None;
        Ok(())
    }

    pub fn init_pin(&self, h: CK_SESSION_HANDLE, pin: &[u8]) -> Result<()> {
        let mut inner = self.inner();
        let s = inner.session(h)?;
        if inner.login[s.slot] != Some(CKU_SO) {
            return Err(CKR_USER_NOT_LOGGED_IN);
        }
        if !s.rw {
            return Err(CKR_SESSION_READ_ONLY);
        }
        token::check_pin_len(pin)?;
        inner.store.mutate(|state| {
            state.tokens.get_mut(&s.slot).ok_or(CKR_TOKEN_NOT_RECOGNIZED)?.user_pin = Some(PinHash::new(pin));
            Ok(())
        })
    }

    pub fn set_pin(&self, h: CK_SESSION_HANDLE, old: &[u8], new: &[u8]) -> Result<()> {
        let mut inner = self.inner();
        let s = inner.session(h)?;
        if !s.rw {
            return Err(CKR_SESSION_READ_ONLY);
        }
        let so = inner.login[s.slot] == Some(CKU_SO);
        token::check_pin_len(new)?;
        inner.store.mutate(|state| {
            let t = state.tokens.get_mut(&s.slot).ok_or(CKR_TOKEN_NOT_RECOGNIZED)?;
            let pin = if so { Some(&mut t.so_pin) } else { t.user_pin.as_mut() };
            let pin = pin.ok_or(CKR_USER_PIN_NOT_INITIALIZED)?;
            if !pin.verify(old) {
                return Err(CKR_PIN_INCORRECT);
            }
            *pin = PinHash::new(new);
            Ok(())
        })
    }

    // --- Sessions (§5.6) ---

    pub fn open_session(&self, id: CK_SLOT_ID, flags: CK_FLAGS) -> Result<CK_SESSION_HANDLE> {
        let slot = self.slot(id)?;
        if flags & CKF_SERIAL_SESSION == 0 {
            return Err(CKR_SESSION_PARALLEL_NOT_SUPPORTED);
        }
        let rw = flags & CKF_RW_SESSION != 0;
        let mut inner = self.inner();
        inner.store.refresh()?;
        if !inner.store.state.tokens.contains_key(&slot) {
            return Err(CKR_TOKEN_NOT_RECOGNIZED);
        }
        if !rw && inner.login[slot] == Some(CKU_SO) {
            return Err(CKR_SESSION_READ_WRITE_SO_EXISTS);
        }
        let h = inner.next_session;
        inner.next_session += 1;
        inner.sessions.insert(h, Arc::new(Session::new(slot, rw)));
        Ok(h)
    }

    pub fn close_session(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        let mut inner = self.inner();
        inner.session(h)?;
        inner.remove_session(h);
        Ok(())
    }

    pub fn close_all_sessions(&self, id: CK_SLOT_ID) -> Result<()> {
        let slot = self.slot(id)?;
        let mut inner = self.inner();
        let of_slot: Vec<_> = inner.sessions.iter().filter(|(_, s)| s.slot == slot).map(|(h, _)| *h).collect();
        for h in of_slot {
            inner.remove_session(h);
        }
        inner.login[slot] = None;
        Ok(())
    }

    pub fn session_info(&self, h: CK_SESSION_HANDLE) -> Result<CK_SESSION_INFO> {
        let inner = self.inner();
        let s = inner.session(h)?;
        let state = match (inner.login[s.slot], s.rw) {
            (Some(CKU_SO), _) => CKS_RW_SO_FUNCTIONS,
            (Some(_), true) => CKS_RW_USER_FUNCTIONS,
            (Some(_), false) => CKS_RO_USER_FUNCTIONS,
            (None, true) => CKS_RW_PUBLIC_SESSION,
            (None, false) => CKS_RO_PUBLIC_SESSION,
        };
        let flags = CKF_SERIAL_SESSION | if s.rw { CKF_RW_SESSION } else { 0 };
        Ok(CK_SESSION_INFO { slotID: s.slot as CK_SLOT_ID, state, flags, ulDeviceError: 0 })
    }

    pub fn login(&self, h: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: &[u8]) -> Result<()> {
        let mut inner = self.inner();
        let s = inner.session(h)?;
        inner.store.refresh()?;
        let current = inner.login[s.slot];
        let token = inner.store.state.tokens.get(&s.slot).ok_or(CKR_TOKEN_NOT_RECOGNIZED)?;
        match user {
            CKU_SO => {
                match current {
                    Some(CKU_SO) => return Err(CKR_USER_ALREADY_LOGGED_IN),
                    Some(_) => return Err(CKR_USER_ANOTHER_ALREADY_LOGGED_IN),
                    None => {}
                }
                if inner.sessions.values().any(|o| o.slot == s.slot && !o.rw) {
                    return Err(CKR_SESSION_READ_ONLY_EXISTS);
                }
                if !token.so_pin.verify(pin) {
                    return Err(CKR_PIN_INCORRECT);
                }
            }
            CKU_USER => {
                match current {
                    Some(CKU_USER) => return Err(CKR_USER_ALREADY_LOGGED_IN),
                    Some(_) => return Err(CKR_USER_ANOTHER_ALREADY_LOGGED_IN),
                    None => {}
                }
                let pin_hash = token.user_pin.as_ref().ok_or(CKR_USER_PIN_NOT_INITIALIZED)?;
                if !pin_hash.verify(pin) {
                    return Err(CKR_PIN_INCORRECT);
                }
            }
            CKU_CONTEXT_SPECIFIC => {
                // Authorizes one use of a CKA_ALWAYS_AUTHENTICATE key (2.40 §4.9): the operation initialized
                // last that waits for it; the login state of the session does not change.
                let mut ops = s.ops();
                let wait = ops.awaiting_login().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
                if current != Some(CKU_USER) {
                    return Err(CKR_USER_NOT_LOGGED_IN);
                }
                let pin_hash = token.user_pin.as_ref().ok_or(CKR_USER_PIN_NOT_INITIALIZED)?;
                if !pin_hash.verify(pin) {
                    return Err(CKR_PIN_INCORRECT);
                }
                *wait = None;
                return Ok(());
            }
            _ => return Err(CKR_USER_TYPE_INVALID),
        }
        inner.login[s.slot] = Some(user);
        Ok(())
    }

    pub fn logout(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        let mut inner = self.inner();
        let s = inner.session(h)?;
        if inner.login[s.slot].is_none() {
            return Err(CKR_USER_NOT_LOGGED_IN);
        }
        inner.logout_slot(s.slot);
        Ok(())
    }

    // --- Objects (§5.7) ---

    pub fn create_object(&self, h: CK_SESSION_HANDLE, template: &Template) -> Result<CK_OBJECT_HANDLE> {
        let mut inner = self.inner();
        let s = inner.session(h)?;
        let is_so = inner.login[s.slot] == Some(CKU_SO);
        let class = template_ulong(template, CKA_CLASS)?;
        if self.mode().fips() && matches!(class, Some(CKO_SECRET_KEY | CKO_PRIVATE_KEY)) {
            let what = if class == Some(CKO_SECRET_KEY) { "secret" } else { "private" };
            return Err(self.refuse(&format!("FIPS: clear-text import of {what} key refused (rule fips.import_clear)")));
        }
        let mut obj = Object::build(template, Vec::new(), Origin::Create, is_so)?;
        mech::check_material(&obj)?;
        add_check_value(&mut obj, template_bytes(template, CKA_CHECK_VALUE))?;
        inner.insert(self, h, &s, vec![obj]).map(|v| v[0])
    }

    pub fn copy_object(
        &self,
        h: CK_SESSION_HANDLE,
        obj: CK_OBJECT_HANDLE,
        template: &Template,
    ) -> Result<CK_OBJECT_HANDLE> {
        let mut inner = self.inner();
        let s = inner.session(h)?;
        let is_so = inner.login[s.slot] == Some(CKU_SO);
        let (_, original) = inner.resolve(&s, obj, CKR_OBJECT_HANDLE_INVALID)?;
        let copy = original.copy_with(template, is_so)?;
        inner.insert(self, h, &s, vec![copy]).map(|v| v[0])
    }

    pub fn destroy_object(&self, h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE) -> Result<()> {
        let mut inner = self.inner();
        let s = inner.session(h)?;
        let (at, object) = inner.resolve(&s, obj, CKR_OBJECT_HANDLE_INVALID)?;
        if object.is_token() && !s.rw {
            return Err(CKR_SESSION_READ_ONLY);
        }
        if !object.bool(CKA_DESTROYABLE) {
            return Err(CKR_ACTION_PROHIBITED);
        }
        match at {
            ObjRef::Token { slot, uid } => inner.store.mutate(|state| {
                let t = state.tokens.get_mut(&slot).ok_or(CKR_OBJECT_HANDLE_INVALID)?;
                t.objects.remove(&uid).map(|_| ()).ok_or(CKR_OBJECT_HANDLE_INVALID)
            })?,
            ObjRef::Session => {
                inner.session_objects.remove(&obj);
            }
        }
        inner.handles.remove(&obj);
        Ok(())
    }

    pub fn object_size(&self, h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE) -> Result<usize> {
        let mut inner = self.inner();
        let s = inner.session(h)?;
        Ok(inner.resolve(&s, obj, CKR_OBJECT_HANDLE_INVALID)?.1.size())
    }

    /// C_GetAttributeValue: per requested type, the value or why it cannot be read (CKR_ATTRIBUTE_SENSITIVE,
    /// CKR_ATTRIBUTE_TYPE_INVALID).
    pub fn attribute_values(
        &self,
        h: CK_SESSION_HANDLE,
        obj: CK_OBJECT_HANDLE,
        types: &[CK_ATTRIBUTE_TYPE],
    ) -> Result<Vec<Result<Attr>>> {
        let object = {
            let mut inner = self.inner();
            let s = inner.session(h)?;
            inner.resolve(&s, obj, CKR_OBJECT_HANDLE_INVALID)?.1
        };
        Ok(types
            .iter()
            .map(|ty| {
                let value = object.attrs.get(ty).ok_or(CKR_ATTRIBUTE_TYPE_INVALID)?;
                if object.is_sensitive(*ty) {
                    return Err(CKR_ATTRIBUTE_SENSITIVE);
                }
                if self.mode().fips() && object.is_secret_component(*ty) {
                    self.log.line("FIPS: clear-text export of a key component refused (rule fips.export_clear)");
                    return Err(CKR_ATTRIBUTE_SENSITIVE);
                }
                Ok(value.clone())
            })
            .collect())
    }

    pub fn set_attribute_values(&self, h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE, template: &Template) -> Result<()> {
        let mut inner = self.inner();
        let s = inner.session(h)?;
        let is_so = inner.login[s.slot] == Some(CKU_SO);
        let (at, object) = inner.resolve(&s, obj, CKR_OBJECT_HANDLE_INVALID)?;
        if object.is_token() && !s.rw {
            return Err(CKR_SESSION_READ_ONLY);
        }
        let mut changed = object.clone();
        changed.apply_changes(template, is_so)?;
        match at {
            ObjRef::Token { slot, uid } => {
                let cc = self.mode() == Mode::Cc;
                let r = inner.store.mutate(|state| {
                    let t = state.tokens.get_mut(&slot).ok_or(CKR_OBJECT_HANDLE_INVALID)?;
                    let current = t.objects.get_mut(&uid).ok_or(CKR_OBJECT_HANDLE_INVALID)?;
                    current.apply_changes(template, is_so)?;
                    let current = current.clone();
                    if cc && collides(t, &current, Some(uid)) {
                        return Err(CKR_ACTION_PROHIBITED);
                    }
                    Ok(())
                });
                if r == Err(CKR_ACTION_PROHIBITED) && cc && object.bool(CKA_MODIFIABLE) {
                    self.log.line("CC: overwriting key (same class, label and id) refused (rule cc.no_overwrite)");
                }
                r
            }
            ObjRef::Session => {
                if let Some(so) = inner.session_objects.get_mut(&obj) {
                    so.object = changed;
                }
                Ok(())
            }
        }
    }

    pub fn find_init(&self, h: CK_SESSION_HANDLE, template: &Template) -> Result<()> {
        let mut inner = self.inner();
        let s = inner.session(h)?;
        if s.ops().find.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        inner.store.refresh()?;
        let user = inner.login[s.slot] == Some(CKU_USER);
        let mut found = Vec::new();
        let token_uids: Vec<u64> = inner
            .store
            .state
            .tokens
            .get(&s.slot)
            .map(|t| {
                t.objects
                    .iter()
                    .filter(|(_, o)| (user || !o.is_private()) && o.matches(template))
                    .map(|(u, _)| *u)
                    .collect()
            })
            .unwrap_or_default();
        for uid in token_uids {
            found.push(inner.token_handle(s.slot, uid));
        }
        found.extend(
            inner
                .session_objects
                .iter()
                .filter(|(_, so)| so.slot == s.slot && (user || !so.object.is_private()) && so.object.matches(template))
                .map(|(h, _)| *h),
        );
        found.sort_unstable();
        s.ops().find = Some(Find { handles: found, pos: 0 });
        Ok(())
    }

    pub fn find(&self, h: CK_SESSION_HANDLE, max: usize) -> Result<Vec<CK_OBJECT_HANDLE>> {
        let s = self.inner().session(h)?;
        let mut ops = s.ops();
        let f = ops.find.as_mut().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        let end = (f.pos + max).min(f.handles.len());
        let out = f.handles[f.pos..end].to_vec();
        f.pos = end;
        Ok(out)
    }

    pub fn find_final(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        let s = self.inner().session(h)?;
        let mut ops = s.ops();
        ops.find.take().map(|_| ()).ok_or(CKR_OPERATION_NOT_INITIALIZED)
    }

    // --- Encryption and decryption (§5.8–5.9) ---

    /// The session and the parsed key for an operation that needs `usage` on the key.
    fn op_key(
        &self,
        h: CK_SESSION_HANDLE,
        mechanism: &Mechanism,
        key: CK_OBJECT_HANDLE,
        usage: CK_ATTRIBUTE_TYPE,
        invalid: CK_RV,
    ) -> Result<(Arc<Session>, Object)> {
        let mut inner = self.inner();
        let s = inner.session(h)?;
        let object = inner.key(&s, key, mechanism.ty, usage, invalid)?;
        Ok((s, object))
    }

    pub fn encrypt_init(
        &self,
        h: CK_SESSION_HANDLE,
        mechanism: &Mechanism,
        key: CK_OBJECT_HANDLE,
        encrypt: bool,
    ) -> Result<()> {
        let (flag, usage) = if encrypt { (CKF_ENCRYPT, CKA_ENCRYPT) } else { (CKF_DECRYPT, CKA_DECRYPT) };
        mech::require(mechanism.ty, flag)?;
        let (s, object) = self.op_key(h, mechanism, key, usage, CKR_KEY_HANDLE_INVALID)?;
        {
            let ops = s.ops();
            if if encrypt { ops.encrypt.is_some() } else { ops.decrypt.is_some() } {
                return Err(CKR_OPERATION_ACTIVE);
            }
        }
        let cipher = Cipher::new(mechanism, Key::from_object(&object)?, encrypt)?;
        let mut ops = s.ops();
        let mut op = Op::new(cipher);
        if object.bool(CKA_ALWAYS_AUTHENTICATE) {
            op.awaiting_login = ops.await_login();
        }
        let slot = if encrypt { &mut ops.encrypt } else { &mut ops.decrypt };
        *slot = Some(op);
        Ok(())
    }

    /// C_Encrypt/C_Decrypt (`part`: None), C_EncryptUpdate/C_DecryptUpdate (Some(data)), …Final (`finish`).
    pub fn crypt(&self, h: CK_SESSION_HANDLE, encrypt: bool, step: Step<'_>, capacity: Option<usize>) -> Result<Out> {
        let s = self.inner().session(h)?;
        let mut ops = s.ops();
        let slot = if encrypt { &mut ops.encrypt } else { &mut ops.decrypt };
        let op = slot.as_mut().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        if op.awaiting_login.is_some() {
            // As SoftHSM2: every step, a length query included, ends the operation.
            *slot = None;
            return Err(CKR_USER_NOT_LOGGED_IN);
        }
        let r = produce(&mut op.pending, capacity, || match step {
            Step::Single(data) => op.state.single(data),
            Step::Update(data) => op.state.update(data),
            Step::Final => op.state.finish(),
        });
        if matches!(step, Step::Update(_)) {
            if r.is_err() {
                *slot = None;
            }
        } else {
            settle(slot, &r);
        }
        r
    }

    // --- Digests (§5.10) ---

    pub fn digest_init(&self, h: CK_SESSION_HANDLE, mechanism: &Mechanism) -> Result<()> {
        mech::require(mechanism.ty, CKF_DIGEST)?;
        let hash = HashAlg::from_digest_mechanism(mechanism.ty).ok_or(CKR_MECHANISM_INVALID)?;
        let s = self.inner().session(h)?;
        let mut ops = s.ops();
        if ops.digest.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        ops.digest = Some(Op::new(hash.hasher()));
        Ok(())
    }

    pub fn digest(&self, h: CK_SESSION_HANDLE, step: Step<'_>, capacity: Option<usize>) -> Result<Out> {
        let s = self.inner().session(h)?;
        let mut ops = s.ops();
        let op = ops.digest.as_mut().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        let r = match step {
            Step::Update(data) => {
                op.state.update(data);
                return Ok(Out::Done(Vec::new()));
            }
            Step::Single(data) => produce(&mut op.pending, capacity, || {
                let mut hasher = op.state.clone();
                hasher.update(data);
                Ok(hasher.finish())
            }),
            Step::Final => produce(&mut op.pending, capacity, || Ok(op.state.clone().finish())),
        };
        settle(&mut ops.digest, &r);
        r
    }

    pub fn digest_key(&self, h: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> Result<()> {
        let (s, object) = {
            let mut inner = self.inner();
            let s = inner.session(h)?;
            let object = inner.resolve(&s, key, CKR_KEY_HANDLE_INVALID)?.1;
            (s, object)
        };
        if object.class() != CKO_SECRET_KEY {
            return Err(CKR_KEY_INDIGESTIBLE);
        }
        let mut ops = s.ops();
        let op = ops.digest.as_mut().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        op.state.update(object.get(CKA_VALUE).unwrap_or_default());
        Ok(())
    }

    // --- Signatures (§5.11–5.12) ---

    pub fn sign_init(
        &self,
        h: CK_SESSION_HANDLE,
        mechanism: &Mechanism,
        key: CK_OBJECT_HANDLE,
        sign: bool,
    ) -> Result<()> {
        let (flag, usage) = if sign { (CKF_SIGN, CKA_SIGN) } else { (CKF_VERIFY, CKA_VERIFY) };
        mech::require(mechanism.ty, flag)?;
        let (s, object) = self.op_key(h, mechanism, key, usage, CKR_KEY_HANDLE_INVALID)?;
        {
            let ops = s.ops();
            if if sign { ops.sign.is_some() } else { ops.verify.is_some() } {
                return Err(CKR_OPERATION_ACTIVE);
            }
        }
        let signer = Signer::new(mechanism, Key::from_object(&object)?, sign)?;
        let mut ops = s.ops();
        if sign {
            let mut op = Op::new(signer);
            if object.bool(CKA_ALWAYS_AUTHENTICATE) {
                op.awaiting_login = ops.await_login();
            }
            ops.sign = Some(op);
        } else {
            ops.verify = Some(signer);
        }
        Ok(())
    }

    pub fn sign(&self, h: CK_SESSION_HANDLE, step: Step<'_>, capacity: Option<usize>) -> Result<Out> {
        let s = self.inner().session(h)?;
        let mut ops = s.ops();
        let op = ops.sign.as_mut().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        if op.awaiting_login.is_some() {
            // As SoftHSM2: every step, a length query included, ends the operation.
            ops.sign = None;
            return Err(CKR_USER_NOT_LOGGED_IN);
        }
        let r = match step {
            Step::Update(data) => {
                op.state.update(data);
                return Ok(Out::Done(Vec::new()));
            }
            Step::Single(data) => produce(&mut op.pending, capacity, || {
                op.state.update(data);
                op.state.sign()
            }),
            Step::Final => produce(&mut op.pending, capacity, || op.state.sign()),
        };
        settle(&mut ops.sign, &r);
        r
    }

    /// C_Verify (`data`: Some) or C_VerifyFinal; C_VerifyUpdate is [`Module::verify_update`].
    pub fn verify(&self, h: CK_SESSION_HANDLE, data: Option<&[u8]>, signature: &[u8]) -> Result<()> {
        let s = self.inner().session(h)?;
        let mut ops = s.ops();
        let mut signer = ops.verify.take().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        if let Some(data) = data {
            signer.update(data);
        }
        signer.verify(signature)
    }

    pub fn verify_update(&self, h: CK_SESSION_HANDLE, data: &[u8]) -> Result<()> {
        let s = self.inner().session(h)?;
        let mut ops = s.ops();
        ops.verify.as_mut().ok_or(CKR_OPERATION_NOT_INITIALIZED)?.update(data);
        Ok(())
    }

    // --- Keys (§5.14) ---

    pub fn generate_key(
        &self,
        h: CK_SESSION_HANDLE,
        mechanism: &Mechanism,
        template: &Template,
    ) -> Result<CK_OBJECT_HANDLE> {
        mech::require(mechanism.ty, CKF_GENERATE)?;
        let (key_type, range) = match mechanism.ty {
            CKM_AES_KEY_GEN => (CKK_AES, 16..=32),
            _ => (CKK_GENERIC_SECRET, 1..=512),
        };
        let s = self.inner().session(h)?;
        let is_so = self.inner().login[s.slot] == Some(CKU_SO);
        let len = template_ulong(template, CKA_VALUE_LEN)?.ok_or(CKR_TEMPLATE_INCOMPLETE)? as usize;
        if !range.contains(&len) || (key_type == CKK_AES && !len.is_multiple_of(8)) {
            return Err(CKR_KEY_SIZE_RANGE);
        }
        let mut value = Zeroizing::new(vec![0u8; len]);
        rand::rngs::OsRng.fill_bytes(&mut value);
        let material = vec![
            (CKA_CLASS, Attr::ulong(CKO_SECRET_KEY)),
            (CKA_KEY_TYPE, Attr::ulong(key_type)),
            (CKA_VALUE, Attr::bytes(value.to_vec())),
        ];
        let mut obj = Object::build(template, material, Origin::Generate(mechanism.ty), is_so)?;
        add_check_value(&mut obj, None)?;
        self.inner().insert(self, h, &s, vec![obj]).map(|v| v[0])
    }

    pub fn generate_key_pair(
        &self,
        h: CK_SESSION_HANDLE,
        mechanism: &Mechanism,
        public: &Template,
        private: &Template,
    ) -> Result<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)> {
        mech::require(mechanism.ty, CKF_GENERATE_KEY_PAIR)?;
        let s = self.inner().session(h)?;
        let is_so = self.inner().login[s.slot] == Some(CKU_SO);
        let (key_type, public_material, private_material) = match mechanism.ty {
            CKM_RSA_PKCS_KEY_PAIR_GEN => {
                let bits = template_ulong(public, CKA_MODULUS_BITS)?.ok_or(CKR_TEMPLATE_INCOMPLETE)? as usize;
                let exponent = template_bytes(public, CKA_PUBLIC_EXPONENT).unwrap_or(&[1, 0, 1]).to_vec();
                let key = rsa::generate(bits, &exponent)?;
                (CKK_RSA, rsa::public_material(&key.to_public_key()), rsa::private_material(&key))
            }
            _ => {
                let params = template_bytes(public, CKA_EC_PARAMS).ok_or(CKR_TEMPLATE_INCOMPLETE)?;
                let curve = ec::Curve::from_params(params).ok_or(CKR_CURVE_NOT_SUPPORTED)?;
                let key = ec::EcSecret::generate(curve);
                (CKK_EC, key.public().material(), key.material())
            }
        };
        let with = |class, mut m: Template| {
            m.insert(0, (CKA_CLASS, Attr::ulong(class)));
            m.insert(1, (CKA_KEY_TYPE, Attr::ulong(key_type)));
            m
        };
        let origin = Origin::Generate(mechanism.ty);
        let mut public_template = public.clone();
        if key_type == CKK_RSA {
            // The generated key's size wins; the request was checked above.
            public_template.retain(|(t, _)| *t != CKA_MODULUS_BITS);
        }
        let pub_obj = Object::build(&public_template, with(CKO_PUBLIC_KEY, public_material), origin, is_so)?;
        // The private key's CKA_EC_PARAMS come from the public template; a private template may repeat them.
        let priv_obj = Object::build(private, with(CKO_PRIVATE_KEY, private_material), origin, is_so)?;
        let handles = self.inner().insert(self, h, &s, vec![pub_obj, priv_obj])?;
        Ok((handles[0], handles[1]))
    }

    pub fn wrap_key(
        &self,
        h: CK_SESSION_HANDLE,
        mechanism: &Mechanism,
        wrapping: CK_OBJECT_HANDLE,
        key: CK_OBJECT_HANDLE,
    ) -> Result<Vec<u8>> {
        mech::require(mechanism.ty, CKF_WRAP)?;
        let (wrapping, target) = {
            let mut inner = self.inner();
            let s = inner.session(h)?;
            let w = inner.key(&s, wrapping, mechanism.ty, CKA_WRAP, CKR_WRAPPING_KEY_HANDLE_INVALID)?;
            let k = inner.resolve(&s, key, CKR_KEY_HANDLE_INVALID)?.1;
            (w, k)
        };
        if !target.is_secret() {
            return Err(CKR_KEY_NOT_WRAPPABLE);
        }
        if !target.bool(CKA_EXTRACTABLE) {
            return Err(CKR_KEY_UNEXTRACTABLE);
        }
        if target.bool(CKA_WRAP_WITH_TRUSTED) && !wrapping.bool(CKA_TRUSTED) {
            return Err(CKR_KEY_NOT_WRAPPABLE);
        }
        if let Some(Attr::Template(required)) = wrapping.attrs.get(&CKA_WRAP_TEMPLATE) {
            if !required.iter().all(|(ty, v)| target.attrs.get(ty) == Some(&Attr::Bytes(v.clone()))) {
                return Err(CKR_KEY_NOT_WRAPPABLE);
            }
        }
        if self.mode().fips() && !wrapping.bool(CKA_TRUSTED) {
            let what = if target.class() == CKO_SECRET_KEY { "secret" } else { "private" };
            return Err(self.refuse(&format!(
                "FIPS: export of {what} key under a wrapping key without CKA_TRUSTED refused (rule fips.export_untrusted)"
            )));
        }
        let plain = match Key::from_object(&target)? {
            Key::Secret { value, .. } => value,
            Key::RsaPrivate(k) => rsa::to_pkcs8(&k)?,
            Key::EcPrivate(k) => k.to_pkcs8()?,
            _ => return Err(CKR_KEY_NOT_WRAPPABLE),
        };
        match (mechanism.ty, Key::from_object(&wrapping)?) {
            (
                CKM_AES_KEY_WRAP | CKM_AES_KEY_WRAP_PAD | CKM_AES_KEY_WRAP_KWP,
                Key::Secret { key_type: CKK_AES, value },
            ) => {
                if !matches!(mechanism.param, Param::None) && mechanism.param != Param::Bytes(Vec::new()) {
                    return Err(CKR_MECHANISM_PARAM_INVALID);
                }
                aes::wrap(&value, &plain, mechanism.ty != CKM_AES_KEY_WRAP)
            }
            (CKM_RSA_PKCS | CKM_RSA_PKCS_OAEP, Key::RsaPublic(k)) => {
                if target.class() != CKO_SECRET_KEY {
                    return Err(CKR_KEY_NOT_WRAPPABLE);
                }
                rsa::wrap(mechanism, &k, &plain)
            }
            _ => Err(CKR_WRAPPING_KEY_TYPE_INCONSISTENT),
        }
    }

    pub fn unwrap_key(
        &self,
        h: CK_SESSION_HANDLE,
        mechanism: &Mechanism,
        unwrapping: CK_OBJECT_HANDLE,
        wrapped: &[u8],
        template: &Template,
    ) -> Result<CK_OBJECT_HANDLE> {
        mech::require(mechanism.ty, CKF_UNWRAP)?;
        let (s, unwrapping, is_so) = {
            let mut inner = self.inner();
            let s = inner.session(h)?;
            let u = inner.key(&s, unwrapping, mechanism.ty, CKA_UNWRAP, CKR_UNWRAPPING_KEY_HANDLE_INVALID)?;
            let is_so = inner.login[s.slot] == Some(CKU_SO);
            (s, u, is_so)
        };
        if let Some(Attr::Template(required)) = unwrapping.attrs.get(&CKA_UNWRAP_TEMPLATE) {
            if !required.iter().all(|(ty, v)| template_get(template, *ty) == Some(&Attr::Bytes(v.clone()))) {
                return Err(CKR_TEMPLATE_INCONSISTENT);
            }
        }
        let plain = match (mechanism.ty, Key::from_object(&unwrapping)?) {
            (
                CKM_AES_KEY_WRAP | CKM_AES_KEY_WRAP_PAD | CKM_AES_KEY_WRAP_KWP,
                Key::Secret { key_type: CKK_AES, value },
            ) => aes::unwrap(&value, wrapped, mechanism.ty != CKM_AES_KEY_WRAP)?,
            (CKM_RSA_PKCS | CKM_RSA_PKCS_OAEP, Key::RsaPrivate(k)) => rsa::unwrap(mechanism, &k, wrapped)?,
            _ => return Err(CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT),
        };
        let class = template_ulong(template, CKA_CLASS)?.ok_or(CKR_TEMPLATE_INCOMPLETE)?;
        let material = match class {
            CKO_SECRET_KEY => {
                let key_type = template_ulong(template, CKA_KEY_TYPE)?.ok_or(CKR_TEMPLATE_INCOMPLETE)?;
                if let Some(len) = template_ulong(template, CKA_VALUE_LEN)? {
                    if len as usize != plain.len() {
                        return Err(CKR_TEMPLATE_INCONSISTENT);
                    }
                }
                if key_type == CKK_AES && !matches!(plain.len(), 16 | 24 | 32) {
                    return Err(CKR_WRAPPED_KEY_INVALID);
                }
                vec![(CKA_VALUE, Attr::bytes(plain.to_vec()))]
            }
            CKO_PRIVATE_KEY => {
                let (key_type, mut m) = if let Some(k) = rsa::from_pkcs8(&plain) {
                    (CKK_RSA, rsa::private_material(&k))
                } else if let Some(k) = ec::EcSecret::from_pkcs8(&plain) {
                    (CKK_EC, k.material())
                } else {
                    return Err(CKR_WRAPPED_KEY_INVALID);
                };
                m.insert(0, (CKA_KEY_TYPE, Attr::ulong(key_type)));
                m
            }
            _ => return Err(CKR_TEMPLATE_INCONSISTENT),
        };
        let mut obj = Object::build(template, material, Origin::Unwrap, is_so)?;
        add_check_value(&mut obj, None)?;
        self.inner().insert(self, h, &s, vec![obj]).map(|v| v[0])
    }

    pub fn derive_key(
        &self,
        h: CK_SESSION_HANDLE,
        mechanism: &Mechanism,
        base: CK_OBJECT_HANDLE,
        template: &Template,
    ) -> Result<CK_OBJECT_HANDLE> {
        mech::require(mechanism.ty, CKF_DERIVE)?;
        let (s, base, is_so) = {
            let mut inner = self.inner();
            let s = inner.session(h)?;
            let b = inner.key(&s, base, mechanism.ty, CKA_DERIVE, CKR_KEY_HANDLE_INVALID)?;
            let is_so = inner.login[s.slot] == Some(CKU_SO);
            (s, b, is_so)
        };
        let Param::Ecdh { kdf, shared, public } = &mechanism.param else {
            return Err(CKR_MECHANISM_PARAM_INVALID);
        };
        if *kdf != CKD_NULL || !shared.is_empty() {
            return Err(CKR_MECHANISM_PARAM_INVALID);
        }
        let Key::EcPrivate(secret) = Key::from_object(&base)? else {
            return Err(CKR_KEY_TYPE_INCONSISTENT);
        };
        let z = secret.ecdh(public)?;
        let class = template_ulong(template, CKA_CLASS)?.unwrap_or(CKO_SECRET_KEY);
        let key_type = template_ulong(template, CKA_KEY_TYPE)?.unwrap_or(CKK_GENERIC_SECRET);
        if class != CKO_SECRET_KEY || !matches!(key_type, CKK_GENERIC_SECRET | CKK_AES) {
            return Err(CKR_TEMPLATE_INCONSISTENT);
        }
        let len = match template_ulong(template, CKA_VALUE_LEN)? {
            Some(n) => n as usize,
            None if key_type == CKK_AES && !matches!(z.len(), 16 | 24 | 32) => return Err(CKR_TEMPLATE_INCOMPLETE),
            None => z.len(),
        };
        if len == 0 || len > z.len() || (key_type == CKK_AES && !matches!(len, 16 | 24 | 32)) {
            return Err(CKR_TEMPLATE_INCONSISTENT);
        }
        // As SoftHSM2: a shorter key keeps the trailing bytes of the shared secret.
        let value = z[z.len() - len..].to_vec();
        let material = vec![
            (CKA_CLASS, Attr::ulong(CKO_SECRET_KEY)),
            (CKA_KEY_TYPE, Attr::ulong(key_type)),
            (CKA_VALUE, Attr::bytes(value)),
        ];
        let mut obj = Object::build(template, material, Origin::Derive, is_so)?;
        obj.inherit_from_base(&base);
        add_check_value(&mut obj, None)?;
        self.inner().insert(self, h, &s, vec![obj]).map(|v| v[0])
    }

    // --- The device MBK and key backups (vendor interface "CSSIM MBK") ---

    /// The MBK facility exists unless the configuration says `device_mbk = false` (then the interface is not
    /// offered; a caller that kept its functions from another configuration gets CKR_FUNCTION_NOT_SUPPORTED).
    fn mbk_facility(&self) -> Result<()> {
        if self.config.device_mbk {
            Ok(())
        } else {
            Err(CKR_FUNCTION_NOT_SUPPORTED)
        }
    }

    /// Logs a refusal of the MBK functions and returns its CK_RV.
    fn refuse_mbk(&self, rv: CK_RV, message: &str) -> CK_RV {
        self.log.line(&format!("MBK: {message} (CK_RV {rv:#x})"));
        rv
    }

    /// CSSIM_GetMbkInfo: the fingerprint of the MBK of the device behind `id`, if it holds one.
    pub fn mbk_info(&self, id: CK_SLOT_ID) -> Result<Option<Fingerprint>> {
        self.mbk_facility()?;
        self.slot(id)?;
        Ok(self.inner().device_mbk()?.map(|m| m.fingerprint()))
    }

    /// CSSIM_BackupKey: the blob of a key object under the device MBK. The firmware's sanctioned backup path:
    /// whatever CKA_SENSITIVE and CKA_EXTRACTABLE say, in every mode.
    pub fn backup_key(&self, h: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> Result<Vec<u8>> {
        self.mbk_facility()?;
        let (object, mbk) = {
            let mut inner = self.inner();
            let s = inner.session(h)?;
            let (_, object) = inner.resolve(&s, key, CKR_KEY_HANDLE_INVALID)?;
            if !object.is_key() {
                return Err(CKR_KEY_HANDLE_INVALID);
            }
            (object, inner.device_mbk()?)
        };
        let Some(mbk) = mbk else {
            return Err(self.refuse_mbk(CKR_CSSIM_NO_MBK, "key backup refused: the device holds no MBK"));
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        blob::seal(&mbk, &object, now)
    }

    /// CSSIM_RestoreKey: the object of a blob made under the device MBK, with exactly the attributes it holds;
    /// a session object unless `template` (CKA_TOKEN only) says CKA_TOKEN true. Every refusal creates nothing.
    pub fn restore_key(&self, h: CK_SESSION_HANDLE, data: &[u8], template: &Template) -> Result<CK_OBJECT_HANDLE> {
        self.mbk_facility()?;
        let (s, mbk) = {
            let mut inner = self.inner();
            let s = inner.session(h)?;
            let mbk = inner.device_mbk()?;
            (s, mbk)
        };
        let mut token = false;
        for (ty, value) in template {
            if *ty != CKA_TOKEN {
                return Err(CKR_ATTRIBUTE_TYPE_INVALID);
            }
            check_shape(CKA_TOKEN, value)?;
            token = value.as_bytes().is_some_and(|b| b.first().is_some_and(|v| *v != 0));
        }
        let Some(mbk) = mbk else {
            return Err(self.refuse_mbk(CKR_CSSIM_NO_MBK, "key restore refused: the device holds no MBK"));
        };
        let mut object = blob::open(&mbk, data).map_err(|e| match e {
            BlobError::Format => self.refuse_mbk(
                CKR_CSSIM_BLOB_FORMAT,
                "key restore refused: not a key blob, truncated, or an unknown blob version",
            ),
            BlobError::WrongMbk(theirs) => self.refuse_mbk(
                CKR_CSSIM_WRONG_MBK,
                &format!(
                    "key restore refused: blob made under another MBK (fingerprint {theirs}; the device holds {})",
                    mbk.fingerprint()
                ),
            ),
            BlobError::Mac => self
                .refuse_mbk(CKR_CSSIM_BLOB_MAC, "key restore refused: blob MAC does not verify (altered or damaged)"),
        })?;
        object.set(CKA_TOKEN, Attr::bool(token));
        self.inner().insert(self, h, &s, vec![object]).map(|v| v[0])
    }

    // --- Random numbers (§5.15) ---

    pub fn generate_random(&self, h: CK_SESSION_HANDLE, out: &mut [u8]) -> Result<()> {
        self.inner().session(h)?;
        rand::rngs::OsRng.fill_bytes(out);
        Ok(())
    }

    pub fn seed_random(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        // The operating system's generator needs no seed; the call is accepted as SoftHSM2 does.
        self.inner().session(h).map(|_| ())
    }
}

/// The input of one step of a multi-part operation.
#[derive(Debug, Clone, Copy)]
pub enum Step<'a> {
    Single(&'a [u8]),
    Update(&'a [u8]),
    Final,
}

/// CKA_CHECK_VALUE of secret keys: AES-ECB of a zero block for AES, SHA-1 for generic secrets (first 3 bytes).
/// A value given in a C_CreateObject template must be the right one.
fn add_check_value(obj: &mut Object, given: Option<&[u8]>) -> Result<()> {
    if obj.class() != CKO_SECRET_KEY {
        return Ok(());
    }
    let value = obj.get(CKA_VALUE).unwrap_or_default();
    let kcv = match obj.key_type() {
        Some(CKK_AES) => aes::check_value(value)?,
        _ => HashAlg::Sha1.digest(value)[..3].to_vec(),
    };
    if given.is_some_and(|g| !g.is_empty() && g != kcv.as_slice()) {
        return Err(CKR_ATTRIBUTE_VALUE_INVALID);
    }
    obj.set(CKA_CHECK_VALUE, Attr::bytes(kcv));
    Ok(())
}

/// The CC rule: a token key with the same class, CKA_LABEL and CKA_ID as `obj` (other than `except`), when
/// `obj` has a label or an id.
fn collides(token: &TokenState, obj: &Object, except: Option<u64>) -> bool {
    if !obj.is_key() || (obj.label().is_empty() && obj.id().is_empty()) {
        return false;
    }
    token.objects.iter().any(|(uid, o)| {
        Some(*uid) != except && o.is_key() && o.class() == obj.class() && o.label() == obj.label() && o.id() == obj.id()
    })
}

impl Inner {
    /// The device's MBK as the state file has it now (another process may have loaded or replaced it).
    fn device_mbk(&mut self) -> Result<Option<Mbk>> {
        self.store.refresh()?;
        match &self.store.state.mbk {
            None => Ok(None),
            Some(b) => Mbk::from_bytes(&b.0).map(Some).ok_or(CKR_DEVICE_ERROR),
        }
    }

    fn session(&self, h: CK_SESSION_HANDLE) -> Result<Arc<Session>> {
        self.sessions.get(&h).cloned().ok_or(CKR_SESSION_HANDLE_INVALID)
    }

    /// Closes a session: its session objects go, and the last session of a slot logs the slot out.
    fn remove_session(&mut self, h: CK_SESSION_HANDLE) {
        let Some(s) = self.sessions.remove(&h) else { return };
        let gone: Vec<_> = self.session_objects.iter().filter(|(_, o)| o.session == h).map(|(k, _)| *k).collect();
        for k in gone {
            self.session_objects.remove(&k);
            self.handles.remove(&k);
        }
        if !self.sessions.values().any(|o| o.slot == s.slot) {
            self.login[s.slot] = None;
        }
    }

    /// C_Logout: private session objects of the slot go too (as in SoftHSM2).
    fn logout_slot(&mut self, slot: usize) {
        self.login[slot] = None;
        let gone: Vec<_> = self
            .session_objects
            .iter()
            .filter(|(_, o)| o.slot == slot && o.object.is_private())
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            self.session_objects.remove(&k);
            self.handles.remove(&k);
        }
    }

    fn new_handle(&mut self) -> CK_OBJECT_HANDLE {
        let h = self.next_handle;
        self.next_handle += 1;
        h
    }

    /// The handle of a token object (the same for the life of this C_Initialize).
    fn token_handle(&mut self, slot: usize, uid: u64) -> CK_OBJECT_HANDLE {
        if let Some(h) = self.token_handles.get(&(slot, uid)) {
            return *h;
        }
        let h = self.new_handle();
        self.token_handles.insert((slot, uid), h);
        self.handles.insert(h, ObjRef::Token { slot, uid });
        h
    }

    /// The object behind a handle, if the session may see it (`invalid`: the error otherwise).
    fn resolve(&mut self, s: &Session, h: CK_OBJECT_HANDLE, invalid: CK_RV) -> Result<(ObjRef, Object)> {
        let at = *self.handles.get(&h).ok_or(invalid)?;
        let object = match at {
            ObjRef::Token { slot, uid } => {
                if slot != s.slot {
                    return Err(invalid);
                }
                self.store.refresh()?;
                self.store.state.tokens.get(&slot).and_then(|t| t.objects.get(&uid)).cloned().ok_or(invalid)?
            }
            ObjRef::Session => {
                let so = self.session_objects.get(&h).ok_or(invalid)?;
                if so.slot != s.slot {
                    return Err(invalid);
                }
                so.object.clone()
            }
        };
        if object.is_private() && self.login[s.slot] != Some(CKU_USER) {
            return Err(invalid);
        }
        Ok((at, object))
    }

    /// A key for `mechanism` with `usage` set (CKR_KEY_FUNCTION_NOT_PERMITTED otherwise) and, if the key
    /// restricts them, the mechanism among its CKA_ALLOWED_MECHANISMS.
    fn key(
        &mut self,
        s: &Session,
        h: CK_OBJECT_HANDLE,
        mechanism: CK_MECHANISM_TYPE,
        usage: CK_ATTRIBUTE_TYPE,
        invalid: CK_RV,
    ) -> Result<Object> {
        let (_, object) = self.resolve(s, h, invalid)?;
        if !object.is_key() {
            return Err(invalid);
        }
        if !object.bool(usage) {
            return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
        }
        let allowed = object.get(CKA_ALLOWED_MECHANISMS).unwrap_or_default();
        if !allowed.is_empty() {
            let n = std::mem::size_of::<CK_ULONG>();
            let ok = allowed.chunks(n).any(|c| c.try_into().ok().map(CK_ULONG::from_ne_bytes) == Some(mechanism));
            if !ok {
                return Err(CKR_MECHANISM_INVALID);
            }
        }
        Ok(object)
    }

    /// Adds new objects (all or none): the session's rights, the CC rule, then the token or the session.
    fn insert(
        &mut self,
        module: &Module,
        h: CK_SESSION_HANDLE,
        s: &Session,
        objects: Vec<Object>,
    ) -> Result<Vec<CK_OBJECT_HANDLE>> {
        // The session may have been closed while the key was made.
        self.session(h)?;
        let login = self.login[s.slot];
        for obj in &objects {
            if obj.is_token() && !s.rw {
                return Err(CKR_SESSION_READ_ONLY);
            }
            if obj.is_private() && login != Some(CKU_USER) {
                return Err(CKR_USER_NOT_LOGGED_IN);
            }
        }
        let token: Vec<Object> = objects.iter().filter(|o| o.is_token()).cloned().collect();
        let mut uids = Vec::new();
        if !token.is_empty() {
            let cc = module.mode() == Mode::Cc;
            let slot = s.slot;
            uids = self
                .store
                .mutate(|state| {
                    let mut t = state.tokens.remove(&slot).ok_or(CKR_TOKEN_NOT_RECOGNIZED)?;
                    let mut uids = Vec::new();
                    let mut r = Ok(());
                    for obj in &token {
                        if cc && collides(&t, obj, None) {
                            r = Err(CKR_ACTION_PROHIBITED);
                            break;
                        }
                        let uid = state.new_uid();
                        t.objects.insert(uid, obj.clone());
                        uids.push(uid);
                    }
                    state.tokens.insert(slot, t);
                    r.map(|_| uids)
                })
                .inspect_err(|rv| {
                    if *rv == CKR_ACTION_PROHIBITED {
                        module
                            .log
                            .line("CC: overwriting key (same class, label and id) refused (rule cc.no_overwrite)");
                    }
                })?;
        }
        let mut uids = uids.into_iter();
        let mut handles = Vec::new();
        for obj in objects {
            if obj.is_token() {
                let uid = uids.next().ok_or(CKR_GENERAL_ERROR)?;
                handles.push(self.token_handle(s.slot, uid));
            } else {
                let handle = self.new_handle();
                self.handles.insert(handle, ObjRef::Session);
                self.session_objects.insert(handle, SessionObject { slot: s.slot, session: h, object: obj });
                handles.push(handle);
            }
        }
        Ok(handles)
    }
}
