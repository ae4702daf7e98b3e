//! Deterministic, realistic-looking engineering documents (runbooks, FAQs, postmortems, design
//! docs...) built from word lists with a seeded PRNG: no data files, no network.

/// One row of the demo's `documents` table.
#[derive(Clone, Debug, PartialEq)]
pub struct Doc {
    pub title: String,
    pub body: String,
    pub summary: String,
    pub author: &'static str,
    pub tags: Vec<String>,
    /// `YYYY-MM-DD HH:MM:SS+00`
    pub created_at: String,
    pub updated_at: String,
}

/// A word that many generated documents contain, for the demo's search.
pub const COMMON_WORD: &str = "failover";

/// SplitMix64: tiny, fast, and the same sequence on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next_u64() % items.len() as u64) as usize]
    }
}

const SERVICES: &[&str] = &[
    "payments-api",
    "checkout-gateway",
    "search-indexer",
    "auth-service",
    "billing-worker",
    "notification-hub",
    "inventory-sync",
    "ledger-db",
    "edge-proxy",
    "reporting-etl",
    "session-cache",
    "media-transcoder",
    "feature-flags",
    "order-router",
];

const TECH: &[&str] = &[
    "PostgreSQL",
    "Kafka",
    "Redis",
    "Kubernetes",
    "Terraform",
    "Envoy",
    "Elasticsearch",
    "S3",
    "Vault",
    "Prometheus",
    "RabbitMQ",
    "ClickHouse",
];

const TEAMS: &[&str] = &["platform", "payments", "search", "identity", "data", "storefront", "sre"];

const REGIONS: &[&str] = &["eu-west-1", "us-east-1", "us-west-2", "ap-southeast-2", "eu-central-1"];

const METRICS: &[&str] = &[
    "p99 latency",
    "error rate",
    "queue depth",
    "replication lag",
    "connection pool saturation",
    "CPU throttling",
    "consumer lag",
    "cache hit ratio",
];

const CAUSES: &[&str] = &[
    "an expired TLS certificate",
    "a schema migration that locked a hot table",
    "a retry storm after a partial outage",
    "a misconfigured connection pool",
    "a noisy neighbour on a shared node",
    "a DNS change that was not rolled out everywhere",
    "an unbounded query from a reporting job",
    "a feature flag enabled for all tenants at once",
];

const AUTHORS: &[&str] = &[
    "Amara Okafor",
    "Lena Fischer",
    "Diego Ramírez",
    "Priya Nair",
    "Tomáš Novák",
    "Yuki Tanaka",
    "Sam O'Neill",
    "Chen Wei",
    "Fatima Zahra",
    "Jonas Lindqvist",
    "Maya Cohen",
    "Kwame Mensah",
];

#[derive(Clone, Copy)]
enum Kind {
    Runbook,
    Faq,
    Postmortem,
    Design,
    HowTo,
    Adr,
}

const KINDS: &[Kind] = &[
    Kind::Runbook,
    Kind::Runbook,
    Kind::Faq,
    Kind::Faq,
    Kind::Postmortem,
    Kind::Design,
    Kind::HowTo,
    Kind::Adr,
];

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::Runbook => "runbook",
            Kind::Faq => "faq",
            Kind::Postmortem => "postmortem",
            Kind::Design => "design-doc",
            Kind::HowTo => "how-to",
            Kind::Adr => "adr",
        }
    }
}

/// The facts one document is about; templates fill `{svc}`, `{tech}`, ... from it.
struct Subject {
    svc: &'static str,
    tech: &'static str,
    tech2: &'static str,
    team: &'static str,
    region: &'static str,
    metric: &'static str,
    cause: &'static str,
    num: u64,
    minutes: u64,
    date: String,
}

impl Subject {
    fn fill(&self, template: &str) -> String {
        template
            .replace("{svc}", self.svc)
            .replace("{tech2}", self.tech2)
            .replace("{tech}", self.tech)
            .replace("{team}", self.team)
            .replace("{region}", self.region)
            .replace("{metric}", self.metric)
            .replace("{cause}", self.cause)
            .replace("{num}", &self.num.to_string())
            .replace("{minutes}", &self.minutes.to_string())
            .replace("{date}", &self.date)
    }
}

