//! Everything that goes to the origin: pass-through, miss and revalidation fetches, the tee into the store, background refresh, invalidation.

use std::time::SystemTime;

use actix_web::body::{BodyStream, None as NoBody, SizedStream};
use actix_web::{HttpResponse, web};
use bytes::Bytes;
use futures_util::stream;
use tokio::sync::mpsc;

use super::respond::{self, CacheStatus};
use super::{ProxyState, RequestCtx};
use crate::key::{PrimaryKey, VariantKey};
use crate::policy::{self, HeaderList, Storable, Vary};
use crate::store::{BodyInfo, BodyWriter, Entry};
use crate::upstream::{Upstream, UpstreamBody, UpstreamError, UpstreamResponse};

/// Request fields a cache fetch must not forward: the client's own conditionals and ranges
/// (we want the full response to store, and answer those from it), plus hop-by-hop fields.
const CLIENT_ONLY_FIELDS: [&str; 6] = [
    "if-none-match",
    "if-modified-since",
    "if-match",
    "if-unmodified-since",
    "if-range",
    "range",
];

/// Chunks in flight between the origin reader and a slow client before the reader waits.
const CLIENT_CHANNEL_CHUNKS: usize = 16;

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
    let resp = match sent {
        Ok(resp) => resp,
        Err(e) => return origin_error(&e, fwd),
    };
    if policy::is_unsafe_method(&ctx.method) {
        invalidate(ctx, state, resp.status, &resp.headers);
    }
    let cache_status = CacheStatus::fwd(fwd).with_fwd_status(resp.status);
    stream_to_client(ctx, state, resp, None, cache_status)
}

/// Fetches for the cache: a miss (`stale` is None) or a revalidation of `stale`. Stores what
/// policy allows while streaming it to the client; on a matching 304, freshens the stored entry.
pub(crate) async fn fetch_and_store(
    ctx: &RequestCtx,
    state: &ProxyState,
    upstream: &Upstream,
    primary: PrimaryKey,
    stale: Option<(VariantKey, Entry)>,
    fwd: &str,
) -> HttpResponse {
    let mut headers = forward_headers(ctx, true);
    if let Some((_, entry)) = &stale {
        // RFC 9111 §4.3.1: validate with the stored response's own validators.
        for (name, value) in policy::revalidation_headers(&entry.headers).iter() {
            headers.push(name, value);
        }
    }
    let request_time = state.clock.now();
    let sent = upstream
        .send("GET", &ctx.path_and_query, &headers, ())
        .await;
    let response_time = state.clock.now();

    let resp = match sent {
        Ok(resp) => resp,
        Err(e) => {
            if let Some((key, entry)) = &stale
                && policy::may_serve_stale_on_error(&ctx.headers, &entry.freshness, ctx.now)
            {
                // RFC 5861 §4: the origin failed and the stale copy is allowed to stand in.
                let status = CacheStatus::fwd(fwd).with_detail("stale-if-error");
                if let Some(r) = respond::from_store(ctx, state, key, entry, status).await {
                    return r;
                }
            }
            return origin_error(&e, fwd);
        }
    };

    if let Some((key, entry)) = stale {
        if resp.status == 304 {
            if policy::revalidation_matches(&entry.headers, &resp.headers) {
                return revalidated(
                    ctx,
                    state,
                    key,
                    entry,
                    &resp.headers,
                    request_time,
                    response_time,
                )
                .await;
            }
            // RFC 9111 §4.3.4: a 304 naming another representation updates nothing; the
            // client asked for a full response, so ask again without validators.
            return Box::pin(fetch_and_store(ctx, state, upstream, primary, None, fwd)).await;
        }
        if resp.status >= 500
            && policy::may_serve_stale_on_error(&ctx.headers, &entry.freshness, ctx.now)
        {
            let status = CacheStatus::fwd(fwd)
                .with_fwd_status(resp.status)
                .with_detail("stale-if-error");
            if let Some(r) = respond::from_store(ctx, state, &key, &entry, status).await {
                return r;
            }
        }
    }
    store_and_stream(ctx, state, primary, resp, request_time, response_time, fwd)
}

