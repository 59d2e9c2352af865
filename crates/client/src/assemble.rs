//! H.264 frame assembly from RTP packets, emitting a frame as soon as its last packet (the
//! one with the marker bit) and every packet before it are in.
//!
//! webrtc-rs's `SampleBuilder` only releases a frame when the *next* frame's first packet
//! arrives, which adds a whole frame interval (67 ms at 15 fps) of latency. This assembler
//! uses the marker bit instead, tolerates reordering and NACK retransmissions, and gives up on
//! a gap once it is older than [`GIVE_UP`], reporting the loss so the caller can send a PLI.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rtc::rtp::codec::h264::H264Packet;
use rtc::rtp::packetizer::Depacketizer;
use rtc::rtp::Packet;

/// How long a missing packet is waited for (NACK has this long to repair it).
pub const GIVE_UP: Duration = Duration::from_millis(400);

/// One reassembled access unit.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Annex-B bitstream.
    pub data: Bytes,
    pub rtp_time: u32,
    /// Packets were given up on before this frame.
    pub after_loss: bool,
}

#[derive(Debug, Default)]
pub struct H264Assembler {
    packets: BTreeMap<u64, (Packet, Instant)>,
    /// Extended sequence number of the highest packet seen.
    highest: Option<u64>,
    /// Where the next frame starts.
    next_start: Option<u64>,
    lost: bool,
}

impl H264Assembler {
    pub fn new() -> Self {
        Self::default()
    }

    fn extend(&self, seq: u16) -> u64 {
        let Some(h) = self.highest else {
            // Start well above zero so earlier packets still have room below.
            return (1 << 32) + u64::from(seq);
        };
        let base = h & !0xffff;
        let cands = [base.wrapping_sub(1 << 16), base, base + (1 << 16)];
        cands
            .into_iter()
            .map(|b| b + u64::from(seq))
            .min_by_key(|c| c.abs_diff(h))
            .expect("three candidates")
    }

    /// Adds a packet; returns the frames it completed, in order.
    pub fn push(&mut self, pkt: Packet, now: Instant) -> Vec<Frame> {
        let ext = self.extend(pkt.header.sequence_number);
        if self.next_start.is_some_and(|s| ext < s) {
            return Vec::new(); // late duplicate or a retransmission we gave up on
        }
        self.highest = Some(self.highest.map_or(ext, |h| h.max(ext)));
        if self.next_start.is_none() {
            self.next_start = Some(ext);
        }
        self.packets.entry(ext).or_insert((pkt, now));
        let mut out = Vec::new();
        loop {
            if let Some(f) = self.try_emit() {
                out.push(f);
                continue;
            }
            if !self.give_up_if_stale(now) {
                break;
            }
        }
        out
    }

    fn try_emit(&mut self) -> Option<Frame> {
        let start = self.next_start?;
        let mut end = None;
        let mut seq = start;
        while let Some((p, _)) = self.packets.get(&seq) {
            if p.header.marker {
                end = Some(seq);
                break;
            }
            seq += 1;
        }
        let end = end?;
        let mut depack = H264Packet::default();
        let mut data = BytesMut::new();
        let mut rtp_time = 0;
        let mut broken = false;
        for s in start..=end {
            let (p, _) = self.packets.remove(&s).expect("checked present above");
            rtp_time = p.header.timestamp;
            match depack.depacketize(&p.payload) {
                Ok(b) => data.extend_from_slice(&b),
                Err(_) => broken = true,
            }
        }
        self.next_start = Some(end + 1);
        let after_loss = std::mem::take(&mut self.lost) || broken;
        Some(Frame {
            data: data.freeze(),
            rtp_time,
            after_loss,
        })
    }

