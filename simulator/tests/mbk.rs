//! The device master backup key (MBK) and the vendor interface "CSSIM MBK": interface discovery, key backup
//! and restore (same device, a device that imported the same shares, a device with another MBK), altered
//! blobs, the FIPS/CC modes, the admin tool `cssim-admin`.

mod common;

use common::*;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use cryptoki_sys::*;
use std::ffi::CStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const CKR_CSSIM_NO_MBK: CK_RV = CKR_VENDOR_DEFINED + 0x4353_0001;
const CKR_CSSIM_WRONG_MBK: CK_RV = CKR_VENDOR_DEFINED + 0x4353_0002;
const CKR_CSSIM_BLOB_MAC: CK_RV = CKR_VENDOR_DEFINED + 0x4353_0003;
const CKR_CSSIM_BLOB_FORMAT: CK_RV = CKR_VENDOR_DEFINED + 0x4353_0004;

const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// CSSIM_MBK_INFO of include/cssim_mbk.h.
#[repr(C)]
#[derive(Debug, Default)]
struct MbkInfo {
    loaded: CK_BBOOL,
    fingerprint: [u8; 16],
}

/// CSSIM_MBK_FUNCTION_LIST of include/cssim_mbk.h.
#[repr(C)]
struct MbkFunctions {
    version: CK_VERSION,
    get_mbk_info: Option<unsafe extern "C" fn(CK_SLOT_ID, *mut MbkInfo) -> CK_RV>,
    backup_key: Option<unsafe extern "C" fn(CK_SESSION_HANDLE, CK_OBJECT_HANDLE, *mut u8, *mut CK_ULONG) -> CK_RV>,
    restore_key: Option<
        unsafe extern "C" fn(
            CK_SESSION_HANDLE,
            *mut u8,
            CK_ULONG,
            *mut CK_ATTRIBUTE,
            CK_ULONG,
            *mut CK_OBJECT_HANDLE,
        ) -> CK_RV,
    >,
}

type GetInterface = unsafe extern "C" fn(*mut u8, *mut CK_VERSION, *mut *mut CK_INTERFACE, CK_FLAGS) -> CK_RV;
type GetInterfaceList = unsafe extern "C" fn(*mut CK_INTERFACE, *mut CK_ULONG) -> CK_RV;

/// The library's two interface exports (it stays loaded by the process).
fn exports() -> (GetInterface, GetInterfaceList) {
    // SAFETY: loading the module again gives the same instance.
    let lib = unsafe { libloading::Library::new(module_path()) }.expect("dlopen libcssim.so");
    // SAFETY: the exports have these signatures (PKCS#11 3.0).
    let f = unsafe {
        (
            *lib.get::<GetInterface>(b"C_GetInterface\0").unwrap(),
            *lib.get::<GetInterfaceList>(b"C_GetInterfaceList\0").unwrap(),
        )
    };
    std::mem::forget(lib);
    f
}

/// C_GetInterface with a name (None: NULL), a version (None: NULL) and flags.
fn get_interface(name: Option<&CStr>, version: Option<(u8, u8)>, flags: CK_FLAGS) -> Result<CK_INTERFACE, CK_RV> {
    let (get, _) = exports();
    let mut v = version.map(|(major, minor)| CK_VERSION { major, minor });
    let vp = v.as_mut().map_or(std::ptr::null_mut(), |v| v as *mut CK_VERSION);
    let np = name.map_or(std::ptr::null_mut(), |n| n.as_ptr() as *mut u8);
    let mut iface: *mut CK_INTERFACE = std::ptr::null_mut();
    // SAFETY: valid name, version and out pointer.
    let rv = unsafe { get(np, vp, &mut iface, flags) };
    if rv != CKR_OK {
        return Err(rv);
    }
    assert!(!iface.is_null());
    // SAFETY: the module's static CK_INTERFACE.
    Ok(unsafe { *iface })
}

fn name_of(iface: &CK_INTERFACE) -> String {
    // SAFETY: the module's static C string.
    unsafe { CStr::from_ptr(iface.pInterfaceName as *const std::ffi::c_char) }.to_string_lossy().into_owned()
}

fn version_of(iface: &CK_INTERFACE) -> (u8, u8) {
    // SAFETY: every function list starts with its version.
    let v = unsafe { *(iface.pFunctionList as *const CK_VERSION) };
    (v.major, v.minor)
}

/// The names of C_GetInterfaceList.
fn interface_names() -> Vec<(String, (u8, u8))> {
    let (_, list) = exports();
    let mut n: CK_ULONG = 0;
    // SAFETY: a count query.
    assert_eq!(unsafe { list(std::ptr::null_mut(), &mut n) }, CKR_OK);
    // SAFETY: CK_INTERFACE is plain data.
    let mut buf: Vec<CK_INTERFACE> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
    // SAFETY: room for n entries.
    assert_eq!(unsafe { list(buf.as_mut_ptr(), &mut n) }, CKR_OK);
    buf.iter().take(n as usize).map(|i| (name_of(i), version_of(i))).collect()
}

/// The vendor function list.
fn mbk() -> &'static MbkFunctions {
    let iface = get_interface(Some(c"CSSIM MBK"), Some((1, 0)), 0).expect("the CSSIM MBK interface");
    // SAFETY: the module's static CSSIM_MBK_FUNCTION_LIST.
    unsafe { &*(iface.pFunctionList as *const MbkFunctions) }
}

fn mbk_info(slot: CK_SLOT_ID) -> Result<MbkInfo, CK_RV> {
    let mut info = MbkInfo::default();
    // SAFETY: a valid out pointer.
    let rv = unsafe { mbk().get_mbk_info.unwrap()(slot, &mut info) };
    if rv == CKR_OK {
        Ok(info)
    } else {
        Err(rv)
    }
}

