//! The exclusive lock on `data_dir`: one edgebridge process per data directory.
//!
//! Two processes appending to and acking the same buffer corrupt it: a second systemd
//! instance, or a Kubernetes pod rescheduled while the old one still runs on the same
//! volume. [`Gateway::start`](crate::app::Gateway::start) therefore takes this lock first,
//! before any buffer is opened or any port bound, and holds it until shutdown is done.
//!
//! The lock is `flock(LOCK_EX | LOCK_NB)` on `data_dir/lock`. The kernel releases it
//! when the process ends, however it ends (kill -9 included), so a lock file left by a
//! dead process never blocks the next start; the file itself is never removed (removing
//! it would let two processes lock two different files). Once locked, the file holds the
//! holder's pid, so that a refused process can name it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

/// The lock file's name inside `data_dir`.
pub const LOCK_FILE: &str = "lock";

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds the lock: stop it first (or point this one at another
    /// `data_dir`); nothing was touched.
    #[error(
        "data_dir {} is in use by another edgebridge process ({}; lock file {}): two \
         processes on one data_dir would corrupt its buffers",
        .data_dir.display(),
        holder(.pid),
        .path.display()
    )]
    Held {
        data_dir: PathBuf,
        path: PathBuf,
        /// The holder's pid as it wrote it; `None` while it has not written it yet.
        pid: Option<u32>,
    },
    /// The lock file cannot be opened or locked (permissions, a file system without
    /// `flock`): fix the data_dir.
    #[error("cannot lock {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn holder(pid: &Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => "pid not written yet".to_string(),
    }
}

/// Held for the process's life; dropping it (closing the file) releases the lock.
#[derive(Debug)]
pub struct DataDirLock {
    /// The locked file: the lock lives as long as this descriptor is open.
    _file: File,
}

impl DataDirLock {
    /// Takes the lock on `data_dir` (which must exist) without waiting, and writes this
    /// process's pid into the lock file.
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock, LockError> {
        let path = data_dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        // Not truncated on open: until the lock is ours, the pid in it is the holder's.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut text = String::new();
                // A pid that cannot be read is reported as not written yet.
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held {
                    data_dir: data_dir.to_path_buf(),
                    path,
                    pid: text.trim().parse().ok(),
                });
            }
            Err(e) => return Err(io(e.into())),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = DataDirLock::acquire(dir.path()).expect("first lock");
        // flock locks belong to the open file description: a second open in the same
        // process conflicts like another process would.
        match DataDirLock::acquire(dir.path()) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected Held, got {other:?}"),
        }
        let message = DataDirLock::acquire(dir.path())
            .expect_err("still held")
            .to_string();
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        drop(first);
        DataDirLock::acquire(dir.path()).expect("free again once the holder closed it");
    }

    #[test]
    fn a_lock_file_left_behind_does_not_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(LOCK_FILE), "4194304\n").expect("stale lock file");
        let _lock = DataDirLock::acquire(dir.path()).expect("a stale file is not a lock");
        let pid = std::fs::read_to_string(dir.path().join(LOCK_FILE)).expect("read");
        assert_eq!(pid, format!("{}\n", std::process::id()));
    }
}
