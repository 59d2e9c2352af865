//! Test hosts in network namespaces: a veth pair from the machine into a namespace of its
//! own, cut silently (iptables DROP where packets arrive) or stripped of UDP as a firewall
//! would. Rate, delay and loss are the user-space emulator's (`crate::link`): this
//! machine's kernel has no `sch_netem`. Only namespaces and interfaces made here are touched.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs a command and checks it worked.
pub(crate) fn run(program: &str, args: &[&str]) {
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

/// A network namespace made for a test, `{prefix}N` with `N` unique per process and call,
/// and the name of the interface on the machine's side that leads into it (`{prefix}N` and
/// a suffix; the caller makes that interface). Both are deleted on drop; what a killed run
/// left under the same names is deleted first.
#[derive(Debug)]
pub struct Namespace {
    pub name: String,
    /// `N`, for addresses and the other interface names.
    pub index: u32,
    pub host_if: String,
}

impl Namespace {
    pub fn create(prefix: &str, host_if_suffix: &str) -> Namespace {
        // Unique per process and per call, so parallel test binaries never collide.
        let k = (std::process::id() % 150) * 100 + NEXT.fetch_add(1, Ordering::Relaxed) % 100;
        let ns = Namespace {
            name: format!("{prefix}{k}"),
            index: k,
            host_if: format!("{prefix}{k}{host_if_suffix}"),
        };
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &ns.host_if])
            .output();
        run("ip", &["netns", "add", &ns.name]);
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
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Deleting the namespace deletes the interfaces in it (for a veth pair, both ends).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// A namespace `dcN` joined to the machine by veth `dcNh` (machine side, `host_ip`) and
/// `dcNn` (inside, `ns_ip`). Deleted on drop, with its link and rules.
#[derive(Debug)]
pub struct NetNs {
    ns: Namespace,
    ns_if: String,
    /// The machine's address on the link (a server listening here is reached through it).
    pub host_ip: String,
    /// The namespace's address.
    pub ns_ip: String,
    /// Rules this link put in the machine's own INPUT chain (taken out on drop).
    host_rules: std::sync::Mutex<Vec<Vec<String>>>,
}

impl NetNs {
    /// Makes the namespace and its link (needs root, as the tests run here and in CI).
    pub fn create() -> NetNs {
        let ns = Namespace::create("dc", "h");
        let k = ns.index;
        let subnet = format!("10.{}.{}", 100 + k / 256, k % 256);
        let (host_if, ns_if) = (ns.host_if.clone(), format!("dc{k}n"));
        // An INPUT rule left by a killed run for this link goes first.
        if let Ok(out) = Command::new("iptables").args(["-S", "INPUT"]).output() {
            let marker = format!("-i {host_if} ");
            for rule in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(spec) = rule.strip_prefix("-A INPUT ") {
                    if format!("{spec} ").contains(&marker) {
                        let _ = Command::new("iptables")
                            .args(["-D", "INPUT"])
                            .args(spec.split_whitespace())
                            .output();
                    }
                }
            }
        }
        let ns = NetNs {
            host_ip: format!("{subnet}.1"),
            ns_ip: format!("{subnet}.2"),
            ns,
            ns_if,
            host_rules: Default::default(),
        };
        run(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns.ns_if,
            ],
        );
        run("ip", &["link", "set", &ns.ns_if, "netns", &ns.ns.name]);
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", ns.host_ip),
                "dev",
                &host_if,
            ],
        );
        run("ip", &["link", "set", &host_if, "up"]);
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
        self.ns.inside(args);
    }

    /// A command that will run `program` inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        self.ns.command(program)
    }

    /// Adds (`true`) or removes an iptables rule for packets coming in: inside the namespace
    /// (the site's downlink) and in the machine's INPUT chain for packets from this link
    /// (its uplink). Dropping where packets arrive keeps the loss silent, as on a real
    /// link: a DROP in OUTPUT would fail the sender's `send` with EPERM instead.
    fn incoming(&self, add: bool, rule: &[&str]) {
        self.incoming_on(add, &[], rule);
    }

    /// [`Self::incoming`], with `inside_only` added to the namespace's rule (the machine's
    /// rule already names the link's interface).
    fn incoming_on(&self, add: bool, inside_only: &[&str], rule: &[&str]) {
        let op = if add { "-I" } else { "-D" };
        let mut inside = vec!["iptables", op, "INPUT"];
        inside.extend_from_slice(inside_only);
        inside.extend_from_slice(rule);
        self.inside(&inside);
        let mut host: Vec<String> = ["INPUT", "-i", &self.ns.host_if]
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

    /// Cuts the link both ways (`true`) or mends it, leaving traffic within the namespace
    /// (its loopback and its own address) alone: a district's own meeting inside it goes on.
    pub fn cut(&self, on: bool) {
        let ns_if = self.ns_if.clone();
        self.incoming_on(on, &["-i", &ns_if], &["-j", "DROP"]);
    }

    /// Drops UDP both ways, as a firewall that allows only TCP.
    pub fn block_udp(&self) {
        for chain in ["INPUT", "OUTPUT"] {
            self.inside(&["iptables", "-A", chain, "-p", "udp", "-j", "DROP"]);
        }
    }
}

impl Drop for NetNs {
    /// Takes this link's rules out of the machine's INPUT chain; the namespace and the veth
    /// pair go with `Namespace`.
    fn drop(&mut self) {
        let rules = std::mem::take(&mut *self.host_rules.lock().unwrap_or_else(|e| e.into_inner()));
        for r in rules {
            let _ = Command::new("iptables").arg("-D").args(r).output();
        }
    }
}
