//! Which stored URLs an unsafe request invalidates (RFC 9111 §4.4), and the purge tags an origin attaches (Surrogate-Key).

use std::collections::HashSet;

use super::headers::HeaderList;
use super::syntax::trim_ows;

/// RFC 9110 §9.2.1: every method but GET, HEAD, OPTIONS and TRACE is unsafe, including
/// unknown ones (RFC 9111 §4.4). Method names are case-sensitive (RFC 9110 §9.1).
pub fn is_unsafe_method(method: &str) -> bool {
    !matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE")
}

/// URLs to invalidate after an unsafe request (RFC 9111 §4.4): for a 2xx or 3xx response,
/// `target_url` itself, plus the Location and Content-Location URLs (relative references
/// resolved against `target_url`, RFC 3986 §5) when their origin (scheme, host, port;
/// RFC 9110 §4.3.1) is the target's. Those are written with the target's own
/// `scheme://authority` spelling so they match cache keys built the same way; fragments are
/// dropped. Empty when nothing is to be invalidated.
pub fn invalidation_targets(
    method: &str,
    status: u16,
    target_url: &str,
    resp: &HeaderList,
) -> Vec<String> {
    if !is_unsafe_method(method) || !(200..=399).contains(&status) {
        return Vec::new();
    }
    let mut out = vec![target_url.to_owned()];
    let Some(base) = Url::parse(target_url) else {
        return out;
    };
    for field in ["location", "content-location"] {
        let Some(reference) = resp
            .get(field)
            .and_then(|v| std::str::from_utf8(trim_ows(v)).ok())
        else {
            continue;
        };
        if let Some(url) = base.resolve(reference).filter(|u| u.same_origin(&base)) {
            let url = url.spelled_as(&base);
            if !out.contains(&url) {
                out.push(url);
            }
        }
    }
    out
}

/// Purge tags from every Surrogate-Key line (space-separated), in first-seen order, without
/// duplicates. Tokens that are not UTF-8 are skipped.
pub fn surrogate_keys(resp: &HeaderList) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    let mut seen: HashSet<&[u8]> = HashSet::new();
    for line in resp.get_all("surrogate-key") {
        for token in line
            .split(u8::is_ascii_whitespace)
            .filter(|t| !t.is_empty())
        {
            if let Ok(key) = std::str::from_utf8(token)
                && seen.insert(token)
            {
                keys.push(key.to_owned());
            }
        }
    }
    keys
}

/// An absolute `scheme://authority path ?query` URL, fragment removed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Url {
    scheme: String,
    authority: String,
    path: String,
    query: Option<String>,
}

impl Url {
    fn parse(s: &str) -> Option<Url> {
        let s = strip_fragment(s);
        let (scheme, rest) = split_scheme(s)?;
        let rest = rest.strip_prefix("//")?;
        let (authority, path, query) = split_authority(rest);
        Some(Url {
            scheme: scheme.to_owned(),
            authority: authority.to_owned(),
            path: remove_dot_segments(path),
            query: query.map(str::to_owned),
        })
    }

    /// RFC 3986 §5.2.2 reference resolution, `self` as the base.
    fn resolve(&self, reference: &str) -> Option<Url> {
        if reference.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return None;
        }
        let r = strip_fragment(reference);
        if split_scheme(r).is_some() {
            return Url::parse(r);
        }
        if let Some(rest) = r.strip_prefix("//") {
            let (authority, path, query) = split_authority(rest);
            return Some(Url {
                scheme: self.scheme.clone(),
                authority: authority.to_owned(),
                path: remove_dot_segments(path),
                query: query.map(str::to_owned),
            });
        }
        let (path, query) = match r.split_once('?') {
            Some((p, q)) => (p, Some(q.to_owned())),
            None => (r, None),
        };
        let (path, query) = if path.is_empty() {
            (self.path.clone(), query.or_else(|| self.query.clone()))
        } else if path.starts_with('/') {
            (remove_dot_segments(path), query)
        } else {
            // RFC 3986 §5.2.3 merge: the base path up to its last '/', then the reference.
            let dir = match self.path.rfind('/') {
                Some(i) => self.path.get(..=i).unwrap_or("/"),
                None => "/",
            };
            (remove_dot_segments(&format!("{dir}{path}")), query)
        };
        Some(Url {
            scheme: self.scheme.clone(),
            authority: self.authority.clone(),
            path,
            query,
        })
    }

    /// RFC 9110 §4.3.1: same scheme, host and port (default ports filled in); case-insensitive.
    fn same_origin(&self, other: &Url) -> bool {
        self.scheme.eq_ignore_ascii_case(&other.scheme)
            && match (self.host_port(), other.host_port()) {
                (Some((h1, p1)), Some((h2, p2))) => h1.eq_ignore_ascii_case(h2) && p1 == p2,
                _ => false,
            }
    }

    fn host_port(&self) -> Option<(&str, u16)> {
        // Userinfo is not part of the origin.
        let hostport = self
            .authority
            .rsplit_once('@')
            .map_or(self.authority.as_str(), |(_, h)| h);
        let default = match self.scheme.to_ascii_lowercase().as_str() {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        // An IPv6 literal's colons are inside the brackets.
        let port_sep = match hostport.rfind(']') {
            Some(close) => hostport.get(close..)?.find(':').map(|i| close + i),
            None => hostport.rfind(':'),
        };
        match port_sep {
            Some(i) => {
                let host = hostport.get(..i)?;
                let port = hostport.get(i + 1..)?;
                let port = if port.is_empty() {
                    default
                } else {
                    port.parse().ok()?
                };
                Some((host, port))
            }
            None => Some((hostport, default)),
        }
    }

    /// This URL written with `base`'s scheme and authority (same origin assumed).
    fn spelled_as(&self, base: &Url) -> String {
        let path = if self.path.is_empty() {
            "/"
        } else {
            &self.path
        };
        match &self.query {
            Some(q) => format!("{}://{}{}?{}", base.scheme, base.authority, path, q),
            None => format!("{}://{}{}", base.scheme, base.authority, path),
        }
    }
}

