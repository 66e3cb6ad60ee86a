-- Every SQL statement balancectl runs at run time, one named block each.
-- Loaded by name through balancectl.sql.loader; parameters use psycopg's %(name)s style.
-- Time is always the database's now(), never a node's clock.

-- name: database_now
SELECT now() AS now

-- name: max_connections
SELECT current_setting('max_connections')::int AS max_connections

-- name: schema_revision
SELECT version_num FROM alembic_version

-- name: get_user
SELECT id, balance FROM users WHERE id = %(user_id)s

-- name: change_balance
-- One atomic conditional change: no read-then-write, no lock taken up front. The
-- UPDATE applies only if the result stays within 0..2^63-1; under READ COMMITTED a
-- row changed by a concurrent transaction is re-checked against its newest version.
-- The bounds are written so that no comparison can overflow bigint for any
-- |amount| <= 10^12; the CHECK constraint backs the rule. The ledger row is written
-- by the same statement. A refusal modifies nothing, so it writes no WAL and waits
-- for no flush. `seen` is the balance in the statement's snapshot: when the UPDATE
-- refused and `seen` does not cover the change, the refusal was made against `seen`
-- (the caller reports it); when `seen` would have covered it, the row moved under
-- the statement and the caller tries again (see balancectl/balance.py).
WITH changed AS (
    UPDATE users
    SET balance = balance + %(amount)s::bigint
    WHERE id = %(user_id)s
      AND balance >= -%(amount)s::bigint
      AND balance <= 9223372036854775807 - greatest(%(amount)s::bigint, 0)
    RETURNING id, balance
), entry AS (
    INSERT INTO ledger (user_id, amount, balance_after)
    SELECT id, %(amount)s::bigint, balance FROM changed
)
SELECT (SELECT balance FROM changed) AS balance,
       (SELECT balance FROM users WHERE id = %(user_id)s) AS seen

-- name: change_balance_locked
-- The same change, deciding on the locked newest version of the row, so a refusal is
-- always against the current balance. Used only after a bounded number of races.
WITH target AS (
    SELECT id, balance FROM users WHERE id = %(user_id)s FOR UPDATE
), changed AS (
    UPDATE users u
    SET balance = t.balance + %(amount)s::bigint
    FROM target t
    WHERE u.id = t.id
      AND t.balance >= -%(amount)s::bigint
      AND t.balance <= 9223372036854775807 - greatest(%(amount)s::bigint, 0)
    RETURNING u.id, u.balance
), entry AS (
    INSERT INTO ledger (user_id, amount, balance_after)
    SELECT id, %(amount)s::bigint, balance FROM changed
)
SELECT (SELECT balance FROM changed) AS balance,
       (SELECT balance FROM target) AS seen

-- name: change_balance_once
-- The keyed change in one statement, so no lock outlives it: lock the row, decide the
-- outcome on it (200, 404 or 409, with the balance it leaves or was refused against),
-- insert the key together with that outcome, and change the balance and write the
-- ledger row only if this insert won the key. A concurrent request with the same key
-- waits on the key's unique index until the first commits, inserts nothing, and then
-- replays the stored outcome (get_idempotency_key). `status` is NULL when the key
-- existed already.
WITH target AS (
    SELECT id, balance FROM users WHERE id = %(user_id)s FOR UPDATE
), decided AS (
    SELECT t.id, t.balance AS seen,
           CASE WHEN t.id IS NULL THEN 404
                WHEN t.balance < -%(amount)s::bigint THEN 409
                WHEN t.balance > 9223372036854775807 - greatest(%(amount)s::bigint, 0) THEN 409
                ELSE 200
           END AS status
    FROM (VALUES (1)) AS one (x) LEFT JOIN target t ON true
), claimed AS (
    INSERT INTO idempotency_keys (key, user_id, amount, status_code, response)
    SELECT %(key)s, %(user_id)s, %(amount)s::bigint, d.status,
           jsonb_build_object('balance', CASE WHEN d.status = 200
                                              THEN d.seen + %(amount)s::bigint
                                              ELSE d.seen END)
    FROM decided d
    ON CONFLICT (key) DO NOTHING
    RETURNING status_code, response
), changed AS (
    UPDATE users u
    SET balance = d.seen + %(amount)s::bigint
    FROM decided d, claimed c
    WHERE u.id = d.id AND c.status_code = 200
    RETURNING u.id, u.balance
), entry AS (
    INSERT INTO ledger (user_id, amount, balance_after, idempotency_key)
    SELECT id, %(amount)s::bigint, balance, %(key)s FROM changed
)
SELECT c.status_code AS status, c.response
FROM (VALUES (1)) AS one (x) LEFT JOIN claimed c ON true

