//! The serve path over HTTP: hits, misses, Vary, revalidation, sharing rules, invalidation, streaming, origin failures.

use std::time::Duration;

use bytes::Bytes;

use crate::support::*;

// RFC 9111 §4.2: a fresh stored response is reused; §5.1 it carries Age; RFC 9211 names the hit.
#[actix_web::test]
async fn second_get_of_max_age_response_is_a_hit() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/a",
        Reply::ok("hello").header("cache-control", "max-age=60"),
    );
    let proxy = TestProxy::start(&origin).await;

    let first = get(&proxy.url("/a"), &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.text(), "hello");
    assert_eq!(
        first.cache_status(),
        "larder; fwd=miss; fwd-status=200; stored"
    );

    proxy.advance(Duration::from_secs(7));
    let second = get(&proxy.url("/a"), &[]).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.text(), "hello");
    assert!(
        second.cache_status().starts_with("larder; hit"),
        "{}",
        second.cache_status()
    );
    let age: u64 = second.header("age").expect("Age on a hit").parse().unwrap();
    assert!((7..=9).contains(&age), "age {age}");
    assert_eq!(origin.hits("/a"), 1);
}

// RFC 9111 §4.1: each stored response is selected only by requests whose Vary'd fields match.
#[actix_web::test]
async fn vary_variants_are_stored_side_by_side() {
    let origin = TestOrigin::start().await;
    origin.route("/v", |req, _| {
        let lang = req.header("accept-language").unwrap_or("none").to_string();
        Reply::ok(format!("lang={lang}"))
            .header("cache-control", "max-age=60")
            .header("vary", "Accept-Language")
    });
    let proxy = TestProxy::start(&origin).await;

    let en = get(&proxy.url("/v"), &[("accept-language", "en")]).await;
    let de = get(&proxy.url("/v"), &[("accept-language", "de")]).await;
    assert_eq!(en.text(), "lang=en");
    assert_eq!(de.text(), "lang=de");
    assert!(
        de.cache_status().contains("fwd=vary-miss"),
        "{}",
        de.cache_status()
    );

    let en2 = get(&proxy.url("/v"), &[("accept-language", "en")]).await;
    let de2 = get(&proxy.url("/v"), &[("accept-language", "de")]).await;
    assert_eq!(en2.text(), "lang=en");
    assert_eq!(de2.text(), "lang=de");
    assert!(en2.cache_status().starts_with("larder; hit"));
    assert!(de2.cache_status().starts_with("larder; hit"));
    assert_eq!(origin.hits("/v"), 2);
}

// RFC 9111 §4.3.1-§4.3.4: a stale entry is revalidated with If-None-Match; a 304 freshens it
// and the client still gets the full stored body.
#[actix_web::test]
async fn stale_entry_is_revalidated_with_etag_and_304_serves_stored_body() {
    let origin = TestOrigin::start().await;
    origin.route("/r", |req, _| {
        if req.header("if-none-match") == Some("\"v1\"") {
            Reply::status(304)
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=10")
        } else {
            Reply::ok("the full body")
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=10")
        }
    });
    let proxy = TestProxy::start(&origin).await;

    assert_eq!(get(&proxy.url("/r"), &[]).await.text(), "the full body");
    proxy.advance(Duration::from_secs(30));
    let revalidated = get(&proxy.url("/r"), &[]).await;
    assert_eq!(revalidated.status, 200);
    assert_eq!(revalidated.text(), "the full body");
    assert_eq!(
        revalidated.cache_status(),
        "larder; fwd=stale; fwd-status=304"
    );
    let seen = origin.seen("/r");
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].header("if-none-match"), Some("\"v1\""));

    // Freshened by the 304: the next request is a hit again.
    let hit = get(&proxy.url("/r"), &[]).await;
    assert!(
        hit.cache_status().starts_with("larder; hit"),
        "{}",
        hit.cache_status()
    );
    assert_eq!(origin.hits("/r"), 2);
}

// RFC 9111 §4.3.1: Last-Modified is sent back as If-Modified-Since.
#[actix_web::test]
async fn last_modified_is_used_for_revalidation() {
    let origin = TestOrigin::start().await;
    let lm = "Tue, 01 Jan 2030 00:00:00 GMT";
    origin.route("/lm", move |req, _| {
        if req.header("if-modified-since") == Some(lm) {
            Reply::status(304).header("cache-control", "max-age=10")
        } else {
            Reply::ok("dated")
                .header("last-modified", lm)
                .header("cache-control", "max-age=10")
        }
    });
    let proxy = TestProxy::start(&origin).await;
    get(&proxy.url("/lm"), &[]).await;
    proxy.advance(Duration::from_secs(60));
    let again = get(&proxy.url("/lm"), &[]).await;
    assert_eq!(again.text(), "dated");
    assert_eq!(again.cache_status(), "larder; fwd=stale; fwd-status=304");
}

