//! A link emulator in user space, for this machine's kernel has no `sch_netem`: a network
//! namespace whose only interface is a TUN device, and a twin TUN device on the machine's
//! side, with this process carrying every packet between the two. On the way each packet may
//! be lost at random, waits its turn behind a rate limit (a drop-tail queue bounded in
//! milliseconds), and is delayed by a fixed one-way delay plus jitter (without reordering).
//! The shape of each direction can be changed while the link runs.
//!
//! Topology: the namespace has `10.S.0.2` on `dlNa`, the machine `10.S.0.1` on `dlNb`;
//! a server listening on `10.S.0.1` is reached from inside only through the emulator.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::{run, Namespace};

/// How one direction of the link behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// kbit/s; `None` = as fast as the machine goes.
    pub rate_kbit: Option<u32>,
    /// One-way delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly from 0..jitter per packet (order kept).
    pub jitter: Duration,
    /// Random loss, percent.
    pub loss_pct: f64,
    /// The most a packet may wait behind the rate limit before it is dropped.
    pub queue: Duration,
    /// Every packet dropped.
    pub blackout: bool,
    /// The DTLS handshake's last flight to the first UDP port that gets one is dropped, every
    /// time it is sent: `ChangeCipherSpec` and encrypted handshake records (epoch 1 and up,
    /// the `Finished` message). The sender's side of the handshake is then done and the
    /// receiver's never is.
    pub stall_first_dtls: bool,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            rate_kbit: None,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss_pct: 0.0,
            queue: Duration::from_millis(200),
            blackout: false,
            stall_first_dtls: false,
        }
    }
}

/// Packet counts of one direction.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub packets: u64,
    pub bytes: u64,
    pub lost: u64,
    pub queue_drops: u64,
    /// Bytes that made it across (not lost, not dropped from the queue).
    pub delivered_bytes: u64,
}

struct Direction {
    shape: Mutex<Shape>,
    counts: Mutex<Counts>,
}

/// A namespace behind an emulated link. Dropped: threads stopped, namespace deleted.
pub struct EmulatedLink {
    ns: Namespace,
    /// The machine's address (listen here).
    pub host_ip: String,
    pub ns_ip: String,
    up: Arc<Direction>,
    down: Arc<Direction>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Once a second from the start: (seconds, bytes delivered up, down, the rate limits
    /// then), cumulative.
    samples: Arc<Mutex<Vec<Sample>>>,
}

/// One of [`EmulatedLink`]'s once-a-second samples.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: f64,
    up: u64,
    down: u64,
    up_limit: Option<u32>,
    down_limit: Option<u32>,
}

/// What crossed the link in one second, and the limits then.
#[derive(Debug, Clone, Copy)]
pub struct Second {
    /// The second's end, from the link's creation.
    pub at: f64,
    pub up_kbit: f64,
    pub down_kbit: f64,
    pub up_limit: Option<u32>,
    pub down_limit: Option<u32>,
}

