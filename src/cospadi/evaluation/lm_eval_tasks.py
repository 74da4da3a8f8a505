"""Local lm-evaluation-harness tasks built from held-out text, so accuracy and word
perplexity run offline, through lm-eval like any other task (OFFLINE.md):

* `cospadi_lastword` (LAMBADA-style): predict the last word of a passage from its
  context. One passage per held-out document, in order: the longest run of its first
  sentences with `min_words` .. `max_words` words whose final word (stripped of its full
  stop) is alphabetic, at least 3 letters long, and appears earlier in the passage, so
  the context is needed to predict it (a cheap stand-in for LAMBADA's human filtering).
  Scored as lambada_openai is: `acc` (the target is the model's greedy continuation)
  and `perplexity` of the target.
* `cospadi_wordppl`: lm-eval's rolling log-likelihood over whole held-out documents,
  reported as word perplexity (as lm-eval's wikitext task), byte perplexity, bits per byte.

`write_tasks(folder, texts)` writes the YAML configs and their JSONL data; point lm-eval
at the folder (`lm_eval --include_path FOLDER --tasks cospadi_lastword`, or
TaskManager(include_path=FOLDER))."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import CospadiError

LASTWORD = "cospadi_lastword"
WORDPPL = "cospadi_wordppl"
LOCAL_TASKS = (LASTWORD, WORDPPL)
DEFAULT_LASTWORD_EXAMPLES = 500
DEFAULT_WORDPPL_DOCS = 200

_LASTWORD_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_WORDPPL_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""

_SENTENCE_END = re.compile(r"^[A-Za-z]+\.$")
_STRIP = ".,;:!?\"'()[]"


def lastword_passage(text: str, min_words: int = 20, max_words: int = 120) -> str | None:
    """The passage `lastword_passages` takes from one document, words joined by single
    spaces and ending with the target word (no full stop); None if the document has none."""
    words = text.split()
    for end in range(min(len(words), max_words) - 1, min_words - 2, -1):
        word = words[end]
        if not _SENTENCE_END.match(word) or len(word) < 4:
            continue
        target = word[:-1]
        context = {w.strip(_STRIP).lower() for w in words[:end]}
        if target.lower() in context:
            return " ".join(words[:end] + [target])
    return None


def lastword_passages(texts: list[str], max_examples: int, min_words: int = 20, max_words: int = 120) -> list[str]:
    """At most `max_examples` passages, one per document of `texts` in order (see the
    module docstring); each passage's last word, after its last space, is the target."""
    passages = []
    for text in texts:
        if len(passages) >= max_examples:
            break
        passage = lastword_passage(text, min_words, max_words)
        if passage is not None:
            passages.append(passage)
    return passages


def write_tasks(folder: str | Path, texts: list[str], lastword_examples: int = DEFAULT_LASTWORD_EXAMPLES,
                wordppl_docs: int = DEFAULT_WORDPPL_DOCS) -> Path:
    """Write both local tasks (YAML + JSONL, absolute data paths) for the held-out
    documents `texts` into `folder`; returns it. CospadiError when the text yields no
    last-word passage or no document."""
    if lastword_examples < 1 or wordppl_docs < 1:
        raise CospadiError("the local lm-eval tasks need at least 1 example and 1 document")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    passages = lastword_passages(texts, lastword_examples)
    docs = [" ".join(t.split()) for t in texts if t.strip()][:wordppl_docs]
    if not passages or not docs:
        raise CospadiError(f"the held-out text yields {len(passages)} last-word passages and {len(docs)} documents; "
                           "give more text (documents of at least 20 words whose last word appears earlier)")
    for task, template, rows in ((LASTWORD, _LASTWORD_YAML, passages), (WORDPPL, _WORDPPL_YAML, docs)):
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
        (folder / f"{task}.yaml").write_text(template.format(task=task, data=json.dumps(str(data))))
    return folder
