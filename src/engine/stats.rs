//! Per-partition payment statistics for the gauges: each owner publishes a summary of its
//! payments; `/metrics` adds them up. Owners come and go with rebalances, so the gauges are
//! recomputed from the summaries rather than incremented.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use crate::domain::machine::{Millis, StateKind};
use crate::metrics::metrics;

/// States whose oldest payment's age is exported (the ones that can get stuck).
pub const AGED_STATES: [StateKind; 4] = [
    StateKind::ScaPending,
    StateKind::OutcomeUnknown,
    StateKind::Initiating,
    StateKind::Cancelling,
];

#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub per_state: HashMap<StateKind, i64>,
    /// Earliest time a payment still in that state entered it.
    pub oldest_entry: HashMap<StateKind, Millis>,
    /// State records that could not be read (quarantined).
    pub quarantined: i64,
    /// Retired payment ids still remembered.
    pub retired: i64,
    /// When the newest snapshot of the partition began (or, none recorded yet, when its owner
    /// started; `None`: unknown).
    pub snapshot_at: Option<Millis>,
    /// Records a restore of the partition would read now.
    pub restore_backlog: i64,
}

fn summaries() -> &'static Mutex<HashMap<i32, Summary>> {
    static SUMMARIES: OnceLock<Mutex<HashMap<i32, Summary>>> = OnceLock::new();
    SUMMARIES.get_or_init(|| Mutex::new(HashMap::new()))
}

pub fn publish(partition: i32, summary: Summary) {
    summaries()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(partition, summary);
}

pub fn forget(partition: i32) {
    summaries()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&partition);
}

/// Sets the payment gauges from the summaries of the partitions owned now.
pub fn export() {
    let now = super::now_millis();
    let all = summaries().lock().unwrap_or_else(|p| p.into_inner());
    let m = metrics();
    for kind in StateKind::ALL {
        let count: i64 = all
            .values()
            .map(|s| s.per_state.get(&kind).copied().unwrap_or(0))
            .sum();
        m.payments.with_label_values(&[kind.symbol()]).set(count);
    }
    for kind in AGED_STATES {
        let oldest = all
            .values()
            .filter_map(|s| s.oldest_entry.get(&kind).copied())
            .min();
        let age_secs = oldest.map(|at| ((now - at) / 1000).max(0)).unwrap_or(0);
        m.oldest_payment_age
            .with_label_values(&[kind.symbol()])
            .set(age_secs);
    }
    let unknown: i64 = all
        .values()
        .map(|s| {
            s.per_state
                .get(&StateKind::OutcomeUnknown)
                .copied()
                .unwrap_or(0)
        })
        .sum();
    m.outcome_unknown.set(unknown);
    m.state_quarantined_records
        .set(all.values().map(|s| s.quarantined).sum());
    m.retired_ids.set(all.values().map(|s| s.retired).sum());
    m.snapshot_age.reset();
    m.restore_backlog.reset();
    for (partition, summary) in all.iter() {
        let label = partition.to_string();
        if let Some(at) = summary.snapshot_at {
            m.snapshot_age
                .with_label_values(&[&label])
                .set(((now - at) / 1000).max(0));
        }
        m.restore_backlog
            .with_label_values(&[&label])
            .set(summary.restore_backlog);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_add_up_owned_partitions_and_drop_released_ones() {
        let now = super::super::now_millis();
        let mut a = Summary::default();
        a.per_state.insert(StateKind::ScaPending, 2);
        a.oldest_entry.insert(StateKind::ScaPending, now - 120_000);
        let mut b = Summary::default();
        b.per_state.insert(StateKind::ScaPending, 3);
        b.per_state.insert(StateKind::OutcomeUnknown, 1);
        b.oldest_entry.insert(StateKind::ScaPending, now - 10_000);
        publish(9001, a);
        publish(9002, b);
        export();
        let m = metrics();
        assert_eq!(m.payments.with_label_values(&["SCA_PENDING"]).get(), 5);
        assert_eq!(m.outcome_unknown.get(), 1);
        let age = m
            .oldest_payment_age
            .with_label_values(&["SCA_PENDING"])
            .get();
        assert!((119..=125).contains(&age), "age {age}");
        forget(9001);
        forget(9002);
        export();
        assert_eq!(m.payments.with_label_values(&["SCA_PENDING"]).get(), 0);
    }
}
