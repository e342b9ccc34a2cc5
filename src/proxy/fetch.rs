//! Everything that goes to the origin: pass-through, the single-flight cache fetch (miss, revalidation, background refresh), the tee into the store, invalidation.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix_web::body::{BodyStream, None as NoBody, SizedStream};
use actix_web::{HttpResponse, HttpResponseBuilder, web};
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use tokio::sync::mpsc;

use super::flight::{Flight, FlightKey, LeadGuard, Outcome, Reader, Share, SharedHead};
use super::range;
use super::respond::{self, CacheStatus};
use super::{ProxyState, RequestCtx};
use crate::key::{PrimaryKey, VariantKey};
use crate::policy::{self, HeaderList, Lookup, Storable, Vary};
use crate::store::{BodyInfo, BodyWriter, Entry, StoreError, Variants};
use crate::upstream::{Upstream, UpstreamBody, UpstreamError, UpstreamResponse};

/// Request fields a cache fetch must not forward: the client's own conditionals and ranges
/// (we want the full response to store, and answer those from it).
const CLIENT_ONLY_FIELDS: [&str; 6] = [
    "if-none-match",
    "if-modified-since",
    "if-match",
    "if-unmodified-since",
    "if-range",
    "range",
];

/// Chunks in flight between the origin reader and a lone client before the reader waits.
const CLIENT_CHANNEL_CHUNKS: usize = 16;

type ClientChunk = Result<Bytes, std::io::Error>;

/// Forwards a request the cache does not serve (unsafe methods, ranges, HEAD misses) and
/// applies RFC 9111 §4.4 invalidation to what it changed.
pub(crate) async fn pass(
    ctx: &RequestCtx,
    state: &ProxyState,
    upstream: &Upstream,
    payload: Option<web::Payload>,
    fwd: &str,
) -> HttpResponse {
    let headers = forward_headers(ctx);
    let body_len = ctx
        .headers
        .get_str("content-length")
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = ctx.headers.contains("transfer-encoding");
    let (method, path) = (ctx.method.as_str(), ctx.path_and_query.as_str());
    let timer = state.metrics.origin_latency.start_timer();
    // Keep the client's framing: a sized body stays sized, a chunked one stays a stream.
    let sent = match (payload, body_len) {
        (Some(p), _) if chunked => {
            upstream
                .send(method, path, &headers, BodyStream::new(p))
                .await
        }
        (Some(p), Some(n)) if n > 0 => {
            upstream
                .send(method, path, &headers, SizedStream::new(n, p))
                .await
        }
        _ => upstream.send(method, path, &headers, ()).await,
    };
    timer.observe_duration();
    let mut resp = match sent {
        Ok(resp) => resp,
        Err(e) => return origin_error(&e, &CacheStatus::fwd(fwd)),
    };
    if policy::is_unsafe_method(&ctx.method) {
        invalidate(ctx, state, resp.status, &resp.headers).await;
    }
    prepare_response_headers(&mut resp.headers, state.clock.now());
    let cache_status = CacheStatus::fwd(fwd).with_fwd_status(resp.status);
    let length = content_length(&resp.headers);
    let builder = respond::from_origin_head(resp.status, &resp.headers, &cache_status);
    let (tx, rx) = mpsc::channel(CLIENT_CHANNEL_CHUNKS);
    actix_web::rt::spawn(tee(
        resp.body,
        None,
        Sink::Client(tx),
        length,
        u64::MAX,
        None,
    ));
    finish_body(
        builder,
        ctx.is_head,
        resp.status,
        length,
        receiver_stream(rx),
    )
}

/// How many flights one request may try (its variant's, after a leader's answer turned out to
/// be for another variant or not for sharing) before it fetches on its own.
const MAX_JOINS: usize = 3;

/// Added to the leader timeout for the leader's own wait for its fetch's head. The lead task
/// always publishes something (its guard does, at the latest); this only bounds the wait.
const LEADER_WAIT_SLACK: Duration = Duration::from_secs(5);

/// What a request that joined someone else's flight does next.
enum Turn {
    /// Answered from the shared fetch (or the store it filled).
    Done(HttpResponse),
    /// Not for this request: try the flight for its own variant (now known).
    Rejoin,
    /// The answer may not be shared: fetch on our own.
    Uncacheable,
    /// Waited too long, or the shared fetch failed mid-way: fetch on our own.
    Alone,
}

