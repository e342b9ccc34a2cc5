// The record_decode check, shared by the libFuzzer target and the stable run in `cargo test`
// (tests/it/fuzz_checks.rs): the stored-record decoder on arbitrary bytes.

use larder::store::{fuzz_decode_record, fuzz_encode_record};

/// One input: panics if a property breaks.
pub fn check(data: &[u8]) {
    if let Ok(entry) = fuzz_decode_record(data) {
        let bytes = fuzz_encode_record(&entry).expect("a decoded entry encodes again");
        let again = fuzz_decode_record(&bytes).expect("and decodes again");
        assert_eq!(again, entry);
    }
}
