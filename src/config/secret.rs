//! Secrets in the configuration: a value type that never prints, and redaction of URLs and
//! keys for logs and `/status`.

use std::fmt;

use serde::Deserialize;

/// A value that must never be printed: connection strings with passwords, SASL secrets.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The real value, for handing to a client library. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// Shows a URL without its password (`postgres://user:***@host/db`); anything that is not a URL
/// with credentials is hidden entirely, since it may be a bare secret.
///
/// The user information ends at the *last* `@`: a password typed with an unencoded `/`, `?`
/// or `@` stays inside the hidden part. (Drivers refuse such URLs, and the error that says so
/// must not print them.) An `@` further on, in the path or query, hides more than the
/// password: ambiguous text is hidden, never shown.
pub fn redact_url(value: &str) -> String {
    let Some(scheme_end) = value.find("://") else {
        return "***".to_string();
    };
    let (scheme, rest) = value.split_at(scheme_end + 3);
    match rest.rfind('@') {
        Some(at) if rest[..at].contains(':') => {
            let user = rest[..at].split(':').next().unwrap_or("");
            let tail = redact_query_secrets(&rest[at + 1..]);
            format!("{scheme}{user}:***@{tail}")
        }
        // No password in the user information.
        _ => format!("{scheme}{}", redact_query_secrets(rest)),
    }
}

fn redact_query_secrets(rest: &str) -> String {
    let Some(q) = rest.find('?') else {
        return rest.to_string();
    };
    let params: Vec<String> = rest[q + 1..]
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if is_secret_key(k) => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{}?{}", &rest[..q], params.join("&"))
}

/// Keys whose values are secrets wherever they appear (librdkafka properties, URL parameters).
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "credential",
        "key.pem",
        "keystore",
    ]
    .iter()
    .any(|s| key.contains(s))
}