/// A cache fetch for this request (a miss, or a revalidation of `stale`): joins the fetch
/// already running for this variant or leads a new one, then answers from its outcome.
pub(crate) async fn fetch_for_cache(
    ctx: &RequestCtx,
    state: &web::Data<ProxyState>,
    upstream: &web::Data<Upstream>,
    primary: PrimaryKey,
    stale: Option<(VariantKey, Entry)>,
    fwd: &str,
) -> HttpResponse {
    let range_miss = stale.is_none() && ctx.method == "GET" && ctx.headers.contains("range");
    for _ in 0..MAX_JOINS {
        let uncacheable = state.flights.recently_uncacheable(&primary, ctx.now);
        // A Range miss on a URL known not to be filled for it (uncacheable, or too large):
        // forward the Range as sent, one origin request, nothing stored.
        if range_miss && (uncacheable || state.flights.range_forward(&primary, ctx.now)) {
            return pass(ctx, state, upstream, None, fwd).await;
        }
        // A URL that just answered uncacheable is fetched per request (hit-for-miss), so its
        // next herd is not queued behind one fetch.
        if uncacheable {
            break;
        }
        let (flight, leader) = state
            .flights
            .join(flight_key(ctx, state, &primary, stale.as_ref()));
        if leader {
            // The lookup that sent this request here ran before the join: a fetch that
            // committed and left in between has stored what we were about to fetch again.
            // The guard exists from here on, so neither a panic in the check nor a request
            // dropped later leaves a registered flight that nobody leads.
            let guard = LeadGuard::new(&state.flights, &flight);
            if let Some(stored) = fresh_in_store(ctx, state, &primary) {
                // Handed over before any await (the guard's own end comes second: no-op).
                state.flights.detach(&flight);
                flight.publish(Outcome::Stored);
                flight.finish(Ok(()));
                drop(guard);
                if let Some(resp) = serve_fresh(ctx, state, &stored).await {
                    return resp;
                }
                // Its body proved damaged (and the entry is dropped): fetch it.
                return fetch_alone(ctx, state, upstream, primary, None, fwd).await;
            }
            let reader = flight.reader();
            start_lead(
                guard,
                ctx,
                state,
                upstream,
                primary.clone(),
                stale.clone(),
                fwd,
            );
            let outcome = leader_outcome(state, &flight).await;
            if let Some(resp) =
                lead_answer(ctx, state, upstream, outcome, reader, stale.as_ref(), fwd).await
            {
                return resp;
            }
            // (The entry a 304 freshened is gone again: fetch it whole.)
            return fetch_alone(ctx, state, upstream, primary, None, fwd).await;
        }
        let turn = match flight.reader() {
            Some(reader) => match flight.outcome(state.flights.wait_timeout).await {
                Some(outcome) => {
                    wait_answer(ctx, state, &primary, outcome, reader, stale.as_ref(), fwd).await
                }
                // The leader's origin is too slow: stop waiting and ask on our own.
                None => Turn::Alone,
            },
            // Joined too late to read the body from its first byte: wait for the store.
            None => after_store(ctx, state, &flight, &primary).await,
        };
        match turn {
            Turn::Done(resp) => {
                state.metrics.coalesced_waits.inc();
                return resp;
            }
            Turn::Rejoin => continue,
            Turn::Uncacheable if range_miss => {
                return pass(ctx, state, upstream, None, fwd).await;
            }
            Turn::Uncacheable | Turn::Alone => break,
        }
    }
    fetch_alone(ctx, state, upstream, primary, stale, fwd).await
}

/// The URL's variants, if one committed since this request's lookup answers it fresh. (Not
/// counted as another use for eviction: the request's own lookup was.)
fn fresh_in_store(ctx: &RequestCtx, state: &ProxyState, primary: &PrimaryKey) -> Option<Variants> {
    let variants = state.store.peek(primary).ok()?;
    let variant = super::selected(&variants, &ctx.headers, &state.policy)?;
    let fresh = policy::lookup(&ctx.headers, &variant.entry.freshness, ctx.now) == Lookup::Fresh;
    fresh.then_some(variants)
}

/// A hit from what [`fresh_in_store`] found; `None` if its body proved damaged.
async fn serve_fresh(
    ctx: &RequestCtx,
    state: &ProxyState,
    stored: &Variants,
) -> Option<HttpResponse> {
    let variant = super::selected(stored, &ctx.headers, &state.policy)?;
    let status = CacheStatus::hit(&variant.entry, ctx.now);
    respond::from_variant(ctx, state, variant, status).await
}

/// A waiter whose leader found the response stored after all: the stored copy, else a rejoin.
async fn from_stored(ctx: &RequestCtx, state: &ProxyState, primary: &PrimaryKey) -> Turn {
    match fresh_in_store(ctx, state, primary) {
        Some(stored) => serve_fresh(ctx, state, &stored)
            .await
            .map_or(Turn::Alone, Turn::Done),
        None => Turn::Rejoin,
    }
}

/// The key this request's fetch is coalesced under: its variant when the URL's Vary is known
/// (from the stale entry, or from a recent response), else the URL.
fn flight_key(
    ctx: &RequestCtx,
    state: &ProxyState,
    primary: &PrimaryKey,
    stale: Option<&(VariantKey, Entry)>,
) -> FlightKey {
    if let Some((key, _)) = stale {
        return FlightKey::Variant(*key);
    }
    match state.flights.vary_fields(primary, ctx.now) {
        Some(fields) => FlightKey::Variant(VariantKey::new(
            primary,
            &policy::vary_values(&fields, &ctx.headers, &state.policy),
        )),
        None => FlightKey::Url(*primary.hash()),
    }
}

/// The same fetch, led by this request alone and shared with nobody.
async fn fetch_alone(
    ctx: &RequestCtx,
    state: &web::Data<ProxyState>,
    upstream: &web::Data<Upstream>,
    primary: PrimaryKey,
    stale: Option<(VariantKey, Entry)>,
    fwd: &str,
) -> HttpResponse {
    let flight = state.flights.unshared();
    let reader = flight.reader();
    start_lead(
        LeadGuard::new(&state.flights, &flight),
        ctx,
        state,
        upstream,
        primary,
        stale.clone(),
        fwd,
    );
    let outcome = leader_outcome(state, &flight).await;
    lead_answer(ctx, state, upstream, outcome, reader, stale.as_ref(), fwd)
        .await
        .unwrap_or_else(|| respond::plain_error(502, "the origin's answer could not be used"))
}

/// The leader's wait for its own fetch: bounded by the origin's timeouts (the fetch's), never
/// by the waiters' `coalesce_timeout`.
async fn leader_outcome(state: &ProxyState, flight: &Flight) -> Outcome {
    let limit = state.flights.leader_timeout + LEADER_WAIT_SLACK;
    flight
        .outcome(limit)
        .await
        .unwrap_or_else(|| Outcome::Failed {
            status: 504,
            message: "origin fetch did not answer in time".into(),
            detail: "origin-timeout",
        })
}

