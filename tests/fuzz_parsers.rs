//! Property tests (proptest) for the two parsers that read untrusted or
//! hand-written text: the config parser and the admin request decoder.
//! Neither may panic on any input, garbage must come back as an error,
//! every problem must be reported (and located), and well-formed input
//! must round-trip. The config keys come from the config types
//! (`Section::keys`), the admin protocol from a table written out here, so
//! each property can fail; each was seen failing on a deliberately broken
//! parser (see the commit that introduced them). Case counts are bounded so
//! the file runs in seconds under `cargo test`.

use std::collections::BTreeSet;
use std::path::Path;

use cutover::admin::{decode_request, encode_request, Command};
use cutover::config::Section;
use cutover::Config;
use proptest::prelude::*;

fn parse(text: &str) -> Result<Config, cutover::config::ConfigError> {
    Config::parse(text, "fuzz.toml", Path::new("/nonexistent-base"))
}

/// The lines (1-based) with at least one problem.
fn problem_lines(text: &str) -> BTreeSet<usize> {
    parse(text)
        .err()
        .map(|err| err.problems.iter().map(|p| p.line).collect())
        .unwrap_or_default()
}

/// The smallest document that opens `section`, so a key line appended to
/// it lands there. A match, so a new section cannot be forgotten.
fn opening(section: Section) -> &'static str {
    match section {
        Section::Top => "",
        Section::Server => "[server]\n",
        Section::Limits => "[server.limits]\n",
        Section::Tls => "[[tls]]\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
        Section::Acme => "[acme]\n",
        Section::Site => "[[site]]\nhosts = [\"a.test\"]\n",
        Section::Route => {
            "[[site]]\nhosts = [\"a.test\"]\n[[site.route]]\npath = \"/\"\nstatus = 204\n"
        }
        Section::Service => "[service.web]\n",
        Section::Health => "[service.web.health]\n",
    }
}

/// TOML values of every shape, including the near-misses a person types
/// (`"10 s"`, `"-1"`, huge numbers, wrong types).
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (0u32..70_000).prop_map(|n| n.to_string()),
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

/// Distinct keys of `keys` (a repeated key is a TOML error that would hide
/// everything else), each with a random value: one line each.
fn key_lines(keys: Vec<&'static str>, max: usize) -> impl Strategy<Value = Vec<String>> {
    let max = max.min(keys.len());
    prop::sample::subsequence(keys, 0..=max).prop_flat_map(|keys| {
        keys.into_iter()
            .map(|key| toml_value().prop_map(move |value| format!("{key} = {value}")))
            .collect::<Vec<_>>()
    })
}

/// A section's keys, read from the config types (so a new key is fuzzed
/// the day it is added), less the ones that open a sub-table written
/// below as its own `[header]`.
fn keys_of(section: Section) -> Vec<&'static str> {
    let sub_tables = ["limits", "route", "health"];
    section
        .keys()
        .iter()
        .copied()
        .filter(|key| !sub_tables.contains(key))
        .collect()
}

/// A document made of every section with real keys and random values.
fn config_document() -> impl Strategy<Value = String> {
    let site = (
        key_lines(keys_of(Section::Site), 4),
        prop::collection::vec(key_lines(keys_of(Section::Route), 4), 0..3),
    );
    (
        key_lines(keys_of(Section::Server), 4),
        key_lines(keys_of(Section::Limits), 6),
        prop::collection::vec(key_lines(keys_of(Section::Tls), 2), 0..2),
        prop::collection::vec(site, 0..3),
        key_lines(keys_of(Section::Service), 6),
        key_lines(keys_of(Section::Health), 4),
        key_lines(keys_of(Section::Acme), 3),
    )
        .prop_map(|(server, limits, tls, sites, service, health, acme)| {
            let mut text = String::new();
            let mut table = |header: &str, lines: &[String]| {
                text.push_str(header);
                text.push('\n');
                for line in lines {
                    text.push_str(line);
                    text.push('\n');
                }
            };
            table("[server]", &server);
            table("[server.limits]", &limits);
            for entry in &tls {
                table("[[tls]]", entry);
            }
            for (site, routes) in &sites {
                table("[[site]]", site);
                for route in routes {
                    table("[[site.route]]", route);
                }
            }
            table("[service.web]", &service);
            table("[service.web.health]", &health);
            table("[acme]", &acme);
            text
        })
}