/// CSSIM_BackupKey with a length query first.
fn backup(h: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> Result<Vec<u8>, CK_RV> {
    let f = mbk().backup_key.unwrap();
    let mut len: CK_ULONG = 0;
    // SAFETY: a length query.
    let rv = unsafe { f(h, key, std::ptr::null_mut(), &mut len) };
    if rv != CKR_OK {
        return Err(rv);
    }
    let mut blob = vec![0u8; len as usize];
    // SAFETY: a buffer of that length.
    let rv = unsafe { f(h, key, blob.as_mut_ptr(), &mut len) };
    if rv != CKR_OK {
        return Err(rv);
    }
    assert_eq!(len as usize, blob.len(), "the length query gives the blob's length");
    Ok(blob)
}

/// CSSIM_RestoreKey with a template.
fn restore(h: CK_SESSION_HANDLE, blob: &[u8], t: &[(CK_ATTRIBUTE_TYPE, V)]) -> Result<CK_OBJECT_HANDLE, CK_RV> {
    let mut t = raw_template(t);
    let mut blob = blob.to_vec();
    let mut key = 0;
    let tp = if t.attrs.is_empty() { std::ptr::null_mut() } else { t.attrs.as_mut_ptr() };
    // SAFETY: valid blob, template and out pointer.
    let rv = unsafe {
        mbk().restore_key.unwrap()(
            h,
            blob.as_mut_ptr(),
            blob.len() as CK_ULONG,
            tp,
            t.attrs.len() as CK_ULONG,
            &mut key,
        )
    };
    if rv == CKR_OK {
        Ok(key)
    } else {
        Err(rv)
    }
}

// --- The admin tool ---

fn admin(config: &Path, args: &[&str]) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cssim-admin"));
    cmd.arg("--config").arg(config).args(args);
    run(cmd, config, None)
}

/// The fingerprint an admin command printed.
fn printed_fingerprint(out: &Out) -> String {
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint: "))
        .unwrap_or_else(|| panic!("no fingerprint in {out:?}"))
        .to_string()
}

fn hex_fingerprint(info: &MbkInfo) -> String {
    let h = hex::encode(info.fingerprint);
    format!("{}-{}-{}-{}", &h[0..8], &h[8..16], &h[16..24], &h[24..32])
}

/// A device: its directory and configuration (state `state.json`).
fn device(test: &str, extra: &str) -> (PathBuf, PathBuf) {
    let dir = test_dir(test);
    let config = write_config(&dir, extra);
    (dir.clone(), config)
}

/// Generates an MBK 2-of-3 into `<dir>/shares` with the admin tool; the fingerprint it printed and the files.
fn generate(dir: &Path, config: &Path) -> (String, Vec<PathBuf>) {
    let shares = dir.join("shares");
    let out =
        admin(config, &["mbk", "generate", "--shares", "3", "--threshold", "2", "--out", shares.to_str().unwrap()]);
    let files = (1..=3).map(|i| shares.join(format!("mbk-share-{i}-of-3.txt"))).collect();
    (printed_fingerprint(&out.ok()), files)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn all_objects(s: &Session) -> Vec<CK_OBJECT_HANDLE> {
    let mut v: Vec<_> = s.find_objects(&[]).unwrap().iter().map(|o| o.handle()).collect();
    v.sort_unstable();
    v
}

/// Every attribute a key may have, compared between an original and its restored copy (value or CK_RV).
const COMPARED: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_KEY_TYPE,
    CKA_LABEL,
    CKA_ID,
    CKA_PRIVATE,
    CKA_MODIFIABLE,
    CKA_COPYABLE,
    CKA_DESTROYABLE,
    CKA_SENSITIVE,
    CKA_EXTRACTABLE,
    CKA_LOCAL,
    CKA_ALWAYS_SENSITIVE,
    CKA_NEVER_EXTRACTABLE,
    CKA_KEY_GEN_MECHANISM,
    CKA_ENCRYPT,
    CKA_DECRYPT,
    CKA_SIGN,
    CKA_VERIFY,
    CKA_WRAP,
    CKA_UNWRAP,
    CKA_DERIVE,
    CKA_ALLOWED_MECHANISMS,
    CKA_CHECK_VALUE,
    CKA_VALUE,
    CKA_VALUE_LEN,
    CKA_MODULUS,
    CKA_MODULUS_BITS,
    CKA_PUBLIC_EXPONENT,
    CKA_PRIVATE_EXPONENT,
    CKA_EC_PARAMS,
    CKA_EC_POINT,
    CKA_ALWAYS_AUTHENTICATE,
];

#[track_caller]
fn same_attributes(raw: &Raw, h: CK_SESSION_HANDLE, original: CK_OBJECT_HANDLE, restored: CK_OBJECT_HANDLE) {
    for ty in COMPARED {
        assert_eq!(raw.get(h, original, *ty), raw.get(h, restored, *ty), "attribute {ty:#x}");
    }
}

fn aes_key(s: &Session, extra: &[Attribute]) -> ObjectHandle {
    let mut t = vec![Attribute::ValueLen(32.into()), Attribute::Encrypt(true), Attribute::Decrypt(true)];
    t.extend_from_slice(extra);
    s.generate_key(&Mechanism::AesKeyGen, &t).unwrap()
}

