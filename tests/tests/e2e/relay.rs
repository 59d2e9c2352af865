//! District relays (`diemcau-server --upstream`): a province server, two district relays on
//! loopback, real sites under each. The uplink's bound, identity across levels, the floor
//! given to a commune behind one relay and verified behind the other, the hand queue across
//! relays, mute and roll-call through them.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use diemcau_client::control::ControlSession;
use diemcau_client::{ClientError, Room, RoomEvent};
use diemcau_e2e::{
    dev_server, dev_token, join_with, until_spotlight, until_verified, wait_for, MEDIA,
};
use diemcau_protocol::{
    ChairCommand, ErrorCode, FloorMode, LeaveReason, Role, RELAY_UP_AUDIO, RELAY_UP_VIDEO,
};
use diemcau_server::upstream::UpstreamConfig;
use diemcau_server::{RunningServer, ServerConfig};
use tokio::sync::mpsc;

const ROOM: &str = "hop-tinh";

/// A `--dev` relay for `district`, carrying ROOM to `parent`.
async fn relay(parent: &RunningServer, district: &str) -> RunningServer {
    relay_as(parent, district, Role::District).await
}

async fn relay_as(parent: &RunningServer, district: &str, role: Role) -> RunningServer {
    relay_with(parent, district, role, true).await
}

async fn relay_with(
    parent: &RunningServer,
    district: &str,
    role: Role,
    link_at_start: bool,
) -> RunningServer {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("literal");
    let mut cfg = ServerConfig::dev(addr);
    cfg.connect_timeout = Duration::from_secs(10);
    cfg.upstream = Some(UpstreamConfig {
        url: parent.url(),
        site: district.into(),
        token: Some(dev_token(district, role, ROOM)),
        room: ROOM.into(),
        link_at_start,
    });
    diemcau_server::start(cfg).await.expect("relay starts")
}

async fn site(
    server: &RunningServer,
    site: &str,
    role: Role,
) -> (Room, mpsc::UnboundedReceiver<RoomEvent>) {
    join_with(server, site, ROOM, Some(dev_token(site, role, ROOM))).await
}

