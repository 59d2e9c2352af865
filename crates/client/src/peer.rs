//! The WebRTC peer connection (webrtc-rs 0.21): codecs, interceptors, local tracks.
//!
//! Interceptor chain: NACK generator/responder, RTCP sender/receiver reports, TWCC with the
//! GCC send-side estimator (its target bitrate is published to the encoder through an
//! atomic), our audio-first pacer ([`crate::pacing`]) in place of webrtc-rs's, and,
//! application-most, [`keyframe_requests`], which hands inbound PLI/FIR to the
//! application so the encoder can answer them with an IDR.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::{
    Attribute, BandwidthEstimator, CongestionControlBuilder, EstimatorStats, Gcc, Interceptor,
    Packet, PacketReport, Registry, Slot, StreamInfo, TaggedPacket, TwccSenderBuilder,
};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::{
    MediaEngine, MIME_TYPE_H264, MIME_TYPE_OPUS, MIME_TYPE_RTX,
};
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::sansio::Protocol;
use tokio::sync::{mpsc, watch};
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCIceConnectionState,
    RTCIceGatheringState, RTCPeerConnectionState, SettingEngineBuilder,
};

use crate::pacing::AudioFirstPacer;
use crate::ClientError;

/// Where the send-side bandwidth estimate starts (bits per second): low enough not to flood a rural uplink's buffer for the first
/// seconds (GCC climbs from here within seconds on a good link).
pub const BWE_INITIAL_BPS: f64 = 300_000.0;
/// ICE consent checks: how often, and how long without an answer before the path is lost.
pub const ICE_CONSENT_EVERY: Duration = Duration::from_millis(500);
pub const ICE_DISCONNECTED: Duration = Duration::from_secs(5);

/// Send-side bandwidth estimator bounds (bits per second).
pub const BWE_MIN_BPS: f64 = 80_000.0;
pub const BWE_MAX_BPS: f64 = 4_000_000.0;

pub fn h264_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_H264.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"
            .to_owned(),
        rtcp_feedback: vec![],
    }
}

pub fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1;usedtx=1".to_owned(),
        rtcp_feedback: vec![],
    }
}

/// Loss from the congestion controller's feedback, for the quality figures (the round trip
/// comes from ICE's checks on the selected pair: this GCC does not measure it).
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Of what was sent, the share lost, in parts per million, plus one (0 until known).
    loss_ppm: AtomicU64,
    /// Packets the far end's transport-wide feedback has reported on, and of those the ones
    /// it reported lost (what the controller's loss figure is made of).
    pub reported: AtomicU64,
    pub reported_lost: AtomicU64,
    /// Of those reported lost, the ones no feedback that arrived covered: taken as a lost
    /// feedback and left out of the estimate ([`without_lost_feedback`]).
    pub left_out: AtomicU64,
    /// What the far end acknowledged receiving over the last [`ACKED_WINDOW`], in bits per
    /// second, as `f64::to_bits` (0 until feedback came): what the path has shown it carries.
    acked_bps: AtomicU64,
    /// GCC's own target before the queue's ceiling ([`DelayCap`]), as `f64::to_bits`.
    gcc_bps: AtomicU64,
    /// The sender is probing the path (padding its pictures, [`crate::publish::LayerProbe`]):
    /// what gets through without a queue raises the ceiling.
    pub probing: std::sync::atomic::AtomicBool,
}

impl LinkStats {
    /// Percent.
    pub fn loss_pct(&self) -> Option<f64> {
        match self.loss_ppm.load(Ordering::Relaxed) {
            0 => None,
            p => Some((p - 1) as f64 / 10_000.0),
        }
    }

    /// What the far end acknowledged receiving over the last [`ACKED_WINDOW`] (bps), once
    /// feedback came.
    pub fn acked_bps(&self) -> Option<f64> {
        known_f64(&self.acked_bps)
    }

    /// GCC's own target, before the queue's ceiling (bps), once known.
    pub fn gcc_bps(&self) -> Option<f64> {
        known_f64(&self.gcc_bps)
    }

    fn record(&self, stats: &EstimatorStats) {
        if let Some(loss) = stats.packet_loss {
            let ppm = (loss.clamp(0.0, 1.0) * 1e6) as u64;
            self.loss_ppm.store(ppm + 1, Ordering::Relaxed);
        }
    }
}

/// An `f64` kept as its bits, 0 until one is stored.
fn known_f64(a: &AtomicU64) -> Option<f64> {
    match a.load(Ordering::Relaxed) {
        0 => None,
        b => Some(f64::from_bits(b)),
    }
}

/// Wraps the GCC estimator so its target and loss are readable outside the
/// interceptor chain.
struct ReportingEstimator<E: BandwidthEstimator> {
    inner: E,
    target: Arc<AtomicU64>,
    link: Arc<LinkStats>,
    /// Bytes the feedback acknowledged, by when the feedback came, over [`ACKED_WINDOW`].
    acked: AckedRate,
    /// When the estimate was last written to the debug log.
    logged: Option<Instant>,
    /// What the feedback that arrived covered.
    coverage: Arc<std::sync::Mutex<FeedbackCoverage>>,
    /// The queue on the path, and the ceiling it puts on the target.
    queue: QueueDelay,
    cap: DelayCap,
}

