//! Starting from inherited sockets (`LISTEN_FDS`), readiness reports to
//! systemd (`NOTIFY_SOCKET`), and the example units in `examples/`.
//!
//! The real binary runs under `systemd-socket-activate` (Debian's `systemd`
//! package; `.ci/run` installs it): it listens, and on the first connection
//! starts cutover with the listening socket as fd 3. These tests never skip:
//! without the tools they fail and say what to install.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

use common::IO_TIMEOUT;

const BIN: &str = env!("CARGO_BIN_EXE_cutover");

/// A loopback port that was free a moment ago (bound to port 0, closed).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind port 0")
        .port()
}

/// A config serving `hello` at every path on `http`, in `dir`.
fn write_config(dir: &Path, http: SocketAddr, extra: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("index.html"), "hello\n").expect("write page");
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nhttp = \"{http}\"\n{extra}\n[[site]]\nhosts = [\"*\"]\n\n\
             [[site.route]]\npath = \"/\"\nfile = \"index.html\"\n"
        ),
    )
    .expect("write config");
    path
}

fn tool(name: &str) -> &str {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|out| out.status.success());
    assert!(
        found,
        "{name} is not installed: apt-get install systemd (.ci/run does)"
    );
    name
}

/// Sends one HTTP/1.1 request on `stream` and returns the whole response.
fn get(mut stream: TcpStream) -> String {
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    response
}

