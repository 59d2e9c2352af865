//! The send pacer, audio first.
//!
//! webrtc-rs 0.21's own pacer releases every RTP packet through one queue at exactly the
//! congestion controller's target. On a link near its limit that is two faults at once:
//! sound waits behind a frame of pictures (seconds, on a thin link), and the queue sits where
//! the controller cannot see it (a packet's departure is stamped when it leaves the pacer),
//! so the estimate never learns the sender is overloading the path. This one:
//!
//! - sends sound (and RTCP) at once, charging its bits to the budget so pictures get less;
//! - paces pictures at [`PACING_FACTOR`] × the target, as libwebrtc does: smoothing the
//!   bursts of a keyframe, while the encoder, which follows the target, keeps the average
//!   below it and an overload shows up as delay on the path, where GCC reads it;
//! - drops pictures that waited longer than [`MAX_VIDEO_WAIT`] (the receiver asks for a
//!   keyframe), rather than letting a backlog grow without bound.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use rtc::interceptor::{Attribute, Interceptor, Pacer, Packet, StreamInfo, TaggedPacket};
use rtc::sansio::Protocol;
use rtc::shared::marshal::MarshalSize;

/// Pictures leave at up to this many times the congestion controller's target.
pub const PACING_FACTOR: f64 = 2.5;

/// A picture packet queued longer than this is dropped.
pub const MAX_VIDEO_WAIT: Duration = Duration::from_secs(1);

/// Where the pacer starts before the first estimate (the controller's own start).
const INITIAL_BPS: f64 = crate::peer::BWE_INITIAL_BPS;

pub struct AudioFirstPacer {
    bucket: Pacer,
    /// SSRCs of the local sound streams.
    audio: HashSet<u32>,
    /// Pictures waiting for budget, with when they came.
    queue: VecDeque<TaggedPacket>,
    /// Picture packets dropped for waiting too long.
    dropped: u64,
    write: VecDeque<TaggedPacket>,
    read: VecDeque<TaggedPacket>,
}

impl Default for AudioFirstPacer {
    fn default() -> Self {
        AudioFirstPacer {
            bucket: Pacer::new(INITIAL_BPS * PACING_FACTOR),
            audio: HashSet::new(),
            queue: VecDeque::new(),
            dropped: 0,
            write: VecDeque::new(),
            read: VecDeque::new(),
        }
    }
}

impl AudioFirstPacer {
    fn bits(p: &TaggedPacket) -> f64 {
        match &p.message.packet {
            Packet::Rtp(rtp) => (rtp.marshal_size() * 8) as f64,
            _ => 0.0,
        }
    }

