#!/usr/bin/env bash
# Installs what evmesh needs to build and test on Debian 12 (bookworm).
#
#   scripts/install-deps.sh                 # compiler, CMake, libraries, test tools
#   scripts/install-deps.sh --with-servers  # + Redis, NATS and RabbitMQ servers, their
#                                           #   client libraries, librdkafka, and
#                                           #   node + npm (NestJS interop test)
#
# Idempotent: when every package is already installed it does nothing (and
# needs no root). Otherwise it runs apt-get as root.
set -euo pipefail

usage() {
  sed -n '2,9s/^# \{0,1\}//p' "$0"
}

# Build and test the in-process part of the project.
base_packages=(
  build-essential
  cmake
  ninja-build
  pkg-config
  git
  ca-certificates
  libcaf-dev
  libboost-json1.81-dev
  libspdlog-dev
  libfmt-dev
  libcli11-dev
  libtomlplusplus-dev
  libsqlite3-dev
  sqlite3
  openssl
  libgtest-dev
  libgmock-dev
  libbenchmark-dev
  clang-format
)

# Broker transports and the Redis idempotency store: servers for the
# integration tests, C client libraries for the transports.
server_packages=(
  redis-server
  nats-server
  rabbitmq-server
  libhiredis-dev
  libnats-dev
  librdkafka-dev
  librabbitmq-dev
)

packages=("${base_packages[@]}")
for arg in "$@"; do
  case "$arg" in
    --with-servers) packages+=("${server_packages[@]}") ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      echo "install-deps.sh: unknown argument '$arg'" >&2
      usage >&2
      exit 2
      ;;
  esac
done

missing=()
# The NestJS interop test needs node and npm. Debian's `nodejs` + `npm` when
# neither is on the PATH; a node from elsewhere (e.g. NodeSource, which
# bundles npm and conflicts with Debian's npm package) is used as it is.
for arg in "$@"; do
  if [[ "$arg" == --with-servers ]] && ! command -v npm >/dev/null 2>&1; then
    missing+=(nodejs npm)
  fi
done
for pkg in "${packages[@]}"; do
  status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
  if [[ "$status" != "install ok installed" ]]; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "install-deps.sh: all ${#packages[@]} packages already installed"
  exit 0
fi

if ((EUID != 0)); then
  echo "install-deps.sh: missing packages: ${missing[*]}" >&2
  echo "install them as root:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  echo "or run: sudo $0 $*" >&2
  exit 1
fi

echo "install-deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "${missing[@]}"
