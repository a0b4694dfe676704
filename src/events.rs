//! Fan-out: turns one event into one signed delivery row per matching
//! subscription, in the caller's transaction. Subscriptions (with their keys)
//! and open campaign goals are cached per backend and reloaded only when a
//! committed change bumps the shared generation, so a click costs no extra
//! query beyond the inserts.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use pgrx::prelude::*;
use serde_json::Value;

use crate::error::Result;
use crate::filters::{Facts, Filters};
use crate::guc;
use crate::limits;
use crate::linkstore;
use crate::payload::{EventType, IpMode};
use crate::plans::{self, INT8, INT8_ARRAY, TEXT, TEXT_ARRAY, TIMESTAMPTZ};
use crate::queue;
pub use crate::queue::Queued;
use crate::shared;
use crate::signing::{KeyRing, signature_header};

/// A subscription as the fan-out needs it.
pub struct CachedSubscription {
    pub id: i64,
    /// Bit set of wanted event types (`EventType::bit`); all bits when NULL.
    event_mask: u32,
    filters: Filters,
    pub ip_mode: IpMode,
    keys: KeyRing,
    /// Disabled or paused since (Unix milliseconds): its events are held
    /// (queued, not sent) until `linkhooks.hold_window` after this. None: it delivers.
    held_since_ms: Option<i64>,
    /// It asked for link.clicks.digest (this many minutes) instead of one event per click.
    pub digest_minutes: Option<i64>,
}

pub struct Cache {
    generation: u64,
    pub subscriptions: Vec<CachedSubscription>,
    /// Campaigns with a click goal that is not reached yet.
    pub goal_campaigns: HashSet<String>,
}

impl CachedSubscription {
    pub fn filters(&self) -> &Filters {
        &self.filters
    }

    pub fn wants(&self, kind: EventType) -> bool {
        self.event_mask & kind.bit() != 0
    }
}

impl Cache {
    /// Milestone thresholds that subscriptions to `kind` list in their filters,
    /// with which clicks each counts.
    pub fn subscriber_milestones(
        &self,
        kind: EventType,
    ) -> impl Iterator<Item = (&[i64], crate::milestones::Counted)> {
        self.subscriptions
            .iter()
            .filter(move |s| s.event_mask & kind.bit() != 0)
            .filter_map(|s| s.filters.milestones())
    }
}

thread_local! {
    static CACHE: RefCell<Option<Rc<Cache>>> = const { RefCell::new(None) };
}

pub fn invalidate_cache() {
    CACHE.with(|c| c.borrow_mut().take());
}

/// The cache, reloaded when stale. Without shared memory (not preloaded) it
/// cannot know when others change subscriptions, so it reloads every time.
pub fn cache() -> Result<Rc<Cache>> {
    let generation = shared::config_generation();
    if shared::preloaded()
        && let Some(c) = CACHE.with(|c| c.borrow().clone())
        && c.generation == generation
    {
        return Ok(c);
    }
    let fresh = Rc::new(load_cache(generation)?);
    CACHE.with(|c| *c.borrow_mut() = Some(fresh.clone()));
    Ok(fresh)
}

fn load_cache(generation: u64) -> Result<Cache> {
    Spi::connect(|client| {
        let mut subscriptions = Vec::new();
        let query = if linkstore::subscriptions_hold_events() {
            "SELECT id, secret, previous_secret,
                    extract(epoch FROM previous_secret_expires_at)::bigint,
                    event_types, filters, ip_mode, (extract(epoch FROM held_since) * 1000)::bigint
             FROM linkhooks.subscriptions
            WHERE (enabled AND NOT paused) OR held_since IS NOT NULL ORDER BY id"
        } else {
            // A schema from before 0.5.0 (not updated yet): nothing is held.
            "SELECT id, secret, previous_secret,
                    extract(epoch FROM previous_secret_expires_at)::bigint,
                    event_types, filters, ip_mode, NULL::bigint
             FROM linkhooks.subscriptions WHERE enabled ORDER BY id"
        };
        let rows = client.select(query, None, &[])?;
        for row in rows {
            let id: i64 = row.get(1)?.unwrap_or_default();
            let secret: String = row.get(2)?.unwrap_or_default();
            let previous: Option<String> = row.get(3)?;
            let previous_until: Option<i64> = row.get(4)?;
            let types: Option<Vec<Option<String>>> = row.get(5)?;
            let filters: Option<pgrx::JsonB> = row.get(6)?;
            let ip_mode: String = row.get(7)?.unwrap_or_default();
            let held_since_ms: Option<i64> = row.get(8)?;
            // Rows are validated on write; one that no longer parses receives nothing
            // rather than failing every click.
            let (Ok(filters), Ok(keys)) = (
                Filters::parse(&filters.map_or(Value::Object(Default::default()), |j| j.0)),
                KeyRing::new(&secret, previous.as_deref(), previous_until),
            ) else {
                continue;
            };
            subscriptions.push(CachedSubscription {
                id,
                event_mask: event_mask(types.as_deref()),
                digest_minutes: filters.digest_minutes(),
                filters,
                ip_mode: IpMode::parse(&ip_mode).unwrap_or_default(),
                keys,
                held_since_ms,
            });
        }
        let mut goal_campaigns = HashSet::new();
        let rows =
            client.select("SELECT name FROM linkhooks.campaigns WHERE click_goal IS NOT NULL AND completed_at IS NULL", None, &[])?;
        for row in rows {
            if let Some(name) = row.get::<String>(1)? {
                goal_campaigns.insert(name);
            }
        }
        Ok(Cache {
            generation,
            subscriptions,
            goal_campaigns,
        })
    })
}