-- name: get_idempotency_key
SELECT user_id, amount, status_code, response
FROM idempotency_keys WHERE key = %(key)s

-- name: prune_idempotency_keys
-- Run inside the job's fenced transaction (``JobContext.execute``).
DELETE FROM idempotency_keys
WHERE created_at < now() - make_interval(secs => %(retention_seconds)s)
-- name: audit_ledger
-- Users whose balance differs from the sum of their ledger.
SELECT u.id AS user_id, u.balance, coalesce(l.total, 0) AS ledger_total
FROM users u
LEFT JOIN (SELECT user_id, sum(amount) AS total FROM ledger GROUP BY user_id) l
       ON l.user_id = u.id
WHERE u.balance <> coalesce(l.total, 0)

-- name: snapshot_totals
-- Fenced: writes only while the claim that runs it still holds its lease.
INSERT INTO balance_snapshots (taken_at, users, total_balance, ledger_entries, job_token)
SELECT now(), (SELECT count(*) FROM users), (SELECT coalesce(sum(balance), 0) FROM users),
       (SELECT count(*) FROM ledger), %(token)s
WHERE EXISTS (
    SELECT 1 FROM jobs
    WHERE name = %(job)s AND token = %(token)s AND lease_expires_at > now()
)
RETURNING id

-- name: prune_job_runs
DELETE FROM job_runs
WHERE finished_at < now() - make_interval(secs => %(retention_seconds)s)
  AND EXISTS (
    SELECT 1 FROM jobs
    WHERE name = %(job)s AND token = %(token)s AND lease_expires_at > now()
)

-- name: prune_nodes
DELETE FROM nodes
WHERE last_seen_at < now() - make_interval(secs => %(retention_seconds)s)
  AND EXISTS (
    SELECT 1 FROM jobs
    WHERE name = %(job)s AND token = %(token)s AND lease_expires_at > now()
)

-- name: fence_job
-- The fence of a job's writes: the first statement of every transaction a job
-- opens through its JobContext. It locks the job row FOR KEY SHARE while the
-- lease is still this run's; the claim's FOR UPDATE SKIP LOCKED (and the sweep
-- of expired leases) skip a locked row, so no other node can take the job until
-- this transaction commits or rolls back. The renewal's UPDATE (no key column)
-- does not conflict. A client that stalls inside the transaction loses it after
-- idle_timeout ms (set for this transaction only; works through PgBouncer).
WITH limits AS (
    SELECT set_config('idle_in_transaction_session_timeout', %(idle_timeout)s, true) AS set
)
SELECT j.token
FROM jobs j, limits
WHERE j.name = %(job)s AND j.token = %(token)s AND j.lease_expires_at > now()
FOR KEY SHARE OF j
-- name: register_node
INSERT INTO nodes (id, host, pid, started_at, last_seen_at, stopped_at)
VALUES (%(node)s, %(host)s, %(pid)s, now(), now(), NULL)
ON CONFLICT (id) DO UPDATE
SET host = EXCLUDED.host, pid = EXCLUDED.pid, started_at = now(),
    last_seen_at = now(), stopped_at = NULL
RETURNING started_at

-- name: stop_node
UPDATE nodes SET stopped_at = now(), last_seen_at = now() WHERE id = %(node)s

