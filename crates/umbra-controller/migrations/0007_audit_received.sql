-- When the controller stored each audit record, by its own clock (Unix ms). `at_ms` is the
-- time the record's source gave it: a broker's records carry the broker's clock, which may be
-- wrong (a host without a real-time clock starts in 1970). Retention ages records by this
-- time instead, so that such a broker's records are not deleted at the next sweep, nor kept
-- for ever when its clock is years ahead. Records stored before it got their own time.
ALTER TABLE audit ADD COLUMN received_ms BIGINT NOT NULL DEFAULT 0;
UPDATE audit SET received_ms = at_ms;
CREATE INDEX audit_by_receipt ON audit (org, received_ms);
DROP INDEX audit_by_age;
