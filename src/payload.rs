//! Webhook bodies: the event envelope and the data each event type carries.
//! Built once per event with serde; field names are the public contract.
//! Pure logic.

use std::net::IpAddr;

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::links::{MAX_HEADER_LEN, truncate};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    LinkClicked,
    QrScanned,
    LinkConverted,
    LinkCreated,
    LinkUpdated,
    LinkDeleted,
    LinkExpired,
    CampaignCompleted,
    WebhookTest,
    SubscriptionDisabled,
    DeliveryDead,
    LinkMilestone,
    CampaignMilestone,
    LinkMiss,
    LinkThreshold,
    LinkClicksDigest,
    LinkSpike,
    LinkBroken,
    LinkRecovered,
}

impl EventType {
    pub const ALL: [EventType; 19] = [
        EventType::LinkClicked,
        EventType::QrScanned,
        EventType::LinkConverted,
        EventType::LinkCreated,
        EventType::LinkUpdated,
        EventType::LinkDeleted,
        EventType::LinkExpired,
        EventType::CampaignCompleted,
        EventType::WebhookTest,
        EventType::SubscriptionDisabled,
        EventType::DeliveryDead,
        EventType::LinkMilestone,
        EventType::CampaignMilestone,
        EventType::LinkMiss,
        EventType::LinkThreshold,
        EventType::LinkClicksDigest,
        EventType::LinkSpike,
        EventType::LinkBroken,
        EventType::LinkRecovered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::LinkClicked => "link.clicked",
            EventType::QrScanned => "qr.scanned",
            EventType::LinkConverted => "link.converted",
            EventType::LinkCreated => "link.created",
            EventType::LinkUpdated => "link.updated",
            EventType::LinkDeleted => "link.deleted",
            EventType::LinkExpired => "link.expired",
            EventType::CampaignCompleted => "campaign.completed",
            EventType::WebhookTest => "webhook.test",
            EventType::SubscriptionDisabled => "subscription.disabled",
            EventType::DeliveryDead => "delivery.dead",
            EventType::LinkMilestone => "link.milestone",
            EventType::CampaignMilestone => "campaign.milestone",
            EventType::LinkMiss => "link.miss",
            EventType::LinkThreshold => "link.threshold",
            EventType::LinkClicksDigest => "link.clicks.digest",
            EventType::LinkSpike => "link.spike",
            EventType::LinkBroken => "link.broken",
            EventType::LinkRecovered => "link.recovered",
        }
    }

    /// Events about the webhooks themselves, for an operations endpoint: a
    /// subscription receives them only when its event_types names them.
    pub fn operational(self) -> bool {
        matches!(
            self,
            EventType::SubscriptionDisabled | EventType::DeliveryDead
        )
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// One event per click: what a digest subscription receives as link.clicks.digest instead.
    pub fn per_click(self) -> bool {
        matches!(self, EventType::LinkClicked | EventType::QrScanned)
    }

    /// Bit for event-type sets kept as masks.
    pub fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// How a subscription sees click IP addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum IpMode {
    Full,
    /// IPv4 cut to its /24, IPv6 to its /48.
    #[default]
    Anonymized,
    Omit,
}

impl IpMode {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "full" => Some(IpMode::Full),
            "anonymized" => Some(IpMode::Anonymized),
            "omit" => Some(IpMode::Omit),
            _ => None,
        }
    }

    pub fn apply(self, ip: Option<IpAddr>) -> Option<String> {
        match self {
            IpMode::Full => ip.map(|ip| ip.to_string()),
            IpMode::Anonymized => ip.map(|ip| anonymize(ip).to_string()),
            IpMode::Omit => None,
        }
    }
}

