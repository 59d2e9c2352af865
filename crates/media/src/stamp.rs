//! A frame stamp that survives H.264: 96 bits drawn as large black and white cells in the
//! top-left corner of the luma plane.
//!
//! Layout (most significant bit first, row by row, 16 cells a row, 6 rows):
//! `frame number (32) | capture time in µs, low 32 bits (32) | site tag (16) | CRC-16 (16)`.
//! A cell is `8 * max(1, width / 320)` pixels square, so it stays macroblock-aligned and
//! covers several 4x4 transform blocks even at 180p. The reader averages the middle half of
//! each cell and thresholds at mid-grey; the CRC rejects a frame whose stamp was damaged.

use crate::frame::I420Frame;

pub const STAMP_COLS: usize = 16;
pub const STAMP_ROWS: usize = 6;
const BLACK: u8 = 16;
const WHITE: u8 = 235;

/// What a stamp carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub frame: u32,
    /// Low 32 bits of the capture time in microseconds since the Unix epoch.
    pub time_us: u32,
    /// A 16-bit tag of the sending site (see [`site_tag`]).
    pub site_tag: u16,
}

/// Cell size in pixels for a picture of this width.
pub fn cell_size(width: usize) -> usize {
    8 * (width / 320).max(1)
}

/// The pixel rectangle `(width, height)` the stamp covers, from (0, 0).
pub fn stamp_area(width: usize) -> (usize, usize) {
    let c = cell_size(width);
    (c * STAMP_COLS, c * STAMP_ROWS)
}

/// Whether a picture is large enough to carry a stamp.
pub fn fits(width: usize, height: usize) -> bool {
    let (w, h) = stamp_area(width);
    width >= w && height >= h
}

/// A 16-bit tag for a site id (FNV-1a folded), so a receiver can tell whose frame it holds.
pub fn site_tag(site: &str) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in site.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    ((h >> 16) ^ (h & 0xffff)) as u16
}

/// CRC-16/CCITT-FALSE.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xffff;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

impl Stamp {
    fn to_bytes(self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0..4].copy_from_slice(&self.frame.to_be_bytes());
        b[4..8].copy_from_slice(&self.time_us.to_be_bytes());
        b[8..10].copy_from_slice(&self.site_tag.to_be_bytes());
        let crc = crc16(&b[0..10]);
        b[10..12].copy_from_slice(&crc.to_be_bytes());
        b
    }

    /// Draws the stamp into the luma plane. Panics if the picture is too small (a bug: the
    /// synthetic source checks [`fits`] when it is built).
    pub fn draw(self, pic: &mut I420Frame) {
        assert!(fits(pic.width, pic.height), "picture too small for stamp");
        let c = cell_size(pic.width);
        let bytes = self.to_bytes();
        for bit in 0..STAMP_COLS * STAMP_ROWS {
            let on = bytes[bit / 8] & (0x80 >> (bit % 8)) != 0;
            let value = if on { WHITE } else { BLACK };
            let (cx, cy) = ((bit % STAMP_COLS) * c, (bit / STAMP_COLS) * c);
            for y in cy..cy + c {
                let row = y * pic.width;
                pic.y[row + cx..row + cx + c].fill(value);
            }
        }
        // Neutral chroma under the stamp keeps the encoder from smearing colour into it.
        let (cw, _) = I420Frame::chroma_size(pic.width, pic.height);
        let (sw, sh) = stamp_area(pic.width);
        for y in 0..sh / 2 {
            pic.u[y * cw..y * cw + sw / 2].fill(128);
            pic.v[y * cw..y * cw + sw / 2].fill(128);
        }
    }

    /// Reads a stamp back; `None` if the picture is too small or the CRC does not match.
    pub fn read(pic: &I420Frame) -> Option<Stamp> {
        if !fits(pic.width, pic.height) {
            return None;
        }
        let c = cell_size(pic.width);
        let (m0, m1) = (c / 4, c - c / 4);
        let mut bytes = [0u8; 12];
        for bit in 0..STAMP_COLS * STAMP_ROWS {
            let (cx, cy) = ((bit % STAMP_COLS) * c, (bit / STAMP_COLS) * c);
            let mut sum = 0u32;
            for y in cy + m0..cy + m1 {
                let row = y * pic.width;
                sum += pic.y[row + cx + m0..row + cx + m1]
                    .iter()
                    .map(|&p| u32::from(p))
                    .sum::<u32>();
            }
            let n = ((m1 - m0) * (m1 - m0)) as u32;
            if sum / n >= 128 {
                bytes[bit / 8] |= 0x80 >> (bit % 8);
            }
        }
        let crc = u16::from_be_bytes([bytes[10], bytes[11]]);
        if crc16(&bytes[0..10]) != crc {
            return None;
        }
        Some(Stamp {
            frame: u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            time_us: u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            site_tag: u16::from_be_bytes([bytes[8], bytes[9]]),
        })
    }

    /// Microseconds from the stamp's capture time to `now_us` (wrapping arithmetic on the
    /// low 32 bits: correct for delays under 35 minutes).
    pub fn age_us(&self, now_us: u64) -> u32 {
        (now_us as u32).wrapping_sub(self.time_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips_at_all_sizes() {
        for (w, h) in [(320, 180), (640, 360), (1280, 720), (642, 362)] {
            let mut pic = I420Frame::black(w, h);
            let s = Stamp {
                frame: 0xdead_beef,
                time_us: 123_456_789,
                site_tag: site_tag("tp-vinh"),
            };
            s.draw(&mut pic);
            assert_eq!(Stamp::read(&pic), Some(s), "{w}x{h}");
        }
    }

    #[test]
    fn damaged_stamp_is_rejected() {
        let mut pic = I420Frame::black(640, 360);
        Stamp {
            frame: 7,
            time_us: 1,
            site_tag: 2,
        }
        .draw(&mut pic);
        // Flip one cell (bit 5 of the frame number) by painting it white.
        let c = cell_size(640);
        for y in 0..c {
            pic.y[y * 640 + 5 * c..y * 640 + 6 * c].fill(WHITE);
        }
        assert_eq!(Stamp::read(&pic), None);
    }

    #[test]
    fn noise_below_half_swing_is_tolerated() {
        let mut pic = I420Frame::black(640, 360);
        let s = Stamp {
            frame: 42,
            time_us: 99,
            site_tag: 3,
        };
        s.draw(&mut pic);
        for (i, p) in pic.y.iter_mut().enumerate() {
            let n = ((i * 7919) % 61) as i32 - 30;
            *p = (i32::from(*p) + n).clamp(0, 255) as u8;
        }
        assert_eq!(Stamp::read(&pic), Some(s));
    }

    #[test]
    fn age_wraps() {
        let s = Stamp {
            frame: 0,
            time_us: u32::MAX - 10,
            site_tag: 0,
        };
        assert_eq!(s.age_us((1u64 << 32) + 5), 16);
    }

    #[test]
    fn tags_differ_for_sample_sites() {
        assert_ne!(site_tag("tp-vinh"), site_tag("nghe-an"));
        assert_ne!(site_tag("a"), site_tag("b"));
    }
}
