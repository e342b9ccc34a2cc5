//! Parses Cache-Control (RFC 9111 §5.2), Pragma (§5.4), CDN-Cache-Control (RFC 9213) and Surrogate-Control into typed directives.

use std::time::Duration;

use super::PolicyOptions;
use super::headers::HeaderList;
use super::structured::{self, Bare, Member};
use super::syntax::{
    DELTA_MAX, field_name_list, is_token, parse_delta_seconds, split_list, trim_ows, unquote,
};

/// The `max-stale` request directive (RFC 9111 §5.2.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxStale {
    /// `max-stale` without a value: any staleness is acceptable.
    Any,
    /// `max-stale=N`: at most this much staleness is acceptable.
    Limit(Duration),
}

/// Parsed cache directives of one message (request or response).
///
/// Parsing never fails. Rules, all chosen to give the most restrictive reading
/// (RFC 9111 §4.2.1: "the most restrictive directive should be honored"):
/// - directive names are case-insensitive; unknown directives are ignored (§5.2.3);
/// - arguments may be tokens or quoted strings, for every directive (§5.2);
/// - an invalid delta-seconds (`-1`, `1.5`, empty, missing) counts as 0, so a bad
///   `max-age` makes the response stale (§4.2.1, §1.2.2); overflow is 2^31 s (§1.2.2);
/// - a repeated `max-age` / `s-maxage` keeps its value when the repeats are identical and is
///   0 (stale) when they differ (§4.2.1); other repeated durations keep the smallest
///   (`min-fresh`: the largest; `max-stale`: the smallest limit);
/// - `;` separates directives like `,` does, so `max-age=60; no-store` loses neither;
/// - `no-cache=""` / `private=""` (an empty field list) count as the unqualified form.
///
/// These lenient rules are for Cache-Control. CDN-Cache-Control is read strictly as a
/// Structured Fields Dictionary instead (RFC 9213 §2.1; see `for_shared_cache`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// `max-age` (§5.2.1.1 request, §5.2.2.1 response).
    pub max_age: Option<Duration>,
    /// `s-maxage` (§5.2.2.10), shared caches only.
    pub s_maxage: Option<Duration>,
    /// `max-stale` (§5.2.1.2), request only.
    pub max_stale: Option<MaxStale>,
    /// `min-fresh` (§5.2.1.3), request only.
    pub min_fresh: Option<Duration>,
    /// Unqualified `no-cache` (§5.2.1.4, §5.2.2.4): revalidate before every use.
    /// The qualified form sets only `no_cache_fields`.
    pub no_cache: bool,
    /// Field names from `no-cache="a, b"` (§5.2.2.4): lower-cased, sorted, deduplicated.
    pub no_cache_fields: Vec<String>,
    /// `no-store` (§5.2.1.5, §5.2.2.5).
    pub no_store: bool,
    /// `no-transform` (§5.2.1.6, §5.2.2.6).
    pub no_transform: bool,
    /// `only-if-cached` (§5.2.1.7), request only.
    pub only_if_cached: bool,
    /// `must-revalidate` (§5.2.2.2).
    pub must_revalidate: bool,
    /// `proxy-revalidate` (§5.2.2.8).
    pub proxy_revalidate: bool,
    /// `must-understand` (§5.2.2.3).
    pub must_understand: bool,
    /// Unqualified `private` (§5.2.2.7): a shared cache must not store the response.
    /// The qualified form sets only `private_fields`.
    pub private: bool,
    /// Field names from `private="a, b"` (§5.2.2.7): lower-cased, sorted, deduplicated.
    pub private_fields: Vec<String>,
    /// `public` (§5.2.2.9).
    pub public: bool,
    /// `immutable` (RFC 8246 §2).
    pub immutable: bool,
    /// `stale-while-revalidate` (RFC 5861 §3).
    pub stale_while_revalidate: Option<Duration>,
    /// `stale-if-error` (RFC 5861 §4), request or response.
    pub stale_if_error: Option<Duration>,
}

impl CacheControl {
    /// Parses one Cache-Control field value.
    pub fn parse(value: &str) -> CacheControl {
        let mut cc = CacheControl::default();
        cc.apply_line(value.as_bytes());
        cc.finish()
    }

    /// Request directives from every Cache-Control line. `Pragma: no-cache` counts as
    /// `no-cache` only when no Cache-Control field is present (RFC 9111 §5.4, RFC 7234 §5.4).
    pub fn from_request(h: &HeaderList) -> CacheControl {
        let mut cc = CacheControl::default();
        let mut any = false;
        for line in h.get_all("cache-control") {
            any = true;
            cc.apply_line(line);
        }
        if !any {
            cc.no_cache = h
                .get_all("pragma")
                .flat_map(|line| split_list(line, b","))
                .any(|d| d.eq_ignore_ascii_case(b"no-cache"));
        }
        cc.finish()
    }

