//! Range requests answered from the cache (RFC 9110 §14, §13.1.5): hits, misses filled by a full fetch, large objects forwarded, integrity.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;

use crate::support::*;

/// A body whose every byte depends on its offset, so a wrong slice is visible.
fn body(len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>())
}

const LEN: usize = 100_000; // above the 16 KiB inline limit: a body file

async fn filled(path: &str, len: usize) -> (TestOrigin, TestProxy, Bytes) {
    let origin = TestOrigin::start().await;
    let b = body(len);
    origin.fixed(
        path,
        Reply::ok(b.clone())
            .header("cache-control", "max-age=600")
            .header("content-type", "application/x-test")
            .header("etag", "\"v1\"")
            .header("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
    );
    let proxy = TestProxy::start(&origin).await;
    let first = get(&proxy.url(path), &[]).await;
    assert_eq!(first.status, 200);
    assert!(
        first.cache_status().contains("stored"),
        "{}",
        first.cache_status()
    );
    (origin, proxy, b)
}

fn assert_hit(got: &Got) {
    assert!(
        got.cache_status().starts_with("larder; hit"),
        "not a hit: {}",
        got.cache_status()
    );
}

// RFC 9110 §14.2, §14.4, §15.3.7: one range → 206 with Content-Range and the exact length,
// from the cache, for both inline (small) and file-backed bodies.
#[actix_web::test]
async fn single_range_is_a_206_from_the_cache() {
    for len in [1_000, LEN] {
        let (origin, proxy, b) = filled("/r", len).await;
        let got = get(&proxy.url("/r"), &[("range", "bytes=100-199")]).await;
        assert_eq!(got.status, 206);
        assert_eq!(
            got.header("content-range"),
            Some(&*format!("bytes 100-199/{len}"))
        );
        assert_eq!(got.header("content-length"), Some("100"));
        assert_eq!(got.body, b.slice(100..200));
        assert_eq!(got.header("accept-ranges"), Some("bytes"));
        assert_eq!(got.header("content-type"), Some("application/x-test"));
        assert_hit(&got);
        assert_eq!(origin.hits("/r"), 1);
    }
}

// RFC 9110 §14.1.2: suffix (`-n`) and open (`n-`) ranges.
#[actix_web::test]
async fn suffix_and_open_ranges() {
    let (_origin, proxy, b) = filled("/s", LEN).await;
    let got = get(&proxy.url("/s"), &[("range", "bytes=-500")]).await;
    assert_eq!(got.status, 206);
    assert_eq!(
        got.header("content-range"),
        Some(&*format!("bytes {}-{}/{LEN}", LEN - 500, LEN - 1))
    );
    assert_eq!(got.body, b.slice(LEN - 500..));
    let got = get(&proxy.url("/s"), &[("range", "bytes=99000-")]).await;
    assert_eq!(got.status, 206);
    assert_eq!(got.body, b.slice(99_000..));
    assert_eq!(got.header("content-length"), Some("1000"));
    assert_hit(&got);
}

/// Parses a multipart/byteranges body (RFC 9110 §14.6) into (content-type, content-range, bytes).
fn parse_multipart(got: &Got) -> Vec<(String, String, Bytes)> {
    let ct = got.header("content-type").expect("content-type");
    let boundary = ct
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap_or_else(|| panic!("not multipart: {ct}"));
    let delim = format!("--{boundary}");
    let body = &got.body[..];
    let find = |hay: &[u8], from: usize, needle: &[u8]| {
        hay[from..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
    };
    let mut parts = Vec::new();
    let mut at = find(body, 0, delim.as_bytes()).expect("first delimiter");
    loop {
        at += delim.len();
        if body[at..].starts_with(b"--") {
            break;
        }
        let head_end = find(body, at, b"\r\n\r\n").expect("part header end");
        let head = String::from_utf8(body[at..head_end].to_vec()).unwrap();
        let field = |name: &str| {
            head.lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_string())
                })
                .unwrap_or_default()
        };
        let next = find(body, head_end, format!("\r\n{delim}").as_bytes()).expect("next delimiter");
        parts.push((
            field("content-type"),
            field("content-range"),
            Bytes::copy_from_slice(&body[head_end + 4..next]),
        ));
        at = next + 2;
    }
    parts
}

