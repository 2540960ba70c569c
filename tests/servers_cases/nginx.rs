//! nginx (Debian 12: 1.22 with OpenSSL 3) serving TLS with an EC P-256 key in a database slot, reached through
//! the OpenSSL pkcs11 engine (libengine-pkcs11-openssl) with the shim as its module.
//!
//! The master loads the key when it reads its configuration (`ssl_certificate_key "engine:pkcs11:<URI>"`),
//! so the shim is initialized, logged in and has used the key in the master before it forks its workers.
//! Each worker signs its TLS handshakes: the engine notices the fork and initializes the module again
//! (C_Initialize, a new session, the login again with the PIN it kept) in the worker. nginx clears the
//! environment of its workers except for what `env` directives name; nginx.conf here names SoftHSM2's own
//! configuration (the backend's business) but not `P11SHIM_CONFIG`: a worker must work with the configuration
//! of the master it was forked from.
//!
//! What must hold: every page fetched (one TLS handshake each, in a curl of its own, with a timeout) is
//! served, by the current workers, after the start and after each of two reloads (`nginx -s reload`: the
//! master reads its configuration again and forks new workers; the old ones finish and exit); old workers
//! exit after a reload and the master exits after `nginx -s quit`; the error log shows no crashed worker and
//! no TLS failure; the shim logs no error and no PIN.

use super::*;

/// The token of the site's key.
const TOKEN: &str = "web";
/// The key pair's label.
const KEY: &str = "tls";
const WORKERS: usize = 4;
const FETCHES_AT_START: usize = 200;
const FETCHES_AFTER_RELOAD: usize = 100;
/// curl's limit per fetch: a handshake takes milliseconds, so a fetch without an answer by then met a hung
/// worker.
const CURL_MAX_TIME: u64 = 5;
/// Fetches at once (each a curl process).
const PARALLEL: usize = 4;
/// A phase stops after this many fetches that got no answer: each costs [`CURL_MAX_TIME`].
const MAX_TIMEOUTS: usize = 3;
/// How long old workers may take to exit after a reload, and the master after `nginx -s quit`.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

fn nginx() -> PathBuf {
    tool("nginx", "nginx")
}

/// The key's PKCS#11 URI with the PIN, as nginx and `openssl req` take it.
fn key_uri(fx: &Fixture) -> String {
    format!("pkcs11:token={};object={KEY};type=private;pin-value={USER_PIN}", fx.token)
}

/// A token with the site's key pair (stored), an openssl.cnf loading the engine with the shim, and a
/// self-signed certificate for 127.0.0.1 made with the key through the engine.
pub struct Site {
    pub fx: Fixture,
    pub openssl_cnf: PathBuf,
    pub cert: PathBuf,
    /// nginx's prefix (`-p`): its configuration, logs, pid file and temporary directories.
    pub prefix: PathBuf,
    pub port: u16,
    /// nginx.conf's `user` (who the workers run as), if any.
    pub worker_user: Option<String>,
}