    /// Response directives from every Cache-Control line (RFC 9110 §5.3 combination).
    pub fn from_response(h: &HeaderList) -> CacheControl {
        Self::from_field(h, "cache-control")
    }

    /// Every line of field `name`, read leniently with Cache-Control syntax.
    pub(crate) fn from_field(h: &HeaderList, name: &str) -> CacheControl {
        let mut cc = CacheControl::default();
        for line in h.get_all(name) {
            cc.apply_line(line);
        }
        cc.finish()
    }

    /// The directives that govern THIS shared cache: a valid, non-empty CDN-Cache-Control
    /// (RFC 9213 §2.2), else a Surrogate-Control with a caching directive, else Cache-Control.
    /// The flag is true when a targeted field was chosen; Expires must then be ignored (RFC 9213 §2.2).
    pub(crate) fn for_shared_cache(h: &HeaderList, opts: &PolicyOptions) -> (CacheControl, bool) {
        if opts.honor_cdn_cache_control {
            if let Some(cc) = Self::targeted(h, "cdn-cache-control") {
                return (cc, true);
            }
            if let Some(cc) = Self::surrogate_control(h) {
                return (cc, true);
            }
        }
        (Self::from_response(h), false)
    }

    /// RFC 9213 §2.1: a targeted field is a Structured Fields Dictionary (RFC 8941 §3.2); when
    /// it is empty or does not parse, it is ignored as if absent. A repeated key keeps its last
    /// value (RFC 8941 §4.2.2), unlike Cache-Control. A directive whose value has the wrong type
    /// (`max-age=1.5`, `max-age=-1`, `no-store="x"`) also makes the field ignored: RFC 9213 §2.1
    /// says not to consume such values, and half-reading the field could loosen it.
    fn targeted(h: &HeaderList, name: &str) -> Option<CacheControl> {
        let joined = structured::combine(h.get_all(name))?;
        let dict = structured::parse_dictionary(&joined)?;
        if dict.is_empty() {
            return None;
        }
        let mut cc = CacheControl::default();
        for (key, value) in &dict {
            if !cc.apply_targeted(key, value) {
                return None;
            }
        }
        Some(cc.finish())
    }

    /// Applies one Dictionary member (keys are unique, so plain assignment is last-wins);
    /// false if its value violates the directive's type (RFC 9213 §2.1). Request-only and
    /// unknown directives are ignored whatever their value (RFC 9111 §5.2.3).
    fn apply_targeted(&mut self, key: &[u8], value: &Member<'_>) -> bool {
        let item = match value {
            Member::Item(bare) => Some(bare),
            Member::InnerList => None,
        };
        let flag = match item {
            Some(Bare::Boolean(b)) => Some(*b),
            _ => None,
        };
        match key {
            b"max-age" | b"s-maxage" | b"stale-while-revalidate" | b"stale-if-error" => {
                let Some(n) = item.and_then(|b| match b {
                    Bare::Integer(n) => u64::try_from(*n).ok(),
                    _ => None,
                }) else {
                    return false;
                };
                let d = Some(secs(n));
                match key {
                    b"max-age" => self.max_age = d,
                    b"s-maxage" => self.s_maxage = d,
                    b"stale-while-revalidate" => self.stale_while_revalidate = d,
                    _ => self.stale_if_error = d,
                }
            }
            // no-cache and private take Boolean true or a String of field names (RFC 9213 §2.1).
            b"no-cache" | b"private" => {
                let (unqualified, fields) = match item {
                    Some(Bare::Boolean(b)) => (*b, Vec::new()),
                    Some(Bare::String(s)) => {
                        let fields = field_name_list(s);
                        (fields.is_empty(), fields)
                    }
                    _ => return false,
                };
                if key == b"no-cache" {
                    self.no_cache = unqualified;
                    self.no_cache_fields = fields;
                } else {
                    self.private = unqualified;
                    self.private_fields = fields;
                }
            }
            b"no-store" | b"no-transform" | b"must-revalidate" | b"proxy-revalidate"
            | b"must-understand" | b"public" | b"immutable" => {
                let Some(on) = flag else {
                    return false;
                };
                match key {
                    b"no-store" => self.no_store = on,
                    b"no-transform" => self.no_transform = on,
                    b"must-revalidate" => self.must_revalidate = on,
                    b"proxy-revalidate" => self.proxy_revalidate = on,
                    b"must-understand" => self.must_understand = on,
                    b"public" => self.public = on,
                    _ => self.immutable = on,
                }
            }
            _ => {}
        }
        true
    }

