//! The Điểm cầu conference engine: joins a room on a `diemcau-server`, publishes a site's
//! camera and microphone (or their synthetic twins) as H.264 and Opus over WebRTC
//! (webrtc-rs 0.21), and receives, decodes and verifies the other sites' media.
//!
//! ```no_run
//! # async fn demo() -> Result<(), diemcau_client::ClientError> {
//! use diemcau_client::{JoinOptions, Room, RoomEvent};
//! let (room, mut events) = Room::connect("ws://127.0.0.1:7600", JoinOptions::synthetic("xa-a", "hop")).await?;
//! while let Some(ev) = events.recv().await {
//!     if let RoomEvent::SiteJoined { site } = ev { println!("{} vào phòng", site.name); }
//! }
//! let report = room.leave().await;
//! # Ok(()) }
//! ```
//!
//! Layout: [`signal`] is the one boundary with the wire protocol; [`peer`] builds the
//! WebRTC peer connection; [`publish`] runs capture → encode threads and writes samples;
//! [`receive`] reads remote tracks, depacketises, decodes and verifies; [`room`] ties them
//! together behind [`Room`] and a stream of [`RoomEvent`]s; [`report`] is the JSON report
//! `diemcau-cli join` prints.

pub mod assemble;
pub mod control;
pub mod pacing;
pub mod peer;
pub mod publish;
pub mod quality;
pub mod receive;
pub mod report;
pub mod room;
pub mod settings;
pub mod signal;

use std::sync::Arc;
use std::time::Duration;

use diemcau_media::I420Frame;
use diemcau_protocol::{
    ErrorCode, FloorState, Hand, LeaveReason, MediaKind, Role, RollEntry, SiteId, SiteInfo,
};

pub use report::Report;
pub use room::{AudioInput, JoinOptions, Room, SpeakerOutput, VideoInput};

/// What can go wrong when joining or in a meeting.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the server at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("the server at {url} has a certificate this machine does not trust: {detail}")]
    Certificate { url: String, detail: String },
    #[error("the server at {url} accepts only wss:// (TLS)")]
    NeedsTls { url: String },
    #[error("the server refused: {message} ({code:?})")]
    Refused { code: ErrorCode, message: String },
    #[error("the server closed the connection")]
    ServerClosed,
    #[error("the server did not answer in time ({0})")]
    Timeout(&'static str),
    #[error("media connection failed: {0}")]
    Media(String),
    #[error("WebRTC: {0}")]
    WebRtc(String),
    #[error("device or codec: {0}")]
    Device(String),
}

impl ClientError {
    pub(crate) fn webrtc(e: impl std::fmt::Display) -> Self {
        ClientError::WebRtc(e.to_string())
    }

    /// A sentence for a person, in Vietnamese.
    pub fn vi(&self) -> String {
        match self {
            ClientError::Certificate { url, .. } => format!(
                "Chứng chỉ bảo mật của máy chủ {url} không hợp lệ hoặc máy này chưa tin cậy nó. \
                 Hãy báo bộ phận kỹ thuật của tỉnh."
            ),
            ClientError::NeedsTls { url } => format!(
                "Máy chủ {url} chỉ nhận kết nối bảo mật: hãy dùng địa chỉ bắt đầu bằng wss://."
            ),
            ClientError::Unreachable { url, .. } => format!(
                "Không kết nối được tới máy chủ {url}. Hãy kiểm tra mạng hoặc địa chỉ máy chủ."
            ),
            ClientError::Refused { code, .. } => code.vi().to_string(),
            ClientError::ServerClosed => "Máy chủ đã đóng kết nối.".into(),
            ClientError::Timeout(_) => "Máy chủ không trả lời kịp; hãy thử lại.".into(),
            ClientError::Media(_) => ErrorCode::MediaTimeout.vi().to_string(),
            ClientError::WebRtc(_) => "Lỗi thiết lập kết nối hình và tiếng.".into(),
            ClientError::Device(d) => format!("Lỗi thiết bị hoặc bộ mã hóa: {d}"),
        }
    }
}

/// What happens in a room, as the engine sees it.
#[derive(Debug, Clone)]
pub enum RoomEvent {
    Joined {
        you: SiteInfo,
        role: Role,
        sites: Vec<SiteInfo>,
    },
    SiteJoined {
        site: SiteInfo,
    },
    SiteLeft {
        site: SiteId,
        reason: LeaveReason,
    },
    /// The server started sending this site's media to us.
    TrackAdded {
        site: SiteId,
        kind: MediaKind,
    },
    TrackRemoved {
        site: SiteId,
        kind: MediaKind,
    },
    /// ICE and DTLS are up; media flows.
    MediaConnected,
    /// The first picture from `site` whose stamp checked out.
    FirstVerifiedFrame {
        site: SiteId,
        since_join: Duration,
    },
    /// Pictures from `site` now arrive at this size (its sender changed layer for its link).
    VideoLayer {
        site: SiteId,
        width: usize,
        height: usize,
    },
    /// A decoded remote picture (only with [`JoinOptions::deliver_video`]).
    VideoFrame {
        site: SiteId,
        picture: Arc<I420Frame>,
    },
    /// A picture this site is sending (self view; only with [`JoinOptions::deliver_video`]).
    LocalFrame {
        picture: Arc<I420Frame>,
    },
    /// An error the server reported; `fatal` ends the meeting.
    ServerError {
        code: ErrorCode,
        message: String,
        fatal: bool,
    },
    /// The hand queue as this site may see it.
    Hands {
        queue: Vec<Hand>,
        total: u32,
    },
    /// The floor changed.
    Floor {
        state: FloorState,
    },
    /// The chair asks this site to unmute; answer with [`Room::reply_unmute`].
    AskUnmute {
        by: SiteId,
    },
    /// The roll-call changed (chair only).
    RollCall {
        entries: Vec<RollEntry>,
    },
    /// A local device or codec failed (the message is Vietnamese).
    DeviceError {
        message: String,
    },
    /// The connection to the server was lost; the room is joining again by itself (the
    /// devices keep running, the server keeps the site's hand and floor).
    Reconnecting {
        reason: String,
    },
    /// Back in the room after [`RoomEvent::Reconnecting`], `after` the loss was noticed.
    Reconnected {
        after: Duration,
    },
    /// The meeting ended for this site (the server refused it for good after a lost
    /// connection).
    Disconnected {
        reason: String,
    },
    /// The link became too thin for pictures: sound only is sent (`paused`), or it has
    /// recovered and pictures are sent again.
    VideoPausedForLink {
        paused: bool,
    },
    /// This site's downlink lost too much: the others' pictures are turned off for a while
    /// (`paused`), or tried again.
    ReceiveVideoPausedForLink {
        paused: bool,
    },
    /// From a district relay: its link to the parent (province) room was lost
    /// (`connected: false`; the district's own meeting carries on) or is back.
    Upstream {
        connected: bool,
        /// The district chair took the meeting out of the province's (not a lost link).
        chosen: bool,
    },
    /// This site's link and what arrives from each other site, every
    /// [`quality::QUALITY_EVERY`].
    Quality(quality::Quality),
}