impl Site {
    pub fn new(test: &str, store: Store) -> Site {
        let fx = Fixture::new(test, TOKEN, store);
        fx.keypair("EC:prime256v1", "01", KEY);
        fx.assert_stored(KEY);
        let openssl_cnf = fx.openssl_cnf("openssl.cnf", true);
        let cert = fx.dir.join("cert.pem");
        let mut req = fx.command(&tool("openssl", "openssl"));
        req.env("OPENSSL_CONF", &openssl_cnf)
            .args(["req", "-new", "-x509", "-engine", "pkcs11", "-keyform", "engine", "-key", &key_uri(&fx)])
            .args(["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "2", "-sha256"])
            .arg("-out")
            .arg(&cert);
        fx.run(req).ok();
        let mut pubkey = fx.bare_command(&tool("openssl", "openssl"));
        pubkey.args(["x509", "-noout", "-pubkey", "-in"]).arg(&cert);
        let cert_key = fx.run(pubkey).ok().stdout;
        assert_eq!(cert_key, fx.public_key_pem(KEY), "the certificate holds the token's public key");
        let prefix = fx.dir.join("nginx");
        std::fs::create_dir_all(&prefix).expect("create nginx's directory");
        // As root, nginx would run its workers as nobody unless told otherwise; root can read keys.db and
        // the token directory.
        let worker_user = is_root().then(|| "root".to_string());
        Site { fx, openssl_cnf, cert, prefix, port: free_port(), worker_user }
    }

    /// nginx.conf for this site; `ssl_engine` adds `ssl_engine pkcs11;`.
    pub fn conf_text(&self, ssl_engine: bool) -> String {
        let p = self.prefix.display();
        let user = self.worker_user.as_ref().map(|u| format!("user {u};\n")).unwrap_or_default();
        let engine = if ssl_engine { "ssl_engine pkcs11;\n" } else { "" };
        format!(
            "# Written by tests/servers_cases/nginx.rs.\n\
             daemon off;\nmaster_process on;\nworker_processes {WORKERS};\n{user}\
             pid {p}/nginx.pid;\nlock_file {p}/nginx.lock;\nerror_log {p}/error.log notice;\n\
             # The backend's own configuration, for a backend that reads it again in a worker. The shim's\n\
             # (P11SHIM_CONFIG) is deliberately not passed on: a worker keeps the configuration of its master.\n\
             env SOFTHSM2_CONF;\n{engine}\
             events {{ worker_connections 64; }}\n\
             http {{\n    access_log {p}/access.log;\n\
             \x20   client_body_temp_path {p}/tmp-body;\n    proxy_temp_path {p}/tmp-proxy;\n\
             \x20   fastcgi_temp_path {p}/tmp-fastcgi;\n    uwsgi_temp_path {p}/tmp-uwsgi;\n\
             \x20   scgi_temp_path {p}/tmp-scgi;\n\
             \x20   server {{\n        listen 127.0.0.1:{port} ssl;\n        ssl_certificate {cert};\n\
             \x20       ssl_certificate_key \"engine:pkcs11:{uri}\";\n\
             \x20       location / {{ return 200 \"p11shim nginx $pid\\n\"; }}\n    }}\n}}\n",
            port = self.port,
            cert = self.cert.display(),
            uri = key_uri(&self.fx),
        )
    }

    /// Writes nginx.conf (or another name) and returns its path.
    pub fn write_conf(&self, name: &str, ssl_engine: bool) -> PathBuf {
        let path = self.prefix.join(name);
        std::fs::write(&path, self.conf_text(ssl_engine)).expect("write nginx.conf");
        path
    }

    /// `nginx -p <prefix> -c <conf> <args>` with the environment the master needs: the shim's and the
    /// backend's configuration and OPENSSL_CONF naming the engine's configuration.
    pub fn nginx_command(&self, conf: &Path, openssl_cnf: &Path, args: &[&str]) -> Command {
        let mut cmd = self.fx.command(&nginx());
        cmd.env("OPENSSL_CONF", openssl_cnf).arg("-p").arg(&self.prefix).arg("-c").arg(conf).args(args);
        cmd
    }

    pub fn error_log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.prefix.join("error.log")).unwrap_or_default()).into_owned()
    }
}

/// One page fetched with curl.
struct Fetch {
    /// The pid of the worker that served it.
    pid: Option<u32>,
    /// Why it failed.
    problem: Option<String>,
    /// No answer within [`CURL_MAX_TIME`].
    timed_out: bool,
}

