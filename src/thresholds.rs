//! `link.threshold` and `link.spike`: the aggregator keeps clicks per link
//! (and campaign) and minute while such rules exist, and after each batch
//! checks every rule against the clicks in its window (`window::step`). A
//! rule fires once when its condition starts to hold, records that in
//! `threshold_state` in the same transaction as the event, and re-arms after
//! a whole window without it. A spike rule with `per_country` counts each
//! country of its link (or campaign) apart, against that country's own
//! baseline, from `country_minutes`.

use std::collections::{HashMap, HashSet};

use pgrx::prelude::*;
use serde_json::Value;

use crate::error::Result;
use crate::events::{self, new_event_id, unix_now};
use crate::filters::Facts;
use crate::minutes::{self, MinuteCount, Scope, Subject};
use crate::payload::{
    self, CampaignName, EventType, LinkPayload, SpikeData, SpikeRulePayload, ThresholdData,
    ThresholdRulePayload,
};
use crate::plans::{self, INT8, TEXT};
use crate::rules::{self, RuleSettings};
use crate::tally::ClickGroup;
use crate::window::{self, Spike, Step, Threshold};

struct Rule {
    id: i64,
    link_id: Option<i64>,
    campaign: Option<String>,
    measure: Measure,
}

enum Measure {
    Threshold(Threshold),
    Spike(Spike),
}

impl Rule {
    fn window_minutes(&self) -> i64 {
        match self.measure {
            Measure::Threshold(t) => t.window_minutes,
            Measure::Spike(s) => s.window_minutes,
        }
    }

    fn per_country(&self) -> bool {
        matches!(self.measure, Measure::Spike(s) if s.per_country)
    }

    /// Minutes of history the rule reads.
    fn reach_minutes(&self) -> i64 {
        match self.measure {
            Measure::Threshold(t) => t.window_minutes,
            Measure::Spike(s) => s.window_minutes + s.baseline_minutes,
        }
    }
}

/// Clicks (not flagged as bots) in a rule's window, and in its baseline before it (spikes).
#[derive(Clone, Copy)]
struct WindowCounts {
    clicks: i64,
    baseline: i64,
}

/// Whether a spike rule counts countries apart: then the aggregator reads
/// the batch's click groups (which carry the country) for `run`.
pub fn per_country_wanted() -> Result<bool> {
    Ok(Spi::get_one::<bool>(
        "SELECT EXISTS (SELECT FROM linkhooks.rules
                         WHERE kind = 'spike' AND settings @> '{\"per_country\": true}')",
    )?
    .unwrap_or(false))
}

