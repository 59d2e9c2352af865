//! Publishing: a thread per source (capture → encode), and a task per track that writes the
//! encoded samples once the media path is up.
//!
//! The capture thread owns the device (cameras must stay on the thread that opened them) and
//! is paced by it. It reads the congestion controller's target before every frame and moves
//! the encoder's bitrate when it has changed by more than 15 %. A keyframe request (PLI/FIR
//! from the server) sets a flag the thread checks before encoding.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use diemcau_media::processing::AudioProcessor;
use diemcau_media::{AudioEncoder, AudioSource, I420Frame, SourceError, VideoEncoder, VideoSource};
use diemcau_protocol::padding::with_padding;
use rtc::media::Sample;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::quality::RetryHold;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::Track;
use webrtc::peer_connection::RTCPeerConnectionState;
use webrtc::rtp_transceiver::RtpSender;

/// One encoded frame ready for the wire.
#[derive(Debug)]
pub struct Encoded {
    pub data: Bytes,
    pub keyframe: bool,
    pub duration: Duration,
    /// Pictures: the simulcast layer (0 = the lowest), whose track carries it.
    pub layer: usize,
    /// Pictures: bytes of probe padding in `data` ([`LayerProbe`]).
    pub padding: usize,
}

/// A site sends its camera in at most this many layers (simulcast), each on a track of its
/// own, the lowest first.
pub const MAX_LAYERS: usize = 3;

/// Counters the publisher keeps.
#[derive(Debug, Default)]
pub struct SendCounters {
    pub video_frames: AtomicU64,
    pub video_keyframes: AtomicU64,
    pub video_bytes: AtomicU64,
    pub audio_frames: AtomicU64,
    pub audio_bytes: AtomicU64,
    pub keyframe_requests: AtomicU64,
    /// Current encoder bitrate (bps).
    pub video_bitrate: AtomicU64,
    /// The top layer being sent: the divisor of the source's size (0 before the first).
    pub video_layer: AtomicU64,
    /// How many layers are being sent (simulcast; 0 before the first picture).
    pub video_layers: AtomicU64,
    /// The size of the top layer's pictures, `width << 32 | height` (0 before the first).
    pub video_size: AtomicU64,
    /// Times video was paused because the link was too thin for it.
    pub video_pauses: AtomicU64,
    /// Milliseconds spent paused for the link (the current pause included).
    pub video_paused_ms: AtomicU64,
    /// Video is paused for the link right now.
    pub video_paused: AtomicBool,
    /// Probe padding sent in pictures ([`LayerProbe`]), bytes; not in `video_bytes`.
    pub probe_bytes: AtomicU64,
    /// Times the uplink was probed before starting a layer.
    pub layer_probes: AtomicU64,
}

impl SendCounters {
    /// The size of the pictures being sent, if any were.
    pub fn video_size(&self) -> Option<(usize, usize)> {
        match self.video_size.load(Ordering::Relaxed) {
            0 => None,
            v => Some(((v >> 32) as usize, (v & 0xffff_ffff) as usize)),
        }
    }
}

/// Shared controls between the room, the capture threads (video and audio) and the writer
/// tasks.
#[derive(Debug, Default)]
pub struct CaptureControl {
    /// A keyframe on every layer being sent.
    pub force_keyframe: AtomicBool,
    /// A keyframe on one layer (the server asked for it on that layer's track).
    pub layer_keyframe: [AtomicBool; MAX_LAYERS],
    pub stop: AtomicBool,
    /// The person muted the microphone: captured sound is processed but not sent.
    pub mic_muted: AtomicBool,
    /// The person turned the camera off: no pictures are read or sent.
    pub camera_off: AtomicBool,
    /// Loudness of the last captured sound frame (dBFS as `f32` bits), muted or not, for
    /// the level meter.
    pub mic_level: AtomicU32,
    /// The link is too thin for pictures (they are paused): sound is sent at
    /// [`AUDIO_THIN_BPS`] instead of [`AUDIO_BPS`].
    pub link_thin: AtomicBool,
}

/// Opus bitrate for speech on an ordinary link.
pub const AUDIO_BPS: i32 = 32_000;
/// Opus bitrate while the link is too thin for pictures: still wideband speech, with room to
/// spare on a link of 64 kbit/s.
pub const AUDIO_THIN_BPS: i32 = 20_000;

impl CaptureControl {
    /// Loudness of the last captured sound frame in dBFS (-100 when nothing was captured).
    pub fn mic_level_dbfs(&self) -> f32 {
        match self.mic_level.load(Ordering::Relaxed) {
            0 => -100.0,
            bits => f32::from_bits(bits),
        }
    }
}

/// Loudness of 16-bit samples in dBFS (the meters and the speaking indicator use it from here).
pub use diemcau_media::frame::level_dbfs;

/// Bitrate the video encoder may use given the estimate for the whole connection.
pub fn video_share(estimate_bps: f64, max_video_bps: u32) -> u32 {
    // Leave room for audio (~40 kbit/s with overhead) and RTP/RTCP overhead (~10 %).
    let share = (estimate_bps * 0.9 - 40_000.0).max(60_000.0);
    (share as u32).min(max_video_bps)
}

/// Bits per pixel a 640x360 layer needs to look acceptable in H.264 baseline at conference
/// motion; larger pictures need fewer per pixel, smaller ones more (by the fourth root of the
/// pixel count).
const LAYER_BITS_PER_PIXEL: f64 = 0.08;

/// Going up a layer needs this much more than the layer needs, so a target near a boundary
/// does not flap.
const LAYER_UP_MARGIN: f64 = 1.1;

/// The bitrate a picture of `pixels` at `fps` needs.
pub fn layer_need_bps(pixels: usize, fps: u32) -> f64 {
    let p = pixels as f64;
    p * f64::from(fps) * LAYER_BITS_PER_PIXEL * (p / 230_400.0).powf(-0.25)
}

/// Below the top layer sent, a layer gets this share of what [`layer_need_bps`] says: it is
/// a thumbnail, or what a thin downlink gets.
pub const LOWER_LAYER_SHARE: f64 = 0.5;

/// The layers a camera of this size is sent in (simulcast), as divisors of its size, the
/// lowest first: each half the width and height of the next, none below 320x180, and at most
/// `tracks` of them (the top ones).
pub fn layer_divisors((w, h): (usize, usize), tracks: usize) -> Vec<usize> {
    let all: Vec<usize> = [4usize, 2, 1]
        .into_iter()
        .filter(|&d| d == 1 || (w / d >= 320 && h / d >= 180))
        .collect();
    let skip = all.len().saturating_sub(tracks.max(1));
    all[skip..].to_vec()
}