/// Zeroes the host part: IPv4 to /24, IPv6 to /48.
pub fn anonymize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::from([a, b, c, 0])
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::from([s[0], s[1], s[2], 0, 0, 0, 0, 0])
        }
    }
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-02-05T14:23:45.123Z`.
pub fn format_timestamp(unix_micros: i64) -> String {
    let millis = unix_micros.div_euclid(1000);
    let secs = millis.div_euclid(1000);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Digits written directly: `format!` was most of this function's cost on every click.
    fn digits(out: &mut String, value: i64, width: u32, then: char) {
        for place in (0..width).rev() {
            let digit = (value / 10_i64.pow(place)).rem_euclid(10) as u8;
            out.push(char::from(b'0' + digit));
        }
        out.push(then);
    }
    let mut out = String::with_capacity(24);
    if (0..=9999).contains(&year) {
        digits(&mut out, year, 4, '-');
    } else {
        // Outside RFC 3339's four-digit years: written out in full rather than cut.
        out.push_str(&format!("{year:04}-"));
    }
    digits(&mut out, month, 2, '-');
    digits(&mut out, day, 2, 'T');
    digits(&mut out, sod / 3600, 2, ':');
    digits(&mut out, sod % 3600 / 60, 2, ':');
    digits(&mut out, sod % 60, 2, '.');
    digits(&mut out, millis.rem_euclid(1000), 3, 'Z');
    out
}

/// The link as every event that carries one shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LinkPayload {
    pub id: i64,
    pub domain: String,
    pub slug: String,
    pub short_url: Option<String>,
    pub destination: String,
    pub campaign: Option<String>,
    pub tags: Vec<String>,
}

impl LinkPayload {
    /// `short_url` is `https://{domain}/{slug}` for links on a custom domain,
    /// else `{linkhooks.base_url}/{slug}`, else null.
    pub fn short_url(domain: &str, slug: &str, base_url: &str) -> Option<String> {
        if !domain.is_empty() {
            Some(format!("https://{domain}/{slug}"))
        } else if !base_url.is_empty() {
            Some(format!("{}/{slug}", base_url.trim_end_matches('/')))
        } else {
            None
        }
    }
}

/// A click as recorded, before per-subscription IP handling.
#[derive(Debug, Clone)]
pub struct Click {
    pub event_id: String,
    pub clicked_at_micros: i64,
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub referer: Option<String>,
    pub country: Option<String>,
    pub city: Option<String>,
    pub device: Option<String>,
    pub browser: Option<String>,
    pub os: Option<String>,
    pub is_bot: bool,
    pub source: String,
}

#[derive(Serialize)]
struct Envelope<'a, D: Serialize> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    timestamp: &'a str,
    data: D,
}

/// The complete body: `{"id","type","timestamp","data"}`.
pub fn envelope<D: Serialize>(id: &str, kind: EventType, at_micros: i64, data: D) -> String {
    envelope_at(id, kind, &format_timestamp(at_micros), data)
}

fn envelope_at<D: Serialize>(id: &str, kind: EventType, timestamp: &str, data: D) -> String {
    let env = Envelope {
        id,
        kind: kind.as_str(),
        timestamp,
        data,
    };
    // Sized for a click's body (about 650 bytes), so it is not regrown three times.
    let mut body = Vec::with_capacity(1024);
    serde_json::to_writer(&mut body, &env).expect("event payloads always serialize");
    String::from_utf8(body).expect("serde_json writes UTF-8")
}

#[derive(Serialize)]
struct ClickPayload<'a> {
    id: &'a str,
    timestamp: &'a str,
    ip_address: Option<String>,
    user_agent: Option<&'a str>,
    referer: Option<&'a str>,
    country: Option<&'a str>,
    city: Option<&'a str>,
    device: Option<&'a str>,
    browser: Option<&'a str>,
    os: Option<&'a str>,
    bot: bool,
    source: &'a str,
}

#[derive(Serialize)]
struct ClickData<'a> {
    link: &'a LinkPayload,
    click: ClickPayload<'a>,
    utm: &'a Map<String, Value>,
}

/// Body of `link.clicked` / `qr.scanned` for one IP mode.
pub fn click_body(
    kind: EventType,
    link: &LinkPayload,
    click: &Click,
    utm: &Map<String, Value>,
    ip_mode: IpMode,
) -> String {
    // The event is the click: one timestamp for both.
    let timestamp = format_timestamp(click.clicked_at_micros);
    let data = ClickData {
        link,
        click: ClickPayload {
            id: &click.event_id,
            timestamp: &timestamp,
            ip_address: ip_mode.apply(click.ip),
            user_agent: capped(&click.user_agent),
            referer: capped(&click.referer),
            country: click.country.as_deref(),
            city: click.city.as_deref(),
            device: click.device.as_deref(),
            browser: click.browser.as_deref(),
            os: click.os.as_deref(),
            bot: click.is_bot,
            source: &click.source,
        },
        utm,
    };
    envelope_at(&click.event_id, kind, &timestamp, data)
}

