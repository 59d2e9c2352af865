//! Microphones and speakers through cpal (ALSA on Linux, WASAPI on Windows).
//!
//! Ids are cpal's stable `DeviceId` strings (`alsa:testmic`, `wasapi:{...}`). A microphone
//! delivers 20 ms frames of 48 kHz mono whatever the device runs at (it is downmixed and
//! resampled in the capture callback); a speaker pulls 48 kHz mono from a [`Mixer`] on the
//! device's clock and converts it to the device's rate and channel count.
//!
//! A microphone whose device disappears reports [`SourceError::Disconnected`] (never panics,
//! never waits forever); [`crate::source::AudioFailover`] then switches to the default.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use cpal::{
    Device, ErrorKind, FromSample, Sample, SampleFormat, SizedSample, StreamConfig,
    SupportedStreamConfig,
};

use crate::frame::{now_us, AudioFrame, AUDIO_FRAME_SAMPLES, AUDIO_RATE};
use crate::playout::{downmix, Mixer, Resampler};
use crate::processing::AudioProcessor;
use crate::source::{AudioSource, SourceError};

/// A device as listed to people and scripts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioDeviceInfo {
    /// Stable id, e.g. `alsa:testmic`.
    pub id: String,
    pub name: String,
}

fn list(inputs: bool) -> Result<Vec<AudioDeviceInfo>, SourceError> {
    let host = cpal::default_host();
    let devices: Vec<Device> = if inputs {
        host.input_devices().map(|d| d.collect())
    } else {
        host.output_devices().map(|d| d.collect())
    }
    .map_err(|e| SourceError::Device(e.to_string()))?;
    Ok(devices
        .into_iter()
        .filter_map(|d| {
            Some(AudioDeviceInfo {
                id: d.id().ok()?.to_string(),
                name: d.to_string(),
            })
        })
        .collect())
}

/// Microphones and other capture devices.
pub fn list_inputs() -> Result<Vec<AudioDeviceInfo>, SourceError> {
    list(true)
}

/// Speakers and other playback devices.
pub fn list_outputs() -> Result<Vec<AudioDeviceInfo>, SourceError> {
    list(false)
}

fn find(id: Option<&str>, input: bool) -> Result<Device, SourceError> {
    let host = cpal::default_host();
    match id {
        Some(id) => {
            let parsed: cpal::DeviceId = id
                .parse()
                .map_err(|_| SourceError::NoDevice(format!("{id:?} is not a device id")))?;
            host.device_by_id(&parsed)
                .ok_or_else(|| SourceError::NoDevice(id.to_string()))
        }
        None => if input {
            host.default_input_device()
        } else {
            host.default_output_device()
        }
        .ok_or_else(|| SourceError::NoDevice("default".into())),
    }
}

fn map_err(e: cpal::Error, what: &str) -> SourceError {
    match e.kind() {
        ErrorKind::DeviceBusy => SourceError::Busy(what.into()),
        ErrorKind::DeviceNotAvailable => SourceError::Disconnected(what.into()),
        ErrorKind::UnsupportedConfig | ErrorKind::UnsupportedOperation => {
            SourceError::UnsupportedFormat(format!("{what}: {e}"))
        }
        _ => SourceError::Device(format!("{what}: {e}")),
    }
}

/// Prefers 48 kHz, mono then stereo, f32 then i16; else the device's default.
fn pick(dev: &Device, input: bool, what: &str) -> Result<SupportedStreamConfig, SourceError> {
    let ranges: Vec<_> = if input {
        dev.supported_input_configs().map(|r| r.collect())
    } else {
        dev.supported_output_configs().map(|r| r.collect())
    }
    .map_err(|e| map_err(e, what))?;
    for fmt in [SampleFormat::F32, SampleFormat::I16] {
        for ch in [1u16, 2] {
            if let Some(c) = ranges
                .iter()
                .copied()
                .filter(|r| r.sample_format() == fmt && r.channels() == ch)
                .find_map(|r| r.try_with_sample_rate(AUDIO_RATE))
            {
                return Ok(c);
            }
        }
    }
    if input {
        dev.default_input_config()
    } else {
        dev.default_output_config()
    }
    .map_err(|e| map_err(e, what))
}

