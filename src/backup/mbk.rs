//! The master backup key set on a token: the MBK (AES-256, wrap/unwrap only, trusted, extractable only under
//! a trusted key), the MAC key (HMAC-SHA256, sign/verify only) that authenticates key store rows and backup
//! records, and the load key: the MBK's value once more, which only unwraps. All are made inside the HSM by
//! the SO and never leave it in clear.
//!
//! Custody is the HSM's to enforce, whoever holds the user PIN: every key of the set is unmodifiable and
//! allowed one mechanism only (so a widened usage flag cannot turn the MBK into an AES decryptor of RFC 5649
//! blobs), and each unwrapping key carries an unwrap template that the HSM checks against the caller's
//! template. The MBK unwraps only into sensitive, wrap-with-trusted, private objects; the load key only into
//! unextractable, private objects. So no unwrap of a stored key's blob, by anyone, yields an object whose
//! value can be read or wrapped under an untrusted key, and none works without the user's login. Two
//! unwrapping keys are needed because one template cannot say "sensitive or unextractable": a key the
//! application made unextractable (sensitive or not) loads under the load key, an extractable one (sensitive
//! and wrap-with-trusted) under the MBK, each exactly as the application made it.
//!
//! The fingerprint identifies the set without revealing anything about it: SHA-256 over the MAC key wrapped
//! under the MBK (RFC 5649 is deterministic), truncated to 128 bits. Both keys go into it, so two HSMs show
//! the same fingerprint exactly when they hold the same set (cloning copies it between HSMs). The load key is
//! made from the MBK on each token, so it is not part of what is cloned.

use crate::attrs::{Attr, Template, Value};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::hsm::Mechanism;
use cryptoki_sys::*;
use sha2::{Digest, Sha256};

pub const MBK_LABEL: &str = "p11shim-mbk";
pub const MAC_LABEL: &str = "p11shim-mbk-mac";
pub const LOAD_LABEL: &str = "p11shim-mbk-load";

/// A key set found on a token, with the wrap mechanism the backend offers for RFC 5649.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MbkSet {
    pub mbk: CK_OBJECT_HANDLE,
    pub mac: CK_OBJECT_HANDLE,
    /// The load key (None in a set made by an earlier version).
    pub load: Option<CK_OBJECT_HANDLE>,
    pub wrap: CK_MECHANISM_TYPE,
    pub fingerprint: String,
    /// Why the set cannot be trusted to keep custody (made by an earlier version of p11shim); None when it can.
    pub outdated: Option<String>,
    /// Set when the device keeps the MBK itself: then the set has no objects at all (`mbk`, `mac` are 0,
    /// `load` is None, `wrap` is [`DEVICE_BLOB`]), keys are stored as the device's blobs, and MACs are made
    /// with the key store's seal key for this MBK (see [`Device`]).
    pub device: Option<Device>,
}

/// The device's MBK, as a set uses it. The MBK never leaves the device and no application can use it; what
/// p11shim seals (key rows, users, audit entries, backup records) is MAC'd inside the device with a seal key:
/// an HMAC key made in the device once per MBK and key store, kept in the store only as the device's blob
/// under the MBK (never in clear, never as a token object), and brought back into a session object of the
/// shim's for each MAC, destroyed right after. A backup carries the blob, so any device with the same MBK
/// checks it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Device {
    /// The seal key's blob; None until [`attach_seal`] found or made it.
    pub seal: Option<Vec<u8>>,
}

/// The `wrap_mech` recorded for a device blob (in key rows and backup records): not a mechanism, a marker.
pub const DEVICE_BLOB: CK_MECHANISM_TYPE = CKM_VENDOR_DEFINED | 0x4353_424b;
/// The device holds no MBK (simulator/include/cssim_mbk.h).
pub const CKR_DEVICE_NO_MBK: CK_RV = CKR_VENDOR_DEFINED + 0x4353_0001;
/// A blob made under another MBK.
pub const CKR_DEVICE_WRONG_MBK: CK_RV = CKR_VENDOR_DEFINED + 0x4353_0002;
/// A blob whose MAC does not verify: altered or damaged.
pub const CKR_DEVICE_BLOB_MAC: CK_RV = CKR_VENDOR_DEFINED + 0x4353_0003;
/// Not a blob, truncated, or an unknown blob version.
pub const CKR_DEVICE_BLOB_FORMAT: CK_RV = CKR_VENDOR_DEFINED + 0x4353_0004;

/// What a device's refusal of a blob means, for messages.
pub fn device_refusal(rv: CK_RV) -> Option<&'static str> {
    match rv {
        CKR_DEVICE_NO_MBK => Some("the device holds no MBK"),
        CKR_DEVICE_WRONG_MBK => Some("wrong MBK: the blob was made under another MBK than the device's"),
        CKR_DEVICE_BLOB_MAC => Some("blob MAC: the blob was altered or damaged"),
        CKR_DEVICE_BLOB_FORMAT => Some("blob format: not a device blob, truncated, or of an unknown version"),
        _ => None,
    }
}

