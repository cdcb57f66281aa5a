"""The shipped benchmark inputs, turned into prompts.

    code       continue a real Python source file (standard-library files), cut right after a `def` line
    summarise  summarise a passage of public-domain prose (Jane Austen, chapter openings)
    chat       answer an open question

Every method in a benchmark run gets exactly the same prompt text, so they all see the same token ids.
A model with a chat template gets summarise/chat prompts rendered through it (as a chat client would send them);
a base model gets a plain-text framing that it can continue.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WORKLOAD_NAMES = ("code", "summarise", "chat")
# Code prompts end at the last `def` line that starts before this many characters (~800 tokens of Python):
# long enough to hold patterns worth copying, short enough that the prefill does not dominate the run.
CODE_PROMPT_CHARS = 3000

# --verify-cost: steps over these numbers of positions, appended to a cache of real tokens this long.
VERIFY_COST_POSITIONS = (1, 2, 3, 4, 5, 8, 16)
VERIFY_COST_CACHE_TOKENS = 200

_SUMMARISE_INSTRUCTION = "Summarise the following passage in a few sentences."


@dataclass(frozen=True, slots=True)
class Prompt:
    workload: str
    name: str  # the shipped file (or question number) it came from
    text: str
    add_special_tokens: bool  # False when a chat template already put the special tokens in `text`


def workloads_dir() -> Path:
    return Path(str(files("mtp_mcp.benchmarks").joinpath("workloads")))


def load_prompts(workloads: list[str], tokenizer: PreTrainedTokenizerBase, per_workload: int) -> list[Prompt]:
    """The first `per_workload` prompts of each named workload, in the order given."""
    prompts: list[Prompt] = []
    for workload in workloads:
        builder = {"code": _code_prompts, "summarise": _summarise_prompts, "chat": _chat_prompts}[workload]
        prompts.extend(builder(tokenizer)[:per_workload])
    return prompts


def _code_prompts(tokenizer: PreTrainedTokenizerBase) -> list[Prompt]:
    return [
        Prompt("code", path.name, cut_after_def(path.read_text(encoding="utf-8"), CODE_PROMPT_CHARS), True)
        for path in sorted((workloads_dir() / "code").glob("*.py"))
    ]


def cut_after_def(source: str, max_chars: int) -> str:
    """The source up to and including the last `def` line that starts before max_chars (the model writes the body).
    Without such a line, the source up to the last line break before max_chars."""
    lines = source.splitlines(keepends=True)
    offset, cut = 0, 0
    for line in lines:
        if offset >= max_chars:
            break
        offset += len(line)
        if line.lstrip().startswith("def "):
            cut = offset
    if cut == 0:
        cut = source.rfind("\n", 0, max_chars) + 1 or len(source)
    return source[:cut]


def _summarise_prompts(tokenizer: PreTrainedTokenizerBase) -> list[Prompt]:
    prompts = []
    for path in sorted((workloads_dir() / "summarise").glob("*.txt")):
        passage = path.read_text(encoding="utf-8").strip()
        prompts.append(_framed("summarise", path.name, f"{_SUMMARISE_INSTRUCTION}\n\n{passage}",
                               f"{passage}\n\nSummary of the passage above:\n", tokenizer))
    return prompts


def _chat_prompts(tokenizer: PreTrainedTokenizerBase) -> list[Prompt]:
    questions = (workloads_dir() / "chat" / "questions.txt").read_text(encoding="utf-8").splitlines()
    return [
        _framed("chat", f"question {number}", question, f"Question: {question}\nAnswer:", tokenizer)
        for number, question in enumerate((q for q in questions if q.strip()), start=1)
    ]


def _framed(workload: str, name: str, user_message: str, plain_text: str, tokenizer: PreTrainedTokenizerBase) -> Prompt:
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
        )
        return Prompt(workload, name, rendered, add_special_tokens=False)
    return Prompt(workload, name, plain_text, add_special_tokens=True)
