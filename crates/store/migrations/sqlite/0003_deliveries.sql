-- How many times a broker redelivered an operation's message (a worker died holding it):
-- past a limit the message is poison and goes to the dead-letter queue. Keep equivalent with
-- migrations/postgres.
ALTER TABLE operations ADD COLUMN deliveries INTEGER NOT NULL DEFAULT 0;
