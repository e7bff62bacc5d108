-- walhook queue schema, version 2: delivery leases.
--
-- Several walhook processes may deliver from one queue. A process claims due notifications
-- by setting a lease (locked_until, locked_by) in the statement that selects them with
-- FOR UPDATE SKIP LOCKED; the row lock ends with that statement, the lease lasts until the
-- delivery is recorded. A lease that expires (the process died) makes the row claimable
-- again, so a notification is delivered at least once and, without crashes, exactly once.

ALTER TABLE walhook.new
    ADD COLUMN locked_until timestamptz,
    ADD COLUMN locked_by    text;

COMMENT ON COLUMN walhook.new.locked_until IS 'lease: the process named in locked_by is delivering this notification until then; NULL = free';
COMMENT ON COLUMN walhook.new.locked_by IS 'lease holder: the walhook process (host:pid:instance) delivering this notification';

-- Claiming walks one listener's notifications in commit order and stops at the batch size.
CREATE INDEX new_listener_commit_order_idx ON walhook.new (listener, commit_lsn, seq);