    /// Surrogate-Control (W3C Edge Architecture 1.0) kept simple: `max-age=N` or `max-age=N+M`
    /// (M becomes stale-if-error) and `no-store` / `no-store-remote`. A directive with a
    /// `;target` applies only when the target is `larder`. `None` when no such directive is present.
    fn surrogate_control(h: &HeaderList) -> Option<CacheControl> {
        let mut cc = CacheControl::default();
        let mut any = false;
        for member in h
            .get_all("surrogate-control")
            .flat_map(|l| split_list(l, b","))
        {
            let mut parts = member.splitn(2, |&b| b == b';');
            let directive = parts.next().unwrap_or_default();
            if let Some(target) = parts.next()
                && !trim_ows(target).eq_ignore_ascii_case(b"larder")
            {
                continue;
            }
            let (name, arg) = split_name(directive);
            if name.eq_ignore_ascii_case(b"no-store")
                || name.eq_ignore_ascii_case(b"no-store-remote")
            {
                cc.no_store = true;
                any = true;
            } else if name.eq_ignore_ascii_case(b"max-age") {
                let arg = arg
                    .map(unquote)
                    .map(|(v, _)| v.into_owned())
                    .unwrap_or_default();
                let mut nums = arg.splitn(2, |&b| b == b'+');
                let fresh = nums.next().and_then(parse_delta_seconds).unwrap_or(0);
                set_once(&mut cc.max_age, secs(fresh));
                if let Some(extra) = nums.next() {
                    set_min(
                        &mut cc.stale_if_error,
                        secs(parse_delta_seconds(extra).unwrap_or(0)),
                    );
                }
                any = true;
            }
        }
        any.then_some(cc)
    }

    /// Field names a shared cache must not store: `private="…"` and `no-cache="…"`
    /// arguments (RFC 9111 §3.1, §5.2.2.4, §5.2.2.7).
    pub(crate) fn unshareable_fields(&self) -> impl Iterator<Item = &str> {
        self.private_fields
            .iter()
            .chain(self.no_cache_fields.iter())
            .map(String::as_str)
    }

    /// Sorts and deduplicates the field lists once, after all lines are applied
    /// (per-directive deduplication would be quadratic on a hostile 100 KB field).
    fn finish(mut self) -> Self {
        for list in [&mut self.no_cache_fields, &mut self.private_fields] {
            list.sort_unstable();
            list.dedup();
        }
        self
    }

    fn apply_line(&mut self, line: &[u8]) {
        for member in split_list(line, b",;") {
            self.apply_directive(member);
        }
    }

    /// Applies one `name[=arg]` member, leniently (see the type's rules).
    fn apply_directive(&mut self, member: &[u8]) {
        let (name, arg) = split_name(member);
        if !is_token(name) {
            return;
        }
        let (value, well_formed) = match arg {
            Some(a) => {
                let (v, ok) = unquote(a);
                (Some(v), ok)
            }
            None => (None, true),
        };
        let delta = || value.as_deref().and_then(parse_delta_seconds);
        // Lower-case into a stack buffer: this runs for every directive of every request.
        // No known directive is longer than 22 bytes, so longer names are simply unknown.
        let mut buf = [0u8; 24];
        let lower: &[u8] = match buf.get_mut(..name.len()) {
            Some(slot) => {
                slot.copy_from_slice(name);
                slot.make_ascii_lowercase();
                slot
            }
            None => b"",
        };
        match lower {
            b"max-age"
            | b"s-maxage"
            | b"min-fresh"
            | b"stale-while-revalidate"
            | b"stale-if-error" => {
                // RFC 9111 §4.2.1: invalid freshness information means stale, i.e. zero.
                let d = secs(delta().unwrap_or(0));
                match lower {
                    b"max-age" => set_once(&mut self.max_age, d),
                    b"s-maxage" => set_once(&mut self.s_maxage, d),
                    b"stale-while-revalidate" => set_min(&mut self.stale_while_revalidate, d),
                    b"stale-if-error" => set_min(&mut self.stale_if_error, d),
                    // min-fresh asks for more remaining freshness: larger is stricter.
                    _ => self.min_fresh = Some(self.min_fresh.map_or(d, |old| old.max(d))),
                }
            }
            b"max-stale" => {
                let this = match value {
                    None => MaxStale::Any,
                    Some(_) => MaxStale::Limit(secs(delta().unwrap_or(0))),
                };
                self.max_stale = Some(match (self.max_stale, this) {
                    (None, t) | (Some(MaxStale::Any), t) => t,
                    (Some(MaxStale::Limit(a)), MaxStale::Any) => MaxStale::Limit(a),
                    (Some(MaxStale::Limit(a)), MaxStale::Limit(b)) => MaxStale::Limit(a.min(b)),
                });
            }
            // A malformed or empty field list reads as the unqualified (stricter) form.
            b"no-cache" => match value
                .as_deref()
                .filter(|_| well_formed)
                .map(field_name_list)
            {
                Some(fields) if !fields.is_empty() => self.no_cache_fields.extend(fields),
                _ => self.no_cache = true,
            },
            b"private" => match value
                .as_deref()
                .filter(|_| well_formed)
                .map(field_name_list)
            {
                Some(fields) if !fields.is_empty() => self.private_fields.extend(fields),
                _ => self.private = true,
            },
            b"no-store" => self.no_store = true,
            b"no-transform" => self.no_transform = true,
            b"only-if-cached" => self.only_if_cached = true,
            b"must-revalidate" => self.must_revalidate = true,
            b"proxy-revalidate" => self.proxy_revalidate = true,
            b"must-understand" => self.must_understand = true,
            b"public" => self.public = true,
            b"immutable" => self.immutable = true,
            // RFC 9111 §5.2.3: unrecognized directives are ignored.
            _ => {}
        }
    }
}