/// Fetches `n` pages, [`PARALLEL`] at a time, each with a curl of its own (one TLS handshake each); stops
/// early after [`MAX_TIMEOUTS`] fetches without an answer.
fn fetch(site: &Site, n: usize) -> Vec<Fetch> {
    let next = AtomicUsize::new(0);
    let timeouts = AtomicUsize::new(0);
    let url = format!("https://127.0.0.1:{}/", site.port);
    let curl = tool("curl", "curl");
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..PARALLEL)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    while next.fetch_add(1, Ordering::SeqCst) < n && timeouts.load(Ordering::SeqCst) < MAX_TIMEOUTS {
                        let mut cmd = site.fx.bare_command(&curl);
                        // -q first: no ~/.curlrc. No proxy: the server is local.
                        cmd.args(["-q", "-sS", "--noproxy", "*", "--max-time", &CURL_MAX_TIME.to_string(), "--cacert"])
                            .arg(&site.cert)
                            .arg(&url);
                        let out = run_in(&site.fx.dir, cmd, Duration::from_secs(CURL_MAX_TIME + 10));
                        let pid = out.stdout.strip_prefix("p11shim nginx ").and_then(|p| p.trim().parse().ok());
                        let timed_out = out.timed_out || out.code == Some(28);
                        if timed_out {
                            timeouts.fetch_add(1, Ordering::SeqCst);
                        }
                        let problem = (!out.success() || pid.is_none()).then(|| {
                            let why = out.stderr.lines().next().unwrap_or("").trim().to_string();
                            if out.timed_out {
                                format!("curl killed after {}s", CURL_MAX_TIME + 10)
                            } else if out.success() {
                                format!("unexpected page {:?}", out.stdout)
                            } else {
                                format!("curl exit {:?}: {why}", out.code)
                            }
                        });
                        mine.push(Fetch { pid, problem, timed_out });
                    }
                    mine
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("a fetching thread panicked")).collect()
    })
}

/// The master's workers that serve (not those shutting down after a reload).
fn serving_workers(master: &Server) -> Vec<u32> {
    master
        .children()
        .into_iter()
        .filter(|p| p.cmdline.contains("worker process") && !p.cmdline.contains("shutting down"))
        .map(|p| p.pid)
        .collect()
}

/// Waits until the master has [`WORKERS`] serving workers and none of `old` (the workers before a reload)
/// is alive; the workers then, or what is still there after [`EXIT_TIMEOUT`].
fn wait_workers(master: &Server, old: &[u32]) -> Result<Vec<u32>, String> {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        let children = master.children();
        let lingering: Vec<&Proc> = children.iter().filter(|p| old.contains(&p.pid)).collect();
        let serving = serving_workers(master);
        if lingering.is_empty() && serving.len() == WORKERS {
            return Ok(serving);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "after {EXIT_TIMEOUT:?}: {} serving worker(s) {serving:?} (want {WORKERS}); old workers still alive \
                 (hung?): {lingering:?}",
                serving.len()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fetches `n` pages and records what went wrong; `workers` are the master's workers at the time.
fn phase(site: &Site, findings: &mut Findings, name: &str, n: usize, workers: &[u32]) {
    let started = Instant::now();
    let fetches = fetch(site, n);
    let ok = fetches.iter().filter(|f| f.problem.is_none()).count();
    let mut served: Vec<u32> = fetches.iter().filter_map(|f| f.pid).collect();
    served.sort_unstable();
    served.dedup();
    findings.note(format!(
        "{name}: {ok} of {n} pages served in {:.1}s by workers {served:?} (the master's workers: {workers:?})",
        started.elapsed().as_secs_f64()
    ));
    let problems: Vec<&str> = fetches.iter().filter_map(|f| f.problem.as_deref()).collect();
    findings.check(problems.is_empty() && fetches.len() == n, || {
        let mut text = format!("{name}: {} of {n} fetches failed", n - ok);
        if fetches.len() < n {
            let _ = write!(
                text,
                " ({} not tried: the phase stopped after {MAX_TIMEOUTS} fetches got no answer within {CURL_MAX_TIME}s)",
                n - fetches.len()
            );
        }
        format!("{text}:\n{}", tally(problems.iter()))
    });
    let timeouts = fetches.iter().filter(|f| f.timed_out).count();
    findings.check(timeouts == 0, || {
        format!("{name}: {timeouts} fetch(es) got no answer within {CURL_MAX_TIME}s: a worker hangs")
    });
    let strangers: Vec<u32> = served.iter().copied().filter(|p| !workers.contains(p)).collect();
    findings.check(strangers.is_empty(), || {
        format!("{name}: pages served by {strangers:?}, which are not the master's current workers {workers:?}")
    });
}

/// The error log's lines that tell of a failure: alerts, critical errors (a failed TLS handshake is one),
/// emergencies, and workers that crashed or exited with an error.
fn bad_log_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            l.contains("[alert]")
                || l.contains("[crit]")
                || l.contains("[emerg]")
                || l.contains("exited on signal")
                || (l.contains("exited with code") && !l.contains("exited with code 0"))
        })
        .collect()
}

