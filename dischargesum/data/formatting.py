"""How a note becomes a chat prompt — the one definition used by prepare_data (length budget), sft_qlora
(training examples) and generate (inference), so training and inference prompts can never drift apart.
"""

from __future__ import annotations

from dischargesum.config import DEFAULT_INSTRUCTION

__all__ = ["DEFAULT_INSTRUCTION", "completion_messages", "prompt_messages"]


def prompt_messages(note: str, instruction: str = DEFAULT_INSTRUCTION) -> list[dict[str, str]]:
    """The user turn for one note (Gemma has no system role: the instruction leads the user turn)."""
    return [{"role": "user", "content": f"{instruction}\n\n{note}"}]


def completion_messages(summary: str) -> list[dict[str, str]]:
    """The assistant turn the model is trained to produce."""
    return [{"role": "assistant", "content": summary}]
