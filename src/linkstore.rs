//! Reading links for redirects and clicks, and the click-limit claim.
//!
//! Links are cached per backend, by id and by (domain, slug), so a redirect or
//! a click does not query `links`. The cache is valid while the shared links
//! generation is unchanged (a committed change to a link's user-visible columns
//! bumps it); entries are read with a snapshot taken after the generation, so
//! a change cannot slip in between.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::prelude::*;
use pgrx::spi::SpiHeapTupleData;
use serde_json::Value;

use crate::error::Result;
use crate::guc;
use crate::payload::LinkPayload;
use crate::plans::{self, INT8, TEXT};
use crate::shared;

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

macro_rules! select_link {
    ($where:literal) => {
        concat!(
            "SELECT id, domain, slug, destination, campaign, tags, utm, max_clicks, expired_url, disabled,
                    redirect_url, click_count, expires_at
             FROM linkhooks.links ",
            $where
        )
    };
}

impl LinkRow {
    fn from_tuple(row: &SpiHeapTupleData) -> Result<Self> {
        Ok(LinkRow {
            id: row.get(1)?.unwrap_or_default(),
            domain: row.get(2)?.unwrap_or_default(),
            slug: row.get(3)?.unwrap_or_default(),
            destination: row.get(4)?.unwrap_or_default(),
            campaign: row.get(5)?,
            tags: row
                .get::<Vec<Option<String>>>(6)?
                .unwrap_or_default()
                .into_iter()
                .flatten()
                .collect(),
            utm: row.get::<pgrx::JsonB>(7)?.map(|j| j.0),
            max_clicks: row.get(8)?,
            expired_url: row.get(9)?,
            disabled: row.get(10)?.unwrap_or(false),
            redirect_url: row.get(11)?,
            click_count: row.get(12)?.unwrap_or_default(),
            expires_at: row
                .get::<pgrx::datum::TimestampWithTimeZone>(13)?
                .map(|t| t.into_inner()),
        })
    }

    pub fn by_id(id: i64) -> Result<Option<Rc<Self>>> {
        if let Some(hit) = with_cache(|c| c.by_id.get(&id).cloned()) {
            return Ok(Some(hit));
        }
        load(select_link!("WHERE id = $1"), &[INT8], &[id.into()])
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
        load(
            select_link!("WHERE domain = $1 AND slug = $2"),
            &[TEXT, TEXT],
            &[domain.into(), slug.into()],
        )
    }

    /// expires_at has passed, as of the transaction's start (like now()).
    fn time_expired(&self) -> bool {
        // SAFETY: plain read of the transaction start time.
        self.expires_at
            .is_some_and(|at| at <= unsafe { pg_sys::GetCurrentTransactionStartTimestamp() })
    }

    pub fn is_active(&self) -> bool {
        !self.disabled
            && !self.time_expired()
            && self.max_clicks.is_none_or(|m| self.click_count < m)
    }

    /// What a redirect answers: the destination (with UTM) while active, else expired_url or NULL.
    pub fn answer(&self) -> Option<String> {
        if self.is_active() {
            Some(
                self.redirect_url
                    .clone()
                    .unwrap_or_else(|| self.destination.clone()),
            )
        } else {
            self.expired_url.clone()
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
    generation: u64,
    by_id: HashMap<i64, Rc<LinkRow>>,
    by_slug: HashMap<String, HashMap<String, i64>>,
}

impl LinkCache {
    /// Drops every entry; the cache is then valid for `generation`.
    fn clear(&mut self, generation: u64) {
        *self = LinkCache {
            generation,
            ..Default::default()
        };
    }
}

thread_local! {
    static CACHE: RefCell<LinkCache> = RefCell::new(LinkCache::default());
}

/// Whether this lookup may use the cache: never without shared memory, in a
/// transaction that changed links itself, one that reads from a single
/// snapshot (REPEATABLE READ, SERIALIZABLE), which the cache cannot honour,
/// or in a parallel worker, which cannot take the fresh snapshot a load needs.
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
}

/// Runs `f` on the cache if it may be used, after dropping it when stale.
fn with_cache<T>(f: impl FnOnce(&LinkCache) -> Option<T>) -> Option<T> {
    if !cache_usable() {
        return None;
    }
    CACHE.with(|c| {
        let mut cache = c.borrow_mut();
        let generation = shared::links_generation();
        if cache.generation != generation {
            cache.clear(generation);
        }
        f(&cache)
    })
}

/// Reads one link and caches it when the cache may be used. Then the read
/// takes a fresh snapshot (a mutating SPI call does) after `with_cache` read
/// the generation: a change committed before that snapshot is in the row, one
/// committed after it bumps the generation past the entry's.
fn load(
    sql: &'static str,
    types: &[pgrx::pg_sys::PgOid],
    args: &[pgrx::datum::DatumWithOid<'_>],
) -> Result<Option<Rc<LinkRow>>> {
    let usable = cache_usable();
    let row = Spi::connect_mut(|client| {
        // Only a row about to be cached needs the fresh snapshot of a mutating SPI call;
        // otherwise read like any query (a parallel worker may do no more).
        let rows = if usable {
            plans::execute(client, sql, types, args)?
        } else {
            plans::query(client, sql, types, args)?
        };
        rows.into_iter()
            .next()
            .map(|r| LinkRow::from_tuple(&r))
            .transpose()
    })?
    .map(Rc::new);
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

/// Outcome of taking one of a limited link's clicks.
pub enum Claim {
    /// Recorded; `reached_limit` is true for exactly one click: the one that used the last slot.
    Taken {
        reached_limit: bool,
    },
    Full,
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
    /// A link record_click already looked up and claimed, for the click trigger it is about to fire.
    static PRECLAIMED: RefCell<Option<(Rc<LinkRow>, bool)>> = const { RefCell::new(None) };
}

/// Hands a looked-up (and, if limited, claimed) link to the click trigger
/// until the returned guard is dropped.
pub fn stash_preclaimed(link: Rc<LinkRow>, reached_limit: bool) -> StashGuard {
    PRECLAIMED.with(|p| *p.borrow_mut() = Some((link, reached_limit)));
    StashGuard
}

/// Clears the stash even when the insert fails, so it cannot leak into a later statement.
pub struct StashGuard;

impl Drop for StashGuard {
    fn drop(&mut self) {
        PRECLAIMED.with(|p| p.borrow_mut().take());
    }
}

/// The stashed link, if it is the one this click is for.
pub fn take_preclaimed(link_id: i64) -> Option<(Rc<LinkRow>, bool)> {
    PRECLAIMED
        .with(|p| p.borrow_mut().take())
        .filter(|(l, _)| l.id == link_id)
}
