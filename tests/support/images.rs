//! Test images without a registry.
//!
//! The machines the tests run on have a Docker engine but no registry, so nothing
//! can be pulled. Instead the tests build `FROM scratch` images holding one
//! statically linked binary: the test app in `tests/testapp`.
//!
//! The binary is built once per test process; each image build after that is an
//! in-memory tar context sent to the engine (a fraction of a second).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use bollard::query_parameters::BuildImageOptionsBuilder;
use bollard::Docker;
use futures_util::StreamExt;

/// The Rust target the test app is built for; explicit so `RUSTFLAGS` does not
/// reach build scripts and proc-macros (they would fail to link statically).
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Name of the test app binary, and of the file in the image context.
const BINARY: &str = "cutover-testapp";

/// Path of the static test app binary, built on first use.
static TESTAPP: OnceLock<PathBuf> = OnceLock::new();

/// Builds image `tag` running the test app, and returns the image reference.
///
/// `version_label` becomes the label `cutover.test.version`: the engine gives two
/// builds of identical content the same image ID, so without a distinct label a
/// "v1" and a "v2" image would be one and the same, and rollback tests would pass
/// without testing anything. (The app's reported version comes from the
/// `APP_VERSION` environment variable of the container.)
pub async fn build_testapp_image(tag: &str, version_label: &str) -> String {
    build_testapp_image_with_env(tag, version_label, &[]).await
}

/// Like [`build_testapp_image`], with `ENV` lines baked into the image, for tests
/// where the deploy controller starts the container from the image alone (no
/// per-container environment): `APP_VERSION`, `HEALTH_FAIL`, `CRASH_AFTER_MS`, ...
/// Values must not contain `"` or newlines.
pub async fn build_testapp_image_with_env(
    tag: &str,
    version_label: &str,
    env: &[(&str, &str)],
) -> String {
    let binary = testapp_binary().await;
    let context = build_context(&binary, version_label, env);
    let docker = Docker::connect_with_local_defaults()
        .expect("docker client")
        .negotiate_version()
        .await
        .expect("docker engine reachable (is dockerd running? DOCKER_HOST?)");
    let options = BuildImageOptionsBuilder::default()
        .dockerfile("Dockerfile")
        .t(tag)
        .rm(true)
        .forcerm(true)
        .build();
    // Bounded retry of one engine race only: a build that reuses a cached
    // layer another test's image removal deleted at the same moment fails
    // with "failed to get digest"; building again creates the layer anew.
    let context: Vec<u8> = context;
    for attempt in 1..=3 {
        let mut output = Vec::new();
        let body = Some(bollard::body_full(context.clone().into()));
        let mut stream = docker.build_image(options.clone(), None, body);
        let mut failure = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => output.extend(info.stream),
                Err(err) => {
                    failure = Some(err.to_string());
                    break;
                }
            }
        }
        match failure {
            None => return tag.to_string(),
            Some(err) if attempt < 3 && err.contains("failed to get digest") => {
                eprintln!("building image {tag}: engine cache race ({err}); building again");
            }
            Some(err) => panic!("building image {tag} failed: {err}\n{}", output.concat()),
        }
    }
    unreachable!("the last attempt returns or panics")
}

/// The static test app binary, built with cargo on first call. Cargo's own lock
/// serialises this with any concurrent build of the same target directory.
async fn testapp_binary() -> PathBuf {
    if let Some(path) = TESTAPP.get() {
        return path.clone();
    }
    tokio::task::spawn_blocking(|| TESTAPP.get_or_init(build_testapp).clone())
        .await
        .expect("test app build task")
}

/// Runs `cargo build --release` for the test app as a static binary and returns
/// its path; panics with cargo's output if the build fails.
fn build_testapp() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target_dir = root.join("target").join("testapp");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .arg("build")
        .arg("--release")
        .args(["--target", TARGET])
        .arg("--manifest-path")
        .arg(root.join("tests").join("testapp").join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // CARGO_ENCODED_RUSTFLAGS would win over RUSTFLAGS if it leaked in.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .output()
        .expect("running cargo to build the test app");
    if !output.status.success() {
        panic!(
            "building the test app failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let binary = target_dir.join(TARGET).join("release").join(BINARY);
    assert!(
        binary.is_file(),
        "cargo succeeded but {} is missing",
        binary.display()
    );
    binary
}

/// An in-memory build context: the Dockerfile and the binary, as a tar archive.
fn build_context(binary: &Path, version_label: &str, env: &[(&str, &str)]) -> Vec<u8> {
    let env_lines: String = env
        .iter()
        .map(|(key, value)| {
            assert!(
                !value.contains(['"', '\n']) && !key.contains(['=', ' ', '\n']),
                "unsupported ENV {key}={value:?}"
            );
            format!("ENV {key}=\"{value}\"\n")
        })
        .collect();
    let dockerfile = format!(
        "FROM scratch\n\
         COPY {BINARY} /app\n\
         LABEL cutover.test.version=\"{version_label}\"\n\
         {env_lines}\
         ENTRYPOINT [\"/app\"]\n"
    );
    let program = std::fs::read(binary).expect("reading the test app binary");
    let mut archive = tar::Builder::new(Vec::new());
    append_file(&mut archive, "Dockerfile", dockerfile.as_bytes(), 0o644);
    append_file(&mut archive, BINARY, &program, 0o755);
    archive.into_inner().expect("finishing the tar context")
}

fn append_file(archive: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8], mode: u32) {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_cksum();
    archive
        .append_data(&mut header, name, data)
        .expect("adding a file to the tar context");
}
