//! Event subscriptions: every subscriber gets every matching event, in its own bounded queue.
//!
//! Nothing is lost from the greeting on: until the first subscription, the hub keeps what arrives
//! in a backlog, which that subscription takes over. When a subscriber's queue is full, the
//! driver waits for it, up to [`Options::lag_after`](crate::Options::lag_after), holding the event
//! and everything read after it (so order is kept, and reading stops once the core's output
//! buffer is full: memory stays bounded). A subscriber still full after that is counted instead
//! of queued, until it has read down to half its queue; the count is delivered in order, as a
//! [`Lagged`] item, before the next event that fits. So a subscriber that keeps up loses
//! nothing, and one that stops reading delays the others (and command replies) by `lag_after` at
//! most, once per time it falls behind.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

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
    /// passes the name filter (for the events a first subscription takes over from before it,
    /// as the subscription reads them), with no lock of the client's held: keep it quick, and
    /// never wait in it (a blocking call there, such as a `qmp-blocking` command, stalls the
    /// connection it waits on). Methods that do not wait, such as `subscribe`, are fine.
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
/// point of its stream, after the connection had waited
/// [`Options::lag_after`](crate::Options::lag_after) for it to read. Other subscribers were not
/// affected. For a first subscription, the events dropped before it subscribed count whatever
/// their name (they were dropped before its filter was known).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("missed {missed} events: the subscriber fell behind")]
pub struct Lagged {
    /// How many events were missed.
    pub missed: u64,
}

/// What a subscription's stream yields.
pub type EventItem = Result<Event, Lagged>;

struct Queue {
    /// Events from before the first subscription, taken over from the [`Backlog`]; not yet
    /// matched against the filter (that runs as they are read, with no lock held), with a
    /// `Lagged` marker where the backlog was full. They come before `items`.
    early: VecDeque<EventItem>,
    /// Events, with a `Lagged` marker where events were dropped.
    items: VecDeque<EventItem>,
    /// Events dropped since the last one queued.
    missed: u64,
    closed: bool,
    waker: Option<Waker>,
    /// When the driver found the queue full, if it has not been read down to half since: the
    /// driver waits for room until `lag_after` after this, then counts events as missed.
    full_since: Option<Instant>,
    /// The connection's task, waiting for room.
    producer: Option<Waker>,
}

impl Queue {
    fn len(&self) -> usize {
        self.early.len() + self.items.len()
    }

    /// An item was taken: once the queue is down to half, it is no longer behind, and the
    /// driver, if it waits, gets a batch's worth of room (waking it per item would cost a
    /// context switch per event).
    fn taken(&mut self, capacity: usize) -> Option<Waker> {
        if self.len() * 2 > capacity {
            return None;
        }
        self.full_since = None;
        self.producer.take()
    }
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

/// What the driver passes along to deliver events.
pub(crate) struct Delivery<'a> {
    /// The connection's task, woken when a full queue it waits for has room.
    pub(crate) waker: &'a Waker,
    /// Subscribers to wake once the batch of outputs at hand is delivered.
    pub(crate) wakes: &'a mut Vec<Waker>,
    /// [`Options::lag_after`](crate::Options::lag_after).
    pub(crate) lag_after: Duration,
    /// A time known to have passed (the timer fired for it), in case the clock reads a hair
    /// earlier.
    pub(crate) passed: Option<Instant>,
}

impl Delivery<'_> {
    fn now(&self) -> Instant {
        let now = Instant::now();
        self.passed.map_or(now, |p| now.max(p))
    }

    /// A full queue, full since `full_since` (set now if unset): until when to wait for it, if
    /// still (`Some(None)` is for ever), with the driver's waker registered as its `producer`.
    fn wait(
        &self,
        full_since: &mut Option<Instant>,
        producer: &mut Option<Waker>,
    ) -> Option<Option<Instant>> {
        if self.lag_after.is_zero() {
            return None;
        }
        let now = self.now();
        let since = *full_since.get_or_insert(now);
        let until = match since.checked_add(self.lag_after) {
            None => None,
            Some(until) if now < until => Some(until),
            Some(_) => return None,
        };
        if !producer.as_ref().is_some_and(|w| w.will_wake(self.waker)) {
            *producer = Some(self.waker.clone());
        }
        Some(until)
    }
}

