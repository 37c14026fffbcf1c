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
# ours-virtio; with --harness guest also qemu-none, qemu-intel, qemu-virtio: QEMU's own
# virtio-blk-pci, which translates through the vIOMMU inside QEMU and so sends no IOTLB
# message at all: the floor of what the guest's IOMMU costs, whatever the back-end.
#
# Harnesses: `blk` (default) is ../shared/e2e/run-blk.sh, whose QEMU command line has a
# vhost-user-blk device only. `guest` is ../shared/e2e/run-guest.sh running
# scripts/guest/blk-timed.sh (the same guest work as run-blk.sh's timed part) under the
# guest's static busybox, with the device (vhost-user or QEMU's) and the same memfd
# memory given as QEMU arguments here; the host fills the image and checks what the guest
# wrote, as run-blk.sh does. Compare configs of one harness only.
#
# qsd (and QEMU's own device) serve the image buffered (cache.direct=off) with a thread
# pool (aio=threads) and honour flushes (fdatasync), as our back-end does with buffered
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
BLK_CONFIGS=qsd-none,ours-none,ours-intel,ours-virtio
GUEST_CONFIGS=$BLK_CONFIGS,qemu-none,qemu-intel,qemu-virtio
exec </dev/null

die() { echo "compare-qsd: FAILED: $*" >&2; exit 1; }
log() { echo "compare-qsd: $*"; }
usage() {
    cat <<EOF
usage: compare-qsd.sh [options]
  --rounds R        interleaved rounds, each config once per round (default 3)
  --mib N           MiB the guest writes and reads per direction (default 32, run-blk.sh --mib)
  --harness H       blk (run-blk.sh, default) or guest (run-guest.sh, adds the qemu-* configs)
  --configs LIST    comma-separated subset of $BLK_CONFIGS,
                    with --harness guest of $GUEST_CONFIGS
                    (default: all of the harness's, in that order; runs go in the order given)
  --json FILE       also write the per-round figures and the medians as JSON to FILE
  --ours-args ARGS  appended to our back-end's command line (e.g. '--busy-poll-us 50')
env: E2E_DIR (harness, default ../shared/e2e), E2E_TIMEOUT (per run, default 180),
     and the harness's own (E2E_CACHE, E2E_APPEND)
EOF
    exit 2
}

ROUNDS=3 MIB=32 CONFIGS='' JSON='' OURS_ARGS='' HARNESS=blk
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) ROUNDS=${2:?--rounds needs a value}; shift 2 ;;
        --mib) MIB=${2:?--mib needs a value}; shift 2 ;;
        --configs) CONFIGS=${2:?--configs needs a value}; shift 2 ;;
        --harness) HARNESS=${2:?--harness needs a value}; shift 2 ;;
        --json) JSON=${2:?--json needs a value}; shift 2 ;;
        --ours-args) OURS_ARGS=${2?--ours-args needs a value}; shift 2 ;;
        -h | --help) usage ;;
        *) echo "compare-qsd: unknown argument: $1" >&2; usage ;;
    esac
done
[[ "$ROUNDS" =~ ^[0-9]+$ ]] && [ "$ROUNDS" -ge 1 ] || die "--rounds must be a positive integer, got '$ROUNDS'"
[[ "$MIB" =~ ^[0-9]+$ ]] && [ "$MIB" -ge 1 ] || die "--mib must be a positive integer, got '$MIB'"
case $HARNESS in
    blk) ALL_CONFIGS=$BLK_CONFIGS ;;
    guest) ALL_CONFIGS=$GUEST_CONFIGS ;;
    *) die "--harness must be blk or guest, got '$HARNESS'" ;;
esac
[ -n "$CONFIGS" ] || CONFIGS=$ALL_CONFIGS
IFS=, read -r -a configs <<<"$CONFIGS"
[ ${#configs[@]} -gt 0 ] || die "--configs is empty"
want_qsd=0
for c in "${configs[@]}"; do
    case $c in qsd-intel | qsd-virtio) die "$c: QEMU refuses iommu_platform=on with qsd's export (no VIRTIO_F_ACCESS_PLATFORM)" ;; esac
    case $HARNESS:$c in blk:qemu-*) die "$c: QEMU's own device needs --harness guest (run-blk.sh attaches vhost-user-blk only)" ;; esac
    case ,$ALL_CONFIGS, in *",$c,"*) ;; *) die "unknown config '$c' (known: $ALL_CONFIGS)" ;; esac
    [ "$c" = qsd-none ] && want_qsd=1
done
[ "$(printf '%s\n' "${configs[@]}" | sort | uniq -d)" = '' ] || die "--configs names a config twice"
[ -x "$E2E/run-blk.sh" ] && [ -x "$E2E/run-guest.sh" ] || die "no end-to-end harness at $E2E (set E2E_DIR)"

