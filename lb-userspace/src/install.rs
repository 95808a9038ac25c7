//! Installing this build's programs on an instance's interfaces. An interface without links
//! gets new ones (pinned); an attached interface keeps its links and has their programs
//! replaced in place (`BPF_LINK_UPDATE`), so that no packet ever meets no program. The new
//! programs use the pinned maps, kept or migrated (see `layout`), so flows, counters and round-
//! robin cursors carry over. An instance runs one build: every install replaces the programs
//! on all its attached interfaces.
use std::{fs, path::PathBuf};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    maps::MapData,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use lb_common::program_names;

use crate::{
    commands::AttachMode,
    datapath::{self, Maps},
    instance::{self, Instance},
    layout::{self, Step},
    migrate::Migration,
    state::State,
};

/// Where the maps being migrated are created and filled, under the instance's pin folder,
/// before their pins replace the old ones. bpffs refuses names with a '.'.
pub const STAGING_DIR: &str = "migrating";

/// The two links of an attached interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkHook {
    Xdp,
    Tc,
}

impl LinkHook {
    /// Ends the name of the link's pin.
    fn pin_suffix(self) -> &'static str {
        match self {
            Self::Xdp => "_xdp",
            Self::Tc => "_tc",
        }
    }
}

/// Pin paths of an interface's XDP and TC links. bpffs refuses names with a '.', which
/// interface names (VLANs: `eth0.100`) may contain, so it is escaped.
pub fn link_pins(instance: &Instance, iface: &str) -> [PathBuf; 2] {
    let dir = instance.links_dir();
    let name = iface.replace('%', "%25").replace('.', "%2e");
    [LinkHook::Xdp, LinkHook::Tc].map(|hook| dir.join(format!("{name}{}", hook.pin_suffix())))
}

/// The interface and hook of a link pin's file name (see [`link_pins`]), if it is one.
pub fn link_pin_of(file_name: &str) -> Option<(String, LinkHook)> {
    let (escaped, hook) = [LinkHook::Xdp, LinkHook::Tc]
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
}

/// What an install did, for the operator.
pub struct Installed {
    /// A line per interface.
    pub interfaces: Vec<String>,
    /// What became of the maps (see `layout::Plan::summary`).
    pub maps: String,
}

impl Installed {
    /// The report, its maps line ending with the flow table's size and the kernel memory the
    /// maps hold (`maps_memory`, bytes), which the flow table's size mostly decides.
    pub fn report(&self, flow_capacity: u32, maps_memory: u64) -> String {
        format!(
            "{}\n{} (flow table of {flow_capacity} flows; the maps hold {} of kernel memory)",
            self.interfaces.join("\n"),
            self.maps,
            crate::instances::megabytes(maps_memory)
        )
    }
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
    let wanted = layout::expected(state.flow_capacity)?;
    let plan = layout::plan(&maps_dir, &wanted)?;
    let staging = instance.pin_dir.join(STAGING_DIR);
    // Left by an interrupted migration: no program uses them (their pins move before a swap).
    datapath::remove_pins(&staging)?;
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
    let mut ebpf = datapath::load_pinned(&pins, state.flow_capacity)?;
    xdp_program(&mut ebpf)?
        .load()
        .context("loading the XDP program (verifier)")?;
    tc_program(&mut ebpf)?
        .load()
        .context("loading the TC program (verifier)")?;

    let mut lines = Vec::new();
    let mut attached = Vec::new();
    for attachment in &state.attachments {
        if new.is_some_and(|n| n.iface == attachment.iface) {
            continue;
        }
        let current = crate::commands::ifindex_of(instance, &attachment.iface).ok();
        let linked = link_pins(instance, &attachment.iface)
            .iter()
            .any(|pin| pin.exists());
        if current == Some(attachment.ifindex) && linked {
            attached.push(Target {
                iface: attachment.iface.clone(),
                ifindex: attachment.ifindex,
                mode: AttachMode::Auto,
            });
        } else {
            lines.push(format!(
                "{} in '{}' left alone: its links are gone (interface deleted or recreated?); \
                 `lbctl attach {}` attaches it again",
                attachment.iface, instance.name, attachment.iface
            ));
        }
    }

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
    layout::record_versions(&maps_dir, &wanted)?;
    let mut maps = Maps::take(&mut ebpf)?;
    for target in attached.iter().chain(new) {
        maps.tx_ports
            .insert(target.ifindex, target.ifindex, None, 0)
            .with_context(|| format!("adding {} to TX_PORTS", target.iface))?;
    }

