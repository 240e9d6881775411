"""BERTScore: the encoder, loaded without remote code and from safetensors, and a scorer whose long-text policy
(chunk or truncate) is deliberate (definitions: the docstring of :mod:`dischargesum.evaluation`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dischargesum.config import ConfigError
from dischargesum.logging_utils import get_logger

logger = get_logger(__name__)

_ROBERTA_LIKE = {"roberta", "xlm-roberta", "camembert", "longformer", "bertweet"}


@dataclass
class BertScoreOutput:
    precision: list[float]
    recall: list[float]
    f1: list[float]
    prediction_windows: list[int]
    reference_windows: list[int]
    truncated_tokens: list[int]  # tokens dropped (prediction + reference); always 0 with the chunk policy
    prediction_tokens: list[int]  # content tokens (no special tokens)
    reference_tokens: list[int]


def resolve_device(device: str) -> str:
    """``auto`` -> the device accelerate assigns this process (cpu under accelerate_configs/cpu.yaml)."""
    if device != "auto":
        return device
    from accelerate import PartialState

    return str(PartialState().device)


def load_bertscore_encoder(model_name_or_path: str, num_layers: int, *, allow_bin_weights: bool = False) -> Any:
    """The encoder bert_score's ``get_model`` builds (the encoder of an encoder-decoder, cut to ``num_layers``
    layers), loaded with ``trust_remote_code=False`` and from safetensors.

    Why not ``bert_score.utils.get_model``: it calls ``AutoModel.from_pretrained(name)`` with neither flag, so an
    encoder directory with ``auto_map`` prompts to run its code, and pickled ``pytorch_model.bin`` weights load
    silently. A ``.bin``-only encoder is refused unless ``allow_bin_weights`` (transformers then unpickles with
    ``weights_only=True``).

    Raises:
        ConfigError: no safetensors weights (and ``allow_bin_weights`` is off), the model cannot be loaded, or its
            layer list is not one bert_score cuts the same way (BERT/RoBERTa ``encoder.layer``, DistilBERT
            ``transformer.layer``, ``layers``, ``layer``).
    """
    import torch
    from transformers import AutoModel

    unloadable = f"eval: `bertscore_model` = {model_name_or_path!r} could not be loaded"
    try:
        model = AutoModel.from_pretrained(model_name_or_path, trust_remote_code=False, use_safetensors=True)
    except OSError as exc:
        if "safetensors" not in str(exc):
            raise ConfigError(f"{unloadable} ({exc})") from None
        if not allow_bin_weights:
            raise ConfigError(
                f"eval: `bertscore_model` = {model_name_or_path!r} has no safetensors weights, only pickled ones "
                "(pytorch_model.bin), which can run code when loaded. Convert it to safetensors (load it once in a "
                "trusted environment and `save_pretrained(dir, safe_serialization=True)`), or, if you trust its "
                "source, set `bertscore_allow_bin_weights: true`."
            ) from None
        logger.warning("loading pickled weights of %s (bertscore_allow_bin_weights is set)", model_name_or_path)
        model = AutoModel.from_pretrained(model_name_or_path, trust_remote_code=False, use_safetensors=False)
    except ValueError as exc:
        raise ConfigError(f"{unloadable} ({exc})") from None
    model.eval()
    if hasattr(model, "decoder") and hasattr(model, "encoder"):
        model = model.encoder
    for owner, name in (
        (getattr(model, "encoder", None), "layer"),
        (getattr(model, "transformer", None), "layer"),
        (model, "layers"),
        (model, "layer"),
    ):
        layers = getattr(owner, name, None) if owner is not None else None
        if isinstance(layers, torch.nn.ModuleList):
            setattr(owner, name, torch.nn.ModuleList(list(layers)[:num_layers]))
            return model
    raise ConfigError(
        f"eval: `bertscore_model` = {model_name_or_path!r} ({type(model).__name__}) has no layer list BERTScore "
        "knows how to cut at `bertscore_num_layers`; use a BERT-family encoder."
    )


class BertScorer:
    """BERTScore with a deliberate long-text policy (see :mod:`dischargesum.evaluation`).

    Raises (constructor):
        ConfigError: the model or its tokenizer cannot be loaded, ``num_layers`` exceeds the model's layers, the
            tokenizer has no pad token, or the window is too small for ``chunk_overlap``.
    """

    def __init__(
        self,
        model_name_or_path: str,
        num_layers: int,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 64,
        long_text: str = "chunk",
        chunk_overlap: int = 128,
        allow_bin_weights: bool = False,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoTokenizer

        if long_text not in ("chunk", "truncate"):
            raise ConfigError(f"eval: `bertscore_long_text` = {long_text!r}; use chunk or truncate.")
        self.model_name_or_path = model_name_or_path
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.long_text = long_text
        self.device = torch.device(device)
        try:
            # trust_remote_code=False: an encoder directory with `auto_map` must never run its code (left unset,
            # transformers asks "run the custom code? [y/N]" and runs it on yes).
            config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=False)
            self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"eval: `bertscore_model` = {model_name_or_path!r} could not be loaded ({exc}). Use a local "
                "directory, or download the model into the Hugging Face cache first (this machine may be offline)."
            ) from None
        total_layers = getattr(config, "num_hidden_layers", None)
        if total_layers is not None and not 1 <= num_layers <= total_layers:
            raise ConfigError(
                f"eval: `bertscore_num_layers` = {num_layers} but {model_name_or_path} has {total_layers} layers; "
                f"use 1..{total_layers}."
            )
        if self.tokenizer.pad_token_id is None:
            raise ConfigError(f"eval: the tokenizer of `bertscore_model` = {model_name_or_path!r} has no pad token.")
        with_special = self.tokenizer("a", verbose=False)["input_ids"]
        content = self.tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
        at = next(i for i in range(len(with_special)) if with_special[i : i + len(content)] == content)
        self.prefix = list(with_special[:at])
        self.suffix = list(with_special[at + len(content) :])
        max_positions = getattr(config, "max_position_embeddings", None) or 512
        if getattr(config, "model_type", "") in _ROBERTA_LIKE:
            max_positions -= (config.pad_token_id or 0) + 1  # positions start after the padding index
        model_max = self.tokenizer.model_max_length
        max_length = min(max_positions, model_max) if model_max and model_max < 1_000_000 else max_positions
        self.max_length = max_length
        self.window = max_length - len(self.prefix) - len(self.suffix)
        if self.window < 8:
            raise ConfigError(f"eval: `bertscore_model` window is {self.window} tokens; too small for BERTScore.")
        self.overlap = min(chunk_overlap, self.window // 2)
        if self.overlap != chunk_overlap and long_text == "chunk":
            logger.warning(
                "bertscore_chunk_overlap %d is more than half the %d-token window; using %d",
                chunk_overlap,
                self.window,
                self.overlap,
            )
        self.model = load_bertscore_encoder(model_name_or_path, num_layers, allow_bin_weights=allow_bin_weights)
        self.model.to(self.device, dtype=getattr(torch, dtype)).eval()

    # ---- tokens -----------------------------------------------------------------------------------------------

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Content token ids (no special tokens) of each stripped text."""
        if not texts:
            return []
        return list(self.tokenizer([t.strip() for t in texts], add_special_tokens=False, verbose=False)["input_ids"])

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.token_ids(texts)]

    def windows(self, n_tokens: int) -> list[tuple[int, int, int, int]]:
        """(start, end, keep_from, keep_to) token ranges covering ``n_tokens`` under the long-text policy."""
        if n_tokens <= self.window or self.long_text == "truncate":
            end = min(n_tokens, self.window)
            return [(0, end, 0, end)]
        stride = self.window - self.overlap
        spans = []
        start = 0
        while True:
            end = min(start + self.window, n_tokens)
            spans.append((start, end))
            if end == n_tokens:
                break
            start += stride
        out = []
        for index, (start, end) in enumerate(spans):
            keep_from = start + (self.overlap // 2 if index > 0 else 0)
            keep_to = end - (self.overlap - self.overlap // 2) if index < len(spans) - 1 else end
            out.append((start, end, keep_from, keep_to))
        return out

    # ---- embeddings -------------------------------------------------------------------------------------------

    def _embed(self, id_lists: list[list[int]], progress: Callable[[int], Any] | None = None) -> list[tuple[Any, Any]]:
        """Per text: (embeddings [L, d] float32, weights [L]) with specials framing the kept content tokens."""
        import torch

        jobs = []  # (text index, window index, ids, keep_from, keep_to relative to the window)
        plans = []
        for text_index, ids in enumerate(id_lists):
            spans = self.windows(len(ids))
            plans.append(spans)
            for window_index, (start, end, keep_from, keep_to) in enumerate(spans):
                jobs.append((text_index, window_index, ids[start:end], keep_from - start, keep_to - start))
        jobs.sort(key=lambda job: len(job[2]), reverse=True)
        pieces: dict[tuple[int, int], tuple[Any, Any, Any]] = {}
        pad = self.tokenizer.pad_token_id
        n_prefix = len(self.prefix)
        with torch.inference_mode():
            for batch_start in range(0, len(jobs), self.batch_size):
                batch = jobs[batch_start : batch_start + self.batch_size]
                sequences = [self.prefix + job[2] + self.suffix for job in batch]
                width = max(len(s) for s in sequences)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, sequence in enumerate(sequences):
                    input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
                    mask[row, : len(sequence)] = 1
                hidden = self.model(input_ids.to(self.device), attention_mask=mask.to(self.device))[0].float()
                if progress is not None:
                    progress(len(batch))
                for row, (text_index, window_index, ids, keep_from, keep_to) in enumerate(batch):
                    h = hidden[row]
                    pieces[(text_index, window_index)] = (
                        h[:n_prefix],
                        h[n_prefix + keep_from : n_prefix + keep_to],
                        h[n_prefix + len(ids) : n_prefix + len(ids) + len(self.suffix)],
                    )
        out = []
        for text_index, spans in enumerate(plans):
            last = len(spans) - 1
            parts = [pieces[(text_index, 0)][0]]
            parts += [pieces[(text_index, w)][1] for w in range(len(spans))]
            parts.append(pieces[(text_index, last)][2])
            embedding = torch.cat(parts, dim=0)
            weights = torch.zeros(embedding.shape[0], device=embedding.device)
            weights[len(self.prefix) : embedding.shape[0] - len(self.suffix)] = 1.0
            out.append((embedding, weights))
        return out

    # ---- scoring ----------------------------------------------------------------------------------------------

    def score(
        self,
        predictions: Sequence[str],
        references: Sequence[str],
        *,
        progress: bool = True,
        block_pairs: int = 256,
        max_matrix_elements: int = 1 << 27,
        after_batch: Callable[[], Any] | None = None,
    ) -> BertScoreOutput:
        """BERTScore P/R/F1 of each prediction against its reference, with windows and truncation per sample.

        Raises:
            ValueError: the two sequences differ in length.
        """
        from bert_score.utils import greedy_cos_idf
        from torch.nn.utils.rnn import pad_sequence
        from tqdm.auto import tqdm

        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        n = len(predictions)
        pred_ids = self.token_ids(predictions)
        ref_ids = self.token_ids(references)
        precision = [0.0] * n
        recall = [0.0] * n
        f1 = [0.0] * n
        pred_windows = [len(self.windows(len(ids))) if ids else 0 for ids in pred_ids]
        ref_windows = [len(self.windows(len(ids))) if ids else 0 for ids in ref_ids]
        truncated = [
            (max(0, len(p) - self.window) + max(0, len(r) - self.window)) if self.long_text == "truncate" else 0
            for p, r in zip(pred_ids, ref_ids)
        ]
        # Empty texts score 0 (bert_score's convention) and are not embedded.
        order = [i for i in range(n) if pred_ids[i] and ref_ids[i]]
        order.sort(key=lambda i: max(len(pred_ids[i]), len(ref_ids[i])))
        # Unique texts per block of pairs (a text embedded once per block); the bar counts encoder windows.
        blocks = []
        for block_start in range(0, len(order), block_pairs):
            block = order[block_start : block_start + block_pairs]
            texts: dict[tuple[int, ...], int] = {}
            id_lists: list[list[int]] = []
            for i in block:
                for ids in (pred_ids[i], ref_ids[i]):
                    key = tuple(ids)
                    if key not in texts:
                        texts[key] = len(id_lists)
                        id_lists.append(ids)
            blocks.append((block, texts, id_lists))
        total_windows = sum(len(self.windows(len(ids))) for _b, _t, id_lists in blocks for ids in id_lists)
        with tqdm(total=total_windows, desc="BERTScore", unit="window", disable=not progress) as bar:
            for block, texts, id_lists in blocks:

                def advance(windows: int) -> None:
                    bar.update(windows)
                    if after_batch is not None:
                        after_batch()

                embedded = self._embed(id_lists, advance)
                position = 0
                while position < len(block):
                    # As many pairs as fit the similarity-matrix budget (B x longest prediction x longest reference).
                    end = position
                    longest_hyp = longest_ref = 0
                    while end < len(block):
                        i = block[end]
                        hyp_len = max(longest_hyp, embedded[texts[tuple(pred_ids[i])]][0].shape[0])
                        ref_len = max(longest_ref, embedded[texts[tuple(ref_ids[i])]][0].shape[0])
                        if end > position and (end + 1 - position) * hyp_len * ref_len > max_matrix_elements:
                            break
                        longest_hyp, longest_ref = hyp_len, ref_len
                        end += 1
                    pairs = block[position:end]
                    hyp = [embedded[texts[tuple(pred_ids[i])]] for i in pairs]
                    ref = [embedded[texts[tuple(ref_ids[i])]] for i in pairs]
                    hyp_emb = pad_sequence([e for e, _ in hyp], batch_first=True, padding_value=2.0)
                    ref_emb = pad_sequence([e for e, _ in ref], batch_first=True, padding_value=2.0)
                    hyp_idf = pad_sequence([w for _, w in hyp], batch_first=True)
                    ref_idf = pad_sequence([w for _, w in ref], batch_first=True)
                    hyp_mask = _length_mask([e.shape[0] for e, _ in hyp], hyp_emb.device)
                    ref_mask = _length_mask([e.shape[0] for e, _ in ref], ref_emb.device)
                    p, r, f = greedy_cos_idf(ref_emb, ref_mask, ref_idf, hyp_emb, hyp_mask, hyp_idf)
                    for i, p_i, r_i, f_i in zip(pairs, p.tolist(), r.tolist(), f.tolist()):
                        precision[i], recall[i], f1[i] = p_i, r_i, f_i
                    position = end
        return BertScoreOutput(
            precision,
            recall,
            f1,
            pred_windows,
            ref_windows,
            truncated,
            [len(i) for i in pred_ids],
            [len(i) for i in ref_ids],
        )


def _length_mask(lengths: list[int], device: Any) -> Any:
    import torch

    lens = torch.tensor(lengths, device=device)
    return torch.arange(int(lens.max()), device=device)[None, :] < lens[:, None]