log "installing QEMU and guest dependencies when missing"
"$E2E/install-deps.sh" >/dev/null || die "install-deps.sh failed"
log "building the guest when missing"
GUEST_INFO=$("$E2E/build-guest.sh") || die "build-guest.sh failed"
E2E_GEN=$(sed -n 's/^E2E_GEN=//p' <<<"$GUEST_INFO")
[ "$HARNESS" = blk ] || [ -x "$E2E_GEN" ] || die "build-guest.sh named no e2e-gen (E2E_GEN=)"
[ "$HARNESS" = blk ] || [ -x /bin/busybox ] || die "the guest harness runs the guest's script under /bin/busybox (busybox-static), which is missing"
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
# How qsd and QEMU's own device open the image: buffered, with a thread pool.
FILE_OPTS=aio=threads,cache.direct=off
QSD_CMD+=" --blockdev driver=file,node-name=file0,filename={disk},$FILE_OPTS"
QSD_CMD+=" --blockdev driver=raw,node-name=disk0,file=file0"
QSD_CMD+=" --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={socket},writable=on,num-queues=1"
[ "$want_qsd" = 1 ] && log "qsd: $QSD_CMD"
[[ ",$CONFIGS," == *,ours-* ]] && log "ours: $OURS_CMD"

# region_sha IMAGE N: sha256 of the image's Nth region of MIB MiB (0: the guest writes it,
# 1: the host's fill).
region_sha() {
    dd if="$1" bs=1M skip=$(($2 * MIB)) count="$MIB" 2>/dev/null | sha256sum | cut -d' ' -f1
}

# run_guest CONFIG BACKEND-CMD: one run through run-guest.sh (--harness guest). Makes the
# image (the host region filled by e2e-gen), starts the back-end unless the config is
# QEMU's own device, runs the guest's script, checks the image, and ends with one
# "E2E-RESULT: PASS|FAIL ... seed=S wall_s=W guest_s=G" line as run-blk.sh does.
run_guest() {
    local c=$1 cmd=$2 iommu=${1#*-} work seed img sock hsha want dev pid='' rc t0 line
    work=$(mktemp -d "${TMPDIR:-/tmp}/compare-qsd.XXXXXX")
    seed=$(((RANDOM << 15 | RANDOM) + 1)) img=$work/disk.img sock=$work/vu.sock
    t0=$(date +%s.%N)
    finish_run() { # finish_run PASS|FAIL details
        [ -n "$pid" ] && { kill -TERM -- "-$pid" 2>/dev/null; wait "$pid" 2>/dev/null; }
        rm -rf "$work"
        echo "E2E-RESULT: $1 run-guest config=$c seed=$seed wall_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') ${*:2}"
        [ "$1" = PASS ]
    }
    truncate -s $((2 * MIB))M "$img" || { finish_run FAIL "cannot create the image"; return; }
    "$E2E_GEN" "$seed" "$MIB" | dd of="$img" bs=1M seek="$MIB" conv=notrunc 2>/dev/null ||
        { finish_run FAIL "cannot fill the image"; return; }
    hsha=$(region_sha "$img" 1)
    case $iommu in
        intel) dev=iommu_platform=on,ats=on ;; virtio) dev=iommu_platform=on ;; *) dev=iommu_platform=off ;;
    esac
    local q=(-object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem
        -device pcie-root-port,id=rp0,chassis=1)
    case $c in
        qemu-*)
            q+=(-blockdev "driver=file,node-name=file0,filename=$img,$FILE_OPTS"
                -blockdev driver=raw,node-name=disk0,file=file0
                -device "virtio-blk-pci,drive=disk0,bus=rp0,num-queues=1,disable-legacy=on,$dev") ;;
        *)
            cmd=${cmd//\{socket\}/$sock} cmd=${cmd//\{disk\}/$img}
            # Ours: its counters and service times, for the log line.
            [[ $c == ours-* ]] && cmd+=" --json $work/stats.json"
            setsid bash -c "$cmd" >"$work/backend.log" 2>&1 </dev/null &
            pid=$!
            for _ in $(seq 100); do
                [ -S "$sock" ] && break
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            [ -S "$sock" ] || { tail -20 "$work/backend.log"; finish_run FAIL "back-end did not listen"; return; }
            q+=(-chardev "socket,id=vu0,path=$sock"
                -device "vhost-user-blk-pci,chardev=vu0,bus=rp0,num-queues=1,disable-legacy=on,$dev") ;;
    esac
    local qa=()
    for a in "${q[@]}"; do qa+=(--qemu-arg "$a"); done
    "$E2E/run-guest.sh" --bin /bin/busybox --file "$ROOT/scripts/guest/blk-timed.sh:/e2e-run/blk-timed.sh" \
        --iommu "$iommu" --timeout "${E2E_TIMEOUT:-180}" "${qa[@]}" \
        -- sh /e2e-run/blk-timed.sh "$MIB" "$hsha" "$iommu" >"$work/guest.out" 2>&1
    rc=$?
    line=$(tr -d '\r' <"$work/guest.out" | grep -a -o 'BLK-TIMED: .*' | tail -1 || true)
    if [ "$rc" -ne 0 ] || [[ "$line" != "BLK-TIMED: PASS"* ]]; then
        tail -30 "$work/guest.out"
        [ -n "$pid" ] && tail -20 "$work/backend.log"
        finish_run FAIL "guest: ${line:-no result line (rc=$rc)}"
        return
    fi
    want=$(sed -n 's/.* wsha=\([0-9a-f]*\).*/\1/p' <<<"$line")
    [ "$(region_sha "$img" 0)" = "$want" ] ||
        { finish_run FAIL "the image does not hold what the guest wrote"; return; }
    [ "$(region_sha "$img" 1)" = "$hsha" ] ||
        { finish_run FAIL "the host region of the image changed"; return; }
    local backend=''
    if [ -n "$pid" ]; then # stop it now: it writes stats.json as it exits
        kill -TERM -- "-$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        pid=''
        [ -f "$work/stats.json" ] && backend=" backend=$(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
keys = ("misses_sent", "prefetched", "invalidations", "miss_rtt_p50_us", "service_p50_us", "service_p99_us")
print(",".join(f"{k}:{d[k]}" for k in keys if k in d))' "$work/stats.json")"
    fi
    finish_run PASS "$(grep -o 'guest_s=[^ ]*' <<<"$line")$backend"
}

