"""Locust's users for the Patchwork gRPC services, run through `patchwork loadtest`.

The runner hands them its plan in $PATCHWORK_LOAD_PLAN (``plan.Plan`` as
JSON): which RPCs each user calls, with which weights, on which models, and
the sizes of the inputs those models take, and the users over time when it
has a ramp. $PATCHWORK_AUTH_TOKEN is sent when set.
"""

from __future__ import annotations

import itertools
import os
import random

import grpc
from locust import LoadTestShape, TaskSet, between
from locust.exception import LocustError

from patchwork.loadtests import inputs
from patchwork.loadtests.grpc_user import GrpcUser
from patchwork.loadtests.plan import PLAN_ENV, Plan, users_at
from patchwork.v1 import audiovideo_pb2

PLAN = Plan.model_validate_json(os.environ[PLAN_ENV]) if PLAN_ENV in os.environ else None
TIMEOUT_S = 120.0

BYTE_PROMPTS = [
    b"def ", b"import ", b"class Parser:\n", b"    return ", b"# Copyright", b"for i in range(",
    b"The quick brown fox", b"if __name__ == '__main__':\n", b"with open(path) as f:\n", b"try:\n    ",
]
IMAGE_PROMPTS = inputs.prompts()
INFILL_TEXTS = inputs.infill_texts()
PICTURES = inputs.pictures(PLAN.images.image_size, 8) if PLAN and PLAN.images else []
CLIPS = inputs.clips(PLAN.clips) if PLAN and PLAN.clips else []
# Retrieval asks with one modality: a clip's sound or its frames.
QUERIES = [audiovideo_pb2.Clip(wav=clip.wav) for clip in CLIPS] + [audiovideo_pb2.Clip(frames=clip.frames)
                                                                   for clip in CLIPS]


def generation(user: MixUser, rpc: str) -> dict:
    return {"prompt": random.choice(BYTE_PROMPTS), "max_new_bytes": PLAN.max_new_bytes,
            "temperature": PLAN.temperature, "seed": random.getrandbits(32), "model": user.models[rpc]}


def generate_stream(user: MixUser) -> None:
    for _ in user.client.generate_stream(**generation(user, "GenerateStream"), timeout=TIMEOUT_S):
        pass


def generate(user: MixUser) -> None:
    user.client.generate(**generation(user, "Generate"), timeout=TIMEOUT_S)


def score(user: MixUser) -> None:
    user.client.score(random.choice(BYTE_PROMPTS) * 4, model=user.models["Score"], timeout=TIMEOUT_S)


def generate_image(user: MixUser) -> None:
    user.client.generate_image(random.choice(IMAGE_PROMPTS), samples=PLAN.samples,
                               decoding={"seed": random.getrandbits(32)}, model=user.models["GenerateImage"],
                               timeout=TIMEOUT_S)


def caption(user: MixUser) -> None:
    user.client.caption(random.choice(PICTURES), max_new_bytes=PLAN.max_new_bytes, model=user.models["Caption"],
                        timeout=TIMEOUT_S)


def infill(user: MixUser) -> None:
    user.client.infill(random.choice(INFILL_TEXTS), image=random.choice(PICTURES), max_new_bytes=PLAN.max_new_bytes,
                       model=user.models["Infill"], timeout=TIMEOUT_S)


def embed(user: MixUser) -> None:
    user.client.embed(random.choice(CLIPS), model=user.models["Embed"], timeout=TIMEOUT_S)


def classify(user: MixUser) -> None:
    user.client.classify(random.choice(CLIPS), model=user.models["Classify"], timeout=TIMEOUT_S)


def retrieve(user: MixUser) -> None:
    user.client.retrieve(random.choice(QUERIES), index=PLAN.clips.index, model=user.models["Retrieve"],
                         timeout=TIMEOUT_S)


def _going_on(call):
    """The task that makes ``call``; a failed call is already reported by the interceptor, and the user goes on."""

    def task(rounds: Rounds) -> None:
        try:
            call(rounds.user)
        except grpc.RpcError:
            pass

    task.__name__ = call.__name__
    return task


TASKS = {"GenerateStream": generate_stream, "Generate": generate, "Score": score, "GenerateImage": generate_image,
         "Caption": caption, "Infill": infill, "Embed": embed, "Classify": classify, "Retrieve": retrieve}


class Rounds(TaskSet):
    """The plan's RPCs in rounds: each as many times a round as its weight, in a
    new random order every round; so every user keeps to the mix's proportions.
    User k's first call is the k-th of a round's calls (in the plan's order), so
    a run of as many users as a round has calls makes every call at once,
    however slow the server."""

    tasks = {_going_on(TASKS[call.rpc]): call.weight for call in PLAN.calls} if PLAN else []

    def on_start(self) -> None:
        first = self.tasks[self.user.number % len(self.tasks)]
        self.round = random.sample(self.tasks, len(self.tasks))
        self.round.remove(first)
        self.round.append(first)  # the next call

    def get_next_task(self):
        if not self.round:
            self.round = random.sample(self.tasks, len(self.tasks))
        return self.round.pop()


class MixUser(GrpcUser):
    """Calls the plan's RPCs (``Rounds``), 0-100 ms apart; users are numbered as they start."""

    wait_time = between(0.0, 0.1)
    token = os.environ.get("PATCHWORK_AUTH_TOKEN") or None
    tasks = [Rounds]
    started = itertools.count()

    def __init__(self, environment):
        if PLAN is None:
            raise LocustError(f"no plan in ${PLAN_ENV}: run the users through `patchwork loadtest`")
        super().__init__(environment)
        self.number = next(MixUser.started)
        self.models = {call.rpc: call.model for call in PLAN.calls}


if PLAN is not None and PLAN.ramp:

    class Ramp(LoadTestShape):
        """The plan's users over time (``plan.users_at``), re-read every second;
        users join or leave within that second (a leaving user ends its call
        first), and the run ends at the ramp's last point."""

        def tick(self):
            at_s = self.get_run_time()
            if at_s >= PLAN.ramp[-1].at_s:
                return None
            return users_at(PLAN.ramp, at_s), max(1, max(point.users for point in PLAN.ramp))
