//! The real PKCS#11 module: opened once with RTLD_NOW|RTLD_LOCAL and never unloaded (SoftHSM2 and others
//! must never be dlclose'd). We keep a copy of its 2.40 function table (exactly the 68 entries of 2.40,
//! whatever version it claims) and, when it really offers one, of its 3.x interface.
//!
//! This module and `ffi` are the only places with raw pointers; the functions here that the shim calls for
//! itself have safe signatures.

use crate::config::Config;
use crate::error::{rv_ok, Error, Result};
use cryptoki_sys::*;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Mutex;

pub struct Backend {
    pub path: PathBuf,
    /// The backend's 2.40 table (68 functions).
    pub f: CK_FUNCTION_LIST,
    /// The backend's 3.0 table, when it offers a "PKCS 11" interface of version 3.x through a
    /// C_GetInterface that is its own.
    pub f3: Option<CK_FUNCTION_LIST_3_0>,
    /// The device's own master backup key, when the backend offers it through C_GetInterface
    /// ([`DEVICE_MBK_INTERFACE`], e.g. the CryptoServer simulator): key backup and restore under an MBK the
    /// device keeps inside (see [`crate::hsm`] for the calls).
    pub device_mbk: Option<DeviceMbkFunctions>,
}

/// The name of the vendor interface of a device that keeps its own master backup key
/// (simulator/include/cssim_mbk.h).
pub const DEVICE_MBK_INTERFACE: &[u8] = b"CSSIM MBK";

/// What `CSSIM_GetMbkInfo` reports: whether the device holds an MBK, and its fingerprint.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct DeviceMbkInfo {
    pub loaded: CK_BBOOL,
    pub fingerprint: [CK_BYTE; 16],
}

/// The function list of the device MBK interface, version 1.x (simulator/include/cssim_mbk.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DeviceMbkFunctions {
    pub version: CK_VERSION,
    pub get_info: Option<unsafe extern "C" fn(CK_SLOT_ID, *mut DeviceMbkInfo) -> CK_RV>,
    pub backup_key:
        Option<unsafe extern "C" fn(CK_SESSION_HANDLE, CK_OBJECT_HANDLE, *mut CK_BYTE, *mut CK_ULONG) -> CK_RV>,
    #[allow(clippy::type_complexity)]
    pub restore_key: Option<
        unsafe extern "C" fn(
            CK_SESSION_HANDLE,
            *mut CK_BYTE,
            CK_ULONG,
            *mut CK_ATTRIBUTE,
            CK_ULONG,
            *mut CK_OBJECT_HANDLE,
        ) -> CK_RV,
    >,
}

// SAFETY: the tables hold only function pointers into the backend, which stays loaded for the life of the
// process; PKCS#11 functions may be called from any thread once the library is initialized for it.
unsafe impl Sync for Backend {}
unsafe impl Send for Backend {}

/// The backend once loaded (leaked: it lives as long as the process).
static LOADED: AtomicPtr<Backend> = AtomicPtr::new(std::ptr::null_mut());
static LOADING: Mutex<()> = Mutex::new(());

/// The backend, if one has been loaded.
pub fn loaded() -> Option<&'static Backend> {
    // SAFETY: LOADED is null or a pointer leaked from a Box, never freed.
    unsafe { LOADED.load(Ordering::Acquire).as_ref() }
}

/// Loads the module the config names, once per process. A later call with another module is refused: the
/// first one cannot be unloaded.
pub fn load(config: &Config) -> Result<&'static Backend> {
    let _guard = LOADING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = loaded() {
        if b.path != config.module {
            return Err(Error::Backend {
                path: config.module.clone(),
                cause: format!(
                    "this process already loaded {} as its backend, which cannot be unloaded; restart the process to use another module",
                    b.path.display()
                ),
            });
        }
        return Ok(b);
    }
    let backend = Box::leak(Box::new(open(&config.module, crate::secure::is_secure())?));
    LOADED.store(backend, Ordering::Release);
    Ok(backend)
}

