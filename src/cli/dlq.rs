//! `pis-worker dlq list` and `pis-worker dlq replay`: what is in the dead-letter topic, and
//! putting records back on the command topic once their cause is fixed.
//!
//! The DLQ topic is read from the beginning to its end. Tansu 0.6 reports a high watermark that
//! counts produce batches rather than records, so the end is "every partition has reached its
//! reported high watermark, and then no record came for `--quiet-ms`" (on Apache Kafka the first
//! condition alone is exact; the quiet period only costs its own length).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::BrokerArgs;
use crate::kafka::KafkaSettings;
use crate::kafka::producer::dlq_headers;

/// Header naming the DLQ record a replayed command came from: `{dlq topic}/{partition}/{offset}`.
pub const REPLAYED_FROM: &str = "pis.replayed-from";

#[derive(Debug, Clone, clap::Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead-lettered records: position, class, message, source, key.
    List(ListArgs),
    /// Re-publish dead-lettered records to the command topic (original key, value and headers,
    /// without the DLQ's `pis.error.*` / `pis.source.*` headers, with `pis.replayed-from`).
    Replay(ReplayArgs),
}

/// How the DLQ topic is read.
#[derive(Debug, Clone, clap::Args)]
pub struct ReadArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Once every partition reached its high watermark, stop after this long without a record.
    #[arg(long, default_value_t = 1_500)]
    pub quiet_ms: u64,
    /// Give up reading after this long.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub read: ReadArgs,
    /// Show at most this many records (oldest first, after the class filter).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Only records of this error class (e.g. UNKNOWN_SCHEMA).
    #[arg(long)]
    pub class: Option<String>,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["offset", "all"])))]
pub struct ReplayArgs {
    #[command(flatten)]
    pub read: ReadArgs,
    /// A DLQ record to replay, as PARTITION:OFFSET, or OFFSET when only one partition has it
    /// (repeatable).
    #[arg(long)]
    pub offset: Vec<String>,
    /// Replay every DLQ record (with --class: every record of that class).
    #[arg(long)]
    pub all: bool,
    /// Only records of this error class.
    #[arg(long)]
    pub class: Option<String>,
    /// Print what would be replayed, publish nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// One record of the DLQ topic.
#[derive(Debug, Clone)]
pub struct DlqRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl DlqRecord {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_ref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    pub fn class(&self) -> String {
        self.header(dlq_headers::ERROR_CLASS).unwrap_or_default()
    }

    /// `partition:offset`, how `replay --offset` names it.
    pub fn position(&self) -> String {
        format!("{}:{}", self.partition, self.offset)
    }

    fn key_text(&self) -> String {
        self.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default()
    }

    fn source(&self) -> String {
        format!(
            "{}/{}/{}",
            self.header(dlq_headers::SOURCE_TOPIC).unwrap_or_default(),
            self.header(dlq_headers::SOURCE_PARTITION)
                .unwrap_or_default(),
            self.header(dlq_headers::SOURCE_OFFSET).unwrap_or_default()
        )
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "partition": self.partition,
            "offset": self.offset,
            "class": self.class(),
            "message": self.header(dlq_headers::ERROR_MESSAGE),
            "source_topic": self.header(dlq_headers::SOURCE_TOPIC),
            "source_partition": self.header(dlq_headers::SOURCE_PARTITION).and_then(|p| p.parse::<i64>().ok()),
            "source_offset": self.header(dlq_headers::SOURCE_OFFSET).and_then(|o| o.parse::<i64>().ok()),
            "key": self.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()),
            "payment_id": self.header(dlq_headers::PAYMENT_ID),
            "replayed_from": self.header(REPLAYED_FROM),
            "value_bytes": self.value.as_ref().map(Vec::len),
        })
    }

    pub fn to_text(&self) -> String {
        let mut line = format!(
            "{:<8} {:<22} source={} key={}",
            self.position(),
            self.class(),
            self.source(),
            self.key_text()
        );
        if let Some(from) = self.header(REPLAYED_FROM) {
            line.push_str(&format!(" replayed-from={from}"));
        }
        line.push_str(&format!(
            "  {}",
            self.header(dlq_headers::ERROR_MESSAGE).unwrap_or_default()
        ));
        line
    }

    /// The headers to re-publish: the original record's own, without what the DLQ added.
    pub fn replay_headers(&self) -> Vec<(String, Option<Vec<u8>>)> {
        let mut headers: Vec<_> = self
            .headers
            .iter()
            .filter(|(k, _)| {
                !(k.starts_with("pis.error.")
                    || k.starts_with("pis.source.")
                    || k == dlq_headers::PAYMENT_ID
                    || k == REPLAYED_FROM)
            })
            .cloned()
            .collect();
        headers.push((
            REPLAYED_FROM.to_owned(),
            Some(format!("{}/{}/{}", self.topic, self.partition, self.offset).into_bytes()),
        ));
        headers
    }
}