#[test]
fn the_interfaces_are_pkcs11_2_40_by_default_and_cssim_mbk_by_name() {
    let (_, config) = device("interfaces", &two_slots("standard"));
    // cryptoki calls C_GetInterface(NULL, NULL, …) when the symbol exists, and goes on with the 2.40 list.
    let mut m = load(&config, None);
    assert_eq!(m.p11().get_all_slots().unwrap().len(), 2);
    assert_eq!(m.p11().get_library_info().unwrap().cryptoki_version().major(), 2);
    assert_eq!(interface_names(), [("PKCS 11".to_string(), (2, 40)), ("CSSIM MBK".to_string(), (1, 0))]);

    // The length-query protocol of C_GetInterfaceList.
    let (get, list) = exports();
    // SAFETY: CK_INTERFACE is plain data.
    let mut one: [CK_INTERFACE; 1] = unsafe { std::mem::zeroed() };
    let mut n: CK_ULONG = 1;
    // SAFETY: room for one entry, as `n` says.
    assert_eq!(unsafe { list(one.as_mut_ptr(), &mut n) }, CKR_BUFFER_TOO_SMALL);
    assert_eq!(n, 2);
    // SAFETY: a NULL count is refused before anything is read.
    assert_eq!(unsafe { list(one.as_mut_ptr(), std::ptr::null_mut()) }, CKR_ARGUMENTS_BAD);

    // The default: "PKCS 11" 2.40, the function list of C_GetFunctionList.
    let default = get_interface(None, None, 0).unwrap();
    assert_eq!(name_of(&default), "PKCS 11");
    assert_eq!(version_of(&default), (2, 40));
    assert_eq!(default.flags, 0);
    assert_eq!(default.pFunctionList as *const CK_FUNCTION_LIST, functions() as *const CK_FUNCTION_LIST);
    assert_eq!(version_of(&get_interface(Some(c"PKCS 11"), Some((2, 40)), 0).unwrap()), (2, 40));
    assert_eq!(version_of(&get_interface(Some(c"CSSIM MBK"), None, 0).unwrap()), (1, 0));
    // What is not offered.
    assert_eq!(get_interface(Some(c"PKCS 11"), Some((3, 0)), 0).unwrap_err(), CKR_ARGUMENTS_BAD);
    assert_eq!(get_interface(None, Some((3, 0)), 0).unwrap_err(), CKR_ARGUMENTS_BAD);
    assert_eq!(get_interface(Some(c"CSSIM MBK"), Some((1, 1)), 0).unwrap_err(), CKR_ARGUMENTS_BAD);
    assert_eq!(get_interface(Some(c"CSSIM"), None, 0).unwrap_err(), CKR_ARGUMENTS_BAD);
    assert_eq!(get_interface(Some(c"Vendor XY"), None, 0).unwrap_err(), CKR_ARGUMENTS_BAD);
    assert_eq!(get_interface(None, None, CKF_INTERFACE_FORK_SAFE).unwrap_err(), CKR_ARGUMENTS_BAD);
    assert_eq!(get_interface(Some(c"CSSIM MBK"), None, CKF_INTERFACE_FORK_SAFE).unwrap_err(), CKR_ARGUMENTS_BAD);
    // SAFETY: a NULL out pointer is refused before anything is written.
    assert_eq!(unsafe { get(std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut(), 0) }, CKR_ARGUMENTS_BAD);
    assert_eq!(mbk().version.major, 1);
    assert_eq!(mbk().version.minor, 0);

    // The vendor functions need C_Initialize; the interface is offered before it (the configuration is read).
    m.p11.take().unwrap().finalize().unwrap();
    assert_eq!(mbk_info(0).unwrap_err(), CKR_CRYPTOKI_NOT_INITIALIZED);
    assert_eq!(backup(1, 1).unwrap_err(), CKR_CRYPTOKI_NOT_INITIALIZED);
    assert_eq!(restore(1, b"blob", &[]).unwrap_err(), CKR_CRYPTOKI_NOT_INITIALIZED);
    assert_eq!(interface_names().len(), 2);
}

