//! Fuzzes the Cache-Control and Vary parsers on arbitrary field lines (one `name:value` per input line).
#![no_main]

#[path = "../checks/header_parsing.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
