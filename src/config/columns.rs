//! Column mapping for PostgreSQL sinks: an aggregate type written to a table of typed columns
//! instead of the default document table.
//!
//! ```toml
//! [sinks.postgres.tables.customers]
//! table = "customer"          # default: the aggregate type
//! key_column = "customer_id"  # default: "id"
//! columns = [
//!   { name = "name", type = "text" },
//!   { name = "orders", type = "bigint", field = "order_count" },
//!   { name = "city", type = "text", field = "address.city" },
//! ]
//! ```

use serde::Deserialize;

/// Columns dualsync owns in every sink table, next to the key column.
pub const RESERVED_COLUMNS: [&str; 3] = ["version", "deleted", "updated_at"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnTableConfig {
    /// Table name inside the sink's schema; the aggregate type when absent.
    #[serde(default)]
    pub table: Option<String>,
    /// Primary-key column holding the aggregate id.
    #[serde(default = "default_key_column")]
    pub key_column: String,
    pub columns: Vec<ColumnConfig>,
}

fn default_key_column() -> String {
    "id".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub sql_type: ColumnType,
    /// Dotted path into the payload (`address.city`); the column name when absent.
    #[serde(default)]
    pub field: Option<String>,
}

impl ColumnConfig {
    /// The payload path this column is read from.
    pub fn path(&self) -> Vec<String> {
        self.field
            .as_deref()
            .unwrap_or(&self.name)
            .split('.')
            .map(str::to_string)
            .collect()
    }

    pub fn field_name(&self) -> &str {
        self.field.as_deref().unwrap_or(&self.name)
    }
}

/// The column types a payload value can be cast to. A value that does not cast (`"abc"` into
/// `bigint`) is refused by PostgreSQL and dead-lettered, like any rejected record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    Text,
    Bigint,
    Integer,
    #[serde(rename = "double precision")]
    DoublePrecision,
    Numeric,
    Boolean,
    Jsonb,
    Timestamptz,
    Date,
    Uuid,
}

impl ColumnType {
    pub fn sql(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::Bigint => "bigint",
            ColumnType::Integer => "integer",
            ColumnType::DoublePrecision => "double precision",
            ColumnType::Numeric => "numeric",
            ColumnType::Boolean => "boolean",
            ColumnType::Jsonb => "jsonb",
            ColumnType::Timestamptz => "timestamptz",
            ColumnType::Date => "date",
            ColumnType::Uuid => "uuid",
        }
    }
}