fn strip_fragment(s: &str) -> &str {
    s.split_once('#').map_or(s, |(before, _)| before)
}

/// RFC 3986 §3.1: `scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )` before the first ':'.
fn split_scheme(s: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = s.split_once(':')?;
    let mut bytes = scheme.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic());
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    (first_ok && rest_ok).then_some((scheme, rest))
}

/// Splits `authority path ?query` (after "//").
fn split_authority(s: &str) -> (&str, &str, Option<&str>) {
    let (before_query, query) = match s.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (s, None),
    };
    match before_query.find('/') {
        Some(i) => (
            before_query.get(..i).unwrap_or_default(),
            before_query.get(i..).unwrap_or_default(),
            query,
        ),
        None => (before_query, "", query),
    }
}

/// RFC 3986 §5.2.4, on whole segments.
fn remove_dot_segments(path: &str) -> String {
    let absolute = path.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => trailing_slash = i == last,
            ".." => {
                if out.len() > usize::from(absolute) {
                    out.pop();
                }
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut joined = out.join("/");
    if absolute && !joined.starts_with('/') {
        joined.insert(0, '/');
    }
    if trailing_slash && !joined.ends_with('/') {
        joined.push('/');
    }
    joined
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(fields: &[(&str, &str)]) -> HeaderList {
        fields.iter().copied().collect()
    }

    const T: &str = "http://example.com/a/b?x=1";

    /// One `#[test]` per row: `name: (method, status, response fields) => expected URLs;`
    macro_rules! target_cases {
        ($($name:ident: ($m:expr, $st:expr, $resp:expr) => $want:expr;)*) => {$(
            #[test]
            fn $name() {
                let want: &[&str] = $want;
                assert_eq!(invalidation_targets($m, $st, T, &list($resp)), want);
            }
        )*};
    }

    target_cases! {
        // RFC 9111 §4.4: safe methods invalidate nothing.
        rfc9111_4_4_get_nothing: ("GET", 200, &[]) => &[];
        rfc9111_4_4_head_nothing: ("HEAD", 200, &[]) => &[];
        rfc9110_9_2_1_options_safe: ("OPTIONS", 200, &[]) => &[];
        rfc9110_9_2_1_trace_safe: ("TRACE", 200, &[]) => &[];
        // Unsafe + non-error status → target URI.
        rfc9111_4_4_post_200: ("POST", 200, &[]) => &[T];
        rfc9111_4_4_delete_204: ("DELETE", 204, &[]) => &[T];
        rfc9111_4_4_put_303: ("PUT", 303, &[]) => &[T];
        rfc9111_4_4_unknown_method_unsafe: ("PURGE", 200, &[]) => &[T];
        rfc9110_9_1_lowercase_get_is_unknown: ("get", 200, &[]) => &[T];
        // Error statuses invalidate nothing.
        rfc9111_4_4_post_404: ("POST", 404, &[]) => &[];
        rfc9111_4_4_post_500: ("POST", 500, &[]) => &[];
        rfc9111_4_4_post_100: ("POST", 100, &[]) => &[];
        // Location / Content-Location, resolved (RFC 3986 §5.2) and same-origin only.
        rfc9111_4_4_location_absolute_path: ("POST", 201, &[("location", "/items/5")]) => &[T, "http://example.com/items/5"];
        rfc9111_4_4_location_relative_path: ("POST", 201, &[("location", "c?y=2")]) => &[T, "http://example.com/a/c?y=2"];
        rfc9111_4_4_location_dot_segments: ("POST", 201, &[("location", "../z/./w")]) => &[T, "http://example.com/z/w"];
        rfc9111_4_4_location_query_only: ("POST", 201, &[("location", "?q=3")]) => &[T, "http://example.com/a/b?q=3"];
        rfc9111_4_4_location_fragment_dropped: ("POST", 201, &[("location", "/f#frag")]) => &[T, "http://example.com/f"];
        rfc9111_4_4_content_location: ("PUT", 200, &[("content-location", "/v2/b")]) => &[T, "http://example.com/v2/b"];
        rfc9111_4_4_both_fields: ("PUT", 200, &[("location", "/l"), ("content-location", "/c")]) => &[T, "http://example.com/l", "http://example.com/c"];
        rfc9111_4_4_same_as_target_once: ("POST", 200, &[("location", "/a/b?x=1")]) => &[T];
        rfc9111_4_4_absolute_same_origin: ("POST", 201, &[("location", "HTTP://EXAMPLE.com:80/n")]) => &[T, "http://example.com/n"];
        rfc9111_4_4_cross_origin_host: ("POST", 201, &[("location", "http://evil.com/a/b")]) => &[T];
        rfc9111_4_4_cross_origin_scheme: ("POST", 201, &[("location", "https://example.com/n")]) => &[T];
        rfc9111_4_4_cross_origin_port: ("POST", 201, &[("location", "http://example.com:8080/n")]) => &[T];
        rfc9111_4_4_network_path_other_host: ("POST", 201, &[("location", "//evil.com/x")]) => &[T];
        rfc9111_4_4_network_path_same_host: ("POST", 201, &[("location", "//example.com/x")]) => &[T, "http://example.com/x"];
        rfc9111_4_4_userinfo_not_origin: ("POST", 201, &[("location", "http://user@example.com/u")]) => &[T, "http://example.com/u"];
        rfc9111_4_4_location_with_space_ignored: ("POST", 201, &[("location", "/a b")]) => &[T];
        rfc9111_4_4_location_other_scheme_ignored: ("POST", 201, &[("location", "mailto:a@example.com")]) => &[T];
        rfc9111_4_4_empty_location_is_target: ("POST", 201, &[("location", "")]) => &[T];
    }

    #[test]
    fn rfc9111_4_4_non_utf8_location_ignored() {
        let mut resp = HeaderList::new();
        resp.push("location", vec![b'/', 0xff]);
        assert_eq!(invalidation_targets("POST", 200, T, &resp), [T]);
    }

    #[test]
    fn rfc9110_4_3_1_https_and_ipv6_origins() {
        let resp = list(&[("location", "https://[::1]:443/p")]);
        assert_eq!(
            invalidation_targets("POST", 200, "https://[::1]/q", &resp),
            ["https://[::1]/q", "https://[::1]/p"]
        );
        let other = list(&[("location", "https://[::2]/p")]);
        assert_eq!(
            invalidation_targets("POST", 200, "https://[::1]/q", &other),
            ["https://[::1]/q"]
        );
    }

    #[test]
    fn rfc9111_4_4_unparsable_target_still_invalidated() {
        let resp = list(&[("location", "/x")]);
        assert_eq!(
            invalidation_targets("POST", 200, "not a url", &resp),
            ["not a url"]
        );
    }

    #[test]
    fn rfc9110_9_2_1_unsafe_methods() {
        for m in [
            "POST", "PUT", "DELETE", "PATCH", "CONNECT", "PURGE", "get", "",
        ] {
            assert!(is_unsafe_method(m), "{m}");
        }
        for m in ["GET", "HEAD", "OPTIONS", "TRACE"] {
            assert!(!is_unsafe_method(m), "{m}");
        }
    }

    // Surrogate-Key has no RFC: it is the CDN convention (Fastly's purge-by-key field) of
    // space-separated keys on any number of lines; these tests name it `fastly_surrogate_key`.
    #[test]
    fn fastly_surrogate_key_split_and_dedup() {
        let resp = list(&[
            ("surrogate-key", "  a b\tc "),
            ("Surrogate-Key", "b d"),
            ("surrogate-key", ""),
        ]);
        assert_eq!(surrogate_keys(&resp), ["a", "b", "c", "d"]);
        assert!(surrogate_keys(&HeaderList::new()).is_empty());
    }

    #[test]
    fn fastly_surrogate_key_skip_non_utf8() {
        let mut resp = HeaderList::new();
        resp.push("surrogate-key", vec![b'o', b'k', b' ', 0xff, b' ', b'z']);
        assert_eq!(surrogate_keys(&resp), ["ok", "z"]);
    }

    #[test]
    fn fastly_surrogate_key_huge_line() {
        let line: String = (0..20_000).map(|i| format!("k{} ", i % 1000)).collect();
        assert!(line.len() > 90_000);
        assert_eq!(
            surrogate_keys(&list(&[("surrogate-key", &line)])).len(),
            1000
        );
    }

    #[test]
    fn rfc3986_5_2_4_remove_dot_segments() {
        assert_eq!(remove_dot_segments("/a/b/c/./../../g"), "/a/g");
        assert_eq!(remove_dot_segments("/../../x"), "/x");
        assert_eq!(remove_dot_segments("/a/b/.."), "/a/");
        assert_eq!(remove_dot_segments("/a/."), "/a/");
        assert_eq!(remove_dot_segments(""), "");
    }
}
