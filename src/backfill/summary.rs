//! A run's summary: a row per conversation or hour, and the table printed at the end.

/// One line of the summary: a conversation (`roam`) or a Beijing-time hour (`history`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    pub name: String,
    /// Messages Tencent has in the window.
    pub found: u64,
    /// Of those, already on the topic.
    pub on_topic: u64,
    /// Message records published (or, dry, that would be).
    pub published: u64,
    pub recalls_published: u64,
    pub unparsable: u64,
    /// The hour's file cannot be ready yet: nothing was concluded about it.
    pub not_ready: bool,
    /// A conversation the topic saw whose account Tencent no longer knows (deleted since):
    /// skipped, its messages beyond reach.
    pub unknown_account: bool,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub rows: Vec<Row>,
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
            t.recalls_published += r.recalls_published;
            t.unparsable += r.unparsable;
            t.not_ready |= r.not_ready;
            t.unknown_account |= r.unknown_account;
        }
        t
    }

    /// The table printed at the end of a run.
    pub fn table(&self, dry_run: bool) -> String {
        let verb = if dry_run {
            "would publish"
        } else {
            "published"
        };
        let mut out = format!(
            "{:<40} {:>8} {:>9} {:>10} {:>9} {:>11}\n",
            "conversation / hour", "found", "on topic", verb, "recalls", "unparsable"
        );
        for r in self.rows.iter().chain(std::iter::once(&self.total())) {
            if r.not_ready {
                out.push_str(&format!("{:<40} not ready yet\n", r.name));
                continue;
            }
            if r.unknown_account && r.name != "total" {
                out.push_str(&format!(
                    "{:<40} an account Tencent no longer knows: skipped\n",
                    r.name
                ));
                continue;
            }
            out.push_str(&format!(
                "{:<40} {:>8} {:>9} {:>10} {:>9} {:>11}\n",
                r.name, r.found, r.on_topic, r.published, r.recalls_published, r.unparsable
            ));
        }
        out
    }
}
