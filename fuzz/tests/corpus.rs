//! Replays the committed corpus (and what fuzzing added under fuzz/corpus) through every
//! target's body on stable Rust: what the test command runs when no nightly toolchain is there,
//! and always before fuzzing.

use std::path::Path;

type Body = fn(&[u8]);

const TARGETS: [(&str, Body); 6] = [
    ("pool_yaml", modelpool_fuzz::pool_yaml),
    ("quantity", modelpool_fuzz::quantity),
    ("duration", modelpool_fuzz::duration),
    ("pod_report", modelpool_fuzz::pod_report),
    ("safetensors", modelpool_fuzz::safetensors),
    ("gguf", modelpool_fuzz::gguf),
];

#[test]
fn every_corpus_input_passes_its_target() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, body) in TARGETS {
        let dir = corpus.join(target);
        let mut count = 0;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let data = std::fs::read(&path)?;
            let outcome = std::panic::catch_unwind(|| body(&data));
            assert!(outcome.is_ok(), "{target}: {} fails", path.display());
            count += 1;
        }
        assert!(count >= 3, "{target}: only {count} corpus inputs in {}", dir.display());
        println!("{target}: {count} inputs");
    }
    Ok(())
}
