-- pg_linkhooks 0.1.0 → 0.2.0: the analyst and operator surface.
-- Every object here matches what a fresh 0.2.0 install creates; the system
-- test tests/system/test_upgrade.py compares the two catalogs.

-- Delivery health per subscription, kept by the worker. Not columns of
-- subscriptions: writing those refreshes every backend's subscription cache.
CREATE TABLE subscription_state (
    subscription_id      bigint PRIMARY KEY,
    last_success_at      timestamptz,
    last_failure_at      timestamptz,
    consecutive_failures integer NOT NULL DEFAULT 0   -- failed attempts since the last success
);
COMMENT ON TABLE subscription_state IS 'Last success, last failure and failures in a row per subscription; read it through subscription_health.';
-- Health windows (last hour, last day) scan attempts by time.
CREATE INDEX delivery_attempts_started ON delivery_attempts (started_at);
-- Each attempt names its subscription, so health needs no join; earlier attempts are filled in.
ALTER TABLE delivery_attempts ADD COLUMN subscription_id bigint;
UPDATE delivery_attempts a SET subscription_id = d.subscription_id FROM deliveries d WHERE d.id = a.delivery_id;

-- The redirect service needs EXECUTE only, not SELECT on links.
ALTER FUNCTION resolve(text, text) SECURITY DEFINER;
ALTER FUNCTION record_click(text, inet, text, text, text, text, text, text, text) SECURITY DEFINER;

-- worker_status() returns a row instead of jsonb.
DROP FUNCTION worker_status();
CREATE FUNCTION worker_status() RETURNS TABLE (
    running bool, pid int, database text, in_flight bigint, last_loop timestamptz, queue_depth bigint
)
STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'worker_status_wrapper';

-- One row per delivery: did it arrive, how fast, and if not, why (adds latency_ms).
CREATE OR REPLACE VIEW delivery_log AS
SELECT d.id AS delivery_id, d.event_id, d.subscription_id, s.name AS subscription_name, d.event_type,
       d.status, d.attempts, d.last_status_code, d.last_error, d.created_at, d.delivered_at,
       d.next_attempt_at, d.delivered_at - d.created_at AS latency,
       round((extract(epoch FROM d.delivered_at - d.created_at) * 1000)::numeric, 1) AS latency_ms
FROM deliveries d
LEFT JOIN subscriptions s ON s.id = d.subscription_id;
COMMENT ON VIEW delivery_log IS 'One row per delivery: subscription, event, status, attempts, last error, end-to-end latency.';

