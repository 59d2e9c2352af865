//! Wire types of Điểm cầu: the signalling messages exchanged over the WebSocket between a site
//! and the room server, the site directory, and the error codes both ends share.
//!
//! This crate does no I/O. Everything else in the workspace speaks domain types and converts
//! at one boundary (the client's `signal` module, the server's `signalling` module).
//!
//! # Wire format
//! Each WebSocket text message is one JSON object with a `"type"` field (snake_case). The
//! first message a client sends is [`ClientMessage::Join`] carrying
//! [`PROTOCOL_VERSION`]; a message larger than [`MAX_MESSAGE_BYTES`] is refused. See
//! `docs/protocol.md` for the whole conversation.

pub mod directory;
pub mod meeting;
pub mod padding;
pub mod token;

use serde::{Deserialize, Serialize};

pub use directory::{Directory, DirectoryError, SiteEntry};
pub use meeting::{
    ChairCommand, FloorMode, FloorState, Hand, MeetingSnapshot, RollEntry, RollStatus,
};

/// Version of the signalling protocol; a join with another `v` is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest signalling message either side accepts, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// A site's id in the directory (ASCII slug such as `tp-vinh-hung-dung`).
pub type SiteId = String;

/// Place of a site in the administrative tree. The tree's depth is data; the level is a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Province,
    District,
    Commune,
}

/// What a site may do in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Chair,
    District,
    Commune,
    Observer,
}

/// A site as the room describes it to others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteInfo {
    pub id: SiteId,
    pub name: String,
    pub level: Level,
    /// Ancestor ids from the root down (empty for the root).
    pub path: Vec<SiteId>,
    /// The ancestors' names, in the same order (so a roster can head a group with its
    /// district's name even when the district is not in the room). Optional on the wire
    /// (servers before it omit it); empty for sites not in the directory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_names: Vec<String>,
}

/// Most pictures a relay sends up at once (the district hall and the floor or spotlight).
pub const RELAY_UP_VIDEO: usize = 2;
/// Most sounds a relay sends up at once (the loudest sites behind it).
pub const RELAY_UP_AUDIO: usize = 3;

/// A site behind a relay (or, going down, a member of the parent's room) and its role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelaySite {
    pub site: SiteInfo,
    pub role: Role,
}

/// Media kind of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaKind {
    Audio,
    Video,
}

/// Which remote site the server currently forwards on one of the client's receive slots.
/// `site: None` means the slot is idle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotAssignment {
    pub mid: String,
    pub kind: MediaKind,
    pub site: Option<SiteId>,
}

