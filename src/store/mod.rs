//! Embedded SQLite: WAL, foreign keys, versioned migrations, and a lock file so that only one
//! `serve` owns a database. The server reaches it only through [`Store::run`] (the one writer
//! connection) and [`Store::read`] (a few read-only connections), both on Tokio's blocking
//! pool so the async reactor never waits on disk. WAL lets the readers work on a snapshot
//! while the writer commits, so a slow list or analytics query never holds up a webhook.
//! No SQL lives outside this module: callers use the typed functions of its children.

pub mod admin;
pub mod callpath;
pub mod calls;
pub mod campaigns;
pub mod jobs;
pub mod keys;
mod migrations;
pub mod recording;
pub mod retention;
pub mod sessions;
pub mod tenants;
pub mod tools;
pub mod webcalls;
pub mod weblinks;

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::Semaphore;

pub const DB_FILE: &str = "voicectl.db";
pub const LOCK_FILE: &str = "voicectl.lock";

/// Read-only connections beside the writer: enough for a few slow reads at once (lists,
/// analytics, transcripts) without each needing its own file handles and page cache.
const READERS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error(
        "database {path} has schema version {found}, newer than this voicectl understands ({known}); upgrade voicectl"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("database task failed: {0}")]
    Task(String),
}

impl StoreError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    readers: Arc<ReadPool>,
    path: Arc<PathBuf>,
}

/// Read-only connections, handed out one per [`Store::read`]. The semaphore counts the idle
/// ones, so a caller waits (asynchronously) for a connection rather than for a thread.
struct ReadPool {
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
    path: PathBuf,
}

impl ReadPool {
    fn open(path: &Path, n: usize) -> Result<ReadPool> {
        let conns = (0..n)
            .map(|_| open_reader(path))
            .collect::<Result<Vec<_>>>()?;
        Ok(ReadPool {
            idle: Mutex::new(conns),
            permits: Arc::new(Semaphore::new(n)),
            path: path.to_owned(),
        })
    }

    /// Runs `f` on an idle connection. Async callers hold a permit, so one is there; a
    /// blocking caller that finds none idle gets a connection of its own for this read.
    fn with<R>(&self, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(c) => c,
            None => return f(&open_reader(&self.path)?),
        };
        let out = f(&conn);
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
        out
    }
}

fn open_reader(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

impl Store {
    /// Opens (creating if needed) the database in `data_dir` and brings its schema up to date.
    pub fn open(data_dir: &Path) -> Result<Store> {
        ensure_private_dir(data_dir)?;
        let path = data_dir.join(DB_FILE);
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // The database holds webhook secrets and key hashes: owner-only, whatever the umask.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| StoreError::io(format!("chmod {}", path.display()), e))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: every commit is fsynced before it returns, so an answered 2xx (a queued call,
        // a dial claim) survives power loss, not only a crashed process (SPEC §10). NORMAL
        // could roll back the last commits and dial a person twice after a power cut.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrations::apply(&conn, &path)?;
        // After the writer: the database is in WAL mode and its schema current by now.
        let readers = ReadPool::open(&path, READERS)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            readers: Arc::new(readers),
            path: Arc::new(path),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the blocking pool with the connection. For async callers.
    pub async fn run<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.blocking(f))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// [`Store::run`] for work that can also refuse on its own terms: `f`'s error type is the
    /// caller's, and a task failure arrives as a [`StoreError`] converted into it.
    pub async fn try_run<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: FnOnce(&mut Connection) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = store.conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(|e| E::from(StoreError::Task(e.to_string())))?
    }

    /// Runs the read-only `f` on one of the read connections, on the blocking pool. For reads
    /// that may be slow (lists, analytics, transcripts, events): they see the last committed
    /// state and never wait for, or hold up, the writer.
    pub async fn read<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let permit = Arc::clone(&self.readers.permits)
            .acquire_owned()
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?;
        let readers = Arc::clone(&self.readers);
        tokio::task::spawn_blocking(move || {
            let out = readers.with(f);
            drop(permit);
            out
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// [`Store::read`] on this thread. For the CLI.
    pub fn read_blocking<R>(&self, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
        self.readers.with(f)
    }

    /// Runs `f` on this thread. For the CLI and for code already on a blocking thread.
    pub fn blocking<R>(&self, f: impl FnOnce(&mut Connection) -> Result<R>) -> Result<R> {
        // A panic while holding the lock leaves the connection itself intact (SQLite rolls
        // back any open transaction when the `Transaction` guard drops), so keep using it.
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
    }

    /// A cheap liveness check for readiness probes.
    pub async fn ping(&self) -> bool {
        self.run(|c| Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?))
            .await
            .is_ok()
    }
}

/// Creates `dir` (and parents) owner-only; tightens an existing one that is looser.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| StoreError::io(format!("cannot create data dir {}", dir.display()), e))?;
    }
    let meta = std::fs::metadata(dir)
        .map_err(|e| StoreError::io(format!("data dir {}", dir.display()), e))?;
    if !meta.is_dir() {
        return Err(StoreError::io(
            format!("data dir {}", dir.display()),
            std::io::Error::other("exists but is not a directory"),
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| StoreError::io(format!("chmod 0700 {}", dir.display()), e))?;
    }
    Ok(())
}

