//! Loading in privileged processes. A process that runs with AT_SECURE (getauxval(3): set-user-ID,
//! set-group-ID, or file capabilities) was started by someone who must not choose the code it runs: whoever
//! set its environment. There the shim ignores `P11SHIM_CONFIG` and `P11SHIM_MODULE`, reads only the default
//! configuration, and refuses a configuration file or backend module that anyone but root could have written
//! or put in its place: the file, every directory above it and every symbolic link on the way must be root's
//! and writable by nobody else (a directory that others may write is accepted only with the sticky bit, where
//! they cannot rename or remove root's entries).
//!
//! Once a path passes, only root can change what it leads to, so checking it and then opening it leaves no
//! window to anyone else: the configuration file is opened at the resolved path with O_NOFOLLOW and checked
//! again through the open descriptor; the module is handed to dlopen at its resolved path.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

static FORCED: AtomicBool = AtomicBool::new(false);

/// What the process is, in words, for the messages.
pub const WHY: &str = "this process runs with AT_SECURE (set-user-ID, set-group-ID or file capabilities)";

/// Whether this process runs with AT_SECURE (or was put in that mode by [`force_secure_mode`]).
pub fn is_secure() -> bool {
    FORCED.load(Ordering::Relaxed) || at_secure()
}

fn at_secure() -> bool {
    // SAFETY: getauxval only reads the process's auxiliary vector.
    unsafe { libc::getauxval(libc::AT_SECURE) != 0 }
}

/// Puts this process in the mode of an AT_SECURE process for good, for tests of that mode without a
/// set-user-ID binary. There is no way back, and nothing outside the process can do this (the environment and
/// files are the very things the mode distrusts): only code that already runs in it. Not exported by the
/// cdylib.
#[doc(hidden)]
pub fn force_secure_mode() {
    FORCED.store(true, Ordering::Relaxed);
}

/// Why a path may not be trusted in secure mode.
#[derive(Debug)]
pub enum Refusal {
    /// Something on the way could not be examined or opened (a missing file among others).
    Io { path: PathBuf, error: std::io::Error },
    /// Something on the way could be changed by someone other than root.
    Untrusted { path: PathBuf, why: String },
}

impl Refusal {
    /// Whether the file (or a directory on its way) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Refusal::Io { error, .. } if error.kind() == std::io::ErrorKind::NotFound)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Io { path, error } => write!(f, "cannot read {}: {error}", path.display()),
            Refusal::Untrusted { path, why } => write!(
                f,
                "refused because {WHY}: {} {why}; the file, every directory above it and every symbolic link on \
                 its path must be owned by root and writable by no one else",
                path.display()
            ),
        }
    }
}

fn untrusted(path: &Path, why: impl Into<String>) -> Refusal {
    Refusal::Untrusted { path: path.to_path_buf(), why: why.into() }
}

fn io(path: &Path, error: std::io::Error) -> Refusal {
    Refusal::Io { path: path.to_path_buf(), error }
}

/// How many symbolic links a path may go through (the kernel's limit).
const MAX_LINKS: usize = 40;

/// `path` resolved (no symbolic link, `.` or `..` left), when everything on the way is root's and writable by
/// no one else: each directory from `/` down, each symbolic link followed, and the file at the end, which must
/// be a regular file.
pub fn trusted_path(path: &Path) -> Result<PathBuf, Refusal> {
    if !path.is_absolute() {
        return Err(untrusted(path, "is not an absolute path"));
    }
    let mut resolved = PathBuf::from("/");
    let root = std::fs::symlink_metadata(&resolved).map_err(|e| io(&resolved, e))?;
    check_dir(&resolved, &root)?;
    let mut pending = names(path);
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            // `resolved` holds no link, so its parent is the directory checked before it.
            resolved.pop();
            continue;
        }
        let next = resolved.join(&name);
        let meta = std::fs::symlink_metadata(&next).map_err(|e| io(&next, e))?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return Err(untrusted(path, format!("goes through more than {MAX_LINKS} symbolic links")));
            }
            owned_by_root(&next, &meta, "symbolic link")?;
            let target = std::fs::read_link(&next).map_err(|e| io(&next, e))?;
            if target.is_absolute() {
                resolved = PathBuf::from("/");
            }
            for n in names(&target).into_iter().rev() {
                pending.push_front(n);
            }
            continue;
        }
        if !pending.is_empty() {
            check_dir(&next, &meta)?;
        }
        resolved = next;
    }
    let meta = std::fs::symlink_metadata(&resolved).map_err(|e| io(&resolved, e))?;
    check_file(&resolved, &meta)?;
    Ok(resolved)
}

/// Opens the file at `path` for reading once [`trusted_path`] accepts it, and checks the open file again.
pub fn open_trusted(path: &Path) -> Result<File, Refusal> {
    let resolved = trusted_path(path)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&resolved)
        .map_err(|e| io(&resolved, e))?;
    let meta = file.metadata().map_err(|e| io(&resolved, e))?;
    check_file(&resolved, &meta)?;
    Ok(file)
}