/// Opens a TUN device named `name` (no packet information header), non-blocking.
fn open_tun(name: &str) -> File {
    use std::os::unix::fs::OpenOptionsExt;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .unwrap_or_else(|e| panic!("open /dev/net/tun: {e}"));
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    #[allow(unsafe_code)]
    // SAFETY: TUNSETIFF reads and writes an ifreq-sized struct, which `req` is, on an open
    // descriptor of /dev/net/tun.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
    assert!(
        rc >= 0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    file
}

/// Reads a packet if one is there; otherwise waits a millisecond and says so.
fn read_packet(mut fd: &File, buf: &mut [u8]) -> Option<usize> {
    match fd.read(buf) {
        Ok(n) if n > 0 => Some(n),
        _ => {
            std::thread::sleep(Duration::from_millis(1));
            None
        }
    }
}

fn write_packet(mut fd: &File, pkt: &[u8]) {
    // A failed write is a lost packet, as on a wire.
    let _ = fd.write(pkt);
}

/// For an IPv4 UDP packet carrying a DTLS record: its destination port, and whether the
/// record belongs to a handshake's last flight (`ChangeCipherSpec`, or a handshake record of
/// epoch above 0: `Finished`).
fn dtls_record(pkt: &[u8]) -> Option<(u16, bool)> {
    let ihl = usize::from(*pkt.first()? & 0x0f) * 4;
    if pkt.first()? >> 4 != 4 || *pkt.get(9)? != 17 {
        return None;
    }
    let udp = pkt.get(ihl..)?;
    let port = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
    let rec = udp.get(8..)?;
    // RFC 7983: a first byte in 20..=63 is DTLS; then version (2 bytes), epoch (2 bytes).
    if !(20..=63).contains(rec.first()?) {
        return None;
    }
    let epoch = u16::from_be_bytes([*rec.get(3)?, *rec.get(4)?]);
    let last_flight = match rec.first()? {
        20 => true,
        22 => epoch > 0,
        _ => false,
    };
    Some((port, last_flight))
}

/// Packets on the wire, with the time each leaves it.
type InFlight = VecDeque<(Instant, Vec<u8>)>;

/// Carries packets from `from` to `to` as `dir` says, until `stop`.
fn carry(
    from: Arc<File>,
    to: Arc<File>,
    dir: Arc<Direction>,
    stop: Arc<AtomicBool>,
) -> [JoinHandle<()>; 2] {
    let queue: Arc<(Mutex<InFlight>, Condvar)> = Default::default();
    let reader = {
        let (queue, stop) = (queue.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            // When the last packet finishes crossing the rate limit, and leaves the link.
            let (mut wire_free, mut last_out) = (Instant::now(), Instant::now());
            // The port whose DTLS handshake is stalled (`Shape::stall_first_dtls`).
            let mut stalled: Option<u16> = None;
            while !stop.load(Ordering::Relaxed) {
                let Some(n) = read_packet(&from, &mut buf) else {
                    continue;
                };
                let now = Instant::now();
                let s = *dir.shape.lock().unwrap();
                let mut c = dir.counts.lock().unwrap();
                c.packets += 1;
                c.bytes += n as u64;
                if s.blackout || rand::random::<f64>() * 100.0 < s.loss_pct {
                    c.lost += 1;
                    continue;
                }
                if s.stall_first_dtls {
                    if let Some((port, true)) = dtls_record(&buf[..n]) {
                        if *stalled.get_or_insert(port) == port {
                            c.lost += 1;
                            continue;
                        }
                    }
                }
                let sent = match s.rate_kbit {
                    Some(k) => {
                        let start = wire_free.max(now);
                        if start - now > s.queue {
                            c.queue_drops += 1;
                            continue;
                        }
                        wire_free = start
                            + Duration::from_secs_f64(n as f64 * 8.0 / (f64::from(k) * 1000.0));
                        wire_free
                    }
                    None => now,
                };
                c.delivered_bytes += n as u64;
                drop(c);
                let jitter = s.jitter.mul_f64(rand::random::<f64>());
                let out = (sent + s.delay + jitter).max(last_out);
                last_out = out;
                let (q, cv) = &*queue;
                q.lock().unwrap().push_back((out, buf[..n].to_vec()));
                cv.notify_one();
            }
            queue.1.notify_all();
        })
    };
    let writer = std::thread::spawn(move || {
        let (q, cv) = &*queue;
        let mut q = q.lock().unwrap();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            match q.front() {
                Some((at, _)) if *at <= now => {
                    let (_, pkt) = q.pop_front().expect("front exists");
                    write_packet(&to, &pkt);
                }
                Some((at, _)) => {
                    let wait = *at - now;
                    q = cv.wait_timeout(q, wait).unwrap().0;
                }
                None => q = cv.wait_timeout(q, Duration::from_millis(100)).unwrap().0,
            }
        }
    });
    [reader, writer]
}