// RFC 9111 §5.2.2.5 no-store, §5.2.2.7 private, §3.5 Authorization: not stored in a shared cache.
#[actix_web::test]
async fn no_store_private_and_authorization_are_not_shared() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/ns",
        Reply::ok("x").header("cache-control", "no-store, max-age=60"),
    );
    origin.fixed(
        "/pv",
        Reply::ok("x").header("cache-control", "private, max-age=60"),
    );
    origin.fixed("/au", Reply::ok("x").header("cache-control", "max-age=60"));
    let proxy = TestProxy::start(&origin).await;

    for _ in 0..2 {
        let r = get(&proxy.url("/ns"), &[]).await;
        assert!(
            r.cache_status().contains("detail=no-store"),
            "{}",
            r.cache_status()
        );
        let r = get(&proxy.url("/pv"), &[]).await;
        assert!(
            r.cache_status().contains("detail=private"),
            "{}",
            r.cache_status()
        );
        let r = get(&proxy.url("/au"), &[("authorization", "Bearer secret")]).await;
        assert!(
            r.cache_status().contains("detail=authorization"),
            "{}",
            r.cache_status()
        );
    }
    assert_eq!(origin.hits("/ns"), 2);
    assert_eq!(origin.hits("/pv"), 2);
    assert_eq!(origin.hits("/au"), 2);
    // And the authorized response did not become a shared one.
    let anonymous = get(&proxy.url("/au"), &[]).await;
    assert!(
        anonymous.cache_status().contains("fwd=miss"),
        "{}",
        anonymous.cache_status()
    );
}

// RFC 9111 §3.5: s-maxage (or public) lets a shared cache store an authorized response.
#[actix_web::test]
async fn authorization_with_s_maxage_is_shared() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/shared",
        Reply::ok("x").header("cache-control", "s-maxage=60"),
    );
    let proxy = TestProxy::start(&origin).await;
    get(&proxy.url("/shared"), &[("authorization", "Bearer a")]).await;
    let r = get(&proxy.url("/shared"), &[("authorization", "Bearer b")]).await;
    assert!(
        r.cache_status().starts_with("larder; hit"),
        "{}",
        r.cache_status()
    );
    assert_eq!(origin.hits("/shared"), 1);
}

// RFC 9111 §4.4: a successful unsafe request invalidates the target URI.
#[actix_web::test]
async fn post_invalidates_the_cached_url() {
    let origin = TestOrigin::start().await;
    origin.route("/doc", |req, n| {
        if req.method == "POST" {
            Reply::status(204)
        } else {
            Reply::ok(format!("version {n}")).header("cache-control", "max-age=600")
        }
    });
    let proxy = TestProxy::start(&origin).await;
    assert_eq!(get(&proxy.url("/doc"), &[]).await.text(), "version 1");
    assert!(
        get(&proxy.url("/doc"), &[])
            .await
            .cache_status()
            .starts_with("larder; hit")
    );

    let posted = try_send(
        "POST",
        &proxy.url("/doc"),
        &[],
        Bytes::from_static(b"change"),
    )
    .await
    .unwrap();
    assert_eq!(posted.status, 204);
    assert_eq!(posted.cache_status(), "larder; fwd=method; fwd-status=204");

    let after = get(&proxy.url("/doc"), &[]).await;
    assert!(
        after.cache_status().contains("fwd=miss"),
        "{}",
        after.cache_status()
    );
    assert_eq!(after.text(), "version 3");
    assert_eq!(origin.seen("/doc")[1].body, Bytes::from_static(b"change"));
}

// RFC 9111 §4.4: an error response to an unsafe method invalidates nothing.
#[actix_web::test]
async fn failed_post_does_not_invalidate() {
    let origin = TestOrigin::start().await;
    origin.route("/keep", |req, _| {
        if req.method == "POST" {
            Reply::status(500)
        } else {
            Reply::ok("kept").header("cache-control", "max-age=600")
        }
    });
    let proxy = TestProxy::start(&origin).await;
    get(&proxy.url("/keep"), &[]).await;
    try_send("POST", &proxy.url("/keep"), &[], Bytes::new())
        .await
        .unwrap();
    assert!(
        get(&proxy.url("/keep"), &[])
            .await
            .cache_status()
            .starts_with("larder; hit")
    );
}

