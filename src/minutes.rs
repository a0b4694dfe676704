//! Clicks per minute, the counts behind `link.threshold` and `link.spike`:
//! per link and per campaign (`link_minutes`, `campaign_minutes`) and, for
//! `per_country` spike rules, per link and country (`country_minutes`). The
//! aggregator adds each batch; rules read sums over their windows.

use std::collections::HashMap;

use pgrx::prelude::*;

use crate::error::Result;
use crate::plans::{self, INT8, INT8_ARRAY, TEXT_ARRAY};

/// New clicks of one link in one minute of `clicked_at` (Unix seconds).
pub struct MinuteCount {
    pub link_id: i64,
    pub minute: i64,
    pub clicks: i64,
    pub humans: i64,
    /// QR scans among them.
    pub qr: i64,
    /// The first and last `clicked_at` among them (Unix microseconds).
    pub first_micros: i64,
    pub last_micros: i64,
}

/// Whose clicks a rule counts: one link's, or one campaign's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    Link(i64),
    Campaign(String),
}

/// What a rule counts: a scope's clicks, or those of one country in it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subject {
    pub scope: Scope,
    pub country: Option<String>,
}

impl Subject {
    pub fn whole(scope: Scope) -> Subject {
        Subject {
            scope,
            country: None,
        }
    }

    /// The threshold_state columns: (link_id, campaign, country).
    pub fn columns(&self) -> (Option<i64>, Option<&str>, Option<&str>) {
        let country = self.country.as_deref();
        match &self.scope {
            Scope::Link(id) => (Some(*id), None, country),
            Scope::Campaign(name) => (None, Some(name.as_str()), country),
        }
    }

    pub fn from_columns(
        link_id: Option<i64>,
        campaign: Option<String>,
        country: Option<String>,
    ) -> Option<Subject> {
        let scope = match (link_id, campaign) {
            (Some(id), _) => Scope::Link(id),
            (None, Some(name)) => Scope::Campaign(name),
            (None, None) => return None,
        };
        Some(Subject { scope, country })
    }
}

/// Adds a batch's clicks per link and minute, and per campaign (the one each link has now).
pub fn add(minutes: &[MinuteCount], campaign_of: &dyn Fn(i64) -> Option<String>) -> Result<()> {
    if minutes.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&MinuteCount) -> i64| minutes.iter().map(f).collect::<Vec<i64>>();
    let campaigns: Vec<Option<String>> = minutes.iter().map(|m| campaign_of(m.link_id)).collect();
    Spi::connect_mut(|client| -> Result<()> {
        plans::execute(
            client,
            "WITH new AS (
                SELECT pg_catalog.to_timestamp(m) AS minute, l, c, k, h
                  FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[]) AS u(l, m, c, k, h)),
             links AS (
                INSERT INTO linkhooks.link_minutes AS t (minute, link_id, clicks, human_clicks)
                SELECT minute, l, k, h FROM new
                ON CONFLICT (minute, link_id) DO UPDATE
                   SET clicks = t.clicks + excluded.clicks, human_clicks = t.human_clicks + excluded.human_clicks)
             INSERT INTO linkhooks.campaign_minutes AS t (minute, campaign, clicks, human_clicks)
             SELECT minute, c, sum(k), sum(h) FROM new WHERE c IS NOT NULL GROUP BY minute, c
             ON CONFLICT (minute, campaign) DO UPDATE
                SET clicks = t.clicks + excluded.clicks, human_clicks = t.human_clicks + excluded.human_clicks",
            &[INT8_ARRAY, INT8_ARRAY, TEXT_ARRAY, INT8_ARRAY, INT8_ARRAY],
            &[
                column(|m| m.link_id).into(),
                column(|m| m.minute).into(),
                campaigns.into(),
                column(|m| m.clicks).into(),
                column(|m| m.humans).into(),
            ],
        )?;
        Ok(())
    })
}

/// Adds a batch's clicks per link and hour (UTC hours) of `clicked_at` to
/// `link_hours`, behind `link_daily_clicks`; links deleted meanwhile are skipped.
pub fn add_hours(minutes: &[MinuteCount]) -> Result<()> {
    if minutes.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&MinuteCount) -> i64| minutes.iter().map(f).collect::<Vec<i64>>();
    Spi::connect_mut(|client| -> Result<()> {
        plans::execute(
            client,
            "INSERT INTO linkhooks.link_hours AS t (link_id, hour, clicks, human_clicks, qr_scans)
             SELECT u.l, pg_catalog.to_timestamp(u.m / 3600 * 3600), pg_catalog.sum(u.k), pg_catalog.sum(u.h), pg_catalog.sum(u.q)
               FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[]) AS u(l, m, k, h, q)
              WHERE EXISTS (SELECT FROM linkhooks.links l WHERE l.id = u.l)
              GROUP BY 1, 2
             ON CONFLICT (link_id, hour) DO UPDATE
                SET clicks = t.clicks + excluded.clicks, human_clicks = t.human_clicks + excluded.human_clicks,
                    qr_scans = t.qr_scans + excluded.qr_scans",
            &[INT8_ARRAY, INT8_ARRAY, INT8_ARRAY, INT8_ARRAY, INT8_ARRAY],
            &[
                column(|m| m.link_id).into(),
                column(|m| m.minute).into(),
                column(|m| m.clicks).into(),
                column(|m| m.humans).into(),
                column(|m| m.qr).into(),
            ],
        )?;
        Ok(())
    })
}

