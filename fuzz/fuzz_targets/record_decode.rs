//! Fuzzes the stored-record decoder: bad bytes are an error, never a panic; a record that decodes re-encodes to the same entry.
#![no_main]

use libfuzzer_sys::fuzz_target;

use larder::store::{fuzz_decode_record, fuzz_encode_record};

fuzz_target!(|data: &[u8]| {
    if let Ok(entry) = fuzz_decode_record(data) {
        let bytes = fuzz_encode_record(&entry).expect("a decoded entry encodes again");
        let again = fuzz_decode_record(&bytes).expect("and decodes again");
        assert_eq!(again, entry);
    }
});