// RFC 9110 §14.6: several ranges → multipart/byteranges, each part with the stored
// Content-Type and its own Content-Range; Content-Length is exact (the client reads it whole).
#[actix_web::test]
async fn multiple_ranges_are_multipart_byteranges() {
    let (_origin, proxy, b) = filled("/m", LEN).await;
    let got = get(&proxy.url("/m"), &[("range", "bytes=0-9, 50000-50009,-5")]).await;
    assert_eq!(got.status, 206);
    assert_hit(&got);
    assert_eq!(
        got.header("content-range"),
        None,
        "§14.6: not on a multipart 206"
    );
    assert_eq!(
        got.header("content-length")
            .and_then(|v| v.parse::<usize>().ok()),
        Some(got.body.len())
    );
    let parts = parse_multipart(&got);
    let want = [(0, 9), (50_000, 50_009), (LEN - 5, LEN - 1)];
    assert_eq!(parts.len(), want.len());
    for ((ct, cr, bytes), (first, last)) in parts.iter().zip(want) {
        assert_eq!(ct, "application/x-test");
        assert_eq!(cr, &format!("bytes {first}-{last}/{LEN}"));
        assert_eq!(bytes, &b.slice(first..last + 1));
    }
}

// RFC 9110 §14.6: overlapping ranges may be coalesced; we send one part covering both.
#[actix_web::test]
async fn overlapping_ranges_are_coalesced() {
    let (_origin, proxy, b) = filled("/o", LEN).await;
    let got = get(&proxy.url("/o"), &[("range", "bytes=0-99,50-149")]).await;
    assert_eq!(got.status, 206);
    assert_eq!(
        got.header("content-range"),
        Some(&*format!("bytes 0-149/{LEN}"))
    );
    assert_eq!(got.body, b.slice(0..150));
}

// RFC 9110 §15.5.17 / §14.4: no satisfiable range → 416 with `Content-Range: bytes */len`.
#[actix_web::test]
async fn unsatisfiable_range_is_416() {
    let (_origin, proxy, _) = filled("/u", LEN).await;
    for range in [format!("bytes={LEN}-"), "bytes=-0".to_string()] {
        let got = get(&proxy.url("/u"), &[("range", &range)]).await;
        assert_eq!(got.status, 416, "{range}");
        assert_eq!(
            got.header("content-range"),
            Some(&*format!("bytes */{LEN}"))
        );
        assert!(got.body.is_empty());
    }
}

// RFC 9110 §14.2: an invalid Range (bad syntax, other unit, last < first) is ignored: 200 full.
#[actix_web::test]
async fn invalid_range_gives_the_full_200() {
    let (_origin, proxy, b) = filled("/i", LEN).await;
    for range in ["bytes=5-1", "items=0-5", "bytes=abc", "bytes=0-1;x"] {
        let got = get(&proxy.url("/i"), &[("range", range)]).await;
        assert_eq!(got.status, 200, "{range}");
        assert_eq!(got.body, b, "{range}");
        assert_hit(&got);
    }
}

// RFC 9110 §13.1.5: If-Range with the strong ETag or the exact (strong) Last-Modified applies
// the range; anything else (other tag, weak tag, other date) gets the full 200.
#[actix_web::test]
async fn if_range_by_etag_and_by_date() {
    let (_origin, proxy, b) = filled("/if", LEN).await;
    let cases = [
        ("\"v1\"", 206),
        ("\"v2\"", 200),
        ("W/\"v1\"", 200),
        ("Sun, 06 Nov 1994 08:49:37 GMT", 206),
        ("Sun, 06 Nov 1994 08:49:38 GMT", 200),
    ];
    for (if_range, status) in cases {
        let got = get(
            &proxy.url("/if"),
            &[("range", "bytes=10-19"), ("if-range", if_range)],
        )
        .await;
        assert_eq!(got.status, status, "If-Range: {if_range}");
        let want = if status == 206 {
            b.slice(10..20)
        } else {
            b.clone()
        };
        assert_eq!(got.body, want, "If-Range: {if_range}");
    }
}

// RFC 9110 §13.2.2: a matching If-None-Match is evaluated before Range; the 304 wins.
#[actix_web::test]
async fn a_conditional_304_wins_over_range() {
    let (_origin, proxy, _) = filled("/c", LEN).await;
    let got = get(
        &proxy.url("/c"),
        &[("range", "bytes=0-9"), ("if-none-match", "\"v1\"")],
    )
    .await;
    assert_eq!(got.status, 304);
}