/// Adds a batch's human clicks per (link, minute of `clicked_at`, country).
pub fn add_countries(
    by_country: &HashMap<(i64, i64, &str), i64>,
    campaign_of: &dyn Fn(i64) -> Option<String>,
) -> Result<()> {
    if by_country.is_empty() {
        return Ok(());
    }
    let (mut link_ids, mut minutes, mut countries, mut campaigns, mut humans) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (&(link_id, minute, country), &count) in by_country {
        link_ids.push(link_id);
        minutes.push(minute);
        countries.push(country.to_string());
        campaigns.push(campaign_of(link_id));
        humans.push(count);
    }
    Spi::connect_mut(|client| -> Result<()> {
        plans::execute(
            client,
            "INSERT INTO linkhooks.country_minutes AS t (minute, link_id, country, campaign, human_clicks)
             SELECT pg_catalog.to_timestamp(m), l, k, c, h
               FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::bigint[]) AS u(l, m, k, c, h)
             ON CONFLICT (minute, link_id, country) DO UPDATE
                SET human_clicks = t.human_clicks + excluded.human_clicks",
            &[INT8_ARRAY, INT8_ARRAY, TEXT_ARRAY, TEXT_ARRAY, INT8_ARRAY],
            &[
                link_ids.into(),
                minutes.into(),
                countries.into(),
                campaigns.into(),
                humans.into(),
            ],
        )?;
        Ok(())
    })
}

/// 9999-12-31, the last second PostgreSQL's timestamps format in four digits.
const LATEST: i64 = 253_402_300_799;

/// Clicks not flagged as bots per subject, from `from` until `until` (Unix
/// seconds; None: up to now).
pub fn window_counts(
    subjects: &[Subject],
    from: i64,
    until: Option<i64>,
) -> Result<HashMap<Subject, i64>> {
    let (mut link_ids, mut names) = (Vec::new(), Vec::new());
    let (mut country_links, mut link_countries) = (Vec::new(), Vec::new());
    let (mut country_campaigns, mut campaign_countries) = (Vec::new(), Vec::new());
    for subject in subjects {
        match (&subject.scope, &subject.country) {
            (Scope::Link(id), None) => link_ids.push(*id),
            (Scope::Campaign(name), None) => names.push(name.clone()),
            (Scope::Link(id), Some(country)) => {
                country_links.push(*id);
                link_countries.push(country.clone());
            }
            (Scope::Campaign(name), Some(country)) => {
                country_campaigns.push(name.clone());
                campaign_countries.push(country.clone());
            }
        }
    }
    let until = until.unwrap_or(LATEST);
    Spi::connect(|client| {
        let mut counts = HashMap::new();
        if !country_links.is_empty() || !country_campaigns.is_empty() {
            let rows = plans::query(
                client,
                "SELECT link_id, NULL::text, country, pg_catalog.sum(human_clicks)::bigint
                   FROM linkhooks.country_minutes
                  WHERE minute >= pg_catalog.to_timestamp($1) AND minute < pg_catalog.to_timestamp($2)
                    AND (link_id, country) IN (SELECT * FROM unnest($3::bigint[], $4::text[]))
                  GROUP BY link_id, country
                 UNION ALL
                 SELECT NULL, campaign, country, pg_catalog.sum(human_clicks)::bigint
                   FROM linkhooks.country_minutes
                  WHERE minute >= pg_catalog.to_timestamp($1) AND minute < pg_catalog.to_timestamp($2)
                    AND (campaign, country) IN (SELECT * FROM unnest($5::text[], $6::text[]))
                  GROUP BY campaign, country",
                &[INT8, INT8, INT8_ARRAY, TEXT_ARRAY, TEXT_ARRAY, TEXT_ARRAY],
                &[
                    from.into(),
                    until.into(),
                    country_links.into(),
                    link_countries.into(),
                    country_campaigns.into(),
                    campaign_countries.into(),
                ],
            )?;
            for r in rows {
                if let Some(subject) = Subject::from_columns(r.get(1)?, r.get(2)?, r.get(3)?) {
                    counts.insert(subject, r.get::<i64>(4)?.unwrap_or(0));
                }
            }
        }
        if link_ids.is_empty() && names.is_empty() {
            return Ok(counts);
        }
        let rows = plans::query(
            client,
            "SELECT link_id, NULL::text, pg_catalog.sum(human_clicks)::bigint FROM linkhooks.link_minutes
              WHERE minute >= pg_catalog.to_timestamp($1) AND minute < pg_catalog.to_timestamp($4)
                AND link_id = ANY ($2) GROUP BY link_id
             UNION ALL
             SELECT NULL, campaign, pg_catalog.sum(human_clicks)::bigint FROM linkhooks.campaign_minutes
              WHERE minute >= pg_catalog.to_timestamp($1) AND minute < pg_catalog.to_timestamp($4)
                AND campaign = ANY ($3) GROUP BY campaign",
            &[INT8, INT8_ARRAY, TEXT_ARRAY, INT8],
            &[
                from.into(),
                link_ids.into(),
                names.into(),
                until.into(),
            ],
        )?;
        for r in rows {
            if let Some(subject) = Subject::from_columns(r.get(1)?, r.get(2)?, None) {
                counts.insert(subject, r.get::<i64>(3)?.unwrap_or(0));
            }
        }
        Ok(counts)
    })
}
