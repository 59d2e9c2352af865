//! `diemcau-bench`: the figures in docs/benchmarks.md. Not a test: it measures and prints.
//!
//! Run: `cargo run --release -p diemcau-e2e --bin diemcau-bench [-- codec|aec|latency|join|server]`
//!
//! `app` (only when asked for: it needs the desktop app built, `cargo build --release -p
//! diemcau-app`) measures the app's memory (PSS over all its processes) idle and in a 4-site
//! call, and its CPU.

use std::time::{Duration, Instant};

use diemcau_client::{JoinOptions, Report, Room, VideoInput};
use diemcau_media::stamp::{site_tag, Stamp};
use diemcau_media::synthetic::{percentile, test_picture};
use diemcau_media::{VideoDecoder, VideoEncoder};
use diemcau_server::{RunningServer, ServerConfig};

fn main() {
    let which: Vec<String> = std::env::args().skip(1).collect();
    let all = which.is_empty();
    let want = |n: &str| all || which.iter().any(|w| w == n);
    println!(
        "# diemcau-bench ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if want("codec") {
        codec(640, 360, 1_000_000);
        codec(1280, 720, 2_500_000);
    }
    if want("simulcast") {
        simulcast_cost(640, 360);
        simulcast_cost(1280, 720);
    }
    if want("aec") {
        aec();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if want("latency") {
        rt.block_on(latency());
    }
    if want("join") {
        rt.block_on(join_time());
    }
    if want("server") {
        server_cpu(&rt);
    }
    if which.iter().any(|w| w == "cascade") {
        let per = std::env::var("CASCADE_COMMUNES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3);
        cascade(&rt, per);
    }
    if which.iter().any(|w| w == "app") {
        app::run();
    }
}

/// The desktop app's footprint: PSS summed over the app and its WebKit processes (RSS would
/// count the shared libraries once per process), and CPU time per process kind.
mod app {
    use std::collections::BTreeMap;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use diemcau_e2e::desktop::{AppEnv, Display};
    use diemcau_e2e::{spawn_dev_server, workspace_bin, Proc};

    /// The pid and every descendant of it.
    fn tree(root: u32) -> Vec<u32> {
        let mut parent = BTreeMap::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                // pid (comm) state ppid …: comm may hold spaces, so cut after the last ')'.
                if let Some(rest) = stat.rsplit_once(')').map(|x| x.1) {
                    if let Some(ppid) = rest
                        .split_whitespace()
                        .nth(1)
                        .and_then(|p| p.parse::<u32>().ok())
                    {
                        parent.insert(pid, ppid);
                    }
                }
            }
        }
        let mut out = vec![root];
        let mut i = 0;
        while i < out.len() {
            let p = out[i];
            out.extend(parent.iter().filter(|(_, pp)| **pp == p).map(|(c, _)| *c));
            i += 1;
        }
        out
    }

    fn name(pid: u32) -> String {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    fn pss_kib(pid: u32) -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Pss:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    /// utime + stime in seconds.
    fn cpu_s(pid: u32) -> f64 {
        let tick = 100.0; // USER_HZ on Linux
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(')')?.1.to_string();
                let f: Vec<&str> = rest.split_whitespace().collect();
                let u: f64 = f.get(11)?.parse().ok()?;
                let k: f64 = f.get(12)?.parse().ok()?;
                Some((u + k) / tick)
            })
            .unwrap_or(0.0)
    }

    fn measure(label: &str, root: u32, window: Duration) {
        let pids = tree(root);
        let before: Vec<(u32, f64)> = pids.iter().map(|&p| (p, cpu_s(p))).collect();
        let t0 = Instant::now();
        std::thread::sleep(window);
        let wall = t0.elapsed().as_secs_f64();
        let mut pss_total = 0;
        let mut by_kind: BTreeMap<String, (u64, f64)> = BTreeMap::new();
        for (p, c0) in before {
            let kind = name(p);
            let pss = pss_kib(p);
            let cpu = (cpu_s(p) - c0) / wall * 100.0;
            pss_total += pss;
            let e = by_kind.entry(kind).or_default();
            e.0 += pss;
            e.1 += cpu;
        }
        println!(
            "app {label}: PSS {:.0} MB over {} processes",
            pss_total as f64 / 1024.0,
            by_kind.len()
        );
        for (k, (pss, cpu)) in by_kind {
            println!(
                "  {k:<22} PSS {:>6.0} MB  CPU {cpu:>5.1} % of a core",
                pss as f64 / 1024.0
            );
        }
    }

    pub fn run() {
        let (_server, url) = spawn_dev_server();
        let display = Display::start();
        let bin = workspace_bin("diemcau");
        let start = |name: &str, args: &[&str]| {
            let env = AppEnv::new(name, &display, "");
            let mut cmd = Command::new(&bin);
            cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null());
            for (k, v) in &env.vars {
                cmd.env(k, v);
            }
            (Proc(cmd.spawn().expect("the app starts")), env)
        };

        // Idle: the pre-join screen (camera preview: the test pattern here, no camera).
        let (idle, _env) = start("bench-idle", &["--server", &url, "--site", "xa-nhan-roi"]);
        std::thread::sleep(Duration::from_secs(15));
        measure(
            "idle (pre-join screen)",
            idle.0.id(),
            Duration::from_secs(10),
        );
        drop(idle);

        // A 4-site call: four headless sites at 360p15, the app shows their four tiles.
        let sites: Vec<Proc> = ["tp-vinh", "nam-dan", "nghi-loc", "dien-chau"]
            .iter()
            .map(|s| {
                Proc(
                    Command::new(workspace_bin("diemcau-cli"))
                        .args(["join", "--server", &url, "--site", s, "--room", "hop-tinh"])
                        .args(["--video", "synthetic:640x360@15", "--audio", "synthetic"])
                        .args(["--duration", "120"])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("diemcau-cli starts"),
                )
            })
            .collect();
        let (call, env) = start(
            "bench-call",
            &["--join", "--server", &url, "--site", "nam-dan-kim-lien"],
        );
        std::thread::sleep(Duration::from_secs(20));
        measure(
            "in a 4-site call (4 × 360p15 tiles)",
            call.0.id(),
            Duration::from_secs(20),
        );
        drop(call);
        drop(sites);
        let log = env.log_text();
        let joined = log.contains("joining");
        println!("  (app log says it joined: {joined})");
    }
}

