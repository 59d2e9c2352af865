//! Poor links, for real: a site in a network namespace of its own, joined to the machine by
//! a veth pair, and the room server on the machine's side of it. The link is cut, rate
//! limited, made lossy or stripped of UDP with the kernel's own tools (see
//! `diemcau_e2e::netns`), and the real `diemcau-cli` binaries have to cope.
//!
//! Needs root (network namespaces), as the tests run here and in CI.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use diemcau_e2e::link::{EmulatedLink, Second, Shape};
use diemcau_e2e::netns::NetNs;
use diemcau_e2e::{
    cli_join_args, dev_token, received_from, spawn_server, workspace_bin, Proc, StderrLines,
};
use diemcau_protocol::Role;
use serde_json::Value;

/// One link test at a time: two cores, and the timings are what is tested.
static LINK: Mutex<()> = Mutex::new(());

const ROOM: &str = "links";

/// `diemcau-cli join` (run by `cmd`) as `site` for `duration` seconds, and its stderr
/// (always drained, so the site never blocks on a full pipe).
fn site(
    mut cmd: Command,
    url: &str,
    site: &str,
    duration: u32,
    extra: &[&str],
) -> (Proc, StderrLines) {
    cli_join_args(&mut cmd, url, site, ROOM, &duration.to_string())
        .args(extra)
        .args(if extra.contains(&"--video") {
            &[][..]
        } else {
            &["--video", "synthetic:320x180@15"][..]
        })
        .env(
            "RUST_LOG",
            std::env::var("SITE_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut p = Proc(cmd.spawn().expect("diemcau-cli starts"));
    let lines = StderrLines::of(&mut p.0);
    (p, lines)
}

fn here() -> Command {
    Command::new(workspace_bin("diemcau-cli"))
}

/// `diemcau-cli` run inside `link`'s namespace.
fn behind(link: &EmulatedLink) -> Command {
    link.command(&workspace_bin("diemcau-cli"))
}

/// A thin rural line: `kbit` kbit/s, 40 ms one way, a 0.5 s buffer.
fn thin_line(kbit: u32) -> Shape {
    Shape {
        rate_kbit: Some(kbit),
        delay: Duration::from_millis(40),
        queue: Duration::from_millis(500),
        ..Shape::default()
    }
}

/// Asks a site to leave now (SIGTERM: it leaves the room and prints its report).
fn stop(p: &Proc) {
    let pid = p.0.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -TERM {pid}");
}

/// Waits for the site to end and reads its JSON report.
fn report(p: &mut Proc) -> Value {
    let status = p.0.wait().expect("diemcau-cli ends");
    let mut out = String::new();
    p.0.stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut out)
        .expect("stdout is UTF-8");
    assert!(status.success(), "diemcau-cli ended with {status}: {out}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("report {out:?}: {e}"))
}

/// What one of the CLI's five-second progress lines says about `site`, from its counts on
/// ("… nhận xa-a: 70 hình (70 đã kiểm), 250 tiếng; xa-b: …" → "70 hình (70 đã kiểm), 250
/// tiếng").
fn site_part<'a>(line: &'a str, site: &str) -> Option<&'a str> {
    let rest = &line[line.find(&format!("{site}: "))? + site.len() + 2..];
    rest.split(';').next()
}

/// The verified picture count for `site` in a progress line.
fn verified_in(line: &str, site: &str) -> Option<u64> {
    let rest = site_part(line, site)?;
    let open = rest.find('(')?;
    rest[open + 1..].split_whitespace().next()?.parse().ok()
}

