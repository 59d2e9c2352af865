//! The JSON report `diemcau-cli join --report json` prints when it leaves. Field names are a
//! contract other tools rely on; add fields, never rename or remove them.

use diemcau_protocol::{FloorState, Hand};
use serde::{Deserialize, Serialize};

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
}

/// The others' sound as the speaker played it, all sites together: 20 ms turns, and the
/// jitter buffers' depth.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Playout {
    /// Turns played with sound: decoded, rebuilt from FEC, or invented.
    pub frames: u64,
    pub decoded: u64,
    pub fec: u64,
    /// Invented by concealment for a lost packet.
    pub concealed: u64,
    /// Invented by concealment while waiting for a late packet (the buffer grew a frame).
    pub expanded: u64,
    /// Left out to bring a buffer back down to the depth it aims for.
    pub dropped: u64,
    /// Packets that came after their turn and were not played.
    pub late: u64,
    /// How long packets waited in a buffer, from arrival to playout (ms): over the meeting,
    /// and averaged over the last second (the longest of the buffers).
    pub delay_ms: Latency,
    pub delay_now_ms: f64,
    /// The depth the buffers aim for now (ms): more while packets come unevenly.
    pub target_ms: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sent {
    pub video_frames: u64,
    pub video_keyframes: u64,
    pub video_bytes: u64,
    pub audio_frames: u64,
    /// Keyframe requests (PLI/FIR) that reached our encoder.
    pub keyframe_requests: u64,
    /// Encoder bitrate when leaving (bps).
    pub video_bitrate_bps: u64,
    /// The top spatial layer sent when leaving: the divisor of the source's size (1 = full).
    #[serde(default)]
    pub video_layer: u64,
    /// How many layers were being sent when leaving (simulcast).
    #[serde(default)]
    pub video_layers: u64,
    /// Times pictures were paused because the link was too thin (sound only meanwhile).
    #[serde(default)]
    pub video_pauses: u64,
    /// Time spent so paused (ms).
    #[serde(default)]
    pub video_paused_ms: u64,
    /// Probe padding sent in pictures before starting a layer (bytes, not in `video_bytes`;
    /// the server removes it), and how many probes.
    #[serde(default)]
    pub probe_bytes: u64,
    #[serde(default)]
    pub layer_probes: u64,
}

/// What arrived from one remote site.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Received {
    pub site: String,
    /// Decoded pictures.
    pub video_frames: u64,
    /// Pictures whose stamp was intact and carried this site's tag.
    pub video_frames_verified: u64,
    pub video_frames_lost: u64,
    pub video_frames_out_of_order: u64,
    pub video_decode_errors: u64,
    pub audio_frames: u64,
    pub audio_frames_verified: u64,
    /// Lost sound frames rebuilt from in-band FEC.
    #[serde(default)]
    pub audio_frames_repaired: u64,
    /// Lost sound frames not rebuilt (the decoder concealed them).
    #[serde(default)]
    pub audio_frames_concealed: u64,
    /// Decoded pictures by size, e.g. {"640x360": 300, "320x180": 120}.
    #[serde(default)]
    pub layers: std::collections::BTreeMap<String, u64>,
    pub latency_ms: Latency,
    pub psnr_db: Option<f64>,
    /// From the start of the join to this site's first verified picture.
    pub first_verified_ms: Option<f64>,
    /// Media payload received from the site over the stay, on average (bps).
    #[serde(default)]
    pub bitrate_bps: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub site: String,
    pub room: String,
    pub server: String,
    pub duration_s: f64,
    /// "udp" or "tcp": the transport of the selected ICE candidate pair.
    pub transport: Option<String>,
    pub sent: Sent,
    pub received: Vec<Received>,
    /// Glass-to-glass video latency over all remote sites.
    pub latency_ms: Latency,
    /// From the start of the join to the first verified remote picture.
    pub join_ms: Option<f64>,
    pub keyframe_requests_sent: u64,
    /// Sites seen in the room (joined before or during our stay), by id.
    pub sites_seen: Vec<String>,
    /// Where each site seen sits in the tree: its ancestors, root first (a commune behind a
    /// district relay shows the province and the district, under its own id).
    #[serde(default)]
    pub site_paths: std::collections::BTreeMap<String, Vec<String>>,
    /// Problems met on the way, in Vietnamese.
    pub errors: Vec<String>,
    /// Picture sizes received, by site (largest first).
    #[serde(default)]
    pub layers_received: std::collections::BTreeMap<String, Vec<String>>,
    /// Lost sound frames concealed, all sites together.
    #[serde(default)]
    pub audio_frames_concealed: u64,
    /// Times the site joined again by itself after a lost connection.
    #[serde(default)]
    pub reconnects: u64,
    /// Times the others' pictures were turned off because this site's downlink lost too
    /// much (sound only meanwhile).
    #[serde(default)]
    pub video_receive_pauses: u64,
    /// Round trip to the server last measured (ICE checks on the media path).
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    /// Of what this site sent, the share the server reported lost (smoothed, percent).
    #[serde(default)]
    pub uplink_loss_pct: Option<f64>,
    /// Packets the server's transport-wide feedback reported on, over the meeting, and of
    /// those the ones it reported lost.
    #[serde(default)]
    pub uplink_packets_reported: u64,
    #[serde(default)]
    pub uplink_packets_reported_lost: u64,
    /// Of those reported lost, the ones no feedback that arrived covered, taken as a lost
    /// feedback rather than lost packets and left out of the bandwidth estimate.
    #[serde(default)]
    pub uplink_packets_left_out: u64,
    /// What the speaker played of the others' sound; `None` without a speaker.
    #[serde(default)]
    pub audio_playout: Option<Playout>,
    /// The hand queue as this site last saw it.
    pub hand_queue: Vec<Hand>,
    /// The floor as this site last saw it.
    pub floor: Option<FloorState>,
}
