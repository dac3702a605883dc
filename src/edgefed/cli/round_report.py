"""What `round` and `run` say about a round: while waiting for peers and when going on without
some of them (by name, with the time left, so a user at one laptop knows whom to nudge), and
the one line that sums a round up."""

from __future__ import annotations

from collections.abc import Mapping

from edgefed.device.pull import WaitState
from edgefed.plural import counted


def _names(devices: list[str], limit: int = 4) -> str:
    shown = ", ".join(devices[:limit])
    return shown + (f" and {len(devices) - limit} more" if len(devices) > limit else "")


def _clock(seconds: float) -> str:
    minutes, rest = divmod(max(0, round(seconds)), 60)
    return f"{minutes}:{rest:02d}"


def describe_wait(state: WaitState) -> str:
    """One status line: who is awaited, who has published, how long is left, any outage."""
    if state.outage is not None:
        return (
            f"round {state.round}: the store does not answer, retrying until the wait ends "
            f"({_clock(state.seconds_left)} left): {state.outage}"
        )
    published = f" ({_names(state.fresh)} published)" if state.fresh else ""
    return (
        f"round {state.round}: waiting for {_names(state.missing) or 'peers'}{published}, "
        f"{_clock(state.seconds_left)} left"
    )


def went_on_without(round_number: int, pull: Mapping) -> str | None:
    """The warning for peers a round went on without (a round's pull record), or None."""
    missing = list(pull.get("missing") or [])
    if not missing:
        return None
    rounds = pull.get("peer_rounds") or {}
    older = [f"{p}'s round {rounds[p]}" for p in missing if p in rounds]
    absent = [p for p in missing if p not in rounds]
    used = "; mixing " + ", ".join(older) if older else ""
    unused = f"; nothing of {_names(absent)} to mix" if absent else ""
    waited = pull.get("waited_seconds")
    after = f" after waiting {waited:.0f} s" if waited else ""
    return (
        f"round {round_number}: went on without {_names(missing)} (no adapter of this round"
        f"{after}){used}{unused}. It is mixed when it arrives, by whoever aggregates next."
    )


def round_summary(record) -> str:
    """One line for a finished round (a RoundRecord): test perplexity, peers mixed, time."""
    steps = record.steps
    pull, evaluation = steps.get("pull", {}), steps.get("evaluate", {})
    rounds = pull.get("peer_rounds") or {}
    mixed = ", ".join(
        p if r == record.round else f"{p} (round {r})" for p, r in sorted(rounds.items())
    )
    seconds = sum(step.get("seconds", 0.0) for step in steps.values())
    perplexity = evaluation.get("aggregated")
    scored = "" if perplexity is None else f"test perplexity {perplexity:.3f}"
    if perplexity is not None and evaluation.get("local"):
        scored += f" (local {evaluation['local']:.3f})"
    train = steps.get("train", {})
    trained = ""
    if train.get("steps") is not None:
        trained = f"trained {counted(train['steps'], 'step')}"
        if train.get("epochs") is not None:
            trained += f" ({train['epochs']:g} epochs)"
        kept = train.get("kept", "trained")
        if kept != "trained":
            trained += f", kept {'its start' if kept == 'start' else 'the bare base'}"
        elif train.get("kept_step", train["steps"]) < train["steps"]:
            trained += f", kept step {train['kept_step']} (its best)"
    return "; ".join(
        part
        for part in (
            f"round {record.round}: {scored}" if scored else f"round {record.round}",
            trained,
            f"mixed {counted(len(rounds), 'peer')}: {mixed}" if rounds else "mixed no peer",
            f"{pull['rejected']} rejected" if pull.get("rejected") else "",
            f"took {_duration(seconds)}" if seconds else "",
        )
        if part
    )


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"
