//! What chooses the code the shim loads, and when.
//!
//! - Nothing is loaded before C_Initialize: C_GetInterfaceList, C_GetInterface and C_GetFunctionList answer
//!   without loading the backend (the first two read the module file for a C_GetInterface of its own, to
//!   offer 3.0 or not). The "backend" here is a marker library whose constructor writes a file and a line on
//!   stdout when it is loaded: it must appear at C_Initialize, not before.
//! - A process that runs with AT_SECURE (set-user-ID, set-group-ID, file capabilities) ignores
//!   `P11SHIM_CONFIG` and `P11SHIM_MODULE`: end to end, a small C program made set-user-ID, set-group-ID or
//!   given a file capability, run by an unprivileged user whose environment points at a configuration and a
//!   module of their own; and in process through the library's seam `secure::force_secure_mode`. The
//!   decisions on files (owners, modes, directories, links) are unit tests in src/secure.rs, src/config.rs and
//!   src/backend.rs.
//!
//! None of this needs /etc/p11shim/p11shim.toml, and nothing here creates or changes it: where it exists, the
//! checks that depend on its absence are named on stderr as not done.
mod common;

use cryptoki_sys::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CHILD: &str = "SAFE_LOADING_CHILD";
/// The unprivileged user who runs the privileged programs in the end-to-end test (no passwd entry needed).
const ATTACKER_UID: u32 = 4242;
/// The owner of the set-user-ID copy and the group of the set-group-ID copy: nobody.
const NOBODY: u32 = 65534;
/// The stdout line of the marker library's constructor.
const RAN: &str = "ATTACKER-CODE-RAN";

/// The program that loads the shim and asks it for its interfaces, then initializes it, reporting after each
/// step whether the marker file exists. It needs no PKCS#11 header: the few types it uses are declared here.
const HARNESS_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <sys/auxv.h>
#include <sys/stat.h>

typedef unsigned long CK_RV;
typedef struct { unsigned char major, minor; } CK_VERSION;
typedef struct { char *pInterfaceName; void *pFunctionList; unsigned long flags; } CK_INTERFACE;
typedef struct { CK_VERSION version; CK_RV (*C_Initialize)(void *); CK_RV (*C_Finalize)(void *); } LIST_HEAD;

static const char *marker;

static void seen(const char *after) {
    struct stat st;
    printf("marker after %s: %s\n", after, stat(marker, &st) == 0 ? "present" : "absent");
}

static unsigned version(void *list) {
    const CK_VERSION *v = list;
    return v->major * 100u + v->minor;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: harness SHIM MARKER\n");
        return 2;
    }
    marker = argv[2];
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("AT_SECURE=%lu\n", getauxval(AT_SECURE));
    void *shim = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!shim) {
        printf("dlopen failed: %s\n", dlerror());
        return 1;
    }
    seen("dlopen");
    CK_RV (*get_list)(CK_INTERFACE *, unsigned long *) = (CK_RV (*)(CK_INTERFACE *, unsigned long *))dlsym(shim, "C_GetInterfaceList");
    CK_RV (*get_iface)(char *, CK_VERSION *, CK_INTERFACE **, unsigned long) =
        (CK_RV (*)(char *, CK_VERSION *, CK_INTERFACE **, unsigned long))dlsym(shim, "C_GetInterface");
    CK_RV (*get_fl)(LIST_HEAD **) = (CK_RV (*)(LIST_HEAD **))dlsym(shim, "C_GetFunctionList");
    if (!get_list || !get_iface || !get_fl) {
        printf("missing symbols\n");
        return 1;
    }

    CK_INTERFACE list[8];
    unsigned long count = 0;
    CK_RV rv = get_list(NULL, &count);
    printf("C_GetInterfaceList count: 0x%lx %lu\n", rv, count);
    count = 8;
    rv = get_list(list, &count);
    printf("C_GetInterfaceList: 0x%lx", rv);
    for (unsigned long i = 0; rv == 0 && i < count; i++)
        printf(" [%s %u]", list[i].pInterfaceName, version(list[i].pFunctionList));
    printf("\n");
    seen("C_GetInterfaceList");

    CK_INTERFACE *iface = NULL;
    rv = get_iface(NULL, NULL, &iface, 0);
    printf("C_GetInterface default: 0x%lx %u\n", rv, rv == 0 ? version(iface->pFunctionList) : 0);
    CK_VERSION v30 = {3, 0};
    rv = get_iface("PKCS 11", &v30, &iface, 0);
    printf("C_GetInterface 3.0: 0x%lx\n", rv);
    seen("C_GetInterface");

    LIST_HEAD *f = NULL;
    rv = get_fl(&f);
    printf("C_GetFunctionList: 0x%lx %u\n", rv, rv == 0 ? version(f) : 0);
    seen("C_GetFunctionList");
    if (rv != 0)
        return 1;

    rv = f->C_Initialize(NULL);
    printf("C_Initialize: 0x%lx\n", rv);
    seen("C_Initialize");
    if (rv == 0)
        f->C_Finalize(NULL);
    return 0;
}
"#;

