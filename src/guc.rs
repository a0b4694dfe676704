//! The `linkhooks.*` settings. Whatever the worker reads is set for the whole
//! server (postgresql.conf or ALTER SYSTEM, then a reload): a session-level SET
//! it would never see is refused. Values are checked when set, so a typo is an
//! error at SET, ALTER SYSTEM or reload instead of a fallback later.

use std::ffi::{CStr, CString, c_char, c_void};
use std::time::Duration;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, pg_guard, pg_sys};

use crate::duration;
use crate::retry::Schedule;

pub static DATABASES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// 0.4.0's name: one database. Read as part of the allow-list.
pub static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static BASE_URL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static HTTP_CONCURRENCY: GucSetting<i32> = GucSetting::<i32>::new(32);
pub static WORKERS_PER_DATABASE: GucSetting<i32> = GucSetting::<i32>::new(1);
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(500);
pub static RETRY_SCHEDULE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"1m,5m,30m,2h,24h"));
pub static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static DEFAULT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5000);
pub static REQUIRE_HTTPS: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static ALLOW_PRIVATE_TARGETS: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static RESTORE: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static RETENTION: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"7d"));
pub static CLICK_RETENTION: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"never"));
pub static DEAD_LETTER_RETENTION: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"never"));
pub static PARTITION_INTERVAL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"1d"));
pub static NOTIFY_CHANNEL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static DISABLE_AFTER_DEAD_LETTERS: GucSetting<i32> = GucSetting::<i32>::new(20);
pub static MAX_BODY_BYTES: GucSetting<i32> =
    GucSetting::<i32>::new(crate::limits::DEFAULT_MAX_BODY_BYTES);
pub static LINK_CACHE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static MAINTENANCE_INTERVAL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"30s"));
pub static HOLD_WINDOW: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"3d"));
pub static MISS_INTERVAL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"1h"));
pub static HEALTH_CHECK_INTERVAL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"5min"));
pub static MAX_MISS_ROWS: GucSetting<i32> = GucSetting::<i32>::new(100_000);

pub fn register() {
    use GucContext::{Sighup, Suset};
    let none = GucFlags::default();
    let s = |name, short, setting, ctx| {
        GucRegistry::define_string_guc(name, short, c"", setting, ctx, none)
    };
    let checked = |name, short, setting, check: pg_sys::GucStringCheckHook| {
        // SAFETY: the check hooks are #[pg_guard]ed and only read the new value.
        unsafe {
            GucRegistry::define_string_guc_with_hooks(
                name, short, c"", setting, Sighup, none, check, None, None,
            )
        }
    };
    s(
        c"linkhooks.databases",
        c"Databases that get a delivery worker, e.g. 'app,crm'; empty: every database with the extension.",
        &DATABASES,
        Sighup,
    );
    s(
        c"linkhooks.database",
        c"Before 0.5.0, the one database served; now read as part of linkhooks.databases.",
        &DATABASE,
        Sighup,
    );
    s(
        c"linkhooks.base_url",
        c"Base of short_url in payloads for links on the default domain, e.g. https://go.acme.co.",
        &BASE_URL,
        Suset,
    );
    checked(
        c"linkhooks.retry_schedule",
        c"Delays before each retry, e.g. '1m,5m,30m,2h,24h' (units ms, s, min, h, d, w).",
        &RETRY_SCHEDULE,
        Some(check_schedule),
    );
    checked(
        c"linkhooks.hold_window",
        c"How long a disabled or paused subscription's events are held for it (e.g. '3d').",
        &HOLD_WINDOW,
        Some(check_duration),
    );
    checked(
        c"linkhooks.retention",
        c"How long delivered deliveries and attempts are kept (e.g. '7d' or '7 days').",
        &RETENTION,
        Some(check_duration),
    );
    checked(
        c"linkhooks.click_retention",
        c"How long clicks are kept, whole partitions at a time ('never', or e.g. '400d').",
        &CLICK_RETENTION,
        Some(check_optional_duration),
    );
    checked(
        c"linkhooks.dead_letter_retention",
        c"How long dead letters not replayed are kept ('never', or e.g. '90d'); replayed ones go after linkhooks.retention.",
        &DEAD_LETTER_RETENTION,
        Some(check_optional_duration),
    );
    checked(
        c"linkhooks.partition_interval",
        c"How much time each new partition of clicks, deliveries and delivery_attempts holds (at least 1 minute; e.g. '1d').",
        &PARTITION_INTERVAL,
        Some(check_partition_interval),
    );
    checked(
        c"linkhooks.miss_interval",
        c"link.miss fires on a slug's first miss, then at most once per this interval (e.g. '1h').",
        &MISS_INTERVAL,
        Some(check_duration),
    );
    checked(
        c"linkhooks.health_check_interval",
        c"How often a health_check rule without an interval of its own checks a link's destination (e.g. '5min').",
        &HEALTH_CHECK_INTERVAL,
        Some(check_positive_duration),
    );
    s(
        c"linkhooks.notify_channel",
        c"If set, committed events are also announced with NOTIFY on this channel.",
        &NOTIFY_CHANNEL,
        Suset,
    );
    checked(
        c"linkhooks.maintenance_interval",
        c"How often the housekeeper process runs linkhooks.run_maintenance() (e.g. 30s).",
        &MAINTENANCE_INTERVAL,
        Some(check_positive_duration),
    );

    let i = |name, short, setting, min, max, ctx| {
        GucRegistry::define_int_guc(name, short, c"", setting, min, max, ctx, none)
    };
    i(
        c"linkhooks.http_concurrency",
        c"HTTP requests each database keeps in flight, shared among its workers.",
        &HTTP_CONCURRENCY,
        1,
        1024,
        Sighup,
    );
    i(
        c"linkhooks.workers_per_database",
        c"Delivery workers in each database; they share its queue and its http_concurrency.",
        &WORKERS_PER_DATABASE,
        1,
        16,
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
        c"linkhooks.max_miss_rows",
        c"Rows link_misses keeps; maintenance drops the least recently missed beyond this.",
        &MAX_MISS_ROWS,
        100,
        100_000_000,
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
        Sighup,
        none,
    );
    // Superuser-only; the extension's owner is granted SET on it (access level 'owner').
    GucRegistry::define_bool_guc(
        c"linkhooks.restore",
        c"While restoring a dump: the extension's triggers store rows as given (no checks, no events).",
        c"",
        &RESTORE,
        GucContext::Suset,
        none,
    );
    GucRegistry::define_bool_guc(
        c"linkhooks.allow_private_targets",
        c"Allow webhooks to private, loopback and link-local addresses.",
        c"",
        &ALLOW_PRIVATE_TARGETS,
        Sighup,
        none,
    );
}

