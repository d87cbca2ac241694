"""Patchwork: training and serving for byte-latent and multimodal model families.

The layers, lowest first (each imports only the ones before it):

- ``patchwork.v1``: the gRPC messages and stubs generated from ``protos/``;
- ``patchwork.kernels``: Triton kernels, each beside the PyTorch reference it must match;
- ``patchwork.engines``: models, engines, the scheduler, checkpoints and the family registry;
- ``patchwork.training``: data, trainers and evaluations, writing checkpoints;
- ``patchwork.serving``: the Ray Serve application, its gRPC services and the `patchwork` commands' servers;
- ``patchwork.loadtests`` and ``patchwork.benchmarks``: measurements of all of the above.

``patchwork.load(path)`` reads a checkpoint and returns its family's engine;
``patchwork.Client`` and ``patchwork.AsyncClient`` call a running server
(``patchwork.client``). Names here are imported on first use, so importing
the stubs stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from patchwork.client import AsyncClient, Client, Retry
    from patchwork.engines.loading import load

# public name -> the module that defines it
_LAZY = {"load": "patchwork.engines.loading", "Client": "patchwork.client", "AsyncClient": "patchwork.client",
         "Retry": "patchwork.client"}

__all__ = ["AsyncClient", "Client", "Retry", "load"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'patchwork' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
