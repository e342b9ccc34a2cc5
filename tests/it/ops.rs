//! Operations: systemd notifications, graceful and forced shutdown of the built binary, /metrics exposition, the access log, and the systemd unit.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::support::*;

const HOST: &[(&str, &str)] = &[("host", "ops.example")];

fn serve_args<'a>(origin: &'a str, dir: &'a str) -> Vec<&'a str> {
    vec![
        "--origin",
        origin,
        "--data-dir",
        dir,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]
}

/// Kills the child if the test fails before it exits.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for the datagram `want`, skipping others (watchdog pings); returns what came before.
fn await_state(sock: &UnixDatagram, want: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {want} within {limit:?}; got {seen:?}");
        sock.set_read_timeout(Some(left)).unwrap();
        let Ok(n) = sock.recv(&mut buf) else {
            panic!("no {want} within {limit:?}; got {seen:?}");
        };
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg == want {
            return seen;
        }
        seen.push(msg);
    }
}

// READY=1 means "serving": the moment it arrives both ports accept connections. The watchdog
// is pinged while running, and STOPPING=1 comes on SIGTERM before a clean exit.
#[test]
fn systemd_hears_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    // Fixed ports, so the test can connect without waiting for the log line that names them.
    let (p, a) = (
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    let (proxy, admin) = (p.local_addr().unwrap(), a.local_addr().unwrap());
    drop((p, a));
    let data = dir.path().join("data");
    let child = Command::new(env!("CARGO_BIN_EXE_larder"))
        .arg("serve")
        .args(["--origin", "http://127.0.0.1:9", "--data-dir"])
        .arg(&data)
        .args(["--listen", &proxy.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Reaper(child);

    let before = await_state(&sock, "READY=1", Duration::from_secs(30));
    assert!(before.is_empty(), "READY=1 must come first: {before:?}");
    // No retry: at READY=1 both ports accept and answer (the origin is down: a 502 is an answer).
    for (addr, path, want) in [
        (admin, "/healthz", "HTTP/1.1 200"),
        (proxy, "/", "HTTP/1.1 502"),
    ] {
        let mut s = TcpStream::connect(addr).expect("port accepts once READY=1 is sent");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: ops.example\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = Vec::new();
        read_rest(&mut s, &mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with(want), "{addr}{path}: {text}");
    }

    // WATCHDOG_USEC = 0.4 s: a ping every 0.2 s; allow a loaded machine plenty more.
    await_state(&sock, "WATCHDOG=1", Duration::from_secs(10));

    let pid = child.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    await_state(&sock, "STOPPING=1", Duration::from_secs(10));
    let status = wait_with_timeout(&mut child.0, Duration::from_secs(30));
    assert!(status.success(), "graceful stop exits 0, got {status:?}");
}

// READY=1 only once both listeners are bound and the store is open: when any of them cannot
// be had, the process exits non-zero and systemd never hears READY=1 (a READY sent before
// the binds or the store open would show up here).
#[test]
fn no_ready_when_a_listener_or_the_store_cannot_be_had() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let locked_dir = dir.path().join("locked");
    let _holder =
        larder::store::Store::open(&locked_dir, larder::store::StoreOptions::default()).unwrap();
    let free = "127.0.0.1:0".to_string();
    let cases = [
        (
            "proxy port taken",
            taken_addr.clone(),
            free.clone(),
            dir.path().join("d1"),
        ),
        (
            "admin port taken",
            free.clone(),
            taken_addr.clone(),
            dir.path().join("d2"),
        ),
        (
            "store locked",
            free.clone(),
            free.clone(),
            locked_dir.clone(),
        ),
    ];
    for (i, (what, listen, admin, data)) in cases.into_iter().enumerate() {
        let sock_path = dir.path().join(format!("notify-{i}.sock"));
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_larder"))
            .arg("serve")
            .args(["--origin", "http://127.0.0.1:9", "--data-dir"])
            .arg(&data)
            .args(["--listen", &listen, "--admin-listen", &admin])
            .env("NOTIFY_SOCKET", &sock_path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: started anyway: {stderr}");
        sock.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 512];
        let mut got = Vec::new();
        while let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert!(
            !got.iter().any(|m| m.contains("READY=1")),
            "{what}: READY=1 sent though it could not serve: {got:?} {stderr}"
        );
    }
    drop(taken);
}

/// Origin chunks sent over `n × pause`.
fn slow_reply(n: usize, pause: Duration) -> (Reply, String) {
    let chunks: Vec<Bytes> = (0..n).map(|i| Bytes::from(format!("chunk-{i};"))).collect();
    let whole = chunks
        .iter()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    let reply = Reply::ok("").body(Body::Slow { chunks, pause });
    (reply, whole)
}

/// Sends a GET with `Connection: close` and reads until the response head has arrived.
fn start_get(addr: std::net::SocketAddr, path: &str) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: ops.example\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before the response head");
        out.extend_from_slice(&buf[..n]);
    }
    (s, out)
}

