//! Hostile clients over raw TCP: smuggling shapes, oversized and malformed heads, odd targets and Host values, slowloris, slow readers, idle floods; each answered with the right 4xx or a close, and the proxy serves normally right after.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::rawnet::*;
use crate::support::*;

/// An origin with a cacheable `/ok` and an echo of every other path, and a proxy before it.
async fn setup(extra_toml: &str) -> (TestOrigin, TestProxy) {
    watch_worker_panics();
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/ok",
        Reply::ok("fine").header("cache-control", "max-age=60"),
    );
    origin.route_prefix("/echo", |seen, _| {
        Reply::ok(format!("{} {} {}", seen.method, seen.path, seen.body.len()))
    });
    let proxy = TestProxy::start_with(&origin, extra_toml).await;
    (origin, proxy)
}

/// The case's answer must be `status` and a closed connection.
fn assert_refused(reply: &RawReply, status: u16) {
    assert_eq!(reply.status(), Some(status), "{}", reply.text());
    assert!(reply.closed, "the connection closes after a refusal");
}

/// A normal request right after the case still works, and no worker panicked.
async fn still_serves(proxy: &TestProxy) {
    let reply = exchange(proxy.addr, plain_get("/ok")).await;
    assert_eq!(reply.status(), Some(200), "{}", reply.text());
    assert_eq!(reply.body(), b"fine");
    assert_eq!(worker_panics(), 0, "a server worker panicked");
}

/// Origin requests for paths starting with `prefix`.
fn origin_saw(origin: &TestOrigin, path: &str) -> usize {
    origin.hits(path)
}

// RFC 9112 §6.3: Content-Length with Transfer-Encoding is refused, not forwarded, so the
// bytes after the chunked end can never become a second request at the origin.
#[actix_web::test]
async fn content_length_with_transfer_encoding_is_refused() {
    let (origin, proxy) = setup("").await;
    let smuggled = "0\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nHost: hostile.test\r\n\r\n";
    let req = format!(
        "POST /echo/front HTTP/1.1\r\nHost: hostile.test\r\nContent-Length: {}\r\n\
         Transfer-Encoding: chunked\r\n\r\n{smuggled}",
        smuggled.len()
    );
    assert_refused(&exchange(proxy.addr, req).await, 400);
    assert_eq!(origin_saw(&origin, "/echo/front"), 0);
    assert_eq!(origin_saw(&origin, "/echo/smuggled"), 0);
    still_serves(&proxy).await;
}

// RFC 9112 §6.3: two different Content-Length values are unrecoverable framing.
#[actix_web::test]
async fn two_content_lengths_are_refused() {
    let (origin, proxy) = setup("").await;
    let req = "POST /echo/cl HTTP/1.1\r\nHost: hostile.test\r\nContent-Length: 5\r\n\
               Content-Length: 6\r\n\r\nhello!";
    assert_refused(&exchange(proxy.addr, req).await, 400);
    assert_eq!(origin_saw(&origin, "/echo/cl"), 0);
    still_serves(&proxy).await;
}

// RFC 9112 §7.1: a chunk size that is not hex. The body is forwarded as it streams, so the
// origin may have seen the request start, but never a complete body, and the client gets
// no success.
#[actix_web::test]
async fn invalid_chunk_size_gets_no_success() {
    let (origin, proxy) = setup("").await;
    let req = "POST /echo/chunk HTTP/1.1\r\nHost: hostile.test\r\nTransfer-Encoding: chunked\r\n\r\n\
               zz\r\nhello\r\n0\r\n\r\n";
    let reply = exchange(proxy.addr, req).await;
    let status = reply.status();
    assert!(
        status.is_none_or(|s| s >= 400),
        "no success for a broken chunked body: {}",
        reply.text()
    );
    assert!(reply.closed);
    eprintln!("invalid chunk size: status {status:?}, closed");
    assert!(origin.seen("/echo/chunk").iter().all(|s| s.body.is_empty()));
    still_serves(&proxy).await;
}

