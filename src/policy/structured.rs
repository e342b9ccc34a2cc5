//! Strict RFC 8941 Structured Field Dictionary parsing, just enough for targeted cache-control fields (RFC 9213 §2.1).
//!
//! Unlike the lenient Cache-Control reader, any syntax error fails the whole field: RFC 9213
//! §2.1 says a targeted field with a parse error is ignored, and RFC 8941 §4.2 says a parser
//! that fails anywhere fails the field. Parameters are checked for syntax and then dropped
//! (RFC 9213 §2.1: "Parameters received on cache directives are to be ignored").

use std::borrow::Cow;
use std::collections::HashMap;

/// RFC 8941 §3.3 bare item, reduced to what cache directives can use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Bare<'a> {
    /// §3.3.1: at most 15 digits, so it always fits.
    Integer(i64),
    /// §3.3.2: a decimal; no cache directive takes one, so its value is not kept.
    Decimal,
    /// §3.3.3, unescaped.
    String(Vec<u8>),
    /// §3.3.4.
    Token(&'a [u8]),
    /// §3.3.5: no cache directive takes one, so its value is not kept.
    ByteSequence,
    /// §3.3.6: a member without `=` is `true`.
    Boolean(bool),
}

/// A Dictionary member value (RFC 8941 §3.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Member<'a> {
    /// An Item (its parameters dropped).
    Item(Bare<'a>),
    /// An Inner List; no cache directive takes one, so its items are not kept.
    InnerList,
}

/// Every line of a field combined as RFC 8941 §4.2 requires ("one comma-separated field-value").
pub(crate) fn combine<'a>(mut lines: impl Iterator<Item = &'a [u8]>) -> Option<Cow<'a, [u8]>> {
    let first = lines.next()?;
    let Some(second) = lines.next() else {
        return Some(Cow::Borrowed(first));
    };
    let mut out = first.to_vec();
    for line in std::iter::once(second).chain(lines) {
        out.extend_from_slice(b", ");
        out.extend_from_slice(line);
    }
    Some(Cow::Owned(out))
}

