//! The MBK between HSMs, so that a backup can be restored elsewhere.
//!
//! Cloning never shows the MBK to the host: the target makes an RSA-3072 transport key pair and hands out
//! its public key (the request); the source's SO marks that public key trusted for this one wrap (the MBK is
//! extractable only under a trusted key) and wraps the MBK set with RSA-OAEP (the response); the target
//! unwraps it, checks the fingerprint, and destroys the transport keys.
//!
//! Disaster recovery by key shares is the other path, and it does put the MBK on the host: split into M-of-N
//! Shamir shares, zeroized after use. On a FIPS HSM, which refuses clear-text import and export of secrets,
//! it is refused by the HSM itself.

use super::mbk::{self, MbkSet, MAC_LABEL, MBK_LABEL};
use super::shamir;
use crate::admin::Token;
use crate::attrs::{Attr, Template};
use crate::error::{Error, Result};
use crate::hsm::Mechanism;
use cryptoki_sys::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

pub const TRANSPORT_LABEL: &str = "p11shim-transport";
const REQUEST_FORMAT: &str = "p11shim-clone-request v1";
const RESPONSE_FORMAT: &str = "p11shim-clone-response v1";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CloneRequest {
    pub format: String,
    /// The target token's label.
    pub token: String,
    /// Identifies the transport key: the first 16 bytes of SHA-256 over its modulus and exponent, in hex.
    pub request_id: String,
    pub modulus: String,
    pub exponent: String,
    pub time: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CloneResponse {
    pub format: String,
    pub request_id: String,
    /// The MBK set's fingerprint, to compare on the target.
    pub fingerprint: String,
    /// The OAEP hash used ("sha1" or "sha256").
    pub oaep: String,
    pub mbk: String,
    pub mac: String,
    pub source: String,
}

fn request_id(modulus: &[u8], exponent: &[u8]) -> String {
    let digest =
        Sha256::new().chain_update(b"p11shim transport v1\0").chain_update(modulus).chain_update(exponent).finalize();
    hex::encode(&digest[..16])
}

fn find_labelled(token: &Token, class: CK_OBJECT_CLASS, label: &str) -> Result<Vec<CK_OBJECT_HANDLE>> {
    token.backend.find(
        token.session,
        &Template(vec![
            Attr::ulong(CKA_CLASS, class),
            Attr::bytes(CKA_LABEL, label.as_bytes()),
            Attr::bool(CKA_TOKEN, true),
        ]),
    )
}

fn refuse_existing(token: &Token) -> Result<()> {
    if let Some(set) = mbk::find(token.backend, token.session, token.slot)? {
        return Err(Error::Other(format!(
            "token {:?} already has a master backup key (fingerprint {}); p11shim never replaces one",
            token.label, set.fingerprint
        )));
    }
    Ok(())
}

/// `mbk clone-request` on the target (SO logged in): a fresh RSA-3072 transport key pair; its public key.
pub fn request(token: &Token) -> Result<CloneRequest> {
    no_device(token)?;
    refuse_existing(token)?;
    for class in [CKO_PUBLIC_KEY, CKO_PRIVATE_KEY] {
        for h in find_labelled(token, class, TRANSPORT_LABEL)? {
            token.backend.destroy_object(token.session, h)?;
        }
    }
    let label = Attr::bytes(CKA_LABEL, TRANSPORT_LABEL.as_bytes());
    let public = Template(vec![
        Attr::ulong(CKA_CLASS, CKO_PUBLIC_KEY),
        Attr::ulong(CKA_KEY_TYPE, CKK_RSA),
        Attr::bool(CKA_TOKEN, true),
        Attr::bool(CKA_PRIVATE, false),
        Attr::ulong(CKA_MODULUS_BITS, 3072),
        Attr::bytes(CKA_PUBLIC_EXPONENT, &[1, 0, 1]),
        Attr::bool(CKA_ENCRYPT, true),
        Attr::bool(CKA_VERIFY, false),
        label.clone(),
    ]);
    // The SO can make only public objects; the private half is still sensitive and never extractable.
    let private = Template(vec![
        Attr::ulong(CKA_CLASS, CKO_PRIVATE_KEY),
        Attr::ulong(CKA_KEY_TYPE, CKK_RSA),
        Attr::bool(CKA_TOKEN, true),
        Attr::bool(CKA_PRIVATE, false),
        Attr::bool(CKA_SENSITIVE, true),
        Attr::bool(CKA_EXTRACTABLE, false),
        Attr::bool(CKA_UNWRAP, true),
        Attr::bool(CKA_DECRYPT, false),
        Attr::bool(CKA_SIGN, false),
        label,
    ]);
    let (pub_key, _) = token.backend.generate_key_pair(
        token.session,
        &Mechanism::plain(CKM_RSA_PKCS_KEY_PAIR_GEN),
        &public,
        &private,
    )?;
    let parts = token.backend.attributes(token.session, pub_key, &[CKA_MODULUS, CKA_PUBLIC_EXPONENT])?;
    let (modulus, exponent) =
        (parts.bytes(CKA_MODULUS).unwrap_or_default(), parts.bytes(CKA_PUBLIC_EXPONENT).unwrap_or_default());
    Ok(CloneRequest {
        format: REQUEST_FORMAT.into(),
        token: token.label.clone(),
        request_id: request_id(modulus, exponent),
        modulus: hex::encode(modulus),
        exponent: hex::encode(exponent),
        time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    })
}

/// `mbk clone-to` on the source (SO logged in): the MBK set wrapped for the request's transport key.
pub fn respond(token: &Token, req: &CloneRequest) -> Result<CloneResponse> {
    no_device(token)?;
    if req.format != REQUEST_FORMAT {
        return Err(Error::Damaged(format!(
            "not a clone request (format {:?}, expected {REQUEST_FORMAT:?})",
            req.format
        )));
    }
    let bad = |what: &str| Error::Damaged(format!("clone request: {what} is not hex"));
    let modulus = hex::decode(&req.modulus).map_err(|_| bad("modulus"))?;
    let exponent = hex::decode(&req.exponent).map_err(|_| bad("exponent"))?;
    if modulus.len() < 384 {
        return Err(Error::Other(format!(
            "clone request: the transport key has {} bits; RSA-3072 or more is required",
            modulus.len() * 8
        )));
    }
    if request_id(&modulus, &exponent) != req.request_id {
        return Err(Error::Damaged("clone request: its id does not match its key (edited?)".into()));
    }
    let set = mbk::find(token.backend, token.session, token.slot)?
        .ok_or_else(|| Error::Missing(mbk::missing(&token.label)))?;
    // Trusted (SO only) for this session: the MBK is extractable only under a trusted key.
    let target = token.backend.create_object(
        token.session,
        &Template(vec![
            Attr::ulong(CKA_CLASS, CKO_PUBLIC_KEY),
            Attr::ulong(CKA_KEY_TYPE, CKK_RSA),
            Attr::bool(CKA_TOKEN, false),
            Attr::bool(CKA_PRIVATE, false),
            Attr::bytes(CKA_MODULUS, &modulus),
            Attr::bytes(CKA_PUBLIC_EXPONENT, &exponent),
            Attr::bool(CKA_WRAP, true),
            Attr::bool(CKA_ENCRYPT, false),
            Attr::bool(CKA_TRUSTED, true),
            Attr::bytes(CKA_LABEL, b"p11shim-clone-target"),
        ]),
    )?;
    let result = (|| {
        // SHA-256 where the backend has it; SoftHSM2 offers OAEP with SHA-1 only.
        for (name, hash) in [("sha256", CKM_SHA256), ("sha1", CKM_SHA_1)] {
            let mech = Mechanism::rsa_oaep(hash);
            match token.backend.wrap_key(token.session, &mech, target, set.mbk) {
                Ok(mbk_blob) => {
                    let mac_blob = token.backend.wrap_key(token.session, &mech, target, set.mac)?;
                    return Ok(CloneResponse {
                        format: RESPONSE_FORMAT.into(),
                        request_id: req.request_id.clone(),
                        fingerprint: set.fingerprint.clone(),
                        oaep: name.into(),
                        mbk: hex::encode(mbk_blob),
                        mac: hex::encode(mac_blob),
                        source: token.label.clone(),
                    });
                }
                // SoftHSM2 answers CKR_ARGUMENTS_BAD to OAEP parameters other than SHA-1.
                Err(Error::Rv(CKR_MECHANISM_PARAM_INVALID | CKR_MECHANISM_INVALID | CKR_ARGUMENTS_BAD))
                    if hash == CKM_SHA256 =>
                {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Other("the backend cannot wrap with RSA-OAEP".into()))
    })();
    let _ = token.backend.destroy_object(token.session, target);
    result
}

/// `mbk clone-accept` on the target (SO logged in): unwraps the MBK set, checks its fingerprint, and
/// destroys the transport keys.
pub fn accept(token: &Token, resp: &CloneResponse) -> Result<MbkSet> {
    no_device(token)?;
    if resp.format != RESPONSE_FORMAT {
        return Err(Error::Damaged(format!(
            "not a clone response (format {:?}, expected {RESPONSE_FORMAT:?})",
            resp.format
        )));
    }
    refuse_existing(token)?;
    let publics = find_labelled(token, CKO_PUBLIC_KEY, TRANSPORT_LABEL)?;
    let privates = find_labelled(token, CKO_PRIVATE_KEY, TRANSPORT_LABEL)?;
    let (Some(&public), Some(&private)) = (publics.first(), privates.first()) else {
        return Err(Error::Missing(format!(
            "token {:?} has no transport key: run `p11shim mbk clone-request --token {}` on it first",
            token.label, token.label
        )));
    };
    let parts = token.backend.attributes(token.session, public, &[CKA_MODULUS, CKA_PUBLIC_EXPONENT])?;
    let id =
        request_id(parts.bytes(CKA_MODULUS).unwrap_or_default(), parts.bytes(CKA_PUBLIC_EXPONENT).unwrap_or_default());
    if id != resp.request_id {
        return Err(Error::Damaged(format!(
            "this response answers request {}, but token {:?} holds transport key {id} (a newer request?)",
            resp.request_id, token.label
        )));
    }
    let hash = match resp.oaep.as_str() {
        "sha256" => CKM_SHA256,
        "sha1" => CKM_SHA_1,
        other => return Err(Error::Damaged(format!("clone response: unknown OAEP hash {other:?}"))),
    };
    let bad = |what: &str| Error::Damaged(format!("clone response: {what} is not hex"));
    let mbk_blob = hex::decode(&resp.mbk).map_err(|_| bad("mbk"))?;
    let mac_blob = hex::decode(&resp.mac).map_err(|_| bad("mac"))?;
    let mech = Mechanism::rsa_oaep(hash);
    let set = install(token, resp.fingerprint.as_str(), |template, which| {
        let blob = if which == MBK_LABEL { &mbk_blob } else { &mac_blob };
        token.backend.unwrap_key(token.session, &mech, private, blob, template)
    })?;
    for h in [public, private] {
        let _ = token.backend.destroy_object(token.session, h);
    }
    Ok(set)
}

/// Makes the MBK set on `token` with `unwrap(template, label)`: as session objects first, to check the
/// fingerprint against `expected`, then copied into the token's permanent, unmodifiable, undestroyable keys
/// (SoftHSM2 refuses CKA_MODIFIABLE=false on an unwrapped key, not on a copy), and the load key made from the
/// MBK. Nothing is left in the token when the fingerprint differs.
fn install(
    token: &Token,
    expected: &str,
    unwrap: impl Fn(&Template, &str) -> Result<CK_OBJECT_HANDLE>,
) -> Result<MbkSet> {
    let wrap = mbk::wrap_mechanism(token.backend, token.slot)?;
    let (b, so) = (token.backend, token.session);
    let session_mbk = unwrap(&mbk::session_form(mbk::mbk_template(wrap)), MBK_LABEL)?;
    let session_mac = match unwrap(&mbk::session_form(mbk::mac_template()), MAC_LABEL) {
        Ok(h) => h,
        Err(e) => {
            let _ = b.destroy_object(so, session_mbk);
            return Err(e);
        }
    };
    let fingerprint = mbk::fingerprint(b, so, session_mbk, session_mac, wrap);
    if fingerprint.as_deref().ok() != Some(expected) {
        for h in [session_mbk, session_mac] {
            let _ = b.destroy_object(so, h);
        }
        return Err(match fingerprint {
            Ok(got) => Error::Damaged(format!(
                "the MBK set received has fingerprint {got}, not {expected}: refused, nothing installed"
            )),
            Err(e) => e,
        });
    }
    let mbk_handle = match mbk::permanent(b, so, session_mbk) {
        Ok(h) => h,
        Err(e) => {
            let _ = b.destroy_object(so, session_mac);
            return Err(e);
        }
    };
    let mac_handle = mbk::permanent(b, so, session_mac)?;
    mbk::complete(b, so, mbk_handle, mac_handle, wrap)
}

/// `mbk export-shares` (SO logged in): the MBK set in clear on the host, split into `shares` Shamir shares of
/// which `threshold` rebuild it; written as files `DIR/mbk-share-I-of-N.txt` (mode 0600). The clear keys
/// are zeroized after use.
pub fn export_shares(token: &Token, threshold: u8, shares: u8, dir: &Path) -> Result<Vec<PathBuf>> {
    no_device(token)?;
    let set = mbk::find(token.backend, token.session, token.slot)?
        .ok_or_else(|| Error::Missing(mbk::missing(&token.label)))?;
    let kek = Zeroizing::new(random::<32>()?);
    // A trusted session key whose value the host knows: the MBK leaves the HSM wrapped under it, and the host
    // unwraps it in software.
    let temp = known_key(token, &kek[..], &[Attr::bool(CKA_WRAP, true), Attr::bool(CKA_TRUSTED, true)])?;
    let wrapped = (|| {
        let mech = set.wrap_mechanism();
        Ok::<_, Error>((
            token.backend.wrap_key(token.session, &mech, temp, set.mbk)?,
            token.backend.wrap_key(token.session, &mech, temp, set.mac)?,
        ))
    })();
    let _ = token.backend.destroy_object(token.session, temp);
    let (mbk_blob, mac_blob) = wrapped?;
    let mut secret = Zeroizing::new(kwp_unwrap(&kek[..], &mbk_blob)?.to_vec());
    secret.extend_from_slice(&kwp_unwrap(&kek[..], &mac_blob)?);
    let parts = shamir::split(&secret, threshold, shares)?;
    crate::files::create_dir_private(dir).map_err(|e| Error::Other(format!("cannot create {}: {e}", dir.display())))?;
    let paths: Vec<PathBuf> =
        parts.iter().map(|share| dir.join(format!("mbk-share-{}-of-{shares}.txt", share.id))).collect();
    // Every share file is new: none is written while another's path is taken.
    for path in &paths {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            return Err(Error::Other(format!(
                "{} exists ({}): refusing to write over it; no share was written",
                path.display(),
                crate::files::kind(&meta)
            )));
        }
    }
    let mut written = Vec::new();
    for (share, path) in parts.iter().zip(paths) {
        let text = share.to_text(shares, &set.fingerprint)?;
        if let Err(e) = write_private(&path, format!("{}\n", text.as_str()).as_bytes()) {
            // Fewer shares than were asked for are no use, and each is still a part of the MBK.
            for done in &written {
                let _ = std::fs::remove_file(done);
            }
            return Err(e);
        }
        written.push(path);
    }
    Ok(written)
}

/// `mbk import-shares` (SO logged in): rebuilds the MBK set from `threshold` share files and installs it.
pub fn import_shares(token: &Token, files: &[PathBuf]) -> Result<MbkSet> {
    no_device(token)?;
    refuse_existing(token)?;
    let mut parts = Vec::new();
    let mut fingerprint: Option<String> = None;
    for f in files {
        let text = Zeroizing::new(
            std::fs::read_to_string(f).map_err(|e| Error::Other(format!("cannot read share {}: {e}", f.display())))?,
        );
        let parsed =
            shamir::Share::from_text(text.trim()).map_err(|e| Error::Damaged(format!("share {}: {e}", f.display())))?;
        let (share, fp) = (parsed.share, parsed.fingerprint);
        match &fingerprint {
            Some(known) if *known != fp => {
                return Err(Error::Damaged(format!(
                    "share {} belongs to MBK {fp}, the others to {known}: shares of different MBKs cannot be combined",
                    f.display()
                )))
            }
            _ => fingerprint = Some(fp),
        }
        parts.push(share);
    }
    let fingerprint = fingerprint.ok_or_else(|| Error::Other("no share files given".into()))?;
    let secret = shamir::combine(&parts)?;
    if secret.len() != 64 {
        return Err(Error::Damaged(format!("the shares rebuild {} bytes, not the 64 of an MBK set", secret.len())));
    }
    let kek = Zeroizing::new(random::<32>()?);
    let blobs = [kwp_wrap(&kek[..], &secret[..32])?, kwp_wrap(&kek[..], &secret[32..])?];
    let temp = known_key(token, &kek[..], &[Attr::bool(CKA_UNWRAP, true)])?;
    let mech = Mechanism::plain(mbk::wrap_mechanism(token.backend, token.slot)?);
    let result = install(token, &fingerprint, |template, which| {
        let blob = if which == MBK_LABEL { &blobs[0] } else { &blobs[1] };
        token.backend.unwrap_key(token.session, &mech, temp, blob, template)
    });
    let _ = token.backend.destroy_object(token.session, temp);
    result
}

/// A session AES key whose value the host chose (for the shares path only), with `usage` attributes.
fn known_key(token: &Token, value: &[u8], usage: &[Attr]) -> Result<CK_OBJECT_HANDLE> {
    let mut template = Template(vec![
        Attr::ulong(CKA_CLASS, CKO_SECRET_KEY),
        Attr::ulong(CKA_KEY_TYPE, CKK_AES),
        Attr::bool(CKA_TOKEN, false),
        Attr::bool(CKA_PRIVATE, false),
        Attr::bytes(CKA_VALUE, value),
    ]);
    template.0.extend_from_slice(usage);
    token.backend.create_object(token.session, &template)
}

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| Error::Other(format!("no randomness: {e}")))?;
    Ok(b)
}

