//! Stored keys with the shared key store (a real PostgreSQL server, tests/common/pg.rs) over the CryptoServer
//! simulator with its device MBK: the device's blobs and the store's seal key on PostgreSQL. The cases are in
//! tests/vault_cases; tests/vault_postgres.rs runs them over SoftHSM2 (MBK set) with the outage case.
mod common;
mod vault_cases;

use common::pg::PgCluster;
use std::sync::OnceLock;

static CLUSTER: OnceLock<PgCluster> = OnceLock::new();

fn init() {
    vault_cases::init(|| CLUSTER.get_or_init(PgCluster::start).url().to_string());
}

vault_cases!();
