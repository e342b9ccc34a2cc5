// The policy_decision check, shared by the libFuzzer target and the stable run in `cargo test`
// (tests/it/fuzz_checks.rs): the whole caching decision on arbitrary field lists.

use std::time::{Duration, UNIX_EPOCH};

use arbitrary::{Arbitrary, Unstructured};

use larder::policy::{self, CacheControl, HeaderList, PolicyOptions, Storable, Vary};

/// Field names the rules look at, so that most inputs exercise them; index past the end = raw name.
const NAMES: &[&str] = &[
    "cache-control",
    "pragma",
    "expires",
    "date",
    "age",
    "last-modified",
    "etag",
    "vary",
    "authorization",
    "set-cookie",
    "cdn-cache-control",
    "surrogate-control",
    "if-none-match",
    "if-modified-since",
    "if-match",
    "if-unmodified-since",
    "if-range",
    "range",
    "content-length",
    "accept-encoding",
    "accept-language",
    "cookie",
    "surrogate-key",
    "location",
    "content-location",
    "connection",
    "transfer-encoding",
    "content-range",
];
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "get",
];

#[derive(Arbitrary, Debug)]
struct Field {
    name: u8,
    raw_name: String,
    value: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    method: u8,
    status: u16,
    request: Vec<Field>,
    response: Vec<Field>,
    not_modified: Vec<Field>,
    request_time: u32,
    response_delay: u16,
    later: u32,
    heuristic_percent: u8,
    max_heuristic: u32,
    honor_cdn: bool,
    default_stale_if_error: u32,
    normalize_ae: bool,
    normalize_al: bool,
    share_set_cookie: bool,
    body_len: u32,
    complete: bool,
}

fn list(fields: &[Field]) -> HeaderList {
    let mut h = HeaderList::new();
    for f in fields {
        let name = NAMES.get(f.name as usize).copied().unwrap_or(&f.raw_name);
        h.push(name, f.value.clone());
    }
    h
}

/// One input (decoded as an [`Input`]): panics if a property breaks.
pub fn check(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(input);
    }
}

fn run(input: Input) {
    let method = METHODS[input.method as usize % METHODS.len()];
    let req = list(&input.request);
    let resp = list(&input.response);
    let not_modified = list(&input.not_modified);
    let opts = PolicyOptions {
        heuristic_fraction_percent: u32::from(input.heuristic_percent % 101),
        max_heuristic_lifetime: Duration::from_secs(input.max_heuristic.into()),
        honor_cdn_cache_control: input.honor_cdn,
        default_stale_if_error: Duration::from_secs(input.default_stale_if_error.into()),
        normalize_accept_encoding: input.normalize_ae,
        normalize_accept_language: input.normalize_al,
        share_set_cookie: input.share_set_cookie,
    };
    let request_time = UNIX_EPOCH + Duration::from_secs(input.request_time.into());
    let response_time = request_time + Duration::from_millis(input.response_delay.into());
    let now = response_time + Duration::from_secs(input.later.into());

    let decision = policy::storable(
        method,
        &req,
        input.status,
        &resp,
        input.complete,
        request_time,
        response_time,
        &opts,
    );
    let stored = policy::headers_to_store(&resp);
    if let Storable::Yes(fresh) = decision {
        // What a shared cache may never keep.
        assert!(input.complete, "stored an incomplete body");
        assert_eq!(method, "GET");
        assert!(
            !CacheControl::from_request(&req).no_store,
            "stored despite request no-store"
        );
        assert!(input.status != 206 && input.status != 304 && (200..=599).contains(&input.status));
        assert!(parse_is_not_star(&resp), "stored a Vary: * response");
        if !opts.share_set_cookie {
            assert!(
                !stored.contains("set-cookie"),
                "a stored response would replay Set-Cookie"
            );
        }
        assert!(fresh.lifetime <= Duration::from_secs(1 << 31));
        assert!(fresh.corrected_initial_age <= Duration::from_secs(1 << 31));
        let _ = policy::lookup(&req, &fresh, now);
        let _ = policy::may_serve_stale_on_error(&req, &fresh, now);
        let age = policy::age_seconds(&fresh, now);
        assert!(age <= 1 << 31);
        // A time before the response arrived must not panic either.
        let _ = policy::lookup(&req, &fresh, request_time);
        let _ = policy::age_seconds(&fresh, UNIX_EPOCH);
    }
    for name in ["connection", "transfer-encoding", "keep-alive"] {
        assert!(!stored.contains(name), "hop-by-hop {name} stored");
    }

    let _ = policy::evaluate_conditional(method, &req, input.status, &stored);
    let _ = policy::not_modified_headers(&stored);
    let _ = policy::revalidation_headers(&stored);
    let _ = policy::not_modified_matches(&stored, &not_modified);
    let _ = policy::revalidation_matches(&stored, &not_modified);
    let merged = policy::merge_not_modified(&stored, &not_modified);
    let _ = policy::storable(
        "GET",
        &HeaderList::new(),
        input.status,
        &merged,
        true,
        request_time,
        now,
        &opts,
    );
    let _ = policy::head_matches_stored(&stored, &not_modified);

    match policy::select_ranges(method, &req, input.status, &stored, input.body_len.into()) {
        policy::RangeAnswer::Partial(ranges) => {
            assert!(!ranges.is_empty());
            for r in &ranges {
                assert!(
                    r.first <= r.last && r.last < u64::from(input.body_len),
                    "{r:?}"
                );
            }
        }
        policy::RangeAnswer::Full | policy::RangeAnswer::Unsatisfiable => {}
    }

    let _ = policy::invalidation_targets(method, input.status, "http://example.com/a/b?c", &resp);
    let _ = policy::surrogate_keys(&resp);
    if let Vary::Fields(fields) = policy::parse_vary(&resp) {
        let _ = policy::vary_values(&fields, &req, &opts);
    }
}

fn parse_is_not_star(resp: &HeaderList) -> bool {
    policy::parse_vary(resp) != Vary::Star
}
