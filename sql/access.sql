-- Access levels a DBA hands out with one call:
--   writer  — the redirect service: resolve, record_click(_returning), find a link's id by slug,
--             INSERT clicks and conversions (RETURNING id, event_id); nothing else.
--   analyst — reads links, campaigns, clicks, conversions, delivery logs and views; no secrets, no writes.
--   admin   — analyst, plus managing links, campaigns and subscriptions (secrets included), replaying,
--             retrying now and clearing dead letters.
--   owner   — admin, plus every row of every table (pg_dump, a restore) and handing out levels:
--             CREATE EXTENSION gives it to the installing role when that is not a superuser.
-- The queue itself (deliveries, attempts, dead letters) is written only by the
-- extension's own SECURITY DEFINER functions and triggers. Columns the extension
-- keeps (ids, event ids, redirect_url, counters, signatures) are granted to no level.
-- These functions pin search_path, so format() and friends are pg_catalog's.

-- The privileges of one access level, each as "<privileges> ON <objects>".
CREATE FUNCTION access_privileges(access text) RETURNS SETOF text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF access = 'writer' THEN
        RETURN NEXT 'USAGE ON SCHEMA @extschema@';
        RETURN NEXT 'EXECUTE ON FUNCTION @extschema@.resolve(text, text), '
                    '@extschema@.record_click(text, inet, text, text, text, text, text, text, text, text), '
                    '@extschema@.record_click_returning(text, inet, text, text, text, text, text, text, text, text), '
                    '@extschema@.record_miss(text, text, text)';
        -- Enough to find a link's id for a plain INSERT of its click.
        RETURN NEXT 'SELECT (id, domain, slug) ON TABLE @extschema@.links';
        -- Every click column but id and event_id, which the extension makes (unique per event).
        RETURN NEXT 'INSERT (link_id, clicked_at, ip, user_agent, referer, country, city, source, landing_url, '
                    'device, browser, os, is_bot, utm) ON TABLE @extschema@.clicks';
        RETURN NEXT 'INSERT (click_id, link_id, name, amount, currency, occurred_at, metadata, external_id) '
                    'ON TABLE @extschema@.conversions';
        -- Enough for INSERT ... RETURNING id, event_id (to attribute conversions) and to find
        -- what an external id recorded, not to read clicks.
        RETURN NEXT 'SELECT (id, event_id) ON TABLE @extschema@.clicks';
        RETURN NEXT 'SELECT (id, event_id, external_id) ON TABLE @extschema@.conversions';
        -- record_click runs as the caller: it finds and keeps idempotency keys itself.
        RETURN NEXT 'SELECT, INSERT ON TABLE @extschema@.click_keys';
    ELSIF access = 'analyst' THEN
        RETURN NEXT 'USAGE ON SCHEMA @extschema@';
        RETURN NEXT 'SELECT ON TABLE @extschema@.links, @extschema@.campaigns, @extschema@.clicks, '
                    '@extschema@.conversions, @extschema@.delivery_attempts, '
                    '@extschema@.dead_letters, @extschema@.delivery_log, @extschema@.subscription_health, '
                    '@extschema@.click_facts, @extschema@.link_stats, @extschema@.link_daily_clicks, '
                    '@extschema@.link_click_breakdown, @extschema@.campaign_stats, @extschema@.rules, '
                    '@extschema@.link_counts, @extschema@.link_hours, @extschema@.uncounted_clicks, @extschema@.campaign_counts, @extschema@.link_milestones, @extschema@.link_misses, '
                    '@extschema@.link_minutes, @extschema@.campaign_minutes, @extschema@.threshold_state, @extschema@.digests, '
                    '@extschema@.link_health, @extschema@.country_minutes, @extschema@.subscription_minutes, '
                    '@extschema@.subscription_latencies, @extschema@.subscription_latency_hours';
        -- Every delivery column but the signature (valid for replay for minutes).
        RETURN NEXT 'SELECT (id, event_id, subscription_id, event_type, body, signed_at, status, attempts, '
                    'next_attempt_at, created_at, delivered_at, last_status_code, last_error) '
                    'ON TABLE @extschema@.deliveries';
        -- Every subscription column but the secrets and the URL (which may carry a token).
        RETURN NEXT 'SELECT (id, name, event_types, filters, ip_mode, signature_scheme, timeout_ms, max_attempts, '
                    'enabled, disabled_reason, consecutive_dead_letters, created_at, updated_at, paused, held_since) '
                    'ON TABLE @extschema@.subscriptions';
        RETURN NEXT 'EXECUTE ON FUNCTION @extschema@.worker_status()';
    ELSIF access = 'admin' THEN
        RETURN QUERY SELECT @extschema@.access_privileges('analyst');
        RETURN NEXT 'SELECT, INSERT, UPDATE, DELETE ON TABLE @extschema@.subscriptions';
        RETURN NEXT 'SELECT, DELETE ON TABLE @extschema@.links, @extschema@.campaigns';
        -- Links and campaigns minus what the extension keeps (redirect_url, counters, expired_at).
        RETURN NEXT 'INSERT (id, domain, slug, destination, campaign, tags, utm, expires_at, max_clicks, '
                    'expired_url, disabled, metadata, created_at) ON TABLE @extschema@.links';
        RETURN NEXT 'UPDATE (domain, slug, destination, campaign, tags, utm, expires_at, max_clicks, '
                    'expired_url, disabled, metadata) ON TABLE @extschema@.links';
        RETURN NEXT 'INSERT (name, click_goal, ends_at, completed_at), UPDATE (name, click_goal, ends_at, completed_at) '
                    'ON TABLE @extschema@.campaigns';
        RETURN NEXT 'EXECUTE ON FUNCTION @extschema@.resolve(text, text), @extschema@.send_test(bigint), '
                    '@extschema@.replay(bigint), @extschema@.replay_dead_letters(bigint, timestamptz), '
                    '@extschema@.rotate_secret(bigint, interval), @extschema@.run_maintenance(), '
                    '@extschema@.generate_secret(), @extschema@.retry_now(bigint, bigint), '
                    '@extschema@.recover(bigint, timestamptz, timestamptz)';
        -- Reactive-event rules (the extension keeps id and the timestamps).
        RETURN NEXT 'INSERT (kind, link_id, campaign, settings), UPDATE (kind, link_id, campaign, settings), DELETE '
                    'ON TABLE @extschema@.rules';
        RETURN NEXT 'EXECUTE ON FUNCTION @extschema@.run_aggregation()';
        -- Misses dealt with (a fixed typo in a printed link) may be cleared.
        RETURN NEXT 'DELETE ON TABLE @extschema@.link_misses';
        -- Dead letters an on-call engineer has dealt with may be cleared.
        RETURN NEXT 'DELETE ON TABLE @extschema@.dead_letters';
    ELSIF access = 'owner' THEN
        -- The role that installed the extension (given this by CREATE EXTENSION): the install
        -- is its own. pg_dump reads every row, a restore (with linkhooks.restore on) writes
        -- them as dumped, and it hands out levels.
        RETURN QUERY SELECT @extschema@.access_privileges('admin');
        RETURN NEXT 'SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA @extschema@';
        RETURN NEXT 'USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA @extschema@';
        RETURN NEXT 'EXECUTE ON FUNCTION @extschema@.grant_access(text, text), @extschema@.revoke_access(text, text)';
        RETURN NEXT 'SET ON PARAMETER linkhooks.restore';
    ELSE
        RAISE EXCEPTION 'invalid access: must be ''writer'', ''analyst'', ''admin'' or ''owner'' (got %)', coalesce(quote_literal(access), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;
COMMENT ON FUNCTION access_privileges(text) IS 'The privileges behind an access level (writer, analyst, admin, owner), as GRANT clauses.';

-- Grants or revokes one access level; returns the statements it ran.
CREATE FUNCTION apply_access(action text, role_name text, access text) RETURNS SETOF text
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
    FOR privilege IN SELECT @extschema@.access_privileges(access) LOOP
        -- The privilege text is ours; the role name is quoted as an identifier.
        statement := CASE action WHEN 'grant' THEN format('GRANT %s TO %I', privilege, role_name)
                                 ELSE format('REVOKE %s FROM %I', privilege, role_name) END;
        EXECUTE statement;
        RETURN NEXT statement;
    END LOOP;
    -- Partitions carry their tables' grants (grant_as_parent): the change reaches them too.
    FOR part IN SELECT p.table_name, p.partition FROM @extschema@.partitions p LOOP
        IF action = 'revoke' THEN
            EXECUTE format('REVOKE ALL ON @extschema@.%I FROM %I', part.partition, role_name);
        END IF;
        PERFORM @extschema@.grant_as_parent(part.table_name, part.partition);
    END LOOP;
END
$$;
COMMENT ON FUNCTION apply_access(text, text, text) IS 'Shared body of grant_access and revoke_access.';

-- Gives a role an access level: writer, analyst, admin or owner. Runs as the extension's
-- objects' owner, so a non-superuser holding 'owner' can use it; the privileges are ours
-- and the role name is quoted.
CREATE FUNCTION grant_access(role_name text, access text) RETURNS SETOF text
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$ SELECT @extschema@.apply_access('grant', role_name, access) $$;
COMMENT ON FUNCTION grant_access(text, text) IS 'GRANTs an access level (writer, analyst, admin, owner) to a role; returns the statements run.';

-- Takes an access level away again.
CREATE FUNCTION revoke_access(role_name text, access text) RETURNS SETOF text
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$ SELECT @extschema@.apply_access('revoke', role_name, access) $$;
COMMENT ON FUNCTION revoke_access(text, text) IS 'REVOKEs an access level from a role; returns the statements run.';