    /// Picture packets dropped so far for waiting longer than [`MAX_VIDEO_WAIT`].
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Picture packets waiting.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    fn release(&mut self, now: Instant) {
        self.bucket.refill(now);
        while let Some(head) = self.queue.front() {
            if now.saturating_duration_since(head.now) >= MAX_VIDEO_WAIT {
                self.queue.pop_front();
                self.dropped += 1;
                continue;
            }
            let bits = Self::bits(head);
            if !self.bucket.can_release(bits) {
                break;
            }
            let mut p = self.queue.pop_front().expect("front just checked");
            self.bucket.consume(bits);
            // Departs now: the send history behind us must see the release instant.
            p.now = now;
            self.write.push_back(p);
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for AudioFirstPacer {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = webrtc::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        // The controller's new target rides inbound on the feedback that produced it.
        if let Some(Attribute::TargetBitrateChanged { bits_per_second }) =
            msg.message.get(&Attribute::TargetBitrateChanged {
                bits_per_second: 0.0,
            })
        {
            // What built up at the old rate is credited at the old rate.
            self.bucket.refill(msg.now);
            self.bucket
                .set_target_bitrate(bits_per_second * PACING_FACTOR);
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        let audio = match &msg.message.packet {
            Packet::Rtp(rtp) => self.audio.contains(&rtp.header.ssrc),
            // RTCP: feedback is only worth anything fresh.
            _ => {
                self.write.push_back(msg);
                return Ok(());
            }
        };
        self.bucket.refill(msg.now);
        if audio {
            // Sound goes now, ahead of any queued picture; its bits still count.
            self.bucket.consume(Self::bits(&msg));
            self.write.push_back(msg);
        } else {
            let now = msg.now;
            self.queue.push_back(msg);
            self.release(now);
        }
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), Self::Error> {
        self.release(now);
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        let head = self.queue.front()?;
        // The head expires at the latest then (also when no rate would ever release it).
        let expires = head.now + MAX_VIDEO_WAIT;
        let at = self.bucket.releasable_at(Self::bits(head));
        Some(at.map_or(expires, |at| at.min(expires)))
    }
}

impl Interceptor for AudioFirstPacer {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        if info.mime_type.to_ascii_lowercase().starts_with("audio/") {
            self.audio.insert(info.ssrc);
        }
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.audio.remove(&info.ssrc);
    }
    fn bind_remote_stream(&mut self, _: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::interceptor::AttributedPacket;
    use rtc::rtp;
    use rtc::shared::TransportContext;

    fn rtp_packet(ssrc: u32, seq: u16, bytes: usize, now: Instant) -> TaggedPacket {
        TaggedPacket {
            now,
            transport: TransportContext::default(),
            message: AttributedPacket::new(Packet::Rtp(rtp::Packet {
                header: rtp::header::Header {
                    ssrc,
                    sequence_number: seq,
                    ..Default::default()
                },
                payload: vec![0u8; bytes].into(),
            })),
        }
    }

    fn stream(ssrc: u32, mime: &str) -> StreamInfo {
        StreamInfo {
            ssrc,
            mime_type: mime.into(),
            ..Default::default()
        }
    }

    fn drain(p: &mut AudioFirstPacer) -> Vec<u32> {
        std::iter::from_fn(|| p.poll_write())
            .map(|m| match m.message.packet {
                Packet::Rtp(r) => r.header.ssrc,
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn sound_overtakes_queued_pictures_and_pictures_wait_for_budget() {
        let t0 = Instant::now();
        let mut p = AudioFirstPacer::default();
        p.bind_local_stream(&stream(1, "audio/opus"));
        p.bind_local_stream(&stream(2, "video/H264"));
        // A keyframe's worth of pictures at once: far more than the burst allows.
        for seq in 0..40 {
            p.handle_write(rtp_packet(2, seq, 1200, t0)).unwrap();
        }
        let first = drain(&mut p);
        assert!(first.iter().all(|&s| s == 2));
        assert!(first.len() < 40, "paced, not all at once: {}", first.len());
        assert!(p.queued() > 0);
        // Sound now leaves at once, ahead of the waiting pictures.
        p.handle_write(rtp_packet(1, 0, 120, t0)).unwrap();
        assert_eq!(drain(&mut p), vec![1]);
        // The rest follow as the budget refills (750 kbit/s at the initial target).
        let at = p.poll_timeout().expect("pictures waiting");
        assert!(at > t0);
        p.handle_timeout(at).unwrap();
        assert!(!drain(&mut p).is_empty());
    }

    #[test]
    fn pictures_that_waited_too_long_are_dropped() {
        let t0 = Instant::now();
        let mut p = AudioFirstPacer::default();
        // A target of 10 kbit/s: 40 packets of 1200 bytes would take 15 s.
        let mut fb = rtp_packet(9, 0, 0, t0);
        fb.message.packet = Packet::Rtcp(Vec::new());
        fb.message.add(Attribute::TargetBitrateChanged {
            bits_per_second: 10_000.0,
        });
        p.handle_read(fb).unwrap();
        for seq in 0..40 {
            p.handle_write(rtp_packet(2, seq, 1200, t0)).unwrap();
        }
        let sent = drain(&mut p).len();
        p.handle_timeout(t0 + MAX_VIDEO_WAIT + Duration::from_millis(1))
            .unwrap();
        let later = drain(&mut p).len();
        assert_eq!(p.queued(), 0, "nothing older than the limit is kept");
        assert_eq!(sent as u64 + later as u64 + p.dropped(), 40);
        assert!(p.dropped() > 30, "dropped {}", p.dropped());
    }
}