/// Reads to EOF (or a reset, which counts as the end).
fn read_rest(s: &mut TcpStream, out: &mut Vec<u8>) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// The body of a raw HTTP/1.1 response, chunked or not; `None` if the chunked framing is cut.
pub(crate) fn body_of(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let (head, mut rest) = text.split_once("\r\n\r\n")?;
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Some(rest.to_string());
    }
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.push_str(after.get(..size)?);
        rest = after.get(size + 2..)?;
    }
}

fn kill(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

// SIGTERM (systemd's stop) while a response streams: the client still gets all of it, then the
// process exits 0.
#[actix_web::test]
async fn sigterm_lets_an_in_flight_response_finish() {
    a_stop_signal_lets_an_in_flight_response_finish("TERM").await;
}

// SIGINT (Ctrl-C) is the same graceful stop.
#[actix_web::test]
async fn sigint_lets_an_in_flight_response_finish() {
    a_stop_signal_lets_an_in_flight_response_finish("INT").await;
}

async fn a_stop_signal_lets_an_in_flight_response_finish(signal: &'static str) {
    let origin = TestOrigin::start().await;
    let (reply, whole) = slow_reply(6, Duration::from_millis(250));
    origin.fixed("/slow", reply);
    let dir = tempfile::tempdir().unwrap();
    let (url, path) = (origin.url(), dir.path().display().to_string());
    let mut larder = LarderProcess::spawn(&serve_args(&url, &path));
    let (addr, pid) = (larder.addr, larder.child.id());

    let raw = tokio::task::spawn_blocking(move || {
        let (mut s, mut out) = start_get(addr, "/slow");
        kill(pid, signal);
        read_rest(&mut s, &mut out);
        out
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(
        body_of(&raw).as_deref(),
        Some(whole.as_str()),
        "complete body after SIG{signal}: {text}"
    );
    let status = tokio::task::spawn_blocking(move || {
        let status = wait_with_timeout(&mut larder.child, Duration::from_secs(40));
        (status, larder.log())
    })
    .await
    .unwrap();
    assert!(
        status.0.success(),
        "exit 0, got {:?}: {:?}",
        status.0,
        status.1
    );
    assert!(
        status.1.iter().any(|l| l.contains("larder stopped")),
        "store flushed and stopped: {:?}",
        status.1
    );
}

// A second signal does not wait for in-flight responses: the process exits at once (130).
#[actix_web::test]
async fn second_signal_exits_at_once() {
    let origin = TestOrigin::start().await;
    // 20 s of body: far longer than the bound below.
    let (reply, _) = slow_reply(40, Duration::from_millis(500));
    origin.fixed("/slower", reply);
    let dir = tempfile::tempdir().unwrap();
    let (url, path) = (origin.url(), dir.path().display().to_string());
    let mut larder = LarderProcess::spawn(&serve_args(&url, &path));
    let (addr, pid) = (larder.addr, larder.child.id());

    let elapsed = tokio::task::spawn_blocking(move || {
        let (mut s, mut out) = start_get(addr, "/slower");
        kill(pid, "TERM");
        let first = Instant::now();
        // Apart, so the two signals are not merged into one delivery.
        std::thread::sleep(Duration::from_millis(500));
        kill(pid, "TERM");
        // The connection ends when the process does.
        read_rest(&mut s, &mut out);
        first.elapsed()
    })
    .await
    .unwrap();
    let status = wait_with_timeout(&mut larder.child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(130), "{status:?}: {:?}", larder.log());
    assert!(
        elapsed < Duration::from_secs(8),
        "exited {elapsed:?} after the first signal; the response needed 20 s"
    );
}

/// Parses Prometheus text exposition (format 0.0.4), panicking on any line that is not a
/// `# HELP` / `# TYPE` comment or a `name{labels} value [timestamp]` sample. Returns the
/// samples keyed by `name{labels}` as written.
pub(crate) fn parse_exposition(text: &str) -> HashMap<String, f64> {
    fn is_name(s: &str) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    fn labels_ok(mut s: &str) -> bool {
        // name="value" pairs, comma-separated; values may escape \\, \" and \n.
        while !s.is_empty() {
            let Some((name, rest)) = s.split_once("=\"") else {
                return false;
            };
            if !is_name(name) {
                return false;
            }
            let mut end = None;
            let mut escaped = false;
            for (i, c) in rest.char_indices() {
                match (escaped, c) {
                    (true, '\\' | '"' | 'n') => escaped = false,
                    (true, _) => return false,
                    (false, '\\') => escaped = true,
                    (false, '"') => {
                        end = Some(i);
                        break;
                    }
                    (false, '\n') => return false,
                    _ => {}
                }
            }
            let Some(end) = end else { return false };
            s = &rest[end + 1..];
            if !s.is_empty() {
                match s.strip_prefix(',') {
                    Some(next) => s = next,
                    None => return false,
                }
            }
        }
        true
    }
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (kind, name, rest) = (parts.next(), parts.next(), parts.next());
            let ok = match (kind, name, rest) {
                (Some("HELP"), Some(n), _) => is_name(n),
                (Some("TYPE"), Some(n), Some(t)) => {
                    is_name(n)
                        && ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t)
                }
                _ => false,
            };
            assert!(ok, "bad comment line: {line:?}");
            continue;
        }
        let (series, value) = match line.find('}') {
            Some(close) => (&line[..=close], line[close + 1..].trim_start_matches(' ')),
            None => line
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad sample line: {line:?}")),
        };
        let name_ok = match series.split_once('{') {
            Some((name, labels)) => {
                is_name(name) && labels.strip_suffix('}').is_some_and(labels_ok)
            }
            None => is_name(series),
        };
        assert!(name_ok, "bad series in {line:?}");
        let mut fields = value.split(' ');
        let v: f64 = fields
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad value in {line:?}"));
        if let Some(ts) = fields.next() {
            assert!(ts.parse::<i64>().is_ok(), "bad timestamp in {line:?}");
        }
        assert!(fields.next().is_none(), "trailing fields in {line:?}");
        samples.insert(series.to_string(), v);
    }
    samples
}

