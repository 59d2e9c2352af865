//! Decoded pictures on their way to the webview: one binary message per picture over a Tauri
//! channel (never JSON), drawn by the UI with WebGL.
//!
//! Message layout (little-endian):
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | format version, 1 |
//! | 1 | 0 = this site (self view / preview), 1 = a remote site |
//! | 2..4, 4..6 | width, height (even) |
//! | 6 | n = length of the site id |
//! | 7..7+n | site id (ASCII) |
//! | then | I420: Y (w·h), U (w/2·h/2), V (w/2·h/2) |
//!
//! Pictures wider than [`MAX_WIDTH`] are halved first: a gallery tile never needs more, and
//! it keeps the bytes crossing into the webview at 360p rates.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use diemcau_media::I420Frame;

pub const MAX_WIDTH: usize = 640;
pub const KIND_SELF: u8 = 0;
pub const KIND_REMOTE: u8 = 1;

/// Packs `picture` for the UI, halving it until it is at most [`MAX_WIDTH`] wide.
pub fn pack(kind: u8, site: &str, picture: &I420Frame) -> Vec<u8> {
    let mut owned;
    let mut p = picture;
    while p.width > MAX_WIDTH && p.height >= 4 {
        owned = halve(p);
        p = &owned;
    }
    let id = &site.as_bytes()[..site.len().min(255)];
    let mut out = Vec::with_capacity(7 + id.len() + p.y.len() + p.u.len() + p.v.len());
    out.push(1);
    out.push(kind);
    out.extend_from_slice(&(p.width as u16).to_le_bytes());
    out.extend_from_slice(&(p.height as u16).to_le_bytes());
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    out.extend_from_slice(&p.y);
    out.extend_from_slice(&p.u);
    out.extend_from_slice(&p.v);
    out
}

/// The picture at half size (2×2 box filter), dimensions kept even.
pub fn halve(p: &I420Frame) -> I420Frame {
    let w = (p.width / 2) & !1;
    let h = (p.height / 2) & !1;
    let plane = |src: &[u8], sw: usize, dw: usize, dh: usize| {
        let mut out = vec![0u8; dw * dh];
        for y in 0..dh {
            let r0 = &src[2 * y * sw..];
            let r1 = &src[(2 * y + 1) * sw..];
            for x in 0..dw {
                let s = u16::from(r0[2 * x])
                    + u16::from(r0[2 * x + 1])
                    + u16::from(r1[2 * x])
                    + u16::from(r1[2 * x + 1]);
                out[y * dw + x] = ((s + 2) / 4) as u8;
            }
        }
        out
    };
    I420Frame {
        width: w,
        height: h,
        y: plane(&p.y, p.width, w, h),
        u: plane(&p.u, p.width / 2, w / 2, h / 2),
        v: plane(&p.v, p.width / 2, w / 2, h / 2),
    }
}

/// Lets at most `fps` pictures per site through: the webview draws at 15 fps per tile, and
/// pictures it cannot draw should not queue up in front of it.
#[derive(Debug)]
pub struct Pacer {
    every: Duration,
    last: HashMap<String, Instant>,
}

impl Pacer {
    pub fn new(fps: u32) -> Pacer {
        Pacer {
            every: Duration::from_secs_f64(1.0 / f64::from(fps.max(1))),
            last: HashMap::new(),
        }
    }

    /// Whether a picture from `site` arriving now goes through.
    pub fn admit(&mut self, site: &str, now: Instant) -> bool {
        // A little slack so a 15 fps source is not cut to 7.5 by clock jitter.
        let slack = self.every.mul_f32(0.8);
        match self.last.get_mut(site) {
            Some(t) if now.duration_since(*t) < slack => false,
            Some(t) => {
                *t = now;
                true
            }
            None => {
                self.last.insert(site.to_string(), now);
                true
            }
        }
    }

    pub fn forget(&mut self, site: &str) {
        self.last.remove(site);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picture(w: usize, h: usize, luma: u8) -> I420Frame {
        I420Frame {
            width: w,
            height: h,
            y: vec![luma; w * h],
            u: vec![100; w * h / 4],
            v: vec![200; w * h / 4],
        }
    }

    #[test]
    fn a_message_carries_header_id_and_planes() {
        let m = pack(KIND_REMOTE, "xa-a", &picture(64, 32, 7));
        assert_eq!(m[0], 1);
        assert_eq!(m[1], KIND_REMOTE);
        assert_eq!(u16::from_le_bytes([m[2], m[3]]), 64);
        assert_eq!(u16::from_le_bytes([m[4], m[5]]), 32);
        assert_eq!(m[6], 4);
        assert_eq!(&m[7..11], b"xa-a");
        assert_eq!(m.len(), 11 + 64 * 32 * 3 / 2);
        assert_eq!(m[11], 7);
        assert_eq!(m[11 + 64 * 32], 100);
        assert_eq!(*m.last().unwrap(), 200);
    }

    #[test]
    fn big_pictures_are_halved_to_tile_size() {
        let m = pack(KIND_SELF, "", &picture(1280, 720, 50));
        assert_eq!(u16::from_le_bytes([m[2], m[3]]), 640);
        assert_eq!(u16::from_le_bytes([m[4], m[5]]), 360);
        assert_eq!(m.len(), 7 + 640 * 360 * 3 / 2);
        // Averaging a 2x2 block of [0, 255; 255, 0] gives the middle grey.
        let mut p = picture(4, 4, 0);
        p.y = vec![
            0, 255, 0, 255, 255, 0, 255, 0, 0, 255, 0, 255, 255, 0, 255, 0,
        ];
        let h = halve(&p);
        assert_eq!((h.width, h.height), (2, 2));
        assert_eq!(h.y, vec![128; 4]);
    }

    #[test]
    fn the_pacer_caps_each_site_separately() {
        let mut p = Pacer::new(15);
        let t0 = Instant::now();
        assert!(p.admit("a", t0));
        assert!(p.admit("b", t0));
        assert!(!p.admit("a", t0 + Duration::from_millis(20)));
        assert!(p.admit("a", t0 + Duration::from_millis(67)));
        // A 30 fps source is cut to 15.
        let passed = (0..60)
            .filter(|i| p.admit("c", t0 + Duration::from_micros(i * 33_333)))
            .count();
        assert_eq!(passed, 30);
    }
}
