#!/usr/bin/env bash
# p11shim's whole test suite, as CI runs it (.ci/run):
#   system packages, rustfmt, clippy, release build and the Debian packages built from it, debug build,
#   unit/integration tests, doc tests, fuzzing, and the demo (scripts/demo.sh) as a final end-to-end smoke
#   test through pkcs11-tool and the OpenSSL engine.
# Usage: bash scripts/test.sh        (from anywhere; as root on Debian 12)
# Stops at the first failing step with a non-zero status; prints the time each step took.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

if ! command -v cargo >/dev/null && [[ -f $HOME/.cargo/env ]]; then
    # shellcheck disable=SC1091
    source "$HOME/.cargo/env"
fi

timings=()
started=$SECONDS

report() {
    printf '\nTimings:\n'
    for t in "${timings[@]}"; do
        echo "  $t"
    done
    printf '  %-58s %4ss\n' "total" "$((SECONDS - started))"
}

# run NAME COMMAND...: runs one step, records its time, stops everything if it fails.
run() {
    local name=$1 t0=$SECONDS rc=0
    shift
    printf '\n=== %s: %s\n' "$name" "$*"
    "$@" || rc=$?
    local line
    line=$(printf '%-58s %4ss' "$name" "$((SECONDS - t0))")
    if [[ $rc -ne 0 ]]; then
        timings+=("$line  FAILED (exit status $rc)")
        report
        printf '\nFAILED: %s\n' "$name" >&2
        exit "$rc"
    fi
    timings+=("$line  ok")
    printf '=== %s: ok (%ss)\n' "$name" "$((SECONDS - t0))"
}

run "system packages" bash scripts/install-deps.sh
run "format (cargo fmt --check)" cargo fmt --all -- --check
run "lint (cargo clippy)" cargo clippy --workspace --all-targets -- -D warnings
run "release build" cargo build --release --workspace
run "Debian packages (scripts/test-package.sh)" bash scripts/test-package.sh
# cargo test builds the library only as an rlib for the tests; the tests load the cdylib, so build it first.
run "debug build (the .so files the tests load: shim, simulator; the p11shim command)" cargo build --workspace --lib --bins --examples
# One throwaway PostgreSQL cluster shared by the test binaries (tests/common/pg.rs starts its own without it).
pg_dir=$(mktemp -d)
trap 'bash scripts/pg-cluster.sh stop "$pg_dir"' EXIT
pg_start() {
    P11SHIM_TEST_PG_URL=$(bash scripts/pg-cluster.sh start "$pg_dir")
    export P11SHIM_TEST_PG_URL
    echo "$P11SHIM_TEST_PG_URL"
}
run "PostgreSQL test cluster (scripts/pg-cluster.sh)" pg_start
run "tests (cargo test --workspace --all-targets)" cargo test --workspace --all-targets
run "doc tests (cargo test --workspace --doc)" cargo test --workspace --doc
run "fuzzing (scripts/fuzz.sh, 20 s per target)" bash scripts/fuzz.sh 20
run "demo (scripts/demo.sh)" bash scripts/demo.sh

report
printf '\nAll steps passed.\n'