impl MbkSet {
    /// Whether the device keeps the MBK (no objects of p11shim's in the token).
    pub fn is_device(&self) -> bool {
        self.device.is_some()
    }
    /// What kind of MBK this is, for messages, status and backup headers: "device" or "set".
    pub fn kind(&self) -> &'static str {
        if self.is_device() {
            "device"
        } else {
            "set"
        }
    }
    /// The key's blob under the MBK: the device's backup of it, or the key wrapped under the set's MBK.
    pub fn wrap(&self, backend: &Backend, session: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> Result<Vec<u8>> {
        if self.is_device() {
            backend.device_backup(session, key).map_err(device_error)
        } else {
            backend.wrap_key(session, &self.wrap_mechanism(), self.mbk, key)
        }
    }
    pub fn wrap_mechanism(&self) -> Mechanism {
        Mechanism::plain(self.wrap)
    }
    pub fn mac_mechanism() -> Mechanism {
        Mechanism::plain(CKM_SHA256_HMAC)
    }
    /// Every object of the set (the application may name none of them).
    pub fn handles(&self) -> Vec<CK_OBJECT_HANDLE> {
        if self.is_device() {
            return Vec::new();
        }
        [Some(self.mbk), Some(self.mac), self.load].into_iter().flatten().collect()
    }
    /// The set, if it keeps custody; else an error that says how to replace it. Needed before anything is
    /// unwrapped under it.
    pub fn current(&self, token: &str) -> Result<&MbkSet> {
        match &self.outdated {
            None => Ok(self),
            Some(why) => {
                let message = outdated(token, &self.fingerprint, why);
                crate::error!("{message}");
                Err(Error::Other(message))
            }
        }
    }
    /// The key that unwraps a blob into an object with these attributes, as asked: the load key for an
    /// unextractable key, the MBK for a sensitive, wrap-with-trusted one; None when neither may (a key whose
    /// value could be read, or one any key could wrap). Either makes a private object, whatever CKA_PRIVATE
    /// the application gave: nobody without the user's login may use a stored key.
    pub fn unwrapper_for(&self, attrs: &Template) -> Option<CK_OBJECT_HANDLE> {
        match (attrs.bool(CKA_EXTRACTABLE), attrs.bool(CKA_SENSITIVE), attrs.bool(CKA_WRAP_WITH_TRUSTED)) {
            (Some(false), _, _) => self.load,
            (Some(true), Some(true), Some(true)) => Some(self.mbk),
            _ => None,
        }
    }
}

/// MACs made and checked inside the HSM with a set's MAC key (HMAC-SHA256), on one session: what seals key
/// rows, backup records, users rows and audit entries.
pub struct HsmSealer<'a> {
    pub backend: &'a Backend,
    pub session: CK_SESSION_HANDLE,
    pub set: &'a MbkSet,
}

impl HsmSealer<'_> {
    /// Runs `f` with the MAC key: the set's, or the device's seal key brought back for this one call.
    fn with_mac<R>(&self, f: impl FnOnce(CK_OBJECT_HANDLE) -> Result<R>) -> Result<R> {
        let Some(device) = &self.set.device else { return f(self.set.mac) };
        let blob = device.seal.as_deref().ok_or_else(|| {
            Error::Missing(format!(
                "the key store has no seal key for the device MBK {} yet: make it with `p11shim mbk create`",
                self.set.fingerprint
            ))
        })?;
        let key = self.backend.device_restore(self.session, blob, false).map_err(device_error)?;
        crate::objects::own(key);
        let result = f(key);
        let _ = self.backend.destroy_object(self.session, key);
        crate::objects::disown(key);
        result
    }
}

impl super::format::Sealer for HsmSealer<'_> {
    fn seal(&self, data: &[u8]) -> Result<Vec<u8>> {
        self.with_mac(|mac| self.backend.sign(self.session, &MbkSet::mac_mechanism(), mac, data))
    }
    fn key_name(&self) -> String {
        self.set.fingerprint.clone()
    }
    fn check(&self, data: &[u8], mac: &[u8]) -> Result<bool> {
        self.with_mac(|key| match self.backend.verify(self.session, &MbkSet::mac_mechanism(), key, data, mac) {
            Ok(()) => Ok(true),
            Err(Error::Rv(CKR_SIGNATURE_INVALID | CKR_SIGNATURE_LEN_RANGE)) => Ok(false),
            Err(e) => Err(e),
        })
    }
}

/// A device refusal as an error whose message names it (wrong MBK, blob MAC, blob format, no MBK); other
/// errors as they are.
pub fn device_error(e: Error) -> Error {
    match &e {
        Error::Rv(rv) => match device_refusal(*rv) {
            Some(why) if *rv == CKR_DEVICE_WRONG_MBK => Error::Damaged(why.to_string()),
            Some(why) if *rv == CKR_DEVICE_NO_MBK => Error::Missing(format!("{why}: {}", device_missing_fix())),
            Some(why) => Error::Damaged(why.to_string()),
            None => e,
        },
        _ => e,
    }
}

