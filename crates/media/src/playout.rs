//! The receive side of audio: a jitter buffer per remote site and a mixer that plays them
//! out together in 20 ms frames, using Opus FEC to rebuild a lost packet when the next one
//! is in, and concealment (PLC) when it is not.
//!
//! The buffer adapts its depth to the jitter of the path. It keeps ten seconds of arrival
//! times and aims to hold the 95th percentile of how late packets came, in frames, plus one.
//! It grows when a packet is late: it conceals a frame and waits for it, instead of
//! skipping it. It shrinks when it has held more than it aims for for a while: it leaves a
//! frame out, a quiet one when one comes within a second.
//!
//! The mixer is pulled by the speaker's clock (the output device callback asks for samples),
//! so playout never drifts from what the device consumes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::codec::AudioDecoder;
use crate::frame::{level_dbfs, AUDIO_FRAME_SAMPLES};

/// One frame of sound.
const FRAME_US: i64 = 20_000;
/// The share of packets (per mille) the buffer aims to hold for without waiting.
const AIM_PERMILLE: usize = 950;
/// How far back arrival times count towards the depth aimed for.
const HISTORY: Duration = Duration::from_secs(10);
/// The deepest the buffer aims for, in frames (300 ms). A packet later than that is given up.
pub const MAX_DEPTH: usize = 15;
/// Frames concealed in a row while the next packet is late (160 ms), before playout stops and
/// buffers again.
const MAX_EXPAND: u32 = 8;
/// Turns between two frames left out to shrink the buffer (0.5 s); after a second deeper
/// than aimed for, the next frame goes even when it is not quiet.
const DROP_EVERY: u32 = 25;
const DROP_ANYWAY: u32 = 50;
/// Turns over which the depth held is taken (a second).
const RECENT_TURNS: usize = 50;
/// A frame this quiet (dBFS) is the one left out when the buffer shrinks.
const QUIET_DBFS: f32 = -40.0;
/// An arrival this far off the schedule of the ones before starts the history afresh: the
/// site came back with a timestamp from elsewhere.
const RESCHEDULE_US: i64 = 2_000_000;
/// So does one after this long without any: a muted sender sends nothing, and its RTP
/// timestamps run on from where they stopped, so the first packet after would look late by
/// the whole pause. (Jitter up to the deepest target leaves no such gap at 50 packets a
/// second.)
const ARRIVAL_GAP: Duration = Duration::from_millis(250);
/// Opus's RTP clock: 48 kHz, so a tick is 1000/48 µs.
const TICKS_PER_MS: i64 = 48;
/// Waits counted in [`PlayoutSummary::waits`], 10 ms each; the last counts 630 ms or more.
pub const WAIT_BINS: usize = 64;
/// Packets over which the wait now is averaged (a second).
const RECENT_WAITS: usize = 50;

/// How a played frame was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameSource {
    Decoded,
    /// Rebuilt from the in-band FEC of the following packet.
    Fec,
    /// Invented by the decoder's loss concealment.
    Concealed,
    /// Invented by concealment while the next packet was late; the buffer grew by a frame.
    Expanded,
}

/// Counters a jitter buffer keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlayoutStats {
    pub decoded: u64,
    pub fec: u64,
    pub concealed: u64,
    /// Frames concealed while waiting for a late packet.
    pub expanded: u64,
    /// Frames left out to bring the buffer down to the depth it aims for.
    pub dropped: u64,
    /// Packets that came after their turn had been played.
    pub late: u64,
}

impl PlayoutStats {
    fn add(&mut self, o: &PlayoutStats) {
        self.decoded += o.decoded;
        self.fec += o.fec;
        self.concealed += o.concealed;
        self.expanded += o.expanded;
        self.dropped += o.dropped;
        self.late += o.late;
    }

    /// Frames played with sound in them: decoded, rebuilt or invented.
    pub fn played(&self) -> u64 {
        self.decoded + self.fec + self.concealed + self.expanded
    }
}

