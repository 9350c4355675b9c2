//! Property tests of the pure parts of the request path against hostile input: the config parser,
//! the SSE scanner, the model rewrite and the upstream path mapping. `PROPTEST_CASES=10000` runs a
//! longer search than the default 256 cases per property.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]
#![allow(
    clippy::too_many_lines,
    reason = "each scenario reads top to bottom: load, fault, then every check of its outcome"
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use openrouter_proxy::config::{LogFormat, Midstream};
use openrouter_proxy::pipeline::body::JsonBody;
use openrouter_proxy::sse::{Event, Scanner, Usage};
use openrouter_proxy::upstream::{check_path, BaseUrl};
use openrouter_proxy::Config;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Value};

/// `PROPTEST_CASES` sets the number of cases; failures are reported with their minimal input
/// rather than written to a regressions file next to this one.
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A tiny deterministic generator for formatting choices inside one generated case.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------------------------------------
// Config parser
// ---------------------------------------------------------------------------------------------

/// Table headers, keys and values that real configs use, mixed with junk, so that generated
/// text gets past the TOML grammar often enough to reach validation.
fn toml_ish_line() -> impl Strategy<Value = String> {
    let header = prop_oneof![
        Just("[server]".to_owned()),
        Just("[upstream]".to_owned()),
        Just("[upstream.headers]".to_owned()),
        Just("[fallback]".to_owned()),
        Just("[cache]".to_owned()),
        Just("[log]".to_owned()),
        Just("[[routes]]".to_owned()),
        Just("[routes.match]".to_owned()),
        "\\[[a-z.\\[\\]]{0,12}\\]?",
    ];
    let key = prop_oneof![
        prop::sample::select(vec![
            "listen",
            "admin_listen",
            "max_body_bytes",
            "shutdown_grace",
            "drain_delay",
            "header_read_timeout",
            "max_connections",
            "base_url",
            "api_key_env",
            "api_key_file",
            "connect_timeout",
            "first_byte_timeout",
            "pool_idle_timeout",
            "stream_idle_timeout",
            "on_status",
            "max_attempts",
            "retry_after_max",
            "cooldown",
            "cooldown_failures",
            "max_inspect_bytes",
            "max_bytes",
            "format",
            "level",
            "name",
            "match",
            "model",
            "fallbacks",
            "cache_ttl",
            "set_headers",
            "remove_headers",
            "on_midstream",
            "headers",
            "path",
        ])
        .prop_map(str::to_owned),
        "[A-Za-z0-9_.-]{1,10}",
        "\"[^\"\\\\\r\n]{0,8}\"",
    ];
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| format!("{n:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
        prop::sample::select(vec![
            "\"127.0.0.1:0\"",
            "\"[::1]:65535\"",
            "\"http://127.0.0.1:9/api/v1\"",
            "\"https://user@x/\"",
            "\"ftp://x\"",
            "\"30s\"",
            "\"0s\"",
            "\"99999999999999999999999h\"",
            "\"1m 30s\"",
            "\"soon\"",
            "\"openai/*\"",
            "\"/v1/*\"",
            "\"\"",
            "[500, 502, 200, 70000]",
            "[]",
            "[\"a\", \"\"]",
            "{ model = \"x\", headers = { \"x-team\" = \"a\" } }",
            "{ \"bad header\" = \"x\" }",
            "{ model = 1 }",
            "\"resume\"",
            "\"json\"",
            "-1",
            "0",
            "18446744073709551616",
        ])
        .prop_map(str::to_owned),
        "\"[^\"\\\\\r\n]{0,12}\"",
        "[^\r\n]{0,12}",
    ];
    prop_oneof![
        1 => header,
        4 => (key, "[ \t]{0,2}=[ \t]{0,2}", value).prop_map(|(k, eq, v)| format!("{k}{eq}{v}")),
        1 => "[^\n]{0,20}",
    ]
}

/// Known keys are snake_case ASCII; a key with a capital, a digit, a dash or a non-ASCII
/// character can never be one of them.
fn unknown_key() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_]{0,6}[A-Z0-9-][A-Za-z0-9_-]{0,8}",
        "[a-z]{0,4}[\u{e0}-\u{ff}\u{3b1}-\u{3c9}\u{4e00}-\u{4e20}][a-z ]{0,6}",
    ]
}

/// A TOML key: bare when the grammar allows it, else a basic string with escapes.
fn toml_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        key.to_owned()
    } else {
        toml::Value::String(key.to_owned()).to_string()
    }
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (1u64..100_000).prop_map(Duration::from_millis),
        (0u64..10_000_000, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
    ]
    .prop_filter("zero durations are refused where they matter", |d| {
        !d.is_zero()
    })
}

fn duration_text(duration: Duration) -> toml::Value {
    toml::Value::String(humantime::format_duration(duration).to_string())
}

fn header_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,12}"
}

fn header_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(header_name(), "[!-~][ -~]{0,16}", 0..3)
}

fn model_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9-]{1,10}/[a-z0-9.:-]{1,16}",
        "[^\\p{C}]{1,12}".prop_filter("not blank", |s| !s.trim().is_empty()),
    ]
}

#[derive(Debug, Clone)]
struct GenRoute {
    name: String,
    match_model: Option<String>,
    match_path: Option<String>,
    match_headers: BTreeMap<String, String>,
    model: Option<String>,
    fallbacks: Vec<String>,
    cache_ttl: Option<Duration>,
    first_byte_timeout: Option<Duration>,
    set_headers: BTreeMap<String, String>,
    remove_headers: Vec<String>,
    resume: bool,
}

