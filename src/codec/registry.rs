//! A client for the calls dualsync makes to a schema registry speaking the Confluent REST API
//! (Confluent Schema Registry, Redpanda's built-in registry, Karapace, Apicurio Registry's
//! `/apis/ccompat/v7`; the integration tests run against Apicurio).
//!
//! Written on `reqwest` rather than taken from `schema_registry_converter`: that crate reports
//! every failure as one error with a `retriable` flag and a text, so "schema id not found"
//! (dead-letter that one message), "unauthorized" (stop) and "registry restarting" (retry)
//! could only be told apart by matching strings, which the pipeline never does. Here each
//! answer keeps its HTTP status and the registry's `error_code`, and [`crate::error::classify`]
//! decides.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::config::{SchemaRegistryConfig, Secret};

/// The media type of the registry's API, sent as both `Accept` and `Content-Type`.
const MEDIA_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// The registry's error codes 404xx: no such subject (40401), version (40402), schema (40403).
const NOT_FOUND_CODES: std::ops::Range<i64> = 40400..40500;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No answer: connection refused or reset, DNS, timeout.
    #[error("schema registry {url} unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    /// An answer other than success, with the registry's own error code when it sent one.
    #[error("schema registry {url} answered HTTP {status}{}: {message}", code.map(|c| format!(" (error code {c})")).unwrap_or_default())]
    Status {
        url: String,
        status: u16,
        code: Option<i64>,
        message: String,
    },
    /// A success status whose body is not what the API documents (a proxy, a wrong URL).
    #[error("schema registry {url} sent an answer that is not the registry API: {reason}")]
    NotRegistry { url: String, reason: String },
    /// Registration refused (HTTP 409): the schema breaks the subject's compatibility level.
    /// `payload` is dualsync's own reason against the latest version, naming the field
    /// (registries stop at the payload union).
    #[error("schema registry {url} refused the schema for subject {subject:?} as incompatible with its registered versions (HTTP 409): {message}{}; compare with `dualsync schema check`", payload.as_ref().map(|p| format!("; against the subject's latest version: {p}")).unwrap_or_default())]
    Incompatible {
        url: String,
        subject: String,
        message: String,
        payload: Option<String>,
    },
}

/// Why the registry client cannot be built from `[schema_registry]`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("schema_registry.password_env: environment variable {0} is not set")]
    PasswordNotSet(String),
    #[error("schema registry client: {0}")]
    Http(reqwest::Error),
}

impl RegistryError {
    /// Whether waiting can fix it: no answer, a server-side failure, or rate limiting.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. } => true,
            RegistryError::Status { status, .. } => *status >= 500 || matches!(status, 408 | 429),
            RegistryError::NotRegistry { .. } | RegistryError::Incompatible { .. } => false,
        }
    }
}

/// What the registry says about a local schema against a subject's latest version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compatibility {
    /// The subject does not exist yet: the first registration will create it.
    NewSubject,
    Compatible,
    /// Not compatible under the subject's compatibility level; the registry's reasons.
    Incompatible(Vec<String>),
}

#[derive(Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    base: String,
    auth: Option<(String, Secret)>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("base", &self.base)
            .field("user", &self.auth.as_ref().map(|(u, _)| u))
            .finish()
    }
}

#[derive(Deserialize)]
struct IdAnswer {
    id: u32,
}

#[derive(Deserialize)]
struct SchemaAnswer {
    schema: String,
    #[serde(default, rename = "schemaType")]
    schema_type: Option<String>,
}

/// Confluent's verbose answer lists `messages`; Apicurio's ccompat API gives one `reason`.
#[derive(Deserialize)]
struct CompatibilityAnswer {
    is_compatible: bool,
    #[serde(default)]
    messages: Vec<String>,
    #[serde(default)]
    reason: Option<String>,
}

impl CompatibilityAnswer {
    fn reasons(self) -> Vec<String> {
        let mut reasons = self.messages;
        reasons.extend(self.reason.filter(|r| !r.is_empty()));
        reasons
    }
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error_code: Option<i64>,
    message: Option<String>,
}

/// A schema as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredSchema {
    /// `AVRO` unless the registry says otherwise (it omits the field for Avro).
    pub schema_type: String,
    pub schema: String,
}

