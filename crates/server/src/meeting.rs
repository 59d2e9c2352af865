//! Meeting control for one room: the hand queue, the floor, mutes, spotlight, lock and
//! roll-call. Pure state fed with time (milliseconds since the Unix epoch), so tests run it
//! without a network; the engine asks it who may speak before forwarding any audio.
//!
//! Floor rules ([`Meeting::may_speak`]):
//! - a muted site never speaks (the chair too, if it muted itself);
//! - `open`: everyone else speaks;
//! - `chair_only` and `granted`: the chair and the sites the chair granted the floor to.
//!   They differ in practice, not in enforcement: in `chair_only` sites ask (raise a hand)
//!   and the chair gives the floor; in `granted` the chair hands microphones out itself.
//!
//! Hands are kept by site id, not by connection: a site that drops and comes back keeps its
//! place. A site that leaves on purpose lowers its hand.

use std::collections::{BTreeMap, BTreeSet};

use diemcau_protocol::{
    Directory, FloorMode, FloorState, Hand, MeetingSnapshot, Role, RollEntry, RollStatus, SiteId,
    SiteInfo,
};

/// One room's meeting state.
#[derive(Debug, Default, Clone)]
pub struct Meeting {
    /// Raised hands in the order they went up.
    hands: Vec<(SiteId, u64)>,
    mode: FloorMode,
    granted: BTreeSet<SiteId>,
    muted: BTreeSet<SiteId>,
    /// Sites the chair asked to unmute; only they may unmute themselves.
    asked_unmute: BTreeSet<SiteId>,
    spotlight: Option<SiteId>,
    locked: bool,
    /// Roll-call marks (present?, reason) since the last start.
    roll: BTreeMap<SiteId, (bool, Option<String>)>,
    roll_started: Option<u64>,
    /// Sites seen connected since the roll-call started.
    roll_seen: BTreeSet<SiteId>,
}

impl Meeting {
    pub fn mode(&self) -> FloorMode {
        self.mode
    }

    pub fn locked(&self) -> bool {
        self.locked
    }

    pub fn spotlight(&self) -> Option<&str> {
        self.spotlight.as_deref()
    }

    /// Raises a site's hand as it went up at `at_ms` (a hand brought back after a restart):
    /// after every hand that went up no later. A hand already up keeps its place. True if it
    /// changed.
    pub fn raise_at(&mut self, site: &str, at_ms: u64) -> bool {
        if self.hands.iter().any(|(s, _)| s == site) {
            return false;
        }
        let place = self.hands.partition_point(|(_, t)| *t <= at_ms);
        self.hands.insert(place, (site.to_string(), at_ms));
        true
    }

    /// Raises a site's hand; a hand already up keeps its place. True if it changed.
    pub fn raise(&mut self, site: &str, now_ms: u64) -> bool {
        if self.hands.iter().any(|(s, _)| s == site) {
            return false;
        }
        self.hands.push((site.to_string(), now_ms));
        true
    }

    pub fn lower(&mut self, site: &str) -> bool {
        let before = self.hands.len();
        self.hands.retain(|(s, _)| s != site);
        before != self.hands.len()
    }

    pub fn lower_all(&mut self) -> bool {
        let had = !self.hands.is_empty();
        self.hands.clear();
        had
    }

    pub fn hand_count(&self) -> usize {
        self.hands.len()
    }

    /// The raised hands in queue order.
    pub fn hands(&self) -> &[(SiteId, u64)] {
        &self.hands
    }

    /// The whole state but the roll-call, as a parent room sends it to a relay.
    pub fn snapshot(&self) -> MeetingSnapshot {
        MeetingSnapshot {
            hands: self.hands.clone(),
            mode: self.mode,
            granted: self.granted.iter().cloned().collect(),
            muted: self.muted.iter().cloned().collect(),
            asked_unmute: self.asked_unmute.iter().cloned().collect(),
            spotlight: self.spotlight.clone(),
            locked: self.locked,
        }
    }

    /// Takes a parent room's state (a relay mirrors it while linked); the roll-call, which
    /// stays with the parent, is kept as it was.
    pub fn mirror(&mut self, s: &MeetingSnapshot) {
        self.hands = s.hands.clone();
        self.mode = s.mode;
        self.granted = s.granted.iter().cloned().collect();
        self.muted = s.muted.iter().cloned().collect();
        self.asked_unmute = s.asked_unmute.iter().cloned().collect();
        self.spotlight = s.spotlight.clone();
        self.locked = s.locked;
    }

