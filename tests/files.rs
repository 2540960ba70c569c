//! The files the module and the command write, attacked: the log (mode 0600, never through a symbolic link, a
//! regular file only, followed when logrotate moves it), the restore journal and its lock, MBK share files
//! and the audit head file. The module is loaded in child processes (this binary re-run with [`CHILD`]), so
//! each case gets its own C_Initialize and its own configuration; the command runs as itself.

mod backup_cases;
mod common;

use backup_cases::{Engine, Lab};
use cryptoki_sys::*;
use std::ffi::c_void;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::ptr::null_mut;
use std::time::Duration;

const CHILD: &str = "FILES_CHILD";
/// Longer than the shim's interval between two checks that the log's path still names its file.
const PAST_THE_CHECK: Duration = Duration::from_millis(1100);

/// The child's side of [`Lab::bulk_keys`].
#[test]
fn backup_child() {
    backup_cases::child()
}

/// In the parent: runs `test` in a child with `envs` and returns its output. In the child: None, and the
/// caller runs the body.
fn in_child(test: &str, envs: &[(&str, &str)]) -> Option<Output> {
    if std::env::var(CHILD).as_deref() == Ok(test) {
        return None;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, test)
        .env_remove("P11SHIM_CONFIG")
        .envs(common::fresh_backend_env(&common::test_dir().join(test).join("hsm"), 2))
        .envs(envs.iter().copied())
        .output()
        .expect("re-run the test binary");
    Some(out)
}

fn in_parent() -> bool {
    std::env::var(CHILD).is_err()
}

/// A fresh directory of the test's own (the parent wipes it; its children find what it put there).
fn case_dir(test: &str) -> PathBuf {
    let dir = common::test_dir().join(test);
    if in_parent() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
    }
    dir
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts the child passed; its stdout and stderr.
fn passed(out: Output) -> (String, String) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "child failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    (stdout, stderr)
}

/// A p11shim.toml in `dir` over this binary's backend, logging to `log_file` (as written in the file); the
/// parent writes it, its child reads it.
fn config(dir: &Path, log_file: &str) -> PathBuf {
    let path = dir.join("p11shim.toml");
    if in_parent() {
        let module = common::backend_path();
        let text = format!("module = \"{}\"\nlog_file = \"{log_file}\"\nlog_level = \"info\"\n", module.display());
        std::fs::write(&path, text).unwrap();
    }
    path
}

/// The shim's 2.40 function list (the library stays loaded).
fn shim() -> &'static CK_FUNCTION_LIST {
    let lib = unsafe { libloading::Library::new(common::shim_path()) }.expect("load the shim");
    let get: libloading::Symbol<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV> =
        unsafe { lib.get(b"C_GetFunctionList\0") }.unwrap();
    let mut list = null_mut();
    assert_eq!(unsafe { get(&mut list) }, CKR_OK);
    std::mem::forget(lib);
    unsafe { &*list }
}

fn initialize(f: &CK_FUNCTION_LIST) -> CK_RV {
    let mut args = CK_C_INITIALIZE_ARGS { flags: CKF_OS_LOCKING_OK, ..Default::default() };
    unsafe { f.C_Initialize.unwrap()(&mut args as *mut _ as *mut c_void) }
}

fn finalize(f: &CK_FUNCTION_LIST) -> CK_RV {
    unsafe { f.C_Finalize.unwrap()(null_mut()) }
}

fn rv(r: CK_RV) -> String {
    p11shim::error::rv_name(r)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
}