fn route() -> impl Strategy<Value = GenRoute> {
    (
        "[a-z][a-z0-9 _-]{0,10}",
        prop::option::of("[a-z0-9/*?.-]{1,12}"),
        prop::option::of("/v1[a-z/*?]{0,12}"),
        header_map(),
        prop::option::of((model_name(), prop::collection::vec(model_name(), 0..3))),
        prop::option::of(prop_oneof![Just(Duration::ZERO), duration()]),
        prop::option::of(duration()),
        header_map(),
        prop::collection::vec(header_name(), 0..3),
        any::<bool>(),
    )
        .prop_map(
            |(
                name,
                match_model,
                match_path,
                match_headers,
                models,
                cache_ttl,
                first_byte_timeout,
                set_headers,
                remove_headers,
                resume,
            )| {
                let (model, fallbacks) = match models {
                    Some((model, fallbacks)) => (Some(model), fallbacks),
                    None => (None, Vec::new()),
                };
                GenRoute {
                    name,
                    match_model,
                    match_path,
                    match_headers,
                    model,
                    fallbacks,
                    cache_ttl,
                    first_byte_timeout,
                    set_headers,
                    remove_headers,
                    resume,
                }
            },
        )
}

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    (
        prop_oneof![
            Just("127.0.0.1"),
            Just("0.0.0.0"),
            Just("[::1]"),
            Just("10.1.2.3")
        ],
        1u16..,
    )
        .prop_map(|(host, port)| format!("{host}:{port}").parse().unwrap())
}

/// A valid config: the TOML text, the config it must parse to (routes aside) and its routes.
fn valid_config() -> impl Strategy<Value = (String, Config, Vec<GenRoute>)> {
    let server = (
        socket_addr(),
        socket_addr(),
        1usize..=(1 << 40),
        duration(),
        prop_oneof![Just(Duration::ZERO), duration()],
        duration(),
        1usize..=1_000_000,
    );
    let upstream = (
        prop_oneof![
            Just("https://openrouter.ai/api/v1".to_owned()),
            (1u16.., "(/[a-z0-9._-]{1,8}){0,3}/?")
                .prop_map(|(port, path)| format!("http://127.0.0.1:{port}{path}")),
            "https://[a-z]{1,10}\\.example(/[a-z0-9]{1,6}){0,2}",
        ],
        prop_oneof![
            Just((None, None)),
            "[A-Z][A-Z0-9_]{0,15}".prop_map(|env| (Some(env), None)),
            "/[a-z]{1,8}/[a-z-]{1,8}".prop_map(|file| (None, Some(file))),
        ],
        (duration(), duration(), duration(), duration()),
        header_map(),
    );
    let fallback = (
        prop::collection::vec(400u16..=599, 0..5),
        1usize..=10,
        duration(),
        prop_oneof![Just(Duration::ZERO), duration()],
        1u32..=100,
        1usize..=(1 << 40),
    );
    let rest = (
        1u64..=(1 << 50),
        any::<bool>(),
        prop::sample::select(vec![
            "info",
            "debug",
            "warn,hyper=error",
            "openrouter_proxy=trace",
        ]),
        prop::collection::vec(route(), 0..4),
    );
    (server, upstream, fallback, rest).prop_filter_map(
        "listen and admin_listen must differ",
        |(server, upstream, fallback, rest)| {
            let (listen, admin, max_body, grace, drain, header_timeout, max_conn) = server;
            if listen == admin {
                return None;
            }
            let (base_url, (key_env, key_file), timeouts, headers) = upstream;
            let (connect, first_byte, pool_idle, stream_idle) = timeouts;
            let (on_status, max_attempts, retry_max, cooldown, cooldown_failures, inspect) =
                fallback;
            let (cache_bytes, text_logs, level, mut routes) = rest;
            for (i, route) in routes.iter_mut().enumerate() {
                // Unique, non-blank names.
                route.name = format!("{}#{i}", route.name);
            }

            let mut expected = Config::default();
            expected.server.listen = listen;
            expected.server.admin_listen = admin;
            expected.server.max_body_bytes = max_body;
            expected.server.shutdown_grace = grace;
            expected.server.drain_delay = drain;
            expected.server.header_read_timeout = header_timeout;
            expected.server.max_connections = max_conn;
            expected.upstream.base_url = base_url.clone();
            expected.upstream.api_key_env = key_env.clone();
            expected.upstream.api_key_file = key_file.clone().map(Into::into);
            expected.upstream.connect_timeout = connect;
            expected.upstream.first_byte_timeout = first_byte;
            expected.upstream.pool_idle_timeout = pool_idle;
            expected.upstream.stream_idle_timeout = stream_idle;
            expected.upstream.headers = headers.clone();
            expected.fallback.on_status = on_status.clone();
            expected.fallback.max_attempts = max_attempts;
            expected.fallback.retry_after_max = retry_max;
            expected.fallback.cooldown = cooldown;
            expected.fallback.cooldown_failures = cooldown_failures;
            expected.fallback.max_inspect_bytes = inspect;
            expected.cache.max_bytes = cache_bytes;
            expected.log.format = if text_logs {
                LogFormat::Text
            } else {
                LogFormat::Json
            };
            expected.log.level = level.to_owned();

            let mut server = toml::Table::new();
            server.insert("listen".into(), listen.to_string().into());
            server.insert("admin_listen".into(), admin.to_string().into());
            server.insert("max_body_bytes".into(), (max_body as i64).into());
            server.insert("shutdown_grace".into(), duration_text(grace));
            server.insert("drain_delay".into(), duration_text(drain));
            server.insert("header_read_timeout".into(), duration_text(header_timeout));
            server.insert("max_connections".into(), (max_conn as i64).into());
            let mut upstream = toml::Table::new();
            upstream.insert("base_url".into(), base_url.into());
            if let Some(env) = key_env {
                upstream.insert("api_key_env".into(), env.into());
            }
            if let Some(file) = key_file {
                upstream.insert("api_key_file".into(), file.into());
            }
            upstream.insert("connect_timeout".into(), duration_text(connect));
            upstream.insert("first_byte_timeout".into(), duration_text(first_byte));
            upstream.insert("pool_idle_timeout".into(), duration_text(pool_idle));
            upstream.insert("stream_idle_timeout".into(), duration_text(stream_idle));
            upstream.insert("headers".into(), string_table(&headers));
            let mut fallback = toml::Table::new();
            fallback.insert(
                "on_status".into(),
                toml::Value::Array(on_status.iter().map(|s| i64::from(*s).into()).collect()),
            );
            fallback.insert("max_attempts".into(), (max_attempts as i64).into());
            fallback.insert("retry_after_max".into(), duration_text(retry_max));
            fallback.insert("cooldown".into(), duration_text(cooldown));
            fallback.insert(
                "cooldown_failures".into(),
                i64::from(cooldown_failures).into(),
            );
            fallback.insert("max_inspect_bytes".into(), (inspect as i64).into());
            let mut cache = toml::Table::new();
            cache.insert("max_bytes".into(), (cache_bytes as i64).into());
            let mut log = toml::Table::new();
            log.insert(
                "format".into(),
                if text_logs { "text" } else { "json" }.into(),
            );
            log.insert("level".into(), level.into());
            let route_tables: Vec<toml::Value> = routes.iter().map(route_table).collect();

            let mut top = toml::Table::new();
            top.insert("server".into(), server.into());
            top.insert("upstream".into(), upstream.into());
            top.insert("fallback".into(), fallback.into());
            top.insert("cache".into(), cache.into());
            top.insert("log".into(), log.into());
            top.insert("routes".into(), toml::Value::Array(route_tables));
            let text = toml::to_string(&top).unwrap();
            Some((text, expected, routes))
        },
    )
}

