-- pg_linkhooks across machines: the router database (docs/scale-out.md). The application
-- calls the same functions here as on one node (linkhooks.record_click, linkhooks.resolve, …);
-- PL/Proxy runs each on the shard that holds the link, or on every shard for totals.
-- Before running it: CREATE EXTENSION plproxy, and a PL/Proxy cluster named linkhooks_shards
-- (docs/scale-out.md shows both); after it: INSERT INTO linkhooks_router.layout VALUES (n).

CREATE SCHEMA linkhooks;         -- the functions the application calls, named as on one node
CREATE SCHEMA linkhooks_router;  -- the routing

-- How many shards there are (one row). PL/Proxy wants a power of two of partitions: the
-- cluster lists the shards as p0 … p(n-1), then repeats p0 up to the next power of two.
CREATE TABLE linkhooks_router.layout (
    single boolean PRIMARY KEY DEFAULT true CHECK (single),
    shards integer NOT NULL CHECK (shards > 0)
);

-- The shard of a link: its (domain, slug) hashed. Changing the number of shards moves links:
-- see docs/scale-out.md.
CREATE FUNCTION linkhooks_router.shard_of(domain text, slug text) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT (abs(hashtext(domain || '/' || slug)::bigint) % (SELECT l.shards FROM linkhooks_router.layout l))::integer
$$;

-- Every shard's number, once each, for the functions that run on all of them.
CREATE FUNCTION linkhooks_router.all_shards() RETURNS integer[]
LANGUAGE sql STABLE AS $$
    SELECT array_agg(g) FROM linkhooks_router.layout l, generate_series(0, l.shards - 1) g
$$;

-- The redirect: records the click on the link's shard, answers the URL (as on one node).
CREATE FUNCTION linkhooks.record_click(slug text, ip inet DEFAULT NULL, user_agent text DEFAULT NULL,
                                       referer text DEFAULT NULL, country text DEFAULT NULL, city text DEFAULT NULL,
                                       source text DEFAULT 'link', landing_url text DEFAULT NULL,
                                       domain text DEFAULT '', idempotency_key text DEFAULT NULL) RETURNS text
LANGUAGE plproxy AS $$
    CLUSTER 'linkhooks_shards';
    RUN ON linkhooks_router.shard_of(domain, slug);
$$;

-- The URL a slug redirects to, read on its shard.
CREATE FUNCTION linkhooks.resolve(slug text, domain text DEFAULT '') RETURNS text
LANGUAGE plproxy AS $$
    CLUSTER 'linkhooks_shards';
    RUN ON linkhooks_router.shard_of(domain, slug);
$$;

-- Links are written on their shard (shard.sql); each returns the link's id.
CREATE FUNCTION linkhooks_router.create_link(domain text, slug text, destination text, campaign text DEFAULT NULL,
                                             tags text[] DEFAULT NULL, utm jsonb DEFAULT NULL,
                                             max_clicks bigint DEFAULT NULL, expires_at timestamptz DEFAULT NULL)
RETURNS bigint LANGUAGE plproxy AS $$
    CLUSTER 'linkhooks_shards';
    RUN ON linkhooks_router.shard_of(domain, slug);
    TARGET shard.create_link;
$$;
CREATE FUNCTION linkhooks_router.update_link(domain text, slug text, changes jsonb) RETURNS bigint
LANGUAGE plproxy AS $$
    CLUSTER 'linkhooks_shards';
    RUN ON linkhooks_router.shard_of(domain, slug);
    TARGET shard.update_link;
$$;
CREATE FUNCTION linkhooks_router.delete_link(domain text, slug text) RETURNS bigint
LANGUAGE plproxy AS $$
    CLUSTER 'linkhooks_shards';
    RUN ON linkhooks_router.shard_of(domain, slug);
    TARGET shard.delete_link;
$$;

-- Subscriptions live on every shard, the same row on each (id, secret): each shard's worker
-- sends its own links' events. Returns the shards that took it; run it again if one was down.
CREATE FUNCTION linkhooks_router.put_subscription_on(shards integer[], id bigint, name text, url text, secret text,
                                                     event_types text[], filters jsonb, enabled boolean)
RETURNS SETOF integer LANGUAGE plproxy AS $$
    CLUSTER 'linkhooks_shards';
    SPLIT shards;
    RUN ON shards;
    SELECT shard.put_subscription(id, name, url, secret, event_types, filters, enabled);
$$;
CREATE FUNCTION linkhooks_router.put_subscription(id bigint, name text, url text, secret text,
                                                  event_types text[] DEFAULT NULL, filters jsonb DEFAULT NULL,
                                                  enabled boolean DEFAULT true) RETURNS SETOF integer
LANGUAGE sql AS $$
    SELECT linkhooks_router.put_subscription_on(linkhooks_router.all_shards(), id, name, url, secret, event_types, filters, enabled)
$$;
CREATE FUNCTION linkhooks_router.drop_subscription_on(shards integer[], id bigint) RETURNS SETOF integer
LANGUAGE plproxy AS $$
    CLUSTER 'linkhooks_shards';
    SPLIT shards;
    RUN ON shards;
    SELECT shard.drop_subscription(id);
$$;
CREATE FUNCTION linkhooks_router.drop_subscription(id bigint) RETURNS SETOF integer
LANGUAGE sql AS $$
    SELECT linkhooks_router.drop_subscription_on(linkhooks_router.all_shards(), id)
$$;

-- One link's counts, read on its shard.
CREATE FUNCTION linkhooks.link_stats(domain text, slug text, OUT link_id bigint, OUT clicks bigint,
                                     OUT human_clicks bigint, OUT bot_clicks bigint, OUT qr_scans bigint,
                                     OUT conversions bigint) RETURNS SETOF record
LANGUAGE plproxy AS $$
    CLUSTER 'linkhooks_shards';
    RUN ON linkhooks_router.shard_of(domain, slug);
    SELECT s.link_id, s.clicks, s.human_clicks, s.bot_clicks, s.qr_scans, s.conversions
      FROM linkhooks.link_stats s WHERE s.domain = $1 AND s.slug = $2;
$$;

-- Campaign counts: each shard's, then summed (a campaign's links may be on every shard).
CREATE FUNCTION linkhooks_router.campaign_stats_on(shards integer[], OUT campaign text, OUT links bigint,
                                                   OUT clicks bigint, OUT human_clicks bigint, OUT bot_clicks bigint,
                                                   OUT qr_scans bigint, OUT conversions bigint) RETURNS SETOF record
LANGUAGE plproxy AS $$
    CLUSTER 'linkhooks_shards';
    SPLIT shards;
    RUN ON shards;
    SELECT s.campaign, s.links, s.clicks, s.human_clicks, s.bot_clicks, s.qr_scans, s.conversions
      FROM linkhooks.campaign_stats s WHERE s.links > 0;
$$;
CREATE VIEW linkhooks.campaign_stats AS
SELECT campaign, sum(links)::bigint AS links, sum(clicks)::bigint AS clicks, sum(human_clicks)::bigint AS human_clicks,
       sum(bot_clicks)::bigint AS bot_clicks, sum(qr_scans)::bigint AS qr_scans, sum(conversions)::bigint AS conversions,
       round(sum(conversions)::numeric / nullif(sum(human_clicks), 0), 4) AS conversion_rate
FROM linkhooks_router.campaign_stats_on(linkhooks_router.all_shards())
GROUP BY campaign;
