#!/bin/sh
# Installs the system tools the test suite runs, when they are missing: promtool (Debian package
# `prometheus`, for tests/test_promtool.py) and strace. Called by `make test`, so a fresh
# machine (and CI's clean clone) needs nothing but the README's commands. `make bench` calls it
# with its own list, `CHECK:PACKAGE` pairs (CHECK a command on PATH or an absolute file path):
#   sh scripts/install-test-tools.sh nginx:nginx-light /usr/lib/nginx/modules/ngx_http_echo_module.so:libnginx-mod-http-echo
#
# Quick and idempotent: tools already on PATH are left alone. Installs only as root with
# apt-get; otherwise it says what is missing and leaves the tests that need it to skip (or
# fail, under CI=true). Never fails the build itself: the tests say precisely what is wrong.
set -u

say() { echo "install-test-tools: $*" >&2; }

# buf (tests/test_api_lint.py) comes from the npm registry, into .tools/ of this checkout, for
# any user: the npm package @bufbuild/buf carries the binary in a platform package.
BUF_VERSION=1.75.0
install_buf() {
    [ -x .tools/node_modules/.bin/buf ] && return 0
    command -v buf >/dev/null 2>&1 && return 0
    if ! command -v npm >/dev/null 2>&1; then
        say "npm missing: not installing buf; tests that need it skip (and fail when CI=true)"
        return 0
    fi
    say "installing buf $BUF_VERSION (npm @bufbuild/buf) into .tools/"
    npm install --prefix .tools --no-audit --no-fund --silent "@bufbuild/buf@$BUF_VERSION" \
        >/dev/null 2>&1 || say "could not install buf"
}

if [ $# -eq 0 ]; then
    install_buf
    set -- promtool:prometheus strace:strace
fi
missing=""
for pair in "$@"; do
    check=${pair%%:*}
    case "$check" in
        /*) [ -e "$check" ] ;;
        *) command -v "$check" >/dev/null 2>&1 ;;
    esac || missing="$missing ${pair#*:}"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    say "missing Debian package(s)$missing; not root with apt-get, so not installing them:"
    say "tests that need them skip (and fail when CI=true)"
    exit 0
fi

# The prometheus package ships a server daemon; installing it must not start one. Where no
# policy-rc.d exists, a temporary one denies service starts for this install only.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
    trap 'exit 1' INT TERM
fi

export DEBIAN_FRONTEND=noninteractive
apt_install() {
    # shellcheck disable=SC2086  # $missing is a list of package names
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
}
say "installing$missing"
# On a fresh machine the package lists may be empty or stale: update once, only when needed.
if ! apt_install 2>/dev/null; then
    apt-get update -qq >/dev/null && apt_install || say "could not install$missing"
fi
exit 0
