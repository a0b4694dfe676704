-- pg_linkhooks 0.4.0 → 0.5.0: nothing runs as the owner with a caller's search_path,
-- and columns the extension keeps are granted to no access level.
-- Every object here matches what a fresh 0.5.0 install creates; the system
-- test tests/system/test_upgrade.py compares the two catalogs.

-- The workers serve the extension only where a superuser owns its schema (a schema's owner may
-- put objects in it that code running as a superuser would use): one a DBA made before
-- CREATE EXTENSION becomes the superuser's running this update, as a fresh install's does.
DO $$
BEGIN
    IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_namespace n JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner
             WHERE n.oid = pg_catalog.to_regnamespace('@extschema@')) THEN
        EXECUTE 'ALTER SCHEMA @extschema@ OWNER TO CURRENT_USER';
    END IF;
END
$$;

-- Everything that runs as the owner pins search_path, pg_temp last.
ALTER FUNCTION links_trigger() SET search_path = pg_catalog, pg_temp;
-- (clicks_trigger pins it in its code: src/triggers/mod.rs)
ALTER FUNCTION conversions_trigger() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION campaigns_trigger() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION subscriptions_trigger() SET search_path = pg_catalog, pg_temp;
-- resolve and record_click run as the caller: resolve runs no SQL, record_click only the
-- plain INSERT a writer may run, and the click trigger does the rest as the owner.
ALTER FUNCTION resolve(text, text) SECURITY INVOKER;
-- record_click also gains idempotency_key: it is recreated, keeping who may call it.
CREATE TEMP TABLE linkhooks_record_click_grants AS
    SELECT a.grantee FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
     WHERE p.oid = 'linkhooks.record_click(text, inet, text, text, text, text, text, text, text)'::pg_catalog.regprocedure
       AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner;
DROP FUNCTION record_click(text, inet, text, text, text, text, text, text, text);
CREATE FUNCTION record_click(
    slug text, ip inet DEFAULT NULL, user_agent text DEFAULT NULL, referer text DEFAULT NULL,
    country text DEFAULT NULL, city text DEFAULT NULL, source text DEFAULT 'link',
    landing_url text DEFAULT NULL, domain text DEFAULT '', idempotency_key text DEFAULT NULL)
RETURNS text
VOLATILE PARALLEL UNSAFE LANGUAGE c
AS 'MODULE_PATHNAME', 'record_click_keyed_wrapper';
REVOKE ALL ON FUNCTION record_click(text, inet, text, text, text, text, text, text, text, text) FROM PUBLIC;
DO $$
DECLARE
    g pg_catalog.oid;
BEGIN
    FOR g IN SELECT grantee FROM pg_temp.linkhooks_record_click_grants LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION linkhooks.record_click(text, inet, text, text, text, '
                                  'text, text, text, text, text) TO %s',
            CASE WHEN g = 0 THEN 'PUBLIC' ELSE g::pg_catalog.regrole::pg_catalog.text END);
    END LOOP;
END
$$;
DROP TABLE pg_temp.linkhooks_record_click_grants;
ALTER FUNCTION send_test(bigint) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION replay(bigint) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION replay_dead_letters(bigint, timestamptz) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION rotate_secret(bigint, interval) SET search_path = pg_catalog, pg_temp;
-- A NULL argument is an error naming it, not a silent NULL.
ALTER FUNCTION send_test(bigint) CALLED ON NULL INPUT;
ALTER FUNCTION replay(bigint) CALLED ON NULL INPUT;
ALTER FUNCTION rotate_secret(bigint, interval) CALLED ON NULL INPUT;
ALTER FUNCTION run_maintenance() SET search_path = pg_catalog, pg_temp;

-- Access levels: column lists instead of whole tables where the extension keeps columns.
CREATE OR REPLACE FUNCTION access_privileges(access text) RETURNS SETOF text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF access = 'writer' THEN
        RETURN NEXT 'USAGE ON SCHEMA linkhooks';
        RETURN NEXT 'EXECUTE ON FUNCTION linkhooks.resolve(text, text), '
                    'linkhooks.record_click(text, inet, text, text, text, text, text, text, text, text), '
                    'linkhooks.record_click_returning(text, inet, text, text, text, text, text, text, text, text), '
                    'linkhooks.record_miss(text, text, text)';
        -- Enough to find a link's id for a plain INSERT of its click.
        RETURN NEXT 'SELECT (id, domain, slug) ON TABLE linkhooks.links';
        -- Every click column but id and event_id, which the extension makes (unique per event).
        RETURN NEXT 'INSERT (link_id, clicked_at, ip, user_agent, referer, country, city, source, landing_url, '
                    'device, browser, os, is_bot, utm) ON TABLE linkhooks.clicks';
        RETURN NEXT 'INSERT (click_id, link_id, name, amount, currency, occurred_at, metadata, external_id) '
                    'ON TABLE linkhooks.conversions';
        -- Enough for INSERT ... RETURNING id, event_id (to attribute conversions) and to find
        -- what an external id recorded, not to read clicks.
        RETURN NEXT 'SELECT (id, event_id) ON TABLE linkhooks.clicks';
        RETURN NEXT 'SELECT (id, event_id, external_id) ON TABLE linkhooks.conversions';
        -- record_click runs as the caller: it finds and keeps idempotency keys itself.
        RETURN NEXT 'SELECT, INSERT ON TABLE linkhooks.click_keys';
    ELSIF access = 'analyst' THEN
        RETURN NEXT 'USAGE ON SCHEMA linkhooks';
        RETURN NEXT 'SELECT ON TABLE linkhooks.links, linkhooks.campaigns, linkhooks.clicks, '
                    'linkhooks.conversions, linkhooks.delivery_attempts, '
                    'linkhooks.dead_letters, linkhooks.delivery_log, linkhooks.subscription_health, '
                    'linkhooks.click_facts, linkhooks.link_stats, linkhooks.link_daily_clicks, '
                    'linkhooks.link_click_breakdown, linkhooks.campaign_stats, linkhooks.rules, '
                    'linkhooks.link_counts, linkhooks.link_hours, linkhooks.uncounted_clicks, linkhooks.campaign_counts, linkhooks.link_milestones, linkhooks.link_misses, '
                    'linkhooks.link_minutes, linkhooks.campaign_minutes, linkhooks.threshold_state, linkhooks.digests, '
                    'linkhooks.link_health, linkhooks.country_minutes, linkhooks.subscription_minutes, '
                    'linkhooks.subscription_latencies, linkhooks.subscription_latency_hours';
        -- Every delivery column but the signature (valid for replay for minutes).
        RETURN NEXT 'SELECT (id, event_id, subscription_id, event_type, body, signed_at, status, attempts, '
                    'next_attempt_at, created_at, delivered_at, last_status_code, last_error) '
                    'ON TABLE linkhooks.deliveries';
        -- Every subscription column but the secrets and the URL (which may carry a token).
        RETURN NEXT 'SELECT (id, name, event_types, filters, ip_mode, signature_scheme, timeout_ms, max_attempts, '
                    'enabled, disabled_reason, consecutive_dead_letters, created_at, updated_at, paused, held_since) '
                    'ON TABLE linkhooks.subscriptions';
        RETURN NEXT 'EXECUTE ON FUNCTION linkhooks.worker_status()';
    ELSIF access = 'admin' THEN
        RETURN QUERY SELECT linkhooks.access_privileges('analyst');
        RETURN NEXT 'SELECT, INSERT, UPDATE, DELETE ON TABLE linkhooks.subscriptions';
        RETURN NEXT 'SELECT, DELETE ON TABLE linkhooks.links, linkhooks.campaigns';
        -- Links and campaigns minus what the extension keeps (redirect_url, counters, expired_at).
        RETURN NEXT 'INSERT (id, domain, slug, destination, campaign, tags, utm, expires_at, max_clicks, '
                    'expired_url, disabled, metadata, created_at) ON TABLE linkhooks.links';
        RETURN NEXT 'UPDATE (domain, slug, destination, campaign, tags, utm, expires_at, max_clicks, '
                    'expired_url, disabled, metadata) ON TABLE linkhooks.links';
        RETURN NEXT 'INSERT (name, click_goal, ends_at, completed_at), UPDATE (name, click_goal, ends_at, completed_at) '
                    'ON TABLE linkhooks.campaigns';
        RETURN NEXT 'EXECUTE ON FUNCTION linkhooks.resolve(text, text), linkhooks.send_test(bigint), '
                    'linkhooks.replay(bigint), linkhooks.replay_dead_letters(bigint, timestamptz), '
                    'linkhooks.rotate_secret(bigint, interval), linkhooks.run_maintenance(), '
                    'linkhooks.generate_secret(), linkhooks.retry_now(bigint, bigint), '
                    'linkhooks.recover(bigint, timestamptz, timestamptz)';
        -- Reactive-event rules (the extension keeps id and the timestamps).
        RETURN NEXT 'INSERT (kind, link_id, campaign, settings), UPDATE (kind, link_id, campaign, settings), DELETE '
                    'ON TABLE linkhooks.rules';
        RETURN NEXT 'EXECUTE ON FUNCTION linkhooks.run_aggregation()';
        -- Misses dealt with (a fixed typo in a printed link) may be cleared.
        RETURN NEXT 'DELETE ON TABLE linkhooks.link_misses';
        -- Dead letters an on-call engineer has dealt with may be cleared.
        RETURN NEXT 'DELETE ON TABLE linkhooks.dead_letters';
    ELSIF access = 'owner' THEN
        -- The role that installed the extension (given this by CREATE EXTENSION): the install
        -- is its own. pg_dump reads every row, a restore (with linkhooks.restore on) writes
        -- them as dumped, and it hands out levels.
        RETURN QUERY SELECT linkhooks.access_privileges('admin');
        RETURN NEXT 'SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA linkhooks';
        RETURN NEXT 'USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA linkhooks';
        RETURN NEXT 'EXECUTE ON FUNCTION linkhooks.grant_access(text, text), linkhooks.revoke_access(text, text)';
        RETURN NEXT 'SET ON PARAMETER linkhooks.restore';
    ELSE
        RAISE EXCEPTION 'invalid access: must be ''writer'', ''analyst'', ''admin'' or ''owner'' (got %)', coalesce(quote_literal(access), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;
COMMENT ON FUNCTION access_privileges(text) IS 'The privileges behind an access level (writer, analyst, admin, owner), as GRANT clauses.';

-- Grants or revokes one access level; returns the statements it ran.
CREATE OR REPLACE FUNCTION apply_access(action text, role_name text, access text) RETURNS SETOF text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    privilege text;
    statement text;
    part record;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = role_name) THEN
        RAISE EXCEPTION 'invalid role_name: role % does not exist', coalesce(quote_ident(role_name), 'NULL')
            USING ERRCODE = 'undefined_object';
    END IF;
    FOR privilege IN SELECT linkhooks.access_privileges(access) LOOP
        -- The privilege text is ours; the role name is quoted as an identifier.
        statement := CASE action WHEN 'grant' THEN format('GRANT %s TO %I', privilege, role_name)
                                 ELSE format('REVOKE %s FROM %I', privilege, role_name) END;
        EXECUTE statement;
        RETURN NEXT statement;
    END LOOP;
    -- Partitions carry their tables' grants (grant_as_parent): the change reaches them too.
    FOR part IN SELECT p.table_name, p.partition FROM linkhooks.partitions p LOOP
        IF action = 'revoke' THEN
            EXECUTE format('REVOKE ALL ON linkhooks.%I FROM %I', part.partition, role_name);
        END IF;
        PERFORM linkhooks.grant_as_parent(part.table_name, part.partition);
    END LOOP;
