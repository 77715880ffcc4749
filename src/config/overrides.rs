//! Environment overrides of configuration keys (`DUALSYNC_<PATH>`, see the module above).

use super::ENV_PREFIX;

/// Why a `DUALSYNC_<PATH>` variable cannot set the key it names.
#[derive(Debug, thiserror::Error)]
pub(super) enum OverrideError {
    #[error("empty path segment")]
    EmptySegment,
    #[error("`{0}` is not a table in the file")]
    NotATable(String),
}

/// Sets the key a `DUALSYNC_<PATH>` variable names; returns its dotted path (`kafka.brokers`),
/// or `None` for a variable that is not an override (no `__`, or another prefix).
pub(super) fn apply_env_override(
    doc: &mut toml::Table,
    name: &str,
    value: &str,
) -> Result<Option<String>, OverrideError> {
    let Some(path) = name.strip_prefix(ENV_PREFIX) else {
        return Ok(None);
    };
    if !path.contains("__") {
        return Ok(None);
    }
    let mut parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(OverrideError::EmptySegment);
    }
    let is_property = parts.len() == 3 && parts[0] == "kafka" && parts[1] == "properties";
    if is_property {
        parts[2] = parts[2].replace('_', ".");
    }
    let (last, parents) = parts.split_last().expect("non-empty");
    let mut table = doc;
    for part in parents {
        let entry = table
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| OverrideError::NotATable(part.clone()))?;
    }
    let parsed = match table.get(last.as_str()) {
        _ if is_property => toml::Value::String(value.to_string()),
        // A list in the file is overridden by a comma-separated variable.
        Some(toml::Value::Array(_)) => toml::Value::Array(
            value
                .split(',')
                .map(|v| toml::Value::String(v.trim().to_string()))
                .collect(),
        ),
        _ => parse_env_value(value),
    };
    table.insert(last.clone(), parsed);
    Ok(Some(parts.join(".")))
}

fn parse_env_value(value: &str) -> toml::Value {
    if let Ok(i) = value.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(b) = value.parse::<bool>() {
        return toml::Value::Boolean(b);
    }
    if let Ok(f) = value.parse::<f64>() {
        if value.contains('.') {
            return toml::Value::Float(f);
        }
    }
    toml::Value::String(value.to_string())
}

/// A key serde refused (unknown, missing, wrong type), named by its dotted path, and by the
/// variable that set it when an override did: a stray `DUALSYNC_KAFKA__BOGUS` is reported as
/// `kafka.bogus (set by $DUALSYNC_KAFKA__BOGUS)`, not as a problem of the file. `file_doc` is
/// the file before the overrides.
pub(super) fn structure_error(
    file: &std::path::Path,
    error: &serde_path_to_error::Error<toml::de::Error>,
    file_doc: &toml::Table,
    overridden: &[(String, String)],
) -> super::ConfigError {
    let at = error.path().to_string();
    let at = if at == "." { String::new() } else { at };
    // toml adds an "in `table`" line; the path says it better.
    let inner = error.inner().to_string();
    let problem = inner.lines().next().unwrap_or_default().trim().to_string();
    // A missing field's name is in serde's message, and so is an unknown one's inside a
    // sink or source (a tagged table): there the path ends at the table holding it.
    let field = |prefix: &str| {
        problem
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('`').next())
    };
    let missing = field("missing field `");
    let named = missing.or(field("unknown field `"));
    let key = match named {
        Some(f) if at.is_empty() => f.to_string(),
        Some(f) if at.rsplit('.').next() != Some(f) => format!("{at}.{f}"),
        _ => at.clone(),
    };
    let set_by = |wanted: &dyn Fn(&str) -> bool| {
        overridden
            .iter()
            .rev()
            .find(|(set, _)| wanted(set))
            .map(|(_, var)| var.clone())
    };
    let under = |set: &str, table: &str| set.starts_with(&format!("{table}."));
    let by = if missing.is_some() {
        // Only a table the variables made up lacks a field by their fault.
        (!at.is_empty() && !has_path(file_doc, &at))
            .then(|| set_by(&|set| under(set, &at)))
            .flatten()
    } else {
        set_by(&|set| set == key || under(set, &key))
    };
    let key = match (key.is_empty(), by) {
        (true, _) => "(structure)".to_string(),
        (false, Some(var)) => format!("{key} (set by ${var})"),
        (false, None) => key,
    };
    super::ConfigError::new(file, key, problem)
}

fn has_path(doc: &toml::Table, dotted: &str) -> bool {
    let mut table = doc;
    let mut parts = dotted.split('.').peekable();
    while let Some(part) = parts.next() {
        match table.get(part) {
            Some(toml::Value::Table(t)) => table = t,
            Some(_) => return parts.peek().is_none(),
            None => return false,
        }
    }
    true
}
