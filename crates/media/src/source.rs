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
    /// Asks for pictures `divisor` times smaller each way (a lower spatial layer for a thin
    /// link; 1 = full size). A source that makes them itself says true; for the others the
    /// encoder scales what they deliver.
    fn scale_down(&mut self, _divisor: usize) -> bool {
        false
    }
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

/// An audio source that survives its device going away: when the primary source reports
/// [`SourceError::Disconnected`], it opens the fallback (the system default device) and
/// carries on, leaving a notice for the person.
pub struct AudioFailover {
    current: Box<dyn AudioSource>,
    open_fallback: Box<dyn FnMut() -> Result<Box<dyn AudioSource>, SourceError> + Send>,
    notice: Option<String>,
}

impl AudioFailover {
    pub fn new(
        primary: Box<dyn AudioSource>,
        open_fallback: Box<dyn FnMut() -> Result<Box<dyn AudioSource>, SourceError> + Send>,
    ) -> Self {
        AudioFailover {
            current: primary,
            open_fallback,
            notice: None,
        }
    }
}

impl AudioSource for AudioFailover {
    fn describe(&self) -> String {
        self.current.describe()
    }

    fn read(&mut self) -> Result<AudioFrame, SourceError> {
        match self.current.read() {
            // Every unplug gives way to the default device again (a second unplug too); if
            // no default opens, the error ends capture.
            Err(SourceError::Disconnected(what)) => {
                let fresh = (self.open_fallback)()?;
                self.notice = Some(format!(
                    "Thiết bị thu âm \"{what}\" đã bị rút ra; đã chuyển sang {}.",
                    fresh.describe()
                ));
                self.current = fresh;
                self.current.read()
            }
            other => other,
        }
    }

    fn notice(&mut self) -> Option<String> {
        self.notice.take().or_else(|| self.current.notice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delivers `frames` frames, then reports its device gone.
    struct Dying {
        left: u32,
        value: i16,
    }

    impl AudioSource for Dying {
        fn describe(&self) -> String {
            format!("nguồn {}", self.value)
        }
        fn read(&mut self) -> Result<AudioFrame, SourceError> {
            if self.left == 0 {
                return Err(SourceError::Disconnected(format!("mic {}", self.value)));
            }
            self.left -= 1;
            Ok(AudioFrame {
                samples: vec![self.value; 960],
                captured_us: 0,
            })
        }
    }

    #[test]
    fn an_unplugged_microphone_switches_to_the_default_and_says_so_once() {
        let mut opened = 0;
        let mut src = AudioFailover::new(
            Box::new(Dying { left: 3, value: 1 }),
            Box::new(move || {
                opened += 1;
                if opened > 1 {
                    return Err(SourceError::NoDevice("default".into()));
                }
                Ok(Box::new(Dying { left: 5, value: 2 }) as Box<dyn AudioSource>)
            }),
        );
        let mut values = Vec::new();
        let mut notices = Vec::new();
        for _ in 0..8 {
            values.push(src.read().unwrap().samples[0]);
            notices.extend(src.notice());
        }
        assert_eq!(
            values,
            [1, 1, 1, 2, 2, 2, 2, 2],
            "no frame lost at the switch"
        );
        assert_eq!(notices.len(), 1);
        assert!(notices[0].contains("mic 1") && notices[0].contains("nguồn 2"));
        assert!(matches!(src.read(), Err(SourceError::NoDevice(_))));
        // The fallback dying too gives way again; the test's opener refuses a second time,
        // which ends capture with an error rather than a loop.
    }

    #[test]
    fn a_missing_fallback_is_an_error_not_a_hang() {
        let mut src = AudioFailover::new(
            Box::new(Dying { left: 0, value: 1 }),
            Box::new(|| Err(SourceError::NoDevice("default".into()))),
        );
        assert!(matches!(src.read(), Err(SourceError::NoDevice(_))));
    }
}
