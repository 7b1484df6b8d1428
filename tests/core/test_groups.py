"""Channel groups: the opaque-layer registry, Torch-Pruning failures as one-line errors, bounded walks.

* ``core`` imports no ``prunekit.models``: layers a model package defines register themselves
  with :func:`register_opaque`.
* A model Torch-Pruning cannot trace (ShuffleNetV2's channel shuffle) is a UserError naming
  the model and the op, never a bare ZeroDivisionError.
* The walk of a group equals Torch-Pruning's own ``get_pruning_group`` where that terminates,
  and stops (the group blocked, saying where) where it does not: Swin's shifted windows once
  took more than 10 GB without finishing.
"""

from __future__ import annotations

import ast
import json
import resource
import signal
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import DenseNet, VisionTransformer
from torchvision.models import swin_transformer as swin

from prunekit.core import groups as G
from prunekit.core.compaction import compact
from prunekit.core.groups import channel_groups, dependency_graph, register_opaque
from prunekit.errors import UserError
from prunekit.models import build_model
from prunekit.models.cifar_resnet import PadShortcut

CORE = Path(G.__file__).parent


def test_core_imports_no_model_package() -> None:
    """Checked on the source, so a lazy import inside a function counts too."""
    for path in sorted(CORE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            assert not [m for m in modules if m.startswith("prunekit.models")], path.name


class _Shift(nn.Module):
    """Parameter-free, moves channel i to i + 1: Torch-Pruning would take it as element-wise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, 1, dims=1)


def _shift_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 1), _Shift(), nn.Conv2d(4, 2, 1))


def test_register_opaque_blocks_the_groups_through_the_layer(monkeypatch) -> None:
    monkeypatch.setattr(G, "_OPAQUE", dict(G._OPAQUE))  # registration stays inside this test
    x = torch.randn(1, 3, 4, 4)
    assert channel_groups(_shift_net(), x)[0].blocked is None  # what it gets wrong unregistered
    register_opaque(_Shift, "coupled to a channel shift")
    first, second = channel_groups(_shift_net(), x)
    assert first.root == "0" and first.blocked == "coupled to a channel shift ('1')"
    assert second.root == "2" and second.blocked == "its channels are the model's output ('2')"
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_opaque(len, "not a layer")  # type: ignore[arg-type]


def test_models_register_pad_shortcut() -> None:
    assert "PadShortcut" in G._OPAQUE[PadShortcut]


def test_shufflenet_trace_failure_is_one_line_naming_model_and_op() -> None:
    model = build_model("tv:shufflenet_v2_x0_5").eval()
    with pytest.raises(UserError) as info:
        channel_groups(model, torch.randn(1, 3, 32, 32))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("ShuffleNetV2: Torch-Pruning cannot build its channel dependency graph: "
                              "ZeroDivisionError at ViewBackward0 after 'stage")
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_forward_failure_while_tracing_names_the_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(10, 2))
    with pytest.raises(UserError, match=r"^Sequential: Torch-Pruning cannot build its channel dependency "
                                        r"graph: RuntimeError.*mat1 and mat2 shapes cannot be multiplied"):
        dependency_graph(model, torch.randn(1, 3, 8, 8))


def test_prunekit_bugs_are_not_reported_as_user_errors(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise KeyError("a bug of prunekit's")

    monkeypatch.setattr(G, "_describe", broken)
    with pytest.raises(KeyError):
        channel_groups(_shift_net(), torch.randn(1, 3, 4, 4))


class _ConcatFlatten(nn.Module):
    """A concatenation of two branches (one reused twice) flattened into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)
        self.c = nn.Conv2d(10, 3, 1)
        self.fc = nn.Linear(3 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        y = self.c(torch.cat([a, self.b(x), a], dim=1))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 2), 1))


def _tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "vit":
        return VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8,
                                 mlp_dim=16, num_classes=3)
    if name == "densenet":
        return DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3)
    if name == "concat_flatten":
        return _ConcatFlatten()
    return build_model(name)


def _by_target(items) -> dict:
    """(target, handler) -> (index, root channel) pairs; the order of ops reached differs."""
    return {(i.dep.target, i.dep.handler): list(zip(i.idxs, i.root_idxs)) for i in items}


