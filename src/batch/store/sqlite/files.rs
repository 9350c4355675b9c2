//! The `files` table and the content files it lists (`<store>/files/<id>`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::batch::model::{FileObject, ListQuery};
use crate::batch::store::{StoreError, StoredFile};

/// Where a file's content lives. Ids are ours (`file-<hex>`), but one read from a URL reaches
/// this too, so anything that could leave the directory is refused.
pub(super) fn content_path(contents: &Path, id: &str) -> Result<PathBuf, StoreError> {
    let safe = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !safe {
        return Err(StoreError("not a file id".to_owned()));
    }
    Ok(contents.join(id))
}

pub(super) fn insert(conn: &Connection, file: &StoredFile) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO files (id, owner, purpose, created_at, lines, object)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            file.object.id,
            file.owner,
            file.object.purpose,
            file.object.created_at,
            file.lines,
            serde_json::to_string(&file.object)?,
        ],
    )?;
    Ok(())
}

fn stored(row: &Row<'_>) -> rusqlite::Result<(String, u64, String)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
}

pub(super) fn get(
    conn: &mut Connection,
    owner: &str,
    id: &str,
) -> Result<Option<StoredFile>, StoreError> {
    let row = conn
        .query_row(
            "SELECT owner, lines, object FROM files WHERE id = ?1 AND owner = ?2",
            params![id, owner],
            stored,
        )
        .optional()?;
    row.map(|(owner, lines, object)| {
        Ok(StoredFile {
            owner,
            lines,
            object: serde_json::from_str(&object)?,
        })
    })
    .transpose()
}

pub(super) fn list(
    conn: &mut Connection,
    owner: &str,
    query: &ListQuery,
) -> Result<Vec<FileObject>, StoreError> {
    let after = super::cursor(conn, "files", owner, query.after.as_deref())?;
    let sql = if query.ascending {
        "SELECT object FROM files WHERE owner = ?1 AND seq > ?2 AND (?3 IS NULL OR purpose = ?3)
         ORDER BY seq ASC LIMIT ?4"
    } else {
        "SELECT object FROM files WHERE owner = ?1 AND seq < ?2 AND (?3 IS NULL OR purpose = ?3)
         ORDER BY seq DESC LIMIT ?4"
    };
    let start = after.unwrap_or(if query.ascending { 0 } else { i64::MAX });
    let mut statement = conn.prepare_cached(sql)?;
    let rows = statement.query_map(
        params![owner, start, query.purpose, query.limit.saturating_add(1)],
        |row| row.get::<_, String>(0),
    )?;
    let mut files = Vec::new();
    for object in rows {
        files.push(serde_json::from_str(&object?)?);
    }
    Ok(files)
}

pub(super) fn delete(
    conn: &mut Connection,
    contents: &Path,
    owner: &str,
    id: &str,
) -> Result<bool, StoreError> {
    let deleted = conn.execute(
        "DELETE FROM files WHERE id = ?1 AND owner = ?2",
        params![id, owner],
    )?;
    if deleted == 0 {
        return Ok(false);
    }
    // The row is gone first: a crash before the content goes leaves an orphan that the next
    // start removes, never a listed file without content.
    remove_content(contents, id);
    Ok(true)
}

fn remove_content(contents: &Path, id: &str) {
    if let Ok(path) = content_path(contents, id) {
        if let Err(error) = std::fs::remove_file(&path) {
            if error.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(%error, file = id, "could not remove a batch file's content");
            }
        }
    }
}

/// Removes files created before `before` (Unix seconds), rows and contents.
pub(super) fn sweep(
    conn: &mut Connection,
    contents: &Path,
    before: u64,
) -> Result<u64, StoreError> {
    let ids: Vec<String> = {
        let mut statement = conn.prepare_cached("SELECT id FROM files WHERE created_at < ?1")?;
        let rows = statement.query_map([before], |row| row.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    conn.execute("DELETE FROM files WHERE created_at < ?1", [before])?;
    for id in &ids {
        remove_content(contents, id);
    }
    Ok(ids.len() as u64)
}

/// Removes contents that no row lists: uploads and finalizations that a crash cut short.
pub(super) fn remove_orphans(conn: &Connection, contents: &Path) -> Result<(), StoreError> {
    let listed: HashSet<String> = {
        let mut statement = conn.prepare("SELECT id FROM files")?;
        let rows = statement.query_map([], |row| row.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    for entry in std::fs::read_dir(contents)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !listed.contains(name) {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}