impl<E: BandwidthEstimator> ReportingEstimator<E> {
    fn new(inner: E, target: Arc<AtomicU64>, link: Arc<LinkStats>) -> Self {
        // What the last connection acknowledged proves nothing about this one.
        link.acked_bps.store(0, Ordering::Relaxed);
        link.gcc_bps.store(0, Ordering::Relaxed);
        link.probing.store(false, Ordering::Relaxed);
        ReportingEstimator {
            inner,
            target,
            link,
            acked: AckedRate::default(),
            logged: None,
            coverage: Arc::default(),
            queue: QueueDelay::default(),
            cap: DelayCap::default(),
        }
    }

    fn publish(&self) {
        self.target
            .store(self.target_bitrate().to_bits(), Ordering::Relaxed);
        self.link
            .gcc_bps
            .store(self.inner.target_bitrate().to_bits(), Ordering::Relaxed);
    }
}

/// Queueing delay on the path above which the sender is taken to overuse it (ms).
pub const QUEUE_OVERUSE_MS: f64 = 60.0;
/// Below this the path is clear, and a ceiling set by a queue is raised again (ms).
pub const QUEUE_CLEAR_MS: f64 = 20.0;
/// How far back the path's least one-way delay is looked for.
const QUEUE_BASE_WINDOW: Duration = Duration::from_secs(30);
/// The queue now is the least one-way delay over this long: on a jittery path (4G) every
/// feedback can have all its packets late, while over half a second some packet still
/// gets through at once; a standing queue delays them all (as LEDBAT's current delay).
const QUEUE_NOW_WINDOW: Duration = Duration::from_millis(500);
/// A ceiling is lowered at most this often, so each cut is seen before the next.
const QUEUE_CUT_EVERY: Duration = Duration::from_millis(500);
/// On a queue the ceiling goes to this share of the acknowledged rate (GCC's own back-off).
const QUEUE_BACKOFF: f64 = 0.85;
/// While the path is clear the ceiling rises this much per second.
const QUEUE_CEILING_GROWTH: f64 = 1.2;

/// The queue on the path: the least one-way delay (the far end's arrival clock less our
/// departure clock, whose offset is unknown but steady) over the last [`QUEUE_NOW_WINDOW`]
/// of feedback, above the least over [`QUEUE_BASE_WINDOW`]. The least of the packets: if
/// even that one waited, the queue is real, not jitter.
#[derive(Debug, Default)]
pub struct QueueDelay {
    epoch: Option<Instant>,
    /// Each feedback's least one-way delay (ms, plus the unknown offset), with when.
    least: VecDeque<(Instant, f64)>,
}

impl QueueDelay {
    /// Folds in one feedback's reports; returns the queue (ms), once known.
    pub fn add(&mut self, now: Instant, reports: &[PacketReport]) -> Option<f64> {
        let epoch = *self.epoch.get_or_insert(now);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let least = reports
            .iter()
            .filter(|r| r.arrived)
            .filter_map(|r| {
                let sent = match r.departure.checked_duration_since(epoch) {
                    Some(d) => ms(d),
                    None => -ms(epoch.duration_since(r.departure)),
                };
                Some(ms(r.arrival?) - sent)
            })
            .fold(f64::INFINITY, f64::min);
        if least.is_finite() {
            while self
                .least
                .front()
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) > QUEUE_BASE_WINDOW)
            {
                self.least.pop_front();
            }
            self.least.push_back((now, least));
        }
        let (last_at, _) = *self.least.back()?;
        let last = self
            .least
            .iter()
            .rev()
            .take_while(|(at, _)| last_at.saturating_duration_since(*at) <= QUEUE_NOW_WINDOW)
            .map(|(_, d)| *d)
            .fold(f64::INFINITY, f64::min);
        let base = self
            .least
            .iter()
            .map(|(_, d)| *d)
            .fold(f64::INFINITY, f64::min);
        Some(last - base)
    }
}

/// A ceiling on GCC's target from the queue on the path.
///
/// webrtc-rs 0.21's GCC compares each packet group's delay change with a threshold of
/// 12.5 ms; a sender overloading a link by half again grows the queue by less than that per
/// group, so its delay half never saw one (a unit model: it climbed from 0.9 to 3.9 Mbit/s
/// over a 500 kbit/s link while the queue grew to 17 s). Only loss held it, and only once
/// the link's buffer overflowed. This reads the queue itself ([`QueueDelay`]): over
/// [`QUEUE_OVERUSE_MS`] the ceiling goes to [`QUEUE_BACKOFF`] × what the far end
/// acknowledged receiving (what the link carries), at most every [`QUEUE_CUT_EVERY`]; under
/// [`QUEUE_CLEAR_MS`] it rises by [`QUEUE_CEILING_GROWTH`] a second — and, while the sender
/// probes, at once to what the probe proved ([`crate::publish::proven_bps`] of the
/// acknowledged rate) — and goes once GCC's own target is below it.
#[derive(Debug, Default)]
pub struct DelayCap {
    ceiling: Option<f64>,
    last_cut: Option<Instant>,
    last_update: Option<Instant>,
}