/// The marker "module": not a PKCS#11 module at all, only proof that it was loaded. Its constructor runs in
/// whatever process loads it and writes a line on stdout and the file the environment names.
const MARKER_C: &str = r#"
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#ifdef WITH_GET_INTERFACE
/* What a PKCS#11 3.x module exports; never called here: the shim finds it in the file. */
unsigned long C_GetInterface(void *name, void *version, void **interface, unsigned long flags) {
    (void)name, (void)version, (void)interface, (void)flags;
    return 5;
}
#endif

__attribute__((constructor)) static void ran(void) {
    static const char said[] = "ATTACKER-CODE-RAN\n";
    if (write(1, said, sizeof said - 1) < 0) {}
    const char *marker = getenv("SAFE_LOADING_MARKER");
    int fd = marker ? open(marker, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666) : -1;
    if (fd >= 0) {
        if (write(fd, said, sizeof said - 1) < 0) {}
        close(fd);
    }
}
"#;

// -----------------------------------------------------------------------------------------------------------
// Building and running

/// A directory of this test run's own under the binary's test directory, readable and searchable by everyone
/// (the unprivileged user runs programs from it), removed when the test ends: two runs of this binary at the
/// same time never see each other's markers, and no privileged copy of the harness stays behind.
fn fresh_dir(name: &str) -> tempfile::TempDir {
    let parent = common::test_dir();
    std::fs::create_dir_all(&parent).unwrap();
    let dir = tempfile::Builder::new().prefix(&format!("{name}-")).tempdir_in(&parent).unwrap();
    let mut up = Some(dir.path());
    while let Some(d) = up.filter(|d| d.starts_with(parent.parent().unwrap())) {
        chmod(d, 0o755);
        up = d.parent();
    }
    dir
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(path: &Path, uid: Option<u32>, gid: Option<u32>) {
    std::os::unix::fs::chown(path, uid, gid).unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

/// Compiles `source` into `out` (`-shared` for a library) with `defines`.
fn cc(source: &str, out: &Path, shared: bool, defines: &[&str]) {
    let src = out.with_extension("c");
    std::fs::write(&src, source).unwrap();
    let mut cmd = Command::new("cc");
    cmd.args(["-Wall", "-Wextra", "-Werror", "-std=gnu11", "-O1", "-o"]).arg(out).arg(&src);
    cmd.args(defines.iter().map(|d| format!("-D{d}")));
    if shared {
        cmd.args(["-shared", "-fPIC"]);
    } else {
        cmd.arg("-ldl");
    }
    let built = cmd.output().expect("cc (build-essential)");
    assert!(built.status.success(), "cc {}: {}", src.display(), String::from_utf8_lossy(&built.stderr));
    chmod(out, 0o755);
}

/// What a test builds in its directory.
struct Built {
    harness: PathBuf,
    /// The marker library, which exports nothing of PKCS#11's.
    marker: PathBuf,
    /// The marker library with a C_GetInterface, as a PKCS#11 3.x module has.
    marker3: PathBuf,
}

fn build(dir: &Path) -> Built {
    let built = Built { harness: dir.join("harness"), marker: dir.join("marker.so"), marker3: dir.join("marker3.so") };
    cc(HARNESS_C, &built.harness, false, &[]);
    cc(MARKER_C, &built.marker, true, &[]);
    cc(MARKER_C, &built.marker3, true, &["WITH_GET_INTERFACE"]);
    built
}

/// `name` on PATH or in the sbin directories, or a failure that names the package.
fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed (apt-get install {package}, or scripts/install-deps.sh)"))
}

/// What the harness said, and the shim on its stderr.
struct Run {
    what: String,
    stdout: String,
    stderr: String,
}

impl Run {
    fn new(what: impl Into<String>, out: Output) -> Run {
        let run = Run {
            what: what.into(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        assert!(out.status.success(), "{} failed ({}):\n{}", run.what, out.status, run);
        run
    }

    /// The value of the harness's line `key: value` (or `key=value`).
    fn said(&self, key: &str) -> &str {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(": ").or_else(|| r.strip_prefix('='))))
            .unwrap_or_else(|| panic!("{}: no line `{key}`:\n{self}", self.what))
    }

    #[track_caller]
    fn expect(&self, key: &str, value: &str) {
        assert_eq!(self.said(key), value, "{}: `{key}`\n{self}", self.what);
    }

    /// No step before C_Initialize loaded the marker; the interfaces offered then were 3.0 and 2.40 (`three`),
    /// or 2.40 only.
    #[track_caller]
    fn nothing_loaded_before_initialize(&self, three: bool) {
        self.expect("marker after dlopen", "absent");
        if three {
            self.expect("C_GetInterfaceList count", "0x0 2");
            self.expect("C_GetInterfaceList", "0x0 [PKCS 11 300] [PKCS 11 240]");
            self.expect("C_GetInterface default", "0x0 300");
            self.expect("C_GetInterface 3.0", "0x0");
        } else {
            self.expect("C_GetInterfaceList count", "0x0 1");
            self.expect("C_GetInterfaceList", "0x0 [PKCS 11 240]");
            self.expect("C_GetInterface default", "0x0 240");
            self.expect("C_GetInterface 3.0", &hex(CKR_ARGUMENTS_BAD));
        }
        self.expect("marker after C_GetInterfaceList", "absent");
        self.expect("marker after C_GetInterface", "absent");
        self.expect("C_GetFunctionList", "0x0 240");
        self.expect("marker after C_GetFunctionList", "absent");
        // The constructor's line comes before the harness's `C_Initialize:` line when C_Initialize loads it.
        let before_init = self.stdout.split("marker after C_GetFunctionList").next().unwrap();
        assert!(!before_init.contains(RAN), "{}: the marker's constructor ran before C_Initialize:\n{self}", self.what);
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "--- stdout\n{}--- stderr\n{}", self.stdout, self.stderr)
    }
}

