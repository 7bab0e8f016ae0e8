//! Where the weights are: paths resolved inside a root (a volume, `/proc/<pid>/root`), links
//! followed as the app's kernel would, but never out of the root or the model's directory.
#![allow(clippy::unwrap_used)]

mod common;

use std::{os::unix::fs::symlink, path::Path};

use common::*;
use modelpool_weights::{Options, Root, estimate};

const ST: &str = r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;

#[test]
fn a_volume_root_stands_for_slash_and_absolute_links_stay_inside_it() {
    let volume = tempfile::tempdir().unwrap();
    let root = Root::dir(volume.path());
    std::fs::create_dir_all(volume.path().join("data/blobs")).unwrap();
    std::fs::create_dir_all(volume.path().join("models/m")).unwrap();
    write(
        &volume.path().join("data/blobs/x.safetensors"),
        &safetensors_bytes(ST, 16),
    );
    // The model directory is a link (absolute, as the app sees it) to /data/blobs.
    symlink("/data/blobs", volume.path().join("models/link")).unwrap();
    let e = estimate(
        &root,
        Path::new("/models/link/x.safetensors"),
        &Options::default(),
    )
    .unwrap();
    assert_eq!(e.weights_bytes, 16);
    // `..` after a link is taken from where the link led (as the kernel does).
    std::fs::create_dir_all(volume.path().join("data/m")).unwrap();
    assert_eq!(
        root.resolve(Path::new("/models/link/../m")).unwrap(),
        Path::new("/data/m")
    );
    // A link inside the model directory to a file in the same directory is followed.
    symlink(
        "x.safetensors",
        volume.path().join("data/blobs/y.safetensors"),
    )
    .unwrap();
    assert_eq!(
        estimate(
            &root,
            Path::new("/data/blobs/y.safetensors"),
            &Options::default()
        )
        .unwrap()
        .weights_bytes,
        16
    );
    // Climbing above the root is refused, even through a link.
    let error = root
        .resolve(Path::new("/models/../../etc/passwd"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("goes above the root"), "{error}");
    symlink(
        "../../../../../../../../etc",
        volume.path().join("models/etc"),
    )
    .unwrap();
    let error = root
        .resolve(Path::new("/models/etc/passwd"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("goes above the root"), "{error}");
    // An absolute link to /etc means the volume's /etc, which does not exist.
    symlink("/etc/passwd", volume.path().join("models/m/z.safetensors")).unwrap();
    let error = estimate(
        &root,
        Path::new("/models/m/z.safetensors"),
        &Options::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("refused"), "{error}");
}

#[test]
fn link_loops_end() {
    let volume = tempfile::tempdir().unwrap();
    symlink("b", volume.path().join("a")).unwrap();
    symlink("a", volume.path().join("b")).unwrap();
    let error = Root::dir(volume.path())
        .resolve(Path::new("/a"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("more than 40 links"), "{error}");
}

#[test]
fn the_apps_own_view_through_proc_pid_root() {
    // Our own process's view is the host's: the same file through /proc/self's pid.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    write(&path, &safetensors_bytes(ST, 16));
    let root = Root::process(std::process::id());
    assert_eq!(
        root.path(),
        Path::new(&format!("/proc/{}/root", std::process::id()))
    );
    assert_eq!(
        estimate(&root, &path, &Options::default())
            .unwrap()
            .weights_bytes,
        16
    );
}
