//! Subscription bookkeeping: runs of dead letters and 410 Gone answers,
//! written to the subscriptions rows that can be locked now, the rest later.

use std::collections::{HashMap, HashSet};

use pgrx::prelude::*;

use super::Worker;
use crate::error::Result;
use crate::opsevents;
use crate::payload::DisabledSubscription;

/// What the subscriptions table still has to learn, per subscription.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// A delivery succeeded: the run of dead letters starts again from 0.
    pub reset: bool,
    /// Dead letters since (or, without `reset`, on top of the stored count).
    pub dead: i32,
    /// The endpoint answered 410 Gone: disable the subscription.
    pub gone: bool,
}

/// Subscription updates not yet written (their rows were locked).
#[derive(Clone, Debug, Default)]
pub struct Bookkeeping(pub HashMap<i64, Pending>);

impl Bookkeeping {
    pub fn delivered(&mut self, sub: i64) {
        let p = self.0.entry(sub).or_default();
        p.reset = true;
        p.dead = 0;
    }

    pub fn dead(&mut self, sub: i64, gone: bool) {
        let p = self.0.entry(sub).or_default();
        p.dead += 1;
        p.gone |= gone;
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Worker {
    /// Writes pending subscription bookkeeping to the rows it can lock now;
    /// the rest waits for a later transaction. Writes only real changes:
    /// writing subscriptions refreshes every backend's cache.
    pub(super) fn write_bookkeeping(&mut self) -> Result<()> {
        if self.bookkeeping.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = self.bookkeeping.0.keys().copied().collect();
        let (resets, deads, gones): (Vec<bool>, Vec<i32>, Vec<bool>) = ids
            .iter()
            .map(|id| {
                let p = &self.bookkeeping.0[id];
                (p.reset, p.dead, p.gone)
            })
            .fold(
                (vec![], vec![], vec![]),
                |(mut r, mut d, mut g), (a, b, c)| {
                    r.push(a);
                    d.push(b);
                    g.push(c);
                    (r, d, g)
                },
            );
        let disable_after = self.settings.disable_after;
        let mut disabled = Vec::new();
        let (locked, existing) = Spi::connect_mut(|client| -> Result<(Vec<i64>, Vec<i64>)> {
            let locked: Vec<i64> = client
                .update(
                    "SELECT id FROM linkhooks.subscriptions
                      WHERE id OPERATOR(pg_catalog.=) ANY ($1)
                        FOR NO KEY UPDATE SKIP LOCKED",
                    None,
                    &[ids.clone().into()],
                )?
                .into_iter()
                .map(|r| Ok(r.get::<i64>(1)?.unwrap_or_default()))
                .collect::<Result<_>>()?;
            if !locked.is_empty() {
                let updated = client.update(
                    "WITH u AS (
                        SELECT u.id, u.reset, u.dead, u.gone
                          FROM ROWS FROM (pg_catalog.unnest($1::bigint[]), pg_catalog.unnest($2::bool[]), pg_catalog.unnest($3::int[]), pg_catalog.unnest($4::bool[])) AS u(id, reset, dead, gone)
                         WHERE u.id OPERATOR(pg_catalog.=) ANY ($5)),
                     n AS (
                        SELECT s.id, u.gone, u.dead, s.enabled AS was_enabled,
                               CASE WHEN u.reset THEN 0 ELSE s.consecutive_dead_letters END + u.dead AS run
                          FROM linkhooks.subscriptions s JOIN u ON u.id = s.id)
                     UPDATE linkhooks.subscriptions s
                        SET consecutive_dead_letters = n.run,
                            enabled = s.enabled AND NOT n.gone
                                      AND NOT ($6 > 0 AND n.dead > 0 AND n.run >= $6),
                            disabled_reason = CASE
                                WHEN s.enabled AND n.gone
                                    THEN pg_catalog.format('endpoint answered 410 Gone at %s', pg_catalog.now())
                                WHEN s.enabled AND $6 > 0 AND n.dead > 0 AND n.run >= $6
                                    THEN pg_catalog.format('disabled after %s dead letters in a row', n.run)
                                ELSE s.disabled_reason END
                       FROM n
                      WHERE s.id = n.id
                        AND (n.run <> s.consecutive_dead_letters OR (n.gone AND s.enabled))
                  RETURNING s.id, s.name, s.disabled_reason, n.was_enabled AND NOT s.enabled",
                    None,
                    &[
                        ids.clone().into(),
                        resets.into(),
                        deads.into(),
                        gones.into(),
                        locked.clone().into(),
                        disable_after.into(),
                    ],
                )?;
                for row in updated {
                    if row.get::<bool>(4)? == Some(true) {
                        disabled.push(DisabledSubscription {
                            id: row.get(1)?.unwrap_or_default(),
                            name: row.get(2)?.unwrap_or_default(),
                            reason: row.get(3)?.unwrap_or_default(),
                        });
                    }
                }
            }
            let existing: Vec<i64> = if locked.len() < ids.len() {
                client
                    .select(
                        "SELECT id FROM linkhooks.subscriptions WHERE id OPERATOR(pg_catalog.=) ANY ($1)",
                        None,
                        &[ids.clone().into()],
                    )?
                    .into_iter()
                    .map(|r| Ok(r.get::<i64>(1)?.unwrap_or_default()))
                    .collect::<Result<_>>()?
            } else {
                Vec::new()
            };
            Ok((locked, existing))
        })?;
        for subscription in disabled {
            // Names and reasons only: a subscription's URL may carry a token.
            log!(
                "pg_linkhooks: subscription {} ({}) disabled: {}",
                subscription.id,
                subscription.name,
                subscription.reason
            );
            opsevents::subscription_disabled(subscription)?;
        }
        // Written, or the subscription is gone: done. Locked by someone else: later.
        let locked: HashSet<i64> = locked.into_iter().collect();
        let existing: HashSet<i64> = existing.into_iter().collect();
        self.bookkeeping
            .0
            .retain(|id, _| !locked.contains(id) && existing.contains(id));
        Ok(())
    }
}