/// `[server]` and `[server.limits]` lines with random values: keys whose
/// problems, if any, are about that one line alone.
fn independent_lines() -> impl Strategy<Value = (Vec<String>, Vec<String>)> {
    (
        key_lines(keys_of(Section::Server), 5),
        key_lines(keys_of(Section::Limits), 8),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any text at all: an answer (usually an error), never a panic.
    #[test]
    fn config_parser_never_panics_on_arbitrary_text(text in any::<String>()) {
        let _ = parse(&text);
    }

    /// Real keys with random values reach the validation pass; whatever
    /// it decides, every problem is located on a line of the file and
    /// says something.
    #[test]
    fn config_problems_are_located_in_the_file(text in config_document()) {
        if let Err(err) = parse(&text) {
            prop_assert!(!err.problems.is_empty());
            let lines = text.lines().count();
            for problem in &err.problems {
                prop_assert!(
                    (1..=lines).contains(&problem.line),
                    "{problem} is not on a line of the {lines}-line file:\n{text}"
                );
                prop_assert!(!problem.message.is_empty());
            }
        }
    }

    /// One run reports every bad line: a document's problem lines are
    /// exactly those of its lines checked one at a time. (Stopping at the
    /// first problem, or a problem hiding another, fails this.)
    #[test]
    fn config_reports_every_bad_line_at_once((server, limits) in independent_lines()) {
        let mut text = String::from("[server]\n");
        let mut alone = BTreeSet::new();
        for line in &server {
            if problem_lines(&format!("[server]\n{line}\n")).contains(&2) {
                alone.insert(text.lines().count() + 1);
            }
            text.push_str(line);
            text.push('\n');
        }
        text.push_str("[server.limits]\n");
        for line in &limits {
            if problem_lines(&format!("[server.limits]\n{line}\n")).contains(&2) {
                alone.insert(text.lines().count() + 1);
            }
            text.push_str(line);
            text.push('\n');
        }
        prop_assert_eq!(problem_lines(&text), alone, "{}", text);
    }

    /// Text that cannot be TOML is an error with a located problem, never
    /// a default config.
    #[test]
    fn config_garbage_is_an_error(
        before in "[ -~\n]{0,40}",
        junk in prop::sample::select(vec!["[[", "= =", "[server", "\"unterminated", "key = = 1"]),
        after in "[ -~\n]{0,40}",
    ) {
        let text = format!("{before}\n{junk}\n{after}");
        let err = parse(&text).err();
        prop_assert!(err.is_some(), "accepted {:?}", text);
        let located = err.is_some_and(|err| err.problems.iter().any(|p| p.line > 0));
        prop_assert!(located, "no located problem for {:?}", text);
    }

    /// Unknown keys are never silently ignored, in any section: exactly one
    /// problem, on the key's line, naming the key and the section.
    #[test]
    fn config_unknown_keys_are_errors(
        section in prop::sample::select(Section::ALL.to_vec()),
        key in "zz[a-z_]{1,12}",
    ) {
        let text = format!("{}{key} = 1\n", opening(section));
        let err = parse(&text).err();
        prop_assert!(err.is_some(), "accepted {:?}", text);
        let problems = err.map(|err| err.problems).unwrap_or_default();
        prop_assert_eq!(problems.len(), 1, "{:?}", problems);
        prop_assert_eq!(problems[0].line, text.lines().count());
        prop_assert!(problems[0].message.contains(&key), "{}", problems[0]);
        prop_assert!(problems[0].message.contains(section.header()), "{}", problems[0]);
    }

    /// Any line at all: an answer, never a panic.
    #[test]
    fn admin_decoder_never_panics(line in any::<String>()) {
        let _ = decode_request(&line);
    }

    /// A request without `"v": 1` (missing, another number, a string, a
    /// float) is refused, however real its command; so is JSON that is
    /// not an object.
    #[test]
    fn admin_decoder_refuses_non_requests(
        command in command(),
        version in prop::option::of(json_value(1)),
        other in json_value(3),
    ) {
        let mut request: serde_json::Value =
            serde_json::from_str(&encode_request(&command)).expect("encoded JSON");
        let map = request.as_object_mut().expect("an object");
        match version.filter(|v| *v != serde_json::json!(1)) {
            Some(v) => map.insert("v".into(), v),
            None => map.remove("v"),
        };
        prop_assert!(decode_request(&request.to_string()).is_err(), "accepted {}", request);
        if !other.is_object() {
            prop_assert!(decode_request(&other.to_string()).is_err(), "accepted {}", other);
        }
    }

    /// Objects with `"v":1`, a command name (real or not) and random
    /// fields: decoded exactly when the protocol table below allows them,
    /// and then they re-encode to the same command.
    #[test]
    fn admin_decoder_accepts_only_real_commands(
        cmd in prop::sample::select(vec!["status", "switch", "pause", "resume", "deploy", "rollback", "reload", "launch", ""]),
        fields in prop::collection::btree_map(
            prop::sample::select(vec!["service", "to", "force", "image", "tag", "docker_config", "extra"]),
            field_value(),
            0..4,
        ),
    ) {
        let mut map = serde_json::Map::new();
        map.insert("v".into(), 1.into());
        map.insert("cmd".into(), cmd.into());
        for (key, value) in &fields {
            map.insert((*key).into(), value.clone());
        }
        let line = serde_json::Value::Object(map).to_string();
        let decoded = decode_request(&line);
        prop_assert_eq!(decoded.is_ok(), protocol_allows(cmd, &fields), "{} → {:?}", line, decoded);
        if let Ok(command) = decoded {
            prop_assert_eq!(decode_request(&encode_request(&command)), Ok(command));
        }
    }

    /// Every command round-trips through the wire format.
    #[test]
    fn admin_commands_round_trip(command in command()) {
        prop_assert_eq!(decode_request(&encode_request(&command)), Ok(command));
    }
}

/// Every key each section lists is one the parser knows (a stale or wrong
/// list would make the fuzzing above test the wrong keys).
#[test]
fn every_listed_key_is_known_to_the_parser() {
    for section in Section::ALL {
        parse(opening(section)).unwrap_or_else(|err| panic!("{section:?}: {err}"));
        for key in section.keys() {
            let text = format!("{}{key} = 1\n", opening(section));
            if let Err(err) = parse(&text) {
                let unknown = err
                    .problems
                    .iter()
                    .find(|p| p.message.contains("unknown key"));
                assert!(unknown.is_none(), "{text}→ {err}");
            }
        }
    }
}

/// Decoding refuses what is not a command: an unknown or empty `cmd`, and
/// a real command with a field it does not have.
#[test]
fn admin_decoder_refuses_bad_commands() {
    for line in [
        r#"{"v":1,"cmd":"launch"}"#,
        r#"{"v":1,"cmd":""}"#,
        r#"{"v":1}"#,
        r#"{"v":1,"cmd":"reload","extra":1}"#,
        r#"{"v":1,"cmd":"pause","service":"web","to":"x"}"#,
    ] {
        assert!(decode_request(line).is_err(), "accepted {line}");
    }
    assert_eq!(
        decode_request(r#"{"v":1,"cmd":"pause","service":"web"}"#),
        Ok(Command::Pause {
            service: "web".into()
        })
    );
}

/// The admin protocol as documented, written out independently of the
/// decoder: each command's fields, whether each is required, and whether
/// it is a string (`null` allowed when optional) or a boolean.
fn protocol_allows(
    cmd: &str,
    fields: &std::collections::BTreeMap<&str, serde_json::Value>,
) -> bool {
    const S: (bool, bool) = (true, false); // required string
    const OS: (bool, bool) = (false, false); // optional string
    const OB: (bool, bool) = (false, true); // optional boolean
    let spec: &[(&str, (bool, bool))] = match cmd {
        "status" => &[("service", OS)],
        "switch" => &[("service", S), ("to", S), ("force", OB)],
        "pause" | "resume" => &[("service", S)],
        "deploy" => &[
            ("service", S),
            ("image", OS),
            ("tag", OS),
            ("docker_config", OS),
        ],
        "rollback" => &[("service", S), ("docker_config", OS)],
        "reload" => &[],
        _ => return false,
    };
    let known = fields
        .keys()
        .all(|key| spec.iter().any(|(name, _)| name == key));
    let valid = spec
        .iter()
        .all(|(name, (required, boolean))| match fields.get(name) {
            None => !required,
            Some(value) if *boolean => value.is_boolean(),
            Some(serde_json::Value::Null) => !required,
            Some(value) => value.is_string(),
        });
    known && valid
}

/// Field values: mostly the right shapes (strings, booleans, null), some
/// anything at all.
fn field_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        3 => ".{0,12}".prop_map(serde_json::Value::from),
        1 => any::<bool>().prop_map(serde_json::Value::from),
        1 => Just(serde_json::Value::Null),
        1 => json_value(1),
    ]
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
        (text(), opt(), opt(), opt(), opt()).prop_map(
            |(service, image, tag, docker_config, canary)| Command::Deploy {
                service,
                image,
                tag,
                docker_config,
                canary,
            }
        ),
        text().prop_map(|service| Command::Promote { service }),
        text().prop_map(|service| Command::Abort { service }),
        (text(), opt()).prop_map(|(service, docker_config)| Command::Rollback {
            service,
            docker_config
        }),
        Just(Command::Reload {}),
    ]
}
