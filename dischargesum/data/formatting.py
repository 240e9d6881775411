"""How a note becomes a chat prompt — the one definition used by prepare_data (length budget), sft_qlora
(training examples) and generate (inference), so training and inference prompts can never drift apart.
"""

from __future__ import annotations

DEFAULT_INSTRUCTION = (
    "Write the brief hospital course for this discharge note. Keep every medication with its dose, route and "
    "frequency, every vital sign and lab value, every date, diagnosis and procedure, and every negation."
)


def prompt_messages(note: str, instruction: str = DEFAULT_INSTRUCTION) -> list[dict[str, str]]:
    """The user turn for one note (Gemma has no system role: the instruction leads the user turn)."""
    return [{"role": "user", "content": f"{instruction}\n\n{note}"}]


def completion_messages(summary: str) -> list[dict[str, str]]:
    """The assistant turn the model is trained to produce."""
    return [{"role": "assistant", "content": summary}]
