//! `FakeRegistry`: an in-process HTTP server that follows the documented Confluent Schema
//! Registry REST API (docs.confluent.io/platform/current/schema-registry/develop/api.html) for
//! exactly the calls dualsync makes: register, look up, fetch by id, check compatibility.
//! Compatibility is BACKWARD (the registry's default), decided by apache-avro's checker; error
//! bodies carry the documented `error_code`s (40401 subject not found, 40403 schema not found,
//! 409 incompatible, 42201 invalid schema). It is a stand-in, kept only for faults the real
//! registry of the tests (Apicurio, started by `make up`) does not produce on demand: 503s
//! for a while (`fail_next`) and refused credentials (the local Apicurio has no
//! authentication). Every other registry test runs against the real one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Value};

#[derive(Default)]
struct Registry {
    /// Schema text by global id (id = index + 1).
    schemas: Vec<String>,
    /// Each subject's versions, as global ids.
    subjects: BTreeMap<String, Vec<u32>>,
    /// The next this-many requests are answered 503, as a registry whose leader is away.
    fail_next: usize,
    failures_served: usize,
}

struct Shared {
    registry: Mutex<Registry>,
    /// The expected `Authorization` header, when basic auth is on.
    authorization: Option<String>,
}

pub struct FakeRegistry {
    pub url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeRegistry {
    /// Starts on an ephemeral port of 127.0.0.1; with `credentials`, every request needs them.
    pub async fn start(credentials: Option<(&str, &str)>) -> Self {
        let shared = Arc::new(Shared {
            registry: Mutex::new(Registry::default()),
            authorization: credentials.map(|(user, password)| {
                let token =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                format!("Basic {token}")
            }),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url,
            shared,
            server,
        }
    }

    /// Answers the next `n` requests with 503.
    pub fn fail_next(&self, n: usize) {
        self.shared.registry.lock().unwrap().fail_next = n;
    }

    pub fn failures_served(&self) -> usize {
        self.shared.registry.lock().unwrap().failures_served
    }

    /// The global ids registered under `subject`, oldest version first.
    pub fn versions(&self, subject: &str) -> Vec<u32> {
        let registry = self.shared.registry.lock().unwrap();
        registry.subjects.get(subject).cloned().unwrap_or_default()
    }

    pub fn subjects(&self) -> Vec<String> {
        let registry = self.shared.registry.lock().unwrap();
        registry.subjects.keys().cloned().collect()
    }
}

fn reply(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            "application/vnd.schemaregistry.v1+json",
        )],
        body.to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, code: u32, message: &str) -> (StatusCode, Value) {
    (status, json!({ "error_code": code, "message": message }))
}

fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&segment[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut registry = shared.registry.lock().unwrap();
    if registry.fail_next > 0 {
        registry.fail_next -= 1;
        registry.failures_served += 1;
        let (s, b) = error(
            StatusCode::SERVICE_UNAVAILABLE,
            50003,
            "Error while forwarding the request to the leader",
        );
        return reply(s, b);
    }
    if let Some(expected) = &shared.authorization {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if given != Some(expected.as_str()) {
            let (s, b) = error(StatusCode::UNAUTHORIZED, 401, "Unauthorized");
            return reply(s, b);
        }
    }
    let segments: Vec<String> = uri
        .path()
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let schema_in_body = || -> Result<String, (StatusCode, Value)> {
        serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["schema"].as_str().map(str::to_string))
            .ok_or_else(|| error(StatusCode::UNPROCESSABLE_ENTITY, 42201, "Invalid schema"))
    };
    let answer = match (method, segments.as_slice()) {
        (Method::POST, ["subjects", subject, "versions"]) => schema_in_body()
            .and_then(|s| registry.register(subject, &s))
            .map(|id| json!({ "id": id })),
        (Method::POST, ["subjects", subject]) => {
            schema_in_body().and_then(|s| registry.lookup(subject, &s))
        }
        (Method::GET, ["schemas", "ids", id]) => id
            .parse::<usize>()
            .ok()
            .and_then(|id| registry.schemas.get(id.wrapping_sub(1)))
            .map(|s| json!({ "schema": s }))
            .ok_or_else(|| error(StatusCode::NOT_FOUND, 40403, "Schema not found")),
        (Method::POST, ["compatibility", "subjects", subject, "versions", "latest"]) => {
            schema_in_body().and_then(|s| registry.check(subject, &s))
        }
        _ => Err(error(StatusCode::NOT_FOUND, 404, "HTTP 404 Not Found")),
    };
    match answer {
        Ok(body) => reply(StatusCode::OK, body),
        Err((status, body)) => reply(status, body),
    }
}

