# Shared by the scripts in this folder: where things live, and how the test broker is installed.
# Source it; it defines functions and variables only.

IM_RELAY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Built tools are cached outside the clone so a fresh clone (and CI) reuses them.
IM_RELAY_CACHE="${IM_RELAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/im-relay}"
TANSU_VERSION="0.6.0"
TANSU_BIN="${TANSU_BIN:-$IM_RELAY_CACHE/tansu-$TANSU_VERSION/bin/tansu}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
IM_RELAY_TOPICS="${IM_RELAY_TOPICS:-im.c2c.messages im.c2c.quarantine}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# tansu, an Apache-Kafka-compatible broker written in Rust, stands in for Kafka on machines
# where no Kafka distribution can be fetched. Built once (7-10 min on 2 cores), then cached.
ensure_tansu() {
  if [ -x "$TANSU_BIN" ]; then return 0; fi
  say "installing tansu $TANSU_VERSION into $IM_RELAY_CACHE (once; takes several minutes)"
  cargo install --locked --quiet tansu --version "=$TANSU_VERSION" \
    --features dynostore,libsql --root "$IM_RELAY_CACHE/tansu-$TANSU_VERSION" >&2
}

# cargo-deny, for the offline supply-chain checks (licenses, bans, sources). Cached like tansu.
CARGO_DENY_VERSION="0.20.2"
CARGO_DENY="$IM_RELAY_CACHE/cargo-deny-$CARGO_DENY_VERSION/bin/cargo-deny"
ensure_cargo_deny() {
  if [ -x "$CARGO_DENY" ]; then return 0; fi
  say "installing cargo-deny $CARGO_DENY_VERSION into $IM_RELAY_CACHE (once)"
  cargo install --locked --quiet cargo-deny --version "=$CARGO_DENY_VERSION" \
    --root "$IM_RELAY_CACHE/cargo-deny-$CARGO_DENY_VERSION" >&2
}

# Build dependencies of rdkafka's bundled librdkafka (C compiler, make, OpenSSL headers for
# SASL/SSL, libcurl's for OIDC). Installed with apt when missing and we are allowed to.
ensure_build_deps() {
  local missing=()
  command -v cc >/dev/null || missing+=(gcc)
  command -v make >/dev/null || missing+=(make)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  [ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
  # librdkafka's OAUTHBEARER/OIDC method fetches its tokens with libcurl.
  compgen -G "/usr/include/*/curl/curl.h" >/dev/null || [ -f /usr/include/curl/curl.h ] ||
    missing+=(libcurl4-openssl-dev)
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing build dependencies: ${missing[*]}"
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
  fi
}

# PostgreSQL's server binaries, for the sync tests (they start their own server in a temporary
# directory as an unprivileged user). Debian keeps them in /usr/lib/postgresql/<v>/bin.
ensure_postgres() {
  if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then return 0; fi
  say "installing PostgreSQL (Debian's postgresql package) for the sync tests"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  # The package starts a cluster of its own; the tests do not use it.
  $sudo service postgresql stop >/dev/null 2>&1 || true
}

# MariaDB (Debian's mariadb-server, 10.11) for sync's third backend; the tests run their own
# server in a temporary directory, so the package's is stopped and kept from starting.
ensure_mariadb() {
  if command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ]; then return 0; fi
  say "installing MariaDB (Debian's mariadb-server package) for the sync tests"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server >&2
  $sudo service mariadb stop >/dev/null 2>&1 || true
}

# stunnel4, the TLS terminator the secured-Kafka tests put in front of tansu (which cannot
# serve TLS itself), signed by a private CA the test makes.
ensure_stunnel() {
  if command -v stunnel4 >/dev/null || command -v stunnel >/dev/null; then return 0; fi
  say "installing stunnel4 (Debian) for the SCRAM-over-TLS tests"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stunnel4 >&2
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits up to 10 s for CHECK (a command and its words) to succeed while $server runs; if it
# does not, says that WHAT did not start, with $work/server.log, and returns 1.
wait_server() {
  local what=$1
  shift
  for _ in $(seq 1 100); do
    "$@" && return 0
    kill -0 "$server" 2>/dev/null || break
    sleep 0.1
  done
  say "$what did not start:"; cat "$work/server.log" >&2; return 1
}

# The relay as scripts/bench and scripts/pairs run it: BINARY serve with FSYNC (and any K=V
# words after it) on 127.0.0.1:$port (admin $admin), against the broker on $KAFKA_PORT, a
# fresh spool in $work/spool, its log in $work/server.log. Sets $server; returns 1, with the
# log, if it does not become ready.
start_bench_relay() {
  local binary=$1 fsync=$2
  shift 2
  rm -rf "$work/spool"
  env IM_RELAY_SDK_APP_ID=1400000000 IM_RELAY_LISTEN="127.0.0.1:$port" \
    IM_RELAY_ADMIN_LISTEN="127.0.0.1:$admin" IM_RELAY_KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT" \
    IM_RELAY_TOPIC=bench.messages IM_RELAY_QUARANTINE_TOPIC=bench.quarantine \
    IM_RELAY_SPOOL_DIR="$work/spool" IM_RELAY_SPOOL_FSYNC="$fsync" "$@" \
    "$binary" serve 2>"$work/server.log" &
  server=$!
  wait_server "the relay" curl -sf -o /dev/null "http://127.0.0.1:$admin/readyz"
}