fn hex(rv: CK_RV) -> String {
    format!("{rv:#x}")
}

/// Whether the default configuration exists on this machine (the tests never create one).
fn default_config_exists() -> bool {
    let exists = Path::new(p11shim::config::DEFAULT_CONFIG).exists();
    if exists {
        eprintln!(
            "NOT CHECKED: {} exists on this machine, so C_Initialize's return value and its set-up line are not \
             checked where the default configuration decides them",
            p11shim::config::DEFAULT_CONFIG
        );
    }
    exists
}

// -----------------------------------------------------------------------------------------------------------
// Nothing is loaded before C_Initialize

/// The harness, as root with the environment naming a marker library as the module (through
/// `P11SHIM_MODULE`, or through a configuration file in `P11SHIM_CONFIG`): one with a C_GetInterface of its
/// own, for which the shim offers 3.0 and 2.40, and one without, for which it offers 2.40 only. The shim reads
/// that from the file; the library is loaded by C_Initialize and not before.
#[test]
fn nothing_is_loaded_before_c_initialize() {
    let dir = fresh_dir("before-initialize");
    let dir = dir.path();
    let built = build(dir);
    let shim = common::shim_path();
    for (module, three) in [(&built.marker3, true), (&built.marker, false)] {
        let config = module.with_extension("toml");
        std::fs::write(&config, format!("module = {:?}\n", module.to_str().unwrap())).unwrap();
        for (how, env) in [("P11SHIM_MODULE", module), ("P11SHIM_CONFIG", &config)] {
            let marker = dir.join(format!("{}-through-{how}", module.file_stem().unwrap().to_str().unwrap()));
            let out = Command::new(&built.harness)
                .arg(&shim)
                .arg(&marker)
                .env_remove("P11SHIM_CONFIG")
                .env_remove("P11SHIM_MODULE")
                .env(how, env)
                .env("SAFE_LOADING_MARKER", &marker)
                .output()
                .unwrap();
            let run = Run::new(format!("the harness with {how} naming {}", module.display()), out);
            run.expect("AT_SECURE", "0");
            run.nothing_loaded_before_initialize(three);
            // Then C_Initialize loads it, which shows the marker works: it is no PKCS#11 module.
            run.expect("C_Initialize", &hex(CKR_GENERAL_ERROR));
            run.expect("marker after C_Initialize", "present");
            assert!(run.stdout.contains(RAN), "{run}");
            let lines: Vec<&str> = run.stderr.lines().collect();
            assert_eq!(lines.len(), 1, "one set-up line:\n{run}");
            assert!(lines[0].contains(module.to_str().unwrap()) && lines[0].contains("no C_GetFunctionList"), "{run}");
        }
    }
}