/// Loads the module at `path`. In `secure` mode (an AT_SECURE process) the path must be root's alone and the
/// module is loaded at its resolved path, which only root can change (see [`crate::secure`]).
fn open(path: &Path, secure: bool) -> Result<Backend> {
    let fail = |cause: String| Error::Backend { path: path.to_path_buf(), cause };
    use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
    let load_from = if secure {
        crate::secure::trusted_path(path).map_err(|refusal| fail(refusal.to_string()))?
    } else {
        path.to_path_buf()
    };
    // SAFETY: loading a library runs its initializers; a PKCS#11 module is made to be loaded this way.
    let lib = unsafe { Library::open(Some(&load_from), RTLD_NOW | RTLD_LOCAL) }
        .map_err(|e| fail(format!("cannot load it: {}", error_chain(&e))))?;
    // SAFETY: C_GetFunctionList has this signature in every PKCS#11 module.
    let get_list =
        unsafe { lib.get::<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV>(b"C_GetFunctionList\0") }
            .map_err(|_| fail("it is not a PKCS#11 module: it has no C_GetFunctionList".into()))?;
    let get_list = *get_list;
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: valid out pointer.
    let rv = unsafe { get_list(&mut list) };
    if rv != CKR_OK || list.is_null() {
        return Err(fail(format!("its C_GetFunctionList failed: {}", crate::error::rv_name(rv))));
    }
    // SAFETY: the module returned a valid table; copying CK_FUNCTION_LIST reads the version and exactly the
    // 68 entries of 2.40, which every module has whatever version it claims.
    let f = unsafe { *list };
    if is_p11shim(list, &f) {
        return Err(fail(
            "it is p11shim itself (or a copy of it), which would forward every call to itself: name the HSM vendor's PKCS#11 library as `module` (or in P11SHIM_MODULE)".into(),
        ));
    }
    let interfaces = interfaces(&lib, get_list as *const c_void);
    let f3 = interface_3x(&interfaces);
    let device_mbk = device_mbk(&interfaces);
    // The module must never be unloaded (SoftHSM2 and others crash at exit if they are).
    std::mem::forget(lib);
    Ok(Backend { path: path.to_path_buf(), f, f3, device_mbk })
}

/// The interfaces the backend lists, if its C_GetInterfaceList is its own (dlsym also searches the module's
/// dependencies, which may export one of their own): name and function list of each.
fn interfaces(lib: &libloading::os::unix::Library, own_symbol: *const c_void) -> Vec<(Vec<u8>, *mut c_void)> {
    type GetInterfaceList = unsafe extern "C" fn(*mut CK_INTERFACE, *mut CK_ULONG) -> CK_RV;
    // SAFETY: C_GetInterfaceList has this signature in PKCS#11 3.x.
    let Some(get) = unsafe { lib.get::<GetInterfaceList>(b"C_GetInterfaceList\0") }.ok().map(|g| *g) else {
        return Vec::new();
    };
    if object_base(get as *const c_void).is_none() || object_base(get as *const c_void) != object_base(own_symbol) {
        return Vec::new();
    }
    let mut count: CK_ULONG = 0;
    // SAFETY: a NULL list asks for the count.
    if unsafe { get(std::ptr::null_mut(), &mut count) } != CKR_OK || count == 0 || count > 64 {
        return Vec::new();
    }
    let mut list =
        vec![
            CK_INTERFACE { pInterfaceName: std::ptr::null_mut(), pFunctionList: std::ptr::null_mut(), flags: 0 };
            count as usize
        ];
    // SAFETY: list has room for `count` entries.
    if unsafe { get(list.as_mut_ptr(), &mut count) } != CKR_OK {
        return Vec::new();
    }
    list.truncate(count as usize);
    list.iter()
        .filter(|i| !i.pInterfaceName.is_null() && !i.pFunctionList.is_null())
        .map(|i| {
            // SAFETY: the module returned a NUL-terminated name.
            let name = unsafe { std::ffi::CStr::from_ptr(i.pInterfaceName as *const std::ffi::c_char) };
            (name.to_bytes().to_vec(), i.pFunctionList)
        })
        .collect()
}

