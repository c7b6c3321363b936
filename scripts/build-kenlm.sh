#!/usr/bin/env bash
# Build KenLM's lmplz and build_binary from the kenlm sdist pinned (with hashes) in requirements.lock
# and install them into $VENV/bin. The compiler's pages of warnings go to $VENV/kenlm-build.log: the
# terminal gets one line, or on failure the step that failed, the log's path and the log's last lines.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
log="$VENV/kenlm-build.log"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

failed() {  # called as `step || failed "what"`: $? is still the step's exit status
  local code=$?
  echo "setup: building KenLM failed while $1 (exit $code); the full output is in $log, it ends with:" >&2
  tail -n 15 "$log" | sed 's/^/  | /' >&2
  exit 1
}

echo "setup: building KenLM lmplz/build_binary from the kenlm 0.3.0 sdist (~40 s; compiler output in $log)"
: > "$log"
# the kenlm block of the lock: its pin line and its hash lines
awk '/^kenlm==/{on=1; print; next} on && /^ +--hash/{print; next} {on=0}' requirements.lock > "$work/kenlm.req"
"$VENV/bin/pip" download -q --no-deps --no-binary kenlm --require-hashes -r "$work/kenlm.req" -d "$work" \
  >>"$log" 2>&1 || failed "downloading the sdist"
tar xzf "$work"/kenlm-0.3.0.tar.gz -C "$work" >>"$log" 2>&1 || failed "unpacking the sdist"
cmake -S "$work/kenlm-0.3.0" -B "$work/build" -DCMAKE_BUILD_TYPE=Release >>"$log" 2>&1 || failed "configuring (cmake)"
cmake --build "$work/build" -j"$(nproc)" --target lmplz build_binary >>"$log" 2>&1 || failed "compiling"
install -m755 "$work/build/bin/lmplz" "$work/build/bin/build_binary" "$VENV/bin/" >>"$log" 2>&1 \
  || failed "installing into $VENV/bin"
