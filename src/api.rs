//! SQL functions: the redirect path (resolve, record_click), operator tools
//! (send_test, replay, rotate_secret) and Standard Webhooks helpers.

use pgrx::datum::Interval;
use pgrx::prelude::*;

use crate::error::{Error, OrReport, Result};
use crate::events::{self, Queued, unix_now, unix_now_micros};
use crate::linkstore::{self, Claim, LinkRow};
use crate::payload::{self, EventType, TestData};
use crate::plans::{self, INT8, TEXT};
use crate::signing::{self, KeyRing, SigningKey, signature_header};

/// The URL to redirect to, or NULL: the destination (with UTM) for an active
/// link, `expired_url` (or NULL) for an expired or disabled one.
/// SECURITY DEFINER so the redirect service needs EXECUTE only, not SELECT on links.
#[pg_extern(stable, parallel_safe, security_definer)]
fn resolve(slug: &str, domain: default!(&str, "''")) -> Option<String> {
    LinkRow::by_slug(domain, slug).or_report()?.answer()
}

/// Same answer as `resolve`, and records the click when the link is active.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe, security_definer)]
fn record_click(
    slug: &str,
    ip: default!(Option<pgrx::Inet>, "NULL"),
    user_agent: default!(Option<&str>, "NULL"),
    referer: default!(Option<&str>, "NULL"),
    country: default!(Option<&str>, "NULL"),
    city: default!(Option<&str>, "NULL"),
    source: default!(&str, "'link'"),
    landing_url: default!(Option<&str>, "NULL"),
    domain: default!(&str, "''"),
) -> Option<String> {
    let link = LinkRow::by_slug(domain, slug).or_report()?;
    if !link.is_active() {
        return link.answer();
    }
    let answer = link.answer();
    let reached_limit = match link.max_clicks {
        None => false,
        Some(_) => match linkstore::claim_click(link.id).or_report() {
            Claim::Taken { reached_limit } => reached_limit,
            Claim::Full => return link.expired_url.clone(),
        },
    };
    let link_id = link.id;
    let _stash = linkstore::stash_preclaimed(link, reached_limit);
    Spi::connect_mut(|client| {
        plans::execute(
            client,
            "INSERT INTO linkhooks.clicks (link_id, ip, user_agent, referer, country, city, source, landing_url)
             VALUES ($1, $2::inet, $3, $4, $5, $6, $7, $8)",
            &[INT8, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT],
            &[
                link_id.into(),
                ip.map(|i| i.0).into(),
                user_agent.into(),
                referer.into(),
                country.into(),
                city.into(),
                source.into(),
                landing_url.into(),
            ],
        )
        .map(|_| ())
    })
    .or_report();
    answer
}

/// Signing keys of one subscription (current, plus previous during its grace).
fn subscription_keys(subscription_id: i64) -> Result<(Vec<SigningKey>, bool)> {
    Spi::connect(|client| {
        let rows = plans::query(
            client,
            "SELECT secret, previous_secret, extract(epoch FROM previous_secret_expires_at)::bigint, enabled
               FROM linkhooks.subscriptions WHERE id = $1",
            &[INT8],
            &[subscription_id.into()],
        )?;
        let row = rows.into_iter().next().ok_or_else(|| {
            Error::NotFound(format!(
                "invalid subscription_id: subscription {subscription_id} does not exist"
            ))
        })?;
        let secret: String = row.get(1)?.unwrap_or_default();
        let previous: Option<String> = row.get(2)?;
        let keys = KeyRing::new(&secret, previous.as_deref(), row.get(3)?)?;
        Ok((
            keys.keys_at(unix_now()).cloned().collect(),
            row.get::<bool>(4)?.unwrap_or(false),
        ))
    })
}

