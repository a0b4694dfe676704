//! Reading links for redirects and clicks, and the click-limit claim.
//!
//! Links are cached per backend, by id and by (domain, slug), so a redirect or
//! a click does not query `links`. The cache is valid while the shared links
//! generation is unchanged (a committed change to a link's user-visible columns
//! bumps it) and no relcache invalidation of `links` arrived since it was
//! filled; entries are read with a snapshot taken after both were read, so a
//! change cannot slip in between. The shared generation moves only on this
//! server's commits; the invalidation also travels in the commit's WAL record,
//! so a hot standby's sessions see changes replayed there.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::CStr;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::rc::Rc;

use pgrx::prelude::*;
use serde_json::{Map, Value};

use crate::doorkeeper::Doorkeeper;
use crate::error::{Error, Result};
use crate::filters::{ClickFacts, Facts};
use crate::guc;
use crate::links::{self, MissReason};
use crate::payload::{Click, LinkPayload};
use crate::plans::{self, INT8};
use crate::shared;
use crate::tuple::SlotColumns;

/// A link as the redirect and click paths see it.
#[derive(Debug, Clone)]
pub struct LinkRow {
    pub id: i64,
    pub domain: String,
    pub slug: String,
    pub destination: String,
    pub campaign: Option<String>,
    pub tags: Vec<String>,
    pub utm: Option<Value>,
    pub max_clicks: Option<i64>,
    pub expired_url: Option<String>,
    pub disabled: bool,
    pub redirect_url: Option<String>,
    pub click_count: i64,
    /// expires_at in Postgres microseconds.
    pub expires_at: Option<i64>,
}

impl LinkRow {
    /// Read in table order, which `SlotColumns` finds fastest.
    fn from_columns(row: &SlotColumns) -> Result<Self> {
        Ok(LinkRow {
            id: row.get("id")?.unwrap_or_default(),
            domain: row.get("domain")?.unwrap_or_default(),
            slug: row.get("slug")?.unwrap_or_default(),
            destination: row.get("destination")?.unwrap_or_default(),
            campaign: row.get("campaign")?,
            tags: row.text_array("tags")?.unwrap_or_default(),
            utm: row.get::<pgrx::JsonB>("utm")?.map(|j| j.0),
            expires_at: row
                .get::<pgrx::datum::TimestampWithTimeZone>("expires_at")?
                .map(|t| t.into_inner()),
            max_clicks: row.get("max_clicks")?,
            expired_url: row.get("expired_url")?,
            disabled: row.get("disabled")?.unwrap_or(false),
            redirect_url: row.get("redirect_url")?,
            click_count: row.get("click_count")?.unwrap_or_default(),
        })
    }

    pub fn by_id(id: i64) -> Result<Option<Rc<Self>>> {
        if let Some(hit) = with_cache(|c| c.by_id.get(&id).cloned()) {
            return Ok(Some(hit));
        }
        load(Key::Id(id))
    }

    pub fn by_slug(domain: &str, slug: &str) -> Result<Option<Rc<Self>>> {
        let cached = with_cache(|c| {
            c.by_slug
                .get(domain)
                .and_then(|s| s.get(slug))
                .and_then(|id| c.by_id.get(id))
                .cloned()
        });
        if let Some(hit) = cached {
            return Ok(Some(hit));
        }
        load(Key::Slug(domain, slug))
    }

    /// expires_at has passed, as of the transaction's start (like now()).
    fn time_expired(&self) -> bool {
        // SAFETY: plain read of the transaction start time.
        self.expires_at
            .is_some_and(|at| at <= unsafe { pg_sys::GetCurrentTransactionStartTimestamp() })
    }

    pub fn is_active(&self) -> bool {
        self.inactive_reason().is_none()
    }

    /// Why a redirect finds the link inactive, or None while it is active.
    pub fn inactive_reason(&self) -> Option<MissReason> {
        if self.disabled {
            Some(MissReason::Disabled)
        } else if self.time_expired() {
            Some(MissReason::Expired)
        } else if self.max_clicks.is_some_and(|m| self.click_count >= m) {
            Some(MissReason::Limit)
        } else {
            None
        }
    }

