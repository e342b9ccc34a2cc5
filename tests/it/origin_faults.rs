//! Hostile or broken origins (a raw TCP origin answering scripted bytes): refused, reset, stalled, short, malformed, interim and oversized responses give 502/504 or a cut, never a stored partial; stale-if-error stands in where allowed; the origin-request limit holds.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::rawnet::*;
use crate::support::try_send;

const FAST: &str = "[origin]\nresponse_timeout = \"1s\"\nbody_timeout = \"1s\"\n";

/// A full, cacheable response.
fn good(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// An origin that answers connection `n` with `bad` until `good_from`, then with a good response.
fn origin_failing_until(
    good_from: usize,
    bad: impl Fn(TcpStream) + Send + Sync + 'static,
) -> RawOrigin {
    RawOrigin::start(move |mut s, n| {
        if n < good_from {
            bad(s);
        } else if read_request_head(&mut s).is_some() {
            let _ = s.write_all(good("recovered").as_bytes());
        }
    })
}

/// Closes with a reset: unread request bytes make the kernel send RST instead of FIN.
fn reset(s: TcpStream) {
    let mut buf = [0u8; 1];
    // Wait for the request to arrive without reading it.
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.peek(&mut buf);
    drop(s);
}

async fn get_path(proxy: &Proxy, path: &str) -> Result<crate::support::Got, String> {
    try_send(
        "GET",
        &proxy.url(path),
        &[("host", "origin.test")],
        bytes::Bytes::new(),
    )
    .await
}

/// The response started (200 with the declared length) and was then cut: the connection
/// closed before `declared` body bytes arrived, so the client cannot take it as complete.
async fn assert_cut(proxy: &Proxy, path: &str, declared: usize) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: origin.test\r\n\r\n");
    let reply = exchange(proxy.addr, req).await;
    assert!(reply.closed, "the connection is cut");
    // Either nothing at all (the fault came before the head was written) or a head whose
    // body stops short.
    if !reply.bytes.is_empty() {
        assert_eq!(reply.status(), Some(200), "{}", reply.text());
        assert_eq!(reply.header("content-length"), Some(declared.to_string()));
        assert!(
            reply.body().len() < declared,
            "got {} bytes",
            reply.body().len()
        );
    }
}

/// After the fault, nothing is stored: the next request goes to the origin again and
/// gets the good answer, and /entries lists only that.
async fn nothing_partial_stored(proxy: &Proxy, origin: &RawOrigin, path: &str) {
    let before = origin.connections();
    let next = get_path(proxy, path).await.expect("the retry is answered");
    assert_eq!(next.status, 200);
    assert_eq!(next.text(), "recovered");
    assert!(
        next.cache_status().contains("fwd=miss"),
        "{}",
        next.cache_status()
    );
    assert_eq!(
        origin.connections(),
        before + 1,
        "the faulty answer was not reused"
    );
    assert_eq!(
        proxy.entry_urls().await,
        vec![format!("http://origin.test{path}")]
    );
}

// RFC 9110 §15.6.3: a gateway that cannot reach the origin answers 502.
#[actix_web::test]
async fn connection_refused_gets_502() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let proxy = Proxy::start(&format!("http://127.0.0.1:{port}"), FAST).await;
    let got = get_path(&proxy, "/refused").await.unwrap();
    assert_eq!(got.status, 502, "{}", got.text());
    assert!(
        got.cache_status().contains("origin-unreachable"),
        "{}",
        got.cache_status()
    );
    assert!(proxy.entry_urls().await.is_empty());
    proxy.stop().await;
}

#[actix_web::test]
async fn reset_before_headers_gets_502_and_stores_nothing() {
    let origin = origin_failing_until(2, reset);
    let proxy = Proxy::start(&origin.url(), FAST).await;
    let got = get_path(&proxy, "/reset").await.unwrap();
    assert_eq!(got.status, 502, "{}", got.text());
    nothing_partial_stored(&proxy, &origin, "/reset").await;
    proxy.stop().await;
}

// Headers already went to the client, so the only honest signal left is a cut connection.
#[actix_web::test]
async fn reset_mid_body_cuts_the_client_and_stores_nothing() {
    let origin = origin_failing_until(2, |mut s| {
        let mut buf = [0u8; 1];
        let _ = s.peek(&mut buf);
        let head = "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 100000\r\n\r\n";
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(&[b'x'; 1000]);
        std::thread::sleep(Duration::from_millis(100));
        drop(s);
    });
    let proxy = Proxy::start(&origin.url(), FAST).await;
    assert_cut(&proxy, "/midbody", 100_000).await;
    nothing_partial_stored(&proxy, &origin, "/midbody").await;
    proxy.stop().await;
}

