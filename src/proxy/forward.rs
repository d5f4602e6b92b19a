//! Header rules for forwarding a request to an upstream and its response
//! back: hop-by-hop removal in both directions, the `X-Forwarded-*` family
//! and `Forwarded` (RFC 7239), `Via` and `Max-Forwards`. Response framing
//! is decided where responses are parsed, in [`crate::upstream::h1`].
//!
//! The request rules do not rewrite the client's header map: they say which
//! of its fields cross ([`HopByHop`], [`ForwardingFields::replaces`]) and
//! which fields this hop adds ([`ForwardingFields`]), and the upstream head
//! is written from that in one pass ([`crate::upstream::h1`]). Removing and
//! inserting fields in a `HeaderMap` (hashing, regrowing it for the six
//! added fields) cost more than the rest of the request's own work.
//!
//! Kept free of I/O so every rule is unit-tested on plain header maps.

use std::net::IpAddr;

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::Method;
use ipnet::IpNet;

/// Headers that describe one hop and never cross the proxy (RFC 9110 §7.6.1),
/// plus the non-standard ones old clients still send.
///
/// A `const`: `contains` on it compiles to comparisons with known names.
/// (A `static` array, or a chain of `==` against constants, measured
/// about 500 instructions per request slower in the upstream head.)
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

// Names built at compile time: `HeaderName::from_static` called at run
// time validates and looks up its argument on every call.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// `Via` token this proxy adds.
pub const VIA: &str = "1.1 cutover";

/// Removes hop-by-hop headers, including every header the `Connection`
/// header names, and `Upgrade` (re-added by the caller only for a tunnel
/// it accepted). Used on responses; requests use [`HopByHop`].
///
/// One pass over the names finds what to remove, so the common response
/// with no hop-by-hop header costs a few comparisons and no hashing.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name))
        .cloned()
        .collect();
    if doomed.is_empty() {
        return;
    }
    doomed.extend(connection_named(headers));
    for name in doomed {
        headers.remove(name);
    }
}

/// `Upgrade` and the fixed hop-by-hop names.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::UPGRADE || HOP_BY_HOP.contains(name)
}

/// The field names a `Connection` header lists (its usual options left out).
fn connection_named(headers: &HeaderMap) -> impl Iterator<Item = HeaderName> + '_ {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        // `close`/`keep-alive`/`upgrade` are the usual tokens: options or
        // headers the fixed list already catches; skip parsing them.
        .filter(|token| !is_common_connection_option(token))
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
}

/// The hop-by-hop fields of one request, which are not forwarded: the
/// fixed names, `Upgrade`, and every field its `Connection` header names.
#[derive(Debug, Default)]
pub struct HopByHop {
    /// Names the `Connection` header lists (usually none: no allocation).
    named: Vec<HeaderName>,
}

impl HopByHop {
    pub fn of(headers: &HeaderMap) -> HopByHop {
        HopByHop {
            named: connection_named(headers).collect(),
        }
    }

    pub fn contains(&self, name: &HeaderName) -> bool {
        is_hop_by_hop(name) || self.named.contains(name)
    }
}

fn is_common_connection_option(token: &str) -> bool {
    ["close", "keep-alive", "upgrade"]
        .iter()
        .any(|common| token.eq_ignore_ascii_case(common))
}

/// The protocol a client asks to upgrade to, if it is one we tunnel.
/// Only `websocket` is tunnelled; `h2c` and anything else is ignored (the
/// request is forwarded as a plain request without its Upgrade header).
pub fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    // Most requests have no Upgrade: one lookup, not two.
    let upgrade = headers.get(header::UPGRADE)?;
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let is_websocket = upgrade
        .to_str()
        .map(|v| v.trim().eq_ignore_ascii_case("websocket"))
        .unwrap_or(false);
    (connection_upgrade && is_websocket).then(|| upgrade.clone())
}