fn kwp_unwrap(kek: &[u8], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    use aes_kw::{KeyInit, KwpAes256};
    let k = KwpAes256::new_from_slice(kek).map_err(|_| Error::Other("bad key length".into()))?;
    let mut buf = Zeroizing::new(vec![0u8; blob.len()]);
    let n = k.unwrap_key(blob, &mut buf).map_err(|_| Error::Other("key wrap integrity check failed".into()))?.len();
    buf.truncate(n);
    Ok(buf)
}

fn kwp_wrap(kek: &[u8], key: &[u8]) -> Result<Vec<u8>> {
    use aes_kw::{KeyInit, KwpAes256};
    let k = KwpAes256::new_from_slice(kek).map_err(|_| Error::Other("bad key length".into()))?;
    let mut buf = vec![0u8; key.len().div_ceil(8) * 8 + 8];
    let n = k.wrap_key(key, &mut buf).map_err(|_| Error::Other("key wrap failed".into()))?.len();
    buf.truncate(n);
    Ok(buf)
}

/// Writes a file readable by its owner only (0600), refusing to replace anything at `path` (a file, a
/// symbolic link, a device node); a file left half-written is removed.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = crate::files::create_new_private(path)
        .map_err(|e| Error::Other(format!("cannot create {}: {e}", path.display())))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| {
        let _ = std::fs::remove_file(path);
        Error::Other(format!("cannot write {}: {e}", path.display()))
    })
}

/// Reads a JSON file (a request or a response).
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::Other(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| Error::Damaged(format!("{}: {e}", path.display())))
}

/// Writes a JSON file (a request or a response), mode 0600, not replacing an existing one.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Other(e.to_string()))?;
    write_private(path, format!("{text}\n").as_bytes())
}

/// Refuses to clone or share an MBK that the HSM keeps itself: p11shim cannot read it out, and the device
/// has its own way to bring the same MBK to other devices.
fn no_device(token: &Token) -> Result<()> {
    match mbk::device(token.backend, token.slot) {
        Ok(None) => Ok(()),
        Ok(Some(set)) => Err(Error::Denied(format!(
            "token {:?}: the HSM keeps its own master backup key (device MBK, fingerprint {}), which never leaves it: p11shim has no MBK set to clone or share. Give other devices the same MBK from its shares with the HSM's administration tool (CryptoServer: csadm MBKImport; simulator: cssim-admin mbk import)",
            token.label, set.fingerprint
        ))),
        Err(e) => Err(e),
    }
}
