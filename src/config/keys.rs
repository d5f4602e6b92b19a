//! The keys each section of proxy.toml accepts, read from the raw serde
//! types themselves so no list can drift from what the parser takes.
//!
//! serde's derive hands a struct's field names to the deserializer in
//! `deserialize_struct(name, fields, visitor)`; [`FieldRecorder`] is a
//! deserializer that only writes that list down and refuses the rest (the
//! trick `serde_aux::serde_introspect` uses). The lists feed the hints of
//! unknown-key errors ("did you mean…", "belongs in [server.limits]"), the
//! config fuzz tests, and the test that the configuration reference
//! documents every key.

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};

use super::acme::RawAcme;
use super::{RawConfig, RawHealth, RawLimits, RawRoute, RawServer, RawService, RawSite, RawTls};

/// A table of proxy.toml whose keys are fixed (not `env` or `expect_json`,
/// whose keys are the user's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// The top level of the file.
    Top,
    Server,
    Limits,
    Tls,
    Acme,
    Site,
    Route,
    Service,
    Health,
}

impl Section {
    /// Every section, in the order the reference documents them.
    pub const ALL: [Section; 9] = [
        Section::Top,
        Section::Server,
        Section::Limits,
        Section::Tls,
        Section::Acme,
        Section::Site,
        Section::Route,
        Section::Service,
        Section::Health,
    ];

    /// The keys this section accepts, in declaration order.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            Section::Top => fields_of::<RawConfig>(),
            Section::Server => fields_of::<RawServer>(),
            Section::Limits => fields_of::<RawLimits>(),
            Section::Tls => fields_of::<RawTls>(),
            Section::Acme => fields_of::<RawAcme>(),
            Section::Site => fields_of::<RawSite>(),
            Section::Route => fields_of::<RawRoute>(),
            Section::Service => fields_of::<RawService>(),
            Section::Health => fields_of::<RawHealth>(),
        }
    }

    /// How the section is written in proxy.toml.
    pub fn header(self) -> &'static str {
        match self {
            Section::Top => "the top level",
            Section::Server => "[server]",
            Section::Limits => "[server.limits]",
            Section::Tls => "[[tls]]",
            Section::Acme => "[acme]",
            Section::Site => "[[site]]",
            Section::Route => "[[site.route]]",
            Section::Service => "[service.NAME]",
            Section::Health => "[service.NAME.health]",
        }
    }

    /// The section a table sits in, from the keys leading to it (array
    /// indices left out: `site.route`, `service.web.health`).
    pub fn at(path: &[&str]) -> Option<Section> {
        Some(match path {
            [] => Section::Top,
            ["server"] => Section::Server,
            ["server", "limits"] => Section::Limits,
            ["tls"] => Section::Tls,
            ["acme"] => Section::Acme,
            ["site"] => Section::Site,
            ["site", "route"] => Section::Route,
            ["service", _] => Section::Service,
            ["service", _, "health"] => Section::Health,
            _ => return None,
        })
    }

    /// The hint for `key`, unknown in this section: the section it belongs
    /// to if it is valid elsewhere, else the closest valid key, else the
    /// whole list.
    pub fn hint_for(self, key: &str) -> String {
        let keys = self.keys();
        let homes: Vec<&str> = Section::ALL
            .into_iter()
            .filter(|section| ![self, Section::Top].contains(section))
            .filter(|section| section.keys().contains(&key))
            .map(Section::header)
            .collect();
        if !homes.is_empty() {
            return format!("`{key}` belongs in {}", homes.join(" or "));
        }
        let closest = keys
            .iter()
            .map(|known| (edit_distance(key, known), *known))
            .filter(|(distance, known)| *distance <= (known.len() / 3).max(2))
            .min();
        match closest {
            Some((_, known)) => format!("did you mean `{known}`?"),
            None => format!("valid keys here: {}", keys.join(", ")),
        }
    }
}

/// The field names serde's derive declares for `T`.
fn fields_of<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut recorder = FieldRecorder { fields: &[] };
    // The recorder always fails, after writing the list down.
    let _ = T::deserialize(&mut recorder);
    recorder.fields
}

/// A deserializer that only records the field list of a struct.
struct FieldRecorder {
    fields: &'static [&'static str],
}

impl<'de> Deserializer<'de> for &mut FieldRecorder {
    type Error = de::value::Error;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.fields = fields;
        Err(de::Error::custom("field names recorded"))
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

/// Levenshtein distance, for "did you mean" (keys are short ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != *cb);
            current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_come_from_the_raw_types() {
        assert_eq!(
            Section::Top.keys(),
            ["server", "tls", "site", "service", "acme", "fleet"]
        );
        assert!(Section::Acme.keys().contains(&"ca_root"));
        assert_eq!(Section::Tls.keys(), ["cert", "key"]);
        let limits = Section::Limits.keys();
        assert!(limits.contains(&"h2_max_local_error_reset_streams"));
        assert!(limits.contains(&"max_uri_bytes"));
        assert!(Section::Service.keys().contains(&"docker_config"));
        assert!(Section::Route.keys().contains(&"code"));
        assert!(Section::Health.keys().contains(&"expect_json"));
    }

    /// The configuration reference names every key, so a new key cannot
    /// ship undocumented.
    #[test]
    fn reference_documents_every_key() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
        let text = std::fs::read_to_string(&path).expect("configuration reference");
        for section in Section::ALL {
            for key in section.keys() {
                // `key`, `key = …` inside an example, or a table header.
                let written = [
                    format!("`{key}`"),
                    format!("{key} ="),
                    format!("[{key}]"),
                    format!("[{key}."),
                    format!(".{key}]"),
                ];
                assert!(
                    written.iter().any(|form| text.contains(form.as_str())),
                    "{}: no entry for `{key}` of {}",
                    path.display(),
                    section.header()
                );
            }
        }
    }

    #[test]
    fn hints() {
        assert_eq!(
            Section::Server.hint_for("workerz"),
            "did you mean `workers`?"
        );
        assert_eq!(
            Section::Server.hint_for("max_body_bytes"),
            "`max_body_bytes` belongs in [server.limits]"
        );
        assert_eq!(
            Section::Server.hint_for("service"),
            "`service` belongs in [[site]] or [[site.route]]"
        );
        assert!(Section::Tls.hint_for("zzz").contains("cert, key"));
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
