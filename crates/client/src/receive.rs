//! Receiving: one task per remote track reads RTP, reassembles H.264 access units (or takes
//! Opus packets whole), and hands them to a decoder; the verifying sink reads the synthetic
//! stamps back and keeps per-site counters.
//!
//! A receive track is one of the slots negotiated at join; which site it carries comes from
//! the server's latest `slots` message (kept in [`Remote::slots`]). Video decoding runs on a
//! thread of its own per slot, so a slow decoder never stalls the network tasks.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use diemcau_media::playout::Mixer;
use diemcau_media::stamp::site_tag;
use diemcau_media::synthetic::{detect_tone, VideoCheck, TONE_STEPS};
use diemcau_media::{now_us, AudioDecoder, VideoDecoder, AUDIO_FRAME_SAMPLES};
use diemcau_protocol::{MediaKind, SiteId};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use tokio::sync::mpsc;
use tracing::debug;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::PeerConnection;

use crate::assemble::H264Assembler;
use crate::RoomEvent;

/// Counts a slot's packet with sequence number `seq` after `last` into the downlink
/// counters; returns the new last. Late or repeated packets (and jumps of more than a
/// thousand, a slot that started over) count as received only.
fn count_downlink(remote: &Remote, last: Option<u16>, seq: u16) -> Option<u16> {
    remote.down_packets.fetch_add(1, Ordering::Relaxed);
    let Some(prev) = last else {
        return Some(seq);
    };
    let d = seq.wrapping_sub(prev);
    if d == 0 || d > 0x8000 {
        return last;
    }
    if d <= 1000 {
        remote
            .down_lost
            .fetch_add(u64::from(d - 1), Ordering::Relaxed);
    }
    Some(seq)
}

/// A sound packet further behind the last one than this (RTP ticks, 2 s) is not late but
/// from a new stream: the site joined again, and its timestamps start somewhere new.
const LATE_LIMIT: i32 = 2 * 48_000;

/// What was received from one remote site.
#[derive(Debug, Clone, Default)]
pub struct SiteCounters {
    pub video: VideoCheck,
    pub video_decode_errors: u64,
    pub audio_frames: u64,
    /// Decoded audio frames that carried the synthetic tone marks.
    pub audio_verified: u64,
    /// Lost sound frames rebuilt from the next packet's in-band FEC.
    pub audio_repaired: u64,
    /// Lost sound frames that could not be rebuilt (concealed by the decoder).
    pub audio_concealed: u64,
    /// Media payload received (bytes), sound and pictures.
    pub bytes: u64,
    /// Decoded pictures by size ("layer").
    pub layers: BTreeMap<(usize, usize), u64>,
    /// The size of the last picture (a change is a `VideoLayer` event).
    pub last_size: Option<(usize, usize)>,
    /// Time from the start of the join to this site's first verified picture.
    pub first_verified: Option<Duration>,
    /// Loudness of the loudest recent sound frame (dBFS), and when it was heard.
    pub audio_level_dbfs: f32,
    pub audio_loud_at: Option<Instant>,
}

/// State shared by the receive tasks and the room.
pub struct Remote {
    /// Playout mixer when a speaker plays remote audio.
    pub mixer: Option<Arc<Mutex<Mixer>>>,
    /// mid → (kind, site currently carried).
    pub slots: Mutex<HashMap<String, (MediaKind, Option<SiteId>)>>,
    pub sites: Mutex<BTreeMap<SiteId, SiteCounters>>,
    pub started: Instant,
    pub first_verified: Mutex<Option<Duration>>,
    pub events: mpsc::UnboundedSender<RoomEvent>,
    pub deliver_video: bool,
    pub keyframe_requests_sent: AtomicU64,
    /// Downlink loss: packets received on every slot, and packets missing between them. The
    /// server numbers each slot's packets itself, so a gap is loss on the way from the
    /// server to this site, whatever happened before.
    pub down_packets: AtomicU64,
    pub down_lost: AtomicU64,
    /// Measure PSNR on every n-th verified frame per site (0 = never).
    pub psnr_every: u64,
}

