//! No thundering herd: concurrent misses share one origin fetch, uncacheable answers release the waiters, stale content shields a slow or failing origin.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;

use crate::support::*;

/// Fires `n` concurrent GETs and returns (response, latency) for each.
async fn herd(url: &str, n: usize) -> Vec<(Result<Got, String>, Duration)> {
    join_all((0..n).map(|_| async move {
        let started = Instant::now();
        let r = try_send("GET", url, &[], Bytes::new()).await;
        (r, started.elapsed())
    }))
    .await
}

// 100 concurrent cold requests cost the origin one fetch; every client gets the same body,
// and the waiters are released when the response arrives, not after a polling delay.
#[actix_web::test]
async fn concurrent_misses_make_one_origin_fetch() {
    let origin = TestOrigin::start().await;
    let body = Bytes::from((0..20_000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    origin.fixed(
        "/cold",
        Reply::ok(body.clone())
            .header("cache-control", "max-age=600")
            .delay(Duration::from_millis(300)),
    );
    let proxy = TestProxy::start(&origin).await;
    let results = herd(&proxy.url("/cold"), 100).await;
    assert_eq!(origin.hits("/cold"), 1);
    let mut collapsed = 0;
    for (r, latency) in &results {
        let got = r.as_ref().expect("every request answered");
        assert_eq!(got.status, 200);
        assert!(got.body == body, "a client got different bytes");
        // Generous bound for a shared 2-core machine; the bench measures it tightly.
        assert!(
            *latency < Duration::from_millis(300 + 1500),
            "waited {latency:?}"
        );
        if got.cache_status().contains("collapsed") {
            collapsed += 1;
        }
    }
    assert!(collapsed >= 90, "only {collapsed} requests were collapsed");
    // And then it is simply a hit.
    assert!(
        get(&proxy.url("/cold"), &[])
            .await
            .cache_status()
            .starts_with("larder; hit")
    );
}

// A response that turns out not storable releases the waiters to fetch on their own; nobody
// hangs, each gets its own answer, and the URL is then fetched per request (hit-for-miss).
#[actix_web::test]
async fn uncacheable_response_releases_the_herd() {
    let origin = TestOrigin::start().await;
    origin.route("/private", |_, n| {
        Reply::ok(format!("for request {n}"))
            .header("cache-control", "private")
            .delay(Duration::from_millis(200))
    });
    let proxy = TestProxy::start(&origin).await;
    let results = herd(&proxy.url("/private"), 20).await;
    assert_eq!(
        origin.hits("/private"),
        20,
        "each client must get its own private answer"
    );
    let mut bodies: Vec<String> = results
        .iter()
        .map(|(r, _)| r.as_ref().unwrap().text())
        .collect();
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), 20, "a private response was shared");
    // The next herd is not serialized behind one fetch: it runs in parallel.
    let started = Instant::now();
    let again = herd(&proxy.url("/private"), 10).await;
    assert!(again.iter().all(|(r, _)| r.as_ref().unwrap().status == 200));
    assert!(
        started.elapsed() < Duration::from_millis(200 * 5),
        "herd serialized: {:?}",
        started.elapsed()
    );
    assert_eq!(origin.hits("/private"), 30);
}

// Waiters stream along with a body that arrives slowly: they see the first bytes long before
// the origin finishes, and all get the exact bytes.
#[actix_web::test]
async fn waiters_stream_a_slow_body_as_it_arrives() {
    let origin = TestOrigin::start().await;
    let chunks: Vec<Bytes> = (0..5)
        .map(|i| Bytes::from(vec![b'a' + i as u8; 10_000]))
        .collect();
    let whole: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    origin.fixed(
        "/slow-body",
        Reply::ok("")
            .header("cache-control", "max-age=600")
            .body(Body::Slow {
                chunks,
                pause: Duration::from_millis(200),
            }),
    );
    let proxy = TestProxy::start(&origin).await;
    let url = proxy.url("/slow-body");
    let firsts = join_all((0..5).map(|_| {
        let url = url.clone();
        async move {
            let started = Instant::now();
            let mut resp = client().get(&url).send().await.unwrap();
            use futures_util::StreamExt;
            let mut first_byte = None;
            let mut got = Vec::new();
            while let Some(chunk) = resp.next().await {
                let chunk = chunk.unwrap();
                if first_byte.is_none() && !chunk.is_empty() {
                    first_byte = Some(started.elapsed());
                }
                got.extend_from_slice(&chunk);
            }
            (first_byte.unwrap(), started.elapsed(), got)
        }
    }))
    .await;
    assert_eq!(origin.hits("/slow-body"), 1);
    for (first, total, got) in firsts {
        assert!(got == whole, "wrong bytes");
        assert!(
            first + Duration::from_millis(350) < total,
            "first byte {first:?} only at the end {total:?}"
        );
    }
}

