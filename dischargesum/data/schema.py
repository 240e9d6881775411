"""The contract between stages: file names and columns of prepare_data's output directory.

prepare_data writes ``train.parquet``, ``validation.parquet`` and ``test.parquet`` with :data:`PREPARED_COLUMNS`
(in that order), ``rejects.jsonl`` (one object per rejected input row: ``row``, ``note_id``, ``reason``,
``detail``), ``data_card.json`` and a completed ``manifest.json`` whose ``data_fingerprint`` is the sha256 over the
three split files. sft_qlora, generate and eval read these names from here and nowhere else.
"""

from __future__ import annotations

from dischargesum.artifacts import DATA_CARD_FILE, REJECTS_FILE, SPLIT_FILES, SPLITS  # noqa: F401 (re-exported)

# column -> meaning
PREPARED_COLUMNS: dict[str, str] = {
    "note_id": "unique note identifier (string), e.g. 10000032-DS-21",
    "subject_id": "patient identifier (string); the split key",
    "source_row": "0-based row number in the input file (int64)",
    "note": "normalised note text, shortened to the token budget when needed (the model's input)",
    "summary": "normalised reference brief hospital course, never shortened (the training target)",
    "note_chars_original": "characters of the normalised note before shortening (int64)",
    "note_shortened": "whether the note was shortened to fit max_seq_length (bool)",
    "prompt_tokens": "tokens of the rendered chat prompt incl. generation prompt (int64)",
    "completion_tokens": "tokens of the rendered summary turn (int64)",
    "gt_entities": "JSON list of ground-truth entities when the source has them (synthetic data), else null",
}
