//! The JSON-lines access log (`[server] access_log = "json"` or a path):
//! what the request path hands over, and the writer thread that formats
//! and writes it.
//!
//! The request path pays for a record, not a line: it fills a [`Record`]
//! with values it has anyway (an `Instant`, the client address, the status,
//! byte counts, the upstream's `Arc`) plus one copy of the host, path and
//! service names, and pushes it onto a per-thread batch behind an
//! uncontended mutex. Everything that costs (JSON escaping, the RFC 3339
//! timestamp, number formatting) happens on the writer thread, which takes
//! whole batches at a time and writes each batch with one `write(2)`.
//!
//! Batching: the first record in an empty batch wakes the writer, which
//! waits [`FLUSH_DELAY`] for more (or until a batch holds [`BATCH_FULL`])
//! before taking every batch, so lines reach the file within about that
//! delay. A batch never grows past [`MAX_PENDING`] records: if the writer
//! falls that far behind (a stalled disk), further records are dropped and
//! counted, and the count is logged, rather than blocking requests.
//!
//! Destination: stderr (`"json"`) or a file opened with `O_APPEND`, so
//! logrotate's `copytruncate` works; the file is reopened whenever the
//! config is reloaded (`cutover reload`, or an edit the watcher sees), which
//! is how logrotate's `create` mode is served (`postrotate cutover reload`).
//! May import: `config`, `upstream`.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

use http::Method;

use crate::config::{AccessLogMode, Config};
use crate::upstream::Upstream;

/// How long the writer waits after the first record of a batch for more.
pub const FLUSH_DELAY: Duration = Duration::from_millis(50);

/// A batch this long wakes the writer at once.
pub const BATCH_FULL: usize = 512;

/// Records one batch holds at most while the writer is behind.
pub const MAX_PENDING: usize = 65_536;

/// Batches: a request pushes to the one its thread maps to, so worker
/// threads rarely share a lock.
const SLOTS: usize = 16;

/// One request, as the request path captured it. Formatting waits for
/// the writer thread.
pub struct Record {
    /// When the request arrived (the line's `time`).
    pub arrived: Instant,
    /// Arrival to the end of the response body.
    pub duration: Duration,
    pub client: SocketAddr,
    pub method: Method,
    /// The path, then the host from `host_at`, then the service name from
    /// `service_at`: one allocation for the three strings.
    pub text: Vec<u8>,
    pub host_at: usize,
    pub service_at: usize,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The upstream that answered (its address and colour), if any.
    pub upstream: Option<Arc<Upstream>>,
    /// Whether the response body was sent whole.
    pub completed: bool,
}

/// What the writer is told.
enum Signal {
    /// A batch went from empty to non-empty.
    Wake,
    /// A batch reached [`BATCH_FULL`].
    Full,
    /// Write what is pending and end.
    Stop,
}

/// The request path's end of the access log: the batches and the writer's
/// wake-up channel. Lives in `routing::Shared`.
pub struct Sink {
    inner: Arc<Batches>,
    signal: Sender<Signal>,
    /// Taken by [`Sink::start`].
    receiver: Mutex<Option<Receiver<Signal>>>,
}

struct Batches {
    slots: Box<[Mutex<Vec<Record>>]>,
    dropped: AtomicU64,
}

impl Default for Sink {
    fn default() -> Sink {
        Sink::new()
    }
}

impl Sink {
    pub fn new() -> Sink {
        let (signal, receiver) = mpsc::channel();
        Sink {
            inner: Arc::new(Batches {
                slots: (0..SLOTS).map(|_| Mutex::new(Vec::new())).collect(),
                dropped: AtomicU64::new(0),
            }),
            signal,
            receiver: Mutex::new(Some(receiver)),
        }
    }