/// Reads every record of the DLQ topic (blocking), in (partition, offset) order.
pub fn read_all(
    settings: &KafkaSettings,
    quiet: Duration,
    timeout: Duration,
) -> anyhow::Result<Vec<DlqRecord>> {
    let topic = &settings.topics.dlq;
    let mut records = Vec::new();
    read_topic(settings, topic, quiet, timeout, |message| {
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        records.push(DlqRecord {
            topic: topic.clone(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            headers,
        });
    })?;
    records.sort_by_key(|r| (r.partition, r.offset));
    Ok(records)
}

/// Reads `topic` from the beginning to its end (blocking), handing every record to `visit`, in
/// offset order per partition. The end is "every partition reached its reported high watermark,
/// then nothing for `quiet`" (see the module's note on Tansu's watermarks).
pub fn read_topic(
    settings: &KafkaSettings,
    topic: &str,
    quiet: Duration,
    timeout: Duration,
    mut visit: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> anyhow::Result<usize> {
    let consumer: BaseConsumer = settings
        .client_config()
        .set(
            "group.id",
            format!("pis-topic-reader-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .context("creating the topic reader")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("reading the metadata of {topic}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        anyhow::bail!("topic {topic} does not exist or has no partitions");
    }
    let mut assignment = TopicPartitionList::new();
    // The last offset each partition must reach before the quiet period counts (None: empty).
    let mut pending: HashMap<i32, i64> = HashMap::new();
    for &partition in &partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .context("building the assignment")?;
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .with_context(|| format!("watermarks of {topic}/{partition}"))?;
        if high > low {
            pending.insert(partition, high - 1);
        }
    }
    consumer.assign(&assignment).context("assigning")?;
    let started = Instant::now();
    let mut last_record = Instant::now();
    let mut read = 0usize;
    loop {
        if started.elapsed() > timeout {
            anyhow::bail!(
                "reading {topic} timed out after {}s ({read} records read)",
                timeout.as_secs()
            );
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                last_record = Instant::now();
                read += 1;
                if pending
                    .get(&message.partition())
                    .is_some_and(|&last| message.offset() >= last)
                {
                    pending.remove(&message.partition());
                }
                visit(&message);
            }
            Some(Err(e)) => tracing::warn!(error = %e, %topic, "reading"),
            None => {}
        }
        if pending.is_empty() && last_record.elapsed() >= quiet {
            break;
        }
    }
    Ok(read)
}

fn read(args: &ReadArgs) -> anyhow::Result<(KafkaSettings, Vec<DlqRecord>)> {
    let settings = args.broker.settings("pis-dlq", 6_000);
    let records = read_all(
        &settings,
        Duration::from_millis(args.quiet_ms),
        Duration::from_secs(args.timeout_secs),
    )?;
    Ok((settings, records))
}

fn of_class<'a>(
    records: &'a [DlqRecord],
    class: Option<&'a str>,
) -> impl Iterator<Item = &'a DlqRecord> {
    records
        .iter()
        .filter(move |r| class.is_none_or(|c| r.class() == c))
}