/// The names of a path's components after its root: `.` dropped, `..` kept.
fn names(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

fn owned_by_root(path: &Path, meta: &Metadata, what: &str) -> Result<(), Refusal> {
    match meta.uid() {
        0 => Ok(()),
        uid => Err(untrusted(path, format!("({what}) is owned by uid {uid}, not root"))),
    }
}

fn check_dir(path: &Path, meta: &Metadata) -> Result<(), Refusal> {
    if !meta.is_dir() {
        return Err(untrusted(path, "is not a directory"));
    }
    owned_by_root(path, meta, "directory")?;
    let mode = meta.mode();
    if mode & 0o022 != 0 && mode & libc::S_ISVTX == 0 {
        return Err(untrusted(
            path,
            format!("(directory) is writable by {} (mode {:04o}) without the sticky bit", whom(mode), mode & 0o7777),
        ));
    }
    Ok(())
}

fn check_file(path: &Path, meta: &Metadata) -> Result<(), Refusal> {
    if !meta.is_file() {
        return Err(untrusted(path, "is not a regular file"));
    }
    owned_by_root(path, meta, "file")?;
    let mode = meta.mode();
    if mode & 0o022 != 0 {
        return Err(untrusted(path, format!("(file) is writable by {} (mode {:04o})", whom(mode), mode & 0o7777)));
    }
    Ok(())
}

fn whom(mode: u32) -> &'static str {
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => "group and others",
        (true, false) => "group",
        _ => "others",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Whether these tests can make files of root's and of others (they run as root in CI). Without root only
    /// the refusals of files not root's are checked, and the skipped checks are named on stderr.
    pub(crate) fn root(test: &str) -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("SKIPPED {test}: needs root to make files owned by root and by others");
        }
        root
    }

    pub(crate) fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    pub(crate) fn chown(path: &Path, uid: u32) {
        std::os::unix::fs::lchown(path, Some(uid), None).unwrap();
    }

    /// A private directory of root's (0700 in /tmp, which is root's and sticky) with `sub/file` in it, both
    /// root's and writable by no one else.
    pub(crate) fn tree() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        chmod(&sub, 0o755);
        let file = sub.join("file");
        std::fs::write(&file, "x").unwrap();
        chmod(&file, 0o644);
        (dir, file)
    }

    fn refusal(path: &Path) -> String {
        trusted_path(path).unwrap_err().to_string()
    }

    #[test]
    fn a_root_only_path_is_resolved() {
        if !root("a_root_only_path_is_resolved") {
            return;
        }
        let (dir, file) = tree();
        assert_eq!(trusted_path(&file).unwrap(), file);
        let dotted = dir.path().join("sub/./../sub/file");
        assert_eq!(trusted_path(&dotted).unwrap(), file);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("sub/file", &link).unwrap();
        assert_eq!(trusted_path(&link).unwrap(), file, "a root link to a root file");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut open_trusted(&link).unwrap(), &mut text).unwrap();
        assert_eq!(text, "x");
        chmod(dir.path(), 0o1777);
        assert_eq!(trusted_path(&file).unwrap(), file, "a sticky directory others may write, as /tmp");
    }

    #[test]
    fn files_that_others_could_change_are_refused() {
        let (dir, file) = tree();
        if !root("files_that_others_could_change_are_refused") {
            return;
        }
        for (mode, whom) in [(0o664, "group (mode 0664)"), (0o646, "others (mode 0646)"), (0o666, "group and others")] {
            chmod(&file, mode);
            let e = refusal(&file);
            assert!(e.contains(&format!("{} (file) is writable by {whom}", file.display())), "{e}");
            assert!(e.contains("AT_SECURE"), "{e}");
        }
        chmod(&file, 0o644);
        chown(&file, 65534);
        let e = refusal(&file);
        assert!(e.contains(&format!("{} (file) is owned by uid 65534, not root", file.display())), "{e}");
        assert!(open_trusted(&file).is_err());
        chown(&file, 0);
        assert!(trusted_path(&dir.path().join("sub")).unwrap_err().to_string().contains("not a regular file"));
        assert!(trusted_path(Path::new("sub/file")).unwrap_err().to_string().contains("not an absolute path"));
    }

    #[test]
    fn directories_and_links_that_others_could_change_are_refused() {
        if !root("directories_and_links_that_others_could_change_are_refused") {
            return;
        }
        let (dir, file) = tree();
        let sub = dir.path().join("sub");
        chmod(&sub, 0o777);
        let e = refusal(&file);
        assert!(
            e.contains(&format!("{} (directory) is writable by group and others (mode 0777)", sub.display())),
            "{e}"
        );
        chmod(&sub, 0o775);
        assert!(refusal(&file).contains("writable by group (mode 0775) without the sticky bit"));
        chmod(&sub, 0o755);
        chown(&sub, 65534);
        assert!(refusal(&file).contains(&format!("{} (directory) is owned by uid 65534", sub.display())));
        chown(&sub, 0);
        chmod(dir.path(), 0o757);
        assert!(refusal(&file).contains(&format!("{} (directory) is writable by others", dir.path().display())));
        chmod(dir.path(), 0o700);

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        chown(&link, 65534);
        assert!(refusal(&link).contains("(symbolic link) is owned by uid 65534"));
        // A root link that leads through a directory others may write.
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        std::fs::copy(&file, open.join("file")).unwrap();
        let via = dir.path().join("via");
        std::os::unix::fs::symlink("open/file", &via).unwrap();
        assert!(refusal(&via).contains(&format!("{} (directory) is writable", open.display())));
        let missing = dir.path().join("sub/none");
        let e = trusted_path(&missing).unwrap_err();
        assert!(e.is_not_found(), "{e}");
    }

    #[test]
    fn link_loops_end() {
        if !root("link_loops_end") {
            return;
        }
        let (dir, _) = tree();
        let a = dir.path().join("a");
        std::os::unix::fs::symlink("b", &a).unwrap();
        std::os::unix::fs::symlink("a", dir.path().join("b")).unwrap();
        assert!(refusal(&a).contains("more than 40 symbolic links"));
    }

    #[test]
    fn refusals_of_files_not_roots_need_no_root() {
        // As any user: a file of one's own is not root's (as root, one of nobody's).
        let (_dir, file) = tree();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            chown(&file, 65534);
        }
        let e = refusal(&file);
        assert!(e.contains("is owned by uid") && e.contains("not root"), "{e}");
    }
}