fn codec(w: usize, h: usize, bps: u32) {
    let n = 300u32;
    let pics: Vec<_> = (0..n)
        .map(|i| {
            test_picture(
                w,
                h,
                Stamp {
                    frame: i,
                    time_us: i,
                    site_tag: site_tag("bench"),
                },
            )
        })
        .collect();
    let mut enc = VideoEncoder::new(bps, 30.0).expect("encoder");
    let mut dec = VideoDecoder::new().expect("decoder");
    let mut enc_ms = Vec::new();
    let mut dec_ms = Vec::new();
    let mut bytes = 0usize;
    let mut skipped = 0;
    for p in &pics {
        let t = Instant::now();
        let out = enc.encode(p).expect("encode");
        enc_ms.push(t.elapsed().as_micros() as u32);
        let Some(au) = out else {
            skipped += 1;
            continue;
        };
        bytes += au.data.len();
        let t = Instant::now();
        dec.decode(&au.data).expect("decode").expect("picture");
        dec_ms.push(t.elapsed().as_micros() as u32);
    }
    let mean = |v: &[u32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64 / 1000.0;
    println!(
        "codec {w}x{h} @ {} kbit/s: encode mean {:.2} ms (p95 {:.2}), decode mean {:.2} ms (p95 {:.2}), {:.0} kbit/s at 30 fps, {skipped} of {n} frames skipped by rate control",
        bps / 1000,
        mean(&enc_ms),
        f64::from(percentile(&enc_ms, 95.0).unwrap_or(0)) / 1000.0,
        mean(&dec_ms),
        f64::from(percentile(&dec_ms, 95.0).unwrap_or(0)) / 1000.0,
        bytes as f64 * 8.0 * 30.0 / f64::from(n) / 1000.0
    );
}

/// What simulcast costs the sender: each picture encoded once per layer (each layer halved
/// from the one above, as the video thread does), against the full size alone, at the rates the
/// layers get at 15 fps on a link with room for all of them (`publish::send_layers`).
fn simulcast_cost(w: usize, h: usize) {
    use diemcau_client::publish::{layer_divisors, layer_pictures, send_layers};
    let n = 300u32;
    let pics: Vec<_> = (0..n)
        .map(|i| {
            let stamp = Stamp {
                frame: i,
                time_us: i,
                site_tag: site_tag("bench"),
            };
            test_picture(w, h, stamp)
        })
        .collect();
    let divisors = layer_divisors((w, h), 3);
    let sizes: Vec<(usize, usize)> = divisors.iter().map(|d| (w / d, h / d)).collect();
    let rates = send_layers(1_500_000, &sizes, 15, divisors.len(), 1_500_000);
    let run = |layers: &[(usize, u32)]| {
        let mut encs: Vec<VideoEncoder> = layers
            .iter()
            .map(|(_, bps)| VideoEncoder::new(*bps, 15.0).expect("encoder"))
            .collect();
        let mut us = Vec::new();
        for p in &pics {
            let t = Instant::now();
            // As the video thread does.
            let scales: Vec<usize> = layers.iter().map(|(d, _)| *d).collect();
            let scaled = layer_pictures(p, &scales);
            for (i, enc) in encs.iter_mut().enumerate() {
                enc.encode(scaled[i].as_ref().unwrap_or(p)).expect("encode");
            }
            us.push(t.elapsed().as_micros() as u32);
        }
        us.iter().map(|&x| f64::from(x)).sum::<f64>() / us.len() as f64 / 1000.0
    };
    let all: Vec<(usize, u32)> = divisors
        .iter()
        .copied()
        .zip(rates.iter().copied())
        .collect();
    let one = run(&[(1, 1_500_000)]);
    let layered = run(&all);
    println!(
        "simulcast {w}x{h}: {} layers {:?} at {:?} bit/s: {layered:.2} ms a picture against {one:.2} ms for the full size alone ({:.0} % more)",
        all.len(),
        sizes,
        rates,
        (layered / one - 1.0) * 100.0
    );
}

/// Echo cancellation (sonora AEC3) on a reproducible far end with a 60 ms, filtered echo
/// path, then 3 s of double talk.
fn aec() {
    use diemcau_media::processing::signals::{babble, echo};
    use diemcau_media::processing::{power_db, AudioProcessor, Stages, PROCESS_FRAME};
    let far = babble(12.0, 7, 0.3);
    let echoed = echo(&far, 48 * 60, 0.6);
    let near = babble(12.0, 99, 0.25);
    let dt = 9 * 48_000;
    let mic: Vec<i16> = (0..far.len())
        .map(|i| echoed[i].saturating_add(if i >= dt { near[i] } else { 0 }))
        .collect();
    for stages in [
        Stages {
            echo_cancellation: true,
            noise_suppression: false,
            gain_control: false,
        },
        Stages::default(),
    ] {
        let mut p = AudioProcessor::new(stages);
        let t = Instant::now();
        let out = p.process_recorded(&far, &mic);
        let per = t.elapsed().as_secs_f64() * 1000.0 / (far.len() / PROCESS_FRAME) as f64;
        let erle = power_db(&mic[4 * 48_000..dt]) - power_db(&out[4 * 48_000..dt]);
        println!(
            "audio processing {}: ERLE {erle:.1} dB after 4 s; double talk near end {:.1} dB in, {:.1} dB out; {per:.3} ms CPU per 10 ms frame",
            if stages.noise_suppression { "AEC3+NS+AGC2" } else { "AEC3 only" },
            power_db(&near[dt..]),
            power_db(&out[dt..]),
        );
    }
}

async fn dev_server() -> RunningServer {
    diemcau_server::start(ServerConfig::dev("127.0.0.1:0".parse().expect("literal")))
        .await
        .expect("server")
}

fn opts(site: &str, room: &str, w: usize, h: usize, fps: u32) -> JoinOptions {
    let mut o = JoinOptions::synthetic(site, room);
    o.video = VideoInput::Synthetic {
        width: w,
        height: h,
        fps,
    };
    o.max_video_bitrate_bps = 2_500_000;
    o.psnr_every = 0;
    o
}

async fn latency() {
    let server = dev_server().await;
    let (a, _ea) = Room::connect(&server.url(), opts("nghe-an", "bench", 1280, 720, 30))
        .await
        .expect("join");
    let (b, _eb) = Room::connect(&server.url(), opts("tp-vinh", "bench", 1280, 720, 30))
        .await
        .expect("join");
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (ra, rb) = (a.leave().await, b.leave().await);
    for r in [&ra, &rb] {
        let x = &r.received[0];
        println!(
            "glass-to-glass 720p30 {} <- {}: p50 {:.1} ms, p95 {:.1} ms over {} verified frames ({} sent by the other, {} lost)",
            r.site,
            x.site,
            x.latency_ms.p50.unwrap_or(f64::NAN),
            x.latency_ms.p95.unwrap_or(f64::NAN),
            x.video_frames_verified,
            if r.site == ra.site { rb.sent.video_frames } else { ra.sent.video_frames },
            x.video_frames_lost
        );
    }
    server.stop();
}

async fn join_time() {
    let server = dev_server().await;
    let (host, _e) = Room::connect(&server.url(), opts("nghe-an", "join", 640, 360, 15))
        .await
        .expect("join");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut joins = Vec::new();
    for i in 0..8 {
        let site = format!("xa-thu-{i}");
        let (r, _e) = Room::connect(&server.url(), opts(&site, "join", 640, 360, 15))
            .await
            .expect("join");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut rep: Report = r.report().await;
        while rep.join_ms.is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            rep = r.report().await;
        }
        if let Some(ms) = rep.join_ms {
            joins.push((ms * 1000.0) as u32);
        }
        r.leave().await;
    }
    let ms = |v: Option<u32>| f64::from(v.unwrap_or(0)) / 1000.0;
    println!(
        "join_ms (join -> first verified remote frame, 640x360@15 publisher, {} joins): p50 {:.0} ms, max {:.0} ms",
        joins.len(),
        ms(percentile(&joins, 50.0)),
        ms(percentile(&joins, 100.0))
    );
    host.leave().await;
    server.stop();
}