#[test]
fn without_the_mbk_facility_there_is_no_interface_and_the_tool_refuses() {
    let (dir, config) = device("no_facility", &format!("device_mbk = false\n{}", two_slots("standard")));
    let m = load(&config, None);
    assert_eq!(interface_names(), [("PKCS 11".to_string(), (2, 40))]);
    assert_eq!(get_interface(Some(c"CSSIM MBK"), None, 0).unwrap_err(), CKR_ARGUMENTS_BAD);
    assert_eq!(get_interface(Some(c"CSSIM MBK"), Some((1, 0)), 0).unwrap_err(), CKR_ARGUMENTS_BAD);
    assert_eq!(name_of(&get_interface(None, None, 0).unwrap()), "PKCS 11");
    drop(m);

    let shares = dir.join("shares");
    for args in [
        vec!["mbk", "show"],
        vec!["mbk", "generate", "--shares", "3", "--threshold", "2", "--out", path(&shares)],
        vec!["mbk", "import", "/nonexistent/share.txt"],
    ] {
        let out = admin(&config, &args);
        assert_eq!(out.code, Some(1), "{args:?}: {out:?}");
        assert!(out.stderr.contains("no MBK facility (device_mbk = false"), "{out:?}");
    }
    assert!(!shares.exists(), "a refused generate writes no share");
    let json = admin(&config, &["mbk", "show", "--json"]);
    assert_eq!(json.code, Some(1));
    assert_eq!(json.stdout.trim(), r#"{"device_mbk":false,"loaded":false,"fingerprint":null}"#);
}

#[test]
fn keys_round_trip_through_blobs_with_all_their_attributes() {
    let (dir, config) = device("round_trip", &two_slots("standard"));
    let (fingerprint, _) = generate(&dir, &config);
    let m = load(&config, None);
    let raw = Raw::new();
    let s = user_session(m.p11());
    let h = s.handle();
    let info = mbk_info(0).unwrap();
    assert_eq!(info.loaded, CK_TRUE);
    assert_eq!(hex_fingerprint(&info), fingerprint);

    // AES, sensitive and never extractable, restricted to one mechanism: a session object by default.
    let aes = aes_key(
        &s,
        &[
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Label(b"aes".to_vec()),
            Attribute::Id(vec![1]),
            Attribute::AllowedMechanisms(vec![MechanismType::AES_CBC_PAD]),
        ],
    );
    let blob = backup(h, aes.handle()).unwrap();
    let restored = restore(h, &blob, &[]).unwrap();
    assert_ne!(restored, aes.handle());
    same_attributes(&raw, h, aes.handle(), restored);
    assert_eq!(raw.get(h, restored, CKA_TOKEN), (CKR_OK, Some(vec![0])));
    assert_eq!(raw.get(h, restored, CKA_NEVER_EXTRACTABLE), (CKR_OK, Some(vec![1])));
    assert_eq!(raw.get(h, restored, CKA_LOCAL), (CKR_OK, Some(vec![1])));
    assert_eq!(raw.get(h, restored, CKA_VALUE).0, CKR_ATTRIBUTE_SENSITIVE);
    let iv = [7u8; 16];
    let ct = s.encrypt(&Mechanism::AesCbcPad(iv), aes, b"backed up").unwrap();
    assert_eq!(s.decrypt(&Mechanism::AesCbcPad(iv), oh(restored), &ct).unwrap(), b"backed up");
    assert_eq!(rv(s.encrypt(&Mechanism::AesEcb, oh(restored), &[0; 16])), CKR_MECHANISM_INVALID);
    // Blobs are made afresh: two backups of one key differ, both restore.
    let again = backup(h, aes.handle()).unwrap();
    assert_ne!(again, blob);
    assert_eq!(again.len(), blob.len());

    // A generic secret, extractable: a token object, as the template asks; the value is the same.
    let secret = s
        .generate_key(
            &Mechanism::GenericSecretKeyGen,
            &[
                Attribute::ValueLen(48.into()),
                Attribute::Sign(true),
                Attribute::Verify(true),
                Attribute::Extractable(true),
                Attribute::Sensitive(false),
                Attribute::Label(b"hmac".to_vec()),
            ],
        )
        .unwrap();
    let token_copy = restore(h, &backup(h, secret.handle()).unwrap(), &[(CKA_TOKEN, bl(true))]).unwrap();
    same_attributes(&raw, h, secret.handle(), token_copy);
    assert!(raw.get(h, token_copy, CKA_VALUE).1.is_some_and(|v| v.len() == 48));
    assert_eq!(raw.get(h, token_copy, CKA_TOKEN), (CKR_OK, Some(vec![1])));
    let mac = s.sign(&Mechanism::Sha256Hmac, secret, b"m").unwrap();
    s.verify(&Mechanism::Sha256Hmac, oh(token_copy), b"m", &mac).unwrap();

    // RSA: the private key (sensitive, unextractable) and the public key.
    let (rsa_public, rsa_private) = s
        .generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &[Attribute::ModulusBits(2048.into()), Attribute::PublicExponent(vec![1, 0, 1]), Attribute::Verify(true)],
            &[Attribute::Sign(true), Attribute::Sensitive(true), Attribute::Extractable(false)],
        )
        .unwrap();
    let rsa_private_copy = restore(h, &backup(h, rsa_private.handle()).unwrap(), &[]).unwrap();
    let rsa_public_copy = restore(h, &backup(h, rsa_public.handle()).unwrap(), &[]).unwrap();
    same_attributes(&raw, h, rsa_private.handle(), rsa_private_copy);
    same_attributes(&raw, h, rsa_public.handle(), rsa_public_copy);
    let signature = s.sign(&Mechanism::Sha256RsaPkcs, oh(rsa_private_copy), b"data").unwrap();
    s.verify(&Mechanism::Sha256RsaPkcs, rsa_public, b"data", &signature).unwrap();
    assert_eq!(s.sign(&Mechanism::Sha256RsaPkcs, rsa_private, b"data").unwrap(), signature);
    s.verify(&Mechanism::Sha256RsaPkcs, oh(rsa_public_copy), b"data", &signature).unwrap();

    // EC P-256, sensitive.
    let (ec_public, ec_private) = s
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[Attribute::EcParams(P256.to_vec()), Attribute::Verify(true)],
            &[Attribute::Sign(true), Attribute::Sensitive(true), Attribute::Label(b"ec".to_vec())],
        )
        .unwrap();
    let ec_copy = restore(h, &backup(h, ec_private.handle()).unwrap(), &[(CKA_TOKEN, bl(false))]).unwrap();
    same_attributes(&raw, h, ec_private.handle(), ec_copy);
    let signature = s.sign(&Mechanism::EcdsaSha256, oh(ec_copy), b"data").unwrap();
    s.verify(&Mechanism::EcdsaSha256, ec_public, b"data", &signature).unwrap();

    // The session copies die with the session; the token copy stays.
    drop(s);
    let s = user_session(m.p11());
    let h = s.handle();
    assert_eq!(raw.get(h, restored, CKA_CLASS).0, CKR_OBJECT_HANDLE_INVALID);
    assert_eq!(raw.get(h, token_copy, CKA_LABEL), (CKR_OK, Some(b"hmac".to_vec())));
    assert_eq!(all_objects(&s), [token_copy]);
}

#[test]
fn the_mbk_is_never_an_object() {
    let (dir, config) = device("never_an_object", &two_slots("standard"));
    generate(&dir, &config);
    let m = load(&config, None);
    let s = user_session(m.p11());
    assert_eq!(all_objects(&s), [], "a device with an MBK and no key shows no object");
    let a = aes_key(&s, &[Attribute::Token(true)]);
    let b = aes_key(&s, &[]);
    let mut mine = vec![a.handle(), b.handle()];
    mine.sort_unstable();
    assert_eq!(all_objects(&s), mine);
    s.logout().unwrap();
    s.login(UserType::So, Some(&AuthPin::new(SO_PIN.into()))).unwrap();
    assert_eq!(all_objects(&s), []);
}

