// The header_parsing check, shared by the libFuzzer target and the stable run in `cargo test`
// (tests/it/fuzz_checks.rs): Cache-Control and Vary parsing on arbitrary field lines.

use larder::policy::{CacheControl, HeaderList, PolicyOptions, Vary, parse_vary, vary_values};

/// RFC 9111 §1.2.2: every delta-seconds value is capped at 2^31.
const DELTA_MAX: std::time::Duration = std::time::Duration::from_secs(1 << 31);

/// One input: panics if a property breaks.
pub fn check(data: &[u8]) {
    // The whole input as one Cache-Control value.
    check_cc(&CacheControl::parse(&String::from_utf8_lossy(data)));

    // The input as field lines; the first byte picks the option set.
    let opts = PolicyOptions {
        normalize_accept_encoding: data.first().is_some_and(|b| b & 1 == 1),
        normalize_accept_language: data.first().is_some_and(|b| b & 2 == 2),
        ..PolicyOptions::default()
    };
    let mut list = HeaderList::new();
    for line in data.split(|b| *b == b'\n') {
        let (name, value) = match line.iter().position(|b| *b == b':') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (&b"vary"[..], line),
        };
        list.push(&String::from_utf8_lossy(name), value.to_vec());
    }
    check_cc(&CacheControl::from_request(&list));
    check_cc(&CacheControl::from_response(&list));

    match parse_vary(&list) {
        Vary::Star => {}
        Vary::Fields(fields) => {
            // Sorted, deduplicated, lower-case tokens: the order of Vary lines never splits a key.
            assert!(fields.windows(2).all(|w| w[0] < w[1]), "{fields:?}");
            assert!(fields.iter().all(|f| {
                !f.is_empty()
                    && f.bytes()
                        .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase())
            }));
            let values = vary_values(&fields, &list, &opts);
            assert_eq!(values.len(), fields.len());
            // Deterministic: the same request always selects the same variant.
            assert_eq!(values, vary_values(&fields, &list, &opts));
            for ((name, value), field) in values.iter().zip(&fields) {
                assert_eq!(name, field);
                assert_eq!(value.is_some(), list.contains(name));
            }
        }
    }
}

fn check_cc(cc: &CacheControl) {
    for d in [
        cc.max_age,
        cc.s_maxage,
        cc.min_fresh,
        cc.stale_while_revalidate,
        cc.stale_if_error,
    ]
    .into_iter()
    .flatten()
    {
        assert!(d <= DELTA_MAX, "{d:?} exceeds 2^31 s");
    }
}