    /// Queues one record for the writer. Never blocks on I/O: the lock is
    /// held for a `Vec::push`.
    pub fn push(&self, record: Record) {
        let slot = &self.inner.slots[slot_index()];
        let mut batch = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if batch.len() >= MAX_PENDING {
            drop(batch);
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        batch.push(record);
        let pending = batch.len();
        drop(batch);
        if pending == 1 {
            let _ = self.signal.send(Signal::Wake);
        } else if pending == BATCH_FULL {
            let _ = self.signal.send(Signal::Full);
        }
    }

    /// Starts the writer thread. `current` gives the config in force (read
    /// once per batch: a new config means the destination is looked at,
    /// and a file reopened). A file that cannot be opened is an error here,
    /// at start-up; on a reload it is logged and the old file kept.
    pub fn start(
        &self,
        config: &Arc<Config>,
        current: impl Fn() -> Option<Arc<Config>> + Send + 'static,
    ) -> Result<WriterGuard, AccessLogError> {
        let output = Output::open(&config.server.access_log)?;
        let receiver = self
            .receiver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or(AccessLogError::AlreadyStarted)?;
        let mut writer = Writer {
            batches: Arc::clone(&self.inner),
            receiver,
            output,
            config: Arc::clone(config),
            current: Box::new(current),
            spare: Vec::new(),
            buf: Vec::with_capacity(64 * 1024),
            clock: Clock::default(),
            repeats: Repeats::default(),
        };
        let thread = std::thread::Builder::new()
            .name("cutover-access-log".into())
            .spawn(move || writer.run())
            .map_err(AccessLogError::Thread)?;
        Ok(WriterGuard {
            signal: self.signal.clone(),
            thread: Some(thread),
        })
    }
}

/// Which batch this thread pushes to: threads take slots in turn.
fn slot_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS;
    }
    SLOT.with(|slot| *slot)
}

#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("cannot open access log {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the access log writer: {0}")]
    Thread(std::io::Error),
    #[error("the access log writer is already started")]
    AlreadyStarted,
}

/// Stops the writer when dropped, after it has written every record
/// pushed so far (the end of `run`: the file is complete when it returns).
pub struct WriterGuard {
    signal: Sender<Signal>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        let _ = self.signal.send(Signal::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Where the lines go.
enum Output {
    /// Not JSON (the config says `log` or `off`): pending records are
    /// discarded.
    Nowhere,
    Stderr,
    File(File),
}

impl Output {
    fn open(mode: &AccessLogMode) -> Result<Output, AccessLogError> {
        Ok(match mode {
            AccessLogMode::Log | AccessLogMode::Off => Output::Nowhere,
            AccessLogMode::JsonStderr => Output::Stderr,
            AccessLogMode::JsonFile(path) => Output::File(open_append(path)?),
        })
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Output::Nowhere => Ok(()),
            Output::Stderr => std::io::stderr().lock().write_all(bytes),
            Output::File(file) => file.write_all(bytes),
        }
    }
}

/// `O_APPEND`: every write lands at the end even after another process
/// truncated the file (logrotate's `copytruncate`).
fn open_append(path: &Path) -> Result<File, AccessLogError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| AccessLogError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// The writer thread's state.
struct Writer {
    batches: Arc<Batches>,
    receiver: Receiver<Signal>,
    output: Output,
    /// The config `output` was opened for.
    config: Arc<Config>,
    current: Box<dyn Fn() -> Option<Arc<Config>> + Send>,
    /// An empty batch with capacity, swapped in for a full one.
    spare: Vec<Record>,
    /// The lines of one round, written with one `write`.
    buf: Vec<u8>,
    clock: Clock,
    repeats: Repeats,
}

impl Writer {
    /// Never inlined: the instructions bench finds the writer thread by
    /// this function's name.
    #[inline(never)]
    fn run(&mut self) {
        while let Ok(signal) = self.receiver.recv() {
            let stop = match signal {
                Signal::Stop => true,
                Signal::Full => false,
                Signal::Wake => self.linger(),
            };
            self.write_pending();
            if stop {
                return;
            }
        }
    }

    /// Waits up to [`FLUSH_DELAY`] for more records; true on `Stop`.
    fn linger(&mut self) -> bool {
        let deadline = Instant::now() + FLUSH_DELAY;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.receiver.recv_timeout(left) {
                Ok(Signal::Wake) => {}
                Ok(Signal::Full) | Err(RecvTimeoutError::Timeout) => return false,
                Ok(Signal::Stop) | Err(RecvTimeoutError::Disconnected) => return true,
            }
        }
    }

    /// Takes every batch, formats it and writes it in one go.
    fn write_pending(&mut self) {
        self.follow_config();
        let now = (SystemTime::now(), Instant::now());
        for slot in self.batches.slots.iter() {
            {
                let mut batch = slot.lock().unwrap_or_else(PoisonError::into_inner);
                if batch.is_empty() {
                    continue;
                }
                std::mem::swap(&mut *batch, &mut self.spare);
            }
            if !matches!(self.output, Output::Nowhere) {
                for record in &self.spare {
                    write_line(
                        &mut self.buf,
                        record,
                        &mut self.clock,
                        &mut self.repeats,
                        now,
                    );
                }
            }
            self.spare.clear();
        }
        if !self.buf.is_empty() {
            if let Err(err) = self.output.write(&self.buf) {
                tracing::warn!(error = %err, "cannot write the access log");
            }
            self.buf.clear();
        }
        let dropped = self.batches.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(dropped, "access log writer fell behind: records dropped");
        }
    }

    /// A reloaded config may name another destination; a file is reopened
    /// even when its path stayed (log rotation).
    fn follow_config(&mut self) {
        let Some(config) = (self.current)() else {
            return;
        };
        if Arc::ptr_eq(&config, &self.config) {
            return;
        }
        match Output::open(&config.server.access_log) {
            Ok(output) => self.output = output,
            Err(err) => tracing::warn!(error = %err, "keeping the previous access log"),
        }
        self.config = config;
    }
}

