//! The documentation a user reads first: every Markdown file of the repository links only to
//! files that exist in it (relative links, and `path/in/the/repo` spans in backticks that name
//! one), the licence the manifests declare is there, the CHANGELOG has an entry for the
//! workspace's version, and no default link points at a placeholder host.

use std::path::{Path, PathBuf};

use modelpool_e2e::repo_root;

/// Folders never scanned: build output, Git, caches, virtualenvs.
fn skipped(name: &str) -> bool {
    name == "target" || name.starts_with('.') || name == "node_modules" || name.ends_with("venv")
}

fn files_with_extension(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if !skipped(&name) {
                files_with_extension(&path, ext, out);
            }
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
}

/// The targets of `[text](target)` links.
fn markdown_links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let Some(end) = after.find(')') else { break };
        out.push(after[..end].trim().to_owned());
        rest = &after[end..];
    }
    out
}

/// The contents of `backtick` spans (code blocks excluded).
fn code_spans(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            continue;
        }
        let parts: Vec<&str> = line.split('`').collect();
        for (i, part) in parts.iter().enumerate() {
            if i % 2 == 1 && i + 1 < parts.len() {
                out.push((*part).to_owned());
            }
        }
    }
    out
}

/// A code span that names a file or folder of this repository: it starts with one of the
/// repository's top-level folders (or with `shared/` or `seed/`, which documents used to cite
/// and which are not in the repository), and is a plain path (no spaces, globs or placeholders).
fn repo_path(span: &str, top: &[String]) -> Option<String> {
    let span = span.trim().trim_end_matches([',', '.', ':', ';']);
    if span.contains([' ', '*', '<', '>', '{', '$', '=', '(']) || !span.contains('/') {
        return None;
    }
    let first = span.split('/').next()?;
    let cited = top.iter().any(|t| t == first) || first == "shared" || first == "seed";
    // Paths that the tools create (ignored by git) are not expected to exist in a clone.
    let generated = span.split('/').any(|s| s.starts_with('.') && s != ".ci");
    (cited && !generated).then(|| span.to_owned())
}

/// Catches a README or doc that sends the reader to a file that is not in the repository
/// (a moved file, a renamed section's file, or a document that lives elsewhere).
#[test]
fn markdown_links_and_paths_name_files_that_exist() {
    let root = repo_root();
    let top: Vec<String> = std::fs::read_dir(&root)
        .expect("the repository root")
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !skipped(n) || n == ".ci")
        .collect();
    let mut docs = Vec::new();
    files_with_extension(&root, "md", &mut docs);
    assert!(docs.len() >= 5, "found only {docs:?}");
    let mut dead = Vec::new();
    for doc in &docs {
        let text = std::fs::read_to_string(doc).expect("a Markdown file");
        let shown = doc.strip_prefix(&root).unwrap_or(doc).display().to_string();
        for link in markdown_links(&text) {
            if link.is_empty()
                || link.starts_with('#')
                || link.contains("://")
                || link.starts_with("mailto:")
            {
                continue;
            }
            let path = link.split('#').next().unwrap_or_default();
            let base = doc.parent().unwrap_or(&root);
            if !base.join(path).exists() {
                dead.push(format!("{shown}: link ({link})"));
            }
        }
        for span in code_spans(&text) {
            let Some(path) = repo_path(&span, &top) else {
                continue;
            };
            // A span may be relative to the document (chart README) or to the root.
            let base = doc.parent().unwrap_or(&root);
            if !root.join(&path).exists() && !base.join(&path).exists() {
                dead.push(format!("{shown}: `{span}`"));
            }
        }
    }
    assert!(
        dead.is_empty(),
        "documents name files that are not in the repository:\n  {}",
        dead.join("\n  ")
    );
}

/// Catches a licence declared in Cargo.toml, pyproject.toml and Chart.yaml but not shipped.
#[test]
fn the_declared_licence_is_shipped() {
    let root = repo_root();
    let licence = std::fs::read_to_string(root.join("LICENSE")).expect("a LICENSE file");
    assert!(
        licence.contains("Apache License") && licence.contains("Version 2.0"),
        "LICENSE is not the Apache License 2.0"
    );
    for (file, needle) in [
        ("Cargo.toml", "license = \"Apache-2.0\""),
        ("sdk/python/pyproject.toml", "license = \"Apache-2.0\""),
        (
            "charts/modelpool/Chart.yaml",
            "artifacthub.io/license: Apache-2.0",
        ),
    ] {
        let text = std::fs::read_to_string(root.join(file)).expect(file);
        assert!(text.contains(needle), "{file} does not declare {needle}");
    }
}

/// Catches a release without a CHANGELOG entry, or a CHANGELOG that does not tell how to
/// upgrade the CRD (Helm never upgrades CRDs).
#[test]
fn changelog_covers_the_version_and_the_crd_upgrade() {
    let root = repo_root();
    let changelog = std::fs::read_to_string(root.join("CHANGELOG.md")).expect("CHANGELOG.md");
    let cargo = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("the workspace version");
    assert!(
        changelog.contains(&format!("## [{version}]")) || changelog.contains("## [Unreleased]"),
        "CHANGELOG.md has no section for {version} (or Unreleased)"
    );
    assert!(
        changelog.contains("kubectl apply --server-side -f crds/modelpool.yaml"),
        "CHANGELOG.md does not say how to upgrade the CRD"
    );
}

/// Catches default links (alerts' runbooks, the dashboard, the chart, the crates) left on a
/// placeholder host.
#[test]
fn default_links_point_at_the_project() {
    let root = repo_root();
    for file in [
        "Cargo.toml",
        "alerts/modelpool.rules.yaml",
        "dashboards/modelpool.json",
        "charts/modelpool/Chart.yaml",
        "charts/modelpool/values.yaml",
        "charts/modelpool/templates/prometheusrule.yaml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).expect(file);
        assert!(
            !text.contains("example.invalid") && !text.contains("example.com/modelpool"),
            "{file} links to a placeholder host"
        );
    }
}
