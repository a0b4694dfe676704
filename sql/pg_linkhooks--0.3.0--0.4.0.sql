-- pg_linkhooks 0.3.0 → 0.4.0: time-ordered (UUIDv7) event ids.
-- Every object here matches what a fresh 0.4.0 install creates; the system
-- test tests/system/test_upgrade.py compares the two catalogs.

-- A time-ordered UUID (version 7), the default of clicks' and conversions' event ids.
CREATE FUNCTION uuidv7() RETURNS uuid
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'uuidv7_wrapper';
-- Anyone who may insert a click must be able to evaluate its default.
REVOKE ALL ON FUNCTION uuidv7() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION uuidv7() TO PUBLIC;

-- Time-ordered event ids, so the deliveries index on event_id grows at its right edge.
ALTER TABLE clicks ALTER COLUMN event_id SET DEFAULT uuidv7();
ALTER TABLE conversions ALTER COLUMN event_id SET DEFAULT uuidv7();
