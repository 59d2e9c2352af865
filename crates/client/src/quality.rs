//! Link quality as a person sees it: this site's own link (round trip, loss the server
//! reported, what is being sent and at which size, whether video is paused for the link) and
//! what arrives from each other site (bitrate, sound lost, picture size), each graded good,
//! fair or poor. The room works it out every [`QUALITY_EVERY`] from the counters it already
//! keeps and sends it as [`crate::RoomEvent::Quality`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use diemcau_protocol::SiteId;
use serde::{Deserialize, Serialize};

/// How often a [`Quality`] is worked out.
pub const QUALITY_EVERY: Duration = Duration::from_secs(2);

/// How a link does, for a badge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grade {
    Good,
    Fair,
    Poor,
}

impl Grade {
    /// The word a person reads.
    pub fn vi(self) -> &'static str {
        match self {
            Grade::Good => "tốt",
            Grade::Fair => "trung bình",
            Grade::Poor => "kém",
        }
    }

    /// From the measures of a link: loss in percent, round trip, and whether the pictures
    /// are below their full size or stopped for the link.
    pub fn of(loss_pct: Option<f64>, rtt: Option<Duration>, reduced: bool, paused: bool) -> Grade {
        let loss = loss_pct.unwrap_or(0.0);
        let rtt_ms = rtt.map_or(0, |r| r.as_millis());
        if paused || loss >= 10.0 || rtt_ms >= 600 {
            Grade::Poor
        } else if reduced || loss >= 2.0 || rtt_ms >= 300 {
            Grade::Fair
        } else {
            Grade::Good
        }
    }
}

/// This site's own link to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    /// Round trip to the server, from ICE's consent checks on the media path.
    pub rtt_ms: Option<f64>,
    /// Of what this site sent, the share the server reported lost (percent).
    pub uplink_loss_pct: Option<f64>,
    /// Of what the server sent this site, the share lost on the way (percent; none when
    /// nothing arrived).
    #[serde(default)]
    pub downlink_loss_pct: Option<f64>,
    /// The congestion controller's estimate of what the uplink carries (bps).
    pub estimate_bps: u64,
    /// Sent over the last interval, sound and pictures (bps, payload).
    pub send_bps: u64,
    /// The size of the pictures sent (none without video).
    pub send_size: Option<(usize, usize)>,
    /// Pictures are sent below the camera's size.
    pub reduced: bool,
    /// Video is paused because the link is too thin: sound only.
    pub video_paused: bool,
    pub grade: Grade,
    /// What arrives from each other site.
    pub sites: Vec<SiteQuality>,
}

impl Quality {
    /// The link's figures in one line, in Vietnamese.
    pub fn vi(&self) -> String {
        let mut parts = Vec::new();
        if let Some(rtt) = self.rtt_ms {
            parts.push(format!("trễ {rtt:.0} ms"));
        }
        if let Some(loss) = self.uplink_loss_pct {
            // Vietnamese writes a decimal comma.
            let loss = format!("{loss:.1}").replace('.', ",");
            parts.push(format!("mất {loss} % gói"));
        }
        parts.push(format!("gửi {} kbit/s", self.send_bps / 1000));
        match (self.video_paused, self.send_size) {
            (true, _) => parts.push("chỉ gửi tiếng".into()),
            (false, Some((w, h))) => parts.push(format!("hình {w}x{h}")),
            (false, None) => {}
        }
        parts.join(", ")
    }
}

/// How long a paused stream waits before it is tried again: `initial` at first, doubled (to
/// `max`) each time it had to be paused again within `relapse_within` of coming back, and
/// back to `initial` once it has run twice that long without trouble. The pause of sent
/// pictures for a thin uplink ([`crate::publish::VideoGate`]) and of received pictures for a
/// thin downlink ([`DownlinkGate`]) both back off this way.
#[derive(Debug, Clone)]
pub struct RetryHold {
    initial: Duration,
    max: Duration,
    relapse_within: Duration,
    hold: Duration,
    resumed_at: Option<Instant>,
}

impl RetryHold {
    pub fn new(initial: Duration, max: Duration, relapse_within: Duration) -> Self {
        RetryHold {
            initial,
            max,
            relapse_within,
            hold: initial,
            resumed_at: None,
        }
    }

    /// The hold now.
    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// The stream came back at `now`.
    pub fn resumed(&mut self, now: Instant) {
        self.resumed_at = Some(now);
    }

    /// The stream had to be paused at `now`: a relapse doubles the hold.
    pub fn paused(&mut self, now: Instant) {
        if self
            .resumed_at
            .is_some_and(|t| now.saturating_duration_since(t) <= self.relapse_within)
        {
            self.hold = (self.hold * 2).min(self.max);
        }
    }

