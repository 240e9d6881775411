"""Evaluation: score predictions against references and sources, and write the report.

Modules, in the order data moves through them:

- ``inputs``: read predictions (our JSONL or any CSV / TSV / JSONL / Parquet) and references, join them on
  note_id, decide the mode, validate everything before any model loads.
- ``entities``: the one clinical entity extractor (compression uses it too) and the entity comparison.
- ``scores``: ROUGE (tokenizer and scorer), summary statistics, compression and numeric statistics, length
  buckets.
- ``text_scoring``: the per-sample CPU work (entities, numbers, ROUGE) in worker processes.
- ``bertscore``: the BERTScore encoder (loaded safely) and scorer with its long-text policy.
- ``evaluate``: one run: BERTScore here while the workers score text, then per-sample rows and aggregates.
- ``report``: metrics.json, per_sample.csv, report.md, plots and TensorBoard.

What is compared with what (``mode``):

- ``stage1``: the generated summary (*output*) against the reference BHC (*reference*) and the note it was
  generated from (*source*).
- ``stage2``: the compressed summary (*output*) against its stage-1 summary (*reference*) and the note (*source*).

Definitions (every number in ``metrics.json`` is one of these; per-sample values are in ``per_sample.csv``):

BERTScore (output vs reference)
    bert_score's greedy cosine matching (``bert_score.utils.greedy_cos_idf``, no idf weighting, no baseline
    rescaling) over the hidden states of layer ``bertscore_num_layers`` of ``bertscore_model`` (loaded as
    ``bert_score.utils.get_model`` loads it, dropping the layers above, but with ``trust_remote_code=False`` and
    safetensors weights: see ``bertscore.load_bertscore_encoder``). Encoders see at most a window of tokens (512
    for BERT, including [CLS]/[SEP]); bert_score itself truncates silently to the tokenizer's
    ``model_max_length`` — and Bio_ClinicalBERT's tokenizer declares none, so bert_score feeds it over-long inputs.
    Here the window is ``min(tokenizer.model_max_length, max_position_embeddings)`` and longer texts are handled by
    ``bertscore_long_text``:

    - ``chunk`` (default): the text's tokens are cut into windows of ``W`` content tokens overlapping by
      ``bertscore_chunk_overlap``; every token takes its embedding from the window where it sits farthest from an
      edge (the overlap is split in half), the first window's [CLS] and the last window's [SEP] frame the text,
      and greedy matching runs over *all* tokens of both texts — so precision and recall cover the whole text, and
      a text within one window scores exactly as bert_score scores it.
    - ``truncate``: only the first window is embedded; per sample, ``bertscore_truncated_tokens`` records how many
      tokens (output + reference) were dropped, and metrics.json counts the samples.

    An empty output scores 0 (bert_score's convention). Tokenisation uses the encoder's (fast) tokenizer.

ROUGE-1/2/L/Lsum (output vs reference)
    rouge_score's ``RougeScorer`` with a tokenizer chosen by ``rouge_tokenizer``: ``clinical`` (default) keeps case
    and keeps decimals, ratios, dates and times as single tokens (``1.4``, ``132/78``, ``3/14``, ``14:30``); a
    number glued to a unit is split from it (``40mg`` -> ``40``, ``mg``, so it equals ``40 mg``); words are
    letter-initial alphanumeric runs (``SpO2``, ``q6h``, ``T2DM`` stay whole); ``%`` is a token; other punctuation
    and MIMIC's ``___`` blanks are dropped; no stemming. ``default`` is rouge_score's own tokenizer (lowercase,
    every non-alphanumeric character becomes a space, so ``1.4`` -> ``1``, ``4``; optional Porter stemming), for
    comparison with published numbers. ROUGE-Lsum treats each line of a text as one summary unit (rouge_score's
    newline convention); no sentence splitter runs (NLTK's punkt data is not available offline).

Entities (``dischargesum.evaluation.entities``, the one extractor compression also uses)
    ``compare_entities(output, X)`` with set semantics on normalised keys, for X = reference (``vs_reference``) and
    X = source (``vs_source``); plus ``reference_vs_source`` — the reference compared with the source, a baseline
    for how many entities a *human* summary "adds" (extractor noise, or facts the shortened note no longer holds).
    Recall = retained / X's keys; precision = supported / output keys; F1 their harmonic mean; undefined values are
    None and are left out of means. *micro* sums the counts over samples then divides; *macro* averages the
    per-sample values.

Hallucinated entities
    Output entities not supported by the source (``vs_source`` extra). Rate = extra / output keys; micro and macro
    as above; ``samples_with_any`` counts outputs with at least one.

Numeric fidelity
    ``extract_numbers`` of output and source as sets; unsupported = output numbers absent from the source;
    fidelity = 1 - unsupported / output numbers (None for an output without numbers). Numeric recall vs the
    reference = reference numbers present in the output / reference numbers.

Compression
    Per sample, ratio = output length / reference length (and / source length), in characters and in tokens
    (``tokenizer_name_or_path``, else the BERTScore encoder's tokenizer, else whitespace words — metrics.json names
    the counter). Reported as mean / median / sample std (n - 1) of the per-sample ratios *and* the ratio of totals
    (sum of output lengths / sum of the other lengths): one short note with a long summary moves the mean of ratios
    a lot and the ratio of totals barely (the seed's mean of ratios was 1.71 while its ratio of totals was 0.62).

Length buckets
    Every aggregate is repeated per bucket of the source length in characters (of the reference when there is no
"""
