//! A real ACME server for the tests: Pebble (Debian package `pebble`),
//! one process per test, on loopback, started from the package's example
//! config with its addresses and validation ports set for the test.
//!
//! * Pebble validates HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port`:
//!   the test passes the ports its cutover listens on.
//! * Names resolve through `pebble-challtestsrv` (same package) as a DNS
//!   server answering 127.0.0.1 for every name; [`Pebble::point_dns_at`]
//!   moves them elsewhere, which makes validations fail as a real DNS
//!   mistake would.
//! * Pebble's own HTTPS listener uses a certificate made here, signed by a
//!   made-up CA ([`Pebble::ca_root`]: what `[acme] ca_root` trusts), as
//!   the package's `pebble.minica.pem` would be (Debian does not ship it).
//! * Issued certificates chain to a root Pebble makes at start:
//!   [`Pebble::issuing_root`] fetches it from the management port.
//!
//! `PEBBLE_VA_NOSLEEP=1` (validate at once), `PEBBLE_AUTHZREUSE=0` (every
//! order proves control again; a renewal with a broken challenge must fail)
//! and `PEBBLE_WFE_NONCEREJECT=0` (no random bad nonces: deterministic).
//! `PEBBLE_VA_ALWAYS_VALID` is never set: validation is real.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// The example config the Debian package ships: the tests start from it.
const EXAMPLE_CONFIG: &str = "/usr/share/doc/pebble/examples/pebble-config.json";
/// What [`EXAMPLE_CONFIG`] holds in pebble 2.4.
const EXAMPLE_CONFIG_CONTENTS: &str = r#"{
  "pebble": {
    "listenAddress": "0.0.0.0:14000",
    "managementListenAddress": "0.0.0.0:15000",
    "certificate": "test/certs/localhost/cert.pem",
    "privateKey": "test/certs/localhost/key.pem",
    "httpPort": 5002,
    "tlsPort": 5001,
    "ocspResponderURL": "",
    "externalAccountBindingRequired": false
  }
}"#;
/// How long Pebble may take to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Pebble {
    pebble: Child,
    dns: Child,
    /// The ACME directory URL.
    pub directory: String,
    /// The root that Pebble's own HTTPS certificate chains to.
    pub ca_root: PathBuf,
    management: SocketAddr,
    dns_management: SocketAddr,
    dir: tempfile::TempDir,
}

impl Pebble {
    /// Starts Pebble validating on `http_port` and `tls_port` of 127.0.0.1.
    pub async fn start(http_port: u16, tls_port: u16) -> Pebble {
        let mut last_failure = String::new();
        // Free ports are picked by binding port 0 and letting go, so another
        // process can take one in between: try again with new ports.
        for _ in 0..3 {
            match Pebble::try_start(http_port, tls_port).await {
                Ok(pebble) => return pebble,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("Pebble did not start:\n{last_failure}");
    }

    async fn try_start(http_port: u16, tls_port: u16) -> Result<Pebble, String> {
        for tool in ["pebble", "pebble-challtestsrv"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success()),
                "{tool} is not installed: `apt-get install -y pebble` (.ci/run does)"
            );
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca_root, cert, key) = write_listener_certificate(dir.path());
        let listen = free_tcp_port();
        let management = free_tcp_port();
        let dns = free_udp_port();
        let dns_management = free_tcp_port();

        // Images that drop /usr/share/doc lose the example; its contents
        // (pebble 2.4) stand in then.
        let example = std::fs::read_to_string(EXAMPLE_CONFIG)
            .unwrap_or_else(|_| EXAMPLE_CONFIG_CONTENTS.to_string());
        let mut config: serde_json::Value =
            serde_json::from_str(&example).expect("the example config is JSON");
        let settings = &mut config["pebble"];
        settings["listenAddress"] = format!("127.0.0.1:{listen}").into();
        settings["managementListenAddress"] = format!("127.0.0.1:{management}").into();
        settings["certificate"] = cert.display().to_string().into();
        settings["privateKey"] = key.display().to_string().into();
        settings["httpPort"] = http_port.into();
        settings["tlsPort"] = tls_port.into();
        let config_path = dir.path().join("pebble-config.json");
        std::fs::write(&config_path, config.to_string()).expect("write pebble config");

        let log = |name: &str| std::fs::File::create(dir.path().join(name)).expect("log file");
        let dns_child = Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .spawn()
            .expect("spawn pebble-challtestsrv");
        let pebble_child = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_AUTHZREUSE", "0")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .expect("spawn pebble");
        let pebble = Pebble {
            pebble: pebble_child,
            dns: dns_child,
            directory: format!("https://127.0.0.1:{listen}/dir"),
            ca_root,
            management: ([127, 0, 0, 1], management).into(),
            dns_management: ([127, 0, 0, 1], dns_management).into(),
            dir,
        };
        let listen_addr: SocketAddr = ([127, 0, 0, 1], listen).into();
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let pebble_up = pebble.https_get(listen_addr, "/dir").await.is_ok();
            let dns_up = TcpStream::connect(pebble.dns_management).await.is_ok();
            if pebble_up && dns_up {
                return Ok(pebble);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(pebble.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Pebble's and the DNS server's output so far (for failure messages).
    pub fn logs(&self) -> String {
        [
            "pebble.log",
            "pebble.err",
            "challtestsrv.log",
            "challtestsrv.err",
        ]
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            format!("--- {name}\n{text}")
        })
        .collect()
    }

    /// The root the certificates Pebble issues chain to.
    pub async fn issuing_root(&self) -> CertificateDer<'static> {
        let pem = self
            .https_get(self.management, "/roots/0")
            .await
            .unwrap_or_else(|err| panic!("GET /roots/0: {err}\n{}", self.logs()));
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("root PEM")
    }