/// Folds the batch into the minute tables and evaluates every threshold rule;
/// returns how many fired. `links` are the batch's links (those that exist);
/// `groups` carry the countries when `per_country_wanted`.
pub fn run(
    minutes: &[MinuteCount],
    groups: &[ClickGroup],
    links: &HashMap<i64, &LinkPayload>,
) -> Result<usize> {
    let rules = load_rules()?;
    if rules.is_empty() {
        return Ok(0);
    }
    let campaign_of = |link_id: i64| links.get(&link_id).and_then(|l| l.campaign.clone());
    minutes::add(minutes, &campaign_of)?;
    // Human clicks with a known country, per (link, minute, country).
    let mut by_country: HashMap<(i64, i64, &str), i64> = HashMap::new();
    if rules.iter().any(Rule::per_country) {
        for g in groups
            .iter()
            .filter(|g| !g.is_bot && links.contains_key(&g.link_id))
        {
            if let Some(country) = g.country.as_deref() {
                *by_country
                    .entry((g.link_id, g.minute, country))
                    .or_default() += g.clicks;
            }
        }
        minutes::add_countries(&by_country, &campaign_of)?;
    }
    let touched_countries: HashSet<(i64, &str)> = by_country
        .keys()
        .map(|(link, _, country)| (*link, *country))
        .collect();
    let states = load_states()?;
    let touched_links: HashSet<i64> = minutes
        .iter()
        .map(|m| m.link_id)
        .filter(|id| links.contains_key(id))
        .collect();
    let touched_campaigns: HashSet<String> = touched_links
        .iter()
        .filter_map(|id| campaign_of(*id))
        .collect();
    let now = unix_now();
    let mut fired = 0;
    for rule in &rules {
        let mut subjects: Vec<Subject> = if rule.per_country() {
            let mut subjects: Vec<Subject> = touched_countries
                .iter()
                .filter_map(|&(link_id, country)| {
                    let scope = match (&rule.link_id, &rule.campaign) {
                        (Some(id), _) if *id == link_id => Scope::Link(link_id),
                        (None, Some(name)) if campaign_of(link_id).as_ref() == Some(name) => {
                            Scope::Campaign(name.clone())
                        }
                        (None, None) => Scope::Link(link_id),
                        _ => return None,
                    };
                    Some(Subject {
                        scope,
                        country: Some(country.to_string()),
                    })
                })
                .collect();
            // A campaign's links may share a country.
            subjects.sort_by(|a, b| a.columns().cmp(&b.columns()));
            subjects.dedup();
            subjects
        } else {
            match (&rule.link_id, &rule.campaign) {
                (Some(id), _) if touched_links.contains(id) => {
                    vec![Subject::whole(Scope::Link(*id))]
                }
                (None, Some(name)) if touched_campaigns.contains(name) => {
                    vec![Subject::whole(Scope::Campaign(name.clone()))]
                }
                (None, None) => touched_links
                    .iter()
                    .map(|id| Subject::whole(Scope::Link(*id)))
                    .collect(),
                _ => Vec::new(),
            }
        };
        // Fired subjects are checked on every run, clicks or not, to re-arm them.
        for (rule_id, subject) in states.keys() {
            if *rule_id == rule.id && !subjects.contains(subject) {
                subjects.push(subject.clone());
            }
        }
        if subjects.is_empty() {
            continue;
        }
        let window_start = (now / 60 - (rule.window_minutes() - 1)) * 60;
        let counts = minutes::window_counts(&subjects, window_start, None)?;
        let baselines = match rule.measure {
            Measure::Spike(spike) => minutes::window_counts(
                &subjects,
                window_start - spike.baseline_minutes * 60,
                Some(window_start),
            )?,
            Measure::Threshold(_) => HashMap::new(),
        };
        for subject in subjects {
            let counted = WindowCounts {
                clicks: counts.get(&subject).copied().unwrap_or(0),
                baseline: baselines.get(&subject).copied().unwrap_or(0),
            };
            let reached = match rule.measure {
                Measure::Threshold(t) => counted.clicks >= t.clicks,
                Measure::Spike(spike) => spike.holds(counted.clicks, counted.baseline),
            };
            let state = states.get(&(rule.id, subject.clone())).copied();
            match window::step(reached, rule.window_minutes(), state, now) {
                Step::Stay => {}
                Step::Fire => {
                    let link = match &subject.scope {
                        Scope::Link(id) => links.get(id).copied(),
                        Scope::Campaign(_) => None,
                    };
                    if fire(rule, &subject, link, counted, window_start, now)? {
                        fired += 1;
                    }
                }
                Step::FellBelow(since) => set_below_since(rule.id, &subject, Some(since))?,
                Step::BackAbove => set_below_since(rule.id, &subject, None)?,
                Step::Rearm => rearm(rule.id, &subject)?,
            }
        }
    }
    Ok(fired)
}

fn load_rules() -> Result<Vec<Rule>> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT id, link_id, campaign, settings, kind FROM linkhooks.rules
              WHERE kind IN ('threshold', 'spike')",
            None,
            &[],
        )?;
        let mut rules = Vec::new();
        for r in rows {
            let link_id: Option<i64> = r.get(2)?;
            let campaign: Option<String> = r.get(3)?;
            let settings = r.get::<pgrx::JsonB>(4)?.map_or(Value::Null, |j| j.0);
            let kind: String = r.get(5)?.unwrap_or_default();
            // Checked on write; one that no longer parses is skipped.
            let measure =
                match rules::check(&kind, link_id.is_some(), campaign.is_some(), &settings) {
                    Ok(RuleSettings::Threshold(t)) => Measure::Threshold(t),
                    Ok(RuleSettings::Spike(s)) => Measure::Spike(s),
                    _ => continue,
                };
            rules.push(Rule {
                id: r.get(1)?.unwrap_or_default(),
                link_id,
                campaign,
                measure,
            });
        }
        Ok(rules)
    })
}

