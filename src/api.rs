//! SQL functions: the redirect path (resolve, record_click) and Standard
//! Webhooks helpers. What operators call is in `operator`.

use pgrx::prelude::*;

use crate::error::{Error, OrReport, Result};
use crate::events;
use crate::idempotency;
use crate::links::MissReason;
use crate::linkstore::{self, LinkRow};
use crate::misses;
use crate::plans::{self, INT8, TEXT, UUID};
use crate::signing::{self, SigningKey};
use crate::triggers;

/// The URL to redirect to, or NULL: the destination (with UTM) for an active
/// link, `expired_url` (or NULL) for an expired or disabled one.
/// Runs as the caller and runs no SQL: links are read from their index
/// directly, so the redirect service needs EXECUTE only, not SELECT on links,
/// and no search_path is set and restored around each call (about 8k
/// instructions, a tenth of a cold resolve).
#[pg_extern(stable, parallel_safe)]
fn resolve(slug: &str, domain: default!(&str, "''")) -> Option<String> {
    LinkRow::by_slug(domain, slug).or_report()?.answer()
}

/// Same answer as `resolve`, and records the click when the link is active.
/// Runs as the caller: its one statement is the plain INSERT a writer may run
/// (names qualified), and the click trigger does the privileged part as the
/// owner, so search_path is pinned once per click, not twice. A retry with the
/// same `idempotency_key` returns the first call's answer and records nothing.
#[allow(clippy::too_many_arguments)]
#[pg_extern(name = "record_click", volatile, parallel_unsafe)]
fn record_click_keyed(
    slug: Option<&str>,
    ip: default!(Option<pgrx::Inet>, "NULL"),
    user_agent: default!(Option<&str>, "NULL"),
    referer: default!(Option<&str>, "NULL"),
    country: default!(Option<&str>, "NULL"),
    city: default!(Option<&str>, "NULL"),
    source: default!(Option<&str>, "'link'"),
    landing_url: default!(Option<&str>, "NULL"),
    domain: default!(Option<&str>, "''"),
    idempotency_key: default!(Option<&str>, "NULL"),
) -> Option<String> {
    let request = ClickRequest {
        ip,
        user_agent,
        referer,
        country,
        city,
        source,
        landing_url,
        idempotency_key,
    };
    record(slug, domain, &request, false).or_report().url
}

/// `record_click` as schemas before 0.5.0 declare it (no idempotency_key; the
/// C symbol `record_click_wrapper`): a newer library serves them until
/// ALTER EXTENSION … UPDATE. No SQL of its own.
#[allow(clippy::too_many_arguments)]
#[pg_extern(sql = false)]
fn record_click(
    slug: Option<&str>,
    ip: Option<pgrx::Inet>,
    user_agent: Option<&str>,
    referer: Option<&str>,
    country: Option<&str>,
    city: Option<&str>,
    source: Option<&str>,
    landing_url: Option<&str>,
    domain: Option<&str>,
) -> Option<String> {
    record_click_keyed(
        slug,
        ip,
        user_agent,
        referer,
        country,
        city,
        source,
        landing_url,
        domain,
        None,
    )
}

