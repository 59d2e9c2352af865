//! The meeting as the window sees it: joins through `diemcau-client`, turns [`RoomEvent`]s
//! into typed `call` events for the UI, and pictures into binary channel messages.

use std::sync::Arc;
use std::time::{Duration, Instant};

use diemcau_client::quality::Quality;
use diemcau_client::{AudioInput, JoinOptions, Room, RoomEvent, SpeakerOutput, VideoInput};
use diemcau_protocol::{FloorState, Hand, Role, RollEntry, SiteInfo};
use serde::Serialize;
use tauri::ipc::{Channel, InvokeResponseBody};
use tauri::{AppHandle, Emitter};
use tokio::sync::{mpsc, Mutex};
use tracing::{info, warn};

use crate::frames::{self, Pacer};
use crate::settings::Settings;

/// What the window hears about the meeting (event name `call`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CallEvent {
    Joined {
        you: SiteInfo,
        role: Role,
        sites: Vec<SiteInfo>,
    },
    SiteJoined {
        site: SiteInfo,
    },
    SiteLeft {
        site: String,
    },
    /// ICE and DTLS are up.
    MediaConnected,
    Hands {
        queue: Vec<Hand>,
        total: u32,
    },
    Floor {
        state: FloorState,
    },
    AskUnmute {
        by: String,
    },
    /// The roll-call (the chair only).
    RollCall {
        entries: Vec<RollEntry>,
    },
    /// Twice a second: who is speaking, the mic level, the transport of the media path.
    Status {
        speaking: Vec<String>,
        mic_dbfs: f32,
        transport: Option<String>,
    },
    /// Every two seconds: this site's link and what arrives from each other site.
    Quality {
        #[serde(flatten)]
        quality: Quality,
    },
    /// The link is too thin for pictures: only sound is sent (`paused`), or pictures again.
    VideoPausedForLink {
        paused: bool,
    },
    /// The downlink loses too much: the others' pictures are off for a while (`paused`), or
    /// tried again.
    ReceiveVideoPausedForLink {
        paused: bool,
    },
    /// Something a person should read (device gone, fallback picture…), in Vietnamese.
    Notice {
        message: String,
    },
    Error {
        message: String,
        fatal: bool,
    },
    /// The connection was lost; the engine is joining again by itself.
    Reconnecting {
        reason: String,
    },
    /// Back in the room.
    Reconnected {
        after_ms: u64,
    },
    /// The meeting ended for this site.
    Ended {
        reason: String,
    },
}

/// The call in progress, if any.
#[derive(Default)]
pub struct Call {
    room: Mutex<Option<Arc<Room>>>,
    pump: std::sync::Mutex<Vec<tauri::async_runtime::JoinHandle<()>>>,
    /// The last report of the last call (JSON), for diagnostics.
    pub last_report: std::sync::Mutex<Option<serde_json::Value>>,
}

/// The join options for these settings: the configured camera (the labelled test pattern
/// when it cannot be opened), microphone and speaker.
pub fn options(s: &Settings) -> Result<JoinOptions, String> {
    let site = s
        .site
        .clone()
        .ok_or("Chưa đặt mã điểm cầu trong phần Cài đặt.")?;
    let mut o = JoinOptions::synthetic(&site, &s.room_or_default());
    o.token = s.token.clone();
    o.secret = s.secret.clone();
    o.video = if s.no_camera == Some(true) {
        VideoInput::None
    } else {
        VideoInput::Camera {
            index: s.camera.unwrap_or(0),
            width: 640,
            height: 360,
            fps: 15,
        }
    };
    o.audio = AudioInput::Mic(s.microphone.clone());
    o.speaker = match &s.speaker {
        Some(id) => SpeakerOutput::Device(id.clone()),
        None => SpeakerOutput::Default,
    };
    o.deliver_video = true;
    o.psnr_every = 0;
    Ok(o)
}

impl Call {
    pub async fn room(&self) -> Option<Arc<Room>> {
        self.room.lock().await.clone()
    }

