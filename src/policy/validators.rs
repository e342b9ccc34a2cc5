//! Validators (RFC 9110 §8.8): answering client conditionals from the cache, revalidating upstream, and folding 304/HEAD responses into stored fields (RFC 9111 §3.2, §4.3).

use super::headers::{HeaderList, headers_to_store, strip_hop_by_hop};
use super::syntax::{parse_http_date, trim_ows};

/// An entity-tag (RFC 9110 §8.8.3) borrowed from a field value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct EntityTag<'a> {
    weak: bool,
    opaque: &'a [u8],
}

impl EntityTag<'_> {
    /// RFC 9110 §8.8.3.2 weak comparison: opaque tags match, weakness ignored.
    fn weak_eq(&self, other: &EntityTag<'_>) -> bool {
        self.opaque == other.opaque
    }

    /// RFC 9110 §8.8.3.2 strong comparison: both strong and opaque tags match.
    fn strong_eq(&self, other: &EntityTag<'_>) -> bool {
        !self.weak && !other.weak && self.opaque == other.opaque
    }
}

/// Parses one entity-tag at the start of `s`, returning it and the rest.
/// `entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE`, etagc = %x21 / %x23-7E / obs-text.
fn take_etag(s: &[u8]) -> Option<(EntityTag<'_>, &[u8])> {
    let (weak, s) = match s.strip_prefix(b"W/") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let s = s.strip_prefix(b"\"")?;
    let end = s.iter().position(|&b| b == b'"')?;
    let opaque = s.get(..end)?;
    if opaque.iter().any(|&b| b < 0x21 || b == 0x7f) {
        return None;
    }
    Some((
        EntityTag { weak, opaque },
        s.get(end + 1..).unwrap_or_default(),
    ))
}

/// A whole field value holding exactly one entity-tag (the ETag field).
fn parse_etag(value: &[u8]) -> Option<EntityTag<'_>> {
    let (tag, rest) = take_etag(trim_ows(value))?;
    trim_ows(rest).is_empty().then_some(tag)
}

/// A `#entity-tag` list (If-None-Match); `None` on any syntax error. Entity-tags may contain
/// commas, so this scans quotes rather than splitting at commas.
fn parse_etag_list(value: &[u8]) -> Option<Vec<EntityTag<'_>>> {
    let mut tags = Vec::new();
    let mut rest = value;
    loop {
        rest = skip_list_separators(rest);
        if rest.is_empty() {
            return Some(tags);
        }
        let (tag, after) = take_etag(rest)?;
        tags.push(tag);
        let after = trim_ows(after);
        if !(after.is_empty() || after.starts_with(b",")) {
            return None;
        }
        rest = after;
    }
}

fn skip_list_separators(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t' | b',', rest @ ..] = s {
        s = rest;
    }
    s
}

/// The answer to a client's conditional request from a stored response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientConditional {
    /// Send 304 with [`not_modified_headers`].
    NotModified,
    /// Send the full stored response.
    Full,
}

