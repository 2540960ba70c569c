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

static CLUSTER: OnceLock<PgCluster> = OnceLock::new();

fn init() {
    vault_cases::init(|| CLUSTER.get_or_init(PgCluster::start).url().to_string());
}

vault_cases!();

/// The database going away: stored-key calls fail with CKR_DEVICE_ERROR and a log line; native keys go on
/// working; when the server is back the same handles work again.
#[test]
#[serial_test::serial]
fn database_outage_is_a_device_error_until_it_returns() {
    init();
    let (_slot, s) = vault_cases::db_token("db30");
    let warm = vault_cases::new_aes(&s, "warm");
    let cold = vault_cases::new_aes(&s, "cold");
    s.encrypt(&Mechanism::AesEcb, warm, &[0u8; 16]).expect("warm use");
    let native = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[Attribute::Token(false), Attribute::ValueLen(16.into()), Attribute::Encrypt(true)],
        )
        .unwrap();
    let cluster = CLUSTER.get().expect("started by init");
    cluster.pause();
    let rv = |r: cryptoki::error::Result<Vec<u8>>| vault_cases::rv(r.unwrap_err());
    assert_eq!(rv(s.encrypt(&Mechanism::AesEcb, cold, &[0u8; 16])), RvError::DeviceError);
    assert_eq!(
        rv(s.encrypt(&Mechanism::AesEcb, warm, &[0u8; 16])),
        RvError::DeviceError,
        "no use from a cache that cannot be checked"
    );
    assert_eq!(
        vault_cases::rv(s.find_objects(&[Attribute::Label(b"cold".to_vec())]).unwrap_err()),
        RvError::DeviceError
    );
    s.encrypt(&Mechanism::AesEcb, native, &[0u8; 16]).expect("native keys do not need the store");
    assert!(vault_cases::shim_log().contains("unavailable"), "a clear log line: {}", vault_cases::shim_log());
    cluster.resume();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match s.encrypt(&Mechanism::AesEcb, cold, &[0u8; 16]) {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Err(e) => panic!("the store came back but the key does not work: {e}"),
        }
    }
    s.encrypt(&Mechanism::AesEcb, warm, &[0u8; 16]).expect("warm key after the outage");
    assert_eq!(vault_cases::find_labels(&s, &[Attribute::Label(b"warm".to_vec())]), vec!["warm"]);
}
