//! Environment overrides of configuration keys (`DUALSYNC_<PATH>`, see the module above).

use super::ENV_PREFIX;

pub(super) fn apply_env_override(
    doc: &mut toml::Table,
    name: &str,
    value: &str,
) -> Result<(), String> {
    let Some(path) = name.strip_prefix(ENV_PREFIX) else {
        return Ok(());
    };
    if !path.contains("__") {
        return Ok(());
    }
    let mut parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err("empty path segment".into());
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
            .ok_or_else(|| format!("`{part}` is not a table in the file"))?;
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
    Ok(())
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