/// What the buffers did, for the report: counters, and how long packets waited in them
/// (from arrival to playout, as WebRTC's `jitterBufferDelay`).
#[derive(Debug, Clone, PartialEq)]
pub struct PlayoutSummary {
    pub stats: PlayoutStats,
    /// Packets played by how long they waited, in 10 ms bins (the last: that long or more).
    pub waits: [u64; WAIT_BINS],
    /// The longest a buffer makes packets wait now (averaged over its last second, ms), and
    /// the most frames one aims to hold.
    pub wait_now_ms: f64,
    pub target_now: usize,
}

impl Default for PlayoutSummary {
    fn default() -> Self {
        PlayoutSummary {
            stats: PlayoutStats::default(),
            waits: [0; WAIT_BINS],
            wait_now_ms: 0.0,
            target_now: 0,
        }
    }
}

impl PlayoutSummary {
    fn add(&mut self, o: &PlayoutSummary) {
        self.stats.add(&o.stats);
        for (a, b) in self.waits.iter_mut().zip(o.waits) {
            *a += b;
        }
        self.wait_now_ms = self.wait_now_ms.max(o.wait_now_ms);
        self.target_now = self.target_now.max(o.target_now);
    }

    /// How long packets waited at quantile `q` (0..=1) of those played, in ms (the top of
    /// its 10 ms bin); `None` before any.
    pub fn wait_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.waits.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        self.waits
            .iter()
            .position(|&n| {
                seen += n;
                seen >= rank
            })
            .map(|bin| (bin + 1) as f64 * 10.0)
    }
}

/// Arrival times against the sender's schedule: its RTP timestamps, not the sequence
/// numbers, which the server renumbers (a frame lost before it takes none, and would make
/// every packet after it look 20 ms late).
#[derive(Debug, Default)]
struct Arrivals {
    /// When a packet came, and how late against the schedule (µs, from an arbitrary origin).
    seen: VecDeque<(Instant, i64)>,
    /// The schedule's origin: an arrival and its sender's time (µs).
    origin: Option<(Instant, i64)>,
}

impl Arrivals {
    /// A packet the sender stamped `sent_us` (its unwrapped RTP timestamp, in µs).
    fn add(&mut self, now: Instant, sent_us: i64) {
        let lateness = |(t0, s0): (Instant, i64)| {
            now.saturating_duration_since(t0).as_micros() as i64 - (sent_us - s0)
        };
        let gap = self
            .seen
            .back()
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) > ARRIVAL_GAP);
        let origin = *self.origin.get_or_insert((now, sent_us));
        let mut late = lateness(origin);
        let least = self.seen.iter().map(|&(_, l)| l).min().unwrap_or(late);
        if gap || (late - least).abs() > RESCHEDULE_US {
            self.seen.clear();
            self.origin = Some((now, sent_us));
            late = 0;
        }
        self.seen.push_back((now, late));
        while self
            .seen
            .front()
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) > HISTORY)
        {
            self.seen.pop_front();
        }
    }

    /// How late the [`AIM_PERMILLE`] quantile came, against the earliest, in µs (0 with no
    /// history).
    fn spread_us(&self) -> i64 {
        let mut l: Vec<i64> = self.seen.iter().map(|&(_, l)| l).collect();
        if l.len() < 2 {
            return 0;
        }
        l.sort_unstable();
        let q = l[(l.len() * AIM_PERMILLE).div_ceil(1000).min(l.len()) - 1];
        q - l[0]
    }
}