    for target in &attached {
        let line = install_links(&mut ebpf, instance, target).with_context(|| {
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
    datapath::remove_pins(&staging)?;
    for name in &plan.dropped {
        let path = maps_dir.join(name);
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    if let Some(target) = new {
        let line = install_links(&mut ebpf, instance, target)?;
        lines.push(line);
    }
    Ok(Installed {
        interfaces: lines,
        maps: plan.summary(&wanted),
    })
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    Ok(ebpf
        .program_mut(program_names::XDP_INGRESS)
        .ok_or_else(|| anyhow!("object has no XDP program"))?
        .try_into()?)
}

fn tc_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    Ok(ebpf
        .program_mut(program_names::TC_EGRESS)
        .ok_or_else(|| anyhow!("object has no TC program"))?
        .try_into()?)
}

/// How one link of an interface got its program.
enum Linked {
    /// A new link, pinned.
    Attached,
    /// The pinned link's program replaced: from this program id to that one.
    Replaced(u32, u32),
}

/// Gives `target`'s XDP and TC links this object's programs: replaced in place where the link
/// is pinned, a new link otherwise (new links are removed again if the other one fails).
fn install_links(ebpf: &mut Ebpf, instance: &Instance, target: &Target) -> Result<String> {
    let [xdp_pin, tc_pin] = link_pins(instance, &target.iface);
    let fresh = !xdp_pin.exists() && !tc_pin.exists();
    let result = (|| -> Result<String> {
        let xdp = xdp_program(ebpf)?;
        let xdp_linked = if xdp_pin.exists() {
            let (link, old) = pinned(&xdp_pin)?;
            let id = xdp
                .attach_to_link(XdpLink::try_from(link)?)
                .context("replacing the XDP program (BPF_LINK_UPDATE)")?;
            // Our descriptor only: the pin keeps the link.
            drop(xdp.take_link(id)?);
            Linked::Replaced(old, xdp.info()?.id())
        } else {
            let attempt = |xdp: &mut Xdp, mode| xdp.attach(&target.iface, mode);
            let link_id = match target.mode {
                AttachMode::Native => attempt(xdp, XdpMode::Driver),
                AttachMode::Generic => attempt(xdp, XdpMode::Skb),
                AttachMode::Auto => {
                    attempt(xdp, XdpMode::Driver).or_else(|_| attempt(xdp, XdpMode::Skb))
                }
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
            Linked::Attached
        };
        let tc = tc_program(ebpf)?;
        let tc_linked = if tc_pin.exists() {
            let (link, old) = pinned(&tc_pin)?;
            let id = tc
                .attach_to_link(SchedClassifierLink::try_from(link)?)
                .context("replacing the TC program (BPF_LINK_UPDATE)")?;
            drop(tc.take_link(id)?);
            Linked::Replaced(old, tc.info()?.id())
        } else {
            let link_id = tc
                .attach(&target.iface, TcAttachType::Egress)
                .with_context(|| format!("attaching TC egress to {}", target.iface))?;
            let link: FdLink = tc.take_link(link_id)?.try_into()?;
            link.pin(&tc_pin)
                .with_context(|| format!("pinning {}", tc_pin.display()))?;
            Linked::Attached
        };
        Ok(describe(instance, target, &xdp_linked, &tc_linked))
    })();
    if result.is_err() && fresh {
        let _ = remove_links(instance, &target.iface);
    }
    result
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

fn describe(instance: &Instance, target: &Target, xdp: &Linked, tc: &Linked) -> String {
    match (xdp, tc) {
        (Linked::Attached, Linked::Attached) => {
            let mode = match target.mode {
                AttachMode::Native => "native XDP",
                AttachMode::Generic => "generic XDP",
                AttachMode::Auto => "native XDP, or generic where the driver lacks it",
            };
            format!(
                "attached to {} in '{}' ({mode} + TC egress)",
                target.iface, instance.name
            )
        }
        _ => {
            let one = |what: &str, linked: &Linked| match linked {
                Linked::Attached => format!("{what} attached"),
                Linked::Replaced(old, new) => format!("{what} program {old} → {new}"),
            };
            format!(
                "programs on {} in '{}' replaced in place ({}, {})",
                target.iface,
                instance.name,
                one("XDP", xdp),
                one("TC", tc)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pins_name_their_interface_and_hook() {
        let instance = crate::instance::locate("n1", None, None).unwrap();
        for iface in ["eth0", "eth0.100", "a%2e", "%.", "x_tc"] {
            let [xdp, tc] = link_pins(&instance, iface);
            for (pin, hook) in [(xdp, LinkHook::Xdp), (tc, LinkHook::Tc)] {
                let name = pin.file_name().unwrap().to_str().unwrap();
                assert!(!name.contains('.'), "{name}");
                assert_eq!(link_pin_of(name), Some((iface.to_owned(), hook)));
            }
        }
        for not_a_link in ["FLOWS", "_xdp", "eth0_xdp2", "state"] {
            assert_eq!(link_pin_of(not_a_link), None, "{not_a_link}");
        }
    }
}
