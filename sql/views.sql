-- Views for analysts and on-call engineers. None of them shows a secret or a
-- subscription URL (URLs may carry tokens). They run with the owner's
-- privileges, so a role needs SELECT on the view only.

-- One row per delivery: did it arrive, how fast, and if not, why.
CREATE VIEW delivery_log AS
SELECT d.id AS delivery_id, d.event_id, d.subscription_id, s.name AS subscription_name, d.event_type,
       d.status, d.attempts, d.last_status_code, d.last_error, d.created_at, d.delivered_at,
       d.next_attempt_at, d.delivered_at - d.created_at AS latency,
       round((extract(epoch FROM d.delivered_at - d.created_at) * 1000)::numeric, 1) AS latency_ms
FROM deliveries d
LEFT JOIN subscriptions s ON s.id = d.subscription_id;
COMMENT ON VIEW delivery_log IS 'One row per delivery: subscription, event, status, attempts, last error, end-to-end latency.';

-- Where the worker's fold of delivery_attempts has reached (0: nothing folded yet), for
-- subscription_health. A function, not a subquery, as click_cursor_xmin() below: the planner
-- reads its value when it estimates, so it expects about a second of attempts past it, not a
-- third of the log (at 10M attempts that plan cost enough to be JIT-compiled: 1.1 s a query).
CREATE FUNCTION attempt_cursor_id() RETURNS bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER COST 1000 SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN coalesce((SELECT c.counted_id FROM @extschema@.attempt_cursor c), 0);
END
$$;

-- Per subscription and period ('1h', '24h'): volume, failures, latency, backlog and state.
-- Volume and latency come from the rollups (the last 60 or 1,440 UTC minutes, the current one
-- included), so the view reads at most a day of minutes whatever the traffic; latencies by the
-- hour for the whole hours of the period, by the minute before and after them. Percentiles are
-- the middle of their latency bucket (within 5%, src/latency.rs).
CREATE VIEW subscription_health AS
WITH periods (period, since, hours_from, hours_to) AS (
    SELECT p.period, p.since,
           -- whole hours from the first after `since` to the current one (none if that is not later)
           date_trunc('hour', p.since, 'UTC') + interval '1 hour',
           GREATEST(date_trunc('hour', p.since, 'UTC') + interval '1 hour', date_trunc('hour', now(), 'UTC'))
    FROM (VALUES ('1h', date_trunc('minute', now(), 'UTC') - interval '59 minutes'),
                 ('24h', date_trunc('minute', now(), 'UTC') - interval '1439 minutes')) p (period, since)
), counted AS (
    SELECT m.subscription_id, p.period, sum(m.attempts) AS attempts, sum(m.succeeded) AS succeeded
    FROM (SELECT subscription_id, minute, attempts, succeeded FROM subscription_minutes
          UNION ALL
          -- attempts the worker has not folded in yet (about a second of them)
          SELECT a.subscription_id, date_trunc('minute', a.started_at, 'UTC'), 1,
                 CASE WHEN a.status_code BETWEEN 200 AND 299 THEN 1 ELSE 0 END
          FROM delivery_attempts a
          WHERE a.id > attempt_cursor_id() AND a.subscription_id IS NOT NULL) m
    JOIN periods p ON m.minute >= p.since
    GROUP BY m.subscription_id, p.period
), delivered AS (
    -- Deliveries, and per percentile the first latency bucket reaching that share of them.
    SELECT subscription_id, period, max(total)::bigint AS delivered,
           min(bucket) FILTER (WHERE below >= 0.50 * total) AS p50,
           min(bucket) FILTER (WHERE below >= 0.95 * total) AS p95,
           min(bucket) FILTER (WHERE below >= 0.99 * total) AS p99
    FROM (SELECT subscription_id, period, bucket,
                 sum(n) OVER (PARTITION BY subscription_id, period ORDER BY bucket) AS below,
                 sum(n) OVER (PARTITION BY subscription_id, period) AS total
          FROM (SELECT m.subscription_id, m.period, m.bucket, sum(m.deliveries) AS n
                FROM (SELECT l.subscription_id, p.period, l.bucket, l.deliveries
                      FROM subscription_latencies l JOIN periods p ON l.minute >= p.since AND l.minute < p.hours_from
                      UNION ALL
                      SELECT h.subscription_id, p.period, h.bucket, h.deliveries
                      FROM subscription_latency_hours h JOIN periods p ON h.hour >= p.hours_from AND h.hour < p.hours_to
                      UNION ALL
                      SELECT l.subscription_id, p.period, l.bucket, l.deliveries
                      FROM subscription_latencies l JOIN periods p ON l.minute >= p.hours_to
                      UNION ALL
                      -- deliveries the worker has not folded in yet (about a second of them)
                      SELECT a.subscription_id, p.period, latency_bucket(a.latency_ms), 1
                      FROM delivery_attempts a JOIN periods p ON a.started_at >= p.since
                      WHERE a.id > attempt_cursor_id()
                        AND a.subscription_id IS NOT NULL AND a.latency_ms IS NOT NULL) m
                GROUP BY m.subscription_id, m.period, m.bucket) b) x
    GROUP BY subscription_id, period
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
       coalesce(c.attempts - c.succeeded, 0) AS failed_attempts,
       coalesce(di.dead_letters, 0) AS dead_letters,
       round(c.succeeded::numeric / nullif(c.attempts, 0), 4) AS success_rate,
       round((CASE WHEN dl.p50 = 0 THEN 0.05 ELSE 0.1 * 1.1 ^ (dl.p50 - 0.5) END)::numeric, 1) AS latency_p50_ms,
       round((CASE WHEN dl.p95 = 0 THEN 0.05 ELSE 0.1 * 1.1 ^ (dl.p95 - 0.5) END)::numeric, 1) AS latency_p95_ms,
       round((CASE WHEN dl.p99 = 0 THEN 0.05 ELSE 0.1 * 1.1 ^ (dl.p99 - 0.5) END)::numeric, 1) AS latency_p99_ms,
       coalesce(q.pending, 0) AS pending,
       now() - q.oldest AS oldest_pending_age,
       st.last_success_at, st.last_failure_at,
       coalesce(st.consecutive_failures, 0) AS consecutive_failures
FROM subscriptions s
CROSS JOIN periods p
LEFT JOIN counted c ON c.subscription_id = s.id AND c.period = p.period
LEFT JOIN delivered dl ON dl.subscription_id = s.id AND dl.period = p.period
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

-- Where the aggregator's cursor starts (the oldest transaction its last run could not count), for
-- uncounted_clicks. A function, not a subquery: the planner reads its value when it estimates
-- (it cannot see into a subquery), so it expects a second of clicks, not a share of all of them,
-- and at tens of millions of clicks keeps the views' plans cheap enough that PostgreSQL does not
-- JIT-compile them (300 ms a query). Costly on purpose, so it is an index condition, evaluated
-- once, rather than a filter run per row. The cursor position is no secret: PUBLIC may read it.
CREATE FUNCTION click_cursor_xmin() RETURNS xid8
LANGUAGE plpgsql STABLE SECURITY DEFINER COST 1000 SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT pg_snapshot_xmin(k.snapshot) FROM @extschema@.click_cursor k);
END
$$;