/// Opus packets of one remote site, ordered by RTP sequence number.
#[derive(Debug)]
pub struct JitterBuffer {
    /// Packets by extended sequence number, with when each came.
    packets: BTreeMap<u64, (Vec<u8>, Instant)>,
    next: Option<u64>,
    highest: Option<u64>,
    /// The least depth held before playout starts (and after it ran dry), in frames.
    min_depth: usize,
    /// The depth aimed for: `min_depth`, or more while packets come unevenly.
    target: usize,
    arrivals: Arrivals,
    /// The newest RTP timestamp seen, as sent and unwrapped.
    newest_ts: Option<(u32, i64)>,
    /// Whether the target follows the arrivals (always, but in a test of what a fixed
    /// target would do).
    adapt: bool,
    pushed: u32,
    playing: bool,
    /// Frames concealed in a row waiting for a late packet.
    expanding: u32,
    /// Turns played since a frame was last left out, and since the last second's depth
    /// went over what is aimed for (or the last frame was left out).
    since_drop: u32,
    deep_for: u32,
    /// The depth held at each of the last 50 turns (a second). Its most is what the buffer
    /// delays by: packets come in bursts on a jittery path, and the depth is greatest just
    /// after one.
    recent: VecDeque<usize>,
    waits: [u64; WAIT_BINS],
    /// How long the last second's packets waited, ms.
    recent_waits: VecDeque<u32>,
    pub stats: PlayoutStats,
}

impl JitterBuffer {
    /// At least `depth` frames of 20 ms are held before playing (2 = 40 ms); more when the
    /// packets come unevenly.
    pub fn new(depth: usize) -> Self {
        let min_depth = depth.clamp(1, MAX_DEPTH);
        JitterBuffer {
            packets: BTreeMap::new(),
            next: None,
            highest: None,
            min_depth,
            target: min_depth,
            arrivals: Arrivals::default(),
            newest_ts: None,
            adapt: true,
            pushed: 0,
            playing: false,
            expanding: 0,
            since_drop: 0,
            deep_for: 0,
            recent: VecDeque::with_capacity(RECENT_TURNS + 1),
            waits: [0; WAIT_BINS],
            recent_waits: VecDeque::with_capacity(RECENT_WAITS + 1),
            stats: PlayoutStats::default(),
        }
    }

    fn extend(&self, seq: u16) -> u64 {
        let Some(h) = self.highest else {
            return (1 << 32) + u64::from(seq);
        };
        let base = h & !0xffff;
        [base.wrapping_sub(1 << 16), base, base + (1 << 16)]
            .into_iter()
            .map(|b| b + u64::from(seq))
            .min_by_key(|c| c.abs_diff(h))
            .expect("three candidates")
    }

    /// Files a packet with RTP timestamp `ts` that arrived at `now`.
    pub fn push(&mut self, seq: u16, ts: u32, payload: &[u8], now: Instant) {
        let ext = self.extend(seq);
        let ext_ts = match self.newest_ts {
            Some((raw, ext)) => ext + i64::from(ts.wrapping_sub(raw) as i32),
            None => i64::from(ts),
        };
        if self.newest_ts.is_none_or(|(_, e)| ext_ts > e) {
            self.newest_ts = Some((ts, ext_ts));
        }
        self.arrivals.add(now, ext_ts * 1000 / TICKS_PER_MS);
        self.pushed = self.pushed.wrapping_add(1);
        // Worked out every tenth packet, and at once when the history started afresh.
        if self.adapt && (self.pushed % 10 == 1 || self.arrivals.seen.len() == 1) {
            let spread = self.arrivals.spread_us().max(0) as u64;
            let frames = spread.div_ceil(FRAME_US as u64) as usize + 1;
            self.target = frames.clamp(self.min_depth, MAX_DEPTH);
        }
        if self.next.is_some_and(|n| ext < n) {
            self.stats.late += 1;
            return;
        }
        self.highest = Some(self.highest.map_or(ext, |h| h.max(ext)));
        self.packets.insert(ext, (payload.to_vec(), now));
        // Bound memory if playout stalls: keep at most 2 s.
        while self.packets.len() > 100 {
            let first = *self.packets.keys().next().expect("non-empty");
            self.packets.remove(&first);
        }
    }

    /// Buffered packets from the playout point on.
    pub fn buffered(&self) -> usize {
        self.packets.len()
    }

