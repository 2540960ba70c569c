//! Real servers whose TLS and SSH keys live in a database slot, through the shim, against SoftHSM2: nginx
//! (OpenSSL pkcs11 engine) with the key store on SQLite and on PostgreSQL, and OpenSSH (ssh -I, ssh-agent,
//! sshd's host key through the agent). The cases are in tests/servers_cases; they start servers, so they run
//! as root (nginx switches its workers to the user of nginx.conf, sshd needs root).
mod common;
mod servers_cases;

use servers_cases::nginx::Workers;
use servers_cases::Store;

#[test]
fn nginx_tls_key_in_sqlite_database_slot() {
    servers_cases::nginx::serves_tls_with_a_stored_key("nginx_sqlite", Store::Sqlite, Workers::Root);
}

#[test]
fn nginx_tls_key_in_postgres_database_slot() {
    servers_cases::nginx::serves_tls_with_a_stored_key("nginx_postgres", Store::Postgres, Workers::Root);
}

/// Workers as an unprivileged user: what they open (the token directory, keys.db, the shim's log) must be
/// theirs.
#[test]
fn nginx_workers_as_nobody_with_the_files_they_open() {
    servers_cases::nginx::serves_tls_with_a_stored_key("nginx_nobody", Store::Sqlite, Workers::Nobody);
}

#[test]
fn nginx_engine_needs_init_or_ssl_engine_and_reload_needs_the_environment() {
    servers_cases::nginx::engine_configuration();
}

#[test]
fn openssh_user_and_host_keys_in_database_slot() {
    servers_cases::openssh::user_and_host_keys_in_a_database_slot();
}

#[test]
fn log_lines_are_counted_without_what_varies() {
    use servers_cases::{log_message, tally};
    let nginx = "2026/12/06 22:16:07 [crit] 3818#3818: *2 SSL_do_handshake() failed (SSL: x) while SSL handshaking";
    assert_eq!(log_message(nginx), "[crit] SSL_do_handshake() failed (SSL: x) while SSL handshaking");
    let notice = "2026/12/06 22:16:05 [notice] 3815#3815: start worker process 3818";
    assert_eq!(log_message(notice), "[notice] start worker process 3818");
    let shim = "2026-12-06T22:16:07.225Z p11shim[3818] ERROR: C_Initialize failed: configuration file x";
    assert_eq!(log_message(shim), "ERROR: C_Initialize failed: configuration file x");
    assert_eq!(log_message("no prefix at all"), "no prefix at all");
    assert_eq!(tally(["b", "a", "b"]), "2x b\n1x a");
    let many: Vec<String> = (0..20).map(|i| format!("line {i}")).collect();
    assert!(tally(&many).ends_with("… and 8 other distinct line(s)"), "{}", tally(&many));
}
