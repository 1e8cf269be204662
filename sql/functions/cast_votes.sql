-- sql/functions/cast_votes.sql: the vote rules, once, for the votes of the
-- polls p_polls; cast_vote_atomic and cast_poll_votes (cast_vote_atomic.sql)
-- are its two entry points.
--
-- A worker calls cast_vote_atomic once per batch read from the streams (one
-- round trip). It records each vote once, keeps each voter's current ballot,
-- moves the tallies, and returns every vote's outcome and the tallies of each
-- poll the batch named. The rules it enforces are numbered as in docs/guarantees.md:
--
--   1. Single-vote poll: at most one counted ballot per voter; a later ballot
--      (greater (received_at, vote_id)) replaces the earlier one and the tallies
--      move with it, whatever order the batches commit in.
--   2. Multiple-vote poll: every distinct vote_id counts.
--   3. The same vote_id twice counts once, in both kinds of poll.
--   4. A ballot with k options adds one to each; total_ballots counts ballots.
--   5. version grows by one per batch that changed the poll's tallies.
--
-- Concurrency (READ COMMITTED): batches may overlap in polls, voters and even
-- vote_ids. Locks are taken in one global order of phases: (0) polls rows,
-- shared (close_poll takes nothing else, so it closes no cycle), (a) votes rows,
-- (b) voter_ballots rows, (c) tallies rows, (d) poll_counters rows, and within
-- a phase in key order. A transaction in a phase only waits for a transaction
-- that holds the key it wants, and so is in the same phase or a later one
-- (e.g. (a) waiting on a vote row that (b) of another batch marks not
-- counted). Around a cycle of waits, phases can then never decrease, so all
-- would be in one phase, where keys are taken in ascending order: each waits
-- for a key greater than every key it holds, which cannot close a cycle. So
-- no deadlock. Each phase is a statement of its own, because under READ
-- COMMITTED a statement sees only what committed before it began, and the
-- next phase must see what the transactions it waited for committed.
--
-- No loop over votes: each step is one set-based statement over the batch,
-- carried from step to step in the array w.
--
-- Every statement that reads or writes a table names p_polls: with one poll,
-- each statement concerns one poll only, which is what lets Citus run a call
-- of cast_poll_votes on the worker node that holds that poll's rows
-- (sql/citus/, docs/scaling.md).

CREATE OR REPLACE FUNCTION cast_votes(p_polls uuid[], p_votes vote_in[])
RETURNS TABLE (
    vote_id       uuid,
    poll_id       uuid,
    outcome       text,
    version       bigint,
    total_ballots bigint,
    option_ids    uuid[],
    votes         bigint[]
)
LANGUAGE plpgsql
-- A distributed function runs on a Citus worker without the caller's
-- search_path: it keeps the one the schema was created with.
SET search_path FROM CURRENT
AS $$
#variable_conflict use_column
DECLARE
    w cast_vote_work[];
    -- Stored ballots replaced by this batch (rule 1), their votes to subtract.
    replaced voter_ballots[];
    -- Per (poll, option) change of the tallies, and per poll of total_ballots.
    delta_poll uuid[];
    delta_option uuid[];
    delta_votes bigint[];
    ballots_poll uuid[];
    ballots_delta bigint[];
    -- Ballots that became their voter's latest of the batch after (a) found
    -- the first choice already recorded.
    promoted_vote uuid[];
    promoted_poll uuid[];
