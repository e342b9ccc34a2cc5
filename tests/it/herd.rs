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
    let t0 = Instant::now();
    let results = join_all((0..100).map(|_| async {
        let started = Instant::now();
        let r = try_send("GET", &proxy.url("/cold"), &[], Bytes::new()).await;
        (r, started.elapsed(), t0.elapsed())
    }))
    .await;
    assert_eq!(origin.hits("/cold"), 1);
    let mut collapsed = 0;
    let (mut first, mut last) = (Duration::MAX, Duration::ZERO);
    for (r, latency, finished) in &results {
        let got = r.as_ref().expect("every request answered");
        assert_eq!(got.status, 200);
        assert!(got.body == body, "a client got different bytes");
        // No hang; generous for a shared 2-core machine (the bench measures it tightly).
        assert!(
            *latency < Duration::from_millis(300 + 700),
            "waited {latency:?}"
        );
        (first, last) = (first.min(*finished), last.max(*finished));
        if got.cache_status().contains("collapsed") {
            collapsed += 1;
        }
    }
    // Everyone is woken the moment the response arrives, so all finish together. A design
    // that polls every 500 ms (nginx's proxy_cache_lock) finishes its waiters at least 200 ms
    // after the leader's 300 ms fetch; machine slowness shifts all finishes alike.
    assert!(
        last - first < Duration::from_millis(150),
        "finishes spread over {:?} ({first:?} to {last:?})",
        last - first
    );
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
// response timeout (plus slack), and the URL is not left wedged.
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
    // The failed flight is over (its lead task's guard detached it): the next request asks the
    // origin again instead of being handed the old failure.
    origin.fixed("/hang", Reply::ok("back"));
    assert_eq!(get(&proxy.url("/hang"), &[]).await.text(), "back");
    assert_eq!(origin.hits("/hang"), 2);
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
    assert_eq!(metric(&proxy, "larder_origin_fetches_total").await, 1);
    assert_eq!(metric(&proxy, "larder_coalesced_waits_total").await, 9);
}

/// One counter from the admin listener's `/metrics`.
async fn metric(proxy: &TestProxy, name: &str) -> u64 {
    let text = get(&format!("http://{}/metrics", proxy.admin_addr), &[])
        .await
        .text();
    text.lines()
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in {text}"))
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

/// Reads a response to the end; the body, or the error that cut it.
async fn read_all(url: &str, headers: &[(&str, &str)]) -> Result<Got, String> {
    try_send("GET", url, headers, Bytes::new()).await
}

/// `chunks` chunks of `size` bytes, each filled with its own letter.
fn lettered(chunks: usize, size: usize) -> Vec<Bytes> {
    (0..chunks)
        .map(|i| Bytes::from(vec![b'a' + i as u8; size]))
        .collect()
}

// Hit-for-miss: after a herd finds a URL uncacheable, the next herd goes to the origin in
// parallel (≈ one origin delay). The control without that memory queues the next herd behind
// one more shared fetch first (≥ two origin delays), which is what the memory prevents.
#[actix_web::test]
async fn hit_for_miss_memory_keeps_the_next_herd_parallel() {
    const DELAY: Duration = Duration::from_millis(300);
    let second_herd = |remember: &'static str| async move {
        let origin = TestOrigin::start().await;
        origin.route("/hfm", |_, n| {
            Reply::ok(format!("for request {n}"))
                .header("cache-control", "private")
                .delay(DELAY)
        });
        let toml = format!("[cache]\nremember_uncacheable = \"{remember}\"\n");
        let proxy = TestProxy::start_with(&origin, &toml).await;
        herd(&proxy.url("/hfm"), 10).await;
        let started = Instant::now();
        let again = herd(&proxy.url("/hfm"), 10).await;
        let took = started.elapsed();
        assert!(again.iter().all(|(r, _)| r.as_ref().unwrap().status == 200));
        assert_eq!(origin.hits("/hfm"), 20);
        took
    };
    let remembered = second_herd("30s").await;
    let forgotten = second_herd("0s").await;
    assert!(
        remembered < DELAY * 2,
        "with hit-for-miss the herd ran serialized: {remembered:?}"
    );
    assert!(
        forgotten >= DELAY * 2,
        "control: without the memory the herd should queue first: {forgotten:?}"
    );
}

