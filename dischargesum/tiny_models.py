"""Tiny real-architecture models for tests and the offline demo.

``build_tiny_gemma3`` writes an ordinary Hugging Face model directory — ``config.json``, safetensors weights,
``tokenizer.json`` with a Gemma-style chat template, ``generation_config.json`` — that every stage loads by path
exactly as it loads ``google/medgemma-4b-it``. There is no test-only code path in the stages: the tiny model is
a ``Gemma3ForCausalLM`` (or, with ``kind="vlm"``, a ``Gemma3ForConditionalGeneration`` with a toy SigLIP vision
tower, the class MedGemma-4B-it really is) with toy sizes, one sliding-window and one full-attention layer.

The tokenizer is a byte-level BPE trained offline with ``tokenizers`` on synthetic clinical text, with Gemma's
special tokens (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, ``<start_of_turn>``, ``<end_of_turn>``, image
tokens) and Gemma's chat-template format plus ``{% generation %}`` markers, so assistant masks work.

``build_tiny_bert`` writes a tiny BERT encoder + WordPiece tokenizer for BERTScore tests and the offline demo.

Everything is deterministic in ``seed`` and takes about a second on a laptop CPU.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from dischargesum.logging_utils import get_logger

logger = get_logger(__name__)

SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)

# Gemma 3's template (system turn folded into the first user turn, "assistant" rendered as "model"), plus the
# {% generation %} markers that `return_assistant_tokens_mask` needs. The real MedGemma template has no markers:
# the training code must not rely on them (it uses prompt/completion masks) — the tiny template only adds them.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] | trim + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{%- if role == 'model' -%}"
    "{% generation %}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ (first_user_prefix if loop.first else '') + message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def default_corpus(seed: int, n_rows: int = 400) -> Iterator[str]:
    """Synthetic notes and summaries (tiny + kaggle profiles) as tokenizer training text."""
    from dischargesum.data.synthetic import generate_rows

    for profile, n in (("tiny", n_rows), ("kaggle", n_rows // 4)):
        for row in generate_rows(n, profile=profile, schema="kaggle", seed=seed, with_entities=False):
            yield str(row["input"])
            yield str(row["target"])


def train_tiny_tokenizer(corpus: Iterable[str], vocab_size: int = 1024):  # -> PreTrainedTokenizerFast
    """Train a byte-level BPE tokenizer with Gemma's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id("<bos>")
    # Gemma's tokenizer prepends <bos> to plain text; the chat template writes it itself (callers then pass
    # add_special_tokens=False, as TRL and our inference engine do).
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        padding_side="left",
        model_max_length=8192,
    )
    fast.chat_template = GEMMA_CHAT_TEMPLATE
    return fast


def build_tiny_gemma3(
    output_dir: str | Path,
    *,
    seed: int = 0,
    kind: Literal["causal_lm", "vlm"] = "causal_lm",
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    sliding_window: int = 64,
    vocab_size: int = 1024,
    corpus: Iterable[str] | None = None,
) -> Path:
    """Write a tiny Gemma-3 model directory (2 layers: sliding + full attention) and return its path.

    Raises:
        ValueError: ``kind`` is not ``causal_lm`` or ``vlm``.
    """
    import torch
    from transformers import GenerationConfig

    if kind not in ("causal_lm", "vlm"):
        raise ValueError(f"kind={kind!r}: use 'causal_lm' or 'vlm'.")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer = train_tiny_tokenizer(corpus if corpus is not None else default_corpus(seed), vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_kwargs: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=8192,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
        eos_token_id=ids["<eos>"],
        tie_word_embeddings=True,
    )
    if kind == "causal_lm":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        model: Any = Gemma3ForCausalLM(Gemma3TextConfig(**text_kwargs))
    else:
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

        vision = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            vision_use_head=False,
        )
        vlm_config = Gemma3Config(  # type: ignore[call-arg]  # token ids go through PretrainedConfig kwargs
            text_config=Gemma3TextConfig(**text_kwargs).to_dict(),
            vision_config=vision.to_dict(),
            mm_tokens_per_image=4,
            boi_token_index=ids["<start_of_image>"],
            eoi_token_index=ids["<end_of_image>"],
            image_token_index=ids["<image_soft_token>"],
            pad_token_id=ids["<pad>"],
            bos_token_id=ids["<bos>"],
            eos_token_id=ids["<eos>"],
        )
        model = Gemma3ForConditionalGeneration(vlm_config)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=ids["<bos>"],
        pad_token_id=ids["<pad>"],
        # Gemma stops at <eos> or at the end of the model's turn.
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        do_sample=False,
    ).save_pretrained(out)
    logger.info("wrote tiny Gemma-3 (%s, %d parameters) to %s", kind, model.num_parameters(), out)
    return out


