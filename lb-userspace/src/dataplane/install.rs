//! Installing this build's programs on an instance's interfaces. An interface without links
//! gets new ones (pinned); an attached interface keeps its links and has their programs
//! replaced in place (`BPF_LINK_UPDATE`), so that no packet ever meets no program. The new
//! programs use the pinned maps, kept or migrated (see `layout`), so flows, counters and round-
//! robin cursors carry over. An instance runs one build: every install replaces the programs
//! on all its attached interfaces.
use std::{collections::BTreeMap, fs, path::PathBuf};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    maps::MapData,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode as LinkMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use lb_common::program_names;

use crate::{
    dataplane::layout::{self, Step},
    dataplane::migrate::Migration,
    dataplane::socket_lb,
    dataplane::sync,
    dataplane::{self, FlowCapacity, Maps},
    host::netdev,
    instance::state::{State, Transmit, XdpMode},
    instance::{self, Instance},
};

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic mode where the driver has no XDP support.
    Auto,
    Native,
    Generic,
}

/// How the frames XDP sends leave an interface (`attach --transmit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TransmitChoice {
    /// XDP's own transmission where the driver delivers it; through TC on veths (whose peer
    /// takes XDP-sent frames only while it runs an XDP program) and in generic mode.
    Auto,
    /// Always XDP_TX and redirects: the fast path, for a veth whose peer runs an XDP program.
    Xdp,
    /// Always handed to the TC ingress program, which sends them the ordinary way.
    Tc,
}

/// Where the maps being migrated are created and filled, under the instance's pin folder,
/// before their pins replace the old ones. bpffs refuses names with a '.'.
pub const STAGING_DIR: &str = "migrating";

/// The three links of an attached interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkHook {
    Xdp,
    /// TC egress (reverse NAT, reply encapsulation).
    Tc,
    /// TC ingress (sends what XDP hands over: `xmit`).
    TcIngress,
}

impl LinkHook {
    pub const ALL: [LinkHook; 3] = [LinkHook::Xdp, LinkHook::Tc, LinkHook::TcIngress];

    /// Ends the name of the link's pin.
    fn pin_suffix(self) -> &'static str {
        match self {
            Self::Xdp => "_xdp",
            Self::Tc => "_tc",
            Self::TcIngress => "_tcin",
        }
    }
}

/// Pin paths of an interface's XDP, TC egress and TC ingress links. bpffs refuses names with a
/// '.', which interface names (VLANs: `eth0.100`) may contain, so it is escaped.
pub fn link_pins(instance: &Instance, iface: &str) -> [PathBuf; 3] {
    let dir = instance.links_dir();
    let name = iface.replace('%', "%25").replace('.', "%2e");
    LinkHook::ALL.map(|hook| dir.join(format!("{name}{}", hook.pin_suffix())))
}

/// The interface and hook of a link pin's file name (see [`link_pins`]), if it is one.
pub fn link_pin_of(file_name: &str) -> Option<(String, LinkHook)> {
    let (escaped, hook) = LinkHook::ALL
        .into_iter()
        .find_map(|hook| Some((file_name.strip_suffix(hook.pin_suffix())?, hook)))?;
    let iface = escaped.replace("%2e", ".").replace("%25", "%");
    (!iface.is_empty()).then_some((iface, hook))
}

/// Unpins an interface's links, which detaches the programs.
pub fn remove_links(instance: &Instance, iface: &str) -> Result<()> {
    for pin in link_pins(instance, iface) {
        match PinnedLink::from_pin(&pin) {
            Ok(link) => {
                link.unpin()
                    .with_context(|| format!("unpinning {}", pin.display()))?;
            }
            Err(_) if pin.exists() => {
                fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
            }
            Err(_) => {}
        }
    }
    Ok(())
}

/// An interface to attach the programs to.
#[derive(Clone, Debug)]
pub struct Target {
    pub iface: String,
    pub ifindex: u32,
    /// How a new XDP link attaches; an existing link keeps its mode.
    pub mode: AttachMode,
    /// How the frames XDP sends should leave it.
    pub transmit: TransmitChoice,
}