/// The leader's response from its fetch's outcome; `None` = a 304 freshened an entry that is
/// gone again (fetch anew).
async fn lead_answer(
    ctx: &RequestCtx,
    state: &ProxyState,
    upstream: &Upstream,
    outcome: Outcome,
    reader: Option<Reader>,
    stale: Option<&(VariantKey, Entry)>,
    fwd: &str,
) -> Option<HttpResponse> {
    match outcome {
        Outcome::Failed {
            status,
            message,
            detail,
        } => {
            if let Some(resp) = serve_stale_on_error(ctx, state, stale, fwd, None).await {
                return Some(resp);
            }
            let cache_status = CacheStatus::fwd(fwd).with_detail(detail);
            Some(respond::plain_error_with(status, &message, &cache_status))
        }
        // Only a leader publishes this, and it answers from the store itself.
        Outcome::Stored => None,
        Outcome::Revalidated(key) => {
            drop(reader);
            let status = CacheStatus::fwd("stale").with_fwd_status(304);
            from_revalidated(ctx, state, key, status).await.ok()?
        }
        Outcome::Response(head) => {
            if head.status >= 500
                && let Some(resp) =
                    serve_stale_on_error(ctx, state, stale, fwd, Some(head.status)).await
            {
                return Some(resp);
            }
            let reader = reader?;
            if head.share != Share::Everyone && !reads_unstored_range(ctx, state, &head) {
                // Rather than read far into a body nobody stores, ask for the range itself.
                drop(reader);
                return Some(pass(ctx, state, upstream, None, fwd).await);
            }
            Some(from_head(ctx, &head, head.cache_status.clone(), reader).await)
        }
    }
}

/// For a Range GET answered by a full response that is not stored: true if the answer can be
/// cut from this fetch (it needs at most `range_fill_max` bytes of it, or the full 200 is the
/// answer anyway), false if the Range should go to the origin instead.
fn reads_unstored_range(ctx: &RequestCtx, state: &ProxyState, head: &SharedHead) -> bool {
    if ctx.method != "GET" || head.status != 200 || !ctx.headers.contains("range") {
        return true;
    }
    // Without a length the range cannot be resolved here.
    let Some(len) = head.content_length else {
        return false;
    };
    match range::select(ctx, head.status, &head.headers, Some(len)) {
        Some(reply) => reply.reads_up_to() <= state.range_fill_max,
        None => true,
    }
}

/// A waiter's answer from the leader's outcome.
async fn wait_answer(
    ctx: &RequestCtx,
    state: &ProxyState,
    primary: &PrimaryKey,
    outcome: Outcome,
    reader: Reader,
    stale: Option<&(VariantKey, Entry)>,
    fwd: &str,
) -> Turn {
    match outcome {
        Outcome::Failed {
            status,
            message,
            detail,
        } => {
            drop(reader);
            if let Some(resp) = serve_stale_on_error(ctx, state, stale, fwd, None).await {
                return Turn::Done(resp);
            }
            let cache_status = CacheStatus::fwd(fwd).with_detail(detail).collapsed();
            Turn::Done(respond::plain_error_with(status, &message, &cache_status))
        }
        // Its leader found the store filled after all and left the flight.
        Outcome::Stored => {
            drop(reader);
            from_stored(ctx, state, primary).await
        }
        Outcome::Revalidated(key) => {
            drop(reader);
            let status = CacheStatus::fwd("stale").with_fwd_status(304).collapsed();
            match from_revalidated(ctx, state, key, status).await {
                Ok(Some(resp)) => Turn::Done(resp),
                Ok(None) => Turn::Alone,
                // Another variant was revalidated.
                Err(()) => Turn::Rejoin,
            }
        }
        Outcome::Response(head) => {
            match head.share {
                Share::Everyone => {}
                Share::Uncacheable => return Turn::Uncacheable,
                Share::NotFilled => return Turn::Rejoin,
            }
            if policy::vary_values(&head.vary_fields, &ctx.headers, &state.policy)
                != head.vary_values
            {
                // RFC 9111 §4.1: not our variant; its fields are known now, so the next join
                // finds (or starts) the fetch for ours.
                return Turn::Rejoin;
            }
            if head.status >= 500
                && let Some(resp) =
                    serve_stale_on_error(ctx, state, stale, fwd, Some(head.status)).await
            {
                return Turn::Done(resp);
            }
            Turn::Done(from_head(ctx, &head, head.cache_status.clone().collapsed(), reader).await)
        }
    }
}

/// A request that joined a flight too late to read its body from the first byte (the body is
/// too large to keep in memory): waits for the store to have it, then serves the stored copy.
async fn after_store(
    ctx: &RequestCtx,
    state: &ProxyState,
    flight: &Flight,
    primary: &PrimaryKey,
) -> Turn {
    let Some(Ok(())) = flight.ended(state.flights.wait_timeout).await else {
        return Turn::Alone;
    };
    let head = match flight.published() {
        Some(Outcome::Response(head)) => head,
        Some(Outcome::Stored) => return from_stored(ctx, state, primary).await,
        _ => return Turn::Alone,
    };
    match head.share {
        Share::Everyone => {}
        Share::Uncacheable => return Turn::Uncacheable,
        Share::NotFilled => return Turn::Rejoin,
    }
    // (A look on behalf of this request's own lookup: not counted as another use.)
    let Ok(variants) = state.store.peek(primary) else {
        return Turn::Alone;
    };
    let Some(variant) = super::selected(&variants, &ctx.headers, &state.policy) else {
        return Turn::Rejoin;
    };
    // Only the copy that fetch just stored (a failed commit may have left an older one).
    let freshness = &variant.entry.freshness;
    if policy::lookup(&ctx.headers, freshness, state.clock.now()) != Lookup::Fresh {
        return Turn::Alone;
    }
    let status = head.cache_status.clone().collapsed();
    match respond::from_variant(ctx, state, variant, status).await {
        Some(resp) => Turn::Done(resp),
        None => Turn::Alone,
    }
}

