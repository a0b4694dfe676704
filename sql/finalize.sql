-- Wiring that needs the Rust functions: defaults, triggers, privileges.

-- A fresh whsec_ secret for every subscription that does not bring one.
ALTER TABLE subscriptions ALTER COLUMN secret SET DEFAULT generate_secret();
-- Time-ordered event ids, so the deliveries index on event_id grows at its right edge.
ALTER TABLE clicks ALTER COLUMN event_id SET DEFAULT uuidv7();
ALTER TABLE conversions ALTER COLUMN event_id SET DEFAULT uuidv7();

-- Triggers run as the extension owner: they read subscription secrets and queue
-- deliveries, which the roles that insert clicks must not touch themselves.
-- Everything that runs as the owner pins search_path, pg_temp last: a caller's
-- own schemas or temporary objects (types, functions, operators) are never
-- looked up, so they cannot run as the owner.
ALTER FUNCTION links_trigger() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
-- The clicks trigger, the hot path, pins it in its code instead (the same lookups,
-- without setting and restoring the setting per row: src/triggers/mod.rs).
ALTER FUNCTION clicks_trigger() SECURITY DEFINER;
ALTER FUNCTION conversions_trigger() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION campaigns_trigger() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION subscriptions_trigger() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
-- The SECURITY DEFINER API (and worker_status, which counts the queue) likewise.
-- resolve and record_click(_returning) run as the caller (see src/api.rs): no pin needed.
ALTER FUNCTION send_test(bigint) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION replay(bigint) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION replay_dead_letters(bigint, timestamptz) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION rotate_secret(bigint, interval) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION retry_now(bigint, bigint) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION recover(bigint, timestamptz, timestamptz) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION run_maintenance() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION run_aggregation() SET search_path = pg_catalog, pg_temp;
-- Its statements are planned for each run's batch: a plan made for a few clicks and reused
-- for a batch of many (a generic plan) can join them in quadratic time.
ALTER FUNCTION run_aggregation() SET plan_cache_mode = force_custom_plan;
-- Nor compiled: with many partitions of clicks its reads can look costly enough to JIT, which
-- then takes seconds (the worker's own sessions run with jit off).
ALTER FUNCTION run_aggregation() SET jit = off;
ALTER FUNCTION record_miss(text, text, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION worker_status() SET search_path = pg_catalog, pg_temp;

-- Validates links, keeps redirect_url, emits link.created/updated/deleted.
CREATE TRIGGER links_events BEFORE INSERT OR UPDATE OR DELETE ON links
    FOR EACH ROW EXECUTE FUNCTION links_trigger();
-- Makes every session drop its cached links when links is truncated.
CREATE TRIGGER links_truncated AFTER TRUNCATE ON links
    FOR EACH STATEMENT EXECUTE FUNCTION links_trigger();
-- Logical-replication apply runs in replica role, where the two triggers above do not fire:
-- this one (REPLICA: it fires only there) makes every session on a subscriber drop its cached
-- links when a replicated change or TRUNCATE commits. It validates and emits nothing; the publisher did.
CREATE TRIGGER links_replicated BEFORE INSERT OR UPDATE OR DELETE ON links
    FOR EACH ROW EXECUTE FUNCTION links_replicated_trigger();
CREATE TRIGGER links_replicated_truncate AFTER TRUNCATE ON links
    FOR EACH STATEMENT EXECUTE FUNCTION links_replicated_trigger();
ALTER TABLE links ENABLE REPLICA TRIGGER links_replicated;
ALTER TABLE links ENABLE REPLICA TRIGGER links_replicated_truncate;
ALTER FUNCTION links_replicated_trigger() SET search_path = pg_catalog, pg_temp;
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
-- Enriches clicks, enforces max_clicks, emits link.clicked/qr.scanned (+ link.expired, campaign.completed);
-- on UPDATE, marks the row so that moving it to another day's partition does none of that again.
CREATE TRIGGER clicks_events BEFORE INSERT OR UPDATE ON clicks
    FOR EACH ROW EXECUTE FUNCTION clicks_trigger();
-- Validates conversions and emits link.converted.
CREATE TRIGGER conversions_events BEFORE INSERT ON conversions
    FOR EACH ROW EXECUTE FUNCTION conversions_trigger();
-- Validates campaigns and keeps goal counters.
CREATE TRIGGER campaigns_validate BEFORE INSERT OR UPDATE OR DELETE ON campaigns
    FOR EACH ROW EXECUTE FUNCTION campaigns_trigger();
-- Checks rules' kind, scope and settings.
ALTER FUNCTION rules_trigger() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
CREATE TRIGGER rules_validate BEFORE INSERT OR UPDATE ON rules
    FOR EACH ROW EXECUTE FUNCTION rules_trigger();
-- Validates subscriptions and refreshes every backend's subscription cache on commit.
CREATE TRIGGER subscriptions_validate BEFORE INSERT OR UPDATE OR DELETE ON subscriptions
    FOR EACH ROW EXECUTE FUNCTION subscriptions_trigger();
-- TRUNCATE of delivery_attempts starts the ids again, and the worker's count of them with it.
CREATE FUNCTION reset_attempt_cursor() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE @extschema@.attempt_cursor SET counted_id = 0;
    RETURN NULL;
END
$$;
CREATE TRIGGER delivery_attempts_truncated AFTER TRUNCATE ON delivery_attempts
    FOR EACH STATEMENT EXECUTE FUNCTION reset_attempt_cursor();

-- pg_dump dumps the contents of these tables and sequences (restore with
-- session_replication_role = replica so restored rows do not emit events again).
DO $$
DECLARE
    relation text;
BEGIN
    FOREACH relation IN ARRAY ARRAY[
        'links', 'links_id_seq', 'campaigns', 'clicks', 'clicks_default', 'clicks_id_seq', 'conversions', 'conversions_id_seq',
        'subscriptions', 'subscriptions_id_seq', 'deliveries', 'deliveries_default', 'deliveries_id_seq', 'delivery_attempts', 'delivery_attempts_default',
        'delivery_attempts_id_seq', 'dead_letters', 'subscription_state', 'rules', 'rules_id_seq',
        'link_counts', 'link_hours', 'campaign_counts', 'milestones', 'link_misses', 'click_keys', 'threshold_state',
        'digests', 'destination_checks', 'subscription_minutes', 'subscription_latencies',
        'subscription_latency_hours', 'attempt_cursor']
    LOOP
        PERFORM pg_catalog.pg_extension_config_dump(relation::regclass, '');
    END LOOP;
END
$$;

-- Nothing is granted to PUBLIC: the extension owner decides who reads and writes.
REVOKE ALL ON ALL TABLES IN SCHEMA @extschema@ FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA @extschema@ FROM PUBLIC;
-- Pure helpers anyone may call.
GRANT EXECUTE ON FUNCTION sign(text, text, bigint, text), verify(text, text, bigint, text, text), uuidv7(),
    click_cursor_xmin(), attempt_cursor_id(), latency_bucket(double precision),
    ratio(numeric, numeric) TO PUBLIC;
GRANT USAGE ON SCHEMA @extschema@ TO PUBLIC;

-- A database owner who installed the extension (it is trusted) owns the install: it gets the
-- 'owner' level (admin, every row for pg_dump and restore, handing out levels). A superuser needs none.
DO $$
DECLARE
    installer name := (SELECT r.rolname FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_roles r ON r.oid = e.extowner
                        WHERE e.extname = 'pg_linkhooks' AND NOT r.rolsuper);
BEGIN
    IF installer IS NOT NULL THEN
        PERFORM @extschema@.grant_access(installer, 'owner');
    END IF;
END
$$;