// -----------------------------------------------------------------------------------------------------------
// AT_SECURE, in process through the library's seam

/// A child re-run of this binary: forces secure mode in its own process (for good) with an attacker's
/// environment, then reads the configuration and initializes the shim through the library.
#[test]
fn forced_secure_mode_ignores_the_environment_in_process() {
    let name = "forced_secure_mode_ignores_the_environment_in_process";
    if std::env::var(CHILD).as_deref() == Ok(name) {
        forced_secure_mode_child();
        return;
    }
    let dir = fresh_dir("forced");
    let dir = dir.path();
    let module = build(dir).marker3;
    let config = dir.join("attacker.toml");
    std::fs::write(&config, format!("module = {:?}\n", module.to_str().unwrap())).unwrap();
    let marker = dir.join("loaded");
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .env("P11SHIM_CONFIG", &config)
        .env("P11SHIM_MODULE", &module)
        .env("SAFE_LOADING_MARKER", &marker)
        .output()
        .unwrap();
    let run = Run::new("the forced child", out);
    assert!(run.stdout.contains("1 passed"), "{run}");
    assert!(!marker.exists() && !run.stdout.contains(RAN), "the environment's module was loaded:\n{run}");
    if !default_config_exists() {
        let lines: Vec<&str> = run.stderr.lines().filter(|l| l.contains("p11shim[")).collect();
        assert_eq!(lines.len(), 1, "one set-up line from C_Initialize:\n{run}");
        let line = lines[0];
        assert!(line.contains("ERROR: C_Initialize failed: configuration file /etc/p11shim/p11shim.toml"), "{line}");
        assert!(line.contains("P11SHIM_CONFIG and P11SHIM_MODULE are ignored because"), "{line}");
        assert!(line.contains("AT_SECURE") && !line.contains(config.to_str().unwrap()), "{line}");
    }
}

fn forced_secure_mode_child() {
    use p11shim::config::{Config, DEFAULT_CONFIG};
    let interfaces = || {
        let mut count: CK_ULONG = 0;
        // SAFETY: a NULL list asks for the count, into a valid pointer.
        assert_eq!(unsafe { p11shim::ffi::exports::C_GetInterfaceList(std::ptr::null_mut(), &mut count) }, CKR_OK);
        count
    };
    let before = Config::from_env().expect("outside secure mode the environment's configuration is read");
    assert_eq!(before.source, PathBuf::from(std::env::var_os("P11SHIM_CONFIG").unwrap()));
    assert_eq!(interfaces(), 2, "the environment's module has a C_GetInterface: 3.0 and 2.40");

    p11shim::secure::force_secure_mode();
    assert!(p11shim::secure::is_secure());
    if !Path::new(DEFAULT_CONFIG).exists() {
        assert_eq!(interfaces(), 1, "the environment's module is not even read: 2.40 only");
    }
    match Config::from_env_noting() {
        Ok((config, ignored)) => {
            assert_eq!(config.source, PathBuf::from(DEFAULT_CONFIG));
            assert_eq!(ignored.0, ["P11SHIM_CONFIG", "P11SHIM_MODULE"]);
        }
        Err(e) => {
            let e = e.to_string();
            assert!(e.starts_with(&format!("configuration file {DEFAULT_CONFIG}: ")), "{e}");
            assert!(e.contains("P11SHIM_CONFIG and P11SHIM_MODULE are ignored"), "{e}");
        }
    }

    let mut f: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: a valid out pointer.
    assert_eq!(unsafe { p11shim::ffi::exports::C_GetFunctionList(&mut f) }, CKR_OK);
    // SAFETY: the library's static 2.40 table.
    let f = unsafe { &*f };
    // SAFETY: NULL initialization arguments.
    let rv = unsafe { f.C_Initialize.unwrap()(std::ptr::null_mut()) };
    if Path::new(DEFAULT_CONFIG).exists() {
        if rv == CKR_OK {
            // SAFETY: NULL is the only valid argument.
            unsafe { f.C_Finalize.unwrap()(std::ptr::null_mut()) };
        }
    } else {
        assert_eq!(rv, CKR_GENERAL_ERROR);
    }
    let marker = std::env::var_os("SAFE_LOADING_MARKER").unwrap();
    assert!(!Path::new(&marker).exists(), "the environment's module was loaded");
}

// -----------------------------------------------------------------------------------------------------------
// AT_SECURE, end to end

