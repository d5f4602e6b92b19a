//! Malformed HTTP/2 requests the h2 crate lets through, or catches only
//! after the request has started to stream (RFC 9113 §8.1.1): DATA past the
//! declared `content-length`, DATA on a `content-length: 0` request, a
//! stream that ends short of its length; and field values with leading or
//! trailing whitespace (§8.2.1).
//!
//! The client is the `h2` crate, which sends such requests as told (hyper's
//! client would not). The upstream records, per request, how many body bytes
//! it got and whether the request was complete, so a test can wait until
//! the upstream holds everything the proxy relays before the client sends
//! the part that makes the stream malformed: the outcome does not depend on
//! timing.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

const HOST: &str = "app.localhost";

/// What the upstream made of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// The whole body, as framed by the request's Content-Length.
    Complete(Bytes),
    /// The body failed (the connection closed) after this many bytes.
    Incomplete(usize),
}

/// An HTTP/1.1 upstream that reports its progress.
struct Recorder {
    addr: SocketAddr,
    /// Body bytes received by the request in progress.
    received: watch::Receiver<usize>,
    /// Request heads received.
    heads: watch::Receiver<usize>,
    verdicts: Arc<Mutex<Vec<Verdict>>>,
    connections: Arc<Mutex<usize>>,
}

async fn start_recorder() -> Recorder {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (received_tx, received) = watch::channel(0usize);
    let (heads_tx, heads) = watch::channel(0usize);
    let verdicts = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(Mutex::new(0usize));
    let shared = (
        Arc::new(received_tx),
        Arc::new(heads_tx),
        Arc::clone(&verdicts),
        Arc::clone(&connections),
    );
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            *shared.3.lock().expect("lock") += 1;
            let (received, heads, verdicts) = (
                Arc::clone(&shared.0),
                Arc::clone(&shared.1),
                Arc::clone(&shared.2),
            );
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    record(
                        req,
                        Arc::clone(&received),
                        Arc::clone(&heads),
                        Arc::clone(&verdicts),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Recorder {
        addr,
        received,
        heads,
        verdicts,
        connections,
    }
}

async fn record(
    req: Request<Incoming>,
    received: Arc<watch::Sender<usize>>,
    heads: Arc<watch::Sender<usize>>,
    verdicts: Arc<Mutex<Vec<Verdict>>>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    heads.send_modify(|count| *count += 1);
    received.send_replace(0);
    let mut body = req.into_body();
    let mut got = Vec::new();
    let verdict = loop {
        match body.frame().await {
            None => break Verdict::Complete(Bytes::from(got)),
            Some(Err(_)) => break Verdict::Incomplete(got.len()),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    got.extend_from_slice(data);
                    received.send_replace(got.len());
                }
            }
        }
    };
    verdicts.lock().expect("lock").push(verdict);
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

impl Recorder {
    fn verdicts(&self) -> Vec<Verdict> {
        self.verdicts.lock().expect("lock").clone()
    }

    fn connections(&self) -> usize {
        *self.connections.lock().expect("lock")
    }

    /// Waits (bounded) until the request in progress has `bytes` of body.
    async fn wait_received(&mut self, bytes: usize) {
        tokio::time::timeout(IO_TIMEOUT, self.received.wait_for(|got| *got >= bytes))
            .await
            .unwrap_or_else(|_| panic!("the upstream never got {bytes} body bytes"))
            .expect("recorder alive");
    }

