//! The master backup key set on a token: the MBK (AES-256, wrap/unwrap only, trusted, extractable only under
//! a trusted key) and the MAC key (HMAC-SHA256, sign/verify only) that authenticates key store rows and
//! backup records. Both are made inside the HSM by the SO and never leave it in clear.
//!
//! The fingerprint identifies the set without revealing anything about it: SHA-256 over the MAC key wrapped
//! under the MBK (RFC 5649 is deterministic), truncated to 128 bits. Both keys go into it, so two HSMs show
//! the same fingerprint exactly when they hold the same set (issue C clones it between HSMs).

use crate::attrs::{Attr, Template};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::hsm::Mechanism;
use cryptoki_sys::*;
use sha2::{Digest, Sha256};

pub const MBK_LABEL: &str = "p11shim-mbk";
pub const MAC_LABEL: &str = "p11shim-mbk-mac";

/// A key set found on a token, with the wrap mechanism the backend offers for RFC 5649.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MbkSet {
    pub mbk: CK_OBJECT_HANDLE,
    pub mac: CK_OBJECT_HANDLE,
    pub wrap: CK_MECHANISM_TYPE,
    pub fingerprint: String,
}

impl MbkSet {
    pub fn wrap_mechanism(&self) -> Mechanism {
        Mechanism::plain(self.wrap)
    }
    pub fn mac_mechanism() -> Mechanism {
        Mechanism::plain(CKM_SHA256_HMAC)
    }
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

/// Refuses a key of the set whose usage was widened (a cloned MBK stays modifiable on SoftHSM2, which
/// refuses CKA_MODIFIABLE=false on an unwrapped key; a user could give it CKA_DECRYPT and unwrap by hand).
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

fn find_one(backend: &Backend, session: CK_SESSION_HANDLE, label: &str) -> Result<Option<CK_OBJECT_HANDLE>> {
    let template = Template(vec![Attr::ulong(CKA_CLASS, CKO_SECRET_KEY), Attr::bytes(CKA_LABEL, label.as_bytes())]);
    let found = backend.find(session, &template)?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(Error::Other(format!("the token holds {} keys labelled {label:?}; there must be one", found.len()))),
    }
}

/// The key set on the session's token, if there is one (both keys are public objects: no login needed).
pub fn find(backend: &Backend, session: CK_SESSION_HANDLE, slot: CK_SLOT_ID) -> Result<Option<MbkSet>> {
    let (Some(mbk), Some(mac)) = (find_one(backend, session, MBK_LABEL)?, find_one(backend, session, MAC_LABEL)?)
    else {
        return Ok(None);
    };
    check_usage(backend, session, mbk, MBK_LABEL, &[CKA_WRAP, CKA_UNWRAP])?;
    check_usage(backend, session, mac, MAC_LABEL, &[CKA_SIGN, CKA_VERIFY])?;
    let wrap = wrap_mechanism(backend, slot)?;
    let fingerprint = fingerprint(backend, session, mbk, mac, wrap)?;
    Ok(Some(MbkSet { mbk, mac, wrap, fingerprint }))
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

/// The MBK's template: AES-256 that only wraps and unwraps, sensitive, trusted (SO only), extractable only
/// under a trusted key, and whose unwrap template makes every key it unwraps extractable only that way too.
/// Not modifiable (a user could otherwise give it CKA_DECRYPT and unwrap by hand), not copyable, not
/// destroyable. A public object: SoftHSM2 requires that of a trusted key (see README, security model).
pub(crate) fn mbk_template() -> Template {
    let mut t = common(MBK_LABEL);
    t.0.extend([
        Attr::ulong(CKA_KEY_TYPE, CKK_AES),
        Attr::ulong(CKA_VALUE_LEN, 32),
        Attr::bool(CKA_WRAP, true),
        Attr::bool(CKA_UNWRAP, true),
        Attr::bool(CKA_SIGN, false),
        Attr::bool(CKA_VERIFY, false),
        Attr::bool(CKA_TRUSTED, true),
        Attr::array(CKA_UNWRAP_TEMPLATE, vec![Attr::bool(CKA_WRAP_WITH_TRUSTED, true)]),
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
    ]);
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

/// Creates the key set in a session where the SO is logged in. Refuses if one exists already.
pub fn create(backend: &Backend, so_session: CK_SESSION_HANDLE, slot: CK_SLOT_ID) -> Result<MbkSet> {
    if let Some(existing) = find(backend, so_session, slot)? {
        return Err(Error::Other(format!(
            "the token already has a master backup key (fingerprint {}); p11shim never replaces one, since every stored key and backup depends on it",
            existing.fingerprint
        )));
    }
    let wrap = wrap_mechanism(backend, slot)?;
    let mbk = backend.generate_key(so_session, &Mechanism::plain(CKM_AES_KEY_GEN), &mbk_template())?;
    let mac = match backend.generate_key(so_session, &Mechanism::plain(CKM_GENERIC_SECRET_KEY_GEN), &mac_template()) {
        Ok(mac) => mac,
        Err(e) => {
            // Not destroyable by design; a half set would be found as "no MBK" and refused as "exists" later.
            crate::error!("creating the MBK's MAC key failed ({e}); the MBK itself was created and must be removed by re-initializing the token");
            return Err(e);
        }
    };
    let fingerprint = fingerprint(backend, so_session, mbk, mac, wrap)?;
    Ok(MbkSet { mbk, mac, wrap, fingerprint })
}

/// Checks, as a logged-in user, that the set does what the key store needs: a key the user makes can be
/// wrapped under the MBK, unwrapped again under its unwrap template, and a MAC made and checked.
pub fn self_test(backend: &Backend, user_session: CK_SESSION_HANDLE, set: &MbkSet) -> Result<()> {
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
        let wrapped = backend.wrap_key(user_session, &set.wrap_mechanism(), set.mbk, key)?;
        let mut back = probe.clone();
        back.remove(CKA_VALUE_LEN);
        let copy = backend.unwrap_key(user_session, &set.wrap_mechanism(), set.mbk, &wrapped, &back)?;
        let _ = backend.destroy_object(user_session, copy);
        let mac = backend.sign(user_session, &MbkSet::mac_mechanism(), set.mac, &wrapped)?;
        backend.verify(user_session, &MbkSet::mac_mechanism(), set.mac, &wrapped, &mac)
    })();
    let _ = backend.destroy_object(user_session, key);
    result
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
        let t = mbk_template();
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
    }
}
