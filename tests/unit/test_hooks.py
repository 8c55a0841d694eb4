import pytest
import torch

from kmd.editors.hooks import HookSpec, MissingModuleError, hooked, install_hooks


def count_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_missing_path_fails_before_installing_anything(tiny_host):
    model = tiny_host.model
    good = HookSpec("model.layers.0.mlp.down_proj", lambda m, a, o: None)
    bad = HookSpec("model.layers.99.mlp.down_proj", lambda m, a, o: None)
    with pytest.raises(MissingModuleError, match="layers.99"):
        install_hooks(model, [good, bad])
    assert count_hooks(model) == 0


def test_hooks_are_removed_on_error_and_nest(tiny_host):
    model = tiny_host.model
    calls = []
    outer = HookSpec("model.layers.0", lambda m, a, o: calls.append("outer"))
    inner = HookSpec("model.layers.1", lambda m, a, o: calls.append("inner"))
    ids = torch.tensor([[4, 5, 6]])
    with pytest.raises(RuntimeError):
        with hooked(model, [outer]):
            with hooked(model, [inner]):
                model(input_ids=ids)
                assert count_hooks(model) == 2
            assert count_hooks(model) == 1
            raise RuntimeError("boom")
    assert count_hooks(model) == 0
    assert calls == ["outer", "inner"]


def test_long_lived_handle_is_explicit_and_idempotent(tiny_host):
    handle = install_hooks(tiny_host.model, [HookSpec("model.norm", lambda m, a, o: None)])
    assert handle.active and count_hooks(tiny_host.model) == 1
    handle.remove()
    handle.remove()
    assert not handle.active and count_hooks(tiny_host.model) == 0
