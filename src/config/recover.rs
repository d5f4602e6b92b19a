//! Deserializing proxy.toml while collecting *every* error of the serde
//! pass, not only the first.
//!
//! serde stops at the first unknown key or bad value. So the document is
//! parsed once into toml's spanned tree ([`DeTable`]), deserialized from
//! there, and after each error the entry the error points at (the innermost
//! key or array item whose span holds the error's span) is taken out of the
//! tree and deserialization runs again on what is left. Every round removes
//! one entry, so it ends; what remains at the end is the valid part of the
//! file, which the second pass then checks as usual. The raw types keep
//! their `deny_unknown_fields` and stay the one description of the format.

use std::ops::Range;

use serde::de::DeserializeOwned;
use toml::de::{DeArray, DeTable, DeValue};

use super::keys::Section;
use super::{Locator, Problem};

/// The value built from the valid part of `text` (`None` when `text` is
/// not TOML, or an error could not be pinned to an entry) and one problem
/// per error found on the way.
pub(super) fn deserialize_all<T: DeserializeOwned>(
    text: &str,
    locate: &Locator<'_>,
) -> (Option<T>, Vec<Problem>) {
    let mut root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(_) => {
            // Not TOML: list every syntax error the parser can recover past,
            // and stop (a half-parsed tree would only add noise).
            let (_, errors) = DeTable::parse_recoverable(text);
            let mut problems: Vec<Problem> = errors
                .iter()
                .map(|err| locate.problem(err.span(), err.message().to_string()))
                .collect();
            // The recovering parser can report one spot twice.
            problems
                .dedup_by(|a, b| (a.line, a.column, &a.message) == (b.line, b.column, &b.message));
            return (None, problems);
        }
    };
    let mut problems = Vec::new();
    loop {
        let err = match T::deserialize(toml::de::Deserializer::from(root.clone())) {
            Ok(value) => return (Some(value), problems),
            Err(err) => err,
        };
        let removed = err
            .span()
            .and_then(|span| remove_in_table(root.get_mut(), &span, &mut Vec::new()));
        let Some(removed) = removed else {
            problems.push(locate.problem(err.span(), err.message().to_string()));
            return (None, problems);
        };
        problems.push(locate.problem(err.span(), removed.explain(err.message())));
    }
}

/// The entry taken out of the tree for one error.
struct Removed {
    /// Keys leading to the table or array that held it (no array indices).
    path: Vec<String>,
    /// Its key; `None` for an array item.
    key: Option<String>,
}

impl Removed {
    /// The error message, with the key it is about and, for an unknown
    /// key, a hint drawn from the section's real keys.
    fn explain(&self, message: &str) -> String {
        let path: Vec<&str> = self.path.iter().map(String::as_str).collect();
        if let (Some(key), Some(section)) = (&self.key, Section::at(&path)) {
            if message.starts_with("unknown field") {
                return format!(
                    "unknown key `{key}` in {}: {}",
                    section.header(),
                    section.hint_for(key)
                );
            }
        }
        let message = message.replacen("missing field", "missing key", 1);
        if let (None, Some(section)) = (&self.key, Section::at(&path)) {
            return format!("{}: {message}", section.header());
        }
        let mut name = self.path.join(".");
        if let Some(key) = &self.key {
            if !name.is_empty() {
                name.push('.');
            }
            name.push_str(key);
        }
        if name.is_empty() {
            message
        } else {
            format!("{name}: {message}")
        }
    }
}

/// Removes the innermost entry of `table` (or below) whose span holds
/// `span`. Children are searched whatever their parent's span: a table
/// opened by a `[header]` spans the header, not the keys under it.
fn remove_in_table(
    table: &mut DeTable<'_>,
    span: &Range<usize>,
    path: &mut Vec<String>,
) -> Option<Removed> {
    let mut hit = None;
    for (key, value) in table.iter_mut() {
        path.push(key.get_ref().to_string());
        let found = remove_in_value(value.get_mut(), span, path);
        path.pop();
        if found.is_some() {
            return found;
        }
        let entry = key.span().start.min(value.span().start)..key.span().end.max(value.span().end);
        if holds(&entry, span) {
            hit = Some(key.get_ref().to_string());
            break;
        }
    }
    let key = hit?;
    table.remove(key.as_str());
    Some(Removed {
        path: path.clone(),
        key: Some(key),
    })
}

fn remove_in_value(
    value: &mut DeValue<'_>,
    span: &Range<usize>,
    path: &mut Vec<String>,
) -> Option<Removed> {
    let items = match value {
        DeValue::Table(table) => return remove_in_table(table, span, path),
        DeValue::Array(items) => items,
        _ => return None,
    };
    let mut hit = None;
    for (index, item) in items.iter_mut().enumerate() {
        let found = remove_in_value(item.get_mut(), span, path);
        if found.is_some() {
            return found;
        }
        if holds(&item.span(), span) {
            hit = Some(index);
            break;
        }
    }
    let hit = hit?;
    *items = std::mem::replace(items, DeArray::new())
        .into_iter()
        .enumerate()
        .filter(|(index, _)| *index != hit)
        .map(|(_, item)| item)
        .collect();
    Some(Removed {
        path: path.clone(),
        key: None,
    })
}

fn holds(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}