fn string_table(map: &BTreeMap<String, String>) -> toml::Value {
    toml::Value::Table(
        map.iter()
            .map(|(k, v)| (k.clone(), toml::Value::String(v.clone())))
            .collect(),
    )
}

fn route_table(route: &GenRoute) -> toml::Value {
    let mut table = toml::Table::new();
    table.insert("name".into(), route.name.clone().into());
    let mut matcher = toml::Table::new();
    if let Some(model) = &route.match_model {
        matcher.insert("model".into(), model.clone().into());
    }
    if let Some(path) = &route.match_path {
        matcher.insert("path".into(), path.clone().into());
    }
    matcher.insert("headers".into(), string_table(&route.match_headers));
    table.insert("match".into(), matcher.into());
    if let Some(model) = &route.model {
        table.insert("model".into(), model.clone().into());
    }
    table.insert(
        "fallbacks".into(),
        toml::Value::Array(route.fallbacks.iter().map(|f| f.clone().into()).collect()),
    );
    if let Some(ttl) = route.cache_ttl {
        table.insert("cache_ttl".into(), duration_text(ttl));
    }
    if let Some(timeout) = route.first_byte_timeout {
        table.insert("first_byte_timeout".into(), duration_text(timeout));
    }
    table.insert("set_headers".into(), string_table(&route.set_headers));
    table.insert(
        "remove_headers".into(),
        toml::Value::Array(
            route
                .remove_headers
                .iter()
                .map(|h| h.clone().into())
                .collect(),
        ),
    );
    table.insert(
        "on_midstream".into(),
        if route.resume { "resume" } else { "error" }.into(),
    );
    table.into()
}

/// Routes are compared field by field, so that new route fields (with defaults) do not break this.
fn check_routes(parsed: &Config, routes: &[GenRoute]) -> Result<(), TestCaseError> {
    prop_assert_eq!(parsed.routes.len(), routes.len());
    for (got, want) in parsed.routes.iter().zip(routes) {
        prop_assert_eq!(&got.name, &want.name);
        prop_assert_eq!(&got.matcher.model, &want.match_model);
        prop_assert_eq!(&got.matcher.path, &want.match_path);
        prop_assert_eq!(&got.matcher.headers, &want.match_headers);
        prop_assert_eq!(&got.model, &want.model);
        let fallbacks: Vec<&str> = got.fallbacks.iter().map(|f| f.model()).collect();
        prop_assert_eq!(
            fallbacks,
            want.fallbacks
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        );
        prop_assert_eq!(got.cache_ttl, want.cache_ttl);
        prop_assert_eq!(got.first_byte_timeout, want.first_byte_timeout);
        prop_assert_eq!(&got.set_headers, &want.set_headers);
        prop_assert_eq!(&got.remove_headers, &want.remove_headers);
        let midstream = if want.resume {
            Midstream::Resume
        } else {
            Midstream::Error
        };
        prop_assert_eq!(got.on_midstream, midstream);
    }
    Ok(())
}