/// The bitrates of the layers to send, lowest first (as many as are sent, at least one), for
/// the encoders' `target_bps`. The lowest is always sent; each next one when what is left
/// after the layers below it (at [`LOWER_LAYER_SHARE`] of their need) covers what it needs,
/// with [`LAYER_UP_MARGIN`] more to start a layer not sent now (`sending` are). The full size
/// never needs more than 80 % of `max_bps` less the layers below it (so a configured cap
/// below a camera's need still sends it). The top layer sent gets the rest of the target.
pub fn send_layers(
    target_bps: u32,
    sizes: &[(usize, usize)],
    fps: u32,
    sending: usize,
    max_bps: u32,
) -> Vec<u32> {
    let n = sizes.len().max(1);
    let need = |i: usize| {
        sizes
            .get(i)
            .map_or(0.0, |(w, h)| layer_need_bps(w * h, fps))
    };
    let target = f64::from(target_bps);
    let mut below = 0.0;
    let mut count = 1;
    for i in 1..n {
        below += need(i - 1) * LOWER_LAYER_SHARE;
        let cap = (f64::from(max_bps) * 0.8 - below).max(need(i - 1));
        let need_here = if i + 1 == n {
            need(i).min(cap)
        } else {
            need(i)
        };
        let margin = if i >= sending { LAYER_UP_MARGIN } else { 1.0 };
        if target - below < need_here * margin {
            break;
        }
        count = i + 1;
    }
    let mut rates: Vec<u32> = (0..count - 1)
        .map(|i| (need(i) * LOWER_LAYER_SHARE) as u32)
        .collect();
    let lower: u32 = rates.iter().sum();
    rates.push(target_bps.saturating_sub(lower).min(max_bps).max(1));
    rates
}

/// [`send_layers`] for the `target`, except that no more layers than the `proven` target
/// allows start beyond the `sending` ones (at least one is always sent); and whether a layer
/// the target allows waits for proof ([`LayerProbe`]).
pub fn proven_layers(
    (target, proven): (u32, u32),
    sizes: &[(usize, usize)],
    fps: u32,
    sending: usize,
    max_bps: u32,
) -> (Vec<u32>, bool) {
    let rates = send_layers(target, sizes, fps, sending, max_bps);
    if rates.len() <= sending.max(1) {
        return (rates, false);
    }
    let ceiling = send_layers(proven, sizes, fps, sending, max_bps)
        .len()
        .max(sending)
        .max(1);
    if ceiling >= rates.len() {
        return (rates, false);
    }
    (
        send_layers(target, &sizes[..ceiling], fps, sending, max_bps),
        true,
    )
}

/// The most the estimate may be trusted for, when the far end has acknowledged receiving
/// `acked_bps`: half as much again, and a little more (libwebrtc bounds its estimate the
/// same way). GCC raises its estimate as long as nothing queues; a sender that does not fill
/// its target (an encoder that needs fewer bits than it is given for a still picture) lets it
/// climb far above a thin link, and a layer started on that runs into the link's queue.
pub fn proven_bps(acked_bps: f64) -> f64 {
    1.5 * acked_bps + 10_000.0
}

/// How long a probe of the uplink lasts: long enough for a full [`crate::peer::ACKED_WINDOW`]
/// of its feedback to come back.
pub const LAYER_PROBE_FOR: Duration = Duration::from_millis(1600);
/// A probe starts at most this often (from the start of one to the next), so a thin link
/// that fails them is loaded for 1.6 s in four at most (less: a queue ends a probe).
pub const LAYER_PROBE_EVERY: Duration = Duration::from_secs(4);
/// While probing, what is sent (pictures and sound) is padded up to this share of the
/// estimate: what comes back acknowledged then proves ([`proven_bps`]) the whole estimate.
pub const LAYER_PROBE_SHARE: f64 = 0.8;
/// What sound takes of the wire, counted out of the probe's padding.
const PROBE_SOUND_BPS: f64 = 45_000.0;
/// The most padding one picture carries.
const PROBE_MAX_BYTES: usize = 24_000;

/// Probing the uplink before starting a layer GCC allows but the path has not shown it
/// carries ([`proven_bps`]), or a queue held it back from ([`crate::peer::DelayCap`]): for
/// [`LAYER_PROBE_FOR`] the pictures carry padding (a server removes it before forwarding)
/// up to [`LAYER_PROBE_SHARE`] of the estimate the next layer needs, at most once every
/// [`LAYER_PROBE_EVERY`]. If the link carries it without a queue, the acknowledged rate
/// proves that estimate and lifts the queue's ceiling, and the layer starts; if a queue
/// shows, the ceiling comes down, the probe ends there, and no layer was started into it.
#[derive(Debug, Default, Clone)]
pub struct LayerProbe {
    until: Option<Instant>,
    next: Option<Instant>,
    /// The estimate when the probe started.
    from: f64,
}

impl LayerProbe {
    /// Whether to pad at `now`, when `wanted` says a layer waits, with the published
    /// `estimate_bps` (a probe ends when the estimate falls a tenth below where it began).
    pub fn update(&mut self, now: Instant, wanted: bool, estimate_bps: f64) -> bool {
        if !wanted {
            self.until = None;
            return false;
        }
        if let Some(until) = self.until {
            if now < until && estimate_bps >= 0.9 * self.from {
                return true;
            }
            self.until = None;
        }
        if self.next.is_some_and(|n| now < n) {
            return false;
        }
        self.until = Some(now + LAYER_PROBE_FOR);
        self.next = Some(now + LAYER_PROBE_EVERY);
        self.from = estimate_bps;
        true
    }

    /// Padding for one picture while probing: what brings pictures and sound up to
    /// [`LAYER_PROBE_SHARE`] of `need_bps` (the estimate the next layer needs), given the
    /// pictures' own `video_bps`.
    pub fn padding_bytes(need_bps: f64, video_bps: f64, fps: u32) -> usize {
        let short = need_bps * LAYER_PROBE_SHARE - PROBE_SOUND_BPS - video_bps;
        ((short.max(0.0) / 8.0 / f64::from(fps.max(1))) as usize).min(PROBE_MAX_BYTES)
    }
}

