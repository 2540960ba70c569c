//! Stored keys with the shared key store: a real PostgreSQL server (tests/common/pg.rs). The
//! cases are in tests/vault_cases; the database-outage case is here (SQLite has no server to lose). This
//! binary starts a cluster of its own, so that stopping it never disturbs other test binaries.
mod common;
mod vault_cases;

use common::pg::PgCluster;
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::Attribute;
use std::sync::OnceLock;
use std::time::Instant;

static CLUSTER: OnceLock<PgCluster> = OnceLock::new();

fn init() {
    vault_cases::init(|| CLUSTER.get_or_init(PgCluster::start).url().to_string());
}

vault_cases!();

/// The database going away: keys known current within `[store] outage_grace` keep working (a loaded copy, or
/// one loaded from the row the process holds for a key evicted from the HSM cache); finds fail with
/// CKR_DEVICE_ERROR and a log line, and so do the keys once the grace has passed; native keys go on working;
/// when the server is back the same handles work again.
#[test]
#[serial_test::serial]
fn database_outage_is_a_device_error_after_the_grace_until_it_returns() {
    init();
    let (_slot, s) = vault_cases::db_token("db30");
    let warm = vault_cases::new_aes(&s, "warm");
    let cold = vault_cases::new_aes(&s, "cold");
    let native = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[Attribute::Token(false), Attribute::ValueLen(16.into()), Attribute::Encrypt(true)],
        )
        .unwrap();
    // Evicted from the small HSM cache by keys used after it: `cold` has no loaded copy, only its row.
    for i in 0..2 * vault_cases::HSM_CACHE {
        let filler = vault_cases::new_aes(&s, &format!("filler{i}"));
        s.encrypt(&Mechanism::AesEcb, filler, &[0u8; 16]).expect("filler use");
    }
    s.encrypt(&Mechanism::AesEcb, warm, &[0u8; 16]).expect("warm use");
    let cluster = CLUSTER.get().expect("started by init");
    cluster.pause();
    // The key was current when the store's change feed went down, which is before the server was down.
    let down = Instant::now();
    let rv = |r: cryptoki::error::Result<Vec<u8>>| vault_cases::rv(r.unwrap_err());
    s.encrypt(&Mechanism::AesEcb, warm, &[0u8; 16]).expect("a key used within the grace keeps working");
    s.encrypt(&Mechanism::AesEcb, cold, &[0u8; 16]).expect("an evicted key is loaded from its held row");
    assert_eq!(
        vault_cases::rv(s.find_objects(&[Attribute::Label(b"cold".to_vec())]).unwrap_err()),
        RvError::DeviceError
    );
    s.encrypt(&Mechanism::AesEcb, native, &[0u8; 16]).expect("native keys do not need the store");
    let log = vault_cases::shim_log();
    assert!(log.contains("unavailable"), "a clear log line: {log}");
    assert!(log.contains("outage_grace"), "the grace is logged: {log}");
    std::thread::sleep((down + vault_cases::OUTAGE_GRACE).saturating_duration_since(Instant::now()));
    for key in [warm, cold] {
        assert_eq!(
            rv(s.encrypt(&Mechanism::AesEcb, key, &[0u8; 16])),
            RvError::DeviceError,
            "no use of a copy that could not be checked for longer than the grace"
        );
    }
    cluster.resume();
    until_it_works(|| s.encrypt(&Mechanism::AesEcb, cold, &[0u8; 16]));
    s.encrypt(&Mechanism::AesEcb, warm, &[0u8; 16]).expect("warm key after the outage");
    assert_eq!(vault_cases::find_labels(&s, &[Attribute::Label(b"warm".to_vec())]), vec!["warm"]);
}

/// A partition: this process cannot reach the store while another destroys a key it uses. Within the grace
/// the loaded copy still works (the trade-off the README states); as soon as the store answers again the key
/// is refused.
#[test]
#[serial_test::serial]
fn a_key_destroyed_elsewhere_during_an_outage_is_refused_when_the_store_answers() {
    init();
    let (_slot, s) = vault_cases::db_token("db31");
    let doomed = vault_cases::new_aes(&s, "doomed");
    let kept = vault_cases::new_aes(&s, "kept");
    s.encrypt(&Mechanism::AesEcb, doomed, &[0u8; 16]).expect("warm use");
    s.encrypt(&Mechanism::AesEcb, kept, &[0u8; 16]).expect("warm use");
    // "Elsewhere": a connection opened before the partition, which keeps working.
    let url = CLUSTER.get().expect("started by init").url().to_string();
    let mut other = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    other
        .batch_execute(
            "UPDATE pg_database SET datallowconn = false WHERE datname = 'p11shim';
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = 'p11shim' AND pid <> pg_backend_pid() AND application_name LIKE 'p11shim pid %'",
        )
        .unwrap();
    // Terminating is asynchronous: the delete must not reach the shim's listener before it is gone.
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let shim_backends = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'p11shim pid %'";
    while other.query_one(shim_backends, &[]).unwrap().get::<_, i64>(0) > 0 {
        assert!(Instant::now() < deadline, "the shim's connections are still there 10 s after being terminated");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let deleted = other.execute("DELETE FROM keys WHERE label = 'doomed'::bytea", &[]).unwrap();
    assert_eq!(deleted, 1);
    s.encrypt(&Mechanism::AesEcb, doomed, &[0u8; 16]).expect("within the grace, unseen");
    other.batch_execute("UPDATE pg_database SET datallowconn = true WHERE datname = 'p11shim'").unwrap();
    // A find needs the store: once one works, the shim has met the partition and its end (a lost connection
    // counts as a change), so the next use of `doomed` asks the store.
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    while s.find_objects(&[Attribute::Label(b"kept".to_vec())]).is_err() {
        assert!(Instant::now() < deadline, "finds still fail 20 s after the partition ended");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    s.encrypt(&Mechanism::AesEcb, kept, &[0u8; 16]).expect("kept works after the partition");
    let rv = vault_cases::rv(s.encrypt(&Mechanism::AesEcb, doomed, &[0u8; 16]).unwrap_err());
    assert!(matches!(rv, RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid), "{rv:?}");
}

/// Retries `f` until the store is back (at most 20 s).
fn until_it_works(f: impl Fn() -> cryptoki::error::Result<Vec<u8>>) {
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match f() {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => panic!("the store came back but the key does not work: {e}"),
        }
    }
}