/// The entry a 304 just freshened, for this request: `Err` if it is another variant's,
/// `Ok(None)` if it is gone or unreadable.
async fn from_revalidated(
    ctx: &RequestCtx,
    state: &ProxyState,
    key: VariantKey,
    status: CacheStatus,
) -> Result<Option<HttpResponse>, ()> {
    let Some(entry) = state.store.get(&key).ok().flatten() else {
        return Ok(None);
    };
    if !super::vary_matches(&entry, &ctx.headers, &state.policy) {
        return Err(());
    }
    Ok(respond::from_store(ctx, state, &key, &entry, status).await)
}

/// This client's response from a published head, its body read from the flight as it arrives
/// (a Range request gets its ranges cut from it, RFC 9110 §14.2).
async fn from_head(
    ctx: &RequestCtx,
    head: &SharedHead,
    cache_status: CacheStatus,
    mut reader: Reader,
) -> HttpResponse {
    if !ctx.is_head {
        reader.wait_for_data().await;
    }
    let body = reader.into_stream().boxed();
    let builder = respond::from_origin_head(head.status, &head.headers, &cache_status);
    if let Some(reply) = range::select(ctx, head.status, &head.headers, head.content_length) {
        return range::from_full_stream(builder, reply, ctx.is_head, body);
    }
    finish_body(builder, ctx.is_head, head.status, head.content_length, body)
}

/// RFC 5861 §4: when the origin failed (no answer, or `status` ≥ 500) and the stale copy may
/// stand in, serve it.
async fn serve_stale_on_error(
    ctx: &RequestCtx,
    state: &ProxyState,
    stale: Option<&(VariantKey, Entry)>,
    fwd: &str,
    status: Option<u16>,
) -> Option<HttpResponse> {
    let (key, entry) = stale?;
    if !policy::may_serve_stale_on_error(&ctx.headers, &entry.freshness, ctx.now) {
        return None;
    }
    let mut cache_status = CacheStatus::fwd(fwd);
    if let Some(s) = status {
        cache_status = cache_status.with_fwd_status(s);
    }
    state.metrics.stale_served.inc();
    respond::from_store(
        ctx,
        state,
        key,
        entry,
        cache_status.with_detail("stale-if-error"),
    )
    .await
}

/// Starts one background revalidation for this variant unless a fetch for it is already
/// running (RFC 5861 §3: serve stale while a single refresh brings a fresh copy).
pub(crate) fn refresh_in_background(
    ctx: &RequestCtx,
    state: &web::Data<ProxyState>,
    upstream: &web::Data<Upstream>,
    primary: &PrimaryKey,
    key: &VariantKey,
    entry: &Entry,
) {
    // Taken before joining: a flight joined as leader must be led.
    let Ok(slot) = state.refresh_slots.clone().try_acquire_owned() else {
        // At [cache] max_background_refreshes: serve stale without refreshing; a later
        // request will try again.
        return;
    };
    let (flight, leader) = state.flights.join(FlightKey::Variant(*key));
    if !leader {
        return;
    }
    state.metrics.background_refreshes.inc();
    let waiting = flight.clone();
    actix_web::rt::spawn(async move {
        // The slot is held until the origin has answered the refresh.
        let _ = waiting.outcome(std::time::Duration::MAX).await;
        drop(slot);
    });
    let stale = Some((*key, entry.clone()));
    start_lead(
        LeadGuard::new(&state.flights, &flight),
        ctx,
        state,
        upstream,
        primary.clone(),
        stale,
        "stale",
    );
}

/// Spawns the fetch on this worker (awc is not Send). It outlives the request that started
/// it, so waiters and the store get the whole response even if that client goes away.
fn start_lead(
    guard: LeadGuard,
    ctx: &RequestCtx,
    state: &web::Data<ProxyState>,
    upstream: &web::Data<Upstream>,
    primary: PrimaryKey,
    stale: Option<(VariantKey, Entry)>,
    fwd: &str,
) {
    // The fetch is a plain GET for the full response, whatever this client asked.
    let mut job = ctx.clone();
    job.method = "GET".into();
    job.is_head = false;
    // A Range miss stores the full object only up to range_fill_max (see `deliver`).
    job.range_fill_max =
        (stale.is_none() && ctx.headers.contains("range")).then_some(state.range_fill_max);
    // Stripped from the job itself: its Vary'd values and its forwarded fields both come from it.
    for name in CLIENT_ONLY_FIELDS {
        job.headers.remove(name);
    }
    // A fetch for the cache must get a body it can store.
    job.headers.remove("expect");
    let (state, upstream, fwd) = (state.clone(), upstream.clone(), fwd.to_string());
    // However the fetch ends (even by a panic, or the task dropped unpolled as a worker
    // stops), nobody may wait for it any longer: the caller made the guard before the task.
    actix_web::rt::spawn(async move {
        let flight = guard.flight.clone();
        let _guard = guard;
        lead(&flight, &job, &state, &upstream, &primary, stale, &fwd).await;
    });
}