def build_tiny_bert(output_dir: str | Path, *, seed: int = 0, corpus: Iterable[str] | None = None) -> Path:
    """Write a tiny BERT encoder (2 layers, hidden 32) with a WordPiece tokenizer; for BERTScore tests."""
    return build_random_bert(
        output_dir,
        seed=seed,
        corpus=corpus if corpus is not None else default_corpus(seed, n_rows=200),
        tokenizer_vocab_size=800,
        lowercase=True,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_length=128,
    )


def wordpiece_vocab(
    corpus: Iterable[str], size: int, specials: list[str], normalizer: Any, pre_tokenizer: Any
) -> list[str]:
    """A WordPiece vocabulary of ``size`` pieces, the same on every build: the special tokens, every character of
    the corpus (as a word start and as ``##`` continuation, so any word can be spelled), then the most frequent
    words (ties in alphabetical order).

    Not the ``tokenizers`` WordPieceTrainer: its merges break ties between equally frequent pairs in hash-map order,
    which changes from process to process (two builds from one corpus differed in one piece, ``##qu`` vs ``##uir``,
    about one build in four under pytest), and with it the random encoder's BERTScore. A test model needs only a
    valid, stable vocabulary; whole words plus characters is one.
    """
    counts: Counter[str] = Counter()
    for text in corpus:
        counts.update(word for word, _span in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    alphabet = sorted({char for word in counts for char in word})
    vocab = list(dict.fromkeys([*specials, *alphabet, *(f"##{char}" for char in alphabet)]))
    if len(vocab) > size:
        raise ValueError(f"tokenizer_vocab_size={size} is below the corpus alphabet's {len(vocab)} pieces")
    known = set(vocab)
    for word in sorted(counts, key=lambda w: (-counts[w], w)):
        if len(vocab) >= size:
            break
        if word not in known:
            vocab.append(word)
            known.add(word)
    return vocab


def build_random_bert(
    output_dir: str | Path,
    *,
    seed: int,
    corpus: Iterable[str],
    tokenizer_vocab_size: int,
    lowercase: bool,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    intermediate_size: int,
    max_length: int,
    model_vocab_size: int | None = None,
) -> Path:
    """Write a random-initialised BERT encoder with a WordPiece tokenizer whose vocabulary comes from ``corpus``.

    ``model_vocab_size`` sizes the embedding table (default: the tokenizer's size), so a benchmark can match a real
    model's shape (Bio_ClinicalBERT: 28,996) even when the corpus yields fewer pieces (see :func:`wordpiece_vocab`).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast  # type: ignore[attr-defined]

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    vocab = wordpiece_vocab(corpus, tokenizer_vocab_size, specials, tok.normalizer, tok.pre_tokenizer)
    tok.model = models.WordPiece(vocab={piece: i for i, piece in enumerate(vocab)}, unk_token="[UNK]")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )
    config = BertConfig(
        vocab_size=max(model_vocab_size or 0, len(tokenizer)),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_length,
    )
    model = BertModel(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    logger.info("wrote random BERT encoder (%d parameters) to %s", model.num_parameters(), out)
    return out
