//! Request checks that hyper's parser leaves to us, run before routing.
//!
//! hyper (httparse for HTTP/1, the h2 crate for HTTP/2) already refuses
//! most malformed requests before cutover sees them: bad request lines,
//! obs-fold, whitespace before a colon, control bytes in headers, invalid
//! or conflicting Content-Length, unknown Transfer-Encoding, bad chunk sizes
//! (as a body error), HTTP/2 connection-specific headers and bad
//! pseudo-headers. What is left is policy, and the HTTP/2 field rules the
//! h2 crate does not enforce: how long a request target may be, that an
//! HTTP/2 request's framing header cannot turn into two conflicting lengths
//! once it is re-sent as HTTP/1.1, and that an HTTP/2 field value has no
//! leading or trailing whitespace. Host rules live with the routing in
//! `proxy::request_authority`.
//!
//! Nothing here parses bytes: it reads the `http::Request` hyper built.

use http::{header, HeaderValue, Request, Version};

use crate::config::Limits;

/// Why a request is refused before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("request target longer than {0} bytes")]
    UriTooLong(usize),
    #[error("more than one Content-Length")]
    DuplicateContentLength,
    #[error("Content-Length is not a decimal number")]
    InvalidContentLength,
    #[error("HTTP/2 field value with leading or trailing whitespace")]
    PaddedFieldValue,
}

/// Checks one request against the limits; the first violation wins.
pub fn check_request<B>(req: &Request<B>, limits: &Limits) -> Result<(), Violation> {
    check_target_length(req, limits.max_uri_bytes)?;
    check_content_length(req)?;
    check_field_whitespace(req)
}

/// The request target as the client sent it (origin-form path and query,
/// or the whole absolute-form URI), so both forms share one limit.
fn check_target_length<B>(req: &Request<B>, max: usize) -> Result<(), Violation> {
    let uri = req.uri();
    let length = match uri.authority() {
        Some(_) => uri.to_string().len(),
        None => uri.path_and_query().map_or(0, |pq| pq.as_str().len()),
    };
    if length > max {
        return Err(Violation::UriTooLong(max));
    }
    Ok(())
}

/// hyper's HTTP/1 parser collapses equal duplicates and refuses anything
/// else, but an HTTP/2 request can carry several `content-length` fields
/// (the h2 crate validates only the first). Forwarded as HTTP/1.1, two
/// lengths are the classic desync, so exactly one plain decimal is allowed.
fn check_content_length<B>(req: &Request<B>) -> Result<(), Violation> {
    let mut values = req.headers().get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return Ok(());
    };
    if values.next().is_some() {
        return Err(Violation::DuplicateContentLength);
    }
    let digits = first.as_bytes();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(Violation::InvalidContentLength);
    }
    Ok(())
}

/// RFC 9113 §8.2.1: an HTTP/2 field value that starts or ends with a space
/// or tab makes the request malformed, and a malformed request must not be
/// forwarded. (HTTP/1.1 allows such whitespace around a value and httparse
/// strips it, so only HTTP/2 values can carry it.) The h2 crate checks
/// values for NUL, CR and LF but not for this.
fn check_field_whitespace<B>(req: &Request<B>) -> Result<(), Violation> {
    if req.version() != Version::HTTP_2 {
        return Ok(());
    }
    if req.headers().values().any(is_padded) {
        return Err(Violation::PaddedFieldValue);
    }
    Ok(())
}

fn is_padded(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    let blank = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
    blank(bytes.first()) || blank(bytes.last())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_uri_bytes: usize) -> Limits {
        Limits {
            max_uri_bytes,
            ..Limits::default()
        }
    }

    fn get(uri: &str) -> Request<()> {
        Request::builder().uri(uri).body(()).expect("request")
    }

    #[test]
    fn target_length_counts_path_and_query() {
        assert_eq!(check_request(&get("/abc?d=e"), &limits(8)), Ok(()));
        assert_eq!(
            check_request(&get("/abc?d=ef"), &limits(8)),
            Err(Violation::UriTooLong(8))
        );
    }

    #[test]
    fn absolute_form_counts_whole_target() {
        let req = get("http://example.org/abc");
        assert_eq!(check_request(&req, &limits(22)), Ok(()));
        assert_eq!(
            check_request(&req, &limits(21)),
            Err(Violation::UriTooLong(21))
        );
    }

    #[test]
    fn content_length_must_be_single_and_decimal() {
        let with = |values: &[&str]| {
            let mut builder = Request::builder().uri("/");
            for value in values {
                builder = builder.header(header::CONTENT_LENGTH, *value);
            }
            check_request(&builder.body(()).expect("request"), &Limits::default())
        };
        assert_eq!(with(&["5"]), Ok(()));
        assert_eq!(with(&["5", "5"]), Err(Violation::DuplicateContentLength));
        assert_eq!(with(&["5, 5"]), Err(Violation::InvalidContentLength));
        assert_eq!(with(&["+5"]), Err(Violation::InvalidContentLength));
        assert_eq!(with(&[""]), Err(Violation::InvalidContentLength));
    }

    #[test]
    fn http2_field_values_must_not_be_padded() {
        let with = |version: Version, value: &'static str| {
            let req = Request::builder()
                .uri("/")
                .version(version)
                .header("x-a", HeaderValue::from_static(value))
                .body(())
                .expect("request");
            check_request(&req, &Limits::default())
        };
        for padded in [" a", "a ", "\ta", "a\t", " ", "\t"] {
            assert_eq!(
                with(Version::HTTP_2, padded),
                Err(Violation::PaddedFieldValue),
                "{padded:?}"
            );
            assert_eq!(with(Version::HTTP_11, padded), Ok(()), "{padded:?}");
        }
        for fine in ["a", "a b", "a\tb", ""] {
            assert_eq!(with(Version::HTTP_2, fine), Ok(()), "{fine:?}");
        }
    }
}
