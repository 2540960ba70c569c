//! Stored keys with the embedded key store (SQLite) over the CryptoServer simulator configured without its
//! device MBK (`device_mbk = false`): p11shim makes its MBK set of objects there, as on SoftHSM2. The cases
//! are in tests/vault_cases; tests/vault_sqlite_cssim.rs runs them with the device's own MBK.
mod common;
mod vault_cases;

fn init() {
    vault_cases::init(|| {
        let db = common::test_dir().join("keys.db");
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
        format!("sqlite:{}", db.display())
    });
}

vault_cases!();
