"""The durable scheduler: the loops' timed work (expiries, deadlines, weekly cards, nudges) in `loop_jobs`.

`schedule(session, kind, run_at, payload, key)` adds a job inside the caller's transaction, once per key
(the same key again changes nothing, unless its job was cancelled: then it is scheduled anew).
`cancel(session, key)` sets a pending job's status to 'cancelled' — a plain value of the free-string
column, final like 'done' and 'failed' — and a run of it in flight then commits nothing.

Any number of `Scheduler`s, in any processes, may serve one database; each job runs at least once, its
database effects land exactly once:

- Claim. A job is due when `status = 'pending'`, `run_at <= now` and no lease holds it (`lease_until`
  null or past). A worker claims the next due job (earliest `run_at`, then `id`) with one conditional
  UPDATE that re-checks dueness and sets `lease_owner`, `lease_until = now + lease` and `attempts + 1`;
  on PostgreSQL it picks the job with `FOR UPDATE SKIP LOCKED`, on SQLite the write lock serialises
  claims. No two workers hold a job at once. `attempts` after the claim fences the claim: every later
  write about the job requires this owner, this `attempts` and 'pending'.
- Run. The handler's writes and the fenced UPDATE to 'done' share one transaction. If that UPDATE matches
  no row (the lease ran out and another worker claimed the job, or it was cancelled), everything rolls
  back (`stats.lost_lease`). The after-commit step the handler returns (socket pushes, …) runs only once
  the commit succeeded, best-effort like a consumer's.
- Lease. While a handler runs, its lease is renewed every `lease / 3`; a handler still running after
  `timeout` is cancelled and counts as a failure.
- Failure. A handler that raises (or a kind without a handler here: another release may know it) rolls
  back; the job keeps `last_error`, frees its lease and is due again `retry_backoff * 2 ** (attempts - 1)`
  later. After `max_attempts` it is 'failed', kept for inspection and logged as an error.
- Crash. A worker that dies mid-job stops renewing; once its lease has passed, another worker claims the
  job and runs it again. A job whose claims keep ending without a result (one that kills its worker) is
  failed, not run, when claimed more than `max_attempts` times.

Leases compare the workers' clocks: skew can only make a takeover early or late, never land a job's
effects twice (the fence).

`run_due()` runs every job due at `clock.now()`, one after the other: tests drive it with a
`ManualClock`. `start()` runs it every `poll` seconds in the background (`SystemClock` by default);
`stop()` lets the current job finish. Cancelling a task that is running a job leaves the lease to
expire, exactly as if the process had died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from metrics.consumers import AfterCommit
from store import Database, LoopJob, dialect_insert, utcnow

from .clock import Clock, SystemClock

log = logging.getLogger(__name__)

PENDING, DONE, FAILED, CANCELLED = "pending", "done", "failed", "cancelled"

JobHandler = Callable[[AsyncSession, LoopJob], Awaitable[AfterCommit | None]]
"""Does a job's database work in the session it is given (the transaction that marks the job done) and
may return a step to run after the commit. The job is a detached snapshot: read it, do not change it."""

_NO_SYNC = {"synchronize_session": False}


async def schedule(
    session: AsyncSession, kind: str, run_at: datetime, payload: dict[str, Any], key: str
) -> bool:
    """Schedule `kind` at `run_at` in the caller's transaction; True if this call added (or revived a
    cancelled) job, False if `key` already names a pending, done or failed one, which stays as it is."""
    if run_at.tzinfo is None:
        raise ValueError("run_at must be an aware datetime")
    if not 0 < len(kind) <= 40 or not 0 < len(key) <= 160:
        raise ValueError("a job needs a kind of 1-40 and a key of 1-160 characters")
    insert = dialect_insert(session.get_bind().dialect.name)
    row = {"kind": kind, "key": key, "run_at": run_at, "payload": payload, "created_at": utcnow()}
    stmt = insert(LoopJob).values(status=PENDING, attempts=0, **row)
    stmt = stmt.on_conflict_do_update(
        index_elements=["key"],
        set_={
            **{name: stmt.excluded[name] for name in row},
            "status": PENDING,
            "attempts": 0,
            "lease_owner": None,
            "lease_until": None,
            "last_error": None,
            "finished_at": None,
        },
        where=LoopJob.status == CANCELLED,
    )
    return (await session.execute(stmt.returning(LoopJob.id))).first() is not None


async def cancel(session: AsyncSession, key: str) -> bool:
    """Cancel the pending job `key` in the caller's transaction (status 'cancelled'); False if there is
    none. A run of it in flight then rolls back instead of committing."""
    result = await session.execute(
        update(LoopJob)
        .where(LoopJob.key == key, LoopJob.status == PENDING)
        .values(status=CANCELLED, lease_until=None, finished_at=utcnow())
        .returning(LoopJob.id)
    )
    return result.first() is not None


@dataclass
class SchedulerStats:
    claimed: int = 0
    ran: int = 0  # committed as done
    retried: int = 0  # failed, due again after the backoff
    failed: int = 0  # given up: status 'failed'
    lost_lease: int = 0  # finished without holding the job any more; nothing committed
    renewed: int = 0


class _LeaseLost(Exception):
    pass


def _due(job: Any, now: datetime) -> ColumnElement[bool]:
    return and_(
        job.status == PENDING, job.run_at <= now, or_(job.lease_until.is_(None), job.lease_until < now)
    )


def _default_owner() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"


class Scheduler:
    def __init__(
        self,
        database: Database,
        clock: Clock | None = None,
        *,
        owner: str | None = None,
        lease: timedelta = timedelta(seconds=30),
        batch: int = 50,
        poll: float = 1.0,
        max_attempts: int = 5,
        retry_backoff: timedelta = timedelta(seconds=10),
        timeout: timedelta | None = timedelta(minutes=5),
    ) -> None:
        """`batch` bounds one pass of the background loop (it passes again at once when a pass was
        full); `timeout` bounds one handler run."""
        self.database = database
        self.clock: Clock = clock or SystemClock()
        self.owner = owner or _default_owner()
        if len(self.owner) > 64:
            raise ValueError("owner is at most 64 characters")
        self.lease = lease
        self.batch = batch
        self.poll = poll
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.timeout = timeout
        self.stats = SchedulerStats()
        self._handlers: dict[str, JobHandler] = {}
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def register(self, kind: str, handler: JobHandler) -> None:
        self._handlers[kind] = handler

    async def run_due(self) -> int:
        """Claim and run, one by one, every job due now; returns how many committed as done."""
        return (await self._pass(None))[1]

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"scheduler-{self.owner}")

    async def stop(self) -> None:
        """Stop the background loop once the job it is running (if any) has finished."""
        if self._task is None:
            return
        self._stopping.set()
        try:
            await self._task
        finally:
            self._task = None
            self._stopping.clear()

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            claimed = 0
            try:
                claimed = (await self._pass(self.batch))[0]
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler %s: a pass failed", self.owner)
            if claimed < self.batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.poll)

    async def _pass(self, limit: int | None) -> tuple[int, int]:
        """Run due jobs until none is left, `limit` were claimed or the loop is stopping: (claimed, ran)."""
        claimed = ran = 0
        async with self._lock:
            while (limit is None or claimed < limit) and not self._stopping.is_set():
                job = await self._claim()
                if job is None:
                    break
                claimed += 1
                self.stats.claimed += 1
                ran += await self._run(job)
        return claimed, ran

    async def _claim(self) -> LoopJob | None:
        now = self.clock.now()
        candidate = aliased(LoopJob, name="candidate")
        next_id = (
            select(candidate.id)
            .where(_due(candidate, now))
            .order_by(candidate.run_at, candidate.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        stmt = (
            update(LoopJob)
            .where(LoopJob.id == next_id, _due(LoopJob, now))
            .values(lease_owner=self.owner, lease_until=now + self.lease, attempts=LoopJob.attempts + 1)
            .returning(LoopJob)
            .execution_options(**_NO_SYNC)
        )
        async with self.database.session() as session, session.begin():
            return (await session.execute(stmt)).scalars().first()

    def _fence(self, job: LoopJob) -> ColumnElement[bool]:
        """Rows this claim of `job` still holds."""
        return and_(
            LoopJob.id == job.id,
            LoopJob.lease_owner == self.owner,
            LoopJob.attempts == job.attempts,
            LoopJob.status == PENDING,
        )

    async def _run(self, job: LoopJob) -> bool:
        """Run one claimed job to its outcome; True if it committed as done. Raises only CancelledError."""
        if job.attempts > self.max_attempts:
            await self._record_failure(
                job,
                f"claimed {job.attempts} times without a result (worker lost or lease expired)",
                final=True,
            )
            return False
        error: str | None = None
        stop_renewing = asyncio.Event()
        renewal = asyncio.create_task(self._renew(job, stop_renewing), name=f"lease-{job.id}")
        try:
            after = await self._apply(job)
        except _LeaseLost:
            self.stats.lost_lease += 1
            log.warning(
                "scheduler %s lost job %s (%s, key %s) before finishing it; its effects were rolled back",
                self.owner,
                job.id,
                job.kind,
                job.key,
            )
            return False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = "".join(traceback.format_exception_only(exc)).strip()
        finally:
            stop_renewing.set()
            with contextlib.suppress(Exception):
                await renewal
        if error is not None:
            await self._record_failure(job, error, final=job.attempts >= self.max_attempts)
            return False
        self.stats.ran += 1
        if after is not None:
            try:
                await after()
            except Exception:
                log.exception("after-commit step of job %s (%s) failed", job.id, job.kind)
        return True

    async def _apply(self, job: LoopJob) -> AfterCommit | None:
        """The handler and the fenced 'done' in one transaction; raises _LeaseLost if the fence fails."""
        async with self.database.session() as session, session.begin():
            handler = self._handlers.get(job.kind)
            if handler is None:
                raise LookupError(f"no handler registered for job kind {job.kind!r}")
            if self.timeout is None:
                after = await handler(session, job)
            else:
                limit = asyncio.timeout(self.timeout.total_seconds())
                try:
                    async with limit:
                        after = await handler(session, job)
                except TimeoutError:
                    if limit.expired():
                        raise TimeoutError(f"handler ran longer than {self.timeout}") from None
                    raise
            done = await session.execute(
                update(LoopJob)
                .where(self._fence(job))
                .values(status=DONE, finished_at=self.clock.now(), lease_until=None)
                .returning(LoopJob.id)
                .execution_options(**_NO_SYNC)
            )
            if done.first() is None:
                raise _LeaseLost
        return after

    async def _record_failure(self, job: LoopJob, error: str, *, final: bool) -> None:
        now = self.clock.now()
        values: dict[str, Any] = {"lease_until": None, "last_error": error[:4000]}
        if final:
            values.update(status=FAILED, finished_at=now)
        else:
            values["run_at"] = now + self.retry_backoff * 2 ** (job.attempts - 1)
        try:
            async with self.database.session() as session, session.begin():
                row = (
                    await session.execute(
                        update(LoopJob)
                        .where(self._fence(job))
                        .values(**values)
                        .returning(LoopJob.id)
                        .execution_options(**_NO_SYNC)
                    )
                ).first()
        except Exception:
            log.exception("could not record the failure of job %s; its lease will expire", job.id)
            return
        if row is None:
            self.stats.lost_lease += 1
        elif final:
            self.stats.failed += 1
            log.error(
                "job %s (%s, key %s) failed after %d attempts: %s",
                job.id,
                job.kind,
                job.key,
                job.attempts,
                error,
            )
        else:
            self.stats.retried += 1
            log.warning(
                "job %s (%s) attempt %d failed, retrying at %s: %s",
                job.id,
                job.kind,
                job.attempts,
                values["run_at"],
                error,
            )

    async def _renew(self, job: LoopJob, stop: asyncio.Event) -> None:
        """Extend the lease of the running `job` every `lease / 3` until `stop` is set or it is lost."""
        interval = max(self.lease.total_seconds() / 3, 0.01)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
                return
            try:
                async with self.database.session() as session, session.begin():
                    row = (
                        await session.execute(
                            update(LoopJob)
                            .where(self._fence(job), LoopJob.lease_until.is_not(None))
                            .values(lease_until=self.clock.now() + self.lease)
                            .returning(LoopJob.id)
                            .execution_options(**_NO_SYNC)
                        )
                    ).first()
            except Exception as exc:
                log.warning("could not renew the lease of job %s: %s", job.id, exc)
                continue
            if row is None:
                if not stop.is_set():
                    log.warning("scheduler %s lost the lease of running job %s", self.owner, job.id)
                return
            self.stats.renewed += 1
