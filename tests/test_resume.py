"""An interrupted compression resumes from its progress folder with exactly the result of
an uninterrupted run, skips the finished blocks, keeps shared factors shared, and refuses
a folder of another run or an unreadable one."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import cospadi.pipeline as pipeline
from cospadi.adapters import decoder_layers
from cospadi.errors import CospadiError
from cospadi.methods import SolverOptions
from cospadi.pipeline import compress_blocks

OPTIONS = SolverOptions(sweeps=2)
CONFIG = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


def build() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 300, (6, 24), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(ids()[:2]).logits


def interrupt_after(monkeypatch, commits: int) -> None:
    """Make the pipeline die (like a Ctrl-C) right after its `commits`-th progress save."""
    calls = []

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == commits:
            raise KeyboardInterrupt

    real_save = pipeline.save_progress
    monkeypatch.setattr(pipeline, "save_progress", save_then_stop)


def count_solves(monkeypatch) -> list[int]:
    solved = []
    real = pipeline._solve_all

    def counting(jobs, *args, **kwargs):
        solved.append(len(jobs))
        return real(jobs, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_solve_all", counting)
    return solved


@pytest.mark.parametrize("method,group_size", [("cospadi", 1), ("cospadi", 2), ("svd-llm", 1)])
def test_resumed_run_equals_uninterrupted(tmp_path, monkeypatch, method, group_size):
    whole = build()
    expected = compress_blocks(whole, ids(), method, 0.3, OPTIONS, batch_size=3, progress=False, workers=1,
                               group_size=group_size)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            compress_blocks(build(), ids(), method, 0.3, OPTIONS, batch_size=3, progress=False, workers=1,
                            group_size=group_size, resume_dir=tmp_path)
    solved = count_solves(monkeypatch)
    resumed_model = build()
    resumed = compress_blocks(resumed_model, ids(), method, 0.3, OPTIONS, batch_size=3, progress=False, workers=1,
                              group_size=group_size, resume_dir=tmp_path)
    assert len(solved) == 4 // group_size - 1  # the first group was not solved again
    assert torch.equal(logits(resumed_model), logits(whole))
    assert [(m.layer, m.name, m.output_error) for m in resumed.matrices] == \
        [(m.layer, m.name, m.output_error) for m in expected.matrices]
    if group_size == 2:  # restored blocks of a group still share one dictionary
        layers = decoder_layers(resumed_model)
        assert layers[0].self_attn.q_proj.dictionary is layers[1].self_attn.q_proj.dictionary
        assert layers[0].self_attn.o_proj.dictionary is not layers[1].self_attn.o_proj.dictionary


def test_finished_folder_replays_without_solving(tmp_path, monkeypatch):
    first = build()
    compress_blocks(first, ids(), "cospadi", 0.3, OPTIONS, batch_size=3, progress=False, workers=1,
                    resume_dir=tmp_path)
    solved = count_solves(monkeypatch)
    again = build()
    report = compress_blocks(again, ids(), "cospadi", 0.3, OPTIONS, batch_size=3, progress=False, workers=1,
                             resume_dir=tmp_path)
    assert solved == []
    assert len(report.matrices) == 4 * 7
    assert torch.equal(logits(again), logits(first))


def test_folder_of_another_run_is_refused(tmp_path):
    compress_blocks(build(), ids(), "cospadi", 0.3, OPTIONS, batch_size=3, progress=False, workers=1,
                    resume_dir=tmp_path)
    with pytest.raises(CospadiError, match="different run"):
        compress_blocks(build(), ids(), "cospadi", 0.4, OPTIONS, batch_size=3, progress=False, workers=1,
                        resume_dir=tmp_path)
    other_data = ids().flip(0)
    with pytest.raises(CospadiError, match="different run"):
        compress_blocks(build(), other_data, "cospadi", 0.3, OPTIONS, batch_size=3, progress=False, workers=1,
                        resume_dir=tmp_path)


def test_unreadable_progress_is_a_clear_error(tmp_path):
    compress_blocks(build(), ids(), "svd-llm", 0.3, OPTIONS, batch_size=3, progress=False, workers=1,
                    resume_dir=tmp_path)
    (tmp_path / "progress.pt").write_bytes(b"truncated")
    with pytest.raises(CospadiError, match="cannot read .*progress.pt"):
        compress_blocks(build(), ids(), "svd-llm", 0.3, OPTIONS, batch_size=3, progress=False, workers=1,
                        resume_dir=tmp_path)
