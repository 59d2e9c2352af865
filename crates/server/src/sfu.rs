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

use diemcau_protocol::{
    Directory, ErrorCode, LeaveReason, Level, MediaKind as WireKind, Role, ServerMessage, SiteInfo,
    SlotAssignment, PROTOCOL_VERSION,
};
use str0m::bwe::Bitrate;
use str0m::change::SdpOffer;
use str0m::media::{Direction, KeyframeRequestKind, MediaData, MediaKind, Mid};
use str0m::net::{DatagramRecv, Protocol, Receive, TcpType};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::slots;

/// Identifies one signalling connection (and the site joined on it).
pub type ConnId = u64;

/// What the signalling side and the TCP listener tell the engine.
#[derive(Debug)]
pub enum Command {
    Join {
        conn: ConnId,
        room: String,
        site: String,
        from: SocketAddr,
        to_client: mpsc::UnboundedSender<ServerMessage>,
    },
    Offer {
        conn: ConnId,
        sdp: String,
    },
    RequestKeyframe {
        conn: ConnId,
        site: String,
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
}

/// Counters for operators and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub datagrams_in: AtomicU64,
    pub datagrams_out: AtomicU64,
    pub keyframe_requests: AtomicU64,
    pub sites: AtomicU64,
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
}

struct OutSlot {
    mid: Mid,
    holder: Option<ConnId>,
    /// Hold video until the holder's next keyframe (after a switch or loss).
    need_keyframe: bool,
}

struct Peer {
    site: SiteInfo,
    room: String,
    join_seq: u64,
    to_client: mpsc::UnboundedSender<ServerMessage>,
    rtc: Option<Rtc>,
    next_timeout: Instant,
    created: Instant,
    connected: bool,
    pub_audio: Option<Mid>,
    pub_video: Option<Mid>,
    video_slots: Vec<OutSlot>,
    audio_slots: Vec<OutSlot>,
    /// Exponentially averaged audio payload bytes per 500 ms (Opus with DTX sends almost
    /// nothing in silence, so this follows speech).
    loudness: f64,
    audio_bytes: u64,
    last_keyframe_request: Option<Instant>,
}

impl Peer {
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
    /// Remote transport address → peer, learned once `accepts` matched.
    routes: HashMap<(bool, SocketAddr), ConnId>,
    events: VecDeque<(ConnId, Event)>,
    /// Rooms whose slot assignments must be recomputed after the current events.
    dirty: HashSet<String>,
    stats: Arc<Stats>,
    next_seq: u64,
    last_loudness_tick: Instant,
}

const KEYFRAME_REQUEST_GAP: Duration = Duration::from_millis(300);
const LOUDNESS_TICK: Duration = Duration::from_millis(500);

fn rtc_config() -> RtcConfig {
    let mut cfg = RtcConfig::new()
        .set_ice_lite(true)
        .clear_codecs()
        .enable_opus(true, false)
        .enable_bwe(Some(Bitrate::kbps(1_000)));
    cfg.codec_config()
        .add_h264(108.into(), Some(109.into()), true, 0x42e01f);
    cfg
}

