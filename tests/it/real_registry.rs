//! The real schema registry started by `make up` (Apicurio Registry, Confluent-compatible API;
//! scripts/registry.sh), at `DUALSYNC_TEST_REGISTRY_URL`. Tests keep to their own subjects:
//! every topic, hence every TopicNameStrategy subject, carries a unique prefix.
//!
//! What the tests assert is read back with plain HTTP calls of the documented Confluent API,
//! not with dualsync's client.

use serde_json::{json, Value};

pub struct RealRegistry {
    pub url: String,
    http: reqwest::Client,
}

const MEDIA_TYPE: &str = "application/vnd.schemaregistry.v1+json";

impl RealRegistry {
    pub fn from_env() -> Self {
        let url = std::env::var("DUALSYNC_TEST_REGISTRY_URL").unwrap_or_else(|_| {
            panic!("DUALSYNC_TEST_REGISTRY_URL is not set: run the tests with `make test`, or `make up && source .local/env`")
        });
        Self {
            url: url.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .header("Accept", MEDIA_TYPE)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {}{path}: {e}", self.url));
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Every subject whose name starts with `prefix`, sorted.
    pub async fn subjects(&self, prefix: &str) -> Vec<String> {
        let (status, body) = self.get("/subjects").await;
        assert_eq!(status, 200, "GET /subjects: {body}");
        let mut subjects: Vec<String> = body
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s.as_str())
            .filter(|s| s.starts_with(prefix))
            .map(str::to_string)
            .collect();
        subjects.sort();
        subjects
    }

    /// The schema ids of `subject`'s versions, oldest first (empty for no such subject).
    pub async fn versions(&self, subject: &str) -> Vec<u32> {
        let (status, body) = self.get(&format!("/subjects/{subject}/versions")).await;
        if status == 404 {
            return Vec::new();
        }
        assert_eq!(status, 200, "versions of {subject}: {body}");
        let mut numbers: Vec<u64> = body
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        numbers.sort_unstable();
        let mut ids = Vec::new();
        for n in numbers {
            let (status, body) = self.get(&format!("/subjects/{subject}/versions/{n}")).await;
            assert_eq!(status, 200, "version {n} of {subject}: {body}");
            ids.push(body["id"].as_u64().unwrap() as u32);
        }
        ids
    }

    /// The schema text with id `id`.
    pub async fn schema(&self, id: u32) -> Value {
        let (status, body) = self.get(&format!("/schemas/ids/{id}")).await;
        assert_eq!(status, 200, "schema {id}: {body}");
        serde_json::from_str(body["schema"].as_str().unwrap()).unwrap()
    }

    /// Registers as another team's producer would; the id, or the registry's error answer.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, (u16, Value)> {
        let response = self
            .http
            .post(format!("{}/subjects/{subject}/versions", self.url))
            .header("Content-Type", MEDIA_TYPE)
            .header("Accept", MEDIA_TYPE)
            .body(json!({ "schema": schema }).to_string())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        match status {
            200 => Ok(body["id"].as_u64().unwrap() as u32),
            _ => Err((status, body)),
        }
    }
}