/// The sound frame count for `site` in a progress line (the number before "tiếng").
fn heard_in(line: &str, site: &str) -> Option<u64> {
    site_part(line, site)?
        .rsplit(", ")
        .next()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// How long sound waits in the buffer now, and the wait it aims for, in ms, in a progress
/// line (a site with a speaker): "…; đệm tiếng 95 ms (mục tiêu 140 ms)".
fn buffer_in(line: &str) -> Option<(f64, f64)> {
    let rest = &line[line.find("; đệm tiếng ")? + "; đệm tiếng ".len()..];
    let mut words = rest.split_whitespace();
    let now = words.next()?.parse().ok()?;
    let aim = words.nth(3)?.parse().ok()?;
    Some((now, aim))
}

/// Sound from `site` in `lines`' progress lines over at least `span`: frames per second as a
/// share of the 50 a site sends, and the window in seconds. `at_start` runs as the window
/// opens (to read link counters over the same window).
fn speech_over<T>(
    lines: &mut StderrLines,
    site: &str,
    span: Duration,
    at_start: impl FnOnce() -> T,
) -> (f64, f64, T) {
    let heard = |l: &str| heard_in(l, site);
    let first = lines.wait(Duration::from_secs(12), "a progress line", |l| {
        heard(l).is_some()
    });
    let (first, from) = (heard(&first).unwrap(), Instant::now());
    let started = at_start();
    let mut last = first;
    while from.elapsed() < span {
        let l = lines.wait(Duration::from_secs(12), "a progress line", |l| {
            heard(l).is_some()
        });
        last = heard(&l).unwrap();
    }
    let window = from.elapsed().as_secs_f64();
    ((last - first) as f64 / (window * 50.0), window, started)
}

/// Waits (a minute at most) until `lines`' progress lines show 30 more verified pictures
/// from `site` than the next one does now.
fn thirty_more_pictures(lines: &mut StderrLines, site: &str) {
    let before = lines.wait(Duration::from_secs(12), "a progress line", |l| {
        verified_in(l, site).is_some()
    });
    let before = verified_in(&before, site).unwrap();
    lines.wait(Duration::from_secs(60), "new verified pictures", |l| {
        verified_in(l, site).is_some_and(|n| n > before + 30)
    });
}

/// Asserts that of the lines saying `stopped` or `again`, the last says `again`: the site
/// may have tried while the link was still thin; what counts is what it says now.
fn says_again(lines: &mut StderrLines, stopped: &str, again: &str) {
    let said = lines.last(|l| l.contains(stopped) || l.contains(again));
    assert!(
        said.as_deref().is_some_and(|l| l.contains(again)),
        "the site says {again:?}: {said:?}"
    );
}

/// Bitrate tracking, one way (`pick`: a second's rate and its limit), from the first second
/// that carried anything: while limited, the median and the 10th–90th percentiles of what
/// crossed each second against the limit; and every second as it went.
fn tracking(seconds: &[Second], pick: impl Fn(&Second) -> (f64, Option<u32>)) -> String {
    // From the first second that carried anything (the site joins after the link is made).
    let first = seconds.iter().position(|s| pick(s).0 > 5.0).unwrap_or(0);
    let seconds = &seconds[first..];
    let limited: Vec<(f64, u32)> = seconds
        .iter()
        .filter_map(|s| {
            let (kbit, limit) = pick(s);
            Some((kbit, limit?))
        })
        .collect();
    let Some(&(_, limit)) = limited.last() else {
        return "never limited".into();
    };
    let mut rates: Vec<f64> = limited.iter().map(|x| x.0).collect();
    rates.sort_by(f64::total_cmp);
    let at = |q: f64| rates[((rates.len() - 1) as f64 * q).round() as usize];
    let lift = seconds
        .iter()
        .rposition(|s| pick(s).1.is_some())
        .map_or(0, |i| i + 1);
    let series: Vec<String> = seconds
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mark = if i == lift { "| " } else { "" };
            format!("{mark}{:.0}", pick(s).0)
        })
        .collect();
    format!(
        "limit {limit} kbit/s: median {:.0} (p10 {:.0}, p90 {:.0}) over {} s; per second (| = lifted): {}",
        at(0.5),
        at(0.1),
        at(0.9),
        rates.len(),
        series.join(" ")
    )
}

#[test]
fn with_udp_dropped_by_a_firewall_the_site_joins_over_tcp() {
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    let ns = NetNs::create();
    ns.block_udp();
    let (_server, url) = spawn_server(&["--dev", "--listen", &format!("{}:0", ns.host_ip)]);
    // (Their stderr is drained, not read.)
    let (mut province, _ep) = site(here(), &url, "nghe-an", 24, &[]);
    let (mut commune, _ec) = site(
        ns.command(&workspace_bin("diemcau-cli")),
        &url,
        "xa-chau-tien",
        22,
        &[],
    );
    let (rc, rp) = (report(&mut commune), report(&mut province));
    assert_eq!(rc["transport"], "tcp", "{rc}");
    assert_eq!(rp["transport"], "udp", "the other site keeps UDP: {rp}");
    // Both ways, after the 6 s spent finding UDP blocked: most of 10+ s at 15 fps verified.
    let (to_province, to_commune) = (
        received_from(&rp, "xa-chau-tien"),
        received_from(&rc, "nghe-an"),
    );
    for r in [to_province, to_commune] {
        assert!(r["video_frames_verified"].as_u64().unwrap() > 120, "{r}");
        assert!(r["audio_frames"].as_u64().unwrap() > 400, "{r}");
    }
}