/// Who nginx's workers run as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workers {
    /// root (`user root;`), or this process's user when it is not root.
    Root,
    /// `user nobody nogroup;`, with the files a worker opens given to nobody: SoftHSM2's token directory,
    /// the SQLite key store (keys.db, keys.db-wal, keys.db-shm) and the shim's log. Needs root.
    Nobody,
}

/// The nginx test of one key store: start, [`FETCHES_AT_START`] pages, two reloads with
/// [`FETCHES_AFTER_RELOAD`] pages after each, quit.
pub fn serves_tls_with_a_stored_key(test: &str, store: Store, workers: Workers) {
    let mut site = Site::new(test, store);
    if workers == Workers::Nobody {
        assert!(is_root(), "{test}: giving the workers' files to nobody needs root");
        site.worker_user = Some("nobody nogroup".to_string());
        let fx = &site.fx;
        let mut chown = fx.bare_command(Path::new("chown"));
        chown.args(["-R", "nobody:nogroup"]).arg(fx.dir.join("tokens")).arg(&fx.log);
        for name in ["keys.db", "keys.db-wal", "keys.db-shm"] {
            if fx.dir.join(name).exists() {
                chown.arg(fx.dir.join(name));
            }
        }
        fx.run(chown).ok();
    }
    let conf = site.write_conf("nginx.conf", true);
    site.fx.run(site.nginx_command(&conf, &site.openssl_cnf, &["-t"])).ok();

    let mut findings = Findings::default();
    let mut master =
        Server::start("nginx", site.nginx_command(&conf, &site.openssl_cnf, &[]), &site.prefix.join("stderr.log"));
    if let Err(e) = master.wait_for_port(site.port, Duration::from_secs(20)) {
        panic!("{e}\n--- nginx's output\n{}\n--- error.log\n{}", master.output_text(), site.error_log());
    }
    let mut all_workers: Vec<u32> = Vec::new();
    let mut workers = match wait_workers(&master, &[]) {
        Ok(w) => w,
        Err(e) => {
            findings.fail(format!("at start: {e}"));
            serving_workers(&master)
        }
    };
    all_workers.extend(&workers);
    phase(&site, &mut findings, "after start", FETCHES_AT_START, &workers);

    for reload in 1..=2 {
        // The signalling nginx reads the whole configuration (the key included) before it signals the
        // master: it needs the master's environment.
        let out = site.fx.run(site.nginx_command(&conf, &site.openssl_cnf, &["-s", "reload"]));
        if !findings.check(out.success(), || format!("reload {reload}: {}", out.failure())) {
            continue;
        }
        if let Some(status) = master.exited() {
            findings.fail(format!("reload {reload}: the master exited ({status})"));
            break;
        }
        workers = match wait_workers(&master, &workers) {
            Ok(w) => w,
            Err(e) => {
                findings.fail(format!("reload {reload}: {e}"));
                serving_workers(&master)
            }
        };
        all_workers.extend(&workers);
        phase(&site, &mut findings, &format!("after reload {reload}"), FETCHES_AFTER_RELOAD, &workers);
    }

    let out = site.fx.run(site.nginx_command(&conf, &site.openssl_cnf, &["-s", "quit"]));
    findings.check(out.success(), || format!("nginx -s quit: {}", out.failure()));
    match master.wait_exit(EXIT_TIMEOUT) {
        Some(status) => {
            findings.check(status.success(), || format!("the master exited with {status}"));
        }
        None => findings.fail(format!(
            "the master did not exit within {EXIT_TIMEOUT:?} of `nginx -s quit` (hung?); its group: {:#?}",
            master.group()
        )),
    }
    let left = master.group();
    findings.check(left.is_empty(), || format!("processes of nginx's group left after it exited: {left:#?}"));
    let error_log = site.error_log();
    let bad = bad_log_lines(&error_log);
    findings.check(bad.is_empty(), || {
        format!("nginx's error.log tells of {} failure(s):\n{}", bad.len(), tally(bad.iter().map(|l| log_message(l))))
    });
    let problems = site.fx.shim_log_problems();
    let errors: Vec<&String> = problems.iter().filter(|l| l.contains(" ERROR: ")).collect();
    findings.check(errors.is_empty(), || {
        format!("the shim logged {} error(s):\n{}", errors.len(), tally(errors.iter().map(|l| log_message(l))))
    });
    findings.check(!site.fx.pins_in_log(), || "a PIN appears in the shim's log".to_string());
    master.kill();
    findings.assert_none(test, || {
        let mut pids = vec![master.pid()];
        pids.extend(all_workers.iter().take(2 * WORKERS));
        format!(
            "--- nginx's output\n{}\n--- error.log without the notice lines\n{}\n\
             --- the shim's ERROR/WARN lines ({})\n{}\n\
             --- the shim's log of the master and of the first workers\n{}",
            master.output_text(),
            tally(error_log.lines().filter(|l| !l.contains("[notice]")).map(log_message)),
            site.fx.log.display(),
            tally(problems.iter().map(|l| log_message(l))),
            site.fx.shim_log_of(&pids)
        )
    });
}

