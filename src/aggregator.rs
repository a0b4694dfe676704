//! The click aggregator: counts the clicks committed since a durable cursor
//! and fires the milestones they reach, off the click path and exactly once;
//! it also evaluates threshold rules (`thresholds`), fills and sends digests
//! (`digests`) and announces due misses (`misses::announce_due`).
//!
//! Every click row carries its transaction's id (`clicks.txid`). The cursor
//! is the snapshot of the previous run: a run reads the clicks visible now
//! but not in that snapshot (PgQ's batches work the same way), so each
//! committed click is counted by exactly one run, whatever order
//! transactions commit in. A run's counts, the milestones it records, their
//! deliveries and the new cursor commit together: a crash loses none and
//! repeats none. The worker runs it when clicks or misses were committed
//! (it looks every 250 ms) and every 5 s anyway; anyone may run it by hand.

use std::collections::HashMap;

use pgrx::prelude::*;
use serde_json::{Value, json};

use crate::digests;
use crate::error::{OrReport, Result};
use crate::events::{self, new_event_id, unix_now_micros};
use crate::filters::{Facts, MilestoneFacts};
use crate::guc;
use crate::linkstore;
use crate::milestones::{self, Counted, DEFAULT_THRESHOLDS};
use crate::misses;
use crate::payload::{
    self, CampaignMilestoneData, CampaignName, EventType, LinkMilestoneData, LinkPayload,
    MilestonePayload,
};
use crate::plans::{self, BOOL, INT8_ARRAY, TEXT, TEXT_ARRAY};
use crate::rules::{self, RuleSettings};
use crate::tally::ClickGroup;
use crate::minutes::{self, MinuteCount};
use crate::thresholds;

/// Counts new clicks, fires the milestones they reach and announces due
/// misses; returns what it did.
#[pg_extern(volatile, security_definer)]
fn run_aggregation() -> pgrx::JsonB {
    pgrx::JsonB(run().or_report())
}

/// New clicks of one link in this run, with its totals after them.
struct LinkCount {
    link: LinkPayload,
    totals: Totals,
}

/// Clicks counted so far (all, and humans: not flagged as bots), and how many of them this batch added.
#[derive(Clone, Copy, Default)]
struct Totals {
    clicks: i64,
    humans: i64,
    new_clicks: i64,
    new_humans: i64,
}

impl Totals {
    /// For each way of counting: (counting, count before this batch, count after it).
    fn by_counting(&self) -> [(Counted, i64, i64); 2] {
        [
            (Counted::Humans, self.humans - self.new_humans, self.humans),
            (Counted::All, self.clicks - self.new_clicks, self.clicks),
        ]
    }
}

/// A milestone about to be recorded (and announced if it is new).
struct Reached {
    event_id: String,
    scope: &'static str,
    link: Option<usize>,
    campaign: Option<String>,
    counted: Counted,
    threshold: i64,
    clicks: i64,
    listed: bool,
}