impl Remote {
    fn site_of(&self, mid: &str) -> Option<SiteId> {
        self.slots
            .lock()
            .expect("slot map lock poisoned")
            .get(mid)
            .and_then(|(_, s)| s.clone())
    }
}

/// Finds the mid of the transceiver whose receiver has `receiver_id`.
async fn mid_of(
    pc: &Arc<dyn PeerConnection>,
    receiver_id: webrtc::rtp_transceiver::RTCRtpReceiverId,
) -> Option<String> {
    for t in pc.get_transceivers().await {
        if let Ok(Some(r)) = t.receiver().await {
            if r.id() == receiver_id {
                return t.mid().await.ok().flatten();
            }
        }
    }
    None
}

/// Reads one remote track until it ends.
pub async fn run_track(
    pc: Arc<dyn PeerConnection>,
    track: Arc<dyn TrackRemote>,
    remote: Arc<Remote>,
) {
    let kind = track.kind().await;
    let mut mid: Option<String> = None;
    match kind {
        RtpCodecKind::Video => {
            let (tx, rx) = std::sync::mpsc::channel::<(String, Bytes, bool)>();
            let (pli_tx, mut pli_rx) = mpsc::unbounded_channel::<()>();
            let thread_remote = remote.clone();
            let decoder = std::thread::Builder::new()
                .name("video-decode".into())
                .spawn(move || decode_video(rx, thread_remote, pli_tx))
                .expect("spawning a thread only fails when the OS is out of resources");
            let mut assembler = H264Assembler::new();
            let mut last_pli: Option<Instant> = None;
            let mut last_seq: Option<u16> = None;
            loop {
                tokio::select! {
                    ev = track.poll() => {
                        let Some(ev) = ev else { break };
                        match ev {
                            TrackRemoteEvent::OnOpen(init) => {
                                mid = mid_of(&pc, init.receiver_id).await;
                                debug!(?mid, "video track open");
                            }
                            TrackRemoteEvent::OnRtpPacket(pkt) => {
                                let Some(m) = mid.clone() else { continue };
                                last_seq = count_downlink(&remote, last_seq, pkt.header.sequence_number);
                                for f in assembler.push(pkt, Instant::now()) {
                                    if tx.send((m.clone(), f.data, f.after_loss)).is_err() {
                                        break;
                                    }
                                }
                            }
                            TrackRemoteEvent::OnEnded => break,
                            _ => {}
                        }
                    }
                    Some(()) = pli_rx.recv() => {
                        let now = Instant::now();
                        if last_pli.is_some_and(|t| now - t < Duration::from_millis(300)) {
                            continue;
                        }
                        last_pli = Some(now);
                        if let Some(&ssrc) = track.ssrcs().await.first() {
                            remote.keyframe_requests_sent.fetch_add(1, Ordering::Relaxed);
                            let pli = PictureLossIndication { sender_ssrc: 0, media_ssrc: ssrc };
                            let _ = track.write_rtcp(vec![Box::new(pli)]).await;
                        }
                    }
                }
            }
            drop(tx);
            let _ = tokio::task::spawn_blocking(move || decoder.join()).await;
        }
        _ => {
            let mut dec = match AudioDecoder::new() {
                Ok(d) => d,
                Err(e) => {
                    debug!("opus decoder: {e}");
                    return;
                }
            };
            // The last packet's RTP timestamp per site on this slot, and whether it was a DTX
            // (silence) packet. The server renumbers what it forwards, so loss before it shows
            // only in the timestamps: Opus's RTP clock is its 48 kHz sample rate, so a frame
            // is AUDIO_FRAME_SAMPLES ticks.
            let mut last: Option<(SiteId, u32, bool)> = None;
            let mut last_seq: Option<u16> = None;
            while let Some(ev) = track.poll().await {
                match ev {
                    TrackRemoteEvent::OnOpen(init) => {
                        mid = mid_of(&pc, init.receiver_id).await;
                    }
                    TrackRemoteEvent::OnRtpPacket(pkt) => {
                        let Some(m) = mid.as_deref() else { continue };
                        last_seq = count_downlink(&remote, last_seq, pkt.header.sequence_number);
                        let Some(site) = remote.site_of(m) else {
                            continue;
                        };
                        if pkt.payload.is_empty() {
                            continue;
                        }
                        let ts = pkt.header.timestamp;
                        let bytes = pkt.payload.len() as u64;
                        // Frames missing before this one (0 when none).
                        let prev = match &last {
                            Some((s, prev, dtx)) if *s == site => Some((*prev, *dtx)),
                            _ => None,
                        };
                        let Some(gap) = frames_missing(prev, ts) else {
                            continue;
                        };
                        last = Some((site.clone(), ts, pkt.payload.len() <= 2));
                        // The frame just before this packet is in its in-band FEC (when the
                        // sender put it there); older ones are gone. Gaps of a second or more
                        // are outages, not loss to repair.
                        let loss = (1..50).contains(&gap);
                        let rebuilt = if loss {
                            dec.recover(&pkt.payload).ok()
                        } else {
                            None
                        };
                        // Playout is per slot: a slot's RTP sequence numbers are continuous
                        // even when the site it carries changes (the room resets it then).
                        if let Some(mx) = &remote.mixer {
                            let now = Instant::now();
                            if let Ok(mut mx) = mx.lock() {
                                mx.push(m, pkt.header.sequence_number, ts, &pkt.payload, now);
                            }
                        }
                        let Ok(pcm) = dec.decode(&pkt.payload) else {
                            continue;
                        };
                        let step = detect_tone(&pcm);
                        let tone = step.is_some();
                        // A rebuilt frame counts as repaired when it is provably the lost one:
                        // the test tone changes pitch every frame, so FEC gives the lost
                        // frame's pitch where concealment would stretch the one before.
                        // (Speech cannot be checked this way; its losses count as concealed.)
                        let repaired = u64::from(rebuilt.as_deref().is_some_and(|r| {
                            step.is_some_and(|s| {
                                detect_tone(r) == Some((s + TONE_STEPS - 1) % TONE_STEPS)
                            })
                        }));
                        let concealed = if loss { u64::from(gap) - repaired } else { 0 };
                        let level = crate::publish::level_dbfs(&pcm);
                        let mut sites = remote.sites.lock().expect("site counters lock poisoned");
                        let c = sites.entry(site).or_default();
                        // Speaking indicator: hold the loudest level for 300 ms.
                        let stale = c
                            .audio_loud_at
                            .is_none_or(|t| t.elapsed() > Duration::from_millis(300));
                        if stale || level >= c.audio_level_dbfs {
                            c.audio_level_dbfs = level;
                            c.audio_loud_at = Some(Instant::now());
                        }
                        c.audio_frames += 1;
                        c.bytes += bytes;
                        c.audio_repaired += repaired;
                        c.audio_concealed += concealed;
                        if tone {
                            c.audio_verified += 1;
                        }
                    }
                    TrackRemoteEvent::OnEnded => break,
                    _ => {}
                }
            }
        }
    }
}

