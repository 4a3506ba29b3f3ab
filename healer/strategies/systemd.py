"""The `systemd` strategy: `systemctl ACTION UNIT`, run through the exec machinery."""

from __future__ import annotations

from healer.config.strategy_params import PLACEHOLDER, StrategyParams, SystemdParams
from healer.strategies.base import params_of
from healer.strategies.exec import Invocation, alert_env, run_invocation
from healer.strategies.runner import AlertContext, StepResult, UnsafeLabelError
from healer.strategies.templating import allow_key, render

SYSTEMCTL = "systemctl"
SYSTEMCTL_OUTPUT_LIMIT = 64 * 1024


class SystemdRunner:
    """Runner of the `systemd` strategy type; `systemctl` is looked up on healer's PATH."""

    def invocation(self, params: StrategyParams, alert: AlertContext) -> Invocation:
        """Render `[systemctl, action, unit]`; a unit from a label may not start with `-`."""
        systemd_params = params_of(params, SystemdParams, "systemd")
        unit = render(systemd_params.unit, params, alert)
        match = PLACEHOLDER.fullmatch(systemd_params.unit)
        if match is not None and unit.startswith("-"):
            kind, name = match.group(1), match.group(2)
            raise UnsafeLabelError(
                allow_key(kind, name),
                f"value {unit!r} starts with '-' and would be read as a systemctl option",
                noun="label" if kind == "labels" else "annotation",
                name=name,
            )
        return Invocation(
            argv=(SYSTEMCTL, systemd_params.action, unit),
            env=alert_env(params, alert),
            timeout=systemd_params.timeout,
            output_limit=SYSTEMCTL_OUTPUT_LIMIT,
        )

    def plan(self, params: StrategyParams, alert: AlertContext) -> dict[str, object]:
        """The systemctl argv (plus env, cwd and timeout as for exec), without running it."""
        return self.invocation(params, alert).describe()

    async def run(self, params: StrategyParams, alert: AlertContext) -> StepResult:
        """Run systemctl; ok when it exits 0."""
        return await run_invocation(self.invocation(params, alert))
