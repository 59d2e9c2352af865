//! Relay mode (`diemcau-server --upstream`): this server carries its own room into a parent
//! room as one peer.
//!
//! The task here is the link's signalling: it joins the parent with `relay: true`, makes the
//! offer (a str0m `Rtc` in the controlling, full-ICE role, with [`RELAY_UP_VIDEO`] +
//! [`RELAY_UP_AUDIO`] send-only m-lines and the receive slots the parent's `welcome` asks
//! for) and hands the answered `Rtc` to the media engine, which owns the UDP socket and
//! carries the link's media like any other peer's. From then on it translates: the parent's
//! `slots`, `relay_meeting`, `relay_ask_unmute` and `relay_remove` go to the engine as
//! [`UplinkEvent`]s, and what the engine has for the parent (`relay_sites`,
//! `relay_sources`, `relay_hand`, …) goes up.
//!
//! A lost link (the WebSocket closes, the parent stops answering pings for
//! [`SILENCE_LIMIT`], or the engine sees the media path die) is dialled again with `resume`:
//! every 0.25 s at first, backing off to 1 s within the first minute and 5 s after. The
//! district's own meeting carries on meanwhile.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use diemcau_protocol::{
    ClientMessage, ErrorCode, ServerMessage, SiteId, PROTOCOL_VERSION, RELAY_UP_AUDIO,
    RELAY_UP_VIDEO,
};
use futures_util::{SinkExt, StreamExt};
use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind};
use str0m::{Candidate, Rtc, RtcConfig};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tracing::{info, warn};

use crate::sfu::{Command, UplinkEvent};

/// Where and as whom a relay joins its parent.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The parent's signalling URL, `ws://` or `wss://`.
    pub url: String,
    /// This district's site id in the parent's directory.
    pub site: SiteId,
    /// A token for `site` (role district or chair) from the parent's key.
    pub token: Option<String>,
    /// The room carried: the same name here and at the parent.
    pub room: String,
    /// Join the parent at start; otherwise the district meets alone until its chair gives
    /// the `upstream {on: true}` command.
    pub link_at_start: bool,
}

/// The parent not answering for this long means the link is gone.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(3);
const PING_EVERY: Duration = Duration::from_millis(1000);
/// Each step of a dial (welcome, answer) must finish within this.
const STEP_LIMIT: Duration = Duration::from_secs(3);
/// The TCP and WebSocket connect: short, so a dial started while the link was down does
/// not hold up the one after it comes back (a lost SYN is sent again after 1 s).
const CONNECT_LIMIT: Duration = Duration::from_millis(1500);

/// Why one link ended.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("cannot reach the parent: {0}")]
    Connect(String),
    #[error("the parent refused ({code:?}): {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("the parent did not answer in time ({0})")]
    Timeout(&'static str),
    #[error("the link was lost: {0}")]
    Lost(String),
    #[error("offer or answer failed: {0}")]
    Sdp(String),
}

/// Keeps the link to the parent up, while `want` says so, until the server stops.
pub async fn run(
    cfg: UpstreamConfig,
    engine: mpsc::UnboundedSender<Command>,
    local: SocketAddr,
    mut want: watch::Receiver<bool>,
) {
    let mut resume = false;
    let mut lost_at = Instant::now();
    let mut wait = Duration::from_millis(250);
    loop {
        // The district meets alone until its chair joins it to the parent's meeting.
        if !*want.borrow_and_update() {
            while !*want.borrow_and_update() {
                if want.changed().await.is_err() {
                    return;
                }
            }
            resume = false;
            lost_at = Instant::now();
            wait = Duration::from_millis(250);
        }
        let started = Instant::now();
        let result = link_once(&cfg, &engine, local, resume, &mut want).await;
        // Whatever ended the link, the engine lets it go (a no-op if it already has).
        let _ = engine.send(Command::Uplink(UplinkEvent::Down));
        match result {
            Ok(()) => {
                info!(parent = %cfg.url, "left the parent room; the district meets alone");
            }
            Err(_) if !*want.borrow() => {}
            Err(e) => {
                if started.elapsed() > Duration::from_secs(5) {
                    // It had been up: count the backoff from this loss.
                    lost_at = Instant::now();
                    wait = Duration::from_millis(250);
                }
                // A refusal other than a takeover is not fixed by retrying fast.
                let refused = matches!(&e, LinkError::Refused { code, .. }
                    if !matches!(code, ErrorCode::SiteTaken | ErrorCode::MediaTimeout));
                let next = if refused {
                    Duration::from_secs(5)
                } else {
                    wait
                };
                warn!(parent = %cfg.url, "link to the parent room: {e}; dialling again in {next:?}");
                if engine.is_closed() {
                    return;
                }
                resume = true;
                tokio::time::sleep(next).await;
                wait = if lost_at.elapsed() < Duration::from_secs(60) {
                    (wait * 2).min(Duration::from_secs(1))
                } else {
                    Duration::from_secs(5)
                };
            }
        }
    }
}

