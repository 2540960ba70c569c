//! PostgreSQL failover under load: a primary replicating synchronously to a standby (tests/common/pg.rs), the
//! shim's store URL naming both with `target_session_attrs=read-write`, threads creating and using stored keys
//! while the primary dies (`-m immediate`, as a crash) and the standby is promoted. What must hold: calls
//! fail only with CKR_DEVICE_ERROR and only during the switch, no call hangs past the connect timeout, every
//! thread works again with the handles it had, no key whose creation returned CKR_OK is lost, held rows are
//! read again after the switch and the change listener resumes on the new primary. Without
//! `[store] outage_grace` warm keys fail during the switch like every call that needs the store; with it they
//! keep working while key creations still fail.
//!
//! Each test prints the failover window and the failed calls (for BENCHMARKS.md). The shim is loaded once per
//! process and reads its configuration at C_Initialize, so each [`Plan`] runs in a child process (this binary
//! re-run as `failover_child`); the tests run one at a time.
mod common;

use common::pg::PgCluster;
use common::{aes_template, hmac_key, new_token, rv, user_session};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The URL's connect_timeout, in seconds: no call may take much longer than one attempt per host.
const CONNECT_TIMEOUT_S: u64 = 2;
/// How long nothing accepts writes: the primary is dead and the standby not yet promoted.
const OUTAGE: Duration = Duration::from_millis(1000);
/// Every thread works again within this long after the promotion.
const RECOVERY: Duration = Duration::from_secs(10);
/// Calls made by each thread after it recovered, before the threads stop.
const AFTER: usize = 20;
/// Pauses between calls: a steady load, and failure counts that mean something.
const WRITER_PAUSE: Duration = Duration::from_millis(10);
const READER_PAUSE: Duration = Duration::from_millis(5);
const READERS: usize = 2;
/// The HMAC keys the readers use, made before the load starts.
const WARM: usize = 3;

/// One call of a worker thread.
#[derive(Clone, Debug)]
struct Call {
    thread: String,
    what: &'static str,
    start: Instant,
    end: Instant,
    /// `None` for CKR_OK.
    failed: Option<String>,
    device_error: bool,
}

fn outcome<T>(r: &cryptoki::error::Result<T>) -> (Option<String>, bool) {
    match r {
        Ok(_) => (None, false),
        Err(Error::Pkcs11(RvError::DeviceError, _)) => (Some("CKR_DEVICE_ERROR".into()), true),
        Err(e) => (Some(e.to_string()), false),
    }
}

fn ec_pair(s: &Session, label: &str) -> (ObjectHandle, ObjectHandle) {
    let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[Attribute::Token(true), Attribute::EcParams(p256), Attribute::Verify(true), Attribute::Label(label.into())],
        &[Attribute::Token(true), Attribute::Sign(true), Attribute::Label(label.into()), Attribute::Sensitive(true)],
    )
    .expect("C_GenerateKeyPair (stored)")
}

fn shim_log() -> String {
    std::fs::read_to_string(common::test_dir().join("shim.log")).unwrap_or_default()
}

/// How often this process read the row `id` from the store (the shim's debug log).
fn row_reads(id: &str) -> usize {
    let (me, line) = (format!("p11shim[{}]", std::process::id()), format!("stored key {id}: reading its row"));
    shim_log().lines().filter(|l| l.contains(&me) && l.contains(&line)).count()
}

