//! [`Room`]: join, stay, leave.
//!
//! Joining is: signalling `join` → `welcome` (how many receive slots to offer) → build the
//! peer connection with one send-only video and audio track and the receive-only slots →
//! `offer` → `answer` → media. After that a room task turns server messages into
//! [`RoomEvent`]s and keeps the slot map the receive tasks read.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diemcau_media::audio_device::{Microphone, Speaker};
use diemcau_media::camera::Camera;
use diemcau_media::playout::Mixer;
use diemcau_media::processing::{AudioProcessor, Stages};
use diemcau_media::source::AudioFailover;
use diemcau_media::synthetic::{percentile, SyntheticCamera, SyntheticTone};
use diemcau_media::{AudioSource, VideoSource};
use diemcau_protocol::{
    ChairCommand, ClientMessage, ErrorCode, FloorMode, FloorState, Hand, Role, ServerMessage,
    SiteId, PROTOCOL_VERSION,
};
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use tokio::sync::{mpsc, watch, Mutex as AsyncMutex, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::peer_connection::{
    PeerConnection, RTCIceCandidateInit, RTCIceConnectionState, RTCIceGatheringState,
    RTCPeerConnectionState, RTCSessionDescription, RTCStatsReportEntry, StatsSelector,
};

use crate::control::{self, ChairResult, Requests};
use crate::peer::{self, Transports};
use crate::publish::{self, CaptureControl, Encoded, SendCounters};
use crate::quality::{self, Grade, Quality, SiteSample, QUALITY_EVERY};
use crate::receive::{self, Remote};
use crate::report::{Latency, Playout, Received, Report, Sent};
use crate::signal;
use crate::{ClientError, RoomEvent};

/// Where the site's picture comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VideoInput {
    None,
    /// The labelled, stamped test pattern.
    Synthetic {
        width: usize,
        height: usize,
        fps: u32,
    },
    /// A camera by index, in the mode closest to this size and rate. If it cannot be
    /// opened the site says so and sends the labelled test pattern instead.
    Camera {
        index: u32,
        width: usize,
        height: usize,
        fps: u32,
    },
}

/// Where the site's sound comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AudioInput {
    None,
    /// The stepped test tone.
    Synthetic,
    /// A microphone by cpal device id (`None` = the system default).
    Mic(Option<String>),
}

/// Where remote sites' sound is played.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpeakerOutput {
    /// Play nothing (headless sites, tests).
    None,
    /// The system's default output.
    Default,
    /// A playback device by cpal device id.
    Device(String),
    /// No device: the others' sound is played out at a speaker's pace (a 20 ms frame every
    /// 20 ms) into nothing, so the jitter buffers run as with a speaker and the report says
    /// what they did (tests and measurements on machines without sound).
    Null,
}

/// How to join.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    pub site: SiteId,
    pub room: String,
    pub token: Option<String>,
    /// Enrollment secret (from the installer): traded for a token when there is none.
    pub secret: Option<String>,
    pub video: VideoInput,
    pub audio: AudioInput,
    /// Upper bound for the video encoders (all layers); the congestion controller sets it
    /// lower.
    pub max_video_bitrate_bps: u32,
    /// At most this many picture layers (simulcast; 1 sends one stream whose size follows
    /// the uplink). A camera is sent in fewer when it is small: none below 320x180.
    pub video_layers: usize,
    /// Offer UDP and/or TCP candidates.
    pub udp: bool,
    pub tcp: bool,
    /// Where remote audio is played.
    pub speaker: SpeakerOutput,
    /// Emit decoded pictures as [`RoomEvent::VideoFrame`] (for a UI).
    pub deliver_video: bool,
    /// Measure PSNR of every n-th verified picture (0 = never).
    pub psnr_every: u64,
    /// Receive the others' pictures. False (an audio-only site, for a link too thin for
    /// video) offers no video receive slots, so the server sends it none.
    pub receive_video: bool,
}

impl JoinOptions {
    /// 640x360 at 15 fps test pattern and test tone, UDP and TCP.
    pub fn synthetic(site: &str, room: &str) -> Self {
        JoinOptions {
            site: site.into(),
            room: room.into(),
            token: None,
            secret: None,
            video: VideoInput::Synthetic {
                width: 640,
                height: 360,
                fps: 15,
            },
            audio: AudioInput::Synthetic,
            max_video_bitrate_bps: 1_500_000,
            video_layers: publish::MAX_LAYERS,
            udp: true,
            tcp: true,
            speaker: SpeakerOutput::None,
            deliver_video: false,
            psnr_every: 10,
            receive_video: true,
        }
    }
}

/// A joined room. Call [`Room::leave`] to hang up and get the report.
///
/// The room outlives its connections: when the signalling or the media path is lost (the
/// network drops, the server restarts) it joins again by itself with `resume`, keeping the
/// devices, encoders, counters and the meeting view, and says so with
/// [`RoomEvent::Reconnecting`] and [`RoomEvent::Reconnected`]. The server keeps the site's
/// hand and floor for it.
pub struct Room {
    shared: Arc<Shared>,
    supervisor: Option<JoinHandle<Option<Session>>>,
    stop: Arc<Notify>,
    threads: Vec<std::thread::JoinHandle<()>>,
    _tasks: Tasks,
    _speaker: Arc<Mutex<Option<Speaker>>>,
}

/// What stays the same across reconnects.
struct Shared {
    url: String,
    options: JoinOptions,
    /// False once UDP was found blocked: later connections offer TCP only.
    udp: AtomicBool,
    events: mpsc::UnboundedSender<RoomEvent>,
    remote: Arc<Remote>,
    counters: Arc<SendCounters>,
    capture_control: Arc<CaptureControl>,
    bwe_bps: Arc<AtomicU64>,
    /// Loss the congestion controller sees on the uplink.
    link: Arc<peer::LinkStats>,
    /// The person wants the others' pictures (false: sound only, see
    /// [`Room::set_receive_video`]); told to every new connection.
    receive_video: AtomicBool,
    /// The others' pictures are off because this site's downlink loses too much
    /// ([`quality::DownlinkGate`]); the person's own choice is `receive_video`.
    down_sound_only: AtomicBool,
    /// Times that happened.
    down_pauses: AtomicU64,
    /// The round trip last measured (µs, 0 before the first).
    last_rtt_us: AtomicU64,
    /// Encoded pictures and sound from the capture threads, read by the current connection.
    video_in: Option<Arc<AsyncMutex<mpsc::Receiver<Encoded>>>>,
    /// Picture tracks offered: one per layer the camera as asked for is sent in.
    video_tracks: usize,
    audio_in: Option<Arc<AsyncMutex<mpsc::Receiver<Encoded>>>>,
    /// Sites seen in the room, with their place in the tree (ancestors, root first).
    sites_seen: Mutex<BTreeMap<SiteId, Vec<SiteId>>>,
    errors: Mutex<Vec<String>>,
    meeting: Mutex<MeetingView>,
    /// Our hand when the last connection was lost (when it went up, by the server's clock):
    /// raised again at that time if the server we come back to lost it (it restarted).
    hand_before_loss: Mutex<Option<u64>>,
    /// The chair's floor when the last connection was lost: given again if the server we
    /// come back to has forgotten it (it restarted).
    floor_before_loss: Mutex<Option<FloorState>>,
    /// Our role, as the last `welcome` gave it.
    role: Mutex<Option<Role>>,
    /// Chair commands the person gave ([`Room::chair`]): a floor being given back after a
    /// restart stops at the first one (the chair has moved on).
    chair_commands: AtomicU64,
    requests: Arc<Requests>,
    started: Instant,
    /// Set when the site leaves: from then on nothing is lost and nothing reconnects.
    closed: AtomicBool,
    /// The current connection (none while reconnecting).
    current: Mutex<Option<Current>>,
    /// A connection tells the supervisor it is lost: (its id, why).
    lost: mpsc::UnboundedSender<(u64, String)>,
    next_session: AtomicU64,
    reconnects: AtomicU64,
}