impl DelayCap {
    pub fn update(
        &mut self,
        now: Instant,
        queue_ms: Option<f64>,
        acked_bps: f64,
        target: f64,
        probing: bool,
    ) {
        let since = self
            .last_update
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.last_update = Some(now);
        let Some(queue) = queue_ms else {
            return;
        };
        if queue > QUEUE_OVERUSE_MS {
            if acked_bps > 0.0
                && self
                    .last_cut
                    .is_none_or(|t| now.saturating_duration_since(t) >= QUEUE_CUT_EVERY)
            {
                let cut = (QUEUE_BACKOFF * acked_bps).max(BWE_MIN_BPS);
                self.ceiling = Some(self.ceiling.map_or(cut, |c| c.min(cut)).min(target));
                self.last_cut = Some(now);
            }
        } else if queue < QUEUE_CLEAR_MS {
            if let Some(c) = self.ceiling {
                let mut grown = c * QUEUE_CEILING_GROWTH.powf(since.as_secs_f64().min(1.0));
                if probing {
                    grown = grown.max(crate::publish::proven_bps(acked_bps));
                }
                self.ceiling = (grown < target).then_some(grown);
            }
        }
    }

    /// GCC's `target` under the ceiling.
    pub fn apply(&self, target: f64) -> f64 {
        self.ceiling.map_or(target, |c| target.min(c))
    }
}

/// The window over which [`LinkStats::acked_bps`] is measured.
pub const ACKED_WINDOW: Duration = Duration::from_secs(1);

/// Bytes counted over a sliding span of time (the oldest dropped as time goes on).
#[derive(Debug)]
pub struct ByteWindow {
    span: Duration,
    seen: VecDeque<(Instant, u64)>,
    bytes: u64,
}