/// Evaluates a client's If-None-Match / If-Modified-Since against a stored response
/// (RFC 9111 §4.3.2, RFC 9110 §13.1.2, §13.1.3, §13.2.2).
///
/// - Only GET and HEAD, and only a stored 200 (§4.3.2; RFC 9110 §13.2.1 ignores preconditions
///   when the unconditional answer would not be 2xx; we store no 206).
/// - If-None-Match takes precedence (RFC 9110 §13.2.2 step 3): `*` matches; a list matches by
///   weak comparison (§13.1.2); a malformed list or a stored response without a valid ETag
///   means the condition is true → `Full`. If-Modified-Since is then ignored (§13.1.3).
/// - If-Modified-Since (step 4): one valid HTTP-date; 304 when the stored Last-Modified is not
///   later. Without Last-Modified the stored Date is used (RFC 9111 §4.3.2 SHOULD); a
///   Last-Modified that is present but invalid gives `Full`.
///
/// If-Match, If-Unmodified-Since and If-Range are not a cache's to evaluate (RFC 9111 §4.3.2);
/// the caller forwards such requests.
pub fn evaluate_conditional(
    method: &str,
    req: &HeaderList,
    stored_status: u16,
    stored: &HeaderList,
) -> ClientConditional {
    use ClientConditional::{Full, NotModified};
    if !(method == "GET" || method == "HEAD") || stored_status != 200 {
        return Full;
    }
    if req.contains("if-none-match") {
        let Some(current) = stored.get("etag").and_then(parse_etag) else {
            // A "*" still matches: we hold a current representation (RFC 9110 §13.1.2 rule 1).
            return if req.get_all("if-none-match").any(|l| trim_ows(l) == b"*") {
                NotModified
            } else {
                Full
            };
        };
        for line in req.get_all("if-none-match") {
            if trim_ows(line) == b"*" {
                return NotModified;
            }
            let Some(tags) = parse_etag_list(line) else {
                return Full;
            };
            if tags.iter().any(|t| t.weak_eq(&current)) {
                return NotModified;
            }
        }
        return Full;
    }
    let mut ims_lines = req.get_all("if-modified-since");
    let (Some(ims), None) = (ims_lines.next(), ims_lines.next()) else {
        return Full;
    };
    let Some(since) = parse_http_date(ims) else {
        return Full;
    };
    let modified = match stored.get("last-modified") {
        Some(lm) => parse_http_date(lm),
        None => stored.get("date").and_then(parse_http_date),
    };
    match modified {
        Some(m) if m <= since => NotModified,
        _ => Full,
    }
}

/// Fields of a 304 sent to a client from a stored response (RFC 9110 §15.4.5): Cache-Control,
/// Content-Location, Date, ETag, Expires, Vary, and Last-Modified (useful when there is no ETag).
/// The caller adds Age and Cache-Status.
pub fn not_modified_headers(stored: &HeaderList) -> HeaderList {
    const KEEP: [&str; 7] = [
        "cache-control",
        "content-location",
        "date",
        "etag",
        "expires",
        "vary",
        "last-modified",
    ];
    let mut out = stored.clone();
    out.retain(|name, _| KEEP.contains(&name));
    out
}

/// Conditional fields to send upstream when revalidating a stored response (RFC 9111 §4.3.1):
/// its ETag as If-None-Match (MUST) and its Last-Modified as If-Modified-Since (SHOULD; both
/// are sent, for intermediaries that ignore entity-tags). Values are copied (trimmed), not
/// re-serialized: the origin compares against what it generated. An ETag that is not one
/// valid entity-tag (RFC 9110 §8.8.3, e.g. unquoted `abc`) is not sent: it would make the
/// If-None-Match field invalid, and an origin may then ignore it or fail the request. Same for
/// a Last-Modified that is not an HTTP-date. Empty when no valid validator is stored.
pub fn revalidation_headers(stored: &HeaderList) -> HeaderList {
    let mut out = HeaderList::with_capacity(2);
    if let Some(etag) = stored.get("etag").map(trim_ows)
        && parse_etag(etag).is_some()
    {
        out.push("if-none-match", etag);
    }
    if let Some(lm) = stored.get("last-modified")
        && parse_http_date(lm).is_some()
    {
        out.push("if-modified-since", trim_ows(lm));
    }
    out
}

/// Whether a 304 from the origin selects this stored response for update (RFC 9111 §4.3.4),
/// first match:
/// - the 304 has a strong ETag: the stored ETag must be strong and identical;
/// - the 304 has a weak ETag: the stored ETag must match by weak comparison;
/// - the 304 has only Last-Modified: the stored Last-Modified must be the same instant;
/// - the 304 has no validator: only if the stored response has none either (§4.3.4 third
///   bullet requires that the stored response "also lacks a validator").
///
/// A malformed validator in the 304 selects nothing.
pub fn not_modified_matches(stored: &HeaderList, not_modified: &HeaderList) -> bool {
    if let Some(raw) = not_modified.get("etag") {
        let (Some(new), Some(old)) = (parse_etag(raw), stored.get("etag").and_then(parse_etag))
        else {
            return false;
        };
        return if new.weak {
            new.weak_eq(&old)
        } else {
            new.strong_eq(&old)
        };
    }
    if let Some(raw) = not_modified.get("last-modified") {
        let new = parse_http_date(raw);
        let old = stored.get("last-modified").and_then(parse_http_date);
        return new.is_some() && new == old;
    }
    !stored.contains("etag") && !stored.contains("last-modified")
}

