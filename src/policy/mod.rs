//! Pure RFC 9111 caching rules: no I/O, no clock (time is always an argument), no actix/awc/sled types; depends on std + httpdate only.
//!
//! Every function is infallible: malformed input gives the conservative answer
//! (not storable, stale, must revalidate), never an error or a panic.
//!
//! The flow a caller drives:
//! - miss: [`storable`] on the origin response → store [`headers_to_store`] with the
//!   returned [`Freshness`] under the variant key from [`parse_vary`] + [`vary_values`];
//! - nothing stored selected: [`miss_is_unusable`] → 504 (only-if-cached), else fetch;
//! - hit: [`lookup`] → `Fresh` / `Stale` / `MustRevalidate` / `Unusable` (→ 504); answer client
//!   conditionals with [`evaluate_conditional`] + [`not_modified_headers`]; send [`age_seconds`] as Age;
//! - revalidation: send [`revalidation_headers`]; on a 304 check [`not_modified_matches`],
//!   then [`merge_not_modified`] and call [`storable`] again on the merged fields;
//! - HEAD answered by the origin: [`head_update`] on each stored GET variant it selects;
//! - origin error: [`may_serve_stale_on_error`];
//! - unsafe methods: [`invalidation_targets`]; tags: [`surrogate_keys`].

mod cache_control;
mod freshness;
pub mod freshness_state;
pub mod headers;
mod invalidation;
pub mod range;
#[cfg(test)]
mod robustness;
mod structured;
mod syntax;
mod validators;
mod vary;

use std::time::Duration;

pub use cache_control::{CacheControl, MaxStale};
pub use freshness::{
    Lookup, NotStorable, Storable, age_seconds, lookup, may_serve_stale_on_error, miss_is_unusable,
    storable,
};
pub use freshness_state::Freshness;
pub use headers::{HeaderList, headers_to_store, strip_hop_by_hop};
pub use invalidation::{invalidation_targets, is_unsafe_method, surrogate_keys};
pub use range::{ByteRange, RangeAnswer, select_ranges};
pub use validators::{
    ClientConditional, HeadUpdate, evaluate_conditional, head_matches_stored, head_update,
    merge_not_modified, not_modified_headers, not_modified_matches, revalidation_headers,
    revalidation_matches,
};
pub use vary::{Vary, parse_vary, vary_values};

/// Operator settings for the caching rules; `Default` gives the values documented per field.
#[derive(Clone, Debug)]
pub struct PolicyOptions {
    /// Heuristic freshness as a percentage of (Date − Last-Modified); default 10
    /// (RFC 9111 §4.2.2 "a typical setting of this fraction might be 10%").
    pub heuristic_fraction_percent: u32,
    /// Upper bound on any heuristic lifetime; default 24 hours.
    pub max_heuristic_lifetime: Duration,
    /// Default true: a valid CDN-Cache-Control (RFC 9213), else Surrogate-Control, replaces
    /// Cache-Control and Expires for this cache's storage and freshness decisions.
    pub honor_cdn_cache_control: bool,
    /// Default zero: a stale-if-error window given to responses that carry none and that
    /// allow stale serving (no must-revalidate, proxy-revalidate, s-maxage or no-cache).
    pub default_stale_if_error: Duration,
    /// Default true: Accept-Encoding selects variants by the set of acceptable codings
    /// (see [`vary_values`]), so that browsers' different spellings share one variant.
    pub normalize_accept_encoding: bool,
    /// Default true: Accept-Language selects variants by its language ranges in preference
    /// order, lower-cased, without q-values or whitespace (see [`vary_values`]).
    pub normalize_accept_language: bool,
    /// Default false: a response carrying Set-Cookie is not stored in the shared cache
    /// (unless `private="set-cookie"` / `no-cache="set-cookie"` lets us store it without the field).
    pub share_set_cookie: bool,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        PolicyOptions {
            heuristic_fraction_percent: 10,
            max_heuristic_lifetime: Duration::from_secs(24 * 60 * 60),
            honor_cdn_cache_control: true,
            default_stale_if_error: Duration::ZERO,
            normalize_accept_encoding: true,
            normalize_accept_language: true,
            share_set_cookie: false,
        }
    }
}
