"""Model families: the config type of each and how to build its engine."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel

# family name -> module that defines FAMILY (imported on first use)
_FAMILY_MODULES = {"blt": "engines.blt.engine"}


@dataclass(frozen=True)
class Family:
    name: str
    config_type: type[BaseModel]
    format_version: int
    # (config, weights, device, dtype, name, manifest) -> engine
    build_engine: Callable


def known_families() -> list[str]:
    return sorted(_FAMILY_MODULES)


def get_family(name: str) -> Family | None:
    module = _FAMILY_MODULES.get(name)
    return importlib.import_module(module).FAMILY if module else None
