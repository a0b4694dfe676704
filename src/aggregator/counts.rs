//! Adds a run's clicks and conversions to the per-link and per-campaign totals.

use std::collections::HashMap;

use pgrx::prelude::*;

use super::read::{Batch, PerLink};
use super::{LinkCount, Totals};
use crate::error::Result;
use crate::guc;
use crate::linkstore;
use crate::plans::{self, INT8_ARRAY, TEXT, TEXT_ARRAY};

/// Conversions a run counted.
pub(super) struct Conversions {
    pub(super) counted: i64,
    /// As `Batch::restored_max_id`, for conversions.
    pub(super) restored_max_id: Option<i64>,
}

/// Adds the conversions committed after `previous` and by `now` (the snapshot the clicks were
/// read with) to their links' counts. Its own statement: a later snapshot than `now`, so what
/// committed since is left to the next run, and the restored rows from the future are those
/// ahead of this statement's own snapshot (a conversion committed since `now` may be ahead of it).
pub(super) fn count_conversions(previous: &str, now: &str) -> Result<Conversions> {
    Spi::connect_mut(|client| {
        let rows = plans::execute(
            client,
            "WITH new AS (
                SELECT c.link_id, pg_catalog.count(*) AS conversions
                  FROM linkhooks.conversions c
                 WHERE c.txid >= pg_catalog.pg_snapshot_xmin($1::pg_catalog.pg_snapshot)
                   AND c.txid < pg_catalog.pg_snapshot_xmax($2::pg_catalog.pg_snapshot)
                   AND NOT pg_catalog.pg_visible_in_snapshot(c.txid, $1::pg_catalog.pg_snapshot)
                   AND pg_catalog.pg_visible_in_snapshot(c.txid, $2::pg_catalog.pg_snapshot)
                   AND c.id > (SELECT k.conversion_id_floor FROM linkhooks.click_cursor k)
                   AND EXISTS (SELECT FROM linkhooks.links l WHERE l.id = c.link_id)
                 GROUP BY c.link_id),
             counted AS (
                UPDATE linkhooks.link_counts k
                   SET conversions = k.conversions + n.conversions, updated_at = pg_catalog.now()
                  FROM new n
                 WHERE k.link_id = n.link_id),
             -- As in count_links.
             added AS (
                INSERT INTO linkhooks.link_counts AS k (link_id, domain, slug, campaign, conversions)
                SELECT n.link_id, l.domain, l.slug, l.campaign, n.conversions
                  FROM new n JOIN linkhooks.links l ON l.id = n.link_id
                 WHERE NOT EXISTS (SELECT FROM linkhooks.link_counts c WHERE c.link_id = n.link_id)
                ON CONFLICT (link_id) DO UPDATE
                   SET conversions = k.conversions + excluded.conversions,
                       updated_at = pg_catalog.now())
             SELECT (SELECT pg_catalog.sum(conversions)::bigint FROM new),
                    (SELECT CASE WHEN top.txid >= pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()) THEN
                              (SELECT pg_catalog.max(c.id) FROM linkhooks.conversions c
                                WHERE c.txid >= pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())
                                  AND c.txid IS DISTINCT FROM pg_catalog.pg_current_xact_id_if_assigned()) END
                       FROM (SELECT c.txid FROM linkhooks.conversions c WHERE c.txid IS NOT NULL
                              ORDER BY c.txid DESC LIMIT 1) top)",
            &[TEXT, TEXT],
            &[previous.into(), now.into()],
        )?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(Conversions {
                counted: 0,
                restored_max_id: None,
            });
        };
        Ok(Conversions {
            counted: row.get::<i64>(1)?.unwrap_or_default(),
            restored_max_id: row.get(2)?,
        })
    })
}