fn device_missing_fix() -> &'static str {
    "load it from its shares with the device's administration tool (CryptoServer: csadm MBKImport; simulator: cssim-admin mbk import), or generate one there (csadm MBKGenerate; cssim-admin mbk generate)"
}

/// The device's MBK, if the backend keeps one itself: Ok(None) when it has no device MBK interface (the set
/// of objects is used then); an error that says how to load one when the device offers it but holds none.
pub fn device(backend: &Backend, slot: CK_SLOT_ID) -> Result<Option<MbkSet>> {
    let Some(info) = backend.device_mbk_info(slot)? else { return Ok(None) };
    if info.loaded == CK_FALSE {
        return Err(Error::Missing(format!(
            "the HSM keeps its own master backup key (MBK), but holds none: {}",
            device_missing_fix()
        )));
    }
    Ok(Some(MbkSet {
        mbk: 0,
        mac: 0,
        load: None,
        wrap: DEVICE_BLOB,
        fingerprint: format_fingerprint(&info.fingerprint),
        outdated: None,
        device: Some(Device::default()),
    }))
}

/// The seal key template: HMAC-SHA256, sign and verify only, never extractable, a public session object (MACs
/// are checked before any login, as the set's MAC key allows; see the README's security model).
fn seal_template() -> Template {
    Template(vec![
        Attr::ulong(CKA_CLASS, CKO_SECRET_KEY),
        Attr::ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET),
        Attr::ulong(CKA_VALUE_LEN, 32),
        Attr::bytes(CKA_LABEL, b"p11shim-seal"),
        Attr::bool(CKA_TOKEN, false),
        Attr::bool(CKA_PRIVATE, false),
        Attr::bool(CKA_SENSITIVE, true),
        Attr::bool(CKA_EXTRACTABLE, false),
        Attr::bool(CKA_SIGN, true),
        Attr::bool(CKA_VERIFY, true),
        Attr::bool(CKA_ENCRYPT, false),
        Attr::bool(CKA_DECRYPT, false),
        Attr::bool(CKA_WRAP, false),
        Attr::bool(CKA_UNWRAP, false),
        Attr::bool(CKA_DERIVE, false),
        Attr::bytes(CKA_ALLOWED_MECHANISMS, &CKM_SHA256_HMAC.to_ne_bytes()),
    ])
}

/// Finds the key store's seal key for a device set, or makes it: in the device, backed up under its MBK, the
/// blob stored (the first writer wins when several hosts start at once). Refused when the store holds rows
/// sealed under this MBK but no seal key: a new one would fail every one of them, so the store lost its seal
/// key and must get it back (from a backup of the store, or any backup file made under this MBK).
/// With `create` false (`p11shim status`, which changes nothing), a store without the seal key leaves the set
/// without one: sealing then fails with a message naming `p11shim mbk create`.
pub fn attach_seal(
    set: &mut MbkSet,
    backend: &Backend,
    session: CK_SESSION_HANDLE,
    store: &dyn crate::store::KeyStore,
    create: bool,
) -> Result<()> {
    let Some(device) = set.device.as_mut() else { return Ok(()) };
    if device.seal.is_some() {
        return Ok(());
    }
    if let Some(blob) = store.seal_key(&set.fingerprint)? {
        device.seal = Some(blob);
        return Ok(());
    }
    if !create {
        return Ok(());
    }
    if store.sealed_under(&set.fingerprint)? {
        return Err(Error::Damaged(format!(
            "{} holds rows sealed under the device MBK {} but not the seal key they were sealed with: it was deleted; put it back from a backup of the store (p11shim db restore) or restore a backup file made under this MBK",
            store.describe(),
            set.fingerprint
        )));
    }
    let key = backend.generate_key(session, &Mechanism::plain(CKM_GENERIC_SECRET_KEY_GEN), &seal_template())?;
    let blob = backend.device_backup(session, key).map_err(device_error);
    let _ = backend.destroy_object(session, key);
    let blob = blob?;
    if !store.seal_key_insert(&set.fingerprint, &blob)? {
        crate::debug!("another process made the seal key for device MBK {} first", set.fingerprint);
    }
    let stored = store
        .seal_key(&set.fingerprint)?
        .ok_or_else(|| Error::Other(format!("{}: the seal key just stored cannot be read back", store.describe())))?;
    if let Some(d) = set.device.as_mut() {
        d.seal = Some(stored);
    }
    Ok(())
}

/// A copy of a device set that seals with `blob` (the seal key a backup file carries).
pub fn device_seal_of(set: &MbkSet, blob: Vec<u8>) -> MbkSet {
    MbkSet { device: Some(Device { seal: Some(blob) }), ..set.clone() }
}

