//! Field-value syntax shared by the policy parsers: lists, quoted strings, delta-seconds and HTTP-dates (RFC 9110 §5.6).

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

/// RFC 9111 §1.2.2: any delta-seconds that overflows is taken as 2^31 seconds ("infinity").
pub(crate) const DELTA_MAX_SECS: u64 = 1 << 31;

/// The §1.2.2 cap as a duration.
pub(crate) const DELTA_MAX: Duration = Duration::from_secs(DELTA_MAX_SECS);

/// RFC 9110 §5.6.3: optional whitespace.
pub(crate) fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// RFC 9110 §5.6.2 `tchar`.
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// True for a non-empty RFC 9110 §5.6.2 token.
pub(crate) fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// Strips leading and trailing optional whitespace.
pub(crate) fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if is_ows(*first) {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if is_ows(*last) {
            s = rest;
        } else {
            break;
        }
    }
    s
}

/// Splits a field value at any of `seps` outside quoted strings (RFC 9110 §5.6.1, §5.6.4),
/// yielding trimmed, non-empty members; stray separators give no empty members.
pub(crate) fn split_list<'a>(value: &'a [u8], seps: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    let mut rest = value;
    std::iter::from_fn(move || {
        loop {
            if rest.is_empty() {
                return None;
            }
            let mut in_quote = false;
            let mut escaped = false;
            let mut end = rest.len();
            for (i, &b) in rest.iter().enumerate() {
                if in_quote {
                    if escaped {
                        escaped = false;
                    } else if b == b'\\' {
                        escaped = true;
                    } else if b == b'"' {
                        in_quote = false;
                    }
                } else if b == b'"' {
                    in_quote = true;
                } else if seps.contains(&b) {
                    end = i;
                    break;
                }
            }
            let (member, tail) = rest.split_at(end);
            rest = tail.get(1..).unwrap_or_default();
            let member = trim_ows(member);
            if !member.is_empty() {
                return Some(member);
            }
        }
    })
}

/// A directive or parameter argument: a token or a quoted-string (RFC 9110 §5.6.4), unescaped.
/// The flag is false when the argument is malformed (unterminated quote, text after the
/// closing quote, or a token with non-token bytes); the best-effort value is still returned.
pub(crate) fn unquote(arg: &[u8]) -> (Cow<'_, [u8]>, bool) {
    let arg = trim_ows(arg);
    let Some(inner) = arg.strip_prefix(b"\"") else {
        return (Cow::Borrowed(arg), is_token(arg));
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut escaped = false;
    for (i, &b) in inner.iter().enumerate() {
        if escaped {
            out.push(b);
            escaped = false;
        } else if b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            let trailing = inner.get(i + 1..).unwrap_or_default();
            return (Cow::Owned(out), trim_ows(trailing).is_empty());
        } else {
            out.push(b);
        }
    }
    (Cow::Owned(out), false)
}

/// RFC 9111 §1.2.2 delta-seconds: `1*DIGIT`, overflow capped at 2^31; `None` if not all digits.
pub(crate) fn parse_delta_seconds(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: u64 = 0;
    for &b in s {
        n = n.saturating_mul(10).saturating_add(u64::from(b - b'0'));
        if n >= DELTA_MAX_SECS {
            return Some(DELTA_MAX_SECS);
        }
    }
    Some(n)
}

/// An HTTP-date (RFC 9110 §5.6.7) in any of the three accepted formats; `None` if invalid.
/// RFC 9111 §4.2: dates are matched case-insensitively, and only the "GMT" zone is valid.
pub(crate) fn parse_http_date(value: &[u8]) -> Option<SystemTime> {
    let text = std::str::from_utf8(trim_ows(value)).ok()?;
    if let Ok(t) = httpdate::parse_http_date(text) {
        return Some(t);
    }
    // Every valid HTTP-date is under 40 bytes; do not rebuild long garbage.
    if text.len() > 40 || !text.is_ascii() {
        return None;
    }
    let canonical = canonical_date_case(text);
    httpdate::parse_http_date(&canonical).ok()
}

