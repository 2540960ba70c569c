//! Custody of stored keys, tried the way an attacker with that access would: a holder of the user PIN
//! through the shim and directly against the backend module, someone who can talk to the HSM without any
//! PIN, and a PIN holder who can also write the key store. Also the guarantees the HSM copy must carry
//! (CKA_ALWAYS_AUTHENTICATE), keys the backend can make but not wrap (EdDSA), and C_InitToken.

use super::*;
use cryptoki_sys::*;

/// Raw calls into a module's 2.40 table (the shim's or the backend's; in this process both are one instance
/// of the backend, so sessions and handles are shared).
pub struct Raw(pub &'static CK_FUNCTION_LIST);

/// A template built from (type, value) pairs; the values live as long as it does.
pub struct Tmpl {
    attrs: Vec<CK_ATTRIBUTE>,
    _values: Vec<Vec<u8>>,
}

pub fn b(v: bool) -> Vec<u8> {
    vec![v as u8]
}

pub fn u(v: CK_ULONG) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

pub fn tmpl(items: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> Tmpl {
    let values: Vec<Vec<u8>> = items.iter().map(|(_, v)| v.clone()).collect();
    let attrs = items
        .iter()
        .zip(&values)
        .map(|((ty, _), v)| CK_ATTRIBUTE {
            type_: *ty,
            pValue: if v.is_empty() { std::ptr::null_mut() } else { v.as_ptr() as *mut _ },
            ulValueLen: v.len() as CK_ULONG,
        })
        .collect();
    Tmpl { attrs, _values: values }
}

fn mech(kind: CK_MECHANISM_TYPE) -> CK_MECHANISM {
    CK_MECHANISM { mechanism: kind, pParameter: std::ptr::null_mut(), ulParameterLen: 0 }
}

fn ok(rv: CK_RV) -> Result<(), CK_RV> {
    if rv == CKR_OK {
        Ok(())
    } else {
        Err(rv)
    }
}

// SAFETY (for every method): the templates, mechanisms and buffers passed live for the call, and the
// handles are whatever the test names; a module must answer any handle with a CK_RV.
impl Raw {
    pub fn shim() -> Raw {
        Raw(common::functions(&common::shim_path()))
    }
    pub fn backend() -> Raw {
        Raw(common::functions(&common::backend_path()))
    }

    pub fn find(&self, s: CK_SESSION_HANDLE, items: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> Result<Vec<u64>, CK_RV> {
        let mut t = tmpl(items);
        unsafe { ok(self.0.C_FindObjectsInit.unwrap()(s, t.attrs.as_mut_ptr(), t.attrs.len() as CK_ULONG))? };
        let mut all = Vec::new();
        loop {
            let mut batch = [0u64; 64];
            let mut n = 0;
            let rv = unsafe { self.0.C_FindObjects.unwrap()(s, batch.as_mut_ptr(), 64, &mut n) };
            if rv != CKR_OK || n == 0 {
                unsafe { self.0.C_FindObjectsFinal.unwrap()(s) };
                return ok(rv).map(|_| all);
            }
            all.extend_from_slice(&batch[..n as usize]);
        }
    }

    /// One attribute's value (length query, then the value).
    pub fn get(&self, s: CK_SESSION_HANDLE, h: u64, ty: CK_ATTRIBUTE_TYPE) -> Result<Vec<u8>, CK_RV> {
        let f = self.0.C_GetAttributeValue.unwrap();
        let mut a = CK_ATTRIBUTE { type_: ty, pValue: std::ptr::null_mut(), ulValueLen: 0 };
        unsafe { ok(f(s, h, &mut a, 1))? };
        let mut buf = vec![0u8; a.ulValueLen as usize];
        a.pValue = buf.as_mut_ptr() as *mut _;
        unsafe { ok(f(s, h, &mut a, 1))? };
        buf.truncate(a.ulValueLen as usize);
        Ok(buf)
    }

    pub fn unwrap(
        &self,
        s: CK_SESSION_HANDLE,
        kind: CK_MECHANISM_TYPE,
        key: u64,
        blob: &[u8],
        items: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> Result<u64, CK_RV> {
        let (mut m, mut t, mut h) = (mech(kind), tmpl(items), 0);
        let n = t.attrs.len() as CK_ULONG;
        unsafe {
            ok(self.0.C_UnwrapKey.unwrap()(
                s,
                &mut m,
                key,
                blob.as_ptr() as *mut _,
                blob.len() as CK_ULONG,
                t.attrs.as_mut_ptr(),
                n,
                &mut h,
            ))?
        };
        Ok(h)
    }

    pub fn wrap(
        &self,
        s: CK_SESSION_HANDLE,
        kind: CK_MECHANISM_TYPE,
        wrapping: u64,
        key: u64,
    ) -> Result<Vec<u8>, CK_RV> {
        let (mut m, mut out, mut n) = (mech(kind), vec![0u8; 4096], 4096 as CK_ULONG);
        unsafe { ok(self.0.C_WrapKey.unwrap()(s, &mut m, wrapping, key, out.as_mut_ptr(), &mut n))? };
        out.truncate(n as usize);
        Ok(out)
    }

    pub fn generate(
        &self,
        s: CK_SESSION_HANDLE,
        kind: CK_MECHANISM_TYPE,
        items: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> Result<u64, CK_RV> {
        let (mut m, mut t, mut h) = (mech(kind), tmpl(items), 0);
        let n = t.attrs.len() as CK_ULONG;
        unsafe { ok(self.0.C_GenerateKey.unwrap()(s, &mut m, t.attrs.as_mut_ptr(), n, &mut h))? };
        Ok(h)
    }

    pub fn set(&self, s: CK_SESSION_HANDLE, h: u64, items: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> CK_RV {
        let mut t = tmpl(items);
        unsafe { self.0.C_SetAttributeValue.unwrap()(s, h, t.attrs.as_mut_ptr(), t.attrs.len() as CK_ULONG) }
    }

    pub fn copy(&self, s: CK_SESSION_HANDLE, h: u64, items: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> Result<u64, CK_RV> {
        let (mut t, mut out) = (tmpl(items), 0);
        let n = t.attrs.len() as CK_ULONG;
        unsafe { ok(self.0.C_CopyObject.unwrap()(s, h, t.attrs.as_mut_ptr(), n, &mut out))? };
        Ok(out)
    }

    pub fn destroy(&self, s: CK_SESSION_HANDLE, h: u64) -> CK_RV {
        unsafe { self.0.C_DestroyObject.unwrap()(s, h) }
    }

    pub fn sign(&self, s: CK_SESSION_HANDLE, kind: CK_MECHANISM_TYPE, key: u64, data: &[u8]) -> Result<Vec<u8>, CK_RV> {
        let mut m = mech(kind);
        unsafe { ok(self.0.C_SignInit.unwrap()(s, &mut m, key))? };
        self.sign_only(s, data)
    }

    /// C_Sign of an operation already initialized.
    pub fn sign_only(&self, s: CK_SESSION_HANDLE, data: &[u8]) -> Result<Vec<u8>, CK_RV> {
        let (mut out, mut n) = (vec![0u8; 1024], 1024 as CK_ULONG);
        let rv = unsafe {
            self.0.C_Sign.unwrap()(s, data.as_ptr() as *mut _, data.len() as CK_ULONG, out.as_mut_ptr(), &mut n)
        };
        ok(rv)?;
        out.truncate(n as usize);
        Ok(out)
    }

    pub fn decrypt_init(&self, s: CK_SESSION_HANDLE, kind: CK_MECHANISM_TYPE, key: u64) -> CK_RV {
        let mut m = mech(kind);
        let rv = unsafe { self.0.C_DecryptInit.unwrap()(s, &mut m, key) };
        if rv == CKR_OK {
            // End the operation (a length query of a NULL input ends nothing; C_DecryptFinal does).
            let (mut out, mut n) = ([0u8; 64], 64 as CK_ULONG);
            unsafe { self.0.C_DecryptFinal.unwrap()(s, out.as_mut_ptr(), &mut n) };
        }
        rv
    }

    pub fn login(&self, s: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: &str) -> CK_RV {
        unsafe { self.0.C_Login.unwrap()(s, user, pin.as_ptr() as *mut _, pin.len() as CK_ULONG) }
    }
}

/// The labels the shim gives its own objects in the token.
const OWN_LABELS: [&[u8]; 3] = [b"p11shim-mbk", b"p11shim-mbk-mac", b"p11shim-mbk-load"];
/// The label of the seal key p11shim brings back from its device blob for one MAC at a time (device MBK).
const SEAL_LABEL: &[u8] = b"p11shim-seal";

/// The backend's device MBK interface, as an attacker loading the backend directly gets it.
fn device_functions() -> &'static p11shim::backend::DeviceMbkFunctions {
    type GetInterface = unsafe extern "C" fn(*mut u8, *mut CK_VERSION, *mut *mut CK_INTERFACE, CK_FLAGS) -> CK_RV;
    // SAFETY: the backend is loaded already (same instance); C_GetInterface has the 3.0 signature; the name is
    // NUL-terminated and the interface's function list lives as long as the library, which is never unloaded.
    unsafe {
        let lib = libloading::Library::new(common::backend_path()).expect("dlopen the backend");
        let get = lib.get::<GetInterface>(b"C_GetInterface\0").expect("the device offers C_GetInterface");
        let mut version = CK_VERSION { major: 1, minor: 0 };
        let mut iface: *mut CK_INTERFACE = std::ptr::null_mut();
        assert_eq!(get(c"CSSIM MBK".as_ptr() as *mut u8, &mut version, &mut iface, 0), CKR_OK);
        let list = (*iface).pFunctionList as *const p11shim::backend::DeviceMbkFunctions;
        std::mem::forget(lib);
        &*list
    }
}

/// `CSSIM_RestoreKey` of a blob as a session object, called by an attacker with a session on the device.
fn device_restore(h: CK_SESSION_HANDLE, blob: &[u8]) -> Result<u64, CK_RV> {
    let restore = device_functions().restore_key.expect("CSSIM_RestoreKey");
    let mut out = 0;
    // SAFETY: the blob is only read; no template; a valid out pointer.
    ok(unsafe { restore(h, blob.as_ptr() as *mut u8, blob.len() as CK_ULONG, std::ptr::null_mut(), 0, &mut out) })?;
    Ok(out)
}

/// Templates an attacker would try to unwrap a stored key's blob into, for a key of `class`/`key_type`: every
/// combination of the flags that decide whether a value can be read or taken out.
fn attacker_templates(class: CK_OBJECT_CLASS, key_type: CK_KEY_TYPE) -> Vec<Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>> {
    let mut all = Vec::new();
    for sensitive in [None, Some(false), Some(true)] {
        for extractable in [None, Some(false), Some(true)] {
            for trusted in [None, Some(false), Some(true)] {
                for private in [None, Some(false), Some(true)] {
                    let mut t = vec![(CKA_CLASS, u(class)), (CKA_KEY_TYPE, u(key_type)), (CKA_TOKEN, b(false))];
                    for (ty, v) in [
                        (CKA_SENSITIVE, sensitive),
                        (CKA_EXTRACTABLE, extractable),
                        (CKA_WRAP_WITH_TRUSTED, trusted),
                        (CKA_PRIVATE, private),
                    ] {
                        if let Some(v) = v {
                            t.push((ty, b(v)));
                        }
                    }
                    all.push(t);
                }
            }
        }
    }
    all
}

/// Everything an attacker holding this session (logged in as the user) tries on an object `h` to get its
/// value out: read it, turn sensitivity off or extractability on (directly or in a copy), wrap it under a key
/// of their own whose value they can read. Panics (naming `what`) if any of it works.
fn cannot_get_the_value(raw: &Raw, s: CK_SESSION_HANDLE, h: u64, what: &str) {
    let kek = raw
        .generate(
            s,
            CKM_AES_KEY_GEN,
            &[
                (CKA_TOKEN, b(false)),
                (CKA_VALUE_LEN, u(32)),
                (CKA_SENSITIVE, b(false)),
                (CKA_EXTRACTABLE, b(true)),
                (CKA_WRAP, b(true)),
            ],
        )
        .expect("an attacker's own wrapping key");
    let class = raw.get(s, h, CKA_CLASS).expect("class");
    let mut secret_parts = vec![CKA_VALUE];
    if class == u(CKO_PRIVATE_KEY) {
        secret_parts.extend([CKA_PRIVATE_EXPONENT, CKA_PRIME_1]);
    }
    for ty in secret_parts {
        if let Ok(v) = raw.get(s, h, ty) {
            assert!(v.is_empty(), "{what}: attribute {ty:#x} read in clear");
        }
    }
    if raw.get(s, h, CKA_SENSITIVE).ok() == Some(b(true)) {
        assert_ne!(raw.set(s, h, &[(CKA_SENSITIVE, b(false))]), CKR_OK, "{what}: sensitivity turned off");
    }
    if raw.get(s, h, CKA_EXTRACTABLE).ok() == Some(b(false)) {
        assert_ne!(raw.set(s, h, &[(CKA_EXTRACTABLE, b(true))]), CKR_OK, "{what}: made extractable");
    }
    let unreachable = |o: u64, what: &str| {
        if let Ok(v) = raw.get(s, o, CKA_VALUE) {
            assert!(v.is_empty(), "{what}: its value read in clear");
        }
        for kind in [CKM_AES_KEY_WRAP_PAD, CKM_AES_KEY_WRAP, CKM_AES_ECB, CKM_AES_CBC_PAD] {
            assert!(raw.wrap(s, kind, kek, o).is_err(), "{what}: wrapped under the attacker's key ({kind:#x})");
        }
    };
    unreachable(h, what);
    for change in [(CKA_SENSITIVE, b(false)), (CKA_EXTRACTABLE, b(true)), (CKA_WRAP_WITH_TRUSTED, b(false))] {
        if let Ok(copy) = raw.copy(s, h, std::slice::from_ref(&change)) {
            unreachable(copy, &format!("{what}, copied with {:#x}", change.0));
            raw.destroy(s, copy);
        }
    }
    raw.destroy(s, kek);
}

/// A stored key's secret is safe from a holder of the user PIN, whatever they call: through the shim the
/// shim's own objects do not exist for them; directly on the backend every unwrap of every stored blob with
/// every key of the token, under every template, gives at most an object whose value cannot be read or taken
/// out, and the shim's keys cannot be made to decrypt or be changed.
pub fn custody_holds_against_a_pin_holder() {
    let (slot, s) = db_token("db21");
    let default = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::ValueLen(32.into()),
                Attribute::Encrypt(true),
                Attribute::Label(b"default".to_vec()),
            ],
        )
        .expect("a key with the backend's defaults");
    let sensitive = new_aes(&s, "sensitive");
    let exportable = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::ValueLen(32.into()),
                Attribute::Encrypt(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(true),
                Attribute::WrapWithTrusted(true),
                Attribute::Label(b"exportable".to_vec()),
            ],
        )
        .expect("an extractable key");
    let (_, ec) = ec_pair(&s, "ec", true);
    for k in [default, sensitive, exportable] {
        encrypt_roundtrip(&s, k).expect("use: its HSM copy is loaded");
    }
    s.sign(&Mechanism::Ecdsa, ec, &[1u8; 32]).expect("use the EC key");
    let rows = rows("db21");
    assert_eq!(rows.len(), 5, "four keys and a public key are stored");
    let (hsm, shim) = (Raw::backend(), Raw::shim());
    let h = s.handle();

    // What the token holds, as the backend lists it to this (logged-in) session: the MBK set, the HSM copies
    // of the stored keys, every other object.
    let everything = hsm.find(h, &[]).expect("the backend's own find");
    let own: Vec<u64> = everything
        .iter()
        .copied()
        .filter(|o| hsm.get(h, *o, CKA_LABEL).is_ok_and(|l| OWN_LABELS.contains(&l.as_slice())))
        .collect();
    if common::device_mbk() {
        // The device keeps its MBK itself: there is no MBK object of any kind to attack, and the seal key
        // exists only during one MAC (it is the device's blob in the key store the rest of the time).
        assert!(own.is_empty(), "no p11shim MBK object on a device with its own MBK: {own:?}");
        assert!(everything.iter().all(|o| hsm.get(h, *o, CKA_LABEL).ok().as_deref() != Some(SEAL_LABEL)));
    } else {
        assert_eq!(own.len(), 3, "the MBK set is there to attack (MBK, MAC key, load key)");
    }
    let copies: Vec<u64> = everything
        .iter()
        .copied()
        .filter(|o| !own.contains(o) && hsm.get(h, *o, CKA_TOKEN).ok() == Some(b(false)))
        .collect();
    assert!(copies.len() >= 4, "the loaded copies are there to attack: {copies:?}");

    // Through the shim: none of them exists, whatever the call.
    let max = everything.iter().copied().max().unwrap_or(0);
    for candidate in 1..=max + 64 {
        if let Ok(label) = shim.get(h, candidate, CKA_LABEL) {
            assert!(!OWN_LABELS.contains(&label.as_slice()), "handle {candidate} answers {label:?} through the shim");
        }
    }
    for &o in own.iter().chain(&copies) {
        assert_eq!(shim.get(h, o, CKA_CLASS), Err(CKR_OBJECT_HANDLE_INVALID), "read {o}");
        assert_eq!(shim.sign(h, CKM_SHA256_HMAC, o, b"x"), Err(CKR_KEY_HANDLE_INVALID), "sign with {o}");
        assert_eq!(shim.decrypt_init(h, CKM_AES_ECB, o), CKR_KEY_HANDLE_INVALID, "decrypt with {o}");
        assert_eq!(shim.copy(h, o, &[]), Err(CKR_OBJECT_HANDLE_INVALID), "copy {o}");
        assert_eq!(shim.set(h, o, &[(CKA_LABEL, b"x".to_vec())]), CKR_OBJECT_HANDLE_INVALID, "change {o}");
        assert_eq!(shim.destroy(h, o), CKR_OBJECT_HANDLE_INVALID, "destroy {o}");
        assert_eq!(shim.wrap(h, CKM_AES_KEY_WRAP_PAD, o, exportable.handle()), Err(CKR_WRAPPING_KEY_HANDLE_INVALID));
        for row in &rows {
            let t = [
                (CKA_CLASS, u(row.class)),
                (CKA_TOKEN, b(false)),
                (CKA_SENSITIVE, b(true)),
                (CKA_WRAP_WITH_TRUSTED, b(true)),
            ];
            assert_eq!(shim.unwrap(h, row.wrap_mech, o, &row.wrapped, &t), Err(CKR_UNWRAPPING_KEY_HANDLE_INVALID));
        }
    }
    let through_shim = shim.find(h, &[]).expect("find through the shim");
    assert!(own.iter().chain(&copies).all(|o| !through_shim.contains(o)), "the shim's objects are not listed");

    // Directly on the backend: every key of the token, every blob, every template.
    let secret_keys: Vec<u64> =
        everything.iter().copied().filter(|o| hsm.get(h, *o, CKA_CLASS).ok() == Some(u(CKO_SECRET_KEY))).collect();
    let mut unwrapped = 0;
    for row in rows.iter().filter(|r| !r.wrapped.is_empty()) {
        for &k in &secret_keys {
            for t in attacker_templates(row.class, row.key_type) {
                if let Ok(got) = hsm.unwrap(h, row.wrap_mech, k, &row.wrapped, &t) {
                    unwrapped += 1;
                    cannot_get_the_value(&hsm, h, got, &format!("row {} unwrapped under {k} with {t:?}", row.id));
                    hsm.destroy(h, got);
                }
            }
        }
    }
    if common::device_mbk() {
        // The device's own restore gives every blob back, to anyone with the user's login, only as the key
        // it was: never in a form whose value can be read or taken out.
        assert_eq!(unwrapped, 0, "no key of the token unwraps a device blob");
        for row in rows.iter().filter(|r| !r.wrapped.is_empty()) {
            let got = device_restore(h, &row.wrapped).expect("the device restores its blob");
            cannot_get_the_value(&hsm, h, got, &format!("row {} restored by the device", row.id));
            unwrapped += 1;
            hsm.destroy(h, got);
        }
    }
    assert!(unwrapped > 0, "the attack reached the HSM: some unwraps succeed (into protected objects)");
    for &o in own.iter().chain(&copies) {
        cannot_get_the_value(&hsm, h, o, &format!("object {o}"));
    }
    for &k in &own {
        for flag in [CKA_DECRYPT, CKA_ENCRYPT, CKA_SIGN, CKA_WRAP, CKA_UNWRAP] {
            assert_ne!(hsm.set(h, k, &[(flag, b(true))]), CKR_OK, "a key of the MBK set changed ({flag:#x})");
        }
        assert_ne!(hsm.set(h, k, &[(CKA_ALLOWED_MECHANISMS, Vec::new())]), CKR_OK);
        for kind in [CKM_AES_ECB, CKM_AES_CBC, CKM_AES_KEY_WRAP_PAD, CKM_AES_KEY_WRAP] {
            assert_ne!(hsm.decrypt_init(h, kind, k), CKR_OK, "key {k} decrypts with {kind:#x}");
        }
    }
    // The stored keys still work for their owner.
    drop(s);
    let s = user_session(slot);
    encrypt_roundtrip(&s, sensitive).expect("the stored key still works");
}

/// Somebody who can open a session on the HSM but holds no PIN: every key of the MBK set is a public object
/// they can see, but none unwraps a stored key for them, under any template. Run in a child process (the
/// test process is logged in).
pub fn custody_holds_without_the_pin() {
    let (_slot, s) = db_token("db22");
    new_aes(&s, "k");
    let (_, _ec) = ec_pair(&s, "ec", true);
    let rows = rows("db22");
    let blobs: Vec<String> = rows
        .iter()
        .filter(|r| !r.wrapped.is_empty())
        .map(|r| format!("{}:{}:{}:{}", r.class, r.key_type, r.wrap_mech, hex::encode(&r.wrapped)))
        .collect();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "custody_child", "--nocapture", "--test-threads=1"])
        .env("VAULT_CUSTODY_TOKEN", "db22")
        .env("VAULT_CUSTODY_BLOBS", blobs.join(","))
        .envs(backend_for_child("nopin"))
        .output()
        .expect("run the attacker");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("@@DONE"),
        "attacker: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("@@TRIED"), "the attack ran: {stdout}");
}

/// The attacker's side of [`custody_holds_without_the_pin`]: the backend module loaded directly, a session
/// without any login. Does nothing in a normal test run.
pub fn custody_child() {
    let (Ok(token), Ok(blobs)) = (std::env::var("VAULT_CUSTODY_TOKEN"), std::env::var("VAULT_CUSTODY_BLOBS")) else {
        return;
    };
    let hsm = Raw(common::raw_functions(&common::backend_path()));
    // SAFETY: C_Initialize with NULL arguments; this process loads nothing else.
    assert_eq!(unsafe { hsm.0.C_Initialize.unwrap()(std::ptr::null_mut()) }, CKR_OK);
    let slot = {
        let mut slots = [0u64; 64];
        let mut n = 64;
        // SAFETY: room for 64 slots.
        assert_eq!(unsafe { hsm.0.C_GetSlotList.unwrap()(1, slots.as_mut_ptr(), &mut n) }, CKR_OK);
        slots[..n as usize]
            .iter()
            .copied()
            .find(|s| {
                // SAFETY: plain data, valid out pointer.
                let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
                // SAFETY: as above.
                let rv = unsafe { hsm.0.C_GetTokenInfo.unwrap()(*s, &mut info) };
                rv == CKR_OK && String::from_utf8_lossy(&info.label).trim_end() == token
            })
            .expect("the token")
    };
    let mut h = 0;
    // SAFETY: valid out pointer; no callback.
    let rv = unsafe {
        hsm.0.C_OpenSession.unwrap()(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, std::ptr::null_mut(), None, &mut h)
    };
    assert_eq!(rv, CKR_OK);
    let keys = hsm.find(h, &[(CKA_CLASS, u(CKO_SECRET_KEY))]).expect("find without a login");
    let own: Vec<u64> = keys
        .iter()
        .copied()
        .filter(|k| hsm.get(h, *k, CKA_LABEL).is_ok_and(|l| OWN_LABELS.contains(&l.as_slice())))
        .collect();
    if common::device_mbk() {
        assert!(own.is_empty(), "no MBK object on a device with its own MBK");
    } else {
        assert_eq!(own.len(), 3, "the MBK set is visible without a PIN (public objects)");
    }
    let mut tried = 0;
    for blob in blobs.split(',').filter(|b| !b.is_empty()) {
        let f: Vec<&str> = blob.split(':').collect();
        let (class, key_type, mech, wrapped) =
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap(), hex::decode(f[3]).unwrap());
        for &k in &keys {
            for t in attacker_templates(class, key_type) {
                tried += 1;
                if let Ok(got) = hsm.unwrap(h, mech, k, &wrapped, &t) {
                    panic!("without a PIN, key {k} unwrapped a stored key ({t:?}) into object {got}");
                }
            }
        }
        if common::device_mbk() {
            // The device's restore needs the user's login for a stored key (always private).
            tried += 1;
            let got = device_restore(h, &wrapped);
            assert_eq!(got, Err(CKR_USER_NOT_LOGGED_IN), "without a PIN the device restores no stored key");
        }
        for &k in &own {
            let mut m = mech_of(CKM_AES_ECB);
            // SAFETY: a valid mechanism.
            assert_ne!(unsafe { hsm.0.C_DecryptInit.unwrap()(h, &mut m, k) }, CKR_OK, "key {k} decrypts without a PIN");
        }
    }
    println!("@@TRIED {tried}");
    println!("@@DONE");
}

