//! Outbox checkpointing. Status events live in the state records that emit them; once every
//! event in records up to offset X is on the status topic, a checkpoint record says so, and a
//! restore re-publishes only events after it (at-least-once, de-duplicated by sequence).
//!
//! State writes to one partition are enqueued in order, so they get increasing offsets in send
//! order: once all sends up to N are acknowledged, no later send can land below their offsets.

use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug)]
pub struct OutboxTracker {
    next_send: u64,
    /// Sends acknowledged out of order, waiting for earlier ones.
    acked_ahead: BTreeMap<u64, i64>,
    /// All sends below this are acknowledged.
    contiguous_sends: u64,
    /// Highest offset among the contiguous acknowledged sends.
    contiguous_offset: i64,
    /// State offsets whose events are not yet all published.
    unpublished: BTreeSet<i64>,
    last_checkpoint: i64,
}

impl OutboxTracker {
    /// `end_offset`: the partition's end at restore; `checkpoint`: the restored checkpoint.
    pub fn new(end_offset: i64, checkpoint: i64) -> Self {
        Self {
            next_send: 0,
            acked_ahead: BTreeMap::new(),
            contiguous_sends: 0,
            contiguous_offset: end_offset - 1,
            unpublished: BTreeSet::new(),
            last_checkpoint: checkpoint,
        }
    }

    /// The number the next state write will get.
    pub fn next_send(&self) -> u64 {
        self.next_send
    }

    /// The last checkpoint written (or restored).
    pub fn last_checkpoint(&self) -> i64 {
        self.last_checkpoint
    }

    /// Numbers a state write; call in the order writes are enqueued.
    pub fn sent(&mut self) -> u64 {
        let seq = self.next_send;
        self.next_send += 1;
        seq
    }

    /// A write was acknowledged at `offset`; `has_events` if its events still need publishing.
    pub fn acked(&mut self, seq: u64, offset: i64, has_events: bool) {
        if has_events {
            self.unpublished.insert(offset);
        }
        self.acked_ahead.insert(seq, offset);
        while let Some(offset) = self.acked_ahead.remove(&self.contiguous_sends) {
            self.contiguous_offset = self.contiguous_offset.max(offset);
            self.contiguous_sends += 1;
        }
    }

    /// Events restored from before a crash, to be re-published.
    pub fn restored_unpublished(&mut self, offset: i64) {
        self.unpublished.insert(offset);
    }

    /// All events of the record at `offset` are on the status topic.
    pub fn published(&mut self, offset: i64) {
        self.unpublished.remove(&offset);
    }

    /// The checkpoint to write now, if it moved.
    pub fn checkpoint_due(&self) -> Option<i64> {
        let through = match self.unpublished.first() {
            Some(first) => (first - 1).min(self.contiguous_offset),
            None => self.contiguous_offset,
        };
        (through > self.last_checkpoint).then_some(through)
    }

    pub fn checkpoint_written(&mut self, through: i64) {
        self.last_checkpoint = self.last_checkpoint.max(through);
    }

    pub fn unpublished(&self) -> usize {
        self.unpublished.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_waits_for_unpublished_events_and_unacked_sends() {
        let mut t = OutboxTracker::new(100, 99);
        assert_eq!(t.checkpoint_due(), None);
        let a = t.sent();
        let b = t.sent();
        let c = t.sent();
        // b acknowledged before a: nothing is known about a's offset yet.
        t.acked(b, 101, false);
        assert_eq!(t.checkpoint_due(), None);
        t.acked(a, 100, true);
        // a's events are unpublished: the checkpoint stops before it.
        assert_eq!(t.checkpoint_due(), None);
        t.published(100);
        assert_eq!(t.checkpoint_due(), Some(101));
        t.checkpoint_written(101);
        t.acked(c, 102, true);
        assert_eq!(t.checkpoint_due(), None);
        t.published(102);
        assert_eq!(t.checkpoint_due(), Some(102));
    }

    #[test]
    fn restored_events_hold_the_checkpoint_until_republished() {
        let mut t = OutboxTracker::new(50, 40);
        t.restored_unpublished(45);
        assert_eq!(t.checkpoint_due(), Some(44));
        t.published(45);
        assert_eq!(t.checkpoint_due(), Some(49));
    }
}