/// Rewrites alphabetic runs as "Sun"/"Nov"/"GMT" so that httpdate's case-sensitive parser
/// accepts "sun, 06 nov 1994 08:49:37 gmt".
fn canonical_date_case(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word_start = true;
    for c in text.chars() {
        if c.is_ascii_alphabetic() {
            out.push(if word_start {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            });
            word_start = false;
        } else {
            out.push(c);
            word_start = true;
        }
    }
    out.replace("Gmt", "GMT")
}

/// Whole seconds between two instants, zero when `later` is earlier (RFC 9111 §4.2.3 uses max(0, …)).
pub(crate) fn elapsed(earlier: SystemTime, later: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or(Duration::ZERO)
}

/// Lower-cased, lossily decoded field names from a `#field-name` argument (RFC 9111 §5.2.2.4,
/// §5.2.2.7); duplicates are left for the caller to remove.
pub(crate) fn field_name_list(arg: &[u8]) -> Vec<String> {
    split_list(arg, b",")
        .map(|member| String::from_utf8_lossy(member).to_ascii_lowercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(v: &str, seps: &[u8]) -> Vec<String> {
        split_list(v.as_bytes(), seps)
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .collect()
    }

    // RFC 9110 §5.6.1: empty list elements and OWS around them are ignored.
    #[test]
    fn rfc9110_5_6_1_list_skips_empty_members() {
        assert_eq!(members(" a ,, b ,", b","), ["a", "b"]);
        assert!(members("", b",").is_empty());
        assert!(members(",,, ,", b",").is_empty());
    }

    // RFC 9110 §5.6.4: commas inside quoted strings do not split, escapes included.
    #[test]
    fn rfc9110_5_6_4_quoted_commas_do_not_split() {
        assert_eq!(
            members(r#"private="a, b", x="q\",", y"#, b","),
            [r#"private="a, b""#, r#"x="q\",""#, "y"]
        );
    }

    #[test]
    fn rfc9110_5_6_4_unquote_handles_escapes_and_garbage() {
        assert_eq!(unquote(br#""a\"b""#).0.as_ref(), b"a\"b");
        assert!(unquote(br#""a\"b""#).1);
        assert!(!unquote(br#""open"#).1);
        assert!(!unquote(br#""x"y"#).1);
        assert!(unquote(b"token").1);
        assert!(!unquote(b"1.5?").1);
    }

    // RFC 9111 §1.2.2: overflow is 2^31, not an error and never negative.
    #[test]
    fn rfc9111_1_2_2_delta_seconds() {
        assert_eq!(parse_delta_seconds(b"0"), Some(0));
        assert_eq!(parse_delta_seconds(b"0060"), Some(60));
        assert_eq!(
            parse_delta_seconds(b"99999999999999999999999"),
            Some(DELTA_MAX_SECS)
        );
        assert_eq!(parse_delta_seconds(b"2147483647"), Some(2147483647));
        assert_eq!(parse_delta_seconds(b"-1"), None);
        assert_eq!(parse_delta_seconds(b"1.5"), None);
        assert_eq!(parse_delta_seconds(b""), None);
        assert_eq!(parse_delta_seconds(b"+5"), None);
    }

    // RFC 9110 §5.6.7: three formats; RFC 9111 §4.2: case-insensitive, GMT only.
    #[test]
    fn rfc9110_5_6_7_dates() {
        let t = parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert!(t.is_some());
        assert_eq!(parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT"), t);
        assert_eq!(parse_http_date(b"Sun Nov  6 08:49:37 1994"), t);
        assert_eq!(parse_http_date(b"sun, 06 nov 1994 08:49:37 gmt"), t);
        assert_eq!(parse_http_date(b"  Sun, 06 Nov 1994 08:49:37 GMT "), t);
        assert_eq!(parse_http_date(b"Sun, 06 Nov 1994 08:49:37 PST"), None);
        assert_eq!(parse_http_date(b"0"), None);
        assert_eq!(parse_http_date(b""), None);
        assert_eq!(parse_http_date(&[0xff, 0xfe]), None);
        assert_eq!(parse_http_date(b"Mon, 06 Nov 1994 08:49:37 GMT"), None);
        assert_eq!(parse_http_date(b"Thu, 01 Jan 1969 00:00:00 GMT"), None);
    }
}
