//! Micro-benchmarks of the caching rules on the hot paths: deciding to store a typical response, and parsing + deciding a cache hit.

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use larder::policy::{
    CacheControl, HeaderList, Lookup, PolicyOptions, Storable, Vary, lookup, parse_vary, storable,
    vary_values,
};

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

/// A typical origin response: eight fields.
fn typical_response() -> HeaderList {
    [
        ("date", "Tue, 14 Nov 2023 22:13:20 GMT"),
        ("content-type", "text/html; charset=utf-8"),
        ("content-length", "5120"),
        (
            "cache-control",
            "public, max-age=300, stale-while-revalidate=60",
        ),
        ("etag", "\"5f3e-6a1b2c\""),
        ("last-modified", "Mon, 13 Nov 2023 10:00:00 GMT"),
        ("vary", "Accept-Encoding"),
        ("server", "origin/1.0"),
    ]
    .into_iter()
    .collect()
}

/// A typical browser request.
fn typical_request() -> HeaderList {
    [
        ("host", "example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/120.0",
        ),
        ("accept", "text/html,application/xhtml+xml,*/*;q=0.8"),
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "en-US,en;q=0.5"),
    ]
    .into_iter()
    .collect()
}

fn bench(c: &mut Criterion) {
    let req = typical_request();
    let resp = typical_response();
    let opts = PolicyOptions::default();

    c.bench_function("cache_control_parse", |b| {
        b.iter(|| CacheControl::parse(black_box("public, max-age=300, stale-while-revalidate=60")))
    });

    c.bench_function("storable_typical_response", |b| {
        b.iter(|| {
            storable(
                black_box("GET"),
                black_box(&req),
                black_box(200),
                black_box(&resp),
                true,
                at(0),
                at(0),
                &opts,
            )
        })
    });

    let Storable::Yes(fresh) = storable("GET", &req, 200, &resp, true, at(0), at(0), &opts) else {
        panic!("typical response must be storable");
    };
    assert_eq!(lookup(&req, &fresh, at(10)), Lookup::Fresh);
    c.bench_function("lookup_hit", |b| {
        b.iter(|| lookup(black_box(&req), black_box(&fresh), black_box(at(10))))
    });

    let mut req_cc = req.clone();
    req_cc.push("cache-control", "max-age=600");
    assert_eq!(lookup(&req_cc, &fresh, at(10)), Lookup::Fresh);
    c.bench_function("lookup_hit_request_cache_control", |b| {
        b.iter(|| lookup(black_box(&req_cc), black_box(&fresh), black_box(at(10))))
    });

    let fields = match parse_vary(&resp) {
        Vary::Fields(f) => f,
        Vary::Star => Vec::new(),
    };
    c.bench_function("vary_values_accept_encoding", |b| {
        b.iter(|| vary_values(black_box(&fields), black_box(&req), &opts))
    });

    // The whole per-hit policy work, as the proxy does it (proxy::selected + lookup):
    // parse and normalize the request's Vary'd fields, match them against the stored key,
    // parse the request's Cache-Control and decide. Freshness itself was computed at store time.
    let stored_vary = vary_values(&fields, &req, &opts);
    let hit = |request: &HeaderList| {
        let selected = vary_values(&fields, request, &opts) == stored_vary;
        selected.then(|| lookup(request, &fresh, at(10)))
    };
    assert_eq!(hit(&req), Some(Lookup::Fresh));
    c.bench_function("hit_parse_and_decide", |b| b.iter(|| hit(black_box(&req))));
    let mut req_reload = req.clone();
    req_reload.push("cache-control", "max-age=0, stale-if-error=60");
    assert_eq!(hit(&req_reload), Some(Lookup::MustRevalidate));
    assert_eq!(hit(&req_cc), Some(Lookup::Fresh));
    c.bench_function("hit_parse_and_decide_request_cache_control", |b| {
        b.iter(|| hit(black_box(&req_cc)))
    });
    c.bench_function("hit_parse_and_decide_reload", |b| {
        b.iter(|| hit(black_box(&req_reload)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