#[derive(Clone)]
struct Current {
    id: u64,
    outbox: mpsc::UnboundedSender<ClientMessage>,
    pc: Arc<dyn PeerConnection>,
}

/// Tasks aborted when the owner is dropped.
#[derive(Default)]
struct Tasks(Vec<JoinHandle<()>>);

impl Tasks {
    fn push(&mut self, t: JoinHandle<()>) {
        self.0.push(t);
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// One connection to the server: signalling, peer connection and the tasks serving them.
struct Session {
    id: u64,
    pc: Arc<dyn PeerConnection>,
    outbox: mpsc::UnboundedSender<ClientMessage>,
    flushed: Option<tokio::sync::oneshot::Receiver<()>>,
    ice: watch::Receiver<RTCIceConnectionState>,
    state: watch::Receiver<RTCPeerConnectionState>,
    _tasks: Tasks,
}

impl Session {
    /// Waits for the media path. Returns whether ICE found one within `ice_limit`: if not,
    /// the transport is blocked. Once it has, DTLS is waited for until [`MEDIA_LIMIT`] (on a
    /// lossy, slow link its retransmissions take seconds), but a slow handshake is not a
    /// blocked transport: the path is kept either way, and if DTLS never completes the
    /// server's media timeout sends the site round again over the same transport.
    async fn wait_media(&self, ice_limit: Duration) -> bool {
        let (mut ice, mut state) = (self.ice.clone(), self.state.clone());
        let found = tokio::time::timeout(
            ice_limit,
            ice.wait_for(|s| {
                matches!(
                    s,
                    RTCIceConnectionState::Connected | RTCIceConnectionState::Completed
                )
            }),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if found {
            let _ = tokio::time::timeout(
                MEDIA_LIMIT.saturating_sub(ice_limit),
                state.wait_for(|s| *s == RTCPeerConnectionState::Connected),
            )
            .await;
        }
        found
    }

    /// Ends this connection. With `leave` the server is told first, and given the time to
    /// act on it (it then closes the signalling) before the media path closes: a media close
    /// first reads to the others as a lost connection.
    async fn close(mut self, shared: &Shared, leave: bool) {
        {
            let mut current = shared.current.lock().expect("lock poisoned");
            if current.as_ref().is_some_and(|c| c.id == self.id) {
                *current = None;
            }
        }
        if leave {
            let _ = self.outbox.send(ClientMessage::Leave);
            if let Some(f) = self.flushed.take() {
                let _ = tokio::time::timeout(Duration::from_secs(2), f).await;
            }
        }
        drop(std::mem::take(&mut self._tasks));
        let _ = tokio::time::timeout(Duration::from_secs(2), self.pc.close()).await;
    }
}

impl Drop for Session {
    /// A session dropped without [`Session::close`] (the site left while a reconnect was
    /// under way) still stops its tasks and closes its peer connection. After `close` this
    /// closes an already closed connection, which does nothing.
    fn drop(&mut self) {
        drop(std::mem::take(&mut self._tasks));
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let pc = self.pc.clone();
            handle.spawn(async move {
                let _ = pc.close().await;
            });
        }
    }
}

/// How long a site waits for ICE to find a path over UDP before joining again over ICE-TCP
/// only.
pub const UDP_GRACE: Duration = Duration::from_secs(6);

/// How long the media path (ICE and DTLS) may take in all, as the server allows.
const MEDIA_LIMIT: Duration = Duration::from_secs(18);

/// A connection whose media path has not come up this long after it was opened is given up
/// and opened again (with `resume`). On a lossy link the server's last DTLS flight can be
/// lost for good: the server's side of the handshake is done, so its media timeout never
/// fires, and webrtc-rs's side waits forever (seen on a 5 % loss link, about one join in
/// six).
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(20);

/// How long one reconnect attempt may wait for the server's TCP handshake before trying again
/// (a SYN lost in an outage is otherwise retried by the kernel only after 1, 3, 7 s…).
const RECONNECT_DIAL: Duration = Duration::from_millis(1500);

/// The pause before reconnect attempt `n` (from 0) made `since` after the loss: short and
/// growing to 1 s in the first minute, then every 5 s.
pub fn reconnect_backoff(n: u32, since: Duration) -> Duration {
    if since > Duration::from_secs(60) {
        return Duration::from_secs(5);
    }
    Duration::from_millis(250u64.saturating_mul(1 << n.min(4))).min(Duration::from_secs(1))
}

/// Whether a failed reconnect attempt is worth repeating.
fn worth_retrying(e: &ClientError) -> bool {
    match e {
        ClientError::Refused { code, .. } => matches!(
            code,
            ErrorCode::SiteTaken
                | ErrorCode::MediaTimeout
                | ErrorCode::Internal
                | ErrorCode::RoomFull
        ),
        ClientError::Certificate { .. } | ClientError::NeedsTls { .. } | ClientError::Device(_) => {
            false
        }
        _ => true,
    }
}

/// Whether the server should send this site the others' pictures: the person wants them and
/// the downlink is not too lossy for them.
fn wants_video(shared: &Shared) -> bool {
    shared.receive_video.load(Ordering::Relaxed) && !shared.down_sound_only.load(Ordering::Relaxed)
}

/// Tells the supervisor that connection `id` is lost (unless the site has left).
fn lost(shared: &Shared, id: u64, why: &str) {
    if !shared.closed.load(Ordering::Relaxed) {
        let _ = shared.lost.send((id, why.to_string()));
    }
}

/// Whether the server URL's host is a loopback address (then media binds to loopback too).
fn bind_ip_for(url: &str) -> IpAddr {
    let host = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or("");
    let host = host
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(host)
        .trim_matches(['[', ']']);
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => ip,
        _ if host == "localhost" => IpAddr::from([127, 0, 0, 1]),
        _ => IpAddr::from([0, 0, 0, 0]),
    }
}

impl Room {
    /// Joins `options.room` on the server at `url` (`ws://host:port`).
    ///
    /// With both UDP and TCP allowed, a site whose media does not come up within
    /// [`UDP_GRACE`] (UDP blocked by a firewall) joins again over ICE-TCP only: the
    /// webrtc-rs ICE agent cannot tell the server's UDP and TCP candidates apart when they
    /// share an address, so the TCP path works only when offered alone.
    pub async fn connect(
        url: &str,
        options: JoinOptions,
    ) -> Result<(Room, mpsc::UnboundedReceiver<RoomEvent>), ClientError> {
        let started = Instant::now();
        let (events_tx, events) = mpsc::unbounded_channel();
        // Open the microphone before joining: a site whose microphone will not open joins
        // without sound (and is told) rather than not at all.
        let mut mic = None;
        let mut mic_error = None;
        if let AudioInput::Mic(id) = &options.audio {
            match Microphone::open(id.as_deref()) {
                Ok(m) => mic = Some(m),
                Err(e) => {
                    mic_error = Some(format!(
                        "Không mở được micro: {} Điểm cầu tham gia nhưng không gửi tiếng.",
                        e.vi()
                    ))
                }
            }
        }
        let send_video = options.video != VideoInput::None;
        let send_audio = options.audio != AudioInput::None && mic_error.is_none();
        // A real microphone gets echo cancellation, noise suppression and gain control; the
        // speaker feeds the canceller what it plays.
        let processor = matches!(options.audio, AudioInput::Mic(_))
            .then(|| Arc::new(Mutex::new(AudioProcessor::new(Stages::default()))));
        // Playback: a mixer pulled by the speaker's clock. No speaker is not an error.
        let mut speaker = None;
        let mut speaker_error = None;
        let mixer = match &options.speaker {
            SpeakerOutput::None => None,
            SpeakerOutput::Null => Some(Arc::new(Mutex::new(Mixer::new(3)))),
            out => {
                let mixer = Arc::new(Mutex::new(Mixer::new(3)));
                let id = match out {
                    SpeakerOutput::Device(id) => Some(id.as_str()),
                    _ => None,
                };
                match Speaker::open(id, mixer.clone(), processor.clone()) {
                    Ok(s) => {
                        info!("speaker: {}", s.name());
                        speaker = Some(s);
                        Some(mixer)
                    }
                    Err(e) => {
                        speaker_error = Some(format!(
                            "Không phát được âm thanh ra loa, cuộc họp vẫn tiếp tục: {}",
                            e.vi()
                        ));
                        None
                    }
                }
            }
        };
        let speaker = Arc::new(Mutex::new(speaker));
        let remote = Arc::new(Remote {
            mixer: mixer.clone(),
            slots: Mutex::new(HashMap::new()),
            sites: Mutex::new(Default::default()),
            started,
            first_verified: Mutex::new(None),
            events: events_tx.clone(),
            deliver_video: options.deliver_video,
            keyframe_requests_sent: Default::default(),
            down_packets: Default::default(),
            down_lost: Default::default(),
            psnr_every: options.psnr_every,
        });
        let (video_tx, video_rx) = mpsc::channel(4 * publish::MAX_LAYERS);
        let video_tracks = match options.video {
            VideoInput::None => 0,
            VideoInput::Synthetic { width, height, .. }
            | VideoInput::Camera { width, height, .. } => {
                publish::layer_divisors((width, height), options.video_layers).len()
            }
        };
        let (audio_tx, audio_rx) = mpsc::channel(25);
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            url: url.into(),
            udp: AtomicBool::new(options.udp),
            events: events_tx.clone(),
            remote,
            counters: Arc::new(SendCounters::default()),
            capture_control: Arc::new(CaptureControl::default()),
            bwe_bps: Arc::new(AtomicU64::new(peer::BWE_INITIAL_BPS.to_bits())),
            link: Arc::new(peer::LinkStats::default()),
            receive_video: AtomicBool::new(options.receive_video),
            down_sound_only: AtomicBool::new(false),
            down_pauses: AtomicU64::new(0),
            last_rtt_us: AtomicU64::new(0),
            video_in: send_video.then(|| Arc::new(AsyncMutex::new(video_rx))),
            video_tracks,
            audio_in: send_audio.then(|| Arc::new(AsyncMutex::new(audio_rx))),
            sites_seen: Mutex::new(BTreeMap::new()),
            errors: Mutex::new(Vec::new()),
            meeting: Mutex::new(MeetingView::default()),
            hand_before_loss: Mutex::new(None),
            floor_before_loss: Mutex::new(None),
            role: Mutex::new(None),
            chair_commands: AtomicU64::new(0),
            requests: Arc::new(Requests::default()),
            started,
            closed: AtomicBool::new(false),
            current: Mutex::new(None),
            lost: lost_tx,
            next_session: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            options,
        });
        let session = open_with_fallback(&shared, false).await?;

