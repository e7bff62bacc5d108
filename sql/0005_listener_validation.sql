-- walhook queue schema, version 5: Event Grid endpoint validation.
-- (Version 4 is reserved for the claim cursor of another branch; migrations apply in
-- version order, each once, whatever order they were added in.)

-- The validation handshake of each Event Grid webhook listener. A listener receives events
-- only while its row says validated for the url and headers it has now (fingerprint): a
-- change of either means a new handshake. The row outlives restarts, so a validated
-- listener is not asked again, and a GET to the validationUrl that arrives after a restart
-- (within 5 minutes of the request) still counts.
CREATE TABLE walhook.listener_validation (
    listener      text PRIMARY KEY,
    fingerprint   text NOT NULL,
    state         text NOT NULL CHECK (state IN ('pending', 'validated', 'failed')),
    code_sha256   text,
    requested_at  timestamptz,
    validated_at  timestamptz,
    validated_by  text CHECK (validated_by IN ('response', 'get')),
    comment       text,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE walhook.listener_validation IS 'walhook: Event Grid validation handshakes; a webhook listener gets events only while validated';
COMMENT ON COLUMN walhook.listener_validation.fingerprint IS 'SHA-256 over the url and headers the handshake was made for; a change means a new handshake';
COMMENT ON COLUMN walhook.listener_validation.state IS 'pending: validation event sent, waiting for the code or a GET to the validationUrl (5 minutes); validated; failed: see comment, tried again later';
COMMENT ON COLUMN walhook.listener_validation.code_sha256 IS 'SHA-256 of the validation code of the latest handshake (the code itself is never stored)';
COMMENT ON COLUMN walhook.listener_validation.validated_by IS 'response: the listener echoed the code; get: it sent a GET to the validationUrl';
COMMENT ON COLUMN walhook.listener_validation.comment IS 'what the latest handshake ended with, in plain words';