/// What nginx needs to load a key through the engine, checked with `nginx -t` (which loads the key as the
/// master does): the engine initialized either by `init = 1` in openssl.cnf or by `ssl_engine pkcs11;`
/// (without either, ENGINE_load_private_key fails: "not initialised"). And `nginx -s reload` reads the whole
/// configuration, the key included, before it signals the master: without P11SHIM_CONFIG it fails there.
pub fn engine_configuration() {
    let site = Site::new("nginx_engine_configuration", Store::Sqlite);
    let init0 = site.fx.openssl_cnf("openssl-init0.cnf", false);
    let cases = [
        ("init = 1, no ssl_engine", &site.openssl_cnf, false, true),
        ("init = 0, ssl_engine pkcs11", &init0, true, true),
        ("init = 0, no ssl_engine", &init0, false, false),
    ];
    let mut findings = Findings::default();
    for (i, (what, cnf, ssl_engine, works)) in cases.into_iter().enumerate() {
        let conf = site.write_conf(&format!("nginx-{i}.conf"), ssl_engine);
        let out = site.fx.run(site.nginx_command(&conf, cnf, &["-t"]));
        if works {
            findings.check(out.success(), || format!("{what}: nginx -t must load the key: {}", out.failure()));
        } else {
            findings.check(!out.success() && out.stderr.contains("not initialised"), || {
                format!("{what}: nginx -t must fail with \"engine routines::not initialised\": {}", out.failure())
            });
        }
    }
    // No master runs: with the master's environment the signaller gets as far as the pid file (so it loaded
    // the key); without P11SHIM_CONFIG it stops at the key.
    let conf = site.write_conf("nginx.conf", true);
    let out = site.fx.run(site.nginx_command(&conf, &site.openssl_cnf, &["-s", "reload"]));
    findings.check(out.stderr.contains("nginx.pid") && !out.stderr.contains("cannot load certificate key"), || {
        format!(
            "nginx -s reload with the environment must fail only for want of a master (nginx.pid): {}",
            out.failure()
        )
    });
    let mut without = site.nginx_command(&conf, &site.openssl_cnf, &["-s", "reload"]);
    without.env_remove("P11SHIM_CONFIG");
    let out = site.fx.run(without);
    findings.check(!out.success() && out.stderr.contains("cannot load certificate key"), || {
        format!("nginx -s reload without P11SHIM_CONFIG must fail loading the key: {}", out.failure())
    });
    findings.note(format!("nginx -s reload without P11SHIM_CONFIG:\n{}", out.stderr.trim_end()));
    findings.assert_none("nginx_engine_configuration", String::new);
}
