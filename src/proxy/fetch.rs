//! Everything that goes to the origin: pass-through, the single-flight cache fetch (miss, revalidation, background refresh), the tee into the store, invalidation.

use std::sync::Arc;
use std::time::SystemTime;

use actix_web::body::{BodyStream, None as NoBody, SizedStream};
use actix_web::{HttpResponse, HttpResponseBuilder, web};
use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use tokio::sync::mpsc;

use super::flight::{Flight, Outcome, SharedHead};
use super::range;
use super::respond::{self, CacheStatus};
use super::{ProxyState, RequestCtx, select_variant};
use crate::key::{PrimaryKey, VariantKey};
use crate::policy::{self, HeaderList, Storable, Vary};
use crate::store::{BodyInfo, BodyWriter, Entry, StoreError};
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
    let headers = forward_headers(ctx, false);
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
        invalidate(ctx, state, resp.status, &resp.headers);
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

/// A cache fetch for this request (a miss, or a revalidation of `stale`): joins the fetch
/// already running for this URL or leads a new one, then answers from its outcome.
pub(crate) async fn fetch_for_cache(
    ctx: &RequestCtx,
    state: &web::Data<ProxyState>,
    upstream: &web::Data<Upstream>,
    primary: PrimaryKey,
    stale: Option<(VariantKey, Entry)>,
    fwd: &str,
) -> HttpResponse {
    // A URL that just answered uncacheable is fetched per request (hit-for-miss), so its next
    // herd is not queued behind one fetch.
    if state.flights.recently_uncacheable(&primary, ctx.now) {
        return fetch_alone(ctx, state, upstream, primary, stale, fwd).await;
    }
    let (flight, leader) = state.flights.join(&primary);
    // The leader's own channel for a response that turns out not to be shared. It lives here,
    // with this request: if the request gives up or goes away, the channel closes and the
    // fetch carries on for the store alone.
    let mut solo = None;
    if leader {
        let (tx, rx) = mpsc::channel(CLIENT_CHANNEL_CHUNKS);
        solo = Some(rx);
        start_lead(
            flight.clone(),
            ctx,
            state,
            upstream,
            primary.clone(),
            stale.clone(),
            fwd,
            Some(tx),
        );
    } else {
        state.metrics.coalesced_waits.inc();
    }
    let outcome = match flight.outcome(state.flights.wait_timeout).await {
        Some(o) => o,
        // The leader's origin is too slow: stop waiting and ask on our own.
        None => return fetch_alone(ctx, state, upstream, primary, stale, fwd).await,
    };
    if forward_range_instead(ctx, state, &outcome) {
        drop(solo);
        return pass(ctx, state, upstream, None, fwd).await;
    }
    match answer(
        ctx,
        state,
        &flight,
        outcome,
        leader,
        solo,
        stale.as_ref(),
        fwd,
    )
    .await
    {
        Some(resp) => resp,
        // Released: the shared answer does not fit this request.
        None => fetch_alone(ctx, state, upstream, primary, stale, fwd).await,
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
    let (tx, solo) = mpsc::channel(CLIENT_CHANNEL_CHUNKS);
    start_lead(
        flight.clone(),
        ctx,
        state,
        upstream,
        primary.clone(),
        stale.clone(),
        fwd,
        Some(tx),
    );
    let outcome = flight
        .outcome(std::time::Duration::MAX)
        .await
        .unwrap_or_else(unreachable_outcome);
    if forward_range_instead(ctx, state, &outcome) {
        drop(solo);
        return pass(ctx, state, upstream, None, fwd).await;
    }
    answer(
        ctx,
        state,
        &flight,
        outcome,
        true,
        Some(solo),
        stale.as_ref(),
        fwd,
    )
    .await
    .unwrap_or_else(|| respond::plain_error(502, "the origin's answer could not be used"))
}

/// A Range GET whose full response is not being stored (too large for `range_fill_max`, of
/// unknown length, or not storable) and is not small: rather than read the whole body for a
/// slice, drop that fetch and forward the Range as the client sent it (the 206 is not stored).
fn forward_range_instead(ctx: &RequestCtx, state: &ProxyState, outcome: &Outcome) -> bool {
    let Outcome::Response(head) = outcome else {
        return false;
    };
    // The caller then drops its solo channel (a leader's), so the fetch stops reading.
    ctx.method == "GET"
        && ctx.headers.contains("range")
        && head.status == 200
        && !head.shareable
        && head.content_length.is_none_or(|n| n > state.range_fill_max)
}

fn unreachable_outcome() -> Outcome {
    Outcome::Failed {
        status: 502,
        message: "origin fetch ended without an answer".into(),
        detail: "origin-error",
    }
}

/// Turns a flight's outcome into this client's response; `None` = not for us, fetch alone.
#[allow(clippy::too_many_arguments)]
async fn answer(
    ctx: &RequestCtx,
    state: &ProxyState,
    flight: &Arc<Flight>,
    outcome: Outcome,
    leader: bool,
    solo: Option<mpsc::Receiver<ClientChunk>>,
    stale: Option<&(VariantKey, Entry)>,
    fwd: &str,
) -> Option<HttpResponse> {
    let collapse = |s: CacheStatus| if leader { s } else { s.collapsed() };
    match outcome {
        Outcome::Failed {
            status,
            message,
            detail,
        } => {
            if let Some(resp) = serve_stale_on_error(ctx, state, stale, fwd, None).await {
                return Some(resp);
            }
            let cache_status = collapse(CacheStatus::fwd(fwd).with_detail(detail));
            Some(respond::plain_error_with(status, &message, &cache_status))
        }
        Outcome::Revalidated(key) => {
            // The 304 updated the entry in the store; read it back, if it still suits us.
            let entry = state.store.get(&key).ok().flatten()?;
            let (key, entry) = select_variant(vec![(key, entry)], &ctx.headers, &state.policy)?;
            let cache_status = collapse(CacheStatus::fwd("stale").with_fwd_status(304));
            respond::from_store(ctx, state, &key, &entry, cache_status).await
        }
        Outcome::Response(head) => {
            let fits = head.shareable
                && policy::vary_values(&head.vary_fields, &ctx.headers, &state.policy)
                    == head.vary_values;
            if !leader && !fits {
                return None;
            }
            if head.status >= 500
                && let Some(resp) =
                    serve_stale_on_error(ctx, state, stale, fwd, Some(head.status)).await
            {
                return Some(resp);
            }
            let body: BoxStream<'static, ClientChunk> = if head.shareable {
                flight.clone().body().boxed()
            } else {
                // Only the leader reads an unshared response, through its own channel.
                receiver_stream(solo?).boxed()
            };
            let cache_status = collapse(head.cache_status.clone());
            let builder = respond::from_origin_head(head.status, &head.headers, &cache_status);
            // RFC 9110 §14.2: a Range request is answered from the full response as it arrives.
            if let Some(reply) = range::select(ctx, head.status, &head.headers, head.content_length)
            {
                return Some(range::from_full_stream(builder, reply, ctx.is_head, body));
            }
            Some(finish_body(
                builder,
                ctx.is_head,
                head.status,
                head.content_length,
                body,
            ))
        }
    }
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

/// Starts one background revalidation for this URL unless a fetch for it is already running
/// (RFC 5861 §3: serve stale while a single refresh brings a fresh copy).
pub(crate) fn refresh_in_background(
    ctx: &RequestCtx,
    state: &web::Data<ProxyState>,
    upstream: &web::Data<Upstream>,
    primary: &PrimaryKey,
    key: &VariantKey,
    entry: &Entry,
) {
    let (flight, leader) = state.flights.join(primary);
    if !leader {
        return;
    }
    state.metrics.background_refreshes.inc();
    let stale = Some((*key, entry.clone()));
    start_lead(
        flight,
        ctx,
        state,
        upstream,
        primary.clone(),
        stale,
        "stale",
        None,
    );
}

/// Spawns the fetch on this worker (awc is not Send). It outlives the request that started
/// it, so waiters and the store get the whole response even if that client goes away.
#[allow(clippy::too_many_arguments)]
fn start_lead(
    flight: Arc<Flight>,
    ctx: &RequestCtx,
    state: &web::Data<ProxyState>,
    upstream: &web::Data<Upstream>,
    primary: PrimaryKey,
    stale: Option<(VariantKey, Entry)>,
    fwd: &str,
    solo: Option<mpsc::Sender<ClientChunk>>,
) {
    // The fetch is a plain GET for the full response, whatever this client asked.
    let mut job = ctx.clone();
    job.method = "GET".into();
    job.is_head = false;
    // A Range miss stores the full object only up to range_fill_max (see `deliver`).
    job.range_fill_max =
        (stale.is_none() && ctx.headers.contains("range")).then_some(state.range_fill_max);
    for name in CLIENT_ONLY_FIELDS {
        job.headers.remove(name);
    }
    let (state, upstream, fwd) = (state.clone(), upstream.clone(), fwd.to_string());
    actix_web::rt::spawn(async move {
        lead(
            &flight, &job, &state, &upstream, &primary, stale, &fwd, solo,
        )
        .await;
        // (A no-op for a flight that was never registered.)
        state.flights.detach(&primary, &flight);
        // Whatever happened, nobody may wait for this flight any longer.
        flight.finish(Err("origin fetch abandoned".into()));
    });
}

/// The leader's work: ask the origin (conditionally when revalidating), decide, publish the
/// outcome, then stream the body to the store and to the readers.
#[allow(clippy::too_many_arguments)]
async fn lead(
    flight: &Arc<Flight>,
    job: &RequestCtx,
    state: &ProxyState,
    upstream: &Upstream,
    primary: &PrimaryKey,
    mut stale: Option<(VariantKey, Entry)>,
    fwd: &str,
    solo: Option<mpsc::Sender<ClientChunk>>,
) {
    let mut fwd = fwd.to_string();
    // A revalidation may turn into a plain refetch once (a 304 for another representation).
    for _attempt in 0..2 {
        let mut headers = forward_headers(job, true);
        if let Some((_, entry)) = &stale {
            // RFC 9111 §4.3.1: validate with the stored response's own validators.
            for (name, value) in policy::revalidation_headers(&entry.headers).iter() {
                headers.push(name, value);
            }
        }
        let generation = state.store.purge_generation();
        let request_time = state.clock.now();
        let timer = state.metrics.origin_latency.start_timer();
        let sent = upstream
            .send("GET", &job.path_and_query, &headers, ())
            .await;
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
                );
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
        deliver(flight, job, state, primary, resp, times, &fwd, solo).await;
        return;
    }
}