#[test]
fn exposition_checker_rejects_malformed_lines() {
    let good = "# HELP a_total A thing\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\"} 3\nb 1.5e3 1700\n";
    assert_eq!(parse_exposition(good)["b"], 1500.0);
    for bad in [
        "a_total three\n",
        "# TYPE a_total countr\n",
        "a_total{x=1} 3\n",
        "1a 3\n",
        "# random comment\n",
        "a{x=\"1\"y=\"2\"} 1\n",
    ] {
        let caught = std::panic::catch_unwind(|| parse_exposition(bad));
        assert!(caught.is_err(), "accepted {bad:?}");
    }
}

async fn scrape(admin: std::net::SocketAddr, headers: &[(&str, &str)]) -> Got {
    get(&format!("http://{admin}/metrics"), headers).await
}

// One miss then one hit move exactly those counters, the origin histogram and the byte
// counters, and every line of /metrics is valid exposition text.
#[actix_web::test]
async fn metrics_count_a_miss_and_a_hit() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/m",
        Reply::ok("twelve bytes").header("cache-control", "max-age=600"),
    );
    let proxy = TestProxy::start(&origin).await;
    let before = parse_exposition(&scrape(proxy.admin_addr, &[]).await.text());

    let miss = get(&proxy.url("/m"), HOST).await;
    assert!(
        miss.cache_status().contains("fwd=miss"),
        "{}",
        miss.cache_status()
    );
    let hit = get(&proxy.url("/m"), HOST).await;
    assert!(
        hit.cache_status().starts_with("larder; hit"),
        "{}",
        hit.cache_status()
    );

    let r = scrape(proxy.admin_addr, &[]).await;
    assert_eq!(r.status, 200);
    let after = parse_exposition(&r.text());
    let moved = |series: &str| {
        let a = after
            .get(series)
            .unwrap_or_else(|| panic!("{series} missing: {after:?}"));
        a - before.get(series).copied().unwrap_or(0.0)
    };
    assert_eq!(moved("larder_requests_total{result=\"hit\"}"), 1.0);
    assert_eq!(moved("larder_requests_total{result=\"miss\"}"), 1.0);
    for other in ["stale", "revalidated", "pass", "error"] {
        assert_eq!(
            moved(&format!("larder_requests_total{{result=\"{other}\"}}")),
            0.0
        );
    }
    assert_eq!(moved("larder_origin_request_duration_seconds_count"), 1.0);
    assert_eq!(moved("larder_origin_fetches_total"), 1.0);
    assert_eq!(moved("larder_served_bytes_total{source=\"cache\"}"), 12.0);
    assert_eq!(moved("larder_served_bytes_total{source=\"origin\"}"), 12.0);
    assert_eq!(after["larder_store_entries"], 1.0);
    assert_eq!(after["larder_store_body_bytes"], 12.0);
    for name in [
        "larder_coalesced_waits_total",
        "larder_background_refreshes_total",
        "larder_stale_if_error_served_total",
        "larder_purged_entries_total",
        "larder_store_dropped_records_total",
        "larder_store_damaged_bodies_total",
    ] {
        assert!(after.contains_key(name), "{name} missing");
    }
}