    /// Where an active link redirects: the destination with its UTM parameters.
    pub fn target(&self) -> String {
        self.redirect_url
            .clone()
            .unwrap_or_else(|| self.destination.clone())
    }

    /// What a redirect answers: the destination (with UTM) while active, else expired_url or NULL.
    pub fn answer(&self) -> Option<String> {
        if self.is_active() {
            Some(self.target())
        } else {
            self.expired_url.clone()
        }
    }

    /// A click's UTM parameters: its own when it has them, else the link's.
    pub fn click_utm(&self, own: Option<Value>) -> Map<String, Value> {
        match own {
            Some(Value::Object(m)) => m,
            _ => self
                .utm
                .as_ref()
                .and_then(|u| links::normalize_utm(u).ok())
                .unwrap_or_default(),
        }
    }

    /// What subscription filters read from one of this link's clicks.
    pub fn click_facts<'a>(&'a self, click: &'a Click) -> Facts<'a> {
        Facts {
            campaign: self.campaign.as_deref(),
            tags: &self.tags,
            click: Some(ClickFacts {
                country: click.country.as_deref(),
                device: click.device.as_deref(),
                is_bot: click.is_bot,
            }),
            milestone: None,
        }
    }

    pub fn payload(&self) -> LinkPayload {
        LinkPayload {
            id: self.id,
            short_url: LinkPayload::short_url(
                &self.domain,
                &self.slug,
                &guc::string(&guc::BASE_URL),
            ),
            domain: self.domain.clone(),
            slug: self.slug.clone(),
            destination: self.destination.clone(),
            campaign: self.campaign.clone(),
            tags: self.tags.clone(),
        }
    }
}

#[derive(Default)]
struct LinkCache {
    /// (shared links generation, local invalidation count) the entries are valid for.
    generation: (u64, u64),
    by_id: HashMap<i64, Rc<LinkRow>>,
    by_slug: HashMap<String, HashMap<String, i64>>,
    doorkeeper: Doorkeeper,
}

impl LinkCache {
    /// Drops every entry; the cache is then valid for `generation`.
    fn clear(&mut self, generation: (u64, u64)) {
        self.generation = generation;
        self.by_id.clear();
        self.by_slug.clear();
    }
}

thread_local! {
    static CACHE: RefCell<LinkCache> = RefCell::new(LinkCache::default());
}

/// Whether this lookup may use the cache: never without shared memory, in a
/// transaction that changed links itself, one that reads from a single
/// snapshot (REPEATABLE READ, SERIALIZABLE), which the cache cannot honour,
/// in a parallel worker, which cannot take the fresh snapshot a load needs, or
/// before the 0.5.0 schema, whose replica-role trigger tells caches of links
/// applied by logical replication.
fn cache_usable() -> bool {
    // SAFETY: plain reads of the session's isolation level and parallel mode.
    let (per_statement_snapshots, parallel) = unsafe {
        (
            pg_sys::XactIsoLevel < pg_sys::XACT_REPEATABLE_READ as i32,
            pg_sys::IsInParallelMode(),
        )
    };
    shared::preloaded()
        && per_statement_snapshots
        && !parallel
        && !shared::links_changed_in_transaction()
        && guc::LINK_CACHE_SIZE.get() > 0
        && relations().is_ok_and(|r| r.since_0_5)
}

/// Runs `f` on the cache if it may be used, after dropping it when stale.
fn with_cache<T>(f: impl FnOnce(&LinkCache) -> Option<T>) -> Option<T> {
    if !cache_usable() {
        return None;
    }
    // Commits that run no hook of ours (a standby's replay, a change with the links
    // triggers disabled, commits replayed before a promotion) reach us only as
    // relcache invalidations, read from the queue, which a cache hit (no lock taken)
    // never does by itself. With nothing queued this is one test of a shared flag.
    // SAFETY: reading the invalidation queue is what every lock acquisition does.
    unsafe { pg_sys::AcceptInvalidationMessages() };
    CACHE.with(|c| {
        let mut cache = c.borrow_mut();
        let generation = (shared::links_generation(), INVALIDATIONS.get());
        if cache.generation != generation {
            cache.clear(generation);
        }
        f(&cache)
    })
}

