//! Reading the metrics endpoint in tests: one scrape over a plain
//! HTTP/1.0 connection, a sample's value, and `promtool check metrics`
//! (Debian's `prometheus` package; a test using it fails without it, it
//! never skips). Shared by `tests/proxy_metrics.rs` and `tests/canary.rs`.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET /metrics` in the Prometheus text format: the body, after checking
/// the answer is a 200. Bounded to ten seconds.
pub async fn scrape_text(metrics: SocketAddr) -> String {
    let exchange = async {
        let mut stream = TcpStream::connect(metrics)
            .await
            .expect("connect to metrics");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n")
            .await
            .expect("send scrape");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("read scrape");
        answer
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("scrape answered within 10 s");
    let answer = String::from_utf8(answer).expect("scrape is UTF-8");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.0 200"), "scrape answered: {head}");
    body.to_string()
}

/// The value of the sample `name` whose labels include all of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// `promtool check metrics` on `text`. Fails (never skips) without it.
pub fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run promtool ({err}): install Debian's `prometheus` package (.ci/run does)"
            )
        });
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write to promtool");
    }
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- scraped:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
