//! Database slots in real processes, over SoftHSM2: a forking server, every way of unloading the module,
//! threads after C_Finalize, and the cost of an idle process, on SQLite and on PostgreSQL. The cases are in
//! tests/process_cases (tests/process_cssim.rs runs them over the simulator).
mod common;
mod process_cases;

use process_cases::Engine::{Postgres, Sqlite};

process_cases!(
    serial: [
        forked_workers_use_the_parents_database_slot_on_sqlite => process_cases::fork_storm(Sqlite),
        forked_workers_use_the_parents_database_slot_on_postgres => process_cases::fork_storm(Postgres),
        unloading_never_crashes_the_application_on_sqlite => process_cases::unload(Sqlite),
        unloading_never_crashes_the_application_on_postgres => process_cases::unload(Postgres),
        no_shim_thread_outlives_c_finalize_on_sqlite => process_cases::threads_end_with_finalize(Sqlite),
        no_shim_thread_outlives_c_finalize_on_postgres => process_cases::threads_end_with_finalize(Postgres),
    ],
    beside: [
        an_idle_database_slot_costs_no_cpu_and_sees_other_processes_changes =>
            process_cases::idle_costs_nothing_and_sees_changes(&[Sqlite, Postgres]),
    ],
);
