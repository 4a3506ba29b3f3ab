"""Confidence learned from outcomes: how the optimizer trusts a candidate and a learned ladder orders strategies."""

from __future__ import annotations

from collections.abc import Mapping

from healer.healing.model import LEARNING_OUTCOMES, Outcome

# A strategy nobody has seen heal or fail starts even.
EVEN_PRIOR = 0.5


def learned_confidence(prior: float, prior_weight: float, helped: int, trials: int) -> float:
    """The prior confidence, worth `prior_weight` outcomes, updated by how many trials helped (a Beta mean)."""
    return (prior * prior_weight + helped) / (prior_weight + trials)


class OutcomeTally:
    """Per (rule, strategy): steps that healed and steps whose outcome says whether they heal."""

    def __init__(self, prior_weight: float) -> None:
        self._prior_weight = prior_weight
        self._counts: dict[tuple[str, str], tuple[int, int]] = {}

    def load(self, counts: Mapping[tuple[str, str], tuple[int, int]]) -> None:
        """Start from what the store recorded, so that a restart learns the same as before it."""
        self._counts = dict(counts)

    def learn(self, rule: str, strategy: str, outcome: Outcome) -> None:
        """Count one step's outcome, if it says whether the strategy heals."""
        if outcome in LEARNING_OUTCOMES:
            healed, trials = self._counts.get((rule, strategy), (0, 0))
            self._counts[(rule, strategy)] = (healed + (outcome is Outcome.HEALED), trials + 1)

    def confidence(self, rule: str, strategy: str) -> tuple[float, int, int]:
        """(confidence, healed, trials) of a rule's strategy: an even prior moved by the steps' outcomes."""
        healed, trials = self._counts.get((rule, strategy), (0, 0))
        return learned_confidence(EVEN_PRIOR, self._prior_weight, healed, trials), healed, trials