/// The leader's work: ask the origin (conditionally when revalidating), decide, publish the
/// outcome, then stream the body to the store and to the readers.
async fn lead(
    flight: &Arc<Flight>,
    job: &RequestCtx,
    state: &ProxyState,
    upstream: &Upstream,
    primary: &PrimaryKey,
    mut stale: Option<(VariantKey, Entry)>,
    fwd: &str,
) {
    let mut fwd = fwd.to_string();
    // A revalidation may turn into a plain refetch once (a 304 for another representation).
    for _attempt in 0..2 {
        let mut headers = forward_headers(job);
        if let Some((_, entry)) = &stale {
            // RFC 9111 §4.3.1: validate with the stored response's own validators.
            for (name, value) in policy::revalidation_headers(&entry.headers).iter() {
                headers.push(name, value);
            }
        }
        let generation = state.store.purge_generation();
        let request_time = state.clock.now();
        let timer = state.metrics.origin_latency.start_timer();
        let limit = state.flights.leader_timeout;
        let sent = tokio::time::timeout(
            limit,
            Box::pin(upstream.send("GET", &job.path_and_query, &headers, ())),
        )
        .await
        .unwrap_or(Err(UpstreamError::Timeout(limit)));
        timer.observe_duration();
        let response_time = state.clock.now();
        state.metrics.origin_requests.inc();
        let mut resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                tracing::warn!(url = %primary.url(), error = %e, "origin request failed");
                flight.publish(Outcome::Failed {
                    status: e.status(),
                    message: e.to_string(),
                    detail: error_detail(&e),
                });
                return;
            }
        };
        if let Some((key, entry)) = &stale
            && resp.status == 304
        {
            if policy::revalidation_matches(&entry.headers, &resp.headers) {
                freshen(
                    state,
                    *key,
                    entry,
                    &resp.headers,
                    request_time,
                    response_time,
                    generation,
                )
                .await;
                flight.publish(Outcome::Revalidated(*key));
                return;
            }
            // RFC 9111 §4.3.4: a 304 for another representation updates nothing; ask again
            // without validators for a full response.
            stale = None;
            fwd = "miss".into();
            continue;
        }
        prepare_response_headers(&mut resp.headers, response_time);
        let times = (request_time, response_time, generation);
        // Boxed: the spawned lead task would otherwise be as large as both futures together,
        // and every miss moves it into its task (callgrind: ~19 KB copied per miss).
        Box::pin(deliver(flight, job, state, primary, resp, times, &fwd)).await;
        return;
    }
}

/// A matching 304: merge its fields (RFC 9111 §3.2), recompute freshness and persist it; if
/// the merged response is no longer storable, drop the entry.
#[allow(clippy::too_many_arguments)]
async fn freshen(
    state: &ProxyState,
    key: VariantKey,
    entry: &Entry,
    not_modified: &HeaderList,
    request_time: SystemTime,
    response_time: SystemTime,
    generation: u64,
) {
    let merged =
        policy::headers_to_store(&policy::merge_not_modified(&entry.headers, not_modified));
    // Judged as a response only: this client's own request fields (no-store, Authorization)
    // decide what *it* may store, not whether the shared entry stays.
    let freshness = match policy::storable(
        "GET",
        &HeaderList::new(),
        entry.status,
        &merged,
        true, // the stored body is the complete one the 304 confirmed
        request_time,
        response_time,
        &state.policy,
    ) {
        Storable::Yes(freshness) => freshness,
        Storable::No(reason) => {
            // The origin confirmed the body but its new fields forbid reusing it freely (e.g.
            // it now says no-store): keep it only as an entry that must be revalidated on every
            // use, so the requests waiting on this 304 are still answered and no later one is
            // served without asking. The sweeper removes it in time.
            tracing::debug!(url = %entry.url, reason = reason.as_str(), "revalidated entry may no longer be reused freely");
            policy::Freshness {
                stale_while_revalidate: std::time::Duration::ZERO,
                stale_if_error: std::time::Duration::ZERO,
                must_revalidate: true,
                ..entry.freshness.expired_at(response_time)
            }
        }
    };
    let (store, body) = (state.store.clone(), entry.body.blake3);
    // A sled transaction may wait on the disk: not on the worker serving hits.
    let result = tokio::task::spawn_blocking(move || {
        store.update_meta(&key, &body, merged, freshness, generation)
    })
    .await;
    match result {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(url = %entry.url, error = %e, "revalidation result not kept"),
        Err(e) => tracing::error!(url = %entry.url, error = %e, "revalidation task failed"),
    }
}