/// Check hooks: `rule` decides; a refusal reports its text as the error's detail.
unsafe fn check_with(newval: *mut *mut c_char, rule: fn(&str) -> Result<(), String>) -> bool {
    // SAFETY: PostgreSQL passes the proposed value, a C string or NULL.
    let value = unsafe {
        newval
            .as_ref()
            .filter(|p| !p.is_null())
            .map(|p| CStr::from_ptr(*p))
    };
    let Some(value) = value else {
        return true;
    };
    match rule(&value.to_string_lossy()) {
        Ok(()) => true,
        Err(detail) => {
            let detail = CString::new(detail).unwrap_or_default();
            // SAFETY: GUC_check_errdetail_string is read by the caller's error report;
            // pstrdup copies into the current memory context, which outlives it.
            unsafe { pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(detail.as_ptr()) };
            false
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_schedule(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    unsafe {
        check_with(newval, |v| {
            Schedule::parse(v).map(|_| ()).map_err(|e| e.to_string())
        })
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_duration(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    unsafe { check_with(newval, |v| duration_rule(v, false)) }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_positive_duration(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    unsafe { check_with(newval, |v| duration_rule(v, true)) }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_optional_duration(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    unsafe { check_with(newval, |v| optional_duration(v).map(|_| ())) }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_partition_interval(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    unsafe { check_with(newval, |v| partition_width(v).map(|_| ())) }
}

/// The rule of `linkhooks.click_retention` and `dead_letter_retention`.
fn optional_duration(value: &str) -> Result<Option<Duration>, String> {
    duration::parse_retention(value)
        .ok_or_else(|| format!("must be 'never' or {}; '{value}' is not", duration::SYNTAX))
}

/// A partition width: a duration of at least a minute (maintain_partitions' rule).
fn partition_width(value: &str) -> Result<Duration, String> {
    match duration::parse(value) {
        Some(d) if d >= Duration::from_secs(60) => Ok(d),
        Some(_) => Err(format!("must be at least 1 minute; '{value}' is shorter")),
        None => Err(format!("must be {}; '{value}' is not", duration::SYNTAX)),
    }
}

/// `linkhooks.partition_interval` (checked when set; a day if unreadable).
pub fn partition_interval() -> Duration {
    partition_width(&string(&PARTITION_INTERVAL)).unwrap_or(Duration::from_secs(86_400))
}

/// `linkhooks.retention` (checked when set; None only if unreadable).
pub fn retention() -> Option<Duration> {
    duration::parse(&string(&RETENTION))
}

/// `linkhooks.click_retention`: None keeps every click (so does an unreadable value).
pub fn click_retention() -> Option<Duration> {
    optional_duration(&string(&CLICK_RETENTION)).unwrap_or(None)
}

/// `linkhooks.dead_letter_retention`: None keeps dead letters until replayed (so does an
/// unreadable value).
pub fn dead_letter_retention() -> Option<Duration> {
    optional_duration(&string(&DEAD_LETTER_RETENTION)).unwrap_or(None)
}

fn duration_rule(value: &str, positive: bool) -> Result<(), String> {
    match duration::parse(value) {
        Some(d) if positive && d.is_zero() => Err("must be longer than zero".into()),
        Some(_) => Ok(()),
        None => Err(format!("must be {}; '{value}' is not", duration::SYNTAX)),
    }
}

/// `linkhooks.hold_window` in milliseconds (checked when set; 3 days if unreadable).
pub fn hold_window_ms() -> i64 {
    duration::parse(&string(&HOLD_WINDOW)).map_or(3 * 86_400_000, |d| d.as_millis() as i64)
}

/// The databases `linkhooks.databases` and `linkhooks.database` name; empty: every database.
pub fn served_databases() -> Vec<String> {
    crate::allowlist::parse(&[&string(&DATABASES), &string(&DATABASE)])
}

/// A string setting's value, '' when unset.
pub fn string(setting: &GucSetting<Option<CString>>) -> String {
    setting
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Sets any setting (PostgreSQL's too) in a transaction, as a superuser's SET
/// does, or SET LOCAL when `for_transaction`.
pub fn set(name: &CStr, value: &CStr, for_transaction: bool) {
    let action = if for_transaction {
        pg_sys::GucAction::GUC_ACTION_LOCAL
    } else {
        pg_sys::GucAction::GUC_ACTION_SET
    };
    // SAFETY: inside a transaction, as SET runs; the strings outlive the call.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            action,
            true,
            0,
            false,
        );
    }
}
