//! Vary (RFC 9111 §4.1): which request fields select a stored response, and their normalized values for the variant key.

use std::collections::{BTreeMap, HashSet};

use super::PolicyOptions;
use super::headers::HeaderList;
use super::syntax::{is_ows, is_token, split_list, trim_ows};

/// The response's Vary field (RFC 9110 §12.5.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vary {
    /// `*` (or a member that is not a field name): never matches (RFC 9111 §4.1).
    Star,
    /// The nominated request fields: lower-cased, trimmed, deduplicated, sorted.
    /// Empty when the response has no Vary.
    Fields(Vec<String>),
}

/// Parses every Vary line of a response. A member that is not a valid field-name token is
/// read as `*`: we cannot say which request field it names, so nothing may match it.
pub fn parse_vary(resp: &HeaderList) -> Vary {
    let mut fields: Vec<String> = Vec::new();
    for member in resp.get_all("vary").flat_map(|line| split_list(line, b",")) {
        if member == b"*" || !is_token(member) {
            return Vary::Star;
        }
        // is_token guarantees ASCII, so this decoding is lossless.
        fields.push(String::from_utf8_lossy(member).to_ascii_lowercase());
    }
    fields.sort();
    fields.dedup();
    Vary::Fields(fields)
}

/// The normalized selecting values of `fields` in `req`: `(field, None)` when the request
/// lacks the field, `(field, Some(value))` when present. Two requests select the same stored
/// response iff these vectors are equal (RFC 9111 §4.1).
///
/// Normalization, each step one that §4.1 allows:
/// - lines of the same field are combined, empty lines dropped (§4.1 "combining multiple lines");
/// - outside quoted strings, whitespace runs become one space and whitespace next to `,` or
///   `;` is removed (§4.1 "adding or removing whitespace"; RFC 9110 §5.6.3 OWS around list
///   and parameter separators, §5.6.6, §12.4.2); quoted strings are kept byte for byte;
/// - bytes that are not UTF-8 are written `\xNN` and `\` as `\\`, so distinct byte strings
///   never collide;
/// - `Accept-Encoding` (if `opts.normalize_accept_encoding`): the sorted, lower-cased set of
///   acceptable codings, q-values dropped, `x-gzip`/`x-compress` read as `gzip`/`compress`,
///   codings with `q=0` removed, identity implied (written only as `identity;q=0` when refused),
///   and `identity` when nothing else is acceptable. E.g. `gzip, deflate, br` and
///   `br;q=1.0, gzip,deflate` both give `br,deflate,gzip`. Unknown codings are kept: an origin
///   may have chosen them.
/// - `Accept-Language` (if `opts.normalize_accept_language`): language ranges lower-cased,
///   ordered by q-value (stable, so equal q keep their order), `q=0` ranges and duplicates
///   dropped, q-values and whitespace removed: `en-US,en;q=0.9` gives `en-us,en`. Ranges are
///   NOT sorted alphabetically: preference order decides which language an origin picks
///   (RFC 9110 §12.5.4), so `en,fr` and `fr,en` are different variants.
pub fn vary_values(
    fields: &[String],
    req: &HeaderList,
    opts: &PolicyOptions,
) -> Vec<(String, Option<String>)> {
    fields
        .iter()
        .map(|field| {
            let name = field.trim().to_ascii_lowercase();
            if !req.contains(&name) {
                return (name, None);
            }
            let value = match name.as_str() {
                "accept-encoding" if opts.normalize_accept_encoding => accept_encoding(req),
                "accept-language" if opts.normalize_accept_language => accept_language(req),
                _ => generic(req, &name),
            };
            (name, Some(value))
        })
        .collect()
}

