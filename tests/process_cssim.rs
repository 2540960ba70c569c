//! Database slots in real processes, over the CryptoServer simulator: the cases of tests/process_cases (which
//! tests/process.rs runs over SoftHSM2). The fork storm, the threads and the idle process run on SQLite and
//! on PostgreSQL: how a backend behaves in a forked child is its own (SoftHSM2 stays initialized across
//! fork, the simulator's device is shared by processes). Unloading runs on SQLite only here: what can
//! outlive the module is the shim's own store threads, the same over either backend, and tests/process.rs
//! unloads on both engines.
mod common;
mod process_cases;

use process_cases::Engine::{Postgres, Sqlite};

process_cases!(
    serial: [
        forked_workers_use_the_parents_database_slot_on_sqlite => process_cases::fork_storm(Sqlite),
        forked_workers_use_the_parents_database_slot_on_postgres => process_cases::fork_storm(Postgres),
        unloading_never_crashes_the_application_on_sqlite => process_cases::unload(Sqlite),
        no_shim_thread_outlives_c_finalize_on_sqlite => process_cases::threads_end_with_finalize(Sqlite),
        no_shim_thread_outlives_c_finalize_on_postgres => process_cases::threads_end_with_finalize(Postgres),
    ],
    beside: [
        an_idle_database_slot_costs_no_cpu_and_sees_other_processes_changes =>
            process_cases::idle_costs_nothing_and_sees_changes(&[Sqlite, Postgres]),
    ],
);
