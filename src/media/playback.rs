//! Where the phone's playback is: exact at each mark echo, extrapolated at 8 bytes per
//! millisecond in between, never ahead of what was sent. Barge-in needs it to tell the engine
//! how much of an interrupted utterance the caller really heard.

use std::collections::VecDeque;

use tokio::time::Instant;

use crate::engines::ItemId;

/// Agent audio between marks (100 ms): the extrapolation between echoes stays accurate to a
/// few milliseconds, at a fifth of the echoes of marking every 20 ms delta.
const MARK_EVERY_BYTES: u64 = 800;

/// A mark we sent: when Twilio echoes it, everything before it has played.
struct PendingMark {
    seq: u64,
    /// Total agent bytes sent up to this mark.
    total_at: u64,
}

/// Where playback is, as far as we can tell: exact at each mark echo, extrapolated at
/// 8 bytes per millisecond in between, never ahead of what was sent.
pub(super) struct Playback {
    sent_total: u64,
    /// Bytes sent after the last mark: a mark goes out every [`MARK_EVERY_BYTES`], and the
    /// tail of an utterance gets one on the next tick, so Twilio echoes a few marks a second
    /// instead of one per 20 ms delta (each echo is a message to read).
    unmarked: u64,
    anchor_bytes: u64,
    anchor_at: Instant,
    marks: VecDeque<PendingMark>,
    next_mark: u64,
    /// Marks at or below this were flushed by a `clear`: their echoes mean nothing played.
    cleared_upto: u64,
    /// The utterance being played, where it starts in the byte stream, and its size so far.
    item: Option<(ItemId, u64, u64)>,
}

impl Playback {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            sent_total: 0,
            unmarked: 0,
            anchor_bytes: 0,
            anchor_at: now,
            marks: VecDeque::new(),
            next_mark: 1,
            cleared_upto: 0,
            item: None,
        }
    }

    pub(super) fn played(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.anchor_at).as_millis() as u64;
        (self.anchor_bytes + elapsed * 8).min(self.sent_total)
    }

    /// Agent bytes sent but not yet played: what a `clear` now would drop.
    pub(super) fn unplayed(&self, now: Instant) -> u64 {
        self.sent_total - self.played(now)
    }

    pub(super) fn pending(&self) -> bool {
        !self.marks.is_empty() || self.unmarked > 0
    }

    /// Records `bytes` of `item` going out; returns the mark to send after them, if one is
    /// due.
    pub(super) fn sent(&mut self, item: &str, bytes: u64, now: Instant) -> Option<u64> {
        if self.played(now) >= self.sent_total {
            // The buffer at Twilio ran dry: playback of this audio starts now.
            self.anchor_bytes = self.sent_total;
            self.anchor_at = now;
        }
        match &mut self.item {
            Some((id, _, len)) if id == item => *len += bytes,
            _ => self.item = Some((item.to_owned(), self.sent_total, bytes)),
        }
        self.sent_total += bytes;
        self.unmarked += bytes;
        (self.unmarked >= MARK_EVERY_BYTES).then(|| self.mark())
    }

    /// A mark after everything sent so far, if anything is unmarked (the tail of an
    /// utterance).
    pub(super) fn mark_tail(&mut self) -> Option<u64> {
        (self.unmarked > 0).then(|| self.mark())
    }

    fn mark(&mut self) -> u64 {
        self.unmarked = 0;
        let seq = self.next_mark;
        self.next_mark += 1;
        self.marks.push_back(PendingMark {
            seq,
            total_at: self.sent_total,
        });
        seq
    }

    pub(super) fn echoed(&mut self, seq: u64, now: Instant) {
        if seq <= self.cleared_upto {
            return;
        }
        while let Some(m) = self.marks.front() {
            if m.seq > seq {
                break;
            }
            self.anchor_bytes = m.total_at;
            self.anchor_at = now;
            self.marks.pop_front();
        }
    }

    /// A `clear` went out: nothing more of what was sent will play. Returns the interrupted
    /// item and how many of its bytes were heard.
    pub(super) fn cleared(&mut self, now: Instant) -> Option<(ItemId, u64)> {
        let played = self.played(now);
        self.cleared_upto = self.next_mark - 1;
        self.marks.clear();
        self.unmarked = 0;
        self.sent_total = played;
        self.anchor_bytes = played;
        self.anchor_at = now;
        self.item
            .take()
            .map(|(id, start, len)| (id, played.saturating_sub(start).min(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn playback_accounting_counts_only_what_played() {
        let t0 = Instant::now();
        let mut p = Playback::new(t0);
        // 1 s of audio for item a, in two pieces.
        let m1 = p.sent("a", 4000, t0).unwrap();
        let _m2 = p.sent("a", 4000, t0).unwrap();
        assert_eq!(p.played(t0 + Duration::from_millis(300)), 2400);
        p.echoed(m1, t0 + Duration::from_millis(520));
        // 100 ms after the first echo: 500 ms + 100 ms played.
        assert_eq!(p.played(t0 + Duration::from_millis(620)), 4800);
        let (item, heard) = p.cleared(t0 + Duration::from_millis(620)).unwrap();
        assert_eq!((item.as_str(), heard), ("a", 4800));
        assert!(!p.pending());
        // The cleared mark echoes later; it must not count as played.
        p.echoed(2, t0 + Duration::from_millis(630));
        assert_eq!(p.played(t0 + Duration::from_secs(5)), 4800);
        // New audio after the clear starts a new item from the current position.
        p.sent("b", 800, t0 + Duration::from_secs(5));
        assert_eq!(p.played(t0 + Duration::from_millis(5050)), 4800 + 400);
        let (item, heard) = p.cleared(t0 + Duration::from_millis(5050)).unwrap();
        assert_eq!((item.as_str(), heard), ("b", 400));
    }

    #[test]
    fn small_deltas_share_a_mark_and_the_tail_gets_one() {
        let t0 = Instant::now();
        let mut p = Playback::new(t0);
        // 20 ms deltas: a mark every 100 ms of audio.
        let marks: Vec<_> = (0..7).map(|_| p.sent("a", 160, t0)).collect();
        assert_eq!(marks.iter().flatten().count(), 1);
        assert_eq!(marks[4], Some(1));
        // 40 ms unmarked: still pending, and the tail mark covers it.
        assert!(p.pending());
        assert_eq!(p.mark_tail(), Some(2));
        assert_eq!(p.mark_tail(), None);
        p.echoed(2, t0 + Duration::from_millis(140));
        assert!(!p.pending());
        assert_eq!(p.played(t0 + Duration::from_secs(1)), 7 * 160);
    }

    #[test]
    fn never_counts_more_than_was_sent() {
        let t0 = Instant::now();
        let mut p = Playback::new(t0);
        p.sent("a", 800, t0);
        let (_, heard) = p.cleared(t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(heard, 800);
    }
}
