//! Loading: the built-in defaults (serde defaults on every section) under the TOML file,
//! under `EDGEBRIDGE_<SECTION>__<KEY>` environment variables; then `${VAR}` and
//! `${file:PATH}` in string values are replaced, and each sink table is read as its own
//! kind first so that errors name the exact key.

use super::*;

/// A file a `${file:PATH}` read, and a digest of what it held (or of why it could not be
/// read): the gateway reloads its config when that changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretFile {
    pub path: PathBuf,
    pub digest: u64,
}

impl SecretFile {
    /// `path` as it is now.
    pub fn read(path: &Path) -> SecretFile {
        SecretFile {
            path: path.to_path_buf(),
            digest: text_digest(&read_secret(path)),
        }
    }
}

fn text_digest(text: &Result<String, String>) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// Reads `path`, the environment overrides and `${VAR}` references into a [`Config`].
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with_env(path, |name| std::env::var(name).ok())
}

/// As [`load`], with the `${VAR}` lookup given (tests use a map).
pub fn load_with_env(
    path: &Path,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    if !path.is_file() {
        return Err(ConfigErrors(vec![ConfigError::new(
            "",
            format!("config file {} not found", path.display()),
        )]));
    }
    let layered = Figment::new().merge(Toml::file(path)).merge(
        Env::prefixed("EDGEBRIDGE_")
            .filter(|key| key.as_str().contains("__"))
            .split("__"),
    );
    let mut dict = match layered.data() {
        Ok(mut data) => data.remove(&Profile::Default).unwrap_or_default(),
        Err(e) => return Err(figment_errors(e)),
    };
    let mut errors = Vec::new();
    let mut secrets = Vec::new();
    interpolate_dict(&mut dict, "", &lookup, &mut errors, &mut secrets);
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    // Every problem in one go: those of each sink table (read as its own kind), then the
    // rest with the sinks at fault set aside.
    let sink_errors = check_sinks(&mut dict);
    let mut config = match extract_all::<Config>(dict) {
        Ok(config) if sink_errors.is_empty() => config,
        Ok(_) => return Err(ConfigErrors(sink_errors)),
        Err(ConfigErrors(mut errors)) => {
            errors.extend(sink_errors);
            // In the file's order of sections (the sinks' come after the others').
            errors.sort_by(|a, b| section(&a.path).cmp(section(&b.path)));
            return Err(ConfigErrors(errors));
        }
    };
    config.secret_files = secrets;
    Ok(config)
}

/// The top-level section of a key path: `sinks` of `sinks.cloud.url`.
fn section(path: &str) -> &str {
    path.split(['.', '[']).next().unwrap_or(path)
}

/// Most problems reported in one go; past that, the rest wait for the next `check`.
const MAX_PROBLEMS: usize = 100;

/// Reads a `T` from `dict`, reporting every problem rather than only the first (serde
/// stops at one): after each, the key at fault is set aside and the rest is read again.
/// A required key set aside is then missing: its table goes too, and is not reported
/// twice.
fn extract_all<T: serde::de::DeserializeOwned>(mut dict: Dict) -> Result<T, ConfigErrors> {
    use figment::error::Kind;
    let mut errors = Vec::new();
    let mut set_aside: Vec<Vec<String>> = Vec::new();
    for _ in 0..MAX_PROBLEMS {
        let error = match Figment::from(Serialized::defaults(dict.clone())).extract::<T>() {
            Ok(value) if errors.is_empty() => return Ok(value),
            Ok(_) => break,
            Err(e) => e,
        };
        let Some(first) = error.into_iter().next() else {
            break;
        };
        let missing = matches!(first.kind, Kind::MissingField(_));
        let key = match &first.kind {
            Kind::MissingField(field) => {
                let mut key = first.path.clone();
                key.push(field.to_string());
                key
            }
            _ => first.path.clone(),
        };
        let echo = set_aside.contains(&key);
        let remove_at = if echo || missing {
            first.path.clone()
        } else {
            key.clone()
        };
        if !echo {
            errors.extend(figment_errors(first).0);
        }
        let Some(removed) = remove_key(&mut dict, &remove_at) else {
            break;
        };
        set_aside.push(key);
        set_aside.push(removed);
    }
    Err(ConfigErrors(errors))
}

