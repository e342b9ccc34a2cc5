//! The server's counters, in one Prometheus registry per server (tests run several servers in one process).

use prometheus::{Encoder, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

/// Counters the request path moves; rendered as Prometheus text on the admin listener.
pub struct Metrics {
    registry: Registry,
    /// Requests by how the cache answered: hit, stale, fetch (miss or revalidation), pass.
    pub requests: IntCounterVec,
    /// Requests sent to the origin by cache fetches (misses, revalidations, refreshes).
    pub origin_requests: IntCounter,
    /// Requests that waited for another request's origin fetch instead of making their own.
    pub coalesced_waits: IntCounter,
    /// Background revalidations started for stale-while-revalidate.
    pub background_refreshes: IntCounter,
    /// Stale responses served because the origin failed (stale-if-error).
    pub stale_served: IntCounter,
    /// Responses that could not be stored because of a disk or database error.
    pub store_write_errors: IntCounter,
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("larder_requests_total", "Client requests by cache result"),
            &["result"],
        )
        .expect("valid metric");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let origin_requests = counter(
            "larder_origin_fetches_total",
            "Origin requests made by cache fetches",
        );
        let coalesced_waits = counter(
            "larder_coalesced_waits_total",
            "Requests served by another request's origin fetch",
        );
        let background_refreshes = counter(
            "larder_background_refreshes_total",
            "Background revalidations started (stale-while-revalidate)",
        );
        let stale_served = counter(
            "larder_stale_if_error_served_total",
            "Stale responses served because the origin failed",
        );
        let store_write_errors = counter(
            "larder_store_write_errors_total",
            "Responses not stored because of a disk or database error",
        );
        for c in [
            &store_write_errors,
            &origin_requests,
            &coalesced_waits,
            &background_refreshes,
            &stale_served,
        ] {
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
        }
        registry
            .register(Box::new(requests.clone()))
            .expect("unique metric");
        Self {
            registry,
            requests,
            origin_requests,
            coalesced_waits,
            background_refreshes,
            stale_served,
            store_write_errors,
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
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