/// The mode to give an interface whose link was made in `recorded` (an existing link keeps its
/// mode), or `otherwise` when no lbctl recorded it.
pub fn link_mode(recorded: Option<XdpMode>, otherwise: AttachMode) -> AttachMode {
    match recorded {
        Some(XdpMode::Native) => AttachMode::Native,
        Some(XdpMode::Generic) => AttachMode::Generic,
        None => otherwise,
    }
}

/// How an interface ended up attached, to record in the state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub iface: String,
    /// `None` for an existing link whose mode no earlier lbctl recorded.
    pub xdp_mode: Option<XdpMode>,
    pub transmit: Transmit,
    /// Whether `transmit` was lbctl's choice rather than asked for.
    pub transmit_auto: bool,
}

/// What an install did, for the operator.
pub struct Installed {
    /// A line per interface.
    pub interfaces: Vec<String>,
    /// What became of the maps (see `layout::Plan::summary`).
    pub maps: String,
    /// Each interface that has the programs now, as attached.
    pub attached: Vec<Attached>,
}

/// How the frames XDP sends leave an interface, why, and a warning when the operator's choice
/// may lose them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransmitDecision {
    pub transmit: Transmit,
    pub why: String,
    pub warning: Option<String>,
}

/// The driver name of veth interfaces.
const VETH: &str = "veth";

/// Chooses how the frames XDP sends leave `iface`, attached in `mode` (`None`: unknown, taken
/// for native) with `driver`.
///
/// Native XDP transmission on a veth (XDP_TX, or a redirect into it) reaches the peer only
/// while the peer runs an XDP program: the kernel (`veth_xdp_flush`) wakes the peer's queue
/// only then, and a redirect needs the peer's NAPI. A generic-mode interface may lack the
/// driver's XDP transmit altogether (which is why it is generic), so what is redirected into it
/// must take its ordinary transmit path too. Everything else keeps the fast path.
pub fn decide_transmit(
    iface: &str,
    choice: TransmitChoice,
    mode: Option<XdpMode>,
    driver: &str,
) -> TransmitDecision {
    let veth_native = driver == VETH && mode != Some(XdpMode::Generic);
    let decision = |transmit, why: &str| TransmitDecision {
        transmit,
        why: why.to_owned(),
        warning: None,
    };
    match choice {
        TransmitChoice::Tc => decision(Transmit::Tc, "as asked"),
        TransmitChoice::Xdp => TransmitDecision {
            warning: veth_native.then(|| {
                format!(
                    "{iface} is a veth: the frames XDP sends into it reach its peer only while \
                     the peer runs an XDP program (the kernel wakes the peer's queue only then); \
                     without one they are never delivered. Leave out --transmit xdp (lbctl then \
                     sends them through TC) or attach an XDP program to the peer"
                )
            }),
            ..decision(Transmit::Xdp, "as asked")
        },
        TransmitChoice::Auto if veth_native => decision(
            Transmit::Tc,
            "a veth, whose peer takes XDP-sent frames only while it runs an XDP program",
        ),
        TransmitChoice::Auto if mode == Some(XdpMode::Generic) => decision(
            Transmit::Tc,
            "generic XDP: frames redirected to it need its ordinary transmit path",
        ),
        TransmitChoice::Auto => decision(Transmit::Xdp, "the driver's XDP transmit"),
    }
}

impl Installed {
    /// The report, its maps line ending with the flow table's size and the kernel memory the
    /// maps hold (`maps_memory`, bytes), which the flow table's size mostly decides.
    pub fn report(&self, capacity: FlowCapacity, maps_memory: u64) -> String {
        format!(
            "{}\n{} (flow table of {} flows, IPv6 {}; the maps hold {} of kernel memory)",
            self.interfaces.join("\n"),
            self.maps,
            capacity.ipv4,
            capacity.ipv6,
            super::megabytes(maps_memory)
        )
    }
}

