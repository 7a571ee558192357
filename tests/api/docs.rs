//! The user docs stay true to the tree: every link in the README and in
//! docs/ leads to a file that exists, and to a heading of it when it names
//! one; the reference's settings table lists exactly the settings of
//! config/default.toml. No broker or Redis needed.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use config::Source;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The README and every markdown file under docs/.
fn user_docs() -> Vec<PathBuf> {
    let mut docs = vec![root().join("README.md")];
    let mut more: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|entry| entry.expect("a readable docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    more.sort();
    docs.extend(more);
    docs
}

/// The lines of a markdown text outside fenced code blocks.
fn prose_lines(text: &str) -> Vec<&str> {
    let mut in_fence = false;
    let mut lines = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            in_fence = !in_fence;
        } else if !in_fence {
            lines.push(line);
        }
    }
    lines
}

/// `text` without its code spans (a run of backticks up to the next run of
/// the same length, across line breaks too): `[a](b)` in code is no link.
fn without_code_spans(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|&&c| c == '`').count();
        let mut j = i + run;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let n = chars[j..].iter().take_while(|&&c| c == '`').count();
                if n == run {
                    close = Some(j + n);
                    break;
                }
                j += n;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => {
                out.push(' ');
                i = end;
            }
            None => {
                out.extend(&chars[i..i + run]);
                i += run;
            }
        }
    }
    out
}

/// The targets of the inline links `[text](target)` in a markdown text,
/// outside code.
fn link_targets(markdown: &str) -> Vec<String> {
    let prose = without_code_spans(&prose_lines(markdown).join("\n"));
    let mut targets = Vec::new();
    let mut rest = prose.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let end = after.find(')').unwrap_or(after.len());
        // A title (`(path "title")`) is not part of the target.
        let target = after[..end].split_whitespace().next().unwrap_or("");
        targets.push(target.to_owned());
        rest = &after[end..];
    }
    targets
}

/// GitHub's anchor for a heading: lowercase, code and link markup dropped,
/// every character but letters, digits, `-`, `_` and spaces dropped, spaces
/// turned into `-`.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a markdown file's headings, a repeated one numbered as
/// GitHub numbers it (`name`, `name-1`, ...).
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut anchors = BTreeSet::new();
    for line in prose_lines(markdown) {
        let level = line.chars().take_while(|&c| c == '#').count();
        let Some(text) = line[level..].strip_prefix(' ') else {
            continue;
        };
        if level == 0 || level > 6 {
            continue;
        }
        let base = slug(text.trim().trim_end_matches('#').trim());
        let n = seen.entry(base.clone()).or_insert(0);
        anchors.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    anchors
}

#[test]
fn the_slug_of_a_heading_is_the_anchor_github_gives_it() {
    assert_eq!(slug("5.2 What is guaranteed"), "52-what-is-guaranteed");
    assert_eq!(
        slug("7.4 GET /v1/messages/{idempotencyKey}"),
        "74-get-v1messagesidempotencykey"
    );
    assert_eq!(
        slug("Guarantees and failure modes"),
        "guarantees-and-failure-modes"
    );
    assert_eq!(
        slug("`{prefix}:msg:{idempotencyKey}` (hash)"),
        "prefixmsgidempotencykey-hash"
    );
    let doc = "# A\n## Same\n```\n# not a heading\n```\n## Same\n";
    let found: Vec<String> = anchors(doc).into_iter().collect();
    assert_eq!(found, ["a", "same", "same-1"]);
    assert_eq!(
        link_targets("[a](x.md#b) `[no](code.md)` [c\nd](#e)\n```\n[f](g)\n```\n[h](i)"),
        ["x.md#b", "#e", "i"]
    );
}

#[test]
fn every_file_and_heading_the_readme_and_docs_link_to_exists() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for doc in user_docs() {
        let text = read(&doc);
        let shown = doc
            .strip_prefix(root())
            .unwrap_or(&doc)
            .display()
            .to_string();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, anchor) = match target.split_once('#') {
                Some((file, anchor)) => (file, Some(anchor)),
                None => (target.as_str(), None),
            };
            let path = if file.is_empty() {
                doc.clone()
            } else {
                doc.parent().expect("a doc has a folder").join(file)
            };
            if file.is_empty() && anchor.is_none() || !path.exists() {
                broken.push(format!("{shown}: ({target}): no such file"));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            if path.extension().is_none_or(|ext| ext != "md") {
                broken.push(format!(
                    "{shown}: ({target}): an anchor into a file that is not markdown"
                ));
            } else if !anchors(&read(&path)).contains(anchor) {
                broken.push(format!(
                    "{shown}: ({target}): no heading #{anchor} in {file}"
                ));
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} links found: is the link parser broken?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// `section.key` of every setting in config/default.toml, read by the same
/// TOML parser the service reads it with.
fn default_settings() -> BTreeSet<String> {
    let parsed = config::Config::builder()
        .add_source(config::File::from_str(
            sms_service::config::DEFAULT_TOML,
            config::FileFormat::Toml,
        ))
        .build()
        .expect("config/default.toml parses");
    let sections = parsed
        .collect()
        .expect("config/default.toml is a table of sections");
    let mut keys = BTreeSet::new();
    for (section, value) in sections {
        // A top-level value (`routes = []`) or an empty table that takes
        // named entries (`[providers]`) is one setting of its own name.
        match value.into_table() {
            Ok(table) if !table.is_empty() => {
                keys.extend(table.into_keys().map(|key| format!("{section}.{key}")))
            }
            _ => {
                keys.insert(section);
            }
        }
    }
    keys
}

/// `section.key` of every row of the reference's settings table (9.2).
fn reference_settings() -> (BTreeSet<String>, Vec<String>) {
    let reference = read(&root().join("docs/reference.md"));
    let lines = prose_lines(&reference);
    let start = lines
        .iter()
        .position(|l| l.starts_with("### 9.2 "))
        .expect("docs/reference.md has a section 9.2");
    let (mut keys, mut odd) = (BTreeSet::new(), Vec::new());
    for line in lines[start + 1..]
        .iter()
        .take_while(|l| !l.starts_with('#'))
    {
        let Some(cell) = line.strip_prefix("| ").and_then(|l| l.split(" | ").next()) else {
            continue;
        };
        if cell == "key" || cell.starts_with("---") {
            continue;
        }
        match cell.strip_prefix('`').and_then(|c| c.strip_suffix('`')) {
            Some(key) if !key.is_empty() && !key.contains(['`', ' ']) => {
                keys.insert(key.to_owned());
            }
            _ => odd.push(line.to_string()),
        }
    }
    (keys, odd)
}

#[test]
fn every_setting_in_default_toml_is_in_the_reference_table_and_every_row_is_a_setting() {
    let defaults = default_settings();
    let (documented, odd) = reference_settings();
    assert!(defaults.len() > 30, "only {} settings read", defaults.len());
    assert!(
        odd.is_empty(),
        "rows of reference 9.2 that name no single `section.key`:\n{}",
        odd.join("\n")
    );
    let undocumented: Vec<_> = defaults.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&defaults).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "settings not in docs/reference.md section 9.2: {undocumented:?}\n\
         rows of section 9.2 that config/default.toml does not have: {stale:?}"
    );
}
