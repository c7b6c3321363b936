#!/usr/bin/env bash
# System packages that pip cannot give: a C++ toolchain, cmake and Boost (to build KenLM's
# lmplz/build_binary from the kenlm sdist), Python headers (the kenlm module compiles), and
# libsndfile. As root they are installed with apt; otherwise we say exactly what is missing.
set -euo pipefail

missing=()
have_header() { [ -e "/usr/include/$1" ]; }
command -v g++ >/dev/null || missing+=(build-essential)
command -v cmake >/dev/null || missing+=(cmake)
have_header boost/program_options.hpp || missing+=(libboost-program-options-dev)
have_header boost/thread.hpp || missing+=(libboost-thread-dev)
have_header boost/test/unit_test.hpp || missing+=(libboost-test-dev)
ls /usr/lib/*/libboost_system.so >/dev/null 2>&1 || missing+=(libboost-system-dev)
have_header zlib.h || missing+=(zlib1g-dev)
have_header bzlib.h || missing+=(libbz2-dev)
have_header lzma.h || missing+=(liblzma-dev)
have_header eigen3/Eigen/Core || missing+=(libeigen3-dev)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing with apt: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  cat >&2 <<MSG
setup: these system packages are missing and this user cannot install them:
    ${missing[*]}
  Ask an administrator to run:  apt-get install ${missing[*]}
  Without them KenLM's lmplz/build_binary cannot be built: the synthetic corpus is written
  without its 4-gram model and the KenLM decoding tests fail. Everything else works.
MSG
  exit 3
fi
