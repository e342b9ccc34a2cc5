//! The server's counters, in one Prometheus registry per server (tests run several servers in one process); depends on nothing internal.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// The values of `larder_requests_total{result}`, all present from the start so that rates
/// and dashboards never see a series appear out of nowhere.
pub const RESULTS: [&str; 6] = ["hit", "stale", "miss", "revalidated", "pass", "error"];

/// Counters the request path moves; rendered as Prometheus text on the admin listener.
pub struct Metrics {
    registry: Registry,
    /// Requests by how the cache answered (see [`RESULTS`] and [`result_of`]).
    pub requests: IntCounterVec,
    /// Requests sent to the origin: cache fetches (counted by the fetch) and passes (counted
    /// by the server when their response is ready).
    pub origin_requests: IntCounter,
    /// Time from sending a request to the origin until its response head (every origin request).
    pub origin_latency: Histogram,
    /// Requests that waited for another request's origin fetch instead of making their own.
    pub coalesced_waits: IntCounter,
    /// Background revalidations started for stale-while-revalidate.
    pub background_refreshes: IntCounter,
    /// Stale responses served because the origin failed (stale-if-error).
    pub stale_served: IntCounter,
    /// Response body bytes announced to clients, by source: `cache` or `origin`.
    pub served_bytes: IntCounterVec,
    /// Entries removed or marked stale by admin purges.
    pub purged_entries: IntCounter,
    /// Responses that could not be stored because of a disk or database error.
    pub store_write_errors: IntCounter,
    store_entries: IntGauge,
    store_usage_bytes: IntGauge,
    store_evictions: IntCounter,
    store_body_bytes: IntGauge,
    store_file_bytes: IntGauge,
    store_dropped_records: IntCounter,
    store_damaged_bodies: IntCounter,
}