/// Decides whether the response is stored and who may share it, publishes its head, and
/// streams the body to the store and the flight's readers.
async fn deliver(
    flight: &Arc<Flight>,
    job: &RequestCtx,
    state: &ProxyState,
    primary: &PrimaryKey,
    resp: UpstreamResponse,
    (request_time, response_time, generation): (SystemTime, SystemTime, u64),
    fwd: &str,
) {
    let length = content_length(&resp.headers);
    let mut cache_status = CacheStatus::fwd(fwd).with_fwd_status(resp.status);
    let decision = match resp.status {
        // A 304 is not a complete representation; never store it as one.
        304 => Storable::No(policy::NotStorable::Status),
        _ => policy::storable(
            "GET",
            &job.headers,
            resp.status,
            &resp.headers,
            true, // decided before the body arrives; the store's commit rejects a short body
            request_time,
            response_time,
            &state.policy,
        ),
    };
    let (vary_fields, vary_values) = match policy::parse_vary(&resp.headers) {
        Vary::Fields(fields) => {
            // From now on requests for this URL coalesce per variant.
            state.flights.learn_vary(primary, &fields, response_time);
            let values = policy::vary_values(&fields, &job.headers, &state.policy);
            (fields, values)
        }
        Vary::Star => (Vec::new(), Vec::new()),
    };
    // An origin error is shared with waiters (so a failing origin is not asked once per
    // waiter) only when nothing but its status keeps it from being stored: never a private,
    // no-store or Set-Cookie answer.
    let generic_error = resp.status >= 500
        && matches!(
            decision,
            Storable::No(policy::NotStorable::Status | policy::NotStorable::NoFreshness)
        );
    let storable = matches!(decision, Storable::Yes(_));
    let not_filled = storable
        && job
            .range_fill_max
            .is_some_and(|max| length.is_none_or(|n| n > max));
    let writer = match decision {
        Storable::No(reason) => {
            cache_status = cache_status.with_detail(reason.as_str());
            None
        }
        Storable::Yes(_) if not_filled => {
            // Led by a Range request: not worth reading a large or unbounded body for it.
            cache_status = cache_status.with_detail("range-fill-limit");
            None
        }
        Storable::Yes(_) if length.is_some_and(|n| n > state.max_object_size) => {
            cache_status = cache_status.with_detail("too-large");
            None
        }
        Storable::Yes(freshness) => {
            let key = VariantKey::new(primary, &vary_values);
            let entry = Entry {
                url: primary.url().to_string(),
                status: resp.status,
                headers: policy::headers_to_store(&resp.headers),
                vary: vary_values.clone(),
                freshness,
                tags: policy::surrogate_keys(&resp.headers),
                stored_at: response_time,
                body: BodyInfo::default(),
            };
            cache_status = cache_status.stored();
            Some(state.store.begin_write_since(key, entry, generation))
        }
    };
    // A storable response too large to store is still meant for everyone: the requests
    // already waiting stream it along.
    let share = if not_filled {
        Share::NotFilled
    } else if storable || generic_error {
        Share::Everyone
    } else {
        Share::Uncacheable
    };
    if writer.is_some() {
        state.flights.clear_uncacheable(primary);
        // Later requests for this variant join this flight under its variant key.
        let key = FlightKey::Variant(VariantKey::new(primary, &vary_values));
        state.flights.settle(flight, key);
    } else if share == Share::Uncacheable && resp.status < 500 {
        state.flights.mark_uncacheable(primary, response_time);
    }
    if not_filled {
        // The next Range miss goes to the origin as sent: one request, not a dropped GET too.
        state.flights.mark_range_forward(primary, response_time);
    }
    // Only a response that will be stored (or an error shared as such) stays open for requests
    // arriving later; and its body is kept whole in memory for them only up to max_body (past
    // that they wait for the stored copy). Readers already there get every byte regardless.
    if writer.is_none() && !generic_error {
        state.flights.detach(flight);
    } else if length.is_some_and(|n| n > state.flights.max_body) {
        flight.stop_keeping_from_start();
    }
    flight.publish(Outcome::Response(Arc::new(SharedHead {
        status: resp.status,
        headers: resp.headers,
        content_length: length,
        cache_status,
        share,
        vary_fields,
        vary_values,
    })));
    let errors = state.metrics.store_write_errors.clone();
    tee(
        resp.body,
        writer,
        Sink::Shared(flight.clone()),
        length,
        state.max_object_size,
        Some(errors),
    )
    .await;
}

/// Where the body goes besides the store: one client's channel, or a flight's readers.
enum Sink {
    Client(mpsc::Sender<ClientChunk>),
    Shared(Arc<Flight>),
}

impl Sink {
    /// Hands over a chunk; false once nobody can read any more.
    async fn send(&mut self, chunk: Bytes) -> bool {
        match self {
            Sink::Client(tx) => tx.send(Ok(chunk)).await.is_ok(),
            Sink::Shared(flight) => flight.push(chunk).await,
        }
    }

    /// Like `send`, but a client that takes no chunk within `patience` is given up: it gets
    /// an error (never a clean end) when it reads again, and `false` lets the store's copy go on.
    async fn send_within(&mut self, chunk: Bytes, patience: std::time::Duration) -> bool {
        let Sink::Client(tx) = self else {
            return self.send(chunk).await;
        };
        match tokio::time::timeout(patience, tx.send(Ok(chunk))).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                tracing::debug!(
                    ?patience,
                    "client stopped reading; cutting it, the cache copy goes on"
                );
                let tx = tx.clone();
                actix_web::rt::spawn(async move {
                    let cut = std::io::Error::other("client stopped reading");
                    let _ = tx.send(Err(cut)).await;
                });
                false
            }
        }
    }

    /// Ends the readers' bodies with an error; a client that does not take it within
    /// `patience` is dropped (its connection is cut all the same).
    async fn fail(&mut self, message: String, patience: std::time::Duration) {
        match self {
            Sink::Client(tx) => {
                let cut = tx.send(Err(std::io::Error::other(message)));
                let _ = tokio::time::timeout(patience, cut).await;
            }
            Sink::Shared(flight) => flight.finish(Err(message)),
        }
    }

    fn end(&mut self) {
        if let Sink::Shared(flight) = self {
            flight.finish(Ok(()));
        }
    }
}

/// Reads the origin body to the end, feeding the store writer and the sink. The last chunk is
/// held back until the store has committed, so a client that has the whole body can rely on
/// the next request being a hit. A reader that goes away does not stop the store's copy.
async fn tee(
    mut body: UpstreamBody,
    mut writer: Option<BodyWriter>,
    mut sink: Sink,
    expected_len: Option<u64>,
    max_object_size: u64,
    store_errors: Option<prometheus::IntCounter>,
) {
    let mut readers = true;
    let mut held: Option<Bytes> = None;
    let mut received: u64 = 0;
    // A client that stops reading must not hold up the store's copy, the origin connection or
    // its request slot: it gets as long as a stalled origin would, then it is cut. (A shared
    // flight applies the same bound to each of its readers.)
    let patience = body.idle_timeout();
    loop {
        match body.next_chunk().await {
            Some(Ok(chunk)) => {
                received += chunk.len() as u64;
                if received > max_object_size && writer.take().is_some() {
                    tracing::debug!("body grew past max_object_size; not storing it");
                }
                if let Some(w) = writer.as_mut()
                    && let Err(e) = w.write(&chunk).await
                {
                    // A disk problem costs the cache entry, never the client's response.
                    store_failed(&e, store_errors.as_ref());
                    writer = None;
                }
                if let Some(prev) = held.replace(chunk)
                    && readers
                {
                    readers = sink.send_within(prev, patience).await;
                }
                if !readers && writer.is_none() {
                    return;
                }
            }
            Some(Err(e)) => {
                // Dropping the writer discards the partial body; readers' connections are cut.
                drop((writer, body));
                tracing::warn!(error = %e, "origin body failed");
                if readers && let Some(prev) = held.take() {
                    sink.send_within(prev, patience).await;
                }
                sink.fail(e.to_string(), patience).await;
                return;
            }
            None => break,
        }
    }
    // The origin is done with: release its connection and request slot before the last sends.
    drop(body);
    if let Some(w) = writer
        && let Err(e) = w.commit(expected_len).await
    {
        store_failed(&e, store_errors.as_ref());
        if expected_len.is_some_and(|n| n != received) {
            // The origin closed before its Content-Length: readers must not see a clean end.
            sink.fail("origin body shorter than Content-Length".into(), patience)
                .await;
            return;
        }
    }
    if let Some(last) = held
        && readers
    {
        sink.send_within(last, patience).await;
    }
    sink.end();
}

