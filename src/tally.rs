//! The counts one link.clicks.digest carries: clicks in a window by country,
//! device, referring host and source, and the range of click ids. Filled from
//! batches of grouped clicks and merged with what earlier batches stored.
//! Pure logic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Clicks of one link in one minute with the same country, device, referring
/// host, source and bot flag, as the aggregator reads them.
#[derive(Debug, Clone, Deserialize)]
pub struct ClickGroup {
    pub link_id: i64,
    /// Unix seconds of the minute of `clicked_at`.
    pub minute: i64,
    pub country: Option<String>,
    pub device: Option<String>,
    /// The referring host, or "(direct)".
    pub referrer: String,
    pub source: String,
    pub is_bot: bool,
    pub clicks: i64,
    pub first_id: i64,
    pub last_id: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub clicks: i64,
    pub countries: BTreeMap<String, i64>,
    pub devices: BTreeMap<String, i64>,
    pub referrers: BTreeMap<String, i64>,
    pub sources: BTreeMap<String, i64>,
    pub first_id: i64,
    pub last_id: i64,
}

impl Tally {
    pub fn add(&mut self, g: &ClickGroup) {
        let unknown = || "unknown".to_string();
        *self
            .countries
            .entry(g.country.clone().unwrap_or_else(unknown))
            .or_default() += g.clicks;
        *self
            .devices
            .entry(g.device.clone().unwrap_or_else(unknown))
            .or_default() += g.clicks;
        *self.referrers.entry(g.referrer.clone()).or_default() += g.clicks;
        *self.sources.entry(g.source.clone()).or_default() += g.clicks;
        self.span(g.clicks, g.first_id, g.last_id);
    }

    /// Adds another tally of the same window (one stored by an earlier batch).
    pub fn merge(&mut self, other: &Tally) {
        for (mine, theirs) in [
            (&mut self.countries, &other.countries),
            (&mut self.devices, &other.devices),
            (&mut self.referrers, &other.referrers),
            (&mut self.sources, &other.sources),
        ] {
            for (k, v) in theirs {
                *mine.entry(k.clone()).or_default() += v;
            }
        }
        self.span(other.clicks, other.first_id, other.last_id);
    }

    fn span(&mut self, clicks: i64, first: i64, last: i64) {
        if self.clicks == 0 {
            (self.first_id, self.last_id) = (first, last);
        } else {
            self.first_id = self.first_id.min(first);
            self.last_id = self.last_id.max(last);
        }
        self.clicks += clicks;
    }

    /// A count map as the payload shows it (largest first is the receiver's choice).
    pub fn json(map: &BTreeMap<String, i64>) -> Map<String, Value> {
        map.iter()
            .map(|(k, v)| (k.clone(), Value::from(*v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(
        country: Option<&str>,
        referrer: &str,
        clicks: i64,
        first: i64,
        last: i64,
    ) -> ClickGroup {
        ClickGroup {
            link_id: 1,
            minute: 0,
            country: country.map(str::to_string),
            device: Some("mobile".into()),
            referrer: referrer.into(),
            source: "link".into(),
            is_bot: false,
            clicks,
            first_id: first,
            last_id: last,
        }
    }

    #[test]
    fn adds_and_merges() {
        let mut a = Tally::default();
        a.add(&group(Some("US"), "instagram.com", 3, 10, 14));
        a.add(&group(None, "(direct)", 1, 9, 9));
        let mut b = Tally::default();
        b.add(&group(Some("US"), "(direct)", 2, 20, 21));
        a.merge(&b);
        assert_eq!(a.clicks, 6);
        assert_eq!((a.first_id, a.last_id), (9, 21));
        assert_eq!(
            a.countries,
            BTreeMap::from([("US".into(), 5), ("unknown".into(), 1)])
        );
        assert_eq!(
            a.referrers,
            BTreeMap::from([("instagram.com".into(), 3), ("(direct)".into(), 3)])
        );
        assert_eq!(a.devices["mobile"], 6);
        assert_eq!(a.sources["link"], 6);
        // It round-trips through the jsonb column it is kept in.
        let stored = serde_json::to_value(&a).unwrap();
        assert_eq!(serde_json::from_value::<Tally>(stored).unwrap(), a);
    }
}
