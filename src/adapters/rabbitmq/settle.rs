//! Batched acknowledgements for one consumer channel.
//!
//! Every settlement of a channel goes through one task, in order, so that
//! an ack with `multiple` can never overtake (and so swallow) a requeue of
//! a tag below it. The task keeps a ledger of the channel's open delivery
//! tags; when the lowest open tags are all done it acks them with one
//! `basic.ack multiple` for the highest of them. Tags done behind a tag
//! still in progress wait at most [`HOLD`], then are acked one by one, so a
//! slow command never keeps the prefetch window full of finished ones.
//!
//! Safe because a delivery is marked done only once its outcome is durable
//! (the core's rule), deliveries arrive in tag order and are registered as
//! they are read, and a handle dropped unsettled is requeued (in order,
//! like any requeue), never covered by a multiple ack. Each subscription has
//! its own channel, so tags never restart under a ledger (lapin's automatic
//! channel recovery, which would restart them, is not used).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Acker;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Longest an ack waits behind a tag still in progress.
pub(super) const HOLD: Duration = Duration::from_millis(20);

/// What deliveries tell the settling task.
pub(super) enum Settle {
    /// Read from the consumer: open until settled.
    Open(u64),
    /// Outcome durable: ack (possibly batched).
    Done(u64, Acker),
    /// Hand back to the queue now; the answer says whether it went out.
    Requeue(u64, Acker, oneshot::Sender<lapin::Result<bool>>),
    /// Dropped without a settlement (its step panicked or was cancelled):
    /// hand it back, never ack it.
    Abandoned(u64, Acker),
}

#[derive(Debug)]
enum Slot<A> {
    Working,
    /// Done, since when.
    Done(A, Instant),
}

/// The open tags of a channel and what became of them.
#[derive(Debug)]
pub(super) struct Ledger<A> {
    open: BTreeMap<u64, Slot<A>>,
    /// Done tags in the order they were done, so oldest first; those since
    /// settled another way are skipped when they reach the front. Keeps
    /// finding the next deadline from scanning up to `prefetch` open tags
    /// after every batch.
    held: VecDeque<(Instant, u64)>,
}

impl<A> Default for Ledger<A> {
    fn default() -> Self {
        Self {
            open: BTreeMap::new(),
            held: VecDeque::new(),
        }
    }
}

impl<A> Ledger<A> {
    pub(super) fn open(&mut self, tag: u64) {
        self.open.insert(tag, Slot::Working);
    }

    pub(super) fn done(&mut self, tag: u64, acker: A, now: Instant) {
        self.open.insert(tag, Slot::Done(acker, now));
        self.held.push_back((now, tag));
    }

    /// Whether `tag` is still open and done since `since`.
    fn waiting(&self, tag: u64, since: Instant) -> bool {
        matches!(self.open.get(&tag), Some(Slot::Done(_, at)) if *at == since)
    }

    /// Settled some other way (a requeue): no longer open.
    pub(super) fn forget(&mut self, tag: u64) {
        self.open.remove(&tag);
    }

    /// Takes the run of done tags at the bottom of the ledger and returns
    /// the acker of the highest, whose `multiple` ack settles them all.
    pub(super) fn take_prefix(&mut self) -> Option<A> {
        let mut last = None;
        while let Some(entry) = self.open.first_entry() {
            if !matches!(entry.get(), Slot::Done(..)) {
                break;
            }
            if let Slot::Done(acker, _) = entry.remove() {
                last = Some(acker);
            }
        }
        last
    }

    /// Done tags that have waited behind an unfinished one since `cutoff`
    /// or longer, taken out of the ledger.
    pub(super) fn take_held(&mut self, cutoff: Instant) -> Vec<A> {
        let mut taken = Vec::new();
        while let Some(&(since, tag)) = self.held.front() {
            if since > cutoff {
                break;
            }
            self.held.pop_front();
            if self.waiting(tag, since) {
                if let Some(Slot::Done(acker, _)) = self.open.remove(&tag) {
                    taken.push(acker);
                }
            }
        }
        taken
    }

    /// When the longest-waiting held tag is due to be acked on its own.
    pub(super) fn deadline(&mut self) -> Option<Instant> {
        while let Some(&(since, tag)) = self.held.front() {
            if self.waiting(tag, since) {
                return Some(since + HOLD);
            }
            self.held.pop_front();
        }
        None
    }
}