// The leader's client hanging up does not cancel the fetch: the waiters still get the body and
// the response is stored.
#[actix_web::test]
async fn leader_client_disconnect_does_not_hurt_waiters() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/abandon",
        Reply::ok("complete body")
            .header("cache-control", "max-age=600")
            .delay(Duration::from_millis(400)),
    );
    let proxy = TestProxy::start(&origin).await;
    // The first client gives up after 100 ms, long before the origin answers.
    let quitter = awc::Client::builder()
        .timeout(Duration::from_millis(100))
        .finish();
    let quit = quitter.get(proxy.url("/abandon")).send().await;
    assert!(quit.is_err(), "the impatient client should have timed out");
    let results = herd(&proxy.url("/abandon"), 10).await;
    for (r, _) in &results {
        assert_eq!(r.as_ref().unwrap().text(), "complete body");
    }
    assert_eq!(origin.hits("/abandon"), 1);
    assert!(
        get(&proxy.url("/abandon"), &[])
            .await
            .cache_status()
            .starts_with("larder; hit")
    );
}

// A leader whose origin times out does not leave waiters hanging: all get 504 within the
// response timeout (plus slack).
#[actix_web::test]
async fn waiters_of_a_failed_fetch_get_the_error_in_bounded_time() {
    let origin = TestOrigin::start().await;
    origin.fixed("/hang", Reply::ok("too late").delay(Duration::from_secs(5)));
    let proxy = TestProxy::start_with(&origin, "[origin]\nresponse_timeout = \"500ms\"\n").await;
    let started = Instant::now();
    let results = herd(&proxy.url("/hang"), 20).await;
    for (r, latency) in &results {
        assert_eq!(r.as_ref().unwrap().status, 504);
        assert!(*latency < Duration::from_millis(500 + 1500), "{latency:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        origin.hits("/hang"),
        1,
        "the herd should have shared the failing fetch"
    );
}

// RFC 5861 §3: inside stale-while-revalidate, concurrent stale requests are all answered at
// once and cause exactly one origin request.
#[actix_web::test]
async fn stale_while_revalidate_herd_makes_one_refresh() {
    let origin = TestOrigin::start().await;
    origin.route("/swr-herd", |_, n| {
        Reply::ok(format!("v{n}"))
            .header("cache-control", "max-age=10, stale-while-revalidate=600")
            .delay(if n > 1 {
                Duration::from_millis(500)
            } else {
                Duration::ZERO
            })
    });
    let proxy = TestProxy::start(&origin).await;
    get(&proxy.url("/swr-herd"), &[]).await;
    proxy.advance(Duration::from_secs(30));
    let results = herd(&proxy.url("/swr-herd"), 50).await;
    for (r, latency) in &results {
        let got = r.as_ref().unwrap();
        assert_eq!(got.text(), "v1");
        assert!(
            *latency < Duration::from_millis(500),
            "stale answer waited {latency:?}"
        );
    }
    for _ in 0..100 {
        if get(&proxy.url("/swr-herd"), &[]).await.text() == "v2" {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&proxy.url("/swr-herd"), &[]).await.text(), "v2");
    assert_eq!(origin.hits("/swr-herd"), 2);
}

// RFC 5861 §4: with the origin down (port closed), stale-if-error content is served.
#[actix_web::test]
async fn stale_if_error_serves_stale_while_origin_is_down() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/down",
        Reply::ok("kept").header("cache-control", "max-age=10, stale-if-error=600"),
    );
    origin.fixed(
        "/down-no-sie",
        Reply::ok("gone").header("cache-control", "max-age=10"),
    );
    let proxy = TestProxy::start(&origin).await;
    get(&proxy.url("/down"), &[]).await;
    get(&proxy.url("/down-no-sie"), &[]).await;
    origin.stop().await;
    proxy.advance(Duration::from_secs(60));
    let r = get(&proxy.url("/down"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "kept");
    assert!(
        r.cache_status().contains("detail=stale-if-error"),
        "{}",
        r.cache_status()
    );
    // Without permission the error goes through: no silent grace.
    assert_eq!(get(&proxy.url("/down-no-sie"), &[]).await.status, 502);
}

