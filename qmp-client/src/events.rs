//! Event subscriptions: every subscriber gets every matching event, in its own bounded queue.
//!
//! The driver never waits for a subscriber. When a subscriber's queue is full, events for it are
//! counted instead of queued, and the count is delivered in order, as a [`Lagged`] item, before
//! the next event that fits: nothing is lost silently, and a slow subscriber stalls nobody.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_core::Stream;
use qmp_proto::Event;
use serde_json::Value;

use crate::client::Shared;
use crate::error::Error;

/// Which events a subscription receives. The default receives all of them.
///
/// ```
/// use qmp_client::EventFilter;
/// use serde_json::json;
///
/// // JOB_STATUS_CHANGE events of job0 reaching "pending", matched like QEMU's own test harness
/// // does: every member of the pattern must be present in the data and equal.
/// let filter = EventFilter::name("JOB_STATUS_CHANGE").data(json!({"id": "job0", "status": "pending"}));
/// # let _ = filter;
/// let any_block_job = EventFilter::names(["BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"])
///     .predicate(|event| event.data_value().is_ok_and(|d| d["device"] == "job0"));
/// # let _ = any_block_job;
/// ```
#[derive(Clone, Default)]
pub struct EventFilter {
    names: Option<BTreeSet<String>>,
    pattern: Option<Value>,
    predicate: Option<Predicate>,
}

type Predicate = Arc<dyn Fn(&Event) -> bool + Send + Sync>;

impl fmt::Debug for EventFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventFilter")
            .field("names", &self.names)
            .field("pattern", &self.pattern)
            .field("predicate", &self.predicate.is_some())
            .finish()
    }
}

impl EventFilter {
    /// Every event.
    pub fn all() -> Self {
        Self::default()
    }

    /// Events with this name.
    pub fn name(name: impl Into<String>) -> Self {
        Self::names([name])
    }

    /// Events with any of these names.
    pub fn names<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            names: Some(names.into_iter().map(Into::into).collect()),
            ..Self::default()
        }
    }

    /// Also require the event's data to contain `pattern`: objects match when every member of the
    /// pattern is present and matches, recursively; anything else must be equal.
    pub fn data(mut self, pattern: Value) -> Self {
        self.pattern = Some(pattern);
        self
    }

    /// Also require `predicate` to hold. It runs on the connection's driver for every event that
    /// passes the name filter, with no lock of the client's held: keep it quick, and never wait
    /// in it (a blocking call there, such as a `qmp-blocking` command, stalls the connection it
    /// waits on). Methods that do not wait, such as `subscribe`, are fine.
    pub fn predicate(mut self, predicate: impl Fn(&Event) -> bool + Send + Sync + 'static) -> Self {
        self.predicate = Some(Arc::new(predicate));
        self
    }

    /// Whether `event` passes.
    pub fn matches(&self, event: &Event) -> bool {
        if self
            .names
            .as_ref()
            .is_some_and(|n| !n.contains(&event.name))
        {
            return false;
        }
        if let Some(pattern) = &self.pattern {
            let Ok(data) = event.data_value() else {
                return false;
            };
            if !pattern_matches(pattern, &data) {
                return false;
            }
        }
        self.predicate.as_ref().is_none_or(|p| p(event))
    }
}

/// Partial matching of JSON, as QEMU's `event_match`: objects by subset, the rest by equality.
fn pattern_matches(pattern: &Value, value: &Value) -> bool {
    match (pattern, value) {
        (Value::Object(p), Value::Object(v)) => p
            .iter()
            .all(|(k, pv)| v.get(k).is_some_and(|vv| pattern_matches(pv, vv))),
        _ => pattern == value,
    }
}

/// A subscriber fell behind: `missed` events that matched its filter were dropped for it, at this
/// point of its stream. Other subscribers and command responses were not affected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("missed {missed} events: the subscriber fell behind")]
pub struct Lagged {
    /// How many events were missed.
    pub missed: u64,
}

/// What a subscription's stream yields.
pub type EventItem = Result<Event, Lagged>;

struct Queue {
    /// Events, with a `Lagged` marker where events were dropped.
    items: VecDeque<EventItem>,
    /// Events dropped since the last one queued.
    missed: u64,
    closed: bool,
    waker: Option<Waker>,
}

