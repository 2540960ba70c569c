//! Files the shim and the command create: always mode 0600, never through a symbolic link, and only where a
//! regular file is (or nothing is). Backups, journals, logs, shares and temporary files all go through here.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Creates `path` for writing, mode 0600; fails if anything exists there (a file, a link, a device node), and
/// says what is there.
pub fn create_new_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| explain(path, e))
}

/// Opens `path` for appending, creating it mode 0600 if it is missing. A symbolic link at `path` is refused
/// (O_NOFOLLOW), and so is anything that does not keep what is written to it ([`check_appendable`]). What
/// is seen not to be a regular file is not even opened (opening some devices does something).
pub fn open_append_private(path: &Path) -> io::Result<File> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_file() {
            return Err(explain(path, not_regular(&meta)));
        }
    }
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| explain(path, e))?;
    check_appendable(&file)?;
    Ok(file)
}

/// Whether [`open_append_private`] would succeed at `path`, without creating anything: a file there is opened
/// for appending (never through a link) and checked; where nothing is, its directory must exist and let this
/// process create a file in it. For settings checked at start, by a process (the command, run as root) that
/// should not leave a file behind that another (the application's user) must append to.
pub fn check_append_target(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_file() => Err(explain(path, not_regular(&meta))),
        Ok(_) => {
            let file = OpenOptions::new()
                .append(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
                .open(path)
                .map_err(|e| explain(path, e))?;
            check_appendable(&file)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => check_directory_for(path),
        Err(e) => Err(e),
    }
}

/// Opens `path` for reading if it is a regular file; a symbolic link, a FIFO (whose read would block) or a
/// device node there is refused.
pub fn open_read_regular(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| explain(path, e))?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(not_regular(&meta));
    }
    Ok(file)
}

/// Creates the directory `dir` (and its missing parents) mode 0700; an existing directory is left as it is.
pub fn create_dir_private(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// An open file that keeps what is appended to it: a regular file, not one of the kernel's pseudo file systems
/// (a write to /proc/sys/kernel/hostname renames the host, one to /proc/version fails), and one that takes
/// a write of nothing (a file that refuses every write is refused now, not line after line later).
fn check_appendable(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(not_regular(&meta));
    }
    if let Some(fs) = kernel_file_system(file.as_raw_fd()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("is a file of the kernel's {fs} file system, not a file that keeps what is written"),
        ));
    }
    // SAFETY: a write of zero bytes from a valid (empty) buffer on a descriptor the File owns.
    if unsafe { libc::write(file.as_raw_fd(), [0u8; 1].as_ptr() as *const libc::c_void, 0) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("refuses writes ({e})")));
    }
    Ok(())
}

/// Where nothing is at `path`: whether its directory exists, is one, and lets this process create a file.
fn check_directory_for(path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let meta = std::fs::metadata(dir).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => io::Error::new(e.kind(), format!("its directory {} does not exist", dir.display())),
        _ => io::Error::new(e.kind(), format!("its directory {}: {e}", dir.display())),
    })?;
    if !meta.is_dir() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a directory", dir.display())));
    }
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: `c` is a NUL-terminated path; faccessat only reads it.
    if unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::W_OK | libc::X_OK, libc::AT_EACCESS) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("cannot be created in {}: {e}", dir.display())));
    }
    use std::os::fd::AsRawFd;
    if let Some(fs) = File::open(dir).ok().and_then(|d| kernel_file_system(d.as_raw_fd())) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("would be a file of the kernel's {fs} file system, not a file that keeps what is written"),
        ));
    }
    Ok(())
}

/// The name of the kernel pseudo file system `fd` is on, if it is on one: their files are the kernel's
/// controls and reports, not storage.
#[cfg(target_os = "linux")]
fn kernel_file_system(fd: i32) -> Option<&'static str> {
    const KERNEL: [(u32, &str); 14] = [
        (0x9fa0, "proc"),
        (0x6265_6572, "sysfs"),
        (0x6462_6720, "debugfs"),
        (0x7472_6163, "tracefs"),
        (0x7363_6673, "securityfs"),
        (0x0027_e0eb, "cgroup"),
        (0x6367_7270, "cgroup2"),
        (0x6265_6570, "configfs"),
        (0xcafe_4a11, "bpf"),
        (0xde5e_81e4, "efivarfs"),
        (0x6165_676c, "pstore"),
        (0xf97c_ff8c, "selinuxfs"),
        (0x4249_4e4d, "binfmt_misc"),
        (0x6e73_6673, "nsfs"),
    ];
    // SAFETY: fstatfs fills the zeroed struct it is given for an open descriptor.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid statfs to fill; `fd` is open.
    if unsafe { libc::fstatfs(fd, &mut st) } != 0 {
        return None;
    }
    let magic = st.f_type as u64 as u32;
    KERNEL.iter().find(|(m, _)| *m == magic).map(|(_, name)| *name)
}