// RFC 9111 §5.2.2.5: a no-store answer is not shared; every waiter gets its own fetch.
#[actix_web::test]
async fn no_store_releases_the_herd() {
    let origin = TestOrigin::start().await;
    origin.route("/ns", |_, n| {
        Reply::ok(format!("answer {n}"))
            .header("cache-control", "no-store")
            .delay(Duration::from_millis(200))
    });
    let proxy = TestProxy::start(&origin).await;
    let results = herd(&proxy.url("/ns"), 10).await;
    let mut bodies: Vec<String> = results
        .iter()
        .map(|(r, latency)| {
            assert!(*latency < Duration::from_secs(3), "{latency:?}");
            r.as_ref().unwrap().text()
        })
        .collect();
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), 10, "a no-store answer was shared");
    assert_eq!(origin.hits("/ns"), 10);
}

// RFC 9111 §4.1: a herd mixing Accept-Encoding values for a URL that varies on it costs one
// origin fetch per variant, not per request; each client gets its own variant's bytes.
#[actix_web::test]
async fn a_mixed_vary_herd_costs_one_fetch_per_variant() {
    let origin = TestOrigin::start().await;
    origin.route("/mixed", |seen, _| {
        let ae = seen.header("accept-encoding").unwrap_or("none").to_string();
        Reply::ok(format!("encoded as {ae}"))
            .header("cache-control", "max-age=600")
            .header("vary", "accept-encoding")
            .delay(Duration::from_millis(300))
    });
    let proxy = TestProxy::start(&origin).await;
    let url = proxy.url("/mixed");
    let kinds = ["gzip", "identity", "br"];
    let results = join_all((0..30).map(|i| {
        let url = url.clone();
        let ae = kinds[i % 3];
        async move { (ae, read_all(&url, &[("accept-encoding", ae)]).await) }
    }))
    .await;
    for (ae, r) in &results {
        let got = r.as_ref().expect("answered");
        assert_eq!(got.text(), format!("encoded as {ae}"));
    }
    assert_eq!(origin.hits("/mixed"), 3, "one fetch per distinct variant");
}

// Connection refused: every request of the herd gets a 502 promptly; nobody hangs.
#[actix_web::test]
async fn a_herd_against_a_refusing_origin_gets_502_promptly() {
    let origin = TestOrigin::start().await;
    let proxy = TestProxy::start(&origin).await;
    origin.stop().await;
    let results = herd(&proxy.url("/refused"), 20).await;
    for (r, latency) in &results {
        let got = r.as_ref().expect("answered");
        assert_eq!(got.status, 502);
        assert!(
            got.cache_status().contains("detail=origin-unreachable"),
            "{}",
            got.cache_status()
        );
        assert!(*latency < Duration::from_secs(3), "{latency:?}");
    }
}

// The origin breaks the body off mid-way while a herd streams it: every client's response is
// cut (never a clean short body), nobody hangs, and nothing is stored.
#[actix_web::test]
async fn an_origin_cut_mid_body_cuts_every_waiter_and_stores_nothing() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/cut",
        Reply::ok("")
            .header("cache-control", "max-age=600")
            .delay(Duration::from_millis(200))
            .body(Body::CutShort {
                declared: 100_000,
                sent: Bytes::from(vec![b'c'; 10_000]),
            }),
    );
    let proxy = TestProxy::start(&origin).await;
    let results = herd(&proxy.url("/cut"), 10).await;
    // (awc reports a connection closed before Content-Length as a short body, not an error:
    // the announced length is how a client tells.)
    let cut = |r: &Result<Got, String>| match r {
        Err(_) => true,
        Ok(g) => g.header("content-length") == Some("100000") && g.body.len() < 100_000,
    };
    for (r, latency) in &results {
        assert!(cut(r), "a cut body looked complete: {:?}", r.as_ref().ok());
        assert!(*latency < Duration::from_secs(3), "{latency:?}");
    }
    assert_eq!(origin.hits("/cut"), 1, "the herd shared the fetch");
    assert!(cut(&read_all(&proxy.url("/cut"), &[]).await));
    assert_eq!(
        origin.hits("/cut"),
        2,
        "the cut body must not have been stored"
    );
}