/// The least estimate at which more than `count` layers are sent ([`send_layers`] of
/// [`video_share`]), if any is.
pub fn estimate_for_more_layers(
    count: usize,
    sizes: &[(usize, usize)],
    fps: u32,
    sending: usize,
    max_bps: u32,
) -> Option<f64> {
    let more =
        |e: f64| send_layers(video_share(e, max_bps), sizes, fps, sending, max_bps).len() > count;
    let (mut lo, mut hi) = (0.0, crate::peer::BWE_MAX_BPS);
    if !more(hi) {
        return None;
    }
    for _ in 0..24 {
        let mid = (lo + hi) / 2.0;
        if more(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

/// One stream (`--layers 1`, no simulcast): the size to send it at — the divisor of the
/// camera's size: 1 (full), 2 or 4 — for the encoder's `target_bps`. A layer is used when the target covers what it needs (the
/// full size never needs more than 80 % of `max_bps`, so a configured cap below a camera's
/// need still sends it); going up needs [`LAYER_UP_MARGIN`] more. Layers stay at least
/// 320x180.
pub fn layer_for(
    target_bps: u32,
    (w, h): (usize, usize),
    fps: u32,
    current: usize,
    max_bps: u32,
) -> usize {
    let need = |d: usize| {
        let n = layer_need_bps(w / d * (h / d), fps);
        if d == 1 {
            n.min(f64::from(max_bps) * 0.8)
        } else {
            n
        }
    };
    let mut best = 1;
    for d in [1usize, 2, 4]
        .into_iter()
        .filter(|&d| d == 1 || (w / d >= 320 && h / d >= 180))
    {
        best = d;
        let margin = if d < current { LAYER_UP_MARGIN } else { 1.0 };
        if f64::from(target_bps) >= need(d) * margin {
            break;
        }
    }
    best
}

/// Clears the thin-link and probing flags when the video thread ends.
struct ClearLinkFlags(
    Arc<CaptureControl>,
    Arc<SendCounters>,
    Arc<crate::peer::LinkStats>,
);

impl Drop for ClearLinkFlags {
    fn drop(&mut self) {
        self.0.link_thin.store(false, Ordering::Relaxed);
        self.1.video_paused.store(false, Ordering::Relaxed);
        self.2.probing.store(false, Ordering::Relaxed);
    }
}

fn pack_size(w: usize, h: usize) -> u64 {
    (w as u64) << 32 | h as u64
}

/// Below this estimate video is paused (after [`PAUSE_AFTER`]): the link carries sound only.
pub const PAUSE_BELOW_BPS: f64 = 100_000.0;
/// Video comes back when the estimate has stayed at or above this for the resume hold.
pub const RESUME_ABOVE_BPS: f64 = 170_000.0;
/// How long the estimate must stay low before video is paused.
pub const PAUSE_AFTER: Duration = Duration::from_secs(4);
/// The first resume hold; it doubles (to [`RESUME_HOLD_MAX`]) each time video had to be
/// paused again soon after coming back, and is reset by a minute without a pause.
pub const RESUME_HOLD: Duration = Duration::from_secs(3);
pub const RESUME_HOLD_MAX: Duration = Duration::from_secs(48);
/// A pause this soon after a resume means the resume was premature.
const RELAPSE_WITHIN: Duration = Duration::from_secs(30);
/// After a resume pictures are on probation this long: they are sent as if the estimate were
/// no more than [`PROBE_BPS`] (while paused the estimate climbs on sound alone and
/// says little about pictures), and a low estimate pauses them again after
/// [`PROBATION_PAUSE_AFTER`] instead of [`PAUSE_AFTER`], so a failed try costs speech a
/// second or two.
pub const PROBATION: Duration = Duration::from_secs(8);
pub const PROBATION_PAUSE_AFTER: Duration = Duration::from_secs(1);
/// The estimate pictures may use on probation: the smallest layer at a modest rate.
pub const PROBE_BPS: f64 = 130_000.0;
/// Probation ends early once the estimate has held [`RESUME_ABOVE_BPS`] this long with the
/// pictures flowing: the link carries them.
pub const PROBATION_SURE: Duration = Duration::from_secs(3);

/// Audio first: decides from the send-side estimate when video is paused so sound keeps the
/// whole of a link too thin for both, and when it comes back.
///
/// While paused only sound is sent, and GCC keeps raising its estimate as long as the sound
/// gets through undelayed; a resume that overloads the link again is a relapse, and each one
/// doubles how long the estimate must hold before the next try, so a link that stays thin is
/// probed ever more rarely instead of stalling the sound every few seconds.
#[derive(Debug, Clone)]
pub struct VideoGate {
    paused: bool,
    /// Since when the estimate has been on the other side of the threshold.
    since: Option<Instant>,
    retry: RetryHold,
    probation_until: Option<Instant>,
    /// On probation, since when the estimate has held the resume threshold.
    sure_since: Option<Instant>,
}

impl Default for VideoGate {
    fn default() -> Self {
        VideoGate {
            paused: false,
            since: None,
            retry: RetryHold::new(RESUME_HOLD, RESUME_HOLD_MAX, RELAPSE_WITHIN),
            probation_until: None,
            sure_since: None,
        }
    }
}

impl VideoGate {
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Pictures start again after a gap the gate did not decide (the camera was off): the
    /// estimate grew on sound alone meanwhile, so they start on probation.
    pub fn restart(&mut self, now: Instant) {
        self.paused = false;
        self.since = None;
        self.retry.resumed(now);
        self.start_probation(now);
    }

    fn start_probation(&mut self, now: Instant) {
        self.probation_until = Some(now + PROBATION);
        self.sure_since = None;
    }

    /// Within [`PROBATION`] of pictures starting again (unless it ended early).
    pub fn on_probation(&self, now: Instant) -> bool {
        self.probation_until.is_some_and(|t| now < t)
    }

    /// The estimate pictures may use at `now`: capped at [`PROBE_BPS`] on probation.
    pub fn usable(&self, now: Instant, estimate_bps: f64) -> f64 {
        if self.on_probation(now) {
            estimate_bps.min(PROBE_BPS)
        } else {
            estimate_bps
        }
    }

    /// How long the estimate must now hold above [`RESUME_ABOVE_BPS`] for video to resume.
    pub fn hold(&self) -> Duration {
        self.retry.hold()
    }

    /// Folds in the estimate at `now`; returns the new state when it changes.
    pub fn update(&mut self, now: Instant, estimate_bps: f64) -> Option<bool> {
        if self.on_probation(now) {
            if estimate_bps >= RESUME_ABOVE_BPS {
                let sure = *self.sure_since.get_or_insert(now);
                if now.saturating_duration_since(sure) >= PROBATION_SURE {
                    self.probation_until = None;
                }
            } else {
                self.sure_since = None;
            }
        }
        let crossing = if self.paused {
            estimate_bps >= RESUME_ABOVE_BPS
        } else {
            estimate_bps < PAUSE_BELOW_BPS
        };
        if !crossing {
            self.since = None;
            if !self.paused {
                self.retry.settle(now);
            }
            return None;
        }
        let since = *self.since.get_or_insert(now);
        let wait = if self.paused {
            self.retry.hold()
        } else if self.on_probation(now) {
            PROBATION_PAUSE_AFTER
        } else {
            PAUSE_AFTER
        };
        if now.saturating_duration_since(since) < wait {
            return None;
        }
        self.since = None;
        self.paused = !self.paused;
        if self.paused {
            self.retry.paused(now);
        } else {
            self.retry.resumed(now);
            self.start_probation(now);
        }
        Some(self.paused)
    }
}

/// Runs the video capture/encode loop until `control.stop`.
/// Opens the source used when the camera goes away (the labelled test pattern).
pub type VideoFallback = Box<dyn FnOnce() -> Result<Box<dyn VideoSource>, SourceError> + Send>;

/// Per picture: the layers of a source of this size, with the sizes they are sent at.
fn layers_of(source: &dyn VideoSource, tracks: usize) -> (Vec<usize>, Vec<(usize, usize)>) {
    let divisors = layer_divisors(source.size(), tracks);
    let sizes = layer_sizes(source.size(), &divisors);
    (divisors, sizes)
}

/// The sizes a picture of `(w, h)` is sent at for these divisors (rounded down to even, as
/// [`I420Frame::downscaled`] makes them).
fn layer_sizes((w, h): (usize, usize), divisors: &[usize]) -> Vec<(usize, usize)> {
    divisors
        .iter()
        .map(|d| ((w / d) & !1, (h / d) & !1))
        .collect()
}

/// The pictures of the layers, lowest first, for their `scales` (divisors of `picture`'s
/// size): `None` where the scale is 1 (the picture itself), and each one twice smaller than
/// the one above halved from it, which is cheaper than from the full size every time.
pub fn layer_pictures(picture: &I420Frame, scales: &[usize]) -> Vec<Option<I420Frame>> {
    let mut pictures: Vec<Option<I420Frame>> = vec![None; scales.len()];
    for i in (0..scales.len()).rev() {
        let scale = scales[i].max(1);
        if scale == 1 {
            continue;
        }
        let above = scales.get(i + 1).map(|a| (*a).max(1));
        pictures[i] = Some(match above {
            Some(a) if a * 2 == scale => pictures[i + 1]
                .as_ref()
                .map_or_else(|| picture.halved(), I420Frame::halved),
            _ => picture.downscaled(scale),
        });
    }
    pictures
}

/// Runs the video capture/encode loop until `control.stop`: each picture is encoded once per
/// layer sent ([`send_layers`]), into `out` with its layer, the lowest first. A layer stopped
/// and started again starts with a keyframe (a fresh encoder).
#[allow(clippy::too_many_arguments)]
pub fn spawn_video_thread(
    mut source: Box<dyn VideoSource>,
    mut fallback: Option<VideoFallback>,
    max_bitrate_bps: u32,
    bwe_bps: Arc<AtomicU64>,
    link: Arc<crate::peer::LinkStats>,
    control: Arc<CaptureControl>,
    counters: Arc<SendCounters>,
    out: mpsc::Sender<Encoded>,
    errors: mpsc::UnboundedSender<String>,
    events: mpsc::UnboundedSender<crate::RoomEvent>,
    self_view: bool,
    tracks: usize,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("video-capture".into())
        .spawn(move || {
            let fps = source.fps();
            let duration = Duration::from_secs_f64(1.0 / f64::from(fps.max(1)));
            let (mut divisors, mut sizes) = layers_of(source.as_ref(), tracks);
            let mut encoders: Vec<Option<VideoEncoder>> = divisors.iter().map(|_| None).collect();
            // How many layers are sent, and the divisor the source draws itself (1: full
            // size, scaled here) as asked and as done.
            let mut sending = 0;
            let mut drawn_asked = 1;
            let mut drawn = 1;
            let mut was_off = false;
            let mut gate = VideoGate::default();
            let mut probe = LayerProbe::default();
            let mut was_probing = false;
            // What the encoders produced over the last second.
            let mut encoded_rate = crate::peer::ByteWindow::new(Duration::from_secs(1));
            // When the current pause began, and the paused time before it (ms).
            let mut paused_at: Option<(Instant, u64)> = None;
            // However the thread ends, nothing is left marked paused.
            let _clear = ClearLinkFlags(control.clone(), counters.clone(), link.clone());
            while !control.stop.load(Ordering::Relaxed) {
                if control.camera_off.load(Ordering::Relaxed) {
                    link.probing.store(false, Ordering::Relaxed);
                    if !was_off {
                        // A pause for the link ends here: no pictures are sent anyway.
                        paused_at = None;
                        counters.video_paused.store(false, Ordering::Relaxed);
                        control.link_thin.store(false, Ordering::Relaxed);
                    }
                    was_off = true;
                    std::thread::sleep(duration);
                    continue;
                }
                if std::mem::take(&mut was_off) {
                    // The others' decoders need a fresh start after the gap.
                    control.force_keyframe.store(true, Ordering::Relaxed);
                    gate.restart(Instant::now());
                }
                let frame = match source.read() {
                    Ok(f) => f,
                    // Any camera failure (gone, or frames it cannot decode) gives way to the
                    // test pattern once.
                    Err(e) if fallback.is_some() => {
                        let open = fallback.take().expect("checked is_some");
                        match open() {
                            Ok(s) => {
                                let _ = errors.send(format!(
                                    "{} Đang gửi {} thay thế.",
                                    e.vi(),
                                    s.describe()
                                ));
                                source = s;
                                (divisors, sizes) = layers_of(source.as_ref(), tracks);
                                encoders = divisors.iter().map(|_| None).collect();
                                sending = 0;
                                drawn_asked = 1;
                                drawn = 1;
                                continue;
                            }
                            Err(e2) => {
                                let _ = errors.send(e2.vi());
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = errors.send(e.vi());
                        return;
                    }
                };
                let estimate = f64::from_bits(bwe_bps.load(Ordering::Relaxed));
                let now = Instant::now();
                // Sound stays at its thin-link bitrate until pictures are off probation.
                control
                    .link_thin
                    .store(gate.paused() || gate.on_probation(now), Ordering::Relaxed);
                if let Some(paused) = gate.update(now, estimate) {
                    info!(estimate, hold = ?gate.hold(), paused, "video paused for the link");
                    counters.video_paused.store(paused, Ordering::Relaxed);
                    if paused {
                        counters.video_pauses.fetch_add(1, Ordering::Relaxed);
                        paused_at = Some((
                            Instant::now(),
                            counters.video_paused_ms.load(Ordering::Relaxed),
                        ));
                    } else {
                        paused_at = None;
                        control.force_keyframe.store(true, Ordering::Relaxed);
                    }
                    let _ = events.send(crate::RoomEvent::VideoPausedForLink { paused });
                }
                if let Some((at, before)) = paused_at {
                    link.probing.store(false, Ordering::Relaxed);
                    counters
                        .video_paused_ms
                        .store(before + at.elapsed().as_millis() as u64, Ordering::Relaxed);
                    // Sound only: the picture still shows in the self view.
                    if self_view {
                        let _ = events.send(crate::RoomEvent::LocalFrame {
                            picture: Arc::new(frame.picture),
                        });
                    }
                    continue;
                }
                let target = video_share(gate.usable(now, estimate), max_bitrate_bps);
                if tracks <= 1 {
                    // One stream: its size follows the target, with a fresh encoder (whose
                    // first picture is a keyframe) for each new size.
                    let (w, h) = source.size();
                    let d = layer_for(target, (w, h), fps, divisors[0], max_bitrate_bps);
                    if d != divisors[0] {
                        info!(
                            from = divisors[0],
                            to = d,
                            target,
                            "video size {}x{}",
                            w / d,
                            h / d
                        );
                        divisors = vec![d];
                        sizes = layer_sizes((w, h), &divisors);
                        encoders = vec![None];
                        sending = 0;
                    }
                }
                // A layer more than is sent starts only on an estimate the path has shown it
                // carries; until then the uplink is probed.
                let proven = link.acked_bps().map_or(0.0, proven_bps);
                let proven_target =
                    video_share(gate.usable(now, estimate.min(proven)), max_bitrate_bps);
                let (rates, _) = proven_layers(
                    (target, proven_target),
                    &sizes,
                    fps,
                    sending,
                    max_bitrate_bps,
                );
                // GCC's own target (above the queue's ceiling) would send more: probe.
                let gcc = link.gcc_bps().unwrap_or(estimate);
                let gcc_target = video_share(gate.usable(now, gcc), max_bitrate_bps);
                let wanted = send_layers(gcc_target, &sizes, fps, sending, max_bitrate_bps).len()
                    > rates.len();
                let mut padding = 0;
                let probing = probe.update(now, wanted, estimate);
                link.probing.store(probing, Ordering::Relaxed);
                // The estimate the next layer needs, worked out only while probing.
                let need = probing
                    .then(|| {
                        estimate_for_more_layers(rates.len(), &sizes, fps, sending, max_bitrate_bps)
                    })
                    .flatten();
                if let Some(need) = need {
                    padding = LayerProbe::padding_bytes(need, encoded_rate.bps(), fps);
                    if padding > 0 && !std::mem::replace(&mut was_probing, true) {
                        counters.layer_probes.fetch_add(1, Ordering::Relaxed);
                        debug!(
                            estimate,
                            need, padding, "probing the uplink for another layer"
                        );
                    }
                } else {
                    was_probing = false;
                }
                if rates.len() != sending {
                    let (w, h) = sizes[rates.len() - 1];
                    info!(
                        from = sending,
                        to = rates.len(),
                        target,
                        "video layers: top {w}x{h}"
                    );
                    sending = rates.len();
                    counters
                        .video_layers
                        .store(sending as u64, Ordering::Relaxed);
                    counters
                        .video_layer
                        .store(divisors[sending - 1] as u64, Ordering::Relaxed);
                    counters
                        .video_size
                        .store(pack_size(w, h), Ordering::Relaxed);
                }
                counters
                    .video_bitrate
                    .store(rates.iter().map(|r| u64::from(*r)).sum(), Ordering::Relaxed);
                // The source draws the lowest layer itself when that is all that is sent.
                let draw = if sending == 1 { divisors[0] } else { 1 };
                if draw != drawn_asked {
                    drawn_asked = draw;
                    drawn = if source.scale_down(draw) { draw } else { 1 };
                    // This picture was read at the old size.
                    continue;
                }
                let force_all = control.force_keyframe.swap(false, Ordering::Relaxed);
                // The pictures of the layers sent, scaled from the size the source drew.
                let scales: Vec<usize> = divisors[..sending].iter().map(|d| d / drawn).collect();
                let pictures = layer_pictures(&frame.picture, &scales);
                for (i, slot) in encoders.iter_mut().enumerate() {
                    let asked = control.layer_keyframe[i].swap(false, Ordering::Relaxed);
                    let Some(&rate) = rates.get(i) else {
                        // Not sent: started again later with a fresh encoder.
                        if slot.take().is_some() {
                            debug!(layer = i, "video layer stopped");
                        }
                        continue;
                    };
                    let enc = match slot {
                        Some(e) => e,
                        None => match VideoEncoder::new(rate, fps as f32) {
                            Ok(e) => slot.insert(e),
                            Err(e) => {
                                let _ = errors.send(format!("H.264 encoder: {e}"));
                                return;
                            }
                        },
                    };
                    let cur = enc.bitrate_bps();
                    if rate.abs_diff(cur) * 100 > cur * 15 {
                        match enc.set_bitrate(rate) {
                            Ok(()) => debug!(layer = i, from = cur, to = rate, "video bitrate"),
                            Err(e) => warn!("bitrate change failed: {e}"),
                        }
                    }
                    if force_all || asked {
                        enc.force_keyframe();
                    }
                    let picture = pictures
                        .get(i)
                        .and_then(Option::as_ref)
                        .unwrap_or(&frame.picture);
                    match enc.encode(picture) {
                        Ok(Some(au)) => {
                            encoded_rate.add(now, au.data.len() as u64);
                            // The probe's padding rides on the top layer sent.
                            let (data, padded) = if padding > 0 && i + 1 == rates.len() {
                                let data = with_padding(&au.data, padding);
                                let n = data.len() - au.data.len();
                                (data, n)
                            } else {
                                (au.data, 0)
                            };
                            let e = Encoded {
                                data: Bytes::from(data),
                                keyframe: au.keyframe,
                                duration,
                                layer: i,
                                padding: padded,
                            };
                            // Full queue: the writer is behind or not connected yet. Drop
                            // the frame and ask for a keyframe so the layer restarts cleanly.
                            if out.try_send(e).is_err() {
                                control.layer_keyframe[i].store(true, Ordering::Relaxed);
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let _ = errors.send(format!("H.264 encoder: {e}"));
                            return;
                        }
                    }
                }
                // The picture is done with once encoded: the self view takes it, no copy.
                if self_view {
                    let _ = events.send(crate::RoomEvent::LocalFrame {
                        picture: Arc::new(frame.picture),
                    });
                }
            }
        })
        .expect("spawning a thread only fails when the OS is out of resources")
}

/// Runs the audio capture/encode loop until `stop`.
pub fn spawn_audio_thread(
    mut source: Box<dyn AudioSource>,
    processor: Option<Arc<std::sync::Mutex<AudioProcessor>>>,
    stop: Arc<CaptureControl>,
    out: mpsc::Sender<Encoded>,
    errors: mpsc::UnboundedSender<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("audio-capture".into())
        .spawn(move || {
            let mut enc = match AudioEncoder::new(AUDIO_BPS) {
                Ok(e) => e,
                Err(e) => {
                    let _ = errors.send(format!("Opus encoder: {e}"));
                    return;
                }
            };
            let mut thin = false;
            while !stop.stop.load(Ordering::Relaxed) {
                if stop.link_thin.load(Ordering::Relaxed) != thin {
                    thin = !thin;
                    let bps = if thin { AUDIO_THIN_BPS } else { AUDIO_BPS };
                    if let Err(e) = enc.set_bitrate(bps) {
                        warn!("Opus bitrate {bps}: {e}");
                    }
                }
                let frame = match source.read() {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = errors.send(e.vi());
                        return;
                    }
                };
                if let Some(n) = source.notice() {
                    let _ = errors.send(n);
                }
                let mut frame = frame;
                if let Some(p) = &processor {
                    if let Ok(mut p) = p.lock() {
                        p.capture(&mut frame.samples);
                    }
                }
                stop.mic_level
                    .store(level_dbfs(&frame.samples).to_bits(), Ordering::Relaxed);
                if stop.mic_muted.load(Ordering::Relaxed) {
                    continue;
                }
                match enc.encode(&frame.samples) {
                    Ok(pkt) => {
                        let _ = out.try_send(Encoded {
                            data: Bytes::from(pkt),
                            keyframe: false,
                            duration: Duration::from_millis(20),
                            layer: 0,
                            padding: 0,
                        });
                    }
                    Err(e) => {
                        let _ = errors.send(format!("Opus encoder: {e}"));
                        return;
                    }
                }
            }
        })
        .expect("spawning a thread only fails when the OS is out of resources")
}

async fn negotiated_pt(sender: &Arc<dyn RtpSender>) -> Option<u8> {
    sender
        .get_parameters()
        .await
        .ok()?
        .rtp_parameters
        .codecs
        .first()
        .map(|c| c.payload_type)
}

/// A local track and its sender: one per simulcast layer for pictures, one for sound.
pub type LocalTrack = (Arc<TrackLocalStaticSample>, Arc<dyn RtpSender>);

/// Waits for the media path, then writes samples from `input` into `tracks` (a picture into
/// its layer's track).
pub async fn write_track(
    tracks: Vec<LocalTrack>,
    mut state: watch::Receiver<RTCPeerConnectionState>,
    input: Arc<tokio::sync::Mutex<mpsc::Receiver<Encoded>>>,
    video: Option<Arc<CaptureControl>>,
    counters: Arc<SendCounters>,
) {
    // One connection at a time reads the encoder's output; a new one after a reconnect waits
    // here until the old one's task has ended.
    let mut input = input.lock().await;
    if state
        .wait_for(|s| *s == RTCPeerConnectionState::Connected)
        .await
        .is_err()
    {
        return;
    }
    let mut outs = Vec::new();
    for (track, sender) in tracks {
        let Some(pt) = negotiated_pt(&sender).await else {
            warn!("no codec negotiated for a local track; not sending it");
            return;
        };
        let Some(&ssrc) = track.ssrcs().await.first() else {
            return;
        };
        outs.push((track, ssrc, pt));
    }
    // Start from a fresh keyframe on every layer: whatever queued before the connection is
    // stale.
    while input.try_recv().is_ok() {}
    let mut waiting_keyframe = vec![video.is_some(); outs.len()];
    if let Some(v) = &video {
        v.force_keyframe.store(true, Ordering::Relaxed);
    }
    while let Some(e) = input.recv().await {
        let Some((track, ssrc, pt)) = outs.get(e.layer) else {
            continue;
        };
        if waiting_keyframe[e.layer] && !e.keyframe {
            continue;
        }
        waiting_keyframe[e.layer] = false;
        let len = (e.data.len() - e.padding) as u64;
        let padding = e.padding as u64;
        let sample = Sample {
            data: e.data,
            duration: e.duration,
            ..Sample::new(Instant::now())
        };
        if let Err(err) = track.write_sample(*ssrc, *pt, &sample, &[]).await {
            debug!("write_sample: {err}");
            break;
        }
        if video.is_some() {
            // A picture counts once (on the lowest layer, which every picture sent is in).
            if e.layer == 0 {
                counters.video_frames.fetch_add(1, Ordering::Relaxed);
            }
            counters.video_bytes.fetch_add(len, Ordering::Relaxed);
            counters.probe_bytes.fetch_add(padding, Ordering::Relaxed);
            if e.keyframe {
                counters.video_keyframes.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            counters.audio_frames.fetch_add(1, Ordering::Relaxed);
            counters.audio_bytes.fetch_add(len, Ordering::Relaxed);
        }
    }
}

/// Turns PLI/FIR arriving for a layer's track into a keyframe on that layer's next picture.
pub async fn answer_keyframe_requests(
    track: Arc<TrackLocalStaticSample>,
    layer: usize,
    control: Arc<CaptureControl>,
    counters: Arc<SendCounters>,
) {
    while let Some(ev) = track.poll().await {
        if let TrackLocalEvent::OnRtcpPacket(_) = ev {
            counters.keyframe_requests.fetch_add(1, Ordering::Relaxed);
            if let Some(flag) = control.layer_keyframe.get(layer) {
                flag.store(true, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diemcau_media::synthetic::SyntheticCamera;
    use diemcau_media::VideoFrame;

    /// A camera that gives three pictures and is then unplugged.
    struct Unplugged(SyntheticCamera, u32);

    impl VideoSource for Unplugged {
        fn describe(&self) -> String {
            "camera giả".into()
        }
        fn size(&self) -> (usize, usize) {
            (320, 180)
        }
        fn fps(&self) -> u32 {
            30
        }
        fn read(&mut self) -> Result<VideoFrame, SourceError> {
            if self.1 == 0 {
                return Err(SourceError::Disconnected("camera giả".into()));
            }
            self.1 -= 1;
            Ok(self.0.frame_now())
        }
    }

    #[test]
    fn an_unplugged_camera_gives_way_to_the_test_pattern_without_stopping_the_stream() {
        let cam = Unplugged(SyntheticCamera::new(320, 180, 30, "x").unwrap(), 3);
        let control = Arc::new(CaptureControl::default());
        let (tx, mut rx) = mpsc::channel(64);
        let (etx, mut erx) = mpsc::unbounded_channel();
        let fallback: VideoFallback = Box::new(|| {
            SyntheticCamera::new(320, 180, 30, "x").map(|c| Box::new(c) as Box<dyn VideoSource>)
        });
        let t = spawn_video_thread(
            Box::new(cam),
            Some(fallback),
            500_000,
            Arc::new(AtomicU64::new(1_000_000f64.to_bits())),
            Arc::default(),
            control.clone(),
            Arc::new(SendCounters::default()),
            tx,
            etx,
            mpsc::unbounded_channel().0,
            false,
            1,
        );
        let mut frames = 0;
        while frames < 10 {
            rx.blocking_recv().expect("frames keep coming");
            frames += 1;
        }
        control.stop.store(true, Ordering::Relaxed);
        drop(rx);
        t.join().unwrap();
        let notice = erx.try_recv().expect("the person is told");
        assert!(
            notice.contains("thay thế") && notice.contains("rút ra"),
            "{notice}"
        );
        assert!(erx.try_recv().is_err(), "told once");
    }

    #[test]
    fn one_stream_follows_the_target_with_a_margin_going_up() {
        let vga = (640, 360);
        // 640x360@15 needs ~276 kbit/s; 320x180 is the floor for it.
        assert_eq!(layer_for(400_000, vga, 15, 1, 1_500_000), 1);
        assert_eq!(layer_for(250_000, vga, 15, 1, 1_500_000), 2);
        assert_eq!(layer_for(60_000, vga, 15, 1, 1_500_000), 2);
        // Coming back up needs 10 % more than the layer needs.
        assert_eq!(layer_for(290_000, vga, 15, 2, 1_500_000), 2);
        assert_eq!(layer_for(310_000, vga, 15, 2, 1_500_000), 1);
        // 1280x720@30 needs more than 80 % of a 1.5 Mbit/s cap: the cap is what it needs.
        let hd = (1280, 720);
        assert_eq!(layer_for(1_250_000, hd, 30, 1, 1_500_000), 1);
        assert_eq!(layer_for(1_000_000, hd, 30, 1, 1_500_000), 2);
        assert_eq!(layer_for(200_000, hd, 30, 1, 1_500_000), 4);
        // A 320x180 camera has no lower layer.
        assert_eq!(layer_for(10_000, (320, 180), 15, 1, 1_500_000), 1);
    }

    #[test]
    fn layer_pictures_are_halved_from_the_layer_above() {
        let full = SyntheticCamera::new(1280, 720, 15, "x")
            .unwrap()
            .frame_now()
            .picture;
        let p = layer_pictures(&full, &[4, 2, 1]);
        assert!(p[2].is_none(), "the top layer is the picture itself");
        let half = p[1].as_ref().unwrap();
        assert_eq!(*half, full.halved());
        assert_eq!(*p[0].as_ref().unwrap(), half.halved());
        // Not a halving of the layer above: scaled from the picture.
        let p = layer_pictures(&full, &[4, 1]);
        let quarter = p[0].as_ref().unwrap();
        assert_eq!(*quarter, full.downscaled(4));
        assert_eq!((quarter.width, quarter.height), (320, 180));
    }

    #[test]
    fn layers_are_halvings_down_to_320x180_at_most_the_tracks() {
        assert_eq!(layer_divisors((1280, 720), 3), vec![4, 2, 1]);
        assert_eq!(layer_divisors((1280, 720), 2), vec![2, 1]);
        assert_eq!(layer_divisors((640, 360), 3), vec![2, 1]);
        assert_eq!(layer_divisors((640, 480), 3), vec![2, 1]);
        assert_eq!(layer_divisors((320, 180), 3), vec![1]);
        assert_eq!(layer_divisors((160, 90), 3), vec![1]);
        assert_eq!(layer_divisors((1280, 720), 0), vec![1]);
    }

    #[test]
    fn layers_are_sent_lowest_first_as_the_target_allows_with_a_margin_to_start_one() {
        let vga = [(320, 180), (640, 360)];
        // 320x180@15 needs ~98 kbit/s (49 as a lower layer), 640x360@15 ~276.
        assert_eq!(send_layers(250_000, &vga, 15, 2, 1_500_000), vec![250_000]);
        assert_eq!(send_layers(60_000, &vga, 15, 1, 1_500_000), vec![60_000]);
        let two = send_layers(400_000, &vga, 15, 1, 1_500_000);
        assert_eq!(two.len(), 2, "{two:?}");
        assert_eq!(two[0], 48_875);
        assert_eq!(two.iter().sum::<u32>(), 400_000);
        // Starting the top layer needs 10 % more than it needs; keeping it does not.
        assert_eq!(send_layers(350_000, &vga, 15, 1, 1_500_000).len(), 1);
        assert_eq!(send_layers(350_000, &vga, 15, 2, 1_500_000).len(), 2);
        assert_eq!(send_layers(320_000, &vga, 15, 2, 1_500_000).len(), 1);
        // 1280x720@30 needs more than the 1.5 Mbit/s cap leaves: the cap is what it needs.
        let hd = [(320, 180), (640, 360), (1280, 720)];
        let three = send_layers(1_350_000, &hd, 30, 2, 1_500_000);
        assert_eq!(three.len(), 3, "{three:?}");
        assert_eq!(three.iter().sum::<u32>(), 1_350_000);
        assert_eq!(send_layers(1_000_000, &hd, 30, 3, 1_500_000).len(), 2);
        assert_eq!(send_layers(200_000, &hd, 30, 3, 1_500_000), vec![200_000]);
        // One layer: it takes the whole target, up to the cap.
        assert_eq!(
            send_layers(2_000_000, &[(320, 180)], 15, 1, 1_500_000),
            vec![1_500_000]
        );
    }

    #[test]
    fn video_pauses_on_a_thin_link_and_resumes_with_a_growing_hold() {
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let mut g = VideoGate::default();
        // A dip shorter than PAUSE_AFTER does nothing.
        assert_eq!(g.update(at(0.0), 90_000.0), None);
        assert_eq!(g.update(at(2.0), 90_000.0), None);
        assert_eq!(g.update(at(2.5), 150_000.0), None);
        assert_eq!(g.update(at(3.0), 90_000.0), None);
        assert_eq!(g.update(at(6.9), 90_000.0), None);
        assert_eq!(g.update(at(7.0), 90_000.0), Some(true), "4 s below");
        assert!(g.paused());
        // Between the thresholds: stays paused.
        assert_eq!(g.update(at(20.0), 150_000.0), None);
        assert_eq!(g.update(at(21.0), 180_000.0), None);
        assert_eq!(g.update(at(24.0), 180_000.0), Some(false), "held 3 s");
        // On probation pictures use at most the resume threshold, and a low estimate pauses
        // them again after a second.
        assert_eq!(g.usable(at(25.0), 400_000.0), PROBE_BPS);
        assert_eq!(g.update(at(25.0), 80_000.0), None);
        assert_eq!(g.update(at(26.0), 80_000.0), Some(true), "1 s on probation");
        // Paused again within 30 s: a premature resume; the next hold is 6 s.
        assert_eq!(g.hold(), Duration::from_secs(6));
        assert_eq!(g.update(at(34.0), 200_000.0), None);
        assert_eq!(g.update(at(39.0), 200_000.0), None);
        assert_eq!(g.update(at(40.0), 200_000.0), Some(false));
        // Off probation: the estimate is used as it is, and a dip needs 4 s again.
        assert_eq!(g.usable(at(48.5), 400_000.0), 400_000.0);
        assert_eq!(g.update(at(49.0), 80_000.0), None);
        assert_eq!(g.update(at(52.0), 80_000.0), None);
        assert_eq!(g.update(at(53.0), 80_000.0), Some(true));
        assert_eq!(g.hold(), Duration::from_secs(12));
        assert_eq!(g.update(at(54.0), 200_000.0), None);
        assert_eq!(g.update(at(66.0), 200_000.0), Some(false));
        // A probe the link carries ends its probation early: 3 s at the resume threshold.
        assert_eq!(g.update(at(67.0), 200_000.0), None);
        assert!(g.on_probation(at(69.0)));
        assert_eq!(g.update(at(70.0), 200_000.0), None);
        assert!(!g.on_probation(at(70.0)));
        assert_eq!(g.usable(at(70.0), 400_000.0), 400_000.0);
        // Holds double up to the cap.
        g.restart(at(70.0));
        let mut t = 70.0;
        for _ in 0..8 {
            g.update(at(t + 1.0), 80_000.0);
            assert_eq!(g.update(at(t + 2.0), 80_000.0), Some(true));
            t += 2.0;
            g.update(at(t + 0.5), 200_000.0);
            t += 0.5 + g.hold().as_secs_f64();
            assert_eq!(g.update(at(t), 200_000.0), Some(false));
        }
        assert_eq!(g.hold(), RESUME_HOLD_MAX);
        // A minute without a pause resets the hold.
        assert_eq!(g.update(at(t + 61.0), 500_000.0), None);
        assert_eq!(g.hold(), RESUME_HOLD);
    }

    /// A layer the estimate allows but the acknowledged rate does not prove waits (and the
    /// uplink is probed); layers already sent are not stopped for want of proof.
    #[test]
    fn a_layer_starts_only_on_a_proven_estimate() {
        let vga = [(320, 180), (640, 360)];
        // 480 kbit/s of estimate: two layers; 200 kbit/s acknowledged proves 310 kbit/s.
        let target = video_share(480_000.0, 1_500_000);
        let proven = video_share(480_000f64.min(proven_bps(200_000.0)), 1_500_000);
        let (rates, unproven) = proven_layers((target, proven), &vga, 15, 1, 1_500_000);
        assert_eq!((rates, unproven), (vec![target], true));
        // Proved: both, with the top one getting the rest.
        let proven = video_share(480_000f64.min(proven_bps(330_000.0)), 1_500_000);
        let (rates, unproven) = proven_layers((target, proven), &vga, 15, 1, 1_500_000);
        assert_eq!(rates.len(), 2);
        assert!(!unproven);
        // Already sending two: kept on the estimate alone.
        let proven = video_share(proven_bps(50_000.0), 1_500_000);
        let (rates, unproven) = proven_layers((target, proven), &vga, 15, 2, 1_500_000);
        assert_eq!((rates.len(), unproven), (2, false));
        // Nothing acknowledged yet: one layer, however high the estimate (a reconnect).
        let (rates, unproven) = proven_layers((target, 0), &vga, 15, 0, 1_500_000);
        assert_eq!((rates, unproven), (vec![target], true));
        // A target for one layer: nothing waits.
        let (rates, unproven) = proven_layers((200_000, 0), &vga, 15, 1, 1_500_000);
        assert_eq!((rates, unproven), (vec![200_000], false));
        // Three layers allowed, two proven: two.
        let hd = [(320, 180), (640, 360), (1280, 720)];
        let (rates, unproven) = proven_layers((1_400_000, 800_000), &hd, 30, 1, 1_500_000);
        assert_eq!((rates.len(), unproven), (2, true));
    }

    #[test]
    fn the_estimate_for_one_more_layer_is_where_send_layers_adds_it() {
        let vga = [(320, 180), (640, 360)];
        let e = estimate_for_more_layers(1, &vga, 15, 1, 1_500_000).unwrap();
        let layers = |e: f64| send_layers(video_share(e, 1_500_000), &vga, 15, 1, 1_500_000).len();
        assert_eq!((layers(e), layers(e - 1_000.0)), (2, 1), "{e}");
        assert!((400_000.0..480_000.0).contains(&e), "{e}");
        assert_eq!(estimate_for_more_layers(2, &vga, 15, 1, 1_500_000), None);
    }

    #[test]
    fn the_uplink_is_probed_for_a_while_and_not_too_often() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut p = LayerProbe::default();
        let e = 400_000.0;
        assert!(!p.update(at(0), false, e));
        assert!(p.update(at(100), true, e));
        assert!(p.update(at(1000), true, e));
        assert!(
            !p.update(at(1800), true, e),
            "over after {LAYER_PROBE_FOR:?}"
        );
        assert!(!p.update(at(3000), true, e));
        assert!(
            p.update(at(4200), true, e),
            "again after {LAYER_PROBE_EVERY:?}"
        );
        // The layer started: the probe ends at once.
        assert!(!p.update(at(4300), false, e));
        assert!(!p.update(at(4400), true, e));
        assert!(p.update(at(8300), true, e));
        // A queue brought the estimate down: the probe ends too.
        assert!(p.update(at(8600), true, 0.95 * e));
        assert!(!p.update(at(8700), true, 0.85 * e));
        assert!(!p.update(at(9000), true, e));
        // Padding fills up to the probe's share of the estimate.
        let pad = LayerProbe::padding_bytes(500_000.0, 150_000.0, 15);
        let want = (500_000.0 * LAYER_PROBE_SHARE - PROBE_SOUND_BPS - 150_000.0) / 8.0 / 15.0;
        assert!((pad as f64 - want).abs() < 1.0, "{pad}");
        assert_eq!(LayerProbe::padding_bytes(200_000.0, 150_000.0, 15), 0);
        assert_eq!(LayerProbe::padding_bytes(1e9, 0.0, 15), PROBE_MAX_BYTES);
    }

    #[test]
    fn video_share_leaves_room_for_audio_and_respects_cap() {
        assert_eq!(video_share(1_000_000.0, 2_000_000), 860_000);
        assert_eq!(video_share(10_000_000.0, 1_500_000), 1_500_000);
        assert_eq!(video_share(50_000.0, 1_500_000), 60_000);
    }
}
