//! The API socket's file stays where apps look for it. Apps find the sidecar by path; if the
//! file is deleted (a cleanup script, a shared emptyDir emptied) or replaced, the listener
//! still runs but nobody can reach it. A watcher checks the path every second: the sidecar
//! binds it again when it is gone, and when it cannot, `/readyz` and `/healthz` fail with the
//! reason, so the kubelet's liveness probe restarts the container.

use std::{
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::Router;
use tokio::{sync::watch, task::JoinHandle};

use super::listen::{self, ConnMetrics, ListenLimits};

/// The API socket's health, shared with `/readyz` and `/healthz`.
#[derive(Debug)]
pub struct SocketWatch {
    path: PathBuf,
    /// The group it is given (`--socket-group`).
    group: Option<u32>,
    /// The inode of the socket this sidecar bound last.
    inode: Mutex<u64>,
    /// Why the socket is unusable, while it is.
    problem: Mutex<Option<String>>,
}

impl SocketWatch {
    /// Watches `path`, which this sidecar has just bound with `group`.
    pub fn new(path: &Path, group: Option<u32>) -> Arc<Self> {
        Arc::new(Self {
            path: path.to_owned(),
            group,
            inode: Mutex::new(inode_of(path).unwrap_or(0)),
            problem: Mutex::new(None),
        })
    }

    /// Why the socket cannot be reached, if it cannot.
    pub fn problem(&self) -> Option<String> {
        lock(&self.problem).clone()
    }

    /// Whether the path still holds the socket this sidecar bound.
    fn intact(&self) -> bool {
        inode_of(&self.path).is_some_and(|inode| inode == *lock(&self.inode))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The inode of the socket at `path` (None when it is gone or not a socket).
fn inode_of(path: &Path) -> Option<u64> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    meta.file_type().is_socket().then(|| meta.ino())
}

/// Every `every`, rebinds the socket when its file is gone or replaced, serving the same
/// router under the same limits; records the problem while it cannot.
pub fn spawn_watcher(
    watch: Arc<SocketWatch>,
    router: Router,
    limits: ListenLimits,
    metrics: ConnMetrics,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if watch.intact() {
                continue;
            }
            let path = watch.path.display().to_string();
            match super::http::bind_unix(&watch.path, watch.group) {
                Ok(listener) => {
                    *lock(&watch.inode) = inode_of(&watch.path).unwrap_or(0);
                    let was = lock(&watch.problem).take();
                    tracing::warn!(
                        socket = path,
                        before = was.as_deref().unwrap_or("deleted or replaced"),
                        "the API socket's file was gone: bound it again"
                    );
                    // The old listener keeps its open connections; new ones come here.
                    drop(listen::serve(
                        listener,
                        router.clone(),
                        limits,
                        metrics.clone(),
                        stop.clone(),
                        "api",
                    ));
                }
                Err(error) => {
                    let problem = format!(
                        "the API socket {path} is gone and could not be bound again: {error}"
                    );
                    let mut slot = lock(&watch.problem);
                    if slot.as_deref() != Some(problem.as_str()) {
                        tracing::error!(socket = path, %error, "the API socket is gone and could not be bound again: /readyz and /healthz fail until it is");
                    }
                    *slot = Some(problem);
                }
            }
        }
    })
}