/// Queues one already-built body for one subscription, signed now. Returns the new delivery id.
fn queue_for(subscription_id: i64, kind: EventType, event_id: &str, body: String) -> Result<i64> {
    let (keys, _) = subscription_keys(subscription_id)?;
    let now = unix_now();
    let signature = signature_header(&keys, event_id, now, &body);
    let ids = events::insert_deliveries(
        kind,
        event_id,
        now,
        &[Queued {
            subscription_id,
            body: body.into(),
            signature,
        }],
    )?;
    ids.first()
        .copied()
        .ok_or_else(|| Error::NotFound("the delivery was not queued".into()))
}

/// A time-ordered UUID (version 7), the default of clicks' and conversions'
/// event ids; PostgreSQL 18 has the same as `uuidv7()`.
#[pg_extern(volatile, parallel_safe)]
fn uuidv7() -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*events::new_event_id().as_bytes())
}

/// Queues a `webhook.test` event for one subscription; returns its event id.
#[pg_extern(volatile, security_definer)]
fn send_test(subscription_id: i64) -> pgrx::Uuid {
    let run = || -> Result<pgrx::Uuid> {
        let (_, enabled) = subscription_keys(subscription_id)?;
        if !enabled {
            return Err(Error::invalid(
                "subscription_id",
                format!("subscription {subscription_id} is disabled; enable it first"),
            ));
        }
        let id = events::new_event_id();
        let data = TestData {
            subscription_id,
            message: "This is a test event from pg_linkhooks.",
        };
        let body = payload::envelope(
            &id.to_string(),
            EventType::WebhookTest,
            unix_now_micros(),
            data,
        );
        queue_for(
            subscription_id,
            EventType::WebhookTest,
            &id.to_string(),
            body,
        )?;
        Ok(pgrx::Uuid::from_bytes(*id.as_bytes()))
    };
    run().or_report()
}

/// Queues a fresh delivery of a dead or delivered event (same webhook-id and body).
#[pg_extern(volatile, security_definer)]
fn replay(delivery_id: i64) -> i64 {
    replay_one(delivery_id).or_report()
}

fn replay_one(delivery_id: i64) -> Result<i64> {
    let (event_id, subscription_id, event_type, body, status) = Spi::connect(|client| {
        let rows = plans::query(
            client,
            "SELECT event_id::text, subscription_id, event_type, body, status FROM linkhooks.deliveries WHERE id = $1",
            &[INT8],
            &[delivery_id.into()],
        )?;
        let row = rows.into_iter().next().ok_or_else(|| {
            Error::NotFound(format!(
                "invalid delivery_id: delivery {delivery_id} does not exist"
            ))
        })?;
        Ok::<_, Error>((
            row.get::<String>(1)?.unwrap_or_default(),
            row.get::<i64>(2)?.unwrap_or_default(),
            row.get::<String>(3)?.unwrap_or_default(),
            row.get::<String>(4)?.unwrap_or_default(),
            row.get::<String>(5)?.unwrap_or_default(),
        ))
    })?;
    if status != "dead" && status != "delivered" {
        return Err(Error::invalid(
            "delivery_id",
            format!(
                "delivery {delivery_id} is {status}; only dead or delivered deliveries can be replayed"
            ),
        ));
    }
    let kind = EventType::parse(&event_type).unwrap_or(EventType::WebhookTest);
    let new_id = queue_for(subscription_id, kind, &event_id, body)?;
    Spi::run_with_args(
        "UPDATE linkhooks.dead_letters SET replayed_at = now(), replay_delivery_id = $2 WHERE delivery_id = $1",
        &[delivery_id.into(), new_id.into()],
    )?;
    Ok(new_id)
}

/// Replays every dead letter not replayed yet (optionally of one subscription, since a time).
#[pg_extern(volatile, security_definer)]
fn replay_dead_letters(
    subscription_id: default!(Option<i64>, "NULL"),
    since: default!(Option<pgrx::datum::TimestampWithTimeZone>, "NULL"),
) -> i64 {
    let run = || -> Result<i64> {
        let ids: Vec<i64> = Spi::connect(|client| {
            let rows = client.select(
                "SELECT delivery_id FROM linkhooks.dead_letters
                  WHERE replayed_at IS NULL
                    AND ($1::bigint IS NULL OR subscription_id = $1)
                    AND ($2::timestamptz IS NULL OR died_at >= $2)
                  ORDER BY delivery_id",
                None,
                &[subscription_id.into(), since.into()],
            )?;
            rows.into_iter()
                .map(|r| Ok(r.get::<i64>(1)?.unwrap_or_default()))
                .collect::<Result<Vec<_>>>()
        })?;
        for id in &ids {
            replay_one(*id)?;
        }
        Ok(ids.len() as i64)
    };
    run().or_report()
}