impl Engine {
    pub fn new(cfg: EngineConfig, udp: Arc<UdpSocket>, stats: Arc<Stats>) -> Self {
        Engine {
            cfg,
            udp,
            tcp: HashMap::new(),
            peers: HashMap::new(),
            rooms: HashMap::new(),
            routes: HashMap::new(),
            events: VecDeque::new(),
            dirty: HashSet::new(),
            stats,
            next_seq: 0,
            last_loudness_tick: Instant::now(),
        }
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
        let cap = now + Duration::from_millis(100);
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
            if let Some(p) = self.peers.get(&id) {
                warn!(site = %p.site.id, "media did not connect in time; dropping the site");
                p.send(ServerMessage::error(
                    ErrorCode::MediaTimeout,
                    "no media connection (ICE over UDP and TCP failed)",
                    true,
                ));
            }
            self.remove(id, LeaveReason::Dropped);
        }
        if now - self.last_loudness_tick >= LOUDNESS_TICK {
            self.last_loudness_tick = now;
            let rooms: Vec<String> = self.rooms.keys().cloned().collect();
            for p in self.peers.values_mut() {
                p.loudness = 0.5 * p.loudness + 0.5 * p.audio_bytes as f64;
                p.audio_bytes = 0;
            }
            for r in rooms {
                self.reassign(&r, WireKind::Audio);
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
                room,
                site,
                from,
                to_client,
            } => self.join(conn, room, site, from, to_client),
            Command::Offer { conn, sdp } => self.offer(conn, &sdp),
            Command::RequestKeyframe { conn, site } => {
                let target = self.peers.get(&conn).and_then(|p| {
                    self.rooms.get(&p.room).and_then(|members| {
                        members
                            .iter()
                            .find(|m| self.peers.get(m).is_some_and(|q| q.site.id == site))
                            .copied()
                    })
                });
                if let Some(t) = target {
                    self.request_keyframe(t, KeyframeRequestKind::Pli);
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
        }
        self.process_events();
    }

    fn join(
        &mut self,
        conn: ConnId,
        room: String,
        site: String,
        from: SocketAddr,
        to_client: mpsc::UnboundedSender<ServerMessage>,
    ) {
        let refuse = |code: ErrorCode, msg: String| {
            let _ = to_client.send(ServerMessage::error(code, msg, true));
        };
        if self.peers.contains_key(&conn) {
            let _ = to_client.send(ServerMessage::error(
                ErrorCode::AlreadyJoined,
                "this connection has already joined",
                false,
            ));
            return;
        }
        if !self.cfg.dev {
            warn!(%site, %from, "refused: this server needs join tokens");
            return refuse(
                ErrorCode::Unauthenticated,
                "this server accepts only authenticated joins".into(),
            );
        }
        if !diemcau_protocol::directory::is_valid_site_id(&site) || room.is_empty() {
            return refuse(
                ErrorCode::UnknownSite,
                format!("site id {site:?} or room {room:?} is not valid"),
            );
        }
        let members = self.rooms.entry(room.clone()).or_default();
        if members
            .iter()
            .any(|m| self.peers.get(m).is_some_and(|p| p.site.id == site))
        {
            warn!(%site, %room, %from, "refused: site is already in the room");
            return refuse(
                ErrorCode::SiteTaken,
                format!("site {site} is already in room {room}"),
            );
        }
        let info = self.cfg.directory.site_info(&site).unwrap_or(SiteInfo {
            id: site.clone(),
            name: site.clone(),
            level: Level::Commune,
            path: Vec::new(),
        });
        warn!(site = %site, %room, %from, "UNAUTHENTICATED dev join accepted");
        let others: Vec<SiteInfo> = members
            .iter()
            .filter_map(|m| self.peers.get(m).map(|p| p.site.clone()))
            .collect();
        members.push(conn);
        for m in members.iter() {
            if let Some(p) = self.peers.get(m) {
                p.send(ServerMessage::SiteJoined { site: info.clone() });
            }
        }
        let _ = to_client.send(ServerMessage::Welcome {
            v: PROTOCOL_VERSION,
            room: room.clone(),
            you: info.clone(),
            role: Role::Commune,
            video_slots: self.cfg.video_slots,
            audio_slots: self.cfg.audio_slots,
            sites: others,
        });
        self.next_seq += 1;
        let now = Instant::now();
        self.peers.insert(
            conn,
            Peer {
                site: info,
                room,
                join_seq: self.next_seq,
                to_client,
                rtc: None,
                next_timeout: now,
                created: now,
                connected: false,
                pub_audio: None,
                pub_video: None,
                video_slots: Vec::new(),
                audio_slots: Vec::new(),
                loudness: 0.0,
                audio_bytes: 0,
                last_keyframe_request: None,
            },
        );
        self.stats
            .sites
            .store(self.peers.len() as u64, Ordering::Relaxed);
    }

    fn offer(&mut self, conn: ConnId, sdp: &str) {
        let Some(peer) = self.peers.get_mut(&conn) else {
            return;
        };
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
                if let Some(p) = self.peers.get_mut(&id) {
                    info!(site = %p.site.id, "media connected");
                    p.connected = true;
                    // Ask every publisher this site receives for a fresh keyframe.
                    let holders: Vec<ConnId> =
                        p.video_slots.iter().filter_map(|s| s.holder).collect();
                    for h in holders {
                        self.request_keyframe(h, KeyframeRequestKind::Pli);
                    }
                }
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                if let Some(p) = self.peers.get(&id) {
                    warn!(site = %p.site.id, "media path lost");
                    p.send(ServerMessage::error(
                        ErrorCode::MediaTimeout,
                        "media path lost (no ICE traffic)",
                        true,
                    ));
                }
                self.remove(id, LeaveReason::Disconnected);
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
                match (m.direction, m.kind) {
                    (Direction::RecvOnly, MediaKind::Audio) if p.pub_audio.is_none() => {
                        p.pub_audio = Some(m.mid)
                    }
                    (Direction::RecvOnly, MediaKind::Video) if p.pub_video.is_none() => {
                        p.pub_video = Some(m.mid)
                    }
                    (Direction::SendOnly, MediaKind::Video)
                        if p.video_slots.len() < usize::from(self.cfg.video_slots) =>
                    {
                        p.video_slots.push(OutSlot {
                            mid: m.mid,
                            holder: None,
                            need_keyframe: true,
                        })
                    }
                    (Direction::SendOnly, MediaKind::Audio)
                        if p.audio_slots.len() < usize::from(self.cfg.audio_slots) =>
                    {
                        p.audio_slots.push(OutSlot {
                            mid: m.mid,
                            holder: None,
                            need_keyframe: false,
                        })
                    }
                    (dir, kind) => {
                        debug!(site = %p.site.id, ?dir, ?kind, mid = %m.mid, "m-line not used")
                    }
                }
            }
            Event::MediaData(d) => self.forward(id, d),
            Event::KeyframeRequest(req) => {
                let holder = self.peers.get(&id).and_then(|p| {
                    p.video_slots
                        .iter()
                        .find(|s| s.mid == req.mid)
                        .and_then(|s| s.holder)
                });
                if let Some(h) = holder {
                    self.request_keyframe(h, req.kind);
                }
            }
            _ => {}
        }
    }

    fn request_keyframe(&mut self, publisher: ConnId, kind: KeyframeRequestKind) {
        let now = Instant::now();
        let Some(p) = self.peers.get_mut(&publisher) else {
            return;
        };
        if p.last_keyframe_request
            .is_some_and(|t| now - t < KEYFRAME_REQUEST_GAP)
        {
            return;
        }
        let Some(mid) = p.pub_video else {
            return;
        };
        p.last_keyframe_request = Some(now);
        self.stats.keyframe_requests.fetch_add(1, Ordering::Relaxed);
        self.with_rtc(publisher, move |rtc| match rtc.writer(mid) {
            Some(mut w) if w.is_request_keyframe_possible(kind) => w.request_keyframe(None, kind),
            Some(_) => {
                debug!(%mid, ?kind, "publisher cannot take this keyframe request");
                Ok(())
            }
            None => {
                debug!(%mid, "no writer for the publisher's video");
                Ok(())
            }
        });
    }

    fn forward(&mut self, from: ConnId, d: MediaData) {
        self.stats.frames_in.fetch_add(1, Ordering::Relaxed);
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        let kind = if Some(d.mid) == p.pub_video {
            WireKind::Video
        } else if Some(d.mid) == p.pub_audio {
            p.audio_bytes += d.data.len() as u64;
            WireKind::Audio
        } else {
            return;
        };
        let room = p.room.clone();
        if kind == WireKind::Video && !d.contiguous {
            // A frame was lost before us: subscribers' decoders need a fresh start.
            for m in self.rooms.get(&room).into_iter().flatten() {
                if let Some(s) = self.peers.get_mut(m) {
                    for slot in s.video_slots.iter_mut().filter(|s| s.holder == Some(from)) {
                        slot.need_keyframe = true;
                    }
                }
            }
            self.request_keyframe(from, KeyframeRequestKind::Pli);
        }
        let keyframe = kind == WireKind::Video && d.is_keyframe();
        let members: Vec<ConnId> = self.rooms.get(&room).cloned().unwrap_or_default();
        for sub in members.into_iter().filter(|m| *m != from) {
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
            if slot.need_keyframe {
                if !keyframe {
                    continue;
                }
                slot.need_keyframe = false;
            }
            let mid = slot.mid;
            let data = d.data.clone();
            let (params, wallclock, time) = (d.params, d.network_time, d.time);
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
                stats.bytes_out.fetch_add(len, Ordering::Relaxed);
                w.write(pt, wallclock, time, data)
            });
        }
    }

    /// Recomputes which publishers fill every subscriber's slots of one kind in a room and
    /// tells the subscribers whose mapping changed.
    fn reassign(&mut self, room: &str, kind: WireKind) {
        let members: Vec<ConnId> = self.rooms.get(room).cloned().unwrap_or_default();
        let publishers: Vec<(ConnId, f64)> = members
            .iter()
            .filter_map(|m| self.peers.get(m).map(|p| (*m, p)))
            .filter(|(_, p)| match kind {
                WireKind::Video => p.pub_video.is_some(),
                WireKind::Audio => p.pub_audio.is_some(),
            })
            .map(|(m, p)| {
                let score = match kind {
                    // Earlier joiners first; spotlight and floor raise this later.
                    WireKind::Video => -(p.join_seq as f64),
                    WireKind::Audio => p.loudness,
                };
                (m, score)
            })
            .collect();
        let mut keyframes = Vec::new();
        for sub in &members {
            let Some(s) = self.peers.get_mut(sub) else {
                continue;
            };
            let cands: Vec<slots::Candidate<ConnId>> = publishers
                .iter()
                .filter(|(m, _)| m != sub)
                .map(|(m, score)| slots::Candidate {
                    key: *m,
                    score: *score,
                })
                .collect();
            let out = match kind {
                WireKind::Video => &mut s.video_slots,
                WireKind::Audio => &mut s.audio_slots,
            };
            let mut holders: Vec<Option<ConnId>> = out.iter().map(|s| s.holder).collect();
            let changed = slots::assign(&mut holders, &cands);
            if changed.is_empty() {
                continue;
            }
            for i in changed {
                out[i].holder = holders[i];
                out[i].need_keyframe = kind == WireKind::Video;
                if let (Some(h), WireKind::Video) = (holders[i], kind) {
                    keyframes.push(h);
                }
            }
            let msg = self.slots_message(*sub);
            if let Some(s) = self.peers.get(sub) {
                s.send(msg);
            }
        }
        keyframes.sort_unstable();
        keyframes.dedup();
        for h in keyframes {
            self.request_keyframe(h, KeyframeRequestKind::Pli);
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
        if let Some(members) = self.rooms.get_mut(&room) {
            members.retain(|m| *m != id);
            if members.is_empty() {
                self.rooms.remove(&room);
            }
        }
        for m in self.rooms.get(&room).into_iter().flatten() {
            if let Some(q) = self.peers.get(m) {
                q.send(ServerMessage::SiteLeft {
                    site: p.site.id.clone(),
                    reason,
                });
            }
        }
        self.stats
            .sites
            .store(self.peers.len() as u64, Ordering::Relaxed);
        self.reassign(&room, WireKind::Video);
        self.reassign(&room, WireKind::Audio);
    }
}
