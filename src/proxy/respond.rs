//! Builds client responses: from a stored entry (hit, 304), from an origin response, or an error, each with its Cache-Status.

use std::time::SystemTime;

use actix_web::HttpResponse;
use actix_web::HttpResponseBuilder;
use actix_web::body::{None as NoBody, SizedStream};
use actix_web::http::StatusCode;
use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use futures_util::stream;

use super::{ProxyState, RequestCtx, range};
use crate::key::VariantKey;
use crate::policy::{self, ClientConditional, HeaderList};
use crate::store::{Entry, Variant};

/// Our `Via` member (RFC 9110 §7.6.3).
pub(crate) const VIA: &str = "1.1 larder";

/// The `Cache-Status` member this cache adds (RFC 9211), e.g. `larder; hit; ttl=30`.
#[derive(Debug, Clone)]
pub struct CacheStatus(String);

impl CacheStatus {
    /// Served from the store without contacting the origin; `ttl` is the remaining freshness (negative when stale).
    pub fn hit(entry: &Entry, now: SystemTime) -> Self {
        let ttl = match entry.freshness.fresh_until().duration_since(now) {
            Ok(left) => left.as_secs() as i64,
            Err(past) => -(past.duration().as_secs() as i64),
        };
        CacheStatus(format!("larder; hit; ttl={ttl}"))
    }

    /// Forwarded to the origin for reason `fwd` (RFC 9211 §2.2: miss, vary-miss, stale, method, request…).
    pub fn fwd(fwd: &str) -> Self {
        CacheStatus(format!("larder; fwd={fwd}"))
    }

    /// Adds the status the origin answered with (RFC 9211 §2.3).
    pub fn with_fwd_status(mut self, status: u16) -> Self {
        self.0.push_str(&format!("; fwd-status={status}"));
        self
    }

    /// Marks that the response was stored (RFC 9211 §2.6).
    pub fn stored(mut self) -> Self {
        self.0.push_str("; stored");
        self
    }

    /// Marks a request that was collapsed into another's origin fetch (RFC 9211 §2.5).
    pub fn collapsed(mut self) -> Self {
        self.0.push_str("; collapsed");
        self
    }

    /// Adds a `detail` token (RFC 9211 §2.8), e.g. why a response was not stored.
    pub fn with_detail(mut self, detail: &str) -> Self {
        self.0.push_str("; detail=");
        self.0.push_str(detail);
        self
    }

    /// The header value text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A hit on a variant from [`Store::lookup`](crate::store::Store::lookup): like
/// [`from_store`], but the full response's head is built once per hot copy of the record
/// ([`PreparedHead`]) and only cloned per hit.
pub(crate) async fn from_variant(
    ctx: &RequestCtx,
    state: &ProxyState,
    variant: &Variant,
    status: CacheStatus,
) -> Option<HttpResponse> {
    respond(
        ctx,
        state,
        &variant.key,
        &variant.entry,
        status,
        Some(variant),
    )
    .await
}

/// The stored response for this request: a 304 if the client's conditional matches,
/// else the full response with `Age`. `None` if the body could not be opened (the store
/// has then dropped the entry and the caller fetches anew).
pub(crate) async fn from_store(
    ctx: &RequestCtx,
    state: &ProxyState,
    key: &VariantKey,
    entry: &Entry,
    status: CacheStatus,
) -> Option<HttpResponse> {
    respond(ctx, state, key, entry, status, None).await
}

async fn respond(
    ctx: &RequestCtx,
    state: &ProxyState,
    key: &VariantKey,
    entry: &Entry,
    status: CacheStatus,
    hot: Option<&Variant>,
) -> Option<HttpResponse> {
    // Every use of a stored response counts for the eviction order (memory only).
    state.store.touch(key, ctx.now);
    let age = policy::age_seconds(&entry.freshness, ctx.now);
    // RFC 9110 §13.2.2: a cache answers the client's own conditionals from the stored response.
    if policy::evaluate_conditional(&ctx.method, &ctx.headers, entry.status, &entry.headers)
        == ClientConditional::NotModified
    {
        let mut builder = HttpResponse::NotModified();
        copy_headers(&mut builder, &policy::not_modified_headers(&entry.headers));
        finish_headers(&mut builder, &status, &entry.headers, Some(age));
        return Some(builder.body(NoBody::new()));
    }
    // RFC 9110 §14.2: Range after the conditionals above (§13.2.2), from the stored bytes.
    let range = range::select(ctx, entry.status, &entry.headers, Some(entry.body.len));
    // Only a full GET answer uses the prepared head: it is built then, once per hot copy.
    let head = match (hot, &range, ctx.is_head) {
        (Some(variant), None, false) => variant.prepared(PreparedHead::of),
        _ => None,
    };
    if let Some(head) = head {
        let body = match state.store.open_body(key, entry).await {
            Ok(body) => body,
            Err(e) => {
                tracing::warn!(url = %entry.url, error = %e, "stored body unusable; refetching");
                return None;
            }
        };
        return Some(head.response(SizedStream::new(entry.body.len, body), age, &status));
    }

    let mut builder = HttpResponse::build(status_code(entry.status));
    copy_headers(&mut builder, &entry.headers);
    finish_headers(&mut builder, &status, &entry.headers, Some(age));
    if entry.status == 200 {
        // RFC 9110 §14.3: we answer byte ranges of every complete response we serve.
        builder.insert_header(("accept-ranges", "bytes"));
    }
    if let Some(reply) = range {
        return match range::from_store(builder, reply, ctx.is_head, &state.store, key, entry).await
        {
            Ok(resp) => Some(resp),
            Err(e) => {
                tracing::warn!(url = %entry.url, error = %e, "stored body unusable; refetching");
                None
            }
        };
    }
    if ctx.is_head {
        return Some(
            builder
                .no_chunking(entry.body.len)
                .streaming(stream::empty::<Result<Bytes, std::io::Error>>()),
        );
    }
    match state.store.open_body(key, entry).await {
        Ok(body) => Some(builder.no_chunking(entry.body.len).streaming(body)),
        Err(e) => {
            tracing::warn!(url = %entry.url, error = %e, "stored body unusable; refetching");
            None
        }
    }
}

/// The head of a stored full response, in actix's types, minus what changes per hit (Age and
/// our Cache-Status member): converting and validating every stored field once per hot copy of
/// the record instead of on every hit is most of what a small hit costs.
pub(crate) struct PreparedHead {
    status: StatusCode,
    headers: HeaderMap,
    /// The upstream's Cache-Status list, to which each hit appends its own member.
    upstream_cache_status: Option<String>,
}

impl PreparedHead {
    fn of(entry: &Entry) -> PreparedHead {
        let mut builder = HttpResponse::build(status_code(entry.status));
        copy_headers(&mut builder, &entry.headers);
        builder.insert_header(("via", append_member(entry.headers.joined("via"), VIA)));
        if entry.status == 200 {
            // RFC 9110 §14.3: we answer byte ranges of every complete response we serve.
            builder.insert_header(("accept-ranges", "bytes"));
        }
        let template = builder.finish();
        PreparedHead {
            status: template.status(),
            headers: template.headers().clone(),
            upstream_cache_status: entry
                .headers
                .joined("cache-status")
                .filter(|l| !l.trim().is_empty()),
        }
    }