    /// If the packet at the head of the line has been missing too long, skips to the frame
    /// after the next marker. Returns whether it skipped.
    fn give_up_if_stale(&mut self, now: Instant) -> bool {
        let Some(oldest) = self.packets.values().map(|(_, t)| *t).min() else {
            return false;
        };
        if now.duration_since(oldest) < GIVE_UP {
            return false;
        }
        // A gap nobody filled in time: resume after the first marker we hold.
        match self.packets.iter().find(|(_, (p, _))| p.header.marker) {
            Some((&m, _)) => {
                self.packets.retain(|&s, _| s > m);
                self.next_start = Some(m + 1);
            }
            None if self.packets.len() > 4096 => {
                self.packets.clear();
                self.next_start = None;
            }
            None => return false,
        }
        self.lost = true;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtp::header::Header;

    /// FU-A fragments of one NAL of `len` bytes, or a single NAL packet.
    fn packets(seq0: u16, ts: u32, nal_type: u8, len: usize, per: usize) -> Vec<Packet> {
        let nal: Vec<u8> = std::iter::once(0x60 | nal_type)
            .chain((1..len).map(|i| i as u8))
            .collect();
        let mk = |i: usize, payload: Vec<u8>, marker: bool| Packet {
            header: Header {
                version: 2,
                marker,
                payload_type: 102,
                sequence_number: seq0.wrapping_add(i as u16),
                timestamp: ts,
                ..Default::default()
            },
            payload: Bytes::from(payload),
        };
        if len <= per {
            return vec![mk(0, nal, true)];
        }
        let body = &nal[1..];
        let chunks: Vec<&[u8]> = body.chunks(per).collect();
        chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let s = if i == 0 { 0x80 } else { 0 };
                let e = if i == chunks.len() - 1 { 0x40 } else { 0 };
                let mut p = vec![0x60 | 28, s | e | nal_type];
                p.extend_from_slice(c);
                mk(i, p, i == chunks.len() - 1)
            })
            .collect()
    }

    #[test]
    fn emits_on_marker_without_waiting_for_next_frame() {
        let mut a = H264Assembler::new();
        let now = Instant::now();
        let ps = packets(100, 9000, 5, 3000, 1000);
        assert_eq!(ps.len(), 3);
        let mut got = Vec::new();
        for p in ps {
            got.extend(a.push(p, now));
        }
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].data[..4], &[0, 0, 0, 1]);
        assert_eq!(got[0].data.len(), 4 + 3000);
        assert!(!got[0].after_loss);
    }

    #[test]
    fn reordered_and_retransmitted_packets_complete_the_frame() {
        let mut a = H264Assembler::new();
        let now = Instant::now();
        let mut ps = packets(65_534, 1, 1, 4000, 1000); // wraps the 16-bit sequence
        let second = ps.remove(1);
        let mut got = Vec::new();
        for p in ps {
            got.extend(a.push(p, now));
        }
        assert!(
            got.is_empty(),
            "frame incomplete until the missing packet comes"
        );
        got.extend(a.push(second, now + Duration::from_millis(30)));
        assert_eq!(got.len(), 1);
        assert!(!got[0].after_loss);
        // The next frame continues across the wrap.
        let next = packets(65_534u16.wrapping_add(4), 2, 1, 500, 1000);
        let f = a.push(next.into_iter().next().unwrap(), now);
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn gives_up_on_a_lost_packet_and_reports_loss() {
        let mut a = H264Assembler::new();
        let t0 = Instant::now();
        let mut f1 = packets(10, 1, 1, 3000, 1000);
        f1.remove(1); // lost for good
        for p in f1 {
            assert!(a.push(p, t0).is_empty());
        }
        let f2 = packets(13, 2, 1, 500, 1000);
        let f3 = packets(14, 3, 1, 500, 1000);
        assert!(a.push(f2[0].clone(), t0).is_empty());
        let got = a.push(f3[0].clone(), t0 + GIVE_UP + Duration::from_millis(1));
        // Frame 1 is abandoned; frame 2 comes out flagged (the decoder may need a
        // keyframe), frame 3 follows normally.
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].rtp_time, got[0].after_loss), (2, true));
        assert_eq!((got[1].rtp_time, got[1].after_loss), (3, false));
        // A straggler from the abandoned frame is ignored.
        assert!(a.push(packets(11, 1, 1, 10, 1000).remove(0), t0).is_empty());
    }
}
