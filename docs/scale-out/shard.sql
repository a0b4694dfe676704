-- pg_linkhooks across machines: what each shard database holds besides the extension
-- (docs/scale-out.md). Run it as a superuser after CREATE EXTENSION pg_linkhooks (number_ids alters its tables),
-- then SELECT shard.number_ids(k, n) with this shard's number k (0 to n - 1) of n shards.
-- The router (router.sql) calls these functions and the extension's own.

CREATE SCHEMA shard;
REVOKE ALL ON SCHEMA shard FROM PUBLIC;

-- This shard's number and the number of shards, set by number_ids.
CREATE TABLE shard.identity (
    single boolean PRIMARY KEY DEFAULT true CHECK (single),
    k      integer NOT NULL,
    n      integer NOT NULL
);

-- Ids unique across the shards, so a link's or click's id in a payload names it in the whole
-- layout: shard k of n hands out k + 1, k + 1 + n, k + 1 + 2n, … Run on a shard with no links,
-- clicks or conversions yet (and again after a restore: it changes the sequences' increment,
-- which CREATE EXTENSION sets afresh).
CREATE FUNCTION shard.number_ids(k integer, n integer) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t text;
BEGIN
    IF n IS NULL OR k IS NULL OR n < 1 OR k < 0 OR k >= n THEN
        RAISE EXCEPTION 'shard.number_ids: k must be 0 to n - 1 (got k = %, n = %)', k, n;
    END IF;
    -- All three at once, clicks first as the worker's counting reads them: altering one table
    -- at a time could deadlock with a run that holds clicks and then reads links.
    LOCK TABLE linkhooks.clicks, linkhooks.conversions, linkhooks.links IN ACCESS EXCLUSIVE MODE;
    FOREACH t IN ARRAY ARRAY['links', 'clicks', 'conversions'] LOOP
        EXECUTE format('ALTER TABLE linkhooks.%I ALTER COLUMN id SET INCREMENT BY %s RESTART WITH %s', t, n, k + 1);
    END LOOP;
    INSERT INTO shard.identity (k, n) VALUES (k, n) ON CONFLICT (single) DO UPDATE SET k = EXCLUDED.k, n = EXCLUDED.n;
END
$$;

-- A link, on the shard its (domain, slug) hashes to; returns its id.
CREATE FUNCTION shard.create_link(domain text, slug text, destination text, campaign text, tags text[],
                                  utm jsonb, max_clicks bigint, expires_at timestamptz) RETURNS bigint
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO linkhooks.links (domain, slug, destination, campaign, tags, utm, max_clicks, expires_at)
    VALUES (domain, slug, destination, campaign, coalesce(tags, '{}'), utm, max_clicks, expires_at)
    RETURNING id
$$;

-- Changes a link: the keys of `changes` among destination, campaign, tags, utm, max_clicks,
-- expires_at, expired_url, disabled and metadata (domain and slug pick the shard: a new slug is
-- a new link). Returns its id, or NULL if there is no such link.
CREATE FUNCTION shard.update_link(domain text, slug text, changes jsonb) RETURNS bigint
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    UPDATE linkhooks.links l
       SET (destination, campaign, tags, utm, max_clicks, expires_at, expired_url, disabled, metadata) =
           (SELECT r.destination, r.campaign, r.tags, r.utm, r.max_clicks, r.expires_at, r.expired_url, r.disabled, r.metadata
              FROM jsonb_populate_record(l, changes) r)
     WHERE l.domain = update_link.domain AND l.slug = update_link.slug
    RETURNING l.id
$$;

-- Deletes a link; returns its id, or NULL if there is no such link.
CREATE FUNCTION shard.delete_link(domain text, slug text) RETURNS bigint
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM linkhooks.links l WHERE l.domain = delete_link.domain AND l.slug = delete_link.slug RETURNING l.id
$$;

-- A subscription as the router hands it to every shard: the same id and secret everywhere,
-- so a receiver verifies every shard's webhooks alike. Inserts or replaces; returns this shard's number.
CREATE FUNCTION shard.put_subscription(id bigint, name text, url text, secret text, event_types text[],
                                       filters jsonb, enabled boolean) RETURNS integer
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO linkhooks.subscriptions AS s (id, name, url, secret, event_types, filters, enabled)
    VALUES (id, name, url, secret, event_types, coalesce(filters, '{}'), coalesce(enabled, true))
    ON CONFLICT (id) DO UPDATE
       SET name = EXCLUDED.name, url = EXCLUDED.url, secret = EXCLUDED.secret, event_types = EXCLUDED.event_types,
           filters = EXCLUDED.filters, enabled = EXCLUDED.enabled;
    SELECT k FROM shard.identity
$$;

-- Deletes a subscription here; returns this shard's number.
CREATE FUNCTION shard.drop_subscription(id bigint) RETURNS integer
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM linkhooks.subscriptions s WHERE s.id = drop_subscription.id;
    SELECT k FROM shard.identity
$$;