        let options = &shared.options;
        let (err_tx, mut err_rx) = mpsc::unbounded_channel::<String>();
        let mut threads = Vec::new();
        let mut tasks = Tasks::default();
        for e in [speaker_error, mic_error].into_iter().flatten() {
            let _ = err_tx.send(e);
        }
        // Local problems (devices, codecs) are kept for the report and told as they come.
        {
            let shared = shared.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(e) = err_rx.recv().await {
                    debug!("device: {e}");
                    shared.errors.lock().expect("lock poisoned").push(e.clone());
                    let _ = shared.events.send(RoomEvent::DeviceError { message: e });
                }
            }));
        }
        // The null speaker's clock.
        if let (SpeakerOutput::Null, Some(mixer)) = (&options.speaker, mixer.clone()) {
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                let mut frame = vec![0i16; diemcau_media::frame::AUDIO_FRAME_SAMPLES];
                loop {
                    tick.tick().await;
                    if let Ok(mut m) = mixer.lock() {
                        m.fill(&mut frame);
                    }
                }
            }));
        }
        // An unplugged speaker gives way to the system default (checked twice a second).
        if let Some(mixer) = mixer.clone() {
            let (speaker, processor, err_tx) = (speaker.clone(), processor.clone(), err_tx.clone());
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tick.tick().await;
                    let lost = match speaker.lock().expect("lock poisoned").as_ref() {
                        Some(s) if s.is_dead() => s.name().to_string(),
                        _ => continue,
                    };
                    let fresh = Speaker::open(None, mixer.clone(), processor.clone());
                    let msg = match &fresh {
                        Ok(s) => format!(
                            "Loa \"{lost}\" đã bị rút ra; đã chuyển sang loa mặc định \"{}\".",
                            s.name()
                        ),
                        Err(e) => format!(
                            "Loa \"{lost}\" đã bị rút ra và không mở được loa mặc định: {}",
                            e.vi()
                        ),
                    };
                    let _ = err_tx.send(msg);
                    *speaker.lock().expect("lock poisoned") = fresh.ok();
                }
            }));
        }

        // Capture and encoding run for the whole meeting, whatever connection carries them.
        let source: Option<Box<dyn VideoSource>> = match options.video {
            VideoInput::Synthetic { width, height, fps } => Some(Box::new(
                SyntheticCamera::new(width, height, fps, &options.site)
                    .map_err(|e| ClientError::Device(e.vi()))?,
            )),
            VideoInput::Camera {
                index,
                width,
                height,
                fps,
            } => match Camera::open(index, width as u32, height as u32, fps) {
                Ok(c) => Some(Box::new(c)),
                Err(e) => {
                    let _ = err_tx.send(format!(
                        "Không mở được camera: {} Đang gửi hình mẫu thử thay thế.",
                        e.vi()
                    ));
                    Some(Box::new(
                        SyntheticCamera::new(640, 360, 15, &options.site)
                            .map_err(|e| ClientError::Device(e.vi()))?,
                    ))
                }
            },
            VideoInput::None => None,
        };
        if let Some(source) = source {
            info!("video: {}", source.describe());
            let site = options.site.clone();
            let fallback: publish::VideoFallback = Box::new(move || {
                SyntheticCamera::new(640, 360, 15, &site)
                    .map(|c| Box::new(c) as Box<dyn VideoSource>)
            });
            threads.push(publish::spawn_video_thread(
                source,
                Some(fallback),
                options.max_video_bitrate_bps,
                shared.bwe_bps.clone(),
                shared.link.clone(),
                shared.capture_control.clone(),
                shared.counters.clone(),
                video_tx,
                err_tx.clone(),
                events_tx.clone(),
                options.deliver_video,
                shared.video_tracks,
            ));
        }
        if send_audio {
            let source: Option<Box<dyn AudioSource>> = match &options.audio {
                AudioInput::Mic(_) => mic.take().map(|mic| {
                    // An unplugged microphone gives way to the system default.
                    Box::new(AudioFailover::new(
                        Box::new(mic),
                        Box::new(|| {
                            Microphone::open(None).map(|m| Box::new(m) as Box<dyn AudioSource>)
                        }),
                    )) as Box<dyn AudioSource>
                }),
                _ => Some(Box::new(SyntheticTone::new())),
            };
            if let Some(source) = source {
                info!("audio: {}", source.describe());
                threads.push(publish::spawn_audio_thread(
                    source,
                    processor.clone(),
                    shared.capture_control.clone(),
                    audio_tx,
                    err_tx.clone(),
                ));
            }
        }

        tasks.push(tokio::spawn(report_quality(shared.clone())));
        let stop = Arc::new(Notify::new());
        let supervisor = tokio::spawn(supervise(shared.clone(), session, lost_rx, stop.clone()));
        Ok((
            Room {
                shared,
                supervisor: Some(supervisor),
                stop,
                threads,
                _tasks: tasks,
                _speaker: speaker,
            },
            events,
        ))
    }

    pub fn options(&self) -> &JoinOptions {
        &self.shared.options
    }

    /// How many times the room has joined again after a lost connection.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    fn current(&self) -> Option<Current> {
        self.shared.current.lock().expect("lock poisoned").clone()
    }

    /// Sends to the server over the current connection (dropped while reconnecting).
    fn send(&self, msg: ClientMessage) {
        if let Some(c) = self.current() {
            let _ = c.outbox.send(msg);
        }
    }

    /// The report as of now (also what [`Room::leave`] returns).
    pub async fn report(&self) -> Report {
        let transport = match self.current() {
            Some(c) => selected_transport(&c.pc).await,
            None => None,
        };
        let shared = &*self.shared;
        let sites = shared.remote.sites.lock().expect("lock poisoned").clone();
        let site_paths = shared.sites_seen.lock().expect("lock poisoned").clone();
        let mut all_lat = Vec::new();
        // Sizes received per site, the largest first.
        let layers_received: std::collections::BTreeMap<String, Vec<String>> = sites
            .iter()
            .map(|(site, c)| {
                let mut sizes: Vec<(usize, usize)> = c.layers.keys().copied().collect();
                sizes.sort_by_key(|&(w, h)| std::cmp::Reverse(w * h));
                let sizes = sizes.iter().map(|(w, h)| format!("{w}x{h}")).collect();
                (site.clone(), sizes)
            })
            .collect();
        let duration_s = shared.started.elapsed().as_secs_f64();
        let received: Vec<Received> = sites
            .into_iter()
            .map(|(site, c)| {
                all_lat.extend_from_slice(&c.video.latencies_us);
                Received {
                    site,
                    video_frames: c.video.frames,
                    video_frames_verified: c.video.verified,
                    video_frames_lost: c.video.lost,
                    video_frames_out_of_order: c.video.out_of_order,
                    video_decode_errors: c.video_decode_errors,
                    audio_frames: c.audio_frames,
                    audio_frames_verified: c.audio_verified,
                    audio_frames_repaired: c.audio_repaired,
                    audio_frames_concealed: c.audio_concealed,
                    layers: c
                        .layers
                        .iter()
                        .map(|((w, h), n)| (format!("{w}x{h}"), *n))
                        .collect(),
                    latency_ms: latency(&c.video.latencies_us),
                    psnr_db: c.video.mean_psnr(),
                    first_verified_ms: c.first_verified.map(|d| d.as_secs_f64() * 1000.0),
                    bitrate_bps: (c.bytes as f64 * 8.0 / duration_s.max(1e-3)) as u64,
                }
            })
            .collect();
        let audio_frames_concealed = received.iter().map(|r| r.audio_frames_concealed).sum();
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let meeting = self.meeting();
        Report {
            site: shared.options.site.clone(),
            room: shared.options.room.clone(),
            server: shared.url.clone(),
            duration_s,
            transport,
            sent: Sent {
                video_frames: ld(&shared.counters.video_frames),
                video_keyframes: ld(&shared.counters.video_keyframes),
                video_bytes: ld(&shared.counters.video_bytes),
                audio_frames: ld(&shared.counters.audio_frames),
                keyframe_requests: ld(&shared.counters.keyframe_requests),
                video_bitrate_bps: ld(&shared.counters.video_bitrate),
                video_layer: ld(&shared.counters.video_layer),
                video_layers: ld(&shared.counters.video_layers),
                video_pauses: ld(&shared.counters.video_pauses),
                video_paused_ms: ld(&shared.counters.video_paused_ms),
                probe_bytes: ld(&shared.counters.probe_bytes),
                layer_probes: ld(&shared.counters.layer_probes),
            },
            video_receive_pauses: ld(&shared.down_pauses),
            received,
            latency_ms: latency(&all_lat),
            join_ms: shared
                .remote
                .first_verified
                .lock()
                .expect("lock poisoned")
                .map(|d| d.as_secs_f64() * 1000.0),
            keyframe_requests_sent: ld(&shared.remote.keyframe_requests_sent),
            sites_seen: site_paths.keys().cloned().collect(),
            site_paths,
            errors: shared.errors.lock().expect("lock poisoned").clone(),
            layers_received,
            audio_frames_concealed,
            reconnects: ld(&shared.reconnects),
            rtt_ms: match ld(&shared.last_rtt_us) {
                0 => None,
                us => Some(us as f64 / 1000.0),
            },
            uplink_loss_pct: shared.link.loss_pct(),
            uplink_packets_reported: ld(&shared.link.reported),
            uplink_packets_reported_lost: ld(&shared.link.reported_lost),
            uplink_packets_left_out: ld(&shared.link.left_out),
            audio_playout: shared.remote.mixer.as_ref().and_then(|m| {
                let s = m.lock().ok()?.summary();
                Some(Playout {
                    frames: s.stats.played(),
                    decoded: s.stats.decoded,
                    fec: s.stats.fec,
                    concealed: s.stats.concealed,
                    expanded: s.stats.expanded,
                    dropped: s.stats.dropped,
                    late: s.stats.late,
                    delay_ms: Latency {
                        p50: s.wait_ms(0.5),
                        p95: s.wait_ms(0.95),
                    },
                    delay_now_ms: s.wait_now_ms,
                    target_ms: s.target_now as f64 * 20.0,
                })
            }),
            hand_queue: meeting.hands,
            floor: meeting.floor,
        }
    }

    pub fn raise_hand(&self) {
        self.send(ClientMessage::RaiseHand { raised_at_ms: None });
    }

    pub fn lower_hand(&self) {
        self.send(ClientMessage::LowerHand);
    }

    /// Answers the chair's request to unmute.
    pub fn reply_unmute(&self, accept: bool) {
        self.send(ClientMessage::UnmuteReply { accept });
    }

    /// Gives a chair command (refused by the server unless this site is the chair).
    pub async fn chair(&self, command: ChairCommand) -> ChairResult {
        let Some(c) = self.current() else {
            return Err(ClientError::Timeout("reconnecting"));
        };
        self.shared.chair_commands.fetch_add(1, Ordering::Relaxed);
        control::send_command(&c.outbox, &self.shared.requests, command).await
    }

    /// Stops (or resumes) sending the microphone; the level meter keeps working.
    pub fn set_mic_muted(&self, muted: bool) {
        self.shared
            .capture_control
            .mic_muted
            .store(muted, Ordering::Relaxed);
    }

    /// Sound only from the others (`false`) or their pictures too. The server stops sending
    /// this site pictures, which frees a thin downlink; kept across reconnects. (Sending is
    /// [`Room::set_camera_off`].)
    pub fn set_receive_video(&self, on: bool) {
        if !self.shared.options.receive_video {
            // Joined audio-only: there are no picture slots to turn on.
            return;
        }
        self.shared.receive_video.store(on, Ordering::Relaxed);
        // The person's choice wins over the downlink's: asking for pictures ends a pause
        // for the link too.
        self.shared.down_sound_only.store(false, Ordering::Relaxed);
        self.send(ClientMessage::ReceiveVideo { on });
    }

    /// Stops (or resumes) reading and sending the camera.
    pub fn set_camera_off(&self, off: bool) {
        self.shared
            .capture_control
            .camera_off
            .store(off, Ordering::Relaxed);
    }

    /// Loudness of the local microphone (dBFS), muted or not.
    pub fn mic_level_dbfs(&self) -> f32 {
        self.shared.capture_control.mic_level_dbfs()
    }

    /// The remote sites heard within `window` above `threshold_dbfs` (speaking indicators).
    pub fn speaking(&self, window: Duration, threshold_dbfs: f32) -> Vec<SiteId> {
        let sites = self.shared.remote.sites.lock().expect("lock poisoned");
        sites
            .iter()
            .filter(|(_, c)| {
                c.audio_loud_at
                    .is_some_and(|t| t.elapsed() <= window && c.audio_level_dbfs >= threshold_dbfs)
            })
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// The hand queue and floor as last seen.
    pub fn meeting(&self) -> MeetingView {
        self.shared.meeting.lock().expect("lock poisoned").clone()
    }

    /// Leaves the room, stops capture and the peer connection, and returns the report.
    pub async fn leave(mut self) -> Report {
        let report = self.report().await;
        self.shared.closed.store(true, Ordering::Relaxed);
        self.stop.notify_one();
        let session = match self.supervisor.take() {
            Some(s) => s.await.ok().flatten(),
            None => None,
        };
        self.shared
            .capture_control
            .stop
            .store(true, Ordering::Relaxed);
        if let Some(s) = session {
            s.close(&self.shared, true).await;
        }
        for t in self.threads.drain(..) {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        report
    }
}

impl Drop for Room {
    /// A room dropped without [`Room::leave`] (a panic, an early return) still stops its
    /// capture threads, says `leave` and closes the peer connection.
    fn drop(&mut self) {
        self.shared
            .capture_control
            .stop
            .store(true, Ordering::Relaxed);
        self.shared.closed.store(true, Ordering::Relaxed);
        let current = self.shared.current.lock().expect("lock poisoned").take();
        if let Some(c) = current {
            let _ = c.outbox.send(ClientMessage::Leave);
        }
        // The supervisor owns the session: cancelling it drops the session, which closes its
        // peer connection (`Session`'s `Drop`).
        if let Some(s) = self.supervisor.take() {
            s.abort();
        }
    }
}

/// Opens a connection; when UDP and TCP are both allowed and ICE finds no UDP path within
/// [`UDP_GRACE`], opens it again over TCP only (and stays on TCP).
async fn open_with_fallback(shared: &Arc<Shared>, resume: bool) -> Result<Session, ClientError> {
    let session = open_session(shared, resume).await?;
    if !(shared.udp.load(Ordering::Relaxed) && shared.options.tcp)
        || session.wait_media(UDP_GRACE).await
    {
        return Ok(session);
    }
    info!("no UDP path within {UDP_GRACE:?}; joining again over ICE-TCP");
    session.close(shared, false).await;
    shared.udp.store(false, Ordering::Relaxed);
    // `resume`: the server may not have seen the first connection go yet.
    open_session(shared, true).await
}

/// Keeps the room connected: on a lost connection, says so, and joins again (with
/// `resume`) until it works, the site leaves, or the server refuses for good. Returns the
/// connection in use when the site leaves.
async fn supervise(
    shared: Arc<Shared>,
    mut session: Session,
    mut lost_rx: mpsc::UnboundedReceiver<(u64, String)>,
    stop: Arc<Notify>,
) -> Option<Session> {
    loop {
        let why = tokio::select! {
            _ = stop.notified() => return Some(session),
            m = lost_rx.recv() => match m {
                Some((id, why)) if id == session.id => why,
                Some(_) => continue,
                None => return Some(session),
            },
        };
        info!("connection lost ({why}); reconnecting");
        let hand = shared
            .meeting
            .lock()
            .expect("lock poisoned")
            .hands
            .iter()
            .find(|h| h.site == shared.options.site)
            .map(|h| h.raised_at_ms);
        *shared.hand_before_loss.lock().expect("lock poisoned") = hand;
        let chair = *shared.role.lock().expect("lock poisoned") == Some(Role::Chair);
        *shared.floor_before_loss.lock().expect("lock poisoned") = chair
            .then(|| shared.meeting.lock().expect("lock poisoned").floor.clone())
            .flatten();
        let _ = shared.events.send(RoomEvent::Reconnecting {
            reason: why.clone(),
        });
        let since = Instant::now();
        session.close(&shared, false).await;
        let mut attempt = 0u32;
        session = loop {
            let opened = tokio::select! {
                _ = stop.notified() => return None,
                r = open_with_fallback(&shared, true) => r,
            };
            match opened {
                Ok(s) => break s,
                Err(e) if worth_retrying(&e) => {
                    debug!("reconnect attempt {attempt} failed: {e}");
                    let pause = reconnect_backoff(attempt, since.elapsed());
                    attempt += 1;
                    tokio::select! {
                        _ = stop.notified() => return None,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
                Err(e) => {
                    info!("reconnect refused for good: {e}");
                    shared.closed.store(true, Ordering::Relaxed);
                    let _ = shared
                        .events
                        .send(RoomEvent::Disconnected { reason: e.vi() });
                    return None;
                }
            }
        };
        shared.reconnects.fetch_add(1, Ordering::Relaxed);
        info!(after = ?since.elapsed(), attempts = attempt + 1, "reconnected");
        let _ = shared.events.send(RoomEvent::Reconnected {
            after: since.elapsed(),
        });
    }
}

/// One connection: signalling `join` → `welcome` → peer connection with the send tracks and
/// the receive slots → `offer` → `answer`; then the tasks that write our media, read the
/// slots and follow the server.
async fn open_session(shared: &Arc<Shared>, resume: bool) -> Result<Session, ClientError> {
    let options = &shared.options;
    let url = shared.url.as_str();
    let mut sig = if resume {
        tokio::time::timeout(RECONNECT_DIAL, signal::connect(url))
            .await
            .map_err(|_| ClientError::Timeout("connect"))??
    } else {
        signal::connect(url).await?
    };
    let token = match (&options.token, &options.secret) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(secret)) => {
            Some(control::enroll(&mut sig, &options.site, &options.room, secret).await?)
        }
        (None, None) => None,
    };
    let _ = sig.outbox.send(ClientMessage::Join {
        v: PROTOCOL_VERSION,
        room: options.room.clone(),
        site: options.site.clone(),
        token,
        control: false,
        resume,
        relay: false,
    });
    let mut backlog = VecDeque::new();
    let (you, role, video_slots, audio_slots, sites) = sig
        .expect(&mut backlog, "welcome", &[], |m| match m {
            ServerMessage::Welcome {
                you,
                role,
                video_slots,
                audio_slots,
                sites,
                ..
            } => Some((
                you.clone(),
                *role,
                *video_slots,
                *audio_slots,
                sites.clone(),
            )),
            _ => None,
        })
        .await?;
    shared
        .sites_seen
        .lock()
        .expect("lock poisoned")
        .extend(sites.iter().map(|s| (s.id.clone(), s.path.clone())));
    *shared.role.lock().expect("lock poisoned") = Some(role);
    let _ = shared.events.send(RoomEvent::Joined { you, role, sites });
    // Sound only, chosen in an earlier connection (or while this one was opening; see below).
    let mut receiving = true;
    if options.receive_video && !wants_video(shared) {
        let _ = sig.outbox.send(ClientMessage::ReceiveVideo { on: false });
        receiving = false;
    }

    let transports = Transports {
        udp: shared.udp.load(Ordering::Relaxed),
        tcp: options.tcp,
        bind_ip: bind_ip_for(url),
    };
    let mut peer = peer::build(&transports, shared.bwe_bps.clone(), shared.link.clone()).await?;
    let pc = peer.pc.clone();
    let sendonly = || {
        Some(RTCRtpTransceiverInit {
            direction: RTCRtpTransceiverDirection::Sendonly,
            ..Default::default()
        })
    };
    let recvonly = || {
        Some(RTCRtpTransceiverInit {
            direction: RTCRtpTransceiverDirection::Recvonly,
            ..Default::default()
        })
    };
    let stream = format!("site-{}", options.site);
    // Pictures: a send m-line per layer, the lowest first (the server takes each further
    // one as the next layer up); then sound.
    let mut local = Vec::new();
    for (kind, tracks, input) in [
        (RtpCodecKind::Video, shared.video_tracks, &shared.video_in),
        (RtpCodecKind::Audio, 1, &shared.audio_in),
    ] {
        let Some(input) = input else { continue };
        let mut layers = Vec::new();
        for layer in 0..tracks {
            let id = match (kind, layer) {
                (RtpCodecKind::Video, 0) => "video".to_string(),
                (RtpCodecKind::Video, n) => format!("video-{n}"),
                _ => "audio".to_string(),
            };
            let t = peer::sample_track(kind, &id, &stream)?;
            let tr = pc
                .add_transceiver_from_track(t.clone() as Arc<dyn TrackLocal>, sendonly())
                .await
                .map_err(ClientError::webrtc)?;
            let sender = tr
                .sender()
                .await
                .map_err(ClientError::webrtc)?
                .ok_or_else(|| ClientError::WebRtc(format!("{id} transceiver has no sender")))?;
            layers.push((t, sender));
        }
        local.push((kind, layers, input.clone()));
    }
    for (kind, n) in [
        (
            RtpCodecKind::Video,
            if options.receive_video {
                video_slots
            } else {
                0
            },
        ),
        (RtpCodecKind::Audio, audio_slots),
    ] {
        for _ in 0..n {
            pc.add_transceiver_from_kind(kind, recvonly())
                .await
                .map_err(ClientError::webrtc)?;
        }
    }
    let offer = pc.create_offer(None).await.map_err(ClientError::webrtc)?;
    pc.set_local_description(offer)
        .await
        .map_err(ClientError::webrtc)?;
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        peer.gathering
            .wait_for(|s| *s == RTCIceGatheringState::Complete),
    )
    .await;
    let sdp = pc
        .local_description()
        .await
        .ok_or_else(|| ClientError::WebRtc("no local description".into()))?
        .sdp;
    let _ = sig.outbox.send(ClientMessage::Offer { sdp });
    let answer = sig
        .expect(&mut backlog, "answer", &[ErrorCode::BadSdp], |m| match m {
            ServerMessage::Answer { sdp } => Some(sdp.clone()),
            _ => None,
        })
        .await?;
    // rtc-ice 0.21.1 looks remote candidates up by address alone, ignoring the
    // transport; the server's UDP and TCP candidates share an address, so a TCP-only
    // client must not see the UDP one or its TCP checks never validate.
    let answer = if transports.udp {
        answer
    } else {
        without_udp_candidates(&answer)
    };
    pc.set_remote_description(
        RTCSessionDescription::answer(answer.clone()).map_err(ClientError::webrtc)?,
    )
    .await
    .map_err(ClientError::webrtc)?;
    if transports.tcp {
        dial_tcp_candidates(&pc, &answer).await;
    }

    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let mut tasks = Tasks::default();
    {
        let (shared, mut state) = (shared.clone(), peer.state.clone());
        tasks.push(tokio::spawn(async move {
            let up = tokio::time::timeout(
                HANDSHAKE_LIMIT,
                state.wait_for(|s| *s == RTCPeerConnectionState::Connected),
            )
            .await;
            if up.is_err() {
                tracing::warn!(
                    "the media path did not come up within {HANDSHAKE_LIMIT:?}; opening it again"
                );
                lost(&shared, id, "media handshake stalled");
            }
        }));
    }
    for (kind, tracks, input) in local {
        let video = kind == RtpCodecKind::Video;
        if video {
            for (layer, (track, _)) in tracks.iter().enumerate() {
                tasks.push(tokio::spawn(publish::answer_keyframe_requests(
                    track.clone(),
                    layer,
                    shared.capture_control.clone(),
                    shared.counters.clone(),
                )));
            }
        }
        tasks.push(tokio::spawn(publish::write_track(
            tracks,
            peer.state.clone(),
            input,
            video.then(|| shared.capture_control.clone()),
            shared.counters.clone(),
        )));
    }

    // Remote tracks: which site a slot carries comes with this connection's `slots`.
    shared.remote.slots.lock().expect("lock poisoned").clear();
    let track_pc = pc.clone();
    let track_remote = shared.remote.clone();
    let mut tracks = std::mem::replace(&mut peer.tracks, mpsc::unbounded_channel().1);
    tasks.push(tokio::spawn(async move {
        while let Some(t) = tracks.recv().await {
            tokio::spawn(receive::run_track(
                track_pc.clone(),
                t,
                track_remote.clone(),
            ));
        }
    }));

    // The room task: server messages and the media path's state.
    let room_task = {
        let shared = shared.clone();
        let mut state = peer.state.clone();
        let mut inbox = sig.inbox;
        let outbox = sig.outbox.clone();
        async move {
            for msg in backlog {
                restore_forgotten(&msg, &shared, &outbox);
                on_server_message(msg, &shared);
            }
            loop {
                tokio::select! {
                    msg = inbox.recv() => match msg {
                        Some(m) => {
                            if let ServerMessage::Error { code, message, fatal, .. } = &m {
                                shared.errors.lock().expect("lock poisoned").push(format!("{} ({message})", code.vi()));
                                // The server dropped us for lost media: come back.
                                if *fatal && *code == ErrorCode::MediaTimeout {
                                    lost(&shared, id, "media_timeout");
                                    break;
                                }
                                if *fatal {
                                    // Removed, or refused for good: the meeting ends here.
                                    shared.closed.store(true, Ordering::Relaxed);
                                }
                            }
                            restore_forgotten(&m, &shared, &outbox);
                            on_server_message(m, &shared)
                        }
                        None => {
                            lost(&shared, id, "signalling closed");
                            break;
                        }
                    },
                    r = state.changed() => {
                        if r.is_err() { break; }
                        let s = *state.borrow();
                        match s {
                            RTCPeerConnectionState::Connected => { let _ = shared.events.send(RoomEvent::MediaConnected); }
                            RTCPeerConnectionState::Disconnected | RTCPeerConnectionState::Failed => {
                                lost(&shared, id, "media path lost");
                                break;
                            }
                            _ => debug!(?s, "peer connection state"),
                        }
                    }
                }
            }
        }
    };
    tasks.push(tokio::spawn(room_task));
    *shared.current.lock().expect("lock poisoned") = Some(Current {
        id,
        outbox: sig.outbox.clone(),
        pc: pc.clone(),
    });
    // A change made while this connection was opening went nowhere: say it now.
    if options.receive_video && wants_video(shared) != receiving {
        let _ = sig
            .outbox
            .send(ClientMessage::ReceiveVideo { on: !receiving });
    }
    Ok(Session {
        id,
        pc,
        outbox: sig.outbox,
        flushed: Some(sig.flushed),
        ice: peer.ice.clone(),
        state: peer.state.clone(),
        _tasks: tasks,
    })
}

