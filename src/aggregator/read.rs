//! What a run reads: the clicks committed since the cursor, per link and minute.

use pgrx::prelude::*;

use crate::error::Result;
use crate::minutes::MinuteCount;
use crate::plans::{self, BOOL, TEXT};
use crate::tally::ClickGroup;

/// The clicks committed since `previous`, per link and minute of `clicked_at`.
pub(super) struct Batch {
    /// This run's snapshot, the next cursor.
    pub(super) snapshot: String,
    /// Clicks with a transaction id from the future belong to a restore from
    /// another cluster: counted already there, they are never counted here.
    pub(super) restored_max_id: Option<i64>,
    pub(super) minutes: Vec<MinuteCount>,
    /// The same clicks grouped for digests (empty when no subscription wants one).
    pub(super) groups: Vec<ClickGroup>,
}

/// One link's new clicks in a batch.
pub(super) struct PerLink {
    pub(super) link_id: i64,
    pub(super) clicks: i64,
    pub(super) humans: i64,
    pub(super) qr: i64,
    pub(super) first_micros: i64,
    pub(super) last_micros: i64,
}

impl Batch {
    /// Per link, ascending (the minutes come ordered by link, then minute).
    pub(super) fn per_link(&self) -> Vec<PerLink> {
        let mut links: Vec<PerLink> = Vec::new();
        for m in &self.minutes {
            match links.last_mut() {
                Some(last) if last.link_id == m.link_id => {
                    last.clicks += m.clicks;
                    last.humans += m.humans;
                    last.qr += m.qr;
                    last.first_micros = last.first_micros.min(m.first_micros);
                    last.last_micros = last.last_micros.max(m.last_micros);
                }
                _ => links.push(PerLink {
                    link_id: m.link_id,
                    clicks: m.clicks,
                    humans: m.humans,
                    qr: m.qr,
                    first_micros: m.first_micros,
                    last_micros: m.last_micros,
                }),
            }
        }
        links
    }
}

