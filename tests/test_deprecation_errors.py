"""The pytest configuration turns a deprecated call of ours into an error (pyproject.toml,
[tool.pytest.ini_options] filterwarnings), so that a deprecation fails a test on the day it
appears instead of printing a line into the service's log.

Each test makes the deprecated call for real and checks that the filter, as configured, bites
(or, for a third-party module, that it does not).
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from transformers import DynamicCache

from tests.service.adapter_fixtures import tiny_backbone


def _module(name: str) -> types.ModuleType:
    """A module named `name` whose `caller()` calls `old_api()`, which warns with
    stacklevel=2 as libraries do: the warning is attributed to `caller`, i.e. to `name`."""
    module = types.ModuleType(name)
    source = (
        "import warnings\n"
        "def old_api(category):\n"
        "    warnings.warn('old_api is deprecated; use new_api', category, stacklevel=2)\n"
        "def caller(category):\n"
        "    old_api(category)\n"
    )
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


def test_hf_deprecated_forward_keyword_is_an_error() -> None:
    """transformers 5.24 renamed `past_key_values=` to `cache=`; its deprecate_kwarg warns from
    inside the forward that nn.Module.__call__ calls, so the warning is attributed to torch."""
    lm = tiny_backbone().lm
    embeds = torch.zeros(1, 3, lm.config.hidden_size)
    with pytest.raises(FutureWarning, match="`past_key_values` is deprecated"):
        lm(inputs_embeds=embeds, past_key_values=DynamicCache(config=lm.config), use_cache=True)
    # The keyword we use passes, and fills the cache.
    cache = DynamicCache(config=lm.config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        logits = lm(inputs_embeds=embeds, cache=cache, use_cache=True).logits
    assert [w for w in caught if issubclass(w.category, FutureWarning)] == []
    assert logits.shape == (1, 3, lm.config.vocab_size)
    assert cache.get_seq_length() == 3


@pytest.mark.parametrize("package", ["adapters", "service"])
@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
def test_deprecated_call_from_our_packages_is_an_error(
    package: str, category: type[Warning]
) -> None:
    module = _module(f"{package}.deprecation_probe")
    with pytest.raises(category, match="old_api is deprecated"):
        module.caller(category)


def test_the_same_call_from_a_third_party_module_is_not_an_error() -> None:
    """Scoped to our packages: a library's own deprecations (and a package whose name only
    starts with ours) do not fail our tests."""
    for name in ("somelib.internal", "adapters_extra.x", "servicemesh"):
        module = _module(name)
        with warnings.catch_warnings(record=True) as caught:
            # Keep the configured filters, but record what gets through instead of hiding it.
            module.caller(FutureWarning)
        assert [str(w.message) for w in caught] == ["old_api is deprecated; use new_api"], name
