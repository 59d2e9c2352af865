//! Processing of the captured sound: echo cancellation (AEC3), noise suppression and
//! automatic gain (AGC2), through `sonora`, the pure-Rust port of WebRTC's audio processing.
//!
//! The far-end reference is what the speaker actually plays ([`AudioProcessor::render`],
//! fed from the speaker callback); the near end is the microphone
//! ([`AudioProcessor::capture`]). Both work in 10 ms frames of 48 kHz mono.

use sonora::config::{EchoCanceller, GainController2, NoiseSuppression};
use sonora::{AudioProcessing, Config, StreamConfig};

use crate::frame::AUDIO_RATE;

/// 10 ms at 48 kHz.
pub const PROCESS_FRAME: usize = 480;

/// Which stages run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stages {
    pub echo_cancellation: bool,
    pub noise_suppression: bool,
    pub gain_control: bool,
}

impl Default for Stages {
    fn default() -> Self {
        Stages {
            echo_cancellation: true,
            noise_suppression: true,
            gain_control: true,
        }
    }
}

pub struct AudioProcessor {
    apm: AudioProcessing,
    render_out: Vec<i16>,
}

impl AudioProcessor {
    pub fn new(stages: Stages) -> Self {
        let config = Config {
            echo_canceller: stages.echo_cancellation.then(EchoCanceller::default),
            noise_suppression: stages.noise_suppression.then(NoiseSuppression::default),
            gain_controller2: stages.gain_control.then(GainController2::default),
            ..Default::default()
        };
        let apm = AudioProcessing::builder()
            .config(config)
            .capture_config(StreamConfig::new(AUDIO_RATE, 1))
            .render_config(StreamConfig::new(AUDIO_RATE, 1))
            .build();
        AudioProcessor {
            apm,
            render_out: vec![0; PROCESS_FRAME],
        }
    }

    /// Tells the canceller what the speaker played (any multiple of 10 ms).
    pub fn render(&mut self, far: &[i16]) {
        for chunk in far.chunks_exact(PROCESS_FRAME) {
            let _ = self.apm.process_render_i16(chunk, &mut self.render_out);
        }
    }

    /// Processes captured sound (any multiple of 10 ms) in place.
    pub fn capture(&mut self, near: &mut [i16]) {
        let mut out = [0i16; PROCESS_FRAME];
        for chunk in near.chunks_exact_mut(PROCESS_FRAME) {
            if self.apm.process_capture_i16(chunk, &mut out).is_ok() {
                chunk.copy_from_slice(&out);
            }
        }
    }

    /// Runs a recorded far end and microphone through the processor, 10 ms at a time, the
    /// far end first as it would be played; returns the processed microphone (for
    /// measurements and tests).
    pub fn process_recorded(&mut self, far: &[i16], mic: &[i16]) -> Vec<i16> {
        let mut out = mic.to_vec();
        for (f, m) in far
            .chunks_exact(PROCESS_FRAME)
            .zip(out.chunks_exact_mut(PROCESS_FRAME))
        {
            self.render(f);
            self.capture(m);
        }
        out
    }

    /// The delay between a sample being rendered and its echo being captured, if known.
    pub fn set_delay_ms(&mut self, ms: i32) {
        let _ = self.apm.set_stream_delay_ms(ms);
    }
}

/// Power of a signal in dB (relative to full scale squared).
pub fn power_db(x: &[i16]) -> f64 {
    let p = x.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / x.len().max(1) as f64;
    10.0 * (p.max(1e-9)).log10()
}

/// Test signals for the echo measurement: reproducible, speech-like (noise bursts shaped
/// like syllables, band-limited).
pub mod signals {
    /// Speech-like noise: syllables of ~180 ms with ~70 ms gaps, low-passed.
    pub fn babble(seconds: f64, seed: u32, level: f64) -> Vec<i16> {
        let n = (seconds * 48_000.0) as usize;
        let mut state = seed.wrapping_mul(2_654_435_761).max(1);
        let mut lp = 0.0f64;
        let mut lp2 = 0.0f64;
        (0..n)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let white = f64::from(state) / f64::from(u32::MAX) * 2.0 - 1.0;
                lp += 0.25 * (white - lp);
                lp2 += 0.25 * (lp - lp2);
                let t = (i % 12_000) as f64 / 12_000.0; // 250 ms syllable cycle
                let env = if t < 0.72 {
                    (std::f64::consts::PI * t / 0.72).sin()
                } else {
                    0.0
                };
                (lp2 * env * level * 32767.0 * 3.0).clamp(-32767.0, 32767.0) as i16
            })
            .collect()
    }

    /// The echo path: a delay and a short low-pass room response with some loss.
    pub fn echo(far: &[i16], delay_samples: usize, gain: f64) -> Vec<i16> {
        let taps = [0.5, 0.3, 0.15, 0.05];
        (0..far.len())
            .map(|i| {
                let mut acc = 0.0;
                for (k, t) in taps.iter().enumerate() {
                    if let Some(j) = i.checked_sub(delay_samples + k * 24) {
                        acc += t * f64::from(far[j]);
                    }
                }
                (acc * gain).clamp(-32767.0, 32767.0) as i16
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::signals::{babble, echo};
    use super::*;

    #[test]
    fn echo_is_cancelled_by_20_db_and_double_talk_survives() {
        let secs = 12.0;
        let far = babble(secs, 7, 0.3);
        let echo_part = echo(&far, 48 * 60, 0.6); // 60 ms acoustic path
                                                  // Near-end talker only in the last 3 s (double talk with the far end).
        let near = babble(secs, 99, 0.25);
        let dt_start = (9.0 * 48_000.0) as usize;
        let mic: Vec<i16> = (0..far.len())
            .map(|i| {
                let n = if i >= dt_start { near[i] } else { 0 };
                echo_part[i].saturating_add(n)
            })
            .collect();
        let mut p = AudioProcessor::new(Stages {
            echo_cancellation: true,
            noise_suppression: false,
            gain_control: false,
        });
        let t = std::time::Instant::now();
        let out = p.process_recorded(&far, &mic);
        let per_frame = t.elapsed().as_secs_f64() * 1000.0 / (far.len() / PROCESS_FRAME) as f64;
        // After 4 s of convergence, over echo-only sound (4 s .. 9 s).
        let (a, b) = (4 * 48_000, dt_start);
        let erle = power_db(&mic[a..b]) - power_db(&out[a..b]);
        assert!(erle >= 20.0, "ERLE {erle:.1} dB");
        // Double talk: the near-end talker keeps most of its level.
        let near_db = power_db(&near[dt_start..]);
        let out_db = power_db(&out[dt_start..]);
        eprintln!(
            "AEC3: ERLE {erle:.1} dB; double talk: near end {near_db:.1} dB in, {out_db:.1} dB out; {per_frame:.3} ms CPU per 10 ms frame"
        );
        assert!(
            out_db > near_db - 6.0,
            "near-end speech lost in double talk: {out_db:.1} dB vs {near_db:.1} dB"
        );
    }
}
