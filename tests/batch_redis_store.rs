//! The Redis batch store on a real redis-server: a line's states and results, two consumers
//! (replicas) sharing one batch's lines with none leased twice, lines of a consumer that stopped
//! claimed after `claim_after` and its late result refused, files streamed in chunks, ownership,
//! and 503-worthy errors while Redis is down.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use common::redis::RedisServer;
use openrouter_proxy::batch::model::{Batch, BatchStatus, FileObject, ListQuery};
use openrouter_proxy::batch::store::{
    BatchStore, Lease, LineState, NewLine, Settlement, StoredFile, Transition,
};
use openrouter_proxy::batch::RedisStore;
use tokio::io::AsyncReadExt;

const CLAIM: Duration = Duration::from_millis(300);

async fn store(server: &RedisServer) -> RedisStore {
    RedisStore::new(server.handle("5s").await, CLAIM)
}

/// `batch_1` of `alice` with `lines` lines, validated through `store` and started.
async fn running(store: &RedisStore, lines: u64) {
    let batch = Batch::new(
        "batch_1".into(),
        "/v1/embeddings".into(),
        "f".into(),
        1,
        1 << 40,
    );
    store.insert_batch("alice", batch).await.unwrap();
    let claimed = store.batches_in(BatchStatus::Validating).await.unwrap();
    assert_eq!(claimed.len(), 1);
    store.clear_lines("batch_1").await.unwrap();
    let new = (1..=lines)
        .map(|line| NewLine {
            line,
            custom_id: format!("c{line}"),
            body: Bytes::from_static(b"{\"model\":\"m\"}"),
        })
        .collect();
    store.add_lines("batch_1", new).await.unwrap();
    let start = Transition {
        from: BatchStatus::Validating,
        to: BatchStatus::InProgress,
        at: 2,
    };
    let started = store.transition("batch_1", start).await.unwrap().unwrap();
    assert_eq!(started.request_counts.total, lines);
}

fn lease(now_ms: u64, max: usize) -> Lease {
    Lease {
        now_ms,
        until_ms: now_ms + 5000,
        max,
    }
}

async fn states(store: &RedisStore) -> Vec<LineState> {
    let lines = store.lines("batch_1", 0, 100).await.unwrap();
    lines.into_iter().map(|line| line.state).collect()
}

#[tokio::test]
async fn a_line_moves_through_its_states_and_is_counted_once() {
    let server = RedisServer::start().await;
    let store = store(&server).await;
    running(&store, 2).await;
    // A second replica finds nothing to validate.
    let other = self::store(&server).await;
    assert!(other
        .batches_in(BatchStatus::Validating)
        .await
        .unwrap()
        .is_empty());
    let first = store.lease("batch_1", lease(1000, 1)).await.unwrap();
    assert_eq!((first[0].line, first[0].attempts), (1, 0));
    assert!(store
        .settle("batch_1", 1, Settlement::RetryAt(3000))
        .await
        .unwrap());
    let second = store.lease("batch_1", lease(2000, 1)).await.unwrap();
    assert_eq!(second[0].line, 2);
    assert!(
        store
            .lease("batch_1", lease(2000, 1))
            .await
            .unwrap()
            .is_empty(),
        "a retry ran early"
    );
    assert_eq!(store.next_due(2000).await.unwrap(), Some(3000));
    let again = store.lease("batch_1", lease(3000, 1)).await.unwrap();
    assert_eq!((again[0].line, again[0].attempts), (1, 1));
    let out = Bytes::from_static(b"{}\n");
    assert!(store
        .settle("batch_1", 1, Settlement::Succeeded(out.clone()))
        .await
        .unwrap());
    assert!(!store
        .settle("batch_1", 1, Settlement::Failed(out))
        .await
        .unwrap());
    let batch = store.batch("alice", "batch_1").await.unwrap().unwrap();
    let counts = batch.request_counts;
    assert_eq!((counts.total, counts.completed, counts.failed), (2, 1, 0));
    assert_eq!(
        states(&store).await,
        [LineState::Succeeded, LineState::Leased]
    );
    assert_eq!(store.batch("bob", "batch_1").await.unwrap(), None);
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.queue_depth, 1);
}