fn capped(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(|v| truncate(v, MAX_HEADER_LEN))
}

#[derive(Serialize)]
pub struct LinkChangeData<'a> {
    pub link: &'a LinkPayload,
    /// For link.updated: the names of the fields that changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed: Option<Vec<&'static str>>,
    /// For link.updated: each changed field's value before and after, as
    /// `{"field": {"from": …, "to": …}}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changes: Option<Map<String, Value>>,
}

#[derive(Serialize)]
pub struct LinkExpiredData<'a> {
    pub link: &'a LinkPayload,
    /// "max_clicks" or "expires_at"
    pub reason: &'static str,
    pub expired_at: String,
}

#[derive(Debug, Serialize)]
pub struct ConversionPayload {
    pub id: String,
    pub click_id: Option<i64>,
    pub name: String,
    /// The exact numeric value, as a JSON number.
    pub amount: Option<Box<RawValue>>,
    pub currency: Option<String>,
    pub occurred_at: String,
    pub metadata: Value,
    /// The caller's id for it (an order id), if given.
    pub external_id: Option<String>,
}

impl ConversionPayload {
    /// A numeric's text as a JSON number (exact), or None if it is not one (NaN).
    pub fn amount_from_numeric(text: &str) -> Option<Box<RawValue>> {
        serde_json::from_str::<Value>(text)
            .ok()
            .filter(Value::is_number)
            .and_then(|_| RawValue::from_string(text.to_string()).ok())
    }
}

#[derive(Serialize)]
pub struct ConversionData<'a> {
    pub link: Option<&'a LinkPayload>,
    pub conversion: ConversionPayload,
}

#[derive(Serialize)]
pub struct CampaignData {
    pub campaign: CampaignPayload,
}

#[derive(Serialize)]
pub struct CampaignPayload {
    pub name: String,
    pub click_goal: Option<i64>,
    pub clicks: i64,
    pub ends_at: Option<String>,
    pub completed_at: String,
    /// "click_goal" or "ends_at"
    pub reason: &'static str,
}

/// subscription.disabled: which subscription the worker switched off, and why.
#[derive(Serialize)]
pub struct SubscriptionDisabledData {
    pub subscription: DisabledSubscription,
}

#[derive(Serialize)]
pub struct DisabledSubscription {
    pub id: i64,
    pub name: String,
    pub reason: String,
}

/// delivery.dead: a delivery that ran out of attempts (or was answered 410).
#[derive(Serialize)]
pub struct DeliveryDeadData {
    pub delivery: DeadDelivery,
}

#[derive(Serialize)]
pub struct DeadDelivery {
    pub id: i64,
    pub event_id: String,
    pub event_type: String,
    pub subscription_id: i64,
    pub attempts: i32,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
}

/// A milestone as link.milestone and campaign.milestone show it.
#[derive(Serialize)]
pub struct MilestonePayload {
    pub threshold: i64,
    /// The count when the milestone was noticed (a burst may carry it past the threshold).
    pub clicks: i64,
    /// "humans" (clicks not flagged as bots) or "all".
    pub counted: &'static str,
    pub reached_at: String,
}

#[derive(Serialize)]
pub struct LinkMilestoneData<'a> {
    pub link: &'a LinkPayload,
    pub milestone: &'a MilestonePayload,
}

#[derive(Serialize)]
pub struct CampaignName<'a> {
    pub name: &'a str,
}

#[derive(Serialize)]
pub struct CampaignMilestoneData<'a> {
    pub campaign: CampaignName<'a>,
    pub milestone: &'a MilestonePayload,
}

