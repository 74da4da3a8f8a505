"""The plug-in points: a method is one registered object, a compressed module kind is one
CompressedLinear subclass, per-matrix ratios are a pipeline input, the family adapter owns
the sharing rule, and SolverOptions is the one source of the solver's defaults."""

import contextlib
import io
from dataclasses import fields

import pytest
import torch
from torch import nn

import cospadi
from cospadi import cli
from cospadi.adapters import Adapter, adapter_for
from cospadi.budget import lowrank_budget
from cospadi.cli_common import solver_options
from cospadi.errors import CospadiError
from cospadi.layers.base import MODULE_KINDS, CompressedLinear, compressed_modules
from cospadi.layers.linear import LowRankLinear
from cospadi.methods import REGISTRY, Method, get_method, register
from cospadi.pipeline import Recipe, check_recipe, compress_blocks
from cospadi.solvers import SolverOptions, svd_llm


class ScaledLowRankLinear(LowRankLinear):
    """A new module kind: low rank with the right factor's columns normalised and their
    norms kept in a separate `scale` (out,) vector."""

    kind = "test-scaled-lowrank"

    def __init__(self, in_features, out_features, rank, bias=False, dtype=torch.float32, device=None):
        super().__init__(in_features, out_features, rank, bias, dtype, device)
        self.scale = nn.Parameter(torch.ones(out_features, dtype=dtype, device=device))

    @classmethod
    def from_factors(cls, factors, bias, dtype):
        norms = factors.right.norm(dim=0).clamp_min(1e-30)
        module = super().from_factors(type(factors)(factors.left, factors.right / norms), bias, dtype)
        with torch.no_grad():
            module.scale.copy_(norms)
        return module

    @classmethod
    def tensor_shapes(cls, spec, coef_bits):
        return super().tensor_shapes(spec, coef_bits) | {"scale": (spec["out_features"],)}

    def dense_weight(self):
        return (self.left.float() @ (self.right.float() * self.scale.float())).to(self.left.dtype)

    def forward(self, x):
        y = ((x @ self.left) @ self.right) * self.scale
        return y + self.bias if self.bias is not None else y


class ScaledSvdLlm(Method):
    """A new method in a few lines: svd-llm's factors stored as ScaledLowRankLinear."""

    name = "test-scaled-svd-llm"
    module_kind = ScaledLowRankLinear

    def budget(self, d1, d2, ratio, options, members=1):
        return lowrank_budget(d1, d2, ratio, members)

    def solve(self, weights, grams, budget, options):
        return [svd_llm(w, g, budget) for w, g in zip(weights, grams)]


@pytest.fixture
def scaled_method():
    """ScaledSvdLlm registered for one test, then removed again."""
    method = register(ScaledSvdLlm())
    yield method
    REGISTRY.pop(method.name)
    MODULE_KINDS.pop(ScaledLowRankLinear.kind, None)


def logits(model, ids):
    with torch.no_grad():
        return model(ids[:2]).logits


def test_a_registered_method_runs_saves_and_reloads_with_no_other_change(scaled_method, tiny_llama, tiny_ids,
                                                                        tmp_path):
    model = tiny_llama(2)
    report = compress_blocks(model, tiny_ids, Recipe(scaled_method.name, 0.4), batch_size=3, progress=False)
    modules = dict(compressed_modules(model))
    assert len(modules) == 14 and all(type(m) is ScaledLowRankLinear for m in modules.values())
    plain = tiny_llama(2)
    reference = compress_blocks(plain, tiny_ids, Recipe("svd-llm", 0.4), batch_size=3, progress=False)
    # the same factors, stored another way: the same errors up to rounding
    for ours, theirs in zip(report.matrices, reference.matrices):
        assert (ours.layer, ours.name, ours.rank) == (theirs.layer, theirs.name, theirs.rank)
        assert ours.output_error == pytest.approx(theirs.output_error, rel=1e-6, abs=1e-9)
    cospadi.save(model, None, tmp_path / "out", report.to_dict())
    config = cospadi.storage.folder_checks.read_config(tmp_path / "out")
    kinds = {spec["type"] for spec in config["quantization_config"]["modules"].values()}
    assert kinds == {ScaledLowRankLinear.kind}
    loaded, _ = cospadi.load(tmp_path / "out")
    assert all(type(m) is ScaledLowRankLinear for _, m in compressed_modules(loaded))
    assert torch.equal(logits(loaded, tiny_ids), logits(model, tiny_ids))
    assert "r=" in (tmp_path / "out" / "REPORT.md").read_text()


def test_unknown_method_lists_the_registry():
    with pytest.raises(CospadiError, match="unknown method 'pca'.*svd, svd-llm, basis-sharing, cospadi"):
        get_method("pca")


def test_registered_module_kinds_are_the_compressed_linear_subclasses():
    assert {"dict", "lowrank"} <= set(MODULE_KINDS)
    assert all(issubclass(kind, CompressedLinear) for kind in MODULE_KINDS.values())


