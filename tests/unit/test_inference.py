"""The generation engine: batching, sharding, seeded sampling, stop handling, prompt removal by token count,
crash-safe part files, resumability guards, and user errors raised before any model is loaded."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dischargesum.artifacts import ArtifactError
from dischargesum.config import ConfigError, GenerateConfig
from dischargesum.inference.engine import (
    EngineSettings,
    GenerationRequest,
    InferenceEngine,
    batch_cost,
    encode_chats,
    plan_batches,
    plan_fixed_shape_batches,
    stop_token_ids,
)
from dischargesum.inference.loading import load_engine, resolve_model_source
from dischargesum.inference.sampling import gumbel_noise, hash32, note_seed, request_seeds
from dischargesum.inference.stage import Processes, ShardedJsonlOutput, repair_jsonl

pytestmark = pytest.mark.unit


def _requests(lengths: list[int], max_new: int = 10) -> list[GenerationRequest]:
    return [
        GenerationRequest(key=f"n{i}", prompt_ids=tuple(range(5, 5 + n)), max_new_tokens=max_new, seed=i, index=i)
        for i, n in enumerate(lengths)
    ]


# ---------------------------------------------------------------------------------------------------------------
# Batching and sharding
# ---------------------------------------------------------------------------------------------------------------


def test_plan_batches_sorts_longest_first_and_respects_budget_and_size() -> None:
    requests = _requests([5, 50, 20, 49, 3, 30, 31, 8])
    batches = plan_batches(requests, batch_token_budget=150, max_batch_size=3)
    flat = [r.key for b in batches for r in b]
    assert sorted(flat) == sorted(r.key for r in requests)  # every note exactly once
    lengths = [len(r.prompt_ids) for b in batches for r in b]
    assert lengths == sorted(lengths, reverse=True)
    for batch in batches:
        assert len(batch) <= 3
        assert batch_cost(batch) <= 150
    # greedy: [50, 49] (+31 would cost 3 x 60 > 150), [31, 30, 20] (size cap), [8, 5, 3]
    assert [len(b) for b in batches] == [2, 3, 3]


def test_plan_batches_gives_an_oversized_note_its_own_batch(caplog: pytest.LogCaptureFixture) -> None:
    batches = plan_batches(_requests([500, 10, 10]), batch_token_budget=100, max_batch_size=8)
    assert [len(b) for b in batches] == [1, 2]
    assert "alone needs" in caplog.text


def test_fixed_shape_plan_uses_one_batch_size() -> None:
    batches, size, cache_len = plan_fixed_shape_batches(
        _requests([40, 10, 30, 20, 5]), batch_token_budget=150, max_batch_size=8
    )
    assert cache_len == 50 and size == 3
    assert [len(b) for b in batches] == [3, 2]


def test_fixed_shape_plan_evens_out_the_batches() -> None:
    # The budget allows 81 rows of 2,401 tokens; 256 notes then run as 4 x 64 (no batch of 13 padded to 81).
    lengths = [1889] + [500] * 255
    reqs = [GenerationRequest(f"n{i}", (1,) * n, 512, seed=0, index=i) for i, n in enumerate(lengths)]
    batches, size, cache_len = plan_fixed_shape_batches(reqs, batch_token_budget=196608, max_batch_size=128)
    assert cache_len == 2401 and size == 64
    assert [len(b) for b in batches] == [64] * 4
    assert sorted(r.key for b in batches for r in b) == sorted(r.key for r in reqs)


def test_dealing_batches_to_ranks_keeps_every_batch_whole() -> None:
    batches = plan_batches(_requests(list(range(1, 40))), batch_token_budget=120, max_batch_size=4)
    for world in (1, 2, 3):
        shares = [Processes(rank, world, "cpu", lambda: None).share(batches) for rank in range(world)]
        dealt = [b for share in shares for b in share]
        assert sorted(map(tuple, ([r.key for r in b] for b in dealt))) == sorted(
            tuple(r.key for r in b) for b in batches
        )


def test_note_seeds_are_stable_and_policy_dependent() -> None:
    assert note_seed(42, "10000032-DS-21") == note_seed(42, "10000032-DS-21")
    assert note_seed(42, "10000032-DS-21") != note_seed(43, "10000032-DS-21")
    by_id = request_seeds(1, ["a", "b"], "note_id")
    assert by_id == [note_seed(1, "a"), note_seed(1, "b")]
    assert request_seeds(1, ["b", "a"], "note_id") == by_id[::-1]  # follows the note, not the position
    assert request_seeds(1, ["b", "a"], "input_order") == request_seeds(1, ["a", "b"], "input_order")


# ---------------------------------------------------------------------------------------------------------------
# Counter-based sampling noise
# ---------------------------------------------------------------------------------------------------------------


def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_hash32_matches_the_reference_without_overflow() -> None:
    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    got = hash32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_lowbias32(v) for v in values]
    many = hash32(torch.arange(200_000, dtype=torch.int64))
    assert many.unique().numel() == 200_000  # a bijection: no collisions


def test_gumbel_noise_depends_only_on_seed_step_and_token() -> None:
    seeds = torch.tensor([7, 99, 12345], dtype=torch.int64)
    noise = gumbel_noise(seeds, step=3, vocab_size=1000)
    swapped = gumbel_noise(seeds.flip(0), step=3, vocab_size=1000)
    alone = gumbel_noise(seeds[1:2], step=3, vocab_size=1000)
    assert torch.equal(noise, swapped.flip(0))
    assert torch.equal(noise[1:2], alone)
    assert not torch.equal(noise, gumbel_noise(seeds, step=4, vocab_size=1000))
    assert torch.isfinite(noise).all()


def test_gumbel_max_samples_follow_the_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    probs = logits.softmax(-1)
    seeds = torch.arange(20_000, dtype=torch.int64)
    draws = (logits[None, :] + gumbel_noise(seeds, step=0, vocab_size=4)).argmax(-1)
    freq = torch.bincount(draws, minlength=4).float() / len(seeds)
    assert torch.allclose(freq, probs, atol=0.015), (freq, probs)


# ---------------------------------------------------------------------------------------------------------------
# The engine on a scripted model: stop tokens, per-row limits, token-count prompt removal, static padding
# ---------------------------------------------------------------------------------------------------------------


class _ScriptedGenerateModel:
    """Returns ``input_ids`` followed by scripted tokens (per row, padded with 0) from ``generate``."""

    def __init__(self, continuations: list[list[int]]):
        self.continuations = continuations
        self.calls: list[dict] = []
        self.generation_config = SimpleNamespace(eos_token_id=[1])
        self.config = SimpleNamespace(get_text_config=lambda decoder=True: None)
        self.device = torch.device("cpu")

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None):  # pragma: no cover - signature only
        raise NotImplementedError

    def generate(self, input_ids, attention_mask, generation_config, logits_processor, stopping_criteria, **kwargs):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, "config": generation_config})
        width = max(len(c) for c in self.continuations[: input_ids.shape[0]])
        rows = [c + [0] * (width - len(c)) for c in self.continuations[: input_ids.shape[0]]]
        rows += [[0] * width] * (input_ids.shape[0] - len(rows))
        return torch.cat([input_ids, torch.tensor(rows, dtype=torch.long)], dim=1)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from dischargesum.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model_dir), padding_side="left")


def test_stop_tokens_include_eos_and_end_of_turn(tokenizer) -> None:
    ids = stop_token_ids(tokenizer)
    assert tokenizer.eos_token_id in ids
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in ids


def test_engine_cuts_prompts_by_token_count_and_stops_at_end_of_turn(tokenizer) -> None:
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    word = tokenizer("Lasix 40 mg", add_special_tokens=False)["input_ids"]
    # rows run longest prompt first: row 0 is note "b", row 1 note "a"
    model = _ScriptedGenerateModel([[*word, *word, *word], [*word, eot, *word]])
    engine = InferenceEngine(model, tokenizer, EngineSettings())
    prompts = encode_chats(
        tokenizer, [[{"role": "user", "content": "short"}], [{"role": "user", "content": "x " * 30}]]
    )
    requests = [
        GenerationRequest("a", tuple(prompts[0]), max_new_tokens=50),
        GenerationRequest("b", tuple(prompts[1]), max_new_tokens=2 * len(word)),
    ]
    results = {r.key: r for r in engine.generate_all(requests)}
    # longest prompt first; the shorter one is left-padded and its padding masked out
    call = model.calls[0]
    assert call["input_ids"][0].tolist() == prompts[1]
    assert call["input_ids"][1].tolist()[-len(prompts[0]) :] == prompts[0]
    assert call["attention_mask"][1].tolist() == [0] * (len(prompts[1]) - len(prompts[0])) + [1] * len(prompts[0])
    assert results["a"].text == "Lasix 40 mg"  # nothing of the prompt, nothing after <end_of_turn>
    assert results["a"].finish_reason == "eos" and results["a"].new_tokens == len(word) + 1
    assert results["b"].finish_reason == "length" and results["b"].new_tokens == 2 * len(word)
    assert results["b"].token_ids == tuple(word + word)
    assert results["a"].prompt_tokens == len(prompts[0])
    # the engine's own generation config: no defaults of the checkpoint leak in
    config = call["config"]
    assert config.do_sample is False and config.max_new_tokens == 50
    assert eot in config.eos_token_id


def test_static_cache_batches_are_padded_to_one_shape(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _ScriptedGenerateModel([[5, 1]] * 3)
    engine = InferenceEngine(model, tokenizer, EngineSettings(cache_implementation="static", batch_token_budget=60))
    monkeypatch.setattr(engine, "_reset_static_cache", lambda: "cache")
    requests = _requests([9, 8, 7], max_new=10)
    batches = engine.plan(requests)
    assert [len(b) for b in batches] == [3]
    engine2_requests = _requests([9], max_new=10)
    results = engine.generate_all(engine2_requests)
    assert len(results) == 1 and results[0].batch_size == 1
    assert model.calls[-1]["input_ids"].shape[0] == 3  # padded with copies to the planned batch size
    assert model.calls[-1]["config"].disable_compile is True


# ---------------------------------------------------------------------------------------------------------------
# The engine on the tiny model: batch invariance, seeded sampling, per-row limits
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir: Path):
    source = resolve_model_source(str(tiny_model_dir), None)
    engine = load_engine(
        source,
        EngineSettings(batch_token_budget=4096, max_batch_size=8),
        precision="fp32",
        load_in_4bit=False,
        merge_adapter=False,
        attn_implementation="auto",
        device="cpu",
    )
    yield engine
    engine.close()


def _tiny_requests(engine: InferenceEngine, n: int = 5, max_new: int = 12) -> list[GenerationRequest]:
    notes = [f"Patient {i} admitted with chest pain; aspirin {80 + i} mg daily. " * (1 + i % 3) for i in range(n)]
    prompts = engine.encode_chats([[{"role": "user", "content": note}] for note in notes])
    return [
        GenerationRequest(f"n{i}", tuple(p), max_new_tokens=max_new, seed=note_seed(0, f"n{i}"), index=i)
        for i, p in enumerate(prompts)
    ]


def test_greedy_outputs_do_not_depend_on_the_batch(tiny_engine: InferenceEngine) -> None:
    requests = _tiny_requests(tiny_engine)
    batched = tiny_engine.generate_all(requests)
    assert max(r.batch_size for r in batched) > 1
    alone = [tiny_engine.run_batch([r])[0] for r in requests]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]


def test_text_is_the_decoded_generated_tokens_only(tiny_engine: InferenceEngine) -> None:
    request = _tiny_requests(tiny_engine, n=1)[0]
    result = tiny_engine.run_batch([request])[0]
    with torch.inference_mode():
        out = tiny_engine.model.generate(
            input_ids=torch.tensor([request.prompt_ids]),
            attention_mask=torch.ones(1, len(request.prompt_ids), dtype=torch.long),
            max_new_tokens=request.max_new_tokens,
            do_sample=False,
        )
    reference = out[0, len(request.prompt_ids) :].tolist()
    assert list(result.token_ids) == reference[: len(result.token_ids)]
    assert (
        result.text
        == tiny_engine.tokenizer.decode(reference[: len(result.token_ids)], skip_special_tokens=True).strip()
    )


def test_seeded_sampling_is_batch_invariant_and_seed_dependent(tiny_engine: InferenceEngine) -> None:
    sampling = EngineSettings(batch_token_budget=4096, max_batch_size=8, do_sample=True, temperature=1.0, top_p=0.9)
    engine = InferenceEngine(tiny_engine.model, tiny_engine.tokenizer, sampling)
    requests = _tiny_requests(engine)
    batched = engine.generate_all(requests)
    alone = [engine.run_batch([r])[0] for r in requests]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    reseeded = [
        GenerationRequest(r.key, r.prompt_ids, r.max_new_tokens, seed=r.seed + 1, index=r.index) for r in requests
    ]
    assert [r.token_ids for r in engine.generate_all(reseeded)] != [r.token_ids for r in batched]
    greedy = tiny_engine.generate_all(requests)
    assert [r.token_ids for r in greedy] != [r.token_ids for r in batched]


def test_rows_stop_at_their_own_max_new_tokens(tiny_engine: InferenceEngine) -> None:
    requests = _tiny_requests(tiny_engine, n=3)
    limited = [
        GenerationRequest(r.key, r.prompt_ids, max_new_tokens=3 + 4 * i, index=i) for i, r in enumerate(requests)
    ]
    for request, result in zip(limited, tiny_engine.run_batch(limited)):
        assert result.new_tokens <= request.max_new_tokens
        if result.finish_reason == "length":
            assert result.new_tokens == request.max_new_tokens


def test_closing_the_engine_frees_the_model(tiny_model_dir: Path) -> None:
    import weakref

    from dischargesum.inference.loading import live_model_count

    source = resolve_model_source(str(tiny_model_dir), None)
    engine = load_engine(
        source, EngineSettings(), precision="fp32", load_in_4bit=False, merge_adapter=False,
        attn_implementation="auto", device="cpu",
    )  # fmt: skip
    ref = weakref.ref(engine.model)
    before = live_model_count()
    engine.close()
    assert ref() is None
    assert live_model_count() == before - 1


# ---------------------------------------------------------------------------------------------------------------
# Part files: torn lines, resumability guard, merge
# ---------------------------------------------------------------------------------------------------------------


def test_repair_drops_a_torn_tail_and_bad_lines(tmp_path: Path) -> None:
    part = tmp_path / "p.jsonl"
    good = [json.dumps({"note_id": f"n{i}", "summary": "x"}) for i in range(3)]
    part.write_text("\n".join(good) + "\n" + '{"note_id": "n3", "summ')
    assert repair_jsonl(part) == 1
    assert part.read_text() == "\n".join(good) + "\n"
    assert repair_jsonl(part) == 0  # idempotent, untouched when clean
    part.write_text(good[0] + "\nnot json\n" + '{"other": 1}\n' + good[1] + "\n")
    assert repair_jsonl(part) == 2
    assert [json.loads(line)["note_id"] for line in part.read_text().splitlines()] == ["n0", "n1"]


def _procs(rank: int = 0, world: int = 1) -> Processes:
    return Processes(rank=rank, world_size=world, device="cpu", barrier=lambda: None)


def test_sharded_output_resumes_merges_in_input_order_and_refuses_other_settings(tmp_path: Path) -> None:
    out0, out1 = (
        ShardedJsonlOutput(tmp_path, "stage1.jsonl", _procs(0, 2)),
        ShardedJsonlOutput(tmp_path, "stage1.jsonl", _procs(1, 2)),
    )
    out0.check_resumable("key-a", overwrite=False)
    out0.prepare("key-a", overwrite=False)
    with out1.writer() as append:
        append([{"note_id": "c", "v": 1}])
    with out0.writer() as append:
        append([{"note_id": "b", "v": 2}, {"note_id": "a", "v": 3}])
    with open(out1.part_path(1), "a") as fh:
        fh.write('{"note_id": "d", "v"')  # a torn write of rank 1
    out0.prepare("key-a", overwrite=False)  # a rerun repairs before reading
    assert set(out0.done_records()) == {"a", "b", "c"}
    out0.finish_rank(2)
    out1.finish_rank(1)
    out0.wait_for_ranks(poll_seconds=0.01)
    with pytest.raises(RuntimeError, match="no output"):
        out0.merge(["a", "b", "c", "d"])
    assert out0.merge(["c", "a", "b"]) == 3
    assert [json.loads(x)["note_id"] for x in (tmp_path / "stage1.jsonl").read_text().splitlines()] == ["c", "a", "b"]
    with pytest.raises(ConfigError, match="different settings"):
        out0.check_resumable("key-b", overwrite=False)
    out0.check_resumable("key-b", overwrite=True)
    out0.prepare("key-b", overwrite=True)
    assert out0.done_records() == {}


def test_output_dir_with_foreign_outputs_is_refused(tmp_path: Path) -> None:
    (tmp_path / "stage1.jsonl").write_text('{"note_id": "a"}\n')
    with pytest.raises(ConfigError, match="without a journal"):
        ShardedJsonlOutput(tmp_path, "stage1.jsonl", _procs()).check_resumable("k", overwrite=False)


# ---------------------------------------------------------------------------------------------------------------
# Configuration and user errors before any model is loaded
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"compile": True}, "cache_implementation: static"),
        ({"compile": True, "cache_implementation": "static", "load_in_4bit": True}, "4-bit"),
        ({"temperature": 0.7}, "do_sample"),
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
        ({"load_in_4bit": True, "merge_adapter": True}, "merge_adapter"),
        ({"batch_token_budget": 100, "max_new_tokens": 512}, "batch_token_budget"),
        ({"top_p": 0.0, "do_sample": True}, "top_p"),
        ({"limit": -1}, "limit"),
    ],
)
def test_generate_config_cross_field_checks(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GenerateConfig(output_dir="o", dataset_dir="d", model_name_or_path="m", **overrides)


def test_merge_adapter_default_follows_quantisation() -> None:
    assert GenerateConfig(output_dir="o", dataset_dir="d", model_name_or_path="m").merge_adapter_effective
    assert not GenerateConfig(
        output_dir="o", dataset_dir="d", model_name_or_path="m", load_in_4bit=True
    ).merge_adapter_effective


def test_adapter_problems_are_artifact_errors(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no such directory"):
        resolve_model_source(None, str(tmp_path / "missing"))
    half = tmp_path / "run" / "final"
    half.mkdir(parents=True)
    (half / "manifest.json").write_text(json.dumps({"stage": "sft_qlora", "status": "running"}))
    with pytest.raises(ArtifactError, match="running"):
        resolve_model_source(None, str(half))
    ckpt = tmp_path / "run" / "checkpoint-10"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="not a valid checkpoint"):
        resolve_model_source(None, str(ckpt))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x"}))
    (plain / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ArtifactError, match="safetensors"):
        resolve_model_source(None, str(plain))


@pytest.fixture()
def log_messages():
    """Messages logged under ``dischargesum`` (its logger does not propagate to pytest's caplog)."""
    import logging

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.DEBUG)
    logging.getLogger("dischargesum").addHandler(handler)
    yield messages
    logging.getLogger("dischargesum").removeHandler(handler)


