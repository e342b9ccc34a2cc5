//! An ordered, case-insensitive HTTP field list owned by policy, so that no `http` crate version leaks into the caching rules.

use std::collections::HashSet;

use super::cache_control::CacheControl;
use super::syntax::split_list;

/// HTTP fields in the order they arrived. Names are kept lower-case; values are raw bytes,
/// because a field value is not guaranteed to be UTF-8 and a cache must store it untouched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderList {
    fields: Vec<(String, Vec<u8>)>,
}

impl HeaderList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty list with room for `n` fields.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            fields: Vec::with_capacity(n),
        }
    }

    /// Appends a field line; repeated names are kept as separate lines (RFC 9110 §5.3).
    pub fn push(&mut self, name: &str, value: impl Into<Vec<u8>>) {
        self.fields.push((name.to_ascii_lowercase(), value.into()));
    }

    /// Replaces every line of `name` with one line holding `value`.
    pub fn set(&mut self, name: &str, value: impl Into<Vec<u8>>) {
        self.remove(name);
        self.push(name, value);
    }

    /// Removes every line of `name`; true if any was there.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.fields.len();
        self.fields.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        before != self.fields.len()
    }

    /// Keeps only the fields for which `keep(name, value)` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &[u8]) -> bool) {
        self.fields.retain(|(n, v)| keep(n, v));
    }

    /// True if at least one line of `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.fields
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// The first line of `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The first line of `name` as trimmed text; `None` if absent or not UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
    }

    /// Every line of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.fields
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// All lines of a list-valued field joined with ", " (RFC 9110 §5.3), lossily decoded;
    /// `None` if the field is absent.
    pub fn joined(&self, name: &str) -> Option<String> {
        let mut out: Option<String> = None;
        for value in self.get_all(name) {
            let text = String::from_utf8_lossy(value);
            match out.as_mut() {
                None => out = Some(text.into_owned()),
                Some(acc) => {
                    acc.push_str(", ");
                    acc.push_str(&text);
                }
            }
        }
        out
    }

    /// Every field line as (lower-case name, value).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.fields.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    /// Number of field lines.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// True when there are no fields.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

impl<N: AsRef<str>, V: Into<Vec<u8>>> FromIterator<(N, V)> for HeaderList {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        let mut list = HeaderList::new();
        for (n, v) in iter {
            list.push(n.as_ref(), v);
        }
        list
    }
}

/// Fields removed before forwarding whether or not Connection names them.
/// RFC 9110 §7.6.1 lists Proxy-Connection, Keep-Alive, TE, Transfer-Encoding and Upgrade;
/// Trailer announces trailers we do not forward (RFC 9110 §6.6.2). The Proxy-* fields belong
/// to the hop between a client and the proxy it authenticates with: Proxy-Authorization is
/// consumed by the first inbound proxy (RFC 9110 §11.7.2) and Proxy-Authenticate /
/// Proxy-Authentication-Info apply only to the next outbound client (§11.7.1, §11.7.3); a
/// reverse proxy that does no proxy authentication must neither relay nor store them (RFC 9111 §3.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authentication-info",
    "proxy-authorization",
];

/// True if `name` is always hop-by-hop for this proxy (see [`strip_hop_by_hop`]).
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Removes hop-by-hop fields in place: Connection and every field it names (RFC 9110 §7.6.1),
/// Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade, and the proxy
/// authentication fields Proxy-Authenticate, Proxy-Authentication-Info and Proxy-Authorization
/// (RFC 9110 §11.7: they concern only the adjacent hop, and this proxy does not authenticate).
pub fn strip_hop_by_hop(h: &mut HeaderList) {
    let named: HashSet<String> = h
        .get_all("connection")
        .flat_map(|line| split_list(line, b","))
        .map(|opt| String::from_utf8_lossy(opt).to_ascii_lowercase())
        .collect();
    h.retain(|name, _| !is_hop_by_hop(name) && !named.contains(name));
}

/// The response fields to store in a shared cache: `resp` without hop-by-hop fields
/// ([`strip_hop_by_hop`], RFC 9111 §3.1) and without the fields named by `private="…"`
/// (RFC 9111 §5.2.2.7: a shared cache MUST NOT store them) or `no-cache="…"`.
///
/// Rule for qualified `no-cache` (RFC 9111 §5.2.2.4): a cache may reuse the response if the
/// listed fields are excluded from it, so we never store them and otherwise do not force
/// revalidation. Names are taken from Cache-Control and CDN-Cache-Control alike, so the
/// result does not depend on which of them governs freshness.
pub fn headers_to_store(resp: &HeaderList) -> HeaderList {
    let mut out = resp.clone();
    strip_hop_by_hop(&mut out);
    let unshareable = unshareable_fields(resp);
    if !unshareable.is_empty() {
        out.retain(|name, _| {
            unshareable
                .binary_search_by(|f| f.as_str().cmp(name))
                .is_err()
        });
    }
    out
}