/// Writes `contents` to `path` atomically (temp file + rename) with mode 0600.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let ctx = |what: &str| format!("{what} {}", path.display());
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| StoreError::io(ctx("cannot write"), e))?;
    f.write_all(contents)
        .and_then(|_| f.sync_all())
        .map_err(|e| StoreError::io(ctx("cannot write"), e))?;
    std::fs::rename(&tmp, path).map_err(|e| StoreError::io(ctx("cannot write"), e))?;
    Ok(())
}

/// An exclusive advisory lock on `data_dir/voicectl.lock`, held for the life of `serve`.
pub struct DataDirLock {
    _file: File,
}

pub fn lock_data_dir(data_dir: &Path) -> Result<DataDirLock> {
    let path = data_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| StoreError::io(format!("cannot open lock file {}", path.display()), e))?;
    match file.try_lock() {
        Ok(()) => Ok(DataDirLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Conflict(format!(
            "another voicectl serve is already using {} (lock {} is held)",
            data_dir.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(StoreError::io(format!("cannot lock {}", path.display()), e))
        }
    }
}

#[cfg(test)]
pub(crate) fn test_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("data")).expect("open store");
    (dir, store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_with_wal_fk_and_private_modes() {
        let (dir, store) = test_store();
        store
            .blocking(|c| {
                let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
                assert_eq!(mode, "wal");
                let fk: i64 = c.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?;
                assert_eq!(fk, 1);
                // 2 = FULL: commits are durable across power loss.
                let sync: i64 = c.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
                assert_eq!(sync, 2);
                Ok(())
            })
            .unwrap();
        let data = dir.path().join("data");
        let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let mode = std::fs::metadata(data.join(DB_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        // Re-opening an up-to-date database applies nothing and keeps working.
        drop(store);
        Store::open(&data).unwrap();
    }

    #[tokio::test]
    async fn a_long_read_does_not_hold_up_a_write() {
        use super::tenants::{self, TenantPatch};
        let (_dir, store) = test_store();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let reader = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .read(move |c| {
                        let tx = c.unchecked_transaction()?;
                        let count = || -> Result<i64> {
                            Ok(tx.query_row("SELECT COUNT(*) FROM tenants", [], |r| r.get(0))?)
                        };
                        let before = count()?;
                        let _ = started_tx.send(());
                        // Keep the read transaction open until the write has committed.
                        let _ = release_rx.recv_timeout(Duration::from_secs(10));
                        Ok((before, count()?))
                    })
                    .await
            })
        };
        started_rx.await.unwrap();
        let write = store.run(|c| {
            tenants::create(
                c,
                TenantPatch {
                    name: Some("written".into()),
                    ..Default::default()
                },
            )
        });
        // The writer's busy timeout is 5 s: a blocked write would miss this deadline.
        tokio::time::timeout(Duration::from_secs(2), write)
            .await
            .expect("the write waited for a reader")
            .unwrap();
        release_tx.send(()).unwrap();
        let (before, after) = reader.await.unwrap().unwrap();
        assert_eq!((before, after), (0, 0), "the reader kept its snapshot");
        let now = store.read(tenants::list).await.unwrap();
        assert_eq!(now.len(), 1, "a read after the write sees it");
        let refused = store
            .read(|c| Ok(c.execute("DELETE FROM tenants", [])?))
            .await;
        assert!(matches!(refused, Err(StoreError::Db(_))), "{refused:?}");
        assert_eq!(store.read_blocking(tenants::list).unwrap().len(), 1);
    }

    #[test]
    fn lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_data_dir(dir.path()).unwrap();
        assert!(matches!(
            lock_data_dir(dir.path()),
            Err(StoreError::Conflict(_))
        ));
        drop(first);
        lock_data_dir(dir.path()).unwrap();
    }
}
