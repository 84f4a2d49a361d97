//! Which command offset may be committed: the lowest one not yet durable. Commands of different
//! payments finish out of order; the committed offset never passes an unfinished one.

use std::collections::BTreeSet;

#[derive(Debug, Default)]
pub struct OffsetTracker {
    pending: BTreeSet<i64>,
    highest_seen: Option<i64>,
}

impl OffsetTracker {
    /// A command at `offset` was received (offsets arrive in increasing order).
    pub fn begin(&mut self, offset: i64) {
        self.pending.insert(offset);
        self.highest_seen = Some(self.highest_seen.map_or(offset, |h| h.max(offset)));
    }

    /// The command at `offset` is fully handled (its state is durable, or it is dead-lettered).
    pub fn done(&mut self, offset: i64) {
        self.pending.remove(&offset);
    }

    /// The next offset to consume after a restart: everything before it is handled.
    pub fn committable(&self) -> Option<i64> {
        match self.pending.first() {
            Some(lowest) => Some(*lowest),
            None => self.highest_seen.map(|h| h + 1),
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_commits_past_an_unfinished_command() {
        let mut t = OffsetTracker::default();
        assert_eq!(t.committable(), None);
        for o in 10..15 {
            t.begin(o);
        }
        t.done(12);
        t.done(13);
        assert_eq!(t.committable(), Some(10));
        t.done(10);
        assert_eq!(t.committable(), Some(11));
        t.done(11);
        assert_eq!(t.committable(), Some(14));
        t.done(14);
        assert_eq!(t.committable(), Some(15));
        assert_eq!(t.pending(), 0);
    }
}
