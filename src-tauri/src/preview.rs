//! Before joining: the camera preview and the microphone level meter, each on a thread that
//! owns its device, stopped before the call opens the same devices.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diemcau_media::audio_device::Microphone;
use diemcau_media::camera::Camera;
use diemcau_media::synthetic::SyntheticCamera;
use diemcau_media::{AudioSource, VideoSource};
use serde::Serialize;
use tauri::ipc::{Channel, InvokeResponseBody};
use tauri::{AppHandle, Emitter};
use tracing::info;

use crate::frames::{self, KIND_SELF};
use crate::settings::Settings;

/// What the pre-join screen hears (event name `preview`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PreviewEvent {
    /// Ten times a second.
    Level { dbfs: f32 },
    /// A device could not be opened (Vietnamese).
    Notice { message: String },
}

/// A running preview; dropping it stops both threads and waits for them (so the devices
/// are free before the call opens them).
pub struct Preview {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Preview {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub fn start(app: AppHandle, settings: &Settings, out: Channel<InvokeResponseBody>) -> Preview {
    let stop = Arc::new(AtomicBool::new(false));
    let site = settings.site.clone().unwrap_or_else(|| "xem-truoc".into());
    let (camera, no_camera) = (
        settings.camera.unwrap_or(0),
        settings.no_camera == Some(true),
    );
    let mic_id = settings.microphone.clone();
    let emit = {
        let app = app.clone();
        move |e: PreviewEvent| {
            let _ = app.emit("preview", e);
        }
    };

    let video = {
        let (stop, emit) = (stop.clone(), emit.clone());
        std::thread::Builder::new()
            .name("preview-video".into())
            .spawn(move || {
                if no_camera {
                    return;
                }
                let mut source: Box<dyn VideoSource> = match Camera::open(camera, 640, 360, 15) {
                    Ok(c) => Box::new(c),
                    Err(e) => {
                        emit(PreviewEvent::Notice {
                            message: format!(
                                "Không mở được camera: {} Khi vào họp sẽ gửi hình mẫu thử.",
                                e.vi()
                            ),
                        });
                        match SyntheticCamera::new(640, 360, 15, &site) {
                            Ok(s) => Box::new(s),
                            Err(_) => return,
                        }
                    }
                };
                info!("preview: {}", source.describe());
                let mut pacer = frames::Pacer::new(15);
                while !stop.load(Ordering::Relaxed) {
                    match source.read() {
                        Ok(f) => {
                            if pacer.admit("", Instant::now()) {
                                let msg = frames::pack(KIND_SELF, "", &f.picture);
                                if out.send(InvokeResponseBody::Raw(msg)).is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            emit(PreviewEvent::Notice { message: e.vi() });
                            return;
                        }
                    }
                }
            })
            .expect("spawning a thread only fails when the OS is out of resources")
    };

    let audio = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("preview-audio".into())
            .spawn(move || {
                let mut mic = match Microphone::open(mic_id.as_deref()) {
                    Ok(m) => m,
                    Err(e) => {
                        emit(PreviewEvent::Notice {
                            message: format!("Không mở được micrô: {}", e.vi()),
                        });
                        return;
                    }
                };
                info!("preview: {}", mic.describe());
                let mut last = Instant::now();
                let mut loudest = -100f32;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(frame) = mic.read() else {
                        emit(PreviewEvent::Notice {
                            message: "Micrô ngừng hoạt động.".into(),
                        });
                        return;
                    };
                    loudest = loudest.max(diemcau_client::publish::level_dbfs(&frame.samples));
                    if last.elapsed() >= Duration::from_millis(100) {
                        emit(PreviewEvent::Level { dbfs: loudest });
                        loudest = -100.0;
                        last = Instant::now();
                    }
                }
            })
            .expect("spawning a thread only fails when the OS is out of resources")
    };
    Preview {
        stop,
        threads: vec![video, audio],
    }
}