// Streaming: an 8 MiB body (4x awc's default body limit) passes through and is stored intact.
#[actix_web::test]
async fn large_body_is_streamed_and_cached_intact() {
    let origin = TestOrigin::start().await;
    let body: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let body = Bytes::from(body);
    origin.fixed(
        "/big",
        Reply::ok(body.clone()).header("cache-control", "max-age=600"),
    );
    let proxy = TestProxy::start(&origin).await;

    let first = get(&proxy.url("/big"), &[]).await;
    assert_eq!(first.body.len(), body.len());
    assert!(first.body == body, "first response differs");
    let second = get(&proxy.url("/big"), &[]).await;
    assert!(
        second.cache_status().starts_with("larder; hit"),
        "{}",
        second.cache_status()
    );
    assert_eq!(second.header("content-length"), Some("8388608"));
    assert!(second.body == body, "cached response differs");
    assert_eq!(origin.hits("/big"), 1);
}

// A body the origin cuts off before its Content-Length is never stored, and the client
// does not see a clean end.
#[actix_web::test]
async fn body_cut_off_by_origin_is_not_cached() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/cut",
        Reply::ok("")
            .header("cache-control", "max-age=600")
            .body(Body::CutShort {
                declared: 100_000,
                sent: Bytes::from(vec![b'x'; 40_000]),
            }),
    );
    let proxy = TestProxy::start(&origin).await;
    let first = try_send("GET", &proxy.url("/cut"), &[], Bytes::new()).await;
    assert!(
        first.is_err() || first.as_ref().unwrap().body.len() < 100_000,
        "client saw a complete body"
    );
    let second = try_send("GET", &proxy.url("/cut"), &[], Bytes::new()).await;
    if let Ok(r) = &second {
        assert!(!r.cache_status().contains("hit"), "{}", r.cache_status());
    }
    assert_eq!(origin.hits("/cut"), 2);
}

// RFC 9110 §13.2.2 / RFC 9111 §4.3.2: the cache answers a client's If-None-Match with 304.
#[actix_web::test]
async fn client_conditional_is_answered_from_cache() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/c",
        Reply::ok("body")
            .header("etag", "\"e1\"")
            .header("cache-control", "max-age=60"),
    );
    let proxy = TestProxy::start(&origin).await;
    get(&proxy.url("/c"), &[]).await;
    let r = get(&proxy.url("/c"), &[("if-none-match", "W/\"e1\"")]).await;
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), Some("\"e1\""));
    assert!(r.cache_status().starts_with("larder; hit"));
    let miss = get(&proxy.url("/c"), &[("if-none-match", "\"other\"")]).await;
    assert_eq!(miss.status, 200);
    assert_eq!(origin.hits("/c"), 1);
}

// A client conditional on a miss: the cache fetches the full response (without the client's
// validators), stores it, and answers the conditional itself.
#[actix_web::test]
async fn conditional_miss_stores_full_response() {
    let origin = TestOrigin::start().await;
    origin.route("/cm", |req, _| {
        assert!(
            req.header("if-none-match").is_none(),
            "client validator leaked upstream"
        );
        Reply::ok("full")
            .header("etag", "\"x\"")
            .header("cache-control", "max-age=60")
    });
    let proxy = TestProxy::start(&origin).await;
    let r = get(&proxy.url("/cm"), &[("if-none-match", "\"x\"")]).await;
    assert_eq!(r.status, 200);
    let hit = get(&proxy.url("/cm"), &[]).await;
    assert_eq!(hit.text(), "full");
    assert!(hit.cache_status().starts_with("larder; hit"));
}

// RFC 9110 §9.3.2: HEAD is answered from a stored GET, with the GET's Content-Length.
#[actix_web::test]
async fn head_is_served_from_stored_get() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/h",
        Reply::ok("0123456789").header("cache-control", "max-age=60"),
    );
    let proxy = TestProxy::start(&origin).await;
    get(&proxy.url("/h"), &[]).await;
    let head = send("HEAD", &proxy.url("/h"), &[]).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), Some("10"));
    assert!(head.cache_status().starts_with("larder; hit"));
    assert_eq!(origin.hits("/h"), 1);
}

// RFC 9111 §5.2.1.7: only-if-cached with nothing stored → 504.
#[actix_web::test]
async fn only_if_cached_miss_is_504() {
    let origin = TestOrigin::start().await;
    origin.fixed("/o", Reply::ok("x").header("cache-control", "max-age=60"));
    let proxy = TestProxy::start(&origin).await;
    let r = get(&proxy.url("/o"), &[("cache-control", "only-if-cached")]).await;
    assert_eq!(r.status, 504);
    assert_eq!(origin.hits("/o"), 0);
}