    /// Joins; returns once the server has let us in (media then comes up by itself).
    pub async fn join(
        self: &Arc<Self>,
        app: AppHandle,
        settings: &Settings,
        frames_out: Channel<InvokeResponseBody>,
    ) -> Result<(), String> {
        let mut slot = self.room.lock().await;
        if slot.is_some() {
            return Err("Điểm cầu đang ở trong cuộc họp.".into());
        }
        let server = settings
            .server
            .clone()
            .ok_or("Chưa đặt địa chỉ máy chủ trong phần Cài đặt.")?;
        let opts = options(settings)?;
        info!(%server, site = %opts.site, room = %opts.room, "joining");
        let (room, events) = Room::connect(&server, opts).await.map_err(|e| {
            warn!("join failed: {e}");
            e.vi()
        })?;
        let room = Arc::new(room);
        *slot = Some(room.clone());
        drop(slot);
        let me = self.clone();
        let pump = tauri::async_runtime::spawn(me.clone().pump(app.clone(), events, frames_out));
        let status = tauri::async_runtime::spawn(me.status(app, Arc::downgrade(&room)));
        self.pump
            .lock()
            .expect("lock poisoned")
            .extend([pump, status]);
        Ok(())
    }

    /// Leaves (if in a call) and keeps the report.
    pub async fn leave(&self) -> Option<serde_json::Value> {
        let room = self.room.lock().await.take()?;
        for t in self.pump.lock().expect("lock poisoned").drain(..) {
            t.abort();
        }
        // A command in flight may hold the room for a moment; the status task holds only a
        // weak reference.
        let mut room = room;
        let report = loop {
            match Arc::try_unwrap(room) {
                Ok(r) => break r.leave().await,
                Err(r) => {
                    room = r;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let json = serde_json::to_value(&report).ok();
        *self.last_report.lock().expect("lock poisoned") = json.clone();
        info!("left the meeting");
        json
    }

    async fn pump(
        self: Arc<Self>,
        app: AppHandle,
        mut events: mpsc::UnboundedReceiver<RoomEvent>,
        frames_out: Channel<InvokeResponseBody>,
    ) {
        let mut pacer = Pacer::new(15);
        // The self view is a thumbnail: a third of the rate is plenty and saves the window
        // a fifth of its drawing in a 4-site call.
        let mut self_pacer = Pacer::new(5);
        let mut ended =
            "Mất kết nối tới máy chủ hoặc đường truyền hình và tiếng; hãy tham gia lại."
                .to_string();
        let emit = |e: CallEvent| {
            if let Err(err) = app.emit("call", e) {
                warn!("emit: {err}");
            }
        };
        while let Some(ev) = events.recv().await {
            match ev {
                RoomEvent::VideoFrame { site, picture } => {
                    if pacer.admit(&site, Instant::now()) {
                        let msg = frames::pack(frames::KIND_REMOTE, &site, &picture);
                        let _ = frames_out.send(InvokeResponseBody::Raw(msg));
                    }
                }
                RoomEvent::LocalFrame { picture } => {
                    if self_pacer.admit("", Instant::now()) {
                        let msg = frames::pack(frames::KIND_SELF, "", &picture);
                        let _ = frames_out.send(InvokeResponseBody::Raw(msg));
                    }
                }
                RoomEvent::Joined { you, role, sites } => {
                    emit(CallEvent::Joined { you, role, sites })
                }
                RoomEvent::SiteJoined { site } => emit(CallEvent::SiteJoined { site }),
                RoomEvent::SiteLeft { site, .. } => {
                    pacer.forget(&site);
                    emit(CallEvent::SiteLeft { site })
                }
                RoomEvent::MediaConnected => emit(CallEvent::MediaConnected),
                RoomEvent::Hands { queue, total } => emit(CallEvent::Hands { queue, total }),
                RoomEvent::Floor { state } => emit(CallEvent::Floor { state }),
                RoomEvent::AskUnmute { by } => emit(CallEvent::AskUnmute { by }),
                RoomEvent::RollCall { entries } => emit(CallEvent::RollCall { entries }),
                RoomEvent::DeviceError { message } => emit(CallEvent::Notice { message }),
                RoomEvent::ServerError {
                    code,
                    message,
                    fatal,
                } => {
                    warn!(?code, %message, fatal, "server error");
                    if fatal {
                        ended = code.vi().to_string();
                        break;
                    }
                    emit(CallEvent::Error {
                        message: code.vi().to_string(),
                        fatal,
                    });
                }
                RoomEvent::Reconnecting { reason } => {
                    warn!(%reason, "connection lost; reconnecting");
                    emit(CallEvent::Reconnecting { reason });
                }
                RoomEvent::Reconnected { after } => emit(CallEvent::Reconnected {
                    after_ms: after.as_millis() as u64,
                }),
                RoomEvent::Disconnected { reason } => {
                    warn!(%reason, "disconnected");
                    ended = reason;
                    break;
                }
                RoomEvent::Quality(quality) => emit(CallEvent::Quality { quality }),
                RoomEvent::VideoPausedForLink { paused } => {
                    emit(CallEvent::VideoPausedForLink { paused })
                }
                RoomEvent::ReceiveVideoPausedForLink { paused } => {
                    emit(CallEvent::ReceiveVideoPausedForLink { paused })
                }
                RoomEvent::Upstream { connected, chosen } => emit(CallEvent::Notice {
                    message: match (connected, chosen) {
                        (true, _) => "Đã kết nối với tỉnh.",
                        (false, true) => {
                            "Huyện đã tách khỏi cuộc họp của tỉnh; cuộc họp của huyện vẫn tiếp tục."
                        }
                        (false, false) => "Mất kết nối với tỉnh; cuộc họp của huyện vẫn tiếp tục.",
                    }
                    .into(),
                }),
                RoomEvent::TrackAdded { .. }
                | RoomEvent::TrackRemoved { .. }
                | RoomEvent::VideoLayer { .. }
                | RoomEvent::FirstVerifiedFrame { .. } => {}
            }
        }
        // The meeting ended under us (server gone, removed, media failed): hang up first,
        // so the devices are free when the window goes back to its preview.
        // (In a task of its own: `leave` aborts this pump.)
        if self.room.lock().await.is_some() {
            let call = self.clone();
            tauri::async_runtime::spawn(async move {
                call.leave().await;
                let _ = app.emit("call", CallEvent::Ended { reason: ended });
            });
        }
    }

    async fn status(self: Arc<Self>, app: AppHandle, room: std::sync::Weak<Room>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut transport = None;
        for n in 0u64.. {
            tick.tick().await;
            let Some(room) = room.upgrade() else { break };
            if n % 4 == 0 {
                let report = room.report().await;
                transport = report.transport.clone();
                *self.last_report.lock().expect("lock poisoned") =
                    serde_json::to_value(&report).ok();
            }
            let e = CallEvent::Status {
                speaking: room.speaking(Duration::from_millis(400), -45.0),
                mic_dbfs: room.mic_level_dbfs(),
                transport: transport.clone(),
            };
            if app.emit("call", e).is_err() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_become_join_options() {
        let s = Settings {
            server: Some("ws://127.0.0.1:7600".into()),
            site: Some("xa-a".into()),
            camera: Some(2),
            microphone: Some("alsa:testmic".into()),
            ..Default::default()
        };
        let o = options(&s).unwrap();
        assert_eq!(o.room, crate::settings::DEFAULT_ROOM);
        assert!(matches!(o.video, VideoInput::Camera { index: 2, .. }));
        assert_eq!(o.audio, AudioInput::Mic(Some("alsa:testmic".into())));
        assert_eq!(o.speaker, SpeakerOutput::Default);
        assert!(o.deliver_video);
        let none = Settings {
            no_camera: Some(true),
            ..s
        };
        assert_eq!(options(&none).unwrap().video, VideoInput::None);
        assert!(options(&Settings::default())
            .unwrap_err()
            .contains("mã điểm cầu"));
    }
}
