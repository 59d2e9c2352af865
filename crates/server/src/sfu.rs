//! The media engine: one task owns every site's `str0m::Rtc`, the UDP socket and the ICE-TCP
//! connections, and forwards media between sites of a room.
//!
//! str0m is sans-IO: this task feeds it datagrams and time (`handle_input`) and acts on what
//! it says (`poll_output`: transmit, event, next timeout). Every mutation of an `Rtc` is
//! followed by draining its output, as str0m requires. Events are queued and handled after
//! the drain, so forwarding can touch several sites' `Rtc`s one at a time.
//!
//! Forwarding is in str0m's frame mode: a publisher's whole frames (`MediaData`) are written
//! to each subscriber's slot, and str0m repacketises, renumbers and answers NACKs per
//! subscriber.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diemcau_protocol::meeting::roll_call_csv;
use diemcau_protocol::padding::without_padding;
use diemcau_protocol::token::{Claims, Key, TokenError};
use diemcau_protocol::{
    ChairCommand, ClientMessage, Directory, ErrorCode, LeaveReason, Level, MediaKind as WireKind,
    MeetingSnapshot, RelaySite, Role, ServerMessage, SiteId, SiteInfo, SlotAssignment,
    PROTOCOL_VERSION, RELAY_UP_AUDIO, RELAY_UP_VIDEO,
};
use str0m::bwe::{Bitrate, BweKind};
use str0m::change::SdpOffer;
use str0m::media::{Direction, KeyframeRequestKind, MediaData, MediaKind, Mid};
use str0m::net::{DatagramRecv, Protocol, Receive, TcpType};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::audit::{AuditEntry, AuditLog};
use crate::meeting::Meeting;
use crate::slots;

/// Identifies one signalling connection (and the site joined on it).
pub type ConnId = u64;

/// What the signalling side and the TCP listener tell the engine.
#[derive(Debug)]
pub enum Command {
    Join {
        conn: ConnId,
        ask: JoinAsk,
        from: SocketAddr,
        to_client: mpsc::UnboundedSender<ServerMessage>,
    },
    Enroll {
        room: String,
        site: String,
        secret: String,
        from: SocketAddr,
        to_client: mpsc::UnboundedSender<ServerMessage>,
    },
    RaiseHand {
        conn: ConnId,
        /// A hand brought back after a restart: when it first went up.
        raised_at_ms: Option<u64>,
    },
    LowerHand {
        conn: ConnId,
    },
    Chair {
        conn: ConnId,
        id: u64,
        command: ChairCommand,
    },
    UnmuteReply {
        conn: ConnId,
        accept: bool,
    },
    Offer {
        conn: ConnId,
        sdp: String,
    },
    RequestKeyframe {
        conn: ConnId,
        site: String,
    },
    ReceiveVideo {
        conn: ConnId,
        on: bool,
    },
    Leave {
        conn: ConnId,
        reason: LeaveReason,
    },
    TcpOpened {
        peer: SocketAddr,
        tx: mpsc::Sender<Vec<u8>>,
    },
    TcpPacket {
        peer: SocketAddr,
        data: Vec<u8>,
    },
    TcpClosed {
        peer: SocketAddr,
    },
    /// A relay-only message from a relay's connection (parent side).
    FromRelay {
        conn: ConnId,
        msg: ClientMessage,
    },
    /// This server's own link to its parent room (relay side, [`crate::upstream`]).
    Uplink(UplinkEvent),
}

/// What the upstream task tells the engine about the link to the parent room.
#[derive(Debug)]
pub enum UplinkEvent {
    /// The parent answered our offer: the engine takes the `Rtc` and carries media on it.
    Linked {
        rtc: Box<Rtc>,
        /// Our send-only m-lines: pictures, then sounds, going up.
        up_video: Vec<Mid>,
        up_audio: Vec<Mid>,
        /// Messages for the parent.
        to_parent: mpsc::UnboundedSender<ClientMessage>,
        /// A fatal error here tells the task the link failed (it dials again).
        to_task: mpsc::UnboundedSender<ServerMessage>,
    },
    /// The parent's mapping of our receive slots.
    Slots(Vec<SlotAssignment>),
    Meeting {
        state: MeetingSnapshot,
        members: Vec<RelaySite>,
    },
    AskUnmute {
        site: SiteId,
        by: SiteId,
    },
    Remove {
        site: SiteId,
    },
    /// The signalling to the parent closed or failed.
    Down,
}

/// Counters for operators and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    /// Of `frames_out`, the pictures (video RTP payloads).
    pub video_frames_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub datagrams_in: AtomicU64,
    pub datagrams_out: AtomicU64,
    pub keyframe_requests: AtomicU64,
    pub sites: AtomicU64,
    /// Audio frames not forwarded because their site did not have the floor.
    pub audio_dropped_floor: AtomicU64,
    /// Media payload bytes received (all publishers, relays included).
    pub bytes_in: AtomicU64,
    /// Parent side: the most pictures / sounds one relay carried at once (mids that
    /// delivered a frame within the last second), over the server's life.
    pub relay_up_video_max: AtomicU64,
    pub relay_up_audio_max: AtomicU64,
    /// Relay side: times the link to the parent came up (media connected).
    pub uplinks: AtomicU64,
    /// Probe padding removed from pictures before forwarding (bytes; protocol §5).
    pub probe_bytes_in: AtomicU64,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub dev: bool,
    pub directory: Arc<Directory>,
    pub video_slots: u8,
    pub audio_slots: u8,
    /// Address put in the UDP host candidate (and expected as datagram destination).
    pub udp_candidate: SocketAddr,
    /// Address put in the passive TCP candidate.
    pub tcp_candidate: SocketAddr,
    /// A site whose media has not connected by then is dropped.
    pub connect_timeout: Duration,
    /// Key that signs and checks join tokens (production). A `--dev` server also accepts
    /// tokens signed with the public development key.
    pub key: Option<Key>,
    /// How long a token issued for an enrollment secret lasts.
    pub enrollment_ttl: Duration,
    /// Relay mode: this server's own site in the parent room (the district hall, whose
    /// picture always goes up) and the room it carries there.
    pub relay_site: Option<SiteId>,
    pub relay_room: Option<String>,
}

struct OutSlot {
    mid: Mid,
    holder: Option<ConnId>,
    /// Hold video until the holder's next keyframe (after a switch or loss).
    need_keyframe: bool,
    /// Video: the holder's layer being forwarded, and the one chosen for this slot
    /// ([`Engine::choose_layers`]); the slot moves to it on that layer's next keyframe.
    layer: usize,
    want: usize,
    /// Video: added to the holder's RTP time, so a layer switch keeps the slot's timestamps
    /// running on (each layer has its own timestamp base).
    shift: i64,
    /// The last frame written: its (shifted) RTP time and arrival.
    last_out: Option<(i64, Instant)>,
}

impl OutSlot {
    fn new(mid: Mid, video: bool) -> Self {
        OutSlot {
            mid,
            holder: None,
            need_keyframe: video,
            layer: 0,
            want: 0,
            shift: 0,
            last_out: None,
        }
    }

    /// A new holder: nothing forwarded of it yet, from its lowest layer until chosen.
    fn hold(&mut self, holder: Option<ConnId>, video: bool) {
        self.holder = holder;
        self.need_keyframe = video;
        self.layer = 0;
        self.want = 0;
        self.shift = 0;
        self.last_out = None;
    }
}

/// One spatial layer a site publishes: one of its send video m-lines (simulcast), all of
/// the same camera, the lowest first.
struct PubLayer {
    mid: Mid,
    /// Payload bytes since the last loudness tick, and the bitrate they average to.
    bytes: u64,
    rate_bps: f64,
    last_frame: Option<Instant>,
    last_keyframe_request: Option<Instant>,
    /// A keyframe request that came inside the throttle gap, sent when the gap ends.
    keyframe_pending: Option<KeyframeRequestKind>,
}

impl PubLayer {
    fn new(mid: Mid) -> Self {
        PubLayer {
            mid,
            bytes: 0,
            rate_bps: 0.0,
            last_frame: None,
            last_keyframe_request: None,
            keyframe_pending: None,
        }
    }

    /// The layer carried a frame lately (a publisher stops its top layers on a thin uplink).
    fn live(&self, now: Instant) -> bool {
        self.last_frame
            .is_some_and(|t| now.saturating_duration_since(t) < LAYER_LIVE)
    }
}

struct Peer {
    site: SiteInfo,
    role: Role,
    /// An operator's control session: not in the roster, no media.
    control: bool,
    from: SocketAddr,
    room: String,
    join_seq: u64,
    to_client: mpsc::UnboundedSender<ServerMessage>,
    rtc: Option<Rtc>,
    next_timeout: Instant,
    created: Instant,
    connected: bool,
    pub_audio: Option<Mid>,
    /// The pictures it publishes: one layer, or up to [`MAX_LAYERS`] (simulcast).
    video: Vec<PubLayer>,
    /// Subscriber: the bandwidth estimate towards it (str0m's TWCC estimator), bit/s.
    egress_bps: Option<f64>,
    /// Subscriber: the (minimum, desired) bitrates last given to its estimator.
    bwe_asked: (u64, u64),
    video_slots: Vec<OutSlot>,
    audio_slots: Vec<OutSlot>,
    /// Exponentially averaged audio payload bytes per 500 ms (Opus with DTX sends almost
    /// nothing in silence, so this follows speech).
    loudness: f64,
    audio_bytes: u64,
    /// The site asked for sound only (`receive_video` off): its video slots stay empty.
    video_off: bool,
    /// A relay's connection (parent side): not in the roster; carries the media of the
    /// sites behind it.
    relay: bool,
    /// This server's own link to its parent (relay side): not in the roster.
    uplink: bool,
    /// A site with no connection of its own: behind a relay (parent side), or a member of
    /// the parent's room (relay side). Its media comes and goes over `via`'s connection.
    via: Option<ConnId>,
    /// Relay and uplink: the member each incoming m-line carries now.
    sources: HashMap<Mid, ConnId>,
    /// Relay (parent side): the incoming m-lines used, by kind, within the bound.
    in_mids: Vec<(Mid, WireKind)>,
    /// Relay (parent side): when each incoming m-line last carried a frame.
    in_active: HashMap<Mid, Instant>,
    /// Relay and uplink: the mapping as last declared, applied again when m-lines or the
    /// sites it names appear later (the declaration can overtake both).
    declared: Vec<SlotAssignment>,
    /// Came back (`resume`) to a room that held nothing of it (this server restarted): its
    /// first `raise_hand` may bring its hand back at the time it first went up.
    may_restore_hand: bool,
}

impl Peer {
    /// A member with nothing negotiated yet.
    fn blank(
        site: SiteInfo,
        role: Role,
        room: String,
        from: SocketAddr,
        to_client: mpsc::UnboundedSender<ServerMessage>,
        join_seq: u64,
    ) -> Peer {
        let now = Instant::now();
        Peer {
            site,
            role,
            control: false,
            from,
            room,
            join_seq,
            to_client,
            rtc: None,
            next_timeout: now,
            created: now,
            connected: false,
            pub_audio: None,
            video: Vec::new(),
            egress_bps: None,
            bwe_asked: (0, 0),
            video_slots: Vec::new(),
            audio_slots: Vec::new(),
            loudness: 0.0,
            audio_bytes: 0,
            video_off: false,
            relay: false,
            uplink: false,
            via: None,
            sources: HashMap::new(),
            in_mids: Vec::new(),
            in_active: HashMap::new(),
            declared: Vec::new(),
            may_restore_hand: false,
        }
    }

    /// The m-line of its lowest picture layer.
    fn pub_video(&self) -> Option<Mid> {
        self.video.first().map(|l| l.mid)
    }

    /// A site in the room's roster (not a control session, a relay's or our uplink).
    fn in_roster(&self) -> bool {
        !self.control && !self.relay && !self.uplink
    }

    fn send(&self, msg: ServerMessage) {
        // A closed channel means the signalling task is gone; its Leave follows.
        let _ = self.to_client.send(msg);
    }
}

