//! The alert rules (`alerts/modelpool.rules.yaml`) against the pinned promtool: they parse,
//! their unit tests (`alerts/tests.yaml`) pass, every alert has a test that fires it and one
//! where it stays silent, and every alert links to a section of `docs/runbook.md`. The chart's
//! copy of the rules is the same file. (That every rule expression returns data from a real
//! sidecar and operator is checked by `dashboard.rs`, which runs Prometheus.)

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use modelpool_e2e::{repo_root, success_stdout, tool};
use serde_json::Value;

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rules() -> Vec<Value> {
    let file = yaml(&repo_root().join("alerts/modelpool.rules.yaml"));
    file["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn alert_names() -> BTreeSet<String> {
    rules()
        .iter()
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect()
}

fn promtool(args: &[&str]) -> String {
    let mut cmd = Command::new(tool("promtool").expect("the pinned promtool"));
    cmd.args(args).current_dir(repo_root().join("alerts"));
    let out = cmd.output().expect("running promtool");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "promtool {} failed:\n{text}",
        args.join(" ")
    );
    text
}

/// Catches a rules file Prometheus would refuse to load (syntax, bad PromQL, bad templates).
#[test]
fn rules_pass_promtool_check() {
    let out = promtool(&[
        "check",
        "rules",
        "--lint=all",
        "--lint-fatal",
        "modelpool.rules.yaml",
    ]);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Catches an alert that fires when it should not, or not when it should (alerts/tests.yaml).
#[test]
fn rules_unit_tests_pass() {
    let out = promtool(&["test", "rules", "tests.yaml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Catches an alert added without unit tests: each alert needs an evaluation where it fires
/// and one where it stays silent.
#[test]
fn every_alert_is_tested_firing_and_silent() {
    let tests = yaml(&repo_root().join("alerts/tests.yaml"));
    let mut fires = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for test in tests["tests"].as_array().expect("tests") {
        for case in test["alert_rule_test"].as_array().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_owned();
            let expected = case["exp_alerts"].as_array().map_or(0, Vec::len);
            if expected > 0 {
                fires.insert(name);
            } else {
                silent.insert(name);
            }
        }
    }
    for alert in alert_names() {
        assert!(
            fires.contains(&alert),
            "no test in alerts/tests.yaml fires {alert}"
        );
        assert!(
            silent.contains(&alert),
            "no test in alerts/tests.yaml keeps {alert} silent"
        );
    }
}

/// The GitHub anchor of a Markdown heading: lowercase, spaces to '-', punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Catches an alert whose runbook link is dead (no such section in docs/runbook.md) or that
/// lacks what the on-call person reads first (severity, summary, description).
#[test]
fn every_alert_links_to_its_runbook_section() {
    let runbook = std::fs::read_to_string(repo_root().join("docs/runbook.md")).expect("runbook");
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(anchor)
        .collect();
    for rule in rules().iter().filter(|r| r["alert"].is_string()) {
        let name = rule["alert"].as_str().unwrap_or_default();
        let url = rule["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has no runbook_url"));
        let (base, fragment) = url
            .split_once('#')
            .unwrap_or_else(|| panic!("{name}: runbook_url {url} has no #section"));
        assert!(base.ends_with("/docs/runbook.md"), "{name}: {url}");
        assert_eq!(
            fragment,
            name.to_lowercase(),
            "{name}: the section is named after the alert"
        );
        assert!(
            anchors.contains(fragment),
            "{name}: docs/runbook.md has no section #{fragment}"
        );
        for key in ["summary", "description"] {
            assert!(rule["annotations"][key].is_string(), "{name} has no {key}");
        }
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["warning", "critical", "info"].contains(&severity),
            "{name}: severity {severity:?}"
        );
    }
}

/// Catches the chart's PrometheusRule drifting from the rules file people load by hand.
#[test]
fn chart_copy_of_the_rules_is_identical() {
    let root = repo_root();
    let original = std::fs::read(root.join("alerts/modelpool.rules.yaml")).expect("rules");
    let copy =
        std::fs::read(root.join("charts/modelpool/rules/modelpool.rules.yaml")).expect("copy");
    assert!(
        original == copy,
        "charts/modelpool/rules/modelpool.rules.yaml differs: cp alerts/modelpool.rules.yaml charts/modelpool/rules/"
    );
}

/// Catches promtool unit tests that pass only because a rule file was not found.
#[test]
fn unit_tests_load_the_rules_file() {
    let tests = yaml(&repo_root().join("alerts/tests.yaml"));
    let files: Vec<&str> = tests["rule_files"]
        .as_array()
        .expect("rule_files")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(files, ["modelpool.rules.yaml"]);
    let out = success_stdout(
        "promtool check rules",
        Command::new(tool("promtool").expect("promtool"))
            .args(["check", "rules", "modelpool.rules.yaml"])
            .current_dir(repo_root().join("alerts"))
            .output()
            .expect("promtool"),
    );
    assert!(
        out.contains(&format!("{} rules found", rules().len())),
        "{out}"
    );
}