/// Waits until `events` has announced every site in `want` (the welcome's list counts).
async fn until_seen(events: &mut mpsc::UnboundedReceiver<RoomEvent>, who: &str, want: &[&str]) {
    let mut seen: Vec<String> = Vec::new();
    wait_for(events, Duration::from_secs(20), who, |e| {
        match e {
            RoomEvent::Joined { sites, .. } => seen.extend(sites.iter().map(|s| s.id.clone())),
            RoomEvent::SiteJoined { site } => seen.push(site.id.clone()),
            _ => {}
        }
        want.iter()
            .all(|w| seen.iter().any(|s| s == w))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_district_relays_carry_their_communes_into_the_province_meeting() {
    diemcau_e2e::test_log();
    let _media = MEDIA.lock().await;
    let province = dev_server().await;
    let vinh = relay(&province, "tp-vinh").await;
    let dien_chau = relay(&province, "dien-chau").await;

    let (chair, mut chair_ev) = site(&province, "nghe-an", Role::Chair).await;
    // Under relay A: the district hall and three communes (four pictures, more than go up).
    let (_hall, _) = site(&vinh, "tp-vinh", Role::Chair).await;
    let (le_loi, mut le_loi_ev) = site(&vinh, "tp-vinh-le-loi", Role::Commune).await;
    let (hung_dung, _) = site(&vinh, "tp-vinh-hung-dung", Role::Commune).await;
    let (_quang_trung, _) = site(&vinh, "tp-vinh-quang-trung", Role::Commune).await;
    // Under relay B.
    let (dien_ky, mut dien_ky_ev) = site(&dien_chau, "dien-chau-dien-ky", Role::Commune).await;
    let (_dien_hong, _) = site(&dien_chau, "dien-chau-dien-hong", Role::Commune).await;

    // Identity across levels: every site under its own id, with its place in the tree.
    until_seen(
        &mut chair_ev,
        "the province sees the communes behind both relays",
        &["tp-vinh", "tp-vinh-le-loi", "dien-chau-dien-ky"],
    )
    .await;
    until_seen(
        &mut dien_ky_ev,
        "a commune under B sees the province and the communes under A",
        &["nghe-an", "tp-vinh-le-loi", "tp-vinh-hung-dung"],
    )
    .await;
    let r = dien_ky.report().await;
    assert_eq!(
        r.site_paths.get("tp-vinh-le-loi"),
        Some(&vec!["nghe-an".to_string(), "tp-vinh".to_string()]),
        "{:?}",
        r.site_paths
    );

    // The province chair gives the floor to a commune behind relay A.
    let mut console = ControlSession::connect(
        &province.url(),
        "nghe-an",
        ROOM,
        &dev_token("nghe-an", Role::Chair, ROOM),
    )
    .await
    .expect("the chair's console joins");
    console
        .command(ChairCommand::FloorMode {
            mode: FloorMode::ChairOnly,
        })
        .await
        .expect("floor mode");
    console
        .command(ChairCommand::Grant {
            site: "tp-vinh-le-loi".into(),
        })
        .await
        .expect("a commune behind a relay can be given the floor");
    // Heard and seen behind relay B and at the province.
    for (room, at) in [(&dien_ky, "under relay B"), (&chair, "at the province")] {
        until_verified(room, &["tp-vinh-le-loi"], Duration::from_secs(30)).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let r = room.report().await;
            let heard = r
                .received
                .iter()
                .find(|x| x.site == "tp-vinh-le-loi")
                .map_or(0, |x| x.audio_frames_verified);
            if heard >= 50 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the commune with the floor is not heard {at}: {heard} verified sound frames"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Its own view, through relay A, says it may speak.
    wait_for(
        &mut le_loi_ev,
        Duration::from_secs(10),
        "the floor shown behind relay A",
        |e| match e {
            RoomEvent::Floor { state } if state.you_may_speak => Some(()),
            _ => None,
        },
    )
    .await;

    // The uplink never carried more than the bound, counted at the province.
    let (v, a) = (
        province.stats.relay_up_video_max.load(Ordering::Relaxed),
        province.stats.relay_up_audio_max.load(Ordering::Relaxed),
    );
    assert!(
        v as usize <= RELAY_UP_VIDEO && a as usize <= RELAY_UP_AUDIO,
        "an uplink carried {v} pictures and {a} sounds at once"
    );
    assert_eq!(
        v as usize, RELAY_UP_VIDEO,
        "relay A has four pictures: two go up"
    );

    // Hands across relays: A's commune first, then B's, in the province's queue.
    hung_dung.raise_hand();
    wait_for(
        &mut chair_ev,
        Duration::from_secs(10),
        "the first hand",
        |e| matches!(e, RoomEvent::Hands { total: 1, .. }).then_some(()),
    )
    .await;
    dien_ky.raise_hand();
    let queue = wait_for(
        &mut chair_ev,
        Duration::from_secs(10),
        "two hands",
        |e| match e {
            RoomEvent::Hands { queue, total: 2 } => Some(queue.clone()),
            _ => None,
        },
    )
    .await;
    let order: Vec<(&str, u32)> = queue.iter().map(|h| (h.site.as_str(), h.place)).collect();
    assert_eq!(
        order,
        [("tp-vinh-hung-dung", 1), ("dien-chau-dien-ky", 2)],
        "the province's queue"
    );
    assert_eq!(queue[1].path, ["nghe-an", "dien-chau"]);
    // The commune under B sees its own place through its relay.
    wait_for(
        &mut dien_ky_ev,
        Duration::from_secs(10),
        "its place",
        |e| match e {
            RoomEvent::Hands { queue, total: 2 } => queue
                .iter()
                .any(|h| h.site == "dien-chau-dien-ky" && h.place == 2)
                .then_some(()),
            _ => None,
        },
    )
    .await;

    // Mute through relay A: the commune is told, and the province stops forwarding it.
    console
        .command(ChairCommand::Mute {
            site: "tp-vinh-le-loi".into(),
        })
        .await
        .expect("a site behind a relay can be muted");
    wait_for(
        &mut le_loi_ev,
        Duration::from_secs(10),
        "muted",
        |e| match e {
            RoomEvent::Floor { state } if !state.you_may_speak => Some(()),
            _ => None,
        },
    )
    .await;
    // Spotlight on a commune behind relay B, as seen behind relay A.
    console
        .command(ChairCommand::Spotlight {
            site: Some("dien-chau-dien-ky".into()),
        })
        .await
        .expect("a site behind a relay can be spotlighted");
    until_spotlight(&mut le_loi_ev, "dien-chau-dien-ky").await;
    // Roll-call: the sites behind relays are there.
    console
        .command(ChairCommand::RollCallStart)
        .await
        .expect("roll-call");
    let csv = console
        .command(ChairCommand::RollCallExport)
        .await
        .expect("roll-call export")
        .expect("the export answers with a CSV");
    for s in ["tp-vinh-le-loi", "dien-chau-dien-ky", "tp-vinh"] {
        let line = csv
            .lines()
            .find(|l| l.starts_with(&format!("{s},")))
            .unwrap_or_else(|| panic!("{s} not in the roll-call:\n{csv}"));
        assert!(line.contains("present"), "{line}");
    }
    // Leaving the relay is leaving the province's meeting: the grant goes with it.
    le_loi.leave().await;
    let reason = wait_for(
        &mut chair_ev,
        Duration::from_secs(10),
        "the commune gone",
        |e| match e {
            RoomEvent::SiteLeft { site, reason } if site == "tp-vinh-le-loi" => Some(*reason),
            _ => None,
        },
    )
    .await;
    assert_eq!(reason, LeaveReason::Left);
    let floor = wait_for(
        &mut chair_ev,
        Duration::from_secs(10),
        "the floor after",
        |e| match e {
            RoomEvent::Floor { state } => Some(state.clone()),
            _ => None,
        },
    )
    .await;
    assert!(
        !floor.granted.iter().any(|s| s == "tp-vinh-le-loi"),
        "a site that left gives up its grant: {floor:?}"
    );
    console.leave();
    for r in [chair, hung_dung, dien_ky] {
        r.leave().await;
    }
    dien_chau.stop();
    vinh.stop();
    province.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_of_a_relay_carries_a_ward_three_levels_up_and_back() {
    diemcau_e2e::test_log();
    let _media = MEDIA.lock().await;
    let province = dev_server().await;
    let district = relay(&province, "tp-vinh").await;
    // A ward's own node under the district's: relays of relays.
    let ward = relay_as(&district, "tp-vinh-le-loi", Role::Chair).await;
    let (chair, mut chair_ev) = site(&province, "nghe-an", Role::Chair).await;
    let (hall, mut hall_ev) = site(&ward, "tp-vinh-le-loi", Role::Chair).await;
    until_seen(
        &mut chair_ev,
        "the ward seen at the province",
        &["tp-vinh-le-loi"],
    )
    .await;
    until_seen(&mut hall_ev, "the province seen in the ward", &["nghe-an"]).await;
    until_verified(&chair, &["tp-vinh-le-loi"], Duration::from_secs(30)).await;
    until_verified(&hall, &["nghe-an"], Duration::from_secs(30)).await;
    let r = chair.report().await;
    assert_eq!(
        r.site_paths.get("tp-vinh-le-loi"),
        Some(&vec!["nghe-an".to_string(), "tp-vinh".to_string()])
    );
    // Its hand reaches the province's queue through both relays.
    hall.raise_hand();
    let queue = wait_for(
        &mut chair_ev,
        Duration::from_secs(10),
        "the ward's hand",
        |e| match e {
            RoomEvent::Hands { queue, total: 1 } => Some(queue.clone()),
            _ => None,
        },
    )
    .await;
    assert_eq!(queue[0].site, "tp-vinh-le-loi");
    // Each relay counts its link's coming up once.
    assert_eq!(district.stats.uplinks.load(Ordering::Relaxed), 1);
    assert_eq!(ward.stats.uplinks.load(Ordering::Relaxed), 1);
    for r in [chair, hall] {
        r.leave().await;
    }
    ward.stop();
    district.stop();
    province.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_district_meets_alone_then_its_chair_joins_it_to_the_province_and_takes_it_out() {
    diemcau_e2e::test_log();
    let _media = MEDIA.lock().await;
    let province = dev_server().await;
    let district = relay_with(&province, "tp-vinh", Role::District, false).await;
    let (chair, mut chair_ev) = site(&province, "nghe-an", Role::Chair).await;
    let (hall, _) = site(&district, "tp-vinh", Role::Chair).await;
    let (ward, mut ward_ev) = site(&district, "tp-vinh-le-loi", Role::Commune).await;
    // The district's own meeting, run by its chair.
    until_verified(&ward, &["tp-vinh"], Duration::from_secs(20)).await;
    hall.chair(ChairCommand::FloorMode {
        mode: FloorMode::ChairOnly,
    })
    .await
    .expect("the district chair runs the district-only meeting");
    assert_eq!(district.stats.uplinks.load(Ordering::Relaxed), 0);
    assert!(
        !chair
            .report()
            .await
            .sites_seen
            .iter()
            .any(|s| s.starts_with("tp-vinh")),
        "the province sees nothing of a district meeting alone"
    );

    // Joined to the province's meeting by its chair.
    hall.chair(ChairCommand::Upstream { on: true })
        .await
        .expect("the district chair joins the meeting to the province's");
    // Linked, and now the province chair runs it: the province's floor (open) is what the
    // ward sees (in either order).
    let (mut linked, mut open) = (false, false);
    wait_for(
        &mut ward_ev,
        Duration::from_secs(10),
        "linked, and the province's floor",
        |e| {
            match e {
                RoomEvent::Upstream {
                    connected: true, ..
                } => linked = true,
                RoomEvent::Floor { state } => open = state.mode == FloorMode::Open,
                _ => {}
            }
            (linked && open).then_some(())
        },
    )
    .await;
    until_verified(
        &chair,
        &["tp-vinh-le-loi", "tp-vinh"],
        Duration::from_secs(30),
    )
    .await;
    until_verified(&ward, &["nghe-an"], Duration::from_secs(30)).await;
    match hall.chair(ChairCommand::LowerAll).await {
        Err(ClientError::Refused {
            code: ErrorCode::Forbidden,
            ..
        }) => {}
        other => panic!("a district chair's command in the province's meeting: {other:?}"),
    }

    // Taken out again: the province sees the district's sites leave; the district goes on.
    hall.chair(ChairCommand::Upstream { on: false })
        .await
        .expect("the district chair takes the meeting out");
    wait_for(
        &mut chair_ev,
        Duration::from_secs(10),
        "the ward gone",
        |e| match e {
            RoomEvent::SiteLeft { site, reason } if site == "tp-vinh-le-loi" => {
                assert_eq!(*reason, LeaveReason::Left);
                Some(())
            }
            _ => None,
        },
    )
    .await;
    // Told so, and its own floor mode is back (in either order).
    let (mut told, mut own) = (false, false);
    wait_for(
        &mut ward_ev,
        Duration::from_secs(10),
        "told, and the district's floor",
        |e| {
            match e {
                RoomEvent::Upstream {
                    connected: false,
                    chosen,
                } => told = *chosen,
                RoomEvent::Floor { state } => own = state.mode == FloorMode::ChairOnly,
                _ => {}
            }
            (told && own).then_some(())
        },
    )
    .await;
    let before = ward.report().await;
    let seen = |r: &diemcau_client::Report| {
        r.received
            .iter()
            .find(|x| x.site == "tp-vinh")
            .map_or(0, |x| x.video_frames_verified)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen(&ward.report().await) <= seen(&before) + 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the district meeting goes on after it was taken out"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for r in [chair, hall, ward] {
        r.leave().await;
    }
    district.stop();
    province.stop();
}

/// What a relay's connection may not do, and what only it may do.
#[tokio::test]
async fn relay_messages_need_a_relay_connection_and_a_relay_gives_no_chair_commands() {
    use diemcau_e2e::raw::Raw;
    use diemcau_protocol::{ClientMessage, ServerMessage};
    let province = dev_server().await;
    // A site that did not join as a relay cannot speak for others.
    let mut site = Raw::connect(&province.url()).await;
    site.join_as("tp-vinh-le-loi", ROOM, None, false, false)
        .await;
    site.send(&ClientMessage::RelayHand {
        site: "nghe-an".into(),
        up: true,
    })
    .await;
    assert_eq!(site.error("forbidden").await, (ErrorCode::Forbidden, false));
    // A relay joined with a chair token is still no chair.
    let mut relay = Raw::connect(&province.url()).await;
    let welcome = relay
        .join_relay("tp-vinh", ROOM, &dev_token("tp-vinh", Role::Chair, ROOM))
        .await;
    assert!(
        matches!(welcome, ServerMessage::Welcome { .. }),
        "{welcome:?}"
    );
    relay
        .send(&ClientMessage::Chair {
            id: 1,
            command: ChairCommand::Lock { locked: true },
        })
        .await;
    let code = relay
        .wait("the answer", |m| match m {
            ServerMessage::Error {
                code, id: Some(1), ..
            } => Some(*code),
            ServerMessage::Ack { id: 1 } => Some(ErrorCode::Internal),
            _ => None,
        })
        .await;
    assert_eq!(code, ErrorCode::Forbidden);
    // A relay with a commune's token is refused.
    let mut commune = Raw::connect(&province.url()).await;
    let refused = commune
        .join_relay(
            "tp-vinh-le-loi",
            ROOM,
            &dev_token("tp-vinh-le-loi", Role::Commune, ROOM),
        )
        .await;
    assert!(
        matches!(
            refused,
            ServerMessage::Error {
                code: ErrorCode::Forbidden,
                fatal: true,
                ..
            }
        ),
        "{refused:?}"
    );
    province.stop();
}