/// What became of an event pushed to a queue.
pub(crate) enum Pushed {
    /// Queued, counted as missed, or discarded (the subscription is gone); `half`: the queue is
    /// at least half full.
    Done { half: bool },
    /// The queue is full and the driver should wait for room, until `until` (`None`: for ever).
    /// The driver's waker is registered with the queue.
    Full {
        event: Event,
        until: Option<Instant>,
    },
}

impl Subscriber {
    /// Queues `event`, or, when the queue is full, asks the driver to wait or counts the event
    /// as missed; a waiting subscriber's waker goes to `d.wakes`.
    fn push(&self, event: Event, d: &mut Delivery<'_>) -> Pushed {
        let mut q = lock(&self.queue);
        if q.closed {
            return Pushed::Done { half: false };
        }
        if q.len() >= self.capacity {
            let q = &mut *q;
            if let Some(until) = d.wait(&mut q.full_since, &mut q.producer) {
                return Pushed::Full { event, until };
            }
            q.missed += 1;
            return Pushed::Done { half: true };
        }
        if q.missed > 0 {
            // The marker goes where the gap is; it may take the queue one past its capacity.
            let missed = std::mem::take(&mut q.missed);
            q.items.push_back(Err(Lagged { missed }));
        }
        q.items.push_back(Ok(event));
        d.wakes.extend(q.waker.take());
        Pushed::Done {
            half: q.len() * 2 >= self.capacity,
        }
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
            (
                std::mem::take(&mut q.early),
                std::mem::take(&mut q.items),
                q.waker.take(),
                q.producer.take(),
            )
        };
        // A driver waiting for room goes on (it finds the queue closed).
        if let Some(producer) = &freed.3 {
            producer.wake_by_ref();
        }
        drop(freed);
    }

    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<EventItem>> {
        loop {
            let mut q = lock(&self.queue);
            let (item, early) = match q.early.pop_front() {
                Some(item) => (item, true),
                None => match q.items.pop_front() {
                    Some(item) => (item, false),
                    None if q.missed > 0 => {
                        let missed = std::mem::take(&mut q.missed);
                        return Poll::Ready(Some(Err(Lagged { missed })));
                    }
                    None if q.closed => return Poll::Ready(None),
                    None => {
                        q.waker = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                },
            };
            let producer = q.taken(self.capacity);
            drop(q);
            // Outside the lock: waking may run executor code.
            if let Some(p) = producer {
                p.wake();
            }
            match item {
                // Taken over from the backlog: matched here, with no lock held, as the driver
                // would have (a predicate may subscribe).
                Ok(event) if early && !self.filter.matches(&event) => {}
                item => return Poll::Ready(Some(item)),
            }
        }
    }
}

/// The events published before the first subscription, for it to take over: without it, the
/// events that come with the `qmp_capabilities` reply, or right after, would be gone before the
/// caller could subscribe. Bounded like a subscriber's queue.
pub(crate) struct Backlog {
    capacity: usize,
    state: Mutex<BacklogState>,
}

struct BacklogState {
    /// Events, with a `Lagged` marker where events were dropped.
    items: VecDeque<EventItem>,
    /// Events dropped since the last one kept.
    missed: u64,
    /// When the connection became ready. A full backlog is waited for until `lag_after` after
    /// that (a flood at connect is kept while the caller subscribes; a program that never
    /// subscribes stalls once, then drops), not before (nobody could subscribe yet).
    ready_at: Option<Instant>,
    /// The connection's task, waiting for room.
    producer: Option<Waker>,
    /// The first subscriber, once it took the backlog over: events published through a view
    /// that still holds the backlog go to it, after what it took over.
    claimed: Option<Arc<Subscriber>>,
}

impl Backlog {
    fn push(&self, event: Event, d: &mut Delivery<'_>) -> Pushed {
        let mut b = lock(&self.state);
        if let Some(sub) = b.claimed.clone() {
            // Outside the lock, so the filter's predicate runs with none held. The driver is the
            // only publisher: everything it published before the claim was taken over, so order
            // holds.
            drop(b);
            return if sub.filter.matches(&event) {
                sub.push(event, d)
            } else {
                Pushed::Done { half: false }
            };
        }
        if b.items.len() >= self.capacity {
            if b.ready_at.is_some() {
                // The backlog counts as full since the connection became ready.
                let b = &mut *b;
                if let Some(until) = d.wait(&mut b.ready_at, &mut b.producer) {
                    return Pushed::Full { event, until };
                }
            }
            b.missed += 1;
            return Pushed::Done { half: false };
        }
        if b.missed > 0 {
            let missed = std::mem::take(&mut b.missed);
            b.items.push_back(Err(Lagged { missed }));
        }
        b.items.push_back(Ok(event));
        // Nobody reads it yet: no reason to yield.
        Pushed::Done { half: false }
    }