/// What consecutive lines usually share, formatted once: the client's IP
/// (one client, many requests) and the upstream's colour and address.
#[derive(Default)]
pub struct Repeats {
    client_ip: Option<IpAddr>,
    client_ip_text: Vec<u8>,
    /// Weak: a retired upstream's pool (and its idle connections) must not
    /// live on for the log's sake; the allocation it keeps means the
    /// address cannot be reused by another upstream while compared.
    upstream: Option<Weak<Upstream>>,
    /// `,"color":"blue","upstream":"127.0.0.1:9000"` for `upstream`.
    upstream_text: Vec<u8>,
}

impl Repeats {
    fn client_ip(&mut self, ip: IpAddr) -> &[u8] {
        if self.client_ip != Some(ip) {
            self.client_ip_text.clear();
            write_ip(&mut self.client_ip_text, ip);
            self.client_ip = Some(ip);
        }
        &self.client_ip_text
    }

    fn upstream(&mut self, upstream: &Arc<Upstream>) -> &[u8] {
        let same = self
            .upstream
            .as_ref()
            .is_some_and(|last| std::ptr::eq(last.as_ptr(), Arc::as_ptr(upstream)));
        if !same {
            let text = &mut self.upstream_text;
            text.clear();
            text.extend_from_slice(b",\"color\":\"");
            escape(text, upstream.label.as_bytes());
            text.extend_from_slice(b"\",\"upstream\":\"");
            write_socket_addr(text, upstream.addr);
            text.push(b'"');
            self.upstream = Some(Arc::downgrade(upstream));
        }
        &self.upstream_text
    }
}

/// Formats one record as a JSON line onto `out`.
///
/// Written for the instruction count (the writer's work is most of what
/// the JSON log costs): one `reserve` per line, so the fixed parts are
/// constant-length copies; numbers are written without `fmt`; what repeats
/// from line to line ([`Repeats`]) is formatted once; and strings that
/// need no escaping (the usual case) are copied whole.
pub fn write_line(
    out: &mut Vec<u8>,
    record: &Record,
    clock: &mut Clock,
    repeats: &mut Repeats,
    now: (SystemTime, Instant),
) {
    let text = &record.text;
    let path = &text[..record.host_at];
    let host = &text[record.host_at..record.service_at];
    let service = &text[record.service_at..];
    out.reserve(LINE_FIXED + 2 * text.len());
    out.extend_from_slice(b"{\"time\":\"");
    let wall = now
        .0
        .checked_sub(now.1.saturating_duration_since(record.arrived))
        .unwrap_or(now.0);
    clock.write_rfc3339(out, wall);
    out.extend_from_slice(b"\",\"client\":\"");
    out.extend_from_slice(repeats.client_ip(record.client.ip()));
    out.push(b':');
    push_u64(out, u64::from(record.client.port()));
    out.extend_from_slice(b"\",\"host\":\"");
    escape(out, host);
    out.extend_from_slice(b"\",\"method\":\"");
    // A method is a token (RFC 9110 §9.1): nothing in it needs escaping,
    // and `http` refuses anything else.
    out.extend_from_slice(record.method.as_str().as_bytes());
    out.extend_from_slice(b"\",\"path\":\"");
    escape(out, path);
    out.extend_from_slice(b"\",\"status\":");
    push_u64(out, u64::from(record.status));
    out.extend_from_slice(b",\"bytes_in\":");
    push_u64(out, record.bytes_in);
    out.extend_from_slice(b",\"bytes_out\":");
    push_u64(out, record.bytes_out);
    out.extend_from_slice(b",\"duration_ms\":");
    write_millis(out, record.duration);
    out.extend_from_slice(b",\"service\":");
    if service.is_empty() {
        out.extend_from_slice(b"null");
    } else {
        out.push(b'"');
        escape(out, service);
        out.push(b'"');
    }
    match &record.upstream {
        Some(upstream) => out.extend_from_slice(repeats.upstream(upstream)),
        None => out.extend_from_slice(b",\"color\":null,\"upstream\":null"),
    }
    out.extend_from_slice(if record.completed {
        b",\"completed\":true}\n"
    } else {
        b",\"completed\":false}\n"
    });
}

