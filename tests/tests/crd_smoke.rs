//! The ModelPool CRD (crds/modelpool.yaml) and the example pools (examples/pools/*.yaml)
//! against a real kube-apiserver, through the machine's kubectl.

use std::path::PathBuf;
use std::sync::OnceLock;

use modelpool_e2e::{ControlPlane, repo_root, support::GET_MP_COLUMNS as COLUMNS};

/// Installs the CRD once per test process and waits until it is served.
fn install_crd() -> &'static ControlPlane {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    let cp = ControlPlane::shared();
    INSTALLED.get_or_init(|| {
        let crd = repo_root().join("crds/modelpool.yaml");
        let crd = crd.to_str().expect("a UTF-8 path");
        let out = cp.kubectl_ok(["apply", "--server-side", "-f", crd]);
        assert!(out.contains("modelpools.modelpool.io"), "{out}");
        modelpool_e2e::support::wait_crd_established(cp, "modelpools.modelpool.io");
    });
    cp
}

fn examples() -> Vec<PathBuf> {
    let dir = repo_root().join("examples/pools");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn api_resources_shows_modelpools() {
    let cp = install_crd();
    let out = cp.kubectl_ok(["api-resources"]);
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some("modelpools"))
        .unwrap_or_else(|| panic!("no modelpools in:\n{out}"));
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>(),
        [
            "modelpools",
            "mp",
            "modelpool.io/v1alpha1",
            "true",
            "ModelPool"
        ],
        "{line}"
    );
}

#[tokio::test]
async fn examples_apply_and_print_columns() {
    let cp = install_crd();
    let files = examples();
    assert!(!files.is_empty(), "no examples/pools/*.yaml");
    for file in files {
        let shown = file.display().to_string();
        let field = |path: &str| {
            let jsonpath = format!("jsonpath={{{path}}}");
            cp.kubectl_ok(["create", "--dry-run=client", "-f", &shown, "-o", &jsonpath])
        };
        let name = field(".metadata.name");
        // A pool that names its namespace goes there; others into a fresh one.
        let ns = match field(".metadata.namespace") {
            ns if ns.is_empty() => cp.fresh_namespace("example").await,
            ns => {
                let namespace = format!(
                    r#"{{"apiVersion":"v1","kind":"Namespace","metadata":{{"name":"{ns}"}}}}"#
                );
                let out = cp.kubectl_stdin(["apply", "-f", "-"], &namespace);
                assert!(out.status.success(), "namespace {ns}: {out:?}");
                ns
            }
        };

        let out = cp.kubectl_ok(["apply", "-n", &ns, "-f", &shown]);
        assert_eq!(
            out.trim(),
            format!("modelpool.modelpool.io/{name} created"),
            "{shown}"
        );

        let table = cp.kubectl_ok(["get", "mp", "-n", &ns, &name]);
        let (header, row) = parse_table(&table);
        assert_eq!(header, COLUMNS, "{shown}:\n{table}");
        let cell = |column: &str| row[COLUMNS.iter().position(|c| *c == column).unwrap()].as_str();

        assert_eq!(cell("NAME"), name, "{shown}");
        let mode = cp.kubectl_ok([
            "get",
            "mp",
            "-n",
            &ns,
            &name,
            "-o",
            "jsonpath={.spec.policy.mode}",
        ]);
        assert_eq!(cell("MODE"), mode, "{shown}:\n{table}");
        let vram = cp.kubectl_ok([
            "get",
            "mp",
            "-n",
            &ns,
            &name,
            "-o",
            "jsonpath={.spec.limits.vram}",
        ]);
        assert_eq!(cell("CEILING"), vram, "{shown}:\n{table}");
        // No operator runs here: the status columns are empty.
        for status_column in ["MODELS", "PODS", "VRAM", "RAM", "READY", "UNVERIFIED"] {
            assert_eq!(cell(status_column), "", "{shown}:\n{table}");
        }
        assert!(!cell("AGE").is_empty(), "{shown}:\n{table}");
        // `-o wide` adds the RAM ceiling.
        let wide = cp.kubectl_ok(["get", "mp", "-n", &ns, &name, "-o", "wide"]);
        let ram = cp.kubectl_ok([
            "get",
            "mp",
            "-n",
            &ns,
            &name,
            "-o",
            "jsonpath={.spec.limits.ram}",
        ]);
        let header = wide.lines().next().unwrap_or_default();
        assert!(header.contains("RAM CEILING"), "{wide}");
        if !ram.is_empty() {
            assert!(
                wide.lines().nth(1).unwrap_or_default().contains(&ram),
                "{wide}"
            );
        }
    }

    // All pools, through the short name, across namespaces.
    let all = cp.kubectl_ok(["get", "mp", "-A", "-o", "name"]);
    assert_eq!(all.lines().count(), examples().len(), "{all}");
}

/// The header and first row of kubectl's table output, cut at the header's column
/// starts (empty cells are blank).
fn parse_table(table: &str) -> (Vec<String>, Vec<String>) {
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    let row = lines.next().unwrap_or_default();
    let mut starts: Vec<usize> = header
        .char_indices()
        .filter(|&(i, c)| c != ' ' && (i == 0 || header.as_bytes()[i - 1] == b' '))
        .map(|(i, _)| i)
        .collect();
    let names = header.split_whitespace().map(str::to_owned).collect();
    starts.push(usize::MAX);
    let cells = starts
        .windows(2)
        .map(|w| {
            let end = w[1].min(row.len());
            row.get(w[0].min(end)..end)
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .collect();
    (names, cells)
}

/// The Foundation issue's check: `kubectl apply --dry-run=client` accepts the committed CRD
/// (kubectl 1.32 needs a server for discovery even for a client dry run).
#[test]
fn committed_crd_passes_a_client_dry_run() {
    let cp = ControlPlane::shared();
    let crd = repo_root().join("crds/modelpool.yaml");
    let out = cp.kubectl_ok([
        "apply",
        "--dry-run=client",
        "-f",
        crd.to_str().expect("a UTF-8 path"),
    ]);
    assert!(out.contains("modelpools.modelpool.io"), "{out}");
}
