//! `link.clicks.digest`: for subscriptions whose filters ask for a digest
//! window, the aggregator tallies each batch's clicks per (subscription,
//! link, window of `clicked_at`) in `digests`, and sends each window once it
//! has ended, in the same transaction that deletes its row. The click trigger
//! sends such subscriptions no per-click event.

use std::collections::HashMap;

use pgrx::prelude::*;

use crate::error::Result;
use crate::events::{self, new_event_id, unix_now_micros};
use crate::filters::{ClickFacts, Facts};
use crate::linkstore::LinkRow;
use crate::payload::{self, ClickIdRange, DigestData, DigestWindow, EventType, LinkPayload};
use crate::plans::{self, INT8, INT8_ARRAY, TEXT_ARRAY};
use crate::tally::{ClickGroup, Tally};

/// Windows sent per run, at most (the rest follow a second later).
const SENT_PER_RUN: i64 = 1000;
/// A window is sent this long after it ends, so clicks committed just after
/// its end are in it; clicks later still come in a further digest of that window.
const GRACE_SECONDS: f64 = 2.0;

/// Whether any subscription wants digests (the batch then carries click groups).
pub fn wanted() -> Result<bool> {
    Ok(events::cache()?
        .subscriptions
        .iter()
        .any(|s| s.digest_minutes.is_some() && s.wants(EventType::LinkClicksDigest)))
}

/// Adds the batch's click groups to the open windows, then sends the windows
/// that ended; returns how many digests were queued.
pub fn run(groups: &[ClickGroup], links: &HashMap<i64, &LinkPayload>) -> Result<usize> {
    let cache = events::cache()?;
    let mut open: HashMap<(i64, i64, i64), (i64, Tally)> = HashMap::new();
    for sub in cache
        .subscriptions
        .iter()
        .filter(|s| s.wants(EventType::LinkClicksDigest))
    {
        let Some(minutes) = sub.digest_minutes else {
            continue;
        };
        let width = minutes * 60;
        for g in groups {
            let Some(link) = links.get(&g.link_id) else {
                continue; // deleted since
            };
            let facts = Facts {
                campaign: link.campaign.as_deref(),
                tags: &link.tags,
                click: Some(ClickFacts {
                    country: g.country.as_deref(),
                    device: g.device.as_deref(),
                    is_bot: g.is_bot,
                }),
                milestone: None,
            };
            if !sub.filters().matches(&facts) {
                continue;
            }
            let start = g.minute.div_euclid(width) * width;
            open.entry((sub.id, g.link_id, start))
                .or_insert_with(|| (start + width, Tally::default()))
                .1
                .add(g);
        }
    }
    if !open.is_empty() {
        store(open)?;
    }
    send_ended()
}

/// Merges new tallies into the stored ones and writes them back.
fn store(mut open: HashMap<(i64, i64, i64), (i64, Tally)>) -> Result<()> {
    let keys: Vec<(i64, i64, i64)> = open.keys().copied().collect();
    let column = |f: fn(&(i64, i64, i64)) -> i64| keys.iter().map(f).collect::<Vec<i64>>();
    Spi::connect_mut(|client| -> Result<()> {
        let stored = plans::execute(
            client,
            "SELECT d.subscription_id, d.link_id, pg_catalog.date_part('epoch', d.window_start)::bigint, d.tally
               FROM linkhooks.digests d
               JOIN unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS k(s, l, w)
                 ON d.subscription_id = k.s AND d.link_id = k.l AND d.window_start = pg_catalog.to_timestamp(k.w)",
            &[INT8_ARRAY, INT8_ARRAY, INT8_ARRAY],
            &[column(|k| k.0).into(), column(|k| k.1).into(), column(|k| k.2).into()],
        )?;
        for r in stored {
            let key = (
                r.get::<i64>(1)?.unwrap_or_default(),
                r.get::<i64>(2)?.unwrap_or_default(),
                r.get::<i64>(3)?.unwrap_or_default(),
            );
            let earlier = r
                .get::<pgrx::JsonB>(4)?
                .and_then(|j| serde_json::from_value::<Tally>(j.0).ok());
            if let (Some((_, tally)), Some(earlier)) = (open.get_mut(&key), earlier) {
                tally.merge(&earlier);
            }
        }
        let ends: Vec<i64> = keys.iter().map(|k| open[k].0).collect();
        let tallies: Vec<String> = keys
            .iter()
            .map(|k| serde_json::to_string(&open[k].1).unwrap_or_default())
            .collect();
        plans::execute(
            client,
            "INSERT INTO linkhooks.digests AS d (subscription_id, link_id, window_start, window_end, tally)
             SELECT s, l, pg_catalog.to_timestamp(w), pg_catalog.to_timestamp(e), t::jsonb
               FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[]) AS u(s, l, w, e, t)
             ON CONFLICT (subscription_id, link_id, window_start) DO UPDATE SET tally = excluded.tally",
            &[INT8_ARRAY, INT8_ARRAY, INT8_ARRAY, INT8_ARRAY, TEXT_ARRAY],
            &[
                column(|k| k.0).into(),
                column(|k| k.1).into(),
                column(|k| k.2).into(),
                ends.into(),
                tallies.into(),
            ],
        )?;
        Ok(())
    })
}