    /// `sub`, the first subscriber, takes the backlog over, before the driver can deliver
    /// anything else to it.
    fn claim(&self, sub: &Arc<Subscriber>) {
        let producer = {
            let mut b = lock(&self.state);
            let mut q = lock(&sub.queue);
            q.early = std::mem::take(&mut b.items);
            if b.missed > 0 {
                let missed = std::mem::take(&mut b.missed);
                q.early.push_back(Err(Lagged { missed }));
            }
            b.claimed = Some(Arc::clone(sub));
            b.producer.take()
        };
        // A driver waiting for room goes on: the events now wait on `sub`, its reader.
        if let Some(p) = producer {
            p.wake();
        }
    }
}

/// Where an event waits to be delivered.
enum Target {
    Subscriber(Arc<Subscriber>),
    Backlog(Arc<Backlog>),
}

impl Target {
    fn push(&self, event: Event, d: &mut Delivery<'_>) -> Pushed {
        match self {
            Self::Subscriber(sub) => sub.push(event, d),
            Self::Backlog(backlog) => backlog.push(event, d),
        }
    }
}

/// An event the driver holds back, delivered to every subscriber but those whose queue was full:
/// it waits for room in those (until a deadline) before it dispatches anything read after it.
pub(crate) struct Held {
    event: Event,
    waiting: Vec<Target>,
    /// The earliest deadline of the queues it waits for; `None`: none.
    until: Option<Instant>,
}

impl Held {
    /// When the driver must try again even if no queue got room: a wait ends then.
    pub(crate) fn until(&self) -> Option<Instant> {
        self.until
    }

    /// Tries the queues that were full again. Returns whether the event is now delivered (or
    /// counted as missed) everywhere.
    pub(crate) fn retry(&mut self, d: &mut Delivery<'_>) -> bool {
        let mut until = None;
        let event = &self.event;
        self.waiting
            .retain(|target| match target.push(event.clone(), d) {
                Pushed::Done { .. } => false,
                Pushed::Full { until: u, .. } => {
                    until = until.into_iter().chain(u).min();
                    true
                }
            });
        self.until = until;
        self.waiting.is_empty()
    }
}

/// What became of a published event.
pub(crate) enum Published {
    /// Delivered to every matching subscriber; `pressure`: a queue is half full or more, and
    /// the driver should let other tasks (the subscribers) run before it reads on.
    Delivered { pressure: bool },
    /// Some queues were full: the driver holds the event back.
    Held(Held),
}

/// The subscribers of one connection.
pub(crate) struct Hub {
    subscribers: Mutex<Subscribers>,
    /// Bumped whenever a subscriber comes or goes, so the driver knows to refresh its
    /// [`HubView`].
    generation: AtomicU64,
    closed: AtomicBool,
}

struct Subscribers {
    list: Vec<Arc<Subscriber>>,
    /// Until the first subscription: then the list is empty.
    backlog: Option<Arc<Backlog>>,
}

/// The driver's copy of the subscriber list, refreshed when the [`Hub`] changes: events are
/// matched and delivered without the hub's lock, so a filter's predicate runs with no lock held
/// (it may even subscribe) and an event costs no lock but its subscriber's queue.
#[derive(Default)]
pub(crate) struct HubView {
    subscribers: Vec<Arc<Subscriber>>,
    backlog: Option<Arc<Backlog>>,
    generation: u64,
}

impl Hub {
    /// A hub whose events wait in a backlog of `backlog` events until the first subscription
    /// (`None`: no backlog, for a guest agent, which sends no events).
    pub(crate) fn new(backlog: Option<usize>) -> Self {
        let backlog = backlog.map(|capacity| {
            Arc::new(Backlog {
                capacity: capacity.max(1),
                state: Mutex::new(BacklogState {
                    items: VecDeque::new(),
                    missed: 0,
                    ready_at: None,
                    producer: None,
                    claimed: None,
                }),
            })
        });
        Self {
            subscribers: Mutex::new(Subscribers {
                list: Vec::new(),
                backlog,
            }),
            // Ahead of a fresh view's, so the driver's first refresh takes the backlog.
            generation: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        }
    }

