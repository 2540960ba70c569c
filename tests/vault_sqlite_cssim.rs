//! Stored keys with the embedded key store (SQLite) over the CryptoServer simulator, with its device MBK (which
//! p11shim uses: no MBK objects in the token). The cases are
//! in tests/vault_cases; tests/vault_sqlite.rs runs them over SoftHSM2.
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