/// Reads one link and caches it when the cache may be used and the doorkeeper
/// admits it (its second miss). Then the read takes a fresh snapshot after
/// `with_cache` read the generation: a change committed before that snapshot
/// is in the row, one committed after it bumps the generation past the entry's.
fn load(key: Key<'_>) -> Result<Option<Rc<LinkRow>>> {
    let usable =
        cache_usable() && CACHE.with(|c| c.borrow_mut().doorkeeper.admit(key.fingerprint()));
    // Only a row about to be cached needs the fresh snapshot; otherwise read like
    // any query (a parallel worker may do no more).
    let row = read(&key, usable)?.map(Rc::new);
    // A limited link's click_count moves with every click without a generation bump.
    if let Some(link) = row.as_ref().filter(|l| usable && l.max_clicks.is_none()) {
        CACHE.with(|c| {
            let mut cache = c.borrow_mut();
            if cache.by_id.len() >= guc::LINK_CACHE_SIZE.get() as usize {
                let generation = cache.generation;
                cache.clear(generation);
            }
            cache.by_id.insert(link.id, link.clone());
            cache
                .by_slug
                .entry(link.domain.clone())
                .or_default()
                .insert(link.slug.clone(), link.id);
        });
    }
    Ok(row)
}

/// How a link is looked up, and the unique index that finds it.
#[derive(Hash)]
enum Key<'a> {
    Id(i64),
    Slug(&'a str, &'a str),
}

impl Key<'_> {
    fn fingerprint(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        Hash::hash(self, &mut hasher);
        hasher.finish()
    }
}

/// Reads one link with a single index probe. A cache miss through SPI cost
/// 44k instructions of executor start-up, as much as the rest of a redirect.
/// With `fresh`, it reads with the latest snapshot; otherwise with the
/// statement's, as a query in the calling function would.
fn read(key: &Key<'_>, fresh: bool) -> Result<Option<LinkRow>> {
    let relations = relations()?;
    let index_oid = match key {
        Key::Id(_) => relations.pkey,
        Key::Slug(..) => relations.slug_index,
    };
    // SAFETY: relations are opened and locked like a query would (AccessShareLock,
    // kept to the end of the transaction), and the scan, slot and snapshot are
    // released before return. A Postgres error on the way releases them at abort.
    unsafe {
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let table = pg_sys::table_open(relations.table, lock);
        let index = pg_sys::index_open(index_oid, lock);
        let mut keys: [pg_sys::ScanKeyData; 2] = std::mem::zeroed();
        let mut key_on = |n: usize, procedure: u32, value: Option<pg_sys::Datum>| {
            pg_sys::ScanKeyEntryInitialize(
                &mut keys[n],
                0,
                (n + 1) as pg_sys::AttrNumber,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::InvalidOid,
                *(*index).rd_indcollation.add(n), // compare as the index is sorted
                pg_sys::Oid::from(procedure),
                value.unwrap_or(pg_sys::Datum::from(0)),
            );
        };
        let nkeys = match key {
            Key::Id(id) => {
                key_on(0, pg_sys::F_INT8EQ, id.into_datum());
                1
            }
            Key::Slug(domain, slug) => {
                key_on(0, pg_sys::F_TEXTEQ, domain.into_datum());
                key_on(1, pg_sys::F_TEXTEQ, slug.into_datum());
                2
            }
        };
        let snapshot = if fresh {
            pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot())
        } else if pg_sys::ActiveSnapshotSet() {
            pg_sys::GetActiveSnapshot()
        } else {
            pg_sys::GetTransactionSnapshot()
        };
        let scan = pg_sys::index_beginscan(table, index, snapshot, nkeys, 0);
        pg_sys::index_rescan(scan, keys.as_mut_ptr(), nkeys, std::ptr::null_mut(), 0);
        let slot = pg_sys::table_slot_create(table, std::ptr::null_mut());
        let row = if pg_sys::index_getnext_slot(
            scan,
            pg_sys::ScanDirection::ForwardScanDirection,
            slot,
        ) {
            Some(LinkRow::from_columns(&SlotColumns::new(slot)))
        } else {
            None
        };
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_endscan(scan);
        if fresh {
            pg_sys::UnregisterSnapshot(snapshot);
        }
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(table, pg_sys::NoLock as pg_sys::LOCKMODE);
        row.transpose()
    }
}

