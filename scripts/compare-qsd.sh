#!/usr/bin/env bash
# Our vhost-user-blk back-end (`vhost-iotlb blk`) next to qemu-storage-daemon's
# vhost-user-blk export, through the shared end-to-end harness (../shared/e2e, or
# E2E_DIR): the same guest, the same QEMU command line, the same N MiB written and read
# back, timed by the guest (`guest_s=` of the harness's result line). Rounds are
# interleaved (each round runs every config once, in the order given) so that a slow
# period of the machine hits every config alike. Prints one line per run, then a markdown
# table (guest_s per round, median over the passing runs, ratio to the qsd-none median);
# with --json, also writes those figures to a file. Exits non-zero if any run failed (the
# table is printed anyway).
#
# Configs: qsd-none (qemu-storage-daemon, no IOMMU: its export offers no
# VIRTIO_F_ACCESS_PLATFORM, so QEMU refuses iommu_platform=on), ours-none, ours-intel,
# ours-virtio. qsd serves the image buffered (cache.direct=off) with a thread pool
# (aio=threads) and honours flushes (fdatasync), as our back-end does with buffered
# preadv/pwritev and fdatasync; one queue each (the harness's QEMU asks for one).
#
# It does not tune either back-end: ours runs with its defaults plus --ours-args, qsd
# with the command line printed at the start; nothing else (no CPU pinning, no governor,
# no guest setting) is changed. Installs QEMU and builds the guest when missing, builds
# vhost-iotlb (release). Under TCG with other work on the machine the figures are noisy:
# compare ratios and medians, not single runs.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
E2E="${E2E_DIR:-$ROOT/../shared/e2e}"
ALL_CONFIGS=qsd-none,ours-none,ours-intel,ours-virtio
exec </dev/null

die() { echo "compare-qsd: FAILED: $*" >&2; exit 1; }
log() { echo "compare-qsd: $*"; }
usage() {
    cat <<EOF
usage: compare-qsd.sh [options]
  --rounds R        interleaved rounds, each config once per round (default 3)
  --mib N           MiB the guest writes and reads per direction (default 32, run-blk.sh --mib)
  --configs LIST    comma-separated subset of $ALL_CONFIGS
                    (default: all, in that order; runs go in the order given)
  --json FILE       also write the per-round figures and the medians as JSON to FILE
  --ours-args ARGS  appended to our back-end's command line (e.g. '--busy-poll-us 50')
env: E2E_DIR (harness, default ../shared/e2e), E2E_TIMEOUT (per run, default 180),
     and the harness's own (E2E_CACHE, E2E_APPEND)
EOF
    exit 2
}

ROUNDS=3 MIB=32 CONFIGS=$ALL_CONFIGS JSON='' OURS_ARGS=''
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) ROUNDS=${2:?--rounds needs a value}; shift 2 ;;
        --mib) MIB=${2:?--mib needs a value}; shift 2 ;;
        --configs) CONFIGS=${2:?--configs needs a value}; shift 2 ;;
        --json) JSON=${2:?--json needs a value}; shift 2 ;;
        --ours-args) OURS_ARGS=${2?--ours-args needs a value}; shift 2 ;;
        -h | --help) usage ;;
        *) echo "compare-qsd: unknown argument: $1" >&2; usage ;;
    esac
done
[[ "$ROUNDS" =~ ^[0-9]+$ ]] && [ "$ROUNDS" -ge 1 ] || die "--rounds must be a positive integer, got '$ROUNDS'"
[[ "$MIB" =~ ^[0-9]+$ ]] && [ "$MIB" -ge 1 ] || die "--mib must be a positive integer, got '$MIB'"
IFS=, read -r -a configs <<<"$CONFIGS"
[ ${#configs[@]} -gt 0 ] || die "--configs is empty"
want_qsd=0
for c in "${configs[@]}"; do
    case $c in qsd-intel | qsd-virtio) die "$c: QEMU refuses iommu_platform=on with qsd's export (no VIRTIO_F_ACCESS_PLATFORM)" ;; esac
    case ,$ALL_CONFIGS, in *",$c,"*) ;; *) die "unknown config '$c' (known: $ALL_CONFIGS)" ;; esac
    [ "$c" = qsd-none ] && want_qsd=1
done
[ "$(printf '%s\n' "${configs[@]}" | sort | uniq -d)" = '' ] || die "--configs names a config twice"
[ -x "$E2E/run-blk.sh" ] || die "no end-to-end harness at $E2E (set E2E_DIR)"

log "installing QEMU and guest dependencies when missing"
"$E2E/install-deps.sh" >/dev/null || die "install-deps.sh failed"
log "building the guest when missing"
"$E2E/build-guest.sh" >/dev/null || die "build-guest.sh failed"
QSD=''
if [ "$want_qsd" = 1 ]; then
    # Debian ships it in qemu-utils; install-deps.sh pulls QEMU 10 from bookworm-backports,
    # whose qemu-utils has the vhost-user-blk export.
    QSD=$(command -v qemu-storage-daemon || true)
    [ -n "$QSD" ] || die "qemu-storage-daemon not found: install it with
  apt-get install -t bookworm-backports qemu-utils   (same QEMU as install-deps.sh)
or leave qsd-none out of --configs"
    log "$("$QSD" --version | head -1)"
fi
log "building vhost-iotlb (release)"
(cd "$ROOT" && cargo build --release -q) || die "cargo build --release failed"
BIN="$ROOT/target/release/vhost-iotlb"

