"""What a load test calls: its mix of RPCs, the model each goes to, and the
size of the inputs that model takes (read from ListModels).

A mix is a comma-separated list of items, later ones overriding earlier:
``RPC=WEIGHT`` (an RPC by its method name; weight 0 drops it), a family
(``blt``, ``cm3leon``, ``mavil``: its RPCs at their default weights) or
``all`` (the RPCs of every one of those families the server serves), e.g.
``all,GenerateImage=0`` or ``Embed=2,Classify=1,Retrieve=1``. Each family's
RPCs go to one model: the one ``--model`` names, else the server's default
model when it is of that family, else the family's first served model by name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

# Where the runner hands the plan to Locust's users (JSON).
PLAN_ENV = "PATCHWORK_LOAD_PLAN"
ALL = "all"


def generated_bytes(message) -> int:
    """Bytes a generation produced: its usage when it has one (a stream's last chunk), else its text."""
    usage = getattr(message, "usage", None)
    if usage is not None and usage.generated_bytes:
        return usage.generated_bytes
    return len(getattr(message, "text", b""))


@dataclass(frozen=True)
class Rpc:
    family: str  # the family whose models answer it
    weight: int  # its weight when its family's mix is asked for
    unit: str  # what its responses produce, per second in the reports
    outputs: Callable[[Any], int]  # how many of them a response holds


# Every RPC the load tests call, in report order.
RPCS = {
    "GenerateStream": Rpc("blt", 6, "bytes", generated_bytes),
    "Generate": Rpc("blt", 3, "bytes", generated_bytes),
    "Score": Rpc("blt", 1, "scored bytes", lambda response: len(response.entropies)),
    "GenerateImage": Rpc("cm3leon", 1, "images", lambda response: len(response.images)),
    "Caption": Rpc("cm3leon", 1, "captions", lambda response: 1),
    "Infill": Rpc("cm3leon", 1, "infills", lambda response: 1),
    "Embed": Rpc("mavil", 1, "clips", lambda response: 1),
    "Classify": Rpc("mavil", 1, "clips", lambda response: 1),
    "Retrieve": Rpc("mavil", 1, "clips", lambda response: 1),
}
FAMILIES = tuple(dict.fromkeys(rpc.family for rpc in RPCS.values()))


class PlanError(ValueError):
    """A mix or model choice the server cannot run; the message names the flag."""


class Call(BaseModel):
    rpc: str
    weight: int = Field(ge=1)
    model: str


class ImageInputs(BaseModel):
    """A CM3Leon model's image side (pixels)."""

    image_size: int = Field(ge=1)


class ClipInputs(BaseModel):
    """A MAViL model's clip: its sound's length and rate, its frames and their side, and an index to search."""

    seconds: float = Field(gt=0)
    sample_rate: int = Field(ge=1)
    frames: int = Field(ge=1)
    frame_size: int = Field(ge=1)
    index: str | None = None


class RampPoint(BaseModel):
    """Users at a moment of a ramp (seconds from its start)."""

    at_s: float = Field(ge=0)
    users: int = Field(ge=0)


def duration_seconds(text: str) -> float | None:
    """Seconds of a duration such as 90, 90s, 2m or 1h; None when it is not one."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
    except (ValueError, IndexError):
        return None


def parse_ramp(text: str) -> list[RampPoint]:
    """``--ramp``'s points: USERS@TIME, in order of time, from time 0."""
    points = []
    for item in text.split(","):
        users, at, time_text = item.strip().partition("@")
        if not at or not users.isdigit():
            raise PlanError(f"--ramp {text!r}: {item.strip()!r} is not USERS@TIME (e.g. 32@60s)")
        at_s = duration_seconds(time_text)
        if at_s is None or at_s < 0:
            raise PlanError(f"--ramp {text!r}: {time_text!r} is not a time (e.g. 60s, 2m)")
        points.append(RampPoint(at_s=at_s, users=int(users)))
    if points[0].at_s != 0 or len(points) < 2 or any(a.at_s > b.at_s for a, b in zip(points, points[1:])):
        raise PlanError(f"--ramp {text!r}: give two points or more, the first at 0s, in order of time")
    if max(point.users for point in points) == 0:
        raise PlanError(f"--ramp {text!r}: no point has a user")
    return points


def users_at(ramp: list[RampPoint], at_s: float) -> int:
    """The users a ramp asks for at ``at_s``: on the straight line between
    the points around it, rounded."""
    for before, after in zip(ramp, ramp[1:]):
        if at_s <= after.at_s:
            span = after.at_s - before.at_s
            share = 1.0 if span == 0 else max(0.0, at_s - before.at_s) / span
            return round(before.users + share * (after.users - before.users))
    return ramp[-1].users


class Plan(BaseModel):
    calls: list[Call]
    max_new_bytes: int = Field(ge=1)  # of a generation, a caption or an infill
    temperature: float = Field(default=0.8, ge=0)  # of generations
    samples: int = Field(default=1, ge=1)  # images a GenerateImage asks for
    images: ImageInputs | None = None
    clips: ClipInputs | None = None
    # Users over time (``--ramp``), instead of a fixed number for the whole run.
    ramp: list[RampPoint] | None = None

    @property
    def rpcs(self) -> list[str]:
        return [call.rpc for call in self.calls]

    @property
    def units(self) -> list[str]:
        """The units the mix's responses produce, in report order, each once."""
        return list(dict.fromkeys(RPCS[rpc].unit for rpc in self.rpcs))

    def describe(self) -> str:
        return ", ".join(f"{call.rpc}={call.weight} ({call.model})" for call in self.calls)


def parse_mix(text: str) -> list[tuple[str, int | None]]:
    """``--mix``'s items in order: an RPC with its weight, or a family or ``all`` (None)."""
    items: list[tuple[str, int | None]] = []
    for item in text.split(","):
        name, equals, weight = item.strip().partition("=")
        if not equals:
            if name != ALL and name not in FAMILIES:
                raise PlanError(f"--mix {text!r}: {name!r} is neither RPC=WEIGHT, a family "
                                f"({', '.join(FAMILIES)}) nor {ALL!r}")
            items.append((name, None))
        elif name not in RPCS:
            raise PlanError(f"--mix {text!r}: unknown RPC {name!r} (known: {', '.join(RPCS)})")
        elif not weight.isdigit():
            raise PlanError(f"--mix {text!r}: the weight of {name} must be a whole number, 0 or more, "
                            f"not {weight!r}")
        else:
            items.append((name, int(weight)))
    return items


def _weights(items: list[tuple[str, int | None]], served: set[str]) -> dict[str, int]:
    """RPC -> weight, for the RPCs whose weight is not 0, in report order."""
    weights: dict[str, int] = {}
    for name, weight in items:
        if weight is None:
            families = [family for family in FAMILIES if family in served] if name == ALL else [name]
            weights.update({rpc: spec.weight for rpc, spec in RPCS.items() if spec.family in families})
        else:
            weights[name] = weight
    return {rpc: weights[rpc] for rpc in RPCS if weights.get(rpc)}


def choose_models(models: list, named: list[str]) -> dict[str, Any]:
    """Family -> the ``ModelInfo`` its RPCs go to (see the module's docstring)."""
    by_name = {model.name: model for model in models}
    chosen: dict[str, Any] = {}
    for name in named:
        if name not in by_name:
            raise PlanError(f"--model {name}: not served (served: {', '.join(sorted(by_name))})")
        family = by_name[name].family
        if family not in FAMILIES:
            raise PlanError(f"--model {name}: its family {family!r} has no load-test users "
                            f"(they call {', '.join(FAMILIES)})")
        if family in chosen:
            raise PlanError(f"--model {name}: {chosen[family].name} is already {family}'s model")
        chosen[family] = by_name[name]
    for model in sorted(models, key=lambda model: (not model.is_default, model.name)):
        if model.family in FAMILIES:
            chosen.setdefault(model.family, model)
    return chosen


def clip_inputs(config: dict) -> ClipInputs:
    indexes = sorted(config.get("indexes", {}), key=lambda name: name != "heldout")
    return ClipInputs(seconds=config["audio"]["seconds"], sample_rate=config["audio"]["sample_rate"],
                      frames=config["video"]["frames"], frame_size=config["video"]["image_size"],
                      index=indexes[0] if indexes else None)


def make_plan(mix: str, models: list, named: list[str], max_new_bytes: int, samples: int) -> Plan:
    """The calls of ``mix`` on the served ``models`` (ListModels' ``ModelInfo``s),
    with the input sizes of the models chosen."""
    chosen = choose_models(models, named)
    weights = _weights(parse_mix(mix), set(chosen))
    if not weights:
        raise PlanError(f"--mix {mix!r}: no RPC left to call")
    unserved = [rpc for rpc in weights if RPCS[rpc].family not in chosen]
    if unserved:
        raise PlanError(f"--mix {mix!r}: no served model answers {', '.join(unserved)} "
                        f"(served families: {', '.join(sorted({m.family for m in models}))})")
    calls = [Call(rpc=rpc, weight=weight, model=chosen[RPCS[rpc].family].name) for rpc, weight in weights.items()]
    config = {family: json.loads(model.config_json) for family, model in chosen.items()}
    plan = Plan(calls=calls, max_new_bytes=max_new_bytes, samples=samples,
                images=ImageInputs(image_size=config["cm3leon"]["vq"]["image_size"]) if "cm3leon" in config else None,
                clips=clip_inputs(config["mavil"]) if "mavil" in config else None)
    if "Retrieve" in weights and plan.clips.index is None:
        raise PlanError(f"--mix {mix!r}: Retrieve needs an index and {chosen['mavil'].name} has none "
                        "(Retrieve=0 drops it)")
    return plan
