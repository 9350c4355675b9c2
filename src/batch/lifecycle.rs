//! A batch's life outside its lines: validation of the input file (`validating` ->
//! `in_progress` or `failed`), finalization into output and error files (`finalizing` ->
//! `completed`, `cancelling` -> `cancelled`, past its window -> `expired`), retention, and the
//! gauges. One task runs it, woken by the API and the workers, and at least once a second.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;

use super::input::{parse_line, LineCounter};
use super::model::{new_id, BatchStatus, FileObject, LineError};
use super::outcome::error_line;
use super::store::{
    ContentWriter, Finish, LineState, Progress, StoreError, StoredBatch, StoredFile, Transition,
};
use super::{metrics, stopped, Inner};

const TICK: Duration = Duration::from_secs(1);
/// Retention is checked this often (in the service's clock).
const SWEEP_EVERY_SECS: u64 = 60;
/// Lines are stored in transactions of this many while a file is validated.
const CHUNK: usize = 1000;
/// A failed batch reports at most this many line errors.
const MAX_ERRORS: usize = 1000;

/// When the periodic work (retention, gauges) is next due.
struct Due {
    /// In the service's clock (Unix seconds), so that a clock moved forward sweeps at once.
    sweep: u64,
    /// The gauges count every unsettled line: once per [`TICK`], not once per settled line.
    publish: tokio::time::Instant,
}

pub(super) async fn run(inner: Arc<Inner>, mut stop: watch::Receiver<Option<Duration>>) {
    let mut due = Due {
        sweep: 0,
        publish: tokio::time::Instant::now(),
    };
    loop {
        if let Err(error) = tick(&inner, &mut due).await {
            tracing::warn!(%error, "batch lifecycle step failed; it is tried again");
        }
        tokio::select! {
            () = inner.lifecycle.notified() => {}
            () = tokio::time::sleep(TICK) => {}
            () = stopped(&mut stop) => return,
        }
    }
}

async fn tick(inner: &Inner, due: &mut Due) -> Result<(), StoreError> {
    for batch in inner.store.batches_in(BatchStatus::Validating).await? {
        validate(inner, batch).await?;
    }
    for progress in inner.store.active().await? {
        finish_if_done(inner, &progress).await?;
    }
    let now = inner.now_secs();
    if now >= due.sweep {
        let cutoff = now.saturating_sub(inner.config.retention.as_secs());
        let removed = inner.store.sweep(cutoff, cutoff).await?;
        if removed > 0 {
            tracing::info!(
                removed,
                "batch files and batches past their retention removed"
            );
        }
        due.sweep = now + SWEEP_EVERY_SECS;
    }
    if tokio::time::Instant::now() >= due.publish {
        metrics::publish(&inner.store.stats().await?);
        due.publish = tokio::time::Instant::now() + TICK;
    }
    Ok(())
}

/// Reads the input file line by line into the store; the batch starts, or fails with the line
/// errors. Starting over is safe: the lines stored so far are dropped first.
async fn validate(inner: &Inner, stored: StoredBatch) -> Result<(), StoreError> {
    let batch = &stored.batch;
    inner.store.clear_lines(&batch.id).await?;
    let errors = store_lines(inner, &stored).await?;
    let now = inner.now_secs();
    if !errors.is_empty() {
        let failed = Finish::invalid(now, errors);
        inner.store.finish(&batch.id, failed).await?;
        return Ok(());
    }
    let start = Transition {
        from: BatchStatus::Validating,
        to: BatchStatus::InProgress,
        at: now,
    };
    if inner.store.transition(&batch.id, start).await?.is_some() {
        inner.work.notify_one();
    }
    Ok(())
}

fn file_error(code: &str, message: &str) -> LineError {
    LineError {
        code: code.to_owned(),
        message: message.to_owned(),
        param: None,
        line: None,
    }
}

/// Stores the valid lines of the batch's input file; returns the errors (none: every line was
/// stored).
async fn store_lines(inner: &Inner, stored: &StoredBatch) -> Result<Vec<LineError>, StoreError> {
    let batch = &stored.batch;
    let file = inner
        .store
        .file(&stored.owner, &batch.input_file_id)
        .await?;
    let content = match file {
        Some(file) => inner.store.read_content(&file.object.id).await?,
        None => None,
    };
    let Some(content) = content else {
        let message = "The input file was deleted before the batch started.";
        return Ok(vec![file_error("invalid_input_file", message)]);
    };
    let mut reader = BufReader::new(content);
    let (mut seen, mut chunk, mut errors) = (HashSet::new(), Vec::new(), Vec::new());
    let (mut number, mut requests, mut text) = (0u64, 0u64, Vec::new());
    loop {
        text.clear();
        if reader.read_until(b'\n', &mut text).await? == 0 {
            break;
        }
        number += 1;
        let line = text.trim_ascii();
        if line.is_empty() {
            continue;
        }
        requests += 1;
        if requests > inner.config.max_lines {
            let message = format!(
                "The input file has more than {} requests, the most a batch may have.",
                inner.config.max_lines
            );
            errors.push(file_error("too_many_requests", &message));
            break;
        }
        match parse_line(line, number, &batch.endpoint, &mut seen) {
            Ok(line) if errors.is_empty() => chunk.push(line),
            Ok(_) => {}
            Err(error) if errors.len() < MAX_ERRORS => errors.push(error),
            Err(_) => {}
        }
        if chunk.len() >= CHUNK {
            inner
                .store
                .add_lines(&batch.id, std::mem::take(&mut chunk))
                .await?;
        }
    }
    if requests == 0 {
        errors.push(file_error("empty_file", "The batch input file is empty."));
    }
    if errors.is_empty() && !chunk.is_empty() {
        inner.store.add_lines(&batch.id, chunk).await?;
    }
    Ok(errors)
}