// RFC 9110 §15.6.5: no response head within [origin] response_timeout is a 504.
#[actix_web::test]
async fn headers_timeout_gets_504() {
    let origin = origin_failing_until(2, |mut s| {
        let _ = read_request_head(&mut s);
        std::thread::sleep(Duration::from_secs(3));
    });
    let proxy = Proxy::start(&origin.url(), FAST).await;
    let started = Instant::now();
    let got = get_path(&proxy, "/slowhead").await.unwrap();
    assert_eq!(got.status, 504, "{}", got.text());
    assert!(started.elapsed() < Duration::from_millis(2500));
    nothing_partial_stored(&proxy, &origin, "/slowhead").await;
    proxy.stop().await;
}

#[actix_web::test]
async fn body_stall_cuts_the_client_and_stores_nothing() {
    let origin = origin_failing_until(2, |mut s| {
        let _ = read_request_head(&mut s);
        let head = "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 1000\r\n\r\n";
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(b"only ten b");
        std::thread::sleep(Duration::from_secs(3));
    });
    let proxy = Proxy::start(&origin.url(), FAST).await;
    let started = Instant::now();
    assert_cut(&proxy, "/stall", 1000).await;
    assert!(
        started.elapsed() < Duration::from_millis(2900),
        "cut after body_timeout"
    );
    nothing_partial_stored(&proxy, &origin, "/stall").await;
    proxy.stop().await;
}

// RFC 9112 §6.3: a body that ends before its Content-Length is incomplete.
#[actix_web::test]
async fn content_length_longer_than_body_cuts_and_stores_nothing() {
    let origin = origin_failing_until(2, |mut s| {
        let _ = read_request_head(&mut s);
        let head = "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 1000\r\n\r\n";
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(&[b'y'; 500]);
        let _ = s.shutdown(Shutdown::Write);
        std::thread::sleep(Duration::from_millis(200));
    });
    let proxy = Proxy::start(&origin.url(), FAST).await;
    assert_cut(&proxy, "/short", 1000).await;
    nothing_partial_stored(&proxy, &origin, "/short").await;
    proxy.stop().await;
}

// RFC 9110 §5.1, §5.5: field names are tokens and values hold no control bytes.
#[actix_web::test]
async fn invalid_header_bytes_get_502() {
    for (i, bad) in [
        "HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 2\r\n\r\nok",
        "HTTP/1.1 200 OK\r\nX-Ctl: a\x01b\r\nContent-Length: 2\r\n\r\nok",
        "HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        "NOT HTTP AT ALL\r\n\r\n",
    ]
    .into_iter()
    .enumerate()
    {
        let bad = bad.to_string();
        let origin = origin_failing_until(2, move |mut s| {
            let _ = read_request_head(&mut s);
            let _ = s.write_all(bad.as_bytes());
            let _ = s.shutdown(Shutdown::Write);
        });
        let proxy = Proxy::start(&origin.url(), FAST).await;
        let path = format!("/badhead{i}");
        let got = get_path(&proxy, &path).await.unwrap();
        assert_eq!(got.status, 502, "case {i}: {}", got.text());
        nothing_partial_stored(&proxy, &origin, &path).await;
        proxy.stop().await;
    }
}

// RFC 9110 §15.2: an origin may send 1xx interim responses before the final one. The origin
// client (awc) takes the first head it reads as the response and would hand the connection
// back to its pool with the real response still to come, so Larder answers 502, keeps
// nothing, and drops that pooled connection: the late final response must never be read
// as the answer to the next request (a response stored under the wrong URL).
#[actix_web::test]
async fn interim_1xx_gets_502_and_never_answers_the_next_request() {
    let origin = RawOrigin::start(|mut s, _| {
        while let Some(head) = read_request_head(&mut s) {
            let path = head.split(' ').nth(1).unwrap_or("").to_string();
            if path == "/interim" {
                let _ = s.write_all(
                    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
                );
                std::thread::sleep(Duration::from_millis(200));
                let _ = s.write_all(good("final answer for /interim").as_bytes());
            } else if s
                .write_all(good(&format!("answer for {path}")).as_bytes())
                .is_err()
            {
                return;
            }
        }
    });
    // One worker: the requests after it use the same origin client and pool.
    let proxy = Proxy::start_workers(&origin.url(), FAST, 1).await;
    let got = get_path(&proxy, "/interim").await.unwrap();
    assert_eq!(got.status, 502, "{}", got.text());
    // At once, while the final response is still on its way on the connection awc used.
    for path in ["/after1", "/after2", "/after3"] {
        let next = get_path(&proxy, path).await.unwrap();
        assert_eq!(next.text(), format!("answer for {path}"));
    }
    let mut stored = proxy.entry_urls().await;
    stored.sort();
    assert_eq!(
        stored,
        ["/after1", "/after2", "/after3"].map(|p| format!("http://origin.test{p}"))
    );
    proxy.stop().await;
}