fn latency(us: &[u32]) -> Latency {
    Latency {
        p50: percentile(us, 50.0).map(|v| f64::from(v) / 1000.0),
        p95: percentile(us, 95.0).map(|v| f64::from(v) / 1000.0),
    }
}

/// The meeting as this site last saw it.
#[derive(Debug, Clone, Default)]
pub struct MeetingView {
    pub hands: Vec<Hand>,
    pub hands_total: u32,
    pub floor: Option<FloorState>,
}

/// After a reconnect, what a restarted server forgot: our hand, and as chair the floor.
fn restore_forgotten(
    msg: &ServerMessage,
    shared: &Arc<Shared>,
    outbox: &mpsc::UnboundedSender<ClientMessage>,
) {
    restore_hand(msg, shared, outbox);
    restore_floor(msg, shared, outbox);
}

/// After a reconnect, the first `hands` says whether the server still holds our hand; if it
/// does not, the hand goes up again at the time it first went up (a server that restarted
/// puts it back in its old place; one that kept it, or saw it lowered, ignores the time).
fn restore_hand(
    msg: &ServerMessage,
    shared: &Shared,
    outbox: &mpsc::UnboundedSender<ClientMessage>,
) {
    let ServerMessage::Hands { queue, .. } = msg else {
        return;
    };
    let Some(at) = shared
        .hand_before_loss
        .lock()
        .expect("lock poisoned")
        .take()
    else {
        return;
    };
    if !queue.iter().any(|h| h.site == shared.options.site) {
        info!(at, "raising the hand again where it was");
        let _ = outbox.send(ClientMessage::RaiseHand {
            raised_at_ms: Some(at),
        });
    }
}

