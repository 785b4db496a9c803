"""Split expressions (`train`, `train[0:200]`, `train[:10%]`, `train[-20:]`): one parser for the settings check
and the data stage, so that what the check lets through is exactly what the data stage can apply. Standard library
only: the settings check imports it before any work starts."""
from __future__ import annotations

import re
from dataclasses import dataclass

EXAMPLES = "train, train[0:200], train[:10%] or train[-20:]"
_EXPRESSION = re.compile(r"(?P<name>\w+)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?")


@dataclass(frozen=True)
class Split:
    """A named split and an optional slice of it; bounds are (value, is_percent) or None for an open end."""
    name: str
    start: tuple[int, bool] | None
    stop: tuple[int, bool] | None

    def indices(self, n_rows: int) -> range:
        """The positions this expression picks from a split of `n_rows` rows (Python slice semantics; a percent
        bound rounds to the closest row, as datasets does)."""
        def bound(b):
            if b is None:
                return None
            value, percent = b
            return round(n_rows * value / 100) if percent else value

        return range(n_rows)[bound(self.start):bound(self.stop)]

    def fixed_rows(self) -> range | None:
        """The positions picked whatever the split's length (bounds absolute, non-negative, end given), else None.
        A split shorter than the end gives fewer."""
        bounds = [b for b in (self.start, self.stop) if b is not None]
        if self.stop is None or any(percent or value < 0 for value, percent in bounds):
            return None
        return range(self.start[0] if self.start else 0, self.stop[0])


def parse_split(expression: str) -> Split:
    """A Split, or ValueError saying what is wrong (without the setting's name, which the caller adds)."""
    match = _EXPRESSION.fullmatch(re.sub(r"\s+", "", expression))
    if not match:
        raise ValueError(f"is not a split expression like {EXAMPLES}")
    bounds = []
    for text in (match["start"], match["stop"]):
        if text is None:
            bounds.append(None)
            continue
        percent = text.endswith("%")
        value = int(text.rstrip("%"))
        if percent and not -100 <= value <= 100:
            raise ValueError(f"percent bound {text} is outside -100% to 100%")
        bounds.append((value, percent))
    return Split(match["name"], bounds[0], bounds[1])


def fixed_overlap(train_expression: str, eval_expression: str) -> range | None:
    """The rows two expressions share whatever the data holds (None when that depends on the split's length)."""
    train, held = parse_split(train_expression), parse_split(eval_expression)
    if train.name != held.name:
        return None
    a, b = train.fixed_rows(), held.fixed_rows()
    if a is None or b is None:
        return None
    shared = range(max(a.start, b.start), min(a.stop, b.stop))
    return shared if len(shared) else None