-- Per subscription and period ('1h', '24h'): volume, failures, latency, backlog and state.
-- One pass over the last day per source, split into both periods with FILTER.
CREATE VIEW subscription_health AS
WITH delivered AS (
    SELECT d.subscription_id, v.period, v.delivered, v.latency_ms
    FROM (SELECT subscription_id, count(*) FILTER (WHERE recent) AS n_1h, count(*) AS n_24h,
                 percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY ms) FILTER (WHERE recent) AS ms_1h,
                 percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY ms) AS ms_24h
          FROM (SELECT subscription_id, delivered_at >= now() - interval '1 hour' AS recent,
                       extract(epoch FROM delivered_at - created_at) * 1000 AS ms
                FROM deliveries
                WHERE status = 'delivered' AND delivered_at >= now() - interval '24 hours') x
          GROUP BY subscription_id) d
    CROSS JOIN LATERAL (VALUES ('1h', d.n_1h, d.ms_1h), ('24h', d.n_24h, d.ms_24h)) AS v (period, delivered, latency_ms)
), attempted AS (
    SELECT a.subscription_id, v.period, v.attempts, v.succeeded
    FROM (SELECT subscription_id, count(*) FILTER (WHERE recent) AS n_1h, count(*) AS n_24h,
                 count(*) FILTER (WHERE recent AND ok) AS ok_1h, count(*) FILTER (WHERE ok) AS ok_24h
          FROM (SELECT subscription_id, started_at >= now() - interval '1 hour' AS recent,
                       coalesce(status_code BETWEEN 200 AND 299, false) AS ok
                FROM delivery_attempts
                WHERE started_at >= now() - interval '24 hours') x
          GROUP BY subscription_id) a
    CROSS JOIN LATERAL (VALUES ('1h', a.n_1h, a.ok_1h), ('24h', a.n_24h, a.ok_24h)) AS v (period, attempts, succeeded)
), died AS (
    SELECT l.subscription_id, v.period, v.dead_letters
    FROM (SELECT subscription_id, count(*) FILTER (WHERE died_at >= now() - interval '1 hour') AS n_1h, count(*) AS n_24h
          FROM dead_letters
          WHERE died_at >= now() - interval '24 hours'
          GROUP BY subscription_id) l
    CROSS JOIN LATERAL (VALUES ('1h', l.n_1h), ('24h', l.n_24h)) AS v (period, dead_letters)
), queued AS (
    SELECT subscription_id, count(*) AS pending, min(created_at) AS oldest
    FROM deliveries
    WHERE status IN ('pending', 'delivering')
    GROUP BY subscription_id
)
SELECT s.id AS subscription_id, s.name, p.period, s.enabled, s.disabled_reason,
       coalesce(dl.delivered, 0) AS delivered,
       coalesce(at.attempts - at.succeeded, 0) AS failed_attempts,
       coalesce(di.dead_letters, 0) AS dead_letters,
       round(at.succeeded::numeric / nullif(at.attempts, 0), 4) AS success_rate,
       round(dl.latency_ms[1]::numeric, 1) AS latency_p50_ms,
       round(dl.latency_ms[2]::numeric, 1) AS latency_p95_ms,
       round(dl.latency_ms[3]::numeric, 1) AS latency_p99_ms,
       coalesce(q.pending, 0) AS pending,
       now() - q.oldest AS oldest_pending_age,
       st.last_success_at, st.last_failure_at,
       coalesce(st.consecutive_failures, 0) AS consecutive_failures
FROM subscriptions s
CROSS JOIN (VALUES ('1h'), ('24h')) AS p (period)
LEFT JOIN delivered dl ON dl.subscription_id = s.id AND dl.period = p.period
LEFT JOIN attempted at ON at.subscription_id = s.id AND at.period = p.period
LEFT JOIN died di ON di.subscription_id = s.id AND di.period = p.period
LEFT JOIN queued q ON q.subscription_id = s.id
LEFT JOIN subscription_state st ON st.subscription_id = s.id;
COMMENT ON VIEW subscription_health IS 'Per subscription, for the last hour and day: delivered, failed attempts, dead letters, success rate, latency p50/p95/p99, backlog, last success/failure, failures in a row.';

-- Clicks classified once for the views below: bots, QR scans and the referring host.
CREATE VIEW click_facts AS
SELECT c.id AS click_id, c.link_id, c.clicked_at, coalesce(c.is_bot, false) AS is_bot, c.source = 'qr' AS is_qr,
       coalesce(lower(substring(c.referer FROM '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?([^/?#:]+)')), '(direct)') AS referrer,
       coalesce(c.country, '(unknown)') AS country, coalesce(c.device, 'unknown') AS device,
       coalesce(c.browser, '(unknown)') AS browser, coalesce(c.os, '(unknown)') AS os, c.source
FROM clicks c;
COMMENT ON VIEW click_facts IS 'Clicks with bot, QR and referring-host columns ready for grouping.';

-- Per link: clicks (humans, bots, QR), first and last click, conversions and conversion rate.
CREATE VIEW link_stats AS
SELECT l.id AS link_id, l.domain, l.slug, l.campaign,
       coalesce(k.clicks, 0) AS clicks, coalesce(k.human_clicks, 0) AS human_clicks,
       coalesce(k.bot_clicks, 0) AS bot_clicks, coalesce(k.qr_scans, 0) AS qr_scans,
       k.first_click_at, k.last_click_at,
       coalesce(v.conversions, 0) AS conversions,
       round(coalesce(v.conversions, 0)::numeric / nullif(k.human_clicks, 0), 4) AS conversion_rate
FROM links l
LEFT JOIN (SELECT link_id, count(*) AS clicks, count(*) FILTER (WHERE NOT is_bot) AS human_clicks,
                  count(*) FILTER (WHERE is_bot) AS bot_clicks, count(*) FILTER (WHERE is_qr) AS qr_scans,
                  min(clicked_at) AS first_click_at, max(clicked_at) AS last_click_at
           FROM click_facts GROUP BY link_id) k ON k.link_id = l.id
