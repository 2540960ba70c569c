//! Files the shim and the command create: always mode 0600, never through a symbolic link, and only where a
//! regular file is (or nothing is). Backups, journals, logs, shares and temporary files all go through here.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Creates `path` for writing, mode 0600; fails if anything exists there (a file, a link, a device node).
pub fn create_new_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Opens `path` for appending, creating it mode 0600 if it is missing. A symbolic link at `path` is refused
/// (O_NOFOLLOW), and so is anything other than a regular file (a FIFO or a device node would block or leak).
pub fn open_append_private(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(refused_link)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("is {}, not a regular file", kind(&meta))));
    }
    Ok(file)
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

fn refused_link(e: io::Error) -> io::Error {
    // O_NOFOLLOW on a symbolic link fails with ELOOP, which reads as "too many levels of symbolic links".
    if e.raw_os_error() == Some(libc::ELOOP) {
        return io::Error::new(io::ErrorKind::InvalidInput, "is a symbolic link: refusing to follow it");
    }
    e
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
}