/// The link's own `Rtc`: the same codecs as the sites', and a bandwidth estimate of its own
/// (TWCC, fed back by the parent), within which the engine chooses the layers it sends up.
fn client_rtc() -> Rtc {
    let mut cfg = RtcConfig::new()
        .clear_codecs()
        .enable_opus(true, false)
        .enable_bwe(Some(str0m::bwe::Bitrate::kbps(1_000)));
    cfg.codec_config()
        .add_h264(108.into(), Some(109.into()), true, 0x42e01f);
    cfg.build(Instant::now())
}

async fn link_once(
    cfg: &UpstreamConfig,
    engine: &mpsc::UnboundedSender<Command>,
    local: SocketAddr,
    resume: bool,
    want: &mut watch::Receiver<bool>,
) -> Result<(), LinkError> {
    if cfg.url.starts_with("wss://") {
        // One crypto provider for the process, as the client does (another crate may bring
        // ring too, and rustls then refuses to guess). An error means one is installed.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
    let (ws, _) = tokio::time::timeout(CONNECT_LIMIT, tokio_tungstenite::connect_async(&cfg.url))
        .await
        .map_err(|_| LinkError::Timeout("connect"))?
        .map_err(|e| LinkError::Connect(e.to_string()))?;
    let (mut sink, mut stream) = ws.split();
    let send = |m: &ClientMessage| Message::Text(m.encode().into());
    sink.send(send(&ClientMessage::Join {
        v: PROTOCOL_VERSION,
        room: cfg.room.clone(),
        site: cfg.site.clone(),
        token: cfg.token.clone(),
        control: false,
        resume,
        relay: true,
    }))
    .await
    .map_err(|e| LinkError::Lost(e.to_string()))?;
    let mut backlog = Vec::new();
    let (video_slots, audio_slots) = loop {
        let m = next_message(&mut stream, "welcome").await?;
        if let Some(e) = refusal(&m) {
            return Err(e);
        }
        if let ServerMessage::Welcome {
            video_slots,
            audio_slots,
            ..
        } = m
        {
            break (video_slots, audio_slots);
        }
    };
    let mut rtc = client_rtc();
    let candidate = Candidate::host(local, "udp").map_err(|e| LinkError::Sdp(e.to_string()))?;
    rtc.add_local_candidate(candidate);
    let mut api = rtc.sdp_api();
    let mut add = |kind, dir| api.add_media(kind, dir, None, None, None);
    let up_video: Vec<_> = (0..RELAY_UP_VIDEO)
        .map(|_| add(MediaKind::Video, Direction::SendOnly))
        .collect();
    let up_audio: Vec<_> = (0..RELAY_UP_AUDIO)
        .map(|_| add(MediaKind::Audio, Direction::SendOnly))
        .collect();
    for _ in 0..video_slots {
        add(MediaKind::Video, Direction::RecvOnly);
    }
    for _ in 0..audio_slots {
        add(MediaKind::Audio, Direction::RecvOnly);
    }
    let (offer, pending) = api
        .apply()
        .ok_or_else(|| LinkError::Sdp("nothing to offer".into()))?;
    sink.send(send(&ClientMessage::Offer {
        sdp: offer.to_sdp_string(),
    }))
    .await
    .map_err(|e| LinkError::Lost(e.to_string()))?;
    let answer = loop {
        let m = next_message(&mut stream, "answer").await?;
        if let Some(e) = refusal(&m) {
            return Err(e);
        }
        match m {
            ServerMessage::Answer { sdp } => break sdp,
            ServerMessage::Error {
                code: ErrorCode::BadSdp,
                message,
                ..
            } => return Err(LinkError::Sdp(message)),
            other => backlog.push(other),
        }
    };
    let answer = SdpAnswer::from_sdp_string(&answer).map_err(|e| LinkError::Sdp(e.to_string()))?;
    rtc.sdp_api()
        .accept_answer(pending, answer)
        .map_err(|e| LinkError::Sdp(e.to_string()))?;
    let (to_parent, mut outbox) = mpsc::unbounded_channel();
    let (to_task, mut from_engine) = mpsc::unbounded_channel();
    let _ = engine.send(Command::Uplink(UplinkEvent::Linked {
        rtc: Box::new(rtc),
        up_video,
        up_audio,
        to_parent,
        to_task,
    }));
    info!(parent = %cfg.url, room = %cfg.room, "relay joined the parent room");
    for m in backlog {
        deliver(engine, m)?;
    }
    let mut heard = Instant::now();
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut ping_id = 0;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let msg = msg
                    .ok_or_else(|| LinkError::Lost("the parent closed the connection".into()))?
                    .map_err(|e| LinkError::Lost(e.to_string()))?;
                heard = Instant::now();
                if let Message::Text(t) = msg {
                    match ServerMessage::decode(&t) {
                        Ok(m) => deliver(engine, m)?,
                        Err(e) => warn!("unreadable message from the parent: {e}"),
                    }
                }
            }
            // The engine drops both channels with the link: on purpose when the district
            // chair took the meeting out, else because its media failed.
            out = outbox.recv() => match out {
                Some(out) => {
                    sink.send(send(&out)).await.map_err(|e| LinkError::Lost(e.to_string()))?
                }
                None if !*want.borrow() => break,
                None => return Err(engine_dropped()),
            },
            note = from_engine.recv() => match note {
                Some(m) => if let Some(e) = refusal(&m) { return Err(e) },
                None if !*want.borrow() => break,
                None => return Err(engine_dropped()),
            },
            _ = want.changed() => {
                if !*want.borrow() {
                    break;
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() > SILENCE_LIMIT {
                    return Err(LinkError::Lost(format!("no word from the parent for {SILENCE_LIMIT:?}")));
                }
                ping_id += 1;
                sink.send(send(&ClientMessage::Ping { id: ping_id }))
                    .await
                    .map_err(|e| LinkError::Lost(e.to_string()))?;
            }
        }
    }
    // Leaving on purpose: the parent lowers the district's hands and grants.
    let _ = sink.send(send(&ClientMessage::Leave)).await;
    let _ = sink.close().await;
    Ok(())
}

