//! Backup, restore and verify under the MBK, users and permissions, modes, crash safety and the audit log
//! with the shared key store: a real PostgreSQL server (tests/common/pg.rs, one database per test).
//! The cases are in tests/backup_cases; the MBK cloning case, which does not depend on the store's engine,
//! runs only with SQLite (tests/backup_sqlite.rs).
mod backup_cases;
mod common;

use backup_cases::Engine;

backup_cases!(Engine::Postgres;
    round_trip_of_aes_generic_rsa_and_ec_keys,
    restore_into_a_second_database_slot_of_the_same_store,
    restore_merges_skips_overwrites_and_dry_run_changes_nothing,
    damaged_backups_are_refused_and_change_nothing,
    permissions_follow_the_cryptoserver_rules,
    fips_and_cc_refuse_the_whole_store_and_cc_refuses_overwrite,
    hsm_keys_are_wrapped_and_unwrappable_ones_listed,
    keys_kept_in_the_hsm_are_listed_by_backup,
    kill_9_during_backup_or_restore_changes_nothing,
    audit_records_everything_and_detects_an_edit,
    operator_commands_and_exit_statuses,
    a_9_mb_data_object_and_a_9_mb_label_back_up_verify_and_restore_byte_exact,
    a_backup_while_hosts_write_is_one_snapshot,
    a_group_that_appears_during_a_backup_is_checked,
);

// kill_9_during_a_native_restore_is_rolled_back_by_the_next runs with SQLite only (tests/backup_sqlite.rs): its
// journal is a file and its objects are the HSM's; the key store holds only the users there.

// a_group_that_appears_during_a_backup_is_checked runs with PostgreSQL only: it holds the backup's first scan
// with a view in front of the key store's table.
