//! Stored keys (issue B) with the embedded key store: SQLite. The cases are in tests/vault_cases.
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

vault_cases!(
    stored_key_is_a_row_not_an_hsm_object,
    stored_keys_sign_verify_and_mac,
    find_by_any_attribute_and_group,
    attributes_follow_the_spec,
    destroy_deletes_the_row_and_other_processes_see_it,
    keys_survive_a_restart_and_are_seen_by_other_processes,
    handles_survive_close_all_sessions_and_logout,
    missing_mbk_says_how_to_create_it,
    edited_rows_are_refused,
    four_processes_create_at_once,
    kill_during_create_leaves_no_half_row,
    plain_slot_is_untouched,
    every_creation_path_stores,
    held_rows_spare_the_store,
    custody_holds_against_a_pin_holder,
    custody_holds_without_the_pin,
    forged_rows_never_give_the_value,
    always_authenticate_needs_a_context_login,
    unwrappable_keys_are_kept_by_the_hsm,
    init_token_empties_a_database_slot,
    same_attributes_as_pass_through,
    the_hsm_holds_at_most_hsm_cache_copies,
    an_operation_keeps_its_key_through_evictions,
    threads_share_the_cache_without_losing_a_call,
);