// A waiter gives up after coalesce_timeout and fetches on its own; the leader itself is
// bounded only by the origin timeouts, so it does not start a second fetch.
#[actix_web::test]
async fn a_waiter_gives_up_after_coalesce_timeout_but_the_leader_does_not() {
    let origin = TestOrigin::start().await;
    origin.route("/patience", |_, n| {
        let r = Reply::ok(if n == 1 { "slow" } else { "fast" });
        if n == 1 {
            r.delay(Duration::from_millis(900))
        } else {
            r
        }
        .header("cache-control", "max-age=600")
    });
    let proxy = TestProxy::start_with(&origin, "[cache]\ncoalesce_timeout = \"200ms\"\n").await;
    let url = proxy.url("/patience");
    let leader = {
        let url = url.clone();
        async move {
            let started = Instant::now();
            (read_all(&url, &[]).await.unwrap(), started.elapsed())
        }
    };
    let waiter = async {
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        (read_all(&url, &[]).await.unwrap(), started.elapsed())
    };
    let ((lead, lead_took), (wait, wait_took)) = tokio::join!(leader, waiter);
    assert_eq!(wait.text(), "fast", "the waiter should have fetched alone");
    assert!(wait_took >= Duration::from_millis(200), "{wait_took:?}");
    assert!(wait_took < Duration::from_millis(800), "{wait_took:?}");
    assert_eq!(
        lead.text(),
        "slow",
        "the leader must wait for its own fetch"
    );
    assert!(lead_took >= Duration::from_millis(900), "{lead_took:?}");
    assert_eq!(origin.hits("/patience"), 2, "the leader fetched twice");
}

// [cache] coalesce_leader_timeout bounds the shared fetch: the whole herd gets a 504 once it
// passes (from one origin request), and a stale-if-error copy stands in where it may.
#[actix_web::test]
async fn the_leader_fetch_timeout_bounds_the_herd() {
    let origin = TestOrigin::start().await;
    origin.fixed("/sluggish", Reply::ok("late").delay(Duration::from_secs(3)));
    origin.route("/sie-slow", |_, n| {
        let r =
            Reply::ok(format!("v{n}")).header("cache-control", "max-age=10, stale-if-error=600");
        if n == 1 {
            r
        } else {
            r.delay(Duration::from_secs(3))
        }
    });
    let proxy = TestProxy::start_with(
        &origin,
        "[cache]\ncoalesce_leader_timeout = \"300ms\"\n[origin]\nresponse_timeout = \"30s\"\n",
    )
    .await;
    let results = herd(&proxy.url("/sluggish"), 10).await;
    for (r, latency) in &results {
        let got = r.as_ref().unwrap();
        assert_eq!(got.status, 504);
        assert!(
            got.cache_status().contains("detail=origin-timeout"),
            "{}",
            got.cache_status()
        );
        assert!(*latency >= Duration::from_millis(300), "{latency:?}");
        assert!(*latency < Duration::from_millis(300 + 1000), "{latency:?}");
    }
    assert_eq!(origin.hits("/sluggish"), 1);
    // RFC 5861 §4: a timed-out revalidation may serve the stale copy.
    assert_eq!(get(&proxy.url("/sie-slow"), &[]).await.text(), "v1");
    proxy.advance(Duration::from_secs(60));
    let started = Instant::now();
    let got = get(&proxy.url("/sie-slow"), &[]).await;
    assert_eq!(got.text(), "v1");
    assert!(
        got.cache_status().contains("detail=stale-if-error"),
        "{}",
        got.cache_status()
    );
    assert!(started.elapsed() < Duration::from_millis(300 + 1000));
}

