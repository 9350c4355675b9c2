//! Files' metadata: `f:<id>` (owner, lines, the OpenAI object, creation time), listed by owner in
//! `fo:<owner>` (creation order) and by age in `fa`.

use ::redis::Cmd;

use super::content::content_key;
use super::{owner_key, valid_id, Ops, Shared};
use crate::batch::model::{FileObject, ListQuery};
use crate::batch::store::{StoreError, StoredFile};

/// Files read per round trip while a filtered list fills up.
const PAGE: usize = 100;

fn file_key(shared: &Shared, id: &str) -> String {
    shared.key(&format!("f:{id}"))
}

fn by_owner(shared: &Shared, owner: &str) -> String {
    shared.key(&format!("fo:{}", owner_key(owner)))
}

/// The commands that list `file` (its content kept for good from now on), for `seq`.
pub(super) fn insert_ops(
    shared: &Shared,
    ops: &mut Ops,
    file: &StoredFile,
    seq: u64,
) -> Result<(), StoreError> {
    let id = &file.object.id;
    let key = file_key(shared, id);
    let object = serde_json::to_string(&file.object).map_err(record_error)?;
    let (lines, created, seq) = (
        file.lines.to_string(),
        file.object.created_at.to_string(),
        seq.to_string(),
    );
    ops.op(&[
        b"HSET",
        key.as_bytes(),
        b"owner",
        file.owner.as_bytes(),
        b"lines",
        lines.as_bytes(),
        b"object",
        object.as_bytes(),
        b"created_at",
        created.as_bytes(),
    ]);
    ops.op(&[
        b"ZADD",
        by_owner(shared, &file.owner).as_bytes(),
        seq.as_bytes(),
        id.as_bytes(),
    ]);
    ops.op(&[
        b"ZADD",
        shared.key("fa").as_bytes(),
        created.as_bytes(),
        id.as_bytes(),
    ]);
    ops.op(&[b"PERSIST", content_key(shared, id).as_bytes()]);
    Ok(())
}

pub(super) fn record_error(error: serde_json::Error) -> StoreError {
    StoreError(format!("batch store record: {error}"))
}

pub(super) async fn insert(shared: &Shared, file: &StoredFile) -> Result<(), StoreError> {
    let seq = shared.next_seq().await?;
    let mut ops = Ops::default();
    insert_ops(shared, &mut ops, file, seq)?;
    shared
        .guarded(&file_key(shared, &file.object.id), "", "", ops)
        .await?;
    Ok(())
}

pub(super) async fn get(
    shared: &Shared,
    owner: &str,
    id: &str,
) -> Result<Option<StoredFile>, StoreError> {
    if !valid_id(id) {
        return Ok(None);
    }
    let (stored, lines, object): (Option<String>, Option<u64>, Option<String>) = shared
        .query(&Cmd::hmget(
            file_key(shared, id),
            &["owner", "lines", "object"],
        ))
        .await?;
    match (stored, lines, object) {
        (Some(stored), Some(lines), Some(object)) if stored == owner => Ok(Some(StoredFile {
            owner: stored,
            lines,
            object: serde_json::from_str(&object).map_err(record_error)?,
        })),
        _ => Ok(None),
    }
}

pub(super) async fn list(
    shared: &Shared,
    owner: &str,
    query: &ListQuery,
) -> Result<Vec<FileObject>, StoreError> {
    let index = by_owner(shared, owner);
    let after = shared.cursor(&index, query.after.as_ref()).await?;
    let wanted = query.limit.saturating_add(1);
    let mut files = Vec::new();
    // Exclusive bounds in creation order, moved past each page read.
    let mut from = after.map(|seq| format!("({seq}"));
    loop {
        let ids: Vec<(String, f64)> = if query.ascending {
            let min = from.clone().unwrap_or_else(|| "-inf".to_owned());
            shared
                .query(&Cmd::zrangebyscore_limit_withscores(
                    &index,
                    min,
                    "+inf",
                    0,
                    PAGE as isize,
                ))
                .await?
        } else {
            let max = from.clone().unwrap_or_else(|| "+inf".to_owned());
            shared
                .query(&Cmd::zrevrangebyscore_limit_withscores(
                    &index,
                    max,
                    "-inf",
                    0,
                    PAGE as isize,
                ))
                .await?
        };
        let Some((_, last)) = ids.last() else { break };
        from = Some(format!("({last}"));
        let page = ids.len();
        for (id, _) in ids {
            let object: Option<String> = shared
                .query(&Cmd::hget(file_key(shared, &id), "object"))
                .await?;
            let Some(object) = object else { continue };
            let object: FileObject = serde_json::from_str(&object).map_err(record_error)?;
            if query
                .purpose
                .as_ref()
                .is_none_or(|purpose| *purpose == object.purpose)
            {
                files.push(object);
            }
            if files.len() >= wanted {
                return Ok(files);
            }
        }
        if page < PAGE {
            break;
        }
    }
    Ok(files)
}

/// The commands that remove the file `id` of `owner`, content included.
fn delete_ops(shared: &Shared, ops: &mut Ops, owner: &str, id: &str) {
    ops.op(&[
        b"DEL",
        file_key(shared, id).as_bytes(),
        content_key(shared, id).as_bytes(),
    ]);
    ops.op(&[b"ZREM", by_owner(shared, owner).as_bytes(), id.as_bytes()]);
    ops.op(&[b"ZREM", shared.key("fa").as_bytes(), id.as_bytes()]);
}

pub(super) async fn delete(shared: &Shared, owner: &str, id: &str) -> Result<bool, StoreError> {
    if !valid_id(id) {
        return Ok(false);
    }
    let mut ops = Ops::default();
    delete_ops(shared, &mut ops, owner, id);
    shared
        .guarded(&file_key(shared, id), "owner", owner, ops)
        .await
}

/// Removes files created before `before` (Unix seconds).
pub(super) async fn sweep(shared: &Shared, before: u64) -> Result<u64, StoreError> {
    let old: Vec<String> = shared
        .query(&Cmd::zrangebyscore(
            shared.key("fa"),
            "-inf",
            format!("({before}"),
        ))
        .await?;
    let mut removed = 0;
    for id in old {
        let owner: Option<String> = shared
            .query(&Cmd::hget(file_key(shared, &id), "owner"))
            .await?;
        let mut ops = Ops::default();
        match &owner {
            Some(owner) => delete_ops(shared, &mut ops, owner, &id),
            None => {
                ops.op(&[b"ZREM", shared.key("fa").as_bytes(), id.as_bytes()]);
            }
        }
        let guard = owner.as_deref().unwrap_or("");
        if shared
            .guarded(
                &file_key(shared, &id),
                if owner.is_some() { "owner" } else { "" },
                guard,
                ops,
            )
            .await?
            && owner.is_some()
        {
            removed += 1;
        }
    }
    Ok(removed)
}
