//! The thread an activated virtio-mmio device runs on, written once for
//! every device that has one (vsock, net, balloon).
//!
//! A [`DeviceWorker`] owns a stop eventfd and one thread. The thread
//! confines itself as a device thread before it runs anything (a worker
//! that cannot confine itself never reads the guest's queues), then runs
//! the device's loop, which watches the stop eventfd among its own fds and
//! returns when it fires. What the loop returns on a stop (`Some`, for a
//! pause: the queue positions, a model to keep) is handed back by
//! [`DeviceWorker::stop`]; `None` means it had ended on its own (a broken
//! ring, a failed confinement). Dropping the worker stops and joins it, so
//! no device thread outlives its device.

use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use virtio_queue::QueueState;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::ActivatedQueue;

/// A device's worker thread and the eventfd that stops it.
pub struct DeviceWorker<T> {
    name: String,
    stop: EventFd,
    thread: Option<JoinHandle<Option<T>>>,
}

/// The stop eventfd of a worker about to be spawned: register
/// [`StopEvent::raw_fd`] in the loop's epoll, then hand it to
/// [`DeviceWorker::spawn`].
pub struct StopEvent(EventFd);

impl StopEvent {
    pub fn new() -> std::io::Result<Self> {
        EventFd::new(EFD_NONBLOCK).map(Self)
    }

    /// The fd the loop watches; readable once the worker is told to stop.
    pub fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The epoll a worker's loop waits in: each queue's notifier, with the
/// queue's index as its token, and `stop` with `stop_token`. The device
/// adds its own fds (a TAP, a muxer) after.
pub fn queue_epoll(
    queues: &[ActivatedQueue],
    stop: &StopEvent,
    stop_token: u64,
) -> std::io::Result<Epoll> {
    let epoll = Epoll::new()?;
    for (token, queue) in queues.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            queue.notifier.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token as u64),
        )?;
    }
    epoll.ctl(
        ControlOperation::Add,
        stop.raw_fd(),
        EpollEvent::new(EventSet::IN, stop_token),
    )?;
    Ok(epoll)
}

/// Where each of `queues` stands: what a loop stopped for a pause hands
/// back.
pub fn queue_states(queues: &[ActivatedQueue]) -> Vec<QueueState> {
    queues.iter().map(|queue| queue.queue.state()).collect()
}

impl<T: Send + 'static> DeviceWorker<T> {
    /// Starts thread `name` running `body` after confining itself; `stop`
    /// is the eventfd `body` watches.
    pub fn spawn(
        name: String,
        stop: StopEvent,
        body: impl FnOnce() -> Option<T> + Send + 'static,
    ) -> std::io::Result<Self> {
        let thread_name = name.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if let Err(error) =
                    husk_confine::confine_current_thread(husk_confine::ThreadClass::Device)
                {
                    tracing::error!(%error, worker = thread_name, "the device worker does not run");
                    return None;
                }
                body()
            })?;
        Ok(Self {
            name,
            stop: stop.0,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it; returns what its loop handed
    /// back if it was still running.
    pub fn stop(mut self) -> Option<T> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Option<T> {
        let thread = self.thread.take()?;
        if let Err(error) = self.stop.write(1) {
            tracing::error!(%error, worker = self.name, "cannot signal the device worker to stop");
        }
        match thread.join() {
            Ok(handed_back) => handed_back,
            Err(_) => {
                tracing::error!(worker = self.name, "the device worker thread panicked");
                None
            }
        }
    }
}

impl<T> Drop for DeviceWorker<T> {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(error) = self.stop.write(1) {
                tracing::error!(%error, worker = self.name, "cannot signal the device worker to stop");
            }
            if thread.join().is_err() {
                tracing::error!(worker = self.name, "the device worker thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    /// A loop that waits for its stop event and hands back `value`.
    fn waiting_worker(value: u32) -> DeviceWorker<u32> {
        let stop = StopEvent::new().unwrap();
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                stop.raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        DeviceWorker::spawn("test-worker".into(), stop, move || {
            let mut events = [EpollEvent::default(); 1];
            (epoll.wait(-1, &mut events).ok()? == 1).then_some(value)
        })
        .unwrap()
    }

    #[test]
    fn stop_hands_back_what_the_loop_returned() {
        assert_eq!(waiting_worker(7).stop(), Some(7));
    }

    #[test]
    fn a_loop_that_ended_on_its_own_hands_back_nothing() {
        let worker: DeviceWorker<u32> =
            DeviceWorker::spawn("test-ended".into(), StopEvent::new().unwrap(), || None).unwrap();
        assert_eq!(worker.stop(), None);
    }

    #[test]
    fn dropping_a_worker_stops_and_joins_its_thread() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let finished = Arc::new(AtomicBool::new(false));
        let stop = StopEvent::new().unwrap();
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                stop.raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        let flag = finished.clone();
        let worker: DeviceWorker<()> = DeviceWorker::spawn("test-drop".into(), stop, move || {
            let mut events = [EpollEvent::default(); 1];
            let _ = epoll.wait(-1, &mut events);
            std::thread::sleep(std::time::Duration::from_millis(20));
            flag.store(true, Ordering::SeqCst);
            Some(())
        })
        .unwrap();
        drop(worker);
        assert!(
            finished.load(Ordering::SeqCst),
            "drop returned before the worker's loop ended"
        );
    }
}
