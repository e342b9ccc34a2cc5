//! The admin listener: bearer-token auth, purge (url, prefix, tag, all; soft), entries as JSON lines, stats, health.

use std::time::SystemTime;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use serde::Deserialize;

use std::sync::{Arc, RwLock};

use crate::clock::Clock;
use crate::dump::DumpLine;
use crate::key::PrimaryKey;
use crate::metrics::{Metrics, StoreGauges};
use crate::proxy::Flights;
use crate::store::{Store, StoreError};

/// The admin token, shared with the server handle so that a config reload can replace it.
pub type AdminToken = Arc<RwLock<Option<String>>>;

/// What the admin handlers share.
pub struct AdminState {
    pub store: Store,
    /// `None` means the API is open (allowed on loopback only). Replaced on SIGHUP reload.
    pub token: AdminToken,
    /// `GET /metrics` answers without the token (`[admin] metrics_public`).
    pub metrics_public: bool,
    pub clock: Arc<dyn Clock>,
    /// The proxy's fetches in flight: a purge detaches them so none is reused after it.
    pub flights: Arc<Flights>,
    pub metrics: Arc<Metrics>,
    /// Bounds the `/entries` streams running at once (each holds a thread); see [`MAX_ENTRY_STREAMS`].
    pub entry_streams: Arc<tokio::sync::Semaphore>,
}

/// How many `/entries` streams may run at once; more get 503.
pub const MAX_ENTRY_STREAMS: usize = 4;

/// Registers the admin routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/purge", web::post().to(purge))
        .route("/entries", web::get().to(entries))
        .route("/stats", web::get().to(stats))
        .route("/metrics", web::get().to(metrics))
        .default_service(web::to(|| async {
            json_error(
                404,
                "no such admin endpoint; see README for /purge, /entries, /stats, /healthz",
            )
        }));
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body("{\"status\":\"ok\"}\n")
}

/// Body of `POST /purge`: exactly one selector, plus optional `soft`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    url: Option<String>,
    prefix: Option<String>,
    tag: Option<String>,
    all: Option<bool>,
    #[serde(default)]
    soft: bool,
}

#[derive(Clone)]
enum Selector {
    Url(PrimaryKey),
    Prefix(String),
    Tag(String),
    All,
}

impl PurgeRequest {
    fn selector(self) -> Result<(Selector, bool), String> {
        let given = [
            self.url.is_some(),
            self.prefix.is_some(),
            self.tag.is_some(),
            self.all.is_some(),
        ]
        .iter()
        .filter(|g| **g)
        .count();
        if given != 1 {
            return Err("give exactly one of \"url\", \"prefix\", \"tag\" or \"all\"".to_string());
        }
        let selector = if let Some(url) = self.url {
            refuse_https("url", &url)?;
            Selector::Url(PrimaryKey::from_url(&url).ok_or_else(|| {
                format!("\"url\" must be an absolute http URL like http://host/path?q, got {url:?}")
            })?)
        } else if let Some(prefix) = self.prefix {
            refuse_https("prefix", &prefix)?;
            if !prefix.starts_with("http://") {
                return Err(format!(
                    "\"prefix\" must start with http:// and the host, got {prefix:?}"
                ));
            }
            Selector::Prefix(normalized_prefix(&prefix))
        } else if let Some(tag) = self.tag {
            if tag.trim().is_empty() {
                return Err("\"tag\" must not be empty".to_string());
            }
            Selector::Tag(tag)
        } else if self.all == Some(true) {
            Selector::All
        } else {
            return Err("\"all\" must be true".to_string());
        };
        Ok((selector, self.soft))
    }
}

/// A URL prefix as the cache spells the URLs it keys (see `PrimaryKey::new`): the host lower-cased
/// and, once the authority is complete (a path or query follows), the default port dropped, so
/// `http://Example.COM:80/blog/` matches what `{"url": …}` with the same text would.
fn normalized_prefix(prefix: &str) -> String {
    let rest = &prefix["http://".len()..];
    match rest.find(['/', '?']) {
        Some(end) => match PrimaryKey::from_url(&format!("http://{}/", &rest[..end])) {
            // from_url's URL is "http://<authority>/": keep its authority, then our path.
            Some(key) => format!("{}{}", key.url().trim_end_matches('/'), &rest[end..]),
            None => prefix.to_string(),
        },
        // Still inside the host: only case can differ.
        None => format!("http://{}", rest.to_ascii_lowercase()),
    }
}

/// Larder's listener speaks plain HTTP, so every key is an `http://` URL (`RequestCtx::url`):
/// an `https://` selector could only ever match nothing, which would look like a purge that
/// worked. Say so instead.
fn refuse_https(field: &str, value: &str) -> Result<(), String> {
    let scheme = value.split_once("://").map(|(s, _)| s);
    if scheme.is_some_and(|s| s.eq_ignore_ascii_case("https")) {
        return Err(format!(
            "\"{field}\" is an https:// URL, but Larder serves and keys plain http only: \
             use the http:// form with the same host and path, got {value:?}"
        ));
    }
    Ok(())
}

