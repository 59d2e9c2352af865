//! The receive side of audio: a jitter buffer per remote site and a mixer that plays them
//! out together in 20 ms frames, using Opus FEC to rebuild a lost packet when the next one
//! is in, and concealment (PLC) when it is not.
//!
//! The mixer is pulled by the speaker's clock (the output device callback asks for samples),
//! so playout never drifts from what the device consumes.

use std::collections::{BTreeMap, HashMap};

use crate::codec::AudioDecoder;
use crate::frame::AUDIO_FRAME_SAMPLES;

/// How a played frame was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameSource {
    Decoded,
    /// Rebuilt from the in-band FEC of the following packet.
    Fec,
    /// Invented by the decoder's loss concealment.
    Concealed,
}

/// Counters a jitter buffer keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlayoutStats {
    pub decoded: u64,
    pub fec: u64,
    pub concealed: u64,
    /// Packets that came after their turn had been played.
    pub late: u64,
}

/// Opus packets of one remote site, ordered by RTP sequence number.
#[derive(Debug)]
pub struct JitterBuffer {
    packets: BTreeMap<u64, Vec<u8>>,
    next: Option<u64>,
    highest: Option<u64>,
    /// Frames held before playout starts (and after it ran dry).
    depth: usize,
    playing: bool,
    pub stats: PlayoutStats,
}

impl JitterBuffer {
    /// `depth` frames of 20 ms are buffered before playing (2 = 40 ms).
    pub fn new(depth: usize) -> Self {
        JitterBuffer {
            packets: BTreeMap::new(),
            next: None,
            highest: None,
            depth: depth.max(1),
            playing: false,
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

    pub fn push(&mut self, seq: u16, payload: &[u8]) {
        let ext = self.extend(seq);
        if self.next.is_some_and(|n| ext < n) {
            self.stats.late += 1;
            return;
        }
        self.highest = Some(self.highest.map_or(ext, |h| h.max(ext)));
        self.packets.insert(ext, payload.to_vec());
        // Bound memory if playout stalls: keep at most 2 s.
        while self.packets.len() > 100 {
            let first = *self.packets.keys().next().expect("non-empty");
            self.packets.remove(&first);
        }
    }

    /// Buffered frames from the playout point on.
    pub fn buffered(&self) -> usize {
        self.packets.len()
    }

    /// The next 20 ms for playout, or `None` while buffering (silence).
    pub fn pop(&mut self, dec: &mut AudioDecoder) -> Option<(Vec<i16>, FrameSource)> {
        if !self.playing {
            if self.packets.len() < self.depth {
                return None;
            }
            self.playing = true;
            self.next = self.packets.keys().next().copied();
        }
        let next = self.next?;
        if self.packets.is_empty() {
            // Ran dry: stop and buffer again rather than conceal forever.
            self.playing = false;
            return None;
        }
        self.next = Some(next + 1);
        if let Some(p) = self.packets.remove(&next) {
            self.stats.decoded += 1;
            let pcm = dec.decode(&p).ok()?;
            return Some((pcm, FrameSource::Decoded));
        }
        if let Some(following) = self.packets.get(&(next + 1)) {
            if let Ok(pcm) = dec.recover(following) {
                self.stats.fec += 1;
                return Some((pcm, FrameSource::Fec));
            }
        }
        self.stats.concealed += 1;
        dec.conceal().ok().map(|pcm| (pcm, FrameSource::Concealed))
    }
}

/// Mixes the playout of several streams into one 48 kHz mono stream. The client keys them
/// by receive slot (mid): a slot's RTP sequence numbers stay continuous, and the client
/// removes a slot's buffer when the site it carries changes.
pub struct Mixer {
    sites: HashMap<String, (JitterBuffer, AudioDecoder)>,
    pending: Vec<i16>,
    depth: usize,
}

impl Mixer {
    pub fn new(depth: usize) -> Self {
        Mixer {
            sites: HashMap::new(),
            pending: Vec::new(),
            depth,
        }
    }

    /// Adds a packet of the stream `site` (any key: the client uses the slot's mid).
    pub fn push(&mut self, site: &str, seq: u16, payload: &[u8]) {
        if !self.sites.contains_key(site) {
            let Ok(dec) = AudioDecoder::new() else {
                return;
            };
            self.sites
                .insert(site.to_string(), (JitterBuffer::new(self.depth), dec));
        }
        if let Some((jb, _)) = self.sites.get_mut(site) {
            jb.push(seq, payload);
        }
    }

    pub fn remove(&mut self, site: &str) {
        self.sites.remove(site);
    }

    /// One mixed 20 ms frame.
    pub fn mix_frame(&mut self) -> Vec<i16> {
        let mut acc = vec![0i32; AUDIO_FRAME_SAMPLES];
        for (jb, dec) in self.sites.values_mut() {
            if let Some((pcm, _)) = jb.pop(dec) {
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

    #[test]
    fn jitter_buffer_reorders_rebuilds_with_fec_and_conceals() {
        let p = packets(10);
        let mut jb = JitterBuffer::new(2);
        let mut dec = AudioDecoder::new().unwrap();
        // Arrival: 0, 2, 1 (reordered), 3, (4 lost), 5, 6, (7, 8 lost), 9.
        for (seq, i) in [
            (0u16, 0usize),
            (2, 2),
            (1, 1),
            (3, 3),
            (5, 5),
            (6, 6),
            (9, 9),
        ] {
            jb.push(seq.wrapping_add(65_530), &p[i]);
        }
        let mut kinds = Vec::new();
        let mut tones = Vec::new();
        while let Some((pcm, k)) = jb.pop(&mut dec) {
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
                late: 0
            }
        );
        jb.push(65_533, &p[3]);
        assert_eq!(jb.stats.late, 1, "a packet after its turn is dropped");
    }

    #[test]
    fn mixer_sums_sites_and_waits_for_depth() {
        let p = packets(4);
        let mut m = Mixer::new(2);
        m.push("a", 0, &p[0]);
        assert!(m.mix_frame().iter().all(|&s| s == 0), "still buffering");
        m.push("a", 1, &p[1]);
        m.push("b", 7, &p[0]);
        m.push("b", 8, &p[1]);
        let f = m.mix_frame();
        assert_eq!(f.len(), AUDIO_FRAME_SAMPLES);
        assert!(f.iter().map(|&s| i32::from(s).abs()).max().unwrap() > 1000);
        let mut out = vec![0i16; 300];
        m.fill(&mut out);
        assert_eq!(m.stats("a").unwrap().decoded, 2);
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
