"""The tiny Gemma-3 factory: a real-architecture model directory every stage loads like MedGemma."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from dischargesum.manifest import sha256_file

pytestmark = pytest.mark.unit


def test_tiny_gemma3_loads_by_path_and_has_both_attention_kinds(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "gemma3_text"
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    assert config.hidden_size <= 64
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.convert_tokens_to_ids("<pad>") == 0 and tok.convert_tokens_to_ids("<eos>") == 1
    assert tok.convert_tokens_to_ids("<bos>") == 2
    assert (tiny_model_dir / "model.safetensors").is_file()


def test_chat_template_is_gemma_format_with_assistant_mask(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    msgs = [
        {"role": "user", "content": "Summarize: AKI, Cr 1.4 mg/dL, denies chest pain."},
        {"role": "assistant", "content": "AKI resolved."},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<bos><start_of_turn>user\nSummarize: AKI, Cr 1.4 mg/dL, denies chest pain.<end_of_turn>\n"
        "<start_of_turn>model\nAKI resolved.<end_of_turn>\n"
    )
    gen = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("<end_of_turn>\n<start_of_turn>model\n")
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(trained) == "AKI resolved.<end_of_turn>\n"
    # byte-level BPE round-trips clinical text exactly (digits, units, blanks, case)
    sample = "Lasix 40mg IV BID on ___; K 3.2 mEq/L; SpO2 96% RA"
    assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample


def test_tiny_model_generates_and_stops(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "Summarize: pneumonia treated with ceftriaxone."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert model.generation_config.eos_token_id == [1, tok.convert_tokens_to_ids("<end_of_turn>")]


def test_factory_is_deterministic_and_fast(tmp_path: Path, tiny_model_dir: Path) -> None:
    from dischargesum.tiny_models import build_tiny_gemma3

    start = time.perf_counter()
    again = build_tiny_gemma3(tmp_path / "again", seed=0)
    elapsed = time.perf_counter() - start
    assert sha256_file(again / "model.safetensors") == sha256_file(tiny_model_dir / "model.safetensors")
    assert sha256_file(again / "tokenizer.json") == sha256_file(tiny_model_dir / "tokenizer.json")
    other = build_tiny_gemma3(tmp_path / "other", seed=1)
    assert sha256_file(other / "model.safetensors") != sha256_file(again / "model.safetensors")
    assert elapsed < 30, f"tiny model build took {elapsed:.1f}s"


def test_vlm_variant_is_medgemma_class(tiny_vlm_dir: Path) -> None:
    from transformers import AutoConfig, Gemma3ForConditionalGeneration

    config = AutoConfig.from_pretrained(tiny_vlm_dir)
    assert config.model_type == "gemma3"
    model = Gemma3ForConditionalGeneration.from_pretrained(tiny_vlm_dir)
    ids = torch.tensor([[2, 10, 11, 12]])
    logits = model(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits
    assert logits.shape[:2] == (1, 4)


def test_tiny_bert_encoder(tiny_bert_dir: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = AutoModel.from_pretrained(tiny_bert_dir)
    enc = tok(["metoprolol 25 mg PO BID"], return_tensors="pt")
    hidden = model(**enc, output_hidden_states=True).hidden_states
    assert len(hidden) == 3  # embeddings + 2 layers: bert_score needs num_layers <= 2


def test_tiny_bert_build_is_byte_identical(tmp_path: Path, tiny_bert_dir: Path) -> None:
    # The tokenizers WordPiece trainer numbered pieces and broke ties between equally frequent merges in hash-map
    # order, which changes from process to process; the demo's BERTScore then changed run to run with identical
    # texts. The vocabulary is now built without it (wordpiece_vocab).
    from dischargesum.tiny_models import build_tiny_bert

    builds = [build_tiny_bert(tmp_path / f"b{i}", seed=0) for i in range(3)]
    for build in builds:
        for name in ("tokenizer.json", "model.safetensors"):
            assert sha256_file(build / name) == sha256_file(tiny_bert_dir / name), name


def test_wordpiece_vocab_is_a_pure_function_of_the_corpus() -> None:
    from tokenizers import normalizers, pre_tokenizers

    from dischargesum.tiny_models import wordpiece_vocab

    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    corpus = ["Zosyn 4.5 g IV q8h", "zosyn and vanc", "Vanc trough 15", "BID"]
    vocab = wordpiece_vocab(corpus, 50, ["[PAD]", "[UNK]"], norm, pre)
    # specials, then each character as a word start and as a continuation, then words by count, ties alphabetical
    alphabet = sorted(set("zosyn4.5givq8handvanctrough15bid"))
    assert vocab[: 2 + 2 * len(alphabet)] == ["[PAD]", "[UNK]", *alphabet, *(f"##{c}" for c in alphabet)]
    assert vocab[2 + 2 * len(alphabet) :] == ["vanc", "zosyn", "15", "and"]
    assert len(vocab) == 50 and len(set(vocab)) == 50
    assert wordpiece_vocab(reversed(corpus), 50, ["[PAD]", "[UNK]"], norm, pre) == vocab  # order-free
    with pytest.raises(ValueError, match="tokenizer_vocab_size=10 is below"):
        wordpiece_vocab(corpus, 10, ["[PAD]", "[UNK]"], norm, pre)