/// The store's numbers at scrape time (filled by the admin API from `Store::stats`).
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreGauges {
    pub entries: u64,
    pub body_bytes: u64,
    pub body_file_bytes: u64,
    pub dropped_records: u64,
    pub damaged_bodies: u64,
    pub usage_bytes: u64,
    pub evictions: u64,
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        let vec = |name: &str, help: &str, label: &str| {
            let v = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(v.clone()))
                .expect("unique metric");
            v
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let requests = vec(
            "larder_requests_total",
            "Client requests by cache result (hit, stale, miss, revalidated, pass, error)",
            "result",
        );
        for r in RESULTS {
            requests.with_label_values(&[r]);
        }
        let served_bytes = vec(
            "larder_served_bytes_total",
            "Response body bytes sent to clients (by Content-Length), by source: cache or origin",
            "source",
        );
        for s in ["cache", "origin"] {
            served_bytes.with_label_values(&[s]);
        }
        let origin_latency = Histogram::with_opts(
            HistogramOpts::new(
                "larder_origin_request_duration_seconds",
                "Time until the origin's response head, for every origin request (its _count is the number of origin requests)",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(origin_latency.clone()))
            .expect("unique metric");
        Self {
            requests,
            origin_requests: counter(
                "larder_origin_fetches_total",
                "Origin requests: cache fetches (misses, revalidations, refreshes) and passes (unsafe methods, HEAD misses)",
            ),
            origin_latency,
            coalesced_waits: counter(
                "larder_coalesced_waits_total",
                "Requests served by another request's origin fetch",
            ),
            background_refreshes: counter(
                "larder_background_refreshes_total",
                "Background revalidations started (stale-while-revalidate)",
            ),
            stale_served: counter(
                "larder_stale_if_error_served_total",
                "Stale responses served because the origin failed",
            ),
            served_bytes,
            purged_entries: counter(
                "larder_purged_entries_total",
                "Entries deleted or marked stale by admin purges",
            ),
            store_write_errors: counter(
                "larder_store_write_errors_total",
                "Responses not stored because of a disk or database error",
            ),
            store_entries: gauge("larder_store_entries", "Stored entries (Vary variants)"),
            store_usage_bytes: gauge(
                "larder_store_usage_bytes",
                "Bytes held against [storage] max_size: records plus distinct body files",
            ),
            store_evictions: counter(
                "larder_store_evictions_total",
                "Entries evicted since start to stay under [storage] max_size",
            ),
            store_body_bytes: gauge(
                "larder_store_body_bytes",
                "Sum of stored body lengths, per entry",
            ),
            store_file_bytes: gauge(
                "larder_store_body_file_bytes",
                "Disk used by body files (each distinct file once)",
            ),
            store_dropped_records: counter(
                "larder_store_dropped_records_total",
                "Index records dropped since start because they did not decode",
            ),
            store_damaged_bodies: counter(
                "larder_store_damaged_bodies_total",
                "Entries dropped since start because their body failed its integrity check or was missing",
            ),
            registry,
        }
    }

    /// Counts one answered request: its result and the body bytes it announced.
    pub fn count_response(&self, result: &'static str, body_bytes: Option<u64>) {
        self.requests.with_label_values(&[result]).inc();
        if let Some(n) = body_bytes {
            let source = match result {
                "hit" | "stale" | "revalidated" => "cache",
                _ => "origin",
            };
            self.served_bytes.with_label_values(&[source]).inc_by(n);
        }
    }

    /// How many requests were counted with `result` (one of [`RESULTS`]) since start.
    pub fn result_count(&self, result: &str) -> u64 {
        self.requests.with_label_values(&[result]).get()
    }

    /// Prometheus text exposition of every metric, with the store's numbers as of now.
    pub fn render(&self, store: StoreGauges) -> String {
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.store_entries.set(as_i64(store.entries));
        self.store_body_bytes.set(as_i64(store.body_bytes));
        self.store_file_bytes.set(as_i64(store.body_file_bytes));
        self.store_usage_bytes.set(as_i64(store.usage_bytes));
        // The store counts these itself since open; bring ours up to its value (both only grow).
        for (c, v) in [
            (&self.store_dropped_records, store.dropped_records),
            (&self.store_damaged_bodies, store.damaged_bodies),
            (&self.store_evictions, store.evictions),
        ] {
            let now = c.get();
            if v > now {
                c.inc_by(v - now);
            }
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The `result` label for a response, from its status and `Cache-Status` value: the one
/// place that maps what the proxy did to the six results operators chart.
pub fn result_of(status: u16, cache_status: Option<&str>) -> &'static str {
    let Some(cs) = cache_status else {
        // Only requests rejected before the cache (e.g. no Host) carry no Cache-Status.
        return "error";
    };
    if cs.starts_with("larder; hit") {
        return if cs.contains("detail=stale") {
            "stale"
        } else {
            "hit"
        };
    }
    if cs.contains("detail=stale-if-error") {
        return "stale";
    }
    if cs.contains("detail=origin-") || (status >= 500 && cs.contains("detail=only-if-cached")) {
        return "error";
    }
    if cs.contains("fwd=stale") && cs.contains("fwd-status=304") {
        return "revalidated";
    }
    if cs.contains("fwd=method") || cs.contains("fwd=request") {
        return "pass";
    }
    "miss"
}

#[cfg(test)]
mod tests {
    use super::result_of;

    #[test]
    fn results_from_cache_status() {
        let cases = [
            (200, Some("larder; hit; ttl=5"), "hit"),
            (
                200,
                Some("larder; hit; ttl=-3; detail=stale-while-revalidate"),
                "stale",
            ),
            (
                200,
                Some("larder; fwd=stale; fwd-status=503; detail=stale-if-error"),
                "stale",
            ),
            (
                200,
                Some("larder; fwd=miss; fwd-status=200; stored"),
                "miss",
            ),
            (200, Some("larder; fwd=vary-miss; fwd-status=200"), "miss"),
            (
                200,
                Some("larder; fwd=stale; fwd-status=304"),
                "revalidated",
            ),
            (
                200,
                Some("larder; fwd=stale; fwd-status=200; stored"),
                "miss",
            ),
            (204, Some("larder; fwd=method; fwd-status=204"), "pass"),
            (206, Some("larder; fwd=request; fwd-status=206"), "pass"),
            (
                502,
                Some("larder; fwd=miss; detail=origin-unreachable"),
                "error",
            ),
            (504, Some("larder; detail=only-if-cached"), "error"),
            (400, None, "error"),
        ];
        for (status, cs, want) in cases {
            assert_eq!(result_of(status, cs), want, "{cs:?}");
        }
    }
}
