//! Config errors: which file, line, column and key, and why, never the value (a header line may
//! hold a secret, and errors reach the log and the admin port).

use std::fmt;
use std::path::PathBuf;

/// A place in the config: `routes[2].fallbacks`, `upstream.headers."x-title"`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyPath(Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

impl KeyPath {
    /// A dotted path of plain keys, e.g. `"server.max_body_bytes"`.
    pub fn new(dotted: &str) -> KeyPath {
        KeyPath(
            dotted
                .split('.')
                .map(|key| Segment::Key(key.to_owned()))
                .collect(),
        )
    }

    pub fn key(mut self, key: &str) -> KeyPath {
        self.0.push(Segment::Key(key.to_owned()));
        self
    }

    pub fn index(mut self, index: usize) -> KeyPath {
        self.0.push(Segment::Index(index));
        self
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !key.is_empty()
                        && key
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                    if bare {
                        f.write_str(key)?;
                    } else {
                        write!(f, "\"{}\"", key.escape_default())?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// A failed check of a parsed config: the key, and why (the reason never quotes a value that may
/// be secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: KeyPath,
    pub reason: String,
}

impl Invalid {
    pub fn new(key: KeyPath, reason: impl Into<String>) -> Invalid {
        Invalid {
            key,
            reason: reason.into(),
        }
    }

    /// The first of `durations` (keys of the table `table`) that is zero, as an error.
    pub fn if_zero(table: &str, durations: &[(&str, std::time::Duration)]) -> Result<(), Invalid> {
        match durations.iter().find(|(_, value)| value.is_zero()) {
            Some((key, _)) => Err(Invalid::new(
                KeyPath::new(table).key(key),
                "must be longer than 0s",
            )),
            None => Ok(()),
        }
    }
}

/// A config that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Empty for config text that came from no file.
    pub file: PathBuf,
    /// 1-based, where known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The key at fault, where known.
    pub key: Option<String>,
    pub reason: String,
}

impl ConfigError {
    /// An error about the file as a whole (unreadable, not UTF-8, empty on reload).
    pub fn file(file: impl Into<PathBuf>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.into(),
            line: None,
            column: None,
            key: None,
            reason: reason.into(),
        }
    }

    /// The same error, said of `file`.
    pub fn in_file(mut self, file: impl Into<PathBuf>) -> ConfigError {
        self.file = file.into();
        self
    }

    /// A validation failure, placed at its key in `text` where the key is written there.
    pub fn invalid(text: &str, invalid: Invalid) -> ConfigError {
        let (line, column) = match locate(text, &invalid.key) {
            Some((line, column)) => (Some(line), Some(column)),
            None => (None, None),
        };
        ConfigError {
            file: PathBuf::new(),
            line,
            column,
            key: (!invalid.key.is_empty()).then(|| invalid.key.to_string()),
            reason: invalid.reason,
        }
    }

    /// A TOML syntax or type error, with quoted values in the parser's message left out.
    pub fn toml(text: &str, error: &toml::de::Error) -> ConfigError {
        let reason = redact(error.message().trim());
        let Some(span) = error.span() else {
            return ConfigError::file(PathBuf::new(), reason);
        };
        let start = span.start.min(text.len());
        let (line, column) = line_column(text, start);
        ConfigError {
            file: PathBuf::new(),
            line: Some(line),
            column: Some(column),
            key: key_at(text, start),
            reason,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.file.as_os_str().is_empty() {
            parts.push(self.file.display().to_string());
        }
        match (self.line, self.column) {
            (Some(line), Some(column)) => parts.push(format!("line {line}, column {column}")),
            (Some(line), None) => parts.push(format!("line {line}")),
            _ => {}
        }
        if let Some(key) = &self.key {
            parts.push(key.clone());
        }
        parts.push(self.reason.clone());
        f.write_str(&parts.join(": "))
    }
}

impl std::error::Error for ConfigError {}

/// 1-based line and column (in characters) of byte offset `at`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// The key written on the line holding byte `at`, under the table that line belongs to: e.g.
/// `upstream.headers.Authorization` for an unterminated string in `[upstream.headers]`.
fn key_at(text: &str, at: usize) -> Option<String> {
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    if line.starts_with('[') {
        return Some(
            line.trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned(),
        );
    }
    let key = line.split('=').next().unwrap_or("").trim();
    let plain = !key.is_empty()
        && line.contains('=')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.\"' ".contains(c));
    match (table, plain) {
        (Some(table), true) => Some(format!("{table}.{key}")),
        (None, true) => Some(key.to_owned()),
        (table, false) => table,
    }
}

/// The parser's message with every double-quoted part (a value, in serde's messages such as
/// `invalid type: string "...", expected u32`) left out; backquoted key names stay.
fn redact(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        match (c, quoted) {
            ('"', false) => {
                quoted = true;
                out.push_str("(value)");
            }
            ('"', true) => quoted = false,
            (_, false) => out.push(c),
            (_, true) => {}
        }
    }
    out
}

/// Where `key` is written in `text`: the line and column of the key itself.
fn locate(text: &str, key: &KeyPath) -> Option<(usize, usize)> {
    use toml::de::{DeTable, DeValue};
    let document = DeTable::parse(text).ok()?;
    let mut table = document.get_ref();
    let mut span = None;
    let mut segments = key.0.iter().peekable();
    while let Some(segment) = segments.next() {
        let Segment::Key(name) = segment else {
            return None;
        };
        let (found_key, value) = table.get_key_value(name.as_str())?;
        span = Some(found_key.span());
        let mut value = value.get_ref();
        if let Some(Segment::Index(index)) = segments.peek() {
            segments.next();
            let item = value.as_array()?.get(*index)?;
            span = Some(item.span());
            value = item.get_ref();
        }
        match value {
            DeValue::Table(inner) => table = inner,
            _ if segments.peek().is_none() => break,
            _ => return None,
        }
    }
    let span = span?;
    Some(line_column(text, span.start.min(text.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_print_as_written() {
        let key = KeyPath::new("routes").index(2).key("fallbacks");
        assert_eq!(key.to_string(), "routes[2].fallbacks");
        let key = KeyPath::new("upstream.headers").key("x title");
        assert_eq!(key.to_string(), "upstream.headers.\"x title\"");
    }

    #[test]
    fn values_are_redacted_from_parser_messages() {
        assert_eq!(
            redact("invalid type: string \"sk-secret\", expected u32"),
            "invalid type: string (value), expected u32"
        );
        assert_eq!(redact("unknown field `lisen`"), "unknown field `lisen`");
    }

    #[test]
    fn keys_are_located() {
        let text = "[server]\nlisten = \"x\"\n\n[[routes]]\nname = \"a\"\n[[routes]]\nname = \"b\"\n  fallbacks = [\"m\"]\n";
        let at = |key: KeyPath| locate(text, &key);
        assert_eq!(at(KeyPath::new("server.listen")), Some((2, 1)));
        assert_eq!(
            at(KeyPath::new("routes").index(1).key("fallbacks")),
            Some((8, 3))
        );
        assert_eq!(at(KeyPath::new("routes").index(1)), Some((6, 1)));
        assert_eq!(at(KeyPath::new("upstream.base_url")), None);
    }
}