/// What the MBK's unwrap template forces on every object unwrapped under it.
pub fn mbk_unwrap_template() -> Vec<Attr> {
    vec![Attr::bool(CKA_SENSITIVE, true), Attr::bool(CKA_WRAP_WITH_TRUSTED, true), Attr::bool(CKA_PRIVATE, true)]
}

/// What the load key's unwrap template forces on every object unwrapped under it.
pub fn load_unwrap_template() -> Vec<Attr> {
    vec![Attr::bool(CKA_EXTRACTABLE, false), Attr::bool(CKA_PRIVATE, true)]
}

fn outdated(token: &str, fingerprint: &str, why: &str) -> String {
    format!(
        "token {token:?}: its MBK set (fingerprint {fingerprint}) was made by an earlier version of p11shim and does not keep custody ({why}): a holder of the user PIN could unwrap stored keys into readable objects, so p11shim refuses to unwrap under it. Replace it: `p11shim mbk export-shares` (or clone it to another token), re-initialize the token with the HSM vendor's tool (not through p11shim, which would destroy the token's stored keys), then `p11shim mbk import-shares`; stored keys and backups stay valid (same fingerprint)"
    )
}

/// Why an operation that needs the MBK cannot have it; the message says how to fix it.
pub fn missing(token: &str) -> String {
    format!(
        "token {token:?} has no master backup key (MBK): create it with `p11shim mbk create --token {token}` (needs the token's SO and user PINs)"
    )
}

/// RFC 5649 as the backend names it: CKM_AES_KEY_WRAP_PAD (SoftHSM2) or CKM_AES_KEY_WRAP_KWP (PKCS#11 3.0).
pub fn wrap_mechanism(backend: &Backend, slot: CK_SLOT_ID) -> Result<CK_MECHANISM_TYPE> {
    let offered = backend.mechanisms(slot)?;
    [CKM_AES_KEY_WRAP_PAD, CKM_AES_KEY_WRAP_KWP].into_iter().find(|m| offered.contains(m)).ok_or_else(|| {
        Error::Other("the backend offers neither CKM_AES_KEY_WRAP_PAD nor CKM_AES_KEY_WRAP_KWP (RFC 5649 key wrap), which the MBK needs".into())
    })
}

/// Refuses a key of the set whose usage was widened (by someone with the SO PIN, or in a set an earlier
/// version left modifiable).
fn check_usage(
    backend: &Backend,
    session: CK_SESSION_HANDLE,
    key: CK_OBJECT_HANDLE,
    label: &str,
    allowed: &[CK_ATTRIBUTE_TYPE],
) -> Result<()> {
    const USES: [CK_ATTRIBUTE_TYPE; 8] =
        [CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP, CKA_UNWRAP, CKA_SIGN, CKA_VERIFY, CKA_DERIVE, CKA_SIGN_RECOVER];
    let got = backend.attributes(session, key, &USES)?;
    let widened: Vec<_> = USES.iter().filter(|u| !allowed.contains(u) && got.bool(**u) == Some(true)).collect();
    if widened.is_empty() {
        return Ok(());
    }
    let message = format!(
        "the key {label:?} of the MBK set has usage attributes it was not made with ({}): someone changed it, and it may have been misused; p11shim refuses to use it. Re-initialize the token and restore the MBK from a clone or shares",
        widened.iter().map(|u| crate::error::attr_name(**u)).collect::<Vec<_>>().join(", ")
    );
    crate::error!("{message}");
    Err(Error::Other(message))
}

/// Why a key of the set does not enforce what custody needs (None when it does): unmodifiable, allowed only
/// `mechanism`, and an unwrap template holding at least `forces`.
fn custody_gap(
    backend: &Backend,
    session: CK_SESSION_HANDLE,
    key: CK_OBJECT_HANDLE,
    label: &str,
    mechanism: CK_MECHANISM_TYPE,
    forces: &[Attr],
) -> Result<Option<String>> {
    let got = backend.attributes(session, key, &[CKA_MODIFIABLE, CKA_ALLOWED_MECHANISMS, CKA_UNWRAP_TEMPLATE])?;
    if got.bool(CKA_MODIFIABLE) != Some(false) {
        return Ok(Some(format!("{label} is modifiable")));
    }
    if got.bytes(CKA_ALLOWED_MECHANISMS) != Some(&mechanism.to_ne_bytes()[..]) {
        crate::debug!("{label}: allowed mechanisms {:?}", got.bytes(CKA_ALLOWED_MECHANISMS));
        return Ok(Some(format!("{label} is not limited to one mechanism ({mechanism:#x})")));
    }
    let template = match got.get(CKA_UNWRAP_TEMPLATE).map(|a| &a.value) {
        Some(Value::Array(inner)) => inner.as_slice(),
        _ => &[],
    };
    Ok(forces
        .iter()
        .find(|want| !template.contains(want))
        .map(|missing| format!("{label}'s unwrap template does not force {}", crate::error::attr_name(missing.ty))))
}