// [cache] default_stale_if_error gives stale-if-error to origins that send none.
#[actix_web::test]
async fn operator_default_stale_if_error() {
    let origin = TestOrigin::start().await;
    origin.route("/dflt", |_, n| {
        if n == 1 {
            Reply::ok("old").header("cache-control", "max-age=10")
        } else {
            Reply::status(500)
        }
    });
    let proxy = TestProxy::start_with(&origin, "[cache]\ndefault_stale_if_error = \"5m\"\n").await;
    get(&proxy.url("/dflt"), &[]).await;
    proxy.advance(Duration::from_secs(60));
    let r = get(&proxy.url("/dflt"), &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "old"));
}

// Coalescing counters move on the admin /metrics endpoint.
#[actix_web::test]
async fn coalescing_is_counted_in_metrics() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/m",
        Reply::ok("m")
            .header("cache-control", "max-age=600")
            .delay(Duration::from_millis(200)),
    );
    let proxy = TestProxy::start(&origin).await;
    herd(&proxy.url("/m"), 10).await;
    let text = get(&format!("http://{}/metrics", proxy.admin_addr), &[])
        .await
        .text();
    let value = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in {text}"))
    };
    assert_eq!(value("larder_origin_fetches_total"), 1);
    assert_eq!(value("larder_coalesced_waits_total"), 9);
}

// Review regression: a background refresh whose answer is not shared (the origin turned the
// URL private) must not leave the URL's fetch wedged: the next stale hit refreshes again.
#[actix_web::test]
async fn unshared_background_refresh_does_not_wedge_the_url() {
    let origin = TestOrigin::start().await;
    origin.route("/turns-private", |_, n| {
        if n == 1 {
            Reply::ok("public v1").header("cache-control", "max-age=10, stale-while-revalidate=600")
        } else {
            // Large enough to fill any channel buffer if nobody reads it.
            Reply::ok(vec![b'p'; 4 << 20]).header("cache-control", "private")
        }
    });
    let proxy = TestProxy::start(&origin).await;
    get(&proxy.url("/turns-private"), &[]).await;
    proxy.advance(Duration::from_secs(30));
    assert_eq!(
        get(&proxy.url("/turns-private"), &[]).await.text(),
        "public v1"
    );
    for _ in 0..100 {
        if origin.hits("/turns-private") == 2 {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    actix_web::rt::time::sleep(Duration::from_millis(300)).await;
    // Still stale-while-revalidate: served at once, and a new refresh can start.
    assert_eq!(
        get(&proxy.url("/turns-private"), &[]).await.text(),
        "public v1"
    );
    for _ in 0..100 {
        if origin.hits("/turns-private") >= 3 {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        origin.hits("/turns-private") >= 3,
        "the URL's refresh stayed wedged"
    );
}

// Review regression: an origin error carrying Set-Cookie (or private) is never handed to
// other waiters; each gets its own answer.
#[actix_web::test]
async fn personal_error_responses_are_not_shared_with_waiters() {
    let origin = TestOrigin::start().await;
    origin.route("/err-cookie", |_, n| {
        Reply::status(500)
            .header("set-cookie", &format!("session={n}"))
            .delay(Duration::from_millis(200))
    });
    let proxy = TestProxy::start(&origin).await;
    let results = herd(&proxy.url("/err-cookie"), 10).await;
    let mut cookies: Vec<String> = results
        .iter()
        .map(|(r, _)| {
            r.as_ref()
                .unwrap()
                .header("set-cookie")
                .unwrap_or("")
                .to_string()
        })
        .collect();
    cookies.sort();
    cookies.dedup();
    assert_eq!(
        cookies.len(),
        10,
        "a session cookie was shared: {cookies:?}"
    );
    assert_eq!(origin.hits("/err-cookie"), 10);
}
