"""`share`: which linears of a block the blocks of a group share (groups.shared_adapter).
Kinds resolve to the adapter's linears, the method's default applies when none is given,
the pipeline shares exactly the named linears (the others solved per layer at their
per-layer budget), and the choice reaches resume fingerprints, profile keys and bench
cell names; bad values stop with one line."""
import pytest

from cospadi import api, cli
from cospadi.adapters import ADAPTERS, ATTENTION, GATE_UP
from cospadi.bench.sweep import Sweep
from cospadi.budget import dict_budget
from cospadi.errors import CospadiError
from cospadi.groups import parse_share, shared_adapter
from cospadi.methods import get_method
from cospadi.pipeline import Recipe, compress_blocks
from cospadi.solvers import SolverOptions
from test_cli_export_bench_infer import one_error_line  # the one `error:` line check

LLAMA = ADAPTERS["llama"]
OPTIONS = SolverOptions(sweeps=1, power_iters=1)
RATIO = 0.3


def test_kinds_resolve_to_the_adapters_linears_and_defaults_apply():
    cospadi, basis = get_method("cospadi"), get_method("basis-sharing")
    assert shared_adapter(LLAMA, basis).shared == ATTENTION + GATE_UP  # the Basis Sharing protocol
    default = shared_adapter(LLAMA, cospadi).shared
    assert default == tuple(t for t in LLAMA.targets if t.rsplit(".", 1)[1].removesuffix("_proj")
                            in (cospadi.default_share or ("q", "k", "v", "gate", "up")))
    assert shared_adapter(LLAMA, cospadi, ("up", "self_attn.q_proj")).shared == ("self_attn.q_proj", "mlp.up_proj")
    assert shared_adapter(LLAMA, cospadi, ("up",)).groups == LLAMA.groups  # only the sharing changes
    with pytest.raises(CospadiError, match="'qkv'"):
        shared_adapter(LLAMA, cospadi, ("q", "qkv"))
    assert parse_share(" gate, up") == ("gate", "up") and parse_share(["o"]) == ("o",) and parse_share(None) is None
    for bad in ("", "gate,,up"):
        with pytest.raises(CospadiError, match="--share"):
            parse_share(bad)


def test_the_pipeline_shares_exactly_the_named_linears(tiny_llama, tiny_ids):
    model = tiny_llama(2)
    report = compress_blocks(model, tiny_ids, Recipe("cospadi", RATIO, OPTIONS, 2, share=("q", "gate")),
                             batch_size=3, progress=False)
    first, second = model.model.layers
    rows = {(m.layer, m.name): m for m in report.matrices}
    for name in LLAMA.targets:
        a, b = first.get_submodule(name), second.get_submodule(name)
        if name in ("self_attn.q_proj", "mlp.gate_proj"):
            assert a.dictionary is b.dictionary and rows[(0, name)].members == 2
        else:  # per layer: its own dictionary at the per-layer budget
            assert a.dictionary is not b.dictionary and rows[(0, name)].members == 1
            assert a.atoms == dict_budget(a.in_features, a.out_features, RATIO).atoms


def test_share_reaches_fingerprints_and_bench_cell_names():
    plain, named = Recipe("cospadi", RATIO, group_size=2), Recipe("cospadi", RATIO, group_size=2, share=("q", "k"))
    assert plain.settings() != named.settings()
    assert "share" not in Recipe("cospadi", RATIO).settings()  # per-layer fingerprints are unchanged
    sweep = Sweep(methods=("cospadi-group", "basis-sharing"))
    default = get_method("cospadi").default_share
    assert sweep.cell_name("basis-sharing", 0.2).startswith("basis-sharing-g2-0.2")  # cached cells keep their names
    suffix = "" if default is None else "-sh" + "+".join(default)
    assert sweep.cell_name("cospadi-group", 0.2).startswith(f"cospadi-group-g2{suffix}-rho")
    protocol = Sweep(methods=("cospadi-group",), share=("v", "k", "q", "gate", "up"))  # the cells cached before
    assert protocol.cell_name("cospadi-group", 0.2).startswith("cospadi-group-g2-rho")
    assert protocol.section == Sweep(methods=("cospadi-group",)).section + "-shv+k+q+gate+up"  # not overwritten
    named = Sweep(methods=("cospadi-group",), share=("self_attn.q_proj", "k", "v", "mlp.gate_proj", "up"))
    assert named.cell_name("cospadi-group", 0.2) == protocol.cell_name("cospadi-group", 0.2)  # full names are kinds
    chosen = Sweep(methods=("cospadi-group",), share=("q", "k", "v", "gate"))
    assert chosen.cell_name("cospadi-group", 0.2).startswith("cospadi-group-g2-shq+k+v+gate-rho")


def test_share_needs_a_group_and_known_kinds(tiny_llama, tiny_ids, cli_files, tmp_path, capsys):
    with pytest.raises(CospadiError, match="--group-size"):
        compress_blocks(tiny_llama(2), tiny_ids, Recipe("cospadi", RATIO, OPTIONS, 1, share=("gate",)), progress=False)
    with pytest.raises(CospadiError, match="'bogus'"):
        api.compress(tiny_llama(2), None, input_ids=tiny_ids, group_size=2, share="bogus", allocation="uniform",
                     progress=False)
    base = ["compress", "--model", str(cli_files["model"]), "--data", str(cli_files["txt"]), "--calib-samples", "4",
            "--seq-len", "32", "--eval-windows", "1", "--allocation", "uniform", "--out", str(tmp_path / "out"),
            "--quiet", "--share", "gate,up"]
    assert "--group-size" in one_error_line(cli.main(base), capsys.readouterr())
    assert not (tmp_path / "out").exists()
    bogus = base[:-1] + ["gate,bogus", "--group-size", "2", "--eval-windows", "0"]
    assert "'bogus'" in one_error_line(cli.main(bogus), capsys.readouterr())
    assert not (tmp_path / "out").exists()