@pytest.fixture()
def no_model_loading(monkeypatch: pytest.MonkeyPatch):
    """Fail the test if any stage reaches model loading."""
    import dischargesum.modeling

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the user error was reported")

    monkeypatch.setattr(dischargesum.modeling, "load_base_model", refuse)


def test_generate_with_a_missing_adapter_exits_2_before_loading(
    tmp_path: Path, no_model_loading, log_messages
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "generate_script", Path(__file__).parents[2] / "scripts" / "generate.py"
    )
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"stage": "prepare_data", "status": "complete", "outputs": {}}))
    for name in ("test.parquet", "data_card.json"):
        (data / name).write_text("")
    rc = script.main(
        ["--output_dir", str(tmp_path / "out"), "--dataset_dir", str(data), "--adapter", str(tmp_path / "nope")]
    )
    assert rc == 2
    assert any("`adapter`" in m and "no such directory" in m for m in log_messages)
    assert not (tmp_path / "out").exists()  # nothing started


def test_generate_with_a_half_written_dataset_exits_2(tmp_path: Path, no_model_loading, log_messages) -> None:
    from dischargesum.cli import run_stage
    from dischargesum.inference.generate import run_generate

    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"stage": "prepare_data", "status": "running"}))
    argv = ["--output_dir", str(tmp_path / "o"), "--dataset_dir", str(data), "--model_name_or_path", "m"]
    rc = run_stage(GenerateConfig, run_generate, argv, "generate.py")
    assert rc == 2 and any("status `running`" in m for m in log_messages)