/// A window that ended, as `send_ended` takes it from `digests` (times in Unix microseconds).
struct Ended {
    subscription_id: i64,
    link_id: i64,
    start: i64,
    end: i64,
    tally: Option<Tally>,
}

/// Sends the windows that ended (and deletes them), in window order.
fn send_ended() -> Result<usize> {
    let ended = Spi::connect_mut(|client| -> Result<Vec<Ended>> {
        let rows = plans::execute(
            client,
            "DELETE FROM linkhooks.digests d
              WHERE (d.subscription_id, d.link_id, d.window_start) IN (
                    SELECT subscription_id, link_id, window_start FROM linkhooks.digests
                     WHERE window_end <= pg_catalog.now() - $1 * interval '1 second'
                     ORDER BY window_end LIMIT $2 FOR UPDATE SKIP LOCKED)
          RETURNING d.subscription_id, d.link_id,
                    (pg_catalog.date_part('epoch', d.window_start) * 1000000)::bigint,
                    (pg_catalog.date_part('epoch', d.window_end) * 1000000)::bigint, d.tally",
            &[plans::FLOAT8, INT8],
            &[GRACE_SECONDS.into(), SENT_PER_RUN.into()],
        )?;
        rows.into_iter()
            .map(|r| {
                Ok(Ended {
                    subscription_id: r.get(1)?.unwrap_or_default(),
                    link_id: r.get(2)?.unwrap_or_default(),
                    start: r.get(3)?.unwrap_or_default(),
                    end: r.get(4)?.unwrap_or_default(),
                    tally: r
                        .get::<pgrx::JsonB>(5)?
                        .and_then(|j| serde_json::from_value::<Tally>(j.0).ok()),
                })
            })
            .collect()
    })?;
    let mut sent = 0;
    for Ended {
        subscription_id,
        link_id,
        start,
        end,
        tally,
    } in ended
    {
        let (Some(tally), Some(link)) = (tally, LinkRow::by_id(link_id)?) else {
            continue; // the link was deleted: nothing to say about it
        };
        let link = link.payload();
        let id = new_event_id().to_string();
        let body = payload::envelope(
            &id,
            EventType::LinkClicksDigest,
            unix_now_micros(),
            DigestData {
                link: &link,
                window: DigestWindow {
                    start: payload::format_timestamp(start),
                    end: payload::format_timestamp(end),
                },
                clicks: tally.clicks,
                countries: &Tally::json(&tally.countries),
                devices: &Tally::json(&tally.devices),
                referrers: &Tally::json(&tally.referrers),
                sources: &Tally::json(&tally.sources),
                click_ids: ClickIdRange {
                    first: tally.first_id,
                    last: tally.last_id,
                },
            },
        );
        if events::emit_to(subscription_id, EventType::LinkClicksDigest, &id, body)? {
            sent += 1;
        }
    }
    Ok(sent)
}