/// Loads the object with its maps pinned at `pins` and has the kernel verify every program.
fn load_and_verify(pins: &[(&str, PathBuf)], capacity: FlowCapacity) -> Result<Ebpf> {
    let mut ebpf = dataplane::load_pinned(pins, capacity)?;
    xdp_program(&mut ebpf)?
        .load()
        .context("loading the XDP program (verifier)")?;
    for name in [program_names::TC_EGRESS, program_names::TC_INGRESS] {
        tc_program(&mut ebpf, name)?
            .load()
            .with_context(|| format!("loading the TC program {name} (verifier)"))?;
    }
    dataplane::load_ipv6_programs(&mut ebpf)?;
    Ok(ebpf)
}

/// Installs this build's programs on every attached interface of `state` whose links are
/// there, and on `new` (attached afresh, or in place if its links are there).
///
/// In order: the maps' plan (nothing changes when a pinned map cannot be used); the object
/// loaded and its programs verified; maps to migrate copied into their new layout and their
/// pins moved over the old ones, versions recorded; then the programs replaced on the attached
/// interfaces, what the old programs wrote meanwhile caught up, and `new` attached last, so
/// that its failure (another XDP program there) leaves the others consistent.
pub fn install(instance: &Instance, state: &State, new: Option<&Target>) -> Result<Installed> {
    let maps_dir = instance.maps_dir();
    let wanted = layout::expected(state.flow_tables())?;
    let plan = layout::plan(&maps_dir, &wanted)?;
    let staging = instance.pin_dir.join(STAGING_DIR);
    // Left by an interrupted migration: no program uses them (their pins move before a swap).
    dataplane::remove_pins(&staging)?;
    if plan.migrations().next().is_some() {
        instance::create_private_dir(&staging)?;
    }
    let pins: Vec<(&str, PathBuf)> = plan
        .steps
        .iter()
        .map(|(name, step)| {
            let dir = match step {
                Step::Migrate { .. } => &staging,
                Step::Reuse | Step::Create => &maps_dir,
            };
            (*name, dir.join(name))
        })
        .collect();
    let mut ebpf = match load_and_verify(&pins, state.flow_tables()) {
        Ok(ebpf) => ebpf,
        Err(err) => {
            // Loading pinned the maps this build adds: a refused build changes nothing.
            for (name, step) in &plan.steps {
                if matches!(step, Step::Create) {
                    let _ = fs::remove_file(maps_dir.join(name));
                }
            }
            dataplane::remove_pins(&staging)?;
            return Err(err);
        }
    };

    let (attached, mut lines) = live_attachments(instance, state, new);
    let migrations = migrate_maps(&plan, &maps_dir, &staging, &wanted)?;
    layout::record_versions(&maps_dir, &wanted)?;
    let mut maps = Maps::take(&mut ebpf)?;
    fill_maps(&mut maps, state, attached.iter().chain(new))?;

    let mut result = Vec::new();
    for target in &attached {
        let line = install_links(&mut ebpf, instance, target, &mut maps, &mut result)
            .with_context(|| {
                format!(
                    "replacing the programs on {}{}",
                    target.iface,
                    if migrations.is_empty() {
                        ""
                    } else {
                        " after the maps were migrated: run `lbctl upgrade` again"
                    }
                )
            })?;
        lines.push(line);
    }
    for migration in migrations {
        migration.catch_up()?;
    }
    dataplane::remove_pins(&staging)?;
    for name in &plan.dropped {
        let path = maps_dir.join(name);
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    if let Some(target) = new {
        let line = install_links(&mut ebpf, instance, target, &mut maps, &mut result)?;
        lines.push(line);
    }
    let socket_line = set_socket_lb(&mut ebpf, instance, state, &mut maps, !result.is_empty())?;
    if !socket_line.is_empty() {
        lines.push(socket_line);
    }
    Ok(Installed {
        interfaces: lines,
        maps: plan.summary(&wanted),
        attached: result,
    })
}

/// The interfaces of `state` that still have their links (other than `new`), as targets to
/// replace the programs of, and a line for each one whose links are gone.
fn live_attachments(
    instance: &Instance,
    state: &State,
    new: Option<&Target>,
) -> (Vec<Target>, Vec<String>) {
    let mut lines = Vec::new();
    let mut attached = Vec::new();
    for attachment in &state.attachments {
        if new.is_some_and(|n| n.iface == attachment.iface) {
            continue;
        }
        let current = instance::ifindex_of(instance, &attachment.iface).ok();
        let linked = link_pins(instance, &attachment.iface)
            .iter()
            .any(|pin| pin.exists());
        if current == Some(attachment.ifindex) && linked {
            attached.push(Target {
                iface: attachment.iface.clone(),
                ifindex: attachment.ifindex,
                mode: link_mode(attachment.xdp_mode, AttachMode::Auto),
                transmit: match attachment.transmit {
                    _ if attachment.transmit_auto => TransmitChoice::Auto,
                    Some(Transmit::Xdp) => TransmitChoice::Xdp,
                    Some(Transmit::Tc) => TransmitChoice::Tc,
                    None => TransmitChoice::Auto,
                },
            });
        } else {
            lines.push(format!(
                "{} in '{}' left alone: its links are gone (interface deleted or recreated?); \
                 `lbctl attach {}` attaches it again",
                attachment.iface, instance.name, attachment.iface
            ));
        }
    }
    (attached, lines)
}

/// Copies each map the plan migrates into its new layout (created under `staging` by the load)
/// and moves its pin over the old one. Returns the migrations, to catch up once the new
/// programs run.
fn migrate_maps(
    plan: &layout::Plan,
    maps_dir: &std::path::Path,
    staging: &std::path::Path,
    wanted: &BTreeMap<&'static str, layout::Layout>,
) -> Result<Vec<Migration>> {
    let mut migrations = Vec::new();
    for (name, from) in plan.migrations() {
        let open = |path: PathBuf| {
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
        };
        let old = open(maps_dir.join(name))?;
        let new_map = open(staging.join(name))?;
        migrations.push(Migration::copy(name, old, new_map, from, wanted[name])?);
    }
    for migration in &migrations {
        let (from, to) = (staging.join(migration.name), maps_dir.join(migration.name));
        fs::rename(&from, &to)
            .with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
    }
    Ok(migrations)
}

/// The maps' contents before the new programs run on `targets`: their interfaces in
/// `TX_PORTS`, the table's contents (a map this build adds, or grows, is filled before a
/// program reads it; the command's own reconcile repeats it afterwards) and the host's.
fn fill_maps<'a>(
    maps: &mut Maps,
    state: &State,
    targets: impl Iterator<Item = &'a Target> + Clone,
) -> Result<()> {
    for target in targets.clone() {
        maps.tx_ports
            .insert(target.ifindex, target.ifindex, None, 0)
            .with_context(|| format!("adding {} to TX_PORTS", target.iface))?;
    }
    let self_node = state.self_node()?;
    let desired = sync::desired(&state.table, self_node.map(|node| node.name.as_str()));
    maps.apply(&sync::delta(&desired, &maps.read_contents()?))?;
    let ifaces: Vec<&str> = targets.map(|target| target.iface.as_str()).collect();
    maps.sync_host(&ifaces, self_node.and_then(crate::table::Node::ipv4))?;
    Ok(())
}