fn mech_of(kind: CK_MECHANISM_TYPE) -> CK_MECHANISM {
    mech(kind)
}

/// A holder of the user PIN who can also write the key store can compute row MACs with the MAC key directly
/// on the backend (no PKCS#11 access control can stop a PIN holder using a key). What such a forged row can
/// and cannot do: it can change what the row says (here a usage flag), but a row that says the key's value
/// may be read or wrapped under any key is refused, and no forged row ever gives the value.
pub fn forged_rows_never_give_the_value() {
    let (_slot, s) = db_token("db23");
    let key = new_aes(&s, "victim");
    let row = rows("db23").into_iter().find(|r| r.label == b"victim").expect("its row");
    let hsm = Raw::backend();
    let h = s.handle();
    let device = common::device_mbk();
    let mac_key = if device {
        // The seal key is the device's blob in the key store, which this attacker reads and restores.
        let blob = seal_blob(&row.mbk);
        assert!(!blob.is_empty(), "the seal key's blob is in the store");
        device_restore(h, &blob).expect("the device restores the seal key for anyone with a session")
    } else {
        hsm.find(h, &[(CKA_LABEL, b"p11shim-mbk-mac".to_vec())])
            .expect("find")
            .pop()
            .expect("the MAC key is visible on the backend")
    };
    let forge = |edit: &dyn Fn(&mut p11shim::attrs::Template)| {
        let mut forged = row.clone();
        let mut attrs = p11shim::attrs::Template::decode(&forged.attrs).unwrap();
        edit(&mut attrs);
        forged.attrs = attrs.encode();
        forged.version = store_op("rows", "db23").into_iter().find(|r| r.id == row.id).unwrap().version + 1;
        forged.mac = hsm.sign(h, CKM_SHA256_HMAC, mac_key, &p11shim::vault::mac_input(&forged)).expect("a forged MAC");
        store_op("update", &encode_row(&forged));
    };
    use p11shim::attrs::Attr;
    // Readable: sensitive off, extractable on.
    forge(&|a| {
        a.set(Attr::bool(CKA_SENSITIVE, false));
        a.set(Attr::bool(CKA_EXTRACTABLE, true));
    });
    assert_eq!(refused_after_change(&s, key), RvError::GeneralError, "a row that would load readable is refused");
    let why = if device {
        "its row and its device blob disagree on CKA_SENSITIVE"
    } else {
        "whose value could be read or wrapped under any key"
    };
    assert!(shim_log().contains(why), "{}", shim_log());
    assert_eq!(Raw::shim().get(h, key.handle(), CKA_VALUE), Err(CKR_ATTRIBUTE_SENSITIVE), "never the value");
    // Extractable under any key.
    forge(&|a| {
        a.set(Attr::bool(CKA_SENSITIVE, true));
        a.set(Attr::bool(CKA_EXTRACTABLE, true));
        a.set(Attr::bool(CKA_WRAP_WITH_TRUSTED, false));
    });
    assert_eq!(refused_after_change(&s, key), RvError::GeneralError, "a row that would load wrappable is refused");
    // A usage flag: with an MBK set, accepted (what a MAC made by a PIN holder cannot catch; the README says
    // so), and the HSM copy enforces what the row says. A device blob holds the key's own flags, which the
    // row must repeat: the forged row is refused.
    if device {
        forge(&|a| {
            a.set(Attr::bool(CKA_SENSITIVE, true));
            a.set(Attr::bool(CKA_EXTRACTABLE, false));
            a.set(Attr::bool(CKA_ENCRYPT, false));
        });
        assert_eq!(refused_after_change(&s, key), RvError::GeneralError, "a row that lies about a usage flag");
        assert!(shim_log().contains("disagree on CKA_ENCRYPT"), "{}", shim_log());
        forge(&|a| a.set(Attr::bool(CKA_ENCRYPT, true)));
        encrypt_roundtrip(&s, key).expect("the row as the blob says it: the key works again");
        assert!(Raw::shim().wrap(h, CKM_AES_KEY_WRAP_PAD, key.handle(), key.handle()).is_err());
        return;
    }
    forge(&|a| {
        a.set(Attr::bool(CKA_SENSITIVE, true));
        a.set(Attr::bool(CKA_EXTRACTABLE, false));
        a.set(Attr::bool(CKA_WRAP_WITH_TRUSTED, false));
        a.set(Attr::bool(CKA_ENCRYPT, false));
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let got = s.encrypt(&Mechanism::AesEcb, key, &[0u8; 16]).map_err(rv);
        match got {
            Err(RvError::KeyFunctionNotPermitted) => break,
            _ if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(50)),
            other => panic!("the forged usage flag is what the HSM copy enforces: {other:?}"),
        }
    }
    let wrapped = Raw::shim().wrap(h, CKM_AES_KEY_WRAP_PAD, key.handle(), key.handle());
    assert!(wrapped.is_err(), "and the value is still out of reach");
}