/// A line's length without its strings, rounded up (two addresses in
/// IPv6 form included).
const LINE_FIXED: usize = 320;

/// Decimal digits. Values below 100,000 (statuses, ports, most byte
/// counts and durations) are written as one fixed-length copy each, with
/// no loop; larger ones digit by digit.
fn push_u64(out: &mut Vec<u8>, value: u64) {
    let digit = |n: u64| b'0' + (n % 10) as u8;
    match value {
        0..=9 => out.push(digit(value)),
        10..=99 => out.extend_from_slice(&[digit(value / 10), digit(value)]),
        100..=999 => out.extend_from_slice(&[digit(value / 100), digit(value / 10), digit(value)]),
        1000..=9999 => out.extend_from_slice(&[
            digit(value / 1000),
            digit(value / 100),
            digit(value / 10),
            digit(value),
        ]),
        10_000..=99_999 => out.extend_from_slice(&[
            digit(value / 10_000),
            digit(value / 1000),
            digit(value / 100),
            digit(value / 10),
            digit(value),
        ]),
        _ => {
            let mut digits = [0u8; 20];
            let mut at = digits.len();
            let mut rest = value;
            while rest > 0 {
                at -= 1;
                digits[at] = digit(rest);
                rest /= 10;
            }
            out.extend_from_slice(&digits[at..]);
        }
    }
}

/// Milliseconds with three decimals (microsecond resolution).
fn write_millis(out: &mut Vec<u8>, duration: Duration) {
    let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
    push_u64(out, micros / 1000);
    let frac = micros % 1000;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

/// `1.2.3.4:5` or `[::1]:5`.
fn write_socket_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    write_ip(out, addr.ip());
    out.push(b':');
    push_u64(out, u64::from(addr.port()));
}

/// `1.2.3.4` or `[::1]`; IPv4 by hand (std's `Display` goes through the
/// formatting machinery, several times the cost).
fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(ip) => {
            let [a, b, c, d] = ip.octets();
            push_u64(out, u64::from(a));
            out.push(b'.');
            push_u64(out, u64::from(b));
            out.push(b'.');
            push_u64(out, u64::from(c));
            out.push(b'.');
            push_u64(out, u64::from(d));
        }
        IpAddr::V6(ip) => {
            let _ = write!(out, "[{ip}]");
        }
    }
}

/// Writes `bytes` as the inside of a JSON string: `"`, `\`, control
/// characters and DEL are escaped; bytes that are not UTF-8 become U+FFFD
/// (a JSON line must be UTF-8). Printable ASCII, the usual case, is
/// checked in one pass and copied whole.
pub fn escape(out: &mut Vec<u8>, bytes: &[u8]) {
    if bytes
        .iter()
        .all(|&byte| (0x20..0x7f).contains(&byte) && byte != b'"' && byte != b'\\')
    {
        out.extend_from_slice(bytes);
        return;
    }
    for chunk in bytes.utf8_chunks() {
        escape_utf8(out, chunk.valid().as_bytes());
        if !chunk.invalid().is_empty() {
            out.extend_from_slice(b"\\ufffd");
        }
    }
}