    /// All is well at `now`: long enough after the last resume, the hold starts over.
    pub fn settle(&mut self, now: Instant) {
        if self
            .resumed_at
            .is_some_and(|t| now.saturating_duration_since(t) > 2 * self.relapse_within)
        {
            self.hold = self.initial;
            self.resumed_at = None;
        }
    }
}

/// Downlink loss at which the others' pictures are turned off (sound only), once it has
/// lasted [`DOWN_PAUSE_AFTER`] intervals in a row.
pub const DOWN_PAUSE_LOSS_PCT: f64 = 15.0;
pub const DOWN_PAUSE_AFTER: u32 = 3;
/// How long pictures stay off before they are tried again; doubled (to [`DOWN_HOLD_MAX`])
/// when they had to be turned off again within [`DOWN_RELAPSE_WITHIN`] of coming back.
pub const DOWN_HOLD: Duration = Duration::from_secs(15);
pub const DOWN_HOLD_MAX: Duration = Duration::from_secs(240);
pub const DOWN_RELAPSE_WITHIN: Duration = Duration::from_secs(60);

/// Sound only for a thin *downlink*: without simulcast the server cannot send a lower layer,
/// so when what the server sends this site is lost on the way, the others' pictures are
/// turned off for a while (protocol `receive_video`) and then tried again. The loss is
/// measured from the gaps in each slot's sequence numbers, which the server writes itself,
/// so loss before the server (another site's uplink) does not count.
#[derive(Debug, Clone)]
pub struct DownlinkGate {
    off: bool,
    bad: u32,
    off_since: Option<Instant>,
    retry: RetryHold,
}

impl Default for DownlinkGate {
    fn default() -> Self {
        DownlinkGate {
            off: false,
            bad: 0,
            off_since: None,
            retry: RetryHold::new(DOWN_HOLD, DOWN_HOLD_MAX, DOWN_RELAPSE_WITHIN),
        }
    }
}

impl DownlinkGate {
    /// Pictures are off for the link.
    pub fn off(&self) -> bool {
        self.off
    }

    pub fn hold(&self) -> Duration {
        self.retry.hold()
    }

    /// Folds in one interval's downlink loss; returns the new state when it changes.
    pub fn update(&mut self, now: Instant, loss_pct: Option<f64>) -> Option<bool> {
        if self.off {
            let since = self.off_since.unwrap_or(now);
            if now.saturating_duration_since(since) < self.retry.hold() {
                return None;
            }
            self.off = false;
            self.bad = 0;
            self.retry.resumed(now);
            return Some(false);
        }
        if loss_pct.is_some_and(|l| l >= DOWN_PAUSE_LOSS_PCT) {
            self.bad += 1;
        } else {
            self.bad = 0;
            self.retry.settle(now);
        }
        if self.bad < DOWN_PAUSE_AFTER {
            return None;
        }
        self.retry.paused(now);
        self.off = true;
        self.off_since = Some(now);
        Some(true)
    }
}

/// What arrives from one other site over the last interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteQuality {
    pub site: SiteId,
    /// Received, sound and pictures (bps, payload).
    pub recv_bps: u64,
    /// Of its sound frames, the share lost (repaired or not), percent; none when it sent
    /// no sound in the interval.
    pub audio_loss_pct: Option<f64>,
    /// The size of its last picture.
    pub size: Option<(usize, usize)>,
    pub grade: Grade,
}

/// Counters of one site at one moment, for differences between two moments.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SiteSample {
    pub bytes: u64,
    pub audio_frames: u64,
    pub audio_lost: u64,
    pub size: Option<(usize, usize)>,
    /// The largest size seen from the site.
    pub top: Option<(usize, usize)>,
}