fn titles(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Runbook => &[
            "Runbook: restarting {svc} after a failed deploy",
            "Runbook: {tech} failover for {svc}",
            "Runbook: rotating TLS certificates on {svc}",
            "Runbook: draining a {tech} node that serves {svc}",
            "Runbook: scaling {svc} for peak traffic",
            "Runbook: recovering {svc} from a full disk",
            "Runbook: {svc} {metric} alert",
        ],
        Kind::Faq => &[
            "FAQ: how do I get read access to {svc} logs?",
            "FAQ: why does {svc} return 429 errors?",
            "FAQ: how do I rotate the {tech} credentials of {svc}?",
            "FAQ: where are the {svc} dashboards?",
            "FAQ: who is on call for {svc}?",
            "FAQ: can I run {svc} against a local {tech}?",
        ],
        Kind::Postmortem => &[
            "Postmortem: elevated 5xx errors on {svc} ({date})",
            "Postmortem: {tech} replication lag delayed {svc} ({date})",
            "Postmortem: {svc} outage in {region} ({date})",
            "Postmortem: failed {tech} failover during maintenance ({date})",
        ],
        Kind::Design => &[
            "Design: moving {svc} from {tech} to {tech2}",
            "Design: idempotent retries in {svc}",
            "Design: multi-region failover for {svc}",
            "Design: rate limiting for {svc}",
            "Design: tenant isolation in {svc}",
        ],
        Kind::HowTo => &[
            "How to run {svc} locally with {tech}",
            "How to add a metric to {svc}",
            "How to backfill data into {svc}",
            "How to rehearse a failover of {tech} in staging",
        ],
        Kind::Adr => &[
            "ADR-{num}: use {tech} for {svc} queues",
            "ADR-{num}: one {tech} cluster per region",
            "ADR-{num}: retire {tech2} from {svc}",
        ],
    }
}

const CONTEXT: &[&str] = &[
    "{svc} runs in {region} and depends on {tech} for most of its state.",
    "The {team} team owns {svc}; escalate through the incident channel, not direct messages.",
    "Capacity planning assumes {num} requests per second at peak for {svc}.",
    "Check the {metric} panel on the {svc} dashboard before you change anything.",
    "Credentials for {tech} live in Vault under the {svc} path; never paste them into tickets.",
    "Most incidents on {svc} so far were caused by {cause}.",
    "Ask in #{team}-help if what you see does not match this page.",
    "{svc} keeps a warm standby in a second region so that a failover takes minutes, not hours.",
    "Deploys of {svc} go through the canary stage for {minutes} minutes before full rollout.",
    "The {tech} cluster behind {svc} is shared with two other services, so watch {metric} closely.",
];

const STEPS: &[&str] = &[
    "Announce the change in #{team}-ops and link the ticket.",
    "Confirm that {metric} on {svc} is back to its baseline.",
    "Check that {tech} replication lag is below {num} ms before a failover.",
    "Scale {svc} to at least three replicas with `kubectl scale`.",
    "Pause the consumers of {svc} and wait until the queue is drained.",
    "Promote the standby {tech} node and update the service endpoint.",
    "Roll back with `deploy rollback {svc}` if errors do not recover within {minutes} minutes.",
    "Restart the pods one at a time and watch the readiness probes.",
    "Take a snapshot of the {tech} volume before you touch it.",
    "Write a short note in the incident log: what you did and when.",
];

const FAQ_ANSWERS: &[&str] = &[
    "Request the role in the access portal; the {team} team approves within a working day.",
    "{svc} limits each tenant to {num} requests per minute; clients should honour Retry-After.",
    "Rotation is automated every 30 days; to rotate early, run the rotation job for {svc} in the deploy tool.",
    "The dashboards are in Grafana under the {team} folder; the {metric} panel is the one people look at first.",
    "The on-call rotation for {svc} is in PagerDuty under {team}; secondary on-call covers failover decisions.",
    "Yes: start {tech} with the compose file in the repository and point {svc} at it with the local profile.",
];

const POSTMORTEM: &[&str] = &[
    "At {date} the {metric} of {svc} in {region} rose sharply and stayed high for {minutes} minutes.",
    "The root cause was {cause}.",
    "Automatic failover did not trigger because the health check only tested the {tech} port.",
    "Customer impact: about {num} failed requests, no data loss.",
    "Detection took longer than it should have: the alert on {metric} was routed to the wrong rotation.",
    "Action items: add a synthetic check for {svc}, rehearse the {tech} failover each quarter, and document the manual path.",
];

const DESIGN: &[&str] = &[
    "Today {svc} talks to {tech} directly, which couples its release cycle to the {team} team's.",
    "We propose moving to {tech2}, keeping the current API and migrating tenant by tenant.",
    "Retries must be idempotent: every request carries a key, and {svc} stores the outcome for {minutes} minutes.",
    "A regional failover promotes the standby, moves traffic with weighted DNS, and replays the last {num} events.",
    "Alternatives considered: a bigger {tech} instance (postpones the problem) and a cache in front of it (adds staleness).",
    "Rollout: shadow traffic first, then {num} percent of tenants, then everyone; rollback is a config switch.",
];

/// Between `min` and `max` sentences from `pool`.
fn paragraph(rng: &mut Rng, subject: &Subject, pool: &[&str], min: u64, max: u64) -> String {
    let sentences = rng.range(min, max);
    let mut used = Vec::new();
    let mut out = Vec::new();
    for _ in 0..sentences {
        let mut template = rng.pick(pool);
        // Avoid repeating a sentence within one paragraph when the pool allows.
        for _ in 0..4 {
            if !used.contains(&template) {
                break;
            }
            template = rng.pick(pool);
        }
        used.push(template);
        out.push(subject.fill(template));
    }
    out.join(" ")
}

