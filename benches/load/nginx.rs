//! nginx `proxy_pass` as the floor the proxy is measured against: one nginx process (no master,
//! one worker) on a free port, a keep-alive pool to the mock, no buffering of answers, no access
//! log. Started and stopped by the benchmark; its files live under the bench's temporary dir.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A running nginx; dropping it kills the process.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
}

/// The nginx binary: `explicit` when given, else `nginx` on the PATH or in /usr/sbin. `None`
/// when there is none (the nginx column is then left out).
pub fn find(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return Some(path.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// What an nginx of the bench does.
pub enum Role<'a> {
    /// `proxy_pass` to `upstream` over plain HTTP/1.1 with a keep-alive pool.
    Front { upstream: SocketAddr },
    /// `proxy_pass` to `upstream` over TLS (nginx speaks HTTP/1.1 to upstreams) with a keep-alive
    /// pool and session reuse.
    FrontTls { upstream: SocketAddr },
    /// A TLS and HTTP/2 server in front of `upstream`, as OpenRouter is, with `cert` and `key`.
    TlsOrigin {
        upstream: SocketAddr,
        cert: &'a Path,
        key: &'a Path,
    },
}

fn config(dir: &Path, port: u16, role: &Role, connections: usize) -> String {
    let (listen, scheme, upstream) = match role {
        Role::Front { upstream } => (String::new(), "http", upstream),
        Role::FrontTls { upstream } => (String::new(), "https", upstream),
        Role::TlsOrigin {
            upstream,
            cert,
            key,
        } => (
            format!(
                " ssl http2;\n        ssl_certificate {};\n        ssl_certificate_key {}",
                cert.display(),
                key.display()
            ),
            "http",
            upstream,
        ),
    };
    let dir = dir.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile {files};
events {{
    worker_connections {connections};
}}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    upstream mock {{
        server {upstream};
        keepalive 512;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port}{listen};
        location / {{
            proxy_pass {scheme}://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_ssl_session_reuse on;
        }}
    }}
}}
"#,
        files = connections * 2 + 64,
    )
}

/// A self-signed certificate for `localhost` and 127.0.0.1 (not a CA, so that rustls takes it as
/// its own trust anchor), made with the openssl command; `None` without one.
pub fn self_signed(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).ok()?;
    let (cert, key) = (dir.join("origin.crt"), dir.join("origin.key"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    made.success().then_some((cert, key))
}

impl Nginx {
    /// Starts nginx in `role`, allowing `connections` at once (client and upstream side
    /// together), and waits until it accepts connections.
    pub fn start(binary: &Path, role: &Role, connections: usize, dir: &Path) -> Nginx {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let dir = dir.join(format!("nginx-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(&dir, port, role, connections)).unwrap();
        let child = Command::new(binary)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let nginx = Nginx {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(nginx.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {} within 10 s (see {}/error.log)",
                nginx.addr,
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