/// A link as events show it, from the first six columns of a result row:
/// `id, domain, slug, destination, campaign, tags`.
pub fn payload_from_row(
    row: &pgrx::spi::SpiHeapTupleData<'_>,
    base_url: &str,
) -> Result<LinkPayload> {
    let domain: String = row.get(2)?.unwrap_or_default();
    let slug: String = row.get(3)?.unwrap_or_default();
    Ok(LinkPayload {
        id: row.get(1)?.unwrap_or_default(),
        short_url: LinkPayload::short_url(&domain, &slug, base_url),
        domain,
        slug,
        destination: row.get(4)?.unwrap_or_default(),
        campaign: row.get(5)?,
        tags: row
            .get::<Vec<Option<String>>>(6)?
            .unwrap_or_default()
            .into_iter()
            .flatten()
            .collect(),
    })
}

/// The OIDs of the relations the hot paths open: links and its two unique
/// indexes (`read`), and deliveries (`queue`).
#[derive(Clone, Copy)]
pub struct Relations {
    table: pg_sys::Oid,
    pkey: pg_sys::Oid,
    slug_index: pg_sys::Oid,
    pub deliveries: pg_sys::Oid,
    /// The aggregator's cursor, whose lock is its run lock (InvalidOid before 0.5.0).
    pub click_cursor: pg_sys::Oid,
    /// The schema is 0.5.0's or later (clicks.idempotency_key, link_misses): a
    /// newer library runs against an older schema until ALTER EXTENSION … UPDATE.
    pub since_0_5: bool,
}

thread_local! {
    /// Looked up once per backend instead of three catalog lookups per miss;
    /// forgotten whenever a relation or schema is created, renamed or dropped.
    static RELATIONS: Cell<Option<Relations>> = const { Cell::new(None) };
    static FORGET_REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// The links table cached entries come from; kept when RELATIONS is forgotten,
    /// so unrelated DDL does not empty the cache.
    static LINKS_OID: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    /// Relcache invalidations of links seen by this backend (from any server's commits).
    static INVALIDATIONS: Cell<u64> = const { Cell::new(0) };
}

/// This transaction changed links (a row, or TRUNCATE). Every backend here
/// drops its cached links at commit (the shared generation), and so does every
/// backend of a hot standby when it replays the commit: the relcache
/// invalidation rides in the commit record. Postgres keeps one per
/// (sub)transaction, so calling this per row costs a lookup, not a message.
pub fn links_changed(trigger: &PgTrigger<'_>) -> Result<()> {
    let links = trigger
        .relation()
        .map_err(|e| Error::Column(e.to_string()))?;
    shared::links_changed();
    // SAFETY: queues an invalidation message for this transaction; no other effect.
    unsafe { pg_sys::CacheInvalidateRelcache(links.as_ptr()) };
    Ok(())
}

/// Counts invalidations of links, or of every relation (InvalidOid: the
/// invalidation queue overflowed, or a reset).
unsafe extern "C-unwind" fn links_invalidated(_: pg_sys::Datum, relid: pg_sys::Oid) {
    if relid == pg_sys::InvalidOid || relid == LINKS_OID.get() {
        INVALIDATIONS.set(INVALIDATIONS.get().wrapping_add(1));
    }
}