/// The engine task's state.
pub struct Engine {
    cfg: EngineConfig,
    udp: Arc<UdpSocket>,
    tcp: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    peers: HashMap<ConnId, Peer>,
    rooms: HashMap<String, Vec<ConnId>>,
    meetings: HashMap<String, Meeting>,
    audit: AuditLog,
    /// Remote transport address → peer, learned once `accepts` matched.
    routes: HashMap<(bool, SocketAddr), ConnId>,
    events: VecDeque<(ConnId, Event)>,
    /// Rooms whose slot assignments must be recomputed after the current events.
    dirty: HashSet<String>,
    stats: Arc<Stats>,
    next_seq: u64,
    last_loudness_tick: Instant,
    /// Sites whose connection dropped (not left), by room: they may resume into a room
    /// locked since, within [`RESUME_WINDOW`].
    dropped: HashMap<(String, SiteId), Instant>,
    /// When this server started: hands brought back after a restart must have gone up
    /// before it, and come back within [`RESUME_WINDOW`] of it.
    started: Instant,
    started_ms: u64,
    /// Relay side: the link to the parent, while there is one.
    uplink: Option<Uplink>,
    /// Ids for members with no signalling connection of their own (proxies, the uplink).
    next_internal: ConnId,
    /// Relay side: the link to the parent has been up at least once.
    uplink_was_up: bool,
    /// Relay side: whether the district chair wants the meeting joined to the parent's
    /// (the upstream task dials only while it is true).
    link: Option<tokio::sync::watch::Sender<bool>>,
}

/// Relay side: this server's link to its parent room.
struct Uplink {
    conn: ConnId,
    room: String,
    to_parent: mpsc::UnboundedSender<ClientMessage>,
    /// The district's own meeting state, kept while the parent's is mirrored; it comes
    /// back when the link is lost, so the district chair runs the meeting again.
    local: Meeting,
    /// The media path to the parent came up (sites were told "connected").
    connected: bool,
}

/// What a `join` asks for.
#[derive(Debug)]
pub struct JoinAsk {
    pub room: String,
    pub site: String,
    pub token: Option<String>,
    pub control: bool,
    pub resume: bool,
    pub relay: bool,
}

/// A hand brought back after a restart may have gone up at most this long ago (ms).
const DAY_MS: u64 = 24 * 3600 * 1000;

/// How long after a dropped connection a site may still resume into a locked room.
const RESUME_WINDOW: Duration = Duration::from_secs(15 * 60);

/// At most one keyframe request a second reaches a publisher: on a thin, lossy uplink each
/// keyframe costs several frames of its budget, and requests any closer make the encoder skip
/// frames until the picture stalls.
const KEYFRAME_REQUEST_GAP: Duration = Duration::from_millis(1000);
const LOUDNESS_TICK: Duration = Duration::from_millis(500);

/// Where each connection's bandwidth estimate starts (bit/s).
const BWE_START_BPS: u64 = 1_000_000;

/// A site sends at most this many picture layers (its send video m-lines beyond are unused).
pub const MAX_LAYERS: usize = 3;
/// A layer without a frame for this long is taken as stopped (its publisher's uplink is thin).
const LAYER_LIVE: Duration = Duration::from_millis(1500);
/// Going up a layer needs this much more room in the subscriber's estimate than the step
/// costs, so an estimate near a boundary does not flap between layers.
const LAYER_UP_MARGIN: f64 = 1.25;
/// Of a subscriber's estimate, what pictures may use: sound and RTP/RTCP overhead come first.
fn video_budget(estimate_bps: f64, audio_slots: usize) -> f64 {
    (estimate_bps * 0.9 - 40_000.0 * audio_slots as f64).max(0.0)
}

/// A publisher as [`Engine::choose_layers`] ranks it: its score, whether it is this relay's
/// own hall, and per layer (measured bitrate, still sent).
struct Ranked {
    score: f64,
    hall: bool,
    layers: Vec<(f64, bool)>,
}

/// One picture slot of a subscriber, for [`plan_layers`].
#[derive(Debug, Clone)]
struct LayerAsk {
    /// The holder's layers, lowest first: (measured bitrate, still sent).
    layers: Vec<(f64, bool)>,
    /// The layer forwarded now.
    current: usize,
    /// The subscriber's first-ranked picture (its speaker view): it may take the top layer;
    /// the others (thumbnails) take the lowest.
    main: bool,
}

/// What [`plan_layers`] chose: a layer per slot, and the picture bitrates to tell the
/// subscriber's estimator: what the choice uses (`minimum`: no padding beyond the media, so a
/// thin downlink is not filled up), and what it would use with room for every slot's best
/// layer (`desired`: str0m probes towards it now and then while the link is not full).
#[derive(Debug, Clone, PartialEq)]
struct LayerPlan {
    wants: Vec<usize>,
    minimum: f64,
    desired: f64,
}

/// Chooses a layer for each of a subscriber's picture slots (in rank order) within `budget`
/// (bit/s for pictures; `None` when not estimated yet): every slot its lowest layer still
/// sent, then, in rank order, a layer up at a time while the step fits. Going above the
/// layer forwarded now needs [`LAYER_UP_MARGIN`] times the step, so a choice does not flap.
fn plan_layers(slots: &[LayerAsk], budget: Option<f64>) -> LayerPlan {
    let top = |a: &LayerAsk| {
        if a.main {
            a.layers.len().saturating_sub(1)
        } else {
            0
        }
    };
    let rate = |a: &LayerAsk, l: usize| a.layers.get(l).map_or(0.0, |x| x.0);
    let lowest = |a: &LayerAsk| a.layers.iter().position(|x| x.1).unwrap_or(0);
    let best = |a: &LayerAsk| {
        (0..=top(a))
            .rev()
            .find(|l| a.layers.get(*l).is_some_and(|x| x.1))
            .unwrap_or(lowest(a))
    };
    let mut wants: Vec<usize> = slots.iter().map(lowest).collect();
    let mut used: f64 = slots.iter().zip(&wants).map(|(a, w)| rate(a, *w)).sum();
    let desired = slots.iter().map(|a| rate(a, best(a))).sum();
    for (n, a) in slots.iter().enumerate() {
        while let Some(next) = (wants[n] + 1..=top(a)).find(|l| a.layers[*l].1) {
            let step = rate(a, next) - rate(a, wants[n]);
            let margin = if next > a.current {
                LAYER_UP_MARGIN
            } else {
                1.0
            };
            if budget.is_some_and(|b| used + step * margin > b) {
                break;
            }
            used += step;
            wants[n] = next;
        }
    }
    LayerPlan {
        wants,
        minimum: used,
        desired,
    }
}

fn rtc_config() -> RtcConfig {
    let mut cfg = RtcConfig::new()
        .set_ice_lite(true)
        .clear_codecs()
        .enable_opus(true, false)
        .enable_bwe(Some(Bitrate::bps(BWE_START_BPS)));
    cfg.codec_config()
        .add_h264(108.into(), Some(109.into()), true, 0x42e01f);
    cfg
}

impl Engine {
    pub fn new(cfg: EngineConfig, udp: Arc<UdpSocket>, stats: Arc<Stats>, audit: AuditLog) -> Self {
        Engine {
            cfg,
            udp,
            tcp: HashMap::new(),
            peers: HashMap::new(),
            rooms: HashMap::new(),
            meetings: HashMap::new(),
            audit,
            routes: HashMap::new(),
            events: VecDeque::new(),
            dirty: HashSet::new(),
            stats,
            next_seq: 0,
            last_loudness_tick: Instant::now(),
            dropped: HashMap::new(),
            started: Instant::now(),
            started_ms: unix_ms(),
            uplink: None,
            next_internal: 1 << 62,
            uplink_was_up: false,
            link: None,
        }
    }

    /// Relay mode: the switch the district chair's `upstream` command turns.
    pub fn with_link_switch(mut self, link: tokio::sync::watch::Sender<bool>) -> Self {
        self.link = Some(link);
        self
    }