/// The backend's 3.x table, if it offers "PKCS 11" with major version 3.
fn interface_3x(interfaces: &[(Vec<u8>, *mut c_void)]) -> Option<CK_FUNCTION_LIST_3_0> {
    let mut best: Option<CK_FUNCTION_LIST_3_0> = None;
    for (name, list) in interfaces {
        if name != b"PKCS 11" {
            continue;
        }
        // SAFETY: every function list starts with its CK_VERSION.
        let version = unsafe { *(*list as *const CK_VERSION) };
        if version.major != 3 {
            continue;
        }
        // SAFETY: a "PKCS 11" list of version 3.x starts with the 3.0 layout (3.1 and 3.2 only append).
        let table = unsafe { *(*list as *const CK_FUNCTION_LIST_3_0) };
        if best.is_none_or(|b| (b.version.minor) < version.minor) {
            best = Some(table);
        }
    }
    best
}

/// The device MBK interface of version 1.x with every function present, if the backend offers it.
fn device_mbk(interfaces: &[(Vec<u8>, *mut c_void)]) -> Option<DeviceMbkFunctions> {
    let (_, list) = interfaces.iter().find(|(name, _)| name == DEVICE_MBK_INTERFACE)?;
    // SAFETY: every function list starts with its CK_VERSION.
    let version = unsafe { *(*list as *const CK_VERSION) };
    if version.major != 1 {
        return None;
    }
    // SAFETY: a "CSSIM MBK" list of version 1.x has this layout (later minor versions only append).
    let table = unsafe { *(*list as *const DeviceMbkFunctions) };
    (table.get_info.is_some() && table.backup_key.is_some() && table.restore_key.is_some()).then_some(table)
}

/// Whether the module at `path` defines C_GetInterface, read from its ELF dynamic symbol table without loading
/// it: applications ask which interfaces the shim offers before C_Initialize, and nothing is loaded before
/// then. As in `interface_3x`, only the module's own symbol counts (not one of its dependencies'). None when
/// the file is not a 64-bit little-endian ELF object with section headers, or cannot be read.
pub fn declares_get_interface(path: &Path) -> Option<bool> {
    const SHT_DYNSYM: u32 = 11;
    const STT_FUNC: u8 = 2;
    const STT_GNU_IFUNC: u8 = 10;
    const SHN_UNDEF: u16 = 0;
    let elf = ElfFile::open(path)?;
    let header = elf.read(0, 64)?;
    if header[..4] != *b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return None;
    }
    let (shoff, shentsize, shnum) =
        (le64(&header, 0x28)?, le16(&header, 0x3a)? as usize, le16(&header, 0x3c)? as usize);
    if shoff == 0 || shentsize < 64 {
        return None;
    }
    let sections = elf.read(shoff, shentsize.checked_mul(shnum)?)?;
    let section = |i: usize| sections.get(i * shentsize..i * shentsize + 64);
    let Some(dynsym) = (0..shnum).filter_map(section).find(|s| le32(s, 4) == Some(SHT_DYNSYM)) else {
        return Some(false); // no dynamic symbols: it exports nothing
    };
    let entsize = usize::try_from(le64(dynsym, 56)?).ok().filter(|e| *e >= 24)?;
    let symbols = elf.read(le64(dynsym, 24)?, usize::try_from(le64(dynsym, 32)?).ok()?)?;
    let strtab = section(le32(dynsym, 40)? as usize)?;
    let names = elf.read(le64(strtab, 24)?, usize::try_from(le64(strtab, 32)?).ok()?)?;
    let name_of = |sym: &[u8]| -> Option<&[u8]> {
        let rest = names.get(le32(sym, 0)? as usize..)?;
        rest.split(|b| *b == 0).next()
    };
    Some(symbols.chunks_exact(entsize).any(|sym| {
        name_of(sym) == Some(b"C_GetInterface".as_slice())
            && le16(sym, 6) != Some(SHN_UNDEF)
            && matches!(sym[4] & 0xf, STT_FUNC | STT_GNU_IFUNC)
    }))
}

