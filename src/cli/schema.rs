//! `dualsync schema list` and `dualsync schema check`.

use std::sync::Arc;

use dualsync::codec::registry::{Compatibility, RegistryClient};
use dualsync::codec::SchemaStore;
use dualsync::config::Config;
use dualsync::wire;
use dualsync::wire::EventCodec;

fn sorted_types(schemas: &SchemaStore) -> Vec<&str> {
    let mut types: Vec<&str> = schemas.aggregate_types().collect();
    types.sort_unstable();
    types
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn list(config: &Config, schemas: &SchemaStore) {
    for t in sorted_types(schemas) {
        let s = schemas.for_type(t).expect("listed");
        println!(
            "{t}\t{}\t{}\t{}",
            hex(&s.fingerprint),
            config.kafka.topic_for(t),
            EventCodec::subject(config, t)
        );
    }
}

/// Checks every local schema against its subject; `Ok(false)` when any is incompatible.
/// Registers nothing.
pub async fn check(config: &Config, schemas: Arc<SchemaStore>, json: bool) -> anyhow::Result<bool> {
    let Some(registry_config) = &config.schema_registry else {
        anyhow::bail!(
            "{}: no [schema_registry] section: values use single-object encoding and there is no registry to check against",
            config.path.display()
        );
    };
    let registry = RegistryClient::new(registry_config)?;
    let mut all_compatible = true;
    let mut results = Vec::new();
    for t in sorted_types(&schemas) {
        let schema = schemas.for_type(t).expect("listed");
        let subject = EventCodec::subject(config, t);
        let registered = registry.lookup(&subject, &schema.registry_json).await?;
        let verdict = match registered {
            Some(_) => Compatibility::Compatible,
            None => match registry.check(&subject, &schema.registry_json).await? {
                // The registry's reasons stop at the payload union; ours names the field.
                Compatibility::Incompatible(mut reasons) => {
                    reasons.extend(
                        wire::payload_breaks(&registry, &subject, schema)
                            .await
                            .map(|p| format!("against the subject's latest version: {p}")),
                    );
                    Compatibility::Incompatible(reasons)
                }
                verdict => verdict,
            },
        };
        // (status for --json, the same for people, the registry's reasons)
        let (status, shown, messages) = match (&verdict, registered) {
            (_, Some(id)) => ("registered", format!("registered (id {id})"), Vec::new()),
            (Compatibility::NewSubject, _) => ("new_subject", "new subject".into(), Vec::new()),
            (Compatibility::Compatible, _) => ("compatible", "compatible".into(), Vec::new()),
            (Compatibility::Incompatible(m), _) => {
                ("incompatible", "INCOMPATIBLE".into(), m.clone())
            }
        };
        all_compatible &= !matches!(verdict, Compatibility::Incompatible(_));
        if !json {
            println!("{t}\t{subject}\t{shown}");
            for m in &messages {
                println!("    {m}");
            }
        }
        results.push(serde_json::json!({
            "aggregate_type": t,
            "subject": subject,
            "status": status,
            "registered_id": registered,
            "compatible": !matches!(verdict, Compatibility::Incompatible(_)),
            "messages": messages,
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(all_compatible)
}
