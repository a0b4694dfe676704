//! Misses: redirect requests that found no active link. One row per
//! (domain, slug, reason) in `link_misses` counts them, so a scanner adds to
//! counts rather than rows per request; `link.miss` is announced by the
//! aggregator, off the request path, on a slug's first miss and then at most
//! once per `linkhooks.miss_interval`, and at most `ANNOUNCED_PER_SECOND` a
//! second by each process that announces (the housekeeper, run_aggregation()).

use std::cell::RefCell;

use pgrx::prelude::*;

use crate::duration;
use crate::error::{Error, OrReport, Result};
use crate::events::{self, new_event_id, unix_now_micros};
use crate::filters::Facts;
use crate::guc;
use crate::links::{MAX_MISSED_SLUG_LEN, MissReason, truncate};
use crate::linkstore::LinkRow;
use crate::payload::{self, EventType, LinkMissData, MissPayload};
use crate::plans::{self, FLOAT8, INT8, TEXT};
use crate::rate::PerSecond;

/// link.miss events queued a second, at most (the aggregator runs up to four times a second).
const ANNOUNCED_PER_SECOND: i64 = 100;

thread_local! {
    static ANNOUNCED: RefCell<PerSecond> = RefCell::new(PerSecond::default());
}

/// Counts one request that found no active link. For redirect services that
/// resolve links themselves; `record_click` calls it for its own misses.
#[pg_extern(volatile, security_definer)]
fn record_miss(
    slug: Option<&str>,
    domain: default!(Option<&str>, "''"),
    reason: default!(Option<&str>, "'unknown'"),
) {
    let run = || -> Result<()> {
        let slug = slug.ok_or_else(|| Error::invalid("slug", "must not be null"))?;
        let domain = domain.ok_or_else(|| {
            Error::invalid("domain", "must not be null ('' is the default domain)")
        })?;
        let reason = reason.and_then(MissReason::parse).ok_or_else(|| {
            Error::invalid("reason", format!("must be one of {}", MissReason::NAMES))
        })?;
        Spi::connect_mut(|client| -> Result<()> {
            plans::execute(
                client,
                "INSERT INTO linkhooks.link_misses AS m (domain, slug, reason) VALUES ($1, $2, $3)
                 ON CONFLICT (domain, slug, reason)
                 DO UPDATE SET count = m.count + 1, last_seen = pg_catalog.now()",
                &[TEXT, TEXT, TEXT],
                &[
                    truncate(domain, 253).into(),
                    truncate(slug, MAX_MISSED_SLUG_LEN).into(),
                    reason.as_str().into(),
                ],
            )?;
            crate::shared::clicks_recorded();
            Ok(())
        })
    };
    run().or_report()
}

/// `record_miss` from a function that runs as the caller (`record_click`):
/// the writer may execute it, and it writes as the owner.
pub fn record_as_caller(domain: &str, slug: &str, reason: MissReason) -> Result<()> {
    Spi::connect_mut(|client| -> Result<()> {
        plans::execute(
            client,
            "SELECT linkhooks.record_miss($1, $2, $3)",
            &[TEXT, TEXT, TEXT],
            &[slug.into(), domain.into(), reason.as_str().into()],
        )?;
        Ok(())
    })
}

/// A `link_misses` row due for announcement (times in Unix microseconds).
struct DueMiss {
    domain: String,
    slug: String,
    reason: String,
    count: i64,
    first_seen: i64,
    last_seen: i64,
}