/// A file read in bounded pieces, never beyond its end (a piece is at most 64 MiB).
struct ElfFile {
    file: std::fs::File,
    len: u64,
}

impl ElfFile {
    fn open(path: &Path) -> Option<ElfFile> {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: a FIFO in the module's place must not hang the application's C_GetInterface.
        let file =
            std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path).ok()?;
        let meta = file.metadata().ok()?;
        meta.is_file().then_some(ElfFile { file, len: meta.len() })
    }

    fn read(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        if len > 64 << 20 || offset.checked_add(len as u64)? > self.len {
            return None;
        }
        let mut buf = vec![0; len];
        std::os::unix::fs::FileExt::read_exact_at(&self.file, &mut buf, offset).ok()?;
        Some(buf)
    }
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// An error and its causes on one line (libloading keeps dlerror's text in the source).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Whether a module's 2.40 table (`list`, its entries `f`) is the shim's own, or a copy's: the table and its
/// entries lie at the same offsets from the module's load address as the shim's from its own. The same file
/// loads at the same address; a copy elsewhere has the same layout; another module practically never does.
fn is_p11shim(list: *const CK_FUNCTION_LIST, f: &CK_FUNCTION_LIST) -> bool {
    let ours = &crate::ffi::table::FUNCTION_LIST_2_40;
    let layout = |table: *const CK_FUNCTION_LIST, entries: &CK_FUNCTION_LIST| -> Option<[usize; 4]> {
        let base = object_base(table as *const c_void)?;
        let offset = |p: usize| p.checked_sub(base);
        Some([
            offset(table as usize)?,
            offset(entries.C_Initialize? as usize)?,
            offset(entries.C_GetFunctionList? as usize)?,
            offset(entries.C_Sign? as usize)?,
        ])
    };
    let theirs = layout(list, f);
    theirs.is_some() && theirs == layout(ours, ours)
}

/// The load address of the shared object that holds `symbol`.
fn object_base(symbol: *const c_void) -> Option<usize> {
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the address and fills `info`.
    if unsafe { libc::dladdr(symbol, &mut info) } == 0 {
        return None;
    }
    Some(info.dli_fbase as usize)
}

// The calls the shim makes for itself, with safe signatures.
impl Backend {
    /// C_Initialize with the arguments the shim chose (see `ffi::lifecycle`).
    pub fn initialize(&self, mut args: CK_C_INITIALIZE_ARGS) -> CK_RV {
        match self.f.C_Initialize {
            // SAFETY: args is a valid CK_C_INITIALIZE_ARGS for the duration of the call.
            Some(f) => unsafe { f(&mut args as *mut _ as *mut c_void) },
            None => CKR_GENERAL_ERROR,
        }
    }

    pub fn finalize(&self) -> CK_RV {
        match self.f.C_Finalize {
            // SAFETY: NULL is the only valid argument.
            Some(f) => unsafe { f(std::ptr::null_mut()) },
            None => CKR_GENERAL_ERROR,
        }
    }

    pub fn info(&self) -> Result<CK_INFO> {
        let f = self.f.C_GetInfo.ok_or(Error::Rv(CKR_FUNCTION_NOT_SUPPORTED))?;
        // SAFETY: CK_INFO is plain data; all zeroes is a valid value.
        let mut info: CK_INFO = unsafe { std::mem::zeroed() };
        // SAFETY: valid out pointer.
        rv_ok(unsafe { f(&mut info) })?;
        Ok(info)
    }