// RFC 9112 §5.2: obs-fold in a request is rejected (400).
#[actix_web::test]
async fn obs_fold_is_refused() {
    let (origin, proxy) = setup("").await;
    let req = "GET /echo/fold HTTP/1.1\r\nHost: hostile.test\r\nX-Long: first\r\n  second\r\n\r\n";
    assert_refused(&exchange(proxy.addr, req).await, 400);
    assert_eq!(origin_saw(&origin, "/echo/fold"), 0);
    still_serves(&proxy).await;
}

// RFC 6585 §5: a header section over `[server] max_header_size` gets 431; one under it is served.
#[actix_web::test]
async fn header_section_over_the_configured_limit_gets_431() {
    let (origin, proxy) = setup("[server]\nmax_header_size = \"4KiB\"\n").await;
    let big = format!(
        "GET /echo/big HTTP/1.1\r\nHost: hostile.test\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(5000)
    );
    assert_refused(&exchange(proxy.addr, big).await, 431);
    assert_eq!(origin_saw(&origin, "/echo/big"), 0);
    let fits = format!(
        "GET /echo/fits HTTP/1.1\r\nHost: hostile.test\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(3000)
    );
    assert_eq!(exchange(proxy.addr, fits).await.status(), Some(200));
    still_serves(&proxy).await;
}

// RFC 6585 §5: past the parser's own 128 KiB head buffer the answer is 431 as well.
#[actix_web::test]
async fn header_section_over_the_parser_buffer_gets_431() {
    let (_origin, proxy) = setup("").await;
    let huge = format!(
        "GET /echo/huge HTTP/1.1\r\nHost: hostile.test\r\nX-Pad: {}\r\n\r\n",
        "b".repeat(200 << 10)
    );
    assert_refused(&exchange(proxy.addr, huge).await, 431);
    still_serves(&proxy).await;
}

// RFC 6585 §5: more header lines than the parser takes (96).
#[actix_web::test]
async fn too_many_header_lines_get_431() {
    let (origin, proxy) = setup("").await;
    let lines: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    let req = format!("GET /echo/many HTTP/1.1\r\nHost: hostile.test\r\n{lines}\r\n");
    assert_refused(&exchange(proxy.addr, req).await, 431);
    assert_eq!(origin_saw(&origin, "/echo/many"), 0);
    still_serves(&proxy).await;
}

// RFC 9110 §9.1 (method = token), RFC 9112 §3.2 (request-target bytes): 400.
#[actix_web::test]
async fn invalid_method_and_target_bytes_get_400() {
    let (_origin, proxy) = setup("").await;
    for req in [
        &b"G(T /echo/m HTTP/1.1\r\nHost: hostile.test\r\n\r\n"[..],
        b"GE\x01T /echo/m HTTP/1.1\r\nHost: hostile.test\r\n\r\n",
        b"GET /echo/\x01x HTTP/1.1\r\nHost: hostile.test\r\n\r\n",
        b"GET /echo/\xff\xfe HTTP/1.1\r\nHost: hostile.test\r\n\r\n",
        b"GET /echo/a b HTTP/1.1\r\nHost: hostile.test\r\n\r\n",
        b"GET /echo/x HTTP/9.9\r\nHost: hostile.test\r\n\r\n",
    ] {
        let reply = exchange(proxy.addr, req).await;
        assert_refused(&reply, 400);
    }
    still_serves(&proxy).await;
}

// RFC 9112 §3.2.2: an absolute-form target decides the host. The origin must then see that
// host, not the Host line: else a response made for one host is stored under another's key.
#[actix_web::test]
async fn absolute_form_target_is_keyed_and_forwarded_by_its_own_host() {
    let (origin, proxy) = setup("").await;
    origin.route("/page", |seen, _| {
        Reply::ok(format!("for {}", seen.header("host").unwrap_or("?")))
            .header("cache-control", "max-age=60")
    });
    let req =
        "GET http://victim.test/page HTTP/1.1\r\nHost: attacker.test\r\nConnection: close\r\n\r\n";
    let reply = exchange(proxy.addr, req).await;
    assert_eq!(reply.status(), Some(200), "{}", reply.text());
    assert_eq!(reply.body(), b"for victim.test");
    assert_eq!(origin.seen("/page")[0].header("host"), Some("victim.test"));
    // A plain request for the victim's URL gets the victim's response from the cache.
    let plain = "GET /page HTTP/1.1\r\nHost: victim.test\r\nConnection: close\r\n\r\n";
    let again = exchange(proxy.addr, plain).await;
    assert_eq!(again.body(), b"for victim.test");
    assert!(again.header("cache-status").unwrap().contains("hit"));
    // https:// and other schemes are not served here.
    let tls = "GET https://victim.test/page HTTP/1.1\r\nHost: victim.test\r\n\r\n";
    assert_refused(&exchange(proxy.addr, tls).await, 400);
    still_serves(&proxy).await;
}

