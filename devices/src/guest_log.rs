//! Log lines a guest can cause: rate-limited per device, and escaped.
//!
//! A hostile guest can drive a device into the same error path as often as
//! it likes: a malformed descriptor chain per kick, a config-space write per
//! MMIO access, a broken ring per notification. Logged once per event, that
//! is a flood of containerd's log written at the guest's pace. Every such
//! line therefore goes through its device's [`GuestLog`] (with
//! [`guest_warn!`] or [`guest_error!`]): at most [`GUEST_LOG_BURST`] lines
//! per [`GUEST_LOG_INTERVAL`] for the whole device, whatever the message.
//! Lines beyond that are counted, not written, and the next line written
//! carries the count as its `suppressed` field ("37 similar lines were
//! dropped before this one"). The owner reads the running totals through
//! [`GuestLog::written_total`] and [`GuestLog::suppressed_total`].
//!
//! Clones of a [`GuestLog`] share one budget, so a device hands one to each
//! part that logs on its behalf (transport, model, connections) and they
//! are limited together. The window logic is [`RateLimiter`], a pure
//! function of the instants it is given; [`GuestLog`] reads them from a
//! [`Clock`], which tests replace.
//!
//! Text the guest chose (a name, a string from a packet) never reaches a
//! line raw: it is logged through [`GuestBytes`] (or `?` Debug formatting),
//! which escapes control characters, so a newline cannot forge a line.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lines one device may write per [`GUEST_LOG_INTERVAL`] on the guest's
/// account: enough to see what a misbehaving guest does, too few to fill a
/// log (a pod has two devices, so at most 20 such lines per 10 s).
pub const GUEST_LOG_BURST: u32 = 10;
/// The window [`GUEST_LOG_BURST`] applies to.
pub const GUEST_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Where a [`GuestLog`] reads the time.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The monotonic system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Fixed-window rate limiting: at most `burst` admissions in each window of
/// `interval`, the window starting at the first admission after the last
/// one ended. Knows nothing of clocks: every call says what time it is.
#[derive(Debug)]
pub struct RateLimiter {
    burst: u32,
    interval: Duration,
    window_start: Option<Instant>,
    admitted_in_window: u32,
    /// Refused since the last admission; reported by the next one.
    refused_since_admission: u64,
}

impl RateLimiter {
    pub fn new(burst: u32, interval: Duration) -> Self {
        Self {
            burst,
            interval,
            window_start: None,
            admitted_in_window: 0,
            refused_since_admission: 0,
        }
    }

    /// Whether a line may be written at `now`: `Some(n)` when it may, `n`
    /// being how many were refused since the previous admitted line; `None`
    /// when it must be dropped (and is counted). An instant earlier than
    /// the window's start (a clock that went backwards) stays in the window.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let window_over = match self.window_start {
            None => true,
            Some(start) => now.saturating_duration_since(start) >= self.interval,
        };
        if window_over {
            self.window_start = Some(now);
            self.admitted_in_window = 0;
        }
        if self.admitted_in_window >= self.burst {
            self.refused_since_admission += 1;
            return None;
        }
        self.admitted_in_window += 1;
        Some(std::mem::take(&mut self.refused_since_admission))
    }
}

struct Shared {
    limiter: Mutex<RateLimiter>,
    clock: Box<dyn Clock>,
    written: AtomicU64,
    suppressed: AtomicU64,
}

/// One device's budget of guest-triggered log lines; see the module
/// documentation. Cheap to clone; clones share the budget and the totals.
#[derive(Clone)]
pub struct GuestLog {
    shared: Arc<Shared>,
}

impl fmt::Debug for GuestLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestLog")
            .field("written", &self.written_total())
            .field("suppressed", &self.suppressed_total())
            .finish()
    }
}

impl Default for GuestLog {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestLog {
    /// [`GUEST_LOG_BURST`] lines per [`GUEST_LOG_INTERVAL`], on the system clock.
    pub fn new() -> Self {
        Self::with_clock(
            GUEST_LOG_BURST,
            GUEST_LOG_INTERVAL,
            Box::new(MonotonicClock),
        )
    }

    /// A budget of `burst` lines per `interval` as told by `clock`.
    pub fn with_clock(burst: u32, interval: Duration, clock: Box<dyn Clock>) -> Self {
        Self {
            shared: Arc::new(Shared {
                limiter: Mutex::new(RateLimiter::new(burst, interval)),
                clock,
                written: AtomicU64::new(0),
                suppressed: AtomicU64::new(0),
            }),
        }
    }

    /// Whether the caller may write its line now: `Some(n)` with the number
    /// of lines dropped since the last one written, or `None` (the line is
    /// counted as suppressed). The `guest_*!` macros call this.
    pub fn admit(&self) -> Option<u64> {
        let now = self.shared.clock.now();
        let admitted = self
            .shared
            .limiter
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .admit(now);
        let counter = match admitted {
            Some(_) => &self.shared.written,
            None => &self.shared.suppressed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        crate::counters::guest_log_line(admitted.is_some());
        admitted
    }

    /// Guest-triggered lines written so far.
    pub fn written_total(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Guest-triggered lines dropped so far.
    pub fn suppressed_total(&self) -> u64 {
        self.shared.suppressed.load(Ordering::Relaxed)
    }
}

/// Guest-chosen bytes, displayed with every byte outside printable ASCII
/// escaped (`\n`, `\x1b`, `\xff`), so they can never end or recolour a line.
#[derive(Clone, Copy)]
pub struct GuestBytes<'a>(pub &'a [u8]);

impl fmt::Display for GuestBytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.escape_ascii())
    }
}

