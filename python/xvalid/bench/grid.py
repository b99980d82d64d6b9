"""The grid: axes from comma lists and ranges, named grid presets, the cells, and the cells
that cannot fit (skipped with the reason).

A cell is one (batch B, prompt length S, decode steps N, threads) for one model: a prefill of
B x S tokens, then N one-token decode steps, so positions 0 .. S+N-1 are used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import InputError
from ..memory import forward_memory_bytes, forward_memory_problem

MAX_AXIS_VALUES = 64  # more values on one axis is almost surely a typo ('1-10000')

# 'A', 'A-B' (every integer), 'A-B+STEP' (arithmetic), 'A-B*FACTOR' (geometric), as in llama-bench
_ITEM = re.compile(r"(\d+)(?:-(\d+)(?:([+*])(\d+))?)?")


def parse_axis(text: str, flag: str, minimum: int = 1) -> list[int]:
    """'1,2,4' or '32-512*2' or '16-64+16' (or a mix, comma separated) -> the values in order,
    each once. InputError naming the flag for anything else."""
    values: list[int] = []
    for item in str(text).replace(" ", "").split(","):
        match = _ITEM.fullmatch(item)
        if not match:
            raise InputError(f"{flag} {text!r}: {item!r} is not a number or a range "
                             f"(write e.g. 1,2,4 or 32-512*2 or 16-64+16)")
        first, last, op, step = match.groups()
        first = int(first)
        if last is None:
            values.append(first)
            continue
        last, step = int(last), int(step) if step else 1
        if last < first:
            raise InputError(f"{flag} {text!r}: the range {item!r} runs backwards")
        if (op == "*" and step < 2) or (op == "+" and step < 1):
            raise InputError(f"{flag} {text!r}: the range {item!r} never advances "
                             f"({'a factor must be >= 2' if op == '*' else 'a step must be >= 1'})")
        value = first
        while value <= last:
            values.append(value)
            if len(values) > MAX_AXIS_VALUES:
                break
            value = value * step if op == "*" else value + step
            if value == 0:  # 0-8*2 would never advance
                raise InputError(f"{flag} {text!r}: a geometric range cannot start at 0")
    if len(values) > MAX_AXIS_VALUES:
        raise InputError(f"{flag} {text!r}: more than {MAX_AXIS_VALUES} values")
    low = [v for v in values if v < minimum]
    if low:
        raise InputError(f"{flag} {text!r}: {low[0]} is below the minimum {minimum}")
    return list(dict.fromkeys(values))


def parse_names(text: str, flag: str, allowed: tuple[str, ...]) -> list[str]:
    """'float32,int8' -> the names in order, each once; InputError naming the flag for a name
    not in `allowed`."""
    names = [item for item in str(text).replace(" ", "").split(",") if item]
    for name in names:
        if name not in allowed:
            raise InputError(f"{flag} {text!r}: {name!r} is not one of {', '.join(allowed)}")
    if not names:
        raise InputError(f"{flag} {text!r}: no value (write e.g. {','.join(allowed[:2])})")
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class GridPreset:
    """A named grid: the axes and how long each cell is measured."""

    batch: tuple[int, ...]
    seq: tuple[int, ...]
    gen: tuple[int, ...]
    repeat: int        # timed runs per backend and cell, at least
    min_time: float    # seconds of timed runs per backend and cell, at least
    summary: str


GRID_PRESETS: dict[str, GridPreset] = {
    "quick": GridPreset((1, 2), (32, 128), (8,), repeat=3, min_time=0.2,
                        summary="2 x 2 cells, 8 decode steps: about a minute on 2 cores"),
    "default": GridPreset((1, 4), (32, 128, 512), (16,), repeat=5, min_time=1.0,
                          summary="2 x 3 cells, 16 decode steps"),
    "large": GridPreset((1, 2, 4, 8), tuple(32 << i for i in range(7)), (32,), repeat=5,
                        min_time=2.0, summary="4 x 7 cells up to S = 2048, 32 decode steps"),
}


@dataclass(frozen=True)
class Cell:
    batch: int    # B, rows
    seq: int      # S, prompt tokens per row
    gen: int      # N, decode steps after the prefill
    threads: int

    @property
    def positions(self) -> int:
        return self.seq + self.gen

    def label(self) -> str:
        return f"B{self.batch} S{self.seq} N{self.gen} t{self.threads}"


def cells(batch: list[int], seq: list[int], gen: list[int], threads: list[int]) -> list[Cell]:
    """Every combination, threads outermost (backends switch thread counts least often), then
    batch, prompt length, decode steps."""
    return [Cell(b, s, n, t) for t in threads for b in batch for s in seq for n in gen]


def cell_memory_bytes(cfg: ModelConfig, cell: Cell, candidates: int) -> float:
    """What validating and timing one cell needs on top of the loaded weights, from the
    working memory of one float32 forward over all S+N positions (memory.py, the loaders'
    own estimate): the float64 reference counts twice, the float32 reference once, and each
    candidate once (its prefill, KV cache and logits are held while the others run)."""
    forward = forward_memory_bytes(cfg, cell.batch, cell.positions, cell.positions,
                                   intermediates=False)
    return (3 + candidates) * forward


def skip_reason(cfg: ModelConfig, cell: Cell, candidates: int, available_bytes: int | None
                ) -> str | None:
    """Why a cell cannot run on this model and machine, or None when it can: positions
    beyond the model's maximum, one forward above xvalid's memory limit (as the loaders
    refuse it), or the whole cell above 80% of the memory available now."""
    if cell.positions > cfg.max_position_embeddings:
        return (f"positions S+N = {cell.seq}+{cell.gen} = {cell.positions} exceed the model's "
                f"max_position_embeddings {cfg.max_position_embeddings}")
    problem = forward_memory_problem(cfg, cell.batch, cell.positions, cell.positions)
    if problem:
        return f"a forward over B={cell.batch} x {cell.positions} positions {problem}"
    need = cell_memory_bytes(cfg, cell, candidates)
    if available_bytes is not None and need > 0.8 * available_bytes:
        return (f"needs about {need / 2**30:.1f} GiB (the float32 and float64 references and "
                f"{candidates} candidate{'s' * (candidates != 1)} over B={cell.batch} x "
                f"{cell.positions} positions), {available_bytes / 2**30:.1f} GiB of memory "
                f"available")
    return None
