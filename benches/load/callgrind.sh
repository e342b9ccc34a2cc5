#!/usr/bin/env bash
# Counts the instructions Larder spends per cache hit with valgrind's callgrind, which counts
# instructions rather than time, so the figure is repeatable on a busy machine:
#   benches/load/callgrind.sh               # 1k hits; SIZE=16k, REQUESTS=2000, PORT_BASE
#   MISS=1 benches/load/callgrind.sh        # misses instead: every request a new URL, stored
#   LARDER_BIN=/path/to/larder BUILD=0 ...   # count another build (e.g. an older commit)
# Runs Larder (release build) under callgrind in front of an nginx origin, warms the object,
# counts only while REQUESTS hits are sent one by one over a keep-alive connection, dumps the
# counters, and prints instructions per hit and the top functions by inclusive cost.
# Needs valgrind, nginx and curl (apt-get install valgrind nginx-light curl).
set -euo pipefail
SIZE=${SIZE:-1k}
REQUESTS=${REQUESTS:-2000}
PORT_BASE=${PORT_BASE:-18200}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
ORIGIN_PORT=$PORT_BASE LARDER_PORT=$((PORT_BASE + 1)) LARDER_ADMIN_PORT=$((PORT_BASE + 2))
for tool in valgrind callgrind_control callgrind_annotate nginx curl; do
    command -v $tool >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
[[ ${BUILD:-1} == 1 ]] && (cd "$ROOT" && cargo build --release --quiet)
TMP=$(mktemp -d /tmp/larder-callgrind.XXXXXX)
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
nginx -p "$TMP/origin" -e "$TMP/origin/error.log" -c "$TMP/origin/nginx.conf" & PIDS+=($!)
valgrind --tool=callgrind --callgrind-out-file="$TMP/cg.out" --instr-atstart=no \
    "${LARDER_BIN:-$ROOT/target/release/larder}" serve --config "$TMP/larder/larder.toml" > "$TMP/larder/out.log" 2>&1 &
LARDER_PID=$!; PIDS+=($LARDER_PID)
# Under valgrind the start takes one to two minutes on these machines.
for _ in $(seq 3000); do curl -s -o /dev/null "http://127.0.0.1:$LARDER_ADMIN_PORT/healthz" && break; sleep 0.1; done
for _ in $(seq 50); do
    curl -s -D - -o /dev/null "http://127.0.0.1:$LARDER_PORT/$SIZE" | grep -qi '^cache-status: larder; hit' && break
    sleep 0.2
done
# curl sends the hits one after another on one keep-alive connection. A first batch warms
# every lazy path before counting starts.
hits() { # n
    local cfg=$TMP/urls.cfg
    : > "$cfg"
    for i in $(seq "$1"); do
        local q=""
        [[ ${MISS:-0} == 1 ]] && q="?$RANDOM-$RANDOM-$i"
        printf 'url = "http://127.0.0.1:%s/%s%s"\noutput = /dev/null\n' "$LARDER_PORT" "$SIZE" "$q" >> "$cfg"
    done
    curl -s -K "$cfg" -w '%{http_code}\n' | grep -c '^200$'
}
hits 200 > /dev/null
callgrind_control -i on "$LARDER_PID" > /dev/null
served=$(hits "$REQUESTS")
callgrind_control -i off "$LARDER_PID" > /dev/null
callgrind_control -d "$LARDER_PID" > /dev/null
sleep 1
out=$(ls -t "$TMP"/cg.out* | head -1)
total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(/,/,"",$1); t = $1} END {print t}')
echo "requests counted: $served (size $SIZE)"
echo "instructions: $total total, $(( total / served )) per $([[ ${MISS:-0} == 1 ]] && echo miss || echo hit)"
echo "== top functions by inclusive instructions =="
callgrind_annotate --inclusive=yes "$out" 2>/dev/null | grep -E "^ *[0-9,]+ " | sed -n "1,${TOP:-40}p"
