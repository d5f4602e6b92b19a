//! `cutover check` lists every problem of a config in one run, each at the
//! `file:line:column` that causes it: serde-level mistakes (unknown keys,
//! bad values) all together, then the checks that look past the file
//! (certificates, route files, `admin_group`) on the valid rest. `serve`
//! refuses the same file with the same messages.

use std::path::{Path, PathBuf};
use std::process::Output;

fn cert_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("certs-dev")
        .join(name)
}

fn cutover(args: &[&str], config: &Path) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run cutover")
}

/// Writes `text` as proxy.toml in a fresh directory.
fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

/// The stderr lines that report a problem at `path:LINE:`.
fn lines_at(stderr: &str, path: &Path, line: usize) -> Vec<String> {
    let prefix = format!("{}:{line}:", path.display());
    stderr
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(String::from)
        .collect()
}

/// Four mistakes of four kinds, plus a missing certificate and an unknown
/// `admin_group`: one run of `check` names all six, each once, at its line,
/// with a hint. (Before, check stopped at the first: six runs.)
#[test]
fn check_lists_every_problem_in_one_run() {
    let text = format!(
        r#"[server]
http = "127.0.0.1:8080"
wokers = 2
shutdown_timeout = "30 seconds"
admin_group = "no-such-group-cutover"

[server.limits]
max_body_bytes = "10 megs"

[[tls]]
cert = "certs/missing.pem"
key = "{key}"

[[site]]
hosts = ["example.test"]
service = "web"

[service.web]
upstream = "127.0.0.1:9000"
health = {{ paht = "/up" }}
"#,
        key = cert_file("example-key.pem").display()
    );
    let (dir, path) = write_config(&text);
    let output = cutover(&["check"], &path);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");

    let expect = [
        (
            3,
            "unknown key `wokers` in [server]: did you mean `workers`?",
        ),
        (4, "expected a duration such as"),
        (8, "expected a size such as"),
        (11, "No such file or directory"),
        (
            20,
            "unknown key `paht` in [service.NAME.health]: did you mean `path`?",
        ),
    ];
    for (line, hint) in expect {
        let found = lines_at(&stderr, &path, line);
        assert_eq!(found.len(), 1, "line {line}:\n{stderr}");
        assert!(found[0].contains(hint), "line {line}: {}", found[0]);
    }
    let cert = dir.path().join("certs/missing.pem");
    assert!(
        lines_at(&stderr, &path, 11)[0].contains(&format!("certificate {}", cert.display())),
        "the resolved path: {stderr}"
    );
    assert!(
        stderr.contains("admin_group") && stderr.contains("no-such-group-cutover"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{}: 6 problem(s)", path.display())),
        "{stderr}"
    );
}

/// `serve` refuses the same file before binding anything, with every
/// config problem (the same lines `check` prints), and exit status 2.
#[test]
fn serve_refuses_an_invalid_config_with_every_problem() {
    let text = "[server]\nhttp = \"127.0.0.1:0\"\nwokers = 2\nshutdown_timeout = \"30 seconds\"\n\
                [server.limits]\nmax_body_bytes = \"10 megs\"\n[service.web]\n\
                health = { paht = \"/up\" }\n";
    let (_dir, path) = write_config(text);
    let serve = cutover(&["serve"], &path);
    let check = cutover(&["check"], &path);
    let serve_err = String::from_utf8_lossy(&serve.stderr);
    let check_err = String::from_utf8_lossy(&check.stderr);
    assert_eq!(serve.status.code(), Some(2), "{serve_err}");
    for line in [3, 4, 6, 8] {
        let from_serve = lines_at(&serve_err, &path, line);
        assert_eq!(from_serve.len(), 1, "line {line}:\n{serve_err}");
        assert_eq!(from_serve, lines_at(&check_err, &path, line));
    }
}

/// A missing certificate or key is reported at the line naming it, with
/// the path it resolved to; a pair that exists but does not match is
/// reported at its certificate's line.
#[test]
fn missing_certificate_and_key_name_their_line_and_path() {
    let text = format!(
        r#"[[tls]]
cert = "{cert}"
key = "keys/gone.pem"

[[tls]]
cert = "/nonexistent/cutover/cert.pem"
key = "{key}"

[[tls]]
cert = "{cert}"
key = "{other_key}"
"#,
        cert = cert_file("example.pem").display(),
        key = cert_file("example-key.pem").display(),
        other_key = cert_file("localhost-key.pem").display(),
    );
    let (dir, path) = write_config(&text);
    let output = cutover(&["check"], &path);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");

    let key = dir.path().join("keys/gone.pem");
    let at_key = lines_at(&stderr, &path, 3);
    assert_eq!(at_key.len(), 1, "{stderr}");
    assert!(
        at_key[0].starts_with(&format!(
            "{}:3:7: private key {}:",
            path.display(),
            key.display()
        )),
        "{stderr}"
    );
    let at_cert = lines_at(&stderr, &path, 6);
    assert_eq!(at_cert.len(), 1, "{stderr}");
    assert!(
        at_cert[0].contains("certificate /nonexistent/cutover/cert.pem: No such file"),
        "{stderr}"
    );
    let mismatch = lines_at(&stderr, &path, 10);
    assert_eq!(mismatch.len(), 1, "{stderr}");
    assert!(mismatch[0].contains("do not belong together"), "{stderr}");
    assert!(
        stderr.contains(&format!("{}: 3 problem(s)", path.display())),
        "{stderr}"
    );
}

/// A `file` route to a file that is not there would answer 404 for ever:
/// check reports it (a directory too); a route to a real file passes.
#[test]
fn missing_route_file_is_reported() {
    let text = r#"[[site]]
hosts = ["example.test"]

[[site.route]]
path = "/privacy"
file = "privacy.html"

[[site.route]]
path = "/terms"
file = "pages"

[[site.route]]
path = "/robots.txt"
file = "robots.txt"
"#;
    let (dir, path) = write_config(text);
    std::fs::create_dir(dir.path().join("pages")).expect("mkdir");
    std::fs::write(dir.path().join("robots.txt"), "User-agent: *\n").expect("write");
    let output = cutover(&["check"], &path);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");

    let missing = lines_at(&stderr, &path, 6);
    assert_eq!(missing.len(), 1, "{stderr}");
    assert!(
        missing[0].contains(&format!(
            "route file {}: No such file",
            dir.path().join("privacy.html").display()
        )),
        "{stderr}"
    );
    let directory = lines_at(&stderr, &path, 10);
    assert_eq!(directory.len(), 1, "{stderr}");
    assert!(directory[0].contains("not a regular file"), "{stderr}");
    assert!(lines_at(&stderr, &path, 14).is_empty(), "{stderr}");
    assert!(
        stderr.contains(&format!("{}: 2 problem(s)", path.display())),
        "{stderr}"
    );

    std::fs::write(dir.path().join("privacy.html"), "<p>hi</p>\n").expect("write");
    std::fs::remove_dir(dir.path().join("pages")).expect("rmdir");
    std::fs::write(dir.path().join("pages"), "terms\n").expect("write");
    let output = cutover(&["check"], &path);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
