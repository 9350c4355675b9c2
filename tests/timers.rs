//! The proxy's own timers on Tokio's paused clock: the first-byte timeout, the cool-down of a
//! failing model, a short Retry-After and the stream idle timeout. The proxy runs in-process, the
//! clock is frozen (it moves only when a test advances it, never while real I/O is under way), so
//! each timer is shown to fire exactly when it is due, on any machine load.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::Duration;

use common::*;

/// How long a test gives the proxy, in real time, to do something it must not do (leave an
/// upstream early, end a stream early). A correct proxy passes however long this is.
const GRACE: Duration = Duration::from_millis(300);

/// Holds Tokio's paused clock still while real sockets are used: the clock would otherwise jump
/// to the next timer whenever the runtime waits on I/O. Released on drop; after a minute of real
/// time it lets go by itself, so that a hang ends in a timeout rather than never.
struct Frozen(Option<std::sync::mpsc::Sender<()>>);

/// Freezes the paused clock (a blocking task in flight stops auto-advance, as Tokio documents).
fn freeze() -> Frozen {
    let (release, released) = std::sync::mpsc::channel::<()>();
    tokio::task::spawn_blocking(move || {
        let _ = released.recv_timeout(Duration::from_secs(60));
    });
    Frozen(Some(release))
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.0.take();
    }
}

/// Waits `GRACE` of real time, the frozen clock standing still.
async fn real_pause() {
    tokio::task::spawn_blocking(|| std::thread::sleep(GRACE))
        .await
        .unwrap();
}

const CHAT: &str = r#"{"model":"chain","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM: &str =
    r#"{"model":"chain","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

fn chain(fallback: &str, route: &str) -> String {
    format!(
        "[fallback]\n{fallback}\n\n[[routes]]\nname = \"chain\"\nmatch = {{ model = \"chain\" }}\n\
         model = \"primary/model\"\nfallbacks = [\"backup/model\"]\n{route}\n"
    )
}

/// The primary answers as `primary` says, the backup with a chat completion.
async fn primary_then_backup(primary: fn() -> Reply) -> MockUpstream {
    MockUpstream::start(move |r| {
        if r.json()["model"] == "primary/model" {
            primary()
        } else {
            Reply::Json(200, chat_completion("backup/model", "from backup"))
        }
    })
    .await
}

fn spawn_chat(proxy: &TestProxy) -> tokio::task::JoinHandle<(http::StatusCode, http::HeaderMap)> {
    let url = proxy.url("/v1/chat/completions");
    tokio::spawn(async move {
        let (status, headers, _) = post_json(&url, CHAT, &[]).await;
        (status, headers)
    })
}

#[tokio::test(start_paused = true)]
async fn a_silent_upstream_is_left_exactly_at_first_byte_timeout() {
    let upstream = primary_then_backup(|| Reply::Hang).await;
    let config = chain("cooldown = \"0s\"", "first_byte_timeout = \"15s\"");
    let proxy = TestProxy::start(&upstream, &config).await;
    let _frozen = freeze();
    let request = spawn_chat(&proxy);
    upstream.wait_requests(1).await;

    tokio::time::advance(Duration::from_millis(14_900)).await;
    real_pause().await;
    assert_eq!(upstream.request_count(), 1, "left the primary early");
    assert!(!request.is_finished());

    tokio::time::advance(Duration::from_millis(200)).await;
    let (status, headers) = request.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["x-proxy-model"], "backup/model");
    assert_eq!(headers["x-proxy-attempts"], "2");
    assert_eq!(models_sent(&upstream), ["primary/model", "backup/model"]);
}

#[tokio::test(start_paused = true)]
async fn a_failing_model_is_skipped_for_its_cool_down_then_probed() {
    let upstream = primary_then_backup(|| Reply::Json(503, "{}".into())).await;
    let config = chain("cooldown = \"60s\"\ncooldown_failures = 2", "");
    let proxy = TestProxy::start(&upstream, &config).await;
    let _frozen = freeze();
    for _ in 0..2 {
        let (status, headers) = spawn_chat(&proxy).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(headers["x-proxy-attempts"], "2");
    }
    let (_, _, metrics) = read_all(send("GET", &proxy.admin_url("/metrics"), &[], "").await).await;
    let cooling = "openrouter_model_cooldown{upstream=\"default\",model=\"primary/model\"} 1";
    assert!(String::from_utf8_lossy(&metrics).contains(cooling));
    // Two failures in a row: the primary is skipped until the cool-down has passed.
    for advance in [Duration::ZERO, Duration::from_millis(59_900)] {
        tokio::time::advance(advance).await;
        let (status, headers) = spawn_chat(&proxy).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(headers["x-proxy-attempts"], "1", "tried while cooling down");
        assert_eq!(headers["x-proxy-model"], "backup/model");
    }
    tokio::time::advance(Duration::from_millis(200)).await;
    let before = upstream.request_count();
    let (status, _) = spawn_chat(&proxy).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        models_sent(&upstream)[before],
        "primary/model",
        "not probed once the cool-down was over"
    );
}

#[tokio::test(start_paused = true)]
async fn a_short_retry_after_is_waited_out_on_the_same_model() {
    let upstream = MockUpstream::openai_like().await;
    upstream.push(Reply::Headers(
        vec![("retry-after", "2")],
        Box::new(Reply::Json(
            429,
            r#"{"error":{"message":"slow down","code":429}}"#.into(),
        )),
    ));
    let config = chain("cooldown = \"0s\"\nretry_after_max = \"5s\"", "");
    let proxy = TestProxy::start(&upstream, &config).await;
    let _frozen = freeze();
    let request = spawn_chat(&proxy);
    upstream.wait_requests(1).await;
    // The wait starts when the proxy has read the 429, which takes real time; were it slower than
    // this, the retry would come late (the test would take longer), never early.
    real_pause().await;
    tokio::time::advance(Duration::from_millis(1_900)).await;
    real_pause().await;
    assert_eq!(upstream.request_count(), 1, "retried before Retry-After");

    tokio::time::advance(Duration::from_millis(200)).await;
    let (status, headers) = request.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["x-proxy-model"], "primary/model");
    assert_eq!(headers["x-proxy-attempts"], "2");
    assert_eq!(models_sent(&upstream), ["primary/model", "primary/model"]);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_stream_ends_with_an_error_event_at_its_idle_timeout() {
    let (upstream, tx, _closed) = upstream_with_stream().await;
    let config = format!(
        "{}\n[upstream]\nstream_idle_timeout = \"45s\"\n",
        chain("cooldown = \"0s\"", "")
    );
    let proxy = TestProxy::start(&upstream, &config).await;
    let _frozen = freeze();
    let url = proxy.url("/v1/chat/completions");
    let request = tokio::spawn(async move {
        send(
            "POST",
            &url,
            &[("content-type", "application/json")],
            STREAM,
        )
        .await
    });
    tx.send(data(&chunk_event("primary/model", "partial")))
        .await
        .unwrap();
    let mut body = request.await.unwrap().into_body();
    assert!(read_until(&mut body, "partial").await.contains("partial"));

    tokio::time::advance(Duration::from_millis(44_900)).await;
    tokio::select! {
        frame = next_data(&mut body) => panic!("the stream moved before its idle timeout: {frame:?}"),
        () = real_pause() => {}
    }

    tokio::time::advance(Duration::from_millis(200)).await;
    let rest = read_until(&mut body, "upstream_stream_error").await;
    assert!(rest.contains("sent nothing for 45s"), "{rest}");
    assert!(next_data(&mut body).await.is_none());
    drop(tx);
}
