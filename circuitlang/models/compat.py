"""What differs between the `transformers` releases circuitlang supports, in one place.

Takes a Hugging Face model (or a dtype); gives the keyword arguments that release
expects. The supported range is declared in pyproject.toml (and stated in the
README); CI installs the newest release a new user would get, and
tests/models/test_golden.py compares the embedded models' logits with recorded
numbers, so a release that changes a user's numbers fails CI instead of passing
silently.

* The key/value cache of a forward pass is `cache=` on releases that have it
  (5.x; `past_key_values=` is deprecated there and warns on every call) and
  `past_key_values=` before. The output carries it under the same name.
* `from_pretrained` takes `dtype=` from 4.56 on (`torch_dtype=` before).
* `from_pretrained` replaces layers' code with Hub kernels by default from 5.25 on
  (`use_kernels=None` means on, and needs the `kernels` package); before, off. Hub
  kernels can fuse the modules circuitlang's hooks read (an MLP's output projection,
  a norm), and fetch code from the Hub at load time, so they are always turned off
  (`no_hub_kernels`).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.lru_cache(maxsize=64)
def _cache_keyword_for(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(hf_model: Any) -> str:
    """The name under which this model's `forward` takes (and returns) its key/value cache."""
    return _cache_keyword_for(type(hf_model))


def forward(hf_model: Any, input_ids, attention_mask=None, *, cache: Any = None, keep_cache: bool = False):
    """Call a HF causal LM: a plain pass, or one that continues `cache` (a prefix's keys/values).

    Args:
        hf_model: the `transformers` model.
        input_ids: [B, T] token ids (the tokens after the cached prefix, if any).
        attention_mask: [B, T] (prefix included, when continuing a cache).
        cache: a cache returned by an earlier call with `keep_cache=True`, or None.
        keep_cache: return the cache of this pass too (costs memory; off by default).

    Returns:
        (logits [B, T, V], the new cache or None).
    """
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                              "use_cache": bool(keep_cache or cache is not None)}
    name = cache_keyword(hf_model)
    if cache is not None:
        kwargs[name] = cache
    out = hf_model(**kwargs)
    new_cache = getattr(out, name, None) if kwargs["use_cache"] else None
    return out.logits, new_cache


def dtype_keyword() -> str:
    """`dtype` (transformers >= 4.56) or `torch_dtype` (older) for `from_pretrained`."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def no_hub_kernels() -> dict:
    """`from_pretrained`'s keyword that keeps the model's own layer code (`use_kernels=False`)
    on releases that have Hub kernels (`PreTrainedModel.set_use_kernels`); none before."""
    from transformers import PreTrainedModel

    return {"use_kernels": False} if hasattr(PreTrainedModel, "set_use_kernels") else {}
