//! Cache keys: the primary key of a request (method class + URL) and the variant key that adds the Vary-selected values; depends on policy types only, hashes with blake3.

use std::fmt;

/// Domain-separation prefixes, so a primary hash can never equal a variant hash by accident
/// and a future key scheme can change them without colliding with v1 keys.
const PRIMARY_DOMAIN: &[u8] = b"larder primary key v1\0";
const VARY_DOMAIN: &[u8] = b"larder vary values v1\0";

/// The method class every cached request belongs to: GET and HEAD share stored responses
/// (RFC 9111 §4: a HEAD can be answered from a stored GET), and nothing else is cached.
const METHOD_CLASS: &str = "GET";

/// The primary cache key: method class, scheme, host (lower-cased, default port removed),
/// path and query as sent. Stored as its blake3 hash; the readable URL is kept for purge and dump.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PrimaryKey {
    url: String,
    hash: [u8; 32],
}

impl PrimaryKey {
    /// GET/HEAD method class (only those are cached), scheme, Host lower-cased with the default port
    /// removed (80 for http, 443 for https), path and query as sent.
    /// The readable URL is `scheme://host[:port]/path?query`.
    pub fn new(scheme: &str, host: &str, path_and_query: &str) -> PrimaryKey {
        // Built in one allocation: this runs on every request, hits included.
        let mut url =
            String::with_capacity(scheme.len() + 3 + host.len() + path_and_query.len() + 1);
        url.push_str(scheme);
        url.make_ascii_lowercase();
        url.push_str("://");
        push_authority(&mut url, scheme.len(), host);
        // An empty target (or a bare query) still names the root resource.
        if !path_and_query.starts_with('/') {
            url.push('/');
        }
        url.push_str(path_and_query);
        let mut hasher = blake3::Hasher::new();
        hasher.update(PRIMARY_DOMAIN);
        hasher.update(METHOD_CLASS.as_bytes());
        hasher.update(b"\0");
        hasher.update(url.as_bytes());
        PrimaryKey {
            hash: *hasher.finalize().as_bytes(),
            url,
        }
    }

    /// Parses an absolute URL as the admin API gives it (`http://Host:80/p?q` is the same key as
    /// `new("http", "host", "/p?q")`). `None` unless it is an absolute http(s) URL with a host;
    /// a fragment is dropped (it is never sent to a server), userinfo is refused.
    pub fn from_url(url: &str) -> Option<PrimaryKey> {
        let (scheme, rest) = url.split_once("://")?;
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return None;
        }
        let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(end);
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        Some(PrimaryKey::new(scheme, authority, target))
    }

    /// The readable URL, `scheme://host[:port]/path?query`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The blake3 hash that the store indexes by.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }
}

impl fmt::Display for PrimaryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

/// Appends the host lower-cased, without the scheme's default port (RFC 9110 §4.2.3), keeping
/// IPv6 brackets. An unparsable port is kept as sent: it still identifies *some* resource
/// uniquely. The scheme is `url[..scheme_len]`, already lower-cased.
fn push_authority(url: &mut String, scheme_len: usize, host: &str) {
    // Splitting before lower-casing is the same split: only ASCII letters change.
    let (name, port) = if host.starts_with('[') {
        match host.find(']') {
            Some(close) => {
                let (name, after) = host.split_at(close + 1);
                (name, after.strip_prefix(':'))
            }
            None => (host, None),
        }
    } else {
        match host.rsplit_once(':') {
            // A second colon means an unbracketed IPv6 literal: no port to split off.
            Some((name, port)) if !name.contains(':') => (name, Some(port)),
            _ => (host, None),
        }
    };
    let default = match &url[..scheme_len] {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    };
    let start = url.len();
    url.push_str(name);
    match port {
        // "host:" has an empty port, which means the default (RFC 3986 §3.2.3).
        None | Some("") => {}
        Some(p) => match p.parse::<u16>() {
            Ok(n) if Some(n) == default => {}
            Ok(n) => {
                use std::fmt::Write;
                let _ = write!(url, ":{n}");
            }
            Err(_) => {
                url.push(':');
                url.push_str(p);
            }
        },
    }
    url[start..].make_ascii_lowercase();
}

/// A variant of a primary key: the primary hash followed by the blake3 of the normalized request
/// values that the stored response's Vary selected. 64 bytes; the first 32 are the primary hash, so
/// all variants of one URL are a prefix scan away.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VariantKey([u8; 64]);