/// Facts about the client connection the forwarding headers describe.
#[derive(Debug, Clone)]
pub struct ClientFacts<'a> {
    pub addr: IpAddr,
    /// The client address as a header value, made once per connection.
    pub addr_value: &'a HeaderValue,
    /// "http" or "https": how the client reached us.
    pub proto: &'static str,
    /// The host the client asked for (Host or :authority), verbatim.
    pub host: &'a HeaderValue,
    /// This hop's `for=...;proto=...` pairs for `Forwarded`, made once per
    /// connection by [`forwarded_for_proto`].
    pub forwarded_for_proto: &'a HeaderValue,
    /// Peers whose forwarding headers are trusted and extended.
    pub trusted_proxies: &'a [IpNet],
}

impl ClientFacts<'_> {
    fn trusted(&self) -> bool {
        self.trusted_proxies
            .iter()
            .any(|net| net.contains(&self.addr))
    }
}

/// The fields this hop sends upstream in place of the client's own fields
/// of the same names: `X-Forwarded-For`, `X-Real-IP`, `X-Forwarded-Proto`,
/// `Forwarded`, `X-Forwarded-Host` and `Via`.
#[derive(Debug)]
pub struct ForwardingFields {
    /// `None`: the client's own fields of that name are forwarded as sent.
    fields: [(HeaderName, Option<HeaderValue>); 6],
}

impl ForwardingFields {
    /// Whether the client's fields named `name` are replaced by this hop's.
    pub fn replaces(&self, name: &HeaderName) -> bool {
        self.fields
            .iter()
            .any(|(ours, value)| value.is_some() && ours == name)
    }

    /// The fields this hop adds.
    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.fields
            .iter()
            .filter_map(|(name, value)| value.as_ref().map(|value| (name, value)))
    }
}

/// This hop's forwarding fields for a request with the client's `headers`.
///
/// A client's own `X-Forwarded-*` and `Forwarded` values are kept (and
/// extended) only when the client is a trusted proxy; otherwise they are
/// replaced, so a client cannot forge the address or scheme the upstream
/// sees. The untrusted case (almost every request at an edge proxy) clones
/// prepared header values and builds one `Forwarded` value. `Via` always
/// lists the client's hops, then this one.
pub fn forwarding_fields(headers: &HeaderMap, facts: &ClientFacts<'_>) -> ForwardingFields {
    let element = forwarded_element(facts);
    let (forwarded_for, real_ip, proto, forwarded) = if facts.trusted() {
        (
            extended_forwarded_for(headers, facts),
            (!headers.contains_key(&X_REAL_IP)).then(|| facts.addr_value.clone()),
            (!headers.contains_key(&X_FORWARDED_PROTO))
                .then(|| HeaderValue::from_static(facts.proto)),
            appended_forwarded(headers, element),
        )
    } else {
        (
            Some(facts.addr_value.clone()),
            Some(facts.addr_value.clone()),
            Some(HeaderValue::from_static(facts.proto)),
            element,
        )
    };
    ForwardingFields {
        fields: [
            (X_FORWARDED_FOR, forwarded_for),
            (X_REAL_IP, real_ip),
            (X_FORWARDED_PROTO, proto),
            (FORWARDED, Some(forwarded)),
            (X_FORWARDED_HOST, Some(facts.host.clone())),
            (header::VIA, Some(via_after(headers))),
        ],
    }
}

/// The `for=` and `proto=` pairs of this hop's `Forwarded` element (RFC
/// 7239 §4): an IPv6 address is bracketed and quoted, as §6 requires
/// (`for="[2001:db8::1]"`).
pub fn forwarded_for_proto(addr: IpAddr, proto: &str) -> HeaderValue {
    let value = match addr {
        IpAddr::V4(v4) => format!("for={v4};proto={proto}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto={proto}"),
    };
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("for=unknown"))
}

/// This hop's whole `Forwarded` element: `for=`, `proto=` and, when the
/// client named one, `host=` (a token, or a quoted string when it holds a
/// port or other characters a token cannot).
fn forwarded_element(facts: &ClientFacts<'_>) -> HeaderValue {
    let host = facts.host.as_bytes();
    if host.is_empty() {
        return facts.forwarded_for_proto.clone();
    }
    let prefix = facts.forwarded_for_proto.as_bytes();
    let mut value = Vec::with_capacity(prefix.len() + host.len() + 8);
    value.extend_from_slice(prefix);
    value.extend_from_slice(b";host=");
    if host.iter().all(|&b| is_tchar(b)) {
        value.extend_from_slice(host);
    } else {
        value.push(b'"');
        for &b in host {
            if b == b'"' || b == b'\\' {
                value.push(b'\\');
            }
            value.push(b);
        }
        value.push(b'"');
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(value))
        .unwrap_or_else(|_| facts.forwarded_for_proto.clone())
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    // A `match`, not `contains` on a byte string: that is a memchr call
    // per byte of every request's host.
    matches!(b,
        b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z'
        | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.'
        | b'^' | b'_' | b'`' | b'|' | b'~')
}

