//! Configuration loading shared by the role subcommands: a TOML file (optional) whose keys are
//! the role's config fields, then flags and `UMBRA_*` variables on top. Unknown keys and bad
//! values fail at start, naming the field.

use std::path::Path;

use anyhow::Context;
use serde::de::DeserializeOwned;

/// Reads `path` as the role's config, or the defaults when no file is given.
pub(crate) fn file_or_default<T: DeserializeOwned + Default>(path: Option<&Path>) -> anyhow::Result<T> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {}", path.display(), e.message().trim()).context(field_hint(&e)))
}

fn field_hint(e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => format!("invalid configuration (at bytes {}..{})", span.start, span.end),
        None => "invalid configuration".into(),
    }
}

/// Parses a duration like `30s`, `5m`, `24h`, `7d` or a number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?} (try 30s, 5m, 24h, 7d)"))?;
    n.checked_mul(mult)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
