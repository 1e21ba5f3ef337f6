//! Configuration loading shared by the role subcommands: a TOML file (optional) whose keys are
//! the role's config fields, then flags and `UMBRA_*` variables on top. Unknown keys and bad
//! values fail at start, naming the field. Also tokens read from files ([`secret_file`]).

use std::path::Path;

use anyhow::Context;
use serde::de::DeserializeOwned;

/// Reads `path` as the role's config, or the defaults when no file is given.
pub(crate) fn file_or_default<T: DeserializeOwned + Default>(
    path: Option<&Path>,
) -> anyhow::Result<T> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!("config file {}: {}", path.display(), e.message().trim())
            .context(field_hint(&text, &e))
    })
}

/// Names the key at fault: toml's message for a bad value ("invalid socket address syntax")
/// does not. Only the key is shown, never the line: a value may be a secret.
fn field_hint(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return "invalid configuration".into();
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line_no = before.matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or_default();
    match line.split_once('=') {
        Some((key, _)) if !key.trim().is_empty() => {
            format!(
                "invalid configuration: key `{}` (line {line_no})",
                key.trim()
            )
        }
        _ => format!("invalid configuration (line {line_no})"),
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
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (try 30s, 5m, 24h, 7d)"))?;
    n.checked_mul(mult)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

/// Reads a secret (a token) from `path`, trimmed; `option` names where the path came from
/// in the error. An empty file is an error: it would otherwise be sent as an empty token.
pub(crate) fn secret_file(path: &Path, option: &str) -> anyhow::Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("{option}: cannot read {}", path.display()))?;
    let t = t.trim();
    if t.is_empty() {
        anyhow::bail!("{option}: {} is empty", path.display());
    }
    Ok(t.to_owned())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn bad_values_name_their_key() {
        #[derive(serde::Deserialize, Default, Debug)]
        #[allow(dead_code)]
        struct C {
            listen: Option<std::net::SocketAddr>,
            ca_key: Option<String>,
        }
        let dir = std::env::temp_dir().join(format!("umbra-load-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(&p, "ca_key = \"s3cret\"\nlisten = \"nowhere\"\n").unwrap();
        let e = format!("{:#}", super::file_or_default::<C>(Some(&p)).unwrap_err());
        assert!(e.contains("key `listen` (line 2)"), "{e}");
        assert!(!e.contains("s3cret") && !e.contains("nowhere"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

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