/// Decides whether an origin response is stored, then streams it to the client (and the store).
fn store_and_stream(
    ctx: &RequestCtx,
    state: &ProxyState,
    primary: PrimaryKey,
    mut resp: UpstreamResponse,
    request_time: SystemTime,
    response_time: SystemTime,
    fwd: &str,
) -> HttpResponse {
    prepare_response_headers(&mut resp.headers, response_time);
    let cache_status = CacheStatus::fwd(fwd).with_fwd_status(resp.status);
    let decision = match resp.status {
        // A 304 or 206 is not a complete representation; never store it as one.
        304 => Storable::No(policy::NotStorable::Status),
        _ => policy::storable(
            "GET",
            &ctx.headers,
            resp.status,
            &resp.headers,
            request_time,
            response_time,
            &state.policy,
        ),
    };
    let freshness = match decision {
        Storable::Yes(f) => f,
        Storable::No(reason) => {
            let status = cache_status.with_detail(reason.as_str());
            return stream_to_client(ctx, state, resp, None, status);
        }
    };
    if content_length(&resp.headers).is_some_and(|n| n > state.max_object_size) {
        let status = cache_status.with_detail("too-large");
        return stream_to_client(ctx, state, resp, None, status);
    }
    let fields = match policy::parse_vary(&resp.headers) {
        Vary::Fields(f) => f,
        // storable() already refuses Vary: *; never store it even if that changes.
        Vary::Star => {
            return stream_to_client(
                ctx,
                state,
                resp,
                None,
                cache_status.with_detail("vary-star"),
            );
        }
    };
    let vary = policy::vary_values(&fields, &ctx.headers, &state.policy);
    let key = VariantKey::new(&primary, &vary);
    let entry = Entry {
        url: primary.url().to_string(),
        status: resp.status,
        headers: policy::headers_to_store(&resp.headers),
        vary,
        freshness,
        tags: policy::surrogate_keys(&resp.headers),
        stored_at: response_time,
        body: BodyInfo::default(),
    };
    let writer = state.store.begin_write(key, entry);
    stream_to_client(ctx, state, resp, Some(writer), cache_status.stored())
}

/// A 304 matched the stored response: merge its fields (RFC 9111 §3.2, §4.3.4), recompute
/// freshness, persist, and serve the stored body.
async fn revalidated(
    ctx: &RequestCtx,
    state: &ProxyState,
    key: VariantKey,
    mut entry: Entry,
    not_modified: &HeaderList,
    request_time: SystemTime,
    response_time: SystemTime,
) -> HttpResponse {
    let merged =
        policy::headers_to_store(&policy::merge_not_modified(&entry.headers, not_modified));
    let decision = policy::storable(
        "GET",
        &ctx.headers,
        entry.status,
        &merged,
        request_time,
        response_time,
        &state.policy,
    );
    entry.headers = merged;
    let status = CacheStatus::fwd("stale").with_fwd_status(304);
    let not_storable = match decision {
        Storable::Yes(freshness) => {
            entry.freshness = freshness;
            if let Err(e) = state
                .store
                .update_meta(&key, entry.headers.clone(), freshness)
            {
                tracing::warn!(url = %entry.url, error = %e, "could not freshen stored entry");
            }
            None
        }
        Storable::No(reason) => Some(reason),
    };
    let status = match not_storable {
        Some(reason) => status.with_detail(reason.as_str()),
        None => status,
    };
    let response = respond::from_store(ctx, state, &key, &entry, status).await;
    if not_storable.is_some() {
        // The origin confirmed the body but no longer lets us keep it: it is served this once
        // (the body stream is already open), then the entry goes.
        if let Err(e) = state.store.remove(&key) {
            tracing::warn!(url = %entry.url, error = %e, "could not drop entry");
        }
    }
    response.unwrap_or_else(|| respond::plain_error(502, "stored body lost during revalidation"))
}

fn clone_ctx(ctx: &RequestCtx) -> RequestCtx {
    RequestCtx {
        method: ctx.method.clone(),
        is_head: ctx.is_head,
        host: ctx.host.clone(),
        path_and_query: ctx.path_and_query.clone(),
        headers: ctx.headers.clone(),
        peer: ctx.peer,
        now: ctx.now,
    }
}