fn sql(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// The id of the stored key labelled `label`.
fn row_id(db: &mut postgres::Client, label: &str) -> String {
    db.query_one("SELECT id FROM keys WHERE token = 'fo' AND label = $1", &[&label.as_bytes()])
        .unwrap_or_else(|e| panic!("the row of {label}: {e}"))
        .get(0)
}

/// What a use of `key` ends in once this process has heard that its row changed (within 5 s).
fn refused_after_change(s: &Session, key: ObjectHandle) -> RvError {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match s.sign(&Mechanism::Sha256Hmac, key, b"data") {
            Err(e) => return rv(e),
            Ok(_) => {
                assert!(Instant::now() < deadline, "a row deleted on the new primary was not noticed in 5 s");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// A configuration of the failover and what it must show.
#[derive(Clone, Copy, Debug)]
struct Plan {
    name: &'static str,
    /// `[store] outage_grace`; `None`: the setting left out (its default).
    grace: Option<&'static str>,
    /// The writer thread creates keys; else it looks for a label nothing has (the store is used, no key is
    /// made, so no generation changes and no warm key is confirmed again by a call).
    create: bool,
    /// The load before the primary dies.
    steady: Duration,
    /// Whether the warm keys (HMAC, ECDSA) must keep working through the switch.
    warm_survive: bool,
}

const PLANS: &[Plan] = &[
    // No grace: every call needing the store fails during the switch, warm keys too.
    Plan { name: "off", grace: Some("0s"), create: true, steady: Duration::from_millis(1500), warm_survive: false },
    // The default grace: the writer's own commits keep the warm keys confirmed, which then work throughout.
    Plan { name: "default", grace: None, create: true, steady: Duration::from_millis(1500), warm_survive: true },
    // A grace shorter than the time since any call confirmed the warm keys: only what the change listener
    // had heard when it went down can keep them working.
    Plan { name: "heard", grace: Some("2s"), create: false, steady: Duration::from_millis(3000), warm_survive: true },
];

/// The whole failover under `plan`. In a child process: the shim reads its configuration once.
fn failover(plan: Plan) {
    let grace = plan.grace;
    common::setup();
    let primary = PgCluster::start();
    let standby = PgCluster::standby(&primary);
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/p11shim?target_session_attrs=read-write&connect_timeout={CONNECT_TIMEOUT_S}",
        primary.port(),
        standby.port()
    );
    let dir = common::test_dir();
    let grace_line = grace.map(|g| format!("outage_grace = \"{g}\"\n")).unwrap_or_default();
    let config = format!(
        "module = \"{}\"\nlog_file = \"shim.log\"\nlog_level = \"debug\"\n[store]\nurl = \"{url}\"\nhsm_cache = 256\n\
         {grace_line}[[slot]]\ntoken = \"fo\"\nstorage = \"database\"\ndefault_group = \"G\"\n",
        common::backend_path().display()
    );
    let path = dir.join("p11shim.toml");
    std::fs::write(&path, config).expect("write p11shim.toml");
    let _ = std::fs::remove_file(dir.join("shim.log"));
    std::env::set_var("P11SHIM_CONFIG", &path);

    let slot = new_token("fo");
    let s = user_session(slot);
    let warm: Vec<ObjectHandle> = (0..WARM).map(|i| hmac_key(&s, &format!("warm{i}"))).collect();
    let (ec_public, ec_private) = ec_pair(&s, "ec");
    // Destroyed on the new primary by another client: one right after the promotion (perhaps before this
    // process listens there again), one once it listens.
    let early = hmac_key(&s, "early");
    let late = hmac_key(&s, "late");
    for &k in warm.iter().chain([&early, &late]) {
        s.sign(&Mechanism::Sha256Hmac, k, b"data").expect("first use");
    }
    let sig = s.sign(&Mechanism::Ecdsa, ec_private, &[1u8; 32]).expect("ECDSA");
    s.verify(&Mechanism::Ecdsa, ec_public, &[1u8; 32], &sig).expect("verify");
    let mut db = sql(primary.url());
    // A commit returns once the standby has it: the premise of "no key created with CKR_OK is lost".
    let sync: Vec<String> = db
        .query("SELECT sync_state FROM pg_stat_replication", &[])
        .expect("pg_stat_replication")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(sync, ["sync"], "the standby replicates synchronously");
    let commit: String = db.query_one("SHOW synchronous_commit", &[]).expect("SHOW").get(0);
    assert_eq!(commit, "on");
    let warm_ids: Vec<String> = (0..WARM).map(|i| row_id(&mut db, &format!("warm{i}"))).collect();
    let (early_id, late_id) = (row_id(&mut db, "early"), row_id(&mut db, "late"));
    drop(db);

    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let created: Arc<Mutex<Vec<(String, ObjectHandle)>>> = Arc::default();
    let attempted = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let record =
        |calls: &Mutex<Vec<Call>>, thread: &str, what: &'static str, start: Instant, o: (Option<String>, bool)| {
            calls.lock().unwrap().push(Call {
                thread: thread.to_string(),
                what,
                start,
                end: Instant::now(),
                failed: o.0,
                device_error: o.1,
            });
        };
    let mut workers = Vec::new();
    {
        let (calls, created, attempted, stop) = (calls.clone(), created.clone(), attempted.clone(), stop.clone());
        workers.push(thread::spawn(move || {
            let s = user_session(slot);
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                if !plan.create {
                    let start = Instant::now();
                    let r = s.find_objects(&[Attribute::Label(b"nothing".to_vec())]);
                    if let Ok(found) = &r {
                        assert!(found.is_empty(), "C_FindObjects found {found:?}");
                    }
                    record(&calls, "writer", "find", start, outcome(&r));
                    thread::sleep(WRITER_PAUSE);
                    continue;
                }
                let label = format!("w{i}");
                i += 1;
                attempted.lock().unwrap().push(label.clone());
                let start = Instant::now();
                let r = s.generate_key(&Mechanism::AesKeyGen, &aes_template(&label));
                record(&calls, "writer", "create", start, outcome(&r));
                if let Ok(h) = r {
                    created.lock().unwrap().push((label, h));
                }
                thread::sleep(WRITER_PAUSE);
            }
        }));
    }
    for n in 0..READERS {
        let (calls, stop, warm) = (calls.clone(), stop.clone(), warm.clone());
        workers.push(thread::spawn(move || {
            let s = user_session(slot);
            let name = format!("reader{n}");
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let start = Instant::now();
                let r = s.sign(&Mechanism::Sha256Hmac, warm[i % WARM], b"data");
                record(&calls, &name, "hmac", start, outcome(&r));
                thread::sleep(READER_PAUSE);
                let start = Instant::now();
                let r = s.sign(&Mechanism::Ecdsa, ec_private, &[2u8; 32]);
                record(&calls, &name, "ecdsa", start, outcome(&r));
                thread::sleep(READER_PAUSE);
                let start = Instant::now();
                // Finding a warm key confirms it: where nothing may, look for a label nothing has.
                let label = if plan.create { format!("warm{}", i % WARM) } else { "nothing".into() };
                let r = s.find_objects(&[Attribute::Label(label.into_bytes())]);
                if let Ok(found) = &r {
                    assert_eq!(found.len(), usize::from(plan.create), "C_FindObjects by label found {found:?}");
                }
                record(&calls, &name, "find", start, outcome(&r));
                thread::sleep(READER_PAUSE);
                i += 1;
            }
        }));
    }

    // A steady load on the primary, then the switch.
    thread::sleep(plan.steady);
    let reads_before: Vec<usize> = warm_ids.iter().map(|id| row_reads(id)).collect();
    let killed = Instant::now();
    primary.kill();
    thread::sleep(OUTAGE);
    let promoting = Instant::now();
    standby.promote();
    let promoted = Instant::now();
    // Another client destroys a key on the new primary at once.
    let mut db = sql(standby.url());
    assert_eq!(db.execute("DELETE FROM keys WHERE id = $1", &[&early_id]).expect("DELETE"), 1);

    // Every thread recovers and then makes AFTER calls.
    let threads: Vec<String> =
        std::iter::once("writer".to_string()).chain((0..READERS).map(|n| format!("reader{n}"))).collect();
    let recovered = |calls: &[Call], thread: &str| {
        calls.iter().filter(|c| c.thread == thread && c.start >= promoted && c.failed.is_none()).count() >= AFTER
    };
    loop {
        let done = {
            let calls = calls.lock().unwrap();
            threads.iter().all(|t| recovered(&calls, t))
        };
        if done || promoted.elapsed() > RECOVERY + Duration::from_secs(5) {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().expect("a worker thread panicked");
    }
    let calls = calls.lock().unwrap().clone();

    // What the calls did.
    let failed: Vec<&Call> = calls.iter().filter(|c| c.failed.is_some()).collect();
    let wrong: Vec<&Call> = failed.iter().copied().filter(|c| !c.device_error).collect();
    assert!(wrong.is_empty(), "calls failed with something else than CKR_DEVICE_ERROR: {wrong:#?}");
    let early_failures: Vec<&Call> = failed.iter().copied().filter(|c| c.end < killed).collect();
    assert!(early_failures.is_empty(), "calls failed before the primary died: {early_failures:#?}");
    let late_failures: Vec<&Call> = failed.iter().copied().filter(|c| c.start > promoted + RECOVERY).collect();
    assert!(late_failures.is_empty(), "calls failed {RECOVERY:?} after the promotion: {late_failures:#?}");
    let slowest = calls.iter().max_by_key(|c| c.end - c.start).expect("calls");
    let hang = Duration::from_secs(2 * CONNECT_TIMEOUT_S + 3);
    assert!(
        slowest.end - slowest.start < hang,
        "a call took {:?} (more than {hang:?}): {slowest:?}",
        slowest.end - slowest.start
    );
    for t in &threads {
        let mine: Vec<&Call> = calls.iter().filter(|c| &c.thread == t).collect();
        assert!(
            mine.iter().filter(|c| c.start >= promoted && c.failed.is_none()).count() >= AFTER,
            "{t} did not work again within {RECOVERY:?} of the promotion"
        );
        // Once a call worked after the promotion, every later one works.
        let back = mine.iter().position(|c| c.start >= promoted && c.failed.is_none()).expect("recovered");
        let relapse: Vec<&&Call> = mine[back..].iter().filter(|c| c.failed.is_some()).collect();
        assert!(relapse.is_empty(), "{t} failed again after it recovered: {relapse:#?}");
    }

    // The figures.
    let first_failure = failed.iter().map(|c| c.start).min();
    let first_success = calls.iter().filter(|c| c.start >= promoted && c.failed.is_none()).map(|c| c.end).min();
    let last_failure = failed.iter().map(|c| c.end).max();
    let count = |what: &str| failed.iter().filter(|c| c.what == what).count();
    let total = |what: &str| calls.iter().filter(|c| c.what == what).count();
    eprintln!(
        "failover ({}, outage_grace {}): standby promoted {} ms after the primary was killed (promotion took {} ms)",
        plan.name,
        grace.unwrap_or("default"),
        ms(promoted - killed),
        ms(promoted - promoting)
    );
    match (first_failure, first_success, last_failure) {
        (Some(first), Some(success), Some(last)) => eprintln!(
            "failover: window {} ms (first failure to first success after the promotion), last failure {} ms after \
             the first; first success {} ms after the promotion",
            ms(success.saturating_duration_since(first)),
            ms(last - first),
            ms(success.saturating_duration_since(promoted))
        ),
        _ => eprintln!(
            "failover: no call failed; first success {} ms after the promotion",
            first_success.map_or(0, |s| ms(s.saturating_duration_since(promoted)))
        ),
    }
    eprintln!(
        "failover: failed calls {} of {} (create {}/{}, hmac {}/{}, ecdsa {}/{}, find {}/{}); slowest call {} ms",
        failed.len(),
        calls.len(),
        count("create"),
        total("create"),
        count("hmac"),
        total("hmac"),
        count("ecdsa"),
        total("ecdsa"),
        count("find"),
        total("find"),
        ms(slowest.end - slowest.start)
    );

    let warm_failed = count("hmac") + count("ecdsa");
    if plan.warm_survive {
        assert_eq!(warm_failed, 0, "warm keys failed during the switch under outage_grace {grace:?}");
    } else {
        assert!(warm_failed > 0, "without a grace warm keys cannot be checked during the switch, yet none failed");
    }
    let writer_failed = failed.iter().filter(|c| c.thread == "writer").count();
    assert!(writer_failed > 0, "calls that need the store did not fail while it was away");

    // No key whose creation returned CKR_OK is lost: the new primary has each row.
    let labels: std::collections::HashSet<Vec<u8>> =
        db.query("SELECT label FROM keys WHERE token = 'fo'", &[]).expect("SELECT").iter().map(|r| r.get(0)).collect();
    let created = created.lock().unwrap().clone();
    let lost: Vec<&String> = created.iter().map(|(l, _)| l).filter(|l| !labels.contains(l.as_bytes())).collect();
    assert!(lost.is_empty(), "keys created with CKR_OK are not on the promoted server: {lost:?}");
    let created_labels: std::collections::HashSet<&String> = created.iter().map(|(l, _)| l).collect();
    let unconfirmed = attempted
        .lock()
        .unwrap()
        .iter()
        .filter(|l| !created_labels.contains(l) && labels.contains(l.as_bytes()))
        .count();
    eprintln!(
        "failover: {} keys created with CKR_OK, all on the new primary; {unconfirmed} failed creations stored anyway",
        created.len()
    );
    // …and they work through the shim, with the handles C_GenerateKey returned (a sample across the run).
    let step = (created.len() / 20).max(1);
    for (label, h) in created.iter().step_by(step) {
        s.encrypt(&Mechanism::AesEcb, *h, &[0u8; 16]).unwrap_or_else(|e| panic!("{label} after the failover: {e}"));
    }

    // The log says why the store could not be reached (the last host tried, the standby, was read-only).
    let why = "database does not allow writes";
    assert!(shim_log().contains(why), "no log line says {why:?}");

    // Every held row was read again after the switch (changes went unheard while nobody listened).
    for (i, id) in warm_ids.iter().enumerate() {
        assert!(row_reads(id) > reads_before[i], "warm{i}'s row was not read again after the failover");
    }
    // The key destroyed on the new primary right after the promotion is gone here too.
    let gone = refused_after_change(&s, early);
    assert!(matches!(gone, RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid), "early: {gone:?}");

    // The listener resumed on the new primary: it LISTENs there, a held row is not read again on every use,
    // and a key destroyed there by another client stops working here.
    let deadline = Instant::now() + Duration::from_secs(5);
    while db
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'p11shim' AND query LIKE 'LISTEN p11shim_keys%'",
            &[],
        )
        .expect("pg_stat_activity")
        .get::<_, i64>(0)
        == 0
    {
        assert!(Instant::now() < deadline, "the shim's listener does not LISTEN on the new primary");
        thread::sleep(Duration::from_millis(50));
    }
    s.sign(&Mechanism::Sha256Hmac, late, b"data").expect("late, before its deletion");
    let reads = row_reads(&late_id);
    for _ in 0..20 {
        s.sign(&Mechanism::Sha256Hmac, late, b"data").expect("late, held");
    }
    assert_eq!(row_reads(&late_id), reads, "a held row is read again on every use: nobody listens");
    assert_eq!(db.execute("DELETE FROM keys WHERE id = $1", &[&late_id]).expect("DELETE"), 1);
    let gone = refused_after_change(&s, late);
    assert!(matches!(gone, RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid), "late: {gone:?}");
    assert_eq!(row_reads(&late_id), reads + 1, "the row was read again once, on the notification");
    for &k in &warm {
        s.sign(&Mechanism::Sha256Hmac, k, b"data").expect("warm keys after the failover");
    }
    drop(db);
    drop(standby);
    drop(primary);
}

