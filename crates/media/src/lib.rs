//! Media for Điểm cầu: frame types, sources (devices and their synthetic twins), codecs
//! (H.264 through openh264, Opus), and the verifying sinks tests and benchmarks use.
//!
//! Data flow: a [`source::VideoSource`] / [`source::AudioSource`] owned by its own thread
//! produces [`frame::VideoFrame`]s and [`frame::AudioFrame`]s; [`codec::VideoEncoder`] and
//! [`codec::AudioEncoder`] turn them into packets for the WebRTC tracks; on the far side
//! [`codec::VideoDecoder`] / [`codec::AudioDecoder`] decode and a sink consumes the result.
//! [`synthetic`] draws pictures and tones whose every frame carries a mark
//! ([`stamp::Stamp`]) so the receiver can prove which frames arrived, in what order, how
//! late, and how damaged.

pub mod audio_device;
pub mod camera;
pub mod codec;
pub mod frame;
pub mod playout;
pub mod processing;
pub mod source;
pub mod stamp;
pub mod synthetic;

pub use codec::{AudioDecoder, AudioEncoder, CodecError, EncodedVideo, VideoDecoder, VideoEncoder};
pub use frame::{now_us, AudioFrame, I420Frame, VideoFrame, AUDIO_FRAME_SAMPLES, AUDIO_RATE};
pub use source::{AudioSource, SourceError, VideoSource};
