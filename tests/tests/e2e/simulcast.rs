//! Simulcast on loopback: every site sends its 640x360 camera in two layers (640x360 and
//! 320x180), and the server chooses, per subscriber and per picture, which one it forwards.

use std::collections::BTreeMap;
use std::time::Duration;

use diemcau_client::{JoinOptions, Report, Room, RoomEvent};
use diemcau_e2e::{dev_server, dev_token, test_log, until_spotlight, MEDIA};
use diemcau_protocol::{ChairCommand, Role};
use diemcau_server::upstream::UpstreamConfig;
use diemcau_server::{RunningServer, ServerConfig};
use tokio::sync::mpsc;

const ROOM: &str = "lop-mau";

async fn join_640(
    server: &RunningServer,
    site: &str,
    role: Role,
) -> (Room, mpsc::UnboundedReceiver<RoomEvent>) {
    // The default: the 640x360 test pattern at 15 fps, in as many layers as it allows (2).
    let mut opts = JoinOptions::synthetic(site, ROOM);
    opts.token = Some(dev_token(site, role, ROOM));
    Room::connect(&server.url(), opts)
        .await
        .unwrap_or_else(|e| panic!("{site} could not join: {e}"))
}

/// Pictures decoded per sender and size between two reports.
fn sizes_between(before: &Report, after: &Report) -> BTreeMap<String, BTreeMap<String, u64>> {
    after
        .received
        .iter()
        .map(|a| {
            let b = before.received.iter().find(|b| b.site == a.site);
            let sizes = a
                .layers
                .iter()
                .map(|(size, n)| {
                    let was = b.and_then(|b| b.layers.get(size)).copied().unwrap_or(0);
                    (size.clone(), n - was)
                })
                .filter(|(_, n)| *n > 0)
                .collect();
            (a.site.clone(), sizes)
        })
        .collect()
}

/// Watches `room` in windows of 1.5 s until one window holds, from each `(site, size)`, at
/// least 10 pictures and only at that size; panics with the last window after `timeout`.
async fn until_sizes(room: &Room, expect: &[(&str, &str)], timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut before = room.report().await;
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let after = room.report().await;
        let window = sizes_between(&before, &after);
        let ok = expect.iter().all(|(site, size)| {
            window
                .get(*site)
                .is_some_and(|sizes| sizes.get(*size).is_some_and(|n| *n >= 10) && sizes.len() == 1)
        });
        if ok {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never received {expect:?} within {timeout:?}; last 1.5 s: {window:?}",
            after.site
        );
        before = after;
    }
}

/// The chair puts the spotlight on `site`, and its own view shows it.
async fn spotlight(chair: &Room, events: &mut mpsc::UnboundedReceiver<RoomEvent>, site: &str) {
    chair
        .chair(ChairCommand::Spotlight {
            site: Some(site.into()),
        })
        .await
        .expect("the chair may spotlight");
    until_spotlight(events, site).await;
}

