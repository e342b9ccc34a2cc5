//! The request path: key → store lookup → policy decision → hit, or a fetch from the origin that is stored on the way back.
//!
//! This is the only module that joins HTTP I/O (actix) with `policy` and `store`. The hit
//! path is `handle` → `lookup_cached` → `respond::from_variant`; everything that talks to the
//! origin lives in `fetch`, and its futures are boxed where they are awaited so that the
//! future every request allocates stays the size of the hit path's.

mod fetch;
mod flight;
mod guard;
mod range;
mod respond;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use actix_web::{HttpRequest, HttpResponse, web};

use crate::clock::Clock;
use crate::key::PrimaryKey;
use crate::metrics::Metrics;
use crate::policy::{self, HeaderList, Lookup, PolicyOptions};
use crate::store::{Entry, Store, Variant, Variants};
use crate::upstream::Upstream;

pub use flight::Flights;
pub use guard::RequestLimits;
pub use respond::CacheStatus;

/// What every worker shares: the store, the rules, the clock, the fetches in flight, metrics.
pub struct ProxyState {
    pub store: Store,
    pub policy: PolicyOptions,
    pub clock: Arc<dyn Clock>,
    /// Bodies above this are passed through unstored.
    pub max_object_size: u64,
    /// A Range miss fetches and stores the full object only up to this size; for a larger one
    /// nothing is stored, and a range beyond this many bytes goes to the origin as sent.
    pub range_fill_max: u64,
    /// Origin fetches in progress, shared by the requests that wait for them.
    pub flights: Arc<Flights>,
    pub metrics: Arc<Metrics>,
    /// Bounds on the request target and header section (414, 431).
    pub limits: RequestLimits,
    /// Background refreshes waiting on the origin at once (`[cache] max_background_refreshes`).
    pub refresh_slots: Arc<tokio::sync::Semaphore>,
}

/// One client request, reduced to what the cache logic needs.
#[derive(Clone)]
pub(crate) struct RequestCtx {
    pub method: String,
    pub is_head: bool,
    pub host: String,
    pub path_and_query: String,
    pub headers: HeaderList,
    pub peer: Option<IpAddr>,
    pub now: SystemTime,
    /// Set on the fetch a Range request leads: store the full response only up to this size
    /// (see `fetch::deliver` and `fetch::reads_unstored_range`).
    pub range_fill_max: Option<u64>,
}

impl RequestCtx {
    /// The absolute URL as the client asked for it; the cache key and purge URLs use this form.
    fn url(&self) -> String {
        format!("http://{}{}", self.host, self.path_and_query)
    }
}

/// The proxy's only route: every method and path arrives here.
pub async fn handle(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<ProxyState>,
    upstream: web::Data<Upstream>,
) -> HttpResponse {
    let host = match guard::admit(&req, &state.limits) {
        Ok(host) => host,
        Err(refusal) => return *refusal,
    };
    let mut headers: HeaderList = req
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .collect();
    guard::neutralize(&mut headers, &host);
    let ctx = RequestCtx {
        method: req.method().as_str().to_string(),
        is_head: req.method() == actix_web::http::Method::HEAD,
        host,
        path_and_query: req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
        headers,
        peer: req.peer_addr().map(|a| a.ip()),
        now: state.clock.now(),
        range_fill_max: None,
    };

    // Only complete GET/HEAD responses are cached. A Range request is served from (or fills)
    // the full stored response; a cache fetch never forwards Range (fetch::CLIENT_ONLY_FIELDS),
    // so a 206 is never mistaken for the full representation.
    if ctx.method != "GET" && !ctx.is_head {
        return Box::pin(fetch::pass(
            &ctx,
            &state,
            &upstream,
            Some(payload),
            "method",
        ))
        .await;
    }
    lookup_cached(ctx, state, upstream).await
}

async fn lookup_cached(
    ctx: RequestCtx,
    state: web::Data<ProxyState>,
    upstream: web::Data<Upstream>,
) -> HttpResponse {
    let primary = PrimaryKey::new("http", &ctx.host, &ctx.path_and_query);
    let variants = match state.store.lookup(&primary) {
        Ok(v) => v,
        Err(e) => {
            // A store fault must not take the request down with it: go to the origin.
            tracing::warn!(url = %primary.url(), error = %e, "store lookup failed");
            Variants::from(Vec::new())
        }
    };
    let url_known = !variants.is_empty();
    let Some(variant) = selected(&variants, &ctx.headers, &state.policy) else {
        if policy::miss_is_unusable(&ctx.headers) {
            return respond::only_if_cached_miss();
        }
        if ctx.is_head {
            // A HEAD miss would store no body; ask the origin and store nothing. RFC 9211 §2.2:
            // `fwd=request` is "the request itself" bypassing the cache, counted as a pass.
            return Box::pin(fetch::pass(&ctx, &state, &upstream, None, "request")).await;
        }
        let fwd = if url_known { "vary-miss" } else { "miss" };
        return Box::pin(fetch::fetch_for_cache(
            &ctx, &state, &upstream, primary, None, fwd,
        ))
        .await;
    };

    let (key, entry) = (&variant.key, &variant.entry);
    match policy::lookup(&ctx.headers, &entry.freshness, ctx.now) {
        Lookup::Fresh => {
            let status = CacheStatus::hit(entry, ctx.now);
            if let Some(resp) = respond::from_variant(&ctx, &state, variant, status).await {
                return resp;
            }
        }
        Lookup::Stale {
            revalidate_in_background,
        } => {
            let detail = if revalidate_in_background {
                fetch::refresh_in_background(&ctx, &state, &upstream, &primary, key, entry);
                "stale-while-revalidate"
            } else {
                "stale"
            };
            let status = CacheStatus::hit(entry, ctx.now).with_detail(detail);
            if let Some(resp) = respond::from_variant(&ctx, &state, variant, status).await {
                return resp;
            }
        }
        Lookup::Unusable => return respond::only_if_cached_miss(),
        Lookup::MustRevalidate => {
            return Box::pin(fetch::fetch_for_cache(
                &ctx,
                &state,
                &upstream,
                primary,
                Some((*key, entry.clone())),
                "stale",
            ))
            .await;
        }
    }
    // The stored body was damaged or missing; the store has dropped the entry. Fetch anew,
    // unless the client allows nothing but the cache (RFC 9111 §5.2.1.7).
    if policy::miss_is_unusable(&ctx.headers) {
        return respond::only_if_cached_miss();
    }
    Box::pin(fetch::fetch_for_cache(
        &ctx, &state, &upstream, primary, None, "miss",
    ))
    .await
}

/// The stored variant this request selects (RFC 9111 §4.1): the newest one whose Vary'd
/// request values equal this request's. Borrows the store's shared copy: the hit path never
/// clones.
fn selected<'v>(
    variants: &'v [Variant],
    req: &HeaderList,
    opts: &PolicyOptions,
) -> Option<&'v Variant> {
    variants
        .iter()
        .filter(|v| vary_matches(&v.entry, req, opts))
        .max_by_key(|v| v.entry.freshness.response_time)
}

/// True if `entry` is the variant for a request with headers `req` (its Vary'd values match).
fn vary_matches(entry: &Entry, req: &HeaderList, opts: &PolicyOptions) -> bool {
    entry.vary.is_empty() || {
        let fields: Vec<String> = entry.vary.iter().map(|(name, _)| name.clone()).collect();
        policy::vary_values(&fields, req, opts) == entry.vary
    }
}