/// How long a chair coming back to a restarted server keeps trying to give a site back what
/// it had (the site has to be back in the room first).
const FLOOR_RESTORE_FOR: Duration = Duration::from_secs(120);

/// After a reconnect, the chair's first `floor` says whether the server still holds the
/// meeting. A server that restarted shows a room as new (open, nothing granted, muted or in
/// the spotlight) where it was not: the chair gives it all back — the floor mode at once, and
/// each grant, mute and the spotlight once that site is back in the room (tried every
/// second for [`FLOOR_RESTORE_FOR`], and not after the chair gives a command of its own: it
/// has moved on). The lock is not given back: it would keep out the sites still coming back.
fn restore_floor(
    msg: &ServerMessage,
    shared: &Arc<Shared>,
    outbox: &mpsc::UnboundedSender<ClientMessage>,
) {
    let ServerMessage::Floor { state } = msg else {
        return;
    };
    let Some(old) = shared
        .floor_before_loss
        .lock()
        .expect("lock poisoned")
        .take()
    else {
        return;
    };
    let fresh = |f: &FloorState| {
        f.mode == FloorMode::default()
            && f.granted.is_empty()
            && f.muted.is_empty()
            && f.spotlight.is_none()
            && !f.locked
    };
    if !fresh(state) || fresh(&old) {
        return;
    }
    info!(?old, "the server forgot the meeting: giving the floor back");
    let mut todo: Vec<ChairCommand> = Vec::new();
    if old.mode != FloorMode::default() {
        todo.push(ChairCommand::FloorMode { mode: old.mode });
    }
    todo.extend(
        old.muted
            .iter()
            .map(|s| ChairCommand::Mute { site: s.clone() }),
    );
    todo.extend(
        old.granted
            .iter()
            .map(|s| ChairCommand::Grant { site: s.clone() }),
    );
    if let Some(site) = old.spotlight.clone() {
        todo.push(ChairCommand::Spotlight { site: Some(site) });
    }
    let (outbox, shared) = (outbox.clone(), shared.clone());
    let given = shared.chair_commands.load(Ordering::Relaxed);
    tokio::spawn(async move {
        let requests = shared.requests.clone();
        let until = tokio::time::Instant::now() + FLOOR_RESTORE_FOR;
        while !todo.is_empty()
            && tokio::time::Instant::now() < until
            && shared.chair_commands.load(Ordering::Relaxed) == given
        {
            let mut left = Vec::new();
            for c in todo {
                match control::send_command(&outbox, &requests, c.clone()).await {
                    Ok(_) => {}
                    Err(ClientError::ServerClosed) => return,
                    Err(e) => {
                        debug!("{} not given back yet: {e}", c.name());
                        left.push(c);
                    }
                }
            }
            todo = left;
            if !todo.is_empty() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });
}

fn on_server_message(msg: ServerMessage, shared: &Shared) {
    let (remote, events, sites_seen) = (&shared.remote, &shared.events, &shared.sites_seen);
    if shared.requests.resolve(&msg) {
        return;
    }
    match msg {
        ServerMessage::SiteJoined { site } => {
            sites_seen
                .lock()
                .expect("lock poisoned")
                .insert(site.id.clone(), site.path.clone());
            let _ = events.send(RoomEvent::SiteJoined { site });
        }
        ServerMessage::SiteLeft { site, reason } => {
            let _ = events.send(RoomEvent::SiteLeft { site, reason });
        }
        ServerMessage::Slots { slots } => {
            let mut map = remote.slots.lock().expect("lock poisoned");
            for s in slots {
                let before = map.get(&s.mid).and_then(|(_, site)| site.clone());
                if before != s.site {
                    // A new site on this slot starts its own playout.
                    if let Some(mx) = &remote.mixer {
                        if let Ok(mut mx) = mx.lock() {
                            mx.remove(&s.mid);
                        }
                    }
                    if let Some(b) = &before {
                        let _ = events.send(RoomEvent::TrackRemoved {
                            site: b.clone(),
                            kind: s.kind,
                        });
                    }
                    if let Some(a) = &s.site {
                        let _ = events.send(RoomEvent::TrackAdded {
                            site: a.clone(),
                            kind: s.kind,
                        });
                    }
                }
                map.insert(s.mid, (s.kind, s.site));
            }
        }
        ServerMessage::Error {
            code,
            message,
            fatal,
            ..
        } => {
            let _ = events.send(RoomEvent::ServerError {
                code,
                message,
                fatal,
            });
        }
        ServerMessage::Hands { queue, total } => {
            {
                let mut m = shared.meeting.lock().expect("lock poisoned");
                m.hands = queue.clone();
                m.hands_total = total;
            }
            let _ = events.send(RoomEvent::Hands { queue, total });
        }
        ServerMessage::Floor { state } => {
            shared.meeting.lock().expect("lock poisoned").floor = Some(state.clone());
            let _ = events.send(RoomEvent::Floor { state });
        }
        ServerMessage::AskUnmute { by } => {
            let _ = events.send(RoomEvent::AskUnmute { by });
        }
        ServerMessage::RollCall { entries } => {
            let _ = events.send(RoomEvent::RollCall { entries });
        }
        ServerMessage::Upstream { connected, chosen } => {
            let _ = events.send(RoomEvent::Upstream { connected, chosen });
        }
        ServerMessage::Welcome { .. }
        | ServerMessage::Answer { .. }
        | ServerMessage::Pong { .. }
        | ServerMessage::Enrolled { .. }
        | ServerMessage::Ack { .. }
        | ServerMessage::RollCallCsv { .. }
        // For relays only.
        | ServerMessage::RelayMeeting { .. }
        | ServerMessage::RelayAskUnmute { .. }
        | ServerMessage::RelayRemove { .. } => {}
    }
}

/// webrtc-rs dials a remote passive TCP candidate only when it is added explicitly, not when
/// it arrives inside the SDP.
async fn dial_tcp_candidates(pc: &Arc<dyn PeerConnection>, sdp: &str) {
    for line in sdp.lines() {
        let Some(c) = line.trim().strip_prefix("a=") else {
            continue;
        };
        let l = c.to_ascii_lowercase();
        if l.starts_with("candidate:") && l.contains(" tcp ") && l.contains("tcptype passive") {
            let init = RTCIceCandidateInit {
                candidate: c.to_owned(),
                ..Default::default()
            };
            if let Err(e) = pc.add_ice_candidate(init).await {
                debug!("TCP candidate not added: {e}");
            }
        }
    }
}

/// The SDP without its UDP `a=candidate` lines.
fn without_udp_candidates(sdp: &str) -> String {
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        let l = line.trim().to_ascii_lowercase();
        if l.starts_with("a=candidate:") && l.split_whitespace().nth(2) == Some("udp") {
            continue;
        }
        out.push_str(line);
    }
    out
}