/// CKA_ALWAYS_AUTHENTICATE on a stored private key is the HSM copy's: every signature needs
/// C_Login(CKU_CONTEXT_SPECIFIC) after C_SignInit, exactly as with the same key made in a pass-through slot.
pub fn always_authenticate_needs_a_context_login() {
    let (_slot, s) = db_token("db24");
    // Any token the config does not name as a database slot is a pass-through slot.
    let plain = new_token("reauth-plain");
    let native = user_session(plain);
    let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let make = |session: &Session| {
        session
            .generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &[Attribute::Token(true), Attribute::EcParams(p256.clone()), Attribute::Verify(true)],
                &[
                    Attribute::Token(true),
                    Attribute::Sign(true),
                    Attribute::Sensitive(true),
                    Attribute::AlwaysAuthenticate(true),
                    Attribute::Label(b"reauth".to_vec()),
                ],
            )
            .expect("an always-authenticate key pair")
            .1
    };
    let stored = make(&s);
    assert!(stored.handle() & (1 << 63) != 0, "stored");
    let native_key = make(&native);
    let shim = Raw::shim();
    for (session, key, what) in [(&s, stored, "stored"), (&native, native_key, "pass-through")] {
        assert_eq!(
            session.get_attributes(key, &[AttributeType::AlwaysAuthenticate]).unwrap(),
            vec![Attribute::AlwaysAuthenticate(true)]
        );
        let h = session.handle();
        assert_eq!(
            shim.sign(h, CKM_ECDSA, key.handle(), &[7u8; 32]),
            Err(CKR_USER_NOT_LOGGED_IN),
            "{what}: no context login"
        );
        let mut m = mech(CKM_ECDSA);
        // SAFETY: a valid mechanism.
        assert_eq!(unsafe { shim.0.C_SignInit.unwrap()(h, &mut m, key.handle()) }, CKR_OK);
        assert_eq!(shim.login(h, CKU_CONTEXT_SPECIFIC, "wrong-pin"), CKR_PIN_INCORRECT, "{what}");
        assert_eq!(shim.login(h, CKU_CONTEXT_SPECIFIC, USER_PIN), CKR_OK, "{what}: context login");
        assert_eq!(shim.sign_only(h, &[7u8; 32]).map(|s| s.len()), Ok(64), "{what}: signs after the context login");
        assert_eq!(
            shim.sign(h, CKM_ECDSA, key.handle(), &[7u8; 32]),
            Err(CKR_USER_NOT_LOGGED_IN),
            "{what}: one signature per login"
        );
        assert_eq!(
            shim.login(h, CKU_CONTEXT_SPECIFIC, USER_PIN),
            CKR_OPERATION_NOT_INITIALIZED,
            "{what}: no operation waits"
        );
    }
}

