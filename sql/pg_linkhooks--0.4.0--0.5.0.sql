-- pg_linkhooks 0.4.0 → 0.5.0: nothing runs as the owner with a caller's search_path,
-- and columns the extension keeps are granted to no access level.
-- Every object here matches what a fresh 0.5.0 install creates; the system
-- test tests/system/test_upgrade.py compares the two catalogs.

-- Everything that runs as the owner pins search_path, pg_temp last.
ALTER FUNCTION links_trigger() SET search_path = pg_catalog, pg_temp;
-- (clicks_trigger pins it in its code: src/triggers/mod.rs)
ALTER FUNCTION conversions_trigger() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION campaigns_trigger() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION subscriptions_trigger() SET search_path = pg_catalog, pg_temp;
-- resolve and record_click run as the caller: resolve runs no SQL, record_click only the
-- plain INSERT a writer may run, and the click trigger does the rest as the owner.
ALTER FUNCTION resolve(text, text) SECURITY INVOKER;
ALTER FUNCTION record_click(text, inet, text, text, text, text, text, text, text) SECURITY INVOKER;
ALTER FUNCTION send_test(bigint) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION replay(bigint) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION replay_dead_letters(bigint, timestamptz) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION rotate_secret(bigint, interval) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION run_maintenance() SET search_path = pg_catalog, pg_temp;

-- Access levels: column lists instead of whole tables where the extension keeps columns.
CREATE OR REPLACE FUNCTION access_privileges(access text) RETURNS SETOF text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF access = 'writer' THEN
        RETURN NEXT 'USAGE ON SCHEMA linkhooks';
        RETURN NEXT 'EXECUTE ON FUNCTION linkhooks.resolve(text, text), '
                    'linkhooks.record_click(text, inet, text, text, text, text, text, text, text), '
                    'linkhooks.record_click_returning(text, inet, text, text, text, text, text, text, text)';
        -- Enough to find a link's id for a plain INSERT of its click.
        RETURN NEXT 'SELECT (id, domain, slug) ON TABLE linkhooks.links';
        -- Every click column but id and event_id, which the extension makes (unique per event).
        RETURN NEXT 'INSERT (link_id, clicked_at, ip, user_agent, referer, country, city, source, landing_url, '
                    'device, browser, os, is_bot, utm) ON TABLE linkhooks.clicks';
        RETURN NEXT 'INSERT (click_id, link_id, name, amount, currency, occurred_at, metadata) '
                    'ON TABLE linkhooks.conversions';
        -- Enough for INSERT ... RETURNING id, event_id (to attribute conversions), not to read clicks.
        RETURN NEXT 'SELECT (id, event_id) ON TABLE linkhooks.clicks, linkhooks.conversions';
    ELSIF access = 'analyst' THEN
        RETURN NEXT 'USAGE ON SCHEMA linkhooks';
        RETURN NEXT 'SELECT ON TABLE linkhooks.links, linkhooks.campaigns, linkhooks.clicks, '
                    'linkhooks.conversions, linkhooks.delivery_attempts, '
                    'linkhooks.dead_letters, linkhooks.delivery_log, linkhooks.subscription_health, '
                    'linkhooks.click_facts, linkhooks.link_stats, linkhooks.link_daily_clicks, '
                    'linkhooks.link_click_breakdown, linkhooks.campaign_stats';
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
                    'linkhooks.generate_secret(), linkhooks.retry_now(bigint, bigint)';
        -- Dead letters an on-call engineer has dealt with may be cleared.
        RETURN NEXT 'DELETE ON TABLE linkhooks.dead_letters';
    ELSE
        RAISE EXCEPTION 'invalid access: must be ''writer'', ''analyst'' or ''admin'' (got %)', coalesce(quote_literal(access), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;
COMMENT ON FUNCTION access_privileges(text) IS 'The privileges behind an access level (writer, analyst, admin), as GRANT clauses.';

-- Grants or revokes one access level; returns the statements it ran.
CREATE OR REPLACE FUNCTION apply_access(action text, role_name text, access text) RETURNS SETOF text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    privilege text;
    statement text;
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
END
$$;
COMMENT ON FUNCTION apply_access(text, text, text) IS 'Shared body of grant_access and revoke_access.';

-- Gives a role an access level: writer, analyst or admin.
CREATE OR REPLACE FUNCTION grant_access(role_name text, access text) RETURNS SETOF text
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$ SELECT linkhooks.apply_access('grant', role_name, access) $$;
COMMENT ON FUNCTION grant_access(text, text) IS 'GRANTs an access level (writer, analyst, admin) to a role; returns the statements run.';

-- Takes an access level away again.
CREATE OR REPLACE FUNCTION revoke_access(role_name text, access text) RETURNS SETOF text
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$ SELECT linkhooks.apply_access('revoke', role_name, access) $$;
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
    landing_url text DEFAULT NULL, domain text DEFAULT '')
RETURNS TABLE (url text, click_id bigint, event_id uuid)
VOLATILE PARALLEL UNSAFE LANGUAGE c
AS 'MODULE_PATHNAME', 'record_click_returning_wrapper';
REVOKE ALL ON FUNCTION record_click_returning(text, inet, text, text, text, text, text, text, text) FROM PUBLIC;

-- retry_now: makes pending deliveries due now.
CREATE FUNCTION retry_now(delivery_id bigint DEFAULT NULL, subscription_id bigint DEFAULT NULL) RETURNS bigint
VOLATILE SECURITY DEFINER LANGUAGE c AS 'MODULE_PATHNAME', 'retry_now_wrapper';
REVOKE ALL ON FUNCTION retry_now(bigint, bigint) FROM PUBLIC;
ALTER FUNCTION retry_now(bigint, bigint) SET search_path = pg_catalog, pg_temp;

-- Roles holding a level get what the level gained in 0.5.0: writers (who may call
-- record_click) the new function and a link's id by slug; analysts and admins (who
-- may call worker_status) the new subscription columns; admins (who may replay)
-- retry_now and clearing dead letters.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT a.grantee::pg_catalog.regrole::pg_catalog.text AS grantee, p.proname
          FROM pg_catalog.pg_proc p CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) a
         WHERE p.oid IN ('linkhooks.record_click(text, inet, text, text, text, text, text, text, text)'::pg_catalog.regprocedure,
                         'linkhooks.replay(bigint)'::pg_catalog.regprocedure,
                         'linkhooks.worker_status()'::pg_catalog.regprocedure)
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0
    LOOP
        IF g.proname = 'record_click' THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION linkhooks.record_click_returning(text, inet, text, text, text, text, text, text, text) TO %s', g.grantee);
            EXECUTE pg_catalog.format('GRANT SELECT (id, domain, slug) ON TABLE linkhooks.links TO %s', g.grantee);
        ELSIF g.proname = 'worker_status' THEN
            EXECUTE pg_catalog.format('GRANT SELECT (paused, held_since) ON TABLE linkhooks.subscriptions TO %s', g.grantee);
        ELSE
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION linkhooks.retry_now(bigint, bigint) TO %s', g.grantee);
            EXECUTE pg_catalog.format('GRANT DELETE ON TABLE linkhooks.dead_letters TO %s', g.grantee);
        END IF;
    END LOOP;
END
$$;
