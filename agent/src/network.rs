//! The guest side of the pod's network (`ConfigureNetwork`): the host
//! names each interface by the MAC of the NIC that carries it; the agent
//! finds that NIC in its own (the guest's root) network namespace, moves
//! it into the pod's network namespace (the sandbox container's, where
//! every container of the pod lives), and there names it, sets its MTU,
//! brings it and loopback up, and adds the addresses, routes and
//! neighbours. Everything the host sent is validated first; the work in
//! the pod's namespace runs on a thread of its own that joins it, so the
//! agent's other threads never change namespace.

use std::future::Future;
use std::net::IpAddr;
use std::os::fd::AsFd;

use futures_util::TryStreamExt;
use husk_protocols::agent::{ConfigureNetworkRequest, Neighbor, NetworkInterface, Route};
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::error::{AgentError, Result};

/// Most interfaces, routes and neighbours one request may carry.
pub const MAX_INTERFACES: usize = 8;
pub const MAX_ROUTES: usize = 256;
pub const MAX_NEIGHBORS: usize = 256;

/// A request checked and parsed.
struct Plan {
    interfaces: Vec<PlannedInterface>,
    routes: Vec<PlannedRoute>,
    neighbors: Vec<(IpAddr, [u8; 6], String)>,
}

struct PlannedInterface {
    name: String,
    mac: [u8; 6],
    mtu: u32,
    addresses: Vec<(IpAddr, u8)>,
}

struct PlannedRoute {
    destination: Option<(IpAddr, u8)>,
    ipv6: bool,
    gateway: Option<IpAddr>,
    source: Option<IpAddr>,
    device: String,
    scope: u8,
}

fn invalid(what: String) -> AgentError {
    AgentError::InvalidRequest(what)
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> AgentError {
    let what = what.into();
    move |error| AgentError::Unsatisfiable {
        what,
        why: error.to_string(),
    }
}

fn parse_mac(text: &str, field: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    let bytes: Option<Vec<u8>> = parts
        .iter()
        .map(|part| {
            (part.len() == 2)
                .then(|| u8::from_str_radix(part, 16).ok())
                .flatten()
        })
        .collect();
    match bytes {
        Some(bytes) if bytes.len() == 6 => Ok(bytes.try_into().expect("six bytes")),
        _ => Err(invalid(format!("{field} {text:?} is not a MAC address"))),
    }
}

fn parse_ip(text: &str, field: &str) -> Result<IpAddr> {
    text.parse()
        .map_err(|_| invalid(format!("{field} {text:?} is not an IP address")))
}

fn check_prefix(ip: &IpAddr, prefix: u32, field: &str) -> Result<u8> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(invalid(format!("{field} prefix /{prefix} is above /{max}")));
    }
    Ok(prefix as u8)
}

fn check_name(name: &str, field: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{field} {name:?} is not an interface name (1 to 15 of letters, digits, '-', '_', '.')"
        )))
    }
}

