//! Meeting control, enforced by the server: tokens and roles, the hand queue, floor modes
//! (audio counted at the receivers), chair commands, roll-call, the audit log.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use diemcau_client::control::ControlSession;
use diemcau_client::{ClientError, JoinOptions, Room, RoomEvent};
use diemcau_e2e::raw::Raw;
use diemcau_e2e::{dev_token, until_verified, wait_for, MEDIA};
use diemcau_protocol::token::{Claims, Key};
use diemcau_protocol::{
    ChairCommand, ClientMessage, Directory, ErrorCode, FloorMode, LeaveReason, Role, ServerMessage,
    SiteEntry, PROTOCOL_VERSION,
};
use diemcau_server::{audit, RunningServer, ServerConfig};

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diemcau-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    p
}

async fn server_with(
    dev: bool,
    key: Option<Key>,
    directory: Directory,
    audit_log: Option<PathBuf>,
) -> RunningServer {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("literal");
    let mut cfg = ServerConfig::dev(addr);
    cfg.dev = dev;
    cfg.key = key;
    cfg.directory = Arc::new(directory);
    cfg.audit_log = audit_log;
    cfg.connect_timeout = Duration::from_secs(60);
    diemcau_server::start(cfg).await.expect("server starts")
}

fn every_chair_command() -> Vec<ChairCommand> {
    let s = || "tp-vinh-le-loi".to_string();
    vec![
        ChairCommand::FloorMode {
            mode: FloorMode::ChairOnly,
        },
        ChairCommand::Grant { site: s() },
        ChairCommand::Revoke { site: s() },
        ChairCommand::Mute { site: s() },
        ChairCommand::MuteAll,
        ChairCommand::AskUnmute { site: s() },
        ChairCommand::Remove { site: s() },
        ChairCommand::Spotlight { site: Some(s()) },
        ChairCommand::Lock { locked: true },
        ChairCommand::LowerHand { site: s() },
        ChairCommand::LowerAll,
        ChairCommand::RollCallStart,
        ChairCommand::RollCallMark {
            site: s(),
            present: false,
            reason: None,
        },
        ChairCommand::RollCallExport,
    ]
}

#[tokio::test]
async fn every_chair_command_is_refused_for_other_roles_and_logged() {
    let log = temp_path("refusals.jsonl");
    let server = server_with(true, None, Directory::sample(), Some(log.clone())).await;
    let room = "quyen";
    let commands = every_chair_command();
    for (site, role) in [
        ("tp-vinh-le-loi", Role::Commune),
        ("tp-vinh", Role::District),
        ("do-luong", Role::Observer),
    ] {
        let mut s =
            ControlSession::connect(&server.url(), site, room, &dev_token(site, role, room))
                .await
                .expect("a control session may join with any role");
        for c in &commands {
            match s.command(c.clone()).await {
                Err(ClientError::Refused {
                    code: ErrorCode::Forbidden,
                    ..
                }) => {}
                other => panic!("{role:?} {} was not refused: {other:?}", c.name()),
            }
        }
        s.leave();
    }
    // The chair may.
    let _chair = chair_locks(&server.url(), room).await;
    let entries = audit::read(&log).unwrap();
    for (site, role) in [
        ("tp-vinh-le-loi", "commune"),
        ("tp-vinh", "district"),
        ("do-luong", "observer"),
    ] {
        for c in &commands {
            assert!(
                entries.iter().any(|e| e.actor == site
                    && e.role.as_deref() == Some(role)
                    && e.action == c.name()
                    && e.outcome == "refused"
                    && e.from.starts_with("127.0.0.1:")),
                "no refusal logged for {site} {}",
                c.name()
            );
        }
    }
    assert!(entries
        .iter()
        .any(|e| e.actor == "nghe-an" && e.action == "lock" && e.outcome == "ok"));
    server.stop();
}