BEGIN
    -- Every vote names one of p_polls (or no poll at all: unknown_poll).
    IF EXISTS (SELECT FROM unnest(p_votes) AS v
               WHERE v.poll_id IS NOT NULL AND v.poll_id <> ALL (coalesce(p_polls, '{}')))
    THEN
        RAISE EXCEPTION 'cast_votes: a vote names a poll outside p_polls'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- Check each vote against its poll; decide what needs no lock: unknown
    -- poll, invalid, a repeat of a vote_id earlier in the batch (rule 3: the
    -- first counts), received after close, and for single-vote polls which of
    -- a voter's ballots in this batch is the latest (rule 1). The polls rows
    -- are read FOR SHARE, in id order, before any other lock (phase 0): many
    -- batches share them, while close_poll waits until the batches that read
    -- the poll open have committed, and only then sets closed_at. So a vote
    -- counted as received before the close really was (rule 6), however
    -- close and batches interleave.
    WITH input AS (
        SELECT t.ord::int AS ord, t.vote_id, t.poll_id, t.voter COLLATE "C" AS voter,
               t.option_ids,
               -- Exact: microseconds to interval is integer arithmetic. Out of
               -- range (year 10000 on) would fail the whole batch: invalid.
               CASE WHEN t.received_us BETWEEN 0 AND 253402300799999999
                    THEN timestamptz 'epoch' + t.received_us * interval '1 microsecond'
               END AS received_at
        FROM unnest(p_votes) WITH ORDINALITY
             AS t(vote_id, poll_id, voter, option_ids, received_us, ord)
    ),
    poll AS (
        SELECT p.id, p.allow_multiple_votes, p.max_choices, p.closed_at, p.expires_at,
               ARRAY(SELECT o.id FROM options AS o WHERE o.poll_id = p.id) AS option_set
        FROM polls AS p
        WHERE p.id = ANY (p_polls)
        ORDER BY p.id
        FOR SHARE OF p
    ),
    checked AS (
        SELECT i.*,
               NOT p.allow_multiple_votes AS single,
               coalesce(i.received_at > p.closed_at OR i.received_at >= p.expires_at, false)
                   AS closed,
               CASE
                   WHEN p.id IS NULL THEN 'unknown_poll'
                   WHEN i.vote_id IS NULL
                     OR i.received_at IS NULL
                     -- "u:" or "f:" and an id of at most 128 characters
                     OR i.voter IS NULL OR i.voter = '' OR length(i.voter) > 130
                     OR i.option_ids IS NULL
                     OR array_ndims(i.option_ids) <> 1
                     OR cardinality(i.option_ids) NOT BETWEEN 1 AND p.max_choices
                     -- also false for a null element
                     OR NOT i.option_ids <@ p.option_set
                     OR (cardinality(i.option_ids) > 1
                         AND cardinality(i.option_ids)
                             <> (SELECT count(DISTINCT x) FROM unnest(i.option_ids) AS x))
                   THEN 'invalid'
               END AS outcome
        FROM input AS i LEFT JOIN poll AS p ON p.id = i.poll_id
    ),
    deduplicated AS (
        SELECT c.ord, c.vote_id, c.poll_id, c.voter, c.option_ids, c.received_at, c.single,
               c.closed,
               CASE
                   WHEN c.outcome IS NULL
                    AND row_number() OVER (PARTITION BY c.poll_id, c.vote_id, c.outcome
                                           ORDER BY c.ord) > 1
                   THEN 'duplicate'
                   ELSE c.outcome
               END AS outcome
        FROM checked AS c
    ),
    ranked AS (
        SELECT d.*,
               d.outcome IS NULL AND d.single AND NOT d.closed
                   AND row_number() OVER (
                       PARTITION BY d.poll_id, d.voter,
                                    d.outcome IS NULL AND d.single AND NOT d.closed
                       ORDER BY d.received_at DESC, d.vote_id DESC) = 1
                   AS latest
        FROM deduplicated AS d
    )
    SELECT array_agg(ROW(
               r.ord, r.vote_id, r.poll_id, r.voter, r.option_ids, r.received_at, r.single,
               r.closed, r.latest, r.outcome
           )::cast_vote_work)
    INTO w
    FROM ranked AS r;

    IF w IS NULL THEN
        RETURN;  -- empty batch
    END IF;

    -- (a) Record the votes, sorted by (poll_id, vote_id). A vote_id already
    -- recorded, even by a transaction still in flight (we wait for it), is not
    -- returned: a duplicate (rule 3). A ballot is inserted counted unless it
    -- was received after close or, in a single-vote poll, the same voter has a
    -- later ballot in this batch; the latest one is 'pending' until (b).
    -- Which ballot is a voter's latest is decided again among those actually
    -- recorded: when the latest of the batch turns out to be a duplicate (a
    -- resent vote_id), the next one is the voter's latest, and is marked
    -- counted below (rule 1: a resent ballot must not hide a later one).
    WITH inserted AS (
        INSERT INTO votes AS v (poll_id, vote_id, voter, option_ids, received_at, counted)
        SELECT x.poll_id, x.vote_id, x.voter, x.option_ids, x.received_at,
               NOT x.closed AND (NOT x.single OR x.latest)
        FROM unnest(w) AS x
        WHERE x.outcome IS NULL
        ORDER BY x.poll_id, x.vote_id
        ON CONFLICT ON CONSTRAINT votes_pkey DO NOTHING
        RETURNING v.poll_id, v.vote_id
    ),
    recorded AS (
        SELECT x.*, ins.vote_id IS NOT NULL AS new,
               ins.vote_id IS NOT NULL AND x.single AND NOT x.closed AS contender
        FROM unnest(w) AS x
        LEFT JOIN inserted AS ins
               ON x.outcome IS NULL AND ins.poll_id = x.poll_id AND ins.vote_id = x.vote_id
    ),
    reranked AS (
        SELECT r.*,
               r.contender AND row_number() OVER (
                   PARTITION BY r.poll_id, r.voter, r.contender
                   ORDER BY r.received_at DESC, r.vote_id DESC) = 1 AS recorded_latest
        FROM recorded AS r
    )
    SELECT array_agg(ROW(
               x.ord, x.vote_id, x.poll_id, x.voter, x.option_ids, x.received_at, x.single,
               x.closed, x.recorded_latest,
               CASE
                   WHEN x.outcome IS NOT NULL THEN x.outcome
                   WHEN NOT x.new THEN 'duplicate'
                   WHEN x.closed THEN 'closed'
                   WHEN NOT x.single THEN 'counted'  -- rule 2
                   WHEN NOT x.recorded_latest THEN 'replaced'
                   ELSE 'pending'
               END
           )::cast_vote_work),
           array_agg(x.vote_id) FILTER (WHERE x.recorded_latest AND NOT x.latest),
           array_agg(x.poll_id) FILTER (WHERE x.recorded_latest AND NOT x.latest)
    INTO w, promoted_vote, promoted_poll
    FROM reranked AS x;

    IF promoted_vote IS NOT NULL THEN
        -- Rows this transaction has just inserted: no other transaction can
        -- hold them, so no lock order is at stake.
        UPDATE votes AS v
        SET counted = true
        FROM unnest(promoted_poll, promoted_vote) AS p(poll_id, vote_id)
        WHERE v.poll_id = ANY (p_polls) AND v.poll_id = p.poll_id AND v.vote_id = p.vote_id;
    END IF;

    -- (b) Rule 1, for the batch's latest ballot of each (poll, voter).
    IF EXISTS (SELECT FROM unnest(w) AS x WHERE x.outcome = 'pending') THEN
        -- A voter without a current ballot: this one is it, counted. Sorted by
        -- (poll_id, voter); a row another transaction is inserting is waited
        -- for and then left to the next step.
        WITH inserted AS (
            INSERT INTO voter_ballots AS b (poll_id, voter, vote_id, received_at, option_ids)
            SELECT x.poll_id, x.voter, x.vote_id, x.received_at, x.option_ids
            FROM unnest(w) AS x
            WHERE x.outcome = 'pending'
            ORDER BY x.poll_id, x.voter
            ON CONFLICT ON CONSTRAINT voter_ballots_pkey DO NOTHING
            RETURNING b.poll_id, b.voter
        )
        SELECT array_agg(ROW(
                   x.ord, x.vote_id, x.poll_id, x.voter, x.option_ids, x.received_at, x.single,
                   x.closed, x.latest,
                   CASE WHEN ins.voter IS NOT NULL THEN 'counted' ELSE x.outcome END
               )::cast_vote_work)
        INTO w
        FROM unnest(w) AS x
        LEFT JOIN inserted AS ins
               ON x.outcome = 'pending' AND ins.poll_id = x.poll_id AND ins.voter = x.voter;
    END IF;

    IF EXISTS (SELECT FROM unnest(w) AS x WHERE x.outcome = 'pending') THEN
        -- A voter with a current ballot: lock it, sorted by (poll_id, voter).
        -- Only the lock is used from this statement: a row that another
        -- transaction updated meanwhile is locked in its latest version but,
        -- as PostgreSQL rechecks the join against it, may be left out of the
        -- result. The next statement reads the locked rows afresh.
        PERFORM
        FROM voter_ballots AS vb
        WHERE vb.poll_id = ANY (p_polls)
          AND (vb.poll_id, vb.voter) IN (
            SELECT x.poll_id, x.voter FROM unnest(w) AS x WHERE x.outcome = 'pending')
        ORDER BY vb.poll_id, vb.voter
        FOR UPDATE;

        -- The later of the stored and the batch's ballot becomes (or stays)
        -- current and counted; the other is marked not counted. The rows
        -- touched are locked already (a voter's vote rows are only written
        -- under that voter's voter_ballots lock, or are this batch's own), so
        -- the order of these updates does not matter.
        WITH compared AS (
            SELECT x.ord, x.poll_id, x.voter, x.vote_id, x.received_at, x.option_ids,
                   s AS stored,
                   (x.received_at, x.vote_id) > (s.received_at, s.vote_id) AS later
            FROM unnest(w) AS x
            JOIN voter_ballots AS s ON s.poll_id = x.poll_id AND s.voter = x.voter
            WHERE x.outcome = 'pending' AND s.poll_id = ANY (p_polls)
        ),
        new_current AS (
            UPDATE voter_ballots AS vb
            SET vote_id = c.vote_id, received_at = c.received_at, option_ids = c.option_ids
            FROM compared AS c
            WHERE c.later AND vb.poll_id = ANY (p_polls)
              AND vb.poll_id = c.poll_id AND vb.voter = c.voter
        ),
        uncounted AS (
            UPDATE votes AS v
            SET counted = false
            FROM compared AS c
            WHERE v.poll_id = ANY (p_polls) AND v.poll_id = c.poll_id
              AND v.vote_id = CASE WHEN c.later THEN (c.stored).vote_id ELSE c.vote_id END
        )
        SELECT array_agg(ROW(
                   x.ord, x.vote_id, x.poll_id, x.voter, x.option_ids, x.received_at, x.single,
                   x.closed, x.latest,
                   CASE WHEN c.later THEN 'counted' WHEN NOT c.later THEN 'replaced'
                        ELSE x.outcome END
               )::cast_vote_work),
               -- the stored ballots this batch replaced
               (SELECT array_agg(c.stored) FROM compared AS c WHERE c.later)
        INTO w, replaced
        FROM unnest(w) AS x
        LEFT JOIN compared AS c ON c.ord = x.ord;

        IF EXISTS (SELECT FROM unnest(w) AS x WHERE x.outcome = 'pending') THEN
            RAISE EXCEPTION 'cast_votes: a voter_ballots row disappeared';
        END IF;
    END IF;

    -- Rule 4: each newly counted ballot adds one to each of its options and
    -- to total_ballots; each stored ballot it replaced subtracts the same.
    SELECT array_agg(t.poll_id ORDER BY t.poll_id, t.option_id),
           array_agg(t.option_id ORDER BY t.poll_id, t.option_id),
           array_agg(t.delta ORDER BY t.poll_id, t.option_id)
    INTO delta_poll, delta_option, delta_votes
    FROM (
        SELECT s.poll_id, s.option_id, sum(s.delta)::bigint AS delta
        FROM (
            SELECT x.poll_id, u.option_id, 1 AS delta
            FROM unnest(w) AS x CROSS JOIN LATERAL unnest(x.option_ids) AS u(option_id)
            WHERE x.outcome = 'counted'
            UNION ALL
            SELECT r.poll_id, u.option_id, -1
            FROM unnest(replaced) AS r CROSS JOIN LATERAL unnest(r.option_ids) AS u(option_id)
        ) AS s
        GROUP BY s.poll_id, s.option_id
        HAVING sum(s.delta) <> 0
    ) AS t;

    -- The polls whose tallies or total_ballots change, with the change of
    -- total_ballots (a ballot can replace one with more options, so one may
    -- change without the other).
    SELECT array_agg(b.poll_id ORDER BY b.poll_id), array_agg(b.delta ORDER BY b.poll_id)
    INTO ballots_poll, ballots_delta
    FROM (
        SELECT s.poll_id, sum(s.delta)::bigint AS delta
        FROM (
            SELECT x.poll_id, 1 AS delta FROM unnest(w) AS x WHERE x.outcome = 'counted'
            UNION ALL
            SELECT r.poll_id, -1 FROM unnest(replaced) AS r
            UNION ALL
            SELECT d.poll_id, 0 FROM unnest(delta_poll) AS d(poll_id)
        ) AS s
        GROUP BY s.poll_id
        HAVING sum(s.delta) <> 0 OR s.poll_id = ANY (delta_poll)
    ) AS b;

    IF delta_poll IS NOT NULL THEN
        -- (c) Rule 4: lock the tallies that change, sorted by (poll_id,
        -- option_id), then apply the deltas (the lock alone is used from the
        -- first statement, as in (b)). Several batches on one hot poll
        -- queue here, for the short rest of their transaction only.
        PERFORM
        FROM tallies AS t
        WHERE t.poll_id = ANY (p_polls)
          AND (t.poll_id, t.option_id) IN (
            SELECT d.poll_id, d.option_id
            FROM unnest(delta_poll, delta_option) AS d(poll_id, option_id))
        ORDER BY t.poll_id, t.option_id
        FOR UPDATE;

        UPDATE tallies AS t
        SET votes = t.votes + d.delta
        FROM unnest(delta_poll, delta_option, delta_votes) AS d(poll_id, option_id, delta)
        WHERE t.poll_id = ANY (p_polls) AND t.poll_id = d.poll_id AND t.option_id = d.option_id;
    END IF;

    IF ballots_poll IS NOT NULL THEN
        -- (d) Rule 5: one version per batch for each poll it changed (and only
        -- those), locked in poll_id order.
        PERFORM
        FROM poll_counters AS pc
        WHERE pc.poll_id = ANY (p_polls) AND pc.poll_id = ANY (ballots_poll)
        ORDER BY pc.poll_id
        FOR UPDATE;

        UPDATE poll_counters AS pc
        SET total_ballots = pc.total_ballots + d.delta,
            version = pc.version + 1,
            updated_at = now()
        FROM unnest(ballots_poll, ballots_delta) AS d(poll_id, delta)
        WHERE pc.poll_id = ANY (p_polls) AND pc.poll_id = d.poll_id;
    END IF;

    -- One row per input vote, in input order.
    RETURN QUERY
    SELECT x.vote_id, x.poll_id, x.outcome,
           NULL::bigint, NULL::bigint, NULL::uuid[], NULL::bigint[]
    FROM unnest(w) AS x
    ORDER BY x.ord;

    -- Then one 'tally' row per existing poll the batch named, changed or not,
    -- so that a redelivered batch can republish them. Options in position
    -- order.
    RETURN QUERY
    SELECT NULL::uuid, pc.poll_id, 'tally'::text, pc.version, pc.total_ballots,
           array_agg(t.option_id ORDER BY o.position),
           array_agg(t.votes ORDER BY o.position)
    FROM poll_counters AS pc
    JOIN tallies AS t ON t.poll_id = pc.poll_id
    JOIN options AS o ON o.poll_id = t.poll_id AND o.id = t.option_id
    WHERE pc.poll_id = ANY (p_polls)
      AND pc.poll_id IN (SELECT x.poll_id FROM unnest(w) AS x WHERE x.outcome <> 'unknown_poll')
    GROUP BY pc.poll_id, pc.version, pc.total_ballots
    ORDER BY pc.poll_id;
END
$$;