/// Fuzzing entry (fuzz/purge_json): parses and checks a `POST /purge` body as the endpoint
/// does, without touching a store. Not an API.
#[doc(hidden)]
pub fn fuzz_parse_purge(body: &[u8]) -> Result<bool, String> {
    parse_purge(body)?.selector().map(|(_, soft)| soft)
}

/// The body as a purge request. Only a JSON object is one: serde would also build the struct
/// from an array of its fields in order (`[null,null,null,true]` as `{"all": true}`), which is
/// not the documented shape, so an operator's typo could purge more than meant.
fn parse_purge(body: &[u8]) -> Result<PurgeRequest, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid purge request: {e}"))?;
    if !value.is_object() {
        return Err("invalid purge request: expected a JSON object".into());
    }
    serde_json::from_value(value).map_err(|e| format!("invalid purge request: {e}"))
}

async fn purge(req: HttpRequest, body: Bytes, state: web::Data<AdminState>) -> HttpResponse {
    if let Some(denied) = check_token(&req, &state) {
        return denied;
    }
    let request = match parse_purge(&body) {
        Ok(r) => r,
        Err(message) => return json_error(400, &message),
    };
    let (selector, soft) = match request.selector() {
        Ok(s) => s,
        Err(message) => return json_error(400, &message),
    };
    let now = state.clock.now();
    // Requests after this purge must not join a fetch that began before it. The store's purge
    // raises the fence that refuses such fetches' commits; a fetch started between this
    // detach and that fence is caught by the second one. A URL purge touches only its flights.
    let detach = |selector: &Selector| match selector {
        Selector::Url(primary) => state.flights.detach_url(primary.hash()),
        _ => state.flights.detach_all(),
    };
    detach(&selector);
    let store = state.store.clone();
    // A purge walks and rewrites many records: keep it off the admin worker, which must go on
    // answering /healthz and /metrics.
    let purging = selector.clone();
    let result = tokio::task::spawn_blocking(move || match &purging {
        Selector::Url(primary) => store.purge_url(primary, soft, now),
        Selector::Prefix(prefix) => store.purge_prefix(prefix, soft, now),
        Selector::Tag(tag) => store.purge_tag(tag, soft, now),
        Selector::All => store.purge_all(soft, now),
    })
    .await;
    detach(&selector);
    let purged = match result {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return store_error(e),
        Err(e) => return json_error(500, &format!("purge task failed: {e}")),
    };
    // Durable before we answer: a crash right after must not bring purged content back.
    if let Err(e) = state.store.flush().await {
        return store_error(e);
    }
    state.metrics.purged_entries.inc_by(purged as u64);
    tracing::info!(purged, soft, "purge");
    HttpResponse::Ok()
        .content_type("application/json")
        .body(format!("{{\"purged\":{purged}}}\n"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntriesQuery {
    prefix: Option<String>,
    tag: Option<String>,
    limit: Option<u64>,
}

/// Streams entries as JSON lines. A blocking thread walks the index and hands lines over a
/// small channel, so memory stays constant however many entries there are.
async fn entries(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Some(denied) = check_token(&req, &state) {
        return denied;
    }
    let query = match web::Query::<EntriesQuery>::from_query(req.query_string()) {
        Ok(q) => q.into_inner(),
        Err(e) => return json_error(400, &format!("invalid query: {e}")),
    };
    // Each stream holds a thread until its client has read it all: bound them, so a burst of
    // slow readers cannot pile up threads.
    let Ok(permit) = state.entry_streams.clone().try_acquire_owned() else {
        return json_error(
            503,
            "too many /entries streams in progress; retry when one has finished",
        );
    };
    let store = state.store.clone();
    let now = state.clock.now();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let spawned = std::thread::Builder::new()
        .name("larder-entries".into())
        .spawn(move || {
            stream_entries(store, query, now, tx);
            drop(permit);
        });
    if let Err(e) = spawned {
        return json_error(503, &format!("cannot start the entries stream: {e}"));
    }
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .streaming(body)
}

fn stream_entries(
    store: Store,
    query: EntriesQuery,
    now: SystemTime,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let mut sent = 0u64;
    let mut batch = Vec::with_capacity(16 << 10);
    for item in store.entries(query.prefix.as_deref(), query.tag.as_deref()) {
        if query.limit.is_some_and(|l| sent >= l) {
            break;
        }
        match item {
            Ok((key, entry)) => {
                if serde_json::to_writer(&mut batch, &DumpLine::new(&key, &entry, now)).is_err() {
                    continue;
                }
                batch.push(b'\n');
                sent += 1;
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                return;
            }
        }
        if batch.len() >= 16 << 10 {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(16 << 10));
            if tx.blocking_send(Ok(Bytes::from(full))).is_err() {
                return;
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(Ok(Bytes::from(batch)));
    }
}

async fn stats(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Some(denied) = check_token(&req, &state) {
        return denied;
    }
    let s = state.store.stats();
    let results: serde_json::Map<String, serde_json::Value> = crate::metrics::RESULTS
        .iter()
        .map(|r| (r.to_string(), state.metrics.result_count(r).into()))
        .collect();
    let body = serde_json::json!({
        "entries": s.entries,
        // What [storage] max_size bounds: records, index rows, body files (see usage_bytes).
        "bytes": s.usage_bytes,
        // Answered from the store without waiting for the origin (fresh, or stale by permission).
        "hits": state.metrics.result_count("hit") + state.metrics.result_count("stale"),
        // Fetched from the origin for the cache (not passes, revalidations or errors).
        "misses": state.metrics.result_count("miss"),
        "requests": results,
        "body_bytes": s.body_bytes,
        "body_files": s.body_files,
        "body_file_bytes": s.body_file_bytes,
        "record_bytes": s.record_bytes,
        "index_bytes": s.index_bytes,
        "quarantined_bytes": s.quarantined_bytes,
        "usage_bytes": s.usage_bytes,
        "rejected": s.rejected,
        "evictions": s.evictions,
        "dropped_records": s.dropped_records,
        "damaged_bodies": s.damaged_bodies,
    });
    HttpResponse::Ok().json(body)
}

async fn metrics(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    // A scraper that cannot hold secrets may be let in; the numbers reveal no URLs.
    if !state.metrics_public
        && let Some(denied) = check_token(&req, &state)
    {
        return denied;
    }
    let s = state.store.stats();
    let gauges = StoreGauges {
        entries: s.entries,
        body_bytes: s.body_bytes,
        body_file_bytes: s.body_file_bytes,
        dropped_records: s.dropped_records,
        damaged_bodies: s.damaged_bodies,
        usage_bytes: s.usage_bytes,
        evictions: s.evictions,
    };
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render(gauges))
}

/// `None` when the request may proceed; otherwise the 401 to send.
fn check_token(req: &HttpRequest, state: &AdminState) -> Option<HttpResponse> {
    // A poisoned lock still holds a whole token: a writer only ever swaps the Option.
    let token = state.token.read().unwrap_or_else(|e| e.into_inner());
    let expected = token.as_deref()?;
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_credentials);
    match given {
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => None,
        Some(_) => Some(json_error(401, "wrong admin token")),
        None => Some(
            HttpResponse::Unauthorized()
                .insert_header((header::WWW_AUTHENTICATE, "Bearer realm=\"larder-admin\""))
                .content_type("application/json")
                .body("{\"error\":\"missing admin token: send Authorization: Bearer <token>\"}\n"),
        ),
    }
}

/// The token of `Bearer <token>`. RFC 9110 §11.1: the scheme is case-insensitive, and one or
/// more spaces separate it from the credentials.
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' ').trim())
}

