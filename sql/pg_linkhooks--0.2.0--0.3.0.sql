-- pg_linkhooks 0.2.0 → 0.3.0: sessions cache links for resolve and clicks.
-- Every object here matches what a fresh 0.3.0 install creates; the system
-- test tests/system/test_upgrade.py compares the two catalogs.

-- Only the extension writes deliveries.status; the CHECK cost every click's insert a re-parse.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_status_check;

-- Makes every session drop its cached links when links is truncated.
CREATE TRIGGER links_truncated AFTER TRUNCATE ON links
    FOR EACH STATEMENT EXECUTE FUNCTION links_trigger();

-- The worker claims per subscription, so a saturated subscription's backlog is never walked.
DROP INDEX deliveries_due;
CREATE INDEX deliveries_due ON deliveries (subscription_id, next_attempt_at) WHERE status IN ('pending', 'delivering');
