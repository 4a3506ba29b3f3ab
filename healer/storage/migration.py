"""A backend's migrations: each numbered schema version paired with the backend's way to apply it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from healer.storage.schema import SCHEMA_VERSIONS

Apply = TypeVar("Apply")


@dataclass(frozen=True)
class Migration(Generic[Apply]):
    """One numbered step of the schema."""

    version: int
    description: str
    apply: Apply


def numbered(applies: Sequence[Apply]) -> tuple[Migration[Apply], ...]:
    """Pair every schema version with its step, in order; raises ValueError when a version has none."""
    return tuple(
        Migration(version, description, apply)
        for (version, description), apply in zip(SCHEMA_VERSIONS, applies, strict=True)
    )


def pending(migrations: Sequence[Migration[Apply]], version: int) -> list[Migration[Apply]]:
    """The migrations a store at `version` has not had yet, in order."""
    return [migration for migration in migrations if migration.version > version]
