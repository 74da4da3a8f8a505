"""Shared fixtures. The hub is never reached: models come from packages (OFFLINE.md).

Tiny random models, built on demand by factory fixtures (each call a fresh model,
seeded, so two calls give identical weights):
* `tiny_llama(layers, seed, **config)`: a Llama of TINY sizes (hidden 32), the pipeline
  and per-group tests' model; `tiny_ids` are its calibration windows.
* `tiny_model(family, layers, seed, **config)`: any supported family (llama, mistral,
  qwen2, qwen3, gemma3 with alternating sliding / full layers) at SMALL sizes (hidden
  64), the storage and per-family tests' model; `calibration_ids` are its windows.
Keyword arguments override single config fields (e.g. tie_word_embeddings=True).

The command-line tests share `cli_files` (a tiny Llama folder with the real SmolLM2
tokenizer, broken variants of it and a small corpus), `printed_rows` and `parse_table`.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

TINY = dict(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
            "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}
GEMMA3_WINDOW = 8  # Gemma3's sliding window in tiny_model


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """The tests use tiny matrices: one intra-op thread avoids spin contention on a
    shared 2-core machine and keeps results independent of the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the built-in smollm2-135m, converted once into the user
    cache (about 20 s the first time) and reused by every test of the session."""
    from cospadi.models import load_model

    return load_model("smollm2-135m")


# ---------------------------------------------------------------------------- tiny models


def _token_ids(seed: int, rows: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def tiny_llama():
    """Factory: a fresh randomly initialised LlamaForCausalLM (eval mode) of TINY sizes
    with `layers` decoder blocks, weights drawn after torch.manual_seed(seed); `config`
    overrides LlamaConfig fields."""
    def make(layers: int = 2, seed: int = 0, **config) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": layers, **config})).eval()
    return make


@pytest.fixture(scope="session")
def tiny_ids() -> torch.Tensor:
    """Calibration windows of tiny_llama: (6, 20) token ids below TINY's vocabulary, seed 2.
    Shared by the session: do not modify."""
    return _token_ids(2, 6, 20, TINY["vocab_size"])


@pytest.fixture(scope="session")
def tiny_model():
    """Factory: a fresh randomly initialised model (eval mode) of `family` (llama, mistral,
    qwen2, qwen3, gemma3) at SMALL sizes with `layers` decoder blocks, weights drawn after
    torch.manual_seed(seed). Gemma3 alternates sliding (window GEMMA3_WINDOW) and full
    attention layers, starting with a sliding one. `config` overrides config fields."""
    def make(family: str, layers: int = 2, seed: int = 0, **config) -> torch.nn.Module:
        if family not in FAMILIES:
            raise ValueError(family)
        config_class, model_class = FAMILIES[family]
        settings = {**SMALL, "num_hidden_layers": layers}
        if family == "gemma3":
            settings.update(sliding_window=GEMMA3_WINDOW, query_pre_attn_scalar=16,
                            layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(layers)])
        settings.update(config)
        torch.manual_seed(seed)
        return model_class(config_class(**settings)).eval()
    return make


@pytest.fixture(scope="session")
def calibration_ids() -> torch.Tensor:
    """Calibration windows of tiny_model: (8, 24) token ids below SMALL's vocabulary, seed 1.
    Shared by the session: do not modify."""
    return _token_ids(1, 8, 24, SMALL["vocab_size"])


# ---------------------------------------------------------------------------- command line

SUBJECTS = ["The river", "A small village", "The old library", "Her grandfather", "The committee",
            "The northern railway", "A young engineer", "The city council", "The museum", "The orchestra"]
VERBS = ["was founded", "was rebuilt", "became famous", "was described", "was expanded", "was studied",
         "was restored", "was celebrated", "was mapped", "was photographed"]
TAILS = ["in the early nineteenth century by local merchants.",
         "after a long dispute over land and water rights.",
         "by travellers who crossed the valley on foot.",
         "during the years of rapid growth that followed the war.",
         "with funds raised by the families of the district.",
         "as part of a plan to improve trade along the coast.",
         "in a series of reports published by the university.",
         "because its harbour offered shelter from winter storms.",
         "when the new bridge opened to carts and carriages.",
         "under the direction of a well known architect."]
EXTRAS = ["Today it attracts visitors from across the region.",
          "Several of the original buildings still stand near the square.",
          "Historians disagree about the exact date of these events.",
          "The population grew steadily until the middle of the century.",
          "Records from that period are kept in the county archive.",
          "Its name comes from an old word for a meadow by the water.",
          "Farmers grew wheat, barley and apples on the surrounding hills.",
          "A small festival is held there every summer."]


def _corpus_text(paragraphs: int = 60, seed: int = 0) -> str:
    rng = random.Random(seed)
    docs = []
    for _ in range(paragraphs):
        sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(TAILS)}" for _ in range(rng.randint(2, 3))]
        sentences += rng.sample(EXTRAS, 2)
        docs.append(" ".join(sentences))
    return "\n\n".join(docs) + "\n"


@pytest.fixture(scope="session")
def cli_files(tmp_path_factory, smollm2, tiny_llama):
    """Read-only inputs of the command-line tests: "model" (a tiny Llama, 2 blocks of
    TINY sizes with tied embeddings and 128 positions over the SmolLM2 vocabulary, saved
    with the SmolLM2 tokenizer), "nan" (the same with a NaN weight in block 1), "gpt2"
    (an unsupported architecture), "no-tokenizer" (the tiny Llama saved alone), "empty"
    (an empty folder), "txt" and "csv" (one small English corpus), "vocab" (the
    tokenizer's size)."""
    _, tokenizer = smollm2
    root = tmp_path_factory.mktemp("cli-inputs")
    vocab = len(tokenizer)

    def cli_llama() -> LlamaForCausalLM:
        return tiny_llama(2, vocab_size=vocab, max_position_embeddings=128, tie_word_embeddings=True,
                          bos_token_id=1, eos_token_id=2)

    model_dir = root / "tiny-llama"
    cli_llama().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    nan_dir = root / "nan-llama"
    bad = cli_llama()
    with torch.no_grad():
        bad.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    bad.save_pretrained(nan_dir)
    tokenizer.save_pretrained(nan_dir)

    gpt2_dir = root / "tiny-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128)).save_pretrained(gpt2_dir)
    tokenizer.save_pretrained(gpt2_dir)

    text = root / "corpus.txt"
    text.write_text(_corpus_text())
    csv = root / "corpus.csv"
    csv.write_text(_corpus_text())
    empty_dir = root / "empty-folder"
    empty_dir.mkdir()
    no_tok = root / "no-tokenizer"
    cli_llama().save_pretrained(no_tok)
    return dict(model=model_dir, nan=nan_dir, gpt2=gpt2_dir, txt=text, csv=csv, empty=empty_dir,
                **{"no-tokenizer": no_tok}, vocab=vocab)


@pytest.fixture
def printed_rows(monkeypatch):
    """Every row list the CLI prints as a table, at full precision."""
    from cospadi import cli

    seen: list[list[dict]] = []
    real = cli.results_table

    def spy(rows):
        seen.append([dict(r) for r in rows])
        return real(rows)

    monkeypatch.setattr(cli, "results_table", spy)
    return seen


def _parse_table(text: str) -> list[dict[str, str]]:
    """Rows of the first Markdown table in `text` as header -> cell."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    assert len(lines) >= 3, f"no Markdown table in:\n{text}"
    heads = [h.strip() for h in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "").replace("-", "").strip()) <= {":", ""}, lines[1]
    return [dict(zip(heads, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.fixture(scope="session")
def parse_table():
    """The function: rows of the first Markdown table in a text as header -> cell."""
    return _parse_table