#[test]
fn a_ten_second_blackout_ends_with_the_site_back_within_3_s_and_its_hand_still_raised() {
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    let ns = NetNs::create();
    let (_server, url) = spawn_server(&["--dev", "--listen", &format!("{}:0", ns.host_ip)]);
    let chair = dev_token("nghe-an", Role::Chair, ROOM);
    let (mut province, mut ep) = site(here(), &url, "nghe-an", 45, &["--token", &chair]);
    let (mut commune, mut ec) = site(
        ns.command(&workspace_bin("diemcau-cli")),
        &url,
        "xa-chau-tien",
        40,
        &["--raise-hand-after", "0"],
    );
    ec.wait_for("Tay của bạn: thứ 1");
    ep.wait_for("Hàng chờ phát biểu: xa-chau-tien");
    ec.wait_for("Hình đầu tiên từ nghe-an");
    ep.wait_for("Hình đầu tiên từ xa-chau-tien");

    let cut = Instant::now();
    ns.blackout(true);
    // The site notices on its own (no traffic for a few seconds) and keeps trying.
    ec.wait(Duration::from_secs(10), "the loss noticed", |l| {
        l.contains("đang kết nối lại")
    });
    // What the province had verified from the commune while the link was down.
    let frozen = ep.wait(Duration::from_secs(10), "a progress line", |l| {
        verified_in(l, "xa-chau-tien").is_some()
    });
    let frozen = verified_in(&frozen, "xa-chau-tien").unwrap();
    std::thread::sleep(Duration::from_secs(10).saturating_sub(cut.elapsed()));
    ns.blackout(false);
    let back = Instant::now();
    // The server tells the returning site its place in the queue as it joins, before the
    // media path is up again.
    let hand_seen = std::cell::Cell::new(false);
    ec.wait(Duration::from_secs(15), "the site back", |l| {
        hand_seen.set(hand_seen.get() || l.contains("Tay của bạn: thứ 1"));
        l.contains("Đã kết nối lại")
    });
    let took = back.elapsed();
    if !hand_seen.get() {
        ec.wait_for("Tay của bạn: thứ 1");
    }
    ep.wait_for("Hàng chờ phát biểu: xa-chau-tien");
    // And pictures flow again both ways.
    ep.wait(Duration::from_secs(12), "new verified pictures", |l| {
        verified_in(l, "xa-chau-tien").is_some_and(|n| n > frozen + 30)
    });
    let (rc, rp) = (report(&mut commune), report(&mut province));
    assert!(
        // The goal is 3 s (1.4 s measured, docs/benchmarks.md); this bound is a safety net
        // for a busy machine.
        took <= Duration::from_secs(5),
        "back {took:?} after the link returned"
    );
    eprintln!("back in the room {took:?} after the link returned");
    assert!(rc["reconnects"].as_u64().unwrap() >= 1, "{rc}");
    assert_eq!(
        rp["reconnects"], 0,
        "the province never lost its link: {rp}"
    );
    let hands = rc["hand_queue"].as_array().unwrap();
    assert!(
        hands.iter().any(|h| h["site"] == "xa-chau-tien"),
        "hand still raised at the end: {rc}"
    );
    assert!(
        received_from(&rc, "nghe-an")["video_frames_verified"]
            .as_u64()
            .unwrap()
            > 200
    );
}

#[test]
fn progress_lines_are_read_per_site() {
    let l = "[nghe-an] đã gửi 10 hình, 20 tiếng; nhận xa-a: 70 hình (68 đã kiểm), 250 tiếng; xa-b: 5 hình (4 đã kiểm), 9 tiếng";
    assert_eq!(verified_in(l, "xa-a"), Some(68));
    assert_eq!(verified_in(l, "xa-b"), Some(4));
    assert_eq!(verified_in(l, "xa-c"), None);
    assert_eq!(heard_in(l, "xa-a"), Some(250));
    assert_eq!(heard_in(l, "xa-b"), Some(9));
    assert_eq!(heard_in(l, "xa-c"), None);
    assert_eq!(buffer_in(l), None);
    let l = "[nghe-an] đã gửi 0 hình, 0 tiếng; nhận xa-a: 70 hình (68 đã kiểm), 250 tiếng; đệm tiếng 95 ms (mục tiêu 140 ms)";
    assert_eq!(heard_in(l, "xa-a"), Some(250));
    assert_eq!(buffer_in(l), Some((95.0, 140.0)));
}

