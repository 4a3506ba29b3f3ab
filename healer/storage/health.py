"""Whether the store can keep what healer accepts: the answer of `Storage.health()`, with a fixed reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from healer.storage.errors import StoreUnavailableError

# Every reason a health check can give (fixed, so that they can be a metric's label values).
OK: Final = "ok"
DELETED: Final = "deleted"
REPLACED: Final = "replaced"
READ_ONLY: Final = "read_only"
DISK_FULL: Final = "disk_full"
DAMAGED: Final = "damaged"
UNAVAILABLE: Final = "unavailable"
REASONS: Final = (OK, DELETED, REPLACED, READ_ONLY, DISK_FULL, DAMAGED, UNAVAILABLE)

# What an operator should do, per reason.
ADVICE: Final = {
    OK: "",
    DELETED: "the store file was deleted: stop healer (it copies what it kept to the store's path plus"
    " .rescued as it stops), move that copy to the store's path, and start healer again (it stays not"
    " ready until then)",
    REPLACED: "another file now has the store's path: stop healer (it copies what it kept to the store's"
    " path plus .rescued as it stops), decide which file to keep, and start healer again",
    READ_ONLY: "make the store and its directory writable (permissions, a read-only remount); healer"
    " becomes ready again by itself",
    DISK_FULL: "free space on the store's filesystem; healer becomes ready again by itself",
    DAMAGED: "stop healer, run `healer store check` and `healer store recover` on the file (see"
    " docs/runbook.md, HealerStoreNotReady), and start healer again",
    UNAVAILABLE: "check the store (the database server, the disk, the logs above); healer becomes ready"
    " again by itself when the store answers",
}


@dataclass(frozen=True)
class StoreHealth:
    """One health check: `reason` is one of REASONS (OK when up), `detail` says what was seen."""

    reason: str = OK
    detail: str = ""

    @property
    def up(self) -> bool:
        return self.reason == OK

    @property
    def advice(self) -> str:
        return ADVICE[self.reason]


class StoreDamagedError(StoreUnavailableError):
    """The store's file is not a sound database (an integrity check failed): it needs recovering, not a retry."""


def classify(message: str) -> str:
    """The reason for a database error's message (SQLite's and PostgreSQL's wording)."""
    text = message.lower()
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return DAMAGED
    if "full" in text or "no space" in text or "disk quota" in text:
        return DISK_FULL
    if "readonly" in text or "read-only" in text or "read only" in text:
        return READ_ONLY
    return UNAVAILABLE
