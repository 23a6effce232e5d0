//! The pod's network, carried into its VM (Kata's `tcfilter` model).
//!
//! CNI gives a CRI pod a network namespace holding one veth end with the
//! pod's addresses and routes. Before the VM starts, the shim reads that
//! interface (`discover`), creates a TAP in the same namespace and has tc
//! ingress filters mirror every frame between veth and TAP (`mirror`); the
//! TAP becomes the VM's virtio-net device, whose guest NIC has the veth's
//! MAC, so the bridge on the host keeps learning the address it knows.
//! After the pod's sandbox container exists in the guest, the agent moves
//! that NIC into the pod's namespace there and gives it the name,
//! addresses, MTU, routes and neighbours read here
//! ([`Attachment::agent_request`]). Teardown removes the filters and the
//! TAP. All namespace work runs on short-lived threads of its own
//! (`netns`), through an fd of the namespace opened once. CRI
//! port-forward, which containerd serves by dialling localhost in that
//! namespace, is carried into the guest by `port_forward`.

mod discover;
mod mirror;
pub mod netns;
pub mod port_forward;
mod sk_lookup;

use std::fs::File;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};
use husk_devices::net::{NetConfig, Tap};
use husk_protocols::agent::{
    ConfigureNetworkRequest, IpAddress, Neighbor as AgentNeighbor, NetworkInterface,
    Route as AgentRoute,
};

/// The TAP the shim creates in the pod's network namespace.
pub const TAP_NAME: &str = "tap0_husk";
/// How many CNI interfaces a pod may have: one VM NIC is made per pod.
pub const MAX_INTERFACES: usize = 1;

/// The interface CNI made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub addresses: Vec<(IpAddr, u8)>,
}

/// A route through the interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `None` for a default route.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub source: Option<IpAddr>,
    pub scope: u8,
    pub ipv6: bool,
}

/// A permanent neighbour entry of the interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbor {
    pub ip: IpAddr,
    pub mac: [u8; 6],
}

/// What CNI made in the pod's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    pub interface: Interface,
    pub routes: Vec<Route>,
    pub neighbors: Vec<Neighbor>,
}