fn find_one(backend: &Backend, session: CK_SESSION_HANDLE, label: &str) -> Result<Option<CK_OBJECT_HANDLE>> {
    let template = Template(vec![Attr::ulong(CKA_CLASS, CKO_SECRET_KEY), Attr::bytes(CKA_LABEL, label.as_bytes())]);
    let found = backend.find(session, &template)?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(Error::Other(format!("the token holds {} keys labelled {label:?}; there must be one", found.len()))),
    }
}

/// The key set on the session's token, if there is one (every key is a public object: no login needed). A
/// set made by an earlier version is returned with `outdated` saying why nothing may be unwrapped under it.
pub fn find(backend: &Backend, session: CK_SESSION_HANDLE, slot: CK_SLOT_ID) -> Result<Option<MbkSet>> {
    if let Some(device) = device(backend, slot)? {
        return Ok(Some(device));
    }
    let (Some(mbk), Some(mac)) = (find_one(backend, session, MBK_LABEL)?, find_one(backend, session, MAC_LABEL)?)
    else {
        return Ok(None);
    };
    let load = find_one(backend, session, LOAD_LABEL)?;
    check_usage(backend, session, mbk, MBK_LABEL, &[CKA_WRAP, CKA_UNWRAP])?;
    check_usage(backend, session, mac, MAC_LABEL, &[CKA_SIGN, CKA_VERIFY])?;
    if let Some(load) = load {
        check_usage(backend, session, load, LOAD_LABEL, &[CKA_UNWRAP])?;
    }
    let wrap = wrap_mechanism(backend, slot)?;
    let outdated = match load {
        None => Some(format!("it has no {LOAD_LABEL}")),
        Some(load) => {
            let keys = [
                (mbk, MBK_LABEL, wrap, mbk_unwrap_template()),
                (load, LOAD_LABEL, wrap, load_unwrap_template()),
                (mac, MAC_LABEL, CKM_SHA256_HMAC, Vec::new()),
            ];
            let mut gap = None;
            for (key, label, mechanism, forces) in keys {
                gap = custody_gap(backend, session, key, label, mechanism, &forces)?;
                if gap.is_some() {
                    break;
                }
            }
            gap
        }
    };
    let fingerprint = fingerprint(backend, session, mbk, mac, wrap)?;
    Ok(Some(MbkSet { mbk, mac, load, wrap, fingerprint, outdated, device: None }))
}

pub(crate) fn fingerprint(
    backend: &Backend,
    session: CK_SESSION_HANDLE,
    mbk: CK_OBJECT_HANDLE,
    mac: CK_OBJECT_HANDLE,
    wrap: CK_MECHANISM_TYPE,
) -> Result<String> {
    let wrapped = backend.wrap_key(session, &Mechanism::plain(wrap), mbk, mac)?;
    let digest = Sha256::new().chain_update(b"p11shim mbk fingerprint v1\0").chain_update(&wrapped).finalize();
    Ok(format_fingerprint(&digest[..16]))
}

/// 32 hex digits in groups of 8: easy to read out and compare.
fn format_fingerprint(bytes: &[u8]) -> String {
    bytes.chunks(4).map(hex::encode).collect::<Vec<_>>().join("-")
}

/// The MBK's template: AES-256 that only wraps and unwraps, with `wrap` only, sensitive, trusted (SO only),
/// extractable only under a trusted key, and whose unwrap template forces what custody needs on every key it
/// unwraps. Not modifiable, not copyable, not destroyable. A public object: SoftHSM2 requires that of a
/// trusted key (see README, security model).
pub(crate) fn mbk_template(wrap: CK_MECHANISM_TYPE) -> Template {
    let mut t = common(MBK_LABEL);
    t.0.extend([
        Attr::ulong(CKA_KEY_TYPE, CKK_AES),
        Attr::ulong(CKA_VALUE_LEN, 32),
        Attr::bool(CKA_WRAP, true),
        Attr::bool(CKA_UNWRAP, true),
        Attr::bool(CKA_SIGN, false),
        Attr::bool(CKA_VERIFY, false),
        Attr::bool(CKA_TRUSTED, true),
        Attr::bytes(CKA_ALLOWED_MECHANISMS, &wrap.to_ne_bytes()),
        Attr::array(CKA_UNWRAP_TEMPLATE, mbk_unwrap_template()),
    ]);
    t
}

/// The MAC key: HMAC-SHA256, sign and verify only; otherwise as the MBK.
pub(crate) fn mac_template() -> Template {
    let mut t = common(MAC_LABEL);
    t.0.extend([
        Attr::ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET),
        Attr::ulong(CKA_VALUE_LEN, 32),
        Attr::bool(CKA_WRAP, false),
        Attr::bool(CKA_UNWRAP, false),
        Attr::bool(CKA_SIGN, true),
        Attr::bool(CKA_VERIFY, true),
        Attr::bytes(CKA_ALLOWED_MECHANISMS, &CKM_SHA256_HMAC.to_ne_bytes()),
    ]);
    t
}