// Forwarding: Host as sent, X-Forwarded-For/-Proto and Via added, hop-by-hop removed, every
// method (including extension methods) passed with its body.
#[actix_web::test]
async fn requests_are_forwarded_faithfully() {
    let origin = TestOrigin::start().await;
    origin.fixed("/f", Reply::ok("ok").header("x-origin", "1"));
    let proxy = TestProxy::start(&origin).await;
    // Raw bytes, because HTTP clients rewrite Connection themselves.
    let raw = raw_exchange(
        proxy.addr,
        b"GET /f HTTP/1.1\r\nHost: Example.COM\r\nX-Custom: kept\r\nConnection: close, x-secret\r\nX-Secret: dropped\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains("x-origin: 1"), "{raw}");
    assert!(raw.contains("via: 1.1 larder"), "{raw}");
    let seen = &origin.seen("/f")[0];
    assert_eq!(seen.header("host"), Some("Example.COM"));
    assert_eq!(seen.header("x-custom"), Some("kept"));
    assert_eq!(seen.header("x-secret"), None);
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("via"), Some("1.1 larder"));

    for method in ["PUT", "DELETE", "PATCH", "OPTIONS", "PURGEX"] {
        let body = Bytes::from(format!("{method} body"));
        let r = try_send(method, &proxy.url("/f"), &[], body.clone())
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{method}");
        let last = origin.seen("/f").pop().unwrap();
        assert_eq!(last.method, method);
        assert_eq!(last.body, body, "{method} body");
    }
}

// A 3 MiB request body is streamed to the origin intact.
#[actix_web::test]
async fn large_request_body_reaches_origin() {
    let origin = TestOrigin::start().await;
    origin.fixed("/upload", Reply::status(201));
    let proxy = TestProxy::start(&origin).await;
    let body = Bytes::from(vec![7u8; 3 << 20]);
    let r = try_send("PUT", &proxy.url("/upload"), &[], body.clone())
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    assert_eq!(origin.seen("/upload")[0].body.len(), body.len());
}

// Origin refusing connections → 502 with a short plain-text body.
#[actix_web::test]
async fn refused_origin_is_502() {
    let origin = TestOrigin::start().await;
    let proxy = TestProxy::start(&origin).await;
    origin.stop().await;
    let r = get(&proxy.url("/gone"), &[]).await;
    assert_eq!(r.status, 502);
    assert!(r.text().starts_with("larder:"), "{}", r.text());
    assert!(
        r.cache_status().contains("detail=origin-unreachable"),
        "{}",
        r.cache_status()
    );
}

// An origin slower than [origin] response_timeout → 504, and the client does not hang.
#[actix_web::test]
async fn slow_origin_is_504() {
    let origin = TestOrigin::start().await;
    origin.fixed("/slow", Reply::ok("late").delay(Duration::from_secs(3)));
    let proxy = TestProxy::start_with(&origin, "[origin]\nresponse_timeout = \"300ms\"\n").await;
    let started = std::time::Instant::now();
    let r = get(&proxy.url("/slow"), &[]).await;
    assert_eq!(r.status, 504);
    assert!(started.elapsed() < Duration::from_secs(2));
}

// RFC 5861 §3: inside stale-while-revalidate the stale copy is served at once and one
// background refresh replaces it.
#[actix_web::test]
async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    let origin = TestOrigin::start().await;
    origin.route("/swr", |_, n| {
        Reply::ok(format!("v{n}"))
            .header("cache-control", "max-age=10, stale-while-revalidate=60")
            .delay(if n > 1 {
                Duration::from_millis(300)
            } else {
                Duration::ZERO
            })
    });
    let proxy = TestProxy::start(&origin).await;
    assert_eq!(get(&proxy.url("/swr"), &[]).await.text(), "v1");
    proxy.advance(Duration::from_secs(20));
    let started = std::time::Instant::now();
    let stale = get(&proxy.url("/swr"), &[]).await;
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "stale answer waited for the origin"
    );
    assert_eq!(stale.text(), "v1");
    assert!(
        stale
            .cache_status()
            .contains("detail=stale-while-revalidate"),
        "{}",
        stale.cache_status()
    );
    let also_stale = get(&proxy.url("/swr"), &[]).await;
    assert_eq!(also_stale.text(), "v1");
    // Let the single refresh land.
    for _ in 0..50 {
        if get(&proxy.url("/swr"), &[]).await.text() == "v2" {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&proxy.url("/swr"), &[]).await.text(), "v2");
    assert_eq!(origin.hits("/swr"), 2);
}

