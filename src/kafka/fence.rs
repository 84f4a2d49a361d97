//! Owner fencing on the state partition.
//!
//! A consumer group can hand a partition to a new member while the old one still believes it
//! owns it (a missed revoke, a paused process, a broker that lost group state: all seen with
//! the test broker). Every owner claims its partition by writing a restore marker; the newest
//! claim wins. An owner tails its state partition from its own marker on, and nothing it
//! persisted becomes visible outside (bank call, status event, committed offset) until the tail
//! has read past that write with no newer claim before it. So if a newer owner claimed the
//! partition first, the old owner stops without acting; if the old owner's write came first,
//! the newer owner's restore (which reads up to its own marker) includes it. Either way every
//! bank call is preceded by a state write that the current owner knows.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::BaseConsumer;
use tokio::sync::Notify;

use super::state::RESTORE_MARKER_PREFIX;

/// Why a write may not be acted on.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("partition {partition} was claimed by a newer owner at state offset {claimed_at}")]
    Superseded { partition: i32, claimed_at: i64 },
    #[error("partition {partition}: the state tail did not reach offset {offset} in {waited:?}")]
    Timeout {
        partition: i32,
        offset: i64,
        waited: Duration,
    },
    #[error("partition {partition}: the state tail stopped")]
    Stopped { partition: i32 },
}

/// The shared view of one owner's state tail.
pub struct Fence {
    partition: i32,
    own_marker: i64,
    /// Highest offset the tail has read.
    read_through: AtomicI64,
    /// Offset of the first newer claim read, `i64::MAX` while there is none.
    claimed_at: AtomicI64,
    stopped: AtomicBool,
    changed: Notify,
    /// Keys (payments and token pairs) a superseded owner wrote after this owner's claim, with
    /// the offset of that record: the owner re-writes them.
    stale_keys: Mutex<HashMap<String, i64>>,
}

impl Fence {
    pub fn new(partition: i32, own_marker: i64) -> Arc<Self> {
        Arc::new(Fence {
            partition,
            own_marker,
            read_through: AtomicI64::new(own_marker),
            claimed_at: AtomicI64::new(i64::MAX),
            stopped: AtomicBool::new(false),
            changed: Notify::new(),
            stale_keys: Mutex::new(HashMap::new()),
        })
    }

    /// Resolves once the tail has read through `offset` (a write of this owner) and no newer
    /// claim precedes it.
    pub async fn confirm(&self, offset: i64, timeout: Duration) -> Result<(), FenceError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Created before the checks, so a change between check and wait still wakes us.
            let changed = self.changed.notified();
            let claimed_at = self.claimed_at.load(Ordering::Acquire);
            if claimed_at < offset {
                return Err(FenceError::Superseded {
                    partition: self.partition,
                    claimed_at,
                });
            }
            if self.read_through.load(Ordering::Acquire) >= offset {
                return Ok(());
            }
            if self.stopped.load(Ordering::Acquire) {
                return Err(FenceError::Stopped {
                    partition: self.partition,
                });
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(FenceError::Timeout {
                    partition: self.partition,
                    offset,
                    waited: timeout,
                });
            }
        }
    }

    /// The offset of this owner's own claim: the epoch of its writes.
    pub fn own_marker(&self) -> i64 {
        self.own_marker
    }

    /// The first newer claim, if the tail has seen one.
    pub fn superseded_at(&self) -> Option<i64> {
        let at = self.claimed_at.load(Ordering::Acquire);
        (at != i64::MAX).then_some(at)
    }

    /// Resolves with the offset of the first newer claim once the tail has read one, or never
    /// once the tail is stopped without one.
    pub async fn superseded(&self) -> i64 {
        loop {
            let changed = self.changed.notified();
            if let Some(at) = self.superseded_at() {
                return at;
            }
            if self.stopped.load(Ordering::Acquire) {
                std::future::pending::<()>().await;
            }
            changed.await;
        }
    }

    /// Ends the tail (the owner is done).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Record keys a superseded owner wrote since the last call, with the offset of the
    /// latest such record of each.
    pub fn take_stale_keys(&self) -> Vec<(String, i64)> {
        let mut stale = self.stale_keys.lock().unwrap_or_else(|p| p.into_inner());
        stale.drain().collect()
    }

    /// A record read by the tail. `has_value`: not a tombstone (a tombstone under a marker key
    /// deletes an old claim and is no claim itself).
    fn observe(&self, offset: i64, key: Option<&[u8]>, has_value: bool) {
        if offset > self.own_marker
            && has_value
            && key.is_some_and(|k| k.starts_with(RESTORE_MARKER_PREFIX.as_bytes()))
        {
            self.claimed_at.fetch_min(offset, Ordering::AcqRel);
        }
        self.read_through.fetch_max(offset, Ordering::AcqRel);
    }

    /// A payment or token record (or tombstone) written after this owner's claim by an older
    /// owner (its `pis.epoch` header is below this owner's epoch).
    fn observe_entity(&self, offset: i64, key: &[u8], epoch: Option<i64>) {
        if offset <= self.own_marker {
            return;
        }
        let entity = key.starts_with(b"payment/") || key.starts_with(b"psu/");
        let Some(epoch) = epoch else {
            return;
        };
        if entity && epoch < self.own_marker {
            self.stale_keys
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(String::from_utf8_lossy(key).into_owned(), offset);
        }
    }
}