/// Messages a site sends to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// First message on a connection.
    Join {
        v: u32,
        room: String,
        site: SiteId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// A control session (an operator's CLI): not a site in the roster, sends no media,
        /// may give the commands its token's role allows.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        control: bool,
        /// Coming back after a lost connection: if the room still holds this site (the
        /// server has not yet noticed the old connection is gone), the old connection is
        /// dropped as `disconnected` instead of refusing with `site_taken`. Hand and floor
        /// are kept either way; a room locked since is entered again.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resume: bool,
        /// A district relay (`diemcau-server --upstream`) joining as one peer for the sites
        /// behind it: not itself in the roster; it names those sites with `relay_sites`,
        /// sends up to [`RELAY_UP_VIDEO`] pictures and [`RELAY_UP_AUDIO`] sounds on
        /// send-only m-lines named by `relay_sources`, and gets `relay_meeting`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        relay: bool,
    },
    /// Relay only: every site behind the relay now (the whole list; it replaces the last).
    RelaySites {
        sites: Vec<RelaySite>,
    },
    /// Relay only: which site each of the relay's send-only m-lines carries now (the whole
    /// mapping, as `slots` is for receive slots; `site: null` = idle).
    RelaySources {
        sources: Vec<SlotAssignment>,
    },
    /// Relay only: a site behind the relay raised (`up`) or lowered its hand.
    RelayHand {
        site: SiteId,
        up: bool,
    },
    /// Relay only: a site behind the relay answered `ask_unmute`.
    RelayUnmuteReply {
        site: SiteId,
        accept: bool,
    },
    /// Relay only: a site behind the relay left on purpose (or was removed there): it leaves
    /// the parent's room as `left`, giving up its hand, grant and spotlight.
    RelayLeft {
        site: SiteId,
    },
    /// Trade the site's enrollment secret (from the installer) for a short-lived token.
    /// Answered with `enrolled` or an error; may come instead of `join` as first message.
    Enroll {
        v: u32,
        room: String,
        site: SiteId,
        secret: String,
    },
    /// Raises the site's hand. `raised_at_ms`: when it first went up (the server's time, as
    /// the site last saw it in `hands`), sent by a site that comes back (`resume`) to a server
    /// that no longer holds it — one that restarted — so the hand takes its old place among
    /// the others coming back. A server honours it only as the first hand command of a
    /// `resume` within 15 min of its start, for a time before that start and in the last
    /// 24 h; any other `raise_hand` carrying it is ignored (the hand was lowered meanwhile,
    /// or never lost). docs/protocol.md §11.5.
    RaiseHand {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        raised_at_ms: Option<u64>,
    },
    LowerHand,
    /// A chair command; answered with `ack` or `error` carrying the same `id`.
    Chair {
        id: u64,
        command: ChairCommand,
    },
    /// The site's answer to `ask_unmute`.
    UnmuteReply {
        accept: bool,
    },
    /// The client's SDP offer: one send-only audio and video m-line (what it publishes) and
    /// the receive-only slots the `welcome` message asked for.
    Offer {
        sdp: String,
    },
    /// Ask the publisher side of the server for a keyframe of a remote site's video. Normally
    /// RTCP PLI does this; this message is the fallback for clients whose stack cannot.
    RequestKeyframe {
        site: SiteId,
    },
    /// Whether to receive the other sites' pictures (default on). Off, the server empties
    /// this site's video slots (a `slots` message follows) and sends it sound only, for a
    /// downlink too thin for pictures; on again, the slots fill and keyframes are asked for.
    ReceiveVideo {
        on: bool,
    },
    /// Liveness probe; answered with `pong`.
    Ping {
        #[serde(default)]
        id: u64,
    },
    /// Leave the room cleanly.
    Leave,
}

/// Messages the server sends to a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The join was accepted. The client now sends an `offer` with one send-only audio and
    /// one send-only video m-line followed by `video_slots` receive-only video and
    /// `audio_slots` receive-only audio m-lines.
    Welcome {
        v: u32,
        room: String,
        you: SiteInfo,
        role: Role,
        video_slots: u8,
        audio_slots: u8,
        /// Sites already in the room.
        sites: Vec<SiteInfo>,
    },
    /// The server's answer to the client's offer.
    Answer {
        sdp: String,
    },
    SiteJoined {
        site: SiteInfo,
    },
    SiteLeft {
        site: SiteId,
        reason: LeaveReason,
    },
    /// The full current mapping of the client's receive slots. Sent after the answer and
    /// whenever it changes; the newest message replaces the older one.
    Slots {
        slots: Vec<SlotAssignment>,
    },
    Pong {
        id: u64,
    },
    /// The enrollment secret was accepted: join with this token until it expires.
    Enrolled {
        token: String,
        exp: u64,
    },
    /// The hand queue as the recipient may see it: the chair sees every hand, a district
    /// its own and its communes', any other site only its own. `total` counts all hands.
    Hands {
        queue: Vec<Hand>,
        total: u32,
    },
    /// The floor as the recipient sees it.
    Floor {
        state: FloorState,
    },
    /// The chair asks this site to unmute; it answers with `unmute_reply`.
    AskUnmute {
        by: SiteId,
    },
    /// A chair command with this id was carried out.
    Ack {
        id: u64,
    },
    /// The roll-call, sent to the chair whenever it changes.
    RollCall {
        entries: Vec<RollEntry>,
    },
    /// Answer to `roll_call_export`.
    RollCallCsv {
        id: u64,
        csv: String,
    },
    /// To a relay: the room's meeting state (whole, not one site's view) and every member
    /// not behind this relay, sent after every change. The relay shows its own sites their
    /// views of it.
    RelayMeeting {
        state: MeetingSnapshot,
        members: Vec<RelaySite>,
    },
    /// To a relay: the chair asks a site behind it to unmute.
    RelayAskUnmute {
        site: SiteId,
        by: SiteId,
    },
    /// To a relay: the chair removed a site behind it.
    RelayRemove {
        site: SiteId,
    },
    /// From a district relay to its own sites: whether its link to the parent (province)
    /// room is up. While it is down the district's own meeting carries on. `chosen`: the
    /// district chair took the meeting out of the parent's (not a lost link).
    Upstream {
        connected: bool,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        chosen: bool,
    },
    /// Something went wrong. `fatal: true` means the server closes the connection next.
    /// `id` is set when the error answers a chair command.
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default)]
        fatal: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
}

