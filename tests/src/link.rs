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
        EmulatedLink {
            ns,
            host_ip,
            ns_ip,
            up,
            down,
            stop,
            threads,
        }
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