#[test]
fn on_a_jittery_line_the_sound_buffer_deepens_so_speech_plays_whole_then_shrinks_when_it_calms() {
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    let link = EmulatedLink::create();
    let (_server, url) = spawn_server(&["--dev", "--listen", &format!("{}:0", link.host_ip)]);
    // The province plays what it hears at a speaker's pace (into nothing: no sound card).
    let (mut province, mut ep) = site(
        here(),
        &url,
        "nghe-an",
        120,
        &[
            "--video",
            "none",
            "--audio",
            "none",
            "--speaker",
            "null",
            "--progress-every",
            "1",
        ],
    );
    // A 4G line: 40 ms one way and up to 120 ms more per packet, in order (a late packet
    // holds back the ones behind it). No loss: whatever is invented is the buffer's doing.
    let jittery = Shape {
        delay: Duration::from_millis(40),
        jitter: Duration::from_millis(120),
        ..Shape::default()
    };
    link.shape_both(jittery);
    let (mut commune, _ec) = site(behind(&link), &url, "xa-chau-tien", 110, &[]);
    // It aims deeper than the 60 ms of a calm line, and the sound plays on for 30 s.
    ep.wait(Duration::from_secs(40), "the sound buffer deepening", |l| {
        buffer_in(l).is_some_and(|(_, aim)| aim >= 100.0)
    });
    let (heard, _, _) = speech_over(&mut ep, "xa-chau-tien", Duration::from_secs(30), || ());
    // The line calms: the buffer comes back down within 30 s (it remembers 10 s of
    // arrivals, then leaves out a frame a second).
    link.shape_both(Shape {
        jitter: Duration::ZERO,
        ..jittery
    });
    let calmed = Instant::now();
    ep.wait(Duration::from_secs(30), "the sound buffer shrinking", |l| {
        buffer_in(l).is_some_and(|(now, aim)| aim <= 60.0 && now <= 90.0)
    });
    let shrunk = calmed.elapsed();
    stop(&commune);
    let rc = report(&mut commune);
    stop(&province);
    let rp = report(&mut province);
    let p = &rp["audio_playout"];
    let n = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("{k} in {p}"));
    // A glitch: a frame invented, or left out to shrink the buffer.
    let glitches = n("concealed") + n("expanded") + n("dropped");
    eprintln!(
        "sound on a jittery line: {:.1} % of frames arrived while jittery; played {p}; back down {shrunk:?} after the line calmed",
        heard * 100.0
    );
    assert!(heard >= 0.98, "sound arrived {heard}");
    // At most one frame in a hundred played is a glitch. (A buffer held at 60 ms, waiting
    // for late packets and shrinking back, makes one about every second on this line: the
    // unit test beside the buffer.)
    assert!(glitches * 100 <= n("frames"), "{p}");
    assert!(n("late") * 100 <= n("frames"), "{p}");
    assert!(n("dropped") >= 1, "{p}");
    let p95 = p["delay_ms"]["p95"].as_f64().unwrap();
    assert!((100.0..=300.0).contains(&p95), "{p}");
    // Jitter is not congestion: the commune's pictures went on (before the queue was read
    // over half a second, 4G's jitter looked like a queue, and they paused within 5 s).
    assert_eq!(rc["sent"]["video_pauses"], 0, "{rc}");
    let pictures = received_from(&rp, "xa-chau-tien")["video_frames_verified"]
        .as_u64()
        .unwrap();
    assert!(pictures >= 15 * 40, "{pictures} pictures");
}

#[test]
fn at_256_kbit_5_percent_loss_and_150_ms_rtt_speech_gets_through_and_video_drops_a_layer_then_returns(
) {
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    let link = EmulatedLink::create();
    let (_server, url) = spawn_server(&["--dev", "--listen", &format!("{}:0", link.host_ip)]);
    // The province (on the machine) sends nothing back: what is measured here is the
    // commune's thin uplink; its downlink carries only the server's feedback.
    let (mut province, mut ep) = site(
        here(),
        &url,
        "nghe-an",
        120,
        &["--video", "none", "--audio", "none"],
    );
    let thin = Shape {
        rate_kbit: Some(256),
        delay: Duration::from_millis(75),
        loss_pct: 5.0,
        // An ADSL modem's buffer: packets over the rate wait rather than drop at once.
        queue: Duration::from_secs(1),
        ..Shape::default()
    };
    link.shape_both(thin);
    let shaped = Instant::now();
    let (mut commune, _ec) = site(
        behind(&link),
        &url,
        "xa-chau-tien",
        110,
        &["--video", "synthetic:640x360@15"],
    );
    // Squeezed, the commune drops to the 320x180 layer and keeps sending it. (The first
    // picture of the new layer can take a while: its keyframe is large for this link.)
    ep.wait(Duration::from_secs(45), "the low layer", |l| {
        l.contains("Hình từ xa-chau-tien: 320x180")
    });
    let low_since = Instant::now();
    let mut overshoots = 0;
    let before = ep.wait(Duration::from_secs(12), "a progress line", |l| {
        verified_in(l, "xa-chau-tien").is_some()
    });
    let before = verified_in(&before, "xa-chau-tien").unwrap();
    // Fewer than the 15 sent each second arrive whole on this link, but they keep coming.
    ep.wait(Duration::from_secs(12), "pictures at the low layer", |l| {
        verified_in(l, "xa-chau-tien").is_some_and(|n| n > before + 15)
    });
    std::thread::sleep(Duration::from_secs(20).saturating_sub(low_since.elapsed()));
    // The link really was that bad while it was thin.
    let (thin_up, _) = link.counts();
    let thin_for = shaped.elapsed().as_secs_f64();
    assert!(
        thin_up.lost * 100 >= thin_up.packets * 3,
        "uplink loss {thin_up:?}"
    );
    // GCC overshoots this link now and then, and the commune goes back up for a while; the
    // recovery is measured from the low layer, so the link lifts only while it is low.
    let layer = |l: &str| l.contains("Hình từ xa-chau-tien: ");
    if ep
        .last(layer)
        .is_some_and(|l| l.contains("Hình từ xa-chau-tien: 640x360"))
    {
        overshoots += 1;
        ep.wait(Duration::from_secs(30), "the low layer again", |l| {
            l.contains("Hình từ xa-chau-tien: 320x180")
        });
    }
    // The link recovers (its 150 ms round trip stays): the top layer is back within 10 s.
    link.shape_both(Shape {
        rate_kbit: None,
        loss_pct: 0.0,
        ..thin
    });
    let lifted = Instant::now();
    ep.wait(Duration::from_secs(20), "the top layer back", |l| {
        l.contains("Hình từ xa-chau-tien: 640x360")
    });
    let back = lifted.elapsed();
    // Done: both end now (SIGTERM ends a site with its report), the commune first.
    stop(&commune);
    let rc = report(&mut commune);
    stop(&province);
    let rp = report(&mut province);
    let (up, down) = link.counts();
    let got = received_from(&rp, "xa-chau-tien");
    eprintln!(
        "uplink tracking: {}; the server's feedback reported {} of {} of the commune's packets lost, {} of them covered by no feedback that arrived (a lost feedback)",
        tracking(&link.seconds(), |s| (s.up_kbit, s.up_limit)),
        rc["uplink_packets_reported_lost"],
        rc["uplink_packets_reported"],
        rc["uplink_packets_left_out"],
    );
    let sent = rc["sent"]["audio_frames"].as_u64().unwrap() as f64;
    let heard = got["audio_frames"].as_u64().unwrap() as f64;
    let repaired = got["audio_frames_repaired"].as_u64().unwrap() as f64;
    eprintln!(
        "audio: {sent} sent, {heard} received, {repaired} repaired ({:.1} % delivered or repaired); top layer back {back:?} after the limit lifted; layers {}; pictures paused for the link {} times; back at 640x360 while thin {overshoots} times (at the lift); {} probes of the uplink ({} bytes of padding); the thin uplink carried {:.0} kbit/s of 256 over {thin_for:.0} s ({thin_up:?}); in all {up:?}; downlink {down:?}",
        100.0 * (heard + repaired) / sent,
        rp["layers_received"],
        rc["sent"]["video_pauses"],
        rc["sent"]["layer_probes"],
        rc["sent"]["probe_bytes"],
        thin_up.delivered_bytes as f64 * 8.0 / thin_for / 1000.0,
    );
    // The goals: 95 % of sound frames delivered or repaired, pictures going on at the low
    // layer (never paused), and the top layer back within 10 s. (In 20 runs: 98.9-99.7 %,
    // no pause, back after 2.0-10.1 s and, since probing lifts the queue's ceiling, 2.0-5.0 s;
    // docs/benchmarks.md.)
    assert!((heard + repaired) / sent >= 0.95, "audio {got} of {sent}");
    assert_eq!(rc["sent"]["video_pauses"], 0, "{rc}");
    // The link loses both ways: some losses the server reported (the uplink's), and some
    // packets only a feedback lost on the way down would have covered, left out.
    let (lost, left_out) = (
        rc["uplink_packets_reported_lost"].as_u64().unwrap(),
        rc["uplink_packets_left_out"].as_u64().unwrap(),
    );
    assert!(0 < left_out && left_out < lost, "{left_out} of {lost}");
    assert!(
        back <= Duration::from_secs(10),
        "top layer back after {back:?}"
    );
    assert_eq!(rp["layers_received"]["xa-chau-tien"][1], "320x180", "{rp}");
}