/// A matching 304: merge its fields (RFC 9111 §3.2), recompute freshness and persist it; if
/// the merged response is no longer storable, drop the entry.
#[allow(clippy::too_many_arguments)]
fn freshen(
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
    let body = entry.body.blake3;
    let result = state
        .store
        .update_meta(&key, &body, merged, freshness, generation);
    if let Err(e) = result {
        tracing::debug!(url = %entry.url, error = %e, "revalidation result not kept");
    }
}

/// Decides whether the response is stored and shared, publishes its head, and streams the body.
#[allow(clippy::too_many_arguments)]
async fn deliver(
    flight: &Arc<Flight>,
    job: &RequestCtx,
    state: &ProxyState,
    primary: &PrimaryKey,
    resp: UpstreamResponse,
    (request_time, response_time, generation): (SystemTime, SystemTime, u64),
    fwd: &str,
    solo: Option<mpsc::Sender<ClientChunk>>,
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
            request_time,
            response_time,
            &state.policy,
        ),
    };
    let (vary_fields, vary_values) = match policy::parse_vary(&resp.headers) {
        Vary::Fields(fields) => {
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
    let writer = match decision {
        Storable::No(reason) => {
            cache_status = cache_status.with_detail(reason.as_str());
            None
        }
        Storable::Yes(_)
            if job
                .range_fill_max
                .is_some_and(|max| length.is_none_or(|n| n > max)) =>
        {
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
    if writer.is_some() {
        state.flights.clear_uncacheable(primary);
    } else if resp.status < 500 && job.range_fill_max.is_none() {
        // (A Range-led fetch left unstored for its size says nothing about full requests.)
        state.flights.mark_uncacheable(primary, response_time);
    }
    // Waiters share what is stored (it is meant for everyone) and generic origin errors, as
    // long as the body fits in memory. A body of unknown length is shared too (dynamic pages
    // are where herds happen); if it outgrows the buffer the readers are cut, and the URL is
    // then fetched per request for a while (see below).
    let fits = length.is_none_or(|n| n <= state.flights.max_body);
    let shareable = (writer.is_some() || generic_error) && fits;
    let sink = match (shareable, solo) {
        (true, _) => Sink::Shared(flight.clone(), state.flights.max_body),
        (false, Some(tx)) => Sink::Client(tx),
        // A background refresh: nobody reads, the store may still keep it.
        (false, None) => Sink::Discard,
    };
    flight.publish(Outcome::Response(Arc::new(SharedHead {
        status: resp.status,
        headers: resp.headers,
        content_length: length,
        cache_status,
        shareable,
        vary_fields,
        vary_values,
    })));
    let errors = state.metrics.store_write_errors.clone();
    tee(
        resp.body,
        writer,
        sink,
        length,
        state.max_object_size,
        Some(errors),
    )
    .await;
    if flight.overflowed() {
        // Its readers were cut: do not let the next herd share this URL's fetch again.
        state.flights.mark_uncacheable(primary, response_time);
    }
}

/// Where the body goes besides the store: one client's channel, a flight's shared buffer,
/// or nowhere.
enum Sink {
    Client(mpsc::Sender<ClientChunk>),
    Shared(Arc<Flight>, u64),
    Discard,
}

impl Sink {
    /// Hands over a chunk; false once nobody can read any more.
    async fn send(&mut self, chunk: Bytes) -> bool {
        match self {
            Sink::Client(tx) => tx.send(Ok(chunk)).await.is_ok(),
            Sink::Shared(flight, max) => flight.push(chunk, *max),
            Sink::Discard => false,
        }
    }

    async fn fail(&mut self, message: String) {
        match self {
            Sink::Client(tx) => {
                let _ = tx.send(Err(std::io::Error::other(message))).await;
            }
            Sink::Shared(flight, _) => flight.finish(Err(message)),
            Sink::Discard => {}
        }
    }

    fn end(&mut self) {
        if let Sink::Shared(flight, _) = self {
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
                    readers = sink.send(prev).await;
                }
                if !readers && writer.is_none() {
                    return;
                }
            }
            Some(Err(e)) => {
                // Dropping the writer discards the partial body; readers' connections are cut.
                drop(writer);
                tracing::warn!(error = %e, "origin body failed");
                if readers && let Some(prev) = held.take() {
                    sink.send(prev).await;
                }
                sink.fail(e.to_string()).await;
                return;
            }
            None => break,
        }
    }
    if let Some(w) = writer
        && let Err(e) = w.commit(expected_len).await
    {
        store_failed(&e, store_errors.as_ref());
        if expected_len.is_some_and(|n| n != received) {
            // The origin closed before its Content-Length: readers must not see a clean end.
            sink.fail("origin body shorter than Content-Length".into())
                .await;
            return;
        }
    }
    if let Some(last) = held
        && readers
    {
        sink.send(last).await;
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
fn invalidate(ctx: &RequestCtx, state: &ProxyState, status: u16, resp: &HeaderList) {
    for url in policy::invalidation_targets(&ctx.method, status, &ctx.url(), resp) {
        let Some(primary) = PrimaryKey::from_url(&url) else {
            continue;
        };
        match state.store.variants(&primary) {
            Ok(variants) => {
                for (key, _) in variants {
                    if let Err(e) = state.store.remove(&key) {
                        tracing::warn!(%url, error = %e, "invalidation failed");
                    }
                }
            }
            Err(e) => tracing::warn!(%url, error = %e, "invalidation lookup failed"),
        }
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
/// and the forwarding fields (X-Forwarded-For/-Proto, Via). For cache fetches the client's
/// conditionals and Range are dropped (see CLIENT_ONLY_FIELDS).
fn forward_headers(ctx: &RequestCtx, for_cache: bool) -> HeaderList {
    let mut headers = ctx.headers.clone();
    policy::strip_hop_by_hop(&mut headers);
    if for_cache {
        for name in CLIENT_ONLY_FIELDS {
            headers.remove(name);
        }
        // A fetch for the cache must get a body it can store.
        headers.remove("expect");
    }
    if let Some(ip) = ctx.peer {
        let xff = match headers.joined("x-forwarded-for") {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip.to_string(),
        };
        headers.set("x-forwarded-for", xff);
    }
    headers.set("x-forwarded-proto", "http");
    let via = match headers.joined("via") {
        Some(prev) => format!("{prev}, {}", respond::VIA),
        None => respond::VIA.to_string(),
    };
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