/// Queues link.miss for the rows that are due: never announced, or missed
/// again since their last announcement and that is `linkhooks.miss_interval` ago.
pub fn announce_due() -> Result<usize> {
    let second = unix_now_micros().div_euclid(1_000_000);
    let allowed = ANNOUNCED.with(|a| a.borrow_mut().remaining(ANNOUNCED_PER_SECOND, second));
    if allowed == 0 {
        return Ok(0);
    }
    let interval_ms = duration::parse(&guc::string(&guc::MISS_INTERVAL))
        .map_or(3_600_000.0, |d| d.as_millis() as f64);
    let due = Spi::connect_mut(|client| -> Result<Vec<DueMiss>> {
        let rows = plans::execute(
            client,
            "WITH due AS (
                SELECT domain, slug, reason FROM linkhooks.link_misses
                 WHERE (notified_at IS NULL OR last_seen > notified_at)
                   AND (notified_at IS NULL OR notified_at < pg_catalog.now() - $1 * interval '1 millisecond')
                 ORDER BY notified_at NULLS FIRST LIMIT $2
                 FOR UPDATE SKIP LOCKED)
             UPDATE linkhooks.link_misses m SET notified_at = pg_catalog.now()
               FROM due WHERE m.domain = due.domain AND m.slug = due.slug AND m.reason = due.reason
             RETURNING m.domain, m.slug, m.reason, m.count,
                       (pg_catalog.date_part('epoch', m.first_seen) * 1000000)::bigint,
                       (pg_catalog.date_part('epoch', m.last_seen) * 1000000)::bigint",
            &[FLOAT8, INT8],
            &[interval_ms.into(), allowed.into()],
        )?;
        ANNOUNCED.with(|a| a.borrow_mut().spend(rows.len() as i64));
        rows.into_iter()
            .map(|r| {
                Ok(DueMiss {
                    domain: r.get(1)?.unwrap_or_default(),
                    slug: r.get(2)?.unwrap_or_default(),
                    reason: r.get(3)?.unwrap_or_default(),
                    count: r.get(4)?.unwrap_or_default(),
                    first_seen: r.get(5)?.unwrap_or_default(),
                    last_seen: r.get(6)?.unwrap_or_default(),
                })
            })
            .collect()
    })?;
    for miss in &due {
        let link = match miss.reason.as_str() {
            "unknown" => None,
            _ => LinkRow::by_slug(&miss.domain, &miss.slug)?.map(|l| l.payload()),
        };
        let id = new_event_id().to_string();
        let body = payload::envelope(
            &id,
            EventType::LinkMiss,
            unix_now_micros(),
            LinkMissData {
                link: link.as_ref(),
                miss: MissPayload {
                    domain: &miss.domain,
                    slug: &miss.slug,
                    reason: &miss.reason,
                    count: miss.count,
                    first_seen: payload::format_timestamp(miss.first_seen),
                    last_seen: payload::format_timestamp(miss.last_seen),
                },
            },
        );
        let facts = Facts {
            campaign: link.as_ref().and_then(|l| l.campaign.as_deref()),
            tags: link.as_ref().map_or(&[], |l| &l.tags),
            click: None,
            milestone: None,
        };
        events::emit(EventType::LinkMiss, &id, &facts, |_| body.clone())?;
    }
    Ok(due.len())
}

/// Keeps `link_misses` to `linkhooks.max_miss_rows` rows, dropping the least
/// recently missed: a scanner trying random slugs cannot grow it without bound.
pub fn cap_rows() -> Result<i64> {
    let cap = i64::from(guc::MAX_MISS_ROWS.get());
    Ok(Spi::get_one_with_args::<i64>(
        "WITH extra AS (SELECT pg_catalog.count(*) - $1 AS n FROM linkhooks.link_misses),
              gone AS (
                DELETE FROM linkhooks.link_misses m
                 USING (SELECT domain, slug, reason FROM linkhooks.link_misses
                         WHERE (SELECT n FROM extra) > 0
                         ORDER BY last_seen LIMIT (SELECT GREATEST(n, 0) FROM extra)
                         FOR UPDATE SKIP LOCKED) old
                 WHERE m.domain = old.domain AND m.slug = old.slug AND m.reason = old.reason
                RETURNING 1)
         SELECT pg_catalog.count(*) FROM gone",
        &[cap.into()],
    )?
    .unwrap_or(0))
}
