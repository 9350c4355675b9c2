//! The `openrouter-proxy` command: flags, start-up, signal handling (SIGTERM/SIGINT drain, SIGHUP
//! reloads the config).

use std::path::PathBuf;
use std::process::ExitCode;

use openrouter_proxy::config::LogFormat;
use openrouter_proxy::server::Workers;
use openrouter_proxy::Config;
use openrouter_proxy::{serve_live, Listeners, LiveConfig, ReloadTrigger};
use tracing_subscriber::EnvFilter;

const USAGE: &str = "\
usage: openrouter-proxy [--config PATH] [--check] [--no-watch]
       openrouter-proxy explain [--config PATH] [--model NAME] [--path /v1/...] [--header K=V]...
       openrouter-proxy --hash-token < token-file

  --config PATH   the proxy.toml to load (default: proxy.toml)
  --check         validate the config and exit (0 valid, 1 invalid)
  explain         print the plan a request would get (route, attempts as upstream / model,
                  headers set and removed, body policy, cache, limits) and exit; 1 when the
                  config is invalid. --path defaults to /v1/chat/completions
  --no-watch      reload the config only on SIGHUP, not when its file changes
  --hash-token    print the sha256 of the token read from standard input, for
                  [[server.tokens]] (the token itself is never stored)
  --version       print the version
  --help          print this help

The upstream API key is read from the environment variable named by
upstream.api_key_env (default OPENROUTER_API_KEY) or from upstream.api_key_file.
The config and key files are reloaded when they change and on SIGHUP; an invalid
config is rejected and the running one keeps serving.";

struct Args {
    config: PathBuf,
    check: bool,
    watch: bool,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut args = Args {
        config: PathBuf::from("proxy.toml"),
        check: false,
        watch: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--config" | "-c" => {
                args.config = it.next().ok_or("--config needs a path")?.into();
            }
            _ if arg.starts_with("--config=") => {
                args.config = arg["--config=".len()..].into();
            }
            "--check" => args.check = true,
            "--hash-token" => {
                let mut token = String::new();
                std::io::stdin()
                    .read_line(&mut token)
                    .map_err(|e| format!("cannot read the token from standard input: {e}"))?;
                let token = token.trim();
                if token.is_empty() {
                    return Err(
                        "--hash-token reads the token from standard input; got nothing".into(),
                    );
                }
                println!(
                    "{}",
                    openrouter_proxy::auth::hex(&openrouter_proxy::auth::sha256(token.as_bytes()))
                );
                return Ok(None);
            }
            "--no-watch" => args.watch = false,
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "--version" | "-V" => {
                println!("openrouter-proxy {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            other => return Err(format!("unknown argument \"{other}\"\n\n{USAGE}")),
        }
    }
    Ok(Some(args))
}

/// `openrouter-proxy explain ...`: prints the plan and exits.
fn explain(args: impl Iterator<Item = String>) -> ExitCode {
    let mut config = PathBuf::from("proxy.toml");
    let mut question = openrouter_proxy::explain::Question {
        model: None,
        path: "/v1/chat/completions".to_owned(),
        headers: Vec::new(),
    };
    let mut args = args;
    while let Some(arg) = args.next() {
        let value = args.next();
        match (arg.as_str(), value) {
            ("--config" | "-c", Some(value)) => config = value.into(),
            ("--model", Some(value)) => question.model = Some(value),
            ("--path", Some(value)) => question.path = value,
            ("--header", Some(value)) => match value.split_once('=') {
                Some((name, value)) => question.headers.push((name.into(), value.into())),
                None => return usage_error(&format!("--header needs NAME=VALUE, got \"{value}\"")),
            },
            (other, _) => {
                return usage_error(&format!(
                    "explain: unknown or incomplete argument \"{other}\""
                ))
            }
        }
    }
    let loaded = Config::load(&config).map_err(|e| format!("invalid config: {e}"));
    match loaded.and_then(|c| openrouter_proxy::explain::explain(c, &question)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("openrouter-proxy: {message}");
            ExitCode::FAILURE
        }
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("openrouter-proxy: {message}\n\n{USAGE}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1).peekable();
    if argv.peek().map(String::as_str) == Some("explain") {
        return explain(argv.skip(1));
    }
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("openrouter-proxy: {message}");
            return ExitCode::from(2);
        }
    };
    let live = match LiveConfig::load(&args.config) {
        Ok(live) => live.watch_files(args.watch),
        Err(error) => {
            eprintln!("openrouter-proxy: invalid config: {error}");
            return ExitCode::FAILURE;
        }
    };
    if args.check {
        println!("{}: ok", args.config.display());
        return ExitCode::SUCCESS;
    }
    init_logging(live.config());
    // One thread (the default) runs everything on one current-thread runtime: no hand-offs
    // between threads on the request path, which is what a sidecar with a CPU or two wants.
    // More threads each run a runtime of their own that client connections are spread over.
    let threads = match live.config().server.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let started = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .and_then(|runtime| {
            let workers = (threads > 1)
                .then(|| Workers::start(runtime.handle(), threads))
                .transpose()?;
            Ok((runtime, workers))
        });
    let (runtime, workers) = match started {
        Ok(started) => started,
        Err(error) => {
            eprintln!("openrouter-proxy: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(live));
    // The records of connections cut at the end are written as the runtimes drop them: the last
    // access lines are flushed after that.
    if let Some(workers) = workers {
        workers.stop();
    }
    drop(runtime);
    openrouter_proxy::record::access::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            eprintln!("openrouter-proxy: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(live: LiveConfig) -> Result<(), String> {
    // Installed before "listening" is logged: SIGHUP's default action would end the process.
    reload_on_hangup(live.trigger())?;
    let config = live.config();
    // The accept queue holds the connections over `max_connections` and connection bursts; the
    // 128 that `TcpListener::bind` asks for drops the rest (the kernel caps it at somaxconn).
    let bind = |addr: std::net::SocketAddr| async move {
        let listen = || {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }?;
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(4096)
        };
        listen().map_err(|e| format!("cannot listen on {addr}: {e}"))
    };
    let listeners = Listeners {
        api: bind(config.server.listen).await?,
        admin: bind(config.server.admin_listen).await?,
    };
    let api = listeners.api.local_addr().map_err(|e| e.to_string())?;
    let admin = listeners.admin.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%api, %admin, upstream = %config.upstream.base_url, "listening");
    if config.log.access_buffer_bytes > 0 {
        // Ends with the runtime.
        tokio::spawn(flush_access_lines(config.log.access_flush_interval));
    }
    serve_live(live, listeners, shutdown_signal()).await
}

/// Writes the gathered access lines every `interval`, so a quiet proxy's lines still show.
async fn flush_access_lines(interval: std::time::Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        openrouter_proxy::record::access::flush();
    }
}

/// Turns each SIGHUP into a reload request for as long as the runtime runs.
fn reload_on_hangup(trigger: ReloadTrigger) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup())
        .map_err(|e| format!("cannot install the SIGHUP handler: {e}"))?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            trigger.reload();
        }
    });
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    match config.log.format {
        LogFormat::Json => {
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .init();
            openrouter_proxy::record::access::write_json_to_stdout();
            openrouter_proxy::record::access::buffer_lines(config.log.access_buffer_bytes);
        }
        LogFormat::Text => builder.init(),
    }
}