/// Valid `key = value` lines per table, for placing an unknown key among them.
const TABLES: &[(&str, &[&str])] = &[
    ("", &[]),
    (
        "server",
        &["listen = \"127.0.0.1:0\"", "max_connections = 5"],
    ),
    (
        "upstream",
        &[
            "base_url = \"http://127.0.0.1:9/v1\"",
            "connect_timeout = \"1s\"",
        ],
    ),
    ("fallback", &["max_attempts = 2", "on_status = [502]"]),
    ("cache", &["max_bytes = 1024"]),
    ("log", &["format = \"text\"", "level = \"debug\""]),
    ("[routes]", &["name = \"r\"", "model = \"m\""]),
    ("routes.match", &["model = \"fast\""]),
];

proptest! {
    #![proptest_config(config())]

    #[test]
    fn config_parse_never_panics_on_any_text(text in any::<String>()) {
        let _ = Config::parse(&text);
    }

    #[test]
    fn config_parse_never_panics_on_toml_ish_text(
        lines in prop::collection::vec(toml_ish_line(), 0..24),
        crlf in any::<bool>(),
    ) {
        let text = lines.join(if crlf { "\r\n" } else { "\n" });
        match Config::parse(&text) {
            Ok(config) => {
                // Whatever got through validation must be usable as it is.
                prop_assert!(BaseUrl::parse(&config.upstream.base_url).is_ok());
                prop_assert!((1..=10).contains(&config.fallback.max_attempts));
            }
            Err(error) => prop_assert!(!error.to_string().trim().is_empty()),
        }
    }

    #[test]
    fn an_unknown_key_is_named_in_the_error(
        table in 0..TABLES.len(),
        key in unknown_key(),
        position in 0usize..3,
        value in prop::sample::select(vec!["1", "\"x\"", "true", "[1, 2]", "{ a = 1 }"]),
    ) {
        let (name, lines) = TABLES[table];
        let mut body: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
        let at = position.min(body.len());
        body.insert(at, format!("{} = {value}", toml_key(&key)));
        let mut text = String::new();
        if name == "routes.match" {
            text.push_str("[[routes]]\nname = \"r\"\n");
        }
        if !name.is_empty() {
            text.push_str(&format!("[{name}]\n"));
        }
        text.push_str(&body.join("\n"));
        let error = Config::parse(&text).expect_err(&text).to_string();
        prop_assert!(error.contains(&key), "{:?} gave {:?}", text, error);
        prop_assert!(error.contains("unknown field"), "{:?} gave {:?}", text, error);
        let inserted = format!("{} = {value}", toml_key(&key));
        let line = text.lines().position(|l| l == inserted).unwrap() + 1;
        prop_assert!(error.contains(&format!("line {line}")), "{:?} gave {:?}", text, error);
    }

    #[test]
    fn valid_configs_round_trip((text, expected, routes) in valid_config()) {
        let parsed = Config::parse(&text);
        prop_assert!(parsed.is_ok(), "{}\n{:?}", text, parsed);
        let parsed = parsed.unwrap();
        check_routes(&parsed, &routes)?;
        let mut without_routes = parsed;
        without_routes.routes.clear();
        prop_assert_eq!(&without_routes, &expected, "{}", text);
    }
}

// ---------------------------------------------------------------------------------------------
// SSE scanner
// ---------------------------------------------------------------------------------------------

/// What one generated event carries.
#[derive(Debug, Clone)]
enum Payload {
    /// Only comment lines: a keep-alive.
    Comments,
    /// `event:` / `id:` / `retry:` lines and nothing else: no event at all.
    Meta,
    /// A blank line with nothing before it.
    Empty,
    Content(String),
    Usage(u64, u64, Option<u32>),
    ErrorObject(String),
    ErrorString(String),
    NullError(String),
    FinishError,
    /// Data that is not JSON; passes as content.
    Raw(String),
    Done,
}

#[derive(Debug, Clone)]
struct GenEvent {
    comments: Vec<String>,
    meta: bool,
    payload: Payload,
    pretty: bool,
    no_space: bool,
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        1 => Just(Payload::Comments),
        1 => Just(Payload::Meta),
        1 => Just(Payload::Empty),
        6 => any::<String>().prop_map(Payload::Content),
        2 => (0u64..1_000_000, 0u64..1_000_000, prop::option::of(any::<u32>()))
            .prop_map(|(p, c, cost)| Payload::Usage(p, c, cost)),
        1 => any::<String>().prop_map(Payload::ErrorObject),
        1 => any::<String>().prop_map(Payload::ErrorString),
        1 => any::<String>().prop_map(Payload::NullError),
        1 => Just(Payload::FinishError),
        1 => "[a-zA-Z][a-zA-Z0-9 ]{0,20}".prop_map(Payload::Raw),
        1 => Just(Payload::Done),
    ]
}

