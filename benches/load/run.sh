#!/usr/bin/env bash
# Load benchmark: Larder vs nginx proxy_cache vs Varnish (and Apache Traffic Server if it
# installs and starts), on the same machine, hit path per object size, plus a miss run.
# See README.md "Load benchmark". Everything runs on 127.0.0.1, in a temp dir, and is
# killed by PID on exit.
#
#   benches/load/run.sh                      # 10 s per wrk run, 3 interleaved runs
#   DURATION=3s RUNS=3 benches/load/run.sh   # quick look
#
# Environment: DURATION (10s), RUNS (3), CONNS (64), SIZES ("1k 16k 256k 4m"),
# PORT_BASE (18000), LG_CPU (0), SRV_CPU (1), VARNISH_FILE (1: also a -s file variant),
# ATS (1: try trafficserver), INSTALL (1: apt-get install what is missing),
# BUILD (1: cargo build --release first), RESULTS (file to copy the final table to),
# KEEP_TMP (1: keep the temp dir).
set -euo pipefail

DURATION=${DURATION:-10s}
RUNS=${RUNS:-3}
CONNS=${CONNS:-64}
SIZES=${SIZES:-"1k 16k 256k 4m"}
PORT_BASE=${PORT_BASE:-18000}
LG_CPU=${LG_CPU:-0}
SRV_CPU=${SRV_CPU:-1}
VARNISH_FILE=${VARNISH_FILE:-1}
ATS=${ATS:-1}
INSTALL=${INSTALL:-1}
BUILD=${BUILD:-1}
KEEP_TMP=${KEEP_TMP:-0}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

ORIGIN_PORT=$PORT_BASE
LARDER_PORT=$((PORT_BASE + 1))
LARDER_ADMIN_PORT=$((PORT_BASE + 2))
NGINX_PORT=$((PORT_BASE + 3))
VARNISH_PORT=$((PORT_BASE + 4))
VARNISHF_PORT=$((PORT_BASE + 5))
ATS_PORT=$((PORT_BASE + 6))

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# seconds in a wrk duration (10s, 1m, 500ms is not supported by wrk anyway)
dur_secs() {
    local d=$1
    case $d in
        *m) echo $(( ${d%m} * 60 )) ;;
        *s) echo "${d%s}" ;;
        *) echo "$d" ;;
    esac
}