pub fn relations() -> Result<Relations> {
    if let Some(known) = RELATIONS.get() {
        return Ok(known);
    }
    if !FORGET_REGISTERED.replace(true) {
        // SAFETY: registering callbacks for this backend's life; they only set Cells.
        // Before anything is cached: `read` calls this first.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(links_invalidated), pg_sys::Datum::from(0));
            for cache in [
                pg_sys::SysCacheIdentifier::RELNAMENSP,
                pg_sys::SysCacheIdentifier::NAMESPACENAME,
            ] {
                pg_sys::CacheRegisterSyscacheCallback(
                    cache as i32,
                    Some(forget_relations),
                    pg_sys::Datum::from(0),
                );
            }
        }
    }
    // SAFETY: catalog lookups by name; missing objects come back as InvalidOid.
    let relations = unsafe {
        let namespace = pg_sys::get_namespace_oid(c"linkhooks".as_ptr(), false);
        let oid = |name: &CStr| pg_sys::get_relname_relid(name.as_ptr(), namespace);
        Relations {
            table: oid(c"links"),
            pkey: oid(c"links_pkey"),
            slug_index: oid(c"links_slug_unique_per_domain"),
            deliveries: oid(c"deliveries"),
            click_cursor: oid(c"click_cursor"),
            since_0_5: oid(c"link_misses") != pg_sys::InvalidOid,
        }
    };
    if [
        relations.table,
        relations.pkey,
        relations.slug_index,
        relations.deliveries,
    ]
    .contains(&pg_sys::InvalidOid)
    {
        return Err(Error::Column(
            "linkhooks.links, one of its unique indexes or linkhooks.deliveries is missing; reinstall the extension"
                .into(),
        ));
    }
    if LINKS_OID.replace(relations.table) != relations.table {
        // A new links table (the extension was recreated): nothing cached is from it.
        INVALIDATIONS.set(INVALIDATIONS.get().wrapping_add(1));
    }
    RELATIONS.set(Some(relations));
    Ok(relations)
}

unsafe extern "C-unwind" fn forget_relations(_: pg_sys::Datum, _: i32, _: u32) {
    RELATIONS.set(None);
}

/// Outcome of taking one of a limited link's clicks.
pub enum Claim {
    /// Recorded; `reached_limit` is true for exactly one click: the one that used the last slot.
    Taken {
        reached_limit: bool,
    },
    Full,
}

/// Whether the installed schema has subscriptions' hold columns (paused,
/// held_since, 0.5.0). A newer library runs against an older schema between its
/// restart and `ALTER EXTENSION pg_linkhooks UPDATE`, and must keep working.
pub fn subscriptions_hold_events() -> bool {
    // SAFETY: catalog lookups by name; missing objects come back as InvalidOid / 0.
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"linkhooks".as_ptr(), true);
        let table = pg_sys::get_relname_relid(c"subscriptions".as_ptr(), namespace);
        table != pg_sys::InvalidOid && pg_sys::get_attnum(table, c"held_since".as_ptr()) != 0
    }
}

/// Takes a click slot on a link with max_clicks. The row lock serializes only
/// limited links, which is what makes "never more than max_clicks" exact.
pub fn claim_click(link_id: i64) -> Result<Claim> {
    Spi::connect_mut(|client| {
        let rows = plans::execute(
            client,
            "UPDATE linkhooks.links
                SET click_count = click_count + 1,
                    expired_at = coalesce(expired_at, CASE WHEN click_count + 1 >= max_clicks THEN now() END)
              WHERE id = $1 AND click_count < max_clicks
          RETURNING click_count >= max_clicks AND expired_at = now()",
            &[INT8],
            &[link_id.into()],
        )?;
        Ok(match rows.into_iter().next() {
            Some(row) => Claim::Taken {
                reached_limit: row.get::<bool>(1)?.unwrap_or(false),
            },
            None => Claim::Full,
        })
    })
}

thread_local! {
    /// The link record_click already looked up, for the click trigger it is about to fire.
    static STASHED: RefCell<Option<Rc<LinkRow>>> = const { RefCell::new(None) };
}

/// Hands a looked-up link to the click trigger until the returned guard is
/// dropped. A click it brings past the link's max_clicks is skipped, not
/// refused: record_click then answers expired_url.
pub fn stash_for_click(link: Rc<LinkRow>) -> StashGuard {
    STASHED.with(|p| *p.borrow_mut() = Some(link));
    StashGuard
}

/// Clears the stash even when the insert fails, so it cannot leak into a later statement.
pub struct StashGuard;

impl Drop for StashGuard {
    fn drop(&mut self) {
        STASHED.with(|p| p.borrow_mut().take());
    }
}

/// The stashed link, if it is the one this click is for.
pub fn take_stashed(link_id: i64) -> Option<Rc<LinkRow>> {
    STASHED
        .with(|p| p.borrow_mut().take())
        .filter(|l| l.id == link_id)
}
