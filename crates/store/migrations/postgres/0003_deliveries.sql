-- How many times a broker redelivered an operation's message (a worker died holding it):
-- past a limit the message is poison and goes to the dead-letter queue. Kept equivalent with
-- migrations/sqlite.
ALTER TABLE operations ADD COLUMN deliveries BIGINT NOT NULL DEFAULT 0;
