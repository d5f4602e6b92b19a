//! Error text for logs and replies: an error with all its sources on one
//! line, because the useful part ("connection refused") is usually a
//! source several levels down, which `Display` alone leaves out.

use std::error::Error;

/// `err` and its sources joined as "a: b: c".
pub fn chain(err: &dyn Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(current) = source {
        text.push_str(": ");
        text.push_str(&current.to_string());
        source = current.source();
    }
    text
}
