//! Unit tests of the deploy state machine: the container spec, and
//! deploy, rollback, reconciliation and retirement against an in-memory
//! [`ContainerRuntime`] on tokio's paused clock.

use super::*;

#[test]
fn env_file_lines() {
    let text = "# secrets\nDB_PASSWORD=s3cret\n\n  TZ=Asia/Seoul  \nnot a pair\n";
    assert_eq!(
        parse_env_file(text),
        vec!["DB_PASSWORD=s3cret", "TZ=Asia/Seoul"]
    );
}

#[test]
fn tag_uses_the_configured_repository() {
    let settings = ContainerSettings {
        image: "registry.example/team/web".into(),
        port: 8080,
        host_ports: Some([8080, 8081]),
        env: Default::default(),
        env_file: None,
        volumes: vec![],
        extra_hosts: vec![],
        stop_timeout: Duration::from_secs(1),
        keep_previous: Duration::from_secs(1),
        retain: 1,
        docker_config: None,
    };
    assert_eq!(
        ImageChoice::Tag("abc123".into()).resolve(&settings),
        "registry.example/team/web:abc123"
    );
    let spec = container_spec("web", "green", "img:1", "d1", "prod", &settings).expect("spec");
    assert_eq!(spec.host_port, Some(8081));
    assert_eq!(spec.instance, "prod");
    assert_eq!(spec.name, "cutover-web-green-d1");
}