/// A key the backend can make but cannot wrap under the MBK (EdDSA on SoftHSM2) is kept in the HSM as an
/// ordinary token object of the token's group: usable, found by that group, listed with a log line; its
/// public half is stored. Never a return value PKCS#11 does not list for C_GenerateKeyPair.
pub fn unwrappable_keys_are_kept_by_the_hsm() {
    if backend() == Backend::Simulator {
        // The simulator offers no EdDSA; its unwrappable case (an unextractable key copied into the token) is in
        // every_creation_path_stores.
        return;
    }
    let (_slot, s) = db_token("db25");
    let ed25519 = vec![0x06, 0x03, 0x2b, 0x65, 0x70];
    let make = || {
        s.generate_key_pair(
            &Mechanism::EccEdwardsKeyPairGen,
            &[
                Attribute::Token(true),
                Attribute::EcParams(ed25519.clone()),
                Attribute::Verify(true),
                Attribute::Label(b"ed".to_vec()),
            ],
            &[
                Attribute::Token(true),
                Attribute::Sign(true),
                Attribute::Sensitive(true),
                Attribute::Label(b"ed".to_vec()),
            ],
        )
    };
    for _ in 0..2 {
        // The second time the shim knows the shape and makes it in the HSM at once.
        let (public, private) = make().expect("C_GenerateKeyPair of an EdDSA key pair in a database slot");
        assert!(private.handle() & (1 << 63) == 0, "the private key is the HSM's");
        assert!(public.handle() & (1 << 63) != 0, "its public key is stored");
        let eddsa = Mechanism::Eddsa(cryptoki::mechanism::eddsa::EddsaParams::new(
            cryptoki::mechanism::eddsa::EddsaSignatureScheme::Pure,
        ));
        let sig = s.sign(&eddsa, private, b"message").expect("sign");
        s.verify(&eddsa, public, b"message", &sig).expect("verify with the stored public key");
        let group = s.get_attributes(private, &[AttributeType::VendorDefined(GROUP)]).unwrap();
        assert_eq!(group, vec![Attribute::VendorDefined((AttributeType::VendorDefined(GROUP), b"G25".to_vec()))]);
    }
    assert!(
        shim_log().contains("because the HSM cannot wrap it under the MBK (CKR_KEY_NOT_WRAPPABLE)"),
        "{}",
        shim_log()
    );
    let found = s
        .find_objects(&[group_attr("G25"), Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .expect("find by the token's group");
    assert_eq!(found.len(), 2, "both EdDSA private keys, found by the token's group");
    let private = found[0];
    assert_eq!(
        rv(s.update_attributes(private, &[group_attr("Elsewhere")]).unwrap_err()),
        RvError::AttributeReadOnly,
        "a key the HSM keeps stays in the token's group"
    );
    s.update_attributes(private, &[group_attr("G25"), Attribute::Label(b"ed2".to_vec())])
        .expect("same group, new label");
    // A session copy has no group to be given.
    assert_eq!(
        rv(s.copy_object(private, &[Attribute::Token(false), group_attr("G25")]).unwrap_err()),
        RvError::AttributeTypeInvalid
    );
    // Asking for another group at creation is refused, and nothing is made.
    let before = s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)]).unwrap().len();
    let other = s.generate_key_pair(
        &Mechanism::EccEdwardsKeyPairGen,
        &[Attribute::Token(true), Attribute::EcParams(ed25519.clone())],
        &[Attribute::Token(true), Attribute::Sign(true), group_attr("Elsewhere")],
    );
    assert_eq!(rv(other.unwrap_err()), RvError::TemplateInconsistent);
    assert_eq!(s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)]).unwrap().len(), before);
}