field() { sed -n "s/.* $1=\\([^ ]*\\).*/\\1/p" <<<"$result"; } # field NAME of $result

# One line per run: config round verdict guest_s wall_s seed load backend (our counters,
# '-' for other back-ends and with --harness blk).
RECORDS=$(mktemp)
trap 'rm -f "$RECORDS"' EXIT
failed=0
for round in $(seq "$ROUNDS"); do
    for c in "${configs[@]}"; do
        case $c in qsd-*) cmd=$QSD_CMD ;; ours-*) cmd=$OURS_CMD ;; *) cmd='' ;; esac
        for attempt in 1 2; do
            load=$(cut -d' ' -f1 /proc/loadavg)
            out=$(mktemp)
            set +e
            if [ "$HARNESS" = blk ]; then
                "$E2E/run-blk.sh" --timeout "${E2E_TIMEOUT:-180}" --mib "$MIB" \
                    --backend-cmd "$cmd" --iommu "${c#*-}" >"$out" 2>&1
            else
                run_guest "$c" "$cmd" >"$out" 2>&1
            fi
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
        backend=$(field backend)
        log "round $round/$ROUNDS $c: $verdict guest_s=${guest_s:--} wall_s=${wall_s:--} seed=${seed:--} load=$load${backend:+ back-end: ${backend//,/ }}"
        printf '%s %s %s %s %s %s %s %s\n' "$c" "$round" "$verdict" "${guest_s:--}" \
            "${wall_s:--}" "${seed:--}" "$load" "${backend:--}" >>"$RECORDS"
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
    python3 - "$RECORDS" "$JSON" "$MIB" "$ROUNDS" "$OURS_CMD" "${QSD:+$QSD_CMD}" "$summary" \
        "$([ "$HARNESS" = blk ] && echo run-blk.sh || echo "run-guest.sh with scripts/guest/blk-timed.sh")" <<'EOF' ||
import json, sys
records, path, mib, rounds, ours_cmd, qsd_cmd, summary, harness = sys.argv[1:]
num = lambda s: None if s in ("-", "") else float(s)
configs = {}
for line in summary.splitlines():
    c, m, r = line.split()
    configs[c] = {"runs": [], "median_guest_s": num(m), "ratio_to_qsd_none": num(r)}
with open(records) as f:
    for line in f:
        c, rnd, verdict, guest_s, wall_s, seed, load, backend = line.split()
        run = {"round": int(rnd), "result": verdict,
               "guest_s": num(guest_s), "wall_s": num(wall_s),
               "seed": None if seed == "-" else int(seed), "loadavg_1m": num(load)}
        if backend != "-":  # our back-end's counters and service times (--harness guest)
            run["backend"] = {k: num(v) for k, v in (kv.split(":") for kv in backend.split(","))}
        configs[c]["runs"].append(run)
doc = {"mib": int(mib), "rounds": int(rounds), "timing": "guest_s of " + harness,
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