pub(crate) struct Subscriber {
    filter: EventFilter,
    capacity: usize,
    queue: Mutex<Queue>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a few field updates that cannot leave the data half-changed,
    // so a lock poisoned by a panic elsewhere is still sound to use.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Subscriber {
    /// Queues `event`, or counts it as missed when the queue is full; a waiting subscriber's
    /// waker goes to `wakes`. Returns whether the queue is at least half full.
    fn push(&self, event: Event, wakes: &mut Vec<Waker>) -> bool {
        let mut q = lock(&self.queue);
        if q.closed {
            return false;
        }
        if q.items.len() >= self.capacity {
            q.missed += 1;
            return true;
        }
        if q.missed > 0 {
            // The marker goes where the gap is; it may take the queue one past its capacity.
            let missed = std::mem::take(&mut q.missed);
            q.items.push_back(Err(Lagged { missed }));
        }
        q.items.push_back(Ok(event));
        wakes.extend(q.waker.take());
        q.items.len() * 2 >= self.capacity
    }

    fn close(&self) {
        let waker = {
            let mut q = lock(&self.queue);
            q.closed = true;
            q.waker.take()
        };
        // Outside the lock: waking may run executor code that drops a subscription.
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Its subscription is gone: stop queueing, and free what was queued.
    fn unsubscribe(&self) {
        let freed = {
            let mut q = lock(&self.queue);
            q.closed = true;
            (std::mem::take(&mut q.items), q.waker.take())
        };
        drop(freed);
    }

    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<EventItem>> {
        let mut q = lock(&self.queue);
        if let Some(item) = q.items.pop_front() {
            return Poll::Ready(Some(item));
        }
        if q.missed > 0 {
            let missed = std::mem::take(&mut q.missed);
            return Poll::Ready(Some(Err(Lagged { missed })));
        }
        if q.closed {
            return Poll::Ready(None);
        }
        q.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// The subscribers of one connection.
#[derive(Default)]
pub(crate) struct Hub {
    subscribers: Mutex<Vec<Arc<Subscriber>>>,
    /// Bumped whenever a subscriber comes or goes, so the driver knows to refresh its
    /// [`HubView`].
    generation: AtomicU64,
    closed: AtomicBool,
}

/// The driver's copy of the subscriber list, refreshed when the [`Hub`] changes: events are
/// matched and delivered without the hub's lock, so a filter's predicate runs with no lock held
/// (it may even subscribe) and an event costs no lock but its subscriber's queue.
#[derive(Default)]
pub(crate) struct HubView {
    subscribers: Vec<Arc<Subscriber>>,
    generation: u64,
}

impl Hub {
    pub(crate) fn subscribe(&self, filter: EventFilter, capacity: usize) -> Arc<Subscriber> {
        let sub = Arc::new(Subscriber {
            filter,
            capacity: capacity.max(1),
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                missed: 0,
                closed: false,
                waker: None,
            }),
        });
        let mut subs = lock(&self.subscribers);
        if self.closed.load(Ordering::Acquire) {
            sub.close();
        } else {
            subs.push(Arc::clone(&sub));
            // Before the caller can send a command whose events it must see: the driver takes
            // that command (through a lock) after this, so it sees the new generation.
            self.changed();
        }
        sub
    }

    /// Subscriber `sub`'s subscription was dropped: it leaves the list now (so subscriptions
    /// that come and go between events do not pile up). Returns whether the connection's task
    /// may still hold it in its view, and should be woken to refresh that.
    fn unsubscribed(&self, sub: *const Subscriber) -> bool {
        let gone = {
            let mut subs = lock(&self.subscribers);
            let at = subs.iter().position(|s| std::ptr::eq(Arc::as_ptr(s), sub));
            at.map(|at| subs.remove(at))
        };
        // Out of the list, under its lock, nobody can take another reference: one besides ours
        // is the task's. Not in the list: the hub closed, and the task is ending anyway.
        let held = gone.as_ref().is_none_or(|s| Arc::strong_count(s) > 1);
        // Outside the lock, since dropping a filter drops what its predicate captured, whose own
        // `Drop` may subscribe; and before the change is announced, so that if the connection's
        // task holds the filter too, the task is the one to drop it.
        drop(gone);
        self.changed();
        held
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Delivers `event` to every subscriber whose filter matches. The wakers of subscribers that
    /// were waiting go to `wakes`, for the driver to wake once it has delivered everything it
    /// read: a subscriber on another thread then takes a batch per wake-up instead of being woken
    /// (a context switch on a busy CPU) for each event. Returns whether a subscriber's queue is half full or more: the driver then lets
    /// other tasks (the subscribers) run before it reads on.
    pub(crate) fn publish(&self, view: &mut HubView, event: Event, wakes: &mut Vec<Waker>) -> bool {
        self.refresh(view);
        // Clone for all matches but the last, which takes the event itself.
        let mut last: Option<&Arc<Subscriber>> = None;
        let mut pressure = false;
        for sub in view.subscribers.iter().filter(|s| s.filter.matches(&event)) {
            if let Some(prev) = last.replace(sub) {
                pressure |= prev.push(event.clone(), wakes);
            }
        }
        if let Some(sub) = last {
            pressure |= sub.push(event, wakes);
        }
        pressure
    }

    /// Brings the driver's view up to date if a subscriber came or went. The driver also calls
    /// this whenever it is woken, and a dropped subscription wakes it: the filter it held (and
    /// whatever its predicate captured) is let go of at once, not at the next event, which may
    /// be hours away.
    pub(crate) fn refresh(&self, view: &mut HubView) {
        // A few rounds at most: subscriptions that keep coming and going must not hold the task
        // here. One dropped meanwhile also wakes the task, which then refreshes again.
        for _ in 0..3 {
            // Read before the list: a subscription dropped meanwhile bumps it again, and the loop
            // goes round once more (so does one dropped by the filters this refresh lets go of).
            let generation = self.generation.load(Ordering::Acquire);
            if generation == view.generation {
                return;
            }
            // Dropped subscriptions took themselves out of the list (`unsubscribed`).
            let fresh = lock(&self.subscribers).clone();
            let old = std::mem::replace(&mut view.subscribers, fresh);
            view.generation = generation;
            // Outside the lock: dropping a filter drops what its predicate captured, whose own
            // `Drop` may subscribe.
            drop(old);
        }
    }

    /// Ends every subscription's stream (after what is queued) and any made later.
    pub(crate) fn close(&self) {
        let subs = {
            let mut subs = lock(&self.subscribers);
            self.closed.store(true, Ordering::Release);
            std::mem::take(&mut *subs)
        };
        self.changed();
        // Outside the lock: waking a subscriber may run executor code that drops a subscription
        // (which takes the lock), and dropping a filter drops what its predicate captured.
        for sub in &subs {
            sub.close();
        }
        drop(subs);
    }
}

/// A stream of the events that match a filter, from [`Client::subscribe`](crate::Client::subscribe).
///
/// It yields `Ok(event)` in arrival order, `Err(Lagged)` where it fell behind and events were
/// dropped for it (its queue holds
/// [`Options::event_buffer`](crate::Options::event_buffer) events), and ends when the
/// connection closes. Dropping it unsubscribes.
pub struct Subscription {
    /// `None` only while it is dropped.
    sub: Option<Arc<Subscriber>>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("filter", &self.sub.as_ref().map(|s| &s.filter))
            .finish_non_exhaustive()
    }
}

impl Subscription {
    pub(crate) fn new(sub: Arc<Subscriber>, shared: Arc<Shared>) -> Self {
        Self {
            sub: Some(sub),
            shared,
        }
    }

