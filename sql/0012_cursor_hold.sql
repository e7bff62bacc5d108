-- walhook queue schema, version 12: why a cursor listener is held.
--
-- A queue listener's retry shows in its walhook.new row (last_attempt_at, last_status_code,
-- comment), and `walhook status` shows it as LAST ERROR. A cursor listener has no such row:
-- while a retryable failure holds its cursor, these columns name the event it is held at
-- and why. Moving the cursor clears them.

ALTER TABLE walhook.listener_cursor
    ADD COLUMN held_event_id    bigint,
    ADD COLUMN last_attempt_at  timestamptz,
    ADD COLUMN last_status_code int,
    ADD COLUMN comment          text;

COMMENT ON COLUMN walhook.listener_cursor.held_event_id IS 'walhook.event.id of the event the cursor is held at by retries (NULL: not held)';
COMMENT ON COLUMN walhook.listener_cursor.last_attempt_at IS 'when that event last failed with a retryable error';
COMMENT ON COLUMN walhook.listener_cursor.last_status_code IS 'the peer''s status code for that failure, if its transport has one';
COMMENT ON COLUMN walhook.listener_cursor.comment IS 'why the cursor is held, in plain words (cleared when the cursor moves)';
