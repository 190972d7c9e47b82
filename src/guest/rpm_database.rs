//! The one place that opens an rpm database (`rpmdb.sqlite`, rpm 4.16 and later: RHEL 9, Rocky,
//! Fedora), copied out of the guest. libguestfs's own rpm listing reads the database with the host's
//! librpm, whose configuration on Debian hosts points it elsewhere, so cloudimg reads the file itself.
//!
//! The file comes from the image and may be hostile: it is opened read-only and immutable (no
//! journal, no locks, nothing written), SQLite's defensive mode is on, schema code is not trusted, and
//! the query is cut off after a bounded amount of work.

use std::path::Path;

use anyhow::{Context, Result};
use rusqlite::{Connection, OpenFlags};

use crate::cloud_config::version::rpm_header_package;

/// SQLite virtual-machine steps a lookup may take: a real database answers in a few thousand.
const MAX_STEPS: u64 = 50_000_000;

/// The `version-release` of the first of `names` installed according to the database at `path`.
pub fn installed_version(path: &Path, names: &[&str]) -> Result<Option<String>> {
    let uri = format!("file:{}?immutable=1", path.display());
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(uri, flags).context("opening the rpm database")?;
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false)?;
    let steps = std::cell::Cell::new(0u64);
    conn.progress_handler(
        1000,
        Some(move || {
            steps.set(steps.get() + 1000);
            steps.get() > MAX_STEPS
        }),
    )?;
    // rpm keeps each package's header in `Packages` and indexes names in `Name`.
    let mut query = conn
        .prepare("SELECT p.blob FROM Name n JOIN Packages p ON p.hnum = n.hnum WHERE n.key = ?1")
        .context("reading the rpm database's tables")?;
    for name in names {
        let blobs = query.query_map([name], |row| row.get::<_, Vec<u8>>(0))?;
        for blob in blobs {
            let blob = blob.context("reading a package header from the rpm database")?;
            if let Some((package, version)) = rpm_header_package(&blob) {
                if package == *name {
                    return Ok(Some(version));
                }
            }
        }
    }
    Ok(None)
}