/// Runs until every sender (the stream and all its deliveries) is gone,
/// settling in order; whatever is done at the end is acked before it exits.
pub(super) async fn run(mut inbox: mpsc::UnboundedReceiver<Settle>) {
    let mut ledger = Ledger::default();
    let mut batch = Vec::with_capacity(256);
    loop {
        let received = match ledger.deadline() {
            Some(at) => tokio::select! {
                n = inbox.recv_many(&mut batch, 1024) => n,
                _ = tokio::time::sleep_until(at) => {
                    for acker in ledger.take_held(Instant::now() - HOLD) {
                        ack(&acker, false).await;
                    }
                    continue;
                }
            },
            None => inbox.recv_many(&mut batch, 1024).await,
        };
        if received == 0 {
            break;
        }
        let now = Instant::now();
        for message in batch.drain(..) {
            match message {
                Settle::Open(tag) => ledger.open(tag),
                Settle::Done(tag, acker) => ledger.done(tag, acker, now),
                Settle::Requeue(tag, acker, answer) => {
                    ledger.forget(tag);
                    let _ = answer.send(requeue(&acker).await);
                }
                Settle::Abandoned(tag, acker) => {
                    ledger.forget(tag);
                    if let Err(e) = requeue(&acker).await {
                        tracing::warn!(error = %e, "could not requeue an abandoned delivery");
                    }
                }
            }
        }
        if let Some(acker) = ledger.take_prefix() {
            ack(&acker, true).await;
        }
    }
    if let Some(acker) = ledger.take_prefix() {
        ack(&acker, true).await;
    }
    for acker in ledger.take_held(Instant::now()) {
        ack(&acker, false).await;
    }
}

/// Awaited before anything else is sent: lapin sends each settlement from
/// a task of its own, so awaiting is what keeps them in order on the wire.
async fn requeue(acker: &Acker) -> lapin::Result<bool> {
    let options = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    acker.nack(options).await
}

async fn ack(acker: &Acker, multiple: bool) {
    match acker.ack(BasicAckOptions { multiple }).await {
        Ok(true) => metrics::counter!("sms_amqp_acks_sent_total").increment(1),
        // The channel is gone: the broker redelivers, and the store turns
        // the redelivery into a duplicate that is acked then.
        Ok(false) => tracing::debug!("ack not sent: channel closed"),
        Err(e) => tracing::warn!(error = %e, "ack not sent; the broker will redeliver"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(tags: impl IntoIterator<Item = u64>) -> Ledger<u64> {
        let mut ledger = Ledger::default();
        for tag in tags {
            ledger.open(tag);
        }
        ledger
    }

    #[test]
    fn a_run_of_done_tags_at_the_bottom_is_acked_by_its_highest() {
        let now = Instant::now();
        let mut l = ledger(1..=5);
        l.done(2, 2, now);
        l.done(1, 1, now);
        l.done(4, 4, now);
        assert_eq!(l.take_prefix(), Some(2));
        // 3 is still working: 4 waits behind it.
        assert_eq!(l.take_prefix(), None);
        l.done(3, 3, now);
        assert_eq!(l.take_prefix(), Some(4));
        assert_eq!(l.take_held(now), Vec::<u64>::new());
    }

    #[test]
    fn nothing_is_acked_past_a_working_tag() {
        let now = Instant::now();
        let mut l = ledger(1..=3);
        l.done(2, 2, now);
        l.done(3, 3, now);
        assert_eq!(l.take_prefix(), None);
        // Held ones go out one by one, never as a multiple over 1.
        assert_eq!(l.take_held(now), vec![2, 3]);
        assert_eq!(l.take_prefix(), None);
    }

    #[test]
    fn a_requeued_tag_no_longer_blocks_the_prefix() {
        let now = Instant::now();
        let mut l = ledger(1..=3);
        l.done(2, 2, now);
        l.done(3, 3, now);
        l.forget(1);
        assert_eq!(l.take_prefix(), Some(3));
    }

    #[test]
    fn settled_tags_leave_the_held_list_as_they_reach_its_front() {
        let start = Instant::now();
        let mut l = ledger(1..=1000);
        for tag in 2..=1000 {
            l.done(tag, tag, start);
        }
        l.done(1, 1, start + HOLD);
        assert_eq!(l.take_prefix(), Some(1000));
        assert_eq!(l.deadline(), None);
        assert!(l.held.is_empty(), "{} stale entries kept", l.held.len());
    }

    #[test]
    fn a_held_tag_is_due_on_its_own_after_the_hold() {
        let start = Instant::now();
        let mut l = ledger(1..=3);
        assert_eq!(l.deadline(), None);
        l.done(2, 2, start);
        l.done(3, 3, start + HOLD / 2);
        assert_eq!(l.deadline(), Some(start + HOLD));
        // At the first deadline only the one that waited HOLD goes.
        assert_eq!(l.take_held(start), vec![2]);
        assert_eq!(l.deadline(), Some(start + HOLD / 2 + HOLD));
        l.done(1, 1, start + HOLD);
        assert_eq!(l.take_prefix(), Some(3));
        assert_eq!(l.deadline(), None);
    }
}