fn run() -> Result<Value> {
    let Some(previous) = lock_cursor()? else {
        return Ok(json!({"skipped": "another run holds the lock, or the cursor was just made"}));
    };
    let with_groups = digests::wanted()? || thresholds::per_country_wanted()?;
    let Some(batch) = read_new_clicks(&previous, with_groups)? else {
        return Ok(json!({"skipped": "the snapshot is older than the cursor"}));
    };
    let links = count_links(&batch)?;
    let conversions = count_conversions(&previous, &batch.snapshot)?;
    minutes::add_hours(&batch.minutes)?;
    let campaigns = count_campaigns(&links)?;
    let lists = MilestoneLists::load()?;
    let mut reached = Vec::new();
    let mut reach =
        |kind, listed: &[i64], totals: &Totals, link: Option<usize>, campaign: Option<&String>| {
            for (counted, before, after) in totals.by_counting() {
                for threshold in lists.crossed(kind, listed, counted, before, after) {
                    reached.push(Reached {
                        event_id: new_event_id().to_string(),
                        scope: if link.is_some() { "link" } else { "campaign" },
                        link,
                        campaign: campaign.cloned(),
                        counted,
                        threshold,
                        clicks: after,
                        listed: listed.contains(&threshold),
                    });
                }
            }
        };
    for (i, count) in links.iter().enumerate() {
        let listed = lists.for_link(count.link.id, count.link.campaign.as_deref());
        reach(
            EventType::LinkMilestone,
            listed,
            &count.totals,
            Some(i),
            None,
        );
    }
    for (name, totals) in &campaigns {
        reach(
            EventType::CampaignMilestone,
            lists.for_campaign(name),
            totals,
            None,
            Some(name),
        );
    }
    let fired = record_milestones(&reached, &links)?;
    for r in reached.iter().filter(|r| fired.contains(&r.event_id)) {
        announce(r, r.link.map(|i| &links[i].link))?;
    }
    let by_id: HashMap<i64, &LinkPayload> = links.iter().map(|l| (l.link.id, &l.link)).collect();
    let thresholds = thresholds::run(&batch.minutes, &batch.groups, &by_id)?;
    let digests = digests::run(&batch.groups, &by_id)?;
    let misses_announced = misses::announce_due()?;
    let report = json!({
        "clicks": links.iter().map(|l| l.totals.new_clicks).sum::<i64>(),
        "links": links.len(),
        "conversions": conversions.counted,
        "milestones": fired.len(),
        "thresholds": thresholds,
        "digests": digests,
        "misses_announced": misses_announced,
    });
    if batch.minutes.is_empty()
        && batch.restored_max_id.is_none()
        && conversions.counted == 0
        && conversions.restored_max_id.is_none()
    {
        // Nothing new: the cursor stays (still correct), and an idle run writes nothing.
        return Ok(report);
    }
    Spi::run_with_args(
        "UPDATE linkhooks.click_cursor
            SET snapshot = $1::pg_catalog.pg_snapshot,
                id_floor = GREATEST(id_floor, coalesce($2, 0)),
                conversion_id_floor = GREATEST(conversion_id_floor, coalesce($3, 0)),
                updated_at = pg_catalog.now()",
        &[
            batch.snapshot.as_str().into(),
            batch.restored_max_id.into(),
            conversions.restored_max_id.into(),
        ],
    )?;
    Ok(report)
}

/// The advisory lock (class, key) one run holds while it counts: a run that
/// finds it taken skips. An advisory lock, not a row lock on the cursor: an idle
/// run then writes nothing (no transaction id, no WAL).
const RUN_LOCK: (i32, i32) = (0x4C41, 1);

/// Takes the run lock and returns the cursor (the previous run's snapshot), or
/// None while another run holds it. Read after the lock, with a fresh snapshot,
/// so it is what the previous run committed.
fn lock_cursor() -> Result<Option<String>> {
    let locked = Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.pg_try_advisory_xact_lock($1, $2)",
        &[RUN_LOCK.0.into(), RUN_LOCK.1.into()],
    )?;
    if locked != Some(true) {
        return Ok(None);
    }
    let snapshot = Spi::connect_mut(|client| {
        plans::first::<String>(plans::execute(
            client,
            "SELECT snapshot::text FROM linkhooks.click_cursor",
            &[],
            &[],
        )?)
    })?;
    if snapshot.is_none() {
        // No row (someone deleted it): count from now on.
        Spi::run(
            "INSERT INTO linkhooks.click_cursor (snapshot) VALUES (pg_catalog.pg_current_snapshot())",
        )?;
    }
    Ok(snapshot)
}

/// The clicks committed since `previous`, per link and minute of `clicked_at`.
struct Batch {
    /// This run's snapshot, the next cursor.
    snapshot: String,
    /// Clicks with a transaction id from the future belong to a restore from
    /// another cluster: counted already there, they are never counted here.
    restored_max_id: Option<i64>,
    minutes: Vec<MinuteCount>,
    /// The same clicks grouped for digests (empty when no subscription wants one).
    groups: Vec<ClickGroup>,
}

/// One link's new clicks in a batch.
struct PerLink {
    link_id: i64,
    clicks: i64,
    humans: i64,
    qr: i64,
    first_micros: i64,
    last_micros: i64,
}