/// The load key as a session object (made permanent by [`permanent`]): unwrap only, with `wrap` only, never
/// extractable, and an unwrap template that forces unextractable, private objects.
fn load_template(wrap: CK_MECHANISM_TYPE) -> Template {
    let mut t = session_form(common(LOAD_LABEL));
    t.0.extend([
        Attr::ulong(CKA_KEY_TYPE, CKK_AES),
        Attr::bool(CKA_WRAP, false),
        Attr::bool(CKA_UNWRAP, true),
        Attr::bool(CKA_SIGN, false),
        Attr::bool(CKA_VERIFY, false),
        Attr::bytes(CKA_ALLOWED_MECHANISMS, &wrap.to_ne_bytes()),
        Attr::array(CKA_UNWRAP_TEMPLATE, load_unwrap_template()),
    ]);
    t.set(Attr::bool(CKA_EXTRACTABLE, false));
    t.remove(CKA_WRAP_WITH_TRUSTED);
    t
}

fn common(label: &str) -> Template {
    Template(vec![
        Attr::ulong(CKA_CLASS, CKO_SECRET_KEY),
        Attr::bytes(CKA_LABEL, label.as_bytes()),
        Attr::bool(CKA_TOKEN, true),
        Attr::bool(CKA_PRIVATE, false),
        Attr::bool(CKA_ENCRYPT, false),
        Attr::bool(CKA_DECRYPT, false),
        Attr::bool(CKA_DERIVE, false),
        Attr::bool(CKA_SENSITIVE, true),
        Attr::bool(CKA_EXTRACTABLE, true),
        Attr::bool(CKA_WRAP_WITH_TRUSTED, true),
        Attr::bool(CKA_MODIFIABLE, false),
        Attr::bool(CKA_COPYABLE, false),
        Attr::bool(CKA_DESTROYABLE, false),
    ])
}

/// A key of the set as the session object that [`permanent`] copies into the token. SoftHSM2 refuses
/// CKA_MODIFIABLE=false on an unwrapped key but accepts it on a copy; a copy of an unmodifiable key can
/// change nothing, so the copyable flag the copy keeps gives nothing away.
pub(crate) fn session_form(mut t: Template) -> Template {
    t.remove(CKA_VALUE_LEN);
    t.remove(CKA_MODIFIABLE);
    t.remove(CKA_COPYABLE);
    t.set(Attr::bool(CKA_TOKEN, false));
    t.set(Attr::bool(CKA_DESTROYABLE, true));
    t
}

