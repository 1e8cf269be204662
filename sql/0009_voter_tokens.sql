-- 0009_voter_tokens.sql: polls that take only voters proven by a signed voter
-- token (docs/voter-tokens.md). The edge enforces it on admission; the
-- flag is stored with the poll so that every edge, and the poll's JSON, agree.

ALTER TABLE polls ADD COLUMN require_voter_token boolean NOT NULL DEFAULT false;

-- poll_get and poll_list return the flag too. A function's result columns
-- cannot change in place, so the old ones are dropped here and
-- sql/functions/ creates them anew after the migrations. (A Citus database
-- distributed before this migration runs sql/citus/0002_functions.sql again
-- after it: dropping poll_get dropped its delegation; docs/scaling.md.)
DROP FUNCTION IF EXISTS poll_get(uuid);
DROP FUNCTION IF EXISTS poll_list(timestamptz, uuid, int);