def test_per_matrix_ratios_reach_every_matrix(tiny_llama, tiny_ids):
    model = tiny_llama(2)
    targets = adapter_for(model).targets
    ratios = {(block, name): 0.2 for block in range(2) for name in targets}
    ratios[(1, "mlp.up_proj")] = 0.7
    ratios[(0, "self_attn.q_proj")] = 0.5
    report = compress_blocks(model, tiny_ids, Recipe("svd-llm", 0.3, ratios=ratios), batch_size=3, progress=False)
    for row in report.matrices:
        assert row.ratio == ratios[(row.layer, row.name)]
        assert row.rank == lowrank_budget(row.d1, row.d2, row.ratio).rank
    # a uniform map given explicitly is exactly the default run
    explicit = compress_blocks(tiny_llama(2), tiny_ids, Recipe("cospadi", 0.3, ratios={k: 0.3 for k in ratios}),
                               batch_size=3, progress=False, workers=1)
    default = compress_blocks(tiny_llama(2), tiny_ids, Recipe("cospadi", 0.3), batch_size=3, progress=False, workers=1)
    assert [m.output_error for m in explicit.matrices] == [m.output_error for m in default.matrices]


def test_bad_ratio_maps_are_refused_before_any_work(tiny_llama, tiny_ids):
    model = tiny_llama(2)
    ratios = {(block, name): 0.3 for block in range(2) for name in adapter_for(model).targets}
    missing = dict(ratios)
    missing.pop((1, "mlp.down_proj"))
    with pytest.raises(CospadiError, match=r"lacks \(1, 'mlp.down_proj'\)"):
        compress_blocks(model, tiny_ids, Recipe("svd-llm", 0.3, ratios=missing), progress=False)
    with pytest.raises(CospadiError, match="does not have"):
        compress_blocks(model, tiny_ids, Recipe("svd-llm", 0.3, ratios=ratios | {(2, "mlp.up_proj"): 0.3}),
                        progress=False)
    with pytest.raises(CospadiError, match="outside"):
        compress_blocks(model, tiny_ids, Recipe("svd-llm", 0.3, ratios=ratios | {(0, "mlp.up_proj"): 1.0}),
                        progress=False)
    # linears that share one factor (gate of blocks 0 and 1, groups of 2) must share one ratio
    split = ratios | {(1, "mlp.gate_proj"): 0.5}
    with pytest.raises(CospadiError, match="different ratios"):
        compress_blocks(model, tiny_ids, Recipe("cospadi", 0.3, group_size=2, ratios=split), progress=False)
    private = ratios | {(1, "self_attn.q_proj"): 0.5}  # q is per layer under cospadi's default sharing ...
    check_recipe(model, Recipe("cospadi", 0.3, group_size=2, ratios=private))
    with pytest.raises(CospadiError, match="different ratios"):  # ... and shared when --share names it
        compress_blocks(model, tiny_ids, Recipe("cospadi", 0.3, group_size=2, ratios=private, share=("q",)),
                        progress=False)
    assert not list(compressed_modules(model))  # nothing was swapped before the refusals


def test_the_adapter_owns_the_sharing_rule(tiny_llama, tiny_ids):
    with pytest.raises(ValueError, match="not among its targets"):
        Adapter("fused", groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",)), shared=("self_attn.q_proj",))
    adapter = adapter_for(tiny_llama(2))
    assert adapter.shares("mlp.gate_proj") and not adapter.shares("mlp.down_proj")
    model = tiny_llama(2)
    report = compress_blocks(model, tiny_ids, Recipe("basis-sharing", 0.3, group_size=2), batch_size=3, progress=False)
    shared = {row.name for row in report.matrices if row.members == 2}
    assert shared == set(adapter.shared)  # a method without its own default (cospadi's: groups.shared_adapter)


def test_help_shows_every_solver_default_from_solver_options():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main(["compress", "--help"])
    text = " ".join(out.getvalue().split())
    text = text[text.index("options:"):]  # past the usage line
    defaults = SolverOptions()
    for option in fields(SolverOptions):
        flag = "--" + option.name.replace("_", "-")
        assert flag in text
        after = text[text.index(flag + " " + option.name.upper()):]
        assert f"(default: {getattr(defaults, option.name)})" in after[:400], flag
    assert "(default: 0.3)" in text and "(default: cospadi)" in text
    parsed = cli.build_parser().parse_args(["compress"])
    assert solver_options(parsed) == defaults


@pytest.mark.parametrize("method", ["cospadi", "basis-sharing"])
def test_a_biased_family_per_group_folder_reloads(method, tiny_model, calibration_ids, tmp_path):
    """Qwen2's q/k/v have biases: transformers' weight tying used to take a module with a
    bias and a `weight` attribute for an output embedding and crash on reload."""
    model = tiny_model("qwen2", layers=2)
    recipe = Recipe(method, 0.3, group_size=2, share=("q", "k", "v", "gate", "up"))  # the biased q/k/v shared
    report = compress_blocks(model, calibration_ids, recipe, batch_size=4, progress=False)
    cospadi.save(model, None, tmp_path / "out", report.to_dict())
    loaded, _ = cospadi.load(tmp_path / "out")
    q0, q1 = (loaded.model.layers[i].self_attn.q_proj for i in (0, 1))
    assert getattr(q0, q0.shared_factor) is getattr(q1, q1.shared_factor)
    assert torch.equal(logits(loaded, calibration_ids), logits(model, calibration_ids))
