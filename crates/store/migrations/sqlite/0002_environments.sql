-- Environments on server targets (issue 3). Keep equivalent with migrations/postgres.

-- Per-target settings as JSON: database admin connections (their passwords included, so the
-- column never leaves the store through the API) and how nginx is run.
ALTER TABLE targets ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';

-- Host names besides the primary domain: [{"domain", "redirect"}].
ALTER TABLE environments ADD COLUMN aliases TEXT NOT NULL DEFAULT '[]';
ALTER TABLE environments ADD COLUMN https TEXT NOT NULL DEFAULT 'off';
-- What Hefring generated for the environment (database password, ...): never shown.
ALTER TABLE environments ADD COLUMN secrets TEXT NOT NULL DEFAULT '{}';
-- What exists on the target for the environment (database created, ...), so delete removes
-- exactly that.
ALTER TABLE environments ADD COLUMN resources TEXT NOT NULL DEFAULT '{}';

-- Names are unique per project, and a host name belongs to one environment, among those not
-- deleted. Aliases are checked by the API (they live in a JSON list).
CREATE UNIQUE INDEX environments_name ON environments (project_id, name) WHERE status != 'deleted';
CREATE UNIQUE INDEX environments_domain ON environments (domain) WHERE status != 'deleted';