/// Kills the process (and its children's parent, the activator) at the end.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `systemd-socket-activate` holding `addrs`, which will run
/// `cutover serve --config config` on the first connection.
fn socket_activate(addrs: &[SocketAddr], config: &Path, log: &Path) -> Running {
    let mut command = Command::new(tool("systemd-socket-activate"));
    for addr in addrs {
        command.arg("-l").arg(addr.to_string());
    }
    let log = std::fs::File::create(log).expect("log file");
    let child = command
        .arg("--fdname=web")
        .args([BIN, "serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start systemd-socket-activate");
    Running(child)
}

/// Connects as soon as the activator listens (it binds after starting).
fn connect_when_listening(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match TcpStream::connect(addr) {
            Ok(stream) => return stream,
            Err(err) if Instant::now() > deadline => panic!("nothing listens on {addr}: {err}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// cutover serves on the socket systemd-socket-activate bound and passed
/// in LISTEN_FDS, and the connections made before cutover even started
/// (the first one is what starts it) are queued by the kernel and served,
/// not refused.
#[test]
fn serves_on_an_inherited_socket_and_its_queued_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = write_config(dir.path(), addr, "");
    let log = dir.path().join("stderr");
    let _activator = socket_activate(&[addr], &config, &log);

    // All connected before cutover is ready: the first starts it.
    let early: Vec<TcpStream> = (0..5).map(|_| connect_when_listening(addr)).collect();
    for (index, stream) in early.into_iter().enumerate() {
        let response = get(stream);
        assert!(
            response.starts_with("HTTP/1.1 200") && response.ends_with("hello\n"),
            "queued connection {index}: {response:?}\nlog: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let later = get(TcpStream::connect(addr).expect("connect"));
    assert!(later.starts_with("HTTP/1.1 200"), "{later:?}");
    // Logs go through a writer thread: wait for the line, bounded.
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("using an inherited socket") && text.contains("fd 3 (web)") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cutover did not say it took fd 3: {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A passed socket that matches neither configured address stops the
/// start with an error naming it: otherwise its queue would fill with
/// connections nobody accepts.
#[test]
fn an_inherited_socket_matching_no_listener_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let served: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let stray: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = write_config(dir.path(), served, "");
    let log = dir.path().join("stderr");
    let mut activator = socket_activate(&[served, stray], &config, &log);
    let _trigger = connect_when_listening(served);
    let deadline = Instant::now() + IO_TIMEOUT;
    let status = loop {
        if let Some(status) = activator.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "cutover kept running");
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "fd 4 (web) on {stray} matches neither [server] http ({served})"
        )),
        "{log}"
    );
}

fn parse(text: &str) -> cutover::Config {
    cutover::Config::parse(text, "test.toml", common::root()).expect("config")
}

/// The library maps handed-over sockets by address, whatever their order,
/// and binds what was not handed over.
#[tokio::test]
async fn inherited_sockets_are_matched_by_address() {
    let http = TcpListener::bind("127.0.0.1:0").expect("bind");
    let https = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (http_addr, https_addr) = (http.local_addr().unwrap(), https.local_addr().unwrap());
    let config = parse(&format!(
        "[server]\nhttp = \"{http_addr}\"\nhttps = \"{https_addr}\"\n"
    ));
    let inherited = cutover::Inherited::from_listeners(vec![https, http]).expect("inherited");
    let listeners = cutover::Listeners::open(&config, inherited)
        .await
        .expect("open");
    assert_eq!(listeners.http.unwrap().local_addr().unwrap(), http_addr);
    assert_eq!(listeners.https.unwrap().local_addr().unwrap(), https_addr);

    let stray = TcpListener::bind("127.0.0.1:0").expect("bind");
    let config = parse("[server]\nhttp = \"127.0.0.1:0\"\n");
    let inherited = cutover::Inherited::from_listeners(vec![stray]).expect("inherited");
    let err = cutover::Listeners::open(&config, inherited)
        .await
        .expect_err("a stray socket is refused");
    assert!(err.to_string().contains("matches neither"), "{err}");

    // Handed over by an upgrading predecessor whose config named it: closed.
    let stray = TcpListener::bind("127.0.0.1:0").expect("bind");
    let stray_addr = stray.local_addr().unwrap();
    let inherited = cutover::Inherited::from_predecessor(vec![stray]).expect("inherited");
    let listeners = cutover::Listeners::open(&config, inherited)
        .await
        .expect("a stray handed-over socket is closed, not an error");
    assert!(listeners.http.is_some());
    assert!(
        TcpStream::connect(stray_addr).is_err(),
        "{stray_addr} still listens"
    );
}

/// `serve` reports READY=1 (with its pid) to $NOTIFY_SOCKET once it
/// serves, and STOPPING=1 when SIGTERM starts the drain.
#[test]
fn reports_ready_and_stopping_to_notify_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    notify.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = write_config(dir.path(), addr, "");
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cutover");
    let pid = child.id();
    let mut child = Running(child);
    let mut buf = [0u8; 512];
    let len = notify.recv(&mut buf).expect("no READY=1 within 10 s");
    let message = String::from_utf8_lossy(&buf[..len]).to_string();
    assert!(
        message.lines().any(|l| l == "READY=1") && message.contains(&format!("MAINPID={pid}")),
        "{message:?}"
    );
    // Ready means serving.
    let response = get(TcpStream::connect(addr).expect("connect after READY=1"));
    assert!(response.starts_with("HTTP/1.1 200"), "{response:?}");

    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let len = notify.recv(&mut buf).expect("no STOPPING=1 within 10 s");
    assert_eq!(&buf[..len], b"STOPPING=1");
    let status = child.0.wait().expect("wait");
    assert!(status.success(), "{status}");
}

/// `systemd-analyze verify` accepts the example units with no warning
/// (it exits 0 even on unknown values, so its output must be empty too),
/// and does flag a broken copy, so this test can fail. The `ExecStart`
/// path is pointed at the built binary: verify checks it exists.
#[test]
fn example_units_pass_systemd_analyze_verify() {
    let analyze = tool("systemd-analyze");
    let dir = tempfile::tempdir().expect("tempdir");
    let examples = common::root().join("examples");
    let verify = |service: &str| {
        std::fs::write(dir.path().join("cutover.service"), service).expect("write");
        std::fs::copy(
            examples.join("cutover.socket"),
            dir.path().join("cutover.socket"),
        )
        .expect("copy socket unit");
        Command::new(analyze)
            .arg("verify")
            .arg(dir.path().join("cutover.socket"))
            .arg(dir.path().join("cutover.service"))
            .output()
            .expect("run systemd-analyze")
    };
    let service = std::fs::read_to_string(examples.join("cutover.service"))
        .expect("read service unit")
        .replace("/usr/local/bin/cutover", BIN);
    let out = verify(&service);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");

    let broken = verify(&service.replace("Type=notify", "Type=notifyy"));
    assert!(
        !String::from_utf8_lossy(&broken.stderr).trim().is_empty(),
        "verify did not flag a bad Type="
    );
}

/// A server started on a socket-activated listener hands it on to an
/// upgrade's new process (which must not read the stale LISTEN_FDS).
#[test]
fn a_socket_activated_server_upgrades() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = write_config(dir.path(), addr, "admin_socket = \"admin.sock\"");
    let log = dir.path().join("stderr");
    let _activator = socket_activate(&[addr], &config, &log);
    assert!(get(connect_when_listening(addr)).starts_with("HTTP/1.1 200"));
    let out = Command::new(BIN)
        .args(["upgrade", "--json", "--socket"])
        .arg(dir.path().join("admin.sock"))
        .output()
        .expect("run cutover upgrade");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let new_pid = stdout.lines().find_map(|line| {
        use cutover::admin::proto::{decode_report, Command as Admin, Reply, Report};
        let Ok(Reply::Ok { result }) = serde_json::from_str::<Reply>(line) else {
            return None;
        };
        match decode_report(&Admin::Upgrade { binary: None }, result).ok()? {
            Report::Upgrade(report) => Some(u64::from(report.pid)),
            _ => None,
        }
    });
    // Stop the new process whatever the assertions below say.
    struct Kill(Option<u64>);
    impl Drop for Kill {
        fn drop(&mut self) {
            if let Some(pid) = self.0 {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
    }
    let _kill = Kill(new_pid);
    assert!(
        out.status.success(),
        "{stdout}{}\nlog: {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    for _ in 0..3 {
        let response = get(TcpStream::connect(addr).expect("connect after the upgrade"));
        assert!(response.starts_with("HTTP/1.1 200"), "{response:?}");
    }
}