#[test]
fn at_96_kbit_the_site_pauses_its_video_and_keeps_speech_then_sends_pictures_again_when_the_link_lifts(
) {
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    let link = EmulatedLink::create();
    let (_server, url) = spawn_server(&["--dev", "--listen", &format!("{}:0", link.host_ip)]);
    let (mut province, mut ep) = site(
        here(),
        &url,
        "nghe-an",
        150,
        &["--video", "none", "--audio", "none"],
    );
    // Too thin for sound and the smallest pictures together (Opus with its headers is
    // ~55 kbit/s, 320x180 needs at least 60 more).
    let thin = thin_line(96);
    link.shape_both(thin);
    let (mut commune, mut ec) = site(behind(&link), &url, "xa-chau-tien", 140, &[]);
    let joined = Instant::now();
    ec.wait(Duration::from_secs(45), "video paused for the link", |l| {
        l.contains("tạm dừng gửi hình")
    });
    let paused_after = joined.elapsed();
    // Speech while the link stays thin, from the province's progress lines (every 5 s).
    let (speech, window, (up0, down0)) =
        speech_over(&mut ep, "xa-chau-tien", Duration::from_secs(20), || {
            link.counts()
        });
    let (thin_up, thin_down) = link.counts();
    eprintln!(
        "in the window: uplink {:.1} packets/s, {:.1} kbit/s, {} queue drops; downlink {:.1} packets/s",
        (thin_up.packets - up0.packets) as f64 / window,
        (thin_up.bytes - up0.bytes) as f64 * 8.0 / window / 1000.0,
        thin_up.queue_drops - up0.queue_drops,
        (thin_down.packets - down0.packets) as f64 / window
    );
    // The link lifts: pictures come back by themselves, and the province verifies them.
    link.shape_both(Shape {
        rate_kbit: None,
        ..thin
    });
    let lifted = Instant::now();
    thirty_more_pictures(&mut ep, "xa-chau-tien");
    let back = lifted.elapsed();
    says_again(&mut ec, "tạm dừng gửi hình", "gửi hình trở lại");
    stop(&commune);
    let rc = report(&mut commune);
    stop(&province);
    let _rp = report(&mut province);
    eprintln!(
        "video paused {paused_after:?} after joining; speech while thin {:.1} % of 50 frames/s over {window:.0} s; 30 new pictures verified {back:?} after the limit lifted (progress lines every 5 s); paused {} times, {} ms in all; uplink while thin {thin_up:?}, downlink {thin_down:?}; transport {}",
        speech * 100.0,
        rc["sent"]["video_pauses"],
        rc["sent"]["video_paused_ms"],
        rc["transport"],
    );
    assert!(rc["sent"]["video_pauses"].as_u64().unwrap() >= 1, "{rc}");
    assert!(
        rc["sent"]["video_paused_ms"].as_u64().unwrap() > 5_000,
        "{rc}"
    );
    // Safety net, not the goal (the figures go to docs/benchmarks.md): with pictures paused,
    // most speech gets through a link that could not carry both. (The tries at sending
    // pictures again while the link is still thin cost some of it.)
    assert!(speech >= 0.6, "speech while thin: {:.1} %", speech * 100.0);
}

