"""Reading XLA's optimized HLO text in tests: which arrays a compiled program copies."""

import math
import re

_INSTR = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = \w+\[([\d,]*)\]\S* (copy|transpose)\(")


def copied_sizes(hlo: str) -> set[int]:
    """Element counts of the arrays a compiled program copies or transposes: its ``copy`` and ``transpose``
    instructions, those inside the fusions that run them included."""
    return {math.prod(int(d) for d in m.group(1).split(",") if d)
            for m in map(_INSTR.match, hlo.splitlines()) if m}
