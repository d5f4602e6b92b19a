//! `cutover rollout` and `cutover status --hosts` against three real
//! cutover instances on this machine (each its own config, port, state
//! directory, instance name and admin socket; one Docker engine), reached
//! over a real sshd this test starts on a loopback port with keys it
//! generates. The remote command is the built `cutover` binary with each
//! host's admin socket, as it would be on three machines.
//!
//! Needs a Docker engine, `/usr/sbin/sshd`, `ssh` and `ssh-keygen`
//! (`.ci/run` installs them). Never pulls: images are built locally.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::time::Instant;

use cutover::admin::proto::exit;
use support::cutover::*;
use support::harness::*;

// ---------------------------------------------------------------------------
// The sshd
// ---------------------------------------------------------------------------

/// An sshd on 127.0.0.1:<port> accepting one generated key for the
/// current user, killed when dropped.
struct Sshd {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl Sshd {
    async fn start() -> Sshd {
        let dir = tempfile::tempdir().expect("tempdir");
        for key in ["host_key", "client_key", "wrong_key"] {
            run(
                "ssh-keygen",
                &["-q", "-t", "ed25519", "-N", "", "-C", key, "-f"],
                &dir.path().join(key),
            );
        }
        std::fs::copy(
            dir.path().join("client_key.pub"),
            dir.path().join("authorized_keys"),
        )
        .expect("authorized_keys");
        // sshd refuses to start without its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd (run as root)");
        let port = free_port();
        let d = dir.path().display();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n\
             AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\n\
             StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nLogLevel VERBOSE\n"
        );
        std::fs::write(dir.path().join("sshd_config"), config).expect("sshd_config");
        let child = std::process::Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-f")
            .arg(dir.path().join("sshd_config"))
            .arg("-E")
            .arg(dir.path().join("sshd.log"))
            .stdin(Stdio::null())
            .spawn()
            .expect("start /usr/sbin/sshd");
        let sshd = Sshd { dir, port, child };
        let start = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "sshd did not listen within 10 s:\n{}",
                sshd.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sshd
    }

