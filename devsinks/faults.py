"""Faults a person or a test can inject into a sink at run time, to watch retries happen."""

from __future__ import annotations

import asyncio
import random
from dataclasses import asdict, dataclass, field

from pydantic import BaseModel, ConfigDict, Field


@dataclass
class Faults:
    fail_next: int = 0  # fail this many calls, then behave
    fail_rate: float = 0.0  # and fail this fraction of the rest
    status: int = 500  # the status a failed call answers (HTTP, or SMTP reply code)
    retry_after: str | None = None  # sent as Retry-After with a failed HTTP answer
    latency_ms: int = 0
    reject_recipients: list[str] = field(default_factory=list)  # SMTP: answer 550 for these

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class WarehouseFaultsIn(BaseModel):
    """A change to the warehouse receiver's faults; fields left out keep their value."""

    model_config = ConfigDict(extra="forbid")

    fail_next: int = Field(default=0, ge=0)
    fail_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    status: int = Field(default=500, ge=400, le=599)
    retry_after: str | None = Field(default=None, max_length=64)
    latency_ms: int = Field(default=0, ge=0, le=600_000)


class MailFaultsIn(BaseModel):
    """A change to the SMTP sink's faults: 4xx replies are transient, 5xx permanent."""

    model_config = ConfigDict(extra="forbid")

    fail_next: int = Field(default=0, ge=0)
    fail_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    status: int = Field(default=451, ge=400, le=599)
    latency_ms: int = Field(default=0, ge=0, le=600_000)
    reject_recipients: list[str] = Field(default_factory=list)


class FaultInjector:
    def __init__(self, seed: int | None = None, *, default_status: int = 500) -> None:
        self._default_status = default_status
        self.faults = Faults(status=default_status)
        self._random = random.Random(seed)

    def configure(self, **changes: object) -> Faults:
        self.faults = Faults(**{**self.faults.as_dict(), **changes})  # type: ignore[arg-type]
        return self.faults

    def reset(self) -> None:
        self.faults = Faults(status=self._default_status)

    async def delay(self) -> None:
        if self.faults.latency_ms:
            await asyncio.sleep(self.faults.latency_ms / 1000)

    def should_fail(self) -> bool:
        if self.faults.fail_next > 0:
            self.faults.fail_next -= 1
            return True
        return self.faults.fail_rate > 0 and self._random.random() < self.faults.fail_rate
