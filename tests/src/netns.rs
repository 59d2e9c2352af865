//! Test hosts in network namespaces: a veth pair from the machine into a namespace of its
//! own, and what a rural link does to it — a rate limit (tbf), random loss and blackouts
//! (iptables' `statistic` match and DROP rules), UDP blocked by a firewall.
//!
//! This machine's kernel has no `sch_netem`, so added delay cannot be emulated here; the
//! rest are the kernel's own queues and filters. Only namespaces made here are touched.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A namespace `dcN` joined to the machine by veth `dcNh` (machine side, `host_ip`) and
/// `dcNn` (inside, `ns_ip`). Deleted on drop, with its link and rules.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
    host_if: String,
    ns_if: String,
    /// The machine's address on the link (a server listening here is reached through it).
    pub host_ip: String,
    /// The namespace's address.
    pub ns_ip: String,
    /// Rules this link put in the machine's own INPUT chain (taken out on drop).
    host_rules: std::sync::Mutex<Vec<Vec<String>>>,
    /// The random loss in effect (iptables' probability), if any.
    loss: std::sync::Mutex<Option<String>>,
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} does not start ({e}); scripts/setup installs it"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    /// Makes the namespace and its link (needs root, as the tests run here and in CI).
    pub fn create() -> NetNs {
        // Unique per process and per call, so parallel test binaries never collide.
        let k = (std::process::id() % 150) * 100 + NEXT.fetch_add(1, Ordering::Relaxed) % 100;
        let name = format!("dc{k}");
        let (host_if, ns_if) = (format!("dc{k}h"), format!("dc{k}n"));
        let subnet = format!("10.{}.{}", 100 + k / 256, k % 256);
        let ns = NetNs {
            host_ip: format!("{subnet}.1"),
            ns_ip: format!("{subnet}.2"),
            name,
            host_if,
            ns_if,
            host_rules: Default::default(),
            loss: Default::default(),
        };
        // A namespace left by a killed run of the same process id goes first.
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        run("ip", &["netns", "add", &ns.name]);
        run(
            "ip",
            &[
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &ns.ns_if,
            ],
        );
        run("ip", &["link", "set", &ns.ns_if, "netns", &ns.name]);
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", ns.host_ip),
                "dev",
                &ns.host_if,
            ],
        );
        run("ip", &["link", "set", &ns.host_if, "up"]);
        ns.inside(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", ns.ns_ip),
            "dev",
            &ns.ns_if,
        ]);
        ns.inside(&["ip", "link", "set", &ns.ns_if, "up"]);
        ns.inside(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace and checks it worked.
    pub fn inside(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// A command that will run `program` inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Adds (`true`) or removes an iptables rule for packets coming in: inside the namespace
    /// (the site's downlink) and in the machine's INPUT chain for packets from this link
    /// (its uplink). Dropping where packets arrive keeps the loss silent, as on a real
    /// link: a DROP in OUTPUT would fail the sender's `send` with EPERM instead.
    fn incoming(&self, add: bool, rule: &[&str]) {
        let op = if add { "-I" } else { "-D" };
        let mut inside = vec!["iptables", op, "INPUT"];
        inside.extend_from_slice(rule);
        self.inside(&inside);
        let mut host: Vec<String> = ["INPUT", "-i", &self.host_if]
            .iter()
            .chain(rule)
            .map(|s| s.to_string())
            .collect();
        let mut args = vec![op.to_string()];
        args.append(&mut host.clone());
        run(
            "iptables",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let mut kept = self.host_rules.lock().expect("lock poisoned");
        if add {
            kept.push(std::mem::take(&mut host));
        } else if let Some(i) = kept.iter().position(|r| *r == host) {
            kept.remove(i);
        }
    }

    /// Drops every packet both ways (`true`), or lets them through again.
    pub fn blackout(&self, on: bool) {
        self.incoming(on, &["-j", "DROP"]);
    }

    /// Drops UDP both ways, as a firewall that allows only TCP.
    pub fn block_udp(&self) {
        for chain in ["INPUT", "OUTPUT"] {
            self.inside(&["iptables", "-A", chain, "-p", "udp", "-j", "DROP"]);
        }
    }

    /// Drops `percent` of the packets at random, each way; `None` takes the loss away.
    pub fn loss(&self, percent: Option<f64>) {
        let mut current = self.loss.lock().expect("lock poisoned");
        let rule = |p: &str| {
            [
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                p,
                "-j",
                "DROP",
            ]
            .map(String::from)
        };
        if let Some(p) = current.take() {
            let r = rule(&p);
            self.incoming(false, &r.iter().map(String::as_str).collect::<Vec<_>>());
        }
        if let Some(percent) = percent {
            let p = format!("{:.4}", percent / 100.0);
            let r = rule(&p);
            self.incoming(true, &r.iter().map(String::as_str).collect::<Vec<_>>());
            *current = Some(p);
        }
    }

    /// Limits what leaves the namespace (the site's uplink) to `kbit` kbit/s with a token
    /// bucket and a queue of at most 200 ms; `None` lifts the limit.
    pub fn uplink_rate(&self, kbit: Option<u32>) {
        match kbit {
            Some(k) => self.inside(&[
                "tc",
                "qdisc",
                "replace",
                "dev",
                &self.ns_if,
                "root",
                "tbf",
                "rate",
                &format!("{k}kbit"),
                "burst",
                "8kb",
                "latency",
                "200ms",
            ]),
            None => self.inside(&["tc", "qdisc", "del", "dev", &self.ns_if, "root"]),
        }
    }

    /// The same on the machine's side: what reaches the site (its downlink).
    pub fn downlink_rate(&self, kbit: Option<u32>) {
        match kbit {
            Some(k) => run(
                "tc",
                &[
                    "qdisc",
                    "replace",
                    "dev",
                    &self.host_if,
                    "root",
                    "tbf",
                    "rate",
                    &format!("{k}kbit"),
                    "burst",
                    "8kb",
                    "latency",
                    "200ms",
                ],
            ),
            None => run("tc", &["qdisc", "del", "dev", &self.host_if, "root"]),
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let rules = std::mem::take(&mut *self.host_rules.lock().unwrap_or_else(|e| e.into_inner()));
        for r in rules {
            let _ = Command::new("iptables").arg("-D").args(r).output();
        }
        // Deleting the namespace deletes its end of the veth pair, and with it the other.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}