    fn key(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(program: &str, args: &[&str], last: &Path) {
    let status = std::process::Command::new(program)
        .args(args)
        .arg(last)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed: {status}");
}

fn current_user() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

// ---------------------------------------------------------------------------
// Three hosts
// ---------------------------------------------------------------------------

/// Three cutovers with one service, an sshd in front of them, and fleet
/// files naming them h1, h2, h3. Dropped in order: hosts (the first one's
/// clean-up removes the containers and images), then sshd.
struct World {
    hosts: Vec<Harness>,
    sshd: Sshd,
}

impl World {
    /// `deadlines`: each host's health-check deadline.
    async fn start(test: &str, deadlines: [&'static str; 3]) -> World {
        let pid = std::process::id();
        let opts = |n: usize| Opts {
            deadline: deadlines[n],
            instance: Some(format!("fleet-{test}-h{}-{pid}", n + 1)),
            ..Opts::default()
        };
        let first = Harness::start(&format!("fleet-{test}"), opts(0)).await;
        let second = first.beside(opts(1)).await;
        let third = first.beside(opts(2)).await;
        World {
            hosts: vec![first, second, third],
            sshd: Sshd::start().await,
        }
    }

    fn svc(&self) -> &str {
        &self.hosts[0].svc
    }

    /// A fleet file: every host logs in with `key`; `overrides` adds
    /// (host index, TOML line) to a host's entry.
    fn fleet_file(&self, name: &str, key: &str, overrides: &[(usize, String)]) -> String {
        let mut text = format!(
            "[fleet]\ncommand = \"{CUTOVER}\"\nport = {}\nidentity = \"{}\"\n\
             ssh_options = [\"StrictHostKeyChecking=no\", \"UserKnownHostsFile=/dev/null\", \"LogLevel=ERROR\"]\n\
             connect_timeout = \"5s\"\nversion_header = \"x-app-version\"\n",
            self.sshd.port,
            self.sshd.key(key).display(),
        );
        let user = current_user();
        for (n, host) in self.hosts.iter().enumerate() {
            text.push_str(&format!(
                "\n[[fleet.host]]\nname = \"h{}\"\nssh = \"{user}@127.0.0.1\"\nsocket = \"{}\"\nurl = \"http://{}/\"\n",
                n + 1,
                host.proxy.admin_socket.display(),
                host.proxy.http,
            ));
            for (_, line) in overrides.iter().filter(|(i, _)| *i == n) {
                text.push_str(line);
                text.push('\n');
            }
        }
        let path = self.hosts[0].dir().join(name);
        std::fs::write(&path, text).expect("write fleet file");
        path.display().to_string()
    }

    /// Deploys `image` on every host with its local CLI.
    async fn deploy_everywhere(&self, image: &str) {
        for host in &self.hosts {
            host.deploy_ok(image).await;
        }
    }

    async fn versions(&self) -> Vec<String> {
        let mut versions = Vec::new();
        for host in &self.hosts {
            versions.push(host.version().await);
        }
        versions
    }

    async fn rollout(&self, fleet: &str, tag: &str) -> CliOutput {
        let out = cli(
            &["rollout", self.svc(), "--tag", tag, "--fleet", fleet],
            Duration::from_secs(180),
        )
        .await;
        eprintln!("{out}");
        out
    }
}

/// The result table's row for `host`: its cells after the name.
fn table_row(out: &CliOutput, host: &str) -> String {
    let header = out
        .stdout
        .lines()
        .position(|l| l.starts_with("HOST "))
        .unwrap_or_else(|| panic!("no result table: {out}"));
    out.stdout
        .lines()
        .skip(header + 1)
        .find(|l| l.split_whitespace().next() == Some(host))
        .unwrap_or_else(|| panic!("no row for {host}: {out}"))
        .to_string()
}

/// Keep-alive and fresh-connection GET loops against one host until
/// `stop` (bounded to 120 s): the versions they saw and every failure.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
    failures: Arc<Mutex<Vec<String>>>,
}

impl Load {
    fn start(name: &'static str, http: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let hard_limit = Instant::now() + Duration::from_secs(120);
        let mut tasks = Vec::new();
        for n in 0..3 {
            let (stop, failures) = (stop.clone(), failures.clone());
            tasks.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                let fail = |e: String| {
                    failures
                        .lock()
                        .expect("lock")
                        .push(format!("{name}/{n}: {e}"))
                };
                let mut conn = if n < 2 {
                    match KeepAlive::connect(http).await {
                        Ok(conn) => Some(conn),
                        Err(e) => {
                            fail(e);
                            return seen;
                        }
                    }
                } else {
                    None
                };
                while !stop.load(Ordering::Relaxed) && Instant::now() < hard_limit {
                    let answer = match &mut conn {
                        Some(conn) => conn.get("/").await,
                        None => get(http, "/").await,
                    };
                    match answer {
                        Ok(a) if a.status == 200 => seen.push(a.version),
                        Ok(a) => fail(format!("status {} {:?}", a.status, a.body)),
                        Err(e) => {
                            fail(e);
                            return seen;
                        }
                    }
                    // Leave the two cores to the deploys too.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                seen
            }));
        }
        Load {
            stop,
            tasks,
            failures,
        }
    }

    async fn finish(self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut seen = Vec::new();
        for task in self.tasks {
            seen.extend(
                tokio::time::timeout(Duration::from_secs(30), task)
                    .await
                    .expect("load loop ended")
                    .expect("load task"),
            );
        }
        let failures = self.failures.lock().expect("lock").clone();
        (seen, failures)
    }
}

