//! Raw media frames: planar I420 video and 48 kHz mono PCM audio.

use std::time::{SystemTime, UNIX_EPOCH};

/// Audio sample rate everywhere inside the engine.
pub const AUDIO_RATE: u32 = 48_000;
/// One Opus frame: 20 ms at 48 kHz, mono.
pub const AUDIO_FRAME_SAMPLES: usize = 960;

/// A planar I420 (YUV 4:2:0) picture with tight strides: `y` is `width*height` bytes, `u`
/// and `v` are `ceil(width/2)*ceil(height/2)` bytes each.
#[derive(Clone, PartialEq, Eq)]
pub struct I420Frame {
    pub width: usize,
    pub height: usize,
    pub y: Vec<u8>,
    pub u: Vec<u8>,
    pub v: Vec<u8>,
}

impl std::fmt::Debug for I420Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "I420Frame({}x{})", self.width, self.height)
    }
}

impl I420Frame {
    /// A black picture.
    pub fn black(width: usize, height: usize) -> Self {
        let (cw, ch) = Self::chroma_size(width, height);
        I420Frame {
            width,
            height,
            y: vec![16; width * height],
            u: vec![128; cw * ch],
            v: vec![128; cw * ch],
        }
    }

    pub fn chroma_size(width: usize, height: usize) -> (usize, usize) {
        (width.div_ceil(2), height.div_ceil(2))
    }

    /// The picture `divisor` times smaller each way (a box filter; sizes rounded down to
    /// even), for a lower spatial layer. A power of two is halved that many times (each
    /// halving is a 2x2 average, the same box filter and several times faster).
    pub fn downscaled(&self, divisor: usize) -> I420Frame {
        let d = divisor.max(1);
        if d > 1 && d.is_power_of_two() {
            let mut out = self.halved();
            let mut left = d / 2;
            while left > 1 {
                out = out.halved();
                left /= 2;
            }
            return out;
        }
        self.scaled_by(d, |src, stride, ow, oh| {
            let mut out = Vec::with_capacity(ow * oh);
            for y in 0..oh {
                for x in 0..ow {
                    let mut sum = 0usize;
                    for dy in 0..d {
                        let row = &src[(y * d + dy) * stride + x * d..][..d];
                        sum += row.iter().map(|&v| usize::from(v)).sum::<usize>();
                    }
                    out.push((sum / (d * d)) as u8);
                }
            }
            out
        })
    }

    /// The picture half as large each way (each pixel the rounded mean of a 2x2 block; sizes
    /// rounded down to even).
    pub fn halved(&self) -> I420Frame {
        self.scaled_by(2, |src, stride, ow, oh| {
            let mut out = Vec::with_capacity(ow * oh);
            for y in 0..oh {
                let r0 = &src[2 * y * stride..][..2 * ow];
                let r1 = &src[(2 * y + 1) * stride..][..2 * ow];
                out.extend(r0.chunks_exact(2).zip(r1.chunks_exact(2)).map(|(a, b)| {
                    ((u16::from(a[0]) + u16::from(a[1]) + u16::from(b[0]) + u16::from(b[1]) + 2)
                        / 4) as u8
                }));
            }
            out
        })
    }

    /// The picture `d` times smaller each way (sizes rounded down to even), each plane made
    /// by `plane(source plane, its stride, output width, output height)`.
    fn scaled_by(
        &self,
        d: usize,
        plane: impl Fn(&[u8], usize, usize, usize) -> Vec<u8>,
    ) -> I420Frame {
        let (w, h) = ((self.width / d) & !1, (self.height / d) & !1);
        let (cw, ch) = Self::chroma_size(w, h);
        let (scw, _) = Self::chroma_size(self.width, self.height);
        I420Frame {
            width: w,
            height: h,
            y: plane(&self.y, self.width, w, h),
            u: plane(&self.u, scw, cw, ch),
            v: plane(&self.v, scw, cw, ch),
        }
    }

    /// Copies planes given with arbitrary strides (as decoders hand them out).
    pub fn from_strided(
        width: usize,
        height: usize,
        planes: [&[u8]; 3],
        strides: [usize; 3],
    ) -> Self {
        let (cw, ch) = Self::chroma_size(width, height);
        let copy = |plane: &[u8], stride: usize, w: usize, h: usize| {
            let mut out = Vec::with_capacity(w * h);
            for row in 0..h {
                out.extend_from_slice(&plane[row * stride..row * stride + w]);
            }
            out
        };
        I420Frame {
            width,
            height,
            y: copy(planes[0], strides[0], width, height),
            u: copy(planes[1], strides[1], cw, ch),
            v: copy(planes[2], strides[2], cw, ch),
        }
    }
}

/// A video frame with its capture time.
#[derive(Debug, Clone)]
pub struct VideoFrame {
    pub picture: I420Frame,
    /// Microseconds since the Unix epoch when the frame was captured.
    pub captured_us: u64,
}

/// 20 ms of 48 kHz mono audio.
#[derive(Debug, Clone)]
pub struct AudioFrame {
    pub samples: Vec<i16>,
    pub captured_us: u64,
}

/// Loudness of 16-bit samples in dBFS (-100 for silence).
pub fn level_dbfs(samples: &[i16]) -> f32 {
    if samples.is_empty() {
        return -100.0;
    }
    let sum: f64 = samples.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    let rms = (sum / samples.len() as f64).sqrt() / 32768.0;
    if rms <= 1e-5 {
        -100.0
    } else {
        (20.0 * rms.log10()) as f32
    }
}

/// Microseconds since the Unix epoch, from the wall clock. Sender and receiver on one
/// machine share it, which is what glass-to-glass latency needs.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: usize, h: usize) -> I420Frame {
        let mut f = I420Frame::black(w, h);
        for (i, v) in f.y.iter_mut().enumerate() {
            *v = (i % 251) as u8;
        }
        for (i, v) in f.u.iter_mut().enumerate() {
            *v = (i * 7 % 256) as u8;
        }
        f
    }

    #[test]
    fn halving_averages_2x2_blocks_and_a_power_of_two_is_halved_again() {
        let f = ramp(8, 4);
        let h = f.halved();
        assert_eq!((h.width, h.height), (4, 2));
        // The first block: 0, 1 (row 0) and 8, 9 (row 1): (18 + 2) / 4 = 5.
        assert_eq!(h.y[0], 5);
        let mean = |x: usize, y: usize| {
            let p = |xx: usize, yy: usize| u16::from(f.y[yy * 8 + xx]);
            ((p(2 * x, 2 * y)
                + p(2 * x + 1, 2 * y)
                + p(2 * x, 2 * y + 1)
                + p(2 * x + 1, 2 * y + 1)
                + 2)
                / 4) as u8
        };
        for y in 0..2 {
            for x in 0..4 {
                assert_eq!(h.y[y * 4 + x], mean(x, y));
            }
        }
        assert_eq!((h.u.len(), h.v.len()), (2, 2));
        assert_eq!(f.downscaled(4), f.halved().halved());
        // 1280x720 → 640x360 → 320x180, with their chroma.
        let big = ramp(1280, 720).downscaled(4);
        assert_eq!(
            (big.width, big.height, big.y.len(), big.u.len()),
            (320, 180, 57_600, 14_400)
        );
        // Any other divisor is a plain box filter.
        let third = ramp(12, 6).downscaled(3);
        assert_eq!((third.width, third.height), (4, 2));
    }
}
