//! Probe padding in an H.264 picture: bytes a sender adds to prove its uplink carries more
//! before it starts a higher simulcast layer, and that a server removes before forwarding.
//!
//! The padding is one SEI NAL unit (type 6) of payload type 5, *user data unregistered*,
//! marked with [`PADDING_UUID`], placed before the picture's first slice (where an SEI
//! belongs in an access unit). A decoder that is given it skips it, as it skips any SEI it
//! does not use; a Điểm cầu server removes it ([`without_padding`]) so subscribers' downlinks
//! do not carry it. (Filler data, NAL type 12, is the obvious choice, but webrtc-rs's H.264
//! packetizer drops it before it reaches the wire.)
//!
//! Pictures are Annex B byte streams (NAL units after `00 00 01` or `00 00 00 01` start
//! codes), as the encoder writes them and as str0m hands a server whole frames.

/// The UUID that marks Điểm cầu probe padding (16 ASCII bytes, none of them zero).
pub const PADDING_UUID: [u8; 16] = *b"diemcau:padding!";

/// The byte the padding is made of (not zero, so no start code can appear inside it).
const FILL: u8 = 0xAA;

/// Bytes of a padding NAL unit besides its payload and size field: start code, NAL header,
/// payload type and the RBSP trailing byte.
const OVERHEAD: usize = 4 + 1 + 1 + 1;

/// A padding SEI NAL unit, start code included, of about `len` bytes (at least 24).
pub fn padding_nal(len: usize) -> Vec<u8> {
    let field = |p: usize| p / 255 + 1;
    let mut payload = len
        .saturating_sub(OVERHEAD + field(len))
        .max(PADDING_UUID.len());
    // A payload of a multiple of 255 bytes would end its size field with a zero.
    if payload.is_multiple_of(255) {
        payload += 1;
    }
    let mut nal = Vec::with_capacity(payload + field(payload) + OVERHEAD);
    nal.extend_from_slice(&[0, 0, 0, 1, 0x06, 0x05]);
    let mut rest = payload;
    while rest >= 255 {
        nal.push(0xFF);
        rest -= 255;
    }
    nal.push(rest as u8);
    nal.extend_from_slice(&PADDING_UUID);
    nal.resize(nal.len() + payload - PADDING_UUID.len(), FILL);
    nal.push(0x80);
    nal
}

/// The NAL units of an Annex B stream: for each, where it starts (its start code) and where
/// its header byte is.
fn units(stream: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 3 <= stream.len() {
        if stream[i] == 0 && stream[i + 1] == 0 && stream[i + 2] == 1 {
            let start = if i > 0 && stream[i - 1] == 0 {
                i - 1
            } else {
                i
            };
            out.push((start, i + 3));
            i += 3;
        } else {
            i += 1;
        }
    }
    out
}

fn is_padding(unit: &[u8]) -> bool {
    // unit: from the NAL header byte on.
    if unit.first().map(|h| h & 0x1F) != Some(6) || unit.get(1) != Some(&5) {
        return false;
    }
    let mut i = 2;
    while unit.get(i) == Some(&0xFF) {
        i += 1;
    }
    unit.get(i + 1..i + 17) == Some(&PADDING_UUID[..])
}

/// `picture` with `len` bytes (about) of padding before its first slice (at the end when it
/// has none).
pub fn with_padding(picture: &[u8], len: usize) -> Vec<u8> {
    let nal = padding_nal(len);
    let at = units(picture)
        .into_iter()
        .find(|&(_, h)| matches!(picture.get(h).map(|b| b & 0x1F), Some(1..=5)))
        .map_or(picture.len(), |(start, _)| start);
    let mut out = Vec::with_capacity(picture.len() + nal.len());
    out.extend_from_slice(&picture[..at]);
    out.extend_from_slice(&nal);
    out.extend_from_slice(&picture[at..]);
    out
}

/// `picture` without its padding, and how many bytes that removed; `None` when it has none
/// (the common case costs one scan and no copy of the picture).
pub fn without_padding(picture: &[u8]) -> Option<(Vec<u8>, usize)> {
    let units = units(picture);
    // Each unit: where it starts, where its header is, where it ends.
    let spans = || {
        units.iter().enumerate().map(|(i, &(start, h))| {
            let end = units.get(i + 1).map_or(picture.len(), |&(s, _)| s);
            (start, h, end)
        })
    };
    if !spans().any(|(_, h, end)| is_padding(&picture[h..end])) {
        return None;
    }
    let mut out = Vec::with_capacity(picture.len());
    if let Some(&(first, _)) = units.first() {
        out.extend_from_slice(&picture[..first]);
    }
    for (start, h, end) in spans() {
        if !is_padding(&picture[h..end]) {
            out.extend_from_slice(&picture[start..end]);
        }
    }
    let removed = picture.len() - out.len();
    Some((out, removed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An access unit as openh264 writes one: SPS, PPS, an IDR slice.
    fn keyframe() -> Vec<u8> {
        let mut au = vec![0, 0, 0, 1, 0x67, 0x42, 0xC0, 0x1F, 0xDA];
        au.extend_from_slice(&[0, 0, 0, 1, 0x68, 0xCE, 0x3C, 0x80]);
        au.extend_from_slice(&[0, 0, 0, 1, 0x65, 0x88, 0x84, 0x00, 0x33, 0xFF]);
        au
    }

    #[test]
    fn padding_goes_before_the_first_slice_and_comes_out_whole() {
        let au = keyframe();
        for len in [
            0,
            30,
            254,
            255 + OVERHEAD + 1,
            256 + 40,
            262,
            1000,
            4000,
            20_000,
        ] {
            let padded = with_padding(&au, len);
            assert!(padded.len() >= au.len() + 23, "{len}");
            if len > 100 {
                let added = padded.len() - au.len();
                assert!(added.abs_diff(len) <= 2, "asked {len}, added {added}");
            }
            // Before the IDR slice, after the parameter sets.
            let sei = padded
                .windows(6)
                .position(|w| w == [0, 0, 0, 1, 6, 5])
                .unwrap();
            let idr = padded
                .windows(5)
                .position(|w| w == [0, 0, 0, 1, 0x65])
                .unwrap();
            assert!(sei < idr && sei > 8, "{len}: sei at {sei}, idr at {idr}");
            // No start code inside the padding.
            let nal = &padded[sei + 4..idr];
            assert!(!nal.windows(3).any(|w| w == [0, 0, 1]), "{len}");
            let (back, removed) = without_padding(&padded).expect("padding found");
            assert_eq!(back, au, "{len}");
            assert_eq!(removed, padded.len() - au.len());
        }
    }

    #[test]
    fn a_picture_without_padding_is_left_alone() {
        assert!(without_padding(&keyframe()).is_none());
        // Another SEI (not ours) stays.
        let mut au = vec![0, 0, 0, 1, 0x06, 0x05, 20];
        au.extend_from_slice(b"some-other-uuid!");
        au.extend_from_slice(&[1, 2, 3, 4, 0x80]);
        au.extend_from_slice(&keyframe());
        assert!(without_padding(&au).is_none());
        assert!(without_padding(&[]).is_none());
        assert!(without_padding(&[0, 0, 1]).is_none());
        assert!(without_padding(&[0, 0, 1, 6, 5]).is_none());
    }

    #[test]
    fn a_picture_with_no_slice_gets_it_at_the_end() {
        let au = vec![0, 0, 0, 1, 0x67, 0x42];
        let padded = with_padding(&au, 100);
        assert_eq!(&padded[..au.len()], &au[..]);
        assert_eq!(without_padding(&padded).unwrap().0, au);
    }
}