// `metrics_public` opens /metrics, and only /metrics, to scrapers without the token.
#[actix_web::test]
async fn metrics_public_skips_the_token_for_metrics_only() {
    let origin = TestOrigin::start().await;
    origin.fixed("/p", Reply::ok("p").header("cache-control", "max-age=600"));
    let closed = TestProxy::start_with(&origin, "[admin]\ntoken = \"s3cret\"\n").await;
    assert_eq!(scrape(closed.admin_addr, &[]).await.status, 401);

    let open = TestProxy::start_with(
        &origin,
        "[admin]\ntoken = \"s3cret\"\nmetrics_public = true\n",
    )
    .await;
    assert_eq!(scrape(open.admin_addr, &[]).await.status, 200);
    let stats = get(&format!("http://{}/stats", open.admin_addr), &[]).await;
    assert_eq!(stats.status, 401, "other endpoints keep the token");

    // Purges are counted.
    get(&open.url("/p"), HOST).await;
    let purge = client()
        .post(format!("http://{}/purge", open.admin_addr))
        .insert_header(("authorization", "Bearer s3cret"))
        .send_body(r#"{"all": true}"#)
        .await
        .unwrap();
    assert_eq!(purge.status().as_u16(), 200);
    let after = parse_exposition(&scrape(open.admin_addr, &[]).await.text());
    assert_eq!(after["larder_purged_entries_total"], 1.0);
    assert_eq!(after["larder_store_entries"], 0.0);
}

// One access-log line per proxied request, with the fields operators grep for.
#[actix_web::test]
async fn access_log_line_per_request() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/logged?x=1&y=two",
        Reply::ok("abc").header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let (url, path) = (origin.url(), dir.path().display().to_string());
    // A chunked answer (no Content-Length): its bytes are counted as they go out.
    let (chunked, whole) = slow_reply(3, Duration::from_millis(10));
    origin.fixed("/chunked", chunked);
    let larder = LarderProcess::spawn(&serve_args(&url, &path));
    get(&larder.url("/logged?x=1&y=two"), HOST).await;
    get(&larder.url("/logged?x=1&y=two"), HOST).await;
    let c = get(&larder.url("/chunked"), HOST).await;
    assert_eq!(c.header("content-length"), None, "meant to be chunked");
    assert_eq!(c.text(), whole);

    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines: Vec<String> = larder
            .log()
            .into_iter()
            .filter(|l| l.contains("larder::access"))
            .collect();
        if lines.len() >= 3 || Instant::now() > deadline {
            break lines;
        }
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(lines.len(), 3, "{:?}", larder.log());
    for (line, result) in lines.iter().zip(["miss", "hit"]) {
        for field in [
            "method=\"GET\"",
            "url=ops.example/logged?x=1&y=two ",
            "status=200",
            "cache=\"larder; ",
            "bytes=3 ",
            "duration_ms=",
        ] {
            assert!(line.contains(field), "{field} missing in {line}");
        }
        assert!(line.contains(&format!("result=\"{result}\"")), "{line}");
    }
    let chunked_line = &lines[2];
    assert!(
        chunked_line.contains(&format!("bytes={} ", whole.len())),
        "{chunked_line}"
    );
    assert!(
        chunked_line.contains("url=ops.example/chunked "),
        "{chunked_line}"
    );
}

// The shipped unit passes `systemd-analyze verify` (where systemd is installed) and keeps the
// settings the README promises.
#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/larder.service"
    ))
    .unwrap();
    // Every directive issue 8 asks for, plus the rest of the hardening the README promises.
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "ExecStart=/usr/local/bin/larder serve --config /etc/larder/larder.toml",
        "KillSignal=SIGTERM",
        "DynamicUser=yes",
        "StateDirectory=larder",
        "ConfigurationDirectory=larder",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "MemoryDenyWriteExecute=yes",
        "LimitNOFILE=65536",
        "Restart=on-failure",
        "PrivateDevices=yes",
        "ProtectProc=invisible",
        "ProcSubset=pid",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictNamespaces=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "UMask=0077",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
    }
    // No capability unless the operator asks for a port below 1024 (then only that one).
    assert!(
        !unit.lines().any(|l| l.starts_with("AmbientCapabilities=")),
        "the unit grants a capability by default"
    );
    assert!(unit.contains("#   AmbientCapabilities=CAP_NET_BIND_SERVICE\n"));
    // SIGHUP reloads the token and log level (sighup_reloads_token_and_log_level).
    assert!(
        unit.lines()
            .any(|l| l == "ExecReload=/bin/kill -HUP $MAINPID")
    );

    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("skipping systemd_unit_verifies: systemd-analyze is not installed");
        return;
    };
    if !probe.status.success() {
        eprintln!("skipping systemd_unit_verifies: systemd-analyze does not run here");
        return;
    }
    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("larder.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/larder", env!("CARGO_BIN_EXE_larder")),
    )
    .unwrap();
    let socket = dir.path().join("larder.socket");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/larder.socket"),
        &socket,
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .arg(&socket)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown or misspelled keys are only warnings (exit 0): any line about our units fails too.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("larder.service") || l.contains("larder.socket"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {:?}\n{stderr}",
        out.status
    );
}

