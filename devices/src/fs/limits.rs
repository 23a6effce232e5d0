//! How many inodes and open handles the guest may make a share hold.
//!
//! Every inode the guest knows costs the passthrough an `O_PATH` fd, and
//! every open file or directory another fd, until the guest lets go (FORGET
//! for inodes, RELEASE for handles). A guest that never lets go would
//! exhaust the shim's fds, so [`SharedFs`](super::filesystem::SharedFs)
//! keeps its own account and refuses, with `ENFILE`, what would go beyond
//! `max_open_inodes` / `max_open_handles` ([`FsConfig`](super::FsConfig)).
//!
//! [`InodeLedger`] counts lookups per inode the way the guest kernel does
//! (each entry reply adds one, FORGET subtracts its count, zero means the
//! kernel and the passthrough have both forgotten it). An inode already
//! counted always resolves again; only a new one can be refused. Requests
//! that always make a new inode (MKNOD, MKDIR, SYMLINK, CREATE) reserve a
//! slot before touching the host, so they fail before creating anything;
//! LOOKUP, LINK and READDIRPLUS entries can only be checked after the
//! passthrough has resolved them, and a refused one is forgotten again.
//! [`HandleLedger`] tracks live handles by value, so a RELEASE of a handle
//! that was never handed out (or twice) frees nothing.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Mutex, MutexGuard};

use fuse_backend_rs::abi::fuse_abi::ROOT_ID;

/// The error a refused inode or handle gets: "too many open files in system".
pub fn limit_reached() -> io::Error {
    io::Error::from_raw_os_error(libc::ENFILE)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug, Default)]
struct InodeState {
    /// Lookup count per inode the guest holds (the root is not counted:
    /// the passthrough holds it for the session anyway).
    lookups: HashMap<u64, u64>,
    /// Slots promised to creations in flight.
    reserved: usize,
}

/// Live inodes of one share, at most `limit` of them.
#[derive(Debug)]
pub struct InodeLedger {
    limit: usize,
    state: Mutex<InodeState>,
}

/// A slot for one new inode, taken before a creation reaches the host.
/// Dropping it unused gives the slot back.
#[must_use]
pub struct InodeReservation<'a> {
    ledger: &'a InodeLedger,
    held: bool,
}

impl InodeLedger {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            state: Mutex::new(InodeState::default()),
        }
    }

    /// A slot for a new inode, or `ENFILE` when the share is full.
    pub fn reserve(&self) -> io::Result<InodeReservation<'_>> {
        let mut state = lock(&self.state);
        if state.lookups.len() + state.reserved >= self.limit {
            return Err(limit_reached());
        }
        state.reserved += 1;
        Ok(InodeReservation {
            ledger: self,
            held: true,
        })
    }

    /// Counts one more lookup of `inode`. False when `inode` is new and the
    /// share is full: the caller must forget it in the passthrough and
    /// refuse the request.
    pub fn add_lookup(&self, inode: u64) -> bool {
        if inode == ROOT_ID || inode == 0 {
            return true;
        }
        let mut state = lock(&self.state);
        if let Some(count) = state.lookups.get_mut(&inode) {
            *count = count.saturating_add(1);
            return true;
        }
        if state.lookups.len() + state.reserved >= self.limit {
            return false;
        }
        state.lookups.insert(inode, 1);
        true
    }

    /// The guest forgot `count` lookups of `inode`.
    pub fn forget(&self, inode: u64, count: u64) {
        let mut state = lock(&self.state);
        if let Some(held) = state.lookups.get_mut(&inode) {
            *held = held.saturating_sub(count);
            if *held == 0 {
                state.lookups.remove(&inode);
            }
        }
    }

    /// A new session (or DESTROY): the guest holds nothing any more.
    pub fn clear(&self) {
        lock(&self.state).lookups.clear();
    }

    /// Inodes the guest holds now.
    pub fn live(&self) -> usize {
        lock(&self.state).lookups.len()
    }
}

impl InodeReservation<'_> {
    /// The creation succeeded and made `inode`: it takes the slot (or, if
    /// the guest already held `inode`, one more lookup of it and the slot
    /// goes back).
    pub fn commit(mut self, inode: u64) {
        self.held = false;
        let mut state = lock(&self.ledger.state);
        state.reserved -= 1;
        if inode == ROOT_ID || inode == 0 {
            return;
        }
        let count = state.lookups.entry(inode).or_insert(0);
        *count = count.saturating_add(1);
    }
}

impl Drop for InodeReservation<'_> {
    fn drop(&mut self) {
        if self.held {
            lock(&self.ledger.state).reserved -= 1;
        }
    }
}