/// Why a site left the room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    /// The site said `leave`.
    Left,
    /// The WebSocket closed or the media path timed out.
    Disconnected,
    /// The server refused the site after a protocol error.
    Dropped,
    /// The chair removed the site.
    Removed,
}

/// Error codes on the wire. Clients branch on these and show [`ErrorCode::vi`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadJson,
    UnknownType,
    UnsupportedVersion,
    TooLarge,
    BadSdp,
    SiteTaken,
    UnknownSite,
    Unauthenticated,
    NotJoined,
    AlreadyJoined,
    RoomFull,
    MediaTimeout,
    TokenExpired,
    TokenWrongRoom,
    TokenInvalid,
    Forbidden,
    Removed,
    RoomLocked,
    NotInRoom,
    Internal,
}

impl ErrorCode {
    /// Every code, for tables and tests.
    pub const ALL: [ErrorCode; 20] = [
        ErrorCode::BadJson,
        ErrorCode::UnknownType,
        ErrorCode::UnsupportedVersion,
        ErrorCode::TooLarge,
        ErrorCode::BadSdp,
        ErrorCode::SiteTaken,
        ErrorCode::UnknownSite,
        ErrorCode::Unauthenticated,
        ErrorCode::NotJoined,
        ErrorCode::AlreadyJoined,
        ErrorCode::RoomFull,
        ErrorCode::MediaTimeout,
        ErrorCode::TokenExpired,
        ErrorCode::TokenWrongRoom,
        ErrorCode::TokenInvalid,
        ErrorCode::Forbidden,
        ErrorCode::Removed,
        ErrorCode::RoomLocked,
        ErrorCode::NotInRoom,
        ErrorCode::Internal,
    ];

    /// A sentence for a person, in Vietnamese.
    pub fn vi(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "Máy chủ không hiểu tin nhắn từ ứng dụng (dữ liệu hỏng).",
            ErrorCode::UnknownType => "Máy chủ không nhận ra yêu cầu này; hãy cập nhật ứng dụng.",
            ErrorCode::UnsupportedVersion => {
                "Phiên bản ứng dụng không tương thích với máy chủ; hãy cập nhật ứng dụng."
            }
            ErrorCode::TooLarge => "Tin nhắn gửi lên máy chủ quá lớn.",
            ErrorCode::BadSdp => "Không thiết lập được kết nối hình và tiếng với máy chủ.",
            ErrorCode::SiteTaken => "Điểm cầu này đã đang tham gia phòng họp từ một máy khác.",
            ErrorCode::UnknownSite => "Mã điểm cầu không có trong danh bạ của máy chủ.",
            ErrorCode::Unauthenticated => "Máy chủ từ chối: thiếu hoặc sai mã xác thực.",
            ErrorCode::NotJoined => "Chưa tham gia phòng họp.",
            ErrorCode::AlreadyJoined => "Điểm cầu đã tham gia phòng họp rồi.",
            ErrorCode::RoomFull => "Phòng họp đã đầy.",
            ErrorCode::MediaTimeout => {
                "Không kết nối được đường hình và tiếng tới máy chủ; mạng có thể đang chặn kết nối."
            }
            ErrorCode::TokenExpired => "Mã tham gia đã hết hạn; hãy xin mã mới.",
            ErrorCode::TokenWrongRoom => "Mã tham gia không dành cho phòng họp này.",
            ErrorCode::TokenInvalid => "Mã tham gia không hợp lệ.",
            ErrorCode::Forbidden => "Điểm cầu của bạn không có quyền thực hiện thao tác này.",
            ErrorCode::Removed => "Chủ tọa đã mời điểm cầu của bạn ra khỏi phòng họp.",
            ErrorCode::RoomLocked => "Phòng họp đã khóa; không thể tham gia lúc này.",
            ErrorCode::NotInRoom => "Điểm cầu được chọn không có trong phòng họp.",
            ErrorCode::Internal => "Máy chủ gặp lỗi nội bộ; hãy thử lại sau ít phút.",
        }
    }

    /// A sentence for a person, in English.
    pub fn en(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "The server could not read a message from the app.",
            ErrorCode::UnknownType => "The server does not know this request; update the app.",
            ErrorCode::UnsupportedVersion => "This app version does not match the server.",
            ErrorCode::TooLarge => "A message to the server was too large.",
            ErrorCode::BadSdp => "Could not set up audio and video with the server.",
            ErrorCode::SiteTaken => "This site is already in the meeting from another computer.",
            ErrorCode::UnknownSite => "The site id is not in the server's directory.",
            ErrorCode::Unauthenticated => "The server refused: missing or invalid credentials.",
            ErrorCode::NotJoined => "Not in the meeting yet.",
            ErrorCode::AlreadyJoined => "This site has already joined.",
            ErrorCode::RoomFull => "The meeting room is full.",
            ErrorCode::MediaTimeout => {
                "Audio and video could not reach the server; the network may block them."
            }
            ErrorCode::TokenExpired => "The join token has expired; ask for a new one.",
            ErrorCode::TokenWrongRoom => "The join token is not for this room.",
            ErrorCode::TokenInvalid => "The join token is not valid.",
            ErrorCode::Forbidden => "Your site may not do this.",
            ErrorCode::Removed => "The chair removed your site from the meeting.",
            ErrorCode::RoomLocked => "The room is locked; joining is not possible now.",
            ErrorCode::NotInRoom => "The chosen site is not in the room.",
            ErrorCode::Internal => "The server had an internal error; try again shortly.",
        }
    }
}

