//! Commit-order delivery on PostgreSQL, without any lock on the write path.
//!
//! Positions come from a sequence, so a transaction can take position 10, another take 11
//! and commit first. A reader that delivered 11 would never deliver 10. The tailer therefore
//! reads the log together with the list of transactions in progress *in the same snapshot*
//! (`EventStore::event_snapshot`) and keeps two numbers:
//!
//! - `delivered`: the highest position handed to subscribers;
//! - `final_through`: every position up to it is final — committed and visible, or never to
//!   be (a rolled-back transaction leaves a hole).
//!
//! Why that is knowable: a transaction appending an event takes its transaction id before its
//! position (store/postgres/events.rs). So if a snapshot shows position M committed, any
//! transaction holding a position below M had its id before M's transaction committed, and
//! is listed in that snapshot as in progress, or already finished. Once every transaction of
//! that list has finished (none is in a later snapshot's list), every position up to M is
//! final. When the list is empty, at once.
//!
//! A position is delivered when it follows `delivered` directly or every position before it
//! is final; the holes of rolled-back transactions are skipped once they are known to be
//! final. Readers of the log (the admin API, durable consumers) read only up to the
//! watermark: the highest position below which everything is final.

use std::collections::HashSet;

use crate::store::{Event, EventSnapshot};

#[derive(Debug)]
pub(crate) struct Tailer {
    delivered: i64,
    final_through: i64,
    /// The position the tailer started at: it never delivers at or below it, and the
    /// watermark stays at `final_through` until that is final too.
    start: i64,
    /// Snapshots still waiting for their in-progress transactions: (highest position seen,
    /// those transactions).
    pending: Vec<(i64, HashSet<u64>)>,
}

impl Tailer {
    /// A tailer that delivers what commits after position `start` (the highest position in
    /// the log when it starts).
    pub(crate) fn new(start: i64) -> Tailer {
        Tailer {
            delivered: start,
            final_through: 0,
            start,
            pending: Vec::new(),
        }
    }

    /// Where the next read should start.
    pub(crate) fn delivered(&self) -> i64 {
        self.delivered
    }

    /// Every position at or below this is final.
    pub(crate) fn watermark(&self) -> i64 {
        if self.final_through >= self.start {
            self.final_through.max(self.delivered)
        } else {
            self.final_through
        }
    }

    /// Whether a later read may deliver or finalise more without anything new committing
    /// (some transaction seen in progress has not been seen finished yet).
    pub(crate) fn waiting(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Takes one snapshot of the log after [`Tailer::delivered`] (possibly cut short by a
    /// limit); answers the events to deliver now, in position order.
    pub(crate) fn observe(&mut self, snapshot: EventSnapshot) -> Vec<Event> {
        let in_progress: HashSet<u64> = snapshot.in_progress.into_iter().collect();
        let final_through = &mut self.final_through;
        self.pending.retain(|(seen, waiting_for)| {
            if waiting_for.is_disjoint(&in_progress) {
                *final_through = (*final_through).max(*seen);
                false
            } else {
                true
            }
        });
        let highest = snapshot
            .events
            .last()
            .map(|e| e.position)
            .unwrap_or(self.delivered)
            .max(self.delivered);
        if in_progress.is_empty() {
            self.final_through = self.final_through.max(highest);
        } else if highest > self.final_through {
            self.pending.push((highest, in_progress));
        }
        let mut out = Vec::new();
        for event in snapshot.events {
            if event.position <= self.delivered {
                continue;
            }
            let follows = event.position == self.delivered + 1;
            if !(follows || event.position - 1 <= self.final_through) {
                break;
            }
            self.delivered = event.position;
            out.push(event);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Actor, EventOp};

    fn ev(position: i64) -> Event {
        Event {
            position,
            topic: "db/t".into(),
            key: position.to_string(),
            op: EventOp::Create,
            actor: Actor::system("test"),
            time: chrono::Utc::now(),
            data: None,
            old_data: None,
            payload_omitted: false,
        }
    }

    fn snap(positions: &[i64], in_progress: &[u64]) -> EventSnapshot {
        EventSnapshot {
            events: positions.iter().copied().map(ev).collect(),
            in_progress: in_progress.to_vec(),
        }
    }

    fn positions(events: &[Event]) -> Vec<i64> {
        events.iter().map(|e| e.position).collect()
    }

    #[test]
    fn a_position_committed_late_is_delivered_before_those_after_it() {
        let mut t = Tailer::new(10);
        // 11 and 13 are visible, 12 is held by transaction 7, still running.
        assert_eq!(positions(&t.observe(snap(&[11, 13], &[7]))), vec![11]);
        assert_eq!(t.watermark(), 0, "the start is not final yet");
        // 12 commits.
        assert_eq!(positions(&t.observe(snap(&[12, 13], &[]))), vec![12, 13]);
        assert_eq!(t.watermark(), 13);
    }

    #[test]
    fn a_rolled_back_position_is_skipped_once_its_transaction_is_gone() {
        let mut t = Tailer::new(0);
        assert_eq!(positions(&t.observe(snap(&[1, 3], &[5, 6]))), vec![1]);
        // Transaction 5 (holding 2) rolled back; 6 still runs: 2 may still be 6's.
        assert_eq!(
            positions(&t.observe(snap(&[3], &[6, 9]))),
            Vec::<i64>::new()
        );
        // 6 finished without a position below 3: 2 is a hole for good.
        assert_eq!(positions(&t.observe(snap(&[3, 4], &[9]))), vec![3, 4]);
        assert_eq!(t.watermark(), 4);
    }

    #[test]
    fn a_busy_database_still_moves_the_watermark() {
        // Never a snapshot without transactions in progress, but each set drains.
        let mut t = Tailer::new(0);
        t.observe(snap(&[1, 2], &[1]));
        t.observe(snap(&[1, 2, 3], &[2]));
        assert!(t.watermark() >= 2);
        t.observe(snap(&[4], &[3]));
        assert!(t.watermark() >= 3);
        assert_eq!(t.delivered(), 4);
    }
}
