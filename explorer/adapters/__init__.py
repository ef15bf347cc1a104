"""Architecture adapters, keyed by `config.model_type`: one file per family."""
from __future__ import annotations

from ..errors import ModelError
from .base import Adapter, Block, ParamSlice, UnitGroup
from .bert import BertAdapter, DistilBertAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter

ADAPTERS: list[Adapter] = [BertAdapter(), DistilBertAdapter(), GPT2Adapter(), LlamaAdapter()]
BY_MODEL_TYPE = {t: a for a in ADAPTERS for t in a.model_types}


def supported_families() -> str:
    return "; ".join(f"{a.family} ({', '.join(a.model_types)})" for a in ADAPTERS)


def adapter_for(model_type: str) -> Adapter:
    try:
        return BY_MODEL_TYPE[model_type]
    except KeyError:
        raise ModelError(f"unsupported architecture '{model_type}': supported families are "
                         f"{supported_families()}") from None


__all__ = ["Adapter", "Block", "ParamSlice", "UnitGroup", "ADAPTERS", "adapter_for", "supported_families"]