// A chunked body that outgrows coalesce_max_body is still delivered whole to the leader and
// to every waiter (nobody is cut for a sharing limit); requests that arrive once it can no
// longer be replayed from memory wait for the stored copy. One origin fetch in all.
#[actix_web::test]
async fn a_body_past_coalesce_max_body_reaches_every_client_from_one_fetch() {
    let origin = TestOrigin::start().await;
    let chunks = lettered(5, 20_000);
    let whole: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    origin.fixed(
        "/big-chunked",
        Reply::ok("")
            .header("cache-control", "max-age=600")
            .body(Body::Slow {
                chunks,
                pause: Duration::from_millis(100),
            }),
    );
    let proxy = TestProxy::start_with(&origin, "[cache]\ncoalesce_max_body = \"16KiB\"\n").await;
    let url = proxy.url("/big-chunked");
    let early = join_all((0..10).map(|_| read_all(&url, &[])));
    let late = async {
        // Mid-body: well past the first chunk, before the last.
        actix_web::rt::time::sleep(Duration::from_millis(250)).await;
        join_all((0..10).map(|_| read_all(&url, &[]))).await
    };
    let (early, late) = tokio::join!(early, late);
    for r in early.iter().chain(&late) {
        let got = r.as_ref().expect("nobody is cut");
        assert_eq!(got.status, 200);
        assert!(
            got.body == whole,
            "wrong bytes ({} of {})",
            got.body.len(),
            whole.len()
        );
    }
    assert!(
        late.iter()
            .all(|r| r.as_ref().unwrap().cache_status().contains("collapsed")),
        "late requests should have shared the fetch"
    );
    assert_eq!(origin.hits("/big-chunked"), 1);
    assert!(
        get(&url, &[])
            .await
            .cache_status()
            .starts_with("larder; hit")
    );
}

// A herd for a body whose Content-Length is above coalesce_max_body still costs one origin
// fetch (the body streams to all waiters, it is written to the store once).
#[actix_web::test]
async fn a_herd_for_a_large_known_length_body_makes_one_fetch() {
    let origin = TestOrigin::start().await;
    let body = Bytes::from(
        (0..300_000u32)
            .map(|i| (i % 253) as u8)
            .collect::<Vec<u8>>(),
    );
    origin.fixed(
        "/large",
        Reply::ok(body.clone())
            .header("cache-control", "max-age=600")
            .delay(Duration::from_millis(200)),
    );
    let proxy = TestProxy::start_with(&origin, "[cache]\ncoalesce_max_body = \"16KiB\"\n").await;
    let results = herd(&proxy.url("/large"), 20).await;
    for (r, _) in &results {
        let got = r.as_ref().expect("answered");
        assert_eq!(got.status, 200);
        assert!(got.body == body, "wrong bytes");
    }
    assert_eq!(origin.hits("/large"), 1);
}

// The shared memory budget is full: a new miss on another URL still reaches its clients in
// full (it stops being replayable from memory, it is not cut).
#[actix_web::test]
async fn a_full_coalescing_budget_never_truncates_a_response() {
    let origin = TestOrigin::start().await;
    let chunks = lettered(5, 40_000);
    let whole: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    for path in ["/budget-a", "/budget-b"] {
        origin.fixed(
            path,
            Reply::ok("")
                .header("cache-control", "max-age=600")
                .body(Body::Slow {
                    chunks: chunks.clone(),
                    pause: Duration::from_millis(80),
                }),
        );
    }
    let proxy = TestProxy::start_with(&origin, "[cache]\ncoalesce_memory = \"100KiB\"\n").await;
    let (a, b) = (proxy.url("/budget-a"), proxy.url("/budget-b"));
    let (ra, rb) = tokio::join!(
        join_all((0..3).map(|_| read_all(&a, &[]))),
        join_all((0..3).map(|_| read_all(&b, &[])))
    );
    for r in ra.iter().chain(&rb) {
        let got = r.as_ref().expect("nobody is cut");
        assert!(
            got.body == whole,
            "wrong bytes ({} of {})",
            got.body.len(),
            whole.len()
        );
    }
    assert_eq!(origin.hits("/budget-a"), 1);
    assert_eq!(origin.hits("/budget-b"), 1);
}