-- name: register_jobs
-- A node's jobs file adds or updates the jobs' definitions, never their leases:
-- one statement, so no lock outlives it.
INSERT INTO jobs (name, function, interval_seconds, min_duration_seconds, next_run_at)
SELECT name, function, interval_seconds, min_duration_seconds, now()
FROM unnest(%(names)s::text[], %(functions)s::text[], %(intervals)s::float8[],
            %(min_durations)s::float8[])
     AS spec(name, function, interval_seconds, min_duration_seconds)
ORDER BY name
ON CONFLICT (name) DO UPDATE
SET function = EXCLUDED.function,
    interval_seconds = EXCLUDED.interval_seconds,
    min_duration_seconds = EXCLUDED.min_duration_seconds
WHERE (jobs.function, jobs.interval_seconds, jobs.min_duration_seconds)
      IS DISTINCT FROM (EXCLUDED.function, EXCLUDED.interval_seconds,
                        EXCLUDED.min_duration_seconds)
-- name: claim_job
-- Claims at most one due job whose lease is free or expired. To spread evenly
-- without any node knowing another, a node claims only while it runs no more
-- jobs than the least loaded live node (the claiming node counts as live: it is
-- asking), and only once no live node has joined within the last `settle`
-- seconds (so nodes started together all count before anyone claims). After an
-- outage the node itself waits `settle` before it claims (runner.py), and for a
-- while counts as live every node that was live when it lost touch (`alive_at`:
-- the database time of its last heartbeat before the gap), so a peer slower to
-- reconnect still gets its share. A job that has waited past starve_after may
-- be taken by any node that has itself been connected that long (`may_starve`,
-- measured by the node on its monotonic clock), so a stuck peer cannot starve it;
-- the wait counts from when the last join's settle window closed.
-- A paused job (paused_at set by pause_job) is never claimed.
-- Increments the fencing token; records the expired claim's run as lost. A row
-- locked by a fenced write of the previous run is skipped until that commits;
-- started_at is read after the lock, so it is later than that commit. Also returns
-- when the job became claimable (`due_at`) and whether the claim took an expired
-- lease over (`took_over`), for the scheduler's metrics.
WITH alive AS (
    SELECT id, started_at AS joined FROM nodes
    WHERE stopped_at IS NULL
      AND (last_seen_at > least(now(), %(alive_at)s::timestamptz)
                          - make_interval(secs => %(lease_ttl)s)
           OR id = %(node)s)
), loads AS (
    SELECT a.id, count(j.name) AS running
    FROM alive a
    LEFT JOIN jobs j ON j.owner = a.id AND j.lease_expires_at > now()
    GROUP BY a.id
), mine AS (
    SELECT count(*) AS running FROM jobs
    WHERE owner = %(node)s AND lease_expires_at > now()
), candidate AS (
    SELECT name, owner, token, started_at, lease_expires_at, next_run_at
    FROM jobs
    WHERE name = ANY(%(names)s::text[])
      AND next_run_at <= now()
      AND paused_at IS NULL
      AND (owner IS NULL OR lease_expires_at <= now())
      AND (((SELECT running FROM mine) <= coalesce((SELECT min(running) FROM loads), 0)
            AND NOT EXISTS (SELECT 1 FROM alive
                            WHERE joined > now() - make_interval(secs => %(settle)s)))
           -- Waiting counts from when the job became claimable: for an expired lease,
           -- its expiry (next_run_at is then the due time before the lost run).
           -- A join holds every node back for `settle`: that time does not count.
           OR (greatest(next_run_at, lease_expires_at,
                        (SELECT max(joined) FROM alive) + make_interval(secs => %(settle)s))
                   <= now() - make_interval(secs => %(starve_after)s)
               AND %(may_starve)s::boolean))
    ORDER BY next_run_at, name
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE jobs j
    SET owner = %(node)s, token = j.token + 1, started_at = clock_timestamp(),
        lease_expires_at = clock_timestamp() + make_interval(secs => %(lease_ttl)s)
    FROM candidate c
    WHERE j.name = c.name
    RETURNING j.name, j.function, j.token, j.started_at, j.lease_expires_at,
              j.min_duration_seconds
), expired AS (
    -- Every other expired lease (a crash, a pause) is recorded lost and released
    -- here too, so history shows it at once even when no node may claim the job.
    SELECT name, owner, token, started_at, lease_expires_at FROM jobs
    WHERE owner IS NOT NULL AND lease_expires_at <= now()
      AND name NOT IN (SELECT name FROM candidate)
    FOR UPDATE SKIP LOCKED
), swept AS (
    UPDATE jobs j
    SET owner = NULL, lease_expires_at = NULL, next_run_at = e.lease_expires_at
    FROM expired e
    WHERE j.name = e.name
    RETURNING j.name
), lost AS (
    INSERT INTO job_runs (job, node, token, started_at, finished_at, status, error)
    SELECT c.name, c.owner, c.token, c.started_at,
           greatest(c.started_at, c.lease_expires_at), 'lost',
           'lease expired; taken over by ' || %(node)s
    FROM candidate c
    WHERE c.owner IS NOT NULL
    UNION ALL
    SELECT e.name, e.owner, e.token, e.started_at,
           greatest(e.started_at, e.lease_expires_at), 'lost',
           'lease expired; recorded by ' || %(node)s
    FROM expired e
    ON CONFLICT (job, token) DO NOTHING
)
SELECT cl.name, cl.function, cl.token, cl.started_at, cl.min_duration_seconds,
       greatest(c.next_run_at, c.lease_expires_at) AS due_at, c.owner IS NOT NULL AS took_over
