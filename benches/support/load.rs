//! External load generators and what they measured: `wrk` (HTTP/1.1, plain
//! or TLS, keep-alive or `Connection: close`) and `h2load` (HTTP/2 over TLS,
//! several streams per connection). Both are only run when installed; the
//! caller turns an `Err` into a "not installed" or "failed" row.

use std::process::Command;

use super::{percentile, tool_installed, CpuPerRequest};

/// What one load run measured.
#[derive(Debug, Clone, Default)]
pub struct Measurement {
    pub requests: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Connection errors, timeouts and non-2xx answers.
    pub errors: u64,
    /// CPU time the measured process used per request.
    pub cpu: Option<CpuPerRequest>,
}

impl Measurement {
    /// The scalar fields as JSON (latencies in ms), for the result files.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests,
            "seconds": self.seconds,
            "requests_per_second": self.requests_per_second,
            "p50_ms": self.p50_us / 1000.0,
            "p99_ms": self.p99_us / 1000.0,
            "max_ms": self.max_us / 1000.0,
            "errors": self.errors,
            "cpu_us_per_request": self.cpu.map(|cpu| cpu.total_us()),
            "cpu_user_us_per_request": self.cpu.map(|cpu| cpu.user_us),
            "cpu_system_us_per_request": self.cpu.map(|cpu| cpu.system_us),
        })
    }
}