/// `record_click` for callers that need the click's ids too (to attribute a
/// later conversion): the URL, and the click's id and event id when one was
/// recorded (NULL when the link is unknown, inactive or at its limit).
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
fn record_click_returning(
    slug: Option<&str>,
    ip: default!(Option<pgrx::Inet>, "NULL"),
    user_agent: default!(Option<&str>, "NULL"),
    referer: default!(Option<&str>, "NULL"),
    country: default!(Option<&str>, "NULL"),
    city: default!(Option<&str>, "NULL"),
    source: default!(Option<&str>, "'link'"),
    landing_url: default!(Option<&str>, "NULL"),
    domain: default!(Option<&str>, "''"),
    idempotency_key: default!(Option<&str>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(url, Option<String>),
        name!(click_id, Option<i64>),
        name!(event_id, Option<pgrx::Uuid>),
    ),
> {
    let request = ClickRequest {
        ip,
        user_agent,
        referer,
        country,
        city,
        source,
        landing_url,
        idempotency_key,
    };
    let recorded = record(slug, domain, &request, true).or_report();
    TableIterator::once((recorded.url, recorded.click_id, recorded.event_id))
}

/// What a redirect service knows about one request.
struct ClickRequest<'a> {
    ip: Option<pgrx::Inet>,
    user_agent: Option<&'a str>,
    referer: Option<&'a str>,
    country: Option<&'a str>,
    city: Option<&'a str>,
    source: Option<&'a str>,
    landing_url: Option<&'a str>,
    /// A retry with the same key returns the first call's click instead of recording another.
    idempotency_key: Option<&'a str>,
}

/// The answer to one redirect, and the click it recorded, if any.
#[derive(Default)]
struct Recorded {
    url: Option<String>,
    click_id: Option<i64>,
    event_id: Option<pgrx::Uuid>,
}

/// Records one click for a redirect; `want_ids` returns its id and event id
/// too (a RETURNING clause plain `record_click` does not pay for).
fn record(
    slug: Option<&str>,
    domain: Option<&str>,
    request: &ClickRequest<'_>,
    want_ids: bool,
) -> Result<Recorded> {
    let slug = slug.ok_or_else(|| Error::invalid("slug", "must not be null"))?;
    let domain = domain
        .ok_or_else(|| Error::invalid("domain", "must not be null ('' is the default domain)"))?;
    let source = request
        .source
        .ok_or_else(|| Error::invalid("source", "must not be null"))?;
    let link = LinkRow::by_slug(domain, slug)?;
    let current_schema = linkstore::relations()?.since_0_5;
    if let Some(key) = request.idempotency_key {
        if !current_schema {
            return Err(Error::invalid(
                "idempotency_key",
                "needs the 0.5.0 schema: run ALTER EXTENSION pg_linkhooks UPDATE",
            ));
        }
        idempotency::lock("idempotency_key", key)?;
        if let Some((key_link, click_id, event_id)) = click_with_key(key)? {
            if let Some(other) = link.as_ref().filter(|l| l.id != key_link) {
                return Err(Error::invalid(
                    "idempotency_key",
                    format!(
                        "was used for a click on link {key_link}, not on this link ({}); a retry must name the same link",
                        other.id
                    ),
                ));
            }
            // The first call recorded this click, so it redirected to the destination.
            return Ok(Recorded {
                url: link.map(|l| l.target()),
                click_id,
                event_id,
            });
        }
    }
    let check_request =
        || triggers::check_request(source, request.country, request.city, request.landing_url);
    let Some(link) = link else {
        check_request()?;
        note_miss(current_schema, domain, slug, MissReason::Unknown)?;
        return Ok(Recorded::default());
    };
    let answer = link.answer();
    if let Some(reason) = link.inactive_reason() {
        check_request()?;
        note_miss(current_schema, domain, slug, reason)?;
        return Ok(Recorded {
            url: answer,
            ..Recorded::default()
        });
    }
    let expired_url = link.expired_url.clone();
    let link_id = link.id;
    // The click trigger takes the link from here and enforces max_clicks; the
    // insert runs as the caller, whose writer level allows it.
    let _stash = linkstore::stash_for_click(link);
    // A key needs the click's ids too, to keep them with it.
    let need_ids = want_ids || request.idempotency_key.is_some();
    let inserted = Spi::connect_mut(|client| -> Result<_> {
        let rows = plans::execute(
            client,
            if need_ids {
                INSERT_CLICK_RETURNING
            } else {
                INSERT_CLICK
            },
            &[INT8, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT],
            &[
                link_id.into(),
                request.ip.as_ref().map(|i| i.0.as_str()).into(),
                request.user_agent.into(),
                request.referer.into(),
                request.country.into(),
                request.city.into(),
                source.into(),
                request.landing_url.into(),
            ],
        )?;
        if rows.is_empty() {
            return Ok(None); // the trigger skipped it: the link is at its max_clicks
        }
        match rows.into_iter().next() {
            Some(row) if need_ids => Ok(Some((row.get::<i64>(1)?, row.get::<pgrx::Uuid>(2)?))),
            _ => Ok(Some((None, None))),
        }
    })?;
    if let (Some(key), Some((Some(click_id), Some(event_id)))) =
        (request.idempotency_key, &inserted)
    {
        keep_key(key, link_id, *click_id, *event_id)?;
    }
    Ok(match inserted {
        Some((click_id, event_id)) => Recorded {
            url: answer,
            click_id,
            event_id,
        },
        None => {
            check_request()?;
            note_miss(current_schema, domain, slug, MissReason::Limit)?;
            Recorded {
                url: expired_url,
                ..Recorded::default()
            }
        }
    })
}