/// Sound frames missing before a packet with RTP timestamp `ts`, given the last packet's
/// timestamp from the same site and whether it was silence (DTX); `None` for a late or
/// repeated packet, to be skipped. Opus's RTP clock is its sample rate, so a frame is
/// [`AUDIO_FRAME_SAMPLES`] ticks.
pub fn frames_missing(prev: Option<(u32, bool)>, ts: u32) -> Option<u32> {
    match prev {
        // After silence (DTX) the sender skips frames on purpose.
        Some((prev, false)) => {
            let d = ts.wrapping_sub(prev) as i32;
            if d > 0 {
                Some((d as u32 / AUDIO_FRAME_SAMPLES as u32).saturating_sub(1))
            } else if d > -LATE_LIMIT {
                // Late or repeated: already counted as lost, or already had.
                None
            } else {
                // Far behind: the site joined again and its sound starts from a new
                // timestamp.
                Some(0)
            }
        }
        _ => Some(0),
    }
}

fn decode_video(
    rx: std::sync::mpsc::Receiver<(String, Bytes, bool)>,
    remote: Arc<Remote>,
    pli: mpsc::UnboundedSender<()>,
) {
    let mut dec = match VideoDecoder::new() {
        Ok(d) => d,
        Err(e) => {
            debug!("H.264 decoder: {e}");
            return;
        }
    };
    while let Ok((mid, data, lost)) = rx.recv() {
        if lost {
            let _ = pli.send(());
        }
        let Some(site) = remote.site_of(&mid) else {
            continue;
        };
        let bytes = data.len() as u64;
        let picture = match dec.decode(&data) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(_) => {
                remote
                    .sites
                    .lock()
                    .expect("site counters lock poisoned")
                    .entry(site)
                    .or_default()
                    .video_decode_errors += 1;
                let _ = pli.send(());
                continue;
            }
        };
        let now = now_us();
        let verified = {
            let mut sites = remote.sites.lock().expect("site counters lock poisoned");
            let c = sites.entry(site.clone()).or_default();
            c.bytes += bytes;
            let ok = c
                .video
                .check(&picture, now, Some(site_tag(&site)), remote.psnr_every)
                .is_some();
            if ok && c.first_verified.is_none() {
                c.first_verified = Some(remote.started.elapsed());
            }
            let size = (picture.width, picture.height);
            let layer_changed = c.last_size != Some(size);
            c.last_size = Some(size);
            *c.layers.entry(size).or_default() += 1;
            if layer_changed {
                let _ = remote.events.send(RoomEvent::VideoLayer {
                    site: site.clone(),
                    width: size.0,
                    height: size.1,
                });
            }
            ok
        };
        if verified {
            let mut first = remote.first_verified.lock().expect("lock poisoned");
            if first.is_none() {
                let since = remote.started.elapsed();
                *first = Some(since);
                let _ = remote.events.send(RoomEvent::FirstVerifiedFrame {
                    site: site.clone(),
                    since_join: since,
                });
            }
        }
        if remote.deliver_video {
            let _ = remote.events.send(RoomEvent::VideoFrame {
                site,
                picture: Arc::new(picture),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sound_gaps_come_from_timestamps_and_a_new_stream_is_not_late() {
        let f = AUDIO_FRAME_SAMPLES as u32;
        assert_eq!(frames_missing(None, 5), Some(0));
        assert_eq!(frames_missing(Some((1000, false)), 1000 + f), Some(0));
        assert_eq!(frames_missing(Some((1000, false)), 1000 + 4 * f), Some(3));
        // Across the wrap of the 32-bit clock.
        assert_eq!(frames_missing(Some((u32::MAX - f + 1, false)), f), Some(1));
        // After silence nothing counts as lost.
        assert_eq!(frames_missing(Some((1000, true)), 1000 + 40 * f), Some(0));
        // Late or repeated packets are skipped…
        assert_eq!(frames_missing(Some((100_000, false)), 100_000), None);
        assert_eq!(
            frames_missing(Some((100_000, false)), 100_000 - 3 * f),
            None
        );
        // …but a site that joined again starts from anywhere, also far behind.
        assert_eq!(
            frames_missing(Some((3_000_000_000, false)), 2_000_000_000),
            Some(0)
        );
        // (Far ahead reads as a long gap, which the caller takes for an outage, not loss.)
        assert!(frames_missing(Some((2_000_000_000, false)), 3_000_000_000).unwrap() > 50);
    }
}