fn event_mask(types: Option<&[Option<String>]>) -> u32 {
    match types {
        // Every event type but the operational ones, which are asked for by name.
        None => EventType::ALL
            .into_iter()
            .filter(|t| !t.operational())
            .fold(0, |m, t| m | t.bit()),
        Some(list) => list
            .iter()
            .flatten()
            .filter_map(|t| EventType::parse(t))
            .fold(0, |m, t| m | t.bit()),
    }
}

/// A new event id: a UUIDv7 (Unix milliseconds, then random bits). Ids that
/// grow with time append to the deliveries index on event_id at its right
/// edge instead of landing on a random page of it.
pub fn new_event_id() -> uuid::Uuid {
    uuid::Uuid::now_v7()
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub fn unix_now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Queues `kind` for every subscription that wants it and whose filters
/// match: those that deliver, and those disabled or paused for less than
/// `linkhooks.hold_window` (held until they deliver again). `build` makes the
/// body for one IP mode; it is called at most once per mode. Returns how many
/// deliveries were queued.
pub fn emit(
    kind: EventType,
    event_id: &str,
    facts: &Facts,
    build: impl Fn(IpMode) -> String,
) -> Result<usize> {
    let cache = cache()?;
    let now = unix_now();
    let mut bodies: [Option<Rc<str>>; 3] = [None, None, None];
    let mut queued = Vec::new();
    let max_body = guc::MAX_BODY_BYTES.get().max(0) as usize;
    let hold_until = std::cell::OnceCell::new();
    // Computed once, and only when some subscription is held.
    let holding = |since_ms: i64| {
        let (now_ms, window_ms) =
            *hold_until.get_or_init(|| (unix_now_micros() / 1000, guc::hold_window_ms()));
        now_ms < since_ms.saturating_add(window_ms)
    };
    for sub in cache.subscriptions.iter().filter(|s| {
        s.event_mask & kind.bit() != 0
            && s.held_since_ms.is_none_or(holding)
            && !(kind.per_click() && s.digest_minutes.is_some())
            && s.filters.matches(facts)
    }) {
        let body = bodies[sub.ip_mode as usize]
            .get_or_insert_with(|| build(sub.ip_mode).into())
            .clone();
        limits::check_body(kind.as_str(), body.len(), max_body)?;
        let signature = signature_header(sub.keys.keys_at(now), event_id, now, &body);
        queued.push(Queued {
            subscription_id: sub.id,
            body,
            signature,
        });
    }
    notify(kind, event_id)?;
    Ok(insert_deliveries(kind, event_id, now, &queued)?.len())
}

/// Queues `kind` for one subscription (a digest made for it), if it still
/// delivers or holds events; returns whether it was queued.
pub fn emit_to(
    subscription_id: i64,
    kind: EventType,
    event_id: &str,
    body: String,
) -> Result<bool> {
    let cache = cache()?;
    let Some(sub) = cache.subscriptions.iter().find(|s| s.id == subscription_id) else {
        return Ok(false); // deleted, or disabled for longer than the hold window
    };
    if sub.held_since_ms.is_some_and(|since| {
        unix_now_micros() / 1000 >= since.saturating_add(guc::hold_window_ms())
    }) {
        return Ok(false);
    }
    let max_body = guc::MAX_BODY_BYTES.get().max(0) as usize;
    limits::check_body(kind.as_str(), body.len(), max_body)?;
    let now = unix_now();
    let signature = signature_header(sub.keys.keys_at(now), event_id, now, &body);
    notify(kind, event_id)?;
    insert_deliveries(
        kind,
        event_id,
        now,
        &[Queued {
            subscription_id,
            body: body.into(),
            signature,
        }],
    )?;
    Ok(true)
}

thread_local! {
    /// Set in the worker's own processes (see `commit_events_durably`).
    static DURABLE_EVENTS: Cell<bool> = const { Cell::new(false) };
}

/// The worker's sessions commit asynchronously: a claim or an outcome lost in
/// a crash only means a resend under the same `webhook-id`. An event they
/// create (a milestone, a digest, `delivery.dead`) is different: sent, then
/// lost, it would be created again under a new id, which a receiver cannot
/// tell from a second event. So their transactions that queue an event
/// commit synchronously, before the event can be claimed and sent.
pub fn commit_events_durably() {
    DURABLE_EVENTS.set(true);
}

fn commit_this_transaction_durably() {
    // SAFETY: a plain read of the setting's current value.
    if unsafe { pg_sys::synchronous_commit }
        == pg_sys::SyncCommitLevel::SYNCHRONOUS_COMMIT_OFF as i32
    {
        guc::set(c"synchronous_commit", c"on", true);
    }
}

/// Inserts signed deliveries for one event and arranges the worker's wake-up at commit.
pub fn insert_deliveries(
    kind: EventType,
    event_id: &str,
    signed_at: i64,
    queued: &[Queued],
) -> Result<Vec<i64>> {
    if queued.is_empty() {
        return Ok(Vec::new());
    }
    let inserted = match queue::insert(event_id, kind.as_str(), signed_at, queued)? {
        Some(ids) => ids,
        None => insert_with_sql(kind, event_id, signed_at, queued)?,
    };
    if DURABLE_EVENTS.get() {
        commit_this_transaction_durably();
    }
    shared::wake_on_commit();
    Ok(inserted)
}

/// The same insert as plain SQL, for a deliveries table with columns `queue` does not know.
fn insert_with_sql(
    kind: EventType,
    event_id: &str,
    signed_at: i64,
    queued: &[Queued],
) -> Result<Vec<i64>> {
    let due = crate::queue::due_at();
    Spi::connect_mut(|client| -> Result<Vec<i64>> {
        let rows = match queued {
            // Most events have one subscriber: a plain VALUES row costs far less to execute than unnest().
            [one] => plans::execute(
                client,
                "INSERT INTO linkhooks.deliveries (event_id, event_type, signed_at, subscription_id, body, signature, next_attempt_at)
                 VALUES ($1::uuid, $2, $3, $4, $5, $6, $7) RETURNING id",
                &[TEXT, TEXT, INT8, INT8, TEXT, TEXT, TIMESTAMPTZ],
                &[
                    event_id.into(),
                    kind.as_str().into(),
                    signed_at.into(),
                    one.subscription_id.into(),
                    (&*one.body).into(),
                    one.signature.as_str().into(),
                    due.into(),
                ],
            )?,
            many => {
                let ids: Vec<i64> = many.iter().map(|q| q.subscription_id).collect();
                let bodies: Vec<&str> = many.iter().map(|q| &*q.body).collect();
                let signatures: Vec<&str> = many.iter().map(|q| q.signature.as_str()).collect();
                plans::execute(
                    client,
                    "INSERT INTO linkhooks.deliveries (event_id, event_type, signed_at, subscription_id, body, signature, next_attempt_at)
                     SELECT $1::uuid, $2, $3, s, b, g, $7 FROM unnest($4::bigint[], $5::text[], $6::text[]) AS u(s, b, g)
                     RETURNING id",
                    &[TEXT, TEXT, INT8, INT8_ARRAY, TEXT_ARRAY, TEXT_ARRAY, TIMESTAMPTZ],
                    &[event_id.into(), kind.as_str().into(), signed_at.into(), ids.into(), bodies.into(), signatures.into(), due.into()],
                )?
            }
        };
        rows.into_iter()
            .map(|r| Ok(r.get::<i64>(1)?.unwrap_or_default()))
            .collect()
    })
}

/// NOTIFY on `linkhooks.notify_channel` (transactional: delivered at commit).
fn notify(kind: EventType, event_id: &str) -> Result<()> {
    let channel = guc::string(&guc::NOTIFY_CHANNEL);
    if channel.is_empty() {
        return Ok(());
    }
    let payload = serde_json::json!({"id": event_id, "type": kind.as_str()}).to_string();
    Spi::run_with_args(
        "SELECT pg_notify($1, $2)",
        &[channel.as_str().into(), payload.as_str().into()],
    )?;
    Ok(())
}
