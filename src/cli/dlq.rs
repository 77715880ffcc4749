//! `dualsync dlq list|show|replay`: readable tables by default, `--json` for scripts.

use dualsync::config::Config;
use dualsync::dlq::headers;
use dualsync::ops::inspect::{self, DeadLetter, Filter, RequestError};
use dualsync::ops::replay::{self, Decision};
use dualsync::wire::EventCodec;

#[derive(clap::Args, Clone, Default)]
pub struct FilterArgs {
    /// Error class, or a prefix of it: `decode` matches `decode.bad_magic`.
    #[arg(long)]
    class: Option<String>,
    /// Message key (the aggregate id).
    #[arg(long)]
    key: Option<String>,
    /// Partition of the dead-letter topic (the `topic[partition]@offset` `show` prints first).
    #[arg(long)]
    partition: Option<i32>,
    /// First offset in --partition of the dead-letter topic (inclusive).
    #[arg(long)]
    from_offset: Option<i64>,
    /// Last offset in --partition of the dead-letter topic (inclusive).
    #[arg(long)]
    to_offset: Option<i64>,
    /// Dead-lettered at or after this time (RFC 3339 or epoch millis).
    #[arg(long)]
    since: Option<String>,
    /// Dead-lettered before this time (RFC 3339 or epoch millis).
    #[arg(long)]
    until: Option<String>,
}

impl FilterArgs {
    /// The filter, refused when it can only be a mistake ([`Filter::validate`]).
    fn filter(&self) -> Result<Filter, dualsync::error::Error> {
        let time = |t: &Option<String>, flag: &'static str| -> Result<Option<i64>, RequestError> {
            t.as_deref()
                .map(|t| {
                    inspect::parse_time(t).map_err(|reason| RequestError::BadTime { flag, reason })
                })
                .transpose()
        };
        let filter = Filter {
            class: self.class.clone(),
            key: self.key.clone(),
            partition: self.partition,
            from_offset: self.from_offset,
            to_offset: self.to_offset,
            since_ms: time(&self.since, "since")?,
            until_ms: time(&self.until, "until")?,
        };
        filter.validate()?;
        Ok(filter)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, dualsync::error::Error> + Send + 'static,
) -> anyhow::Result<T> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

async fn read(config: &Config, topic: &str) -> anyhow::Result<Vec<DeadLetter>> {
    let (config, topic) = (config.clone(), topic.to_string());
    blocking(move || inspect::read_topic(&config, &topic)).await
}

async fn topics(config: &Config, only: Option<&str>) -> anyhow::Result<Vec<String>> {
    if let Some(t) = only {
        inspect::ensure_own_dead_letter_topic(config, t)?;
        return Ok(vec![t.to_string()]);
    }
    let config = config.clone();
    blocking(move || inspect::dead_letter_topics(&config)).await
}

fn time_or_dash(ms: Option<i64>) -> String {
    ms.map(inspect::format_ms).unwrap_or_else(|| "-".into())
}

pub async fn list(config: &Config, json: bool) -> anyhow::Result<()> {
    let mut summaries = Vec::new();
    for topic in topics(config, None).await? {
        let messages = read(config, &topic).await?;
        summaries.push(inspect::summarize(&topic, &messages));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&summaries)?);
        return Ok(());
    }
    if summaries.is_empty() {
        println!("no dead-letter topics on {}", config.kafka.brokers);
        return Ok(());
    }
    println!(
        "{:<40} {:>8}  {:<24}  {:<24}  CLASSES",
        "TOPIC", "MESSAGES", "OLDEST", "NEWEST"
    );
    for s in summaries {
        let classes: Vec<String> = s.by_class.iter().map(|(c, n)| format!("{c}={n}")).collect();
        println!(
            "{:<40} {:>8}  {:<24}  {:<24}  {}",
            s.topic,
            s.messages,
            time_or_dash(s.oldest_ms),
            time_or_dash(s.newest_ms),
            classes.join(" ")
        );
    }
    Ok(())
}