#[tokio::test]
async fn forged_expired_wrong_room_and_unknown_site_tokens_are_refused() {
    let key = Key::new(b"production key of the province!!");
    let log = temp_path("tokens.jsonl");
    let mut entries: Vec<SiteEntry> = Directory::sample().iter().cloned().collect();
    entries
        .iter_mut()
        .find(|e| e.id == "tp-vinh-le-loi")
        .unwrap()
        .secret = Some("khoa-le-loi".into());
    let dir = Directory::from_entries(entries).unwrap();
    let server = server_with(false, Some(key.clone()), dir, Some(log.clone())).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |site: &str, room: &str, exp: u64| Claims {
        site: site.into(),
        role: Role::Commune,
        room: room.into(),
        iat: now - 10,
        exp,
    };
    let cases: Vec<(&str, Option<String>, ErrorCode)> = vec![
        ("no token", None, ErrorCode::Unauthenticated),
        (
            "forged",
            Some(Key::new(b"someone else's key").sign(&claims("tp-vinh", "r", now + 60))),
            ErrorCode::TokenInvalid,
        ),
        (
            "dev key on production",
            Some(dev_token("tp-vinh", Role::Chair, "r")),
            ErrorCode::TokenInvalid,
        ),
        (
            "expired",
            Some(key.sign(&claims("tp-vinh", "r", now - 1))),
            ErrorCode::TokenExpired,
        ),
        (
            "wrong room",
            Some(key.sign(&claims("tp-vinh", "other", now + 60))),
            ErrorCode::TokenWrongRoom,
        ),
        (
            "unknown site",
            Some(key.sign(&claims("xa-khong-co", "r", now + 60))),
            ErrorCode::UnknownSite,
        ),
        (
            "garbage",
            Some("dc1.not.a-token".into()),
            ErrorCode::TokenInvalid,
        ),
    ];
    for (what, token, want) in cases {
        let site = if what == "unknown site" {
            "xa-khong-co"
        } else {
            "tp-vinh"
        };
        let mut c = Raw::connect(&server.url()).await;
        match c.join(site, "r", token.as_deref(), false).await {
            ServerMessage::Error {
                code, fatal: true, ..
            } => assert_eq!(code, want, "{what}"),
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
        assert!(
            c.next().await.is_none(),
            "{what}: connection closed after the refusal"
        );
    }
    // A valid token joins, with its role.
    let mut ok = Raw::connect(&server.url()).await;
    let good = key.sign(&Claims {
        role: Role::District,
        ..claims("tp-vinh", "r", now + 60)
    });
    match ok.join("tp-vinh", "r", Some(&good), false).await {
        ServerMessage::Welcome { role, .. } => assert_eq!(role, Role::District),
        other => panic!("valid token refused: {other:?}"),
    }
    // Enrollment: a wrong secret is refused; the right one yields a commune token.
    let mut e = Raw::connect(&server.url()).await;
    e.send(&ClientMessage::Enroll {
        v: PROTOCOL_VERSION,
        room: "r".into(),
        site: "tp-vinh-le-loi".into(),
        secret: "sai".into(),
    })
    .await;
    assert!(matches!(
        e.next().await,
        Some(ServerMessage::Error {
            code: ErrorCode::Unauthenticated,
            ..
        })
    ));
    let mut e = Raw::connect(&server.url()).await;
    e.send(&ClientMessage::Enroll {
        v: PROTOCOL_VERSION,
        room: "r".into(),
        site: "tp-vinh-le-loi".into(),
        secret: "khoa-le-loi".into(),
    })
    .await;
    let token = e
        .wait("enrolled", |m| match m {
            ServerMessage::Enrolled { token, .. } => Some(token.clone()),
            _ => None,
        })
        .await;
    match e.join("tp-vinh-le-loi", "r", Some(&token), false).await {
        ServerMessage::Welcome { role, .. } => assert_eq!(role, Role::Commune),
        other => panic!("enrolled token refused: {other:?}"),
    }
    let refused = audit::read(&log)
        .unwrap()
        .into_iter()
        .filter(|e| e.outcome == "refused")
        .count();
    assert!(
        refused >= 8,
        "every refusal is in the audit log ({refused})"
    );
    server.stop();
}

/// The province's chair on a raw connection (a control session or a site in the roster).
async fn chair_connection(server: &RunningServer, room: &str, control: bool) -> Raw {
    let mut chair = Raw::connect(&server.url()).await;
    let token = dev_token("nghe-an", Role::Chair, room);
    let answer = chair.join("nghe-an", room, Some(&token), control).await;
    assert!(matches!(
        answer,
        ServerMessage::Welcome {
            role: Role::Chair,
            ..
        }
    ));
    chair
}

/// The chair's current view of the queue (site ids in order), from a raw chair connection.
async fn chair_queue(chair: &mut Raw, total: u32) -> Vec<String> {
    chair
        .wait("hands", |m| match m {
            ServerMessage::Hands { queue, total: t } if *t == total => {
                Some(queue.iter().map(|h| h.site.clone()).collect())
            }
            _ => None,
        })
        .await
}

#[tokio::test]
async fn the_hand_queue_keeps_raise_order_across_reconnects() {
    let server = server_with(true, None, Directory::sample(), None).await;
    let room = "tay";
    let mut chair = chair_connection(&server, room, true).await;
    let sites = ["tp-vinh-le-loi", "nam-dan-kim-lien", "tp-vinh-ben-thuy"];
    let mut conns = Vec::new();
    for (i, s) in sites.iter().enumerate() {
        let mut c = Raw::connect(&server.url()).await;
        assert!(matches!(
            c.join(s, room, None, false).await,
            ServerMessage::Welcome { .. }
        ));
        c.send(&ClientMessage::RaiseHand { raised_at_ms: None })
            .await;
        // Wait until the chair sees this hand before the next goes up.
        assert_eq!(
            chair_queue(&mut chair, i as u32 + 1).await,
            sites[..=i].to_vec()
        );
        conns.push(c);
    }
    // The second site drops without a word and comes back: its hand keeps its place.
    let dropped = conns.remove(1);
    drop(dropped);
    chair
        .wait("the drop", |m| {
            matches!(m, ServerMessage::Hands { .. }).then_some(())
        })
        .await;
    let mut back = Raw::connect(&server.url()).await;
    assert!(matches!(
        back.join(sites[1], room, None, false).await,
        ServerMessage::Welcome { .. }
    ));
    back.send(&ClientMessage::RaiseHand { raised_at_ms: None })
        .await;
    let place = back
        .wait("own hand", |m| match m {
            ServerMessage::Hands { queue, .. } => {
                queue.iter().find(|h| h.site == sites[1]).map(|h| h.place)
            }
            _ => None,
        })
        .await;
    assert_eq!(place, 2, "the rejoined site is still second");
    // A site that leaves on purpose lowers its hand.
    conns[0].send(&ClientMessage::Leave).await;
    assert_eq!(
        chair_queue(&mut chair, 2).await,
        vec![sites[1].to_string(), sites[2].to_string()]
    );
    // The chair lowers one, then all.
    chair
        .send(&ClientMessage::Chair {
            id: 1,
            command: ChairCommand::LowerHand {
                site: sites[2].into(),
            },
        })
        .await;
    assert_eq!(chair_queue(&mut chair, 1).await, vec![sites[1].to_string()]);
    chair
        .send(&ClientMessage::Chair {
            id: 2,
            command: ChairCommand::LowerAll,
        })
        .await;
    assert!(chair_queue(&mut chair, 0).await.is_empty());
    server.stop();
}

/// A count from what `r` received from `site` (0 when nothing was).
type Count = fn(&diemcau_client::Report, &str) -> u64;

fn received<'a>(
    r: &'a diemcau_client::Report,
    site: &str,
) -> Option<&'a diemcau_client::report::Received> {
    r.received.iter().find(|x| x.site == site)
}