/// The per-site part of a [`Quality`], from two samples `dt` apart.
pub fn sites_between(
    before: &BTreeMap<SiteId, SiteSample>,
    now: &BTreeMap<SiteId, SiteSample>,
    dt: Duration,
) -> Vec<SiteQuality> {
    let secs = dt.as_secs_f64().max(1e-3);
    now.iter()
        .map(|(site, n)| {
            let b = before.get(site).copied().unwrap_or_default();
            let frames = n.audio_frames.saturating_sub(b.audio_frames);
            let lost = n.audio_lost.saturating_sub(b.audio_lost);
            let audio_loss_pct =
                (frames + lost > 0).then(|| 100.0 * lost as f64 / (frames + lost) as f64);
            let area = |s: Option<(usize, usize)>| s.map_or(0, |(w, h)| w * h);
            let reduced = area(n.size) < area(n.top);
            SiteQuality {
                site: site.clone(),
                recv_bps: (n.bytes.saturating_sub(b.bytes) as f64 * 8.0 / secs) as u64,
                audio_loss_pct,
                size: n.size,
                grade: Grade::of(audio_loss_pct, None, reduced, false),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grades_follow_loss_delay_and_pictures() {
        let ms = Duration::from_millis;
        assert_eq!(Grade::of(None, None, false, false), Grade::Good);
        assert_eq!(
            Grade::of(Some(1.0), Some(ms(80)), false, false),
            Grade::Good
        );
        assert_eq!(
            Grade::of(Some(5.0), Some(ms(150)), false, false),
            Grade::Fair
        );
        assert_eq!(
            Grade::of(Some(0.0), Some(ms(350)), false, false),
            Grade::Fair
        );
        assert_eq!(Grade::of(Some(0.0), Some(ms(50)), true, false), Grade::Fair);
        assert_eq!(
            Grade::of(Some(12.0), Some(ms(50)), false, false),
            Grade::Poor
        );
        assert_eq!(
            Grade::of(Some(0.0), Some(ms(700)), false, false),
            Grade::Poor
        );
        assert_eq!(Grade::of(Some(0.0), Some(ms(50)), false, true), Grade::Poor);
    }

    #[test]
    fn a_lossy_downlink_turns_pictures_off_and_tries_them_again_less_often() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut g = DownlinkGate::default();
        // Two bad intervals and a good one: nothing.
        assert_eq!(g.update(at(2), Some(30.0)), None);
        assert_eq!(g.update(at(4), Some(30.0)), None);
        assert_eq!(g.update(at(6), Some(1.0)), None);
        // No figure (nothing arrived) is not loss.
        assert_eq!(g.update(at(8), None), None);
        for s in [10, 12] {
            assert_eq!(g.update(at(s), Some(20.0)), None);
        }
        assert_eq!(g.update(at(14), Some(20.0)), Some(true), "three in a row");
        assert!(g.off());
        assert_eq!(g.update(at(28), Some(0.0)), None);
        assert_eq!(
            g.update(at(29), Some(0.0)),
            Some(false),
            "after the 15 s hold"
        );
        // Lossy again within a minute: the next hold is twice as long.
        for s in [31, 33] {
            assert_eq!(g.update(at(s), Some(40.0)), None);
        }
        assert_eq!(g.update(at(35), Some(40.0)), Some(true));
        assert_eq!(g.hold(), Duration::from_secs(30));
        assert_eq!(g.update(at(64), None), None);
        assert_eq!(g.update(at(65), None), Some(false));
        // Two minutes without trouble: back to the first hold.
        assert_eq!(g.update(at(190), Some(0.0)), None);
        assert_eq!(g.hold(), DOWN_HOLD);
    }

    #[test]
    fn the_link_reads_in_one_line() {
        let q = Quality {
            rtt_ms: Some(151.6),
            uplink_loss_pct: Some(4.94),
            downlink_loss_pct: None,
            estimate_bps: 240_000,
            send_bps: 231_400,
            send_size: Some((320, 180)),
            reduced: true,
            video_paused: false,
            grade: Grade::Fair,
            sites: Vec::new(),
        };
        assert_eq!(
            q.vi(),
            "trễ 152 ms, mất 4,9 % gói, gửi 231 kbit/s, hình 320x180"
        );
        let paused = Quality {
            rtt_ms: None,
            uplink_loss_pct: None,
            video_paused: true,
            ..q
        };
        assert_eq!(paused.vi(), "gửi 231 kbit/s, chỉ gửi tiếng");
    }

    #[test]
    fn per_site_rates_and_loss_come_from_differences() {
        let before = BTreeMap::from([(
            "xa-a".to_string(),
            SiteSample {
                bytes: 10_000,
                audio_frames: 100,
                audio_lost: 0,
                size: Some((640, 360)),
                top: Some((640, 360)),
            },
        )]);
        let now = BTreeMap::from([
            (
                "xa-a".to_string(),
                SiteSample {
                    bytes: 60_000,
                    audio_frames: 195,
                    audio_lost: 5,
                    size: Some((320, 180)),
                    top: Some((640, 360)),
                },
            ),
            (
                "xa-b".to_string(),
                SiteSample {
                    bytes: 8_000,
                    ..Default::default()
                },
            ),
        ]);
        let q = sites_between(&before, &now, Duration::from_secs(2));
        assert_eq!(q.len(), 2);
        assert_eq!(q[0].recv_bps, 200_000);
        assert_eq!(q[0].audio_loss_pct, Some(5.0));
        assert_eq!(q[0].size, Some((320, 180)));
        assert_eq!(q[0].grade, Grade::Fair);
        // A new site counts from zero; no sound in the interval is no loss figure.
        assert_eq!(q[1].recv_bps, 32_000);
        assert_eq!(q[1].audio_loss_pct, None);
        assert_eq!(q[1].grade, Grade::Good);
    }
}