/// Removes the value at `path` from `dict`, and says which path went. An element of an
/// array takes the whole array with it (removing one would renumber the others in later
/// key paths).
fn remove_key(dict: &mut Dict, path: &[String]) -> Option<Vec<String>> {
    match path {
        [] => None,
        [key] => dict.remove(key).map(|_| vec![key.clone()]),
        [key, rest @ ..] => {
            let whole_array = rest.len() == 1 && matches!(dict.get(key), Some(Value::Array(..)));
            if whole_array {
                return dict.remove(key).map(|_| vec![key.clone()]);
            }
            let inner = match dict.get_mut(key) {
                Some(Value::Dict(_, inner)) => remove_key(inner, rest),
                Some(Value::Array(_, items)) => {
                    let item = rest[0].parse::<usize>().ok().and_then(|i| items.get_mut(i));
                    match item {
                        Some(Value::Dict(_, inner)) => remove_key(inner, &rest[1..])
                            .map(|below| [vec![rest[0].clone()], below].concat()),
                        _ => None,
                    }
                }
                _ => None,
            };
            inner.map(|below| [vec![key.clone()], below].concat())
        }
    }
}

/// Sinks are an internally tagged enum, and serde loses the key path inside those; so
/// each sink table is first read as its own kind, to name the exact key in errors. The
/// sinks at fault are taken out of `dict`, so that reading the rest does not report them
/// again without their key paths.
fn check_sinks(dict: &mut Dict) -> Vec<ConfigError> {
    let Some(Value::Dict(_, sinks)) = dict.get_mut("sinks") else {
        return Vec::new();
    };
    let mut errors = Vec::new();
    let mut at_fault = Vec::new();
    for (name, sink) in sinks.iter() {
        let Value::Dict(_, table) = sink else {
            continue;
        };
        let mut fields = table.clone();
        let kind = fields.remove("type");
        let result = match kind.as_ref().and_then(Value::as_str) {
            Some("mqtt") => extract_all::<MqttSinkSection>(fields).map(drop),
            Some("http") => extract_all::<HttpSinkSection>(fields).map(drop),
            Some("kafka") => extract_all::<KafkaSinkSection>(fields).map(drop),
            Some("file") => extract_all::<FileSinkSection>(fields).map(drop),
            Some(other) => Err(ConfigErrors(vec![ConfigError::new(
                "type",
                format!("unknown sink type {other:?}; use mqtt, http, kafka or file"),
            )])),
            None => Err(ConfigErrors(vec![ConfigError::new(
                "type",
                "missing (mqtt, http, kafka or file)",
            )])),
        };
        if let Err(ConfigErrors(found)) = result {
            at_fault.push(name.clone());
            for mut e in found {
                e.path = join_path(&format!("sinks.{name}"), &e.path);
                errors.push(e);
            }
        }
    }
    for name in at_fault {
        sinks.remove(&name);
    }
    errors
}

fn figment_errors(error: figment::Error) -> ConfigErrors {
    use figment::error::{Actual, Kind};
    ConfigErrors(
        error
            .into_iter()
            .map(|e| {
                let mut path = render_path(&e.path);
                let message = match &e.kind {
                    Kind::Message(m) => m.clone(),
                    Kind::MissingField(field) => {
                        path = join_path(&path, field);
                        "missing (required)".to_string()
                    }
                    Kind::UnknownVariant(found, expected) => {
                        format!(
                            "unknown value {found:?}; use one of: {}",
                            expected.join(", ")
                        )
                    }
                    Kind::UnknownField(field, expected) => {
                        format!(
                            "unknown key {field:?}; expected one of: {}",
                            expected.join(", ")
                        )
                    }
                    // Name the type only: the value may be a secret from `${VAR}`.
                    Kind::InvalidType(actual, expected) => {
                        let found = match actual {
                            Actual::Str(_) => "a string",
                            Actual::Bool(_) => "a boolean",
                            Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
                            Actual::Float(_) => "a float",
                            Actual::Seq => "an array",
                            Actual::Map => "a table",
                            _ => "another type",
                        };
                        format!("expected {expected}, found {found}")
                    }
                    kind => kind.to_string(),
                };
                ConfigError::new(path, message)
            })
            .collect(),
    )
}