// RFC 9110 §9.3.2: HEAD with Range gets the headers the GET would have had, without a body.
#[actix_web::test]
async fn head_with_range() {
    let (_origin, proxy, _) = filled("/h", LEN).await;
    let got = send("HEAD", &proxy.url("/h"), &[("range", "bytes=100-199")]).await;
    assert_eq!(got.status, 206);
    assert_eq!(
        got.header("content-range"),
        Some(&*format!("bytes 100-199/{LEN}"))
    );
    assert_eq!(got.header("content-length"), Some("100"));
    assert!(got.body.is_empty());
    assert_hit(&got);
}

// RFC 9110 §14.3: responses served from the cache advertise byte ranges, 200s included.
#[actix_web::test]
async fn accept_ranges_on_cached_200() {
    let (_origin, proxy, b) = filled("/a", LEN).await;
    let got = get(&proxy.url("/a"), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, b);
    assert_eq!(got.header("accept-ranges"), Some("bytes"));
    assert_hit(&got);
}

/// An origin path that records requests and honours a single `bytes=a-b` Range itself.
fn ranged_origin(origin: &TestOrigin, path: &str, b: Bytes) {
    origin.route(path, move |seen, _| {
        let base = |r: Reply| r.header("cache-control", "max-age=600");
        match seen.header("range").and_then(|r| r.strip_prefix("bytes=")) {
            Some(spec) => {
                let (a, z) = spec.split_once('-').unwrap();
                let (a, z): (usize, usize) = (a.parse().unwrap(), z.parse().unwrap());
                let mut r = base(Reply::ok(b.slice(a..z + 1)))
                    .header("content-range", &format!("bytes {a}-{z}/{}", b.len()));
                r.status = 206;
                r
            }
            None => base(Reply::ok(b.clone())),
        }
    });
}

// A Range miss below range_fill_max: the cache fetches the whole object (no Range upstream,
// RFC 9111 §3.3 would otherwise make us store a partial), stores it, answers the client's range
// from the arriving body; later requests are hits (or share that one fetch while it commits).
#[actix_web::test]
async fn range_miss_is_filled_by_a_full_fetch() {
    let origin = TestOrigin::start().await;
    let b = body(LEN);
    ranged_origin(&origin, "/fill", b.clone());
    let proxy = TestProxy::start(&origin).await;
    let got = get(&proxy.url("/fill"), &[("range", "bytes=1000-1999")]).await;
    assert_eq!(got.status, 206);
    assert_eq!(
        got.header("content-range"),
        Some(&*format!("bytes 1000-1999/{LEN}"))
    );
    assert_eq!(got.body, b.slice(1000..2000));
    assert!(
        got.cache_status().contains("stored"),
        "{}",
        got.cache_status()
    );
    let seen = origin.seen("/fill");
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("range"),
        None,
        "the fill must ask for the whole object"
    );
    // The range client stops reading once its range is sent, so the store's commit may
    // still be under way: a request meanwhile joins that same fetch. Either way, one fetch.
    let mut full = get(&proxy.url("/fill"), &[]).await;
    for _ in 0..50 {
        assert_eq!(full.body, b);
        if full.cache_status().starts_with("larder; hit") {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
        full = get(&proxy.url("/fill"), &[]).await;
    }
    assert_hit(&full);
    let again = get(&proxy.url("/fill"), &[("range", "bytes=-10")]).await;
    assert_hit(&again);
    assert_eq!(again.body, b.slice(LEN - 10..));
    assert_eq!(origin.hits("/fill"), 1);
}