    /// Frames held: from the playout point (or the first packet, while buffering) to the
    /// newest packet, lost ones included.
    pub fn depth(&self) -> usize {
        let Some(h) = self.highest else { return 0 };
        let from = if self.playing {
            self.next
        } else {
            self.packets.keys().next().copied()
        };
        from.map_or(0, |f| (h + 1).saturating_sub(f) as usize)
    }

    /// The depth aimed for, in frames.
    pub fn target(&self) -> usize {
        self.target
    }

    /// The next 20 ms for playout at `now`, or `None` while buffering (silence).
    pub fn pop(&mut self, dec: &mut AudioDecoder, now: Instant) -> Option<(Vec<i16>, FrameSource)> {
        if !self.playing {
            if self.packets.is_empty() || self.depth() < self.target {
                return None;
            }
            self.playing = true;
            self.expanding = 0;
            // A new start: what was held before says nothing about now.
            self.recent.clear();
            self.since_drop = 0;
            self.deep_for = 0;
            self.next = self.packets.keys().next().copied();
        }
        let next = self.next?;
        let depth = self.depth();
        self.recent.push_back(depth);
        if self.recent.len() > RECENT_TURNS {
            self.recent.pop_front();
        }
        if depth == 0 {
            // Nothing from this turn on: its packet is late, or the site stopped. Conceal
            // and wait for it, a frame longer each turn, for a while; then stop and buffer
            // again rather than conceal forever.
            if self.expanding < MAX_EXPAND {
                self.expanding += 1;
                self.stats.expanded += 1;
                return dec.conceal().ok().map(|pcm| (pcm, FrameSource::Expanded));
            }
            self.playing = false;
            return None;
        }
        self.expanding = 0;
        self.since_drop = self.since_drop.saturating_add(1);
        // Held more than aimed for over the last second: leave a frame out, a quiet one if
        // one comes.
        let most = self.recent.iter().copied().max().unwrap_or(0);
        let over = most > self.target + 1;
        self.deep_for = if over { self.deep_for + 1 } else { 0 };
        let deep = depth > self.target && over;
        if deep && self.since_drop >= DROP_EVERY && self.packets.contains_key(&(next + 1)) {
            if let Some((p, came)) = self.packets.remove(&next) {
                self.next = Some(next + 1);
                // Decoded either way, so the decoder's state runs on without a gap.
                let pcm = dec.decode(&p).ok();
                let quiet =
                    p.len() <= 2 || pcm.as_deref().is_some_and(|s| level_dbfs(s) < QUIET_DBFS);
                if quiet || self.deep_for >= DROP_ANYWAY {
                    self.stats.dropped += 1;
                    self.since_drop = 0;
                    self.deep_for = 0;
                    return self.play_next(dec, now);
                }
                self.stats.decoded += 1;
                self.waited(now.saturating_duration_since(came));
                return pcm.map(|pcm| (pcm, FrameSource::Decoded));
            }
        }
        self.play_next(dec, now)
    }

    /// The turn at the playout point, with something held from it on.
    fn play_next(
        &mut self,
        dec: &mut AudioDecoder,
        now: Instant,
    ) -> Option<(Vec<i16>, FrameSource)> {
        let next = self.next?;
        self.next = Some(next + 1);
        if let Some((p, came)) = self.packets.remove(&next) {
            self.stats.decoded += 1;
            self.waited(now.saturating_duration_since(came));
            let pcm = dec.decode(&p).ok()?;
            return Some((pcm, FrameSource::Decoded));
        }
        if let Some((following, _)) = self.packets.get(&(next + 1)) {
            if let Ok(pcm) = dec.recover(following) {
                self.stats.fec += 1;
                return Some((pcm, FrameSource::Fec));
            }
        }
        self.stats.concealed += 1;
        dec.conceal().ok().map(|pcm| (pcm, FrameSource::Concealed))
    }