/// `count` documents, the same for the same seed.
pub fn documents(count: usize, seed: u64) -> Vec<Doc> {
    let mut rng = Rng::new(seed);
    // Spread over two years from 2023-01-02; a third of the documents were edited later.
    let mut created = days_from_civil(2023, 1, 2) * 86_400;
    let mean_gap = (2 * 365 * 86_400 / count.max(1) as u64).max(1);
    (0..count)
        .map(|_| {
            created += rng.range(1, 2 * mean_gap) as i64;
            let updated = match rng.range(0, 2) {
                0 => created + rng.range(3_600, 90 * 86_400) as i64,
                _ => created,
            };
            document(&mut rng, created, updated)
        })
        .collect()
}

/// One document created and last updated at the given Unix times.
pub fn document(rng: &mut Rng, created: i64, updated: i64) -> Doc {
    let kind = rng.pick(KINDS);
    let tech = rng.pick(TECH);
    let mut tech2 = rng.pick(TECH);
    while tech2 == tech {
        tech2 = rng.pick(TECH);
    }
    let subject = Subject {
        svc: rng.pick(SERVICES),
        tech,
        tech2,
        team: rng.pick(TEAMS),
        region: rng.pick(REGIONS),
        metric: rng.pick(METRICS),
        cause: rng.pick(CAUSES),
        num: rng.range(2, 900),
        minutes: rng.range(5, 45),
        date: timestamp(created)[..10].to_owned(),
    };
    let title = capitalize_after_colon(&subject.fill(rng.pick(titles(kind))));
    let mut body = vec![paragraph(rng, &subject, CONTEXT, 2, 4)];
    match kind {
        Kind::Runbook | Kind::HowTo => {
            let n = rng.range(3, 7);
            let steps: Vec<String> =
                (1..=n).map(|i| format!("{i}. {}", paragraph(rng, &subject, STEPS, 1, 1))).collect();
            body.push(format!("Steps:\n{}", steps.join("\n")));
            body.push(paragraph(rng, &subject, CONTEXT, 2, 2));
        }
        Kind::Faq => body.push(paragraph(rng, &subject, FAQ_ANSWERS, 2, 2)),
        Kind::Postmortem => body.push(paragraph(rng, &subject, POSTMORTEM, 3, 6)),
        Kind::Design | Kind::Adr => {
            body.push(paragraph(rng, &subject, DESIGN, 3, 5));
            body.push(paragraph(rng, &subject, CONTEXT, 1, 1));
        }
    }
    let summary = match kind {
        Kind::Runbook => subject.fill("Steps to handle {svc} incidents involving {tech}, owned by {team}."),
        Kind::Faq => subject.fill("Common questions about {svc} and {tech}, answered by the {team} team."),
        Kind::Postmortem => subject.fill("What broke in {svc} on {date}, why, and what we changed."),
        Kind::Design | Kind::Adr => {
            subject.fill("A proposal for {svc}: {tech} and {tech2}, trade-offs and rollout.")
        }
        Kind::HowTo => subject.fill("A practical guide for working on {svc} with {tech}."),
    };
    let mut tags = vec![kind.tag().to_owned(), subject.svc.to_owned(), subject.tech.to_lowercase()];
    tags.push(subject.team.to_owned());
    Doc {
        title,
        body: body.join("\n\n"),
        summary,
        author: rng.pick(AUTHORS),
        tags,
        created_at: timestamp(created),
        updated_at: timestamp(updated.max(created)),
    }
}

fn capitalize_after_colon(title: &str) -> String {
    match title.split_once(": ") {
        Some((head, rest)) => {
            let mut chars = rest.chars();
            let first = chars.next().map(|c| c.to_uppercase().collect::<String>()).unwrap_or_default();
            format!("{head}: {first}{}", chars.as_str())
        }
        None => title.to_owned(),
    }
}

/// `YYYY-MM-DD HH:MM:SS+00` for Unix seconds.
pub fn timestamp(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}+00", secs / 3600, secs % 3600 / 60, secs % 60)
}

// Howard Hinnant's date algorithms (proleptic Gregorian calendar).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + if m <= 2 { 1 } else { 0 }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_documents() {
        assert_eq!(documents(50, 7), documents(50, 7));
        assert_ne!(documents(50, 7), documents(50, 8));
    }

    #[test]
    fn documents_look_like_documents() {
        let docs = documents(3000, 42);
        let with_word = docs.iter().filter(|d| d.body.to_lowercase().contains(COMMON_WORD)).count();
        assert!(with_word > 100, "only {with_word} documents mention {COMMON_WORD}");
        for doc in &docs {
            assert!(doc.body.len() > 150, "{doc:?}");
            assert!(doc.created_at <= doc.updated_at, "{doc:?}");
            assert!(!doc.title.contains('{') && !doc.body.contains('{'), "unfilled template: {doc:?}");
        }
        let titles: std::collections::HashSet<_> = docs.iter().map(|d| &d.title).collect();
        assert!(titles.len() > 1000, "titles repeat too much: {} distinct", titles.len());
    }

    #[test]
    fn dates() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00+00");
        assert_eq!(timestamp(days_from_civil(2024, 2, 29) * 86_400 + 3661), "2024-02-29 01:01:01+00");
        assert_eq!(civil_from_days(days_from_civil(2023, 12, 31)), (2023, 12, 31));
    }
}