/// A flag set when the stream's device goes away, and the error callback that sets it.
fn death_watch() -> (Arc<AtomicBool>, impl FnMut(cpal::Error) + Send + 'static) {
    let dead = Arc::new(AtomicBool::new(false));
    let flag = dead.clone();
    let err = move |e: cpal::Error| {
        if matches!(
            e.kind(),
            ErrorKind::DeviceNotAvailable | ErrorKind::StreamInvalidated
        ) {
            flag.store(true, Ordering::Release);
        }
    };
    (dead, err)
}

/// A capture stream in sample type `T`, handing `push` mono f32 in [-1, 1).
fn input_stream<T>(
    dev: &Device,
    config: StreamConfig,
    channels: usize,
    mut push: impl FnMut(Vec<f32>) + Send + 'static,
    err: impl FnMut(cpal::Error) + Send + 'static,
) -> Result<cpal::Stream, cpal::Error>
where
    T: SizedSample,
    f32: FromSample<T>,
{
    dev.build_input_stream::<T, _, _>(
        config,
        move |data: &[T], _| {
            let f: Vec<f32> = data.iter().map(|&s| f32::from_sample(s)).collect();
            push(downmix(&f, channels))
        },
        err,
        None,
    )
}

/// A playback stream in sample type `T`, filled from `next(frames)` (mono f32), the same
/// sample on every channel.
fn output_stream<T>(
    dev: &Device,
    config: StreamConfig,
    channels: usize,
    mut next: impl FnMut(usize) -> Vec<f32> + Send + 'static,
    err: impl FnMut(cpal::Error) + Send + 'static,
) -> Result<cpal::Stream, cpal::Error>
where
    T: SizedSample + FromSample<f32>,
{
    dev.build_output_stream::<T, _, _>(
        config,
        move |data: &mut [T], _| {
            let m = next(data.len() / channels);
            for (frame, s) in data.chunks_mut(channels).zip(m) {
                frame.fill(T::from_sample(s.clamp(-1.0, 1.0)));
            }
        },
        err,
        None,
    )
}

/// A capture device delivering 48 kHz mono.
pub struct Microphone {
    name: String,
    _stream: cpal::Stream,
    chunks: Receiver<Vec<f32>>,
    buf: VecDeque<f32>,
    dead: Arc<AtomicBool>,
}

impl Microphone {
    /// Opens the device with this id, or the system default.
    pub fn open(id: Option<&str>) -> Result<Self, SourceError> {
        let what = id.unwrap_or("default").to_string();
        let dev = find(id, true)?;
        let sc = pick(&dev, true, &what)?;
        let channels = usize::from(sc.channels());
        let config: StreamConfig = sc.into();
        let (tx, chunks) = mpsc::channel::<Vec<f32>>();
        let (dead, err) = death_watch();
        let mut rs = Resampler::new(sc.sample_rate(), AUDIO_RATE);
        let push = move |mono: Vec<f32>| {
            let mut out = Vec::with_capacity(mono.len() + 8);
            rs.process(&mono, &mut out);
            let _ = tx.send(out);
        };
        let stream = match sc.sample_format() {
            SampleFormat::F32 => input_stream::<f32>(&dev, config, channels, push, err),
            SampleFormat::I16 => input_stream::<i16>(&dev, config, channels, push, err),
            other => {
                return Err(SourceError::UnsupportedFormat(format!(
                    "{what}: sample format {other}"
                )))
            }
        }
        .map_err(|e| map_err(e, &what))?;
        stream.play().map_err(|e| map_err(e, &what))?;
        Ok(Microphone {
            name: dev.to_string(),
            _stream: stream,
            chunks,
            buf: VecDeque::new(),
            dead,
        })
    }
}

