//! A run's summary: a row per conversation or hour, the table printed at the end, and the
//! same as JSON (`--json`).

use serde::Serialize;

/// One line of the summary: a conversation (`roam`) or a Beijing-time hour (`history`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Row {
    pub name: String,
    /// Messages Tencent has in the window.
    pub found: u64,
    /// Of those, already on the topic.
    pub on_topic: u64,
    /// Message records published (or, dry, that would be).
    pub published: u64,
    /// Of those, messages Tencent sends no callback for (`no_callback_senders`,
    /// `no_callback_platforms`): expected, not a gap.
    pub no_callback: u64,
    pub recalls_published: u64,
    pub unparsable: u64,
    /// The hour's file cannot be ready yet: nothing was concluded about it.
    pub not_ready: bool,
    /// A conversation the topic saw whose account Tencent no longer knows (deleted since):
    /// skipped, its messages beyond reach.
    pub unknown_account: bool,
}

impl Row {
    /// Records published for messages the relay should have received: the gap.
    pub fn missing(&self) -> u64 {
        self.published - self.no_callback + self.recalls_published
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub rows: Vec<Row>,
    /// Records Kafka refused for good, on the quarantine topic instead.
    pub refused: u64,
    /// Record ids read from the topic and kept (16 bytes each): what the run's memory
    /// follows.
    pub ids_kept: usize,
}

impl Summary {
    pub fn total(&self) -> Row {
        let mut t = Row {
            name: "total".into(),
            ..Row::default()
        };
        for r in &self.rows {
            t.found += r.found;
            t.on_topic += r.on_topic;
            t.published += r.published;
            t.no_callback += r.no_callback;
            t.recalls_published += r.recalls_published;
            t.unparsable += r.unparsable;
            t.not_ready |= r.not_ready;
            t.unknown_account |= r.unknown_account;
        }
        t
    }

    /// The summary as one JSON object: its rows, their total, and the refusals.
    pub fn json(&self) -> String {
        #[derive(Serialize)]
        struct Whole<'a> {
            rows: &'a [Row],
            total: Row,
            refused: u64,
            ids_kept: usize,
        }
        serde_json::to_string(&Whole {
            rows: &self.rows,
            total: self.total(),
            refused: self.refused,
            ids_kept: self.ids_kept,
        })
        .unwrap_or_default()
    }

    /// The table printed at the end of a run. The total always shows its figures: an hour not
    /// ready or a conversation skipped is said beside it, never instead.
    pub fn table(&self, dry_run: bool) -> String {
        let verb = if dry_run {
            "would publish"
        } else {
            "published"
        };
        let mut out = format!(
            "{:<40} {:>8} {:>9} {:>10} {:>11} {:>9} {:>11}\n",
            "conversation / hour",
            "found",
            "on topic",
            verb,
            "no callback",
            "recalls",
            "unparsable"
        );
        let total = self.total();
        for r in &self.rows {
            if r.not_ready {
                out.push_str(&format!("{:<40} not ready yet\n", r.name));
            } else if r.unknown_account {
                out.push_str(&format!(
                    "{:<40} an account Tencent no longer knows: skipped\n",
                    r.name
                ));
            } else {
                out.push_str(&line(r));
            }
        }
        out.push_str(&line(&total));
        if total.not_ready {
            out.push_str("(some hours are not ready yet: their messages are not counted)\n");
        }
        if self.refused > 0 {
            out.push_str(&format!(
                "{} records Kafka refused for good are on the quarantine topic instead\n",
                self.refused
            ));
        }
        out
    }
}

fn line(r: &Row) -> String {
    format!(
        "{:<40} {:>8} {:>9} {:>10} {:>11} {:>9} {:>11}\n",
        r.name, r.found, r.on_topic, r.published, r.no_callback, r.recalls_published, r.unparsable
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_shows_its_figures_when_an_hour_is_not_ready() {
        let summary = Summary {
            rows: vec![
                Row {
                    name: "2026112714 (UTC+8)".into(),
                    found: 5,
                    on_topic: 3,
                    published: 2,
                    no_callback: 1,
                    ..Row::default()
                },
                Row {
                    name: "2026112715 (UTC+8)".into(),
                    not_ready: true,
                    ..Row::default()
                },
            ],
            refused: 0,
            ids_kept: 0,
        };
        let table = summary.table(false);
        let total = table.lines().find(|l| l.starts_with("total")).unwrap();
        let figures: Vec<&str> = total.split_whitespace().skip(1).collect();
        assert_eq!(figures, ["5", "3", "2", "1", "0", "0"], "{table}");
        assert!(table.contains("not ready yet"), "{table}");
        assert_eq!(summary.total().missing(), 1);
        let json: serde_json::Value = serde_json::from_str(&summary.json()).unwrap();
        assert_eq!(json["total"]["published"], 2);
        assert_eq!(json["rows"][1]["not_ready"], true);
    }
}