-- Clicks committed since the aggregator's last run, so not in link_counts and link_hours yet
-- (at most a second or so of clicks, found by their transaction ids): the views below add
-- them to those counts and are exact at any moment while reading only recent rows.
-- The cursor is read as scalars: the planner then knows it is one row (joined, an unanalyzed
-- cursor counted as a thousand rows made every partition's scan look expensive enough to JIT).
CREATE VIEW uncounted_clicks AS
SELECT c.id AS click_id, c.link_id, c.clicked_at, coalesce(c.is_bot, false) AS is_bot, c.source = 'qr' AS is_qr
FROM clicks c
WHERE c.txid >= click_cursor_xmin()
  AND c.txid < pg_snapshot_xmax(pg_current_snapshot())
  AND NOT pg_visible_in_snapshot(c.txid, (SELECT k.snapshot FROM click_cursor k))
  AND c.id > (SELECT k.id_floor FROM click_cursor k);
COMMENT ON VIEW uncounted_clicks IS 'Clicks committed since the aggregator last counted (what the counted views add to their counts).';

-- numeric division (`/` itself, numeric_div) that the planner counts as costly, so a query's
-- ORDER BY … LIMIT computes it only for the rows it returns, not for every row it sorts (for
-- link_stats' conversion_rate over 100k links, 15 ms of a top 10). Pure: PUBLIC may call it.
CREATE FUNCTION ratio(numeric, numeric) RETURNS numeric
LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE COST 100 AS 'numeric_div';

-- Per link: clicks (humans, bots, QR), first and last click, conversions and conversion rate:
-- the aggregator's counts (with the link's domain, slug and campaign: one row per link) plus
-- the clicks and conversions it has not counted yet.
CREATE VIEW link_stats AS
SELECT k.link_id, k.domain, k.slug, k.campaign,
       k.clicks + coalesce(p.clicks, 0) AS clicks,
       k.human_clicks + coalesce(p.human_clicks, 0) AS human_clicks,
       k.clicks - k.human_clicks + coalesce(p.clicks - p.human_clicks, 0) AS bot_clicks,
       k.qr_scans + coalesce(p.qr_scans, 0) AS qr_scans,
       LEAST(k.first_click_at, p.first_click_at) AS first_click_at,
       GREATEST(k.last_click_at, p.last_click_at) AS last_click_at,
       k.conversions + coalesce(p.conversions, 0) AS conversions,
       round(ratio((k.conversions + coalesce(p.conversions, 0))::numeric,
                   nullif(k.human_clicks + coalesce(p.human_clicks, 0), 0)), 4) AS conversion_rate
FROM link_counts k
-- One join for both (each join of 100k links costs): the clicks and conversions not counted yet.
LEFT JOIN (SELECT link_id, count(*) FILTER (WHERE is_click) AS clicks,
                  count(*) FILTER (WHERE is_click AND NOT is_bot) AS human_clicks,
                  count(*) FILTER (WHERE is_qr) AS qr_scans, count(*) FILTER (WHERE NOT is_click) AS conversions,
                  min(clicked_at) AS first_click_at, max(clicked_at) AS last_click_at
           FROM (SELECT link_id, true AS is_click, is_bot, is_qr, clicked_at FROM uncounted_clicks
                 UNION ALL
                 SELECT c.link_id, false, false, false, NULL
                 FROM conversions c
                 WHERE c.txid >= click_cursor_xmin()
                   AND c.txid < pg_snapshot_xmax(pg_current_snapshot())
                   AND NOT pg_visible_in_snapshot(c.txid, (SELECT k.snapshot FROM click_cursor k))
                   AND c.id > (SELECT k.conversion_id_floor FROM click_cursor k)) x
           GROUP BY link_id) p ON p.link_id = k.link_id;
COMMENT ON VIEW link_stats IS 'Per link: clicks, human and bot clicks, QR scans, first/last click, conversions, conversion rate (conversions per human click).';

-- Per link and day (in the session time zone, to the hour: link_hours are whole UTC hours).
CREATE VIEW link_daily_clicks AS
SELECT link_id, day, sum(clicks)::bigint AS clicks, sum(human_clicks)::bigint AS human_clicks,
       sum(clicks - human_clicks)::bigint AS bot_clicks, sum(qr_scans)::bigint AS qr_scans
FROM (SELECT link_id, hour::date AS day, clicks, human_clicks, qr_scans FROM link_hours
      UNION ALL
      SELECT link_id, clicked_at::date, 1, (NOT is_bot)::int, is_qr::int FROM uncounted_clicks) x
GROUP BY link_id, day;
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

-- Milestones reached, newest first, with the link's slug or the campaign.
CREATE VIEW link_milestones AS
SELECT m.scope, m.link_id, l.domain, l.slug, coalesce(m.campaign, l.campaign) AS campaign,
       m.counted, m.threshold, m.clicks, m.reached_at, m.event_id
FROM milestones m
LEFT JOIN links l ON l.id = m.link_id
ORDER BY m.reached_at DESC;
COMMENT ON VIEW link_milestones IS 'Milestones reached (link.milestone, campaign.milestone): what fired, when, at which count.';

-- Destination health of checked links, broken first.
CREATE VIEW link_health AS
SELECT d.link_id, l.domain, l.slug, l.campaign, d.url, d.status, d.http_status, d.reason, d.failures,
       d.checked_at, d.status_since, d.next_check_at
FROM destination_checks d
JOIN links l ON l.id = d.link_id
ORDER BY d.status = 'broken' DESC, d.status_since;
COMMENT ON VIEW link_health IS 'Destination health checks (link.broken, link.recovered): each checked link''s status, last answer and reason.';

-- Partitions of the time-partitioned tables and the times each holds (the default partition:
-- NULL, it holds what no other does), for DBAs checking maintenance.
CREATE VIEW partitions AS
SELECT parent.relname::text AS table_name, child.relname::text AS partition,
       CASE WHEN b[1] = 'MINVALUE' THEN '-infinity' ELSE btrim(b[1], '''') END::timestamptz AS range_start,
       CASE WHEN b[2] = 'MAXVALUE' THEN 'infinity' ELSE btrim(b[2], '''') END::timestamptz AS range_end,
       pg_total_relation_size(child.oid) AS bytes
FROM pg_inherits i
JOIN pg_class parent ON parent.oid = i.inhparent
JOIN pg_class child ON child.oid = i.inhrelid
CROSS JOIN LATERAL regexp_match(pg_get_expr(child.relpartbound, child.oid), '^FOR VALUES FROM \((.+)\) TO \((.+)\)$') AS b
WHERE parent.relnamespace = '@extschema@'::regnamespace AND parent.relkind = 'p'
ORDER BY 1, 3 NULLS LAST;
COMMENT ON VIEW partitions IS 'Partitions of clicks, deliveries and delivery_attempts: name, time range (NULL for the default partition) and size.';