impl ByteWindow {
    pub fn new(span: Duration) -> Self {
        ByteWindow {
            span,
            seen: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Counts `bytes` at `now`, and drops what is older than the span.
    pub fn add(&mut self, now: Instant, bytes: u64) {
        self.seen.push_back((now, bytes));
        self.bytes += bytes;
        while let Some(&(at, b)) = self.seen.front() {
            if now.saturating_duration_since(at) < self.span {
                break;
            }
            self.seen.pop_front();
            self.bytes -= b;
        }
    }

    /// What the span holds, over the whole span (bps).
    pub fn bps(&self) -> f64 {
        (self.bytes * 8) as f64 / self.span.as_secs_f64()
    }

    /// For counts that each stand for what came since the one before (feedbacks): what
    /// came after the oldest count kept, over the time since it (bps); [`Self::bps`] until
    /// that is a quarter of the span.
    pub fn since_oldest_bps(&self, now: Instant) -> f64 {
        match self.seen.front() {
            Some(&(first, b)) if now.saturating_duration_since(first) >= self.span / 4 => {
                ((self.bytes - b) * 8) as f64 / now.saturating_duration_since(first).as_secs_f64()
            }
            _ => self.bps(),
        }
    }
}

/// The rate the far end acknowledged receiving: bytes of the packets feedback reported
/// arrived, by when the feedback came, over the last [`ACKED_WINDOW`].
#[derive(Debug)]
pub struct AckedRate(ByteWindow);

impl Default for AckedRate {
    fn default() -> Self {
        AckedRate(ByteWindow::new(ACKED_WINDOW))
    }
}

impl AckedRate {
    /// Folds in one feedback's reports; returns the rate (bps).
    pub fn add(&mut self, now: Instant, reports: &[PacketReport]) -> f64 {
        let bytes: u64 = reports
            .iter()
            .filter(|r| r.arrived)
            .map(|r| r.size as u64)
            .sum();
        self.0.add(now, bytes);
        // Each feedback acknowledges what arrived since the one before.
        self.0.since_oldest_bps(now)
    }
}

/// The transport-wide sequence numbers the far end's feedback covered lately.
///
/// Each TWCC feedback names a range, with the packets in it that arrived and the ones that
/// did not; str0m starts each range at the first packet it received after the last one
/// reported, so packets lost just before it fall between two feedbacks. Consecutive
/// feedbacks (their feedback counts follow on) cover that gap too: nothing else could have
/// reported it. Where a count is skipped, a feedback was lost, and its range and the gap
/// before the next stay uncovered.
#[derive(Debug, Default)]
pub struct FeedbackCoverage {
    /// (first sequence number, packet count), the newest last.
    ranges: VecDeque<(u16, u16)>,
    /// The last feedback's count, and the sequence number after its range.
    last: Option<(u8, u16)>,
}

impl FeedbackCoverage {
    /// Feedbacks remembered (about 25 s of them).
    const KEEP: usize = 256;

    /// A feedback (its feedback count, base sequence number and packet status count) came.
    pub fn add(&mut self, feedback: u8, base: u16, count: u16) {
        let end = base.wrapping_add(count);
        let first = match self.last {
            // The gap since the one before (a few hundred packets at most).
            Some((n, after))
                if feedback == n.wrapping_add(1) && base.wrapping_sub(after) < 1024 =>
            {
                after
            }
            _ => base,
        };
        self.last = Some((feedback, end));
        if self.ranges.len() == Self::KEEP {
            self.ranges.pop_front();
        }
        self.ranges.push_back((first, end.wrapping_sub(first)));
    }

    /// Whether a feedback that arrived covered packet `seq`.
    pub fn covers(&self, seq: u16) -> bool {
        self.ranges
            .iter()
            .rev()
            .any(|&(base, count)| seq.wrapping_sub(base) < count)
    }
}

/// The reports without the packets reported lost that no feedback covered.
///
/// webrtc-rs's send history reports every packet below the newest one acknowledged that no
/// feedback mentioned as lost. A TWCC feedback lost on the way back (the downlink loses too)
/// therefore reads as every packet it covered lost: on a link losing 5 % each way that
/// nearly doubled the loss GCC saw, and its loss half, which cuts above 10 % and climbs only
/// below 2 %, drifted down until pictures paused. A packet no arrived feedback covered
/// ([`FeedbackCoverage`], recorded wire-most by [`feedback_seen`]) is left out of the count:
/// neither lost nor received.
pub fn without_lost_feedback(
    reports: &[PacketReport],
    coverage: &FeedbackCoverage,
) -> Vec<PacketReport> {
    reports
        .iter()
        .filter(|r| r.arrived || !r.is_twcc || coverage.covers(r.twcc_sequence_number))
        .cloned()
        .collect()
}

impl<E: BandwidthEstimator> BandwidthEstimator for ReportingEstimator<E> {
    fn on_reports(&mut self, now: Instant, reports: &[PacketReport]) {
        let kept = {
            let coverage = self.coverage.lock().expect("lock poisoned");
            without_lost_feedback(reports, &coverage)
        };
        self.inner.on_reports(now, &kept);
        let lost = reports.iter().filter(|r| !r.arrived).count() as u64;
        self.link
            .reported
            .fetch_add(reports.len() as u64, Ordering::Relaxed);
        self.link.reported_lost.fetch_add(lost, Ordering::Relaxed);
        self.link
            .left_out
            .fetch_add((reports.len() - kept.len()) as u64, Ordering::Relaxed);
        let acked = self.acked.add(now, reports);
        let queue = self.queue.add(now, reports);
        let probing = self.link.probing.load(Ordering::Relaxed);
        self.cap
            .update(now, queue, acked, self.inner.target_bitrate(), probing);
        self.link
            .acked_bps
            .store(acked.max(1.0).to_bits(), Ordering::Relaxed);
        self.publish();
        let stats = self.inner.stats();
        self.link.record(&stats);
        if self
            .logged
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            self.logged = Some(now);
            tracing::debug!(
                target = self.target_bitrate() as u64,
                gcc = self.inner.target_bitrate() as u64,
                queue_ms = queue.map(|q| q.round()),
                delay = stats.delay_based_bitrate.map(|b| b as u64),
                loss = stats.loss_based_bitrate.map(|b| b as u64),
                loss_pct = stats.packet_loss.map(|l| (l * 1000.0).round() / 10.0),
                acked = acked as u64,
                "uplink estimate"
            );
        }
    }
    fn target_bitrate(&self) -> f64 {
        self.cap.apply(self.inner.target_bitrate())
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.inner.handle_timeout(now);
        self.publish();
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }
    fn stats(&self) -> EstimatorStats {
        self.inner.stats()
    }
}

/// An interceptor that passes what is written straight on and hands each packet read to
/// `on_read`, which may change it, or end it there (`None`).
struct ReadTap<F> {
    on_read: F,
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

impl<F: FnMut(TaggedPacket) -> Option<TaggedPacket>> ReadTap<F> {
    fn new(on_read: F) -> Self {
        ReadTap {
            on_read,
            read: VecDeque::new(),
            write: VecDeque::new(),
        }
    }
}

impl<F: FnMut(TaggedPacket) -> Option<TaggedPacket>> Protocol<TaggedPacket, TaggedPacket, ()>
    for ReadTap<F>
{
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = webrtc::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Some(msg) = (self.on_read)(msg) {
            self.read.push_back(msg);
        }
        Ok(())
    }
    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }
    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write.push_back(msg);
        Ok(())
    }
    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }
}

impl<F: FnMut(TaggedPacket) -> Option<TaggedPacket> + Send + Sync> Interceptor for ReadTap<F> {
    fn bind_local_stream(&mut self, _: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _: &StreamInfo) {}
}

/// Application-most: marks inbound PLI/FIR for delivery to the application (inbound RTCP
/// otherwise stops at the end of the chain) and lets everything else end there as usual.
fn keyframe_requests(mut msg: TaggedPacket) -> Option<TaggedPacket> {
    if let Packet::Rtcp(packets) = &msg.message.packet {
        let keep: Vec<Box<dyn rtc::rtcp::Packet>> = packets
            .iter()
            .filter(|p| {
                let a = p.as_any();
                a.is::<PictureLossIndication>() || a.is::<FullIntraRequest>()
            })
            .cloned()
            .collect();
        if keep.is_empty() {
            return None;
        }
        msg.message.packet = Packet::Rtcp(keep);
        msg.message.add(Attribute::DeliverToApplication);
    }
    Some(msg)
}