    pub fn close_session(&self, session: CK_SESSION_HANDLE) -> CK_RV {
        match self.f.C_CloseSession {
            // SAFETY: no pointers.
            Some(f) => unsafe { f(session) },
            None => CKR_FUNCTION_NOT_SUPPORTED,
        }
    }

    pub fn close_all_sessions(&self, slot: CK_SLOT_ID) -> CK_RV {
        match self.f.C_CloseAllSessions {
            // SAFETY: no pointers.
            Some(f) => unsafe { f(slot) },
            None => CKR_FUNCTION_NOT_SUPPORTED,
        }
    }

    /// Opens a session of the shim's own (stored keys are loaded in these).
    pub fn open_session(&self, slot: CK_SLOT_ID, flags: CK_FLAGS) -> Result<CK_SESSION_HANDLE> {
        let f = self.f.C_OpenSession.ok_or(Error::Rv(CKR_FUNCTION_NOT_SUPPORTED))?;
        let mut handle: CK_SESSION_HANDLE = 0;
        // SAFETY: no application pointer and no callback; valid out pointer.
        rv_ok(unsafe { f(slot, flags, std::ptr::null_mut(), None, &mut handle) })?;
        Ok(handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secure::tests::{chmod, chown, root, tree};

    /// The refusal comes before dlopen: the file is no shared object, which dlopen would say.
    fn refusal(path: &Path) -> String {
        match open(path, true) {
            Ok(_) => panic!("{} was loaded", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_module_others_could_change_is_not_loaded_in_secure_mode() {
        if !root("a_module_others_could_change_is_not_loaded_in_secure_mode") {
            return;
        }
        let (dir, module) = tree();
        let e = refusal(&module);
        assert!(e.contains("cannot load it"), "a root-only path goes to dlopen: {e}");
        chmod(&module, 0o664);
        let e = refusal(&module);
        assert!(e.starts_with(&format!("backend module {}: refused because", module.display())), "{e}");
        assert!(e.contains("(file) is writable by group (mode 0664)") && !e.contains("cannot load"), "{e}");
        chmod(&module, 0o644);
        chown(&module, 65534);
        assert!(refusal(&module).contains("(file) is owned by uid 65534, not root"));
        chown(&module, 0);
        chmod(&dir.path().join("sub"), 0o777);
        assert!(refusal(&module).contains("(directory) is writable by group and others (mode 0777)"));
        let e = open(Path::new("libsofthsm2.so"), true).err().unwrap().to_string();
        assert!(e.contains("not an absolute path"), "a bare name would be looked up by dlopen: {e}");
    }

    #[test]
    fn the_interface_question_is_answered_from_the_file() {
        let softhsm = Path::new("/usr/lib/softhsm/libsofthsm2.so");
        if softhsm.exists() {
            assert_eq!(declares_get_interface(softhsm), Some(false), "SoftHSM2 2.6 is a 2.40 module");
        } else {
            eprintln!("NOT CHECKED: {} is not installed", softhsm.display());
        }
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("text");
        std::fs::write(&text, "module = \"x\"").unwrap();
        assert_eq!(declares_get_interface(&text), None);
        assert_eq!(declares_get_interface(&dir.path().join("missing")), None);
        assert_eq!(declares_get_interface(dir.path()), None, "a directory");
        // A header whose section table lies beyond the end of the file.
        let mut header = vec![0u8; 64];
        header[..6].copy_from_slice(b"\x7fELF\x02\x01");
        header[0x28..0x30].copy_from_slice(&4096u64.to_le_bytes());
        header[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        header[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        let truncated = dir.path().join("truncated.so");
        std::fs::write(&truncated, &header).unwrap();
        assert_eq!(declares_get_interface(&truncated), None);
    }
}
