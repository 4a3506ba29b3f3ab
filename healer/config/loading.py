"""Reading `healer.yml`: parse, validate every section and strategy, cross-check names, report every fault."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from healer.config.model import HealerConfig
from healer.config.secrets import reference_errors as secret_reference_errors
from healer.config.strategy_params import ParamsCatalog, StrategyKinds, StrategyParams, UnknownStrategyTypeError


class ConfigError(Exception):
    """The config file cannot be read or does not validate; `errors` holds one line per fault."""

    def __init__(self, path: Path | str, errors: Sequence[str]) -> None:
        self.path = str(path)
        self.errors = [f"{self.path}: {error}" for error in errors]
        super().__init__("\n".join(self.errors))


def format_location(loc: Sequence[int | str]) -> str:
    """Render a pydantic error location as a key path such as `healing.rules[2].cooldown`."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def _errors_of(exc: ValidationError, prefix: Sequence[int | str] = ()) -> list[str]:
    lines = []
    for error in exc.errors(include_url=False):
        # Model-level validators report at the model; their message names the fields involved.
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"{format_location([*prefix, *error['loc']])}: {message}")
    return lines


def _validate_strategies(raw: Any, registry: StrategyKinds) -> tuple[dict[str, StrategyParams], list[str]]:
    """Validate each named strategy against the parameter model of its type."""
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        return {}, ["strategies: must be a mapping of strategy names to their settings"]
    known = list(registry)
    validated: dict[str, StrategyParams] = {}
    errors: list[str] = []
    for name, spec in raw.items():
        if not isinstance(spec, dict):
            errors.append(f"strategies.{name}: must be a mapping with a 'type' key")
            continue
        kind = spec.get("type")
        if not isinstance(kind, str):
            errors.append(f"strategies.{name}.type: missing; one of {', '.join(known)}")
            continue
        # Checked against the names rather than by catching get's error, so any registry shape reports alike.
        if kind not in known:
            errors.append(f"strategies.{name}.type: {UnknownStrategyTypeError(kind, sorted(known))}")
            continue
        try:
            validated[name] = registry.get(kind).params.model_validate(spec)
        except ValidationError as exc:
            errors.extend(_errors_of(exc, ("strategies", name)))
    return validated, errors


def _cross_check(config: HealerConfig, strategies: dict[str, StrategyParams], raw_names: set[str]) -> list[str]:
    errors = []
    for index, rule in enumerate(config.healing.rules):
        for position, name in enumerate(rule.strategies):
            if name not in raw_names:
                errors.append(
                    f"healing.rules[{index}].strategies[{position}]: strategy {name!r} is not defined under strategies"
                )
    for index, template in enumerate(config.planner.goals):
        errors += [
            f"planner.goals[{index}].plan[{position}]: {problem}"
            for position, problem in plan_problems(template.plan, strategies, raw_names)
        ]
    for index, candidate in enumerate(config.optimizer.candidates):
        for key in ("apply", "rollback"):
            errors += [
                f"optimizer.candidates[{index}].{key}: {problem}"
                for _, problem in plan_problems([getattr(candidate, key)], strategies, raw_names)
            ]
    return errors


def config_warnings(config: HealerConfig) -> list[str]:
    """What in a valid config is allowed but likely a mistake, one line per finding by key path."""
    warnings = []
    for index, rule in enumerate(config.healing.rules):
        count = len(rule.strategies)
        if rule.max_attempts >= count:
            continue
        where = f"healing.rules[{index}] (name {rule.name}): max_attempts {rule.max_attempts}"
        if rule.order == "learned":
            # The learned order varies, so no one strategy is certain to be left out.
            consequence = f"with order: learned at most {rule.max_attempts} of them run in an episode"
        else:
            reached = set(rule.strategies[: rule.max_attempts])
            unreached = [name for name in dict.fromkeys(rule.strategies[rule.max_attempts :]) if name not in reached]
            if unreached:
                consequence = f"{', '.join(unreached)} can never run"
            elif count == rule.max_attempts + 1:  # the rungs left out repeat strategies that run earlier
                consequence = f"its rung {count} is never reached"
            else:
                consequence = f"its rungs {rule.max_attempts + 1} to {count} are never reached"
        warnings.append(f"{where} is smaller than its {count} strategies; {consequence}")
    return warnings


def plan_problems(
    plan: Sequence[str], strategies: dict[str, StrategyParams], known: set[str] | None = None
) -> list[tuple[int, str]]:
    """Why each step of a goal's plan cannot run: an unknown strategy, or one that waits for approval."""
    known = set(strategies) if known is None else known
    problems = []
    for position, name in enumerate(plan):
        if name not in known:
            problems.append((position, f"strategy {name!r} is not defined under strategies"))
        elif name in strategies and strategies[name].approval == "required":
            problems.append((position, f"strategy {name!r} requires approval, which a goal's plan cannot wait for"))
    return problems


def parse_config(data: Any, source: Path | str = "<config>", registry: StrategyKinds | None = None) -> HealerConfig:
    """Validate already-parsed YAML into a HealerConfig, raising ConfigError with every fault.

    `registry` gives each strategy type's parameter model (a `StrategyRegistry` will do); by default
    the built-in types and the installed plugins.
    """
    registry = registry if registry is not None else ParamsCatalog.installed()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): the config must be a YAML mapping"])
    raw_strategies = data.get("strategies")
    strategies, errors = _validate_strategies(raw_strategies, registry)
    try:
        config = HealerConfig.model_validate({**data, "strategies": {}})
    except ValidationError as exc:
        errors = _errors_of(exc) + errors
        raise ConfigError(source, errors) from None
    raw_names = set(raw_strategies) if isinstance(raw_strategies, dict) else set()
    errors.extend(_cross_check(config, strategies, raw_names))
    errors.extend(secret_reference_errors(strategies, config.secrets))
    if errors:
        raise ConfigError(source, errors)
    for params in strategies.values():
        params.bind_secrets(config.secrets)
    return config.model_copy(update={"strategies": strategies})


def load_config(path: Path | str, registry: StrategyKinds | None = None) -> HealerConfig:
    """Read and validate a config file, raising ConfigError that names the file and every key at fault."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(path, ["file not found"]) from None
    except OSError as exc:
        raise ConfigError(path, [f"cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, [f"{where}invalid YAML: {problem}"]) from None
    return parse_config(data, path, registry)