#[test]
fn arguments_and_the_buffer_protocol() {
    let (dir, config) = device("arguments", &two_slots("standard"));
    generate(&dir, &config);
    let m = load(&config, None);
    let raw = Raw::new();
    let s = user_session(m.p11());
    let h = s.handle();
    let key = aes_key(&s, &[]).handle();
    let f = mbk().backup_key.unwrap();

    let mut len: CK_ULONG = 0;
    // SAFETY (all raw calls below): buffers and lengths as given; NULL where the test says.
    unsafe {
        assert_eq!(f(h, key, std::ptr::null_mut(), &mut len), CKR_OK);
        assert!(len > 0);
        let need = len;
        let mut buf = vec![0u8; need as usize + 10];
        let mut small = need - 1;
        assert_eq!(f(h, key, buf.as_mut_ptr(), &mut small), CKR_BUFFER_TOO_SMALL);
        assert_eq!(small, need);
        assert_eq!(f(h, key, buf.as_mut_ptr(), std::ptr::null_mut()), CKR_ARGUMENTS_BAD);
        assert_eq!(f(h, key, std::ptr::null_mut(), std::ptr::null_mut()), CKR_ARGUMENTS_BAD);
        let mut room = need + 10;
        assert_eq!(f(h, key, buf.as_mut_ptr(), &mut room), CKR_OK);
        assert_eq!(room, need);
        assert_eq!(&buf[..4], b"CSSI");
        assert_eq!(f(h + 1000, key, std::ptr::null_mut(), &mut len), CKR_SESSION_HANDLE_INVALID);
        assert_eq!(f(h, 987_654, std::ptr::null_mut(), &mut len), CKR_KEY_HANDLE_INVALID);
    }
    let data = raw.create(h, &[(CKA_CLASS, ul(CKO_DATA)), (CKA_VALUE, by(b"x"))]).unwrap();
    assert_eq!(backup(h, data).unwrap_err(), CKR_KEY_HANDLE_INVALID);

    let blob = backup(h, key).unwrap();
    let before = all_objects(&s);
    assert_eq!(restore(h, &blob, &[(CKA_LABEL, by(b"x"))]).unwrap_err(), CKR_ATTRIBUTE_TYPE_INVALID);
    assert_eq!(
        restore(h, &blob, &[(CKA_TOKEN, bl(true)), (CKA_ID, by(b"1"))]).unwrap_err(),
        CKR_ATTRIBUTE_TYPE_INVALID
    );
    assert_eq!(restore(h, &blob, &[(CKA_TOKEN, by(&[1, 0]))]).unwrap_err(), CKR_ATTRIBUTE_VALUE_INVALID);
    assert_eq!(restore(h + 1000, &blob, &[]).unwrap_err(), CKR_SESSION_HANDLE_INVALID);
    let restore_fn = mbk().restore_key.unwrap();
    let mut blob_copy = blob.clone();
    let mut out = 0;
    // SAFETY: NULL template with a count, NULL blob with a length, NULL out pointer: each refused.
    unsafe {
        let n = blob_copy.len() as CK_ULONG;
        assert_eq!(restore_fn(h, blob_copy.as_mut_ptr(), n, std::ptr::null_mut(), 1, &mut out), CKR_ARGUMENTS_BAD);
        assert_eq!(restore_fn(h, std::ptr::null_mut(), n, std::ptr::null_mut(), 0, &mut out), CKR_ARGUMENTS_BAD);
        assert_eq!(
            restore_fn(h, blob_copy.as_mut_ptr(), n, std::ptr::null_mut(), 0, std::ptr::null_mut()),
            CKR_ARGUMENTS_BAD
        );
    }
    assert_eq!(all_objects(&s), before, "refused restores create nothing");

    // A R/O session: session objects yes, token objects no.
    let ro = m.p11().open_ro_session(slot(m.p11(), 0)).unwrap();
    assert_eq!(restore(ro.handle(), &blob, &[(CKA_TOKEN, bl(true))]).unwrap_err(), CKR_SESSION_READ_ONLY);
    assert!(restore(ro.handle(), &blob, &[(CKA_TOKEN, bl(false))]).is_ok());

    // Without the user: a private key is invisible to backup and cannot be restored.
    s.logout().unwrap();
    assert_eq!(backup(h, key).unwrap_err(), CKR_KEY_HANDLE_INVALID);
    assert_eq!(restore(h, &blob, &[]).unwrap_err(), CKR_USER_NOT_LOGGED_IN);

    // CSSIM_GetMbkInfo: any valid slot (slot 1 has no token), not others, not a NULL info.
    assert_eq!(mbk_info(1).unwrap().loaded, CK_TRUE);
    assert_eq!(mbk_info(2).unwrap_err(), CKR_SLOT_ID_INVALID);
    // SAFETY: a NULL info is refused before anything is written.
    assert_eq!(unsafe { mbk().get_mbk_info.unwrap()(0, std::ptr::null_mut()) }, CKR_ARGUMENTS_BAD);
}

