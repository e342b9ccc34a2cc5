//! Refuses or neutralizes hostile request shapes before the cache sees them: bad targets and Host, ambiguous framing, oversized URIs and heads, unkeyed override fields.
//!
//! actix's parser already answers 400 to what it cannot parse (bad method or URI bytes,
//! obs-fold, two Content-Lengths, two Host lines, invalid chunk sizes) and 431 to a head over
//! its fixed 128 KiB or 96 lines. What parses but must still not reach the cache is refused
//! here, and every refusal closes the connection: whatever the client sent after the head is
//! never read as a next request.

use actix_web::http::{Method, Version, header};
use actix_web::{HttpRequest, HttpResponse};

use crate::policy::HeaderList;

/// Request fields that make an origin answer for another host, path, scheme or method than
/// the one in the cache key. The key cannot include them (it is URL-based, and a client can
/// send any value), so they are removed before the request goes on: the origin then answers
/// the request the key describes, and one client cannot make a response that is stored for
/// everyone. Larder sets X-Forwarded-For and X-Forwarded-Proto itself.
pub(crate) const UNKEYED_OVERRIDES: [&str; 13] = [
    "x-forwarded-host",
    "x-forwarded-server",
    "x-forwarded-port",
    "x-forwarded-scheme",
    "x-forwarded-prefix",
    "x-original-url",
    "x-original-host",
    "x-rewrite-url",
    "x-host",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    // RFC 7239: its host= and proto= parameters are the same override in standard form.
    "forwarded",
];

/// Size bounds on a request head, from `[server]` in the config.
#[derive(Clone, Copy, Debug)]
pub struct RequestLimits {
    /// Longest request-target (path and query, or the whole absolute-form target); longer → 414.
    pub max_uri_length: usize,
    /// Largest header section: the bytes of every field line (name, ": ", value, CRLF); more → 431.
    pub max_header_size: usize,
}

/// Checks the request and returns the host for the cache key, or the answer to send instead.
pub(crate) fn admit(
    req: &HttpRequest,
    limits: &RequestLimits,
) -> Result<String, Box<HttpResponse>> {
    let uri = req.uri();
    if req.method() == Method::CONNECT {
        // RFC 9110 §9.3.6: a reverse proxy for one origin tunnels to nowhere.
        return Err(refuse(
            501,
            "CONNECT is not supported: this is a reverse proxy",
        ));
    }
    // RFC 9110 §15.5.15: a target longer than the server is willing to interpret.
    let target_len = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len());
    if target_len > limits.max_uri_length {
        return Err(refuse(
            414,
            &format!(
                "request target of {target_len} bytes is over the {} byte limit",
                limits.max_uri_length
            ),
        ));
    }
    // RFC 6585 §5: the header section as a whole is too large.
    let header_size: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    if header_size > limits.max_header_size {
        return Err(refuse(
            431,
            &format!(
                "request header section of {header_size} bytes is over the {} byte limit",
                limits.max_header_size
            ),
        ));
    }
    let headers = req.headers();
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing.
        if req.version() == Version::HTTP_10 {
            return Err(refuse(400, "Transfer-Encoding is not allowed in HTTP/1.0"));
        }
        // RFC 9112 §6.3: both framings at once is how requests are smuggled; an error here.
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err(refuse(
                400,
                "both Content-Length and Transfer-Encoding: ambiguous framing",
            ));
        }
    }
    let mut hosts = headers.get_all(header::HOST);
    let host_field = hosts.next();
    if hosts.next().is_some() {
        // RFC 9112 §3.2: more than one Host line.
        return Err(refuse(400, "more than one Host header"));
    }
    if uri.path() == "*" && uri.authority().is_none() {
        // RFC 9112 §3.2.4: asterisk-form is for server-wide OPTIONS only, answered here.
        return Err(if req.method() == Method::OPTIONS {
            Box::new(
                HttpResponse::Ok()
                    .insert_header(("content-length", "0"))
                    .finish(),
            )
        } else {
            refuse(400, "the * target is only for OPTIONS")
        });
    }
    if let Some(authority) = uri.authority() {
        if uri.scheme_str() != Some("http") {
            // Authority-form (RFC 9112 §3.2.3) is for CONNECT only; https is not served here.
            return Err(refuse(
                400,
                "the request target must be a path or an absolute http:// URL",
            ));
        }
        // RFC 9112 §3.2.2: an absolute-form target overrides Host, which we then replace.
        let authority = authority.as_str();
        if !valid_host(authority.as_bytes()) {
            return Err(refuse(400, "invalid host in the request target"));
        }
        return Ok(authority.to_string());
    }
    match host_field {
        Some(h) if valid_host(h.as_bytes()) => {
            // valid_host admits ASCII only.
            Ok(String::from_utf8_lossy(h.as_bytes()).into_owned())
        }
        // RFC 9112 §3.2: an invalid Host value is a 400.
        Some(_) => Err(refuse(400, "invalid Host header")),
        // HTTP/1.0 may omit Host (RFC 9112 §3.2 requires it of 1.1 only).
        None if req.version() == Version::HTTP_10 => Ok(String::new()),
        None => Err(refuse(400, "missing Host header")),
    }
}