/// Lower-case names of fields a shared cache must not store (see [`headers_to_store`]),
/// sorted and deduplicated.
pub(crate) fn unshareable_fields(resp: &HeaderList) -> Vec<String> {
    let mut names = Vec::new();
    for field in ["cache-control", "cdn-cache-control"] {
        if resp.contains(field) {
            let cc = CacheControl::from_field(resp, field);
            names.extend(cc.unshareable_fields().map(str::to_owned));
        }
    }
    names.sort_unstable();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 9110 §5.1: field names are case-insensitive.
    #[test]
    fn rfc9110_5_1_names_are_case_insensitive() {
        let mut h = HeaderList::new();
        h.push("Cache-Control", "max-age=1");
        assert_eq!(h.get_str("cache-control"), Some("max-age=1"));
        assert!(h.contains("CACHE-CONTROL"));
    }

    // RFC 9110 §5.3: repeated list fields combine with commas, in order.
    #[test]
    fn rfc9110_5_3_repeated_lines_join_in_order() {
        let h: HeaderList = [("vary", "accept"), ("Vary", "accept-language")]
            .into_iter()
            .collect();
        assert_eq!(h.joined("vary").as_deref(), Some("accept, accept-language"));
        assert_eq!(h.joined("etag"), None);
    }

    // RFC 9110 §5.5: obs-text octets are allowed in values and must be kept as they are.
    #[test]
    fn rfc9110_5_5_non_utf8_values_are_kept_but_not_read_as_text() {
        let mut h = HeaderList::new();
        h.push("x", vec![0xff, 0xfe]);
        assert_eq!(h.get("x"), Some(&[0xff, 0xfe][..]));
        assert_eq!(h.get_str("x"), None);
    }

    // RFC 9110 §5.3: a field is all its lines; replacing it replaces every line.
    #[test]
    fn rfc9110_5_3_set_replaces_all_lines() {
        let mut h: HeaderList = [("a", "1"), ("A", "2"), ("b", "3")].into_iter().collect();
        h.set("a", "9");
        assert_eq!(h.get_all("a").count(), 1);
        assert_eq!(h.get_str("a"), Some("9"));
        assert_eq!(h.len(), 2);
    }

    fn list(fields: &[(&str, &str)]) -> HeaderList {
        fields.iter().copied().collect()
    }

    fn names(h: &HeaderList) -> Vec<&str> {
        h.iter().map(|(n, _)| n).collect()
    }

    // RFC 9110 §7.6.1: Connection and the fields it names go; the fixed list goes too.
    #[test]
    fn rfc9110_7_6_1_strip_connection_and_named() {
        let mut h = list(&[
            ("Connection", "close, X-Trace"),
            ("connection", "x-other"),
            ("x-trace", "1"),
            ("X-Other", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("content-type", "text/plain"),
            ("cache-control", "max-age=1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["content-type", "cache-control"]);
    }

    // RFC 9110 §11.7: proxy authentication fields belong to one hop.
    #[test]
    fn rfc9110_11_7_proxy_auth_fields_stripped() {
        let mut h = list(&[
            ("proxy-authorization", "Basic x"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authentication-info", "a=b"),
            ("authorization", "Bearer y"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["authorization"]);
    }

    #[test]
    fn rfc9110_7_6_1_odd_connection_values() {
        let mut h = list(&[("connection", " , ,"), ("a", "1")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["a"]);
        let mut binary = HeaderList::new();
        binary.push("connection", vec![0xff, b',', b'b']);
        binary.push("b", "2");
        binary.push("c", "3");
        strip_hop_by_hop(&mut binary);
        assert_eq!(names(&binary), ["c"]);
    }

    // RFC 9111 §3.1, §5.2.2.7, §5.2.2.4
    #[test]
    fn rfc9111_3_1_headers_to_store_drops_private_and_no_cache_fields() {
        let resp = list(&[
            (
                "cache-control",
                "max-age=60, private=\"X-User, Set-Cookie\"",
            ),
            ("cache-control", "no-cache=\"x-debug\""),
            ("x-user", "bob"),
            ("set-cookie", "s=1"),
            ("x-debug", "on"),
            ("connection", "close"),
            ("content-type", "text/html"),
        ]);
        let stored = headers_to_store(&resp);
        assert_eq!(
            names(&stored),
            ["cache-control", "cache-control", "content-type"]
        );
    }

    // RFC 9213: field names in CDN-Cache-Control are honoured too.
    #[test]
    fn rfc9213_headers_to_store_uses_cdn_cache_control_fields() {
        let resp = list(&[
            ("cdn-cache-control", "private=\"x-a\""),
            ("x-a", "1"),
            ("x-b", "2"),
        ]);
        assert_eq!(
            names(&headers_to_store(&resp)),
            ["cdn-cache-control", "x-b"]
        );
    }

    #[test]
    fn rfc9111_3_1_headers_to_store_keeps_unknown_and_binary_fields() {
        let mut resp = list(&[("x-unknown", "v"), ("age", "3")]);
        resp.push("x-bin", vec![0u8, 0xff]);
        let stored = headers_to_store(&resp);
        assert_eq!(stored, resp);
    }
}