/// Runs a load generator to its end and returns its report (stdout); a
/// start failure or a non-zero exit is an error that quotes its stderr.
fn report_of(tool: &str, command: &mut Command) -> Result<String, String> {
    let output = command
        .output()
        .map_err(|err| format!("cannot run {tool}: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "{tool} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub mod wrk {
    //! `wrk -t1 -c<connections> --latency`, and its report parsed.

    use super::*;

    /// Runs wrk against `url` (http or https) for `seconds`, with extra
    /// request `headers` ("Name: value").
    pub fn run(
        url: &str,
        connections: usize,
        seconds: u64,
        headers: &[&str],
    ) -> Result<Measurement, String> {
        if !tool_installed("wrk") {
            return Err("wrk: not installed (apt-get install -y wrk)".to_string());
        }
        let mut command = Command::new("wrk");
        command
            .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s")])
            .args(["--timeout", "5s", "--latency"]);
        for header in headers {
            command.args(["-H", header]);
        }
        let report = report_of("wrk", command.arg(url))?;
        parse(&report).ok_or_else(|| format!("cannot parse wrk output:\n{report}"))
    }

    /// Picks the numbers out of wrk's report:
    /// ```text
    ///     Latency   580.12us  100.00us   5.00ms   90.00%
    ///      50%  550.00us
    ///      99%    1.20ms
    ///   123456 requests in 5.00s, 20.00MB read
    ///   Socket errors: connect 0, read 0, write 0, timeout 0
    ///   Non-2xx or 3xx responses: 5
    /// ```
    pub fn parse(report: &str) -> Option<Measurement> {
        let mut m = Measurement::default();
        let mut have = (false, false, false, false);
        for line in report.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["Latency", _avg, _stdev, max, ..] => {
                    m.max_us = micros(max)?;
                    have.0 = true;
                }
                ["50%", value] => {
                    m.p50_us = micros(value)?;
                    have.1 = true;
                }
                ["99%", value] => {
                    m.p99_us = micros(value)?;
                    have.2 = true;
                }
                [count, "requests", "in", secs, ..] => {
                    m.requests = count.parse().ok()?;
                    m.seconds = secs
                        .trim_end_matches(',')
                        .trim_end_matches('s')
                        .parse()
                        .ok()?;
                    have.3 = true;
                }
                ["Socket", "errors:", rest @ ..] => {
                    m.errors += rest
                        .iter()
                        .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                        .sum::<u64>();
                }
                ["Non-2xx", "or", "3xx", "responses:", count] => {
                    m.errors += count.parse::<u64>().ok()?;
                }
                _ => {}
            }
        }
        if have != (true, true, true, true) || m.seconds <= 0.0 {
            return None;
        }
        m.requests_per_second = m.requests as f64 / m.seconds;
        Some(m)
    }

    /// "580.12us", "1.20ms", "2.00s", "1.00m" → microseconds.
    pub fn micros(text: &str) -> Option<f64> {
        let (number, scale) = if let Some(n) = text.strip_suffix("us") {
            (n, 1.0)
        } else if let Some(n) = text.strip_suffix("ms") {
            (n, 1_000.0)
        } else if let Some(n) = text.strip_suffix('m') {
            (n, 60_000_000.0)
        } else if let Some(n) = text.strip_suffix('s') {
            (n, 1_000_000.0)
        } else {
            (text, 1.0)
        };
        number.parse::<f64>().ok().map(|n| n * scale)
    }
}

pub mod h2load {
    //! `h2load` (nghttp2): HTTP/2 over TLS with several concurrent streams
    //! per connection. Percentiles come from its per-request log file.

    use super::*;
    use std::path::Path;

    /// Runs `h2load -c clients -m streams -D seconds --warm-up-time 1`
    /// against an https `url`; `log` is a scratch file for request timings.
    pub fn run(
        url: &str,
        clients: usize,
        streams: usize,
        seconds: u64,
        log: &Path,
    ) -> Result<Measurement, String> {
        if !tool_installed("h2load") {
            return Err("h2load: not installed (apt-get install -y nghttp2-client)".to_string());
        }
        let report = report_of(
            "h2load",
            Command::new("h2load")
                .args(["-t1", &format!("-c{clients}"), &format!("-m{streams}")])
                .args(["-D", &seconds.to_string(), "--warm-up-time", "1"])
                .arg("--log-file")
                .arg(log)
                .arg(url),
        )?;
        let mut m =
            parse(&report).ok_or_else(|| format!("cannot parse h2load output:\n{report}"))?;
        let mut latencies = request_log(log);
        latencies.sort_unstable();
        m.p50_us = percentile(&latencies, 50.0);
        m.p99_us = percentile(&latencies, 99.0);
        m.max_us = latencies.last().copied().map_or(m.max_us, f64::from);
        let _ = std::fs::remove_file(log);
        Ok(m)
    }

    /// Sends exactly `requests` HTTP/1.1 keep-alive requests to a plain
    /// `http://` url over `clients` connections (`h2load --h1 -n`): a
    /// bounded count rather than a duration, for runs under valgrind.
    pub fn run_h1_count(url: &str, clients: usize, requests: u64) -> Result<Measurement, String> {
        if !tool_installed("h2load") {
            return Err("h2load: not installed (apt-get install -y nghttp2-client)".to_string());
        }
        let report = report_of(
            "h2load",
            Command::new("h2load")
                .args([
                    "--h1",
                    "-t1",
                    &format!("-c{clients}"),
                    &format!("-n{requests}"),
                ])
                .arg(url),
        )?;
        parse(&report).ok_or_else(|| format!("cannot parse h2load output:\n{report}"))
    }

    /// Picks the numbers out of h2load's report:
    /// ```text
    /// finished in 5.00s, 40000.00 req/s, 5.00MB/s
    /// requests: 200000 total, 200000 started, 200000 done, 199990 succeeded, 10 failed, 10 errored, 0 timeout
    /// status codes: 199990 2xx, 0 3xx, 0 4xx, 0 5xx
    /// time for request:      123us     12.34ms      1.23ms       456us    78.90%
    /// ```
    pub fn parse(report: &str) -> Option<Measurement> {
        let mut m = Measurement::default();
        let mut have = (false, false);
        for line in report.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["finished", "in", duration, ..] => {
                    // "5.00s," for timed runs, "256.65ms," for short counted ones.
                    m.seconds = super::wrk::micros(duration.trim_end_matches(','))? / 1e6;
                }
                ["requests:", _total, "total,", _started, "started,", done, "done,", rest @ ..] => {
                    m.requests = done.parse().ok()?;
                    // "N failed, N errored, N timeout": failed includes errored.
                    if let Some(failed) = rest
                        .iter()
                        .position(|w| *w == "failed,")
                        .and_then(|i| rest.get(i.checked_sub(1)?))
                    {
                        m.errors += failed.parse::<u64>().ok()?;
                    }
                    have.0 = true;
                }
                ["status", "codes:", _ok, "2xx,", x3, "3xx,", x4, "4xx,", x5, "5xx"] => {
                    for count in [x3, x4, x5] {
                        m.errors += count.parse::<u64>().ok()?;
                    }
                }
                ["time", "for", "request:", _min, max, ..] => {
                    m.max_us = super::wrk::micros(max)?;
                    have.1 = true;
                }
                _ => {}
            }
        }
        if have != (true, true) || m.seconds <= 0.0 {
            return None;
        }
        m.requests_per_second = m.requests as f64 / m.seconds;
        Some(m)
    }

    /// Request durations (µs) from h2load's `--log-file`: one line per
    /// request, `start<TAB>status<TAB>duration_us`.
    fn request_log(path: &Path) -> Vec<u32> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split('\t').nth(2)?.trim().parse::<u32>().ok())
            .collect()
    }
}