    /// Waits (bounded) for the verdict on the first request.
    async fn first_verdict(&self) -> Verdict {
        let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(first) = self.verdicts().into_iter().next() {
                return first;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the upstream never finished the request"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether a request head arrives within `wait`.
    async fn head_arrives(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.heads.wait_for(|count| *count > 0))
            .await
            .is_ok()
    }
}

fn config(upstream: SocketAddr) -> String {
    format!(
        r#"
[server]

{TLS_LOCALHOST}

[[site]]
hosts = ["{HOST}"]
service = "app"

[service.app]
upstream = "{upstream}"
"#
    )
}

/// An HTTP/2 connection to the proxy's TLS port (ALPN h2).
async fn h2_client(proxy: &TestProxy) -> h2::client::SendRequest<Bytes> {
    let tls = tls_connect(proxy.https(), HOST, &[b"h2"]).await;
    let (client, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Opens a POST stream declaring `content-length` and leaves it open.
async fn open_post(
    client: &mut h2::client::SendRequest<Bytes>,
    content_length: &str,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let req = Request::builder()
        .method("POST")
        .uri(format!("https://{HOST}/upload"))
        .header("content-length", content_length)
        .body(())
        .expect("request");
    client.clone().ready().await.expect("ready");
    client.send_request(req, false).expect("send request")
}

/// The client's view of a stream the proxy must refuse: a reset, or 400.
async fn assert_refused(response: h2::client::ResponseFuture, case: &str) {
    let outcome = tokio::time::timeout(IO_TIMEOUT, response)
        .await
        .unwrap_or_else(|_| panic!("{case}: no answer"));
    if let Ok(response) = outcome {
        assert_eq!(
            response.status(),
            400,
            "{case}: a malformed stream was answered"
        );
    }
}

#[tokio::test]
async fn data_past_content_length_in_a_later_frame_never_completes_the_upstream_request() {
    let mut upstream = start_recorder().await;
    let proxy = start_proxy(&config(upstream.addr)).await;
    let mut client = h2_client(&proxy).await;
    let (response, mut stream) = open_post(&mut client, "5").await;
    stream
        .send_data(Bytes::from_static(b"hello"), false)
        .expect("data");
    // Everything the proxy relays before the stream's end: at least four
    // bytes, and a proxy that relays the fifth completes the request here.
    upstream.wait_received(4).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // (Fails only if the proxy already answered and closed the stream.)
    let _ = stream.send_data(Bytes::from_static(b"!!"), true);
    assert_eq!(
        upstream.first_verdict().await,
        Verdict::Incomplete(4),
        "the app must never see the malformed request complete"
    );
    assert_refused(response, "excess DATA").await;
    // The aborted upstream connection is not reused.
    let followup = https_h2(
        proxy.https(),
        HOST,
        request("GET", &format!("https://{HOST}/next"), HOST, Bytes::new()),
    )
    .await;
    assert_eq!(followup.status, 200);
    assert_eq!(upstream.connections(), 2);
}

#[tokio::test]
async fn data_on_a_zero_content_length_request_is_never_forwarded() {
    let mut upstream = start_recorder().await;
    let proxy = start_proxy(&config(upstream.addr)).await;
    let mut client = h2_client(&proxy).await;
    let (response, mut stream) = open_post(&mut client, "0").await;
    // A proxy that forwards the head at once has completed the request
    // upstream by now; cutover waits for the stream's end.
    let forwarded_early = upstream.head_arrives(Duration::from_millis(500)).await;
    let _ = stream.send_data(Bytes::from_static(b"x"), true);
    let refused = tokio::spawn(assert_refused(response, "DATA on content-length: 0"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !forwarded_early && upstream.verdicts().is_empty(),
        "forwarded: {:?}",
        upstream.verdicts()
    );
    refused.await.expect("refused");
}

#[tokio::test]
async fn a_stream_ending_short_of_content_length_never_completes_the_upstream_request() {
    let mut upstream = start_recorder().await;
    let proxy = start_proxy(&config(upstream.addr)).await;
    let mut client = h2_client(&proxy).await;
    let (response, mut stream) = open_post(&mut client, "10").await;
    stream
        .send_data(Bytes::from_static(b"hello"), false)
        .expect("data");
    upstream.wait_received(5).await;
    stream.send_data(Bytes::new(), true).expect("end");
    assert_refused(response, "short body").await;
    assert_eq!(upstream.first_verdict().await, Verdict::Incomplete(5));
}

#[tokio::test]
async fn a_body_whose_end_comes_in_a_later_frame_is_forwarded_whole() {
    let mut upstream = start_recorder().await;
    let proxy = start_proxy(&config(upstream.addr)).await;
    let mut client = h2_client(&proxy).await;
    let (response, mut stream) = open_post(&mut client, "5").await;
    stream
        .send_data(Bytes::from_static(b"hello"), false)
        .expect("data");
    upstream.wait_received(4).await;
    stream.send_data(Bytes::new(), true).expect("end");
    let response = tokio::time::timeout(IO_TIMEOUT, response)
        .await
        .expect("answer")
        .expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(
        upstream.first_verdict().await,
        Verdict::Complete(Bytes::from_static(b"hello"))
    );

    // The usual shape (END_STREAM on the last DATA frame) and an empty
    // body whose end comes after the head.
    for (length, body) in [("5", &b"hello"[..]), ("0", &b""[..])] {
        let (response, mut stream) = open_post(&mut client, length).await;
        stream
            .send_data(Bytes::from_static(body), true)
            .expect("data");
        let response = tokio::time::timeout(IO_TIMEOUT, response)
            .await
            .expect("answer")
            .expect("response");
        assert_eq!(response.status(), 200, "content-length {length}");
    }
    let verdicts = upstream.verdicts();
    assert_eq!(
        verdicts[1..],
        [
            Verdict::Complete(Bytes::from_static(b"hello")),
            Verdict::Complete(Bytes::new())
        ]
    );
}

/// Sends one GET with `x-padded: VALUE` and returns the status, or `None`
/// when the stream was reset.
async fn get_with_field(client: &mut h2::client::SendRequest<Bytes>, value: &str) -> Option<u16> {
    let req = Request::builder()
        .uri(format!("https://{HOST}/field"))
        .header(
            "x-padded",
            hyper::header::HeaderValue::from_str(value).expect("value"),
        )
        .body(())
        .expect("request");
    client.clone().ready().await.expect("ready");
    let (response, _) = client.send_request(req, true).expect("send request");
    tokio::time::timeout(IO_TIMEOUT, response)
        .await
        .expect("answer")
        .ok()
        .map(|response| response.status().as_u16())
}

#[tokio::test]
async fn field_values_with_leading_or_trailing_whitespace_are_refused() {
    let mut upstream = start_recorder().await;
    let proxy = start_proxy(&config(upstream.addr)).await;
    let mut client = h2_client(&proxy).await;
    for padded in [" leading", "trailing ", "\tleading-tab", "trailing-tab\t"] {
        let status = get_with_field(&mut client, padded).await;
        assert!(
            matches!(status, None | Some(400)),
            "{padded:?}: got {status:?}, want 400 or a reset"
        );
    }
    assert!(
        !upstream.head_arrives(Duration::from_millis(100)).await,
        "a malformed request was forwarded"
    );
    // Whitespace inside a value is fine.
    assert_eq!(get_with_field(&mut client, "a b\tc").await, Some(200));
}