// RFC 5861 §4: stale-if-error lets the stale copy stand in for a failing origin; without it
// (or with must-revalidate) the error goes through.
#[actix_web::test]
async fn stale_if_error_serves_stale_on_503() {
    let origin = TestOrigin::start().await;
    origin.route("/sie", |_, n| {
        if n == 1 {
            Reply::ok("good").header("cache-control", "max-age=10, stale-if-error=600")
        } else {
            Reply::status(503)
        }
    });
    origin.route("/mr", |_, n| {
        if n == 1 {
            Reply::ok("good").header(
                "cache-control",
                "max-age=10, must-revalidate, stale-if-error=600",
            )
        } else {
            Reply::status(503)
        }
    });
    let proxy = TestProxy::start(&origin).await;
    get(&proxy.url("/sie"), &[]).await;
    get(&proxy.url("/mr"), &[]).await;
    proxy.advance(Duration::from_secs(60));
    let r = get(&proxy.url("/sie"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "good");
    assert!(
        r.cache_status().contains("detail=stale-if-error"),
        "{}",
        r.cache_status()
    );
    let r = get(&proxy.url("/mr"), &[]).await;
    assert_eq!(r.status, 503, "must-revalidate content was served stale");
}

// Set-Cookie responses are not shared by default.
#[actix_web::test]
async fn set_cookie_responses_are_not_shared() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/sc",
        Reply::ok("x")
            .header("cache-control", "max-age=60")
            .header("set-cookie", "id=1"),
    );
    let proxy = TestProxy::start(&origin).await;
    get(&proxy.url("/sc"), &[]).await;
    let r = get(&proxy.url("/sc"), &[]).await;
    assert!(
        r.cache_status().contains("detail=set-cookie"),
        "{}",
        r.cache_status()
    );
    assert_eq!(origin.hits("/sc"), 2);
}

// Review regression: a client whose own request could not be stored (Authorization,
// no-store) revalidating a shared stale entry must not delete it for everyone.
#[actix_web::test]
async fn client_request_fields_do_not_drop_the_shared_entry_on_revalidation() {
    let origin = TestOrigin::start().await;
    origin.route("/shared-etag", |req, _| {
        if req.header("if-none-match") == Some("\"s1\"") {
            Reply::status(304)
                .header("etag", "\"s1\"")
                .header("cache-control", "max-age=10")
        } else {
            Reply::ok("shared")
                .header("etag", "\"s1\"")
                .header("cache-control", "max-age=10")
        }
    });
    let proxy = TestProxy::start(&origin).await;
    get(&proxy.url("/shared-etag"), &[]).await;
    proxy.advance(Duration::from_secs(30));
    let r = get(
        &proxy.url("/shared-etag"),
        &[("authorization", "Bearer x"), ("cache-control", "no-store")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "shared");
    let after = get(&proxy.url("/shared-etag"), &[]).await;
    assert!(
        after.cache_status().starts_with("larder; hit"),
        "entry was dropped: {}",
        after.cache_status()
    );
    assert_eq!(origin.hits("/shared-etag"), 2);
}

// RFC 9111 §5.1 (review regression): a forwarded response keeps the Age its upstream gave it.
#[actix_web::test]
async fn forwarded_response_keeps_upstream_age() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/aged",
        Reply::ok("x")
            .header("age", "3000")
            .header("cache-control", "max-age=3600"),
    );
    origin.fixed(
        "/aged-pass",
        Reply::ok("x")
            .header("age", "77")
            .header("cache-control", "no-store"),
    );
    let proxy = TestProxy::start(&origin).await;
    assert_eq!(
        get(&proxy.url("/aged"), &[]).await.header("age"),
        Some("3000")
    );
    assert_eq!(
        get(&proxy.url("/aged-pass"), &[]).await.header("age"),
        Some("77")
    );
}

// ---- Raw-socket origins, for what an actix origin cannot be made to do (stall, cut chunked
// framing, send hop-by-hop fields) and for watching a request body arrive.

/// Accepts up to `max` connections on 127.0.0.1:0, each handled on its own thread by `serve`,
/// which gets the stream and the request head (everything up to the blank line). Returns the
/// address and a counter of the connections accepted.
fn raw_origin(
    max: usize,
    serve: impl Fn(std::net::TcpStream, String) + Send + Sync + 'static,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::io::Read;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let serve = std::sync::Arc::new(serve);
    std::thread::spawn(move || {
        for stream in listener.incoming().take(max) {
            let Ok(mut stream) = stream else { return };
            count.fetch_add(1, Ordering::SeqCst);
            let serve = serve.clone();
            std::thread::spawn(move || {
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                serve(stream, String::from_utf8_lossy(&head).into_owned());
            });
        }
    });
    (addr, accepted)
}

