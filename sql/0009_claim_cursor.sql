-- walhook queue schema, version 9: claims sized in bytes without reading the events.
--
-- Claims resume after a per-listener cursor in commit order (new_listener_commit_order_idx)
-- and stop at a byte budget as well as a count. The budget needs each notification's
-- payload size; reading it from walhook.event for every candidate cost a third of a claim,
-- so the fan-out stores it here (a metadata-only ALTER: existing rows read NULL, and claims
-- then look the size up in walhook.event as before).

ALTER TABLE walhook.new ADD COLUMN payload_bytes int;

COMMENT ON COLUMN walhook.new.payload_bytes IS 'stored size in bytes of the event''s row and old (pg_column_size), for sizing claims; NULL = look it up in walhook.event';

-- A claim leases a run of consecutive rows in one transaction, so every row of a page gets a
-- new version at once. At fillfactor 70 only about a third of them fit on their page; the
-- others became non-HOT updates that insert into all three indexes (8 buffers per leased
-- row instead of 2 in EXPLAIN (ANALYZE, BUFFERS)). At 40 a page keeps room for a leased
-- version of each of its rows. Applies to pages written from now on.
ALTER TABLE walhook.new SET (fillfactor = 40);