/// Makes the forwarded fields match the cache key: drops [`UNKEYED_OVERRIDES`] and, for an
/// absolute-form target, sends the target's host as Host (RFC 9112 §3.2.2).
pub(crate) fn neutralize(headers: &mut HeaderList, host: &str) {
    for name in UNKEYED_OVERRIDES {
        headers.remove(name);
    }
    if !host.is_empty() && headers.get("host") != Some(host.as_bytes()) {
        headers.set("host", host);
    }
}

/// RFC 9110 §7.2 `Host = uri-host [ ":" port ]`, RFC 3986 §3.2.2: an IP literal in brackets
/// or a reg-name, then an optional port of at most 65535. No user-info, no spaces. Empty is
/// valid (RFC 9112 §3.2, a target without authority).
fn valid_host(h: &[u8]) -> bool {
    let (name, port) = if h.first() == Some(&b'[') {
        let Some(end) = h.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &h[1..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        match &h[end + 1..] {
            [] => (&h[..0], None),
            [b':', port @ ..] => (&h[..0], Some(port)),
            _ => return false,
        }
    } else {
        match h.iter().position(|&b| b == b':') {
            Some(i) => (&h[..i], Some(&h[i + 1..])),
            None => (h, None),
        }
    };
    let name_ok = name
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b));
    // An empty port is allowed by the grammar (`port = *DIGIT`).
    let port_ok = port.is_none_or(|p| {
        p.len() <= 5
            && p.iter().all(u8::is_ascii_digit)
            && p.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0')) <= 65535
    });
    name_ok && port_ok
}

/// A refusal: plain text, and the connection closes after it.
fn refuse(status: u16, message: &str) -> Box<HttpResponse> {
    let mut resp = super::respond::plain_error(status, message);
    resp.head_mut()
        .set_connection_type(actix_web::http::ConnectionType::Close);
    Box::new(resp)
}

#[cfg(test)]
mod tests {
    use super::valid_host;

    #[test]
    fn host_values() {
        for ok in [
            "example.com",
            "example.com:8080",
            "127.0.0.1:80",
            "[::1]:443",
            "[2001:db8::1]",
            "",
            "example.com:",
            "xn--bcher-kva.example",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok:?} is valid");
        }
        for bad in [
            "user@example.com",
            "user:pw@example.com",
            "example.com:99999",
            "example.com:80:80",
            "example.com:+80",
            "example.com:http",
            "exa mple.com",
            "[::1",
            "[zz::1]",
            "[::1]x",
            "example.com/path",
            "ex\u{e9}mple.com",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?} is invalid");
        }
    }
}
