//! Work inside a network namespace without the shim ever living there: a
//! fresh thread joins the namespace (an open nsfs file, never a path read
//! twice), runs the work with its own single-threaded tokio runtime and a
//! netlink connection made after the join (a netlink socket belongs to the
//! namespace it was made in), and ends. No other thread of the shim
//! changes namespace, and the joining thread cannot outlive its work.

use std::fs::File;
use std::future::Future;
use std::os::fd::AsFd;

use anyhow::{anyhow, Context, Result};
use nix::sched::{setns, CloneFlags};

/// Runs `work` with a netlink handle of the network namespace `netns`, on
/// a thread of its own that has joined it; returns what `work` returns.
pub fn with_netlink<T, F, Fut>(netns: &File, what: &str, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let netns = netns
        .try_clone()
        .context("cannot duplicate the pod's network namespace fd")?;
    let name = format!("netns-{}", what.split_whitespace().next().unwrap_or("work"));
    let worker = std::thread::Builder::new()
        .name(name.chars().take(15).collect())
        .spawn(move || -> Result<T> {
            setns(netns.as_fd(), CloneFlags::CLONE_NEWNET)
                .context("cannot join the pod's network namespace")?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the network namespace thread's runtime")?;
            runtime.block_on(async move {
                let (connection, handle, _) = rtnetlink::new_connection()
                    .context("cannot open a netlink socket in the pod's network namespace")?;
                let driver = tokio::spawn(connection);
                let result = work(handle).await;
                driver.abort();
                result
            })
        })
        .context("cannot start the network namespace thread")?;
    worker
        .join()
        .map_err(|_| anyhow!("the network namespace thread panicked while it did: {what}"))?
        .with_context(|| what.to_owned())
}

/// Runs `work` (no netlink) on a thread of its own in `netns`.
pub fn run_in<T, F>(netns: &File, what: &str, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let netns = netns
        .try_clone()
        .context("cannot duplicate the pod's network namespace fd")?;
    std::thread::Builder::new()
        .name("netns-tap".into())
        .spawn(move || -> Result<T> {
            setns(netns.as_fd(), CloneFlags::CLONE_NEWNET)
                .context("cannot join the pod's network namespace")?;
            work()
        })
        .context("cannot start the network namespace thread")?
        .join()
        .map_err(|_| anyhow!("the network namespace thread panicked while it did: {what}"))?
        .with_context(|| what.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_calling_thread_keeps_its_namespace() {
        let own = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let netns = File::open("/proc/self/ns/net").unwrap();
        let seen = run_in(&netns, "read the namespace", || {
            Ok(std::fs::read_link("/proc/thread-self/ns/net")?)
        });
        // Joining one's own namespace needs CAP_SYS_ADMIN; without it the
        // error must say which step failed.
        match seen {
            Ok(seen) => assert_eq!(seen, own),
            Err(error) => assert!(format!("{error:#}").contains("join"), "{error:#}"),
        }
        assert_eq!(std::fs::read_link("/proc/thread-self/ns/net").unwrap(), own);
    }
}
