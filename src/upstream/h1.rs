//! HTTP/1.1 framing toward upstreams: the request head cutover writes and
//! the response head and body framing it accepts.
//!
//! This is the one place where cutover owns HTTP framing (the client side
//! stays on hyper). Heads are parsed by `httparse`, the parser hyper itself
//! uses; what is decided here is which responses are trusted and how their
//! bodies end (RFC 9112 §6.3):
//!
//! * no body for `HEAD`, `204` and `304` whatever the head says;
//! * `Transfer-Encoding: chunked` (alone: no other coding) frames by chunks;
//! * `Content-Length` frames by length; duplicates must agree;
//! * neither: the body runs to the connection's close (never reused);
//! * both, disagreeing lengths, another transfer coding, obs-fold, control
//!   bytes in a field, or an oversized head: refused (502), the connection
//!   closed, as nginx does ("upstream sent invalid header").
//!
//! Kept free of I/O so every rule is unit-tested on bytes; the table-driven
//! tests against a raw TCP upstream are in `tests/upstream_framing.rs`.

use std::io::Write as _;
use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

/// Largest response head accepted (status line and fields), like nginx's
/// `proxy_buffer_size` (4-8 KiB) with room for big cookies.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Most header fields in one response head or trailer section.
const MAX_FIELDS: usize = 128;

/// Longest chunk-size line (size, extensions and CRLF).
const MAX_CHUNK_LINE: usize = 4096;

/// A response the upstream sent that cutover refuses to relay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("invalid response head: {0}")]
    Head(&'static str),
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("upstream sent both Content-Length and Transfer-Encoding")]
    LengthAndChunked,
    #[error("upstream sent conflicting or invalid Content-Length values")]
    BadLength,
    #[error("upstream sent an unsupported Transfer-Encoding")]
    BadTransferEncoding,
    #[error("upstream switched protocols without being asked")]
    UnaskedSwitch,
    #[error("invalid chunked body: {0}")]
    Chunk(&'static str),
}

/// How a request body is framed on the way up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body (nothing written after the head).
    Empty,
    /// The head carries `Content-Length: n`; exactly n bytes follow.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Chooses the request body framing. A `Content-Length` the client sent
/// (already validated by hyper, or enforced by the HTTP/2 length check) is
/// kept; a body of unknown length goes chunked.
pub fn request_framing(
    headers: &HeaderMap,
    body_empty: bool,
    exact: Option<u64>,
) -> RequestFraming {
    if let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse().ok())
    {
        return RequestFraming::Length(length);
    }
    match (body_empty, exact) {
        (true, _) => RequestFraming::Empty,
        (false, Some(length)) => RequestFraming::Length(length),
        (false, None) => RequestFraming::Chunked,
    }
}

/// Serialises a request head into one buffer, written in one write.
/// `fields` are what the forwarding rules let through and add, in order;
/// the framing header is written here (any `Content-Length` or
/// `Transfer-Encoding` among `fields` is left out).
pub fn encode_request_head<'a>(
    method: &Method,
    target: &str,
    fields: impl IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    framing: RequestFraming,
) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in fields {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::Length(length) => {
            // Writing to a Vec cannot fail; no String is built on the way.
            let _ = write!(head, "content-length: {length}\r\n");
        }
        RequestFraming::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        // Methods whose requests normally carry content say "none" out
        // loud, as hyper and curl do: some servers wait for a body otherwise.
        RequestFraming::Empty if expects_content(method) => {
            head.extend_from_slice(b"content-length: 0\r\n");
        }
        RequestFraming::Empty => {}
    }
    head.extend_from_slice(b"\r\n");
    head
}