#[test]
fn altered_truncated_and_foreign_blobs_are_refused_and_create_nothing() {
    let (dir, config) = device("altered", &two_slots("standard"));
    generate(&dir, &config);
    let m = load(&config, None);
    let s = user_session(m.p11());
    let h = s.handle();
    let key = aes_key(&s, &[Attribute::Token(true), Attribute::Label(b"a label in clear".to_vec())]);
    let blob = backup(h, key.handle()).unwrap();
    let before = all_objects(&s);
    let flipped = |i: usize| {
        let mut b = blob.clone();
        b[i] ^= 0x01;
        b
    };
    let label_at = blob.windows(16).position(|w| w == b"a label in clear").expect("the label is in clear");
    let n = blob.len();
    for (what, altered, expected) in [
        ("magic", flipped(0), CKR_CSSIM_BLOB_FORMAT),
        ("format version", flipped(9), CKR_CSSIM_BLOB_FORMAT),
        ("MBK fingerprint", flipped(12), CKR_CSSIM_WRONG_MBK),
        ("creation time", flipped(30), CKR_CSSIM_BLOB_MAC),
        ("object class", flipped(41), CKR_CSSIM_BLOB_MAC),
        ("key type", flipped(49), CKR_CSSIM_BLOB_MAC),
        ("clear attribute", flipped(label_at + 2), CKR_CSSIM_BLOB_MAC),
        ("ciphertext", flipped(n - 20), CKR_CSSIM_BLOB_MAC),
        ("tag", flipped(n - 1), CKR_CSSIM_BLOB_MAC),
        ("truncated by one byte", blob[..n - 1].to_vec(), CKR_CSSIM_BLOB_FORMAT),
        ("truncated to its header", blob[..50].to_vec(), CKR_CSSIM_BLOB_FORMAT),
        ("one byte too many", [&blob[..], &[0]].concat(), CKR_CSSIM_BLOB_FORMAT),
        ("empty", Vec::new(), CKR_CSSIM_BLOB_FORMAT),
        ("garbage", b"not a blob at all, just some bytes".to_vec(), CKR_CSSIM_BLOB_FORMAT),
    ] {
        assert_eq!(restore(h, &altered, &[(CKA_TOKEN, bl(true))]), Err(expected), "{what}");
        assert_eq!(all_objects(&s), before, "{what}: nothing created");
    }
    assert!(restore(h, &blob, &[]).is_ok(), "the unaltered blob restores");
    let log = log_of(&dir);
    assert!(log.contains("MBK: key restore refused: blob made under another MBK"), "{log}");
    assert!(log.contains("MBK: key restore refused: blob MAC does not verify (altered or damaged)"), "{log}");
    assert!(log.contains("MBK: key restore refused: not a key blob, truncated, or an unknown blob version"), "{log}");
}

#[test]
fn without_an_mbk_backup_and_restore_refuse_until_the_admin_loads_one() {
    let (dir, config) = device("no_mbk", &two_slots("standard"));
    let m = load(&config, None);
    let s = user_session(m.p11());
    let h = s.handle();
    let info = mbk_info(0).unwrap();
    assert_eq!((info.loaded, info.fingerprint), (CK_FALSE, [0; 16]));
    let key = aes_key(&s, &[]);
    assert_eq!(backup(h, key.handle()).unwrap_err(), CKR_CSSIM_NO_MBK);
    assert_eq!(restore(h, b"anything", &[]).unwrap_err(), CKR_CSSIM_NO_MBK);
    assert!(log_of(&dir).contains("MBK: key backup refused: the device holds no MBK"));

    // The admin tool, another process, loads an MBK: the running module sees it.
    let (fingerprint, _) = generate(&dir, &config);
    let info = mbk_info(0).unwrap();
    assert_eq!(info.loaded, CK_TRUE);
    assert_eq!(hex_fingerprint(&info), fingerprint);
    let blob = backup(h, key.handle()).unwrap();
    assert!(restore(h, &blob, &[]).is_ok());
}

#[test]
fn a_blob_restores_on_a_device_with_the_same_shares_and_nowhere_else() {
    let (dir_a, a) = device("device_a", &two_slots("standard"));
    let (_, b) = device("device_b", &two_slots("standard"));
    let (dir_c, c) = device("device_c", &two_slots("standard"));
    let (fingerprint, shares) = generate(&dir_a, &a);
    let imported = admin(&b, &["mbk", "import", path(&shares[2]), path(&shares[0])]).ok();
    assert_eq!(printed_fingerprint(&imported), fingerprint);
    let (other, _) = generate(&dir_c, &c);
    assert_ne!(other, fingerprint);

    let iv = [3u8; 16];
    let (blobs, ciphertext, signature) = {
        let m = load(&a, None);
        let s = user_session(m.p11());
        let h = s.handle();
        let aes = aes_key(&s, &[Attribute::Sensitive(true), Attribute::Label(b"aes".to_vec())]);
        let (ec_public, ec_private) = s
            .generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &[Attribute::EcParams(P256.to_vec()), Attribute::Verify(true)],
                &[Attribute::Sign(true), Attribute::Sensitive(true)],
            )
            .unwrap();
        let ciphertext = s.encrypt(&Mechanism::AesCbcPad(iv), aes, b"from device A").unwrap();
        let signature = s.sign(&Mechanism::EcdsaSha256, ec_private, b"from device A").unwrap();
        let blobs: Vec<Vec<u8>> = [aes, ec_public, ec_private].iter().map(|k| backup(h, k.handle()).unwrap()).collect();
        (blobs, ciphertext, signature)
    };
    {
        let m = load(&b, None);
        assert_eq!(hex_fingerprint(&mbk_info(0).unwrap()), fingerprint);
        let s = user_session(m.p11());
        let h = s.handle();
        let aes = restore(h, &blobs[0], &[(CKA_TOKEN, bl(true))]).unwrap();
        let ec_public = restore(h, &blobs[1], &[]).unwrap();
        let ec_private = restore(h, &blobs[2], &[]).unwrap();
        assert_eq!(s.decrypt(&Mechanism::AesCbcPad(iv), oh(aes), &ciphertext).unwrap(), b"from device A");
        s.verify(&Mechanism::EcdsaSha256, oh(ec_public), b"from device A", &signature).unwrap();
        let mine = s.sign(&Mechanism::EcdsaSha256, oh(ec_private), b"on device B").unwrap();
        s.verify(&Mechanism::EcdsaSha256, oh(ec_public), b"on device B", &mine).unwrap();
    }
    {
        let m = load(&c, None);
        let s = user_session(m.p11());
        let h = s.handle();
        let before = all_objects(&s);
        for blob in &blobs {
            assert_eq!(restore(h, blob, &[(CKA_TOKEN, bl(true))]).unwrap_err(), CKR_CSSIM_WRONG_MBK);
        }
        assert_eq!(all_objects(&s), before);
        assert!(log_of(&dir_c).contains(&format!("fingerprint {fingerprint}; the device holds {other}")));
    }
}