// Above range_fill_max the Range goes to the origin as sent and its 206 is not stored
// (RFC 9111 §3.3: a cache MAY store partial content, we choose not to).
#[actix_web::test]
async fn range_above_fill_limit_is_forwarded_not_stored() {
    let origin = TestOrigin::start().await;
    let b = body(LEN);
    ranged_origin(&origin, "/big", b.clone());
    let proxy = TestProxy::start_with(&origin, "[cache]\nrange_fill_max = \"10KiB\"\n").await;
    let got = get(&proxy.url("/big"), &[("range", "bytes=10-19")]).await;
    assert_eq!(got.status, 206);
    assert_eq!(got.body, b.slice(10..20));
    assert_eq!(
        got.header("content-range"),
        Some(&*format!("bytes 10-19/{LEN}"))
    );
    let seen = origin.seen("/big");
    assert_eq!(
        seen.last().unwrap().header("range"),
        Some("bytes=10-19"),
        "the client's Range must reach the origin"
    );
    let hits = origin.hits("/big");
    let next = get(&proxy.url("/big"), &[("range", "bytes=10-19")]).await;
    assert!(
        !next.cache_status().contains("hit"),
        "{}",
        next.cache_status()
    );
    assert!(origin.hits("/big") > hits, "nothing may have been stored");
    assert_eq!(next.body, b.slice(10..20));
}

// RFC 9111 §3.3/§3.4: a 206 is never stored as if it were the full response.
#[actix_web::test]
async fn a_206_from_the_origin_is_not_stored() {
    let origin = TestOrigin::start().await;
    origin.route("/p", |_, _| {
        let mut r = Reply::ok("0123456789")
            .header("cache-control", "max-age=600")
            .header("content-range", "bytes 0-9/100");
        r.status = 206;
        r
    });
    let proxy = TestProxy::start(&origin).await;
    let first = get(&proxy.url("/p"), &[]).await;
    assert_eq!(first.status, 206);
    assert!(
        !first.cache_status().contains("stored"),
        "{}",
        first.cache_status()
    );
    let second = get(&proxy.url("/p"), &[]).await;
    assert!(
        !second.cache_status().contains("hit"),
        "{}",
        second.cache_status()
    );
    assert_eq!(origin.hits("/p"), 2);
}

// Concurrent Range misses with different ranges share one full origin fetch; each client
// gets its own slice of the shared body.
#[actix_web::test]
async fn concurrent_range_misses_share_one_fetch() {
    let origin = TestOrigin::start().await;
    let b = body(LEN);
    origin.fixed(
        "/herd",
        Reply::ok(b.clone())
            .header("cache-control", "max-age=600")
            .delay(Duration::from_millis(400)),
    );
    let proxy = TestProxy::start(&origin).await;
    let ranges: Vec<(usize, usize)> = (0..8).map(|i| (i * 10_000, i * 10_000 + 4_999)).collect();
    let url = proxy.url("/herd");
    let results = join_all(ranges.iter().map(|(a, z)| {
        let url = url.clone();
        async move {
            let range = format!("bytes={a}-{z}");
            get(&url, &[("range", &range)]).await
        }
    }))
    .await;
    for (got, (a, z)) in results.iter().zip(&ranges) {
        assert_eq!(got.status, 206);
        assert_eq!(got.body, b.slice(*a..z + 1));
    }
    assert_eq!(origin.hits("/herd"), 1);
}

fn body_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join("bodies")];
    while let Some(d) = stack.pop() {
        for item in std::fs::read_dir(&d).unwrap() {
            let p = item.unwrap().path();
            if p.is_dir() {
                if !p.ends_with("tmp") {
                    stack.push(p);
                }
            } else if p.file_name().is_some_and(|n| n.len() == 64) {
                out.push(p);
            }
        }
    }
    out
}

// DESIGN "nothing wrong ever served": a byte flipped in the body file after a range was served
// (and the file verified) must not reach a later range client; the entry is refetched.
#[actix_web::test]
async fn a_flipped_byte_is_never_served_in_a_range() {
    let (origin, proxy, b) = filled("/flip", LEN).await;
    let tail = format!("bytes={}-", LEN - 100);
    let got = get(&proxy.url("/flip"), &[("range", &tail)]).await;
    assert_eq!(got.body, b.slice(LEN - 100..));
    assert_hit(&got);
    let files = body_files(proxy.dir.path());
    assert_eq!(files.len(), 1);
    let mut bytes = std::fs::read(&files[0]).unwrap();
    bytes[LEN - 50] ^= 0x01;
    std::fs::write(&files[0], &bytes).unwrap();
    let got = get(&proxy.url("/flip"), &[("range", &tail)]).await;
    assert_eq!(got.status, 206);
    assert_eq!(got.body, b.slice(LEN - 100..), "damaged bytes were served");
    assert!(
        !got.cache_status().contains("hit"),
        "{}",
        got.cache_status()
    );
    assert_eq!(origin.hits("/flip"), 2);
}