#[derive(Debug, Default)]
struct HandleState {
    live: HashSet<u64>,
    reserved: usize,
}

/// Open handles of one share, at most `limit` of them.
#[derive(Debug)]
pub struct HandleLedger {
    limit: usize,
    state: Mutex<HandleState>,
}

/// A slot for one handle, taken before an open reaches the host. Dropping
/// it unused gives the slot back.
#[must_use]
pub struct HandleReservation<'a> {
    ledger: &'a HandleLedger,
    held: bool,
}

impl HandleLedger {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            state: Mutex::new(HandleState::default()),
        }
    }

    /// A slot for a new handle, or `ENFILE` when the share is full.
    pub fn reserve(&self) -> io::Result<HandleReservation<'_>> {
        let mut state = lock(&self.state);
        if state.live.len() + state.reserved >= self.limit {
            return Err(limit_reached());
        }
        state.reserved += 1;
        Ok(HandleReservation {
            ledger: self,
            held: true,
        })
    }

    /// The guest released `handle`, and the passthrough closed it.
    pub fn release(&self, handle: u64) {
        lock(&self.state).live.remove(&handle);
    }

    /// A new session (or DESTROY): every handle is closed.
    pub fn clear(&self) {
        lock(&self.state).live.clear();
    }

    /// Handles open now.
    pub fn live(&self) -> usize {
        lock(&self.state).live.len()
    }
}

impl HandleReservation<'_> {
    /// The open succeeded; `handle` (if the passthrough made one) takes
    /// the slot.
    pub fn commit(mut self, handle: Option<u64>) {
        self.held = false;
        let mut state = lock(&self.ledger.state);
        state.reserved -= 1;
        if let Some(handle) = handle {
            state.live.insert(handle);
        }
    }
}

impl Drop for HandleReservation<'_> {
    fn drop(&mut self) {
        if self.held {
            lock(&self.ledger.state).reserved -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_ledger_refuses_new_inodes_but_counts_known_ones() {
        let ledger = InodeLedger::new(2);
        assert!(ledger.add_lookup(10));
        assert!(ledger.add_lookup(11));
        assert!(!ledger.add_lookup(12), "a third inode fits a limit of 2");
        assert!(ledger.add_lookup(10), "a known inode always resolves");
        assert!(ledger.add_lookup(ROOT_ID), "the root is never counted");
        assert_eq!(ledger.live(), 2);
        // Inode 10 was looked up twice: one forget is not enough.
        ledger.forget(10, 1);
        assert!(!ledger.add_lookup(12));
        ledger.forget(10, 1);
        assert!(ledger.add_lookup(12));
        assert_eq!(ledger.live(), 2);
    }

    #[test]
    fn forgetting_more_than_was_looked_up_or_an_unknown_inode_frees_nothing_else() {
        let ledger = InodeLedger::new(1);
        assert!(ledger.add_lookup(10));
        ledger.forget(99, 5);
        assert_eq!(ledger.live(), 1);
        ledger.forget(10, u64::MAX);
        assert_eq!(ledger.live(), 0);
    }

    #[test]
    fn reservations_hold_a_slot_until_committed_or_dropped() {
        let ledger = InodeLedger::new(2);
        let first = ledger.reserve().unwrap();
        let second = ledger.reserve().unwrap();
        assert_eq!(
            ledger.reserve().err().unwrap().raw_os_error(),
            Some(libc::ENFILE)
        );
        assert!(!ledger.add_lookup(10), "reserved slots are taken");
        drop(first);
        second.commit(20);
        assert_eq!(ledger.live(), 1);
        // Committing an inode the guest already holds gives the slot back.
        ledger.reserve().unwrap().commit(20);
        assert_eq!(ledger.live(), 1);
        assert!(ledger.add_lookup(10));
        ledger.forget(20, 1);
        assert_eq!(ledger.live(), 2, "inode 20 was looked up twice");
    }

    #[test]
    fn handles_are_tracked_by_value_so_a_bogus_release_frees_no_slot() {
        let ledger = HandleLedger::new(2);
        ledger.reserve().unwrap().commit(Some(1));
        ledger.reserve().unwrap().commit(Some(2));
        assert_eq!(
            ledger.reserve().err().unwrap().raw_os_error(),
            Some(libc::ENFILE)
        );
        ledger.release(7);
        ledger.release(7);
        assert!(ledger.reserve().is_err());
        ledger.release(1);
        let reservation = ledger.reserve().unwrap();
        reservation.commit(None);
        assert_eq!(ledger.live(), 1);
        ledger.clear();
        assert_eq!(ledger.live(), 0);
    }
}