/// Adds the batch to each link's totals; returns the links that still exist.
pub(super) fn count_links(batch: &Batch) -> Result<Vec<LinkCount>> {
    let per_link = batch.per_link();
    if per_link.is_empty() {
        return Ok(Vec::new());
    }
    let column = |f: fn(&PerLink) -> i64| per_link.iter().map(f).collect::<Vec<i64>>();
    let base_url = guc::string(&guc::BASE_URL);
    Spi::connect_mut(|client| {
        let rows = plans::execute(
            client,
            "WITH new AS (
                SELECT n.link_id, n.clicks, n.humans, n.qr,
                       pg_catalog.to_timestamp(0) + n.first_at * interval '1 microsecond' AS first_at,
                       pg_catalog.to_timestamp(0) + n.last_at * interval '1 microsecond' AS last_at
                  FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[])
                       AS n(link_id, clicks, humans, qr, first_at, last_at)
                 WHERE EXISTS (SELECT FROM linkhooks.links l WHERE l.id = n.link_id)),
             updated AS (
                UPDATE linkhooks.link_counts k
                   SET clicks = k.clicks + n.clicks,
                       human_clicks = k.human_clicks + n.humans,
                       qr_scans = k.qr_scans + n.qr,
                       first_click_at = LEAST(k.first_click_at, n.first_at),
                       last_click_at = GREATEST(k.last_click_at, n.last_at),
                       updated_at = pg_catalog.now()
                  FROM new n
                 WHERE k.link_id = n.link_id
                RETURNING k.link_id, k.clicks, k.human_clicks),
             -- Every link has its row from its INSERT (links_counted), so the rows are
             -- updated, never inserted: a link deleted while this runs, whose row its DELETE
             -- removed, does not get one back. Only a link written with triggers off (replica
             -- role) has none yet: it gets one here.
             added AS (
                INSERT INTO linkhooks.link_counts AS k
                       (link_id, domain, slug, campaign, clicks, human_clicks, qr_scans, first_click_at, last_click_at)
                SELECT n.link_id, l.domain, l.slug, l.campaign, n.clicks, n.humans, n.qr, n.first_at, n.last_at
                  FROM new n JOIN linkhooks.links l ON l.id = n.link_id
                 WHERE NOT EXISTS (SELECT FROM linkhooks.link_counts c WHERE c.link_id = n.link_id)
                ON CONFLICT (link_id) DO UPDATE
                   SET clicks = k.clicks + excluded.clicks,
                       human_clicks = k.human_clicks + excluded.human_clicks,
                       qr_scans = k.qr_scans + excluded.qr_scans,
                       first_click_at = LEAST(k.first_click_at, excluded.first_click_at),
                       last_click_at = GREATEST(k.last_click_at, excluded.last_click_at),
                       updated_at = pg_catalog.now()
                RETURNING k.link_id, k.clicks, k.human_clicks),
             counted AS (SELECT * FROM updated UNION ALL SELECT * FROM added)
             SELECT l.id, l.domain, l.slug, l.destination, l.campaign, l.tags,
                    counted.clicks, counted.human_clicks
               FROM counted
               JOIN linkhooks.links l ON l.id = counted.link_id
              ORDER BY l.id",
            &[INT8_ARRAY; 6],
            &[
                column(|l| l.link_id).into(),
                column(|l| l.clicks).into(),
                column(|l| l.humans).into(),
                column(|l| l.qr).into(),
                column(|l| l.first_micros).into(),
                column(|l| l.last_micros).into(),
            ],
        )?;
        let added: HashMap<i64, &PerLink> = per_link.iter().map(|l| (l.link_id, l)).collect();
        rows.into_iter()
            .map(|r| {
                let link = linkstore::payload_from_row(&r, &base_url)?;
                let new = added.get(&link.id);
                Ok(LinkCount {
                    totals: Totals {
                        clicks: r.get(7)?.unwrap_or_default(),
                        humans: r.get(8)?.unwrap_or_default(),
                        new_clicks: new.map_or(0, |l| l.clicks),
                        new_humans: new.map_or(0, |l| l.humans),
                    },
                    link,
                })
            })
            .collect()
    })
}

/// Per campaign: its totals after this batch.
pub(super) type CampaignCounts = HashMap<String, Totals>;

/// Adds the batch to each campaign's totals (a link's campaign as it is now).
pub(super) fn count_campaigns(links: &[LinkCount]) -> Result<CampaignCounts> {
    let mut added: HashMap<&str, (i64, i64)> = HashMap::new();
    for l in links {
        if let Some(c) = &l.link.campaign {
            let e = added.entry(c.as_str()).or_default();
            e.0 += l.totals.new_clicks;
            e.1 += l.totals.new_humans;
        }
    }
    if added.is_empty() {
        return Ok(HashMap::new());
    }
    let names: Vec<&str> = added.keys().copied().collect();
    let clicks: Vec<i64> = names.iter().map(|n| added[n].0).collect();
    let humans: Vec<i64> = names.iter().map(|n| added[n].1).collect();
    Spi::connect_mut(|client| {
        let rows = plans::execute(
            client,
            "INSERT INTO linkhooks.campaign_counts AS k (campaign, clicks, human_clicks)
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])
             ON CONFLICT (campaign) DO UPDATE
                SET clicks = k.clicks + excluded.clicks,
                    human_clicks = k.human_clicks + excluded.human_clicks,
                    updated_at = pg_catalog.now()
             RETURNING k.campaign, k.clicks, k.human_clicks",
            &[TEXT_ARRAY, INT8_ARRAY, INT8_ARRAY],
            &[names.clone().into(), clicks.into(), humans.into()],
        )?;
        let mut totals = HashMap::new();
        for r in rows {
            let name: String = r.get(1)?.unwrap_or_default();
            let (new_clicks, new_humans) = added.get(name.as_str()).copied().unwrap_or_default();
            totals.insert(
                name,
                Totals {
                    clicks: r.get(2)?.unwrap_or_default(),
                    humans: r.get(3)?.unwrap_or_default(),
                    new_clicks,
                    new_humans,
                },
            );
        }
        Ok(totals)
    })
}
