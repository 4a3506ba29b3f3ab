"""A tiny third-party strategy plugin, installed on sys.path only by tests/test_strategies.py."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from healer.strategies.base import StrategyParams, StrategyType
from healer.strategies.runner import AlertContext, StepResult
from healer.strategies.templating import render


class PageParams(StrategyParams):
    """Page someone a number of times."""

    type: Literal["myplug"] = "myplug"
    pager: str
    repeat: int = Field(default=1, ge=1)
    who: str = "{labels.team}"


class PageRunner:
    """Pretends to page; shows a plugin runner can use the shared templating."""

    def plan(self, params: StrategyParams, alert: AlertContext) -> dict[str, object]:
        assert isinstance(params, PageParams)
        return {"pager": params.pager, "repeat": params.repeat, "who": render(params.who, params, alert)}

    async def run(self, params: StrategyParams, alert: AlertContext) -> StepResult:
        plan = self.plan(params, alert)
        return StepResult(ok=True, detail=f"paged {plan['who']} {plan['repeat']} times")


def strategy_type() -> StrategyType:
    """The entry point `healer.strategies: myplug = myplug:strategy_type`."""
    return StrategyType("myplug", PageParams, PageRunner())
