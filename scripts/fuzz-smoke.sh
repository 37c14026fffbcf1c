#!/usr/bin/env bash
# Fuzz smoke run: every cargo-fuzz target of fuzz/ for FUZZ_SECONDS (default 60) each,
# seeded from the committed corpus, which is never written to (new inputs go to a temp dir).
#
# Installs what it needs (the nightly toolchain, cargo-fuzz) and fails loudly if it cannot:
# nothing is ever skipped. Prints one summary line per target with libFuzzer's final stats,
# and exits non-zero if any target crashed, leaked, timed out or failed to build.
#
# Environment: FUZZ_SECONDS (per target, default 60), FUZZ_TARGETS (space-separated subset,
# default: all of `cargo fuzz list`), FUZZ_KEEP_DIR (keep the temp corpora and logs there).
# Works non-interactively (CI=true, no stdin).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ_DIR="$ROOT/fuzz"
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
exec </dev/null

die() {
    echo "fuzz-smoke: FAILED: $*" >&2
    exit 1
}
log() { echo "fuzz-smoke: $*" >&2; }

if ! [[ "$FUZZ_SECONDS" =~ ^[0-9]+$ ]] || ((FUZZ_SECONDS == 0)); then
    die "FUZZ_SECONDS must be a positive integer, got '$FUZZ_SECONDS'"
fi
command -v rustup >/dev/null || die "rustup not found"
command -v cargo >/dev/null || die "cargo not found"

start=$SECONDS

# 1. The nightly toolchain (libFuzzer's sanitizer flags need it).
if rustup toolchain list | grep -q '^nightly'; then
    log "nightly toolchain present: $(rustup run nightly rustc --version)"
else
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal || die "could not install the nightly toolchain"
fi
rustup run nightly rustc --version >/dev/null || die "the nightly toolchain does not run"

# 2. cargo-fuzz.
if cargo +nightly fuzz --version >/dev/null 2>&1; then
    log "cargo-fuzz present: $(cargo +nightly fuzz --version)"
else
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked || die "could not install cargo-fuzz"
    cargo +nightly fuzz --version >/dev/null 2>&1 || die "cargo-fuzz installed but does not run"
fi

cd "$FUZZ_DIR"

if [[ -n "${FUZZ_TARGETS:-}" ]]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    listing="$(cargo +nightly fuzz list)" || die "cargo fuzz list failed"
    mapfile -t targets <<<"$listing"
fi
((${#targets[@]} > 0)) || die "no fuzz targets found"

# 3. Build once, up front, so that a build failure is reported as such.
log "building ${targets[*]}"
for t in "${targets[@]}"; do
    cargo +nightly fuzz build "$t" || die "build of $t failed"
done

if [[ -n "${FUZZ_KEEP_DIR:-}" ]]; then
    work="$FUZZ_KEEP_DIR"
    mkdir -p "$work"
else
    work="$(mktemp -d -t fuzz-smoke.XXXXXX)"
    trap 'rm -rf "$work"' EXIT
fi

# 4. Run each target.
failed=()
summary=()
for t in "${targets[@]}"; do
    seeds="$FUZZ_DIR/corpus/$t"
    if ! [[ -d "$seeds" ]] || [[ -z "$(ls -A "$seeds")" ]]; then
        die "no seed corpus in $seeds"
    fi
    corpus="$work/corpus-$t"
    artifacts="$work/artifacts-$t/"
    logfile="$work/$t.log"
    mkdir -p "$corpus" "$artifacts"
    log "running $t for ${FUZZ_SECONDS}s (seeds: $seeds, new inputs: $corpus)"
    # The first corpus directory receives new inputs; the committed one is read only.
    rc=0
    cargo +nightly fuzz run "$t" "$corpus" "$seeds" -- \
        -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 \
        -artifact_prefix="$artifacts" -timeout=10 \
        >"$logfile" 2>&1 || rc=$?

    execs="$(sed -n 's/^stat::number_of_executed_units:[[:space:]]*//p' "$logfile" | tail -n1)"
    per_sec="$(sed -n 's/^stat::average_exec_per_sec:[[:space:]]*//p' "$logfile" | tail -n1)"
    cov="$(grep -Eo 'cov: [0-9]+' "$logfile" | tail -n1 | cut -d' ' -f2 || true)"
    crashes="$(find "$artifacts" -type f | wc -l)"
    status=ok
    if ((rc != 0)) || ((crashes > 0)) || [[ -z "$execs" ]]; then
        status="FAILED (exit $rc, $crashes artifact(s))"
        failed+=("$t")
        log "---- last lines of $t's log ($logfile) ----"
        tail -n 60 "$logfile" >&2 || true
        if ((crashes > 0)); then
            log "crash inputs of $t:"
            find "$artifacts" -type f -exec ls -l {} + >&2
        fi
    fi
    line="$(printf '%-20s %s: %s execs, %s exec/s, cov %s, %s new corpus files, budget %ss' \
        "$t" "$status" "${execs:-?}" "${per_sec:-?}" "${cov:-?}" \
        "$(find "$corpus" -type f | wc -l)" "$FUZZ_SECONDS")"
    summary+=("$line")
    echo "fuzz-smoke: $line"
done

echo "fuzz-smoke: ==== summary ($((SECONDS - start))s in all, installs and builds included) ===="
for line in "${summary[@]}"; do
    echo "fuzz-smoke: $line"
done
if ((${#failed[@]} > 0)); then
    if [[ -z "${FUZZ_KEEP_DIR:-}" ]]; then
        keep="$(mktemp -d -t fuzz-smoke-failed.XXXXXX)"
        cp -r "$work"/. "$keep"/
        log "logs and crash inputs kept in $keep"
    fi
    die "${failed[*]}"
fi
echo "fuzz-smoke: all ${#targets[@]} targets ran without a crash"
