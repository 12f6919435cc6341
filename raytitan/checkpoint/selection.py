"""Which step of a folder a run resumes from, and what it may delete: a pure function of
the listed step directories (tested by a table in tests/unit/test_selection.py).

Rules (docs/reliability.md):
- Only the run's own interrupted saves (SAVING.json with its lineage, no COMMIT.json) may be
  deleted. Damaged, unknown and other runs' directories are reported, never deleted.
- Implicitly, a run resumes from the most recently committed full-state step of its own
  lineage (a model-only step-0 seed if that is all). Another run's steps (copied in) are
  resumed only when named with load_step.
- Falling back past a newer damaged directory is allowed, with a loud warning; starting from
  scratch over directories that might hold this run's progress is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raytitan.checkpoint.storage import (
    INTERRUPTED,
    CheckpointError,
    StepInfo,
    latest_full,
    step_name,
)


@dataclass
class ResumeChoice:
    step: int | None
    """The step of this folder to load; None: nothing in it to resume."""
    commit: dict | None = None
    others: list[int] = field(default_factory=list)
    """The other committed steps (for messages)."""
    remove: list[int] = field(default_factory=list)
    """This run's own interrupted saves: safe to delete."""
    warnings: list[str] = field(default_factory=list)
    blocking: list[str] = field(default_factory=list)
    """Directories that may hold this run's progress but cannot be loaded: a fresh start
    over them is refused."""


def describe_step(info: StepInfo, where: str) -> str:
    return f"{where}/{step_name(info.step)} ({info.state}: {info.problem})"


def choose_step(steps: list[StepInfo], *, lineage: str, load_step: int,
                reported_step: int | None, where: str) -> ResumeChoice:
    """The step to resume from. Args: the folder's `steps`, this run's `lineage`,
    checkpoint.load_step (-1 = newest), Ray's latest registered step after a restart (it
    overrides load_step) and the folder's URL for messages. Raises CheckpointError."""
    own = [s for s in steps if s.committed and s.lineage in (None, lineage)]
    foreign = [s for s in steps if s.committed and s.lineage not in (None, lineage)]
    committed = {s.step: s for s in steps if s.committed}
    choice = ResumeChoice(None)
    choice.remove = [s.step for s in steps if s.state == INTERRUPTED and s.lineage == lineage]
    unloadable = [s for s in steps if not s.committed and s.step not in choice.remove]
    for info in unloadable:
        choice.warnings.append(
            f"checkpoint: {describe_step(info, where)} is neither committed nor this run's "
            "interrupted save: it is NOT loaded and NOT deleted. Inspect it with `raytitan "
            "ckpt verify`, then repair it, move it away or delete it by hand")
    for info in foreign:
        choice.warnings.append(
            f"checkpoint: {where}/{step_name(info.step)} was committed by run "
            f"{info.lineage}, not this folder's run {lineage}: it is resumed only when named "
            f"(--checkpoint.load_step {info.step})")

    if load_step >= 0 and reported_step is None:
        if load_step not in committed:
            damaged = [describe_step(s, where) for s in unloadable if s.step == load_step]
            raise CheckpointError(
                f"checkpoint.load_step = {load_step}: {where} has no committed "
                f"{step_name(load_step)}{' (' + damaged[0] + ')' if damaged else ''}; "
                f"committed steps: {sorted(committed) or 'none'}")
        chosen = committed[load_step]
    else:
        chosen = latest_full(own, lineage)
        if chosen is None and any(s.step == 0 for s in own):
            chosen = next(s for s in own if s.step == 0)  # a seed checkpoint
        if chosen is None and own:
            raise CheckpointError(
                f"{where} holds only model-only steps {sorted(s.step for s in own)} (final "
                "exports), which hold no optimizer or data position to resume from; start "
                "from one with --checkpoint.load_step N, or use another folder or job.name")
        if chosen is None and foreign:
            raise CheckpointError(
                f"{where} holds committed steps {sorted(s.step for s in foreign)} of other "
                f"runs ({sorted({s.lineage for s in foreign})}), none of this folder's run "
                f"{lineage}: resume from one explicitly with --checkpoint.load_step N, or use "
                "another folder or job.name")
    if chosen is None:
        choice.blocking = [describe_step(s, where) for s in unloadable]
        return choice
    newer = [s for s in unloadable if s.step > chosen.step]
    if newer and load_step < 0:
        choice.warnings.append(
            f"checkpoint: RESUMING FROM THE OLDER {step_name(chosen.step)}: the newer "
            f"{', '.join(describe_step(s, where) for s in newer)} cannot be loaded. A save "
            "that needs its name moves it to quarantine/ first")
    choice.step, choice.commit = chosen.step, chosen.commit
    choice.others = sorted(s for s in committed if s != chosen.step)
    return choice