/// Counts a failed store write and logs it; disk and database faults (a full or read-only
/// disk) are logged at most once a minute, since they repeat on every miss until fixed.
fn store_failed(e: &StoreError, errors: Option<&prometheus::IntCounter>) {
    use std::sync::OnceLock;
    use std::time::Instant;
    static FIRST: OnceLock<Instant> = OnceLock::new();
    static LIMIT: crate::store::LogLimit = crate::store::LogLimit::new(60);
    if e.is_disk_fault() {
        if let Some(c) = errors {
            c.inc();
        }
        if LIMIT.allow(FIRST.get_or_init(Instant::now).elapsed().as_secs()) {
            tracing::error!(error = %e, "cannot store responses (passing them through); repeats are not logged for a minute");
        }
    } else {
        // Expected outcomes: a purge raced the fetch, the origin cut the body short, ...
        tracing::debug!(error = %e, "response not stored");
    }
}

/// Attaches the body with the right framing: the origin's length when known, nothing for
/// HEAD (but the GET's Content-Length) and for statuses that have no body.
fn finish_body(
    mut builder: HttpResponseBuilder,
    is_head: bool,
    status: u16,
    length: Option<u64>,
    body: impl futures_util::Stream<Item = ClientChunk> + 'static,
) -> HttpResponse {
    let no_body_status = matches!(status, 204 | 304) || (100..200).contains(&status);
    if is_head || no_body_status {
        return match length {
            Some(n) if is_head => builder
                .no_chunking(n)
                .streaming(stream::empty::<ClientChunk>()),
            _ => builder.body(NoBody::new()),
        };
    }
    match length {
        Some(n) => builder.no_chunking(n).streaming(body),
        None => builder.streaming(body),
    }
}

fn receiver_stream(
    rx: mpsc::Receiver<ClientChunk>,
) -> impl futures_util::Stream<Item = ClientChunk> {
    stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// RFC 9111 §4.4: a successful unsafe request invalidates the target URI and same-origin
/// Location / Content-Location.
async fn invalidate(ctx: &RequestCtx, state: &ProxyState, status: u16, resp: &HeaderList) {
    let targets: Vec<PrimaryKey> =
        policy::invalidation_targets(&ctx.method, status, &ctx.url(), resp)
            .iter()
            .filter_map(|url| PrimaryKey::from_url(url))
            .collect();
    if targets.is_empty() {
        return;
    }
    // Fetches of these URLs already in flight carry the old content: nobody joins them from
    // now on, and the store's URL fence refuses their results.
    for primary in &targets {
        state.flights.detach_url(primary.hash());
    }
    // Done before the client has its answer (its next GET must miss), but off the worker: a
    // sled transaction per variant may wait on the disk.
    let (store, now) = (state.store.clone(), ctx.now);
    let purged = tokio::task::spawn_blocking(move || {
        for primary in targets {
            if let Err(e) = store.purge_url(&primary, false, now) {
                tracing::warn!(url = %primary.url(), error = %e, "invalidation failed");
            }
        }
    })
    .await;
    if let Err(e) = purged {
        tracing::error!(error = %e, "invalidation task failed");
    }
}

fn error_detail(e: &UpstreamError) -> &'static str {
    match e {
        UpstreamError::Timeout(_) => "origin-timeout",
        UpstreamError::Connect(_) => "origin-unreachable",
        _ => "origin-error",
    }
}

/// An origin failure as the client sees it: 504 for timeouts, 502 otherwise.
fn origin_error(e: &UpstreamError, cache_status: &CacheStatus) -> HttpResponse {
    tracing::warn!(error = %e, "origin request failed");
    respond::plain_error_with(
        e.status(),
        &e.to_string(),
        &cache_status.clone().with_detail(error_detail(e)),
    )
}

/// Headers sent to the origin: the client's end-to-end fields, Host as the client sent it,
/// and the forwarding fields (X-Forwarded-For/-Proto, Via). (A cache fetch's job has already
/// lost the client's conditionals and Range: see `start_lead`.)
fn forward_headers(ctx: &RequestCtx) -> HeaderList {
    let mut headers = ctx.headers.clone();
    policy::strip_hop_by_hop(&mut headers);
    if let Some(ip) = ctx.peer {
        let xff = match headers.joined("x-forwarded-for") {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip.to_string(),
        };
        headers.set("x-forwarded-for", xff);
    }
    headers.set("x-forwarded-proto", "http");
    let via = respond::append_member(headers.joined("via"), respond::VIA);
    headers.set("via", via);
    headers
}