/// Runs [`failover`] under the plan `name` in a child process; its report goes to this test's output.
fn run_child(name: &str) {
    let mut child = Command::new(std::env::current_exe().expect("current_exe"));
    child.args(["--exact", "failover_child", "--nocapture", "--test-threads=1"]).env("FAILOVER_PLAN", name);
    let started = Instant::now();
    let out = child.output().expect("run the failover child");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{stderr}");
    eprintln!("failover child took {} ms", ms(started.elapsed()));
    assert!(
        out.status.success() && stdout.contains("test failover_child ... ok"),
        "the failover child failed ({}):\n{stdout}",
        out.status
    );
}

/// The child's side of [`run_child`]; does nothing in a normal test run.
#[test]
fn failover_child() {
    let Ok(name) = std::env::var("FAILOVER_PLAN") else { return };
    failover(*PLANS.iter().find(|p| p.name == name).expect("a plan of that name"));
}

#[test]
#[serial_test::serial]
fn failover_with_outage_grace_off() {
    run_child("off");
}

#[test]
#[serial_test::serial]
fn failover_with_the_default_outage_grace() {
    run_child("default");
}

/// Warm keys that no call confirmed within the grace keep working because the listener heard of no change
/// to them before it lost the server; the pooled connections that failed a moment before it (a change of
/// anything for every other purpose) do not count against that.
#[test]
#[serial_test::serial]
fn failover_with_a_grace_shorter_than_the_last_confirmation() {
    run_child("heard");
}
