-- 0010_poll_archive.sql: the poll list by state (open, closed, or all), with
-- each poll's counted ballots: poll_list takes a state now, so the one of
-- three arguments goes; sql/functions/poll_list.sql creates the new one.

DROP FUNCTION IF EXISTS poll_list(timestamptz, uuid, int);