pub async fn show(
    config: &Config,
    codec: &EventCodec,
    topic: Option<&str>,
    filter: &FilterArgs,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    let filter = filter.filter()?;
    let mut shown = Vec::new();
    for t in topics(config, topic).await? {
        for m in read(config, &t).await? {
            if filter.matches(&m) && shown.len() < limit {
                shown.push(m);
            }
        }
    }
    if json {
        let mut docs = Vec::with_capacity(shown.len());
        for m in &shown {
            let mut doc = serde_json::to_value(m).expect("dead letters serialize");
            doc["key"] = m.key_text().into();
            doc["class"] = m.class().into();
            doc["payload"] = inspect::decode_payload(codec, &m.value).await;
            docs.push(doc);
        }
        println!("{}", serde_json::to_string_pretty(&docs)?);
        return Ok(());
    }
    if shown.is_empty() {
        println!("no matching dead letters");
    }
    for m in &shown {
        let h = |name: &str| m.header(name).unwrap_or("-").to_string();
        println!(
            "{}[{}]@{}  {}  key={}",
            m.topic,
            m.partition,
            m.offset,
            time_or_dash(m.time_ms()),
            m.key_text().unwrap_or_else(|| "(null)".into())
        );
        println!(
            "  class: {}  stage: {}  attempts: {}",
            m.class(),
            h(headers::STAGE),
            h(headers::ATTEMPTS)
        );
        if let Some(origin) = m.header(headers::TOPIC) {
            println!(
                "  origin: {origin}[{}]@{}",
                h(headers::PARTITION),
                h(headers::OFFSET)
            );
        }
        println!("  error: {}", h(headers::MESSAGE));
        let other: Vec<String> = m
            .headers
            .iter()
            .filter(|(k, _)| !k.starts_with(headers::ERROR_PREFIX))
            .map(|(k, v)| format!("{k}={}", v.as_deref().unwrap_or("(null)")))
            .collect();
        if !other.is_empty() {
            println!("  headers: {}", other.join(", "));
        }
        println!(
            "  payload: {}",
            inspect::decode_payload(codec, &m.value).await
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub async fn replay(
    config: &Config,
    codec: &EventCodec,
    topic: &str,
    filter: &FilterArgs,
    limit: usize,
    dry_run: bool,
    force: bool,
    json: bool,
) -> anyhow::Result<()> {
    let filter = filter.filter()?;
    inspect::ensure_own_dead_letter_topic(config, topic)?;
    let selected: Vec<DeadLetter> = read(config, topic)
        .await?
        .into_iter()
        .filter(|m| filter.matches(m))
        .take(limit)
        .collect();
    if selected.is_empty() {
        return Err(dualsync::error::Error::from(RequestError::NoMatch {
            topic: topic.to_string(),
            filter: filter.describe(),
        })
        .into());
    }
    let progress = crate::cli::progress::Progress::new(
        &format!("replay {topic}"),
        "letters",
        Some(selected.len() as u64),
    );
    let outcomes =
        replay::replay_with_progress(config, codec, topic, selected, dry_run, force, &|n| {
            progress.inc(n)
        })
        .await?;
    progress.finish();
    if json {
        println!("{}", serde_json::to_string_pretty(&outcomes)?);
        return Ok(());
    }
    let mut sent = 0;
    for o in &outcomes {
        let what = match &o.decision {
            Decision::Replay { target } if o.sent => format!("replayed to {target}"),
            Decision::Replay { target } => format!("would replay to {target}"),
            Decision::AlreadyReplayed { at_ms, target } => format!(
                "skipped: already replayed to {target} at {} (--force to send again)",
                inspect::format_ms(*at_ms)
            ),
            Decision::StillFails { error } => {
                format!("skipped: would fail again: {error} (--force to send anyway)")
            }
        };
        sent += usize::from(o.sent);
        println!(
            "{}[{}]@{} key={}: {what}",
            o.topic,
            o.partition,
            o.offset,
            o.key.as_deref().unwrap_or("(null)")
        );
    }
    println!(
        "{} selected, {sent} replayed{}",
        outcomes.len(),
        if dry_run { " (dry run)" } else { "" }
    );
    Ok(())
}