impl Registry {
    fn parse(schema: &str) -> Result<Schema, (StatusCode, Value)> {
        Schema::parse_str(schema).map_err(|e| {
            error(
                StatusCode::UNPROCESSABLE_ENTITY,
                42201,
                &format!("Invalid schema: {e}"),
            )
        })
    }

    fn canonical(schema: &str) -> Option<String> {
        Schema::parse_str(schema).ok().map(|s| s.canonical_form())
    }

    fn id_of(&self, schema: &str) -> Option<u32> {
        let canonical = Self::canonical(schema)?;
        self.schemas
            .iter()
            .position(|s| Self::canonical(s).as_deref() == Some(canonical.as_str()))
            .map(|i| i as u32 + 1)
    }

    fn latest(&self, subject: &str) -> Option<Schema> {
        let id = *self.subjects.get(subject)?.last()?;
        Schema::parse_str(&self.schemas[id as usize - 1]).ok()
    }

    fn register(&mut self, subject: &str, schema: &str) -> Result<u32, (StatusCode, Value)> {
        let parsed = Self::parse(schema)?;
        let existing = self.id_of(schema);
        if let (Some(id), Some(versions)) = (existing, self.subjects.get(subject)) {
            if versions.contains(&id) {
                return Ok(id);
            }
        }
        if let Some(latest) = self.latest(subject) {
            if let Err(e) = SchemaCompatibility::can_read(&latest, &parsed) {
                return Err(error(
                    StatusCode::CONFLICT,
                    409,
                    &format!("Schema being registered is incompatible with an earlier schema for subject \"{subject}\": {e}"),
                ));
            }
        }
        let id = existing.unwrap_or_else(|| {
            self.schemas.push(schema.to_string());
            self.schemas.len() as u32
        });
        self.subjects
            .entry(subject.to_string())
            .or_default()
            .push(id);
        Ok(id)
    }

    fn lookup(&self, subject: &str, schema: &str) -> Result<Value, (StatusCode, Value)> {
        Self::parse(schema)?;
        let versions = self
            .subjects
            .get(subject)
            .ok_or_else(|| error(StatusCode::NOT_FOUND, 40401, "Subject not found"))?;
        let id = self.id_of(schema);
        let version = versions
            .iter()
            .position(|v| Some(*v) == id)
            .ok_or_else(|| error(StatusCode::NOT_FOUND, 40403, "Schema not found"))?;
        Ok(json!({
            "subject": subject,
            "id": id,
            "version": version + 1,
            "schema": self.schemas[id.unwrap() as usize - 1],
        }))
    }

    fn check(&self, subject: &str, schema: &str) -> Result<Value, (StatusCode, Value)> {
        let parsed = Self::parse(schema)?;
        let latest = self
            .latest(subject)
            .ok_or_else(|| error(StatusCode::NOT_FOUND, 40401, "Subject not found"))?;
        Ok(match SchemaCompatibility::can_read(&latest, &parsed) {
            Ok(()) => json!({ "is_compatible": true }),
            Err(e) => json!({ "is_compatible": false, "messages": [e.to_string()] }),
        })
    }
}