    fn response<S>(
        &self,
        body: SizedStream<S>,
        age: u64,
        cache_status: &CacheStatus,
    ) -> HttpResponse
    where
        S: futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Unpin + 'static,
    {
        let mut resp = HttpResponse::with_body(self.status, body).map_into_boxed_body();
        let headers = resp.headers_mut();
        *headers = self.headers.clone();
        headers.insert(HeaderName::from_static("age"), HeaderValue::from(age));
        let ours = match &self.upstream_cache_status {
            Some(list) => HeaderValue::from_str(&format!("{list}, {}", cache_status.as_str())),
            None => HeaderValue::from_str(cache_status.as_str()),
        };
        if let Ok(value) = ours {
            headers.insert(HeaderName::from_static("cache-status"), value);
        }
        resp
    }
}

/// Starts a response carrying an origin response's status and end-to-end headers.
pub(crate) fn from_origin_head(
    status: u16,
    headers: &HeaderList,
    cache_status: &CacheStatus,
) -> HttpResponseBuilder {
    let mut builder = HttpResponse::build(status_code(status));
    copy_headers(&mut builder, headers);
    // RFC 9111 §5.1: a forwarded response keeps the Age an upstream cache gave it.
    let upstream_age = headers.get_str("age").and_then(|a| a.parse::<u64>().ok());
    finish_headers(&mut builder, cache_status, headers, upstream_age);
    builder
}

/// A short plain-text error the proxy makes up itself for a bad request: no Cache-Status,
/// since no cache handled it (RFC 9211 §2).
pub(crate) fn plain_error(status: u16, message: &str) -> HttpResponse {
    HttpResponse::build(status_code(status))
        .insert_header(("content-type", "text/plain; charset=utf-8"))
        .body(format!("larder: {message}\n"))
}

/// A plain-text error for a request the cache handled (forwarded and failed, or only-if-cached).
/// RFC 9211 §2 discourages a member on generated responses; we keep one on these because the
/// request did pass through the cache, and `detail` is what an operator needs to see why it failed.
pub(crate) fn plain_error_with(
    status: u16,
    message: &str,
    cache_status: &CacheStatus,
) -> HttpResponse {
    HttpResponse::build(status_code(status))
        .insert_header(("content-type", "text/plain; charset=utf-8"))
        .insert_header(("cache-status", cache_status.as_str()))
        .insert_header(("via", VIA))
        .body(format!("larder: {message}\n"))
}

/// RFC 9111 §5.2.1.7: only-if-cached with nothing usable stored gets 504.
pub(crate) fn only_if_cached_miss() -> HttpResponse {
    plain_error_with(
        504,
        "only-if-cached and no stored response can be used",
        &CacheStatus(String::from("larder; detail=only-if-cached")),
    )
}

fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY)
}

/// Copies end-to-end fields; framing is actix's job (it derives it from the body), and
/// Age / Cache-Status / Via are rewritten by `finish_headers`.
fn copy_headers(builder: &mut HttpResponseBuilder, headers: &HeaderList) {
    for (name, value) in headers.iter() {
        if matches!(
            name,
            "content-length" | "transfer-encoding" | "age" | "cache-status" | "via" | "connection"
        ) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            builder.append_header((n, v));
        }
    }
}

/// Sets Age and appends our members to the upstream's Via and Cache-Status lists: RFC 9211 §2
/// orders Cache-Status from the origin's side to the client's, so ours goes last.
fn finish_headers(
    builder: &mut HttpResponseBuilder,
    cache_status: &CacheStatus,
    upstream: &HeaderList,
    age: Option<u64>,
) {
    if let Some(age) = age {
        builder.insert_header(("age", age.to_string()));
    }
    builder.insert_header(("via", append_member(upstream.joined("via"), VIA)));
    builder.insert_header((
        "cache-status",
        append_member(upstream.joined("cache-status"), cache_status.as_str()),
    ));
}

pub(super) fn append_member(list: Option<String>, member: &str) -> String {
    match list {
        Some(l) if !l.trim().is_empty() => format!("{l}, {member}"),
        _ => member.to_string(),
    }
}
