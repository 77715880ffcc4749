//! The aggregate types one pipeline publishes from a shared outbox, as SQL conditions.

use tokio_postgres::types::ToSql;

use crate::config::OutboxSourceConfig;

use super::outbox::{COMMIT_TIME, READ_BATCH};

/// The aggregate types one pipeline publishes from an outbox it may share with others
/// (`source.include_aggregates` / `exclude_aggregates`), as SQL `LIKE` patterns.
///
/// Rows of other types are neither published nor marked: the read skips them in its `WHERE`,
/// so they never block this pipeline's rows, and they stay unpublished for the pipeline that
/// carries them (its backlog, not this one's). The pipelines sharing an outbox must carry
/// disjoint types: `published_at` is one column, so the first pipeline to publish a row marks
/// it for all, and a second pipeline carrying the same type would miss it. Each pipeline
/// purges only its own types' published rows (with its own `retention_secs`); rows another
/// pipeline has not published are unmarked, so no purge ever deletes them. The read still
/// walks the unpublished index past other types' rows, so a long backlog of another
/// pipeline's rows ahead of this one's costs index reads (not sorts, nor blocking).
#[derive(Debug, Clone, Default)]
pub struct AggregateFilter {
    include: Vec<String>,
    exclude: Vec<String>,
}

impl AggregateFilter {
    pub fn new(config: &OutboxSourceConfig) -> Self {
        let like = |globs: &[String]| globs.iter().map(|g| like_pattern(g)).collect();
        Self {
            include: like(&config.include_aggregates),
            exclude: like(&config.exclude_aggregates),
        }
    }

    /// `AND ...` conditions on `aggregatetype` whose parameters are numbered from `$first`
    /// (empty when every type is carried, so the default statements stay as they were).
    pub fn condition(&self, first: usize) -> String {
        let mut sql = String::new();
        let mut n = first;
        if !self.include.is_empty() {
            sql.push_str(&format!("AND aggregatetype LIKE ANY(${n}::text[]) "));
            n += 1;
        }
        if !self.exclude.is_empty() {
            sql.push_str(&format!("AND NOT aggregatetype LIKE ANY(${n}::text[]) "));
        }
        sql
    }

    /// The leader's read ([`READ_BATCH`]) with this filter, reading commit times when the
    /// server tracks them; its parameters are the limit, the pending seqs, then
    /// [`AggregateFilter::params`].
    pub fn read_batch_sql(&self, commit_times: bool) -> String {
        let mut sql = READ_BATCH.replace(" ORDER BY", &format!(" {}ORDER BY", self.condition(3)));
        if commit_times {
            let insert_time = "(extract(epoch FROM created_at) * 1000000)::int8\n";
            let at = sql
                .rfind(insert_time)
                .expect("READ_BATCH ends its columns with it");
            sql.replace_range(
                at..at + insert_time.len(),
                &format!("(extract(epoch FROM {COMMIT_TIME}) * 1000000)::int8\n"),
            );
        }
        sql
    }

    /// The parameters of [`AggregateFilter::condition`], in order.
    pub fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        if !self.include.is_empty() {
            params.push(&self.include);
        }
        if !self.exclude.is_empty() {
            params.push(&self.exclude);
        }
        params
    }
}

/// A glob (`*` any run, `?` one character, everything else literal) as a `LIKE` pattern.
fn like_pattern(glob: &str) -> String {
    let mut out = String::with_capacity(glob.len());
    for c in glob.chars() {
        match c {
            '*' => out.push('%'),
            '?' => out.push('_'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// Whether `glob` (`*` any run, `?` one character) matches all of `text`.
pub fn glob_matches(glob: &str, text: &str) -> bool {
    let (g, t): (Vec<char>, Vec<char>) = (glob.chars().collect(), text.chars().collect());
    let (mut gi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if gi < g.len() && (g[gi] == '?' || g[gi] == t[ti]) {
            gi += 1;
            ti += 1;
        } else if gi < g.len() && g[gi] == '*' {
            star = Some(gi);
            mark = ti;
            gi += 1;
        } else if let Some(s) = star {
            gi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|c| *c == '*')
}

/// Whether the pipeline of `config` publishes events of `aggregate_type` (the globs of
/// `include_aggregates` / `exclude_aggregates`, matched here rather than in SQL where the
/// events do not come from a query: the WAL capture, the topics read back).
pub fn carries(config: &OutboxSourceConfig, aggregate_type: &str) -> bool {
    (config.include_aggregates.is_empty()
        || config
            .include_aggregates
            .iter()
            .any(|g| glob_matches(g, aggregate_type)))
        && !config
            .exclude_aggregates
            .iter()
            .any(|g| glob_matches(g, aggregate_type))
}

#[cfg(test)]
mod tests {
    #[test]
    fn globs_become_like_patterns_with_literals_escaped() {
        assert_eq!(super::like_pattern("order*"), "order%");
        assert_eq!(super::like_pattern("a?c"), "a_c");
        assert_eq!(super::like_pattern("order_lines"), "order\\_lines");
        assert_eq!(super::like_pattern("50%"), "50\\%");
    }
}
