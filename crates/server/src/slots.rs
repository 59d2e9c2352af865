//! Which remote sites a subscriber receives: the bounded-subscription model.
//!
//! A site never receives every other site's streams. It negotiates a fixed number of
//! receive-only *slots* once, at join (`video_slots` video, `audio_slots` audio), and the
//! server decides which publisher each slot carries. Video slots go to the sites with the
//! highest *video priority* (later: spotlight, floor holder, speaker, gallery page); audio
//! slots to the loudest sites. Assignments are sticky: a site that still qualifies keeps
//! its slot, so receivers do not see needless switches.
//!
//! This module is pure logic so it can be tested without any networking.

use std::collections::HashSet;

/// A candidate publisher for a subscriber's slots.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate<K> {
    pub key: K,
    /// Higher wins. For video: priority, then earlier join; for audio: loudness.
    pub score: f64,
}

/// Chooses which publishers fill `slots`, keeping current holders where they still rank
/// within the top `slots.len()`. `slots[i]` is the current holder of slot `i`; on return it
/// is the new holder. Returns the indices of slots whose holder changed.
pub fn assign<K: Clone + Eq + std::hash::Hash>(
    slots: &mut [Option<K>],
    candidates: &[Candidate<K>],
) -> Vec<usize> {
    let n = slots.len();
    let mut ranked: Vec<&Candidate<K>> = candidates.iter().collect();
    // Stable sort: equal scores keep the caller's order (e.g. join order).
    ranked.sort_by(|a, b| b.score.total_cmp(&a.score));
    let winners: HashSet<K> = ranked.iter().take(n).map(|c| c.key.clone()).collect();
    let mut changed = Vec::new();
    // Free slots whose holder no longer qualifies.
    for (i, slot) in slots.iter_mut().enumerate() {
        if let Some(k) = slot {
            if !winners.contains(k) {
                *slot = None;
                changed.push(i);
            }
        }
    }
    let held: HashSet<K> = slots.iter().flatten().cloned().collect();
    let mut newcomers = ranked
        .iter()
        .take(n)
        .map(|c| c.key.clone())
        .filter(|k| !held.contains(k));
    for (i, slot) in slots.iter_mut().enumerate() {
        if slot.is_none() {
            if let Some(k) = newcomers.next() {
                *slot = Some(k);
                if !changed.contains(&i) {
                    changed.push(i);
                }
            }
        }
    }
    changed.sort_unstable();
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(key: u32, score: f64) -> Candidate<u32> {
        Candidate { key, score }
    }

    #[test]
    fn fills_empty_slots_in_rank_order() {
        let mut s = vec![None; 3];
        let ch = assign(&mut s, &[c(1, 1.0), c(2, 3.0), c(3, 2.0), c(4, 0.5)]);
        assert_eq!(s, vec![Some(2), Some(3), Some(1)]);
        assert_eq!(ch, vec![0, 1, 2]);
    }

    #[test]
    fn holders_keep_their_slot() {
        let mut s = vec![Some(1), Some(2)];
        // 3 is louder than 1 now, 2 still qualifies: only slot 0 changes.
        let ch = assign(&mut s, &[c(1, 1.0), c(2, 5.0), c(3, 4.0)]);
        assert_eq!(s, vec![Some(3), Some(2)]);
        assert_eq!(ch, vec![0]);
        // Same ranking again: nothing moves.
        assert!(assign(&mut s, &[c(1, 1.0), c(2, 5.0), c(3, 4.0)]).is_empty());
    }

    #[test]
    fn leaver_frees_its_slot() {
        let mut s = vec![Some(1), Some(2)];
        let ch = assign(&mut s, &[c(2, 1.0)]);
        assert_eq!(s, vec![None, Some(2)]);
        assert_eq!(ch, vec![0]);
    }

    #[test]
    fn never_more_than_slot_count_and_no_duplicates() {
        let cands: Vec<_> = (0..400).map(|k| c(k, f64::from(k % 17))).collect();
        let mut s = vec![None; 9];
        assign(&mut s, &cands);
        let set: HashSet<_> = s.iter().flatten().collect();
        assert_eq!(set.len(), 9);
        assert!(s.iter().flatten().all(|k| k % 17 == 16));
    }

    #[test]
    fn ties_keep_caller_order() {
        let mut s = vec![None; 2];
        assign(&mut s, &[c(7, 0.0), c(3, 0.0), c(9, 0.0)]);
        assert_eq!(s, vec![Some(7), Some(3)]);
    }
}
