-- The last broker audit event stored, by the broker's spool epoch and event number: a broker
-- that resends events after a failed heartbeat or a crash gets each stored once.
ALTER TABLE brokers ADD COLUMN audit_epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE brokers ADD COLUMN audit_seq BIGINT NOT NULL DEFAULT 0;