/// Whether a 304 answering a revalidation this cache sent for `stored` (with `stored`'s own
/// validators, §4.3.1) applies to it. Like [`not_modified_matches`], except that a 304 with no
/// validator at all is taken as answering `stored`: RFC 9110 §15.4.5 requires a 304 to repeat
/// ETag but not Last-Modified, so a strict §4.3.4 reading would never freshen an entry that
/// only has Last-Modified, and our request named no other representation.
pub fn revalidation_matches(stored: &HeaderList, not_modified: &HeaderList) -> bool {
    if !not_modified.contains("etag") && !not_modified.contains("last-modified") {
        return true;
    }
    not_modified_matches(stored, not_modified)
}

/// Stored fields updated by a 304 or HEAD response (RFC 9111 §3.2): every field the new
/// response carries replaces all stored lines of that name (in the first stored position);
/// other stored fields are kept. Not taken from the new response: Content-Length (§3.2),
/// Content-Range (automatically processed, §3.2), hop-by-hop fields, and fields a shared
/// cache must not store (§3.1). After merging, call `storable` on the result to get the new
/// freshness (with this validation's request/response times); it may now be unstorable.
pub fn merge_not_modified(stored: &HeaderList, not_modified: &HeaderList) -> HeaderList {
    let mut update = not_modified.clone();
    strip_hop_by_hop(&mut update);
    update.retain(|name, _| name != "content-length" && name != "content-range");

    let mut names: Vec<&str> = Vec::new();
    for (name, _) in update.iter() {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let mut merged = HeaderList::with_capacity(stored.len() + update.len());
    let mut written: Vec<&str> = Vec::new();
    for (name, value) in stored.iter() {
        if !names.contains(&name) {
            merged.push(name, value);
        } else if !written.contains(&name) {
            written.push(name);
            for v in update.get_all(name) {
                merged.push(name, v);
            }
        }
    }
    for name in names.iter().filter(|n| !written.contains(n)) {
        for v in update.get_all(name) {
            merged.push(name, v);
        }
    }
    headers_to_store(&merged)
}

/// What a response to a HEAD request does to a stored GET response that the same request
/// would have selected (RFC 9111 §4.3.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadUpdate {
    /// The HEAD confirms the stored content: replace the stored fields with these (merged as
    /// for a 304, RFC 9111 §3.2) and compute the new freshness with `storable` on them.
    Update(HeaderList),
    /// The HEAD shows or cannot rule out different content: the stored response must be
    /// considered stale (mark it expired, e.g. `Freshness::expired_at`, or remove it).
    Invalidate,
    /// Not a 200: says nothing about the stored response; leave it as it is.
    Ignore,
}

/// RFC 9111 §4.3.5: how a HEAD response with `head_status` and fields `head` affects the
/// stored GET response with fields `stored`. Only a 200 counts; it updates the stored response
/// when [`head_matches_stored`] (its ETag, Last-Modified and Content-Length agree), and
/// otherwise makes it stale. The caller applies this to every stored variant the HEAD request
/// selects (§4.1), never to others.
pub fn head_update(stored: &HeaderList, head_status: u16, head: &HeaderList) -> HeadUpdate {
    if head_status != 200 {
        return HeadUpdate::Ignore;
    }
    if head_matches_stored(stored, head) {
        HeadUpdate::Update(merge_not_modified(stored, head))
    } else {
        HeadUpdate::Invalidate
    }
}

/// RFC 9111 §4.3.5: whether a 200 response to HEAD may freshen the stored GET response.
/// Every validator the HEAD response carries (ETag, Last-Modified) must equal the stored one,
/// and its Content-Length, if any, must equal the stored Content-Length. Judgement: a HEAD
/// response carrying none of the three proves nothing about the content, so it does not match
/// (the caller then treats the stored response as stale).
pub fn head_matches_stored(stored: &HeaderList, head: &HeaderList) -> bool {
    let mut compared = false;
    if let Some(raw) = head.get("etag") {
        compared = true;
        let new = parse_etag(raw);
        let old = stored.get("etag").and_then(parse_etag);
        if new.is_none() || new != old {
            return false;
        }
    }
    if let Some(raw) = head.get("last-modified") {
        compared = true;
        let new = parse_http_date(raw);
        if new.is_none() || new != stored.get("last-modified").and_then(parse_http_date) {
            return false;
        }
    }
    if let Some(raw) = head.get("content-length") {
        compared = true;
        let new = parse_content_length(raw);
        if new.is_none() || new != stored.get("content-length").and_then(parse_content_length) {
            return false;
        }
    }
    compared
}

