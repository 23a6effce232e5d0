//! Reading what CNI made in the pod's network namespace, over rtnetlink:
//! the interface (name, index, MAC, MTU, addresses), the routes through it
//! and its permanent neighbour entries. Routes the kernel derives from an
//! address (protocol `kernel`) and IPv6 link-local state are left out: the
//! guest's kernel makes its own when the addresses are set.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context, Result};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use super::{Interface, Neighbor, PodNetwork, Route, MAX_INTERFACES, TAP_NAME};

/// Reads the pod's network through `handle` (a connection made in the
/// pod's namespace).
pub async fn pod_network(handle: &Handle) -> Result<PodNetwork> {
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .context("cannot list the links")?;
    let mut candidates = Vec::new();
    for link in &links {
        if link.header.flags.contains(LinkFlags::Loopback) {
            continue;
        }
        let name = link_name(link);
        if name == TAP_NAME {
            // Ours, left from a shim that died before its teardown.
            continue;
        }
        let Some(mac) = link_mac(link) else { continue };
        let mtu = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(mtu) => Some(*mtu),
                _ => None,
            })
            .unwrap_or(1500);
        candidates.push(Interface {
            name,
            index: link.header.index,
            mac,
            mtu,
            addresses: Vec::new(),
        });
    }
    match candidates.len() {
        0 => bail!("the pod's network namespace has no Ethernet interface (did CNI run?)"),
        n if n > MAX_INTERFACES => bail!(
            "the pod's network namespace has {n} interfaces ({}); husk carries {MAX_INTERFACES} into the VM",
            candidates
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => {}
    }
    let mut interface = candidates.remove(0);
    let addresses: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(interface.index)
        .execute()
        .try_collect()
        .await
        .context("cannot list the addresses")?;
    for message in addresses {
        if message.header.index != interface.index {
            continue;
        }
        let address = message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        match address {
            Some(IpAddr::V6(v6)) if is_ipv6_link_local(&v6) => {}
            Some(ip) => interface.addresses.push((ip, message.header.prefix_len)),
            None => {}
        }
    }
    let mut routes = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let request = match version {
            IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let messages: Vec<RouteMessage> = handle
            .route()
            .get(request)
            .execute()
            .try_collect()
            .await
            .context("cannot list the routes")?;
        for message in messages {
            if let Some(route) = route_of(&message, interface.index) {
                routes.push(route);
            }
        }
    }
    // Link routes first: a gateway must be reachable when its route is added.
    routes.sort_by_key(|route| route.gateway.is_some());
    let neighbours: Vec<_> = handle
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .context("cannot list the neighbours")?;
    let mut neighbors = Vec::new();
    for message in neighbours {
        if message.header.ifindex != interface.index
            || message.header.state != NeighbourState::Permanent
        {
            continue;
        }
        let ip = message.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
            _ => None,
        });
        let mac = message.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(bytes) => <[u8; 6]>::try_from(&bytes[..]).ok(),
            _ => None,
        });
        if let (Some(ip), Some(mac)) = (ip, mac) {
            neighbors.push(Neighbor { ip, mac });
        }
    }
    Ok(PodNetwork {
        interface,
        routes,
        neighbors,
    })
}

/// The name of `link`.
pub fn link_name(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn link_mac(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(&bytes[..]).ok(),
        _ => None,
    })
}

fn is_ipv6_link_local(ip: &Ipv6Addr) -> bool {
    (ip.segments()[0] & 0xffc0) == 0xfe80
}

fn route_address(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The route `message` describes, if it goes through interface `index`
/// of the main table and is not one the kernel derives.
fn route_of(message: &RouteMessage, index: u32) -> Option<Route> {
    let mut oif = None;
    let mut table = u32::from(message.header.table);
    let (mut destination, mut gateway, mut source) = (None, None, None);
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => destination = route_address(a),
            RouteAttribute::Gateway(a) => gateway = route_address(a),
            RouteAttribute::PrefSource(a) => source = route_address(a),
            _ => {}
        }
    }
    const MAIN_TABLE: u32 = 254;
    if oif != Some(index) || table != MAIN_TABLE || message.header.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    if let Some(IpAddr::V6(v6)) = destination {
        if is_ipv6_link_local(&v6) || v6.is_multicast() {
            return None;
        }
    }
    Some(Route {
        destination: destination.map(|ip| (ip, message.header.destination_prefix_length)),
        ipv6: message.header.address_family == rtnetlink::packet_route::AddressFamily::Inet6,
        gateway,
        source,
        scope: u8::from(message.header.scope),
    })
}