impl fmt::Debug for GuestBytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0.escape_ascii())
    }
}

/// Writes a tracing event at `$level` if the device's [`GuestLog`] admits
/// it, with a `suppressed` field when earlier lines were dropped. The rest
/// is what `tracing::event!` takes after the level (fields, then message).
macro_rules! guest_event {
    ($log:expr, $level:expr, $($rest:tt)+) => {
        match $crate::guest_log::GuestLog::admit(&$log) {
            Some(0) => tracing::event!($level, $($rest)+),
            Some(suppressed) => tracing::event!($level, suppressed, $($rest)+),
            None => {}
        }
    };
}

/// A guest-triggered warning, rate-limited by `$log` (a [`GuestLog`]).
macro_rules! guest_warn {
    ($log:expr, $($rest:tt)+) => {
        $crate::guest_log::guest_event!($log, tracing::Level::WARN, $($rest)+)
    };
}

/// A guest-triggered error, rate-limited by `$log` (a [`GuestLog`]).
macro_rules! guest_error {
    ($log:expr, $($rest:tt)+) => {
        $crate::guest_log::guest_event!($log, tracing::Level::ERROR, $($rest)+)
    };
}

pub(crate) use {guest_error, guest_event, guest_warn};

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock the test moves by hand.
    struct ManualClock {
        now: Arc<Mutex<Instant>>,
    }

    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            *self.now.lock().unwrap()
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn the_first_burst_passes_then_lines_are_dropped_until_the_window_ends() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(3, 10 * SECOND);
        for at in 0..3 {
            assert_eq!(limiter.admit(start + at * SECOND), Some(0), "line {at}");
        }
        assert_eq!(limiter.admit(start + 3 * SECOND), None);
        assert_eq!(limiter.admit(start + 9 * SECOND), None);
        // 10 s after the window opened a new one starts, and its first line
        // reports the two dropped ones.
        assert_eq!(limiter.admit(start + 10 * SECOND), Some(2));
        assert_eq!(limiter.admit(start + 10 * SECOND), Some(0));
    }

    #[test]
    fn a_new_window_opens_at_the_first_line_after_the_old_one_ended() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(1, 10 * SECOND);
        assert_eq!(limiter.admit(start), Some(0));
        assert_eq!(limiter.admit(start + 100 * SECOND), Some(0));
        // The window now runs from 100 s to 110 s.
        assert_eq!(limiter.admit(start + 105 * SECOND), None);
        assert_eq!(limiter.admit(start + 110 * SECOND), Some(1));
    }

    #[test]
    fn a_clock_going_backwards_stays_in_the_current_window() {
        let start = Instant::now() + 100 * SECOND;
        let mut limiter = RateLimiter::new(1, 10 * SECOND);
        assert_eq!(limiter.admit(start), Some(0));
        assert_eq!(limiter.admit(start - 50 * SECOND), None);
        assert_eq!(limiter.admit(start + 10 * SECOND), Some(1));
    }

    #[test]
    fn a_zero_burst_drops_everything_and_counts_it() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(0, SECOND);
        assert_eq!(limiter.admit(start), None);
        assert_eq!(limiter.admit(start + 5 * SECOND), None);
    }

    #[test]
    fn clones_share_one_budget_and_the_totals_count_every_line() {
        let now = Arc::new(Mutex::new(Instant::now()));
        let log = GuestLog::with_clock(2, 10 * SECOND, Box::new(ManualClock { now: now.clone() }));
        let transport = log.clone();
        assert_eq!(log.admit(), Some(0));
        assert_eq!(transport.admit(), Some(0));
        for _ in 0..37 {
            assert_eq!(log.admit(), None);
        }
        assert_eq!(transport.admit(), None);
        assert_eq!((log.written_total(), log.suppressed_total()), (2, 38));
        *now.lock().unwrap() += 10 * SECOND;
        assert_eq!(transport.admit(), Some(38));
        assert_eq!((log.written_total(), log.suppressed_total()), (3, 38));
    }

    #[test]
    fn the_macros_admit_through_the_log_they_are_given() {
        let now = Arc::new(Mutex::new(Instant::now()));
        let log = GuestLog::with_clock(1, SECOND, Box::new(ManualClock { now }));
        for attempt in 0..5 {
            guest_warn!(log, attempt, "a guest did something odd");
        }
        guest_error!(log, "and then something worse");
        assert_eq!((log.written_total(), log.suppressed_total()), (1, 5));
    }

    #[test]
    fn guest_bytes_escape_newlines_escapes_and_non_ascii() {
        let forged = b"name\n2024-01-01 ERROR forged\x1b[31m\xff";
        assert_eq!(
            GuestBytes(forged).to_string(),
            "name\\n2024-01-01 ERROR forged\\x1b[31m\\xff"
        );
        assert_eq!(format!("{:?}", GuestBytes(b"a\"b")), "\"a\\\"b\"");
        assert!(!GuestBytes(forged).to_string().contains('\n'));
    }
}
