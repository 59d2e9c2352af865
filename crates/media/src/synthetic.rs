//! Synthetic sources (the test twins of camera and microphone) and the verifying sinks that
//! read their marks back on the far side.
//!
//! The picture is a deterministic function of (size, frame number, stamp), so a receiver can
//! redraw what was sent and measure PSNR. The audio is a tone that steps through
//! [`TONE_STEPS`] frequencies, one per 20 ms frame, so a receiver can tell a real decoded
//! frame from concealment or silence.

use std::f32::consts::TAU;
use std::time::{Duration, Instant};

use crate::frame::{now_us, AudioFrame, I420Frame, VideoFrame, AUDIO_FRAME_SAMPLES, AUDIO_RATE};
use crate::source::{AudioSource, SourceError, VideoSource};
use crate::stamp::{self, Stamp};

/// Draws frame `n` of the moving test picture, stamped.
pub fn test_picture(width: usize, height: usize, stamp: Stamp) -> I420Frame {
    let mut pic = I420Frame::black(width, height);
    let n = stamp.frame as usize;
    // A diagonal ramp drifting right, with a bright box sweeping across.
    let box_size = height / 4;
    let span = width.saturating_sub(box_size).max(1);
    let phase = (n * 6) % (2 * span);
    let bx = if phase < span {
        phase
    } else {
        2 * span - phase
    };
    let by = height / 2 - box_size / 2;
    for y in 0..height {
        let row = &mut pic.y[y * width..(y + 1) * width];
        for (x, p) in row.iter_mut().enumerate() {
            let ramp = ((x + 2 * y + 4 * n) % 384) as i32;
            let tri = if ramp < 192 { ramp } else { 383 - ramp };
            *p = (32 + tri) as u8;
        }
        if y >= by && y < by + box_size {
            row[bx..bx + box_size].fill(235);
        }
    }
    let (cw, ch) = I420Frame::chroma_size(width, height);
    for y in 0..ch {
        for x in 0..cw {
            pic.u[y * cw + x] = (96 + (y * 64) / ch.max(1)) as u8;
            pic.v[y * cw + x] = (96 + (x * 64) / cw.max(1)) as u8;
        }
    }
    stamp.draw(&mut pic);
    pic
}

/// PSNR (dB) of the luma planes of two same-sized pictures; 99 for identical ones.
pub fn psnr_y(a: &I420Frame, b: &I420Frame) -> f64 {
    assert_eq!((a.width, a.height), (b.width, b.height));
    let se: u64 =
        a.y.iter()
            .zip(&b.y)
            .map(|(&p, &q)| {
                let d = i64::from(p) - i64::from(q);
                (d * d) as u64
            })
            .sum();
    if se == 0 {
        return 99.0;
    }
    let mse = se as f64 / a.y.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse).log10()
}

/// A camera twin: the moving stamped picture at a fixed size and rate, paced in real time.
pub struct SyntheticCamera {
    width: usize,
    height: usize,
    fps: u32,
    tag: u16,
    next: u32,
    start: Option<Instant>,
    /// Draw at 1/scale of the size (a lower layer), stamp and all.
    scale: usize,
}

impl SyntheticCamera {
    pub fn new(width: usize, height: usize, fps: u32, site: &str) -> Result<Self, SourceError> {
        if !stamp::fits(width, height)
            || !width.is_multiple_of(2)
            || !height.is_multiple_of(2)
            || fps == 0
        {
            return Err(SourceError::UnsupportedFormat(format!(
                "synthetic camera {width}x{height}@{fps}"
            )));
        }
        Ok(SyntheticCamera {
            width,
            height,
            fps,
            tag: stamp::site_tag(site),
            next: 0,
            start: None,
            scale: 1,
        })
    }

    /// The next frame without waiting (for benchmarks and tests).
    pub fn frame_now(&mut self) -> VideoFrame {
        let captured_us = now_us();
        let s = Stamp {
            frame: self.next,
            time_us: captured_us as u32,
            site_tag: self.tag,
        };
        self.next = self.next.wrapping_add(1);
        VideoFrame {
            picture: test_picture(
                (self.width / self.scale) & !1,
                (self.height / self.scale) & !1,
                s,
            ),
            captured_us,
        }
    }
}

impl VideoSource for SyntheticCamera {
    fn describe(&self) -> String {
        format!(
            "Hình mẫu thử (test pattern) {}x{}@{}",
            self.width, self.height, self.fps
        )
    }