FROM claimed cl JOIN candidate c ON c.name = cl.name
-- name: renew_leases
-- One statement per renewal period: extends only the leases this node still holds
-- under the given tokens, heartbeats the node, and returns the database's now()
-- (the runner compares its progress with the monotonic clock: a forward step).
-- A lease this node holds but does not know of (`known`: every run it has, renewed
-- or not; a claim whose answer never arrived in time) is released without a history
-- row, since it never ran; only once it is older than `claim_deadline`, after which
-- the node drops any answer. `stop`: the renewed runs an operator's pause asked to
-- stop (pause_job_stop); the node stops them and records them cancelled, renewing
-- their leases until then.
WITH renewed AS (
    UPDATE jobs j
    SET lease_expires_at = now() + make_interval(secs => %(lease_ttl)s)
    FROM unnest(%(names)s::text[], %(tokens)s::bigint[]) AS held(name, token)
    WHERE j.name = held.name AND j.token = held.token
      AND j.owner = %(node)s AND j.lease_expires_at > now()
    RETURNING j.name, j.stop_token IS NOT DISTINCT FROM held.token AS stop
), unknown AS (
    UPDATE jobs j
    SET owner = NULL, lease_expires_at = NULL
    WHERE j.owner = %(node)s AND j.lease_expires_at > now()
      AND NOT (j.name = ANY(%(known)s::text[]))
      AND j.started_at <= now() - make_interval(secs => %(claim_deadline)s)
    RETURNING j.name
), heartbeat AS (
    UPDATE nodes SET last_seen_at = now() WHERE id = %(node)s AND stopped_at IS NULL
    RETURNING id
)
SELECT now() AS now, (SELECT count(*) FROM heartbeat) AS seen,
       (SELECT count(*) FROM unknown) AS released,
       coalesce((SELECT array_agg(name) FROM renewed), ARRAY[]::text[]) AS renewed,
       coalesce((SELECT array_agg(name) FROM renewed WHERE stop), ARRAY[]::text[]) AS stop