fn audio_from(r: &diemcau_client::Report, site: &str) -> u64 {
    received(r, site).map_or(0, |x| x.audio_frames)
}

fn video_from(r: &diemcau_client::Report, site: &str) -> u64 {
    received(r, site).map_or(0, |x| x.video_frames)
}

fn verified_from(r: &diemcau_client::Report, site: &str) -> u64 {
    received(r, site).map_or(0, |x| x.video_frames_verified)
}

/// Waits until the audio counted from `site` stops changing (in-flight frames landed).
async fn settle(room: &Room, site: &str) {
    settle_by(room, site, audio_from, "audio").await
}

/// Waits until `count` from `site` stops changing.
async fn settle_by(room: &Room, site: &str, count: Count, what: &str) {
    let mut last = count(&room.report().await, site);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = count(&room.report().await, site);
        if now == last {
            return;
        }
        last = now;
    }
    panic!("{what} from {site} never stopped arriving");
}

/// Waits until `count` from `site` reaches `at_least`; panics after `timeout` with `what`.
async fn until_count(
    room: &Room,
    site: &str,
    count: Count,
    at_least: u64,
    timeout: Duration,
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let r = room.report().await;
        if count(&r, site) >= at_least {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for this site's floor to say whether it may speak.
async fn floor_says(events: &mut tokio::sync::mpsc::UnboundedReceiver<RoomEvent>, may: bool) {
    wait_for(events, Duration::from_secs(5), "floor state", |e| match e {
        RoomEvent::Floor { state } if state.you_may_speak == may => Some(()),
        _ => None,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chair_only_mode_stops_a_communes_audio_at_the_server_until_granted() {
    let _guard = MEDIA.lock().await;
    let server = server_with(true, None, Directory::sample(), None).await;
    let room = "san-khau";
    let url = server.url();
    let join = |site: &str, token: Option<String>| {
        let mut o = JoinOptions::synthetic(site, room);
        o.video = diemcau_client::VideoInput::Synthetic {
            width: 320,
            height: 180,
            fps: 10,
        };
        o.token = token;
        Room::connect(&url, o)
    };
    let (chair, _ce) = join("nghe-an", Some(dev_token("nghe-an", Role::Chair, room)))
        .await
        .unwrap();
    let (x, mut xe) = join("tp-vinh-le-loi", None).await.unwrap();
    let (y, _ye) = join("tan-ky", None).await.unwrap();
    until_verified(&y, &["tp-vinh-le-loi"], Duration::from_secs(15)).await;
    until_verified(&chair, &["tp-vinh-le-loi"], Duration::from_secs(15)).await;

    chair
        .chair(ChairCommand::FloorMode {
            mode: FloorMode::ChairOnly,
        })
        .await
        .unwrap();
    floor_says(&mut xe, false).await;
    // Frames already in flight land, and the receivers' queues drain.
    settle(&y, "tp-vinh-le-loi").await;
    settle(&chair, "tp-vinh-le-loi").await;
    let (y0, c0, x0) = (y.report().await, chair.report().await, x.report().await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (y1, c1, x1) = (y.report().await, chair.report().await, x.report().await);
    assert!(
        x1.sent.audio_frames - x0.sent.audio_frames > 100,
        "the commune keeps sending"
    );
    assert_eq!(
        audio_from(&y1, "tp-vinh-le-loi"),
        audio_from(&y0, "tp-vinh-le-loi"),
        "another commune hears nothing"
    );
    assert_eq!(
        audio_from(&c1, "tp-vinh-le-loi"),
        audio_from(&c0, "tp-vinh-le-loi"),
        "the chair hears nothing"
    );
    assert!(
        audio_from(&c1, "tan-ky") == audio_from(&c0, "tan-ky"),
        "tan-ky is blocked too"
    );

    chair
        .chair(ChairCommand::Grant {
            site: "tp-vinh-le-loi".into(),
        })
        .await
        .unwrap();
    floor_says(&mut xe, true).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (y2, c2) = (y.report().await, chair.report().await);
    assert!(
        audio_from(&y2, "tp-vinh-le-loi") - audio_from(&y1, "tp-vinh-le-loi") > 50,
        "granted: heard"
    );
    assert!(audio_from(&c2, "tp-vinh-le-loi") - audio_from(&c1, "tp-vinh-le-loi") > 50);

    chair
        .chair(ChairCommand::Revoke {
            site: "tp-vinh-le-loi".into(),
        })
        .await
        .unwrap();
    floor_says(&mut xe, false).await;
    settle(&y, "tp-vinh-le-loi").await;
    let y3 = y.report().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let y4 = y.report().await;
    assert_eq!(
        audio_from(&y4, "tp-vinh-le-loi"),
        audio_from(&y3, "tp-vinh-le-loi"),
        "revoked: silent again"
    );
    // Video was never blocked.
    assert!(
        y4.received
            .iter()
            .find(|r| r.site == "tp-vinh-le-loi")
            .unwrap()
            .video_frames_verified
            > 50
    );
    for r in [chair, x, y] {
        r.leave().await;
    }
    server.stop();
}

#[tokio::test]
async fn chair_commands_reach_their_sites() {
    let server = server_with(true, None, Directory::sample(), None).await;
    let room = "lenh";
    let mut chair = chair_connection(&server, room, false).await;
    let mut a = Raw::connect(&server.url()).await;
    a.join("tp-vinh", room, None, false).await;
    let mut b = Raw::connect(&server.url()).await;
    b.join("tan-ky", room, None, false).await;
    let send = |id: u64, command: ChairCommand| ClientMessage::Chair { id, command };

    // Mute, then ask to unmute: the site confirms and may speak again.
    chair
        .send(&send(
            1,
            ChairCommand::Mute {
                site: "tp-vinh".into(),
            },
        ))
        .await;
    a.wait("muted", |m| {
        matches!(m, ServerMessage::Floor { state } if !state.you_may_speak).then_some(())
    })
    .await;
    chair
        .send(&send(
            2,
            ChairCommand::AskUnmute {
                site: "tp-vinh".into(),
            },
        ))
        .await;
    a.wait("ask_unmute", |m| {
        matches!(m, ServerMessage::AskUnmute { by } if by == "nghe-an").then_some(())
    })
    .await;
    a.send(&ClientMessage::UnmuteReply { accept: true }).await;
    a.wait("unmuted", |m| {
        matches!(m, ServerMessage::Floor { state } if state.you_may_speak).then_some(())
    })
    .await;

    // Spotlight reaches everyone's floor state.
    chair
        .send(&send(
            3,
            ChairCommand::Spotlight {
                site: Some("tan-ky".into()),
            },
        ))
        .await;
    a.wait("spotlight", |m| {
        matches!(m, ServerMessage::Floor { state } if state.spotlight.as_deref() == Some("tan-ky"))
            .then_some(())
    })
    .await;

    // Commands about a site that is not here are refused with a reason.
    chair
        .send(&send(
            4,
            ChairCommand::Grant {
                site: "quy-hop".into(),
            },
        ))
        .await;
    chair
        .wait("refusal", |m| {
            matches!(
                m,
                ServerMessage::Error {
                    id: Some(4),
                    code: ErrorCode::NotInRoom,
                    ..
                }
            )
            .then_some(())
        })
        .await;

    // Lock: a new commune cannot join; the chair could.
    chair
        .send(&send(5, ChairCommand::Lock { locked: true }))
        .await;
    chair
        .wait("ack", |m| {
            matches!(m, ServerMessage::Ack { id: 5 }).then_some(())
        })
        .await;
    let mut late = Raw::connect(&server.url()).await;
    assert!(matches!(
        late.join("do-luong", room, None, false).await,
        ServerMessage::Error {
            code: ErrorCode::RoomLocked,
            ..
        }
    ));

    // Remove: the site is told and dropped; the others see it leave.
    chair
        .send(&send(
            6,
            ChairCommand::Remove {
                site: "tan-ky".into(),
            },
        ))
        .await;
    b.wait("removed", |m| {
        matches!(
            m,
            ServerMessage::Error {
                code: ErrorCode::Removed,
                fatal: true,
                ..
            }
        )
        .then_some(())
    })
    .await;
    assert!(b.next().await.is_none());
    a.wait("tan-ky left", |m| {
        matches!(m, ServerMessage::SiteLeft { site, .. } if site == "tan-ky").then_some(())
    })
    .await;
    server.stop();
}

#[tokio::test]
async fn the_audit_log_survives_a_restart() {
    let log = temp_path("restart.jsonl");
    let room = "nhat-ky";
    let token = dev_token("nghe-an", Role::Chair, room);
    let first = server_with(true, None, Directory::sample(), Some(log.clone())).await;
    let mut c = ControlSession::connect(&first.url(), "nghe-an", room, &token)
        .await
        .unwrap();
    c.command(ChairCommand::FloorMode {
        mode: FloorMode::Granted,
    })
    .await
    .unwrap();
    c.leave();
    first.stop();
    let before = audit::read(&log).unwrap();
    assert!(before.iter().any(|e| e.action == "floor-mode"));

    let second = server_with(true, None, Directory::sample(), Some(log.clone())).await;
    let mut c = ControlSession::connect(&second.url(), "nghe-an", room, &token)
        .await
        .unwrap();
    c.command(ChairCommand::LowerAll).await.unwrap();
    let after = audit::read(&log).unwrap();
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "old entries kept, in order"
    );
    assert!(after[before.len()..]
        .iter()
        .any(|e| e.action == "lower-all" && e.outcome == "ok"));
    second.stop();
}

/// The app's mute and camera buttons: the site stops sending that kind (the others receive
/// none of it while the other kind keeps flowing), and both come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mute_and_camera_off_stop_what_the_others_receive_until_turned_back_on() {
    let _guard = MEDIA.lock().await;
    let server = server_with(true, None, Directory::sample(), None).await;
    let (a, _ae) = diemcau_e2e::join(&server, "xa-tat-tieng", "phong-tat").await;
    let (b, _be) = diemcau_e2e::join(&server, "xa-nghe", "phong-tat").await;
    until_verified(&b, &["xa-tat-tieng"], Duration::from_secs(15)).await;
    // The tone is loud enough to light the speaking indicator.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !b
        .speaking(Duration::from_millis(400), -45.0)
        .contains(&"xa-tat-tieng".to_string())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never seen speaking"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        a.mic_level_dbfs() > -45.0,
        "mic level {}",
        a.mic_level_dbfs()
    );

    a.set_mic_muted(true);
    settle(&b, "xa-tat-tieng").await;
    let r0 = b.report().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r1 = b.report().await;
    assert_eq!(
        audio_from(&r1, "xa-tat-tieng"),
        audio_from(&r0, "xa-tat-tieng")
    );
    assert!(video_from(&r1, "xa-tat-tieng") - video_from(&r0, "xa-tat-tieng") > 15);
    assert!(
        !b.speaking(Duration::from_millis(400), -45.0)
            .contains(&"xa-tat-tieng".to_string()),
        "a muted site is not speaking"
    );
    // The level meter keeps working while muted (people check their mic before unmuting).
    assert!(a.mic_level_dbfs() > -45.0);

    a.set_mic_muted(false);
    a.set_camera_off(true);
    let site = "xa-tat-tieng";
    let back = audio_from(&r1, site) + 50;
    until_count(
        &b,
        site,
        audio_from,
        back,
        Duration::from_secs(5),
        "sound did not come back",
    )
    .await;
    // Pictures already on their way land, then none.
    settle_by(&b, site, video_from, "pictures").await;
    let r2 = b.report().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r3 = b.report().await;
    assert_eq!(
        video_from(&r3, "xa-tat-tieng"),
        video_from(&r2, "xa-tat-tieng")
    );
    assert!(audio_from(&r3, "xa-tat-tieng") - audio_from(&r2, "xa-tat-tieng") > 50);

    // Camera back on: a fresh keyframe, so the pictures verify again at once.
    a.set_camera_off(false);
    let again = verified_from(&r3, site) + 15;
    until_count(
        &b,
        site,
        verified_from,
        again,
        Duration::from_secs(5),
        "pictures did not come back",
    )
    .await;
    a.leave().await;
    b.leave().await;
    server.stop();
}

/// The province chair (nghe-an) locks `room` from a control session, kept open.
async fn chair_locks(url: &str, room: &str) -> ControlSession {
    let mut chair = ControlSession::connect(
        url,
        "nghe-an",
        room,
        &dev_token("nghe-an", Role::Chair, room),
    )
    .await
    .unwrap();
    chair
        .command(ChairCommand::Lock { locked: true })
        .await
        .expect("the chair may lock");
    chair
}

/// Waits for the next `site_left` of tp-vinh and returns its reason.
async fn tp_vinh_left(watcher: &mut Raw) -> LeaveReason {
    watcher
        .wait("tp-vinh gone", |m| match m {
            ServerMessage::SiteLeft { site, reason } if site == "tp-vinh" => Some(*reason),
            _ => None,
        })
        .await
}

#[tokio::test]
async fn resume_replaces_a_held_connection_and_re_enters_a_locked_room_only_for_its_own_site() {
    let server = diemcau_e2e::dev_server().await;
    let room = "resume";
    let token = |site: &str| dev_token(site, Role::Commune, room);
    let welcome = |m: &ServerMessage| matches!(m, ServerMessage::Welcome { .. });
    let refused = |m: &ServerMessage, want: ErrorCode| matches!(m, ServerMessage::Error { code, fatal: true, .. } if *code == want);
    // Another site, to see who leaves.
    let mut watcher = Raw::connect(&server.url()).await;
    assert!(welcome(
        &watcher
            .join("quynh-luu", room, Some(&token("quynh-luu")), false)
            .await
    ));
    // A site in the room, and the same site again: refused without resume...
    let mut first = Raw::connect(&server.url()).await;
    let t = token("tp-vinh");
    assert!(welcome(&first.join("tp-vinh", room, Some(&t), false).await));
    let mut again = Raw::connect(&server.url()).await;
    let m = again.join("tp-vinh", room, Some(&t), false).await;
    assert!(refused(&m, ErrorCode::SiteTaken), "{m:?}");
    // ...but resume (with the site's own token) replaces the held connection, which is told.
    let mut back = Raw::connect(&server.url()).await;
    assert!(welcome(
        &back.join_as("tp-vinh", room, Some(&t), false, true).await
    ));
    let told = first.error("the old connection told").await;
    assert_eq!(told, (ErrorCode::SiteTaken, true));
    // The others saw the old connection go as a drop (hand and floor kept).
    assert_eq!(tp_vinh_left(&mut watcher).await, LeaveReason::Disconnected);
    // Resume is no way around a token: another site's token does not resume tp-vinh.
    let mut thief = Raw::connect(&server.url()).await;
    let m = thief
        .join_as("tp-vinh", room, Some(&token("do-luong")), false, true)
        .await;
    assert!(
        matches!(m, ServerMessage::Error { fatal: true, .. }) && !welcome(&m),
        "{m:?}"
    );
    // The chair locks the room; tp-vinh's connection drops (not a leave).
    let _chair = chair_locks(&server.url(), room).await;
    drop(back);
    // Once the server has seen it go (the others are told), tp-vinh is no longer held: what
    // lets it back in is the record of its drop.
    assert_eq!(tp_vinh_left(&mut watcher).await, LeaveReason::Disconnected);
    let mut returning = Raw::connect(&server.url()).await;
    let m = returning
        .join_as("tp-vinh", room, Some(&t), false, true)
        .await;
    assert!(
        welcome(&m),
        "a dropped site comes back into the locked room: {m:?}"
    );
    // A site that was never in the room stays out, resume or not.
    let mut newcomer = Raw::connect(&server.url()).await;
    let m = newcomer
        .join_as("do-luong", room, Some(&token("do-luong")), false, true)
        .await;
    assert!(refused(&m, ErrorCode::RoomLocked), "{m:?}");
}

/// A restarted server has lost the hand queue and the floor. Each site comes back by itself
/// and raises its hand again at the time it first went up, so the queue is as it was, in its
/// old order (whatever order the sites come back in), at the old times; the chair gives the
/// floor mode, the grant, the mute and the spotlight back as their sites return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_keeps_the_hand_queue_in_its_order_and_the_chair_gives_the_floor_back() {
    let _guard = MEDIA.lock().await;
    // The same address before and after the restart, as a real server keeps its port.
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let start = || async move {
        let mut cfg = ServerConfig::dev(addr);
        cfg.connect_timeout = Duration::from_secs(10);
        diemcau_server::start(cfg).await.expect("server starts")
    };
    let room = "khoi-dong-lai";
    let first = start().await;
    let (chair, mut ce) = diemcau_e2e::join_with(
        &first,
        "nghe-an",
        room,
        Some(dev_token("nghe-an", Role::Chair, room)),
    )
    .await;
    let sites = ["tp-vinh-le-loi", "nam-dan-kim-lien", "tp-vinh-ben-thuy"];
    let mut rooms = Vec::new();
    for (i, s) in sites.iter().enumerate() {
        let (r, _e) = diemcau_e2e::join(&first, s, room).await;
        r.raise_hand();
        // Each goes up after the one before is in the queue.
        wait_for(&mut ce, Duration::from_secs(10), "the hand", |e| match e {
            RoomEvent::Hands { queue, .. } if queue.len() == i + 1 => Some(()),
            _ => None,
        })
        .await;
        rooms.push(r);
    }
    assert_eq!(
        chair
            .meeting()
            .hands
            .iter()
            .map(|h| h.site.as_str())
            .collect::<Vec<_>>(),
        sites
    );
    for command in [
        ChairCommand::FloorMode {
            mode: FloorMode::Granted,
        },
        ChairCommand::Grant {
            site: sites[1].into(),
        },
        ChairCommand::Mute {
            site: sites[2].into(),
        },
        ChairCommand::Spotlight {
            site: Some(sites[0].into()),
        },
    ] {
        chair.chair(command).await.expect("the chair may");
    }
    let floor = |f: &diemcau_protocol::FloorState| {
        (
            f.mode,
            f.granted.clone(),
            f.muted.clone(),
            f.spotlight.clone(),
        )
    };
    let given = (
        FloorMode::Granted,
        vec![sites[1].to_string()],
        vec![sites[2].to_string()],
        Some(sites[0].to_string()),
    );
    wait_for(&mut ce, Duration::from_secs(10), "the floor", |e| match e {
        RoomEvent::Floor { state } if floor(state) == given => Some(()),
        _ => None,
    })
    .await;
    // The grant answered that site's hand.
    let before = chair.meeting().hands;
    assert_eq!(
        before.iter().map(|h| h.site.as_str()).collect::<Vec<_>>(),
        [sites[0], sites[2]]
    );
    first.stop();
    wait_for(&mut ce, Duration::from_secs(15), "the loss", |e| {
        matches!(e, RoomEvent::Reconnecting { .. }).then_some(())
    })
    .await;
    let _second = start().await;
    // Back: the same queue, in the same order, at the same times.
    let after = wait_for(
        &mut ce,
        Duration::from_secs(30),
        "the queue again",
        |e| match e {
            RoomEvent::Hands { queue, .. } if queue.len() == before.len() => Some(queue.clone()),
            _ => None,
        },
    )
    .await;
    let key = |h: &diemcau_protocol::Hand| (h.site.clone(), h.place, h.raised_at_ms);
    assert_eq!(
        after.iter().map(key).collect::<Vec<_>>(),
        before.iter().map(key).collect::<Vec<_>>()
    );
    let floor_now = || chair.meeting().floor.as_ref().map(floor);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while floor_now() != Some(given.clone()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the floor is {:?}",
            floor_now()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each came back on its own, once (counted when its new connection is up, which can
    // be just after its hand went up again).
    for r in &rooms {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while r.report().await.reconnects == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(r.report().await.reconnects, 1);
    }
}

/// The time a hand is brought back with counts only from a site the server lost: from a
/// site it still holds, or one that just joined, `raise_hand` with a time does nothing.
#[tokio::test]
async fn a_hand_is_brought_back_at_its_old_time_only_by_a_site_the_server_lost() {
    let server = server_with(true, None, Directory::sample(), None).await;
    let room = "tay-2";
    let mut chair = chair_connection(&server, room, true).await;
    let mut a = Raw::connect(&server.url()).await;
    assert!(matches!(
        a.join("tp-vinh-le-loi", room, None, false).await,
        ServerMessage::Welcome { .. }
    ));
    a.send(&ClientMessage::RaiseHand { raised_at_ms: None })
        .await;
    assert_eq!(chair_queue(&mut chair, 1).await, vec!["tp-vinh-le-loi"]);
    // A new site claims to have raised its hand long ago: ignored.
    let mut b = Raw::connect(&server.url()).await;
    assert!(matches!(
        b.join("nam-dan-kim-lien", room, None, false).await,
        ServerMessage::Welcome { .. }
    ));
    b.send(&ClientMessage::RaiseHand {
        raised_at_ms: Some(1_000),
    })
    .await;
    // A site coming back (resume) to a server started lately, with a time before that
    // start: honoured, in place.
    let mut c = Raw::connect(&server.url()).await;
    c.send(&ClientMessage::Join {
        v: PROTOCOL_VERSION,
        room: room.into(),
        site: "tp-vinh-ben-thuy".into(),
        token: None,
        control: false,
        resume: true,
        relay: false,
    })
    .await;
    c.wait("welcome", |m| {
        matches!(m, ServerMessage::Welcome { .. }).then_some(())
    })
    .await;
    let long_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        - 60_000;
    c.send(&ClientMessage::RaiseHand {
        raised_at_ms: Some(long_ago),
    })
    .await;
    assert_eq!(
        chair_queue(&mut chair, 2).await,
        vec!["tp-vinh-ben-thuy", "tp-vinh-le-loi"]
    );
    // b's claim changed nothing; b raising its hand now goes to the end.
    b.send(&ClientMessage::RaiseHand { raised_at_ms: None })
        .await;
    assert_eq!(
        chair_queue(&mut chair, 3).await,
        vec!["tp-vinh-ben-thuy", "tp-vinh-le-loi", "nam-dan-kim-lien"]
    );
    // Once only: lowered, c cannot bring its old place back (the claim is ignored, and a
    // plain raise goes to the end).
    c.send(&ClientMessage::LowerHand).await;
    assert_eq!(chair_queue(&mut chair, 2).await.len(), 2);
    c.send(&ClientMessage::RaiseHand {
        raised_at_ms: Some(long_ago),
    })
    .await;
    c.send(&ClientMessage::RaiseHand { raised_at_ms: None })
        .await;
    assert_eq!(
        chair_queue(&mut chair, 3).await,
        vec!["tp-vinh-le-loi", "nam-dan-kim-lien", "tp-vinh-ben-thuy"]
    );
    server.stop();
}