fn expects_content(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// Appends the frame prefix of one request body chunk (`{size:x}\r\n`)
/// to `framed`, with no allocation of its own.
pub fn push_chunk_prefix(framed: &mut Vec<u8>, size: usize) {
    // Writing to a Vec cannot fail.
    let _ = write!(framed, "{size:x}\r\n");
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// HTTP/1.1 without `Connection: close`: the connection may carry
    /// another request once this response's body has ended.
    pub keep_alive: bool,
    /// What the framing fields said, noted while the head was parsed so
    /// [`response_framing`] looks nothing up again.
    framing: FramingFields,
}

/// The framing fields of a response head, read in the parsing pass.
#[derive(Debug, Clone, Copy, Default)]
struct FramingFields {
    /// The number every `Content-Length` value (comma lists included)
    /// agreed on, if there was one.
    length: Option<u64>,
    /// Some `Content-Length` values disagreed, or one was not a decimal
    /// number.
    bad_length: bool,
    /// Transfer codings listed over all `Transfer-Encoding` fields.
    codings: usize,
    /// Whether the first of them was `chunked`.
    first_chunked: bool,
    /// A `Connection` field lists `close`.
    close: bool,
}

impl FramingFields {
    fn note(&mut self, name: &HeaderName, value: &[u8]) {
        if name == header::CONTENT_LENGTH {
            self.note_length(value);
        } else if name == header::TRANSFER_ENCODING {
            for coding in value.split(|byte| *byte == b',').map(<[u8]>::trim_ascii) {
                self.first_chunked |= self.codings == 0 && coding.eq_ignore_ascii_case(b"chunked");
                self.codings += 1;
            }
        } else if name == header::CONNECTION {
            self.close |= value
                .split(|byte| *byte == b',')
                .any(|option| option.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }

    /// Every `Content-Length` value (in every field, comma lists included)
    /// must be the same decimal number.
    fn note_length(&mut self, value: &[u8]) {
        for item in value.split(|byte| *byte == b',') {
            match parse_decimal(item.trim_ascii()) {
                Some(length) if self.length.is_none_or(|seen| seen == length) => {
                    self.length = Some(length);
                }
                _ => self.bad_length = true,
            }
        }
    }
}

/// Parses one response head from the front of `buf`. `Ok(None)`: more
/// bytes are needed. On success the head's bytes are taken off `buf`.
pub fn parse_response_head(buf: &mut BytesMut) -> Result<Option<ResponseHead>, FramingError> {
    // Left uninitialised: httparse fills only the fields it finds, and
    // zeroing 128 of them (4 KiB) cost more than parsing a small head.
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(FramingError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(FramingError::Head("too many fields")),
        Err(err) => return Err(FramingError::Head(parse_error(err))),
    };
    if parsed > MAX_HEAD_BYTES {
        return Err(FramingError::HeadTooLarge);
    }
    let code = response.code.ok_or(FramingError::Head("no status"))?;
    let status = StatusCode::from_u16(code).map_err(|_| FramingError::Head("invalid status"))?;
    let http11 = response.version == Some(1);
    let field_count = response.headers.len();
    let mut framing = FramingFields::default();
    // The head's bytes become one shared buffer the field values point into.
    let offsets: Vec<(HeaderName, usize, usize)> = response
        .headers
        .iter()
        .map(|field| {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| FramingError::Head("invalid field name"))?;
            framing.note(&name, field.value);
            let start = field.value.as_ptr() as usize - buf.as_ptr() as usize;
            Ok((name, start, start + field.value.len()))
        })
        .collect::<Result<_, FramingError>>()?;
    let head = buf.split_to(parsed).freeze();
    // One more than the fields: the `Via` the proxy adds on the way out
    // then fits without regrowing the map.
    let mut headers = HeaderMap::with_capacity(field_count + 1);
    for (name, start, end) in offsets {
        let value = HeaderValue::from_maybe_shared(head.slice(start..end))
            .map_err(|_| FramingError::Head("invalid field value"))?;
        headers.append(name, value);
    }
    Ok(Some(ResponseHead {
        status,
        headers,
        keep_alive: http11 && !framing.close,
        framing,
    }))
}

fn parse_error(err: httparse::Error) -> &'static str {
    match err {
        httparse::Error::HeaderName => "invalid field name",
        httparse::Error::HeaderValue => "invalid field value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::Version => "invalid version",
        httparse::Error::TooManyHeaders => "too many fields",
    }
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    UntilClose,
}

/// Decides how the body of a final (non-1xx) response is framed.
pub fn response_framing(
    request_method: &Method,
    head: &ResponseHead,
) -> Result<BodyFraming, FramingError> {
    if head.status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(FramingError::UnaskedSwitch);
    }
    let bodiless = *request_method == Method::HEAD
        || head.status == StatusCode::NO_CONTENT
        || head.status == StatusCode::NOT_MODIFIED;
    let chunked = head.framing.codings > 0;
    if head.framing.bad_length {
        return Err(FramingError::BadLength);
    }
    let length = head.framing.length;
    if chunked && length.is_some() {
        return Err(FramingError::LengthAndChunked);
    }
    if bodiless {
        return Ok(BodyFraming::Empty);
    }
    if chunked {
        // Exactly one coding, and that one `chunked`.
        return match (head.framing.codings, head.framing.first_chunked) {
            (1, true) => Ok(BodyFraming::Chunked),
            _ => Err(FramingError::BadTransferEncoding),
        };
    }
    Ok(match length {
        Some(0) => BodyFraming::Empty,
        Some(length) => BodyFraming::Length(length),
        None => BodyFraming::UntilClose,
    })
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Where a chunked body decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data: this many bytes left.
    Data(u64),
    /// After a chunk's data: expecting CRLF.
    DataEnd,
    /// After the last chunk: expecting the trailer section.
    Trailers,
    Done,
}