-- name: finish_run
-- Records a claim's run once and releases the job, only under its token.
-- A lease that already expired, or a run the node gave up (lost, timed_out,
-- unresponsive, crashed), ends no later than now() and no earlier than its start,
-- and the job is due no sooner than the lease's expiry, so no runs overlap (a lost
-- run is due again then; one that misbehaved keeps its interval). A run cancelled
-- after its work was done (waiting out min_duration) keeps its interval too.
-- A run asked for while this one ran (run_job_now moved next_run_at past its start,
-- which a claim never leaves it) is due at once instead of after the interval.
WITH held AS (
    SELECT name, token, started_at, lease_expires_at, interval_seconds,
           (lease_expires_at <= now()) AS expired,
           (next_run_at > started_at) AS requested,
           %(status)s IN ('lost', 'timed_out', 'unresponsive', 'crashed') AS gave_up
    FROM jobs
    WHERE name = %(job)s AND token = %(token)s AND owner = %(node)s
    FOR UPDATE
), released AS (
    UPDATE jobs j
    SET owner = NULL, lease_expires_at = NULL,
        next_run_at = CASE
            WHEN h.expired OR %(status)s = 'lost' THEN greatest(h.lease_expires_at, now())
            WHEN h.gave_up THEN greatest(CASE WHEN h.requested THEN now()
                                              ELSE h.started_at
                                                   + make_interval(secs => h.interval_seconds)
                                         END, h.lease_expires_at, now())
            WHEN h.requested OR (%(status)s = 'cancelled' AND NOT %(work_done)s) THEN now()
            ELSE greatest(h.started_at + make_interval(secs => h.interval_seconds), now())
        END
    FROM held h
    WHERE j.name = h.name
    RETURNING j.name
)
INSERT INTO job_runs (job, node, token, started_at, finished_at, status, error)
SELECT h.name, %(node)s, h.token, h.started_at,
       greatest(h.started_at, least(h.lease_expires_at, now())),
       CASE WHEN h.expired AND NOT h.gave_up THEN 'lost' ELSE %(status)s END,
       CASE WHEN h.expired AND NOT h.gave_up THEN coalesce(%(error)s, 'lease expired')
            ELSE %(error)s END
FROM held h
ON CONFLICT (job, token) DO NOTHING
RETURNING id, status
-- name: list_jobs
SELECT now() AS now, j.name, j.function, j.interval_seconds,
       (j.owner IS NOT NULL AND j.lease_expires_at > now()) AS running, j.paused_at,
       j.owner, j.started_at, extract(epoch FROM now() - j.started_at)::float8 AS elapsed_seconds,
       j.next_run_at,
       r.id AS run_id, r.node AS run_node, r.token AS run_token, r.started_at AS run_started_at,
       r.finished_at AS run_finished_at, r.status AS run_status, r.error AS run_error
FROM jobs j
LEFT JOIN LATERAL (
    SELECT id, node, token, started_at, finished_at, status, error
    FROM job_runs WHERE job = j.name
    ORDER BY started_at DESC, id DESC LIMIT 1
) r ON true
ORDER BY j.name

-- name: run_job_now
-- An operator's "run it now", one statement. A waiting job becomes due at once; a
-- running one keeps its run, and next_run_at moves just past that run's start, which
-- finish_run reads as "due again as soon as this run ends" (a claim only ever takes a
-- job whose next_run_at is before its new started_at). A paused job is left as it is
-- (the caller answers 409).
UPDATE jobs
SET next_run_at = CASE
    WHEN paused_at IS NOT NULL THEN next_run_at
    WHEN owner IS NOT NULL AND lease_expires_at > now()
        THEN greatest(next_run_at, now(), started_at + interval '1 microsecond')
    ELSE least(next_run_at, now())
END
WHERE name = %(job)s
RETURNING name, paused_at IS NOT NULL AS paused

-- name: pause_job
-- A paused job is never claimed (claim_job); a run in progress finishes as usual.
UPDATE jobs SET paused_at = coalesce(paused_at, now())
WHERE name = %(job)s
RETURNING name, paused_at IS NOT NULL AS paused

-- name: pause_job_stop
-- The same pause, and the run in progress (if any) is to stop: its node reads
-- stop_token at its next renewal (renew_leases) and records the run cancelled.
UPDATE jobs
SET paused_at = coalesce(paused_at, now()),
    stop_token = CASE WHEN owner IS NOT NULL AND lease_expires_at > now() THEN token
                      ELSE stop_token END
WHERE name = %(job)s
RETURNING name, paused_at IS NOT NULL AS paused