/// A file someone else owns, that a link planted by an attacker points at (made by the parent).
fn victim(dir: &Path) -> PathBuf {
    let victim = dir.join("victim");
    if in_parent() {
        std::fs::write(&victim, "precious\n").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    victim
}

fn assert_untouched(victim: &Path) {
    assert_eq!(read(victim), "precious\n", "{} was written through a link", victim.display());
    assert_eq!(mode(victim), 0o644, "{} changed mode", victim.display());
}

/// C_Initialize in a child with `log_file`: CKR_GENERAL_ERROR and one line on stderr (there is no log),
/// returned.
fn refused_setup(test: &str, case: &str, log_file: &str) -> String {
    let dir = common::test_dir().join(test);
    std::fs::create_dir_all(&dir).unwrap();
    let path = config(&dir, log_file);
    let Some(out) =
        in_child(test, &[("P11SHIM_CONFIG", path.to_str().unwrap()), ("P11SHIM_MODULE", ""), ("CASE", case)])
    else {
        if std::env::var("CASE").as_deref() == Ok(case) {
            if case.starts_with("nobody") {
                // SAFETY: this child drops root for good before it loads the shim; its test is this one.
                assert!(unsafe { libc::setgid(65534) == 0 && libc::setuid(65534) == 0 }, "become nobody");
            }
            println!("C_Initialize={}", rv(initialize(shim())));
        }
        return String::new();
    };
    let (stdout, stderr) = passed(out);
    assert!(stdout.contains("C_Initialize=CKR_GENERAL_ERROR"), "{case}: stdout: {stdout}\nstderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("p11shim")).collect();
    assert_eq!(lines.len(), 1, "{case}: exactly one line from the shim on stderr: {stderr}");
    assert!(lines[0].contains(&format!("log_file {log_file}")), "{case}: the file is named: {}", lines[0]);
    lines[0].to_string()
}

#[test]
fn a_symlink_at_the_log_path_is_refused_and_its_target_untouched() {
    let test = "a_symlink_at_the_log_path_is_refused_and_its_target_untouched";
    let dir = case_dir(test);
    let victim = victim(&dir);
    let link = dir.join("shim.log");
    if in_parent() {
        std::os::unix::fs::symlink(&victim, &link).unwrap();
    }
    let line = refused_setup(test, "link", link.to_str().unwrap());
    if in_parent() {
        assert!(line.contains("symbolic link"), "{line}");
        assert_untouched(&victim);
        // A dangling link: its target is not created either.
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_file(&victim).unwrap();
        std::os::unix::fs::symlink(&victim, &link).unwrap();
    }
    let line = refused_setup(test, "dangling", link.to_str().unwrap());
    if in_parent() {
        assert!(line.contains("symbolic link"), "{line}");
        assert!(!victim.exists(), "the dangling link's target was created");
    }
}

#[test]
fn what_cannot_keep_a_log_is_refused_at_c_initialize() {
    let test = "what_cannot_keep_a_log_is_refused_at_c_initialize";
    let dir = case_dir(test);
    let fifo = dir.join("fifo.log");
    if in_parent() {
        mkfifo(&fifo);
    }
    let missing = dir.join("no-such-dir").join("shim.log");
    let roots = dir.join("roots.log");
    if in_parent() {
        std::fs::write(&roots, "").unwrap();
        std::fs::set_permissions(&roots, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let in_roots_dir = dir.join("shim.log");
    let root = unsafe { libc::geteuid() } == 0;
    for (case, file, reason) in [
        ("proc", "/proc/version", "proc"),
        ("sys", "/sys/kernel/mm/transparent_hugepage/enabled", "sysfs"),
        ("dev-null", "/dev/null", "device node"),
        ("directory", dir.to_str().unwrap(), "directory"),
        ("fifo", fifo.to_str().unwrap(), "FIFO"),
        ("missing-dir", missing.to_str().unwrap(), "does not exist"),
        // A process that may not append: nobody, to root's file or in root's directory.
        ("nobody-file", roots.to_str().unwrap(), "Permission denied"),
        ("nobody-dir", in_roots_dir.to_str().unwrap(), "Permission denied"),
    ] {
        if (case == "sys" && !Path::new(file).exists()) || (case.starts_with("nobody") && !root) {
            continue;
        }
        let line = refused_setup(test, case, file);
        if in_parent() {
            assert!(line.contains(reason), "{case}: {line}");
        }
    }
}

#[test]
fn the_log_is_created_0600_under_umask_022() {
    let test = "the_log_is_created_0600_under_umask_022";
    let dir = case_dir(test);
    let log = dir.join("shim.log");
    let path = config(&dir, "shim.log");
    let Some(out) = in_child(test, &[("P11SHIM_CONFIG", path.to_str().unwrap()), ("P11SHIM_MODULE", "")]) else {
        unsafe { libc::umask(0o022) };
        let f = shim();
        assert_eq!(initialize(f), CKR_OK);
        assert_eq!(finalize(f), CKR_OK);
        return;
    };
    passed(out);
    assert_eq!(mode(&log), 0o600);
    assert!(read(&log).contains("initialized over"), "{}", read(&log));
}

/// Each step logs a line (C_Initialize "initialized over", C_Finalize "finalized"); the parent checks where
/// the lines went.
#[test]
fn the_log_follows_a_move_and_copytruncate() {
    let test = "the_log_follows_a_move_and_copytruncate";
    let dir = case_dir(test);
    let log = dir.join("shim.log");
    let path = config(&dir, "shim.log");
    let Some(out) = in_child(test, &[("P11SHIM_CONFIG", path.to_str().unwrap()), ("P11SHIM_MODULE", "")]) else {
        unsafe { libc::umask(0o022) };
        let f = shim();
        // logrotate's default (`create`): the file is moved and a new one made; here the shim makes it.
        assert_eq!(initialize(f), CKR_OK);
        std::fs::rename(&log, dir.join("shim.log.1")).unwrap();
        std::thread::sleep(PAST_THE_CHECK);
        assert_eq!(finalize(f), CKR_OK);
        // copytruncate: copied, then cut to nothing in place.
        assert_eq!(initialize(f), CKR_OK);
        std::fs::copy(&log, dir.join("shim.log.3")).unwrap();
        std::fs::OpenOptions::new().write(true).open(&log).unwrap().set_len(0).unwrap();
        assert_eq!(finalize(f), CKR_OK);
        return;
    };
    passed(out);
    let moved = read(&dir.join("shim.log.1"));
    assert!(moved.contains("initialized over") && !moved.contains("finalized"), "the moved file: {moved}");
    let copied = read(&dir.join("shim.log.3"));
    let lines: Vec<&str> = copied.lines().collect();
    assert!(
        lines.len() == 2 && lines[0].contains("finalized") && lines[1].contains("initialized over"),
        "the new file after the move, as copied: {copied}"
    );
    let now = read(&log);
    assert_eq!(now.lines().count(), 1, "only the line after copytruncate: {now:?}");
    assert!(now.starts_with("20") && now.contains("finalized"), "written at the start, no hole: {now:?}");
    assert_eq!(mode(&log), 0o600, "the reopened log is made 0600");
}

#[test]
fn a_removed_log_is_made_again_0600() {
    let test = "a_removed_log_is_made_again_0600";
    let dir = case_dir(test);
    let log = dir.join("shim.log");
    let path = config(&dir, "shim.log");
    let Some(out) = in_child(test, &[("P11SHIM_CONFIG", path.to_str().unwrap()), ("P11SHIM_MODULE", "")]) else {
        unsafe { libc::umask(0o022) };
        let f = shim();
        assert_eq!(initialize(f), CKR_OK);
        std::fs::remove_file(&log).unwrap();
        std::thread::sleep(PAST_THE_CHECK);
        assert_eq!(finalize(f), CKR_OK);
        return;
    };
    passed(out);
    let now = read(&log);
    assert_eq!(now.lines().count(), 1, "{now}");
    assert!(now.contains("finalized"), "{now}");
    assert_eq!(mode(&log), 0o600);
}

/// A link planted at the path once the file was moved is not followed: the shim says so once, in the file it
/// still has, and goes on writing there; the next C_Initialize is refused.
#[test]
fn a_link_planted_after_a_move_is_not_followed() {
    let test = "a_link_planted_after_a_move_is_not_followed";
    let dir = case_dir(test);
    let log = dir.join("shim.log");
    let victim = victim(&dir);
    let path = config(&dir, "shim.log");
    let Some(out) = in_child(test, &[("P11SHIM_CONFIG", path.to_str().unwrap()), ("P11SHIM_MODULE", "")]) else {
        let f = shim();
        assert_eq!(initialize(f), CKR_OK);
        std::fs::rename(&log, dir.join("shim.log.1")).unwrap();
        std::os::unix::fs::symlink(&victim, &log).unwrap();
        std::thread::sleep(PAST_THE_CHECK);
        assert_eq!(finalize(f), CKR_OK);
        std::thread::sleep(PAST_THE_CHECK);
        assert_eq!(initialize(f), CKR_GENERAL_ERROR);
        return;
    };
    let (_, stderr) = passed(out);
    assert_untouched(&victim);
    let moved = read(&dir.join("shim.log.1"));
    let lines: Vec<&str> = moved.lines().collect();
    assert_eq!(lines.len(), 4, "{moved}");
    assert!(lines[0].contains("initialized over"), "{moved}");
    assert!(lines[1].contains("WARN: log_file") && lines[1].contains("symbolic link"), "said once: {moved}");
    assert!(lines[2].contains("finalized"), "{moved}");
    assert!(lines[3].contains("C_Initialize failed") && lines[3].contains("symbolic link"), "{moved}");
    assert!(!stderr.contains("p11shim"), "the set-up error went to the log the process has: {stderr}");
}

/// A forked child after a rotation writes to the new file; and a child that closed every descriptor and opened
/// a file of its own on the log's number never gets a log line in it (nor its descriptor replaced).
#[test]
fn a_forked_child_follows_the_rotation_and_never_writes_into_a_reused_descriptor() {
    let test = "a_forked_child_follows_the_rotation_and_never_writes_into_a_reused_descriptor";
    let dir = case_dir(test);
    let log = dir.join("shim.log");
    let own = dir.join("childs-own-file");
    let path = config(&dir, "shim.log");
    let Some(out) = in_child(test, &[("P11SHIM_CONFIG", path.to_str().unwrap()), ("P11SHIM_MODULE", "")]) else {
        let f = shim();
        assert_eq!(initialize(f), CKR_OK);
        let log_fd = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .find(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == log))
            .and_then(|e| e.file_name().to_str().unwrap().parse::<i32>().ok())
            .expect("the log's descriptor");
        std::fs::rename(&log, dir.join("shim.log.1")).unwrap();
        std::thread::sleep(PAST_THE_CHECK);
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = (|| {
                let mine = std::fs::File::create(&own).unwrap();
                use std::os::fd::AsRawFd;
                if unsafe { libc::dup2(mine.as_raw_fd(), log_fd) } != log_fd {
                    return 2;
                }
                drop(mine);
                if initialize(f) != CKR_OK {
                    return 3;
                }
                // The descriptor is still the child's own file.
                let target = std::fs::read_link(format!("/proc/self/fd/{log_fd}")).unwrap();
                if target != own {
                    return 4;
                }
                if finalize(f) != CKR_OK {
                    return 5;
                }
                0
            })();
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the forked child: {status:#x}");
        println!("FORKED={pid}");
        assert_eq!(finalize(f), CKR_OK);
        return;
    };
    let (stdout, _) = passed(out);
    let child: u32 = stdout.lines().find_map(|l| l.split("FORKED=").nth(1)).unwrap().parse().unwrap();
    assert_eq!(read(&own), "", "a log line went into the child's own file");
    let moved = read(&dir.join("shim.log.1"));
    assert_eq!(moved.lines().count(), 1, "only the first C_Initialize: {moved}");
    let now = read(&log);
    assert!(now.contains(&format!("p11shim[{child}] INFO: initialized over")), "the child's lines: {now}");
    assert!(now.contains(&format!("p11shim[{child}] INFO: finalized")), "{now}");
    let parent = now.lines().filter(|l| !l.contains(&format!("p11shim[{child}]"))).collect::<Vec<_>>();
    assert!(parent.len() == 1 && parent[0].contains("finalized"), "the parent's finalized line: {now}");
}

/// logrotate itself (if installed), with `create` and with `copytruncate`.
#[test]
fn logrotate_f_with_create_and_with_copytruncate() {
    let test = "logrotate_f_with_create_and_with_copytruncate";
    if !Path::new("/usr/sbin/logrotate").exists() {
        println!("SKIPPED {test}: logrotate is not installed");
        return;
    }
    let dir = case_dir(test);
    let log = dir.join("shim.log");
    let path = config(&dir, "shim.log");
    let Some(out) = in_child(test, &[("P11SHIM_CONFIG", path.to_str().unwrap()), ("P11SHIM_MODULE", "")]) else {
        let f = shim();
        for (n, how) in ["create 0600", "copytruncate"].iter().enumerate() {
            let conf = dir.join(format!("logrotate-{n}.conf"));
            std::fs::write(&conf, format!("{} {{\n  rotate 5\n  {how}\n  missingok\n}}\n", log.display())).unwrap();
            assert_eq!(initialize(f), CKR_OK);
            let out = Command::new("/usr/sbin/logrotate")
                .arg("-f")
                .arg("-s")
                .arg(dir.join("logrotate.state"))
                .arg(&conf)
                .output()
                .unwrap();
            assert!(out.status.success(), "logrotate {how}: {}", text(&out.stderr));
            std::thread::sleep(PAST_THE_CHECK);
            assert_eq!(finalize(f), CKR_OK);
            let now = read(&log);
            assert!(
                now.lines().count() == 1 && now.contains("finalized"),
                "{how}: only the line after the rotation in the log: {now:?}"
            );
            let rotated = read(&dir.join("shim.log.1"));
            assert!(
                rotated.lines().last().unwrap().contains("initialized over"),
                "{how}: the rotated file ends with the line before the rotation: {rotated:?}"
            );
            std::fs::remove_file(dir.join("shim.log.1")).unwrap();
            let _ = std::fs::remove_file(dir.join("shim.log.2"));
        }
        return;
    };
    passed(out);
    assert_eq!(mode(&log), 0o600);
}

/// The command checks `log_file` as the module does, and names the file; it creates nothing.
#[test]
fn the_command_refuses_an_unusable_log_file() {
    let dir = case_dir("the_command_refuses_an_unusable_log_file");
    let victim = victim(&dir);
    std::os::unix::fs::symlink(&victim, dir.join("link.log")).unwrap();
    for (log_file, reason) in [
        ("/proc/version", "proc"),
        ("link.log", "symbolic link"),
        ("/dev/null", "device node"),
        ("missing/shim.log", "does not exist"),
    ] {
        let path = config(&dir, log_file);
        let out = Command::new(env!("CARGO_BIN_EXE_p11shim"))
            .args(["mbk", "show", "--token", "none"])
            .env("P11SHIM_CONFIG", &path)
            .env_remove("P11SHIM_MODULE")
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{log_file}: {stderr}");
        assert!(stderr.contains("log_file") && stderr.contains(log_file), "{stderr}");
        assert!(stderr.contains(reason), "{log_file}: {stderr}");
    }
    assert_untouched(&victim);
    // A usable log file that is not there yet is not made by the command.
    let path = config(&dir, "new.log");
    let _ = Command::new(env!("CARGO_BIN_EXE_p11shim"))
        .args(["mbk", "show", "--token", "none"])
        .env("P11SHIM_CONFIG", &path)
        .env_remove("P11SHIM_MODULE")
        .envs(common::fresh_backend_env(&dir.join("hsm"), 2))
        .output()
        .unwrap();
    assert!(!dir.join("new.log").exists(), "the command made the log file");
}

/// The journal of a restore into a token's own objects, its temporary file and its lock: 0600, and a link,
/// a FIFO or a directory planted at their paths is refused (or, for the temporary file, removed), never
/// written through.
#[test]
fn the_restore_journal_never_writes_through_a_link() {
    let lab = Lab::new(Engine::Sqlite, "journal");
    lab.db_token("src", "Src");
    lab.mbk_create("src");
    lab.admin("src");
    let u = lab.user("u", "00000002", "Src");
    lab.bulk_keys("src", "k", 60);
    let file = lab.p("src.p11b");
    lab.p11shim(&["backup", "--group", "Src", "--out", &file, "--token", "src", "--logon", &u]).ok();
    lab.native_token("far", "Far");
    lab.clone_mbk("src", "far");
    let victim = victim(&lab.dir);
    let at = |what: &str| lab.dir.join(format!(".p11shim-restore-{}.{what}", hex::encode("far")));
    let restore = || lab.p11shim(&["restore", &file, "--token", "far", "--logon", &u, "--dry-run"]);

    for what in ["lock", "journal"] {
        std::os::unix::fs::symlink(&victim, at(what)).unwrap();
        restore().fails(&[&at(what).display().to_string(), "symbolic link"]);
        assert_untouched(&victim);
        std::fs::remove_file(at(what)).unwrap();
    }
    mkfifo(&at("journal"));
    restore().fails(&[&at("journal").display().to_string(), "FIFO"]);
    std::fs::remove_file(at("journal")).unwrap();
    std::fs::remove_file(at("lock")).unwrap();
    std::fs::create_dir(at("lock")).unwrap();
    restore().fails(&[&at("lock").display().to_string(), "directory"]);
    std::fs::remove_dir(at("lock")).unwrap();

    // A link at the temporary file's path is removed, not followed: the restore goes on. The journal, seen
    // while the restore makes its objects, is 0600.
    std::os::unix::fs::symlink(&victim, at("journal.tmp")).unwrap();
    let mut child = lab
        .cmd(&["restore", &file, "--token", "far", "--logon", &u])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut journal_mode = None;
    while child.try_wait().unwrap().is_none() {
        if let Ok(meta) = std::fs::symlink_metadata(at("journal")) {
            journal_mode.get_or_insert((meta.permissions().mode() & 0o777, meta.file_type().is_file()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "restore: {}", text(&out.stderr));
    assert_untouched(&victim);
    assert!(!at("journal.tmp").exists() && std::fs::symlink_metadata(at("journal.tmp")).is_err());
    assert_eq!(journal_mode, Some((0o600, true)), "the journal while the restore ran");
    assert_eq!(mode(&at("lock")), 0o600);
    assert!(!std::fs::symlink_metadata(at("lock")).unwrap().file_type().is_fifo());
}

/// Share files: 0600 in a 0700 directory; a file or a link already at a share's path stops the export before
/// any share is written.
#[test]
fn mbk_shares_are_private_and_never_written_over_anything() {
    let lab = Lab::new(Engine::Sqlite, "shares");
    lab.db_token("src", "Src");
    lab.mbk_create("src");
    let victim = victim(&lab.dir);
    let export = |dir: &str| {
        lab.p11shim(&[
            "mbk",
            "export-shares",
            "--token",
            "src",
            "--threshold",
            "2",
            "--shares",
            "3",
            "--out-dir",
            &lab.p(dir),
        ])
    };
    let taken = lab.path("taken");
    std::fs::create_dir(&taken).unwrap();
    std::os::unix::fs::symlink(&victim, taken.join("mbk-share-2-of-3.txt")).unwrap();
    let share = |dir: &Path, i: u8| dir.join(format!("mbk-share-{i}-of-3.txt"));
    export("taken").fails(&[&share(&taken, 2).display().to_string(), "symbolic link", "no share was written"]);
    assert_untouched(&victim);
    assert!(!share(&taken, 1).exists() && !share(&taken, 3).exists(), "no share is written before the check");
    std::fs::remove_file(share(&taken, 2)).unwrap();
    std::fs::write(share(&taken, 3), "someone's file\n").unwrap();
    export("taken").fails(&[&share(&taken, 3).display().to_string(), "exists", "no share was written"]);
    assert_eq!(read(&share(&taken, 3)), "someone's file\n");
    assert!(!share(&taken, 1).exists());

    unsafe { libc::umask(0o022) };
    export("fresh").ok();
    let fresh = lab.path("fresh");
    assert_eq!(mode(&fresh), 0o700, "the share directory the command makes");
    for i in 1..=3 {
        assert_eq!(mode(&share(&fresh, i)), 0o600, "share {i}");
    }
}

/// The audit head file: 0600, and a link at its path is neither written through nor read through.
#[test]
fn the_audit_head_file_never_follows_a_link() {
    let lab = Lab::new(Engine::Sqlite, "audithead");
    lab.db_token("src", "Src");
    lab.mbk_create("src");
    let head = lab.dir.join("audit.head");
    assert_eq!(mode(&head), 0o600, "the head file the command made");
    let victim = victim(&lab.dir);
    std::fs::remove_file(&head).unwrap();
    std::os::unix::fs::symlink(&victim, &head).unwrap();
    lab.admin("src");
    assert_untouched(&victim);
    lab.p11shim(&["audit", "verify", "--token", "src"]).fails(&[&head.display().to_string(), "symbolic link"]);
    std::fs::remove_file(&head).unwrap();
    mkfifo(&head);
    // An append to a FIFO would block every audited operation: it is refused, and the operation goes on.
    let started = std::time::Instant::now();
    lab.user("u", "00000002", "Src");
    assert!(started.elapsed() < Duration::from_secs(30));
    lab.p11shim(&["audit", "verify", "--token", "src"]).fails(&[&head.display().to_string(), "FIFO"]);
}