    /// The queue as `viewer` may see it (see the module docs of the protocol's `Hands`).
    pub fn hands_for(
        &self,
        viewer: &str,
        role: Role,
        info: impl Fn(&str) -> SiteInfo,
    ) -> Vec<Hand> {
        self.hands
            .iter()
            .enumerate()
            .map(|(i, (site, at))| (i, site, at, info(site)))
            .filter(|(_, site, _, inf)| match role {
                Role::Chair => true,
                Role::District => *site == viewer || inf.path.iter().any(|p| p == viewer),
                Role::Commune | Role::Observer => *site == viewer,
            })
            .map(|(i, _, at, inf)| Hand {
                site: inf.id,
                name: inf.name,
                path: inf.path,
                place: i as u32 + 1,
                raised_at_ms: *at,
            })
            .collect()
    }

    pub fn set_mode(&mut self, mode: FloorMode) {
        self.mode = mode;
    }

    /// Gives a site the floor (its hand comes down, a mute is lifted).
    pub fn grant(&mut self, site: &str) {
        self.granted.insert(site.to_string());
        self.muted.remove(site);
        self.lower(site);
    }

    pub fn revoke(&mut self, site: &str) {
        self.granted.remove(site);
    }

    pub fn mute(&mut self, site: &str) {
        self.muted.insert(site.to_string());
        // A new mute cancels an earlier request to unmute.
        self.asked_unmute.remove(site);
    }