/// Finalizes a batch that has nothing left to run: every line settled, or cancelled or expired
/// with no line in flight.
async fn finish_if_done(inner: &Inner, progress: &Progress) -> Result<(), StoreError> {
    let now = inner.now_secs();
    let (status, from) = match progress.status {
        BatchStatus::InProgress if progress.settled => {
            let finalizing = Transition {
                from: BatchStatus::InProgress,
                to: BatchStatus::Finalizing,
                at: now,
            };
            let entered = inner.store.transition(&progress.id, finalizing).await?;
            if entered.is_none() {
                return Ok(());
            }
            (BatchStatus::Completed, BatchStatus::Finalizing)
        }
        BatchStatus::InProgress if progress.expires_at <= now && progress.leased == 0 => {
            (BatchStatus::Expired, BatchStatus::InProgress)
        }
        BatchStatus::Finalizing => (BatchStatus::Completed, BatchStatus::Finalizing),
        BatchStatus::Cancelling if progress.leased == 0 => {
            (BatchStatus::Cancelled, BatchStatus::Cancelling)
        }
        _ => return Ok(()),
    };
    let results = write_results(inner, progress, status, now).await?;
    let unfinished = results.unfinished;
    let finish = Finish {
        from,
        status,
        at: now,
        output: results.output,
        error: results.error,
        errors: None,
        unfinished,
    };
    let finished = inner.store.finish(&progress.id, finish).await?;
    if finished.is_some() && unfinished > 0 {
        let counted = if status == BatchStatus::Expired {
            "expired"
        } else {
            "cancelled"
        };
        metrics::lines(counted, unfinished);
    }
    Ok(())
}

/// The output and error files of a batch being finalized, and how many lines never ran.
struct Results {
    output: Option<StoredFile>,
    error: Option<StoredFile>,
    unfinished: u64,
}

async fn write_results(
    inner: &Inner,
    progress: &Progress,
    status: BatchStatus,
    now: u64,
) -> Result<Results, StoreError> {
    let (code, message) = if status == BatchStatus::Expired {
        (
            "batch_expired",
            "This request could not be executed before the completion window expired.",
        )
    } else {
        (
            "batch_cancelled",
            "This request was not executed because the batch was cancelled.",
        )
    };
    let mut output = ResultFile::new(progress, "output");
    let mut error = ResultFile::new(progress, "error");
    let (mut after, mut unfinished) = (0, 0);
    loop {
        let page = inner.store.lines(&progress.id, after, CHUNK).await?;
        let Some(last) = page.last() else { break };
        after = last.line;
        for record in page {
            match (record.state, record.result) {
                (LineState::Succeeded, Some(result)) => output.write(inner, &result).await?,
                (LineState::Failed, Some(result)) => error.write(inner, &result).await?,
                _ => {
                    unfinished += 1;
                    let line = error_line(&record.custom_id, code, message);
                    error.write(inner, &line).await?;
                }
            }
        }
    }
    Ok(Results {
        output: output.close(inner, now).await?,
        error: error.close(inner, now).await?,
        unfinished,
    })
}

/// One of a batch's result files, created on its first line (a batch with no errors has no
/// error file, as with OpenAI).
struct ResultFile {
    owner: String,
    filename: String,
    written: Option<(String, Box<dyn ContentWriter>)>,
    bytes: u64,
    lines: LineCounter,
}

impl ResultFile {
    fn new(progress: &Progress, kind: &str) -> ResultFile {
        ResultFile {
            owner: progress.owner.clone(),
            filename: format!("{}_{kind}.jsonl", progress.id),
            written: None,
            bytes: 0,
            lines: LineCounter::default(),
        }
    }

    async fn write(&mut self, inner: &Inner, line: &[u8]) -> Result<(), StoreError> {
        if self.written.is_none() {
            let id = new_id("file-");
            let writer = inner.store.create_content(&id).await?;
            self.written = Some((id, writer));
        }
        if let Some((_, writer)) = &mut self.written {
            writer.write(line).await?;
        }
        self.bytes += line.len() as u64;
        self.lines.feed(line);
        Ok(())
    }

    async fn close(self, inner: &Inner, now: u64) -> Result<Option<StoredFile>, StoreError> {
        let Some((id, writer)) = self.written else {
            return Ok(None);
        };
        writer.close().await?;
        let mut object = FileObject::processed(id, self.filename, "batch_output", self.bytes, now);
        object.expires_at = Some(now.saturating_add(inner.config.retention.as_secs()));
        Ok(Some(StoredFile {
            owner: self.owner,
            lines: self.lines.count(),
            object,
        }))
    }
}