/// Removes hop-by-hop fields and, per RFC 9110 §6.6.1, adds a Date when the origin sent none.
fn prepare_response_headers(headers: &mut HeaderList, response_time: SystemTime) {
    policy::strip_hop_by_hop(headers);
    if !headers.contains("date") {
        headers.push("date", httpdate::fmt_http_date(response_time));
    }
}

fn content_length(headers: &HeaderList) -> Option<u64> {
    headers
        .get_str("content-length")
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    //! The hand-over when a fetch's leader finds the response already stored: driven through a
    //! real store and flights, with an origin that refuses connections (any origin request
    //! would answer 502).

    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use actix_web::web;

    use super::*;
    use crate::clock::SystemClock;
    use crate::config::{Config, Overrides, RawConfig};
    use crate::metrics::Metrics;
    use crate::policy::Freshness;
    use crate::proxy::Flights;
    use crate::store::{Store, StoreOptions};

    fn state_and_upstream(dir: &std::path::Path) -> (web::Data<ProxyState>, web::Data<Upstream>) {
        // Port 9 on loopback: nothing listens, so a fetch fails fast with 502.
        let overrides = Overrides {
            origin: Some("http://127.0.0.1:9".into()),
            ..Overrides::default()
        };
        let config = Config::from_raw(RawConfig::default(), &overrides, None).unwrap();
        let store = Store::open(dir, StoreOptions::default()).unwrap();
        let state = ProxyState {
            store,
            policy: config.policy.clone(),
            clock: Arc::new(SystemClock),
            max_object_size: u64::MAX,
            range_fill_max: config.coalescing.range_fill_max,
            flights: Arc::new(Flights::new(&config.coalescing)),
            metrics: Arc::new(Metrics::new()),
            limits: super::super::RequestLimits {
                max_uri_length: 8192,
                max_header_size: 32768,
            },
            refresh_slots: Arc::new(tokio::sync::Semaphore::new(4)),
        };
        (
            web::Data::new(state),
            web::Data::new(Upstream::new(&config.origin)),
        )
    }

    fn ctx(now: SystemTime) -> RequestCtx {
        RequestCtx {
            method: "GET".into(),
            is_head: false,
            host: "stored.test".into(),
            path_and_query: "/x".into(),
            headers: HeaderList::new(),
            peer: None,
            now,
            range_fill_max: None,
        }
    }

    async fn store_fresh(state: &ProxyState, primary: &PrimaryKey, now: SystemTime) {
        let entry = Entry {
            url: primary.url().to_string(),
            status: 200,
            headers: HeaderList::new(),
            vary: Vec::new(),
            freshness: Freshness {
                request_time: now,
                response_time: now,
                corrected_initial_age: Duration::ZERO,
                lifetime: Duration::from_secs(600),
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                must_revalidate: false,
                no_cache: false,
            },
            tags: Vec::new(),
            stored_at: now,
            body: BodyInfo::default(),
        };
        let mut w = state
            .store
            .begin_write(VariantKey::new(primary, &[]), entry);
        w.write(b"stored body").await.unwrap();
        w.commit(None).await.unwrap();
    }

    async fn text(resp: HttpResponse) -> (u16, String) {
        let status = resp.status().as_u16();
        let body = actix_web::body::to_bytes(resp.into_body()).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    // A request whose lookup missed just before another fetch committed becomes a leader with
    // the answer already stored: it is a hit, no origin request (which would be a 502 here),
    // and the flight it registered is gone again.
    #[actix_web::test]
    async fn a_leader_that_finds_the_response_stored_answers_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (state, upstream) = state_and_upstream(dir.path());
        let now = SystemTime::now();
        let primary = PrimaryKey::new("http", "stored.test", "/x");
        store_fresh(&state, &primary, now).await;
        let resp =
            fetch_for_cache(&ctx(now), &state, &upstream, primary.clone(), None, "miss").await;
        assert_eq!(text(resp).await, (200, "stored body".into()));
        let (_, leader) = state.flights.join(FlightKey::Url(*primary.hash()));
        assert!(leader, "no flight left registered");
    }

    // A waiter whose leader hands over with `Stored` (after the waiter joined) is served the
    // stored copy, not sent to the origin; so is one that joined too late to read the body.
    #[actix_web::test]
    async fn waiters_of_a_handed_over_flight_are_served_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (state, upstream) = state_and_upstream(dir.path());
        let now = SystemTime::now();
        let primary = PrimaryKey::new("http", "stored.test", "/x");
        let (flight, leader) = state.flights.join(FlightKey::Url(*primary.hash()));
        assert!(leader);
        let waiter = {
            let (state, upstream, primary) = (state.clone(), upstream.clone(), primary.clone());
            actix_web::rt::spawn(async move {
                let resp =
                    fetch_for_cache(&ctx(now), &state, &upstream, primary, None, "miss").await;
                text(resp).await
            })
        };
        let late = {
            let (state, upstream, primary) = (state.clone(), upstream.clone(), primary.clone());
            let flight = flight.clone();
            actix_web::rt::spawn(async move {
                // Joins the same flight once it no longer keeps the body from the start.
                flight.stop_keeping_from_start();
                let resp =
                    fetch_for_cache(&ctx(now), &state, &upstream, primary, None, "miss").await;
                text(resp).await
            })
        };
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
        store_fresh(&state, &primary, now).await;
        state.flights.detach(&flight);
        flight.publish(Outcome::Stored);
        flight.finish(Ok(()));
        assert_eq!(waiter.await.unwrap(), (200, "stored body".into()));
        assert_eq!(late.await.unwrap(), (200, "stored body".into()));
        // Both answered as waiters of that flight, not by leading one of their own.
        assert_eq!(state.metrics.coalesced_waits.get(), 2);
    }
}