fn plan(request: &ConfigureNetworkRequest) -> Result<Plan> {
    for (what, count, max) in [
        ("interfaces", request.interfaces.len(), MAX_INTERFACES),
        ("routes", request.routes.len(), MAX_ROUTES),
        ("neighbors", request.neighbors.len(), MAX_NEIGHBORS),
    ] {
        if count > max {
            return Err(invalid(format!(
                "{count} {what}, more than the {max} allowed"
            )));
        }
    }
    let interfaces = request
        .interfaces
        .iter()
        .enumerate()
        .map(|(i, interface)| plan_interface(i, interface))
        .collect::<Result<Vec<_>>>()?;
    let known = |device: &str, field: &str| -> Result<String> {
        if interfaces.iter().any(|i| i.name == device) {
            Ok(device.to_owned())
        } else {
            Err(invalid(format!(
                "{field} {device:?} is none of the interfaces"
            )))
        }
    };
    let routes = request
        .routes
        .iter()
        .enumerate()
        .map(|(i, route)| plan_route(i, route, &known))
        .collect::<Result<Vec<_>>>()?;
    let neighbors = request
        .neighbors
        .iter()
        .enumerate()
        .map(|(i, neighbor): (usize, &Neighbor)| {
            let field = format!("neighbors[{i}]");
            Ok((
                parse_ip(&neighbor.ip, &format!("{field}.ip"))?,
                parse_mac(&neighbor.mac, &format!("{field}.mac"))?,
                known(&neighbor.device, &format!("{field}.device"))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Plan {
        interfaces,
        routes,
        neighbors,
    })
}

fn plan_interface(index: usize, interface: &NetworkInterface) -> Result<PlannedInterface> {
    let field = format!("interfaces[{index}]");
    check_name(&interface.name, &format!("{field}.name"))?;
    if !(68..=65535).contains(&interface.mtu) {
        return Err(invalid(format!(
            "{field}.mtu {} is outside 68..=65535",
            interface.mtu
        )));
    }
    let addresses = interface
        .addresses
        .iter()
        .enumerate()
        .map(|(j, address)| {
            let field = format!("{field}.addresses[{j}]");
            let ip = parse_ip(&address.address, &field)?;
            Ok((ip, check_prefix(&ip, address.prefix_len, &field)?))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(PlannedInterface {
        name: interface.name.clone(),
        mac: parse_mac(&interface.mac, &format!("{field}.mac"))?,
        mtu: interface.mtu,
        addresses,
    })
}

fn plan_route(
    index: usize,
    route: &Route,
    known: &dyn Fn(&str, &str) -> Result<String>,
) -> Result<PlannedRoute> {
    let field = format!("routes[{index}]");
    let device = known(&route.device, &format!("{field}.device"))?;
    let gateway = (!route.gateway.is_empty())
        .then(|| parse_ip(&route.gateway, &format!("{field}.gateway")))
        .transpose()?;
    let source = (!route.source.is_empty())
        .then(|| parse_ip(&route.source, &format!("{field}.source")))
        .transpose()?;
    let (destination, ipv6) = if route.destination.is_empty() {
        (None, gateway.is_some_and(|g| g.is_ipv6()))
    } else {
        let (ip, prefix) = route.destination.split_once('/').ok_or_else(|| {
            invalid(format!(
                "{field}.destination {:?} has no /prefix",
                route.destination
            ))
        })?;
        let ip = parse_ip(ip, &format!("{field}.destination"))?;
        let prefix: u32 = prefix
            .parse()
            .map_err(|_| invalid(format!("{field}.destination prefix {prefix:?}")))?;
        let prefix = check_prefix(&ip, prefix, &format!("{field}.destination"))?;
        // A default route is sent as 0.0.0.0/0 or ::/0 too.
        let destination = (prefix != 0).then_some((ip, prefix));
        (destination, ip.is_ipv6())
    };
    if gateway.is_some_and(|g| g.is_ipv6() != ipv6) {
        return Err(invalid(format!(
            "{field}: gateway and destination families differ"
        )));
    }
    let scope = u8::try_from(route.scope)
        .map_err(|_| invalid(format!("{field}.scope {} is above 255", route.scope)))?;
    Ok(PlannedRoute {
        destination,
        ipv6,
        gateway,
        source,
        device,
        scope,
    })
}

fn mac_of(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(&bytes[..]).ok(),
        _ => None,
    })
}

async fn links(handle: &Handle) -> Result<Vec<LinkMessage>> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("list the guest's links"))
}

/// Runs `work` with a netlink handle of the network namespace of process
/// `pid`, on a thread that joins it and ends with the work.
fn in_netns_of<F, Fut>(pid: i32, work: F) -> Result<()>
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<()>>,
{
    let path = format!("/proc/{pid}/ns/net");
    let netns = std::fs::File::open(&path).map_err(AgentError::io("open", &path))?;
    std::thread::Builder::new()
        .name("pod-netns".into())
        .spawn(move || -> Result<()> {
            setns(netns.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| AgentError::io("setns", &path)(e.into()))?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(AgentError::io("start a runtime in", &path))?;
            runtime.block_on(async move {
                let (connection, handle, _) = rtnetlink::new_connection().map_err(
                    AgentError::io("open a netlink socket in", "the pod's netns"),
                )?;
                let driver = tokio::spawn(connection);
                let result = work(handle).await;
                driver.abort();
                result
            })
        })
        .map_err(AgentError::io("start the thread for", "the pod's netns"))?
        .join()
        .map_err(|_| AgentError::FailedPrecondition("the pod netns thread panicked".into()))?
}

/// Configures `request` in the network namespace of process `pod_pid`
/// (the pod's sandbox container's init).
pub async fn configure(request: &ConfigureNetworkRequest, pod_pid: i32) -> Result<()> {
    let plan = plan(request)?;
    let (connection, handle, _) = rtnetlink::new_connection()
        .map_err(AgentError::io("open a netlink socket in", "the guest"))?;
    let driver = tokio::spawn(connection);
    let moved = move_nics(&handle, &plan, pod_pid).await;
    driver.abort();
    moved?;
    tokio::task::spawn_blocking(move || in_netns_of(pod_pid, move |handle| set_up(handle, plan)))
        .await
        .map_err(|e| AgentError::FailedPrecondition(format!("the network task failed: {e}")))?
}

/// Moves each planned interface's NIC (found by MAC) into the pod's
/// namespace.
async fn move_nics(handle: &Handle, plan: &Plan, pod_pid: i32) -> Result<()> {
    let present = links(handle).await?;
    for interface in &plan.interfaces {
        let link = present
            .iter()
            .find(|link| mac_of(link) == Some(interface.mac))
            .ok_or_else(|| AgentError::Unsatisfiable {
                what: format!("interface {}", interface.name),
                why: format!("the guest has no NIC with MAC {}", husk_mac(&interface.mac)),
            })?;
        let message = LinkUnspec::new_with_index(link.header.index)
            .down()
            .setns_by_pid(pod_pid as u32)
            .build();
        handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(netlink(format!(
                "move the NIC of {} into the pod's network namespace",
                interface.name
            )))?;
    }
    Ok(())
}

fn husk_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// In the pod's namespace: names, MTU, up, addresses, routes, neighbours.
async fn set_up(handle: Handle, plan: Plan) -> Result<()> {
    let present = links(&handle).await?;
    let mut index_of_name = Vec::new();
    for interface in &plan.interfaces {
        let index = present
            .iter()
            .find(|link| mac_of(link) == Some(interface.mac))
            .map(|link| link.header.index)
            .ok_or_else(|| AgentError::Unsatisfiable {
                what: format!("interface {}", interface.name),
                why: "its NIC did not arrive in the pod's network namespace".into(),
            })?;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .name(interface.name.clone())
                    .mtu(interface.mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!("name {} and bring it up", interface.name)))?;
        for (ip, prefix) in &interface.addresses {
            handle
                .address()
                .add(index, *ip, *prefix)
                .execute()
                .await
                .map_err(netlink(format!("add {ip}/{prefix} to {}", interface.name)))?;
        }
        index_of_name.push((interface.name.clone(), index));
    }
    if let Some(lo) = present.iter().find(|link| {
        link.attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::IfName(name) if name == "lo"))
    }) {
        handle
            .link()
            .set(LinkUnspec::new_with_index(lo.header.index).up().build())
            .execute()
            .await
            .map_err(netlink("bring lo up"))?;
    }
    let index = |name: &str| {
        index_of_name
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, i)| *i)
            .unwrap_or(0)
    };
    for route in &plan.routes {
        let message = route_message(route, index(&route.device));
        handle
            .route()
            .add(message)
            .execute()
            .await
            .map_err(netlink(format!(
                "add the route to {} via {:?}",
                route
                    .destination
                    .map_or("default".to_owned(), |(ip, p)| format!("{ip}/{p}")),
                route.gateway
            )))?;
    }
    for (ip, mac, device) in &plan.neighbors {
        handle
            .neighbours()
            .add(index(device), *ip)
            .link_layer_address(mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("add the neighbour {ip}")))?;
    }
    Ok(())
}