def test_part_writer_fsyncs_each_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    out = ShardedJsonlOutput(tmp_path, "stage1.jsonl", _procs())
    with out.writer() as append:
        append([{"note_id": "a"}])
        append([{"note_id": "b"}, {"note_id": "c"}])
    assert len(synced) == 2


def test_torn_merged_output_is_rebuilt_from_parts_and_files_are_private(tmp_path: Path) -> None:
    out = ShardedJsonlOutput(tmp_path / "run", "stage1.jsonl", _procs())  # pytest's tmp_path is 0700 already
    out.prepare("key", overwrite=False)
    with out.writer() as append:
        append([{"note_id": k, "summary": f"s{k}"} for k in "abc"])
    out.merge(["a", "b", "c"])
    # a copy or sync cut the merged file mid-line; the parts still hold every note
    merged = out.path.read_bytes()
    out.path.write_bytes(merged[: merged.rindex(b"\n", 0, len(merged) - 1) + 12])
    out.check_resumable("key", overwrite=False)
    out.prepare("key", overwrite=False)
    assert sorted(out.done_records()) == ["a", "b", "c"]
    out.merge(["a", "b", "c"])
    assert [json.loads(line)["note_id"] for line in out.path.read_text().splitlines()] == ["a", "b", "c"]
    for path in (out.path, out.part_path(0)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for directory in (out.output_dir, out.parts_dir):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


def test_medgemma_class_generates_with_dynamic_and_static_cache(tiny_vlm_dir: Path) -> None:
    """Gemma3ForConditionalGeneration (MedGemma's class) through the same engine, text only."""
    source = resolve_model_source(str(tiny_vlm_dir), None)
    options = {"precision": "fp32", "load_in_4bit": False, "merge_adapter": False, "attn_implementation": "auto"}
    engine = load_engine(source, EngineSettings(max_batch_size=4), device="cpu", **options)
    assert type(engine.model).__name__ == "Gemma3ForConditionalGeneration"
    requests = _tiny_requests(engine, n=3, max_new=8)
    dynamic = [r.token_ids for r in engine.generate_all(requests)]
    static = InferenceEngine(
        engine.model, engine.tokenizer, EngineSettings(max_batch_size=4, cache_implementation="static")
    )
    assert [r.token_ids for r in static.generate_all(requests)] == dynamic
    assert all(len(t) > 0 for t in dynamic)
    engine.close()


def test_out_of_memory_batches_are_split_and_retried(tokenizer) -> None:
    from dischargesum.cli import UserError

    class OutOfMemoryAboveTwo(_ScriptedGenerateModel):
        def generate(self, input_ids, *args, **kwargs):
            if input_ids.shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return super().generate(input_ids, *args, **kwargs)

    model = OutOfMemoryAboveTwo([[7, 1]] * 8)
    engine = InferenceEngine(model, tokenizer, EngineSettings(max_batch_size=8))
    results = engine.generate_all(_requests([5, 6, 7, 8, 9], max_new=4))
    assert [r.key for r in results] == [f"n{i}" for i in range(5)]
    assert all(r.finish_reason == "eos" and r.new_tokens == 2 for r in results)
    assert max(call["input_ids"].shape[0] for call in model.calls) == 2
    # Static cache (the compiled path): the cache's batch size is halved (4 -> 2) and every later batch of the plan
    # runs in pieces of that size; each call has the (new) fixed shape.
    model.calls.clear()
    static = InferenceEngine(model, tokenizer, EngineSettings(max_batch_size=4, cache_implementation="static"))
    static._reset_static_cache = lambda: None  # type: ignore[method-assign]  # a scripted model needs no cache
    results = static.generate_all(_requests([5, 6, 7, 8, 9, 10, 11, 12], max_new=4))
    assert [r.key for r in results] == [f"n{i}" for i in range(8)]
    assert all(r.new_tokens == 2 for r in results)
    assert static._static_shape is not None and static._static_shape[0] == 2
    assert [call["input_ids"].shape[0] for call in model.calls] == [2, 2, 2, 2]  # after the OOM at 4: pieces of 2
    # A single note that does not fit is the user's to fix.
    alone = OutOfMemoryAboveTwo([[7, 1]])
    alone.generate = lambda *a, **k: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("simulated"))  # type: ignore
    with pytest.raises(UserError, match="batch_token_budget"):
        InferenceEngine(alone, tokenizer, EngineSettings()).generate_all(_requests([5], max_new=4))