/// The records `--offset` names (PARTITION:OFFSET, or an OFFSET unique across partitions).
pub fn select<'a>(
    records: &'a [DlqRecord],
    wanted: &[String],
) -> anyhow::Result<Vec<&'a DlqRecord>> {
    let mut out = Vec::new();
    for spec in wanted {
        let (partition, offset) = match spec.split_once(':') {
            Some((p, o)) => (
                Some(
                    p.trim()
                        .parse::<i32>()
                        .with_context(|| format!("partition in {spec:?}"))?,
                ),
                o.trim()
                    .parse::<i64>()
                    .with_context(|| format!("offset in {spec:?}"))?,
            ),
            None => (
                None,
                spec.trim()
                    .parse::<i64>()
                    .with_context(|| format!("offset {spec:?}"))?,
            ),
        };
        let found: Vec<&DlqRecord> = records
            .iter()
            .filter(|r| r.offset == offset && partition.is_none_or(|p| r.partition == p))
            .collect();
        match found.as_slice() {
            [one] => out.push(*one),
            [] => anyhow::bail!("no DLQ record at {spec}"),
            several => anyhow::bail!(
                "offset {offset} exists in {} partitions ({}): name it as PARTITION:OFFSET",
                several.len(),
                several
                    .iter()
                    .map(|r| r.position())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    Ok(out)
}

pub async fn run(args: DlqArgs) -> anyhow::Result<()> {
    match args.command {
        DlqCommand::List(list) => {
            let read_args = list.read.clone();
            let (_, records) = tokio::task::spawn_blocking(move || read(&read_args)).await??;
            let shown =
                of_class(&records, list.class.as_deref()).take(list.limit.unwrap_or(usize::MAX));
            for record in shown {
                if list.json {
                    println!("{}", record.to_json());
                } else {
                    println!("{}", record.to_text());
                }
            }
            Ok(())
        }
        DlqCommand::Replay(replay) => {
            let read_args = replay.read.clone();
            let (settings, records) =
                tokio::task::spawn_blocking(move || read(&read_args)).await??;
            let chosen: Vec<&DlqRecord> = if replay.all {
                of_class(&records, replay.class.as_deref()).collect()
            } else {
                select(&records, &replay.offset)?
                    .into_iter()
                    .filter(|r| replay.class.as_deref().is_none_or(|c| r.class() == c))
                    .collect()
            };
            if chosen.is_empty() {
                println!("nothing to replay");
                return Ok(());
            }
            if replay.dry_run {
                for record in &chosen {
                    println!("would replay {}", record.to_text());
                }
                return Ok(());
            }
            replay_records(&settings, &chosen).await
        }
    }
}

/// Re-publishes `records` to the command topic, each to the partition it was read from (its
/// `pis.source.partition`) when that partition exists, else by key.
pub async fn replay_records(
    settings: &KafkaSettings,
    records: &[&DlqRecord],
) -> anyhow::Result<()> {
    let producer: FutureProducer = settings
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .create()
        .context("creating the producer")?;
    let commands = settings.topics.commands.clone();
    let partitions = {
        let settings = settings.clone();
        let topic = commands.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<i32> {
            let consumer: BaseConsumer = settings
                .client_config()
                .create()
                .context("creating a metadata client")?;
            let metadata = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .context("reading the command topic's metadata")?;
            Ok(metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .map(|t| t.partitions().len() as i32)
                .unwrap_or(0))
        })
        .await??
    };
    for record in records {
        let headers =
            record
                .replay_headers()
                .into_iter()
                .fold(OwnedHeaders::new(), |h, (key, value)| {
                    h.insert(Header {
                        key: &key,
                        value: value.as_deref(),
                    })
                });
        let mut out: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&commands).headers(headers);
        if let Some(key) = record.key.as_deref() {
            out = out.key(key);
        }
        if let Some(value) = record.value.as_deref() {
            out = out.payload(value);
        }
        let source_partition = record
            .header(dlq_headers::SOURCE_PARTITION)
            .and_then(|p| p.parse::<i32>().ok())
            .filter(|p| (0..partitions).contains(p));
        if let Some(p) = source_partition {
            out = out.partition(p);
        }
        let (partition, offset) = producer
            .send(out, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("replaying {}: {e}", record.position()))
            .map(|d| (d.partition, d.offset))?;
        println!(
            "replayed {} ({}) -> {commands} partition {partition} offset {offset}",
            record.position(),
            record.class()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(partition: i32, offset: i64, class: &str) -> DlqRecord {
        DlqRecord {
            topic: "dlq".into(),
            partition,
            offset,
            key: Some(b"psu-1".to_vec()),
            value: Some(b"v".to_vec()),
            headers: vec![
                ("trace".into(), Some(b"abc".to_vec())),
                (
                    dlq_headers::ERROR_CLASS.into(),
                    Some(class.as_bytes().to_vec()),
                ),
                (dlq_headers::ERROR_MESSAGE.into(), Some(b"bad".to_vec())),
                (dlq_headers::SOURCE_TOPIC.into(), Some(b"cmds".to_vec())),
                (dlq_headers::SOURCE_PARTITION.into(), Some(b"1".to_vec())),
                (dlq_headers::SOURCE_OFFSET.into(), Some(b"42".to_vec())),
                (dlq_headers::PAYMENT_ID.into(), Some(b"p-1".to_vec())),
                (REPLAYED_FROM.into(), Some(b"dlq/0/1".to_vec())),
            ],
        }
    }

    #[test]
    fn replay_keeps_the_original_headers_and_names_the_dlq_record() {
        let headers = record(1, 7, "BAD_FRAMING").replay_headers();
        let names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, vec!["trace", REPLAYED_FROM]);
        assert_eq!(headers[1].1.as_deref(), Some(&b"dlq/1/7"[..]));
    }

    #[test]
    fn offsets_are_selected_by_partition_and_offset() {
        let records = vec![record(0, 3, "A"), record(1, 3, "B"), record(1, 4, "C")];
        let chosen = select(&records, &["1:3".into(), "4".into()]).expect("select");
        assert_eq!(
            chosen.iter().map(|r| r.position()).collect::<Vec<_>>(),
            vec!["1:3", "1:4"]
        );
        assert!(select(&records, &["3".into()]).is_err(), "ambiguous");
        assert!(select(&records, &["9".into()]).is_err(), "absent");
        assert!(select(&records, &["x".into()]).is_err(), "not a number");
    }

    #[test]
    fn text_and_json_name_class_source_and_key() {
        let r = record(0, 5, "UNKNOWN_SCHEMA");
        let text = r.to_text();
        assert!(text.starts_with("0:5"), "{text}");
        assert!(text.contains("UNKNOWN_SCHEMA") && text.contains("source=cmds/1/42"));
        assert!(text.contains("key=psu-1") && text.contains("bad"));
        let json = r.to_json();
        assert_eq!(json["class"], "UNKNOWN_SCHEMA");
        assert_eq!(json["source_offset"], 42);
        assert_eq!(json["key"], "psu-1");
    }
}