/// Starts one background revalidation for `key` unless one is already running
/// (RFC 5861 §3: serve stale while a single refresh brings a fresh copy).
pub(crate) fn refresh_in_background(
    ctx: &RequestCtx,
    state: &web::Data<ProxyState>,
    upstream: &web::Data<Upstream>,
    primary: &PrimaryKey,
    key: &VariantKey,
    entry: &Entry,
) {
    {
        let mut running = state.refreshing.lock().unwrap_or_else(|e| e.into_inner());
        if !running.insert(*key) {
            return;
        }
    }
    let state = state.clone();
    let upstream = upstream.clone();
    let primary = primary.clone();
    let key = *key;
    let entry = entry.clone();
    // The refresh acts as a GET with no client conditionals, so what it gets can be stored.
    let mut ctx = clone_ctx(ctx);
    ctx.method = "GET".into();
    ctx.is_head = false;
    for name in CLIENT_ONLY_FIELDS {
        ctx.headers.remove(name);
    }
    // Runs on this worker (awc is not Send) and outlives the request that started it.
    actix_web::rt::spawn(async move {
        let response = fetch_and_store(
            &ctx,
            &state,
            &upstream,
            primary,
            Some((key, entry)),
            "stale",
        )
        .await;
        // Nobody reads this response: drain its body so the tee into the store runs to the end.
        let mut body = std::pin::pin!(response.into_body());
        let _ = futures_util::future::poll_fn(|cx| {
            loop {
                match actix_web::body::MessageBody::poll_next(body.as_mut(), cx) {
                    std::task::Poll::Ready(Some(Ok(_))) => continue,
                    std::task::Poll::Ready(_) => return std::task::Poll::Ready(()),
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                }
            }
        })
        .await;
        state
            .refreshing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    });
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

/// Streams an origin response to the client. With a writer, the same bytes go to the store,
/// and the store commits before the client sees the last chunk, so a client that has read the
/// whole body can rely on the next request being a hit. The origin read runs in its own task:
/// a client that goes away does not stop the store from receiving the complete body.
fn stream_to_client(
    ctx: &RequestCtx,
    state: &ProxyState,
    resp: UpstreamResponse,
    writer: Option<BodyWriter>,
    cache_status: CacheStatus,
) -> HttpResponse {
    let length = content_length(&resp.headers);
    let mut builder = respond::from_origin_head(resp.status, &resp.headers, &cache_status);
    let max_object_size = state.max_object_size;
    let no_body_status = matches!(resp.status, 204 | 304) || (100..200).contains(&resp.status);

    if ctx.is_head || no_body_status {
        if writer.is_some() {
            let (tx, _rx) = mpsc::channel(1);
            actix_web::rt::spawn(tee(resp.body, writer, tx, length, max_object_size));
        }
        return match length {
            Some(n) if ctx.is_head => builder
                .no_chunking(n)
                .streaming(stream::empty::<Result<Bytes, std::io::Error>>()),
            _ => builder.body(NoBody::new()),
        };
    }

    let (tx, rx) = mpsc::channel(CLIENT_CHANNEL_CHUNKS);
    actix_web::rt::spawn(tee(resp.body, writer, tx, length, max_object_size));
    let body = stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    match length {
        Some(n) => builder.no_chunking(n).streaming(body),
        None => builder.streaming(body),
    }
}

type ClientChunk = Result<Bytes, std::io::Error>;

/// Reads the origin body to the end, feeding the client channel and the store writer. The
/// last chunk is held back until the store has committed (see `stream_to_client`).
async fn tee(
    mut body: UpstreamBody,
    mut writer: Option<BodyWriter>,
    tx: mpsc::Sender<ClientChunk>,
    expected_len: Option<u64>,
    max_object_size: u64,
) {
    let mut client_open = !tx.is_closed();
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
                    tracing::warn!(error = %e, "store write failed; passing through");
                    writer = None;
                }
                if let Some(prev) = held.replace(chunk)
                    && client_open
                    && tx.send(Ok(prev)).await.is_err()
                {
                    client_open = false;
                }
                if !client_open && writer.is_none() {
                    return;
                }
            }
            Some(Err(e)) => {
                // Dropping the writer discards the partial body; the client's connection is cut.
                drop(writer);
                tracing::warn!(error = %e, "origin body failed");
                if client_open {
                    if let Some(prev) = held.take() {
                        let _ = tx.send(Ok(prev)).await;
                    }
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                }
                return;
            }
            None => break,
        }
    }
    if let Some(w) = writer
        && let Err(e) = w.commit(expected_len).await
    {
        tracing::warn!(error = %e, "response not stored");
        if expected_len.is_some_and(|n| n != received) && client_open {
            // The origin closed before its Content-Length: the client must not see a clean end.
            let _ = tx
                .send(Err(std::io::Error::other(
                    "origin body shorter than Content-Length",
                )))
                .await;
            return;
        }
    }
    if let Some(last) = held
        && client_open
    {
        let _ = tx.send(Ok(last)).await;
    }
}

/// An origin failure as the client sees it: 504 for timeouts, 502 otherwise.
fn origin_error(e: &UpstreamError, fwd: &str) -> HttpResponse {
    tracing::warn!(error = %e, "origin request failed");
    let detail = match e {
        UpstreamError::Timeout(_) => "origin-timeout",
        UpstreamError::Connect(_) => "origin-unreachable",
        _ => "origin-error",
    };
    respond::plain_error_with(
        e.status(),
        &e.to_string(),
        &CacheStatus::fwd(fwd).with_detail(detail),
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
