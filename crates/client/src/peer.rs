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

impl<E: BandwidthEstimator> BandwidthEstimator for ReportingEstimator<E> {
    fn on_reports(&mut self, now: Instant, reports: &[PacketReport]) {
        self.inner.on_reports(now, reports);
        let lost = reports.iter().filter(|r| !r.arrived).count() as u64;
        self.link
            .reported
            .fetch_add(reports.len() as u64, Ordering::Relaxed);
        self.link.reported_lost.fetch_add(lost, Ordering::Relaxed);
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
