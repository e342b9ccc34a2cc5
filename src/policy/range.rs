//! Byte ranges (RFC 9110 §14) and If-Range (§13.1.5): parse, resolve against a length, coalesce; pure, depends on std + httpdate only.
//!
//! The caller asks [`select_ranges`] what to send for a request against a complete stored
//! (or arriving) 200 response of known length, and gets a [`RangeAnswer`]: the full 200,
//! one or several byte ranges for a 206, or a 416. Like the rest of policy this never
//! fails: anything it cannot understand is answered with the full representation, which
//! RFC 9110 §14.2 always permits ("a server MAY ignore the Range header field").

use std::time::{Duration, SystemTime};

use super::headers::HeaderList;

/// More range-specs than this in one request and we send the whole representation instead
/// (RFC 9110 §14.2 lets a server ignore a Range it finds abusive, and §17.15 warns of
/// many-small-ranges attacks). 16 is far above what real clients send (PDF readers and
/// download managers ask for a handful) and bounds the work per request.
pub const MAX_RANGES: usize = 16;

/// Ranges closer than this are merged into one part: a multipart part header costs roughly
/// 80 bytes, so sending a gap this small is cheaper than a separate part (RFC 9110 §14.6
/// lets a server coalesce ranges "separated by a gap that is smaller than the overhead of
/// sending multiple parts").
pub const COALESCE_GAP: u64 = 80;

/// One satisfiable range, inclusive on both ends as in `Content-Range: bytes first-last/len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    /// Offset of the first byte.
    pub first: u64,
    /// Offset of the last byte (inclusive).
    pub last: u64,
}

impl ByteRange {
    /// Number of bytes in the range.
    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }

    /// Never true: a satisfiable range holds at least one byte. (For clippy's `len` rule.)
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `Content-Range` value for this range of a `complete_len` representation (§14.4).
    pub fn content_range(&self, complete_len: u64) -> String {
        format!("bytes {}-{}/{complete_len}", self.first, self.last)
    }
}

/// One range-spec as written by the client (RFC 9110 §14.1.2), before a length is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeSpec {
    /// `first-last` (`last` given).
    Bounded(u64, u64),
    /// `first-` (to the end).
    From(u64),
    /// `-n` (the last n bytes).
    Suffix(u64),
}

/// What to answer a request that carries Range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// Send the full representation with 200: no Range, a Range we ignore (bad syntax, other
    /// unit, too many ranges, a failed If-Range), or a method ranges do not apply to.
    Full,
    /// Send 206 with these ranges: sorted, non-overlapping, at least one.
    Partial(Vec<ByteRange>),
    /// Send 416 with `Content-Range: bytes */len` (§15.5.17): no range-spec was satisfiable.
    Unsatisfiable,
}

/// Parses a Range field value (RFC 9110 §14.1.2, §14.2). `None` = ignore the field: bad
/// syntax, a unit other than `bytes`, an invalid spec (`5-1`), or more than [`MAX_RANGES`].
/// Numbers too large for u64 are saturated, which keeps `bytes=0-<huge>` meaning "to the end".
pub fn parse_range(value: &[u8]) -> Option<Vec<RangeSpec>> {
    let text = std::str::from_utf8(value).ok()?.trim();
    // §14.1: range units are case-insensitive; "bytes" is the only one we know (§14.1.2).
    let (unit, set) = text.split_once('=')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut specs = Vec::new();
    // §5.6.1: a list may contain empty elements ("bytes=0-1,,2-3"); at least one is required.
    for item in set.split(',') {
        let item = item.trim_matches([' ', '\t']);
        if item.is_empty() {
            continue;
        }
        if specs.len() == MAX_RANGES {
            return None;
        }
        specs.push(parse_spec(item)?);
    }
    if specs.is_empty() { None } else { Some(specs) }
}

fn parse_spec(item: &str) -> Option<RangeSpec> {
    let (first, last) = item.split_once('-')?;
    match (first.is_empty(), last.is_empty()) {
        (true, true) => None,
        // suffix-range = "-" suffix-length
        (true, false) => Some(RangeSpec::Suffix(digits(last)?)),
        (false, true) => Some(RangeSpec::From(digits(first)?)),
        (false, false) => {
            let (a, b) = (digits(first)?, digits(last)?);
            // §14.1.2: "last-pos ... less than first-pos" makes the range-spec invalid.
            (b >= a).then_some(RangeSpec::Bounded(a, b))
        }
    }
}

