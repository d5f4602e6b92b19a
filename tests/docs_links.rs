//! Every relative link in `README.md` and `docs/*.md` resolves: the file it
//! names exists, and a `#fragment` matches a heading of that file (GitHub's
//! heading anchors). The README is a front door into `docs/`, and both are
//! edited by many hands; a moved section must not leave a dead link behind.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The documents whose links are checked.
fn documents(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .map(|entry| entry.expect("readable docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// Lines outside fenced code blocks (a link example in a code block is not
/// a link, and a `#` comment there is not a heading).
fn prose_lines(text: &str) -> Vec<&str> {
    let mut in_fence = false;
    let mut lines = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
        } else if !in_fence {
            lines.push(line);
        }
    }
    lines
}

/// The line with inline code spans removed, so `` `a](b` `` is not a link.
fn without_code_spans(line: &str) -> String {
    line.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(_, part)| part)
        .collect::<Vec<_>>()
        .join("")
}

/// Link targets of the form `[text](target)` in `text`.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for line in prose_lines(text) {
        let line = without_code_spans(line);
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            if let Some(end) = rest.find(')') {
                targets.push(rest[..end].to_string());
                rest = &rest[end..];
            }
        }
    }
    targets
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped (letters,
/// digits, `-` and `_` kept), spaces to `-`; repeats get `-1`, `-2`, ...
fn anchors(text: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    for line in prose_lines(text) {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let heading = heading.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let slug: String = heading
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut unique = slug.clone();
        let mut n = 0;
        while seen.contains(&unique) {
            n += 1;
            unique = format!("{slug}-{n}");
        }
        seen.insert(unique);
    }
    seen
}

/// Every broken relative link in `doc`, as a printable line.
fn broken_links(doc: &Path) -> (usize, Vec<String>) {
    let text = std::fs::read_to_string(doc).expect("readable document");
    let dir = doc.parent().expect("document has a directory");
    let mut checked = 0;
    let mut broken = Vec::new();
    for target in link_targets(&text) {
        if target.contains("://") || target.starts_with("mailto:") {
            continue;
        }
        checked += 1;
        let (path, fragment) = match target.split_once('#') {
            Some((path, fragment)) => (path, Some(fragment)),
            None => (target.as_str(), None),
        };
        let file = if path.is_empty() {
            doc.to_path_buf()
        } else {
            dir.join(path)
        };
        if !file.exists() {
            broken.push(format!("{}: {target}: no such file", doc.display()));
            continue;
        }
        let Some(fragment) = fragment else { continue };
        let heading_text = std::fs::read_to_string(&file).unwrap_or_default();
        if !anchors(&heading_text).contains(fragment) {
            broken.push(format!(
                "{}: {target}: no heading with anchor #{fragment}",
                doc.display()
            ));
        }
    }
    (checked, broken)
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    let mut broken = Vec::new();
    for doc in documents(root) {
        let (count, mut found) = broken_links(&doc);
        checked += count;
        broken.append(&mut found);
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    // The README links into every page of docs/, so a checker that found
    // almost nothing has stopped reading links.
    assert!(checked >= 10, "only {checked} relative links found");
}

#[test]
fn the_checker_reports_a_missing_file_and_a_missing_anchor() {
    let dir = std::env::temp_dir().join(format!("cutover-docs-links-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let doc = dir.join("page.md");
    let text = "# A page\n\n## `[server.limits]`\n\n\
        [ok](#serverlimits) [ok](page.md#a-page) [web](https://example.org/x)\n\
        [gone](missing.md) [bad anchor](page.md#nowhere) `[code](missing.md)`\n\n\
        ```\n[fenced](missing.md)\n```\n";
    std::fs::write(&doc, text).expect("write page");
    let (checked, broken) = broken_links(&doc);
    std::fs::remove_dir_all(&dir).expect("remove temp dir");
    assert_eq!(checked, 4, "{broken:?}");
    assert_eq!(broken.len(), 2, "{broken:?}");
    assert!(
        broken[0].ends_with("missing.md: no such file"),
        "{broken:?}"
    );
    assert!(broken[1].contains("#nowhere"), "{broken:?}");
}

#[test]
fn anchors_follow_github() {
    let text = "# Title\n## `[service.NAME]`\n### 2–3. TLS: HTTP/2 (h2load)\n## Title\n";
    let found = anchors(text);
    for anchor in ["title", "servicename", "23-tls-http2-h2load", "title-1"] {
        assert!(found.contains(anchor), "{anchor} not in {found:?}");
    }
}