END
$$;
COMMENT ON FUNCTION apply_access(text, text, text) IS 'Shared body of grant_access and revoke_access.';

-- Gives a role an access level: writer, analyst, admin or owner. Runs as the extension's
-- objects' owner, so a non-superuser holding 'owner' can use it.
CREATE OR REPLACE FUNCTION grant_access(role_name text, access text) RETURNS SETOF text
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$ SELECT linkhooks.apply_access('grant', role_name, access) $$;
COMMENT ON FUNCTION grant_access(text, text) IS 'GRANTs an access level (writer, analyst, admin, owner) to a role; returns the statements run.';

-- Takes an access level away again.
CREATE OR REPLACE FUNCTION revoke_access(role_name text, access text) RETURNS SETOF text
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$ SELECT linkhooks.apply_access('revoke', role_name, access) $$;
COMMENT ON FUNCTION revoke_access(text, text) IS 'REVOKEs an access level from a role; returns the statements run.';

-- Roles granted a level before 0.5.0 hold whole-table privileges: narrow them to
-- the same columns a level grants now.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT c.relname, a.privilege_type, a.grantee::pg_catalog.regrole::text AS grantee, w.cols
          FROM pg_catalog.pg_class c
         CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
          JOIN (VALUES
                ('clicks', 'INSERT', 'link_id, clicked_at, ip, user_agent, referer, country, city, source, landing_url, '
                                     'device, browser, os, is_bot, utm'),
                ('conversions', 'INSERT', 'click_id, link_id, name, amount, currency, occurred_at, metadata'),
                ('deliveries', 'SELECT', 'id, event_id, subscription_id, event_type, body, signed_at, status, attempts, '
                                         'next_attempt_at, created_at, delivered_at, last_status_code, last_error'),
                ('links', 'INSERT', 'id, domain, slug, destination, campaign, tags, utm, expires_at, max_clicks, '
                                    'expired_url, disabled, metadata, created_at'),
                ('links', 'UPDATE', 'domain, slug, destination, campaign, tags, utm, expires_at, max_clicks, '
                                    'expired_url, disabled, metadata'),
                ('campaigns', 'INSERT', 'name, click_goal, ends_at, completed_at'),
                ('campaigns', 'UPDATE', 'name, click_goal, ends_at, completed_at')
               ) AS w (relname, privilege, cols) ON w.relname = c.relname AND w.privilege = a.privilege_type
         WHERE c.relnamespace = 'linkhooks'::pg_catalog.regnamespace
           AND a.grantee <> c.relowner AND a.grantee <> 0
    LOOP
        EXECUTE pg_catalog.format('REVOKE %s ON TABLE linkhooks.%I FROM %s', g.privilege_type, g.relname, g.grantee);
        EXECUTE pg_catalog.format('GRANT %s (%s) ON TABLE linkhooks.%I TO %s', g.privilege_type, g.cols, g.relname, g.grantee);
    END LOOP;
END
$$;

-- Logical-replication apply runs in replica role, where links' own triggers do not fire:
-- this one (REPLICA: it fires only there) makes every session on a subscriber drop its cached
-- links when a replicated change or TRUNCATE commits. It validates and emits nothing; the publisher did.
CREATE FUNCTION links_replicated_trigger() RETURNS trigger
LANGUAGE c
AS 'MODULE_PATHNAME', 'links_replicated_trigger_wrapper';
REVOKE ALL ON FUNCTION links_replicated_trigger() FROM PUBLIC;
ALTER FUNCTION links_replicated_trigger() SET search_path = pg_catalog, pg_temp;
CREATE TRIGGER links_replicated BEFORE INSERT OR UPDATE OR DELETE ON links
    FOR EACH ROW EXECUTE FUNCTION links_replicated_trigger();
CREATE TRIGGER links_replicated_truncate AFTER TRUNCATE ON links
    FOR EACH STATEMENT EXECUTE FUNCTION links_replicated_trigger();
ALTER TABLE links ENABLE REPLICA TRIGGER links_replicated;
ALTER TABLE links ENABLE REPLICA TRIGGER links_replicated_truncate;

-- worker_status() gains a state column: recreate it, keeping who may call it.
CREATE TEMP TABLE linkhooks_worker_status_grants AS
    SELECT a.grantee FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
     WHERE p.oid = 'linkhooks.worker_status()'::pg_catalog.regprocedure
       AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner;
DROP FUNCTION worker_status();
CREATE FUNCTION worker_status() RETURNS TABLE (
    running bool, pid int, database text, in_flight bigint,
    last_loop timestamptz, queue_depth bigint, state text)
STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'worker_status_wrapper';
REVOKE ALL ON FUNCTION worker_status() FROM PUBLIC;
ALTER FUNCTION worker_status() SET search_path = pg_catalog, pg_temp;
DO $$
DECLARE
    g pg_catalog.oid;
BEGIN
    FOR g IN SELECT grantee FROM pg_temp.linkhooks_worker_status_grants LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION linkhooks.worker_status() TO %s',
            CASE WHEN g = 0 THEN 'PUBLIC' ELSE g::pg_catalog.regrole::pg_catalog.text END);
    END LOOP;
END
$$;
DROP TABLE pg_temp.linkhooks_worker_status_grants;

-- Subscriptions can be paused by an admin; disabled or paused ones hold their events.
ALTER TABLE subscriptions ADD COLUMN paused boolean NOT NULL DEFAULT false;
ALTER TABLE subscriptions ADD COLUMN held_since timestamptz;

-- record_click_returning: record_click's answer plus the click's id and event id.
CREATE FUNCTION record_click_returning(
    slug text, ip inet DEFAULT NULL, user_agent text DEFAULT NULL, referer text DEFAULT NULL,
    country text DEFAULT NULL, city text DEFAULT NULL, source text DEFAULT 'link',
    landing_url text DEFAULT NULL, domain text DEFAULT '', idempotency_key text DEFAULT NULL)
RETURNS TABLE (url text, click_id bigint, event_id uuid)
VOLATILE PARALLEL UNSAFE LANGUAGE c
AS 'MODULE_PATHNAME', 'record_click_returning_wrapper';
REVOKE ALL ON FUNCTION record_click_returning(text, inet, text, text, text, text, text, text, text, text) FROM PUBLIC;

-- retry_now: makes pending deliveries due now.
CREATE FUNCTION retry_now(delivery_id bigint DEFAULT NULL, subscription_id bigint DEFAULT NULL) RETURNS bigint
VOLATILE SECURITY DEFINER LANGUAGE c AS 'MODULE_PATHNAME', 'retry_now_wrapper';
REVOKE ALL ON FUNCTION retry_now(bigint, bigint) FROM PUBLIC;
ALTER FUNCTION retry_now(bigint, bigint) SET search_path = pg_catalog, pg_temp;

-- recover: queues again what a subscription missed in a time range.
CREATE FUNCTION recover(subscription_id bigint, since timestamptz, until timestamptz DEFAULT NULL) RETURNS jsonb
VOLATILE SECURITY DEFINER LANGUAGE c AS 'MODULE_PATHNAME', 'recover_wrapper';
REVOKE ALL ON FUNCTION recover(bigint, timestamptz, timestamptz) FROM PUBLIC;
ALTER FUNCTION recover(bigint, timestamptz, timestamptz) SET search_path = pg_catalog, pg_temp;

-- Roles holding a level get what the level gained in 0.5.0: writers (who may call
-- record_click) the new function and a link's id by slug; analysts and admins (who
-- may call worker_status) the new subscription columns; admins (who may replay)
-- retry_now, recover and clearing dead letters.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT a.grantee::pg_catalog.regrole::pg_catalog.text AS grantee, p.proname
          FROM pg_catalog.pg_proc p CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) a
         WHERE p.oid IN ('linkhooks.record_click(text, inet, text, text, text, text, text, text, text, text)'::pg_catalog.regprocedure,
                         'linkhooks.replay(bigint)'::pg_catalog.regprocedure,
                         'linkhooks.worker_status()'::pg_catalog.regprocedure)
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0
    LOOP
        IF g.proname = 'record_click' THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION linkhooks.record_click_returning(text, inet, text, text, text, '
                                      'text, text, text, text, text) TO %s', g.grantee);
            EXECUTE pg_catalog.format('GRANT SELECT (id, domain, slug) ON TABLE linkhooks.links TO %s', g.grantee);
        ELSIF g.proname = 'worker_status' THEN
            EXECUTE pg_catalog.format('GRANT SELECT (paused, held_since) ON TABLE linkhooks.subscriptions TO %s', g.grantee);
        ELSE
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION linkhooks.retry_now(bigint, bigint), '
                                      'linkhooks.recover(bigint, timestamptz, timestamptz) TO %s', g.grantee);
            EXECUTE pg_catalog.format('GRANT DELETE ON TABLE linkhooks.dead_letters TO %s', g.grantee);
        END IF;
    END LOOP;
END
$$;

-- Reactive events: milestones counted by the aggregator from a durable cursor.

