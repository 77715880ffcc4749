//! The sample shop: a domain whose writes carry their outbox rows in the same transaction, a
//! load generator for it, and a report of what arrived where. Used by `make demo`, the tests
//! and the benchmarks.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio_postgres::Client;

use crate::error::{classify, Disposition, Error};
use crate::retry::{Backoff, Retry, Stopped};

pub const SAMPLE_DOMAIN_DDL: &str = include_str!("../connectors/sample_domain.sql");

/// Creates the outbox and the sample tables (idempotent).
pub async fn setup(client: &Client) -> Result<(), Error> {
    crate::source::outbox::migrate(client).await?;
    client.batch_execute(SAMPLE_DOMAIN_DDL).await?;
    Ok(())
}

/// Writes a customer and its outbox event in one transaction (the pattern applications
/// follow).
pub async fn upsert_customer(client: &mut Client, id: &str, name: &str) -> Result<(), Error> {
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            "INSERT INTO shop.customers (id, name, email) VALUES ($1, $2, $1 || '@example.com')
             ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name
             RETURNING jsonb_build_object('id', id, 'name', name, 'email', email, 'order_count', order_count)",
            &[&id, &name],
        )
        .await?;
    let payload: serde_json::Value = row.get(0);
    tx.execute(
        "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload)
         VALUES ('customers', $1, 'CustomerUpserted', $2)",
        &[&id, &payload],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

const ORDER_JSON: &str =
    "jsonb_build_object('id', id, 'customer_id', customer_id, 'status', status,
    'total_cents', total_cents, 'lines', lines, 'note', note)";

/// One order change in one transaction: create, advance the status, or cancel (delete).
pub async fn change_order(
    client: &mut Client,
    rng: &mut StdRng,
    order_id: &str,
    customer_id: &str,
) -> Result<(), Error> {
    let tx = client.transaction().await?;
    // Lock the order first (the usual pattern); the outbox trigger serialises per aggregate
    // anyway.
    let current: Option<String> = tx
        .query_opt(
            "SELECT status FROM shop.orders WHERE id = $1 FOR UPDATE",
            &[&order_id],
        )
        .await?
        .map(|r| r.get(0));
    match current.as_deref() {
        None => {
            let qty: i32 = rng.gen_range(1..5);
            let lines = json!([{"sku": format!("sku-{}", rng.gen_range(0..100)), "qty": qty}]);
            let total: i64 = i64::from(qty) * rng.gen_range(100..10_000);
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO shop.orders (id, customer_id, status, total_cents, lines)
                         VALUES ($1, $2, 'NEW', $3, $4) RETURNING {ORDER_JSON}"
                    ),
                    &[&order_id, &customer_id, &total, &lines],
                )
                .await?;
            let payload: serde_json::Value = row.get(0);
            insert_order_event(&tx, order_id, "OrderPlaced", Some(payload)).await?;
            // The customer changes in the same transaction, and so does its event.
            let customer = tx
                .query_one(
                    "UPDATE shop.customers SET order_count = order_count + 1 WHERE id = $1
                     RETURNING jsonb_build_object('id', id, 'name', name, 'email', email, 'order_count', order_count)",
                    &[&customer_id],
                )
                .await?;
            let customer: serde_json::Value = customer.get(0);
            tx.execute(
                "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload)
                 VALUES ('customers', $1, 'CustomerOrderCounted', $2)",
                &[&customer_id, &customer],
            )
            .await?;
        }
        Some("SHIPPED") | Some("CANCELLED") => {
            tx.execute("DELETE FROM shop.orders WHERE id = $1", &[&order_id])
                .await?;
            insert_order_event(&tx, order_id, "OrderArchived", None).await?;
        }
        Some(status) => {
            let next = match status {
                "NEW" if rng.gen_bool(0.2) => "CANCELLED",
                "NEW" => "PAID",
                _ => "SHIPPED",
            };
            let row = tx
                .query_one(
                    &format!(
                        "UPDATE shop.orders SET status = $2 WHERE id = $1 RETURNING {ORDER_JSON}"
                    ),
                    &[&order_id, &next],
                )
                .await?;
            let payload: serde_json::Value = row.get(0);
            insert_order_event(
                &tx,
                order_id,
                &format!("Order{}", title(next)),
                Some(payload),
            )
            .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

fn title(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let mut c = lower.chars();
    c.next()
        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}

async fn insert_order_event(
    tx: &tokio_postgres::Transaction<'_>,
    order_id: &str,
    event_type: &str,
    payload: Option<serde_json::Value>,
) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload) VALUES ('orders', $1, $2, $3)",
        &[&order_id, &event_type, &payload],
    )
    .await?;
    Ok(())
}

