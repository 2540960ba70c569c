#!/usr/bin/env bash
# Builds every fuzz target (fuzz/fuzz_targets) with libFuzzer, SanitizerCoverage and AddressSanitizer, and runs
# each for SECONDS_PER_TARGET seconds on a scratch copy of its seed corpus (fuzz/corpus/TARGET), so a run adds
# nothing to the repository. See FUZZING.md.
# Usage: bash scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 20 seconds, every target)
# Environment: FUZZ_TARGET_DIR (default fuzz/target), FUZZ_JOBS (targets run at once, default: nproc, at most 2),
#   FUZZ_KEEP (a directory to keep each target's grown corpus and logs in, instead of a temporary one),
#   FUZZ_OPT_LEVEL (default 1: half the build time of 3 on two cores, at a similar speed under the sanitizer;
#   3 for long runs).
# Exits non-zero, naming the crash input, if any target crashes, panics, leaks or times out.
#
# Only the stable toolchain is needed: the sanitizer flags are nightly-only (-Z), which RUSTC_BOOTSTRAP=1 allows
# on stable; the flags are those cargo-fuzz passes (cargo-fuzz itself is not needed, but `cargo fuzz run TARGET`
# works on the same layout for who has it).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
if ! command -v cargo >/dev/null && [[ -f $HOME/.cargo/env ]]; then
    # shellcheck disable=SC1091
    source "$HOME/.cargo/env"
fi

seconds=${1:-20}
shift || true
[[ $seconds =~ ^[0-9]+$ ]] || { echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2; exit 2; }
if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    targets=()
    for f in fuzz/fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi

host=$(rustc -vV | sed -n 's/^host: //p')
target_dir=${FUZZ_TARGET_DIR:-$root/fuzz/target}
export CARGO_TARGET_DIR=$target_dir
export RUSTC_BOOTSTRAP=1
export CARGO_PROFILE_RELEASE_OPT_LEVEL=${FUZZ_OPT_LEVEL:-1}
# What cargo-fuzz 0.13 passes for `cargo fuzz build` (address sanitizer, debug assertions on).
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
-Zsanitizer=address -Cdebug-assertions -Coverflow-checks -Cforce-frame-pointers=yes ${RUSTFLAGS:-}"
# The C parts (bundled SQLite, libFuzzer itself) are built by the cc crate as usual, not instrumented.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:detect_odr_violation=0}

echo "building ${#targets[@]} fuzz targets in $target_dir (opt-level $CARGO_PROFILE_RELEASE_OPT_LEVEL)"
build_args=(--release --manifest-path fuzz/Cargo.toml --target "$host")
for t in "${targets[@]}"; do
    build_args+=(--bin "$t")
done
t0=$SECONDS
cargo build "${build_args[@]}"
echo "built in $((SECONDS - t0)) s"
bin_dir=$target_dir/$host/release

if [[ -n ${FUZZ_KEEP:-} ]]; then
    work=$FUZZ_KEEP
    mkdir -p "$work"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi

jobs=${FUZZ_JOBS:-$(nproc)}
((jobs > 2)) && jobs=2
((jobs < 1)) && jobs=1

# run_one TARGET: fuzzes one target; its output goes to $work/TARGET.log, its crash inputs to $work/TARGET.artifacts/.
run_one() {
    local t=$1
    local corpus=$work/$t.corpus artifacts=$work/$t.artifacts
    mkdir -p "$corpus" "$artifacts"
    if [[ -d fuzz/corpus/$t ]]; then
        cp -r "fuzz/corpus/$t/." "$corpus/"
    fi
    local extra=()
    if [[ -f fuzz/options/$t.options ]]; then
        read -r -a extra <"fuzz/options/$t.options"
    fi
    "$bin_dir/$t" "$corpus" -artifact_prefix="$artifacts/" -max_total_time="$seconds" -timeout=10 \
        -rss_limit_mb=4096 -print_final_stats=1 "${extra[@]}" >"$work/$t.log" 2>&1
}

# Runs the targets, $jobs at a time.
declare -A pid_of=()
failed=()
for t in "${targets[@]}"; do
    while ((${#pid_of[@]} >= jobs)); do
        wait -n || true
        for running in "${!pid_of[@]}"; do
            if ! kill -0 "${pid_of[$running]}" 2>/dev/null; then
                wait "${pid_of[$running]}" || failed+=("$running")
                unset "pid_of[$running]"
            fi
        done
    done
    echo "fuzzing $t for $seconds s"
    run_one "$t" &
    pid_of[$t]=$!
done
for running in "${!pid_of[@]}"; do
    wait "${pid_of[$running]}" || failed+=("$running")
done

printf '\n%-14s %12s %9s %8s %8s %9s\n' target executions exec/s cov features corpus
for t in "${targets[@]}"; do
    log=$work/$t.log
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    files=$(find "$work/$t.corpus" -type f | wc -l)
    printf '%-14s %12s %9s %8s %8s %9s\n' "$t" "${runs:-?}" "${speed:-?}" "${cov:-?}" "${ft:-?}" "$files"
done

if ((${#failed[@]} > 0)); then
    for t in "${failed[@]}"; do
        echo
        echo "=== $t FAILED; the end of its log ($work/$t.log):"
        tail -40 "$work/$t.log"
        for crash in "$work/$t.artifacts"/*; do
            [[ -e $crash ]] || continue
            kept=$root/fuzz/artifacts/$t/$(basename "$crash")
            mkdir -p "$(dirname "$kept")"
            cp "$crash" "$kept"
            echo "crash input: $kept (reproduce: $bin_dir/$t $kept)"
        done
    done
    echo
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
echo
echo "no crash in ${#targets[@]} targets (${seconds} s each)"