/// C_InitToken of a database slot destroys its stored keys (their rows) and makes a new MBK set with the SO
/// PIN given: an empty, working database slot, audited. A store shared by hosts (PostgreSQL) refuses while it
/// holds the token's keys, and nothing changes.
pub fn init_token_empties_a_database_slot() {
    let (slot, s) = db_token("db26");
    let old = new_aes(&s, "old");
    encrypt_roundtrip(&s, old).unwrap();
    let fingerprint = || {
        let out = cli().args(["mbk", "show", "--token", "db26"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("fingerprint:").map(|f| f.trim().to_string()))
    };
    let before = fingerprint().expect("an MBK");
    drop(s);
    let p = pkcs11();
    // SAFETY: C_CloseAllSessions through the shim; this test holds no other session on the token.
    assert_eq!(unsafe { Raw::shim().0.C_CloseAllSessions.unwrap()(slot.id()) }, CKR_OK);
    let postgres = store_url().starts_with("postgres");
    if !postgres {
        // Refused by the HSM: nothing changes, and the stored keys work on.
        let wrong = p.init_token(slot, &cryptoki::types::AuthPin::new("wrong-so-pin".into()), "db26");
        assert_eq!(rv(wrong.unwrap_err()), RvError::PinIncorrect);
        assert_eq!(rows("db26").len(), 1);
        let s = user_session(slot);
        encrypt_roundtrip(&s, old).expect("the key still works after a refused C_InitToken");
        drop(s);
        // SAFETY: as above.
        assert_eq!(unsafe { Raw::shim().0.C_CloseAllSessions.unwrap()(slot.id()) }, CKR_OK);
    }
    let result = p.init_token(slot, &cryptoki::types::AuthPin::new(SO_PIN.into()), "db26");
    if postgres {
        assert_eq!(rv(result.unwrap_err()), RvError::TokenWriteProtected);
        assert!(shim_log().contains("C_InitToken of database slot \"db26\" refused"), "{}", shim_log());
        assert_eq!(rows("db26").len(), 1, "the shared store keeps the key");
        assert_eq!(fingerprint().as_deref(), Some(before.as_str()), "the HSM was not touched");
        let s = user_session(slot);
        encrypt_roundtrip(&s, old).expect("the key still works");
        return;
    }
    result.expect("C_InitToken of a database slot");
    assert!(rows("db26").is_empty(), "the token's stored keys are destroyed with it");
    let after = fingerprint().expect("a new MBK set, made with the SO PIN given");
    if common::device_mbk() {
        assert_eq!(after, before, "the device's MBK belongs to the device, not to the token");
    } else {
        assert_ne!(after, before);
    }
    let slot = common::find_token("db26").expect("the token");
    let so = p.open_rw_session(slot).unwrap();
    so.login(cryptoki::session::UserType::So, Some(&cryptoki::types::AuthPin::new(SO_PIN.into()))).unwrap();
    so.init_pin(&cryptoki::types::AuthPin::new(USER_PIN.into())).unwrap();
    so.logout().unwrap();
    let s = user_session(slot);
    assert!(s.find_objects(&[Attribute::Label(b"old".to_vec())]).unwrap().is_empty());
    assert!(s.encrypt(&Mechanism::AesEcb, old, &[0u8; 16]).is_err(), "the old handle is gone");
    let new = new_aes(&s, "new");
    encrypt_roundtrip(&s, new).expect("the slot works at once");
    assert_eq!(rows("db26").len(), 1);
    let audit = cli().args(["audit", "show"]).output().unwrap();
    let audit = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.contains("init-token db26") && audit.contains("1 stored keys destroyed"), "audited: {audit}");
}
