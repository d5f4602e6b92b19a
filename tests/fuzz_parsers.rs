//! Property tests (proptest) for the two parsers that read untrusted or
//! hand-written text: the config parser and the admin request decoder.
//! Neither may panic on any input, garbage must come back as an error, and
//! well-formed input must round-trip. Case counts are bounded so the file
//! runs in seconds under `cargo test`.

use std::path::Path;

use cutover::admin::{decode_request, encode_request, Command};
use cutover::Config;
use proptest::prelude::*;

fn parse(text: &str) -> Result<Config, cutover::config::ConfigError> {
    Config::parse(text, "fuzz.toml", Path::new("/nonexistent-base"))
}

/// Keys the config accepts, with the section they live in, so generated
/// documents get past the TOML layer and exercise validation.
const SERVER_KEYS: &[&str] = &[
    "http",
    "https",
    "admin_socket",
    "admin_group",
    "state_dir",
    "workers",
    "shutdown_timeout",
    "trusted_proxies",
];
const LIMIT_KEYS: &[&str] = &[
    "header_read_timeout",
    "idle_timeout",
    "max_header_bytes",
    "max_body_bytes",
    "body_timeout",
    "body_min_rate",
    "body_rate_grace",
    "send_timeout",
    "max_connections",
    "upstream_connect_timeout",
    "upstream_timeout",
    "tls_handshake_timeout",
    "h2_max_concurrent_streams",
];
const SITE_KEYS: &[&str] = &["hosts", "https_redirect", "hsts", "service"];
const SERVICE_KEYS: &[&str] = &[
    "upstream",
    "drain_timeout",
    "websocket_grace",
    "pause_timeout",
];

/// TOML values of every shape, including the near-misses a person types
/// (`"10 s"`, `"-1"`, huge numbers, wrong types).
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "[0-9]{1,25}(ms|s|m|h|d|KiB|MiB|GiB|/s|KiB/s| s|x)?".prop_map(|s| format!("{s:?}")),
        "[ -~]{0,24}".prop_map(|s| format!("{s:?}")),
        "[0-9.:\\[\\]a-f]{0,30}".prop_map(|s| format!("{s:?}")),
        prop::collection::vec("[a-z*.]{0,12}", 0..4).prop_map(|v| format!("{v:?}")),
        Just("{}".to_string()),
        Just("[]".to_string()),
        Just("1.5".to_string()),
    ]
}

fn key_line(keys: &'static [&'static str]) -> impl Strategy<Value = String> {
    (prop::sample::select(keys), toml_value()).prop_map(|(key, value)| format!("{key} = {value}"))
}