/// Why an incoming text could not be turned into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("not a JSON object: {0}")]
    BadJson(String),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("protocol version {0} is not supported (server speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u64),
    #[error("malformed {kind:?} message: {detail}")]
    BadFields { kind: String, detail: String },
}

impl DecodeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge(_) => ErrorCode::TooLarge,
            DecodeError::BadJson(_) | DecodeError::BadFields { .. } => ErrorCode::BadJson,
            DecodeError::UnknownType(_) => ErrorCode::UnknownType,
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
        }
    }
}

const CLIENT_TYPES: &[&str] = &[
    "join",
    "enroll",
    "offer",
    "request_keyframe",
    "receive_video",
    "ping",
    "leave",
    "raise_hand",
    "lower_hand",
    "chair",
    "unmute_reply",
    "relay_sites",
    "relay_sources",
    "relay_hand",
    "relay_unmute_reply",
    "relay_left",
];

impl ClientMessage {
    /// Parses one signalling message, telling apart the ways it can be wrong.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        if text.len() > MAX_MESSAGE_BYTES {
            return Err(DecodeError::TooLarge(text.len()));
        }
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| DecodeError::BadJson(e.to_string()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| DecodeError::BadJson("top level is not an object".into()))?;
        let kind = obj
            .get("type")
            .and_then(|t| t.as_str())
            .ok_or_else(|| DecodeError::BadJson("missing string field \"type\"".into()))?
            .to_string();
        if !CLIENT_TYPES.contains(&kind.as_str()) {
            return Err(DecodeError::UnknownType(kind));
        }
        if kind == "join" || kind == "enroll" {
            match obj.get("v").and_then(|v| v.as_u64()) {
                Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
                Some(v) => return Err(DecodeError::UnsupportedVersion(v)),
                None => {
                    return Err(DecodeError::BadFields {
                        kind,
                        detail: "missing protocol version \"v\"".into(),
                    })
                }
            }
        }
        serde_json::from_value(value).map_err(|e| DecodeError::BadFields {
            kind,
            detail: e.to_string(),
        })
    }

    pub fn encode(&self) -> String {
        // Serialising these plain enums cannot fail (no maps with non-string keys).
        serde_json::to_string(self).expect("client message serialises")
    }
}