/// A new secret for a subscription; the old one keeps signing alongside it for `grace`.
#[pg_extern(volatile, security_definer)]
fn rotate_secret(subscription_id: i64, grace: default!(Interval, "'24 hours'")) -> String {
    let secret = signing::generate_secret();
    let updated = Spi::get_one_with_args::<i64>(
        "UPDATE linkhooks.subscriptions
            SET previous_secret = secret, previous_secret_expires_at = now() + $2, secret = $3
          WHERE id = $1 RETURNING id",
        &[subscription_id.into(), grace.into(), secret.as_str().into()],
    )
    .map_err(Error::from)
    .or_report();
    if updated.is_none() {
        Error::NotFound(format!(
            "invalid subscription_id: subscription {subscription_id} does not exist"
        ))
        .report();
    }
    secret
}

/// A fresh `whsec_` secret (32 random bytes, base64).
#[pg_extern(volatile, parallel_safe)]
fn generate_secret() -> String {
    signing::generate_secret()
}

/// The Standard Webhooks `webhook-signature` value for a message.
#[pg_extern(immutable, parallel_safe)]
fn sign(secret: &str, msg_id: &str, ts: i64, body: &str) -> String {
    SigningKey::parse(secret)
        .map_err(Error::from)
        .or_report()
        .sign(msg_id, ts, body)
}

/// Checks a `webhook-signature` header value (any of its entries) against a secret.
#[pg_extern(immutable, parallel_safe)]
fn verify(secret: &str, msg_id: &str, ts: i64, body: &str, signature: &str) -> bool {
    let key = SigningKey::parse(secret).map_err(Error::from).or_report();
    signing::verify(&key, msg_id, ts, body, signature)
}

// worker_status() lives in worker/status.rs, beside the worker it describes.

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn resolve_and_record_click() {
        Spi::run("INSERT INTO linkhooks.links (slug, destination, utm) VALUES ('t', 'https://acme.com/p', '{\"source\":\"x\"}')")
            .unwrap();
        let url = Spi::get_one::<String>(
            "SELECT linkhooks.record_click('t', user_agent => 'Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0')",
        );
        assert_eq!(url, Ok(Some("https://acme.com/p?utm_source=x".to_string())));
        let device = Spi::get_one::<String>("SELECT device FROM linkhooks.clicks");
        assert_eq!(device, Ok(Some("desktop".to_string())));
        assert_eq!(
            Spi::get_one::<String>("SELECT linkhooks.resolve('missing')"),
            Ok(None)
        );
    }

    #[pg_test(error = "invalid slug: may contain only A-Z, a-z, 0-9, '-' and '_'")]
    fn bad_slug_is_refused() {
        Spi::run(
            "INSERT INTO linkhooks.links (slug, destination) VALUES ('a b', 'https://acme.com/')",
        )
        .unwrap();
    }

    #[pg_test(error = "invalid max_clicks: must be greater than 0 (got 0)")]
    fn zero_max_clicks_is_refused() {
        Spi::run("INSERT INTO linkhooks.links (slug, destination, max_clicks) VALUES ('z', 'https://acme.com/', 0)").unwrap();
    }

    #[pg_test]
    fn sign_matches_the_specification_vector() {
        let sig = Spi::get_one::<String>(
            "SELECT linkhooks.sign('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', 'msg_p5jXN8AQM9LWM0D4loKWxJek', 1614265330, '{\"test\": 2432232314}')",
        );
        assert_eq!(
            sig,
            Ok(Some(
                "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".to_string()
            ))
        );
    }
}