/// One step of chunked decoding over the buffered bytes.
#[derive(Debug, PartialEq)]
pub enum ChunkStep {
    /// Body bytes.
    Data(Bytes),
    /// The trailer section (the body has ended).
    Trailers(HeaderMap),
    /// The body has ended without trailers.
    End,
    /// More bytes are needed.
    NeedMore,
}

/// Decodes what it can of a chunked body from `buf`, advancing `state`.
pub fn decode_chunked(
    state: &mut ChunkState,
    buf: &mut BytesMut,
) -> Result<ChunkStep, FramingError> {
    loop {
        match *state {
            ChunkState::Size => {
                let Some(line_end) = find_crlf(buf) else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err(FramingError::Chunk("chunk-size line too long"));
                    }
                    return Ok(ChunkStep::NeedMore);
                };
                let size = parse_chunk_size(&buf[..line_end])?;
                buf.advance(line_end + 2);
                *state = match size {
                    0 => ChunkState::Trailers,
                    size => ChunkState::Data(size),
                };
            }
            ChunkState::Data(left) => {
                if buf.is_empty() {
                    return Ok(ChunkStep::NeedMore);
                }
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let data = buf.split_to(take).freeze();
                let left = left - take as u64;
                *state = if left == 0 {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data(left)
                };
                return Ok(ChunkStep::Data(data));
            }
            ChunkState::DataEnd => {
                if buf.len() < 2 {
                    return Ok(ChunkStep::NeedMore);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(FramingError::Chunk("chunk data not followed by CRLF"));
                }
                buf.advance(2);
                *state = ChunkState::Size;
            }
            ChunkState::Trailers => return decode_trailers(state, buf),
            ChunkState::Done => return Ok(ChunkStep::End),
        }
    }
}

fn decode_trailers(state: &mut ChunkState, buf: &mut BytesMut) -> Result<ChunkStep, FramingError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let (length, parsed) = match httparse::parse_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(done)) => done,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(FramingError::Chunk("trailer section too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(ChunkStep::NeedMore),
        Err(_) => return Err(FramingError::Chunk("invalid trailer field")),
    };
    let mut trailers = HeaderMap::with_capacity(parsed.len());
    for field in parsed {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| FramingError::Chunk("invalid trailer field"))?;
        // Framing and routing fields never arrive as trailers (RFC 9110
        // §6.5.1): dropped rather than relayed.
        if is_forbidden_trailer(&name) {
            continue;
        }
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| FramingError::Chunk("invalid trailer field"))?;
        trailers.append(name, value);
    }
    buf.advance(length);
    *state = ChunkState::Done;
    Ok(if trailers.is_empty() {
        ChunkStep::End
    } else {
        ChunkStep::Trailers(trailers)
    })
}

fn is_forbidden_trailer(name: &HeaderName) -> bool {
    [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::HOST,
        header::CONNECTION,
        header::TRAILER,
        header::CONTENT_TYPE,
        header::CONTENT_ENCODING,
        header::SET_COOKIE,
    ]
    .contains(name)
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|pair| pair == b"\r\n")
}