// RFC 9112 §3.2.3: authority-form is only for CONNECT.
#[actix_web::test]
async fn authority_form_target_gets_400() {
    let (_origin, proxy) = setup("").await;
    let req = "GET victim.test:80 HTTP/1.1\r\nHost: victim.test\r\n\r\n";
    assert_refused(&exchange(proxy.addr, req).await, 400);
    still_serves(&proxy).await;
}

// RFC 9110 §9.3.6: a reverse proxy opens no tunnels; 501, and the origin is not asked.
#[actix_web::test]
async fn connect_gets_501() {
    let (origin, proxy) = setup("").await;
    let req = "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n";
    assert_refused(&exchange(proxy.addr, req).await, 501);
    assert!(origin.seen("/").is_empty());
    still_serves(&proxy).await;
}

// RFC 9112 §3.2.4: `*` is for server-wide OPTIONS (answered here), nothing else.
#[actix_web::test]
async fn asterisk_form_is_for_options_only() {
    let (_origin, proxy) = setup("").await;
    let options = exchange(
        proxy.addr,
        "OPTIONS * HTTP/1.1\r\nHost: hostile.test\r\n\r\n",
    )
    .await;
    assert_eq!(options.status(), Some(200), "{}", options.text());
    let get = exchange(proxy.addr, "GET * HTTP/1.1\r\nHost: hostile.test\r\n\r\n").await;
    assert_refused(&get, 400);
    still_serves(&proxy).await;
}

// RFC 9112 §3.2: an HTTP/1.1 request without Host, or with two, gets 400; HTTP/1.0 may omit it.
#[actix_web::test]
async fn missing_or_repeated_host_gets_400() {
    let (_origin, proxy) = setup("").await;
    let missing = exchange(proxy.addr, "GET /ok HTTP/1.1\r\n\r\n").await;
    assert_refused(&missing, 400);
    let two = "GET /ok HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n";
    assert_refused(&exchange(proxy.addr, two).await, 400);
    let http10 = exchange(proxy.addr, "GET /ok HTTP/1.0\r\n\r\n").await;
    assert_eq!(http10.status(), Some(200), "{}", http10.text());
    still_serves(&proxy).await;
}