/// Combined lines with whitespace normalized outside quoted strings: runs become one space,
/// and none is kept next to `,` or `;`.
fn generic(req: &HeaderList, name: &str) -> String {
    let mut out: Vec<u8> = Vec::new();
    for line in req.get_all(name) {
        let line = trim_ows(line);
        if line.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push(b',');
        }
        let mut in_quote = false;
        let mut escaped = false;
        let mut pending_space = false;
        for &b in line {
            if in_quote {
                out.push(b);
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_quote = false;
                }
                continue;
            }
            if is_ows(b) {
                pending_space = true;
                continue;
            }
            // OWS is allowed on both sides of list commas (RFC 9110 §5.6.1) and parameter
            // semicolons (§5.6.6, e.g. `gzip ;q=1`), so it carries no meaning there.
            if b == b',' || b == b';' {
                pending_space = false;
                while out.last() == Some(&b' ') {
                    out.pop();
                }
                out.push(b);
                continue;
            }
            if pending_space && out.last().is_some_and(|&l| l != b',' && l != b';') {
                out.push(b' ');
            }
            pending_space = false;
            if b == b'"' {
                in_quote = true;
            }
            out.push(b);
        }
    }
    escape(&out)
}

/// A member of a weighted list split into its lower-cased value and qvalue in thousandths.
/// A missing or invalid q counts as 1 (RFC 9110 §12.4.2 default).
fn weighted(member: &[u8]) -> (Vec<u8>, u16) {
    let mut parts = split_list(member, b";");
    let value = parts.next().unwrap_or_default().to_ascii_lowercase();
    let mut q = 1000;
    for param in parts {
        if let Some(eq) = param.iter().position(|&b| b == b'=') {
            let (name, arg) = param.split_at(eq);
            if trim_ows(name).eq_ignore_ascii_case(b"q") {
                q = parse_qvalue(trim_ows(arg.get(1..).unwrap_or_default())).unwrap_or(1000);
            }
        }
    }
    (value, q)
}

