//! The freshness facts computed once when a response is stored, and the clock-free arithmetic over them (RFC 9111 §4.2).

use std::time::{Duration, SystemTime};

/// What the policy decided about a stored response's life, computed once at store time
/// so that a cache hit does no header parsing. Every time is an argument, never read here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Freshness {
    /// When the request that produced the response was sent (RFC 9111 §4.2.3 `request_time`).
    pub request_time: SystemTime,
    /// When the response was received (RFC 9111 §4.2.3 `response_time`).
    pub response_time: SystemTime,
    /// The age the response already had on arrival (RFC 9111 §4.2.3 `corrected_initial_age`).
    pub corrected_initial_age: Duration,
    /// Freshness lifetime (RFC 9111 §4.2.1).
    pub lifetime: Duration,
    /// RFC 5861 stale-while-revalidate window past the lifetime (zero = none).
    pub stale_while_revalidate: Duration,
    /// RFC 5861 stale-if-error window past the lifetime (zero = none).
    pub stale_if_error: Duration,
    /// must-revalidate, proxy-revalidate or s-maxage: never served stale (RFC 9111 §5.2.2.2, §5.2.2.8, §5.2.2.10).
    pub must_revalidate: bool,
    /// Response `no-cache` without field names: revalidate on every use (RFC 9111 §5.2.2.4).
    pub no_cache: bool,
}

impl Freshness {
    /// RFC 9111 §4.2.3 `current_age` = corrected_initial_age + resident_time.
    pub fn current_age(&self, now: SystemTime) -> Duration {
        let resident = now
            .duration_since(self.response_time)
            .unwrap_or(Duration::ZERO);
        self.corrected_initial_age.saturating_add(resident)
    }

    /// RFC 9111 §4.2: fresh while freshness_lifetime > current_age.
    pub fn is_fresh(&self, now: SystemTime) -> bool {
        self.lifetime > self.current_age(now)
    }

    /// How far past its lifetime the response is (zero while fresh).
    pub fn staleness(&self, now: SystemTime) -> Duration {
        self.current_age(now).saturating_sub(self.lifetime)
    }

    /// The instant the response stops being fresh.
    pub fn fresh_until(&self) -> SystemTime {
        let remaining = self.lifetime.saturating_sub(self.corrected_initial_age);
        self.response_time
            .checked_add(remaining)
            .unwrap_or(self.response_time)
    }

    /// The instant after which no stale window allows serving it without the origin.
    pub fn stale_until(&self) -> SystemTime {
        let window = self.stale_while_revalidate.max(self.stale_if_error);
        self.fresh_until()
            .checked_add(window)
            .unwrap_or_else(|| self.fresh_until())
    }

    /// A copy that is stale from `now` on, keeping its stale windows: what a soft purge stores.
    pub fn expired_at(&self, now: SystemTime) -> Freshness {
        Freshness {
            lifetime: self.lifetime.min(self.current_age(now)),
            ..*self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn sample() -> Freshness {
        Freshness {
            request_time: at(1000),
            response_time: at(1000),
            corrected_initial_age: Duration::from_secs(10),
            lifetime: Duration::from_secs(60),
            stale_while_revalidate: Duration::from_secs(30),
            stale_if_error: Duration::from_secs(5),
            must_revalidate: false,
            no_cache: false,
        }
    }

    // RFC 9111 §4.2.3: current_age = corrected_initial_age + resident_time.
    #[test]
    fn rfc9111_4_2_3_current_age_adds_resident_time() {
        assert_eq!(sample().current_age(at(1020)), Duration::from_secs(30));
        // A clock that went backwards gives no negative resident time.
        assert_eq!(sample().current_age(at(900)), Duration::from_secs(10));
    }

    // RFC 9111 §4.2: fresh iff freshness_lifetime > current_age.
    #[test]
    fn rfc9111_4_2_freshness_boundary() {
        let f = sample();
        assert!(f.is_fresh(at(1049)));
        assert!(!f.is_fresh(at(1050)));
        assert_eq!(f.fresh_until(), at(1050));
        assert_eq!(f.stale_until(), at(1080));
        assert_eq!(f.staleness(at(1060)), Duration::from_secs(10));
    }

    // RFC 9111 §4.2.4 (stale now, served only as permitted) with the RFC 5861 §3/§4 windows kept.
    #[test]
    fn rfc5861_3_expired_at_is_stale_now_and_keeps_windows() {
        let f = sample().expired_at(at(1020));
        assert!(!f.is_fresh(at(1020)));
        assert_eq!(f.stale_while_revalidate, Duration::from_secs(30));
        assert_eq!(f.fresh_until(), at(1020));
    }
}
