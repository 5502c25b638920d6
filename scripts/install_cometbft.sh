#!/usr/bin/env bash
# Install the pinned CometBFT binary, and its `abci-cli` (whose `kvstore` command is
# the benchmark's out-of-process reference app), into .tools/bin (idempotent).
#
# Never `@latest`: it resolves to the abandoned v1.0 line. The ABCI protocol we
# speak (src/medledger/consensus/abci.py) is the v0.38 one.
set -euo pipefail

COMETBFT_VERSION="${COMETBFT_VERSION:-v0.38.25}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="$ROOT/.tools/bin"
BIN="$BIN_DIR/cometbft"
ABCI_CLI="$BIN_DIR/abci-cli"
WANT="${COMETBFT_VERSION#v}"
MODULE="github.com/cometbft/cometbft"

need_go() {
    if ! command -v go >/dev/null 2>&1; then
        echo "error: 'go' not found on PATH; install Go >= 1.22 to build CometBFT" >&2
        exit 1
    fi
}

# The CometBFT module version a Go binary was built from (`abci-cli version` prints the
# ABCI protocol version, not the module's, so ask the build info instead).
module_version() {
    go version -m "$1" 2>/dev/null | awk -v m="$MODULE" '$1 == "mod" && $2 == m { print $3 }'
}

install_cometbft() {
    if [[ -x "$BIN" ]]; then
        HAVE="$("$BIN" version 2>/dev/null || true)"
        if [[ "$HAVE" == "$WANT" ]]; then
            echo "cometbft $HAVE already installed at $BIN (skipped)"
            return
        fi
        echo "cometbft at $BIN reports '${HAVE:-nothing}', want $WANT: reinstalling"
    fi
    need_go
    mkdir -p "$BIN_DIR"
    echo "building cometbft $COMETBFT_VERSION with $(go version) into $BIN_DIR ..."
    GOBIN="$BIN_DIR" go install "$MODULE/cmd/cometbft@$COMETBFT_VERSION"
    HAVE="$("$BIN" version)"
    if [[ "$HAVE" != "$WANT" ]]; then
        echo "error: installed cometbft reports '$HAVE', want $WANT" >&2
        exit 1
    fi
    echo "installed cometbft $HAVE at $BIN"
}

install_abci_cli() {
    if [[ -x "$ABCI_CLI" ]] && command -v go >/dev/null 2>&1; then
        HAVE="$(module_version "$ABCI_CLI")"
        if [[ "$HAVE" == "$COMETBFT_VERSION" ]]; then
            echo "abci-cli ($MODULE $HAVE) already installed at $ABCI_CLI (skipped)"
            return
        fi
        echo "abci-cli at $ABCI_CLI was built from '${HAVE:-unknown}', want $COMETBFT_VERSION: reinstalling"
    fi
    need_go
    mkdir -p "$BIN_DIR"
    echo "building abci-cli $COMETBFT_VERSION into $BIN_DIR ..."
    GOBIN="$BIN_DIR" go install "$MODULE/abci/cmd/abci-cli@$COMETBFT_VERSION"
    HAVE="$(module_version "$ABCI_CLI")"
    if [[ "$HAVE" != "$COMETBFT_VERSION" ]]; then
        echo "error: installed abci-cli was built from '$HAVE', want $COMETBFT_VERSION" >&2
        exit 1
    fi
    echo "installed abci-cli ($MODULE $HAVE) at $ABCI_CLI"
}

install_cometbft
install_abci_cli