/// A trusted proxy's `Forwarded` elements are kept, one field, ours last.
fn appended_forwarded(headers: &HeaderMap, element: HeaderValue) -> HeaderValue {
    let previous: Vec<&[u8]> = headers
        .get_all(&FORWARDED)
        .iter()
        .map(HeaderValue::as_bytes)
        .filter(|value| !value.is_empty())
        .collect();
    if previous.is_empty() {
        return element;
    }
    let mut joined = previous.join(&b", "[..]);
    joined.extend_from_slice(b", ");
    joined.extend_from_slice(element.as_bytes());
    HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)).unwrap_or(element)
}

/// A trusted proxy's `X-Forwarded-For` is extended with the client's
/// address (`None`, keeping its own, only if the result were invalid).
fn extended_forwarded_for(headers: &HeaderMap, facts: &ClientFacts<'_>) -> Option<HeaderValue> {
    let previous: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if previous.is_empty() {
        return Some(facts.addr_value.clone());
    }
    let client = facts.addr.to_string();
    HeaderValue::from_str(&format!("{}, {client}", previous.join(", "))).ok()
}

/// The `Via` a request goes on with: the client's hops, then ours.
fn via_after(headers: &HeaderMap) -> HeaderValue {
    let previous: Vec<&[u8]> = headers
        .get_all(header::VIA)
        .iter()
        .map(HeaderValue::as_bytes)
        .filter(|value| !value.is_empty())
        .collect();
    if previous.is_empty() {
        return HeaderValue::from_static(VIA);
    }
    let mut joined = previous.join(&b", "[..]);
    joined.extend_from_slice(b", ");
    joined.extend_from_slice(VIA.as_bytes());
    HeaderValue::from_maybe_shared(bytes::Bytes::from(joined))
        .unwrap_or(HeaderValue::from_static(VIA))
}

/// Adds our `Via` token after any existing ones (on responses).
pub fn append_via(headers: &mut HeaderMap) {
    match headers.entry(header::VIA) {
        Entry::Vacant(slot) => {
            slot.insert(HeaderValue::from_static(VIA));
        }
        Entry::Occupied(mut slot) => {
            let existing = slot.get().as_bytes();
            let combined = if existing.is_empty() {
                Ok(HeaderValue::from_static(VIA))
            } else {
                HeaderValue::from_bytes(&[existing, b", ", VIA.as_bytes()].concat())
            };
            if let Ok(value) = combined {
                slot.insert(value);
            }
        }
    }
}

/// What `Max-Forwards` (RFC 9110 §7.6.2) makes of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Forward it (a positive `Max-Forwards` has been decremented).
    Forward,
    /// `Max-Forwards: 0`: this proxy is the final recipient and answers.
    Answer,
}

/// Applies `Max-Forwards` to an `OPTIONS` request about to be forwarded:
/// zero means cutover answers it, a positive value goes on decremented, and
/// anything but one plain decimal is refused. The field is defined for
/// `OPTIONS` and `TRACE` only and a recipient may ignore it on other methods,
/// so it passes through them unchanged (cutover never forwards `TRACE`).
pub fn max_forwards_hop(method: &Method, headers: &mut HeaderMap) -> Result<Hop, &'static str> {
    const INVALID: &str = "invalid Max-Forwards";
    if method != Method::OPTIONS {
        return Ok(Hop::Forward);
    }
    let mut values = headers.get_all(header::MAX_FORWARDS).iter();
    let Some(value) = values.next() else {
        return Ok(Hop::Forward);
    };
    if values.next().is_some() {
        return Err(INVALID);
    }
    let digits = value.as_bytes();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(INVALID);
    }
    // All digits: only an overflow fails, and a count that large is as good
    // as unlimited.
    let remaining = std::str::from_utf8(digits)
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    if remaining == 0 {
        return Ok(Hop::Answer);
    }
    headers.insert(header::MAX_FORWARDS, HeaderValue::from(remaining - 1));
    Ok(Hop::Forward)
}

