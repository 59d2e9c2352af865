//! Real microphones and speakers: cpal capture and playback through virtual PulseAudio
//! devices behind ALSA `pulse` PCMs, with Vietnamese speech from espeak-ng, compared after
//! the round trip (capture → Opus → server → other site → jitter buffer → playback).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use diemcau_e2e::{dev_server, workspace_bin, StderrLines, MEDIA};

/// A PulseAudio daemon with two null sinks (`mic`, `spk`) in a private runtime dir, and an
/// `.asoundrc` that shows `testmic` (mic.monitor) and `testspk` (spk) to ALSA.
struct PulseRig {
    dir: PathBuf,
    daemon: Child,
}

fn need(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is not installed; scripts/setup installs it (pulseaudio, pulseaudio-utils, libasound2-plugins, espeak-ng, sox)"
    );
}

impl PulseRig {
    fn start() -> PulseRig {
        for t in [
            "pulseaudio",
            "pactl",
            "pacat",
            "parecord",
            "espeak-ng",
            "sox",
        ] {
            need(t);
        }
        let dir = std::env::temp_dir().join(format!("diemcau-pulse-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("run")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.join("run"), std::fs::Permissions::from_mode(0o700))
                .unwrap();
        }
        std::fs::write(
            dir.join(".asoundrc"),
            "pcm.testmic { type pulse; device \"mic.monitor\"; hint { show on description \"test mic\" } }\n\
             pcm.testspk { type pulse; device \"spk\"; hint { show on description \"test speaker\" } }\n",
        )
        .unwrap();
        let mut rig = PulseRig {
            daemon: Command::new("pulseaudio")
                .args([
                    "-n",
                    "--daemonize=no",
                    "--exit-idle-time=-1",
                    "--disallow-exit",
                    "--log-target=stderr",
                    "-L",
                    "module-native-protocol-unix",
                    "-L",
                    "module-null-sink sink_name=mic rate=48000 channels=1",
                    "-L",
                    "module-null-sink sink_name=spk rate=48000 channels=1",
                ])
                .env("HOME", &dir)
                .env("XDG_RUNTIME_DIR", dir.join("run"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("pulseaudio starts"),
            dir,
        };
        for _ in 0..100 {
            if rig
                .cmd("pactl")
                .arg("info")
                .output()
                .is_ok_and(|o| o.status.success())
            {
                return rig;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = rig.daemon.kill();
        panic!("pulseaudio did not come up");
    }

    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("HOME", &self.dir)
            .env("XDG_RUNTIME_DIR", self.dir.join("run"));
        c
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for PulseRig {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read_s16(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
        .collect()
}

/// RMS per 10 ms (480 samples at 48 kHz).
fn envelope(x: &[f32]) -> Vec<f32> {
    x.chunks(480)
        .map(|c| (c.iter().map(|v| v * v).sum::<f32>() / c.len() as f32).sqrt())
        .collect()
}

/// Pearson correlation of `a` with `b` shifted by `lag` (b longer than a).
fn correlation(a: &[f32], b: &[f32], lag: usize) -> f32 {
    let b = &b[lag..lag + a.len()];
    let (ma, mb) = (
        a.iter().sum::<f32>() / a.len() as f32,
        b.iter().sum::<f32>() / b.len() as f32,
    );
    let (mut num, mut da, mut db) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        num += (x - ma) * (y - mb);
        da += (x - ma) * (x - ma);
        db += (y - mb) * (y - mb);
    }
    num / (da.sqrt() * db.sqrt()).max(1e-9)
}

/// Forwards a child's stderr lines into a channel (and keeps the child's pipe drained).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vietnamese_speech_survives_mic_to_speaker_through_the_server() {
    let _guard = MEDIA.lock().await;
    let rig = PulseRig::start();
    // The devices as the CLI lists them.
    let out = rig
        .cmd(workspace_bin("diemcau-cli"))
        .args(["devices", "--json"])
        .output()
        .unwrap();
    let devices: serde_json::Value = serde_json::from_slice(&out.stdout).expect("devices --json");
    let has = |list: &str, id: &str| {
        devices[list]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["id"] == id && d["name"].is_string())
    };
    assert!(has("audio_inputs", "alsa:testmic"), "{devices}");
    assert!(has("audio_outputs", "alsa:testspk"), "{devices}");
    assert!(devices["cameras"].is_array());

    // Speech, as 48 kHz mono s16.
    let (raw, _) = speak(
        &rig,
        "speech",
        &["-v", "vi", "-s", "150"],
        "Xin chào các điểm cầu. Đây là buổi tổng duyệt hệ thống hội nghị truyền hình trực tuyến của tỉnh Nghệ An.",
    );

    let server = dev_server().await;
    let url = server.url();
    let played = rig.path("played.raw");
    let mut recorder = rig
        .cmd("parecord")
        .args([
            "-d",
            "spk.monitor",
            "--raw",
            "--format=s16le",
            "--rate=48000",
            "--channels=1",
        ])
        .arg(&played)
        .spawn()
        .unwrap();
    let cli = |site: &str, audio: &str, speaker: &str| {
        rig.cmd(workspace_bin("diemcau-cli"))
            .args([
                "join", "--server", &url, "--site", site, "--room", "am-thanh", "--video", "none",
            ])
            .args(["--audio", audio, "--speaker", speaker, "--duration", "20"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut listener = cli("tp-vinh", "none", "alsa:testspk");
    let mut listener_lines = StderrLines::of(&mut listener);
    listener_lines.wait_for("Đã kết nối hình và tiếng");
    let mut talker = cli("nghe-an", "mic:alsa:testmic", "none");
    StderrLines::of(&mut talker).wait_for("Đã kết nối hình và tiếng");
    listener_lines.wait_for("Đang nhận tiếng từ nghe-an");

    // Speak into the microphone, in real time.
    let spoke = tokio::task::spawn_blocking({
        let mut play = rig
            .cmd("pacat")
            .args([
                "--playback",
                "-d",
                "mic",
                "--raw",
                "--format=s16le",
                "--rate=48000",
                "--channels=1",
            ])
            .arg(&raw)
            .spawn()
            .unwrap();
        move || play.wait().unwrap().success()
    })
    .await
    .unwrap();
    assert!(spoke);
    // Let the tail of the speech cross the network and the jitter buffer.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = recorder.kill();
    let _ = recorder.wait();
    let (t, l) = (
        talker.wait_with_output().unwrap(),
        listener.wait_with_output().unwrap(),
    );
    assert!(t.status.success() && l.status.success());
    let report: serde_json::Value = serde_json::from_slice(&l.stdout).unwrap();
    let from = report["received"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["site"] == "nghe-an")
        .unwrap()
        .clone();
    assert!(from["audio_frames"].as_u64().unwrap() > 200, "{report}");

    let original = read_s16(&raw);
    let recorded = read_s16(&played);
    let (eo, er) = (envelope(&original), envelope(&recorded));
    assert!(
        er.len() > eo.len(),
        "recording ({} ms) shorter than the speech ({} ms)",
        er.len() * 10,
        eo.len() * 10
    );
    let (lag, corr) = (0..=er.len() - eo.len())
        .map(|lag| (lag, correlation(&eo, &er, lag)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    eprintln!(
        "round trip: envelope correlation {corr:.3} at {} ms into the recording",
        lag * 10
    );
    assert!(
        corr > 0.8,
        "what was played does not follow the speech (r = {corr:.3})"
    );
    // The recording is silent where nothing was said.
    let loud = |x: &[f32]| x.iter().cloned().fold(0.0f32, f32::max);
    assert!(
        loud(&er[lag..lag + eo.len()]) > 0.05,
        "the speech was played loudly enough"
    );
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_speaker_or_microphone_is_reported_once_and_the_meeting_goes_on() {
    let server = dev_server().await;
    let out = tokio::task::spawn_blocking({
        let url = server.url();
        move || {
            Command::new(workspace_bin("diemcau-cli"))
                .args([
                    "join",
                    "--server",
                    &url,
                    "--site",
                    "x",
                    "--video",
                    "none",
                    "--duration",
                    "1",
                ])
                .args([
                    "--speaker",
                    "alsa:khong-co-loa",
                    "--audio",
                    "mic:alsa:khong-co-micro",
                ])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.matches("Không phát được âm thanh").count(), 1, "{err}");
    assert_eq!(err.matches("Không mở được micro").count(), 1, "{err}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
    assert_eq!(report["site"], "x");
    assert_eq!(
        report["sent"]["audio_frames"], 0,
        "no sound without a microphone"
    );
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplugging_the_microphone_mid_call_does_not_stop_the_site() {
    let _guard = MEDIA.lock().await;
    let rig = PulseRig::start();
    let server = dev_server().await;
    let url = server.url();
    let mut site = rig
        .cmd(workspace_bin("diemcau-cli"))
        .args([
            "join",
            "--server",
            &url,
            "--site",
            "tan-ky",
            "--room",
            "rut-micro",
            "--video",
            "none",
        ])
        .args([
            "--audio",
            "mic:alsa:testmic",
            "--speaker",
            "none",
            "--duration",
            "8",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    StderrLines::of(&mut site).wait_for("Đã kết nối hình và tiếng");
    // Unplug: the null sink behind the microphone disappears.
    let modules = rig
        .cmd("pactl")
        .args(["list", "short", "modules"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&modules.stdout);
    let id = list
        .lines()
        .find(|l| l.contains("sink_name=mic"))
        .and_then(|l| l.split_whitespace().next())
        .expect("the mic module")
        .to_string();
    assert!(rig
        .cmd("pactl")
        .args(["unload-module", &id])
        .status()
        .unwrap()
        .success());
    let out = tokio::task::spawn_blocking(move || site.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "the site finished its meeting");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sent = report["sent"]["audio_frames"].as_u64().unwrap();
    // The unplug comes about a second in; 50 frames a second for the remaining ~7 s means the
    // capture went on (the sound server moved it to another source, or the site switched to
    // the default microphone). Had it stopped, fewer than ~100 frames would have gone out.
    assert!(
        sent > 300,
        "audio stopped at the unplug: {sent} frames sent in 8 s"
    );
    server.stop();
}

fn speak_samples(rig: &PulseRig, name: &str, voice_args: &[&str], text: &str) -> Vec<i16> {
    speak(rig, name, voice_args, text).1
}

/// 48 kHz mono s16 speech from espeak-ng: the raw file and its samples.
fn speak(rig: &PulseRig, name: &str, voice_args: &[&str], text: &str) -> (PathBuf, Vec<i16>) {
    let wav = rig.path(&format!("{name}.wav"));
    let raw = rig.path(&format!("{name}.raw"));
    assert!(rig
        .cmd("espeak-ng")
        .args(voice_args)
        .arg("-w")
        .arg(&wav)
        .arg(text)
        .status()
        .unwrap()
        .success());
    assert!(rig
        .cmd("sox")
        .arg(&wav)
        .args([
            "-r",
            "48000",
            "-c",
            "1",
            "-b",
            "16",
            "-e",
            "signed-integer",
            "-t",
            "raw"
        ])
        .arg(&raw)
        .status()
        .unwrap()
        .success());
    let samples = std::fs::read(&raw)
        .unwrap()
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    (raw, samples)
}

#[test]
fn echo_of_real_speech_is_cancelled_by_20_db_and_the_near_talker_keeps_his_level() {
    use diemcau_media::processing::signals::echo;
    use diemcau_media::processing::{power_db, AudioProcessor, Stages, PROCESS_FRAME};
    let rig = PulseRig::start();
    let mut far = Vec::new();
    while far.len() < 12 * 48_000 {
        far.extend(speak_samples(
            &rig,
            "far",
            &["-v", "vi", "-s", "150"],
            "Đề nghị các điểm cầu báo cáo tình hình phòng chống dịch trên địa bàn.",
        ));
    }
    far.truncate(12 * 48_000);
    let near_voice = speak_samples(
        &rig,
        "near",
        &["-v", "vi", "-p", "80", "-s", "170"],
        "Xã Kim Liên xin báo cáo: đã hoàn thành tiêm chủng mũi hai.",
    );
    let echoed = echo(&far, 48 * 60, 0.6);
    let dt = 9 * 48_000;
    let mut near = vec![0i16; far.len()];
    for (i, s) in near_voice.iter().enumerate() {
        if dt + i < near.len() {
            near[dt + i] = (f32::from(*s) * 0.8) as i16;
        }
    }
    let mic: Vec<i16> = (0..far.len())
        .map(|i| echoed[i].saturating_add(near[i]))
        .collect();
    let mut p = AudioProcessor::new(Stages {
        echo_cancellation: true,
        noise_suppression: false,
        gain_control: false,
    });
    let out = p.process_recorded(&far, &mic);
    // ERLE over the 10 ms frames with echo to cancel (mic above -50 dBFS), 4 s .. 9 s.
    let (mut pin, mut pout) = (0.0f64, 0.0f64);
    for k in (4 * 48_000 / PROCESS_FRAME)..(dt / PROCESS_FRAME) {
        let r = k * PROCESS_FRAME..(k + 1) * PROCESS_FRAME;
        if power_db(&mic[r.clone()]) > 20.0 * (32768.0f64 * 10f64.powf(-50.0 / 20.0)).log10() {
            pin += 10f64.powf(power_db(&mic[r.clone()]) / 10.0);
            pout += 10f64.powf(power_db(&out[r]) / 10.0);
        }
    }
    let erle = 10.0 * (pin / pout.max(1e-9)).log10();
    eprintln!("speech ERLE {erle:.1} dB");
    assert!(erle >= 20.0, "ERLE on speech {erle:.1} dB");
    let talk = dt..(dt + near_voice.len()).min(far.len());
    let (n_db, o_db) = (power_db(&near[talk.clone()]), power_db(&out[talk]));
    eprintln!("double talk: near talker {n_db:.1} dB alone, {o_db:.1} dB after processing");
    assert!(o_db > n_db - 6.0, "near talker lost in double talk");
}
