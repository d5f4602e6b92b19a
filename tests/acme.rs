//! Automatic certificates against a real ACME server (Pebble, one per
//! test): first issuance by HTTP-01 and by TLS-ALPN-01, the certificate
//! served to a client that trusts only Pebble's root, a forced renewal that
//! swaps certificates while a connection stays open, a failed challenge
//! that leaves the previous certificate serving, a restart that reuses the
//! stored certificate with the CA gone, a name without a certificate
//! refused rather than served another's, and static `[[tls]]` certificates
//! side by side, picked by SNI.

mod common;
#[path = "common/pebble.rs"]
mod pebble;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::*;
use cutover::admin::proto::{CertStatus, Report};
use cutover::admin::Command;
use pebble::{tls_connect_trusting, Pebble};
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;

/// Longest wait for an issuance (Pebble issues in about a second).
const ISSUANCE_TIMEOUT: Duration = Duration::from_secs(60);

/// The two listeners a cutover serves on, bound before Pebble starts so
/// Pebble can be told their ports.
struct Ports {
    http: TcpListener,
    https: TcpListener,
}

impl Ports {
    async fn bind() -> Ports {
        Ports {
            http: TcpListener::bind("127.0.0.1:0").await.expect("bind http"),
            https: TcpListener::bind("127.0.0.1:0").await.expect("bind https"),
        }
    }

    fn http_port(&self) -> u16 {
        self.http.local_addr().expect("addr").port()
    }

    fn https_port(&self) -> u16 {
        self.https.local_addr().expect("addr").port()
    }
}

/// `proxy.toml` for a test: admin socket and state under `dir`, `[acme]`
/// pointing at `pebble`, then `sites` as given.
fn config_text(dir: &Path, pebble: &Pebble, challenges: &str, sites: &str) -> String {
    format!(
        r#"[server]
admin_socket = "{dir}/admin.sock"
state_dir = "{dir}/state"

[acme]
email = "ops@example.org"
directory = "{directory}"
ca_root = "{ca_root}"
challenges = {challenges}

{sites}
"#,
        dir = dir.display(),
        directory = pebble.directory,
        ca_root = pebble.ca_root.display(),
    )
}

/// Writes `config` to `dir/proxy.toml` and serves it on `ports`.
async fn start(dir: &Path, config: &str, ports: Ports) -> TestProxy {
    init_tracing();
    let path = dir.join("proxy.toml");
    std::fs::write(&path, config).expect("write config");
    let config = cutover::Config::load(&path).unwrap_or_else(|err| panic!("config: {err}"));
    let proxy = run_proxy(ports.http, Some(ports.https), config).await;
    wait_for_admin(&dir.join("admin.sock")).await;
    proxy
}

async fn admin(dir: &Path, command: Command) -> Result<Report, String> {
    admin_call(&dir.join("admin.sock"), command, ISSUANCE_TIMEOUT).await
}

/// Every certificate `cutover status` lists.
async fn certificates(dir: &Path) -> Vec<CertStatus> {
    match admin(dir, Command::Status { service: None }).await {
        Ok(Report::Status(status)) => status.certificates.unwrap_or_default(),
        other => panic!("status: {other:?}"),
    }
}

/// `cutover renew NAME`.
async fn renew(dir: &Path, name: &str) -> Result<CertStatus, String> {
    let name = name.to_string();
    match admin(dir, Command::Renew { name }).await? {
        Report::Renew(renewed) => Ok(renewed.certificate),
        other => panic!("renew answered with another report: {other:?}"),
    }
}

/// The status entry of one certificate.
async fn certificate(dir: &Path, name: &str) -> CertStatus {
    let all = certificates(dir).await;
    all.iter()
        .find(|cert| cert.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("no certificate {name} in {all:#?}"))
}