/// Installs the socket programs of this object (with interfaces `attached` and socket load
/// balancing not turned off), or removes the instance's. Returns the line for the operator. A
/// failure to install them is a warning in that line, not an error: the interfaces balance
/// anyway, and the next `attach` tries again.
fn set_socket_lb(
    ebpf: &mut Ebpf,
    instance: &Instance,
    state: &State,
    maps: &mut Maps,
    attached: bool,
) -> Result<String> {
    if state.no_socket_lb || !attached {
        socket_lb::remove(instance)?;
        maps.set_socket_lb(0)?;
        return Ok(if state.no_socket_lb {
            "socket load balancing: off (--no-socket-lb): the node's own clients are not \
             balanced; `lbctl attach IFACE --socket-lb` turns it on"
                .to_owned()
        } else {
            String::new()
        });
    }
    let installed = socket_lb::netns_cookie()
        .and_then(|cookie| maps.set_socket_lb(cookie))
        .and_then(|()| socket_lb::install(ebpf, instance));
    Ok(match installed {
        Ok(()) => "socket load balancing: the node's own clients of 127.0.0.1, its addresses and \
                   VIPs (cgroup v2 root)"
            .to_owned(),
        Err(err) => {
            maps.set_socket_lb(0)?;
            socket_lb::remove(instance)?;
            format!(
                "warning: socket load balancing not set up, the node's own clients are not \
                 balanced: {err:#}"
            )
        }
    })
}