/// Generates `changes` order changes over `orders` orders and `customers` customers with
/// `writers` concurrent connections. Returns the number of transactions committed.
pub async fn generate(
    url: &str,
    customers: usize,
    orders: usize,
    changes: usize,
    writers: usize,
    seed: u64,
) -> Result<u64, Error> {
    generate_at_rate(url, customers, orders, changes, writers, seed, None).await
}

/// How long a load writer keeps retrying a transient failure before it gives up.
const WRITER_GIVE_UP: Duration = Duration::from_secs(60);

/// A new connection for a load writer; transient refusals (the primary starting or shutting
/// down) are retried until `give_up`, as an application would.
async fn connect_retrying(url: &str, give_up: tokio::time::Instant) -> Result<Client, Error> {
    // Nothing cancels a load writer: it ends by its deadline.
    let never = tokio_util::sync::CancellationToken::new();
    let connected = Retry::new(Backoff::constant(Duration::from_millis(200)), &never)
        .give_up_at(give_up)
        .run(
            || crate::pg::connect(url),
            |e, _| tracing::warn!(error = %e, "load writer retrying its connection"),
        )
        .await;
    match connected {
        Ok(client) => Ok(client),
        Err(Stopped::GaveUp(e) | Stopped::Permanent(e)) => Err(e),
        Err(Stopped::Cancelled) => unreachable!("nothing cancels a load writer"),
    }
}

/// As [`generate`], but at most `rate` order changes per second in total when given.
pub async fn generate_at_rate(
    url: &str,
    customers: usize,
    orders: usize,
    changes: usize,
    writers: usize,
    seed: u64,
    rate: Option<f64>,
) -> Result<u64, Error> {
    let give_up = tokio::time::Instant::now() + WRITER_GIVE_UP;
    let mut client = connect_retrying(url, give_up).await?;
    for c in 0..customers {
        let (id, name) = (format!("c{c}"), format!("Customer {c}"));
        while let Err(e) = upsert_customer(&mut client, &id, &name).await {
            if classify(&e) != Disposition::Retry || tokio::time::Instant::now() > give_up {
                return Err(e);
            }
            client = connect_retrying(url, give_up).await?;
        }
    }
    let mut tasks = Vec::new();
    for w in 0..writers.max(1) {
        let url = url.to_string();
        let share = changes / writers.max(1) + usize::from(w < changes % writers.max(1));
        tasks.push(tokio::spawn(async move {
            let mut client =
                connect_retrying(&url, tokio::time::Instant::now() + WRITER_GIVE_UP).await?;
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(w as u64));
            let mut pace = rate.filter(|r| *r > 0.0).map(|r| {
                let mut i =
                    tokio::time::interval(Duration::from_secs_f64(writers.max(1) as f64 / r));
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                i
            });
            // Each writer owns the orders ≡ w (mod writers), so two writers never race to create
            // the same order; they do contend on customers.
            let per_writer = orders.div_ceil(writers.max(1)).max(1);
            for _ in 0..share {
                if let Some(p) = pace.as_mut() {
                    p.tick().await;
                }
                let o = rng.gen_range(0..per_writer) * writers.max(1) + w;
                let c = o % customers.max(1);
                let (order, customer) = (format!("o{o}"), format!("c{c}"));
                // A lost connection (the primary restarting) or a deadlock between writers
                // is retried on a fresh connection for up to a minute, like an application
                // would; whether a change cut off at commit went in does not matter here.
                let give_up = tokio::time::Instant::now() + WRITER_GIVE_UP;
                while let Err(e) = change_order(&mut client, &mut rng, &order, &customer).await {
                    if classify(&e) != Disposition::Retry || tokio::time::Instant::now() > give_up {
                        return Err(e);
                    }
                    client = connect_retrying(&url, give_up).await?;
                }
            }
            Ok::<_, Error>(share as u64)
        }));
    }
    let mut written = customers as u64;
    for t in tasks {
        written += t.await.map_err(|source| Error::TaskFailed {
            task: "load writer task",
            source,
        })??;
    }
    Ok(written)
}

/// Live rows in the primary's sample tables: (customers, orders).
pub async fn primary_counts(client: &Client) -> Result<(i64, i64), Error> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM shop.customers), (SELECT count(*) FROM shop.orders)",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Outbox rows: (total, still unpublished).
pub async fn outbox_counts(client: &Client) -> Result<(i64, i64), Error> {
    let row = client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE published_at IS NULL) FROM dualsync.outbox",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Polls `probe` until it returns true or `deadline` passes; returns whether it succeeded.
pub async fn wait_until<F, Fut>(deadline: Duration, mut probe: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if probe().await {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
