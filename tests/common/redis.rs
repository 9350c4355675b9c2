//! A real `redis-server` for tests: started on a free loopback port with no persistence, killed,
//! paused (SIGSTOP), resumed and restarted on the same port; always stopped by its PID.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use openrouter_proxy::config::Config;
use openrouter_proxy::redis::{Redis, RedisSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::PATIENCE;

/// One `redis-server` process on 127.0.0.1 (never the default port 6379).
pub struct RedisServer {
    pub port: u16,
    /// Set with `--requirepass`; then part of [`RedisServer::url`].
    password: Option<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub async fn start() -> RedisServer {
        RedisServer::start_with(None).await
    }

    /// The same, with `--requirepass <password>` when given.
    pub async fn start_with(password: Option<&str>) -> RedisServer {
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer {
                port,
                password: password.map(str::to_owned),
                child: None,
            };
            // Another process may take the port between our probe and the server's bind.
            if server.spawn().await {
                return server;
            }
        }
        panic!("redis-server did not start on any free port (is it installed?)");
    }

    /// `redis://127.0.0.1:<port>`, with `:<password>@` when it has one.
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Settings for a handle on this server, as `[redis]` with `url` and the given `extra` keys
    /// would give them.
    pub fn settings(&self, extra: &str) -> RedisSettings {
        let text = format!("[redis]\nurl = \"{}\"\n{extra}\n", self.url());
        let config = Config::parse(&text).unwrap();
        RedisSettings::resolve(config.redis.as_ref().unwrap()).unwrap()
    }

    /// A new handle (a replica's connection) on this server with the given `op_timeout`, once it
    /// is up. Tests that must not fall back on a loaded machine use a long one.
    pub async fn handle(&self, op_timeout: &str) -> Redis {
        let redis =
            Redis::connect(self.settings(&format!("op_timeout = \"{op_timeout}\""))).unwrap();
        wait_up(&redis).await;
        redis
    }

    /// Kills the server (SIGKILL, as a crash would) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty, and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn().await,
            "redis-server did not restart on its port"
        );
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("the server is running").id();
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Runs the server on `self.port`; false when it exited (the port was taken) or never
    /// answered.
    async fn spawn(&mut self) -> bool {
        let mut command = Command::new("redis-server");
        command.args(["--port", &self.port.to_string()]).args([
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while tokio::time::Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false;
            }
            if ping(self.port, self.password.as_deref()).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill();
        false
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL ends a paused server too.
        self.kill();
    }
}

/// Waits (generously) until `redis` is up.
pub async fn wait_up(redis: &Redis) {
    super::wait_until("redis to be up", || redis.is_up()).await;
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    listener.local_addr().unwrap().port()
}

async fn ping(port: u16, password: Option<&str>) -> bool {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let mut request = String::new();
        if let Some(password) = password {
            request.push_str(&format!("AUTH {password}\r\n"));
        }
        request.push_str("PING\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        let mut buffer = [0u8; 64];
        // One line per command sent.
        let lines = 1 + usize::from(password.is_some());
        while answer.windows(2).filter(|w| w == b"\r\n").count() < lines {
            let read = stream.read(&mut buffer).await.ok()?;
            if read == 0 {
                return None;
            }
            answer.extend_from_slice(&buffer[..read]);
        }
        Some(answer.ends_with(b"+PONG\r\n"))
    };
    tokio::time::timeout(Duration::from_secs(1), exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// The value of a metric in this process's registry: the first series named `name` whose labels
/// include every `key="value"` of `labels`. `None` when no such series exists yet.
pub fn metric(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = openrouter_proxy::record::metrics::handle().render();
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}
