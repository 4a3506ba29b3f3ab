"""The schema's numbered versions, the same for every backend: version N means the same tables everywhere.

Each backend pairs every entry with its own SQL, in this order; adding a version here without adding
it to a backend fails at import.
"""

from __future__ import annotations

SCHEMA_VERSIONS: tuple[tuple[int, str], ...] = (
    (1, "inbox: one row per delivery instead of one per alert"),
    (2, "healing: inbox, episodes, actions, cooldowns, events, escalations"),
    (3, "goals"),
    (4, "optimisation trials"),
    (5, "replicas: who holds a step, the shared budget, slots and the leader"),
    (6, "safety rails: pauses, rules' budgets, label-group slots and shares, flapping"),
    (7, "console sessions and the CSRF secret, shared by every replica"),
)