/// Larder (in-process, port 0, temp dir) in front of an origin at `addr`; stops when dropped
/// with the test's actix system.
struct RawProxy {
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

fn proxy_for(addr: std::net::SocketAddr, extra_toml: &str) -> RawProxy {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(&format!("http://{addr}"), dir.path(), extra_toml);
    let clock = std::sync::Arc::new(larder::clock::SystemClock);
    let larder = larder::server::Larder::start(&config, clock).expect("larder starts");
    let addr = larder.proxy_addr();
    actix_web::rt::spawn(larder.run());
    RawProxy { addr, _dir: dir }
}

/// Sends `request` on a new connection to `addr` (blocking; call from spawn_blocking).
fn raw_request(addr: std::net::SocketAddr, request: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    s
}

/// Reads a raw HTTP/1.1 response to EOF (or a reset, or `limit`), with the time it took.
fn read_all(stream: &mut std::net::TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    use std::io::Read;
    let started = std::time::Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return (out, started.elapsed()),
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// True if the raw response's head has a field `name` (case-insensitive).
fn has_field(raw: &str, name: &str) -> bool {
    let head = raw.split("\r\n\r\n").next().unwrap_or("");
    head.lines()
        .skip(1)
        .any(|l| l.to_ascii_lowercase().starts_with(&format!("{name}:")))
}

// An origin that sends part of a body and then goes quiet: the client is cut off within
// [origin] body_timeout (it never hangs), and the partial body is not stored. Both framings.
#[actix_web::test]
async fn body_stalled_mid_way_cuts_the_client_and_stores_nothing() {
    for chunked in [false, true] {
        let (origin, accepted) = raw_origin(4, move |mut s, _head| {
            use std::io::Write;
            let part = "x".repeat(400);
            let head = if chunked {
                format!(
                    "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{part}\r\n",
                    part.len()
                )
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 1000\r\n\r\n{part}"
                )
            };
            let _ = s.write_all(head.as_bytes());
            // Stall far longer than the body timeout below, then give up.
            std::thread::sleep(Duration::from_secs(6));
        });
        let proxy = proxy_for(origin, "[origin]\nbody_timeout = \"300ms\"\n");
        let addr = proxy.addr;
        let (raw, took) = tokio::task::spawn_blocking(move || {
            let mut s = raw_request(
                addr,
                "GET /stall HTTP/1.1\r\nHost: stall.example\r\nConnection: close\r\n\r\n",
            );
            read_all(&mut s, Duration::from_secs(8))
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "chunked={chunked}: {text}"
        );
        assert!(
            took < Duration::from_secs(4),
            "chunked={chunked}: the client waited {took:?} for a stalled origin"
        );
        let body = crate::ops::body_of(&raw);
        assert!(
            body.as_ref().is_none_or(|b| b.len() < 1000),
            "chunked={chunked}: a stalled body looked complete: {text}"
        );
        // Not stored: the next request goes to the origin again.
        let (raw, _) = tokio::task::spawn_blocking(move || {
            let mut s = raw_request(
                addr,
                "GET /stall HTTP/1.1\r\nHost: stall.example\r\nConnection: close\r\n\r\n",
            );
            read_all(&mut s, Duration::from_secs(8))
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&raw);
        assert!(!text.contains("larder; hit"), "chunked={chunked}: {text}");
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "chunked={chunked}"
        );
    }
}

// A chunked body the origin cuts off (no last-chunk) is not stored, and the client's chunked
// framing is cut too, so it cannot mistake the part for the whole (RFC 9112 §7.1).
#[actix_web::test]
async fn cut_chunked_body_is_not_stored() {
    let (origin, accepted) = raw_origin(4, |mut s, _| {
        use std::io::Write;
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n",
        );
        // Closing here, without "0\r\n\r\n", cuts the body.
    });
    let proxy = proxy_for(origin, "");
    let addr = proxy.addr;
    let fetch = move || {
        let mut s = raw_request(
            addr,
            "GET /cut HTTP/1.1\r\nHost: cut.example\r\nConnection: close\r\n\r\n",
        );
        read_all(&mut s, Duration::from_secs(8)).0
    };
    let first = tokio::task::spawn_blocking(fetch).await.unwrap();
    let text = String::from_utf8_lossy(&first).into_owned();
    // The cut may come before the head left the proxy (then the connection just closes);
    // what must never happen is a clean end.
    if !text.is_empty() {
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            has_field(&text, "transfer-encoding"),
            "unknown length stays chunked: {text}"
        );
        assert_eq!(
            crate::ops::body_of(&first),
            None,
            "the client saw a clean end of a cut body: {text}"
        );
    }
    let second = tokio::task::spawn_blocking(fetch).await.unwrap();
    let text = String::from_utf8_lossy(&second);
    assert!(
        !text.contains("larder; hit"),
        "a cut chunked body was stored: {text}"
    );
    // Not stored: the second request went to the origin too.
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}

