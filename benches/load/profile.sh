#!/usr/bin/env bash
# Profiles Larder's hit path under wrk load with perf (software cpu-clock event, DWARF
# call graphs, so it works without hardware counters):
#   benches/load/profile.sh            # 1k hits; SIZE=256k, SECONDS_PROFILED=8, PORT_BASE,
#                                      # MISS=1 (every request a new URL: the miss path)
# Prints the top self-cost symbols and the top inclusive ones. Needs `perf` (linux-perf).
set -euo pipefail
SIZE=${SIZE:-1k}
SECS=${SECONDS_PROFILED:-8}
PORT_BASE=${PORT_BASE:-18100}
CONNS=${CONNS:-64}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
ORIGIN_PORT=$PORT_BASE LARDER_PORT=$((PORT_BASE + 1)) LARDER_ADMIN_PORT=$((PORT_BASE + 2))
command -v perf >/dev/null || { echo "needs perf (apt-get install linux-perf)" >&2; exit 1; }
(cd "$ROOT" && cargo build --release --quiet)
TMP=$(mktemp -d /tmp/larder-profile.XXXXXX)
PIDS=()
cleanup() {
    set +e
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    [[ ${KEEP_TMP:-0} == 1 ]] || rm -rf "$TMP"
}
trap cleanup EXIT
render() {
    sed -e "s|@TMP@|$TMP|g" -e "s|@ORIGIN_PORT@|$ORIGIN_PORT|g" -e "s|@LARDER_PORT@|$LARDER_PORT|g" \
        -e "s|@LARDER_ADMIN_PORT@|$LARDER_ADMIN_PORT|g" "$1" > "$2"
}
mkdir -p "$TMP/origin/www" "$TMP/origin/tmp" "$TMP/larder"
case $SIZE in *k) n=$(( ${SIZE%k} * 1024 ));; *m) n=$(( ${SIZE%m} * 1048576 ));; esac
head -c "$n" /dev/urandom > "$TMP/origin/www/$SIZE"
render "$HERE/origin.nginx.conf" "$TMP/origin/nginx.conf"
render "$HERE/larder.toml" "$TMP/larder/larder.toml"
taskset -c 1 nginx -p "$TMP/origin" -e "$TMP/origin/error.log" -c "$TMP/origin/nginx.conf" & PIDS+=($!)
taskset -c 1 "$ROOT/target/release/larder" serve --config "$TMP/larder/larder.toml" > "$TMP/larder/out.log" 2>&1 &
LARDER_PID=$!; PIDS+=($LARDER_PID)
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$LARDER_ADMIN_PORT/healthz" && break; sleep 0.1; done
for _ in $(seq 20); do
    curl -s -D - -o /dev/null "http://127.0.0.1:$LARDER_PORT/$SIZE" | grep -qi '^cache-status: larder; hit' && break
    sleep 0.2
done
WRK_SCRIPT=()
if [[ ${MISS:-0} == 1 ]]; then
    # Every request a new URL: the miss path (origin fetch, store commit).
    cat > "$TMP/miss.lua" <<'LUA'
local n = 0
request = function()
    n = n + 1
    return wrk.format("GET", "/__SIZE__?profile-miss-" .. n)
end
LUA
    sed -i "s|__SIZE__|$SIZE|" "$TMP/miss.lua"
    WRK_SCRIPT=(-s "$TMP/miss.lua")
fi
timeout $((SECS + 30)) taskset -c 0 wrk -t1 -c"$CONNS" -d$((SECS + 4))s "${WRK_SCRIPT[@]}" "http://127.0.0.1:$LARDER_PORT/$SIZE" > "$TMP/wrk.txt" &
WRK=$!
sleep 2
perf record -q -F 499 -e cpu-clock --call-graph dwarf,32768 -o "$TMP/perf.data" -p "$LARDER_PID" -- sleep "$SECS" 2>/dev/null
wait $WRK || true
grep -E 'Requests/sec' "$TMP/wrk.txt"
echo "== top self cost (perf report --no-children) =="
perf report -i "$TMP/perf.data" --no-children --sort symbol --stdio -g none --percent-limit 0.7 2>/dev/null | grep -v '^#' | grep -v '^$' | sed -E 's/ +- +- *$//; s/ +$//' | head -30
echo "== top inclusive cost (--children), larder symbols =="
perf report -i "$TMP/perf.data" --children --sort symbol --stdio -g none 2>/dev/null | grep -v '^#' | sed -E 's/ +- +- *$//; s/ +$//' | grep -E 'larder::|sled::|blake3|bincode|sendto|recvfrom' | head -40
if [[ ${KEEP_TMP:-0} == 1 ]]; then echo "perf data kept in $TMP/perf.data"; fi