/// link.threshold: a rule's click count within its window was reached.
#[derive(Serialize)]
pub struct ThresholdData<'a> {
    /// The link, for a rule on a link or on every link; null for a rule on a campaign.
    pub link: Option<&'a LinkPayload>,
    /// The campaign, for a rule on a campaign; else null.
    pub campaign: Option<CampaignName<'a>>,
    pub rule: ThresholdRulePayload,
    /// Clicks (not flagged as bots) in the window when it fired.
    pub clicks: i64,
    pub window_start: String,
    pub window_end: String,
}

#[derive(Serialize)]
pub struct ThresholdRulePayload {
    pub id: i64,
    pub clicks: i64,
    pub window_minutes: i64,
}

/// link.spike: a window's clicks at least `factor` times what the baseline averaged.
#[derive(Serialize)]
pub struct SpikeData<'a> {
    pub link: Option<&'a LinkPayload>,
    pub campaign: Option<CampaignName<'a>>,
    /// The country whose clicks spiked, for a `per_country` rule; else null.
    pub country: Option<&'a str>,
    pub rule: SpikeRulePayload,
    /// Clicks (not flagged as bots) in the window.
    pub clicks: i64,
    /// Clicks per window the baseline period averaged.
    pub expected: f64,
    pub window_start: String,
    pub window_end: String,
    /// The five countries and referring hosts with the most clicks in the window.
    pub top_countries: &'a Map<String, Value>,
    pub top_referrers: &'a Map<String, Value>,
}

#[derive(Serialize)]
pub struct SpikeRulePayload {
    pub id: i64,
    pub factor: f64,
    pub window_minutes: i64,
    pub baseline_minutes: i64,
    pub min_clicks: i64,
    pub per_country: bool,
}

/// link.clicks.digest: one link's clicks in one window, for a subscription
/// that asked for a digest instead of one event per click.
#[derive(Serialize)]
pub struct DigestData<'a> {
    pub link: &'a LinkPayload,
    pub window: DigestWindow,
    pub clicks: i64,
    /// Counts by two-letter country code ("unknown" when none was given).
    pub countries: &'a Map<String, Value>,
    pub devices: &'a Map<String, Value>,
    /// Counts by referring host ("(direct)" without a referer).
    pub referrers: &'a Map<String, Value>,
    /// Counts by source: "link" and "qr".
    pub sources: &'a Map<String, Value>,
    /// The clicks' ids (`clicks.id`), lowest and highest.
    pub click_ids: ClickIdRange,
}

#[derive(Serialize)]
pub struct DigestWindow {
    pub start: String,
    pub end: String,
}

#[derive(Serialize)]
pub struct ClickIdRange {
    pub first: i64,
    pub last: i64,
}

/// link.miss: requests for a slug that found no active link, aggregated.
#[derive(Serialize)]
pub struct LinkMissData<'a> {
    /// The link, when the slug names one that is expired, at its limit or disabled.
    pub link: Option<&'a LinkPayload>,
    pub miss: MissPayload<'a>,
}

#[derive(Serialize)]
pub struct MissPayload<'a> {
    pub domain: &'a str,
    pub slug: &'a str,
    /// "unknown", "expired", "limit" or "disabled".
    pub reason: &'a str,
    /// Misses of this slug for this reason so far.
    pub count: i64,
    pub first_seen: String,
    pub last_seen: String,
}

/// link.broken and link.recovered: a destination health check's finding.
#[derive(Serialize)]
pub struct LinkHealthData<'a> {
    pub link: &'a LinkPayload,
    pub check: CheckPayload<'a>,
}

#[derive(Serialize)]
pub struct CheckPayload<'a> {
    /// The URL checked: the link's destination with its UTM parameters.
    pub url: &'a str,
    /// The answer's status; null when none came (DNS, connection, TLS, timeout).
    pub http_status: Option<u16>,
    /// Why it failed ("HTTP 503", a DNS or connection error, "timeout: …"); null once healthy.
    pub reason: Option<&'a str>,
    /// Failed checks in a row (link.broken).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failures: Option<i32>,
    /// Since when it was broken (link.recovered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broken_since: Option<String>,
    pub checked_at: String,
}

