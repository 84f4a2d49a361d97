//! The one producer of a worker process: idempotent, acks=all. Every send is enqueued in call
//! order, so two state writes to a partition made in order land in that order (the outbox
//! checkpoint relies on it).

use std::future::Future;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;

use super::{KafkaEdgeError, KafkaSettings, Topics};
use crate::contract;
use crate::domain::consent::ConsentEvent;
use crate::domain::machine::StatusEvent;

/// Headers put on dead-letter records, next to the original record's own headers.
pub mod dlq_headers {
    pub const ERROR_CLASS: &str = "pis.error.class";
    pub const ERROR_MESSAGE: &str = "pis.error.message";
    pub const SOURCE_TOPIC: &str = "pis.source.topic";
    pub const SOURCE_PARTITION: &str = "pis.source.partition";
    pub const SOURCE_OFFSET: &str = "pis.source.offset";
    pub const PAYMENT_ID: &str = "pis.payment.id";
}

/// Header of a state record naming its writer's epoch.
pub const EPOCH_HEADER: &str = "pis.epoch";

#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer,
    topics: Topics,
}

/// Resolves to the offset the broker gave the record.
pub type Delivered = std::pin::Pin<Box<dyn Future<Output = Result<i64, KafkaEdgeError>> + Send>>;

impl Producer {
    pub fn new(settings: &KafkaSettings) -> Result<Self, KafkaEdgeError> {
        let inner: FutureProducer = settings
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            // Same key -> same partition as Java clients, for the status topic's consumers.
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", "60000")
            .create()
            .map_err(|e| KafkaEdgeError::kafka("creating producer", e))?;
        Ok(Self {
            inner,
            topics: settings.topics.clone(),
        })
    }

