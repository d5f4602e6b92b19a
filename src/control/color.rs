//! The two colours of blue/green: a service's new upstream always gets
//! the colour its active one does not have.
//!
//! Colours travel as text in the state file, container labels and names,
//! and the admin reports (`"blue"`, `"green"`); this type is where they are
//! chosen and compared.

use std::fmt;

/// One of the two colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Color {
    Blue,
    Green,
}

impl Color {
    pub fn as_str(self) -> &'static str {
        match self {
            Color::Blue => "blue",
            Color::Green => "green",
        }
    }

    /// The other colour.
    pub fn other(self) -> Color {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }

    /// Reads a colour label; anything else (a hand-edited state file, a
    /// container of an older format) is `None`.
    pub fn parse(label: &str) -> Option<Color> {
        match label {
            "blue" => Some(Color::Blue),
            "green" => Some(Color::Green),
            _ => None,
        }
    }

    /// The colour for a new upstream when `active` (a label) serves now:
    /// the other one; blue when nothing or something unknown serves.
    pub fn after(active: Option<&str>) -> Color {
        active
            .and_then(Color::parse)
            .map_or(Color::Blue, Color::other)
    }
}

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_upstream_gets_the_other_colour() {
        assert_eq!(Color::after(None), Color::Blue);
        assert_eq!(Color::after(Some("blue")), Color::Green);
        assert_eq!(Color::after(Some("green")), Color::Blue);
        assert_eq!(Color::after(Some("purple")), Color::Blue);
    }

    #[test]
    fn labels_round_trip() {
        for color in [Color::Blue, Color::Green] {
            assert_eq!(Color::parse(color.as_str()), Some(color));
            assert_eq!(color.to_string(), color.as_str());
            assert_eq!(color.other().other(), color);
        }
        assert_eq!(Color::parse("Blue"), None);
    }
}