-- name: resume_job
-- An overdue job becomes due from now, so its paused time does not count as starving
-- (claim_job's starve_after); a running job's next_run_at is left alone (finish_run
-- reads it).
UPDATE jobs
SET paused_at = NULL,
    stop_token = NULL,  -- a stop not yet carried out is called off
    next_run_at = CASE
        WHEN paused_at IS NULL OR (owner IS NOT NULL AND lease_expires_at > now())
            THEN next_run_at
        ELSE greatest(next_run_at, now())
    END
WHERE name = %(job)s
RETURNING name, paused_at IS NOT NULL AS paused

-- name: job_history
SELECT id, job, node, token, started_at, finished_at, status, error
FROM job_runs
WHERE (%(job)s::text IS NULL OR job = %(job)s::text)
  AND (%(node)s::text IS NULL OR node = %(node)s::text)
ORDER BY started_at DESC, id DESC
LIMIT %(limit)s

-- name: list_nodes
SELECT id, host, pid, started_at, last_seen_at,
       (stopped_at IS NULL AND last_seen_at > now() - make_interval(secs => %(lease_ttl)s)) AS alive
FROM nodes ORDER BY id

-- name: dashboard_timeline
-- The runs the dashboard's timeline draws: those that finished in the last `minutes`
-- minutes (newest first, at most `limit`), and every claim in progress, open-ended:
-- `running` while its lease holds, `expired` once it ran out and nobody has taken the
-- job over yet (the takeover records it as lost).
(SELECT job, node, token, started_at, finished_at, status, error
 FROM job_runs
 WHERE finished_at > now() - make_interval(mins => %(minutes)s)
 ORDER BY finished_at DESC
 LIMIT %(limit)s)
UNION ALL
SELECT name, owner, token, started_at, NULL,
       CASE WHEN lease_expires_at > now() THEN 'running' ELSE 'expired' END, NULL
FROM jobs
WHERE owner IS NOT NULL

-- name: dashboard_summary
-- One row: the database's now, the runs finished in the last hour by job and status
-- (a JSON object: job -> status -> count), the money (sums as text: they may pass what a JSON number holds
-- exactly), and the newest finished run of the ledger audit (the jobs whose function is
-- `audit_function`).
SELECT now() AS now,
       (SELECT coalesce(jsonb_object_agg(job, counts), jsonb_build_object())
        FROM (SELECT job, jsonb_object_agg(status, runs) AS counts
              FROM (SELECT job, status, count(*) AS runs FROM job_runs
                    WHERE finished_at > now() - interval '1 hour'
                    GROUP BY job, status) by_status
              GROUP BY job) by_job) AS last_hour,
       (SELECT count(*) FROM users) AS users,
       (SELECT coalesce(sum(balance), 0) FROM users)::text AS total_balance,
       (SELECT coalesce(sum(amount), 0) FROM ledger)::text AS ledger_sum,
       audit.job AS audit_job, audit.status AS audit_status,
       audit.finished_at AS audit_finished_at, audit.error AS audit_error
FROM (VALUES (1)) AS one (x)
LEFT JOIN LATERAL (
    SELECT r.job, r.status, r.finished_at, r.error
    FROM job_runs r JOIN jobs j ON j.name = r.job
    WHERE j.function = %(audit_function)s
    ORDER BY r.finished_at DESC, r.id DESC
    LIMIT 1
) audit ON true

-- name: record_request_outcomes
-- One worker's counts since its last record, added to its row of this second (database
-- clock); `outcomes` and `counts` are arrays of the same length.
INSERT INTO request_outcomes (bucket, node_id, worker, outcome, requests)
SELECT date_trunc('second', now()), %(node_id)s, %(worker)s, counted.outcome, counted.requests
FROM unnest(%(outcomes)s::text[], %(counts)s::bigint[]) AS counted (outcome, requests)
ON CONFLICT (bucket, node_id, worker, outcome)
DO UPDATE SET requests = request_outcomes.requests + excluded.requests

-- name: prune_request_outcomes
DELETE FROM request_outcomes
WHERE bucket < now() - make_interval(secs => %(retention_seconds)s)

-- name: dashboard_requests
-- The balance route's answers of the last `seconds` seconds, by outcome, every node's.
SELECT outcome, sum(requests)::bigint AS requests
FROM request_outcomes
WHERE bucket > now() - make_interval(secs => %(seconds)s)
GROUP BY outcome