fn escape_utf8(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut start = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        if !needs_escape(byte) {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

fn needs_escape(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\' || byte == 0x7f
}

/// RFC 3339 UTC timestamps with milliseconds; the date and time up to the
/// second are formatted once per second.
#[derive(Default)]
pub struct Clock {
    second: Option<u64>,
    /// `2026-12-04T14:00:00.` for `second` (years 0–9999).
    prefix: [u8; 20],
}

impl Clock {
    pub fn write_rfc3339(&mut self, out: &mut Vec<u8>, time: SystemTime) {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let second = since.as_secs();
        if self.second != Some(second) {
            let (year, month, day) = civil_from_days((second / 86_400) as i64);
            let in_day = second % 86_400;
            let mut prefix = Vec::with_capacity(20);
            let _ = write!(
                prefix,
                "{:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.",
                year.clamp(0, 9999),
                in_day / 3600,
                in_day / 60 % 60,
                in_day % 60
            );
            if let Ok(prefix) = <[u8; 20]>::try_from(prefix.as_slice()) {
                self.prefix = prefix;
            }
            self.second = Some(second);
        }
        out.extend_from_slice(&self.prefix);
        let millis = since.subsec_millis();
        out.extend_from_slice(&[
            b'0' + (millis / 100) as u8,
            b'0' + (millis / 10 % 10) as u8,
            b'0' + (millis % 10) as u8,
            b'Z',
        ]);
    }
}

/// Days since 1970-01-01 to a (year, month, day) in the proleptic
/// Gregorian calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

pin_project_lite::pin_project! {
    /// A request body that counts the bytes it delivers, for `bytes_in`.
    pub struct Counted<B> {
        #[pin]
        inner: B,
        seen: Arc<AtomicU64>,
    }
}

impl<B> Counted<B> {
    pub fn new(inner: B, seen: Arc<AtomicU64>) -> Counted<B> {
        Counted { inner, seen }
    }
}

impl<B: http_body::Body> http_body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        use bytes::Buf as _;
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.seen
                    .fetch_add(data.remaining() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(bytes: &[u8]) -> String {
        let mut out = Vec::new();
        escape(&mut out, bytes);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn escapes_what_json_requires_and_copies_the_rest() {
        assert_eq!(escaped(b"/plain/path?a=1"), "/plain/path?a=1");
        assert_eq!(
            escaped(b"a\"b\\c\nd\x01\x7f"),
            "a\\\"b\\\\c\\nd\\u0001\\u007f"
        );
        assert_eq!(escaped("/caf\u{e9}".as_bytes()), "/caf\u{e9}");
        assert_eq!(escaped(b"/a\xffb"), "/a\\ufffdb");
        let parsed: String =
            serde_json::from_str(&format!("\"{}\"", escaped(b"x\"\x1f\xc3"))).unwrap();
        assert_eq!(parsed, "x\"\u{1f}\u{fffd}");
    }

    #[test]
    fn formats_rfc3339_with_milliseconds() {
        let mut clock = Clock::default();
        let mut out = Vec::new();
        clock.write_rfc3339(&mut out, UNIX_EPOCH);
        out.push(b' ');
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_042);
        clock.write_rfc3339(&mut out, t);
        out.push(b' ');
        // 2024-02-29 (a leap day) 23:59:59.999
        let t = UNIX_EPOCH + Duration::from_millis(1_709_251_199_999);
        clock.write_rfc3339(&mut out, t);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1970-01-01T00:00:00.000Z 2023-11-14T22:13:20.042Z 2024-02-29T23:59:59.999Z"
        );
    }

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_791), (2026, 12, 4));
    }

    #[test]
    fn a_line_is_one_json_object_with_every_field() {
        let limits = crate::config::Limits::default();
        let upstream = Upstream::new("[::1]:8080".parse().unwrap(), "green", &limits);
        let mut text = b"/a\"b".to_vec();
        let host_at = text.len();
        text.extend_from_slice(b"app.test");
        let service_at = text.len();
        text.extend_from_slice(b"web");
        let now = (
            UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            Instant::now(),
        );
        let record = Record {
            arrived: now.1 - Duration::from_millis(1500),
            duration: Duration::from_micros(1500),
            client: "10.0.0.255:65535".parse().unwrap(),
            method: Method::PATCH,
            text,
            host_at,
            service_at,
            status: 201,
            bytes_in: 0,
            bytes_out: 18_446_744_073_709_551_615,
            upstream: Some(upstream),
            completed: false,
        };
        let mut out = Vec::new();
        write_line(
            &mut out,
            &record,
            &mut Clock::default(),
            &mut Repeats::default(),
            now,
        );
        assert_eq!(out.last(), Some(&b'\n'));
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            line,
            serde_json::json!({
                "time": "2023-11-14T22:13:18.500Z",
                "client": "10.0.0.255:65535",
                "host": "app.test",
                "method": "PATCH",
                "path": "/a\"b",
                "status": 201,
                "bytes_in": 0,
                "bytes_out": 18_446_744_073_709_551_615u64,
                "duration_ms": 1.5,
                "service": "web",
                "color": "green",
                "upstream": "[::1]:8080",
                "completed": false,
            })
        );
    }

    #[test]
    fn millis_have_three_decimals() {
        let mut out = Vec::new();
        write_millis(&mut out, Duration::from_micros(1_234_567));
        out.push(b' ');
        write_millis(&mut out, Duration::from_micros(5));
        for value in [
            0,
            9,
            10,
            99,
            100,
            999,
            1000,
            9999,
            10_000,
            99_999,
            100_000,
            u64::MAX,
        ] {
            out.push(b' ');
            push_u64(&mut out, value);
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1234.567 0.005 0 9 10 99 100 999 1000 9999 10000 99999 100000 18446744073709551615"
        );
    }
}