    fn waited(&mut self, wait: Duration) {
        let ms = wait.as_millis().min(u128::from(u32::MAX)) as u32;
        self.waits[(ms as usize / 10).min(WAIT_BINS - 1)] += 1;
        self.recent_waits.push_back(ms);
        if self.recent_waits.len() > RECENT_WAITS {
            self.recent_waits.pop_front();
        }
    }

    /// Counters and waits so far, how long packets wait now and the depth aimed for.
    pub fn summary(&self) -> PlayoutSummary {
        let n = self.recent_waits.len().max(1) as f64;
        PlayoutSummary {
            stats: self.stats,
            waits: self.waits,
            // A buffer that stopped (its site fell silent or left) holds nothing now.
            wait_now_ms: if self.playing {
                self.recent_waits.iter().map(|&w| f64::from(w)).sum::<f64>() / n
            } else {
                0.0
            },
            target_now: if self.playing { self.target } else { 0 },
        }
    }
}

/// Mixes the playout of several streams into one 48 kHz mono stream. The client keys them
/// by receive slot (mid): a slot's RTP sequence numbers stay continuous, and the client
/// removes a slot's buffer when the site it carries changes.
pub struct Mixer {
    sites: HashMap<String, (JitterBuffer, AudioDecoder)>,
    /// What buffers removed since did, kept for the summary.
    removed: PlayoutSummary,
    pending: Vec<i16>,
    depth: usize,
}

impl Mixer {
    /// Each stream holds at least `depth` frames (more while its packets come unevenly).
    pub fn new(depth: usize) -> Self {
        Mixer {
            sites: HashMap::new(),
            removed: PlayoutSummary::default(),
            pending: Vec::new(),
            depth,
        }
    }

    /// Adds a packet of the stream `site` (any key: the client uses the slot's mid) that
    /// arrived at `now`.
    pub fn push(&mut self, site: &str, seq: u16, ts: u32, payload: &[u8], now: Instant) {
        if !self.sites.contains_key(site) {
            let Ok(dec) = AudioDecoder::new() else {
                return;
            };
            self.sites
                .insert(site.to_string(), (JitterBuffer::new(self.depth), dec));
        }
        if let Some((jb, _)) = self.sites.get_mut(site) {
            jb.push(seq, ts, payload, now);
        }
    }

    pub fn remove(&mut self, site: &str) {
        if let Some((jb, _)) = self.sites.remove(site) {
            let mut gone = jb.summary();
            (gone.wait_now_ms, gone.target_now) = (0.0, 0);
            self.removed.add(&gone);
        }
    }

    /// One mixed 20 ms frame.
    pub fn mix_frame(&mut self) -> Vec<i16> {
        let now = Instant::now();
        let mut acc = vec![0i32; AUDIO_FRAME_SAMPLES];
        for (jb, dec) in self.sites.values_mut() {
            if let Some((pcm, _)) = jb.pop(dec, now) {
                for (a, s) in acc.iter_mut().zip(pcm) {
                    *a += i32::from(s);
                }
            }
        }
        acc.into_iter()
            .map(|v| v.clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16)
            .collect()
    }

    /// Fills `out` with mixed samples, mixing new frames as needed.
    pub fn fill(&mut self, out: &mut [i16]) {
        let mut filled = 0;
        while filled < out.len() {
            if self.pending.is_empty() {
                self.pending = self.mix_frame();
            }
            let n = self.pending.len().min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            filled += n;
        }
    }

    pub fn stats(&self, site: &str) -> Option<PlayoutStats> {
        self.sites.get(site).map(|(jb, _)| jb.stats)
    }

    /// What every stream's buffer did, the removed ones included.
    pub fn summary(&self) -> PlayoutSummary {
        let mut all = self.removed.clone();
        for (jb, _) in self.sites.values() {
            all.add(&jb.summary());
        }
        all
    }
}

/// Linear-interpolation resampler for one channel, continuous across calls.
#[derive(Debug, Clone)]
pub struct Resampler {
    step: f64,
    pos: f64,
    prev: f32,
}

