//! Commit-order delivery on PostgreSQL, without serialising writers.
//!
//! Positions come from a sequence, so a transaction can take position 10, another take 11
//! and commit first. A reader that delivered 11 would never deliver 10. The tailer therefore
//! reads, in this order, the last position handed out (`through`), the transactions still
//! appending (each holds a shared advisory lock from before it takes a position until it
//! ends; see store/postgres/events.rs), then the log (`EventStore::event_snapshot`), and
//! keeps two numbers:
//!
//! - `delivered`: the highest position handed to subscribers;
//! - `final_through`: every position up to it is final — committed and visible, or never to
//!   be (a rolled-back transaction leaves a hole).
//!
//! Why that is knowable: whoever took a position at or below `through` held the lock before
//! taking it, so it is among those appending at the second read or has already ended. Once
//! none of them appends any more (they are absent from a later read), every position up to
//! `through` is final; when none was appending, at once. Whatever they committed is visible
//! to the log read that follows.
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
    /// Reads still waiting for the transactions that were appending: (their `through`, those
    /// transactions).
    pending: Vec<(i64, HashSet<String>)>,
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
        let appending: HashSet<String> = snapshot.appending.into_iter().collect();
        let final_through = &mut self.final_through;
        self.pending.retain(|(through, waiting_for)| {
            if waiting_for.is_disjoint(&appending) {
                *final_through = (*final_through).max(*through);
                false
            } else {
                true
            }
        });
        if appending.is_empty() {
            self.final_through = self.final_through.max(snapshot.through);
        } else if snapshot.through > self.final_through {
            self.pending.push((snapshot.through, appending));
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

    /// A read that saw `positions`, the sequence at `through`, and `appending` holding the
    /// lock.
    fn snap(positions: &[i64], through: i64, appending: &[&str]) -> EventSnapshot {
        EventSnapshot {
            through,
            appending: appending.iter().map(|a| a.to_string()).collect(),
            events: positions.iter().copied().map(ev).collect(),
        }
    }

    fn positions(events: &[Event]) -> Vec<i64> {
        events.iter().map(|e| e.position).collect()
    }

    #[test]
    fn a_position_committed_late_is_delivered_before_those_after_it() {
        let mut t = Tailer::new(10);
        // 11 and 13 are visible; 12 is held by transaction "3/7", still appending.
        assert_eq!(
            positions(&t.observe(snap(&[11, 13], 13, &["3/7"]))),
            vec![11]
        );
        assert_eq!(t.watermark(), 0, "the start is not final yet");
        // 12 commits.
        assert_eq!(
            positions(&t.observe(snap(&[12, 13], 13, &[]))),
            vec![12, 13]
        );
        assert_eq!(t.watermark(), 13);
    }

    #[test]
    fn a_transaction_appending_after_the_read_cannot_hold_back_what_was_final() {
        let mut t = Tailer::new(0);
        // Nobody was appending when the sequence stood at 2: 1 and 2 are final.
        assert_eq!(positions(&t.observe(snap(&[1, 2], 2, &[]))), vec![1, 2]);
        // 4 is visible, 3 is held by "5/1", which took its lock after the sequence read 4.
        assert_eq!(
            positions(&t.observe(snap(&[4], 4, &["5/1"]))),
            Vec::<i64>::new()
        );
        assert_eq!(t.watermark(), 2);
    }

    #[test]
    fn a_rolled_back_position_is_skipped_once_its_transaction_is_gone() {
        let mut t = Tailer::new(0);
        assert_eq!(
            positions(&t.observe(snap(&[1, 3], 3, &["a", "b"]))),
            vec![1]
        );
        // "a" (holding 2) rolled back; "b" still appends: 2 may still be b's.
        assert_eq!(
            positions(&t.observe(snap(&[3], 3, &["b", "c"]))),
            Vec::<i64>::new()
        );
        // "b" ended without a position below 3: 2 is a hole for good.
        assert_eq!(positions(&t.observe(snap(&[3, 4], 4, &["c"]))), vec![3, 4]);
        assert_eq!(t.watermark(), 4);
    }

    #[test]
    fn a_busy_database_still_moves_the_watermark() {
        // Never a read without someone appending, but each set of appenders ends.
        let mut t = Tailer::new(0);
        t.observe(snap(&[1, 2], 2, &["1"]));
        t.observe(snap(&[1, 2, 3], 3, &["2"]));
        assert!(t.watermark() >= 2);
        t.observe(snap(&[4], 4, &["3"]));
        assert!(t.watermark() >= 3);
        assert_eq!(t.delivered(), 4);
    }
}