def _view(group: G.ChannelGroup) -> tuple:
    coupled = [(c.param, c.dim, c.shape, c.position.tolist(), c.root_channel.tolist()) for c in group.coupled]
    return group.members, group.blocked, coupled


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "vit", "densenet", "concat_flatten"])
def test_walk_equals_torch_pruning_where_it_terminates(name: str) -> None:
    """Oracle: Torch-Pruning's own group of every root, target by target, index by index.

    Only the order in which parameter-free ops are first reached differs (Torch-Pruning walks
    some paths twice); the layers and parameters, hence the ChannelGroup, come in the same order.
    """
    model = _tiny(name).eval()
    x = torch.randn(1, 3, 16, 16) if name == "vit" else torch.randn(1, 3, 32, 32)
    graph = dependency_graph(model, x)
    names = {m: n for n, m in model.named_modules()}
    params = {p: n for n, p in model.named_parameters()}
    roots = [m for m in model.modules() if isinstance(m, G._ROOTS) and m in graph.module2node]
    assert len(roots) >= 4
    for module in roots:
        pruner = graph.get_pruner_of_module(module)
        channels = pruner.get_out_channels(module)
        expected = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(channels)))
        items, stopped = G._pruning_group(graph, module, channels, names)
        assert stopped is None
        assert items[0].dep.target is expected[0].dep.target  # the root first
        assert _by_target(items) == _by_target(expected), names[module]
        ours, theirs = (_view(G._describe(graph, found, names[module], channels, names, params, None))
                        for found in (items, expected))
        assert ours == theirs


def test_work_limit_blocks_the_group_and_names_the_op(monkeypatch) -> None:
    monkeypatch.setattr(G, "WORK_LIMIT", 100)
    model = build_model("resnet20").eval()
    groups = {g.root: g for g in channel_groups(model, torch.randn(1, 3, 32, 32))}
    assert groups["conv1"].blocked.startswith(
        "Torch-Pruning's channel coupling did not close within 100 mapped indices (at ")
    with pytest.raises(UserError, match=r"cannot compact layer 'conv1': Torch-Pruning's channel coupling"):
        compact(model, {"conv1": torch.arange(8)}, torch.randn(1, 3, 32, 32))


def _tiny_swin_v2() -> nn.Module:
    torch.manual_seed(0)
    return swin.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[1, 1], window_size=[2, 2],
                                num_classes=10, block=swin.SwinTransformerBlockV2,
                                downsample_layer=swin.PatchMergingV2).eval()


@contextmanager
def _bounded(seconds: int, extra_bytes: int = 2 << 30):
    """A regressed walk fails here (MemoryError, TimeoutError) instead of taking the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    limit = int(status["VmSize"].split()[0]) * 1024 + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))

    def expire(*_):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.skipif(sys.platform != "linux", reason="the memory limit reads /proc/self/status")
def test_shifted_windows_stop_and_the_mlp_channels_still_compact() -> None:
    """Regression: Torch-Pruning's own walk of this 2-stage Swin V2 does not finish in minutes."""
    model, x = _tiny_swin_v2(), torch.randn(1, 3, 16, 16)
    with _bounded(seconds=60):
        groups = {g.root: g for g in channel_groups(model, x)}
    assert groups["features.0.0"].blocked.startswith(
        "Torch-Pruning sends two of its channels to one position at AddBackward0 after 'features.0.2'")
    # the relative-position-bias MLP's output (one head) maps without end: 8192 indices per channel
    assert groups["features.1.0.attn.cpb_mlp.2"].blocked.startswith(
        "Torch-Pruning's channel coupling did not close within 8192 mapped indices (at ")
    free = sorted(root for root, g in groups.items() if g.blocked is None)
    assert free == [f"features.{s}.{b}.mlp.0" for s in (1, 3) for b in (0, 1)]
    result = compact(model, {"features.1.0.mlp.0": torch.arange(0, 32, 2)}, x)  # checks outputs = masked model's
    assert result.model.features[1][0].mlp[0].out_features == 16
    assert result.model.features[1][0].mlp[3].in_features == 16


_SWIN_T = textwrap.dedent("""
    import json, resource, torch
    from prunekit.core.groups import channel_groups
    from prunekit.models import build_model
    model = build_model("tv:swin_t").eval()
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    vm = int(status["VmSize"].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
    print(json.dumps({g.root: g.blocked for g in channel_groups(model, torch.randn(1, 3, 64, 64))}))
""")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the memory limit reads /proc/self/status")
def test_swin_t_finishes_within_two_gigabytes_and_three_minutes() -> None:
    """Regression: Torch-Pruning's walk of Swin-T's last stage grew past 10 GB without finishing."""
    done = subprocess.run([sys.executable, "-c", _SWIN_T], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    blocked = json.loads(done.stdout.splitlines()[-1])
    assert blocked["features.6.reduction"].startswith("Torch-Pruning sends two of its channels to one position at ")
    assert "LayerNorm" in blocked["features.0.0"]
    assert [root for root, why in blocked.items() if why is None] == \
        [f"features.{s}.{b}.mlp.0" for s, depth in ((1, 2), (3, 2), (5, 6), (7, 2)) for b in range(depth)]