/// FIPS and CC firmware: clear-text import and export of keys stay refused, MBK backup and restore work.
fn modes_allow_backup_and_restore(mode: &str) {
    let (dir, config) = device(&format!("mode_{mode}"), &two_slots(mode));
    generate(&dir, &config);
    let m = load(&config, None);
    let raw = Raw::new();
    let s = user_session(m.p11());
    let h = s.handle();
    let key = aes_key(
        &s,
        &[
            Attribute::Token(true),
            Attribute::Extractable(true),
            Attribute::Sensitive(false),
            Attribute::Label(b"k".to_vec()),
            Attribute::Id(vec![9]),
        ],
    );
    assert_eq!(raw.get(h, key.handle(), CKA_VALUE).0, CKR_ATTRIBUTE_SENSITIVE);
    let clear = [(CKA_CLASS, ul(CKO_SECRET_KEY)), (CKA_KEY_TYPE, ul(CKK_AES)), (CKA_VALUE, by(&[1; 16]))];
    assert_eq!(raw.create(h, &clear), Err(CKR_ACTION_PROHIBITED));

    let blob = backup(h, key.handle()).unwrap();
    let copy = restore(h, &blob, &[]).unwrap();
    assert_eq!(raw.get(h, copy, CKA_VALUE).0, CKR_ATTRIBUTE_SENSITIVE, "the copy's value stays inside too");
    let iv = [5u8; 16];
    let ct = s.encrypt(&Mechanism::AesCbcPad(iv), key, b"mode").unwrap();
    assert_eq!(s.decrypt(&Mechanism::AesCbcPad(iv), oh(copy), &ct).unwrap(), b"mode");

    let (ec_public, ec_private) = s
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[Attribute::EcParams(P256.to_vec()), Attribute::Verify(true)],
            &[Attribute::Sign(true)],
        )
        .unwrap();
    let ec_copy = restore(h, &backup(h, ec_private.handle()).unwrap(), &[]).unwrap();
    let signature = s.sign(&Mechanism::EcdsaSha256, oh(ec_copy), b"mode").unwrap();
    s.verify(&Mechanism::EcdsaSha256, ec_public, b"mode", &signature).unwrap();

    // A token copy next to its original: CC refuses it as an overwrite (same class, label and id).
    let token_copy = restore(h, &blob, &[(CKA_TOKEN, bl(true))]);
    if mode == "cc" {
        assert_eq!(token_copy, Err(CKR_ACTION_PROHIBITED));
        assert!(log_of(&dir).contains("rule cc.no_overwrite"));
    } else {
        assert!(token_copy.is_ok());
    }
}

#[test]
fn fips_mode_allows_backup_and_restore() {
    modes_allow_backup_and_restore("fips");
}

#[test]
fn cc_mode_allows_backup_and_restore() {
    modes_allow_backup_and_restore("cc");
}

#[test]
fn vendor_functions_are_subject_to_fault_rules() {
    let (dir, config) = device("faults", &two_slots("standard"));
    generate(&dir, &config);
    let m = load(&config, Some("fail = [{function=\"CSSIM_BackupKey\", nth=1, rv=\"CKR_DEVICE_ERROR\"}]"));
    let s = user_session(m.p11());
    let key = aes_key(&s, &[]);
    assert_eq!(backup(s.handle(), key.handle()).unwrap_err(), CKR_DEVICE_ERROR);
    assert!(backup(s.handle(), key.handle()).is_ok());
    assert!(log_of(&dir).contains("fault: CSSIM_BackupKey call 1 fails with 0x30"));
}

fn state_of(dir: &Path) -> Option<Vec<u8>> {
    std::fs::read(dir.join("state.json")).ok()
}