/// RFC 9110 §12.4.2 qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] ), in thousandths.
fn parse_qvalue(s: &[u8]) -> Option<u16> {
    let (int, frac) = match s.iter().position(|&b| b == b'.') {
        Some(dot) => (s.get(..dot)?, s.get(dot + 1..)?),
        None => (s, &b""[..]),
    };
    if frac.len() > 3 || !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut thousandths: u16 = 0;
    let mut place = 100;
    for &d in frac {
        thousandths += u16::from(d - b'0') * place;
        place /= 10;
    }
    match int {
        b"0" => Some(thousandths),
        b"1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

fn accept_encoding(req: &HeaderList) -> String {
    // coding → acceptable; a later q=0 for the same coding wins (refusal is the safer reading).
    let mut codings: BTreeMap<Vec<u8>, bool> = BTreeMap::new();
    let mut identity_refused = false;
    let mut identity_listed = false;
    let mut star_refused = false;
    for member in req
        .get_all("accept-encoding")
        .flat_map(|l| split_list(l, b","))
    {
        let (mut coding, q) = weighted(member);
        // RFC 9110 §8.4.1.1, §8.4.1.3: x-compress and x-gzip are aliases.
        if coding == b"x-gzip" {
            coding = b"gzip".to_vec();
        } else if coding == b"x-compress" {
            coding = b"compress".to_vec();
        }
        match coding.as_slice() {
            b"" => {}
            b"identity" => {
                identity_listed = true;
                identity_refused |= q == 0;
            }
            b"*" if q == 0 => star_refused = true,
            _ => {
                let ok = codings.entry(coding).or_insert(q > 0);
                *ok &= q > 0;
            }
        }
    }
    // RFC 9110 §12.5.3: "*;q=0" refuses identity too unless identity is listed.
    identity_refused |= star_refused && !identity_listed;
    let mut out: Vec<u8> = Vec::new();
    for (coding, _) in codings.iter().filter(|(_, ok)| **ok) {
        if !out.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(coding);
    }
    if identity_refused {
        if !out.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(b"identity;q=0");
    }
    if out.is_empty() {
        return "identity".to_owned();
    }
    escape(&out)
}

fn accept_language(req: &HeaderList) -> String {
    let mut ranges: Vec<(Vec<u8>, u16)> = req
        .get_all("accept-language")
        .flat_map(|l| split_list(l, b","))
        .map(weighted)
        .filter(|(range, q)| *q > 0 && !range.is_empty())
        .collect();
    // Stable: equal weights keep the client's order.
    ranges.sort_by_key(|r| std::cmp::Reverse(r.1));
    let mut out: Vec<u8> = Vec::new();
    let mut seen: HashSet<&[u8]> = HashSet::new();
    for (range, _) in &ranges {
        if !seen.insert(range) {
            continue;
        }
        if !out.is_empty() {
            out.push(b',');
        }
        // Whitespace inside a range is not allowed by its syntax; drop it.
        out.extend(range.iter().filter(|&&b| !is_ows(b)));
    }
    escape(&out)
}

/// An injective text form of raw bytes: valid UTF-8 as is (with `\` doubled), every other
/// byte as `\xNN`.
fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(fields: &[(&str, &str)]) -> HeaderList {
        fields.iter().copied().collect()
    }

    fn fields(names: &[&str]) -> Vary {
        Vary::Fields(names.iter().map(|s| s.to_string()).collect())
    }

    /// One `#[test]` per row: `name: response fields => expected Vary;`
    macro_rules! vary_cases {
        ($($name:ident: $resp:expr => $want:expr;)*) => {$(
            #[test]
            fn $name() {
                assert_eq!(parse_vary(&list($resp)), $want);
            }
        )*};
    }

    vary_cases! {
        rfc9111_4_1_no_vary: &[] => fields(&[]);
        rfc9111_4_1_single: &[("vary", "Accept-Encoding")] => fields(&["accept-encoding"]);
        rfc9111_4_1_sorted_dedup_lowercase: &[("vary", "Origin, accept-encoding, ORIGIN")] => fields(&["accept-encoding", "origin"]);
        rfc9110_5_3_multiple_lines: &[("vary", "origin"), ("Vary", "accept")] => fields(&["accept", "origin"]);
        rfc9111_4_1_star: &[("vary", "*")] => Vary::Star;
        rfc9111_4_1_star_among_fields: &[("vary", "accept, *")] => Vary::Star;
        rfc9111_4_1_star_on_second_line: &[("vary", "accept"), ("vary", " * ")] => Vary::Star;
        rfc9110_5_6_1_empty_vary: &[("vary", "")] => fields(&[]);
        rfc9110_5_6_1_stray_commas: &[("vary", " , ,accept,, ")] => fields(&["accept"]);
        // Judgement: a member that is not a token cannot be matched → like `*`.
        rfc9110_5_6_2_non_token_member_is_star: &[("vary", "accept encoding")] => Vary::Star;
        rfc9110_5_6_2_non_ascii_member_is_star: &[("vary", "accépt")] => Vary::Star;
    }

    fn values(names: &[&str], req: &[(&str, &str)]) -> Vec<(String, Option<String>)> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        vary_values(&names, &list(req), &PolicyOptions::default())
    }

    fn one(name: &str, req: &[(&str, &str)]) -> Option<String> {
        values(&[name], req).pop().and_then(|(_, v)| v)
    }

    /// One `#[test]` per row: `name: (field, request fields) => expected normalized value;`
    macro_rules! value_cases {
        ($($name:ident: ($field:expr, $req:expr) => $want:expr;)*) => {$(
            #[test]
            fn $name() {
                assert_eq!(one($field, $req).as_deref(), $want);
            }
        )*};
    }

    value_cases! {
        // RFC 9111 §4.1: absent only matches absent; present-but-empty is a value.
        rfc9111_4_1_absent_is_none: ("accept", &[]) => None;
        rfc9111_4_1_empty_is_some: ("accept", &[("accept", "")]) => Some("");
        rfc9111_4_1_whitespace_collapsed: ("accept", &[("accept", "  text/html ,\t application/json  ")]) => Some("text/html,application/json");
        rfc9111_4_1_lines_combined: ("accept", &[("accept", "text/html"), ("accept", "application/json")]) => Some("text/html,application/json");
        rfc9111_4_1_inner_space_kept_single: ("user-agent", &[("user-agent", "Mozilla/5.0   (X11)  Gecko")]) => Some("Mozilla/5.0 (X11) Gecko");
        // RFC 9110 §5.6.3, §5.6.6, §12.4.2: OWS around ";" is not significant.
        rfc9110_5_6_6_space_before_semicolon_removed: ("accept", &[("accept", "a ;q=1")]) => Some("a;q=1");
        rfc9110_5_6_6_space_after_semicolon_removed: ("accept", &[("accept", "a;\t q=1 , b ; level=1")]) => Some("a;q=1,b;level=1");
        rfc9110_5_6_6_user_agent_semicolons: ("user-agent", &[("user-agent", "Mozilla/5.0   (X11;  Linux)")]) => Some("Mozilla/5.0 (X11;Linux)");
        rfc9110_5_6_4_semicolon_in_quotes_untouched: ("x-q", &[("x-q", "a=\"x ; y\" ; b")]) => Some("a=\"x ; y\";b");
        rfc9110_5_6_4_quoted_string_untouched: ("x-q", &[("x-q", "a=\"x  ,  y\" ,  b")]) => Some("a=\"x  ,  y\",b");
        // Values are case-sensitive in general: not folded.
        rfc9111_4_1_case_kept_for_unknown_fields: ("x-tenant", &[("x-tenant", "Acme")]) => Some("Acme");
        // Accept-Encoding normalization (PolicyOptions::normalize_accept_encoding).
        rfc9110_12_5_3_sorted_set: ("accept-encoding", &[("accept-encoding", "gzip, deflate, br")]) => Some("br,deflate,gzip");
        rfc9110_12_5_3_q_dropped: ("accept-encoding", &[("accept-encoding", "br;q=1.0, gzip;q=0.8,deflate")]) => Some("br,deflate,gzip");
        rfc9110_12_5_3_q_zero_removed: ("accept-encoding", &[("accept-encoding", "gzip;q=0, br")]) => Some("br");
        rfc9110_12_5_3_q_zero_point_zero_removed: ("accept-encoding", &[("accept-encoding", "gzip;q=0.000, br")]) => Some("br");
        rfc9110_12_5_3_empty_is_identity: ("accept-encoding", &[("accept-encoding", "")]) => Some("identity");
        rfc9110_12_5_3_identity_only: ("accept-encoding", &[("accept-encoding", "identity")]) => Some("identity");
        rfc9110_8_4_1_3_x_gzip_alias: ("accept-encoding", &[("accept-encoding", "x-gzip")]) => Some("gzip");
        rfc9110_12_5_3_case_insensitive: ("accept-encoding", &[("accept-encoding", "GZIP, Br")]) => Some("br,gzip");
        rfc9110_12_5_3_star_kept: ("accept-encoding", &[("accept-encoding", "*")]) => Some("*");
        rfc9110_12_5_3_identity_refused: ("accept-encoding", &[("accept-encoding", "gzip, identity;q=0")]) => Some("gzip,identity;q=0");
        rfc9110_12_5_3_star_q0_refuses_identity: ("accept-encoding", &[("accept-encoding", "gzip, *;q=0")]) => Some("gzip,identity;q=0");
        rfc9110_12_5_3_unknown_coding_kept: ("accept-encoding", &[("accept-encoding", "gzip, dcb")]) => Some("dcb,gzip");
        rfc9110_12_5_3_repeated_lines: ("accept-encoding", &[("accept-encoding", "gzip"), ("accept-encoding", "br, gzip")]) => Some("br,gzip");
        rfc9110_12_4_2_invalid_q_counts_as_one: ("accept-encoding", &[("accept-encoding", "gzip;q=2")]) => Some("gzip");
        // Accept-Language normalization (PolicyOptions::normalize_accept_language).
        rfc9110_12_5_4_lowercase_no_q: ("accept-language", &[("accept-language", "en-US,en;q=0.9")]) => Some("en-us,en");
        rfc9110_12_5_4_ordered_by_q: ("accept-language", &[("accept-language", "fr;q=0.5, en")]) => Some("en,fr");
        rfc9110_12_5_4_q_zero_dropped: ("accept-language", &[("accept-language", "en, de;q=0")]) => Some("en");
        rfc9110_12_5_4_dedup: ("accept-language", &[("accept-language", "en, EN;q=0.5, fr")]) => Some("en,fr");
        rfc9110_12_5_4_whitespace: ("accept-language", &[("accept-language", " da ,  en-gb ; q=0.8 ")]) => Some("da,en-gb");
    }

    // RFC 9110 §5.6.3, §12.4.2: the spellings differ only in OWS, so they select one variant.
    #[test]
    fn rfc9110_12_4_2_ows_variants_share_a_key() {
        let spellings = ["a;q=1", "a ;q=1", "a; q=1", " a\t;\tq=1 "];
        let keys: Vec<Option<String>> = spellings
            .iter()
            .map(|v| one("accept", &[("accept", v)]))
            .collect();
        assert!(keys.iter().all(|k| k == &keys[0]), "{keys:?}");
        // Whitespace that separates words is still significant.
        assert_ne!(
            one("accept", &[("accept", "a b")]),
            one("accept", &[("accept", "ab")])
        );
    }

    // RFC 9110 §12.5.4: order is preference, so it is kept.
    #[test]
    fn rfc9110_12_5_4_language_order_matters() {
        assert_ne!(
            one("accept-language", &[("accept-language", "en, fr")]),
            one("accept-language", &[("accept-language", "fr, en")])
        );
    }

    // Browser variants collapse (the reason for the option).
    #[test]
    fn rfc9110_12_5_3_browser_spellings_share_a_key() {
        let a = one(
            "accept-encoding",
            &[("accept-encoding", "gzip, deflate, br")],
        );
        let b = one(
            "accept-encoding",
            &[("accept-encoding", "br, gzip, deflate")],
        );
        let c = one(
            "accept-encoding",
            &[("accept-encoding", "deflate,gzip;q=1.0,br")],
        );
        assert_eq!(a, b);
        assert_eq!(b, c);
    }

    #[test]
    fn rfc9111_4_1_normalization_can_be_disabled() {
        let o = PolicyOptions {
            normalize_accept_encoding: false,
            normalize_accept_language: false,
            ..PolicyOptions::default()
        };
        let names = vec!["accept-encoding".to_string(), "accept-language".to_string()];
        let req = list(&[
            ("accept-encoding", "gzip,  br"),
            ("accept-language", "EN;q=0.5"),
        ]);
        let v = vary_values(&names, &req, &o);
        assert_eq!(v[0].1.as_deref(), Some("gzip,br"));
        assert_eq!(v[1].1.as_deref(), Some("EN;q=0.5"));
    }

    // RFC 9111 §4.1: the vector keeps the order of `fields` and reports absent fields.
    #[test]
    fn rfc9111_4_1_vector_shape() {
        let v = values(&["accept", "origin"], &[("origin", "https://a")]);
        assert_eq!(
            v,
            vec![
                ("accept".to_string(), None),
                ("origin".to_string(), Some("https://a".to_string()))
            ]
        );
    }

    // Distinct bytes never normalize to the same text.
    #[test]
    fn rfc9111_4_1_non_utf8_values_do_not_collide() {
        let mut a = HeaderList::new();
        a.push("x", vec![0xff]);
        let mut b = HeaderList::new();
        b.push("x", vec![0xfe]);
        let mut c = HeaderList::new();
        c.push("x", "\\xff");
        let names = vec!["x".to_string()];
        let o = PolicyOptions::default();
        let (va, vb, vc) = (
            vary_values(&names, &a, &o),
            vary_values(&names, &b, &o),
            vary_values(&names, &c, &o),
        );
        assert_ne!(va, vb);
        assert_ne!(va, vc);
        assert_eq!(va[0].1.as_deref(), Some("\\xff"));
        assert_eq!(vc[0].1.as_deref(), Some("\\\\xff"));
    }

    #[test]
    fn rfc9111_4_1_huge_request_value() {
        let big = "en;q=0.5, ".repeat(11_000);
        let v = one("accept-language", &[("accept-language", &big)]);
        assert_eq!(v.as_deref(), Some("en"));
        let big_ae = format!("{}gzip", "x-custom, ".repeat(11_000));
        assert_eq!(
            one("accept-encoding", &[("accept-encoding", &big_ae)]).as_deref(),
            Some("gzip,x-custom")
        );
    }
}
