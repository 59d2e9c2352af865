//! Malformed and hostile input: the offender gets a clear error or is dropped, the server
//! logs it and keeps serving everyone else.

use std::time::Duration;

use diemcau_client::RoomEvent;
use diemcau_e2e::raw::Raw;
use diemcau_e2e::{dev_server, join, until_verified, wait_for, MEDIA};
use diemcau_protocol::{ErrorCode, ServerMessage, MAX_MESSAGE_BYTES};
use tokio::io::AsyncWriteExt;

async fn expect_error(ws: &mut Raw, want: ErrorCode) -> bool {
    loop {
        match ws.next().await {
            Some(ServerMessage::Error {
                code,
                fatal,
                message,
                ..
            }) => {
                assert_eq!(code, want, "{message}");
                assert!(!message.is_empty());
                return fatal;
            }
            Some(_) => continue,
            None => panic!("connection closed before the {want:?} error"),
        }
    }
}

async fn expect_closed(ws: &mut Raw) {
    while let Some(m) = ws.next().await {
        assert!(
            !matches!(m, ServerMessage::Welcome { .. }),
            "no welcome after a fatal error"
        );
    }
}

async fn ping_works(ws: &mut Raw) {
    ws.send_text(r#"{"type":"ping","id":42}"#).await;
    loop {
        match ws.next().await {
            Some(ServerMessage::Pong { id: 42 }) => return,
            Some(_) => continue,
            None => panic!("connection closed; expected it to stay open"),
        }
    }
}

fn join_msg(site: &str) -> String {
    format!(r#"{{"type":"join","v":1,"room":"xau","site":"{site}"}}"#)
}

#[tokio::test]
async fn malformed_json_gets_bad_json_and_the_connection_stays() {
    let server = dev_server().await;
    let mut c = Raw::connect(&server.url()).await;
    c.send_text("{\"type\": \"join\", ").await;
    assert!(!expect_error(&mut c, ErrorCode::BadJson).await);
    c.send_text("[1,2,3]").await;
    assert!(!expect_error(&mut c, ErrorCode::BadJson).await);
    c.send_binary(vec![1, 2, 3]).await;
    assert!(!expect_error(&mut c, ErrorCode::BadJson).await);
    ping_works(&mut c).await;
    server.stop();
}

#[tokio::test]
async fn unknown_type_is_refused_by_name() {
    let server = dev_server().await;
    let mut c = Raw::connect(&server.url()).await;
    c.send_text(r#"{"type":"dance","steps":3}"#).await;
    assert!(!expect_error(&mut c, ErrorCode::UnknownType).await);
    ping_works(&mut c).await;
    server.stop();
}

#[tokio::test]
async fn wrong_protocol_version_is_fatal() {
    let server = dev_server().await;
    let mut c = Raw::connect(&server.url()).await;
    c.send_text(r#"{"type":"join","v":99,"room":"xau","site":"tp-vinh"}"#)
        .await;
    assert!(expect_error(&mut c, ErrorCode::UnsupportedVersion).await);
    expect_closed(&mut c).await;
    server.stop();
}

#[tokio::test]
async fn oversized_message_is_refused_and_giant_one_drops_the_connection() {
    let server = dev_server().await;
    let mut c = Raw::connect(&server.url()).await;
    let big = format!(
        r#"{{"type":"offer","sdp":"{}"}}"#,
        "v".repeat(MAX_MESSAGE_BYTES + 1)
    );
    c.send_text(&big).await;
    assert!(!expect_error(&mut c, ErrorCode::TooLarge).await);
    ping_works(&mut c).await;
    // Far above the limit the WebSocket layer itself refuses the frame and drops us.
    let giant = "x".repeat(16 * MAX_MESSAGE_BYTES);
    c.send_text(&giant).await;
    expect_closed(&mut c).await;
    server.stop();
}

#[tokio::test]
async fn messages_before_join_are_refused() {
    let server = dev_server().await;
    let mut c = Raw::connect(&server.url()).await;
    c.send_text(r#"{"type":"offer","sdp":"v=0"}"#).await;
    assert!(!expect_error(&mut c, ErrorCode::NotJoined).await);
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_sdp_duplicate_site_and_vanishing_clients_leave_the_room_working() {
    let _guard = MEDIA.lock().await;
    let server = dev_server().await;
    let (a, mut a_events) = join(&server, "nghe-an", "xau").await;

    // Garbage SDP: a clear error, the connection stays.
    let mut g = Raw::connect(&server.url()).await;
    g.send_text(&join_msg("hung-nguyen")).await;
    assert!(matches!(
        g.next().await,
        Some(ServerMessage::Welcome { .. })
    ));
    g.send_text(r#"{"type":"offer","sdp":"this is not SDP at all"}"#)
        .await;
    assert!(!expect_error(&mut g, ErrorCode::BadSdp).await);
    ping_works(&mut g).await;

    // A second join with a site id already present: refused, closed.
    let mut d = Raw::connect(&server.url()).await;
    d.send_text(&join_msg("nghe-an")).await;
    assert!(expect_error(&mut d, ErrorCode::SiteTaken).await);
    expect_closed(&mut d).await;

    // A client that vanishes mid-handshake (joined, offered garbage-free nothing, then gone).
    let mut v = Raw::connect(&server.url()).await;
    v.send_text(&join_msg("ky-son")).await;
    assert!(matches!(
        v.next().await,
        Some(ServerMessage::Welcome { .. })
    ));
    drop(v);
    wait_for(
        &mut a_events,
        Duration::from_secs(5),
        "ky-son to be dropped",
        |e| match e {
            RoomEvent::SiteLeft { site, .. } if site == "ky-son" => Some(()),
            _ => None,
        },
    )
    .await;

    // A TCP connection that says nothing useful and is cut.
    let mut raw = tokio::net::TcpStream::connect(server.signalling)
        .await
        .unwrap();
    raw.write_all(&[0, 3, 1, 2, 3]).await.unwrap();
    drop(raw);

    // Through all of that, a real second site joins and both verify each other.
    let (b, _b_events) = join(&server, "thanh-chuong", "xau").await;
    until_verified(&b, &["nghe-an"], Duration::from_secs(15)).await;
    until_verified(&a, &["thanh-chuong"], Duration::from_secs(15)).await;
    drop(g);
    a.leave().await;
    b.leave().await;
    server.stop();
}
