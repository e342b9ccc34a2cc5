//! Storability in a shared cache (RFC 9111 §3) and freshness (§4.2) decided once per response, and the per-request reuse decision (§4, RFC 5861).

use std::time::{Duration, SystemTime};

use super::PolicyOptions;
use super::cache_control::{CacheControl, MaxStale};
use super::freshness_state::Freshness;
use super::headers::{HeaderList, unshareable_fields};
use super::syntax::{
    DELTA_MAX, DELTA_MAX_SECS, elapsed, parse_delta_seconds, parse_http_date, split_list,
};
use super::vary::{Vary, parse_vary};

/// Why a response is not stored; feeds Cache-Status `detail=` and metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NotStorable {
    /// The request method is not GET (RFC 9111 §3; only GET responses carry content we can reuse).
    Method,
    /// Not a final status we store: 1xx, 304, out of range, a status without explicit or
    /// heuristic freshness (RFC 9111 §3, RFC 9110 §15.1).
    Status,
    /// 206: this cache stores only complete responses (RFC 9111 §3.3, §3.4).
    PartialContent,
    /// Response `no-store` (RFC 9111 §5.2.2.5).
    NoStore,
    /// Request `no-store` (RFC 9111 §5.2.1.5).
    RequestNoStore,
    /// Unqualified `private` (RFC 9111 §5.2.2.7).
    Private,
    /// The request carried Authorization and the response did not allow sharing (RFC 9111 §3.5).
    Authorization,
    /// `Vary: *` can never be matched (RFC 9111 §4.1).
    VaryStar,
    /// Nothing to gain: zero lifetime, no validator and no stale window (RFC 9111 §3 note).
    NoFreshness,
    /// Set-Cookie would be shared between users (`PolicyOptions::share_set_cookie` is false).
    SetCookie,
    /// `must-understand` on a status whose caching rules we do not implement (RFC 9111 §5.2.2.3).
    MustUnderstand,
    /// The caller did not receive the whole body, or its framing cannot tell a complete body
    /// from a cut one: this cache stores only complete responses (RFC 9111 §3.3).
    Incomplete,
}

impl NotStorable {
    /// Short kebab-case token for Cache-Status `detail=` and metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            NotStorable::Method => "method",
            NotStorable::Status => "status",
            NotStorable::PartialContent => "partial-content",
            NotStorable::NoStore => "no-store",
            NotStorable::RequestNoStore => "request-no-store",
            NotStorable::Private => "private",
            NotStorable::Authorization => "authorization",
            NotStorable::VaryStar => "vary-star",
            NotStorable::NoFreshness => "no-freshness",
            NotStorable::SetCookie => "set-cookie",
            NotStorable::MustUnderstand => "must-understand",
            NotStorable::Incomplete => "incomplete",
        }
    }
}

/// The storage decision for one response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storable {
    /// Store it (fields from `headers_to_store`) with these freshness facts.
    Yes(Freshness),
    /// Do not store it, for this reason.
    No(NotStorable),
}

/// RFC 9110 §15.1: status codes that are heuristically cacheable.
const HEURISTIC_STATUSES: [u16; 12] = [200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501];

/// Statuses whose caching rules this cache implements, for `must-understand` (RFC 9111 §5.2.2.3).
/// 206 is absent: we never store partial content.
const UNDERSTOOD_STATUSES: [u16; 14] = [
    200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501,
];

/// RFC 9111 §3 storability in a SHARED cache, plus the §4.2 freshness facts computed once.
///
/// `method`/`req` describe the request, `status`/`resp` the response; `request_time` is when
/// the request was sent upstream and `response_time` when the response headers arrived.
/// `body_complete` is the caller's word on the body (RFC 9111 §3.3): false when the body was
/// cut short of its Content-Length, or when the framing cannot prove it whole; a caller that
/// decides before the body has arrived passes true and must discard the entry if the body
/// then ends early (see [`NotStorable::Incomplete`] for the reason to report).
///
/// Freshness lifetime (§4.2.1), first match: the targeted field (CDN-Cache-Control, then
/// Surrogate-Control, when `opts.honor_cdn_cache_control`), s-maxage, max-age, Expires − Date
/// (invalid or repeated-and-different Expires: already stale), else the §4.2.2 heuristic for
/// heuristically cacheable statuses or `public`. Every lifetime and age is capped at 2^31 s (§1.2.2).
#[allow(clippy::too_many_arguments)]
pub fn storable(
    method: &str,
    req: &HeaderList,
    status: u16,
    resp: &HeaderList,
    body_complete: bool,
    request_time: SystemTime,
    response_time: SystemTime,
    opts: &PolicyOptions,
) -> Storable {
    use NotStorable as Why;
    // RFC 9111 §3 "the request method is understood": only GET responses are stored. HEAD has
    // no content; its fields refresh a stored GET through `head_matches_stored` (§4.3.5).
    // Methods are case-sensitive (RFC 9110 §9.1).
    if method != "GET" {
        return Storable::No(Why::Method);
    }
    if status == 206 {
        return Storable::No(Why::PartialContent);
    }
    // RFC 9111 §3: final statuses only; a 304 updates a stored response, it is never stored itself.
    if !(200..=599).contains(&status) || status == 304 {
        return Storable::No(Why::Status);
    }
    if !body_complete {
        return Storable::No(Why::Incomplete);
    }
    if CacheControl::from_request(req).no_store {
        return Storable::No(Why::RequestNoStore);
    }
    let (cc, targeted) = CacheControl::for_shared_cache(resp, opts);
    let understood = UNDERSTOOD_STATUSES.contains(&status);
    if cc.must_understand && !understood {
        return Storable::No(Why::MustUnderstand);
    }
    // RFC 9111 §5.2.2.3: a cache that understands the status ignores no-store next to must-understand.
    if cc.no_store && !(cc.must_understand && understood) {
        return Storable::No(Why::NoStore);
    }
    if cc.private {
        return Storable::No(Why::Private);
    }
    // RFC 9111 §3.5: only s-maxage, public or must-revalidate let a shared cache reuse a
    // response to an authenticated request. When a targeted field governs, only its
    // directives count (RFC 9213 §2.2 ignores Cache-Control entirely).
    if req.contains("authorization") && !(cc.s_maxage.is_some() || cc.public || cc.must_revalidate)
    {
        return Storable::No(Why::Authorization);
    }
    // A cookie set for one user must not be replayed to others; `private="set-cookie"` or
    // `no-cache="set-cookie"` makes us store the response without it (RFC 9111 §3.1).
    if !opts.share_set_cookie
        && resp.contains("set-cookie")
        && !unshareable_fields(resp).iter().any(|f| f == "set-cookie")
    {
        return Storable::No(Why::SetCookie);
    }
    if parse_vary(resp) == Vary::Star {
        return Storable::No(Why::VaryStar);
    }

    let date = resp.get("date").and_then(parse_http_date);
    let explicit = if let Some(s) = cc.s_maxage {
        // RFC 9111 §4.2.1: a shared cache prefers s-maxage, then max-age.
        Some(s)
    } else if let Some(m) = cc.max_age {
        Some(m)
    } else if !targeted && resp.contains("expires") {
        // RFC 9213 §2.2: Expires is ignored when a targeted field governs.
        Some(expires_lifetime(resp, date.unwrap_or(response_time)))
    } else {
        None
    };
    let lifetime = match explicit {
        Some(l) => l,
        // RFC 9111 §4.2.2: heuristics only for heuristically cacheable statuses or `public`.
        None if HEURISTIC_STATUSES.contains(&status) || cc.public => {
            heuristic_lifetime(resp, date.unwrap_or(response_time), opts)
        }
        None => return Storable::No(Why::Status),
    }
    .min(DELTA_MAX);

    // RFC 9111 §4.2.4, §5.2.2.2, §5.2.2.8, §5.2.2.10: these forbid serving stale.
    let must_revalidate = cc.must_revalidate || cc.proxy_revalidate || cc.s_maxage.is_some();
    let allows_stale = !must_revalidate && !cc.no_cache;
    let (stale_while_revalidate, stale_if_error) = if allows_stale {
        (
            cc.stale_while_revalidate.unwrap_or(Duration::ZERO),
            cc.stale_if_error.unwrap_or(opts.default_stale_if_error),
        )
    } else {
        (Duration::ZERO, Duration::ZERO)
    };

    let has_validator = resp.contains("etag") || resp.contains("last-modified");
    if lifetime.is_zero()
        && !has_validator
        && stale_while_revalidate.is_zero()
        && stale_if_error.is_zero()
    {
        // RFC 9111 §3 note: stored, it could only ever be refetched in full.
        return Storable::No(Why::NoFreshness);
    }

    Storable::Yes(Freshness {
        request_time,
        response_time,
        corrected_initial_age: corrected_initial_age(resp, date, request_time, response_time),
        lifetime,
        stale_while_revalidate,
        stale_if_error,
        must_revalidate,
        no_cache: cc.no_cache,
    })
}