// RFC 9110 §7.6.1: hop-by-hop fields of the origin's response (Connection and the fields it
// names, Keep-Alive, Proxy-Connection, TE, Trailer, Upgrade) and, since Larder does no proxy
// authentication, Proxy-Authenticate (§11.7.1) are neither relayed nor stored.
#[actix_web::test]
async fn hop_by_hop_response_fields_are_removed() {
    let (origin, accepted) = raw_origin(4, |mut s, _| {
        use std::io::Write;
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 2\r\n\
              Connection: close, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n\
              Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-Sum\r\nUpgrade: h2c\r\n\
              Proxy-Authenticate: Basic realm=\"origin\"\r\nX-End: kept\r\n\r\nok",
        );
    });
    let proxy = proxy_for(origin, "");
    let addr = proxy.addr;
    let fetch = move || {
        let mut s = raw_request(
            addr,
            "GET /hop HTTP/1.1\r\nHost: hop.example\r\nConnection: close\r\n\r\n",
        );
        String::from_utf8_lossy(&read_all(&mut s, Duration::from_secs(8)).0).into_owned()
    };
    let miss = tokio::task::spawn_blocking(fetch).await.unwrap();
    let hit = tokio::task::spawn_blocking(fetch).await.unwrap();
    assert!(miss.contains("fwd=miss"), "{miss}");
    assert!(hit.contains("larder; hit"), "{hit}");
    for (which, raw) in [("miss", &miss), ("hit", &hit)] {
        assert!(raw.ends_with("\r\n\r\nok"), "{which}: {raw}");
        assert!(
            has_field(raw, "x-end"),
            "{which}: end-to-end field lost: {raw}"
        );
        for name in [
            "x-hop",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "upgrade",
            "proxy-authenticate",
        ] {
            assert!(!has_field(raw, name), "{which}: {name} relayed: {raw}");
        }
        // Ours, for the client's own `Connection: close`; never the origin's option list.
        assert!(
            !raw.to_ascii_lowercase().contains("x-hop"),
            "{which}: {raw}"
        );
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

// RFC 9110 §7.6.3: Via is appended to, never replaced; so is X-Forwarded-For (its de-facto
// rule), for cache fetches and passes alike.
#[actix_web::test]
async fn existing_forwarding_fields_are_appended_to() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/xff",
        Reply::ok("ok").header("cache-control", "max-age=600"),
    );
    let proxy = TestProxy::start(&origin).await;
    let fields = [("x-forwarded-for", "192.0.2.7"), ("via", "1.0 edge")];
    get(&proxy.url("/xff"), &fields).await;
    try_send(
        "POST",
        &proxy.url("/xff"),
        &fields,
        Bytes::from_static(b"p"),
    )
    .await
    .unwrap();
    let seen = origin.seen("/xff");
    assert_eq!(seen.len(), 2);
    for (req, method) in seen.iter().zip(["GET", "POST"]) {
        assert_eq!(req.method, method);
        assert_eq!(
            req.header("x-forwarded-for"),
            Some("192.0.2.7, 127.0.0.1"),
            "{method}"
        );
        assert_eq!(req.header("via"), Some("1.0 edge, 1.1 larder"), "{method}");
    }
}

// A HEAD for an unstored URL bypasses the cache: it is labelled `fwd=request` (RFC 9211 §2.2,
// "the request itself"), counted as a pass, and stores nothing.
#[actix_web::test]
async fn head_miss_is_a_pass_labelled_fwd_request() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/hm",
        Reply::ok("0123456789").header("cache-control", "max-age=600"),
    );
    let proxy = TestProxy::start(&origin).await;
    let metrics = |admin| async move {
        let text = get(&format!("http://{admin}/metrics"), &[]).await.text();
        crate::ops::parse_exposition(&text)
    };
    let before = metrics(proxy.admin_addr).await;
    let head = send("HEAD", &proxy.url("/hm"), &[]).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.cache_status(), "larder; fwd=request; fwd-status=200");
    let after = metrics(proxy.admin_addr).await;
    let moved = |s: &str| after[s] - before.get(s).copied().unwrap_or(0.0);
    assert_eq!(moved("larder_requests_total{result=\"pass\"}"), 1.0);
    assert_eq!(moved("larder_requests_total{result=\"miss\"}"), 0.0);
    assert_eq!(moved("larder_origin_fetches_total"), 1.0);
    // Nothing stored: the GET after it is a miss.
    let r = get(&proxy.url("/hm"), &[]).await;
    assert_eq!(r.cache_status(), "larder; fwd=miss; fwd-status=200; stored");
    assert_eq!(origin.hits("/hm"), 2);
}

