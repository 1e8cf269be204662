-- sql/functions/close_poll.sql: closing a poll (rule 6).

-- Closes a poll at p_closed_at, or later if batches in flight hold it, unless
-- it is closed already (the first close time stays). Returns false if the
-- poll does not exist.
CREATE OR REPLACE FUNCTION close_poll(p_poll_id uuid, p_closed_at timestamptz) RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    closes_at timestamptz;
BEGIN
    IF p_closed_at IS NULL THEN
        RAISE EXCEPTION 'close_poll: p_closed_at must not be null'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Wait for the batches that read the poll open (they hold it FOR SHARE)
    -- to commit; from then on every batch sees closed_at. The close takes
    -- effect no earlier than that moment, so no vote those batches counted was
    -- received after closed_at (rule 6). PL/pgSQL, and the time in a
    -- variable: Citus refuses clock_timestamp() in the SET of an UPDATE.
    PERFORM FROM polls WHERE id = p_poll_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    closes_at := greatest(p_closed_at, clock_timestamp());
    UPDATE polls SET closed_at = closes_at WHERE id = p_poll_id AND closed_at IS NULL;
    RETURN true;
END
$$;