// RFC 9110 §7.2 (Host = uri-host [":" port]): user-info, a port that is no port, or stray
// characters get 400; an unusual but valid port is served (under its own key).
#[actix_web::test]
async fn host_with_user_info_or_bad_port_gets_400() {
    let (origin, proxy) = setup("").await;
    for host in [
        "user@hostile.test",
        "user:pw@hostile.test",
        "hostile.test:99999",
        "hostile.test:80:80",
        "hostile.test:-1",
        "hostile.test:http",
        "hostile.test/evil",
        "[::1",
    ] {
        let req = format!("GET /echo/host HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let reply = exchange(proxy.addr, req).await;
        assert_refused(&reply, 400);
    }
    assert_eq!(origin_saw(&origin, "/echo/host"), 0);
    let odd = "GET /ok HTTP/1.1\r\nHost: hostile.test:65535\r\nConnection: close\r\n\r\n";
    let reply = exchange(proxy.addr, odd).await;
    assert_eq!(reply.status(), Some(200), "{}", reply.text());
    still_serves(&proxy).await;
}

// RFC 9110 §15.5.15: a target over `[server] max_uri_length` gets 414 and never reaches
// the origin; one just under it is served.
#[actix_web::test]
async fn very_long_url_gets_414() {
    let (origin, proxy) = setup("[server]\nmax_uri_length = \"2KiB\"\n").await;
    let long = format!("/echo/{}", "x".repeat(3000));
    let req = format!("GET {long} HTTP/1.1\r\nHost: hostile.test\r\n\r\n");
    assert_refused(&exchange(proxy.addr, req).await, 414);
    assert_eq!(origin_saw(&origin, &long), 0);
    let fits = format!("/echo/{}", "y".repeat(1900));
    let req = format!("GET {fits} HTTP/1.1\r\nHost: hostile.test\r\nConnection: close\r\n\r\n");
    assert_eq!(exchange(proxy.addr, req).await.status(), Some(200));
    still_serves(&proxy).await;
}

// RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 request is faulty framing.
#[actix_web::test]
async fn transfer_encoding_in_http10_is_refused() {
    let (origin, proxy) = setup("").await;
    let req = "POST /echo/te10 HTTP/1.0\r\nHost: hostile.test\r\nTransfer-Encoding: chunked\r\n\
               Content-Length: 5\r\n\r\nhello";
    assert_refused(&exchange(proxy.addr, req).await, 400);
    assert_eq!(origin_saw(&origin, "/echo/te10"), 0);
    still_serves(&proxy).await;
}

// Slowloris: a head that trickles in is cut after `[server] header_timeout`, well before
// the client finishes, while a normal client is still served meanwhile.
#[actix_web::test]
async fn slow_header_sender_is_closed_after_the_header_timeout() {
    let (_origin, proxy) = setup("[server]\nheader_timeout = \"1s\"\n").await;
    let addr = proxy.addr;
    let slow = blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let started = Instant::now();
        s.write_all(b"GET /ok HTTP/1.1\r\n").unwrap();
        // One header byte every 200 ms: a head that would take 10 s.
        let mut buf = [0u8; 1024];
        let mut answer = Vec::new();
        for _ in 0..50 {
            if s.write_all(b"X").is_err() {
                break;
            }
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        (
            started.elapsed(),
            String::from_utf8_lossy(&answer).into_owned(),
        )
    });
    // Meanwhile a normal request is served at once.
    let normal = exchange(proxy.addr, plain_get("/ok")).await;
    assert_eq!(normal.status(), Some(200));
    let (elapsed, answer) = slow.await;
    assert!(
        elapsed < Duration::from_secs(4),
        "a trickling head was cut after {elapsed:?}"
    );
    eprintln!(
        "slowloris: cut after {elapsed:?} with {:?}",
        answer.lines().next()
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "408 or a plain close, got {answer:?}"
    );
    still_serves(&proxy).await;
}

fn larder_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn socket_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn write_config(dir: &tempfile::TempDir, origin: &str, extra: &str) -> String {
    let path = dir.path().join("larder.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n{extra}\n[origin]\nurl = \"{origin}\"\n\
         body_timeout = \"2s\"\n\
         [storage]\npath = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        dir.path().join("data").display()
    );
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A client that asks for a large cacheable response and stops reading after 16 KiB.
/// Returns the stalled connection (kept open by the caller).
fn stalled_reader(addr: std::net::SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: hostile.test\r\n\r\n").as_bytes())
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = 0;
    let mut buf = [0u8; 4096];
    while got < 16 << 10 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the response started");
        got += n;
    }
    s
}