#[test]
fn with_a_thin_downlink_the_site_stops_receiving_pictures_keeps_the_sound_and_takes_pictures_again_later(
) {
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    let link = EmulatedLink::create();
    let (_server, url) = spawn_server(&["--dev", "--listen", &format!("{}:0", link.host_ip)]);
    // The province sends pictures and sound; the commune sends nothing and its downlink is
    // far too thin for the province's pictures (320x180: there is no lower layer to send).
    let (mut province, _ep) = site(here(), &url, "nghe-an", 150, &[]);
    let thin = thin_line(128);
    link.shape(Shape::default(), thin);
    let (mut commune, mut ec) = site(
        behind(&link),
        &url,
        "xa-chau-tien",
        140,
        &["--video", "none", "--audio", "none"],
    );
    let joined = Instant::now();
    ec.wait(
        Duration::from_secs(45),
        "pictures off for the downlink",
        |l| l.contains("tạm ngừng nhận hình"),
    );
    let off_after = joined.elapsed();
    // The province's sound at the commune while its pictures are off, from the commune's
    // progress lines.
    let (speech, window, ()) = speech_over(&mut ec, "nghe-an", Duration::from_secs(10), || ());
    // The downlink recovers: pictures are taken again (after the hold) and verified.
    link.shape_both(Shape::default());
    let lifted = Instant::now();
    thirty_more_pictures(&mut ec, "nghe-an");
    let back = lifted.elapsed();
    says_again(&mut ec, "tạm ngừng nhận hình", "nhận hình trở lại");
    stop(&commune);
    let rc = report(&mut commune);
    stop(&province);
    let _rp = report(&mut province);
    eprintln!(
        "pictures off {off_after:?} after joining; the province's sound while off {:.1} % of 50 frames/s over {window:.0} s; 30 new pictures verified {back:?} after the downlink lifted (5 s progress lines); turned off {} times",
        speech * 100.0,
        rc["video_receive_pauses"],
    );
    assert!(rc["video_receive_pauses"].as_u64().unwrap() >= 1, "{rc}");
    // Safety net (figures in docs/benchmarks.md): with the pictures off, the sound fits.
    assert!(
        speech >= 0.8,
        "sound while pictures are off: {:.1} %",
        speech * 100.0
    );
}