#[test]
fn the_admin_tool_generates_imports_and_refuses() {
    let (dir_a, a) = device("admin_a", "");
    let (dir_b, b) = device("admin_b", "");
    let (dir_c, c) = device("admin_c", "");
    assert_eq!(admin(&a, &["mbk", "show"]).ok().stdout, "no MBK\n");
    assert_eq!(
        admin(&a, &["mbk", "show", "--json"]).ok().stdout.trim(),
        r#"{"device_mbk":true,"loaded":false,"fingerprint":null}"#
    );

    // generate 2-of-3: files 0600 in a directory 0700, each naming the MBK.
    let (fingerprint, shares) = generate(&dir_a, &a);
    assert_eq!(fingerprint.len(), 35);
    assert_eq!(std::fs::metadata(dir_a.join("shares")).unwrap().permissions().mode() & 0o777, 0o700);
    for (i, share) in shares.iter().enumerate() {
        assert_eq!(std::fs::metadata(share).unwrap().permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(share).unwrap();
        let head = format!("CSSIM-MBK-SHARE 1 index={} threshold=2 shares=3 split=", i + 1);
        assert!(text.starts_with(&head), "{text}");
        assert!(text.contains(&format!(" fingerprint={fingerprint} data=")), "{text}");
    }
    assert_eq!(admin(&a, &["mbk", "show"]).ok().stdout, format!("fingerprint: {fingerprint}\n"));
    assert_eq!(
        admin(&a, &["mbk", "show", "--json"]).ok().stdout.trim(),
        format!(r#"{{"device_mbk":true,"loaded":true,"fingerprint":"{fingerprint}"}}"#)
    );

    // A second generate without --replace, or over existing share files, or with impossible numbers: refused,
    // nothing written.
    let state_a = state_of(&dir_a);
    let other_dir = dir_a.join("other");
    let out = admin(&a, &["mbk", "generate", "--shares", "3", "--threshold", "2", "--out", path(&other_dir)]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains(&format!("the device already holds an MBK (fingerprint {fingerprint})")), "{out:?}");
    assert!(!other_dir.exists());
    assert_eq!(state_of(&dir_a), state_a);
    let shares_dir = dir_a.join("shares");
    let out = admin(&c, &["mbk", "generate", "--shares", "3", "--threshold", "2", "--out", path(&shares_dir)]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("mbk-share-1-of-3.txt: a share file exists already"), "{out:?}");
    for (n, m) in [("2", "3"), ("3", "1"), ("0", "0"), ("256", "2"), ("3", "0")] {
        let out = admin(&c, &["mbk", "generate", "--shares", n, "--threshold", m, "--out", path(&dir_c.join("x"))]);
        assert_eq!(out.code, Some(1), "{n} {m}: {out:?}");
    }
    assert!(!dir_c.join("x").exists());
    assert_eq!(admin(&c, &["mbk", "show"]).ok().stdout, "no MBK\n");

    // import on B: too few, damaged, forged, mixed, duplicated shares are refused and change nothing.
    let state_b = state_of(&dir_b);
    let refuse = |args: &[&str], expected: &str| {
        let out = admin(&b, args);
        assert_eq!(out.code, Some(1), "{args:?}: {out:?}");
        assert!(out.stderr.contains(expected), "{args:?}: {out:?}");
        assert_eq!(state_of(&dir_b), state_b, "{args:?} changed the state");
    };
    refuse(&["mbk", "import", path(&shares[0])], "too few shares: this MBK needs 2 of its 3 shares, 1 given");
    let text = std::fs::read_to_string(&shares[1]).unwrap();
    let data_at = text.find(" data=").unwrap() + 6;
    let mut damaged = text.clone().into_bytes();
    damaged[data_at] = if damaged[data_at] == b'0' { b'1' } else { b'0' };
    let damaged_file = dir_b.join("damaged.txt");
    std::fs::write(&damaged_file, &damaged).unwrap();
    refuse(&["mbk", "import", path(&shares[0]), path(&damaged_file)], "damaged.txt: damaged: its checksum");
    // Altered data with a checksum made to match: the rebuilt key's fingerprint gives it away.
    let body = String::from_utf8(damaged).unwrap();
    let body = body.trim_end().rsplit_once(" check=").unwrap().0.to_string();
    use sha2::Digest;
    let forged = format!("{body} check={}\n", hex::encode(&sha2::Sha256::digest(body.as_bytes())[..4]));
    let forged_file = dir_b.join("forged.txt");
    std::fs::write(&forged_file, forged).unwrap();
    refuse(&["mbk", "import", path(&shares[0]), path(&forged_file)], "do not rebuild the MBK they name");
    let (other, other_shares) = generate(&dir_c, &c);
    refuse(&["mbk", "import", path(&shares[0]), path(&other_shares[1])], "a share of another MBK or split");
    refuse(&["mbk", "import", path(&shares[0]), path(&shares[0])], "share 1 of 3 is given twice");
    refuse(&["mbk", "import", path(&dir_b.join("missing.txt")), path(&shares[0])], "missing.txt: cannot read");
    refuse(&["mbk", "import", path(&a)], "cssim.toml: not an MBK share");

    // 2 of 3: the same MBK; again: nothing changes.
    let out = admin(&b, &["mbk", "import", path(&shares[1]), path(&shares[2])]).ok();
    assert_eq!(printed_fingerprint(&out), fingerprint);
    let state_b = state_of(&dir_b);
    let out = admin(&b, &["mbk", "import", path(&shares[0]), path(&shares[1]), path(&shares[2])]).ok();
    assert!(out.stdout.contains("nothing changed"), "{out:?}");
    assert_eq!(state_of(&dir_b), state_b);

    // Another MBK only with --replace.
    let out = admin(&b, &["mbk", "import", path(&other_shares[0]), path(&other_shares[2])]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains(&format!("the device holds another MBK (fingerprint {fingerprint})")), "{out:?}");
    assert_eq!(state_of(&dir_b), state_b);
    let out = admin(&b, &["mbk", "import", "--replace", path(&other_shares[0]), path(&other_shares[2])]).ok();
    assert_eq!(printed_fingerprint(&out), other);
    assert_eq!(admin(&b, &["mbk", "show"]).ok().stdout, format!("fingerprint: {other}\n"));

    // --help explains each command.
    let help = admin(&a, &["--help"]).ok().stdout;
    assert!(help.contains("mbk"), "{help}");
    let help = admin(&a, &["mbk", "--help"]).ok().stdout;
    assert!(help.contains("generate") && help.contains("import") && help.contains("show"), "{help}");
    let help = admin(&a, &["mbk", "generate", "--help"]).ok().stdout;
    assert!(help.contains("--threshold") && help.contains("--replace") && help.contains("0600"), "{help}");

    // The log names the events, never a share's data.
    let log = log_of(&dir_b);
    assert!(log.contains("admin: mbk import refused: too few shares"), "{log}");
    assert!(log.contains(&format!("admin: MBK imported from 2 of 3 shares, fingerprint {fingerprint}")), "{log}");
    let data = &text[data_at..data_at + 64];
    assert!(!log.contains(data) && !log_of(&dir_a).contains(data));
}
