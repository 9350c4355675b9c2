//! Live reload over real sockets: edits in place, renames over the file, Kubernetes `..data`
//! symlink swaps, a reload storm under load, rejected edits, key rotation and SIGHUP.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]
#![allow(
    clippy::too_many_lines,
    reason = "each scenario reads top to bottom: load, fault, then every check of its outcome"
)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use openrouter_proxy::runtime::content_hash;

const CHAT: &str = "/v1/chat/completions";

/// A config whose route `alias` sends `model-<version>` upstream with the header
/// `x-config-version: <version>`, so every upstream request says which config served it.
fn versioned(upstream_url: &str, key: &Path, version: usize) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
drain_delay = "0s"

[upstream]
base_url = "{upstream_url}"
api_key_file = "{key}"

[[routes]]
name = "alias"
match = {{ model = "alias" }}
model = "model-{version}"
set_headers = {{ "x-config-version" = "{version}" }}
"#,
        key = key.display()
    )
}

/// A fresh, empty directory of its own.
fn fresh_dir() -> PathBuf {
    temp_file("placeholder", "").parent().unwrap().to_owned()
}

/// Writes a sibling temp file and renames it over `path`, as editors and config tools do.
fn write_by_rename(path: &Path, contents: &str) {
    let temp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&temp, contents).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

/// A directory laid out like a Kubernetes ConfigMap or Secret volume, updated the way the
/// kubelet's AtomicWriter does it: a new timestamped directory, a `..data_tmp` symlink to it,
/// renamed over `..data`, then the old directory removed.
struct AtomicVolume {
    dir: PathBuf,
    file: String,
    generation: usize,
}

impl AtomicVolume {
    fn new(file: &str, contents: &str) -> AtomicVolume {
        let dir = fresh_dir();
        let volume = AtomicVolume {
            dir,
            file: file.to_owned(),
            generation: 0,
        };
        let data = volume.data_dir(0);
        std::fs::create_dir(volume.dir.join(&data)).unwrap();
        std::fs::write(volume.dir.join(&data).join(file), contents).unwrap();
        std::os::unix::fs::symlink(&data, volume.dir.join("..data")).unwrap();
        std::os::unix::fs::symlink(Path::new("..data").join(file), volume.dir.join(file)).unwrap();
        volume
    }

    fn data_dir(&self, generation: usize) -> String {
        format!("..2026_11_24_data_{generation}")
    }

    /// The path an application is given: `<dir>/<file>`, a symlink into `..data`.
    fn path(&self) -> PathBuf {
        self.dir.join(&self.file)
    }

    fn update(&mut self, contents: &str) {
        let old = self.data_dir(self.generation);
        self.generation += 1;
        let new = self.data_dir(self.generation);
        std::fs::create_dir(self.dir.join(&new)).unwrap();
        std::fs::write(self.dir.join(&new).join(&self.file), contents).unwrap();
        std::os::unix::fs::symlink(&new, self.dir.join("..data_tmp")).unwrap();
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap();
        std::fs::remove_dir_all(self.dir.join(old)).unwrap();
    }
}

async fn config_of(admin_url: &str) -> serde_json::Value {
    let (status, _, body) = read_all(send("GET", admin_url, &[], "").await).await;
    assert_eq!(status, 200);
    serde_json::from_slice(&body).unwrap()
}

