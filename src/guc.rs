//! The `linkhooks.*` settings. Worker settings are reloaded on SIGHUP; the
//! ones triggers read (base_url, require_https, ...) apply per session too.

use std::ffi::CString;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static BASE_URL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static HTTP_CONCURRENCY: GucSetting<i32> = GucSetting::<i32>::new(32);
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(500);
pub static RETRY_SCHEDULE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"1m,5m,30m,2h,24h"));
pub static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static DEFAULT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5000);
pub static REQUIRE_HTTPS: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static ALLOW_PRIVATE_TARGETS: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static RETENTION: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"7d"));
pub static NOTIFY_CHANNEL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static DISABLE_AFTER_DEAD_LETTERS: GucSetting<i32> = GucSetting::<i32>::new(20);
pub static MAX_BODY_BYTES: GucSetting<i32> =
    GucSetting::<i32>::new(crate::limits::DEFAULT_MAX_BODY_BYTES);
pub static LINK_CACHE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static MAINTENANCE_INTERVAL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"30s"));

pub fn register() {
    use GucContext::{Sighup, Suset};
    let none = GucFlags::default();
    let s = |name, short, setting, ctx| {
        GucRegistry::define_string_guc(name, short, c"", setting, ctx, none)
    };
    s(
        c"linkhooks.database",
        c"Database the delivery worker serves.",
        &DATABASE,
        Sighup,
    );
    s(
        c"linkhooks.base_url",
        c"Base of short_url in payloads for links on the default domain, e.g. https://go.acme.co.",
        &BASE_URL,
        Suset,
    );
    s(
        c"linkhooks.retry_schedule",
        c"Delays before each retry, e.g. '1m,5m,30m,2h,24h' (units ms, s, m, h, d).",
        &RETRY_SCHEDULE,
        Sighup,
    );
    s(
        c"linkhooks.retention",
        c"How long delivered deliveries and attempts are kept (e.g. 7d).",
        &RETENTION,
        Sighup,
    );
    s(
        c"linkhooks.notify_channel",
        c"If set, committed events are also announced with NOTIFY on this channel.",
        &NOTIFY_CHANNEL,
        Suset,
    );
    s(
        c"linkhooks.maintenance_interval",
        c"How often the worker runs linkhooks.run_maintenance() (e.g. 30s).",
        &MAINTENANCE_INTERVAL,
        Sighup,
    );

    let i = |name, short, setting, min, max, ctx| {
        GucRegistry::define_int_guc(name, short, c"", setting, min, max, ctx, none)
    };
    i(
        c"linkhooks.http_concurrency",
        c"HTTP requests the worker keeps in flight.",
        &HTTP_CONCURRENCY,
        1,
        1024,
        Sighup,
    );
    i(
        c"linkhooks.batch_size",
        c"Most deliveries the worker claims in one transaction.",
        &BATCH_SIZE,
        1,
        100_000,
        Sighup,
    );
    i(
        c"linkhooks.max_attempts",
        c"Attempts before a dead letter; 0 means one more than the retry schedule has steps.",
        &MAX_ATTEMPTS,
        0,
        1000,
        Sighup,
    );
    i(
        c"linkhooks.default_timeout_ms",
        c"HTTP timeout for subscriptions whose timeout_ms is NULL.",
        &DEFAULT_TIMEOUT_MS,
        100,
        300_000,
        Sighup,
    );
    i(
        c"linkhooks.disable_after_dead_letters",
        c"Disable a subscription after this many dead letters in a row (0 = never).",
        &DISABLE_AFTER_DEAD_LETTERS,
        0,
        1_000_000,
        Sighup,
    );

    i(
        c"linkhooks.max_body_bytes",
        c"Largest event body queued; a write whose event would be larger is refused.",
        &MAX_BODY_BYTES,
        1024,
        16 * 1024 * 1024,
        GucContext::Suset,
    );

    i(
        c"linkhooks.link_cache_size",
        c"Links each session keeps in memory for resolve and clicks (0 = no cache).",
        &LINK_CACHE_SIZE,
        0,
        10_000_000,
        GucContext::Userset,
    );

    GucRegistry::define_bool_guc(
        c"linkhooks.require_https",
        c"Subscription URLs must use https.",
        c"",
        &REQUIRE_HTTPS,
        Suset,
        none,
    );
    GucRegistry::define_bool_guc(
        c"linkhooks.allow_private_targets",
        c"Allow webhooks to private, loopback and link-local addresses.",
        c"",
        &ALLOW_PRIVATE_TARGETS,
        Suset,
        none,
    );
}

/// A string setting's value, '' when unset.
pub fn string(setting: &GucSetting<Option<CString>>) -> String {
    setting
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}
