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

mod counts;
mod reached;
mod read;

use std::collections::HashMap;

use pgrx::prelude::*;
use serde_json::{Value, json};

use crate::digests;
use crate::error::{OrReport, Result};
use crate::events::new_event_id;
use crate::linkstore;
use crate::milestones::Counted;
use crate::minutes;
use crate::misses;
use crate::payload::{EventType, LinkPayload};
use crate::plans;
use crate::thresholds;

use counts::{count_campaigns, count_conversions, count_links};
use reached::{MilestoneLists, Reached, announce, record_milestones};
use read::read_new_clicks;

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

/// Takes the run lock and returns the cursor (the previous run's snapshot), or
/// None while another run holds it. Read after the lock, with a fresh snapshot,
/// so it is what the previous run committed.
///
/// The run lock is an EXCLUSIVE lock on `click_cursor` (readers' ACCESS SHARE
/// does not conflict): taking it writes nothing, so an idle run writes no WAL,
/// and only a role that may update the cursor (the `owner` level, a
/// superuser) can hold it to pause counting: `LOCK TABLE linkhooks.click_cursor
/// IN EXCLUSIVE MODE` in an open transaction. (An advisory lock could be held
/// by any role, stopping every run.)
fn lock_cursor() -> Result<Option<String>> {
    let cursor = linkstore::relations()?.click_cursor;
    // SAFETY: a lock on an existing relation, released when the transaction ends.
    let locked = cursor != pg_sys::InvalidOid
        && unsafe {
            pg_sys::ConditionalLockRelationOid(cursor, pg_sys::ExclusiveLock as pg_sys::LOCKMODE)
        };
    if !locked {
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
