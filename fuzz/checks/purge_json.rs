// The purge_json check, shared by the libFuzzer target and the stable run in `cargo test`
// (tests/it/fuzz_checks.rs): the admin purge body parser on arbitrary bytes.

/// One input: panics if a property breaks.
pub fn check(data: &[u8]) {
    match larder::admin::fuzz_parse_purge(data) {
        Ok(_) => {
            // Whatever was accepted is a JSON object (this target found arrays accepted as
            // the fields in order, serde's struct-from-sequence; now refused).
            let v: serde_json::Value = serde_json::from_slice(data).expect("accepted means JSON");
            assert!(v.is_object());
        }
        Err(message) => assert!(!message.is_empty()),
    }
}
