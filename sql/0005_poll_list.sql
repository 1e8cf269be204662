-- 0005_poll_list.sql: the index of the poll list (GET /api/polls and the page
-- at /), a keyset walk newest first; poll_list, which walks it, is in
-- sql/functions/poll_list.sql.

-- Matches the list's order exactly (both columns descending), so the keyset
-- condition and the ORDER BY walk one index range.
CREATE INDEX polls_created_at_desc_id_desc_idx ON polls (created_at DESC, id DESC);
DROP INDEX polls_created_at_id_idx;