/// A province server on a runtime of its own (one thread), so its CPU time can be read
/// alone: its address, counters and thread id; send on the channel to stop it.
fn province_thread() -> (
    String,
    std::sync::Arc<diemcau_server::Stats>,
    String,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let tid = std::fs::read_link("/proc/thread-self")
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
            .unwrap_or_default();
        let srt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        srt.block_on(async move {
            let server = dev_server().await;
            tx.send((server.url(), server.stats.clone(), tid))
                .expect("main thread waits");
            let _ = stop_rx.await;
            server.stop();
        });
    });
    let (url, stats, tid) = rx.recv().expect("server started");
    (url, stats, tid, stop_tx, thread)
}

/// What the province server did over a window: CPU, media bytes in and out, packets out.
#[derive(Debug, Clone, Copy)]
struct Load {
    cpu_pct: f64,
    in_kbps: f64,
    out_kbps: f64,
    packets_out: f64,
}

async fn measure(stats: &diemcau_server::Stats, tid: &str, window: f64) -> Load {
    use std::sync::atomic::Ordering::Relaxed;
    let read = || {
        (
            thread_cpu_s(tid),
            stats.bytes_in.load(Relaxed),
            stats.bytes_out.load(Relaxed),
            stats.datagrams_out.load(Relaxed),
        )
    };
    let (c0, i0, o0, p0) = read();
    tokio::time::sleep(Duration::from_secs_f64(window)).await;
    let (c1, i1, o1, p1) = read();
    Load {
        cpu_pct: (c1 - c0) / window * 100.0,
        in_kbps: (i1 - i0) as f64 * 8.0 / window / 1000.0,
        out_kbps: (o1 - o0) as f64 * 8.0 / window / 1000.0,
        packets_out: (p1 - p0) as f64 / window,
    }
}