LEFT JOIN (SELECT link_id, count(*) AS conversions FROM conversions GROUP BY link_id) v ON v.link_id = l.id;
COMMENT ON VIEW link_stats IS 'Per link: clicks, human and bot clicks, QR scans, first/last click, conversions, conversion rate (conversions per human click).';

-- Per link and day (in the session time zone).
CREATE VIEW link_daily_clicks AS
SELECT link_id, clicked_at::date AS day, count(*) AS clicks,
       count(*) FILTER (WHERE NOT is_bot) AS human_clicks, count(*) FILTER (WHERE is_bot) AS bot_clicks,
       count(*) FILTER (WHERE is_qr) AS qr_scans
FROM click_facts
GROUP BY link_id, clicked_at::date;
COMMENT ON VIEW link_daily_clicks IS 'Clicks per link per day: all, human, bot, QR.';

-- Per link, one row per value of each dimension: referrer (host), country, device, browser, os, source.
CREATE VIEW link_click_breakdown AS
SELECT f.link_id, d.dimension, d.value, count(*) AS clicks, count(*) FILTER (WHERE NOT f.is_bot) AS human_clicks
FROM click_facts f
CROSS JOIN LATERAL (VALUES ('referrer', f.referrer), ('country', f.country), ('device', f.device),
                           ('browser', f.browser), ('os', f.os), ('source', f.source)) AS d (dimension, value)
GROUP BY f.link_id, d.dimension, d.value;
COMMENT ON VIEW link_click_breakdown IS 'Clicks per link by referrer host, country, device, browser, os and source (link or qr).';

-- Per campaign (named on links or in campaigns): links, clicks, conversions, goal and completion.
CREATE VIEW campaign_stats AS
SELECT coalesce(c.name, s.campaign) AS campaign, coalesce(s.links, 0) AS links,
       coalesce(s.clicks, 0) AS clicks, coalesce(s.human_clicks, 0) AS human_clicks,
       coalesce(s.bot_clicks, 0) AS bot_clicks, coalesce(s.qr_scans, 0) AS qr_scans,
       coalesce(s.conversions, 0) AS conversions,
       round(s.conversions::numeric / nullif(s.human_clicks, 0), 4) AS conversion_rate,
       c.click_goal, c.ends_at, c.completed_at
FROM (SELECT campaign, count(*) AS links, sum(clicks)::bigint AS clicks, sum(human_clicks)::bigint AS human_clicks,
             sum(bot_clicks)::bigint AS bot_clicks, sum(qr_scans)::bigint AS qr_scans,
             sum(conversions)::bigint AS conversions
      FROM link_stats WHERE campaign IS NOT NULL GROUP BY campaign) s
FULL JOIN campaigns c ON c.name = s.campaign;
COMMENT ON VIEW campaign_stats IS 'Per campaign: links, clicks, human and bot clicks, QR scans, conversions, conversion rate, goal and completion.';