pub(super) fn read_new_clicks(previous: &str, with_groups: bool) -> Result<Option<Batch>> {
    // Run as a mutating statement for a fresh snapshot, taken after the cursor was locked
    // (a read-only one would reuse the caller's, taken before).
    Spi::connect_mut(|client| {
        let rows = plans::execute(
            client,
            "WITH snap AS (SELECT pg_catalog.pg_current_snapshot() AS now,
                                  $1::pg_catalog.pg_snapshot AS prev),
                  cursor AS (SELECT id_floor FROM linkhooks.click_cursor),
                  -- One pass over the new clicks, grouped by what digests count them by; the
                  -- per-minute counts are sums of these groups. Without digests the digest keys are
                  -- NULL, so the groups are few, and no click row is kept between the two steps.
                  -- date_bin, not date_trunc: no unit text parsed per click, and UTC minutes.
                  groups AS (
                    SELECT c.link_id,
                           pg_catalog.date_bin('1 minute', c.clicked_at, '1970-01-01 00:00:00+00') AS minute_at,
                           CASE WHEN $2 THEN c.country END AS country,
                           CASE WHEN $2 THEN c.device END AS device,
                           CASE WHEN $2 THEN COALESCE(pg_catalog.lower(pg_catalog.substring(c.referer,
                               '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?([^/?#:]+)')), '(direct)') END AS referrer,
                           c.source, c.is_bot IS TRUE AS is_bot, pg_catalog.count(*) AS clicks,
                           pg_catalog.min(c.id) AS first_id, pg_catalog.max(c.id) AS last_id,
                           pg_catalog.min(c.clicked_at) AS first_at, pg_catalog.max(c.clicked_at) AS last_at
                      FROM linkhooks.clicks c, snap, cursor
                     WHERE c.txid >= pg_catalog.pg_snapshot_xmin($1::pg_catalog.pg_snapshot)
                       AND c.txid < pg_catalog.pg_snapshot_xmax(snap.now)
                       AND NOT pg_catalog.pg_visible_in_snapshot(c.txid, snap.prev)
                       AND c.id > cursor.id_floor
                     GROUP BY 1, 2, 3, 4, 5, 6, 7),
                  fresh AS (
                    SELECT link_id, pg_catalog.date_part('epoch', minute_at)::bigint AS minute,
                           pg_catalog.sum(clicks)::bigint AS clicks,
                           COALESCE(pg_catalog.sum(clicks) FILTER (WHERE NOT is_bot), 0)::bigint AS humans,
                           COALESCE(pg_catalog.sum(clicks) FILTER (WHERE source = 'qr'), 0)::bigint AS qr,
                           (EXTRACT(epoch FROM pg_catalog.min(first_at)) * 1000000)::bigint AS first_at,
                           (EXTRACT(epoch FROM pg_catalog.max(last_at)) * 1000000)::bigint AS last_at
                      FROM groups GROUP BY link_id, minute_at)
             SELECT snap.now::text,
                    pg_catalog.pg_snapshot_xmin(snap.now) >= pg_catalog.pg_snapshot_xmin(snap.prev)
                      AND pg_catalog.pg_snapshot_xmax(snap.now) >= pg_catalog.pg_snapshot_xmax(snap.prev),
                    -- Restored clicks from the future, rare: the newest txid (from its index) says
                    -- whether to look; a plain max(id) with that filter scans every click backwards.
                    -- Not this transaction's own (a caller's clicks, ahead of its snapshot's xmax).
                    (SELECT CASE WHEN top.txid >= pg_catalog.pg_snapshot_xmax(snap.now) THEN
                              (SELECT pg_catalog.max(c.id) FROM linkhooks.clicks c
                                WHERE c.txid >= pg_catalog.pg_snapshot_xmax(snap.now)
                                  AND c.txid IS DISTINCT FROM pg_catalog.pg_current_xact_id_if_assigned()) END
                       FROM (SELECT c.txid FROM linkhooks.clicks c WHERE c.txid IS NOT NULL
                              ORDER BY c.txid DESC LIMIT 1) top),
                    (SELECT pg_catalog.array_agg(link_id ORDER BY link_id, minute) FROM fresh),
                    (SELECT pg_catalog.array_agg(minute ORDER BY link_id, minute) FROM fresh),
                    (SELECT pg_catalog.array_agg(clicks ORDER BY link_id, minute) FROM fresh),
                    (SELECT pg_catalog.array_agg(humans ORDER BY link_id, minute) FROM fresh),
                    (SELECT pg_catalog.json_agg(g)::text
                       FROM (SELECT link_id, pg_catalog.date_part('epoch', minute_at)::bigint AS minute, country,
                                    device, referrer, source, is_bot, clicks, first_id, last_id
                               FROM groups WHERE $2) g),
                    (SELECT pg_catalog.array_agg(qr ORDER BY link_id, minute) FROM fresh),
                    (SELECT pg_catalog.array_agg(first_at ORDER BY link_id, minute) FROM fresh),
                    (SELECT pg_catalog.array_agg(last_at ORDER BY link_id, minute) FROM fresh)
               FROM snap",
            &[TEXT, BOOL],
            &[previous.into(), with_groups.into()],
        )?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(None);
        };
        if !row.get::<bool>(2)?.unwrap_or(false) {
            // A caller's REPEATABLE READ snapshot from before the last run: counting
            // from it would count that run's clicks again.
            return Ok(None);
        }
        let ints = |n| -> Result<Vec<i64>> {
            Ok(row
                .get::<Vec<Option<i64>>>(n)?
                .unwrap_or_default()
                .into_iter()
                .flatten()
                .collect())
        };
        let (link_ids, minutes, clicks, humans) = (ints(4)?, ints(5)?, ints(6)?, ints(7)?);
        let (qr, first, last) = (ints(9)?, ints(10)?, ints(11)?);
        let groups = match row.get::<String>(8)? {
            Some(json) => serde_json::from_str(&json)
                .map_err(|e| crate::error::Error::Column(format!("click groups: {e}")))?,
            None => Vec::new(),
        };
        Ok(Some(Batch {
            snapshot: row.get(1)?.unwrap_or_default(),
            restored_max_id: row.get(3)?,
            minutes: (0..link_ids.len())
                .map(|i| MinuteCount {
                    link_id: link_ids[i],
                    minute: minutes[i],
                    clicks: clicks[i],
                    humans: humans[i],
                    qr: qr[i],
                    first_micros: first[i],
                    last_micros: last[i],
                })
                .collect(),
            groups,
        }))
    })
}