/// The parent's next readable message, within [`STEP_LIMIT`].
async fn next_message<S>(stream: &mut S, what: &'static str) -> Result<ServerMessage, LinkError>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let msg = tokio::time::timeout(STEP_LIMIT, stream.next())
            .await
            .map_err(|_| LinkError::Timeout(what))?
            .ok_or_else(|| LinkError::Lost("the parent closed the connection".into()))?
            .map_err(|e| LinkError::Lost(e.to_string()))?;
        if let Message::Text(t) = msg {
            if let Ok(m) = ServerMessage::decode(&t) {
                return Ok(m);
            }
        }
    }
}

/// A fatal error from the parent (or the engine) ends the link.
fn refusal(m: &ServerMessage) -> Option<LinkError> {
    match m {
        ServerMessage::Error {
            code,
            message,
            fatal: true,
            ..
        } => Some(LinkError::Refused {
            code: *code,
            message: message.clone(),
        }),
        _ => None,
    }
}

fn engine_dropped() -> LinkError {
    LinkError::Lost("the media engine dropped the link".into())
}

/// Hands one message from the parent to the engine; a fatal error ends the link.
fn deliver(engine: &mpsc::UnboundedSender<Command>, m: ServerMessage) -> Result<(), LinkError> {
    if let Some(e) = refusal(&m) {
        return Err(e);
    }
    let ev = match m {
        ServerMessage::Slots { slots } => UplinkEvent::Slots(slots),
        ServerMessage::RelayMeeting { state, members } => UplinkEvent::Meeting { state, members },
        ServerMessage::RelayAskUnmute { site, by } => UplinkEvent::AskUnmute { site, by },
        ServerMessage::RelayRemove { site } => UplinkEvent::Remove { site },
        _ => return Ok(()),
    };
    let _ = engine.send(Command::Uplink(ev));
    Ok(())
}