/// Polls `/config` (at `admin`) until `done` holds; returns it and how long that took.
async fn wait_config(
    admin: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> (serde_json::Value, Duration) {
    let url = format!("http://{admin}/config");
    let started = Instant::now();
    let waited = tokio::time::timeout(PATIENCE, async {
        loop {
            let config = config_of(&url).await;
            if done(&config) {
                return config;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    match waited {
        Ok(config) => (config, started.elapsed()),
        Err(_) => panic!(
            "waited {PATIENCE:?} for {what}; /config says {}",
            config_of(&url).await
        ),
    }
}

/// Waits until the running config is the file content `text`.
async fn wait_running(admin: &str, text: &str) -> (serde_json::Value, Duration) {
    let hash = content_hash(text.as_bytes());
    wait_config(admin, "the new config to be running", |c| c["hash"] == hash).await
}

/// Sends a chat request for `model` and returns what the upstream received for it.
async fn chat(proxy: &TestProxy, upstream: &MockUpstream, model: &str) -> Recorded {
    let before = upstream.request_count();
    let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    let (status, _, answer) = post_json(&proxy.url(CHAT), &body, &[]).await;
    assert_eq!(status, 200, "{answer:?}");
    let requests = upstream.wait_requests(before + 1).await;
    requests[before].clone()
}

const RELOADS_OK: &str = r#"openrouter_config_reloads_total{result="ok"}"#;
const RELOADS_ERROR: &str = r#"openrouter_config_reloads_total{result="error"}"#;

enum Edit {
    InPlace,
    Rename,
}

/// Starts on version 1, edits the file to version 2, and checks the new route answers.
async fn edit_applies(edit: Edit, name: &str) {
    let upstream = MockUpstream::openai_like().await;
    let key = temp_file("api-key", TEST_KEY);
    let path = temp_file("proxy.toml", &versioned(&upstream.url(), &key, 1));
    let (proxy, _) = start_live_proxy(&path).await;
    let admin = proxy.admin.to_string();
    assert_eq!(
        chat(&proxy, &upstream, "alias").await.json()["model"],
        "model-1"
    );

    let v2 = versioned(&upstream.url(), &key, 2);
    let started = Instant::now();
    match edit {
        Edit::InPlace => std::fs::write(&path, &v2).unwrap(),
        Edit::Rename => write_by_rename(&path, &v2),
    }
    let (config, _) = wait_running(&admin, &v2).await;
    let latency = started.elapsed();
    eprintln!("{name}: the edit was live after {latency:?}");
    assert!(config["reloads"]["ok"].as_u64().unwrap() >= 1, "{config}");
    assert_eq!(config["source"], path.display().to_string());
    assert_eq!(config["routes"], serde_json::json!(["alias"]));
    let sent = chat(&proxy, &upstream, "alias").await;
    assert_eq!(sent.json()["model"], "model-2");
    assert_eq!(sent.header("x-config-version"), Some("2"));
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn an_edit_in_place_applies() {
    edit_applies(Edit::InPlace, "edit in place").await;
}

#[tokio::test]
async fn a_file_renamed_over_the_config_applies() {
    edit_applies(Edit::Rename, "rename over").await;
}

#[tokio::test]
async fn a_configmap_symlink_swap_applies() {
    let upstream = MockUpstream::openai_like().await;
    let key = temp_file("api-key", TEST_KEY);
    let mut volume = AtomicVolume::new("proxy.toml", &versioned(&upstream.url(), &key, 1));
    let (proxy, _) = start_live_proxy(&volume.path()).await;
    let admin = proxy.admin.to_string();
    assert_eq!(
        chat(&proxy, &upstream, "alias").await.json()["model"],
        "model-1"
    );

    for version in 2..=3 {
        let text = versioned(&upstream.url(), &key, version);
        let started = Instant::now();
        volume.update(&text);
        wait_running(&admin, &text).await;
        eprintln!(
            "configmap swap {version}: live after {:?}",
            started.elapsed()
        );
        let sent = chat(&proxy, &upstream, "alias").await;
        assert_eq!(sent.json()["model"], format!("model-{version}"));
    }
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn unchanged_content_is_not_a_reload() {
    let upstream = MockUpstream::openai_like().await;
    let key = temp_file("api-key", TEST_KEY);
    let v1 = versioned(&upstream.url(), &key, 1);
    let path = temp_file("proxy.toml", &v1);
    let (proxy, trigger) = start_live_proxy(&path).await;
    let admin = proxy.admin.to_string();

    // The same bytes again, through a file event and an explicit request...
    write_by_rename(&path, &v1);
    trigger.reload();
    // ...then a real change. Reloads run one at a time in order, so once version 2 runs, the
    // no-op ones have been handled too: only version 2 counts.
    let v2 = versioned(&upstream.url(), &key, 2);
    write_by_rename(&path, &v2);
    trigger.reload();
    let (config, _) = wait_running(&admin, &v2).await;
    assert_eq!(config["reloads"]["ok"], 1, "{config}");
    assert_eq!(config["reloads"]["error"], 0, "{config}");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_reload_storm_under_load_loses_nothing() {
    const SWAPS: usize = 50;
    const CLIENTS: usize = 6;
    const STREAMS: usize = 2;

    // Streaming requests (model `stream-<i>`, not routed) get a reply the test drives; the rest
    // answer like OpenRouter.
    let streams: Arc<Mutex<HashMap<String, Reply>>> = Arc::default();
    let mut senders = Vec::new();
    for i in 0..STREAMS {
        let (reply, tx, _closed) = stream_reply();
        streams.lock().unwrap().insert(format!("stream-{i}"), reply);
        senders.push(tx);
    }
    let scripted = streams.clone();
    let upstream = MockUpstream::start(move |request| {
        let model = request.json()["model"].as_str().unwrap_or("").to_owned();
        match scripted.lock().unwrap().remove(&model) {
            Some(reply) => reply,
            None => openai_like_reply(request),
        }
    })
    .await;
    let key = temp_file("api-key", TEST_KEY);
    let path = temp_file("proxy.toml", &versioned(&upstream.url(), &key, 0));
    let (proxy, trigger) = start_live_proxy(&path).await;
    let proxy = Arc::new(proxy);
    let admin = proxy.admin.to_string();

    // Two open streams, each read to the end in the background.
    let mut readers = Vec::new();
    for (i, tx) in senders.iter().enumerate() {
        let body = format!(r#"{{"model":"stream-{i}","stream":true,"messages":[]}}"#);
        let response = send(
            "POST",
            &proxy.url(CHAT),
            &[("content-type", "application/json")],
            body,
        )
        .await;
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        tx.send(data(&chunk_event(&format!("stream-{i}"), "tick-0 ")))
            .await
            .unwrap();
        read_until(&mut body, "tick-0 ").await;
        readers.push(tokio::spawn(async move {
            let mut seen = String::new();
            while let Some(data) = next_data(&mut body).await {
                seen.push_str(std::str::from_utf8(&data).unwrap());
            }
            seen
        }));
    }

    // Clients sending non-streaming requests back to back, each on its own connection pool.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let stop = stop.clone();
        let url = proxy.url(CHAT);
        clients.push(tokio::spawn(async move {
            let (mut answered, mut failures) = (0usize, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let (status, headers, body) =
                    post_json(&url, r#"{"model":"alias","messages":[]}"#, &[]).await;
                let model = headers
                    .get("x-proxy-model")
                    .map(|v| v.to_str().unwrap().to_owned());
                if status != 200 || !model.as_deref().unwrap_or("").starts_with("model-") {
                    failures.push(format!("{status} {model:?} {body:?}"));
                }
                answered += 1;
            }
            (answered, failures)
        }));
    }

    let started = Instant::now();
    for version in 1..=SWAPS {
        let text = versioned(&upstream.url(), &key, version);
        write_by_rename(&path, &text);
        // Half the swaps are picked up by the file watch alone, half are also asked for at once.
        if version % 2 == 0 {
            trigger.reload();
        }
        wait_running(&admin, &text).await;
        // A request sent after the swap is served by the new config.
        let sent = chat(&proxy, &upstream, "alias").await;
        assert_eq!(sent.json()["model"], format!("model-{version}"));
        for (i, tx) in senders.iter().enumerate() {
            tx.send(data(&chunk_event(
                &format!("stream-{i}"),
                &format!("tick-{version} "),
            )))
            .await
            .unwrap();
        }
    }
    eprintln!("{SWAPS} swaps took {:?}", started.elapsed());

    stop.store(true, Ordering::Relaxed);
    let mut answered = 0;
    for client in clients {
        let (count, failures) = tokio::time::timeout(PATIENCE, client)
            .await
            .unwrap()
            .unwrap();
        assert!(failures.is_empty(), "failed requests: {failures:?}");
        answered += count;
    }
    eprintln!("{answered} requests answered during the storm");
    assert!(answered > 0);

    for tx in senders {
        tx.send(data("data: [DONE]\n\n")).await.unwrap();
    }
    for (i, reader) in readers.into_iter().enumerate() {
        let seen = tokio::time::timeout(PATIENCE, reader)
            .await
            .unwrap()
            .unwrap();
        for version in 1..=SWAPS {
            assert!(
                seen.contains(&format!("tick-{version} ")),
                "stream {i} lost chunk {version}: {seen}"
            );
        }
        assert!(
            seen.ends_with("data: [DONE]\n\n"),
            "stream {i} was cut: {seen}"
        );
    }

    // Every upstream request carried a header and a model from one and the same config.
    let mut routed = 0;
    for request in upstream.requests() {
        let Some(version) = request.header("x-config-version") else {
            continue;
        };
        assert_eq!(request.json()["model"], format!("model-{version}"));
        routed += 1;
    }
    assert!(routed >= SWAPS, "only {routed} routed requests");

    let config = config_of(&proxy.admin_url("/config")).await;
    assert_eq!(config["reloads"]["ok"], SWAPS, "{config}");
    assert_eq!(config["reloads"]["error"], 0, "{config}");
    Arc::into_inner(proxy).unwrap().stop().await.unwrap();
}

#[tokio::test]
async fn invalid_edits_are_rejected_and_the_old_config_keeps_serving() {
    let upstream = MockUpstream::openai_like().await;
    let key = temp_file("api-key", TEST_KEY);
    let v1 = versioned(&upstream.url(), &key, 1);
    let path = temp_file("proxy.toml", &v1);
    let (proxy, _) = start_live_proxy(&path).await;
    let admin = proxy.admin.to_string();
    let errors_before = series_value(&scrape_metrics(proxy.admin).await, RELOADS_ERROR);

    let unknown_key = v1.replace("drain_delay", "lisen = 3\ndrain_delay");
    let bad_value = v1.replace("[upstream]", "[upstream]\nconnect_timeout = \"soon\"");
    let bad_syntax = v1.replace("[[routes]]", "[[routes]\n");
    let duplicate_route = format!("{v1}\n[[routes]]\nname = \"alias\"\n");
    // A header line holding a secret, cut short: the error says where, never what.
    let secret_header = v1.replace(
        "[upstream]",
        "[upstream.headers]\nAuthorization = \"Bearer sk-or-reload-secret\n[upstream]",
    );
    let cases = [
        (unknown_key, vec!["line 4", "server.lisen", "unknown field"]),
        (
            bad_value,
            vec!["upstream.connect_timeout", "invalid duration"],
        ),
        (bad_syntax, vec!["line "]),
        (duplicate_route, vec!["duplicate route name", "line "]),
        (
            secret_header,
            vec!["upstream.headers.Authorization", "line "],
        ),
    ];
    for (n, (text, needles)) in cases.iter().enumerate() {
        write_by_rename(&path, text);
        let (config, _) = wait_config(&admin, "the edit to be rejected", |c| {
            c["reloads"]["error"] == n + 1
        })
        .await;
        let error = config["last_error"].as_str().unwrap();
        assert!(error.starts_with(&path.display().to_string()), "{error}");
        assert!(
            !error.contains("sk-or-reload-secret") && !error.contains("soon"),
            "{error}"
        );
        for needle in needles {
            assert!(error.contains(needle), "{needle:?} not in {error:?}");
        }
        assert_eq!(config["hash"], content_hash(v1.as_bytes()));
        assert_eq!(config["reloads"]["ok"], 0);

        let (status, _, _) =
            read_all(send("GET", &proxy.admin_url("/readyz"), &[], "").await).await;
        assert_eq!(status, 200, "readiness must not depend on a rejected edit");
        assert_eq!(
            chat(&proxy, &upstream, "alias").await.json()["model"],
            "model-1"
        );
    }
    let errors_after = series_value(&scrape_metrics(proxy.admin).await, RELOADS_ERROR);
    assert!(
        errors_after >= errors_before + cases.len() as f64,
        "{errors_before} -> {errors_after}"
    );

    // An empty file (a half-done write, most likely) is refused too.
    std::fs::write(&path, "").unwrap();
    wait_config(&admin, "the empty file to be rejected", |c| {
        c["reloads"]["error"] == cases.len() + 1
    })
    .await;

    // Restoring the running content is no reload, but the error no longer applies.
    write_by_rename(&path, &v1);
    let (config, _) =
        wait_config(&admin, "the error to clear", |c| c["last_error"].is_null()).await;
    assert_eq!(config["reloads"]["ok"], 0, "{config}");

    let ok_before = series_value(&scrape_metrics(proxy.admin).await, RELOADS_OK);
    let v2 = versioned(&upstream.url(), &key, 2);
    write_by_rename(&path, &v2);
    let (config, _) = wait_running(&admin, &v2).await;
    assert!(config["last_error"].is_null(), "{config}");
    assert_eq!(
        chat(&proxy, &upstream, "alias").await.json()["model"],
        "model-2"
    );
    assert!(series_value(&scrape_metrics(proxy.admin).await, RELOADS_OK) >= ok_before + 1.0);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn restart_only_settings_keep_their_running_value() {
    let upstream = MockUpstream::openai_like().await;
    let key = temp_file("api-key", TEST_KEY);
    let path = temp_file("proxy.toml", &versioned(&upstream.url(), &key, 1));
    let (proxy, _) = start_live_proxy(&path).await;
    let admin = proxy.admin.to_string();

    let v2 = versioned(&upstream.url(), &key, 2)
        .replace(
            "listen = \"127.0.0.1:0\"\nadmin",
            "listen = \"127.0.0.1:1\"\nmax_connections = 7\nmax_body_bytes = 64\nadmin",
        )
        .replace("[[routes]]", "[cache]\nmax_bytes = 1024\n\n[[routes]]");
    write_by_rename(&path, &v2);
    let (config, _) = wait_running(&admin, &v2).await;
    assert_eq!(
        config["restart_pending"],
        serde_json::json!(["server.listen", "server.max_connections", "cache.max_bytes"]),
        "{config}"
    );
    // The route changed, the listener did not, and the body limit is live.
    assert_eq!(
        chat(&proxy, &upstream, "alias").await.json()["model"],
        "model-2"
    );
    let big = format!(
        r#"{{"model":"alias","messages":[],"pad":"{}"}}"#,
        "x".repeat(100)
    );
    let (status, _, _) = post_json(&proxy.url(CHAT), &big, &[]).await;
    assert_eq!(status, 413);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_rotated_key_file_is_used_by_the_next_request() {
    let upstream = MockUpstream::openai_like().await;
    // The key lives in another directory than the config; both are watched.
    let key = temp_file("api-key", TEST_KEY);
    let v1 = versioned(&upstream.url(), &key, 1);
    let path = temp_file("proxy.toml", &v1);
    let (proxy, _) = start_live_proxy(&path).await;
    let admin = proxy.admin.to_string();
    let sent = chat(&proxy, &upstream, "alias").await;
    assert_eq!(
        sent.header("authorization"),
        Some(&*format!("Bearer {TEST_KEY}"))
    );

    let mut reloads = 0;
    let mut rotate = |file: &Path, new_key: &str, in_place: bool| {
        if in_place {
            std::fs::write(file, format!("{new_key}\n")).unwrap();
        } else {
            write_by_rename(file, new_key);
        }
        reloads += 1;
        reloads
    };
    let n = rotate(&key, "sk-or-rotated-1", false);
    wait_config(&admin, "the key to be re-read", |c| c["reloads"]["ok"] == n).await;
    let sent = chat(&proxy, &upstream, "alias").await;
    assert_eq!(sent.header("authorization"), Some("Bearer sk-or-rotated-1"));

    let n = rotate(&key, "sk-or-rotated-2", true);
    wait_config(&admin, "the key to be re-read", |c| c["reloads"]["ok"] == n).await;
    let sent = chat(&proxy, &upstream, "alias").await;
    assert_eq!(sent.header("authorization"), Some("Bearer sk-or-rotated-2"));

    // The config moves the key to a third directory: the watch follows it.
    let moved = temp_file("openrouter-key", "sk-or-moved-1");
    let v2 = versioned(&upstream.url(), &moved, 1);
    write_by_rename(&path, &v2);
    let (config, _) = wait_running(&admin, &v2).await;
    assert_eq!(
        config["api_key"],
        serde_json::json!({"source": format!("file {}", moved.display()), "present": true})
    );
    let sent = chat(&proxy, &upstream, "alias").await;
    assert_eq!(sent.header("authorization"), Some("Bearer sk-or-moved-1"));
    let ok = config["reloads"]["ok"].as_u64().unwrap();
    write_by_rename(&moved, "sk-or-moved-2");
    wait_config(&admin, "the moved key to be re-read", |c| {
        c["reloads"]["ok"] == ok + 1
    })
    .await;
    let sent = chat(&proxy, &upstream, "alias").await;
    assert_eq!(sent.header("authorization"), Some("Bearer sk-or-moved-2"));

    // Nothing on the admin port shows the key.
    let (_, _, body) = read_all(send("GET", &proxy.admin_url("/config"), &[], "").await).await;
    assert!(!String::from_utf8_lossy(&body).contains("sk-or-"));
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_secret_symlink_swap_rotates_the_key() {
    let upstream = MockUpstream::openai_like().await;
    let mut secret = AtomicVolume::new("api-key", "sk-or-secret-1\n");
    let path = temp_file("proxy.toml", &versioned(&upstream.url(), &secret.path(), 1));
    let (proxy, _) = start_live_proxy(&path).await;
    let admin = proxy.admin.to_string();
    let sent = chat(&proxy, &upstream, "alias").await;
    assert_eq!(sent.header("authorization"), Some("Bearer sk-or-secret-1"));

    for n in 2..=3 {
        let started = Instant::now();
        secret.update(&format!("sk-or-secret-{n}\n"));
        wait_config(&admin, "the key to be re-read", |c| {
            c["reloads"]["ok"] == n - 1
        })
        .await;
        eprintln!("secret swap {n}: live after {:?}", started.elapsed());
        let sent = chat(&proxy, &upstream, "alias").await;
        let expected = format!("Bearer sk-or-secret-{n}");
        assert_eq!(sent.header("authorization"), Some(&*expected));
    }
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn sighup_reloads_the_binary() {
    let upstream = MockUpstream::openai_like().await;
    let key = temp_file("api-key", TEST_KEY);
    let path = temp_file("proxy.toml", &versioned(&upstream.url(), &key, 1));
    // Without file watching only SIGHUP can apply the edit, so the test sees the signal work.
    let mut proxy = BinaryProxy::spawn(&path, &["--no-watch"]).await;
    let (api, admin) = (proxy.api.clone(), proxy.admin.clone());

    let chat_model = || async {
        let before = upstream.request_count();
        let (status, _, body) = post_json(
            &format!("http://{api}{CHAT}"),
            r#"{"model":"alias","messages":[]}"#,
            &[],
        )
        .await;
        assert_eq!(status, 200, "{body:?}");
        upstream.wait_requests(before + 1).await[before].json()["model"].clone()
    };
    assert_eq!(chat_model().await, "model-1");

    let v2 = versioned(&upstream.url(), &key, 2);
    write_by_rename(&path, &v2);
    proxy.signal("HUP").await;
    let (config, latency) = wait_running(&admin, &v2).await;
    eprintln!("SIGHUP: live after {latency:?}");
    assert_eq!(config["reloads"]["ok"], 1, "{config}");
    assert_eq!(chat_model().await, "model-2");
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "SIGHUP ended the process"
    );

    proxy.signal("TERM").await;
    let (status, logs) = proxy.wait().await;
    assert!(status.success(), "exit status {status}");
    assert!(
        logs.iter().any(|l| l.contains("config reloaded")),
        "no reload log line: {logs:?}"
    );
}
