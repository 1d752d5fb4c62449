//! Data-dir health: free space and a real write probe. `serve` runs [`preflight`] before it
//! creates anything, so a full disk or a read-only mount stops startup with a clear error and
//! leaves no partial state; `doctor` reports the same facts.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Below this, `serve` refuses to start: SQLite needs room for its WAL and checkpoints, and a
/// server that cannot record calls must not take them.
pub const MIN_FREE_BYTES: u64 = 16 * 1024 * 1024;
/// Below this, `serve` logs a warning and `doctor` says WARN.
pub const LOW_FREE_BYTES: u64 = 512 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "data dir {dir} has only {} free; voicectl needs at least {} to start (free some space on that filesystem, or move server.data_dir)",
        human_bytes(*.free),
        human_bytes(*.need)
    )]
    LowSpace { dir: PathBuf, free: u64, need: u64 },
    #[error("data dir {dir} is not writable ({source}); {hint}")]
    NotWritable {
        dir: PathBuf,
        source: std::io::Error,
        hint: String,
    },
    #[error("cannot check free space in {dir}: {source}")]
    Stat {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Bytes available to unprivileged users on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: an all-zero statvfs is a valid value for this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Creates, writes, syncs and removes a small file in `dir`: the only honest answer to "can
/// we write here" (modes lie for root, read-only mounts, full disks and quotas).
pub fn probe_writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".write-probe-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&probe)?;
        f.write_all(&[0u8; 4096])?;
        f.sync_all()
    })();
    // Remove it even when the write failed half-way; a create failure leaves nothing.
    let _ = std::fs::remove_file(&probe);
    result
}

/// What to do about a failed write probe, by cause.
pub fn write_hint(dir: &Path, e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EROFS) => format!(
            "the filesystem is mounted read-only: remount it read-write or choose another \
             server.data_dir (under systemd, ProtectSystem=strict leaves only /var/lib/voicectl \
             writable; add ReadWritePaths={} in a drop-in for another location)",
            dir.display()
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => format!(
            "uid {} may not write there: chown -R voicectl:voicectl {} (or run as its owner)",
            // SAFETY: geteuid cannot fail.
            unsafe { libc::geteuid() },
            dir.display()
        ),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
            "the disk (or quota) is full: free some space".into()
        }
        _ => "check the directory, its mount and its permissions".into(),
    }
}

/// The startup gate: enough free space and a successful write, before anything is created.
pub fn preflight(dir: &Path) -> Result<(), DataDirError> {
    let free = free_bytes(dir).map_err(|source| DataDirError::Stat {
        dir: dir.to_owned(),
        source,
    })?;
    if free < MIN_FREE_BYTES {
        return Err(DataDirError::LowSpace {
            dir: dir.to_owned(),
            free,
            need: MIN_FREE_BYTES,
        });
    }
    probe_writable(dir).map_err(|source| DataDirError::NotWritable {
        dir: dir.to_owned(),
        hint: write_hint(dir, &source),
        source,
    })?;
    if free < LOW_FREE_BYTES {
        tracing::warn!(
            data_dir = %dir.display(),
            free = %human_bytes(free),
            "little free space left in the data dir"
        );
    }
    Ok(())
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        probe_writable(dir.path()).unwrap();
        preflight(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(probe_writable(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(16 * 1024 * 1024), "16.0 MiB");
    }

    #[test]
    fn hints_name_the_cause() {
        let d = Path::new("/x");
        let ro = std::io::Error::from_raw_os_error(libc::EROFS);
        assert!(write_hint(d, &ro).contains("read-only"));
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(write_hint(d, &full).contains("full"));
        let perm = std::io::Error::from_raw_os_error(libc::EACCES);
        assert!(write_hint(d, &perm).contains("chown"));
    }
}
