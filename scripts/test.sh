#!/usr/bin/env bash
# The test command: installs what the tests need (once), then runs the default suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the slow parity tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
. .venv/bin/activate
# Debian's Chromium drives the chat page's browser tests (no browser download at test time).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser tests will be skipped"
fi
# Speech tests make their audio at test time: espeak-ng (speech), sox (tones, files), ffmpeg, libsndfile.
if ! command -v espeak-ng >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox libsndfile1 ffmpeg \
    >/dev/null) || echo "warning: could not install espeak-ng/sox; the tests that need them will be skipped"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One pytest-xdist worker more than the cores (at most 8; QWENSTACK_TEST_WORKERS to change, 0 runs in this
# process), each taking whole files, so a file's module fixtures (servers, checkpoints, a browser) are built
# once. Files go out in the order tests/conftest.py gives, longest first (xdist would otherwise reorder them
# by test count and leave a long file for the end). Much of the suite waits on servers, browsers,
# subprocesses and real-time audio; the extra worker uses the cores meanwhile (the measured run times:
# benchmarks/RESULTS.md, "The test suite's time").
# Each worker's torch runs one thread (tests/conftest.py), and so do the servers the tests start. The cores
# are counted first: nproc answers with OMP_NUM_THREADS when that is set.
cores="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
workers="${QWENSTACK_TEST_WORKERS:-$(( cores < 8 ? cores + 1 : 8 ))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
