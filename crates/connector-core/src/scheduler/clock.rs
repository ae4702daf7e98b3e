//! Time as the scheduler sees it: [`SystemClock`] in production, [`ManualClock`] in tests.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use futures::future::BoxFuture;
use tokio::sync::watch;

/// The scheduler's source of time: what time it is, and a way to wait for a moment.
///
/// Due times are wall-clock instants (UTC), because schedules are: "every day at 02:00 in
/// New York". [`SystemClock`] follows the system clock; [`ManualClock`] only moves when a test
/// moves it, so scheduling tests are deterministic.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current instant.
    fn now(&self) -> DateTime<Utc>;

    /// A future that completes once [`now`](Clock::now) is at or past `deadline` (at once if it
    /// already is).
    fn sleep_until(&self, deadline: DateTime<Utc>) -> BoxFuture<'static, ()>;
}

/// The system clock, with tokio's timer for waiting.
///
/// A wait re-reads the clock when the timer fires and waits again if the clock was set back in
/// the meantime, so a due time is never run early.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, deadline: DateTime<Utc>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            loop {
                let left = deadline - Utc::now();
                if left <= TimeDelta::zero() {
                    return;
                }
                tokio::time::sleep(left.to_std().unwrap_or(Duration::ZERO)).await;
            }
        })
    }
}

/// A clock that stands still until told to move: [`advance`](ManualClock::advance) or
/// [`set`](ManualClock::set). Moving it wakes every sleeper whose deadline is reached.
///
/// ```
/// # use connector_core::scheduler::{Clock, ManualClock};
/// # use chrono::{TimeZone, Utc};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 8, 6, 0, 0).unwrap());
/// let wake = clock.sleep_until(clock.now() + chrono::TimeDelta::minutes(5));
/// clock.advance(std::time::Duration::from_secs(300));
/// wake.await; // returns: the clock reached the deadline
/// # }
/// ```
pub struct ManualClock {
    now: watch::Sender<DateTime<Utc>>,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        Self { now: watch::Sender::new(start) }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = TimeDelta::from_std(by).expect("a duration that fits a TimeDelta");
        self.now.send_modify(|now| *now += by);
    }

    /// Sets the clock to `to` (forward or back; sleepers wake when it reaches their deadline).
    pub fn set(&self, to: DateTime<Utc>) {
        self.now.send_replace(to);
    }

    /// How many futures from [`sleep_until`](Clock::sleep_until) are alive (waiting or not yet
    /// polled). Lets a test wait until the code under test has gone to sleep.
    pub fn sleepers(&self) -> usize {
        self.now.receiver_count()
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock").field("now", &*self.now.borrow()).finish()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.borrow()
    }

    fn sleep_until(&self, deadline: DateTime<Utc>) -> BoxFuture<'static, ()> {
        let mut now = self.now.subscribe();
        Box::pin(async move {
            loop {
                if *now.borrow_and_update() >= deadline {
                    return;
                }
                if now.changed().await.is_err() {
                    // The clock is gone: time stands still forever.
                    std::future::pending::<()>().await;
                }
            }
        })
    }
}