#[test]
fn on_a_thin_downlink_a_site_gets_the_low_layer_while_a_site_with_room_gets_the_top_one_then_the_top_when_it_lifts(
) {
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    let link = EmulatedLink::create();
    let (_server, url) = spawn_server(&["--dev", "--listen", &format!("{}:0", link.host_ip)]);
    // The province sends its 640x360 camera in two layers (its uplink is the machine's);
    // tp-vinh, beside it, and the commune, behind a thin downlink, only receive.
    let (mut province, _ep) = site(
        here(),
        &url,
        "nghe-an",
        150,
        &["--video", "synthetic:640x360@15"],
    );
    let (mut district, mut ed) = site(
        here(),
        &url,
        "tp-vinh",
        140,
        &["--video", "none", "--audio", "none"],
    );
    let thin = thin_line(350);
    link.shape(Shape::default(), thin);
    let (mut commune, mut ec) = site(
        behind(&link),
        &url,
        "xa-chau-tien",
        130,
        &["--video", "none", "--audio", "none"],
    );
    let joined = Instant::now();
    let size = |l: &str| l.contains("Hình từ nghe-an: ");
    // The commune settles on the 320x180 layer: its downlink has room for that and the
    // sound, not for 640x360.
    ec.wait(Duration::from_secs(60), "the low layer", |l| {
        l.contains("Hình từ nghe-an: 320x180")
    });
    let low_after = joined.elapsed();
    thirty_more_pictures(&mut ec, "nghe-an");
    let (speech, window, ()) = speech_over(&mut ec, "nghe-an", Duration::from_secs(10), || ());
    let low_now = ec.last(size);
    assert!(
        low_now
            .as_deref()
            .is_some_and(|l| l.contains("Hình từ nghe-an: 320x180")),
        "still on the low layer: {low_now:?}"
    );
    // Meanwhile tp-vinh, with room, has the province's top layer.
    let top_there = ed.last(size);
    assert!(
        top_there
            .as_deref()
            .is_some_and(|l| l.contains("Hình từ nghe-an: 640x360")),
        "tp-vinh has the top layer: {top_there:?}"
    );
    // The downlink lifts: the server's estimate grows (it probes) and the commune gets the
    // top layer.
    link.shape_both(Shape::default());
    let lifted = Instant::now();
    ec.wait(Duration::from_secs(40), "the top layer", |l| {
        l.contains("Hình từ nghe-an: 640x360")
    });
    let top_after = lifted.elapsed();
    thirty_more_pictures(&mut ec, "nghe-an");
    stop(&commune);
    let rc = report(&mut commune);
    stop(&district);
    let rd = report(&mut district);
    stop(&province);
    let rp = report(&mut province);
    let got = received_from(&rc, "nghe-an");
    eprintln!(
        "downlink tracking: {}",
        tracking(&link.seconds(), |s| (s.down_kbit, s.down_limit))
    );
    eprintln!(
        "low layer {low_after:?} after joining; the province's sound on it {:.1} % of 50 frames/s over {window:.0} s; top layer {top_after:?} after the lift; the commune got {}, tp-vinh {}; the province sent {} layers; pictures turned off for the downlink {} times",
        speech * 100.0,
        got["layers"],
        received_from(&rd, "nghe-an")["layers"],
        rp["sent"]["video_layers"],
        rc["video_receive_pauses"],
    );
    assert_eq!(rp["sent"]["video_layers"], 2, "{rp}");
    assert_eq!(got["video_decode_errors"], 0, "{got}");
    // Safety nets (figures in docs/benchmarks.md): the sound fits beside the low layer, and
    // the top layer comes back.
    assert!(
        speech >= 0.9,
        "sound beside the low layer: {:.1} %",
        speech * 100.0
    );
    assert!(
        top_after <= Duration::from_secs(30),
        "top after {top_after:?}"
    );
}

#[test]
fn a_site_whose_media_handshake_stalls_opens_its_connection_again_by_itself() {
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    let link = EmulatedLink::create();
    let (_server, url) = logged_server(
        Command::new("sh"),
        "stall-server",
        &["--dev", "--listen", &format!("{}:0", link.host_ip)],
    );
    let (mut province, mut ep) = site(
        here(),
        &url,
        "nghe-an",
        90,
        &["--video", "none", "--audio", "none"],
    );
    // The server's last DTLS flight never reaches the commune's first connection: the server
    // is done with the handshake (so its media timeout never fires) and the commune never is,
    // as a lossy link does now and then.
    link.shape(
        Shape::default(),
        Shape {
            stall_first_dtls: true,
            ..Shape::default()
        },
    );
    let (mut commune, mut ec) = site(behind(&link), &url, "xa-chau-tien", 80, &[]);
    let started = Instant::now();
    ec.wait(Duration::from_secs(40), "the stall noticed", |l| {
        l.contains("media handshake stalled")
    });
    let noticed = started.elapsed();
    ec.wait(Duration::from_secs(20), "connected again", |l| {
        l.contains("Đã kết nối lại")
    });
    thirty_more_pictures(&mut ep, "xa-chau-tien");
    let seen = started.elapsed();
    stop(&commune);
    let rc = report(&mut commune);
    stop(&province);
    let rp = report(&mut province);
    eprintln!(
        "stall noticed {noticed:?} after the site started; its pictures verified at the province {seen:?} after; reconnects {}",
        rc["reconnects"]
    );
    assert_eq!(rc["reconnects"], 1, "{rc}");
    assert!(
        received_from(&rp, "xa-chau-tien")["video_frames_verified"]
            .as_u64()
            .unwrap()
            > 30,
        "{rp}"
    );
}

/// `diemcau-server ARGS` run by `sh` (`cmd`), its log in a file named on stderr (for a
/// failure to be explained), and its address.
fn logged_server(mut cmd: Command, name: &str, args: &[&str]) -> (Proc, String) {
    let log = std::env::temp_dir().join(format!("diemcau-{name}-{}.log", std::process::id()));
    eprintln!("{name} log: {}", log.display());
    cmd.args(["-c", "exec \"$0\" \"$@\" 2>\"$SERVER_LOG\""])
        .arg(workspace_bin("diemcau-server"))
        .args(args)
        .env("SERVER_LOG", &log)
        .env(
            "RUST_LOG",
            std::env::var("SITE_LOG").unwrap_or_else(|_| "info".into()),
        );
    let (p, line) = diemcau_e2e::desktop::first_line(&mut cmd, name);
    let url = line
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("{name}'s first line: {line:?}"))
        .to_string();
    (p, url)
}