impl EmulatedLink {
    /// Makes the namespace, the two TUN devices and the threads (needs root).
    pub fn create() -> EmulatedLink {
        let ns = Namespace::create("dl", "b");
        let k = ns.index;
        let (ns_if, host_if) = (format!("dl{k}a"), ns.host_if.clone());
        let subnet = format!("10.{}.{}", 200 + k / 256 % 50, k % 256);
        let (host_ip, ns_ip) = (format!("{subnet}.1"), format!("{subnet}.2"));
        let a = Arc::new(open_tun(&ns_if));
        let b = Arc::new(open_tun(&host_if));
        run("ip", &["link", "set", &ns_if, "netns", &ns.name]);
        ns.inside(&["ip", "addr", "add", &ns_ip, "peer", &host_ip, "dev", &ns_if]);
        ns.inside(&["ip", "link", "set", &ns_if, "up"]);
        ns.inside(&["ip", "link", "set", "lo", "up"]);
        run(
            "ip",
            &["addr", "add", &host_ip, "peer", &ns_ip, "dev", &host_if],
        );
        run("ip", &["link", "set", &host_if, "up"]);
        let dir = || {
            Arc::new(Direction {
                shape: Mutex::new(Shape::default()),
                counts: Mutex::new(Counts::default()),
            })
        };
        let (up, down) = (dir(), dir());
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        threads.extend(carry(a.clone(), b.clone(), up.clone(), stop.clone()));
        threads.extend(carry(b, a, down.clone(), stop.clone()));
        let samples = Arc::new(Mutex::new(Vec::new()));
        {
            let (up, down, stop, samples) =
                (up.clone(), down.clone(), stop.clone(), samples.clone());
            threads.push(std::thread::spawn(move || {
                let start = Instant::now();
                let mut next = start;
                while !stop.load(Ordering::Relaxed) {
                    next += Duration::from_secs(1);
                    while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    let sample = Sample {
                        at: start.elapsed().as_secs_f64(),
                        up: up.counts.lock().unwrap().delivered_bytes,
                        down: down.counts.lock().unwrap().delivered_bytes,
                        up_limit: up.shape.lock().unwrap().rate_kbit,
                        down_limit: down.shape.lock().unwrap().rate_kbit,
                    };
                    samples.lock().unwrap().push(sample);
                }
            }));
        }
        EmulatedLink {
            ns,
            host_ip,
            ns_ip,
            up,
            down,
            stop,
            threads,
            samples,
        }
    }

    /// What crossed the link each second so far (kbit/s each way), with the limits then:
    /// how closely the senders track the emulated limit.
    pub fn seconds(&self) -> Vec<Second> {
        let samples = self.samples.lock().unwrap().clone();
        samples
            .windows(2)
            .map(|w| {
                let dt = (w[1].at - w[0].at).max(1e-3);
                let kbit = |a: u64, b: u64| (b - a) as f64 * 8.0 / dt / 1000.0;
                Second {
                    at: w[1].at,
                    up_kbit: kbit(w[0].up, w[1].up),
                    down_kbit: kbit(w[0].down, w[1].down),
                    up_limit: w[1].up_limit,
                    down_limit: w[1].down_limit,
                }
            })
            .collect()
    }

    /// Shapes what the site sends (uplink) and what it receives (downlink).
    pub fn shape(&self, up: Shape, down: Shape) {
        *self.up.shape.lock().unwrap() = up;
        *self.down.shape.lock().unwrap() = down;
    }

    /// The same shape both ways.
    pub fn shape_both(&self, s: Shape) {
        self.shape(s, s);
    }

    /// Packet counts so far: (uplink, downlink).
    pub fn counts(&self) -> (Counts, Counts) {
        (
            *self.up.counts.lock().unwrap(),
            *self.down.counts.lock().unwrap(),
        )
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        self.ns.command(program)
    }
}

impl Drop for EmulatedLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The namespace and the machine-side TUN device go with `Namespace`.
    }
}