/// "udp" or "tcp" for the nominated candidate pair.
async fn selected_transport(pc: &Arc<dyn PeerConnection>) -> Option<String> {
    selected_pair(pc).await.and_then(|(t, _)| t)
}

/// The transport ("udp"/"tcp") and last measured round trip (ICE checks) of the candidate
/// pair carrying the media.
async fn selected_pair(pc: &Arc<dyn PeerConnection>) -> Option<(Option<String>, Option<Duration>)> {
    let report = pc.get_stats(Instant::now(), StatsSelector::None).await;
    // The pair carrying the media: nominated if the stack marks it, else the busiest.
    let pair = report
        .candidate_pairs()
        .max_by_key(|p| (p.nominated, p.bytes_received))?;
    let rtt = (pair.current_round_trip_time > 0.0)
        .then(|| Duration::from_secs_f64(pair.current_round_trip_time));
    let local = pair.local_candidate_id.clone();
    // Candidate entries are keyed "RTCLocalIceCandidate_<pair's local_candidate_id>".
    let protocol = report.iter().find_map(|e| match e {
        RTCStatsReportEntry::LocalCandidate(c) if c.stats.id.ends_with(local.as_str()) => {
            Some(c.protocol.to_ascii_lowercase())
        }
        _ => None,
    });
    Some((protocol, rtt))
}