/// Parses a Dictionary (RFC 8941 §4.2, §4.2.2). Keys are unique: a repeated key keeps its first
/// position and its LAST value (§4.2.2 "overwrite its value"). `None` on any syntax error,
/// including non-ASCII bytes (§4.2 step 1). An empty input gives an empty dictionary.
pub(crate) fn parse_dictionary(input: &[u8]) -> Option<Vec<(&[u8], Member<'_>)>> {
    if !input.is_ascii() {
        return None;
    }
    let mut p = Parser { s: input };
    p.skip_sp();
    let mut members: Vec<(&[u8], Member<'_>)> = Vec::new();
    // Hostile fields can hold tens of thousands of keys: find duplicates by hash, not by scan.
    let mut index: HashMap<&[u8], usize> = HashMap::new();
    while !p.s.is_empty() {
        let key = p.key()?;
        let value = if p.eat(b'=') {
            p.item_or_inner_list()?
        } else {
            p.parameters()?;
            Member::Item(Bare::Boolean(true))
        };
        match index.get(key) {
            Some(&i) => {
                if let Some(slot) = members.get_mut(i) {
                    slot.1 = value;
                }
            }
            None => {
                index.insert(key, members.len());
                members.push((key, value));
            }
        }
        p.skip_ows();
        if p.s.is_empty() {
            break;
        }
        if !p.eat(b',') {
            return None;
        }
        p.skip_ows();
        // §4.2.2: a trailing comma is an error.
        if p.s.is_empty() {
            return None;
        }
    }
    Some(members)
}

struct Parser<'a> {
    s: &'a [u8],
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.first().copied()
    }

    fn bump(&mut self) {
        self.s = self.s.get(1..).unwrap_or_default();
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.bump();
            true
        } else {
            false
        }
    }

    fn skip_sp(&mut self) {
        while self.eat(b' ') {}
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.bump();
        }
    }

    /// Takes the longest prefix whose bytes satisfy `ok`.
    fn take_while(&mut self, ok: impl Fn(u8) -> bool) -> &'a [u8] {
        let end = self.s.iter().position(|&b| !ok(b)).unwrap_or(self.s.len());
        let (taken, rest) = self.s.split_at(end);
        self.s = rest;
        taken
    }

    /// §4.2.3.3: `key = ( lcalpha / "*" ) *( lcalpha / DIGIT / "_" / "-" / "." / "*" )`.
    /// Upper-case letters are an error, not folded.
    fn key(&mut self) -> Option<&'a [u8]> {
        if !matches!(self.peek(), Some(b'a'..=b'z' | b'*')) {
            return None;
        }
        Some(
            self.take_while(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b'*')),
        )
    }

    /// §4.2.1.1: an Inner List or an Item, parameters checked and dropped.
    fn item_or_inner_list(&mut self) -> Option<Member<'a>> {
        if self.peek() == Some(b'(') {
            self.inner_list()?;
            return Some(Member::InnerList);
        }
        let bare = self.bare_item()?;
        self.parameters()?;
        Some(Member::Item(bare))
    }

    /// §4.2.1.2.
    fn inner_list(&mut self) -> Option<()> {
        self.bump();
        loop {
            self.skip_sp();
            if self.eat(b')') {
                return self.parameters();
            }
            self.bare_item()?;
            self.parameters()?;
            if !matches!(self.peek(), Some(b' ' | b')')) {
                return None;
            }
        }
    }

    /// §4.2.3.2: `*( ";" *SP key [ "=" bare-item ] )`.
    fn parameters(&mut self) -> Option<()> {
        while self.eat(b';') {
            self.skip_sp();
            self.key()?;
            if self.eat(b'=') {
                self.bare_item()?;
            }
        }
        Some(())
    }

    /// §4.2.3.1.
    fn bare_item(&mut self) -> Option<Bare<'a>> {
        match self.peek()? {
            b'-' | b'0'..=b'9' => self.number(),
            b'"' => self.string(),
            b':' => self.byte_sequence(),
            b'?' => self.boolean(),
            b'A'..=b'Z' | b'a'..=b'z' | b'*' => Some(self.token()),
            _ => None,
        }
    }

    /// §4.2.4: at most 15 integer digits, or 12 before and 1-3 after the dot.
    fn number(&mut self) -> Option<Bare<'a>> {
        let negative = self.eat(b'-');
        let int = self.take_while(|b| b.is_ascii_digit());
        if int.is_empty() {
            return None;
        }
        if !self.eat(b'.') {
            if int.len() > 15 {
                return None;
            }
            let value = int.iter().fold(0i64, |n, &d| n * 10 + i64::from(d - b'0'));
            return Some(Bare::Integer(if negative { -value } else { value }));
        }
        let frac = self.take_while(|b| b.is_ascii_digit());
        if int.len() > 12 || frac.is_empty() || frac.len() > 3 {
            return None;
        }
        Some(Bare::Decimal)
    }

    /// §4.2.5: printable ASCII; only `\"` and `\\` escapes.
    fn string(&mut self) -> Option<Bare<'a>> {
        self.bump();
        let mut out = Vec::new();
        loop {
            let b = self.peek()?;
            self.bump();
            match b {
                b'\\' => {
                    let escaped = self.peek().filter(|&e| e == b'"' || e == b'\\')?;
                    self.bump();
                    out.push(escaped);
                }
                b'"' => return Some(Bare::String(out)),
                0x20..=0x7e => out.push(b),
                _ => return None,
            }
        }
    }

    /// §4.2.6: `( ALPHA / "*" ) *( tchar / ":" / "/" )`.
    fn token(&mut self) -> Bare<'a> {
        Bare::Token(self.take_while(|b| super::syntax::is_tchar(b) || b == b':' || b == b'/'))
    }

    /// §4.2.7: `":" *base64 ":"`.
    fn byte_sequence(&mut self) -> Option<Bare<'a>> {
        self.bump();
        self.take_while(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=');
        self.eat(b':').then_some(Bare::ByteSequence)
    }

    /// §4.2.8: `?0` or `?1`.
    fn boolean(&mut self) -> Option<Bare<'a>> {
        self.bump();
        let value = match self.peek()? {
            b'0' => false,
            b'1' => true,
            _ => return None,
        };
        self.bump();
        Some(Bare::Boolean(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(input: &str) -> Option<Vec<String>> {
        parse_dictionary(input.as_bytes()).map(|d| {
            d.iter()
                .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
                .collect()
        })
    }

    fn value<'a>(dict: &'a [(&[u8], Member<'a>)], key: &str) -> Option<&'a Member<'a>> {
        dict.iter()
            .find(|(k, _)| *k == key.as_bytes())
            .map(|(_, v)| v)
    }

    /// One `#[test]` per row: `name: field value => parses;`
    macro_rules! syntax_cases {
        ($($name:ident: $input:expr => $ok:expr;)*) => {$(
            #[test]
            fn $name() {
                assert_eq!(keys($input).is_some(), $ok, "{:?} parsed as {:?}", $input, keys($input));
            }
        )*};
    }

    syntax_cases! {
        rfc8941_4_2_2_plain_members: "max-age=60, no-store, private" => true;
        rfc8941_4_2_empty_is_empty_dictionary: "" => true;
        rfc8941_4_2_leading_spaces: "   max-age=60" => true;
        rfc8941_4_2_2_ows_after_comma: "a=1,\tb=2 ,  c" => true;
        rfc8941_4_2_3_3_upper_case_key_fails: "Max-Age=60" => false;
        rfc8941_4_2_3_3_key_starting_with_digit_fails: "1a=1" => false;
        rfc8941_4_2_2_space_before_equals_fails: "max-age =60" => false;
        rfc8941_4_2_2_space_after_equals_fails: "max-age= 60" => false;
        rfc8941_4_2_2_spaces_around_equals_fail: "max-age = 60" => false;
        rfc8941_4_2_2_trailing_comma_fails: "max-age=60," => false;
        rfc8941_4_2_2_empty_member_fails: "a, , b" => false;
        rfc8941_4_2_2_semicolon_is_not_a_separator: "a=1; b" => true;
        rfc8941_4_2_3_2_parameter_without_key_fails: "a=1;" => false;
        rfc8941_4_2_4_sixteen_digit_integer_fails: "a=1234567890123456" => false;
        rfc8941_4_2_4_decimal_with_four_places_fails: "a=1.2345" => false;
        rfc8941_4_2_4_trailing_dot_fails: "a=1." => false;
        rfc8941_4_2_5_unterminated_string_fails: "a=\"open" => false;
        rfc8941_4_2_5_bad_escape_fails: "a=\"x\\n\"" => false;
        rfc8941_4_2_7_byte_sequence: "a=:aGk=:" => true;
        rfc8941_4_2_7_unterminated_byte_sequence_fails: "a=:aGk=" => false;
        rfc8941_4_2_8_bad_boolean_fails: "a=?2" => false;
        rfc8941_4_2_1_2_inner_list: "a=(1 2 \"x\");p, b" => true;
        rfc8941_4_2_1_2_unterminated_inner_list_fails: "a=(1 2" => false;
        rfc8941_4_2_non_ascii_fails: "a=\"é\"" => false;
        rfc8941_4_2_garbage_after_member_fails: "a=1 b=2" => false;
        rfc8941_4_2_3_1_token_with_colon_and_slash: "a=text/html:x" => true;
    }

    // RFC 8941 §4.2.2: a repeated key keeps the last value, in the first position.
    #[test]
    fn rfc8941_4_2_2_duplicate_key_last_wins() {
        let dict = parse_dictionary(b"max-age=60, private, max-age=120").unwrap_or_default();
        assert_eq!(dict.len(), 2);
        assert_eq!(dict.first().map(|(k, _)| *k), Some(&b"max-age"[..]));
        assert_eq!(
            value(&dict, "max-age"),
            Some(&Member::Item(Bare::Integer(120)))
        );
    }

    // RFC 8941 §3.3: the value types cache directives map to (RFC 9213 §2.1).
    #[test]
    fn rfc8941_3_3_value_types() {
        let dict = parse_dictionary(b"i=-5, d=1.5, s=\"a\\\"b\", t=tok, b=?0, bare;p=1, l=(1)")
            .unwrap_or_default();
        assert_eq!(value(&dict, "i"), Some(&Member::Item(Bare::Integer(-5))));
        assert_eq!(value(&dict, "d"), Some(&Member::Item(Bare::Decimal)));
        assert_eq!(
            value(&dict, "s"),
            Some(&Member::Item(Bare::String(b"a\"b".to_vec())))
        );
        assert_eq!(value(&dict, "t"), Some(&Member::Item(Bare::Token(b"tok"))));
        assert_eq!(value(&dict, "b"), Some(&Member::Item(Bare::Boolean(false))));
        assert_eq!(
            value(&dict, "bare"),
            Some(&Member::Item(Bare::Boolean(true)))
        );
        assert_eq!(value(&dict, "l"), Some(&Member::InnerList));
    }

    // RFC 8941 §4.2: all lines are combined before parsing.
    #[test]
    fn rfc8941_4_2_lines_combine() {
        let lines: [&[u8]; 2] = [b"a=1", b"b"];
        let joined = combine(lines.into_iter()).unwrap_or_default();
        assert_eq!(joined.as_ref(), b"a=1, b");
        assert!(combine(std::iter::empty()).is_none());
    }

    #[test]
    fn rfc8941_4_2_huge_field_with_many_keys_parses_whole() {
        let big: String = (0..30_000).map(|i| format!("k{i}, ")).collect::<String>() + "z";
        assert_eq!(
            parse_dictionary(big.as_bytes()).map(|d| d.len()),
            Some(30_001)
        );
    }
}