/// Every move between layers was clean: each picture received decoded, none out of order
/// (a picture repeated at the new size is not out of order).
fn assert_clean_moves(r: &Report) {
    for x in &r.received {
        assert_eq!(
            x.video_decode_errors, 0,
            "{} from {}: {x:?}",
            r.site, x.site
        );
        assert_eq!(
            x.video_frames_out_of_order, 0,
            "{} from {}: {x:?}",
            r.site, x.site
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_speaker_view_gets_the_top_layer_and_thumbnails_the_lowest_and_a_spotlight_swaps_them()
{
    test_log();
    let _guard = MEDIA.lock().await;
    let server = dev_server().await;
    let (tp_vinh, _e1) = join_640(&server, "tp-vinh", Role::District).await;
    let (dien_chau, _e2) = join_640(&server, "dien-chau", Role::District).await;
    let (province, mut pe) = join_640(&server, "nghe-an", Role::Chair).await;
    let limit = Duration::from_secs(40);

    // The chair's picture ranks first at each district: its top layer; the other district
    // is a thumbnail. At the chair, the earlier joiner ranks first.
    until_sizes(
        &tp_vinh,
        &[("nghe-an", "640x360"), ("dien-chau", "320x180")],
        limit,
    )
    .await;
    until_sizes(
        &dien_chau,
        &[("nghe-an", "640x360"), ("tp-vinh", "320x180")],
        limit,
    )
    .await;
    until_sizes(
        &province,
        &[("tp-vinh", "640x360"), ("dien-chau", "320x180")],
        limit,
    )
    .await;
    // Every site sends both layers: what it sends does not depend on who receives what.
    // Each started its top layer only once a probe had proved the uplink (the low layer
    // and the sound alone never prove the estimate two layers need), and the server took the
    // padding out of the pictures before forwarding them.
    let mut padding_sent = 0;
    for r in [&tp_vinh, &dien_chau, &province] {
        let sent = r.report().await.sent;
        assert_eq!(sent.video_layers, 2);
        assert!(sent.layer_probes >= 1 && sent.probe_bytes > 0, "{sent:?}");
        padding_sent += sent.probe_bytes;
    }
    let removed = server
        .stats
        .probe_bytes_in
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        removed > padding_sent / 2 && removed <= padding_sent,
        "the server removed {removed} bytes of padding of {padding_sent} sent"
    );

    // A spotlight on dien-chau: it becomes the speaker view everywhere, on its top layer,
    // and the chair's picture goes down to a thumbnail at tp-vinh.
    spotlight(&province, &mut pe, "dien-chau").await;
    until_sizes(
        &tp_vinh,
        &[("dien-chau", "640x360"), ("nghe-an", "320x180")],
        limit,
    )
    .await;
    until_sizes(
        &province,
        &[("dien-chau", "640x360"), ("tp-vinh", "320x180")],
        limit,
    )
    .await;

    // The moves between layers were clean: every picture decoded, none out of order, and
    // each stream verified throughout (a picture repeated at the new size is not a loss).
    for room in [&tp_vinh, &dien_chau, &province] {
        let r = room.report().await;
        assert_clean_moves(&r);
        for x in &r.received {
            assert!(
                x.video_frames_verified as f64 >= 0.95 * x.video_frames as f64,
                "{} from {}: {x:?}",
                r.site,
                x.site
            );
        }
    }
    for room in [tp_vinh, dien_chau, province] {
        room.leave().await;
    }
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_layer_when_asked_and_a_small_camera_sends_one() {
    let _guard = MEDIA.lock().await;
    let server = dev_server().await;
    let mut one = JoinOptions::synthetic("tp-vinh", ROOM);
    one.video_layers = 1;
    let (a, _ea) = Room::connect(&server.url(), one).await.expect("joins");
    // 320x180 has no lower layer.
    let (b, _eb) = diemcau_e2e::join(&server, "dien-chau", ROOM).await;
    until_sizes(&b, &[("tp-vinh", "640x360")], Duration::from_secs(40)).await;
    until_sizes(&a, &[("dien-chau", "320x180")], Duration::from_secs(20)).await;
    assert_eq!(a.report().await.sent.video_layers, 1);
    assert_eq!(b.report().await.sent.video_layers, 1);
    a.leave().await;
    b.leave().await;
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_go_through_a_district_relay_chosen_by_the_relay_for_its_uplink() {
    test_log();
    let _guard = MEDIA.lock().await;
    let province = dev_server().await;
    let mut cfg = ServerConfig::dev("127.0.0.1:0".parse().expect("literal"));
    cfg.connect_timeout = Duration::from_secs(10);
    cfg.upstream = Some(UpstreamConfig {
        url: province.url(),
        site: "tp-vinh".into(),
        token: Some(dev_token("tp-vinh", Role::District, ROOM)),
        room: ROOM.into(),
        link_at_start: true,
    });
    let relay = diemcau_server::start(cfg).await.expect("relay starts");
    let (chair, mut ce) = join_640(&province, "nghe-an", Role::Chair).await;
    // The commune joins before its district's hall: the hall still goes up first.
    let (le_loi, _el) = join_640(&relay, "tp-vinh-le-loi", Role::Commune).await;
    let (_hall, _eh) = join_640(&relay, "tp-vinh", Role::District).await;
    let limit = Duration::from_secs(40);

    // Up: the relay sends its hall's top layer (its hall ranks first on its uplink) and the
    // commune's lowest. Down: the province's chair, top layer, ranks first for the commune;
    // its own district hall, beside it on the relay, is a thumbnail.
    until_sizes(
        &chair,
        &[("tp-vinh", "640x360"), ("tp-vinh-le-loi", "320x180")],
        limit,
    )
    .await;
    until_sizes(
        &le_loi,
        &[("nghe-an", "640x360"), ("tp-vinh", "320x180")],
        limit,
    )
    .await;

    // A spotlight on the commune: the relay sends its top layer up instead.
    spotlight(&chair, &mut ce, "tp-vinh-le-loi").await;
    until_sizes(
        &chair,
        &[("tp-vinh-le-loi", "640x360"), ("tp-vinh", "320x180")],
        limit,
    )
    .await;
    assert_clean_moves(&chair.report().await);
    chair.leave().await;
    le_loi.leave().await;
    relay.stop();
    province.stop();
}