impl Batch {
    /// Per link, ascending (the minutes come ordered by link, then minute).
    fn per_link(&self) -> Vec<PerLink> {
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

fn read_new_clicks(previous: &str, with_groups: bool) -> Result<Option<Batch>> {
    // Run as a mutating statement for a fresh snapshot, taken after the cursor was locked
    // (a read-only one would reuse the caller's, taken before).
    Spi::connect_mut(|client| {
        let rows = plans::execute(
            client,
            "WITH snap AS (SELECT pg_catalog.pg_current_snapshot() AS now,
                                  $1::pg_catalog.pg_snapshot AS prev),
                  cursor AS (SELECT id_floor FROM linkhooks.click_cursor),
                  new AS MATERIALIZED (
                    SELECT c.id, c.link_id, c.is_bot IS TRUE AS is_bot, c.country, c.device, c.source,
                           pg_catalog.date_part('epoch', pg_catalog.date_trunc('minute', c.clicked_at))::bigint AS minute,
                           c.referer, c.clicked_at
                      FROM linkhooks.clicks c, snap, cursor
                     WHERE c.txid >= pg_catalog.pg_snapshot_xmin($1::pg_catalog.pg_snapshot)
                       AND c.txid < pg_catalog.pg_snapshot_xmax(snap.now)
                       AND NOT pg_catalog.pg_visible_in_snapshot(c.txid, snap.prev)
                       AND c.id > cursor.id_floor),
                  fresh AS (
                    SELECT link_id, minute, pg_catalog.count(*) AS clicks,
                           pg_catalog.count(*) FILTER (WHERE NOT is_bot) AS humans,
                           pg_catalog.count(*) FILTER (WHERE source = 'qr') AS qr,
                           (EXTRACT(epoch FROM pg_catalog.min(clicked_at)) * 1000000)::bigint AS first_at,
                           (EXTRACT(epoch FROM pg_catalog.max(clicked_at)) * 1000000)::bigint AS last_at
                      FROM new GROUP BY 1, 2),
                  -- For digests only: the same clicks by what a digest counts them by.
                  groups AS (
                    SELECT link_id, minute, country, device,
                           COALESCE(pg_catalog.lower(pg_catalog.substring(referer,
                               '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?([^/?#:]+)')), '(direct)') AS referrer,
                           source, is_bot, pg_catalog.count(*) AS clicks,
                           pg_catalog.min(id) AS first_id, pg_catalog.max(id) AS last_id
                      FROM new WHERE $2 GROUP BY 1, 2, 3, 4, 5, 6, 7)
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
                    (SELECT pg_catalog.json_agg(groups)::text FROM groups),
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

/// Conversions a run counted.
struct Conversions {
    counted: i64,
    /// As `Batch::restored_max_id`, for conversions.
    restored_max_id: Option<i64>,
}

/// Adds the conversions committed after `previous` and by `now` (the snapshot the clicks were
/// read with) to their links' counts. Its own statement: a later snapshot than `now`, so what
/// committed since is left to the next run, and the restored rows from the future are those
/// ahead of this statement's own snapshot (a conversion committed since `now` may be ahead of it).
fn count_conversions(previous: &str, now: &str) -> Result<Conversions> {
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
fn count_links(batch: &Batch) -> Result<Vec<LinkCount>> {
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
type CampaignCounts = HashMap<String, Totals>;

/// Adds the batch to each campaign's totals (a link's campaign as it is now).
fn count_campaigns(links: &[LinkCount]) -> Result<CampaignCounts> {
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

/// Milestone lists from the rules, and the subscriptions' own lists.
struct MilestoneLists {
    by_link: HashMap<i64, Vec<i64>>,
    by_campaign: HashMap<String, Vec<i64>>,
    everywhere: Vec<i64>,
    cache: std::rc::Rc<events::Cache>,
}

impl MilestoneLists {
    fn load() -> Result<Self> {
        let mut lists = MilestoneLists {
            by_link: HashMap::new(),
            by_campaign: HashMap::new(),
            everywhere: DEFAULT_THRESHOLDS.to_vec(),
            cache: events::cache()?,
        };
        Spi::connect(|client| -> Result<()> {
            let rows = client.select(
                "SELECT link_id, campaign, settings FROM linkhooks.rules WHERE kind = 'milestones'",
                None,
                &[],
            )?;
            for r in rows {
                let link_id: Option<i64> = r.get(1)?;
                let campaign: Option<String> = r.get(2)?;
                let settings = r.get::<pgrx::JsonB>(3)?.map_or(Value::Null, |j| j.0);
                // Rules are checked on write; one that no longer parses is skipped.
                let Ok(RuleSettings::Milestones { thresholds }) = rules::check(
                    "milestones",
                    link_id.is_some(),
                    campaign.is_some(),
                    &settings,
                ) else {
                    continue;
                };
                match (link_id, campaign) {
                    (Some(id), _) => {
                        lists.by_link.insert(id, thresholds);
                    }
                    (None, Some(name)) => {
                        lists.by_campaign.insert(name, thresholds);
                    }
                    (None, None) => lists.everywhere = thresholds,
                }
            }
            Ok(())
        })?;
        Ok(lists)
    }

    /// A link's list: its own rule's, else its campaign's, else the global one.
    fn for_link(&self, link_id: i64, campaign: Option<&str>) -> &[i64] {
        self.by_link
            .get(&link_id)
            .or_else(|| campaign.and_then(|c| self.by_campaign.get(c)))
            .unwrap_or(&self.everywhere)
    }

    fn for_campaign(&self, name: &str) -> &[i64] {
        self.by_campaign.get(name).unwrap_or(&self.everywhere)
    }

    /// Thresholds crossed between `before` and `after`: the listed ones, and
    /// those subscriptions to `kind` that count the same clicks list themselves.
    fn crossed(
        &self,
        kind: EventType,
        listed: &[i64],
        counted: Counted,
        before: i64,
        after: i64,
    ) -> Vec<i64> {
        let mut all = milestones::crossed(before, after, listed);
        for (own, own_counted) in self.cache.subscriber_milestones(kind) {
            if own_counted == counted {
                all.extend(milestones::crossed(before, after, own));
            }
        }
        all.sort_unstable();
        all.dedup();
        all
    }
}

/// Records the milestones; returns the event ids of those not recorded before
/// (a milestone fires once per link or campaign, ever).
fn record_milestones(reached: &[Reached], links: &[LinkCount]) -> Result<Vec<String>> {
    if reached.is_empty() {
        return Ok(Vec::new());
    }
    let column = |f: fn(&Reached) -> Option<String>| reached.iter().map(f).collect::<Vec<_>>();
    Spi::connect_mut(|client| {
        let rows = plans::execute(
            client,
            "INSERT INTO linkhooks.milestones (scope, link_id, campaign, counted, threshold, clicks, event_id)
             SELECT s, l, c, n, t, k, e::uuid
               FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[],
                                      $6::bigint[], $7::text[]) AS u(s, l, c, n, t, k, e)
             ON CONFLICT DO NOTHING
             RETURNING event_id::text",
            &[TEXT_ARRAY, INT8_ARRAY, TEXT_ARRAY, TEXT_ARRAY, INT8_ARRAY, INT8_ARRAY, TEXT_ARRAY],
            &[
                column(|r| Some(r.scope.to_string())).into(),
                reached
                    .iter()
                    .map(|r| r.link.map(|i| links[i].link.id))
                    .collect::<Vec<_>>()
                    .into(),
                column(|r| r.campaign.clone()).into(),
                column(|r| Some(r.counted.as_str().to_string())).into(),
                reached.iter().map(|r| r.threshold).collect::<Vec<_>>().into(),
                reached.iter().map(|r| r.clicks).collect::<Vec<_>>().into(),
                column(|r| Some(r.event_id.clone())).into(),
            ],
        )?;
        rows.into_iter()
            .map(|r| Ok(r.get::<String>(1)?.unwrap_or_default()))
            .collect()
    })
}

/// Queues link.milestone or campaign.milestone for the subscriptions that want it.
fn announce(r: &Reached, link: Option<&LinkPayload>) -> Result<()> {
    let at = unix_now_micros();
    let milestone = MilestonePayload {
        threshold: r.threshold,
        clicks: r.clicks,
        counted: r.counted.as_str(),
        reached_at: payload::format_timestamp(at),
    };
    let facts = MilestoneFacts {
        threshold: r.threshold,
        listed: r.listed,
        counted: r.counted,
    };
    let (kind, body, facts) = match (link, &r.campaign) {
        (Some(link), _) => (
            EventType::LinkMilestone,
            payload::envelope(
                &r.event_id,
                EventType::LinkMilestone,
                at,
                LinkMilestoneData {
                    link,
                    milestone: &milestone,
                },
            ),
            Facts {
                campaign: link.campaign.as_deref(),
                tags: &link.tags,
                click: None,
                milestone: Some(facts),
            },
        ),
        (None, campaign) => {
            let name = campaign.as_deref().unwrap_or_default();
            (
                EventType::CampaignMilestone,
                payload::envelope(
                    &r.event_id,
                    EventType::CampaignMilestone,
                    at,
                    CampaignMilestoneData {
                        campaign: CampaignName { name },
                        milestone: &milestone,
                    },
                ),
                Facts {
                    campaign: Some(name),
                    tags: &[],
                    click: None,
                    milestone: Some(facts),
                },
            )
        }
    };
    events::emit(kind, &r.event_id, &facts, |_| body.clone())?;
    Ok(())
}