// The background-refresh and stale-served counters move on /metrics.
#[actix_web::test]
async fn stale_counters_move_in_metrics() {
    let origin = TestOrigin::start().await;
    origin.route("/swr-m", |_, n| {
        Reply::ok(format!("v{n}")).header("cache-control", "max-age=10, stale-while-revalidate=600")
    });
    origin.route("/sie-m", |_, n| {
        if n == 1 {
            Reply::ok("old").header("cache-control", "max-age=10, stale-if-error=600")
        } else {
            Reply::status(503)
        }
    });
    let proxy = TestProxy::start(&origin).await;
    get(&proxy.url("/swr-m"), &[]).await;
    get(&proxy.url("/sie-m"), &[]).await;
    assert_eq!(metric(&proxy, "larder_background_refreshes_total").await, 0);
    assert_eq!(
        metric(&proxy, "larder_stale_if_error_served_total").await,
        0
    );
    proxy.advance(Duration::from_secs(30));
    assert_eq!(get(&proxy.url("/swr-m"), &[]).await.text(), "v1");
    assert_eq!(get(&proxy.url("/sie-m"), &[]).await.text(), "old");
    assert_eq!(metric(&proxy, "larder_background_refreshes_total").await, 1);
    assert_eq!(
        metric(&proxy, "larder_stale_if_error_served_total").await,
        1
    );
}

// RFC 5861 §4 / RFC 9111 §5.2.1: stale-if-error from the *request* allows the stale copy when
// the response gave none; without it the error goes through.
#[actix_web::test]
async fn stale_if_error_from_the_request() {
    let origin = TestOrigin::start().await;
    origin.route("/req-sie", |_, n| {
        if n == 1 {
            Reply::ok("old").header("cache-control", "max-age=10")
        } else {
            Reply::status(503)
        }
    });
    let proxy = TestProxy::start(&origin).await;
    get(&proxy.url("/req-sie"), &[]).await;
    proxy.advance(Duration::from_secs(60));
    assert_eq!(get(&proxy.url("/req-sie"), &[]).await.status, 503);
    let got = get(
        &proxy.url("/req-sie"),
        &[("cache-control", "stale-if-error=600")],
    )
    .await;
    assert_eq!((got.status, got.text().as_str()), (200, "old"));
    assert!(
        got.cache_status().contains("detail=stale-if-error"),
        "{}",
        got.cache_status()
    );
    // A window the staleness has passed does not.
    let got = get(
        &proxy.url("/req-sie"),
        &[("cache-control", "stale-if-error=5")],
    )
    .await;
    assert_eq!(got.status, 503);
}