impl Resampler {
    pub fn new(from_rate: u32, to_rate: u32) -> Self {
        Resampler {
            step: f64::from(from_rate) / f64::from(to_rate),
            pos: 0.0,
            prev: 0.0,
        }
    }

    pub fn is_identity(&self) -> bool {
        (self.step - 1.0).abs() < f64::EPSILON
    }

    /// Appends the resampled `input` to `out`.
    pub fn process(&mut self, input: &[f32], out: &mut Vec<f32>) {
        if self.is_identity() {
            out.extend_from_slice(input);
            return;
        }
        // `pos` is measured from the sample before input[0] (held in `prev`).
        while self.pos < input.len() as f64 {
            let i = self.pos.floor() as usize;
            let frac = (self.pos - i as f64) as f32;
            let a = if i == 0 { self.prev } else { input[i - 1] };
            let b = input[i];
            out.push(a + (b - a) * frac);
            self.pos += self.step;
        }
        self.pos -= input.len() as f64;
        if let Some(&last) = input.last() {
            self.prev = last;
        }
    }
}

/// Averages interleaved channels to mono.
pub fn downmix(interleaved: &[f32], channels: usize) -> Vec<f32> {
    let ch = channels.max(1);
    interleaved
        .chunks(ch)
        .map(|f| f.iter().sum::<f32>() / f.len() as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::AudioEncoder;
    use crate::synthetic::{detect_tone, SyntheticTone};

    fn packets(n: usize) -> Vec<Vec<u8>> {
        let mut t = SyntheticTone::new();
        let mut enc = AudioEncoder::new(32_000).unwrap();
        (0..n)
            .map(|_| enc.encode(&t.frame_now().samples).unwrap())
            .collect()
    }

    /// `ms` after `base`.
    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn jitter_buffer_reorders_rebuilds_with_fec_and_conceals() {
        let p = packets(10);
        let mut jb = JitterBuffer::new(2);
        let mut dec = AudioDecoder::new().unwrap();
        let t0 = Instant::now();
        // Arrival: 0, 2, 1 (reordered), 3, (4 lost), 5, 6, (7, 8 lost), 9, each on time but
        // for the reordered one.
        for (seq, i, ms) in [
            (0u16, 0usize, 0),
            (2, 2, 40),
            (1, 1, 41),
            (3, 3, 60),
            (5, 5, 100),
            (6, 6, 120),
            (9, 9, 180),
        ] {
            jb.push(
                seq.wrapping_add(65_530),
                u32::from(seq) * 960,
                &p[i],
                at(t0, ms),
            );
        }
        let mut kinds = Vec::new();
        let mut tones = Vec::new();
        for _ in 0..10 {
            let (pcm, k) = jb.pop(&mut dec, at(t0, 200)).expect("playing");
            tones.push(detect_tone(&pcm));
            kinds.push(k);
        }
        use FrameSource::*;
        assert_eq!(
            kinds,
            [Decoded, Decoded, Decoded, Decoded, Fec, Decoded, Decoded, Concealed, Fec, Decoded]
        );
        assert_eq!(tones[2], Some(2), "reordered packet played in its place");
        assert_eq!(
            jb.stats,
            PlayoutStats {
                decoded: 7,
                fec: 2,
                concealed: 1,
                ..PlayoutStats::default()
            }
        );
        jb.push(65_533, 3 * 960, &p[3], at(t0, 200));
        assert_eq!(jb.stats.late, 1, "a packet after its turn is dropped");
        // Nothing more: the next turns are concealed while the buffer waits, then it stops.
        let waited = std::iter::from_fn(|| jb.pop(&mut dec, at(t0, 220))).count();
        assert_eq!(waited as u32, MAX_EXPAND);
        assert_eq!(jb.stats.expanded, u64::from(MAX_EXPAND));
        assert!(jb.pop(&mut dec, at(t0, 400)).is_none(), "buffering again");
    }

    /// A tiny deterministic generator for jitter (xorshift), 0..1.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Plays `p` through `jb` in virtual time: a packet sent every 20 ms arrives after
    /// `delay_ms` plus up to `jitter_ms(i)` more, in order (a later packet never passes an
    /// earlier one), and the speaker takes a frame every 20 ms. Returns what each turn
    /// played after `from_ms` and the depth aimed for then, and the depth held at the end.
    #[allow(clippy::type_complexity)]
    fn play(
        jb: &mut JitterBuffer,
        p: &[Vec<u8>],
        jitter_ms: impl Fn(usize) -> f64,
        from_ms: u64,
    ) -> (Vec<(Option<FrameSource>, usize)>, usize) {
        let t0 = Instant::now();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut last = 0.0f64;
        let arrivals: Vec<f64> = (0..p.len())
            .map(|i| {
                let a = (i as f64 * 20.0 + 30.0 + rng.next() * jitter_ms(i)).max(last);
                last = a;
                a
            })
            .collect();
        let mut dec = AudioDecoder::new().unwrap();
        let mut turns = Vec::new();
        let mut next_packet = 0;
        let end = p.len() as u64 * 20;
        for ms in 0..end {
            while next_packet < p.len() && arrivals[next_packet] <= ms as f64 {
                jb.push(
                    next_packet as u16,
                    next_packet as u32 * 960,
                    &p[next_packet],
                    at(t0, ms),
                );
                next_packet += 1;
            }
            if ms % 20 == 5 {
                let got = jb.pop(&mut dec, at(t0, ms)).map(|(_, k)| k);
                if ms >= from_ms {
                    turns.push((got, jb.target()));
                }
            }
        }
        (turns, jb.depth())
    }

    #[test]
    fn on_a_jittery_path_the_buffer_deepens_to_wait_for_late_packets_then_shrinks_again() {
        // 30 s with up to 120 ms of jitter, then 20 s without.
        let p = packets(2_500);
        let jittery = |i: usize| if i < 1_500 { 120.0 } else { 0.0 };
        let invented = |t: &[(Option<FrameSource>, usize)]| {
            t.iter()
                .filter(|(k, _)| !matches!(k, Some(FrameSource::Decoded | FrameSource::Fec)))
                .count()
        };
        let mut jb = JitterBuffer::new(3);
        let (turns, depth_end) = play(&mut jb, &p, jittery, 2_000);
        // The jittery turns after the first two seconds.
        let rough = &turns[..1_400];
        let adaptive = invented(rough);
        // It aims for about the 95th percentile of the jitter, and waits for the rest: a few
        // frames invented.
        assert!(
            adaptive * 100 <= rough.len() * 3,
            "{adaptive} of {} turns invented: {:?}",
            rough.len(),
            jb.stats
        );
        let aimed = rough.last().unwrap().1;
        assert!(aimed >= 6, "aimed for {aimed} frames");
        let waited = jb.summary().wait_ms(0.95).unwrap();
        assert!(waited >= 100.0, "95 % waited up to {waited} ms");
        // The same buffer with its target held at 60 ms also waits for late packets, but
        // then shrinks back and waits again: a glitch (a frame invented or left out) every
        // second or so, against a handful.
        let mut fixed = JitterBuffer::new(3);
        fixed.adapt = false;
        let (fixed_turns, _) = play(&mut fixed, &p, jittery, 2_000);
        let fixed_invented = invented(&fixed_turns[..1_400]);
        let glitches = |s: &PlayoutStats| s.expanded + s.concealed + s.dropped;
        eprintln!(
            "jittery 30 s then calm 20 s: adaptive invented {adaptive} of 1400 jittery turns, {} glitches in all ({:?}, aimed for {aimed} frames, 95 % waited up to {waited} ms); fixed 60 ms invented {fixed_invented}, {} glitches ({:?})",
            glitches(&jb.stats), jb.stats, glitches(&fixed.stats), fixed.stats
        );
        assert!(glitches(&jb.stats) <= 10, "{:?}", jb.stats);
        assert!(
            glitches(&fixed.stats) >= 4 * glitches(&jb.stats).max(5),
            "{:?}",
            fixed.stats
        );
        // Without jitter, it comes back down to its least depth, leaving frames out.
        assert!(depth_end <= 4, "{depth_end} frames held at the end");
        assert!(jb.stats.dropped >= 3, "{:?}", jb.stats);
        assert_eq!(jb.target(), 3);
        let calm = &turns[turns.len() - 250..];
        assert_eq!(invented(calm), 0, "{calm:?}");
    }

    /// Frames lost before the server take no sequence number there: only the timestamps
    /// show them. On a steady path they are not jitter, nor is a pause in the sound.
    #[test]
    fn upstream_loss_and_a_pause_are_not_jitter() {
        let p = packets(600);
        let mut jb = JitterBuffer::new(3);
        let mut dec = AudioDecoder::new().unwrap();
        let t0 = Instant::now();
        let mut seq = 0u16;
        for i in 0..600u64 {
            // Every 20th frame lost before the server; from frame 300, a pause of 400 ms
            // (muted: nothing sent, timestamps run on from where they stopped).
            if i % 20 == 7 {
                continue;
            }
            let arrival = if i < 300 { i * 20 } else { i * 20 + 400 };
            jb.push(seq, i as u32 * 960, &p[i as usize], at(t0, arrival + 30));
            seq = seq.wrapping_add(1);
            jb.pop(&mut dec, at(t0, arrival + 35));
            assert_eq!(jb.target(), 3, "frame {i}");
        }
    }

    #[test]
    fn the_wait_quantiles_come_from_the_packets_played() {
        let mut s = PlayoutSummary::default();
        assert_eq!(s.wait_ms(0.5), None);
        s.waits[5] = 90;
        s.waits[12] = 10;
        assert_eq!(s.wait_ms(0.5), Some(60.0));
        assert_eq!(s.wait_ms(0.9), Some(60.0));
        assert_eq!(s.wait_ms(0.95), Some(130.0));
    }

    #[test]
    fn mixer_sums_sites_and_waits_for_depth() {
        let p = packets(4);
        let mut m = Mixer::new(2);
        let t0 = Instant::now();
        m.push("a", 0, 0, &p[0], t0);
        assert!(m.mix_frame().iter().all(|&s| s == 0), "still buffering");
        m.push("a", 1, 960, &p[1], at(t0, 20));
        m.push("b", 7, 0, &p[0], t0);
        m.push("b", 8, 960, &p[1], at(t0, 20));
        let f = m.mix_frame();
        assert_eq!(f.len(), AUDIO_FRAME_SAMPLES);
        assert!(f.iter().map(|&s| i32::from(s).abs()).max().unwrap() > 1000);
        let mut out = vec![0i16; 300];
        m.fill(&mut out);
        assert_eq!(m.stats("a").unwrap().decoded, 2);
        // A removed stream still counts in the summary.
        m.remove("a");
        assert_eq!(m.summary().stats.decoded, 4);
    }

    #[test]
    fn resampler_keeps_a_tone_and_the_rate() {
        let mut r = Resampler::new(44_100, 48_000);
        let input: Vec<f32> = (0..44_100)
            .map(|i| (std::f32::consts::TAU * 1000.0 * i as f32 / 44_100.0).sin())
            .collect();
        let mut out = Vec::new();
        for chunk in input.chunks(441) {
            r.process(chunk, &mut out);
        }
        assert!((out.len() as i64 - 48_000).abs() <= 2, "{}", out.len());
        // Zero crossings of 1 kHz over one second: ~2000.
        let zc = out
            .windows(2)
            .filter(|w| (w[0] < 0.0) != (w[1] < 0.0))
            .count();
        assert!((1990..=2010).contains(&zc), "{zc}");
        assert_eq!(downmix(&[1.0, 0.0, 0.5, 0.5], 2), vec![0.5, 0.5]);
    }
}
