//! Which headers cross the proxy: hop-by-hop headers (RFC 9110 §7.6.1) belong to one
//! connection and are not forwarded, either way.

use axum::http::{HeaderMap, HeaderName, header};

/// Hop-by-hop headers (RFC 9110 §7.6.1), not forwarded. `proxy-connection` and `keep-alive`
/// are not in the `http` crate's constants.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == header::TE
        || name == header::TRAILER
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Copies a request's headers for the upstream: all but `Host` and `Transfer-Encoding` (the
/// proxy's own to set) and the hop-by-hop ones.
pub fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        if name != header::HOST && name != header::TRANSFER_ENCODING {
            to.append(name.clone(), value.clone());
        }
    }
    strip_hop_by_hop(to);
}

/// Removes the hop-by-hop headers and those `Connection` names. One pass over the headers
/// first: most requests and answers carry none, and a `remove` per name hashed (and, from a
/// `&str`, parsed) each name on every request (callgrind: 6 % of a proxied request).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name))
        .cloned()
        .collect();
    for name in present {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::{HeaderMap, copy_headers, strip_hop_by_hop};
    use axum::http::HeaderValue;

    fn names(headers: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        names
    }

    /// RFC 9110 §7.6.1: the fixed hop-by-hop headers and any that `Connection` names go; the
    /// rest, repeated values included, pass in order; `Host` and `Transfer-Encoding` are the
    /// proxy's own to set.
    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut from = HeaderMap::new();
        for (name, value) in [
            ("host", "client.example"),
            ("connection", "keep-alive, X-Hop"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic e30="),
            ("transfer-encoding", "chunked"),
            ("x-hop", "1"),
            ("content-type", "application/json"),
            ("x-request-id", "a"),
            ("x-request-id", "b"),
        ] {
            from.append(name, HeaderValue::from_static(value));
        }
        let mut to = HeaderMap::new();
        copy_headers(&from, &mut to);
        assert_eq!(names(&to), ["content-type", "x-request-id"]);
        let ids: Vec<_> = to.get_all("x-request-id").iter().collect();
        assert_eq!(ids, ["a", "b"]);

        // An answer with none of them is left as it is.
        let mut answer = HeaderMap::new();
        answer.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        answer.insert("x-accel-buffering", HeaderValue::from_static("no"));
        strip_hop_by_hop(&mut answer);
        assert_eq!(names(&answer), ["content-type", "x-accel-buffering"]);
        // An answer naming an end-to-end header in Connection loses it too.
        answer.insert("connection", HeaderValue::from_static("x-accel-buffering"));
        strip_hop_by_hop(&mut answer);
        assert_eq!(names(&answer), ["content-type"]);
    }
}