    fn size(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    fn fps(&self) -> u32 {
        self.fps
    }

    fn read(&mut self) -> Result<VideoFrame, SourceError> {
        let start = *self.start.get_or_insert_with(Instant::now);
        let since_start = |n: u32| Duration::from_secs_f64(f64::from(n) / f64::from(self.fps));
        let due = start + since_start(self.next);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        } else if now - due > since_start(2) {
            // Not read for a while (camera turned off, a stalled encoder): like a real
            // camera, carry on from now rather than deliver the missed frames in a burst.
            self.start = now.checked_sub(since_start(self.next));
        }
        Ok(self.frame_now())
    }

    fn scale_down(&mut self, divisor: usize) -> bool {
        let d = divisor.max(1);
        let (w, h) = ((self.width / d) & !1, (self.height / d) & !1);
        if !stamp::fits(w, h) {
            // Too small for a stamp: draw full size and let the encoder scale it.
            self.scale = 1;
            return false;
        }
        self.scale = d;
        true
    }
}

/// Number of distinct tone frequencies the synthetic microphone steps through.
pub const TONE_STEPS: u32 = 12;

/// Frequency of tone step `k` in Hz.
pub fn tone_hz(k: u32) -> f32 {
    500.0 + 125.0 * (k % TONE_STEPS) as f32
}

/// A microphone twin: a tone that changes frequency every 20 ms frame, paced in real time.
pub struct SyntheticTone {
    next: u32,
    phase: f32,
    start: Option<Instant>,
}

impl Default for SyntheticTone {
    fn default() -> Self {
        Self::new()
    }
}

impl SyntheticTone {
    pub fn new() -> Self {
        SyntheticTone {
            next: 0,
            phase: 0.0,
            start: None,
        }
    }

    pub fn frame_now(&mut self) -> AudioFrame {
        let f = tone_hz(self.next);
        let step = TAU * f / AUDIO_RATE as f32;
        let samples = (0..AUDIO_FRAME_SAMPLES)
            .map(|_| {
                let s = (self.phase.sin() * 9000.0) as i16;
                self.phase = (self.phase + step) % TAU;
                s
            })
            .collect();
        self.next = self.next.wrapping_add(1);
        AudioFrame {
            samples,
            captured_us: now_us(),
        }
    }
}

impl AudioSource for SyntheticTone {
    fn describe(&self) -> String {
        "Âm thử (test tone)".into()
    }

    fn read(&mut self) -> Result<AudioFrame, SourceError> {
        let start = *self.start.get_or_insert_with(Instant::now);
        let due = start + Duration::from_millis(20 * u64::from(self.next));
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        Ok(self.frame_now())
    }
}

/// Goertzel power of `freq` in `x`.
fn goertzel(x: &[f32], freq: f32) -> f32 {
    let w = TAU * freq / AUDIO_RATE as f32;
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f32, 0.0f32);
    for &v in x {
        let s0 = v + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    s1 * s1 + s2 * s2 - coeff * s1 * s2
}

/// Which tone step dominates the end of a decoded frame, if one clearly does.
///
/// Opus delays the signal by a few milliseconds, so the decoded frame's last 10 ms belong to
/// the frame that was sent as this packet; only they are examined.
pub fn detect_tone(samples: &[i16]) -> Option<u32> {
    let tail = &samples[samples.len().saturating_sub(480)..];
    let x: Vec<f32> = tail.iter().map(|&s| f32::from(s) / 32768.0).collect();
    let energy: f32 = x.iter().map(|v| v * v).sum();
    if energy < 1e-3 {
        return None;
    }
    let powers: Vec<f32> = (0..TONE_STEPS).map(|k| goertzel(&x, tone_hz(k))).collect();
    let (best, &p) = powers
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))?;
    // A pure tone concentrates its Goertzel power: |X|^2 ≈ (N/2)^2 A^2 / ... relative to
    // energy N A^2 / 2, i.e. p ≈ energy * N / 2. Accept when most of it is there.
    (p > 0.5 * energy * x.len() as f32 / 2.0).then_some(best as u32)
}

/// Counters a verifying video sink keeps for one remote site.
#[derive(Debug, Clone, Default)]
pub struct VideoCheck {
    pub frames: u64,
    pub verified: u64,
    /// Verified frames whose number is not above the last one seen.
    pub out_of_order: u64,
    /// Gaps in the frame numbers of verified frames.
    pub lost: u64,
    pub last_frame: Option<u32>,
    /// The size of the last verified picture.
    pub last_size: Option<(usize, usize)>,
    /// The last picture again at another size: the server moved to another layer of the
    /// sender (simulcast) on a keyframe of the picture it had just forwarded.
    pub layer_repeats: u64,
    /// Glass-to-glass latency samples in microseconds.
    pub latencies_us: Vec<u32>,
    pub psnr_sum: f64,
    pub psnr_count: u64,
    /// Frames whose stamp carried another site's tag.
    pub wrong_site: u64,
}

