"""Range checks of a method's options, named so that a config error can point at the key.

Each method's ``validate(options)`` classmethod states its rules with :func:`check_options`
(and :func:`require` for rules that tie options together). The registry runs it before
building a method, and the run config runs it on the driver, before Ray starts, so a bad
``method.<option>`` fails early with its name; the checks are written once, here.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class OptionError(ValueError):
    """Method option ``option`` has a value out of its range (or a wrong kind of value)."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option} {problem}")
        self.option = option
        self.problem = problem


@dataclass(frozen=True)
class Rule:
    """What an option's value must satisfy, and how to say it ("> 0")."""

    holds: Callable[[Any], bool]
    text: str


POSITIVE = Rule(lambda x: x > 0, "> 0")
NON_NEGATIVE = Rule(lambda x: x >= 0, ">= 0")
AT_LEAST_ONE = Rule(lambda x: x >= 1, ">= 1")
AT_LEAST_TWO = Rule(lambda x: x >= 2, ">= 2")
PROBABILITY = Rule(lambda x: 0 <= x <= 1, "in [0, 1]")
FRACTION = Rule(lambda x: 0 < x < 1, "in (0, 1)")
BELOW_ONE = Rule(lambda x: 0 <= x < 1, "in [0, 1)")
UP_TO_ONE = Rule(lambda x: 0 < x <= 1, "in (0, 1]")


def one_of(*choices: object) -> Rule:
    """The value must be one of ``choices``."""
    return Rule(lambda x: x in choices, f"one of {list(choices)}")


def check_options(options: Mapping[str, Any], **rules: Rule) -> None:
    """Raise :class:`OptionError` for the first option whose value breaks its rule."""
    for name, rule in rules.items():
        value = options[name]
        if not rule.holds(value):
            raise OptionError(name, f"must be {rule.text}, got {value!r}")


def require(condition: bool, option: str, problem: str) -> None:
    """Raise :class:`OptionError` naming ``option`` unless ``condition`` holds."""
    if not condition:
        raise OptionError(option, problem)