    /// The connection became ready at `now`: a full backlog waits for the first subscription
    /// until `lag_after` later.
    pub(crate) fn ready(&self, now: Instant) {
        let backlog = lock(&self.subscribers).backlog.clone();
        if let Some(backlog) = backlog {
            lock(&backlog.state).ready_at.get_or_insert(now);
        }
    }

    pub(crate) fn subscribe(&self, filter: EventFilter, capacity: usize) -> Arc<Subscriber> {
        let sub = Arc::new(Subscriber {
            filter,
            capacity: capacity.max(1),
            queue: Mutex::new(Queue {
                early: VecDeque::new(),
                items: VecDeque::new(),
                missed: 0,
                closed: false,
                waker: None,
                full_since: None,
                producer: None,
            }),
        });
        let mut subs = lock(&self.subscribers);
        // The first subscription takes over what came before it, even after the connection
        // closed (those events still happened). Lock order: hub, backlog, subscriber.
        if let Some(backlog) = subs.backlog.take() {
            backlog.claim(&sub);
        }
        if self.closed.load(Ordering::Acquire) {
            sub.close();
        } else {
            subs.list.push(Arc::clone(&sub));
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
            let at = subs
                .list
                .iter()
                .position(|s| std::ptr::eq(Arc::as_ptr(s), sub));
            at.map(|at| subs.list.remove(at))
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

    /// Delivers `event` to every subscriber whose filter matches (to the backlog before the
    /// first subscription). The wakers of subscribers that were waiting go to `d.wakes`, for the
    /// driver to wake once it has delivered everything it read: a subscriber on another thread
    /// then takes a batch per wake-up instead of being woken (a context switch on a busy CPU)
    /// for each event.
    pub(crate) fn publish(
        &self,
        view: &mut HubView,
        event: Event,
        d: &mut Delivery<'_>,
    ) -> Published {
        self.refresh(view);
        if let Some(backlog) = &view.backlog {
            return match backlog.push(event, d) {
                Pushed::Done { half } => Published::Delivered { pressure: half },
                Pushed::Full { event, until } => Published::Held(Held {
                    event,
                    waiting: vec![Target::Backlog(Arc::clone(backlog))],
                    until,
                }),
            };
        }
        let mut pressure = false;
        // The full queues, and a copy of the event to wait with; rare, so no allocation until
        // then.
        let mut waiting = Vec::new();
        let mut kept = None;
        let mut until = None;
        let mut outcome = |sub: &Arc<Subscriber>, pushed| match pushed {
            Pushed::Done { half } => pressure |= half,
            Pushed::Full { event, until: u } => {
                waiting.push(Target::Subscriber(Arc::clone(sub)));
                kept = Some(event);
                until = until.into_iter().chain(u).min();
            }
        };
        // Clone for all matches but the last, which takes the event itself.
        let mut last: Option<&Arc<Subscriber>> = None;
        for sub in view.subscribers.iter().filter(|s| s.filter.matches(&event)) {
            if let Some(prev) = last.replace(sub) {
                outcome(prev, prev.push(event.clone(), d));
            }
        }
        if let Some(sub) = last {
            outcome(sub, sub.push(event, d));
        }
        match kept {
            Some(event) => Published::Held(Held {
                event,
                waiting,
                until,
            }),
            None => Published::Delivered { pressure },
        }
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
            let (fresh, backlog) = {
                let subs = lock(&self.subscribers);
                (subs.list.clone(), subs.backlog.clone())
            };
            let old = std::mem::replace(&mut view.subscribers, fresh);
            let old_backlog = std::mem::replace(&mut view.backlog, backlog);
            view.generation = generation;
            // Outside the lock: dropping a filter drops what its predicate captured, whose own
            // `Drop` may subscribe.
            drop((old, old_backlog));
        }
    }

    /// Ends every subscription's stream (after what is queued) and any made later.
    pub(crate) fn close(&self) {
        let subs = {
            let mut subs = lock(&self.subscribers);
            self.closed.store(true, Ordering::Release);
            std::mem::take(&mut subs.list)
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
/// [`Options::event_buffer`](crate::Options::event_buffer) events; when it is full the connection
/// waits [`Options::lag_after`](crate::Options::lag_after) for it), and ends when the connection
/// closes. Dropping it unsubscribes. The first subscription of a connection starts with the
/// events that came before it (see [`Client::subscribe`](crate::Client::subscribe)).
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

#[cfg(test)]
mod tests {
    use qmp_proto::{Config, Connection, Output};

    use super::*;

    /// Events named as given, as the core delivers them (numbered in `data.i`).
    fn events(names: &[&str]) -> Vec<Event> {
        let mut conn = Connection::new(Config::default());
        let mut input = String::from(
            r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}"#,
        );
        for (i, name) in names.iter().enumerate() {
            input.push_str(&format!(
                r#"{{"event": "{name}", "data": {{"i": {i}}}, "timestamp": {{"seconds": 1, "microseconds": 2}}}}"#
            ));
        }
        conn.handle_input(input.as_bytes());
        std::iter::from_fn(|| conn.poll_output())
            .filter_map(|o| match o {
                Output::Event(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    fn next(sub: &Subscriber) -> Poll<Option<EventItem>> {
        sub.poll_next(&mut Context::from_waker(Waker::noop()))
    }

    fn index(item: Poll<Option<EventItem>>) -> u64 {
        match item {
            Poll::Ready(Some(Ok(e))) => e.data_value().expect("data")["i"].as_u64().expect("i"),
            other => panic!("{other:?}"),
        }
    }

    fn delivery(wakes: &mut Vec<Waker>, lag_after: Duration) -> Delivery<'_> {
        Delivery {
            waker: Waker::noop(),
            wakes,
            lag_after,
            passed: None,
        }
    }

    /// The first subscription gets the backlog's events that pass its filter, in order, with the
    /// count of those dropped where they were dropped; then what comes after.
    #[test]
    fn first_subscription_takes_the_backlog_over() {
        let hub = Hub::new(Some(4));
        let mut view = HubView::default();
        let mut wakes = Vec::new();
        // Not ready yet: a full backlog is not waited for.
        for e in events(&["A", "B", "A", "B", "A", "A"]) {
            let d = &mut delivery(&mut wakes, Duration::from_secs(1));
            assert!(matches!(
                hub.publish(&mut view, e, d),
                Published::Delivered { .. }
            ));
        }
        let sub = hub.subscribe(EventFilter::name("A"), 8);
        for e in events(&["A"; 8]).into_iter().skip(6) {
            let d = &mut delivery(&mut wakes, Duration::from_secs(1));
            assert!(matches!(
                hub.publish(&mut view, e, d),
                Published::Delivered { .. }
            ));
        }
        assert_eq!(index(next(&sub)), 0);
        assert_eq!(index(next(&sub)), 2);
        assert_eq!(next(&sub), Poll::Ready(Some(Err(Lagged { missed: 2 }))));
        assert_eq!(index(next(&sub)), 6);
        assert_eq!(index(next(&sub)), 7);
        assert_eq!(next(&sub), Poll::Pending);
        // The second subscription starts empty.
        let later = hub.subscribe(EventFilter::all(), 8);
        assert_eq!(next(&later), Poll::Pending);
    }

    /// A full queue holds the event until its reader has taken half; after `lag_after` it is
    /// counted as missed instead; with no wait it is counted at once.
    #[test]
    fn a_full_queue_is_waited_for_then_lags() {
        let hub = Hub::new(None);
        let mut view = HubView::default();
        let mut wakes = Vec::new();
        let sub = hub.subscribe(EventFilter::all(), 2);
        let mut evs = events(&["E"; 6]).into_iter();
        let wait = Duration::from_secs(3600);
        for e in evs.by_ref().take(2) {
            let d = &mut delivery(&mut wakes, wait);
            assert!(matches!(
                hub.publish(&mut view, e, d),
                Published::Delivered { .. }
            ));
        }
        let d = &mut delivery(&mut wakes, wait);
        let Published::Held(mut held) = hub.publish(&mut view, evs.next().expect("e2"), d) else {
            panic!("not held");
        };
        assert!(held.until().is_some());
        assert!(!held.retry(&mut delivery(&mut wakes, wait)));
        assert_eq!(index(next(&sub)), 0);
        assert!(held.retry(&mut delivery(&mut wakes, wait)));
        // Full again; the wait is over (as if `lag_after` had passed): counted, not held.
        let d = &mut delivery(&mut wakes, Duration::ZERO);
        assert!(matches!(
            hub.publish(&mut view, evs.next().expect("e3"), d),
            Published::Delivered { pressure: true }
        ));
        assert_eq!(index(next(&sub)), 1);
        assert_eq!(index(next(&sub)), 2);
        assert_eq!(next(&sub), Poll::Ready(Some(Err(Lagged { missed: 1 }))));
        assert_eq!(next(&sub), Poll::Pending);
    }
}