/// Wire-most: records which packets each inbound TWCC feedback covers
/// ([`FeedbackCoverage`]) before the congestion controller reads it, and passes it on.
fn feedback_seen(
    coverage: Arc<std::sync::Mutex<FeedbackCoverage>>,
) -> impl FnMut(TaggedPacket) -> Option<TaggedPacket> + Send + Sync {
    move |msg| {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            for p in packets {
                if let Some(fb) = p.as_any().downcast_ref::<TransportLayerCc>() {
                    coverage.lock().expect("lock poisoned").add(
                        fb.fb_pkt_count,
                        fb.base_sequence_number,
                        fb.packet_status_count,
                    );
                }
            }
        }
        Some(msg)
    }
}

/// Forwards the peer connection's callbacks into channels (callbacks run on the
/// connection's driver task and must not block).
struct Handler {
    gathering: watch::Sender<RTCIceGatheringState>,
    ice: watch::Sender<RTCIceConnectionState>,
    state: watch::Sender<RTCPeerConnectionState>,
    tracks: mpsc::UnboundedSender<Arc<dyn TrackRemote>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, s: RTCIceGatheringState) {
        self.gathering.send_replace(s);
    }
    async fn on_ice_connection_state_change(&self, s: RTCIceConnectionState) {
        self.ice.send_replace(s);
    }
    async fn on_connection_state_change(&self, s: RTCPeerConnectionState) {
        self.state.send_replace(s);
    }
    async fn on_track(&self, t: Arc<dyn TrackRemote>) {
        let _ = self.tracks.send(t);
    }
}

/// A built peer connection and what the room needs from it.
pub struct Peer {
    pub pc: Arc<dyn PeerConnection>,
    pub gathering: watch::Receiver<RTCIceGatheringState>,
    /// ICE alone (a path found), before DTLS.
    pub ice: watch::Receiver<RTCIceConnectionState>,
    pub state: watch::Receiver<RTCPeerConnectionState>,
    pub tracks: mpsc::UnboundedReceiver<Arc<dyn TrackRemote>>,
    /// GCC target bitrate as `f64::to_bits`.
    pub bwe_bps: Arc<AtomicU64>,
}

/// Where the peer connection binds its sockets.
#[derive(Debug, Clone)]
pub struct Transports {
    pub udp: bool,
    pub tcp: bool,
    /// Local IP to bind (e.g. 127.0.0.1 for loopback tests, 0.0.0.0 otherwise).
    pub bind_ip: std::net::IpAddr,
}

/// Builds a peer connection whose congestion controller writes its estimate into `bwe_bps`
/// and the loss it sees into `link` (both kept by the room across reconnects).
pub async fn build(
    transports: &Transports,
    bwe_bps: Arc<AtomicU64>,
    link: Arc<LinkStats>,
) -> Result<Peer, ClientError> {
    let mut me = MediaEngine::default();
    me.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: h264_codec(),
            payload_type: 102,
        },
        RtpCodecKind::Video,
    )
    .map_err(ClientError::webrtc)?;
    // RTX (RFC 4588) for H.264: without it the server cannot answer our NACKs (str0m only
    // retransmits on a negotiated RTX stream).
    me.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: MIME_TYPE_RTX.to_owned(),
                clock_rate: 90_000,
                channels: 0,
                sdp_fmtp_line: "apt=102".to_owned(),
                rtcp_feedback: vec![],
            },
            payload_type: 103,
        },
        RtpCodecKind::Video,
    )
    .map_err(ClientError::webrtc)?;
    me.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: opus_codec(),
            payload_type: 111,
        },
        RtpCodecKind::Audio,
    )
    .map_err(ClientError::webrtc)?;
    me.register_feedback(
        RTCPFeedback {
            typ: "ccm".into(),
            parameter: "fir".into(),
        },
        RtpCodecKind::Video,
    );
    let estimator = ReportingEstimator::new(
        // A reconnect starts from the estimate the last connection had reached.
        Gcc::new(
            f64::from_bits(bwe_bps.load(Ordering::Relaxed)).clamp(BWE_MIN_BPS, BWE_MAX_BPS),
            BWE_MIN_BPS,
            BWE_MAX_BPS,
        ),
        bwe_bps.clone(),
        link,
    );
    // What libwebrtc's congestion control needs from the far end (TWCC feedback and its
    // header extension), the controller, and our own pacer in place of webrtc-rs's.
    for kind in [RtpCodecKind::Video, RtpCodecKind::Audio] {
        me.register_feedback(
            RTCPFeedback {
                typ: "transport-cc".into(),
                parameter: String::new(),
            },
            kind,
        );
        me.register_header_extension(
            RTCRtpHeaderExtensionCapability {
                uri: rtc::sdp::extmap::TRANSPORT_CC_URI.to_owned(),
            },
            kind,
            None,
        )
        .map_err(ClientError::webrtc)?;
    }
    let feedback_seen = ReadTap::new(feedback_seen(estimator.coverage.clone()));
    let registry = Registry::new()
        .with(Slot::from(500), feedback_seen)
        .with(
            Slot::CongestionControl,
            CongestionControlBuilder::new(estimator).build(),
        )
        .with(Slot::Pacer, AudioFirstPacer::default())
        .with(Slot::TwccSender, TwccSenderBuilder::new().build());
    // (The TWCC receiver, for the server's feedback needs, comes with the defaults below.)
    let registry = register_default_interceptors(registry, &mut me).map_err(ClientError::webrtc)?;
    let registry = registry.with(Slot::from(14_000), ReadTap::new(keyframe_requests));

    // webrtc-rs counts only STUN towards ICE liveness (media does not count), so with the
    // default 2 s consent checks an overloaded uplink that drops two or three of them in a
    // row reads as a lost connection. Checks every 0.5 s (~2 kbit/s) keep "disconnected"
    // (5 s of silence) for a path that is really gone, and keep the round trip fresh.
    let se = SettingEngineBuilder::new()
        .with_multicast_dns_mode(MulticastDnsMode::Disabled)
        .with_ice_timeouts(
            Some(ICE_DISCONNECTED),
            Some(Duration::from_secs(25)),
            Some(ICE_CONSENT_EVERY),
        )
        .build();
    let (gather_tx, gathering) = watch::channel(RTCIceGatheringState::New);
    let (ice_tx, ice) = watch::channel(RTCIceConnectionState::New);
    let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
    let (tracks_tx, tracks) = mpsc::unbounded_channel();
    let handler = Arc::new(Handler {
        gathering: gather_tx,
        ice: ice_tx,
        state: state_tx,
        tracks: tracks_tx,
    });
    let bind = format!("{}:0", transports.bind_ip);
    let udp: Vec<String> = if transports.udp {
        vec![bind.clone()]
    } else {
        Vec::new()
    };
    let tcp: Vec<String> = if transports.tcp {
        vec![bind]
    } else {
        Vec::new()
    };
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(me)
        .with_interceptor_registry(registry)
        .with_setting_engine(se)
        .with_handler(handler)
        .with_udp_addrs(udp)
        .with_tcp_addrs(tcp)
        .build()
        .await
        .map_err(ClientError::webrtc)?;
    Ok(Peer {
        pc: Arc::new(pc),
        gathering,
        ice,
        state,
        tracks,
        bwe_bps,
    })
}

