//! `Restored`: what an agent does first when its VM was restored from a
//! pre-booted template rather than booted.
//!
//! Every VM restored from one template wakes up with the template's state:
//! the same wall clock (as old as the template), the same random-number
//! generator state (so two pods would draw the same "random" keys), and
//! NICs with the addresses the template's NICs had. The host sends the
//! three things that must differ, and the agent applies them before any
//! other request: it sets `CLOCK_REALTIME`, credits the host's random
//! bytes to the kernel's pool and forces a reseed of its CRNG
//! (`RNDADDENTROPY`, `RNDRESEEDCRNG`), and gives each Ethernet NIC, in
//! the order the kernel probed them, the pod's MAC.

use std::os::fd::AsRawFd;

use futures_util::TryStreamExt;
use husk_protocols::agent::RestoredRequest;
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::LinkUnspec;

use crate::error::{AgentError, Result};

/// The fewest random bytes a restore must bring: a full CRNG seed.
pub const MIN_ENTROPY_BYTES: usize = 32;
/// The most random bytes accepted.
pub const MAX_ENTROPY_BYTES: usize = 512;
/// The most NICs a restore may readdress (the network request's limit).
pub const MAX_NICS: usize = crate::network::MAX_INTERFACES;

/// A request checked and parsed.
#[derive(Debug)]
struct Plan {
    realtime: libc::timespec,
    entropy: Vec<u8>,
    macs: Vec<[u8; 6]>,
}

fn invalid(what: String) -> AgentError {
    AgentError::InvalidRequest(what)
}

fn plan(request: &RestoredRequest) -> Result<Plan> {
    if request.realtime_unix_ns == 0 {
        return Err(invalid("Restored: realtime_unix_ns is 0".into()));
    }
    let entropy = request.entropy.len();
    if !(MIN_ENTROPY_BYTES..=MAX_ENTROPY_BYTES).contains(&entropy) {
        return Err(invalid(format!(
            "Restored: entropy is {entropy} bytes; between {MIN_ENTROPY_BYTES} and {MAX_ENTROPY_BYTES} are needed"
        )));
    }
    if request.nic_macs.len() > MAX_NICS {
        return Err(invalid(format!(
            "Restored: {} NIC addresses; at most {MAX_NICS}",
            request.nic_macs.len()
        )));
    }
    let macs = request
        .nic_macs
        .iter()
        .enumerate()
        .map(|(index, mac)| {
            <[u8; 6]>::try_from(&mac[..]).map_err(|_| {
                invalid(format!(
                    "Restored: NIC address {index} is {} bytes, not 6",
                    mac.len()
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let nanos = request.realtime_unix_ns;
    Ok(Plan {
        realtime: libc::timespec {
            tv_sec: (nanos / 1_000_000_000) as libc::time_t,
            tv_nsec: (nanos % 1_000_000_000) as libc::c_long,
        },
        entropy: request.entropy.clone(),
        macs,
    })
}

/// Applies a `Restored` request.
pub async fn apply(request: &RestoredRequest) -> Result<()> {
    let plan = plan(request)?;
    set_realtime(&plan.realtime)?;
    reseed(&plan.entropy)?;
    readdress_nics(&plan.macs).await?;
    tracing::info!(
        nics = plan.macs.len(),
        entropy_bytes = plan.entropy.len(),
        "restored from a template: clock set, CRNG reseeded, NICs readdressed"
    );
    Ok(())
}

fn set_realtime(time: &libc::timespec) -> Result<()> {
    // SAFETY: `time` is a valid timespec for the duration of the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, time) } != 0 {
        return Err(AgentError::io("clock_settime", "CLOCK_REALTIME")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// `_IOW('R', 0x03, int[2])`: add entropy, crediting it.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

fn reseed(entropy: &[u8]) -> Result<()> {
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(AgentError::io("open", "/dev/urandom"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    // Keep the buffer 4-byte aligned in length, as the kernel reads u32s.
    info.resize(info.len().div_ceil(4) * 4, 0);
    // SAFETY: `info` is a rand_pool_info whose buf_size matches the bytes
    // that follow the header; the kernel only reads it.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        return Err(AgentError::io("RNDADDENTROPY on", "/dev/urandom")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(AgentError::io("RNDRESEEDCRNG on", "/dev/urandom")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The guest's Ethernet NICs in probe order (ascending interface index).
fn ethernet_nics(mut links: Vec<LinkMessage>) -> Vec<LinkMessage> {
    links.retain(|link| {
        link.header.link_layer_type == LinkLayerType::Ether
            && link
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::Address(bytes) if bytes.len() == 6))
    });
    links.sort_by_key(|link| link.header.index);
    links
}

async fn readdress_nics(macs: &[[u8; 6]]) -> Result<()> {
    let (connection, handle, _) = rtnetlink::new_connection()
        .map_err(AgentError::io("open a netlink socket in", "the guest"))?;
    let driver = tokio::spawn(connection);
    let result = async {
        let links: Vec<LinkMessage> =
            handle
                .link()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(|error| AgentError::Unsatisfiable {
                    what: "list the guest's links".into(),
                    why: error.to_string(),
                })?;
        let nics = ethernet_nics(links);
        if nics.len() != macs.len() {
            return Err(AgentError::Unsatisfiable {
                what: "readdress the NICs of a restored VM".into(),
                why: format!(
                    "the host names {} NICs, the guest has {}",
                    macs.len(),
                    nics.len()
                ),
            });
        }
        for (nic, mac) in nics.iter().zip(macs) {
            let message = LinkUnspec::new_with_index(nic.header.index)
                .address(mac.to_vec())
                .build();
            handle
                .link()
                .set(message)
                .execute()
                .await
                .map_err(|error| AgentError::Unsatisfiable {
                    what: format!("set the address of NIC {}", nic.header.index),
                    why: error.to_string(),
                })?;
        }
        Ok(())
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(entropy: usize, macs: Vec<Vec<u8>>) -> RestoredRequest {
        RestoredRequest {
            realtime_unix_ns: 1_765_000_000_123_456_789,
            entropy: vec![7; entropy],
            nic_macs: macs,
            ..Default::default()
        }
    }

    #[test]
    fn a_good_request_is_planned_with_its_clock_split_into_seconds_and_nanoseconds() {
        let plan = plan(&request(32, vec![vec![2, 0, 0, 0, 0, 1]])).unwrap();
        assert_eq!(plan.realtime.tv_sec, 1_765_000_000);
        assert_eq!(plan.realtime.tv_nsec, 123_456_789);
        assert_eq!(plan.macs, vec![[2, 0, 0, 0, 0, 1]]);
    }

    #[test]
    fn too_little_or_too_much_entropy_is_refused_naming_the_bounds() {
        for bytes in [0, 31, 513] {
            let error = plan(&request(bytes, vec![])).unwrap_err().to_string();
            assert!(
                error.contains(&format!("entropy is {bytes} bytes"))
                    && error.contains("32 and 512"),
                "{error}"
            );
        }
    }

    #[test]
    fn a_mac_that_is_not_six_bytes_or_too_many_macs_are_refused() {
        let error = plan(&request(32, vec![vec![1, 2, 3]]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("NIC address 0 is 3 bytes"), "{error}");
        let error = plan(&request(32, vec![vec![0; 6]; MAX_NICS + 1]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("at most"), "{error}");
        let mut zero_clock = request(32, vec![]);
        zero_clock.realtime_unix_ns = 0;
        assert!(plan(&zero_clock).is_err());
    }
}