/// RFC 9110 §8.6: Content-Length = 1*DIGIT.
fn parse_content_length(value: &[u8]) -> Option<u64> {
    let v = trim_ows(value);
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(fields: &[(&str, &str)]) -> HeaderList {
        fields.iter().copied().collect()
    }

    const LM: &str = "Sun, 06 Nov 1994 08:49:37 GMT";
    const BEFORE: &str = "Sat, 05 Nov 1994 08:49:37 GMT";
    const AFTER: &str = "Mon, 07 Nov 1994 08:49:37 GMT";

    fn stored() -> HeaderList {
        list(&[
            ("date", AFTER),
            ("etag", "\"v1\""),
            ("last-modified", LM),
            ("content-type", "text/plain"),
            ("content-length", "5"),
            ("cache-control", "max-age=60"),
        ])
    }

    use ClientConditional::{Full, NotModified};

    /// One `#[test]` per row: `name: (method, request, stored status, stored fields) => expected;`
    macro_rules! conditional_cases {
        ($($name:ident: ($m:expr, $req:expr, $st:expr, $stored:expr) => $want:expr;)*) => {$(
            #[test]
            fn $name() {
                assert_eq!(evaluate_conditional($m, &list($req), $st, &$stored), $want);
            }
        )*};
    }

    conditional_cases! {
        // RFC 9110 §13.1.2
        rfc9110_13_1_2_inm_match: ("GET", &[("if-none-match", "\"v1\"")], 200, stored()) => NotModified;
        rfc9110_13_1_2_inm_weak_comparison: ("GET", &[("if-none-match", "W/\"v1\"")], 200, stored()) => NotModified;
        rfc9110_13_1_2_inm_weak_stored: ("GET", &[("if-none-match", "\"w\"")], 200, list(&[("etag", "W/\"w\"")])) => NotModified;
        rfc9110_13_1_2_inm_list_match: ("GET", &[("if-none-match", "\"a\", \"v1\",\"b\"")], 200, stored()) => NotModified;
        rfc9110_13_1_2_inm_list_lines: ("GET", &[("if-none-match", "\"a\""), ("if-none-match", "\"v1\"")], 200, stored()) => NotModified;
        rfc9110_13_1_2_inm_no_match: ("GET", &[("if-none-match", "\"v2\"")], 200, stored()) => Full;
        rfc9110_13_1_2_inm_star: ("GET", &[("if-none-match", "*")], 200, stored()) => NotModified;
        rfc9110_13_1_2_inm_star_without_etag: ("GET", &[("if-none-match", "*")], 200, list(&[("date", AFTER)])) => NotModified;
        rfc9110_13_1_2_inm_stored_without_etag: ("GET", &[("if-none-match", "\"v1\"")], 200, list(&[("last-modified", LM)])) => Full;
        rfc9110_13_1_2_inm_malformed: ("GET", &[("if-none-match", "v1")], 200, stored()) => Full;
        rfc9110_13_1_2_inm_star_in_list_invalid: ("GET", &[("if-none-match", "*, \"v1\"")], 200, stored()) => Full;
        rfc9110_8_8_3_etag_with_comma: ("GET", &[("if-none-match", "\"x\", \"a,b\"")], 200, list(&[("etag", "\"a,b\"")])) => NotModified;
        rfc9110_8_8_3_case_sensitive_opaque: ("GET", &[("if-none-match", "\"V1\"")], 200, stored()) => Full;
        // RFC 9110 §13.2.2 step 3 before 4; §13.1.3: IMS ignored when INM present.
        rfc9110_13_2_2_inm_precedes_ims: ("GET", &[("if-none-match", "\"v2\""), ("if-modified-since", AFTER)], 200, stored()) => Full;
        // RFC 9110 §13.1.3
        rfc9110_13_1_3_ims_later: ("GET", &[("if-modified-since", AFTER)], 200, stored()) => NotModified;
        rfc9110_13_1_3_ims_equal: ("GET", &[("if-modified-since", LM)], 200, stored()) => NotModified;
        rfc9110_13_1_3_ims_earlier: ("GET", &[("if-modified-since", BEFORE)], 200, stored()) => Full;
        rfc9110_13_1_3_ims_invalid: ("GET", &[("if-modified-since", "yesterday")], 200, stored()) => Full;
        rfc9110_13_1_3_ims_two_lines: ("GET", &[("if-modified-since", AFTER), ("if-modified-since", AFTER)], 200, stored()) => Full;
        rfc9110_13_1_3_ims_only_get_head: ("POST", &[("if-modified-since", AFTER)], 200, stored()) => Full;
        rfc9110_13_1_3_ims_head: ("HEAD", &[("if-modified-since", AFTER)], 200, stored()) => NotModified;
        rfc9110_13_1_3_ims_case_insensitive_date: ("GET", &[("if-modified-since", "mon, 07 nov 1994 08:49:37 gmt")], 200, stored()) => NotModified;
        // RFC 9111 §4.3.2: without Last-Modified, use the stored Date.
        rfc9111_4_3_2_ims_uses_date: ("GET", &[("if-modified-since", AFTER)], 200, list(&[("date", LM)])) => NotModified;
        rfc9111_4_3_2_ims_date_newer: ("GET", &[("if-modified-since", BEFORE)], 200, list(&[("date", LM)])) => Full;
        rfc9111_4_3_2_ims_no_dates: ("GET", &[("if-modified-since", AFTER)], 200, list(&[("etag", "\"x\"")])) => Full;
        rfc9111_4_3_2_ims_invalid_last_modified: ("GET", &[("if-modified-since", AFTER)], 200, list(&[("last-modified", "bad"), ("date", LM)])) => Full;
        // RFC 9111 §4.3.2, RFC 9110 §13.2.1: only a stored 200, only GET/HEAD.
        rfc9110_13_2_1_stored_404: ("GET", &[("if-none-match", "\"v1\"")], 404, stored()) => Full;
        rfc9110_13_2_1_put_with_inm: ("PUT", &[("if-none-match", "*")], 200, stored()) => Full;
        rfc9110_13_no_conditional: ("GET", &[], 200, stored()) => Full;
        // RFC 9111 §4.3.2: If-Match / If-Unmodified-Since are not for a cache.
        rfc9111_4_3_2_if_match_ignored: ("GET", &[("if-match", "\"v1\"")], 200, stored()) => Full;
    }

    #[test]
    fn rfc9110_15_4_5_not_modified_fields() {
        let mut s = stored();
        s.push("vary", "accept");
        s.push("expires", AFTER);
        s.push("content-location", "/x");
        s.push("x-custom", "1");
        let h = not_modified_headers(&s);
        let names: Vec<&str> = h.iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "date",
                "etag",
                "last-modified",
                "cache-control",
                "vary",
                "expires",
                "content-location"
            ]
        );
    }

    // RFC 9111 §4.3.1
    #[test]
    fn rfc9111_4_3_1_revalidation_sends_both_validators() {
        let h = revalidation_headers(&stored());
        assert_eq!(h.get_str("if-none-match"), Some("\"v1\""));
        assert_eq!(h.get_str("if-modified-since"), Some(LM));
        assert_eq!(h.len(), 2);
    }

    // RFC 9110 §8.8.3: only a syntactically valid entity-tag becomes If-None-Match.
    #[test]
    fn rfc9110_8_8_3_invalid_etag_not_sent_upstream() {
        for bad in [
            "abc",
            "\"open",
            "\"a\" junk",
            "W/abc",
            "w/\"a\"",
            "\"a\", \"b\"",
            "\"a b\"",
        ] {
            let h = revalidation_headers(&list(&[("etag", bad), ("last-modified", LM)]));
            assert!(!h.contains("if-none-match"), "{bad:?} was sent");
            assert_eq!(h.get_str("if-modified-since"), Some(LM), "{bad:?}");
        }
        let mut binary = HeaderList::new();
        binary.push("etag", vec![b'"', 0x7f, b'"']);
        assert!(revalidation_headers(&binary).is_empty());
        // Valid forms, including obs-text and a comma inside the quotes, are sent as stored.
        for good in ["\"abc\"", " W/\"x\" ", "\"\"", "\"a,b\""] {
            let h = revalidation_headers(&list(&[("etag", good)]));
            assert_eq!(h.get_str("if-none-match"), Some(good.trim()), "{good:?}");
        }
        let mut obs = HeaderList::new();
        obs.push("etag", vec![b'"', 0xe9, b'"']);
        assert_eq!(
            revalidation_headers(&obs).get("if-none-match"),
            Some(&[b'"', 0xe9, b'"'][..])
        );
    }

    #[test]
    fn rfc9111_4_3_1_revalidation_with_one_or_no_validator() {
        let only_etag = revalidation_headers(&list(&[("etag", "W/\"x\"")]));
        assert_eq!(only_etag.get_str("if-none-match"), Some("W/\"x\""));
        assert!(!only_etag.contains("if-modified-since"));
        assert!(revalidation_headers(&list(&[("last-modified", "garbage")])).is_empty());
        assert!(revalidation_headers(&list(&[("etag", "  ")])).is_empty());
        assert!(revalidation_headers(&HeaderList::new()).is_empty());
    }

    /// One `#[test]` per row: `name: (stored fields, 304 fields) => matches;`
    macro_rules! nm_cases {
        ($($name:ident: ($stored:expr, $nm:expr) => $want:expr;)*) => {$(
            #[test]
            fn $name() {
                assert_eq!(not_modified_matches(&list($stored), &list($nm)), $want);
            }
        )*};
    }

    nm_cases! {
        // RFC 9111 §4.3.4 first bullet: strong validators.
        rfc9111_4_3_4_strong_match: (&[("etag", "\"a\"")], &[("etag", "\"a\"")]) => true;
        rfc9111_4_3_4_strong_mismatch: (&[("etag", "\"a\"")], &[("etag", "\"b\"")]) => false;
        rfc9111_4_3_4_strong_vs_weak_stored: (&[("etag", "W/\"a\"")], &[("etag", "\"a\"")]) => false;
        rfc9111_4_3_4_stored_without_etag: (&[("last-modified", LM)], &[("etag", "\"a\"")]) => false;
        // Second bullet: weak validators.
        rfc9111_4_3_4_weak_match: (&[("etag", "W/\"a\"")], &[("etag", "W/\"a\"")]) => true;
        rfc9111_4_3_4_weak_matches_strong_stored: (&[("etag", "\"a\"")], &[("etag", "W/\"a\"")]) => true;
        rfc9111_4_3_4_weak_mismatch: (&[("etag", "W/\"a\"")], &[("etag", "W/\"b\"")]) => false;
        rfc9111_4_3_4_last_modified_match: (&[("last-modified", LM)], &[("last-modified", LM)]) => true;
        rfc9111_4_3_4_last_modified_mismatch: (&[("last-modified", LM)], &[("last-modified", AFTER)]) => false;
        rfc9111_4_3_4_last_modified_missing_in_stored: (&[("etag", "\"a\"")], &[("last-modified", LM)]) => false;
        // Third bullet: no validators anywhere.
        rfc9111_4_3_4_no_validators_both: (&[("date", LM)], &[("date", AFTER)]) => true;
        rfc9111_4_3_4_no_validators_in_304_only: (&[("etag", "\"a\"")], &[("date", AFTER)]) => false;
        rfc9111_4_3_4_malformed_etag: (&[("etag", "\"a\"")], &[("etag", "a")]) => false;
    }

    // RFC 9111 §3.2
    #[test]
    fn rfc9111_3_2_merge_replaces_and_keeps() {
        let nm = list(&[
            ("cache-control", "max-age=600"),
            ("date", "Tue, 08 Nov 1994 08:49:37 GMT"),
            ("etag", "\"v1\""),
            ("content-length", "0"),
            ("connection", "close, x-hop"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("x-new", "yes"),
        ]);
        let merged = merge_not_modified(&stored(), &nm);
        assert_eq!(merged.get_str("cache-control"), Some("max-age=600"));
        assert_eq!(
            merged.get_str("date"),
            Some("Tue, 08 Nov 1994 08:49:37 GMT")
        );
        assert_eq!(merged.get_str("content-length"), Some("5"));
        assert_eq!(merged.get_str("content-type"), Some("text/plain"));
        assert_eq!(merged.get_str("x-new"), Some("yes"));
        assert!(!merged.contains("connection"));
        assert!(!merged.contains("x-hop"));
        assert!(!merged.contains("transfer-encoding"));
        // Replaced in place: order of stored fields is kept.
        let names: Vec<&str> = merged.iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "date",
                "etag",
                "last-modified",
                "content-type",
                "content-length",
                "cache-control",
                "x-new"
            ]
        );
    }

    #[test]
    fn rfc9111_3_2_merge_replaces_all_lines_of_a_field() {
        let s = list(&[("x-tag", "a"), ("x-tag", "b"), ("x-keep", "k")]);
        let merged = merge_not_modified(&s, &list(&[("x-tag", "c")]));
        assert_eq!(
            merged.get_all("x-tag").collect::<Vec<_>>(),
            [b"c".as_slice()]
        );
        assert_eq!(merged.get_str("x-keep"), Some("k"));
    }

    // RFC 9111 §3.1 via §3.2: fields the new response marks private are not taken.
    #[test]
    fn rfc9111_3_2_merge_honours_private_fields() {
        let nm = list(&[
            ("cache-control", "max-age=5, private=\"x-user\""),
            ("x-user", "bob"),
        ]);
        let merged = merge_not_modified(&stored(), &nm);
        assert!(!merged.contains("x-user"));
        assert_eq!(
            merged.get_str("cache-control"),
            Some("max-age=5, private=\"x-user\"")
        );
    }

    #[test]
    fn rfc9111_3_2_merge_skips_content_range() {
        let merged = merge_not_modified(&stored(), &list(&[("content-range", "bytes 0-1/5")]));
        assert!(!merged.contains("content-range"));
    }

    /// One `#[test]` per row: `name: (stored fields, HEAD response fields) => matches;`
    macro_rules! head_cases {
        ($($name:ident: ($stored:expr, $head:expr) => $want:expr;)*) => {$(
            #[test]
            fn $name() {
                assert_eq!(head_matches_stored(&list($stored), &list($head)), $want);
            }
        )*};
    }

    head_cases! {
        rfc9111_4_3_5_all_match: (&[("etag", "\"a\""), ("last-modified", LM), ("content-length", "5")], &[("etag", "\"a\""), ("last-modified", LM), ("content-length", "5")]) => true;
        rfc9111_4_3_5_etag_mismatch: (&[("etag", "\"a\"")], &[("etag", "\"b\"")]) => false;
        rfc9111_4_3_5_weakness_differs: (&[("etag", "\"a\"")], &[("etag", "W/\"a\"")]) => false;
        rfc9111_4_3_5_last_modified_mismatch: (&[("last-modified", LM)], &[("last-modified", AFTER)]) => false;
        rfc9111_4_3_5_content_length_mismatch: (&[("etag", "\"a\""), ("content-length", "5")], &[("etag", "\"a\""), ("content-length", "6")]) => false;
        rfc9111_4_3_5_content_length_only: (&[("content-length", "5")], &[("content-length", " 5 ")]) => true;
        rfc9111_4_3_5_stored_lacks_content_length: (&[("etag", "\"a\"")], &[("etag", "\"a\""), ("content-length", "5")]) => false;
        rfc9111_4_3_5_head_omits_fields_stored_has: (&[("etag", "\"a\""), ("content-length", "5")], &[("etag", "\"a\"")]) => true;
        rfc9111_4_3_5_nothing_to_compare: (&[("etag", "\"a\"")], &[("content-type", "text/plain")]) => false;
        rfc9111_4_3_5_malformed_content_length: (&[("content-length", "5")], &[("content-length", "5, 5")]) => false;
    }

    // RFC 9111 §4.3.5: a matching HEAD 200 updates the stored fields as a 304 would (§3.2).
    #[test]
    fn rfc9111_4_3_5_head_update_merges_fields() {
        let head = list(&[
            ("etag", "\"v1\""),
            ("content-length", "5"),
            ("cache-control", "max-age=600"),
            ("date", "Tue, 08 Nov 1994 08:49:37 GMT"),
            ("connection", "close"),
            ("x-new", "1"),
        ]);
        let HeadUpdate::Update(merged) = head_update(&stored(), 200, &head) else {
            panic!("a matching HEAD 200 must update");
        };
        assert_eq!(merged.get_str("cache-control"), Some("max-age=600"));
        assert_eq!(
            merged.get_str("date"),
            Some("Tue, 08 Nov 1994 08:49:37 GMT")
        );
        assert_eq!(merged.get_str("x-new"), Some("1"));
        assert_eq!(merged.get_str("content-type"), Some("text/plain"));
        assert_eq!(merged.get_str("last-modified"), Some(LM));
        assert!(!merged.contains("connection"));
        assert_eq!(merged, merge_not_modified(&stored(), &head));
    }

    /// One `#[test]` per row: `name: (HEAD status, HEAD fields) => expected outcome for stored(),`
    macro_rules! head_update_cases {
        ($($name:ident: ($st:expr, $head:expr) => $want:pat,)*) => {$(
            #[test]
            fn $name() {
                let got = head_update(&stored(), $st, &list($head));
                assert!(matches!(got, $want), "got {got:?}");
            }
        )*};
    }

    head_update_cases! {
        rfc9111_4_3_5_head_update_last_modified_match: (200, &[("last-modified", LM)]) => HeadUpdate::Update(_),
        rfc9111_4_3_5_head_update_content_length_only: (200, &[("content-length", "5")]) => HeadUpdate::Update(_),
        rfc9111_4_3_5_head_changed_etag_invalidates: (200, &[("etag", "\"v2\""), ("content-length", "5")]) => HeadUpdate::Invalidate,
        rfc9111_4_3_5_head_changed_length_invalidates: (200, &[("etag", "\"v1\""), ("content-length", "6")]) => HeadUpdate::Invalidate,
        rfc9111_4_3_5_head_changed_last_modified_invalidates: (200, &[("etag", "\"v1\""), ("last-modified", AFTER)]) => HeadUpdate::Invalidate,
        rfc9111_4_3_5_head_malformed_etag_invalidates: (200, &[("etag", "v1")]) => HeadUpdate::Invalidate,
        // Judgement: nothing to compare proves nothing, so the stored response becomes stale.
        rfc9111_4_3_5_head_without_validators_invalidates: (200, &[("cache-control", "max-age=600")]) => HeadUpdate::Invalidate,
        // §4.3.5 concerns a 200 only.
        rfc9111_4_3_5_head_304_ignored: (304, &[("etag", "\"v2\"")]) => HeadUpdate::Ignore,
        rfc9111_4_3_5_head_404_ignored: (404, &[("etag", "\"v2\"")]) => HeadUpdate::Ignore,
        rfc9111_4_3_5_head_500_ignored: (500, &[]) => HeadUpdate::Ignore,
        rfc9111_4_3_5_head_203_ignored: (203, &[("etag", "\"v1\"")]) => HeadUpdate::Ignore,
    }

    // RFC 9110 §15.4.5 + RFC 9111 §4.3.4: a 304 to our own revalidation without validators
    // applies to the stored response; one with a different validator does not.
    #[test]
    fn rfc9111_4_3_4_revalidation_matches_validatorless_304() {
        let stored: HeaderList = [("last-modified", "Tue, 01 Jan 2030 00:00:00 GMT")]
            .into_iter()
            .collect();
        let bare: HeaderList = [("cache-control", "max-age=10")].into_iter().collect();
        assert!(!not_modified_matches(&stored, &bare));
        assert!(revalidation_matches(&stored, &bare));
        let other: HeaderList = [("etag", "\"other\"")].into_iter().collect();
        assert!(!revalidation_matches(&stored, &other));
        let same: HeaderList = [("last-modified", "Tue, 01 Jan 2030 00:00:00 GMT")]
            .into_iter()
            .collect();
        assert!(revalidation_matches(&stored, &same));
    }
}