// An origin that cannot be connected to within [origin] connect_timeout answers 502 like a
// refused connection (RFC 9110 §15.6.3), quickly, not the response timeout's 504.
#[actix_web::test]
async fn connect_timeout_is_502() {
    // A listener that never accepts: once its accept queue is full the kernel drops further
    // SYNs, so a new connection neither succeeds nor fails until the connector gives up.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::task::spawn_blocking(move || {
        let mut held = Vec::new();
        for _ in 0..2000 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => held.push(s),
                Err(_) => return held,
            }
        }
        panic!("the accept queue never filled");
    })
    .await
    .unwrap();
    let proxy = proxy_for(
        addr,
        "[origin]\nconnect_timeout = \"300ms\"\nresponse_timeout = \"20s\"\n",
    );
    let started = std::time::Instant::now();
    let r = get(&format!("http://{}/ct", proxy.addr), &[]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.cache_status().contains("detail=origin-unreachable"),
        "{}",
        r.cache_status()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop((held, listener));
}

/// An origin that reads a chunked request body as it arrives into `got`, then answers 201
/// (or, with `answer` false, never answers).
fn upload_origin(
    got: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    answer: bool,
) -> std::net::SocketAddr {
    raw_origin(2, move |mut s, head| {
        use std::io::{Read, Write};
        assert!(
            head.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "the upload reached the origin unchunked: {head}"
        );
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let mut all = got.lock().unwrap();
                    all.extend_from_slice(&buf[..n]);
                    if all.ends_with(b"0\r\n\r\n") {
                        break;
                    }
                }
            }
        }
        if answer {
            let _ = s.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok");
        } else {
            std::thread::sleep(Duration::from_secs(6));
        }
    })
    .0
}

/// The data of a chunked body as far as it has arrived.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let Ok(size) = usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap_or("x"), 16)
        else {
            break;
        };
        let data = &raw[eol + 2..];
        let take = size.min(data.len());
        out.extend_from_slice(&data[..take]);
        if size == 0 || data.len() < size + 2 {
            break;
        }
        raw = &data[size + 2..];
    }
    out
}

/// Upload parts big enough to pass awc's 8 KiB write buffer, which holds smaller pieces
/// until it fills or the body ends (so a request body streams in pieces of at least that).
fn upload_parts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("part-{i};{}", "u".repeat(9000)))
        .collect()
}

/// Sends a chunked PUT of `parts`, `gap` apart; before the second part, waits until the origin
/// has the first (so the body is streamed, not buffered until its end).
fn slow_upload(
    proxy: std::net::SocketAddr,
    parts: &[String],
    gap: Duration,
    got: &std::sync::Mutex<Vec<u8>>,
) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = raw_request(
        proxy,
        "PUT /up HTTP/1.1\r\nHost: up.example\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    );
    for (i, part) in parts.iter().enumerate() {
        write!(s, "{:x}\r\n{part}\r\n", part.len()).unwrap();
        if i == 0 {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !String::from_utf8_lossy(&dechunk(&got.lock().unwrap())).contains(part) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the first chunk did not reach the origin before the upload ended"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        std::thread::sleep(gap);
    }
    s.write_all(b"0\r\n\r\n").unwrap();
    s
}

// A chunked upload is streamed to the origin as it arrives, and an upload that takes longer
// than [origin] response_timeout to a healthy origin is not cut: the timeout counts from the
// request's last progress, not from its start.
#[actix_web::test]
async fn slow_chunked_upload_is_streamed_and_not_timed_out() {
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let origin = upload_origin(got.clone(), true);
    let proxy = proxy_for(origin, "[origin]\nresponse_timeout = \"1s\"\n");
    let addr = proxy.addr;
    let parts = upload_parts(5);
    let sent = parts.clone();
    let seen = got.clone();
    let (raw, took) = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut s = slow_upload(addr, &sent, Duration::from_millis(350), &seen);
        let (raw, _) = read_all(&mut s, Duration::from_secs(10));
        (raw, started.elapsed())
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(
        took > Duration::from_millis(1500),
        "the upload was meant to outlast response_timeout: {took:?}"
    );
    assert!(text.starts_with("HTTP/1.1 201"), "{text}");
    assert!(text.ends_with("ok"), "{text}");
    let received = String::from_utf8_lossy(&dechunk(&got.lock().unwrap())).into_owned();
    assert!(received == parts.concat(), "the origin got another body");
}

// After the upload is complete, response_timeout still bounds the wait for the answer: 504.
#[actix_web::test]
async fn response_timeout_still_applies_after_an_upload() {
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let origin = upload_origin(got.clone(), false);
    let proxy = proxy_for(origin, "[origin]\nresponse_timeout = \"500ms\"\n");
    let addr = proxy.addr;
    let seen = got.clone();
    let (raw, after_upload) = tokio::task::spawn_blocking(move || {
        let mut s = slow_upload(addr, &upload_parts(2), Duration::from_millis(100), &seen);
        let sent = std::time::Instant::now();
        let (raw, _) = read_all(&mut s, Duration::from_secs(10));
        (raw, sent.elapsed())
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");
    assert!(
        after_upload < Duration::from_secs(3),
        "answered {after_upload:?} after the upload"
    );
}
