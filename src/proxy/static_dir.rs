//! The `dir` route: files under one directory, served as they are. It is
//! there for `certbot --webroot -w DIR`, which writes its challenge tokens
//! into `DIR/.well-known/acme-challenge/` and expects port 80 to serve them,
//! but it serves any static tree. As with nginx's `root`, the whole request
//! path is looked up under the directory: a route `path =
//! "/.well-known/acme-challenge/"` with `dir = "/var/www/certbot"` serves
//! `/var/www/certbot/.well-known/acme-challenge/TOKEN`.
//!
//! What a request can reach is exactly the regular files below the root:
//! GET and HEAD only; no directory listings (nor index files); the path is
//! percent-decoded once, segment by segment, and a segment that decodes to
//! `.` or `..`, or holds a `/`, a `\` or a NUL, is refused; and the file's
//! real path (symlinks resolved) must still lie under the root's real path,
//! so a symlink cannot lead out of it.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use http::header::{self, HeaderValue};
use http::{Method, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};

use crate::io::body::{self, ProxyBody};
use crate::proxy::request::{content_type, ProxyError, STATIC_METHODS};

/// Serves the file that `path` (the request path, still percent-encoded)
/// names below `root`.
pub async fn serve(
    root: &Path,
    path: &str,
    method: &Method,
) -> Result<Response<ProxyBody>, ProxyError> {
    if method != Method::GET && method != Method::HEAD {
        return Err(ProxyError::MethodNotAllowed(STATIC_METHODS));
    }
    let relative = relative_path(path)?;
    let file = resolve_below(root, &relative).await?;
    let opened = tokio::fs::File::open(&file).await.map_err(not_found)?;
    let metadata = opened.metadata().await.map_err(not_found)?;
    if !metadata.is_file() {
        return Err(ProxyError::File("not a regular file".into()));
    }
    let body = if method == Method::HEAD {
        body::empty()
    } else {
        let frames = tokio_util::io::ReaderStream::new(opened)
            .map_ok(Frame::data)
            .map_err(Into::into);
        StreamBody::new(frames).boxed_unsync()
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&content_type(&file)) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(metadata.len()));
    Ok(response)
}

/// The request path as a relative path of decoded segments.
fn relative_path(path: &str) -> Result<PathBuf, ProxyError> {
    let rest = path.strip_prefix('/').unwrap_or(path);
    if rest.is_empty() || rest.ends_with('/') {
        return Err(ProxyError::File("directory listing is not served".into()));
    }
    let mut relative = PathBuf::new();
    for segment in rest.split('/') {
        let decoded = percent_decode(segment)?;
        let refused = decoded.is_empty()
            || decoded == b"."
            || decoded == b".."
            || decoded.iter().any(|b| matches!(b, b'/' | b'\\'));
        if refused {
            return Err(ProxyError::File(format!(
                "path segment {segment:?} is not served"
            )));
        }
        relative.push(OsStr::from_bytes(&decoded));
    }
    Ok(relative)
}

/// `root/relative` with every symlink resolved, if it exists and lies
/// under the root's own resolved path.
async fn resolve_below(root: &Path, relative: &Path) -> Result<PathBuf, ProxyError> {
    let real_root = tokio::fs::canonicalize(root).await.map_err(|err| {
        tracing::warn!(dir = %root.display(), error = %err, "dir route root unavailable");
        not_found(err)
    })?;
    let real = tokio::fs::canonicalize(real_root.join(relative))
        .await
        .map_err(not_found)?;
    if real.starts_with(&real_root) {
        Ok(real)
    } else {
        tracing::warn!(dir = %root.display(), path = %relative.display(), "refused: resolves outside the dir route's root");
        Err(ProxyError::File("outside the root".into()))
    }
}

fn not_found(err: std::io::Error) -> ProxyError {
    ProxyError::File(err.to_string())
}

/// Decodes `%XX` escapes once. A malformed escape or an encoded NUL is a
/// bad request.
fn percent_decode(segment: &str) -> Result<Vec<u8>, ProxyError> {
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|pair| std::str::from_utf8(pair).ok())
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or(ProxyError::BadRequest("malformed percent-encoding in path"))?;
            decoded.push(hex);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    if decoded.contains(&0) {
        return Err(ProxyError::BadRequest("NUL in path"));
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_and_refused_segments() {
        let ok = relative_path;
        assert_eq!(
            ok("/.well-known/acme-challenge/tok%2Den").expect("plain token"),
            PathBuf::from(".well-known/acme-challenge/tok-en")
        );
        assert_eq!(
            ok("/static/a/b.txt").expect("nested"),
            PathBuf::from("static/a/b.txt")
        );
        for refused in [
            "/.well-known/acme-challenge/",
            "/.well-known/acme-challenge/a/",
            "/.well-known/acme-challenge/../x",
            "/.well-known/acme-challenge/%2e%2e/x",
            "/.well-known/acme-challenge/%2E%2E/x",
            "/.well-known/acme-challenge/.%2e/x",
            "/.well-known/acme-challenge/a%2Fb",
            "/.well-known/acme-challenge/a%2fb",
            "/.well-known/acme-challenge/a%5cb",
            "/.well-known/acme-challenge/a//b",
            "/.well-known/acme-challenge/./a",
        ] {
            assert!(
                matches!(ok(refused), Err(ProxyError::File(_))),
                "{refused} must be refused"
            );
        }
        for bad in [
            "/.well-known/acme-challenge/a%00b",
            "/.well-known/acme-challenge/a%zz",
            "/.well-known/acme-challenge/a%2",
        ] {
            assert!(
                matches!(ok(bad), Err(ProxyError::BadRequest(_))),
                "{bad} is a bad request"
            );
        }
    }
}
