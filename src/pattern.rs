//! Exact and glob patterns (`*` any run of characters, `?` one character), for matching model
//! names, paths and header values in routes and token permissions.

/// An exact string or a glob with `*` (any run of characters, `/` included) and `?` (one character).
#[derive(Debug)]
pub enum Pattern {
    Exact(String),
    /// The pattern as characters, and as bytes when it is ASCII (the usual case, matched
    /// without allocating).
    Glob(Vec<char>, Option<Vec<u8>>),
}

impl Pattern {
    pub fn new(text: &str) -> Pattern {
        if text.contains(['*', '?']) {
            Pattern::Glob(
                text.chars().collect(),
                text.is_ascii().then(|| text.as_bytes().to_vec()),
            )
        } else {
            Pattern::Exact(text.to_owned())
        }
    }

    pub fn matches(&self, text: &str) -> bool {
        match self {
            Pattern::Exact(exact) => exact == text,
            Pattern::Glob(_, Some(ascii)) if text.is_ascii() => {
                glob_matches(ascii, text.as_bytes(), b'*', b'?')
            }
            Pattern::Glob(glob, _) => {
                let text: Vec<char> = text.chars().collect();
                glob_matches(glob, &text, '*', '?')
            }
        }
    }
}

/// Linear-time wildcard matching: on a mismatch, retry from just after the last `*`.
fn glob_matches<T: Copy + PartialEq>(glob: &[T], text: &[T], any_run: T, any_one: T) -> bool {
    let (mut g, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match glob.get(g) {
            Some(&c) if c == any_run => {
                star = Some((g, t));
                g += 1;
            }
            Some(&c) if c == any_one || c == text[t] => {
                g += 1;
                t += 1;
            }
            _ => match star {
                Some((star_g, star_t)) => {
                    g = star_g + 1;
                    t = star_t + 1;
                    star = Some((star_g, star_t + 1));
                }
                None => return false,
            },
        }
    }
    glob[g..].iter().all(|&c| c == any_run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let glob = |g: &str, t: &str| Pattern::new(g).matches(t);
        assert!(glob("openai/*", "openai/gpt-4o"));
        assert!(glob("*", ""));
        assert!(glob("*mini", "openai/gpt-4o-mini"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(glob("gpt-?o", "gpt-4o"));
        assert!(!glob("openai/*", "anthropic/claude"));
        assert!(!glob("a*b", "a"));
        assert!(!glob("gpt-?o", "gpt-40o"));
        // `?` is one character, also outside ASCII.
        assert!(glob("modèle-?", "modèle-é"));
        assert!(glob("m?del", "mèdel"));
        assert!(!glob("m?del", "mdel"));
    }
}
