//! Fuzzes the admin API's `POST /purge` body parser: arbitrary bytes give a selector or a clear error, never a panic.
#![no_main]

#[path = "../checks/purge_json.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