// RFC 9213: stale-while-revalidate given in CDN-Cache-Control (which overrides Cache-Control
// for this cache) serves stale at once and refreshes once.
#[actix_web::test]
async fn stale_while_revalidate_from_cdn_cache_control() {
    let origin = TestOrigin::start().await;
    origin.route("/cdn-swr", |_, n| {
        Reply::ok(format!("v{n}"))
            .header("cache-control", "max-age=10")
            .header(
                "cdn-cache-control",
                "max-age=10, stale-while-revalidate=600",
            )
            .delay(if n > 1 {
                Duration::from_millis(500)
            } else {
                Duration::ZERO
            })
    });
    let proxy = TestProxy::start(&origin).await;
    get(&proxy.url("/cdn-swr"), &[]).await;
    proxy.advance(Duration::from_secs(30));
    let started = Instant::now();
    let got = get(&proxy.url("/cdn-swr"), &[]).await;
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(got.text(), "v1");
    assert!(
        got.cache_status().contains("detail=stale-while-revalidate"),
        "{}",
        got.cache_status()
    );
    for _ in 0..100 {
        if get(&proxy.url("/cdn-swr"), &[]).await.text() == "v2" {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(origin.hits("/cdn-swr"), 2);
}

// RFC 9111 §5.2.2.2: must-revalidate content is never served stale, whatever
// stale-while-revalidate, stale-if-error or the client's max-stale allow.
#[actix_web::test]
async fn must_revalidate_is_never_served_stale() {
    let origin = TestOrigin::start().await;
    origin.route("/mr", |_, n| {
        if n == 1 {
            Reply::ok("v1").header(
                "cache-control",
                "max-age=10, must-revalidate, stale-while-revalidate=600, stale-if-error=600",
            )
        } else {
            Reply::status(503)
        }
    });
    let proxy = TestProxy::start(&origin).await;
    get(&proxy.url("/mr"), &[]).await;
    proxy.advance(Duration::from_secs(30));
    for headers in [
        vec![],
        vec![("cache-control", "max-stale=1000")],
        vec![("cache-control", "max-stale")],
        vec![("cache-control", "stale-if-error=1000")],
    ] {
        let got = get(&proxy.url("/mr"), &headers).await;
        assert_ne!(got.text(), "v1", "served stale with {headers:?}");
        assert_eq!(got.status, 503, "{headers:?}");
    }
    assert_eq!(
        origin.hits("/mr"),
        5,
        "every request must have asked the origin"
    );
}

// Surrogate-Control's `max-age=N+M` (W3C Edge Architecture) grants M seconds of serving stale
// when the origin fails, like stale-if-error.
#[actix_web::test]
async fn surrogate_control_grace_serves_stale_on_error() {
    let origin = TestOrigin::start().await;
    origin.route("/sc", |_, n| {
        if n == 1 {
            Reply::ok("graced").header("surrogate-control", "max-age=10+600")
        } else {
            Reply::status(503)
        }
    });
    let proxy = TestProxy::start(&origin).await;
    get(&proxy.url("/sc"), &[]).await;
    proxy.advance(Duration::from_secs(60));
    let got = get(&proxy.url("/sc"), &[]).await;
    assert_eq!((got.status, got.text().as_str()), (200, "graced"));
    assert!(
        got.cache_status().contains("detail=stale-if-error"),
        "{}",
        got.cache_status()
    );
    proxy.advance(Duration::from_secs(600));
    assert_eq!(get(&proxy.url("/sc"), &[]).await.status, 503);
}

// RFC 9111 §4.4: a successful POST invalidates the URL. A GET fetch that was already in flight
// carries the old content: a request after the POST must not join it, and its result must not
// be stored over the newer copy once it ends.
#[actix_web::test]
async fn a_post_fences_the_get_fetch_already_in_flight_for_its_url() {
    let origin = TestOrigin::start().await;
    origin.route("/doc", |req, n| {
        if req.method == "POST" {
            return Reply::status(204);
        }
        if n == 1 {
            // The first version streams slowly: its fetch is still running when the POST lands.
            Reply::ok("")
                .header("cache-control", "max-age=600")
                .body(Body::Slow {
                    chunks: vec![Bytes::from("old "), Bytes::from("version")],
                    pause: Duration::from_millis(600),
                })
        } else {
            Reply::ok(format!("version {n}")).header("cache-control", "max-age=600")
        }
    });
    let proxy = TestProxy::start(&origin).await;
    let url = proxy.url("/doc");
    let first = actix_web::rt::spawn({
        let url = url.clone();
        async move { read_all(&url, &[]).await }
    });
    actix_web::rt::time::sleep(Duration::from_millis(200)).await;
    let posted = try_send("POST", &url, &[], Bytes::from_static(b"change"))
        .await
        .unwrap();
    assert_eq!(posted.status, 204);

    let after = read_all(&url, &[]).await.unwrap();
    assert_eq!(after.text(), "version 3", "{}", after.cache_status());
    assert!(!after.cache_status().contains("collapsed"));
    assert_eq!(first.await.unwrap().unwrap().text(), "old version");

    let later = get(&url, &[]).await;
    assert!(later.cache_status().starts_with("larder; hit"));
    assert_eq!(
        later.text(),
        "version 3",
        "the pre-POST fetch was stored over it"
    );
    assert_eq!(origin.hits("/doc"), 3);
}