async fn slow_reader_case(coalesce_max_body: &str) {
    const SIZE: usize = 40 << 20;
    let origin = TestOrigin::start().await;
    let body = Bytes::from(vec![b'z'; SIZE]);
    origin.fixed(
        "/large",
        Reply::ok(body).header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("[cache]\ncoalesce_max_body = \"{coalesce_max_body}\"\n");
    let config = write_config(&dir, &origin.url(), "");
    // [cache] goes after the rest of the file.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&extra);
    std::fs::write(&config, text).unwrap();
    let larder = LarderProcess::spawn(&["--config", &config]);
    let (addr, pid) = (larder.addr, larder.child.id());
    let before = larder_rss_kib(pid);
    let stalled = blocking(move || stalled_reader(addr, "/large")).await;
    // The origin fetch completes into the store while the client still reads nothing.
    let entries = format!("http://{}/entries", larder.admin_addr);
    let start = Instant::now();
    loop {
        let got = get(&entries, &[]).await;
        if got.text().contains("/large") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the response was not stored while its client stalled"
        );
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    let grown_mib = larder_rss_kib(pid).saturating_sub(before) / 1024;
    // Bounded: well under two copies of the body, however long the client stalls.
    assert!(
        grown_mib < 2 * (SIZE as u64 >> 20),
        "RSS grew {grown_mib} MiB for a {} MiB body",
        SIZE >> 20
    );
    eprintln!("slow reader (coalesce_max_body {coalesce_max_body}): RSS grew {grown_mib} MiB");
    // A second client gets the stored copy from the cache.
    let hit = get(&larder.url("/large"), &[("host", "hostile.test")]).await;
    assert_eq!(hit.body.len(), SIZE);
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert_eq!(origin.hits("/large"), 1);
    drop(stalled);
    let log = larder.log();
    assert!(!log.iter().any(|l| l.contains("panicked")), "{log:?}");
}

// A client that stops reading a large response does not stop the fetch into the cache, and
// the proxy's memory stays bounded meanwhile (measured: RSS of the larder process).
// Body shared through memory (it fits coalesce_max_body).
#[actix_web::test]
async fn stalled_reader_does_not_stop_the_store_copy_shared_body() {
    slow_reader_case("64MiB").await;
}

// The same when the body is larger than coalesce_max_body (read through the client's channel).
#[actix_web::test]
async fn stalled_reader_does_not_stop_the_store_copy_unshared_body() {
    slow_reader_case("1MiB").await;
}

// Thousands of idle connections: the server holds at most `max_connections`, closes the idle
// ones after `header_timeout`, never dies, and serves a normal request afterwards.
#[actix_web::test]
async fn thousands_of_idle_connections_are_bounded() {
    const ATTEMPTS: usize = 2000;
    const MAX: usize = 64;
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/ok",
        Reply::ok("fine").header("cache-control", "max-age=60"),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        &origin.url(),
        &format!("max_connections = {MAX}\nheader_timeout = \"1s\"\n"),
    );
    let larder = LarderProcess::spawn(&["--config", &config]);
    let (addr, pid) = (larder.addr, larder.child.id());
    let baseline = socket_fds(pid);

    let (held, peak) = blocking(move || {
        // Parallel connects; once the accept queue is full a connect waits for a SYN retry,
        // so each gets 1 s and the whole flood 3 s.
        let deadline = Instant::now() + Duration::from_secs(3);
        let threads: Vec<_> = (0..16)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for _ in 0..ATTEMPTS / 16 {
                        if Instant::now() > deadline {
                            break;
                        }
                        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                            held.push(s);
                        }
                    }
                    held
                })
            })
            .collect();
        let held: Vec<TcpStream> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        (held, socket_fds(pid))
    })
    .await;
    eprintln!(
        "idle flood: {} of {ATTEMPTS} connects succeeded; larder holds {} sockets (baseline {baseline})",
        held.len(),
        peak
    );
    assert!(held.len() > MAX, "the flood outnumbered max_connections");
    assert!(
        peak <= baseline + MAX + 4,
        "larder holds {peak} sockets for max_connections = {MAX}"
    );
    // The accepted ones are closed by the server after header_timeout.
    let closed = blocking(move || {
        std::thread::sleep(Duration::from_millis(1500));
        let mut closed = 0;
        for mut s in held {
            s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
            let mut b = [0u8; 64];
            match s.read(&mut b) {
                // EOF, or a 408 before the close: the server let go.
                Ok(_) => closed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => closed += 1,
            }
        }
        closed
    })
    .await;
    assert!(
        closed >= MAX / 2,
        "only {closed} idle connections were closed by the server"
    );
    eprintln!("idle flood: {closed} idle connections closed by the server after header_timeout");
    let ok = get(&larder.url("/ok"), &[("host", "hostile.test")]).await;
    assert_eq!(ok.status, 200);
    let log = larder.log();
    assert!(!log.iter().any(|l| l.contains("panicked")), "{log:?}");
}