/// Polls status until `name`'s certificate satisfies `done`.
async fn wait_for(
    dir: &Path,
    name: &str,
    what: &str,
    done: impl Fn(&CertStatus) -> bool,
) -> CertStatus {
    let deadline = tokio::time::Instant::now() + ISSUANCE_TIMEOUT;
    loop {
        let cert = certificate(dir, name).await;
        if done(&cert) {
            return cert;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: never {what}; last status {cert:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_valid(dir: &Path, name: &str) -> CertStatus {
    wait_for(dir, name, "valid", |cert| cert.state == "valid").await
}

/// The leaf certificate cutover serves for `sni`, verified against `root`.
async fn served_leaf(
    https: std::net::SocketAddr,
    sni: &str,
    root: &CertificateDer<'static>,
) -> std::io::Result<Vec<u8>> {
    let tls = tls_connect_trusting(std::slice::from_ref(root), https, sni, &[b"http/1.1"]).await?;
    let peer = tls.get_ref().1.peer_certificates().expect("certificates");
    Ok(peer[0].as_ref().to_vec())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// The one CA directory under `state/acme/`.
fn ca_dir(dir: &Path) -> PathBuf {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir.join("state/acme"))
        .expect("acme dir")
        .map(|entry| entry.expect("entry").path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries.remove(0)
}

/// A `tls = "acme"` site for `acme_name` (its `/` answers 204) beside a
/// site for `static_hosts` (203) served by the dev `[[tls]]` certificates.
fn beside_static_sites(acme_name: &str, static_hosts: &[&str]) -> String {
    format!(
        r#"
[[tls]]
cert = "{root}/certs-dev/localhost.pem"
key = "{root}/certs-dev/localhost-key.pem"

[[tls]]
cert = "{root}/certs-dev/example.pem"
key = "{root}/certs-dev/example-key.pem"

[[site]]
hosts = ["{acme_name}"]
tls = "acme"
[[site.route]]
path = "/"
status = 204

[[site]]
hosts = {static_hosts:?}
[[site.route]]
path = "/"
status = 203
"#,
        root = root().display()
    )
}

const SITE_A: &str = r#"
[[site]]
hosts = ["a.test"]
tls = "acme"
https_redirect = true
[[site.route]]
path = "/"
status = 204
"#;

/// A cutover serving [`SITE_A`] with HTTP-01 against its own Pebble,
/// once `a.test` has its first certificate.
struct SiteA {
    dir: tempfile::TempDir,
    pebble: Pebble,
    proxy: TestProxy,
    config: String,
    /// The status entry of the first certificate.
    first: CertStatus,
}

async fn serve_site_a() -> SiteA {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = Ports::bind().await;
    let pebble = Pebble::start(ports.http_port(), ports.https_port()).await;
    let config = config_text(dir.path(), &pebble, r#"["http-01"]"#, SITE_A);
    let proxy = start(dir.path(), &config, ports).await;
    let first = wait_valid(dir.path(), "a.test").await;
    SiteA {
        dir,
        pebble,
        proxy,
        config,
        first,
    }
}

/// HTTP-01: the token is answered on plain HTTP although the site
/// redirects everything else to HTTPS; the certificate is then served to a
/// client that trusts only Pebble's root, and stored 0600.
#[tokio::test]
async fn http01_issues_a_certificate_that_is_served_and_stored() {
    let SiteA {
        dir,
        pebble,
        proxy,
        first: cert,
        ..
    } = serve_site_a().await;
    assert_eq!(cert.source, "acme");
    assert!(
        cert.issuer
            .as_deref()
            .is_some_and(|issuer| issuer.starts_with("Pebble")),
        "{cert:#?}"
    );
    let not_after = cert.not_after.expect("expiry");
    let next_renewal = cert.next_renewal.expect("next renewal");
    assert!(
        unix_now() < next_renewal && next_renewal < not_after,
        "{cert:#?}"
    );
    assert_eq!(cert.failures, 0);

    let root = pebble.issuing_root().await;
    let tls = tls_connect_trusting(&[root], proxy.https(), "a.test", &[b"http/1.1"])
        .await
        .expect("handshake with Pebble's certificate");
    let resp = send_h1(tls, request("GET", "/", "a.test", Bytes::new()))
        .await
        .expect("request over the issued certificate");
    assert_eq!(resp.status, 204);

    // Other plain-HTTP requests still get the site's redirect; unknown
    // challenge tokens are routed (to a certbot `dir` route, say).
    assert_eq!(http_get(proxy.http_addr, "a.test", "/").await.status, 301);
    let resp = http_get(
        proxy.http_addr,
        "a.test",
        "/.well-known/acme-challenge/unknown",
    )
    .await;
    assert_eq!(resp.status, 204);

    let ca = ca_dir(dir.path());
    assert_eq!(mode(&ca.join("account.json")), 0o600);
    assert_eq!(mode(&ca.join("certificates/a.test.pem")), 0o600);
    let bundle = std::fs::read_to_string(ca.join("certificates/a.test.pem")).expect("bundle");
    assert!(
        bundle.starts_with("-----BEGIN PRIVATE KEY-----"),
        "key first"
    );
    assert!(
        bundle.matches("BEGIN CERTIFICATE").count() >= 2,
        "leaf and intermediate"
    );
    proxy.stop().await.expect("clean stop");
}

/// TLS-ALPN-01 alone (Pebble's HTTP-01 port points nowhere useful), with
/// static `[[tls]]` certificates beside it: SNI picks Pebble's certificate
/// for the automatic name and the dev certificates for theirs.
#[tokio::test]
async fn tls_alpn01_issues_and_static_certificates_keep_serving_by_sni() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = Ports::bind().await;
    let unused_http_port = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let pebble = Pebble::start(unused_http_port, ports.https_port()).await;
    let sites = beside_static_sites("b.test", &["localhost", "example.test"]);
    let config = config_text(dir.path(), &pebble, r#"["tls-alpn-01"]"#, &sites);
    let proxy = start(dir.path(), &config, ports).await;

    wait_valid(dir.path(), "b.test").await;
    let pebble_root = pebble.issuing_root().await;
    let tls = tls_connect_trusting(
        std::slice::from_ref(&pebble_root),
        proxy.https(),
        "b.test",
        &[b"h2", b"http/1.1"],
    )
    .await
    .expect("handshake with Pebble's certificate");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "ordinary clients still get h2, never acme-tls/1"
    );

    let dev_leaf = |file: &str| load_certs(&cert_file(file))[0].as_ref().to_vec();
    let tls = tls_connect(proxy.https(), "localhost", &[b"http/1.1"]).await;
    let peer = tls.get_ref().1.peer_certificates().expect("certificates");
    assert_eq!(peer[0].as_ref(), &dev_leaf("localhost.pem")[..]);
    let tls = tls_connect(proxy.https(), "example.test", &[b"http/1.1"]).await;
    let peer = tls.get_ref().1.peer_certificates().expect("certificates");
    assert_eq!(peer[0].as_ref(), &dev_leaf("example.pem")[..]);
    let resp = https_h1(
        proxy.https(),
        "localhost",
        request("GET", "/", "localhost", Bytes::new()),
    )
    .await;
    assert_eq!(resp.status, 203);

    // Status lists the automatic certificate and both files.
    let status = certificates(dir.path()).await;
    let sources: Vec<(&str, &str)> = status
        .iter()
        .map(|cert| (cert.name.as_str(), cert.source.as_str()))
        .collect();
    assert_eq!(sources[0], ("b.test", "acme"), "{status:#?}");
    assert_eq!(
        sources
            .iter()
            .filter(|(_, source)| *source == "file")
            .count(),
        2
    );
    proxy.stop().await.expect("clean stop");
}

/// `cutover renew` replaces the certificate for new handshakes while a
/// connection made with the old one keeps serving requests; then a restart
/// with the CA gone serves the stored (renewed) certificate and never
/// tries the CA.
#[tokio::test]
async fn renewal_swaps_certificates_under_an_open_connection_and_a_restart_reuses_the_stored_one() {
    let SiteA {
        dir,
        mut pebble,
        proxy,
        config,
        first,
    } = serve_site_a().await;
    let root = pebble.issuing_root().await;
    let first_leaf = served_leaf(proxy.https(), "a.test", &root)
        .await
        .expect("first certificate");

    // A keep-alive connection made with the first certificate.
    let tls = tls_connect_trusting(
        std::slice::from_ref(&root),
        proxy.https(),
        "a.test",
        &[b"http/1.1"],
    )
    .await
    .expect("handshake");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("h1 handshake");
    let connection = tokio::spawn(conn);
    let resp = sender
        .send_request(request("GET", "/", "a.test", Bytes::new()))
        .await
        .expect("first request");
    assert_eq!(resp.status(), 204);

    let renewed = renew(dir.path(), "a.test").await.expect("renew");
    assert_eq!(renewed.state, "valid", "{renewed:#?}");
    let second_leaf = served_leaf(proxy.https(), "a.test", &root)
        .await
        .expect("renewed certificate");
    assert_ne!(
        first_leaf, second_leaf,
        "new handshakes get the new certificate"
    );
    let second = certificate(dir.path(), "a.test").await;
    assert!(second.not_after >= first.not_after);

    sender.ready().await.expect("old connection still open");
    let resp = sender
        .send_request(request("GET", "/", "a.test", Bytes::new()))
        .await
        .expect("request on the connection made before the renewal");
    assert_eq!(resp.status(), 204);
    assert!(!connection.is_finished());
    drop(sender);

    proxy.stop().await.expect("clean stop");
    pebble.kill();

    // Restart: the CA is gone, the stored certificate serves at once.
    let ports = Ports::bind().await;
    let proxy = start(dir.path(), &config, ports).await;
    let restored = wait_for(dir.path(), "a.test", "restored", |cert| {
        cert.state == "valid" && cert.next_renewal.is_some()
    })
    .await;
    assert_eq!(
        served_leaf(proxy.https(), "a.test", &root)
            .await
            .expect("stored certificate"),
        second_leaf
    );
    assert_eq!(restored.failures, 0, "no order was tried: {restored:#?}");
    assert!(restored.last_error.is_none(), "{restored:#?}");
    assert!(
        restored.next_renewal.expect("next") > unix_now() + 86_400,
        "renewal is not due for a long time: {restored:#?}"
    );
    proxy.stop().await.expect("clean stop");
}

/// A renewal whose challenge fails (the name's DNS now points elsewhere)
/// changes nothing that serves: the previous certificate and its file
/// stay, status reports the failure, and the scheduled renewal keeps its
/// time (the certificate is still good for years).
#[tokio::test]
async fn a_failed_challenge_leaves_the_previous_certificate_serving() {
    let SiteA {
        dir,
        pebble,
        proxy,
        first: before,
        ..
    } = serve_site_a().await;
    let root = pebble.issuing_root().await;
    let leaf = served_leaf(proxy.https(), "a.test", &root)
        .await
        .expect("certificate");
    let stored = ca_dir(dir.path()).join("certificates/a.test.pem");
    let stored_before = std::fs::read(&stored).expect("stored");

    pebble.point_dns_at("127.0.0.2").await;
    let err = renew(dir.path(), "a.test")
        .await
        .expect_err("the renewal must fail");
    assert!(
        err.contains("could not validate a.test by http-01"),
        "{err}\n{}",
        pebble.logs()
    );

    assert_eq!(
        served_leaf(proxy.https(), "a.test", &root)
            .await
            .expect("previous certificate"),
        leaf
    );
    assert_eq!(std::fs::read(&stored).expect("stored"), stored_before);
    let cert = certificate(dir.path(), "a.test").await;
    assert_eq!(cert.state, "valid", "{cert:#?}");
    assert_eq!(cert.failures, 1, "{cert:#?}");
    assert!(
        cert.last_error
            .as_deref()
            .is_some_and(|e| e.contains("could not validate")),
        "{cert:#?}"
    );
    assert_eq!(cert.next_renewal, before.next_renewal, "{cert:#?}");
    assert_eq!(cert.not_after, before.not_after, "{cert:#?}");
    proxy.stop().await.expect("clean stop");
}

/// Until a name has a certificate its handshakes are refused (never
/// answered with another name's certificate), status says why and when the
/// next try is (about a minute after the first failure), and other names
/// keep working.
#[tokio::test]
async fn a_name_without_a_certificate_is_refused_not_served_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = Ports::bind().await;
    let pebble = Pebble::start(ports.http_port(), ports.https_port()).await;
    pebble.point_dns_at("127.0.0.2").await;
    let sites = beside_static_sites("c.test", &["localhost"]);
    let config = config_text(dir.path(), &pebble, r#"["http-01", "tls-alpn-01"]"#, &sites);
    let proxy = start(dir.path(), &config, ports).await;

    let cert = wait_for(dir.path(), "c.test", "failed", |cert| cert.failures >= 1).await;
    assert_eq!(cert.state, "pending", "{cert:#?}");
    assert!(
        cert.last_error
            .as_deref()
            .is_some_and(|e| e.contains("could not validate c.test by http-01")),
        "{cert:#?}"
    );
    let retry = cert.next_renewal.expect("retry time");
    let failed_at = cert.last_attempt.expect("last attempt");
    assert!(
        (failed_at + 54..=failed_at + 66).contains(&retry),
        "first retry 54-66 s after the failure, got {}s: {cert:#?}",
        retry.saturating_sub(failed_at)
    );

    // Whatever roots the client trusts, there is no certificate to see.
    let mut roots = load_certs(&cert_file("ca.pem"));
    roots.push(pebble.issuing_root().await);
    let err = tls_connect_trusting(&roots, proxy.https(), "c.test", &[b"http/1.1"])
        .await
        .expect_err("no certificate for c.test yet");
    assert!(
        err.to_string().contains("AccessDenied") || err.to_string().contains("access"),
        "{err}"
    );
    let resp = https_h1(
        proxy.https(),
        "localhost",
        request("GET", "/", "localhost", Bytes::new()),
    )
    .await;
    assert_eq!(resp.status, 203);
    proxy.stop().await.expect("clean stop");
}

/// `cutover check` says what automatic certificates need before `serve`
/// finds out: an HTTPS listener, a listener for some configured challenge;
/// and it does not call an automatic name "not covered by any [[tls]]".
#[test]
fn check_reports_what_automatic_certificates_need() {
    let dir = tempfile::tempdir().expect("tempdir");
    let check = |server: &str, challenges: &str| {
        let path = dir.path().join("proxy.toml");
        std::fs::write(
            &path,
            format!(
                "[server]\nstate_dir = \"state\"\n{server}\n[acme]\nchallenges = {challenges}\n\
                 [[site]]\nhosts = [\"a.test\"]\ntls = \"acme\"\n"
            ),
        )
        .expect("write");
        cutover::check::findings(&path)
    };
    let found = check("http = \"127.0.0.1:80\"", r#"["http-01"]"#);
    assert!(
        found
            .problems
            .iter()
            .any(|p| p.contains("needs an HTTPS listener")),
        "{found:?}"
    );
    let found = check("https = \"127.0.0.1:443\"", r#"["http-01"]"#);
    assert!(
        found
            .problems
            .iter()
            .any(|p| p.contains("needs a plain-HTTP listener")),
        "{found:?}"
    );
    let found = check("https = \"127.0.0.1:443\"", r#"["tls-alpn-01"]"#);
    assert!(found.problems.is_empty(), "{found:?}");
    assert!(found.warnings.is_empty(), "{found:?}");
}

/// A reload that adds a name orders its certificate; one that changes
/// `[acme]` (here the email) restarts every name from its stored
/// certificate without ordering again; one that drops a name stops
/// managing it (its handshakes are refused here: no `[[tls]]` covers it).
#[tokio::test]
async fn reload_follows_added_and_removed_names_and_changed_settings() {
    let site = serve_site_a().await;
    let (dir, root) = (site.dir.path(), site.pebble.issuing_root().await);
    let leaf_a = served_leaf(site.proxy.https(), "a.test", &root)
        .await
        .expect("a.test certificate");
    let site_d = SITE_A.replace("a.test", "d.test");

    std::fs::write(dir.join("proxy.toml"), format!("{}{site_d}", site.config)).expect("write");
    admin(dir, Command::Reload {}).await.expect("reload");
    wait_valid(dir, "d.test").await;
    served_leaf(site.proxy.https(), "d.test", &root)
        .await
        .expect("d.test certificate");

    let new_email = site.config.replace("ops@example.org", "certs@example.org");
    std::fs::write(dir.join("proxy.toml"), format!("{new_email}{site_d}")).expect("write");
    admin(dir, Command::Reload {}).await.expect("reload");
    let a = wait_for(dir, "a.test", "restored", |cert| {
        cert.state == "valid" && cert.next_renewal.is_some()
    })
    .await;
    assert_eq!(a.not_after, site.first.not_after, "{a:#?}");
    assert_eq!(
        served_leaf(site.proxy.https(), "a.test", &root)
            .await
            .expect("a.test certificate"),
        leaf_a,
        "no new order for a settings change"
    );

    let without_a = new_email.replace(SITE_A, "");
    std::fs::write(dir.join("proxy.toml"), format!("{without_a}{site_d}")).expect("write");
    admin(dir, Command::Reload {}).await.expect("reload");
    let status = certificates(dir).await;
    let names: Vec<&str> = status.iter().map(|cert| cert.name.as_str()).collect();
    assert_eq!(names, vec!["d.test"], "{status:#?}");
    assert!(served_leaf(site.proxy.https(), "a.test", &root)
        .await
        .is_err());
    site.proxy.stop().await.expect("clean stop");
}