# ---------------------------------------------------------------- install
need_pkgs=()
command -v wrk >/dev/null || need_pkgs+=(wrk)
command -v nginx >/dev/null || need_pkgs+=(nginx-light)
command -v varnishd >/dev/null || need_pkgs+=(varnish)
command -v curl >/dev/null || need_pkgs+=(curl)
command -v taskset >/dev/null || need_pkgs+=(util-linux)
if ((${#need_pkgs[@]})); then
    [[ $INSTALL == 1 ]] || die "missing: ${need_pkgs[*]} (INSTALL=0)"
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq
    timeout 600 apt-get install -y -q "${need_pkgs[@]}" >/dev/null
fi
if [[ $ATS == 1 ]] && ! command -v traffic_server >/dev/null && [[ ! -x /usr/bin/traffic_server ]]; then
    if [[ $INSTALL == 1 ]]; then
        log "trying to install trafficserver (skipped if it fails)"
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q trafficserver >/dev/null 2>&1 \
            || log "trafficserver did not install; skipping it"
    fi
fi
ATS_BIN=$(command -v traffic_server || true)
[[ -z $ATS_BIN && -x /usr/bin/traffic_server ]] && ATS_BIN=/usr/bin/traffic_server
[[ $ATS == 1 && -n $ATS_BIN ]] || ATS=0
NGINX_BIN=$(command -v nginx)

# A system nginx/varnish started by the package install is not ours: leave it alone; we
# only need our ports free.
for p in $ORIGIN_PORT $LARDER_PORT $LARDER_ADMIN_PORT $NGINX_PORT $VARNISH_PORT $VARNISHF_PORT $ATS_PORT; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        die "port $p is in use; set PORT_BASE"
    fi
done

if [[ $BUILD == 1 ]]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release --quiet)
fi
LARDER_BIN=$ROOT/target/release/larder
[[ -x $LARDER_BIN ]] || die "no $LARDER_BIN"

# ---------------------------------------------------------------- temp dir, cleanup
TMP=$(mktemp -d /tmp/larder-load.XXXXXX)
chmod 755 "$TMP"
PIDS=()
cleanup() {
    local rc=$?
    set +e
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [[ $KEEP_TMP == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_http URL [seconds]: until it answers any HTTP status
wait_http() {
    local url=$1 t=${2:-20}
    for _ in $(seq $((t * 10))); do
        if curl -s -o /dev/null --max-time 1 "$url"; then return 0; fi
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------- origin
log "temp dir $TMP"
mkdir -p "$TMP/origin/www" "$TMP/origin/tmp"
for s in $SIZES; do
    case $s in
        *k) bytes=$(( ${s%k} * 1024 )) ;;
        *m) bytes=$(( ${s%m} * 1024 * 1024 )) ;;
        *) die "size $s: use Nk or Nm" ;;
    esac
    head -c "$bytes" /dev/urandom > "$TMP/origin/www/$s"
done

# nginx config templates use @VAR@ placeholders
render() {
    sed -e "s|@TMP@|$TMP|g" -e "s|@ORIGIN_PORT@|$ORIGIN_PORT|g" \
        -e "s|@NGINX_PORT@|$NGINX_PORT|g" -e "s|@LARDER_PORT@|$LARDER_PORT|g" \
        -e "s|@LARDER_ADMIN_PORT@|$LARDER_ADMIN_PORT|g" -e "s|@VARNISH_PORT@|$VARNISH_PORT|g" \
        -e "s|@ATS_PORT@|$ATS_PORT|g" "$1" > "$2"
}
render "$HERE/origin.nginx.conf" "$TMP/origin/nginx.conf"
taskset -c "$SRV_CPU" "$NGINX_BIN" -p "$TMP/origin" -e "$TMP/origin/error.log" -c "$TMP/origin/nginx.conf" &
PIDS+=($!)
wait_http "http://127.0.0.1:$ORIGIN_PORT/1k" || die "origin did not start: $(cat "$TMP/origin/error.log")"
ORIGIN_LOG=$TMP/origin/access.log
origin_count() { wc -l < "$ORIGIN_LOG"; }

# ---------------------------------------------------------------- proxies
PROXIES=()      # names
declare -A URL  # name -> base URL
declare -A HIT_RE # name -> regexp over response headers (lowercased) that marks a hit

# Larder
mkdir -p "$TMP/larder"
render "$HERE/larder.toml" "$TMP/larder/larder.toml"
taskset -c "$SRV_CPU" "$LARDER_BIN" serve --config "$TMP/larder/larder.toml" \
    > "$TMP/larder/out.log" 2>&1 &
LARDER_PID=$!
PIDS+=($LARDER_PID)
wait_http "http://127.0.0.1:$LARDER_ADMIN_PORT/healthz" || die "larder did not start: $(cat "$TMP/larder/out.log")"
PROXIES+=(larder); URL[larder]=http://127.0.0.1:$LARDER_PORT; HIT_RE[larder]='^cache-status: .*larder; hit'

# nginx proxy_cache
mkdir -p "$TMP/nginx/cache" "$TMP/nginx/tmp"
render "$HERE/proxy.nginx.conf" "$TMP/nginx/nginx.conf"
taskset -c "$SRV_CPU" "$NGINX_BIN" -p "$TMP/nginx" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf" &
PIDS+=($!)
wait_http "http://127.0.0.1:$NGINX_PORT/1k" || die "nginx did not start: $(cat "$TMP/nginx/error.log")"
PROXIES+=(nginx); URL[nginx]=http://127.0.0.1:$NGINX_PORT; HIT_RE[nginx]='^x-cache-status: hit'

# Varnish: malloc, and a file-storage variant
start_varnish() { # name port storage
    local name=$1 port=$2 storage=$3
    mkdir -p "$TMP/$name"
    render "$HERE/default.vcl" "$TMP/$name/default.vcl"
    # -F: foreground, $! is the manager; -j none: no privilege separation (temp dir is root's).
    taskset -c "$SRV_CPU" varnishd -F -j none -n "$TMP/$name/work" -a "127.0.0.1:$port" \
        -T 127.0.0.1:0 -f "$TMP/$name/default.vcl" -s "$storage" -P "$TMP/$name/varnishd.pid" \
        > "$TMP/$name/out.log" 2>&1 &
    PIDS+=($!)
    wait_http "http://127.0.0.1:$port/1k" 30 || die "$name did not start: $(cat "$TMP/$name/out.log")"
    PROXIES+=("$name"); URL[$name]=http://127.0.0.1:$port; HIT_RE[$name]='^x-varnish: [0-9]+ [0-9]+'
}
start_varnish varnish "$VARNISH_PORT" malloc,256m
if [[ $VARNISH_FILE == 1 ]]; then
    mkdir -p "$TMP/varnish-file"
    start_varnish varnish-file "$VARNISHF_PORT" "file,$TMP/varnish-file/storage.bin,1G"
fi

# Apache Traffic Server, best effort: skipped if it does not start.
if [[ $ATS == 1 ]]; then
    if "$HERE/ats.sh" start "$TMP/ats" "$ATS_PORT" "$ORIGIN_PORT" "$SRV_CPU" > "$TMP/ats.out" 2>&1; then
        PIDS+=("$(cat "$TMP/ats/pid")")
        if wait_http "http://127.0.0.1:$ATS_PORT/1k" 30; then
            PROXIES+=(ats); URL[ats]=http://127.0.0.1:$ATS_PORT; HIT_RE[ats]='^age: '  # the origin sends no Age; ATS adds one to hits
        else
            log "trafficserver did not answer; skipping it ($TMP/ats.out)"
        fi
    else
        log "trafficserver did not start; skipping it: $(tail -3 "$TMP/ats.out" | tr '\n' ' ')"
    fi
fi
log "proxies: ${PROXIES[*]}"

# ---------------------------------------------------------------- warm
for p in "${PROXIES[@]}"; do
    for s in $SIZES; do
        ok=0
        for _ in $(seq 20); do
            if curl -s -o /dev/null -D - --max-time 10 "${URL[$p]}/$s" | tr -d '\r' \
                | tr '[:upper:]' '[:lower:]' | grep -Eq "${HIT_RE[$p]}"; then
                ok=1; break
            fi
            sleep 0.2
        done
        [[ $ok == 1 ]] || die "$p never reported a hit for /$s"
    done
done
log "all caches warm"

# ---------------------------------------------------------------- wrk
WRK_TIMEOUT=$(( $(dur_secs "$DURATION") + 60 ))
RAW=$TMP/raw.tsv   # kind proxy size run rps p50_ms p99_ms errors
: > "$RAW"

to_ms() { # 1.23ms | 456.00us | 1.01s | 2.00m
    awk -v v="$1" 'BEGIN{
        if (v ~ /us$/) { sub(/us$/,"",v); printf "%.3f", v/1000 }
        else if (v ~ /ms$/) { sub(/ms$/,"",v); printf "%.3f", v }
        else if (v ~ /s$/) { sub(/s$/,"",v); printf "%.3f", v*1000 }
        else if (v ~ /m$/) { sub(/m$/,"",v); printf "%.3f", v*60000 }
        else printf "nan" }'
}

# run_wrk kind proxy size run url [lua]
run_wrk() {
    local kind=$1 p=$2 s=$3 r=$4 url=$5 lua=${6:-}
    local out=$TMP/wrk-$kind-$p-$s-$r.txt
    local args=(-t1 "-c$CONNS" "-d$DURATION" --latency --timeout 10s)
    [[ -n $lua ]] && args+=(-s "$lua")
    timeout "$WRK_TIMEOUT" taskset -c "$LG_CPU" wrk "${args[@]}" "$url" > "$out" 2>&1 \
        || { log "wrk failed for $p $s: $(tail -2 "$out")"; }
    local rps p50 p99 errs
    rps=$(awk '/^Requests\/sec:/{print $2}' "$out")
    p50=$(to_ms "$(awk '$1=="50%"{print $2}' "$out")")
    p99=$(to_ms "$(awk '$1=="99%"{print $2}' "$out")")
    errs=$(awk '/Non-2xx/{n+=$NF} /Socket errors/{gsub(/,/,""); n+=$4+$6+$8+$10} END{print n+0}' "$out")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$p" "$s" "$r" "${rps:-0}" "$p50" "$p99" "$errs" >> "$RAW"
    log "$kind $p /$s run $r: ${rps:-0} req/s p50 ${p50}ms p99 ${p99}ms errors $errs"
}

rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$LARDER_PID/status"; }

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
nproxies=${#PROXIES[@]}
log "hit runs: $RUNS x sizes ($SIZES) x proxies (${PROXIES[*]}) x $DURATION"
before_hits=$(origin_count)
for r in $(seq "$RUNS"); do
    for s in $SIZES; do
        # rotate the proxy order every run so no proxy always goes first
        for i in $(seq 0 $((nproxies - 1))); do
            p=${PROXIES[$(( (i + r) % nproxies ))]}
            run_wrk hit "$p" "$s" "$r" "${URL[$p]}/$s"
        done
    done
done
after_hits=$(origin_count)
ORIGIN_DURING_HITS=$((after_hits - before_hits))
RSS_AFTER_HITS=$(rss_kb)
log "origin requests during hit runs: $ORIGIN_DURING_HITS; larder VmRSS ${RSS_AFTER_HITS} kB"

# ---------------------------------------------------------------- miss run
MISS_SIZE=${MISS_SIZE:-1k}
declare -A MISS_ORIGIN
for p in "${PROXIES[@]}"; do
    lua=$TMP/miss-$p.lua
    cat > "$lua" <<EOF
local n = 0
request = function()
    n = n + 1
    return wrk.format("GET", "/$MISS_SIZE?miss-$p-$$-" .. n)
end
EOF
    b=$(origin_count)
    run_wrk miss "$p" "$MISS_SIZE" 1 "${URL[$p]}/$MISS_SIZE" "$lua"
    MISS_ORIGIN[$p]=$(( $(origin_count) - b ))
done
RSS_AFTER_MISS=$(rss_kb)
# a miss-run URL must now be a hit (they were stored). Not n=1: wrk calls request() once
# in a separate Lua state to check the script, so the thread's first request is n=1 too.
for p in "${PROXIES[@]}"; do
    if ! curl -s -o /dev/null -D - "${URL[$p]}/$MISS_SIZE?miss-$p-$$-10" | tr -d '\r' \
        | tr '[:upper:]' '[:lower:]' | grep -Eq "${HIT_RE[$p]}"; then
        log "warning: $p did not store the miss-run URLs"
    fi
done

# ---------------------------------------------------------------- report
REPORT=$TMP/report.txt
{
    echo "Load benchmark $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'))"
    echo "wrk -t1 -c$CONNS -d$DURATION, $RUNS interleaved runs, medians; wrk on cpu $LG_CPU, origin+proxies on cpu $SRV_CPU"
    echo "load average at start: $LOAD_START; at end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine makes numbers noisy)"
    echo "versions: larder $("$LARDER_BIN" --version | awk '{print $2}'), $("$NGINX_BIN" -v 2>&1 | sed 's/.*: //'), $(varnishd -V 2>&1 | head -1 | sed 's/varnishd (\([^ ]*\) .*/\1/')"
    echo
    echo "Hit path (origin requests during the hit runs: $ORIGIN_DURING_HITS)"
    awk -F'\t' -v order="${PROXIES[*]}" -v sizes="$SIZES" '
        function median(list,   a, n, i, t) {
            n = split(list, a, " ")
            for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
            return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        $1 == "hit" { k = $2 SUBSEP $3; rps[k] = rps[k] " " $5; p50[k] = p50[k] " " $6; p99[k] = p99[k] " " $7; err[k] += $8 }
        END {
            np = split(order, P, " "); ns = split(sizes, S, " ")
            printf "%-6s %-13s %10s %9s %9s %7s %16s %16s\n", "size", "proxy", "req/s", "p50 ms", "p99 ms", "errors", "larder/x req/s", "x/larder p99"
            for (si = 1; si <= ns; si++) {
                s = S[si]; L = "larder" SUBSEP s
                lr = median(rps[L]); l99 = median(p99[L])
                for (pi = 1; pi <= np; pi++) {
                    p = P[pi]; k = p SUBSEP s
                    r = median(rps[k]); q50 = median(p50[k]); q99 = median(p99[k])
                    ratio_r = (p == "larder") ? "-" : sprintf("%.2f", (r > 0) ? lr / r : 0)
                    ratio_p = (p == "larder") ? "-" : sprintf("%.2f", (l99 > 0) ? q99 / l99 : 0)
                    printf "%-6s %-13s %10.0f %9.3f %9.3f %7d %16s %16s\n", s, p, r, q50, q99, err[k], ratio_r, ratio_p
                }
            }
        }' "$RAW"
    echo
    echo "Miss run: every request a new URL (/$MISS_SIZE?unique), stored; one $DURATION run"
    printf '%-13s %10s %9s %9s %16s %16s\n' proxy "req/s" "p50 ms" "p99 ms" "origin requests" "larder/x req/s"
    lmiss=$(awk -F'\t' '$1=="miss" && $2=="larder"{print $5}' "$RAW")
    for p in "${PROXIES[@]}"; do
        awk -F'\t' -v p="$p" -v o="${MISS_ORIGIN[$p]}" -v l="$lmiss" \
            '$1=="miss" && $2==p { printf "%-13s %10.0f %9.3f %9.3f %16d %16s\n", p, $5, $6, $7, o, (p=="larder") ? "-" : sprintf("%.2f", ($5 > 0) ? l / $5 : 0) }' "$RAW"
    done
    echo
    echo "Larder VmRSS: $((RSS_AFTER_HITS / 1024)) MiB after the hit runs, $((RSS_AFTER_MISS / 1024)) MiB after the miss run"
    echo "Larder store: $(du -sh "$TMP/larder/data" | cut -f1) on disk after the miss run"
    echo
    echo "raw runs (kind proxy size run req/s p50_ms p99_ms errors):"
    cat "$RAW"
} > "$REPORT"
cat "$REPORT"
if [[ -n ${RESULTS:-} ]]; then cp "$REPORT" "$RESULTS"; log "report copied to $RESULTS"; fi
if [[ $ORIGIN_DURING_HITS != 0 ]]; then
    log "FAIL: the origin saw $ORIGIN_DURING_HITS requests during the hit runs"
    exit 1
fi