/// A document made of the real sections with real keys and random values.
fn config_document() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(key_line(SERVER_KEYS), 0..4),
        prop::collection::vec(key_line(LIMIT_KEYS), 0..5),
        prop::collection::vec(prop::collection::vec(key_line(SITE_KEYS), 0..4), 0..3),
        prop::collection::vec(key_line(SERVICE_KEYS), 0..4),
    )
        .prop_map(|(server, limits, sites, service)| {
            let mut text = String::from("[server]\n");
            text.push_str(&server.join("\n"));
            text.push_str("\n[server.limits]\n");
            text.push_str(&limits.join("\n"));
            for site in sites {
                text.push_str("\n[[site]]\n");
                text.push_str(&site.join("\n"));
            }
            text.push_str("\n[service.web]\n");
            text.push_str(&service.join("\n"));
            text.push('\n');
            text
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any text at all: an answer (usually an error), never a panic.
    #[test]
    fn config_parser_never_panics_on_arbitrary_text(text in any::<String>()) {
        let _ = parse(&text);
    }

    /// Real keys with random values reach the validation pass; whatever
    /// it decides, every problem is located inside the file.
    #[test]
    fn config_parser_never_panics_on_plausible_documents(text in config_document()) {
        if let Err(err) = parse(&text) {
            prop_assert!(!err.problems.is_empty());
            let lines = text.lines().count() + 1;
            for problem in &err.problems {
                prop_assert!(problem.line <= lines, "{problem} is past the end");
                prop_assert!(!problem.message.is_empty());
            }
        }
    }

    /// Text that cannot be TOML is an error, never a default config.
    #[test]
    fn config_garbage_is_an_error(
        before in "[ -~\n]{0,40}",
        junk in prop::sample::select(vec!["[[", "= =", "[server", "\"unterminated", "key = = 1"]),
        after in "[ -~\n]{0,40}",
    ) {
        let text = format!("{before}\n{junk}\n{after}");
        prop_assert!(parse(&text).is_err(), "accepted {text:?}");
    }

    /// Unknown keys are never silently ignored, wherever they appear.
    #[test]
    fn config_unknown_keys_are_errors(
        section in prop::sample::select(vec!["", "[server]\n", "[server.limits]\n", "[[site]]\nhosts = [\"a.test\"]\n"]),
        key in "zz[a-z_]{1,12}",
    ) {
        let text = format!("{section}{key} = 1\n");
        prop_assert!(parse(&text).is_err(), "accepted {text:?}");
    }

    /// Any line at all: an answer, never a panic.
    #[test]
    fn admin_decoder_never_panics(line in any::<String>()) {
        let _ = decode_request(&line);
    }

    /// JSON that is not an object with `"v":1` is always refused.
    #[test]
    fn admin_decoder_refuses_non_requests(value in json_value(3)) {
        let is_v1_object = value.as_object().is_some_and(|map| map.get("v") == Some(&serde_json::json!(1)));
        if !is_v1_object {
            prop_assert!(decode_request(&value.to_string()).is_err());
        }
    }

    /// Objects with random fields next to `"v":1`: decoded only if they are
    /// a real command, and then they re-encode to the same command.
    #[test]
    fn admin_decoder_accepts_only_real_commands(
        cmd in prop::sample::select(vec!["status", "switch", "pause", "resume", "deploy", "rollback", "reload", "launch", ""]),
        fields in prop::collection::btree_map(
            prop::sample::select(vec!["service", "to", "force", "image", "tag", "docker_config", "extra"]),
            json_value(1),
            0..4,
        ),
    ) {
        let mut map = serde_json::Map::new();
        map.insert("v".into(), 1.into());
        map.insert("cmd".into(), cmd.into());
        for (key, value) in fields {
            map.insert(key.into(), value);
        }
        let line = serde_json::Value::Object(map).to_string();
        if let Ok(command) = decode_request(&line) {
            prop_assert_eq!(decode_request(&encode_request(&command)), Ok(command));
        }
    }

    /// Every command round-trips through the wire format.
    #[test]
    fn admin_commands_round_trip(command in command()) {
        prop_assert_eq!(decode_request(&encode_request(&command)), Ok(command));
    }
}

/// Arbitrary JSON up to `depth` levels of nesting.
fn json_value(depth: u32) -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(depth, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z]{0,6}", inner, 0..4)
                .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
        ]
    })
}

fn command() -> impl Strategy<Value = Command> {
    let text = || ".{0,16}";
    let opt = || prop::option::of(".{0,16}");
    prop_oneof![
        opt().prop_map(|service| Command::Status { service }),
        (text(), text(), any::<bool>()).prop_map(|(service, to, force)| Command::Switch {
            service,
            to,
            force
        }),
        text().prop_map(|service| Command::Pause { service }),
        text().prop_map(|service| Command::Resume { service }),
        (text(), opt(), opt(), opt()).prop_map(|(service, image, tag, docker_config)| {
            Command::Deploy {
                service,
                image,
                tag,
                docker_config,
            }
        }),
        (text(), opt()).prop_map(|(service, docker_config)| Command::Rollback {
            service,
            docker_config
        }),
        Just(Command::Reload {}),
    ]
}
