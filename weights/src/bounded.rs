//! Reading a header within bounds: at most `cap` bytes, and no longer than the time budget.

use std::{
    fs::File,
    io::{self, BufReader, Read},
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::Instant,
};

use crate::{Limits, WeightsError};

/// Opens a regular file for reading without blocking on a FIFO and without following a link
/// in its last component (the resolver has already followed the ones allowed).
pub(crate) fn open_regular(host: &Path, shown: &Path) -> Result<(File, u64), WeightsError> {
    let io = |source| WeightsError::Io {
        path: shown.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(host)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        return Err(WeightsError::NotRegular {
            path: shown.to_owned(),
            kind: kind_name(&kind),
        });
    }
    Ok((file, meta.len()))
}

pub(crate) fn kind_name(kind: &std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else {
        "a regular file"
    }
}

/// Why a bounded read stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    Cap,
    Time,
}

/// A reader that refuses to go past `cap` bytes or past its deadline. Its own errors are
/// remembered (`stopped`) so that a parser that only sees an `io::Error` (serde_json) can still
/// report precisely.
pub(crate) struct Bounded<R> {
    inner: R,
    pub(crate) read: u64,
    cap: u64,
    deadline: Instant,
    pub(crate) stopped: Option<Stop>,
    calls: u32,
    path: PathBuf,
    limits: Limits,
}

impl Bounded<BufReader<File>> {
    pub(crate) fn file(file: File, path: &Path, limits: &Limits, started: Instant) -> Self {
        Bounded::new(
            BufReader::with_capacity(64 << 10, file),
            path,
            limits,
            started,
        )
    }
}

impl<R: Read> Bounded<R> {
    pub(crate) fn new(inner: R, path: &Path, limits: &Limits, started: Instant) -> Self {
        Self {
            inner,
            read: 0,
            cap: limits.max_header_bytes,
            deadline: started + limits.time_budget,
            stopped: None,
            calls: 0,
            path: path.to_owned(),
            limits: limits.clone(),
        }
    }
}

impl<R: Read> Bounded<R> {
    /// The error for a stop, naming what was being read.
    pub(crate) fn stop_error(&self, stop: Stop, field: &str) -> WeightsError {
        match stop {
            Stop::Cap => WeightsError::HeaderTooLarge {
                path: self.path.clone(),
                field: field.to_owned(),
                cap: self.limits.max_header_bytes,
            },
            Stop::Time => WeightsError::TooSlow {
                path: self.path.clone(),
                budget: self.limits.time_budget,
            },
        }
    }

    /// Checks the deadline (also called between entries by the parsers).
    pub(crate) fn check_time(&mut self) -> Result<(), Stop> {
        if Instant::now() > self.deadline {
            self.stopped = Some(Stop::Time);
            return Err(Stop::Time);
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes, naming `field` in the error.
    pub(crate) fn exact(&mut self, buf: &mut [u8], field: &str) -> Result<(), WeightsError> {
        match self.read_exact(buf) {
            Ok(()) => Ok(()),
            Err(error) => Err(self.error(error, field)),
        }
    }

    /// Turns an error from this reader into the crate's error for `field`.
    pub(crate) fn error(&self, error: io::Error, field: &str) -> WeightsError {
        if let Some(stop) = self.stopped {
            return self.stop_error(stop, field);
        }
        if error.kind() == io::ErrorKind::UnexpectedEof {
            return WeightsError::invalid(
                &self.path,
                field,
                format!("cut short at byte {}", self.read),
                "the header to continue (the file ends inside its header)",
            );
        }
        WeightsError::Io {
            path: self.path.clone(),
            source: error,
        }
    }

    /// Skips `n` bytes (still counted against the cap).
    pub(crate) fn skip(&mut self, n: u64, field: &dyn Fn() -> String) -> Result<(), WeightsError> {
        if self.read.saturating_add(n) > self.cap {
            return Err(self.stop_error(Stop::Cap, &field()));
        }
        let result = if n <= 256 {
            let mut buf = [0u8; 256];
            self.read_exact(&mut buf[..n as usize]).map(|()| n)
        } else {
            io::copy(&mut self.by_ref().take(n), &mut io::sink())
        };
        match result {
            Ok(copied) if copied == n => Ok(()),
            Ok(_) => Err(self.error(io::ErrorKind::UnexpectedEof.into(), &field())),
            Err(error) => Err(self.error(error, &field())),
        }
    }
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // The clock is read every 64 calls (a parser reads a few bytes at a time, and a clock
        // read costs more than that in some VMs); the parsers also check between entries.
        self.calls = self.calls.wrapping_add(1);
        if self.calls % 64 == 1 && self.check_time().is_err() {
            return Err(io::Error::other("time budget spent"));
        }
        let left = self.cap.saturating_sub(self.read);
        if left == 0 && !buf.is_empty() {
            self.stopped = Some(Stop::Cap);
            return Err(io::Error::other("header cap reached"));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.read += n as u64;
        Ok(n)
    }
}