#[cfg(not(target_os = "linux"))]
fn kernel_file_system(_fd: i32) -> Option<&'static str> {
    None
}

/// Whether an output may be written at `path`: nothing there, or (with `replace`) a regular file. A
/// directory, a device node, a FIFO, a socket or a symbolic link is refused, replace or not.
pub fn check_output_target(path: &Path, replace: bool) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(meta) if !meta.file_type().is_file() => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("is {}, not a regular file: refusing to write over it", kind(&meta)),
        )),
        Ok(_) if !replace => Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists (give --replace to replace it)")),
        Ok(_) => Ok(()),
    }
}

/// What a file system object is, for messages.
pub fn kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_block_device() || t.is_char_device() {
        "a device node"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a regular file"
    }
}

fn not_regular(meta: &std::fs::Metadata) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("is {}, not a regular file", kind(meta)))
}

/// An error of opening `path`, saying what is there when that is the reason: O_NOFOLLOW on a symbolic link
/// fails with ELOOP ("too many levels of symbolic links"), a FIFO with no reader with ENXIO, O_EXCL with
/// EEXIST whatever is there.
fn explain(path: &Path, e: io::Error) -> io::Error {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            io::Error::new(io::ErrorKind::InvalidInput, "is a symbolic link: refusing to follow it")
        }
        Ok(meta) if e.kind() == io::ErrorKind::AlreadyExists => {
            io::Error::new(io::ErrorKind::AlreadyExists, format!("exists ({}): refusing to write over it", kind(&meta)))
        }
        Ok(meta) if !meta.file_type().is_file() => not_regular(&meta),
        Err(_) if e.kind() == io::ErrorKind::NotFound => match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => {
                io::Error::new(e.kind(), format!("its directory {} does not exist", dir.display()))
            }
            _ => e,
        },
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_and_never_follow_links() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        create_new_private(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(create_new_private(&p).is_err(), "an existing file is not replaced");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("target"), &link).unwrap();
        assert!(create_new_private(&link).is_err());
        assert!(!dir.path().join("target").exists(), "the link's target was created");
        let e = open_append_private(&link).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(!dir.path().join("target").exists());
        let e = open_append_private(Path::new("/dev/null")).unwrap_err();
        assert!(e.to_string().contains("device node"), "{e}");
        let log = dir.path().join("log");
        open_append_private(&log).unwrap();
        assert_eq!(std::fs::metadata(&log).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn outputs_refuse_what_is_not_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_output_target(&dir.path().join("new"), false).is_ok());
        let e = check_output_target(Path::new("/dev/null"), true).unwrap_err();
        assert!(e.to_string().contains("device node"), "{e}");
        let e = check_output_target(dir.path(), true).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        assert_eq!(check_output_target(&f, false).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        assert!(check_output_target(&f, true).is_ok());
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert!(check_output_target(&link, true).unwrap_err().to_string().contains("symbolic link"));
    }

    #[test]
    fn appending_refuses_what_does_not_keep_lines() {
        let dir = tempfile::tempdir().unwrap();
        for (path, says) in [
            (Path::new("/proc/version"), "proc"),
            (dir.path(), "directory"),
            (Path::new("/dev/null"), "device node"),
            (&dir.path().join("missing").join("log"), "does not exist"),
        ] {
            let e = open_append_private(path).unwrap_err();
            assert!(e.to_string().contains(says), "{}: {e}", path.display());
            let e = check_append_target(path).unwrap_err();
            assert!(e.to_string().contains(says), "{}: {e}", path.display());
        }
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(open_append_private(&fifo).unwrap_err().to_string().contains("FIFO"));
        assert!(open_read_regular(&fifo).unwrap_err().to_string().contains("FIFO"));
        let new = dir.path().join("new.log");
        check_append_target(&new).unwrap();
        assert!(!new.exists(), "a check creates nothing");
        open_append_private(&new).unwrap();
        check_append_target(&new).unwrap();
        let e = create_new_private(&new).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(e.to_string().contains("regular file"), "{e}");
    }
}
