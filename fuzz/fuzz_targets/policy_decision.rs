//! Fuzzes the whole caching decision on arbitrary request/response field lists: storable, lookup, stale-on-error, conditionals, 304 merge, ranges, invalidation.
#![no_main]

#[path = "../checks/policy_decision.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