/// 1*DIGIT, saturating at u64::MAX instead of failing on overflow.
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |acc, b| {
        acc.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

/// Resolves specs against a representation of `len` bytes (RFC 9110 §14.1.2): drops the
/// unsatisfiable ones, clamps `last` to the end, then sorts and coalesces ranges that
/// overlap or lie within [`COALESCE_GAP`] bytes of each other (§14.6). Empty = 416.
pub fn resolve(specs: &[RangeSpec], len: u64) -> Vec<ByteRange> {
    let mut out: Vec<ByteRange> = specs
        .iter()
        .filter_map(|spec| {
            let (first, last) = match *spec {
                // "first-pos ... greater than or equal to the current length" is unsatisfiable.
                RangeSpec::Bounded(a, b) => (a, b.min(len.checked_sub(1)?)),
                RangeSpec::From(a) => (a, len.checked_sub(1)?),
                // §14.1.3: a suffix longer than the representation selects all of it;
                // `-0` selects nothing and is unsatisfiable.
                RangeSpec::Suffix(0) => return None,
                RangeSpec::Suffix(n) => (len.saturating_sub(n), len.checked_sub(1)?),
            };
            (first < len).then_some(ByteRange { first, last })
        })
        .collect();
    out.sort_by_key(|r| r.first);
    let mut merged: Vec<ByteRange> = Vec::with_capacity(out.len());
    for r in out {
        match merged.last_mut() {
            Some(prev) if r.first <= prev.last.saturating_add(COALESCE_GAP + 1) => {
                prev.last = prev.last.max(r.last);
            }
            _ => merged.push(r),
        }
    }
    merged
}

/// RFC 9110 §13.1.5: does If-Range allow the ranges to apply to `stored` (the selected
/// representation's header fields)? An entity-tag must match strongly (a weak tag on either
/// side never matches); an HTTP-date must equal Last-Modified exactly, and Last-Modified must
/// be strong (§8.8.2.2: at least one second before Date). No If-Range = true.
pub fn if_range_matches(request: &HeaderList, stored: &HeaderList) -> bool {
    let Some(value) = request.get_str("if-range") else {
        return request.get("if-range").is_none();
    };
    if value.starts_with('"') || value.starts_with("W/") {
        let strong = |t: &str| t.len() >= 2 && t.starts_with('"') && t.ends_with('"');
        return strong(value)
            && stored
                .get_str("etag")
                .is_some_and(|e| strong(e) && e == value);
    }
    let (Some(asked), Some(modified), Some(date)) = (
        http_date(Some(value)),
        http_date(stored.get_str("last-modified")),
        http_date(stored.get_str("date")),
    ) else {
        return false;
    };
    asked == modified && date.duration_since(modified).unwrap_or_default() >= Duration::from_secs(1)
}

fn http_date(v: Option<&str>) -> Option<SystemTime> {
    httpdate::parse_http_date(v?).ok()
}

/// What to answer a `method` request carrying `request` headers, for a complete 200 response
/// with `stored` headers and a body of `len` bytes. Ranges apply to GET only (§14.2; HEAD
/// answers as the GET would, so it counts as GET here).
pub fn select_ranges(
    method: &str,
    request: &HeaderList,
    status: u16,
    stored: &HeaderList,
    len: u64,
) -> RangeAnswer {
    if !(method == "GET" || method == "HEAD") || status != 200 {
        return RangeAnswer::Full;
    }
    // §14.2: a Range field that occurs more than once is not a valid single value; ignore it.
    let mut lines = request.get_all("range");
    let (Some(value), None) = (lines.next(), lines.next()) else {
        return RangeAnswer::Full;
    };
    let Some(specs) = parse_range(value) else {
        return RangeAnswer::Full;
    };
    // §13.2.2 step 5: If-Range is evaluated only when a Range would otherwise apply.
    if !if_range_matches(request, stored) {
        return RangeAnswer::Full;
    }
    let ranges = resolve(&specs, len);
    if ranges.is_empty() {
        RangeAnswer::Unsatisfiable
    } else {
        RangeAnswer::Partial(ranges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeSpec::*;

    fn r(first: u64, last: u64) -> ByteRange {
        ByteRange { first, last }
    }

    fn list(fields: &[(&str, &str)]) -> HeaderList {
        fields
            .iter()
            .map(|(n, v)| (*n, v.as_bytes().to_vec()))
            .collect()
    }

    // RFC 9110 §14.1, §14.1.2, §14.1.3, §14.2 (section per row).
    #[test]
    fn rfc9110_14_1_range_parse_table() {
        let cases: &[(&str, Option<Vec<RangeSpec>>, &str)] = &[
            (
                "bytes=0-499",
                Some(vec![Bounded(0, 499)]),
                "§14.1.2 first 500 bytes",
            ),
            ("bytes=500-", Some(vec![From(500)]), "§14.1.2 open range"),
            ("bytes=-500", Some(vec![Suffix(500)]), "§14.1.3 suffix"),
            (
                "bytes=-0",
                Some(vec![Suffix(0)]),
                "§14.1.3 valid syntax, unsatisfiable later",
            ),
            (
                "BYTES=1-2",
                Some(vec![Bounded(1, 2)]),
                "§14.1 units are case-insensitive",
            ),
            (
                "bytes= 0-1 , 5-6,,9-",
                Some(vec![Bounded(0, 1), Bounded(5, 6), From(9)]),
                "§5.6.1 OWS and empty list elements",
            ),
            ("bytes=5-1", None, "§14.1.2 last < first is invalid"),
            ("bytes=", None, "§14.1.2 at least one range-spec"),
            ("bytes=-", None, "neither first nor suffix length"),
            ("bytes=a-b", None, "not digits"),
            ("bytes=1-2-3", None, "stray dash"),
            ("bytes=+1-2", None, "sign is not a DIGIT"),
            ("items=0-5", None, "§14.1 unknown unit: ignore"),
            ("bytes 0-5", None, "missing ="),
            ("bytes =0-5", None, "no whitespace before ="),
            ("", None, "empty"),
            (
                "bytes=0-99999999999999999999999",
                Some(vec![Bounded(0, u64::MAX)]),
                "huge last-pos saturates and still means to the end",
            ),
            (
                "bytes=99999999999999999999999-",
                Some(vec![From(u64::MAX)]),
                "huge first-pos saturates (unsatisfiable later)",
            ),
        ];
        for (input, want, why) in cases {
            assert_eq!(&parse_range(input.as_bytes()), want, "{input:?}: {why}");
        }
    }

    #[test]
    fn rfc9110_14_2_too_many_ranges_are_ignored() {
        let sixteen = format!("bytes={}", vec!["0-0"; MAX_RANGES].join(","));
        assert_eq!(parse_range(sixteen.as_bytes()).map(|s| s.len()), Some(16));
        let thousand: Vec<String> = (0..1000).map(|i| format!("{i}-{i}")).collect();
        let value = format!("bytes={}", thousand.join(","));
        assert_eq!(
            parse_range(value.as_bytes()),
            None,
            "§14.2/§17.15: 1000 ranges"
        );
    }

    // RFC 9110 §14.1.2, §14.1.3 (section per row).
    #[test]
    fn rfc9110_14_1_2_range_resolve_table() {
        let cases: &[(&[RangeSpec], u64, Vec<ByteRange>, &str)] = &[
            (&[Bounded(0, 499)], 10_000, vec![r(0, 499)], "§14.1.2"),
            (
                &[Bounded(0, 499)],
                100,
                vec![r(0, 99)],
                "§14.1.2 last-pos clamped to the end",
            ),
            (
                &[From(9_500)],
                10_000,
                vec![r(9_500, 9_999)],
                "§14.1.2 open",
            ),
            (
                &[Suffix(500)],
                10_000,
                vec![r(9_500, 9_999)],
                "§14.1.3 suffix",
            ),
            (
                &[Suffix(500)],
                100,
                vec![r(0, 99)],
                "§14.1.3 suffix longer than body",
            ),
            (&[Suffix(0)], 100, vec![], "§14.1.3 -0 is unsatisfiable"),
            (
                &[Bounded(100, 200)],
                100,
                vec![],
                "§14.1.2 first-pos at length",
            ),
            (&[From(u64::MAX)], 100, vec![], "saturated first-pos"),
            (
                &[Bounded(0, 0)],
                0,
                vec![],
                "nothing is satisfiable in an empty body",
            ),
            (&[Suffix(5)], 0, vec![], "suffix of an empty body"),
            (
                &[Bounded(0, 0), Bounded(500, 600)],
                100,
                vec![r(0, 0)],
                "§14.1.1 the satisfiable subset",
            ),
            (
                &[Bounded(500, 600), Bounded(0, 10)],
                10_000,
                vec![r(0, 10), r(500, 600)],
                "§14.6 sorted",
            ),
            (
                &[Bounded(0, 100), Bounded(50, 150)],
                10_000,
                vec![r(0, 150)],
                "§14.6 overlapping coalesced",
            ),
            (
                &[Bounded(0, 9), Bounded(10, 19)],
                10_000,
                vec![r(0, 19)],
                "§14.6 adjacent coalesced",
            ),
            (
                &[Bounded(0, 9), Bounded(50, 59)],
                10_000,
                vec![r(0, 59)],
                "§14.6 gap smaller than a part header",
            ),
            (
                &[Bounded(0, 9), Bounded(1000, 1009)],
                10_000,
                vec![r(0, 9), r(1000, 1009)],
                "far apart stay separate",
            ),
            (
                &[From(0), Bounded(5, 6), Suffix(3)],
                10,
                vec![r(0, 9)],
                "§17.15 overlapping abuse collapses to one range",
            ),
        ];
        for (specs, len, want, why) in cases {
            assert_eq!(&resolve(specs, *len), want, "{specs:?} of {len}: {why}");
        }
    }

    #[test]
    fn rfc9110_13_1_5_if_range() {
        let stored = list(&[
            ("etag", "\"v1\""),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("date", "Sun, 06 Nov 1994 09:00:00 GMT"),
        ]);
        let weak_stored = list(&[("etag", "W/\"v1\"")]);
        let same_second = list(&[
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        let cases: &[(&str, &HeaderList, bool, &str)] = &[
            ("\"v1\"", &stored, true, "strong match"),
            ("\"v2\"", &stored, false, "other tag"),
            (
                "W/\"v1\"",
                &stored,
                false,
                "weak tag in If-Range never matches",
            ),
            (
                "\"v1\"",
                &weak_stored,
                false,
                "weak stored tag never matches",
            ),
            (
                "Sun, 06 Nov 1994 08:49:37 GMT",
                &stored,
                true,
                "exact date, strong LM",
            ),
            (
                "Sun, 06 Nov 1994 08:49:38 GMT",
                &stored,
                false,
                "date must be exact",
            ),
            (
                "Sun, 06 Nov 1994 08:49:37 GMT",
                &same_second,
                false,
                "§8.8.2.2 weak LM",
            ),
            (
                "Sun, 06 Nov 1994 08:49:37 GMT",
                &weak_stored,
                false,
                "no Last-Modified",
            ),
            ("garbage", &stored, false, "neither tag nor date"),
        ];
        for (value, stored, want, why) in cases {
            let req = list(&[("if-range", value)]);
            assert_eq!(if_range_matches(&req, stored), *want, "{value:?}: {why}");
        }
        assert!(if_range_matches(&HeaderList::new(), &stored), "absent");
    }

    #[test]
    fn rfc9110_14_2_select_ranges() {
        let stored = list(&[("etag", "\"v1\"")]);
        let req = |fields: &[(&str, &str)]| list(fields);
        let partial = RangeAnswer::Partial(vec![r(0, 9)]);
        let cases: &[(&str, HeaderList, u16, RangeAnswer, &str)] = &[
            (
                "GET",
                req(&[("range", "bytes=0-9")]),
                200,
                partial.clone(),
                "§14.2",
            ),
            (
                "HEAD",
                req(&[("range", "bytes=0-9")]),
                200,
                partial.clone(),
                "as GET",
            ),
            (
                "POST",
                req(&[("range", "bytes=0-9")]),
                200,
                RangeAnswer::Full,
                "GET only",
            ),
            (
                "GET",
                req(&[("range", "bytes=0-9")]),
                404,
                RangeAnswer::Full,
                "not a 200",
            ),
            ("GET", req(&[]), 200, RangeAnswer::Full, "no Range"),
            (
                "GET",
                req(&[("range", "bytes=9-1")]),
                200,
                RangeAnswer::Full,
                "invalid",
            ),
            (
                "GET",
                req(&[("range", "bytes=0-1"), ("range", "bytes=2-3")]),
                200,
                RangeAnswer::Full,
                "repeated field",
            ),
            (
                "GET",
                req(&[("range", "bytes=500-")]),
                200,
                RangeAnswer::Unsatisfiable,
                "§15.5.17",
            ),
            (
                "GET",
                req(&[("range", "bytes=0-9"), ("if-range", "\"v1\"")]),
                200,
                partial.clone(),
                "§13.1.5 match",
            ),
            (
                "GET",
                req(&[("range", "bytes=0-9"), ("if-range", "\"v0\"")]),
                200,
                RangeAnswer::Full,
                "§13.1.5 mismatch",
            ),
        ];
        for (method, req, status, want, why) in cases {
            assert_eq!(
                &select_ranges(method, req, *status, &stored, 100),
                want,
                "{method} {req:?}: {why}"
            );
        }
    }
}
