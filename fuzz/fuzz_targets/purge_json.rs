//! Fuzzes the admin API's `POST /purge` body parser: arbitrary bytes give a selector or a clear error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match larder::admin::fuzz_parse_purge(data) {
        Ok(_) => {
            // Whatever was accepted is a JSON object (this target found arrays accepted as
            // the fields in order, serde's struct-from-sequence; now refused).
            let v: serde_json::Value = serde_json::from_slice(data).expect("accepted means JSON");
            assert!(v.is_object());
        }
        Err(message) => assert!(!message.is_empty()),
    }
});