// SIGHUP re-reads the config: the admin token and log level change without a restart, and
// a config that no longer loads changes nothing.
#[actix_web::test]
async fn sighup_reloads_token_and_log_level() {
    let origin = TestOrigin::start().await;
    origin.fixed("/r", Reply::ok("r").header("cache-control", "max-age=600"));
    let dir = tempfile::tempdir().unwrap();
    let (p, a) = (
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    let (proxy, admin) = (p.local_addr().unwrap(), a.local_addr().unwrap());
    drop((p, a));
    let config_path = dir.path().join("larder.toml");
    let config = |token: &str, level: &str| {
        format!(
            "[server]\nlisten = \"{proxy}\"\n[origin]\nurl = \"{}\"\n[storage]\npath = \"{}\"\n\
             [admin]\nlisten = \"{admin}\"\ntoken = \"{token}\"\n[log]\nlevel = \"{level}\"\n",
            origin.url(),
            dir.path().join("data").display()
        )
    };
    std::fs::write(&config_path, config("first", "info")).unwrap();
    let log_path = dir.path().join("stderr.log");
    let child = Command::new(env!("CARGO_BIN_EXE_larder"))
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut child = Reaper(child);
    let pid = child.0.id();
    let stats = |token: &'static str| {
        let url = format!("http://{admin}/stats");
        async move {
            let auth = format!("Bearer {token}");
            get(&url, &[("authorization", auth.as_str())]).await.status
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(admin).is_err() {
        assert!(Instant::now() < deadline, "larder did not start");
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats("first").await, 200);
    get(&format!("http://{proxy}/r"), HOST).await;

    std::fs::write(&config_path, config("second", "warn")).unwrap();
    kill(pid, "HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats("second").await != 200 {
        assert!(Instant::now() < deadline, "new token not taken");
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats("first").await, 401, "the old token is gone");
    // At level warn the access log (info) is off.
    get(&format!("http://{proxy}/r"), HOST).await;

    std::fs::write(&config_path, "[server\nbroken").unwrap();
    kill(pid, "HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log_path)
        .unwrap()
        .contains("reload failed")
    {
        assert!(
            Instant::now() < deadline,
            "bad config on reload not reported"
        );
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats("second").await, 200, "a bad config changes nothing");

    kill(pid, "TERM");
    let status = wait_with_timeout(&mut child.0, Duration::from_secs(30));
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "{status:?}: {log}");
    assert!(log.contains("config reloaded"), "{log}");
    let access = log.lines().filter(|l| l.contains("larder::access")).count();
    assert_eq!(
        access, 1,
        "only the request before the reload to warn is logged: {log}"
    );
}

// After SIGTERM no new connection is taken (the listeners close), while the response already
// streaming still completes.
#[actix_web::test]
async fn sigterm_refuses_new_connections_while_in_flight_finishes() {
    let origin = TestOrigin::start().await;
    let (reply, whole) = slow_reply(8, Duration::from_millis(250));
    origin.fixed("/slow", reply);
    let dir = tempfile::tempdir().unwrap();
    let (url, path) = (origin.url(), dir.path().display().to_string());
    let mut larder = LarderProcess::spawn(&serve_args(&url, &path));
    let (addr, admin, pid) = (larder.addr, larder.admin_addr, larder.child.id());

    let (raw, refused) = tokio::task::spawn_blocking(move || {
        let (mut s, mut out) = start_get(addr, "/slow");
        kill(pid, "TERM");
        // Within the 2 s the response still needs, both listeners must stop taking connections.
        let deadline = Instant::now() + Duration::from_millis(1500);
        let mut refused = Vec::new();
        for target in [addr, admin] {
            loop {
                match TcpStream::connect(target) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        refused.push(target);
                        break;
                    }
                    _ if Instant::now() > deadline => break,
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        read_rest(&mut s, &mut out);
        (out, refused)
    })
    .await
    .unwrap();
    assert_eq!(
        refused,
        vec![addr, admin],
        "new connections were still taken"
    );
    assert_eq!(
        body_of(&raw).as_deref(),
        Some(whole.as_str()),
        "in-flight response cut: {}",
        String::from_utf8_lossy(&raw)
    );
    let status = wait_with_timeout(&mut larder.child, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
}

// A response still streaming when [server] shutdown_timeout runs out is cut, and the process
// still flushes the store and exits 0 (instead of waiting for it).
#[actix_web::test]
async fn shutdown_timeout_cuts_a_stuck_response_and_exits() {
    let origin = TestOrigin::start().await;
    // 20 s of body against a 1 s shutdown_timeout.
    let (reply, whole) = slow_reply(40, Duration::from_millis(500));
    origin.fixed("/stuck", reply);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("larder.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"1s\"\n[origin]\nurl = \"{}\"\n\
             [storage]\npath = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            origin.url(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut larder = LarderProcess::spawn(&["--config", config.to_str().unwrap()]);
    let (addr, pid) = (larder.addr, larder.child.id());
    let (raw, took) = tokio::task::spawn_blocking(move || {
        let (mut s, mut out) = start_get(addr, "/stuck");
        kill(pid, "TERM");
        let started = Instant::now();
        read_rest(&mut s, &mut out);
        (out, started.elapsed())
    })
    .await
    .unwrap();
    assert_ne!(body_of(&raw).as_deref(), Some(whole.as_str()), "not cut");
    assert!(took < Duration::from_secs(8), "cut only after {took:?}");
    let status = wait_with_timeout(&mut larder.child, Duration::from_secs(15));
    assert!(status.success(), "{status:?}: {:?}", larder.log());
    assert!(
        larder.log().iter().any(|l| l.contains("larder stopped")),
        "{:?}",
        larder.log()
    );
}

async fn scrape_map(admin: std::net::SocketAddr) -> HashMap<String, f64> {
    let r = scrape(admin, &[]).await;
    assert_eq!(r.status, 200);
    parse_exposition(&r.text())
}

// Real requests move every result: stale (stale-while-revalidate), revalidated (a 304), pass
// (an unsafe method), error (an origin timeout), and miss; origin requests, counted once each
// (cache fetches, the background refresh, the pass), agree with the latency histogram.
#[actix_web::test]
async fn metrics_count_every_result_through_real_requests() {
    let origin = TestOrigin::start().await;
    for (path, cc) in [
        ("/swr", "max-age=10, stale-while-revalidate=600"),
        ("/rv", "max-age=10"),
    ] {
        origin.route(path, move |req, _| {
            if req.header("if-none-match") == Some("\"m\"") {
                Reply::status(304)
                    .header("etag", "\"m\"")
                    .header("cache-control", cc)
            } else {
                Reply::ok("body")
                    .header("etag", "\"m\"")
                    .header("cache-control", cc)
            }
        });
    }
    origin.fixed("/post", Reply::status(204));
    origin.fixed("/late", Reply::ok("late").delay(Duration::from_secs(3)));
    let proxy = TestProxy::start_with(&origin, "[origin]\nresponse_timeout = \"500ms\"\n").await;
    let before = scrape_map(proxy.admin_addr).await;

    get(&proxy.url("/swr"), HOST).await;
    get(&proxy.url("/rv"), HOST).await;
    proxy.advance(Duration::from_secs(30));
    let stale = get(&proxy.url("/swr"), HOST).await;
    assert!(stale.cache_status().contains("stale-while-revalidate"));
    let rv = get(&proxy.url("/rv"), HOST).await;
    assert_eq!(rv.cache_status(), "larder; fwd=stale; fwd-status=304");
    let post = try_send("POST", &proxy.url("/post"), HOST, Bytes::new())
        .await
        .unwrap();
    assert_eq!(post.status, 204);
    assert_eq!(get(&proxy.url("/late"), HOST).await.status, 504);

    // The background refresh is counted once its origin answer is in.
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let m = scrape_map(proxy.admin_addr).await;
        let fetches = m["larder_origin_fetches_total"] - before["larder_origin_fetches_total"];
        if fetches >= 6.0 || Instant::now() > deadline {
            break m;
        }
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    };
    let moved = |s: &str| after[s] - before.get(s).copied().unwrap_or(0.0);
    for (result, n) in [
        ("hit", 0.0),
        ("miss", 2.0),
        ("stale", 1.0),
        ("revalidated", 1.0),
        ("pass", 1.0),
        ("error", 1.0),
    ] {
        assert_eq!(
            moved(&format!("larder_requests_total{{result=\"{result}\"}}")),
            n,
            "{result}"
        );
    }
    assert_eq!(moved("larder_background_refreshes_total"), 1.0);
    // 2 misses + 1 refresh + 1 revalidation + 1 pass + 1 timed-out fetch.
    assert_eq!(moved("larder_origin_fetches_total"), 6.0);
    assert_eq!(
        moved("larder_origin_request_duration_seconds_count"),
        moved("larder_origin_fetches_total"),
        "every origin request is both counted and timed"
    );
}

/// The body files under `dir`, recursively.
fn body_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(body_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

// A body that fails its blake3 check is counted (and not served), and entries evicted to
// stay under a small max_size are counted.
#[actix_web::test]
async fn metrics_count_integrity_failures_and_evictions() {
    let origin = TestOrigin::start().await;
    let big = |i: u8| Bytes::from(vec![b'a' + i; 300 << 10]);
    for i in 0..6u8 {
        origin.fixed(
            &format!("/big/{i}"),
            Reply::ok(big(i)).header("cache-control", "max-age=600"),
        );
    }
    let toml = "[storage]\nmax_size = \"1MiB\"\nmax_object_size = \"1MiB\"\n";
    let proxy = TestProxy::start_with(&origin, toml).await;
    get(&proxy.url("/big/0"), HOST).await;
    // Restart, so nothing of the body is held in memory, then flip one byte of its file.
    let dir = proxy.stop().await;
    let files = body_files(&dir.path().join("bodies"));
    assert_eq!(files.len(), 1, "{files:?}");
    let mut bytes = std::fs::read(&files[0]).unwrap();
    bytes[1000] ^= 0x01;
    std::fs::write(&files[0], bytes).unwrap();
    let proxy = TestProxy::start_in(&origin, toml, dir).await;
    let damaged = try_send("GET", &proxy.url("/big/0"), HOST, Bytes::new()).await;
    if let Ok(r) = &damaged {
        assert!(r.body == big(0), "a damaged body was served");
    }
    let m = scrape_map(proxy.admin_addr).await;
    assert_eq!(m["larder_store_damaged_bodies_total"], 1.0);

    // 6 × 300 KiB against 1 MiB.
    for i in 1..6 {
        get(&proxy.url(&format!("/big/{i}")), HOST).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = scrape_map(proxy.admin_addr).await;
        // A pass counts its evictions when it ends, and a commit after it may leave the store
        // over max_size until the next pass: done once both show.
        if m["larder_store_evictions_total"] >= 1.0
            && m["larder_store_usage_bytes"] <= (1 << 20) as f64
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no eviction counted, or usage still over max_size: {m:?}"
        );
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Picks two free loopback ports (bound and released).
fn two_ports() -> (std::net::SocketAddr, std::net::SocketAddr) {
    let (p, a) = (
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    (p.local_addr().unwrap(), a.local_addr().unwrap())
}

/// Runs `larder serve --config` with `[log]` set to `log_toml` and `RUST_LOG` as given (or
/// unset), makes one proxied request, stops it with SIGTERM, and returns its stderr.
async fn log_of_one_request(log_toml: &str, rust_log: Option<&str>) -> String {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/l?q=1",
        Reply::ok("four").header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin) = two_ports();
    let config = dir.path().join("larder.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{proxy}\"\n[origin]\nurl = \"{}\"\n[storage]\npath = \"{}\"\n\
             [admin]\nlisten = \"{admin}\"\n[log]\n{log_toml}\n",
            origin.url(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let log_path = dir.path().join("stderr.log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_larder"));
    command
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    if let Some(v) = rust_log {
        command.env("RUST_LOG", v);
    }
    let mut child = Reaper(command.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(admin).is_err() {
        assert!(Instant::now() < deadline, "larder did not start");
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    let r = get(&format!("http://{proxy}/l?q=1"), HOST).await;
    assert_eq!(r.text(), "four");
    kill(child.0.id(), "TERM");
    let status = wait_with_timeout(&mut child.0, Duration::from_secs(30));
    assert!(status.success());
    std::fs::read_to_string(&log_path).unwrap()
}

// `[log] format = "json"`: every line is a JSON object, and the access line carries its fields.
#[actix_web::test]
async fn json_log_lines_parse_with_the_access_fields() {
    let log = log_of_one_request("format = \"json\"\nlevel = \"info\"", None).await;
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "larder ready"),
        "{log}"
    );
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] == "larder::access")
        .collect();
    assert_eq!(access.len(), 1, "{log}");
    let f = &access[0]["fields"];
    assert_eq!(f["method"], "GET", "{f}");
    assert_eq!(f["url"], "ops.example/l?q=1", "{f}");
    assert_eq!(f["status"], 200, "{f}");
    assert_eq!(f["result"], "miss", "{f}");
    assert_eq!(f["bytes"], 4, "{f}");
    assert!(
        f["cache"].as_str().unwrap().starts_with("larder; fwd=miss"),
        "{f}"
    );
    assert!(f["duration_ms"].as_f64().is_some(), "{f}");
    assert_eq!(access[0]["level"], "INFO");
}

// RUST_LOG wins over `[log] level`, whichever way they differ.
#[actix_web::test]
async fn rust_log_overrides_the_configured_level() {
    let raised = log_of_one_request("level = \"warn\"", Some("info")).await;
    assert!(
        raised.lines().any(|l| l.contains("larder::access")),
        "RUST_LOG=info did not win over level = warn: {raised}"
    );
    let lowered = log_of_one_request("level = \"info\"", Some("warn")).await;
    assert!(
        !lowered
            .lines()
            .any(|l| l.contains("larder::access") || l.contains("larder ready")),
        "RUST_LOG=warn did not win over level = info: {lowered}"
    );
    // Without RUST_LOG the file's level holds.
    let from_file = log_of_one_request("level = \"warn\"", None).await;
    assert!(!from_file.contains("larder::access"), "{from_file}");
}

// The README's metrics table names every metric /metrics exports.
#[actix_web::test]
async fn readme_lists_every_exported_metric() {
    let origin = TestOrigin::start().await;
    let proxy = TestProxy::start(&origin).await;
    let text = scrape(proxy.admin_addr, &[]).await.text();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert!(names.len() >= 16, "{names:?}");
    for name in names {
        assert!(readme.contains(&format!("`{name}")), "README lacks {name}");
    }
}

// Socket activation (systemd/larder.socket): with LISTEN_PID/LISTEN_FDS set as systemd sets
// them, Larder serves on the sockets it was handed and binds nothing itself (the configured
// addresses are held by this test, so a bind would fail).
#[actix_web::test]
async fn socket_activation_serves_on_the_passed_listeners() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/sa",
        Reply::ok("activated").header("cache-control", "max-age=600"),
    );
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").unwrap();
    let (proxy_addr, admin_addr) = (proxy.local_addr().unwrap(), admin.local_addr().unwrap());
    let (taken_a, taken_b) = (
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("stderr.log");
    // The shell moves the two listeners (its stdin and stdout) to fds 3 and 4, then becomes
    // larder, keeping its pid: what systemd does between fork and exec.
    let script = format!(
        "exec 3<&0 4>&1 0</dev/null 1>/dev/null; \
         export LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=larder.socket:larder.socket; \
         exec '{}' serve --origin '{}' --data-dir '{}' --listen {} --admin-listen {}",
        env!("CARGO_BIN_EXE_larder"),
        origin.url(),
        dir.path().join("data").display(),
        taken_a.local_addr().unwrap(),
        taken_b.local_addr().unwrap(),
    );
    let child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("RUST_LOG", "info")
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(proxy)))
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(admin)))
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut child = Reaper(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap();
        if log.contains("larder ready") {
            assert!(
                log.contains(&format!("proxy={proxy_addr}"))
                    && log.contains(&format!("admin={admin_addr}")),
                "{log}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline && child.0.try_wait().unwrap().is_none(),
            "not ready on the passed sockets: {log}"
        );
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    let r = get(&format!("http://{proxy_addr}/sa"), HOST).await;
    assert_eq!(r.text(), "activated");
    let health = get(&format!("http://{admin_addr}/healthz"), &[]).await;
    assert_eq!(health.status, 200);
    kill(child.0.id(), "TERM");
    let status = wait_with_timeout(&mut child.0, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    drop((taken_a, taken_b));
}

// SIGTERM while a background refresh (stale-while-revalidate) waits on a slow origin: the
// refresh answers no client, so the stop does not wait for it; it is dropped whole (nothing
// half-stored), the process exits 0, and the entry it was refreshing is intact at the next start.
#[actix_web::test]
async fn sigterm_drops_a_pending_background_refresh_cleanly() {
    let origin = TestOrigin::start().await;
    origin.route("/swr", |_, n| {
        let reply = Reply::ok(format!("version {n}"))
            .header("cache-control", "max-age=1, stale-while-revalidate=600");
        if n == 1 {
            reply
        } else {
            reply.delay(Duration::from_secs(20))
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (url, path) = (origin.url(), dir.path().display().to_string());
    let first = LarderProcess::spawn(&serve_args(&url, &path));
    assert_eq!(get(&first.url("/swr"), HOST).await.text(), "version 1");
    actix_web::rt::time::sleep(Duration::from_millis(2100)).await;
    let stale = get(&first.url("/swr"), HOST).await;
    assert_eq!(stale.text(), "version 1");
    assert!(
        stale.cache_status().contains("stale-while-revalidate"),
        "{}",
        stale.cache_status()
    );
    for _ in 0..200 {
        if origin.hits("/swr") == 2 {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(origin.hits("/swr"), 2, "the refresh is at the origin");

    let stopping = Instant::now();
    let status = first.terminate();
    assert!(status.success(), "exit 0, got {status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "the stop waited {:?} for a refresh nobody waits for",
        stopping.elapsed()
    );
    let second = LarderProcess::spawn(&serve_args(&url, &path));
    let again = get(&second.url("/swr"), HOST).await;
    assert_eq!(again.text(), "version 1", "{}", again.cache_status());
    assert!(again.cache_status().starts_with("larder; hit"));
}
