//! Benchmark stage for `make bench`: the relay's encoding alone, no server involved.
//!
//! Turns `COUNT` outbox rows shaped like the sample shop's orders (JSON text, as the relay
//! reads them) into Kafka messages with the relay's own code (`mapping::to_message`: JSON
//! parse, strict validation against `schemas/orders.avsc`, Avro single-object encoding,
//! headers), and prints one JSON line with the rate, so the relay's figures can be read
//! against its CPU cost per event.
//!
//! `cargo run --release --example encode_baseline -- [COUNT]`

use std::sync::Arc;
use std::time::Instant;

use dualsync::codec::SchemaStore;
use dualsync::config::Config;
use dualsync::source::outbox::OutboxRow;
use dualsync::wire::EventCodec;

fn main() -> anyhow::Result<()> {
    let count: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("a number"))
        .unwrap_or(200_000);
    let config = Config::from_toml(
        std::path::Path::new("encode_baseline.toml"),
        "[pipeline]\nname = \"bench\"\n[kafka]\nbrokers = \"127.0.0.1:1\"\n",
        Vec::new(),
    )?;
    let store = Arc::new(SchemaStore::load_dir(std::path::Path::new("schemas"))?);
    let codec = EventCodec::new(store, None);
    let rows: Vec<OutboxRow> = (0..count)
        .map(|i| OutboxRow {
            seq: i as i64 + 1,
            id: uuid::Uuid::new_v4(),
            aggregate_type: "orders".into(),
            aggregate_id: format!("o{}", i % 10_000),
            event_type: "OrderPaid".into(),
            payload: Some(
                serde_json::json!({
                    "id": format!("o{}", i % 10_000),
                    "customer_id": format!("c{}", i % 1_000),
                    "status": "PAID",
                    "total_cents": 1234 + i as i64,
                    "lines": [{"sku": format!("sku-{}", i % 100), "qty": 2}],
                    "note": null,
                })
                .to_string(),
            ),
            traceparent: None,
            created_at_micros: 1_700_000_000_000_000,
            committed_at_micros: 1_700_000_000_000_000,
        })
        .collect();
    let started = Instant::now();
    let mut bytes = 0usize;
    for row in &rows {
        bytes += dualsync::mapping::to_message(&config, &codec, row)?
            .value
            .len();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"events\": {count}, \"seconds\": {secs:.3}, \"events_per_s\": {:.0}, \"us_per_event\": {:.2}, \"value_bytes\": {}}}",
        count as f64 / secs,
        secs * 1e6 / count as f64,
        bytes / count
    );
    Ok(())
}
