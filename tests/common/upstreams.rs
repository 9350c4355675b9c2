//! Support for tests of several upstreams: a config with named upstreams and key pools, a port
//! with nothing listening, labelled metric samples, the JSON log lines of this process, and
//! `openrouter-proxy explain` run as a command.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use super::{read_all, send, temp_file, PATIENCE};

/// The base URL of a loopback port with nothing listening: connecting to it is refused.
pub fn refused_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/api/v1")
}

/// A proxy config on port 0 with `sections` (upstreams, routes, ...) after the `[server]` table.
pub fn proxy_config(sections: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\n\n\
         {sections}"
    )
}

/// A key file holding `value`, as a mounted Secret would.
pub fn key_file(value: &str) -> String {
    temp_file("key", &format!("{value}\n"))
        .display()
        .to_string()
}

/// `/metrics` of the admin listener at `admin`.
pub async fn scrape_metrics(admin: SocketAddr) -> String {
    let (status, _, body) =
        read_all(send("GET", &format!("http://{admin}/metrics"), &[], "").await).await;
    assert_eq!(status, 200);
    String::from_utf8(body.to_vec()).unwrap()
}

/// The value of the series `name` whose labels include every one of `having`.
pub fn labelled(text: &str, name: &str, having: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<f64> = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, labels) = series.split_once('{').unwrap_or((series, "}"));
            (series_name == name).then_some(())?;
            let labels = parse_labels(labels.strip_suffix('}')?);
            let all = having
                .iter()
                .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v));
            all.then(|| value.parse().ok())?
        })
        .collect();
    assert!(found.len() <= 1, "{name} {having:?} matches several series");
    found.first().copied()
}

fn parse_labels(mut rest: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    while let Some((key, tail)) = rest.split_once("=\"") {
        let Some(end) = tail.find('"') else { break };
        labels.insert(key.to_owned(), tail[..end].to_owned());
        rest = tail[end + 1..].trim_start_matches(',');
    }
    labels
}

/// Every log line of this process (debug level included), as the JSON `[log] format = "json"`
/// writes. The first call installs the process-wide subscriber.
pub fn captured_logs() -> String {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    let buffer = LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || LogSink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        buffer
    });
    String::from_utf8(buffer.lock().unwrap().clone()).unwrap()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The access-log line of the request with `id`, once it is written (when its answer ends).
pub async fn access_log_line(id: &str) -> serde_json::Value {
    let found = tokio::time::timeout(PATIENCE, async {
        loop {
            let line = captured_logs()
                .lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .find(|line| line["target"] == "access" && line["request_id"] == id);
            if let Some(line) = line {
                return line;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("no access-log line for {id}"))
}

/// `openrouter-proxy explain --config <file holding config> args...`: exit status, stdout and
/// stderr. `env` is set for the command (keys it must never print).
pub async fn explain(config: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let path = temp_file("proxy.toml", config);
    let output = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_openrouter-proxy"))
            .arg("explain")
            .arg("--config")
            .arg(&path)
            .args(args)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("explain did not finish in time")
    .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}