#[test]
fn a_district_relay_keeps_its_meeting_through_a_ten_second_uplink_cut_and_links_again_within_5_s() {
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    let ns = NetNs::create();
    let (_province, url) = logged_server(
        Command::new("/bin/sh"),
        "province",
        &["--dev", "--listen", &format!("{}:0", ns.host_ip)],
    );
    // The district relay and its communes live in the namespace; the province's side of the
    // link is the only way out of it.
    let district = dev_token("tp-vinh", Role::District, ROOM);
    let (_relay, relay_url) = logged_server(
        ns.command(std::path::Path::new("/bin/sh")),
        "relay",
        &[
            "--dev",
            "--listen",
            &format!("{}:0", ns.ns_ip),
            "--upstream",
            &url,
            "--site",
            "tp-vinh",
            "--token",
            &district,
            "--room",
            ROOM,
        ],
    );
    let chair = dev_token("nghe-an", Role::Chair, ROOM);
    let (mut province, mut ep) = site(here(), &url, "nghe-an", 60, &["--token", &chair]);
    let under = |s: &str, hand: &[&str]| {
        // Progress each second, to see the district meeting inside the cut.
        let mut extra = vec!["--progress-every", "1"];
        extra.extend_from_slice(hand);
        site(
            ns.command(&workspace_bin("diemcau-cli")),
            &relay_url,
            s,
            55,
            &extra,
        )
    };
    // Its hand goes up through the relay, and must still be up after the cut.
    let (mut le_loi, mut el) = under("tp-vinh-le-loi", &["--raise-hand-after", "0"]);
    let (mut hung_dung, _eh) = under("tp-vinh-hung-dung", &[]);
    // Verified pictures each way across the link, and within the district.
    ep.wait_for("Hàng chờ phát biểu: tp-vinh-le-loi");
    let pictures = |lines: &mut StderrLines, from: &str| {
        lines.wait(Duration::from_secs(20), "verified pictures", |l| {
            verified_in(l, from).is_some_and(|n| n > 0)
        });
    };
    pictures(&mut el, "nghe-an");
    pictures(&mut el, "tp-vinh-hung-dung");
    pictures(&mut ep, "tp-vinh-le-loi");
    assert!(
        el.last(|l| l.contains("Đã kết nối với tỉnh")).is_some(),
        "the commune was told its district is linked"
    );

    let cut = Instant::now();
    ns.cut(true);
    // The district's own meeting goes on: between the first progress line of the cut and
    // one at least 3 s later, after the commune was told, new verified pictures from the
    // other commune, all inside the ten seconds.
    let progress = |l: &str| verified_in(l, "tp-vinh-hung-dung").is_some();
    let first = el.wait(Duration::from_secs(6), "a progress line", progress);
    let first_at = Instant::now();
    let loss = "Mất kết nối với tỉnh";
    if el.last(|l| l.contains(loss)).is_none() {
        el.wait(Duration::from_secs(8), "the loss told", |l| {
            l.contains(loss)
        });
    }
    let told = cut.elapsed();
    // At least 3 s of the cut between the two lines (45 pictures at 15 fps).
    let later = el.wait(Duration::from_secs(6), "a later progress line", |l| {
        progress(l) && first_at.elapsed() >= Duration::from_secs(3)
    });
    let (a, b) = (
        verified_in(&first, "tp-vinh-hung-dung").unwrap(),
        verified_in(&later, "tp-vinh-hung-dung").unwrap(),
    );
    assert!(
        b > a + 30,
        "pictures within the district during the cut: {first} → {later}"
    );
    assert!(
        cut.elapsed() < Duration::from_secs(10),
        "the district meeting was checked after the cut had already ended ({:?})",
        cut.elapsed()
    );
    std::thread::sleep(Duration::from_secs(10).saturating_sub(cut.elapsed()));
    ns.cut(false);
    let mended = Instant::now();
    el.wait(Duration::from_secs(15), "the link back", |l| {
        l.contains("Đã kết nối với tỉnh")
    });
    let took = mended.elapsed();
    eprintln!("uplink cut: told after {told:?}; linked again {took:?} after the link returned");
    // Media across the link again, both ways.
    thirty_more_pictures(&mut ep, "tp-vinh-le-loi");
    thirty_more_pictures(&mut el, "nghe-an");
    // The province leaves first: its report holds the queue as it last saw it.
    stop(&province);
    let rp = report(&mut province);
    stop(&le_loi);
    stop(&hung_dung);
    let rl = report(&mut le_loi);
    let _ = report(&mut hung_dung);
    assert_eq!(
        rl["reconnects"], 0,
        "the commune's own link never broke: {rl}"
    );
    let hands = rp["hand_queue"].as_array().unwrap();
    assert!(
        hands
            .iter()
            .any(|h| h["site"] == "tp-vinh-le-loi" && h["place"] == 1),
        "the hand raised behind the relay is still first in the province's queue: {rp}"
    );
    assert_eq!(rp["reconnects"], 0, "{rp}");
    assert_eq!(
        rp["site_paths"]["tp-vinh-le-loi"],
        serde_json::json!(["nghe-an", "tp-vinh"]),
        "{rp}"
    );
    assert!(
        // The bound; a relay dials every 0.25–1 s while the link is down.
        took <= Duration::from_secs(5),
        "the uplink came back {took:?} after the cut ended"
    );
}