impl RegistryClient {
    /// Builds the client; the password is read from `password_env` now, so a missing variable
    /// stops start-up rather than the first request.
    pub fn new(config: &SchemaRegistryConfig) -> Result<Self, ClientError> {
        let auth = match (&config.username, &config.password_env) {
            (Some(user), Some(var)) => {
                let password =
                    std::env::var(var).map_err(|_| ClientError::PasswordNotSet(var.clone()))?;
                Some((user.clone(), Secret::new(password)))
            }
            _ => None,
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_millis(config.timeout_ms.min(5_000)))
            .build()
            .map_err(ClientError::Http)?;
        Ok(Self {
            http,
            base: config.url.trim_end_matches('/').to_string(),
            auth,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Registers `schema` (Avro JSON text) under `subject`, or finds it when already there;
    /// returns its global id. `POST /subjects/{subject}/versions`.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let url = format!("{}/subjects/{}/versions", self.base, encode(subject));
        let answer: IdAnswer = self
            .call(
                reqwest::Method::POST,
                &url,
                Some(json!({ "schema": schema })),
            )
            .await
            .map_err(|e| match e {
                RegistryError::Status {
                    url,
                    status: 409,
                    message,
                    ..
                } => RegistryError::Incompatible {
                    url,
                    subject: subject.to_string(),
                    message,
                    payload: None,
                },
                e => e,
            })?
            .ok_or_else(|| not_found(&url))?;
        Ok(answer.id)
    }

    /// The id of `schema` under `subject`, or `None` when it is not registered there.
    /// `POST /subjects/{subject}`.
    pub async fn lookup(&self, subject: &str, schema: &str) -> Result<Option<u32>, RegistryError> {
        let url = format!("{}/subjects/{}", self.base, encode(subject));
        let answer: Option<IdAnswer> = self
            .call(
                reqwest::Method::POST,
                &url,
                Some(json!({ "schema": schema })),
            )
            .await?;
        Ok(answer.map(|a| a.id))
    }

    /// The schema with global id `id`, or `None` when the registry has no such id.
    /// `GET /schemas/ids/{id}`.
    pub async fn schema_by_id(&self, id: u32) -> Result<Option<RegisteredSchema>, RegistryError> {
        let url = format!("{}/schemas/ids/{id}", self.base);
        let answer: Option<SchemaAnswer> = self.call(reqwest::Method::GET, &url, None).await?;
        Ok(answer.map(|a| RegisteredSchema {
            schema_type: a.schema_type.unwrap_or_else(|| "AVRO".into()),
            schema: a.schema,
        }))
    }

    /// The latest version registered under `subject`, or `None` when there is no such subject.
    /// `GET /subjects/{subject}/versions/latest`.
    pub async fn latest(&self, subject: &str) -> Result<Option<RegisteredSchema>, RegistryError> {
        let url = format!("{}/subjects/{}/versions/latest", self.base, encode(subject));
        let answer: Option<SchemaAnswer> = self.call(reqwest::Method::GET, &url, None).await?;
        Ok(answer.map(|a| RegisteredSchema {
            schema_type: a.schema_type.unwrap_or_else(|| "AVRO".into()),
            schema: a.schema,
        }))
    }

    /// Whether `schema` may be registered under `subject` given the subject's compatibility
    /// level. `POST /compatibility/subjects/{subject}/versions/latest?verbose=true`.
    pub async fn check(&self, subject: &str, schema: &str) -> Result<Compatibility, RegistryError> {
        let url = format!(
            "{}/compatibility/subjects/{}/versions/latest?verbose=true",
            self.base,
            encode(subject)
        );
        let answer: Option<CompatibilityAnswer> = self
            .call(
                reqwest::Method::POST,
                &url,
                Some(json!({ "schema": schema })),
            )
            .await?;
        Ok(match answer {
            None => Compatibility::NewSubject,
            Some(a) if a.is_compatible => Compatibility::Compatible,
            Some(a) => Compatibility::Incompatible(a.reasons()),
        })
    }

    /// One request; `Ok(None)` for the registry's own "not found". A 404 without a registry
    /// error code is an error: the URL does not point at a registry, and treating that as
    /// "unknown schema" would dead-letter every message.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Option<T>, RegistryError> {
        let mut request = self
            .http
            .request(method, url)
            .header(reqwest::header::ACCEPT, MEDIA_TYPE);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, MEDIA_TYPE)
                .body(body.to_string());
        }
        if let Some((user, password)) = &self.auth {
            request = request.basic_auth(user, Some(password.expose()));
        }
        let response = request
            .send()
            .await
            .map_err(|e| RegistryError::Unreachable {
                url: url.to_string(),
                reason: with_causes(&e),
            })?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| RegistryError::Unreachable {
                url: url.to_string(),
                reason: with_causes(&e),
            })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                RegistryError::NotRegistry {
                    url: url.to_string(),
                    reason: e.to_string(),
                }
            });
        }
        let error: Option<ErrorAnswer> = serde_json::from_slice(&bytes).ok();
        let code = error.as_ref().and_then(|e| e.error_code);
        if status == reqwest::StatusCode::NOT_FOUND
            && code.is_some_and(|c| NOT_FOUND_CODES.contains(&c))
        {
            return Ok(None);
        }
        Err(RegistryError::Status {
            url: url.to_string(),
            status: status.as_u16(),
            code,
            message: error
                .and_then(|e| e.message)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect()),
        })
    }
}

fn not_found(url: &str) -> RegistryError {
    RegistryError::Status {
        url: url.to_string(),
        status: 404,
        code: None,
        message: "not found".into(),
    }
}

/// Percent-encodes a subject for a URL path segment (topic names may hold `.`, `_`, `-` only,
/// but a template could produce anything).
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_path_encoded() {
        assert_eq!(encode("shop.orders-value"), "shop.orders-value");
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn only_waiting_can_fix_transient_errors() {
        let status = |status| RegistryError::Status {
            url: "u".into(),
            status,
            code: None,
            message: String::new(),
        };
        assert!(status(503).is_transient());
        assert!(status(429).is_transient());
        assert!(!status(401).is_transient());
        assert!(!status(409).is_transient());
        let unreachable = RegistryError::Unreachable {
            url: "u".into(),
            reason: "refused".into(),
        };
        assert!(unreachable.is_transient());
    }

    #[test]
    fn compatibility_reasons_come_from_confluent_messages_or_apicurio_reason() {
        let parse = |text: &str| {
            serde_json::from_str::<CompatibilityAnswer>(text)
                .unwrap()
                .reasons()
        };
        assert_eq!(
            parse(r#"{"is_compatible":false,"messages":["a","b"]}"#),
            ["a", "b"]
        );
        assert_eq!(
            parse(r#"{"is_compatible":false,"reason":"tier at /fields/1"}"#),
            ["tier at /fields/1"]
        );
        assert!(parse(r#"{"is_compatible":true,"reason":null}"#).is_empty());
    }
}