    /// Makes every name resolve to `ip` for Pebble's validations.
    pub async fn point_dns_at(&self, ip: &str) {
        let body = serde_json::json!({ "ip": ip }).to_string();
        let request = format!(
            "POST /set-default-ipv4 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let answer = crate::common::raw_exchange(self.dns_management, request.as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "set-default-ipv4: {answer}"
        );
    }

    /// Stops Pebble (and its DNS server) now.
    pub fn kill(&mut self) {
        let _ = self.pebble.kill();
        let _ = self.pebble.wait();
        let _ = self.dns.kill();
        let _ = self.dns.wait();
    }

    /// GET over HTTPS trusting [`ca_root`](Self::ca_root); the body as text.
    async fn https_get(&self, addr: SocketAddr, path: &str) -> Result<String, String> {
        let roots = vec![CertificateDer::from_pem_file(&self.ca_root).expect("ca root")];
        let tls = tls_connect_trusting(&roots, addr, "localhost", &[b"http/1.1"])
            .await
            .map_err(|err| err.to_string())?;
        let request = crate::common::request("GET", path, "localhost", bytes::Bytes::new());
        let response = tokio::time::timeout(
            crate::common::IO_TIMEOUT,
            crate::common::send_h1(tls, request),
        )
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|err| err.to_string())?;
        if response.status != 200 {
            return Err(format!("{path}: status {}", response.status));
        }
        Ok(response.text())
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TLS connection to `addr` with SNI `sni`, verifying against `roots`.
pub async fn tls_connect_trusting(
    roots: &[CertificateDer<'static>],
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).expect("root certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    let tcp = TcpStream::connect(addr).await?;
    tokio::time::timeout(crate::common::IO_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// A CA and a `localhost`/127.0.0.1 certificate it signed, for Pebble's
/// own listener: returns (CA PEM, certificate PEM, key PEM) paths.
fn write_listener_certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "cutover test minica");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA certificate");

    let key = rcgen::KeyPair::generate().expect("listener key");
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("listener params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca).expect("listener certificate");

    let paths = (
        dir.join("minica.pem"),
        dir.join("localhost.pem"),
        dir.join("localhost-key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).expect("write CA");
    std::fs::write(&paths.1, cert.pem()).expect("write certificate");
    std::fs::write(&paths.2, key.serialize_pem()).expect("write key");
    paths
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free tcp port")
        .port()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .expect("free udp port")
        .port()
}