/// `1*HEXDIG [ BWS ";" chunk-ext ]`: the size, extensions ignored.
fn parse_chunk_size(line: &[u8]) -> Result<u64, FramingError> {
    let digits_end = line
        .iter()
        .position(|byte| !byte.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(digits_end);
    if digits.is_empty() {
        return Err(FramingError::Chunk("missing chunk size"));
    }
    if digits.len() > 15 {
        return Err(FramingError::Chunk("chunk size too large"));
    }
    let rest = rest.trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err(FramingError::Chunk("invalid chunk size"));
    }
    if rest
        .iter()
        .any(|byte| *byte == b'\r' || *byte == b'\n' || *byte == 0)
    {
        return Err(FramingError::Chunk("invalid chunk extension"));
    }
    let text =
        std::str::from_utf8(digits).map_err(|_| FramingError::Chunk("invalid chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| FramingError::Chunk("invalid chunk size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &str) -> Result<Option<ResponseHead>, FramingError> {
        parse_response_head(&mut BytesMut::from(bytes))
    }

    fn framing(method: Method, bytes: &str) -> Result<BodyFraming, FramingError> {
        let head = head(bytes)?.expect("complete head");
        response_framing(&method, &head)
    }

    #[test]
    fn request_head_is_one_buffer_with_its_framing() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("app.test"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        let head = encode_request_head(&Method::POST, "/a?b", &headers, RequestFraming::Length(5));
        assert_eq!(
            String::from_utf8(head).expect("ascii"),
            "POST /a?b HTTP/1.1\r\nhost: app.test\r\ncontent-length: 5\r\n\r\n"
        );
        let head = encode_request_head(&Method::PUT, "/", &HeaderMap::new(), RequestFraming::Empty);
        assert!(head.ends_with(b"content-length: 0\r\n\r\n"));
        let head = encode_request_head(&Method::GET, "/", &HeaderMap::new(), RequestFraming::Empty);
        assert_eq!(head, b"GET / HTTP/1.1\r\n\r\n");
        let head = encode_request_head(
            &Method::POST,
            "/",
            &HeaderMap::new(),
            RequestFraming::Chunked,
        );
        assert!(head.ends_with(b"transfer-encoding: chunked\r\n\r\n"));
    }

    #[test]
    fn request_framing_keeps_a_declared_length_else_chunks() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            request_framing(&headers, true, Some(0)),
            RequestFraming::Empty
        );
        assert_eq!(
            request_framing(&headers, false, Some(3)),
            RequestFraming::Length(3)
        );
        assert_eq!(
            request_framing(&headers, false, None),
            RequestFraming::Chunked
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("7"));
        assert_eq!(
            request_framing(&headers, false, None),
            RequestFraming::Length(7)
        );
    }

    #[test]
    fn response_framing_rules() {
        use BodyFraming::*;
        let ok = "HTTP/1.1 200 OK\r\n";
        assert_eq!(
            framing(Method::GET, &format!("{ok}content-length: 5\r\n\r\n")),
            Ok(Length(5))
        );
        assert_eq!(
            framing(
                Method::GET,
                &format!("{ok}content-length: 5\r\ncontent-length: 5\r\n\r\n")
            ),
            Ok(Length(5))
        );
        assert_eq!(
            framing(Method::GET, &format!("{ok}content-length: 5, 5\r\n\r\n")),
            Ok(Length(5))
        );
        assert_eq!(
            framing(
                Method::GET,
                &format!("{ok}content-length: 5\r\ncontent-length: 6\r\n\r\n")
            ),
            Err(FramingError::BadLength)
        );
        assert_eq!(
            framing(Method::GET, &format!("{ok}content-length: 5, 6\r\n\r\n")),
            Err(FramingError::BadLength)
        );
        assert_eq!(
            framing(Method::GET, &format!("{ok}content-length: +5\r\n\r\n")),
            Err(FramingError::BadLength)
        );
        assert_eq!(
            framing(
                Method::GET,
                &format!("{ok}content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n")
            ),
            Err(FramingError::LengthAndChunked)
        );
        assert_eq!(
            framing(
                Method::GET,
                &format!("{ok}transfer-encoding: Chunked\r\n\r\n")
            ),
            Ok(Chunked)
        );
        assert_eq!(
            framing(
                Method::GET,
                &format!("{ok}transfer-encoding: gzip, chunked\r\n\r\n")
            ),
            Err(FramingError::BadTransferEncoding)
        );
        assert_eq!(framing(Method::GET, &format!("{ok}\r\n")), Ok(UntilClose));
        assert_eq!(
            framing(Method::HEAD, &format!("{ok}content-length: 5\r\n\r\n")),
            Ok(Empty)
        );
        assert_eq!(
            framing(Method::GET, "HTTP/1.1 204 No Content\r\n\r\n"),
            Ok(Empty)
        );
        assert_eq!(
            framing(
                Method::GET,
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n"
            ),
            Ok(Empty)
        );
        assert_eq!(
            framing(Method::GET, "HTTP/1.1 101 Switching Protocols\r\n\r\n"),
            Err(FramingError::UnaskedSwitch)
        );
    }

    #[test]
    fn malformed_heads_are_refused() {
        assert!(
            head("HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n").is_err(),
            "obs-fold"
        );
        assert!(head("HTTP/1.1 200 OK\r\nx: a\0b\r\n\r\n").is_err(), "NUL");
        assert!(
            head("HTTP/1.1 200 OK\r\nx: a\rb\r\n\r\n").is_err(),
            "bare CR"
        );
        assert!(
            head("HTTP/1.1 200 OK\r\nx y: a\r\n\r\n").is_err(),
            "space in name"
        );
        assert!(head("HTTP/1.1 2000 OK\r\n\r\n").is_err());
        assert!(
            matches!(head("HTTP/1.1 200 OK\r\nx: a\r\n"), Ok(None)),
            "partial"
        );
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(head(&huge).err(), Some(FramingError::HeadTooLarge));
    }

    #[test]
    fn keep_alive_needs_http11_without_close() {
        let keep = |text: &str| head(text).expect("ok").expect("complete").keep_alive;
        assert!(keep("HTTP/1.1 200 OK\r\n\r\n"));
        assert!(!keep("HTTP/1.1 200 OK\r\nconnection: Close\r\n\r\n"));
        assert!(!keep("HTTP/1.0 200 OK\r\n\r\n"));
    }

    #[test]
    fn head_bytes_are_taken_and_the_rest_kept() {
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\nx-a: 1\r\n\r\nbody");
        let head = parse_response_head(&mut buf)
            .expect("ok")
            .expect("complete");
        assert_eq!(head.headers["x-a"], "1");
        assert_eq!(&buf[..], b"body");
    }

    fn decode_all(input: &str) -> Result<(Vec<u8>, Option<HeaderMap>, bool), FramingError> {
        let mut buf = BytesMut::from(input);
        let mut state = ChunkState::Size;
        let mut data = Vec::new();
        loop {
            match decode_chunked(&mut state, &mut buf)? {
                ChunkStep::Data(bytes) => data.extend_from_slice(&bytes),
                ChunkStep::Trailers(trailers) => return Ok((data, Some(trailers), true)),
                ChunkStep::End => return Ok((data, None, true)),
                ChunkStep::NeedMore => return Ok((data, None, false)),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let (data, trailers, done) =
            decode_all("5;ext=1\r\nhello\r\n6 ; a\r\n world\r\n0\r\n\r\n").expect("ok");
        assert_eq!(data, b"hello world");
        assert!(done && trailers.is_none());
        let (data, trailers, done) = decode_all("3\r\nabc\r\n0\r\nx-sum: 9\r\n\r\n").expect("ok");
        assert_eq!(data, b"abc");
        assert!(done);
        assert_eq!(trailers.expect("trailers")["x-sum"], "9");
        let (data, _, done) = decode_all("A\r\n0123").expect("ok");
        assert_eq!(data, b"0123");
        assert!(!done, "needs more");
    }

    #[test]
    fn bad_chunks_are_errors() {
        assert!(decode_all("z\r\n").is_err());
        assert!(decode_all("-1\r\n").is_err());
        assert!(decode_all("3\r\nabcX\r\n").is_err());
        assert!(decode_all("1000000000000000\r\n").is_err());
        assert!(decode_all(&"1".repeat(MAX_CHUNK_LINE + 1)).is_err());
    }
}