/// Compares the blake3 hashes of both, which `blake3::Hash` does in constant time: the time
/// taken does not tell how much of a guess matched, and of the configured token's length only
/// its count of 64-byte blocks (a byte-wise loop runs as long as the longer of the two, which
/// gives the length away).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    blake3::hash(a) == blake3::hash(b)
}

fn json_error(status: u16, message: &str) -> HttpResponse {
    let code = actix_web::http::StatusCode::from_u16(status)
        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
    HttpResponse::build(code).json(serde_json::json!({ "error": message }))
}

fn store_error(e: StoreError) -> HttpResponse {
    tracing::error!(error = %e, "admin store operation failed");
    json_error(500, &format!("store error: {e}"))
}

#[cfg(test)]
mod tests {
    use super::{bearer_credentials, constant_time_eq, normalized_prefix, refuse_https};

    #[test]
    fn prefixes_are_spelled_as_the_cache_keys_urls() {
        // RFC 9110 §4.2.3: the host is case-insensitive and the default port is the same URI.
        for (given, want) in [
            ("http://Example.COM:80/blog/", "http://example.com/blog/"),
            ("http://example.com:8080/a?b", "http://example.com:8080/a?b"),
            ("http://EXAMPLE.com/Blog/", "http://example.com/Blog/"),
            ("http://Exa", "http://exa"),
            ("http://[::1]:80/x", "http://[::1]/x"),
        ] {
            assert_eq!(normalized_prefix(given), want, "{given}");
        }
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        // RFC 9110 §11.1: auth-scheme is case-insensitive; 1*SP before the credentials.
        for (value, want) in [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("BEARER abc", Some("abc")),
            ("Bearer   abc", Some("abc")),
            ("Basic abc", None),
            ("Bearerabc", None),
            ("abc", None),
        ] {
            assert_eq!(bearer_credentials(value), want, "{value:?}");
        }
    }

    #[test]
    fn https_selectors_are_refused() {
        assert!(refuse_https("url", "https://h/p").is_err());
        assert!(refuse_https("prefix", "HTTPS://h/").is_err());
        assert!(refuse_https("url", "http://h/p").is_ok());
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