#[derive(Serialize)]
pub struct TestData {
    pub subscription_id: i64,
    pub message: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn link() -> LinkPayload {
        LinkPayload {
            id: 42,
            domain: String::new(),
            slug: "sale".into(),
            short_url: LinkPayload::short_url("", "sale", "https://go.acme.co/"),
            destination: "https://acme.com/winter-sale".into(),
            campaign: Some("winter-sale-2026".into()),
            tags: vec!["social".into()],
        }
    }

    fn click() -> Click {
        Click {
            event_id: "0f8fad5b-d9cb-469f-a165-70867728950e".into(),
            clicked_at_micros: 1_770_301_425_123_456,
            ip: Some("203.0.113.42".parse().unwrap()),
            user_agent: Some("x".repeat(2000)),
            referer: Some("https://instagram.com".into()),
            country: Some("US".into()),
            city: Some("San Francisco".into()),
            device: Some("mobile".into()),
            browser: Some("Safari".into()),
            os: Some("iOS".into()),
            is_bot: false,
            source: "link".into(),
        }
    }

    #[test]
    fn timestamps() {
        assert_eq!(format_timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_timestamp(1_770_301_425_123_456),
            "2026-02-05T14:23:45.123Z"
        );
        assert_eq!(
            format_timestamp(951_782_400_000_000),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(format_timestamp(-1000), "1969-12-31T23:59:59.999Z");
        // Postgres allows years past 9999; they are written in full, not cut to four digits.
        assert_eq!(
            format_timestamp(253_402_300_800_000_000),
            "10000-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn click_body_matches_the_contract() {
        let utm = json!({"source": "instagram"}).as_object().unwrap().clone();
        let body = click_body(
            EventType::LinkClicked,
            &link(),
            &click(),
            &utm,
            IpMode::Anonymized,
        );
        assert!(body.starts_with(r#"{"id":"0f8fad5b-d9cb-469f-a165-70867728950e","type":"link.clicked","timestamp":"2026-02-05T14:23:45.123Z","data":{"link":"#));
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["data"]["link"]["short_url"], "https://go.acme.co/sale");
        assert_eq!(v["data"]["link"]["tags"], json!(["social"]));
        assert_eq!(v["data"]["click"]["ip_address"], "203.0.113.0");
        assert_eq!(
            v["data"]["click"]["user_agent"].as_str().unwrap().len(),
            MAX_HEADER_LEN
        );
        assert_eq!(v["data"]["click"]["bot"], false);
        assert_eq!(v["data"]["utm"]["source"], "instagram");
    }

    #[test]
    fn ip_modes() {
        let v4: IpAddr = "203.0.113.42".parse().unwrap();
        let v6: IpAddr = "2001:db8:abcd:12:1:2:3:4".parse().unwrap();
        assert_eq!(IpMode::Full.apply(Some(v4)).unwrap(), "203.0.113.42");
        assert_eq!(IpMode::Anonymized.apply(Some(v4)).unwrap(), "203.0.113.0");
        assert_eq!(
            IpMode::Anonymized.apply(Some(v6)).unwrap(),
            "2001:db8:abcd::"
        );
        assert_eq!(IpMode::Omit.apply(Some(v4)), None);
        assert_eq!(IpMode::parse("bogus"), None);
    }

    #[test]
    fn event_type_names_round_trip() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
        assert_eq!(EventType::parse("link.clicked.typo"), None);
        // Every type has its own bit in a u32 mask.
        let mask = EventType::ALL.into_iter().fold(0u32, |m, t| {
            assert_eq!(m & t.bit(), 0, "{}", t.as_str());
            m | t.bit()
        });
        assert_eq!(mask.count_ones() as usize, EventType::ALL.len());
    }

    #[test]
    fn amounts_are_exact_numbers() {
        let raw = ConversionPayload::amount_from_numeric("49.90").unwrap();
        assert_eq!(raw.get(), "49.90");
        assert!(ConversionPayload::amount_from_numeric("NaN").is_none());
    }

    #[test]
    fn short_urls() {
        assert_eq!(
            LinkPayload::short_url("go.acme.co", "x", "https://ignored"),
            Some("https://go.acme.co/x".into())
        );
        assert_eq!(LinkPayload::short_url("", "x", ""), None);
    }
}