/// Records in `TX_VIA_TC` whether the frames XDP sends to `target` go through TC, with a fresh
/// cookie (a note left in flight under the old one is passed to the kernel, which drops it as
/// addressed elsewhere: at most the few frames of this instant).
fn set_transmit(maps: &mut Maps, target: &Target, transmit: Transmit) -> Result<()> {
    match transmit {
        Transmit::Tc => maps
            .tx_via_tc
            .insert(target.ifindex, dataplane::random_cookie()?, 0)
            .with_context(|| format!("adding {} to TX_VIA_TC", target.iface)),
        Transmit::Xdp if maps.tx_via_tc.get(&target.ifindex, 0).is_ok() => maps
            .tx_via_tc
            .remove(&target.ifindex)
            .with_context(|| format!("removing {} from TX_VIA_TC", target.iface)),
        Transmit::Xdp => Ok(()),
    }
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    Ok(ebpf
        .program_mut(program_names::XDP_INGRESS)
        .ok_or_else(|| anyhow!("object has no XDP program"))?
        .try_into()?)
}

fn tc_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("object has no TC program {name}"))?
        .try_into()?)
}

/// How one link of an interface got its program.
enum Linked {
    /// A new link, pinned.
    Attached,
    /// The pinned link's program replaced: from this program id to that one.
    Replaced(u32, u32),
}