impl AudioSource for Microphone {
    fn describe(&self) -> String {
        format!("Micro: {}", self.name)
    }

    fn read(&mut self) -> Result<AudioFrame, SourceError> {
        while self.buf.len() < AUDIO_FRAME_SAMPLES {
            if self.dead.load(Ordering::Acquire) {
                return Err(SourceError::Disconnected(self.name.clone()));
            }
            match self.chunks.recv_timeout(Duration::from_secs(2)) {
                Ok(c) => self.buf.extend(c),
                Err(RecvTimeoutError::Timeout) => {
                    // A device that delivers nothing for 2 s is as good as gone.
                    self.dead.store(true, Ordering::Release);
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.dead.store(true, Ordering::Release);
                }
            }
        }
        let samples = self
            .buf
            .drain(..AUDIO_FRAME_SAMPLES)
            .map(|s| (s.clamp(-1.0, 1.0) * 32767.0) as i16)
            .collect();
        Ok(AudioFrame {
            samples,
            captured_us: now_us(),
        })
    }
}

/// A playback device fed by a [`Mixer`].
pub struct Speaker {
    name: String,
    _stream: cpal::Stream,
    dead: Arc<AtomicBool>,
}

impl Speaker {
    /// Opens the device with this id (or the default) and starts playing `mixer`.
    /// `reference`, when given, hears everything played (the echo canceller's far end).
    pub fn open(
        id: Option<&str>,
        mixer: Arc<Mutex<Mixer>>,
        reference: Option<Arc<Mutex<AudioProcessor>>>,
    ) -> Result<Self, SourceError> {
        let what = id.unwrap_or("default").to_string();
        let dev = find(id, false)?;
        let sc = pick(&dev, false, &what)?;
        let channels = usize::from(sc.channels());
        let config: StreamConfig = sc.into();
        let mut rs = Resampler::new(AUDIO_RATE, sc.sample_rate());
        let mut queue: VecDeque<f32> = VecDeque::new();
        let mut mono = vec![0i16; AUDIO_FRAME_SAMPLES];
        let next = move |frames: usize| -> Vec<f32> {
            while queue.len() < frames {
                // Never block the audio callback: if the mixer is busy, play silence.
                match mixer.try_lock() {
                    Ok(mut m) => m.fill(&mut mono),
                    Err(_) => mono.fill(0),
                }
                if let Some(r) = &reference {
                    if let Ok(mut r) = r.try_lock() {
                        r.render(&mono);
                    }
                }
                let f: Vec<f32> = mono.iter().map(|&s| f32::from(s) / 32768.0).collect();
                let mut out = Vec::with_capacity(f.len() + 8);
                rs.process(&f, &mut out);
                queue.extend(out);
            }
            queue.drain(..frames).collect()
        };
        let (dead, err) = death_watch();
        let stream = match sc.sample_format() {
            SampleFormat::F32 => output_stream::<f32>(&dev, config, channels, next, err),
            SampleFormat::I16 => output_stream::<i16>(&dev, config, channels, next, err),
            other => {
                return Err(SourceError::UnsupportedFormat(format!(
                    "{what}: sample format {other}"
                )))
            }
        }
        .map_err(|e| map_err(e, &what))?;
        stream.play().map_err(|e| map_err(e, &what))?;
        Ok(Speaker {
            name: dev.to_string(),
            _stream: stream,
            dead,
        })
    }

    /// Whether the device went away (the owner should open another).
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_ids_are_refused_clearly() {
        match Microphone::open(Some("alsa:khong-co-micro-nay")) {
            Err(SourceError::NoDevice(d)) => assert!(d.contains("khong-co")),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a missing device opened"),
        }
        assert!(matches!(
            Microphone::open(Some("no-colon")),
            Err(SourceError::NoDevice(_))
        ));
    }
}