/// The writer's epoch from a state record's `pis.epoch` header (the producer sets it, so the
/// tail need not parse the record).
pub fn epoch_header(message: &impl Message) -> Option<i64> {
    use rdkafka::message::Headers;
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == super::producer::EPOCH_HEADER)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
}

/// Tails the state partition on its own thread until the fence is stopped. `consumer` is the
/// restore consumer, positioned right after the owner's marker.
pub fn spawn_tail(consumer: BaseConsumer, fence: Arc<Fence>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(format!("state-tail-{}", fence.partition))
        .spawn(move || {
            while !fence.stopped.load(Ordering::Acquire) {
                match consumer.poll(Duration::from_millis(100)) {
                    None => continue,
                    Some(Ok(message)) => {
                        if let Some(key) = message.key() {
                            fence.observe_entity(message.offset(), key, epoch_header(&message));
                        }
                        fence.observe(message.offset(), message.key(), message.payload().is_some());
                        fence.changed.notify_waiters();
                    }
                    // Broker restarts and leader moves: librdkafka reconnects by itself.
                    Some(Err(e)) => {
                        tracing::debug!(partition = fence.partition, error = %e, "state tail");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_is_confirmed_once_the_tail_reads_past_it() {
        let fence = Fence::new(0, 10);
        let waiter = {
            let fence = fence.clone();
            tokio::spawn(async move { fence.confirm(12, Duration::from_secs(5)).await })
        };
        fence.observe(11, Some(b"payment/a"), true);
        fence.changed.notify_waiters();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        fence.observe(12, Some(b"payment/a"), true);
        fence.changed.notify_waiters();
        assert!(waiter.await.expect("join").is_ok());
    }

    #[tokio::test]
    async fn a_newer_claim_before_the_write_fences_it_and_after_it_does_not() {
        let fence = Fence::new(0, 10);
        fence.observe(14, Some(b"restore-marker/0/other"), true);
        fence.observe(20, Some(b"payment/a"), true);
        // Written before the newer claim: the new owner's restore has it.
        assert!(fence.confirm(13, Duration::from_secs(1)).await.is_ok());
        // Written after it: must not be acted on.
        assert!(matches!(
            fence.confirm(15, Duration::from_secs(1)).await,
            Err(FenceError::Superseded { claimed_at: 14, .. })
        ));
        assert_eq!(fence.superseded_at(), Some(14));
    }

    #[test]
    fn an_entity_written_by_an_older_owner_after_the_claim_is_reported_once() {
        let fence = Fence::new(0, 10);
        fence.observe_entity(9, b"payment/before", Some(3));
        fence.observe_entity(11, b"payment/mine", Some(10));
        fence.observe_entity(12, b"payment/zombie", Some(3));
        fence.observe_entity(13, b"psu/BELFIUS/x", Some(3));
        fence.observe_entity(14, b"payment/no-header", None);
        fence.observe_entity(15, b"outbox-checkpoint/0", Some(3));
        let mut stale = fence.take_stale_keys();
        stale.sort();
        assert_eq!(
            stale,
            vec![
                ("payment/zombie".to_owned(), 12),
                ("psu/BELFIUS/x".to_owned(), 13)
            ]
        );
        assert!(fence.take_stale_keys().is_empty());
    }

    #[tokio::test]
    async fn superseded_resolves_with_the_first_newer_claim() {
        let fence = Fence::new(0, 10);
        let waiter = {
            let fence = fence.clone();
            tokio::spawn(async move { fence.superseded().await })
        };
        fence.observe(12, Some(b"payment/a"), true);
        fence.changed.notify_waiters();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        fence.observe(13, Some(b"restore-marker/0/other"), true);
        fence.changed.notify_waiters();
        assert_eq!(waiter.await.expect("join"), 13);
    }

    #[tokio::test]
    async fn a_deleted_marker_is_no_claim() {
        let fence = Fence::new(0, 10);
        fence.observe(14, Some(b"restore-marker/0/old"), false);
        fence.observe(15, Some(b"payment/a"), true);
        assert!(fence.confirm(15, Duration::from_secs(1)).await.is_ok());
        assert_eq!(fence.superseded_at(), None);
    }

    #[tokio::test]
    async fn the_own_marker_is_not_a_newer_claim() {
        let fence = Fence::new(0, 10);
        fence.observe(10, Some(b"restore-marker/0/me"), true);
        fence.observe(11, Some(b"payment/a"), true);
        assert!(fence.confirm(11, Duration::from_secs(1)).await.is_ok());
    }

    #[tokio::test]
    async fn a_tail_that_never_arrives_times_out_and_a_stopped_one_says_so() {
        let fence = Fence::new(0, 10);
        assert!(matches!(
            fence.confirm(11, Duration::from_millis(50)).await,
            Err(FenceError::Timeout { .. })
        ));
        fence.stop();
        assert!(matches!(
            fence.confirm(11, Duration::from_secs(1)).await,
            Err(FenceError::Stopped { .. })
        ));
    }
}