/// The pod's network attached to a TAP in its namespace. Dropping it (or
/// [`Attachment::detach`]) removes the filters and the TAP.
pub struct Attachment {
    netns: File,
    network: PodNetwork,
    tap_index: u32,
    tap: Option<Tap>,
    detached: bool,
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Attachment {
    /// Opens the network namespace at `netns_path` (CRI's, from the sandbox
    /// spec), reads CNI's interface, and creates and mirrors the TAP.
    pub fn attach(netns_path: &Path) -> Result<Self> {
        let netns = File::open(netns_path).with_context(|| {
            format!(
                "cannot open the pod's network namespace {}",
                netns_path.display()
            )
        })?;
        let network = netns::with_netlink(&netns, "read the pod's network", |handle| async move {
            discover::pod_network(&handle).await
        })?;
        let tap = netns::run_in(&netns, "create the pod's TAP", || {
            Tap::open(TAP_NAME).map_err(anyhow::Error::from)
        })?;
        let mut attachment = Self {
            netns,
            network,
            tap_index: 0,
            tap: Some(tap),
            detached: false,
        };
        let (veth, mtu) = (
            attachment.network.interface.index,
            attachment.network.interface.mtu,
        );
        match netns::with_netlink(
            &attachment.netns,
            "mirror the pod's interface to the TAP",
            move |handle| async move { mirror::set_up(&handle, veth, mtu).await },
        ) {
            Ok(tap_index) => attachment.tap_index = tap_index,
            Err(error) => {
                attachment.detach_quietly();
                return Err(error);
            }
        }
        tracing::info!(
            interface = %attachment.network.interface.name,
            mac = %mac_text(&attachment.network.interface.mac),
            mtu,
            addresses = ?attachment.network.interface.addresses,
            routes = attachment.network.routes.len(),
            "the pod's network is mirrored to {TAP_NAME}"
        );
        Ok(attachment)
    }

    /// What CNI made.
    pub fn network(&self) -> &PodNetwork {
        &self.network
    }

    /// The TAP, for the VM's virtio-net device (once).
    pub fn take_tap(&mut self) -> Option<Tap> {
        self.tap.take()
    }

    /// The guest NIC: the veth's MAC and MTU.
    pub fn net_config(&self) -> NetConfig {
        NetConfig {
            mac: self.network.interface.mac,
            mtu: u16::try_from(self.network.interface.mtu).unwrap_or(u16::MAX),
        }
    }

    /// What the agent needs to configure the guest side.
    pub fn agent_request(&self) -> ConfigureNetworkRequest {
        let interface = &self.network.interface;
        let address_of = |(ip, prefix): &(IpAddr, u8)| IpAddress {
            address: ip.to_string(),
            prefix_len: u32::from(*prefix),
            ..Default::default()
        };
        ConfigureNetworkRequest {
            interfaces: vec![NetworkInterface {
                name: interface.name.clone(),
                mac: mac_text(&interface.mac),
                mtu: interface.mtu,
                addresses: interface.addresses.iter().map(address_of).collect(),
                ..Default::default()
            }],
            routes: self
                .network
                .routes
                .iter()
                .map(|route| AgentRoute {
                    destination: match route.destination {
                        Some((ip, prefix)) => format!("{ip}/{prefix}"),
                        None if route.ipv6 => "::/0".into(),
                        None => String::new(),
                    },
                    gateway: route.gateway.map(|ip| ip.to_string()).unwrap_or_default(),
                    device: interface.name.clone(),
                    source: route.source.map(|ip| ip.to_string()).unwrap_or_default(),
                    scope: u32::from(route.scope),
                    ..Default::default()
                })
                .collect(),
            neighbors: self
                .network
                .neighbors
                .iter()
                .map(|neighbor| AgentNeighbor {
                    ip: neighbor.ip.to_string(),
                    mac: mac_text(&neighbor.mac),
                    device: interface.name.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Removes the filters and the TAP from the pod's namespace.
    pub fn detach(mut self) -> Result<()> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<()> {
        if self.detached {
            return Ok(());
        }
        self.detached = true;
        // The TAP goes with its last fd; the VM's device holds one until
        // the VM is stopped, which comes before this.
        self.tap = None;
        let veth = self.network.interface.index;
        netns::with_netlink(
            &self.netns,
            "remove the pod's TAP mirroring",
            move |handle| async move { mirror::tear_down(&handle, veth).await },
        )
    }

    fn detach_quietly(&mut self) {
        if let Err(error) = self.detach_inner() {
            tracing::warn!(error = %format!("{error:#}"), "cannot undo the pod's network attachment");
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.detach_quietly();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_request_carries_the_interface_routes_and_neighbours() {
        let network = PodNetwork {
            interface: Interface {
                name: "eth0".into(),
                index: 3,
                mac: [0x0a, 0x58, 0x0a, 0xd5, 0, 5],
                mtu: 1450,
                addresses: vec![("10.213.0.5".parse().unwrap(), 24)],
            },
            routes: vec![
                Route {
                    destination: None,
                    gateway: Some("10.213.0.1".parse().unwrap()),
                    source: None,
                    scope: 0,
                    ipv6: false,
                },
                Route {
                    destination: None,
                    gateway: Some("fd00::1".parse().unwrap()),
                    source: None,
                    scope: 0,
                    ipv6: true,
                },
            ],
            neighbors: vec![Neighbor {
                ip: "10.213.0.1".parse().unwrap(),
                mac: [2, 0, 0, 0, 0, 1],
            }],
        };
        let attachment = Attachment {
            netns: File::open("/proc/self/ns/net").unwrap(),
            network,
            tap_index: 0,
            tap: None,
            detached: true,
        };
        let request = attachment.agent_request();
        let interface = &request.interfaces[0];
        assert_eq!(
            (
                interface.name.as_str(),
                interface.mac.as_str(),
                interface.mtu
            ),
            ("eth0", "0a:58:0a:d5:00:05", 1450)
        );
        assert_eq!(interface.addresses[0].address, "10.213.0.5");
        assert_eq!(interface.addresses[0].prefix_len, 24);
        let destinations: Vec<&str> = request
            .routes
            .iter()
            .map(|r| r.destination.as_str())
            .collect();
        assert_eq!(destinations, vec!["", "::/0"]);
        assert_eq!(request.routes[0].gateway, "10.213.0.1");
        assert_eq!(request.neighbors[0].mac, "02:00:00:00:00:01");
        assert_eq!(attachment.net_config().mtu, 1450);
    }
}
