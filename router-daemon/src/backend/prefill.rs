//! What a backend still has to prefill: the uncached prompt bytes of this
//! router's requests it has not begun to answer, less the progress its
//! engine has made on them.
//!
//! Counting those bytes alone ranks two backends that each prefill one
//! prompt alike, though one began a moment ago and the other is nearly
//! done; near capacity, where nearly every backend prefills something,
//! that ranking is a coin toss and a new prompt waits behind a whole
//! prefill half the time (round-robin, which sends to the backend that got
//! a request longest ago, waited less). An engine prefills its queue in
//! order, so since the backend last had nothing to prefill (the start of
//! its busy period) it has done `rate × elapsed` bytes, of which the
//! requests answered since account for their own; the rest is progress on
//! the bytes still queued. The rate is learned per backend from requests
//! sent while nothing else was prefilling there: their uncached bytes over
//! the time to their first body byte, so the fixed part of that time makes
//! it an underestimate, and the estimate leans towards the bytes queued.
//! Until a rate is known the estimate is the bytes queued.
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// A rate sample needs a prompt at least this long: on shorter ones the
/// fixed part of the time to the first byte dominates.
const SAMPLE_MIN_BYTES: usize = 1024;

/// Weight of a new rate sample in the moving average.
const SAMPLE_WEIGHT: f64 = 0.125;

/// One backend's prefill queue as this router knows it.
#[derive(Debug, Default)]
pub(crate) struct Prefill {
    /// Uncached key bytes of requests sent here and not yet answered.
    queued: AtomicUsize,
    /// [`super::health::clock`] when `queued` last rose from 0.
    busy_since: AtomicU64,
    /// Bytes answered since `busy_since`.
    answered: AtomicUsize,
    /// Bytes per millisecond (`f64` bits; 0: not yet learned).
    rate: AtomicU64,
}

/// A request's share of a [`Prefill`]: what its answer hands back.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Queued {
    /// Its uncached key bytes.
    pub(crate) bytes: usize,
    /// When it was queued ([`super::health::clock`]).
    since: u64,
    /// Nothing else was prefilling when it was queued: its time to an
    /// answer is a sample of the rate.
    alone: bool,
}

impl Prefill {
    /// Queues `bytes` at `now`.
    pub(crate) fn queue(&self, bytes: usize, now: u64) -> Queued {
        let before = self.queued.fetch_add(bytes, Ordering::Relaxed);
        let alone = before == 0;
        if alone && bytes > 0 {
            self.busy_since.store(now, Ordering::Relaxed);
            self.answered.store(0, Ordering::Relaxed);
        }
        Queued {
            bytes,
            since: now,
            alone,
        }
    }

    /// `request` was answered at `now` (its first body byte), or, with
    /// `now` None, ended without an answer.
    pub(crate) fn answered(&self, request: Queued, now: Option<u64>) {
        if request.bytes == 0 {
            return;
        }
        self.queued.fetch_sub(request.bytes, Ordering::Relaxed);
        self.answered.fetch_add(request.bytes, Ordering::Relaxed);
        let Some(now) = now else { return };
        if request.alone && request.bytes >= SAMPLE_MIN_BYTES {
            let took = now.saturating_sub(request.since).max(1) as f64;
            let sample = request.bytes as f64 / took;
            let old = self.rate();
            let rate = if old > 0.0 {
                old + SAMPLE_WEIGHT * (sample - old)
            } else {
                sample
            };
            self.rate.store(rate.to_bits(), Ordering::Relaxed);
        }
    }

    /// Bytes queued and not yet answered.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// The learned rate in bytes per millisecond; 0 until learned.
    pub(crate) fn rate(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Relaxed))
    }

    /// Bytes still to prefill at `now`: those queued, less the progress
    /// the learned rate says the engine has made on them.
    pub(crate) fn remaining(&self, now: u64) -> usize {
        let queued = self.queued();
        let rate = self.rate();
        if queued == 0 || rate <= 0.0 {
            return queued;
        }
        let elapsed = now.saturating_sub(self.busy_since.load(Ordering::Relaxed)) as f64;
        let answered = self.answered.load(Ordering::Relaxed) as f64;
        let progress = (rate * elapsed - answered).clamp(0.0, queued as f64);
        // Truncation of a value within 0..=queued.
        queued - progress as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_rate_the_queued_bytes_remain() {
        let prefill = Prefill::default();
        let first = prefill.queue(4000, 10);
        prefill.queue(2000, 20);
        assert_eq!(prefill.remaining(1000), 6000);
        prefill.answered(first, None);
        assert_eq!(
            prefill.remaining(1000),
            2000,
            "an unanswered end is no sample"
        );
        assert_eq!(prefill.rate(), 0.0);
    }

    #[test]
    fn a_prompt_sent_alone_teaches_the_rate() {
        let prefill = Prefill::default();
        let first = prefill.queue(4000, 100);
        prefill.answered(first, Some(140));
        assert_eq!(prefill.rate(), 100.0);
        // A prompt queued behind another teaches nothing.
        let second = prefill.queue(4000, 200);
        let third = prefill.queue(4000, 201);
        prefill.answered(second, Some(240));
        prefill.answered(third, Some(400));
        assert_eq!(prefill.rate(), 100.0);
        // Nor does a short one.
        let short = prefill.queue(100, 500);
        prefill.answered(short, Some(600));
        assert_eq!(prefill.rate(), 100.0);
        // Later samples move the average by an eighth.
        let slow = prefill.queue(4000, 700);
        prefill.answered(slow, Some(780));
        assert_eq!(prefill.rate(), 100.0 - 0.125 * 50.0);
    }

    #[test]
    fn the_engine_s_progress_comes_off_the_queue() {
        let prefill = Prefill::default();
        let sample = prefill.queue(4000, 0);
        prefill.answered(sample, Some(40));
        // Busy from t=100 with two prompts; 10 ms later a quarter of the
        // first is done.
        let first = prefill.queue(4000, 100);
        prefill.queue(4000, 105);
        assert_eq!(prefill.remaining(110), 7000);
        // The first answered at 140: its bytes are off the queue and its
        // work off the progress.
        prefill.answered(first, Some(140));
        assert_eq!(prefill.remaining(140), 4000);
        assert_eq!(prefill.remaining(160), 2000);
        // Never below nothing, whatever the clock says.
        assert_eq!(prefill.remaining(10_000), 0);
        // A backend that queued later has more left than one busy longer.
        let other = Prefill::default();
        let sample = other.queue(4000, 0);
        other.answered(sample, Some(40));
        other.queue(4000, 150);
        assert!(other.remaining(160) > prefill.remaining(160));
    }
}