// A response head far over any sane size (200 KiB, or 200 lines) is refused with 502.
#[actix_web::test]
async fn enormous_header_block_gets_502() {
    for (i, extra) in [
        format!("X-Huge: {}\r\n", "h".repeat(200 << 10)),
        (0..200)
            .map(|n| format!("X-Line-{n}: v\r\n"))
            .collect::<String>(),
    ]
    .into_iter()
    .enumerate()
    {
        let origin = origin_failing_until(2, move |mut s| {
            let _ = read_request_head(&mut s);
            let head = format!(
                "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n{extra}Content-Length: 2\r\n\r\nok"
            );
            let _ = s.write_all(head.as_bytes());
            std::thread::sleep(Duration::from_millis(200));
        });
        let proxy = Proxy::start(&origin.url(), FAST).await;
        let path = format!("/hugehead{i}");
        let got = get_path(&proxy, &path).await.unwrap();
        assert_eq!(got.status, 502, "case {i}");
        nothing_partial_stored(&proxy, &origin, &path).await;
        proxy.stop().await;
    }
}

/// An origin whose first answer is `first` and every later connection is reset.
fn origin_then_resets(first: String) -> RawOrigin {
    RawOrigin::start(move |mut s, n| {
        if n == 1 {
            let _ = read_request_head(&mut s);
            let _ = s.write_all(first.as_bytes());
            std::thread::sleep(Duration::from_millis(100));
        } else {
            reset(s);
        }
    })
}

// RFC 5861 §4: inside stale-if-error, an origin failure is answered with the stale copy.
#[actix_web::test]
async fn stale_if_error_serves_the_stored_copy_when_the_origin_fails() {
    let origin = origin_then_resets(
        "HTTP/1.1 200 OK\r\nCache-Control: max-age=1, stale-if-error=600\r\nContent-Length: 5\r\n\
         Connection: close\r\n\r\nstale"
            .into(),
    );
    let proxy = Proxy::start(&origin.url(), FAST).await;
    assert_eq!(get_path(&proxy, "/sie").await.unwrap().text(), "stale");
    proxy.clock.advance(Duration::from_secs(30));
    let got = get_path(&proxy, "/sie").await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "stale");
    assert!(
        got.cache_status().contains("stale-if-error"),
        "{}",
        got.cache_status()
    );
    assert_eq!(origin.connections(), 2, "the origin was asked first");
    proxy.stop().await;
}

// Without stale-if-error (or past it) the failure is the client's answer: no stale content
// is served without the origin's permission.
#[actix_web::test]
async fn no_stale_if_error_means_the_failure_is_answered() {
    let origin = origin_then_resets(
        "HTTP/1.1 200 OK\r\nCache-Control: max-age=1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nfresh"
            .into(),
    );
    let proxy = Proxy::start(&origin.url(), FAST).await;
    assert_eq!(get_path(&proxy, "/nosie").await.unwrap().text(), "fresh");
    proxy.clock.advance(Duration::from_secs(30));
    let got = get_path(&proxy, "/nosie").await.unwrap();
    assert_eq!(got.status, 502, "{}", got.text());
    proxy.stop().await;
}

