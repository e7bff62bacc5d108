-- walhook queue schema, version 6: derived actions and per-listener routing.
--
-- A change may become several events: its row action (Created/Updated/Deleted) and the
-- domain actions [[entity.action]] rules derive from it (Customer.Cancelled). They share the
-- change's (commit_lsn, seq) and differ in `variant` (the derived action's name; '' for
-- the row action), which joins the idempotency key so that a re-sent change is still
-- skipped, event by event.

-- Any action name: derived actions are named in the configuration.
ALTER TABLE walhook.event DROP CONSTRAINT event_action_check;
ALTER TABLE walhook.event ADD CONSTRAINT event_action_check
    CHECK (action ~ '^[A-Za-z][A-Za-z0-9_]*$') NOT VALID;

-- Adding columns with a constant default (or none) rewrites nothing.
ALTER TABLE walhook.event
    ADD COLUMN variant text NOT NULL DEFAULT '',
    ADD COLUMN row_action text,
    ADD COLUMN excluded_listeners text[];

CREATE UNIQUE INDEX event_commit_lsn_seq_variant_key ON walhook.event (commit_lsn, seq, variant);
ALTER TABLE walhook.event DROP CONSTRAINT event_commit_lsn_seq_key;

COMMENT ON COLUMN walhook.event.variant IS 'which event of its change this is: '''' for the row action, the derived action''s name otherwise; part of the key (commit_lsn, seq, variant)';
COMMENT ON COLUMN walhook.event.row_action IS 'for a derived action (action = Cancelled…): the row action it was derived from (Created, Updated, Deleted); NULL when action is the row action';
COMMENT ON COLUMN walhook.event.excluded_listeners IS 'listeners this event was not fanned out to although they subscribe to its entity and action: their filter excludes it, or they receive another event of the same change';