impl VariantKey {
    /// `vary` = the normalized selecting request values as (field name, `None` if absent, `Some(value)`);
    /// an empty slice means no Vary. The hashed encoding is length-prefixed, so `("a", Some(""))`
    /// and `("a", None)` differ, as do any two different lists.
    pub fn new(primary: &PrimaryKey, vary: &[(String, Option<String>)]) -> VariantKey {
        let mut hasher = blake3::Hasher::new();
        hasher.update(VARY_DOMAIN);
        hasher.update(&(vary.len() as u64).to_le_bytes());
        for (name, value) in vary {
            hasher.update(&(name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            match value {
                None => {
                    hasher.update(&[0]);
                }
                Some(v) => {
                    hasher.update(&[1]);
                    hasher.update(&(v.len() as u64).to_le_bytes());
                    hasher.update(v.as_bytes());
                }
            }
        }
        let mut bytes = [0u8; 64];
        bytes[..32].copy_from_slice(primary.hash());
        bytes[32..].copy_from_slice(hasher.finalize().as_bytes());
        VariantKey(bytes)
    }

    /// Rebuilds a key from its 64 stored bytes; `None` if the slice has another length.
    pub fn from_bytes(bytes: &[u8]) -> Option<VariantKey> {
        Some(VariantKey(bytes.try_into().ok()?))
    }

    /// The primary key's hash (the first 32 bytes).
    pub fn primary_hash(&self) -> &[u8; 32] {
        self.0[..32]
            .try_into()
            .expect("64-byte key has a 32-byte prefix")
    }

    /// The 64 bytes as stored.
    pub fn as_bytes(&self) -> &[u8; 64] {
        &self.0
    }

    /// Lower-case hex of the 64 bytes, for logs and dump.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for VariantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Both halves, shortened: enough to tell keys apart in a log line.
        write!(
            f,
            "VariantKey({}…/{}…)",
            &hex(&self.0[..6]),
            &hex(&self.0[32..38])
        )
    }
}

/// Lower-case hex encoding.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_lowercased_and_default_port_removed() {
        let a = PrimaryKey::new("http", "Example.COM:80", "/a?b=C");
        assert_eq!(a.url(), "http://example.com/a?b=C");
        assert_eq!(a, PrimaryKey::new("HTTP", "example.com", "/a?b=C"));
        assert_eq!(PrimaryKey::new("https", "x:443", "/").url(), "https://x/");
        // 443 is not the default for http, 80 is not for https.
        assert_eq!(PrimaryKey::new("http", "x:443", "/").url(), "http://x:443/");
        assert_eq!(PrimaryKey::new("https", "x:80", "/").url(), "https://x:80/");
        assert_eq!(
            PrimaryKey::new("http", "[::1]:80", "/").url(),
            "http://[::1]/"
        );
        assert_eq!(
            PrimaryKey::new("http", "[::1]:8080", "/").url(),
            "http://[::1]:8080/"
        );
        assert_eq!(PrimaryKey::new("http", "x:", "").url(), "http://x/");
    }

    #[test]
    fn path_and_query_are_kept_as_sent() {
        let a = PrimaryKey::new("http", "x", "/A?b");
        let b = PrimaryKey::new("http", "x", "/a?b");
        assert_ne!(a, b);
        assert_ne!(a.hash(), b.hash());
        assert_ne!(
            PrimaryKey::new("http", "x", "/a"),
            PrimaryKey::new("https", "x", "/a")
        );
    }

    #[test]
    fn from_url_matches_new() {
        let k = PrimaryKey::from_url("http://Host:80/p?q").unwrap();
        assert_eq!(k, PrimaryKey::new("http", "host", "/p?q"));
        assert_eq!(
            PrimaryKey::from_url("https://h?q").unwrap().url(),
            "https://h/?q"
        );
        assert_eq!(
            PrimaryKey::from_url("http://h/p#frag").unwrap().url(),
            "http://h/p"
        );
        assert!(PrimaryKey::from_url("ftp://h/p").is_none());
        assert!(PrimaryKey::from_url("/p").is_none());
        assert!(PrimaryKey::from_url("http:///p").is_none());
        assert!(PrimaryKey::from_url("http://u@h/p").is_none());
    }

    #[test]
    fn variant_encoding_is_unambiguous() {
        let p = PrimaryKey::new("http", "x", "/");
        let v = |list: &[(&str, Option<&str>)]| {
            let owned: Vec<(String, Option<String>)> = list
                .iter()
                .map(|(n, v)| (n.to_string(), v.map(str::to_string)))
                .collect();
            VariantKey::new(&p, &owned)
        };
        assert_ne!(v(&[("a", Some(""))]), v(&[("a", None)]));
        assert_ne!(v(&[("ab", Some("c"))]), v(&[("a", Some("bc"))]));
        assert_ne!(v(&[]), v(&[("a", None)]));
        assert_ne!(v(&[("a", Some("1")), ("b", None)]), v(&[("a", Some("1b"))]));
        assert_eq!(v(&[("a", Some("1"))]), v(&[("a", Some("1"))]));
        let k = v(&[("accept-encoding", Some("gzip"))]);
        assert_eq!(k.primary_hash(), p.hash());
        assert_eq!(VariantKey::from_bytes(k.as_bytes()), Some(k));
        assert!(VariantKey::from_bytes(&[0; 63]).is_none());
    }
}