/// Fired thresholds: (rule, subject) → since when below (Unix seconds), if it is.
fn load_states() -> Result<HashMap<(i64, Subject), Option<i64>>> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT rule_id, link_id, campaign, pg_catalog.date_part('epoch', below_since)::bigint, country
               FROM linkhooks.threshold_state",
            None,
            &[],
        )?;
        let mut states = HashMap::new();
        for r in rows {
            let Some(subject) = Subject::from_columns(r.get(2)?, r.get(3)?, r.get(5)?) else {
                continue;
            };
            states.insert(
                (r.get::<i64>(1)?.unwrap_or_default(), subject),
                r.get::<i64>(4)?,
            );
        }
        Ok(states)
    })
}

/// Records that the rule fired for the subject and queues its event
/// (link.threshold or link.spike); false if another run recorded it first.
fn fire(
    rule: &Rule,
    subject: &Subject,
    link: Option<&LinkPayload>,
    counted: WindowCounts,
    window_start: i64,
    now: i64,
) -> Result<bool> {
    let id = new_event_id().to_string();
    let (link_id, campaign, country) = subject.columns();
    let recorded = Spi::connect_mut(|client| -> Result<bool> {
        let rows = plans::execute(
            client,
            "INSERT INTO linkhooks.threshold_state (rule_id, link_id, campaign, country, event_id)
             VALUES ($1, $2, $3, $4, $5::uuid) ON CONFLICT DO NOTHING RETURNING 1",
            &[INT8, INT8, TEXT, TEXT, TEXT],
            &[
                rule.id.into(),
                link_id.into(),
                campaign.into(),
                country.into(),
                id.as_str().into(),
            ],
        )?;
        Ok(!rows.is_empty())
    })?;
    if !recorded {
        return Ok(false);
    }
    let now_micros = now * 1_000_000;
    let campaign_name = campaign.map(|name| CampaignName { name });
    let (window_start_text, window_end_text) = (
        payload::format_timestamp(window_start * 1_000_000),
        payload::format_timestamp(now_micros),
    );
    let (kind, body) = match rule.measure {
        Measure::Threshold(t) => (
            EventType::LinkThreshold,
            payload::envelope(
                &id,
                EventType::LinkThreshold,
                now_micros,
                ThresholdData {
                    link,
                    campaign: campaign_name,
                    rule: ThresholdRulePayload {
                        id: rule.id,
                        clicks: t.clicks,
                        window_minutes: t.window_minutes,
                    },
                    clicks: counted.clicks,
                    window_start: window_start_text,
                    window_end: window_end_text,
                },
            ),
        ),
        Measure::Spike(spike) => {
            let (countries, referrers) = top_sources(subject, window_start)?;
            (
                EventType::LinkSpike,
                payload::envelope(
                    &id,
                    EventType::LinkSpike,
                    now_micros,
                    SpikeData {
                        link,
                        campaign: campaign_name,
                        country,
                        rule: SpikeRulePayload {
                            id: rule.id,
                            factor: spike.factor,
                            window_minutes: spike.window_minutes,
                            baseline_minutes: spike.baseline_minutes,
                            min_clicks: spike.min_clicks,
                            per_country: spike.per_country,
                        },
                        clicks: counted.clicks,
                        expected: (spike.expected(counted.baseline) * 100.0).round() / 100.0,
                        window_start: window_start_text,
                        window_end: window_end_text,
                        top_countries: &countries,
                        top_referrers: &referrers,
                    },
                ),
            )
        }
    };
    let facts = Facts {
        campaign: link.and_then(|l| l.campaign.as_deref()).or(campaign),
        tags: link.map_or(&[], |l| &l.tags),
        click: None,
        milestone: None,
    };
    events::emit(kind, &id, &facts, |_| body.clone())?;
    Ok(true)
}