/// HTTP/2 clients may split `Cookie` into several fields; an HTTP/1.1
/// upstream must get them as one field joined by "; " (RFC 9113 §8.2.3).
pub fn join_cookies(headers: &mut HeaderMap) {
    let cookies: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if cookies.len() < 2 {
        return;
    }
    let joined = cookies.join(&b"; "[..]);
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        headers
    }

    #[test]
    fn strips_standard_and_connection_named_headers() {
        let mut headers = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("upgrade", "h2c"),
            ("x-kept", "yes"),
        ]);
        let request = HopByHop::of(&headers);
        let crossing: Vec<&str> = headers
            .keys()
            .filter(|name| !request.contains(name))
            .map(HeaderName::as_str)
            .collect();
        assert_eq!(crossing, ["x-kept"], "the request rule");
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers["x-kept"], "yes");
    }

    #[test]
    fn only_websocket_upgrades_are_tunnelled() {
        let ws = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(requested_upgrade(&ws).is_some());
        let h2c = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ]);
        assert!(requested_upgrade(&h2c).is_none());
        let no_connection = map(&[("upgrade", "websocket")]);
        assert!(requested_upgrade(&no_connection).is_none());
    }

    static HOST: HeaderValue = HeaderValue::from_static("example.org");

    fn facts<'a>(
        addr: &str,
        value: &'a HeaderValue,
        forwarded: &'a HeaderValue,
        trusted: &'a [IpNet],
    ) -> ClientFacts<'a> {
        ClientFacts {
            addr: addr.parse().expect("ip"),
            addr_value: value,
            proto: "https",
            host: &HOST,
            forwarded_for_proto: forwarded,
            trusted_proxies: trusted,
        }
    }

    /// What the upstream receives of `client` besides Host and framing:
    /// the client's fields this hop does not replace, then its own.
    fn forwarded_view(client: &HeaderMap, facts: &ClientFacts<'_>) -> HeaderMap {
        let fields = forwarding_fields(client, facts);
        let mut view = HeaderMap::new();
        for (name, value) in client.iter().filter(|(name, _)| !fields.replaces(name)) {
            view.append(name.clone(), value.clone());
        }
        for (name, value) in fields.iter() {
            view.append(name.clone(), value.clone());
        }
        view
    }

    /// The header values a connection from `addr` prepares.
    fn prepared(addr: &str) -> (HeaderValue, HeaderValue) {
        let ip: IpAddr = addr.parse().expect("ip");
        (
            HeaderValue::from_str(addr).expect("value"),
            forwarded_for_proto(ip, "https"),
        )
    }

    #[test]
    fn untrusted_client_values_are_replaced() {
        let client = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
            ("x-forwarded-proto", "gopher"),
            ("forwarded", "for=203.0.113.7;proto=https"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        let (addr, forwarded) = prepared("10.0.0.7");
        let headers = forwarded_view(&client, &facts("10.0.0.7", &addr, &forwarded, &[]));
        assert_eq!(headers["x-forwarded-for"], "10.0.0.7");
        assert_eq!(headers["x-real-ip"], "10.0.0.7");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["x-forwarded-host"], "example.org");
        assert_eq!(headers["via"], VIA);
        let forwarded: Vec<_> = headers.get_all("forwarded").iter().collect();
        assert_eq!(
            forwarded,
            ["for=10.0.0.7;proto=https;host=example.org"],
            "the client's Forwarded fields are replaced by ours"
        );
    }

    #[test]
    fn trusted_proxy_values_are_extended() {
        let trusted = ["10.0.0.0/8".parse().expect("net")];
        let client = map(&[
            ("x-real-ip", "1.2.3.4"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("via", "1.1 lb"),
            ("forwarded", "for=1.2.3.4"),
            ("forwarded", "for=5.6.7.8;proto=http"),
        ]);
        let (addr, forwarded) = prepared("10.0.0.7");
        let headers = forwarded_view(&client, &facts("10.0.0.7", &addr, &forwarded, &trusted));
        assert_eq!(headers["x-forwarded-for"], "1.2.3.4, 5.6.7.8, 10.0.0.7");
        assert_eq!(headers.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(headers["x-real-ip"], "1.2.3.4", "a trusted proxy's is kept");
        assert_eq!(headers["x-forwarded-proto"], "https", "added when missing");
        assert_eq!(headers["via"], "1.1 lb, 1.1 cutover");
        let forwarded: Vec<_> = headers.get_all("forwarded").iter().collect();
        assert_eq!(
            forwarded,
            ["for=1.2.3.4, for=5.6.7.8;proto=http, for=10.0.0.7;proto=https;host=example.org"]
        );
    }

    #[test]
    fn forwarded_quotes_ipv6_and_hosts_with_ports() {
        let (addr, forwarded) = prepared("2001:db8::1");
        assert_eq!(forwarded, "for=\"[2001:db8::1]\";proto=https");
        let host = HeaderValue::from_static("example.org:8443");
        let facts = ClientFacts {
            host: &host,
            ..facts("2001:db8::1", &addr, &forwarded, &[])
        };
        let headers = forwarded_view(&HeaderMap::new(), &facts);
        assert_eq!(
            headers["forwarded"],
            "for=\"[2001:db8::1]\";proto=https;host=\"example.org:8443\""
        );
        let odd = HeaderValue::from_static("a\"b\\c");
        let element = forwarded_element(&ClientFacts {
            host: &odd,
            ..facts.clone()
        });
        assert_eq!(
            element,
            "for=\"[2001:db8::1]\";proto=https;host=\"a\\\"b\\\\c\""
        );
        let none = HeaderValue::from_static("");
        let element = forwarded_element(&ClientFacts {
            host: &none,
            ..facts
        });
        assert_eq!(element, "for=\"[2001:db8::1]\";proto=https");
    }

    #[test]
    fn cookies_are_joined() {
        let mut headers = map(&[("cookie", "a=1"), ("cookie", "b=2")]);
        join_cookies(&mut headers);
        assert_eq!(headers.get_all("cookie").iter().count(), 1);
        assert_eq!(headers["cookie"], "a=1; b=2");
    }

    #[test]
    fn max_forwards_is_decremented_and_answered_at_zero() {
        let hop = |method: Method, values: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(
                    header::MAX_FORWARDS,
                    HeaderValue::from_str(value).expect("value"),
                );
            }
            let hop = max_forwards_hop(&method, &mut headers);
            let left: Vec<_> = headers
                .get_all(header::MAX_FORWARDS)
                .iter()
                .map(|v| v.to_str().expect("ascii").to_string())
                .collect();
            (hop, left)
        };
        assert_eq!(hop(Method::OPTIONS, &[]), (Ok(Hop::Forward), vec![]));
        assert_eq!(hop(Method::OPTIONS, &["0"]).0, Ok(Hop::Answer));
        assert_eq!(hop(Method::OPTIONS, &["00"]).0, Ok(Hop::Answer));
        assert_eq!(
            hop(Method::OPTIONS, &["1"]),
            (Ok(Hop::Forward), vec!["0".to_string()])
        );
        assert_eq!(
            hop(Method::OPTIONS, &["10"]),
            (Ok(Hop::Forward), vec!["9".to_string()])
        );
        let huge = "99999999999999999999999";
        assert_eq!(
            hop(Method::OPTIONS, &[huge]),
            (Ok(Hop::Forward), vec![(u64::MAX - 1).to_string()])
        );
        for invalid in [
            &["-1"][..],
            &["abc"],
            &[""],
            &["1 "],
            &["+1"],
            &["1, 2"],
            &["1", "1"],
        ] {
            assert!(hop(Method::OPTIONS, invalid).0.is_err(), "{invalid:?}");
        }
        // Other methods: passed on untouched, whatever the value.
        assert_eq!(
            hop(Method::GET, &["0"]),
            (Ok(Hop::Forward), vec!["0".to_string()])
        );
        assert_eq!(
            hop(Method::POST, &["junk"]),
            (Ok(Hop::Forward), vec!["junk".to_string()])
        );
    }
}