const INSERT_CLICK: &str =
    "INSERT INTO linkhooks.clicks (link_id, ip, user_agent, referer, country, city, source, landing_url)
     VALUES ($1, $2::pg_catalog.inet, $3, $4, $5, $6, $7, $8)";
const INSERT_CLICK_RETURNING: &str =
    "INSERT INTO linkhooks.clicks (link_id, ip, user_agent, referer, country, city, source, landing_url)
     VALUES ($1, $2::pg_catalog.inet, $3, $4, $5, $6, $7, $8) RETURNING id, event_id";

/// The click an earlier call recorded with this idempotency key, if any: its
/// link, id and event id.
fn click_with_key(key: &str) -> Result<Option<(i64, Option<i64>, Option<pgrx::Uuid>)>> {
    Spi::connect_mut(|client| {
        // Mutating, for a snapshot taken after the key's lock: it sees the first call's commit.
        let rows = plans::execute(
            client,
            "SELECT link_id, click_id, event_id FROM linkhooks.click_keys WHERE key = $1",
            &[TEXT],
            &[key.into()],
        )?;
        match rows.into_iter().next() {
            Some(row) => Ok(Some((
                row.get::<i64>(1)?.unwrap_or_default(),
                row.get::<i64>(2)?,
                row.get::<pgrx::Uuid>(3)?,
            ))),
            None => Ok(None),
        }
    })
}

/// Keeps the click an idempotency key recorded, for the caller's retries.
fn keep_key(key: &str, link_id: i64, click_id: i64, event_id: pgrx::Uuid) -> Result<()> {
    Spi::connect_mut(|client| -> Result<()> {
        plans::execute(
            client,
            "INSERT INTO linkhooks.click_keys (key, link_id, click_id, event_id) VALUES ($1, $2, $3, $4)",
            &[TEXT, INT8, INT8, UUID],
            &[key.into(), link_id.into(), click_id.into(), event_id.into()],
        )?;
        Ok(())
    })
}

/// Counts a request that found no active link (`link_misses`), when the
/// installed schema has that table (0.5.0 on).
fn note_miss(current_schema: bool, domain: &str, slug: &str, reason: MissReason) -> Result<()> {
    if current_schema {
        misses::record_as_caller(domain, slug, reason)?;
    }
    Ok(())
}

/// A time-ordered UUID (version 7), the default of clicks' and conversions'
/// event ids; PostgreSQL 18 has the same as `uuidv7()`.
#[pg_extern(volatile, parallel_safe)]
fn uuidv7() -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*events::new_event_id().as_bytes())
}

/// The latency bucket of a delivery taking `ms` milliseconds, as
/// `subscription_latencies` counts it (src/latency.rs).
#[pg_extern(immutable, strict, parallel_safe)]
pub(crate) fn latency_bucket(ms: f64) -> i16 {
    crate::latency::bucket(ms)
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