CREATE FUNCTION access_privileges(access text) RETURNS SETOF text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF access = 'writer' THEN
        RETURN NEXT 'USAGE ON SCHEMA @extschema@';
        RETURN NEXT 'EXECUTE ON FUNCTION @extschema@.resolve(text, text), '
                    '@extschema@.record_click(text, inet, text, text, text, text, text, text, text)';
        RETURN NEXT 'INSERT ON TABLE @extschema@.clicks, @extschema@.conversions';
        -- Enough for INSERT ... RETURNING id, event_id (to attribute conversions), not to read clicks.
        RETURN NEXT 'SELECT (id, event_id) ON TABLE @extschema@.clicks, @extschema@.conversions';
    ELSIF access = 'analyst' THEN
        RETURN NEXT 'USAGE ON SCHEMA @extschema@';
        RETURN NEXT 'SELECT ON TABLE @extschema@.links, @extschema@.campaigns, @extschema@.clicks, '
                    '@extschema@.conversions, @extschema@.deliveries, @extschema@.delivery_attempts, '
                    '@extschema@.dead_letters, @extschema@.delivery_log, @extschema@.subscription_health, '
                    '@extschema@.click_facts, @extschema@.link_stats, @extschema@.link_daily_clicks, '
                    '@extschema@.link_click_breakdown, @extschema@.campaign_stats';
        -- Every subscription column but the secrets and the URL (which may carry a token).
        RETURN NEXT 'SELECT (id, name, event_types, filters, ip_mode, signature_scheme, timeout_ms, max_attempts, '
                    'enabled, disabled_reason, consecutive_dead_letters, created_at, updated_at) '
                    'ON TABLE @extschema@.subscriptions';
        RETURN NEXT 'EXECUTE ON FUNCTION @extschema@.worker_status()';
    ELSIF access = 'admin' THEN
        RETURN QUERY SELECT @extschema@.access_privileges('analyst');
        RETURN NEXT 'SELECT, INSERT, UPDATE, DELETE ON TABLE @extschema@.links, @extschema@.campaigns, '
                    '@extschema@.subscriptions';
        RETURN NEXT 'EXECUTE ON FUNCTION @extschema@.resolve(text, text), @extschema@.send_test(bigint), '
                    '@extschema@.replay(bigint), @extschema@.replay_dead_letters(bigint, timestamptz), '
                    '@extschema@.rotate_secret(bigint, interval), @extschema@.run_maintenance(), '
                    '@extschema@.generate_secret()';
    ELSE
        RAISE EXCEPTION 'invalid access: must be ''writer'', ''analyst'' or ''admin'' (got %)', coalesce(quote_literal(access), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;
COMMENT ON FUNCTION access_privileges(text) IS 'The privileges behind an access level (writer, analyst, admin), as GRANT clauses.';

-- Grants or revokes one access level; returns the statements it ran.
CREATE FUNCTION apply_access(action text, role_name text, access text) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    privilege text;
    statement text;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = role_name) THEN
        RAISE EXCEPTION 'invalid role_name: role % does not exist', coalesce(quote_ident(role_name), 'NULL')
            USING ERRCODE = 'undefined_object';
    END IF;
    FOR privilege IN SELECT @extschema@.access_privileges(access) LOOP
        -- The privilege text is ours; the role name is quoted as an identifier.
        statement := CASE action WHEN 'grant' THEN format('GRANT %s TO %I', privilege, role_name)
                                 ELSE format('REVOKE %s FROM %I', privilege, role_name) END;
        EXECUTE statement;
        RETURN NEXT statement;
    END LOOP;
END
$$;
COMMENT ON FUNCTION apply_access(text, text, text) IS 'Shared body of grant_access and revoke_access.';

-- Gives a role an access level: writer, analyst or admin.
CREATE FUNCTION grant_access(role_name text, access text) RETURNS SETOF text
LANGUAGE sql AS $$ SELECT @extschema@.apply_access('grant', role_name, access) $$;
COMMENT ON FUNCTION grant_access(text, text) IS 'GRANTs an access level (writer, analyst, admin) to a role; returns the statements run.';

-- Takes an access level away again.
CREATE FUNCTION revoke_access(role_name text, access text) RETURNS SETOF text
LANGUAGE sql AS $$ SELECT @extschema@.apply_access('revoke', role_name, access) $$;
COMMENT ON FUNCTION revoke_access(text, text) IS 'REVOKEs an access level from a role; returns the statements run.';

-- pg_dump dumps the contents of these tables and sequences (restore with
-- session_replication_role = replica so restored rows do not emit events again).
DO $$
DECLARE
    relation text;
BEGIN
    FOREACH relation IN ARRAY ARRAY[
        'links', 'links_id_seq', 'campaigns', 'clicks', 'clicks_id_seq', 'conversions', 'conversions_id_seq',
        'subscriptions', 'subscriptions_id_seq', 'deliveries', 'deliveries_id_seq', 'delivery_attempts',
        'delivery_attempts_id_seq', 'dead_letters', 'subscription_state']
    LOOP
        PERFORM pg_catalog.pg_extension_config_dump(relation::regclass, '');
    END LOOP;
END
$$;

-- The same privileges as a fresh install: nothing for PUBLIC but sign and verify.
REVOKE ALL ON ALL TABLES IN SCHEMA @extschema@ FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA @extschema@ FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sign(text, text, bigint, text), verify(text, text, bigint, text, text) TO PUBLIC;