    /// Runs until the command channel closes.
    pub async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut buf = vec![0u8; 2048];
        let udp = self.udp.clone();
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                r = udp.recv_from(&mut buf) => match r {
                    Ok((n, from)) => {
                        self.stats.datagrams_in.fetch_add(1, Ordering::Relaxed);
                        self.datagram(Protocol::Udp, from, &buf[..n]);
                    }
                    Err(e) => debug!("udp recv: {e}"),
                },
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
            self.tick(Instant::now());
        }
        info!("media engine stopped");
    }

    fn next_deadline(&self) -> Instant {
        let now = Instant::now();
        let pending = self
            .peers
            .values()
            .any(|p| p.video.iter().any(|l| l.keyframe_pending.is_some()));
        let cap = now + Duration::from_millis(if pending { 20 } else { 100 });
        self.peers
            .values()
            .filter(|p| p.rtc.is_some())
            .map(|p| p.next_timeout)
            .min()
            .unwrap_or(cap)
            .min(cap)
            .max(now)
    }

    fn tick(&mut self, now: Instant) {
        let due: Vec<ConnId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.rtc.is_some() && p.next_timeout <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.with_rtc(id, |rtc| rtc.handle_input(Input::Timeout(now)).map(|_| ()));
        }
        // Media that never connected.
        let stale: Vec<ConnId> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.connected && now - p.created > self.cfg.connect_timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.drop_for_media(
                id,
                "no media connection (ICE over UDP and TCP failed)",
                LeaveReason::Dropped,
            );
        }
        self.flush_keyframe_requests(now);
        if now - self.last_loudness_tick >= LOUDNESS_TICK {
            self.last_loudness_tick = now;
            let rooms: Vec<String> = self.rooms.keys().cloned().collect();
            let per_s = 1.0 / LOUDNESS_TICK.as_secs_f64();
            for p in self.peers.values_mut() {
                p.loudness = 0.5 * p.loudness + 0.5 * p.audio_bytes as f64;
                p.audio_bytes = 0;
                for l in &mut p.video {
                    l.rate_bps = 0.5 * l.rate_bps + 0.5 * (l.bytes * 8) as f64 * per_s;
                    l.bytes = 0;
                }
            }
            for r in rooms {
                self.reassign(&r, WireKind::Audio);
                self.choose_layers(&r, true);
            }
        }
        self.process_events();
    }

    /// Runs a mutation on a peer's `Rtc` and drains its output; a failure disconnects it.
    fn with_rtc<F>(&mut self, id: ConnId, f: F)
    where
        F: FnOnce(&mut Rtc) -> Result<(), str0m::RtcError>,
    {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(rtc) = peer.rtc.as_mut() else {
            return;
        };
        if let Err(e) = f(rtc) {
            debug!(site = %peer.site.id, "rtc input: {e}");
        }
        loop {
            if !rtc.is_alive() {
                break;
            }
            match rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    peer.next_timeout = t;
                    break;
                }
                Ok(Output::Transmit(t)) => {
                    self.stats.datagrams_out.fetch_add(1, Ordering::Relaxed);
                    match t.proto {
                        Protocol::Udp => {
                            let _ = self.udp.try_send_to(&t.contents, t.destination);
                        }
                        Protocol::Tcp => {
                            if let Some(tx) = self.tcp.get(&t.destination) {
                                let _ = tx.try_send(t.contents.into());
                            }
                        }
                        _ => {}
                    }
                }
                Ok(Output::Event(e)) => self.events.push_back((id, e)),
                Err(e) => {
                    warn!(site = %peer.site.id, "rtc failed: {e}");
                    rtc.disconnect();
                    break;
                }
            }
        }
        if !rtc.is_alive() {
            self.events.push_back((id, Event::Closed));
        }
    }

    fn datagram(&mut self, proto: Protocol, from: SocketAddr, data: &[u8]) {
        let Ok(contents) = DatagramRecv::try_from(data) else {
            return;
        };
        let destination = match proto {
            Protocol::Udp => self.cfg.udp_candidate,
            _ => self.cfg.tcp_candidate,
        };
        let now = Instant::now();
        let input = Input::Receive(
            now,
            Receive {
                proto,
                source: from,
                destination,
                contents,
            },
        );
        let key = (proto == Protocol::Tcp, from);
        let cached = self.routes.get(&key).copied().filter(|id| {
            self.peers
                .get(id)
                .and_then(|p| p.rtc.as_ref())
                .is_some_and(|r| r.accepts(&input))
        });
        let target = cached.or_else(|| {
            self.peers
                .iter()
                .find(|(_, p)| p.rtc.as_ref().is_some_and(|r| r.accepts(&input)))
                .map(|(id, _)| *id)
        });
        let Some(id) = target else {
            return;
        };
        self.routes.insert(key, id);
        self.with_rtc(id, move |rtc| rtc.handle_input(input));
        self.process_events();
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Join {
                conn,
                ask,
                from,
                to_client,
            } => self.join(conn, ask, from, to_client),
            Command::Enroll {
                room,
                site,
                secret,
                from,
                to_client,
            } => self.enroll(room, site, secret, from, to_client),
            Command::RaiseHand { conn, raised_at_ms } => self.hand(conn, true, raised_at_ms),
            Command::LowerHand { conn } => self.hand(conn, false, None),
            Command::Chair { conn, id, command } => self.chair(conn, id, command),
            Command::UnmuteReply { conn, accept } => self.unmute_reply(conn, accept),
            Command::Offer { conn, sdp } => self.offer(conn, &sdp),
            Command::RequestKeyframe { conn, site } => {
                let target = self.peers.get(&conn).and_then(|p| {
                    self.rooms.get(&p.room).and_then(|members| {
                        members
                            .iter()
                            .find(|m| {
                                self.peers
                                    .get(m)
                                    .is_some_and(|q| q.in_roster() && q.site.id == site)
                            })
                            .copied()
                    })
                });
                if let Some(t) = target {
                    self.request_keyframe(t, KeyframeRequestKind::Pli);
                }
            }
            Command::ReceiveVideo { conn, on } => {
                if let Some(p) = self.peers.get_mut(&conn) {
                    if p.video_off == on {
                        p.video_off = !on;
                        info!(site = %p.site.id, on, "receive video");
                        let room = p.room.clone();
                        self.reassign(&room, WireKind::Video);
                    }
                }
            }
            Command::Leave { conn, reason } => self.remove(conn, reason),
            Command::TcpOpened { peer, tx } => {
                self.tcp.insert(peer, tx);
            }
            Command::TcpPacket { peer, data } => self.datagram(Protocol::Tcp, peer, &data),
            Command::TcpClosed { peer } => {
                self.tcp.remove(&peer);
                self.routes.remove(&(true, peer));
            }
            Command::FromRelay { conn, msg } => self.relay_message(conn, msg),
            Command::Uplink(ev) => self.uplink_event(ev),
        }
        self.process_events();
    }

    fn unmute_reply(&mut self, conn: ConnId, accept: bool) {
        let Some(p) = self.peers.get(&conn).filter(|p| !p.relay && !p.uplink) else {
            return;
        };
        let (room, site) = (p.room.clone(), p.site.id.clone());
        if let Some(u) = self.linked(&room) {
            let _ = u
                .to_parent
                .send(ClientMessage::RelayUnmuteReply { site, accept });
            return;
        }
        if self.meeting(&room).unmute_reply(&site, accept) {
            self.broadcast_meeting(&room);
        }
    }

    /// Relay side: the link to the parent, if it carries `room`.
    fn linked(&self, room: &str) -> Option<&Uplink> {
        self.uplink.as_ref().filter(|u| u.room == room)
    }

    /// The roster of a room as relay members: every site but those reached over `except`.
    fn roster(&self, room: &str, except: Option<ConnId>) -> Vec<RelaySite> {
        self.rooms
            .get(room)
            .into_iter()
            .flatten()
            .filter_map(|m| self.peers.get(m))
            .filter(|p| p.in_roster() && (p.via.is_none() || p.via != except))
            .map(|p| RelaySite {
                site: p.site.clone(),
                role: p.role,
            })
            .collect()
    }

    /// Relay side: tells the parent every site behind this relay (after a join or leave).
    fn tell_parent_sites(&self, room: &str) {
        if let Some(u) = self.linked(room) {
            let sites = self.roster(room, Some(u.conn));
            let _ = u.to_parent.send(ClientMessage::RelaySites { sites });
        }
    }

    /// The members reached over `via` (a relay's connection, or our uplink).
    fn reached_over(&self, via: ConnId) -> impl Iterator<Item = (ConnId, &Peer)> + '_ {
        self.peers
            .iter()
            .filter(move |(_, p)| p.via == Some(via))
            .map(|(id, p)| (*id, p))
    }

    /// The member behind `via` with this site id.
    fn proxy_of(&self, via: ConnId, site: &str) -> Option<ConnId> {
        self.reached_over(via)
            .find(|(_, p)| p.site.id == site)
            .map(|(id, _)| id)
    }

    /// Parent side: a message only a relay's connection may send.
    fn relay_message(&mut self, conn: ConnId, msg: ClientMessage) {
        let Some(p) = self.peers.get(&conn) else {
            return;
        };
        if !p.relay {
            p.send(ServerMessage::error(
                ErrorCode::Forbidden,
                "relay messages are for a relay's connection (join with relay: true)",
                false,
            ));
            return;
        }
        match msg {
            ClientMessage::RelaySites { sites } => self.sync_proxies(conn, sites),
            ClientMessage::RelaySources { sources } => self.set_sources(conn, &sources),
            ClientMessage::RelayHand { site, up } => {
                if let Some(x) = self.proxy_of(conn, &site) {
                    self.hand(x, up, None);
                }
            }
            ClientMessage::RelayUnmuteReply { site, accept } => {
                if let Some(x) = self.proxy_of(conn, &site) {
                    self.unmute_reply(x, accept);
                }
            }
            ClientMessage::RelayLeft { site } => {
                if let Some(x) = self.proxy_of(conn, &site) {
                    self.remove(x, LeaveReason::Left);
                }
            }
            _ => {}
        }
    }

    /// Makes the members reached over `via` exactly `sites`: new ones join the room (and
    /// are announced), missing ones leave it as `disconnected` (hands and floor kept).
    fn sync_proxies(&mut self, via: ConnId, sites: Vec<RelaySite>) {
        let Some(v) = self.peers.get(&via) else {
            return;
        };
        let (room, from, parent_side, relay_site) =
            (v.room.clone(), v.from, v.relay, v.site.id.clone());
        let current: Vec<(ConnId, SiteId)> = self
            .reached_over(via)
            .map(|(id, p)| (id, p.site.id.clone()))
            .collect();
        let mut changed = false;
        for (id, site) in &current {
            if !sites.iter().any(|s| s.site.id == *site) {
                self.remove(*id, LeaveReason::Disconnected);
                changed = true;
            }
        }
        for rs in sites {
            let id = rs.site.id.clone();
            if current.iter().any(|(_, s)| *s == id)
                || !diemcau_protocol::directory::is_valid_site_id(&id)
            {
                continue;
            }
            // A relay speaks for its own subtree only (a dev server takes any site).
            let known = self.cfg.directory.site_info(&id);
            if parent_side && !self.cfg.dev {
                let below = known
                    .as_ref()
                    .is_some_and(|i| id == relay_site || i.path.contains(&relay_site));
                if !below {
                    warn!(%id, relay = %relay_site, "relay named a site outside its district; ignored");
                    continue;
                }
            }
            let taken = self.rooms.get(&room).into_iter().flatten().any(|m| {
                self.peers
                    .get(m)
                    .is_some_and(|p| p.in_roster() && p.site.id == id)
            });
            if taken {
                warn!(%id, "a relay named a site already in the room; ignored");
                continue;
            }
            // A locked room takes back, through a relay, only sites that were in it.
            let returning = self
                .dropped
                .get(&(room.clone(), id.clone()))
                .is_some_and(|t| t.elapsed() < RESUME_WINDOW);
            if parent_side && self.meeting(&room).locked() && !returning {
                warn!(%id, %room, "room locked: a site behind a relay not let in");
                continue;
            }
            // Behind a relay the district hall is no chair of the parent's meeting.
            let role = match (parent_side, rs.role) {
                (true, Role::Chair) => Role::District,
                (_, r) => r,
            };
            let info = known.unwrap_or(rs.site);
            self.add_proxy(via, &room, from, info, role);
            changed = true;
        }
        if changed {
            self.reapply_sources(via);
            self.broadcast_meeting(&room);
            self.dirty.insert(room.clone());
            if parent_side {
                // Sites behind a relay below us are behind us too, for our own parent.
                self.tell_parent_sites(&room);
            }
        }
    }

    fn add_proxy(
        &mut self,
        via: ConnId,
        room: &str,
        from: SocketAddr,
        info: SiteInfo,
        role: Role,
    ) -> ConnId {
        let id = self.next_internal;
        self.next_internal += 1;
        info!(site = %info.id, %room, "site joined through a relay link");
        for m in self.rooms.get(room).into_iter().flatten() {
            if let Some(p) = self.peers.get(m) {
                p.send(ServerMessage::SiteJoined { site: info.clone() });
            }
        }
        self.next_seq += 1;
        // Its own messages go nowhere: its relay gets the whole room's state instead.
        let (tx, _) = mpsc::unbounded_channel();
        let site = info.id.clone();
        let mut p = Peer::blank(info, role, room.to_string(), from, tx, self.next_seq);
        p.via = Some(via);
        p.connected = true;
        self.peers.insert(id, p);
        self.rooms.entry(room.to_string()).or_default().push(id);
        self.dropped.remove(&(room.to_string(), site.clone()));
        self.meeting(room).saw(&site);
        self.stats
            .sites
            .store(self.peers.len() as u64, Ordering::Relaxed);
        id
    }

    /// Which member each of `via`'s incoming m-lines carries now (a relay's
    /// `relay_sources`, or the parent's `slots` for our uplink).
    fn set_sources(&mut self, via: ConnId, map: &[SlotAssignment]) {
        let Some(v) = self.peers.get(&via) else {
            return;
        };
        let room = v.room.clone();
        debug!(site = %v.site.id, ?map, "relay link sources");
        let declared = map.to_vec();
        let mut sources = HashMap::new();
        let mut by_member: HashMap<ConnId, (Option<Mid>, Option<Mid>)> = HashMap::new();
        for a in map {
            let Some(site) = &a.site else { continue };
            let mid = Mid::from(a.mid.as_str());
            // A relay's sources are only the m-lines within the bound, of their kind.
            if v.relay && !v.in_mids.contains(&(mid, a.kind)) {
                continue;
            }
            let Some(x) = self.proxy_of(via, site) else {
                continue;
            };
            if sources.contains_key(&mid) {
                continue;
            }
            let e = by_member.entry(x).or_default();
            match a.kind {
                WireKind::Video if e.0.is_none() => e.0 = Some(mid),
                WireKind::Audio if e.1.is_none() => e.1 = Some(mid),
                _ => continue,
            }
            sources.insert(mid, x);
        }
        let members: Vec<ConnId> = self.reached_over(via).map(|(id, _)| id).collect();
        let mut restart = Vec::new();
        for x in members {
            let (video, audio) = by_member.get(&x).copied().unwrap_or_default();
            let Some(p) = self.peers.get_mut(&x) else {
                continue;
            };
            if p.pub_video() != video && video.is_some() {
                restart.push(x);
            }
            // A member reached over a link sends one layer: the m-line that carries it (its
            // state — keyframe requests, rate — kept while the m-line stays the same).
            if p.pub_video() != video {
                p.video = video.into_iter().map(PubLayer::new).collect();
            }
            p.pub_audio = audio;
        }
        if let Some(v) = self.peers.get_mut(&via) {
            v.sources = sources;
            v.declared = declared;
        }
        // A picture that moved to another m-line starts a new stream: decoders need a
        // keyframe.
        for x in restart {
            self.hold_for_keyframe(&room, x, None);
            self.request_keyframe(x, KeyframeRequestKind::Pli);
        }
        self.dirty.insert(room);
    }

    /// Applies `via`'s last declared mapping again (its m-lines or sites came after it).
    fn reapply_sources(&mut self, via: ConnId) {
        let declared = self
            .peers
            .get(&via)
            .map(|v| v.declared.clone())
            .unwrap_or_default();
        if !declared.is_empty() {
            self.set_sources(via, &declared);
        }
    }

    /// Holds every subscriber's slot carrying `publisher` (its `layer`, or any) until its
    /// next keyframe.
    fn hold_for_keyframe(&mut self, room: &str, publisher: ConnId, layer: Option<usize>) {
        for m in self.rooms.get(room).into_iter().flatten() {
            if let Some(s) = self.peers.get_mut(m) {
                for slot in s
                    .video_slots
                    .iter_mut()
                    .filter(|s| s.holder == Some(publisher) && layer.is_none_or(|l| l == s.layer))
                {
                    slot.need_keyframe = true;
                }
            }
        }
    }

    /// Relay side: what the upstream task says about the link to the parent.
    fn uplink_event(&mut self, ev: UplinkEvent) {
        let Some(room) = self.cfg.relay_room.clone() else {
            return;
        };
        match ev {
            UplinkEvent::Linked {
                rtc,
                up_video,
                up_audio,
                to_parent,
                to_task,
            } => {
                if self.link.as_ref().is_some_and(|l| !*l.borrow()) {
                    // The district chair took the meeting out while this link was dialled.
                    drop(to_task);
                    return;
                }
                if let Some(old) = self.uplink.as_ref().map(|u| u.conn) {
                    self.remove(old, LeaveReason::Disconnected);
                }
                let id = self.next_internal;
                self.next_internal += 1;
                let site = self.cfg.relay_site.clone().unwrap_or_default();
                let info = self.cfg.directory.site_info(&site).unwrap_or(SiteInfo {
                    id: site.clone(),
                    name: site,
                    level: Level::District,
                    path: Vec::new(),
                    path_names: Vec::new(),
                });
                let mut p = Peer::blank(
                    info,
                    Role::District,
                    room.clone(),
                    self.cfg.udp_candidate,
                    to_task,
                    0,
                );
                p.uplink = true;
                p.rtc = Some(*rtc);
                p.video_slots = up_video
                    .into_iter()
                    .map(|m| OutSlot::new(m, true))
                    .collect();
                p.audio_slots = up_audio
                    .into_iter()
                    .map(|m| OutSlot::new(m, false))
                    .collect();
                self.peers.insert(id, p);
                self.rooms.entry(room.clone()).or_default().push(id);
                let local = self.meetings.get(&room).cloned().unwrap_or_default();
                self.uplink = Some(Uplink {
                    conn: id,
                    room: room.clone(),
                    to_parent,
                    local: local.clone(),
                    connected: false,
                });
                info!(%room, "linked to the parent room; sending our sites and hands");
                // Resynchronise: who is here, and the hands up here in their order.
                self.tell_parent_sites(&room);
                let here = self.roster(&room, Some(id));
                if let Some(u) = &self.uplink {
                    for (site, _) in local.hands() {
                        if here.iter().any(|r| r.site.id == *site) {
                            let _ = u.to_parent.send(ClientMessage::RelayHand {
                                site: site.clone(),
                                up: true,
                            });
                        }
                    }
                }
                self.dirty.insert(room);
                self.with_rtc(id, |_| Ok(()));
            }
            UplinkEvent::Slots(slots) => {
                if let Some(id) = self.uplink.as_ref().map(|u| u.conn) {
                    self.set_sources(id, &slots);
                }
            }
            UplinkEvent::Meeting { state, members } => {
                let Some(id) = self.uplink.as_ref().map(|u| u.conn) else {
                    return;
                };
                self.sync_proxies(id, members);
                self.meeting(&room).mirror(&state);
                self.broadcast_meeting(&room);
                self.dirty.insert(room);
            }
            UplinkEvent::AskUnmute { site, by } => self.ask_unmute_site(&room, &site, &by),
            UplinkEvent::Remove { site } => {
                self.remove_site(&room, &site, "the parent room's chair")
            }
            UplinkEvent::Down => {
                if let Some(id) = self.uplink.as_ref().map(|u| u.conn) {
                    self.remove(id, LeaveReason::Disconnected);
                }
            }
        }
    }

    /// Sends `ask_unmute` to a site of the room, or to the relay it is behind.
    fn ask_unmute_site(&mut self, room: &str, site: &str, by: &str) {
        for p in self
            .peers
            .values()
            .filter(|p| p.room == room && p.site.id == *site && p.in_roster())
        {
            match p.via.and_then(|v| self.peers.get(&v)) {
                Some(r) if r.relay => r.send(ServerMessage::RelayAskUnmute {
                    site: site.into(),
                    by: by.into(),
                }),
                Some(_) => {}
                None => p.send(ServerMessage::AskUnmute { by: by.into() }),
            }
        }
    }

    /// Removes a site from the room (fatal `removed` to it, or to its relay as
    /// `relay_remove`).
    fn remove_site(&mut self, room: &str, site: &str, by: &str) {
        let ids: Vec<ConnId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.room == room && p.site.id == *site && p.in_roster())
            .map(|(id, _)| *id)
            .collect();
        for pid in ids {
            if let Some(p) = self.peers.get(&pid) {
                p.send(ServerMessage::error(
                    ErrorCode::Removed,
                    format!("removed by the chair ({by})"),
                    true,
                ));
            }
            self.remove(pid, LeaveReason::Removed);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn join(
        &mut self,
        conn: ConnId,
        ask: JoinAsk,
        from: SocketAddr,
        to_client: mpsc::UnboundedSender<ServerMessage>,
    ) {
        let JoinAsk {
            room,
            site,
            token,
            control,
            resume,
            relay,
        } = ask;
        let relay = relay && !control;
        if self.peers.contains_key(&conn) {
            let _ = to_client.send(ServerMessage::error(
                ErrorCode::AlreadyJoined,
                "this connection has already joined",
                false,
            ));
            return;
        }
        let refuse = |me: &mut Self, code: ErrorCode, msg: String, role: Option<Role>| {
            warn!(%site, %room, %from, ?code, "join refused: {msg}");
            me.audit_entry(&room, &site, role, from, "join", None, Err(&msg));
            let _ = to_client.send(ServerMessage::error(code, msg, true));
        };
        if !diemcau_protocol::directory::is_valid_site_id(&site) || room.is_empty() {
            return refuse(
                self,
                ErrorCode::UnknownSite,
                format!("site id {site:?} or room {room:?} is not valid"),
                None,
            );
        }
        let role = match &token {
            Some(t) => match self.check_token(t, &site, &room) {
                Ok(c) => c.role,
                Err((code, msg)) => return refuse(self, code, msg, None),
            },
            None if self.cfg.dev && !control => {
                warn!(%site, %room, %from, "UNAUTHENTICATED dev join accepted (role commune)");
                Role::Commune
            }
            None => {
                return refuse(
                    self,
                    ErrorCode::Unauthenticated,
                    "a join token (or an enrollment) is required".into(),
                    None,
                )
            }
        };
        if relay && !matches!(role, Role::District | Role::Chair) && token.is_some() {
            return refuse(
                self,
                ErrorCode::Forbidden,
                format!("a relay needs a district or chair token; {site}'s role is {role:?}"),
                Some(role),
            );
        }
        // A relay replaces an earlier connection of the same relay; a site, the roster's
        // member of the same id.
        let present = |p: &Peer| {
            p.site.id == site && p.room == room && if relay { p.relay } else { p.in_roster() }
        };
        let old = self
            .peers
            .iter()
            .find(|(_, p)| present(p))
            .map(|(id, _)| *id);
        if let Some(via) = old.and_then(|o| self.peers.get(&o)).and_then(|p| p.via) {
            let through = self.peers.get(&via).map(|p| p.site.id.clone());
            return refuse(
                self,
                ErrorCode::SiteTaken,
                format!(
                    "site {site} is in room {room} through a relay ({})",
                    through.unwrap_or_default()
                ),
                Some(role),
            );
        }
        // A site coming back after a lost connection may enter a room locked while it was
        // away, if it was in the room (still held, or dropped within RESUME_WINDOW).
        let returning = resume
            && !control
            && (old.is_some()
                || self
                    .dropped
                    .get(&(room.clone(), site.clone()))
                    .is_some_and(|t| t.elapsed() < RESUME_WINDOW));
        if self.meeting(&room).locked() && role != Role::Chair && !returning {
            return refuse(
                self,
                ErrorCode::RoomLocked,
                format!("room {room} is locked"),
                Some(role),
            );
        }
        if let (Some(old), false) = (old, control) {
            if !resume {
                return refuse(
                    self,
                    ErrorCode::SiteTaken,
                    format!("site {site} is already in room {room}"),
                    Some(role),
                );
            }
            // The site is back on a new connection before the old one was noticed gone. The
            // old one is told (fatal, so a second machine with the same identity stops there
            // rather than taking the site back), and the takeover is audited.
            info!(%site, %room, "site resumed on a new connection; dropping the old one");
            if let Some(p) = self.peers.get(&old) {
                p.send(ServerMessage::error(
                    ErrorCode::SiteTaken,
                    "replaced by a newer connection of this site",
                    true,
                ));
            }
            self.audit_entry(&room, &site, Some(role), from, "resume", None, Ok(()));
            self.remove(old, LeaveReason::Disconnected);
        }
        self.dropped.remove(&(room.clone(), site.clone()));
        let members = self.rooms.entry(room.clone()).or_default();
        let info = self.cfg.directory.site_info(&site).unwrap_or(SiteInfo {
            id: site.clone(),
            name: site.clone(),
            level: Level::Commune,
            path: Vec::new(),
            path_names: Vec::new(),
        });
        let others: Vec<SiteInfo> = members
            .iter()
            .filter_map(|m| self.peers.get(m))
            .filter(|p| p.in_roster())
            .map(|p| p.site.clone())
            .collect();
        members.push(conn);
        if !control && !relay {
            for m in members.iter() {
                if let Some(p) = self.peers.get(m) {
                    p.send(ServerMessage::SiteJoined { site: info.clone() });
                }
            }
        }
        let _ = to_client.send(ServerMessage::Welcome {
            v: PROTOCOL_VERSION,
            room: room.clone(),
            you: info.clone(),
            role,
            video_slots: if control { 0 } else { self.cfg.video_slots },
            audio_slots: if control { 0 } else { self.cfg.audio_slots },
            sites: others,
        });
        self.next_seq += 1;
        // A relay's connection gives no commands and is nobody's chair.
        let role = if relay { Role::District } else { role };
        let mut peer = Peer::blank(info, role, room.clone(), from, to_client, self.next_seq);
        peer.control = control;
        peer.relay = relay;
        // Only a server that started lately can have lost what a returning site brings back.
        peer.may_restore_hand =
            resume && !control && !relay && self.started.elapsed() < RESUME_WINDOW;
        // A control session has no media to wait for.
        peer.connected = control;
        self.peers.insert(conn, peer);
        let action = if relay { "relay-join" } else { "join" };
        self.audit_entry(&room, &site, Some(role), from, action, None, Ok(()));
        if !control && !relay {
            self.meeting(&room).saw(&site);
            self.tell_parent_sites(&room);
        }
        self.stats
            .sites
            .store(self.peers.len() as u64, Ordering::Relaxed);
        self.send_meeting(&room, Some(conn));
    }

    /// Checks a token for `site` joining `room`: the production key first, then (dev only)
    /// the public development key.
    fn check_token(
        &self,
        token: &str,
        site: &str,
        room: &str,
    ) -> Result<Claims, (ErrorCode, String)> {
        let now = unix_ms() / 1000;
        let mut keys: Vec<Key> = self.cfg.key.iter().cloned().collect();
        if self.cfg.dev {
            keys.push(Key::dev());
        }
        // The first key's verdict is the one reported (the production key's, when there is
        // one); the dev key only ever adds acceptance.
        let mut first_err = None;
        let mut claims = None;
        for k in &keys {
            match k.verify(token, now) {
                Ok(c) => {
                    claims = Some(c);
                    break;
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let last = first_err.unwrap_or(TokenError::Malformed);
        let map = |e: TokenError| {
            let code = match e {
                TokenError::Expired(_) => ErrorCode::TokenExpired,
                TokenError::WrongRoom { .. } => ErrorCode::TokenWrongRoom,
                _ => ErrorCode::TokenInvalid,
            };
            (code, e.to_string())
        };
        let claims = claims.ok_or_else(|| map(last))?;
        claims.admits(site, room).map_err(map)?;
        if !self.cfg.directory.contains(site) {
            return Err((
                ErrorCode::UnknownSite,
                format!("site {site} is not in the directory"),
            ));
        }
        Ok(claims)
    }

    fn enroll(
        &mut self,
        room: String,
        site: String,
        secret: String,
        from: SocketAddr,
        to_client: mpsc::UnboundedSender<ServerMessage>,
    ) {
        let entry = self.cfg.directory.get(&site).cloned();
        let key = self.cfg.key.clone().or_else(|| self.cfg.dev.then(Key::dev));
        let ok = room != "*"
            && !room.is_empty()
            && entry
                .as_ref()
                .and_then(|e| e.secret.as_deref())
                .is_some_and(|s| {
                    !s.is_empty() && constant_time_eq(s.as_bytes(), secret.as_bytes())
                });
        match (entry, key, ok) {
            (Some(e), Some(key), true) => {
                let now = unix_ms() / 1000;
                let claims = Claims {
                    site: site.clone(),
                    role: e.enrollment_role(),
                    room: room.clone(),
                    iat: now,
                    exp: now + self.cfg.enrollment_ttl.as_secs(),
                };
                self.audit_entry(
                    &room,
                    &site,
                    Some(claims.role),
                    from,
                    "enroll",
                    None,
                    Ok(()),
                );
                let _ = to_client.send(ServerMessage::Enrolled {
                    token: key.sign(&claims),
                    exp: claims.exp,
                });
            }
            _ => {
                let msg = "unknown site or wrong enrollment secret".to_string();
                warn!(%site, %from, "enrollment refused");
                self.audit_entry(&room, &site, None, from, "enroll", None, Err(&msg));
                let _ = to_client.send(ServerMessage::error(ErrorCode::Unauthenticated, msg, true));
            }
        }
    }

    fn meeting(&mut self, room: &str) -> &mut Meeting {
        self.meetings.entry(room.to_string()).or_default()
    }

    #[allow(clippy::too_many_arguments)]
    fn audit_entry(
        &mut self,
        room: &str,
        actor: &str,
        role: Option<Role>,
        from: SocketAddr,
        action: &str,
        target: Option<&str>,
        outcome: Result<(), &str>,
    ) {
        // Refused joins carry whatever the client claimed: keep the log bounded.
        let cut = |s: &str| s.chars().take(80).collect::<String>();
        self.audit.record(&AuditEntry {
            ts_ms: unix_ms(),
            room: cut(room),
            actor: cut(actor),
            role: role.map(|r| format!("{r:?}").to_lowercase()),
            from: from.to_string(),
            action: action.into(),
            target: target.map(str::to_string),
            outcome: if outcome.is_ok() { "ok" } else { "refused" }.into(),
            reason: outcome.err().map(str::to_string),
        });
    }

    /// Sends every member of a room its view of the hands and the floor (and the chairs the
    /// roll-call, once one has started).
    fn broadcast_meeting(&mut self, room: &str) {
        self.send_meeting(room, None);
    }

    /// Sends the hands and floor views to every member, or only to `newcomer` (a join
    /// changes nobody else's view); the chairs also get the roll-call once one runs, since
    /// who is connected is part of it.
    fn send_meeting(&mut self, room: &str, newcomer: Option<ConnId>) {
        let members: Vec<ConnId> = self.rooms.get(room).cloned().unwrap_or_default();
        let meeting = self.meetings.get(room).cloned().unwrap_or_default();
        let directory = self.cfg.directory.clone();
        // A site in the room is described as it joined (a site from the parent's room, or
        // behind a relay, may be missing from this server's directory).
        let here: HashMap<&str, &SiteInfo> = members
            .iter()
            .filter_map(|m| self.peers.get(m))
            .filter(|p| p.in_roster())
            .map(|p| (p.site.id.as_str(), &p.site))
            .collect();
        let info = |s: &str| {
            here.get(s).map(|i| (*i).clone()).unwrap_or_else(|| {
                directory.site_info(s).unwrap_or(SiteInfo {
                    id: s.into(),
                    name: s.into(),
                    level: Level::Commune,
                    path: Vec::new(),
                    path_names: Vec::new(),
                })
            })
        };
        let roll = meeting
            .roll_call_started()
            .then(|| meeting.roll_call(&directory, &self.connected_sites(room)));
        let total = meeting.hand_count() as u32;
        let snapshot = meeting.snapshot();
        let upstream = (self.cfg.relay_room.as_deref() == Some(room))
            .then(|| self.linked(room).is_some_and(|u| u.connected));
        for m in &members {
            let Some(p) = self.peers.get(m) else { continue };
            if p.relay {
                // A relay gets the whole state (and who is here), whoever changed.
                p.send(ServerMessage::RelayMeeting {
                    state: snapshot.clone(),
                    members: self.roster(room, Some(*m)),
                });
                continue;
            }
            if p.via.is_some() || p.uplink {
                continue;
            }
            // A newcomer learns the link's state if it has ever been up (a relay still
            // dialling for the first time has nothing to report).
            if let (Some(connected), Some(c)) = (upstream, newcomer) {
                if c == *m && (connected || self.uplink_was_up) {
                    let chosen = !connected && self.link.as_ref().is_some_and(|l| !*l.borrow());
                    p.send(ServerMessage::Upstream { connected, chosen });
                }
            }
            if newcomer.is_none_or(|c| c == *m) {
                p.send(ServerMessage::Hands {
                    queue: meeting.hands_for(&p.site.id, self.role_here(p), info),
                    total,
                });
                p.send(ServerMessage::Floor {
                    state: meeting.floor_for(&p.site.id, self.role_here(p)),
                });
            }
            if let (Some(entries), Role::Chair) = (&roll, p.role) {
                p.send(ServerMessage::RollCall {
                    entries: entries.clone(),
                });
            }
        }
    }

    fn connected_sites(&self, room: &str) -> std::collections::BTreeSet<SiteId> {
        self.rooms
            .get(room)
            .into_iter()
            .flatten()
            .filter_map(|m| self.peers.get(m))
            .filter(|p| p.in_roster())
            .map(|p| p.site.id.clone())
            .collect()
    }

    fn hand(&mut self, conn: ConnId, up: bool, raised_at_ms: Option<u64>) {
        let Some(p) = self.peers.get_mut(&conn) else {
            return;
        };
        if !p.in_roster() {
            return;
        }
        // A hand brought back after a restart: only as the first hand command of a site
        // that came back (`resume`) within RESUME_WINDOW of this server's start, and only for
        // a time before that start (the hand went up on the server that was lost).
        let may = std::mem::take(&mut p.may_restore_hand);
        let restore = match raised_at_ms {
            Some(at) if may && at < self.started_ms => Some(at),
            Some(_) => return,
            None => None,
        };
        let (room, site) = (p.room.clone(), p.site.id.clone());
        if let Some(u) = self.linked(&room) {
            // The parent keeps the queue; its state comes back in `relay_meeting`.
            let _ = u.to_parent.send(ClientMessage::RelayHand { site, up });
            return;
        }
        let now = unix_ms();
        let changed = if let Some(at) = restore.filter(|at| now.saturating_sub(*at) < DAY_MS) {
            self.meeting(&room).raise_at(&site, at)
        } else if up {
            self.meeting(&room).raise(&site, now)
        } else {
            self.meeting(&room).lower(&site)
        };
        if changed {
            info!(%site, %room, up, "hand");
            self.broadcast_meeting(&room);
        }
    }

    fn chair(&mut self, conn: ConnId, id: u64, command: ChairCommand) {
        let Some(p) = self.peers.get(&conn) else {
            return;
        };
        let (room, actor, role, from) = (p.room.clone(), p.site.id.clone(), p.role, p.from);
        let to_actor = p.to_client.clone();
        let target = command.target().map(str::to_string);
        let result = if role != Role::Chair || p.relay || p.uplink {
            Err((
                ErrorCode::Forbidden,
                format!(
                    "only the chair may {}; this site's role is {role:?}",
                    command.name()
                ),
            ))
        } else if self.linked(&room).is_some() && !matches!(command, ChairCommand::Upstream { .. })
        {
            Err((
                ErrorCode::Forbidden,
                "this district is joined to the province meeting: the province chair runs it"
                    .into(),
            ))
        } else {
            self.apply_chair(conn, &room, &actor, id, &command)
        };
        let outcome = result.as_ref().map(|_| ()).map_err(|(_, m)| m.as_str());
        self.audit_entry(
            &room,
            &actor,
            Some(role),
            from,
            command.name(),
            target.as_deref(),
            outcome,
        );
        match result {
            Ok(()) => {
                let _ = to_actor.send(ServerMessage::Ack { id });
                self.broadcast_meeting(&room);
                // Floor and spotlight rank video slots.
                self.dirty.insert(room.clone());
            }
            Err((code, message)) => {
                let _ = to_actor.send(ServerMessage::Error {
                    code,
                    message,
                    fatal: false,
                    id: Some(id),
                });
            }
        }
    }

    /// Carries out a chair command that passed the role check.
    fn apply_chair(
        &mut self,
        conn: ConnId,
        room: &str,
        actor: &str,
        id: u64,
        command: &ChairCommand,
    ) -> Result<(), (ErrorCode, String)> {
        let present = self.connected_sites(room);
        let need_present = |site: &str| {
            if present.contains(site) {
                Ok(())
            } else {
                Err((
                    ErrorCode::NotInRoom,
                    format!("site {site} is not in room {room}"),
                ))
            }
        };
        match command {
            ChairCommand::FloorMode { mode } => self.meeting(room).set_mode(*mode),
            ChairCommand::Grant { site } => {
                need_present(site)?;
                self.meeting(room).grant(site);
            }
            ChairCommand::Revoke { site } => self.meeting(room).revoke(site),
            ChairCommand::Mute { site } => {
                need_present(site)?;
                self.meeting(room).mute(site);
            }
            ChairCommand::MuteAll => {
                let chairs: Vec<SiteId> = self.sites_with_role(room, Role::Chair);
                let others: Vec<&str> = present
                    .iter()
                    .filter(|s| !chairs.contains(s))
                    .map(String::as_str)
                    .collect();
                self.meeting(room).mute_all(others);
            }
            ChairCommand::AskUnmute { site } => {
                need_present(site)?;
                self.meeting(room).ask_unmute(site);
                self.ask_unmute_site(room, site, actor);
            }
            ChairCommand::Remove { site } => {
                need_present(site)?;
                self.remove_site(room, site, actor);
            }
            ChairCommand::Spotlight { site } => {
                if let Some(s) = site {
                    need_present(s)?;
                }
                self.meeting(room).set_spotlight(site.as_deref());
                self.dirty.insert(room.to_string());
            }
            ChairCommand::Lock { locked } => self.meeting(room).set_locked(*locked),
            ChairCommand::LowerHand { site } => {
                self.meeting(room).lower(site);
            }
            ChairCommand::LowerAll => {
                self.meeting(room).lower_all();
            }
            ChairCommand::RollCallStart => self.meeting(room).roll_call_start(unix_ms(), &present),
            ChairCommand::RollCallMark {
                site,
                present: is_present,
                reason,
            } => {
                if !self.cfg.directory.contains(site) {
                    return Err((
                        ErrorCode::UnknownSite,
                        format!("site {site} is not in the directory"),
                    ));
                }
                let m = self.meeting(room);
                if !m.roll_call_started() {
                    m.roll_call_start(unix_ms(), &present);
                }
                m.roll_call_mark(site, *is_present, reason.clone());
            }
            ChairCommand::Upstream { on } => {
                let relay_room = self.cfg.relay_room.as_deref() == Some(room);
                let Some(link) = self.link.as_ref().filter(|_| relay_room) else {
                    return Err((
                        ErrorCode::Forbidden,
                        format!(
                            "this server does not carry room {room} to a parent (no --upstream)"
                        ),
                    ));
                };
                link.send_replace(*on);
                info!(%room, on, "the district chair turned the link to the parent");
                if !*on {
                    if let Some(id) = self.uplink.as_ref().map(|u| u.conn) {
                        self.remove(id, LeaveReason::Left);
                    }
                }
            }
            ChairCommand::RollCallExport => {
                let entries = self
                    .meetings
                    .get(room)
                    .cloned()
                    .unwrap_or_default()
                    .roll_call(&self.cfg.directory, &present);
                if let Some(p) = self.peers.get(&conn) {
                    p.send(ServerMessage::RollCallCsv {
                        id,
                        csv: roll_call_csv(&entries),
                    });
                }
            }
        }
        Ok(())
    }

    fn sites_with_role(&self, room: &str, role: Role) -> Vec<SiteId> {
        self.peers
            .values()
            .filter(|p| p.room == room && p.in_roster() && self.role_here(p) == role)
            .map(|p| p.site.id.clone())
            .collect()
    }

    /// The role a member acts with in its room now: a relay's own chair is the district's
    /// chair only while the district meets alone; joined to the parent's meeting it is a
    /// district there (as the parent sees it), so both servers apply the same floor rules.
    fn role_here(&self, p: &Peer) -> Role {
        match p.role {
            Role::Chair if p.via.is_none() && self.linked(&p.room).is_some() => Role::District,
            r => r,
        }
    }

    fn offer(&mut self, conn: ConnId, sdp: &str) {
        let Some(peer) = self.peers.get_mut(&conn) else {
            return;
        };
        if peer.control {
            peer.send(ServerMessage::error(
                ErrorCode::Forbidden,
                "a control session carries no media",
                false,
            ));
            return;
        }
        if peer.rtc.is_some() {
            peer.send(ServerMessage::error(
                ErrorCode::BadSdp,
                "renegotiation is not supported; the first offer stands",
                false,
            ));
            return;
        }
        let offer = match SdpOffer::from_sdp_string(sdp) {
            Ok(o) => o,
            Err(e) => {
                warn!(site = %peer.site.id, "garbage SDP offer: {e}");
                peer.send(ServerMessage::error(
                    ErrorCode::BadSdp,
                    format!("SDP offer could not be parsed: {e}"),
                    false,
                ));
                return;
            }
        };
        let now = Instant::now();
        let mut rtc = rtc_config().build(now);
        let udp = Candidate::host(self.cfg.udp_candidate, "udp");
        let tcp = Candidate::builder()
            .tcp()
            .host(self.cfg.tcp_candidate)
            .tcptype(TcpType::Passive)
            .build();
        for c in [udp, tcp].into_iter().flatten() {
            rtc.add_local_candidate(c);
        }
        let answer = match rtc.sdp_api().accept_offer(offer) {
            Ok(a) => a,
            Err(e) => {
                warn!(site = %peer.site.id, "unusable SDP offer: {e}");
                peer.send(ServerMessage::error(
                    ErrorCode::BadSdp,
                    format!("SDP offer was not acceptable: {e}"),
                    false,
                ));
                return;
            }
        };
        peer.rtc = Some(rtc);
        peer.created = now;
        peer.send(ServerMessage::Answer {
            sdp: answer.to_sdp_string(),
        });
        // Drain. MediaAdded events (which m-lines publish, which are slots) come once
        // the media path is up, and mark the room for reassignment.
        self.with_rtc(conn, |_| Ok(()));
        self.process_events();
    }

    fn process_events(&mut self) {
        loop {
            while let Some((id, ev)) = self.events.pop_front() {
                self.event(id, ev);
            }
            let Some(room) = self.dirty.iter().next().cloned() else {
                break;
            };
            self.dirty.remove(&room);
            self.reassign(&room, WireKind::Video);
            self.reassign(&room, WireKind::Audio);
        }
    }

    fn event(&mut self, id: ConnId, ev: Event) {
        match ev {
            Event::Connected => {
                if self.uplink.as_ref().is_some_and(|u| u.conn == id) {
                    self.uplink_connected();
                }
                if let Some(p) = self.peers.get_mut(&id) {
                    info!(site = %p.site.id, "media connected");
                    p.connected = true;
                    // Ask every publisher this site receives for a fresh keyframe, and, over
                    // a relay link, every site behind it (requests made while the link was
                    // still opening were lost).
                    let mut holders: Vec<ConnId> =
                        p.video_slots.iter().filter_map(|s| s.holder).collect();
                    holders.extend(
                        self.reached_over(id)
                            .filter(|(_, q)| !q.video.is_empty())
                            .map(|(x, _)| x),
                    );
                    for h in holders {
                        self.request_keyframe(h, KeyframeRequestKind::Pli);
                    }
                }
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                self.drop_for_media(
                    id,
                    "media path lost (no ICE traffic)",
                    LeaveReason::Disconnected,
                );
            }
            Event::Closed if self.peers.contains_key(&id) => {
                self.remove(id, LeaveReason::Disconnected);
            }
            Event::MediaAdded(m) => {
                let Some(p) = self.peers.get_mut(&id) else {
                    return;
                };
                debug!(site = %p.site.id, mid = %m.mid, kind = ?m.kind, dir = ?m.direction, "m-line");
                self.dirty.insert(p.room.clone());
                if p.uplink {
                    // Our own offer: its m-lines were laid out when it was made.
                    return;
                }
                let wire = match m.kind {
                    MediaKind::Video => WireKind::Video,
                    MediaKind::Audio => WireKind::Audio,
                };
                let bound = match wire {
                    WireKind::Video => RELAY_UP_VIDEO,
                    WireKind::Audio => RELAY_UP_AUDIO,
                };
                if p.relay && m.direction == Direction::RecvOnly {
                    // A relay's send-only m-lines, within the bound; more are not used.
                    if p.in_mids.iter().filter(|(_, k)| *k == wire).count() < bound {
                        p.in_mids.push((m.mid, wire));
                        self.reapply_sources(id);
                    }
                    return;
                }
                match (m.direction, m.kind) {
                    (Direction::RecvOnly, MediaKind::Audio) if p.pub_audio.is_none() => {
                        p.pub_audio = Some(m.mid)
                    }
                    // Each further picture m-line is a higher layer of the same camera.
                    (Direction::RecvOnly, MediaKind::Video) if p.video.len() < MAX_LAYERS => {
                        p.video.push(PubLayer::new(m.mid))
                    }
                    (Direction::SendOnly, MediaKind::Video)
                        if p.video_slots.len() < usize::from(self.cfg.video_slots) =>
                    {
                        p.video_slots.push(OutSlot::new(m.mid, true))
                    }
                    (Direction::SendOnly, MediaKind::Audio)
                        if p.audio_slots.len() < usize::from(self.cfg.audio_slots) =>
                    {
                        p.audio_slots.push(OutSlot::new(m.mid, false))
                    }
                    (dir, kind) => {
                        debug!(site = %p.site.id, ?dir, ?kind, mid = %m.mid, "m-line not used")
                    }
                }
            }
            Event::MediaData(d) => self.forward(id, d),
            Event::KeyframeRequest(req) => {
                // The layer the slot forwards, and the one it is moving to.
                let holder = self.peers.get(&id).and_then(|p| {
                    p.video_slots
                        .iter()
                        .find(|s| s.mid == req.mid)
                        .and_then(|s| Some((s.holder?, s.layer, s.want)))
                });
                if let Some((h, layer, want)) = holder {
                    self.request_layer_keyframe(h, layer, req.kind);
                    if want != layer {
                        self.request_layer_keyframe(h, want, req.kind);
                    }
                }
            }
            Event::EgressBitrateEstimate(BweKind::Twcc { estimate, .. }) => {
                if let Some(p) = self.peers.get_mut(&id) {
                    p.egress_bps = Some(estimate.as_f64());
                }
            }
            _ => {}
        }
    }

    /// Asks a publisher for a keyframe on each of its layers some subscriber takes or waits
    /// for (the lowest when none does).
    fn request_keyframe(&mut self, publisher: ConnId, kind: KeyframeRequestKind) {
        for layer in self.layers_in_use(publisher) {
            self.request_layer_keyframe(publisher, layer, kind);
        }
    }

    /// The layers of `publisher` forwarded to, or chosen for, some subscriber's slot.
    fn layers_in_use(&self, publisher: ConnId) -> Vec<usize> {
        let Some(p) = self.peers.get(&publisher) else {
            return Vec::new();
        };
        let mut layers: Vec<usize> = self
            .rooms
            .get(&p.room)
            .into_iter()
            .flatten()
            .filter_map(|m| self.peers.get(m))
            .flat_map(|s| s.video_slots.iter())
            .filter(|x| x.holder == Some(publisher))
            .flat_map(|x| [x.layer, x.want])
            .filter(|l| *l < p.video.len())
            .collect();
        layers.sort_unstable();
        layers.dedup();
        if layers.is_empty() && !p.video.is_empty() {
            layers.push(0);
        }
        layers
    }

    /// Asks a publisher for a keyframe on one layer. Requests closer together than
    /// [`KEYFRAME_REQUEST_GAP`] are merged into one sent when the gap ends, never dropped:
    /// a subscriber whose slot waits for a keyframe would otherwise wait for the periodic one.
    fn request_layer_keyframe(
        &mut self,
        publisher: ConnId,
        layer: usize,
        kind: KeyframeRequestKind,
    ) {
        let now = Instant::now();
        let Some(p) = self.peers.get_mut(&publisher) else {
            return;
        };
        // A site behind a relay is asked through the relay's connection.
        let owner = p.via.unwrap_or(publisher);
        let Some(l) = p.video.get_mut(layer) else {
            return;
        };
        let mid = l.mid;
        if l.last_keyframe_request
            .is_some_and(|t| now - t < KEYFRAME_REQUEST_GAP)
        {
            // FIR outranks PLI when merging.
            if l.keyframe_pending != Some(KeyframeRequestKind::Fir) {
                l.keyframe_pending = Some(kind);
            }
            return;
        }
        l.keyframe_pending = None;
        l.last_keyframe_request = Some(now);
        self.stats.keyframe_requests.fetch_add(1, Ordering::Relaxed);
        self.with_rtc(owner, move |rtc| {
            let Some(mut w) = rtc.writer(mid) else {
                debug!(%mid, "no writer for the publisher's video");
                return Ok(());
            };
            // Fall back to PLI when the publisher did not negotiate FIR.
            let kind = if w.is_request_keyframe_possible(kind) {
                kind
            } else {
                KeyframeRequestKind::Pli
            };
            if w.is_request_keyframe_possible(kind) {
                w.request_keyframe(None, kind)
            } else {
                debug!(%mid, "publisher takes no keyframe requests");
                Ok(())
            }
        });
    }

    /// Sends merged keyframe requests whose throttle gap has ended.
    fn flush_keyframe_requests(&mut self, now: Instant) {
        let due: Vec<(ConnId, usize, KeyframeRequestKind)> = self
            .peers
            .iter()
            .flat_map(|(id, p)| {
                p.video.iter().enumerate().filter_map(move |(i, l)| {
                    let kind = l.keyframe_pending?;
                    let free = l
                        .last_keyframe_request
                        .is_none_or(|t| now - t >= KEYFRAME_REQUEST_GAP);
                    free.then_some((*id, i, kind))
                })
            })
            .collect();
        for (id, layer, kind) in due {
            self.request_layer_keyframe(id, layer, kind);
        }
    }

    fn forward(&mut self, from: ConnId, mut d: MediaData) {
        self.stats.frames_in.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_in
            .fetch_add(d.data.len() as u64, Ordering::Relaxed);
        // A relay's (or our uplink's) frames belong to the member its m-line carries now.
        let from = match self.peers.get_mut(&from) {
            Some(p) if p.relay => {
                if !p.in_mids.iter().any(|(m, _)| *m == d.mid) {
                    return;
                }
                let now = Instant::now();
                p.in_active.insert(d.mid, now);
                let live = |k: WireKind| {
                    p.in_mids
                        .iter()
                        .filter(|(m, kind)| {
                            *kind == k
                                && p.in_active
                                    .get(m)
                                    .is_some_and(|t| now - *t < Duration::from_secs(1))
                        })
                        .count() as u64
                };
                let (v, a) = (live(WireKind::Video), live(WireKind::Audio));
                self.stats
                    .relay_up_video_max
                    .fetch_max(v, Ordering::Relaxed);
                self.stats
                    .relay_up_audio_max
                    .fetch_max(a, Ordering::Relaxed);
                match p.sources.get(&d.mid) {
                    Some(x) => *x,
                    None => return,
                }
            }
            Some(p) if p.uplink => match p.sources.get(&d.mid) {
                Some(x) => *x,
                None => {
                    debug!(mid = %d.mid, "a frame from the parent on an unmapped m-line");
                    return;
                }
            },
            Some(_) => from,
            None => return,
        };
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        let via = p.via;
        let (kind, layer) = if let Some(i) = p.video.iter().position(|l| l.mid == d.mid) {
            // A sender's probe padding goes no further than here.
            if let Some((picture, removed)) = without_padding(&d.data) {
                d.data = picture.into();
                self.stats
                    .probe_bytes_in
                    .fetch_add(removed as u64, Ordering::Relaxed);
            }
            let l = &mut p.video[i];
            l.bytes += d.data.len() as u64;
            l.last_frame = Some(Instant::now());
            if d.is_keyframe() {
                // A merged request for this layer is answered already.
                l.keyframe_pending = None;
            }
            (WireKind::Video, i)
        } else if Some(d.mid) == p.pub_audio {
            (WireKind::Audio, 0)
        } else {
            return;
        };
        let room = p.room.clone();
        if kind == WireKind::Audio {
            // Floor control is enforced here: audio from a site without the floor goes
            // nowhere (and does not count as loudness for audio slots).
            // (`role_here`, inline: `p` is borrowed mutably.)
            let linked = self.uplink.as_ref().is_some_and(|u| u.room == room);
            let role = match p.role {
                Role::Chair if p.via.is_none() && linked => Role::District,
                r => r,
            };
            let allowed = self
                .meetings
                .get(&room)
                .is_none_or(|m| m.may_speak(&p.site.id, role));
            if !allowed {
                self.stats
                    .audio_dropped_floor
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            p.audio_bytes += d.data.len() as u64;
        }
        let keyframe = kind == WireKind::Video && d.is_keyframe();
        if kind == WireKind::Video && !d.contiguous && !keyframe {
            // A frame was lost before us: subscribers' decoders need a fresh start (a layer
            // no one takes is not asked: its keyframes would cost a thin uplink for nothing).
            self.hold_for_keyframe(&room, from, Some(layer));
            if self.layers_in_use(from).contains(&layer) {
                self.request_layer_keyframe(from, layer, KeyframeRequestKind::Pli);
            }
        }
        let members: Vec<ConnId> = self.rooms.get(&room).cloned().unwrap_or_default();
        // Never back over the link it came from.
        for sub in members
            .into_iter()
            .filter(|m| *m != from && Some(*m) != via)
        {
            let Some(s) = self.peers.get_mut(&sub) else {
                continue;
            };
            if !s.connected {
                continue;
            }
            let slots = match kind {
                WireKind::Video => &mut s.video_slots,
                WireKind::Audio => &mut s.audio_slots,
            };
            let Some(slot) = slots.iter_mut().find(|s| s.holder == Some(from)) else {
                continue;
            };
            if slot.layer != layer {
                // Another layer: taken at its keyframe when it is the one chosen.
                if !(slot.want == layer && keyframe) {
                    continue;
                }
                slot.layer = layer;
                slot.need_keyframe = false;
                // The new layer's timestamps go on from the old one's by the time between.
                slot.shift = match slot.last_out {
                    Some((out, at)) => {
                        let gap = d.network_time.saturating_duration_since(at);
                        let ticks = (gap.as_secs_f64() * f64::from(d.time.denom())) as i64;
                        out + ticks.max(1) - d.time.numer() as i64
                    }
                    None => 0,
                };
            } else if slot.need_keyframe {
                if !keyframe {
                    continue;
                }
                slot.need_keyframe = false;
            }
            let out = d.time.numer() as i64 + slot.shift;
            slot.last_out = Some((out, d.network_time));
            let mid = slot.mid;
            let data = d.data.clone();
            let time = str0m::media::MediaTime::new(out.max(0) as u64, d.time.frequency());
            let (params, wallclock) = (d.params, d.network_time);
            let len = data.len() as u64;
            let stats = self.stats.clone();
            self.with_rtc(sub, move |rtc| {
                let Some(w) = rtc.writer(mid) else {
                    return Ok(());
                };
                let Some(pt) = w.match_params(params) else {
                    return Ok(());
                };
                stats.frames_out.fetch_add(1, Ordering::Relaxed);
                if kind == WireKind::Video {
                    stats.video_frames_out.fetch_add(1, Ordering::Relaxed);
                }
                stats.bytes_out.fetch_add(len, Ordering::Relaxed);
                w.write(pt, wallclock, time, data)
            });
        }
    }

    /// Recomputes which publishers fill every subscriber's slots of one kind in a room and
    /// tells the subscribers whose mapping changed.
    fn reassign(&mut self, room: &str, kind: WireKind) {
        let members: Vec<ConnId> = self.rooms.get(room).cloned().unwrap_or_default();
        let meeting = self.meetings.get(room).cloned().unwrap_or_default();
        let relay_site = self.cfg.relay_site.clone();
        let uplink = self.uplink.as_ref().map(|u| u.conn);
        // Each publisher: its score, the link it is reached over, and whether it is this
        // relay's own hall (always among the pictures going up).
        let publishers: Vec<(ConnId, f64, Option<ConnId>, bool)> = members
            .iter()
            .filter_map(|m| self.peers.get(m).map(|p| (*m, p)))
            .filter(|(_, p)| match kind {
                WireKind::Video => !p.video.is_empty(),
                WireKind::Audio => p.pub_audio.is_some(),
            })
            .map(|(m, p)| {
                let score = match kind {
                    WireKind::Video => self.video_score(&meeting, p),
                    WireKind::Audio => p.loudness,
                };
                let hall = relay_site.as_deref() == Some(p.site.id.as_str()) && p.via.is_none();
                (m, score, p.via, hall)
            })
            .collect();
        // A relay's connection that names no site behind it gets nothing.
        let silent: Vec<ConnId> = members
            .iter()
            .filter(|m| {
                self.peers.get(m).is_some_and(|p| p.relay)
                    && self.reached_over(**m).next().is_none()
            })
            .copied()
            .collect();
        let mut keyframes = Vec::new();
        for sub in &members {
            let Some(s) = self.peers.get_mut(sub) else {
                continue;
            };
            let sound_only = kind == WireKind::Video && s.video_off || silent.contains(sub);
            let up = Some(*sub) == uplink;
            let cands: Vec<slots::Candidate<ConnId>> = publishers
                .iter()
                .filter(|(m, _, via, _)| m != sub && *via != Some(*sub) && !sound_only)
                .map(|(m, score, _, hall)| slots::Candidate {
                    key: *m,
                    score: if up && *hall { score + 1e10 } else { *score },
                })
                .collect();
            let out = match kind {
                WireKind::Video => &mut s.video_slots,
                WireKind::Audio => &mut s.audio_slots,
            };
            let mut holders: Vec<Option<ConnId>> = out.iter().map(|s| s.holder).collect();
            // Hysteresis for audio: a holder keeps its slot unless a challenger is clearly
            // louder, so equally loud sites do not swap slots every tick.
            let cands: Vec<slots::Candidate<ConnId>> = cands
                .into_iter()
                .map(|c| {
                    let held = holders.contains(&Some(c.key));
                    let score = if kind == WireKind::Audio && held {
                        c.score * 1.5 + 1.0
                    } else {
                        c.score
                    };
                    slots::Candidate { key: c.key, score }
                })
                .collect();
            let changed = slots::assign(&mut holders, &cands);
            if changed.is_empty() {
                continue;
            }
            for i in changed {
                out[i].hold(holders[i], kind == WireKind::Video);
                if holders[i].is_some() && kind == WireKind::Video {
                    keyframes.push((*sub, i));
                }
            }
            self.send_slots(*sub);
        }
        if kind == WireKind::Video {
            // New holders start on the layer chosen for them (asked for below).
            self.choose_layers(room, false);
        }
        // Each new holder is asked for a keyframe of the layer its slot waits for.
        let mut asks: Vec<(ConnId, usize)> = keyframes
            .into_iter()
            .filter_map(|(sub, i)| {
                let slot = self.peers.get(&sub)?.video_slots.get(i)?;
                Some((slot.holder?, slot.want))
            })
            .collect();
        asks.sort_unstable();
        asks.dedup();
        for (h, layer) in asks {
            self.request_layer_keyframe(h, layer, KeyframeRequestKind::Pli);
        }
    }

    /// How a publisher ranks for pictures: spotlight first, then the floor holders and the
    /// chair, then the earlier joiners.
    fn video_score(&self, meeting: &Meeting, p: &Peer) -> f64 {
        let mut score = -(p.join_seq as f64);
        if meeting.spotlight() == Some(p.site.id.as_str()) {
            score += 1e12;
        }
        let role = self.role_here(p);
        if role == Role::Chair
            || (meeting.mode() != diemcau_protocol::FloorMode::Open
                && meeting.may_speak(&p.site.id, role))
        {
            score += 1e9;
        }
        score
    }

    /// Chooses, for every subscriber's picture slots in a room, which layer of its holder to
    /// forward. The picture ranked first among a subscriber's (its speaker view) may take the
    /// top layer, the others (thumbnails) the lowest; all within what the subscriber's
    /// bandwidth estimate leaves for pictures, lowest layers first. A layer its publisher has
    /// stopped sending is not chosen. The estimator is told the rate the choice would like, so
    /// it probes towards it.
    ///
    /// On the 500 ms tick (`tick`) a slot still waiting for a keyframe (of a new layer or a
    /// new holder) asks again, so one lost request does not leave it waiting for the
    /// encoder's periodic keyframe (requests are throttled per layer).
    fn choose_layers(&mut self, room: &str, tick: bool) {
        let now = Instant::now();
        let members: Vec<ConnId> = self.rooms.get(room).cloned().unwrap_or_default();
        let meeting = self.meetings.get(room).cloned().unwrap_or_default();
        let uplink = self.uplink.as_ref().map(|u| u.conn);
        let relay_site = self.cfg.relay_site.clone();
        // Each publisher's rank (with the relay's own hall first on the uplink, as in
        // `reassign`) and, per layer, (rate, live).
        let publishers: HashMap<ConnId, Ranked> = members
            .iter()
            .filter_map(|m| Some((*m, self.peers.get(m)?)))
            .filter(|(_, p)| !p.video.is_empty())
            .map(|(m, p)| {
                let layers = p.video.iter().map(|l| (l.rate_bps, l.live(now))).collect();
                let hall = relay_site.as_deref() == Some(p.site.id.as_str()) && p.via.is_none();
                let score = self.video_score(&meeting, p);
                (
                    m,
                    Ranked {
                        score,
                        hall,
                        layers,
                    },
                )
            })
            .collect();
        let mut asks = Vec::new();
        for sub in &members {
            let Some(s) = self.peers.get_mut(sub) else {
                continue;
            };
            if s.video_slots.iter().all(|x| x.holder.is_none()) {
                continue;
            }
            let mut order: Vec<usize> = (0..s.video_slots.len())
                .filter(|i| {
                    s.video_slots[*i]
                        .holder
                        .is_some_and(|h| publishers.contains_key(&h))
                })
                .collect();
            let up = Some(*sub) == uplink;
            let rank = |i: &usize| {
                let h = s.video_slots[*i].holder.expect("filtered on holders");
                let r = &publishers[&h];
                -(if up && r.hall {
                    r.score + 1e10
                } else {
                    r.score
                })
            };
            order.sort_by(|a, b| rank(a).total_cmp(&rank(b)));
            // Sound first: as much as the sounds it receives now take.
            let sounds = s.audio_slots.iter().filter(|x| x.holder.is_some()).count();
            // Before the first estimate, the estimator's own start.
            let estimate = s.egress_bps.unwrap_or(BWE_START_BPS as f64);
            let budget = Some(video_budget(estimate, sounds));
            let choice = plan_layers(
                &order
                    .iter()
                    .enumerate()
                    .map(|(n, i)| {
                        let x = &s.video_slots[*i];
                        let h = x.holder.expect("filtered on holders");
                        LayerAsk {
                            layers: publishers[&h].layers.clone(),
                            current: x.layer,
                            main: n == 0,
                        }
                    })
                    .collect::<Vec<_>>(),
                budget,
            );
            for (i, want) in order.iter().zip(choice.wants) {
                let x = &mut s.video_slots[*i];
                let h = x.holder.expect("filtered on holders");
                // Nothing of this holder forwarded yet: it starts on the chosen layer (the
                // reassignment that gave it the slot asks for its keyframe).
                let fresh = x.need_keyframe && x.last_out.is_none();
                if fresh {
                    x.layer = want;
                }
                let changed = x.want != want;
                x.want = want;
                let waiting = x.layer != want || x.need_keyframe;
                if (changed && !fresh && x.layer != want) || (tick && waiting) {
                    asks.push((h, want));
                }
            }
            // In steps of 25 kbit/s: the measured rates move a little every tick.
            let step = |v: f64| (v / 25_000.0).round() as u64 * 25_000;
            let asked = (step(choice.minimum), step(choice.desired));
            if s.rtc.is_some() && s.bwe_asked != asked {
                s.bwe_asked = asked;
                // The minimum is the pictures' own rate, below what is sent with the sound,
                // so it never calls for padding; the desired rate is in estimate terms.
                let audio = 40_000.0 * sounds as f64;
                let min = Bitrate::bps(asked.0);
                let desired = Bitrate::bps(((asked.1 as f64 + audio) / 0.9) as u64);
                self.with_rtc(*sub, move |rtc| {
                    rtc.bwe().set_bitrate(min, desired);
                    Ok(())
                });
            }
        }
        asks.sort_unstable();
        asks.dedup();
        for (h, layer) in asks {
            self.request_layer_keyframe(h, layer, KeyframeRequestKind::Pli);
        }
    }

    /// Tells a subscriber its slots; for our uplink, tells the parent what goes up.
    fn send_slots(&self, sub: ConnId) {
        let msg = self.slots_message(sub);
        match (self.uplink.as_ref(), msg) {
            (Some(u), ServerMessage::Slots { slots }) if u.conn == sub => {
                let _ = u
                    .to_parent
                    .send(ClientMessage::RelaySources { sources: slots });
            }
            (_, msg) => {
                if let Some(s) = self.peers.get(&sub) {
                    s.send(msg);
                }
            }
        }
    }

    /// Relay side: the media path to the parent is up; the district's sites are told.
    fn uplink_connected(&mut self) {
        let Some(u) = self.uplink.as_mut() else {
            return;
        };
        if u.connected {
            return;
        }
        u.connected = true;
        self.uplink_was_up = true;
        self.stats.uplinks.fetch_add(1, Ordering::Relaxed);
        info!(room = %u.room, "link to the parent room is up");
        self.tell_upstream(true);
    }

    /// Tells this relay's own sites (not those of the parent) whether the parent is linked
    /// (and, when not, whether the district chair chose so).
    fn tell_upstream(&self, connected: bool) {
        let chosen = !connected && self.link.as_ref().is_some_and(|l| !*l.borrow());
        let Some(room) = self.cfg.relay_room.as_deref() else {
            return;
        };
        for m in self.rooms.get(room).into_iter().flatten() {
            if let Some(p) = self.peers.get(m) {
                if p.in_roster() && p.via.is_none() {
                    p.send(ServerMessage::Upstream { connected, chosen });
                }
            }
        }
    }

    fn slots_message(&self, sub: ConnId) -> ServerMessage {
        let Some(s) = self.peers.get(&sub) else {
            return ServerMessage::Slots { slots: Vec::new() };
        };
        let site_of =
            |h: Option<ConnId>| h.and_then(|h| self.peers.get(&h).map(|p| p.site.id.clone()));
        let slots = s
            .video_slots
            .iter()
            .map(|o| (o, WireKind::Video))
            .chain(s.audio_slots.iter().map(|o| (o, WireKind::Audio)))
            .map(|(o, kind)| SlotAssignment {
                mid: o.mid.to_string(),
                kind,
                site: site_of(o.holder),
            })
            .collect();
        ServerMessage::Slots { slots }
    }

    /// Tells a site its media failed (fatal `media_timeout`) and removes it.
    fn drop_for_media(&mut self, id: ConnId, why: &str, reason: LeaveReason) {
        if let Some(p) = self.peers.get(&id) {
            warn!(site = %p.site.id, "{why}; dropping the site");
            p.send(ServerMessage::error(ErrorCode::MediaTimeout, why, true));
        }
        self.remove(id, reason);
    }

    fn remove(&mut self, id: ConnId, reason: LeaveReason) {
        let Some(mut p) = self.peers.remove(&id) else {
            return;
        };
        if let Some(rtc) = p.rtc.as_mut() {
            rtc.disconnect();
        }
        self.routes.retain(|_, v| *v != id);
        info!(site = %p.site.id, room = %p.room, ?reason, "site left");
        let room = p.room.clone();
        // The sites a relay (or our uplink) carried go with it.
        let carried: Vec<ConnId> = self.reached_over(id).map(|(x, _)| x).collect();
        for x in carried {
            self.remove(x, reason);
        }
        if p.uplink && self.uplink.as_ref().is_some_and(|u| u.conn == id) {
            self.uplink_lost();
        }
        let parent_relay = p.via.and_then(|v| self.peers.get(&v)).filter(|r| r.relay);
        if let (Some(r), LeaveReason::Removed) = (parent_relay, reason) {
            r.send(ServerMessage::RelayRemove {
                site: p.site.id.clone(),
            });
        }
        let through_uplink = p.via.is_some() && p.via == self.uplink.as_ref().map(|u| u.conn);
        if p.in_roster() && !through_uplink {
            if let (Some(u), LeaveReason::Left | LeaveReason::Removed) =
                (self.linked(&room), reason)
            {
                let _ = u.to_parent.send(ClientMessage::RelayLeft {
                    site: p.site.id.clone(),
                });
            }
        }
        // A site that left on purpose (or was removed) gives up its hand and floor; one that
        // dropped keeps them for when it comes back.
        if p.in_roster() && matches!(reason, LeaveReason::Left | LeaveReason::Removed) {
            self.meeting(&room).forget(&p.site.id);
        }
        if (p.in_roster() || p.relay)
            && matches!(reason, LeaveReason::Disconnected | LeaveReason::Dropped)
        {
            let now = Instant::now();
            self.dropped
                .retain(|_, t| now.duration_since(*t) < RESUME_WINDOW);
            self.dropped.insert((room.clone(), p.site.id.clone()), now);
        }
        if let Some(members) = self.rooms.get_mut(&room) {
            members.retain(|m| *m != id);
            if members.is_empty() {
                self.rooms.remove(&room);
            }
        }
        if p.in_roster() {
            for m in self.rooms.get(&room).into_iter().flatten() {
                if let Some(q) = self.peers.get(m) {
                    q.send(ServerMessage::SiteLeft {
                        site: p.site.id.clone(),
                        reason,
                    });
                }
            }
            if !through_uplink {
                self.tell_parent_sites(&room);
            }
        }
        self.stats
            .sites
            .store(self.peers.len() as u64, Ordering::Relaxed);
        self.reassign(&room, WireKind::Video);
        self.reassign(&room, WireKind::Audio);
        self.broadcast_meeting(&room);
    }
}

impl Engine {
    /// Relay side: the link to the parent is gone. The district's own meeting state comes
    /// back (its chair runs the meeting again), with the hands its sites still have up in
    /// the parent's queue order, and its sites are told.
    fn uplink_lost(&mut self) {
        let Some(u) = self.uplink.take() else {
            return;
        };
        warn!(room = %u.room, "link to the parent room lost; the district meeting carries on");
        let here = self.roster(&u.room, None);
        let mut restored = u.local;
        restored.lower_all();
        if let Some(m) = self.meetings.get(&u.room) {
            for (site, at) in m.hands() {
                if here.iter().any(|r| r.site.id == *site) {
                    restored.raise(site, *at);
                }
            }
        }
        self.meetings.insert(u.room.clone(), restored);
        if u.connected {
            self.tell_upstream(false);
        }
        self.dirty.insert(u.room);
    }
}

/// Milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Compares secrets without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(layers: &[(f64, bool)], current: usize, main: bool) -> LayerAsk {
        LayerAsk {
            layers: layers.to_vec(),
            current,
            main,
        }
    }

    /// A 640x360 camera in two layers: 320x180 at 60 kbit/s, 640x360 at 300.
    const TWO: [(f64, bool); 2] = [(60_000.0, true), (300_000.0, true)];

    #[test]
    fn the_speaker_view_takes_the_top_layer_and_thumbnails_the_lowest() {
        let slots = [ask(&TWO, 0, true), ask(&TWO, 0, false), ask(&TWO, 0, false)];
        let plan = plan_layers(&slots, None);
        assert_eq!(plan.wants, vec![1, 0, 0]);
        assert_eq!(plan.desired, 420_000.0);
        assert_eq!(plan.minimum, 420_000.0);
        // Room for the thumbnails and the step up, with its margin.
        assert_eq!(plan_layers(&slots, Some(500_000.0)).wants, vec![1, 0, 0]);
    }

    #[test]
    fn a_thin_estimate_keeps_the_lowest_layers_and_asks_for_more_without_padding() {
        let slots = [ask(&TWO, 0, true), ask(&TWO, 0, false)];
        // 120 for the thumbnails; the step (240) needs 300 with the margin: not there.
        let plan = plan_layers(&slots, Some(400_000.0));
        assert_eq!(plan.wants, vec![0, 0]);
        assert_eq!(plan.minimum, 120_000.0);
        assert_eq!(plan.desired, 360_000.0);
        // Forwarded already: keeping it needs no margin (no flapping at the boundary).
        let slots = [ask(&TWO, 1, true), ask(&TWO, 0, false)];
        assert_eq!(plan_layers(&slots, Some(400_000.0)).wants, vec![1, 0]);
        assert_eq!(plan_layers(&slots, Some(350_000.0)).wants, vec![0, 0]);
        // Below even the lowest layers: they are kept (the site decides to go sound-only).
        assert_eq!(plan_layers(&slots, Some(50_000.0)).wants, vec![0, 0]);
    }

    #[test]
    fn a_layer_the_publisher_stopped_is_not_chosen() {
        let thin = [(60_000.0, true), (300_000.0, false)];
        let plan = plan_layers(&[ask(&thin, 1, true)], None);
        assert_eq!(plan.wants, vec![0]);
        // Only the top one still comes (the lowest stalled): that one.
        let odd = [(60_000.0, false), (300_000.0, true)];
        assert_eq!(plan_layers(&[ask(&odd, 0, false)], None).wants, vec![1]);
        // A single-layer publisher.
        assert_eq!(
            plan_layers(&[ask(&[(200_000.0, true)], 0, true)], Some(1.0)).wants,
            vec![0]
        );
    }

    #[test]
    fn three_layers_climb_one_step_at_a_time_within_the_budget() {
        let hd = [(100_000.0, true), (300_000.0, true), (900_000.0, true)];
        let slots = [ask(&hd, 0, true)];
        assert_eq!(plan_layers(&slots, Some(200_000.0)).wants, vec![0]);
        assert_eq!(plan_layers(&slots, Some(360_000.0)).wants, vec![1]);
        assert_eq!(plan_layers(&slots, Some(1_200_000.0)).wants, vec![2]);
    }
}
