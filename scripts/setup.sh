#!/usr/bin/env bash
# Set up a fresh machine for selfflow: system packages, a virtual environment, every distribution
# of this repository (editable) and the test tools. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: espeak-ng and sox for the audio modality, DejaVu fonts for the t2i_words
# renders (fonts-dejavu-core); installed only when missing.
font=/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf
if ! command -v espeak-ng >/dev/null 2>&1 || ! command -v sox >/dev/null 2>&1 || [ ! -f "$font" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox \
      fonts-dejavu-core >/dev/null
  else
    echo "note: espeak-ng/sox/fonts-dejavu-core missing and cannot be installed here (audio data" \
      "and the t2i_words renders will be unavailable)" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_install() {  # quiet pip; on failure show its output without the mirror's noise
  local log; log=$(mktemp)
  if ! .venv/bin/python -m pip install -q -c constraints.txt "$@" >"$log" 2>&1; then
    grep -v "is ignored" "$log" >&2; rm -f "$log"; return 1
  fi
  rm -f "$log"
}
DISTS=(-e modalities/image -e plugins/aim)
for d in modalities/video modalities/audio modalities/audio_video modalities/robotics plugins/repa plugins/multimodal plugins/transformers; do
  if [ -f "$d/pyproject.toml" ]; then DISTS+=(-e "$d"); fi
done
stamp=.venv/.selfflow-installed
want=$(cat constraints.txt pyproject.toml */*/pyproject.toml 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch first, from the pin (on a CPU machine: the local 2.13.0+cpu wheel, no CUDA packages)
  pip_install torch==2.13.0
  pip_install -e ".[test,docs,bench,s3]"  # the core first: the plugins below depend on it
  pip_install "${DISTS[@]}"
  .venv/bin/python -c "import selfflow_core, torch; print('selfflow ready; torch', torch.__version__)"
  echo "$want" > "$stamp"
fi
