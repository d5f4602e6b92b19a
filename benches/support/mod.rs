//! Helpers the benches share: child processes that die with the bench,
//! free ports, readiness probes, machine facts, percentiles, CPU time; the
//! origin server, the three proxies and the external load generators. Each
//! bench target includes this file with `#[path]` and uses a subset of it.

#![allow(dead_code)]

pub mod keepalive;
pub mod load;
pub mod origin;
pub mod proxies;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(default)
}

/// Whether `name` runs at all (on PATH and executable).
pub fn tool_installed(name: &str) -> bool {
    Command::new(name)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// The first three fields of /proc/loadavg.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".to_string())
}

/// First line a command prints (stdout, else stderr: nginx -v uses stderr),
/// or "not installed".
pub fn first_line_of(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(output) => {
            let text = if output.stdout.is_empty() {
                output.stderr
            } else {
                output.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        }
        Err(_) => "not installed".to_string(),
    }
}

/// A port that was free a moment ago. The child binds it right after, so
/// the race with other processes on the machine is theoretical.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind 127.0.0.1:0 to find a free port")
}

/// One blocking `GET /`; returns the status line.
pub fn probe(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: bench.test\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    Ok(text.lines().next().unwrap_or("").to_string())
}

/// The last lines of a log file, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(5);
    let joined = lines[start..].join(" | ");
    if joined.is_empty() {
        format!("{} is empty", path.display())
    } else {
        joined
    }
}

/// Latency percentiles from raw samples (microseconds), nearest rank.
pub fn percentile(sorted: &[u32], percent: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((percent / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// A child process that is killed and reaped when dropped, so a panic in
/// the bench never leaves a proxy running.
pub struct ChildGuard {
    pub name: String,
    pub child: Child,
}

impl ChildGuard {
    pub fn new(name: &str, child: Child) -> ChildGuard {
        ChildGuard {
            name: name.to_string(),
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has already exited, and how.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("{} exited early: {status}", self.name)),
            Ok(None) => None,
            Err(err) => Some(format!("cannot query {}: {err}", self.name)),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `command` run by `wrapper` (a program and its arguments, such as
/// valgrind) with the same arguments, environment and working directory;
/// `command` itself when `wrapper` is empty.
pub fn run_under(command: Command, wrapper: &[std::ffi::OsString]) -> Command {
    let Some((program, args)) = wrapper.split_first() else {
        return command;
    };
    let mut wrapped = Command::new(program);
    wrapped
        .args(args)
        .arg(command.get_program())
        .args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = command.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

/// CPU time so far, in clock ticks, of `pid` and its direct children
/// (nginx's workers under a master): `/proc/PID/stat` fields 14 and 15.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTicks {
    pub user: u64,
    pub system: u64,
}

pub fn cpu_ticks(pid: u32) -> Option<CpuTicks> {
    let own = own_cpu_ticks(pid)?;
    Some(
        child_pids(pid)
            .into_iter()
            .filter_map(own_cpu_ticks)
            .fold(own, |sum, child| CpuTicks {
                user: sum.user + child.user,
                system: sum.system + child.system,
            }),
    )
}

/// Linux reports process CPU time in USER_HZ ticks, 100 per second on every
/// mainstream architecture.
pub const MICROS_PER_TICK: f64 = 10_000.0;

/// CPU µs per request, split as the kernel accounts it: user space (the
/// proxy's own code and libraries) and system (syscalls and the loopback
/// TCP work they do). The split shows where a gap between proxies lies.
#[derive(Debug, Clone, Copy)]
pub struct CpuPerRequest {
    pub user_us: f64,
    pub system_us: f64,
}

impl CpuPerRequest {
    pub fn total_us(&self) -> f64 {
        self.user_us + self.system_us
    }

    /// "20.3 (5.5 + 14.8)": total, then user + system.
    pub fn describe(&self) -> String {
        format!(
            "{:.1} ({:.1} + {:.1})",
            self.total_us(),
            self.user_us,
            self.system_us
        )
    }
}

/// CPU per request between two `cpu_ticks` readings.
pub fn cpu_per_request(
    before: Option<CpuTicks>,
    after: Option<CpuTicks>,
    requests: u64,
) -> Option<CpuPerRequest> {
    let (before, after) = (before?, after?);
    if requests == 0 {
        return None;
    }
    let per_request = |ticks: u64| ticks as f64 * MICROS_PER_TICK / requests as f64;
    Some(CpuPerRequest {
        user_us: per_request(after.user.checked_sub(before.user)?),
        system_us: per_request(after.system.checked_sub(before.system)?),
    })
}

/// The fields after the command name of /proc/PID/stat (the name may
/// contain spaces; nothing after it does).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    Some(after_name.split_whitespace().map(str::to_string).collect())
}

fn own_cpu_ticks(pid: u32) -> Option<CpuTicks> {
    let fields = stat_fields(pid)?;
    Some(CpuTicks {
        user: fields.get(11)?.parse().ok()?,
        system: fields.get(12)?.parse().ok()?,
    })
}

/// Processes whose parent is `parent`.
pub fn child_pids(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            stat_fields(pid)
                .and_then(|f| f.get(1)?.parse::<u32>().ok())
                .is_some_and(|ppid| ppid == parent)
        })
        .collect()
}

/// Where a bench writes its JSON: `$BENCH_RESULTS`, else
/// `target/bench-results/<name>.json`.
pub fn results_path(name: &str) -> std::path::PathBuf {
    std::env::var_os("BENCH_RESULTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target/bench-results")
                .join(format!("{name}.json"))
        })
}

/// Writes `json` (pretty) to `path`, creating its directory.
pub fn write_json(path: &Path, json: &serde_json::Value) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|err| panic!("create {}: {err}", dir.display()));
    }
    let text = serde_json::to_string_pretty(json).expect("serialize the results");
    std::fs::write(path, text + "\n")
        .unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
}