/// Turns the others' pictures off (and on again) for a lossy downlink, unless the person
/// chose either way by hand (joined sound only, or turned pictures off).
fn sound_only_for_downlink(
    shared: &Shared,
    gate: &mut quality::DownlinkGate,
    now: Instant,
    loss_pct: Option<f64>,
) {
    if !shared.options.receive_video || !shared.receive_video.load(Ordering::Relaxed) {
        *gate = quality::DownlinkGate::default();
        return;
    }
    if gate.off() && !shared.down_sound_only.load(Ordering::Relaxed) {
        // The person asked for pictures meanwhile.
        *gate = quality::DownlinkGate::default();
    }
    let Some(off) = gate.update(now, loss_pct) else {
        return;
    };
    info!(?loss_pct, off, hold = ?gate.hold(), "pictures received, for the downlink");
    shared.down_sound_only.store(off, Ordering::Relaxed);
    if off {
        shared.down_pauses.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(c) = shared.current.lock().expect("lock poisoned").as_ref() {
        let _ = c.outbox.send(ClientMessage::ReceiveVideo { on: !off });
    }
    let _ = shared
        .events
        .send(RoomEvent::ReceiveVideoPausedForLink { paused: off });
}

/// Works out [`Quality`] every [`QUALITY_EVERY`] for the whole meeting, and keeps the last
/// round trip for the report.
async fn report_quality(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(QUALITY_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: the first figures come a whole interval later.
    tick.tick().await;
    let sent_bytes = |c: &SendCounters| {
        c.video_bytes.load(Ordering::Relaxed) + c.audio_bytes.load(Ordering::Relaxed)
    };
    let down = |r: &Remote| {
        (
            r.down_packets.load(Ordering::Relaxed),
            r.down_lost.load(Ordering::Relaxed),
        )
    };
    let mut before = (
        Instant::now(),
        sent_bytes(&shared.counters),
        BTreeMap::new(),
    );
    let mut down_before = down(&shared.remote);
    let mut gate = quality::DownlinkGate::default();
    loop {
        tick.tick().await;
        let pc = shared
            .current
            .lock()
            .expect("lock poisoned")
            .as_ref()
            .map(|c| c.pc.clone());
        let rtt = match pc {
            Some(pc) => selected_pair(&pc).await.and_then(|(_, rtt)| rtt),
            // Reconnecting: no figures, the reconnect events say what is going on.
            None => continue,
        };
        if let Some(rtt) = rtt {
            shared
                .last_rtt_us
                .store(rtt.as_micros() as u64, Ordering::Relaxed);
        }
        let now = Instant::now();
        let samples: BTreeMap<SiteId, SiteSample> = shared
            .remote
            .sites
            .lock()
            .expect("lock poisoned")
            .iter()
            .map(|(site, c)| {
                let top = c.layers.keys().copied().max_by_key(|&(w, h)| w * h);
                let sample = SiteSample {
                    bytes: c.bytes,
                    audio_frames: c.audio_frames,
                    audio_lost: c.audio_repaired + c.audio_concealed,
                    size: c.last_size,
                    top,
                };
                (site.clone(), sample)
            })
            .collect();
        let dt = now - before.0;
        let sent = sent_bytes(&shared.counters);
        let counters = &shared.counters;
        let sending_video =
            shared.video_in.is_some() && !shared.capture_control.camera_off.load(Ordering::Relaxed);
        let send_size = sending_video.then(|| counters.video_size()).flatten();
        let reduced = sending_video && counters.video_layer.load(Ordering::Relaxed) > 1;
        let video_paused = sending_video && counters.video_paused.load(Ordering::Relaxed);
        let uplink_loss_pct = shared.link.loss_pct();
        let (packets, lost) = down(&shared.remote);
        let (packets_d, lost_d) = (packets - down_before.0, lost - down_before.1);
        down_before = (packets, lost);
        let downlink_loss_pct =
            (packets_d + lost_d > 0).then(|| 100.0 * lost_d as f64 / (packets_d + lost_d) as f64);
        sound_only_for_downlink(&shared, &mut gate, now, downlink_loss_pct);
        let quality = Quality {
            rtt_ms: rtt.map(|r| r.as_secs_f64() * 1000.0),
            uplink_loss_pct,
            downlink_loss_pct,
            estimate_bps: f64::from_bits(shared.bwe_bps.load(Ordering::Relaxed)) as u64,
            send_bps: (sent.saturating_sub(before.1) as f64 * 8.0 / dt.as_secs_f64().max(1e-3))
                as u64,
            send_size,
            reduced,
            video_paused,
            // The worse way counts.
            grade: Grade::of(
                uplink_loss_pct
                    .into_iter()
                    .chain(downlink_loss_pct)
                    .reduce(f64::max),
                rtt,
                reduced,
                video_paused,
            ),
            sites: quality::sites_between(&before.2, &samples, dt),
        };
        before = (now, sent, samples);
        let _ = shared.events.send(RoomEvent::Quality(quality));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_ip_follows_server_host() {
        assert_eq!(
            bind_ip_for("ws://127.0.0.1:7600"),
            IpAddr::from([127, 0, 0, 1])
        );
        assert_eq!(
            bind_ip_for("ws://localhost:7600/"),
            IpAddr::from([127, 0, 0, 1])
        );
        assert_eq!(
            bind_ip_for("ws://[::1]:7600"),
            "::1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            bind_ip_for("wss://hop.nghean.gov.vn"),
            IpAddr::from([0, 0, 0, 0])
        );
    }

    #[test]
    fn strips_only_udp_candidates() {
        let sdp = "v=0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 7600 typ host\r\na=candidate:2 1 tcp 1 127.0.0.1 7600 typ host tcptype passive\r\na=mid:0\r\n";
        let out = without_udp_candidates(sdp);
        assert!(!out.contains(" udp "));
        assert!(out.contains("tcptype passive"));
        assert!(out.contains("a=mid:0\r\n"));
    }
}
