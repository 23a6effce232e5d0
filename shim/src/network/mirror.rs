//! The tc mirroring between CNI's veth and the VM's TAP: an ingress qdisc
//! on each, with a u32 match-all filter whose mirred action redirects
//! every frame to the other's egress. Removing the ingress qdiscs removes
//! their filters.

use anyhow::{anyhow, Context, Result};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec};

use super::TAP_NAME;

/// `ETH_P_ALL`: the filter's protocol, in network byte order as tc wants.
const ETH_P_ALL: u16 = 0x0003;

/// The index of link `name`, if it exists.
async fn index_of(handle: &Handle, name: &str) -> Result<Option<u32>> {
    let found = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_collect::<Vec<_>>()
        .await;
    match found {
        Ok(links) => Ok(links.first().map(|link| link.header.index)),
        Err(rtnetlink::Error::NetlinkError(error)) if error.raw_code() == -libc::ENODEV => Ok(None),
        Err(error) => Err(anyhow!(error)).with_context(|| format!("cannot look up link {name}")),
    }
}

async fn redirect(handle: &Handle, from: u32, to: u32) -> Result<()> {
    handle
        .traffic_filter(from as i32)
        .add()
        .parent(0xffff_0000)
        .protocol(ETH_P_ALL.to_be())
        .redirect(to)
        .map_err(|e| anyhow!(e))?
        .execute()
        .await
        .with_context(|| format!("cannot add the redirect filter from link {from} to link {to}"))
}

/// Brings the TAP up with the veth's MTU and mirrors the two; returns the
/// TAP's index.
pub async fn set_up(handle: &Handle, veth: u32, mtu: u32) -> Result<u32> {
    let tap = index_of(handle, TAP_NAME)
        .await?
        .ok_or_else(|| anyhow!("the TAP {TAP_NAME} is not in the pod's network namespace"))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(tap).mtu(mtu).up().build())
        .execute()
        .await
        .with_context(|| format!("cannot bring {TAP_NAME} up with MTU {mtu}"))?;
    for link in [veth, tap] {
        handle
            .qdisc()
            .add(link as i32)
            .ingress()
            .execute()
            .await
            .with_context(|| format!("cannot add an ingress qdisc to link {link}"))?;
    }
    redirect(handle, veth, tap).await?;
    redirect(handle, tap, veth).await?;
    Ok(tap)
}

/// Removes the veth's ingress qdisc (and so its filter) and the TAP, if
/// they are still there.
pub async fn tear_down(handle: &Handle, veth: u32) -> Result<()> {
    let mut request = handle.qdisc().del(veth as i32);
    request.message_mut().header.parent = TcHandle::INGRESS;
    request.message_mut().header.handle = TcHandle::from(0xffff_0000);
    match request.execute().await {
        Ok(()) => {}
        // Gone already: the veth (CNI DEL) or the qdisc.
        Err(rtnetlink::Error::NetlinkError(error))
            if [-libc::ENODEV, -libc::ENOENT, -libc::EINVAL].contains(&error.raw_code()) => {}
        Err(error) => {
            return Err(anyhow!(error)).context("cannot remove the veth's ingress qdisc");
        }
    }
    if let Some(tap) = index_of(handle, TAP_NAME).await? {
        handle
            .link()
            .del(tap)
            .execute()
            .await
            .with_context(|| format!("cannot delete {TAP_NAME}"))?;
    }
    Ok(())
}