    /// Mutes every site given (the present non-chair sites).
    pub fn mute_all<'a>(&mut self, sites: impl IntoIterator<Item = &'a str>) {
        for s in sites {
            self.muted.insert(s.to_string());
            self.asked_unmute.remove(s);
        }
    }

    pub fn unmute(&mut self, site: &str) {
        self.muted.remove(site);
        self.asked_unmute.remove(site);
    }

    /// The chair asks `site` to unmute itself.
    pub fn ask_unmute(&mut self, site: &str) {
        self.asked_unmute.insert(site.to_string());
    }

    /// The site's answer: it unmutes only if the chair asked. True if that lifted a mute.
    pub fn unmute_reply(&mut self, site: &str, accept: bool) -> bool {
        if !self.asked_unmute.remove(site) || !accept {
            return false;
        }
        self.muted.remove(site)
    }

    pub fn set_spotlight(&mut self, site: Option<&str>) {
        self.spotlight = site.map(str::to_string);
    }

    pub fn set_locked(&mut self, locked: bool) {
        self.locked = locked;
    }

    /// Whether the server forwards this site's audio now.
    pub fn may_speak(&self, site: &str, role: Role) -> bool {
        if self.muted.contains(site) || role == Role::Observer {
            return false;
        }
        match self.mode {
            FloorMode::Open => true,
            FloorMode::ChairOnly | FloorMode::Granted => {
                role == Role::Chair || self.granted.contains(site)
            }
        }
    }

    pub fn floor_for(&self, site: &str, role: Role) -> FloorState {
        FloorState {
            mode: self.mode,
            granted: self.granted.iter().cloned().collect(),
            muted: self.muted.iter().cloned().collect(),
            spotlight: self.spotlight.clone(),
            locked: self.locked,
            you_may_speak: self.may_speak(site, role),
        }
    }

    /// Forgets a site that left on purpose: its hand and grant. A mute stays, so leaving
    /// and coming back is no way around it.
    pub fn forget(&mut self, site: &str) {
        self.lower(site);
        self.granted.remove(site);
        self.asked_unmute.remove(site);
        if self.spotlight.as_deref() == Some(site) {
            self.spotlight = None;
        }
    }

    /// Starts (or restarts) a roll-call; `connected` are the sites present now.
    pub fn roll_call_start<'a>(
        &mut self,
        now_ms: u64,
        connected: impl IntoIterator<Item = &'a SiteId>,
    ) {
        self.roll.clear();
        self.roll_started = Some(now_ms);
        self.roll_seen = connected.into_iter().cloned().collect();
    }

    /// Notes a site as seen (it joined) while a roll-call runs.
    pub fn saw(&mut self, site: &str) {
        if self.roll_started.is_some() {
            self.roll_seen.insert(site.to_string());
        }
    }

    pub fn roll_call_started(&self) -> bool {
        self.roll_started.is_some()
    }

    pub fn roll_call_mark(&mut self, site: &str, present: bool, reason: Option<String>) {
        self.roll.insert(site.to_string(), (present, reason));
    }

    /// Every directory site exactly once, in directory order: present if marked present, or
    /// (unless marked absent) connected now or seen since the roll-call started; otherwise
    /// absent with the chair's reason if any.
    pub fn roll_call(&self, directory: &Directory, connected: &BTreeSet<SiteId>) -> Vec<RollEntry> {
        directory
            .iter()
            .map(|e| {
                let is_connected = connected.contains(&e.id);
                let (status, reason) = match self.roll.get(&e.id) {
                    Some((true, r)) => (RollStatus::Present, r.clone()),
                    Some((false, r)) => (RollStatus::Absent, r.clone()),
                    None if is_connected || self.roll_seen.contains(&e.id) => {
                        (RollStatus::Present, None)
                    }
                    None => (RollStatus::Absent, None),
                };
                RollEntry {
                    site: e.id.clone(),
                    name: e.name.clone(),
                    path: directory.path(&e.id),
                    status,
                    connected: is_connected,
                    reason,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod mirror_tests {
    use super::*;

    #[test]
    fn a_mirror_carries_all_but_the_roll_call() {
        let mut parent = Meeting::default();
        parent.raise("xa-a", 5);
        parent.raise("xa-b", 9);
        parent.set_mode(FloorMode::ChairOnly);
        parent.grant("xa-a");
        parent.mute("xa-c");
        parent.ask_unmute("xa-c");
        parent.set_spotlight(Some("xa-a"));
        let mut relay = Meeting::default();
        relay.roll_call_start(1, &["xa-z".to_string()]);
        relay.raise("xa-local", 1);
        relay.mirror(&parent.snapshot());
        assert_eq!(relay.snapshot(), parent.snapshot());
        assert_eq!(relay.hands(), &[("xa-b".to_string(), 9)]);
        assert!(relay.may_speak("xa-a", Role::Commune));
        assert!(!relay.may_speak("xa-b", Role::Commune));
        assert!(!relay.may_speak("xa-c", Role::Chair));
        // The relay's own roll-call is not the parent's to replace.
        assert!(relay.roll_call_started());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diemcau_protocol::Level;

    fn info(site: &str) -> SiteInfo {
        let d = Directory::sample();
        d.site_info(site).unwrap_or(SiteInfo {
            id: site.into(),
            name: site.into(),
            level: Level::Commune,
            path: vec![],
            path_names: Vec::new(),
        })
    }

    #[test]
    fn hands_brought_back_after_a_restart_take_their_old_places() {
        let mut m = Meeting::default();
        // Back in another order than they went up; one raised afresh meanwhile.
        assert!(m.raise_at("b", 200));
        assert!(m.raise("fresh", 900));
        assert!(m.raise_at("c", 300));
        assert!(m.raise_at("a", 100));
        assert!(!m.raise_at("a", 50), "a hand already up keeps its place");
        let order: Vec<&str> = m.hands().iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(order, ["a", "b", "c", "fresh"]);
        assert_eq!(m.hands()[0].1, 100);
    }

    #[test]
    fn queue_keeps_raise_order_and_places() {
        let mut m = Meeting::default();
        assert!(m.raise("tp-vinh-le-loi", 10));
        assert!(m.raise("nam-dan-kim-lien", 20));
        assert!(m.raise("tp-vinh-ben-thuy", 30));
        assert!(
            !m.raise("tp-vinh-le-loi", 40),
            "a raised hand keeps its place"
        );
        let q = m.hands_for("nghe-an", Role::Chair, info);
        let order: Vec<_> = q.iter().map(|h| (h.site.as_str(), h.place)).collect();
        assert_eq!(
            order,
            [
                ("tp-vinh-le-loi", 1),
                ("nam-dan-kim-lien", 2),
                ("tp-vinh-ben-thuy", 3)
            ]
        );
        // A district sees its own communes with their place in the whole queue.
        let vinh = m.hands_for("tp-vinh", Role::District, info);
        let order: Vec<_> = vinh.iter().map(|h| (h.site.as_str(), h.place)).collect();
        assert_eq!(order, [("tp-vinh-le-loi", 1), ("tp-vinh-ben-thuy", 3)]);
        assert_eq!(
            vinh[0].path,
            vec!["nghe-an".to_string(), "tp-vinh".to_string()]
        );
        // A commune sees only itself.
        let own = m.hands_for("nam-dan-kim-lien", Role::Commune, info);
        assert_eq!(own.len(), 1);
        assert_eq!(own[0].place, 2);
        assert!(m.lower("tp-vinh-le-loi"));
        assert_eq!(m.hands_for("x", Role::Chair, info)[0].place, 1);
        assert!(m.lower_all());
        assert_eq!(m.hand_count(), 0);
    }

    #[test]
    fn floor_modes_decide_who_speaks() {
        let mut m = Meeting::default();
        assert!(m.may_speak("xa-a", Role::Commune));
        assert!(!m.may_speak("obs", Role::Observer));
        m.set_mode(FloorMode::ChairOnly);
        assert!(m.may_speak("nghe-an", Role::Chair));
        assert!(!m.may_speak("xa-a", Role::Commune));
        m.raise("xa-a", 1);
        m.grant("xa-a");
        assert!(m.may_speak("xa-a", Role::Commune));
        assert_eq!(m.hand_count(), 0, "granting lowers the hand");
        m.grant("xa-b");
        assert!(
            m.may_speak("xa-a", Role::Commune) && m.may_speak("xa-b", Role::Commune),
            "the chair and the granted sites speak"
        );
        assert!(!m.may_speak("xa-c", Role::Commune));
        m.revoke("xa-a");
        m.set_mode(FloorMode::Granted);
        m.grant("xa-a");
        assert!(m.may_speak("xa-a", Role::Commune) && m.may_speak("xa-b", Role::Commune));
        m.revoke("xa-b");
        assert!(!m.may_speak("xa-b", Role::Commune));
        m.mute("xa-a");
        assert!(
            !m.may_speak("xa-a", Role::Commune),
            "mute wins over a grant"
        );
        assert!(!m.unmute_reply("xa-a", true), "no unmuting oneself unasked");
        m.ask_unmute("xa-a");
        m.mute("xa-a");
        assert!(
            !m.unmute_reply("xa-a", true),
            "a new mute cancels the earlier request"
        );
        assert!(!m.may_speak("xa-a", Role::Commune));
        m.ask_unmute("xa-a");
        assert!(m.unmute_reply("xa-a", true));
        assert!(m.may_speak("xa-a", Role::Commune));
        m.mute("xa-a");
        m.forget("xa-a");
        assert!(
            !m.may_speak("xa-a", Role::Commune),
            "a mute survives leaving"
        );
        m.unmute("xa-a");
        m.grant("xa-a");
        m.set_mode(FloorMode::Open);
        m.mute_all(["xa-a", "xa-b"]);
        assert!(!m.may_speak("xa-b", Role::Commune));
        assert!(m.may_speak("nghe-an", Role::Chair));
        let f = m.floor_for("xa-b", Role::Commune);
        assert!(!f.you_may_speak);
        assert_eq!(f.muted, vec!["xa-a".to_string(), "xa-b".to_string()]);
    }

    #[test]
    fn roll_call_lists_every_directory_site_once() {
        let d = Directory::sample();
        let mut m = Meeting::default();
        m.roll_call_start(0, &BTreeSet::new());
        m.saw("do-luong"); // joined and dropped during the roll-call
        m.roll_call_mark("con-cuong", false, Some("mất điện".into()));
        m.roll_call_mark("tan-ky", true, None);
        let connected: BTreeSet<SiteId> = ["nghe-an".to_string(), "con-cuong".to_string()].into();
        let r = m.roll_call(&d, &connected);
        assert_eq!(r.len(), d.len());
        let ids: BTreeSet<_> = r.iter().map(|e| e.site.clone()).collect();
        assert_eq!(ids.len(), d.len());
        let get = |s: &str| r.iter().find(|e| e.site == s).unwrap();
        assert_eq!(get("nghe-an").status, RollStatus::Present);
        assert_eq!(get("con-cuong").status, RollStatus::Absent);
        assert_eq!(get("con-cuong").reason.as_deref(), Some("mất điện"));
        assert_eq!(get("tan-ky").status, RollStatus::Present);
        assert!(!get("tan-ky").connected);
        assert_eq!(get("quy-hop").status, RollStatus::Absent);
        assert_eq!(get("do-luong").status, RollStatus::Present, "seen counts");
        assert!(!get("do-luong").connected);
    }
}
