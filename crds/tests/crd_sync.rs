//! `crds/modelpool.yaml` is what `modelpool-operator crd` prints: regenerate it with
//! `cargo run -p modelpool-operator -- crd > crds/modelpool.yaml` when the types change.

#[test]
fn committed_crd_matches_the_types() {
    let generated = modelpool_crds::crd_yaml().expect("the CRD serializes");
    let committed = include_str!("../modelpool.yaml");
    assert!(
        generated == committed,
        "crds/modelpool.yaml is stale: run `cargo run -p modelpool-operator -- crd > crds/modelpool.yaml`"
    );
}
