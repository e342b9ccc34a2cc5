//! Property-style robustness check: ten thousand deterministic pseudo-random inputs must not panic any policy entry point.

use std::time::{Duration, SystemTime};

use super::*;

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items.get(self.below(items.len())).copied().unwrap_or("")
    }
}

/// Fragments that steer random values toward the parsers' edge cases.
const PIECES: &[&str] = &[
    "max-age",
    "s-maxage",
    "max-stale",
    "min-fresh",
    "no-cache",
    "no-store",
    "private",
    "public",
    "must-revalidate",
    "proxy-revalidate",
    "must-understand",
    "immutable",
    "stale-while-revalidate",
    "stale-if-error",
    "only-if-cached",
    "=",
    ",",
    ";",
    "\"",
    "\\",
    " ",
    "\t",
    "0",
    "1",
    "60",
    "-1",
    "1.5",
    "99999999999999999999",
    "2147483648",
    "W/",
    "*",
    "Sun, 06 Nov 1994 08:49:37 GMT",
    "Fri, 31 Dec 9999 23:59:59 GMT",
    "gzip",
    "br",
    "q=0",
    "q=0.5",
    "en-US",
    "http://example.com",
    "//",
    "/",
    "..",
    ".",
    "?",
    "#",
    ":",
    "@",
    "[",
    "]",
    "+",
    "set-cookie",
    "x-a",
    "larder",
];

const NAMES: &[&str] = &[
    "cache-control",
    "pragma",
    "vary",
    "age",
    "date",
    "expires",
    "last-modified",
    "etag",
    "set-cookie",
    "authorization",
    "cdn-cache-control",
    "surrogate-control",
    "connection",
    "location",
    "content-location",
    "content-length",
    "accept-encoding",
    "accept-language",
    "if-none-match",
    "if-modified-since",
    "surrogate-key",
    "x-a",
    "transfer-encoding",
];

fn value(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.below(12) {
        if rng.below(4) == 0 {
            out.push((rng.next() & 0xff) as u8);
        } else {
            out.extend_from_slice(rng.pick(PIECES).as_bytes());
        }
    }
    out
}

fn headers(rng: &mut Rng) -> HeaderList {
    let mut h = HeaderList::new();
    for _ in 0..rng.below(8) {
        let name = rng.pick(NAMES);
        h.push(name, value(rng));
    }
    h
}

fn time(rng: &mut Rng) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(rng.next() % (1 << 36))
}

fn duration(rng: &mut Rng) -> Duration {
    match rng.below(3) {
        0 => Duration::from_secs(rng.next()),
        1 => Duration::from_secs(rng.next() % 1000),
        _ => Duration::ZERO,
    }
}

// RFC 9110 §5.5 (field values may hold any octets, and recipients must cope) with RFC 9111
// §4.2.1 / §5.2 (invalid or conflicting cache information is read conservatively, never fatally),
// across every entry point: §3 storage, §4.1 Vary, §4.2 freshness, §4.3 validation, §4.4
// invalidation.
#[test]
fn rfc9110_5_5_rfc9111_5_2_random_inputs_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let methods = ["GET", "HEAD", "POST", "PUT", "get", "", "DELETE"];
    let statuses = [
        0,
        100,
        200,
        203,
        204,
        206,
        301,
        302,
        304,
        404,
        500,
        599,
        600,
        u16::MAX,
    ];
    let mut stored_count = 0;
    for _ in 0..10_000 {
        let raw = value(&mut rng);
        let _ = CacheControl::parse(&String::from_utf8_lossy(&raw));

        let req = headers(&mut rng);
        let resp = headers(&mut rng);
        let opts = PolicyOptions {
            heuristic_fraction_percent: (rng.next() % 200) as u32,
            default_stale_if_error: duration(&mut rng),
            share_set_cookie: rng.below(2) == 0,
            honor_cdn_cache_control: rng.below(2) == 0,
            ..PolicyOptions::default()
        };
        let method = rng.pick(&methods);
        let status = statuses
            .get(rng.below(statuses.len()))
            .copied()
            .unwrap_or(200);
        let (t1, t2, now) = (time(&mut rng), time(&mut rng), time(&mut rng));
        let complete = rng.below(8) != 0;

        let _ = CacheControl::from_request(&req);
        let _ = CacheControl::from_response(&resp);
        if let Storable::Yes(f) = storable(method, &req, status, &resp, complete, t1, t2, &opts) {
            stored_count += 1;
            let _ = lookup(&req, &f, now);
            let _ = may_serve_stale_on_error(&req, &f, now);
            let _ = age_seconds(&f, now);
        }
        let random_fresh = Freshness {
            request_time: t1,
            response_time: t2,
            corrected_initial_age: duration(&mut rng),
            lifetime: duration(&mut rng),
            stale_while_revalidate: duration(&mut rng),
            stale_if_error: duration(&mut rng),
            must_revalidate: rng.below(2) == 0,
            no_cache: rng.below(4) == 0,
        };
        let _ = lookup(&req, &random_fresh, now);
        let _ = may_serve_stale_on_error(&req, &random_fresh, now);
        let _ = age_seconds(&random_fresh, now);
        let _ = (random_fresh.fresh_until(), random_fresh.stale_until());
        let _ = random_fresh.expired_at(now);

        if let Vary::Fields(fields) = parse_vary(&resp) {
            let _ = vary_values(&fields, &req, &opts);
        }
        let names = vec![
            rng.pick(NAMES).to_string(),
            String::from_utf8_lossy(&raw).into_owned(),
        ];
        let _ = vary_values(&names, &req, &opts);

        let _ = headers_to_store(&resp);
        let mut stripped = resp.clone();
        strip_hop_by_hop(&mut stripped);
        let _ = evaluate_conditional(method, &req, status, &resp);
        let _ = not_modified_headers(&resp);
        let _ = revalidation_headers(&resp);
        let _ = not_modified_matches(&resp, &req);
        let _ = merge_not_modified(&resp, &req);
        let _ = head_matches_stored(&resp, &req);
        let _ = head_update(&resp, status, &req);
        let target = String::from_utf8_lossy(&value(&mut rng)).into_owned();
        let _ = invalidation_targets(method, status, &target, &resp);
        let _ = invalidation_targets("POST", 201, "http://example.com/a/b", &resp);
        let _ = surrogate_keys(&resp);
    }
    // The generator must reach the interesting paths, not only early rejections.
    assert!(stored_count > 100, "only {stored_count} storable inputs");
}