    async fn enqueue(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &[u8],
        value: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> Result<Delivered, KafkaEdgeError> {
        self.enqueue_value(topic, partition, Some(key), Some(value), headers)
            .await
    }

    /// `value: None` writes a tombstone; `key: None` a record without a key.
    async fn enqueue_value(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) -> Result<Delivered, KafkaEdgeError> {
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
            if let Some(key) = key {
                record = record.key(key);
            }
            if let Some(value) = value {
                record = record.payload(value);
            }
            if let Some(p) = partition {
                record = record.partition(p);
            }
            if let Some(h) = headers.clone() {
                record = record.headers(h);
            }
            match self.inner.send_result(record) {
                Ok(delivery) => {
                    let topic = topic.to_owned();
                    return Ok(Box::pin(async move {
                        match delivery.await {
                            Ok(Ok(delivered)) => Ok(delivered.offset),
                            Ok(Err((e, _))) => {
                                Err(KafkaEdgeError::kafka(format!("delivering to {topic}"), e))
                            }
                            Err(_canceled) => Err(KafkaEdgeError::Setup(format!(
                                "producer dropped a delivery to {topic}"
                            ))),
                        }
                    }));
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                    _,
                )) => {
                    // Back-pressure: wait for the local queue to drain, keep the order.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    return Err(KafkaEdgeError::kafka(format!("enqueueing to {topic}"), e));
                }
            }
        }
    }

    /// Writes a state record to the state partition that mirrors the command partition, or a
    /// tombstone (`value: None`) that deletes its key. `epoch` (the writer's claim, see
    /// `kafka::fence`) goes in the `pis.epoch` header: the only place a tombstone can carry it,
    /// so restore and the fence's tail can tell a superseded owner's deletion.
    pub async fn send_state(
        &self,
        partition: i32,
        key: &str,
        value: Option<&[u8]>,
        epoch: Option<i64>,
    ) -> Result<Delivered, KafkaEdgeError> {
        let topic = self.topics.state.clone();
        let epoch = epoch.map(|e| e.to_string());
        let headers = epoch.as_ref().map(|e| {
            OwnedHeaders::new().insert(Header {
                key: EPOCH_HEADER,
                value: Some(e.as_bytes()),
            })
        });
        self.enqueue_value(
            &topic,
            Some(partition),
            Some(key.as_bytes()),
            value,
            headers,
        )
        .await
    }

    /// Publishes one status event, keyed by payment id.
    pub async fn send_status(&self, event: &StatusEvent) -> Result<Delivered, KafkaEdgeError> {
        let value = contract::status::encode(event)
            .map_err(|e| KafkaEdgeError::StateCodec(format!("encoding status event: {e}")))?;
        let topic = self.topics.status.clone();
        let framed = contract::registry::status_schema_id().is_some();
        let key = event.payment_id.as_str().as_bytes();
        self.send_event(
            &topic,
            key,
            &value,
            event.event_id(),
            event.sequence,
            framed,
        )
        .await
    }

    /// Publishes one consent status event on the consent status topic, keyed by PSU id: a
    /// consent belongs to the PSU (one per brand and scope), and the key keeps a PSU's consent
    /// events in order on one partition.
    pub async fn send_consent_status(
        &self,
        event: &ConsentEvent,
    ) -> Result<Delivered, KafkaEdgeError> {
        let value = contract::consent_status::encode(event).map_err(|e| {
            KafkaEdgeError::StateCodec(format!("encoding consent status event: {e}"))
        })?;
        let topic = self.topics.consent_status.clone();
        let framed = contract::registry::consent_status_schema_id().is_some();
        let key = event.psu_id.as_str().as_bytes();
        self.send_event(
            &topic,
            key,
            &value,
            event.event_id(),
            event.sequence,
            framed,
        )
        .await
    }

    /// An event with its id, sequence and framing in headers (`confluent`: the value carries a
    /// schema registry id).
    async fn send_event(
        &self,
        topic: &str,
        key: &[u8],
        value: &[u8],
        event_id: uuid::Uuid,
        sequence: u64,
        confluent: bool,
    ) -> Result<Delivered, KafkaEdgeError> {
        let event_id = event_id.to_string();
        let sequence = sequence.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "pis.event_id",
                value: Some(event_id.as_bytes()),
            })
            .insert(Header {
                key: "pis.sequence",
                value: Some(sequence.as_bytes()),
            })
            .insert(Header {
                key: "content-type",
                value: Some(if confluent {
                    "application/vnd.apache.avro+binary; framing=confluent"
                } else {
                    "application/vnd.apache.avro+binary; framing=single-object"
                }),
            });
        self.enqueue(topic, None, key, value, Some(headers)).await
    }

    /// Dead-letters a command record: original key, value and headers, plus headers that say
    /// what was wrong and where it came from.
    pub async fn send_dlq(
        &self,
        original: &OwnedMessage,
        error_class: &str,
        error_message: &str,
        payment_id: Option<&str>,
    ) -> Result<Delivered, KafkaEdgeError> {
        let mut headers = OwnedHeaders::new();
        if let Some(original_headers) = original.headers() {
            for header in original_headers.iter() {
                headers = headers.insert(Header {
                    key: header.key,
                    value: header.value,
                });
            }
        }
        let partition = original.partition().to_string();
        let offset = original.offset().to_string();
        headers = headers
            .insert(Header {
                key: dlq_headers::ERROR_CLASS,
                value: Some(error_class),
            })
            .insert(Header {
                key: dlq_headers::ERROR_MESSAGE,
                value: Some(error_message),
            })
            .insert(Header {
                key: dlq_headers::SOURCE_TOPIC,
                value: Some(original.topic()),
            })
            .insert(Header {
                key: dlq_headers::SOURCE_PARTITION,
                value: Some(&partition),
            })
            .insert(Header {
                key: dlq_headers::SOURCE_OFFSET,
                value: Some(&offset),
            });
        if let Some(id) = payment_id {
            headers = headers.insert(Header {
                key: dlq_headers::PAYMENT_ID,
                value: Some(id),
            });
        }
        let topic = self.topics.dlq.clone();
        // The original key and value as they were: a null stays null.
        self.enqueue_value(
            &topic,
            Some(original.partition()),
            original.key(),
            original.payload(),
            Some(headers),
        )
        .await
    }

    /// Waits for everything enqueued to be delivered (shutdown, revoke).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaEdgeError> {
        self.inner
            .flush(timeout)
            .map_err(|e| KafkaEdgeError::kafka("flushing producer", e))
    }

    /// Records waiting in the local queue (a metric).
    pub fn queue_depth(&self) -> i32 {
        self.inner.in_flight_count()
    }

    /// Whether the broker answers a metadata request within `timeout` (blocking).
    pub fn broker_answers(&self, timeout: Duration) -> bool {
        self.inner
            .client()
            .fetch_metadata(None, timeout)
            .is_ok_and(|m| !m.brokers().is_empty())
    }
}