/// A local track we write encoded samples into.
pub fn sample_track(
    kind: RtpCodecKind,
    id: &str,
    stream: &str,
) -> Result<Arc<TrackLocalStaticSample>, ClientError> {
    let codec = match kind {
        RtpCodecKind::Video => h264_codec(),
        _ => opus_codec(),
    };
    let track = MediaStreamTrack::new(
        stream.to_owned(),
        id.to_owned(),
        id.to_owned(),
        kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(rand::random()),
                ..Default::default()
            },
            codec,
            ..Default::default()
        }],
    );
    Ok(Arc::new(
        TrackLocalStaticSample::new(Instant::now(), track).map_err(ClientError::webrtc)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtcp::transport_feedbacks::cc_feedback_report::Ecn;

    /// Feeds `estimator` 40 s of a 200 kbit/s stream of 80 packets a second, reported a
    /// dozen at a time every 150 ms over a path with a constant delay. `lost(id)` drops a
    /// packet; `feedback_lost(n)` drops the n-th feedback, whose packets then come in the
    /// next one as lost, as webrtc-rs's send history reports them. Returns the lowest target
    /// after the first 5 s.
    fn lowest_target(
        estimator: &mut dyn BandwidthEstimator,
        coverage: &std::sync::Mutex<FeedbackCoverage>,
        lost: impl Fn(u64) -> bool,
        feedback_lost: impl Fn(u64) -> bool,
    ) -> f64 {
        let t0 = Instant::now();
        let mut lowest = f64::MAX;
        let mut id = 0u64;
        let mut pending: Vec<PacketReport> = Vec::new();
        for step in 0..(40_000 / 150) {
            let now = t0 + Duration::from_millis(150 * step);
            for k in 0..12u64 {
                id += 1;
                let sent = now - Duration::from_millis(150 - 12 * k);
                pending.push(PacketReport {
                    ssrc: 1,
                    id,
                    rtp_sequence_number: id as u16,
                    is_twcc: true,
                    twcc_sequence_number: id as u16,
                    size: 312,
                    arrived: !lost(id),
                    departure: sent,
                    arrival: (!lost(id))
                        .then(|| sent.duration_since(t0) + Duration::from_millis(40)),
                    ecn: Ecn::NotEct,
                });
            }
            if feedback_lost(step) {
                // Never acknowledged: reported with the next feedback as lost.
                for p in &mut pending {
                    p.arrived = false;
                    p.arrival = None;
                }
                continue;
            }
            // This feedback covers the packets sent since the one before.
            coverage
                .lock()
                .unwrap()
                .add(step as u8, (id - 11) as u16, 12);
            estimator.on_reports(now, &std::mem::take(&mut pending));
            if step * 150 > 5_000 {
                lowest = lowest.min(estimator.target_bitrate());
            }
        }
        lowest
    }

    fn ours(start: f64) -> ReportingEstimator<Gcc> {
        ReportingEstimator::new(
            Gcc::new(start, BWE_MIN_BPS, BWE_MAX_BPS),
            Arc::new(AtomicU64::new(0)),
            Arc::new(LinkStats::default()),
        )
    }

    /// A sender at 960 kbit/s into a 500 kbit/s link (40 ms each way, packets every 10 ms,
    /// feedback every 100 ms for what has arrived): the target after each second, and the
    /// queue then (ms).
    fn into_a_queue(estimator: &mut dyn BandwidthEstimator) -> Vec<(f64, f64)> {
        let t0 = Instant::now();
        let mut id = 0u64;
        let mut link_free = Duration::ZERO;
        let mut pending = Vec::new();
        let mut out = Vec::new();
        for ms in 0..10_000u64 {
            let now = t0 + Duration::from_millis(ms);
            if ms % 10 == 0 {
                id += 1;
                let start = link_free.max(Duration::from_millis(ms));
                link_free = start + Duration::from_micros(1200 * 8 * 2);
                pending.push(PacketReport {
                    ssrc: 1,
                    id,
                    rtp_sequence_number: id as u16,
                    is_twcc: true,
                    twcc_sequence_number: id as u16,
                    size: 1200,
                    arrived: true,
                    departure: now,
                    arrival: Some(link_free + Duration::from_millis(40)),
                    ecn: Ecn::NotEct,
                });
            }
            if ms % 100 == 0 {
                let (done, rest): (Vec<PacketReport>, Vec<PacketReport>) =
                    pending.into_iter().partition(|p| {
                        p.arrival.unwrap() + Duration::from_millis(40) <= Duration::from_millis(ms)
                    });
                pending = rest;
                if !done.is_empty() {
                    estimator.on_reports(now, &done);
                }
            }
            if ms % 1000 == 999 {
                let queue = link_free.saturating_sub(Duration::from_millis(ms));
                out.push((estimator.target_bitrate(), queue.as_secs_f64() * 1000.0));
            }
        }
        out
    }

    /// GCC alone never sees the queue; with the ceiling the target comes down to about what
    /// the link carries within a second or two, and the queue stops growing.
    #[test]
    fn a_growing_queue_brings_the_target_down_to_the_link() {
        let alone = into_a_queue(&mut Gcc::new(900_000.0, BWE_MIN_BPS, BWE_MAX_BPS));
        assert!(alone.iter().all(|(t, _)| *t >= 900_000.0), "{alone:?}");
        assert!(alone.last().unwrap().1 > 4_000.0, "{alone:?}");
        let ours = into_a_queue(&mut ours(900_000.0));
        for (t, _) in &ours[2..] {
            assert!(*t < 500_000.0, "{ours:?}");
        }
        // (The model's sender does not follow the target: the queue still grows, and the
        // ceiling stays at the link's rate less the back-off.)
        assert!(ours[9].0 >= 0.8 * 425_000.0, "{ours:?}");
    }

    /// Feedback every 100 ms on packets every 10 ms, each `extra(i)` ms later than the
    /// path's 40 ms: the queue read after each feedback.
    fn queue_of(extra: impl Fn(u64) -> f64) -> Vec<f64> {
        let t0 = Instant::now();
        let mut q = QueueDelay::default();
        (0..100u64)
            .filter_map(|f| {
                let reports: Vec<PacketReport> = (f * 10..f * 10 + 10)
                    .map(|i| PacketReport {
                        ssrc: 1,
                        id: i,
                        rtp_sequence_number: i as u16,
                        is_twcc: true,
                        twcc_sequence_number: i as u16,
                        size: 1200,
                        arrived: true,
                        departure: t0 + Duration::from_millis(i * 10),
                        arrival: Some(Duration::from_secs_f64(
                            (i as f64 * 10.0 + 40.0 + extra(i)) / 1000.0,
                        )),
                        ecn: Ecn::NotEct,
                    })
                    .collect();
                q.add(t0 + Duration::from_millis(f * 100 + 100), &reports)
            })
            .collect()
    }

    /// On a 4G-like path, whole feedbacks come 60-120 ms late now and then, but within half
    /// a second some packet gets through at once: no queue. A standing queue delays every
    /// packet, and is read as one.
    #[test]
    fn jitter_is_not_a_queue_but_a_standing_delay_is() {
        // Every other feedback's ten packets all 60-120 ms late.
        let jittery = queue_of(|i| {
            if (i / 10) % 2 == 1 {
                60.0 + (i % 7) as f64 * 10.0
            } else {
                (i % 3) as f64 * 5.0
            }
        });
        assert!(jittery.iter().all(|&q| q < QUEUE_CLEAR_MS), "{jittery:?}");
        // From the fifth second, a queue of 100 ms on every packet.
        let standing = queue_of(|i| if i >= 500 { 100.0 } else { 0.0 });
        assert!(standing[..50].iter().all(|&q| q == 0.0), "{standing:?}");
        assert!(
            standing[55..].iter().all(|&q| (q - 100.0).abs() < 0.01),
            "{standing:?}"
        );
    }

    #[test]
    fn a_queue_lowers_the_ceiling_and_a_clear_probe_lifts_it() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut cap = DelayCap::default();
        let gcc = 1_000_000.0;
        cap.update(at(0), Some(5.0), 250_000.0, gcc, false);
        assert_eq!(cap.apply(gcc), gcc, "no queue, no ceiling");
        cap.update(at(100), Some(90.0), 250_000.0, gcc, false);
        assert_eq!(cap.apply(gcc), 212_500.0);
        // Cut again only after half a second, never up.
        cap.update(at(200), Some(90.0), 200_000.0, gcc, false);
        assert_eq!(cap.apply(gcc), 212_500.0);
        cap.update(at(450), Some(90.0), 200_000.0, gcc, false);
        assert_eq!(cap.apply(gcc), 212_500.0);
        cap.update(at(650), Some(90.0), 200_000.0, gcc, false);
        assert_eq!(cap.apply(gcc), 170_000.0);
        // Between the two marks: held. Clear: a fifth more a second.
        cap.update(at(1450), Some(40.0), 200_000.0, gcc, false);
        assert_eq!(cap.apply(gcc), 170_000.0);
        cap.update(at(2450), Some(5.0), 200_000.0, gcc, false);
        assert!(
            (cap.apply(gcc) - 204_000.0).abs() < 1.0,
            "{}",
            cap.apply(gcc)
        );
        // A probe that got 300 kbit/s through without a queue proves 460.
        cap.update(at(2550), Some(5.0), 300_000.0, gcc, true);
        assert!(
            (cap.apply(gcc) - 460_000.0).abs() < 1.0,
            "{}",
            cap.apply(gcc)
        );
        // Once GCC's own target is under it, the ceiling goes.
        cap.update(at(2650), Some(5.0), 300_000.0, 400_000.0, false);
        assert_eq!(cap.apply(1e9), 1e9);
    }

    /// What the feedback acknowledged: the stream's rate, less what was lost.
    #[test]
    fn the_acknowledged_rate_is_what_arrived() {
        let mut est = ours(300_000.0);
        let coverage = est.coverage.clone();
        lowest_target(&mut est, &coverage, |_| false, |_| false);
        let all = est.link.acked_bps().unwrap();
        assert!((all - 199_680.0).abs() < 4_000.0, "{all}");
        let mut est = ours(300_000.0);
        let coverage = est.coverage.clone();
        lowest_target(&mut est, &coverage, |id| id % 4 == 0, |_| false);
        let three_quarters = est.link.acked_bps().unwrap();
        assert!(
            (three_quarters - 149_760.0).abs() < 4_000.0,
            "{three_quarters}"
        );
        assert_eq!(ours(1.0).link.acked_bps(), None);
    }

    /// 5 % of packets, at (pseudo-)random.
    fn five_percent(id: u64) -> bool {
        (id.wrapping_mul(2_654_435_761) >> 7) % 100 < 5
    }

    #[test]
    fn a_lost_feedback_is_not_taken_for_lost_packets_but_real_loss_still_cuts() {
        let start = 300_000.0;
        // Every 20th feedback lost (5 % of them, as on the 256 kbit/s test link), on top of
        // 5 % of the packets.
        let every_20th = |n: u64| n % 20 == 7;
        let raw = lowest_target(
            &mut Gcc::new(start, BWE_MIN_BPS, BWE_MAX_BPS),
            &Default::default(),
            five_percent,
            every_20th,
        );
        let mut est = ours(start);
        let coverage = est.coverage.clone();
        let kept = lowest_target(&mut est, &coverage, five_percent, every_20th);
        assert!(raw < start * 0.5, "GCC alone: {raw}");
        assert!(
            kept >= start * 0.9,
            "without lost feedback: {kept} (GCC alone {raw})"
        );
        // Loss of 20 % of the packets is cut either way.
        let mut est = ours(start);
        let coverage = est.coverage.clone();
        let heavy = lowest_target(&mut est, &coverage, |id| id % 5 == 0, |_| false);
        assert!(heavy < start * 0.5, "20 % loss: {heavy}");
    }

    #[test]
    fn only_packets_reported_lost_that_no_feedback_covered_are_left_out() {
        let t = Instant::now();
        let r = |seq: u16, arrived: bool| PacketReport {
            ssrc: 1,
            id: u64::from(seq),
            rtp_sequence_number: seq,
            is_twcc: true,
            twcc_sequence_number: seq,
            size: 100,
            arrived,
            departure: t,
            arrival: arrived.then_some(Duration::ZERO),
            ecn: Ecn::NotEct,
        };
        let mut coverage = FeedbackCoverage::default();
        // Feedbacks 7 (65530..=65535) and 9 (3..=6) came, across the wrap; feedback 8, for
        // 0..=2, was lost. Feedback 10 starts at 9: 7 and 8 were lost before it arrived.
        coverage.add(7, 65_530, 6);
        coverage.add(9, 3, 4);
        coverage.add(10, 9, 2);
        let reports: Vec<PacketReport> = [
            (65_533, false),
            (65_534, true),
            (0, false),
            (1, false),
            (2, false),
            (3, true),
            (4, false),
            (5, true),
            (7, false),
            (8, false),
            (9, true),
            (11, false),
        ]
        .into_iter()
        .map(|(seq, arrived)| r(seq, arrived))
        .collect();
        let kept: Vec<u16> = without_lost_feedback(&reports, &coverage)
            .iter()
            .map(|x| x.twcc_sequence_number)
            .collect();
        // Real losses stay (65533, 4, 7, 8); the lost feedback's packets and one not yet
        // covered go.
        assert_eq!(kept, vec![65_533, 65_534, 3, 4, 5, 7, 8, 9]);
        assert!(!FeedbackCoverage::default().covers(0));
    }
}