impl ServerMessage {
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        if text.len() > MAX_MESSAGE_BYTES {
            return Err(DecodeError::TooLarge(text.len()));
        }
        serde_json::from_str(text).map_err(|e| DecodeError::BadJson(e.to_string()))
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("server message serialises")
    }

    pub fn error(code: ErrorCode, message: impl Into<String>, fatal: bool) -> Self {
        ServerMessage::Error {
            code,
            message: message.into(),
            fatal,
            id: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_round_trips() {
        let m = ClientMessage::Join {
            v: PROTOCOL_VERSION,
            room: "hop-tinh".into(),
            site: "tp-vinh".into(),
            token: None,
            control: false,
            resume: false,
            relay: false,
        };
        let text = m.encode();
        assert_eq!(
            text,
            r#"{"type":"join","v":1,"room":"hop-tinh","site":"tp-vinh"}"#
        );
        assert_eq!(ClientMessage::decode(&text).unwrap(), m);
    }

    #[test]
    fn decode_tells_errors_apart() {
        assert_eq!(
            ClientMessage::decode("{not json").unwrap_err().code(),
            ErrorCode::BadJson
        );
        assert_eq!(
            ClientMessage::decode("[1,2]").unwrap_err().code(),
            ErrorCode::BadJson
        );
        assert_eq!(
            ClientMessage::decode(r#"{"type":"dance"}"#).unwrap_err(),
            DecodeError::UnknownType("dance".into())
        );
        assert_eq!(
            ClientMessage::decode(r#"{"type":"join","v":7,"room":"r","site":"s"}"#).unwrap_err(),
            DecodeError::UnsupportedVersion(7)
        );
        assert!(matches!(
            ClientMessage::decode(r#"{"type":"join","v":1,"room":"r"}"#).unwrap_err(),
            DecodeError::BadFields { .. }
        ));
        let big = format!(
            r#"{{"type":"offer","sdp":"{}"}}"#,
            "a".repeat(MAX_MESSAGE_BYTES)
        );
        assert_eq!(
            ClientMessage::decode(&big).unwrap_err().code(),
            ErrorCode::TooLarge
        );
    }

    #[test]
    fn every_client_message_kind_decodes() {
        let msgs = vec![
            ClientMessage::Enroll {
                v: PROTOCOL_VERSION,
                room: "r".into(),
                site: "s".into(),
                secret: "k".into(),
            },
            ClientMessage::RaiseHand { raised_at_ms: None },
            ClientMessage::RaiseHand {
                raised_at_ms: Some(1_764_000_000_000),
            },
            ClientMessage::LowerHand,
            ClientMessage::Chair {
                id: 1,
                command: ChairCommand::MuteAll,
            },
            ClientMessage::UnmuteReply { accept: true },
            ClientMessage::Offer { sdp: "v=0".into() },
            ClientMessage::RequestKeyframe { site: "s".into() },
            ClientMessage::ReceiveVideo { on: false },
            ClientMessage::Ping { id: 3 },
            ClientMessage::Leave,
            ClientMessage::RelaySites {
                sites: vec![RelaySite {
                    site: SiteInfo {
                        id: "xa-chau-tien".into(),
                        name: "Xã Châu Tiến".into(),
                        level: Level::Commune,
                        path: vec!["nghe-an".into(), "quy-chau".into()],
                        path_names: vec![],
                    },
                    role: Role::Commune,
                }],
            },
            ClientMessage::RelaySources {
                sources: vec![SlotAssignment {
                    mid: "0".into(),
                    kind: MediaKind::Video,
                    site: None,
                }],
            },
            ClientMessage::RelayHand {
                site: "s".into(),
                up: true,
            },
            ClientMessage::RelayUnmuteReply {
                site: "s".into(),
                accept: false,
            },
            ClientMessage::RelayLeft { site: "s".into() },
        ];
        for m in msgs {
            assert_eq!(ClientMessage::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn server_messages_round_trip() {
        let msgs = vec![
            ServerMessage::Slots {
                slots: vec![SlotAssignment {
                    mid: "2".into(),
                    kind: MediaKind::Video,
                    site: Some("tp-vinh".into()),
                }],
            },
            ServerMessage::error(ErrorCode::SiteTaken, "site tp-vinh is already here", true),
            ServerMessage::SiteLeft {
                site: "x".into(),
                reason: LeaveReason::Disconnected,
            },
        ];
        for m in msgs {
            assert_eq!(ServerMessage::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn every_error_code_has_both_languages() {
        for c in ErrorCode::ALL {
            assert!(!c.vi().is_empty() && !c.en().is_empty());
            assert_ne!(c.vi(), c.en());
        }
    }
}
