//! The WebRTC peer connection (webrtc-rs 0.21): codecs, interceptors, local tracks.
//!
//! Interceptor chain: NACK generator/responder, RTCP sender/receiver reports, TWCC with the
//! GCC send-side estimator (its target bitrate is published to the encoder through an
//! atomic), our audio-first pacer ([`crate::pacing`]) in place of webrtc-rs's, and,
//! application-most, [`KeyframeRequests`], which hands inbound PLI/FIR to the
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
    /// Of those reported lost, the ones in runs taken as lost feedback and left out of the
    /// estimate ([`without_lost_feedback`]).
    pub left_out: AtomicU64,
}

impl LinkStats {
    /// Percent.
    pub fn loss_pct(&self) -> Option<f64> {
        match self.loss_ppm.load(Ordering::Relaxed) {
            0 => None,
            p => Some((p - 1) as f64 / 10_000.0),
        }
    }

    fn record(&self, stats: &EstimatorStats) {
        if let Some(loss) = stats.packet_loss {
            let ppm = (loss.clamp(0.0, 1.0) * 1e6) as u64;
            self.loss_ppm.store(ppm + 1, Ordering::Relaxed);
        }
    }
}

/// Wraps the GCC estimator so its target and loss are readable outside the
/// interceptor chain.
struct ReportingEstimator<E: BandwidthEstimator> {
    inner: E,
    target: Arc<AtomicU64>,
    link: Arc<LinkStats>,
}

impl<E: BandwidthEstimator> ReportingEstimator<E> {
    fn publish(&self) {
        self.target
            .store(self.inner.target_bitrate().to_bits(), Ordering::Relaxed);
    }
}

/// Of a run of packets reported lost, this many in a row or more are taken as a lost
/// feedback rather than lost packets (see [`without_lost_feedback`]).
pub const LOST_FEEDBACK_RUN: usize = 5;

/// The reports without the runs of [`LOST_FEEDBACK_RUN`] or more consecutive packets
/// reported lost.
///
/// webrtc-rs's send history reports every packet below the newest one acknowledged that no
/// feedback mentioned as lost. A TWCC feedback lost on the way back (the downlink loses too)
/// therefore reads as every packet it covered lost: a burst that pushes GCC's smoothed loss
/// over its 10 % threshold and cuts the target, again and again on a link losing 5 % each
/// way, until pictures pause. Independent loss of a few per cent practically never takes
/// five packets in a row; such a run is left out of the count (neither lost nor received).
/// Loss that really comes in runs — a queue overflowing — also builds delay, which GCC's
/// delay half sees.
pub fn without_lost_feedback(reports: &[PacketReport]) -> Vec<PacketReport> {
    let mut keep = Vec::with_capacity(reports.len());
    let mut run: Vec<PacketReport> = Vec::new();
    for r in reports {
        if r.arrived {
            if run.len() < LOST_FEEDBACK_RUN {
                keep.append(&mut run);
            }
            run.clear();
            keep.push(r.clone());
        } else {
            run.push(r.clone());
        }
    }
    if run.len() < LOST_FEEDBACK_RUN {
        keep.append(&mut run);
    }
    keep
}

impl<E: BandwidthEstimator> BandwidthEstimator for ReportingEstimator<E> {
    fn on_reports(&mut self, now: Instant, reports: &[PacketReport]) {
        let kept = without_lost_feedback(reports);
        self.inner.on_reports(now, &kept);
        let lost = reports.iter().filter(|r| !r.arrived).count() as u64;
        self.link
            .reported
            .fetch_add(reports.len() as u64, Ordering::Relaxed);
        self.link.reported_lost.fetch_add(lost, Ordering::Relaxed);
        self.link
            .left_out
            .fetch_add((reports.len() - kept.len()) as u64, Ordering::Relaxed);
        self.publish();
        self.link.record(&self.inner.stats());
    }
    fn target_bitrate(&self) -> f64 {
        self.inner.target_bitrate()
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

/// Marks inbound PLI/FIR for delivery to the application (inbound RTCP otherwise stops at
/// the end of the chain) and lets everything else end there as usual.
#[derive(Default)]
struct KeyframeRequests {
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequests {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = webrtc::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
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
                return Ok(());
            }
            msg.message.packet = Packet::Rtcp(keep);
            msg.message.add(Attribute::DeliverToApplication);
        }
        self.read.push_back(msg);
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

impl Interceptor for KeyframeRequests {
    fn bind_local_stream(&mut self, _: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _: &StreamInfo) {}
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
    let estimator = ReportingEstimator {
        // A reconnect starts from the estimate the last connection had reached.
        inner: Gcc::new(
            f64::from_bits(bwe_bps.load(Ordering::Relaxed)).clamp(BWE_MIN_BPS, BWE_MAX_BPS),
            BWE_MIN_BPS,
            BWE_MAX_BPS,
        ),
        target: bwe_bps.clone(),
        link,
    };
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
    let registry = Registry::new()
        .with(
            Slot::CongestionControl,
            CongestionControlBuilder::new(estimator).build(),
        )
        .with(Slot::Pacer, AudioFirstPacer::default())
        .with(Slot::TwccSender, TwccSenderBuilder::new().build());
    // (The TWCC receiver, for the server's feedback needs, comes with the defaults below.)
    let registry = register_default_interceptors(registry, &mut me).map_err(ClientError::webrtc)?;
    let registry = registry.with(Slot::from(14_000), KeyframeRequests::default());

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
            estimator.on_reports(now, &std::mem::take(&mut pending));
            if step * 150 > 5_000 {
                lowest = lowest.min(estimator.target_bitrate());
            }
        }
        lowest
    }

    fn ours(start: f64) -> ReportingEstimator<Gcc> {
        ReportingEstimator {
            inner: Gcc::new(start, BWE_MIN_BPS, BWE_MAX_BPS),
            target: Arc::new(AtomicU64::new(0)),
            link: Arc::new(LinkStats::default()),
        }
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
            five_percent,
            every_20th,
        );
        let kept = lowest_target(&mut ours(start), five_percent, every_20th);
        assert!(raw < start * 0.5, "GCC alone: {raw}");
        assert!(
            kept >= start * 0.9,
            "without lost feedback: {kept} (GCC alone {raw})"
        );
        // Loss of 20 % of the packets is cut either way.
        let heavy = lowest_target(&mut ours(start), |id| id % 5 == 0, |_| false);
        assert!(heavy < start * 0.5, "20 % loss: {heavy}");
    }

    #[test]
    fn only_runs_of_five_or_more_lost_are_left_out() {
        let t = Instant::now();
        let r = |id: u64, arrived: bool| PacketReport {
            ssrc: 1,
            id,
            rtp_sequence_number: id as u16,
            is_twcc: true,
            twcc_sequence_number: id as u16,
            size: 100,
            arrived,
            departure: t,
            arrival: arrived.then_some(Duration::ZERO),
            ecn: Ecn::NotEct,
        };
        let pattern = [
            true, false, false, false, false, true, false, false, false, false, false, true, false,
        ];
        let reports: Vec<PacketReport> = pattern
            .iter()
            .enumerate()
            .map(|(i, a)| r(i as u64, *a))
            .collect();
        let kept: Vec<u64> = without_lost_feedback(&reports)
            .iter()
            .map(|x| x.id)
            .collect();
        // The run of four stays; the run of five goes; a trailing single loss stays.
        assert_eq!(kept, vec![0, 1, 2, 3, 4, 5, 11, 12]);
    }
}
