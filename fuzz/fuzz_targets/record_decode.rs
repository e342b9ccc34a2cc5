//! Fuzzes the stored-record decoder: bad bytes are an error, never a panic; a record that decodes re-encodes to the same entry.
#![no_main]

#[path = "../checks/record_decode.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