/// RFC 9111 §4.2.1 / §5.3: Expires − Date. An invalid date, "0", or several Expires lines that
/// name different instants mean "already expired" (§5.3, §4.2.1 "considered stale"); repeats
/// of one instant, however spelled, are that instant.
fn expires_lifetime(resp: &HeaderList, date: SystemTime) -> Duration {
    let mut lines = resp.get_all("expires").map(parse_http_date);
    let Some(Some(expires)) = lines.next() else {
        return Duration::ZERO;
    };
    if lines.any(|other| other != Some(expires)) {
        return Duration::ZERO;
    }
    elapsed(date, expires)
}

/// RFC 9111 §4.2.2: a fraction of the time since Last-Modified, measured at Date (or at
/// receipt when Date is missing), capped by the operator; zero without a usable Last-Modified
/// and never negative when Last-Modified is in the future.
fn heuristic_lifetime(resp: &HeaderList, date: SystemTime, opts: &PolicyOptions) -> Duration {
    let Some(last_modified) = resp.get("last-modified").and_then(parse_http_date) else {
        return Duration::ZERO;
    };
    let interval = elapsed(last_modified, date).as_secs();
    let secs = interval.saturating_mul(u64::from(opts.heuristic_fraction_percent)) / 100;
    Duration::from_secs(secs).min(opts.max_heuristic_lifetime)
}

/// RFC 9111 §4.2.3 corrected_initial_age = max(apparent_age, age_value + response_delay),
/// the conservative form, capped at 2^31 s (§1.2.2).
fn corrected_initial_age(
    resp: &HeaderList,
    date: Option<SystemTime>,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    let apparent_age = date.map_or(Duration::ZERO, |d| elapsed(d, response_time));
    let age_value = Duration::from_secs(parse_age(resp).unwrap_or(0));
    let response_delay = elapsed(request_time, response_time);
    let corrected_age_value = age_value.saturating_add(response_delay);
    apparent_age.max(corrected_age_value).min(DELTA_MAX)
}

/// RFC 9111 §5.1: the first member of the first Age line; anything but a non-negative
/// integer is ignored. Overflow is 2^31 (§1.2.2).
fn parse_age(resp: &HeaderList) -> Option<u64> {
    let line = resp.get("age")?;
    split_list(line, b",").next().and_then(parse_delta_seconds)
}

/// What to do with a stored response for this request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Serve it; it is fresh and the request accepts it.
    Fresh,
    /// Serve the stored response now; if `revalidate_in_background`, also start one
    /// background refresh (stale-while-revalidate, RFC 5861 §3).
    Stale {
        /// True inside the stale-while-revalidate window.
        revalidate_in_background: bool,
    },
    /// Must contact the origin (conditionally when validators exist) before using it.
    MustRevalidate,
    /// It cannot be used without the origin, and the request forbids asking it
    /// (`only-if-cached`): answer 504 (RFC 9111 §5.2.1.7).
    Unusable,
}

/// Decides how a stored response may answer this request (RFC 9111 §4, §5.2.1, RFC 5861).
///
/// - `no-cache` in the request (or `Pragma: no-cache` alone) or the stored response → `MustRevalidate`.
/// - request `max-age`: an age above it is unacceptable (§5.2.1.1); `min-fresh`: the response
///   must stay fresh that much longer (§5.2.1.3).
/// - stale: never served when the stored response must revalidate (§4.2.4); otherwise inside
///   the stale-while-revalidate window → `Stale { revalidate_in_background: true }` unless the
///   request sent `max-age` without `max-stale` (§5.2.1.1: the client does not want stale);
///   else within the request's `max-stale` → `Stale { revalidate_in_background: false }`.
///   A request `max-stale=N` caps both: nothing more than N seconds stale is served
///   (§5.2.1.2 "by no more than the specified number of seconds"), and `max-stale=0` accepts
///   no staleness at all.
/// - request `only-if-cached` (§5.2.1.7): where the answer would be `MustRevalidate`, it is
///   `Unusable` instead (the client gets 504, the origin is not asked).
pub fn lookup(req: &HeaderList, fresh: &Freshness, now: SystemTime) -> Lookup {
    // Fast path for the common hit: a request without Cache-Control or Pragma.
    let plain = !req.contains("cache-control") && !req.contains("pragma");
    if plain && !fresh.no_cache && fresh.is_fresh(now) {
        return Lookup::Fresh;
    }
    let cc = CacheControl::from_request(req);
    match reuse(&cc, fresh, now) {
        Lookup::MustRevalidate if cc.only_if_cached => Lookup::Unusable,
        decision => decision,
    }
}

/// When no stored response is selected for the request at all: true if it must be answered
/// 504 without asking the origin, because it carries `only-if-cached` (RFC 9111 §5.2.1.7).
pub fn miss_is_unusable(req: &HeaderList) -> bool {
    req.contains("cache-control") && CacheControl::from_request(req).only_if_cached
}

/// [`lookup`] without the only-if-cached rule.
fn reuse(cc: &CacheControl, fresh: &Freshness, now: SystemTime) -> Lookup {
    if fresh.no_cache || cc.no_cache {
        return Lookup::MustRevalidate;
    }
    let age = fresh.current_age(now);
    if cc.max_age.is_some_and(|max_age| age > max_age) {
        return Lookup::MustRevalidate;
    }
    if let Some(min_fresh) = cc.min_fresh
        && fresh.lifetime < age.saturating_add(min_fresh)
    {
        return Lookup::MustRevalidate;
    }
    if fresh.is_fresh(now) {
        return Lookup::Fresh;
    }
    if fresh.must_revalidate {
        return Lookup::MustRevalidate;
    }
    let staleness = fresh.staleness(now);
    if !client_accepts(cc.max_stale, staleness) {
        return Lookup::MustRevalidate;
    }
    let client_refuses_stale = cc.max_age.is_some() && cc.max_stale.is_none();
    if !client_refuses_stale && within(staleness, fresh.stale_while_revalidate) {
        return Lookup::Stale {
            revalidate_in_background: true,
        };
    }
    match cc.max_stale {
        Some(_) => Lookup::Stale {
            revalidate_in_background: false,
        },
        None => Lookup::MustRevalidate,
    }
}

/// Whether the request's `max-stale` lets this much staleness through (RFC 9111 §5.2.1.2):
/// absent or valueless sets no cap; `max-stale=N` accepts up to N seconds, and `max-stale=0`
/// nothing, like a zero stale window.
fn client_accepts(max_stale: Option<MaxStale>, staleness: Duration) -> bool {
    match max_stale {
        None | Some(MaxStale::Any) => true,
        Some(MaxStale::Limit(limit)) => within(staleness, limit),
    }
}

/// A stale window permits `staleness` when it is non-zero and not exceeded (RFC 5861 §3, §4).
fn within(staleness: Duration, window: Duration) -> bool {
    !window.is_zero() && staleness <= window
}

/// Whether the stored response may be served because the origin failed (RFC 5861 §4):
/// always while fresh; when stale, within the stored stale-if-error window, the request's own
/// `stale-if-error`, or the request's `max-stale`. Never for `no-cache` responses, nor for
/// stale responses that must revalidate (RFC 9111 §5.2.2.2: answer 504 instead).
pub fn may_serve_stale_on_error(req: &HeaderList, fresh: &Freshness, now: SystemTime) -> bool {
    if fresh.no_cache {
        return false;
    }
    if fresh.is_fresh(now) {
        return true;
    }
    if fresh.must_revalidate {
        return false;
    }
    let staleness = fresh.staleness(now);
    if within(staleness, fresh.stale_if_error) {
        return true;
    }
    let cc = CacheControl::from_request(req);
    cc.stale_if_error.is_some_and(|limit| staleness <= limit)
        || (cc.max_stale.is_some() && client_accepts(cc.max_stale, staleness))
}

