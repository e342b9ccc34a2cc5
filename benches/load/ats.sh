#!/usr/bin/env bash
# Best-effort Apache Traffic Server for run.sh: `ats.sh start DIR PORT ORIGIN_PORT CPU`
# lays out a private runroot in DIR (config copied from /etc/trafficserver and edited),
# starts traffic_server in the background pinned to CPU and writes its PID to DIR/pid.
# Exits non-zero if anything is missing; run.sh then skips ATS.
set -euo pipefail
[[ ${1:-} == start ]] || { echo "usage: $0 start DIR PORT ORIGIN_PORT CPU" >&2; exit 2; }
D=$2 PORT=$3 ORIGIN_PORT=$4 CPU=$5
BIN=$(command -v traffic_server || echo /usr/bin/traffic_server)
[[ -x $BIN && -d /etc/trafficserver ]] || { echo "no trafficserver installed" >&2; exit 1; }
mkdir -p "$D"/{etc,log,run,cache,var}
cp -r /etc/trafficserver/. "$D/etc/"
cat > "$D/runroot.yaml" <<YAML
prefix: $D
exec_prefix: /usr
bindir: /usr/bin
sbindir: /usr/bin
sysconfdir: $D/etc
datadir: /usr/share/trafficserver
includedir: /usr/include
libdir: /usr/lib/trafficserver
libexecdir: /usr/lib/trafficserver/modules
localstatedir: $D/var
runtimedir: $D/run
logdir: $D/log
cachedir: $D/cache
YAML
rec="$D/etc/records.config"
set_rec() { # name type value
    sed -i "/^CONFIG $1 /d" "$rec"
    echo "CONFIG $1 $2 $3" >> "$rec"
}
set_rec proxy.config.http.server_ports STRING "$PORT:ip-in=127.0.0.1"
set_rec proxy.config.admin.user_id STRING '#-1'
set_rec proxy.config.log.logging_enabled INT 0
# one core for the proxies: one exec thread, as nginx and Larder get one worker
set_rec proxy.config.exec_thread.autoconfig INT 0
set_rec proxy.config.exec_thread.limit INT 1
set_rec proxy.config.exec_thread.affinity INT 0
set_rec proxy.config.cache.ram_cache.size INT 268435456
set_rec proxy.config.http.insert_age_in_response INT 1
set_rec proxy.config.reverse_proxy.enabled INT 1
set_rec proxy.config.url_remap.remap_required INT 1
set_rec proxy.config.diags.logfile.filename STRING diags.log
echo "map / http://127.0.0.1:$ORIGIN_PORT/" > "$D/etc/remap.config"
echo "$D/cache 512M" > "$D/etc/storage.config"
echo "" > "$D/etc/plugin.config"
cd "$D"
TS_RUNROOT=$D taskset -c "$CPU" "$BIN" --run-root="$D/runroot.yaml" \
    --bind_stdout "$D/log/stdout.log" --bind_stderr "$D/log/stderr.log" >/dev/null 2>&1 &
echo $! > "$D/pid"
sleep 1
kill -0 "$(cat "$D/pid")" 2>/dev/null || { cat "$D/log/"*.log >&2 2>/dev/null; exit 1; }
