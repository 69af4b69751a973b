"""The consumer's hold on one session and its job: the worker's lease and the queue's claim, renewed together."""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from dataclasses import dataclass

from workers.null.consumer.control import ControlClient, ControlUnavailable, HeldSession, LeaseGone
from workers.null.queues.base import Claim, NotOwned, QueueError

log = logging.getLogger("workers.null.consumer")


class Loss(enum.Enum):
    """What was lost: the worker's lease on the session, or the queue's claim on the job."""

    LEASE_GONE = "lease gone"  # the worker no longer holds the session
    LEASE_LAPSED = "lease lapsed"  # the control server did not answer before the lease ran out
    CLAIM_NOT_OWNED = "claim not owned"  # the queue says the job is no longer this consumer's
    CLAIM_LAPSED = "claim lapsed"  # the queue did not answer before the claim's window ran out

    @property
    def of_claim(self) -> bool:
        """The job may be running elsewhere now: nothing about it may be acked."""
        return self in (Loss.CLAIM_NOT_OWNED, Loss.CLAIM_LAPSED)


@dataclass(frozen=True)
class Lost:
    """Why a lease or a claim ended early; ``str()`` is the line the logs and job events carry."""

    loss: Loss
    cause: str

    def __str__(self) -> str:
        if self.loss is Loss.LEASE_GONE:
            return f"lease gone ({self.cause})"
        if self.loss is Loss.LEASE_LAPSED:
            return f"lease lapsed: the control server did not answer ({self.cause})"
        if self.loss is Loss.CLAIM_NOT_OWNED:
            return f"claim not owned any more ({self.cause})"
        return f"claim lapsed: the queue did not answer ({self.cause})"


class Lease:
    """The session's lease and the job's claim, renewed together every ``window`` / 3."""

    def __init__(self, control: ControlClient, held: HeldSession, window: float):
        self.control = control
        self.window = window
        self.session_id = held.session_id
        self.lease_until = time.monotonic() + held.expires_in
        self.claim: Claim | None = None
        self.claim_until = math.inf
        # Set once the lease or the claim is gone.
        self.lost: asyncio.Future[Lost] = asyncio.get_running_loop().create_future()

    def hold(self, claim: Claim) -> None:
        """From now on the job's claim is renewed with the lease."""
        self.claim = claim
        self.claim_until = time.monotonic() + self.window

    def _lose(self, loss: Loss, cause: BaseException) -> None:
        if not self.lost.done():
            self.lost.set_result(Lost(loss, str(cause)))

    async def renew(self) -> None:
        window = self.window
        while not self.lost.done():
            now = time.monotonic()
            try:
                left = await self.control.extend(self.session_id, window)
                self.lease_until = time.monotonic() + left
            except LeaseGone as exc:
                self._lose(Loss.LEASE_GONE, exc)
                return
            except ControlUnavailable as exc:
                if now >= self.lease_until:
                    self._lose(Loss.LEASE_LAPSED, exc)
                    return
                log.warning("session %s: lease renewal failed (%s); trying again", self.session_id, exc)
            if self.claim is not None:
                try:
                    await self.claim.keep_alive()
                    self.claim_until = now + window
                except NotOwned as exc:
                    self._lose(Loss.CLAIM_NOT_OWNED, exc)
                    return
                except QueueError as exc:
                    if time.monotonic() >= self.claim_until:
                        self._lose(Loss.CLAIM_LAPSED, exc)
                        return
                    log.warning("job %s: claim renewal failed (%s); trying again", self.claim.job.id, exc)
            await asyncio.sleep(window / 3)