/// The Age field value to send (RFC 9111 §5.1, §4.2.3): current_age in whole seconds, capped at 2^31.
pub fn age_seconds(fresh: &Freshness, now: SystemTime) -> u64 {
    fresh.current_age(now).as_secs().min(DELTA_MAX_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2001-09-09T01:46:40Z: every test's "now" when the response arrives.
    const T0: u64 = 1_000_000_000;

    fn at(offset: i64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0.saturating_add_signed(offset))
    }

    /// An HTTP-date `offset` seconds from T0.
    fn d(offset: i64) -> String {
        httpdate::fmt_http_date(at(offset))
    }

    fn list(fields: &[(&str, &str)]) -> HeaderList {
        fields.iter().copied().collect()
    }

    fn run_with(
        method: &str,
        req: &[(&str, &str)],
        status: u16,
        resp: &[(&str, &str)],
        opts: &PolicyOptions,
    ) -> Storable {
        storable(
            method,
            &list(req),
            status,
            &list(resp),
            true,
            at(0),
            at(0),
            opts,
        )
    }

    fn run(method: &str, req: &[(&str, &str)], status: u16, resp: &[(&str, &str)]) -> Storable {
        run_with(method, req, status, resp, &PolicyOptions::default())
    }

    fn why(s: Storable) -> Option<NotStorable> {
        match s {
            Storable::No(w) => Some(w),
            Storable::Yes(_) => None,
        }
    }

    fn fr(s: Storable) -> Freshness {
        match s {
            Storable::Yes(f) => f,
            Storable::No(w) => panic!("expected storable, got {w:?}"),
        }
    }

    fn life(s: Storable) -> u64 {
        fr(s).lifetime.as_secs()
    }

    /// One `#[test]` per row: `name: (method, request, status, response) => |result| check;`
    macro_rules! store_cases {
        ($($name:ident: ($m:expr, $req:expr, $st:expr, $resp:expr) => |$s:ident| $check:expr;)*) => {$(
            #[test]
            fn $name() {
                let $s = run($m, $req, $st, $resp);
                assert!($check, "got {:?}", $s);
            }
        )*};
    }

    const NONE: &[(&str, &str)] = &[];

    store_cases! {
        // RFC 9111 §3, §5.2.2.1
        rfc9111_3_get_with_max_age_is_stored: ("GET", NONE, 200, &[("cache-control", "max-age=60")]) => |s| life(s) == 60;
        // RFC 9111 §3: only GET responses are stored by this cache.
        rfc9111_3_head_not_stored: ("HEAD", NONE, 200, &[("cache-control", "max-age=60")]) => |s| why(s) == Some(NotStorable::Method);
        rfc9111_3_post_not_stored: ("POST", NONE, 200, &[("cache-control", "max-age=60")]) => |s| why(s) == Some(NotStorable::Method);
        // RFC 9110 §9.1: methods are case-sensitive.
        rfc9110_9_1_lowercase_get_not_understood: ("get", NONE, 200, &[("cache-control", "max-age=60")]) => |s| why(s) == Some(NotStorable::Method);
        // RFC 9111 §3.3: partial content is not stored.
        rfc9111_3_3_partial_content: ("GET", NONE, 206, &[("cache-control", "max-age=60")]) => |s| why(s) == Some(NotStorable::PartialContent);
        // RFC 9111 §3: final status only; 304 is never stored as such.
        rfc9111_3_304_not_stored: ("GET", NONE, 304, &[("cache-control", "max-age=60")]) => |s| why(s) == Some(NotStorable::Status);
        rfc9111_3_1xx_not_stored: ("GET", NONE, 103, &[("cache-control", "max-age=60")]) => |s| why(s) == Some(NotStorable::Status);
        rfc9110_15_out_of_range_status: ("GET", NONE, 600, &[("cache-control", "max-age=60")]) => |s| why(s) == Some(NotStorable::Status);
        rfc9110_15_zero_status: ("GET", NONE, 0, &[("cache-control", "max-age=60")]) => |s| why(s) == Some(NotStorable::Status);
        // RFC 9111 §5.2.2.5 / §5.2.1.5
        rfc9111_5_2_2_5_no_store: ("GET", NONE, 200, &[("cache-control", "max-age=60, no-store")]) => |s| why(s) == Some(NotStorable::NoStore);
        rfc9111_5_2_1_5_request_no_store: ("GET", &[("cache-control", "no-store")], 200, &[("cache-control", "max-age=60")]) => |s| why(s) == Some(NotStorable::RequestNoStore);
        // RFC 9111 §5.2.2.7
        rfc9111_5_2_2_7_private: ("GET", NONE, 200, &[("cache-control", "private, max-age=60")]) => |s| why(s) == Some(NotStorable::Private);
        rfc9111_5_2_2_7_qualified_private_is_stored: ("GET", NONE, 200, &[("cache-control", "private=\"x-user\", max-age=60")]) => |s| life(s) == 60;
        rfc9111_5_2_2_7_private_on_second_line: ("GET", NONE, 200, &[("cache-control", "max-age=60"), ("cache-control", "private")]) => |s| why(s) == Some(NotStorable::Private);
        // RFC 9111 §3.5
        rfc9111_3_5_authorization_blocks: ("GET", &[("authorization", "Bearer x")], 200, &[("cache-control", "max-age=60")]) => |s| why(s) == Some(NotStorable::Authorization);
        rfc9111_3_5_authorization_public: ("GET", &[("authorization", "Bearer x")], 200, &[("cache-control", "public, max-age=60")]) => |s| life(s) == 60;
        rfc9111_3_5_authorization_s_maxage: ("GET", &[("authorization", "Bearer x")], 200, &[("cache-control", "s-maxage=60")]) => |s| life(s) == 60;
        rfc9111_3_5_authorization_must_revalidate: ("GET", &[("authorization", "Bearer x")], 200, &[("cache-control", "must-revalidate, max-age=60")]) => |s| fr(s).must_revalidate;
        rfc9111_3_5_empty_authorization_still_counts: ("GET", &[("authorization", "")], 200, &[("cache-control", "max-age=60")]) => |s| why(s) == Some(NotStorable::Authorization);
        // Judgement: with a targeted field governing, Cache-Control's `public` does not count.
        rfc9213_2_2_authorization_needs_targeted_permission: ("GET", &[("authorization", "x")], 200, &[("cache-control", "public"), ("cdn-cache-control", "max-age=60")]) => |s| why(s) == Some(NotStorable::Authorization);
        // Set-Cookie is per user.
        rfc9111_3_1_set_cookie_not_shared: ("GET", NONE, 200, &[("cache-control", "max-age=60"), ("set-cookie", "a=1")]) => |s| why(s) == Some(NotStorable::SetCookie);
        rfc9111_5_2_2_7_private_set_cookie_lets_us_store: ("GET", NONE, 200, &[("cache-control", "max-age=60, private=\"Set-Cookie\""), ("set-cookie", "a=1")]) => |s| life(s) == 60;
        rfc9111_5_2_2_4_no_cache_set_cookie_lets_us_store: ("GET", NONE, 200, &[("cache-control", "max-age=60, no-cache=set-cookie"), ("set-cookie", "a=1")]) => |s| life(s) == 60 && !fr(s).no_cache;
        // RFC 9111 §4.1
        rfc9111_4_1_vary_star: ("GET", NONE, 200, &[("cache-control", "max-age=60"), ("vary", "*")]) => |s| why(s) == Some(NotStorable::VaryStar);
        rfc9111_4_1_vary_star_in_list: ("GET", NONE, 200, &[("cache-control", "max-age=60"), ("vary", "accept"), ("vary", "origin, *")]) => |s| why(s) == Some(NotStorable::VaryStar);
        rfc9111_4_1_vary_fields_stored: ("GET", NONE, 200, &[("cache-control", "max-age=60"), ("vary", "accept-encoding")]) => |s| life(s) == 60;
        // RFC 9111 §3, RFC 9110 §15.1: status not heuristically cacheable needs explicit freshness.
        rfc9110_15_1_302_without_freshness: ("GET", NONE, 302, &[("last-modified", &d(-1000))]) => |s| why(s) == Some(NotStorable::Status);
        rfc9110_15_1_302_with_max_age: ("GET", NONE, 302, &[("cache-control", "max-age=60")]) => |s| life(s) == 60;
        rfc9110_15_1_500_with_max_age: ("GET", NONE, 500, &[("cache-control", "max-age=5")]) => |s| life(s) == 5;
        rfc9110_15_1_503_without_freshness: ("GET", NONE, 503, NONE) => |s| why(s) == Some(NotStorable::Status);
        // RFC 9111 §5.2.2.9: public makes a non-heuristic status heuristically cacheable.
        rfc9111_5_2_2_9_public_302_heuristic: ("GET", NONE, 302, &[("cache-control", "public"), ("date", &d(0)), ("last-modified", &d(-1000))]) => |s| life(s) == 100;
        rfc9110_15_1_404_heuristic: ("GET", NONE, 404, &[("date", &d(0)), ("last-modified", &d(-1000))]) => |s| life(s) == 100;
        rfc9110_15_1_410_heuristic: ("GET", NONE, 410, &[("date", &d(0)), ("last-modified", &d(-2000))]) => |s| life(s) == 200;
        // RFC 9111 §4.2.2: 10% of Date − Last-Modified, capped, never negative.
        rfc9111_4_2_2_heuristic_ten_percent: ("GET", NONE, 200, &[("date", &d(0)), ("last-modified", &d(-1000))]) => |s| life(s) == 100;
        rfc9111_4_2_2_heuristic_capped_at_24h: ("GET", NONE, 200, &[("date", &d(0)), ("last-modified", &d(-100 * 86400))]) => |s| life(s) == 86400;
        rfc9111_4_2_2_heuristic_future_last_modified_is_zero: ("GET", NONE, 200, &[("date", &d(0)), ("last-modified", &d(500))]) => |s| life(s) == 0;
        rfc9111_4_2_2_heuristic_uses_response_time_without_date: ("GET", NONE, 200, &[("last-modified", &d(-1000))]) => |s| life(s) == 100;
        rfc9111_4_2_2_heuristic_invalid_last_modified_with_etag: ("GET", NONE, 200, &[("last-modified", "yesterday"), ("etag", "\"a\"")]) => |s| life(s) == 0;
        // RFC 9111 §3 note: no lifetime, no validator, no stale window → not worth storing.
        rfc9111_3_no_freshness_no_validator: ("GET", NONE, 200, NONE) => |s| why(s) == Some(NotStorable::NoFreshness);
        rfc9111_3_max_age_zero_without_validator: ("GET", NONE, 200, &[("cache-control", "max-age=0")]) => |s| why(s) == Some(NotStorable::NoFreshness);
        rfc9111_3_max_age_zero_with_etag_is_stored: ("GET", NONE, 200, &[("cache-control", "max-age=0"), ("etag", "\"v1\"")]) => |s| life(s) == 0;
        rfc5861_3_zero_lifetime_with_swr_is_stored: ("GET", NONE, 200, &[("cache-control", "max-age=0, stale-while-revalidate=30")]) => |s| fr(s).stale_while_revalidate == Duration::from_secs(30);
        // RFC 9111 §4.2.1 / §5.3: Expires − Date.
        rfc9111_4_2_1_expires_minus_date: ("GET", NONE, 200, &[("date", &d(0)), ("expires", &d(120))]) => |s| life(s) == 120;
        rfc9111_4_2_1_expires_uses_response_time_without_date: ("GET", NONE, 200, &[("expires", &d(90))]) => |s| life(s) == 90;
        rfc9111_4_2_1_expires_against_skewed_date: ("GET", NONE, 200, &[("date", &d(-3600)), ("expires", &d(-3000))]) => |s| life(s) == 600;
        rfc9111_5_3_expires_zero_is_expired: ("GET", NONE, 200, &[("expires", "0"), ("etag", "\"x\"")]) => |s| life(s) == 0;
        rfc9111_5_3_invalid_expires_without_validator: ("GET", NONE, 200, &[("expires", "-1")]) => |s| why(s) == Some(NotStorable::NoFreshness);
        rfc9111_5_3_expires_before_date: ("GET", NONE, 200, &[("date", &d(0)), ("expires", &d(-10)), ("etag", "\"x\"")]) => |s| life(s) == 0;
        rfc9111_5_3_non_gmt_expires_invalid: ("GET", NONE, 200, &[("expires", "Sun, 06 Nov 2033 08:49:37 PST"), ("etag", "\"x\"")]) => |s| life(s) == 0;
        rfc9111_4_2_1_repeated_different_expires_is_stale: ("GET", NONE, 200, &[("date", &d(0)), ("expires", &d(60)), ("expires", &d(600)), ("etag", "\"x\"")]) => |s| life(s) == 0;
        rfc9111_4_2_1_repeated_identical_expires_ok: ("GET", NONE, 200, &[("date", &d(0)), ("expires", &d(60)), ("expires", &d(60))]) => |s| life(s) == 60;
        rfc9111_4_2_1_same_instant_other_spelling_ok: ("GET", NONE, 200, &[("date", "Sun, 06 Nov 1994 08:49:37 GMT"), ("expires", "Sun, 06 Nov 1994 08:50:37 GMT"), ("expires", "sunday, 06-nov-94 08:50:37 gmt")]) => |s| life(s) == 60;
        rfc9111_4_2_1_repeated_expires_one_invalid_is_stale: ("GET", NONE, 200, &[("date", &d(0)), ("expires", &d(60)), ("expires", "never"), ("etag", "\"x\"")]) => |s| life(s) == 0;
        // RFC 9111 §4.2.1: repeated max-age / s-maxage: identical kept, differing considered stale.
        rfc9111_4_2_1_differing_max_age_stored_stale: ("GET", NONE, 200, &[("cache-control", "max-age=0, max-age=60"), ("etag", "\"x\"")]) => |s| life(s) == 0;
        rfc9111_4_2_1_differing_max_age_without_validator: ("GET", NONE, 200, &[("cache-control", "max-age=600"), ("cache-control", "max-age=60")]) => |s| why(s) == Some(NotStorable::NoFreshness);
        rfc9111_4_2_1_identical_max_age_lines: ("GET", NONE, 200, &[("cache-control", "max-age=60"), ("cache-control", "max-age=60")]) => |s| life(s) == 60;
        rfc9111_4_2_1_differing_s_maxage_stale: ("GET", NONE, 200, &[("cache-control", "s-maxage=60, s-maxage=600, max-age=600"), ("etag", "\"x\"")]) => |s| life(s) == 0;
        // RFC 9111 §4.2.1 "the most restrictive directive should be honored".
        rfc9111_4_2_1_public_private_is_private: ("GET", NONE, 200, &[("cache-control", "public, private, max-age=60")]) => |s| why(s) == Some(NotStorable::Private);
        rfc9111_4_2_1_public_no_store_is_no_store: ("GET", NONE, 200, &[("cache-control", "public, max-age=60, no-store")]) => |s| why(s) == Some(NotStorable::NoStore);
        rfc9111_4_2_1_no_store_on_other_line_wins: ("GET", NONE, 200, &[("cache-control", "public, max-age=60"), ("cache-control", "no-store")]) => |s| why(s) == Some(NotStorable::NoStore);
        // Expires suppresses heuristics even when invalid (it is explicit).
        rfc9111_4_2_2_invalid_expires_beats_heuristic: ("GET", NONE, 200, &[("expires", "never"), ("last-modified", &d(-100000))]) => |s| life(s) == 0;
        // RFC 9111 §5.3: max-age makes Expires ignored; s-maxage beats both (§4.2.1).
        rfc9111_5_3_max_age_beats_expires: ("GET", NONE, 200, &[("cache-control", "max-age=10"), ("date", &d(0)), ("expires", &d(1000))]) => |s| life(s) == 10;
        rfc9111_4_2_1_s_maxage_beats_max_age: ("GET", NONE, 200, &[("cache-control", "max-age=10, s-maxage=300")]) => |s| life(s) == 300;
        rfc9111_4_2_1_max_age_beats_heuristic: ("GET", NONE, 200, &[("cache-control", "max-age=5"), ("date", &d(0)), ("last-modified", &d(-100000))]) => |s| life(s) == 5;
        // RFC 9111 §4.2.1, §1.2.2: invalid or huge values.
        rfc9111_4_2_1_invalid_max_age_is_stale: ("GET", NONE, 200, &[("cache-control", "max-age=abc"), ("etag", "\"x\"")]) => |s| life(s) == 0;
        rfc9111_4_2_1_negative_max_age_is_stale: ("GET", NONE, 200, &[("cache-control", "max-age=-1"), ("etag", "\"x\"")]) => |s| life(s) == 0;
        rfc9111_1_2_2_huge_max_age_capped: ("GET", NONE, 200, &[("cache-control", "max-age=99999999999999999999")]) => |s| life(s) == 1 << 31;
        rfc9111_1_2_2_far_expires_capped: ("GET", NONE, 200, &[("date", &d(0)), ("expires", "Fri, 31 Dec 9999 23:59:59 GMT")]) => |s| life(s) == 1 << 31;
        // RFC 9111 §4.2.3 / §5.1: Age parsing.
        rfc9111_5_1_age_counts: ("GET", NONE, 200, &[("cache-control", "max-age=60"), ("age", "30")]) => |s| fr(s).corrected_initial_age == Duration::from_secs(30);
        rfc9111_5_1_non_numeric_age_ignored: ("GET", NONE, 200, &[("cache-control", "max-age=60"), ("age", "abc")]) => |s| fr(s).corrected_initial_age.is_zero();
        rfc9111_5_1_negative_age_ignored: ("GET", NONE, 200, &[("cache-control", "max-age=60"), ("age", "-5")]) => |s| fr(s).corrected_initial_age.is_zero();
        rfc9111_5_1_float_age_ignored: ("GET", NONE, 200, &[("cache-control", "max-age=60"), ("age", "1.5")]) => |s| fr(s).corrected_initial_age.is_zero();
        rfc9111_5_1_list_age_uses_first: ("GET", NONE, 200, &[("cache-control", "max-age=60"), ("age", "10, 20")]) => |s| fr(s).corrected_initial_age == Duration::from_secs(10);
        rfc9111_1_2_2_age_overflow_capped: ("GET", NONE, 200, &[("cache-control", "max-age=60"), ("age", "99999999999999999999")]) => |s| fr(s).corrected_initial_age == Duration::from_secs(1 << 31);
        rfc9111_4_2_3_apparent_age_from_old_date: ("GET", NONE, 200, &[("cache-control", "max-age=600"), ("date", &d(-100))]) => |s| fr(s).corrected_initial_age == Duration::from_secs(100);
        rfc9111_4_2_3_future_date_gives_zero_apparent_age: ("GET", NONE, 200, &[("cache-control", "max-age=600"), ("date", &d(100))]) => |s| fr(s).corrected_initial_age.is_zero();
        rfc9111_4_2_3_max_of_apparent_and_age: ("GET", NONE, 200, &[("cache-control", "max-age=600"), ("date", &d(-100)), ("age", "40")]) => |s| fr(s).corrected_initial_age == Duration::from_secs(100);
        rfc9111_4_2_3_invalid_date_ignored: ("GET", NONE, 200, &[("cache-control", "max-age=600"), ("date", "garbage")]) => |s| fr(s).corrected_initial_age.is_zero();
        // RFC 9111 §5.2.2.2, §5.2.2.8, §5.2.2.10: flags forbidding stale.
        rfc9111_5_2_2_2_must_revalidate_flag: ("GET", NONE, 200, &[("cache-control", "max-age=60, must-revalidate, stale-while-revalidate=9")]) => |s| fr(s).must_revalidate && fr(s).stale_while_revalidate.is_zero();
        rfc9111_5_2_2_8_proxy_revalidate_flag: ("GET", NONE, 200, &[("cache-control", "max-age=60, proxy-revalidate")]) => |s| fr(s).must_revalidate;
        rfc9111_5_2_2_10_s_maxage_implies_revalidate: ("GET", NONE, 200, &[("cache-control", "s-maxage=60, stale-if-error=300")]) => |s| fr(s).must_revalidate && fr(s).stale_if_error.is_zero();
        rfc9111_5_2_2_1_plain_max_age_not_must_revalidate: ("GET", NONE, 200, &[("cache-control", "max-age=60")]) => |s| !fr(s).must_revalidate && !fr(s).no_cache;
        // RFC 9111 §5.2.2.4
        rfc9111_5_2_2_4_no_cache_stored_with_flag: ("GET", NONE, 200, &[("cache-control", "no-cache, max-age=60, stale-while-revalidate=30")]) => |s| fr(s).no_cache && fr(s).stale_while_revalidate.is_zero();
        rfc9111_5_2_2_4_no_cache_without_validator_or_lifetime: ("GET", NONE, 200, &[("cache-control", "no-cache")]) => |s| why(s) == Some(NotStorable::NoFreshness);
        rfc9111_5_2_2_4_no_cache_with_etag: ("GET", NONE, 200, &[("cache-control", "no-cache"), ("etag", "\"e\"")]) => |s| fr(s).no_cache;
        // RFC 5861 windows.
        rfc5861_3_swr_recorded: ("GET", NONE, 200, &[("cache-control", "max-age=60, stale-while-revalidate=30")]) => |s| fr(s).stale_while_revalidate == Duration::from_secs(30);
        rfc5861_4_sie_recorded: ("GET", NONE, 200, &[("cache-control", "max-age=60, stale-if-error=300")]) => |s| fr(s).stale_if_error == Duration::from_secs(300);
        // RFC 9111 §5.2.2.3: must-understand lets an understood status ignore no-store.
        rfc9111_5_2_2_3_must_understand_overrides_no_store: ("GET", NONE, 200, &[("cache-control", "must-understand, no-store, max-age=60")]) => |s| life(s) == 60;
        rfc9111_5_2_2_3_must_understand_unknown_status: ("GET", NONE, 299, &[("cache-control", "must-understand, no-store, max-age=60")]) => |s| why(s) == Some(NotStorable::MustUnderstand);
        // RFC 9213 §2.2: CDN-Cache-Control replaces Cache-Control and Expires for us.
        rfc9213_2_2_cdn_overrides_no_store: ("GET", NONE, 200, &[("cache-control", "no-store"), ("cdn-cache-control", "max-age=600")]) => |s| life(s) == 600;
        rfc9213_2_2_cdn_no_store_wins: ("GET", NONE, 200, &[("cache-control", "max-age=600"), ("cdn-cache-control", "no-store")]) => |s| why(s) == Some(NotStorable::NoStore);
        rfc9213_2_2_cdn_private: ("GET", NONE, 200, &[("cache-control", "public, max-age=60"), ("cdn-cache-control", "private")]) => |s| why(s) == Some(NotStorable::Private);
        rfc9213_2_2_cdn_ignores_expires: ("GET", NONE, 200, &[("expires", &d(600)), ("cdn-cache-control", "must-revalidate"), ("date", &d(0)), ("last-modified", &d(-1000))]) => |s| life(s) == 100;
        rfc9213_2_1_invalid_cdn_falls_back: ("GET", NONE, 200, &[("cache-control", "max-age=60"), ("cdn-cache-control", "max-age=1.5")]) => |s| life(s) == 60;
        rfc9213_2_2_cdn_s_maxage: ("GET", NONE, 200, &[("cdn-cache-control", "s-maxage=90")]) => |s| life(s) == 90 && fr(s).must_revalidate;
        rfc9213_2_1_spaced_cdn_falls_back: ("GET", NONE, 200, &[("cache-control", "max-age=60"), ("cdn-cache-control", "max-age = 600")]) => |s| life(s) == 60;
        rfc9213_2_1_upper_case_cdn_falls_back: ("GET", NONE, 200, &[("cache-control", "no-store"), ("cdn-cache-control", "Max-Age=600")]) => |s| why(s) == Some(NotStorable::NoStore);
        rfc9213_2_1_cdn_last_duplicate_wins: ("GET", NONE, 200, &[("cdn-cache-control", "max-age=600, max-age=60")]) => |s| life(s) == 60;
        // W3C Edge Architecture Specification 1.0, Surrogate-Control: the fallback target.
        edge_arch_surrogate_control_max_age: ("GET", NONE, 200, &[("cache-control", "max-age=5"), ("surrogate-control", "max-age=500")]) => |s| life(s) == 500;
        edge_arch_surrogate_control_no_store: ("GET", NONE, 200, &[("cache-control", "max-age=5"), ("surrogate-control", "no-store")]) => |s| why(s) == Some(NotStorable::NoStore);
        // Adversarial values.
        rfc9111_5_2_empty_cache_control_value: ("GET", NONE, 200, &[("cache-control", ""), ("date", &d(0)), ("last-modified", &d(-1000))]) => |s| life(s) == 100;
        rfc9110_5_6_1_stray_separators_in_cache_control: ("GET", NONE, 200, &[("cache-control", ",;=, max-age=60 ;,")]) => |s| life(s) == 60;
        rfc9111_5_2_quoted_max_age_accepted: ("GET", NONE, 200, &[("cache-control", "max-age=\"60\"")]) => |s| life(s) == 60;
        rfc9111_4_2_1_fractional_max_age_stale: ("GET", NONE, 200, &[("cache-control", "max-age=1.5"), ("etag", "\"x\"")]) => |s| life(s) == 0;
    }

    #[test]
    fn rfc9111_4_2_3_response_delay_added() {
        let resp = list(&[("cache-control", "max-age=60"), ("age", "30")]);
        let s = storable(
            "GET",
            &HeaderList::new(),
            200,
            &resp,
            true,
            at(-5),
            at(0),
            &PolicyOptions::default(),
        );
        let f = fr(s);
        assert_eq!(f.corrected_initial_age, Duration::from_secs(35));
        assert_eq!(f.request_time, at(-5));
        assert_eq!(f.response_time, at(0));
    }

    #[test]
    fn rfc9111_4_2_3_request_after_response_is_not_negative() {
        let resp = list(&[("cache-control", "max-age=60")]);
        let f = fr(storable(
            "GET",
            &HeaderList::new(),
            200,
            &resp,
            true,
            at(5),
            at(0),
            &PolicyOptions::default(),
        ));
        assert!(f.corrected_initial_age.is_zero());
    }

    #[test]
    fn rfc9111_3_1_options_share_set_cookie() {
        let o = PolicyOptions {
            share_set_cookie: true,
            ..PolicyOptions::default()
        };
        let s = run_with(
            "GET",
            NONE,
            200,
            &[("cache-control", "max-age=60"), ("set-cookie", "a=1")],
            &o,
        );
        assert_eq!(life(s), 60);
    }

    #[test]
    fn rfc9111_4_2_2_options_heuristic_fraction_and_cap() {
        let o = PolicyOptions {
            heuristic_fraction_percent: 50,
            max_heuristic_lifetime: Duration::from_secs(300),
            ..PolicyOptions::default()
        };
        let resp = [("date", d(0)), ("last-modified", d(-400))];
        let resp: Vec<(&str, &str)> = resp.iter().map(|(n, v)| (*n, v.as_str())).collect();
        assert_eq!(life(run_with("GET", NONE, 200, &resp, &o)), 200);
        let far = [("date", d(0)), ("last-modified", d(-4000))];
        let far: Vec<(&str, &str)> = far.iter().map(|(n, v)| (*n, v.as_str())).collect();
        assert_eq!(life(run_with("GET", NONE, 200, &far, &o)), 300);
    }

    // RFC 5861 §4: the operator default applies only where the response allows stale and gives none.
    #[test]
    fn rfc5861_4_default_stale_if_error() {
        let o = PolicyOptions {
            default_stale_if_error: Duration::from_secs(3600),
            ..PolicyOptions::default()
        };
        let plain = run_with("GET", NONE, 200, &[("cache-control", "max-age=60")], &o);
        assert_eq!(fr(plain).stale_if_error, Duration::from_secs(3600));
        let explicit = run_with(
            "GET",
            NONE,
            200,
            &[("cache-control", "max-age=60, stale-if-error=0")],
            &o,
        );
        assert!(fr(explicit).stale_if_error.is_zero());
        let strict = run_with(
            "GET",
            NONE,
            200,
            &[("cache-control", "max-age=60, must-revalidate")],
            &o,
        );
        assert!(fr(strict).stale_if_error.is_zero());
        // A zero-lifetime response without validators is worth storing for the error window.
        let bare = run_with("GET", NONE, 200, &[("cache-control", "max-age=0")], &o);
        assert_eq!(fr(bare).stale_if_error, Duration::from_secs(3600));
    }

    #[test]
    fn rfc9111_3_huge_and_binary_response_headers() {
        let mut resp = HeaderList::new();
        resp.push(
            "cache-control",
            format!("{}max-age=60", "x-pad=1, ".repeat(12_000)),
        );
        resp.push("date", vec![0xff; 40]);
        resp.push("x-binary", vec![0u8, 0xff, b'\r', b'\n']);
        let s = storable(
            "GET",
            &HeaderList::new(),
            200,
            &resp,
            true,
            at(0),
            at(0),
            &PolicyOptions::default(),
        );
        assert_eq!(life(s), 60);
    }

    // RFC 9211 §2.8: the `detail` token is an sf-token; ours are kebab-case.
    #[test]
    fn rfc9211_2_8_not_storable_tokens_are_kebab_case() {
        let all = [
            NotStorable::Method,
            NotStorable::Status,
            NotStorable::PartialContent,
            NotStorable::NoStore,
            NotStorable::RequestNoStore,
            NotStorable::Private,
            NotStorable::Authorization,
            NotStorable::VaryStar,
            NotStorable::NoFreshness,
            NotStorable::SetCookie,
            NotStorable::MustUnderstand,
            NotStorable::Incomplete,
        ];
        for w in all {
            let t = w.as_str();
            assert!(
                !t.is_empty() && t.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'),
                "{t}"
            );
        }
        assert_eq!(NotStorable::VaryStar.as_str(), "vary-star");
    }

    // RFC 9211 §2.8: each reason is told apart in Cache-Status `detail=` (and metric labels),
    // so every variant has its own token, and these tokens are an interface: pinned here.
    #[test]
    fn rfc9211_2_8_each_reason_has_its_own_detail_token() {
        use NotStorable as W;
        let table = [
            (W::Method, "method"),
            (W::Status, "status"),
            (W::PartialContent, "partial-content"),
            (W::NoStore, "no-store"),
            (W::RequestNoStore, "request-no-store"),
            (W::Private, "private"),
            (W::Authorization, "authorization"),
            (W::VaryStar, "vary-star"),
            (W::NoFreshness, "no-freshness"),
            (W::SetCookie, "set-cookie"),
            (W::MustUnderstand, "must-understand"),
            (W::Incomplete, "incomplete"),
        ];
        // Adding a variant without a row fails to compile here.
        for (w, _) in &table {
            match w {
                W::Method
                | W::Status
                | W::PartialContent
                | W::NoStore
                | W::RequestNoStore
                | W::Private
                | W::Authorization
                | W::VaryStar
                | W::NoFreshness
                | W::SetCookie
                | W::MustUnderstand
                | W::Incomplete => {}
            }
        }
        let mut tokens = std::collections::HashSet::new();
        let mut reasons = std::collections::HashSet::new();
        for (w, token) in table {
            assert_eq!(w.as_str(), token, "{w:?}");
            assert!(tokens.insert(token), "token {token} used twice");
            assert!(reasons.insert(w), "{w:?} listed twice");
        }
    }

    // RFC 9111 §3.3: only complete responses are stored; the caller says whether the body is.
    #[test]
    fn rfc9111_3_3_incomplete_body_not_stored() {
        let resp = list(&[("cache-control", "public, max-age=600"), ("etag", "\"a\"")]);
        let none = HeaderList::new();
        let o = PolicyOptions::default();
        let cut = storable("GET", &none, 200, &resp, false, at(0), at(0), &o);
        assert_eq!(why(cut), Some(NotStorable::Incomplete));
        assert_eq!(
            life(storable("GET", &none, 200, &resp, true, at(0), at(0), &o)),
            600
        );
        // A reason decided earlier (method, status) still names the first rule broken.
        let post = storable("POST", &none, 200, &resp, false, at(0), at(0), &o);
        assert_eq!(why(post), Some(NotStorable::Method));
    }

    // RFC 9111 §5.2.1.7: with nothing stored, only-if-cached means 504, not a fetch.
    #[test]
    fn rfc9111_5_2_1_7_miss_is_unusable() {
        assert!(miss_is_unusable(&list(&[(
            "cache-control",
            "only-if-cached"
        )])));
        assert!(miss_is_unusable(&list(&[(
            "cache-control",
            "max-stale, Only-If-Cached"
        )])));
        assert!(!miss_is_unusable(&list(&[("cache-control", "max-stale")])));
        assert!(!miss_is_unusable(&list(&[("pragma", "only-if-cached")])));
        assert!(!miss_is_unusable(&HeaderList::new()));
    }

    // ---- lookup -------------------------------------------------------------------------

    /// A stored response received at T0 with `age0` already on it.
    fn stored(lifetime: u64, age0: u64, swr: u64, sie: u64) -> Freshness {
        Freshness {
            request_time: at(0),
            response_time: at(0),
            corrected_initial_age: Duration::from_secs(age0),
            lifetime: Duration::from_secs(lifetime),
            stale_while_revalidate: Duration::from_secs(swr),
            stale_if_error: Duration::from_secs(sie),
            must_revalidate: false,
            no_cache: false,
        }
    }

    fn strict(mut f: Freshness) -> Freshness {
        f.must_revalidate = true;
        f
    }

    fn no_cache(mut f: Freshness) -> Freshness {
        f.no_cache = true;
        f
    }

    const BG: Lookup = Lookup::Stale {
        revalidate_in_background: true,
    };
    const STALE: Lookup = Lookup::Stale {
        revalidate_in_background: false,
    };

    /// One `#[test]` per row: `name: (request, stored freshness, seconds after T0) => expected;`
    macro_rules! lookup_cases {
        ($($name:ident: ($req:expr, $f:expr, $now:expr) => $want:expr;)*) => {$(
            #[test]
            fn $name() {
                assert_eq!(lookup(&list($req), &$f, at($now)), $want);
            }
        )*};
    }

    lookup_cases! {
        // RFC 9111 §4.2: fresh iff lifetime > current_age.
        rfc9111_4_2_fresh_hit: (NONE, stored(60, 0, 0, 0), 30) => Lookup::Fresh;
        rfc9111_4_2_boundary_is_stale: (NONE, stored(60, 0, 0, 0), 60) => Lookup::MustRevalidate;
        rfc9111_4_2_3_initial_age_counts: (NONE, stored(60, 50, 0, 0), 10) => Lookup::MustRevalidate;
        rfc9111_4_2_4_stale_without_permission: (NONE, stored(60, 0, 0, 0), 100) => Lookup::MustRevalidate;
        rfc9111_4_2_3_clock_backwards_still_fresh: (NONE, stored(60, 0, 0, 0), -100) => Lookup::Fresh;
        // RFC 5861 §3
        rfc5861_3_swr_inside_window: (NONE, stored(60, 0, 30, 0), 80) => BG;
        rfc5861_3_swr_window_end_inclusive: (NONE, stored(60, 0, 30, 0), 90) => BG;
        rfc5861_3_swr_past_window: (NONE, stored(60, 0, 30, 0), 91) => Lookup::MustRevalidate;
        rfc5861_3_swr_fresh_is_fresh: (NONE, stored(60, 0, 30, 0), 59) => Lookup::Fresh;
        rfc5861_4_sie_does_not_serve_stale_on_lookup: (NONE, stored(60, 0, 0, 300), 100) => Lookup::MustRevalidate;
        // RFC 9111 §4.2.4: must-revalidate / s-maxage / proxy-revalidate forbid stale.
        rfc9111_4_2_4_must_revalidate_blocks_swr: (NONE, strict(stored(60, 0, 30, 0)), 80) => Lookup::MustRevalidate;
        rfc9111_4_2_4_must_revalidate_blocks_max_stale: (&[("cache-control", "max-stale")], strict(stored(60, 0, 0, 0)), 80) => Lookup::MustRevalidate;
        rfc9111_5_2_2_2_must_revalidate_fresh_ok: (NONE, strict(stored(60, 0, 0, 0)), 10) => Lookup::Fresh;
        // RFC 9111 §5.2.2.4: stored no-cache always revalidates.
        rfc9111_5_2_2_4_stored_no_cache: (NONE, no_cache(stored(60, 0, 0, 0)), 1) => Lookup::MustRevalidate;
        rfc9111_5_2_2_4_stored_no_cache_beats_max_stale: (&[("cache-control", "max-stale")], no_cache(stored(60, 0, 0, 0)), 100) => Lookup::MustRevalidate;
        // RFC 9111 §5.2.1.4, §5.4
        rfc9111_5_2_1_4_request_no_cache: (&[("cache-control", "no-cache")], stored(60, 0, 0, 0), 1) => Lookup::MustRevalidate;
        rfc9111_5_4_pragma_no_cache: (&[("pragma", "no-cache")], stored(60, 0, 0, 0), 1) => Lookup::MustRevalidate;
        rfc9111_5_4_pragma_ignored_with_cache_control: (&[("pragma", "no-cache"), ("cache-control", "max-stale=0")], stored(60, 0, 0, 0), 1) => Lookup::Fresh;
        rfc9111_5_4_other_pragma_ignored: (&[("pragma", "x-foo")], stored(60, 0, 0, 0), 1) => Lookup::Fresh;
        // RFC 9111 §5.2.1.1
        rfc9111_5_2_1_1_max_age_zero: (&[("cache-control", "max-age=0")], stored(60, 0, 0, 0), 1) => Lookup::MustRevalidate;
        rfc9111_5_2_1_1_max_age_zero_at_age_zero: (&[("cache-control", "max-age=0")], stored(60, 0, 0, 0), 0) => Lookup::Fresh;
        rfc9111_5_2_1_1_max_age_satisfied: (&[("cache-control", "max-age=100")], stored(200, 0, 0, 0), 50) => Lookup::Fresh;
        rfc9111_5_2_1_1_max_age_exceeded_while_fresh: (&[("cache-control", "max-age=100")], stored(200, 0, 0, 0), 150) => Lookup::MustRevalidate;
        rfc9111_5_2_1_1_max_age_refuses_swr: (&[("cache-control", "max-age=100")], stored(60, 0, 60, 0), 80) => Lookup::MustRevalidate;
        rfc9111_5_2_1_1_max_age_with_max_stale_allows_swr: (&[("cache-control", "max-age=100, max-stale=30")], stored(60, 0, 60, 0), 80) => BG;
        // RFC 9111 §5.2.1.2 "by no more than the specified number of seconds": max-stale=N caps
        // what the client accepts, also inside the origin's stale-while-revalidate window.
        rfc9111_5_2_1_2_max_stale_caps_swr_with_max_age: (&[("cache-control", "max-age=100, max-stale=1")], stored(60, 0, 60, 0), 80) => Lookup::MustRevalidate;
        rfc9111_5_2_1_2_max_stale_caps_swr: (&[("cache-control", "max-stale=5")], stored(60, 0, 60, 0), 80) => Lookup::MustRevalidate;
        rfc9111_5_2_1_2_max_stale_cap_inclusive_in_swr: (&[("cache-control", "max-stale=20")], stored(60, 0, 60, 0), 80) => BG;
        rfc9111_5_2_1_2_max_stale_larger_than_swr: (&[("cache-control", "max-stale=100")], stored(60, 0, 30, 0), 120) => STALE;
        rfc9111_5_2_1_2_max_stale_zero_blocks_swr: (&[("cache-control", "max-stale=0")], stored(60, 0, 30, 0), 61) => Lookup::MustRevalidate;
        rfc9111_5_2_1_2_max_stale_zero_does_not_extend: (&[("cache-control", "max-stale=0")], stored(60, 0, 0, 0), 60) => Lookup::MustRevalidate;
        rfc9111_5_2_1_2_max_stale_zero_fresh_is_fresh: (&[("cache-control", "max-stale=0")], stored(60, 0, 30, 0), 59) => Lookup::Fresh;
        rfc9111_5_2_1_2_invalid_max_stale_is_zero: (&[("cache-control", "max-stale=soon")], stored(60, 0, 30, 0), 70) => Lookup::MustRevalidate;
        rfc9111_5_2_1_2_smallest_repeated_max_stale_caps: (&[("cache-control", "max-stale=50, max-stale=5")], stored(60, 0, 0, 0), 80) => Lookup::MustRevalidate;
        rfc9111_5_2_1_1_invalid_max_age_is_zero: (&[("cache-control", "max-age=soon")], stored(60, 0, 0, 0), 1) => Lookup::MustRevalidate;
        // RFC 9111 §5.2.1.3
        rfc9111_5_2_1_3_min_fresh_unmet: (&[("cache-control", "min-fresh=60")], stored(100, 0, 0, 0), 50) => Lookup::MustRevalidate;
        rfc9111_5_2_1_3_min_fresh_met: (&[("cache-control", "min-fresh=40")], stored(100, 0, 0, 0), 50) => Lookup::Fresh;
        rfc9111_5_2_1_3_min_fresh_refuses_swr: (&[("cache-control", "min-fresh=1")], stored(60, 0, 60, 0), 80) => Lookup::MustRevalidate;
        // RFC 9111 §5.2.1.2
        rfc9111_5_2_1_2_max_stale_any: (&[("cache-control", "max-stale")], stored(60, 0, 0, 0), 100_000) => STALE;
        rfc9111_5_2_1_2_max_stale_within: (&[("cache-control", "max-stale=10")], stored(60, 0, 0, 0), 65) => STALE;
        rfc9111_5_2_1_2_max_stale_exceeded: (&[("cache-control", "max-stale=10")], stored(60, 0, 0, 0), 75) => Lookup::MustRevalidate;
        rfc9111_5_2_1_2_max_stale_fresh_is_fresh: (&[("cache-control", "max-stale")], stored(60, 0, 0, 0), 10) => Lookup::Fresh;
        rfc9111_5_2_1_2_swr_preferred_over_max_stale: (&[("cache-control", "max-stale")], stored(60, 0, 30, 0), 70) => BG;
        rfc9111_5_2_1_2_max_stale_beyond_swr: (&[("cache-control", "max-stale")], stored(60, 0, 30, 0), 200) => STALE;
        // RFC 9111 §5.2.1.7: only-if-cached serves what the other constraints allow, and answers
        // 504 (Unusable) where the origin would otherwise be asked.
        rfc9111_5_2_1_7_only_if_cached_fresh: (&[("cache-control", "only-if-cached")], stored(60, 0, 0, 0), 1) => Lookup::Fresh;
        rfc9111_5_2_1_7_only_if_cached_stale_is_unusable: (&[("cache-control", "only-if-cached")], stored(60, 0, 0, 0), 100) => Lookup::Unusable;
        rfc9111_5_2_1_7_only_if_cached_with_max_stale: (&[("cache-control", "only-if-cached, max-stale")], stored(60, 0, 0, 0), 100) => STALE;
        rfc9111_5_2_1_7_only_if_cached_in_swr_window: (&[("cache-control", "only-if-cached")], stored(60, 0, 60, 0), 100) => BG;
        rfc9111_5_2_1_7_only_if_cached_with_no_cache: (&[("cache-control", "only-if-cached, no-cache")], stored(60, 0, 0, 0), 1) => Lookup::Unusable;
        rfc9111_5_2_1_7_only_if_cached_stored_no_cache: (&[("cache-control", "only-if-cached")], no_cache(stored(60, 0, 0, 0)), 1) => Lookup::Unusable;
        rfc9111_5_2_1_7_only_if_cached_must_revalidate: (&[("cache-control", "only-if-cached, max-stale")], strict(stored(60, 0, 0, 0)), 100) => Lookup::Unusable;
        rfc9111_5_2_1_7_only_if_cached_max_age_exceeded: (&[("cache-control", "max-age=10, only-if-cached")], stored(60, 0, 0, 0), 30) => Lookup::Unusable;
        rfc9111_5_2_1_7_only_if_cached_second_line: (&[("cache-control", "max-stale=1"), ("Cache-Control", "ONLY-IF-CACHED")], stored(60, 0, 0, 0), 100) => Lookup::Unusable;
        rfc9111_5_4_pragma_no_cache_without_only_if_cached: (&[("pragma", "no-cache")], stored(60, 0, 0, 0), 100) => Lookup::MustRevalidate;
        // Zero lifetime entries (stored for their validators) always revalidate.
        rfc9111_4_3_zero_lifetime_revalidates: (NONE, stored(0, 0, 0, 0), 0) => Lookup::MustRevalidate;
        rfc9111_1_2_2_huge_freshness_values_do_not_overflow: (NONE, stored(u64::MAX, u64::MAX / 2, u64::MAX / 2, 0), 10) => Lookup::Fresh;
        rfc9111_1_2_2_huge_age_with_huge_window_does_not_overflow: (&[("cache-control", "min-fresh=99999999999999999999")], stored(u64::MAX / 2, u64::MAX / 2, u64::MAX, 0), 10) => Lookup::MustRevalidate;
    }

    // ---- stale-if-error -----------------------------------------------------------------

    /// One `#[test]` per row: `name: (request, stored freshness, seconds after T0) => bool;`
    macro_rules! error_cases {
        ($($name:ident: ($req:expr, $f:expr, $now:expr) => $want:expr;)*) => {$(
            #[test]
            fn $name() {
                assert_eq!(may_serve_stale_on_error(&list($req), &$f, at($now)), $want);
            }
        )*};
    }

    error_cases! {
        rfc5861_4_fresh_served_on_error: (NONE, stored(60, 0, 0, 0), 10) => true;
        rfc5861_4_within_window: (NONE, stored(60, 0, 0, 300), 200) => true;
        rfc5861_4_past_window: (NONE, stored(60, 0, 0, 300), 400) => false;
        rfc5861_4_no_window: (NONE, stored(60, 0, 0, 0), 61) => false;
        rfc5861_4_swr_is_not_sie: (NONE, stored(60, 0, 300, 0), 100) => false;
        rfc9111_5_2_2_2_must_revalidate_never_on_error: (NONE, strict(stored(60, 0, 0, 300)), 100) => false;
        rfc9111_5_2_2_2_must_revalidate_fresh_ok_on_error: (NONE, strict(stored(60, 0, 0, 0)), 10) => true;
        rfc9111_5_2_2_4_no_cache_never_on_error: (NONE, no_cache(stored(60, 0, 0, 300)), 10) => false;
        rfc5861_4_request_stale_if_error: (&[("cache-control", "stale-if-error=100")], stored(60, 0, 0, 0), 150) => true;
        rfc5861_4_request_stale_if_error_exceeded: (&[("cache-control", "stale-if-error=100")], stored(60, 0, 0, 0), 170) => false;
        rfc9111_5_2_1_2_request_max_stale_on_error: (&[("cache-control", "max-stale")], stored(60, 0, 0, 0), 9999) => true;
        rfc9111_5_2_1_2_request_max_stale_limit_on_error: (&[("cache-control", "max-stale=50")], stored(60, 0, 0, 0), 100) => true;
        rfc9111_5_2_1_2_request_max_stale_limit_exceeded_on_error: (&[("cache-control", "max-stale=50")], stored(60, 0, 0, 0), 120) => false;
        rfc9111_5_2_1_2_request_max_stale_zero_on_error: (&[("cache-control", "max-stale=0")], stored(60, 0, 0, 0), 60) => false;
    }

    #[test]
    fn rfc9111_5_1_age_seconds_floor_and_cap() {
        let f = stored(60, 5, 0, 0);
        assert_eq!(age_seconds(&f, at(10)), 15);
        let later = at(10) + Duration::from_millis(999);
        assert_eq!(age_seconds(&f, later), 15);
        assert_eq!(age_seconds(&f, at(-50)), 5);
        let old = stored(60, u64::MAX / 2, 0, 0);
        assert_eq!(age_seconds(&old, at(0)), 1 << 31);
    }

    // Whole path: store, then look up at several times (RFC 9111 §4.2 + RFC 5861 §3).
    #[test]
    fn rfc9111_4_2_storable_then_lookup_timeline() {
        let resp = list(&[
            ("date", &d(0)),
            ("cache-control", "max-age=100, stale-while-revalidate=50"),
            ("age", "20"),
        ]);
        let f = fr(storable(
            "GET",
            &HeaderList::new(),
            200,
            &resp,
            true,
            at(0),
            at(0),
            &PolicyOptions::default(),
        ));
        let req = HeaderList::new();
        assert_eq!(lookup(&req, &f, at(79)), Lookup::Fresh);
        assert_eq!(lookup(&req, &f, at(80)), BG);
        assert_eq!(lookup(&req, &f, at(130)), BG);
        assert_eq!(lookup(&req, &f, at(131)), Lookup::MustRevalidate);
        assert_eq!(age_seconds(&f, at(30)), 50);
    }
}