/// The same communes (`per` under each of the sample's 21 districts, 320x180@5 and Opus)
/// joined to the province flat, then through 21 district relays: the province server's CPU
/// and media bandwidth, and the ratios, in one run.
fn cascade(rt: &tokio::runtime::Runtime, per: usize) {
    let directory = diemcau_protocol::Directory::sample();
    let districts: Vec<String> = directory
        .iter()
        .filter(|e| e.level == diemcau_protocol::Level::District)
        .map(|e| e.id.clone())
        .collect();
    let (url, stats, tid, stop, thread) = province_thread();
    let room = "hop-tinh";
    let communes: Vec<(String, String)> = districts
        .iter()
        .flat_map(|d| (0..per).map(move |i| (d.clone(), format!("{d}-xa-{i}"))))
        .collect();
    let window = 10.0;
    // One phase: the communes join (`server` of each), settle, are measured, and leave.
    let phase = |targets: Vec<(String, String)>| {
        let (stats, tid) = (stats.clone(), tid.clone());
        async move {
            let mut rooms = Vec::new();
            // A few at a time: every join runs ICE and DTLS.
            for chunk in targets.chunks(6) {
                let joins = chunk.iter().map(|(server, site)| {
                    let mut o = opts(site, room, 320, 180, 5);
                    o.max_video_bitrate_bps = 150_000;
                    Room::connect(server, o)
                });
                for r in futures_util::future::join_all(joins).await {
                    rooms.push(r.expect("a commune joins").0);
                }
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
            let load = measure(&stats, &tid, window).await;
            for r in rooms {
                r.leave().await;
            }
            load
        }
    };
    let (flat, relayed, relays) = rt.block_on(async {
        let flat = phase(
            communes
                .iter()
                .map(|(_, c)| (url.clone(), c.clone()))
                .collect(),
        )
        .await;
        let mut relays = std::collections::HashMap::new();
        for d in &districts {
            let mut cfg = ServerConfig::dev("127.0.0.1:0".parse().expect("literal"));
            cfg.upstream = Some(diemcau_server::upstream::UpstreamConfig {
                url: url.clone(),
                site: d.clone(),
                token: None,
                room: room.into(),
                link_at_start: true,
            });
            relays.insert(d.clone(), diemcau_server::start(cfg).await.expect("relay"));
        }
        let relayed = phase(
            communes
                .iter()
                .map(|(d, c)| (relays[d].url(), c.clone()))
                .collect(),
        )
        .await;
        (flat, relayed, relays)
    });
    for (_, r) in relays {
        r.stop();
    }
    use std::sync::atomic::Ordering::Relaxed;
    let n = communes.len();
    println!(
        "cascade, {n} communes (21 districts x {per}, 320x180@5 + Opus), province server over {window} s:"
    );
    for (what, l) in [("flat", flat), ("through 21 relays", relayed)] {
        println!(
            "  {what}: CPU {:.1} % of a core, media in {:.0} kbit/s, out {:.0} kbit/s, {:.0} packets/s out",
            l.cpu_pct, l.in_kbps, l.out_kbps, l.packets_out
        );
    }
    println!(
        "  ratio flat / relayed: CPU {:.1}x, in {:.1}x, out {:.1}x, packets out {:.1}x; most pictures / sounds one relay sent up at once: {} / {}",
        flat.cpu_pct / relayed.cpu_pct.max(1e-9),
        flat.in_kbps / relayed.in_kbps.max(1e-9),
        flat.out_kbps / relayed.out_kbps.max(1e-9),
        flat.packets_out / relayed.packets_out.max(1e-9),
        stats.relay_up_video_max.load(Relaxed),
        stats.relay_up_audio_max.load(Relaxed),
    );
    let _ = stop.send(());
    let _ = thread.join();
}

/// CPU time (user + system, seconds) of one thread of this process.
fn thread_cpu_s(tid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
    // Fields after the ")" of the command name: state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn server_cpu(rt: &tokio::runtime::Runtime) {
    let sites = 5;
    let (url, stats, tid, stop_tx, server_thread) = province_thread();
    rt.block_on(async {
        let mut rooms = Vec::new();
        for i in 0..sites {
            let (r, e) = Room::connect(&url, opts(&format!("xa-{i}"), "cpu", 320, 180, 15)).await.expect("join");
            rooms.push((r, e));
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        use std::sync::atomic::Ordering::Relaxed;
        let (c0, p0, f0, b0) = (thread_cpu_s(&tid), stats.datagrams_out.load(Relaxed), stats.frames_out.load(Relaxed), stats.bytes_out.load(Relaxed));
        let window = 10.0;
        tokio::time::sleep(Duration::from_secs_f64(window)).await;
        let (c1, p1, f1, b1) = (thread_cpu_s(&tid), stats.datagrams_out.load(Relaxed), stats.frames_out.load(Relaxed), stats.bytes_out.load(Relaxed));
        let cpu = c1 - c0;
        let pkts = (p1 - p0) as f64;
        println!(
            "server, {sites} sites x (320x180@15 video + Opus), each receiving the other {}: {:.0} packets/s out, {:.0} frames/s forwarded, {:.2} Mbit/s payload; server thread CPU {:.1} % of a core => {:.1} µs per packet, ~{:.0} packets/s per core",
            sites - 1,
            pkts / window,
            (f1 - f0) as f64 / window,
            (b1 - b0) as f64 * 8.0 / window / 1e6,
            cpu / window * 100.0,
            cpu / pkts * 1e6,
            pkts / cpu.max(1e-9)
        );
        for (r, _) in rooms {
            r.leave().await;
        }
    });
    let _ = stop_tx.send(());
    let _ = server_thread.join();
}