/// Copies a session key of the set into the token as its permanent, unmodifiable, undestroyable form, and
/// destroys the session key. CKA_MODIFIABLE comes last: SoftHSM2 applies a copy's template in order and
/// refuses every change after it.
pub(crate) fn permanent(backend: &Backend, so: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> Result<CK_OBJECT_HANDLE> {
    let copied = backend.copy_object(
        so,
        key,
        &Template(vec![
            Attr::bool(CKA_TOKEN, true),
            Attr::bool(CKA_DESTROYABLE, false),
            Attr::bool(CKA_MODIFIABLE, false),
        ]),
    );
    let _ = backend.destroy_object(so, key);
    copied
}

/// Makes the load key from the MBK (SO logged in): the MBK is wrapped under a trusted session key and
/// unwrapped again as the load key, inside the HSM. The transport key is destroyed whatever happens.
fn make_load(
    backend: &Backend,
    so: CK_SESSION_HANDLE,
    mbk: CK_OBJECT_HANDLE,
    wrap: CK_MECHANISM_TYPE,
) -> Result<CK_OBJECT_HANDLE> {
    let transport = backend.generate_key(
        so,
        &Mechanism::plain(CKM_AES_KEY_GEN),
        &Template(vec![
            Attr::ulong(CKA_CLASS, CKO_SECRET_KEY),
            Attr::ulong(CKA_VALUE_LEN, 32),
            Attr::bool(CKA_TOKEN, false),
            Attr::bool(CKA_PRIVATE, false),
            Attr::bool(CKA_SENSITIVE, true),
            Attr::bool(CKA_EXTRACTABLE, false),
            Attr::bool(CKA_WRAP, true),
            Attr::bool(CKA_UNWRAP, true),
            Attr::bool(CKA_TRUSTED, true),
        ]),
    )?;
    let made = (|| {
        let mech = Mechanism::plain(wrap);
        let blob = backend.wrap_key(so, &mech, transport, mbk)?;
        let key = backend.unwrap_key(so, &mech, transport, &blob, &load_template(wrap))?;
        permanent(backend, so, key)
    })();
    let _ = backend.destroy_object(so, transport);
    made
}

/// Creates the key set in a session where the SO is logged in. Refuses if one exists already.
pub fn create(backend: &Backend, so_session: CK_SESSION_HANDLE, slot: CK_SLOT_ID) -> Result<MbkSet> {
    // A device that keeps its own MBK needs nothing made: p11shim owns no MBK object there.
    if let Some(device) = device(backend, slot)? {
        return Ok(device);
    }
    if let Some(existing) = find(backend, so_session, slot)? {
        return Err(Error::Other(format!(
            "the token already has a master backup key (fingerprint {}); p11shim never replaces one, since every stored key and backup depends on it",
            existing.fingerprint
        )));
    }
    let wrap = wrap_mechanism(backend, slot)?;
    let mbk = backend.generate_key(so_session, &Mechanism::plain(CKM_AES_KEY_GEN), &mbk_template(wrap))?;
    let mac = match backend.generate_key(so_session, &Mechanism::plain(CKM_GENERIC_SECRET_KEY_GEN), &mac_template()) {
        Ok(mac) => mac,
        Err(e) => {
            // Not destroyable by design; a half set would be found as "no MBK" and refused as "exists" later.
            crate::error!("creating the MBK's MAC key failed ({e}); the MBK itself was created and must be removed by re-initializing the token");
            return Err(e);
        }
    };
    complete(backend, so_session, mbk, mac, wrap)
}

/// The set once its MBK and MAC key are in the token (made, cloned or rebuilt from shares): makes the load
/// key and the fingerprint.
pub(crate) fn complete(
    backend: &Backend,
    so_session: CK_SESSION_HANDLE,
    mbk: CK_OBJECT_HANDLE,
    mac: CK_OBJECT_HANDLE,
    wrap: CK_MECHANISM_TYPE,
) -> Result<MbkSet> {
    let load = make_load(backend, so_session, mbk, wrap).inspect_err(|e| {
        crate::error!("making the MBK's load key failed ({e}); the MBK and MAC key were created and must be removed by re-initializing the token")
    })?;
    let fingerprint = fingerprint(backend, so_session, mbk, mac, wrap)?;
    Ok(MbkSet { mbk, mac, load: Some(load), wrap, fingerprint, outdated: None, device: None })
}

/// Checks, as a logged-in user, that the set does what the key store needs and refuses what custody forbids:
/// a key the user makes is wrapped under the MBK and unwrapped again under each unwrapping key as stored keys
/// are loaded, never into a readable object, and a MAC is made and checked.
pub fn self_test(backend: &Backend, user_session: CK_SESSION_HANDLE, set: &MbkSet) -> Result<()> {
    if set.is_device() {
        return device_self_test(backend, user_session);
    }
    let probe = Template(vec![
        Attr::ulong(CKA_CLASS, CKO_SECRET_KEY),
        Attr::ulong(CKA_KEY_TYPE, CKK_AES),
        Attr::ulong(CKA_VALUE_LEN, 32),
        Attr::bool(CKA_TOKEN, false),
        Attr::bool(CKA_SENSITIVE, true),
        Attr::bool(CKA_EXTRACTABLE, true),
        Attr::bool(CKA_WRAP_WITH_TRUSTED, true),
        Attr::bool(CKA_ENCRYPT, true),
    ]);
    let key = backend.generate_key(user_session, &Mechanism::plain(CKM_AES_KEY_GEN), &probe)?;
    let result = (|| {
        let load = set.load.ok_or_else(|| Error::Other(format!("the set has no {LOAD_LABEL}")))?;
        let wrapped = backend.wrap_key(user_session, &set.wrap_mechanism(), set.mbk, key)?;
        let mut back = probe.clone();
        back.remove(CKA_VALUE_LEN);
        back.set(Attr::bool(CKA_PRIVATE, true));
        let mut unextractable = back.clone();
        unextractable.set(Attr::bool(CKA_EXTRACTABLE, false));
        unextractable.set(Attr::bool(CKA_SENSITIVE, false));
        for (unwrapper, template) in [(set.mbk, &back), (load, &unextractable)] {
            let copy = backend.unwrap_key(user_session, &set.wrap_mechanism(), unwrapper, &wrapped, template)?;
            let _ = backend.destroy_object(user_session, copy);
        }
        let mut readable = back.clone();
        readable.set(Attr::bool(CKA_SENSITIVE, false));
        for unwrapper in [set.mbk, load] {
            if let Ok(copy) = backend.unwrap_key(user_session, &set.wrap_mechanism(), unwrapper, &wrapped, &readable) {
                let _ = backend.destroy_object(user_session, copy);
                return Err(Error::Other(
                    "the HSM unwrapped a key into a readable object under the MBK set: it does not enforce the set's unwrap templates, so p11shim cannot keep custody on it".into(),
                ));
            }
        }
        let mac = backend.sign(user_session, &MbkSet::mac_mechanism(), set.mac, &wrapped)?;
        backend.verify(user_session, &MbkSet::mac_mechanism(), set.mac, &wrapped, &mac)
    })();
    let _ = backend.destroy_object(user_session, key);
    result
}

/// The device MBK's self-test: a sensitive key made in the device is backed up and restored as a session
/// object, which keeps its attributes (its value stays unreadable).
fn device_self_test(backend: &Backend, session: CK_SESSION_HANDLE) -> Result<()> {
    let probe = Template(vec![
        Attr::ulong(CKA_CLASS, CKO_SECRET_KEY),
        Attr::ulong(CKA_KEY_TYPE, CKK_AES),
        Attr::ulong(CKA_VALUE_LEN, 32),
        Attr::bool(CKA_TOKEN, false),
        Attr::bool(CKA_PRIVATE, true),
        Attr::bool(CKA_SENSITIVE, true),
        Attr::bool(CKA_EXTRACTABLE, false),
        Attr::bool(CKA_ENCRYPT, true),
    ]);
    let key = backend.generate_key(session, &Mechanism::plain(CKM_AES_KEY_GEN), &probe)?;
    let result = (|| {
        let blob = backend.device_backup(session, key).map_err(device_error)?;
        let copy = backend.device_restore(session, &blob, false).map_err(device_error)?;
        let got = backend.attributes(session, copy, &[CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_PRIVATE]);
        let _ = backend.destroy_object(session, copy);
        let got = got?;
        if got.bool(CKA_SENSITIVE) != Some(true) || got.bool(CKA_EXTRACTABLE) != Some(false) {
            return Err(Error::Other(
                "the device restored a sensitive, unextractable key with other attributes: it does not keep a key's attributes in its blobs, so p11shim cannot keep custody on it".into(),
            ));
        }
        Ok(())
    })();
    let _ = backend.destroy_object(session, key);
    result
}

#[cfg(test)]
impl MbkSet {
    /// A set of objects with handles 1 (MBK), 2 (MAC key) and 3 (load key), for unit tests of what is decided
    /// from it.
    pub(crate) fn for_tests() -> MbkSet {
        MbkSet {
            mbk: 1,
            mac: 2,
            load: Some(3),
            wrap: CKM_AES_KEY_WRAP_PAD,
            fingerprint: String::new(),
            outdated: None,
            device: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_grouped_hex() {
        assert_eq!(format_fingerprint(&[0xab; 16]), "abababab-abababab-abababab-abababab");
    }

    #[test]
    fn mbk_only_wraps_and_is_trusted() {
        let t = mbk_template(CKM_AES_KEY_WRAP_PAD);
        for (ty, want) in [
            (CKA_WRAP, true),
            (CKA_UNWRAP, true),
            (CKA_ENCRYPT, false),
            (CKA_DECRYPT, false),
            (CKA_SIGN, false),
            (CKA_TRUSTED, true),
            (CKA_WRAP_WITH_TRUSTED, true),
            (CKA_SENSITIVE, true),
            (CKA_MODIFIABLE, false),
        ] {
            assert_eq!(t.bool(ty), Some(want), "attribute {ty:#x}");
        }
        assert_eq!(t.ulong(CKA_VALUE_LEN), Some(32));
        assert_eq!(t.bytes(CKA_ALLOWED_MECHANISMS), Some(&CKM_AES_KEY_WRAP_PAD.to_ne_bytes()[..]));
        let load = load_template(CKM_AES_KEY_WRAP_PAD);
        assert_eq!(load.bool(CKA_WRAP), Some(false), "the load key only unwraps");
        assert_eq!(load.bool(CKA_EXTRACTABLE), Some(false), "and never leaves the HSM, not even wrapped");
    }

    #[test]
    fn each_unwrapping_key_loads_exactly_what_it_may() {
        let set = MbkSet::for_tests();
        let key = |s: bool, x: bool, w: bool, p: bool| {
            Template(vec![
                Attr::bool(CKA_SENSITIVE, s),
                Attr::bool(CKA_EXTRACTABLE, x),
                Attr::bool(CKA_WRAP_WITH_TRUSTED, w),
                Attr::bool(CKA_PRIVATE, p),
            ])
        };
        assert_eq!(set.unwrapper_for(&key(false, false, false, true)), Some(3), "unextractable: the load key");
        assert_eq!(set.unwrapper_for(&key(true, false, false, true)), Some(3));
        assert_eq!(set.unwrapper_for(&key(true, true, true, true)), Some(1), "extractable: the MBK");
        assert_eq!(set.unwrapper_for(&key(false, true, true, true)), None, "a readable value");
        assert_eq!(set.unwrapper_for(&key(true, true, false, true)), None, "wrappable under any key");
        assert_eq!(set.unwrapper_for(&key(true, false, false, false)), Some(3), "public: loaded private");
        // What each unwrap template forces is what the choice above relies on.
        assert!(mbk_unwrap_template().contains(&Attr::bool(CKA_SENSITIVE, true)));
        assert!(mbk_unwrap_template().contains(&Attr::bool(CKA_WRAP_WITH_TRUSTED, true)));
        assert!(load_unwrap_template().contains(&Attr::bool(CKA_EXTRACTABLE, false)));
        for t in [mbk_unwrap_template(), load_unwrap_template()] {
            assert!(t.contains(&Attr::bool(CKA_PRIVATE, true)));
        }
    }
}