/// The five countries and referring hosts with the most clicks (not flagged
/// as bots) in the window, for a spike's payload (of the subject's country only, if it has one).
fn top_sources(
    subject: &Subject,
    window_start: i64,
) -> Result<(
    serde_json::Map<String, Value>,
    serde_json::Map<String, Value>,
)> {
    let (link_id, campaign, country) = subject.columns();
    Spi::connect(|client| {
        let rows = plans::query(
            client,
            "WITH recent AS (
                SELECT COALESCE(c.country, 'unknown') AS country,
                       COALESCE(pg_catalog.lower(pg_catalog.substring(c.referer,
                           '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?([^/?#:]+)')), '(direct)') AS referrer
                  FROM linkhooks.clicks c
                 WHERE c.clicked_at >= pg_catalog.to_timestamp($1) AND c.is_bot IS NOT TRUE
                   AND (c.link_id = $2 OR c.link_id IN (SELECT l.id FROM linkhooks.links l WHERE l.campaign = $3))
                   AND ($4::text IS NULL OR c.country = $4))
             (SELECT 'country', country, pg_catalog.count(*) FROM recent GROUP BY 2 ORDER BY 3 DESC, 2 LIMIT 5)
             UNION ALL
             (SELECT 'referrer', referrer, pg_catalog.count(*) FROM recent GROUP BY 2 ORDER BY 3 DESC, 2 LIMIT 5)",
            &[INT8, INT8, TEXT, TEXT],
            &[
                window_start.into(),
                link_id.into(),
                campaign.into(),
                country.into(),
            ],
        )?;
        let (mut countries, mut referrers) = (serde_json::Map::new(), serde_json::Map::new());
        for r in rows {
            let (Some(dimension), Some(value)) = (r.get::<String>(1)?, r.get::<String>(2)?) else {
                continue;
            };
            let count = Value::from(r.get::<i64>(3)?.unwrap_or(0));
            match dimension.as_str() {
                "country" => countries.insert(value, count),
                _ => referrers.insert(value, count),
            };
        }
        Ok((countries, referrers))
    })
}

fn set_below_since(rule_id: i64, subject: &Subject, since: Option<i64>) -> Result<()> {
    let (link_id, campaign, country) = subject.columns();
    Spi::run_with_args(
        "UPDATE linkhooks.threshold_state SET below_since = pg_catalog.to_timestamp($5)
          WHERE rule_id = $1 AND link_id IS NOT DISTINCT FROM $2 AND campaign IS NOT DISTINCT FROM $3
            AND country IS NOT DISTINCT FROM $4",
        &[
            rule_id.into(),
            link_id.into(),
            campaign.into(),
            country.into(),
            since.map(|s| s as f64).into(),
        ],
    )?;
    Ok(())
}

fn rearm(rule_id: i64, subject: &Subject) -> Result<()> {
    let (link_id, campaign, country) = subject.columns();
    Spi::run_with_args(
        "DELETE FROM linkhooks.threshold_state
          WHERE rule_id = $1 AND link_id IS NOT DISTINCT FROM $2 AND campaign IS NOT DISTINCT FROM $3
            AND country IS NOT DISTINCT FROM $4",
        &[rule_id.into(), link_id.into(), campaign.into(), country.into()],
    )?;
    Ok(())
}

/// Drops minutes no rule's window reaches any more (all of them once no
/// threshold rule is left) and the state of deleted rules. Run by maintenance.
pub fn prune() -> Result<i64> {
    let keep_minutes = load_rules()?
        .iter()
        .map(|r| r.reach_minutes() + 1)
        .max()
        .unwrap_or(0);
    Ok(Spi::get_one_with_args::<i64>(
        "WITH links AS (
            DELETE FROM linkhooks.link_minutes
             WHERE minute < pg_catalog.now() - $1 * interval '1 minute' RETURNING 1),
         campaigns AS (
            DELETE FROM linkhooks.campaign_minutes
             WHERE minute < pg_catalog.now() - $1 * interval '1 minute' RETURNING 1),
         countries AS (
            DELETE FROM linkhooks.country_minutes
             WHERE minute < pg_catalog.now() - $1 * interval '1 minute' RETURNING 1),
         states AS (
            DELETE FROM linkhooks.threshold_state s
             WHERE NOT EXISTS (SELECT FROM linkhooks.rules r WHERE r.id = s.rule_id) RETURNING 1)
         SELECT (SELECT pg_catalog.count(*) FROM links) + (SELECT pg_catalog.count(*) FROM campaigns)
              + (SELECT pg_catalog.count(*) FROM countries) + (SELECT pg_catalog.count(*) FROM states)",
        &[(keep_minutes as f64).into()],
    )?
    .unwrap_or(0))
}