-- The inserting transaction's id (set by the clicks trigger), by which the aggregator finds
-- new clicks. Existing rows stay NULL (no rewrite) and are counted below.
ALTER TABLE clicks ADD COLUMN txid xid8;
CREATE INDEX clicks_txid ON clicks (txid);

CREATE TABLE rules (
    id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    kind        text NOT NULL,
    link_id     bigint,
    campaign    text,
    settings    jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE rules IS 'Rules for reactive events (milestones): one per kind and scope (link, campaign or everywhere).';
CREATE UNIQUE INDEX rules_scope ON rules (kind, link_id, campaign) NULLS NOT DISTINCT;

CREATE TABLE link_counts (
    link_id         bigint PRIMARY KEY,
    domain          text NOT NULL,   -- the link's domain, slug and campaign, kept by links_counted:
    slug            text NOT NULL,   -- link_stats reads this one table (joined with links, the
    campaign        text,            -- join took most of its time at 100k links)
    clicks          bigint NOT NULL DEFAULT 0,
    human_clicks    bigint NOT NULL DEFAULT 0,
    qr_scans        bigint NOT NULL DEFAULT 0,
    first_click_at  timestamptz,
    last_click_at   timestamptz,
    conversions     bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE link_counts IS 'One row per link: its domain, slug and campaign, and its clicks (all, non-bot, QR; first and last) and conversions counted by the aggregator, a second or so behind.';

CREATE TABLE link_hours (
    link_id       bigint NOT NULL,
    hour          timestamptz NOT NULL,
    clicks        bigint NOT NULL DEFAULT 0,
    human_clicks  bigint NOT NULL DEFAULT 0,
    qr_scans      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (link_id, hour)
);
COMMENT ON TABLE link_hours IS 'Clicks per link and hour counted by the aggregator (all, non-bot, QR).';

CREATE TABLE campaign_counts (
    campaign      text PRIMARY KEY,
    clicks        bigint NOT NULL DEFAULT 0,
    human_clicks  bigint NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE campaign_counts IS 'Clicks per campaign counted by the aggregator (all and non-bot).';

CREATE TABLE milestones (
    scope       text NOT NULL,
    link_id     bigint,
    campaign    text,
    counted     text NOT NULL,
    threshold   bigint NOT NULL,
    clicks      bigint NOT NULL,
    event_id    uuid NOT NULL,
    reached_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE milestones IS 'Milestones reached, one row each, ever; read them through link_milestones.';
CREATE UNIQUE INDEX milestones_once ON milestones (scope, link_id, campaign, counted, threshold) NULLS NOT DISTINCT;

CREATE TABLE click_cursor (
    single      boolean PRIMARY KEY DEFAULT true CHECK (single),
    snapshot    pg_snapshot NOT NULL,
    id_floor    bigint NOT NULL DEFAULT 0,
    conversion_id_floor bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE click_cursor IS 'Where the click aggregator is: the snapshot of its last run.';
-- Clicks recorded before the update are counted here, once; no milestone fires for them.
-- The cursor starts at this transaction's snapshot: clicks committed later carry a txid
-- (the ALTER TABLE above holds off concurrent clicks until this transaction commits).
INSERT INTO click_cursor (snapshot) VALUES (pg_current_snapshot());
-- Keeps each link's row in link_counts: made with the link, following its id, domain, slug and
-- campaign, removed with it (and all of them with a TRUNCATE). Not while a dump is restored
-- (linkhooks.restore, or replica role outside logical-replication apply): the dump brings the rows.
-- In apply (replica role too: why it is ALWAYS), links arrive from a publisher and get rows here.
CREATE FUNCTION link_counts_trigger() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pg_catalog.current_setting('linkhooks.restore', true) = 'on'
       OR (pg_catalog.current_setting('session_replication_role') = 'replica'
           AND (SELECT a.backend_type FROM pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid()) a)
               IS DISTINCT FROM 'logical replication worker') THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM @extschema@.link_counts;
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' OR OLD.id <> NEW.id THEN
        DELETE FROM @extschema@.link_counts WHERE link_id = OLD.id;
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND (OLD.id, OLD.domain, OLD.slug, OLD.campaign)
                                                 IS DISTINCT FROM (NEW.id, NEW.domain, NEW.slug, NEW.campaign)) THEN
        INSERT INTO @extschema@.link_counts AS k (link_id, domain, slug, campaign)
        VALUES (NEW.id, NEW.domain, NEW.slug, NEW.campaign)
        ON CONFLICT (link_id) DO UPDATE SET domain = excluded.domain, slug = excluded.slug, campaign = excluded.campaign;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER links_counted AFTER INSERT OR DELETE OR UPDATE OF id, domain, slug, campaign ON links
    FOR EACH ROW EXECUTE FUNCTION link_counts_trigger();
CREATE TRIGGER links_counted_truncate AFTER TRUNCATE ON links
    FOR EACH STATEMENT EXECUTE FUNCTION link_counts_trigger();
ALTER TABLE links ENABLE ALWAYS TRIGGER links_counted;
ALTER TABLE links ENABLE ALWAYS TRIGGER links_counted_truncate;
REVOKE ALL ON FUNCTION link_counts_trigger() FROM PUBLIC;
-- Every link gets its row in link_counts. The trigger first: creating it holds off link
-- writes until this transaction commits, so none is missed in between.
INSERT INTO link_counts (link_id, domain, slug, campaign) SELECT id, domain, slug, campaign FROM links;
UPDATE link_counts k
   SET clicks = c.clicks, human_clicks = c.human_clicks, qr_scans = c.qr_scans,
       first_click_at = c.first_click_at, last_click_at = c.last_click_at
  FROM (SELECT link_id, count(*) AS clicks, count(*) FILTER (WHERE is_bot IS NOT TRUE) AS human_clicks,
               count(*) FILTER (WHERE source = 'qr') AS qr_scans, min(clicked_at) AS first_click_at,
               max(clicked_at) AS last_click_at
          FROM clicks GROUP BY link_id) c
 WHERE c.link_id = k.link_id;
INSERT INTO link_hours (link_id, hour, clicks, human_clicks, qr_scans)
SELECT c.link_id, to_timestamp(floor(extract(epoch FROM c.clicked_at) / 3600) * 3600), count(*),
       count(*) FILTER (WHERE c.is_bot IS NOT TRUE), count(*) FILTER (WHERE c.source = 'qr')
  FROM clicks c JOIN links l ON l.id = c.link_id GROUP BY 1, 2;
INSERT INTO campaign_counts (campaign, clicks, human_clicks)
SELECT k.campaign, sum(k.clicks), sum(k.human_clicks)
  FROM link_counts k WHERE k.campaign IS NOT NULL AND k.clicks > 0 GROUP BY k.campaign;

-- link_stats and link_daily_clicks read the counts, plus the clicks not counted yet.
-- Clicks committed since the aggregator's last run, so not in link_counts and link_hours yet
-- (at most a second or so of clicks, found by their transaction ids): the views below add
-- them to those counts and are exact at any moment while reading only recent rows.
CREATE VIEW uncounted_clicks AS
SELECT c.id AS click_id, c.link_id, c.clicked_at, coalesce(c.is_bot, false) AS is_bot, c.source = 'qr' AS is_qr
FROM click_cursor k
JOIN clicks c ON c.txid >= pg_snapshot_xmin(k.snapshot)
             AND c.txid < pg_snapshot_xmax(pg_current_snapshot())
             AND NOT pg_visible_in_snapshot(c.txid, k.snapshot)
             AND c.id > k.id_floor;
COMMENT ON VIEW uncounted_clicks IS 'Clicks committed since the aggregator last counted (what the counted views add to their counts).';


-- Per link and day (in the session time zone, to the hour: link_hours are whole UTC hours).
CREATE OR REPLACE VIEW link_daily_clicks AS
SELECT link_id, day, sum(clicks)::bigint AS clicks, sum(human_clicks)::bigint AS human_clicks,
       sum(clicks - human_clicks)::bigint AS bot_clicks, sum(qr_scans)::bigint AS qr_scans
FROM (SELECT link_id, hour::date AS day, clicks, human_clicks, qr_scans FROM link_hours
      UNION ALL
      SELECT link_id, clicked_at::date, 1, (NOT is_bot)::int, is_qr::int FROM uncounted_clicks) x
GROUP BY link_id, day;
COMMENT ON VIEW link_daily_clicks IS 'Clicks per link per day: all, human, bot, QR.';

CREATE VIEW link_milestones AS
SELECT m.scope, m.link_id, l.domain, l.slug, coalesce(m.campaign, l.campaign) AS campaign,
       m.counted, m.threshold, m.clicks, m.reached_at, m.event_id
FROM milestones m
LEFT JOIN links l ON l.id = m.link_id
ORDER BY m.reached_at DESC;
COMMENT ON VIEW link_milestones IS 'Milestones reached (link.milestone, campaign.milestone): what fired, when, at which count.';

CREATE FUNCTION run_aggregation() RETURNS jsonb
STRICT VOLATILE SECURITY DEFINER LANGUAGE c AS 'MODULE_PATHNAME', 'run_aggregation_wrapper';
REVOKE ALL ON FUNCTION run_aggregation() FROM PUBLIC;
ALTER FUNCTION run_aggregation() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION run_aggregation() SET plan_cache_mode = force_custom_plan;
-- Nor compiled: with many partitions of clicks its reads can look costly enough to JIT, which
-- then takes seconds (the worker's own sessions run with jit off).
ALTER FUNCTION run_aggregation() SET jit = off;

CREATE FUNCTION rules_trigger() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'rules_trigger_wrapper';
REVOKE ALL ON FUNCTION rules_trigger() FROM PUBLIC;
ALTER FUNCTION rules_trigger() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
CREATE TRIGGER rules_validate BEFORE INSERT OR UPDATE ON rules
    FOR EACH ROW EXECUTE FUNCTION rules_trigger();

-- pg_dump dumps their contents (one call per statement: each updates pg_extension's row).
SELECT pg_catalog.pg_extension_config_dump('rules', '');
SELECT pg_catalog.pg_extension_config_dump('rules_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('link_counts', '');
SELECT pg_catalog.pg_extension_config_dump('link_hours', '');
SELECT pg_catalog.pg_extension_config_dump('campaign_counts', '');
SELECT pg_catalog.pg_extension_config_dump('milestones', '');
REVOKE ALL ON rules, link_counts, link_hours, campaign_counts, milestones, click_cursor, link_milestones,
    uncounted_clicks FROM PUBLIC;

-- Roles holding a level get what it gained: analysts (who may call worker_status) read
-- rules, counts and milestones; admins (who may replay) also write rules and may run the aggregator.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT a.grantee::pg_catalog.regrole::pg_catalog.text AS grantee, p.proname
          FROM pg_catalog.pg_proc p CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) a
         WHERE p.oid IN ('linkhooks.replay(bigint)'::pg_catalog.regprocedure,
                         'linkhooks.worker_status()'::pg_catalog.regprocedure)
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0
    LOOP
        IF g.proname = 'worker_status' THEN
            EXECUTE pg_catalog.format('GRANT SELECT ON TABLE linkhooks.rules, linkhooks.link_counts, linkhooks.link_hours, '
                'linkhooks.uncounted_clicks, '
                'linkhooks.campaign_counts, linkhooks.link_milestones TO %s', g.grantee);
        ELSE
            EXECUTE pg_catalog.format('GRANT INSERT (kind, link_id, campaign, settings), '
                'UPDATE (kind, link_id, campaign, settings), DELETE ON TABLE linkhooks.rules TO %s', g.grantee);
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION linkhooks.run_aggregation() TO %s', g.grantee);
        END IF;
    END LOOP;
END
$$;

-- Misses: requests that found no active link, counted per (domain, slug, reason).
CREATE TABLE link_misses (
    domain       text NOT NULL,
    slug         text NOT NULL,
    reason       text NOT NULL,
    count        bigint NOT NULL DEFAULT 1,
    first_seen   timestamptz NOT NULL DEFAULT now(),
    last_seen    timestamptz NOT NULL DEFAULT now(),
    notified_at  timestamptz,
    PRIMARY KEY (domain, slug, reason)
);
COMMENT ON TABLE link_misses IS 'Requests for unknown, expired, over-limit or disabled links, aggregated; link.miss fires from here.';
CREATE INDEX link_misses_pending ON link_misses (notified_at NULLS FIRST)
    WHERE notified_at IS NULL OR last_seen > notified_at;
SELECT pg_catalog.pg_extension_config_dump('link_misses', '');
REVOKE ALL ON link_misses FROM PUBLIC;

CREATE FUNCTION record_miss(slug text, domain text DEFAULT '', reason text DEFAULT 'unknown') RETURNS void
VOLATILE SECURITY DEFINER LANGUAGE c AS 'MODULE_PATHNAME', 'record_miss_wrapper';
REVOKE ALL ON FUNCTION record_miss(text, text, text) FROM PUBLIC;
ALTER FUNCTION record_miss(text, text, text) SET search_path = pg_catalog, pg_temp;

-- Ingestion idempotency: a caller's key per click, an external id per conversion.
CREATE TABLE click_keys (
    key         text PRIMARY KEY,
    click_id    bigint NOT NULL,
    event_id    uuid NOT NULL,
    link_id     bigint NOT NULL,                     -- the link the click was recorded for
    created_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE click_keys IS 'record_click idempotency keys and the click each recorded (kept for linkhooks.retention).';
-- Maintenance prunes keys older than linkhooks.retention.
CREATE INDEX click_keys_created ON click_keys (created_at);
SELECT pg_catalog.pg_extension_config_dump('click_keys', '');
REVOKE ALL ON click_keys FROM PUBLIC;
ALTER TABLE conversions ADD COLUMN external_id text;
CREATE UNIQUE INDEX conversions_external_id ON conversions (external_id) WHERE external_id IS NOT NULL;
ALTER TABLE conversions ADD COLUMN txid xid8;
CREATE INDEX conversions_txid ON conversions (txid);
-- Conversions recorded before the update are counted here, once (they have no txid).
UPDATE link_counts k SET conversions = v.n
  FROM (SELECT link_id, count(*) AS n FROM conversions GROUP BY link_id) v
 WHERE v.link_id = k.link_id;

-- Roles holding a level get what it gained: writers (who may call record_click) record_miss
-- and the idempotency keys; analysts (who may call worker_status) read misses; admins (who may replay) clear them.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT a.grantee::pg_catalog.regrole::pg_catalog.text AS grantee, p.proname
          FROM pg_catalog.pg_proc p CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) a
         WHERE p.oid IN ('linkhooks.record_click(text, inet, text, text, text, text, text, text, text, text)'::pg_catalog.regprocedure,
                         'linkhooks.replay(bigint)'::pg_catalog.regprocedure,
                         'linkhooks.worker_status()'::pg_catalog.regprocedure)
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0
    LOOP
        IF g.proname = 'record_click' THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION linkhooks.record_miss(text, text, text) TO %s', g.grantee);
            EXECUTE pg_catalog.format('GRANT SELECT, INSERT ON TABLE linkhooks.click_keys TO %s', g.grantee);
            EXECUTE pg_catalog.format('GRANT INSERT (external_id), SELECT (external_id) ON TABLE linkhooks.conversions TO %s', g.grantee);
        ELSIF g.proname = 'worker_status' THEN
            EXECUTE pg_catalog.format('GRANT SELECT ON TABLE linkhooks.link_misses TO %s', g.grantee);
        ELSE
            EXECUTE pg_catalog.format('GRANT DELETE ON TABLE linkhooks.link_misses TO %s', g.grantee);
        END IF;
    END LOOP;
END
$$;

-- link.threshold: clicks per minute while threshold rules exist, and the rules that fired.
CREATE TABLE link_minutes (
    minute        timestamptz NOT NULL,
    link_id       bigint NOT NULL,
    clicks        bigint NOT NULL DEFAULT 0,
    human_clicks  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, link_id)
);
COMMENT ON TABLE link_minutes IS 'Clicks per link and minute (recent minutes only, while a threshold rule exists).';
CREATE TABLE campaign_minutes (
    minute        timestamptz NOT NULL,
    campaign      text NOT NULL,
    clicks        bigint NOT NULL DEFAULT 0,
    human_clicks  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, campaign)
);
COMMENT ON TABLE campaign_minutes IS 'Clicks per campaign and minute (recent minutes only, while a threshold rule exists).';
CREATE TABLE threshold_state (
    rule_id      bigint NOT NULL,
    link_id      bigint,
    campaign     text,
    country      text,
    fired_at     timestamptz NOT NULL DEFAULT now(),
    event_id     uuid NOT NULL,
    below_since  timestamptz
);
COMMENT ON TABLE threshold_state IS 'Threshold rules that fired and wait to re-arm (a whole window below their count).';
CREATE UNIQUE INDEX threshold_state_subject ON threshold_state (rule_id, link_id, campaign, country) NULLS NOT DISTINCT;
SELECT pg_catalog.pg_extension_config_dump('threshold_state', '');
CREATE TABLE country_minutes (
    minute        timestamptz NOT NULL,
    link_id       bigint NOT NULL,
    country       text NOT NULL,
    campaign      text,
    human_clicks  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, link_id, country)
);
COMMENT ON TABLE country_minutes IS 'Human clicks per link, country and minute (recent minutes only, while a per_country spike rule exists).';
REVOKE ALL ON link_minutes, campaign_minutes, threshold_state, country_minutes FROM PUBLIC;

-- link.clicks.digest windows being filled.
CREATE TABLE digests (
    subscription_id  bigint NOT NULL,
    link_id          bigint NOT NULL,
    window_start     timestamptz NOT NULL,
    window_end       timestamptz NOT NULL,
    tally            jsonb NOT NULL,
    PRIMARY KEY (subscription_id, link_id, window_start)
);
COMMENT ON TABLE digests IS 'link.clicks.digest windows not sent yet (the aggregator sends each once it has ended).';
CREATE INDEX digests_ending ON digests (window_end);
SELECT pg_catalog.pg_extension_config_dump('digests', '');
REVOKE ALL ON digests FROM PUBLIC;

-- Destination health checks: one row per active link a health_check rule covers (its own or
-- its campaign's), kept by the worker: it adds and drops rows, checks the due ones and
-- queues link.broken / link.recovered when a status changes. Read it through link_health.
CREATE TABLE destination_checks (
    link_id        bigint PRIMARY KEY,
    url            text NOT NULL,                        -- what is checked: the destination with its UTM
    status         text NOT NULL DEFAULT 'unknown',      -- 'unknown', 'healthy' or 'broken'
    failures       integer NOT NULL DEFAULT 0,           -- failed checks since the last healthy one
    http_status    integer,                              -- the last answer's status; NULL when none came
    reason         text,                                 -- why the last check failed ('HTTP 503', a DNS or connection error)
    checked_at     timestamptz,                          -- when it was last checked
    status_since   timestamptz NOT NULL DEFAULT now(),   -- since when the status holds
    next_check_at  timestamptz NOT NULL DEFAULT now(),
    event_id       uuid                                  -- the last link.broken or link.recovered
);
COMMENT ON TABLE destination_checks IS 'Destination health of the links health_check rules cover; read it through link_health.';
-- The worker's claim: due checks, soonest first.
CREATE INDEX destination_checks_due ON destination_checks (next_check_at);

-- Destination health of checked links, broken first.
CREATE VIEW link_health AS
SELECT d.link_id, l.domain, l.slug, l.campaign, d.url, d.status, d.http_status, d.reason, d.failures,
       d.checked_at, d.status_since, d.next_check_at
FROM destination_checks d
JOIN links l ON l.id = d.link_id
ORDER BY d.status = 'broken' DESC, d.status_since;
COMMENT ON VIEW link_health IS 'Destination health checks (link.broken, link.recovered): each checked link''s status, last answer and reason.';
SELECT pg_catalog.pg_extension_config_dump('destination_checks', '');
REVOKE ALL ON destination_checks, link_health FROM PUBLIC;

-- subscription_health reads per-minute rollups (issue 18) instead of a day of the delivery log.

-- The latency bucket the rollups count a delivery in (src/latency.rs); a pure helper anyone may call.
CREATE FUNCTION latency_bucket(ms double precision) RETURNS smallint
IMMUTABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'latency_bucket_wrapper';
REVOKE ALL ON FUNCTION latency_bucket(double precision) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION latency_bucket(double precision) TO PUBLIC;

-- Attempts and 2xx answers per subscription and UTC minute, counted by the worker from
-- delivery_attempts: subscription_health reads these (a day is 1,440 rows per subscription,
-- whatever the traffic), not the delivery log.
CREATE TABLE subscription_minutes (
    subscription_id bigint NOT NULL,
    minute          timestamptz NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    succeeded       integer NOT NULL DEFAULT 0,   -- attempts answered 2xx
    PRIMARY KEY (subscription_id, minute)
);
COMMENT ON TABLE subscription_minutes IS 'Attempts and 2xx answers per subscription and minute (last 25 hours); read it through subscription_health.';
-- Maintenance drops minutes older than 25 hours.
CREATE INDEX subscription_minutes_minute ON subscription_minutes (minute);

-- How far subscription_minutes has counted delivery_attempts (one row, made by the worker's first
-- count; none means nothing counted yet): the worker folds newer attempts in about once a second,
-- and subscription_health adds the ones not folded in yet. Dumped with the attempts it counted.
CREATE TABLE attempt_cursor (
    single      boolean PRIMARY KEY DEFAULT true CHECK (single),
    counted_id  bigint NOT NULL DEFAULT 0   -- attempts up to this id are in subscription_minutes and the latencies
);
COMMENT ON TABLE attempt_cursor IS 'Where subscription_minutes and the latency rollups have counted delivery_attempts up to.';

-- Deliveries per subscription, UTC minute of the delivering attempt and latency bucket (creation
-- to delivery), folded in from delivery_attempts with subscription_minutes: bucket 0 is under
-- 0.1 ms, bucket b >= 1 from 0.1 ms * 1.1^(b-1) up to 0.1 ms * 1.1^b (latency_bucket()).
-- Summed, the deliveries per minute.
CREATE TABLE subscription_latencies (
    subscription_id bigint NOT NULL,
    minute          timestamptz NOT NULL,
    bucket          smallint NOT NULL,
    deliveries      integer NOT NULL,
    PRIMARY KEY (subscription_id, minute, bucket)
);
COMMENT ON TABLE subscription_latencies IS 'Deliveries per subscription, minute and latency bucket (last 25 hours), behind subscription_health''s percentiles.';
-- Maintenance drops minutes older than 25 hours.
CREATE INDEX subscription_latencies_minute ON subscription_latencies (minute);

-- The same per UTC hour, folded in by the same statement: subscription_health's day reads its
-- whole hours here and only its first and last hour by the minute (a bucket's row per minute
-- made a day about 700k rows for 10 subscriptions).
CREATE TABLE subscription_latency_hours (
    subscription_id bigint NOT NULL,
    hour            timestamptz NOT NULL,
    bucket          smallint NOT NULL,
    deliveries      bigint NOT NULL,
    PRIMARY KEY (subscription_id, hour, bucket)
);
COMMENT ON TABLE subscription_latency_hours IS 'Deliveries per subscription, hour and latency bucket (last 25 hours), behind subscription_health''s percentiles for the day.';
-- Maintenance drops hours older than 25 hours.
CREATE INDEX subscription_latency_hours_hour ON subscription_latency_hours (hour);

-- The last 25 hours of the log, counted as the worker counts from now on (buckets as in
-- src/latency.rs); the cursor starts after the attempts counted here.
INSERT INTO attempt_cursor (counted_id) SELECT coalesce(pg_catalog.max(id), 0) FROM delivery_attempts;
INSERT INTO subscription_minutes (subscription_id, minute, attempts, succeeded)
SELECT subscription_id, pg_catalog.date_trunc('minute', started_at, 'UTC'), pg_catalog.count(*),
       pg_catalog.count(*) FILTER (WHERE status_code BETWEEN 200 AND 299)
  FROM delivery_attempts
 WHERE started_at >= pg_catalog.now() - interval '25 hours' AND subscription_id IS NOT NULL
 GROUP BY 1, 2;
WITH d AS (
    SELECT subscription_id, pg_catalog.date_trunc('minute', delivered_at, 'UTC') AS minute,
           pg_catalog.date_part('epoch', delivered_at - created_at) * 1000 AS ms
      FROM deliveries
     WHERE status = 'delivered' AND delivered_at >= pg_catalog.now() - interval '25 hours')
INSERT INTO subscription_latencies (subscription_id, minute, bucket, deliveries)
SELECT subscription_id, minute, latency_bucket(coalesce(ms, 0)), pg_catalog.count(*)
  FROM d GROUP BY 1, 2, 3;
INSERT INTO subscription_latency_hours (subscription_id, hour, bucket, deliveries)
SELECT subscription_id, pg_catalog.date_trunc('hour', minute, 'UTC'), bucket, pg_catalog.sum(deliveries)
  FROM subscription_latencies GROUP BY 1, 2, 3;

-- TRUNCATE of delivery_attempts starts the ids again, and the worker's count of them with it.
CREATE FUNCTION reset_attempt_cursor() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE linkhooks.attempt_cursor SET counted_id = 0;
    RETURN NULL;
END
$$;
-- (its trigger on delivery_attempts, and subscription_health reading the attempts past the
-- cursor, are made with the partitioned delivery_attempts below)

SELECT pg_catalog.pg_extension_config_dump('subscription_minutes', '');
SELECT pg_catalog.pg_extension_config_dump('subscription_latencies', '');
SELECT pg_catalog.pg_extension_config_dump('subscription_latency_hours', '');
SELECT pg_catalog.pg_extension_config_dump('attempt_cursor', '');
REVOKE ALL ON subscription_minutes, subscription_latencies, subscription_latency_hours, attempt_cursor FROM PUBLIC;
REVOKE ALL ON FUNCTION reset_attempt_cursor() FROM PUBLIC;

-- Roles holding the analyst level (they may call worker_status) read the reactive-event and
-- health tables and views added above.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT a.grantee::pg_catalog.regrole::pg_catalog.text AS grantee
          FROM pg_catalog.pg_proc p CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) a
         WHERE p.oid = 'linkhooks.worker_status()'::pg_catalog.regprocedure
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0
    LOOP
        EXECUTE pg_catalog.format('GRANT SELECT ON TABLE linkhooks.link_minutes, linkhooks.campaign_minutes, '
            'linkhooks.threshold_state, linkhooks.country_minutes, linkhooks.digests, linkhooks.link_health, '
            'linkhooks.subscription_minutes, linkhooks.subscription_latencies, linkhooks.subscription_latency_hours '
            'TO %s', g.grantee);
    END LOOP;
END
$$;

-- clicks becomes partitioned by time (issue 18). The rows written so far stay where they
-- are: the old table becomes the partition clicks_history with its indexes, and maintenance
-- makes the partitions after it. Every row, id and event id is kept, and the identity
-- sequence carries on where it was.
-- Moves an old table under its partitioned successor: who held privileges on the old table
-- holds them on the partitioned one (where rows are read and written) and no longer on the
-- partition; then the old rows become the first partition, holding all time up to the end of
-- today (or of the latest row). An empty old table is dropped instead.
CREATE FUNCTION pg_temp.linkhooks_adopt(old text, new text, key text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    grant_ record;
    bound timestamptz;
BEGIN
    FOR grant_ IN
        SELECT a.grantee::pg_catalog.regrole::pg_catalog.text AS grantee, a.privilege_type, NULL::text AS column_name
          FROM pg_catalog.pg_class c CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
         WHERE c.oid = pg_catalog.format('linkhooks.%I', old)::pg_catalog.regclass
           AND a.grantee <> c.relowner AND a.grantee <> 0
        UNION ALL
        SELECT a.grantee::pg_catalog.regrole::pg_catalog.text, a.privilege_type, pg_catalog.quote_ident(t.attname)
          FROM pg_catalog.pg_attribute t JOIN pg_catalog.pg_class c ON c.oid = t.attrelid
         CROSS JOIN LATERAL pg_catalog.aclexplode(t.attacl) a
         WHERE t.attrelid = pg_catalog.format('linkhooks.%I', old)::pg_catalog.regclass
           AND a.grantee <> c.relowner AND a.grantee <> 0
    LOOP
        EXECUTE pg_catalog.format('GRANT %s %s ON TABLE linkhooks.%I TO %s', grant_.privilege_type,
                                  '(' || grant_.column_name || ')', new, grant_.grantee);
        EXECUTE pg_catalog.format('REVOKE ALL ON TABLE linkhooks.%I FROM %s', old, grant_.grantee);
    END LOOP;
    EXECUTE pg_catalog.format('SELECT pg_catalog.max(%I) FROM linkhooks.%I', key, old) INTO bound;
    IF bound = 'infinity' THEN
        RAISE EXCEPTION 'linkhooks.% has rows with % = infinity, which no partition can hold', new, key
            USING HINT = pg_catalog.format('Give them a time (UPDATE linkhooks.%I SET %I = ... WHERE %I = ''infinity''), then update again.',
                                           new, key, key),
                  ERRCODE = 'invalid_parameter_value';
    ELSIF bound IS NULL THEN
        EXECUTE pg_catalog.format('DROP TABLE linkhooks.%I', old);
    ELSE
        EXECUTE pg_catalog.format('ALTER TABLE linkhooks.%I ATTACH PARTITION linkhooks.%I FOR VALUES FROM (MINVALUE) TO (%L)',
                                  new, old, GREATEST(pg_catalog.date_trunc('day', pg_catalog.now(), 'UTC') + interval '1 day',
                                                     bound + interval '1 microsecond'));
    END IF;
END
$$;
CREATE TEMP TABLE linkhooks_clicks_sequence AS SELECT last_value, is_called FROM clicks_id_seq;
ALTER EXTENSION pg_linkhooks DROP SEQUENCE clicks_id_seq;
ALTER EXTENSION pg_linkhooks DROP TABLE clicks;
ALTER TABLE clicks RENAME TO clicks_history;
ALTER TABLE clicks_history ALTER COLUMN id DROP IDENTITY;
ALTER TABLE clicks_history RENAME CONSTRAINT clicks_pkey TO clicks_history_pkey;
ALTER INDEX clicks_link_time RENAME TO clicks_history_link_time;
ALTER INDEX clicks_txid RENAME TO clicks_history_txid;
DROP TRIGGER clicks_events ON clicks_history;
CREATE TABLE clicks (
    id          bigint GENERATED BY DEFAULT AS IDENTITY,
    event_id    uuid NOT NULL,  -- default uuidv7(), set in finalize.sql
    link_id     bigint NOT NULL,
    clicked_at  timestamptz NOT NULL DEFAULT now(),
    ip          inet,
    user_agent  text,
    referer     text,
    country     text,
    city        text,
    source      text NOT NULL DEFAULT 'link',
    landing_url text,
    device      text,
    browser     text,
    os          text,
    is_bot      boolean,
    utm         jsonb,
    txid        xid8
) PARTITION BY RANGE (clicked_at);
COMMENT ON TABLE clicks IS 'Clicks. INSERT emits link.clicked (source link) or qr.scanned (source qr).';
ALTER TABLE clicks ALTER COLUMN event_id SET DEFAULT uuidv7();
SELECT pg_catalog.setval('clicks_id_seq', last_value, is_called) FROM pg_temp.linkhooks_clicks_sequence;
DROP TABLE pg_temp.linkhooks_clicks_sequence;
-- On UPDATE it marks the row, so that moving it to another day's partition emits nothing again.
CREATE TRIGGER clicks_events BEFORE INSERT OR UPDATE ON clicks
    FOR EACH ROW EXECUTE FUNCTION clicks_trigger();
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
REVOKE ALL ON FUNCTION click_cursor_xmin() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION click_cursor_xmin() TO PUBLIC;
-- numeric division (`/` itself, numeric_div) that the planner counts as costly, so a query's
-- ORDER BY … LIMIT computes it only for the rows it returns, not for every row it sorts (for
-- link_stats' conversion_rate over 100k links, 15 ms of a top 10). Pure: PUBLIC may call it.
CREATE FUNCTION ratio(numeric, numeric) RETURNS numeric
LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE COST 100 AS 'numeric_div';
REVOKE ALL ON FUNCTION ratio(numeric, numeric) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ratio(numeric, numeric) TO PUBLIC;

-- Per link: clicks (humans, bots, QR), first and last click, conversions and conversion rate:
-- the aggregator's counts (with the link's domain, slug and campaign: one row per link) plus
-- the clicks and conversions it has not counted yet.
CREATE OR REPLACE VIEW link_stats AS
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
-- The views that read clicks itself follow it to the new table.
CREATE OR REPLACE VIEW uncounted_clicks AS
SELECT c.id AS click_id, c.link_id, c.clicked_at, coalesce(c.is_bot, false) AS is_bot, c.source = 'qr' AS is_qr
FROM clicks c
WHERE c.txid >= click_cursor_xmin()
  AND c.txid < pg_snapshot_xmax(pg_current_snapshot())
  AND NOT pg_visible_in_snapshot(c.txid, (SELECT k.snapshot FROM click_cursor k))
  AND c.id > (SELECT k.id_floor FROM click_cursor k);
CREATE OR REPLACE VIEW click_facts AS
SELECT c.id AS click_id, c.link_id, c.clicked_at, coalesce(c.is_bot, false) AS is_bot, c.source = 'qr' AS is_qr,
       coalesce(lower(substring(c.referer FROM '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?([^/?#:]+)')), '(direct)') AS referrer,
       coalesce(c.country, '(unknown)') AS country, coalesce(c.device, 'unknown') AS device,
       coalesce(c.browser, '(unknown)') AS browser, coalesce(c.os, '(unknown)') AS os, c.source
FROM clicks c;
SELECT pg_temp.linkhooks_adopt('clicks_history', 'clicks', 'clicked_at');

-- deliveries likewise, the old table becoming deliveries_history: the worker claims and sends
-- its pending rows as before, and retention moves what it must keep when it detaches it.
CREATE TEMP TABLE linkhooks_deliveries_sequence AS SELECT last_value, is_called FROM deliveries_id_seq;
ALTER EXTENSION pg_linkhooks DROP SEQUENCE deliveries_id_seq;
ALTER EXTENSION pg_linkhooks DROP TABLE deliveries;
ALTER TABLE deliveries RENAME TO deliveries_history;
ALTER TABLE deliveries_history ALTER COLUMN id DROP IDENTITY;
ALTER TABLE deliveries_history RENAME CONSTRAINT deliveries_pkey TO deliveries_history_pkey;
ALTER INDEX deliveries_due RENAME TO deliveries_history_due;
ALTER INDEX deliveries_event RENAME TO deliveries_history_event;
ALTER INDEX deliveries_delivered RENAME TO deliveries_history_delivered;
CREATE TABLE deliveries (
    id               bigint GENERATED BY DEFAULT AS IDENTITY,
    event_id         uuid NOT NULL,
    subscription_id  bigint NOT NULL,
    event_type       text NOT NULL,
    body             text NOT NULL,
    signed_at        bigint NOT NULL,
    signature        text NOT NULL,
    status           text NOT NULL DEFAULT 'pending',
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    last_status_code integer,
    last_error       text
) PARTITION BY RANGE (created_at);
SELECT pg_catalog.setval('deliveries_id_seq', last_value, is_called) FROM pg_temp.linkhooks_deliveries_sequence;
DROP TABLE pg_temp.linkhooks_deliveries_sequence;
CREATE OR REPLACE VIEW delivery_log AS
SELECT d.id AS delivery_id, d.event_id, d.subscription_id, s.name AS subscription_name, d.event_type,
       d.status, d.attempts, d.last_status_code, d.last_error, d.created_at, d.delivered_at,
       d.next_attempt_at, d.delivered_at - d.created_at AS latency,
       round((extract(epoch FROM d.delivered_at - d.created_at) * 1000)::numeric, 1) AS latency_ms
FROM deliveries d
LEFT JOIN subscriptions s ON s.id = d.subscription_id;
-- Deliveries whose time no partition covers, and the unfinished ones retention keeps when it
-- detaches their day (keep_unfinished_deliveries); the template of every partition's keys and indexes.
CREATE TABLE deliveries_default PARTITION OF deliveries (PRIMARY KEY (id)) DEFAULT;
COMMENT ON TABLE deliveries_default IS 'Deliveries outside every dated partition of deliveries, and those retention kept (see maintain_partitions).';
-- The worker's claim: each subscription's due rows in order, small because finished rows leave it.
CREATE INDEX deliveries_default_due ON deliveries_default (subscription_id, next_attempt_at) WHERE status IN ('pending', 'delivering');
-- "Did event X arrive?"
CREATE INDEX deliveries_default_event ON deliveries_default (event_id);
-- Retention of delivered rows kept here.
CREATE INDEX deliveries_default_delivered ON deliveries_default (delivered_at) WHERE status = 'delivered';

-- delivery_attempts likewise, the old table becoming delivery_attempts_history.
CREATE TEMP TABLE linkhooks_attempts_sequence AS SELECT last_value, is_called FROM delivery_attempts_id_seq;
ALTER EXTENSION pg_linkhooks DROP SEQUENCE delivery_attempts_id_seq;
ALTER EXTENSION pg_linkhooks DROP TABLE delivery_attempts;
ALTER TABLE delivery_attempts RENAME TO delivery_attempts_history;
ALTER TABLE delivery_attempts_history ALTER COLUMN id DROP IDENTITY;
ALTER TABLE delivery_attempts_history RENAME CONSTRAINT delivery_attempts_pkey TO delivery_attempts_history_pkey;
ALTER INDEX delivery_attempts_delivery RENAME TO delivery_attempts_history_delivery;
ALTER INDEX delivery_attempts_started RENAME TO delivery_attempts_history_started;
ALTER TABLE delivery_attempts_history ADD COLUMN latency_ms double precision;
CREATE TABLE delivery_attempts (
    id               bigint GENERATED BY DEFAULT AS IDENTITY,
    delivery_id      bigint NOT NULL,
    attempt          integer NOT NULL,
    started_at       timestamptz NOT NULL,
    duration_ms      double precision NOT NULL,
    status_code      integer,
    error            text,
    response_excerpt text,
    subscription_id  bigint,  -- (0.2.0) the delivery's subscription, so health needs no join
    latency_ms       double precision  -- (0.5.0) for the attempt that delivered: creation to its 2xx answer
) PARTITION BY RANGE (started_at);
SELECT pg_catalog.setval('delivery_attempts_id_seq', last_value, is_called) FROM pg_temp.linkhooks_attempts_sequence;
DROP TABLE pg_temp.linkhooks_attempts_sequence;
CREATE TRIGGER delivery_attempts_truncated AFTER TRUNCATE ON delivery_attempts
    FOR EACH STATEMENT EXECUTE FUNCTION reset_attempt_cursor();
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
REVOKE ALL ON FUNCTION attempt_cursor_id() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION attempt_cursor_id() TO PUBLIC;
CREATE OR REPLACE VIEW subscription_health AS
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
-- (deliveries' after subscription_health, which read the old table, reads the new one.)
SELECT pg_temp.linkhooks_adopt('deliveries_history', 'deliveries', 'created_at');
SELECT pg_temp.linkhooks_adopt('delivery_attempts_history', 'delivery_attempts', 'started_at');
DROP FUNCTION pg_temp.linkhooks_adopt(text, text, text);

-- Attempts whose time no partition covers, as clicks_default for clicks; the template of
-- every partition's keys and indexes.
CREATE TABLE delivery_attempts_default PARTITION OF delivery_attempts (PRIMARY KEY (id)) DEFAULT;
COMMENT ON TABLE delivery_attempts_default IS 'Attempts outside every dated partition of delivery_attempts (see maintain_partitions).';
-- Attempts of one delivery.
CREATE INDEX delivery_attempts_default_delivery ON delivery_attempts_default (delivery_id);
-- Reads of attempts by time.
CREATE INDEX delivery_attempts_default_started ON delivery_attempts_default (started_at);

-- Clicks whose time no partition covers (imports of old clicks, or before maintenance first
-- ran) land here, so no click is ever refused; maintenance moves them when it makes their partition.
-- Its keys and indexes are the template of every partition's.
CREATE TABLE clicks_default PARTITION OF clicks (PRIMARY KEY (id)) DEFAULT;
COMMENT ON TABLE clicks_default IS 'Clicks outside every dated partition of clicks (see maintain_partitions).';
-- Per-link analytics scan clicks by link and time.
CREATE INDEX clicks_default_link_time ON clicks_default (link_id, clicked_at);
-- The aggregator's read: clicks by transaction id, from its cursor on.
CREATE INDEX clicks_default_txid ON clicks_default (txid);

-- Gives a new partition the grants of its table: the roles given access levels (the owner's
-- pg_dump above all) read and write it as they do the table. Made after the levels were given,
-- it is not among the tables those GRANTs covered.
CREATE FUNCTION grant_as_parent(table_name text, partition text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    statement text;
BEGIN
    FOR statement IN
        SELECT format('GRANT %s ON @extschema@.%I TO %s', a.privilege_type, partition, a.grantee::regrole)
          FROM pg_class c, aclexplode(c.relacl) a
         WHERE c.oid = format('@extschema@.%I', table_name)::regclass AND a.grantee <> 0
    LOOP
        EXECUTE statement;
    END LOOP;
END
$$;

-- Keeps the partitions of clicks, deliveries or delivery_attempts (docs/operations.md, "Partitions
-- and retention"), in this order: drops the tables it detached in an earlier run; deletes rows
-- older than as_of - keep from the default partition (keep NULL: keep every row; deliveries:
-- none, maintenance prunes them); gives each row left there before the newest partition and
-- not older than as_of - keep a partition of its own time; makes partitions up to three widths
-- ahead of as_of; and last detaches the partitions wholly older than as_of - keep, renamed
-- <partition>_expired (of deliveries, first moving the rows retention keeps into the default
-- partition: keep_unfinished_deliveries). Partitions are UTC-aligned, take the default
-- partition's keys and indexes, and take in the rows it holds for them.
-- Detaching takes a lock that the table's inserts conflict with until the caller commits, so
-- it comes last, waits at most lock_timeout (a step that times out waits for the next run),
-- and removing the files, which takes time in proportion to their size, is left to the next
-- run, when the table is no longer a partition. The worker's maintenance calls it last, with
-- now(), linkhooks.partition_interval and linkhooks.click_retention or linkhooks.retention.
CREATE FUNCTION maintain_partitions(table_name text, as_of timestamptz, width interval, keep interval)
RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET lock_timeout = '100ms' AS $$
DECLARE
    origin CONSTANT timestamptz := '2000-01-01 00:00:00+00';
    key text := CASE table_name WHEN 'clicks' THEN 'clicked_at' WHEN 'delivery_attempts' THEN 'started_at'
                                WHEN 'deliveries' THEN 'created_at' END;
    default_partition text := table_name || '_default';
    columns text;
    kept bigint := 0;
    moving boolean;
    frontier timestamptz;
    oldest timestamptz;
    range_start timestamptz;
    range_end timestamptz;
    part record;
    partition text;
    created integer := 0;
    detached integer := 0;
    removed integer := 0;
    busy integer := 0;
    pruned bigint := 0;
BEGIN
    IF key IS NULL OR as_of IS NULL OR width IS NULL OR width < interval '1 minute' OR keep < interval '0' THEN
        RAISE EXCEPTION 'maintain_partitions: table_name must be clicks, deliveries or delivery_attempts, as_of is required, '
                        'width must be at least 1 minute and keep not negative'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A table handed over to pg_partman (use_pg_partman) is its to keep.
    IF @extschema@.partitions_managed_by_pg_partman(table_name) THEN
        RETURN jsonb_build_object('managed_by', 'pg_partman');
    END IF;
    -- One run per table at a time (the housekeeper's, an admin's): another finds the lock taken and skips.
    -- The lock is on the parent alone (SHARE UPDATE EXCLUSIVE: writers and readers pass), which only a
    -- role that may update the table can take, not an advisory lock any role could hold forever.
    BEGIN
        EXECUTE format('LOCK TABLE ONLY @extschema@.%I IN SHARE UPDATE EXCLUSIVE MODE NOWAIT', table_name);
    EXCEPTION WHEN lock_not_available THEN
        RETURN jsonb_build_object('partitions_created', 0, 'partitions_dropped', 0, 'expired_removed', 0,
                                  'rows_pruned', 0, 'partitions_busy', 1);
    END;
    FOR part IN SELECT c.relname FROM pg_class c
                 WHERE c.relnamespace = '@extschema@'::regnamespace AND c.relkind = 'r' AND NOT c.relispartition
                   AND starts_with(c.relname, table_name || '_') AND c.relname LIKE '%\_expired' LOOP
        BEGIN
            EXECUTE format('DROP TABLE @extschema@.%I', part.relname);
            removed := removed + 1;
        EXCEPTION WHEN lock_not_available THEN
            busy := busy + 1; -- a reader (a pg_dump) holds it: a later run drops it
        END;
    END LOOP;
    -- The default partition of deliveries holds what retention kept: maintenance prunes it by status.
    IF keep IS NOT NULL AND table_name <> 'deliveries' THEN
        EXECUTE format('DELETE FROM @extschema@.%I WHERE %I < $1', default_partition, key) USING as_of - keep;
        GET DIAGNOSTICS pruned = ROW_COUNT;
    END IF;

    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO columns
      FROM pg_attribute a
     WHERE a.attrelid = format('@extschema@.%I', table_name)::regclass AND a.attnum > 0 AND NOT a.attisdropped;
    SELECT max(p.range_end) INTO frontier FROM @extschema@.partitions p WHERE p.table_name = maintain_partitions.table_name;
    -- Partitions ahead start at the current one: a gap behind it (maintenance did not run) gets
    -- partitions only where rows are.
    IF frontier IS NULL OR frontier < date_bin(width, as_of, origin) THEN
        frontier := date_bin(width, as_of, origin);
    END IF;
    LOOP
        -- First the oldest row in the default partition that no partition covers (and retention
        -- keeps), its partition bounded by its neighbours'; then the partitions ahead.
        EXECUTE format('SELECT min(%I) FROM @extschema@.%I WHERE %I < $1 AND %I >= $2 AND isfinite(%I)',
                       key, default_partition, key, key, key)
            INTO oldest USING frontier, coalesce(as_of - keep, '-infinity');
        IF oldest IS NOT NULL THEN
            range_start := GREATEST(date_bin(width, oldest, origin),
                                    (SELECT max(p.range_end) FROM @extschema@.partitions p
                                      WHERE p.table_name = maintain_partitions.table_name AND p.range_end <= oldest));
            range_end := LEAST(date_bin(width, oldest, origin) + width,
                               (SELECT min(p.range_start) FROM @extschema@.partitions p
                                 WHERE p.table_name = maintain_partitions.table_name AND p.range_start > oldest));
        ELSIF frontier < as_of + 3 * width THEN
            range_start := frontier;
            range_end := date_bin(width, frontier, origin) + width;
            frontier := range_end;
        ELSE
            EXIT;
        END IF;
        EXIT WHEN created >= 100;
        partition := table_name || '_p' || to_char(range_start AT TIME ZONE 'UTC', 'YYYYMMDD"_"HH24MISS');
        BEGIN
            -- An INSERT routed to the default partition before the ATTACH would fail its
            -- constraint after it: inserts finish first, and new ones wait for this commit.
            EXECUTE format('LOCK TABLE @extschema@.%I IN SHARE MODE', table_name);
            -- Rows moving out of the default partition: a query planned with the partitions
            -- as they were, whose snapshot then sees the move, would find them in neither place.
            -- Readers wait for this commit too (and plan again, with the new partition).
            EXECUTE format('SELECT EXISTS (SELECT FROM @extschema@.%I WHERE %I >= $1 AND %I < $2)', default_partition, key, key)
                INTO moving USING range_start, range_end;
            IF moving THEN
                EXECUTE format('LOCK TABLE @extschema@.%I IN ACCESS EXCLUSIVE MODE', table_name);
            END IF;
            EXECUTE format('CREATE TABLE @extschema@.%I (LIKE @extschema@.%I INCLUDING INDEXES)', partition, default_partition);
            PERFORM @extschema@.grant_as_parent(table_name, partition);
            EXECUTE format('WITH moved AS (DELETE FROM @extschema@.%I WHERE %I >= $1 AND %I < $2 RETURNING %s) '
                           'INSERT INTO @extschema@.%I (%s) SELECT %s FROM moved',
                           default_partition, key, key, columns, partition, columns, columns) USING range_start, range_end;
            EXECUTE format('ALTER TABLE @extschema@.%I ATTACH PARTITION @extschema@.%I FOR VALUES FROM (%L) TO (%L)',
                           table_name, partition, range_start, range_end);
            created := created + 1;
        EXCEPTION WHEN lock_not_available THEN
            busy := busy + 1;
            EXIT;
        END;
    END LOOP;

    FOR part IN SELECT p.partition FROM @extschema@.partitions p
                 WHERE p.table_name = maintain_partitions.table_name AND p.range_end <= as_of - keep
                 ORDER BY p.range_end LOOP
        BEGIN
            EXECUTE format('ALTER TABLE @extschema@.%I DETACH PARTITION @extschema@.%I', table_name, part.partition);
            EXECUTE format('ALTER TABLE @extschema@.%I RENAME TO %I', part.partition, part.partition || '_expired');
            IF table_name = 'deliveries' THEN
                kept := kept + @extschema@.keep_unfinished_deliveries(part.partition || '_expired', as_of - keep);
            END IF;
            detached := detached + 1;
        EXCEPTION WHEN lock_not_available THEN
            busy := busy + 1;
        END;
    END LOOP;
    RETURN jsonb_build_object('partitions_created', created, 'partitions_dropped', detached, 'expired_removed', removed,
                              'rows_pruned', pruned, 'partitions_busy', busy)
           || CASE WHEN table_name = 'deliveries' THEN jsonb_build_object('rows_kept', kept) ELSE '{}' END;
END
$$;

-- Moves the rows of a detached partition of deliveries that retention must keep into
-- deliveries_default, with their ids, event ids and due times: those pending or being delivered
-- (the worker sends them as before), dead ones with a dead letter (replay reads them), and those
-- delivered at or after delivered_after. Each kind is read through an index, so a day of
-- finished rows is never scanned. The default partition is detached while it takes them in: rows
-- inserted into a partition would reach a logical-replication subscriber of deliveries as new
-- rows again. Returns the rows kept. Called by maintain_partitions.
CREATE FUNCTION keep_unfinished_deliveries(expired text, delivered_after timestamptz) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET enable_seqscan = off AS $$
DECLARE
    columns text;
    kept bigint;
BEGIN
    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO columns
      FROM pg_attribute a
     WHERE a.attrelid = '@extschema@.deliveries'::regclass AND a.attnum > 0 AND NOT a.attisdropped;
    ALTER TABLE @extschema@.deliveries DETACH PARTITION @extschema@.deliveries_default;
    EXECUTE format('INSERT INTO @extschema@.deliveries_default (%1$s) '
                   'SELECT %1$s FROM @extschema@.%2$I WHERE status IN (''pending'', ''delivering'') '
                   'UNION ALL SELECT %1$s FROM @extschema@.%2$I WHERE status = ''delivered'' AND delivered_at >= $1 '
                   'UNION ALL SELECT %1$s FROM @extschema@.%2$I '
                   'WHERE status = ''dead'' AND id IN (SELECT l.delivery_id FROM @extschema@.dead_letters l)',
                   columns, expired) USING delivered_after;
    GET DIAGNOSTICS kept = ROW_COUNT;
    ALTER TABLE @extschema@.deliveries ATTACH PARTITION @extschema@.deliveries_default DEFAULT;
    RETURN kept;
END
$$;

-- Whether pg_partman manages the partitions of a table (then maintain_partitions
-- leaves them alone).
CREATE FUNCTION partitions_managed_by_pg_partman(table_name text) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    partman text;
    managed boolean;
BEGIN
    SELECT n.nspname INTO partman FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'pg_partman';
    IF partman IS NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('SELECT EXISTS (SELECT FROM %I.part_config WHERE parent_table = $1)', partman)
        INTO managed USING '@extschema@.' || table_name;
    RETURN managed;
END
$$;

-- Hands the partitions of clicks or delivery_attempts over to pg_partman (docs/operations.md,
-- "pg_partman instead"), in one transaction: sorts the default partition's rows into
-- partitions, registers the table with pg_partman (create_parent, native, this width),
-- renames the existing partitions the way pg_partman names and orders them, and sets its
-- retention (NULL: keep everything) with partitions made ahead of the clock
-- (infinite_time_partitions). The default partition stays the extension's own, and is the
-- template pg_partman copies each partition's keys and indexes from. From then on
-- maintain_partitions leaves the table to pg_partman; deleting its part_config row gives it back.
CREATE FUNCTION use_pg_partman(table_name text, retention interval DEFAULT NULL, premake integer DEFAULT 4)
RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET lock_timeout = '5s' SET timezone = 'UTC' AS $$
DECLARE
    key text := CASE table_name WHEN 'clicks' THEN 'clicked_at' WHEN 'delivery_attempts' THEN 'started_at' END;
    parent text := '@extschema@.' || table_name;
    default_partition text := table_name || '_default';
    aside text := table_name || '_default_aside';
    partman text;
    width interval;
    frontier timestamptz;
    stray bigint;
    suffix text;
    part record;
    sorted jsonb;
    -- The zone pg_partman's own maintenance will name partitions in (this session's default).
    zone text := (SELECT s.reset_val FROM pg_settings s WHERE s.name = 'TimeZone');
BEGIN
    IF key IS NULL OR premake IS NULL OR premake < 1 OR retention < interval '0' THEN
        RAISE EXCEPTION 'use_pg_partman: table_name must be clicks or delivery_attempts, premake at least 1 and retention not negative'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT n.nspname INTO partman FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'pg_partman';
    IF partman IS NULL THEN
        RAISE EXCEPTION 'use_pg_partman: pg_partman is not installed in this database'
            USING ERRCODE = 'undefined_object', HINT = 'CREATE EXTENSION pg_partman SCHEMA partman; then call use_pg_partman again.';
    END IF;
    IF @extschema@.partitions_managed_by_pg_partman(table_name) THEN
        RAISE EXCEPTION 'use_pg_partman: % is already managed by pg_partman', parent USING ERRCODE = 'object_in_use';
    END IF;
    IF EXISTS (SELECT FROM @extschema@.partitions p WHERE p.table_name = use_pg_partman.table_name AND p.range_start = '-infinity') THEN
        RAISE EXCEPTION 'use_pg_partman: %_history (the rows from before 0.5.0) has no lower bound, which pg_partman cannot read', parent
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('Detach it to keep its rows as a table of their own (ALTER TABLE %s DETACH PARTITION %s_history), or hand over once retention has removed it.', parent, parent);
    END IF;
    SELECT p.range_end - p.range_start INTO width FROM @extschema@.partitions p
     WHERE p.table_name = use_pg_partman.table_name AND p.range_end IS NOT NULL ORDER BY p.range_end DESC LIMIT 1;
    width := coalesce(width, interval '1 day');
    IF width >= interval '28 days' THEN
        RAISE EXCEPTION 'use_pg_partman: partitions of % are wider than pg_partman aligns like linkhooks does (under 28 days)', width
            USING ERRCODE = 'feature_not_supported';
    END IF;
    -- The default partition's rows go into partitions first (moved, not inserted: no trigger
    -- runs twice); maintenance runs are held off until commit by the lock it takes.
    EXECUTE format('LOCK TABLE ONLY @extschema@.%I IN SHARE UPDATE EXCLUSIVE MODE', table_name);
    sorted := @extschema@.maintain_partitions(table_name, now(), width, NULL);
    SELECT max(p.range_end) INTO frontier FROM @extschema@.partitions p WHERE p.table_name = use_pg_partman.table_name;
    EXECUTE format('SELECT count(*) FROM @extschema@.%I WHERE %I >= $1', default_partition, key) INTO stray USING frontier;
    IF (sorted->>'partitions_busy')::int > 0 THEN
        RAISE EXCEPTION 'use_pg_partman: the rows of % could not be sorted into partitions: a lock wait timed out', default_partition
            USING ERRCODE = 'lock_not_available', HINT = 'Call use_pg_partman again.';
    END IF;
    IF stray > 0 THEN
        RAISE EXCEPTION 'use_pg_partman: % holds % rows dated from % on, where pg_partman''s partitions would go', default_partition, stray, frontier
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Move or delete them, then call use_pg_partman again.';
    END IF;

    -- pg_partman makes a default partition of its own: ours steps aside while it does, then
    -- takes its place, keeping the rows, the name and its membership of the extension.
    EXECUTE format('ALTER TABLE @extschema@.%I DETACH PARTITION @extschema@.%I', table_name, default_partition);
    EXECUTE format('ALTER TABLE @extschema@.%I RENAME TO %I', default_partition, aside);
    EXECUTE format('SELECT %I.create_parent(p_parent_table := $1, p_control := $2, p_type := ''native'', p_interval := $3, '
                   'p_premake := $4, p_start_partition := $5, p_template_table := $6)', partman)
        USING parent, key, width::text, premake, frontier::text, '@extschema@.' || aside;
    EXECUTE format('ALTER TABLE @extschema@.%I DETACH PARTITION @extschema@.%I', table_name, default_partition);
    EXECUTE format('DROP TABLE @extschema@.%I', default_partition);
    EXECUTE format('ALTER TABLE @extschema@.%I RENAME TO %I', aside, default_partition);
    EXECUTE format('ALTER TABLE @extschema@.%I ATTACH PARTITION @extschema@.%I DEFAULT', table_name, default_partition);
    -- inherit_privileges: the partitions it makes get the table's grants, as maintain_partitions' do.
    EXECUTE format('UPDATE %I.part_config SET template_table = $1, infinite_time_partitions = true, retention = $2, '
                   'retention_keep_table = false, inherit_privileges = true WHERE parent_table = $3 '
                   'RETURNING datetime_string', partman)
        INTO suffix USING '@extschema@.' || default_partition, retention::text, parent;
    FOR part IN SELECT p.partition FROM @extschema@.partitions p
                 WHERE p.table_name = use_pg_partman.table_name AND p.range_end IS NOT NULL LOOP
        PERFORM @extschema@.grant_as_parent(table_name, part.partition);
    END LOOP;
    -- pg_partman orders partitions by the time in their names, in its session's zone. Two passes:
    -- a partition's new name may be another's old one.
    FOR part IN SELECT p.partition FROM @extschema@.partitions p
                 WHERE p.table_name = use_pg_partman.table_name AND p.range_end IS NOT NULL LOOP
        EXECUTE format('ALTER TABLE @extschema@.%I RENAME TO %I', part.partition, part.partition || '_');
    END LOOP;
    FOR part IN SELECT p.partition, p.table_name || '_p' || to_char(p.range_start AT TIME ZONE zone, suffix) AS name
                  FROM @extschema@.partitions p
                 WHERE p.table_name = use_pg_partman.table_name AND p.range_end IS NOT NULL LOOP
        EXECUTE format('ALTER TABLE @extschema@.%I RENAME TO %I', part.partition, part.name);
    END LOOP;
    RETURN jsonb_build_object('pg_partman_schema', partman, 'width', width::text,
                              'partitions', (SELECT count(*) FROM @extschema@.partitions p
                                              WHERE p.table_name = use_pg_partman.table_name AND p.range_end IS NOT NULL));
END
$$;

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

SELECT pg_catalog.pg_extension_config_dump('clicks', '');
SELECT pg_catalog.pg_extension_config_dump('clicks_default', '');
SELECT pg_catalog.pg_extension_config_dump('clicks_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('delivery_attempts', '');
SELECT pg_catalog.pg_extension_config_dump('delivery_attempts_default', '');
SELECT pg_catalog.pg_extension_config_dump('delivery_attempts_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('deliveries', '');
SELECT pg_catalog.pg_extension_config_dump('deliveries_default', '');
SELECT pg_catalog.pg_extension_config_dump('deliveries_id_seq', '');
REVOKE ALL ON clicks, clicks_default, delivery_attempts, delivery_attempts_default, deliveries, deliveries_default, partitions FROM PUBLIC;
REVOKE ALL ON FUNCTION maintain_partitions(text, timestamptz, interval, interval),
    keep_unfinished_deliveries(text, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION use_pg_partman(text, interval, integer), partitions_managed_by_pg_partman(text),
    grant_as_parent(text, text) FROM PUBLIC;

-- Maintenance's retention of dead letters: replayed ones by when, the others by when they died.
CREATE INDEX dead_letters_replayed ON dead_letters (replayed_at) WHERE replayed_at IS NOT NULL;
CREATE INDEX dead_letters_unreplayed ON dead_letters (died_at) WHERE replayed_at IS NULL;
