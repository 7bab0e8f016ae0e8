//! Where the weights are: a path as the app sees it, resolved inside a root (`/` on the host,
//! `/proc/<pid>/root` for the app's own filesystem view through a shared process namespace,
//! or a volume's mount point), following symbolic links the way the app's kernel would but
//! never out of the root, and for the model's files never out of the model's directory.
//!
//! Links are read and resolved here, component by component (an absolute link target starts
//! again at the root, like `openat2(RESOLVE_IN_ROOT)`), and the final open refuses a link
//! (`O_NOFOLLOW`). A directory swapped for a link between the check and the open is not
//! caught (that needs `openat2`, which this crate does without to stay free of `unsafe`).

use std::{
    ffi::OsString,
    path::{Component, Path, PathBuf},
};

use crate::WeightsError;

/// At most this many links on one path (Linux's `MAXSYMLINKS`).
const MAX_LINKS: u32 = 40;

/// The filesystem view the weights are read through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    dir: PathBuf,
}

impl Default for Root {
    fn default() -> Self {
        Self::host()
    }
}

impl Root {
    /// The sidecar's own filesystem.
    pub fn host() -> Self {
        Self { dir: "/".into() }
    }

    /// The filesystem of process `pid` as it sees it (needs a shared process namespace, and
    /// the right to read that process's root: same user, or `CAP_SYS_PTRACE`).
    pub fn process(pid: u32) -> Self {
        Self {
            dir: PathBuf::from(format!("/proc/{pid}/root")),
        }
    }

    /// A directory standing for `/` (a volume holding the models, mounted in the sidecar).
    pub fn dir(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The root on the sidecar's side.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Where an inner path (resolved) is on the sidecar's side.
    pub fn host_path(&self, inner: &Path) -> PathBuf {
        let relative = inner.strip_prefix("/").unwrap_or(inner);
        if relative.as_os_str().is_empty() {
            self.dir.clone()
        } else {
            self.dir.join(relative)
        }
    }

    /// Resolves `inner` (as the app sees it; relative means from the root) to an absolute inner
    /// path with no links left, refusing any step out of the root.
    pub fn resolve(&self, inner: &Path) -> Result<PathBuf, WeightsError> {
        self.walk(inner, None)
    }

    /// Resolves `inner` and requires the result (after every link) inside `within`, an
    /// already resolved inner directory: the model's directory.
    pub fn resolve_within(&self, inner: &Path, within: &Path) -> Result<PathBuf, WeightsError> {
        self.walk(inner, Some(within))
    }

    fn walk(&self, inner: &Path, within: Option<&Path>) -> Result<PathBuf, WeightsError> {
        let escape = |reason: String| WeightsError::Escape {
            path: inner.to_owned(),
            reason,
            inside: within.map_or_else(|| self.dir.clone(), Path::to_owned),
        };
        let mut pending: Vec<OsString> = Vec::new();
        push_components(&mut pending, inner);
        let mut current: Vec<OsString> = Vec::new();
        let mut links = 0;
        while let Some(part) = pending.pop() {
            if part == ".." {
                if current.pop().is_none() {
                    return Err(escape("goes above the root".into()));
                }
                continue;
            }
            let mut candidate: PathBuf = current.iter().collect();
            candidate.push(&part);
            // Inside the model's directory, or on the way down to it: nothing else is looked at.
            if let Some(within) = within {
                let absolute = Path::new("/").join(&candidate);
                if !absolute.starts_with(within) && !within.starts_with(&absolute) {
                    return Err(escape(format!("leads to {}", absolute.display())));
                }
            }
            let host = self.host_path(&Path::new("/").join(&candidate));
            let meta = std::fs::symlink_metadata(&host).map_err(|source| WeightsError::Io {
                path: host.clone(),
                source,
            })?;
            if !meta.file_type().is_symlink() {
                current.push(part);
                continue;
            }
            links += 1;
            if links > MAX_LINKS {
                return Err(escape(format!("has more than {MAX_LINKS} links")));
            }
            let target = std::fs::read_link(&host).map_err(|source| WeightsError::Io {
                path: host.clone(),
                source,
            })?;
            if target.is_absolute() {
                current.clear();
            }
            push_components(&mut pending, &target);
        }
        let resolved = Path::new("/").join(current.iter().collect::<PathBuf>());
        if let Some(within) = within
            && !resolved.starts_with(within)
        {
            return Err(escape(format!("leads to {}", resolved.display())));
        }
        Ok(resolved)
    }
}

/// Pushes `path`'s components on `stack` so that the first one pops first.
fn push_components(stack: &mut Vec<OsString>, path: &Path) {
    let parts: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    stack.extend(parts.into_iter().rev());
}