// ---------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_under_load_moves_every_host_with_no_failed_request() {
    let world = World::start("load", ["10s", "10s", "10s"]).await;
    let v1 = world.hosts[0].image("v1", &[]).await;
    world.hosts[0].image("v2", &[]).await;
    world.deploy_everywhere(&v1).await;
    let fleet = world.fleet_file("fleet.toml", "client_key", &[]);

    let names = ["h1", "h2", "h3"];
    let loads: Vec<Load> = world
        .hosts
        .iter()
        .zip(names)
        .map(|(host, name)| Load::start(name, host.proxy.http))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = world.rollout(&fleet, "v2").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut results = Vec::new();
    for load in loads {
        results.push(load.finish().await);
    }

    assert_eq!(out.code, Some(0), "rollout failed: {out}");
    for ((seen, failures), name) in results.iter().zip(names) {
        let v1s = seen.iter().filter(|v| *v == "v1").count();
        let v2s = seen.iter().filter(|v| *v == "v2").count();
        eprintln!(
            "{name}: {v1s} answers from v1, {v2s} from v2, {} failed",
            failures.len()
        );
        assert!(
            failures.is_empty(),
            "{name}: failed requests: {failures:#?}"
        );
        assert!(
            v1s > 0 && v2s > 0,
            "{name} saw the switch: {v1s} v1, {v2s} v2"
        );
        assert_eq!(v1s + v2s, seen.len(), "{name}: only v1 and v2 answered");
    }
    assert_eq!(world.versions().await, ["v2", "v2", "v2"]);
    // Host after host: each finished (its public check passed) before the
    // next one started, and every line names its host.
    let lines: Vec<&str> = out.stdout.lines().collect();
    let first = |host: &str, what: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(host) && l.contains(what))
            .unwrap_or_else(|| panic!("no {host} line with {what:?}: {out}"))
    };
    assert!(first("h1", "check") < first("h2", "image"), "{out}");
    assert!(first("h2", "check") < first("h3", "image"), "{out}");
    assert!(
        first("h1", "answered 200 OK with x-app-version: v2") > 0,
        "{out}"
    );
    for name in names {
        let row = table_row(&out, name);
        assert!(
            row.contains("deployed") && row.contains(&v1),
            "{name}: {row}"
        );
    }

    let status = cli(
        &["status", world.svc(), "--fleet", &fleet],
        Duration::from_secs(60),
    )
    .await;
    eprintln!("{status}");
    assert!(status.success(), "{status}");
    let v2 = format!("{}:v2", world.hosts[0].repo);
    for name in names {
        let row = table_row(&status, name);
        assert!(row.contains(&v2) && row.contains(&v1), "{name}: {row}");
    }
    assert!(!status.stdout.contains("MIXED"), "{status}");
    world.hosts[0].done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_failure_on_host_2_rolls_host_1_back_and_leaves_host_3() {
    // The new image needs 4 s to turn healthy: host 2 allows 2 s.
    let world = World::start("fail", ["10s", "2s", "10s"]).await;
    let v1 = world.hosts[0].image("v1", &[]).await;
    world.hosts[0]
        .image("v3", &[("HEALTHY_AFTER_MS", "4000")])
        .await;
    world.deploy_everywhere(&v1).await;
    let third_before = world.hosts[2].containers();
    let fleet = world.fleet_file("fleet.toml", "client_key", &[]);

    let out = world.rollout(&fleet, "v3").await;

    assert_eq!(out.code, Some(i32::from(exit::FAILED)), "{out}");
    assert_eq!(world.versions().await, ["v1", "v1", "v1"], "{out}");
    assert!(table_row(&out, "h1").contains("rolled back"), "{out}");
    let h2 = table_row(&out, "h2");
    assert!(
        h2.contains("failed") && !h2.contains("rolled back"),
        "{out}"
    );
    assert!(table_row(&out, "h3").contains("untouched"), "{out}");
    assert!(
        !out.stdout
            .lines()
            .any(|l| l.starts_with("h3 ") && !l.contains("untouched")),
        "h3 was never asked to deploy: {out}"
    );
    assert_eq!(
        world.hosts[2].containers(),
        third_before,
        "host 3 untouched"
    );
    // Host 1 swapped back to its warm v1 container: the v3 one is now the
    // warm previous colour.
    let first = world.hosts[0].consistent().await;
    let active_image = first.active.as_ref().and_then(|a| a.image.as_deref());
    assert_eq!(active_image, Some(v1.as_str()), "{first:?}");
    let previous_image = first.previous.as_ref().and_then(|p| p.image.as_deref());
    assert!(previous_image.unwrap_or("").ends_with(":v3"), "{first:?}");
    world.hosts[1].consistent().await;

    // A mixed fleet shows in one table.
    let v2 = world.hosts[0].image("v2", &[]).await;
    world.hosts[2].deploy_ok(&v2).await;
    let status = cli(&["status", "--fleet", &fleet], Duration::from_secs(60)).await;
    eprintln!("{status}");
    assert!(status.success(), "{status}");
    assert!(table_row(&status, "h3").contains(&v2), "{status}");
    assert!(table_row(&status, "h1").contains(&v1), "{status}");
    assert!(
        status
            .stdout
            .contains(&format!("MIXED: {} serves 2 images", world.svc())),
        "{status}"
    );
    world.hosts[0].done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_rollout_rolls_back_the_hosts_it_switched() {
    let world = World::start("sigint", ["10s", "10s", "10s"]).await;
    let v1 = world.hosts[0].image("v1", &[]).await;
    world.hosts[0]
        .image("v3", &[("HEALTHY_AFTER_MS", "2500")])
        .await;
    world.deploy_everywhere(&v1).await;
    let third_before = world.hosts[2].containers();
    let fleet = world.fleet_file("fleet.toml", "client_key", &[]);

    let mut child = tokio::process::Command::new(CUTOVER)
        .args(["rollout", world.svc(), "--tag", "v3", "--fleet", &fleet])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group, signalled as a whole below: what Ctrl-C
        // in a terminal does (the ssh sessions must survive it).
        .process_group(0)
        .spawn()
        .expect("spawn cutover rollout");
    let pid = child.id().expect("pid").to_string();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut stdout = String::new();
    let mut signalled = false;
    let reading = async {
        while let Ok(Some(line)) = lines.next_line().await {
            stdout.push_str(&line);
            stdout.push('\n');
            // Host 2's deploy has started (host 1 switched and checked).
            if !signalled && line.starts_with("h2 ") {
                let sent = std::process::Command::new("kill")
                    .args(["-INT", "--", &format!("-{pid}")])
                    .status()
                    .expect("kill -INT");
                assert!(sent.success());
                signalled = true;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), reading)
        .await
        .unwrap_or_else(|_| panic!("rollout still printing after 120 s:\n{stdout}"));
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("rollout exited")
        .expect("wait");
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = pipe.read_to_string(&mut stderr).await;
    }
    eprintln!("rollout: {status}\n{stdout}\n{stderr}");
    let out = CliOutput {
        args: Vec::new(),
        code: status.code(),
        stdout,
        stderr,
        elapsed: Duration::ZERO,
    };

    assert!(signalled, "host 2 never started: {out}");
    assert_eq!(out.code, Some(i32::from(exit::FAILED)), "{out}");
    assert!(out.stdout.contains("interrupted by SIGINT"), "{out}");
    assert_eq!(world.versions().await, ["v1", "v1", "v1"], "{out}");
    assert!(table_row(&out, "h1").contains("rolled back"), "{out}");
    assert!(table_row(&out, "h2").contains("rolled back"), "{out}");
    assert!(table_row(&out, "h3").contains("untouched"), "{out}");
    assert_eq!(
        world.hosts[2].containers(),
        third_before,
        "host 3 untouched"
    );
    for host in &world.hosts[..2] {
        let status = host.consistent().await;
        let active_image = status.active.as_ref().and_then(|a| a.image.as_deref());
        assert_eq!(active_image, Some(v1.as_str()), "{status:?}");
    }
    world.hosts[0].done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_identity_is_refused_before_anything_changes() {
    let world = World::start("key", ["10s", "10s", "10s"]).await;
    let v1 = world.hosts[0].image("v1", &[]).await;
    world.hosts[0].image("v2", &[]).await;
    world.deploy_everywhere(&v1).await;
    let before: Vec<Vec<Ctr>> = world.hosts.iter().map(Harness::containers).collect();
    // h1 and h2 would let us in; h3 is given a key it does not know.
    let wrong = format!("identity = \"{}\"", world.sshd.key("wrong_key").display());
    let fleet = world.fleet_file("wrong.toml", "client_key", &[(2, wrong)]);

    let out = world.rollout(&fleet, "v2").await;

    assert_eq!(out.code, Some(i32::from(exit::UNREACHABLE)), "{out}");
    let h3 = out
        .stdout
        .lines()
        .find(|l| l.starts_with("h3 ") && l.contains("refused"))
        .unwrap_or_else(|| panic!("no refusal line for h3: {out}"));
    assert!(h3.contains("Permission denied (publickey)"), "{h3}");
    assert!(h3.contains("wrong_key"), "names the key: {h3}");
    assert!(out.stdout.contains("nothing was changed"), "{out}");
    assert!(
        out.stderr.contains("ssh refused this client's identity"),
        "logged: {out}"
    );
    for name in ["h1", "h2"] {
        assert!(table_row(&out, name).contains("untouched"), "{out}");
    }
    let row = table_row(&out, "h3");
    assert!(
        row.contains("not reached") && row.contains("ssh refused"),
        "{row}"
    );
    assert_eq!(world.versions().await, ["v1", "v1", "v1"]);
    let after: Vec<Vec<Ctr>> = world.hosts.iter().map(Harness::containers).collect();
    assert_eq!(before, after, "no container started or stopped anywhere");
    // sshd refused the key itself, before any command ran.
    let log = world.sshd.log();
    assert!(log.contains("Failed publickey for"), "sshd log:\n{log}");

    let status = cli(&["status", "--fleet", &fleet], Duration::from_secs(60)).await;
    eprintln!("{status}");
    assert_eq!(status.code, Some(i32::from(exit::UNREACHABLE)), "{status}");
    assert!(table_row(&status, "h1").contains(&v1), "{status}");
    assert!(table_row(&status, "h3").contains("ssh refused"), "{status}");

    // A host nothing answers on fails the rollout up front the same way.
    let closed = format!("port = {}", free_port());
    let fleet = world.fleet_file("closed.toml", "client_key", &[(1, closed)]);
    let out = world.rollout(&fleet, "v2").await;
    assert_eq!(out.code, Some(i32::from(exit::UNREACHABLE)), "{out}");
    let h2 = out
        .stdout
        .lines()
        .find(|l| l.starts_with("h2 ") && l.contains("unreachable over ssh"))
        .unwrap_or_else(|| panic!("no unreachable line for h2: {out}"));
    assert!(h2.contains("Connection refused"), "{h2}");
    assert!(out.stdout.contains("nothing was changed"), "{out}");
    assert!(table_row(&out, "h2").contains("not reached"), "{out}");
    assert!(table_row(&out, "h3").contains("untouched"), "{out}");
    assert_eq!(world.versions().await, ["v1", "v1", "v1"]);
    let after: Vec<Vec<Ctr>> = world.hosts.iter().map(Harness::containers).collect();
    assert_eq!(before, after, "no container started or stopped anywhere");
    world.hosts[0].done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_goes_first_and_bakes_then_the_rest_in_parallel() {
    let world = World::start("canary", ["10s", "10s", "10s"]).await;
    let v1 = world.hosts[0].image("v1", &[]).await;
    world.hosts[0].image("v2", &[]).await;
    world.deploy_everywhere(&v1).await;
    let fleet = world.fleet_file("fleet.toml", "client_key", &[]);

    let out = cli(
        &[
            "rollout",
            world.svc(),
            "--tag",
            "v2",
            "--fleet",
            &fleet,
            "--canary-host",
            "h3",
            "--bake",
            "1s",
            "--parallel",
            "2",
        ],
        Duration::from_secs(180),
    )
    .await;
    eprintln!("{out}");

    assert!(out.success(), "{out}");
    assert_eq!(world.versions().await, ["v2", "v2", "v2"]);
    let lines: Vec<&str> = out.stdout.lines().collect();
    let position = |host: &str, what: &str, last: bool| {
        let mut found = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.starts_with(host) && l.contains(what))
            .map(|(i, _)| i);
        let at = if last {
            found.next_back()
        } else {
            found.next()
        };
        at.unwrap_or_else(|| panic!("no {host} line with {what:?}: {out}"))
    };
    // h3 alone, checked, baked and checked again before h1 and h2 start.
    let baked = position("h3", "bake", false);
    assert!(position("h3", "check", false) < baked, "{out}");
    assert!(
        position("h3", "check", true) > baked,
        "checked again after the bake: {out}"
    );
    let h1_start = position("h1", "image", false);
    let h2_start = position("h2", "image", false);
    assert!(
        position("h3", "check", true) < h1_start.min(h2_start),
        "{out}"
    );
    // h1 and h2 ran at once: each started before the other finished.
    assert!(h1_start < position("h2", "done", false), "{out}");
    assert!(h2_start < position("h1", "done", false), "{out}");
    for name in ["h1", "h2", "h3"] {
        assert!(table_row(&out, name).contains("deployed"), "{out}");
    }
    world.hosts[0].done();
}