    /// The next item, or `None` once the connection has closed and the queue is empty.
    pub async fn recv(&mut self) -> Option<EventItem> {
        std::future::poll_fn(|cx| self.poll_item(cx)).await
    }

    /// The next event within `timeout`: [`Error::Timeout`] if none came,
    /// [`Error::Disconnected`] if the connection closed, [`Error::Lagged`] if events were missed
    /// (the next call carries on after them).
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Event, Error> {
        self.wait_for(&EventFilter::all(), timeout).await
    }

    /// The next event that also passes `filter`, within `timeout`; events that do not pass are
    /// skipped. With a filter of its own this is the "run a command, then wait for its event"
    /// step; see [`Client::wait_for`](crate::Client::wait_for).
    pub async fn wait_for(
        &mut self,
        filter: &EventFilter,
        timeout: Duration,
    ) -> Result<Event, Error> {
        let sleep = self.shared.runtime.sleep(timeout);
        let wait = async {
            loop {
                match self.recv().await {
                    Some(Ok(event)) if filter.matches(&event) => return Ok(event),
                    Some(Ok(_)) => {}
                    Some(Err(Lagged { missed })) => return Err(Error::Lagged { missed }),
                    None => return Err(Error::Disconnected(self.shared.disconnect_reason())),
                }
            }
        };
        crate::client::race(wait, sleep)
            .await
            .unwrap_or(Err(Error::Timeout))
    }
}

impl Subscription {
    fn poll_item(&self, cx: &mut Context<'_>) -> Poll<Option<EventItem>> {
        match &self.sub {
            Some(sub) => sub.poll_next(cx),
            None => Poll::Ready(None),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Some(sub) = self.sub.take() else {
            return;
        };
        sub.unsubscribe();
        let id = Arc::as_ptr(&sub);
        // Our reference goes before the hub changes: the filter, and what its predicate captured,
        // is then dropped here, or by the connection's task when it next refreshes its view (if
        // that holds it), not by whichever of the two happens to let go last.
        drop(sub);
        if self.shared.hub.unsubscribed(id) {
            // Have the task refresh its view now, not at the next event, which may be hours away.
            self.shared.calls.wake_task();
        }
    }
}

impl Stream for Subscription {
    type Item = EventItem;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<EventItem>> {
        self.poll_item(cx)
    }
}
