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

/// Catches a scrape config in the runbook ("Scraping without the Prometheus Operator") that
/// Prometheus would refuse to load, or whose relabelling keeps on names the chart and the
/// webhook no longer use (the pool label, the sidecar's and the operator's metrics ports, the
/// operator Service's component label).
#[test]
fn the_runbooks_scrape_config_loads_and_names_what_we_deploy() {
    let runbook = std::fs::read_to_string(repo_root().join("docs/runbook.md")).expect("runbook");
    let section = runbook
        .split("\n## Scraping without the Prometheus Operator")
        .nth(1)
        .expect("docs/runbook.md has the section 'Scraping without the Prometheus Operator'");
    let config = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a yaml block in that section");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, config).expect("write");
    promtool(&[
        "check",
        "config",
        "--syntax-only",
        path.to_str().expect("utf-8 path"),
    ]);

    let parsed: Value = serde_saphyr::from_str(config).expect("the runbook's yaml");
    let jobs = parsed["scrape_configs"].as_array().expect("scrape_configs");
    let job_names: Vec<&str> = jobs.iter().filter_map(|j| j["job_name"].as_str()).collect();
    // The names the alerts and the dashboard select on.
    assert_eq!(job_names, ["modelpool-sidecar", "modelpool-operator"]);
    let keeps: Vec<String> = jobs
        .iter()
        .flat_map(|j| j["relabel_configs"].as_array().cloned().unwrap_or_default())
        .filter(|r| r["action"] == "keep")
        .map(|r| {
            format!(
                "{} {}",
                r["source_labels"][0].as_str().unwrap_or(""),
                r["regex"].as_str().unwrap_or("")
            )
        })
        .collect();
    let read = |path: &str| {
        std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let inject = read("operator/src/webhook/inject.rs");
    let helpers = read("charts/modelpool/templates/_helpers.tpl");
    let service = read("charts/modelpool/templates/operator-service.yaml");
    for (keep, source, what) in [
        (
            "__meta_kubernetes_pod_label_modelpool_io_pool .+",
            inject.contains("modelpool.io/pool"),
            "the pool label the webhook selects on",
        ),
        (
            "__meta_kubernetes_pod_container_port_name mp-metrics",
            inject.contains("\"mp-metrics\""),
            "the sidecar's metrics port name",
        ),
        (
            "__meta_kubernetes_service_label_app_kubernetes_io_component operator",
            helpers.contains("app.kubernetes.io/component: operator"),
            "the operator Service's component label",
        ),
        (
            "__meta_kubernetes_endpoint_port_name metrics",
            service.contains("- name: metrics"),
            "the operator Service's port name",
        ),
    ] {
        assert!(
            keeps.contains(&keep.to_owned()),
            "the runbook's config does not keep on {keep}: {keeps:?}"
        );
        assert!(
            source,
            "{what} is no longer what the runbook's config keeps on ({keep})"
        );
    }
}
