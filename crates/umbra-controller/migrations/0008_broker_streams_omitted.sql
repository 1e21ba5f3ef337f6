-- Live streams a broker carries but left out of its last list: a heartbeat carries at most so
-- many (its body is bounded), so that listings and policy checks can say they are incomplete
-- instead of showing a part as the whole.
ALTER TABLE brokers ADD COLUMN streams_omitted BIGINT NOT NULL DEFAULT 0;