impl VideoCheck {
    /// Checks one decoded picture. `expect_tag` is the sender's site tag; `psnr_every`
    /// measures PSNR on every n-th verified frame (0 = never).
    pub fn check(
        &mut self,
        pic: &I420Frame,
        now_us: u64,
        expect_tag: Option<u16>,
        psnr_every: u64,
    ) -> Option<Stamp> {
        self.frames += 1;
        let s = Stamp::read(pic)?;
        if let Some(t) = expect_tag {
            if t != s.site_tag {
                self.wrong_site += 1;
                return None;
            }
        }
        self.verified += 1;
        let size = (pic.width, pic.height);
        let resized = self.last_size.is_some_and(|z| z != size);
        self.last_size = Some(size);
        match self.last_frame {
            Some(last) if s.frame == last && resized => self.layer_repeats += 1,
            Some(last) if s.frame <= last => self.out_of_order += 1,
            Some(last) => {
                self.lost += u64::from(s.frame - last - 1);
                self.last_frame = Some(s.frame);
            }
            None => self.last_frame = Some(s.frame),
        }
        self.latencies_us.push(s.age_us(now_us));
        if psnr_every > 0 && (self.verified - 1).is_multiple_of(psnr_every) {
            let expected = test_picture(pic.width, pic.height, s);
            self.psnr_sum += psnr_y(&expected, pic);
            self.psnr_count += 1;
        }
        Some(s)
    }

    pub fn mean_psnr(&self) -> Option<f64> {
        (self.psnr_count > 0).then(|| self.psnr_sum / self.psnr_count as f64)
    }
}

/// Percentile (0..=100) of a sample set, nearest-rank; `None` when empty.
pub fn percentile(samples: &[u32], pct: f64) -> Option<u32> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let rank = ((pct / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picture_is_deterministic_and_moves() {
        let s = |n| Stamp {
            frame: n,
            time_us: 5,
            site_tag: 1,
        };
        let a = test_picture(640, 360, s(3));
        assert_eq!(a, test_picture(640, 360, s(3)));
        let b = test_picture(640, 360, s(4));
        assert!(psnr_y(&a, &b) < 30.0, "consecutive frames should differ");
        assert_eq!(Stamp::read(&a), Some(s(3)));
    }

    #[test]
    fn tone_steps_are_detected() {
        let mut t = SyntheticTone::new();
        for k in 0..TONE_STEPS * 2 {
            let f = t.frame_now();
            assert_eq!(detect_tone(&f.samples), Some(k % TONE_STEPS));
        }
        assert_eq!(detect_tone(&[0; 960]), None);
        // White-ish noise is not a tone.
        let noise: Vec<i16> = (0..960u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 16) as i16) / 4)
            .collect();
        assert_eq!(detect_tone(&noise), None);
    }

    #[test]
    fn video_check_counts_loss_and_order() {
        let mut c = VideoCheck::default();
        let tag = stamp::site_tag("x");
        for n in [0u32, 1, 2, 5, 4, 6] {
            let p = test_picture(
                320,
                180,
                Stamp {
                    frame: n,
                    time_us: 0,
                    site_tag: tag,
                },
            );
            c.check(&p, 1000, Some(tag), 1);
        }
        assert_eq!(c.verified, 6);
        assert_eq!(c.lost, 2);
        assert_eq!(c.out_of_order, 1);
        assert_eq!(c.last_frame, Some(6));
        assert!(c.mean_psnr().unwrap() > 90.0);
        let other = test_picture(
            320,
            180,
            Stamp {
                frame: 7,
                time_us: 0,
                site_tag: tag ^ 1,
            },
        );
        assert!(c.check(&other, 0, Some(tag), 0).is_none());
        assert_eq!(c.wrong_site, 1);
    }

    #[test]
    fn percentiles() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[5, 1, 3, 2, 4], 50.0), Some(3));
        assert_eq!(percentile(&[5, 1, 3, 2, 4], 95.0), Some(5));
        assert_eq!(percentile(&[7], 95.0), Some(7));
    }

    #[test]
    fn synthetic_camera_refuses_tiny_pictures() {
        assert!(SyntheticCamera::new(64, 48, 15, "x").is_err());
        assert!(SyntheticCamera::new(640, 360, 15, "x").is_ok());
    }

    #[test]
    fn a_paused_synthetic_camera_resumes_at_its_pace_without_a_burst() {
        let mut cam = SyntheticCamera::new(320, 180, 20, "x").unwrap();
        cam.read().unwrap();
        // Not read for 10 frame times (the camera was turned off).
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        for _ in 0..5 {
            cam.read().unwrap();
        }
        // Five frames at 20 fps take at least four intervals (200 ms); a burst of the ten
        // missed frames would return at once.
        assert!(
            t.elapsed() >= Duration::from_millis(190),
            "{:?}",
            t.elapsed()
        );
    }
}