fn route_message(route: &PlannedRoute, oif: u32) -> rtnetlink::packet_route::route::RouteMessage {
    let scope = RouteScope::from(route.scope);
    if route.ipv6 {
        let mut builder = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
            .output_interface(oif)
            .scope(scope);
        if let Some((IpAddr::V6(ip), prefix)) = route.destination {
            builder = builder.destination_prefix(ip, prefix);
        }
        if let Some(IpAddr::V6(gateway)) = route.gateway {
            builder = builder.gateway(gateway);
        }
        if let Some(IpAddr::V6(source)) = route.source {
            builder = builder.pref_source(source);
        }
        builder.build()
    } else {
        let mut builder = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
            .output_interface(oif)
            .scope(scope);
        if let Some((IpAddr::V4(ip), prefix)) = route.destination {
            builder = builder.destination_prefix(ip, prefix);
        }
        if let Some(IpAddr::V4(gateway)) = route.gateway {
            builder = builder.gateway(gateway);
        }
        if let Some(IpAddr::V4(source)) = route.source {
            builder = builder.pref_source(source);
        }
        builder.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_protocols::agent::IpAddress;

    fn request() -> ConfigureNetworkRequest {
        ConfigureNetworkRequest {
            interfaces: vec![NetworkInterface {
                name: "eth0".into(),
                mac: "0a:58:0a:d5:00:05".into(),
                mtu: 1500,
                addresses: vec![IpAddress {
                    address: "10.213.0.5".into(),
                    prefix_len: 24,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            routes: vec![Route {
                destination: String::new(),
                gateway: "10.213.0.1".into(),
                device: "eth0".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_cni_shaped_request_is_planned() {
        let plan = plan(&request()).unwrap();
        assert_eq!(plan.interfaces[0].mac, [0x0a, 0x58, 0x0a, 0xd5, 0, 5]);
        assert_eq!(plan.interfaces[0].addresses[0].1, 24);
        assert!(plan.routes[0].destination.is_none() && !plan.routes[0].ipv6);
    }

    #[test]
    fn bad_fields_are_named() {
        type Edit = Box<dyn Fn(&mut ConfigureNetworkRequest)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|r| r.interfaces[0].mac = "zz".into()),
                "interfaces[0].mac",
            ),
            (
                Box::new(|r| r.interfaces[0].name = "../x".into()),
                "interfaces[0].name",
            ),
            (Box::new(|r| r.interfaces[0].mtu = 20), "interfaces[0].mtu"),
            (
                Box::new(|r| r.interfaces[0].addresses[0].prefix_len = 33),
                "interfaces[0].addresses[0] prefix",
            ),
            (
                Box::new(|r| r.routes[0].device = "eth9".into()),
                "routes[0].device",
            ),
            (
                Box::new(|r| r.routes[0].destination = "10.0.0.0".into()),
                "routes[0].destination",
            ),
            (
                Box::new(|r| r.routes = vec![Route::default(); MAX_ROUTES + 1]),
                "more than the 256 allowed",
            ),
        ];
        for (edit, field) in cases {
            let mut bad = request();
            edit(&mut bad);
            let error = plan(&bad).err().expect(field).to_string();
            assert!(error.contains(field), "{field}: {error}");
        }
    }
}