/// Gives `target`'s XDP, TC egress and TC ingress links this object's programs: replaced in
/// place where the link is pinned, a new link otherwise (new links are removed again if another
/// one fails); then sets how the frames XDP sends leave it, and notes that in `attached`.
fn install_links(
    ebpf: &mut Ebpf,
    instance: &Instance,
    target: &Target,
    maps: &mut Maps,
    attached: &mut Vec<Attached>,
) -> Result<String> {
    let [xdp_pin, tc_pin, tc_ingress_pin] = link_pins(instance, &target.iface);
    let fresh = !xdp_pin.exists() && !tc_pin.exists() && !tc_ingress_pin.exists();
    let result = (|| -> Result<(String, Attached)> {
        let xdp = xdp_program(ebpf)?;
        let (xdp_linked, mode) = if xdp_pin.exists() {
            let (link, old) = pinned(&xdp_pin)?;
            let id = xdp
                .attach_to_link(XdpLink::try_from(link)?)
                .context("replacing the XDP program (BPF_LINK_UPDATE)")?;
            // Our descriptor only: the pin keeps the link.
            drop(xdp.take_link(id)?);
            let mode = match target.mode {
                AttachMode::Native => Some(XdpMode::Native),
                AttachMode::Generic => Some(XdpMode::Generic),
                AttachMode::Auto => None,
            };
            (Linked::Replaced(old, xdp.info()?.id()), mode)
        } else {
            let attempt = |xdp: &mut Xdp, mode| xdp.attach(&target.iface, mode);
            let (link_id, mode) = match target.mode {
                AttachMode::Native => {
                    attempt(xdp, LinkMode::Driver).map(|id| (id, XdpMode::Native))
                }
                AttachMode::Generic => attempt(xdp, LinkMode::Skb).map(|id| (id, XdpMode::Generic)),
                AttachMode::Auto => attempt(xdp, LinkMode::Driver)
                    .map(|id| (id, XdpMode::Native))
                    .or_else(|_| attempt(xdp, LinkMode::Skb).map(|id| (id, XdpMode::Generic))),
            }
            .with_context(|| {
                format!(
                    "attaching XDP to {} (is another XDP program attached?)",
                    target.iface
                )
            })?;
            let link: FdLink = xdp.take_link(link_id)?.try_into()?;
            link.pin(&xdp_pin)
                .with_context(|| format!("pinning {}", xdp_pin.display()))?;
            (Linked::Attached, Some(mode))
        };
        let tc_linked = tc_link(
            ebpf,
            program_names::TC_EGRESS,
            TcAttachType::Egress,
            target,
            &tc_pin,
        )?;
        let tc_ingress_linked = tc_link(
            ebpf,
            program_names::TC_INGRESS,
            TcAttachType::Ingress,
            target,
            &tc_ingress_pin,
        )?;
        let driver = netdev::driver(&target.iface).unwrap_or_default();
        let decision = decide_transmit(&target.iface, target.transmit, mode, &driver);
        set_transmit(maps, target, decision.transmit)?;
        let mut line = describe(
            instance,
            target,
            mode,
            &decision,
            [&xdp_linked, &tc_linked, &tc_ingress_linked],
        );
        if let Some(warning) = &decision.warning {
            line.push_str(&format!("\nwarning: {warning}"));
        }
        if driver == "bridge" {
            line.push_str(&format!(
                "\nwarning: {} is a bridge: XDP sees its ports' frames as their senders made \
                 them, and cannot tell a checksum left to offload (a container's default) from a \
                 whole one; containers on it that call services must send whole checksums \
                 (`ethtool -K eth0 tx off` in each)",
                target.iface
            ));
        }
        Ok((
            line,
            Attached {
                iface: target.iface.clone(),
                xdp_mode: mode,
                transmit: decision.transmit,
                transmit_auto: target.transmit == TransmitChoice::Auto,
            },
        ))
    })();
    match result {
        Ok((line, done)) => {
            attached.push(done);
            Ok(line)
        }
        Err(err) => {
            if fresh {
                let _ = remove_links(instance, &target.iface);
            }
            Err(err)
        }
    }
}

/// Gives the TC link of `name` at `pin` this object's program: replaced in place, or a new link
/// of `kind` on `target`, pinned.
fn tc_link(
    ebpf: &mut Ebpf,
    name: &str,
    kind: TcAttachType,
    target: &Target,
    pin: &std::path::Path,
) -> Result<Linked> {
    let tc = tc_program(ebpf, name)?;
    if pin.exists() {
        let (link, old) = pinned(pin)?;
        let id = tc
            .attach_to_link(SchedClassifierLink::try_from(link)?)
            .with_context(|| format!("replacing the TC program {name} (BPF_LINK_UPDATE)"))?;
        drop(tc.take_link(id)?);
        return Ok(Linked::Replaced(old, tc.info()?.id()));
    }
    let link_id = tc
        .attach(&target.iface, kind)
        .with_context(|| format!("attaching TC {kind:?} to {}", target.iface))?;
    let link: FdLink = tc.take_link(link_id)?.try_into()?;
    link.pin(pin)
        .with_context(|| format!("pinning {}", pin.display()))?;
    Ok(Linked::Attached)
}

/// A pinned link (the pin stays) and the id of its program.
fn pinned(pin: &std::path::Path) -> Result<(FdLink, u32)> {
    let link = FdLink::from(
        PinnedLink::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?,
    );
    let program = link
        .info()
        .with_context(|| format!("reading {}", pin.display()))?
        .program_id();
    Ok((link, program))
}