/// Splits `name=arg` at the first `=`, trimming both sides.
fn split_name(member: &[u8]) -> (&[u8], Option<&[u8]>) {
    match member.iter().position(|&b| b == b'=') {
        Some(i) => (
            trim_ows(member.get(..i).unwrap_or_default()),
            Some(member.get(i + 1..).unwrap_or_default()),
        ),
        None => (trim_ows(member), None),
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n).min(DELTA_MAX)
}

/// A repeated max-age or s-maxage (RFC 9111 §4.2.1: "either the first occurrence should be
/// used or the response should be considered stale"): identical repeats keep the value,
/// differing ones make it zero, i.e. stale, the more restrictive of the two permitted readings.
/// Zero then stays: a later repeat differs from it or is zero itself.
fn set_once(slot: &mut Option<Duration>, d: Duration) {
    *slot = Some(match *slot {
        Some(old) if old != d => Duration::ZERO,
        _ => d,
    });
}

/// Keeps the smallest value of a repeated stale window (the most restrictive, RFC 9111 §4.2.1).
fn set_min(slot: &mut Option<Duration>, d: Duration) {
    *slot = Some(slot.map_or(d, |old| old.min(d)));
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Option<Duration> = |n| Some(Duration::from_secs(n));

    fn h(fields: &[(&str, &str)]) -> HeaderList {
        fields.iter().copied().collect()
    }

    /// One `#[test]` per row: `name: "Cache-Control value" => |cc| predicate;`
    macro_rules! parse_cases {
        ($($name:ident: $input:expr => |$cc:ident| $check:expr;)*) => {$(
            #[test]
            fn $name() {
                let $cc = CacheControl::parse($input);
                assert!($check, "input {:?} parsed as {:?}", $input, $cc);
            }
        )*};
    }

    parse_cases! {
        // RFC 9111 §5.2.2.1
        rfc9111_5_2_2_1_max_age: "max-age=60" => |cc| cc.max_age == S(60);
        // RFC 9111 §5.2: names compare case-insensitively.
        rfc9111_5_2_names_case_insensitive: "MAX-AGE=60, No-Store" => |cc| cc.max_age == S(60) && cc.no_store;
        // RFC 9111 §5.2: quoted form accepted by recipients.
        rfc9111_5_2_quoted_max_age: "max-age=\"60\"" => |cc| cc.max_age == S(60);
        // RFC 9111 §1.2.2: overflow is 2^31.
        rfc9111_1_2_2_max_age_overflow: "max-age=99999999999999999999" => |cc| cc.max_age == S(1 << 31);
        // RFC 9111 §4.2.1: invalid freshness information → stale (0).
        rfc9111_4_2_1_negative_max_age_is_zero: "max-age=-1" => |cc| cc.max_age == S(0);
        rfc9111_4_2_1_fractional_max_age_is_zero: "max-age=1.5" => |cc| cc.max_age == S(0);
        rfc9111_4_2_1_empty_max_age_is_zero: "max-age=" => |cc| cc.max_age == S(0);
        rfc9111_4_2_1_bare_max_age_is_zero: "max-age" => |cc| cc.max_age == S(0);
        rfc9111_4_2_1_hex_max_age_is_zero: "max-age=0x10" => |cc| cc.max_age == S(0);
        // RFC 9111 §4.2.1: "either the first occurrence should be used or the response should be
        // considered stale": identical repeats keep the value, differing ones mean stale (0).
        rfc9111_4_2_1_identical_max_age_kept: "max-age=60, max-age=60" => |cc| cc.max_age == S(60);
        rfc9111_4_2_1_identical_max_age_leading_zero_kept: "max-age=60, max-age=060" => |cc| cc.max_age == S(60);
        rfc9111_4_2_1_differing_max_age_is_stale: "max-age=600, max-age=60" => |cc| cc.max_age == S(0);
        rfc9111_4_2_1_zero_then_sixty_is_stale: "max-age=0, max-age=60" => |cc| cc.max_age == S(0);
        rfc9111_4_2_1_conflict_stays_stale: "max-age=60, max-age=30, max-age=60" => |cc| cc.max_age == S(0);
        rfc9111_4_2_1_duplicate_max_age_invalid_wins: "max-age=600, max-age=abc" => |cc| cc.max_age == S(0);
        rfc9111_5_2_2_10_s_maxage: "s-maxage=30, max-age=60" => |cc| cc.s_maxage == S(30) && cc.max_age == S(60);
        rfc9111_4_2_1_differing_s_maxage_is_stale: "s-maxage=30, s-maxage=10" => |cc| cc.s_maxage == S(0);
        rfc9111_4_2_1_identical_s_maxage_kept: "s-maxage=30, S-MAXAGE=30" => |cc| cc.s_maxage == S(30);
        // RFC 9111 §4.2.1 "the most restrictive directive should be honored": flags only add.
        rfc9111_4_2_1_public_and_private_both_kept: "public, private" => |cc| cc.public && cc.private;
        rfc9111_4_2_1_public_and_no_store_both_kept: "public, no-store" => |cc| cc.public && cc.no_store;
        // RFC 9111 §5.2.1.2: max-stale with and without a value.
        rfc9111_5_2_1_2_max_stale_any: "max-stale" => |cc| cc.max_stale == Some(MaxStale::Any);
        rfc9111_5_2_1_2_max_stale_limit: "max-stale=10" => |cc| cc.max_stale == Some(MaxStale::Limit(Duration::from_secs(10)));
        rfc9111_5_2_1_2_max_stale_invalid_is_zero: "max-stale=ten" => |cc| cc.max_stale == Some(MaxStale::Limit(Duration::ZERO));
        rfc9111_5_2_1_2_max_stale_limit_beats_any: "max-stale, max-stale=5" => |cc| cc.max_stale == Some(MaxStale::Limit(Duration::from_secs(5)));
        // RFC 9111 §5.2.1.3: repeated min-fresh keeps the stricter (larger).
        rfc9111_5_2_1_3_min_fresh: "min-fresh=5, min-fresh=20" => |cc| cc.min_fresh == S(20);
        rfc9111_5_2_1_7_only_if_cached: "only-if-cached" => |cc| cc.only_if_cached;
        // RFC 9111 §5.2.2.4: unqualified and qualified no-cache.
        rfc9111_5_2_2_4_no_cache: "no-cache" => |cc| cc.no_cache && cc.no_cache_fields.is_empty();
        rfc9111_5_2_2_4_no_cache_fields: "no-cache=\"Set-Cookie, X-Foo\"" => |cc| !cc.no_cache && cc.no_cache_fields == ["set-cookie", "x-foo"];
        rfc9111_5_2_2_4_no_cache_token_form: "no-cache=set-cookie" => |cc| !cc.no_cache && cc.no_cache_fields == ["set-cookie"];
        rfc9111_5_2_2_4_no_cache_empty_list_is_unqualified: "no-cache=\"\"" => |cc| cc.no_cache;
        rfc9111_5_2_2_4_no_cache_both_forms: "no-cache=\"a\", no-cache" => |cc| cc.no_cache && cc.no_cache_fields == ["a"];
        // RFC 9111 §5.2.2.7: private, qualified private with commas inside quotes.
        rfc9111_5_2_2_7_private: "private" => |cc| cc.private;
        rfc9111_5_2_2_7_private_fields_comma_in_quotes: "private=\"x-a, x-b\", max-age=5" => |cc| !cc.private && cc.private_fields == ["x-a", "x-b"] && cc.max_age == S(5);
        rfc9111_5_2_2_5_no_store: "no-store" => |cc| cc.no_store;
        rfc9111_5_2_2_2_must_revalidate: "must-revalidate" => |cc| cc.must_revalidate;
        rfc9111_5_2_2_8_proxy_revalidate: "proxy-revalidate" => |cc| cc.proxy_revalidate;
        rfc9111_5_2_2_3_must_understand: "must-understand, no-store" => |cc| cc.must_understand && cc.no_store;
        rfc9111_5_2_2_9_public: "public" => |cc| cc.public;
        rfc9111_5_2_2_6_no_transform: "no-transform" => |cc| cc.no_transform;
        rfc8246_2_immutable: "max-age=31536000, immutable" => |cc| cc.immutable && cc.max_age == S(31536000);
        rfc5861_3_stale_while_revalidate: "max-age=1, stale-while-revalidate=30" => |cc| cc.stale_while_revalidate == S(30);
        rfc5861_4_stale_if_error: "stale-if-error=600" => |cc| cc.stale_if_error == S(600);
        rfc5861_3_invalid_swr_is_zero: "stale-while-revalidate=soon" => |cc| cc.stale_while_revalidate == S(0);
        // RFC 9111 §5.2.3: unknown extensions ignored, even with odd arguments.
        rfc9111_5_2_3_unknown_ignored: "community=\"UCI\", foo, bar=baz" => |cc| cc == CacheControl::default();
        // RFC 9110 §5.6.1: stray commas.
        rfc9110_5_6_1_stray_commas: ",,max-age=5,, ,public," => |cc| cc.max_age == S(5) && cc.public;
        // Judgement: ';' separates directives, so neither side is lost.
        rfc9111_5_2_stray_semicolon_keeps_both: "max-age=60; no-store" => |cc| cc.max_age == S(60) && cc.no_store;
        rfc9111_5_2_3_stray_equals_is_unknown: "=, ==, =5" => |cc| cc == CacheControl::default();
        rfc9111_5_2_whitespace_around_equals: "max-age = 60" => |cc| cc.max_age == S(60);
        rfc9111_5_2_empty_value: "" => |cc| cc == CacheControl::default();
        // Arguments on argument-less directives: still present (restrictive reading).
        rfc9111_5_2_no_store_with_argument: "no-store=1" => |cc| cc.no_store;
        // RFC 9110 §5.6.4: escaped quote inside a quoted field list.
        rfc9110_5_6_4_escaped_quote: "private=\"a\\\"b\", max-age=3" => |cc| cc.private_fields == ["a\"b"] && cc.max_age == S(3);
        rfc9111_5_2_2_7_unterminated_quote_is_unqualified_private: "private=\"a, max-age=3" => |cc| cc.max_age.is_none() && cc.private;
        rfc9111_5_2_3_non_ascii_names_ignored: "máx-age=5, public" => |cc| cc.max_age.is_none() && cc.public;
    }

    // RFC 9111 §5.2: every line counts; a max-age differing across lines is stale (§4.2.1).
    #[test]
    fn rfc9111_5_2_multiple_lines_combine() {
        let cc = CacheControl::from_response(&h(&[
            ("cache-control", "max-age=60"),
            ("Cache-Control", "max-age=30, private"),
        ]));
        assert_eq!(cc.max_age, S(0));
        assert!(cc.private);
        let same = CacheControl::from_response(&h(&[
            ("cache-control", "max-age=60"),
            ("cache-control", "max-age=60, public"),
        ]));
        assert_eq!(same.max_age, S(60));
        assert!(same.public);
    }

    // RFC 9111 §5.2.1.1 with §4.2.1's rule: differing request max-age reads as max-age=0.
    #[test]
    fn rfc9111_5_2_1_1_request_differing_max_age_is_zero() {
        let req = h(&[("cache-control", "max-age=600, max-age=60")]);
        assert_eq!(CacheControl::from_request(&req).max_age, S(0));
    }

    // RFC 9111 §5.4: Pragma: no-cache only without Cache-Control.
    #[test]
    fn rfc9111_5_4_pragma_without_cache_control() {
        assert!(CacheControl::from_request(&h(&[("pragma", "no-cache")])).no_cache);
        assert!(CacheControl::from_request(&h(&[("pragma", "foo, No-Cache")])).no_cache);
        assert!(!CacheControl::from_request(&h(&[("pragma", "no-cachex")])).no_cache);
    }

    #[test]
    fn rfc9111_5_4_pragma_ignored_with_cache_control() {
        let req = h(&[("pragma", "no-cache"), ("cache-control", "max-age=5")]);
        assert!(!CacheControl::from_request(&req).no_cache);
    }

    // RFC 9111 §5.4: Pragma has no defined meaning in responses.
    #[test]
    fn rfc9111_5_4_pragma_ignored_in_response() {
        assert!(!CacheControl::from_response(&h(&[("pragma", "no-cache")])).no_cache);
    }

    #[test]
    fn rfc9111_5_2_non_utf8_bytes_do_not_break_other_directives() {
        let mut list = HeaderList::new();
        list.push(
            "cache-control",
            vec![
                0xff, b',', b' ', b'n', b'o', b'-', b's', b't', b'o', b'r', b'e',
            ],
        );
        assert!(CacheControl::from_response(&list).no_store);
    }

    #[test]
    fn rfc9111_5_2_huge_value_parses() {
        let mut v = "x-ext=1, ".repeat(12_000);
        v.push_str("max-age=7");
        assert!(v.len() > 100_000);
        assert_eq!(CacheControl::parse(&v).max_age, S(7));
    }

    fn opts() -> PolicyOptions {
        PolicyOptions::default()
    }

    // RFC 9213 §2.2: a valid targeted field replaces Cache-Control for this cache.
    #[test]
    fn rfc9213_2_2_cdn_cache_control_overrides() {
        let resp = h(&[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=600"),
        ]);
        let (cc, targeted) = CacheControl::for_shared_cache(&resp, &opts());
        assert!(targeted);
        assert!(!cc.no_store);
        assert_eq!(cc.max_age, S(600));
    }

    // RFC 9213 §2.1: parse errors and empty values make the field ignored.
    #[test]
    fn rfc9213_2_1_invalid_cdn_cache_control_ignored() {
        for bad in [
            "",
            "   ",
            "max-age=1.5",
            "max-age=\"open",
            "max-age=-1",
            "max age=5",
            // RFC 8941 §4.2.3.3: keys are lower-case; §4.2.2: no whitespace around "=".
            "Max-Age=600",
            "max-age=600, Private",
            "max-age = 600",
            "max-age =600",
            "max-age= 600",
            // RFC 8941 §4.2.2: empty members and a trailing comma are errors.
            "max-age=600,",
            "max-age=600,, public",
            // RFC 9213 §2.1: values of the wrong type are not consumed.
            "max-age=\"600\"",
            "max-age=?1",
            "max-age",
            "no-store=\"yes\", max-age=600",
            "no-cache=set-cookie, max-age=600",
            "private=(\"x\"), max-age=600",
            // RFC 8941 §4.2: non-ASCII fails the field.
            "max-age=600, x=\"é\"",
        ] {
            let resp = h(&[("cache-control", "max-age=5"), ("cdn-cache-control", bad)]);
            let (cc, targeted) = CacheControl::for_shared_cache(&resp, &opts());
            assert!(!targeted, "{bad:?} should be ignored");
            assert_eq!(cc.max_age, S(5));
        }
    }

    // RFC 9213 §2.1 / RFC 8941 §4.2.2: a repeated key keeps its LAST value (unlike Cache-Control).
    #[test]
    fn rfc9213_2_1_duplicate_key_last_wins() {
        let resp = h(&[(
            "cdn-cache-control",
            "max-age=60, no-store, max-age=600, no-store=?0",
        )]);
        let (cc, targeted) = CacheControl::for_shared_cache(&resp, &opts());
        assert!(targeted);
        assert_eq!(cc.max_age, S(600));
        assert!(!cc.no_store);
        let qualified = h(&[("cdn-cache-control", "private, private=\"x-a\"")]);
        let (cc, _) = CacheControl::for_shared_cache(&qualified, &opts());
        assert!(!cc.private);
        assert_eq!(cc.private_fields, ["x-a"]);
    }

    // RFC 8941 §4.2: lines are combined before parsing; one bad line spoils the field.
    #[test]
    fn rfc9213_2_1_lines_combine() {
        let resp = h(&[
            ("cache-control", "max-age=5"),
            ("cdn-cache-control", "max-age=600"),
            ("CDN-Cache-Control", "must-revalidate"),
        ]);
        let (cc, targeted) = CacheControl::for_shared_cache(&resp, &opts());
        assert!(targeted);
        assert_eq!(cc.max_age, S(600));
        assert!(cc.must_revalidate);
        let spoiled = h(&[
            ("cache-control", "max-age=5"),
            ("cdn-cache-control", "max-age=600"),
            ("cdn-cache-control", "Public"),
        ]);
        let (cc, targeted) = CacheControl::for_shared_cache(&spoiled, &opts());
        assert!(!targeted);
        assert_eq!(cc.max_age, S(5));
    }

    // RFC 9213 §2.1, §2.2: valid SF syntax the directive set does not use is ignored, not fatal.
    #[test]
    fn rfc9213_2_1_unknown_members_ignored() {
        let resp = h(&[(
            "cdn-cache-control",
            " max-age=60 ,\tx-list=(1 2);p, x-bytes=:aGk=:, x-dec=1.5, x-tok=a/b, none ",
        )]);
        let (cc, targeted) = CacheControl::for_shared_cache(&resp, &opts());
        assert!(targeted);
        assert_eq!(cc.max_age, S(60));
        assert!(!cc.no_store && !cc.private && !cc.no_cache);
    }

    // RFC 9213 §2.1: no-cache / private map to Boolean or a String of field names.
    #[test]
    fn rfc9213_2_1_field_name_strings() {
        let resp = h(&[(
            "cdn-cache-control",
            "no-cache=\"Set-Cookie, X-A\", private=\"\", max-age=9",
        )]);
        let (cc, targeted) = CacheControl::for_shared_cache(&resp, &opts());
        assert!(targeted);
        assert!(!cc.no_cache);
        assert_eq!(cc.no_cache_fields, ["set-cookie", "x-a"]);
        // An empty list is the unqualified form (as for Cache-Control).
        assert!(cc.private);
        assert_eq!(cc.max_age, S(9));
    }

    // RFC 9213 §2.1: Structured Field parameters are ignored.
    #[test]
    fn rfc9213_2_1_parameters_ignored() {
        let resp = h(&[("cdn-cache-control", "max-age=60;foo=bar, private")]);
        let (cc, _) = CacheControl::for_shared_cache(&resp, &opts());
        assert_eq!(cc.max_age, S(60));
        assert!(cc.private);
    }

    // RFC 9213 §2.2: the target list is "fixed, user configurable": ours can be emptied.
    #[test]
    fn rfc9213_2_2_disabled_by_option() {
        let resp = h(&[
            ("cache-control", "max-age=5"),
            ("cdn-cache-control", "max-age=600"),
        ]);
        let o = PolicyOptions {
            honor_cdn_cache_control: false,
            ..opts()
        };
        let (cc, targeted) = CacheControl::for_shared_cache(&resp, &o);
        assert!(!targeted);
        assert_eq!(cc.max_age, S(5));
    }

    // RFC 9213 §2.1 / RFC 8941 §3.3.6: Boolean members.
    #[test]
    fn rfc9213_2_1_structured_booleans() {
        let resp = h(&[(
            "cdn-cache-control",
            "max-age=60, no-store=?0, must-revalidate=?1",
        )]);
        let (cc, targeted) = CacheControl::for_shared_cache(&resp, &opts());
        assert!(targeted);
        assert!(!cc.no_store);
        assert!(cc.must_revalidate);
    }

    // W3C Edge Architecture Specification 1.0 (Surrogate-Control): the fallback target after
    // CDN-Cache-Control; `max-age=N+M` gives M seconds of stale-if-error.
    #[test]
    fn edge_arch_surrogate_control_max_age_plus_stale() {
        let resp = h(&[
            ("cache-control", "private"),
            ("surrogate-control", "max-age=300+60"),
        ]);
        let (cc, targeted) = CacheControl::for_shared_cache(&resp, &opts());
        assert!(targeted);
        assert!(!cc.private);
        assert_eq!(cc.max_age, S(300));
        assert_eq!(cc.stale_if_error, S(60));
    }

    // W3C Edge Architecture 1.0: a `;target` directive applies only to the named surrogate.
    #[test]
    fn edge_arch_surrogate_control_targets() {
        let resp = h(&[("surrogate-control", "no-store;other, max-age=9;larder")]);
        let (cc, _) = CacheControl::for_shared_cache(&resp, &opts());
        assert!(!cc.no_store);
        assert_eq!(cc.max_age, S(9));
        let only_content = h(&[
            ("surrogate-control", "content=\"ESI/1.0\""),
            ("cache-control", "max-age=1"),
        ]);
        let (cc, targeted) = CacheControl::for_shared_cache(&only_content, &opts());
        assert!(!targeted);
        assert_eq!(cc.max_age, S(1));
    }

    #[test]
    fn rfc9213_2_2_cdn_cache_control_beats_surrogate_control() {
        let resp = h(&[
            ("surrogate-control", "max-age=1"),
            ("cdn-cache-control", "max-age=2"),
        ]);
        assert_eq!(
            CacheControl::for_shared_cache(&resp, &opts()).0.max_age,
            S(2)
        );
    }
}
