//! The source traits that cameras, microphones and their synthetic twins implement.
//!
//! A source is owned by one thread (devices such as Media Foundation cameras must not be
//! shared across threads) and its `read` blocks until the next frame is due: the source, not
//! the caller, sets the pace.

use crate::frame::{AudioFrame, VideoFrame};

/// Why a source could not deliver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("no device found: {0}")]
    NoDevice(String),
    #[error("device is busy (used by another program): {0}")]
    Busy(String),
    #[error("unsupported format: {0}")]
    UnsupportedFormat(String),
    #[error("device was disconnected: {0}")]
    Disconnected(String),
    #[error("device error: {0}")]
    Device(String),
}

impl SourceError {
    /// A sentence for a person, in Vietnamese.
    pub fn vi(&self) -> String {
        match self {
            SourceError::NoDevice(d) => format!("Không tìm thấy thiết bị ({d})."),
            SourceError::Busy(d) => {
                format!("Thiết bị đang được chương trình khác sử dụng ({d}).")
            }
            SourceError::UnsupportedFormat(d) => {
                format!("Thiết bị không hỗ trợ định dạng yêu cầu ({d}).")
            }
            SourceError::Disconnected(d) => format!("Thiết bị vừa bị rút ra ({d})."),
            SourceError::Device(d) => format!("Lỗi thiết bị ({d})."),
        }
    }
}

/// A video source: a camera or the synthetic test pattern.
pub trait VideoSource: Send {
    /// A human-readable label (shown in the UI and the report).
    fn describe(&self) -> String;
    /// Picture size in pixels.
    fn size(&self) -> (usize, usize);
    fn fps(&self) -> u32;
    /// Blocks until the next frame is captured.
    fn read(&mut self) -> Result<VideoFrame, SourceError>;
}

/// An audio source delivering 20 ms frames of 48 kHz mono.
pub trait AudioSource: Send {
    fn describe(&self) -> String;
    /// Blocks until the next 20 ms frame is captured.
    fn read(&mut self) -> Result<AudioFrame, SourceError>;
    /// Something a person should hear about (e.g. "switched to the default microphone"),
    /// in Vietnamese; taken once.
    fn notice(&mut self) -> Option<String> {
        None
    }
}
