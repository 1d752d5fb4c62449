//! Whole-database operations for the operator: backup and its check.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::Result;

/// Writes a consistent snapshot of the database to `target` (`VACUUM INTO`) while the server
/// keeps writing. `target` must not exist.
pub fn backup_into(conn: &Connection, target: &Path) -> Result<()> {
    conn.execute("VACUUM INTO ?1", [target.to_string_lossy().as_ref()])?;
    Ok(())
}

/// Opens the database file at `path` read-only and runs SQLite's integrity check: `"ok"`, or
/// the first problem it found.
pub fn integrity_check(path: &Path) -> Result<String> {
    let copy = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    Ok(copy.query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;

    #[test]
    fn backup_is_a_sound_copy() {
        let (dir, store) = test_store();
        let target = dir.path().join("copy.db");
        store.blocking(|c| backup_into(c, &target)).unwrap();
        assert_eq!(integrity_check(&target).unwrap(), "ok");
    }
}