#[tokio::test]
async fn two_consumers_share_the_lines_and_a_stopped_ones_are_claimed() {
    let server = RedisServer::start().await;
    let (a, b) = (store(&server).await, store(&server).await);
    running(&a, 10).await;
    let from_a = a.lease("batch_1", lease(1000, 4)).await.unwrap();
    let from_b = b.lease("batch_1", lease(1000, 4)).await.unwrap();
    let lines_a: HashSet<u64> = from_a.iter().map(|l| l.line).collect();
    let lines_b: HashSet<u64> = from_b.iter().map(|l| l.line).collect();
    assert_eq!((lines_a.len(), lines_b.len()), (4, 4));
    assert!(lines_a.is_disjoint(&lines_b), "{lines_a:?} {lines_b:?}");
    for line in &lines_b {
        let done = Settlement::Succeeded(Bytes::from(format!("b{line}\n")));
        assert!(b.settle("batch_1", *line, done).await.unwrap());
    }
    // A stopped holding its four: within claim_after they stay its own.
    let active = b.active().await.unwrap();
    assert_eq!(active[0].leased, 4);
    let rest = b.lease("batch_1", lease(1000, 10)).await.unwrap();
    assert_eq!(rest.len(), 2, "only the two lines nobody held");
    for line in rest.iter().map(|l| l.line) {
        let done = Settlement::Succeeded(Bytes::from(format!("b{line}\n")));
        assert!(b.settle("batch_1", line, done).await.unwrap());
    }
    assert!(b
        .lease("batch_1", lease(1000, 10))
        .await
        .unwrap()
        .is_empty());
    tokio::time::sleep(CLAIM + Duration::from_millis(100)).await;
    assert_eq!(
        b.active().await.unwrap()[0].leased,
        0,
        "lines of a stopped consumer are not counted as held"
    );
    let claimed = b.lease("batch_1", lease(1000, 10)).await.unwrap();
    let claimed: HashSet<u64> = claimed.iter().map(|l| l.line).collect();
    assert_eq!(claimed, lines_a);
    for line in &claimed {
        let done = Settlement::Succeeded(Bytes::from(format!("b{line}\n")));
        assert!(b.settle("batch_1", *line, done).await.unwrap());
    }
    // A's late result for a line claimed from it changes nothing.
    let late = Settlement::Succeeded(Bytes::from_static(b"late\n"));
    let first = *lines_a.iter().next().unwrap();
    assert!(!a.settle("batch_1", first, late).await.unwrap());
    let batch = b.batch("alice", "batch_1").await.unwrap().unwrap();
    assert_eq!(batch.request_counts.completed, 10);
    let records = b.lines("batch_1", 0, 100).await.unwrap();
    assert!(records
        .iter()
        .all(|r| r.result.as_deref() == Some(format!("b{}\n", r.line).as_bytes())));
    let progress = b.active().await.unwrap();
    assert!(progress[0].settled && progress[0].leased == 0);
}

fn file(owner: &str, id: &str, bytes: u64) -> StoredFile {
    StoredFile {
        owner: owner.to_owned(),
        lines: 1,
        object: FileObject::processed(id.to_owned(), "in.jsonl".to_owned(), "batch", bytes, 10),
    }
}

#[tokio::test]
async fn files_are_stored_in_chunks_listed_and_owned() {
    let server = RedisServer::start().await;
    let store = store(&server).await;
    let content: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    let mut writer = store.create_content("file-a").await.unwrap();
    for piece in content.chunks(10_000) {
        writer.write(piece).await.unwrap();
    }
    writer.close().await.unwrap();
    store
        .insert_file(file("alice", "file-a", content.len() as u64))
        .await
        .unwrap();
    let mut empty = store.create_content("file-b").await.unwrap();
    empty.write(b"").await.unwrap();
    empty.close().await.unwrap();
    store.insert_file(file("alice", "file-b", 0)).await.unwrap();
    let mut read = Vec::new();
    let mut reader = store.read_content("file-a").await.unwrap().unwrap();
    reader.read_to_end(&mut read).await.unwrap();
    assert!(read == content, "the content came back changed");
    let mut reader = store.read_content("file-b").await.unwrap().unwrap();
    assert_eq!(reader.read_to_end(&mut Vec::new()).await.unwrap(), 0);
    assert!(store.file("bob", "file-a").await.unwrap().is_none());
    let query = ListQuery {
        after: None,
        limit: 1,
        ascending: false,
        purpose: None,
    };
    let listed = store.list_files("alice", query).await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(ids, ["file-b", "file-a"], "newest first, limit + 1");
    assert!(!store.delete_file("bob", "file-a").await.unwrap());
    assert!(store.delete_file("alice", "file-a").await.unwrap());
    assert!(store.read_content("file-a").await.unwrap().is_none());
    // An upload dropped before it closed leaves nothing listed or readable.
    let mut dropped = store.create_content("file-c").await.unwrap();
    dropped.write(&content).await.unwrap();
    drop(dropped);
    assert!(store.read_content("file-c").await.unwrap().is_none());
}

#[tokio::test]
async fn calls_fail_as_unavailable_while_redis_is_down() {
    let mut server = RedisServer::start().await;
    let store = RedisStore::new(server.handle("500ms").await, CLAIM);
    server.kill();
    let error = store.batch("alice", "batch_1").await.unwrap_err();
    assert!(error.is_unavailable(), "{error}");
    let error = store.running(0).await.unwrap_err();
    assert!(error.is_unavailable(), "{error}");
}
