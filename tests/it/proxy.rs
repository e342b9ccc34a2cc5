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