/// The line `attach` and `upgrade` print for an interface: its XDP mode, how the frames XDP
/// sends leave it and why, and what became of each link.
fn describe(
    instance: &Instance,
    target: &Target,
    mode: Option<XdpMode>,
    transmit: &TransmitDecision,
    links: [&Linked; 3],
) -> String {
    let mode = match mode {
        Some(mode) => format!("{} XDP", mode.name()),
        None => "XDP (mode not recorded by the lbctl that attached it)".to_owned(),
    };
    let sends = match transmit.transmit {
        Transmit::Xdp => "XDP sends its frames itself",
        Transmit::Tc => "XDP hands its frames to TC ingress to send",
    };
    let how = format!("{mode} + TC egress + TC ingress; {sends}: {}", transmit.why);
    if links.iter().all(|l| matches!(l, Linked::Attached)) {
        return format!(
            "attached to {} in '{}' ({how})",
            target.iface, instance.name
        );
    }
    let one = |what: &str, linked: &Linked| match linked {
        Linked::Attached => format!("{what} attached"),
        Linked::Replaced(old, new) => format!("{what} program {old} → {new}"),
    };
    format!(
        "programs on {} in '{}' replaced in place ({}, {}, {}; {how})",
        target.iface,
        instance.name,
        one("XDP", links[0]),
        one("TC egress", links[1]),
        one("TC ingress", links[2]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_veth_sends_through_tc_unless_told_otherwise_with_a_warning() {
        let native = Some(XdpMode::Native);
        let auto = decide_transmit("eth0", TransmitChoice::Auto, native, "veth");
        assert_eq!(auto.transmit, Transmit::Tc);
        assert!(auto.why.contains("veth") && auto.warning.is_none());
        let unknown = decide_transmit("eth0", TransmitChoice::Auto, None, "veth");
        assert_eq!(
            unknown.transmit,
            Transmit::Tc,
            "an unrecorded mode is taken for native"
        );
        let forced = decide_transmit("eth0", TransmitChoice::Xdp, native, "veth");
        assert_eq!(forced.transmit, Transmit::Xdp);
        let warning = forced.warning.unwrap();
        assert!(warning.contains("eth0 is a veth") && warning.contains("--transmit xdp"));
    }

    #[test]
    fn a_nic_keeps_the_fast_path_and_generic_mode_sends_through_tc() {
        let nic = decide_transmit(
            "ens1",
            TransmitChoice::Auto,
            Some(XdpMode::Native),
            "mlx5_core",
        );
        assert_eq!((nic.transmit, nic.warning), (Transmit::Xdp, None));
        for driver in ["mlx5_core", "veth", "bridge"] {
            let generic =
                decide_transmit("x", TransmitChoice::Auto, Some(XdpMode::Generic), driver);
            assert_eq!(
                (generic.transmit, generic.warning),
                (Transmit::Tc, None),
                "{driver}"
            );
        }
        let asked = decide_transmit("ens1", TransmitChoice::Tc, Some(XdpMode::Native), "ixgbe");
        assert_eq!(asked.transmit, Transmit::Tc);
        let generic_veth =
            decide_transmit("v", TransmitChoice::Xdp, Some(XdpMode::Generic), "veth");
        assert_eq!(
            generic_veth.warning, None,
            "generic XDP_TX takes the skb path"
        );
    }

    #[test]
    fn link_pins_name_their_interface_and_hook() {
        let instance = crate::instance::locate("n1", None, None).unwrap();
        for iface in ["eth0", "eth0.100", "a%2e", "%.", "x_tc", "x_tcin", "y_xdp"] {
            for (pin, hook) in link_pins(&instance, iface).into_iter().zip(LinkHook::ALL) {
                let name = pin.file_name().unwrap().to_str().unwrap();
                assert!(!name.contains('.'), "{name}");
                assert_eq!(link_pin_of(name), Some((iface.to_owned(), hook)));
            }
        }
        for not_a_link in ["FLOWS", "_xdp", "_tcin", "eth0_xdp2", "state"] {
            assert_eq!(link_pin_of(not_a_link), None, "{not_a_link}");
        }
    }
}
