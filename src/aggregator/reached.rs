//! Milestones a run's counts crossed: recorded once, then announced.

use std::collections::HashMap;

use pgrx::prelude::*;
use serde_json::Value;

use super::LinkCount;
use crate::error::Result;
use crate::events::{self, unix_now_micros};
use crate::filters::{Facts, MilestoneFacts};
use crate::milestones::{self, Counted, DEFAULT_THRESHOLDS};
use crate::payload::{
    self, CampaignMilestoneData, CampaignName, EventType, LinkMilestoneData, LinkPayload,
    MilestonePayload,
};
use crate::plans::{self, INT8_ARRAY, TEXT_ARRAY};
use crate::rules::{self, RuleSettings};

/// A milestone about to be recorded (and announced if it is new).
pub(super) struct Reached {
    pub(super) event_id: String,
    pub(super) scope: &'static str,
    pub(super) link: Option<usize>,
    pub(super) campaign: Option<String>,
    pub(super) counted: Counted,
    pub(super) threshold: i64,
    pub(super) clicks: i64,
    pub(super) listed: bool,
}

/// Milestone lists from the rules, and the subscriptions' own lists.
pub(super) struct MilestoneLists {
    by_link: HashMap<i64, Vec<i64>>,
    by_campaign: HashMap<String, Vec<i64>>,
    everywhere: Vec<i64>,
    cache: std::rc::Rc<events::Cache>,
}

impl MilestoneLists {
    pub(super) fn load() -> Result<Self> {
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
    pub(super) fn for_link(&self, link_id: i64, campaign: Option<&str>) -> &[i64] {
        self.by_link
            .get(&link_id)
            .or_else(|| campaign.and_then(|c| self.by_campaign.get(c)))
            .unwrap_or(&self.everywhere)
    }

    pub(super) fn for_campaign(&self, name: &str) -> &[i64] {
        self.by_campaign.get(name).unwrap_or(&self.everywhere)
    }

    /// Thresholds crossed between `before` and `after`: the listed ones, and
    /// those subscriptions to `kind` that count the same clicks list themselves.
    pub(super) fn crossed(
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
pub(super) fn record_milestones(reached: &[Reached], links: &[LinkCount]) -> Result<Vec<String>> {
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
pub(super) fn announce(r: &Reached, link: Option<&LinkPayload>) -> Result<()> {
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