fn gen_event() -> impl Strategy<Value = GenEvent> {
    (
        prop::collection::vec("[^\r\n]{0,16}", 0..3),
        any::<bool>(),
        payload(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(comments, meta, payload, pretty, no_space)| {
            let comments = match payload {
                Payload::Comments if comments.is_empty() => vec![String::new()],
                Payload::Meta | Payload::Empty => Vec::new(),
                _ => comments,
            };
            let meta = meta || matches!(payload, Payload::Meta);
            let meta = meta && !matches!(payload, Payload::Empty);
            GenEvent {
                comments,
                meta,
                payload,
                pretty,
                no_space,
            }
        })
}

/// A generated stream with everything the scanner must find in it.
#[derive(Debug)]
struct Stream {
    bytes: Vec<u8>,
    events: Vec<Event>,
    text: String,
    usage: Option<Usage>,
    done: bool,
    /// Each blank line: (offset of its first terminator byte, offset just past it).
    blank_lines: Vec<(usize, usize)>,
    /// The stream ends inside an unfinished event.
    partial_tail: bool,
}

fn render_stream(events: &[GenEvent], seed: u64, tail: Option<&str>) -> Stream {
    let mut rng = XorShift::new(seed);
    let mut stream = Stream {
        bytes: Vec::new(),
        events: Vec::new(),
        text: String::new(),
        usage: None,
        done: false,
        blank_lines: Vec::new(),
        partial_tail: false,
    };
    let mut previous_ending = "\n";
    let mut push_line = |stream: &mut Stream, line: &str| {
        let mut ending = ["\n", "\r\n", "\r"][rng.below(3) as usize];
        // A blank line ended by `\n` right after a line ended by `\r` would read as one `\r\n`.
        if line.is_empty() && previous_ending == "\r" && ending == "\n" {
            ending = "\r\n";
        }
        stream.bytes.extend_from_slice(line.as_bytes());
        let start = stream.bytes.len();
        stream.bytes.extend_from_slice(ending.as_bytes());
        if line.is_empty() {
            stream.blank_lines.push((start, stream.bytes.len()));
        }
        previous_ending = ending;
    };
    for event in events {
        for comment in &event.comments {
            push_line(&mut stream, &format!(":{comment}"));
        }
        if event.meta {
            push_line(&mut stream, "event: message");
            push_line(&mut stream, "id: 42");
        }
        let data: Option<Value> = match &event.payload {
            Payload::Comments | Payload::Meta | Payload::Empty => None,
            Payload::Content(text) => {
                stream.text.push_str(text);
                stream.events.push(Event::Content);
                Some(json!({"id": "gen-1", "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]}))
            }
            Payload::Usage(prompt, completion, cost) => {
                let cost = cost.map(|c| f64::from(c) / 1000.0);
                stream.usage = Some(Usage {
                    prompt_tokens: *prompt,
                    completion_tokens: *completion,
                    cost,
                });
                stream.events.push(Event::Content);
                Some(json!({"choices": [], "usage": {"prompt_tokens": prompt,
                    "completion_tokens": completion, "total_tokens": prompt + completion,
                    "cost": cost}}))
            }
            Payload::ErrorObject(message) => {
                stream.events.push(Event::Error(message.clone()));
                Some(json!({"error": {"message": message, "code": 502}}))
            }
            Payload::ErrorString(message) => {
                let raw = serde_json::to_string(message).unwrap();
                stream
                    .events
                    .push(Event::Error(raw.chars().take(500).collect()));
                Some(json!({"error": message}))
            }
            Payload::NullError(text) => {
                stream.text.push_str(text);
                stream.events.push(Event::Content);
                Some(json!({"error": null, "choices": [{"delta": {"content": text}}]}))
            }
            Payload::FinishError => {
                stream.events.push(Event::Error(
                    "the provider finished the answer with an error".to_owned(),
                ));
                Some(json!({"choices": [{"delta": {"content": ""}, "finish_reason": "error"}]}))
            }
            Payload::Raw(text) => {
                stream.events.push(Event::Content);
                push_line(&mut stream, &format!("data: {text}"));
                None
            }
            Payload::Done => {
                stream.done = true;
                stream.events.push(Event::Done);
                let prefix = if event.no_space { "data:" } else { "data: " };
                push_line(&mut stream, &format!("{prefix}[DONE]"));
                None
            }
        };
        if let Some(data) = data {
            let text = if event.pretty {
                serde_json::to_string_pretty(&data).unwrap()
            } else {
                data.to_string()
            };
            let prefix = if event.no_space { "data:" } else { "data: " };
            // Multi-line data: the scanner joins the lines with `\n`, which JSON reads as
            // whitespace between tokens.
            for line in text.split('\n') {
                push_line(&mut stream, &format!("{prefix}{line}"));
            }
        } else if matches!(event.payload, Payload::Comments) {
            stream.events.push(Event::KeepAlive);
        }
        push_line(&mut stream, "");
    }
    if let Some(tail) = tail {
        stream.bytes.extend_from_slice(tail.as_bytes());
        stream.partial_tail = true;
    }
    stream
}

/// Feeds `input` cut at `cuts`, checking every returned boundary against the blank lines.
fn scan(
    input: &Stream,
    cuts: &[usize],
    collect_text: bool,
) -> Result<(Vec<Event>, Scanner), TestCaseError> {
    let bytes = &input.bytes;
    let mut scanner = Scanner::new(collect_text);
    let mut events = Vec::new();
    let mut start = 0;
    let mut ends: Vec<usize> = cuts.iter().copied().filter(|&c| c <= bytes.len()).collect();
    ends.push(bytes.len());
    ends.sort_unstable();
    // Repeated cut points give empty chunks, which must change nothing.
    for end in ends {
        let chunk = &bytes[start..end];
        let boundary = scanner.feed(chunk, |event| events.push(event));
        // The furthest event end this chunk completes: just past the blank line's terminator,
        // or past its `\r` when the chunk ends between `\r` and `\n`, or past a `\n` at the
        // chunk's start that finishes a blank line's `\r\n`.
        let expected = input
            .blank_lines
            .iter()
            .filter_map(|&(first, past)| {
                if first >= start && first < end {
                    Some(past.min(end))
                } else if first + 1 == start && past == start + 1 && past <= end {
                    Some(past)
                } else {
                    None
                }
            })
            .max()
            .map(|absolute| absolute - start);
        prop_assert_eq!(boundary, expected, "chunk {}..{}", start, end);
        if let Some(offset) = boundary {
            prop_assert!(matches!(chunk[offset - 1], b'\n' | b'\r'));
        }
        start = end;
    }
    Ok((events, scanner))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn sse_splits_do_not_change_what_is_seen(
        events in prop::collection::vec(gen_event(), 0..16),
        seed in any::<u64>(),
        tail in prop::option::of("data: [{}a-z\"]{0,8}"),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        collect_text in any::<bool>(),
    ) {
        let stream = render_stream(&events, seed, tail.as_deref());
        let len = stream.bytes.len();
        let cuts: Vec<usize> = cuts.iter().map(|i| i.index(len + 1)).collect();
        let (whole, whole_scanner) = scan(&stream, &[], collect_text)?;
        prop_assert_eq!(&whole, &stream.events);
        let (split, scanner) = scan(&stream, &cuts, collect_text)?;
        prop_assert_eq!(&split, &stream.events);
        for s in [&whole_scanner, &scanner] {
            prop_assert_eq!(&s.usage, &stream.usage);
            prop_assert_eq!(s.done, stream.done);
            prop_assert_eq!(s.at_boundary(), !stream.partial_tail);
            if collect_text {
                prop_assert_eq!(&s.text, &stream.text);
            } else {
                prop_assert_eq!(s.text.as_str(), "");
            }
            prop_assert_eq!(
                s.seen_content(),
                stream.events.contains(&Event::Content)
            );
        }
    }

    #[test]
    fn sse_byte_by_byte_matches_whole(
        events in prop::collection::vec(gen_event(), 0..6),
        seed in any::<u64>(),
    ) {
        let stream = render_stream(&events, seed, None);
        let every: Vec<usize> = (1..stream.bytes.len()).collect();
        let (split, scanner) = scan(&stream, &every, true)?;
        prop_assert_eq!(&split, &stream.events);
        prop_assert_eq!(&scanner.text, &stream.text);
    }

    #[test]
    fn sse_arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(
            prop_oneof![
                4 => any::<u8>(),
                2 => Just(b'\n'),
                2 => Just(b'\r'),
                1 => Just(b':'),
            ],
            0..512,
        ),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        collect_text in any::<bool>(),
        prefix in prop::sample::select(vec!["", "data: ", "data:{\"error\":", "data: {\"choices\":[{\"delta\":{\"content\":\""]),
    ) {
        let mut input = prefix.as_bytes().to_vec();
        input.extend_from_slice(&bytes);
        let mut ends: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
        ends.sort_unstable();
        ends.push(input.len());
        let mut scanner = Scanner::new(collect_text);
        let mut start = 0;
        for end in ends {
            let chunk = &input[start..end];
            if let Some(offset) = scanner.feed(chunk, |_| {}) {
                prop_assert!(offset >= 1 && offset <= chunk.len());
                prop_assert!(matches!(chunk[offset - 1], b'\n' | b'\r'));
            }
            start = end;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Model rewrite
// ---------------------------------------------------------------------------------------------

fn json_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z/\"\\\\\u{0}-\u{1f}\u{7f}\u{e9}\u{2028}\u{1f600}]{0,12}",
        Just("model".to_owned()),
        Just("\"model\": \"x\"".to_owned()),
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        json_string().prop_map(Value::String),
    ]
}

fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("model".to_owned()),
        1 => Just("stream".to_owned()),
        1 => Just("messages".to_owned()),
        4 => json_string(),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((json_key(), inner), 0..6)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

/// A request body: top-level fields other than `model` and `stream`, maybe those two, and
/// messages that carry `model` keys of their own.
fn request_body() -> impl Strategy<Value = (Vec<(String, Value)>, Option<String>, Option<bool>)> {
    (
        prop::collection::vec(
            (
                json_string().prop_filter("not a routing field", |k| k != "model" && k != "stream"),
                json_value(),
            ),
            0..5,
        ),
        prop::collection::vec(json_value(), 0..3),
        prop::option::of(json_string()),
        prop::option::of(any::<bool>()),
    )
        .prop_map(|(mut fields, nested, model, stream)| {
            let messages: Vec<Value> = nested
                .into_iter()
                .map(|content| json!({"role": "user", "model": "nested", "content": content}))
                .collect();
            fields.retain(|(k, _)| k != "messages");
            fields.push(("messages".to_owned(), Value::Array(messages)));
            (fields, model, stream)
        })
}

/// Writes JSON text with random whitespace and random (valid) escapes, so the rewrite sees
/// spellings other than serde_json's own.
fn write_json(value: &Value, rng: &mut XorShift, out: &mut String) {
    let space = |rng: &mut XorShift, out: &mut String| {
        for _ in 0..rng.below(3) {
            out.push([' ', '\n', '\t', '\r'][rng.below(4) as usize]);
        }
    };
    match value {
        Value::String(s) => write_json_string(s, rng, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                space(rng, out);
                write_json(item, rng, out);
                space(rng, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                space(rng, out);
                write_json_string(key, rng, out);
                space(rng, out);
                out.push(':');
                space(rng, out);
                write_json(item, rng, out);
                space(rng, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn write_json_string(s: &str, rng: &mut XorShift, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        let must = c == '"' || c == '\\' || (c as u32) < 0x20;
        if must || rng.below(5) == 0 {
            match rng.below(3) {
                0 if c == '/' => out.push_str("\\/"),
                0 if c == '"' => out.push_str("\\\""),
                0 if c == '\\' => out.push_str("\\\\"),
                0 if c == '\n' => out.push_str("\\n"),
                _ => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out.push('"');
}

fn render_body(
    fields: &[(String, Value)],
    model: Option<&str>,
    stream: Option<bool>,
    model_at: usize,
    seed: u64,
) -> String {
    let mut rng = XorShift::new(seed);
    let mut entries: Vec<(String, Value)> = fields.to_vec();
    if let Some(stream) = stream {
        entries.insert(0, ("stream".to_owned(), Value::Bool(stream)));
    }
    if let Some(model) = model {
        let at = model_at % (entries.len() + 1);
        entries.insert(at, ("model".to_owned(), Value::String(model.to_owned())));
    }
    let mut out = String::new();
    for _ in 0..rng.below(2) {
        out.push(' ');
    }
    out.push('{');
    for (i, (key, value)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if rng.below(2) == 0 {
            out.push('\n');
        }
        write_json_string(key, &mut rng, &mut out);
        out.push_str([":", " : ", ":\t"][rng.below(3) as usize]);
        write_json(value, &mut rng, &mut out);
    }
    out.push('}');
    out
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn model_rewrite_changes_only_the_model(
        (fields, model, stream) in request_body(),
        new_model in json_string(),
        model_at in any::<usize>(),
        seed in any::<u64>(),
    ) {
        let text = render_body(&fields, model.as_deref(), stream, model_at, seed);
        let original: Value = serde_json::from_str(&text).unwrap();
        let body = JsonBody::parse(Bytes::from(text.clone()));
        prop_assert!(body.is_ok(), "{:?}: {:?}", text, body);
        let body = body.unwrap();
        prop_assert_eq!(body.model(), model.as_deref());
        prop_assert_eq!(body.stream, stream.unwrap_or(false));
        let out = body.with_model(&new_model);
        let rewritten: Value = serde_json::from_slice(&out).unwrap();
        let mut expected = original.clone();
        match &body.model {
            None => {
                prop_assert_eq!(&out[..], text.as_bytes());
            }
            Some((_, range)) => {
                // The range is exactly the model's JSON string, however it was escaped.
                let spelled: String = serde_json::from_str(&text[range.clone()]).unwrap();
                prop_assert_eq!(Some(spelled.as_str()), model.as_deref());
                expected["model"] = Value::String(new_model.clone());
                let suffix = text.len() - range.end;
                prop_assert_eq!(&out[..range.start], &text.as_bytes()[..range.start]);
                prop_assert_eq!(&out[out.len() - suffix..], &text.as_bytes()[range.end..]);
                let middle: String =
                    serde_json::from_slice(&out[range.start..out.len() - suffix]).unwrap();
                prop_assert_eq!(middle, new_model.clone());
            }
        }
        prop_assert_eq!(&rewritten, &expected);
        // Nested `model` keys are untouched.
        prop_assert_eq!(&rewritten["messages"], &original["messages"]);
        // The rewritten body reads back with the new model.
        let again = JsonBody::parse(out).unwrap();
        prop_assert_eq!(again.model(), model.as_ref().map(|_| new_model.as_str()));
    }

    #[test]
    fn body_parse_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(body) = JsonBody::parse(Bytes::from(bytes.clone())) {
            if let Some((model, range)) = &body.model {
                let spelled: String = serde_json::from_slice(&bytes[range.clone()]).unwrap();
                prop_assert_eq!(&spelled, model);
            }
            let _ = body.with_model("x");
        }
    }

    #[test]
    fn body_parse_never_panics_on_json_ish_bytes(
        text in "[{}\\[\\]\",:0-9a-z \\\\\u{e9}]{0,64}",
        prefix in prop::sample::select(vec!["", "{\"model\":", "{\"stream\":", "{\"model\":\"a\","]),
    ) {
        let bytes = Bytes::from(format!("{prefix}{text}"));
        if let Ok(body) = JsonBody::parse(bytes) {
            let out = body.with_model("openai/gpt-4o");
            prop_assert!(serde_json::from_slice::<Value>(&out).is_ok());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Path mapping
// ---------------------------------------------------------------------------------------------

const BASES: &[&str] = &[
    "https://openrouter.ai/api/v1",
    "https://openrouter.ai/api/v1/",
    "http://127.0.0.1:9",
    "http://127.0.0.1:9/",
    "http://[::1]:8080/x/y",
    "https://h.example:443/a",
];

fn path_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "/", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "%252e", "%25", "%",
            "%c0%ae", "\\", ";", "~", "a", "chat", "completions", "%00", "%20", "%3f", "é",
            " ", "//",
        ])
        .prop_map(str::to_owned),
        // A path as the proxy sees it never holds `?` or `#`: the URI parser splits them off.
        // `check_path_alone_keeps_joined_paths_under_the_base` covers them.
        1 => "[ -\x22\x24-\x3e@-~]{1,4}",
    ]
}

/// One level of percent-decoding, bytewise; malformed escapes stay as they are.
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(value) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(value);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

fn check_join(base_text: &str, rest: &str, query: Option<&str>) -> Result<(), TestCaseError> {
    if !check_path(rest) {
        return Ok(());
    }
    let base: http::Uri = base_text.parse().unwrap();
    let prefix = base.path().trim_end_matches('/');
    let Ok(uri) = BaseUrl::parse(base_text).unwrap().join(rest, query) else {
        // The proxy answers 400 when the path is not a valid URI path.
        return Ok(());
    };
    prop_assert_eq!(uri.scheme(), base.scheme());
    prop_assert_eq!(uri.authority(), base.authority());
    let path = uri.path();
    prop_assert!(path.starts_with(prefix), "{} not under {}", path, prefix);
    let below = &path[prefix.len()..];
    // Under the base path as a directory, not a sibling with the same prefix.
    prop_assert!(
        below.is_empty() || below.starts_with('/'),
        "{} escapes {}",
        path,
        prefix
    );
    let decoded = percent_decode(below);
    for segment in decoded.split(|&b| b == b'/' || b == b'\\') {
        prop_assert!(
            segment != b".." && segment != b".",
            "{:?} has a dot segment after decoding ({:?})",
            path,
            String::from_utf8_lossy(&decoded)
        );
    }
    prop_assert_eq!(uri.query(), query);
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn joined_paths_stay_under_the_base(
        base in prop::sample::select(BASES),
        pieces in prop::collection::vec(path_piece(), 0..10),
        query in prop::option::of("[a-z0-9=&%./]{0,12}"),
    ) {
        // The proxy hands over what follows `/v1`: empty or starting with `/`.
        let rest = format!("/{}", pieces.concat());
        check_join(base, &rest, query.as_deref())?;
        check_join(base, "", query.as_deref())?;
    }

    #[test]
    fn check_path_never_admits_dot_segments(rest in "(/|\\.|%2[eEfF]|%5[cC]|\\\\|[a-z%])*") {
        if check_path(&rest) {
            let decoded = percent_decode(&rest);
            for segment in decoded.split(|&b| b == b'/' || b == b'\\') {
                prop_assert!(segment != b".." && segment != b".", "{:?}", rest);
            }
        }
    }

    #[test]
    fn join_never_panics(base in prop::sample::select(BASES), rest in any::<String>(), query in prop::option::of(any::<String>())) {
        let _ = BaseUrl::parse(base).unwrap().join(&rest, query.as_deref());
        let _ = check_path(&rest);
    }
}

/// The boundary `feed` returns must be the end of an event. When a chunk ends between the `\r`
/// and the `\n` of a line that is neither blank, data nor a comment (`event:`, `id:`), the next
/// chunk reports a boundary at offset 1 although the event is not over: a resumable relay would
/// then hand out half an event as a whole one.
#[test]
fn sse_boundary_inside_an_event_after_a_split_crlf() {
    let stream = b"event: message\r\ndata: {\"choices\":[]}\n\n";
    let split = stream.iter().position(|&b| b == b'\n').unwrap();
    let mut scanner = Scanner::new(false);
    assert_eq!(scanner.feed(&stream[..split], |_| {}), None);
    let rest = &stream[split..split + 5];
    assert_eq!(
        scanner.feed(rest, |_| {}),
        None,
        "{:?} ends nothing",
        String::from_utf8_lossy(rest)
    );
    // `at_boundary` has the same blind spot without any split.
    let mut scanner = Scanner::new(false);
    scanner.feed(b"id: 7\n", |_| {});
    assert!(
        !scanner.at_boundary(),
        "an event with only an id line so far is not finished"
    );
}

/// An empty chunk between the `\r` and the `\n` of one line break must not turn the `\n` into a
/// line of its own (an HTTP/2 upstream may send empty DATA frames): here it ends the event after
/// `x` and splits one event into two.
#[test]
fn sse_an_empty_chunk_between_cr_and_lf() {
    let mut whole = Vec::new();
    Scanner::new(true).feed(b"data: x\r\ndata: y\n\n", |e| whole.push(e));
    let mut split = Vec::new();
    let mut scanner = Scanner::new(true);
    for chunk in [&b"data: x\r"[..], b"", b"\ndata: y\n\n"] {
        scanner.feed(chunk, |e| split.push(e));
    }
    assert_eq!(whole, vec![Event::Content]);
    assert_eq!(split, whole);
}

/// `check_path` promises to reject every path that could leave `base_url`, but it looks only at
/// `/`-separated segments of the text it is given, while `join` parses the result again: a `?`
/// or `#` after a dot segment hides it from the check and lets it through to the URI path.
#[test]
fn check_path_alone_keeps_joined_paths_under_the_base() {
    let base = BaseUrl::parse("https://openrouter.ai/api/v1").unwrap();
    for rest in ["/..?", "/a/..#x", "/..?/x"] {
        if check_path(rest) {
            let uri = base.join(rest, None);
            let escaped = uri
                .as_ref()
                .is_ok_and(|uri| uri.path().split('/').any(|s| s == ".."));
            assert!(!escaped, "{rest:?} passed check_path and joined to {uri:?}");
        }
    }
}
