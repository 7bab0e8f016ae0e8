//! What the bench's integration tests share.

use std::path::PathBuf;

/// The sidecar binary `cargo test --workspace` builds next to the bench.
pub fn sidecar_bin() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_modelpool-bench"));
    let sidecar = bench.with_file_name("modelpool-sidecar");
    assert!(
        sidecar.exists(),
        "{} is missing: build it with `cargo build -p modelpool-sidecar` (cargo test --workspace does)",
        sidecar.display()
    );
    sidecar
}