# {socket} and {disk} are the harness's (a temp dir without commas, which QEMU's option
# syntax would need doubled).
OURS_CMD="$(printf '%q' "$BIN") blk --socket {socket} --disk {disk}${OURS_ARGS:+ $OURS_ARGS}"
QSD_CMD="$(printf '%q' "${QSD:-qemu-storage-daemon}")" # (not run without qsd-none)
QSD_CMD+=" --blockdev driver=file,node-name=file0,filename={disk},aio=threads,cache.direct=off"
QSD_CMD+=" --blockdev driver=raw,node-name=disk0,file=file0"
QSD_CMD+=" --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={socket},writable=on,num-queues=1"
[ "$want_qsd" = 1 ] && log "qsd: $QSD_CMD"
[[ ",$CONFIGS," == *,ours-* ]] && log "ours: $OURS_CMD"

field() { sed -n "s/.* $1=\\([^ ]*\\).*/\\1/p" <<<"$result"; } # field NAME of $result

# One line per run: config round verdict guest_s wall_s seed load.
RECORDS=$(mktemp)
trap 'rm -f "$RECORDS"' EXIT
failed=0
for round in $(seq "$ROUNDS"); do
    for c in "${configs[@]}"; do
        case $c in qsd-*) cmd=$QSD_CMD ;; *) cmd=$OURS_CMD ;; esac
        for attempt in 1 2; do
            load=$(cut -d' ' -f1 /proc/loadavg)
            out=$(mktemp)
            set +e
            "$E2E/run-blk.sh" --timeout "${E2E_TIMEOUT:-180}" --mib "$MIB" \
                --backend-cmd "$cmd" --iommu "${c#*-}" >"$out" 2>&1
            rc=$?
            set -e
            result=$(grep '^E2E-RESULT:' "$out" | tail -1 || true)
            guest_s=$(field guest_s) wall_s=$(field wall_s) seed=$(field seed)
            # A pass without the guest's timing: the harness read the guest's result line
            # while it was still being printed (it polls the console log), so the line is
            # cut. Not a verdict on the back-end: run once more, and say so.
            if [ "$attempt" = 1 ] && [ "$rc" -eq 0 ] && [[ "$result" == "E2E-RESULT: PASS"* ]] &&
                [ -z "$guest_s" ]; then
                log "round $round/$ROUNDS $c: the harness cut the guest's result line; running it again"
                rm -f "$out"
                continue
            fi
            break
        done
        verdict=PASS
        if [ "$rc" -ne 0 ] || [[ "$result" != "E2E-RESULT: PASS"* ]] || [ -z "$guest_s" ]; then
            verdict=FAIL failed=1
            echo "---- compare-qsd $c round $round output ----" >&2
            tail -40 "$out" >&2
        fi
        rm -f "$out"
        log "round $round/$ROUNDS $c: $verdict guest_s=${guest_s:--} wall_s=${wall_s:--} seed=${seed:--} load=$load"
        printf '%s %s %s %s %s %s %s\n' "$c" "$round" "$verdict" "${guest_s:--}" \
            "${wall_s:--}" "${seed:--}" "$load" >>"$RECORDS"
    done
done

# Median of the passing runs of config $1 ('-' when none passed).
median() {
    awk -v c="$1" '$1 == c && $3 == "PASS" { print $4 }' "$RECORDS" | sort -g |
        awk '{ v[NR] = $1 } END {
            if (NR == 0) { print "-"; exit }
            printf "%.2f\n", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
base=$(median qsd-none)
ratio() { # ratio MEDIAN: to the qsd-none median
    if [ "$1" = - ] || [ "$base" = - ]; then echo -; else awk -v a="$1" -v b="$base" 'BEGIN { printf "%.2f\n", a / b }'; fi
}

echo
echo "guest_s (guest's own timing of its writes and reads, ${MIB} MiB each way; lower is better)"
echo
header="| config |" rule="| --- |"
for round in $(seq "$ROUNDS"); do header+=" r$round |" rule+=" ---: |"; done
echo "$header median | ratio to qsd-none |"
echo "$rule ---: | ---: |"
for c in "${configs[@]}"; do
    row="| $c |"
    for round in $(seq "$ROUNDS"); do
        row+=" $(awk -v c="$c" -v r="$round" '$1 == c && $2 == r { print ($3 == "PASS" ? $4 : "FAIL") }' "$RECORDS") |"
    done
    m=$(median "$c")
    echo "$row $m | $(ratio "$m") |"
done
echo

if [ -n "$JSON" ]; then
    summary=$(for c in "${configs[@]}"; do m=$(median "$c"); echo "$c $m $(ratio "$m")"; done)
    python3 - "$RECORDS" "$JSON" "$MIB" "$ROUNDS" "$OURS_CMD" "${QSD:+$QSD_CMD}" "$summary" <<'EOF' ||
import json, sys
records, path, mib, rounds, ours_cmd, qsd_cmd, summary = sys.argv[1:]
num = lambda s: None if s in ("-", "") else float(s)
configs = {}
for line in summary.splitlines():
    c, m, r = line.split()
    configs[c] = {"runs": [], "median_guest_s": num(m), "ratio_to_qsd_none": num(r)}
with open(records) as f:
    for line in f:
        c, rnd, verdict, guest_s, wall_s, seed, load = line.split()
        configs[c]["runs"].append({"round": int(rnd), "result": verdict,
            "guest_s": num(guest_s), "wall_s": num(wall_s),
            "seed": None if seed == "-" else int(seed), "loadavg_1m": num(load)})
doc = {"mib": int(mib), "rounds": int(rounds), "timing": "guest_s of run-blk.sh",
       "commands": {"ours": ours_cmd, "qsd": qsd_cmd or None}, "configs": configs}
with open(path, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
EOF
        die "cannot write $JSON"
    log "wrote $JSON"
fi
[ "$failed" -eq 0 ] || die "at least one run failed (see its output above)"
log "all runs passed"
