//! What operators and on-call engineers call: a test event, replays of dead
//! or delivered events, retries now, and secret rotation. Each runs as the
//! extension's owner (SECURITY DEFINER, search_path pinned), for roles given
//! `admin`.

use pgrx::datum::Interval;
use pgrx::prelude::*;

use crate::error::{Error, OrReport, Result};
use crate::events::{self, Queued, unix_now, unix_now_micros};
use crate::payload::{self, EventType, TestData};
use crate::plans::{self, INT8, INTERVAL, TEXT};
use crate::shared;
use crate::signing::{self, KeyRing, SigningKey, signature_header};

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

/// Queues a `webhook.test` event for one subscription; returns its event id.
#[pg_extern(volatile, security_definer)]
fn send_test(subscription_id: Option<i64>) -> pgrx::Uuid {
    let run = || -> Result<pgrx::Uuid> {
        let subscription_id = required("subscription_id", subscription_id)?;
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
fn replay(delivery_id: Option<i64>) -> i64 {
    required("delivery_id", delivery_id)
        .and_then(replay_one)
        .or_report()
}

/// An argument that must not be NULL (the functions that take it are not
/// STRICT, so that a NULL is an error naming it rather than a silent NULL).
fn required<T>(name: &'static str, value: Option<T>) -> Result<T> {
    value.ok_or_else(|| Error::invalid(name, "must not be null"))
}

fn replay_one(delivery_id: i64) -> Result<i64> {
    let (event_id, subscription_id, event_type, body, status, subscribed) =
        Spi::connect(|client| {
            let rows = plans::query(
                client,
                "SELECT d.event_id::text, d.subscription_id, d.event_type, d.body, d.status,
                    EXISTS (SELECT FROM linkhooks.subscriptions s WHERE s.id = d.subscription_id)
               FROM linkhooks.deliveries d WHERE d.id = $1",
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
                row.get::<bool>(6)?.unwrap_or_default(),
            ))
        })?;
    if !subscribed {
        return Err(Error::invalid(
            "delivery_id",
            format!(
                "delivery {delivery_id} cannot be replayed: its subscription {subscription_id} was deleted"
            ),
        ));
    }
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
                // Not those of deleted subscriptions: nothing can receive them.
                "SELECT l.delivery_id FROM linkhooks.dead_letters l
                  WHERE l.replayed_at IS NULL
                    AND ($1::bigint IS NULL OR l.subscription_id = $1)
                    AND ($2::timestamptz IS NULL OR l.died_at >= $2)
                    AND EXISTS (SELECT FROM linkhooks.subscriptions s WHERE s.id = l.subscription_id)
                  ORDER BY l.delivery_id",
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

/// Makes pending deliveries due now: one delivery, or every pending delivery
/// of a subscription (after fixing an endpoint, instead of waiting out the
/// backoff). Returns how many were pending.
#[pg_extern(volatile, security_definer)]
fn retry_now(
    delivery_id: default!(Option<i64>, "NULL"),
    subscription_id: default!(Option<i64>, "NULL"),
) -> i64 {
    let run = || -> Result<i64> {
        if delivery_id.is_some() == subscription_id.is_some() {
            return Err(Error::invalid(
                "delivery_id",
                "give exactly one of delivery_id and subscription_id",
            ));
        }
        let due = crate::queue::due_at();
        let pending = Spi::connect_mut(|client| -> Result<i64> {
            Ok(client
                .update(
                    "UPDATE linkhooks.deliveries
                        SET next_attempt_at = LEAST(next_attempt_at, $3)
                      WHERE status = 'pending'
                        AND (id = $1 OR subscription_id = $2)",
                    None,
                    &[delivery_id.into(), subscription_id.into(), due.into()],
                )?
                .len() as i64)
        })?;
        if let (Some(id), 0) = (delivery_id, pending) {
            let status = Spi::connect(|client| {
                plans::first::<String>(plans::query(
                    client,
                    "SELECT status FROM linkhooks.deliveries WHERE id = $1",
                    &[INT8],
                    &[id.into()],
                )?)
            })?;
            return Err(match status {
                None => {
                    Error::NotFound(format!("invalid delivery_id: delivery {id} does not exist"))
                }
                Some(status) => Error::invalid(
                    "delivery_id",
                    format!(
                        "delivery {id} is {status}; only pending deliveries can be retried (replay dead or delivered ones)"
                    ),
                ),
            });
        }
        if pending > 0 {
            shared::wake_on_commit();
        }
        Ok(pending)
    };
    run().or_report()
}

/// A new secret for a subscription; the old one keeps signing alongside it for `grace`.
#[pg_extern(volatile, security_definer)]
fn rotate_secret(
    subscription_id: Option<i64>,
    grace: default!(Option<Interval>, "'24 hours'"),
) -> String {
    let (subscription_id, grace) = required("subscription_id", subscription_id)
        .and_then(|id| Ok((id, required("grace", grace)?)))
        .or_report();
    let negative = Spi::get_one_with_args::<bool>("SELECT $1 < interval '0'", &[grace.into()])
        .map_err(Error::from)
        .or_report();
    if negative == Some(true) {
        Error::invalid(
            "grace",
            "must not be negative (0 ends the old secret at once)",
        )
        .report();
    }
    let secret = signing::generate_secret();
    let updated = Spi::connect_mut(|client| {
        plans::first::<i64>(plans::execute(
            client,
            "UPDATE linkhooks.subscriptions
                SET previous_secret = secret, previous_secret_expires_at = now() + $2, secret = $3
              WHERE id = $1 RETURNING id",
            &[INT8, INTERVAL, TEXT],
            &[subscription_id.into(), grace.into(), secret.as_str().into()],
        )?)
    })
    .or_report();
    if updated.is_none() {
        Error::NotFound(format!(
            "invalid subscription_id: subscription {subscription_id} does not exist"
        ))
        .report();
    }
    secret
}