// `[origin] max_concurrent_requests` bounds the requests in flight to the origin across all
// workers: 10 concurrent distinct misses with a limit of 2 never make the origin see more
// than 2 at once, and all are answered.
#[actix_web::test]
async fn origin_request_limit_holds_across_workers() {
    let current = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (c, p) = (current.clone(), peak.clone());
    let origin = RawOrigin::start(move |mut s, _| {
        // Keep-alive: answer every request on this connection.
        while read_request_head(&mut s).is_some() {
            let now = c.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
            c.fetch_sub(1, Ordering::SeqCst);
            if s.write_all(good("slow").as_bytes()).is_err() {
                return;
            }
        }
    });
    let proxy = Proxy::start(
        &origin.url(),
        "[origin]\nmax_concurrent_requests = 2\nresponse_timeout = \"10s\"\n",
    )
    .await;
    let started = Instant::now();
    let requests = (0..10).map(|i| {
        let url = proxy.url(&format!("/limited/{i}"));
        async move { try_send("GET", &url, &[("host", "origin.test")], bytes::Bytes::new()).await }
    });
    let answers = futures_util::future::join_all(requests).await;
    for a in &answers {
        let a = a.as_ref().expect("answered");
        assert_eq!(a.status, 200);
        assert_eq!(a.text(), "slow");
    }
    assert_eq!(
        peak.load(Ordering::SeqCst),
        2,
        "the origin saw at most (and, here, exactly) 2 at once"
    );
    // 10 requests, 2 at a time, 200 ms each: at least 5 rounds.
    assert!(started.elapsed() >= Duration::from_millis(950));
    proxy.stop().await;
}

// RFC 5861 §3 refreshes run in the background; `[cache] max_background_refreshes` bounds how
// many wait on the origin at once, so a wave of stale entries cannot take every origin slot.
// Past it the stale entry is still served at once, without a refresh.
#[actix_web::test]
async fn background_refreshes_are_bounded() {
    let current = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let refreshes = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let (c, p, r) = (current.clone(), peak.clone(), refreshes.clone());
    let origin = RawOrigin::start(move |mut s, _| {
        while let Some(head) = read_request_head(&mut s) {
            let path = head.split(' ').nth(1).unwrap_or("").to_string();
            let first = seen.lock().unwrap().insert(path.clone());
            if !first {
                r.fetch_add(1, Ordering::SeqCst);
                let now = c.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(500));
                c.fetch_sub(1, Ordering::SeqCst);
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\nCache-Control: max-age=1, stale-while-revalidate=600\r\n\
                 Content-Length: {}\r\n\r\n{path}",
                path.len()
            );
            if s.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
    });
    let proxy = Proxy::start(&origin.url(), "[cache]\nmax_background_refreshes = 2\n").await;
    let paths: Vec<String> = (0..6).map(|i| format!("/swr/{i}")).collect();
    for path in &paths {
        assert_eq!(get_path(&proxy, path).await.unwrap().text(), *path);
    }
    proxy.clock.advance(Duration::from_secs(10));
    let started = Instant::now();
    let answers =
        futures_util::future::join_all(paths.iter().map(|path| get_path(&proxy, path))).await;
    for (answer, path) in answers.iter().zip(&paths) {
        let answer = answer.as_ref().unwrap();
        assert_eq!(answer.text(), *path);
        assert!(
            answer.cache_status().contains("stale-while-revalidate"),
            "{}",
            answer.cache_status()
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(450),
        "stale answers do not wait"
    );
    eventually("the refreshes finish", || {
        current.load(Ordering::SeqCst) == 0
    })
    .await;
    actix_web::rt::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(peak.load(Ordering::SeqCst), 2);
    assert_eq!(
        refreshes.load(Ordering::SeqCst),
        2,
        "past the bound no refresh starts"
    );
    proxy.stop().await;
}

// A client that stops reading a pass-through response (nothing stored: a POST, here) is cut
// after `[origin] body_timeout`, so it cannot keep an origin request slot, and with it the
// origin's capacity, for as long as it keeps its connection open.
#[actix_web::test]
async fn a_stalled_pass_through_reader_gives_its_origin_slot_back() {
    const BIG: usize = 48 << 20;
    let origin = RawOrigin::start(move |mut s, _| {
        while let Some(head) = read_request_head(&mut s) {
            let reply = if head.starts_with("POST") {
                let mut r =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n").into_bytes();
                r.resize(r.len() + BIG, b'p');
                r
            } else {
                good("small").into_bytes()
            };
            if s.write_all(&reply).is_err() {
                return;
            }
        }
    });
    let proxy = Proxy::start(
        &origin.url(),
        "[origin]\nmax_concurrent_requests = 1\nresponse_timeout = \"20s\"\nbody_timeout = \"1s\"\n",
    )
    .await;
    let addr = proxy.addr;
    // Takes the first bytes of a large POST answer, then reads nothing more (socket kept open).
    let stalled = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 16384];
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the response started");
        s
    })
    .await
    .unwrap();
    let started = Instant::now();
    let next = get_path(&proxy, "/after").await.expect("answered");
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(next.text(), "small");
    // Held for good, the slot would have made this wait the 20 s response timeout (504).
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "waited {:?} for the origin slot",
        started.elapsed()
    );
    drop(stalled);
    proxy.stop().await;
}