/// The harness, made set-user-ID nobody, set-group-ID nobody, and given a file capability, each run by an
/// unprivileged user whose environment names a configuration and a module of theirs; and an unprivileged
/// copy run the same way, which loads the attacker's module (the control: the marker works, and the
/// environment is what the privileged copies ignored).
#[test]
fn privileged_programs_ignore_the_environment() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "making set-user-ID copies owned by others needs root (as CI runs)");
    let setpriv = tool("setpriv", "util-linux");
    let setcap = tool("setcap", "libcap2-bin");
    let dir = fresh_dir("privileged");
    let dir = dir.path();
    let Built { harness, marker3: module, .. } = build(dir);
    let shim = dir.join("libp11shim.so");
    std::fs::copy(common::shim_path(), &shim).unwrap();
    chmod(&shim, 0o755);

    // The attacker's files, theirs: a module and a configuration that names it.
    let attacker = dir.join("attacker");
    std::fs::create_dir(&attacker).unwrap();
    let evil = attacker.join("evil.so");
    std::fs::copy(&module, &evil).unwrap();
    let config = attacker.join("p11shim.toml");
    std::fs::write(&config, format!("module = {:?}\n", evil.to_str().unwrap())).unwrap();
    for p in [&attacker, &evil, &config] {
        chown(p, Some(ATTACKER_UID), Some(ATTACKER_UID));
    }
    // Where any process may write its marker.
    let marks = dir.join("marks");
    std::fs::create_dir(&marks).unwrap();
    chmod(&marks, 0o777);

    let copy = |name: &str| {
        let p = dir.join(name);
        std::fs::copy(&harness, &p).unwrap();
        p
    };
    let suid = copy("harness-setuid");
    chown(&suid, Some(NOBODY), None);
    chmod(&suid, 0o4755);
    let sgid = copy("harness-setgid");
    chown(&sgid, None, Some(NOBODY));
    chmod(&sgid, 0o2755);
    let caps = copy("harness-setcap");
    let out = Command::new(&setcap).args(["cap_net_bind_service+ep"]).arg(&caps).output().unwrap();
    assert!(out.status.success(), "setcap: {}", String::from_utf8_lossy(&out.stderr));
    let plain = copy("harness-plain");

    let run = |program: &Path, what: &str| {
        let marker = marks.join(what);
        let out = Command::new(&setpriv)
            .args([
                format!("--reuid={ATTACKER_UID}"),
                format!("--regid={ATTACKER_UID}"),
                "--clear-groups".into(),
                "--".into(),
            ])
            .arg(program)
            .arg(&shim)
            .arg(&marker)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("P11SHIM_CONFIG", &config)
            .env("P11SHIM_MODULE", &evil)
            .env("SAFE_LOADING_MARKER", &marker)
            .output()
            .unwrap();
        (Run::new(format!("the {what} harness run by uid {ATTACKER_UID}"), out), marker)
    };

    // The attacker's module has a C_GetInterface: the control, which reads their configuration, offers 3.0.
    let (control, marker) = run(&plain, "plain");
    control.expect("AT_SECURE", "0");
    control.nothing_loaded_before_initialize(true);
    control.expect("C_Initialize", &hex(CKR_GENERAL_ERROR));
    control.expect("marker after C_Initialize", "present");
    assert!(marker.exists() && control.stdout.contains(RAN), "the control run did not load the marker:\n{control}");

    let default_exists = default_config_exists();
    for (program, what) in [(&suid, "set-user-ID"), (&sgid, "set-group-ID"), (&caps, "file-capability")] {
        let (run, marker) = run(program, what);
        run.expect("AT_SECURE", "1");
        run.expect("marker after C_Initialize", "absent");
        assert!(!marker.exists() && !run.stdout.contains(RAN), "{}: the attacker's module ran:\n{run}", run.what);
        assert!(!run.stderr.contains(evil.to_str().unwrap()), "{}: the attacker's module was tried:\n{run}", run.what);
        if default_exists {
            // What is offered before C_Initialize then depends on the default configuration's module.
            continue;
        }
        // Without the default configuration nothing tells of a 3.x module: the attacker's file was not read.
        run.nothing_loaded_before_initialize(false);
        run.expect("C_Initialize", &hex(CKR_GENERAL_ERROR));
        let lines: Vec<&str> = run.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{}: one set-up line:\n{run}", run.what);
        assert!(
            lines[0].contains("C_Initialize failed: configuration file /etc/p11shim/p11shim.toml: cannot read")
                && lines[0]
                    .contains("P11SHIM_CONFIG and P11SHIM_MODULE are ignored because this process runs with AT_SECURE"),
            "{}:\n{run}",
            run.what
        );
    }
}
