-- The software version each broker and connector last announced (its `User-Agent`,
-- `umbra/<version>`), so that an operator upgrading a fleet sees which ones still run an older
-- one. NULL: never announced (a peer older than this migration, or not seen since).
ALTER TABLE brokers ADD COLUMN version TEXT;
ALTER TABLE connectors ADD COLUMN version TEXT;