/// `["listeners", "0", "bind"]` → `listeners[0].bind`; only after the keys that hold
/// arrays, since a sink may well be called `0`.
fn render_path(segments: &[String]) -> String {
    const ARRAYS: [&str; 7] = [
        "listeners",
        "rules",
        "to",
        "alpn",
        "downlinks",
        "url",
        "fields",
    ];
    let mut out = String::new();
    let mut previous: Option<&str> = None;
    for segment in segments.iter().filter(|s| !s.is_empty()) {
        let is_index = segment.chars().all(|c| c.is_ascii_digit());
        if is_index && previous.is_some_and(|p| ARRAYS.contains(&p)) {
            out.push_str(&format!("[{segment}]"));
        } else {
            out = join_path(&out, segment);
        }
        previous = Some(segment);
    }
    out
}

fn interpolate_dict(
    dict: &mut Dict,
    prefix: &str,
    lookup: &impl Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
    secrets: &mut Vec<SecretFile>,
) {
    for (key, value) in dict.iter_mut() {
        let path = join_path(prefix, key);
        interpolate_value(value, &path, lookup, errors, secrets);
    }
}

fn interpolate_value(
    value: &mut Value,
    path: &str,
    lookup: &impl Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
    secrets: &mut Vec<SecretFile>,
) {
    match value {
        Value::String(tag, s) if s.contains("${") => match interpolate(s, lookup, secrets) {
            Ok(new) => *value = Value::String(*tag, new),
            Err(msg) => errors.push(ConfigError::new(path, msg)),
        },
        Value::Dict(_, d) => interpolate_dict(d, path, lookup, errors, secrets),
        Value::Array(_, items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_value(item, &format!("{path}[{i}]"), lookup, errors, secrets);
            }
        }
        _ => {}
    }
}

/// Largest file `${file:…}` reads.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Replaces every `${NAME}` in `s` with the environment variable and every `${file:PATH}`
/// with the contents of the file at PATH (a mounted secret; one trailing line break
/// dropped), read again at each load, so a SIGHUP picks up a rotated secret; `$${`
/// escapes a literal `${`. Errors never quote a value. Each file read is added to
/// `secrets` (the gateway reloads when one changes).
fn interpolate(
    s: &str,
    lookup: &impl Fn(&str) -> Option<String>,
    secrets: &mut Vec<SecretFile>,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        if rest[..start].ends_with('$') {
            out.push_str(&rest[..start - 1]);
            out.push_str("${");
            rest = &rest[start + 2..];
            continue;
        }
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("unterminated ${ in value".into());
        };
        let name = &after[..end];
        if let Some(path) = name.strip_prefix("file:") {
            let text = read_secret(Path::new(path));
            if !secrets.iter().any(|f| f.path == Path::new(path)) {
                secrets.push(SecretFile {
                    path: PathBuf::from(path),
                    digest: text_digest(&text),
                });
            }
            let text = text?;
            let text = text.strip_suffix('\n').unwrap_or(&text);
            out.push_str(text.strip_suffix('\r').unwrap_or(text));
            rest = &after[end + 1..];
            continue;
        }
        match lookup(name) {
            Some(v) => out.push_str(&v),
            None => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The contents of a `${file:…}` secret: a regular file of a secret's size, never a
/// device or pipe that would keep the load waiting, never something huge.
fn read_secret(path: &Path) -> Result<String, String> {
    let shown = path.display();
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read the secret file {shown}: {e}"))?;
    if !meta.is_file() || meta.len() > MAX_SECRET_FILE {
        return Err(format!(
            "the secret file {shown} is not a regular file of at most 64 KiB"
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read the secret file {shown}: {e}"))
}

fn join_path(prefix: &str, key: &str) -> String {
    if key.is_empty() {
        prefix.to_string()
    } else if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolate_escapes_and_errors() {
        let env = |k: &str| (k == "A").then(|| "x".to_string());
        let interpolate = |s: &str, env| interpolate(s, env, &mut Vec::new());
        assert_eq!(interpolate("a${A}b", &env).as_deref(), Ok("axb"));
        assert_eq!(interpolate("$${A}", &env).as_deref(), Ok("${A}"));
        assert!(interpolate("${A", &env).is_err());
    }
}
